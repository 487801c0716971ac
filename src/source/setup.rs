//! Declaring streams and durable pull consumers: create when missing, compare when present.
//!
//! Nothing here updates, deletes or recreates a server object. A difference between the
//! configuration and the server is a [`Drift`]: logged as a warning, returned to the caller
//! (`prism-relay check` prints it), and left for an operator to resolve, because "fixing" a
//! durable consumer by recreating it loses its position and skips the backlog.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{ConsumerCreateStrictErrorKind, StorageType};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, stream};

use super::SourceError;
use crate::config::{AckPolicyKind, ConsumerConfig, DeliverPolicyKind, StorageKind, StreamConfig};

/// Description set on the streams and consumers the relay creates, so operators can tell them
/// apart in `nats stream ls`.
const CREATED_BY: &str = "created by prism-relay";

/// One difference between the configuration and the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// Config field name, e.g. `ack_wait_ms`.
    pub field: &'static str,
    /// The configured value.
    pub configured: String,
    /// The server's value, which stays in force.
    pub server: String,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: configured {}, server has {}",
            self.field, self.configured, self.server
        )
    }
}

/// What [`ensure_streams`] or [`ensure_consumer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupAction {
    /// It was missing and has been created from the configuration.
    Created,
    /// It existed and was left as it is.
    Existed,
    /// It is missing and was not created (`prism-relay check` only looks).
    Missing,
}

/// The outcome for one `[[stream]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOutcome {
    /// Stream name.
    pub stream: String,
    /// Created or found.
    pub action: SetupAction,
    /// Differences between the configuration and the existing stream (empty when created).
    pub drift: Vec<Drift>,
}

/// The outcome for one `[[consumer]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerOutcome {
    /// Stream name.
    pub stream: String,
    /// Durable name.
    pub durable: String,
    /// Created or found.
    pub action: SetupAction,
    /// Differences between the configuration and the existing consumer (empty when created).
    pub drift: Vec<Drift>,
}

/// Creates each stream of `streams` that is missing; compares each existing one with its
/// configuration and reports the differences. Never updates or deletes a stream.
pub async fn ensure_streams(
    js: &jetstream::Context,
    streams: &[StreamConfig],
) -> Result<Vec<StreamOutcome>, SourceError> {
    setup_streams(js, streams, true).await
}

/// Like [`ensure_streams`] but changes nothing: a missing stream is reported as
/// [`SetupAction::Missing`].
pub async fn check_streams(
    js: &jetstream::Context,
    streams: &[StreamConfig],
) -> Result<Vec<StreamOutcome>, SourceError> {
    setup_streams(js, streams, false).await
}

async fn setup_streams(
    js: &jetstream::Context,
    streams: &[StreamConfig],
    create: bool,
) -> Result<Vec<StreamOutcome>, SourceError> {
    let mut outcomes = Vec::with_capacity(streams.len());
    for config in streams {
        outcomes.push(ensure_stream(js, config, create).await?);
    }
    Ok(outcomes)
}

async fn ensure_stream(
    js: &jetstream::Context,
    config: &StreamConfig,
    create: bool,
) -> Result<StreamOutcome, SourceError> {
    let name = config.name.as_str();
    let action = match stream_info(js, name).await? {
        Some(info) => {
            let drift = stream_drift(config, &info.config);
            return Ok(existed_stream(name, drift));
        }
        None if !create => {
            return Ok(StreamOutcome {
                stream: name.to_owned(),
                action: SetupAction::Missing,
                drift: Vec::new(),
            })
        }
        None => match js.create_stream(new_stream_config(config)).await {
            Ok(_) => SetupAction::Created,
            // Another relay instance created it between our lookup and our create.
            Err(err) if is_stream_name_in_use(&err) => SetupAction::Existed,
            Err(err) => {
                return Err(SourceError::CreateStream {
                    stream: name.to_owned(),
                    source: Box::new(err),
                })
            }
        },
    };
    if action == SetupAction::Created {
        tracing::info!(stream = name, subjects = ?config.subjects, "created stream");
        return Ok(StreamOutcome {
            stream: name.to_owned(),
            action,
            drift: Vec::new(),
        });
    }
    let info = stream_info(js, name)
        .await?
        .ok_or_else(|| SourceError::StreamMissing {
            stream: name.to_owned(),
        })?;
    Ok(existed_stream(name, stream_drift(config, &info.config)))
}

