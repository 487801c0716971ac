//! The bench's output: one line per scenario (figure, same-run baseline, ratio, target and
//! whether it was met, the counts used), the same as JSON, and the final `bench:` line.

use serde_json::{json, Value};

/// The figures of the final line; a scenario not run (or that failed) leaves its `None`,
/// printed `n/a`.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub drain_ratio: Option<f64>,
    pub outage_ratio: Option<f64>,
    pub wal_ratio: Option<f64>,
    pub rss_mib: Option<f64>,
    pub cpu_pct: Option<f64>,
    pub idle_cpu_pct: Option<f64>,
    pub restart_s: Option<f64>,
}

/// Everything the run printed, for the JSON file.
#[derive(Debug, Default)]
pub struct Report {
    pub summary: Summary,
    pub scenarios: Vec<Value>,
    pub errors: Vec<String>,
}

impl Report {
    /// Prints `line` and keeps `fields` (with the line) for the JSON file.
    pub fn line(&mut self, scenario: &str, line: String, mut fields: Value) {
        println!("{line}");
        if let Value::Object(map) = &mut fields {
            map.insert("scenario".into(), json!(scenario));
            map.insert("line".into(), json!(line));
        }
        self.scenarios.push(fields);
    }

    /// Records a scenario that could not run to its end.
    pub fn failed(&mut self, scenario: &str, error: String) {
        let line = format!("{scenario:<8} FAILED: {error}");
        println!("{line}");
        self.errors.push(line);
    }

    pub fn final_line(&self) -> String {
        let s = &self.summary;
        format!(
            "bench: drain_ratio={} outage_ratio={} wal_ratio={} rss_mib={} cpu_pct={} idle_cpu_pct={} restart_s={}",
            opt(s.drain_ratio, 2),
            opt(s.outage_ratio, 2),
            opt(s.wal_ratio, 2),
            opt(s.rss_mib, 1),
            opt(s.cpu_pct, 2),
            opt(s.idle_cpu_pct, 3),
            opt(s.restart_s, 3)
        )
    }

    pub fn to_json(&self, quick: bool, started_utc: &str) -> Value {
        let s = &self.summary;
        json!({
            "started_utc": started_utc,
            "quick": quick,
            "scenarios": self.scenarios,
            "errors": self.errors,
            "summary": {
                "drain_ratio": s.drain_ratio,
                "outage_ratio": s.outage_ratio,
                "wal_ratio": s.wal_ratio,
                "rss_mib": s.rss_mib,
                "cpu_pct": s.cpu_pct,
                "idle_cpu_pct": s.idle_cpu_pct,
                "restart_s": s.restart_s,
            },
            "final_line": self.final_line(),
        })
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.decimals$}"))
}

/// `met` or `missed`.
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}

/// `1234567.8` as `1,234,568`.
pub fn thousands(v: f64) -> String {
    let n = v.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// The `q` quantile (0..=1) of sorted `values`, nearest rank; `None` when empty.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_printed_with_separators_medians_and_nearest_rank_quantiles() {
        assert_eq!(thousands(1_234_567.6), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&sorted, 0.5), Some(50.0));
        assert_eq!(quantile(&sorted, 0.99), Some(99.0));
    }

    #[test]
    fn the_final_line_names_every_figure_and_says_n_a_for_a_missing_one() {
        let report = Report {
            summary: Summary {
                drain_ratio: Some(0.5),
                ..Summary::default()
            },
            ..Report::default()
        };
        assert_eq!(
            report.final_line(),
            "bench: drain_ratio=0.50 outage_ratio=n/a wal_ratio=n/a rss_mib=n/a cpu_pct=n/a idle_cpu_pct=n/a restart_s=n/a"
        );
    }
}
