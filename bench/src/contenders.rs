//! The baselines the relay is compared with, each a small client built on the same crates as
//! the relay, run in the bench's own process against the same servers:
//!
//! - [`raw_consume`]: a consumer that only fetches (batches of [`FETCH_BATCH`]) and acks, with
//!   ack policy all (the last message of each batch acked) or explicit (every message acked),
//!   through its own durables; the ceiling of what JetStream delivers to one client here;
//! - [`no_wal_relay`]: a straightforward relay without a WAL: fetch, decode with the relay's
//!   codec, insert with the relay's sink (one insert per table per batch), ack after the insert;
//! - [`follow_streams`]: the latency reference, a consumer that follows the streams live from
//!   its own thread, runtime and connection (as a separate process would), fetching back to back
//!   and acking every message, nothing written anywhere;
//! - [`decode_stream`] + [`insert_rows`]: the outage baseline, the rows decoded up front and
//!   inserted as RowBinary with the `clickhouse` crate's inserter, in batches of the relay's
//!   default `rows_max` per table, the tables in parallel like the relay's lanes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{self, Message};
use futures_util::StreamExt;
use prism_relay::codec::{
    self, FundingRateRow, LiquidationRow, LsrAllAccountRow, LsrTopPositionRow, OpenInterestRow,
    OrderbookRow, Row, TradeRow, VolatilityIndexRow,
};
use prism_relay::config::{CompressionKind, TableBatch};
use prism_relay::schema::{self, Profile};
use prism_relay::sink::{Sink, SinkOptions};

use crate::error::BenchError;
use crate::world::STREAMS;

/// Messages per fetch of the baselines: the relay's default `fetch_batch`.
pub const FETCH_BATCH: usize = 1_000;

/// How long one fetch waits for messages before it returns what it has.
const FETCH_EXPIRES_MS: u64 = 250;

/// Unacked messages a baseline's durable allows: the relay's default `max_ack_pending`.
const MAX_ACK_PENDING: i64 = 20_000;

/// Pause between two looks at a consumer whose acks the server is still processing.
const ACK_SETTLE_POLL_MS: u64 = 20;

/// Bound on the server's processing of the acks already sent at the end of a run.
const ACK_SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on one insert of a baseline.
const INSERT_TIMEOUT_MS: u64 = 60_000;

/// Bound on connecting to ClickHouse.
const CONNECT_TIMEOUT_MS: u64 = 5_000;

/// Rows of the eight tables, one vector each.
#[derive(Default)]
pub struct TableRows {
    trades: Vec<TradeRow>,
    orderbooks: Vec<OrderbookRow>,
    funding_rates: Vec<FundingRateRow>,
    open_interests: Vec<OpenInterestRow>,
    liquidations: Vec<LiquidationRow>,
    lsr_top_positions: Vec<LsrTopPositionRow>,
    lsr_all_accounts: Vec<LsrAllAccountRow>,
    volatility_indices: Vec<VolatilityIndexRow>,
}

/// Applies `$m!(field, RowType)` to each of the eight tables.
macro_rules! each_table {
    ($m:ident) => {
        $m!(trades, TradeRow);
        $m!(orderbooks, OrderbookRow);
        $m!(funding_rates, FundingRateRow);
        $m!(open_interests, OpenInterestRow);
        $m!(liquidations, LiquidationRow);
        $m!(lsr_top_positions, LsrTopPositionRow);
        $m!(lsr_all_accounts, LsrAllAccountRow);
        $m!(volatility_indices, VolatilityIndexRow);
    };
}

impl TableRows {
    fn push(&mut self, row: Row) {
        match row {
            Row::Trade(r) => self.trades.push(r),
            Row::Orderbook(r) => self.orderbooks.push(r),
            Row::FundingRate(r) => self.funding_rates.push(r),
            Row::OpenInterest(r) => self.open_interests.push(r),
            Row::Liquidation(r) => self.liquidations.push(r),
            Row::LsrTopPosition(r) => self.lsr_top_positions.push(r),
            Row::LsrAllAccount(r) => self.lsr_all_accounts.push(r),
            Row::VolatilityIndex(r) => self.volatility_indices.push(r),
        }
    }

    pub fn len(&self) -> usize {
        let mut n = 0;
        macro_rules! add {
            ($f:ident, $t:ty) => {
                n += self.$f.len();
            };
        }
        each_table!(add);
        n
    }

