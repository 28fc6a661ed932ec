//! Distributed code coverage: the `.gcda` files collected from every machine
//! of a test become one lcov tracefile per machine, one merged tracefile and
//! an HTML report.
//!
//! Guests write `.gcda` files under [`GUEST_DIR`] (their `GCOV_PREFIX`), so a
//! machine's data arrives as `<out>/coverage-data/<machine>/<object dir>/<name>.gcda`,
//! `<object dir>` being the absolute directory the program was compiled in.
//! They are matched to the `.gcno` files of the build directories the user
//! names by the longest common path suffix, so a build moved after compiling
//! (a Nix output, a copied tree) still matches.

use std::fs;
use std::path::Path;

use crate::driver::control::Driver;
use crate::driver::log::{Log, Style};
use crate::driver::machine::DrivenMachine;
use crate::driver::DriverError;
use crate::shell::quote;

mod report;

pub use report::{check_report_tools, report, Counts, Report};

/// Every guest's `GCOV_PREFIX`: where programs built with `--coverage` write their data.
pub const GUEST_DIR: &str = "/var/lib/vmlab/coverage";
/// Below the test's output directory: one directory of `.gcda` files and one tracefile per machine.
pub const DATA_DIR: &str = "coverage-data";

/// What [`collect`] found on one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collected {
    /// This many `.gcda` files, now under `<out>/coverage-data/<machine>/`.
    Files(usize),
    /// The machine runs but no program wrote coverage data.
    Nothing,
    /// The machine ran but does not now: whatever its programs wrote died with it.
    Lost,
    /// The test never started the machine.
    NeverStarted,
}

/// Copies a running machine's coverage data (everything under its
/// [`GUEST_DIR`]) to `<out>/coverage-data/<machine>/`, after `sync`, so the
/// report sees what each machine's programs wrote, machine by machine.
pub fn collect(machine: &mut DrivenMachine) -> Result<Collected, DriverError> {
    if !machine.is_up() {
        return Ok(if machine.ever_started() { Collected::Lost } else { Collected::NeverStarted });
    }
    let dir = quote(GUEST_DIR);
    let out = machine.execute(&format!("sync; find {dir} -name '*.gcda' -type f 2>/dev/null | wc -l"), None)?;
    let count: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    if count == 0 {
        return Ok(Collected::Nothing);
    }
    // copy_from_vm keeps the directory's own name: fetch into a scratch
    // directory, then move the copy where the report looks for it.
    let scratch = Path::new(DATA_DIR).join(format!(".{}.incoming", machine.name));
    let copied = machine.copy_from_vm(GUEST_DIR, &scratch.to_string_lossy())?;
    let incoming = copied.parent().expect("copied into the scratch directory");
    let target = incoming.with_file_name(&machine.name);
    let moved = (|| {
        if target.exists() {
            fs::remove_dir_all(&target)?;
        }
        fs::rename(&copied, &target)?;
        fs::remove_dir(incoming)
    })();
    moved.map_err(|e| {
        DriverError::harness(format!("machine {}: moving coverage data to {}: {e}", machine.name, target.display()))
    })?;
    Ok(Collected::Files(count))
}

/// Collects every machine's data at once (see [`collect`]), saying in the
/// log what each gave and warning about data that is lost.
pub fn collect_all(driver: &Driver, log: &Log) {
    let names = driver.machine_names();
    std::thread::scope(|s| {
        for name in &names {
            s.spawn(move || {
                let collected = driver.with_machine(name, collect).expect("the driver's own machine");
                let (line, style) = match collected {
                    Ok(Collected::Files(n)) => (format!("coverage: collected {n} .gcda files"), Style::Plain),
                    Ok(Collected::Nothing | Collected::NeverStarted) => return,
                    Ok(Collected::Lost) => (
                        "warning: coverage: the machine is not running at the end: its data is lost".into(),
                        Style::Bad,
                    ),
                    Err(e) => (format!("warning: coverage: {e}"), Style::Bad),
                };
                log.write(Some(name), &line, style);
            });
        }
    });
}
