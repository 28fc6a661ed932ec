//! A snapshot's manifest (`DIR/manifest.json`): what the saved machines
//! depend on, and the comparisons that refuse a snapshot taken of another
//! network, build or QEMU (docs/snapshots.md). Pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bumped when what a snapshot holds changes meaning.
pub const FORMAT: u32 = 1;

/// What stands for the session directory in a saved command line: every
/// run has its own, and QEMU's sockets and switch paths live there.
pub const SESSION_MARK: &str = "$SESSION";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: u32,
    /// The plan the machines were booted from, as `plan.json` has it.
    pub plan: Value,
    pub compression: Compression,
    pub machines: BTreeMap<String, Saved>,
}

/// One machine's saved state and what it depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    /// `bin/run-<name>-vm`: names the kernel, initrd or start script and
    /// every option the build gives QEMU.
    pub run_script: String,
    /// QEMU's command line as it ran, the session directory replaced by
    /// [`SESSION_MARK`]: what the run script made of its environment too.
    pub argv: Vec<String>,
    /// QMP `query-version`'s `qemu` part, `major.minor.micro`.
    pub qemu_version: String,
    /// The files QEMU's command line names (kernel, initrd, images), by
    /// path, with a digest of their contents.
    pub files: BTreeMap<String, String>,
    /// The state file, in the snapshot directory.
    pub state: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// How a state file is written: QEMU's migration stream, compressed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// The stream as QEMU writes it.
    None,
    /// zstd, level 1 (needs `zstd` on PATH when saving and restoring).
    Zstd,
}

impl Compression {
    /// The state file's name for a machine.
    pub fn file_name(self, machine: &str) -> String {
        let raw = crate::layout::snapshot_state(machine);
        match self {
            Compression::None => raw,
            Compression::Zstd => format!("{raw}.zst"),
        }
    }

    /// The shell command that reads QEMU's stream on standard input and
    /// writes the file `to` (quoted).
    pub fn writer(self, to: &str) -> String {
        match self {
            Compression::None => format!("cat > {to}"),
            // Level 1: as fast as QEMU writes; the zero pages of a fresh
            // guest shrink most.
            Compression::Zstd => format!("zstd -q -1 -T1 -o {to}"),
        }
    }

    /// The shell command that writes the stream of the file `from` (quoted).
    pub fn reader(self, from: &str) -> String {
        match self {
            Compression::None => format!("cat {from}"),
            Compression::Zstd => format!("zstd -q -d -c {from}"),
        }
    }
}

/// QEMU's command line as a key: the session directory, which differs in
/// every run, replaced by [`SESSION_MARK`], and the `-incoming defer` a
/// restore adds left out.
pub fn normalize_argv(argv: &[String], session: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut words = argv.iter().peekable();
    while let Some(word) = words.next() {
        if word == "-incoming" && words.peek().is_some_and(|w| *w == "defer") {
            words.next();
            continue;
        }
        out.push(if session.is_empty() { word.clone() } else { word.replace(session, SESSION_MARK) });
    }
    out
}

/// The host files a QEMU command line names whose contents the guest's
/// state depends on: `-kernel`, `-initrd`, and every `file=` of a device or
/// drive, when absolute and outside the session directory (whose files are
/// the run's own: sockets, or a disk image, which a snapshot refuses).
pub fn named_files(argv: &[String]) -> Vec<String> {
    let mut files = Vec::new();
    let mut previous = "";
    for word in argv {
        if matches!(previous, "-kernel" | "-initrd") {
            files.push(word.clone());
        } else if previous.starts_with('-') && previous != "-append" {
            files.extend(word.split(',').filter_map(|part| part.strip_prefix("file=")).map(str::to_owned));
        }
        previous = word;
    }
    files.retain(|f| f.starts_with('/') && !f.starts_with(SESSION_MARK));
    files.dedup();
    files
}

/// The first place two JSON values differ, as `path: snapshot has A, this network has B`.
pub fn json_difference(path: &str, saved: &Value, now: &Value) -> Option<String> {
    match (saved, now) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| {
                let null = Value::Null;
                json_difference(&format!("{path}.{k}"), a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null))
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().find_map(|(i, (x, y))| json_difference(&format!("{path}[{i}]"), x, y))
        }
        _ if saved == now => None,
        _ => Some(format!("{path}: the snapshot has {saved}, this network has {now}")),
    }
}

