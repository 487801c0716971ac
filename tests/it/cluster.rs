//! Scale-out on a replicated ClickHouse: two `clickhouse-server` 18.16 replicas of one shard,
//! coordinated by ZooKeeper from Debian's `zookeeper` package, with the schema of the cluster
//! layout (`schema apply --profile cluster`). The relay inserts into one replica; the tests show
//! that every row reaches both replicas and the `Distributed` tables, that a byte-identical
//! batch inserted twice within one second is stored once on every replica without FINAL
//! (replicated block deduplication) and a copy sent in a later second collapses under FINAL,
//! and that a replica killed with SIGKILL under load catches up after its
//! restart so both replicas end equal, and that while ZooKeeper is down (replicated tables
//! refuse inserts) the relay keeps acking into its WAL, reports not-ready, and delivers
//! everything once ZooKeeper is back.

use std::time::{Duration, Instant};

use prism_relay::codec::rows::TradeRow;
use prism_relay::sink::{Sink, SinkOptions};
use prism_relay::tools::gen::Mix;
use prism_relay::tools::loadgen::{self, LoadgenOptions};
use prism_relay::tools::verify::VerifyReport;
use prism_testbed::{ClickHouse, ClickHouseOptions, Nats, Replication, ZooKeeper};

use crate::harness::ChServer;
use crate::harness::{
    http_get, relay_command, Bed, Load, RelayProc, DATABASE, DRAIN_TIMEOUT, STREAMS, TABLES,
};

/// The cluster's name in both replicas' `<remote_servers>`.
const CLUSTER: &str = "prism";

/// How long replication may take to bring the second replica level with the first: it fetches
/// every part over the interserver port, after a restart it first waits for its old ZooKeeper
/// session to expire (6 s in the test bed).
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(90);

/// Pause between two polls of the replicas' contents.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// ZooKeeper, two ClickHouse replicas of one shard, NATS; `bed.ch` is replica 1.
struct ClusterBed {
    bed: Bed,
    replica2: ClickHouse,
    /// Coordinates the replicas.
    zookeeper: ZooKeeper,
}

impl ClusterBed {
    fn start() -> ClusterBed {
        let zookeeper = ZooKeeper::start().expect("start ZooKeeper");
        let replica = |name: &str| {
            ClickHouse::start_with(&ClickHouseOptions {
                replication: Some(Replication {
                    zookeeper_port: zookeeper.port(),
                    shard: "01".into(),
                    replica: name.into(),
                }),
                ..ClickHouseOptions::default()
            })
            .expect("start a ClickHouse replica")
        };
        let replica1 = replica("replica1");
        let replica2 = replica("replica2");
        let ports = [replica1.tcp_port(), replica2.tcp_port()];
        for server in [&replica1, &replica2] {
            server
                .set_cluster(CLUSTER, &ports)
                .expect("cluster defined");
        }
        let dir = tempfile::Builder::new()
            .prefix("prism-cluster-")
            .tempdir()
            .expect("temporary directory");
        let nats = Nats::start().expect("start nats-server");
        ClusterBed {
            bed: Bed {
                nats,
                ch: ChServer::Legacy(replica1),
                dir,
            },
            replica2,
            zookeeper,
        }
    }

    fn replicas(&self) -> [&ClickHouse; 2] {
        [self.bed.ch.legacy(), &self.replica2]
    }

    /// The relay's configuration for replica 1 with `[clickhouse] cluster` (and replica 2 as
    /// the replica `check` also verifies), written to the bed's directory.
    fn cluster_config_path(&self) -> String {
        let mut config = self.bed.config();
        config.create_schema = false;
        let toml = config.to_toml().replacen(
            "[clickhouse]\n",
            &format!(
                "[clickhouse]\ncluster = \"{CLUSTER}\"\nreplica_urls = [\"{}\"]\n",
                self.replica2.http_url()
            ),
            1,
        );
        let path = self.bed.path("cluster.toml");
        std::fs::write(&path, toml).expect("write the cluster configuration");
        path.display().to_string()
    }

    /// Runs `prism-relay schema apply --profile cluster` and asserts it succeeds.
    async fn apply_schema(&self) {
        let config = self.cluster_config_path();
        let (status, output) = relay_command(&[
            "schema",
            "apply",
            "--profile",
            "cluster",
            "--config",
            &config,
        ])
        .await;
        assert!(status.success(), "schema apply failed: {output}");
        assert!(
            output.contains(&format!("on cluster {CLUSTER}")),
            "{output}"
        );
    }
}

