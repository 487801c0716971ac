//! prism-relay: a durable relay from NATS JetStream through a local write-ahead log to ClickHouse.
//!
//! - [`codec`]: MarketPrism JSON payloads decoded into typed ClickHouse rows.
//! - [`schema`]: the ClickHouse DDL of those rows (modern and legacy profiles) and the start-up
//!   column check.

pub mod codec;
pub mod config;
pub mod schema;
pub mod sink;
pub mod source;
pub mod tools;
