//! The JetStream side of the relay: connecting, declaring streams and durable pull consumers,
//! pulling batches and acknowledging them.
//!
//! This is the only module of the relay that knows NATS. Its parts:
//!
//! - [`connect`] and [`jetstream`]: one client per relay, with the `[nats]` options (name,
//!   timeouts, authentication by password, token, `.creds` or NKey seed, TLS with a CA and a
//!   client certificate). The client reconnects on its own, forever, after a disconnect or
//!   a server restart; connection events are logged.
//! - [`ensure_streams`] and [`ensure_consumer`] (in `setup`): create what is missing, compare
//!   what exists, and report the differences as [`Drift`]. They never update, delete or recreate
//!   anything on the server: a durable consumer holds the position of every message not yet
//!   written, and recreating it (what the service the relay replaces did at every start, with
//!   deliver policy `last`) skips the backlog.
//! - [`Fetcher`] and [`Batch`] (in `fetch`): bounded pulls of one consumer, and the acks.
//!
//! # Acknowledgement contract
//!
//! A message is acknowledged only after the WAL fsync covering its record has returned
//! ([`Batch::ack`] is the only way to ack, and the caller asserts durability at the call site).
//! Nothing is ever negatively acknowledged: a message that is not acked (the relay crashed, the
//! disk was full, the fsync failed) is redelivered by JetStream after `ack_wait_ms`, and the
//! default `max_deliver = -1` means it is never dropped. A redelivered message that did reach the
//! WAL carries the same stream and sequence, which the ClickHouse rows keep, so it collapses.
//!
//! # Disconnects
//!
//! While the connection is down, [`Fetcher::fetch`] returns [`SourceError::Disconnected`] (or
//! [`SourceError::Fetch`]) promptly; the caller retries with backoff, and the client reconnects in
//! the background. A pull in flight when the connection drops ends at its deadline
//! (`fetch_expires_ms` plus a margin). Acks sent while disconnected may be lost; their messages
//! come back after `ack_wait_ms`, see above.
//!
//! The client also drops its connection when a delivery has a subject or headers it cannot parse
//! (not UTF-8). After any reconnect, the fetcher pulls through a raw protocol connection until the
//! deliveries in flight then are acknowledged, and such a delivery becomes a dead-letter record
//! (`rescue`); only then is it terminated.

mod fetch;
mod reply;
mod rescue;
mod setup;

pub use fetch::{AckSummary, Backlog, BacklogProbe, Batch, Fetcher, MessageRef, SELECTED_HEADERS};
pub use rescue::{
    rescue_unavailable, RescueError, DEAD_LETTER_HEADER, RAW_SUBJECT_HEADER, RESCUE_ACK_WAITS_MAX,
};
pub use setup::{
    check_consumer, check_streams, ensure_consumer, ensure_streams, ConsumerOutcome, Drift,
    SetupAction, StreamOutcome,
};

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};

use crate::config::NatsConfig;
use crate::redact::redact;

/// A boxed error from the NATS client; its own error types differ per call.
pub type NatsError = Box<dyn std::error::Error + Send + Sync>;

/// Why a JetStream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// `nats.url` holds an address the client cannot parse.
    #[error("invalid NATS server address {url:?}: {source}")]
    Address {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// `nats.creds_file` could not be read.
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The first connection attempt failed (later disconnects are retried by the client).
    /// `hint` says what to change when waiting cannot help (credentials or TLS refused).
    #[error("cannot connect to NATS at {url}: {source}{hint}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
        hint: &'static str,
    },
    /// A JetStream API request about a stream failed (timeout, JetStream disabled, ...).
    #[error("JetStream request about stream {stream} failed: {source}")]
    StreamRequest {
        stream: String,
        #[source]
        source: NatsError,
    },
    /// A consumer's stream does not exist.
    #[error("stream {stream} does not exist: declare it in a [[stream]] section or create it on the server")]
    StreamMissing { stream: String },
    /// The server refused to create a stream (e.g. its subjects overlap another stream's).
    #[error("cannot create stream {stream}: {source}")]
    CreateStream {
        stream: String,
        #[source]
        source: NatsError,
    },
    /// A JetStream API request about a consumer failed.
    #[error("JetStream request about consumer {durable} on stream {stream} failed: {source}")]
    ConsumerRequest {
        stream: String,
        durable: String,
        #[source]
        source: NatsError,
    },
    /// A fetcher was opened for a consumer that does not exist (call [`ensure_consumer`] first).
    #[error("consumer {durable} on stream {stream} does not exist")]
    ConsumerMissing { stream: String, durable: String },
    /// The server refused to create a consumer.
    #[error("cannot create consumer {durable} on stream {stream}: {source}")]
    CreateConsumer {
        stream: String,
        durable: String,
        #[source]
        source: NatsError,
    },
    /// The durable exists as a push consumer; the relay only pulls.
    #[error("consumer {durable} on stream {stream} is a push consumer; the relay needs a pull consumer: configure another durable name")]
    NotPull { stream: String, durable: String },
    /// The durable exists with an ack policy other than explicit or all. With `none` the server
    /// forgets messages on delivery, so a crash before the fsync would lose them.
    #[error("consumer {durable} on stream {stream} has ack policy {policy}; the relay needs explicit or all: configure another durable name")]
    UnsupportedAckPolicy {
        stream: String,
        durable: String,
        policy: String,
    },
    /// The connection is down; nothing was requested. Retry with backoff.
    #[error("NATS connection is {state}; no pull sent to consumer {durable}")]
    Disconnected { durable: String, state: String },
    /// A pull failed (connection lost, consumer deleted, leadership change). Retry with backoff.
    #[error("pull from consumer {durable} on stream {stream} failed: {source}")]
    Fetch {
        stream: String,
        durable: String,
        #[source]
        source: NatsError,
    },
    /// JetStream does not deliver a message larger than the pull's byte limit. [`Fetcher::fetch`]
    /// then fetches that message alone without a byte limit, so its callers see this only if
    /// that pull fails too.
    #[error("the next message of consumer {durable} on stream {stream} is larger than fetch_bytes_max ({fetch_bytes_max} bytes): raise fetch_bytes_max above the largest message")]
    MessageTooLarge {
        stream: String,
        durable: String,
        fetch_bytes_max: u64,
    },
    /// A delivered message carries no parsable JetStream reply subject.
    #[error("message on subject {subject} from consumer {durable} has no JetStream metadata (reply subject {reply:?})")]
    Metadata {
        durable: String,
        subject: String,
        reply: Option<String>,
    },
    /// Sending or flushing acks failed; the messages will be redelivered after ack_wait.
    #[error("acks for consumer {durable} on stream {stream} not sent: {source}")]
    Ack {
        stream: String,
        durable: String,
        #[source]
        source: NatsError,
    },
}

