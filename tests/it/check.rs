//! `prism-relay check` against real servers: every finding makes it exit 1 with a line that says
//! what to change, one server being down does not stop the checks of the other, and the WAL
//! directory is checked for writability and room for its budget.

use std::process::Command;

use crate::disk::Tmpfs;
use crate::harness::{relay_command, Bed, RelayConfig, RelayProc};

/// The exit status of a check that found something to change.
const FINDINGS: i32 = 1;

/// Size of the small disk of the space check: far below the bed's 256 MiB WAL budget.
const SMALL_DISK_BYTES: u64 = 8 * 1024 * 1024;

/// Starts a relay once so its streams, consumers and tables exist, then stops it.
async fn set_up(bed: &Bed) -> RelayConfig {
    let config = bed.config();
    let mut relay = RelayProc::spawn_ready(bed, "setup", &config).await;
    assert!(relay.terminate().await.success(), "{}", relay.log());
    config
}

async fn check(bed: &Bed, name: &str, config: &RelayConfig) -> (Option<i32>, String) {
    let path = config.write(&bed.path(&format!("{name}.toml")));
    let (status, out) = relay_command(&["check", "--config", path.to_str().unwrap()]).await;
    (status.code(), out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_1_on_consumer_drift_with_one_line_that_names_the_change_and_0_when_clean() {
    let bed = Bed::start();
    let config = set_up(&bed).await;
    let (code, out) = check(&bed, "clean", &config).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("check: ok"), "{out}");

    let mut drifted = config.clone();
    drifted.consumers[2].ack_wait_ms = 45_000;
    let (code, out) = check(&bed, "drifted", &drifted).await;
    assert_eq!(code, Some(FINDINGS), "{out}");
    let findings: Vec<&str> = out.lines().filter(|l| l.contains("drift:")).collect();
    assert_eq!(findings.len(), 1, "one line per finding:\n{out}");
    let line = findings[0];
    assert!(
        line.contains(
            "consumer MARKET_DATA/prism-relay-data: drift: ack_wait_ms: configured 45000, server has 30000"
        ) && line.contains("ack_wait_ms = 30000"),
        "the finding names the change to make: {line}"
    );
    assert!(
        out.contains("consumer MARKET_TRADES/prism-relay-trades: ok"),
        "{out}"
    );
    assert!(out.contains("check: 1 finding"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_goes_on_to_clickhouse_when_nats_is_unreachable_and_to_nats_when_clickhouse_is() {
    let mut bed = Bed::start();
    let config = set_up(&bed).await;

    bed.nats.kill9().expect("kill -9 nats-server");
    let (code, out) = check(&bed, "no-nats", &config).await;
    assert_eq!(code, Some(FINDINGS), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("nats: cannot connect")),
        "{out}"
    );
    assert!(
        out.contains("clickhouse: profile legacy"),
        "ClickHouse still checked:\n{out}"
    );
    assert!(!out.contains("schema:"), "the tables match:\n{out}");
    assert!(out.contains("wal: ok"), "{out}");

    bed.nats.restart().expect("restart nats-server");
    bed.ch.kill9().expect("kill -9 clickhouse-server");
    let (code, out) = check(&bed, "no-clickhouse", &config).await;
    assert_eq!(code, Some(FINDINGS), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("clickhouse: unreachable")),
        "{out}"
    );
    assert!(
        out.contains("consumer MARKET_TRADES/prism-relay-trades: ok"),
        "NATS still checked:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_wal_directory_it_cannot_write_in_and_one_too_small_for_the_budget() {
    let bed = Bed::start();
    let config = set_up(&bed).await;

    // Too small: a fresh 8 MiB disk for a 256 MiB budget.
    let small = Tmpfs::mount(&bed.path("small"), SMALL_DISK_BYTES);
    let mut on_small = config.clone();
    on_small.wal_dir = bed.path("small").join("wal");
    let (code, out) = check(&bed, "small", &on_small).await;
    assert_eq!(code, Some(FINDINGS), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("wal:") && l.contains("budget_bytes_max"))
        .unwrap_or_else(|| panic!("no space finding:\n{out}"));
    assert!(line.contains("268435456"), "names the budget: {line}");
    assert!(
        !on_small.wal_dir.exists(),
        "check creates nothing (the probe file goes in the parent and is removed)"
    );
    assert_eq!(
        std::fs::read_dir(bed.path("small")).expect("list").count(),
        0,
        "the probe file is removed"
    );
    drop(small);

    // Not writable: a read-only file system.
    let read_only = Tmpfs::mount(&bed.path("ro"), SMALL_DISK_BYTES);
    let remount = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(bed.path("ro"))
        .status()
        .expect("run mount");
    assert!(remount.success(), "remount read-only");
    let mut on_ro = config.clone();
    on_ro.wal_dir = bed.path("ro");
    on_ro.budget_bytes_max = 4 * 1024 * 1024;
    on_ro.retention_bytes_max = 2 * 1024 * 1024;
    on_ro.segment_bytes_max = 1024 * 1024;
    let (code, out) = check(&bed, "ro", &on_ro).await;
    assert_eq!(code, Some(FINDINGS), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("wal: cannot write"))
        .unwrap_or_else(|| panic!("no writability finding:\n{out}"));
    assert!(line.contains("Read-only file system"), "{line}");
    assert!(
        !out.contains("budget_bytes_max"),
        "enough room for 4 MiB:\n{out}"
    );
    drop(read_only);
}
