//! Bounded pulls from one durable consumer, and their acknowledgement.
//!
//! A [`Fetcher`] sends one pull request per [`Fetcher::fetch`] call for at most `fetch_batch`
//! messages and `fetch_bytes_max` bytes, waiting at most `fetch_expires_ms` for them, so an idle
//! stream yields an empty [`Batch`] promptly and the relay's memory per consumer is bounded.
//!
//! A pull returns as soon as the server has messages, so a consumer that has caught up would get
//! them one or two per pull, each batch costing a WAL fdatasync and an ack round: after a pull
//! that came back short, the next waits for the next multiple of `fetch_linger_ms` (50 ms by
//! default) on a clock the consumers share, for more to gather and for the consumers to pull,
//! append and ack together.
//!
//! A [`Batch`] owns the delivered messages; [`MessageRef`] borrows each one's stream, sequence,
//! subject, selected headers, publish time and payload without copying, so the caller can build
//! WAL records straight from them.
//!
//! **The caller acks a batch only after the WAL fsync covering all of its records has
//! returned** ([`Batch::ack`]). With ack policy `all`, batches must also be appended to the WAL in
//! fetch order: one ack covers every earlier message of the consumer.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self};
use bytes::Bytes;
use futures_util::StreamExt;

use super::rescue::{self, DeadLetterMark, Rescue};
use super::{reply, setup, SourceError};
use crate::config::{AckPolicyKind, ConsumerConfig, NatsConfig};

/// Headers copied into WAL records; every other header is dropped.
pub const SELECTED_HEADERS: [&str; 1] = ["Nats-Msg-Id"];

/// Extra wait past `fetch_expires_ms` for the server's end-of-pull notice before the client
/// gives up on a pull: covers network latency without hanging on a lost connection.
const FETCH_DEADLINE_MARGIN_MS: u64 = 2_000;

/// The status JetStream uses when the next message exceeds the pull's byte limit.
const TOO_LARGE_STATUS: &str = "Message Size Exceeds MaxBytes";

/// Statuses (409) with which JetStream ends a pull that is not failing: the consumer's leader
/// moved to another node ("Leadership Change"), or the server considers the request done
/// ("Batch Completed", which a new leader answers for a while). The client library reports them
/// as errors; the relay pulls again instead of backing off, which after a NATS node's loss held
/// a consumer for tens of seconds.
const PULL_ENDED_STATUSES: [&str; 2] = ["Batch Completed", "Leadership Change"];

/// Pause before the next pull after one ended by such a status without messages: the server
/// may answer every pull that way until the new leader has caught up, and a loop of immediate
/// pulls would flood it with requests.
const PULL_ENDED_PAUSE_MS: u64 = 50;

/// Bound on handing one batch's acks to the connection. Sending an ack only queues it and
/// writes it to the socket; if that takes longer, the connection is stuck (a frozen server with
/// full socket buffers), and the caller must not hang: the acks are abandoned and the messages
/// come back after ack_wait.
const ACK_SEND_TIMEOUT_MS: u64 = 5_000;

/// Body of a positive acknowledgement.
const ACK_BODY: &[u8] = b"+ACK";

/// Body of a negative acknowledgement: redeliver now.
const NAK_BODY: &[u8] = b"-NAK";

/// Body of a termination: the message was dead-lettered, never redeliver it.
const TERM_BODY: &[u8] = b"+TERM";

/// The start of the clock that [`next_linger_tick`] counts ticks on, shared by every consumer
/// of the process.
static LINGER_EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();

/// When a consumer that lingers may pull again: the next multiple of `linger` on a clock every
/// consumer of the process shares. Consumers that have caught up then pull at the same instants,
/// so their appends share one WAL commit (one `fdatasync`), their acks one write to the server and
/// their timers one wake-up, where each consumer lingering on its own schedule cost its own. A
/// consumer still pulls at most once per tick, and waits at most `linger`.
fn next_linger_tick(linger: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let epoch = *LINGER_EPOCH.get_or_init(|| now);
    now + until_next_tick(now.saturating_duration_since(epoch), linger)
}

/// From `elapsed` on a clock, the wait until its next multiple of `tick` (a whole tick on a
/// multiple: the caller has just pulled).
fn until_next_tick(elapsed: Duration, tick: Duration) -> Duration {
    let tick_ns = tick.as_nanos().max(1);
    let into_tick = elapsed.as_nanos() % tick_ns;
    Duration::from_nanos(u64::try_from(tick_ns - into_tick).unwrap_or(u64::MAX))
}

