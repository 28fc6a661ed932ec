//! The skeleton `vmlab up` and `vmlab test` share: block the termination
//! signals, prepare the network, start it, build the driver on it and serve
//! the control socket, watch the signals; at the end close the socket, stop
//! every machine and switch, release the driver's connections and remove
//! the session directory (unless kept). What each does in between is its own.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::Result;

use crate::accel::Accel;
use crate::driver::control::{serve, Driver};
use crate::driver::log::Log;
use crate::runtime::signals::{self, BlockedSignals};
use crate::runtime::{prepare, spawn_thread, Network, Prepared};

/// What both commands take from their arguments.
pub struct Config<'a> {
    /// A `vmlab build` directory or a spec.
    pub network: &'a Path,
    pub accel: Accel,
    pub keep_state: bool,
    pub boot_silence: Option<Duration>,
}

/// The termination signals, blocked before any thread exists (so every
/// thread inherits the mask) and received by [`Session::forward_signals`].
pub fn block_signals() -> Result<BlockedSignals> {
    BlockedSignals::block(&signals::TERMINATION)
}

/// Reads the network and makes its session directory; nothing runs yet.
pub fn prepare_network(config: &Config, say: &dyn Fn(&str), warn: &dyn Fn(&str)) -> Result<Prepared> {
    prepare(config.network, config.accel, config.keep_state, say, warn)
}

/// A running network with its driver and control socket.
pub struct Session {
    network: Network,
    pub driver: Arc<Driver>,
    pub socket: PathBuf,
}

impl Session {
    /// Starts the network's switches (machines start on demand), builds the
    /// driver on it (copies and screenshots land in `out`), and serves the
    /// control socket.
    /// With a `snapshot`, machines are restored from it rather than booted.
    pub fn start(
        prepared: Prepared,
        out: &Path,
        log: Arc<Log>,
        boot_silence: Option<Duration>,
        snapshot: Option<&Path>,
    ) -> Result<Session> {
        let plan_dir = prepared.plan_dir.clone();
        let network = prepared.start()?;
        let driver = Arc::new(Driver::for_network(&network, out, log, boot_silence));
        if let Some(dir) = snapshot {
            super::snapshot::attach(dir, &driver, &network, &plan_dir)?;
        }
        let socket = network.session().layout().control_socket();
        serve(driver.clone(), &socket)?;
        Ok(Session { network, driver, socket })
    }

    pub fn network(&self) -> &Network {
        &self.network
    }

    /// Sends each termination signal to `events` as `event(signal)`, from a
    /// thread of its own, as long as someone receives.
    pub fn forward_signals<E: Send + 'static>(
        signals: BlockedSignals,
        events: mpsc::Sender<E>,
        event: fn(libc::c_int) -> E,
    ) -> Result<()> {
        spawn_thread("signals".into(), move || while events.send(event(signals.wait())).is_ok() {})
    }

    /// Ends the requests under way and refuses new ones; the machines still
    /// run, for anything to be fetched from them.
    pub fn close(&self) {
        self.driver.close();
    }

    /// Stops every machine and switch and lets go of the driver's
    /// connections; the session directory stays, for the logs in it.
    pub fn stop(&self) {
        self.network.stop();
        self.driver.release_all();
    }

    /// Removes the session directory unless it is kept: which directory, and whether kept.
    pub fn end(self) -> (PathBuf, bool) {
        let ended = (self.network.session().path().to_owned(), self.network.session().kept());
        drop(self.network);
        ended
    }
}
