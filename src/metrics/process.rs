//! The process's CPU and memory from `/proc/self`, for MarketPrism's `process_cpu_percent` and
//! `process_rss_bytes`.
//!
//! CPU: `utime + stime` of `/proc/self/stat` (clock ticks) sampled at each scrape; the percent
//! is the CPU time used between two scrapes over the wall time between them (100 = one core
//! busy). The first scrape has no previous sample and uses the process's whole life instead
//! (its start time from the same file, against `/proc/uptime`). RSS: `VmRSS` of
//! `/proc/self/status`, which the kernel reports in KiB, so no page size is needed (statm
//! counts pages, whose size differs between architectures).

use std::time::Instant;

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`): 100 on every Linux
/// architecture (the kernel converts to it for user space whatever its internal HZ).
const USER_HZ: f64 = 100.0;

/// Shortest wall time between two CPU samples (ms): scrapes closer together than this would
/// divide a few clock ticks by almost nothing, so the previous percent is kept instead.
const CPU_SAMPLE_SPACING_MS: u128 = 1_000;

/// The previous CPU sample.
#[derive(Debug, Default)]
pub struct CpuSampler {
    /// When the previous sample was taken, and the CPU seconds used then.
    last: Option<(Instant, f64)>,
}

impl CpuSampler {
    /// CPU percent since the previous sample, or over the process's life on the first call;
    /// `None` when `/proc` cannot be read or samples are too close together.
    pub fn sample(&mut self) -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let fields = stat_fields(&stat)?;
        let cpu_s = (fields.utime_ticks + fields.stime_ticks) as f64 / USER_HZ;
        let now = Instant::now();
        let percent = match self.last {
            Some((then, then_cpu_s)) => {
                let wall = now.duration_since(then);
                if wall.as_millis() < CPU_SAMPLE_SPACING_MS {
                    return None;
                }
                100.0 * (cpu_s - then_cpu_s).max(0.0) / wall.as_secs_f64()
            }
            None => {
                let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
                let uptime_s: f64 = uptime.split_whitespace().next()?.parse().ok()?;
                let life_s = uptime_s - fields.start_ticks as f64 / USER_HZ;
                if life_s <= 0.0 {
                    return None;
                }
                100.0 * cpu_s / life_s
            }
        };
        self.last = Some((now, cpu_s));
        Some(percent)
    }
}

/// The fields of `/proc/<pid>/stat` the sampler needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatFields {
    /// Field 14: user-mode CPU time, clock ticks.
    utime_ticks: u64,
    /// Field 15: kernel-mode CPU time, clock ticks.
    stime_ticks: u64,
    /// Field 22: start time after boot, clock ticks.
    start_ticks: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may contain
/// spaces and parentheses itself, so fields are counted after its last `)`.
fn stat_fields(stat: &str) -> Option<StatFields> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the command name.
    let field =
        |n: usize| -> Option<u64> { after_comm.split_whitespace().nth(n - 3)?.parse().ok() };
    Some(StatFields {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        start_ticks: field(22)?,
    })
}

/// Resident set size of this process now, bytes; `None` when `/proc` cannot be read.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (prism (relay) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    1234 567 0 0 20 0 9 0 98765 123456789 4321 18446744073709551615";
        assert_eq!(
            stat_fields(stat),
            Some(StatFields {
                utime_ticks: 1234,
                stime_ticks: 567,
                start_ticks: 98765,
            })
        );
    }

    #[test]
    fn this_process_reports_a_plausible_rss_and_cpu_percent() {
        let rss = rss_bytes().expect("/proc/self/status is readable");
        assert!(rss > 1024 * 1024, "rss {rss}");
        let mut cpu = CpuSampler::default();
        let first = cpu.sample().expect("first sample over the process's life");
        assert!((0.0..=100.0 * 1024.0).contains(&first), "{first}");
        // Within the spacing, no new figure.
        assert_eq!(cpu.sample(), None);
    }
}
