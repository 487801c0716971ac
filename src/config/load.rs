//! Loading: reading and parsing the file, the order of the loading steps, and the errors a load
//! reports ([`ConfigError`], with [`InvalidValue`] for each value refused by name).
//!
//! It is separate because it is the one part that touches the file system for the file itself and
//! decides the order of the steps (parse, refuse secrets in the file, environment, validate, read
//! secret files); each step lives with its own concern.

use std::fmt;
use std::path::{Path, PathBuf};

use super::Config;
use crate::redact::redact;

/// One invalid value, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidValue {
    /// Field path, e.g. `consumer[1].fetch_batch`.
    pub field: String,
    /// The rejected value as written.
    pub value: String,
    /// What is allowed, with the unit.
    pub allowed: String,
    /// How to fix it.
    pub fix: String,
}

impl fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {}: allowed {}; {}",
            self.field, self.value, self.allowed, self.fix
        )
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration (syntax, type, unknown field). The
    /// message is redacted: the parser quotes the offending line, which may hold a password.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// An environment override names a field that does not exist.
    #[error("unknown environment override {var}: {section} has no scalar field {field}; overridable: {known}")]
    UnknownEnv {
        var: String,
        section: String,
        field: String,
        known: String,
    },
    /// An environment override's value does not parse as the field's type.
    #[error("environment override {var} = {value:?} is not {expected}")]
    EnvValue {
        var: String,
        value: String,
        expected: &'static str,
    },
    /// A `password_file` or `token_file` could not be read.
    #[error("cannot read {field} {path}: {source}")]
    SecretFile {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration file holds a secret (a password, a token, or credentials inside a URL).
    /// A configuration file is copied, versioned and read by many, so secrets come from
    /// `password_file`/`token_file` or the environment; every such field is listed, none shows its
    /// value.
    #[error("config file {path} holds secrets, which belong in a file or the environment:\n  {}", .values.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    SecretInFile {
        path: PathBuf,
        values: Vec<InvalidValue>,
    },
    /// Values out of their bounds; every one is listed.
    #[error("invalid configuration:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<InvalidValue>),
}

impl ConfigError {
    /// The invalid values, if this is a validation error.
    pub fn invalid_values(&self) -> &[InvalidValue] {
        match self {
            ConfigError::Invalid(values) | ConfigError::SecretInFile { values, .. } => values,
            _ => &[],
        }
    }
}

impl Config {
    /// Loads the file at `path` (defaults when `None`), applies the process's `PRISM_RELAY_*`
    /// environment overrides, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// [`Config::load`] with an explicit environment, for tests and tools.
    pub fn load_with_env<I>(path: Option<&Path>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let config = Self::parse_toml(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    message: redact(&source.to_string()).into_owned(),
                })?;
                let secrets = config.secrets_in_file();
                if !secrets.is_empty() {
                    return Err(ConfigError::SecretInFile {
                        path: path.to_owned(),
                        values: secrets,
                    });
                }
                config
            }
        };
        config.apply_env(env)?;
        // Registered before validation, whose errors quote URLs, and again once the secret files
        // are read.
        config.register_secrets();
        config.validate()?;
        config.read_secret_files()?;
        config.register_secrets();
        Ok(config)
    }

    /// Parses TOML text without environment overrides or validation.
    pub fn parse_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }
}