/// Pulls batches from one durable pull consumer.
pub struct Fetcher {
    /// Handle used to send pull requests.
    consumer: PullConsumer,
    /// Client used to check the connection and to send acks.
    client: async_nats::Client,
    /// Stream name, shared with every batch.
    stream: Arc<str>,
    /// Durable name, shared with every batch.
    durable: Arc<str>,
    /// Messages per pull, at most.
    fetch_batch: usize,
    /// Bytes per pull, at most.
    fetch_bytes_max: u64,
    /// How long the server holds one pull open.
    fetch_expires: Duration,
    /// Pause before the next pull after one that came back short (`fetch_linger_ms`).
    fetch_linger: Duration,
    /// When the next pull may start: set after a short pull, so that messages gather in the
    /// stream meanwhile. It is the next tick of a clock shared by every consumer of the process
    /// ([`next_linger_tick`]).
    next_pull_at: Option<tokio::time::Instant>,
    /// The ack policy in force on the server (which wins over the configuration on drift).
    ack_policy: AckPolicyKind,
    /// Ack-all only: which written deliveries may still be pending on the server.
    ack_all_gate: AckAllGate,
    /// Pulls through a raw connection after the client lost its connection (`rescue`).
    rescue: Rescue,
}

impl Fetcher {
    /// Opens the existing durable pull consumer of `config` (create it first with
    /// [`super::ensure_consumer`]). Acks follow the ack policy the server has for the consumer,
    /// whatever the configuration says: acking one message under an explicit policy that the
    /// configuration believes is `all` would leave the rest to be redelivered.
    pub async fn new(
        js: &jetstream::Context,
        config: &ConsumerConfig,
    ) -> Result<Fetcher, SourceError> {
        let stream = js.get_stream_no_info(&config.stream).await.map_err(|err| {
            SourceError::StreamRequest {
                stream: config.stream.clone(),
                source: Box::new(err),
            }
        })?;
        let info = setup::consumer_info(&stream, config)
            .await?
            .ok_or_else(|| SourceError::ConsumerMissing {
                stream: config.stream.clone(),
                durable: config.durable.clone(),
            })?;
        setup::check_usable(config, &info.config)?;
        let ack_policy = setup::server_ack_policy(info.config.ack_policy).ok_or_else(|| {
            // check_usable already rejected the policies without a kind; kept as an error
            // rather than an unwrap so a future policy cannot panic here.
            SourceError::UnsupportedAckPolicy {
                stream: config.stream.clone(),
                durable: config.durable.clone(),
                policy: format!("{:?}", info.config.ack_policy),
            }
        })?;
        let consumer: PullConsumer =
            stream
                .get_consumer(&config.durable)
                .await
                .map_err(|source| SourceError::ConsumerRequest {
                    stream: config.stream.clone(),
                    durable: config.durable.clone(),
                    source,
                })?;
        let max_payload = js.client().server_info().max_payload;
        if u64::try_from(max_payload).unwrap_or(u64::MAX) > config.fetch_bytes_max {
            tracing::warn!(stream = %config.stream, durable = %config.durable,
                fetch_bytes_max = config.fetch_bytes_max, max_payload,
                "consumer fetch_bytes_max is below the server's max_payload: a message larger than \
                 fetch_bytes_max is fetched alone, one per pull; raise fetch_bytes_max above \
                 max_payload to keep such messages in batches");
        }
        Ok(Fetcher {
            consumer,
            client: js.client(),
            stream: Arc::from(config.stream.as_str()),
            durable: Arc::from(config.durable.as_str()),
            fetch_batch: config.fetch_batch as usize,
            fetch_bytes_max: config.fetch_bytes_max,
            fetch_expires: Duration::from_millis(config.fetch_expires_ms),
            fetch_linger: Duration::from_millis(config.fetch_linger_ms),
            next_pull_at: None,
            ack_policy,
            ack_all_gate: AckAllGate::default(),
            rescue: Rescue::disabled(),
        })
    }

    /// Lets the fetcher rescue deliveries the client cannot read through a raw connection made
    /// with `nats` (see the `rescue` module); without it a poisoned delivery is redelivered
    /// forever.
    pub fn with_rescue(mut self, nats: &NatsConfig) -> Fetcher {
        self.rescue.enable(nats);
        self
    }

    /// Stream name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Durable name.
    pub fn durable(&self) -> &str {
        &self.durable
    }

    /// The ack policy in force on the server.
    pub fn ack_policy(&self) -> AckPolicyKind {
        self.ack_policy
    }

