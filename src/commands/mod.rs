//! One module per subcommand: its arguments (src/cli/) become what the
//! layers below take, then it runs. `up` and `test` share [`session`].

mod client;
mod coverage;
mod guest;
mod session;
mod snapshot;
mod test;
mod up;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command};
use crate::emit;

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Plan(args) => {
            print!("{}", emit::plan_json(&emit::load(&args.spec)?.plan));
            Ok(ExitCode::SUCCESS)
        }
        Command::Build(args) => {
            emit::write_build(&emit::load(&args.spec)?, &args.out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Up(args) => up::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Snapshot(args) => snapshot::run(&args),
        Command::Guest(args) => guest::run(&args),
        Command::Client(cmd) => client::run(cmd),
        Command::Coverage(args) => coverage::run(&args),
        Command::Reap(args) => crate::runtime::reaper::reap_command(&args.command),
    }
}
