//! `prism-cluster-demo`: the scale-out demo (`scripts/demo --cluster`).
//!
//! It starts locally, through the test bed, a three-node NATS JetStream cluster (the relays
//! create MarketPrism's streams with three replicas), ZooKeeper and two ClickHouse 18.16
//! replicas of one shard with the cluster layout's schema (`prism-relay schema apply --profile
//! cluster`), and two relays sharing the three durable consumers, relay 1 inserting into
//! replica 1 and relay 2 into replica 2. While `prism-relay loadgen` publishes MarketPrism
//! traffic of every type through all three NATS URLs, it kills with SIGKILL, one after the
//! other and each brought back: the NATS node leading the trades stream, ClickHouse replica 2
//! (relay 2 buffers in its WAL meanwhile, relay 1 goes on inserting), and relay 2 (its unacked
//! messages are redelivered to relay 1; restarted, it drains its WAL). Then it waits for the
//! drain, runs `prism-relay verify` against replica 1, compares the FINAL contents of every
//! table on both replicas, and ends with
//!
//! ```text
//! demo: published=<N> stored=<N> lost=0 duplicated=0
//! cluster: nats=3 clickhouse_replicas=2 relays=2 replicas_equal=yes
//! ```
//!
//! exiting 0, or with the true figures and exit 1.
//!
//! Usage: `prism-cluster-demo --relay-bin PATH --work-dir DIR`.

#[path = "../error.rs"]
mod error;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use error::ChaosError;
use prism_testbed::{
    free_ports, ClickHouse, ClickHouseOptions, NatsCluster, Relay, Replication, ZooKeeper,
};

/// NATS nodes, and replicas of every stream.
const NATS_NODES: usize = 3;

/// The ClickHouse cluster's name in both replicas' `<remote_servers>`.
const CLUSTER: &str = "prism";

/// The database the relays write into.
const DATABASE: &str = "marketprism_hot";

/// The typed tables and the dead letters: every table whose contents the replicas must share.
const TABLES: [&str; 9] = [
    "trades",
    "orderbooks",
    "funding_rates",
    "open_interests",
    "liquidations",
    "lsr_top_positions",
    "lsr_all_accounts",
    "volatility_indices",
    "dead_letters",
];

/// MarketPrism's stream layout, which the relays create with [`NATS_NODES`] replicas.
const STREAMS: [(&str, &str); 3] = [
    ("MARKET_TRADES", "[\"trade.>\"]"),
    ("MARKET_BOOKS", "[\"orderbook.>\"]"),
    (
        "MARKET_DATA",
        "[\"funding_rate.>\", \"open_interest.>\", \"liquidation.>\", \"volatility_index.>\", \
         \"lsr_top_position.>\", \"lsr_all_account.>\"]",
    ),
];

/// The durable consumers both relays share.
const CONSUMERS: [(&str, &str); 3] = [
    ("MARKET_TRADES", "prism-relay-trades"),
    ("MARKET_BOOKS", "prism-relay-books"),
    ("MARKET_DATA", "prism-relay-data"),
];

/// The stream whose leader's node is killed.
const LEADER_STREAM: &str = "MARKET_TRADES";

/// Messages per second loadgen publishes: traffic a 2-core machine carries next to three NATS
/// nodes, two ClickHouse servers, ZooKeeper and two relays, with room to catch up.
const LOAD_RATE_PER_S: u64 = 800;

/// Length of the traffic, in seconds: long enough for the three faults one after the other.
const LOAD_DURATION_S: u64 = 45;

/// When, after the traffic starts, each fault comes, in seconds.
const NATS_KILL_AT_S: u64 = 5;
const REPLICA_KILL_AT_S: u64 = 17;
const RELAY_KILL_AT_S: u64 = 30;

/// How long each killed process stays down, in milliseconds.
const OUTAGE_MS: u64 = 5_000;

/// Redelivery delay of the shared consumers, in milliseconds: what a killed relay had been
/// handed and had not acked comes to the other relay this long after.
const ACK_WAIT_MS: u64 = 5_000;