impl SourceError {
    /// True when the server refused the relay itself at connect: authentication failed, the
    /// user is not authorized, or the TLS set-up or handshake failed. No retry can fix it, an
    /// operator can (on the server, at any time), so the relay reports it as such and waits.
    pub fn is_refused(&self) -> bool {
        use async_nats::ConnectErrorKind as Kind;
        matches!(self, SourceError::Connect { source, .. }
            if matches!(source.kind(), Kind::Authentication | Kind::AuthorizationViolation | Kind::Tls))
    }
}

/// Connects to the NATS servers of `config`.
///
/// The first attempt must succeed (a wrong address fails fast at start-up); after that the client
/// reconnects by itself without limit, and logs connection events.
pub async fn connect(config: &NatsConfig) -> Result<async_nats::Client, SourceError> {
    let mut servers = Vec::new();
    for url in config.url.split(',').map(str::trim) {
        let addr = ServerAddr::from_str(url).map_err(|source| SourceError::Address {
            url: redact(url).into_owned(),
            source,
        })?;
        servers.push(addr);
    }

    let mut options = match &config.creds_file {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|source| SourceError::Credentials {
                path: path.clone(),
                source,
            })?,
        None => ConnectOptions::new(),
    };
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(seed) = &config.nkey_seed {
        options = options.nkey(seed.clone());
    }
    if config.tls_wanted() {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }

    let options = options
        .name(&config.name)
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        .request_timeout(Some(Duration::from_millis(config.request_timeout_ms)))
        // Unlimited: an edge relay must come back by itself after any NATS outage.
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                Event::Connected => tracing::info!("NATS connection (re)established"),
                Event::Disconnected => {
                    tracing::warn!("NATS connection lost; reconnecting in the background")
                }
                Event::LameDuckMode => {
                    tracing::warn!("NATS server entered lame duck mode; it will close soon")
                }
                Event::SlowConsumer(sid) => {
                    tracing::warn!(sid, "NATS subscription is a slow consumer; messages dropped by the client will be redelivered")
                }
                other => tracing::info!(event = %other, "NATS connection event"),
            }
        });

    options
        .connect(servers)
        .await
        .map_err(|source| SourceError::Connect {
            url: redact(&config.url).into_owned(),
            hint: connect_hint(&source),
            source,
        })
}

/// What the operator changes when a connection is refused for a reason no retry cures: the
/// credentials, or the TLS certificates. Empty for everything else (a server down, a timeout).
fn connect_hint(error: &async_nats::ConnectError) -> &'static str {
    use async_nats::ConnectErrorKind as Kind;
    const CREDENTIALS: &str = " (the server refused the credentials; retrying does not help: \
        check nats.user with nats.password_file, nats.token_file, nats.creds_file or \
        nats.nkey_file against the server's authorization)";
    const TLS: &str = " (TLS refused; retrying does not help: check nats.tls_ca_file against the \
        server's certificate, the client certificate nats.tls_cert_file/nats.tls_key_file, and \
        that the server speaks TLS)";
    match error.kind() {
        Kind::AuthorizationViolation | Kind::Authentication => CREDENTIALS,
        Kind::Tls => TLS,
        // rustls' refusals of a handshake arrive as I/O errors.
        Kind::Io if error.to_string().contains("certificate") => TLS,
        _ => "",
    }
}

impl SourceError {
    /// True when the error is a refusal no retry cures (credentials or TLS certificates): the
    /// configuration or the server must change.
    pub fn needs_configuration_change(&self) -> bool {
        matches!(self, SourceError::Connect { hint, .. } if !hint.is_empty())
    }
}

/// A JetStream context on `client` whose API requests time out after `request_timeout_ms`.
pub fn jetstream(
    client: async_nats::Client,
    config: &NatsConfig,
) -> async_nats::jetstream::Context {
    let mut context = async_nats::jetstream::new(client);
    context.set_timeout(Duration::from_millis(config.request_timeout_ms));
    context
}
