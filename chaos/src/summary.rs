//! The result of a run: one row per scenario, the table printed at the end, the final
//! `chaos:` line and the exit code. Pure functions of the rows, so the verdict can be tested
//! without running anything.

use std::fmt::Write as _;
use std::time::Duration;

use crate::schedule::Leg;

/// What one scenario ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The ClickHouse the scenario ran against.
    pub leg: Leg,
    pub number: u8,
    pub name: String,
    /// Faults injected.
    pub cycles: u32,
    /// Message identities JetStream assigned during the scenario.
    pub published: u64,
    /// Published identities with a row under FINAL.
    pub stored: u64,
    /// Published identities with no row but a dead letter.
    pub dead_lettered: u64,
    /// Published identities with neither.
    pub lost: u64,
    /// Identities with more than one row under FINAL.
    pub duplicated: u64,
    /// The longest time from a fault's end until every message published by then was in
    /// ClickHouse; `None` when no fault ended.
    pub catch_up_worst: Option<Duration>,
    /// Why the scenario failed beyond its counts (a check that did not hold, a process that
    /// died, a catch-up that never came); `None` when it passed.
    pub failure: Option<String>,
}

impl Row {
    /// A row before anything ran.
    pub fn new(leg: Leg, number: u8, name: &str) -> Row {
        Row {
            leg,
            number,
            name: name.to_string(),
            cycles: 0,
            published: 0,
            stored: 0,
            dead_lettered: 0,
            lost: 0,
            duplicated: 0,
            catch_up_worst: None,
            failure: None,
        }
    }

    /// Whether the scenario kept the promise: nothing lost, nothing duplicated, every check held.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.failure.is_none()
    }
}

/// The table of a run, one line per scenario and leg, and a header.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:<7} {:>7} {:>10} {:>10} {:>6} {:>10} {:>12}  result",
        "scenario", "leg", "cycles", "published", "stored", "lost", "duplicated", "catch-up"
    );
    for r in rows {
        let catch_up = match r.catch_up_worst {
            Some(d) => format!("{:.1} s", d.as_secs_f64()),
            None => "-".into(),
        };
        let result = match (&r.failure, r.passed()) {
            (Some(why), _) => format!("FAILED: {why}"),
            (None, false) => "FAILED".into(),
            (None, true) => "ok".into(),
        };
        let _ = writeln!(
            out,
            "{:<22} {:<7} {:>7} {:>10} {:>10} {:>6} {:>10} {:>12}  {result}",
            format!("{} {}", r.number, r.name),
            r.leg.name(),
            r.cycles,
            r.published,
            r.stored,
            r.lost,
            r.duplicated,
            catch_up
        );
    }
    out
}

/// The final line (every leg summed: `scenarios` counts a scenario once per leg it ran on)
/// and the process's exit code: 0 only when every scenario passed on every leg.
pub fn verdict(rows: &[Row]) -> (String, u8) {
    let sum = |f: fn(&Row) -> u64| rows.iter().map(f).sum::<u64>();
    let line = format!(
        "chaos: scenarios={} cycles={} published={} stored={} lost={} duplicated={}",
        rows.len(),
        rows.iter().map(|r| u64::from(r.cycles)).sum::<u64>(),
        sum(|r| r.published),
        sum(|r| r.stored),
        sum(|r| r.lost),
        sum(|r| r.duplicated),
    );
    let ok = !rows.is_empty() && rows.iter().all(Row::passed);
    (line, if ok { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(number: u8, published: u64, lost: u64, duplicated: u64) -> Row {
        Row {
            cycles: 2,
            published,
            stored: published - lost,
            lost,
            duplicated,
            catch_up_worst: Some(Duration::from_millis(1_500)),
            ..Row::new(Leg::Legacy, number, &format!("s{number}"))
        }
    }

    fn modern(mut r: Row) -> Row {
        r.leg = Leg::Modern;
        r
    }

    #[test]
    fn a_clean_run_sums_every_scenario_and_exits_zero() {
        let (line, code) = verdict(&[row(1, 100, 0, 0), row(2, 50, 0, 0)]);
        assert_eq!(
            line,
            "chaos: scenarios=2 cycles=4 published=150 stored=150 lost=0 duplicated=0"
        );
        assert_eq!(code, 0);
    }

    #[test]
    fn a_loss_or_a_duplicate_anywhere_shows_the_true_counts_and_exits_one() {
        let (line, code) = verdict(&[row(1, 100, 3, 0), row(2, 50, 0, 2)]);
        assert_eq!(
            line,
            "chaos: scenarios=2 cycles=4 published=150 stored=147 lost=3 duplicated=2"
        );
        assert_eq!(code, 1);
    }

    #[test]
    fn a_failed_check_fails_the_run_even_with_exact_counts() {
        let mut failed = row(6, 10, 0, 0);
        failed.failure = Some("the relay exited on a full disk".into());
        let (_, code) = verdict(&[row(1, 100, 0, 0), failed.clone()]);
        assert_eq!(code, 1);
        assert!(table(&[failed]).contains("FAILED: the relay exited on a full disk"));
        assert_eq!(verdict(&[]).1, 1, "a run of nothing proves nothing");
    }

    #[test]
    fn the_table_has_a_line_per_scenario_with_its_worst_catch_up() {
        let text = table(&[row(1, 100, 0, 0), row(9, 7, 0, 0)]);
        assert_eq!(text.lines().count(), 3);
        assert!(text
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("1 s1") && l.contains("1.5 s") && l.ends_with("ok")));
    }

    #[test]
    fn the_table_names_each_row_leg_and_the_final_line_sums_both_legs() {
        let rows = [
            row(1, 100, 0, 0),
            modern(row(1, 40, 0, 0)),
            modern(row(9, 10, 0, 0)),
        ];
        let text = table(&rows);
        assert_eq!(text.split_whitespace().nth(1), Some("leg"));
        let legs: Vec<&str> = text
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().nth(2).unwrap_or_default())
            .collect();
        assert_eq!(legs, ["legacy", "modern", "modern"]);
        let (line, code) = verdict(&rows);
        assert_eq!(
            line,
            "chaos: scenarios=3 cycles=6 published=150 stored=150 lost=0 duplicated=0"
        );
        assert_eq!(code, 0);
        let mut lossy = rows.to_vec();
        lossy[2].lost = 1;
        assert_eq!(
            verdict(&lossy).1,
            1,
            "a loss on the modern leg alone fails the run"
        );
    }
}
