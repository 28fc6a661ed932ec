//! A reproducible newc ("070701") cpio archive: the format the Linux kernel
//! unpacks as an initramfs. Pure: the archive is a sorted map built in memory
//! and serialised to bytes; every header field that could vary between builds
//! (inode, mtime, owner) is fixed.

use std::collections::BTreeMap;

use anyhow::bail;

pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFCHR: u32 = 0o020_000;

/// One archive member; permission bits only (the file type comes from the variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { perm: u32 },
    File { perm: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { perm: u32, major: u32, minor: u32 },
}

impl Entry {
    pub fn file(perm: u32, data: impl Into<Vec<u8>>) -> Entry {
        Entry::File { perm, data: data.into() }
    }

    pub fn symlink(target: impl Into<String>) -> Entry {
        Entry::Symlink { target: target.into() }
    }
}

/// Members by path relative to the archive root ("bin/sh"). Sorting by bytes
/// puts every directory before its contents, which the kernel needs: it does
/// not create missing parents.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    /// Adds or replaces a member at `path` (absolute or relative; `.` and empty
    /// components are dropped), creating missing parent directories (0755).
    /// Replacing lets later additions override earlier ones; replacing a
    /// non-empty directory by a non-directory, or going through a
    /// non-directory, is an error.
    pub fn insert(&mut self, path: &str, entry: Entry) -> anyhow::Result<()> {
        let path = normalize(path)?;
        let mut parent = String::new();
        for component in path.split('/').take(path.split('/').count() - 1) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), Entry::Dir { perm: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                Some(_) => bail!("/{path}: /{parent} is not a directory"),
            }
        }
        if !matches!(entry, Entry::Dir { .. }) && self.has_children(&path) {
            bail!("/{path}: a non-empty directory cannot be replaced by a file");
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path.trim_start_matches('/'))
    }

    fn has_children(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.entries.range(prefix.clone()..).next().is_some_and(|(p, _)| p.starts_with(&prefix))
    }

    /// The archive bytes: members in path order, inode numbers 1.. in that
    /// order, owner root, mtime 0, then the trailer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in (1..).zip(&self.entries) {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir { perm } => (S_IFDIR | perm, 2, &[], (0, 0)),
                Entry::File { perm, data } => (S_IFREG | perm, 1, data, (0, 0)),
                Entry::Symlink { target } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
                Entry::CharDev { perm, major, minor } => (S_IFCHR | perm, 1, &[], (*major, *minor)),
            };
            write_member(&mut out, ino, mode, nlink, rdev, path, data);
        }
        write_member(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }
}

/// `path` without leading slashes, `.` or empty components; `..` and the root
/// itself are errors.
fn normalize(path: &str) -> anyhow::Result<String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => bail!("{path}: `..` is not allowed in archive paths"),
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        bail!("{path:?}: not a path below the archive root");
    }
    Ok(parts.join("/"))
}

