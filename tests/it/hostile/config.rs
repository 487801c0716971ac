//! Configuration mistakes are caught at start-up, by name: a custom dead-letter table works end
//! to end, `replay --database` validates the name like the configured one, and `check` warns that
//! a TLS or `.creds` connection cannot rescue deliveries with non-UTF-8 subjects.

use std::fs;
use std::time::{Duration, Instant};

use prism_relay::config::Config;

use super::command_with_env;
use crate::harness::{http_get, wait_until_sync, Bed, DATABASE, DRAIN_TIMEOUT, READY_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_dead_letter_table_is_created_checked_and_receives_the_dead_letters() {
    let bed = Bed::start();
    let config = bed.config();
    let mut parsed: Config = config.parse();
    parsed.drain.dead_letter_table = "relay_rejects".to_owned();
    parsed
        .validate()
        .expect("a custom dead-letter table is valid");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut task = tokio::spawn(prism_relay::run::run(parsed, async move {
        let _ = stop_rx.await;
    }));
    let addr = config.metrics_addr();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if task.is_finished() {
            let result = (&mut task).await.expect("relay task");
            panic!("relay stopped before ready: {result:?}");
        }
        if let Ok((200, _)) = http_get(addr, "/ready").await {
            break;
        }
        assert!(Instant::now() < deadline, "relay not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bed.publish_raw("trade.binance.spot.BTC-USDT", "{not json")
        .await;
    wait_until_sync("the dead letter is in relay_rejects", DRAIN_TIMEOUT, || {
        bed.try_sql(&format!("SELECT count() FROM {DATABASE}.relay_rejects"))
            .map(|n| n.trim() == "1")
            .unwrap_or(false)
    })
    .await;
    let _ = stop_tx.send(());
    task.await
        .expect("relay task")
        .expect("relay stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_into_a_database_that_is_not_an_identifier_is_refused_by_name() {
    let bed = Bed::start();
    let config = bed.config();
    let path = config.write(&bed.path("replay.toml"));
    fs::create_dir_all(&config.wal_dir).expect("create the WAL directory");
    let path = path.display().to_string();
    for database in ["cold`; DROP TABLE trades; --", "market-prism", ""] {
        let (status, output) =
            command_with_env(&["replay", "--config", &path, "--database", database], &[]).await;
        assert!(!status.success(), "replay into {database:?} ran:\n{output}");
        assert!(
            output.contains("--database") && output.contains("identifier"),
            "replay into {database:?} did not name the flag:\n{output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_that_a_websocket_connection_cannot_rescue_non_utf8_subjects_and_tls_or_creds_can(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = crate::harness::free_port();
    let ws = format!("ws://127.0.0.1:{closed}");
    let (_, output) = command_with_env(&["check"], &[("PRISM_RELAY_NATS_URL", ws.as_str())]).await;
    let line = output
        .lines()
        .find(|l| l.starts_with("nats: warning:"))
        .unwrap_or_else(|| panic!("no warning line for ws://:\n{output}"));
    assert!(
        line.contains("ws://") && line.contains("not UTF-8") && line.contains("nats stream rmm"),
        "{line}"
    );
    // The rescue's raw connection speaks TLS and signs with a .creds file's seed, as the client.
    let tls = format!("tls://127.0.0.1:{closed}");
    let creds = dir.path().join("relay.creds").display().to_string();
    let plain = format!("nats://127.0.0.1:{closed}");
    for env in [
        vec![("PRISM_RELAY_NATS_URL", tls.as_str())],
        vec![("PRISM_RELAY_NATS_CREDS_FILE", creds.as_str())],
        vec![("PRISM_RELAY_NATS_URL", plain.as_str())],
    ] {
        let (_, output) = command_with_env(&["check"], &env).await;
        assert!(!output.contains("nats: warning:"), "{env:?}:\n{output}");
    }
}
