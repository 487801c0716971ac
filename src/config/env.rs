//! Environment overrides: `PRISM_RELAY_<SECTION>_<FIELD>` for the scalar fields of the non-array
//! sections, the list of every overridable field, and the parsing of one variable's value.
//!
//! It is separate because it is a second source of values with its own naming and parsing rules
//! (an empty value clears an option; enums are spelled as in the file); the list of overridable
//! fields and the code that applies them sit together so they cannot drift apart unnoticed.

use std::path::PathBuf;

use super::{Config, ConfigError};
use crate::redact::redact;

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "PRISM_RELAY_";

/// Sections whose scalar fields environment variables may override.
pub const ENV_SECTIONS: [&str; 8] = [
    "nats",
    "wal",
    "clickhouse",
    "drain",
    "metrics",
    "shutdown",
    "log",
    "audit",
];

/// Every (section, field) an environment variable may override.
pub const ENV_OVERRIDES: [(&str, &str); 58] = [
    ("nats", "url"),
    ("nats", "name"),
    ("nats", "connect_timeout_ms"),
    ("nats", "request_timeout_ms"),
    ("nats", "user"),
    ("nats", "password"),
    ("nats", "password_file"),
    ("nats", "token"),
    ("nats", "token_file"),
    ("nats", "creds_file"),
    ("nats", "nkey_file"),
    ("nats", "tls_required"),
    ("nats", "tls_ca_file"),
    ("nats", "tls_cert_file"),
    ("nats", "tls_key_file"),
    ("wal", "dir"),
    ("wal", "segment_bytes_max"),
    ("wal", "group_bytes_max"),
    ("wal", "budget_bytes_max"),
    ("wal", "retention_bytes_max"),
    ("wal", "retention_segments_max"),
    ("wal", "retention_age_s"),
    ("wal", "recovery_mode"),
    ("clickhouse", "url"),
    ("clickhouse", "user"),
    ("clickhouse", "password"),
    ("clickhouse", "password_file"),
    ("clickhouse", "database"),
    ("clickhouse", "profile"),
    ("clickhouse", "insert_timeout_ms"),
    ("clickhouse", "connect_timeout_ms"),
    ("clickhouse", "create_schema"),
    ("clickhouse", "ttl_days"),
    ("clickhouse", "tls_ca_file"),
    ("clickhouse", "tls_cert_file"),
    ("clickhouse", "tls_key_file"),
    ("clickhouse", "cluster"),
    ("clickhouse", "zookeeper_path"),
    ("drain", "flush_interval_ms"),
    ("drain", "retry_backoff_initial_ms"),
    ("drain", "retry_backoff_max_ms"),
    ("drain", "dead_letter_table"),
    ("drain", "timestamp_min_ms"),
    ("drain", "timestamp_future_max_ms"),
    ("metrics", "listen"),
    ("metrics", "connections_max"),
    ("metrics", "header_read_timeout_ms"),
    ("metrics", "request_timeout_ms"),
    ("metrics", "ready_insert_failing_s"),
    ("metrics", "backlog_poll_interval_s"),
    ("metrics", "status_interval_s"),
    ("shutdown", "timeout_ms"),
    ("shutdown", "drain"),
    ("log", "format"),
    ("audit", "enabled"),
    ("audit", "sample_every_records"),
    ("audit", "interval_ms"),
    ("audit", "pending_max"),
];

/// `PRISM_RELAY_<SECTION>_<FIELD>` for a (section, field).
pub fn env_var_name(section: &str, field: &str) -> String {
    format!(
        "{ENV_PREFIX}{}_{}",
        section.to_ascii_uppercase(),
        field.to_ascii_uppercase()
    )
}