    /// Pulls up to `fetch_batch` messages (and `fetch_bytes_max` bytes), returning as soon as
    /// the server has delivered what it had, or after `fetch_expires_ms` with an empty batch when
    /// the stream is idle. A next message larger than `fetch_bytes_max` comes alone, in a pull
    /// without a byte limit (bounded by the server's `max_payload`), instead of blocking the
    /// consumer.
    ///
    /// Errors are transient unless they say otherwise: the caller retries with backoff. A pull
    /// cut short by an error after some messages arrived returns those messages; the error shows
    /// again on the next pull if it persists.
    pub async fn fetch(&mut self) -> Result<Batch, SourceError> {
        let connects = self.client.statistics().connects.load(Ordering::Relaxed);
        self.rescue.observe_connects(connects);
        let state = self.client.connection_state();
        if state != State::Connected {
            self.rescue.arm();
            return Err(SourceError::Disconnected {
                durable: self.durable.to_string(),
                state: state.to_string(),
            });
        }
        if let Some(batch) = self.fetch_rescue().await? {
            return Ok(batch);
        }
        // A consumer that has caught up gets its messages one or two per pull, each costing an
        // fsync and an ack round: waiting a moment lets the next pull carry more. The time since
        // the short pull (its append and acks) counts towards the wait.
        if let Some(at) = self.next_pull_at.take() {
            tokio::time::sleep_until(at).await;
        }

        let bytes_max = usize::try_from(self.fetch_bytes_max).unwrap_or(usize::MAX);
        let messages = match self.pull(self.fetch_batch, Some(bytes_max)).await {
            Err(SourceError::MessageTooLarge { .. }) => {
                // JetStream holds the consumer on a message larger than the pull's byte limit,
                // so every later message would wait behind it for good. It is fetched alone,
                // without a byte limit: one message is bounded by the server's max_payload.
                tracing::warn!(stream = %self.stream, durable = %self.durable,
                    fetch_bytes_max = self.fetch_bytes_max,
                    "the next message is larger than fetch_bytes_max; fetching it alone \
                     (raise fetch_bytes_max above the server's max_payload to keep such messages in batches)");
                self.pull(1, None).await?
            }
            other => other?,
        };
        // Short: fewer messages than asked for and far from the byte limit (a pull cut by the
        // byte limit means more is waiting).
        let payload_bytes: usize = messages.iter().map(|m| m.message.payload.len()).sum();
        let short = !messages.is_empty()
            && messages.len() < self.fetch_batch
            && (payload_bytes as u64) < self.fetch_bytes_max / 2;
        if short && !self.fetch_linger.is_zero() {
            self.next_pull_at = Some(next_linger_tick(self.fetch_linger));
        }
        Ok(Batch {
            stream: Arc::clone(&self.stream),
            durable: Arc::clone(&self.durable),
            messages,
            ack_policy: self.ack_policy,
            client: self.client.clone(),
        })
    }

    /// One pull of at most `max_messages` messages and `bytes_max` bytes (no byte limit when
    /// `None`), read until the server ends it or its deadline passes.
    async fn pull(
        &mut self,
        max_messages: usize,
        bytes_max: Option<usize>,
    ) -> Result<Vec<Delivered>, SourceError> {
        let mut request = self
            .consumer
            .fetch()
            .max_messages(max_messages)
            .expires(self.fetch_expires);
        if let Some(bytes_max) = bytes_max {
            request = request.max_bytes(bytes_max);
        }
        let mut pull = request
            .messages()
            .await
            .map_err(|err| self.fetch_error(Box::new(err) as super::NatsError))?;

        // The client library waits five seconds past `expires` for the server's end-of-pull
        // status; a lost connection would stall the relay that long, so cut it shorter.
        let deadline = tokio::time::Instant::now()
            + self.fetch_expires
            + Duration::from_millis(FETCH_DEADLINE_MARGIN_MS);
        let mut messages = Vec::with_capacity(max_messages.min(1024));
        loop {
            let next = match tokio::time::timeout_at(deadline, pull.next()).await {
                Ok(next) => next,
                Err(_elapsed) => {
                    let state = self.client.connection_state();
                    if messages.is_empty() && state != State::Connected {
                        return Err(SourceError::Disconnected {
                            durable: self.durable.to_string(),
                            state: state.to_string(),
                        });
                    }
                    break;
                }
            };
            match next {
                None => break,
                Some(Ok(message)) => messages.push(self.delivered(message.message)?),
                Some(Err(err)) => {
                    let text = err.to_string();
                    if PULL_ENDED_STATUSES
                        .iter()
                        .any(|status| text.contains(status))
                    {
                        tracing::debug!(stream = %self.stream, durable = %self.durable, status = %text,
                            delivered = messages.len(), "pull ended by the server; pulling again");
                        if messages.is_empty() {
                            tokio::time::sleep(Duration::from_millis(PULL_ENDED_PAUSE_MS)).await;
                        }
                        break;
                    }
                    let err = self.fetch_error(err);
                    if messages.is_empty() {
                        return Err(err);
                    }
                    tracing::warn!(stream = %self.stream, durable = %self.durable, error = %prism_wal::ErrorChain(&err),
                        delivered = messages.len(), "pull ended early; keeping the messages delivered so far");
                    break;
                }
            }
        }
        Ok(messages)
    }

