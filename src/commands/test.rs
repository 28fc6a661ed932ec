//! `vmlab test NETWORK SCRIPT`: runs a test script against a network, with
//! a verdict, a log and a JUnit report (docs/testing.md); its parts are in
//! src/driver/run.rs.

use std::process::{Command, ExitCode};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::session::{self, Config, Session};
use crate::cli::TestArgs;
use crate::coverage;
use crate::driver::log::{Log, LogFile, Style};
use crate::driver::python;
use crate::driver::run::{
    capture_output, lock_out_dir, log_console, machine_logs, resolve_script, script_path, verdict, vlans_env,
    wait_for_end, Ending, Event, Reports, Script, Verdict,
};
use crate::runtime::reaper::Reaped;
use crate::runtime::spawn_thread;
use crate::{EXIT_FAILED, EXIT_HARNESS, EXIT_OK};

pub fn run(args: &TestArgs) -> Result<ExitCode> {
    let signals = session::block_signals()?;
    let config = Config {
        network: &args.network,
        accel: args.accel,
        keep_state: args.keep_state,
        boot_silence: args.boot_silence,
    };
    if !(args.global_timeout.is_finite() && args.global_timeout > 0.0) {
        bail!("--global-timeout must be a positive number of seconds, not {}", args.global_timeout);
    }
    let script = args.script.as_deref().map(resolve_script).transpose()?;
    if !args.build_dirs.is_empty() {
        coverage::check_report_tools(&args.build_dirs)?;
    }
    let python = match (&script, args.interactive) {
        (Some(Script::Python(_)), _) | (_, true) => Some(python::python3()?),
        _ => None,
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {:?}", args.out))?;
    let out = std::fs::canonicalize(&args.out).with_context(|| format!("cannot resolve {:?}", args.out))?;
    // Before anything is written there: two runs would mix their reports.
    let _out_lock = lock_out_dir(&out)?;
    let log = Arc::new(Log::stderr(Some(LogFile::create(&out.join("vmlab.log"))?)));

    let say = |line: &str| log.info(None, line);
    let warn = |line: &str| log.write(None, line, Style::Bad);
    let prepared = session::prepare_network(&config, &say, &warn)?;
    let names: Vec<String> = prepared.plan.machines.iter().map(|m| m.name.clone()).collect();
    let vlans = vlans_env(&prepared.plan.vlans);
    let reports = Reports {
        junit: args.junit.clone().unwrap_or_else(|| out.join("junit.xml")),
        out: out.clone(),
        suite: prepared.plan.name.clone(),
        main: script
            .as_ref()
            .map_or("interactive".into(), |s| s.path().file_name().unwrap_or_default().to_string_lossy().into_owned()),
    };
    let pythonpath = match &python {
        Some(_) => Some(python::install(&prepared.session.layout().python_dir())?),
        None => None,
    };
    if let (Some(Script::Python(path)), Some(py), Some(pp)) = (&script, &python, &pythonpath) {
        if let Some(problems) = python::precheck(py, pp, path, &names, &vlans)? {
            for line in problems.lines() {
                log.write(None, line, Style::Bad);
            }
            let verdict =
                Verdict { code: EXIT_FAILED, failure: Some(format!("the script was checked before boot: {problems}")) };
            reports.finish(&log, &verdict, &[])?;
            return Ok(ExitCode::from(verdict.code));
        }
    }

    let session = Session::start(prepared, &out, log.clone(), config.boot_silence, args.restore.snapshot.as_deref())?;
    let (driver, socket) = (&session.driver, &session.socket);
    for m in session.network().machines() {
        log_console(m.name(), m.console().subscribe(), log.clone())?;
    }
    log.info(None, &format!("control socket: {}", socket.display()));

    let mut cmd = match (&script, args.interactive) {
        (script, true) => {
            let script = match script {
                Some(Script::Python(p)) => Some(p.as_path()),
                _ => None,
            };
            python::interactive_command(
                python.as_deref().expect("found above"),
                pythonpath.as_deref().expect("installed above"),
                &names,
                script,
            )
        }
        (Some(Script::Python(p)), false) => python::script_command(
            python.as_deref().expect("found above"),
            pythonpath.as_deref().expect("installed above"),
            p,
            &names,
        ),
        (Some(Script::Executable(p)), false) => Command::new(p),
        (None, false) => unreachable!("clap requires a script unless --interactive"),
    };
    cmd.env("VMLAB_SOCKET", socket)
        .env("VMLAB_OUT", &out)
        .env("VMLAB_VLANS", &vlans)
        .env("PYTHONUNBUFFERED", "1")
        .env("PATH", script_path()?);
    let (child, said) = if args.interactive {
        (Reaped::spawn_in_foreground(&cmd, "the Python prompt")?, None)
    } else {
        let child = Reaped::spawn(&cmd, format!("test script {}", reports.main))?;
        let said = capture_output(&child, log.clone())?;
        (child, Some(said))
    };
    let child = Arc::new(child);
    log.info(None, &format!("running {} (pid {})", reports.main, child.pid()));

    let (events, received) = mpsc::channel();
    Session::forward_signals(signals, events.clone(), Event::Signal)?;
    let waited = child.clone();
    spawn_thread("script-exit".into(), move || {
        if let Some(status) = waited.wait_exit(Duration::MAX) {
            let _ = events.send(Event::Exited(status));
        }
    })?;
    // A person at the prompt has no deadline.
    let limit = (!args.interactive).then(|| Duration::from_secs_f64(args.global_timeout));
    let ending = wait_for_end(&received, limit, driver, args.interactive);
    let last_error = driver.last_error().map(|e| e.kind);

    // Stop what runs: the script and what it left behind, then every machine
    // and switch. In between, the machines still run for anything to be
    // fetched from them at the end (through `driver.with_machine`).
    session.close();
    child.stop();
    if args.coverage {
        match &ending {
            Ending::Exited(_) => {
                coverage::collect_all(driver, &log);
                if args.build_dirs.is_empty() {
                    let hint = format!("`vmlab coverage {} --build-dir DIR` makes the report", out.display());
                    log.info(None, &format!("coverage: data in {}; {hint}", out.join(coverage::DATA_DIR).display()));
                }
            }
            _ => log.write(
                None,
                "warning: coverage: not collected: the test was stopped before its script ended",
                Style::Bad,
            ),
        }
    }
    session.stop();
    let last_words = said.and_then(|s| s.last_words());
    let (subtests, _) = log.records();
    let failed: Vec<&str> = subtests.iter().filter(|s| s.failure.is_some()).map(|s| s.name.as_str()).collect();
    let mut verdict = verdict(&ending, last_error, &failed, last_words.as_deref());
    if args.coverage && !args.build_dirs.is_empty() {
        match coverage::report(&out, &args.build_dirs) {
            Ok(report @ coverage::Report::NoData) => log.write(None, &report.summary(), Style::Bad),
            Ok(report) => log.write(None, &report.summary(), Style::Plain),
            // A passed test whose requested report is missing did not do what was asked.
            Err(e) if verdict.code == EXIT_OK => {
                verdict = Verdict { code: EXIT_HARNESS, failure: Some(format!("coverage report: {e:#}")) }
            }
            Err(e) => log.write(None, &format!("error: coverage report: {e:#}"), Style::Bad),
        }
    }
    // What the lossy console cost (the data port needs no recovery): read by bench/ and the tests.
    let (reasked, probed) = crate::driver::backdoor::recoveries();
    log.info(None, &format!("backdoor console: {reasked} replies asked for again, {probed} probes sent"));
    reports.finish(&log, &verdict, &machine_logs(session.network()))?;
    let (dir, kept) = session.end();
    log.info(
        None,
        &format!(
            "reports in {}; session directory {} {}",
            reports.out.display(),
            dir.display(),
            if kept { "kept" } else { "removed" }
        ),
    );
    Ok(ExitCode::from(verdict.code))
}
