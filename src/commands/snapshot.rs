//! `vmlab snapshot NETWORK --out DIR`, and restoring a network from such a
//! directory (`vmlab test`/`vmlab up --snapshot DIR`): which machines, the
//! manifest and its key, and whether a directory may be trusted
//! (docs/snapshots.md). One machine's save and restore: src/driver/snapshot.rs.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{mpsc, Arc};

use anyhow::{anyhow, bail, Context, Result};

use crate::cli::SnapshotArgs;
use crate::driver::control::Driver;
use crate::driver::log::Log;
use crate::driver::machine::DEFAULT_TIMEOUT;
use crate::driver::snapshot::Restore;
use crate::driver::DriverError;
use crate::layout;
use crate::runtime::manifest::{named_files, Compression, Manifest, Saved, FORMAT};
use crate::runtime::signals::{self, BlockedSignals};
use crate::runtime::{prepare, spawn_thread, Network};
use crate::EXIT_OK;

/// Store paths never change: their name is their digest.
const STORE: &str = "/nix/store/";

fn say(message: &str) {
    eprintln!("vmlab: {message}");
}

/// Pure: `MACHINE=COMMAND` arguments as a map; a machine named twice is an error.
pub fn readiness(args: &[String]) -> Result<BTreeMap<String, String>> {
    let mut ready = BTreeMap::new();
    for arg in args {
        let (machine, command) =
            arg.split_once('=').ok_or_else(|| anyhow!("--ready {arg:?}: expected MACHINE=COMMAND"))?;
        if ready.insert(machine.to_owned(), command.to_owned()).is_some() {
            bail!("--ready: machine {machine:?} is given twice");
        }
    }
    Ok(ready)
}

pub fn run(args: &SnapshotArgs) -> Result<ExitCode> {
    // Before any thread exists, so that every thread inherits the mask.
    let signals = BlockedSignals::block(&signals::TERMINATION)?;
    let ready = readiness(&args.ready)?;
    if args.compress == Compression::Zstd && which::which("zstd").is_err() {
        bail!("zstd not found on PATH: install the Debian package zstd, or give --compress none");
    }
    create_private_dir(&args.out)?;
    let out = fs::canonicalize(&args.out).with_context(|| format!("cannot resolve {}", args.out.display()))?;
    // The network is gone by the time `save` returns: nothing writes here any more.
    save(args, signals, ready, &out).map_err(|e| {
        empty(&out);
        e
    })
}

/// Leaves the snapshot directory empty, as it was, after a failed snapshot:
/// half a snapshot must not be mistaken for one (it has no manifest anyway),
/// and the same command can be run again.
fn empty(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let _ = fs::remove_file(entry.path());
    }
}

/// Boots, waits for and saves every machine into `out`, then writes the manifest.
fn save(
    args: &SnapshotArgs,
    signals: BlockedSignals,
    mut ready: BTreeMap<String, String>,
    out: &Path,
) -> Result<ExitCode> {
    let prepared = prepare(&args.network, args.accel, false, &say, &|line| eprintln!("{line}"))?;
    for m in &prepared.plan.machines {
        if let Some(command) = &m.snapshot_ready {
            ready.entry(m.name.clone()).or_insert_with(|| command.clone());
        }
    }
    if let Some(unknown) = ready.keys().find(|name| prepared.plan.machine(name).is_none()) {
        bail!("--ready: the network has no machine {unknown:?}");
    }
    let plan_dir = prepared.plan_dir.clone();
    let plan = serde_json::to_value(&prepared.plan).expect("a plan always serialises");
    let network = prepared.start()?;
    let session = network.session().path().to_string_lossy().into_owned();
    let driver = Arc::new(Driver::for_network(&network, out, Arc::new(Log::stderr(None)), None));

    let (events, received) = mpsc::channel();
    let to_events = events.clone();
    spawn_thread("signals".into(), move || _ = to_events.send(Err(signals.wait())))?;
    let names: Vec<String> = network.machines().iter().map(|m| m.name().to_owned()).collect();
    for name in &names {
        let (driver, events, session) = (driver.clone(), events.clone(), session.clone());
        let file = out.join(args.compress.file_name(name));
        let (ready, compress, name) = (ready.get(name).cloned(), args.compress, name.clone());
        spawn_thread(format!("save-{name}"), move || {
            let saved = driver.with_machine(&name, |m| {
                m.without_data_port();
                m.wait_for_boot()?;
                if let Some(command) = &ready {
                    m.wait_until(command, true, DEFAULT_TIMEOUT)?;
                }
                m.save_state(&file, compress, &session)
            });
            let _ = events.send(Ok((name, saved.expect("the driver has every machine of the network"))));
        })?;
    }
    drop(events);
    let mut machines = BTreeMap::new();
    for _ in &names {
        match received.recv().expect("every saving thread answers") {
            Err(signal) => bail!("stopped by {}", signals::name(signal).unwrap_or("a signal")),
            Ok((_, Err(e))) => return Err(failed(e, &network)),
            Ok((name, Ok((argv, qemu_version)))) => {
                let state = args.compress.file_name(&name);
                // The compressor made it with the umask's mode; it is as private as the rest.
                fs::set_permissions(out.join(&state), fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot set the mode of {state}"))?;
                let saved = Saved {
                    run_script: run_script(&plan_dir, &name)?,
                    files: digests(&named_files(&argv))?,
                    argv,
                    qemu_version,
                    bytes: fs::metadata(out.join(&state)).with_context(|| format!("cannot stat {state}"))?.len(),
                    state,
                };
                machines.insert(name, saved);
            }
        }
    }
    driver.close();
    network.stop();
    driver.release_all();
    let manifest = Manifest { format: FORMAT, plan, compression: args.compress, machines };
    let text = serde_json::to_string_pretty(&manifest).expect("a manifest always serialises") + "\n";
    write_private(&out.join(layout::SNAPSHOT_MANIFEST), text.as_bytes())?;
    for (name, saved) in &manifest.machines {
        say(&format!(
            "{name}: {} ({:.1} MiB)",
            out.join(&saved.state).display(),
            saved.bytes as f64 / (1 << 20) as f64
        ));
    }
    say(&format!("snapshot of network {:?} in {}", network.plan().name, out.display()));
    Ok(ExitCode::from(EXIT_OK))
}

/// A machine that could not be saved ends the snapshot, the network stopped.
fn failed(e: DriverError, network: &Network) -> anyhow::Error {
    network.stop();
    anyhow!("{}", e.message)
}

fn run_script(plan_dir: &Path, machine: &str) -> Result<String> {
    let path = plan_dir.join(layout::run_script(machine));
    fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// Each file's digest (MD5 of its contents; a store path is its own).
fn digests(files: &[String]) -> Result<BTreeMap<String, String>> {
    files.iter().map(|f| Ok((f.clone(), digest(Path::new(f))?))).collect()
}

fn digest(path: &Path) -> Result<String> {
    if path.starts_with(STORE) {
        return Ok("store path".to_owned());
    }
    let mut file = fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut md5 = crate::driver::md5::Md5::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))? {
            0 => return Ok(md5.hex()),
            n => md5.update(&buf[..n]),
        }
    }
}

