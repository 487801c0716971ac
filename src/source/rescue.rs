//! Rescue of deliveries the NATS client cannot read: pulls over a raw protocol connection after
//! the client lost its connection, so a poisoned message becomes a dead letter instead of a
//! reconnect loop.
//!
//! # Why
//!
//! nats-server does not validate subjects: a publisher may store `trade.\xff.spot.X` in a
//! captured stream. When JetStream delivers it, the client's protocol parser (async-nats 0.51,
//! `Connection::try_read_op`) rejects the `MSG`/`HMSG` line, or a header block, that is not UTF-8
//! (or a header line without a colon, a header name with a space, ...) with an I/O error, and
//! the client drops the whole connection and reconnects. The message is never acked, so JetStream
//! redelivers it after `ack_wait` to the next pull, the connection drops again, forever; and every
//! good message delivered in the same pull behind it is lost with the socket buffer and stays
//! pending with it.
//!
//! # How
//!
//! [`Rescue`] watches the client's connect count. After any reconnect of the client (a poisoned
//! delivery, a network failure or a server restart: they look alike from here) the fetcher
//! switches to *rescue pulls*: it notes the consumer's highest delivered stream sequence (the
//! *target*: every message that can have been in the lost pull is at or below it) and pulls from
//! the same durable consumer through [`RawPuller`], a small NATS protocol client on its own TCP
//! connection that reads subjects, headers and payloads as bytes. A delivery the client library
//! would accept becomes an ordinary message of the batch; one it would reject becomes a message
//! with a [`DeadLetterMark`]: its subject is the lossy UTF-8 form, and the WAL record carries the
//! reason ([`DEAD_LETTER_HEADER`]) and the raw subject bytes in hex ([`RAW_SUBJECT_HEADER`]), so
//! the drain writes it to dead letters and nothing of it is lost. The ack subjects JetStream
//! attaches are plain ASCII, so the main client acks (or, for a dead letter under the explicit
//! policy, terminates) every message of a rescue batch after the WAL fsync as usual: exactly once,
//! durably, before the consumer moves past it. Rescue pulls continue until the consumer's ack
//! floor has passed the target, i.e. every delivery that could have been stranded, the poisoned
//! ones included (they come back after `ack_wait`), went through a reader that cannot choke on
//! it; then the raw connection closes and the client pulls again.
//!
//! Reading the message through the stream's message API instead would not keep it whole: a
//! direct get answers with the subject in a `Nats-Subject` header, which the client rejects the
//! same way, and `$JS.API.STREAM.MSG.GET` answers in JSON, where the server's encoder replaces the
//! invalid bytes of the subject with U+FFFD. Nor could the consumer be moved past it from outside a
//! delivery: an ack subject names the delivery's consumer sequence and count, which only the
//! delivery carries.
//!
//! # Limits
//!
//! - The raw connection authenticates as the client does: user/password (also from the URL),
//!   token, an NKey seed (`nkey_file`) or a `.creds` file (JWT and seed), signing the server's
//!   nonce with the seed. It speaks TLS when the client does (a `tls://` URL, `tls_required`, a
//!   `tls_*_file`, or a server that requires it), upgrading after the server's INFO as the client
//!   does, with the same CA and client certificate. It does not speak WebSocket (`ws://`,
//!   `wss://`): there it fails with an error naming the reason, logged once per reconnect, and the
//!   consumer behaves as without the rescue (the poisoned message keeps being redelivered, and is
//!   not lost while the stream keeps it).
//! - The client is shared by every consumer, so a reconnect starts rescue pulls in each consumer
//!   with deliveries pending, each on its own raw connection. Without a poisoned message they last
//!   up to one `ack_wait` (the messages of the lost pull come back only then); the relay keeps
//!   ingesting meanwhile.
//! - Under the `all` ack policy a dead letter is settled by the batch's one ack (which waits until
//!   every pending delivery is in the WAL), not terminated on its own, so JetStream emits no
//!   termination advisory for it.
//! - Rescue ends at most [`RESCUE_ACK_WAITS_MAX`] ack waits after it began, even if the ack floor
//!   has not passed the target (another instance on the same durable may hold the messages); a
//!   poisoned message still pending then drops the client again and starts another rescue.
//! - Only the first server of `nats.url` that accepts a TCP connection is used; a rescue pull
//!   needs the same JetStream API the client uses, so any server of the cluster will do.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, HeaderName, HeaderValue, ServerAddr, StatusCode, Subject};
use bytes::Bytes;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    ReadHalf, WriteHalf,
};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::NatsConfig;
use crate::logcond::{Condition, Occurrence};

/// WAL record header whose presence routes the record to dead letters; its value is the reason.
pub use crate::drain::route::DEAD_LETTER_HEADER;

/// WAL record header with the raw subject bytes of a dead-lettered delivery, in lowercase hex
/// (the record's subject is the lossy UTF-8 form).
pub const RAW_SUBJECT_HEADER: &str = "Prism-Raw-Subject";