/// The first line where two texts differ, with both versions of it.
pub fn line_difference(saved: &str, now: &str) -> Option<String> {
    let (a, b): (Vec<&str>, Vec<&str>) = (saved.lines().collect(), now.lines().collect());
    let line = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))?;
    let show = |l: Option<&&str>| l.map_or("(nothing)".to_owned(), |l| format!("`{}`", l.trim()));
    Some(format!("line {}: the snapshot has {}, this network has {}", line + 1, show(a.get(line)), show(b.get(line))))
}

/// The first word where two command lines differ.
pub fn argv_difference(saved: &[String], now: &[String]) -> Option<String> {
    let at = (0..saved.len().max(now.len())).find(|&i| saved.get(i) != now.get(i))?;
    let show = |w: Option<&String>| w.map_or("(nothing)".to_owned(), |w| format!("{w:?}"));
    Some(format!("word {}: the snapshot has {}, this QEMU has {}", at + 1, show(saved.get(at)), show(now.get(at))))
}

impl Manifest {
    /// Refuses the snapshot for a network whose plan or run scripts
    /// (`(machine, script)` in plan order) are not the ones it was taken
    /// of, saying the first difference.
    pub fn check_network(&self, plan: &Value, run_scripts: &[(String, String)]) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("it is in format {}, this vmlab reads format {FORMAT}", self.format));
        }
        if let Some(diff) = json_difference("plan", &self.plan, plan) {
            return Err(format!("the network differs: {diff}"));
        }
        for (name, script) in run_scripts {
            let saved = self.machines.get(name).ok_or_else(|| format!("it holds no machine {name:?}"))?;
            if let Some(diff) = line_difference(&saved.run_script, script) {
                return Err(format!("machine {name:?}: its run script differs at {diff}"));
            }
        }
        Ok(())
    }
}

