//! The scenarios of the bench. Each starts its own world (fresh servers), runs the release
//! relay and its same-run baselines on the same traffic, and reports one line per figure.
//!
//! Latency approximations (also printed): the ack latency of a message is the time the bench
//! sees the relay's ack on `$JS.ACK.>` minus the stream timestamp the ack's subject carries
//! (the nanoseconds JetStream stored the message at, the token after the consumer sequence);
//! the visible latency maps ClickHouse's row count, polled every [`VISIBLE_POLL`], to publish
//! times: loadgen publishes at an even pace, so of `n` messages published over `elapsed` the
//! k-th is taken as published at `start + k * elapsed / n`, and the first k messages as visible
//! once the count reaches k (rows arriving out of publish order blur single messages, not the
//! distribution's scale; `start` is taken just before loadgen connects, which adds its
//! connection time, a few milliseconds, to every visible latency).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::json;

use prism_relay::tools::gen::Mix;

use crate::contenders;
use crate::error::BenchError;
use crate::report::{median, quantile, thousands, verdict, Report};
use crate::walbench;
use crate::world::{self, RelayRun, World, STREAMS};

/// The counts of a run.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Messages of the backlog the drain contenders each consume.
    pub drain_n: u64,
    /// Rounds of the drain contenders (medians are reported).
    pub rounds: usize,
    /// Messages in the WAL when ClickHouse comes back.
    pub outage_n: u64,
    /// Payload MiB the WAL scenario appends (and the raw baseline writes).
    pub wal_mib: u64,
    pub steady_s: u64,
    pub idle_s: u64,
    /// WAL size (bytes of its directory) the restart is measured with.
    pub restart_wal_bytes: u64,
    pub latency_s: u64,
    /// The types of the drain's backlog.
    pub drain_mix: Mix,
}

const MIB: u64 = 1024 * 1024;

impl Scale {
    pub fn new(quick: bool) -> Scale {
        if quick {
            Scale {
                drain_n: 200_000,
                rounds: 1,
                outage_n: 300_000,
                wal_mib: 64,
                steady_s: 20,
                idle_s: 20,
                restart_wal_bytes: 512 * MIB,
                latency_s: 10,
                drain_mix: Mix::default(),
            }
        } else {
            Scale {
                drain_n: 1_000_000,
                rounds: 2,
                outage_n: 2_000_000,
                wal_mib: 256,
                steady_s: 60,
                idle_s: 60,
                // Just under the default 4 GiB WAL budget, at which the relay stops fetching.
                restart_wal_bytes: 4 * 1024 * MIB - 128 * MIB,
                latency_s: 30,
                drain_mix: Mix::default(),
            }
        }
    }
}

/// The targets docs/PERFORMANCE.md sets.
const DRAIN_RATIO_MIN: f64 = 0.6;
const OUTAGE_RATIO_MIN: f64 = 0.6;
const WAL_RATIO_MIN: f64 = 0.5;
const CPU_PCT_MAX: f64 = 2.0;
const RSS_MIB_MAX: f64 = 40.0;
const IDLE_CPU_PCT_MAX: f64 = 0.2;
const RESTART_S_MAX: f64 = 1.0;
const ACK_P99_MS_MAX: f64 = 5.0;
const VISIBLE_P99_S_MAX: f64 = 1.5;

/// MarketPrism's real rate per relay (the steady scenario).
const STEADY_RATE_PER_S: u64 = 1_200;
/// The latency scenario's rate.
const LATENCY_RATE_PER_S: u64 = 20_000;

/// Pause between two looks at the consumers while a drain runs (100 ms: fine enough for drains of seconds, light on the servers).
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// Pause between two looks at ClickHouse while waiting for the rows.
const ROWS_POLL: Duration = Duration::from_millis(200);
/// Longest drain accepted; longer is an error (something is stuck).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the relay may take to become ready (schema creation included).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Quiet time after the relay became ready before the idle window starts.
const IDLE_SETTLE: Duration = Duration::from_secs(2);
/// Bound on the relay's SIGTERM shutdown between contenders.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the restart probe waits for an ack before it looks at the ack floor again (the
/// figure's resolution when the ack is missed).
const RESTART_POLL: Duration = Duration::from_millis(10);
/// Longest restart accepted.
const RESTART_TIMEOUT: Duration = Duration::from_secs(300);
/// Messages per top-up while filling the WAL to the restart's size.
const TOP_UP_MESSAGES: u64 = 250_000;
/// The latency reference's durables: `<FOLLOWER_NAME>-<stream>`.
const FOLLOWER_NAME: &str = "bench_latency_follow";
/// ClickHouse count polls of the latency scenario.
const VISIBLE_POLL: Duration = Duration::from_millis(100);
/// Bound on the latency scenario's wait for its last rows and acks.
const LATENCY_SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Waits until the relay acked everything (its durables have nothing pending or unacked);
/// fails when the relay exits or `timeout` passes.
fn wait_acked(world: &World, run: &mut RelayRun, timeout: Duration) -> Result<(), BenchError> {
    let log = run.relay.log_path().display().to_string();
    poll_until(
        timeout,
        "the relay acking every message",
        &format!("see {log}"),
        || {
            if world.consumers_drained(&run.durables) {
                return Ok(true);
            }
            match run.relay.try_exit()? {
                Some(status) => Err(BenchError::Output {
                    what: "relay exit".into(),
                    detail: format!("{status}; see {log}"),
                }),
                None => Ok(false),
            }
        },
    )
}

/// Looks at `done` every [`DRAIN_POLL`] until it says true or fails; after `timeout`, an error
/// naming `what` (with `detail`).
fn poll_until(
    timeout: Duration,
    what: &str,
    detail: &str,
    mut done: impl FnMut() -> Result<bool, BenchError>,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    while !done()? {
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout {
                what: what.to_string(),
                waited_s: timeout.as_secs(),
                detail: detail.to_string(),
            });
        }
        thread::sleep(DRAIN_POLL);
    }
    Ok(())
}