/// Longest protocol control line read from the server, in bytes: nats-server's own limit
/// (`max_control_line`) defaults to 4 KiB; this leaves room for a server configured higher and
/// bounds memory against a server that never sends a line end.
const CONTROL_LINE_MAX_BYTES: u64 = 64 * 1024;

/// Largest message accepted when the server's INFO does not say, in bytes: nats-server's hard
/// upper limit of `max_payload`.
const PAYLOAD_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Extra wait past the pull's `expires` for the server's end-of-pull status, in milliseconds:
/// covers network latency without hanging on a lost connection.
const PULL_DEADLINE_MARGIN_MS: u64 = 2_000;

/// Rescue pulls end at the latest after this many `ack_wait`s since they began: by then every
/// message of the lost pull has been redelivered at least once (after one `ack_wait`), so a target
/// still not reached means another consumer instance holds it.
pub const RESCUE_ACK_WAITS_MAX: u32 = 4;

/// The client name the raw connection announces, so it shows apart in the server's `/connz`.
const CLIENT_NAME_SUFFIX: &str = "-rescue";

/// Why a rescue pull failed.
#[derive(Debug, thiserror::Error)]
pub enum RescueError {
    /// The raw connection cannot honour how the client connects.
    #[error("cannot rescue deliveries the NATS client cannot read: {reason}")]
    Unsupported { reason: String },
    /// `nats.url` holds an address that cannot be parsed.
    #[error("invalid NATS server address {url:?}: {source}")]
    Address {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// No server of `nats.url` accepted a connection within `connect_timeout_ms`.
    #[error("raw NATS connection to {url} failed: {detail}")]
    Connect { url: String, detail: String },
    /// Reading or writing the raw connection failed.
    #[error("raw NATS connection I/O failed: {source}")]
    Io {
        #[source]
        source: std::io::Error,
    },
    /// The server sent something outside the protocol, or an error.
    #[error("raw NATS connection: {detail}")]
    Protocol { detail: String },
    /// The next message exceeds the pull's byte limit.
    #[error("the next message is larger than the pull's byte limit")]
    TooLarge,
    /// The TLS files cannot be used, or the server's certificate was refused.
    #[error("raw NATS connection TLS: {detail}")]
    Tls { detail: String },
    /// The NKey seed or `.creds` file cannot sign the server's nonce.
    #[error("raw NATS connection authentication: {detail}")]
    Auth { detail: String },
}

impl From<std::io::Error> for RescueError {
    fn from(source: std::io::Error) -> Self {
        RescueError::Io { source }
    }
}

/// Why a delivery could not be handed over as an ordinary message, and its raw subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetterMark {
    /// The reason, which names the raw subject bytes in hex too (it becomes the dead letter's
    /// `error`, the one column that keeps them).
    pub reason: String,
    /// The raw subject bytes, lowercase hex.
    pub raw_subject_hex: String,
}

/// One delivery read by the raw connection.
#[derive(Debug)]
pub(crate) struct RawDelivery {
    /// The message as the client would have built it (lossy subject for a dead letter).
    pub message: async_nats::Message,
    /// Present when the client library could not have read it.
    pub dead_letter: Option<DeadLetterMark>,
}

/// The rescue state of one fetcher.
pub(crate) struct Rescue {
    /// Connection settings; `None` disables the rescue (a fetcher built without them).
    nats: Option<NatsConfig>,
    /// The client's connect count when the last pull began.
    last_connects: Option<u64>,
    phase: Phase,
    /// Dead letters made of deliveries the client cannot read: events a publisher controls, so
    /// they are logged the first time and then summarised once per reminder interval.
    dead_letters: Condition,
}

enum Phase {
    /// Pull through the client.
    Idle,
    /// The client reconnected; the target is not known yet.
    Armed,
    /// Pulling through the raw connection until the ack floor passes `target`.
    Active {
        target: u64,
        until: Instant,
        puller: Option<RawPuller>,
    },
}

/// What the fetcher should do next.
pub(crate) enum Step {
    /// Pull through the client.
    Client,
    /// Learn the target from consumer info, then call [`Rescue::activate`].
    Arm,
    /// Pull through the raw connection; call [`Rescue::check_floor`] first.
    Raw { target: u64 },
}

/// Why rescue pulls cannot work with the connection `nats` configures, as a sentence for the
/// start-up log and `check` that also says what the operator does about it; `None` when they can
/// (as far as the configuration shows: a server that requires TLS behind a `nats://` URL is only
/// found out at a rescue's connect, and logged then).
pub fn rescue_unavailable(nats: &NatsConfig) -> Option<String> {
    let reason = {
        let url = nats.url.split(',').map(str::trim).find(|url| {
            let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
            matches!(scheme, "ws" | "wss")
        })?;
        format!(
            "the connection uses {}, which the rescue's raw connection (NATS over TCP or TLS) \
             does not speak",
            crate::redact::redact(url)
        )
    };
    Some(format!(
        "deliveries with a subject that is not UTF-8 (or a malformed header) cannot be rescued: \
         {reason}. Such a delivery drops the NATS client's connection at every redelivery and \
         stays pending (it is not lost while the stream keeps it). If the relay keeps \
         reconnecting to NATS with messages pending, find the first unacknowledged stream \
         sequence past the ack floor (nats consumer info <stream> <durable>) and remove it \
         (nats stream rmm <stream> <seq>), or connect the relay over nats:// or tls://"
    ))
}

