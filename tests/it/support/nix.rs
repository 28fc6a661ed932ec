//! The Nix layer's test helpers, with Debian's Nix (no nixpkgs): the library
//! gets the host's programs through nix/host.nix and builds with the sandbox
//! off. Nix creates its store (/nix) on first use; the settings a fresh
//! machine lacks come through NIX_CONFIG, so nothing outside the store is
//! configured.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{repo_root, run};

/// Root without build users, no binary cache (no network), host paths in builders.
const NIX_CONFIG: &str = "sandbox = false\nbuild-users-group =\nsubstituters =\n\
                          experimental-features = nix-command flakes\n";

/// A Nix command with the settings above, or `None` (and the reason printed)
/// where Nix is not installed.
pub fn nix(program: &str) -> Option<Command> {
    if which::which(program).is_err() {
        crate::support::skip(&format!("{program} not found (Debian: nix-bin; .ci/install installs it)"));
        return None;
    }
    let mut cmd = Command::new(program);
    cmd.env("NIX_CONFIG", NIX_CONFIG).stdin(Stdio::null());
    Some(cmd)
}

/// The stdout of a command that must have succeeded (`what` it was).
pub fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A path as a Nix expression (any characters but `"` and `${`).
pub fn nix_path(path: &Path) -> String {
    format!("(/. + \"{}\")", path.display())
}

/// The library with the host's tools and the vmlab under test.
pub fn lab() -> String {
    format!(
        "(import {} {{ vmlab = {}; }})",
        nix_path(&repo_root().join("nix/host.nix")),
        nix_path(Path::new(env!("CARGO_BIN_EXE_vmlab")))
    )
}

/// The webserver example (examples/webserver/default.nix), `server` forwarding host `port`.
pub fn example_expr(port: u16) -> String {
    format!(
        "(import {} {{ lab = {}; port = {port}; memory = 128; testArgs = {{ requiredSystemFeatures = [ ]; }}; }})",
        nix_path(&repo_root().join("examples/webserver")),
        lab()
    )
}

/// `nix-build -E EXPR`: the output path, or the failed build's output.
pub fn nix_build(expr: &str, extra: &[&str]) -> Option<Result<PathBuf, Output>> {
    let out = run(nix("nix-build")?.args(["--no-out-link", "-E", expr]).args(extra));
    if !out.status.success() {
        return Some(Err(out));
    }
    Some(Ok(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())))
}

pub fn built(expr: &str) -> Option<PathBuf> {
    let result = nix_build(expr, &[])?;
    Some(result.unwrap_or_else(|out| panic!("nix-build {expr}: {}", String::from_utf8_lossy(&out.stderr))))
}

/// The Nix fixture `file` of tests/fixtures/nix applied to this checkout
/// (`root`) and the bindings `args`.
pub fn nix_fixture(file: &str, args: &str) -> String {
    format!(
        "import {} {{ root = {}; {args} }}",
        nix_path(&repo_root().join("tests/fixtures/nix").join(file)),
        nix_path(repo_root())
    )
}