/// What one cold relay drain took: its rate, when the durables were drained (ingest done) and
/// the CPU each process spent meanwhile, which says what limits the drain.
struct RelayDrain {
    rate: f64,
    acked_s: f64,
    stored_s: f64,
    relay_cpu_s: f64,
    clickhouse_cpu_s: f64,
    nats_cpu_s: f64,
}

/// CPU seconds so far of process `pid` (0 for a process that is gone).
fn cpu_of(pid: Option<u32>, ticks: f64) -> f64 {
    pid.and_then(|pid| world::proc_cpu(pid, ticks).ok())
        .map_or(0.0, |s| s.cpu_s)
}

/// CPU seconds so far of the relay, ClickHouse and NATS (0 for a process that is gone).
fn cpu_seconds(world: &World, run: &RelayRun, ticks: f64) -> [f64; 3] {
    [
        cpu_of(run.relay.pid(), ticks),
        cpu_of(world.ch.pid(), ticks),
        cpu_of(world.nats.pid(), ticks),
    ]
}

/// One cold relay drain of the backlog: msg/s from spawn until every message is acked and in
/// ClickHouse with FINAL.
fn relay_drain(world: &World, name: &str, n: u64, ack_all: bool) -> Result<RelayDrain, BenchError> {
    let ticks = world::clock_ticks_per_s();
    let mut run = world.spawn_relay_acking(name, ack_all)?;
    let before = cpu_seconds(world, &run, ticks);
    wait_acked(world, &mut run, DRAIN_TIMEOUT)?;
    let acked_s = run.spawned.elapsed().as_secs_f64();
    let done = world.wait_rows(
        &run.database,
        n,
        ROWS_POLL,
        DRAIN_TIMEOUT,
        "the relay's rows",
    )?;
    let after = cpu_seconds(world, &run, ticks);
    let stored_s = done.duration_since(run.spawned).as_secs_f64();
    run.relay.terminate(TERMINATE_TIMEOUT)?;
    Ok(RelayDrain {
        rate: n as f64 / stored_s,
        acked_s,
        stored_s,
        relay_cpu_s: after[0] - before[0],
        clickhouse_cpu_s: after[1] - before[1],
        nats_cpu_s: after[2] - before[2],
    })
}

fn check_count(what: &str, got: u64, n: u64) -> Result<(), BenchError> {
    if got == n {
        Ok(())
    } else {
        Err(BenchError::Output {
            what: what.to_string(),
            detail: format!("{got} messages, expected {n}"),
        })
    }
}

/// Backlog drain: the relay, the raw consumer (ack all and explicit) and the relay without a
/// WAL, each through its own durables (and database), alternating over the rounds.
pub fn drain(world: &World, scale: &Scale, report: &mut Report) -> Result<(), BenchError> {
    let n = scale.drain_n;
    let published = world.publish_mix("backlog", Some(n), 0, None, scale.drain_mix)?;
    check_count("backlog", published.published_total(), n)?;
    check_count("backlog in the streams", world.stream_messages()?, n)?;
    let js = world.js();
    let mut figures: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut profile = Vec::new();
    const ORDER: [&str; 5] = [
        "relay",
        "raw_all",
        "relay_ack_all",
        "raw_explicit",
        "no_wal",
    ];
    for round in 0..scale.rounds {
        for i in 0..ORDER.len() {
            // Each round starts with another contender, so none always runs on a cold or warm
            // page cache.
            let who = ORDER[(i + round) % ORDER.len()];
            let name = format!("bench_{who}_{round}");
            let rate = match who {
                "relay" | "relay_ack_all" => {
                    let d = relay_drain(world, &name, n, who == "relay_ack_all")?;
                    eprintln!(
                        "  drain round {round}: {who} acked all in {:.2} s, all stored in {:.2} s; CPU s: relay {:.2}, clickhouse {:.2}, nats {:.2}",
                        d.acked_s, d.stored_s, d.relay_cpu_s, d.clickhouse_cpu_s, d.nats_cpu_s
                    );
                    profile.push(
                        json!({"contender": who, "round": round, "acked_s": d.acked_s, "stored_s": d.stored_s,
                        "relay_cpu_s": d.relay_cpu_s, "clickhouse_cpu_s": d.clickhouse_cpu_s,
                        "nats_cpu_s": d.nats_cpu_s}),
                    );
                    d.rate
                }
                "raw_all" | "raw_explicit" => {
                    let (got, d) =
                        world
                            .rt
                            .block_on(contenders::raw_consume(&js, &name, who == "raw_all"))?;
                    check_count(who, got, n)?;
                    n as f64 / d.as_secs_f64()
                }
                _ => {
                    let (got, d) = world.rt.block_on(contenders::no_wal_relay(
                        &js,
                        &world.ch.http_url(),
                        &name,
                    ))?;
                    check_count(who, got, n)?;
                    check_count("no-WAL relay rows", world.rows(&name, true)?, n)?;
                    n as f64 / d.as_secs_f64()
                }
            };
            eprintln!("  drain round {round}: {who} {} msg/s", thousands(rate));
            figures.entry(who).or_default().push(rate);
        }
    }
    let m = |who: &str| median(figures.get(who).map_or(&[][..], Vec::as_slice)).unwrap_or(0.0);
    let (relay, raw, explicit, no_wal) = (m("relay"), m("raw_all"), m("raw_explicit"), m("no_wal"));
    let relay_ack_all = m("relay_ack_all");
    let ratio = relay / raw;
    report.summary.drain_ratio = Some(ratio);
    let counts = format!(
        "(n={}, {}, median of {} round(s))",
        thousands(n as f64),
        if scale.drain_mix == Mix::default() {
            "mixed MarketPrism messages".to_string()
        } else {
            format!("mix {}", scale.drain_mix)
        },
        scale.rounds
    );
    report.line(
        "drain",
        format!(
            "drain    relay {} msg/s  baseline(raw ack-all) {} msg/s  ratio {ratio:.2}  target >={DRAIN_RATIO_MIN} {}  {counts}",
            thousands(relay),
            thousands(raw),
            verdict(ratio >= DRAIN_RATIO_MIN)
        ),
        json!({"relay_msg_per_s": relay, "baseline_msg_per_s": raw, "ratio": ratio,
               "target_min": DRAIN_RATIO_MIN, "n": n, "rounds": scale.rounds, "all": figures,
               "relay_rounds": profile}),
    );
    report.line(
        "drain_relay_ack_all",
        format!(
            "drain    relay with ack policy all {} msg/s  baseline(raw ack-all) {} msg/s  ratio {:.2}  (no target; for a relay alone on its durables)  {counts}",
            thousands(relay_ack_all),
            thousands(raw),
            relay_ack_all / raw
        ),
        json!({"msg_per_s": relay_ack_all, "baseline_msg_per_s": raw, "ratio": relay_ack_all / raw, "n": n}),
    );
    report.line(
        "drain_raw_explicit",
        format!(
            "drain    raw explicit-ack consumer {} msg/s  baseline(raw ack-all) {} msg/s  ratio {:.2}  (no target)  {counts}",
            thousands(explicit),
            thousands(raw),
            explicit / raw
        ),
        json!({"msg_per_s": explicit, "baseline_msg_per_s": raw, "ratio": explicit / raw, "n": n}),
    );
    report.line(
        "drain_no_wal",
        format!(
            "drain    relay without WAL (fetch, insert, ack) {} msg/s  baseline(raw ack-all) {} msg/s  ratio {:.2}  (no target; relay/no-WAL {:.2})  {counts}",
            thousands(no_wal),
            thousands(raw),
            no_wal / raw,
            relay / no_wal
        ),
        json!({"msg_per_s": no_wal, "baseline_msg_per_s": raw, "ratio": no_wal / raw,
               "relay_over_no_wal": relay / no_wal, "n": n}),
    );
    Ok(())
}

