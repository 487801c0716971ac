//! The relay binary as a process of the test bed: spawned on a configuration file with its
//! output appended to a log, tied to the caller's life like the servers, and killed, stopped,
//! terminated and restarted on the same configuration and WAL. Used by the chaos runner, which
//! drives the release binary like an operator would; it knows nothing of the relay's internals
//! beyond its command line and its `/ready` and `/metrics` endpoints.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::http;
use crate::process::{log_tail, open_append, wait_ready, LogFile, Probe, ServerProcess};
use crate::{TestbedError, PROBE_TIMEOUT_MS, SIGNAL_SETTLE_TIMEOUT_MS};

const PROCESS: &str = "prism-relay";

/// A `prism-relay run --config FILE` process (or its configuration, between a kill and a
/// restart). Dropping it kills the process with SIGKILL; the WAL and the log stay.
#[derive(Debug)]
pub struct Relay {
    binary: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    metrics_port: u16,
    /// Extra environment of every start (e.g. a test hook); see [`Relay::set_env`].
    env: Vec<(String, String)>,
    process: Option<ServerProcess>,
}

impl Relay {
    /// Spawns `binary run --config config_path`, appending stdout and stderr to `log_path`;
    /// `metrics_port` is the configuration's `[metrics] listen` port on 127.0.0.1. Returns at
    /// once: see [`Relay::wait_ready`].
    pub fn spawn(
        binary: &Path,
        config_path: &Path,
        log_path: &Path,
        metrics_port: u16,
    ) -> Result<Relay, TestbedError> {
        Relay::spawn_with_env(binary, config_path, log_path, metrics_port, Vec::new())
    }

    /// [`Relay::spawn`] with `env` added to the process's environment (at this and every later
    /// start, until [`Relay::set_env`] changes it).
    pub fn spawn_with_env(
        binary: &Path,
        config_path: &Path,
        log_path: &Path,
        metrics_port: u16,
        env: Vec<(String, String)>,
    ) -> Result<Relay, TestbedError> {
        let mut relay = Relay {
            binary: binary.to_path_buf(),
            config_path: config_path.to_path_buf(),
            log_path: log_path.to_path_buf(),
            metrics_port,
            env,
            process: None,
        };
        relay.start()?;
        Ok(relay)
    }

    /// The extra environment of the next starts (empty: none).
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    /// Starts the process again on the same configuration (after a kill or an exit).
    pub fn start(&mut self) -> Result<(), TestbedError> {
        if self.is_running()? {
            return Ok(());
        }
        let log = open_append(&self.log_path)?;
        let err = log
            .try_clone()
            .map_err(|e| TestbedError::io("cloning the relay's log handle", e))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("PRISM_RELAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            // Info level whatever the caller's environment says: the log is evidence a test or
            // a failed chaos scenario reads.
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.process = Some(ServerProcess::spawn(PROCESS, command)?);
        Ok(())
    }

    /// Whether the process runs (a process that exited is reaped here).
    pub fn is_running(&mut self) -> Result<bool, TestbedError> {
        Ok(self.try_exit()?.is_none() && self.process.is_some())
    }

    /// The exit status if the process exited by itself since the last look.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>, TestbedError> {
        let Some(process) = self.process.as_mut() else {
            return Ok(None);
        };
        let status = process.try_exit()?;
        if status.is_some() {
            self.process = None;
        }
        Ok(status)
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(ServerProcess::pid)
    }