impl Rescue {
    pub(crate) fn disabled() -> Rescue {
        Rescue {
            nats: None,
            last_connects: None,
            phase: Phase::Idle,
            dead_letters: Condition::default(),
        }
    }

    /// Logs a delivery the client cannot read that became a dead letter: the first one at once,
    /// then one line per reminder interval with the count so far, so a publisher of poisoned
    /// subjects cannot flood the log.
    pub(crate) fn log_dead_letter(&mut self, stream: &str, durable: &str, seq: u64, reason: &str) {
        match self.dead_letters.occurred() {
            Some(Occurrence::Started) => tracing::warn!(%stream, %durable, seq, %reason,
                "delivery the NATS client cannot read: dead-lettered (further ones are summarised periodically)"),
            Some(o) => {
                tracing::warn!(%stream, %durable, seq, %reason, dead_letters_so_far = o.count(),
                "deliveries the NATS client cannot read keep arriving: dead-lettered")
            }
            None => {}
        }
    }

    pub(crate) fn enable(&mut self, nats: &NatsConfig) {
        if let Some(limitation) = rescue_unavailable(nats) {
            tracing::warn!("{limitation}");
        }
        self.nats = Some(nats.clone());
    }

    /// Records the client's connect count before a pull; a change since the previous pull means
    /// the client lost its connection meanwhile, and arms the rescue.
    pub(crate) fn observe_connects(&mut self, connects: u64) {
        if self.nats.is_none() {
            return;
        }
        if let Some(last) = self.last_connects {
            if connects != last && matches!(self.phase, Phase::Idle) {
                self.phase = Phase::Armed;
            }
        }
        self.last_connects = Some(connects);
    }

    /// Arms the rescue directly (the client is disconnected right now).
    pub(crate) fn arm(&mut self) {
        if self.nats.is_some() && matches!(self.phase, Phase::Idle) {
            self.phase = Phase::Armed;
        }
    }

    pub(crate) fn step(&self) -> Step {
        match self.phase {
            Phase::Idle => Step::Client,
            Phase::Armed => Step::Arm,
            Phase::Active { target, .. } => Step::Raw { target },
        }
    }

    /// Starts rescue pulls up to the consumer's `delivered` stream sequence; with nothing
    /// pending there is nothing to rescue.
    pub(crate) fn activate(&mut self, delivered: u64, ack_pending: u64, ack_wait: Duration) {
        self.phase = if ack_pending == 0 {
            Phase::Idle
        } else {
            tracing::info!(
                target = delivered,
                ack_pending,
                "NATS client reconnected: pulling through a raw connection until every delivery that may have been in flight is acknowledged"
            );
            Phase::Active {
                target: delivered,
                until: Instant::now() + ack_wait * RESCUE_ACK_WAITS_MAX,
                puller: None,
            }
        };
    }

    /// Ends rescue pulls once the ack floor has passed the target, or their time is up. True
    /// when they continue.
    pub(crate) fn check_floor(&mut self, ack_floor: u64) -> bool {
        let Phase::Active { target, until, .. } = &self.phase else {
            return false;
        };
        if ack_floor >= *target {
            tracing::info!(
                target = *target,
                "every delivery in flight at the reconnect is acknowledged: pulling through the client again"
            );
        } else if Instant::now() >= *until {
            tracing::warn!(
                target = *target,
                ack_floor,
                "rescue pulls ended before the ack floor reached the target (another instance may hold those messages)"
            );
        } else {
            return true;
        }
        self.phase = Phase::Idle;
        false
    }

    /// Gives up on the rescue until the next reconnect (the raw connection cannot be made the way
    /// the client connects).
    pub(crate) fn abandon(&mut self) {
        self.phase = Phase::Idle;
    }

    /// One pull through the raw connection, opening it first if needed. On an error the
    /// connection is dropped (the next pull opens a new one).
    pub(crate) async fn pull(
        &mut self,
        request: &PullRequest<'_>,
    ) -> Result<Vec<RawDelivery>, RescueError> {
        let Some(nats) = &self.nats else {
            return Err(RescueError::Unsupported {
                reason: "no connection settings".to_owned(),
            });
        };
        let Phase::Active { puller, .. } = &mut self.phase else {
            return Ok(Vec::new());
        };
        if puller.is_none() {
            *puller = Some(RawPuller::connect(nats).await?);
        }
        let Some(raw) = puller.as_mut() else {
            return Ok(Vec::new());
        };
        // Writes are bounded too: a frozen server with full socket buffers must not hang the
        // fetcher (reads are bounded by the pull's own deadline inside).
        let bound = request.expires + Duration::from_millis(2 * PULL_DEADLINE_MARGIN_MS);
        let result = match tokio::time::timeout(bound, raw.pull(request)).await {
            Ok(result) => result,
            Err(_) => Err(protocol(format!("pull not answered within {bound:?}"))),
        };
        if result.is_err() {
            *puller = None;
        }
        result
    }
}