    /// One insert per non-empty table through the relay's sink.
    async fn insert_with_sink(&self, sink: &Sink) -> Result<(), BenchError> {
        macro_rules! insert {
            ($f:ident, $t:ty) => {
                sink.insert(stringify!($f), &self.$f, None)
                    .await
                    .map_err(|e| BenchError::ch("insert", e))?;
            };
        }
        each_table!(insert);
        Ok(())
    }
}

/// One fetch of up to [`FETCH_BATCH`] messages, waiting at most [`FETCH_EXPIRES_MS`].
async fn fetch_batch(consumer: &PullConsumer) -> Result<Vec<Message>, BenchError> {
    let mut messages = consumer
        .fetch()
        .max_messages(FETCH_BATCH)
        .expires(Duration::from_millis(FETCH_EXPIRES_MS))
        .messages()
        .await
        .map_err(|e| BenchError::nats("fetch", e))?;
    let mut batch = Vec::with_capacity(FETCH_BATCH);
    while let Some(m) = messages.next().await {
        batch.push(m.map_err(|e| BenchError::nats("fetch", e))?);
    }
    Ok(batch)
}

/// Fetches from a durable until `expected` messages came, calling `on_batch` with each batch
/// (which acks it); returns how many came.
async fn fetch_all<F, Fut>(
    consumer: PullConsumer,
    expected: u64,
    mut on_batch: F,
) -> Result<u64, BenchError>
where
    F: FnMut(Vec<Message>) -> Fut,
    Fut: std::future::Future<Output = Result<(), BenchError>>,
{
    let mut got = 0u64;
    while got < expected {
        let batch = fetch_batch(&consumer).await?;
        got += batch.len() as u64;
        if !batch.is_empty() {
            on_batch(batch).await?;
        }
    }
    Ok(got)
}

async fn durable(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    ack_policy: AckPolicy,
) -> Result<(PullConsumer, u64), BenchError> {
    let mut stream = js
        .get_stream(stream)
        .await
        .map_err(|e| BenchError::nats("stream info", e))?;
    let expected = stream
        .info()
        .await
        .map_err(|e| BenchError::nats("stream info", e))?
        .state
        .messages;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.to_string()),
            ack_policy,
            max_ack_pending: MAX_ACK_PENDING,
            ..pull::Config::default()
        })
        .await
        .map_err(|e| BenchError::nats("create consumer", e))?;
    Ok((consumer, expected))
}

