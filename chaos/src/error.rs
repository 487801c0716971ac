//! The runner's errors: what went wrong while driving the servers and the relay, as opposed
//! to what a scenario found (lost or duplicated messages, a failed check), which is a result.

use std::io;

/// A failure of the runner itself or of a process it drives.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// Starting, stopping or querying a server or the relay.
    #[error(transparent)]
    Testbed(#[from] prism_testbed::TestbedError),
    /// A file, directory or command of the runner.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Reading the relay's WAL (the torn-tail and kill-point probes read it like `wal dump`).
    #[error("reading the WAL: {0}")]
    Wal(#[from] prism_wal::WalError),
    /// A condition the runner waits for did not come.
    #[error("{what} did not happen within {waited_ms} ms{detail}")]
    Timeout {
        what: String,
        waited_ms: u64,
        detail: String,
    },
    /// A check of a scenario did not hold (the relay exited, spun, acked too much, ...).
    #[error("{0}")]
    Check(String),
    /// A tool or server answered something the runner does not understand.
    #[error("unexpected output of {what}: {detail}")]
    Output { what: String, detail: String },
}

impl ChaosError {
    pub fn io(context: impl Into<String>, source: io::Error) -> ChaosError {
        ChaosError::Io {
            context: context.into(),
            source,
        }
    }
}
