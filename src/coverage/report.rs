//! The report: the `.gcda` files collected become one lcov tracefile per
//! machine, a merged tracefile and HTML (lcov and genhtml), and the counts
//! said at the end of a test.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::{DATA_DIR, GUEST_DIR};
use crate::driver::atomic;
use crate::runtime::process::ChildGuard;

/// Lines and functions found and covered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub lines_found: u64,
    pub lines_hit: u64,
    pub functions_found: u64,
    pub functions_hit: u64,
}

impl Counts {
    /// Totals of lcov tracefiles taken together (pure: the files' texts in).
    /// A line is keyed by its source file and number, a function by its
    /// source file and name, and either is covered when any record of any
    /// tracefile ran it: a line two machines ran is one line covered, as in
    /// genhtml's report of the merged tracefile. Counted from the DA, FN and FNDA
    /// records, not from the LF/LH/FNF/FNH summaries: `lcov --capture` writes
    /// none, and a merged tracefile has one per machine (test name) and file.
    pub fn of_tracefiles<'a>(texts: impl IntoIterator<Item = &'a str>) -> Counts {
        let mut lines: BTreeMap<(&str, u64), bool> = BTreeMap::new();
        let mut functions: BTreeMap<(&str, &str), bool> = BTreeMap::new();
        let ran = |count: &str| count.parse::<i64>().is_ok_and(|n| n > 0);
        for text in texts {
            let mut file = None;
            for line in text.lines() {
                let Some((key, value)) = line.split_once(':') else { continue };
                match (key, file) {
                    ("SF", _) => file = Some(value),
                    // DA:<line>,<count>[,<checksum>]
                    ("DA", Some(file)) => {
                        let mut fields = value.split(',');
                        if let (Some(Ok(number)), Some(count)) = (fields.next().map(str::parse), fields.next()) {
                            *lines.entry((file, number)).or_default() |= ran(count);
                        }
                    }
                    // FN:<start>,<name> (lcov 1), FN:<start>,<end>,<name> (lcov 2);
                    // no function name starts with a digit.
                    ("FN", Some(file)) => {
                        if let Some((_, rest)) = value.split_once(',') {
                            let name = match rest.split_once(',') {
                                Some((end, name)) if !end.is_empty() && end.bytes().all(|b| b.is_ascii_digit()) => name,
                                _ => rest,
                            };
                            functions.entry((file, name)).or_default();
                        }
                    }
                    // FNDA:<count>,<name>
                    ("FNDA", Some(file)) => {
                        if let Some((count, name)) = value.split_once(',') {
                            *functions.entry((file, name)).or_default() |= ran(count);
                        }
                    }
                    // FNA:<index>,<count>,<name> (lcov 2.2 and later, next to
                    // FNL:<index>,<start>[,<end>], which names no function).
                    ("FNA", Some(file)) => {
                        if let Some((count, name)) = value.split_once(',').and_then(|(_, rest)| rest.split_once(',')) {
                            *functions.entry((file, name)).or_default() |= ran(count);
                        }
                    }
                    _ => {}
                }
            }
        }
        fn found_and_hit<K>(covered: BTreeMap<K, bool>) -> (u64, u64) {
            (covered.len() as u64, covered.values().filter(|c| **c).count() as u64)
        }
        let (lines_found, lines_hit) = found_and_hit(lines);
        let (functions_found, functions_hit) = found_and_hit(functions);
        Counts { lines_found, lines_hit, functions_found, functions_hit }
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |hit: u64, found: u64| if found == 0 { 0.0 } else { 100.0 * hit as f64 / found as f64 };
        write!(
            f,
            "lines {:.1}% ({}/{}), functions {:.1}% ({}/{})",
            pct(self.lines_hit, self.lines_found),
            self.lines_hit,
            self.lines_found,
            pct(self.functions_hit, self.functions_found),
            self.functions_hit,
            self.functions_found
        )
    }
}

/// What a coverage run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// No machine wrote any `.gcda` file.
    NoData,
    Written {
        combined: Counts,
        machines: BTreeMap<String, Counts>,
    },
}

impl Report {
    /// The one-line summary printed at the end of a test and written to its log.
    pub fn summary(&self) -> String {
        match self {
            Report::NoData => format!(
                "warning: coverage: no .gcda files on any machine (were the programs built with --coverage, \
                 and did they exit normally? data is written under {GUEST_DIR})"
            ),
            Report::Written { combined, machines } => {
                let per: Vec<String> = machines.iter().map(|(m, c)| format!("{m}: {c}")).collect();
                format!("coverage: {combined}; {}", per.join("; "))
            }
        }
    }
}

