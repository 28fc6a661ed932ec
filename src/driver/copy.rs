//! The host's side of copies: tar archives made and unpacked in-process,
//! under one policy for what a copy may create (docs/design.md, security
//! notes). A guest is hostile: an archive out of it never gives the host
//! another owner, a setuid, setgid or sticky bit, a device node or a FIFO,
//! and never writes outside the directory it is unpacked into, whatever
//! names and links it holds. An archive into a guest carries files owned by
//! root with their permission bits only, so the host user's ids and special
//! bits never reach the guest.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};
use tar::{EntryType, Header};

/// What a copy created, and the entries it left out (with why).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub entries: u64,
    pub bytes: u64,
    pub skipped: Vec<String>,
}

/// An archive that breaks the policy, or is no archive: the guest's doing,
/// where any other error of [`unpack`] is the host's.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refusing the archive: {}", self.0)
    }
}

impl std::error::Error for Refused {}

fn refuse<T>(why: impl std::fmt::Display) -> Result<T> {
    Err(Refused(why.to_string()).into())
}

/// Only the permission bits: never setuid, setgid or sticky.
const PERMISSIONS: u32 = 0o777;

/// Pure: what an entry type is, for the warning that skips it.
fn kind_name(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Char => "a character device",
        EntryType::Block => "a block device",
        EntryType::Fifo => "a FIFO",
        _ => "an entry of an unsupported type",
    }
}

/// Pure: the components of an archive name, which must stay below the
/// directory the archive is unpacked into and start with `top`.
fn safe_components(name: &Path, top: &OsStr) -> Result<Vec<PathBuf>, String> {
    let mut parts = Vec::new();
    for c in name.components() {
        match c {
            Component::Normal(part) => parts.push(PathBuf::from(part)),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                return Err(format!("{name:?} leaves the target directory"))
            }
        }
    }
    match parts.first() {
        Some(first) if first.as_os_str() == top => Ok(parts),
        _ => Err(format!("{name:?} is not inside {top:?}, the item copied")),
    }
}

/// Makes every directory above `path` (below `root`), refusing any that is
/// not a real directory: an archive may hold a link and then a file
/// "through" it, which must never be followed out of `root`.
fn make_parents(root: &Path, parts: &[PathBuf], created: &mut Vec<PathBuf>) -> Result<()> {
    let mut dir = root.to_path_buf();
    for part in &parts[..parts.len() - 1] {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return refuse(format!("{:?}: {part:?} is not a directory", parts.iter().collect::<PathBuf>())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&dir).with_context(|| format!("creating {dir:?}"))?;
                created.push(dir.clone());
            }
            Err(e) => return Err(e).with_context(|| format!("reading {dir:?}")),
        }
    }
    Ok(())
}

/// Copies an entry's data: a short read is the archive's fault, a failed
/// write the host's.
fn copy_data(from: &mut impl Read, to: &mut fs::File, path: &Path) -> Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return refuse(e),
        };
        to.write_all(&buf[..n]).with_context(|| format!("writing {path:?}"))?;
        total += n as u64;
    }
}

/// Removes what an earlier entry of the same name left, without following it.
fn clear(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .with_context(|| format!("replacing {path:?}"))
}

