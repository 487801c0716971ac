//! One scenario's world: NATS, ClickHouse (through the proxy when the scenario needs it), the
//! relay's release binary on a configuration written here (its WAL on a small tmpfs when the
//! scenario needs one), `prism-relay loadgen` publishing all eight MarketPrism types in the
//! background, and the measurements the scenarios need: JetStream's stream and consumer state
//! (the monitoring endpoint), the identities ClickHouse holds per stream, the catch-up after a
//! fault, and the final accounting (SQL by identity over every sequence JetStream assigned,
//! cross-checked with `prism-relay verify --config`).
//!
//! Servers come from the test bed (`prism-testbed`), the relay process too (`Relay`); nothing
//! here controls a process by itself.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prism_testbed::{free_ports, http_get, Chdb, ClickHouse, Nats, Relay, TestbedError};

use crate::error::ChaosError;
use crate::proxy::Proxy;
use crate::schedule::{Leg, Needs, INSERT_TIMEOUT_MS};

/// The database the relay writes into.
pub const DATABASE: &str = "marketprism_hot";

/// MarketPrism's stream layout, which the relay creates.
pub const STREAMS: [(&str, &[&str]); 3] = [
    ("MARKET_TRADES", &["trade.>"]),
    ("MARKET_BOOKS", &["orderbook.>"]),
    (
        "MARKET_DATA",
        &[
            "funding_rate.>",
            "open_interest.>",
            "liquidation.>",
            "volatility_index.>",
            "lsr_top_position.>",
            "lsr_all_account.>",
        ],
    ),
];

/// The eight typed tables.
pub const TABLES: [&str; 8] = [
    "trades",
    "orderbooks",
    "funding_rates",
    "open_interests",
    "liquidations",
    "lsr_top_positions",
    "lsr_all_accounts",
    "volatility_indices",
];

/// Messages per second loadgen publishes: steady traffic a 2-core machine shared with both
/// servers and the relay carries with room to catch up after every fault.
pub const LOAD_RATE_PER_S: u64 = 800;

/// Length of one loadgen run; the background load is a chain of them, so a run that NATS'
/// outage breaks is followed by the next, and stopping the load waits for at most one.
pub const LOAD_RUN_S: u64 = 4;

/// Pause before the next loadgen run after one that failed (NATS down).
const LOAD_RETRY_MS: u64 = 250;

/// How often the load thread looks at its loadgen process (and at the stop flag).
const LOAD_POLL_MS: u64 = 50;

/// How long the relay may take from spawn to `/ready` (schema creation included).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest catch-up accepted after a fault; longer counts as a failure (something is stuck).
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(180);

/// Pause between two looks at ClickHouse while waiting for a catch-up.
const CATCH_UP_POLL_MS: u64 = 100;

/// Bound on one query of the runner.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on one request to the monitoring endpoints.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(5);

/// Redelivery delay of the relay's consumers: a killed relay's unacked messages come back
/// after it (1000 ms is JetStream's practical minimum; 2 s keeps redeliveries rare otherwise).
const ACK_WAIT_MS: u64 = 2_000;

/// Rows per batch: small, so a kill lands between an insert and its ledger commit often.
const ROWS_MAX: u64 = 500;

/// Size of the tmpfs under the WAL when the scenario needs a small disk: room for the WAL's
/// budget below plus a margin the filler takes.
pub const DISK_BYTES: u64 = 48 * 1024 * 1024;
/// Segment size on the small disk: many segments fit, so drained ones can be freed.
const SMALL_SEGMENT_BYTES: u64 = 512 * 1024;
/// WAL budget on the small disk: below the disk's size, so the WAL alone never fills it and
/// only the runner's filler (a real file of another process) brings the kernel's ENOSPC.
const SMALL_BUDGET_BYTES: u64 = 32 * 1024 * 1024;
/// Replay retention on the small disk: a few segments.
const SMALL_RETENTION_BYTES: u64 = 2 * 1024 * 1024;

