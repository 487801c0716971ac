//! The nine scenarios and their fault schedules, drawn from a seed.
//!
//! A schedule is a pure function of the run's seed, the scenario and the run's length
//! (`--quick` or full): every delay, outage length, kill point, proxy mode and tear offset is
//! drawn here, before anything runs, so `--seed` replays the same faults in the same order.
//! (What the servers do in between, such as how far the relay got when a kill lands, still
//! depends on timing; the kill points that must land inside a window are aimed by observing the
//! relay, see `faults`.)

use crate::prng::{derive_seed, SplitMix64};

/// What a fault does; each scenario draws from its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// kill -9 of ClickHouse, restart on its data after the outage.
    ClickHouseKill,
    /// SIGSTOP of ClickHouse for longer than the insert timeout, then SIGCONT.
    ClickHouseStop,
    /// kill -9 of the relay, restart on its WAL.
    RelayKill,
    /// kill -9 of NATS, restart on its store.
    NatsKill,
    /// kill -9 of the relay, its last segment torn at a random offset, restart.
    TornTail,
    /// ClickHouse down, the WAL's filesystem filled to the last byte, then both repaired.
    DiskFull,
    /// The proxy in front of ClickHouse slows, stalls or resets connections.
    ClickHouseSlow,
    /// ClickHouse down until JetStream has discarded messages under its limits.
    RetentionOutage,
}

impl FaultKind {
    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ClickHouseKill => "clickhouse-kill",
            FaultKind::ClickHouseStop => "clickhouse-stop",
            FaultKind::RelayKill => "relay-kill",
            FaultKind::NatsKill => "nats-kill",
            FaultKind::TornTail => "torn-tail",
            FaultKind::DiskFull => "disk-full",
            FaultKind::ClickHouseSlow => "clickhouse-slow",
            FaultKind::RetentionOutage => "retention-outage",
        }
    }
}

/// When a kill lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillPoint {
    /// After the drawn delay, whatever the process is doing.
    Random,
    /// As soon as ClickHouse lists an INSERT of the relay among its running queries.
    InsertInFlight,
    /// While the relay, frozen by SIGSTOP, holds records its WAL has made durable whose
    /// messages JetStream has not seen acked (see `faults`).
    FsyncBeforeAck,
}

impl KillPoint {
    /// Short name for logs and the kill-point table.
    pub fn name(self) -> &'static str {
        match self {
            KillPoint::Random => "random",
            KillPoint::InsertInFlight => "insert-in-flight",
            KillPoint::FsyncBeforeAck => "fsync-before-ack",
        }
    }
}

/// How the proxy in front of ClickHouse misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forwards bytes as they come.
    Pass,
    /// Delays every chunk in both directions.
    Latency,
    /// Holds every response until the mode changes (past the insert timeout).
    Stall,
    /// Forwards part of a request, then resets both connections.
    Reset,
}

impl ProxyMode {
    /// The three misbehaving modes.
    pub const FAULTS: [ProxyMode; 3] = [ProxyMode::Latency, ProxyMode::Stall, ProxyMode::Reset];

    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Pass => "pass",
            ProxyMode::Latency => "latency",
            ProxyMode::Stall => "stall",
            ProxyMode::Reset => "reset",
        }
    }
}

/// One fault of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// Load runs this long before the fault starts (a random point of the traffic).
    pub lead_ms: u64,
    /// How long the fault lasts (outage, stall, slow period; for a relay kill, the time the
    /// relay stays down; for a retention outage, the least outage, which goes on until
    /// JetStream has discarded messages).
    pub hold_ms: u64,
    /// For kills: when the kill lands.
    pub point: KillPoint,
    /// For `ClickHouseSlow`: the proxy's mode.
    pub proxy_mode: ProxyMode,
    /// For `TornTail`: where the tail is cut, as a random number the tear reduces to an
    /// offset inside the bytes it appends.
    pub cut: u64,
}