fn write_member(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, rdev: (u32, u32), name: &str, data: &[u8]) {
    let name_size = name.len() + 1;
    let fields: [usize; 13] = [
        ino as usize,
        mode as usize,
        0, // uid
        0, // gid
        nlink as usize,
        0, // mtime
        data.len(),
        0, // devmajor
        0, // devminor
        rdev.0 as usize,
        rdev.1 as usize,
        name_size,
        0, // check (only used by the crc format)
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Member {
        name: String,
        mode: u32,
        nlink: u32,
        ino: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// Parses newc bytes back into members, checking the fixed fields and the
    /// alignment rules on the way.
    fn parse(mut bytes: &[u8]) -> Vec<Member> {
        let total = bytes.len();
        let mut members = Vec::new();
        loop {
            assert_eq!((total - bytes.len()) % 4, 0, "member not 4-aligned");
            assert_eq!(&bytes[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
            };
            let (uid, gid, mtime, devmajor, devminor, check) =
                (field(2), field(3), field(5), field(7), field(8), field(12));
            assert_eq!((uid, gid, mtime, devmajor, devminor, check), (0, 0, 0, 0, 0, 0));
            let (size, namesize) = (field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&bytes[110..110 + namesize - 1]).unwrap().to_string();
            assert_eq!(bytes[110 + namesize - 1], 0, "name not NUL-terminated");
            let data_start = (110 + namesize).next_multiple_of(4);
            let next = (data_start + size).next_multiple_of(4);
            assert!(bytes[110 + namesize..data_start].iter().all(|&b| b == 0), "name padding not zero");
            assert!(bytes[data_start + size..next].iter().all(|&b| b == 0), "data padding not zero");
            let member = Member {
                name,
                mode: field(1),
                nlink: field(4),
                ino: field(0),
                rdev: (field(9), field(10)),
                data: bytes[data_start..data_start + size].to_vec(),
            };
            bytes = &bytes[next..];
            if member.name == "TRAILER!!!" {
                assert!(bytes.is_empty(), "bytes after the trailer");
                assert_eq!((member.ino, member.mode, member.nlink, size), (0, 0, 1, 0));
                return members;
            }
            members.push(member);
        }
    }

    fn sample_members() -> Vec<(&'static str, Entry)> {
        vec![
            ("/bin/busybox", Entry::file(0o755, b"ELF...")),
            ("bin/sh", Entry::symlink("busybox")),
            ("/dev/console", Entry::CharDev { perm: 0o600, major: 5, minor: 1 }),
            ("/tmp", Entry::Dir { perm: 0o1777 }),
            ("/etc//x/./y", Entry::file(0o644, b"1234")),
        ]
    }

    fn archive(members: impl IntoIterator<Item = (&'static str, Entry)>) -> Archive {
        let mut a = Archive::default();
        for (path, entry) in members {
            a.insert(path, entry).unwrap();
        }
        a
    }

    fn sample() -> Archive {
        archive(sample_members())
    }

    #[test]
    fn members_are_sorted_with_parents_first_and_fixed_headers() {
        let members = parse(&sample().to_bytes());
        let table: Vec<(&str, u32, u32, u32)> =
            members.iter().map(|m| (m.name.as_str(), m.mode, m.nlink, m.ino)).collect();
        assert_eq!(
            table,
            [
                ("bin", 0o040755, 2, 1),
                ("bin/busybox", 0o100755, 1, 2),
                ("bin/sh", 0o120777, 1, 3),
                ("dev", 0o040755, 2, 4),
                ("dev/console", 0o020600, 1, 5),
                ("etc", 0o040755, 2, 6),
                ("etc/x", 0o040755, 2, 7),
                ("etc/x/y", 0o100644, 1, 8),
                ("tmp", 0o041777, 2, 9),
            ]
        );
        assert_eq!(members[4].rdev, (5, 1));
        assert_eq!(members[2].data, b"busybox", "symlink data is its target");
        assert_eq!(members[7].data, b"1234");
    }

    #[test]
    fn padding_for_every_name_and_data_length_mod_4() {
        // Name lengths 1..=4 and data lengths 0..=4 cover every remainder.
        let mut a = Archive::default();
        for name_len in 1..=4 {
            for data_len in 0..=4 {
                let name = format!("{}{}", "n".repeat(name_len), data_len);
                a.insert(&name, Entry::file(0o644, vec![b'x'; data_len])).unwrap();
            }
        }
        let members = parse(&a.to_bytes());
        assert_eq!(members.len(), 20);
        for m in members {
            let expected_len = m.name.as_bytes().last().unwrap() - b'0';
            assert_eq!(m.data, vec![b'x'; expected_len as usize], "{}", m.name);
        }
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let bytes = Archive::default().to_bytes();
        assert_eq!(bytes.len(), (110 + 11usize).next_multiple_of(4));
        assert!(parse(&bytes).is_empty());
    }

    #[test]
    fn same_members_in_any_insertion_order_give_the_same_bytes() {
        let reversed = archive(sample_members().into_iter().rev());
        assert_eq!(reversed.to_bytes(), sample().to_bytes());
    }

    #[test]
    fn later_insertions_replace_and_conflicts_are_errors() {
        let mut a = sample();
        a.insert("/bin/sh", Entry::file(0o755, b"#!")).unwrap();
        assert_eq!(a.get("/bin/sh"), Some(&Entry::file(0o755, b"#!")));
        a.insert("/etc/x", Entry::Dir { perm: 0o700 }).unwrap();
        assert_eq!(a.get("etc/x"), Some(&Entry::Dir { perm: 0o700 }));

        let errors = [
            ("/bin/sh/x", "/bin/sh/x: /bin/sh is not a directory"),
            ("/etc/x", "/etc/x: a non-empty directory cannot be replaced by a file"),
            ("/a/../b", "/a/../b: `..` is not allowed in archive paths"),
            ("/", "\"/\": not a path below the archive root"),
        ];
        for (path, message) in errors {
            let err = a.insert(path, Entry::file(0o644, vec![])).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
    }
}
