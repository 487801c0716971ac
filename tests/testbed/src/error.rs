//! The one error type of the test bed: what went wrong starting, probing,
//! signalling or querying a server, with the server's log tail where it helps.

use std::io;

/// Everything that can go wrong in the test bed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// The server binary is neither in the override variable, on `PATH`, nor in the
    /// fallback directories.
    #[error("{binary} not found: {hint}")]
    BinaryNotFound {
        /// Name of the missing executable.
        binary: &'static str,
        /// How to install it.
        hint: &'static str,
    },

    /// An override variable names a path that is not an executable file.
    #[error("{variable} points at {path}, which is not an executable file")]
    BadOverride {
        /// The environment variable that was set.
        variable: &'static str,
        /// Its value.
        path: String,
    },

    /// A local operation (temporary directory, config file, spawning, signalling) failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The server kept running but never answered its readiness probe.
    #[error("{server} was not ready after {waited_ms} ms; log tail:\n{log_tail}")]
    NotReady {
        /// Which server.
        server: &'static str,
        /// How long the probe was polled.
        waited_ms: u64,
        /// The end of the server's log files.
        log_tail: String,
    },

    /// The server exited while starting, for a reason other than a taken port.
    #[error("{server} exited during start-up ({status}); log tail:\n{log_tail}")]
    ExitedEarly {
        /// Which server.
        server: &'static str,
        /// Its exit status.
        status: String,
        /// The end of the server's log files.
        log_tail: String,
    },

    /// Every attempt found one of its ports taken by someone else.
    #[error("{server} could not bind its ports in {attempts} attempts; log tail:\n{log_tail}")]
    PortsUnavailable {
        /// Which server.
        server: &'static str,
        /// How many starts were tried.
        attempts: u32,
        /// The end of the server's log files of the last attempt.
        log_tail: String,
    },

    /// An operation needs a running server, but it was killed and not restarted.
    #[error("{server} is not running")]
    NotRunning {
        /// Which server.
        server: &'static str,
    },

    /// Connecting to, writing to or reading from a server's HTTP port failed
    /// (including timeouts: see [`TestbedError::is_timeout`]).
    #[error("HTTP {method} 127.0.0.1:{port}{path} failed: {source}")]
    Http {
        /// Request method.
        method: &'static str,
        /// Server port.
        port: u16,
        /// Request path and query.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The server answered something that is not a well-formed HTTP/1.1 response.
    #[error("malformed HTTP response from 127.0.0.1:{port}: {reason}")]
    MalformedResponse {
        /// Server port.
        port: u16,
        /// What was wrong with it.
        reason: String,
    },

    /// ClickHouse answered a query with an error status.
    #[error("ClickHouse rejected the query (HTTP {status}): {exception}")]
    Query {
        /// HTTP status code.
        status: u16,
        /// ClickHouse's exception text, as sent in the response body.
        exception: String,
    },
}

impl TestbedError {
    /// True when an HTTP request ran out of time (the server was paused or overloaded).
    pub fn is_timeout(&self) -> bool {
        match self {
            TestbedError::Http { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> TestbedError {
        TestbedError::Io {
            context: context.into(),
            source,
        }
    }
}