    /// Acknowledges a batch whose messages are all in the WAL (the caller asserts the fsync).
    ///
    /// Explicit policy: every message of the batch is acked. Ack-all policy: one ack covers every
    /// pending message of the consumer with a lower stream sequence, including messages delivered
    /// to a previous, killed process (or by a pull whose reply arrived after [`Self::fetch`]
    /// stopped reading) that never reached this WAL; acking then would lose them for good. So the
    /// ack is sent only when the server's count of pending messages equals the messages this
    /// fetcher has written above the server's ack floor, i.e. every pending delivery is in the WAL
    /// (see [`AckAllGate`]: an earlier ack whose outcome is unknown counts only once the floor
    /// shows it). Otherwise the ack waits: the unknown deliveries come back after `ack_wait`, are
    /// written, and a later ack covers everything (the batches acked late are redelivered
    /// meanwhile and collapse on their identity).
    pub async fn ack(&mut self, batch: Batch) -> Result<AckSummary, SourceError> {
        if self.ack_policy == AckPolicyKind::Explicit || batch.is_empty() {
            return batch.ack().await;
        }
        self.ack_all_gate
            .written(batch.messages.iter().map(|m| m.stream_seq));
        let backlog = self.backlog().await?;
        if !self
            .ack_all_gate
            .may_ack(backlog.ack_floor_stream_seq, backlog.num_ack_pending)
        {
            tracing::debug!(
                durable = %self.durable,
                pending = backlog.num_ack_pending,
                "ack-all deferred: some pending deliveries are not in the WAL yet"
            );
            return Ok(AckSummary {
                acks_sent: 0,
                messages_covered: 0,
            });
        }
        // Whatever the outcome, the gate keeps the batch: the next consumer info's ack floor says
        // whether this ack arrived.
        batch.ack().await
    }

    /// A handle that reads this consumer's backlog from another task (the metrics poller),
    /// sharing the fetcher's consumer handle instead of looking the consumer up again.
    pub fn backlog_probe(&self) -> BacklogProbe {
        BacklogProbe {
            consumer: self.consumer.clone(),
            stream: self.stream.clone(),
            durable: self.durable.clone(),
        }
    }

    /// The consumer's backlog as the server sees it (the autoscaling signal).
    pub async fn backlog(&mut self) -> Result<Backlog, SourceError> {
        let info = self.consumer_info().await?;
        Ok(Backlog {
            num_pending: info.num_pending,
            num_ack_pending: info.num_ack_pending as u64,
            ack_floor_stream_seq: info.ack_floor.stream_sequence,
            num_redelivered: info.num_redelivered as u64,
        })
    }

    /// The consumer's info, fresh from the server.
    async fn consumer_info(
        &mut self,
    ) -> Result<async_nats::jetstream::consumer::Info, SourceError> {
        self.consumer
            .info()
            .await
            .cloned()
            .map_err(|err| SourceError::ConsumerRequest {
                stream: self.stream.to_string(),
                durable: self.durable.to_string(),
                source: Box::new(err),
            })
    }

    /// The consumer counters a rescue decides on.
    async fn rescue_info(&mut self) -> Result<rescue::ConsumerPosition, SourceError> {
        let info = self.consumer_info().await?;
        Ok(rescue::ConsumerPosition {
            delivered: info.delivered.stream_sequence,
            ack_floor: info.ack_floor.stream_sequence,
            ack_pending: info.num_ack_pending as u64,
            ack_wait: info.config.ack_wait,
        })
    }

