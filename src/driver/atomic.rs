//! Report files written whole or not at all: into a temporary file beside
//! the report, synced (a full disk may say so only then), then renamed over
//! it. A report that cannot be written is an error naming it, and leaves no
//! file of its name: neither half of it nor an earlier run's.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path`.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |f| f.write_all(bytes)).with_context(|| format!("cannot write {}", path.display()))
}

/// Copies the file `from` to `to`.
pub fn copy(from: &Path, to: &Path) -> Result<()> {
    write_with(to, |f| io::copy(&mut File::open(from)?, f).map(drop))
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

/// `fill` writes the temporary file that becomes `path`.
fn write_with(path: &Path, fill: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<()> {
    // Hidden, and this process's own: another run's temporary file is not touched.
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = File::create(&temp)?;
        fill(&mut file)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
        let _ = std::fs::remove_file(path);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_report_replaces_the_earlier_one_whole_with_the_usual_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (report, plain) = (dir.path().join("junit.xml"), dir.path().join("plain"));
        std::fs::write(&report, "an earlier run's report, longer than this one's\n").unwrap();
        std::fs::write(&plain, "").unwrap();
        write(&report, b"<testsuites/>\n").unwrap();
        assert_eq!(std::fs::read_to_string(&report).unwrap(), "<testsuites/>\n");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&report), mode(&plain));
        copy(&report, &dir.path().join("copy.xml")).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("copy.xml")).unwrap(), "<testsuites/>\n");
        assert_eq!(names(dir.path()), ["copy.xml", "junit.xml", "plain"]);
    }

    /// A full disk (/dev/full's error), a missing directory, a missing source:
    /// an error naming the file and why, and no file of the report's name.
    #[test]
    fn a_report_that_cannot_be_written_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("junit.xml");
        let full = |_: &mut File| std::fs::OpenOptions::new().write(true).open("/dev/full")?.write_all(b"x");
        let missing = dir.path().join("missing");
        // What is left: the earlier report where the new one was to go elsewhere.
        type Attempt<'a> = Box<dyn Fn() -> String + 'a>;
        let cases: [(&str, Attempt, String, &[&str]); 3] = [
            (
                "full disk",
                Box::new(|| write_with(&report, full).unwrap_err().to_string()),
                "No space left on device (os error 28)".to_string(),
                &[],
            ),
            (
                "no directory",
                Box::new(|| format!("{:#}", write(&missing.join("junit.xml"), b"x").unwrap_err())),
                format!("cannot write {}: No such file or directory (os error 2)", missing.join("junit.xml").display()),
                &["junit.xml"],
            ),
            (
                "no source",
                Box::new(|| format!("{:#}", copy(&missing, &report).unwrap_err())),
                format!(
                    "cannot copy {} to {}: No such file or directory (os error 2)",
                    missing.display(),
                    report.display()
                ),
                &[],
            ),
        ];
        for (case, attempt, error, left) in cases {
            std::fs::write(&report, "an earlier run's report\n").unwrap();
            assert_eq!(attempt(), error, "{case}");
            assert_eq!(names(dir.path()), left, "{case}");
        }
    }
}
