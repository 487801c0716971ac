//! `loadgen`: publishes realistic MarketPrism traffic into JetStream for load tests and
//! no-loss checks.
//!
//! Messages come from [`Generator`] (subjects `{data_type}.{exchange}.{market_type}.{symbol}`,
//! MarketPrism JSON, a unique `Nats-Msg-Id` per message) and go out as JetStream publishes,
//! pipelined: up to `inflight_max` publishes wait for their acks at once, and acks are
//! awaited oldest first, so the first and last stream sequence per stream come straight
//! from the acks. A [`Schedule`] paces the run by elapsed time, so the achieved rate does
//! not drift. Streams can be created first when missing (`create_streams`).
//!
//! A publish whose ack fails (timed out, or an error such as no responders while a clustered
//! stream elects a new leader) is sent again with the same `Nats-Msg-Id` for up to
//! `publish_retry_ms` (60 s by default) after its first send: JetStream's duplicate window drops the copy
//! of one that was stored after all (its ack then says duplicate, which for a re-sent message
//! is no duplicate of the run). Only a publish that still fails then counts as a publish error,
//! so a NATS node's loss does not end the run.
//!
//! Per message, the only allocations are the ones the NATS client needs to own what it
//! sends (subject, payload bytes, the `Nats-Msg-Id` header) and the subject and message id
//! kept until the ack for a re-send; generation itself reuses its buffers.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io::IsTerminal as _;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};

use super::gen::{Generator, GeneratorConfig, Mix, ORDERBOOK_DEPTH_MAX};
use super::rate::Schedule;
use super::verify::RangeSpec;
use super::{connect_nats, DataType, ToolError};

/// Default bound on publishes awaiting their ack: enough to keep a local server busy,
/// small enough that a stalled server stops the generator within a fraction of a second.
pub const INFLIGHT_MAX_DEFAULT: usize = 1024;

/// How long a publish may wait for its ack, counted from the send. The client's own timeout
/// starts only when an ack is awaited, and acks are awaited oldest first: publishes lost to a
/// server restart would otherwise time out one after the other.
const PUBLISH_ACK_TIMEOUT_MS: u64 = 5_000;

/// How long after its first send a failed publish is sent again: longer than a JetStream
/// stream's leader election after its leader's node died (seconds), shorter than the duplicate
/// window of MarketPrism's streams (120 s), so a re-sent copy of a stored message is dropped.
const PUBLISH_RETRY_WINDOW_MS: u64 = 60_000;

/// Least time between two sends of one message: a publish that failed at once (no responders
/// while a stream has no leader, a send error) is sent again no sooner, which bounds the
/// re-sends of each failing message to ten a second; one that failed later goes out at once.
const PUBLISH_RETRY_PAUSE_MS: u64 = 100;

/// Time between two progress updates: frequent enough to look live, rare enough to keep
/// the cost off the publish path at any rate.
const PROGRESS_INTERVAL_MS: u64 = 100;

/// Limits of streams `loadgen` creates, after MarketPrism's `MARKET_DATA` stream.
const CREATED_STREAM_MAX_AGE_S: u64 = 48 * 3600;
const CREATED_STREAM_MAX_MESSAGES: i64 = 5_000_000;
const CREATED_STREAM_MAX_BYTES: i64 = 2 * 1024 * 1024 * 1024;
const CREATED_STREAM_DUPLICATE_WINDOW_S: u64 = 120;

/// A stream and the subjects it covers, written `NAME=SUBJECT[,SUBJECT...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Vec<String>,
}

impl StreamSpec {
    /// One stream per subject group: `MARKET_TRADES` (trade.>), `MARKET_BOOKS`
    /// (orderbook.>) and `MARKET_DATA` for the six other types, as in MarketPrism.
    pub fn defaults() -> Vec<StreamSpec> {
        let data = DataType::ALL[2..]
            .iter()
            .map(|dt| format!("{}.>", dt.name()))
            .collect();
        vec![
            StreamSpec {
                name: "MARKET_TRADES".into(),
                subjects: vec!["trade.>".into()],
            },
            StreamSpec {
                name: "MARKET_BOOKS".into(),
                subjects: vec!["orderbook.>".into()],
            },
            StreamSpec {
                name: "MARKET_DATA".into(),
                subjects: data,
            },
        ]
    }

    /// A single stream covering all eight data types.
    pub fn single(name: &str) -> StreamSpec {
        StreamSpec {
            name: name.to_string(),
            subjects: DataType::ALL
                .iter()
                .map(|dt| format!("{}.>", dt.name()))
                .collect(),
        }
    }
}

