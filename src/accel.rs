//! Choosing between KVM and TCG: one rule, applied by `vmlab up` and `vmlab
//! test` ([`probe`], [`decide`]) and by a run script started by hand (the
//! shell condition [`kvm_usable_sh`], generated from the same facts).
//!
//! KVM is judged usable from two facts only: /dev/kvm is a character device
//! that opens read-write, and a `flags` line of /proc/cpuinfo lists vmx or svm. No KVM ioctl is ever
//! issued: on some hosts (nested virtualisation without vmx passed through)
//! /dev/kvm exists and opens, but creating a VM hangs.

use std::fmt;
use std::fs::OpenOptions;

use anyhow::{bail, Result};
use clap::ValueEnum;

const KVM_DEVICE: &str = "/dev/kvm";
const CPUINFO: &str = "/proc/cpuinfo";
/// The CPU flags of hardware virtualisation: Intel's, AMD's.
const VIRTUALISATION_FLAGS: [&str; 2] = ["vmx", "svm"];

/// How QEMU executes guest code (`--accel`, `VMLAB_ACCEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm is usable and the CPU has vmx or svm, TCG otherwise.
    Auto,
    /// Hardware virtualisation; fails when KVM is unusable.
    Kvm,
    /// Software emulation: works everywhere, several times slower.
    Tcg,
}

/// The accelerator every machine of a network runs with (`VMLAB_ACCEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Kvm,
    Tcg,
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resolved::Kvm => "kvm",
            Resolved::Tcg => "tcg",
        })
    }
}

/// What the host offers, gathered by [`probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Why /dev/kvm cannot be used, if it cannot (e.g. `cannot open /dev/kvm: …`).
    pub kvm_device_problem: Option<String>,
    /// A `flags` line of /proc/cpuinfo lists vmx (Intel) or svm (AMD).
    pub cpu_has_virtualisation: bool,
}

/// The decision and, when KVM is not used, why: printed as a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub accel: Resolved,
    pub kvm_unusable_because: Option<String>,
}

/// Pure: the accelerator for a request on a host; `kvm` on a host without
/// usable KVM is an error rather than a silent fallback.
pub fn decide(requested: Accel, host: &Host) -> Result<Choice> {
    let problem = match (&host.kvm_device_problem, host.cpu_has_virtualisation) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => Some("the CPU offers neither vmx nor svm in /proc/cpuinfo".to_owned()),
        (None, true) => None,
    };
    let accel = match (requested, &problem) {
        (Accel::Tcg, _) => Resolved::Tcg,
        (Accel::Kvm, Some(p)) => bail!("--accel kvm: KVM is not usable: {p}"),
        (Accel::Kvm | Accel::Auto, None) => Resolved::Kvm,
        (Accel::Auto, Some(_)) => Resolved::Tcg,
    };
    let kvm_unusable_because = if accel == Resolved::Tcg { problem } else { None };
    Ok(Choice { accel, kvm_unusable_because })
}

/// Pure: whether some `flags` line of /proc/cpuinfo lists vmx or svm.
pub fn cpu_has_virtualisation(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_whitespace().any(|f| VIRTUALISATION_FLAGS.contains(&f)))
}

/// Looks at /dev/kvm (opening it, nothing more) and /proc/cpuinfo.
pub fn probe() -> Host {
    let cpuinfo = std::fs::read_to_string(CPUINFO).unwrap_or_default();
    Host { kvm_device_problem: device_problem(KVM_DEVICE), cpu_has_virtualisation: cpu_has_virtualisation(&cpuinfo) }
}

/// Why `device` is not a character device that opens read-write, if it is not.
fn device_problem(device: &str) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(device) {
        Ok(m) if !m.file_type().is_char_device() => Some(format!("{device} is not a character device")),
        _ => OpenOptions::new().read(true).write(true).open(device).err().map(|e| format!("cannot open {device}: {e}")),
    }
}

/// Pure: a POSIX sh condition, true when KVM is usable by [`probe`]'s facts
/// (so `auto` in a run script decides as [`decide`] does).
pub fn kvm_usable_sh() -> String {
    condition_sh(KVM_DEVICE, CPUINFO)
}

