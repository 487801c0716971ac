//! The online audit against real servers: it confirms what the relay acknowledged is in
//! ClickHouse, counts nothing as missing through a ClickHouse outage, and counts and logs the
//! rows that disappear behind the relay's back.

use std::time::Duration;

use crate::harness::{wait_for, wait_until, Bed, Load, RelayProc, DATABASE, DRAIN_TIMEOUT};

const CHECKED: &str = "prism_relay_audit_checked_total";
const MISSING: &str = "prism_relay_audit_missing_total";
const RECEIVED: &str = "marketprism_storage_messages_received_total";
const INSERT_ERRORS: &str = "marketprism_storage_clickhouse_insert_errors_total";

/// One record in this many is sampled: a few hundred samples from the test's traffic.
const SAMPLE_EVERY: u64 = 7;

/// Long enough for a round after the drain on a loaded machine.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_confirms_acknowledged_messages_counts_no_miss_through_an_outage_and_counts_and_logs_rows_deleted_behind_the_relays_back(
) {
    let mut bed = Bed::start();
    let mut config = bed.config();
    config.extra = format!(
        "[audit]\nenabled = true\nsample_every_records = {SAMPLE_EVERY}\ninterval_ms = 300\n"
    );
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    // Clean traffic: every sample is found.
    bed.publish(Load::new("audit1", 700)).await;
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    // Every sampled LSN (1 ..= 700, one in SAMPLE_EVERY) is checked once drained.
    let sampled_first = 700 / SAMPLE_EVERY;
    wait_until(
        "the audit checked every sample of the first load",
        AUDIT_TIMEOUT,
        || async { relay.metric_sum(CHECKED, &[]).await >= sampled_first as f64 },
    )
    .await;
    assert_eq!(relay.metric_sum(MISSING, &[]).await, 0.0, "{}", relay.log());

    // A ClickHouse outage: the lanes stop, the audit waits with them and counts nothing missing.
    bed.ch.kill9().expect("kill -9 clickhouse-server");
    let received = relay.metric_sum(RECEIVED, &[]).await;
    bed.publish(Load::new("audit2", 700)).await;
    wait_until(
        "the relay met the outage and took the second load into its WAL",
        AUDIT_TIMEOUT,
        || async {
            relay.metric_sum(INSERT_ERRORS, &[]).await >= 1.0
                && relay.metric_sum(RECEIVED, &[]).await >= received + 700.0
        },
    )
    .await;
    assert_eq!(relay.metric_sum(MISSING, &[]).await, 0.0, "{}", relay.log());
    tokio::task::block_in_place(|| bed.ch.restart()).expect("restart clickhouse-server");
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    let sampled_both = 1_400 / SAMPLE_EVERY;
    wait_until(
        "the audit checked every sample of both loads",
        AUDIT_TIMEOUT,
        || async { relay.metric_sum(CHECKED, &[]).await >= sampled_both as f64 },
    )
    .await;
    let checked = relay.metric_sum(CHECKED, &[]).await;
    assert!(
        checked <= (sampled_both + 1) as f64,
        "each sample is checked once: {checked} checked of {sampled_both} sampled"
    );
    assert_eq!(relay.metric_sum(MISSING, &[]).await, 0.0, "{}", relay.log());
    let log = relay.log();
    let paused = log.matches("audit paused").count();
    assert!(
        paused <= 3,
        "the outage is logged as a condition, not per round ({paused} lines):\n{log}"
    );
    assert!(!log.contains("is missing from ClickHouse"), "{log}");
    // The samples were looked up in their typed tables: nothing went to the dead letters.
    assert_eq!(bed.count_dead_letters(), 0);

    // Rows that vanish behind the relay's back: `trades` is swapped for a table that keeps
    // nothing, so every trade inserted from now on is acknowledged, inserted and gone.
    bed.sql(&format!(
        "CREATE TABLE {DATABASE}.trades_void AS {DATABASE}.trades ENGINE = Null"
    ));
    bed.sql(&format!(
        "RENAME TABLE {DATABASE}.trades TO {DATABASE}.trades_kept, {DATABASE}.trades_void TO {DATABASE}.trades"
    ));
    let checked_before = relay.metric_sum(CHECKED, &[]).await;
    bed.publish(Load::new("audit3", 700).mix("trade=1")).await;
    let missing = wait_for(
        "the audit counted the vanished trades",
        AUDIT_TIMEOUT,
        || async {
            let missing = relay.metric_sum(MISSING, &[]).await;
            (missing >= (700 / SAMPLE_EVERY - 1) as f64).then_some(missing)
        },
    )
    .await;
    let checked_after = relay.metric_sum(CHECKED, &[]).await;
    assert!(
        missing <= checked_after - checked_before,
        "only checked samples are missing: {missing} missing, {} checked",
        checked_after - checked_before
    );
    let log = relay.log();
    let misses: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("is missing from ClickHouse"))
        .collect();
    assert!(!misses.is_empty(), "{log}");
    for line in &misses {
        assert!(
            line.contains("stream=MARKET_TRADES")
                && line.contains("table=trades")
                && line.contains("seq=")
                && line.contains("identity="),
            "a miss names stream, sequence, table and identity: {line}"
        );
    }
    // Per round at most the line cap plus a summary line: many misses do not flood the log.
    assert!(
        (misses.len() as f64) <= missing,
        "{} miss lines for {missing} misses",
        misses.len()
    );
    assert!(relay.terminate().await.success(), "{}", relay.log());
}
