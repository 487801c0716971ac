//! `prism-chaos`: the chaos suite of prism-relay (see docs/RELIABILITY.md).
//!
//! It drives real processes like an operator would: `nats-server` and `clickhouse-server`
//! through the test bed (`prism-testbed`), the release `prism-relay` binary (a copy taken at
//! start, so a rebuild during a run changes nothing), `prism-relay loadgen` for the traffic and
//! `prism-relay verify` for the accounting. Each of the nine scenarios (`schedule`) gets a fresh
//! bed (`bed`), a fault schedule drawn from the run's seed, injected one fault at a time while
//! the load runs (`faults`), with the catch-up after each fault measured; then the load stops
//! and every identity JetStream assigned is accounted for. The table and the final `chaos:`
//! line (`summary`) end the run; the exit code is 0 only when nothing was lost or duplicated
//! and every check held.
//!
//! Every scenario runs on the legacy leg (clickhouse-server 18.16); the scenarios whose faults
//! involve ClickHouse run on the modern leg too (the modern engine behind the test bed's
//! stand-in, `prism_testbed::Chdb`), where the relay's `profile = "auto"` picks the modern
//! profile and the runner also checks that the tables hold every row once without FINAL where
//! the insert tokens promise it. `--leg` picks the legs (default both).
//!
//! Usage: `prism-chaos [--quick] [--seed N] [--scenario 1,3,...] [--leg legacy|modern|both]
//! [--relay-bin PATH] [--work-dir DIR]`. A failing scenario leaves its directory (configuration, relay, loadgen,
//! server and fault logs, WAL) under the work directory; a passing one removes it.

mod bed;
mod error;
mod faults;
mod prng;
mod proxy;
mod schedule;
mod summary;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bed::Bed;
use error::ChaosError;
use faults::KillStats;
use schedule::{Leg, Scenario, SCENARIOS};
use summary::Row;

/// Load that runs before the first fault, so the first one lands on traffic in flight.
const WARM_UP: Duration = Duration::from_secs(1);

/// The command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Args {
    quick: bool,
    seed: Option<u64>,
    scenarios: Vec<u8>,
    /// The legs to run, legacy first.
    legs: Vec<Leg>,
    relay_bin: Option<PathBuf>,
    work_dir: Option<PathBuf>,
}

const USAGE: &str = "usage: prism-chaos [--quick] [--seed N] [--scenario 1,3,...] \
                     [--leg legacy|modern|both] [--relay-bin PATH] [--work-dir DIR]";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut out = Args {
        quick: false,
        seed: None,
        scenarios: Vec::new(),
        legs: vec![Leg::Legacy, Leg::Modern],
        relay_bin: None,
        work_dir: None,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => out.quick = true,
            "--seed" => {
                let v = value("--seed")?;
                out.seed = Some(v.parse().map_err(|_| format!("--seed {v}: not a number"))?);
            }
            "--scenario" => {
                for part in value("--scenario")?.split(',') {
                    let n: u8 = part
                        .trim()
                        .parse()
                        .map_err(|_| format!("--scenario {part}: not a number"))?;
                    if schedule::scenario(n).is_none() {
                        return Err(format!("--scenario {n}: scenarios are 1 to 9"));
                    }
                    out.scenarios.push(n);
                }
            }
            "--leg" => {
                let v = value("--leg")?;
                out.legs = Leg::parse_list(&v)
                    .ok_or_else(|| format!("--leg {v}: legs are legacy, modern or both"))?;
            }
            "--relay-bin" => out.relay_bin = Some(PathBuf::from(value("--relay-bin")?)),
            "--work-dir" => out.work_dir = Some(PathBuf::from(value("--work-dir")?)),
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("chaos: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> Result<u8, ChaosError> {
    let started = Instant::now();
    let seed = args.seed.unwrap_or_else(prng::fresh_seed);
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("prism-chaos-{seed}")));
    fs::create_dir_all(&work)
        .map_err(|e| ChaosError::io(format!("creating {}", work.display()), e))?;
    let relay_bin = copy_relay_bin(args, &work)?;
    let runs = plan(args);
    let mode = if args.quick { "quick" } else { "full" };
    println!(
        "chaos: seed={seed} ({mode} run; rerun with --seed {seed}); work directory {}",
        work.display()
    );
    let mut rows = Vec::new();
    let mut stats = KillStats::default();
    for (leg, scenario, cycles) in runs {
        let dir = work.join(format!(
            "s{}-{}-{}",
            scenario.number,
            scenario.name,
            leg.name()
        ));
        let scenario_started = Instant::now();
        let (row, s) = run_scenario(&relay_bin, &dir, scenario, leg, seed, cycles);
        println!(
            "chaos: scenario {} {} ({}) {} in {:.0} s{}",
            scenario.number,
            scenario.name,
            leg.name(),
            if row.passed() { "passed" } else { "FAILED" },
            scenario_started.elapsed().as_secs_f64(),
            if row.passed() {
                String::new()
            } else {
                format!("; logs and WAL in {}", dir.display())
            }
        );
        stats.add(&s);
        rows.push(row);
    }
    let table = summary::table(&rows);
    let (line, code) = summary::verdict(&rows);
    let legs: Vec<&str> = args.legs.iter().map(|l| l.name()).collect();
    let report = format!(
        "\n{table}\n{}\nseed {seed}, {mode} run, legs {}, {:.0} s; rerun: prism-chaos{} --seed {seed}\n",
        stats.report(),
        legs.join(" and "),
        started.elapsed().as_secs_f64(),
        if args.quick { " --quick" } else { "" }
    );
    print!("{report}");
    let _ = fs::write(work.join("summary.txt"), format!("{report}{line}\n"));
    if code != 0 {
        println!(
            "logs: {} (one directory per failed scenario)",
            work.display()
        );
    }
    println!("{line}");
    Ok(code)
}

