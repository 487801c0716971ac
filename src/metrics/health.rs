//! Liveness of the task loops and readiness of the drain: what `/health` and `/ready` answer.
//!
//! Liveness. Every task loop (ingest per consumer, each drain lane, the ledger keeper) holds a
//! [`Heartbeat`] and beats it at least every [`HEARTBEAT_INTERVAL_MS`] while it makes progress
//! *or waits legitimately*: a lane retrying a failed insert, an ingest task paused by a full WAL
//! budget, a pull waiting for messages. Such waits go through [`Heartbeat::wait`] (or
//! [`Heartbeat::wait_while`], which beats only while its condition says the wait is legitimate),
//! so they beat while they wait. A loop that has not beaten for [`LOOP_STALL_S`] is stuck (a
//! hung fsync, a deadlock, a blocking call on the runtime) and fails `/health`. The WAL's writer
//! thread waits for work when there is none, so it cannot beat; instead `/health` fails once
//! its group commit under way (`Wal::commit_running_for`) is older than the same bound.
//!
//! Readiness. Each lane reports its inserts: [`Health::insert_failed`] starts a failure streak (or
//! continues it) with the error's class and a short redacted cause, [`Health::insert_succeeded`]
//! ends it. `/ready` fails while a streak has lasted longer than `[metrics]
//! ready_insert_failing_s`, at once on an error of any class but `retryable` (a schema mismatch,
//! refused credentials: an operator must act), while the drain has
//! not reached ClickHouse yet at start-up, and once the WAL failed. Its body names each table
//! and why.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// How often a waiting loop beats (ms): far below [`LOOP_STALL_S`], rare enough to cost nothing.
pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;

/// A loop that has not beaten for this long fails `/health` (seconds). Every legitimate wait
/// beats, and the longest step between beats that is not a wait is one read chunk or one fsync:
/// milliseconds. A minute leaves room for a disk that is merely slow, while a hung one gets the
/// relay restarted within a probe period or two.
pub const LOOP_STALL_S: u64 = 60;

/// The error class of failures that pass by themselves (the sink's `retryable`): only these
/// wait for `ready_insert_failing_s` before `/ready` fails.
pub const RETRYABLE_CLASS: &str = "retryable";

/// Default of `[metrics] ready_insert_failing_s`.
pub const READY_INSERT_FAILING_S_DEFAULT: u64 = 30;

/// Longest cause kept for `/ready`'s body (bytes): one line an operator reads at a glance; the
/// full error is in the log.
pub const CAUSE_BYTES_MAX: usize = 200;

// Loops beat several times within the stall bound.
const _: () = assert!(HEARTBEAT_INTERVAL_MS * 10 <= LOOP_STALL_S * 1_000);

/// Shared health state; cheap to clone.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Registered loops by name.
    loops: Mutex<BTreeMap<String, Arc<Slot>>>,
    /// Lanes by table.
    lanes: Mutex<BTreeMap<String, LaneState>>,
    /// The drain before its lanes run: `Some(why)` while it waits for ClickHouse or the schema.
    drain_waiting: Mutex<Option<String>>,
    /// `ready_insert_failing_s`.
    ready_insert_failing_s: AtomicU64,
    /// When this state was created: the origin of the loops' beat times.
    origin: Instant,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            inner: Arc::new(Inner {
                loops: Mutex::new(BTreeMap::new()),
                lanes: Mutex::new(BTreeMap::new()),
                drain_waiting: Mutex::new(Some("the drain has not reached ClickHouse yet".into())),
                ready_insert_failing_s: AtomicU64::new(READY_INSERT_FAILING_S_DEFAULT),
                origin: Instant::now(),
            }),
        }
    }
}

/// One loop's beat.
#[derive(Debug)]
struct Slot {
    /// Milliseconds since [`Inner::origin`] of the last beat.
    beat_ms: AtomicU64,
    /// The loop ended (its heartbeat was dropped): no longer watched.
    ended: AtomicBool,
}