/// What a scenario's bed needs beyond NATS, ClickHouse and the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// A proxy between the relay and ClickHouse's HTTP port.
    pub proxy: bool,
    /// The WAL on a small tmpfs (root only).
    pub small_disk: bool,
    /// `max_msgs` of every stream (limits retention, discard old), when small.
    pub stream_max_msgs: Option<u64>,
}

/// Which ClickHouse a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Leg {
    /// clickhouse-server 18.16; the relay's `profile = "auto"` picks the legacy profile.
    Legacy,
    /// The modern engine behind the test bed's HTTP stand-in (`prism_testbed::Chdb`); `auto`
    /// picks the modern profile (insert tokens, non-replicated deduplication).
    Modern,
}

impl Leg {
    /// Short name for the table, logs and directories.
    pub fn name(self) -> &'static str {
        match self {
            Leg::Legacy => "legacy",
            Leg::Modern => "modern",
        }
    }

    /// The legs `--leg` names: `legacy`, `modern` or `both` (legacy first).
    pub fn parse_list(text: &str) -> Option<Vec<Leg>> {
        match text {
            "legacy" => Some(vec![Leg::Legacy]),
            "modern" => Some(vec![Leg::Modern]),
            "both" => Some(vec![Leg::Legacy, Leg::Modern]),
            _ => None,
        }
    }
}

/// Cycles of a scenario on the modern leg, quick and full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModernCycles {
    pub quick: u32,
    pub full: u32,
}

/// A scenario: its faults and how many cycles a quick and a full run give it.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// 1 ..= 9, as in docs/RELIABILITY.md.
    pub number: u8,
    pub name: &'static str,
    /// Fault kinds the schedule draws from.
    pub kinds: &'static [FaultKind],
    pub cycles_quick: u32,
    pub cycles_full: u32,
    /// Cycles on the modern leg; `None` for a scenario whose faults do not involve ClickHouse
    /// (NATS kills), which the legacy leg covers for both. Fewer than on the legacy leg: the
    /// stand-in serves one statement at a time and restarts slower, and the legacy leg
    /// already gives each fault its count.
    pub modern: Option<ModernCycles>,
    pub needs: Needs,
}

impl Scenario {
    /// The cycles this scenario gets on `leg` in a quick or full run; `None` when it does not
    /// run on that leg.
    pub fn cycles(&self, leg: Leg, quick: bool) -> Option<u32> {
        match (leg, quick) {
            (Leg::Legacy, true) => Some(self.cycles_quick),
            (Leg::Legacy, false) => Some(self.cycles_full),
            (Leg::Modern, true) => self.modern.map(|m| m.quick),
            (Leg::Modern, false) => self.modern.map(|m| m.full),
        }
    }

    /// Whether every fault of the scenario is on ClickHouse's side (kill, stop, slow,
    /// outage): the relay keeps running, so every retried batch carries its first attempt's
    /// token and the modern server must hold every row once without FINAL. A relay or NATS
    /// fault redelivers messages the relay writes again in other batches, which only FINAL
    /// collapses.
    pub fn clickhouse_faults_only(&self) -> bool {
        self.kinds.iter().all(|k| {
            matches!(
                k,
                FaultKind::ClickHouseKill
                    | FaultKind::ClickHouseStop
                    | FaultKind::ClickHouseSlow
                    | FaultKind::RetentionOutage
            )
        })
    }
}

const fn modern(quick: u32, full: u32) -> Option<ModernCycles> {
    Some(ModernCycles { quick, full })
}

/// Insert timeout of the relays the runner starts; stalls are drawn past it.
pub const INSERT_TIMEOUT_MS: u64 = 2_000;

/// Stream limit of scenario 8: JetStream keeps a few seconds of the load, so an outage of the
/// drawn length makes it discard messages the relay has already written to its WAL.
pub const SMALL_STREAM_MSGS: u64 = 3_000;

/// Stream limit of scenario 9: small enough that a retention outage ends within seconds, large
/// enough that the busiest stream keeps about 18 s of its load, longer than any relay outage or
/// full-disk pause the scenario draws (JetStream keeps the messages the relay has not fetched).
pub const MIXED_STREAM_MSGS: u64 = 8_000;

