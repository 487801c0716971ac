//! Where each value of a loaded configuration came from: its default, the file, an environment
//! variable, or derived from another field the operator set.
//!
//! It is separate because two consumers need the same answer: the derived defaults
//! (`derive.rs`) change only fields the operator did not set, and `prism-relay config` marks every
//! value with its origin. Paths are written as validation writes them: `wal.group_bytes_max`,
//! `consumer[1].fetch_batch`, `drain.tables.trades.rows_max`.

use std::collections::BTreeMap;
use std::fmt;

use super::env::{ENV_OVERRIDES, ENV_PREFIX};

/// Where one value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Not set anywhere: the documented default.
    Default,
    /// Set in the configuration file.
    File,
    /// Set by this environment variable (it overrides the file).
    Env(String),
    /// Not set, and following the field named here (the documented default contradicts it).
    Derived(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File => f.write_str("file"),
            Origin::Env(var) => write!(f, "env {var}"),
            Origin::Derived(from) => write!(f, "derived from {from}"),
        }
    }
}

/// The origin of every value that is not a default, by field path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins(BTreeMap<String, Origin>);

impl Origins {
    /// Records the fields the TOML `text` sets (the file parsed already, so `text` is valid).
    pub(crate) fn from_file(text: &str) -> Origins {
        let mut origins = Origins::default();
        if let Ok(table) = toml::from_str::<toml::Table>(text) {
            origins.record_table("", &table);
        }
        origins
    }

    fn record_table(&mut self, prefix: &str, table: &toml::Table) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                toml::Value::Table(inner) => self.record_table(&path, inner),
                toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                    for (i, item) in items.iter().enumerate() {
                        if let toml::Value::Table(inner) = item {
                            self.record_table(&format!("{path}[{i}]"), inner);
                        }
                    }
                    // The array itself is set, even when empty.
                    self.0.insert(path, Origin::File);
                }
                _ => {
                    self.0.insert(path, Origin::File);
                }
            }
        }
    }

    /// Records the overrides of `env` (already applied and checked by `Config::apply_env`); a
    /// variable wins over the file.
    pub(crate) fn record_env<I>(&mut self, env: I)
    where
        I: IntoIterator<Item = (String, String)>,
    {
        for (var, _) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, field)) = rest.split_once('_') else {
                continue;
            };
            let (section, field) = (section.to_ascii_lowercase(), field.to_ascii_lowercase());
            if ENV_OVERRIDES.contains(&(section.as_str(), field.as_str())) {
                self.0
                    .insert(format!("{section}.{field}"), Origin::Env(var.clone()));
            }
        }
    }

    /// Marks `path` as derived from `from`.
    pub(crate) fn derive(&mut self, path: String, from: impl Into<String>) {
        self.0.insert(path, Origin::Derived(from.into()));
    }

    /// Where the value at `path` came from.
    pub fn get(&self, path: &str) -> Origin {
        self.0.get(path).cloned().unwrap_or(Origin::Default)
    }

    /// Whether the operator set `path`, in the file or the environment.
    pub fn is_set(&self, path: &str) -> bool {
        matches!(self.0.get(path), Some(Origin::File | Origin::Env(_)))
    }
}
