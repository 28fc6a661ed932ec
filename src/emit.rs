//! `vmlab plan` and `vmlab build`: the plan as JSON and the run scripts.
use std::process::ExitCode;

use crate::cli::{BuildArgs, PlanArgs};

pub fn plan_command(_args: &PlanArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}

pub fn build_command(_args: &BuildArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