/// Unpacks the archive of one item named `top` (a file or a directory) so
/// that it is `<dir>/<top>`, replacing what was there. Everything is first
/// unpacked in a private directory beside it, so a refused or broken archive
/// leaves the target as it was. Files and directories belong to the user
/// running vmlab, with the archive's permission bits (directories also
/// always usable by that user, so the copy can be replaced or removed);
/// links are kept as links and never followed; device nodes and FIFOs are
/// left out, each named in [`Copied::skipped`].
pub fn unpack(archive: impl Read, dir: &Path, top: &OsStr) -> Result<Copied> {
    fs::create_dir_all(dir).with_context(|| format!("creating {dir:?}"))?;
    let staging = tempfile::Builder::new()
        .prefix(".vmlab-copy-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a directory in {dir:?}"))?;
    let root = staging.path();
    let mut copied = Copied::default();
    // Directories get their modes last: a read-only one must still take its entries.
    let mut modes: Vec<(PathBuf, u32)> = Vec::new();
    let mut implicit = Vec::new();
    let mut archive = tar::Archive::new(archive);
    let entries = match archive.entries() {
        Ok(entries) => entries,
        Err(e) => return refuse(e),
    };
    for entry in entries {
        let (mut entry, name, mode) = match entry.and_then(|e| Ok((e.path()?.into_owned(), e.header().mode()?, e))) {
            Ok((name, mode, entry)) => (entry, name, mode & PERMISSIONS),
            Err(e) => return refuse(e),
        };
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            continue;
        }
        let parts = safe_components(&name, top).or_else(refuse)?;
        make_parents(root, &parts, &mut implicit)?;
        let path: PathBuf = root.join(parts.iter().collect::<PathBuf>());
        match kind {
            EntryType::Directory => {
                if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                    clear(&path)?;
                    fs::create_dir(&path).with_context(|| format!("creating {path:?}"))?;
                }
                modes.push((path, mode | 0o700));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                clear(&path)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .with_context(|| format!("creating {path:?}"))?;
                copied.bytes += copy_data(&mut entry, &mut file, &path)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .with_context(|| format!("setting the mode of {path:?}"))?;
            }
            EntryType::Symlink => {
                let target = entry.link_name().or_else(refuse)?.unwrap_or_default().into_owned();
                clear(&path)?;
                std::os::unix::fs::symlink(&target, &path).with_context(|| format!("creating the link {path:?}"))?;
            }
            EntryType::Link => {
                let target = entry.link_name().or_else(refuse)?.unwrap_or_default().into_owned();
                let source = match safe_components(&target, top) {
                    Ok(parts) => root.join(parts.iter().collect::<PathBuf>()),
                    Err(why) => return refuse(format!("hard link {name:?}: {why}")),
                };
                // A hard link may only repeat a regular file this archive made.
                if !fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                    copied
                        .skipped
                        .push(format!("{name:?} (a hard link to {target:?}, which is not a file copied before it)"));
                    continue;
                }
                clear(&path)?;
                fs::hard_link(&source, &path).with_context(|| format!("linking {path:?}"))?;
            }
            other => {
                copied.skipped.push(format!("{name:?} ({})", kind_name(other)));
                continue;
            }
        }
        copied.entries += 1;
    }
    for (dir, mode) in modes.iter().rev() {
        fs::set_permissions(dir, fs::Permissions::from_mode(*mode))
            .with_context(|| format!("setting the mode of {dir:?}"))?;
    }
    let unpacked = root.join(top);
    if fs::symlink_metadata(&unpacked).is_err() {
        return refuse(format!("it holds no {top:?}"));
    }
    let target = dir.join(top);
    clear(&target)?;
    fs::rename(&unpacked, &target).with_context(|| format!("moving the copy to {target:?}"))?;
    Ok(copied)
}

/// Writes an archive of `source` (a file, a directory or a link, not
/// followed) named by its last component: root's, with permission bits only.
/// Device nodes, FIFOs and sockets are left out, each named in the result.
pub fn pack(source: &Path, out: impl Write) -> Result<Copied> {
    let name = source.file_name().with_context(|| format!("cannot copy {source:?}: it has no name"))?;
    let mut builder = tar::Builder::new(out);
    let mut copied = Copied::default();
    add(&mut builder, source, Path::new(name), &mut copied)?;
    builder.into_inner().context("writing the archive")?.flush().context("writing the archive")?;
    Ok(copied)
}

