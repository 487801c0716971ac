//! One lane's batch under construction: the rows decoded from a contiguous WAL range.
//!
//! A batch is identified by its WAL range and a fingerprint of the message identities in it;
//! both go into the ClickHouse deduplication token, so a batch retried after an error or
//! re-cut after a crash (from the ledger's in-flight entry) carries the same token and the
//! same rows in the same order (invariant 7).

use std::time::Instant;

use prism_wal::{Envelope, Lsn};

use crate::codec::rows::{
    FundingRateRow, LiquidationRow, LsrAllAccountRow, LsrTopPositionRow, OpenInterestRow,
    OrderbookRow, TradeRow, VolatilityIndexRow,
};
use crate::codec::{self, Row, Table, TimeWindow};
use crate::sink::{DeadLetter, InsertError, IsolateOutcome, Sink};

use super::route::Route;
use crate::metrics::{DeadReason, RowLabels, UNROUTED_DATA_TYPE};

macro_rules! typed_rows {
    ($($variant:ident($row:ty) => $table:ident),* $(,)?) => {
        /// Rows of one typed table, held as the concrete row type so the sink encodes them
        /// as RowBinary straight from the vector.
        #[derive(Debug, Default)]
        pub enum TypedRows {
            /// No row yet.
            #[default]
            Empty,
            $(
                #[doc = concat!("Rows of `", stringify!($table), "`.")]
                $variant(Vec<$row>),
            )*
        }

        impl TypedRows {
            /// Adds a row; a row of another table than the rows already held is handed back.
            fn push(&mut self, row: Row) -> Result<(), Box<Row>> {
                match (self, row) {
                    $(
                        (rows @ TypedRows::Empty, Row::$variant(row)) => {
                            *rows = TypedRows::$variant(vec![row]);
                            Ok(())
                        }
                        (TypedRows::$variant(rows), Row::$variant(row)) => {
                            rows.push(row);
                            Ok(())
                        }
                    )*
                    (_, row) => Err(Box::new(row)),
                }
            }

            /// The rows at `indices` (ascending), copied: what is inserted again when the server
            /// dropped a retried insert that it never stored.
            fn subset(&self, indices: &[usize]) -> TypedRows {
                match self {
                    TypedRows::Empty => TypedRows::Empty,
                    $(
                        TypedRows::$variant(rows) => TypedRows::$variant(
                            indices.iter().filter_map(|&i| rows.get(i).cloned()).collect(),
                        ),
                    )*
                }
            }

            /// The row time (`timestamp`, epoch milliseconds) of the row at `index`.
            fn timestamp_ms(&self, index: usize) -> Option<i64> {
                match self {
                    TypedRows::Empty => None,
                    $(
                        TypedRows::$variant(rows) => rows.get(index).map(|row| row.timestamp),
                    )*
                }
            }

            /// Inserts the rows, isolating the ones ClickHouse rejects for their content; a batch
            /// spanning too many months for one insert goes in one month at a time.
            pub async fn insert(&self, sink: &Sink, token: &str) -> Result<IsolateOutcome, InsertError> {
                match self {
                    TypedRows::Empty => Ok(IsolateOutcome::default()),
                    $(
                        TypedRows::$variant(rows) => {
                            // Every typed table is partitioned by the UTC month of `timestamp`.
                            sink.insert_partitioned(Table::$table.name(), rows, Some(token), |row| {
                                codec::month_utc(row.timestamp)
                            })
                            .await
                        }
                    )*
                }
            }
        }
    };
}

typed_rows! {
    Trade(TradeRow) => Trades,
    Orderbook(OrderbookRow) => Orderbooks,
    FundingRate(FundingRateRow) => FundingRates,
    OpenInterest(OpenInterestRow) => OpenInterests,
    Liquidation(LiquidationRow) => Liquidations,
    LsrTopPosition(LsrTopPositionRow) => LsrTopPositions,
    LsrAllAccount(LsrAllAccountRow) => LsrAllAccounts,
    VolatilityIndex(VolatilityIndexRow) => VolatilityIndices,
}