    /// A rescue pull, when one is due (the client reconnected and some delivery in flight then is
    /// not acknowledged yet); `None` when the client should pull.
    async fn fetch_rescue(&mut self) -> Result<Option<Batch>, SourceError> {
        let target = match self.rescue.step() {
            rescue::Step::Client => return Ok(None),
            rescue::Step::Arm => {
                let info = self.rescue_info().await?;
                self.rescue
                    .activate(info.delivered, info.ack_pending, info.ack_wait);
                match self.rescue.step() {
                    rescue::Step::Raw { target } => target,
                    _ => return Ok(None),
                }
            }
            rescue::Step::Raw { target } => target,
        };
        let info = self.rescue_info().await?;
        if !self.rescue.check_floor(info.ack_floor) {
            return Ok(None);
        }
        let request = rescue::PullRequest {
            stream: &self.stream,
            durable: &self.durable,
            batch: self.fetch_batch,
            max_bytes: self.fetch_bytes_max,
            expires: self.fetch_expires,
        };
        let raw = match self.rescue.pull(&request).await {
            Ok(raw) => raw,
            Err(rescue::RescueError::TooLarge) => {
                return Err(SourceError::MessageTooLarge {
                    stream: self.stream.to_string(),
                    durable: self.durable.to_string(),
                    fetch_bytes_max: self.fetch_bytes_max,
                })
            }
            Err(error @ rescue::RescueError::Unsupported { .. }) => {
                tracing::error!(stream = %self.stream, durable = %self.durable, error = %prism_wal::ErrorChain(&error), target,
                    "a delivery the NATS client cannot read would be redelivered forever; pulling through the client");
                self.rescue.abandon();
                return Ok(None);
            }
            Err(error) => {
                return Err(SourceError::Fetch {
                    stream: self.stream.to_string(),
                    durable: self.durable.to_string(),
                    source: Box::new(error),
                })
            }
        };
        let mut messages = Vec::with_capacity(raw.len());
        for delivery in raw {
            let mut delivered = self.delivered(delivery.message)?;
            if let Some(mark) = delivery.dead_letter {
                self.rescue.log_dead_letter(
                    &self.stream,
                    &self.durable,
                    delivered.stream_seq,
                    &mark.reason,
                );
                delivered.dead_letter = Some(Box::new(mark));
            }
            messages.push(delivered);
        }
        Ok(Some(Batch {
            stream: Arc::clone(&self.stream),
            durable: Arc::clone(&self.durable),
            messages,
            ack_policy: self.ack_policy,
            client: self.client.clone(),
        }))
    }

    fn delivered(&self, message: async_nats::Message) -> Result<Delivered, SourceError> {
        let meta = message
            .reply
            .as_deref()
            .and_then(reply::parse)
            .ok_or_else(|| SourceError::Metadata {
                durable: self.durable.to_string(),
                subject: message.subject.to_string(),
                reply: message.reply.as_ref().map(ToString::to_string),
            })?;
        debug_assert_eq!(
            meta.stream, &*self.stream,
            "a consumer delivers from its own stream"
        );
        Ok(Delivered {
            stream_seq: meta.stream_seq,
            consumer_seq: meta.consumer_seq,
            delivered: meta.delivered,
            published_ns: meta.published_ns,
            message,
            dead_letter: None,
        })
    }

    fn fetch_error(&self, source: super::NatsError) -> SourceError {
        if source.to_string().contains(TOO_LARGE_STATUS) {
            SourceError::MessageTooLarge {
                stream: self.stream.to_string(),
                durable: self.durable.to_string(),
                fetch_bytes_max: self.fetch_bytes_max,
            }
        } else {
            SourceError::Fetch {
                stream: self.stream.to_string(),
                durable: self.durable.to_string(),
                source,
            }
        }
    }
}

/// Reads one consumer's [`Backlog`] (see [`Fetcher::backlog_probe`]).
#[derive(Debug, Clone)]
pub struct BacklogProbe {
    /// A clone of the fetcher's consumer handle.
    consumer: PullConsumer,
    /// Stream name.
    stream: Arc<str>,
    /// Durable name.
    durable: Arc<str>,
}

impl BacklogProbe {
    /// Stream name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Durable name.
    pub fn durable(&self) -> &str {
        &self.durable
    }

    /// The consumer's counters, fresh from the server (one consumer info request, bounded by
    /// the client's request timeout).
    pub async fn backlog(&self) -> Result<Backlog, SourceError> {
        let info = self
            .consumer
            .get_info()
            .await
            .map_err(|err| SourceError::ConsumerRequest {
                stream: self.stream.to_string(),
                durable: self.durable.to_string(),
                source: Box::new(err),
            })?;
        Ok(Backlog {
            num_pending: info.num_pending,
            num_ack_pending: info.num_ack_pending as u64,
            ack_floor_stream_seq: info.ack_floor.stream_sequence,
            num_redelivered: info.num_redelivered as u64,
        })
    }
}

/// The consumer's counters, from consumer info.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Messages of the stream matching the filter that were never delivered.
    pub num_pending: u64,
    /// Messages delivered and not acknowledged yet.
    pub num_ack_pending: u64,
    /// Stream sequence of the consumer's ack floor: every delivery at or below it is acknowledged.
    pub ack_floor_stream_seq: u64,
    /// Messages delivered more than once and not acknowledged yet.
    pub num_redelivered: u64,
}