/// What a lane reported.
#[derive(Debug, Clone, Default)]
struct LaneState {
    /// Start of the current failure streak.
    failing_since: Option<Instant>,
    /// Class of the last failed attempt.
    class: String,
    /// Short redacted cause of the last failed attempt.
    cause: String,
    /// Publish time (unix ns) of the oldest record the lane has not inserted yet.
    oldest_pending_ns: Option<i64>,
}

/// A lane's figures at one instant, for the gauges.
#[derive(Debug, Clone)]
pub struct LaneSnapshot {
    /// The lane's table.
    pub table: String,
    /// How long its inserts have been failing, if they are.
    pub failing_for: Option<Duration>,
    /// Publish time (unix ns) of the oldest record not inserted yet.
    pub oldest_pending_ns: Option<i64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a plain assignment or read: a panic cannot leave it half done.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Now, unix nanoseconds (0 if the clock is before 1970).
pub fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// `cause` redacted and cut to [`CAUSE_BYTES_MAX`] on one line.
fn short_cause(cause: &str) -> String {
    let one_line: String = crate::redact::redact(cause)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.len() <= CAUSE_BYTES_MAX {
        return one_line;
    }
    let mut end = CAUSE_BYTES_MAX;
    while !one_line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &one_line[..end])
}

impl Health {
    /// Sets `ready_insert_failing_s`.
    pub fn set_ready_insert_failing_s(&self, seconds: u64) {
        self.inner
            .ready_insert_failing_s
            .store(seconds, Ordering::Relaxed);
    }

    /// Registers a loop named `name` and returns its heartbeat (which beats once now).
    pub fn heartbeat(&self, name: impl Into<String>) -> Heartbeat {
        let slot = Arc::new(Slot {
            beat_ms: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        });
        lock(&self.inner.loops).insert(name.into(), slot.clone());
        let heartbeat = Heartbeat {
            slot,
            origin: self.inner.origin,
        };
        heartbeat.beat();
        heartbeat
    }

    /// Loops that have not beaten for [`LOOP_STALL_S`], with how long.
    pub fn stalled_loops(&self) -> Vec<(String, Duration)> {
        let now_ms = self.inner.origin.elapsed().as_millis() as u64;
        let bound_ms = LOOP_STALL_S * 1_000;
        lock(&self.inner.loops)
            .iter()
            .filter(|(_, slot)| !slot.ended.load(Ordering::Relaxed))
            .filter_map(|(name, slot)| {
                let silent_ms = now_ms.saturating_sub(slot.beat_ms.load(Ordering::Relaxed));
                (silent_ms > bound_ms).then(|| (name.clone(), Duration::from_millis(silent_ms)))
            })
            .collect()
    }

