//! Snapshots on real VMs (docs/snapshots.md): a two-machine network of the
//! default guest, saved once by `vmlab snapshot`, then restored by `vmlab
//! test --snapshot` (and `vmlab up --snapshot`): the network works between restored machines and
//! through a forwarded port, clocks are the host's, two restores draw
//! different random numbers, a restarted machine boots cold, and a snapshot
//! that does not fit is refused.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::support::{assert_nothing_left, free_port, http_get, leftovers, test_run, text, vmlab_in, write_script, Up};
use crate::support::{run, vmlab, webserver_guest};

/// A network saved once for every test here.
struct Snapshot {
    dir: PathBuf,
    spec: PathBuf,
    /// The host port forwarded to the server's port 80.
    port: u16,
    taken: SystemTime,
}

/// The network `snapweb`: `server` (serving the example's page, its port 80
/// forwarded to `port`) and `client` on vlan 1, `memory` MiB each.
fn write_spec(path: &Path, port: u16, memory: u32) {
    let g = webserver_guest();
    let node = |forward: serde_json::Value| {
        json!({"kernel": g.join("kernel"), "initrd": g.join("initrd"), "memory": memory, "cmdline": "quiet",
               "forwardPorts": forward})
    };
    let mut server = node(json!([{"host": port, "guest": 80}]));
    server["snapshotReady"] = json!("nc -w 2 localhost 80 -e true");
    let spec = json!({"name": "snapweb", "nodes": {"server": server, "client": node(json!([]))}});
    std::fs::write(path, spec.to_string()).unwrap();
}

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        // One place, emptied first: every run's snapshot is tens of MiB.
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("snapshot");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let port = free_port();
        let spec = root.join("snapweb.json");
        write_spec(&spec, port, 128);
        let dir = root.join("snap");
        // Compressed: the Nix test takes the default, uncompressed.
        let out = run(vmlab()
            .env("TMPDIR", &root)
            .arg("snapshot")
            .arg(&spec)
            .args(["--compress", "zstd", "--out"])
            .arg(&dir));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(stderr.contains("server: waiting for success of `nc -w 2 localhost 80 -e true`"), "{stderr}");
        assert!(dir.join("server.state.zst").is_file(), "{stderr}");
        Snapshot { dir, spec, port, taken: SystemTime::now() }
    })
}