/// The consumer counters a rescue decides on, from consumer info.
pub(crate) struct ConsumerPosition {
    /// Highest stream sequence delivered.
    pub delivered: u64,
    /// Every stream sequence up to this one is acknowledged.
    pub ack_floor: u64,
    /// Deliveries not acknowledged yet.
    pub ack_pending: u64,
    /// The consumer's ack wait.
    pub ack_wait: Duration,
}

/// One pull of a rescue.
pub(crate) struct PullRequest<'a> {
    pub stream: &'a str,
    pub durable: &'a str,
    pub batch: usize,
    pub max_bytes: u64,
    pub expires: Duration,
}

/// The raw connection: TCP, or TLS over TCP.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// A minimal NATS protocol client on its own TCP (or TLS) connection: subscribes to one inbox
/// prefix and sends pull requests, each with its own reply subject under it, reading every
/// delivery as bytes. A delivery for an earlier pull (one that ended at its deadline) is as good
/// as any and is kept; an end-of-pull status for an earlier pull is ignored.
pub(crate) struct RawPuller {
    reader: BufReader<ReadHalf<Box<dyn Conn>>>,
    writer: WriteHalf<Box<dyn Conn>>,
    inbox: String,
    /// Pulls sent on this connection; the current one's reply subject is `<inbox>.<pulls>`.
    pulls: u64,
    max_payload: usize,
}

impl RawPuller {
    /// Connects to the first server of `nats.url` that answers, with the client's authentication.
    pub(crate) async fn connect(nats: &NatsConfig) -> Result<RawPuller, RescueError> {
        let timeout = Duration::from_millis(nats.connect_timeout_ms);
        let mut failures = Vec::new();
        for url in nats.url.split(',').map(str::trim) {
            let shown = crate::redact::redact(url).into_owned();
            let addr = ServerAddr::from_str(url).map_err(|source| RescueError::Address {
                url: shown.clone(),
                source,
            })?;
            if addr.is_websocket() {
                return Err(RescueError::Unsupported {
                    reason: format!(
                        "{shown} uses WebSocket, which the raw connection does not speak"
                    ),
                });
            }
            match tokio::time::timeout(timeout, TcpStream::connect((addr.host(), addr.port())))
                .await
            {
                Ok(Ok(socket)) => {
                    let handshake = Self::handshake(socket, nats, &addr);
                    return match tokio::time::timeout(timeout, handshake).await {
                        Ok(result) => result,
                        Err(_) => Err(RescueError::Connect {
                            url: shown,
                            detail: format!("no handshake within {timeout:?}"),
                        }),
                    };
                }
                Ok(Err(error)) => failures.push(format!("{shown}: {error}")),
                Err(_) => failures.push(format!("{shown}: no connection within {timeout:?}")),
            }
        }
        Err(RescueError::Connect {
            url: crate::redact::redact(&nats.url).into_owned(),
            detail: failures.join("; "),
        })
    }

