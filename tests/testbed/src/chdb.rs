//! A modern ClickHouse engine (26.9, the one the PyPI package `chdb-core` embeds) served over
//! ClickHouse's HTTP interface by `tests/testbed/chdb_server.py`, with the same lifecycle as
//! [`crate::ClickHouse`]: a free port in a temporary directory, readiness awaited, SIGKILL,
//! restart on the same port and data, SIGSTOP and SIGCONT.
//!
//! The only ClickHouse server these machines install is 18.16; this is how the relay's
//! modern profile runs end to end. The engine is real (parsing, types, MergeTree parts,
//! deduplication windows and tokens, FINAL); the HTTP layer is a stand-in covering what the
//! relay, `verify` and the tests send: statements by parameter and body, RowBinary and
//! JSONEachRow inserts with LZ4 bodies (`decompress=1`), settings as URL parameters, and
//! failures answered with a real server's HTTP status (404 for an unknown table, database
//! or setting, 400 for parse and type errors, 500 otherwise), `X-ClickHouse-Exception-Code`
//! header and `Code: N. DB::Exception: ... (NAME) (version V)` body.
//!
//! Where it differs from a real server in ways that matter to a test:
//! - One statement at a time: a single engine session answers every connection under one
//!   lock, so concurrent inserts are serialized (a real server runs them in parallel) and a
//!   slow statement delays every other request.
//! - Memory: the engine runs inside the Python process with its default limits; there are
//!   no users, quotas or `max_memory_usage` profiles, so "memory limit exceeded" (retryable
//!   in the relay) cannot be provoked here.
//! - No replication, no cluster, no Keeper: deduplication is the non-replicated kind
//!   (`non_replicated_deduplication_window`), as the modern schema profile sets it.
//! - `async_insert` settings reach the engine, but an embedded engine has no asynchronous
//!   insert queue: such inserts are written at once, as if the queue had flushed right away.
//!   The settings each insert carried are logged (see [`Chdb::insert_settings`]) so a test
//!   can check what the relay sent.
//! - Compressed-block checksums are not verified, and answers are never compressed.
//! - `/ping` is answered, `/replicas_status` and the other handlers are not.
//! - A test hook ([`Chdb::lose_next_insert`]) puts the engine in the state a real server is
//!   left in when it is killed between recording an insert's token and committing its part.
//!
//! The interpreter is `python3` (or `PRISM_PYTHON3`); a missing chdb makes `start` fail with
//! the script's message naming the fix (`scripts/test` installs `chdb-core`), never a skip.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::http;
use crate::process::{
    open_append, wait_ready, BinarySpec, LogFile, Probe, ServerProcess, StartFailure,
};
use crate::server::{Launch, Server, ServerSpec};
use crate::{TestbedError, CHDB_READY_TIMEOUT_MS, PROBE_TIMEOUT_MS, QUERY_TIMEOUT_MS};

/// The interpreter that runs the server script.
const INTERPRETER: &str = "python3";

/// Name of the server in messages.
const SERVER: &str = "chdb_server.py";

/// The script that serves the engine.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/chdb_server.py");

const SPEC: ServerSpec = ServerSpec {
    binary: BinarySpec {
        name: INTERPRETER,
        override_var: "PRISM_PYTHON3",
        fallback_dirs: &["/usr/bin"],
        install_hint: "run scripts/test, which installs python3's chdb-core==26.9.0",
    },
    label: "chdb",
    dir_prefix: "prism-chdb-",
    name_prefix: "prism-testbed-chdb",
};

/// Files in the server's directory (the script knows the same names).
const LOG_FILE: &str = "chdb-server.log";
const DATA_DIR: &str = "data";
const INSERTS_LOG_FILE: &str = "inserts.jsonl";
const LOSE_NEXT_INSERT_FILE: &str = "lose-next-insert";

/// A failed request's answer, as a ClickHouse server gives it over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The HTTP status.
    pub status: u16,
    /// The `X-ClickHouse-Exception-Code` header, when sent.
    pub exception_code: Option<String>,
    /// The body as text.
    pub body: String,
}