fn existed_stream(name: &str, drift: Vec<Drift>) -> StreamOutcome {
    for d in &drift {
        tracing::warn!(stream = name, field = d.field, configured = %d.configured, server = %d.server,
            "stream differs from its configuration; the server's value stays (streams are never altered)");
    }
    StreamOutcome {
        stream: name.to_owned(),
        action: SetupAction::Existed,
        drift,
    }
}

/// The stream's info, or `None` when it does not exist.
async fn stream_info(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Info>, SourceError> {
    match js.get_stream(name).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|err| SourceError::StreamRequest {
                    stream: name.to_owned(),
                    source: Box::new(err),
                })?;
            Ok(Some(info.clone()))
        }
        Err(err) => match err.kind() {
            GetStreamErrorKind::JetStream(js_err)
                if js_err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(SourceError::StreamRequest {
                stream: name.to_owned(),
                source: Box::new(err),
            }),
        },
    }
}

fn is_stream_name_in_use(err: &async_nats::jetstream::context::CreateStreamError) -> bool {
    matches!(err.kind(), CreateStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NAME_EXIST)
}

fn new_stream_config(config: &StreamConfig) -> stream::Config {
    stream::Config {
        name: config.name.clone(),
        subjects: config.subjects.clone(),
        storage: storage_type(config.storage),
        max_age: Duration::from_secs(config.max_age_s),
        max_bytes: config.max_bytes,
        max_messages: config.max_msgs,
        duplicate_window: Duration::from_secs(config.duplicate_window_s),
        num_replicas: config.replicas as usize,
        description: Some(CREATED_BY.to_owned()),
        ..stream::Config::default()
    }
}

fn storage_type(kind: StorageKind) -> StorageType {
    match kind {
        StorageKind::File => StorageType::File,
        StorageKind::Memory => StorageType::Memory,
    }
}

fn stream_drift(config: &StreamConfig, server: &stream::Config) -> Vec<Drift> {
    differing([
        compare(
            "subjects",
            subject_set(&config.subjects),
            subject_set(&server.subjects),
        ),
        compare(
            "storage",
            format!("{:?}", storage_type(config.storage)).to_lowercase(),
            format!("{:?}", server.storage).to_lowercase(),
        ),
        compare("max_age_s", config.max_age_s, server.max_age.as_secs()),
        compare("max_bytes", config.max_bytes, server.max_bytes),
        compare("max_msgs", config.max_msgs, server.max_messages),
        compare(
            "duplicate_window_s",
            config.duplicate_window_s,
            server.duplicate_window.as_secs(),
        ),
        compare("replicas", config.replicas, server.num_replicas),
    ])
}

/// One field's configured and server values, in the text form drift reports them in.
fn compare(field: &'static str, configured: impl ToString, server: impl ToString) -> Drift {
    Drift {
        field,
        configured: configured.to_string(),
        server: server.to_string(),
    }
}

/// The compared fields whose two values differ, in the order given.
fn differing(fields: impl IntoIterator<Item = Drift>) -> Vec<Drift> {
    fields
        .into_iter()
        .filter(|d| d.configured != d.server)
        .collect()
}

/// Subjects as a sorted, deduplicated list, so that order does not count as drift.
fn subject_set<S: AsRef<str>>(subjects: &[S]) -> String {
    let set: BTreeSet<&str> = subjects.iter().map(AsRef::as_ref).collect();
    format!("{set:?}")
}

