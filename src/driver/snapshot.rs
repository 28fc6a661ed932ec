//! One machine's side of snapshots, over QMP (docs/snapshots.md): saving
//! its state with QEMU's migration to a file, resuming a new QEMU started
//! with `-incoming defer` from it, and what the guest needs afterwards.
//! `vmlab snapshot` and `--snapshot` (src/runtime/snapshot.rs) decide
//! which machines and where.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use super::monitor::Monitor;
use super::DriverError;
use crate::runtime::manifest::{normalize_argv, Compression, Saved};
use crate::shell::quote;

/// How often a save or a restore under way is looked at.
const POLL: Duration = Duration::from_millis(10);

/// The longest a save may take: gigabytes of guest memory through a
/// compressor on a loaded host.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);

/// Host random bytes written into a restored guest's random pool.
pub const SEED_BYTES: usize = 64;

/// What a machine is restored from.
#[derive(Debug, Clone)]
pub struct Restore {
    pub saved: Saved,
    /// The state file, absolute.
    pub file: PathBuf,
    pub compression: Compression,
    /// The session directory the new QEMU runs in, which its command line
    /// names (see [`normalize_argv`]).
    pub session: String,
}

/// QEMU's command line, from the process itself, as a key (see
/// [`normalize_argv`]): what the run script made of its environment.
pub fn qemu_argv(pid: u32, session: &str) -> std::io::Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let words: Vec<String> =
        raw.split(|&b| b == 0).filter(|w| !w.is_empty()).map(|w| String::from_utf8_lossy(w).into_owned()).collect();
    Ok(normalize_argv(&words, session))
}

/// `major.minor.micro` of the running QEMU.
pub fn qemu_version(monitor: &Monitor) -> Result<String, DriverError> {
    let v = monitor.execute("query-version", json!({}))?;
    let part = |k: &str| v["qemu"][k].as_u64().unwrap_or_default();
    Ok(format!("{}.{}.{}", part("major"), part("minor"), part("micro")))
}

/// Why a machine's state directory keeps it from being saved: a file QEMU
/// writes there (a start script's disk image) would have to be saved with
/// it, and a snapshot holds memory and devices only. Sockets are the run's
/// own; directories (a start script's exchange directories) are shared over
/// 9p, if at all, which QEMU itself refuses to save while mounted.
pub fn unsaved_files(state_dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(state_dir).map_err(|e| format!("cannot read {}: {e}", state_dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            return Err(format!(
                "its state directory holds {}, which a snapshot would not save (a disk image? give the machine none: docs/snapshots.md)",
                entry.path().display()
            ));
        }
    }
    Ok(())
}

/// QEMU's words, without the monitor's "machine X: QMP: command: " prefix.
fn qemu_says(e: &DriverError) -> String {
    e.message.rsplit(": QMP: ").next().unwrap_or(&e.message).split_once(": ").map_or(e.message.clone(), |x| x.1.into())
}