/// WAL append with group commit against sequential write + fdatasync on the same disk.
pub fn wal(dir: &std::path::Path, scale: &Scale, report: &mut Report) -> Result<(), BenchError> {
    let mut ratios = Vec::new();
    let mut runs = Vec::new();
    for _ in 0..scale.rounds {
        let f = walbench::measure(dir, scale.wal_mib)?;
        ratios.push(f.wal_mib_per_s / f.raw_mib_per_s);
        runs.push(f);
    }
    let ratio = median(&ratios).unwrap_or(0.0);
    let wal = median(&runs.iter().map(|f| f.wal_mib_per_s).collect::<Vec<_>>()).unwrap_or(0.0);
    let raw = median(&runs.iter().map(|f| f.raw_mib_per_s).collect::<Vec<_>>()).unwrap_or(0.0);
    let per_group =
        median(&runs.iter().map(|f| f.records_per_group).collect::<Vec<_>>()).unwrap_or(0.0);
    let records = median(&runs.iter().map(|f| f.records_per_s).collect::<Vec<_>>()).unwrap_or(0.0);
    report.summary.wal_ratio = Some(ratio);
    report.line(
        "wal",
        format!(
            "wal      WAL {wal:.0} MiB/s  baseline(write 1 MiB + fdatasync) {raw:.0} MiB/s  ratio {ratio:.2}  target >={WAL_RATIO_MIN} {}  ({} appenders, {}-byte records, {} per append, {} MiB, {per_group:.0} records per group commit, median of {} round(s))",
            verdict(ratio >= WAL_RATIO_MIN),
            walbench::APPENDERS,
            walbench::PAYLOAD_BYTES,
            walbench::BATCH_RECORDS,
            scale.wal_mib,
            scale.rounds
        ),
        json!({"wal_mib_per_s": wal, "baseline_mib_per_s": raw, "ratio": ratio,
               "target_min": WAL_RATIO_MIN, "records_per_group": per_group, "records_per_s": records,
               "appenders": walbench::APPENDERS, "mib": scale.wal_mib}),
    );
    Ok(())
}