/// Creates the durable pull consumer of `config` when it is missing; when it exists, compares
/// ack wait, deliver policy, filter subjects, max ack pending, max deliver and ack policy, and
/// reports each difference. Never updates, deletes or recreates a durable.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    config: &ConsumerConfig,
) -> Result<ConsumerOutcome, SourceError> {
    setup_consumer(js, config, true).await
}

/// Like [`ensure_consumer`] but changes nothing: a missing durable is reported as
/// [`SetupAction::Missing`].
pub async fn check_consumer(
    js: &jetstream::Context,
    config: &ConsumerConfig,
) -> Result<ConsumerOutcome, SourceError> {
    setup_consumer(js, config, false).await
}

async fn setup_consumer(
    js: &jetstream::Context,
    config: &ConsumerConfig,
    create: bool,
) -> Result<ConsumerOutcome, SourceError> {
    let stream =
        js.get_stream_no_info(&config.stream)
            .await
            .map_err(|err| SourceError::StreamRequest {
                stream: config.stream.clone(),
                source: Box::new(err),
            })?;

    let existing = consumer_info(&stream, config).await?;
    let info = match existing {
        Some(info) => info,
        None if !create => return Ok(consumer_outcome(config, SetupAction::Missing, Vec::new())),
        None => match stream
            .create_consumer_strict(new_consumer_config(config))
            .await
        {
            Ok(_) => {
                tracing::info!(stream = %config.stream, durable = %config.durable,
                    filter_subjects = ?config.filter_subjects, "created durable pull consumer");
                return Ok(consumer_outcome(config, SetupAction::Created, Vec::new()));
            }
            // Another relay instance created it between our lookup and our create.
            Err(err) if err.kind() == ConsumerCreateStrictErrorKind::AlreadyExists => {
                consumer_info(&stream, config).await?.ok_or_else(|| {
                    SourceError::ConsumerMissing {
                        stream: config.stream.clone(),
                        durable: config.durable.clone(),
                    }
                })?
            }
            Err(err) => {
                return Err(match err.kind() {
                    ConsumerCreateStrictErrorKind::JetStream(e)
                        if e.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                    {
                        SourceError::StreamMissing {
                            stream: config.stream.clone(),
                        }
                    }
                    _ => SourceError::CreateConsumer {
                        stream: config.stream.clone(),
                        durable: config.durable.clone(),
                        source: Box::new(err),
                    },
                })
            }
        },
    };

    check_usable(config, &info.config)?;
    let drift = consumer_drift(config, &info.config);
    for d in &drift {
        tracing::warn!(stream = %config.stream, durable = %config.durable, field = d.field,
            configured = %d.configured, server = %d.server,
            "consumer differs from its configuration; the server's value stays (durables are never recreated)");
    }
    Ok(consumer_outcome(config, SetupAction::Existed, drift))
}

fn consumer_outcome(
    config: &ConsumerConfig,
    action: SetupAction,
    drift: Vec<Drift>,
) -> ConsumerOutcome {
    ConsumerOutcome {
        stream: config.stream.clone(),
        durable: config.durable.clone(),
        action,
        drift,
    }
}

/// The consumer's info, or `None` when it does not exist.
pub(super) async fn consumer_info<I>(
    stream: &stream::Stream<I>,
    config: &ConsumerConfig,
) -> Result<Option<consumer::Info>, SourceError> {
    use async_nats::jetstream::context::ConsumerInfoErrorKind as Kind;
    match stream.consumer_info(&config.durable).await {
        Ok(info) => Ok(Some(info)),
        Err(err) => match err.kind() {
            Kind::NotFound => Ok(None),
            Kind::StreamNotFound => Err(SourceError::StreamMissing {
                stream: config.stream.clone(),
            }),
            _ => Err(SourceError::ConsumerRequest {
                stream: config.stream.clone(),
                durable: config.durable.clone(),
                source: Box::new(err),
            }),
        },
    }
}

