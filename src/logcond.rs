//! Rate-limited logging of conditions that persist (a full disk, ClickHouse down, NATS down).
//!
//! A retry loop that logs every attempt floods the log: a full disk polled every 100 ms wrote two
//! WARN lines per poll. A [`Condition`] turns the attempts into three kinds of line: one when the
//! condition starts, a reminder every [`CONDITION_REMINDER_S`] while it lasts (with how many times
//! it occurred and for how long), and one when it ends (with the same figures). The metrics carry
//! the rest. The caller logs, so each line keeps its own level, message and fields; the
//! condition only decides when.
//!
//! Time is passed in ([`Condition::occurred_at`], [`Condition::cleared_at`]) so the decisions are
//! tested with made-up instants; the call sites use the `*_now` forms.

use std::time::{Duration, Instant};

/// How often a condition that lasts is logged again (seconds): often enough that a log reader
/// sees it is still on, rarely enough that a day-long outage writes a few thousand lines at most.
pub const CONDITION_REMINDER_S: u64 = 30;

/// What to log for one occurrence of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occurrence {
    /// The condition just started: log it.
    Started,
    /// The condition has lasted a reminder interval since the last line: log it again.
    Ongoing {
        /// Occurrences since the condition started, this one included.
        count: u64,
        /// Time since the condition started.
        lasted: Duration,
    },
}

/// What to log when a condition ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Occurrences while the condition lasted.
    pub count: u64,
    /// How long it lasted.
    pub lasted: Duration,
}

/// One condition's logging state: off, or on since an instant with a count of occurrences.
#[derive(Debug, Clone)]
pub struct Condition {
    /// How long between two lines while the condition lasts.
    reminder: Duration,
    /// When the condition started, when it was last logged, and its occurrences; `None` while off.
    on: Option<On>,
}

#[derive(Debug, Clone, Copy)]
struct On {
    since: Instant,
    logged_at: Instant,
    count: u64,
}

impl Default for Condition {
    fn default() -> Self {
        Condition::new(Duration::from_secs(CONDITION_REMINDER_S))
    }
}

impl Condition {
    /// A condition that is off, logged again every `reminder` while it lasts.
    pub fn new(reminder: Duration) -> Condition {
        Condition { reminder, on: None }
    }

    /// Whether the condition is on.
    pub fn is_on(&self) -> bool {
        self.on.is_some()
    }

    /// Records one occurrence at `now`; returns what to log, if anything.
    pub fn occurred_at(&mut self, now: Instant) -> Option<Occurrence> {
        match &mut self.on {
            None => {
                self.on = Some(On {
                    since: now,
                    logged_at: now,
                    count: 1,
                });
                Some(Occurrence::Started)
            }
            Some(on) => {
                on.count += 1;
                if now.saturating_duration_since(on.logged_at) < self.reminder {
                    return None;
                }
                on.logged_at = now;
                Some(Occurrence::Ongoing {
                    count: on.count,
                    lasted: now.saturating_duration_since(on.since),
                })
            }
        }
    }

    /// Records that the condition is over at `now`; returns what to log if it was on.
    pub fn cleared_at(&mut self, now: Instant) -> Option<Ended> {
        self.on.take().map(|on| Ended {
            count: on.count,
            lasted: now.saturating_duration_since(on.since),
        })
    }

    /// [`Condition::occurred_at`] now.
    pub fn occurred(&mut self) -> Option<Occurrence> {
        self.occurred_at(Instant::now())
    }

    /// [`Condition::cleared_at`] now.
    pub fn cleared(&mut self) -> Option<Ended> {
        self.cleared_at(Instant::now())
    }
}

impl Occurrence {
    /// Occurrences so far (1 when it started).
    pub fn count(&self) -> u64 {
        match self {
            Occurrence::Started => 1,
            Occurrence::Ongoing { count, .. } => *count,
        }
    }

    /// Seconds since the condition started (0 when it started).
    pub fn lasted_s(&self) -> u64 {
        match self {
            Occurrence::Started => 0,
            Occurrence::Ongoing { lasted, .. } => lasted.as_secs(),
        }
    }
}

/// Test support: the log lines `f` writes (level INFO and up) on this thread, formatted as the
/// binary writes them, so a test can count the lines an event flood produces.
#[cfg(test)]
pub(crate) fn captured_logs(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buffer.0.lock().expect("not poisoned").clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REMINDER: Duration = Duration::from_secs(30);

    #[test]
    fn a_condition_polled_every_100_ms_for_a_minute_logs_a_start_one_reminder_at_30_s_and_an_end() {
        let t0 = Instant::now();
        let mut c = Condition::new(REMINDER);
        let mut lines = Vec::new();
        // 600 polls over 60 s (t0 .. t0 + 59.9 s).
        for i in 0..600u64 {
            if let Some(o) = c.occurred_at(t0 + Duration::from_millis(100 * i)) {
                lines.push(o);
            }
        }
        assert_eq!(
            lines,
            vec![
                Occurrence::Started,
                Occurrence::Ongoing {
                    count: 301,
                    lasted: Duration::from_secs(30)
                },
            ]
        );
        let ended = c.cleared_at(t0 + Duration::from_secs(61));
        assert_eq!(
            ended,
            Some(Ended {
                count: 600,
                lasted: Duration::from_secs(61)
            })
        );
        assert!(!c.is_on());
    }

    #[test]
    fn clearing_a_condition_that_is_off_logs_nothing_and_a_new_occurrence_starts_it_again() {
        let t0 = Instant::now();
        let mut c = Condition::new(REMINDER);
        assert_eq!(c.cleared_at(t0), None);
        assert_eq!(c.occurred_at(t0), Some(Occurrence::Started));
        assert_eq!(c.occurred_at(t0 + Duration::from_secs(1)), None);
        assert!(c.cleared_at(t0 + Duration::from_secs(2)).is_some());
        assert_eq!(
            c.occurred_at(t0 + Duration::from_secs(3)),
            Some(Occurrence::Started)
        );
    }

    #[test]
    fn reminders_are_spaced_by_the_interval_from_the_last_line_not_from_the_start() {
        let t0 = Instant::now();
        let mut c = Condition::new(REMINDER);
        c.occurred_at(t0);
        // Sparse occurrences: 45 s after the start, then 60 s (15 s after that reminder).
        assert!(c.occurred_at(t0 + Duration::from_secs(45)).is_some());
        assert_eq!(c.occurred_at(t0 + Duration::from_secs(60)), None);
        assert_eq!(
            c.occurred_at(t0 + Duration::from_secs(75)),
            Some(Occurrence::Ongoing {
                count: 4,
                lasted: Duration::from_secs(75)
            })
        );
    }
}