/// Idle, then steady load at MarketPrism's rate: the relay's CPU % of one core and peak RSS.
pub fn steady(world: &World, scale: &Scale, report: &mut Report) -> Result<(), BenchError> {
    let ticks = world::clock_ticks_per_s();
    let mut run = world.spawn_relay("bench_steady")?;
    run.relay.wait_ready(READY_TIMEOUT)?;
    let pid = run.relay.pid().ok_or(BenchError::Output {
        what: "relay pid".into(),
        detail: "the relay is not running".into(),
    })?;
    thread::sleep(IDLE_SETTLE);
    let a = world::proc_cpu(pid, ticks)?;
    thread::sleep(Duration::from_secs(scale.idle_s));
    let b = world::proc_cpu(pid, ticks)?;
    let idle = world::cpu_pct(a, b);
    report.summary.idle_cpu_pct = Some(idle);
    report.line(
        "idle",
        format!(
            "idle     relay {idle:.3} % of one core  target <={IDLE_CPU_PCT_MAX} {}  (no traffic, {} s)",
            verdict(idle <= IDLE_CPU_PCT_MAX),
            scale.idle_s
        ),
        json!({"cpu_pct": idle, "target_max": IDLE_CPU_PCT_MAX, "window_s": scale.idle_s}),
    );

    // The cycles behind the CPU: pulls, WAL fdatasyncs and inserts per second over the window.
    let cycles = |run: &RelayRun| {
        run.relay
            .metrics(READY_TIMEOUT)
            .ok()
            .map(|text| CYCLE_METRICS.map(|name| prism_testbed::metric_sum(&text, name, &[])))
    };
    let cycles_before = cycles(&run);
    let a = world::proc_cpu(pid, ticks)?;
    let summary = world.publish("steady", None, STEADY_RATE_PER_S, Some(scale.steady_s))?;
    let b = world::proc_cpu(pid, ticks)?;
    let cycles_after = cycles(&run);
    let window_s = b.at.duration_since(a.at).as_secs_f64().max(f64::EPSILON);
    let per_s = cycles_before
        .zip(cycles_after)
        .map(|(x, y)| [0, 1, 2].map(|i| (y[i] - x[i]) / window_s));
    let cpu = world::cpu_pct(a, b);
    let rss = world::proc_peak_rss_mib(pid)?;
    let rate = summary.rate_per_s();
    wait_acked(world, &mut run, DRAIN_TIMEOUT)?;
    run.relay.terminate(TERMINATE_TIMEOUT)?;
    report.summary.cpu_pct = Some(cpu);
    report.summary.rss_mib = Some(rss);
    report.line(
        "steady",
        format!(
            "steady   relay {cpu:.2} % of one core  target <={CPU_PCT_MAX} {}  peak RSS {rss:.1} MiB  target <={RSS_MIB_MAX} {}  per second: {}  ({} msg/s asked, {rate:.0} published, MarketPrism's mix, {} s)",
            verdict(cpu <= CPU_PCT_MAX),
            verdict(rss <= RSS_MIB_MAX),
            per_s.map_or("n/a".to_owned(), |[pulls, syncs, inserts]| format!(
                "{pulls:.1} pulls, {syncs:.1} WAL fdatasyncs, {inserts:.1} inserts"
            )),
            STEADY_RATE_PER_S,
            scale.steady_s
        ),
        json!({"cpu_pct": cpu, "rss_mib": rss, "cpu_target_max": CPU_PCT_MAX,
               "rss_target_max": RSS_MIB_MAX, "rate_per_s": STEADY_RATE_PER_S,
               "published_rate_per_s": rate, "window_s": scale.steady_s,
               "pulls_per_s": per_s.map(|c| c[0]), "wal_fsyncs_per_s": per_s.map(|c| c[1]),
               "inserts_per_s": per_s.map(|c| c[2])}),
    );
    Ok(())
}

/// Kills the relay (SIGKILL), publishes one fresh message, starts the relay again and times
/// until it acks that message: its ack seen on `$JS.ACK` (the ack floor may stay behind it
/// until JetStream redelivers what the killed relay had fetched and not acked, after
/// `ack_wait`, so the floor alone would time the redelivery, not the restart). Returns the
/// seconds and the WAL's size.
fn restart_probe(world: &World, run: &mut RelayRun, tag: &str) -> Result<(f64, u64), BenchError> {
    run.relay.kill9()?;
    let wal_bytes = world::dir_bytes(&run.wal_dir);
    let marker = world.publish(&format!("marker-{tag}"), Some(1), 0, None)?;
    let (stream, seq) = marker
        .streams
        .iter()
        .find(|(_, r)| r.published > 0)
        .map(|(s, r)| (s.clone(), r.last_seq))
        .ok_or(BenchError::Output {
            what: "marker publish".into(),
            detail: "no stream took the message".into(),
        })?;
    let durable = STREAMS
        .iter()
        .position(|(s, _)| *s == stream)
        .map(|i| run.durables[i].clone())
        .ok_or(BenchError::Output {
            what: "marker stream".into(),
            detail: stream.clone(),
        })?;
    let client = world.client();
    let mut acks = world
        .rt
        .block_on(async {
            let sub = client
                .subscribe(format!("$JS.ACK.{stream}.{durable}.>"))
                .await?;
            client.flush().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(sub)
        })
        .map_err(|e| BenchError::nats("subscribe", e))?;
    let spawned = Instant::now();
    run.relay.start()?;
    let deadline = spawned + RESTART_TIMEOUT;
    loop {
        let seen = world.rt.block_on(async {
            while let Ok(Some(m)) = tokio::time::timeout(RESTART_POLL, acks.next()).await {
                if ack_stream_seq(&m.subject) == Some(seq) {
                    return true;
                }
            }
            false
        });
        if seen
            || world
                .consumer(&stream, &durable)
                .is_ok_and(|c| c.ack_floor_stream_seq >= seq)
        {
            return Ok((spawned.elapsed().as_secs_f64(), wal_bytes));
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout {
                what: "the restarted relay acking a fresh message".into(),
                waited_s: RESTART_TIMEOUT.as_secs(),
                detail: format!("see {}", run.relay.log_path().display()),
            });
        }
    }
}

fn restart_line(report: &mut Report, secs: f64, wal_bytes: u64) {
    report.summary.restart_s = Some(secs);
    report.line(
        "restart",
        format!(
            "restart  relay {secs:.3} s from spawn to acking a fresh message  target <{RESTART_S_MAX} {}  (kill -9 with a {} MiB WAL, ClickHouse down)",
            verdict(secs < RESTART_S_MAX),
            wal_bytes / MIB
        ),
        json!({"restart_s": secs, "target_max": RESTART_S_MAX, "wal_bytes": wal_bytes}),
    );
}