/// How a lane's records become rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsKind {
    /// Decoded by a typed codec into RowBinary rows.
    Typed,
    /// Passed through as JSONEachRow lines.
    Json,
    /// Not inserted: every record becomes a dead letter (the unrouted lane).
    DeadLettersOnly,
}

impl RowsKind {
    /// The kind of a lane, by its name: a typed table, the unrouted lane, or a passthrough table.
    pub fn for_lane(lane: &str) -> RowsKind {
        if Table::from_name(lane).is_some() {
            RowsKind::Typed
        } else if lane == super::route::UNROUTED_LANE {
            RowsKind::DeadLettersOnly
        } else {
            RowsKind::Json
        }
    }
}

impl From<Route<'_>> for RowsKind {
    fn from(route: Route<'_>) -> RowsKind {
        match route {
            Route::Typed(_) => RowsKind::Typed,
            Route::Passthrough(_) => RowsKind::Json,
            Route::Unrouted => RowsKind::DeadLettersOnly,
        }
    }
}

/// What a lane inserts: typed rows for one table, JSON lines, or nothing but dead letters.
#[derive(Debug)]
pub enum Rows {
    /// Rows of one typed MarketPrism table.
    Typed(TypedRows),
    /// JSON objects for a passthrough table, each on its own line of `body`.
    Json {
        /// The objects, one per line.
        body: Vec<u8>,
        /// Where each line starts in `body`.
        starts: Vec<usize>,
    },
    /// The unrouted lane: every record becomes a dead letter.
    None,
}

impl Rows {
    /// The rows at `indices` (ascending), copied in that order.
    pub fn subset(&self, indices: &[usize]) -> Rows {
        match self {
            Rows::Typed(rows) => Rows::Typed(rows.subset(indices)),
            Rows::Json { body, starts } => {
                let (mut picked, mut picked_starts) = (Vec::new(), Vec::new());
                for &i in indices {
                    let Some(start) = starts.get(i) else { continue };
                    // Each line ends with its newline, the last one included.
                    let end = starts.get(i + 1).copied().unwrap_or(body.len());
                    picked_starts.push(picked.len());
                    picked.extend_from_slice(&body[*start..end]);
                }
                Rows::Json {
                    body: picked,
                    starts: picked_starts,
                }
            }
            Rows::None => Rows::None,
        }
    }

    /// The row time (epoch milliseconds) of the typed row at `index`; none for other rows.
    pub fn timestamp_ms(&self, index: usize) -> Option<i64> {
        match self {
            Rows::Typed(rows) => rows.timestamp_ms(index),
            Rows::Json { .. } | Rows::None => None,
        }
    }

    /// Inserts the rows into `table`, isolating the ones ClickHouse rejects for their content.
    pub async fn insert(
        &self,
        sink: &Sink,
        table: &str,
        token: &str,
    ) -> Result<IsolateOutcome, InsertError> {
        match self {
            Rows::Typed(rows) => rows.insert(sink, token).await,
            Rows::Json { body, starts } => {
                let lines: Vec<&[u8]> = starts
                    .iter()
                    .enumerate()
                    .map(|(i, start)| {
                        let end = starts.get(i + 1).map_or(body.len(), |next| next - 1);
                        &body[*start..end]
                    })
                    .collect();
                sink.insert_json_isolating(table, &lines, Some(token)).await
            }
            Rows::None => Ok(IsolateOutcome::default()),
        }
    }
}

/// Limits that cut a batch; the age limit is checked by the lane loop ([`flush_due`]).
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Cut when the batch holds this many rows.
    pub rows_max: usize,
    /// Cut when the payload bytes of the batch reach this.
    pub bytes_max: usize,
    /// Cut when the oldest record has waited this long.
    pub age_max: std::time::Duration,
}

/// The start of the clock the lanes' flush instants are counted on ([`flush_due`]), shared by
/// every lane of the process.
static FLUSH_EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// When a batch opened at `opened` goes for its age: the last multiple of half of `age_max`, on a
/// clock every lane shares, at or before `opened + age_max`. The batch is then between half its
/// age limit and its age limit old, never older. Under steady traffic each lane's next batch opens
/// as its last one goes, so the lanes flush at the same instants (two phases at most) and their
/// ledger commits are written together ([`super::LedgerKeeper`] groups them), where lanes on
/// their own schedules cost two ledger writes each per interval.
pub fn flush_due(opened: Instant, age_max: std::time::Duration) -> Instant {
    flush_due_on(*FLUSH_EPOCH.get_or_init(|| opened), opened, age_max)
}