/// The snapshot directory: made mode 0700, or an empty one of ours.
fn create_private_dir(dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            trusted(dir)?;
            if fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?.next().is_some() {
                bail!("snapshot directory {} is not empty", dir.display());
            }
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).with_context(|| format!("cannot write {}", path.display()))
}

/// A snapshot is trusted as state is (docs/design.md, security notes): a
/// file or directory of ours, or root's (the Nix store's), that no one else
/// can write to, and not a link. Whoever could change it would run their
/// own guest as ours.
fn trusted(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let ours = meta.uid() == me || meta.uid() == 0;
    if meta.file_type().is_symlink() || !ours || meta.mode() & 0o022 != 0 {
        bail!(
            "refusing snapshot {}: it must be ours (or root's) and writable by no one else, and not a symbolic link",
            path.display()
        );
    }
    Ok(())
}

/// Makes every machine of a network just started restore from the snapshot
/// in `dir` on its first start, once the snapshot is trusted and its key
/// matches: the plan, the run scripts, the files QEMU reads. QEMU's command
/// line and version are checked as each machine starts. A mismatch is an
/// error saying what differs; nothing boots cold instead.
pub fn attach(dir: &Path, driver: &Driver, network: &Network, plan_dir: &Path) -> Result<()> {
    let dir = fs::canonicalize(dir).with_context(|| format!("cannot find snapshot {}", dir.display()))?;
    let refused = |why: String| anyhow!("snapshot {} does not fit this network: {why}", dir.display());
    trusted(&dir)?;
    let path = dir.join(layout::SNAPSHOT_MANIFEST);
    trusted(&path)?;
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{} is not a snapshot manifest", path.display()))?;
    let plan = serde_json::to_value(network.plan()).expect("a plan always serialises");
    let scripts: Vec<(String, String)> = network
        .plan()
        .machines
        .iter()
        .map(|m| Ok((m.name.clone(), run_script(plan_dir, &m.name)?)))
        .collect::<Result<_>>()?;
    manifest.check_network(&plan, &scripts).map_err(refused)?;
    let session = network.session().path().to_string_lossy().into_owned();
    for (name, saved) in &manifest.machines {
        for (file, want) in &saved.files {
            if digest(Path::new(file)).ok().as_ref() != Some(want) {
                return Err(refused(format!("machine {name:?}: {file} has changed since the snapshot")));
            }
        }
        let file: PathBuf = dir.join(&saved.state);
        trusted(&file)?;
        let restore =
            Restore { saved: saved.clone(), file, compression: manifest.compression, session: session.clone() };
        driver.with_machine(name, |m| m.restore_from(restore)).expect("the plan names the network's machines");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_arguments() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let got = readiness(&args(&["server=test -e /run/ready", "client=true"])).unwrap();
        assert_eq!(got["server"], "test -e /run/ready");
        assert_eq!(got["client"], "true");
        assert_eq!(
            readiness(&args(&["server"])).unwrap_err().to_string(),
            "--ready \"server\": expected MACHINE=COMMAND"
        );
        assert_eq!(readiness(&args(&["a=x", "a=y"])).unwrap_err().to_string(), "--ready: machine \"a\" is given twice");
    }

    #[test]
    fn snapshots_are_trusted_only_when_private() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("snap");
        create_private_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        trusted(&d).unwrap();
        write_private(&d.join("f"), b"x").unwrap();
        assert_eq!(fs::metadata(d.join("f")).unwrap().mode() & 0o777, 0o600);
        let e = create_private_dir(&d).unwrap_err().to_string();
        assert_eq!(e, format!("snapshot directory {} is not empty", d.display()));
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let e = trusted(&d).unwrap_err().to_string();
        assert!(e.starts_with(&format!("refusing snapshot {}: it must be ours", d.display())), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(trusted(&link).is_err());
    }

    #[test]
    fn file_digests() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kernel");
        fs::write(&f, b"abc").unwrap();
        assert_eq!(digest(&f).unwrap(), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(digest(Path::new("/nix/store/x-kernel")).unwrap(), "store path");
    }
}