const NOTHING: Needs = Needs {
    proxy: false,
    small_disk: false,
    stream_max_msgs: None,
};

/// The nine scenarios of the suite.
pub const SCENARIOS: [Scenario; 9] = [
    Scenario {
        number: 1,
        name: "clickhouse-kill",
        kinds: &[FaultKind::ClickHouseKill],
        cycles_quick: 3,
        cycles_full: 100,
        modern: modern(2, 30),
        needs: NOTHING,
    },
    Scenario {
        number: 2,
        name: "clickhouse-stop",
        kinds: &[FaultKind::ClickHouseStop],
        cycles_quick: 1,
        cycles_full: 6,
        modern: modern(1, 4),
        needs: NOTHING,
    },
    Scenario {
        number: 3,
        name: "relay-kill",
        kinds: &[FaultKind::RelayKill],
        cycles_quick: 3,
        cycles_full: 50,
        modern: modern(2, 20),
        needs: NOTHING,
    },
    Scenario {
        number: 4,
        name: "nats-kill",
        kinds: &[FaultKind::NatsKill],
        cycles_quick: 2,
        cycles_full: 6,
        modern: None,
        needs: NOTHING,
    },
    Scenario {
        number: 5,
        name: "torn-tail",
        kinds: &[FaultKind::TornTail],
        cycles_quick: 2,
        cycles_full: 8,
        modern: modern(1, 4),
        needs: NOTHING,
    },
    Scenario {
        number: 6,
        name: "disk-full",
        kinds: &[FaultKind::DiskFull],
        cycles_quick: 1,
        cycles_full: 3,
        modern: modern(1, 2),
        needs: Needs {
            proxy: false,
            small_disk: true,
            stream_max_msgs: None,
        },
    },
    Scenario {
        number: 7,
        name: "clickhouse-slow",
        kinds: &[FaultKind::ClickHouseSlow],
        cycles_quick: 3,
        cycles_full: 9,
        modern: modern(3, 6),
        needs: Needs {
            proxy: true,
            small_disk: false,
            stream_max_msgs: None,
        },
    },
    Scenario {
        number: 8,
        name: "retention-outage",
        kinds: &[FaultKind::RetentionOutage],
        cycles_quick: 1,
        cycles_full: 3,
        modern: modern(1, 2),
        needs: Needs {
            proxy: false,
            small_disk: false,
            stream_max_msgs: Some(SMALL_STREAM_MSGS),
        },
    },
    Scenario {
        number: 9,
        name: "everything",
        kinds: &[
            FaultKind::ClickHouseKill,
            FaultKind::ClickHouseStop,
            FaultKind::RelayKill,
            FaultKind::NatsKill,
            FaultKind::TornTail,
            FaultKind::DiskFull,
            FaultKind::ClickHouseSlow,
            FaultKind::RetentionOutage,
        ],
        cycles_quick: 4,
        cycles_full: 12,
        modern: modern(3, 8),
        needs: Needs {
            proxy: true,
            small_disk: true,
            stream_max_msgs: Some(MIXED_STREAM_MSGS),
        },
    },
];

/// The scenario numbered `number`.
pub fn scenario(number: u8) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.number == number)
}

