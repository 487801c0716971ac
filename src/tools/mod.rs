//! Operator tools: `loadgen` (publishes realistic MarketPrism traffic into JetStream) and
//! `verify` (compares what a JetStream range holds with what ClickHouse stored).
//!
//! These tools are clients of NATS and ClickHouse that stand outside the relay pipeline,
//! so, unlike the relay's own modules (where only `source`/`ingest` know NATS and only `sink`
//! knows ClickHouse), they talk to `async-nats` and the `clickhouse` crate directly.
//! They share nothing with the pipeline but the MarketPrism conventions spelled out here:
//! subjects `{data_type}.{exchange}.{market_type}.{symbol}`, the eight data types, and the
//! table each data type lands in.
//!
//! The binary wires them as the `loadgen` and `verify` subcommands: each has a
//! `clap::Args` option struct and an `async fn run`.

pub mod gen;
pub mod loadgen;
pub mod prng;
pub mod rate;
pub mod verify;

use std::fmt;
use std::str::FromStr;

use async_nats::{ConnectOptions, ServerAddr};

use crate::config::NatsConfig;
use crate::redact::{self, redact};

/// Errors of the operator tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The options do not make sense together.
    #[error("invalid options: {0}")]
    Options(String),
    /// Connecting to the NATS server failed.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// A JetStream API call (stream info, create stream, consumer) failed.
    #[error("JetStream {op} failed: {message}")]
    JetStream { op: &'static str, message: String },
    /// A ClickHouse query failed.
    #[error("ClickHouse query on {table} failed: {source}")]
    ClickHouse {
        table: String,
        #[source]
        source: clickhouse::error::Error,
    },
    /// A table that must be checked does not exist in the database.
    #[error(
        "table {database}.{table} does not exist, but {published} published messages route to it"
    )]
    MissingTable {
        database: String,
        table: String,
        published: u64,
    },
    /// The stream named in the options does not exist.
    #[error("stream {0} does not exist")]
    StreamNotFound(String),
    /// A URL flag carries credentials, which any user of the host sees in `ps`.
    #[error("{flag} holds credentials, which show in `ps`: remove them from the URL and pass --config relay.toml, whose secrets come from password_file/token_file or PRISM_RELAY_{section}_PASSWORD, _TOKEN or _URL")]
    SecretInFlag {
        flag: &'static str,
        section: &'static str,
    },
}

impl ToolError {
    pub(crate) fn js(op: &'static str, err: impl fmt::Display) -> Self {
        ToolError::JetStream {
            op,
            message: err.to_string(),
        }
    }
}

/// The eight MarketPrism data types, shared with the relay's codec so the tools route subjects
/// exactly as the relay does.
pub use crate::codec::DataType;

/// Refuses the URL of command-line flag `flag` when it carries credentials (a password, or for
/// NATS a token as the whole user info): a command line is visible to every user of the host.
/// `section` is the configuration section whose variables take the secret instead (`NATS`,
/// `CLICKHOUSE`).
pub fn refuse_secret_in_flag(
    flag: &'static str,
    section: &'static str,
    url: &str,
) -> Result<(), ToolError> {
    let bare_user_is_secret = section == "NATS";
    if redact::url_secrets(url, bare_user_is_secret).is_empty() {
        Ok(())
    } else {
        Err(ToolError::SecretInFlag { flag, section })
    }
}

/// Connects to NATS (`url` may list several servers, comma separated) with a name that shows up
/// in the server's connection list, authenticating as `auth` says when given (the relay's
/// `[nats]` section: user and password, token, credentials or NKey seed file, TLS files; never a flag, which would
/// show the secret in `ps`). Errors show the URL redacted.
pub(crate) async fn connect_nats(
    url: &str,
    auth: Option<&NatsConfig>,
    name: &str,
) -> Result<async_nats::Client, ToolError> {
    let shown = || redact(url).into_owned();
    let mut servers = Vec::new();
    for server in url.split(',').map(str::trim) {
        let addr = ServerAddr::from_str(server).map_err(|error| {
            ToolError::Options(format!(
                "invalid NATS server address {}: {error}",
                redact(server)
            ))
        })?;
        servers.push(addr);
    }
    let mut options = match auth.and_then(|a| a.creds_file.as_ref()) {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|error| {
                ToolError::Options(format!(
                    "cannot read NATS credentials file {}: {error}",
                    path.display()
                ))
            })?,
        None => ConnectOptions::new(),
    };
    if let Some(auth) = auth {
        if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &auth.token {
            options = options.token(token.clone());
        }
        // NKey and TLS as the relay connects (source::connect).
        if let Some(seed) = &auth.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if auth.tls_wanted() {
            options = options.require_tls(true);
        }
        if let Some(ca) = &auth.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&auth.tls_cert_file, &auth.tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    options
        .name(name)
        .connect(servers)
        .await
        .map_err(|source| ToolError::Connect {
            url: shown(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_flag_with_credentials_is_refused_naming_the_flag_and_the_fix_but_not_the_secret() {
        const SECRET: &str = "Zq7MarkerSecretXy";
        for (flag, section, url) in [
            (
                "--nats-url",
                "NATS",
                format!("nats://alice:{SECRET}@h:4222"),
            ),
            (
                "--nats-url",
                "NATS",
                format!("nats://h1:4222,nats://{SECRET}@h2:4222"),
            ),
            (
                "--clickhouse-url",
                "CLICKHOUSE",
                format!("http://default:{SECRET}@ch:8123"),
            ),
        ] {
            let err = refuse_secret_in_flag(flag, section, &url).expect_err(flag);
            let text = err.to_string();
            assert!(!text.contains(SECRET), "{text}");
            assert!(text.contains(flag) && text.contains("--config"), "{text}");
            assert!(
                text.contains(&format!("PRISM_RELAY_{section}_PASSWORD")),
                "{text}"
            );
        }
        refuse_secret_in_flag("--nats-url", "NATS", "nats://127.0.0.1:4222").expect("no secret");
        refuse_secret_in_flag("--clickhouse-url", "CLICKHOUSE", "http://default@ch:8123")
            .expect("a user name is no secret");
    }

    #[test]
    fn data_type_names_round_trip_and_route_subjects_by_first_token() {
        for dt in DataType::ALL {
            assert_eq!(dt.name().parse::<DataType>(), Ok(dt));
            assert_eq!(DataType::ALL[dt.index()], dt);
            let subject = format!("{}.binance.spot.BTC-USDT", dt.name());
            assert_eq!(DataType::from_subject(&subject), Some(dt));
        }
        assert_eq!(DataType::from_subject("ticker.binance.spot.BTC-USDT"), None);
        assert_eq!(DataType::from_subject("trades.binance.spot.BTC-USDT"), None);
        assert_eq!(DataType::from_subject("trade"), Some(DataType::Trade));
    }
}
