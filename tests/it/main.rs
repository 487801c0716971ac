//! Integration tests of the relay against real servers started by `prism-testbed`.

mod audit;
mod auth;
mod chaos;
mod check;
mod cli_errors;
mod cluster;
mod deploy;
mod disk;
mod harness;
mod hostile;
mod hostile_subjects;
mod metrics;
mod modern;
mod relay;
mod replay;
mod scaleout;
mod security;
mod shutdown;
mod sink;
mod source;
mod tools;

/// Result of a test: any error fails it with its message.
pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