/// The scenario runs in order: every selected scenario on the first leg, then on the next;
/// a scenario with no cycles on a leg (the modern leg's NATS kills) is left out there.
fn plan(args: &Args) -> Vec<(Leg, &'static Scenario, u32)> {
    let selected: Vec<&'static Scenario> = if args.scenarios.is_empty() {
        SCENARIOS.iter().collect()
    } else {
        args.scenarios
            .iter()
            .filter_map(|n| schedule::scenario(*n))
            .collect()
    };
    args.legs
        .iter()
        .flat_map(|leg| {
            selected.iter().filter_map(move |s| {
                s.cycles(*leg, args.quick)
                    .filter(|c| *c > 0)
                    .map(|c| (*leg, *s, c))
            })
        })
        .collect()
}

/// Copies the relay binary into the work directory, so rebuilding it during a run does not
/// change the binary the run restarts.
fn copy_relay_bin(args: &Args, work: &Path) -> Result<PathBuf, ChaosError> {
    let source = match &args.relay_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| ChaosError::io("finding the runner's own path", e))?
            .with_file_name("prism-relay"),
    };
    let target = work.join("prism-relay");
    fs::copy(&source, &target).map_err(|e| {
        ChaosError::io(
            format!("copying the relay binary {} (build it with cargo build --release, or give --relay-bin)", source.display()),
            e,
        )
    })?;
    Ok(target)
}

