//! The relay's configuration: one TOML file, environment overrides, and validation.
//!
//! Loading happens in four steps, each of which can only narrow what the next one sees:
//!
//! 1. [`Config::load`] parses the TOML file (or starts from [`Config::default`] when no file is
//!    given). Every field has a default, and unknown fields are rejected by name, so a typo
//!    (`fetch_bach = 10`) fails loudly instead of silently keeping the default.
//! 2. Environment variables `PRISM_RELAY_<SECTION>_<FIELD>` override scalar fields of the
//!    non-array sections (`[nats]`, `[wal]`, `[clickhouse]`, `[drain]`, `[metrics]`,
//!    `[shutdown]`, `[log]`, `[audit]`), for example `PRISM_RELAY_NATS_URL`, `PRISM_RELAY_CLICKHOUSE_URL`,
//!    `PRISM_RELAY_WAL_DIR`. An empty value clears an optional field. Arrays and maps
//!    (`[[stream]]`, `[[consumer]]`, `[drain.tables.*]`, `[[drain.passthrough]]`) are
//!    config-file only: an environment variable cannot describe them unambiguously.
//!    A variable naming a known section but an unknown field is an error; variables of other
//!    shapes (`PRISM_RELAY_CONFIG`, for the binary's flags) are left alone.
//! 3. Derived defaults: a field set in neither the file nor the environment follows the fields
//!    that bound it (`wal.group_bytes_max` follows a smaller `wal.segment_bytes_max`), so only
//!    values the operator set can contradict each other (`derive.rs`).
//! 4. [`Config::validate`] checks every bound. An invalid value is reported with its field path
//!    (`consumer[1].fetch_batch`), the value, the allowed range with its unit, and the fix.
//!    All problems are reported at once, not one per start-up attempt.
//!
//! The bounds are the `*_MIN`/`*_MAX` constants of `limits.rs`; `relay.example.toml` at the repository
//! root lists every field with its default, unit and bounds, and a unit test keeps it equal to
//! the code.
//!
//! This module only holds values: `source` maps `[nats]`, `[[stream]]` and `[[consumer]]` onto
//! JetStream, and the relay maps `[wal]` onto the WAL crate's options.
//!
//! Each concern has its own file, so that each reads on its own; everything public is re-exported
//! here, so users name it `crate::config::…`:
//!
//! - `model.rs`: the sections and fields, their defaults, and the serde helpers of single fields;
//! - `limits.rs`: the bounds of every field and the compile-time checks of their relations;
//! - `load.rs`: reading and parsing the file, the order of the loading steps, and the errors;
//! - `env.rs`: the environment overrides;
//! - `secrets.rs`: secrets refused in the file, read from files, registered for redaction;
//! - `validate.rs`: the validation of every bound and relation;
//! - `origin.rs`: where each value came from (default, file, environment, derived);
//! - `derive.rs`: the derived defaults, by which a field the operator did not set follows the
//!   fields that bound it;
//! - `show.rs`: the effective configuration as TOML with the origin of each value (`prism-relay
//!   config`).

mod derive;
mod env;
mod limits;
mod load;
mod model;
mod origin;
mod secrets;
mod show;
mod validate;

#[cfg(test)]
mod tests;

pub use env::{env_var_name, ENV_OVERRIDES, ENV_PREFIX, ENV_SECTIONS};
pub use limits::*;
pub use load::{ConfigError, InvalidValue};
pub use model::{
    AckPolicyKind, AuditConfig, ClickHouseConfig, ClickHouseProfile, CompressionKind, Config,
    ConsumerConfig, DeliverPolicyKind, DrainConfig, LogConfig, LogFormat, MetricsConfig,
    NatsConfig, PassthroughRoute, RecoveryModeKind, ShutdownConfig, StorageKind, StreamConfig,
    TableBatch, WalConfig, RESERVED_STREAM_NAME, TYPED_DATA_TYPES, TYPED_TABLES,
};
pub use origin::{Origin, Origins};