/// Rejects an existing durable the relay cannot use safely.
pub(super) fn check_usable(
    config: &ConsumerConfig,
    server: &consumer::Config,
) -> Result<(), SourceError> {
    if server.deliver_subject.is_some() {
        return Err(SourceError::NotPull {
            stream: config.stream.clone(),
            durable: config.durable.clone(),
        });
    }
    if server_ack_policy(server.ack_policy).is_none() {
        return Err(SourceError::UnsupportedAckPolicy {
            stream: config.stream.clone(),
            durable: config.durable.clone(),
            policy: describe_ack_policy(server.ack_policy),
        });
    }
    Ok(())
}

fn new_consumer_config(config: &ConsumerConfig) -> pull::Config {
    // One filter goes in `filter_subject`, which every server version understands.
    let (filter_subject, filter_subjects) = match config.filter_subjects.as_slice() {
        [one] => (one.clone(), Vec::new()),
        many => (String::new(), many.to_vec()),
    };
    pull::Config {
        durable_name: Some(config.durable.clone()),
        description: Some(CREATED_BY.to_owned()),
        deliver_policy: deliver_policy(config),
        ack_policy: ack_policy(config.ack_policy),
        ack_wait: Duration::from_millis(config.ack_wait_ms),
        max_deliver: config.max_deliver,
        max_ack_pending: config.max_ack_pending,
        filter_subject,
        filter_subjects,
        ..pull::Config::default()
    }
}

fn deliver_policy(config: &ConsumerConfig) -> DeliverPolicy {
    match config.deliver_policy {
        DeliverPolicyKind::All => DeliverPolicy::All,
        DeliverPolicyKind::New => DeliverPolicy::New,
        DeliverPolicyKind::Last => DeliverPolicy::Last,
        DeliverPolicyKind::ByStartSequence => DeliverPolicy::ByStartSequence {
            // Validation requires start_sequence with this policy; 1 is the stream's start.
            start_sequence: config.start_sequence.unwrap_or(1),
        },
    }
}

fn ack_policy(kind: AckPolicyKind) -> AckPolicy {
    match kind {
        AckPolicyKind::Explicit => AckPolicy::Explicit,
        AckPolicyKind::All => AckPolicy::All,
    }
}

/// The server's ack policy as the relay's kind; `None` for the policies the relay cannot use
/// (`none`, and the server-managed `flow_control` of sourcing consumers).
pub(super) fn server_ack_policy(policy: AckPolicy) -> Option<AckPolicyKind> {
    match policy {
        AckPolicy::Explicit => Some(AckPolicyKind::Explicit),
        AckPolicy::All => Some(AckPolicyKind::All),
        _ => None,
    }
}

fn consumer_drift(config: &ConsumerConfig, server: &consumer::Config) -> Vec<Drift> {
    let mut server_filters: Vec<&str> = server.filter_subjects.iter().map(String::as_str).collect();
    if !server.filter_subject.is_empty() {
        server_filters.push(&server.filter_subject);
    }
    differing([
        compare(
            "ack_wait_ms",
            config.ack_wait_ms,
            server.ack_wait.as_millis(),
        ),
        compare(
            "deliver_policy",
            describe_deliver_policy(&deliver_policy(config)),
            describe_deliver_policy(&server.deliver_policy),
        ),
        compare(
            "filter_subjects",
            subject_set(&config.filter_subjects),
            subject_set(&server_filters),
        ),
        compare(
            "max_ack_pending",
            config.max_ack_pending,
            server.max_ack_pending,
        ),
        compare("max_deliver", config.max_deliver, server.max_deliver),
        compare(
            "ack_policy",
            describe_ack_policy(ack_policy(config.ack_policy)),
            describe_ack_policy(server.ack_policy),
        ),
    ])
}