impl Config {
    /// Applies every `PRISM_RELAY_<SECTION>_<FIELD>` variable of `env` whose section is one of
    /// the overridable sections. Variables are applied in name order so the result does not
    /// depend on the environment's order.
    pub fn apply_env<I>(&mut self, env: I) -> Result<(), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        vars.sort();
        for (var, value) in vars {
            let rest = &var[ENV_PREFIX.len()..];
            let Some((section, field)) = rest.split_once('_') else {
                continue;
            };
            let section = section.to_ascii_lowercase();
            let field = field.to_ascii_lowercase();
            if !ENV_SECTIONS.contains(&section.as_str()) {
                continue;
            }
            self.apply_env_field(&var, &section, &field, &value)?;
        }
        Ok(())
    }

    fn apply_env_field(
        &mut self,
        var: &str,
        section: &str,
        field: &str,
        value: &str,
    ) -> Result<(), ConfigError> {
        let v = EnvValue { var, value };
        match (section, field) {
            ("nats", "url") => self.nats.url = value.to_owned(),
            ("nats", "name") => self.nats.name = value.to_owned(),
            ("nats", "connect_timeout_ms") => self.nats.connect_timeout_ms = v.parse()?,
            ("nats", "request_timeout_ms") => self.nats.request_timeout_ms = v.parse()?,
            ("nats", "user") => self.nats.user = v.optional_string(),
            ("nats", "password") => self.nats.password = v.optional_string(),
            ("nats", "password_file") => {
                self.nats.password_file = v.optional_string().map(PathBuf::from)
            }
            ("nats", "token") => self.nats.token = v.optional_string(),
            ("nats", "token_file") => self.nats.token_file = v.optional_string().map(PathBuf::from),
            ("nats", "creds_file") => self.nats.creds_file = v.optional_string().map(PathBuf::from),
            ("nats", "nkey_file") => self.nats.nkey_file = v.optional_string().map(PathBuf::from),
            ("nats", "tls_required") => self.nats.tls_required = v.parse()?,
            ("nats", "tls_ca_file") => {
                self.nats.tls_ca_file = v.optional_string().map(PathBuf::from)
            }
            ("nats", "tls_cert_file") => {
                self.nats.tls_cert_file = v.optional_string().map(PathBuf::from)
            }
            ("nats", "tls_key_file") => {
                self.nats.tls_key_file = v.optional_string().map(PathBuf::from)
            }
            ("wal", "dir") => self.wal.dir = PathBuf::from(value),
            ("wal", "segment_bytes_max") => self.wal.segment_bytes_max = v.parse()?,
            ("wal", "group_bytes_max") => self.wal.group_bytes_max = v.parse()?,
            ("wal", "budget_bytes_max") => self.wal.budget_bytes_max = v.parse()?,
            ("wal", "retention_bytes_max") => self.wal.retention_bytes_max = v.parse()?,
            ("wal", "retention_segments_max") => self.wal.retention_segments_max = v.parse()?,
            ("wal", "retention_age_s") => self.wal.retention_age_s = v.parse()?,
            ("wal", "recovery_mode") => self.wal.recovery_mode = v.parse_enum()?,
            ("clickhouse", "url") => self.clickhouse.url = value.to_owned(),
            ("clickhouse", "user") => self.clickhouse.user = value.to_owned(),
            ("clickhouse", "password") => self.clickhouse.password = value.to_owned(),
            ("clickhouse", "password_file") => {
                self.clickhouse.password_file = v.optional_string().map(PathBuf::from)
            }
            ("clickhouse", "database") => self.clickhouse.database = value.to_owned(),
            ("clickhouse", "profile") => self.clickhouse.profile = v.parse_enum()?,
            ("clickhouse", "insert_timeout_ms") => self.clickhouse.insert_timeout_ms = v.parse()?,
            ("clickhouse", "connect_timeout_ms") => {
                self.clickhouse.connect_timeout_ms = v.parse()?
            }
            ("clickhouse", "create_schema") => self.clickhouse.create_schema = v.parse()?,
            ("clickhouse", "ttl_days") => self.clickhouse.ttl_days = v.parse_optional()?,
            ("clickhouse", "tls_ca_file") => {
                self.clickhouse.tls_ca_file = v.optional_string().map(PathBuf::from)
            }
            ("clickhouse", "tls_cert_file") => {
                self.clickhouse.tls_cert_file = v.optional_string().map(PathBuf::from)
            }
            ("clickhouse", "tls_key_file") => {
                self.clickhouse.tls_key_file = v.optional_string().map(PathBuf::from)
            }
            ("clickhouse", "cluster") => self.clickhouse.cluster = v.optional_string(),
            ("clickhouse", "zookeeper_path") => self.clickhouse.zookeeper_path = value.to_owned(),
            ("drain", "flush_interval_ms") => self.drain.flush_interval_ms = v.parse()?,
            ("drain", "retry_backoff_initial_ms") => {
                self.drain.retry_backoff_initial_ms = v.parse()?
            }
            ("drain", "retry_backoff_max_ms") => self.drain.retry_backoff_max_ms = v.parse()?,
            ("drain", "timestamp_min_ms") => self.drain.timestamp_min_ms = v.parse()?,
            ("drain", "timestamp_future_max_ms") => {
                self.drain.timestamp_future_max_ms = v.parse()?
            }
            ("drain", "dead_letter_table") => self.drain.dead_letter_table = value.to_owned(),
            ("metrics", "listen") => self.metrics.listen = v.parse()?,
            ("metrics", "connections_max") => self.metrics.connections_max = v.parse()?,
            ("metrics", "header_read_timeout_ms") => {
                self.metrics.header_read_timeout_ms = v.parse()?
            }
            ("metrics", "request_timeout_ms") => self.metrics.request_timeout_ms = v.parse()?,
            ("metrics", "ready_insert_failing_s") => {
                self.metrics.ready_insert_failing_s = v.parse()?
            }
            ("metrics", "backlog_poll_interval_s") => {
                self.metrics.backlog_poll_interval_s = v.parse()?
            }
            ("metrics", "status_interval_s") => self.metrics.status_interval_s = v.parse()?,
            ("shutdown", "timeout_ms") => self.shutdown.timeout_ms = v.parse()?,
            ("shutdown", "drain") => self.shutdown.drain = v.parse()?,
            ("log", "format") => self.log.format = v.parse_enum()?,
            ("audit", "enabled") => self.audit.enabled = v.parse()?,
            ("audit", "sample_every_records") => self.audit.sample_every_records = v.parse()?,
            ("audit", "interval_ms") => self.audit.interval_ms = v.parse()?,
            ("audit", "pending_max") => self.audit.pending_max = v.parse()?,
            _ => {
                let known: Vec<String> = ENV_OVERRIDES
                    .iter()
                    .filter(|(s, _)| *s == section)
                    .map(|(s, f)| env_var_name(s, f))
                    .collect();
                return Err(ConfigError::UnknownEnv {
                    var: var.to_owned(),
                    section: format!("[{section}]"),
                    field: field.to_owned(),
                    known: known.join(", "),
                });
            }
        }
        Ok(())
    }
}

/// One environment override being parsed.
struct EnvValue<'a> {
    var: &'a str,
    value: &'a str,
}

impl EnvValue<'_> {
    fn parse<T: std::str::FromStr>(&self) -> Result<T, ConfigError> {
        self.value
            .trim()
            .parse()
            .map_err(|_| ConfigError::EnvValue {
                var: self.var.to_owned(),
                value: redact(self.value).into_owned(),
                expected: std::any::type_name::<T>(),
            })
    }

    fn parse_optional<T: std::str::FromStr>(&self) -> Result<Option<T>, ConfigError> {
        if self.value.trim().is_empty() {
            Ok(None)
        } else {
            self.parse().map(Some)
        }
    }

    fn optional_string(&self) -> Option<String> {
        (!self.value.is_empty()).then(|| self.value.to_owned())
    }

    /// Parses a snake_case enum value the way the TOML file spells it.
    fn parse_enum<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        T::deserialize(
            serde::de::value::StrDeserializer::<serde::de::value::Error>::new(self.value.trim()),
        )
        .map_err(|_| ConfigError::EnvValue {
            var: self.var.to_owned(),
            value: redact(self.value).into_owned(),
            expected: "one of the values listed in relay.example.toml",
        })
    }
}
