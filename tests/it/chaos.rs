//! Chaos: the relay binary between real servers while ClickHouse, NATS or the relay itself is
//! killed with SIGKILL, ClickHouse or NATS is frozen with SIGSTOP, or the WAL's tail is torn. Every
//! scenario publishes MarketPrism traffic while the fault happens and ends with an exact
//! accounting by `verify` (which reads the streams themselves and the tables under FINAL):
//! nothing lost, nothing duplicated, every published identity stored, no dead letters.
//!
//! The scenarios that fault ClickHouse run on both legs (`chaos::legacy::*` on 18.16,
//! `chaos::modern::*` on the test bed's modern engine); on the modern leg the freeze scenario
//! also finds every row once without FINAL, since timed-out inserts are retried with their token.
//!
//! Faults are timed by conditions (rows stored, messages appended, insert errors counted), not
//! by sleeps, and every wait is bounded. Each scenario prints one `chaos:` line with its message
//! count and how long the drain took after the last fault was lifted and the traffic ended
//! (run with `--nocapture` to see them).
//!
//! The consumers use explicit acks (the default), except in one scenario for ack policy `all`:
//! after a relay crash, a restarted relay's ack-all would also cover the messages JetStream had
//! delivered to the killed one, which never reached the WAL; the fetcher holds such an ack back
//! until every pending delivery is written. A second ack-all scenario freezes NATS while acks and
//! pulls are in flight, so pulls are abandoned and acks end with an unknown outcome.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use prism_relay::tools::gen::Mix;
use prism_relay::tools::loadgen::{self, LoadgenOptions, LoadgenSummary};
use prism_relay::tools::verify::VerifyReport;
use prism_relay::tools::ToolError;
use prism_wal::{Envelope, Lsn, StreamSeq};
use tokio::task::JoinHandle;

use crate::harness::{
    wait_for, wait_until, wait_until_sync, Bed, Leg, RelayConfig, RelayProc, DRAIN_TIMEOUT, STREAMS,
};

/// Redelivery delay of the chaos consumers: a killed relay's fetched-but-unacked messages come
/// back after this, so it bounds the drain after every relay kill (1000 ms is the minimum).
const ACK_WAIT_MS: u64 = 2_000;

/// Rows per batch: small, so a kill lands between a batch's insert and its ledger commit often.
const ROWS_MAX: u64 = 200;

/// Bound on any wait for traffic, rows or metrics to reach a threshold.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);

/// Rows stored before a fault that must land mid-load is injected.
const ROWS_BEFORE_FAULT: u64 = 300;

/// Bound on the traffic generator finishing once every fault is lifted.
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(30);

/// Appends covered by an fsync (the relay's own counter; it restarts at 0 with the process).
const RECEIVED: &str = "marketprism_storage_messages_received_total";

/// Inserts that failed, of any class.
const INSERT_ERRORS: &str = "marketprism_storage_clickhouse_insert_errors_total";

/// Successful inserts and the rows they carried.
const BATCH_INSERTS: &str = "marketprism_storage_batch_inserts_total";
const BATCH_ROWS: &str = "marketprism_storage_batch_size_total";

/// Fewest rows per insert a restarted relay may average (see [`assert_batched`]).
const ROWS_PER_INSERT_MIN: f64 = 4.0;

/// Lines of the relay's log shown when a drain does not complete.
const LOG_TAIL_LINES: usize = 80;

/// Publish rate of the scenarios that fault ClickHouse once rows reach it: the modern leg's
/// server answers through one engine session, and its rows take longer to reach the count the
/// trigger waits for. Traffic the fault must absorb is a second run started once the relay met
/// the fault ([`second_run`]), so a slow machine cannot use it up beforehand.
fn mid_load_rate_per_s(leg: Leg) -> u64 {
    match leg {
        Leg::Legacy => 1_000,
        Leg::Modern => 500,
    }
}

/// A bed configuration for chaos: short redelivery and small batches.
fn chaos_config(bed: &Bed) -> RelayConfig {
    let mut config = bed.config();
    for consumer in &mut config.consumers {
        consumer.ack_wait_ms = ACK_WAIT_MS;
    }
    config.rows_max = ROWS_MAX;
    config
}

/// Loadgen in a task of its own, so faults can be injected while it publishes.
struct Traffic {
    task: JoinHandle<Result<LoadgenSummary, ToolError>>,
    count: u64,
}

impl Traffic {
    /// Starts `count` messages of all eight types at `rate_per_s` into the relay's streams.
    /// `publish_errors_max` is how many failed publishes the run tolerates (NATS outages).
    fn start(bed: &Bed, run_id: &str, count: u64, rate_per_s: u64, errors_max: u64) -> Traffic {
        Traffic::start_at(bed, run_id, count, rate_per_s, errors_max, None)
    }

