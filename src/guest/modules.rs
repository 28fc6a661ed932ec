//! Which kernel module files the guest loads, and in what order, from the
//! module tree's `modules.dep` (and `modules.builtin`, for modules that are
//! compiled in). Pure: callers read the files.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context};

/// What the guest needs: virtio PCI transport, NICs, the virtio console (the
/// backdoor's hvc0), fw_cfg in sysfs (the configuration), and the ACPI power
/// button as an input device (how a machine busy with a command is shut down).
pub const REQUIRED: &[&str] = &["virtio_pci", "virtio_net", "virtio_console", "qemu_fw_cfg", "button", "evdev"];

/// The module files (paths relative to the module tree) to load, each once,
/// every dependency before its dependents. Modules listed in `builtin` are
/// skipped. Compressed modules are returned as they are (see [`unpack_zstd`]).
pub fn resolve(modules_dep: &str, builtin: &str, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for (lineno, line) in (1..).zip(modules_dep.lines()) {
        if line.trim().is_empty() {
            continue;
        }
        let (path, rest) =
            line.split_once(':').with_context(|| format!("modules.dep line {lineno}: no `:` in {line:?}"))?;
        let path = path.trim().to_string();
        deps.insert(module_name(&path), (path, rest.split_whitespace().map(str::to_string).collect()));
    }
    let builtin: BTreeSet<String> = builtin.lines().map(str::trim).filter(|l| !l.is_empty()).map(module_name).collect();

    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        let (path, _) = deps
            .get(&name)
            .with_context(|| format!("kernel module {name} is neither in modules.dep nor in modules.builtin"))?;
        visit(path, &deps, &mut done, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

/// Depth-first: a module's dependencies (from their own modules.dep lines),
/// then the module. `stack` detects cycles, which depmod never writes but a
/// hand-made tree might.
fn visit(
    path: &str,
    deps: &BTreeMap<String, (String, Vec<String>)>,
    done: &mut BTreeSet<String>,
    stack: &mut Vec<String>,
    order: &mut Vec<String>,
) -> anyhow::Result<()> {
    if done.contains(path) {
        return Ok(());
    }
    if stack.iter().any(|p| p == path) {
        bail!("modules.dep: dependency cycle: {} -> {path}", stack.join(" -> "));
    }
    let (_, module_deps) = deps
        .get(&module_name(path))
        .with_context(|| format!("modules.dep: {path} is a dependency but has no line of its own"))?;
    stack.push(path.to_string());
    // depmod lists a module's dependencies so that loading them in reverse works;
    // visiting in reverse keeps that order when the closure is flat.
    for dep in module_deps.iter().rev() {
        visit(dep, deps, done, stack, order)?;
    }
    stack.pop();
    done.insert(path.to_string());
    order.push(path.to_string());
    Ok(())
}

/// A module as the initrd carries it: `.ko.zst` decompressed here, since
/// busybox has no zstd (nixpkgs' and Fedora's kernels compress modules with
/// it); `.ko.xz` and `.ko.gz` stay compressed, the guest's busybox reads them.
pub fn unpack_zstd(path: &str, bytes: Vec<u8>) -> anyhow::Result<(String, Vec<u8>)> {
    let Some(plain) = path.strip_suffix(".zst") else { return Ok((path.to_string(), bytes)) };
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("kernel module {path}: not zstd: {e}"))?;
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut decoder, &mut out)
        .with_context(|| format!("kernel module {path}: corrupt zstd data"))?;
    Ok((plain.to_string(), out))
}

/// `kernel/drivers/char/hw_random/virtio-rng.ko.xz` → `virtio_rng`: the kernel
/// treats `-` and `_` in module names alike.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split_once(".ko").map_or(file, |(stem, _)| stem);
    stem.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of Debian 12's cloud kernel tree (6.1), trimmed.
    const DEBIAN: &str = "\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/firmware/qemu_fw_cfg.ko:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/acpi/button.ko:
kernel/drivers/input/evdev.ko:
";

    fn short(paths: &[String]) -> Vec<String> {
        paths.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn resolves_in_dependency_order_each_once() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            (
                "",
                REQUIRED,
                &[
                    "virtio_ring",
                    "virtio",
                    "virtio_pci_modern_dev",
                    "virtio_pci_legacy_dev",
                    "virtio_pci",
                    "failover",
                    "net_failover",
                    "virtio_net",
                    "virtio_console",
                    "qemu_fw_cfg",
                    "button",
                    "evdev",
                ],
            ),
            // Built-in modules are skipped, their dependencies still resolved when needed.
            (
                "kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/firmware/qemu_fw_cfg.ko\n",
                REQUIRED,
                &[
                    "virtio_ring",
                    "virtio",
                    "failover",
                    "net_failover",
                    "virtio_net",
                    "virtio_console",
                    "button",
                    "evdev",
                ],
            ),
            // `-` and `_` are the same; compressed modules keep their file names.
            ("", &["virtio-rng", "virtio_console"], &["virtio_ring", "virtio", "virtio_rng", "virtio_console"]),
        ];
        for (builtin, wanted, expected) in cases {
            let order = resolve(DEBIAN, builtin, wanted).unwrap();
            assert_eq!(short(&order), *expected, "builtin {builtin:?}, wanted {wanted:?}");
        }
        let rng = resolve(DEBIAN, "", &["virtio_rng"]).unwrap();
        assert_eq!(rng.last().unwrap(), "kernel/drivers/char/hw_random/virtio-rng.ko.xz");
    }

    #[test]
    fn dependencies_listed_in_any_order_still_load_first() {
        // A dependency line in "wrong" order: the depth-first walk still puts
        // each module after everything it needs.
        let dep = "c.ko: a.ko b.ko\nb.ko: a.ko\na.ko:\n";
        assert_eq!(resolve(dep, "", &["c"]).unwrap(), ["a.ko", "b.ko", "c.ko"]);
    }

    #[test]
    fn zstd_modules_are_decompressed_and_others_kept() {
        let module = b"\x7fELF a kernel module".repeat(100);
        let zstd = ruzstd::encoding::compress_to_vec(module.as_slice(), ruzstd::encoding::CompressionLevel::Fastest);
        assert_eq!(unpack_zstd("kernel/a.ko.zst", zstd).unwrap(), ("kernel/a.ko".to_string(), module.clone()));
        assert_eq!(
            unpack_zstd("kernel/b.ko.xz", b"xz".to_vec()).unwrap(),
            ("kernel/b.ko.xz".to_string(), b"xz".to_vec())
        );
        let err = unpack_zstd("kernel/c.ko.zst", b"not zstd".to_vec()).unwrap_err().to_string();
        assert!(err.starts_with("kernel module kernel/c.ko.zst: not zstd"), "{err}");
    }

    #[test]
    fn errors() {
        let cases = [
            (DEBIAN, &["e1000"][..], "kernel module e1000 is neither in modules.dep nor in modules.builtin"),
            ("a.ko: b.ko\n", &["a"], "modules.dep: b.ko is a dependency but has no line of its own"),
            ("a.ko: b.ko\nb.ko: a.ko\n", &["a"], "modules.dep: dependency cycle: a.ko -> b.ko -> a.ko"),
            ("a.ko\n", &["a"], "modules.dep line 1: no `:` in \"a.ko\""),
        ];
        for (dep, wanted, message) in cases {
            assert_eq!(resolve(dep, "", wanted).unwrap_err().to_string(), message, "{dep:?}");
        }
    }
}
