//! The lanes' shared read of the WAL: each record is read, checked and routed once, not once
//! per lane.
//!
//! Every lane needs the records of its own table, in LSN order, and the WAL interleaves all
//! tables. Reading it once per lane meant every record was read from its segment, checked
//! against its CRC and decoded by every lane (nine with MarketPrism's tables): a quarter of the
//! relay's CPU while it drained a backlog. The [`Tail`] reads the WAL ahead of the lanes in
//! chunks: it reads each record once, routes it from its subject and dead-letter header (read
//! from the body without decoding the rest, as a lane reading alone routes), and lists each
//! lane's records in the chunk. A lane then takes from the chunk only its own records.
//!
//! The lanes keep their own cursors and batches; the tail only changes how records reach them,
//! so what a lane sees is what its own reader would hand it (its records, in LSN order, none
//! skipped), and crash safety is untouched. Memory is bounded: the tail keeps the chunks that
//! some lane has not read yet, at most [`CACHE_BYTES_MAX`] of them. A lane that falls behind the
//! oldest chunk kept (its inserts keep failing, or it resumed from an older cursor) reads the
//! WAL itself, with its own reader, until it is back within the chunks kept.
//!
//! Errors are those of a reader: a transient one (no file descriptor free) leaves the tail where
//! it was, and a corrupt or undecodable record is reported again to every lane that reaches it,
//! never skipped.

use std::collections::VecDeque;
use std::sync::Arc;

use prism_wal::{Lsn, Reader, Wal, WalError};
use tokio::sync::Mutex;

use super::route::Router;

/// Records one chunk holds at most.
const CHUNK_RECORDS_MAX: usize = 4_096;
/// Record bytes one chunk holds at most (a chunk ends after the record that reaches it).
const CHUNK_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Record bytes the tail keeps at most; older chunks are dropped first.
pub const CACHE_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Consecutive records of the WAL, read once, with each lane's share listed.
#[derive(Debug)]
pub struct Chunk {
    /// LSN of the first record.
    first: Lsn,
    /// LSN after the last record: where the next chunk starts.
    end: Lsn,
    /// The records' bodies, one after another.
    bodies: Vec<u8>,
    /// Per record: LSN, start and length in `bodies`.
    records: Vec<(Lsn, usize, usize)>,
    /// Per lane (in the tail's lane order): indices into `records` of its records.
    by_lane: Vec<Vec<u32>>,
}

impl Chunk {
    /// LSN after the last record.
    pub fn end(&self) -> Lsn {
        self.end
    }

    /// The records of lane `lane` at or after `from`: LSN and body.
    pub fn records_of(&self, lane: usize, from: Lsn) -> impl Iterator<Item = (Lsn, &[u8])> + '_ {
        self.by_lane
            .get(lane)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(|&i| {
                let (lsn, start, len) = self.records[i as usize];
                (lsn, &self.bodies[start..start + len])
            })
            .filter(move |(lsn, _)| *lsn >= from)
    }

    fn bytes(&self) -> usize {
        self.bodies.len()
    }
}

/// What [`Tail::chunk_at`] has for a lane's read position.
#[derive(Debug)]
pub enum Take {
    /// The chunk holding the position.
    Chunk(Arc<Chunk>),
    /// Nothing durable past the position yet.
    CaughtUp,
    /// The position is outside the chunks kept: the lane reads the WAL itself.
    OwnReader,
}

#[derive(Debug)]
struct State {
    /// The tail's reader, positioned at `end`; opened at the first fill.
    reader: Option<Reader>,
    /// LSN the next chunk starts at.
    end: Lsn,
    /// Chunks kept, oldest first, contiguous and ending at `end`.
    chunks: VecDeque<Arc<Chunk>>,
    /// Record bytes of `chunks`.
    bytes: usize,
    /// Each lane's read position, as last reported.
    positions: Vec<Lsn>,
    /// A record at `end` whose envelope does not decode: reported to every lane reaching it.
    undecodable: Option<(Lsn, String)>,
}

/// The shared read of the WAL (see the module documentation).
#[derive(Debug)]
pub struct Tail {
    wal: Wal,
    router: Arc<Router>,
    /// Lane names, in the order of [`Chunk::by_lane`].
    lanes: Vec<String>,
    state: Mutex<State>,
}

impl Tail {
    /// A tail for `lanes` (the router's lanes), starting where the furthest-behind lane starts,
    /// which each lane reports with [`Tail::register`] before the first read.
    pub fn new(wal: Wal, router: Arc<Router>, lanes: Vec<String>) -> Tail {
        let positions = vec![Lsn(u64::MAX); lanes.len()];
        Tail {
            wal,
            router,
            lanes,
            state: Mutex::new(State {
                reader: None,
                end: Lsn(u64::MAX),
                chunks: VecDeque::new(),
                bytes: 0,
                positions,
                undecodable: None,
            }),
        }
    }