/// [`flush_due`] on the clock that started at `epoch`.
fn flush_due_on(epoch: Instant, opened: Instant, age_max: std::time::Duration) -> Instant {
    let latest = opened + age_max;
    let step = age_max.as_nanos() / 2;
    if step == 0 {
        return latest;
    }
    let into_step = latest.saturating_duration_since(epoch).as_nanos() % step;
    latest - std::time::Duration::from_nanos(u64::try_from(into_step).unwrap_or(0))
}

/// A batch being filled from the WAL.
#[derive(Debug)]
pub struct Batch {
    /// Lane (table) name; part of the token.
    lane: String,
    /// WAL position of the first record in the batch.
    first: Option<Lsn>,
    /// WAL position of the last record in the batch.
    last: Lsn,
    /// The decoded rows.
    pub rows: Rows,
    /// WAL position of each row (typed or JSON line), to dead-letter rows ClickHouse rejects.
    pub row_lsns: Vec<Lsn>,
    /// The row labels (data type, exchange, market type) of each row, by index into `labels`.
    pub row_labels: Vec<u16>,
    /// Distinct labels seen in this batch.
    pub labels: Vec<RowLabels>,
    /// Records that did not decode, with their reason.
    pub dead: Vec<DeadLetter>,
    /// The reason class and data type label of each of `dead`, for the metrics.
    pub dead_classes: Vec<(DeadReason, String)>,
    /// Payload bytes pushed, for the byte limit.
    bytes: usize,
    /// Publish time (unix ns) of the oldest record pushed, for the drain lag.
    oldest_published_ns: Option<i64>,
    /// When the first record arrived, for the age limit.
    opened_at: Option<Instant>,
    /// FNV-1a over the identities pushed, for the token.
    fingerprint: u64,
    /// Plausible row times: a typed row outside it is a dead letter.
    window: TimeWindow,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

impl Batch {
    /// An empty batch for a lane whose rows are of the given kind.
    pub fn new(lane: &str, kind: RowsKind, window: TimeWindow) -> Batch {
        let rows = match kind {
            RowsKind::Typed => Rows::Typed(TypedRows::Empty),
            RowsKind::Json => Rows::Json {
                body: Vec::new(),
                starts: Vec::new(),
            },
            RowsKind::DeadLettersOnly => Rows::None,
        };
        Batch {
            lane: lane.to_string(),
            first: None,
            last: Lsn(0),
            rows,
            row_lsns: Vec::new(),
            row_labels: Vec::new(),
            labels: Vec::new(),
            dead: Vec::new(),
            dead_classes: Vec::new(),
            bytes: 0,
            oldest_published_ns: None,
            opened_at: None,
            fingerprint: FNV_OFFSET,
            window,
        }
    }

    /// Number of records in the batch (rows plus dead letters).
    pub fn len(&self) -> usize {
        self.row_lsns.len() + self.dead.len()
    }

    /// True when nothing has been pushed.
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// First WAL position in the batch, if any.
    pub fn first(&self) -> Option<Lsn> {
        self.first
    }

    /// Last WAL position in the batch (meaningful when not empty).
    pub fn last(&self) -> Lsn {
        self.last
    }

    /// When the first record arrived.
    pub fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }

    /// True when a row or byte limit is reached.
    pub fn is_full(&self, limits: &BatchLimits) -> bool {
        self.row_lsns.len() + self.dead.len() >= limits.rows_max || self.bytes >= limits.bytes_max
    }