/// A running (or killed, awaiting restart) chdb engine behind the HTTP stand-in.
///
/// Dropping it kills the server with SIGKILL and removes its directory.
#[derive(Debug)]
pub struct Chdb {
    /// Ports `[http]`.
    server: Server<1>,
}

impl Chdb {
    /// Starts a server on a free port and returns once `/ping` answers `Ok.`.
    pub fn start() -> Result<Chdb, TestbedError> {
        Ok(Chdb {
            server: Server::start(&SPEC, launch)?,
        })
    }

    /// [`Chdb::start`] with `python` as the interpreter.
    pub fn start_with_interpreter(python: PathBuf) -> Result<Chdb, TestbedError> {
        Ok(Chdb {
            server: Server::start_binary(&SPEC, python, launch)?,
        })
    }

    /// HTTP endpoint, `http://127.0.0.1:PORT`, for the `clickhouse` crate.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port())
    }

    /// HTTP port.
    pub fn http_port(&self) -> u16 {
        self.server.ports()[0]
    }

    /// The engine's data path; it survives `kill9` and `restart`.
    pub fn data_dir(&self) -> PathBuf {
        self.server.dir().join(DATA_DIR)
    }

    /// The server's stderr (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.server.dir().join(LOG_FILE)
    }

    /// Process id of the running server, `None` after `kill9`.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Kills the server with SIGKILL and reaps it; the data directory stays.
    pub fn kill9(&mut self) -> Result<(), TestbedError> {
        self.server.kill9()
    }

    /// Stops the server with SIGTERM (SIGKILL after [`crate::TERMINATE_TIMEOUT_MS`]).
    pub fn terminate(&mut self) -> Result<Option<ExitStatus>, TestbedError> {
        self.server.terminate()
    }

    /// Starts the server again on the same port and data directory and waits for `/ping`;
    /// a running server is killed with SIGKILL first.
    pub fn restart(&mut self) -> Result<(), TestbedError> {
        self.server.restart(launch)
    }

    /// Freezes the server with SIGSTOP; connections are accepted by the kernel and never
    /// answered until [`Chdb::resume`].
    pub fn pause(&self) -> Result<(), TestbedError> {
        self.server.pause()
    }

    /// Continues a paused server with SIGCONT.
    pub fn resume(&self) -> Result<(), TestbedError> {
        self.server.resume()
    }

    /// Runs `sql` over HTTP within [`QUERY_TIMEOUT_MS`] and returns the response body
    /// (tab-separated unless the query says `FORMAT ...`). A rejected query is a
    /// [`TestbedError::Query`] carrying the exception text.
    pub fn query(&self, sql: &str) -> Result<String, TestbedError> {
        self.query_with_timeout(sql, Duration::from_millis(QUERY_TIMEOUT_MS))
    }

    /// [`Chdb::query`] with its own bound, connection to last byte.
    pub fn query_with_timeout(&self, sql: &str, timeout: Duration) -> Result<String, TestbedError> {
        http::query(self.http_port(), sql, timeout)
    }

    /// POSTs `body` to `path_and_query` (e.g. `/?query=...`) and returns the answer whatever
    /// its status, for tests of the HTTP interface itself.
    pub fn post(&self, path_and_query: &str, body: &[u8]) -> Result<HttpAnswer, TestbedError> {
        post(self.http_port(), path_and_query, body)
    }

    /// Makes the server lose the next insert into `table` that carries a deduplication token
    /// the way a server killed between writing the token to its deduplication log and
    /// committing the insert's part does: the token stays known, the rows are not stored, and
    /// no answer goes back (the connection is closed). A retry with the same token is then
    /// answered as a duplicate and stores nothing.
    pub fn lose_next_insert(&self, table: &str) -> Result<(), TestbedError> {
        let path = self.server.dir().join(LOSE_NEXT_INSERT_FILE);
        std::fs::write(&path, table)
            .map_err(|e| TestbedError::io(format!("writing {}", path.display()), e))
    }

    /// Whether [`Chdb::lose_next_insert`] is still waiting for its insert.
    pub fn losing_next_insert(&self) -> bool {
        self.server.dir().join(LOSE_NEXT_INSERT_FILE).exists()
    }

    /// The URL parameters that are settings of every INSERT with a body received so far
    /// (all runs), oldest first, each as `(name, value)` pairs.
    pub fn insert_settings(&self) -> Result<Vec<Vec<(String, String)>>, TestbedError> {
        let path = self.server.dir().join(INSERTS_LOG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(TestbedError::io(format!("reading {}", path.display()), e)),
        };
        Ok(text.lines().map(settings_of_log_line).collect())
    }
}