/// Outage recovery, then restart. Each round, a fresh relay starts with ClickHouse up, then
/// ClickHouse is killed and `outage_n` messages are published, which the relay acks into its WAL;
/// ClickHouse comes back and the drain is timed until the rows are in with FINAL. Then the same
/// rows, decoded up front, are inserted by the `clickhouse` crate (the baseline). Each round's
/// databases are dropped once counted and the streams purged before the next round, so no step
/// pays for an earlier one's merges or messages. The figures are medians over the rounds. Then,
/// ClickHouse down again, a relay's WAL is filled to `restart_wal_bytes` and the relay killed
/// and restarted on it.
pub fn outage(
    world: &mut World,
    scale: &Scale,
    report: &mut Report,
    with_outage: bool,
    with_restart: bool,
) -> Result<(), BenchError> {
    let n = scale.outage_n;
    if with_outage {
        let mut rounds = Vec::with_capacity(scale.rounds);
        for round in 1..=scale.rounds {
            rounds.push(outage_round(world, n, round)?);
        }
        outage_line(report, n, &rounds);
    }
    if with_restart {
        world.ch.kill9()?;
        // A relay on a WAL of its own takes what the streams hold, then top-ups until the WAL
        // has the restart's size. The size is just under the WAL budget: a WAL filled to the
        // budget would keep the restarted relay from fetching at all, so once the bytes per
        // message are known the top-ups shrink to what the size still needs.
        let mut run = world.spawn_relay("bench_restart")?;
        wait_acked(world, &mut run, DRAIN_TIMEOUT)?;
        let target = scale.restart_wal_bytes;
        let mut bytes_per_message: Option<u64> = None;
        let mut round = 0;
        loop {
            let have = world::dir_bytes(&run.wal_dir);
            if have >= target {
                break;
            }
            let count = top_up_count(target - have, bytes_per_message);
            world.publish(&format!("topup-{round}"), Some(count), 0, None)?;
            round += 1;
            wait_acked(world, &mut run, DRAIN_TIMEOUT)?;
            let grown = world::dir_bytes(&run.wal_dir).saturating_sub(have);
            if grown > 0 {
                bytes_per_message = Some((grown / count).max(1));
            }
        }
        let (secs, bytes) = restart_probe(world, &mut run, "restart")?;
        restart_line(report, secs, bytes);
        let _ = run.relay.terminate(TERMINATE_TIMEOUT);
    }
    Ok(())
}

/// Messages of the next top-up towards a WAL size `missing` bytes away: [`TOP_UP_MESSAGES`]
/// while the bytes a message takes are unknown, then what covers `missing` (one more than the
/// whole messages that fit, so the size is reached), never more than [`TOP_UP_MESSAGES`].
fn top_up_count(missing: u64, bytes_per_message: Option<u64>) -> u64 {
    match bytes_per_message {
        None => TOP_UP_MESSAGES,
        Some(per) => (missing / per.max(1) + 1).min(TOP_UP_MESSAGES),
    }
}

/// One outage round's figures: the relay's drain and the baseline's insert of the same rows.
struct OutageRound {
    relay_rows_per_s: f64,
    relay_s: f64,
    relay_cpu_s: f64,
    relay_clickhouse_cpu_s: f64,
    relay_read_mib: Option<u64>,
    relay_peak_rss_mib: Option<f64>,
    wal_bytes: u64,
    base_rows_per_s: f64,
    base_s: f64,
    base_cpu_s: f64,
    base_clickhouse_cpu_s: f64,
}

/// Round `round` of the outage scenario (see [`outage`]); ClickHouse is up before and after.
fn outage_round(world: &mut World, n: u64, round: usize) -> Result<OutageRound, BenchError> {
    let ticks = world::clock_ticks_per_s();
    if round > 1 {
        world.purge_streams()?;
    }
    let mut run = world.spawn_relay(&format!("bench_outage_{round}"))?;
    run.relay.wait_ready(READY_TIMEOUT)?;
    world.ch.kill9()?;
    let published = world.publish(&format!("outage-{round}"), Some(n), 0, None)?;
    check_count("outage traffic", published.published_total(), n)?;
    wait_acked(world, &mut run, DRAIN_TIMEOUT)?;
    let wal_bytes = world::dir_bytes(&run.wal_dir);
    eprintln!(
        "  outage round {round}: {} messages in a {} MiB WAL",
        thousands(n as f64),
        wal_bytes / MIB
    );
    world.ch.restart()?;
    let back = Instant::now();
    let before = cpu_seconds(world, &run, ticks);
    let read_bytes = || run.relay.pid().and_then(world::proc_read_bytes);
    let read_before = read_bytes();
    let done = world.wait_rows(
        &run.database,
        n,
        ROWS_POLL,
        DRAIN_TIMEOUT,
        "the WAL draining after the outage",
    )?;
    let after = cpu_seconds(world, &run, ticks);
    // What the relay read while it drained: the WAL's records once, if its lanes share the
    // read, and a multiple of it for each lane that reads on its own.
    let relay_read_mib = read_before
        .zip(read_bytes())
        .map(|(a, b)| b.saturating_sub(a) / MIB);
    let relay_peak_rss_mib = run
        .relay
        .pid()
        .and_then(|pid| world::proc_peak_rss_mib(pid).ok());
    let relay_s = done.duration_since(back).as_secs_f64();
    let (relay_cpu_s, relay_clickhouse_cpu_s) = (after[0] - before[0], after[1] - before[1]);
    eprintln!(
        "  outage round {round}: relay {} rows/s ({relay_s:.2} s; CPU s: relay {relay_cpu_s:.2}, clickhouse {relay_clickhouse_cpu_s:.2}; relay read {} MiB; peak RSS {} MiB)",
        thousands(n as f64 / relay_s),
        relay_read_mib.map_or("n/a".to_owned(), |m| m.to_string()),
        relay_peak_rss_mib.map_or("n/a".to_owned(), |m| format!("{m:.1}"))
    );
    let _ = run.relay.terminate(TERMINATE_TIMEOUT);
    world.sql(&format!("DROP DATABASE IF EXISTS {}", run.database))?;

    let base_db = format!("bench_outage_base_{round}");
    let rows = world
        .rt
        .block_on(contenders::decode_stream(&world.js(), &base_db))?;
    check_count("decoded rows", rows.len() as u64, n)?;
    // The baseline inserts from the bench's own process.
    let own_cpu = |world: &World| {
        [
            cpu_of(Some(std::process::id()), ticks),
            cpu_of(world.ch.pid(), ticks),
        ]
    };
    let base_before = own_cpu(world);
    let took = world.rt.block_on(contenders::insert_rows(
        &world.ch.http_url(),
        &base_db,
        rows,
    ))?;
    let base_after = own_cpu(world);
    let (base_cpu_s, base_clickhouse_cpu_s) = (
        base_after[0] - base_before[0],
        base_after[1] - base_before[1],
    );
    check_count("baseline rows", world.rows(&base_db, true)?, n)?;
    world.sql(&format!("DROP DATABASE IF EXISTS {base_db}"))?;
    let base_s = took.as_secs_f64();
    eprintln!(
        "  outage round {round}: baseline {} rows/s ({base_s:.2} s; CPU s: inserter {base_cpu_s:.2}, clickhouse {base_clickhouse_cpu_s:.2})",
        thousands(n as f64 / base_s)
    );
    Ok(OutageRound {
        relay_rows_per_s: n as f64 / relay_s,
        relay_s,
        relay_cpu_s,
        relay_clickhouse_cpu_s,
        relay_read_mib,
        relay_peak_rss_mib,
        wal_bytes,
        base_rows_per_s: n as f64 / base_s,
        base_s,
        base_cpu_s,
        base_clickhouse_cpu_s,
    })
}

