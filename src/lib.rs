//! prism-relay: a durable relay from NATS JetStream through a local write-ahead log to ClickHouse.
//!
//! The pipeline, in data-flow order (ARCHITECTURE.md draws it):
//! - [`source`]: JetStream connection, streams, durable pull consumers, fetch and ack.
//! - [`ingest`]: fetch, append to the WAL (`prism_wal`), ack after the fsync.
//! - [`drain`]: per-table lanes that read the WAL, decode, batch and insert.
//! - [`codec`]: MarketPrism JSON payloads decoded into typed ClickHouse rows.
//! - [`sink`]: ClickHouse inserts, error classification, poison isolation, dead letters.
//! - [`schema`]: the ClickHouse DDL (modern and legacy profiles) and the start-up column check.
//!
//! Around it: [`config`] (TOML with environment overrides), [`run`] (start-up and graceful
//! shutdown), [`metrics`] and [`http`] (Prometheus, health, readiness), [`replay`] (WAL backfill),
//! [`tools`] (`loadgen` and `verify`), [`redact`] (secrets kept out of errors and logs), [`tls`] (the rustls
//! client configuration of TLS connections), and
//! [`logcond`] (conditions that persist, logged when they start, now and then while they last,
//! and when they end), and [`audit`] (samples acknowledged messages and confirms they reached
//! ClickHouse).

pub mod audit;
pub mod codec;
pub mod config;
pub mod drain;
pub mod http;
pub mod ingest;
pub mod logcond;
pub mod metrics;
pub mod redact;
pub mod replay;
pub mod run;
pub mod schema;
pub mod sink;
pub mod source;
pub mod tls;
pub mod tools;