/// How long a relay may take from spawn to `/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the relays may take to store everything once the traffic ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// How long replica 2 may take to hold what replica 1 holds once the drain is complete.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(90);

/// Bound on an election of the stream's leader after its node died.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on one monitoring or metrics request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause between two looks at a condition the demo waits for.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How long one `prism-relay` subcommand (schema apply, verify) may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The command line.
struct Args {
    relay_bin: PathBuf,
    work_dir: PathBuf,
}

const USAGE: &str = "usage: prism-cluster-demo --relay-bin PATH --work-dir DIR";

fn parse_args() -> Result<Args, String> {
    let mut relay_bin = None;
    let mut work_dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--relay-bin" => relay_bin = Some(PathBuf::from(value)),
            "--work-dir" => work_dir = Some(PathBuf::from(value)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        relay_bin: relay_bin.ok_or("--relay-bin is required")?,
        work_dir: work_dir.ok_or("--work-dir is required")?,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("cluster demo failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// One step of the demo's story, on the terminal.
fn say(line: &str) {
    println!("==> {line}");
}

/// Everything the demo started; dropping it kills every process.
struct Cluster {
    relays: Vec<Relay>,
    nats: NatsCluster,
    replicas: Vec<ClickHouse>,
    _zookeeper: ZooKeeper,
}

fn run(args: &Args) -> Result<bool, ChaosError> {
    let work = &args.work_dir;
    if work.exists() {
        fs::remove_dir_all(work).map_err(|e| ChaosError::io("clearing the work directory", e))?;
    }
    fs::create_dir_all(work).map_err(|e| ChaosError::io("creating the work directory", e))?;
    let started = Instant::now();

    say("ZooKeeper and two ClickHouse 18.16 replicas of one shard");
    let zookeeper = ZooKeeper::start()?;
    let replica = |name: &str| {
        ClickHouse::start_with(&ClickHouseOptions {
            replication: Some(Replication {
                zookeeper_port: zookeeper.port(),
                shard: "01".into(),
                replica: name.into(),
            }),
            ..ClickHouseOptions::default()
        })
    };
    let replicas = vec![replica("replica1")?, replica("replica2")?];
    let ports: Vec<u16> = replicas.iter().map(ClickHouse::tcp_port).collect();
    for server in &replicas {
        server.set_cluster(CLUSTER, &ports)?;
    }
    say("three NATS nodes forming one JetStream cluster");
    let nats = NatsCluster::start(NATS_NODES)?;
    for i in 0..nats.len() {
        println!("    node {i}: {}", nats.node(i).url());
    }

    let configs = [1, 2].map(|i| {
        let path = work.join(format!("relay{i}.toml"));
        let other = &replicas[2 - i];
        (path, relay_config(&nats, &replicas[i - 1], other, work, i))
    });
    for (path, (text, _)) in &configs {
        fs::write(path, text).map_err(|e| ChaosError::io("writing a relay configuration", e))?;
    }
    say("cluster schema: prism-relay schema apply --profile cluster");
    let schema = relay_command(
        &args.relay_bin,
        &[
            "schema",
            "apply",
            "--profile",
            "cluster",
            "--config",
            &configs[0].0.display().to_string(),
        ],
        &work.join("schema.log"),
    )?;
    if !schema.0 {
        return Err(ChaosError::Check(format!(
            "schema apply failed:\n{}",
            schema.1
        )));
    }

    say("two relays sharing the durable consumers: relay 1 inserts into replica 1, relay 2 into replica 2");
    let mut cluster = Cluster {
        relays: Vec::new(),
        nats,
        replicas,
        _zookeeper: zookeeper,
    };
    for (i, (path, (_, metrics_port))) in configs.iter().enumerate() {
        // One after the other: the first creates the streams (three replicas) and consumers.
        let mut relay = Relay::spawn(
            &args.relay_bin,
            path,
            &work.join(format!("relay{}.log", i + 1)),
            *metrics_port,
        )?;
        relay.wait_ready(READY_TIMEOUT)?;
        cluster.relays.push(relay);
    }

    say(&format!(
        "loadgen: {LOAD_DURATION_S} s at {LOAD_RATE_PER_S} msg/s, every MarketPrism type, through all three NATS URLs"
    ));
    let mut load = start_loadgen(&args.relay_bin, &cluster.nats.url(), work)?;
    let load_started = Instant::now();

    wait_until_elapsed(load_started, NATS_KILL_AT_S);
    kill_stream_leader(&mut cluster)?;

    wait_until_elapsed(load_started, REPLICA_KILL_AT_S);
    say("kill -9 ClickHouse replica 2: relay 2 buffers in its WAL, relay 1 goes on inserting into replica 1");
    cluster.replicas[1].kill9()?;
    thread::sleep(Duration::from_millis(OUTAGE_MS));
    cluster.replicas[1].restart()?;
    println!("    replica 2 restarted on its data; it fetches what it missed from replica 1");

    wait_until_elapsed(load_started, RELAY_KILL_AT_S);
    say("kill -9 relay 2: its unacked messages are redelivered to relay 1");
    cluster.relays[1].kill9()?;
    thread::sleep(Duration::from_millis(OUTAGE_MS));
    cluster.relays[1].start()?;
    cluster.relays[1].wait_ready(READY_TIMEOUT)?;
    println!("    relay 2 restarted on its WAL and drains it");

    let loadgen_ok = load
        .wait()
        .map_err(|e| ChaosError::io("waiting for loadgen", e))?
        .success();
    let loadgen_log = fs::read_to_string(work.join("loadgen.log")).unwrap_or_default();
    for line in loadgen_log.lines().filter(|l| l.starts_with("elapsed")) {
        println!("    loadgen: {line}");
    }
    if !loadgen_ok {
        println!(
            "    loadgen failed; see {}",
            work.join("loadgen.log").display()
        );
    }

    say("waiting for the drain (prism-relay verify against replica 1)");
    let totals = wait_drained(args, &cluster, work)?;
    say("comparing the FINAL contents of every table on both replicas");
    let replicas_equal = wait_replicas_equal(&cluster.replicas);
    for relay in &mut cluster.relays {
        relay.terminate(Duration::from_secs(20))?;
    }
    println!("    total {:.0} s", started.elapsed().as_secs_f64());

    let [published, stored, lost, duplicated] = totals;
    println!("demo: published={published} stored={stored} lost={lost} duplicated={duplicated}");
    println!(
        "cluster: nats={NATS_NODES} clickhouse_replicas={} relays={} replicas_equal={}",
        cluster.replicas.len(),
        cluster.relays.len(),
        if replicas_equal { "yes" } else { "no" }
    );
    Ok(loadgen_ok && lost == 0 && duplicated == 0 && stored == published && replicas_equal)
}

/// Relay `i`'s configuration (and its metrics port): all three NATS URLs, the three streams
/// with three replicas, the shared durables, its own WAL, `replica` for its inserts and the
/// cluster layout (with `other` as the replica `check` also verifies).
fn relay_config(
    nats: &NatsCluster,
    replica: &ClickHouse,
    other: &ClickHouse,
    work: &Path,
    i: usize,
) -> (String, u16) {
    // A port that was free a moment ago; the relay binds it at once.
    let metrics_port = free_ports::<1>().map(|[p]| p).unwrap_or(0);
    let mut toml = format!("[nats]\nurl = \"{}\"\n\n", nats.url());
    for (name, subjects) in STREAMS {
        toml.push_str(&format!(
            "[[stream]]\nname = \"{name}\"\nsubjects = {subjects}\nreplicas = {NATS_NODES}\n\n"
        ));
    }
    for (stream, durable) in CONSUMERS {
        toml.push_str(&format!(
            "[[consumer]]\nstream = \"{stream}\"\ndurable = \"{durable}\"\nack_wait_ms = {ACK_WAIT_MS}\n\n"
        ));
    }
    toml.push_str(&format!(
        "[wal]\ndir = \"{}\"\n\n\
         [clickhouse]\nurl = \"{}\"\ndatabase = \"{DATABASE}\"\ncreate_schema = false\n\
         insert_timeout_ms = 5000\ncluster = \"{CLUSTER}\"\nreplica_urls = [\"{}\"]\n\n\
         [drain]\nretry_backoff_initial_ms = 100\nretry_backoff_max_ms = 1000\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        work.join(format!("relay{i}-wal")).display(),
        replica.http_url(),
        other.http_url(),
    ));
    (toml, metrics_port)
}

/// Runs a `prism-relay` subcommand to its end (bounded by [`COMMAND_TIMEOUT`]), its output in
/// `log`; returns whether it succeeded and its output.
fn relay_command(binary: &Path, args: &[&str], log: &Path) -> Result<(bool, String), ChaosError> {
    let out = fs::File::create(log).map_err(|e| ChaosError::io("creating a command log", e))?;
    let err = out
        .try_clone()
        .map_err(|e| ChaosError::io("cloning a command log", e))?;
    let mut child = Command::new(binary)
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("PRISM_RELAY_CONFIG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| ChaosError::io("spawning prism-relay", e))?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| ChaosError::io("polling prism-relay", e))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            // Killing a child that has just exited fails harmlessly; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
            return Err(ChaosError::Timeout {
                what: format!("prism-relay {}", args.join(" ")),
                waited_ms: u64::try_from(COMMAND_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
                detail: String::new(),
            });
        }
        thread::sleep(POLL_INTERVAL);
    };
    let text = fs::read_to_string(log).unwrap_or_default();
    Ok((status.success(), text))
}

/// Starts `prism-relay loadgen` in the background, its output in `loadgen.log`.
fn start_loadgen(binary: &Path, nats_url: &str, work: &Path) -> Result<Child, ChaosError> {
    let log = fs::File::create(work.join("loadgen.log"))
        .map_err(|e| ChaosError::io("creating the loadgen log", e))?;
    let err = log
        .try_clone()
        .map_err(|e| ChaosError::io("cloning the loadgen log", e))?;
    Command::new(binary)
        .args(["loadgen", "--nats-url", nats_url])
        .args(["--rate-per-s", &LOAD_RATE_PER_S.to_string()])
        .args(["--duration-s", &LOAD_DURATION_S.to_string()])
        .arg("--no-progress")
        .env("RUST_LOG", "warn")
        .env_remove("PRISM_RELAY_CONFIG")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| ChaosError::io("spawning loadgen", e))
}

/// Sleeps until `seconds` after `start` (the fault timeline is wall-clock by design).
fn wait_until_elapsed(start: Instant, seconds: u64) {
    let at = start + Duration::from_secs(seconds);
    let now = Instant::now();
    if at > now {
        thread::sleep(at - now);
    }
}

/// The server name of `stream`'s leader as a running node's `/jsz` reports it.
fn stream_leader(nats: &NatsCluster, stream: &str) -> Option<String> {
    (0..nats.len())
        .filter(|&i| nats.node(i).pid().is_some())
        .find_map(|i| {
            let path = "/jsz?streams=true";
            let (status, body) =
                prism_testbed::http_get(nats.node(i).monitor_port(), path, HTTP_TIMEOUT).ok()?;
            if status != 200 {
                return None;
            }
            let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
            jsz.get("account_details")?
                .as_array()?
                .iter()
                .filter_map(|account| account.get("stream_detail")?.as_array())
                .flatten()
                .find(|s| s.get("name").and_then(serde_json::Value::as_str) == Some(stream))?
                .get("cluster")?
                .get("leader")?
                .as_str()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
        })
}

/// Kills the node leading [`LEADER_STREAM`], waits for the next leader, brings the node back.
fn kill_stream_leader(cluster: &mut Cluster) -> Result<(), ChaosError> {
    let leader = wait_for("a leader of the trades stream", ELECTION_TIMEOUT, || {
        stream_leader(&cluster.nats, LEADER_STREAM)
    })?;
    let node = cluster
        .nats
        .index_of(&leader)
        .ok_or_else(|| ChaosError::Check(format!("stream leader {leader} is no node of ours")))?;
    say(&format!(
        "kill -9 NATS node {node}, the leader of {LEADER_STREAM}: the two others elect a new one"
    ));
    cluster.nats.node_mut(node).kill9()?;
    let killed = Instant::now();
    let next = wait_for(
        "a new leader of the trades stream",
        ELECTION_TIMEOUT,
        || stream_leader(&cluster.nats, LEADER_STREAM).filter(|l| *l != leader),
    )?;
    println!(
        "    node {} leads {LEADER_STREAM} after {} ms",
        cluster.nats.index_of(&next).map_or(-1, |i| i as i64),
        killed.elapsed().as_millis()
    );
    let down = Duration::from_millis(OUTAGE_MS);
    if killed.elapsed() < down {
        thread::sleep(down - killed.elapsed());
    }
    cluster.nats.node_mut(node).restart()?;
    println!("    node {node} restarted on its store and caught up");
    Ok(())
}

/// Polls `f` until it yields a value or `timeout` passes.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, ChaosError> {
    let start = Instant::now();
    loop {
        if let Some(value) = f() {
            return Ok(value);
        }
        if start.elapsed() >= timeout {
            return Err(ChaosError::Timeout {
                what: what.to_owned(),
                waited_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                detail: String::new(),
            });
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Runs verify against replica 1 until it reports nothing lost or [`DRAIN_TIMEOUT`] passes;
/// returns the last `total` figures: published, stored, lost, duplicated.
fn wait_drained(args: &Args, cluster: &Cluster, work: &Path) -> Result<[u64; 4], ChaosError> {
    let nats_url = cluster.nats.url();
    let ch_url = cluster.replicas[0].http_url();
    let verify = [
        "verify",
        "--nats-url",
        &nats_url,
        "--clickhouse-url",
        &ch_url,
        "--database",
        DATABASE,
    ];
    let start = Instant::now();
    loop {
        let (ok, text) = relay_command(&args.relay_bin, &verify, &work.join("verify.log"))?;
        let totals = verify_totals(&text);
        if ok || start.elapsed() >= DRAIN_TIMEOUT {
            print!("{text}");
            return totals.ok_or_else(|| ChaosError::Output {
                what: "prism-relay verify".into(),
                detail: text,
            });
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// The `total` line of verify's table: published, stored, lost, duplicated.
fn verify_totals(text: &str) -> Option<[u64; 4]> {
    let line = text.lines().find(|l| l.starts_with("total "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // Columns: published, stored, dead_lettered, lost, duplicated, unexpected.
    Some([
        *fields.first()?,
        *fields.get(1)?,
        *fields.get(3)?,
        *fields.get(4)?,
    ])
}

/// Per table, the FINAL row count and a checksum of the rows' identities on `server`.
fn contents(server: &ClickHouse) -> Option<String> {
    TABLES
        .iter()
        .map(|table| {
            server
                .query(&format!(
                    "SELECT '{table}', count(), sum(cityHash64(nats_stream, nats_seq)) \
                     FROM {DATABASE}.{table} FINAL"
                ))
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .collect::<Option<Vec<_>>>()
        .map(|lines| lines.join("\n"))
}

/// Polls until both replicas hold the same FINAL contents in every table.
fn wait_replicas_equal(replicas: &[ClickHouse]) -> bool {
    let start = Instant::now();
    loop {
        let first = contents(&replicas[0]);
        if first.is_some() && replicas[1..].iter().all(|r| contents(r) == first) {
            return true;
        }
        if start.elapsed() >= REPLICATION_TIMEOUT {
            println!(
                "    replicas differ after {} s:\n{}",
                REPLICATION_TIMEOUT.as_secs(),
                replicas
                    .iter()
                    .map(|r| contents(r).unwrap_or_else(|| "unreachable".into()))
                    .collect::<Vec<_>>()
                    .join("\n--\n")
            );
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
}
