//! Injecting one fault of a schedule into a running bed, and the kill points that must land
//! inside a window, aimed by observing the relay and the servers:
//!
//! - insert in flight: ClickHouse's `system.processes` is polled (directly, never through the
//!   proxy) until it lists an `INSERT INTO` query, then the kill is sent at once; the relay's
//!   inserts are the only ones, so a hit means the kill landed while an insert ran (ClickHouse
//!   had the query, the relay had not seen its answer).
//! - between the fsync and the ack: the relay is frozen with SIGSTOP at a random moment; while
//!   it is frozen the runner reads the WAL's durable mark and the records up to it (the way
//!   `wal dump` reads a live WAL) and JetStream's ack floor of each consumer; if the WAL holds
//!   durably a message whose stream sequence is above its consumer's ack floor, the frozen
//!   relay has fsynced records it has not (as far as JetStream knows) acked, and it is killed
//!   with SIGKILL right there. Otherwise it is resumed and tried again a few milliseconds later.
//!
//! Each aim is counted (tried and hit) in [`KillStats`]; a kill whose window never came within
//! the tries is sent anyway and counted as a miss.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use prism_wal::Lsn;

use crate::bed::Bed;
use crate::error::ChaosError;
use crate::schedule::{Fault, FaultKind, KillPoint, ProxyMode};

/// How long a kill aimed at an insert in flight waits for one before it is sent anyway.
const INSERT_AIM_TIMEOUT: Duration = Duration::from_secs(5);

/// Freezes tried for a kill between the fsync and the ack before it is sent anyway.
const FSYNC_AIM_TRIES_MAX: u32 = 40;

/// Records read back from the durable mark when looking for unacked durable messages: more
/// than the relay can have fetched but not acked (three consumers, fetch batches of 500).
const FSYNC_AIM_RECORDS: u64 = 5_000;

/// Bound on waits for the relay's pause metric and for JetStream to discard messages.
const CONDITION_TIMEOUT: Duration = Duration::from_secs(90);

/// Window over which the CPU of a relay paused on a full disk is measured.
const CPU_WINDOW: Duration = Duration::from_secs(2);

/// CPU share of one core above which a paused relay counts as spinning: a paused relay wakes a
/// few times a second; a retry loop without a pause takes a whole core.
const SPIN_CPU_SHARE_MAX: f64 = 0.5;

/// Fetches a paused relay may still complete over a measured window: one per consumer (three),
/// whose pull was in flight when its append met the full disk. Up to [`FULL_WINDOWS_MAX`]
/// windows are measured and the one with the fewest fetches is judged, so pulls still in flight
/// on a loaded machine do not fail a relay that stopped fetching.
const FETCHES_WHILE_PAUSED_MAX: f64 = 3.0;

/// Time after the disk is full and the relay reports a pause for every consumer to meet the full
/// disk (a consumer's pull returns within `fetch_expires_ms`, 250 ms, and then blocks on its
/// append) before the window starts.
const PAUSE_SETTLE: Duration = Duration::from_millis(1_000);

/// Measurement windows tried until one sees the disk stay full for the relay.
const FULL_WINDOWS_MAX: u32 = 5;

/// What the kills of a run did, for the kill-point table.
#[derive(Debug, Clone, Default)]
pub struct KillStats {
    pub clickhouse_kills: u32,
    pub relay_kills: u32,
    pub nats_kills: u32,
    pub clickhouse_stops: u32,
    pub tears: u32,
    pub disk_fills: u32,
    pub proxy_faults: BTreeMap<&'static str, u32>,
    pub retention_outages: u32,
    /// (tried, hit) per aimed kill point: ("clickhouse", point) and ("relay", point).
    pub aims: BTreeMap<(&'static str, &'static str), (u32, u32)>,
}

impl KillStats {
    fn aim(&mut self, process: &'static str, point: KillPoint, hit: bool) {
        let entry = self.aims.entry((process, point.name())).or_default();
        entry.0 += 1;
        entry.1 += u32::from(hit);
    }

    /// Adds another run's counts.
    pub fn add(&mut self, other: &KillStats) {
        self.clickhouse_kills += other.clickhouse_kills;
        self.relay_kills += other.relay_kills;
        self.nats_kills += other.nats_kills;
        self.clickhouse_stops += other.clickhouse_stops;
        self.tears += other.tears;
        self.disk_fills += other.disk_fills;
        self.retention_outages += other.retention_outages;
        for (k, v) in &other.proxy_faults {
            *self.proxy_faults.entry(k).or_default() += v;
        }
        for (k, (t, h)) in &other.aims {
            let e = self.aims.entry(*k).or_default();
            e.0 += t;
            e.1 += h;
        }
    }