/// State of a stream, from the monitoring endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamState {
    pub first_seq: u64,
    pub last_seq: u64,
    pub messages: u64,
}

/// JetStream's state as its monitoring endpoint shows it.
#[derive(Debug, Clone, Default)]
pub struct JetStreamView {
    /// Every stream's state, by name.
    pub streams: BTreeMap<String, StreamState>,
    /// Per stream, the lowest ack floor (a stream sequence) of its consumers.
    pub ack_floors: BTreeMap<String, u64>,
}

/// The final accounting of a scenario.
#[derive(Debug, Clone, Default)]
pub struct Accounting {
    pub published: u64,
    pub stored: u64,
    pub dead_lettered: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Messages JetStream discarded under its limits (scenario 8), all accounted by identity.
    pub discarded: u64,
    /// The `total` row of `verify` (published, stored, dead-lettered, lost, duplicated).
    pub verify_total: [u64; 5],
    /// On the modern leg, rows beyond one per identity WITHOUT FINAL: what the server's
    /// token deduplication let through (a retried batch carries its token, so it should be
    /// 0); `None` on the legacy leg, whose server has no tokens.
    pub extra_without_final: Option<u64>,
}

/// A WAL on a small tmpfs, unmounted (lazily) on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> Result<Tmpfs, ChaosError> {
        fs::create_dir_all(dir)
            .map_err(|e| ChaosError::io(format!("creating {}", dir.display()), e))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| ChaosError::io("running mount", e))?;
        if !out.status.success() {
            return Err(ChaosError::Check(format!(
                "mounting a {bytes}-byte tmpfs on {} failed (the disk-full scenarios need root): {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// Bytes free for an unprivileged writer, as `df` reports them.
    pub fn available_bytes(&self) -> Result<u64, ChaosError> {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.dir)
            .output()
            .map_err(|e| ChaosError::io("running df", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| ChaosError::Output {
                what: "df".into(),
                detail: text.into_owned(),
            })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily, so a process still holding a file there does not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// The background load: a thread running `prism-relay loadgen` again and again until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<LoadTally>>,
}

/// What the load published, by loadgen's own summaries.
#[derive(Debug, Clone, Default)]
pub struct LoadTally {
    pub runs: u32,
    pub failed_runs: u32,
    /// Acked publishes.
    pub published: u64,
    pub publish_errors: u64,
}

impl Load {
    fn start(relay_bin: &Path, config: &Path, log: &Path, run_prefix: &str, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (relay_bin, config, log) = (
            relay_bin.to_path_buf(),
            config.to_path_buf(),
            log.to_path_buf(),
        );
        let run_prefix = run_prefix.to_string();
        let thread = thread::spawn(move || {
            let mut tally = LoadTally::default();
            let mut ts_next = wall_ms();
            while !flag.load(Ordering::SeqCst) {
                let run_id = format!("{run_prefix}-{}", tally.runs);
                let output_path = log.with_extension("run");
                let spawned = File::create(&output_path).and_then(|out| {
                    let err = out.try_clone()?;
                    Command::new(&relay_bin)
                        .arg("loadgen")
                        .arg("--config")
                        .arg(&config)
                        .args(["--rate-per-s", &LOAD_RATE_PER_S.to_string()])
                        .args(["--duration-s", &LOAD_RUN_S.to_string()])
                        .args(["--run-id", &run_id])
                        .args([
                            "--seed",
                            &(seed.wrapping_add(u64::from(tally.runs))).to_string(),
                        ])
                        .args(["--ts-start-ms", &ts_next.to_string()])
                        .args(["--publish-errors-max", "1000000000"])
                        .arg("--no-progress")
                        .env("RUST_LOG", "warn")
                        .stdin(Stdio::null())
                        .stdout(out)
                        .stderr(err)
                        .spawn()
                });
                tally.runs += 1;
                let text = match spawned {
                    Ok(mut child) => {
                        // Stopping the load kills the run in progress: the accounting counts
                        // what JetStream stored, not what loadgen saw acked, so nothing of a
                        // killed run goes uncounted.
                        let status = loop {
                            if flag.load(Ordering::SeqCst) {
                                let _ = child.kill();
                            }
                            match child.try_wait() {
                                Ok(Some(status)) => break Some(status),
                                Ok(None) => thread::sleep(Duration::from_millis(LOAD_POLL_MS)),
                                Err(_) => break None,
                            }
                        };
                        if !status.is_some_and(|s| s.success()) {
                            tally.failed_runs += 1;
                        }
                        fs::read_to_string(&output_path).unwrap_or_default()
                    }
                    Err(e) => {
                        tally.failed_runs += 1;
                        format!("spawning loadgen: {e}")
                    }
                };
                let parsed = parse_loadgen(&text);
                tally.published += parsed.published;
                tally.publish_errors += parsed.publish_errors;
                // The next run's timestamps start past this one's, so no two runs share a
                // timestamp identity.
                ts_next = wall_ms().max(parsed.ts_last_ms.saturating_add(1));
                if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&log) {
                    let _ = writeln!(f, "=== {run_id}\n{text}");
                }
                if parsed.published == 0 && !flag.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(LOAD_RETRY_MS));
                }
            }
            tally
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the load (killing the run in progress) and returns the tally.
    fn finish(&mut self) -> LoadTally {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The figures of one loadgen summary the runner uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadgenFigures {
    pub published: u64,
    pub publish_errors: u64,
    pub ts_last_ms: i64,
}

/// Reads loadgen's printed summary: the `total` row of the data types, `publish errors N` and
/// `last ts_ms N`. Whatever is missing (a run that failed before its summary) counts as 0.
pub fn parse_loadgen(text: &str) -> LoadgenFigures {
    let mut figures = LoadgenFigures {
        ts_last_ms: i64::MIN,
        ..LoadgenFigures::default()
    };
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("total"), Some(n)) => figures.published = n.parse().unwrap_or(0),
            (Some("last"), Some("ts_ms")) => {
                figures.ts_last_ms = words
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(i64::MIN)
            }
            _ => {}
        }
        if let Some((_, rest)) = line.split_once("publish errors ") {
            figures.publish_errors = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    figures
}

/// Reads the `total` row of verify's report: published, stored, dead-lettered, lost,
/// duplicated.
pub fn parse_verify_total(text: &str) -> Option<[u64; 5]> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("total"))?;
    let numbers: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|w| w.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    (numbers.len() >= 5).then(|| [numbers[0], numbers[1], numbers[2], numbers[3], numbers[4]])
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The ClickHouse of a leg: clickhouse-server 18.16 (the relay picks its legacy profile) or
/// the modern engine behind the test bed's HTTP stand-in (the relay picks its modern profile).
/// The faults need only what both have: kill, restart, pause, resume, a port and SQL.
pub enum ChServer {
    Legacy(ClickHouse),
    Modern(Chdb),
}

impl ChServer {
    fn start(leg: Leg) -> Result<ChServer, TestbedError> {
        Ok(match leg {
            Leg::Legacy => ChServer::Legacy(ClickHouse::start()?),
            Leg::Modern => ChServer::Modern(Chdb::start()?),
        })
    }

    pub fn http_port(&self) -> u16 {
        match self {
            ChServer::Legacy(ch) => ch.http_port(),
            ChServer::Modern(ch) => ch.http_port(),
        }
    }

    pub fn log_path(&self) -> PathBuf {
        match self {
            ChServer::Legacy(ch) => ch.log_path(),
            ChServer::Modern(ch) => ch.log_path(),
        }
    }

    pub fn kill9(&mut self) -> Result<(), TestbedError> {
        match self {
            ChServer::Legacy(ch) => ch.kill9(),
            ChServer::Modern(ch) => ch.kill9(),
        }
    }

    pub fn restart(&mut self) -> Result<(), TestbedError> {
        match self {
            ChServer::Legacy(ch) => ch.restart(),
            ChServer::Modern(ch) => ch.restart(),
        }
    }

    pub fn pause(&self) -> Result<(), TestbedError> {
        match self {
            ChServer::Legacy(ch) => ch.pause(),
            ChServer::Modern(ch) => ch.pause(),
        }
    }

    pub fn resume(&self) -> Result<(), TestbedError> {
        match self {
            ChServer::Legacy(ch) => ch.resume(),
            ChServer::Modern(ch) => ch.resume(),
        }
    }

    pub fn query_with_timeout(&self, sql: &str, timeout: Duration) -> Result<String, TestbedError> {
        match self {
            ChServer::Legacy(ch) => ch.query_with_timeout(sql, timeout),
            ChServer::Modern(ch) => ch.query_with_timeout(sql, timeout),
        }
    }
}

/// A scenario's servers, relay and load.
pub struct Bed {
    /// The scenario's directory: configuration, logs, the WAL (unless on the small disk).
    pub dir: PathBuf,
    pub nats: Nats,
    pub ch: ChServer,
    /// Which ClickHouse the bed runs.
    pub leg: Leg,
    pub proxy: Option<Proxy>,
    pub disk: Option<Tmpfs>,
    pub relay: Relay,
    pub wal_dir: PathBuf,
    pub config_path: PathBuf,
    relay_bin: PathBuf,
    load: Option<Load>,
}

impl Bed {
    /// Starts the servers, the proxy and the small disk as `needs` says, writes the relay's
    /// configuration and starts the relay, ready.
    pub fn start(relay_bin: &Path, dir: &Path, needs: Needs, leg: Leg) -> Result<Bed, ChaosError> {
        fs::create_dir_all(dir)
            .map_err(|e| ChaosError::io(format!("creating {}", dir.display()), e))?;
        let nats = Nats::start()?;
        let ch = ChServer::start(leg)?;
        let [proxy_port, metrics_port] = free_ports::<2>()?;
        let proxy = if needs.proxy {
            Some(
                Proxy::start(proxy_port, ch.http_port())
                    .map_err(|e| ChaosError::io("starting the proxy", e))?,
            )
        } else {
            None
        };
        let disk = if needs.small_disk {
            Some(Tmpfs::mount(&dir.join("disk"), DISK_BYTES)?)
        } else {
            None
        };
        let wal_dir = match &disk {
            Some(d) => d.dir.join("wal"),
            None => dir.join("wal"),
        };
        let clickhouse_port = proxy.as_ref().map_or(ch.http_port(), Proxy::port);
        let toml = relay_toml(&RelaySettings {
            nats_url: nats.url(),
            clickhouse_url: format!("http://127.0.0.1:{clickhouse_port}"),
            wal_dir: wal_dir.clone(),
            small_disk: needs.small_disk,
            stream_max_msgs: needs.stream_max_msgs,
            metrics_port,
        });
        let config_path = dir.join("relay.toml");
        fs::write(&config_path, toml).map_err(|e| ChaosError::io("writing relay.toml", e))?;
        let mut relay = Relay::spawn(
            relay_bin,
            &config_path,
            &dir.join("relay.log"),
            metrics_port,
        )?;
        relay.wait_ready(READY_TIMEOUT)?;
        Ok(Bed {
            dir: dir.to_path_buf(),
            nats,
            ch,
            leg,
            proxy,
            disk,
            relay,
            wal_dir,
            config_path,
            relay_bin: relay_bin.to_path_buf(),
            load: None,
        })
    }

    /// Starts the background load.
    pub fn start_load(&mut self, run_prefix: &str, seed: u64) {
        self.load = Some(Load::start(
            &self.relay_bin,
            &self.config_path,
            &self.dir.join("loadgen.log"),
            run_prefix,
            seed,
        ));
    }

    /// Stops the load (the loadgen run in progress is killed).
    pub fn stop_load(&mut self) -> LoadTally {
        self.load.as_mut().map(Load::finish).unwrap_or_default()
    }

    /// JetStream's view: every stream's state and, per stream, the lowest ack floor (stream
    /// sequence) of its consumers, from the monitoring endpoint.
    pub fn jetstream(&self) -> Result<JetStreamView, ChaosError> {
        let (status, body) = http_get(
            self.nats.monitor_port(),
            "/jsz?streams=true&consumers=true",
            MONITOR_TIMEOUT,
        )?;
        let bad = |detail: String| ChaosError::Output {
            what: "NATS /jsz".into(),
            detail,
        };
        if status != 200 {
            return Err(bad(format!("HTTP {status}: {body}")));
        }
        let json: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| bad(format!("{e}: {body}")))?;
        let mut streams = BTreeMap::new();
        let mut floors = BTreeMap::new();
        let accounts = json["account_details"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for account in &accounts {
            for stream in account["stream_detail"].as_array().into_iter().flatten() {
                let Some(name) = stream["name"].as_str() else {
                    continue;
                };
                let state = &stream["state"];
                let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
                streams.insert(
                    name.to_string(),
                    StreamState {
                        first_seq: n(&state["first_seq"]),
                        last_seq: n(&state["last_seq"]),
                        messages: n(&state["messages"]),
                    },
                );
                for consumer in stream["consumer_detail"].as_array().into_iter().flatten() {
                    let floor = n(&consumer["ack_floor"]["stream_seq"]);
                    floors
                        .entry(name.to_string())
                        .and_modify(|f: &mut u64| *f = (*f).min(floor))
                        .or_insert(floor);
                }
            }
        }
        Ok(JetStreamView {
            streams,
            ack_floors: floors,
        })
    }

    /// Last sequence per stream.
    pub fn last_seqs(&self) -> Result<BTreeMap<String, u64>, ChaosError> {
        Ok(self
            .jetstream()?
            .streams
            .into_iter()
            .map(|(name, s)| (name, s.last_seq))
            .collect())
    }

    /// Runs `sql` on ClickHouse directly (never through the proxy).
    pub fn sql(&self, sql: &str) -> Result<String, ChaosError> {
        Ok(self.ch.query_with_timeout(sql, QUERY_TIMEOUT)?)
    }

    /// Distinct identities per stream with a sequence at or below `upto`'s, over the typed
    /// tables (without FINAL: distinct counts need no merge).
    pub fn stored_by_stream(
        &self,
        upto: &BTreeMap<String, u64>,
    ) -> Result<BTreeMap<String, u64>, ChaosError> {
        let mut stored = BTreeMap::new();
        let Some(cond) = identity_condition(upto) else {
            return Ok(stored);
        };
        for table in TABLES {
            let body = self.sql(&format!(
                "SELECT nats_stream, uniqExact(nats_seq) FROM {DATABASE}.{table} WHERE {cond} \
                 GROUP BY nats_stream FORMAT TabSeparated"
            ))?;
            for (stream, n) in parse_pairs(&body)? {
                *stored.entry(stream).or_insert(0) += n;
            }
        }
        Ok(stored)
    }

    /// Waits until every message JetStream holds now (by its last sequences) is in
    /// ClickHouse; returns the time since `since` (the fault's end). Fails when the relay
    /// exits or `CATCH_UP_TIMEOUT` passes.
    pub fn wait_caught_up(&mut self, since: Instant) -> Result<Duration, ChaosError> {
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        // A NATS server just restarted answers before it has loaded every stream; a view
        // without all three would make the catch-up trivially complete.
        let upto = loop {
            let seqs = self.last_seqs()?;
            if STREAMS.iter().all(|(name, _)| seqs.contains_key(*name)) {
                break seqs;
            }
            if Instant::now() >= deadline {
                return Err(ChaosError::Timeout {
                    what: "JetStream listing the three streams".into(),
                    waited_ms: CATCH_UP_TIMEOUT.as_millis() as u64,
                    detail: format!(": {seqs:?}"),
                });
            }
            thread::sleep(Duration::from_millis(CATCH_UP_POLL_MS));
        };
        let mut last;
        loop {
            if let Some(status) = self.relay.try_exit()? {
                return Err(ChaosError::Check(format!(
                    "the relay exited ({status}) instead of catching up; see {}",
                    self.relay.log_path().display()
                )));
            }
            match self.stored_by_stream(&upto) {
                Ok(stored) => {
                    if upto
                        .iter()
                        .all(|(s, n)| stored.get(s).copied().unwrap_or(0) >= *n)
                    {
                        return Ok(since.elapsed());
                    }
                    last = format!("stored {stored:?} of {upto:?}");
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(ChaosError::Timeout {
                    what: "the catch-up".into(),
                    waited_ms: CATCH_UP_TIMEOUT.as_millis() as u64,
                    detail: format!(": {last}"),
                });
            }
            thread::sleep(Duration::from_millis(CATCH_UP_POLL_MS));
        }
    }

    /// The final accounting by identity: every sequence JetStream assigned in each stream
    /// (1 ..= last: the relay created the streams and only loadgen published), looked up under
    /// FINAL in the typed tables and in the dead letters; then `verify --config`, whose counts
    /// (over what the streams still hold) must agree. Writes verify's report to `verify.txt`.
    pub fn account(&self) -> Result<Accounting, ChaosError> {
        let streams = self.jetstream()?.streams;
        let upto: BTreeMap<String, u64> = streams
            .iter()
            .map(|(n, s)| (n.clone(), s.last_seq))
            .collect();
        let mut acc = Accounting {
            published: upto.values().sum(),
            discarded: streams
                .values()
                .map(|s| s.first_seq.saturating_sub(1).min(s.last_seq))
                .sum(),
            ..Accounting::default()
        };
        if let Some(cond) = identity_condition(&upto) {
            for table in TABLES {
                let body = self.sql(&format!(
                    "SELECT nats_stream, uniqExact(nats_seq) FROM {DATABASE}.{table} FINAL \
                     WHERE {cond} GROUP BY nats_stream FORMAT TabSeparated"
                ))?;
                acc.stored += parse_pairs(&body)?.iter().map(|(_, n)| n).sum::<u64>();
                let dup = self.sql(&format!(
                    "SELECT count() FROM (SELECT nats_stream, nats_seq, count() AS c \
                     FROM {DATABASE}.{table} FINAL WHERE {cond} GROUP BY nats_stream, nats_seq) \
                     WHERE c > 1"
                ))?;
                acc.duplicated += parse_count(&dup)?;
                if self.leg == Leg::Modern {
                    let extra = self.sql(&format!(
                        "SELECT count() - uniqExact(nats_stream, nats_seq) FROM {DATABASE}.{table} \
                         WHERE {cond}"
                    ))?;
                    *acc.extra_without_final.get_or_insert(0) += parse_count(&extra)?;
                }
            }
            let dead = self.sql(&format!(
                "SELECT count() FROM (SELECT DISTINCT nats_stream, nats_seq FROM \
                 {DATABASE}.dead_letters WHERE {cond})"
            ))?;
            acc.dead_lettered = parse_count(&dead)?;
        }
        acc.lost = acc.published.saturating_sub(acc.stored + acc.dead_lettered);

        let out = Command::new(&self.relay_bin)
            .arg("verify")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ChaosError::io("running prism-relay verify", e))?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let _ = fs::write(self.dir.join("verify.txt"), &text);
        acc.verify_total = parse_verify_total(&text).ok_or_else(|| ChaosError::Output {
            what: "prism-relay verify".into(),
            detail: text.clone(),
        })?;
        // Verify sees what the streams still hold; what it finds lost or duplicated counts too.
        acc.lost = acc.lost.max(acc.verify_total[3]);
        acc.duplicated = acc.duplicated.max(acc.verify_total[4]);
        Ok(acc)
    }

    /// The relay's metric `name` summed over its samples.
    pub fn metric(&self, name: &str) -> Result<f64, ChaosError> {
        let text = self.relay.metrics(MONITOR_TIMEOUT)?;
        Ok(prism_testbed::metric_sum(&text, name, &[]))
    }

    /// Copies what a failing scenario leaves behind into its directory: the servers' logs
    /// (their own directories go with the servers) and a WAL on the small disk (which is
    /// unmounted with the bed).
    pub fn keep_evidence(&self) {
        for (log, name) in [
            (self.nats.log_path(), "nats-server.log"),
            (self.ch.log_path(), "clickhouse-server.log"),
        ] {
            let _ = fs::copy(log, self.dir.join(name));
        }
        if self.disk.is_some() {
            let _ = copy_dir(&self.wal_dir, &self.dir.join("wal-copy"));
        }
    }

    /// Stops the relay (SIGTERM, bounded) and the load.
    pub fn shut_down(&mut self) {
        let _ = self.stop_load();
        let _ = self.relay.terminate(Duration::from_secs(20));
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::copy(entry.path(), to.join(entry.file_name()))?;
        } else if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// `(nats_stream = 'A' AND nats_seq BETWEEN 1 AND n) OR ...`; `None` when nothing was published.
fn identity_condition(upto: &BTreeMap<String, u64>) -> Option<String> {
    let parts: Vec<String> = upto
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| format!("(nats_stream = '{s}' AND nats_seq BETWEEN 1 AND {n})"))
        .collect();
    (!parts.is_empty()).then(|| parts.join(" OR "))
}

fn parse_pairs(body: &str) -> Result<Vec<(String, u64)>, ChaosError> {
    body.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (s, n) = l.split_once('\t').ok_or_else(|| ChaosError::Output {
                what: "ClickHouse".into(),
                detail: l.to_string(),
            })?;
            let n = n.trim().parse().map_err(|_| ChaosError::Output {
                what: "ClickHouse".into(),
                detail: l.to_string(),
            })?;
            Ok((s.to_string(), n))
        })
        .collect()
}

fn parse_count(body: &str) -> Result<u64, ChaosError> {
    body.trim().parse().map_err(|_| ChaosError::Output {
        what: "ClickHouse".into(),
        detail: body.to_string(),
    })
}

/// What the relay's configuration depends on.
struct RelaySettings {
    nats_url: String,
    clickhouse_url: String,
    wal_dir: PathBuf,
    small_disk: bool,
    stream_max_msgs: Option<u64>,
    metrics_port: u16,
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The relay's configuration for a scenario: MarketPrism's three streams and a consumer each,
/// short redelivery, small batches, an insert timeout the stalls outlast, fast retries.
fn relay_toml(s: &RelaySettings) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "[nats]\nurl = {}\n", quoted(&s.nats_url));
    for (name, subjects) in STREAMS {
        let list: Vec<String> = subjects.iter().map(|x| quoted(x)).collect();
        let _ = writeln!(
            t,
            "[[stream]]\nname = {}\nsubjects = [{}]",
            quoted(name),
            list.join(", ")
        );
        if let Some(max) = s.stream_max_msgs {
            let _ = writeln!(t, "max_msgs = {max}");
        }
        t.push('\n');
    }
    for (stream, durable) in [
        ("MARKET_TRADES", "prism-relay-trades"),
        ("MARKET_BOOKS", "prism-relay-books"),
        ("MARKET_DATA", "prism-relay-data"),
    ] {
        let _ = writeln!(
            t,
            "[[consumer]]\nstream = {}\ndurable = {}\nack_wait_ms = {ACK_WAIT_MS}\n\
             max_ack_pending = 20000\nfetch_batch = 500\nfetch_expires_ms = 250\n",
            quoted(stream),
            quoted(durable)
        );
    }
    let (segment, budget, retention, segments) = if s.small_disk {
        (
            SMALL_SEGMENT_BYTES,
            SMALL_BUDGET_BYTES,
            SMALL_RETENTION_BYTES,
            4,
        )
    } else {
        (4 * 1024 * 1024, 512 * 1024 * 1024, 64 * 1024 * 1024, 16)
    };
    let _ = writeln!(
        t,
        "[wal]\ndir = {}\nsegment_bytes_max = {segment}\ngroup_bytes_max = {}\n\
         budget_bytes_max = {budget}\nretention_bytes_max = {retention}\nretention_segments_max = {segments}\n",
        quoted(&s.wal_dir.display().to_string()),
        segment.min(4 * 1024 * 1024)
    );
    let _ = writeln!(
        t,
        "[clickhouse]\nurl = {}\ndatabase = {}\nprofile = \"auto\"\ncreate_schema = true\n\
         insert_timeout_ms = {INSERT_TIMEOUT_MS}\nconnect_timeout_ms = 1000\n",
        quoted(&s.clickhouse_url),
        quoted(DATABASE)
    );
    let _ = writeln!(
        t,
        "[drain]\nflush_interval_ms = 50\nretry_backoff_initial_ms = 50\nretry_backoff_max_ms = 500\n"
    );
    for table in TABLES {
        let _ = writeln!(
            t,
            "[drain.tables.{table}]\nrows_max = {ROWS_MAX}\nflush_interval_ms = 100\n"
        );
    }
    let _ = writeln!(
        t,
        "[metrics]\nlisten = \"127.0.0.1:{}\"\n\n[shutdown]\ntimeout_ms = 10000",
        s.metrics_port
    );
    t
}

/// Opens (creating) a file for appending.
pub fn open_append(path: &Path) -> Result<File, ChaosError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| ChaosError::io(format!("opening {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loadgen_and_verify_summaries_are_read_by_their_rows() {
        let loadgen = "run x\ndata_type published\ntrade 10\ntotal 42\n\nstream first_seq last_seq published\n\
                       MARKET_TRADES 1 10 10\nelapsed 1.000 s, 42 msg/s, publish errors 3, duplicates 0\nlast ts_ms 1700";
        assert_eq!(
            parse_loadgen(loadgen),
            LoadgenFigures {
                published: 42,
                publish_errors: 3,
                ts_last_ms: 1700
            }
        );
        assert_eq!(parse_loadgen("error: connection refused").published, 0);
        let verify = "stream A seqs 1..=5: 5 messages\ntable published stored dead_lettered lost duplicated unexpected\n\
                      trades 5 5 0 0 0 0\ntotal 5 4 0 1 2 0\nFAILED in 0.1 s: lost 1, duplicated 2";
        assert_eq!(parse_verify_total(verify), Some([5, 4, 0, 1, 2]));
        assert_eq!(parse_verify_total("error"), None);
    }

    #[test]
    fn the_relay_configuration_limits_every_stream_only_when_asked() {
        let settings = RelaySettings {
            nats_url: "nats://127.0.0.1:1".into(),
            clickhouse_url: "http://127.0.0.1:2".into(),
            wal_dir: PathBuf::from("/tmp/w"),
            small_disk: false,
            stream_max_msgs: Some(3000),
            metrics_port: 3,
        };
        let toml = relay_toml(&settings);
        assert_eq!(toml.matches("max_msgs = 3000").count(), 3);
        let toml = relay_toml(&RelaySettings {
            stream_max_msgs: None,
            ..settings
        });
        assert!(!toml.contains("max_msgs"));
        assert_eq!(identity_condition(&BTreeMap::new()), None);
    }
}