impl FromStr for StreamSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, subjects) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=SUBJECT[,SUBJECT...], got {s:?}"))?;
        let name = name.trim();
        if name.is_empty() || name.contains(['.', ' ', '*', '>']) {
            return Err(format!("invalid stream name {name:?}"));
        }
        let subjects: Vec<String> = subjects
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect();
        if subjects.is_empty() {
            return Err(format!("stream {name} needs at least one subject"));
        }
        Ok(StreamSpec {
            name: name.to_string(),
            subjects,
        })
    }
}

impl fmt::Display for StreamSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.subjects.join(","))
    }
}

/// Options of `loadgen`; also its command-line flags.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct LoadgenOptions {
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS authentication (the relay's `[nats]` section), from `--config`; none by default.
    #[arg(skip)]
    pub nats: Option<crate::config::NatsConfig>,
    /// Stream layout, `NAME=SUBJECT[,SUBJECT...]`, repeatable; used by --create-streams.
    #[arg(long = "stream", value_name = "NAME=SUBJECTS",
          default_values_t = StreamSpec::defaults())]
    pub streams: Vec<StreamSpec>,
    /// Use this one stream for every data type instead of the layout above.
    #[arg(long, value_name = "NAME")]
    pub single_stream: Option<String>,
    /// Create the streams of the layout that are missing (file storage).
    #[arg(long)]
    pub create_streams: bool,
    /// Weights of the data types, `type=weight,...`; types not named get 0.
    #[arg(long, default_value = Mix::DEFAULT_STR)]
    pub mix: Mix,
    /// Exchanges to generate for (Deribit carries only the volatility index).
    #[arg(long, value_delimiter = ',', default_value = "binance,okx,deribit")]
    pub exchanges: Vec<String>,
    /// Symbols, upper case and dash separated; Deribit uses the base currency (BTC, ETH).
    #[arg(long, value_delimiter = ',', default_value = "BTC-USDT,ETH-USDT")]
    pub symbols: Vec<String>,
    /// Messages per second; 0 publishes as fast as acks allow.
    #[arg(long, default_value_t = 0)]
    pub rate_per_s: u64,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration_s: Option<u64>,
    /// Stop after this many messages (with --duration-s, whichever comes first).
    #[arg(long)]
    pub count: Option<u64>,
    /// Levels per side of every order book (MarketPrism sends up to 100).
    #[arg(long, default_value_t = 20)]
    pub orderbook_depth: u16,
    /// Goes into every message identity so runs never collide; default `lg<epoch ms>`.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Seed of the generator; equal seeds and clocks give equal messages.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// `ts_ms` of the first messages (epoch ms); default the wall clock. Set it past a
    /// previous run's last `ts_ms` to keep timestamp identities unique across runs.
    #[arg(long)]
    pub ts_start_ms: Option<i64>,
    /// Publishes awaiting their ack at most.
    #[arg(long, default_value_t = INFLIGHT_MAX_DEFAULT)]
    pub inflight_max: usize,
    /// Stop publishing after this many publish errors.
    #[arg(long, default_value_t = 100)]
    pub publish_errors_max: u64,
    /// How long after its first send a failed publish is sent again, in milliseconds (0: a
    /// failed publish is an error at once).
    #[arg(long, default_value_t = PUBLISH_RETRY_WINDOW_MS)]
    pub publish_retry_ms: u64,
    /// Hide the progress line (shown only on a terminal anyway).
    #[arg(long = "no-progress", action = clap::ArgAction::SetFalse)]
    pub progress: bool,
}

impl Default for LoadgenOptions {
    fn default() -> Self {
        LoadgenOptions {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats: None,
            streams: StreamSpec::defaults(),
            single_stream: None,
            create_streams: false,
            mix: Mix::default(),
            exchanges: vec!["binance".into(), "okx".into(), "deribit".into()],
            symbols: vec!["BTC-USDT".into(), "ETH-USDT".into()],
            rate_per_s: 0,
            duration_s: None,
            count: None,
            orderbook_depth: 20,
            run_id: None,
            seed: 1,
            ts_start_ms: None,
            inflight_max: INFLIGHT_MAX_DEFAULT,
            publish_retry_ms: PUBLISH_RETRY_WINDOW_MS,
            publish_errors_max: 100,
            progress: true,
        }
    }
}