    async fn handshake(
        socket: TcpStream,
        nats: &NatsConfig,
        addr: &ServerAddr,
    ) -> Result<RawPuller, RescueError> {
        // The INFO line comes in the clear, before any TLS upgrade.
        let mut plain = BufReader::new(socket);
        let line = read_line_from(&mut plain).await?;
        let info = line
            .strip_prefix(b"INFO ")
            .ok_or_else(|| protocol(format!("expected INFO, got {}", lossy(&line))))?;
        let info: serde_json::Value = serde_json::from_slice(info)
            .map_err(|error| protocol(format!("INFO is not JSON: {error}")))?;
        let tls = nats.tls_wanted()
            || addr.tls_required()
            || info["tls_required"].as_bool() == Some(true);
        let conn: Box<dyn Conn> = if tls {
            if !plain.buffer().is_empty() {
                return Err(protocol(
                    "the server sent more than INFO before the TLS handshake".to_owned(),
                ));
            }
            Box::new(upgrade(plain.into_inner(), nats, addr).await?)
        } else {
            Box::new(plain.into_inner())
        };
        let (read, writer) = tokio::io::split(conn);
        let mut puller = RawPuller {
            reader: BufReader::new(read),
            writer,
            inbox: format!("_INBOX.{}", unique_token()),
            pulls: 0,
            max_payload: PAYLOAD_MAX_BYTES,
        };
        if let Some(max) = info["max_payload"].as_u64() {
            puller.max_payload = usize::try_from(max)
                .unwrap_or(PAYLOAD_MAX_BYTES)
                .min(PAYLOAD_MAX_BYTES);
        }

        let mut connect = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "headers": true,
            "no_responders": true,
            "protocol": 1,
            "lang": "rust",
            "version": env!("CARGO_PKG_VERSION"),
            "name": format!("{}{CLIENT_NAME_SUFFIX}", nats.name),
            "tls_required": tls,
        });
        // As the client: configured credentials, else those of the URL, where a user name
        // without a password is a token.
        let user = nats.user.as_deref().or(addr.username());
        let password = nats.password.as_deref().or(addr.password());
        match (user, password) {
            (Some(user), Some(password)) => {
                connect["user"] = user.into();
                connect["pass"] = password.into();
            }
            (Some(token), None) if nats.token.is_none() => {
                connect["auth_token"] = token.into();
            }
            _ => {}
        }
        if let Some(token) = &nats.token {
            connect["auth_token"] = token.as_str().into();
        }
        let nonce = info["nonce"].as_str().unwrap_or_default();
        if let Some(seed) = &nats.nkey_seed {
            let (public, signature) = sign_nonce(seed, nonce)?;
            connect["nkey"] = public.into();
            connect["sig"] = signature.into();
        }
        if let Some(path) = &nats.creds_file {
            let creds =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|error| RescueError::Auth {
                        detail: format!("cannot read nats.creds_file {}: {error}", path.display()),
                    })?;
            let (jwt, seed) = parse_creds(&creds).ok_or_else(|| RescueError::Auth {
                detail: format!(
                    "nats.creds_file {} holds no user JWT and seed blocks",
                    path.display()
                ),
            })?;
            let (_, signature) = sign_nonce(seed, nonce)?;
            connect["jwt"] = jwt.into();
            connect["sig"] = signature.into();
        }
        let command = format!("CONNECT {connect}\r\nPING\r\nSUB {}.* 1\r\n", puller.inbox);
        puller.writer.write_all(command.as_bytes()).await?;
        puller.writer.flush().await?;
        loop {
            let line = puller.read_line().await?;
            if line == b"PONG" {
                return Ok(puller);
            }
            if line.starts_with(b"-ERR") {
                return Err(protocol(format!(
                    "server refused the connection: {}",
                    lossy(&line)
                )));
            }
            if line == b"PING" {
                puller.writer.write_all(b"PONG\r\n").await?;
                puller.writer.flush().await?;
            }
            // INFO updates and +OK are of no interest.
        }
    }

    /// Sends one pull request and reads its deliveries until the batch is full, the server ends
    /// the pull, or its deadline passes.
    async fn pull(&mut self, request: &PullRequest<'_>) -> Result<Vec<RawDelivery>, RescueError> {
        let body = serde_json::json!({
            "batch": request.batch,
            "max_bytes": request.max_bytes,
            "expires": u64::try_from(request.expires.as_nanos()).unwrap_or(u64::MAX),
        })
        .to_string();
        self.pulls += 1;
        let reply = format!("{}.{}", self.inbox, self.pulls);
        let command = format!(
            "PUB $JS.API.CONSUMER.MSG.NEXT.{}.{} {reply} {}\r\n{body}\r\n",
            request.stream,
            request.durable,
            body.len()
        );
        self.writer.write_all(command.as_bytes()).await?;

        let deadline =
            Instant::now() + request.expires + Duration::from_millis(PULL_DEADLINE_MARGIN_MS);
        let mut deliveries = Vec::new();
        while deliveries.len() < request.batch {
            let frame = match tokio::time::timeout_at(deadline, self.read_frame()).await {
                Ok(frame) => frame?,
                // The server's end-of-pull notice did not come; what arrived is kept.
                Err(_) => break,
            };
            match frame {
                Frame::Delivery(delivery) => deliveries.push(*delivery),
                // The end of an earlier pull, which ended at its deadline.
                Frame::Status { subject, .. } if subject != reply => {}
                Frame::Status {
                    code, description, ..
                } => match code {
                    // Idle heartbeat: the pull goes on.
                    100 => {}
                    // No messages, request timeout, batch completed: the pull is over.
                    404 | 408 => break,
                    409 if description.contains("Batch Completed") => break,
                    409 if description.contains("Message Size Exceeds MaxBytes") => {
                        if deliveries.is_empty() {
                            return Err(RescueError::TooLarge);
                        }
                        break;
                    }
                    // Other terminal statuses (consumer deleted, leadership change, ...).
                    _ => {
                        if deliveries.is_empty() {
                            return Err(protocol(format!(
                                "pull ended with status {code} {description}"
                            )));
                        }
                        break;
                    }
                },
                Frame::Other => {}
            }
        }
        Ok(deliveries)
    }

    /// Reads one protocol frame, answering PINGs.
    async fn read_frame(&mut self) -> Result<Frame, RescueError> {
        loop {
            let line = self.read_line().await?;
            if let Some(args) = line.strip_prefix(b"MSG ") {
                let args: Vec<&[u8]> = split_args(args);
                let (subject, reply, total) = match args.as_slice() {
                    [subject, _sid, reply, total] => (*subject, Some(*reply), *total),
                    [subject, _sid, total] => (*subject, None, *total),
                    _ => return Err(protocol(format!("bad MSG line {}", lossy(&line)))),
                };
                let total = self.length(total)?;
                let body = self.read_body(total).await?;
                return Ok(deliver(subject, reply, None, body));
            }
            if let Some(args) = line.strip_prefix(b"HMSG ") {
                let args: Vec<&[u8]> = split_args(args);
                let (subject, reply, header_len, total) = match args.as_slice() {
                    [subject, _sid, reply, header, total] => {
                        (*subject, Some(*reply), *header, *total)
                    }
                    [subject, _sid, header, total] => (*subject, None, *header, *total),
                    _ => return Err(protocol(format!("bad HMSG line {}", lossy(&line)))),
                };
                let header_len = self.length(header_len)?;
                let total = self.length(total)?;
                if header_len > total {
                    return Err(protocol(format!(
                        "header longer than message in {}",
                        lossy(&line)
                    )));
                }
                let mut body = self.read_body(total).await?;
                let payload = body.split_off(header_len);
                return Ok(deliver(subject, reply, Some(body), payload));
            }
            if line == b"PING" {
                self.writer.write_all(b"PONG\r\n").await?;
                continue;
            }
            if line.starts_with(b"-ERR") {
                return Err(protocol(format!("server error: {}", lossy(&line))));
            }
            return Ok(Frame::Other);
        }
    }

    fn length(&self, text: &[u8]) -> Result<usize, RescueError> {
        let n: usize = std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| protocol(format!("bad length {}", lossy(text))))?;
        if n > self.max_payload {
            return Err(protocol(format!(
                "message of {n} bytes exceeds the server's max_payload {}",
                self.max_payload
            )));
        }
        Ok(n)
    }

    /// Reads `len` bytes and the CRLF after them.
    async fn read_body(&mut self, len: usize) -> Result<Bytes, RescueError> {
        let mut body = vec![0; len + 2];
        self.reader.read_exact(&mut body).await?;
        if !body.ends_with(b"\r\n") {
            return Err(protocol("message body not followed by CRLF".to_owned()));
        }
        body.truncate(len);
        Ok(Bytes::from(body))
    }

    /// Reads one line without its CRLF, bounded by [`CONTROL_LINE_MAX_BYTES`].
    async fn read_line(&mut self) -> Result<Vec<u8>, RescueError> {
        read_line_from(&mut self.reader).await
    }
}