    /// Decodes one record of this lane and adds it as a row, or as a dead letter when it does not decode.
    pub fn push(&mut self, lsn: Lsn, envelope: &Envelope<'_>, now_ms: i64) {
        debug_assert!(
            self.first.is_none() || lsn > self.last,
            "records arrive in WAL order"
        );
        if self.first.is_none() {
            self.first = Some(lsn);
            self.opened_at = Some(Instant::now());
        }
        self.last = lsn;
        self.bytes += envelope.payload.len();
        self.oldest_published_ns = Some(
            self.oldest_published_ns
                .map_or(envelope.published_ns, |t| t.min(envelope.published_ns)),
        );
        self.fingerprint = fnv(self.fingerprint, envelope.stream.as_bytes());
        self.fingerprint = fnv(self.fingerprint, &envelope.stream_seq.0.to_le_bytes());

        let outcome = match &mut self.rows {
            Rows::Typed(rows) => codec::decode(
                &envelope.subject,
                &envelope.payload,
                &envelope.stream,
                envelope.stream_seq.0,
            )
            .map_err(|error| (DeadReason::undecodable, error.to_string()))
            .and_then(|row| {
                self.window
                    .check(&row, envelope.published_ns)
                    .map_err(|error| (DeadReason::timestamp, error.to_string()))?;
                Ok(row)
            })
            .and_then(|row| {
                rows.push(row).map_err(|row| {
                    (
                        DeadReason::undecodable,
                        format!("row of table {} does not belong to lane {}", row.table().name(), self.lane),
                    )
                })
            }),
            Rows::Json { body, starts } => push_passthrough_line(body, starts, envelope)
                .map_err(|reason| (DeadReason::undecodable, reason)),
            Rows::None => Err((
                DeadReason::unrouted,
                format!(
                    "no route for subject {:?}: no typed codec and no [[drain.passthrough]] entry for its first token",
                    envelope.subject
                ),
            )),
        };
        match outcome {
            Ok(()) => {
                self.row_lsns.push(lsn);
                let label = self.label_index(&envelope.subject);
                self.row_labels.push(label);
            }
            Err((class, reason)) => {
                let class = dead_reason_class(envelope).unwrap_or(class);
                self.dead_classes
                    .push((class, dead_letter_data_type(&self.lane, &envelope.subject)));
                self.dead
                    .push(dead_letter(&self.lane, envelope, lsn, reason, now_ms));
            }
        }
    }

    /// Payload bytes pushed so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Publish time (unix ns) of the oldest record pushed, if any.
    pub fn oldest_published_ns(&self) -> Option<i64> {
        self.oldest_published_ns
    }

    /// Index of the subject's labels in `labels`, adding them when new. A batch holds a handful of
    /// markets, so a linear search beats hashing and allocates only for a new market.
    fn label_index(&mut self, subject: &str) -> u16 {
        let (data_type, exchange, market_type) = subject_labels(subject);
        let found = self.labels.iter().position(|l| {
            l.data_type == data_type && l.exchange == exchange && l.market_type == market_type
        });
        let index = found.unwrap_or_else(|| {
            self.labels.push(RowLabels {
                data_type: data_type.to_string(),
                exchange: exchange.to_string(),
                market_type: market_type.to_string(),
            });
            self.labels.len() - 1
        });
        u16::try_from(index).unwrap_or(u16::MAX)
    }

    /// Row counts per label, leaving out the rows at `skip` (sorted indices of rejected rows).
    pub fn label_counts(&self, skip: &[usize]) -> Vec<(&RowLabels, u64)> {
        let mut counts = vec![0u64; self.labels.len()];
        let mut skip = skip.iter().peekable();
        for (index, label) in self.row_labels.iter().enumerate() {
            if skip.next_if(|s| **s == index).is_some() {
                continue;
            }
            if let Some(count) = counts.get_mut(usize::from(*label)) {
                *count += 1;
            }
        }
        self.labels
            .iter()
            .zip(counts)
            .filter(|(_, c)| *c > 0)
            .collect()
    }

    /// The deduplication token: lane, WAL range, record count and identity fingerprint.
    ///
    /// The fingerprint makes the token unique even if a WAL directory were wiped and LSNs
    /// started again: only a batch of the very same messages can carry the same token.
    pub fn token(&self) -> String {
        format!(
            "{}:{}-{}:{}:{:016x}",
            self.lane,
            self.first.unwrap_or(Lsn(0)).0,
            self.last.0,
            self.len(),
            self.fingerprint
        )
    }
}

