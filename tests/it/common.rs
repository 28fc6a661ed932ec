//! Shared fixtures for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The vmlab binary under test.
pub fn vmlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmlab"))
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// Runs a command, returning its output; panics with stderr if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Processes whose command line or environment mentions `needle` (a session
/// directory, say), as pid and command line: how tests find their own QEMU
/// and vde_switch processes without touching those of concurrent runs.
pub fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let mentions = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        // Unreadable: the process ended meanwhile.
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if mentions(&cmdline) || mentions(&environ) {
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}