    fn start_at(
        bed: &Bed,
        run_id: &str,
        count: u64,
        rate_per_s: u64,
        errors_max: u64,
        ts_start_ms: Option<i64>,
    ) -> Traffic {
        let opts = LoadgenOptions {
            nats_url: bed.nats.url(),
            create_streams: false,
            mix: Mix::uniform(),
            count: Some(count),
            rate_per_s,
            run_id: Some(run_id.to_string()),
            publish_errors_max: errors_max.max(1),
            progress: false,
            ts_start_ms,
            ..LoadgenOptions::default()
        };
        Traffic {
            task: tokio::spawn(async move { loadgen::run(&opts).await }),
            count,
        }
    }

    /// Waits for the run to end; panics if it does not within [`TRAFFIC_TIMEOUT`].
    async fn finish(self) -> LoadgenSummary {
        match tokio::time::timeout(TRAFFIC_TIMEOUT, self.task).await {
            Ok(joined) => joined
                .expect("loadgen task panicked")
                .expect("loadgen runs"),
            Err(_) => panic!(
                "loadgen did not finish {} messages in {TRAFFIC_TIMEOUT:?}",
                self.count
            ),
        }
    }

    /// Waits for the run and checks every message was published once.
    async fn finish_clean(self) -> LoadgenSummary {
        let count = self.count;
        let summary = self.finish().await;
        assert!(summary.ok(), "loadgen failed: {summary}");
        assert_eq!(summary.published_total(), count, "{summary}");
        summary
    }
}

/// Messages the relay's three streams hold, or `None` while NATS does not answer.
async fn stream_messages(js: &jetstream::Context) -> Option<u64> {
    let mut total = 0;
    for (name, _) in STREAMS {
        let mut stream = js.get_stream(name).await.ok()?;
        total += stream.info().await.ok()?.state.messages;
    }
    Some(total)
}

/// Waits until the streams hold at least `n` messages.
async fn wait_published(js: &jetstream::Context, n: u64) {
    wait_until(
        &format!("{n} messages in JetStream"),
        PROGRESS_TIMEOUT,
        || async { stream_messages(js).await.is_some_and(|m| m >= n) },
    )
    .await;
}

/// Waits until the running relay process has counted `name` up to at least `n`.
async fn wait_metric(relay: &RelayProc, name: &str, n: f64) {
    let addr = relay.metrics_addr;
    wait_until(&format!("{name} >= {n}"), PROGRESS_TIMEOUT, || async move {
        match crate::harness::http_get(addr, "/metrics").await {
            Ok((200, body)) => crate::harness::metric_sum(&body, name, &[]) >= n,
            _ => false,
        }
    })
    .await;
}

/// The current value of a metric of the running relay (0 when it does not answer).
async fn metric(relay: &RelayProc, name: &str) -> f64 {
    match crate::harness::http_get(relay.metrics_addr, "/metrics").await {
        Ok((200, body)) => crate::harness::metric_sum(&body, name, &[]),
        _ => 0.0,
    }
}

/// Exact accounting of clean traffic: every identity the streams hold is stored once, none
/// lost, duplicated, dead-lettered or unexpected; `published` (from loadgen's acks) is a lower
/// bound of what the streams hold and equal to it when every publish was acked.
fn assert_exact(report: &VerifyReport, published: u64, exact: bool) {
    let t = report.totals();
    assert_eq!(t.lost, 0, "lost:\n{report}");
    assert_eq!(t.duplicated, 0, "duplicated:\n{report}");
    assert_eq!(t.dead_lettered, 0, "dead letters:\n{report}");
    assert_eq!(t.unexpected, 0, "unexpected rows:\n{report}");
    assert_eq!(report.unexpected_dead_letters, 0, "{report}");
    assert_eq!(report.unrouted.published, 0, "{report}");
    assert_eq!(t.stored + t.dead_lettered, t.published, "{report}");
    if exact {
        assert_eq!(t.published, published, "{report}");
    } else {
        assert!(t.published >= published, "{report}");
    }
}

/// Rows per insert of a restarted relay stay those of batches: live traffic alone fills about
/// a dozen rows per table and flush interval here, a recovered backlog far more. A lane that
/// inserted every record on its own after a crash (a re-cut that did not end) shows about one.
fn assert_batched(rows_per_insert: f64) {
    assert!(
        rows_per_insert >= ROWS_PER_INSERT_MIN,
        "the restarted relay inserts {rows_per_insert:.1} rows per batch"
    );
}

/// Stops the relay with SIGTERM, which it must exit cleanly on, and checks that the WAL it
/// leaves in `dir` has no damage anywhere.
async fn stop_with_intact_wal(relay: &mut RelayProc, dir: &std::path::Path) {
    assert!(relay.terminate().await.success(), "{}", relay.log());
    let wal = prism_wal::verify(dir).expect("verify the WAL");
    assert!(wal.is_ok(), "{wal:?}");
    assert!(
        wal.torn_tail.is_none(),
        "a clean stop leaves no torn tail: {wal:?}"
    );
}