/// The fields the relay adds to every passthrough row, in this order: the message identity
/// (`nats_stream`, `nats_seq`), its JetStream publish time in unix milliseconds
/// (`published_ms`), and the payload itself as a string (`payload`).
///
/// The relay's fields win: a payload field of the same name is left out of the row's top level
/// (it stays inside `payload`), so a payload can never forge or break a row's identity.
pub const PASSTHROUGH_RELAY_FIELDS: [&str; 4] =
    ["nats_stream", "nats_seq", "published_ms", "payload"];

/// A passthrough payload's top-level fields in their order, each value as its exact JSON text
/// (numbers are never re-printed, so decimals keep every digit).
struct PayloadFields<'a>(Vec<(String, &'a serde_json::value::RawValue)>);

impl<'de> serde::Deserialize<'de> for PayloadFields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = PayloadFields<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("one JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::new();
                while let Some(entry) =
                    map.next_entry::<String, &'de serde_json::value::RawValue>()?
                {
                    fields.push(entry);
                }
                Ok(PayloadFields(fields))
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// Appends a passthrough record as one JSONEachRow line: the relay's fields (see
/// [`PASSTHROUGH_RELAY_FIELDS`]) followed by the payload's own top-level fields. A payload that is
/// not exactly one JSON object is refused with the reason, for the dead letters.
fn push_passthrough_line(
    body: &mut Vec<u8>,
    starts: &mut Vec<usize>,
    envelope: &Envelope<'_>,
) -> Result<(), String> {
    let text = std::str::from_utf8(&envelope.payload)
        .map_err(|e| format!("passthrough payload is not UTF-8: {e}"))?;
    let fields = serde_json::from_str::<PayloadFields<'_>>(text)
        .map_err(|e| format!("passthrough payload is not one JSON object: {e}"))?;
    let start = body.len();
    let json_string = |body: &mut Vec<u8>, value: &str| {
        // Serializing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *body, value);
    };
    body.extend_from_slice(b"{\"nats_stream\":");
    json_string(body, &envelope.stream);
    body.extend_from_slice(
        format!(
            ",\"nats_seq\":{},\"published_ms\":{},\"payload\":",
            envelope.stream_seq.0,
            envelope.published_ns.div_euclid(NANOS_PER_MILLI)
        )
        .as_bytes(),
    );
    json_string(body, text.trim());
    for (name, value) in &fields.0 {
        if PASSTHROUGH_RELAY_FIELDS.contains(&name.as_str()) {
            continue;
        }
        body.push(b',');
        json_string(body, name);
        body.push(b':');
        // A value may span lines (whitespace between its tokens); raw newlines cannot occur
        // inside JSON strings, so replacing them keeps the row on one line without changing it.
        body.extend(
            value
                .get()
                .bytes()
                .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
        );
    }
    body.extend_from_slice(b"}\n");
    starts.push(start);
    Ok(())
}

/// Nanoseconds in a millisecond, to turn a JetStream publish time into the tables' unit.
const NANOS_PER_MILLI: i64 = 1_000_000;

/// A dead-letter row for the record at `lsn` of `lane`. A dead-letter record (written by ingest
/// in place of a message the WAL could not take) keeps the reason it carries, verbatim.
pub fn dead_letter(
    lane: &str,
    envelope: &Envelope<'_>,
    lsn: Lsn,
    reason: String,
    now_ms: i64,
) -> DeadLetter {
    let reason = match super::route::dead_letter_reason(envelope) {
        Some(carried) => carried.to_owned(),
        None => reason,
    };
    // A record no route claims was meant for no table: its `table` is empty, not the lane's
    // internal name.
    let table = if lane == super::route::UNROUTED_LANE {
        ""
    } else {
        lane
    };
    DeadLetter {
        failed_at: now_ms,
        published_at: envelope.published_ns.div_euclid(NANOS_PER_MILLI),
        table: table.to_string(),
        subject: envelope.subject.to_string(),
        nats_stream: envelope.stream.to_string(),
        nats_seq: envelope.stream_seq.0,
        error: reason,
        payload: envelope.payload.to_vec(),
        wal_lsn: lsn.0,
    }
}

/// The reason class of a dead-letter record (one ingest or the source's rescue wrote in place of
/// a message), or `None` for an ordinary record. A rescued delivery carries its raw subject.
fn dead_reason_class(envelope: &Envelope<'_>) -> Option<DeadReason> {
    super::route::dead_letter_reason(envelope)?;
    let rescued = envelope.header(crate::source::RAW_SUBJECT_HEADER).is_some();
    Some(if rescued {
        DeadReason::invalid_subject
    } else {
        DeadReason::oversized
    })
}

/// The `data_type` label of a dead letter of `lane`: the subject's first token, which routing
/// bounds for a routed lane; a fixed value for the unrouted lane, whose first tokens are whatever
/// publishers send.
pub fn dead_letter_data_type(lane: &str, subject: &str) -> String {
    if lane == super::route::UNROUTED_LANE {
        UNROUTED_DATA_TYPE.to_owned()
    } else {
        subject_labels(subject).0.to_owned()
    }
}

/// Labels of a subject `{data_type}.{exchange}.{market_type}.{symbol}`; missing tokens are empty.
fn subject_labels(subject: &str) -> (&str, &str, &str) {
    let mut tokens = subject.split('.');
    let data_type = tokens.next().unwrap_or_default();
    let exchange = tokens.next().unwrap_or_default();
    let market_type = tokens.next().unwrap_or_default();
    (data_type, exchange, market_type)
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::Duration;

    use prism_wal::{Envelope, Lsn, StreamSeq};

    use super::{flush_due_on, Batch, Instant, Rows, RowsKind, TimeWindow};

    #[test]
    fn lanes_under_steady_traffic_flush_together_and_no_batch_outlives_its_age_limit() {
        let epoch = Instant::now();
        let age = Duration::from_millis(1_000);
        let at = |ms: u64| epoch + Duration::from_millis(ms);
        // Batches opened anywhere in the first half of a step go together at the step's end...
        for opened_ms in [10, 137, 499] {
            assert_eq!(flush_due_on(epoch, at(opened_ms), age), at(1_000));
        }
        // ... and those opened in the second half half a step later.
        for opened_ms in [500, 733, 999] {
            assert_eq!(flush_due_on(epoch, at(opened_ms), age), at(1_500));
        }
        // A lane's next batch opens as its last one goes: it stays on the shared instants.
        assert_eq!(flush_due_on(epoch, at(1_000), age), at(2_000));
        // Whenever it opened, a batch goes between half its age limit and its age limit old.
        for opened_ms in (0..5_000).step_by(7) {
            let due = flush_due_on(epoch, at(opened_ms), age);
            let waited = due - at(opened_ms);
            assert!(
                waited > age / 2 && waited <= age,
                "{opened_ms} ms: {waited:?}"
            );
        }
        // A batch opened before the clock started, or with no age limit, keeps its own limit.
        assert_eq!(flush_due_on(at(5_000), at(100), age), at(1_100));
        assert_eq!(flush_due_on(epoch, at(123), Duration::ZERO), at(123));
    }

    fn envelope(seq: u64, payload: &[u8]) -> Envelope<'_> {
        Envelope {
            stream: Cow::Borrowed("MARKET_TICKERS"),
            stream_seq: StreamSeq(seq),
            subject: Cow::Borrowed("ticker.okx.spot.BTC-USDT"),
            headers: Vec::new(),
            published_ns: 1_761_714_312_456_789_000,
            payload: Cow::Borrowed(payload),
        }
    }

    fn body(batch: &Batch) -> String {
        match &batch.rows {
            Rows::Json { body, .. } => String::from_utf8(body.clone()).expect("UTF-8"),
            other => panic!("not JSON rows: {other:?}"),
        }
    }

    #[test]
    fn a_passthrough_row_carries_the_identity_publish_time_and_payload_and_the_relays_fields_win() {
        let mut batch = Batch::new("tickers", RowsKind::Json, TimeWindow::default());
        let payload =
            b"{\"last\": 0.1000000000000000055,\n \"nats_seq\": 0, \"nested\": {\n\"a\": [1]}}";
        batch.push(Lsn(5), &envelope(42, payload), 0);
        let line = body(&batch);
        assert_eq!(line.matches('\n').count(), 1, "one line: {line:?}");
        let row: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&line).expect("one JSON object");
        assert_eq!(row["nats_stream"], "MARKET_TICKERS");
        assert_eq!(row["nats_seq"], 42);
        assert_eq!(row["published_ms"], 1_761_714_312_456_i64);
        assert_eq!(
            row["payload"].as_str().map(str::as_bytes),
            Some(&payload[..])
        );
        assert!(
            line.contains("\"last\":0.1000000000000000055"),
            "exact number text: {line}"
        );
        assert_eq!(line.matches("\"nats_seq\"").count(), 1, "{line}");
        assert_eq!(row["nested"]["a"][0], 1);
        assert!(batch.dead.is_empty());
    }

    #[test]
    fn a_passthrough_payload_that_is_not_one_object_is_a_dead_letter_with_the_reason() {
        let mut batch = Batch::new("tickers", RowsKind::Json, TimeWindow::default());
        for (seq, payload) in [
            (1, &b"[1, 2]"[..]),
            (2, b"{\"a\":1}{\"a\":2}"),
            (3, b"not json \xff"),
            (4, b"{\"ok\":true}"),
        ] {
            batch.push(Lsn(seq), &envelope(seq, payload), 0);
        }
        assert_eq!(batch.row_lsns, vec![Lsn(4)]);
        let reasons: Vec<&str> = batch.dead.iter().map(|d| d.error.as_str()).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(
            reasons[0].starts_with("passthrough payload is not one JSON object"),
            "{reasons:?}"
        );
        assert!(
            reasons[2].starts_with("passthrough payload is not UTF-8"),
            "{reasons:?}"
        );
        assert_eq!(body(&batch).lines().count(), 1);
    }

    #[test]
    fn each_dead_letter_carries_its_reason_class_and_a_bounded_data_type_label() {
        use crate::metrics::DeadReason;
        let trade = |seq: u64, payload: &'static [u8]| Envelope {
            stream: Cow::Borrowed("MARKET_TRADES"),
            stream_seq: StreamSeq(seq),
            subject: Cow::Borrowed("trade.binance.spot.BTC-USDT"),
            headers: Vec::new(),
            published_ns: 1_761_714_312_456_789_000,
            payload: Cow::Borrowed(payload),
        };
        let mut typed = Batch::new("trades", RowsKind::Typed, TimeWindow::default());
        typed.push(Lsn(1), &trade(1, b"not json {"), 0);
        // A valid trade dated 1970: outside the plausible window.
        let old: &'static [u8] = br#"{"exchange":"binance","market_type":"spot","symbol":"BTC-USDT","price":"1.5","quantity":"2","side":"buy","trade_id":"t1","data_type":"trade","ts_ms":1000,"trade_ts_ms":1000}"#;
        typed.push(Lsn(2), &trade(2, old), 0);
        assert_eq!(
            typed.dead_classes,
            vec![
                (DeadReason::undecodable, "trade".to_owned()),
                (DeadReason::timestamp, "trade".to_owned())
            ],
            "{:?}",
            typed.dead
        );

        let mut unrouted = Batch::new(
            super::super::route::UNROUTED_LANE,
            RowsKind::DeadLettersOnly,
            TimeWindow::default(),
        );
        let mut oversized = trade(3, b"cut");
        oversized.headers = vec![(
            Cow::Borrowed(super::super::route::DEAD_LETTER_HEADER),
            Cow::Borrowed("too large"),
        )];
        let mut rescued = oversized.clone();
        rescued.stream_seq = StreamSeq(4);
        rescued.headers.push((
            Cow::Borrowed(crate::source::RAW_SUBJECT_HEADER),
            Cow::Borrowed("74ff"),
        ));
        let mut stray = trade(5, b"{}");
        stray.subject = Cow::Borrowed("made.up.subject");
        for (lsn, envelope) in [(3, &oversized), (4, &rescued), (5, &stray)] {
            unrouted.push(Lsn(lsn), envelope, 0);
        }
        let unrouted_label = crate::metrics::UNROUTED_DATA_TYPE.to_owned();
        assert_eq!(
            unrouted.dead_classes,
            vec![
                (DeadReason::oversized, unrouted_label.clone()),
                (DeadReason::invalid_subject, unrouted_label.clone()),
                (DeadReason::unrouted, unrouted_label),
            ]
        );
    }
}