/// One delivered message with its parsed metadata.
struct Delivered {
    stream_seq: u64,
    consumer_seq: u64,
    delivered: u64,
    published_ns: i64,
    message: async_nats::Message,
    /// Set by a rescue pull for a delivery the client could not have read.
    dead_letter: Option<Box<DeadLetterMark>>,
}

/// The messages of one pull, in delivery order.
pub struct Batch {
    stream: Arc<str>,
    durable: Arc<str>,
    messages: Vec<Delivered>,
    ack_policy: AckPolicyKind,
    client: async_nats::Client,
}

impl Batch {
    /// Number of messages.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when the pull expired without messages.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Total payload bytes.
    pub fn payload_bytes(&self) -> usize {
        self.messages.iter().map(|m| m.message.payload.len()).sum()
    }

    /// Stream the messages come from.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Durable that delivered them.
    pub fn durable(&self) -> &str {
        &self.durable
    }

    /// The ack policy [`Batch::ack`] follows.
    pub fn ack_policy(&self) -> AckPolicyKind {
        self.ack_policy
    }

    /// The messages, in delivery order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = MessageRef<'_>> + '_ {
        self.messages.iter().map(move |m| MessageRef {
            stream: &self.stream,
            delivered: m,
        })
    }

    /// Acknowledges the batch. **Call only after the WAL fsync covering every record of this
    /// batch has returned.**
    ///
    /// Explicit policy: one ack per message, all sent without waiting for a reply each, then one
    /// flush. Ack-all policy: one ack, of the message with the highest consumer sequence, which
    /// covers the whole batch and every earlier delivery of the consumer.
    ///
    /// Acks are fire-and-forget: a lost ack (connection dropped) makes JetStream redeliver the
    /// message after `ack_wait_ms`; its WAL record and ClickHouse row collapse with the
    /// redelivery by stream sequence. An error here is therefore worth a warning, not a retry.
    pub async fn ack(self) -> Result<AckSummary, SourceError> {
        let timeout = Duration::from_millis(ACK_SEND_TIMEOUT_MS);
        match tokio::time::timeout(timeout, self.send_acks()).await {
            Ok(result) => result,
            Err(elapsed) => Err(SourceError::Ack {
                stream: self.stream.to_string(),
                durable: self.durable.to_string(),
                source: Box::new(elapsed),
            }),
        }
    }

    /// Hands every message of the batch back to JetStream for immediate redelivery (used when
    /// the relay stops before the batch could be written). Bounded like [`Self::ack`].
    pub async fn nak(self) -> Result<(), SourceError> {
        let send = async {
            for m in &self.messages {
                self.send_reply(&m.message, NAK_BODY).await?;
            }
            self.client.flush().await.map_err(|err| SourceError::Ack {
                stream: self.stream.to_string(),
                durable: self.durable.to_string(),
                source: Box::new(err),
            })
        };
        match tokio::time::timeout(Duration::from_millis(ACK_SEND_TIMEOUT_MS), send).await {
            Ok(result) => result,
            Err(elapsed) => Err(SourceError::Ack {
                stream: self.stream.to_string(),
                durable: self.durable.to_string(),
                source: Box::new(elapsed),
            }),
        }
    }

    async fn send_acks(&self) -> Result<AckSummary, SourceError> {
        let covered = self.messages.len();
        if covered == 0 {
            return Ok(AckSummary {
                acks_sent: 0,
                messages_covered: 0,
            });
        }
        let mut acks_sent = 0;
        match self.ack_policy {
            AckPolicyKind::Explicit => {
                for m in &self.messages {
                    // A dead letter is terminated: JetStream stops redelivering it and emits a
                    // termination advisory.
                    let body = if m.dead_letter.is_some() {
                        TERM_BODY
                    } else {
                        ACK_BODY
                    };
                    self.send_reply(&m.message, body).await?;
                    acks_sent += 1;
                }
            }
            AckPolicyKind::All => {
                // Delivery order is consumer-sequence order, but take the maximum explicitly:
                // acking a lower one would leave later messages of the batch unacknowledged.
                let last = self
                    .messages
                    .iter()
                    .max_by_key(|m| m.consumer_seq)
                    .map(|m| &m.message);
                if let Some(message) = last {
                    self.send_ack(message).await?;
                    acks_sent = 1;
                }
            }
        }
        self.client.flush().await.map_err(|err| SourceError::Ack {
            stream: self.stream.to_string(),
            durable: self.durable.to_string(),
            source: Box::new(err),
        })?;
        Ok(AckSummary {
            acks_sent,
            messages_covered: covered,
        })
    }

    async fn send_ack(&self, message: &async_nats::Message) -> Result<(), SourceError> {
        self.send_reply(message, ACK_BODY).await
    }

    async fn send_reply(
        &self,
        message: &async_nats::Message,
        body: &'static [u8],
    ) -> Result<(), SourceError> {
        // Every message in a batch passed reply::parse, so it has a reply subject.
        let Some(reply) = message.reply.clone() else {
            return Err(SourceError::Metadata {
                durable: self.durable.to_string(),
                subject: message.subject.to_string(),
                reply: None,
            });
        };
        self.client
            .publish(reply, Bytes::from_static(body))
            .await
            .map_err(|err| SourceError::Ack {
                stream: self.stream.to_string(),
                durable: self.durable.to_string(),
                source: Box::new(err),
            })
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("stream", &self.stream)
            .field("durable", &self.durable)
            .field("len", &self.messages.len())
            .field("ack_policy", &self.ack_policy)
            .finish()
    }
}

