//! Hostile input against the relay binary and library, one module per concern: unbounded metric
//! labels from subjects (`metrics`), idle connections on the metrics port under a low
//! file-descriptor limit (`http`), secrets in every place a configuration can hold them
//! (`secrets`), and configuration mistakes that must fail by name (`config`).

mod config;
mod http;
mod metrics;
mod secrets;

use std::fs;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::harness::relay_bin;

/// How long one command may run (each one fails fast or is stopped).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the relay binary with `args` and extra environment to completion (bounded); returns its
/// status and its stdout + stderr.
pub async fn command_with_env(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let out = tempfile::NamedTempFile::new().expect("temporary output file");
    let file = out.reopen().expect("reopen output file");
    let err = file.try_clone().expect("clone output handle");
    let mut command = Command::new(relay_bin());
    command
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("PRISM_RELAY_CONFIG")
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn prism-relay");
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("prism-relay {args:?} did not finish in {COMMAND_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (status, fs::read_to_string(out.path()).unwrap_or_default())
}