/// The outage line: medians over the rounds, the ratio of the medians (as the drain's).
fn outage_line(report: &mut Report, n: u64, rounds: &[OutageRound]) {
    let of = |f: fn(&OutageRound) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let relay = of(|r| r.relay_rows_per_s).unwrap_or(f64::NAN);
    let base = of(|r| r.base_rows_per_s).unwrap_or(f64::NAN);
    let ratio = relay / base;
    let per_round: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.2}", r.relay_rows_per_s / r.base_rows_per_s))
        .collect();
    let wal_bytes = rounds.iter().map(|r| r.wal_bytes).max().unwrap_or(0);
    report.summary.outage_ratio = Some(ratio);
    report.line(
        "outage",
        format!(
            "outage   relay {} rows/s  baseline(clickhouse crate inserter, rows decoded up front) {} rows/s  ratio {ratio:.2}  target >={OUTAGE_RATIO_MIN} {}  (n={} records, {} MiB WAL, timed from ClickHouse ready to count FINAL == n; median of {} round(s), ratio per round {})",
            thousands(relay),
            thousands(base),
            verdict(ratio >= OUTAGE_RATIO_MIN),
            thousands(n as f64),
            wal_bytes / MIB,
            rounds.len(),
            per_round.join(", ")
        ),
        json!({"relay_rows_per_s": relay, "baseline_rows_per_s": base, "ratio": ratio,
               "target_min": OUTAGE_RATIO_MIN, "n": n, "wal_bytes": wal_bytes,
               "rounds": rounds.iter().map(|r| json!({
                   "relay_rows_per_s": r.relay_rows_per_s, "relay_s": r.relay_s,
                   "relay_cpu_s": r.relay_cpu_s, "relay_clickhouse_cpu_s": r.relay_clickhouse_cpu_s,
                   "relay_read_mib": r.relay_read_mib, "relay_peak_rss_mib": r.relay_peak_rss_mib,
                   "wal_bytes": r.wal_bytes, "baseline_rows_per_s": r.base_rows_per_s,
                   "baseline_s": r.base_s, "baseline_cpu_s": r.base_cpu_s,
                   "baseline_clickhouse_cpu_s": r.base_clickhouse_cpu_s,
               })).collect::<Vec<_>>()}),
    );
}

fn wall_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The index of the stream sequence among an ack subject's tokens (see [`ack_timestamp_ns`]).
fn ack_seq_index(tokens: usize) -> Option<usize> {
    match tokens {
        9 => Some(5),
        n if n >= 11 => Some(7),
        _ => None,
    }
}

/// The stream sequence an ack subject carries.
pub fn ack_stream_seq(subject: &str) -> Option<u64> {
    let tokens: Vec<&str> = subject.split('.').collect();
    tokens.get(ack_seq_index(tokens.len())?)?.parse().ok()
}

/// The consumer an ack subject names: the token two before the stream sequence.
fn ack_consumer(subject: &str) -> Option<&str> {
    let tokens: Vec<&str> = subject.split('.').collect();
    tokens
        .get(ack_seq_index(tokens.len())?.checked_sub(2)?)
        .copied()
}

