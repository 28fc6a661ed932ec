//! `vmlab guest --out DIR`: the default guest (docs/guest.md).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::cli::GuestArgs;
use crate::guest::{
    build, existing, kernel_version, newest_boot_kernel, parse_addition, read_head, GuestOptions, KERNEL_PACKAGE,
};

pub fn run(args: &GuestArgs) -> Result<ExitCode> {
    let opts = options(args)?;
    build(&opts)?;
    eprintln!(
        "wrote {} and {}{}",
        opts.out.join("kernel").display(),
        opts.out.join("initrd").display(),
        if opts.bash.is_some() { " (with bash)" } else { " (without bash)" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Resolves defaults (newest /boot kernel and its modules, busybox and
/// bash-static on PATH) and checks that every input exists.
fn options(args: &GuestArgs) -> Result<GuestOptions> {
    let kernel = match &args.kernel {
        Some(kernel) => existing(kernel, "kernel")?,
        None => newest_boot_kernel(Path::new("/boot"))?,
    };
    let modules = match &args.modules {
        Some(modules) => existing(modules, "module tree")?,
        None => {
            let version = kernel_version(&read_head(&kernel)?)
                .with_context(|| format!("cannot tell the release of kernel {} (pass --modules)", kernel.display()))?;
            let modules = Path::new("/lib/modules").join(&version);
            if !modules.join("modules.dep").is_file() {
                bail!(
                    "no kernel modules for {version} (no {}): install {KERNEL_PACKAGE}, or pass --modules",
                    modules.join("modules.dep").display()
                );
            }
            modules
        }
    };
    let busybox = match &args.busybox {
        Some(busybox) => existing(busybox, "busybox")?,
        None => which::which("busybox").context(
            "busybox not found on PATH: install busybox-static (apt-get install busybox-static), or pass --busybox",
        )?,
    };
    let bash = match (&args.bash, args.no_bash) {
        (_, true) => None,
        (Some(bash), false) => Some(existing(bash, "bash")?),
        (None, false) => which::which("bash-static").ok(),
    };
    let additions = args.add.iter().map(|add| parse_addition(add)).collect::<Result<_>>()?;
    let rc = args.rc.as_deref().map(|rc| existing(rc, "rc script")).transpose()?;
    Ok(GuestOptions { out: args.out.clone(), kernel, modules, busybox, bash, additions, rc })
}
