//! `prism-bench`: the performance bench of prism-relay (see docs/PERFORMANCE.md, "scripts/bench").
//!
//! It runs the release `prism-relay` binary against real servers from the test bed
//! (`prism-testbed`) and compares it with baselines measured in the same run on the same
//! servers and traffic (`contenders`, `walbench`): a backlog drain (relay, a raw fetch-and-ack
//! consumer, a relay without a WAL), the WAL's group commit against the disk, CPU and memory
//! under MarketPrism's steady load and idle, the WAL's drain after a ClickHouse outage, the
//! restart after a kill -9 on a large WAL, and latency at 20,000 msg/s (`scenarios`). It prints
//! one line per figure with its target and whether it was met, writes the same as JSON, and
//! ends with the `bench:` line (`report`). Targets are reported, not enforced: the exit code is
//! 0 unless a scenario could not run. The work directory (configurations, logs, WALs) is
//! removed after a run in which every scenario ran, and kept otherwise.
//!
//! Usage: `prism-bench [--quick] [--only drain,wal,steady,outage,restart,latency]
//! [--json PATH] [--relay-bin PATH] [--work-dir DIR] [--drain-mix MIX] [--fetch-linger-ms N]`;
//! `--drain-mix` takes loadgen's `--mix` syntax (`trade=1`) for the drain's backlog, MarketPrism's
//! eight types by default; `--fetch-linger-ms` sets the relays' `fetch_linger_ms` (the trade of
//! steady CPU against ack latency), their default otherwise.

mod contenders;
mod error;
mod report;
mod scenarios;
mod walbench;
mod world;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use error::BenchError;
use prism_relay::tools::gen::Mix;
use report::Report;
use scenarios::Scale;
use world::World;

/// The scenarios, in the order they run.
const SCENARIOS: [&str; 6] = ["drain", "wal", "steady", "outage", "restart", "latency"];