fn describe_deliver_policy(policy: &DeliverPolicy) -> String {
    match policy {
        DeliverPolicy::All => "all".to_owned(),
        DeliverPolicy::New => "new".to_owned(),
        DeliverPolicy::Last => "last".to_owned(),
        DeliverPolicy::LastPerSubject => "last_per_subject".to_owned(),
        DeliverPolicy::ByStartSequence { start_sequence } => {
            format!("by_start_sequence({start_sequence})")
        }
        DeliverPolicy::ByStartTime { start_time } => format!("by_start_time({start_time})"),
    }
}

fn describe_ack_policy(policy: AckPolicy) -> String {
    match policy {
        AckPolicy::Explicit => "explicit",
        AckPolicy::All => "all",
        AckPolicy::None => "none",
        _ => return format!("{policy:?}").to_lowercase(),
    }
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_config_of(config: &ConsumerConfig) -> consumer::Config {
        let pull = new_consumer_config(config);
        consumer::IntoConsumerConfig::into_consumer_config(pull)
    }

    #[test]
    fn a_consumer_created_from_its_config_has_no_drift() {
        for filters in [
            vec![],
            vec!["trade.>".to_owned()],
            vec!["a.>".into(), "b.>".into()],
        ] {
            let config = ConsumerConfig {
                filter_subjects: filters,
                ..ConsumerConfig::default()
            };
            assert_eq!(consumer_drift(&config, &server_config_of(&config)), vec![]);
        }
    }

    #[test]
    fn every_compared_consumer_field_reports_its_drift() {
        let config = ConsumerConfig::default();
        let mut server = server_config_of(&config);
        server.ack_wait = Duration::from_secs(5);
        server.deliver_policy = DeliverPolicy::Last;
        server.filter_subject = "trade.>".into();
        server.max_ack_pending = 1000;
        server.max_deliver = 3;
        server.ack_policy = AckPolicy::All;
        let drift = consumer_drift(&config, &server);
        let fields: Vec<&str> = drift.iter().map(|d| d.field).collect();
        assert_eq!(
            fields,
            [
                "ack_wait_ms",
                "deliver_policy",
                "filter_subjects",
                "max_ack_pending",
                "max_deliver",
                "ack_policy"
            ]
        );
        assert_eq!(drift[0].configured, "30000");
        assert_eq!(drift[0].server, "5000");
        assert_eq!(
            drift[4].to_string(),
            "max_deliver: configured -1, server has 3"
        );
    }

    #[test]
    fn filter_subject_order_is_not_drift() {
        let config = ConsumerConfig {
            filter_subjects: vec!["b.>".into(), "a.>".into()],
            ..ConsumerConfig::default()
        };
        let mut server = server_config_of(&config);
        server.filter_subjects = vec!["a.>".into(), "b.>".into()];
        assert_eq!(consumer_drift(&config, &server), vec![]);
    }

    #[test]
    fn a_push_or_ack_none_durable_is_refused() {
        let config = ConsumerConfig::default();
        let mut server = server_config_of(&config);
        server.deliver_subject = Some("deliver.here".into());
        assert!(matches!(
            check_usable(&config, &server),
            Err(SourceError::NotPull { .. })
        ));
        let mut server = server_config_of(&config);
        server.ack_policy = AckPolicy::None;
        assert!(matches!(
            check_usable(&config, &server),
            Err(SourceError::UnsupportedAckPolicy { .. })
        ));
    }

    #[test]
    fn a_stream_created_from_its_config_has_no_drift_and_changes_are_reported() {
        let config = StreamConfig {
            name: "MARKET_TRADES".into(),
            subjects: vec!["trade.>".into()],
            ..StreamConfig::default()
        };
        let mut server = new_stream_config(&config);
        assert_eq!(stream_drift(&config, &server), vec![]);
        server.subjects = vec!["trade.binance.>".into()];
        server.max_age = Duration::from_secs(60);
        server.storage = StorageType::Memory;
        let fields: Vec<&str> = stream_drift(&config, &server)
            .iter()
            .map(|d| d.field)
            .collect();
        assert_eq!(fields, ["subjects", "storage", "max_age_s"]);
    }
}