fn query(server: &ClickHouse, sql: &str) -> String {
    match server.query(sql) {
        Ok(body) => body.trim().to_owned(),
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// Every table's name and engine in the relay's database on `server`, sorted.
fn engines(server: &ClickHouse) -> Vec<String> {
    query(
        server,
        &format!(
            "SELECT name, engine FROM system.tables WHERE database = '{DATABASE}' ORDER BY name"
        ),
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Per typed table: the row count without FINAL, the count of distinct identities, and a
/// checksum of the identities, in one line; equal lines mean equal contents.
fn contents(server: &ClickHouse, suffix: &str) -> String {
    TABLES
        .iter()
        .map(|table| {
            query(
                server,
                &format!(
                    "SELECT '{table}', count(), uniqExact(nats_stream, nats_seq), \
                     sum(cityHash64(nats_stream, nats_seq)) FROM {DATABASE}.{table}{suffix}"
                ),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Rows in every typed table of `server`, without FINAL.
fn total_rows(server: &ClickHouse) -> u64 {
    TABLES
        .iter()
        .map(|table| {
            query(server, &format!("SELECT count() FROM {DATABASE}.{table}"))
                .parse::<u64>()
                .expect("a count")
        })
        .sum()
}

/// Polls until `replica` holds what `reference` holds (the same counts and identity checksums
/// in every table), and returns those contents.
async fn wait_equal(reference: &ClickHouse, replica: &ClickHouse) -> String {
    let deadline = Instant::now() + REPLICATION_TIMEOUT;
    loop {
        let expected = contents(reference, "");
        let actual = replica
            .query("SELECT 1")
            .ok()
            .map(|_| contents(replica, ""));
        if actual.as_deref() == Some(expected.as_str()) {
            return expected;
        }
        if Instant::now() >= deadline {
            panic!(
                "replicas differ after {REPLICATION_TIMEOUT:?}:\nreference:\n{expected}\nreplica:\n{}",
                actual.unwrap_or_else(|| "unreachable".into())
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Asserts that no identity is stored twice in `contents` (count equals distinct identities).
fn assert_no_duplicates(contents: &str) {
    for line in contents.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(
            fields[1], fields[2],
            "duplicated rows without FINAL: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_apply_with_the_cluster_profile_creates_replicated_and_distributed_tables_on_both_replicas(
) {
    let cluster = ClusterBed::start();
    cluster.apply_schema().await;
    for server in cluster.replicas() {
        let engines = engines(server);
        let mut expected: Vec<String> = TABLES
            .iter()
            .chain(&["dead_letters"])
            .flat_map(|table| {
                [
                    format!("{table}\tReplicatedReplacingMergeTree"),
                    format!("{table}_all\tDistributed"),
                ]
            })
            .collect();
        expected.sort();
        assert_eq!(engines, expected, "on {}", server.http_url());
    }
    // Applying again changes nothing and succeeds (IF NOT EXISTS on every server).
    cluster.apply_schema().await;

    // `check` also wants the consumers' streams, with the limits of the configuration (the
    // relay's defaults), or it reports their drift.
    let js = cluster.bed.js().await;
    let defaults = prism_relay::config::StreamConfig::default();
    for (name, subjects) in STREAMS {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            max_age: std::time::Duration::from_secs(defaults.max_age_s),
            max_bytes: defaults.max_bytes,
            max_messages: defaults.max_msgs,
            ..Default::default()
        })
        .await
        .expect("stream created");
    }
    let config = cluster.cluster_config_path();
    let (status, output) = relay_command(&["check", "--config", &config]).await;
    assert!(status.success(), "check failed: {output}");
    assert!(
        output.contains(&format!(
            "clickhouse replica {}: ok (cluster {CLUSTER})",
            cluster.replica2.http_url()
        )),
        "{output}"
    );

    // A Distributed table missing on the second replica is found there, and only there.
    query(
        &cluster.replica2,
        &format!("DROP TABLE {DATABASE}.trades_all"),
    );
    let (status, output) = relay_command(&["check", "--config", &config]).await;
    assert!(
        !status.success(),
        "check passed without trades_all: {output}"
    );
    let problems: Vec<&str> = output.lines().filter(|l| l.contains("schema:")).collect();
    assert_eq!(
        problems,
        [format!(
            "clickhouse replica {}: schema: table `trades_all` is missing, not a Distributed table over the cluster: run `prism-relay schema apply --profile cluster` to create it",
            cluster.replica2.http_url()
        )],
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_apply_adds_a_missing_column_on_every_replica_and_to_the_distributed_tables() {
    let cluster = ClusterBed::start();
    cluster.apply_schema().await;
    // The dead-letter table as an older relay created it, without `wal_lsn`: dropped from
    // the replicated table on every server, and from each server's Distributed table (each
    // has its own, which ClickHouse does not alter ON CLUSTER over replicated shards).
    query(
        cluster.bed.ch.legacy(),
        &format!("ALTER TABLE {DATABASE}.dead_letters ON CLUSTER {CLUSTER} DROP COLUMN wal_lsn"),
    );
    for server in cluster.replicas() {
        query(
            server,
            &format!("ALTER TABLE {DATABASE}.dead_letters_all DROP COLUMN wal_lsn"),
        );
    }
    let has_column = |server: &ClickHouse, table: &str| {
        query(
            server,
            &format!(
                "SELECT count() FROM system.columns WHERE database = '{DATABASE}' \
                 AND table = '{table}' AND name = 'wal_lsn'"
            ),
        ) == "1"
    };
    let missing = || {
        let mut missing = Vec::new();
        for server in cluster.replicas() {
            for table in ["dead_letters", "dead_letters_all"] {
                if !has_column(server, table) {
                    missing.push(format!("{table} on {}", server.http_url()));
                }
            }
        }
        missing
    };
    // The drop may reach the second replica a moment later (replication of the ALTER).
    let deadline = Instant::now() + REPLICATION_TIMEOUT;
    while missing().len() < 4 {
        assert!(
            Instant::now() < deadline,
            "wal_lsn not dropped everywhere: {:?}",
            missing()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }

    cluster.apply_schema().await;
    let deadline = Instant::now() + REPLICATION_TIMEOUT;
    while !missing().is_empty() {
        assert!(
            Instant::now() < deadline,
            "schema apply left wal_lsn missing from {:?}",
            missing()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Asserts the exact accounting of a finished run on replica 1 (what verify reads): every
/// published identity stored, none lost, none duplicated under FINAL.
fn assert_exact(report: &VerifyReport, published: u64) {
    let totals = report.totals();
    assert_eq!(totals.published, published, "{report}");
    assert_eq!(totals.stored, published, "{report}");
    assert_eq!(totals.lost, 0, "{report}");
    assert_eq!(totals.duplicated, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_the_relay_inserts_into_one_replica_reaches_both_replicas_and_the_distributed_tables(
) {
    const MESSAGES: u64 = 2_000;
    let cluster = ClusterBed::start();
    cluster.apply_schema().await;
    let mut config = cluster.bed.config();
    config.create_schema = false;
    let mut relay = RelayProc::spawn_ready(&cluster.bed, "relay", &config).await;

    let summary = cluster.bed.publish(Load::new("cluster", MESSAGES)).await;
    let report = cluster.bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert_exact(&report, summary.published_total());

    let replicated = wait_equal(cluster.bed.ch.legacy(), &cluster.replica2).await;
    assert_no_duplicates(&replicated);
    assert_eq!(total_rows(&cluster.replica2), MESSAGES);
    // The Distributed tables read the same rows from either replica.
    for server in cluster.replicas() {
        assert_eq!(
            contents(server, "_all"),
            replicated,
            "on {}",
            server.http_url()
        );
    }
    println!(
        "cluster: replicated messages={MESSAGES} replica1_rows={} replica2_rows={}",
        total_rows(cluster.bed.ch.legacy()),
        total_rows(&cluster.replica2)
    );
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

/// Trade rows of one batch, as the codec makes them: `count` trades from sequence `first` on, so
/// batches of different `first` share no identity.
fn trade_batch(first: u64, count: u64) -> Vec<TradeRow> {
    (first..first + count)
        .map(|seq| TradeRow {
            timestamp: 1_764_547_200_000 + seq as i64,
            exchange: "binance_spot".into(),
            market_type: "spot".into(),
            symbol: "BTC-USDT".into(),
            trade_id: format!("t{seq}"),
            price: 9_000_000_000_000 + seq as i64,
            quantity: 100_000_000,
            side: "buy".into(),
            is_maker: seq % 2 == 0,
            trade_time: 1_764_547_200_000 + seq as i64,
            data_source: "marketprism".into(),
            nats_stream: "MARKET_TRADES".into(),
            nats_seq: seq + 1,
        })
        .collect()
}

/// Rows of one batch, the count of the relay's inserts.
const BATCH_ROWS: u64 = 1_000;

/// Blocks `server` dropped as a duplicate of one its shard had already stored.
fn duplicated_blocks(server: &ClickHouse) -> u64 {
    query(
        server,
        "SELECT sum(value) FROM system.events WHERE event = 'DuplicatedInsertedBlocks'",
    )
    .parse()
    .expect("a count")
}

/// The wall clock, the clock the test's servers share, as time since the epoch.
fn since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970")
}

/// Sleeps until just past the wall clock's next whole second.
async fn next_second() {
    let into = Duration::from_nanos(u64::from(since_epoch().subsec_nanos()));
    tokio::time::sleep(Duration::from_secs(1) - into + Duration::from_millis(5)).await;
}

/// Inserts `batch` into `trades` as the relay does, token included (which 18.16 ignores).
async fn insert(sink: &Sink, batch: &[TradeRow]) {
    sink.insert("trades", batch, Some("lsn-1-1000"))
        .await
        .expect("insert");
}

/// Polls until every replica holds the batch from `first` as `rows` rows without FINAL and
/// [`BATCH_ROWS`] distinct trades, and `BATCH_ROWS` rows with FINAL.
async fn wait_batch_on_every_replica(cluster: &ClusterBed, first: u64, rows: u64) {
    let filter = format!("nats_seq BETWEEN {} AND {}", first + 1, first + BATCH_ROWS);
    let sql = format!(
        "SELECT (SELECT count() FROM {DATABASE}.trades WHERE {filter}), \
         (SELECT uniqExact(trade_id) FROM {DATABASE}.trades WHERE {filter}), \
         (SELECT count() FROM {DATABASE}.trades FINAL WHERE {filter})"
    );
    let expected = format!("{rows}\t{BATCH_ROWS}\t{BATCH_ROWS}");
    for server in cluster.replicas() {
        let deadline = Instant::now() + REPLICATION_TIMEOUT;
        loop {
            let stored = query(server, &sql);
            if stored == expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "on {}: {stored} (count, distinct trades, count with FINAL), not {expected}",
                server.http_url()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Re-sending a byte-identical batch, as a retry or a re-cut after a crash does: 18.16 has no
/// deduplication token, and the block its replicated tables hash holds `created_at`, which the
/// server fills with the insert's second. So the shard drops the copy, on every replica and
/// without FINAL, when it arrives within the same second as the first; a copy sent in a later
/// second is a block of its own, stored, and collapses under FINAL (ReplacingMergeTree).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_inserted_twice_lands_once_without_final_within_a_second_and_once_with_final_later()
{
    /// Tries at two inserts within one second: a loaded machine may stretch a pair past it.
    const SAME_SECOND_TRIES: u64 = 5;
    let cluster = ClusterBed::start();
    cluster.apply_schema().await;
    let replica1 = cluster.bed.ch.legacy();
    let sink = Sink::new(SinkOptions {
        url: cluster.bed.ch.http_url(),
        database: DATABASE.to_owned(),
        insert_timeout_ms: 5_000,
        connect_timeout_ms: 1_000,
        modern: false,
        ..SinkOptions::default()
    })
    .expect("valid sink options");

    // Within one second: the copy is dropped. A pair that spans a second boundary proves
    // nothing and is left behind; the next try uses other trades.
    let mut deduplicated = None;
    for try_no in 0..SAME_SECOND_TRIES {
        let first = try_no * BATCH_ROWS;
        let batch = trade_batch(first, BATCH_ROWS);
        next_second().await;
        let dropped_before = duplicated_blocks(replica1);
        let second = since_epoch().as_secs();
        insert(&sink, &batch).await;
        insert(&sink, &batch).await;
        if since_epoch().as_secs() == second {
            assert_eq!(
                duplicated_blocks(replica1),
                dropped_before + 1,
                "the copy sent within the same second was not dropped as a duplicate"
            );
            deduplicated = Some(first);
            break;
        }
        println!("cluster: try {try_no}: the two inserts spanned a second boundary");
    }
    let first = deduplicated.unwrap_or_else(|| {
        panic!("no two inserts of {BATCH_ROWS} rows fit within one second in {SAME_SECOND_TRIES} tries")
    });
    wait_batch_on_every_replica(&cluster, first, BATCH_ROWS).await;

    // In a later second: the copy is stored, and FINAL collapses it.
    let first = SAME_SECOND_TRIES * BATCH_ROWS;
    let batch = trade_batch(first, BATCH_ROWS);
    let dropped_before = duplicated_blocks(replica1);
    insert(&sink, &batch).await;
    next_second().await;
    insert(&sink, &batch).await;
    assert_eq!(
        duplicated_blocks(replica1),
        dropped_before,
        "a copy sent in a later second was dropped: the block no longer holds the insert's second"
    );
    wait_batch_on_every_replica(&cluster, first, 2 * BATCH_ROWS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_catches_up_after_its_restart_and_both_replicas_end_equal() {
    // Traffic before the kill (it is usually still flowing when replica 2 dies) and traffic
    // published after it, which the relay can store nowhere but replica 1: no assertion
    // depends on how far the relay got when the kill lands.
    const BEFORE: u64 = 1_500;
    const DURING: u64 = 2_000;
    const MESSAGES: u64 = BEFORE + DURING;
    let started = Instant::now();
    let mut cluster = ClusterBed::start();
    cluster.apply_schema().await;
    let mut config = cluster.bed.config();
    config.create_schema = false;
    let mut relay = RelayProc::spawn_ready(&cluster.bed, "relay", &config).await;

    let before = spawn_load(&cluster.bed, BEFORE, "replicakill1", None);
    // Kill replica 2 once rows flow (so the kill usually lands mid-load).
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while total_rows(cluster.bed.ch.legacy()) < BEFORE / 10 {
        assert!(Instant::now() < deadline, "no rows reached replica 1");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    cluster.replica2.kill9().expect("kill -9 replica 2");
    let rows_at_kill = total_rows(cluster.bed.ch.legacy());
    // One generator at a time: two running together may give two messages of one symbol the
    // same timestamp, and a ReplacingMergeTree key would rightly collapse them.
    let first = finish_load(before, BEFORE).await;
    let during = spawn_load(&cluster.bed, DURING, "replicakill2", Some(&first));
    finish_load(during, DURING).await;
    // Everything is stored while replica 2 is still down: the relay kept inserting into
    // replica 1.
    let report = cluster.bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert_exact(&report, MESSAGES);
    let rows_while_down = total_rows(cluster.bed.ch.legacy()) - rows_at_kill;
    assert!(
        rows_while_down >= DURING,
        "replica 1 took {rows_while_down} rows while replica 2 was down, fewer than the \
         {DURING} published after the kill"
    );
    assert!(
        cluster.replica2.pid().is_none(),
        "replica 2 came back by itself"
    );

    let restarted = Instant::now();
    tokio::task::block_in_place(|| cluster.replica2.restart()).expect("restart replica 2");
    let replicated = wait_equal(cluster.bed.ch.legacy(), &cluster.replica2).await;
    assert_no_duplicates(&replicated);
    assert_eq!(total_rows(&cluster.replica2), MESSAGES);
    println!(
        "cluster: clickhouse replica kill -9: messages={MESSAGES} stored={} lost=0 duplicated=0 \
         rows_while_replica_down={rows_while_down} replicas_equal=yes catch_up_ms={} total_ms={}",
        report.totals().stored,
        restarted.elapsed().as_millis(),
        started.elapsed().as_millis()
    );
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

/// Starts loadgen publishing `count` messages of every type at 1,000 msg/s into the bed's
/// streams, identities marked with `run_id`. `after` is the run before it, if any: this one's
/// timestamps start past that one's last (a run that fell behind its pace catches up in bursts,
/// and its timestamps then run ahead of the clock; a later run reusing one would give a
/// message the key of an earlier one, which the table rightly collapses).
fn spawn_load(
    bed: &Bed,
    count: u64,
    run_id: &str,
    after: Option<&loadgen::LoadgenSummary>,
) -> tokio::task::JoinHandle<Result<loadgen::LoadgenSummary, prism_relay::tools::ToolError>> {
    const RATE_PER_S: u64 = 1_000;
    let options = LoadgenOptions {
        nats_url: bed.nats.url(),
        create_streams: false,
        mix: Mix::uniform(),
        count: Some(count),
        rate_per_s: RATE_PER_S,
        run_id: Some(run_id.into()),
        progress: false,
        ts_start_ms: after
            .map(|before| (since_epoch().as_millis() as i64).max(before.ts_last_ms + 1)),
        ..LoadgenOptions::default()
    };
    tokio::spawn(async move { loadgen::run(&options).await })
}

/// Waits for a loadgen run, asserts it published all `count` messages, and returns its summary.
async fn finish_load(
    traffic: tokio::task::JoinHandle<
        Result<loadgen::LoadgenSummary, prism_relay::tools::ToolError>,
    >,
    count: u64,
) -> loadgen::LoadgenSummary {
    let summary = traffic.await.expect("loadgen task").expect("loadgen runs");
    assert!(summary.ok(), "loadgen failed: {summary}");
    assert_eq!(summary.published_total(), count, "{summary}");
    summary
}

/// Polls the relay's `/ready` until `want(status, body)` holds; returns the body.
async fn wait_ready_answer(relay: &RelayProc, want: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + REPLICATION_TIMEOUT;
    loop {
        let answer = http_get(relay.metrics_addr, "/ready").await;
        if let Ok((status, body)) = &answer {
            if want(*status, body) {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "/ready still answers {answer:?} after {REPLICATION_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_zookeeper_is_killed_the_relay_buffers_in_its_wal_reports_not_ready_and_delivers_everything_after_it_returns(
) {
    // Traffic stored before the kill, and traffic published only after it: none of the second
    // can reach the read-only tables, whatever the relay's pace.
    const BEFORE: u64 = 1_000;
    const DURING: u64 = 2_000;
    const MESSAGES: u64 = BEFORE + DURING;
    let started = Instant::now();
    let mut cluster = ClusterBed::start();
    cluster.apply_schema().await;
    let mut config = cluster.bed.config();
    config.create_schema = false;
    config.ready_insert_failing_s = Some(1);
    let relay = RelayProc::spawn_ready(&cluster.bed, "relay", &config).await;

    let first = finish_load(
        spawn_load(&cluster.bed, BEFORE, "zookeeperkill1", None),
        BEFORE,
    )
    .await;
    assert_exact(&cluster.bed.wait_accounted(DRAIN_TIMEOUT).await, BEFORE);
    cluster.zookeeper.kill9().expect("kill -9 ZooKeeper");
    let during = spawn_load(&cluster.bed, DURING, "zookeeperkill2", Some(&first));

    // The replicated tables refuse inserts: the relay's lanes fail with a retryable error and
    // /ready says so, naming the class.
    let not_ready = wait_ready_answer(&relay, |status, body| {
        status == 503 && body.contains("retryable")
    })
    .await;
    finish_load(during, DURING).await;
    // Every message is acked (so in the WAL after its fsync) while ClickHouse lacks them.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    for consumer in &config.consumers {
        loop {
            let info = cluster
                .bed
                .consumer_info(&consumer.stream, &consumer.durable)
                .await;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} not all acked while ZooKeeper is down: {info:?}",
                consumer.durable
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
    let rows_in_outage = total_rows(cluster.bed.ch.legacy());
    assert_eq!(
        rows_in_outage, BEFORE,
        "rows were stored into read-only replicated tables while ZooKeeper was down"
    );

    let returned = Instant::now();
    tokio::task::block_in_place(|| cluster.zookeeper.restart()).expect("restart ZooKeeper");
    let report = cluster.bed.wait_accounted(REPLICATION_TIMEOUT).await;
    assert_exact(&report, MESSAGES);
    let replicated = wait_equal(cluster.bed.ch.legacy(), &cluster.replica2).await;
    assert_no_duplicates(&replicated);
    assert_eq!(total_rows(&cluster.replica2), MESSAGES);
    wait_ready_answer(&relay, |status, _| status == 200).await;
    println!(
        "cluster: zookeeper kill -9: messages={MESSAGES} stored={} lost=0 duplicated=0 \
         rows_stored_during_outage=0 buffered_in_wal={DURING} replicas_equal=yes \
         delivered_after_return_ms={} total_ms={}",
        report.totals().stored,
        returned.elapsed().as_millis(),
        started.elapsed().as_millis()
    );
    println!(
        "cluster: /ready while ZooKeeper was down: {}",
        not_ready.trim()
    );
    let mut relay = relay;
    assert!(relay.terminate().await.success(), "{}", relay.log());
}
