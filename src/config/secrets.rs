//! Secrets: refusing them in the configuration file, reading `password_file`/`token_file`,
//! registering every secret for redaction, and the redacted copy for printing.
//!
//! It is separate because the secret rules cut across sections (`[nats]` and `[clickhouse]`) and
//! the loading steps, and read best in one place next to each other.

use std::path::Path;

use super::{Config, ConfigError, InvalidValue};
use crate::redact::{self, redact, REDACTED};

impl Config {
    /// The secrets a configuration parsed from a file holds, as invalid values naming the field
    /// and the fix; their values show as [`REDACTED`]. Secrets from the environment are applied
    /// after this check and stay allowed.
    pub fn secrets_in_file(&self) -> Vec<InvalidValue> {
        const ALLOWED: &str = "no secret in the configuration file";
        let mut found = Vec::new();
        let mut push = |field: &str, fix: &str| {
            found.push(InvalidValue {
                field: field.to_owned(),
                value: REDACTED.to_owned(),
                allowed: ALLOWED.to_owned(),
                fix: fix.to_owned(),
            })
        };
        if self.nats.password.as_ref().is_some_and(|p| !p.is_empty()) {
            push(
                "nats.password",
                "remove it; set nats.password_file to a file holding it, or PRISM_RELAY_NATS_PASSWORD",
            );
        }
        if self.nats.token.as_ref().is_some_and(|t| !t.is_empty()) {
            push(
                "nats.token",
                "remove it; set nats.token_file to a file holding it, or PRISM_RELAY_NATS_TOKEN",
            );
        }
        if !redact::url_secrets(&self.nats.url, true).is_empty() {
            push(
                "nats.url",
                "remove the credentials from the URL; set nats.user with nats.password_file (or \
                 nats.token_file), or give the whole URL in PRISM_RELAY_NATS_URL",
            );
        }
        if !self.clickhouse.password.is_empty() {
            push(
                "clickhouse.password",
                "remove it; set clickhouse.password_file to a file holding it, or \
                 PRISM_RELAY_CLICKHOUSE_PASSWORD",
            );
        }
        if !redact::url_secrets(&self.clickhouse.url, false).is_empty() {
            push(
                "clickhouse.url",
                "remove the password from the URL; set clickhouse.password_file, or give the \
                 whole URL in PRISM_RELAY_CLICKHOUSE_URL",
            );
        }
        found
    }

    /// Registers every secret this configuration holds (passwords, tokens, passwords and tokens
    /// of URLs) with [`redact::register_secret`], so text that echoes one anywhere is redacted.
    pub fn register_secrets(&self) {
        let secrets = [
            self.nats.password.as_deref(),
            self.nats.token.as_deref(),
            self.nats.nkey_seed.as_deref(),
            Some(self.clickhouse.password.as_str()),
        ];
        for secret in secrets.into_iter().flatten() {
            redact::register_secret(secret);
        }
        for secret in redact::url_secrets(&self.nats.url, true)
            .into_iter()
            .chain(redact::url_secrets(&self.clickhouse.url, false))
        {
            redact::register_secret(secret);
        }
    }

    /// Reads `password_file` and `token_file` into the fields they stand for (validation made
    /// sure each is the only source of its secret). A trailing newline is not part of a secret.
    pub fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        fn read(field: &'static str, path: &Path) -> Result<String, ConfigError> {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                field,
                path: path.to_owned(),
                source,
            })?;
            Ok(text.trim_end_matches(['\n', '\r']).to_owned())
        }
        if let Some(path) = &self.nats.password_file {
            self.nats.password = Some(read("nats.password_file", path)?);
        }
        if let Some(path) = &self.nats.token_file {
            self.nats.token = Some(read("nats.token_file", path)?);
        }
        if let Some(path) = &self.clickhouse.password_file {
            self.clickhouse.password = read("clickhouse.password_file", path)?;
        }
        if let Some(path) = &self.nats.nkey_file {
            let seed = read("nats.nkey_file", path)?;
            let seed = seed.trim().to_owned();
            // Checked here, so a wrong file fails at start-up and not at every reconnect. The
            // message names the expected shape, never the content.
            if nkeys::KeyPair::from_seed(&seed).is_err() || !seed.starts_with("SU") {
                return Err(ConfigError::SecretFile {
                    field: "nats.nkey_file",
                    path: path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not an NKey user seed (one line of 58 characters starting with SU, as \
                         `nk -gen user` writes); name the seed file, not the public key",
                    ),
                });
            }
            self.nats.nkey_seed = Some(seed);
        }
        Ok(())
    }

    /// A copy with passwords and tokens replaced, for printing.
    pub fn redacted(&self) -> Config {
        const HIDDEN: &str = REDACTED;
        let mut c = self.clone();
        c.nats.url = redact(&c.nats.url).into_owned();
        c.clickhouse.url = redact(&c.clickhouse.url).into_owned();
        if c.nats.password.is_some() {
            c.nats.password = Some(HIDDEN.to_owned());
        }
        if c.nats.token.is_some() {
            c.nats.token = Some(HIDDEN.to_owned());
        }
        if c.nats.nkey_seed.is_some() {
            c.nats.nkey_seed = Some(HIDDEN.to_owned());
        }
        if !c.clickhouse.password.is_empty() {
            c.clickhouse.password = HIDDEN.to_owned();
        }
        c
    }
}