/// The faults of `scenario` for a run seeded with `seed`: `cycles` faults, each drawn from
/// the scenario's kinds. Kill points rotate from a drawn start, so even a short run aims at
/// every point.
pub fn draw(seed: u64, scenario: &Scenario, cycles: u32) -> Vec<Fault> {
    let mut rng = SplitMix64::new(derive_seed(seed, u64::from(scenario.number)));
    let rotation = rng.range(0, 5);
    (0..u64::from(cycles))
        .map(|i| {
            let kind = rng.pick(scenario.kinds);
            let lead_ms = rng.range(200, 1_500);
            let hold_ms = match kind {
                FaultKind::ClickHouseKill => rng.range(200, 2_000),
                FaultKind::ClickHouseStop => {
                    rng.range(INSERT_TIMEOUT_MS + 500, INSERT_TIMEOUT_MS + 3_000)
                }
                FaultKind::RelayKill | FaultKind::TornTail => rng.range(0, 1_500),
                FaultKind::NatsKill => rng.range(200, 2_000),
                FaultKind::DiskFull => rng.range(2_000, 4_000),
                FaultKind::ClickHouseSlow => rng.range(2_500, 5_000),
                FaultKind::RetentionOutage => rng.range(500, 2_000),
            };
            let point = match kind {
                FaultKind::RelayKill => [
                    KillPoint::Random,
                    KillPoint::InsertInFlight,
                    KillPoint::FsyncBeforeAck,
                ][((rotation + i) % 3) as usize],
                FaultKind::ClickHouseKill => {
                    [KillPoint::Random, KillPoint::InsertInFlight][((rotation + i) % 2) as usize]
                }
                _ => KillPoint::Random,
            };
            let proxy_mode = ProxyMode::FAULTS[((rotation + i) % 3) as usize];
            let cut = rng.next_u64();
            Fault {
                kind,
                lead_ms,
                hold_ms,
                point,
                proxy_mode,
                cut,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_schedule_for_every_scenario() {
        for s in &SCENARIOS {
            assert_eq!(draw(99, s, 20), draw(99, s, 20), "scenario {}", s.number);
        }
    }

    #[test]
    fn another_seed_draws_another_schedule() {
        let s = scenario(1).expect("scenario 1");
        assert_ne!(draw(1, s, 10), draw(2, s, 10));
    }

    #[test]
    fn a_scenario_schedule_does_not_depend_on_the_other_scenarios() {
        // Scenario 3 alone or after others: its faults come from the seed and its number.
        let s3 = scenario(3).expect("scenario 3");
        let _ = draw(5, scenario(1).expect("scenario 1"), 7);
        assert_eq!(draw(5, s3, 4), draw(5, s3, 4));
        assert_ne!(draw(5, s3, 4), draw(5, scenario(4).expect("scenario 4"), 4));
    }

    #[test]
    fn faults_come_from_the_scenario_kinds_and_stalls_outlast_the_insert_timeout() {
        for s in &SCENARIOS {
            for f in draw(3, s, 50) {
                assert!(s.kinds.contains(&f.kind), "{f:?} in scenario {}", s.number);
                if f.kind == FaultKind::ClickHouseStop {
                    assert!(f.hold_ms > INSERT_TIMEOUT_MS, "{f:?}");
                }
                assert_ne!(f.proxy_mode, ProxyMode::Pass);
            }
        }
    }

    #[test]
    fn a_short_schedule_aims_at_every_kill_point_and_every_proxy_mode() {
        let relay = draw(11, scenario(3).expect("scenario 3"), 3);
        for point in [
            KillPoint::Random,
            KillPoint::InsertInFlight,
            KillPoint::FsyncBeforeAck,
        ] {
            assert!(relay.iter().any(|f| f.point == point), "{point:?}");
        }
        let slow = draw(11, scenario(7).expect("scenario 7"), 3);
        for mode in ProxyMode::FAULTS {
            assert!(slow.iter().any(|f| f.proxy_mode == mode), "{mode:?}");
        }
    }

    #[test]
    fn the_full_run_has_at_least_a_hundred_clickhouse_kills_and_fifty_relay_kills() {
        let count = |kinds: &[FaultKind]| -> u32 {
            SCENARIOS
                .iter()
                .filter(|s| s.kinds.len() == 1 && kinds.contains(&s.kinds[0]))
                .map(|s| s.cycles_full)
                .sum()
        };
        assert!(count(&[FaultKind::ClickHouseKill]) >= 100);
        assert!(count(&[FaultKind::RelayKill, FaultKind::TornTail]) >= 50);
        assert_eq!(SCENARIOS.len(), 9);
    }
}
