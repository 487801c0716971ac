//! The online audit: samples WAL records the relay acknowledged and confirms, once the drain has
//! passed them, that their identities are in ClickHouse.
//!
//! Every record in the WAL was acknowledged to JetStream (or is about to be: the ack follows the
//! fsync), so the WAL is the list of what the relay promised to store. The audit tails it with a
//! reader of its own, keeps one record in [`AuditOptions::sample_every_records`] (by LSN, so the
//! choice does not depend on timing), and remembers what that record must have become:
//!
//! - a typed row: its natural identity (the `ORDER BY` columns of its table, what the
//!   ReplacingMergeTree collapses on, as [`crate::codec::Identity::natural`] renders them);
//! - a passthrough row: its message identity (`nats_stream`, `nats_seq`);
//! - a dead letter (a payload that does not decode, a row outside the time window, an unrouted
//!   subject, a dead-letter record): its row in the dead-letter table.
//!
//! A sample is due once its lane's cursor in the ledger is past its LSN: the cursor says every
//! record of the lane below it is in ClickHouse, which is the exact claim to check, and unlike a
//! wall-clock delay it never checks a record the drain has not reached (a ClickHouse outage stops
//! the cursors, so the audit waits with them). Every round ([`AuditOptions::interval_ms`]) sends
//! at most one query per table with at most [`AUDIT_IDENTITIES_PER_QUERY_MAX`] identities; the
//! queries filter on the key's leading columns and the time range, so they read few granules. A
//! row ClickHouse rejected for its content went to the dead letters instead, so an identity not
//! found in its table is looked up there (one more query per round, per 500 identities) before it
//! counts as missing.
//!
//! Costs and bounds: the reader reads every record once more (each lane already reads them all),
//! decodes only the sampled ones, and holds at most [`AuditOptions::pending_max`] samples; while
//! the queue is full (ClickHouse down for long) no new sample is taken. A query that fails counts
//! nothing: the round's samples stay and the audit pauses until the next round, logging the
//! condition, so an outage never shows up as misses.
//!
//! Exports `prism_relay_audit_checked_total` (samples confirmed or found missing) and
//! `prism_relay_audit_missing_total`, and logs every miss (stream, sequence, table, identity),
//! at most [`MISS_LINES_PER_ROUND_MAX`] lines a round plus a count of the rest.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use prism_wal::{Lsn, Wal, WalError};
use serde::Deserialize;
use tokio::sync::watch;

use crate::codec::{self, Row, Table, TimeWindow};
use crate::drain::route::{Route, Router, UNROUTED_LANE};
use crate::drain::LedgerKeeper;
use crate::logcond::Condition;
use crate::metrics::Metrics;
use crate::schema::{self, ColumnType, Profile, SchemaTable};
use crate::sink::Sink;

/// Default of `[audit] sample_every_records`: one record in 1,000. At MarketPrism's rates (a few
/// thousand messages a second per node) that is a few samples a second, a few hundred identities
/// per query at the default interval.
pub const SAMPLE_EVERY_RECORDS_DEFAULT: u64 = 1_000;
/// Default of `[audit] interval_ms`: how often due samples are checked (milliseconds).
pub const INTERVAL_MS_DEFAULT: u64 = 10_000;
/// Default of `[audit] pending_max`: samples waiting for their lane's drain, at most.
/// 10,000 samples take about 2 MB and cover an outage of a few hours at the default rate.
pub const PENDING_MAX_DEFAULT: usize = 10_000;

/// Identities sent in one query, at most: the `IN` lists of a few hundred tuples keep a query
/// below 100 KB and its answer small; more due samples wait for the next round.
pub const AUDIT_IDENTITIES_PER_QUERY_MAX: usize = 500;

/// Miss lines logged per round, at most; the rest are counted in one line (and on the metric).
pub const MISS_LINES_PER_ROUND_MAX: usize = 20;

/// Records read per pass before the audit yields, so a large backlog does not hold a worker.
const READ_CHUNK_RECORDS: usize = 4_096;