/// What [`Batch::ack`] sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckSummary {
    /// Ack messages published.
    pub acks_sent: usize,
    /// Messages of the batch they cover.
    pub messages_covered: usize,
}

/// One message of a [`Batch`], borrowed.
#[derive(Clone, Copy)]
pub struct MessageRef<'a> {
    stream: &'a str,
    delivered: &'a Delivered,
}

impl<'a> MessageRef<'a> {
    /// Stream the message is stored in.
    pub fn stream(&self) -> &'a str {
        self.stream
    }

    /// The message's sequence in its stream: with the stream name, its identity, kept by
    /// redeliveries and replays.
    pub fn stream_seq(&self) -> u64 {
        self.delivered.stream_seq
    }

    /// The delivery's sequence in the consumer (grows with redeliveries).
    pub fn consumer_seq(&self) -> u64 {
        self.delivered.consumer_seq
    }

    /// Delivery attempt, starting at 1; above 1 the message is a redelivery.
    pub fn delivery_count(&self) -> u64 {
        self.delivered.delivered
    }

    /// The subject it was published on.
    pub fn subject(&self) -> &'a str {
        self.delivered.message.subject.as_str()
    }

    /// The `Nats-Msg-Id` header, if the publisher set one.
    pub fn msg_id(&self) -> Option<&'a str> {
        self.header("Nats-Msg-Id")
    }

    /// The [`SELECTED_HEADERS`] present on the message, as (name, value).
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &'a str)> + 'a {
        let this = *self;
        SELECTED_HEADERS
            .iter()
            .filter_map(move |name| this.header(name).map(|value| (*name, value)))
    }

    /// Time the stream stored the message, unix nanoseconds.
    pub fn published_ns(&self) -> i64 {
        self.delivered.published_ns
    }

    /// The headers its WAL record carries: the [`SELECTED_HEADERS`] present, and for a delivery
    /// the client could not read, [`rescue::DEAD_LETTER_HEADER`] (the reason) and
    /// [`rescue::RAW_SUBJECT_HEADER`] (the raw subject in hex), which route it to dead letters.
    pub fn record_headers(&self) -> impl Iterator<Item = (&'static str, &'a str)> + 'a {
        let mark = self.delivered.dead_letter.as_deref();
        let marks = mark.into_iter().flat_map(|m| {
            [
                (rescue::DEAD_LETTER_HEADER, m.reason.as_str()),
                (rescue::RAW_SUBJECT_HEADER, m.raw_subject_hex.as_str()),
            ]
        });
        self.headers().chain(marks)
    }

    /// The payload bytes.
    pub fn payload(&self) -> &'a [u8] {
        &self.delivered.message.payload
    }

    /// The payload as shared bytes (cloning it is a reference count, not a copy).
    pub fn payload_shared(&self) -> &'a Bytes {
        &self.delivered.message.payload
    }

    fn header(&self, name: &str) -> Option<&'a str> {
        self.delivered
            .message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    }
}

impl std::fmt::Debug for MessageRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageRef")
            .field("stream", &self.stream())
            .field("stream_seq", &self.stream_seq())
            .field("subject", &self.subject())
            .field("msg_id", &self.msg_id())
            .field("payload_len", &self.payload().len())
            .finish()
    }
}

