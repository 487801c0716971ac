//! One scenario's world: NATS and ClickHouse from the test bed, the release relay on a
//! configuration written here (MarketPrism's three streams, a durable per stream named by the
//! contender, its own WAL directory and database, every other setting at its default), and the
//! probes the scenarios read: traffic published with `loadgen` as a library, the consumers'
//! state from JetStream, row counts (with FINAL) from ClickHouse, and the relay's CPU time and
//! peak RSS from /proc.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use prism_relay::tools::gen::Mix;
use prism_relay::tools::loadgen::{self, LoadgenOptions, LoadgenSummary};
use prism_testbed::{free_ports, ClickHouse, Nats, Relay};

use crate::error::BenchError;

/// MarketPrism's stream layout (loadgen creates it; the relay declares the same).
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

/// The eight typed tables, as the relay names them.
pub use prism_relay::config::TYPED_TABLES as TABLES;

/// Bound on one ClickHouse query of the bench (a count with FINAL over millions of rows on
/// 18.16 takes seconds on a loaded machine).
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// The relay's retry backoff in the bench: short, so the outage figure measures the drain and
/// not a backoff that happened to be long when ClickHouse came back.
const RETRY_BACKOFF_MAX_MS: u64 = 500;

/// The state of one durable consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerState {
    pub num_pending: u64,
    pub num_ack_pending: u64,
    /// Stream sequence of the ack floor.
    pub ack_floor_stream_seq: u64,
}

/// The servers of a scenario, a tokio runtime for the async probes, and the directory under
/// which relays keep their configurations, logs and WALs.
pub struct World {
    pub dir: PathBuf,
    pub nats: Nats,
    pub ch: ClickHouse,
    pub rt: tokio::runtime::Runtime,
    pub relay_bin: PathBuf,
    /// The relays' `fetch_linger_ms` when set (`--fetch-linger-ms`); their default otherwise.
    pub fetch_linger_ms: Option<u64>,
    client: async_nats::Client,
    /// Where the next publish's timestamps start: past every earlier one's, so no two
    /// publishes of the world share a row identity (the tables collapse rows on their natural
    /// keys, timestamps included, and loadgen runs ahead of the clock at full speed).
    ts_next_ms: AtomicI64,
    /// The next publish's seed.
    seed_next: AtomicU64,
}

/// A relay process of the world and what it was configured with.
pub struct RelayRun {
    pub relay: Relay,
    pub database: String,
    /// Durable consumer names per stream, in [`STREAMS`] order.
    pub durables: [String; 3],
    pub wal_dir: PathBuf,
    pub spawned: Instant,
}