/// Waits until the server processed every ack sent on `consumer` (nothing unacked).
async fn acks_settled(mut consumer: PullConsumer) -> Result<(), BenchError> {
    let deadline = Instant::now() + ACK_SETTLE_TIMEOUT;
    loop {
        let info = consumer
            .info()
            .await
            .map_err(|e| BenchError::nats("consumer info", e))?;
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout {
                what: "the acks of a baseline consumer settling".into(),
                waited_s: ACK_SETTLE_TIMEOUT.as_secs(),
                detail: format!(
                    "{} pending, {} unacked",
                    info.num_pending, info.num_ack_pending
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(ACK_SETTLE_POLL_MS)).await;
    }
}

/// Drains the three streams through durables `<name>-<stream>` that only fetch and ack (every
/// message with `ack_all` false, the last of each batch with it true), the streams in
/// parallel; returns the messages and the time until every ack was processed.
pub async fn raw_consume(
    js: &jetstream::Context,
    name: &str,
    ack_all: bool,
) -> Result<(u64, Duration), BenchError> {
    let start = Instant::now();
    let policy = if ack_all {
        AckPolicy::All
    } else {
        AckPolicy::Explicit
    };
    let mut tasks = Vec::new();
    for (stream, _) in STREAMS {
        let (consumer, expected) = durable(js, stream, &format!("{name}-{stream}"), policy).await?;
        tasks.push(tokio::spawn(async move {
            let got = fetch_all(consumer.clone(), expected, |batch| async move {
                if ack_all {
                    if let Some(last) = batch.last() {
                        last.ack().await.map_err(|e| BenchError::nats("ack", e))?;
                    }
                } else {
                    for m in &batch {
                        m.ack().await.map_err(|e| BenchError::nats("ack", e))?;
                    }
                }
                Ok(())
            })
            .await?;
            acks_settled(consumer).await?;
            Ok::<u64, BenchError>(got)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t
            .await
            .map_err(|e| BenchError::nats("consumer task", e))??;
    }
    Ok((total, start.elapsed()))
}

/// Pause of a follower after a fetch that found nothing, so a caught-up follower does not spin.
const FOLLOW_EMPTY_PAUSE: Duration = Duration::from_millis(1);

/// Starts a consumer that follows the three streams from now on (durables `<name>-<stream>`,
/// deliver policy new, explicit acks) on a thread with its own tokio runtime and NATS
/// connection: per stream a loop that fetches up to [`FETCH_BATCH`] messages, acks each and
/// flushes, pulling again at once (after [`FOLLOW_EMPTY_PAUSE`] when a fetch found nothing).
/// Returns once the durables exist, so messages published afterwards reach them; the thread
/// ends when `stop` is set and yields the messages it acked.
pub fn follow_streams(
    nats_url: String,
    name: &str,
    stop: Arc<AtomicBool>,
) -> Result<thread::JoinHandle<Result<u64, BenchError>>, BenchError> {
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let name = name.to_string();
    let handle = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| BenchError::io("building the follower's runtime", e))?;
        rt.block_on(async move {
            let client = async_nats::connect(nats_url)
                .await
                .map_err(|e| BenchError::nats("connect", e))?;
            let js = jetstream::new(client.clone());
            let mut consumers = Vec::new();
            for (stream, _) in STREAMS {
                let consumer = js
                    .get_stream(stream)
                    .await
                    .map_err(|e| BenchError::nats("stream info", e))?
                    .create_consumer(pull::Config {
                        durable_name: Some(format!("{name}-{stream}")),
                        ack_policy: AckPolicy::Explicit,
                        deliver_policy: DeliverPolicy::New,
                        max_ack_pending: MAX_ACK_PENDING,
                        ..pull::Config::default()
                    })
                    .await
                    .map_err(|e| BenchError::nats("create consumer", e))?;
                consumers.push(consumer);
            }
            let _ = ready_tx.send(());
            let mut tasks = tokio::task::JoinSet::new();
            for consumer in consumers {
                let (client, stop) = (client.clone(), stop.clone());
                tasks.spawn(async move {
                    let mut acked = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let batch = fetch_batch(&consumer).await?;
                        if batch.is_empty() {
                            tokio::time::sleep(FOLLOW_EMPTY_PAUSE).await;
                            continue;
                        }
                        for m in &batch {
                            m.ack().await.map_err(|e| BenchError::nats("ack", e))?;
                        }
                        client
                            .flush()
                            .await
                            .map_err(|e| BenchError::nats("flush", e))?;
                        acked += batch.len() as u64;
                    }
                    Ok::<u64, BenchError>(acked)
                });
            }
            let mut total = 0;
            while let Some(done) = tasks.join_next().await {
                total += done.map_err(|e| BenchError::nats("follower task", e))??;
            }
            Ok(total)
        })
    });
    if ready_rx.recv().is_ok() {
        return Ok(handle);
    }
    // The thread ended before its durables existed: its error says why.
    match handle.join() {
        Ok(Err(e)) => Err(e),
        Ok(Ok(_)) | Err(_) => Err(BenchError::Output {
            what: "the latency follower".into(),
            detail: "ended before its consumers existed".into(),
        }),
    }
}

/// A sink on `database` of the ClickHouse at `url`, with the database and its eight tables
/// created (the relay's DDL for the server's profile).
pub async fn sink_with_schema(url: &str, database: &str) -> Result<Sink, BenchError> {
    let sink = Sink::new(SinkOptions {
        url: url.to_string(),
        database: "default".into(),
        modern: false,
        insert_timeout_ms: INSERT_TIMEOUT_MS,
        connect_timeout_ms: CONNECT_TIMEOUT_MS,
        ..SinkOptions::default()
    })
    .map_err(|e| BenchError::ch("client", e))?;
    let version = sink
        .server_version()
        .await
        .map_err(|e| BenchError::ch("version", e))?;
    let profile = Profile::for_server_version(&version);
    sink.execute(&schema::database_ddl(database))
        .await
        .map_err(|e| BenchError::ch("create database", e))?;
    for ddl in schema::all_ddl(profile, database, None) {
        sink.execute(&ddl)
            .await
            .map_err(|e| BenchError::ch("create table", e))?;
    }
    Sink::new(SinkOptions {
        url: url.to_string(),
        database: database.to_string(),
        // As the relay's default would.
        compress: CompressionKind::Auto.compresses(url),
        modern: profile == Profile::Modern,
        insert_timeout_ms: INSERT_TIMEOUT_MS,
        connect_timeout_ms: CONNECT_TIMEOUT_MS,
        ..SinkOptions::default()
    })
    .map_err(|e| BenchError::ch("client", e))
}