/// Waits until the traffic's first rows are in ClickHouse, so that a fault lands mid-load.
async fn wait_rows_reach_clickhouse(bed: &Bed) {
    wait_until_sync("rows reach ClickHouse", PROGRESS_TIMEOUT, || {
        bed.count_all_tables() >= ROWS_BEFORE_FAULT
    })
    .await;
}

/// Ends a scenario whose traffic was all published and acked: waits for the traffic and the
/// drain, asserts the exact accounting and prints the scenario's line.
async fn account_clean_traffic(
    bed: &Bed,
    relay: &RelayProc,
    traffic: Traffic,
    scenario: &str,
    started: Instant,
) {
    account_clean_runs(bed, relay, &[], traffic, scenario, started).await;
}

/// [`account_clean_traffic`] for a scenario whose `earlier` runs finished before `traffic`.
async fn account_clean_runs(
    bed: &Bed,
    relay: &RelayProc,
    earlier: &[LoadgenSummary],
    traffic: Traffic,
    scenario: &str,
    started: Instant,
) {
    let summary = traffic.finish_clean().await;
    let published = earlier
        .iter()
        .chain([&summary])
        .map(LoadgenSummary::published_total)
        .sum();
    let (report, drained) = drain(bed, relay).await;
    assert_exact(&report, published, true);
    report_line(scenario, &report, drained, started.elapsed());
}

/// One line per scenario for the run's record.
fn report_line(scenario: &str, report: &VerifyReport, drain: Duration, total: Duration) {
    let t = report.totals();
    println!(
        "chaos: {scenario}: messages={} stored={} lost={} duplicated={} dead_lettered={} \
         drain_after_recovery_ms={} total_ms={}",
        t.published,
        t.stored,
        t.lost,
        t.duplicated,
        t.dead_lettered,
        drain.as_millis(),
        total.as_millis()
    );
}

