//! Driving machines: the backdoor shell, machine operations, the control socket.

pub mod atomic;
pub mod backdoor;
pub mod base64;
pub mod control;
pub mod copy;
pub mod junit;
pub mod log;
pub mod machine;
pub mod md5;
pub mod monitor;
pub mod protocol;
pub mod python;
pub mod qmp;
pub mod run;
pub mod snapshot;
#[cfg(test)]
pub mod testing;
pub mod vm;

use std::fmt;

/// Why an operation did not succeed; decides the test's exit status and is
/// the `kind` of a control-socket error (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An expectation did not hold: `succeed` saw a non-zero status, `fail` a zero one.
    Failed,
    /// A wait or a command ran out of time.
    Timeout,
    /// The machine is gone or unusable: QEMU exited, the guest crashed, no backdoor.
    Machine,
    /// The request itself is wrong: unknown operation or machine, bad arguments.
    Request,
    /// vmlab could not do its part: a tool or file missing, an I/O error on the host.
    Harness,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Failed => "failed",
            Kind::Timeout => "timeout",
            Kind::Machine => "machine",
            Kind::Request => "request",
            Kind::Harness => "harness",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverError {
    pub kind: Kind,
    pub message: String,
}

impl DriverError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        DriverError { kind, message: message.into() }
    }
    pub fn request(message: impl Into<String>) -> Self {
        Self::new(Kind::Request, message)
    }
    pub fn harness(message: impl Into<String>) -> Self {
        Self::new(Kind::Harness, message)
    }
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DriverError {}
