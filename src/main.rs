use std::process::ExitCode;

fn main() -> ExitCode {
    match vmlab::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(vmlab::EXIT_HARNESS)
        }
    }
}