/// The stream timestamp (ns) an ack subject carries: the token after the consumer sequence.
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>`, or
/// with domain and account hash before the stream (12 tokens and more).
pub fn ack_timestamp_ns(subject: &str) -> Option<u128> {
    let tokens: Vec<&str> = subject.split('.').collect();
    // Two tokens after the stream sequence: the consumer sequence, then the timestamp.
    tokens.get(ack_seq_index(tokens.len())? + 2)?.parse().ok()
}

/// Latency at 20,000 msg/s: publish to ack (from the acks the relay publishes) and publish to
/// visible in ClickHouse (from the row count, see the module doc), with the default 1 s flush.
pub fn latency(world: &World, scale: &Scale, report: &mut Report) -> Result<(), BenchError> {
    let mut run = world.spawn_relay("bench_latency")?;
    run.relay.wait_ready(READY_TIMEOUT)?;
    let client = world.client();
    // Ack latencies by consumer: the relay's durables, then the follower's (its phase comes after).
    let acks: Arc<Mutex<BTreeMap<String, Vec<f64>>>> = Arc::new(Mutex::new(BTreeMap::new()));
    let first_subject: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut sub = world
        .rt
        .block_on(client.subscribe("$JS.ACK.>"))
        .map_err(|e| BenchError::nats("subscribe", e))?;
    world
        .rt
        .block_on(client.flush())
        .map_err(|e| BenchError::nats("flush", e))?;
    let (acks_in, first_in) = (acks.clone(), first_subject.clone());
    let collector = world.rt.spawn(async move {
        while let Some(m) = sub.next().await {
            let now = wall_ns();
            if let (Some(ts), Some(consumer)) =
                (ack_timestamp_ns(&m.subject), ack_consumer(&m.subject))
            {
                let ms = now.saturating_sub(ts) as f64 / 1e6;
                if let Ok(mut v) = acks_in.lock() {
                    v.entry(consumer.to_string()).or_default().push(ms);
                }
            }
            if let Ok(mut f) = first_in.lock() {
                f.get_or_insert_with(|| m.subject.to_string());
            }
        }
    });

    let polls: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let port = world.ch.http_port();
    let database = run.database.clone();
    let poller = {
        let (polls, stop) = (polls.clone(), stop.clone());
        thread::spawn(move || {
            let parts: Vec<String> = world::TABLES
                .iter()
                .map(|t| format!("SELECT count() AS c FROM {database}.{t}"))
                .collect();
            let sql = format!("SELECT sum(c) FROM ({})", parts.join(" UNION ALL "));
            let path = format!("/?query={}", prism_testbed::url_encode(&sql));
            while !stop.load(Ordering::SeqCst) {
                if let Ok((200, body)) = prism_testbed::http_get(port, &path, VISIBLE_POLL * 10) {
                    if let (Ok(n), Ok(mut p)) = (body.trim().parse::<u64>(), polls.lock()) {
                        p.push((Instant::now(), n));
                    }
                }
                thread::sleep(VISIBLE_POLL);
            }
        })
    };

    let start = Instant::now();
    let summary = match world.publish("latency", None, LATENCY_RATE_PER_S, Some(scale.latency_s)) {
        Ok(summary) => summary,
        Err(e) => {
            stop.store(true, Ordering::SeqCst);
            let _ = poller.join();
            collector.abort();
            return Err(e);
        }
    };
    let n = summary.published_total();
    let rows = world.wait_rows(
        &run.database,
        n,
        VISIBLE_POLL,
        LATENCY_SETTLE_TIMEOUT,
        "the latency scenario's rows",
    );
    let acked = wait_acked(world, &mut run, LATENCY_SETTLE_TIMEOUT);
    stop.store(true, Ordering::SeqCst);
    let _ = poller.join();
    if rows.is_err() || acked.is_err() {
        collector.abort();
    }
    rows?;
    acked?;
    // The relay's own fdatasync times: how much of the ack latency the disk accounts for.
    let fsync_ms = run.relay.metrics(READY_TIMEOUT).ok().map(|text| {
        [0.5, 0.99]
            .map(|p| histogram_quantile(&text, "prism_relay_wal_fsync_seconds", p).map(|s| s * 1e3))
    });
    let _ = run.relay.terminate(TERMINATE_TIMEOUT);

    // The reference: the same traffic followed by a consumer that only fetches and acks, its
    // acks measured the same way. What it shows is the machine's floor, not the WAL's cost.
    let follower_stop = Arc::new(AtomicBool::new(false));
    let follower =
        contenders::follow_streams(world.nats.url(), FOLLOWER_NAME, follower_stop.clone())?;
    let follower_durables = STREAMS.map(|(stream, _)| format!("{FOLLOWER_NAME}-{stream}"));
    let followed = world
        .publish(
            "latency_follow",
            None,
            LATENCY_RATE_PER_S,
            Some(scale.latency_s),
        )
        .and_then(|summary| {
            poll_until(
                LATENCY_SETTLE_TIMEOUT,
                "the latency follower acking every message",
                "",
                || Ok(world.consumers_drained(&follower_durables)),
            )?;
            Ok(summary)
        });
    follower_stop.store(true, Ordering::SeqCst);
    let follower_acked = follower.join().map_err(|_| BenchError::Output {
        what: "the latency follower".into(),
        detail: "its thread panicked".into(),
    })?;
    collector.abort();
    let followed = followed?;
    let follower_acked = follower_acked?;

    let by_consumer = acks.lock().map(|v| v.clone()).unwrap_or_default();
    let sorted_acks = |prefix: &str| {
        let mut v: Vec<f64> = by_consumer
            .iter()
            .filter(|(consumer, _)| consumer.starts_with(prefix))
            .flat_map(|(_, ms)| ms.iter().copied())
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let ack_ms = sorted_acks(&format!("{}-", run.database));
    let follower_ms = sorted_acks(&format!("{FOLLOWER_NAME}-"));
    let polls = polls.lock().map(|v| v.clone()).unwrap_or_default();
    let mut visible_s = Vec::with_capacity(n as usize);
    let mut i = 0;
    for k in 0..n {
        while i < polls.len() && polls[i].1 <= k {
            i += 1;
        }
        let Some((seen, _)) = polls.get(i) else {
            break;
        };
        let published = start + summary.elapsed.mul_f64(k as f64 / n as f64);
        visible_s.push(seen.saturating_duration_since(published).as_secs_f64());
    }
    visible_s.sort_by(f64::total_cmp);
    let q = |v: &[f64], p: f64| quantile(v, p).unwrap_or(f64::NAN);
    let (ack50, ack99) = (q(&ack_ms, 0.5), q(&ack_ms, 0.99));
    let (vis50, vis99) = (q(&visible_s, 0.5), q(&visible_s, 0.99));
    let (follow50, follow99) = (q(&follower_ms, 0.5), q(&follower_ms, 0.99));
    let subject = first_subject.lock().ok().and_then(|s| s.clone());
    let [fsync50, fsync99] = fsync_ms.unwrap_or([None, None]);
    let bound = |v: Option<f64>| v.map_or("n/a".to_owned(), |ms| format!("<= {ms:.2} ms"));
    report.line(
        "latency",
        format!(
            "latency  ack p50 {ack50:.2} ms p99 {ack99:.2} ms  target p99 <={ACK_P99_MS_MAX} ms {}  visible p50 {vis50:.3} s p99 {vis99:.3} s  target p99 <={VISIBLE_P99_S_MAX} s {}  WAL fdatasync p50 {} p99 {}  reference(fetch and ack only, same traffic after the relay) ack p50 {follow50:.2} ms p99 {follow99:.2} ms  ({} msg/s asked, {:.0} published, {} s, {} acks seen; reference {:.0} published, {follower_acked} acked, {} acks seen; ack = seen on $JS.ACK minus the stream timestamp; visible = count() polled every {} ms, k-th of n messages taken as published at start + k*elapsed/n; fdatasync = the relay's histogram, bucket bounds)",
            verdict(ack99 <= ACK_P99_MS_MAX),
            verdict(vis99 <= VISIBLE_P99_S_MAX),
            bound(fsync50),
            bound(fsync99),
            LATENCY_RATE_PER_S,
            summary.rate_per_s(),
            scale.latency_s,
            ack_ms.len(),
            followed.rate_per_s(),
            follower_ms.len(),
            VISIBLE_POLL.as_millis()
        ),
        json!({"ack_p50_ms": ack50, "ack_p99_ms": ack99, "visible_p50_s": vis50,
               "visible_p99_s": vis99, "acks_seen": ack_ms.len(), "published": n,
               "rate_per_s": LATENCY_RATE_PER_S, "window_s": scale.latency_s,
               "ack_subject_example": subject, "wal_fsync_p50_ms_max": fsync50,
               "wal_fsync_p99_ms_max": fsync99, "reference_ack_p50_ms": follow50,
               "reference_ack_p99_ms": follow99, "reference_acks_seen": follower_ms.len(),
               "reference_published": followed.published_total(),
               "reference_acked": follower_acked}),
    );
    Ok(())
}

/// The relay's counters of its cycles, in the steady line's order: pulls, WAL fdatasyncs (one per
/// group commit), inserts (every table's).
const CYCLE_METRICS: [&str; 3] = [
    "prism_relay_fetch_batches_total",
    "prism_relay_wal_fsync_seconds_count",
    "prism_relay_insert_seconds_count",
];

/// The upper bound of the bucket holding quantile `p` of histogram `name` in a Prometheus text
/// exposition (None when the histogram is absent or empty, or `p` falls in the `+Inf` bucket).
fn histogram_quantile(text: &str, name: &str, p: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (labels, value) = rest.split_once("} ")?;
            let le = labels
                .split(',')
                .find_map(|l| l.trim().strip_prefix("le="))?;
            let le = le.trim_matches('"');
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.iter().map(|(_, n)| *n).fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, n)| *n >= p * total)
        .map(|(le, _)| *le)
        .filter(|le| le.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_quantile_is_the_bound_of_the_bucket_that_holds_it() {
        let text = "# HELP x_seconds X.\n# TYPE x_seconds histogram\n\
                    x_seconds_sum 1.5\nx_seconds_count 100\n\
                    x_seconds_bucket{le=\"0.001\"} 40\nx_seconds_bucket{le=\"0.002\"} 90\n\
                    x_seconds_bucket{le=\"0.004\"} 99\nx_seconds_bucket{le=\"+Inf\"} 100\n\
                    y_seconds_bucket{le=\"0.001\"} 7\n";
        assert_eq!(histogram_quantile(text, "x_seconds", 0.4), Some(0.001));
        assert_eq!(histogram_quantile(text, "x_seconds", 0.5), Some(0.002));
        assert_eq!(histogram_quantile(text, "x_seconds", 0.99), Some(0.004));
        assert_eq!(histogram_quantile(text, "x_seconds", 0.995), None);
        assert_eq!(histogram_quantile(text, "z_seconds", 0.5), None);
    }

    #[test]
    fn top_ups_shrink_to_what_the_size_still_needs_once_a_message_size_is_known() {
        assert_eq!(top_up_count(10 << 30, None), TOP_UP_MESSAGES);
        assert_eq!(top_up_count(10 << 30, Some(900)), TOP_UP_MESSAGES);
        // 100 MiB short at 900 bytes a message: 116,508 whole messages, plus one.
        assert_eq!(top_up_count(100 << 20, Some(900)), 116_509);
        assert_eq!(top_up_count(1, Some(900)), 1);
        assert_eq!(top_up_count(1_000, Some(0)), 1_001);
    }

    #[test]
    fn an_ack_subject_yields_the_consumer_stream_sequence_and_timestamp_in_both_layouts() {
        assert_eq!(
            ack_consumer("$JS.ACK.S.relay-trades.1.42.40.1700000000123456789.0"),
            Some("relay-trades")
        );
        assert_eq!(
            ack_consumer("$JS.ACK._.ACCHASH.S.C.1.42.40.1700000000123456789.0.tok"),
            Some("C")
        );
        assert_eq!(ack_consumer("$JS.ACK.S.C"), None);
        assert_eq!(
            ack_timestamp_ns("$JS.ACK.S.C.1.42.40.1700000000123456789.0"),
            Some(1_700_000_000_123_456_789)
        );
        assert_eq!(
            ack_timestamp_ns("$JS.ACK._.ACCHASH.S.C.1.42.40.1700000000123456789.0.tok"),
            Some(1_700_000_000_123_456_789)
        );
        assert_eq!(ack_timestamp_ns("$JS.ACK.S.C"), None);
        assert_eq!(
            ack_stream_seq("$JS.ACK.S.C.1.42.40.1700000000123456789.0"),
            Some(42)
        );
        assert_eq!(
            ack_stream_seq("$JS.ACK._.ACCHASH.S.C.1.42.40.1700000000123456789.0.tok"),
            Some(42)
        );
    }
}
