//! vmlab: virtual networks of QEMU virtual machines, described as JSON,
//! planned deterministically (NixOS-test-compatible addressing), emitted as
//! run scripts, run with private switches, and driven by test scripts.
//!
//! Data flows one way: spec → plan (pure) → emitted files → runtime → driver.

pub mod accel;
pub mod cli;
pub mod commands;
pub mod coverage;
pub mod driver;
pub mod emit;
pub mod guest;
#[cfg(test)]
mod layers;
pub mod layout;
pub mod plan;
pub mod runtime;
pub mod shell;
pub mod spec;
pub mod sync;

use std::process::ExitCode;

/// Everything went well / the test passed.
pub const EXIT_OK: u8 = 0;
/// The test failed (an expectation, an assertion, a timeout) or a guest command failed.
pub const EXIT_FAILED: u8 = 1;
/// Bad input or a harness error (invalid spec, missing tool, guest never came up).
pub const EXIT_HARNESS: u8 = 2;

/// Parses the command line and runs the command; errors are printed once by `main`.
pub fn run() -> anyhow::Result<ExitCode> {
    commands::run(<cli::Cli as clap::Parser>::parse())
}
