//! The bench's errors: what went wrong while driving the servers, the relay and the baselines
//! (a figure that misses its target is a result, not an error).

use std::io;

/// A failure of the bench itself or of a process or server it drives.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Starting, stopping or querying a server or the relay.
    #[error(transparent)]
    Testbed(#[from] prism_testbed::TestbedError),
    /// A file, directory or command of the bench.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The WAL scenario's own WAL.
    #[error("WAL: {0}")]
    Wal(#[from] prism_wal::WalError),
    /// Publishing the traffic (loadgen as a library).
    #[error("loadgen: {0}")]
    Loadgen(#[from] prism_relay::tools::ToolError),
    /// A NATS or JetStream call of a baseline or a probe.
    #[error("NATS {op}: {message}")]
    Nats { op: &'static str, message: String },
    /// A ClickHouse call of a baseline.
    #[error("ClickHouse {op}: {message}")]
    ClickHouse { op: &'static str, message: String },
    /// A condition the bench waits for did not come.
    #[error("{what} did not happen within {waited_s} s: {detail}")]
    Timeout {
        what: String,
        waited_s: u64,
        detail: String,
    },
    /// Something the bench reads (a server's answer, /proc) is not what it expects.
    #[error("unexpected {what}: {detail}")]
    Output { what: String, detail: String },
}

impl BenchError {
    pub fn io(context: impl Into<String>, source: io::Error) -> BenchError {
        BenchError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn nats(op: &'static str, e: impl std::fmt::Display) -> BenchError {
        BenchError::Nats {
            op,
            message: e.to_string(),
        }
    }

    pub fn ch(op: &'static str, e: impl std::fmt::Display) -> BenchError {
        BenchError::ClickHouse {
            op,
            message: e.to_string(),
        }
    }
}