    /// The index of lane `name` (None for a lane the tail does not know: it reads on its own),
    /// having noted its start position.
    pub async fn register(&self, name: &str, read_pos: Lsn) -> Option<usize> {
        let index = self.lanes.iter().position(|l| l == name)?;
        let mut state = self.state.lock().await;
        state.positions[index] = read_pos;
        if state.reader.is_none() {
            state.end = state.end.min(read_pos);
        }
        Some(index)
    }

    /// The chunk holding `read_pos` for lane `lane`, reading the next one from the WAL when the
    /// lane is the first to need it. A lane reading on its own (`rejoining`) is handed a chunk
    /// only from the newer half of those kept, so that it does not fall out again as soon as
    /// the lanes ahead read on (each fall costs it a new reader).
    pub async fn chunk_at(
        &self,
        lane: usize,
        read_pos: Lsn,
        rejoining: bool,
    ) -> Result<Take, WalError> {
        let mut state = self.state.lock().await;
        if let Some(p) = state.positions.get_mut(lane) {
            *p = read_pos;
        }
        state.evict();
        let mut newer_bytes = 0;
        for chunk in state.chunks.iter().rev() {
            newer_bytes += chunk.bytes();
            if chunk.first <= read_pos && read_pos < chunk.end {
                if rejoining && newer_bytes > CACHE_BYTES_MAX / 2 {
                    return Ok(Take::OwnReader);
                }
                return Ok(Take::Chunk(chunk.clone()));
            }
        }
        if read_pos != state.end {
            return Ok(Take::OwnReader);
        }
        match self.fill(&mut state)? {
            Some(chunk) => Ok(Take::Chunk(chunk)),
            None => Ok(Take::CaughtUp),
        }
    }

    /// Reads the next chunk at `state.end` (None when nothing durable is there yet).
    fn fill(&self, state: &mut State) -> Result<Option<Arc<Chunk>>, WalError> {
        if let Some(error) = state.undecodable_error() {
            return Err(error);
        }
        if state.reader.is_none() {
            state.reader = Some(self.wal.reader(state.end)?);
        }
        let Some(reader) = state.reader.as_mut() else {
            return Ok(None);
        };
        let mut chunk = Chunk {
            first: state.end,
            end: state.end,
            bodies: Vec::new(),
            records: Vec::new(),
            by_lane: vec![Vec::new(); self.lanes.len()],
        };
        while chunk.records.len() < CHUNK_RECORDS_MAX && chunk.bodies.len() < CHUNK_BYTES_MAX {
            // A reader error leaves the reader where it was: the chunk ends before it, and the
            // next fill meets the error again.
            let record = match reader.next() {
                Ok(Some(record)) => record,
                Ok(None) => break,
                Err(e) if chunk.records.is_empty() => return Err(e),
                Err(_) => break,
            };
            // Routed from its subject and dead-letter header alone, as a lane reading on its own
            // routes it: the lane it belongs to decodes it in full, and a body that fails there
            // stops that lane. The records before one that cannot even be routed form the chunk;
            // it is reported from then on.
            let route = match self.router.route_record(&record) {
                Ok(route) => route,
                Err(WalError::Decode { lsn, reason }) => {
                    state.undecodable = Some((lsn, reason));
                    break;
                }
                Err(e) => return Err(e),
            };
            let index = chunk.records.len() as u32;
            if let Some(lane) = self.lanes.iter().position(|l| l == route.lane()) {
                chunk.by_lane[lane].push(index);
            }
            let start = chunk.bodies.len();
            chunk.bodies.extend_from_slice(record.body);
            chunk.records.push((record.lsn, start, record.body.len()));
            chunk.end = Lsn(record.lsn.0 + 1);
        }
        if chunk.records.is_empty() {
            return state.undecodable_error().map_or(Ok(None), Err);
        }
        state.end = chunk.end;
        state.bytes += chunk.bytes();
        let chunk = Arc::new(chunk);
        state.chunks.push_back(chunk.clone());
        Ok(Some(chunk))
    }
}

impl State {
    /// The error of the undecodable record at `end`, if there is one.
    fn undecodable_error(&self) -> Option<WalError> {
        self.undecodable
            .as_ref()
            .map(|(lsn, reason)| WalError::Decode {
                lsn: *lsn,
                reason: reason.clone(),
            })
    }