impl LoadgenOptions {
    /// The stream layout in effect (`single_stream` wins over `streams`).
    pub fn stream_layout(&self) -> Vec<StreamSpec> {
        match &self.single_stream {
            Some(name) => vec![StreamSpec::single(name)],
            None => self.streams.clone(),
        }
    }

    /// Refuses a `--nats-url` that carries credentials (see
    /// [`super::refuse_secret_in_flag`]); run before the configuration replaces the flag.
    pub fn refuse_secrets_in_flags(&self) -> Result<(), ToolError> {
        super::refuse_secret_in_flag("--nats-url", "NATS", &self.nats_url)
    }

    fn validate(&self) -> Result<(), ToolError> {
        if self.count.is_none() && self.duration_s.is_none() {
            return Err(ToolError::Options(
                "set a count or a duration (or both)".into(),
            ));
        }
        if self.inflight_max == 0 {
            return Err(ToolError::Options("inflight_max must be at least 1".into()));
        }
        if self.orderbook_depth == 0 || self.orderbook_depth > ORDERBOOK_DEPTH_MAX {
            return Err(ToolError::Options(format!(
                "orderbook depth must be within 1..={ORDERBOOK_DEPTH_MAX}"
            )));
        }
        Ok(())
    }
}

/// Sequences JetStream assigned in one stream during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSeqRange {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Acked publishes into this stream (equals `last - first + 1` when nothing else
    /// published into it meanwhile).
    pub published: u64,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct LoadgenSummary {
    pub run_id: String,
    /// Acked publishes per data type, indexed by [`DataType::index`].
    pub published: [u64; 8],
    /// Per stream, from the publish acks.
    pub streams: BTreeMap<String, StreamSeqRange>,
    /// Streams that were missing and got created.
    pub streams_created: Vec<String>,
    /// Types in the mix no configured market carries (not generated).
    pub skipped_types: Vec<DataType>,
    pub elapsed: Duration,
    /// Publishes that failed (send error, ack timeout, no stream, ...) and were not stored
    /// by a re-send within the retry window.
    pub publish_errors: u64,
    /// Publishes sent again after a failed attempt.
    pub publish_retries: u64,
    pub first_error: Option<String>,
    /// Acks flagged duplicate by the server (expected 0: every message id is unique).
    pub duplicates: u64,
    /// Why the run stopped early, if it did.
    pub aborted: Option<String>,
    /// The greatest `ts_ms` of the run (`i64::MIN` if nothing was generated); start the
    /// next run on the same markets past it to keep timestamp identities unique.
    pub ts_last_ms: i64,
}

impl LoadgenSummary {
    pub fn published_total(&self) -> u64 {
        self.published.iter().sum()
    }

    /// Acked messages per second over the whole run.
    pub fn rate_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.published_total() as f64 / secs
        } else {
            0.0
        }
    }

    /// The stream ranges this run wrote, for `verify::run_ranges`.
    pub fn ranges(&self) -> Vec<RangeSpec> {
        self.streams
            .iter()
            .map(|(stream, r)| RangeSpec {
                stream: stream.clone(),
                from_seq: Some(r.first_seq),
                to_seq: Some(r.last_seq),
            })
            .collect()
    }

    /// True when every message was published once and acked.
    pub fn ok(&self) -> bool {
        self.publish_errors == 0 && self.duplicates == 0 && self.aborted.is_none()
    }
}

