//! A Prometheus server (Debian's `prometheus` package) on a free port in a temporary
//! directory, with the configuration and rule files a test gives it, and a query client
//! for its HTTP API.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::http;
use crate::process::{
    open_append, wait_ready, BinarySpec, LogFile, Probe, ServerProcess, StartFailure,
};
use crate::server::{Launch, Server, ServerSpec};
use crate::{TestbedError, PROBE_TIMEOUT_MS, PROMETHEUS_READY_TIMEOUT_MS, QUERY_TIMEOUT_MS};

const SERVER: &str = "prometheus";

const SPEC: ServerSpec = ServerSpec {
    binary: BinarySpec {
        name: SERVER,
        override_var: "PRISM_PROMETHEUS_SERVER",
        fallback_dirs: &["/usr/bin"],
        install_hint: "run scripts/test, which installs Debian's prometheus package with apt-get",
    },
    label: "Prometheus",
    dir_prefix: "prism-prometheus-",
    name_prefix: "prism-testbed-prometheus",
};

/// Name of the combined stdout/stderr log in the server's directory.
const LOG_FILE: &str = "prometheus.log";

/// The configuration file written from [`Prometheus::start`]'s `config`.
const CONFIG_FILE: &str = "prometheus.yml";

/// The TSDB directory inside the server's directory.
const DATA_DIR: &str = "data";

/// A running `prometheus` server.
///
/// Dropping it kills the server with SIGKILL and removes its directory.
#[derive(Debug)]
pub struct Prometheus {
    /// Ports `[web]`.
    server: Server<1>,
}

/// One answer of the HTTP API: its status and its JSON body, as text.
#[derive(Debug, Clone)]
pub struct PromAnswer {
    /// HTTP status (200 for a successful query, 400 for one that does not parse).
    pub status: u16,
    /// The JSON body (`{"status":"success","data":...}` or `{"status":"error","error":...}`).
    pub body: String,
}

impl Prometheus {
    /// Starts a server with `config` (Prometheus' YAML) as its configuration file and `files`
    /// (name, content) written beside it (rule files, referenced by name from `config`), and
    /// returns once `/-/ready` answers 200.
    pub fn start(config: &str, files: &[(&str, &str)]) -> Result<Prometheus, TestbedError> {
        let server = Server::start(&SPEC, |run| {
            std::fs::write(run.dir.join(CONFIG_FILE), config)
                .map_err(|e| TestbedError::io("writing the Prometheus configuration", e))?;
            for (name, content) in files {
                std::fs::write(run.dir.join(name), content)
                    .map_err(|e| TestbedError::io(format!("writing {name}"), e))?;
            }
            launch(run)
        })?;
        Ok(Prometheus { server })
    }

    /// Web and API port.
    pub fn port(&self) -> u16 {
        self.server.ports()[0]
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// The server's log (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.server.dir().join(LOG_FILE)
    }

    /// Process id of the running server, `None` after `kill9`.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill9(&mut self) -> Result<(), TestbedError> {
        self.server.kill9()
    }

    /// Stops the server with SIGTERM (SIGKILL after [`crate::TERMINATE_TIMEOUT_MS`]).
    pub fn terminate(&mut self) -> Result<Option<ExitStatus>, TestbedError> {
        self.server.terminate()
    }

    /// Evaluates `promql` at the current time (`GET /api/v1/query`) within
    /// [`QUERY_TIMEOUT_MS`]. An expression that does not parse is an answer (status 400 with
    /// Prometheus' error), not an `Err`: only transport failures are.
    pub fn query(&self, promql: &str) -> Result<PromAnswer, TestbedError> {
        self.get(&format!("/api/v1/query?query={}", url_encode(promql)))
    }

    /// `GET path` on the server's API (e.g. `/api/v1/rules`, `/api/v1/targets`).
    pub fn get(&self, path: &str) -> Result<PromAnswer, TestbedError> {
        let response = http::request(
            self.port(),
            "GET",
            path,
            b"",
            Duration::from_millis(QUERY_TIMEOUT_MS),
        )?;
        Ok(PromAnswer {
            status: response.status,
            body: response.body_text(),
        })
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for a query parameter.
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Spawns one server and waits until it is ready and known to be ours.
fn launch(run: &Launch<1>) -> Result<ServerProcess, StartFailure> {
    let Launch {
        binary,
        dir,
        name: _,
        ports: [port],
    } = *run;
    let log_path = dir.join(LOG_FILE);
    let log = LogFile::from_end(log_path.clone());
    let stdout = open_append(&log_path)?;
    let stderr = stdout
        .try_clone()
        .map_err(|e| TestbedError::io("duplicating the Prometheus log handle", e))?;
    let data_dir = dir.join(DATA_DIR);
    let mut command = Command::new(binary);
    command
        .arg(format!("--config.file={}", dir.join(CONFIG_FILE).display()))
        .arg(format!("--storage.tsdb.path={}", data_dir.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let mut process = ServerProcess::spawn(SERVER, command)?;
    let expected_path = data_dir.display().to_string();
    wait_ready(
        &mut process,
        &[log],
        Duration::from_millis(PROMETHEUS_READY_TIMEOUT_MS),
        || probe(port, &expected_path),
    )?;
    Ok(process)
}

/// Ready when `/-/ready` answers 200 and the server's flags name our TSDB directory (a
/// stranger on the port would otherwise pass for ours).
fn probe(port: u16, data_dir: &str) -> Probe {
    let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
    match http::request(port, "GET", "/-/ready", b"", timeout) {
        Ok(response) if response.status == 200 => {}
        _ => return Probe::NotYet,
    }
    match http::request(port, "GET", "/api/v1/status/flags", b"", timeout) {
        Ok(response) if response.status == 200 => {
            // The path sits in a JSON string, where '/' may be escaped as "\/".
            let body = response.body_text().replace("\\/", "/");
            if body.contains(&format!("\"{data_dir}\"")) {
                Probe::Ready
            } else {
                Probe::Stranger
            }
        }
        _ => Probe::NotYet,
    }
}

#[cfg(test)]
mod tests {
    use super::url_encode;

    #[test]
    fn a_promql_expression_is_encoded_so_braces_quotes_and_spaces_survive_the_query_string() {
        assert_eq!(
            url_encode(r#"sum by (a) (x{job="p-r"}[1m]) > 0.5"#),
            "sum%20by%20%28a%29%20%28x%7Bjob%3D%22p-r%22%7D%5B1m%5D%29%20%3E%200.5"
        );
    }
}