    /// The kill-point lines of the report.
    pub fn report(&self) -> String {
        let mut out = format!(
            "faults: clickhouse kills={} relay kills={} (torn tails {}) nats kills={} clickhouse stops={} \
             disk fills={} retention outages={} proxy={:?}\n",
            self.clickhouse_kills,
            self.relay_kills,
            self.tears,
            self.nats_kills,
            self.clickhouse_stops,
            self.disk_fills,
            self.retention_outages,
            self.proxy_faults
        );
        for ((process, point), (tried, hit)) in &self.aims {
            out.push_str(&format!(
                "kill point {process} {point}: hit {hit} of {tried}\n"
            ));
        }
        out
    }
}

/// Injects `fault` and lifts it; returns the moment it ended (the catch-up is measured from
/// there). `log` gets a line per step.
pub fn inject(
    bed: &mut Bed,
    fault: &Fault,
    stats: &mut KillStats,
    log: &mut impl std::io::Write,
) -> Result<Instant, ChaosError> {
    thread::sleep(Duration::from_millis(fault.lead_ms));
    let hold = Duration::from_millis(fault.hold_ms);
    let _ = writeln!(log, "fault {fault:?}");
    match fault.kind {
        FaultKind::ClickHouseKill => {
            if fault.point == KillPoint::InsertInFlight {
                let hit = wait_insert_in_flight(bed);
                stats.aim("clickhouse", fault.point, hit);
            }
            bed.ch.kill9()?;
            stats.clickhouse_kills += 1;
            thread::sleep(hold);
            bed.ch.restart()?;
        }
        FaultKind::ClickHouseStop => {
            bed.ch.pause()?;
            stats.clickhouse_stops += 1;
            thread::sleep(hold);
            bed.ch.resume()?;
        }
        FaultKind::RelayKill => {
            kill_relay(bed, fault.point, stats)?;
            thread::sleep(hold);
            bed.relay.start()?;
        }
        FaultKind::TornTail => {
            kill_relay(bed, KillPoint::Random, stats)?;
            let (appended, cut) = tear_tail(&bed.wal_dir, fault.cut)?;
            let _ = writeln!(log, "tore the tail: {cut} of {appended} bytes appended");
            stats.tears += 1;
            thread::sleep(hold);
            bed.relay.start()?;
        }
        FaultKind::NatsKill => {
            bed.nats.kill9()?;
            stats.nats_kills += 1;
            thread::sleep(hold);
            bed.nats.restart()?;
        }
        FaultKind::DiskFull => {
            disk_full(bed, hold, log)?;
            stats.disk_fills += 1;
            stats.clickhouse_kills += 1;
        }
        FaultKind::ClickHouseSlow => {
            let Some(proxy) = &bed.proxy else {
                return Err(ChaosError::Check(
                    "scenario without a proxy drew a slow ClickHouse".into(),
                ));
            };
            proxy.set_mode(fault.proxy_mode);
            *stats
                .proxy_faults
                .entry(fault.proxy_mode.name())
                .or_default() += 1;
            thread::sleep(hold);
            proxy.set_mode(ProxyMode::Pass);
        }
        FaultKind::RetentionOutage => {
            let before = bed.jetstream()?.streams;
            bed.ch.kill9()?;
            stats.clickhouse_kills += 1;
            stats.retention_outages += 1;
            // The outage outlasts the stream's retention: it goes on until JetStream has
            // discarded every message a stream held when it began (its first sequence passed
            // the last one then), all of which the relay must already hold in its WAL.
            wait_condition(
                "JetStream discarding what it held when the outage began",
                || {
                    let now = bed.jetstream().map(|j| j.streams).unwrap_or_default();
                    now.iter().any(|(name, s)| {
                        before
                            .get(name)
                            .is_some_and(|b| b.last_seq > 0 && s.first_seq > b.last_seq)
                    })
                },
            )?;
            thread::sleep(hold);
            bed.ch.restart()?;
        }
    }
    Ok(Instant::now())
}