/// Restores of the snapshot take turns: its forwarded port is one.
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the Python test `script` on the snapshot's network, restored;
/// checks that it passed, that both machines were restored and that nothing
/// is left; its log.
fn restored_run(tmp: &Path, script: &str) -> String {
    let s = snapshot();
    let _turn = turn();
    let (runs, out) = (tmp.join("runs"), tmp.join("out"));
    let script = write_script(tmp, "test.py", script);
    let output = test_run(&runs, &s.spec, &script, &out, &["--snapshot", &s.dir.to_string_lossy()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_nothing_left(&runs);
    let log = std::fs::read_to_string(out.join("vmlab.log")).unwrap();
    for machine in ["client", "server"] {
        assert!(log.contains(&format!("{machine}: restored from ")), "{log}");
    }
    log
}

#[test]
fn a_restored_network_works_over_its_vlan_and_forwarded_port_with_the_hosts_clock() {
    let s = snapshot();
    // Long enough after the save that a guest clock left as saved is caught.
    let since = SystemTime::now().duration_since(s.taken).unwrap_or_default();
    std::thread::sleep(Duration::from_secs(12).saturating_sub(since));
    let tmp = tempfile::tempdir().unwrap();
    let log = restored_run(
        tmp.path(),
        &format!(
            r#"
import time, urllib.request
start_all()
page = client.succeed("wget -qO- http://server/")
assert "Hello from the vmlab web server" in page, page
assert client.succeed("wget -qO- http://[2001:db8:1::2]/") == page
assert urllib.request.urlopen("http://127.0.0.1:{port}/", timeout=60).read().decode() == page
for m in [client, server]:
    before = time.time()
    guest = int(m.succeed("date +%s"))
    assert before - 2 <= guest <= time.time() + 2, (m.name, guest, before)
"#,
            port = s.port
        ),
    );
    // Restored, not booted: no banner was waited for.
    assert!(!log.contains("backdoor shell ready"), "{log}");
}

#[test]
fn two_restores_draw_different_random_numbers() {
    let script = r#"
import os
start_all()
numbers = [client.succeed("head -c 16 /dev/urandom | od -An -tx1"), client.succeed("echo $RANDOM"),
           server.succeed("head -c 16 /dev/urandom | od -An -tx1"), server.succeed("echo $RANDOM")]
with open(os.path.join(os.environ["VMLAB_OUT"], "numbers"), "w") as f:
    f.write(repr(numbers))
"#;
    let draws: Vec<Vec<String>> = (0..2)
        .map(|_| {
            let tmp = tempfile::tempdir().unwrap();
            restored_run(tmp.path(), script);
            let text = std::fs::read_to_string(tmp.path().join("out/numbers")).unwrap();
            text.split(", ").map(str::to_owned).collect()
        })
        .collect();
    assert_eq!(draws[0].len(), 4, "{draws:?}");
    for (a, b) in draws[0].iter().zip(&draws[1]) {
        assert_ne!(a, b, "{draws:?}");
    }
}

#[test]
fn a_restored_machine_boots_cold_when_it_reboots() {
    let tmp = tempfile::tempdir().unwrap();
    let log = restored_run(
        tmp.path(),
        r#"
start_all()
server.succeed("true")
client.reboot()
assert client.succeed("echo back") == "back\n"
server.crash()
server.start()
server.wait_for_open_port(80)
"#,
    );
    let restored = log.find("client: restored from").unwrap();
    let booted = log.find("client: backdoor shell ready").expect("a cold boot after the reboot");
    assert!(restored < booted, "{log}");
    assert_eq!(log.matches("client: restored from").count(), 1, "{log}");
    assert_eq!(log.matches("server: restored from").count(), 1, "{log}");
    assert!(log.contains("server: backdoor shell ready"), "{log}");
}

#[test]
fn a_snapshot_that_does_not_fit_is_refused_saying_what_differs() {
    let s = snapshot();
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let script = write_script(tmp.path(), "test.py", "start_all()\nclient.succeed('true')\n");
    let snapshot = s.dir.to_string_lossy().into_owned();
    let restore = |network: &Path, env: &[(&str, &str)]| {
        let mut cmd = vmlab_in(&runs);
        cmd.envs(env.iter().copied()).arg("test").arg(network).arg(&script);
        let out = run(cmd.arg("--out").arg(tmp.path().join("out")).args(["--snapshot", &snapshot]));
        assert_nothing_left(&runs);
        out
    };

    let bigger = tmp.path().join("bigger.json");
    write_spec(&bigger, s.port, 256);
    let out = restore(&bigger, &[]);
    assert_eq!(out.status.code(), Some(2));
    let want = format!(
        "error: snapshot {} does not fit this network: the network differs: plan.machines[0].memory: the snapshot has 128, this network has 256\n",
        s.dir.display()
    );
    assert_eq!(text(&out.stderr).lines().last().map(|l| format!("{l}\n")), Some(want));

    let same = tmp.path().join("same.json");
    std::fs::copy(&s.spec, &same).unwrap();
    let out = restore(&same, &[("QEMU_OPTS", "-device virtio-rng-pci")]);
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("cannot restore it from"), "{stderr}");
    assert!(stderr.contains("QEMU's command line differs at word"), "{stderr}");
    assert!(stderr.contains("this QEMU has \"-device\""), "{stderr}");
    assert!(!stderr.contains("backdoor shell ready"), "no cold boot instead: {stderr}");

    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = run(vmlab_in(&runs)
        .arg("test")
        .arg(&same)
        .arg(&script)
        .arg("--out")
        .arg(tmp.path().join("out2"))
        .arg("--snapshot")
        .arg(&open));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains(&format!("refusing snapshot {}", open.display())), "{}", text(&out.stderr));
}

#[test]
fn vmlab_up_restores_the_network_and_serves_its_forwarded_port() {
    let s = snapshot();
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = vmlab();
    cmd.arg("up").arg(&s.spec).arg("--snapshot").arg(&s.dir);
    let mut up = Up::spawn(cmd, tmp.path(), &[]);
    let session = up.session();
    up.wait_for("all 2 machines are up");
    assert!(http_get(s.port).contains("Hello from the vmlab web server"));
    up.signal(libc::SIGTERM);
    let (status, output) = up.finish();
    assert!(status.success(), "{output}");
    for machine in ["client", "server"] {
        assert!(output.contains(&format!("{machine}: restored from ")), "{output}");
    }
    assert!(!output.contains("backdoor shell ready"), "booted instead: {output}");
    assert_eq!(leftovers(&session), []);
}