/// Pause before reading again after the WAL could not be read (no free file descriptor, or the
/// segment under the reader was removed): short, because both pass quickly.
const READ_RETRY_MS: u64 = 500;

/// How the audit runs (`[audit]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditOptions {
    /// Whether the audit runs at all.
    pub enabled: bool,
    /// One WAL record in this many is sampled (by LSN).
    pub sample_every_records: u64,
    /// How often due samples are checked, milliseconds.
    pub interval_ms: u64,
    /// Samples waiting for their lane's drain, at most.
    pub pending_max: usize,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            enabled: true,
            sample_every_records: SAMPLE_EVERY_RECORDS_DEFAULT,
            interval_ms: INTERVAL_MS_DEFAULT,
            pending_max: PENDING_MAX_DEFAULT,
        }
    }
}

/// What a sampled record must have become in ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// A typed row, found by its natural identity.
    Typed {
        table: Table,
        /// The `ORDER BY` columns rendered and joined with `|` (`Identity::natural`).
        natural: String,
        /// The key's leading columns, to let ClickHouse skip other markets' granules.
        prefix: [String; 3],
        /// The row's `timestamp`, to let ClickHouse skip other months' partitions.
        timestamp_ms: i64,
    },
    /// A row of a passthrough table, found by its message identity.
    Passthrough { table: String },
    /// A dead letter, found by message identity and lane.
    DeadLetter,
}

/// One sampled record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sample {
    lsn: Lsn,
    /// The drain lane that handles the record (its cursor says when it is due).
    lane: String,
    stream: String,
    seq: u64,
    expect: Expect,
}

impl Sample {
    /// What a log line names as the identity looked for.
    fn identity(&self) -> String {
        match &self.expect {
            Expect::Typed { natural, .. } => natural.clone(),
            Expect::Passthrough { .. } | Expect::DeadLetter => {
                format!("{}/{}", self.stream, self.seq)
            }
        }
    }

    /// The table a log line names.
    fn table(&self, dead_letter_table: &str) -> String {
        match &self.expect {
            Expect::Typed { table, .. } => table.name().to_owned(),
            Expect::Passthrough { table } => table.clone(),
            Expect::DeadLetter => dead_letter_table.to_owned(),
        }
    }
}

/// What the audit needs to know about the relay's setup.
#[derive(Debug, Clone)]
pub struct AuditSetup {
    /// The options.
    pub options: AuditOptions,
    /// The schema profile of the server (column types differ).
    pub profile: Profile,
    /// The dead-letter table's name.
    pub dead_letter_table: String,
    /// Plausible row times, as the drain judges them.
    pub time_window: TimeWindow,
}

/// The running audit.
pub struct Audit {
    setup: AuditSetup,
    wal: Wal,
    ledger: Arc<LedgerKeeper>,
    router: Arc<Router>,
    sink: Sink,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
    /// Samples not checked yet, in LSN order.
    pending: VecDeque<Sample>,
}

/// Why the audit could not finish a round (it tries again at the next one).
#[derive(Debug, thiserror::Error)]
enum RoundError {
    /// A query failed; nothing of the round was counted.
    #[error("{0}")]
    Query(#[from] crate::sink::SinkError),
}

impl Audit {
    /// An audit of `wal` that queries through `sink`; it samples records from the oldest one a
    /// lane has not passed yet on.
    pub fn new(
        setup: AuditSetup,
        wal: Wal,
        ledger: Arc<LedgerKeeper>,
        router: Arc<Router>,
        sink: Sink,
        metrics: Metrics,
        stop: watch::Receiver<bool>,
    ) -> Audit {
        Audit {
            setup,
            wal,
            ledger,
            router,
            sink,
            metrics,
            stop,
            pending: VecDeque::new(),
        }
    }

