//! Scale-out on a NATS cluster: three `nats-server` nodes forming one JetStream cluster
//! (`prism_testbed::NatsCluster`), MarketPrism's streams with three replicas created by the
//! tests, relays configured with all three client URLs, loadgen publishing through all three,
//! and one clickhouse-server 18.16 (legacy profile). Each test ends with the exact accounting
//! (every identity in the streams stored once under FINAL) and prints one `scaleout:` line with
//! its figures, which docs/OPERATIONS.md quotes:
//!
//! - the node that leads a stream and its consumer killed with SIGKILL under load, then brought
//!   back: the relay goes on through the elections, loadgen's failed publishes are not stored
//!   and not counted;
//! - two relays sharing one durable consumer each with its own WAL: JetStream spreads the
//!   messages over both, one is killed, its unacked messages are redelivered to the other, and
//!   restarted on its WAL it delivers what it had acked before the kill;
//! - two relays each owning a shard of the subjects (consumers filtered by exchange): each WAL
//!   holds only its shard.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt as _;
use prism_relay::tools::loadgen::{self, LoadgenOptions, LoadgenSummary};
use prism_relay::tools::verify::{self, VerifyOptions, VerifyReport};
use prism_testbed::{ClickHouse, NatsCluster};
use tempfile::TempDir;

use crate::harness::{
    wait_accounted_by, wait_for, wait_until, ConsumerDef, RelayConfig, RelayProc, DATABASE, STREAMS,
};

/// Nodes of the NATS cluster, and replicas of every stream.
const NODES: usize = 3;

/// Redelivery delay of the tests' consumers, in milliseconds: short, so messages a killed relay
/// (or a dead consumer leader) had been handed but had not acked come back within seconds.
const ACK_WAIT_MS: u64 = 3_000;

/// Bound on a stream or consumer leader election after its leader died.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on the accounting after the traffic stopped: the relays drain their WALs, and what a
/// dead leader or a killed relay had not seen acked is redelivered after [`ACK_WAIT_MS`]. After
/// a consumer's leader moved, its pulls end early ("409 Batch Completed") for a while, and the
/// relay pulls again after a short pause; a loaded machine stretches all of it.
const ACCOUNTED_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound on the traffic reaching a point of a test (messages stored in a stream).
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Consumer leader step-downs tried before the trades consumer's leader is the stream's: each
/// picks one of the two other nodes, so ten misses in a row are one chance in a thousand.
const STEPDOWN_ATTEMPTS_MAX: u32 = 10;

/// The relay's `messages received` counter (fetched from JetStream and written to the WAL).
const RECEIVED: &str = "marketprism_storage_messages_received_total";

/// The trades stream and its consumer in the relay's default configuration.
const TRADES: &str = "MARKET_TRADES";
const TRADES_DURABLE: &str = "prism-relay-trades";

/// The NATS cluster, one ClickHouse 18.16 and a directory for the relays' configurations,
/// WALs and logs.
struct ScaleBed {
    nats: NatsCluster,
    ch: ClickHouse,
    dir: TempDir,
}

