//! Running a built network: session directory, switches, machine processes.
use std::process::ExitCode;

use crate::cli::UpArgs;

pub fn up_command(_args: &UpArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
