//! The layering of docs/design.md, checked: a module uses only the modules
//! below it in [`LAYERS`], so imports point down the pipeline and there is
//! no loop.

/// Lowest first. `sync`, `shell`, `layout` and `accel` are what everyone shares;
/// then the pipeline; `cli` describes the command line and `commands` runs it.
const LAYERS: [&str; 13] = [
    "sync", "shell", "layout", "accel", "spec", "plan", "emit", "guest", "runtime", "driver", "coverage", "cli",
    "commands",
];

#[test]
fn imports_point_down_the_layers() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rank = |module: &str| LAYERS.iter().position(|l| *l == module);
    let mut upward = Vec::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let relative = path.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        let module = relative.split(['/', '.']).next().unwrap();
        let (Some(own), true) = (rank(module), relative.ends_with(".rs")) else { continue };
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests may build what they need from anywhere.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        for (at, _) in code.match_indices("crate::") {
            let used: String = code[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let line = code[..at].lines().count();
            let comment = code[..at].rsplit('\n').next().unwrap().trim_start().starts_with("//");
            if rank(&used).is_some_and(|r| r > own) && !comment {
                upward.push(format!("{relative}:{line} uses {used}"));
            }
        }
    }
    assert!(upward.is_empty(), "imports up the layers:\n{}", upward.join("\n"));
}