/// Reads one line without its CRLF, bounded by [`CONTROL_LINE_MAX_BYTES`].
async fn read_line_from<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, RescueError> {
    let mut line = Vec::new();
    let read = reader
        .take(CONTROL_LINE_MAX_BYTES)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Err(RescueError::Io {
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    if !line.ends_with(b"\n") {
        return Err(protocol(format!(
            "control line longer than {CONTROL_LINE_MAX_BYTES} bytes"
        )));
    }
    line.pop();
    if line.ends_with(b"\r") {
        line.pop();
    }
    Ok(line)
}

/// Upgrades the connection to TLS as the client does after INFO: the CA and client certificate
/// of `[nats]`, the server's host name from its URL.
async fn upgrade(
    socket: TcpStream,
    nats: &NatsConfig,
    addr: &ServerAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, RescueError> {
    let config = crate::tls::client_config(&crate::tls::TlsFiles {
        ca_file: nats.tls_ca_file.clone(),
        cert_file: nats.tls_cert_file.clone(),
        key_file: nats.tls_key_file.clone(),
    })
    .map_err(|error| RescueError::Tls {
        detail: format!("nats.{error}"),
    })?;
    let name =
        rustls::pki_types::ServerName::try_from(addr.host().to_owned()).map_err(|error| {
            RescueError::Tls {
                detail: format!("{} is not a TLS server name: {error}", addr.host()),
            }
        })?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, socket)
        .await
        .map_err(|error| RescueError::Tls {
            detail: format!("handshake with {} failed: {error}", addr.host()),
        })
}

/// The public key of `seed` and its signature of `nonce`, base64url without padding, as the
/// server's CONNECT expects them.
fn sign_nonce(seed: &str, nonce: &str) -> Result<(String, String), RescueError> {
    let pair = nkeys::KeyPair::from_seed(seed.trim()).map_err(|error| RescueError::Auth {
        detail: format!("the NKey seed is not valid: {error}"),
    })?;
    let signature = pair
        .sign(nonce.as_bytes())
        .map_err(|error| RescueError::Auth {
            detail: format!("cannot sign the server's nonce: {error}"),
        })?;
    Ok((pair.public_key(), base64url(&signature)))
}

/// The user JWT and the seed of a `.creds` file (each the first line after its BEGIN marker).
fn parse_creds(text: &str) -> Option<(&str, &str)> {
    let after = |marker: &str| {
        let mut lines = text.lines().map(str::trim);
        lines.find(|line| line.contains(marker))?;
        lines.find(|line| !line.is_empty())
    };
    Some((
        after("BEGIN NATS USER JWT")?,
        after("BEGIN USER NKEY SEED")?,
    ))
}

/// Base64url without padding (RFC 4648 section 5), the encoding of CONNECT's `sig`.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
        }
    }
    out
}

/// One protocol frame of interest.
enum Frame {
    Delivery(Box<RawDelivery>),
    Status {
        /// The reply subject of the pull it is about.
        subject: String,
        code: u16,
        description: String,
    },
    Other,
}