/// For a `.gcda` file's path relative to a machine's data directory, the
/// `.gcno` (relative to its build directory) sharing the longest path suffix
/// without the extension. Pure: the candidates are given.
pub fn match_gcno<'a>(gcda: &Path, gcnos: &'a [(usize, PathBuf)]) -> Option<&'a (usize, PathBuf)> {
    let stem = |p: &Path| -> Vec<String> {
        let mut parts: Vec<String> = p.with_extension("").iter().map(|c| c.to_string_lossy().into_owned()).collect();
        parts.reverse();
        parts
    };
    let want = stem(gcda);
    gcnos
        .iter()
        .map(|candidate| {
            let have = stem(&candidate.1);
            let common = want.iter().zip(&have).take_while(|(a, b)| a == b).count();
            (common, candidate)
        })
        .filter(|(common, candidate)| *common > 0 && *common == stem(&candidate.1).len())
        .max_by_key(|(common, _)| *common)
        .map(|(_, candidate)| candidate)
}

/// Rewrites `SF:` lines whose source no longer exists at its compile-time
/// path to the file of the build directories sharing the longest path suffix.
/// Pure: `exists` and the candidate sources are given.
pub fn relocate_sources(tracefile: &str, exists: impl Fn(&Path) -> bool, sources: &[PathBuf]) -> String {
    let mut out = String::with_capacity(tracefile.len());
    for line in tracefile.lines() {
        match line.strip_prefix("SF:") {
            Some(path) if !exists(Path::new(path)) => {
                let want: Vec<_> = Path::new(path).iter().rev().collect();
                let best = sources
                    .iter()
                    .map(|s| (s.iter().rev().zip(&want).take_while(|(a, b)| a == *b).count(), s))
                    .filter(|(n, _)| *n > 0)
                    .max_by_key(|(n, _)| *n);
                match best {
                    Some((_, s)) => out += &format!("SF:{}", s.display()),
                    None => out += line,
                }
            }
            _ => out += line,
        }
        out.push('\n');
    }
    out
}

fn files_with_extension(root: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let path = entry.with_context(|| format!("cannot read {}", dir.display()))?.path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == ext) {
                found.push(path.strip_prefix(root).expect("found below root").to_path_buf());
            }
        }
    }
    found.sort();
    Ok(found)
}

fn tool(name: &str) -> Result<PathBuf> {
    which::which(name).map_err(|_| anyhow::anyhow!("{name} not found on PATH: install the Debian package lcov"))
}