/// Waits for the accounting to close (nothing lost) and returns it with the time it took;
/// panics with the last report and the relay's log after [`DRAIN_TIMEOUT`].
async fn drain(bed: &Bed, relay: &RelayProc) -> (VerifyReport, Duration) {
    let from = Instant::now();
    loop {
        let report = bed.verify().await;
        if report.totals().lost == 0 {
            return (report, from.elapsed());
        }
        if from.elapsed() >= DRAIN_TIMEOUT {
            let log = relay.log();
            let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL_LINES).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "not everything stored after {DRAIN_TIMEOUT:?}:\n{report}\nrelay log (tail):\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ends `traffic` and starts a second run of 2,000 messages, its timestamps past the first's
/// so that no identity repeats: traffic sure to arrive after a fault was met, however long a
/// slow machine took to meet it. Returns the first run, the relay's received count before the
/// second run started, and the second run.
async fn second_run(
    bed: &Bed,
    relay: &RelayProc,
    traffic: Traffic,
    run_id: &str,
    leg: Leg,
) -> (LoadgenSummary, f64, Traffic) {
    let first = traffic.finish_clean().await;
    let received = metric(relay, RECEIVED).await;
    let ts_start_ms = Some(first.ts_last_ms + 1_000);
    let second = Traffic::start_at(bed, run_id, 2_000, mid_load_rate_per_s(leg), 1, ts_start_ms);
    (first, received, second)
}

async fn clickhouse_killed_mid_load_and_restarted_on_its_data_loses_and_duplicates_nothing(
    leg: Leg,
) {
    let started = Instant::now();
    let mut bed = Bed::start_on(leg);
    let mut relay = RelayProc::spawn(&bed, "relay", &chaos_config(&bed));
    relay.wait_ready().await;
    let traffic = Traffic::start(&bed, "chaosch", 3_000, mid_load_rate_per_s(leg), 1);

    wait_rows_reach_clickhouse(&bed).await;
    bed.ch.kill9().expect("kill -9 clickhouse-server");
    // The outage lasts until the relay has met it and the WAL has absorbed more traffic.
    let (first, received, traffic) = second_run(&bed, &relay, traffic, "chaosch2", leg).await;
    wait_metric(&relay, INSERT_ERRORS, 1.0).await;
    wait_metric(&relay, RECEIVED, received + 500.0).await;
    tokio::task::block_in_place(|| bed.ch.restart()).expect("restart clickhouse-server");

    account_clean_runs(
        &bed,
        &relay,
        &[first],
        traffic,
        "clickhouse kill -9",
        started,
    )
    .await;
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

async fn clickhouse_frozen_past_the_insert_timeout_neither_hangs_the_relay_nor_duplicates_rows(
    leg: Leg,
) {
    let started = Instant::now();
    let bed = Bed::start_on(leg);
    let mut config = chaos_config(&bed);
    config.insert_timeout_ms = 1_000;
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    let traffic = Traffic::start(&bed, "chaosstop", 3_000, mid_load_rate_per_s(leg), 1);

    wait_rows_reach_clickhouse(&bed).await;
    bed.ch.pause().expect("SIGSTOP clickhouse-server");
    // Inserts must time out and be retried, twice per lane on average (so the freeze outlasts
    // the insert timeout and no lane hangs on the frozen server), and ingest must go on into
    // the WAL meanwhile.
    let errors = metric(&relay, INSERT_ERRORS).await;
    let (first, received, traffic) = second_run(&bed, &relay, traffic, "chaosstop2", leg).await;
    wait_metric(&relay, INSERT_ERRORS, errors + 16.0).await;
    wait_metric(&relay, RECEIVED, received + 500.0).await;
    let (status, _) = crate::harness::http_get(relay.metrics_addr, "/health")
        .await
        .expect("/health answers while ClickHouse is frozen");
    assert_eq!(status, 200, "/health while ClickHouse is frozen");
    bed.ch.resume().expect("SIGCONT clickhouse-server");

    account_clean_runs(
        &bed,
        &relay,
        &[first],
        traffic,
        "clickhouse SIGSTOP",
        started,
    )
    .await;
    let raw = bed.sql("SELECT count() FROM marketprism_hot.trades");
    let after_final = bed.count_final("trades");
    println!(
        "chaos: clickhouse SIGSTOP ({leg:?}): trades rows before FINAL {} after FINAL {after_final}",
        raw.trim(),
    );
    if leg == Leg::Modern {
        // Every insert that timed out was retried with its batch's token: the server dropped
        // the copies, so the table holds each row once without FINAL.
        assert_eq!(
            raw.trim(),
            after_final.to_string(),
            "rows stored twice without FINAL"
        );
    }
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_mid_load_and_restarted_on_its_store_loses_and_duplicates_nothing() {
    let started = Instant::now();
    let mut bed = Bed::start();
    let mut relay = RelayProc::spawn(&bed, "relay", &chaos_config(&bed));
    relay.wait_ready().await;
    let count = 3_000;
    // Publishes that meet the outage fail; whatever JetStream stored is accounted for.
    let traffic = Traffic::start(&bed, "chaosnats", count, 1_000, count);

    wait_metric(&relay, RECEIVED, 800.0).await;
    bed.nats.kill9().expect("kill -9 nats-server");
    tokio::task::block_in_place(|| bed.nats.restart()).expect("restart nats-server");

    let summary = traffic.finish().await;
    assert!(summary.aborted.is_none(), "{summary}");
    assert!(summary.published_total() > 0, "{summary}");
    let (report, drained) = drain(&bed, &relay).await;
    // The streams may hold messages whose publish ack the outage swallowed: verify reads
    // the streams, so those are accounted too.
    assert_exact(&report, summary.published_total(), false);
    report_line("nats kill -9", &report, drained, started.elapsed());
    println!(
        "chaos: nats kill -9: publish_errors={} acked={}",
        summary.publish_errors,
        summary.published_total()
    );
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_killed_three_times_mid_load_resumes_from_its_wal_without_loss_or_duplicates() {
    relay_killed_three_times("relay kill -9 x3", "chaosrelay", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ack_policy_all_a_restarted_relay_never_acks_deliveries_the_killed_one_did_not_write()
{
    relay_killed_three_times("relay kill -9 x3, ack all", "chaosackall", true).await;
}

/// Three kills during a load; with `ack_all`, every consumer acks with ack policy `all`, whose
/// one ack also covers deliveries the killed process never wrote (the fetcher must hold it back).
async fn relay_killed_three_times(scenario: &str, run_id: &str, ack_all: bool) {
    let started = Instant::now();
    let bed = Bed::start();
    let mut config = chaos_config(&bed);
    if ack_all {
        for consumer in &mut config.consumers {
            consumer.extra = "ack_policy = \"all\"".into();
        }
    }
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    let js = bed.js().await;
    let traffic = Traffic::start(&bed, run_id, 4_000, 1_000, 1);

    for (round, published) in [700, 1_700, 2_700].into_iter().enumerate() {
        wait_published(&js, published).await;
        // Kill only a relay that is busy: it has appended traffic since it started.
        wait_metric(&relay, RECEIVED, 100.0).await;
        relay.kill9();
        relay.restart();
        relay.wait_ready().await;
        let recoveries = relay.log().matches("WAL recovered").count();
        assert_eq!(recoveries, round + 2, "{}", relay.log());
    }

    account_clean_traffic(&bed, &relay, traffic, scenario, started).await;
    let rows_per_insert = metric(&relay, BATCH_ROWS).await / metric(&relay, BATCH_INSERTS).await;
    println!("chaos: {scenario}: rows per insert after the last restart {rows_per_insert:.1}");
    assert_batched(rows_per_insert);
    stop_with_intact_wal(&mut relay, &config.wal_dir).await;
}

/// How a test damages the end of the last WAL segment of a killed relay.
enum Tear {
    /// Bytes no record starts with.
    Garbage,
    /// A group of records whose write the crash interrupted: the first one whole, the second
    /// cut in the middle. Both are real messages the relay never acked.
    MidRecord,
}

/// Damages the tail of the WAL in `dir` as `tear` says; returns the bytes appended.
async fn tear_wal_tail(dir: &std::path::Path, js: &jetstream::Context, tear: Tear) -> u64 {
    let segments = prism_wal::list_segments(dir).expect("list WAL segments");
    let last = segments.last().expect("the WAL has a segment");
    let wal = prism_wal::verify(dir).expect("verify the WAL");
    // The kill may itself have cut a group write short (a torn tail already); the damage
    // below goes after it and is cut with it.
    assert!(
        wal.is_ok(),
        "no corruption before the tail is torn: {wal:?}"
    );
    let mut bytes = Vec::new();
    match tear {
        Tear::Garbage => {
            // A plausible length, then bytes whose CRC cannot match.
            bytes.extend_from_slice(&64u32.to_le_bytes());
            let mut x: u32 = 0x9E37_79B9;
            for _ in 0..700 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                bytes.push(x as u8);
            }
        }
        Tear::MidRecord => {
            let last_lsn = wal.last_lsn.expect("the WAL holds records");
            let (stream, seq) = {
                let mut reader = prism_wal::read_dir(dir, last_lsn).expect("read the WAL");
                let record = reader
                    .next()
                    .expect("read the last record")
                    .expect("the last record is there");
                let envelope = record.envelope().expect("decode the last record");
                (envelope.stream.to_string(), envelope.stream_seq.0)
            };
            let stream = js.get_stream(&stream).await.expect("stream");
            for (i, next) in [seq + 1, seq + 2].into_iter().enumerate() {
                // The traffic goes on while the relay is down: these messages come.
                let message = wait_for(
                    &format!("message {next} in JetStream"),
                    PROGRESS_TIMEOUT,
                    || async { stream.get_raw_message(next).await.ok() },
                )
                .await;
                let msg_id = message
                    .headers
                    .get("Nats-Msg-Id")
                    .map(|v| v.as_str().to_string());
                let envelope = Envelope {
                    stream: Cow::Borrowed(stream.cached_info().config.name.as_str()),
                    stream_seq: StreamSeq(next),
                    subject: Cow::Borrowed(message.subject.as_str()),
                    headers: msg_id
                        .iter()
                        .map(|id| (Cow::Borrowed("Nats-Msg-Id"), Cow::Borrowed(id.as_str())))
                        .collect(),
                    published_ns: (message.time.unix_timestamp_nanos()) as i64,
                    payload: Cow::Borrowed(&message.payload[..]),
                };
                let start = bytes.len();
                prism_wal::segment::encode_record(
                    &mut bytes,
                    Lsn(last_lsn.0 + 1 + i as u64),
                    &envelope,
                )
                .expect("encode a record");
                if i == 1 {
                    // Cut the second record in the middle of its body.
                    let cut = start
                        + prism_wal::segment::RECORD_HEADER_BYTES
                        + (bytes.len() - start - prism_wal::segment::RECORD_HEADER_BYTES) / 2;
                    bytes.truncate(cut);
                }
            }
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&last.path)
        .expect("open the last segment");
    std::io::Write::write_all(&mut file, &bytes).expect("append to the last segment");
    file.sync_all().expect("sync the last segment");
    let torn = prism_wal::verify(dir).expect("verify the torn WAL");
    assert!(
        torn.torn_tail.is_some(),
        "the damage reads as a torn tail: {torn:?}"
    );
    bytes.len() as u64
}

async fn torn_tail_scenario(name: &str, run_id: &str, tear: Tear) {
    let started = Instant::now();
    let bed = Bed::start();
    let config = chaos_config(&bed);
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    let js = bed.js().await;
    let traffic = Traffic::start(&bed, run_id, 2_500, 1_000, 1);

    wait_metric(&relay, RECEIVED, 800.0).await;
    relay.kill9();
    let appended = tear_wal_tail(&config.wal_dir, &js, tear).await;
    relay.restart();
    relay.wait_ready().await;
    let log = relay.log();
    assert!(
        log.contains("bytes_dropped"),
        "recovery reports the torn tail ({appended} bytes appended):\n{log}"
    );
    let after = prism_wal::verify(&config.wal_dir).expect("verify the recovered WAL");
    assert!(after.problems.is_empty(), "{after:?}");

    account_clean_traffic(&bed, &relay, traffic, name, started).await;
    stop_with_intact_wal(&mut relay, &config.wal_dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_last_wal_record_of_a_killed_relay_is_cut_at_recovery_and_nothing_is_lost(
) {
    torn_tail_scenario("torn tail (garbage)", "chaosgarbage", Tear::Garbage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_record_cut_mid_write_is_truncated_at_recovery_and_redelivered_by_jetstream() {
    torn_tail_scenario("torn tail (mid-record)", "chaostorn", Tear::MidRecord).await;
}

async fn the_relay_killed_while_clickhouse_is_down_recovers_when_both_come_back(leg: Leg) {
    let started = Instant::now();
    let mut bed = Bed::start_on(leg);
    let config = chaos_config(&bed);
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    let traffic = Traffic::start(&bed, "chaosboth", 3_000, mid_load_rate_per_s(leg), 1);

    wait_rows_reach_clickhouse(&bed).await;
    bed.ch.kill9().expect("kill -9 clickhouse-server");
    let (first, received, traffic) = second_run(&bed, &relay, traffic, "chaosboth2", leg).await;
    wait_metric(&relay, INSERT_ERRORS, 1.0).await;
    wait_metric(&relay, RECEIVED, received + 300.0).await;
    relay.kill9();
    // The relay comes back first: it recovers its WAL and ingests while ClickHouse is still
    // down (not ready, since it cannot check the schema).
    relay.restart();
    wait_metric(&relay, RECEIVED, 300.0).await;
    tokio::task::block_in_place(|| bed.ch.restart()).expect("restart clickhouse-server");
    relay.wait_ready().await;

    account_clean_runs(
        &bed,
        &relay,
        &[first],
        traffic,
        "relay kill -9 while clickhouse down",
        started,
    )
    .await;
    let rows_per_insert = metric(&relay, BATCH_ROWS).await / metric(&relay, BATCH_INSERTS).await;
    println!("chaos: combined: rows per insert after the restart {rows_per_insert:.1}");
    assert_batched(rows_per_insert);
    stop_with_intact_wal(&mut relay, &config.wal_dir).await;
}

async fn sigterm_while_clickhouse_is_frozen_exits_within_the_bound_and_the_restart_stores_everything_once(
    leg: Leg,
) {
    let started = Instant::now();
    let bed = Bed::start_on(leg);
    let mut config = chaos_config(&bed);
    config.insert_timeout_ms = 1_000;
    config.shutdown_timeout_ms = 3_000;
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    let traffic = Traffic::start(&bed, "chaosterm", 6_000, 1_000, 1);

    wait_rows_reach_clickhouse(&bed).await;
    let errors = metric(&relay, INSERT_ERRORS).await;
    bed.ch.pause().expect("SIGSTOP clickhouse-server");
    // A run published after the freeze gives the lanes rows to insert into the frozen server,
    // however much of the first run a loaded machine had stored before it.
    let (first, _, traffic) = second_run(&bed, &relay, traffic, "chaosterm2", leg).await;
    wait_metric(&relay, INSERT_ERRORS, errors + 8.0).await;
    // Every lane may be inside an insert to the frozen server: the stop must not wait on it
    // past the bound (plus the process's own start and exit).
    let bound = Duration::from_millis(config.shutdown_timeout_ms) + Duration::from_secs(2);
    let stopping = Instant::now();
    let status = relay.terminate_within(bound).await;
    let stop_ms = stopping.elapsed().as_millis();
    assert!(status.success(), "{status}: {}", relay.log());
    bed.ch.resume().expect("SIGCONT clickhouse-server");
    relay.restart();
    relay.wait_ready().await;

    account_clean_runs(
        &bed,
        &relay,
        &[first],
        traffic,
        "SIGTERM while clickhouse frozen",
        started,
    )
    .await;
    println!("chaos: SIGTERM while clickhouse frozen: stop took {stop_ms} ms");
    stop_with_intact_wal(&mut relay, &config.wal_dir).await;
}

async fn the_relay_killed_before_ready_and_during_its_backlog_drain_with_segments_freed_at_once_loses_nothing(
    leg: Leg,
) {
    let started = Instant::now();
    let mut bed = Bed::start_on(leg);
    let mut config = chaos_config(&bed);
    // Segments of the smallest size, freed as soon as every lane is past them: kills land
    // around rollovers and deletions, and a recovery that needed a freed record would fail.
    config.segment_bytes_max = 65_536;
    config.retention_bytes_max = 0;
    config.retention_segments_max = 0;
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    let traffic = Traffic::start(&bed, "chaosbacklog", 5_000, 1_000, 1);

    wait_rows_reach_clickhouse(&bed).await;
    bed.ch.kill9().expect("kill -9 clickhouse-server");
    wait_metric(&relay, RECEIVED, 1_200.0).await;
    // Twice killed before it is ready (ClickHouse is down, so the drain waits), each time
    // after it has ingested more into the WAL. Each restarted relay gets a run of its own,
    // published once it is up: a slow machine can use up a run started earlier before the
    // restart, and the relay would then wait for messages that never come.
    let mut earlier = vec![traffic.finish_clean().await];
    let mut traffic: Option<Traffic> = None;
    for round in 0..2 {
        relay.kill9();
        relay.restart();
        if let Some(run) = traffic.take() {
            earlier.push(run.finish_clean().await);
        }
        let ts_start_ms = earlier.last().map(|run| run.ts_last_ms + 1_000);
        let run_id = format!("chaosbacklog{}", round + 2);
        traffic = Some(Traffic::start_at(
            &bed,
            &run_id,
            1_000,
            1_000,
            1,
            ts_start_ms,
        ));
        wait_metric(&relay, RECEIVED, 100.0).await;
    }
    let traffic = traffic.expect("the second restart's run");
    relay.kill9();
    tokio::task::block_in_place(|| bed.ch.restart()).expect("restart clickhouse-server");
    relay.restart();
    relay.wait_ready().await;
    // Killed three times while it drains the backlog, each time after more rows went in, or
    // once every message the streams hold is stored: a fast machine drains the whole backlog
    // between two kills, and the later kills then land on a relay that is caught up.
    let js = bed.js().await;
    for _ in 0..3 {
        let stored = bed.count_all_tables();
        let published = stream_messages(&js).await.unwrap_or(u64::MAX);
        wait_until_sync("the backlog drains", PROGRESS_TIMEOUT, || {
            let now = bed.count_all_tables();
            now >= stored + 150 || now >= published
        })
        .await;
        relay.kill9();
        relay.restart();
        relay.wait_ready().await;
    }

    account_clean_runs(
        &bed,
        &relay,
        &earlier,
        traffic,
        "relay kill -9 x5 around a backlog",
        started,
    )
    .await;
    stop_with_intact_wal(&mut relay, &config.wal_dir).await;
}

/// How long each freeze of NATS lasts: past a pull's deadline (the chaos consumers'
/// `fetch_expires_ms` of 250 ms plus the fetcher's 2,000 ms margin), so the relay abandons the
/// pulls it has outstanding and the server delivers their messages after the thaw, to no one.
/// A freeze is a duration by nature: no condition of the relay ends it.
const NATS_FREEZE_MS: u64 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ack_policy_all_nats_frozen_around_acks_and_pulls_three_times_loses_and_duplicates_nothing(
) {
    let started = Instant::now();
    let bed = Bed::start();
    let mut config = chaos_config(&bed);
    for consumer in &mut config.consumers {
        consumer.extra = "ack_policy = \"all\"".into();
        // Small pulls: many acks and pulls are in flight when a freeze lands, and an ack-all
        // after the thaw has abandoned deliveries below it to wrongly cover.
        consumer.fetch_batch = 20;
    }
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;
    let count = 3_000;
    // Publishes that meet a freeze may time out; verify reads the streams, so whatever JetStream
    // stored is accounted for.
    let traffic = Traffic::start(&bed, "chaosfreeze", count, 1_000, count);

    for appended in [300.0, 1_000.0, 1_700.0] {
        wait_metric(&relay, RECEIVED, appended).await;
        bed.nats.pause().expect("SIGSTOP nats-server");
        tokio::time::sleep(Duration::from_millis(NATS_FREEZE_MS)).await;
        bed.nats.resume().expect("SIGCONT nats-server");
    }

    let summary = traffic.finish().await;
    assert!(summary.aborted.is_none(), "{summary}");
    assert!(summary.published_total() > 0, "{summary}");
    // A delivery an ack-all covered without it being in the WAL is never redelivered: it shows
    // as lost here, and the drain never completes.
    let (report, drained) = drain(&bed, &relay).await;
    assert_exact(&report, summary.published_total(), false);
    // Every delivery, the abandoned pulls' included, ends written and acknowledged.
    for consumer in &config.consumers {
        wait_until(
            &format!("consumer {} has nothing pending", consumer.durable),
            PROGRESS_TIMEOUT,
            || async {
                let info = bed.consumer_info(&consumer.stream, &consumer.durable).await;
                info.num_ack_pending == 0 && info.num_pending == 0
            },
        )
        .await;
    }
    report_line(
        "nats SIGSTOP x3, ack all",
        &report,
        drained,
        started.elapsed(),
    );
    stop_with_intact_wal(&mut relay, &config.wal_dir).await;
}

/// Passthrough messages of the kill scenario.
const PASSTHROUGH_MESSAGES: u64 = 3_000;

/// Passthrough messages published between two pauses of the publisher, which spread the
/// publishing over a second or two so that the relay is killed while messages still arrive.
const PASSTHROUGH_BURST: u64 = 100;

/// Pause between two bursts of the passthrough publisher.
const PASSTHROUGH_PACE_MS: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_route_killed_mid_stream_stores_every_message_once_by_its_identity() {
    let bed = Bed::start();
    let mut config = chaos_config(&bed);
    config.streams.push(crate::harness::StreamDef {
        name: "MARKET_TICKERS".into(),
        subjects: vec!["ticker.>".into()],
    });
    let mut consumer = crate::harness::ConsumerDef::new("MARKET_TICKERS", "prism-relay-tickers");
    consumer.ack_wait_ms = ACK_WAIT_MS;
    config.consumers.push(consumer);
    config.extra = format!(
        "[[drain.passthrough]]\ndata_type = \"ticker\"\ntable = \"tickers\"\n\n\
         [drain.tables.tickers]\nrows_max = {ROWS_MAX}\nflush_interval_ms = 100\n"
    );
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    // Every payload also carries a `nats_seq` of its own: the relay's identity must win.
    let js = bed.js().await;
    let publisher = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_millis(PASSTHROUGH_PACE_MS));
        let mut sequences = Vec::new();
        for n in 1..=PASSTHROUGH_MESSAGES {
            if n % PASSTHROUGH_BURST == 1 {
                pace.tick().await;
            }
            let payload = format!(
                r#"{{"exchange":"okx","market_type":"spot","symbol":"BTC-USDT","last":"112345.6","n":{n},"nats_seq":0}}"#
            );
            let (stream, seq) =
                crate::harness::publish_raw(&js, "ticker.okx.spot.BTC-USDT", payload).await;
            assert_eq!(stream, "MARKET_TICKERS");
            sequences.push(seq);
        }
        sequences
    });

    let count_final = |bed: &Bed| bed.count_final("tickers");
    wait_until_sync(
        "passthrough rows reach ClickHouse",
        PROGRESS_TIMEOUT,
        || count_final(&bed) >= ROWS_BEFORE_FAULT,
    )
    .await;
    relay.kill9();
    relay.restart();
    relay.wait_ready().await;

    let sequences = tokio::time::timeout(TRAFFIC_TIMEOUT, publisher)
        .await
        .expect("the publisher finishes")
        .expect("the publisher does not panic");
    assert_eq!(sequences, (1..=PASSTHROUGH_MESSAGES).collect::<Vec<_>>());
    wait_until_sync(
        "every passthrough message in ClickHouse",
        DRAIN_TIMEOUT + Duration::from_millis(ACK_WAIT_MS),
        || count_final(&bed) >= PASSTHROUGH_MESSAGES,
    )
    .await;

    // Under FINAL every identity is there exactly once, each row with its own payload.
    let rows = bed.rows(
        "SELECT count(), uniqExact(nats_stream, nats_seq), min(nats_seq), max(nats_seq), \
         countIf(nats_stream = 'MARKET_TICKERS'), \
         countIf(visitParamExtractUInt(payload, 'n') = nats_seq) \
         FROM marketprism_hot.tickers FINAL",
    );
    let n = PASSTHROUGH_MESSAGES.to_string();
    assert_eq!(
        rows,
        vec![vec![
            n.clone(),
            n.clone(),
            "1".into(),
            n.clone(),
            n.clone(),
            n
        ]],
        "{}",
        relay.log()
    );
    assert_eq!(bed.count_dead_letters(), 0, "{}", relay.log());
    println!(
        "chaos: passthrough relay kill -9: {PASSTHROUGH_MESSAGES} messages, stored rows before FINAL {}",
        bed.sql("SELECT count() FROM marketprism_hot.tickers").trim()
    );
    stop_with_intact_wal(&mut relay, &config.wal_dir).await;
}

// The scenarios that fault ClickHouse run once per leg: `chaos::legacy::<name>` against
// clickhouse-server 18.16, `chaos::modern::<name>` against the modern engine.
crate::on_both_legs!(
    clickhouse_killed_mid_load_and_restarted_on_its_data_loses_and_duplicates_nothing,
    clickhouse_frozen_past_the_insert_timeout_neither_hangs_the_relay_nor_duplicates_rows,
    the_relay_killed_while_clickhouse_is_down_recovers_when_both_come_back,
    sigterm_while_clickhouse_is_frozen_exits_within_the_bound_and_the_restart_stores_everything_once,
    the_relay_killed_before_ready_and_during_its_backlog_drain_with_segments_freed_at_once_loses_nothing,
);