/// Pauses the guest and writes its state into `file`. QEMU's exec
/// migration runs its command with a pipe and may end it as soon as the
/// stream is written, before a compressor has flushed; so the command only
/// starts the writer in the background (in QEMU's process group, so it goes
/// with QEMU) and the file gets its name once whole. `Err`: why not, in QEMU's words.
pub fn save(monitor: &Monitor, file: &Path, compression: Compression) -> Result<(), String> {
    let part = PathBuf::from(format!("{}.part", file.display()));
    let failed = PathBuf::from(format!("{}.failed", file.display()));
    let q = |p: &Path| quote(&p.to_string_lossy()).into_owned();
    let command = format!(
        "exec 3<&0; ({} <&3 && mv {} {} || : >{}) &",
        compression.writer(&q(&part)),
        q(&part),
        q(file),
        q(&failed)
    );
    monitor.execute("stop", json!({})).map_err(|e| qemu_says(&e))?;
    monitor.execute("migrate", json!({ "uri": format!("exec:{command}") })).map_err(|e| qemu_says(&e))?;
    let deadline = Instant::now() + SAVE_TIMEOUT;
    loop {
        let status = monitor.execute("query-migrate", json!({})).map_err(|e| qemu_says(&e))?;
        match status["status"].as_str().unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => {
                return Err(status["error-desc"].as_str().unwrap_or("QEMU's migration failed").to_owned())
            }
            _ if Instant::now() >= deadline => return Err(format!("not saved after {SAVE_TIMEOUT:?}")),
            _ => std::thread::sleep(POLL),
        }
    }
    while !file.exists() {
        if failed.exists() {
            let _ = std::fs::remove_file(&failed);
            return Err(format!("`{}` failed writing {}", compression.writer("…"), part.display()));
        }
        if Instant::now() >= deadline {
            return Err(format!("{} was not written after {SAVE_TIMEOUT:?}", file.display()));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// Loads `restore` into a QEMU started with `-incoming defer` whose command
/// line is `argv`, once it is the one the state was saved from, and lets the
/// guest run on. `Err`: why not.
pub fn resume(monitor: &Monitor, restore: &Restore, argv: &[String]) -> Result<(), String> {
    let version = qemu_version(monitor).map_err(|e| e.message)?;
    restore.saved.check_qemu(argv, &version)?;
    let reader = restore.compression.reader(&quote(&restore.file.to_string_lossy()));
    monitor.execute("migrate-incoming", json!({ "uri": format!("exec:{reader}") })).map_err(|e| qemu_says(&e))?;
    loop {
        // QEMU exits when the state does not load: the connection closes.
        let status: Value = monitor.execute("query-status", json!({})).map_err(|e| e.message)?;
        match status["status"].as_str().unwrap_or("") {
            "inmigrate" => std::thread::sleep(POLL),
            // Saved paused (the save stops it first), so it stays paused.
            "paused" | "postmigrate" => break,
            "running" => return Ok(()),
            other => return Err(format!("QEMU is {other:?} after loading the state")),
        }
    }
    monitor.execute("cont", json!({})).map(drop).map_err(|e| qemu_says(&e))
}

/// Pure: the shell command a restored guest runs before anything else:
/// its clock was stopped at the save, so it is set to the host's (to the
/// nearest second: busybox's `date` takes whole seconds); and every
/// restore would draw the random numbers the saved kernel was going to, so
/// host random bytes go into its pool (mixed in, not credited: the kernel
/// folds them in when it next reseeds, see docs/snapshots.md).
pub fn after_restore_command(now: SystemTime, seed: &[u8]) -> String {
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64().round() as u64;
    let bytes: String = seed.iter().map(|b| format!("\\{b:03o}")).collect();
    format!("date -u -s @{secs} >/dev/null && printf '{bytes}' >/dev/urandom")
}

/// [`SEED_BYTES`] from the host's random number generator.
pub fn host_seed() -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut seed = vec![0u8; SEED_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_guest_gets_the_hosts_time_and_random_bytes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_600);
        assert_eq!(
            after_restore_command(now, &[0, 7, 8, 255]),
            "date -u -s @1700000001 >/dev/null && printf '\\000\\007\\010\\377' >/dev/urandom"
        );
    }

    #[test]
    fn qemus_words_lose_the_monitors_prefix() {
        let e = DriverError::harness(
            "machine a: QMP: migrate: Migration is disabled when VirtFS export path '/x' is mounted",
        );
        assert_eq!(qemu_says(&e), "Migration is disabled when VirtFS export path '/x' is mounted");
    }

    #[test]
    fn state_directories_with_files_cannot_be_saved() {
        let dir = tempfile::tempdir().unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("qmp.sock")).unwrap();
        std::fs::create_dir(dir.path().join("xchg")).unwrap();
        assert_eq!(unsaved_files(dir.path()), Ok(()));
        std::fs::write(dir.path().join("a.qcow2"), b"").unwrap();
        let why = unsaved_files(dir.path()).unwrap_err();
        assert!(why.starts_with(&format!("its state directory holds {}/a.qcow2,", dir.path().display())), "{why}");
    }
}
