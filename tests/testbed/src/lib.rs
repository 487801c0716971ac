//! Real servers for tests, chaos runs and benchmarks of prism-relay.
//!
//! The main types are [`Nats`], a `nats-server` with JetStream, [`NatsCluster`], several of
//! them forming one JetStream cluster, [`ClickHouse`], a
//! `clickhouse-server` (18.16 here; optionally a replica of a cluster coordinated by
//! [`ZooKeeper`]), [`Chdb`], a modern ClickHouse engine (chdb-core's 26.9) behind a stand-in
//! for ClickHouse's HTTP interface, [`Prometheus`], a `prometheus` server for the deployment
//! tests, and [`Relay`], the `prism-relay` binary run on a configuration. Each starts on free
//! 127.0.0.1 ports in its own temporary directory, is ready when `start` returns, and can be
//! killed with SIGKILL, restarted on the same ports and data, paused with SIGSTOP and resumed.
//! Dropping a handle kills the server and removes its directory, also when a test panics; a
//! server also dies with the test process, because it is spawned with a parent-death signal.
//! Failures are [`TestbedError`]s that carry the server's log tail where it helps.
//!
//! Ports are picked below the kernel's ephemeral range, which outgoing connections
//! never take, so a killed server's ports are still free when it restarts; a start
//! that loses a port to another process anyway is retried on fresh ports.
//!
//! The API is synchronous (it blocks for at most the named bounds below), so it works
//! from plain tests and from tokio tests alike; from async code that must not block a
//! runtime thread for long, wrap `start`/`restart` in `spawn_blocking`.
//!
//! Binaries are found through `PRISM_NATS_SERVER` / `PRISM_CLICKHOUSE_SERVER` /
//! `PRISM_PROMETHEUS_SERVER`, then `PATH`, then (for ClickHouse) `/usr/sbin` and `/usr/bin`
//! (`/usr/bin` for Prometheus). A missing binary is an error naming how to install it: tests
//! never skip. `scripts/test` installs all three.

mod chdb;
mod clickhouse;
mod error;
mod http;
mod nats;
mod nats_cluster;
mod process;
mod prometheus;
mod relay;
mod server;
mod zookeeper;

pub use chdb::{Chdb, HttpAnswer};
pub use clickhouse::{ClickHouse, ClickHouseOptions, HttpsFiles, Replication};
pub use error::TestbedError;
pub use nats::Nats;
pub use nats_cluster::{NatsCluster, NatsNode};
pub use process::free_ports;
pub use prometheus::{url_encode, PromAnswer, Prometheus};
pub use relay::{http_get, metric_sum, Relay};
pub use zookeeper::{ZooKeeper, ZOOKEEPER_TICK_MS};

/// How long `Nats::start`/`restart` wait for JetStream to report healthy. NATS is
/// ready in tens of milliseconds; the bound is wide for a loaded 2-core machine.
pub const NATS_READY_TIMEOUT_MS: u64 = 15_000;

/// How long [`NatsCluster::start`] waits for the JetStream meta group to elect a leader
/// known to every node, and [`NatsNode::restart`] for a node to catch up with it. An election
/// takes a few seconds here; the bound is wide for a loaded 2-core machine.
pub const NATS_CLUSTER_READY_TIMEOUT_MS: u64 = 60_000;

/// How long `ClickHouse::start`/`restart` wait for `/ping`. ClickHouse 18.16 starts
/// in a fraction of a second to 2 s here; restarts after SIGKILL load all tables first.
pub const CLICKHOUSE_READY_TIMEOUT_MS: u64 = 30_000;

/// How long `Prometheus::start` waits for `/-/ready`. It is ready in under a second here;
/// the bound is wide for a loaded 2-core machine.
pub const PROMETHEUS_READY_TIMEOUT_MS: u64 = 30_000;

/// How long `Chdb::start`/`restart` wait for `/ping`. Importing chdb and opening its
/// session takes about a second here; a loaded machine and a restart that loads every
/// table's parts take longer.
pub const CHDB_READY_TIMEOUT_MS: u64 = 60_000;

/// How long `ZooKeeper::start`/`restart` wait for the server to serve requests. The JVM
/// starts it in 1 to 3 s here; the bound is wide for a loaded 2-core machine.
pub const ZOOKEEPER_READY_TIMEOUT_MS: u64 = 60_000;

/// How long [`ClickHouse::set_cluster`] waits for the server to load its new cluster
/// definition: it rereads its configuration every few seconds.
pub const CLUSTER_CONFIG_TIMEOUT_MS: u64 = 30_000;

/// Pause between two readiness (or state) probes.
pub const READY_POLL_INTERVAL_MS: u64 = 20;

/// Bound on one readiness probe request; a probe that takes longer counts as "not yet".
pub const PROBE_TIMEOUT_MS: u64 = 1_000;

/// Default bound on [`ClickHouse::query`], connection to last byte.
pub const QUERY_TIMEOUT_MS: u64 = 30_000;

/// Starts tried with fresh ports (or, for a restart, the same ports again) when a
/// port turns out taken between picking it and the server binding it.
pub const START_ATTEMPTS_MAX: u32 = 4;

/// How much of the end of each log file an error carries.
pub const LOG_TAIL_BYTES_MAX: u64 = 4 * 1024;

/// How long `pause`/`resume` wait for the kernel to report the new process state.
pub const SIGNAL_SETTLE_TIMEOUT_MS: u64 = 5_000;

/// How long `terminate` waits for a graceful exit after SIGTERM before SIGKILL.
pub const TERMINATE_TIMEOUT_MS: u64 = 15_000;