fn wait_condition(what: &str, mut condition: impl FnMut() -> bool) -> Result<(), ChaosError> {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    while !condition() {
        if Instant::now() >= deadline {
            return Err(ChaosError::Timeout {
                what: what.into(),
                waited_ms: CONDITION_TIMEOUT.as_millis() as u64,
                detail: String::new(),
            });
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Polls ClickHouse's running queries until one is an INSERT (the relay's); whether one was
/// seen before the aim's timeout.
fn wait_insert_in_flight(bed: &Bed) -> bool {
    let deadline = Instant::now() + INSERT_AIM_TIMEOUT;
    while Instant::now() < deadline {
        let seen = bed
            .ch
            .query_with_timeout(
                "SELECT count() FROM system.processes WHERE query LIKE 'INSERT INTO%'",
                Duration::from_secs(2),
            )
            .ok()
            .and_then(|b| b.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if seen > 0 {
            return true;
        }
    }
    false
}

/// Kills the relay at `point`.
fn kill_relay(bed: &mut Bed, point: KillPoint, stats: &mut KillStats) -> Result<(), ChaosError> {
    match point {
        KillPoint::Random => {}
        KillPoint::InsertInFlight => {
            let hit = wait_insert_in_flight(bed);
            stats.aim("relay", point, hit);
        }
        KillPoint::FsyncBeforeAck => {
            let mut hit = false;
            for attempt in 0..FSYNC_AIM_TRIES_MAX {
                bed.relay.pause()?;
                if durable_but_unacked(bed).unwrap_or(false) {
                    hit = true;
                    break;
                }
                bed.relay.resume()?;
                // A varying pause, so the next freeze lands elsewhere in the relay's cycle.
                thread::sleep(Duration::from_millis(3 + u64::from(attempt * 7 % 23)));
            }
            stats.aim("relay", point, hit);
        }
    }
    bed.relay.kill9()?;
    stats.relay_kills += 1;
    Ok(())
}

/// Whether the WAL holds, up to its durable mark, a message whose stream sequence is above
/// its consumer's ack floor in JetStream (call with the relay frozen).
fn durable_but_unacked(bed: &Bed) -> Result<bool, ChaosError> {
    let Some(mark) = read_durable_mark(&bed.wal_dir) else {
        return Ok(false);
    };
    let segments = prism_wal::list_segments(&bed.wal_dir)?;
    let Some(first) = segments.first() else {
        return Ok(false);
    };
    let from = Lsn(mark
        .saturating_sub(FSYNC_AIM_RECORDS)
        .max(first.first_lsn.0)
        .max(1));
    let mut reader = prism_wal::read_dir(&bed.wal_dir, from)?;
    let mut wal_max: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(record) = reader.next()? {
        if record.lsn.0 > mark {
            break;
        }
        let envelope = record.envelope()?;
        let e = wal_max.entry(envelope.stream.to_string()).or_default();
        *e = (*e).max(envelope.stream_seq.0);
    }
    let floors = bed.jetstream()?.ack_floors;
    Ok(wal_max
        .iter()
        .any(|(stream, max)| floors.get(stream).is_some_and(|floor| max > floor)))
}

/// The durable mark's LSN (file `durable`: magic `PRSMDUR\0`, LSN u64 little-endian, CRC).
fn read_durable_mark(dir: &Path) -> Option<u64> {
    let bytes = fs::read(dir.join(prism_wal::DURABLE_MARK_FILE)).ok()?;
    if bytes.len() < 16 || &bytes[..8] != b"PRSMDUR\0" {
        return None;
    }
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&bytes[8..16]);
    Some(u64::from_le_bytes(lsn))
}

/// Tears the tail of the WAL's last segment like a crash in the middle of a group write:
/// appends copies of the last record under the next LSNs (one to three, by `cut`) and keeps
/// them only up to an offset drawn from `cut` inside the appended bytes, never all of them.
/// Returns (bytes the group would have had, bytes kept).
pub fn tear_tail(dir: &Path, cut: u64) -> Result<(u64, u64), ChaosError> {
    let report = prism_wal::verify(dir)?;
    let Some(last_lsn) = report.last_lsn else {
        return Ok((0, 0));
    };
    let segments = prism_wal::list_segments(dir)?;
    let Some(last) = segments.last() else {
        return Ok((0, 0));
    };
    let envelope = {
        let mut reader = prism_wal::read_dir(dir, last_lsn)?;
        match reader.next()? {
            Some(record) => record.envelope()?.into_owned(),
            None => return Ok((0, 0)),
        }
    };
    let copies = 1 + cut % 3;
    let mut bytes = Vec::new();
    for i in 0..copies {
        prism_wal::segment::encode_record(&mut bytes, Lsn(last_lsn.0 + 1 + i), &envelope)?;
    }
    let total = bytes.len() as u64;
    let keep = tear_offset(cut, total);
    bytes.truncate(keep as usize);
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(&last.path)
        .map_err(|e| ChaosError::io(format!("opening {}", last.path.display()), e))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| ChaosError::io(format!("tearing {}", last.path.display()), e))?;
    Ok((total, keep))
}

/// Where a tear cuts `total` appended bytes: 1 ..= total - 1, from the drawn number (the
/// rotation keeps the choice of the number of copies independent of the offset).
pub fn tear_offset(cut: u64, total: u64) -> u64 {
    if total < 2 {
        return 0;
    }
    1 + cut.rotate_right(17) % (total - 1)
}

/// Scenario 6's fault: ClickHouse killed; once the WAL has grown, a filler file takes every
/// free byte of the small disk (the kernel's ENOSPC); the relay must pause fetching, ack
/// nothing its WAL does not hold, neither spin nor exit; then ClickHouse comes back and the
/// filler goes.
fn disk_full(
    bed: &mut Bed,
    hold: Duration,
    log: &mut impl std::io::Write,
) -> Result<(), ChaosError> {
    let Some(disk) = &bed.disk else {
        return Err(ChaosError::Check(
            "scenario without a small disk drew a full disk".into(),
        ));
    };
    let filler_path = disk.dir.join("filler");
    bed.ch.kill9()?;
    // Let the WAL take part of the outage's backlog first.
    thread::sleep(Duration::from_secs(1));
    let mut filler = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&filler_path)
        .map_err(|e| ChaosError::io("creating the filler", e))?;
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    loop {
        top_off(&mut filler);
        let paused = bed.metric("prism_relay_ingest_paused").unwrap_or(0.0) >= 1.0;
        if disk.available_bytes()? == 0 && paused {
            break;
        }
        if Instant::now() >= deadline {
            return Err(ChaosError::Timeout {
                what: "the relay pausing on a disk filled to the last byte".into(),
                waited_ms: CONDITION_TIMEOUT.as_millis() as u64,
                detail: format!(", {} bytes free", disk.available_bytes().unwrap_or(0)),
            });
        }
        thread::sleep(Duration::from_millis(50));
    }
    // The relay frees what it may while paused (its reserve for the ledger, replay segments
    // retention keeps), appends into that room and meets the full disk again. A window counts
    // once no append succeeded in it: the disk stayed full for the relay all along.
    let mut window = None;
    for _ in 0..FULL_WINDOWS_MAX {
        thread::sleep(PAUSE_SETTLE);
        top_off(&mut filler);
        let fetches = bed.metric("prism_relay_fetch_batches_total")?;
        let received = bed.metric("marketprism_storage_messages_received_total")?;
        let cpu_before = cpu_ticks(bed)?;
        let measured = Instant::now();
        thread::sleep(CPU_WINDOW.max(hold));
        let cpu_share = (cpu_ticks(bed)? - cpu_before) as f64
            / clock_ticks_per_s()
            / measured.elapsed().as_secs_f64();
        let fetched = bed.metric("prism_relay_fetch_batches_total")? - fetches;
        if bed.metric("marketprism_storage_messages_received_total")? == received {
            // A pull issued before the disk filled may still return in the first window on a
            // loaded machine; a relay that keeps fetching fetches in every window, so the window
            // with the fewest fetches is the one judged.
            let fewer = window.is_none_or(|(_, least): (f64, f64)| fetched < least);
            if fewer {
                window = Some((cpu_share, fetched));
            }
            if fetched <= FETCHES_WHILE_PAUSED_MAX {
                break;
            }
        }
    }
    let Some((cpu_share, fetched_while_paused)) = window else {
        return Err(ChaosError::Check(format!(
            "the relay kept appending on a disk the runner kept full ({FULL_WINDOWS_MAX} windows)"
        )));
    };
    let received = bed.metric("marketprism_storage_messages_received_total")?;
    let acks = bed.metric("prism_relay_acks_total")?;
    let measured = format!(
        "disk full: cpu {cpu_share:.3} of a core, fetches while paused {fetched_while_paused}, \
         acks {acks} of {received} durable appends"
    );
    println!("    {measured}");
    let _ = writeln!(log, "{measured}");
    if bed.relay.try_exit()?.is_some() {
        return Err(ChaosError::Check("the relay exited on a full disk".into()));
    }
    if cpu_share > SPIN_CPU_SHARE_MAX {
        return Err(ChaosError::Check(format!(
            "the relay spins on a full disk: {cpu_share:.2} of a core"
        )));
    }
    if fetched_while_paused > FETCHES_WHILE_PAUSED_MAX {
        return Err(ChaosError::Check(format!(
            "the relay kept fetching on a full disk: {fetched_while_paused} fetches"
        )));
    }
    if acks > received {
        return Err(ChaosError::Check(format!(
            "the relay acked {acks} messages but made only {received} durable"
        )));
    }
    // Nothing acked that the WAL does not hold: every consumer's ack floor is at or below the
    // highest stream sequence the WAL holds durably.
    bed.relay.pause()?;
    let unsafe_ack = acked_beyond_wal(bed);
    bed.relay.resume()?;
    if let Some(detail) = unsafe_ack? {
        return Err(ChaosError::Check(detail));
    }
    bed.ch.restart()?;
    drop(filler);
    fs::remove_file(&filler_path).map_err(|e| ChaosError::io("deleting the filler", e))?;
    Ok(())
}