impl World {
    /// Starts NATS and ClickHouse and connects the bench's NATS client.
    pub fn start(dir: &Path, relay_bin: &Path) -> Result<World, BenchError> {
        fs::create_dir_all(dir)
            .map_err(|e| BenchError::io(format!("creating {}", dir.display()), e))?;
        let nats = Nats::start()?;
        let ch = ClickHouse::start()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| BenchError::io("building the tokio runtime", e))?;
        let url = nats.url();
        let client = rt
            .block_on(async_nats::connect(url))
            .map_err(|e| BenchError::nats("connect", e))?;
        Ok(World {
            dir: dir.to_path_buf(),
            nats,
            ch,
            rt,
            relay_bin: relay_bin.to_path_buf(),
            fetch_linger_ms: None,
            client,
            ts_next_ms: AtomicI64::new(0),
            seed_next: AtomicU64::new(1),
        })
    }

    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    pub fn js(&self) -> jetstream::Context {
        // The context spawns a task for its publish acks, so it is built inside the runtime.
        let _entered = self.rt.enter();
        jetstream::new(self.client.clone())
    }

    /// Publishes `count` messages of MarketPrism's mix (or for `duration_s` at `rate_per_s`),
    /// creating the streams when missing. `run_id` keeps message ids apart between calls.
    pub fn publish(
        &self,
        run_id: &str,
        count: Option<u64>,
        rate_per_s: u64,
        duration_s: Option<u64>,
    ) -> Result<LoadgenSummary, BenchError> {
        self.publish_mix(run_id, count, rate_per_s, duration_s, Mix::default())
    }

    /// [`World::publish`] with another mix of types.
    pub fn publish_mix(
        &self,
        run_id: &str,
        count: Option<u64>,
        rate_per_s: u64,
        duration_s: Option<u64>,
        mix: Mix,
    ) -> Result<LoadgenSummary, BenchError> {
        let opts = LoadgenOptions {
            mix,
            nats_url: self.nats.url(),
            create_streams: true,
            count,
            rate_per_s,
            duration_s,
            run_id: Some(run_id.to_string()),
            seed: self.seed_next.fetch_add(1, Ordering::SeqCst),
            ts_start_ms: Some(wall_ms().max(self.ts_next_ms.load(Ordering::SeqCst))),
            progress: false,
            ..LoadgenOptions::default()
        };
        let summary = self.rt.block_on(loadgen::run(&opts))?;
        self.ts_next_ms
            .fetch_max(summary.ts_last_ms.saturating_add(1), Ordering::SeqCst);
        if summary.publish_errors > 0 {
            return Err(BenchError::Output {
                what: "loadgen summary".into(),
                detail: format!(
                    "{} publish errors (first: {})",
                    summary.publish_errors,
                    summary.first_error.as_deref().unwrap_or("?")
                ),
            });
        }
        Ok(summary)
    }

    /// Messages the three streams hold.
    pub fn stream_messages(&self) -> Result<u64, BenchError> {
        let js = self.js();
        self.rt.block_on(async {
            let mut total = 0;
            for (name, _) in STREAMS {
                let mut stream = js
                    .get_stream(name)
                    .await
                    .map_err(|e| BenchError::nats("stream info", e))?;
                let info = stream
                    .info()
                    .await
                    .map_err(|e| BenchError::nats("stream info", e))?;
                total += info.state.messages;
            }
            Ok(total)
        })
    }

    /// The state of the durable `durable` of `stream`.
    pub fn consumer(&self, stream: &str, durable: &str) -> Result<ConsumerState, BenchError> {
        let js = self.js();
        self.rt.block_on(async {
            let stream = js
                .get_stream(stream)
                .await
                .map_err(|e| BenchError::nats("stream info", e))?;
            let info = stream
                .consumer_info(durable)
                .await
                .map_err(|e| BenchError::nats("consumer info", e))?;
            Ok(ConsumerState {
                num_pending: info.num_pending,
                num_ack_pending: info.num_ack_pending as u64,
                ack_floor_stream_seq: info.ack_floor.stream_sequence,
            })
        })
    }

    /// Whether every durable of `durables` (in [`STREAMS`] order) has nothing pending and
    /// nothing unacked; a durable not created yet counts as not drained.
    pub fn consumers_drained(&self, durables: &[String; 3]) -> bool {
        STREAMS.iter().zip(durables).all(|((stream, _), durable)| {
            self.consumer(stream, durable)
                .is_ok_and(|s| s.num_pending == 0 && s.num_ack_pending == 0)
        })
    }

    /// Runs `sql` on ClickHouse.
    pub fn sql(&self, sql: &str) -> Result<String, BenchError> {
        Ok(self.ch.query_with_timeout(sql, QUERY_TIMEOUT)?)
    }

    /// Rows of the eight tables of `database`, with FINAL (one row per identity) or without.
    pub fn rows(&self, database: &str, final_: bool) -> Result<u64, BenchError> {
        let modifier = if final_ { " FINAL" } else { "" };
        let parts: Vec<String> = TABLES
            .iter()
            .map(|t| format!("SELECT count() AS c FROM {database}.{t}{modifier}"))
            .collect();
        let body = self.sql(&format!(
            "SELECT sum(c) FROM ({})",
            parts.join(" UNION ALL ")
        ))?;
        body.trim().parse().map_err(|_| BenchError::Output {
            what: "ClickHouse count".into(),
            detail: body,
        })
    }

    /// Rows the relay dead-lettered in `database` (0 when it has no such table).
    pub fn dead_letters(&self, database: &str) -> u64 {
        self.sql(&format!("SELECT count() FROM {database}.dead_letters"))
            .ok()
            .and_then(|b| b.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until `database` holds `n` rows with FINAL (dead letters counted as accounted
    /// for), polling the cheap count without FINAL first; returns the instant it saw them.
    pub fn wait_rows(
        &self,
        database: &str,
        n: u64,
        poll: Duration,
        timeout: Duration,
        what: &str,
    ) -> Result<Instant, BenchError> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            let dead = self.dead_letters(database);
            match self.rows(database, false) {
                Ok(rows) if rows + dead >= n => match self.rows(database, true) {
                    Ok(final_rows) if final_rows + dead >= n => return Ok(Instant::now()),
                    Ok(final_rows) => last = format!("{final_rows} rows with FINAL of {n}"),
                    Err(e) => last = e.to_string(),
                },
                Ok(rows) => last = format!("{rows} rows (+{dead} dead letters) of {n}"),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Timeout {
                    what: what.to_string(),
                    waited_s: timeout.as_secs(),
                    detail: last,
                });
            }
            std::thread::sleep(poll);
        }
    }

    /// Spawns the release relay on a fresh configuration: durables `<name>-<stream>`, database
    /// `<name>`, WAL under the world's directory. Returns at once (the caller times from
    /// [`RelayRun::spawned`]).
    pub fn spawn_relay(&self, name: &str) -> Result<RelayRun, BenchError> {
        self.spawn_relay_acking(name, false)
    }

    /// [`World::spawn_relay`], its consumers with ack policy all when `ack_all` (explicit, the
    /// default, otherwise).
    pub fn spawn_relay_acking(&self, name: &str, ack_all: bool) -> Result<RelayRun, BenchError> {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir)
            .map_err(|e| BenchError::io(format!("creating {}", dir.display()), e))?;
        let [metrics_port] = free_ports::<1>()?;
        let durables = [
            format!("{name}-trades"),
            format!("{name}-books"),
            format!("{name}-data"),
        ];
        let wal_dir = dir.join("wal");
        let toml = relay_toml(&RelaySettings {
            nats_url: self.nats.url(),
            clickhouse_url: self.ch.http_url(),
            database: name.to_string(),
            durables: durables.clone(),
            wal_dir: wal_dir.clone(),
            metrics_port,
            ack_all,
            fetch_linger_ms: self.fetch_linger_ms,
        });
        let config = dir.join("relay.toml");
        fs::write(&config, toml).map_err(|e| BenchError::io("writing relay.toml", e))?;
        let spawned = Instant::now();
        let relay = Relay::spawn(
            &self.relay_bin,
            &config,
            &dir.join("relay.log"),
            metrics_port,
        )?;
        Ok(RelayRun {
            relay,
            database: name.to_string(),
            durables,
            wal_dir,
            spawned,
        })
    }

    /// Empties the three streams (their consumers stay, with nothing pending).
    pub fn purge_streams(&self) -> Result<(), BenchError> {
        let js = self.js();
        self.rt.block_on(async {
            for (stream, _) in STREAMS {
                js.get_stream(stream)
                    .await
                    .map_err(|e| BenchError::nats("stream info", e))?
                    .purge()
                    .await
                    .map_err(|e| BenchError::nats("purge", e))?;
            }
            Ok(())
        })
    }
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What a relay configuration of the bench depends on.
struct RelaySettings {
    nats_url: String,
    clickhouse_url: String,
    database: String,
    durables: [String; 3],
    wal_dir: PathBuf,
    metrics_port: u16,
    ack_all: bool,
    fetch_linger_ms: Option<u64>,
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The relay's configuration: MarketPrism's streams, one durable each, the WAL and the
/// database of this run, a short retry backoff; everything else at its default.
fn relay_toml(s: &RelaySettings) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "[nats]\nurl = {}\n", quoted(&s.nats_url));
    for (name, subjects) in STREAMS {
        let list: Vec<String> = subjects.iter().map(|x| quoted(x)).collect();
        let _ = writeln!(
            t,
            "[[stream]]\nname = {}\nsubjects = [{}]\n",
            quoted(name),
            list.join(", ")
        );
    }
    for ((stream, _), durable) in STREAMS.iter().zip(&s.durables) {
        let _ = writeln!(
            t,
            "[[consumer]]\nstream = {}\ndurable = {}\n{}",
            quoted(stream),
            quoted(durable),
            if s.ack_all {
                "ack_policy = \"all\"\n"
            } else {
                ""
            }
        );
        if let Some(ms) = s.fetch_linger_ms {
            let _ = writeln!(t, "fetch_linger_ms = {ms}\n");
        }
    }
    let _ = writeln!(
        t,
        "[wal]\ndir = {}\n",
        quoted(&s.wal_dir.display().to_string())
    );
    let _ = writeln!(
        t,
        "[clickhouse]\nurl = {}\ndatabase = {}\nprofile = \"auto\"\ncreate_schema = true\n",
        quoted(&s.clickhouse_url),
        quoted(&s.database)
    );
    let _ = writeln!(
        t,
        "[drain]\nretry_backoff_max_ms = {RETRY_BACKOFF_MAX_MS}\n"
    );
    let _ = writeln!(t, "[metrics]\nlisten = \"127.0.0.1:{}\"", s.metrics_port);
    t
}