/// Ack-all bookkeeping: the stream sequences written to the WAL that may still be pending on the
/// server, and the rule deciding whether an ack-all may be sent.
///
/// An ack-all of stream sequence S acknowledges every pending delivery of the consumer at or
/// below S, including deliveries this process never wrote (to a killed predecessor, or to a pull
/// abandoned at its deadline whose messages arrived after it was dropped). It is safe only when
/// every pending delivery is in the WAL. The server says how many deliveries are pending, not
/// which; so the rule compares that count with the written deliveries *the server may still hold
/// pending*, and that set is never trimmed on local belief: an ack reported as failed may still
/// have reached the server (a flush that timed out leaves the ack in the connection's buffer),
/// and an ack reported as sent may have been lost with the connection. Only the server's ack
/// floor, read in the same consumer info as the pending count, removes sequences: with ack policy
/// all, a delivery is pending exactly when it was delivered and lies above the floor.
///
/// With the set trimmed that way, every sequence in it is pending, so `pending <= written` means
/// the pending deliveries are exactly the written ones. Between that consumer info and the ack,
/// the server can only deliver messages above its delivered sequence (which the ack, of a
/// delivered message, does not cover) or redeliver pending ones (already counted), so the
/// snapshot still holds when the ack lands. One case is outside the rule: a pending message the
/// server drops by itself (a finite `max_deliver`, or stream limits removing it) would leave a
/// written sequence above the floor that is not pending; ack policy all is for a consumer one
/// relay owns, with the default unlimited `max_deliver`.
///
/// Memory: the set holds written sequences above the floor; the server delivers at most
/// `max_ack_pending` of those, and a redelivery of one does not grow it.
#[derive(Debug, Default)]
struct AckAllGate {
    /// Stream sequences written to the WAL above the last ack floor seen.
    written_unacked: BTreeSet<u64>,
}

impl AckAllGate {
    /// Records deliveries whose WAL records an fsync has covered.
    fn written(&mut self, stream_seqs: impl IntoIterator<Item = u64>) {
        self.written_unacked.extend(stream_seqs);
    }

    /// True when an ack-all may be sent now, from one consumer info read after every earlier
    /// ack attempt: its ack floor and its count of pending deliveries.
    fn may_ack(&mut self, ack_floor_stream_seq: u64, num_ack_pending: u64) -> bool {
        // Deliveries at or below the floor are acknowledged on the server, by whichever attempt.
        self.written_unacked = self
            .written_unacked
            .split_off(&ack_floor_stream_seq.saturating_add(1));
        num_ack_pending <= self.written_unacked.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_that_linger_wait_for_the_same_tick_and_never_longer_than_the_linger() {
        let tick = Duration::from_millis(50);
        // Three consumers whose short pulls ended at different moments of the same tick pull
        // again together at its end.
        for ended_ms in [100, 117, 149] {
            let ended = Duration::from_millis(ended_ms);
            assert_eq!(
                ended + until_next_tick(ended, tick),
                Duration::from_millis(150)
            );
        }
        // On a tick itself the consumer has just pulled: it waits a whole tick, not zero.
        assert_eq!(until_next_tick(Duration::from_millis(150), tick), tick);
        assert_eq!(until_next_tick(Duration::ZERO, tick), tick);
        // A wait is never longer than the linger, nor zero, wherever the clock stands.
        for ns in [1, 49_999_999, 50_000_001, 1_234_567_891] {
            let wait = until_next_tick(Duration::from_nanos(ns), tick);
            assert!(wait > Duration::ZERO && wait <= tick, "{ns} ns: {wait:?}");
        }
    }

    #[test]
    fn an_ack_all_that_reported_failure_but_reached_the_server_never_lets_a_later_ack_cover_an_abandoned_delivery(
    ) {
        let mut gate = AckAllGate::default();
        // Batch 1..=5 is written and is all the server has pending: the ack may go.
        gate.written(1..=5);
        assert!(gate.may_ack(0, 5));
        // Its flush timed out while NATS was stalled, so the fetcher saw an error, but the ack
        // was still in the connection's buffer and reached the server after the stall (nothing
        // tells the gate that it did). A pull abandoned during the stall then received 6..=10,
        // which are pending and not in the WAL; the next pull's 11..=15 are written.
        gate.written(11..=15);
        // The server: ack floor 5, pending 6..=15. An ack of 15 would cover 6..=10 and lose them.
        assert!(
            !gate.may_ack(5, 10),
            "ack-all allowed while 5 pending deliveries are not in the WAL"
        );
        // After ack_wait the abandoned deliveries come back and are written: now the ack covers
        // written deliveries only, and may go.
        gate.written(6..=10);
        assert!(gate.may_ack(5, 10));
    }

    #[test]
    fn after_an_ack_all_that_arrived_the_next_batch_is_acked_at_once() {
        let mut gate = AckAllGate::default();
        gate.written(1..=5);
        assert!(gate.may_ack(0, 5));
        // The server acknowledged 1..=5 (floor 5); the next batch is all that is pending.
        gate.written(6..=10);
        assert!(gate.may_ack(5, 5));
    }
}