    /// Drops the chunks every lane has read past, and the oldest ones beyond the byte bound.
    fn evict(&mut self) {
        let slowest = self.positions.iter().copied().min().unwrap_or(Lsn(0));
        while let Some(front) = self.chunks.front() {
            if front.end <= slowest || self.bytes > CACHE_BYTES_MAX {
                self.bytes -= front.bytes();
                self.chunks.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::Arc;

    use prism_wal::{Envelope, Lsn, StreamSeq, Wal, WalOptions};

    use super::{Tail, Take, CACHE_BYTES_MAX};
    use crate::drain::route::DEAD_LETTER_HEADER;
    use crate::drain::Router;

    async fn append(wal: &Wal, subjects: &[&str], payload_bytes: usize) {
        let envelopes: Vec<Envelope<'_>> = subjects
            .iter()
            .enumerate()
            .map(|(i, subject)| Envelope {
                stream: Cow::Borrowed("S"),
                stream_seq: StreamSeq(i as u64 + 1),
                subject: Cow::Borrowed(subject),
                headers: Vec::new(),
                published_ns: 0,
                payload: Cow::Owned(vec![b'x'; payload_bytes]),
            })
            .collect();
        wal.append(&envelopes).await.expect("append");
    }

    /// A tail for `router`'s lanes over a fresh WAL in a temporary directory (the returned guard
    /// keeps it).
    fn tail_on(router: Router) -> (tempfile::TempDir, Wal, Arc<Router>, Tail) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (wal, _) = Wal::open(dir.path(), WalOptions::default()).expect("open WAL");
        let router = Arc::new(router);
        let tail = Tail::new(wal.clone(), router.clone(), router.lanes());
        (dir, wal, router, tail)
    }

    fn lanes_of(chunk: &super::Chunk, tail: &Tail, from: Lsn) -> Vec<(String, Vec<u64>)> {
        tail.lanes
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (
                    name.clone(),
                    chunk
                        .records_of(i, from)
                        .map(|(lsn, _)| lsn.0)
                        .collect::<Vec<_>>(),
                )
            })
            .filter(|(_, lsns)| !lsns.is_empty())
            .collect()
    }

    #[tokio::test]
    async fn each_lane_gets_exactly_its_records_in_order_from_one_shared_read() {
        let (_dir, wal, _, tail) = tail_on(Router::new([(
            "custom".to_owned(),
            "custom_table".to_owned(),
        )]));
        let trades = tail.register("trades", Lsn(1)).await.expect("a lane");
        let orderbooks = tail.register("orderbooks", Lsn(1)).await.expect("a lane");
        assert_eq!(tail.register("no_such_lane", Lsn(1)).await, None);
        assert!(matches!(
            tail.chunk_at(trades, Lsn(1), false).await,
            Ok(Take::CaughtUp)
        ));

        append(
            &wal,
            &[
                "trade.binance.spot.BTC-USDT",
                "orderbook.okx.spot.ETH-USDT",
                "custom.a.b",
                "nobody.knows.this",
                "trade.okx.spot.BTC-USDT",
            ],
            100,
        )
        .await;
        let Ok(Take::Chunk(chunk)) = tail.chunk_at(trades, Lsn(1), false).await else {
            panic!("a chunk for the first lane");
        };
        assert_eq!(chunk.end(), Lsn(6));
        assert_eq!(
            lanes_of(&chunk, &tail, Lsn(1)),
            [
                ("trades".to_owned(), vec![1, 5]),
                ("orderbooks".to_owned(), vec![2]),
                ("custom_table".to_owned(), vec![3]),
                ("_unrouted".to_owned(), vec![4]),
            ]
        );
        // The body is the record's: it decodes to the envelope appended.
        let (_, body) = chunk.records_of(trades, Lsn(2)).next().expect("lsn 5");
        let envelope: Envelope<'_> = bincode::deserialize(body).expect("decodes");
        assert_eq!(envelope.subject, "trade.okx.spot.BTC-USDT");
        // The second lane gets the same chunk: the WAL was read once.
        let Ok(Take::Chunk(again)) = tail.chunk_at(orderbooks, Lsn(1), false).await else {
            panic!("the same chunk for the second lane");
        };
        assert!(Arc::ptr_eq(&chunk, &again));
        // Past the durable end, nothing yet; then the next chunk starts where this one ended.
        assert!(matches!(
            tail.chunk_at(trades, Lsn(6), false).await,
            Ok(Take::CaughtUp)
        ));
        append(&wal, &["orderbook.okx.spot.ETH-USDT"], 100).await;
        let Ok(Take::Chunk(next)) = tail.chunk_at(trades, Lsn(6), false).await else {
            panic!("the next chunk");
        };
        assert_eq!(next.records_of(orderbooks, Lsn(6)).count(), 1);
        assert_eq!(next.records_of(trades, Lsn(6)).count(), 0);
        // Once every registered lane is past the first chunk, it is dropped.
        let Ok(Take::Chunk(_)) = tail.chunk_at(orderbooks, Lsn(6), false).await else {
            panic!("the next chunk for the second lane");
        };
        let state = tail.state.lock().await;
        assert_eq!(state.chunks.len(), 1);
        assert_eq!(state.chunks[0].first, Lsn(6));
    }