impl fmt::Display for LoadgenSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "run {}", self.run_id)?;
        writeln!(f, "{:<18} {:>12}", "data_type", "published")?;
        for dt in DataType::ALL {
            writeln!(f, "{:<18} {:>12}", dt.name(), self.published[dt.index()])?;
        }
        writeln!(f, "{:<18} {:>12}", "total", self.published_total())?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<18} {:>12} {:>12} {:>12}",
            "stream", "first_seq", "last_seq", "published"
        )?;
        for (name, r) in &self.streams {
            writeln!(
                f,
                "{:<18} {:>12} {:>12} {:>12}",
                name, r.first_seq, r.last_seq, r.published
            )?;
        }
        if !self.streams_created.is_empty() {
            writeln!(f, "created streams: {}", self.streams_created.join(", "))?;
        }
        if !self.skipped_types.is_empty() {
            let names: Vec<&str> = self.skipped_types.iter().map(|d| d.name()).collect();
            writeln!(f, "skipped (no market carries them): {}", names.join(", "))?;
        }
        writeln!(
            f,
            "elapsed {:.3} s, {:.0} msg/s, publish errors {}, retries {}, duplicates {}",
            self.elapsed.as_secs_f64(),
            self.rate_per_s(),
            self.publish_errors,
            self.publish_retries,
            self.duplicates
        )?;
        if let Some(e) = &self.first_error {
            writeln!(f, "first error: {e}")?;
        }
        if let Some(a) = &self.aborted {
            writeln!(f, "aborted: {a}")?;
        }
        write!(f, "last ts_ms {}", self.ts_last_ms)
    }
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Creates the streams of `layout` that do not exist yet; returns the names created.
/// Existing streams are left as they are (their subjects are not changed).
pub async fn ensure_streams(
    js: &jetstream::Context,
    layout: &[StreamSpec],
) -> Result<Vec<String>, ToolError> {
    let mut created = Vec::new();
    for spec in layout {
        match js.get_stream(&spec.name).await {
            Ok(_) => continue,
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(inner) if inner.code() == 404 => {
                }
                _ => return Err(ToolError::js("stream info", e)),
            },
        }
        let config = stream::Config {
            name: spec.name.clone(),
            subjects: spec.subjects.clone(),
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::from_secs(CREATED_STREAM_MAX_AGE_S),
            max_messages: CREATED_STREAM_MAX_MESSAGES,
            max_bytes: CREATED_STREAM_MAX_BYTES,
            duplicate_window: Duration::from_secs(CREATED_STREAM_DUPLICATE_WINDOW_S),
            num_replicas: 1,
            ..Default::default()
        };
        js.create_stream(config)
            .await
            .map_err(|e| ToolError::js("create stream", e))?;
        created.push(spec.name.clone());
    }
    Ok(created)
}