/// Builds the frame of one `MSG`/`HMSG`: a status, a delivery the client could have read, or a
/// delivery marked for dead letters with the reason the client would have failed.
fn deliver(subject: &[u8], reply: Option<&[u8]>, header: Option<Bytes>, payload: Bytes) -> Frame {
    let raw_subject_hex = hex(subject);
    let mark = |what: &str| {
        Some(DeadLetterMark {
            reason: format!("{what}; raw subject bytes (hex): {raw_subject_hex}"),
            raw_subject_hex: raw_subject_hex.clone(),
        })
    };
    let lossy_subject = String::from_utf8_lossy(subject).into_owned();
    let mut dead_letter = match std::str::from_utf8(subject) {
        Ok(_) => None,
        Err(_) => mark("subject is not valid UTF-8"),
    };
    let mut headers = None;
    let mut status = None;
    let mut description = None;
    if let Some(header) = header {
        match parse_headers(&header) {
            Ok(parsed) => {
                headers = Some(parsed.headers);
                status = parsed.status;
                description = parsed.description;
            }
            Err(what) => {
                if dead_letter.is_none() {
                    dead_letter = mark(&what);
                }
            }
        }
    }
    // A status message (no reply subject, a status code) ends or paces the pull.
    if let (Some(code), None) = (status, reply) {
        return Frame::Status {
            subject: lossy_subject,
            code: code.as_u16(),
            description: description.unwrap_or_default(),
        };
    }
    let reply = reply.map(|r| Subject::from(String::from_utf8_lossy(r).into_owned()));
    let length = payload.len() + lossy_subject.len() + reply.as_ref().map_or(0, |r| r.len());
    Frame::Delivery(Box::new(RawDelivery {
        message: async_nats::Message {
            subject: Subject::from(lossy_subject),
            reply,
            payload,
            headers,
            status,
            description,
            length,
        },
        dead_letter,
    }))
}

/// Headers of a delivery, parsed as the client library does.
struct ParsedHeaders {
    headers: HeaderMap,
    status: Option<StatusCode>,
    description: Option<String>,
}

/// Parses a header block exactly as async-nats 0.51 does (`Connection::try_read_op`), so what it
/// would reject is found here and dead-lettered; the error names what is wrong.
fn parse_headers(header: &[u8]) -> Result<ParsedHeaders, String> {
    let text = std::str::from_utf8(header).map_err(|_| "headers are not valid UTF-8".to_owned())?;
    let mut lines = text.lines().peekable();
    let version = lines.next().ok_or("no header version line")?;
    let suffix = version
        .strip_prefix("NATS/1.0")
        .map(str::trim)
        .ok_or("header version line does not begin with NATS/1.0")?;
    let (status, description) = suffix
        .split_once(' ')
        .map(|(s, d)| (s.trim(), d.trim()))
        .unwrap_or((suffix, ""));
    let status = if status.is_empty() {
        None
    } else {
        Some(
            status
                .parse::<StatusCode>()
                .map_err(|_| format!("header status {status:?} is not a status code"))?,
        )
    };
    let description = (!description.is_empty()).then(|| description.to_owned());
    let mut headers = HeaderMap::new();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line {line:?} has no colon"))?;
        let name =
            HeaderName::from_str(name).map_err(|_| format!("header name {name:?} is not valid"))?;
        let mut value = value.trim_start().to_owned();
        while let Some(more) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            value.push_str(more);
        }
        value.truncate(value.trim_end().len());
        let value: HeaderValue = value.as_str().into();
        headers.append(name, value);
    }
    Ok(ParsedHeaders {
        headers,
        status,
        description,
    })
}

