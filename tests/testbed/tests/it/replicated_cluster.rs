//! ZooKeeper from Debian's package coordinating two `clickhouse-server` 18.16 replicas of one
//! shard: distributed DDL, replication, and ZooKeeper's SIGKILL and restart.

use std::time::{Duration, Instant};

use prism_testbed::{ClickHouse, ClickHouseOptions, Replication, ZooKeeper};

use crate::TestResult;

/// How long a row may take to reach the other replica, or a replica to reconnect to
/// ZooKeeper after its restart, on a loaded machine.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

fn replica(zookeeper: &ZooKeeper, name: &str) -> Result<ClickHouse, prism_testbed::TestbedError> {
    ClickHouse::start_with(&ClickHouseOptions {
        replication: Some(Replication {
            zookeeper_port: zookeeper.port(),
            shard: "01".into(),
            replica: name.into(),
        }),
        ..ClickHouseOptions::default()
    })
}

/// Polls `sql` on `server` until it answers `expected` (trimmed).
fn wait_for(server: &ClickHouse, sql: &str, expected: &str) -> TestResult {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let answer = server.query(sql).map(|body| body.trim().to_owned());
        if answer.as_deref().ok() == Some(expected) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(
                format!("{sql}: {answer:?} after {CONVERGE_TIMEOUT:?}, not {expected}").into(),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_replicas_coordinated_by_zookeeper_replicate_and_survive_a_zookeeper_restart() -> TestResult {
    let mut zookeeper = ZooKeeper::start()?;
    let first = replica(&zookeeper, "r1")?;
    let second = replica(&zookeeper, "r2")?;
    let ports = [first.tcp_port(), second.tcp_port()];
    first.set_cluster("bed", &ports)?;
    second.set_cluster("bed", &ports)?;

    first.query(
        "CREATE TABLE default.t ON CLUSTER bed (id UInt64) \
         ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/default/t', '{replica}') ORDER BY id",
    )?;
    first.query("INSERT INTO default.t SELECT number FROM system.numbers LIMIT 1000")?;
    wait_for(
        &second,
        "SELECT count(), sum(id) FROM default.t",
        "1000\t499500",
    )?;

    // Without ZooKeeper a replicated table refuses inserts; it takes them again once
    // ZooKeeper is back, and they replicate.
    zookeeper.kill9()?;
    assert!(zookeeper.pid().is_none());
    let refused = first.query("INSERT INTO default.t VALUES (5000)");
    assert!(refused.is_err(), "insert accepted without ZooKeeper");
    zookeeper.restart()?;
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    while let Err(error) = first.query("INSERT INTO default.t VALUES (5000)") {
        if Instant::now() >= deadline {
            return Err(format!("insert still refused after ZooKeeper's restart: {error}").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for(
        &second,
        "SELECT count(), max(id) FROM default.t",
        "1001\t5000",
    )?;
    Ok(())
}