/// POSTs to a ClickHouse-like HTTP port and returns the answer whatever its status.
pub(crate) fn post(
    port: u16,
    path_and_query: &str,
    body: &[u8],
) -> Result<HttpAnswer, TestbedError> {
    let timeout = Duration::from_millis(QUERY_TIMEOUT_MS);
    let response = http::request(port, "POST", path_and_query, body, timeout)?;
    Ok(HttpAnswer {
        status: response.status,
        exception_code: response.exception_code.clone(),
        body: response.body_text(),
    })
}

/// The `settings` object of one line the script logged: `{"query": "...", "settings":
/// {"name": "value", ...}}`, written by Python's `json.dumps` (keys and values are strings
/// without escapes in practice: setting names and the relay's values are plain ASCII).
fn settings_of_log_line(line: &str) -> Vec<(String, String)> {
    let Some(start) = line.find("\"settings\": {") else {
        return Vec::new();
    };
    let rest = &line[start + "\"settings\": {".len()..];
    let body = rest.split('}').next().unwrap_or_default();
    body.split("\", \"")
        .filter_map(|pair| {
            let (name, value) = pair.split_once("\": \"")?;
            Some((
                name.trim_matches('"').to_owned(),
                value.trim_matches('"').to_owned(),
            ))
        })
        .collect()
}

/// Spawns one server and waits until it is ready and known to be ours.
fn launch(run: &Launch<1>) -> Result<ServerProcess, StartFailure> {
    let Launch {
        binary,
        dir,
        name,
        ports: [http_port],
    } = *run;
    let log_path = dir.join(LOG_FILE);
    let logs = [LogFile::from_end(log_path.clone())];
    let stdout = open_append(&log_path)?;
    let stderr = stdout
        .try_clone()
        .map_err(|e| TestbedError::io("duplicating the chdb log handle", e))?;
    let mut command = Command::new(binary);
    command
        .arg(SCRIPT)
        .arg(dir)
        .arg(http_port.to_string())
        .arg(name)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let mut process = ServerProcess::spawn(SERVER, command)?;
    wait_ready(
        &mut process,
        &logs,
        Duration::from_millis(CHDB_READY_TIMEOUT_MS),
        || probe(http_port, name),
    )?;
    Ok(process)
}

/// Ready when `/ping` answers `Ok.` and `/prism-testbed/name` our name.
fn probe(http_port: u16, name: &str) -> Probe {
    let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
    match http::request(http_port, "GET", "/ping", b"", timeout) {
        Ok(response) if response.status == 200 && response.body_text().trim() == "Ok." => {}
        _ => return Probe::NotYet,
    }
    match http::request(http_port, "GET", "/prism-testbed/name", b"", timeout) {
        Ok(response) if response.status == 200 && response.body_text() == name => Probe::Ready,
        Ok(_) => Probe::Stranger,
        Err(_) => Probe::NotYet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_insert_line_yields_its_settings_in_order() {
        let line = r#"{"query": "INSERT INTO t FORMAT RowBinary", "settings": {"async_insert": "1", "insert_deduplication_token": "trades:1-2:2:ab"}}"#;
        assert_eq!(
            settings_of_log_line(line),
            [
                ("async_insert".to_owned(), "1".to_owned()),
                (
                    "insert_deduplication_token".to_owned(),
                    "trades:1-2:2:ab".to_owned()
                )
            ]
        );
        assert!(settings_of_log_line(r#"{"query": "x", "settings": {}}"#).is_empty());
    }
}
