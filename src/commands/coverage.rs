//! `vmlab coverage DIR --build-dir DIR…`: the combined report of what a test collected.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::CoverageArgs;
use crate::coverage::{report, Report};

pub fn run(args: &CoverageArgs) -> Result<ExitCode> {
    match report(&args.dir, &args.build_dirs)? {
        r @ Report::NoData => eprintln!("{}", r.summary()),
        r => println!("{}", r.summary()),
    }
    Ok(ExitCode::SUCCESS)
}