fn run_tool(cmd: Command) -> Result<()> {
    let program = cmd.get_program().to_owned();
    let out = ChildGuard::output(cmd, format!("{program:?}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // lcov's Perl prints redefinition noise first; the real error is last.
        let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("no output");
        bail!("{program:?} failed ({}): {last}", out.status);
    }
    Ok(())
}

/// Builds the per-machine tracefiles, `<out>/coverage.info` and
/// `<out>/coverage/index.html` from `<out>/coverage-data/<machine>/`.
pub fn report(out: &Path, build_dirs: &[PathBuf]) -> Result<Report> {
    let data = out.join(DATA_DIR);
    let mut gcnos: Vec<(usize, PathBuf)> = Vec::new();
    let mut sources: Vec<PathBuf> = Vec::new();
    check_build_dirs(build_dirs)?;
    for (i, dir) in build_dirs.iter().enumerate() {
        gcnos.extend(files_with_extension(dir, "gcno")?.into_iter().map(|p| (i, p)));
        for ext in ["c", "h", "cc", "cpp", "cxx", "hpp", "rs"] {
            sources.extend(files_with_extension(dir, ext)?.into_iter().map(|p| dir.join(p)));
        }
    }
    let mut machines: Vec<String> = Vec::new();
    if data.is_dir() {
        for entry in fs::read_dir(&data).with_context(|| format!("cannot read {}", data.display()))? {
            let path = entry?.path();
            if path.is_dir() && !files_with_extension(&path, "gcda")?.is_empty() {
                machines.push(path.file_name().expect("a directory entry has a name").to_string_lossy().into_owned());
            }
        }
    }
    machines.sort();
    if machines.is_empty() {
        return Ok(Report::NoData);
    }
    let (lcov, genhtml) = (tool("lcov")?, tool("genhtml")?);

    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let mut counts = BTreeMap::new();
    let mut tracefiles = Vec::new();
    let mut texts = Vec::new();
    for machine in &machines {
        let dir = scratch.path().join(machine);
        for (i, build) in build_dirs.iter().enumerate() {
            for (_, gcno) in gcnos.iter().filter(|(j, _)| *j == i) {
                let dest = dir.join(i.to_string()).join(gcno);
                fs::create_dir_all(dest.parent().expect("has a parent"))?;
                fs::copy(build.join(gcno), &dest)
                    .with_context(|| format!("cannot copy {}", build.join(gcno).display()))?;
            }
        }
        let machine_data = data.join(machine);
        for gcda in files_with_extension(&machine_data, "gcda")? {
            match match_gcno(&gcda, &gcnos) {
                Some((i, gcno)) => {
                    let dest = dir.join(i.to_string()).join(gcno.with_extension("gcda"));
                    fs::copy(machine_data.join(&gcda), &dest)
                        .with_context(|| format!("cannot copy {}", machine_data.join(&gcda).display()))?;
                }
                None => eprintln!(
                    "warning: coverage: {machine}: no .gcno file for /{} in the build directories",
                    gcda.display()
                ),
            }
        }
        let raw = scratch.path().join(format!("{machine}.raw.info"));
        let mut capture = Command::new(&lcov);
        capture
            .args(["--quiet", "--capture", "--test-name"])
            .arg(machine.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
            .arg("--directory")
            .arg(&dir)
            .arg("--output-file")
            .arg(&raw);
        run_tool(capture)?;
        let text = fs::read_to_string(&raw).with_context(|| format!("cannot read {}", raw.display()))?;
        let text = relocate_sources(&text, Path::exists, &sources);
        let tracefile = data.join(format!("{machine}.info"));
        atomic::write(&tracefile, text.as_bytes())?;
        counts.insert(machine.clone(), Counts::of_tracefiles([text.as_str()]));
        texts.push(text);
        tracefiles.push(tracefile);
    }

    let combined_path = out.join("coverage.info");
    let mut merge = Command::new(&lcov);
    merge.arg("--quiet");
    for t in &tracefiles {
        merge.arg("--add-tracefile").arg(t);
    }
    // lcov writes as it goes: the report is put in place whole.
    let merged = scratch.path().join("coverage.info");
    merge.arg("--output-file").arg(&merged);
    run_tool(merge)?;
    atomic::copy(&merged, &combined_path)?;
    let html = out.join("coverage");
    let mut render = Command::new(&genhtml);
    render.args(["--quiet", "--output-directory"]).arg(&html).arg(&combined_path);
    run_tool(render)?;
    let combined = Counts::of_tracefiles(texts.iter().map(String::as_str));
    Ok(Report::Written { combined, machines: counts })
}

/// Fails, naming the package, when the report could not be made: checked
/// before a test boots anything, not after.
pub fn check_report_tools(build_dirs: &[PathBuf]) -> Result<()> {
    check_build_dirs(build_dirs)?;
    tool("lcov").and(tool("genhtml")).map(drop)
}

fn check_build_dirs(build_dirs: &[PathBuf]) -> Result<()> {
    match build_dirs.iter().find(|dir| !dir.is_dir()) {
        Some(dir) => bail!("coverage build directory {} is not a directory", dir.display()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The expected figures are counted by hand from these records; `lcov -a`
    // of the same files then `lcov --summary` (lcov 1.16, given b with lcov
    // 1's FN records) gives the same.

    /// Machine a as `lcov --capture` writes it: no LF/LH/FNF/FNH summaries.
    /// main.c: 6 lines, 4 run (1, 2, 5, 6); main and serve run.
    /// util.h: 2 lines, none run; log not run. Its line 2 is not main.c's.
    const A: &str = "TN:a\nSF:/p/main.c\nFN:1,main\nFN:5,serve\nFN:9,connect\nFNDA:1,main\nFNDA:1,serve\n\
                     FNDA:0,connect\nDA:1,1\nDA:2,1\nDA:5,1\nDA:6,3\nDA:9,0\nDA:10,0\nend_of_record\n\
                     SF:/p/util.h\nFN:2,log\nFNDA:0,log\nDA:2,0\nDA:3,0\nend_of_record\n";
    /// Machine b in lcov 2's style (function end lines, line checksums) with
    /// summaries: main.c's lines 1, 2, 9, 10 run; main and connect run.
    const B: &str = "TN:b\nSF:/p/main.c\nFN:1,3,main\nFN:5,7,serve\nFN:9,11,connect\nFNDA:1,main\nFNDA:0,serve\n\
                     FNDA:2,connect\nFNF:3\nFNH:2\nDA:1,1,x1\nDA:2,1,x2\nDA:5,0,x5\nDA:6,0,x6\nDA:9,2,x9\nDA:10,2,x10\n\
                     LF:6\nLH:4\nend_of_record\n";
    /// Machine b in lcov 2.2's style: functions as FNL/FNA records.
    const B22: &str = "TN:b\nSF:/p/main.c\nFNL:0,1,3\nFNA:0,1,main\nFNL:1,5,7\nFNA:1,0,serve\nFNL:2,9,11\n\
                       FNA:2,2,connect\nFNF:3\nFNH:2\nDA:1,1\nDA:2,1\nDA:5,0\nDA:6,0\nDA:9,2\nDA:10,2\nLF:6\nLH:4\n\
                       end_of_record\n";
    /// Machine c: a file no other machine has; `unused` has no FNDA record.
    const C: &str = "TN:c\nSF:/p/other.c\nFN:1,other\nFN:4,unused\nFNDA:1,other\nDA:1,1\nDA:2,0\nLF:2\nLH:1\n\
                     end_of_record\n";

    #[test]
    fn counts_take_a_line_or_function_once_however_many_records_ran_it() {
        let counts = |lines_hit, lines_found, functions_hit, functions_found| Counts {
            lines_found,
            lines_hit,
            functions_found,
            functions_hit,
        };
        let ab = format!("{A}{B}");
        for (name, tracefiles, want) in [
            ("nothing", vec![], counts(0, 0, 0, 0)),
            ("a, without summaries", vec![A], counts(4, 8, 2, 4)),
            ("b, with summaries", vec![B], counts(4, 6, 2, 3)),
            ("b as lcov 2.2 writes it", vec![B22], counts(4, 6, 2, 3)),
            ("a and b as lcov 2.2 writes it", vec![A, B22], counts(6, 8, 3, 4)),
            ("c, a function with no FNDA", vec![C], counts(1, 2, 1, 2)),
            ("a twice: the same lines, not twice as many", vec![A, A], counts(4, 8, 2, 4)),
            ("a and b overlap: all of main.c ran", vec![A, B], counts(6, 8, 3, 4)),
            ("a and b in one tracefile, main.c in two TN records", vec![&ab], counts(6, 8, 3, 4)),
            ("a and c are disjoint", vec![A, C], counts(5, 10, 3, 6)),
            ("a, b and c", vec![A, B, C], counts(7, 10, 4, 6)),
        ] {
            assert_eq!(Counts::of_tracefiles(tracefiles), want, "{name}");
        }
    }

    #[test]
    fn counts_as_text() {
        let c = Counts { lines_found: 14, lines_hit: 8, functions_found: 4, functions_hit: 2 };
        assert_eq!(c.to_string(), "lines 57.1% (8/14), functions 50.0% (2/4)");
        assert_eq!(Counts::default().to_string(), "lines 0.0% (0/0), functions 0.0% (0/0)");
    }

    #[test]
    fn gcda_matches_the_gcno_with_the_longest_suffix() {
        let gcnos: Vec<(usize, PathBuf)> =
            [(0, "prog.gcno"), (0, "lib/util.gcno"), (1, "src/lib/util.gcno"), (1, "other/prog.gcno")]
                .iter()
                .map(|(i, p)| (*i, PathBuf::from(p)))
                .collect();
        for (gcda, want) in [
            ("build/tmp/src/lib/util.gcda", Some((1, "src/lib/util.gcno"))),
            ("nix/build/lib/util.gcda", Some((0, "lib/util.gcno"))),
            ("home/me/other/prog.gcda", Some((1, "other/prog.gcno"))),
            ("home/me/prog.gcda", Some((0, "prog.gcno"))),
            ("home/me/missing.gcda", None),
        ] {
            let got = match_gcno(Path::new(gcda), &gcnos).map(|(i, p)| (*i, p.to_str().unwrap()));
            assert_eq!(got, want, "{gcda}");
        }
    }

    #[test]
    fn moved_sources_are_found_by_suffix() {
        let sources = vec![PathBuf::from("/store/x-src/src/main.c"), PathBuf::from("/store/x-src/main.c")];
        let text = "SF:/build/src/main.c\nDA:1,1\nSF:/here/kept.c\nSF:/build/unknown.h\n";
        let exists = |p: &Path| p == Path::new("/here/kept.c");
        assert_eq!(
            relocate_sources(text, exists, &sources),
            "SF:/store/x-src/src/main.c\nDA:1,1\nSF:/here/kept.c\nSF:/build/unknown.h\n"
        );
    }

    #[test]
    fn summary_lines() {
        assert!(Report::NoData.summary().starts_with("warning: coverage: no .gcda files"));
        let c = Counts { lines_found: 4, lines_hit: 2, functions_found: 2, functions_hit: 1 };
        let r = Report::Written { combined: c, machines: [("a".to_string(), c)].into() };
        assert_eq!(
            r.summary(),
            "coverage: lines 50.0% (2/4), functions 50.0% (1/2); a: lines 50.0% (2/4), functions 50.0% (1/2)"
        );
    }
}
