//! Integration tests of the test bed against the real servers: they show that what
//! the relay's tests will rely on holds (round trips, durability across SIGKILL,
//! pause and resume, clean-up on drop).

mod chdb_server;
mod clickhouse_server;
mod nats_cluster;
mod nats_server;
mod process_lifetime;
mod replicated_cluster;

/// Error type of the tests: any error, with `?` instead of unwrap.
type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