/// The device is a character device (tested first: `<>` would create a
/// missing file) that opens read-write (in a subshell: a failed redirection
/// of `:` ends a POSIX shell), and a `flags` line lists one of the flags as a word.
fn condition_sh(device: &str, cpuinfo: &str) -> String {
    format!(
        "[ -c {device} ] && (: <>{device}) 2>/dev/null && grep -qE '^flags[[:space:]]*:(.*[[:space:]])?({flags})([[:space:]]|$)' {cpuinfo}",
        flags = VIRTUALISATION_FLAGS.join("|"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_table() {
        let host = |device_ok: bool, virt: bool| Host {
            kvm_device_problem: (!device_ok).then(|| "cannot open /dev/kvm: Permission denied".to_owned()),
            cpu_has_virtualisation: virt,
        };
        let no_virt = "the CPU offers neither vmx nor svm in /proc/cpuinfo";
        let no_dev = "cannot open /dev/kvm: Permission denied";
        // (requested, /dev/kvm opens, vmx/svm, expected)
        // Ok((accel, why KVM is unusable)) or Err(message).
        type Expected = Result<(Resolved, Option<&'static str>), &'static str>;
        let cases: [(Accel, bool, bool, Expected); 12] = [
            (Accel::Auto, true, true, Ok((Resolved::Kvm, None))),
            (Accel::Auto, true, false, Ok((Resolved::Tcg, Some(no_virt)))),
            (Accel::Auto, false, true, Ok((Resolved::Tcg, Some(no_dev)))),
            (Accel::Auto, false, false, Ok((Resolved::Tcg, Some(no_dev)))),
            (Accel::Kvm, true, true, Ok((Resolved::Kvm, None))),
            (
                Accel::Kvm,
                true,
                false,
                Err("--accel kvm: KVM is not usable: the CPU offers neither vmx nor svm in /proc/cpuinfo"),
            ),
            (Accel::Kvm, false, true, Err("--accel kvm: KVM is not usable: cannot open /dev/kvm: Permission denied")),
            (Accel::Kvm, false, false, Err("--accel kvm: KVM is not usable: cannot open /dev/kvm: Permission denied")),
            (Accel::Tcg, true, true, Ok((Resolved::Tcg, None))),
            (Accel::Tcg, true, false, Ok((Resolved::Tcg, Some(no_virt)))),
            (Accel::Tcg, false, true, Ok((Resolved::Tcg, Some(no_dev)))),
            (Accel::Tcg, false, false, Ok((Resolved::Tcg, Some(no_dev)))),
        ];
        for (requested, device_ok, virt, expected) in cases {
            let got = decide(requested, &host(device_ok, virt));
            let got = got.map(|c| (c.accel, c.kvm_unusable_because)).map_err(|e| e.to_string());
            let expected = expected.map(|(a, r)| (a, r.map(str::to_owned))).map_err(str::to_owned);
            assert_eq!(got, expected, "{requested:?} device_ok={device_ok} virt={virt}");
        }
    }

    #[test]
    fn cpuinfo_flags() {
        let cases = [
            ("flags\t\t: fpu vme sse2 vmx ept\n", true),
            ("flags\t\t: fpu svm lm\n", true),
            ("flags\t\t: fpu sse2 hypervisor\n", false),
            // vmx as a substring or outside the flags line does not count.
            ("model name\t: vmx svm\nflags\t\t: fpu vmxe\n", false),
            ("vmx flags\t: ept vpid\nflags\t\t: fpu\n", false),
            ("", false),
        ];
        for (cpuinfo, expected) in cases {
            assert_eq!(cpu_has_virtualisation(cpuinfo), expected, "{cpuinfo:?}");
        }
    }

    /// The run script's condition and [`probe`] + [`decide`] agree on every
    /// case: the CPU flags above, and a device that is usable (/dev/null
    /// stands in), a plain file, missing, or a directory.
    #[test]
    fn the_shell_condition_decides_as_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        let (file, missing) = (dir.path().join("kvm"), dir.path().join("missing"));
        std::fs::write(&file, "").unwrap();
        let cpuinfo = dir.path().join("cpuinfo");
        let cpus = [
            "processor\t: 0\nflags\t\t: fpu vme sse2 vmx ept\n",
            "flags\t\t: svm\n",
            "flags\t\t: fpu sse2 hypervisor\n",
            "model name\t: vmx svm\nflags\t\t: fpu vmxe\n",
            "vmx flags\t: ept vpid\nflags\t\t: fpu\n",
            "flags: fpu svm-like\n",
            "",
        ];
        let devices = [std::path::Path::new("/dev/null"), &file, &missing, dir.path()].map(|p| p.display().to_string());
        for cpu in cpus {
            std::fs::write(&cpuinfo, cpu).unwrap();
            for device in &devices {
                let expected = device_problem(device).is_none() && cpu_has_virtualisation(cpu);
                let condition = condition_sh(device, &cpuinfo.display().to_string());
                let status = std::process::Command::new("sh").args(["-euc", &condition]).status().unwrap();
                assert_eq!(status.success(), expected, "{condition} on {cpu:?}");
            }
        }
        assert!(!missing.exists(), "the shell condition created the device");
        assert_eq!(device_problem("/dev/null"), None);
    }
}