fn add<W: Write>(builder: &mut tar::Builder<W>, path: &Path, name: &Path, copied: &mut Copied) -> Result<()> {
    let meta = fs::symlink_metadata(path).with_context(|| format!("reading {path:?}"))?;
    let mut header = Header::new_gnu();
    header.set_uid(0);
    header.set_gid(0);
    header.set_mode(meta.permissions().mode() & PERMISSIONS);
    header.set_mtime(std::os::unix::fs::MetadataExt::mtime(&meta).max(0) as u64);
    header.set_size(0);
    let kind = meta.file_type();
    if kind.is_dir() {
        header.set_entry_type(EntryType::Directory);
        builder.append_data(&mut header, name, io::empty()).context("writing the archive")?;
        let mut children: Vec<_> = fs::read_dir(path)
            .with_context(|| format!("reading {path:?}"))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .with_context(|| format!("reading {path:?}"))?;
        children.sort();
        for child in children {
            add(builder, &path.join(&child), &name.join(&child), copied)?;
        }
    } else if kind.is_file() {
        header.set_entry_type(EntryType::Regular);
        header.set_size(meta.len());
        let file = fs::File::open(path).with_context(|| format!("opening {path:?}"))?;
        // The size is the header's: a file that changes meanwhile is cut or fails, never misframed.
        builder.append_data(&mut header, name, file.take(meta.len())).with_context(|| format!("reading {path:?}"))?;
        copied.bytes += meta.len();
    } else if kind.is_symlink() {
        header.set_entry_type(EntryType::Symlink);
        let target = fs::read_link(path).with_context(|| format!("reading the link {path:?}"))?;
        builder.append_link(&mut header, name, target).context("writing the archive")?;
    } else {
        copied.skipped.push(format!("{name:?} (not a file, directory or link)"));
        return Ok(());
    }
    copied.entries += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A raw entry, with any name: the tar crate's own builder refuses the
    /// names a hostile guest would send.
    fn raw(out: &mut Vec<u8>, name: &str, kind: EntryType, mode: u32, data: &[u8], link: &str) {
        let mut h = Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1234);
        h.set_gid(1234);
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    fn finish(mut out: Vec<u8>) -> Vec<u8> {
        out.extend([0u8; 1024]);
        out
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn owners_special_bits_and_devices_never_reach_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Vec::new();
        raw(&mut a, "tools/", EntryType::Directory, 0o1777, b"", "");
        raw(&mut a, "tools/euid", EntryType::Regular, 0o6755, b"#!/bin/sh\nid -u\n", "");
        raw(&mut a, "tools/disk", EntryType::Block, 0o666, b"", "");
        raw(&mut a, "tools/tty", EntryType::Char, 0o666, b"", "");
        raw(&mut a, "tools/pipe", EntryType::Fifo, 0o666, b"", "");
        raw(&mut a, "tools/passwd", EntryType::Symlink, 0o777, b"", "/etc/passwd");
        raw(&mut a, "tools/again", EntryType::Link, 0o644, b"", "tools/euid");
        raw(&mut a, "tools/ro/", EntryType::Directory, 0o555, b"", "");
        raw(&mut a, "tools/ro/f", EntryType::Regular, 0o400, b"x", "");
        let copied = unpack(&finish(a)[..], dir.path(), OsStr::new("tools")).unwrap();
        let t = dir.path().join("tools");
        assert_eq!(fs::read(t.join("euid")).unwrap(), b"#!/bin/sh\nid -u\n");
        assert_eq!(mode(&t.join("euid")), 0o755);
        assert_eq!(mode(&t), 0o777, "no sticky bit");
        assert_eq!(mode(&t.join("ro")), 0o755, "a directory stays usable by its owner");
        assert_eq!(mode(&t.join("ro/f")), 0o400);
        let me = unsafe { libc::geteuid() };
        for p in ["euid", "ro", "ro/f", "again"] {
            assert_eq!(fs::symlink_metadata(t.join(p)).unwrap().uid(), me, "{p}");
        }
        assert_eq!(fs::read_link(t.join("passwd")).unwrap(), Path::new("/etc/passwd"));
        assert_eq!(fs::read(t.join("again")).unwrap(), b"#!/bin/sh\nid -u\n");
        for gone in ["disk", "tty", "pipe"] {
            assert!(fs::symlink_metadata(t.join(gone)).is_err(), "{gone}");
        }
        assert_eq!(
            copied.skipped,
            ["\"tools/disk\" (a block device)", "\"tools/tty\" (a character device)", "\"tools/pipe\" (a FIFO)"]
        );
        // Nothing but the copy is left in the target directory.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["tools"]);
    }

    #[test]
    fn names_and_links_never_lead_out_of_the_target() {
        // (entries as (name, type, link), what the refusal says)
        type Entries<'a> = &'a [(&'a str, EntryType, &'a str)];
        let cases: [(Entries, &str); 6] = [
            (&[("tools/../../evil", EntryType::Regular, "")], "leaves the target directory"),
            (&[("/tmp/evil", EntryType::Regular, "")], "leaves the target directory"),
            (&[("other/evil", EntryType::Regular, "")], "is not inside \"tools\""),
            (
                &[("tools/up", EntryType::Symlink, ".."), ("tools/up/evil", EntryType::Regular, "")],
                "\"up\" is not a directory",
            ),
            (
                &[("tools/etc", EntryType::Symlink, "/etc"), ("tools/etc/evil", EntryType::Regular, "")],
                "\"etc\" is not a directory",
            ),
            (&[("tools/h", EntryType::Link, "/etc/passwd")], "hard link \"tools/h\""),
        ];
        for (entries, why) in cases {
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("out");
            fs::create_dir(&target).unwrap();
            // What was there before stays when an archive is refused.
            fs::write(target.join("tools"), b"before").unwrap();
            let mut a = Vec::new();
            for (name, kind, link) in entries {
                raw(&mut a, name, *kind, 0o644, if *kind == EntryType::Regular { b"evil" } else { b"" }, link);
            }
            let e = unpack(&finish(a)[..], &target, OsStr::new("tools")).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{entries:?}: {e:#}");
            assert!(e.is::<Refused>(), "the guest's doing: {e:#}");
            assert_eq!(fs::read(target.join("tools")).unwrap(), b"before");
            let mut everything: Vec<_> = walk(dir.path());
            everything.sort();
            assert_eq!(everything, [target.clone(), target.join("tools")], "{entries:?}");
        }
    }

    #[test]
    fn what_is_no_archive_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut short = Vec::new();
        raw(&mut short, "tools", EntryType::Regular, 0o644, b"", "");
        short[124..135].copy_from_slice(b"00000001000");
        for data in [b"not a tar archive".repeat(100), short, Vec::new()] {
            let e = unpack(&data[..], dir.path(), OsStr::new("tools")).unwrap_err();
            assert!(e.is::<Refused>(), "{e:#}");
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left");
    }

    fn walk(p: &Path) -> Vec<PathBuf> {
        let mut all = Vec::new();
        for e in fs::read_dir(p).unwrap() {
            let path = e.unwrap().path();
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                all.extend(walk(&path));
            }
            all.push(path);
        }
        all
    }

    #[test]
    fn pack_and_unpack_keep_contents_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src/tree");
        fs::create_dir_all(src.join("sub")).unwrap();
        let long = "n".repeat(150);
        fs::write(src.join("sub").join(&long), b"long name").unwrap();
        fs::write(src.join("run"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("run"), fs::Permissions::from_mode(0o4750)).unwrap();
        std::os::unix::fs::symlink("sub", src.join("link")).unwrap();
        std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
        let mut archive = Vec::new();
        let packed = pack(&src, &mut archive).unwrap();
        assert_eq!(packed.skipped, ["\"tree/sock\" (not a file, directory or link)"]);
        assert_eq!((packed.entries, packed.bytes), (5, 19));
        // Every entry is root's, with permission bits only.
        for e in tar::Archive::new(&archive[..]).entries().unwrap() {
            let h = e.unwrap().header().clone();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
            assert_eq!(h.mode().unwrap() & !0o777, 0);
        }
        let out = dir.path().join("out");
        let copied = unpack(&archive[..], &out, OsStr::new("tree")).unwrap();
        assert!(copied.skipped.is_empty());
        let t = out.join("tree");
        assert_eq!(fs::read(t.join("sub").join(&long)).unwrap(), b"long name");
        assert_eq!(mode(&t.join("run")), 0o750);
        assert_eq!(fs::read_link(t.join("link")).unwrap(), Path::new("sub"));
        // Copying again replaces the earlier copy.
        fs::remove_file(src.join("run")).unwrap();
        let mut archive = Vec::new();
        pack(&src, &mut archive).unwrap();
        unpack(&archive[..], &out, OsStr::new("tree")).unwrap();
        assert!(!t.join("run").exists());
    }
}