impl Saved {
    /// Refuses to load the state into a QEMU started differently or of
    /// another version.
    pub fn check_qemu(&self, argv: &[String], version: &str) -> Result<(), String> {
        if self.qemu_version != version {
            return Err(format!("QEMU is version {version}, the snapshot was taken with {}", self.qemu_version));
        }
        match argv_difference(&self.argv, argv) {
            Some(diff) => Err(format!("QEMU's command line differs at {diff}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn words(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn command_lines_lose_the_session_and_the_incoming_option() {
        let cases = [
            (
                "qemu -chardev socket,path=/tmp/s-1/a/shell.sock",
                "/tmp/s-1",
                "qemu -chardev socket,path=$SESSION/a/shell.sock",
            ),
            ("qemu -m 256 -incoming defer", "/tmp/s-1", "qemu -m 256"),
            ("qemu -incoming tcp:0:4444", "/tmp/s", "qemu -incoming tcp:0:4444"),
            ("qemu -kernel /k", "", "qemu -kernel /k"),
        ];
        for (argv, session, want) in cases {
            assert_eq!(normalize_argv(&words(argv), session), words(want), "{argv}");
        }
    }

    #[test]
    fn named_files_are_images_and_boot_files_outside_the_session() {
        let argv = words(
            "qemu -kernel /g/kernel -initrd /g/initrd -fw_cfg name=opt/x,file=/b/config/a.conf \
             -drive if=virtio,file=/nix/store/x-store.img,readonly=on -chardev socket,path=$SESSION/a/shell.sock \
             -drive file=$SESSION/a/disk.qcow2 -append file=/not/an/option",
        );
        assert_eq!(named_files(&argv), ["/g/kernel", "/g/initrd", "/b/config/a.conf", "/nix/store/x-store.img"]);
    }

    #[test]
    fn json_differences_name_the_first_path() {
        let a = json!({"name": "n", "machines": [{"name": "a", "memory": 256}], "vlans": [1]});
        let cases = [
            (json!({"name": "n", "machines": [{"name": "a", "memory": 256}], "vlans": [1]}), None),
            (
                json!({"name": "n", "machines": [{"name": "a", "memory": 512}], "vlans": [1]}),
                Some("plan.machines[0].memory: the snapshot has 256, this network has 512"),
            ),
            (
                json!({"name": "n", "machines": [{"name": "a", "memory": 256}], "vlans": [1, 2]}),
                Some("plan.vlans: the snapshot has [1], this network has [1,2]"),
            ),
            (
                json!({"name": "n", "machines": [{"name": "a", "memory": 256, "x": 1}], "vlans": [1]}),
                Some("plan.machines[0].x: the snapshot has null, this network has 1"),
            ),
        ];
        for (b, want) in cases {
            assert_eq!(json_difference("plan", &a, &b).as_deref(), want, "{b}");
        }
    }

    #[test]
    fn text_and_word_differences() {
        assert_eq!(line_difference("a\nb\n", "a\nb\n"), None);
        assert_eq!(
            line_difference("a\n  -m 256 \\\n", "a\n  -m 512 \\\n").unwrap(),
            "line 2: the snapshot has `-m 256 \\`, this network has `-m 512 \\`"
        );
        assert_eq!(
            line_difference("a\n", "a\nb\n").unwrap(),
            "line 2: the snapshot has (nothing), this network has `b`"
        );
        assert_eq!(argv_difference(&words("q -m 1"), &words("q -m 1")), None);
        assert_eq!(
            argv_difference(&words("q -m 1"), &words("q -m 1 -x")).unwrap(),
            "word 4: the snapshot has (nothing), this QEMU has \"-x\""
        );
    }

    fn manifest() -> Manifest {
        let saved = Saved {
            run_script: "#!/bin/sh\nexec qemu -m 256\n".into(),
            argv: words("qemu -m 256"),
            qemu_version: "7.2.22".into(),
            files: BTreeMap::new(),
            state: "a.state.zst".into(),
            bytes: 1,
        };
        Manifest {
            format: FORMAT,
            plan: json!({"name": "n"}),
            compression: Compression::Zstd,
            machines: [("a".to_owned(), saved)].into(),
        }
    }

    #[test]
    fn a_snapshot_fits_only_its_own_network_and_qemu() {
        let m = manifest();
        let script = |s: &str| vec![("a".to_owned(), s.to_owned())];
        let plan = json!({"name": "n"});
        assert_eq!(m.check_network(&plan, &script("#!/bin/sh\nexec qemu -m 256\n")), Ok(()));
        let cases = [
            (json!({"name": "m"}), script("#!/bin/sh\nexec qemu -m 256\n"), "the network differs: plan.name: the snapshot has \"n\", this network has \"m\""),
            (plan.clone(), script("#!/bin/sh\nexec qemu -m 512\n"), "machine \"a\": its run script differs at line 2: the snapshot has `exec qemu -m 256`, this network has `exec qemu -m 512`"),
            (plan.clone(), vec![("b".to_owned(), String::new())], "it holds no machine \"b\""),
        ];
        for (plan, scripts, want) in cases {
            assert_eq!(m.check_network(&plan, &scripts).unwrap_err(), want);
        }
        let old = Manifest { format: 0, ..manifest() };
        assert_eq!(old.check_network(&plan, &[]).unwrap_err(), "it is in format 0, this vmlab reads format 1");
        let saved = &m.machines["a"];
        assert_eq!(saved.check_qemu(&words("qemu -m 256"), "7.2.22"), Ok(()));
        assert_eq!(
            saved.check_qemu(&words("qemu -m 256"), "8.0.0").unwrap_err(),
            "QEMU is version 8.0.0, the snapshot was taken with 7.2.22"
        );
        assert_eq!(
            saved.check_qemu(&words("qemu -m 256 -snapshot"), "7.2.22").unwrap_err(),
            "QEMU's command line differs at word 4: the snapshot has (nothing), this QEMU has \"-snapshot\""
        );
    }

    #[test]
    fn state_files_and_their_commands() {
        assert_eq!(Compression::Zstd.file_name("a"), "a.state.zst");
        assert_eq!(Compression::None.file_name("a"), "a.state");
        assert_eq!(Compression::Zstd.writer("'/s/a'"), "zstd -q -1 -T1 -o '/s/a'");
        assert_eq!(Compression::None.reader("'/s/a'"), "cat '/s/a'");
    }
}
