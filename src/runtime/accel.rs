//! Choosing between KVM and TCG.
//!
//! KVM is judged usable from two facts only: /dev/kvm opens read-write and the
//! CPU advertises vmx or svm. No KVM ioctl is ever issued: on some hosts
//! (nested virtualisation without vmx passed through) /dev/kvm exists and
//! opens, but creating a VM hangs.

use std::fmt;
use std::fs::OpenOptions;

use anyhow::{bail, Result};

use crate::cli::Accel;

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
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Looks at /dev/kvm (opening it, nothing more) and /proc/cpuinfo.
pub fn probe() -> Host {
    let kvm_device_problem =
        OpenOptions::new().read(true).write(true).open("/dev/kvm").err().map(|e| format!("cannot open /dev/kvm: {e}"));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    Host { kvm_device_problem, cpu_has_virtualisation: cpu_has_virtualisation(&cpuinfo) }
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
}
