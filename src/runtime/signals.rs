//! Ctrl-C, SIGTERM and SIGHUP as events rather than asynchronous handlers:
//! the signals are blocked in every thread and one thread takes them with
//! `sigwait`, so stopping the network runs as ordinary code.

use std::io;
use std::time::Instant;

use anyhow::{Context, Result};

/// The signals that stop a network.
pub const TERMINATION: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Signals that are blocked, to be taken as events with [`BlockedSignals::wait`].
pub struct BlockedSignals {
    set: libc::sigset_t,
}

impl BlockedSignals {
    /// Blocks `signals` in the calling thread and so in every thread it
    /// starts afterwards: call it before any thread exists (first thing in a
    /// command). Children do not inherit the mask: [`super::process::ChildGuard`]
    /// clears it before exec.
    pub fn block(signals: &[libc::c_int]) -> Result<BlockedSignals> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe { libc::sigemptyset(&mut set) };
        for &signal in signals {
            unsafe { libc::sigaddset(&mut set, signal) };
        }
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r)).context("cannot block signals");
        }
        Ok(BlockedSignals { set })
    }

    /// Waits for one of the signals and returns it.
    pub fn wait(&self) -> libc::c_int {
        loop {
            let mut signal = 0;
            // SAFETY: the set was built by block(); sigwait only writes `signal`.
            if unsafe { libc::sigwait(&self.set, &mut signal) } == 0 {
                return signal;
            }
        }
    }

    /// Waits for one of the signals until `deadline`; `None` when it passed.
    pub fn wait_until(&self, deadline: Instant) -> Option<libc::c_int> {
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let timeout = libc::timespec { tv_sec: left.as_secs() as libc::time_t, tv_nsec: left.subsec_nanos() as _ };
            // SAFETY: the set was built by block(); a null siginfo is allowed.
            let signal = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &timeout) };
            if signal > 0 {
                return Some(signal);
            }
            // EAGAIN (timed out) ends the loop above; EINTR comes round again.
        }
    }
}

// SAFETY: a sigset_t is a plain bit set.
unsafe impl Send for BlockedSignals {}

/// Pure: "SIGTERM" for the signals vmlab talks about.
pub fn name(signal: libc::c_int) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGTERM => "SIGTERM",
        _ => return None,
    })
}
