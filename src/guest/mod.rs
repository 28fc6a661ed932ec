//! The default minimal guest: host kernel + static busybox in a vmlab-written initrd.
use std::process::ExitCode;

use crate::cli::GuestArgs;

pub fn guest_command(_args: &GuestArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