const USAGE: &str =
    "usage: prism-bench [--quick] [--only drain,wal,steady,outage,restart,latency] \
                     [--json PATH] [--relay-bin PATH] [--work-dir DIR] \
                     [--drain-mix trade=1,orderbook=1,...] [--fetch-linger-ms N] [--rounds N]";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Args {
    quick: bool,
    only: Vec<String>,
    json: Option<PathBuf>,
    relay_bin: PathBuf,
    work_dir: Option<PathBuf>,
    /// The drain's backlog mix (loadgen's `--mix` syntax); MarketPrism's eight types by default.
    drain_mix: Option<Mix>,
    /// The relays' `fetch_linger_ms`; their default when not given.
    fetch_linger_ms: Option<u64>,
    /// Rounds of the drain and outage scenarios; the scale's (1 quick, 2 full) when not given.
    rounds: Option<usize>,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut parsed = Args {
        quick: false,
        only: SCENARIOS.iter().map(|s| s.to_string()).collect(),
        json: None,
        relay_bin: PathBuf::from("target/release/prism-relay"),
        work_dir: None,
        drain_mix: None,
        fetch_linger_ms: None,
        rounds: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--quick" => parsed.quick = true,
            "--only" => {
                let list = value("--only")?;
                parsed.only = list.split(',').map(|s| s.trim().to_string()).collect();
                if let Some(bad) = parsed
                    .only
                    .iter()
                    .find(|s| !SCENARIOS.contains(&s.as_str()))
                {
                    return Err(format!(
                        "unknown scenario {bad:?}; known: {}",
                        SCENARIOS.join(",")
                    ));
                }
            }
            "--json" => parsed.json = Some(PathBuf::from(value("--json")?)),
            "--relay-bin" => parsed.relay_bin = PathBuf::from(value("--relay-bin")?),
            "--work-dir" => parsed.work_dir = Some(PathBuf::from(value("--work-dir")?)),
            "--drain-mix" => {
                let mix = value("--drain-mix")?;
                parsed.drain_mix = Some(
                    mix.parse()
                        .map_err(|e| format!("--drain-mix {mix:?}: {e}"))?,
                );
            }
            "--fetch-linger-ms" => {
                let ms = value("--fetch-linger-ms")?;
                parsed.fetch_linger_ms = Some(
                    ms.parse()
                        .map_err(|e| format!("--fetch-linger-ms {ms:?}: {e}"))?,
                );
            }
            "--rounds" => {
                let n = value("--rounds")?;
                match n.parse::<usize>() {
                    Ok(rounds) if rounds >= 1 => parsed.rounds = Some(rounds),
                    _ => return Err(format!("--rounds {n:?}: a whole number, 1 or more")),
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(parsed)
}

/// `YYYYMMDDTHHMMSSZ` for `secs` since the epoch (UTC; civil from days, Howard Hinnant's
/// algorithm).
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn run_scenarios(args: &Args, work: &Path, scale: &Scale, report: &mut Report) {
    let wants = |s: &str| args.only.iter().any(|o| o == s);
    let world_dir = |name: &str| work.join(name);
    let start_world = |dir: &Path, relay_bin: &Path| {
        World::start(dir, relay_bin).map(|mut world| {
            world.fetch_linger_ms = args.fetch_linger_ms;
            world
        })
    };
    if wants("drain") {
        let result = start_world(&world_dir("drain"), &args.relay_bin)
            .and_then(|world| scenarios::drain(&world, scale, report));
        if let Err(e) = result {
            report.failed("drain", e.to_string());
        }
    }
    if wants("wal") {
        if let Err(e) = scenarios::wal(&world_dir("wal"), scale, report) {
            report.failed("wal", e.to_string());
        }
    }
    if wants("steady") {
        let result = start_world(&world_dir("steady"), &args.relay_bin)
            .and_then(|world| scenarios::steady(&world, scale, report));
        if let Err(e) = result {
            report.failed("steady", e.to_string());
        }
    }
    if wants("outage") || wants("restart") {
        let result = start_world(&world_dir("outage"), &args.relay_bin).and_then(|mut world| {
            scenarios::outage(&mut world, scale, report, wants("outage"), wants("restart"))
        });
        if let Err(e) = result {
            report.failed("outage", e.to_string());
        }
    }
    if wants("latency") {
        let result = start_world(&world_dir("latency"), &args.relay_bin)
            .and_then(|world| scenarios::latency(&world, scale, report));
        if let Err(e) = result {
            report.failed("latency", e.to_string());
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("prism-bench: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stamp = utc_stamp(now);
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench").join(&stamp));
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("target/bench/bench-{stamp}.json")));
    let mut scale = Scale::new(args.quick);
    if let Some(mix) = args.drain_mix {
        scale.drain_mix = mix;
    }
    if let Some(rounds) = args.rounds {
        scale.rounds = rounds;
    }
    println!(
        "prism-bench {} run: scenarios {}; work directory {}",
        if args.quick { "quick" } else { "full" },
        args.only.join(","),
        work.display()
    );
    let started = Instant::now();
    let mut report = Report::default();
    run_scenarios(&args, &work, &scale, &mut report);
    let json = report.to_json(args.quick, &stamp);
    let written = json_path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&json_path, format!("{json:#}\n")))
        .map_err(|e| BenchError::io(format!("writing {}", json_path.display()), e));
    match written {
        Ok(()) => println!("JSON: {}", json_path.display()),
        Err(e) => eprintln!("prism-bench: {e}"),
    }
    // The work directory holds the relays' WALs (gigabytes in a full run): kept as evidence
    // when a scenario failed, removed otherwise (the JSON report lives outside it).
    if report.errors.is_empty() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("work directory kept: {}", work.display());
    }
    println!("wall time {:.0} s", started.elapsed().as_secs_f64());
    println!("{}", report.final_line());
    if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_command_line_takes_quick_only_and_json_and_refuses_unknown_scenarios() {
        let a = parse_args(&strings(&[
            "--quick",
            "--only",
            "drain,wal",
            "--json",
            "x.json",
        ]))
        .unwrap();
        assert!(a.quick);
        assert_eq!(a.only, ["drain", "wal"]);
        assert_eq!(a.json, Some(PathBuf::from("x.json")));
        assert!(parse_args(&strings(&["--only", "speed"])).is_err());
        assert!(parse_args(&strings(&["--json"])).is_err());
        let trades = parse_args(&strings(&["--drain-mix", "trade=1"])).unwrap();
        assert_eq!(trades.drain_mix, Some("trade=1".parse().unwrap()));
        assert!(parse_args(&strings(&["--drain-mix", "ticker=1"])).is_err());
        let linger = parse_args(&strings(&["--fetch-linger-ms", "200"])).unwrap();
        assert_eq!(linger.fetch_linger_ms, Some(200));
        assert_eq!(trades.fetch_linger_ms, None);
        assert!(parse_args(&strings(&["--fetch-linger-ms", "soon"])).is_err());
        let rounds = parse_args(&strings(&["--rounds", "3"])).unwrap();
        assert_eq!(rounds.rounds, Some(3));
        assert!(parse_args(&strings(&["--rounds", "0"])).is_err());
        assert!(parse_args(&strings(&["--rounds", "two"])).is_err());
    }

    #[test]
    fn the_default_json_name_carries_the_utc_time() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(1_764_547_200 + 3_661), "20251201T010101Z");
        assert_eq!(utc_stamp(1_709_251_199), "20240229T235959Z");
    }
}