    /// Polls `/ready` until it answers 200; fails with the log's tail if the process exits or
    /// `timeout` passes (the process is then killed).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), TestbedError> {
        let Some(process) = self.process.as_mut() else {
            return Err(TestbedError::NotRunning { server: PROCESS });
        };
        let logs = [LogFile::from_end(self.log_path.clone())];
        let port = self.metrics_port;
        let outcome = wait_ready(process, &logs, timeout, || {
            match http::request(port, "GET", "/ready", b"", probe_timeout()) {
                Ok(response) if response.status == 200 => Probe::Ready,
                _ => Probe::NotYet,
            }
        });
        outcome.map_err(|failure| match failure {
            crate::process::StartFailure::Fatal(e) => e,
            crate::process::StartFailure::PortTaken { log_tail } => TestbedError::ExitedEarly {
                server: PROCESS,
                status: "its metrics port was taken".into(),
                log_tail,
            },
        })
    }

    /// SIGKILL and reap; nothing when not running.
    pub fn kill9(&mut self) -> Result<(), TestbedError> {
        match self.process.take() {
            Some(mut process) => process.kill9(),
            None => Ok(()),
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit (SIGKILL after it). The exit status
    /// when the relay exited by itself.
    pub fn terminate(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, TestbedError> {
        match self.process.take() {
            Some(mut process) => process.terminate(timeout),
            None => Ok(None),
        }
    }

    /// SIGSTOP, returning once the kernel reports the process stopped.
    pub fn pause(&self) -> Result<(), TestbedError> {
        self.running()?.pause(signal_settle())
    }

    /// SIGCONT, returning once the process runs again.
    pub fn resume(&self) -> Result<(), TestbedError> {
        self.running()?.resume(signal_settle())
    }

    fn running(&self) -> Result<&ServerProcess, TestbedError> {
        self.process
            .as_ref()
            .ok_or(TestbedError::NotRunning { server: PROCESS })
    }

    /// `GET path` on the metrics port: (status, body).
    pub fn http_get(&self, path: &str, timeout: Duration) -> Result<(u16, String), TestbedError> {
        http_get(self.metrics_port, path, timeout)
    }

    /// The `/metrics` text.
    pub fn metrics(&self, timeout: Duration) -> Result<String, TestbedError> {
        let (status, body) = self.http_get("/metrics", timeout)?;
        if status != 200 {
            return Err(TestbedError::MalformedResponse {
                port: self.metrics_port,
                reason: format!("GET /metrics answered {status}: {body}"),
            });
        }
        Ok(body)
    }

    /// The configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The log file (every run of the process appends to it).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last bytes of the log.
    pub fn log_tail(&self) -> String {
        log_tail(&[LogFile::from_start(self.log_path.clone())])
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // A failure here leaves nothing to do: the death signal still ends the process.
        let _ = self.kill9();
    }
}

fn probe_timeout() -> Duration {
    Duration::from_millis(PROBE_TIMEOUT_MS)
}

fn signal_settle() -> Duration {
    Duration::from_millis(SIGNAL_SETTLE_TIMEOUT_MS)
}

/// `GET path` on `127.0.0.1:port` within `timeout`: (status, body as text).
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(u16, String), TestbedError> {
    let response = http::request(port, "GET", path, b"", timeout)?;
    Ok((response.status, response.body_text()))
}

/// Sum of the samples of `name` in Prometheus text whose labels include all `labels`
/// (`key="value"` pairs); 0 when there is none. A name exported under several label sets
/// (MarketPrism's processed and failed counters: unlabeled, by data type, ...) counts each row
/// once per set; the finest set partitions the rows, so only it is summed.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    // (number of labels, label text, value) of every series of `name`.
    let mut series: Vec<(usize, &str, f64)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(rest) = rest.strip_prefix('{') {
            let Some((l, v)) = rest.split_once('}') else {
                continue;
            };
            (l, v)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let Some(value) = value.split_whitespace().next() else {
            continue;
        };
        series.push((
            label_text.matches("=\"").count(),
            label_text,
            value.parse::<f64>().unwrap_or(0.0),
        ));
    }
    let finest = series.iter().map(|(n, _, _)| *n).max().unwrap_or(0);
    series
        .iter()
        .filter(|(n, _, _)| *n == finest)
        .filter(|(_, label_text, _)| {
            labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, _, value)| value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::metric_sum;

    #[test]
    fn metric_sum_adds_the_finest_samples_whose_labels_match_and_skips_longer_names() {
        // `m` under three label sets, as MarketPrism's processed counter: each row is in each set
        // once, so only the finest set is summed.
        let text = "# HELP x\nprism_relay_acks_total 7\nprism_relay_acks_total_other 100\n\
                    m 9\nm{table=\"a\"} 6\nm{table=\"b\"} 3\n\
                    m{table=\"a\",k=\"1\"} 2\nm{table=\"a\",k=\"2\"} 4\nm{table=\"b\",k=\"1\"} 3\n";
        assert_eq!(metric_sum(text, "prism_relay_acks_total", &[]), 7.0);
        assert_eq!(metric_sum(text, "m", &[("table", "a")]), 6.0);
        assert_eq!(metric_sum(text, "m", &[("k", "1")]), 5.0);
        assert_eq!(metric_sum(text, "m", &[]), 9.0);
        assert_eq!(metric_sum(text, "missing", &[]), 0.0);
    }
}