/// CPU time (user + system) and peak RSS of a process, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub at: Instant,
    pub cpu_s: f64,
}

/// The kernel's clock ticks per second for /proc/<pid>/stat (`getconf CLK_TCK`; 100 on Linux
/// when it cannot be asked).
pub fn clock_ticks_per_s() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, in seconds.
pub fn proc_cpu(pid: u32, ticks_per_s: f64) -> Result<ProcSample, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).map_err(|e| BenchError::io(path.clone(), e))?;
    // The command name (field 2) is in parentheses and may hold spaces: fields count from the
    // last ')'; utime and stime are fields 14 and 15, the 12th and 13th after it.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (tick(11), tick(12)) {
        (Some(u), Some(s)) => Ok(ProcSample {
            at: Instant::now(),
            cpu_s: (u + s) as f64 / ticks_per_s,
        }),
        _ => Err(BenchError::Output {
            what: path,
            detail: text,
        }),
    }
}

/// Bytes process `pid` has read so far through read-like system calls (`rchar` of
/// `/proc/<pid>/io`, whether the page cache or the disk answered); None when it cannot be read.
pub fn proc_read_bytes(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// CPU % of one core between two samples.
pub fn cpu_pct(a: ProcSample, b: ProcSample) -> f64 {
    let wall = b.at.duration_since(a.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    (b.cpu_s - a.cpu_s) / wall * 100.0
}

/// Peak resident set size (VmHWM) of `pid`, in MiB.
pub fn proc_peak_rss_mib(pid: u32) -> Result<f64, BenchError> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(|e| BenchError::io(path.clone(), e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .ok_or(BenchError::Output {
            what: path,
            detail: "no VmHWM line".into(),
        })
}

/// Bytes of the files under `dir` (0 when it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_configuration_names_the_run_durables_database_and_wal() {
        let settings = |ack_all| RelaySettings {
            nats_url: "nats://127.0.0.1:1".into(),
            clickhouse_url: "http://127.0.0.1:2".into(),
            database: "relay_1".into(),
            durables: ["a".into(), "b".into(), "c".into()],
            wal_dir: PathBuf::from("/tmp/w"),
            metrics_port: 3,
            ack_all,
            fetch_linger_ms: None,
        };
        let toml = relay_toml(&settings(false));
        assert!(!toml.contains("ack_policy"));
        let all = relay_toml(&settings(true));
        assert_eq!(all.matches("ack_policy = \"all\"").count(), 3);
        let parsed = prism_relay::config::Config::parse_toml(&all).expect("a valid configuration");
        assert!(parsed
            .consumer
            .iter()
            .all(|c| c.ack_policy == prism_relay::config::AckPolicyKind::All));
        assert_eq!(toml.matches("[[consumer]]").count(), 3);
        assert!(toml.contains("durable = \"b\""));
        assert!(toml.contains("database = \"relay_1\""));
        assert!(toml.contains("dir = \"/tmp/w\""));
        assert!(toml.contains("listen = \"127.0.0.1:3\""));
        assert!(!toml.contains("fetch_linger_ms"));
        let lingering = relay_toml(&RelaySettings {
            fetch_linger_ms: Some(200),
            ..settings(false)
        });
        let parsed =
            prism_relay::config::Config::parse_toml(&lingering).expect("a valid configuration");
        assert!(parsed.consumer.iter().all(|c| c.fetch_linger_ms == 200));
    }
}