fn progress_bar(opts: &LoadgenOptions) -> ProgressBar {
    if !opts.progress || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match opts.count {
        Some(n) => (
            ProgressBar::new(n),
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} msgs ({per_sec}) {msg}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{spinner} [{elapsed_precise}] {pos} msgs ({per_sec}) {msg}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Accumulates acks into the summary.
struct Tally {
    published: [u64; 8],
    streams: BTreeMap<String, StreamSeqRange>,
    publish_errors: u64,
    publish_retries: u64,
    first_error: Option<String>,
    duplicates: u64,
}

/// A message as it is published, kept while its ack is awaited so a failed publish can be sent
/// again unchanged.
struct Outgoing {
    dt: DataType,
    subject: String,
    payload: Bytes,
    msg_id: String,
    /// When the message was sent the first time; re-sends stop [`PUBLISH_RETRY_WINDOW_MS`] later.
    first_sent: Instant,
    /// Whether this is a re-send, whose stored first attempt the server acks as a duplicate.
    resent: bool,
}

/// A publish awaiting its ack.
struct InFlight {
    message: Outgoing,
    ack: PublishAckFuture,
    /// When it was sent.
    sent: Instant,
}

/// A publish that failed and may be sent again.
struct Failed {
    message: Outgoing,
    error: String,
    /// When it was sent last.
    sent: Instant,
}

/// Sends `message`; a send error comes back with the message.
async fn send(js: &jetstream::Context, message: Outgoing) -> Result<InFlight, Failed> {
    let publish = PublishMessage::build()
        .payload(message.payload.clone())
        .message_id(message.msg_id.as_str());
    let sent = Instant::now();
    match js.send_publish(message.subject.clone(), publish).await {
        Ok(ack) => Ok(InFlight { message, ack, sent }),
        Err(e) => Err(Failed {
            message,
            error: e.to_string(),
            sent,
        }),
    }
}

impl Tally {
    fn error(&mut self, err: impl fmt::Display) {
        self.publish_errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(err.to_string());
        }
    }

    /// Awaits the ack of `in_flight` and counts it; a failed publish comes back to be sent
    /// again.
    async fn settle(&mut self, in_flight: InFlight) -> Option<Failed> {
        let InFlight { message, ack, sent } = in_flight;
        let deadline = sent + Duration::from_millis(PUBLISH_ACK_TIMEOUT_MS);
        let ack = match tokio::time::timeout_at(deadline.into(), ack).await {
            Ok(ack) => ack,
            Err(_) => {
                return Some(Failed {
                    message,
                    error: "publish ack timed out".to_owned(),
                    sent,
                })
            }
        };
        match ack {
            Ok(ack) => {
                self.published[message.dt.index()] += 1;
                if ack.duplicate && !message.resent {
                    self.duplicates += 1;
                }
                let r = self.streams.entry(ack.stream).or_insert(StreamSeqRange {
                    first_seq: ack.sequence,
                    last_seq: ack.sequence,
                    published: 0,
                });
                r.first_seq = r.first_seq.min(ack.sequence);
                r.last_seq = r.last_seq.max(ack.sequence);
                r.published += 1;
                None
            }
            Err(e) => Some(Failed {
                message,
                error: e.to_string(),
                sent,
            }),
        }
    }

    /// Sends a failed publish again until a send succeeds, within its retry window; past it
    /// the failure counts as a publish error.
    async fn resend(
        &mut self,
        js: &jetstream::Context,
        mut failed: Failed,
        window: Duration,
    ) -> Option<InFlight> {
        loop {
            if failed.message.first_sent.elapsed() >= window {
                self.error(failed.error);
                return None;
            }
            // A message is sent again no sooner than the pause after its previous send, so one
            // that waited long for its failure goes out at once.
            let pause = Duration::from_millis(PUBLISH_RETRY_PAUSE_MS);
            tokio::time::sleep_until((failed.sent + pause).into()).await;
            self.publish_retries += 1;
            failed.message.resent = true;
            match send(js, failed.message).await {
                Ok(in_flight) => return Some(in_flight),
                Err(again) => failed = again,
            }
        }
    }

    /// Settles the oldest publish of `window`, sending it again at the back if it failed.
    async fn settle_oldest(
        &mut self,
        js: &jetstream::Context,
        window: &mut VecDeque<InFlight>,
        retry_window: Duration,
    ) {
        let Some(in_flight) = window.pop_front() else {
            return;
        };
        if let Some(failed) = self.settle(in_flight).await {
            if let Some(again) = self.resend(js, failed, retry_window).await {
                window.push_back(again);
            }
        }
    }
}

/// Publishes generated traffic as the options say; see the module documentation.
pub async fn run(opts: &LoadgenOptions) -> Result<LoadgenSummary, ToolError> {
    opts.validate()?;
    let run_id = opts
        .run_id
        .clone()
        .unwrap_or_else(|| format!("lg{}", wall_ms()));
    let mut generator = Generator::new(&GeneratorConfig {
        exchanges: opts.exchanges.clone(),
        symbols: opts.symbols.clone(),
        mix: opts.mix,
        orderbook_depth: opts.orderbook_depth,
        run_id: run_id.clone(),
        seed: opts.seed,
    })?;
    for dt in generator.skipped_types() {
        tracing::warn!(data_type = %dt, "no configured market carries this data type; not generated");
    }

    let client = connect_nats(&opts.nats_url, opts.nats.as_ref(), "prism-relay loadgen").await?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(opts.inflight_max)
        .backpressure_on_inflight(true)
        .timeout(Duration::from_millis(PUBLISH_ACK_TIMEOUT_MS))
        .build(client.clone());
    let streams_created = if opts.create_streams {
        ensure_streams(&js, &opts.stream_layout()).await?
    } else {
        Vec::new()
    };

    let bar = progress_bar(opts);
    let mut tally = Tally {
        published: [0; 8],
        streams: BTreeMap::new(),
        publish_errors: 0,
        publish_retries: 0,
        first_error: None,
        duplicates: 0,
    };
    let mut window: VecDeque<InFlight> = VecDeque::with_capacity(opts.inflight_max);
    let retry_window = Duration::from_millis(opts.publish_retry_ms);
    let count_max = opts.count.unwrap_or(u64::MAX);
    let duration_max = opts.duration_s.map(Duration::from_secs);
    let start = Instant::now();
    let schedule = Schedule::new(start, opts.rate_per_s);
    let mut aborted = None;
    let mut n = 0u64;
    let progress_interval = Duration::from_millis(PROGRESS_INTERVAL_MS);
    let mut progress_due = progress_interval;
    while n < count_max {
        schedule.wait_for(n).await;
        let elapsed = start.elapsed();
        if duration_max.is_some_and(|d| elapsed >= d) {
            break;
        }
        if tally.publish_errors >= opts.publish_errors_max {
            aborted = Some(format!(
                "{} publish errors (first: {})",
                tally.publish_errors,
                tally.first_error.as_deref().unwrap_or("?")
            ));
            break;
        }
        let now_ms = match opts.ts_start_ms {
            Some(t) => t + elapsed.as_millis() as i64,
            None => wall_ms(),
        };
        let m = generator.next_message(now_ms);
        let message = Outgoing {
            dt: m.data_type,
            subject: m.subject.to_string(),
            payload: Bytes::copy_from_slice(m.payload),
            msg_id: m.msg_id.to_string(),
            first_sent: Instant::now(),
            resent: false,
        };
        match send(&js, message).await {
            Ok(in_flight) => window.push_back(in_flight),
            Err(failed) => {
                if let Some(again) = tally.resend(&js, failed, retry_window).await {
                    window.push_back(again);
                }
            }
        }
        n += 1;
        while window.len() >= opts.inflight_max {
            tally.settle_oldest(&js, &mut window, retry_window).await;
        }
        if elapsed >= progress_due {
            bar.set_position(n);
            progress_due = elapsed + progress_interval;
        }
    }
    while !window.is_empty() {
        tally.settle_oldest(&js, &mut window, retry_window).await;
    }
    let elapsed = start.elapsed();
    bar.set_position(n);
    bar.finish_and_clear();
    // Flush so nothing published is left in the client's buffer when it is dropped.
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "flushing the NATS connection failed");
    }
    Ok(LoadgenSummary {
        run_id,
        published: tally.published,
        streams: tally.streams,
        streams_created,
        skipped_types: generator.skipped_types().to_vec(),
        elapsed,
        publish_errors: tally.publish_errors,
        publish_retries: tally.publish_retries,
        first_error: tally.first_error,
        duplicates: tally.duplicates,
        aborted,
        ts_last_ms: generator.ts_max_ms(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: LoadgenOptions,
    }

    #[test]
    fn command_line_defaults_equal_the_library_defaults() {
        let cli = Cli::try_parse_from(["loadgen"]).unwrap();
        assert_eq!(cli.opts, LoadgenOptions::default());
    }

    #[test]
    fn command_line_flags_reach_the_options() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "--nats-url",
            "nats://h:1",
            "--stream",
            "A=trade.>",
            "--stream",
            "B=orderbook.>,funding_rate.>",
            "--mix",
            "trade=1,orderbook=1",
            "--exchanges",
            "binance,okx",
            "--symbols",
            "BTC-USDT",
            "--rate-per-s",
            "500",
            "--count",
            "10",
            "--orderbook-depth",
            "100",
            "--run-id",
            "r7",
            "--no-progress",
        ])
        .unwrap();
        let o = cli.opts;
        assert_eq!(o.nats_url, "nats://h:1");
        assert_eq!(o.streams.len(), 2);
        assert_eq!(o.streams[1].subjects, vec!["orderbook.>", "funding_rate.>"]);
        assert_eq!(o.mix.weights, [1, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(o.exchanges, vec!["binance", "okx"]);
        assert_eq!(o.rate_per_s, 500);
        assert_eq!(o.count, Some(10));
        assert_eq!(o.orderbook_depth, 100);
        assert_eq!(o.run_id.as_deref(), Some("r7"));
        assert!(!o.progress);
    }

    #[test]
    fn a_nats_url_flag_with_credentials_is_refused() {
        let cli = Cli::try_parse_from(["loadgen", "--nats-url", "nats://a:pw@h:1"]).unwrap();
        assert!(matches!(
            cli.opts.refuse_secrets_in_flags(),
            Err(ToolError::SecretInFlag {
                flag: "--nats-url",
                ..
            })
        ));
        let cli = Cli::try_parse_from(["loadgen", "--nats-url", "nats://h:1"]).unwrap();
        cli.opts.refuse_secrets_in_flags().expect("no secret");
    }

    #[test]
    fn default_stream_layout_covers_every_data_type_exactly_once() {
        for layout in [StreamSpec::defaults(), vec![StreamSpec::single("ALL")]] {
            for dt in DataType::ALL {
                let wanted = format!("{}.>", dt.name());
                let holders = layout
                    .iter()
                    .filter(|s| s.subjects.contains(&wanted))
                    .count();
                assert_eq!(holders, 1, "{dt} in {layout:?}");
            }
        }
        let spec: StreamSpec = "X=a.>, b.>".parse().unwrap();
        assert_eq!(spec.to_string(), "X=a.>,b.>");
        assert!("X.Y=a.>".parse::<StreamSpec>().is_err());
        assert!("X=".parse::<StreamSpec>().is_err());
    }

    #[test]
    fn options_without_a_stop_condition_are_rejected() {
        let opts = LoadgenOptions::default();
        assert!(matches!(opts.validate(), Err(ToolError::Options(_))));
        let opts = LoadgenOptions {
            count: Some(1),
            ..LoadgenOptions::default()
        };
        assert!(opts.validate().is_ok());
    }
}