    /// Runs until shutdown. Never fails: what it cannot read or query it tries again later.
    pub async fn run(mut self) {
        let every = self.setup.options.sample_every_records.max(1);
        // From the oldest record a lane has not passed: every acknowledged record not yet
        // confirmed drained is a candidate, also those a previous run left in the WAL.
        let mut next = match self.ledger.low_watermark().await {
            Some(low) => low,
            None => self.wal.durable_lsn().next(),
        };
        let mut reader = None;
        let mut read_failing = Condition::default();
        let mut query_failing = Condition::default();
        let mut full = Condition::default();
        let mut round =
            tokio::time::interval(Duration::from_millis(self.setup.options.interval_ms.max(1)));
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut durable = self.wal.watch_durable();
        loop {
            match self.read_samples(&mut reader, &mut next, every, &mut full) {
                Ok(caught_up) => {
                    if let Some(ended) = read_failing.cleared() {
                        tracing::info!(failures = ended.count, "audit reads the WAL again");
                    }
                    if !caught_up {
                        tokio::task::yield_now().await;
                        continue;
                    }
                }
                Err(error) => {
                    reader = None;
                    if let Some(o) = read_failing.occurred() {
                        tracing::warn!(%error, failures = o.count(), lasted_s = o.lasted_s(), "audit cannot read the WAL; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(READ_RETRY_MS)) => {}
                        _ = self.stop.changed() => {}
                    }
                }
            }
            if *self.stop.borrow() {
                return;
            }
            tokio::select! {
                _ = round.tick() => match self.check_round().await {
                    Ok(()) => {
                        if let Some(ended) = query_failing.cleared() {
                            tracing::info!(failures = ended.count, lasted_ms = ended.lasted.as_millis() as u64, "audit queries ClickHouse again");
                        }
                    }
                    Err(error) => {
                        if let Some(o) = query_failing.occurred() {
                            tracing::warn!(%error, failures = o.count(), lasted_s = o.lasted_s(), pending = self.pending.len(), "audit paused: ClickHouse did not answer its query; nothing is counted until it does");
                        }
                    }
                },
                _ = durable.changed() => {}
                _ = self.stop.changed() => return,
            }
        }
    }

    /// Reads up to a chunk of durable records, sampling every `every`-th LSN. True when caught up.
    fn read_samples(
        &mut self,
        reader: &mut Option<prism_wal::Reader>,
        next: &mut Lsn,
        every: u64,
        full: &mut Condition,
    ) -> Result<bool, WalError> {
        if reader.is_none() {
            *reader = Some(match self.wal.reader(*next) {
                Ok(r) => r,
                // Retention removed what the audit had not read (it fell behind every lane):
                // those records are skipped, not sampled; sampling goes on from the oldest kept.
                Err(WalError::Truncated {
                    first_available, ..
                }) => {
                    *next = first_available;
                    self.wal.reader(first_available)?
                }
                Err(error) => return Err(error),
            });
        }
        let Some(r) = reader.as_mut() else {
            return Ok(true);
        };
        for _ in 0..READ_CHUNK_RECORDS {
            let Some(record) = r.next()? else {
                return Ok(true);
            };
            let lsn = record.lsn;
            *next = lsn.next();
            if lsn.0 % every != 0 {
                continue;
            }
            if self.pending.len() >= self.setup.options.pending_max {
                if let Some(o) = full.occurred() {
                    tracing::warn!(pending = self.pending.len(), skipped = o.count(), lasted_s = o.lasted_s(), "audit queue full (its lanes are not draining): new records are not sampled");
                }
                continue;
            }
            if let Some(ended) = full.cleared() {
                tracing::info!(
                    skipped = ended.count,
                    "audit queue has room again: sampling resumes"
                );
            }
            let envelope = record.envelope()?;
            let route = self.router.route_envelope(&envelope);
            let lane = route.lane().to_owned();
            let stream = envelope.stream.to_string();
            let seq = envelope.stream_seq.0;
            let expect = match route {
                Route::Typed(_) => {
                    match codec::decode(&envelope.subject, &envelope.payload, &envelope.stream, seq)
                        .and_then(|row| {
                            self.setup
                                .time_window
                                .check(&row, envelope.published_ns)
                                .map(|()| row)
                        }) {
                        Ok(row) => typed_expect(&row),
                        Err(_) => Expect::DeadLetter,
                    }
                }
                Route::Passthrough(table) => Expect::Passthrough {
                    table: table.to_owned(),
                },
                Route::Unrouted => Expect::DeadLetter,
            };
            self.pending.push_back(Sample {
                lsn,
                lane,
                stream,
                seq,
                expect,
            });
        }
        Ok(false)
    }

    /// Checks the samples whose lanes have drained past them: one query per table, then one on
    /// the dead letters for what was not found. Counts only when every query answered.
    async fn check_round(&mut self) -> Result<(), RoundError> {
        // The cursor of each lane with pending samples: records of the lane below it are in
        // ClickHouse. An in-flight batch sits at or above the cursor, so it is never due.
        let mut cursors: BTreeMap<String, Lsn> = BTreeMap::new();
        for sample in &self.pending {
            if !cursors.contains_key(&sample.lane) {
                let (cursor, _) = self.ledger.lane_state(&sample.lane).await;
                cursors.insert(sample.lane.clone(), cursor.unwrap_or(Lsn(0)));
            }
        }
        // Due samples, at most a query's worth per target, oldest first.
        let mut due: Vec<usize> = Vec::new();
        let mut per_target: BTreeMap<String, usize> = BTreeMap::new();
        for (i, sample) in self.pending.iter().enumerate() {
            if cursors.get(&sample.lane).is_some_and(|c| sample.lsn < *c) {
                let target = sample.table(&self.setup.dead_letter_table);
                let n = per_target.entry(target).or_default();
                if *n < AUDIT_IDENTITIES_PER_QUERY_MAX {
                    *n += 1;
                    due.push(i);
                }
            }
        }
        if due.is_empty() {
            return Ok(());
        }
        let samples: Vec<&Sample> = due.iter().map(|&i| &self.pending[i]).collect();
        let found = self.query_found(&samples).await?;
        let mut missing = Vec::new();
        for (sample, ok) in samples.iter().zip(&found) {
            if !ok {
                missing.push(*sample);
            }
        }
        self.metrics.audit_checked.inc_by(samples.len() as u64);
        self.metrics.audit_missing.inc_by(missing.len() as u64);
        for sample in missing.iter().take(MISS_LINES_PER_ROUND_MAX) {
            tracing::error!(
                stream = %sample.stream,
                seq = sample.seq,
                table = %sample.table(&self.setup.dead_letter_table),
                identity = %sample.identity(),
                lsn = sample.lsn.0,
                "audit: an acknowledged message is missing from ClickHouse (neither in its table nor in the dead letters)"
            );
        }
        if missing.len() > MISS_LINES_PER_ROUND_MAX {
            tracing::error!(
                more = missing.len() - MISS_LINES_PER_ROUND_MAX,
                "audit: more acknowledged messages missing from ClickHouse this round (counted in prism_relay_audit_missing_total)"
            );
        }
        // Remove the checked samples (indices ascending; remove from the back).
        for &i in due.iter().rev() {
            self.pending.remove(i);
        }
        Ok(())
    }

    /// For each sample, whether ClickHouse has it (in its table, or in the dead letters).
    async fn query_found(&self, samples: &[&Sample]) -> Result<Vec<bool>, RoundError> {
        let mut found = vec![false; samples.len()];
        // Typed tables.
        let mut typed: BTreeMap<Table, Vec<usize>> = BTreeMap::new();
        let mut passthrough: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, sample) in samples.iter().enumerate() {
            match &sample.expect {
                Expect::Typed { table, .. } => typed.entry(*table).or_default().push(i),
                Expect::Passthrough { table } => {
                    passthrough.entry(table.as_str()).or_default().push(i)
                }
                Expect::DeadLetter => {}
            }
        }
        for (table, indices) in &typed {
            let wanted: Vec<&Sample> = indices.iter().map(|&i| samples[i]).collect();
            let sql = typed_query(self.setup.profile, *table, &wanted);
            let rows: Vec<KeyRow> = self.sink.select_json_rows(&sql).await?;
            let present: BTreeSet<String> = rows.into_iter().map(|r| r.k).collect();
            for &i in indices {
                if let Expect::Typed { natural, .. } = &samples[i].expect {
                    found[i] = present.contains(natural);
                }
            }
        }
        for (table, indices) in &passthrough {
            let wanted: Vec<&Sample> = indices.iter().map(|&i| samples[i]).collect();
            let sql = passthrough_query(table, &wanted);
            let rows: Vec<MessageRow> = self.sink.select_json_rows(&sql).await?;
            let present: BTreeSet<(String, String)> =
                rows.into_iter().map(|r| (r.s, r.q)).collect();
            for &i in indices {
                found[i] =
                    present.contains(&(samples[i].stream.clone(), samples[i].seq.to_string()));
            }
        }
        // Everything not found so far may be a dead letter (expected, or rejected by ClickHouse).
        let rest: Vec<usize> = (0..samples.len()).filter(|&i| !found[i]).collect();
        // In chunks, so this query too asks for a bounded number of identities.
        for rest in rest.chunks(AUDIT_IDENTITIES_PER_QUERY_MAX) {
            let wanted: Vec<&Sample> = rest.iter().map(|&i| samples[i]).collect();
            let sql = dead_letter_query(&self.setup.dead_letter_table, &wanted);
            let rows: Vec<DeadLetterRow> = self.sink.select_json_rows(&sql).await?;
            let present: BTreeSet<(String, String, String)> =
                rows.into_iter().map(|r| (r.s, r.q, r.t)).collect();
            for &i in rest {
                let s = samples[i];
                // The drain writes no table name for a record no route claims.
                let lane = if s.lane == UNROUTED_LANE {
                    ""
                } else {
                    s.lane.as_str()
                };
                found[i] =
                    present.contains(&(s.stream.clone(), s.seq.to_string(), lane.to_owned()));
            }
        }
        Ok(found)
    }
}

/// One row of a typed-table audit query: the natural identity.
#[derive(Debug, Deserialize)]
struct KeyRow {
    k: String,
}

/// One row of a passthrough audit query: stream and sequence (as text).
#[derive(Debug, Deserialize)]
struct MessageRow {
    s: String,
    q: String,
}

/// One row of a dead-letter audit query: stream, sequence (as text) and lane.
#[derive(Debug, Deserialize)]
struct DeadLetterRow {
    s: String,
    q: String,
    t: String,
}

/// What a decoded typed row must be found as.
fn typed_expect(row: &Row) -> Expect {
    let (exchange, market_type, symbol) = match row {
        Row::Trade(r) => (&r.exchange, &r.market_type, &r.symbol),
        Row::Orderbook(r) => (&r.exchange, &r.market_type, &r.symbol),
        Row::FundingRate(r) => (&r.exchange, &r.market_type, &r.symbol),
        Row::OpenInterest(r) => (&r.exchange, &r.market_type, &r.symbol),
        Row::Liquidation(r) => (&r.exchange, &r.market_type, &r.symbol),
        Row::LsrTopPosition(r) => (&r.exchange, &r.market_type, &r.symbol),
        Row::LsrAllAccount(r) => (&r.exchange, &r.market_type, &r.symbol),
        Row::VolatilityIndex(r) => (&r.exchange, &r.market_type, &r.symbol),
    };
    Expect::Typed {
        table: row.table(),
        natural: row.identity().natural,
        prefix: [exchange.clone(), market_type.clone(), symbol.clone()],
        timestamp_ms: row.timestamp_ms(),
    }
}

/// A ClickHouse string literal: single quotes, with backslashes, quotes and control characters
/// escaped, so any value (they come from payloads) stays one literal.
fn quote_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c if c.is_control() && (c as u32) < 0x80 => {
                out.push_str(&format!("\\x{:02X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A table name for SQL: backquoted, with backslashes and backquotes escaped.
fn quote_identifier(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('`');
    for c in name.chars() {
        if c == '`' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('`');
    out
}

/// An `IN` list of `items`; a list of one is written twice, because `((a, b))` would be read as
/// the tuple itself rather than a list holding it.
fn in_list(mut items: Vec<String>) -> String {
    items.sort();
    items.dedup();
    if items.len() == 1 {
        items.push(items[0].clone());
    }
    format!("({})", items.join(", "))
}

/// The SQL text of one key column of `table` as the codec renders it: the time column is epoch
/// milliseconds (`Int64` in the legacy profile, `DateTime64(3)` in the modern one).
fn key_column_text(profile: Profile, table: Table, column: &str) -> String {
    let is_time = schema::expected_columns(table)
        .iter()
        .any(|(name, ty)| *name == column && *ty == ColumnType::DateTime64Ms);
    let quoted = quote_identifier(column);
    if is_time && profile == Profile::Modern {
        format!("toString(toUnixTimestamp64Milli({quoted}))")
    } else {
        format!("toString({quoted})")
    }
}

/// The query that returns which of `samples` (all of `table`) have their natural identity in
/// `table`: filtered on the key's leading columns, the time range and the identity, distinct and
/// bounded by the number of identities asked for.
fn typed_query(profile: Profile, table: Table, samples: &[&Sample]) -> String {
    let order_by = SchemaTable::Data(table).order_by();
    let parts: Vec<String> = order_by
        .iter()
        .map(|c| key_column_text(profile, table, c))
        .collect();
    let key = format!("concat({})", parts.join(", '|', "));
    let mut prefixes = Vec::new();
    let mut naturals = Vec::new();
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    for sample in samples {
        if let Expect::Typed {
            natural,
            prefix,
            timestamp_ms,
            ..
        } = &sample.expect
        {
            prefixes.push(format!(
                "({}, {}, {})",
                quote_string(&prefix[0]),
                quote_string(&prefix[1]),
                quote_string(&prefix[2])
            ));
            naturals.push(quote_string(natural));
            lo = lo.min(*timestamp_ms);
            hi = hi.max(*timestamp_ms);
        }
    }
    let time = if profile == Profile::Modern {
        "toUnixTimestamp64Milli(`timestamp`)"
    } else {
        "`timestamp`"
    };
    let limit = naturals.len();
    format!(
        "SELECT DISTINCT {key} AS k FROM {table} WHERE (`exchange`, `market_type`, `symbol`) IN {prefixes} \
         AND {time} BETWEEN {lo} AND {hi} AND {key} IN {naturals} LIMIT {limit}",
        table = quote_identifier(table.name()),
        prefixes = in_list(prefixes),
        naturals = in_list(naturals),
    )
}

/// The `(stream, seq)` tuples of `samples` for an `IN` list.
fn message_tuples(samples: &[&Sample]) -> String {
    in_list(
        samples
            .iter()
            .map(|s| format!("({}, {})", quote_string(&s.stream), s.seq))
            .collect(),
    )
}

/// The query that returns which of `samples` are rows of the passthrough table `table` (keyed
/// by the message identity).
fn passthrough_query(table: &str, samples: &[&Sample]) -> String {
    format!(
        "SELECT DISTINCT toString(`nats_stream`) AS s, toString(`nats_seq`) AS q FROM {} \
         WHERE (`nats_stream`, `nats_seq`) IN {} LIMIT {}",
        quote_identifier(table),
        message_tuples(samples),
        samples.len()
    )
}

/// The query that returns which of `samples` are in the dead-letter table (keyed by stream,
/// sequence and lane).
fn dead_letter_query(dead_letter_table: &str, samples: &[&Sample]) -> String {
    format!(
        "SELECT DISTINCT toString(`nats_stream`) AS s, toString(`nats_seq`) AS q, toString(`table`) AS t \
         FROM {} WHERE (`nats_stream`, `nats_seq`) IN {} LIMIT {}",
        quote_identifier(dead_letter_table),
        message_tuples(samples),
        // A message may have a dead letter under more than one lane name in theory; leave room.
        samples.len() * 2
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trade_sample(seq: u64, symbol: &str, trade_id: &str, ts: i64) -> Sample {
        let natural = format!("binance|spot|{symbol}|{trade_id}");
        Sample {
            lsn: Lsn(seq),
            lane: "trades".into(),
            stream: "MARKET_TRADES".into(),
            seq,
            expect: Expect::Typed {
                table: Table::Trades,
                natural,
                prefix: ["binance".into(), "spot".into(), symbol.into()],
                timestamp_ms: ts,
            },
        }
    }

    #[test]
    fn string_literals_escape_quotes_backslashes_and_control_characters() {
        assert_eq!(quote_string("BTC-USDT"), "'BTC-USDT'");
        assert_eq!(quote_string("a'b\\c"), "'a\\'b\\\\c'");
        assert_eq!(quote_string("x\ny"), "'x\\x0Ay'");
        assert_eq!(quote_string("é"), "'é'");
    }

    #[test]
    fn a_list_of_one_tuple_is_written_twice_so_it_stays_a_list() {
        assert_eq!(in_list(vec!["(1, 2)".into()]), "((1, 2), (1, 2))");
        assert_eq!(
            in_list(vec!["'b'".into(), "'a'".into(), "'b'".into()]),
            "('a', 'b')"
        );
    }

    #[test]
    fn the_typed_query_filters_on_key_prefix_time_range_and_identity_and_is_bounded() {
        let a = trade_sample(1, "BTC-USDT", "7", 1_000);
        let b = trade_sample(2, "ETH-USDT", "8", 5_000);
        let legacy = typed_query(Profile::Legacy, Table::Trades, &[&a, &b]);
        assert!(
            legacy.contains("concat(toString(`exchange`), '|', toString(`market_type`), '|', toString(`symbol`), '|', toString(`trade_id`))"),
            "{legacy}"
        );
        assert!(
            legacy.contains("`timestamp` BETWEEN 1000 AND 5000"),
            "{legacy}"
        );
        assert!(
            legacy.contains("IN ('binance|spot|BTC-USDT|7', 'binance|spot|ETH-USDT|8')"),
            "{legacy}"
        );
        assert!(legacy.ends_with("LIMIT 2"), "{legacy}");
        let c = Sample {
            lsn: Lsn(3),
            lane: "orderbooks".into(),
            stream: "MARKET_BOOKS".into(),
            seq: 3,
            expect: Expect::Typed {
                table: Table::Orderbooks,
                natural: "binance|spot|BTC-USDT|5|1000".into(),
                prefix: ["binance".into(), "spot".into(), "BTC-USDT".into()],
                timestamp_ms: 1_000,
            },
        };
        let modern = typed_query(Profile::Modern, Table::Orderbooks, &[&c]);
        assert!(
            modern.contains("toString(toUnixTimestamp64Milli(`timestamp`))")
                && modern.contains("toUnixTimestamp64Milli(`timestamp`) BETWEEN 1000 AND 1000"),
            "{modern}"
        );
    }

    #[test]
    fn message_identity_queries_name_stream_and_sequence() {
        let mut s = trade_sample(42, "BTC-USDT", "7", 1_000);
        s.expect = Expect::DeadLetter;
        let dl = dead_letter_query("dead_letters", &[&s]);
        assert!(
            dl.contains("IN (('MARKET_TRADES', 42), ('MARKET_TRADES', 42))"),
            "{dl}"
        );
        let pt = passthrough_query("events", &[&s]);
        assert!(
            pt.contains("FROM `events`") && pt.ends_with("LIMIT 1"),
            "{pt}"
        );
    }
}
