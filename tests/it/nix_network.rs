//! Networks built by Nix (examples/webserver/default.nix): the built network
//! runs, and the spec Nix evaluates builds the same output with vmlab.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::support::nix::{built, example_expr, nix, nix_path, ok};
use crate::support::{count, free_port, http_get, leftovers, Up};
use crate::support::{repo_root, run};

/// The example network, built once for every test that needs it.
struct Example {
    port: u16,
    vms: PathBuf,
}

fn shared_example() -> Option<&'static Example> {
    static EXAMPLE: OnceLock<Option<Example>> = OnceLock::new();
    EXAMPLE
        .get_or_init(|| {
            let port = free_port();
            Some(Example { port, vms: built(&format!("{}.vms", example_expr(port)))? })
        })
        .as_ref()
}

#[test]
fn the_nix_built_example_network_serves_its_page() {
    let Some(example) = shared_example() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut up = Up::spawn(Command::new(example.vms.join("bin/run-vms")), &tmp.path().join("run"), &[]);
    let session = up.session();
    up.wait_for(&format!("vmlab: http://127.0.0.1:{} -> server:80", example.port));
    up.wait_for("vmlab: all 2 machines are up");
    let running = crate::support::processes_mentioning(&session);
    assert_eq!((count(&running, "qemu-system-"), count(&running, "vde_switch")), (2, 1), "{running:#?}");
    let page = std::fs::read_to_string(repo_root().join("examples/webserver/www/index.html")).unwrap();
    assert_eq!(http_get(example.port), page);
    up.signal(libc::SIGTERM);
    let (status, output) = up.finish();
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(!session.exists());
    assert_eq!(leftovers(&session), []);
}

/// Every file under `dir` by relative path: its bytes and permission bits.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
    fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<PathBuf, (Vec<u8>, u32)>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, files);
            } else {
                let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o111;
                files.insert(path.strip_prefix(root).unwrap().to_owned(), (std::fs::read(&path).unwrap(), mode));
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    files
}

#[test]
fn the_evaluated_spec_piped_to_vmlab_build_gives_the_derivations_output() {
    let Some(example) = shared_example() else { return };
    let spec_expr = format!("{}.vms.spec", example_expr(example.port));
    let Some(mut eval) = nix("nix") else { return };
    let spec = ok(run(eval.args(["eval", "--impure", "--json", "--expr", &spec_expr])), "nix eval");
    let Some(mut instantiate) = nix("nix-instantiate") else { return };
    let same = ok(run(instantiate.args(["--eval", "--strict", "--json", "-E", &spec_expr])), "nix-instantiate");
    let parsed: Value = serde_json::from_str(&spec).unwrap();
    assert_eq!(parsed, serde_json::from_str::<Value>(&same).unwrap());
    assert_eq!(parsed["nodes"]["server"]["forwardPorts"], json!([{"host": example.port, "guest": 80}]), "{spec}");

    // The vmlab the derivation ran (the store's copy): run-vms names it.
    let vmlab_expr = format!("\"${{{}}}\"", nix_path(Path::new(env!("CARGO_BIN_EXE_vmlab"))));
    let Some(mut eval) = nix("nix") else { return };
    let store_vmlab = ok(run(eval.args(["eval", "--impure", "--raw", "--expr", &vmlab_expr])), "nix eval vmlab");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vms");
    let mut build = Command::new(&store_vmlab);
    build.args(["build", "-", "--out"]).arg(&out).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = build.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), spec.as_bytes()).unwrap();
    ok(child.wait_with_output().unwrap(), "vmlab build -");
    // The driver configuration names its scripts where it was written.
    let placed = |dir: &Path| {
        let root = std::fs::canonicalize(dir).unwrap().to_string_lossy().into_owned();
        let mut files = tree(dir);
        if let Some((config, _)) = files.get_mut(Path::new("nixos-test-driver.json")) {
            *config = String::from_utf8_lossy(config).replace(&root, "@OUT@").into_bytes();
        }
        files
    };
    let (ours, theirs) = (placed(&out), placed(&example.vms));
    assert!(theirs.contains_key(Path::new("bin/run-vms")) && theirs.len() >= 6, "{:?}", theirs.keys());
    assert_eq!(ours, theirs);
}
