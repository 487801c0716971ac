//! The metrics port cannot take the relay down: idle connections under a low file-descriptor
//! limit neither stop ingest nor `/metrics`, and the relay closes them; and while slow clients
//! hold every connection, `/health` and `/ready` still answer.

use std::fs::{self, OpenOptions};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::{http_get, relay_bin, wait_for, Bed, Load, RelayConfig, READY_TIMEOUT};

/// The relay binary run under `prlimit --nofile=N:N`; killed on drop.
struct LimitedRelay {
    child: Child,
    log_path: std::path::PathBuf,
}

impl LimitedRelay {
    fn spawn(bed: &Bed, config: &RelayConfig, nofile: u32, env: &[(&str, &str)]) -> LimitedRelay {
        let config_path = config.write(&bed.path("limited.toml"));
        let log_path = bed.path("limited.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open relay log");
        let err = log.try_clone().expect("clone log handle");
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg(relay_bin())
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env_remove("PRISM_RELAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("spawn prlimit prism-relay");
        LimitedRelay { child, log_path }
    }

    /// Polls `/ready` until it answers 200; panics with the log if the relay exits or the
    /// deadline passes.
    async fn wait_ready(&mut self, addr: std::net::SocketAddr) {
        let ready_deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("relay exited with {status}; log:\n{}", self.log());
            }
            if let Ok((200, _)) = http_get(addr, "/ready").await {
                break;
            }
            assert!(
                Instant::now() < ready_deadline,
                "relay not ready; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for LimitedRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_idle_metrics_connections_under_a_low_fd_limit_neither_stop_ingest_nor_metrics_and_are_closed(
) {
    /// File descriptors the relay may hold: room for its own work, well below the idle flood.
    const NOFILE: u32 = 128;
    /// Idle connections opened at once: more than the relay could hold open.
    const IDLE_CONNECTIONS: usize = 200;
    /// Time for every idle connection to be closed by the relay's timeouts.
    const CLOSE_TIMEOUT: Duration = Duration::from_secs(90);
    let bed = Bed::start();
    let config = bed.config();
    let addr = config.metrics_addr();
    let mut relay = LimitedRelay::spawn(&bed, &config, NOFILE, &[]);
    relay.wait_ready(addr).await;

    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        idle.push(
            tokio::net::TcpStream::connect(addr)
                .await
                .expect("open an idle connection"),
        );
    }

    // Ingest goes on: every message is stored while the idle connections are held.
    bed.publish(Load::new("idle-flood", 1_000).mix("trade=1"))
        .await;
    let report = bed.wait_accounted(Duration::from_secs(60)).await;
    assert!(report.ok(), "{report}\nlog:\n{}", relay.log());

    // /metrics answers again (the idle connections are closed or refused, not served forever).
    let page = wait_for("/metrics answers", CLOSE_TIMEOUT, || async {
        match http_get(addr, "/metrics").await {
            Ok((200, body)) => Some(body),
            _ => None,
        }
    })
    .await;
    assert!(page.contains("marketprism_storage_messages_received_total"));

    // Every idle connection was closed by the relay.
    let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
    for (i, mut stream) in idle.into_iter().enumerate() {
        let mut buf = [0u8; 64];
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {}
            Err(_) => panic!("idle connection {i} still open; log:\n{}", relay.log()),
        }
    }
    assert!(
        relay.child.try_wait().expect("try_wait").is_none(),
        "relay exited; log:\n{}",
        relay.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_ready_still_answer_while_slow_clients_hold_every_metrics_connection() {
    /// Regular connections of the metrics port, all of which the test holds.
    const CONNECTIONS_MAX: usize = 4;
    let bed = Bed::start();
    let config = bed.config();
    let addr = config.metrics_addr();
    // The longest header timeout: without a reserve, a probe would wait that long (past the
    // client's own timeout) for a slow client's slot.
    let mut relay = LimitedRelay::spawn(
        &bed,
        &config,
        1024,
        &[
            ("PRISM_RELAY_METRICS_CONNECTIONS_MAX", "4"),
            ("PRISM_RELAY_METRICS_HEADER_READ_TIMEOUT_MS", "60000"),
            ("PRISM_RELAY_METRICS_REQUEST_TIMEOUT_MS", "120000"),
        ],
    );
    relay.wait_ready(addr).await;

    // Slow clients: each sends half a request line and stalls, holding a regular connection.
    let mut slow = Vec::with_capacity(CONNECTIONS_MAX);
    for _ in 0..CONNECTIONS_MAX {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("open a slow connection");
        stream
            .write_all(b"GET /met")
            .await
            .expect("send a partial request");
        slow.push(stream);
    }

    for path in ["/health", "/ready"] {
        let answer = http_get(addr, path).await;
        assert!(
            matches!(answer, Ok((200, _))),
            "{path} while every connection is held: {answer:?}; log:\n{}",
            relay.log()
        );
    }
    let (status, body) = http_get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 503, "/metrics on a reserved connection: {body}");
    assert!(body.contains("busy"), "{body}");

    // The slow clients were still holding their connections all along: none was closed.
    for (i, stream) in slow.iter().enumerate() {
        let mut buf = [0u8; 64];
        match stream.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("slow connection {i} was answered or closed: {other:?}"),
        }
    }
    assert!(
        relay.child.try_wait().expect("try_wait").is_none(),
        "relay exited; log:\n{}",
        relay.log()
    );
}