    /// `Ok` while every loop beats and the WAL writer's group commit under way (if any, for
    /// `wal_commit_running`) is younger than [`LOOP_STALL_S`], else the body `/health` answers
    /// with.
    pub fn liveness(
        &self,
        wal_failed: bool,
        wal_commit_running: Option<Duration>,
    ) -> Result<(), String> {
        let mut problems = Vec::new();
        if wal_failed {
            problems
                .push("the WAL failed for good (an fsync error): restart to recover".to_owned());
        }
        if let Some(running) = wal_commit_running.filter(|d| d.as_secs() > LOOP_STALL_S) {
            problems.push(format!(
                "the WAL writer's group commit (write and fdatasync) has been running for {} s \
                 (bound {LOOP_STALL_S} s): the disk does not answer",
                running.as_secs()
            ));
        }
        for (name, silent) in self.stalled_loops() {
            problems.push(format!(
                "loop {name} has made no progress for {} s (bound {LOOP_STALL_S} s)",
                silent.as_secs()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("unhealthy\n{}\n", problems.join("\n")))
        }
    }

    /// The drain waits for ClickHouse (or its schema) before its lanes run: not ready, because
    /// of `cause` (redacted and shortened here).
    pub fn drain_waiting(&self, class: &str, cause: &str) {
        *lock(&self.inner.drain_waiting) = Some(format!(
            "waiting for ClickHouse before draining: {class}: {}",
            short_cause(cause)
        ));
    }

    /// The drain reached ClickHouse and checked the schema: its lanes run.
    pub fn drain_started(&self) {
        *lock(&self.inner.drain_waiting) = None;
    }

    /// Registers `table`'s lane (healthy, nothing pending).
    pub fn lane_started(&self, table: &str) {
        lock(&self.inner.lanes).entry(table.to_owned()).or_default();
    }

    /// An insert for `table` failed with `class` because of `cause`: starts or continues the
    /// lane's failure streak.
    pub fn insert_failed(&self, table: &str, class: &str, cause: &str) {
        let mut lanes = lock(&self.inner.lanes);
        let lane = lanes.entry(table.to_owned()).or_default();
        lane.failing_since.get_or_insert_with(Instant::now);
        lane.class = class.to_owned();
        lane.cause = short_cause(cause);
    }

    /// An insert for `table` succeeded: ends the lane's failure streak.
    pub fn insert_succeeded(&self, table: &str) {
        if let Some(lane) = lock(&self.inner.lanes).get_mut(table) {
            lane.failing_since = None;
        }
    }

    /// Sets the publish time of the oldest record `table`'s lane has not inserted (`None`: caught up).
    pub fn lane_pending(&self, table: &str, oldest_pending_ns: Option<i64>) {
        if let Some(lane) = lock(&self.inner.lanes).get_mut(table) {
            lane.oldest_pending_ns = oldest_pending_ns;
        }
    }

    /// Every lane's figures now.
    pub fn lanes(&self) -> Vec<LaneSnapshot> {
        lock(&self.inner.lanes)
            .iter()
            .map(|(table, lane)| LaneSnapshot {
                table: table.clone(),
                failing_for: lane.failing_since.map(|t| t.elapsed()),
                oldest_pending_ns: lane.oldest_pending_ns,
            })
            .collect()
    }

    /// `Ok` while the relay delivers to ClickHouse, else the body `/ready` answers with: one
    /// line per reason, naming the tables.
    pub fn readiness(&self, wal_failed: bool) -> Result<(), String> {
        let bound = Duration::from_secs(self.inner.ready_insert_failing_s.load(Ordering::Relaxed));
        let mut problems = Vec::new();
        if wal_failed {
            problems
                .push("the WAL failed for good (an fsync error): restart to recover".to_owned());
        }
        if let Some(waiting) = lock(&self.inner.drain_waiting).as_ref() {
            problems.push(waiting.clone());
        }
        for (table, lane) in lock(&self.inner.lanes).iter() {
            let Some(since) = lane.failing_since else {
                continue;
            };
            let failing = since.elapsed();
            // Only a retryable failure can pass by itself: any other class (a schema mismatch,
            // refused credentials) needs an operator, so it is reported at once.
            if failing > bound || lane.class != RETRYABLE_CLASS {
                problems.push(format!(
                    "table {table}: inserts failing for {} s (bound {} s), last error {}: {}",
                    failing.as_secs(),
                    bound.as_secs(),
                    lane.class,
                    lane.cause
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("not ready\n{}\n", problems.join("\n")))
        }
    }
}

/// One loop's handle on its liveness slot; dropping it ends the watch (the loop ended).
#[derive(Debug)]
pub struct Heartbeat {
    slot: Arc<Slot>,
    origin: Instant,
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.slot.ended.store(true, Ordering::Relaxed);
    }
}

impl Heartbeat {
    /// The loop made progress.
    pub fn beat(&self) {
        let now_ms = self.origin.elapsed().as_millis() as u64;
        self.slot.beat_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Awaits `future`, a legitimate wait (a retry delay, a bounded request), beating meanwhile.
    pub async fn wait<F: Future>(&self, future: F) -> F::Output {
        self.wait_while(future, || true).await
    }

    /// Awaits `future`, beating meanwhile only while `legitimate()` says the wait is one (an
    /// append waiting for WAL budget is; one waiting for a hung fsync is not).
    pub async fn wait_while<F: Future>(
        &self,
        future: F,
        legitimate: impl Fn() -> bool,
    ) -> F::Output {
        tokio::pin!(future);
        let mut tick = tokio::time::interval(Duration::from_millis(HEARTBEAT_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                output = &mut future => {
                    self.beat();
                    return output;
                }
                _ = tick.tick() => {
                    if legitimate() {
                        self.beat();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_stops_beating_fails_liveness_and_one_waiting_legitimately_does_not() {
        let health = Health::default();
        let waiting = health.heartbeat("drain trades");
        let stuck = health.heartbeat("ingest md");
        let ended = health.heartbeat("ingest gone");
        drop(ended);
        // The waiting loop waits past the stall bound, beating; the stuck one never beats.
        waiting
            .wait(tokio::time::sleep(Duration::from_secs(LOOP_STALL_S + 5)))
            .await;
        let body = health.liveness(false, None).expect_err("a loop is stuck");
        assert!(
            body.contains("loop ingest md has made no progress"),
            "{body}"
        );
        assert!(!body.contains("drain trades"), "{body}");
        assert!(!body.contains("ingest gone"), "{body}");
        stuck.beat();
        assert_eq!(health.liveness(false, None), Ok(()));
        assert!(health.liveness(true, None).is_err());
        let short = Some(Duration::from_millis(30));
        assert_eq!(health.liveness(false, short), Ok(()), "a commit under way");
        let hung = Some(Duration::from_secs(LOOP_STALL_S + 1));
        let body = health.liveness(false, hung).expect_err("a hung commit");
        assert!(body.contains("WAL writer's group commit"), "{body}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_is_not_legitimate_does_not_beat() {
        let health = Health::default();
        let hung = health.heartbeat("ingest md");
        hung.wait_while(
            tokio::time::sleep(Duration::from_secs(LOOP_STALL_S + 5)),
            || false,
        )
        .await;
        // The future's end is progress: the beat after it clears the stall.
        assert_eq!(health.liveness(false, None), Ok(()));
        let pending = hung.wait_while(std::future::pending::<()>(), || false);
        let timed = tokio::time::timeout(Duration::from_secs(LOOP_STALL_S + 5), pending).await;
        assert!(timed.is_err());
        let body = health
            .liveness(false, None)
            .expect_err("no beat while not legitimate");
        assert!(body.contains("ingest md"), "{body}");
    }

    #[tokio::test(start_paused = true)]
    async fn failing_inserts_make_the_relay_unready_past_the_bound_naming_the_table_and_ready_after_a_success(
    ) {
        let health = Health::default();
        health.set_ready_insert_failing_s(30);
        health.drain_started();
        health.lane_started("trades");
        health.lane_started("orderbooks");
        assert_eq!(health.readiness(false), Ok(()));
        health.insert_failed(
            "trades",
            "retryable",
            "connection refused to http://default:s3cret@ch:8123",
        );
        assert_eq!(health.readiness(false), Ok(()), "within the bound");
        tokio::time::advance(Duration::from_secs(31)).await;
        let body = health.readiness(false).expect_err("past the bound");
        assert!(
            body.contains("table trades: inserts failing for 31 s"),
            "{body}"
        );
        assert!(body.contains("retryable: connection refused"), "{body}");
        assert!(!body.contains("orderbooks"), "{body}");
        health.insert_succeeded("trades");
        assert_eq!(health.readiness(false), Ok(()));
        health.insert_failed("funding_rates", "auth", "Authentication failed");
        let body = health
            .readiness(false)
            .expect_err("a class no retry fixes, at once");
        assert!(
            body.contains("table funding_rates") && body.contains("auth"),
            "{body}"
        );
        health.insert_succeeded("funding_rates");
        health.insert_failed("orderbooks", "schema", "No such column x");
        let body = health.readiness(false).expect_err("schema at once");
        assert!(
            body.contains("table orderbooks") && body.contains("schema"),
            "{body}"
        );
    }
}