/// Appends to the filler until the kernel refuses even one byte (ENOSPC), in shrinking chunks.
fn top_off(filler: &mut fs::File) {
    for chunk in [1024 * 1024, 4096, 1] {
        let buf = vec![0xA5u8; chunk];
        while filler.write_all(&buf).is_ok() {}
    }
}

/// With the relay frozen: a consumer whose ack floor is past the WAL's durable records.
fn acked_beyond_wal(bed: &Bed) -> Result<Option<String>, ChaosError> {
    let Some(mark) = read_durable_mark(&bed.wal_dir) else {
        return Ok(None);
    };
    let segments = prism_wal::list_segments(&bed.wal_dir)?;
    let Some(first) = segments.first() else {
        return Ok(None);
    };
    let mut reader = prism_wal::read_dir(&bed.wal_dir, first.first_lsn.max(Lsn(1)))?;
    let mut wal_max: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(record) = reader.next()? {
        if record.lsn.0 > mark {
            break;
        }
        let envelope = record.envelope()?;
        let e = wal_max.entry(envelope.stream.to_string()).or_default();
        *e = (*e).max(envelope.stream_seq.0);
    }
    let floors = bed.jetstream()?.ack_floors;
    for (stream, floor) in floors {
        let held = wal_max.get(&stream).copied().unwrap_or(0);
        // A floor of 0 means nothing acked; ClickHouse has been down since before the WAL's
        // oldest kept record, but not since the stream's start, so earlier acks may have
        // left the WAL already: compare only when the WAL holds the stream.
        if floor > held && held > 0 {
            return Ok(Some(format!(
                "{stream}: JetStream's ack floor {floor} is past the WAL's last durable message {held}"
            )));
        }
    }
    Ok(None)
}

