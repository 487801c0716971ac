//! The metrics port cannot take the relay down: idle connections under a low file-descriptor
//! limit neither stop ingest nor `/metrics`, and the relay closes them.

use std::fs::{self, OpenOptions};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;

use crate::harness::{http_get, relay_bin, wait_for, Bed, Load, RelayConfig, READY_TIMEOUT};

/// The relay binary run under `prlimit --nofile=N:N`; killed on drop.
struct LimitedRelay {
    child: Child,
    log_path: std::path::PathBuf,
}

impl LimitedRelay {
    fn spawn(bed: &Bed, config: &RelayConfig, nofile: u32) -> LimitedRelay {
        let config_path = config.write(&bed.path("limited.toml"));
        let log_path = bed.path("limited.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open relay log");
        let err = log.try_clone().expect("clone log handle");
        let child = Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg(relay_bin())
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env_remove("PRISM_RELAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn prlimit prism-relay");
        LimitedRelay { child, log_path }
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
    let mut relay = LimitedRelay::spawn(&bed, &config, NOFILE);
    let ready_deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = relay.child.try_wait().expect("try_wait") {
            panic!("relay exited with {status}; log:\n{}", relay.log());
        }
        if let Ok((200, _)) = http_get(addr, "/ready").await {
            break;
        }
        assert!(
            Instant::now() < ready_deadline,
            "relay not ready; log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
