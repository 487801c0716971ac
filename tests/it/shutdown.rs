//! Graceful shutdown against real servers: `[shutdown] drain` (drain before exit) delivers a WAL
//! backlog into ClickHouse before the relay exits, and with ClickHouse down it stops within its
//! bound and leaves the backlog to the next start; without it, a quick stop leaves the backlog
//! in the WAL.

use std::time::Duration;

use crate::harness::{wait_until, Bed, Load, RelayConfig, RelayProc};

const RECEIVED: &str = "marketprism_storage_messages_received_total";
const INSERT_ERRORS: &str = "marketprism_storage_clickhouse_insert_errors_total";

/// Messages published while ClickHouse is down: a backlog whose drain takes many inserts, and
/// more WAL records than a lane reads in one pass (4,096), which a quick stop still finishes.
const BACKLOG_MESSAGES: u64 = 10_000;

/// Rows per batch: small, so the backlog takes hundreds of inserts to drain and is surely behind
/// when SIGTERM comes right after ClickHouse is back.
const ROWS_MAX: u64 = 10;

/// Long enough for the relay to take the backlog into its WAL on a loaded machine.
const INGEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Long enough for a restarted relay to drain the backlog in batches of [`ROWS_MAX`] rows on a
/// loaded machine.
const RESTART_DRAIN_TIMEOUT: Duration = Duration::from_secs(180);

/// The drain bound of the test where ClickHouse is reachable: generous, since the drain must end
/// by reaching the WAL's end, not by the bound, on a loaded machine.
const DRAIN_SHUTDOWN_TIMEOUT_MS: u64 = 120_000;

/// The bound of the test where ClickHouse stays down.
const DOWN_SHUTDOWN_TIMEOUT_MS: u64 = 3_000;

/// Beyond the bound: the process's own exit, and the test's view of it, on a loaded machine.
const EXIT_MARGIN: Duration = Duration::from_secs(5);

/// A relay whose ClickHouse was down while a backlog was published: the backlog is in its WAL
/// (acked to JetStream) and no insert of it succeeded yet.
async fn relay_with_backlog(bed: &mut Bed, config: &RelayConfig, drain: bool) -> RelayProc {
    let env = [(
        "PRISM_RELAY_SHUTDOWN_DRAIN",
        if drain { "true" } else { "false" },
    )];
    let mut relay = RelayProc::spawn_with_env(bed, "relay", config, &env);
    relay.wait_ready().await;
    bed.ch.kill9().expect("kill -9 clickhouse-server");
    bed.publish(Load::new("drainexit", BACKLOG_MESSAGES)).await;
    wait_until(
        "the relay met the outage and took the backlog into its WAL",
        INGEST_TIMEOUT,
        || async {
            relay.metric_sum(INSERT_ERRORS, &[]).await >= 1.0
                && relay.metric_sum(RECEIVED, &[]).await >= BACKLOG_MESSAGES as f64
        },
    )
    .await;
    relay
}

fn backlog_config(bed: &Bed, timeout_ms: u64) -> RelayConfig {
    let mut config = bed.config();
    config.rows_max = ROWS_MAX;
    config.shutdown_timeout_ms = timeout_ms;
    config
}

/// ClickHouse back, then SIGTERM at once: asserts the lanes were behind the WAL's durable end
/// when the signal went, and that the relay exited 0.
async fn sigterm_with_the_backlog_behind(bed: &mut Bed, relay: &mut RelayProc, timeout_ms: u64) {
    tokio::task::block_in_place(|| bed.ch.restart()).expect("restart clickhouse-server");
    let (cursor, durable) = relay.cursor_and_durable().await;
    assert!(
        cursor <= durable && durable >= BACKLOG_MESSAGES as f64,
        "the backlog must still be behind at SIGTERM: cursor {cursor}, durable {durable}"
    );
    let status = relay
        .terminate_within(Duration::from_millis(timeout_ms) + EXIT_MARGIN)
        .await;
    assert!(status.success(), "{status}: {}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_drain_on_sigterm_right_after_clickhouse_returns_delivers_the_whole_wal_backlog_before_the_relay_exits(
) {
    let mut bed = Bed::start();
    let config = backlog_config(&bed, DRAIN_SHUTDOWN_TIMEOUT_MS);
    let mut relay = relay_with_backlog(&mut bed, &config, true).await;
    sigterm_with_the_backlog_behind(&mut bed, &mut relay, DRAIN_SHUTDOWN_TIMEOUT_MS).await;

    // The relay is gone and is not restarted: ClickHouse must already hold everything.
    let report = bed.verify().await;
    let totals = report.totals();
    assert!(
        totals.published >= BACKLOG_MESSAGES && totals.lost == 0 && totals.duplicated == 0,
        "{report}\n{}",
        relay.log()
    );
    let log = relay.log();
    assert!(log.contains("drain before exit ended"), "{log}");
    assert!(!log.contains("ran out before the WAL was drained"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_drain_the_same_sigterm_leaves_the_backlog_in_the_wal_until_the_next_start_delivers_it(
) {
    let mut bed = Bed::start();
    let config = backlog_config(&bed, DRAIN_SHUTDOWN_TIMEOUT_MS);
    let mut relay = relay_with_backlog(&mut bed, &config, false).await;
    sigterm_with_the_backlog_behind(&mut bed, &mut relay, DRAIN_SHUTDOWN_TIMEOUT_MS).await;

    // A quick stop: one insert attempt per lane, the rest stays in the WAL.
    let report = bed.verify().await;
    assert!(report.totals().lost > 0, "{report}\n{}", relay.log());

    relay.restart();
    let report = bed.wait_accounted(RESTART_DRAIN_TIMEOUT).await;
    assert_eq!(report.totals().duplicated, 0, "{report}");
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_drain_and_clickhouse_down_the_relay_exits_within_its_bound_keeping_the_backlog_for_the_next_start(
) {
    let mut bed = Bed::start();
    let config = backlog_config(&bed, DOWN_SHUTDOWN_TIMEOUT_MS);
    let mut relay = relay_with_backlog(&mut bed, &config, true).await;
    let status = relay
        .terminate_within(Duration::from_millis(DOWN_SHUTDOWN_TIMEOUT_MS) + EXIT_MARGIN)
        .await;
    assert!(status.success(), "{status}: {}", relay.log());
    let log = relay.log();
    assert!(log.contains("ran out before the WAL was drained"), "{log}");

    // ClickHouse back without the relay: the backlog is not there; the WAL has it.
    tokio::task::block_in_place(|| bed.ch.restart()).expect("restart clickhouse-server");
    let report = bed.verify().await;
    assert!(report.totals().lost > 0, "{report}");

    relay.restart();
    let report = bed.wait_accounted(RESTART_DRAIN_TIMEOUT).await;
    assert_eq!(report.totals().duplicated, 0, "{report}");
    assert!(relay.terminate().await.success(), "{}", relay.log());
}