/// Splits protocol arguments on spaces and tabs, as the server separates them.
fn split_args(args: &[u8]) -> Vec<&[u8]> {
    args.split(|b| *b == b' ' || *b == b'\t')
        .filter(|a| !a.is_empty())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn protocol(detail: String) -> RescueError {
    RescueError::Protocol { detail }
}

/// A token for the inbox, unique enough among this relay's raw connections (its only
/// subscriber): the process id and the time.
fn unique_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("prism-rescue-{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(frame: Frame) -> RawDelivery {
        match frame {
            Frame::Delivery(d) => *d,
            _ => panic!("expected a delivery"),
        }
    }

    #[test]
    fn a_subject_that_is_not_utf8_is_marked_with_its_raw_bytes_and_a_lossy_subject() {
        let d = delivery(deliver(
            b"trade.\xff.spot.X",
            Some(b"$JS.ACK.S.c.1.2.3.4.0"),
            None,
            Bytes::from_static(b"{}"),
        ));
        let mark = d.dead_letter.expect("marked");
        assert_eq!(mark.raw_subject_hex, "74726164652eff2e73706f742e58");
        assert!(
            mark.reason.contains("74726164652eff2e73706f742e58"),
            "{}",
            mark.reason
        );
        assert_eq!(d.message.subject.as_str(), "trade.\u{fffd}.spot.X");
        assert_eq!(d.message.payload.as_ref(), b"{}");
        assert_eq!(d.message.reply.as_deref(), Some("$JS.ACK.S.c.1.2.3.4.0"));
    }

    #[test]
    fn headers_the_client_would_reject_mark_the_delivery_and_good_ones_are_kept() {
        for (header, what) in [
            (&b"NATS/1.0\r\nA: \xff\r\n\r\n"[..], "not valid UTF-8"),
            (b"NATS/1.0\r\nno colon\r\n\r\n", "no colon"),
            (b"NATS/1.0\r\nbad name: v\r\n\r\n", "not valid"),
            (b"HTTP/1.1\r\n\r\n", "NATS/1.0"),
        ] {
            let d = delivery(deliver(
                b"trade.a.spot.X",
                Some(b"$JS.ACK.S.c.1.2.3.4.0"),
                Some(Bytes::copy_from_slice(header)),
                Bytes::new(),
            ));
            let reason = d.dead_letter.map(|m| m.reason).unwrap_or_default();
            assert!(reason.contains(what), "{header:?}: {reason:?}");
        }
        let d = delivery(deliver(
            b"trade.a.spot.X",
            Some(b"$JS.ACK.S.c.1.2.3.4.0"),
            Some(Bytes::from_static(b"NATS/1.0\r\nNats-Msg-Id: m-1\r\n\r\n")),
            Bytes::new(),
        ));
        assert_eq!(d.dead_letter, None);
        let headers = d.message.headers.expect("headers");
        assert_eq!(headers.get("Nats-Msg-Id").map(|v| v.as_str()), Some("m-1"));
    }

    #[test]
    fn a_status_without_reply_subject_is_a_status_frame() {
        let frame = deliver(
            b"_INBOX.x",
            None,
            Some(Bytes::from_static(b"NATS/1.0 408 Request Timeout\r\n\r\n")),
            Bytes::new(),
        );
        match frame {
            Frame::Status {
                code, description, ..
            } => {
                assert_eq!((code, description.as_str()), (408, "Request Timeout"))
            }
            _ => panic!("expected a status"),
        }
    }

    #[test]
    fn a_flood_of_unreadable_deliveries_logs_one_line_not_one_per_dead_letter() {
        const FLOOD: u64 = 200;
        let mut rescue = Rescue::disabled();
        // A reminder interval longer than any test run: only the first line is due.
        rescue.dead_letters = Condition::new(Duration::from_secs(3_600));
        let logs = crate::logcond::captured_logs(|| {
            for seq in 1..=FLOOD {
                rescue.log_dead_letter("S", "d", seq, "subject is not UTF-8");
            }
        });
        let lines = logs.lines().filter(|l| l.contains("dead-lettered")).count();
        assert_eq!(lines, 1, "{logs}");
    }

    #[test]
    fn websocket_connections_are_named_as_unable_to_rescue_and_tls_and_creds_are_not() {
        let nats = |url: &str, creds: Option<&str>| NatsConfig {
            url: url.to_owned(),
            creds_file: creds.map(Into::into),
            ..NatsConfig::default()
        };
        for (config, names) in [
            (
                nats("ws://alice:pw@h:4222", None),
                "ws://alice:<redacted>@h:4222",
            ),
            (nats("nats://a:4222, wss://b:443", None), "wss://b:443"),
        ] {
            let text = rescue_unavailable(&config).expect("the rescue cannot work");
            assert!(text.contains(names), "{text}");
            assert!(!text.contains(":pw@"), "{text}");
            assert!(
                text.contains("not UTF-8") && text.contains("nats stream rmm"),
                "{text}"
            );
        }
        for config in [
            nats("nats://a:4222,127.0.0.1:4223", None),
            nats("tls://a:4222", None),
            nats("nats://h:4222", Some("/etc/relay.creds")),
        ] {
            assert_eq!(rescue_unavailable(&config), None, "{config:?}");
        }
    }

    #[test]
    fn base64url_matches_rfc_4648_vectors_without_padding() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url(plain.as_bytes()), encoded);
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn a_creds_file_yields_its_jwt_and_seed() {
        let creds =
            "-----BEGIN NATS USER JWT-----\neyJhbGc.payload.sig\n------END NATS USER JWT------\n\n\
                     ************************* IMPORTANT *************************\n\n\
                     -----BEGIN USER NKEY SEED-----\nSUAEXAMPLE\n------END USER NKEY SEED------\n";
        assert_eq!(
            parse_creds(creds),
            Some(("eyJhbGc.payload.sig", "SUAEXAMPLE"))
        );
        assert_eq!(parse_creds("SUAEXAMPLE\n"), None);
    }

    #[test]
    fn enabling_the_rescue_on_a_websocket_connection_logs_one_warning() {
        let config = NatsConfig {
            url: "wss://127.0.0.1:4222".to_owned(),
            ..NatsConfig::default()
        };
        let mut rescue = Rescue::disabled();
        let logs = crate::logcond::captured_logs(|| rescue.enable(&config));
        let warns: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warns.len(), 1, "{logs}");
        assert!(warns[0].contains("cannot be rescued"), "{logs}");
        let plain = NatsConfig::default();
        let logs = crate::logcond::captured_logs(|| Rescue::disabled().enable(&plain));
        assert!(!logs.contains("WARN"), "{logs}");
    }
}