/// Decodes a batch with the relay's codec; a message that does not decode is an error (the
/// bench publishes only valid MarketPrism messages).
fn decode_batch(batch: &[Message], rows: &mut TableRows) -> Result<(), BenchError> {
    for m in batch {
        let info = m.info().map_err(|e| BenchError::nats("message info", e))?;
        let row = codec::decode(&m.subject, &m.payload, info.stream, info.stream_sequence)
            .map_err(|e| BenchError::Output {
                what: "message".into(),
                detail: e.to_string(),
            })?;
        rows.push(row);
    }
    Ok(())
}

/// The relay without a WAL: per stream, fetch a batch, decode it, insert it (one insert per
/// table), then ack every message; the streams in parallel. Returns the messages and the time
/// until the last ack was processed (every row is in ClickHouse by then).
pub async fn no_wal_relay(
    js: &jetstream::Context,
    clickhouse_url: &str,
    name: &str,
) -> Result<(u64, Duration), BenchError> {
    let start = Instant::now();
    let sink = sink_with_schema(clickhouse_url, name).await?;
    let mut tasks = Vec::new();
    for (stream, _) in STREAMS {
        let (consumer, expected) =
            durable(js, stream, &format!("{name}-{stream}"), AckPolicy::Explicit).await?;
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            let got = fetch_all(consumer.clone(), expected, |batch| {
                let sink = sink.clone();
                async move {
                    let mut rows = TableRows::default();
                    decode_batch(&batch, &mut rows)?;
                    rows.insert_with_sink(&sink).await?;
                    for m in &batch {
                        m.ack().await.map_err(|e| BenchError::nats("ack", e))?;
                    }
                    Ok(())
                }
            })
            .await?;
            acks_settled(consumer).await?;
            Ok::<u64, BenchError>(got)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t
            .await
            .map_err(|e| BenchError::nats("no-WAL relay task", e))??;
    }
    Ok((total, start.elapsed()))
}

/// Reads every message of the three streams through durables `<name>-<stream>` and decodes
/// them with the relay's codec, batch by batch (only the rows are kept).
pub async fn decode_stream(js: &jetstream::Context, name: &str) -> Result<TableRows, BenchError> {
    let mut rows = TableRows::default();
    for (stream, _) in STREAMS {
        // No acks: a consumer that needs none gets no redeliveries while the rows pile up.
        let (consumer, expected) =
            durable(js, stream, &format!("{name}-{stream}"), AckPolicy::None).await?;
        let mut got = 0u64;
        while got < expected {
            let batch = fetch_batch(&consumer).await?;
            got += batch.len() as u64;
            decode_batch(&batch, &mut rows)?;
        }
    }
    Ok(rows)
}

/// Inserts `rows` into `database` with the `clickhouse` crate's inserter (RowBinary, LZ4 unless
/// the server is on loopback, like the relay),
/// each table in batches of its default `rows_max`, the tables in parallel; returns the time.
pub async fn insert_rows(
    clickhouse_url: &str,
    database: &str,
    rows: TableRows,
) -> Result<Duration, BenchError> {
    // The schema exists before the clock starts: the relay's tables existed before the outage.
    drop(sink_with_schema(clickhouse_url, database).await?);
    let client = clickhouse::Client::default()
        .with_url(clickhouse_url)
        .with_database(database)
        // Compressed as the relay's default would.
        .with_compression(if CompressionKind::Auto.compresses(clickhouse_url) {
            clickhouse::Compression::Lz4
        } else {
            clickhouse::Compression::None
        })
        // Validation reads the columns with RowBinaryWithNamesAndTypes, which 18.16 lacks.
        .with_validation(false);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    macro_rules! spawn_table {
        ($f:ident, $t:ty) => {{
            let client = client.clone();
            let table_rows = rows.$f;
            tasks.spawn(async move {
                let batch = TableBatch::default_for(stringify!($f)).rows_max as usize;
                for chunk in table_rows.chunks(batch.max(1)) {
                    let mut insert = client
                        .insert::<$t>(stringify!($f))
                        .await
                        .map_err(|e| BenchError::ch("insert", e))?;
                    for row in chunk {
                        insert
                            .write(row)
                            .await
                            .map_err(|e| BenchError::ch("insert", e))?;
                    }
                    insert
                        .end()
                        .await
                        .map_err(|e| BenchError::ch("insert", e))?;
                }
                Ok::<(), BenchError>(())
            });
        }};
    }
    each_table!(spawn_table);
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| BenchError::ch("insert task", e))??;
    }
    Ok(start.elapsed())
}