/// utime + stime of the relay in clock ticks, from /proc.
fn cpu_ticks(bed: &Bed) -> Result<u64, ChaosError> {
    let pid = bed
        .relay
        .pid()
        .ok_or_else(|| ChaosError::Check("the relay is not running".into()))?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| ChaosError::io(format!("reading /proc/{pid}/stat"), e))?;
    parse_cpu_ticks(&stat).ok_or_else(|| ChaosError::Output {
        what: format!("/proc/{pid}/stat"),
        detail: stat,
    })
}

/// Fields 14 and 15 (utime, stime) of a `/proc/PID/stat` line, counted after the command
/// name's closing parenthesis (the name may hold spaces).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' the fields start at 3 (state): utime is field 14, index 11 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux for every architecture
/// the relay ships on).
fn clock_ticks_per_s() -> f64 {
    100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tear_keeps_at_least_one_byte_and_never_the_whole_group() {
        for cut in [0u64, 1, 2, u64::MAX, 0x1234_5678_9ABC_DEF0] {
            for total in [2u64, 3, 100, 5_000] {
                let keep = tear_offset(cut, total);
                assert!(
                    (1..total).contains(&keep),
                    "cut {cut} total {total}: {keep}"
                );
            }
        }
        assert_eq!(tear_offset(5, 1), 0);
    }

    #[test]
    fn cpu_ticks_are_read_after_a_command_name_with_spaces() {
        let stat =
            "4242 (prism relay) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn aimed_kills_are_counted_as_tried_and_hit() {
        let mut a = KillStats::default();
        a.aim("relay", KillPoint::FsyncBeforeAck, true);
        a.aim("relay", KillPoint::FsyncBeforeAck, false);
        let mut total = KillStats::default();
        total.add(&a);
        total.add(&a);
        assert_eq!(total.aims[&("relay", "fsync-before-ack")], (4, 2));
        assert!(total
            .report()
            .contains("kill point relay fsync-before-ack: hit 2 of 4"));
    }
}