/// Runs one scenario; a failure of the runner or of a check becomes the row's failure.
fn run_scenario(
    relay_bin: &Path,
    dir: &Path,
    scenario: &Scenario,
    leg: Leg,
    seed: u64,
    cycles: u32,
) -> (Row, KillStats) {
    let mut row = Row::new(leg, scenario.number, scenario.name);
    let mut stats = KillStats::default();
    let _ = fs::remove_dir_all(dir);
    let faults = schedule::draw(seed, scenario, cycles);
    let mut bed = match Bed::start(relay_bin, dir, scenario.needs, leg) {
        Ok(bed) => bed,
        Err(e) => {
            row.failure = Some(format!("start: {e}"));
            return (row, stats);
        }
    };
    let mut log = match bed::open_append(&dir.join("faults.log")) {
        Ok(f) => f,
        Err(e) => {
            row.failure = Some(e.to_string());
            return (row, stats);
        }
    };
    bed.start_load(
        &format!("chaos{seed}s{}", scenario.number),
        prng::derive_seed(seed, 100 + u64::from(scenario.number)),
    );
    std::thread::sleep(WARM_UP);
    for (i, fault) in faults.iter().enumerate() {
        let outcome = faults::inject(&mut bed, fault, &mut stats, &mut log)
            .and_then(|end| bed.wait_caught_up(end));
        row.cycles += 1;
        match outcome {
            Ok(catch_up) => {
                row.catch_up_worst = Some(row.catch_up_worst.map_or(catch_up, |w| w.max(catch_up)));
                let _ = writeln!(
                    log,
                    "cycle {} caught up in {:.2} s",
                    i + 1,
                    catch_up.as_secs_f64()
                );
                println!(
                    "  s{} cycle {}/{} {} ({}): caught up in {:.1} s",
                    scenario.number,
                    i + 1,
                    faults.len(),
                    fault.kind.name(),
                    match fault.kind {
                        schedule::FaultKind::ClickHouseSlow => fault.proxy_mode.name(),
                        _ => fault.point.name(),
                    },
                    catch_up.as_secs_f64()
                );
            }
            Err(e) => {
                let _ = writeln!(log, "cycle {} failed: {e}", i + 1);
                row.failure = Some(format!("cycle {}: {e}", i + 1));
                break;
            }
        }
    }
    let tally = bed.stop_load();
    let _ = writeln!(log, "load: {tally:?}");
    if let Some(proxy) = &bed.proxy {
        let _ = writeln!(log, "proxy: {:?}", proxy.stats());
    }
    // Every fault is lifted; what remains is the drain of the last messages.
    if row.failure.is_none() {
        if let Err(e) = bed
            .relay
            .start()
            .map_err(ChaosError::from)
            .and_then(|()| bed.wait_caught_up(Instant::now()))
        {
            row.failure = Some(format!("final catch-up: {e}"));
        }
    }
    match bed.account() {
        Ok(acc) => {
            let _ = writeln!(log, "accounting: {acc:?}");
            row.published = acc.published;
            row.stored = acc.stored;
            row.dead_lettered = acc.dead_lettered;
            row.lost = acc.lost;
            row.duplicated = acc.duplicated;
            if acc.discarded > 0 {
                println!(
                    "  s{}: JetStream discarded {} messages under its limits; every one is accounted by identity",
                    scenario.number, acc.discarded
                );
            }
            if let Some(extra) = acc.extra_without_final {
                println!(
                    "  s{} ({}): {extra} rows beyond one per identity without FINAL",
                    scenario.number,
                    leg.name()
                );
                if extra > 0 && scenario.clickhouse_faults_only() && row.failure.is_none() {
                    row.failure = Some(format!(
                        "{extra} rows stored twice without FINAL: a retried batch escaped the server's token deduplication"
                    ));
                }
            }
            if acc.published == 0 && row.failure.is_none() {
                row.failure = Some("nothing was published".into());
            }
        }
        Err(e) => {
            if row.failure.is_none() {
                row.failure = Some(format!("accounting: {e}"));
            }
        }
    }
    if !row.passed() {
        bed.keep_evidence();
    }
    bed.shut_down();
    drop(bed);
    if row.passed() {
        let _ = fs::remove_dir_all(dir);
    }
    (row, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags_are_read_and_bad_ones_refused_with_the_reason() {
        let a = args(&["--quick", "--seed", "42", "--scenario", "1,9"]).expect("valid flags");
        assert!(a.quick);
        assert_eq!(a.seed, Some(42));
        assert_eq!(a.scenarios, vec![1, 9]);
        assert!(args(&["--scenario", "10"]).unwrap_err().contains("1 to 9"));
        assert!(args(&["--seed", "x"]).unwrap_err().contains("not a number"));
        assert!(args(&["--frobnicate"])
            .unwrap_err()
            .contains("unknown argument"));
        assert!(args(&["--seed"]).unwrap_err().contains("needs a value"));
    }

    #[test]
    fn both_legs_run_by_default_and_leg_picks_one_or_refuses_a_stranger() {
        assert_eq!(
            args(&[]).expect("no flags").legs,
            vec![Leg::Legacy, Leg::Modern]
        );
        assert_eq!(
            args(&["--leg", "modern"]).expect("modern").legs,
            vec![Leg::Modern]
        );
        assert_eq!(
            args(&["--leg", "legacy"]).expect("legacy").legs,
            vec![Leg::Legacy]
        );
        assert_eq!(
            args(&["--leg", "both"]).expect("both").legs,
            vec![Leg::Legacy, Leg::Modern]
        );
        assert!(args(&["--leg", "new"])
            .unwrap_err()
            .contains("legacy, modern or both"));
    }

    #[test]
    fn the_plan_runs_the_legacy_leg_whole_then_the_clickhouse_scenarios_on_the_modern_leg() {
        let quick = args(&["--quick"]).expect("quick");
        let runs = plan(&quick);
        let legacy: Vec<u8> = runs
            .iter()
            .filter(|(l, _, _)| *l == Leg::Legacy)
            .map(|(_, s, _)| s.number)
            .collect();
        let modern: Vec<u8> = runs
            .iter()
            .filter(|(l, _, _)| *l == Leg::Modern)
            .map(|(_, s, _)| s.number)
            .collect();
        assert_eq!(legacy, (1..=9).collect::<Vec<u8>>());
        for n in [1, 2, 7, 8, 9] {
            assert!(modern.contains(&n), "scenario {n} on the modern leg");
        }
        assert!(!modern.contains(&4), "NATS kills do not involve ClickHouse");
        assert!(runs
            .iter()
            .position(|(l, _, _)| *l == Leg::Modern)
            .is_some_and(|first| runs[first..].iter().all(|(l, _, _)| *l == Leg::Modern)));
        let only = args(&["--leg", "modern", "--scenario", "4,1"]).expect("modern 4,1");
        let runs = plan(&only);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].0, runs[0].1.number), (Leg::Modern, 1));
        assert!(runs
            .iter()
            .all(|(_, s, c)| Some(*c) == s.cycles(Leg::Modern, false)));
    }
}
