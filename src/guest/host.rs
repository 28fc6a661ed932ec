//! What the guest is made of, found and read on the host: the newest
//! kernel, its release, static binaries, files.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::KERNEL_PACKAGE;

/// The newest `vmlinuz-*` in `boot`, by version order.
pub fn newest_boot_kernel(boot: &Path) -> anyhow::Result<PathBuf> {
    let entries = fs::read_dir(boot).with_context(|| format!("cannot list {}", boot.display()))?;
    let mut versions = Vec::new();
    for entry in entries {
        let name = entry.with_context(|| format!("cannot list {}", boot.display()))?.file_name();
        if let Some(version) = name.to_str().and_then(|n| n.strip_prefix("vmlinuz-")) {
            versions.push(version.to_string());
        }
    }
    let newest = versions.into_iter().max_by(|a, b| version_cmp(a, b)).with_context(|| {
        format!("no kernel in {} (vmlinuz-*): install {KERNEL_PACKAGE}, or pass --kernel", boot.display())
    })?;
    Ok(boot.join(format!("vmlinuz-{newest}")))
}

/// Compares like `sort -V`: runs of digits numerically, everything else bytewise.
pub(super) fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(first) = rest.chars().next() {
            let digit = first.is_ascii_digit();
            let end = rest.find(|c: char| c.is_ascii_digit() != digit).unwrap_or(rest.len());
            out.push((digit, &rest[..end]));
            rest = &rest[end..];
        }
        out
    }
    let key = |(digit, text): (bool, &str)| {
        let trimmed = text.trim_start_matches('0');
        if digit {
            (trimmed.len(), trimmed.to_string())
        } else {
            (0, text.to_string())
        }
    };
    let (a, b) = (chunks(a), chunks(b));
    for (x, y) in a.iter().zip(&b) {
        let order = match (x.0, y.0) {
            (true, true) => key(*x).cmp(&key(*y)),
            _ => x.1.cmp(y.1),
        };
        if order.is_ne() {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

/// The release of a bzImage (`6.1.0-56-cloud-amd64`), from its setup header:
/// the `HdrS` magic at 0x202 and the `kernel_version` pointer at 0x20e.
pub fn kernel_version(image: &[u8]) -> anyhow::Result<String> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage (no HdrS setup header)");
    }
    let pointer = u16::from_le_bytes([image[0x20e], image[0x20f]]) as usize;
    let text = image.get(pointer + 0x200..).filter(|_| pointer != 0).context("bzImage has no kernel version string")?;
    let version = text.split(|&b| b == b' ' || b == 0).next().unwrap_or_default();
    match std::str::from_utf8(version) {
        Ok(version) if !version.is_empty() => Ok(version.to_string()),
        _ => bail!("bzImage has no readable kernel version string"),
    }
}

/// Whether an ELF executable asks for a dynamic loader (has a PT_INTERP
/// program header): the guest has no shared libraries.
pub(super) fn is_dynamic_elf(elf: &[u8]) -> anyhow::Result<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..4) != Some(b"\x7fELF") {
        bail!("not an ELF executable");
    }
    let wide = match elf.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => bail!("unknown ELF class"),
    };
    let big = match elf.get(5) {
        Some(1) => false,
        Some(2) => true,
        _ => bail!("unknown ELF byte order"),
    };
    let number = |offset: usize, size: usize| -> anyhow::Result<usize> {
        let bytes = elf.get(offset..offset + size).context("truncated ELF file")?;
        let fold = |acc: usize, &b: &u8| acc << 8 | b as usize;
        Ok(if big { bytes.iter().fold(0, fold) } else { bytes.iter().rev().fold(0, fold) })
    };
    let (phoff, phentsize, phnum) = if wide {
        (number(0x20, 8)?, number(0x36, 2)?, number(0x38, 2)?)
    } else {
        (number(0x1c, 4)?, number(0x2a, 2)?, number(0x2c, 2)?)
    };
    for i in 0..phnum {
        if number(phoff + i * phentsize, 4)? == PT_INTERP as usize {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Reads an executable that must be statically linked; `package` is the
/// Debian package that provides a static build.
pub(super) fn read_static(path: &Path, package: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = read(path)?;
    if is_dynamic_elf(&bytes).with_context(|| format!("{}", path.display()))? {
        bail!(
            "{} is dynamically linked, but the guest has no shared libraries: install {package} (apt-get install {package}) and use its binary",
            path.display()
        );
    }
    Ok(bytes)
}

pub fn existing(path: &Path, what: &str) -> anyhow::Result<PathBuf> {
    if !path.exists() {
        bail!("{what} {} does not exist", path.display());
    }
    Ok(path.to_path_buf())
}

pub(super) fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The start of a file: enough for a bzImage's setup header and version string.
pub fn read_head(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::new();
    fs::File::open(path)
        .and_then(|file| file.take(0x10000).read_to_end(&mut head))
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(head)
}

pub(super) fn read_text(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

pub(super) fn read_text_if_exists(path: &Path) -> anyhow::Result<String> {
    match fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        other => other.with_context(|| format!("cannot read {}", path.display())),
    }
}