    #[tokio::test]
    async fn a_record_is_routed_as_the_router_routes_its_envelope_dead_letters_included() {
        let (_dir, wal, router, tail) = tail_on(Router::new([]));
        let trades = tail.register("trades", Lsn(1)).await.expect("a lane");
        let header =
            |name: &'static str, value: &'static str| (Cow::Borrowed(name), Cow::Borrowed(value));
        let envelope = |subject: &'static str, headers| Envelope {
            stream: Cow::Borrowed("S"),
            stream_seq: StreamSeq(1),
            subject: Cow::Borrowed(subject),
            headers,
            published_ns: 0,
            payload: Cow::Borrowed(b"{}".as_slice()),
        };
        let envelopes = [
            // A trade's subject marked as a dead letter (the rescue's records) is not a trade.
            envelope(
                "trade.binance.spot.BTC-USDT",
                vec![
                    header("Nats-Msg-Id", "a"),
                    header(DEAD_LETTER_HEADER, "subject not UTF-8"),
                ],
            ),
            envelope(
                "trade.binance.spot.BTC-USDT",
                vec![header("Nats-Msg-Id", "b")],
            ),
            envelope("orderbook.okx.spot.ETH-USDT", Vec::new()),
        ];
        wal.append(&envelopes).await.expect("append");
        let Ok(Take::Chunk(chunk)) = tail.chunk_at(trades, Lsn(1), false).await else {
            panic!("a chunk");
        };
        let expected: Vec<(String, Vec<u64>)> = tail
            .lanes
            .iter()
            .map(|lane| {
                let lsns = envelopes
                    .iter()
                    .zip(1u64..)
                    .filter(|(e, _)| router.route_envelope(e).lane() == lane)
                    .map(|(_, lsn)| lsn)
                    .collect();
                (lane.clone(), lsns)
            })
            .filter(|(_, lsns): &(String, Vec<u64>)| !lsns.is_empty())
            .collect();
        assert_eq!(lanes_of(&chunk, &tail, Lsn(1)), expected);
        assert_eq!(
            expected,
            [
                ("trades".to_owned(), vec![2]),
                ("orderbooks".to_owned(), vec![3]),
                ("_unrouted".to_owned(), vec![1]),
            ]
        );
    }

    #[tokio::test]
    async fn a_lane_outside_the_chunks_kept_reads_on_its_own() {
        let (_dir, wal, _, tail) = tail_on(Router::new([]));
        let slow = tail.register("trades", Lsn(1)).await.expect("a lane");
        let fast = tail
            .register("funding_rates", Lsn(1))
            .await
            .expect("a lane");
        // Far more than the tail keeps: 64 KiB records, CACHE_BYTES_MAX / 64 KiB * 2 of them.
        let records = CACHE_BYTES_MAX / (64 * 1024) * 2;
        for _ in 0..records / 64 {
            append(&wal, &["funding_rate.binance.perp.BTC-USDT"; 64], 64 * 1024).await;
        }
        let mut pos = Lsn(1);
        while let Ok(Take::Chunk(chunk)) = tail.chunk_at(fast, pos, false).await {
            pos = chunk.end();
        }
        assert_eq!(pos.0, records as u64 + 1);
        // The lane that stayed at its start fell out of the chunks kept.
        assert!(matches!(
            tail.chunk_at(slow, Lsn(1), false).await,
            Ok(Take::OwnReader)
        ));
        // Back within the chunks kept: handed the chunk, but a lane rejoining from its own
        // reader only from the newer half.
        let (oldest, newest) = {
            let state = tail.state.lock().await;
            (
                state.chunks[0].first,
                state.chunks[state.chunks.len() - 1].first,
            )
        };
        assert!(matches!(
            tail.chunk_at(slow, oldest, false).await,
            Ok(Take::Chunk(_))
        ));
        assert!(matches!(
            tail.chunk_at(slow, oldest, true).await,
            Ok(Take::OwnReader)
        ));
        assert!(matches!(
            tail.chunk_at(slow, newest, true).await,
            Ok(Take::Chunk(_))
        ));
        let state = tail.state.lock().await;
        assert!(state.bytes <= CACHE_BYTES_MAX + 4 * 1024 * 1024 + 64 * 1024);
        // A position past the tail's end is read alone too.
        drop(state);
        assert!(matches!(
            tail.chunk_at(slow, Lsn(pos.0 + 10), false).await,
            Ok(Take::OwnReader)
        ));
    }
}