impl ScaleBed {
    /// Starts the cluster and ClickHouse and creates MarketPrism's three streams with
    /// [`NODES`] replicas.
    async fn start() -> ScaleBed {
        let nats = NatsCluster::start(NODES).expect("start the NATS cluster");
        let ch = ClickHouse::start().expect("start clickhouse-server");
        let dir = tempfile::Builder::new()
            .prefix("prism-scaleout-")
            .tempdir()
            .expect("temporary directory");
        let bed = ScaleBed { nats, ch, dir };
        let js = bed.js().await;
        for (name, subjects) in STREAMS {
            js.create_stream(stream::Config {
                name: name.to_owned(),
                subjects: subjects.iter().map(|s| s.to_string()).collect(),
                storage: stream::StorageType::File,
                num_replicas: NODES,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("create stream {name}: {e}"));
        }
        bed
    }

    /// A relay configuration on all three NATS URLs, with the streams left to the test (none
    /// in the configuration), the default three consumers with a short `ack_wait`, and its WAL
    /// in `<wal>` under the bed's directory.
    fn config(&self, wal: &str) -> RelayConfig {
        let mut config = RelayConfig::for_servers(
            self.nats.url(),
            self.ch.http_url(),
            self.dir.path().join(wal),
        );
        config.streams.clear();
        for consumer in &mut config.consumers {
            consumer.ack_wait_ms = ACK_WAIT_MS;
        }
        config
    }

    fn spawn(&self, name: &str, config: &RelayConfig) -> RelayProc {
        RelayProc::spawn_in(self.dir.path(), name, config)
    }

    async fn spawn_ready(&self, name: &str, config: &RelayConfig) -> RelayProc {
        let mut relay = self.spawn(name, config);
        relay.wait_ready().await;
        relay
    }

    async fn js(&self) -> jetstream::Context {
        let client = async_nats::connect(self.nats.urls())
            .await
            .expect("connect to the NATS cluster");
        jetstream::new(client)
    }

    fn verify_options(&self) -> VerifyOptions {
        VerifyOptions {
            nats_url: self.nats.url(),
            clickhouse_url: self.ch.http_url(),
            database: DATABASE.into(),
            ..VerifyOptions::default()
        }
    }

    /// Loadgen publishing `count` messages of every data type at `rate_per_s` through all three
    /// URLs, in a task of its own.
    fn start_load(
        &self,
        run_id: &str,
        count: u64,
        rate_per_s: u64,
    ) -> tokio::task::JoinHandle<LoadgenSummary> {
        let options = LoadgenOptions {
            nats_url: self.nats.url(),
            create_streams: false,
            count: Some(count),
            rate_per_s,
            run_id: Some(run_id.to_owned()),
            progress: false,
            ..LoadgenOptions::default()
        };
        tokio::spawn(async move { loadgen::run(&options).await.expect("loadgen runs") })
    }

    /// Messages stored in `stream` (0 while no leader answers).
    async fn stream_messages(&self, js: &jetstream::Context, stream: &str) -> u64 {
        match js.get_stream(stream).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Waits until `stream` holds at least `messages` messages.
    async fn wait_stream_messages(&self, js: &jetstream::Context, stream: &str, messages: u64) {
        wait_until(
            &format!("{messages} messages in {stream}"),
            PROGRESS_TIMEOUT,
            || async { self.stream_messages(js, stream).await >= messages },
        )
        .await;
    }
}

/// The server name of `stream`'s leader, as its info reports it (`None` during an election).
async fn stream_leader(js: &jetstream::Context, stream: &str) -> Option<String> {
    let mut stream = js.get_stream(stream).await.ok()?;
    let info = stream.info().await.ok()?;
    info.cluster.clone()?.leader.filter(|l| !l.is_empty())
}

/// The server name of a durable consumer's leader (`None` during an election).
async fn consumer_leader(js: &jetstream::Context, stream: &str, durable: &str) -> Option<String> {
    let stream = js.get_stream(stream).await.ok()?;
    let mut consumer: consumer::PullConsumer = stream.get_consumer(durable).await.ok()?;
    let info = consumer.info().await.ok()?;
    info.cluster.clone()?.leader.filter(|l| !l.is_empty())
}

/// Moves the consumer's leadership until it sits on the stream leader's node, so one kill takes
/// both; returns that node's server name.
async fn colocate_consumer_with_stream(
    client: &async_nats::Client,
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> String {
    for _ in 0..STEPDOWN_ATTEMPTS_MAX {
        let stream_at = wait_for("stream leader", ELECTION_TIMEOUT, || {
            stream_leader(js, stream)
        })
        .await;
        let consumer_at = wait_for("consumer leader", ELECTION_TIMEOUT, || {
            consumer_leader(js, stream, durable)
        })
        .await;
        if stream_at == consumer_at {
            return stream_at;
        }
        client
            .request(
                format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{durable}"),
                "".into(),
            )
            .await
            .expect("consumer leader step-down answered");
        wait_until("a new consumer leader", ELECTION_TIMEOUT, || async {
            consumer_leader(js, stream, durable)
                .await
                .is_some_and(|l| l != consumer_at)
        })
        .await;
    }
    panic!("the consumer's leader never came onto the stream leader's node");
}

/// Asserts the exact accounting: every identity in the streams stored once under FINAL.
fn assert_exact(report: &VerifyReport) {
    let totals = report.totals();
    assert!(totals.published > 0, "{report}");
    assert_eq!(totals.stored, totals.published, "{report}");
    assert_eq!(totals.lost, 0, "{report}");
    assert_eq!(totals.duplicated, 0, "{report}");
    assert_eq!(totals.dead_lettered, 0, "{report}");
}

/// Every record's subject in a WAL directory, read with the WAL's own reader.
fn wal_subjects(dir: &Path) -> Vec<String> {
    let segments = prism_wal::list_segments(dir).expect("list segments");
    let Some(first) = segments.first() else {
        return Vec::new();
    };
    let mut reader = prism_wal::read_dir(dir, first.first_lsn).expect("read the WAL");
    let mut subjects = Vec::new();
    while let Some(record) = reader.next().expect("the WAL reads") {
        let envelope = record.envelope().expect("the envelope decodes");
        subjects.push(envelope.subject.to_string());
    }
    subjects
}

/// Waits until the relay's lanes have inserted everything its WAL holds.
async fn wait_wal_drained(relay: &RelayProc) {
    wait_until("the relay's WAL drained", ACCOUNTED_TIMEOUT, || async {
        let (cursor, durable) = relay.cursor_and_durable().await;
        cursor >= durable
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_nats_node_that_leads_a_stream_and_its_consumer_under_load_loses_and_duplicates_nothing(
) {
    const MESSAGES: u64 = 10_000;
    const RATE_PER_S: u64 = 1_000;
    let started = Instant::now();
    let mut bed = ScaleBed::start().await;
    let mut relay = bed.spawn_ready("relay", &bed.config("wal")).await;
    let client = async_nats::connect(bed.nats.urls())
        .await
        .expect("connect to the NATS cluster");
    let js = jetstream::new(client.clone());
    let leader = colocate_consumer_with_stream(&client, &js, TRADES, TRADES_DURABLE).await;
    let killed = bed
        .nats
        .index_of(&leader)
        .expect("the leader is a node of the cluster");

    let load = bed.start_load("natskill", MESSAGES, RATE_PER_S);
    bed.wait_stream_messages(&js, TRADES, 500).await;
    let stored_before = bed.stream_messages(&js, TRADES).await;
    bed.nats.node_mut(killed).kill9().expect("kill the leader");
    let killed_at = Instant::now();
    let new_leader = wait_for("a new stream leader", ELECTION_TIMEOUT, || async {
        stream_leader(&js, TRADES).await.filter(|l| *l != leader)
    })
    .await;
    let stream_election_ms = killed_at.elapsed().as_millis();
    wait_until("a new consumer leader", ELECTION_TIMEOUT, || async {
        consumer_leader(&js, TRADES, TRADES_DURABLE)
            .await
            .is_some_and(|l| l != leader)
    })
    .await;
    let consumer_election_ms = killed_at.elapsed().as_millis();
    // The traffic goes on into the two remaining replicas before the node comes back.
    bed.wait_stream_messages(&js, TRADES, stored_before + 500)
        .await;
    let down_ms = killed_at.elapsed().as_millis();
    tokio::task::block_in_place(|| bed.nats.node_mut(killed).restart())
        .expect("restart the killed node");
    let summary = load.await.expect("loadgen task");
    let load_ended = Instant::now();
    let report = wait_accounted_by(&bed.verify_options(), ACCOUNTED_TIMEOUT).await;
    let catch_up_ms = load_ended.elapsed().as_millis();
    // A pull the new consumer leader ends with "409 Batch Completed" is no failure: taken for
    // one, it made the relay back off again and again and held the consumer for tens of seconds.
    let log = relay.log();
    assert!(
        !log.contains("Batch Completed"),
        "a pull ended by the server was taken for a failed fetch:\n{log}"
    );

    assert_eq!(summary.aborted, None, "loadgen went on: {summary}");
    assert_ne!(new_leader, leader);
    assert_exact(&report);
    let totals = report.totals();
    // A publish whose ack failed during the election may or may not have been stored; the
    // accounting is against the streams' contents, so every stored one is in `published`.
    assert!(
        totals.published >= summary.published_total(),
        "every acked publish is in the streams: {summary}\n{report}"
    );
    assert!(
        totals.published <= MESSAGES,
        "nothing is stored twice: {report}"
    );
    assert_eq!(relay.try_wait(), None, "the relay went on");
    relay.wait_ready().await;
    println!(
        "scaleout: nats leader kill -9: published={} stored={} lost=0 duplicated=0 \
         acked_publishes={} publish_errors={} stream_election_ms={stream_election_ms} \
         consumer_election_ms={consumer_election_ms} node_down_ms={down_ms} \
         catch_up_after_load_ms={catch_up_ms} total_ms={}",
        totals.published,
        totals.stored,
        summary.published_total(),
        summary.publish_errors,
        started.elapsed().as_millis()
    );
}

/// Counts the acks of messages delivered more than once, from JetStream's ack samples
/// (`sample_freq` 100% on the consumers), in a task of its own.
async fn count_redelivered_acks(client: &async_nats::Client) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let mut samples = client
        .subscribe("$JS.EVENT.METRIC.CONSUMER.ACK.>")
        .await
        .expect("subscribe to ack samples");
    // The subscription is in place once the server has seen it.
    client.flush().await.expect("flush the subscription");
    let counter = Arc::clone(&count);
    tokio::spawn(async move {
        while let Some(message) = samples.next().await {
            let deliveries = serde_json::from_slice::<serde_json::Value>(&message.payload)
                .ok()
                .and_then(|v| v.get("deliveries").and_then(serde_json::Value::as_u64))
                .unwrap_or(0);
            if deliveries > 1 {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    count
}

/// Creates the relays' durable consumers as the relay would, with every ack sampled.
async fn create_sampled_consumers(js: &jetstream::Context, consumers: &[ConsumerDef]) {
    for c in consumers {
        let stream = js.get_stream(&c.stream).await.expect("stream exists");
        let _: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(c.durable.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_millis(c.ack_wait_ms),
                max_ack_pending: i64::try_from(c.max_ack_pending).expect("fits"),
                sample_frequency: 100,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("create consumer {}: {e}", c.durable));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_sharing_one_durable_split_the_traffic_and_a_killed_ones_wal_drains_after_restart(
) {
    const MESSAGES: u64 = 16_000;
    const RATE_PER_S: u64 = 1_000;
    /// Relay A does not insert before it is killed (no flush interval or batch size is reached
    /// within the test), so its WAL surely holds acked records that are not in ClickHouse.
    const NEVER_FLUSH_MS: u64 = 600_000;
    const NEVER_ROWS: u64 = 1_000_000;
    /// Freezes of relay A tried before one catches deliveries it has not acked.
    const FREEZES_MAX: u32 = 5;
    let started = Instant::now();
    let bed = ScaleBed::start().await;
    let client = async_nats::connect(bed.nats.urls())
        .await
        .expect("connect to the NATS cluster");
    let js = jetstream::new(client.clone());
    let config_b = bed.config("wal-b");
    let mut config_a = bed.config("wal-a");
    config_a.table_flush_interval_ms = NEVER_FLUSH_MS;
    config_a.flush_interval_ms = NEVER_FLUSH_MS;
    config_a.rows_max = NEVER_ROWS;
    // Without a linger relay A has a pull outstanding nearly all the time, so a freeze catches
    // deliveries it has not acked.
    for consumer in &mut config_a.consumers {
        consumer.extra = "fetch_linger_ms = 0".into();
    }
    create_sampled_consumers(&js, &config_a.consumers).await;
    let redelivered_acks = count_redelivered_acks(&client).await;
    let mut relay_a = bed.spawn_ready("relay-a", &config_a).await;
    let relay_b = bed.spawn_ready("relay-b", &config_b).await;

    let load = bed.start_load("shared", MESSAGES, RATE_PER_S);
    wait_until(
        "both relays received messages",
        PROGRESS_TIMEOUT,
        || async {
            relay_a.metric_sum(RECEIVED, &[]).await >= 200.0
                && relay_b.metric_sum(RECEIVED, &[]).await >= 200.0
        },
    )
    .await;
    let received_a = relay_a.metric_sum(RECEIVED, &[]).await;
    let received_b = relay_b.metric_sum(RECEIVED, &[]).await;
    let redelivered_before = redelivered_acks.load(Ordering::Relaxed);
    // Relay A frozen: what the server delivers to its outstanding pulls stays unacknowledged,
    // and after ack_wait JetStream hands it to relay B. A freeze that lands between two pulls
    // with everything acked catches nothing: then A is thawed and frozen again.
    let frozen_at = Instant::now();
    let mut freezes = 0;
    loop {
        freezes += 1;
        relay_a.pause();
        let deadline = Instant::now() + Duration::from_millis(3 * ACK_WAIT_MS);
        while redelivered_acks.load(Ordering::Relaxed) == redelivered_before
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if redelivered_acks.load(Ordering::Relaxed) > redelivered_before {
            break;
        }
        assert!(
            freezes < FREEZES_MAX,
            "no redelivery to relay B after {freezes} freezes of relay A"
        );
        relay_a.resume();
    }
    let redelivered_ms = frozen_at.elapsed().as_millis();
    relay_a.kill9();
    let summary = load.await.expect("loadgen task");
    assert!(summary.ok(), "loadgen: {summary}");
    wait_until("every consumer settled", ACCOUNTED_TIMEOUT, || async {
        let mut settled = true;
        for c in &config_b.consumers {
            let stream = js.get_stream(&c.stream).await.expect("stream");
            let mut consumer: consumer::PullConsumer =
                stream.get_consumer(&c.durable).await.expect("consumer");
            let info = consumer.info().await.expect("consumer info");
            settled &= info.num_pending == 0 && info.num_ack_pending == 0;
        }
        settled
    })
    .await;
    wait_wal_drained(&relay_b).await;
    // What is still missing now is only in A's WAL: acked to JetStream, not yet inserted.
    let before_restart = verify::run(&bed.verify_options())
        .await
        .expect("verify runs")
        .totals();
    let records_a = wal_subjects(&config_a.wal_dir).len();
    // Restarted with the usual flush settings, it drains its WAL.
    config_a.table_flush_interval_ms = config_b.table_flush_interval_ms;
    config_a.flush_interval_ms = config_b.flush_interval_ms;
    config_a.rows_max = config_b.rows_max;
    config_a.write(&relay_a.config_path);
    relay_a.restart();
    relay_a.wait_ready().await;
    wait_wal_drained(&relay_a).await;
    let report = wait_accounted_by(&bed.verify_options(), ACCOUNTED_TIMEOUT).await;

    assert!(received_a > 0.0 && received_b > 0.0);
    assert!(
        before_restart.lost > 0,
        "the killed relay's WAL held acked records not yet in ClickHouse"
    );
    assert_exact(&report);
    assert_eq!(report.totals().published, summary.published_total());
    println!(
        "scaleout: relay kill -9 with a shared durable: published={} stored={} lost=0 duplicated=0 \
         received_before_kill_a={received_a} received_before_kill_b={received_b} \
         redelivered_acks_b={} first_redelivery_ms={redelivered_ms} freezes={freezes} \
         wal_records_a={records_a} \
         only_in_killed_wal={} total_ms={}",
        report.totals().published,
        report.totals().stored,
        redelivered_acks.load(Ordering::Relaxed) - redelivered_before,
        before_restart.lost,
        started.elapsed().as_millis()
    );
}

/// The consumers of a relay owning the exchanges `exchanges`: one per stream, filtered on
/// every subject prefix of the stream for each exchange.
fn shard_consumers(shard: &str, exchanges: &[&str]) -> Vec<ConsumerDef> {
    STREAMS
        .iter()
        .map(|(name, prefixes)| {
            let filters: Vec<String> = prefixes
                .iter()
                .flat_map(|prefix| {
                    let head = prefix.trim_end_matches(".>");
                    exchanges.iter().map(move |e| format!("{head}.{e}.>"))
                })
                .collect();
            let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
            let mut def =
                ConsumerDef::new(name, &format!("prism-relay-{shard}-{name}")).filter(&filters);
            def.ack_wait_ms = ACK_WAIT_MS;
            def
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_owning_a_shard_of_exchanges_each_store_everything_once_and_each_wal_holds_only_its_shard(
) {
    const MESSAGES: u64 = 12_000;
    let started = Instant::now();
    let bed = ScaleBed::start().await;
    let shards: [(&str, &[&str]); 2] = [("a", &["binance"]), ("b", &["okx", "deribit"])];
    let mut relays = Vec::new();
    let mut wal_dirs = Vec::new();
    for (shard, exchanges) in shards {
        let mut config = bed.config(&format!("wal-{shard}"));
        config.consumers = shard_consumers(shard, exchanges);
        wal_dirs.push(config.wal_dir.clone());
        relays.push(bed.spawn_ready(&format!("relay-{shard}"), &config).await);
    }

    let summary = bed
        .start_load("sharded", MESSAGES, 0)
        .await
        .expect("loadgen task");
    assert!(summary.ok(), "loadgen: {summary}");
    let report = wait_accounted_by(&bed.verify_options(), ACCOUNTED_TIMEOUT).await;

    assert_exact(&report);
    assert_eq!(report.totals().published, summary.published_total());
    let mut records = Vec::new();
    for ((shard, exchanges), dir) in shards.iter().zip(&wal_dirs) {
        let subjects = wal_subjects(dir);
        let seen: BTreeSet<&str> = subjects
            .iter()
            .map(|s| s.split('.').nth(1).expect("an exchange token"))
            .collect();
        assert!(!subjects.is_empty(), "shard {shard} received messages");
        let owned: BTreeSet<&str> = exchanges.iter().copied().collect();
        assert!(
            seen.is_subset(&owned),
            "shard {shard}'s WAL holds only {owned:?}, found {seen:?}"
        );
        records.push(subjects.len());
    }
    let in_wals: usize = records.iter().sum();
    assert!(
        u64::try_from(in_wals).expect("fits") >= report.totals().published,
        "every message went through one of the two WALs"
    );
    for relay in &mut relays {
        assert_eq!(relay.try_wait(), None, "relay runs");
    }
    println!(
        "scaleout: sharded by exchange: published={} stored={} lost=0 duplicated=0 \
         wal_records_a={} wal_records_b={} total_ms={}",
        report.totals().published,
        report.totals().stored,
        records[0],
        records[1],
        started.elapsed().as_millis()
    );
}
