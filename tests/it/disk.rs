//! A real full disk: the WAL directory on a small tmpfs that the kernel fills to the last byte,
//! either by another file or by the WAL itself. The relay must stay up, stop fetching, keep what
//! it has, resume by itself when space returns, and lose or duplicate nothing.
//!
//! The tests mount a tmpfs, so they need root (they run as root here); a failed mount fails the
//! test with the reason, it is never skipped.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{
    assert_stored_once, http_get, metric_sum, wait_until, Bed, Load, RelayConfig, RelayProc,
};
use prism_relay::tools::verify::VerifyReport;

/// Size of the tmpfs under the WAL: small enough to fill, and drain through a debug build's
/// inserts, in seconds; large enough for many segments plus the ledger's reserve.
const DISK_BYTES: u64 = 16 * 1024 * 1024;
/// Segment size on the small disk: many segments fit, so drained ones can be freed.
const SEGMENT_BYTES: u64 = 512 * 1024;
/// How long a full-disk scenario may take to settle on a loaded 2-core machine.
const DISK_TIMEOUT: Duration = Duration::from_secs(120);

/// Most WARN and ERROR lines the relay may log over a whole full-disk scenario: a start line
/// per condition and per task (three consumers, nine lanes, the keeper), and a few reminders,
/// never one line per retry (a retry loop polls every 100 ms).
const FULL_DISK_LOG_LINES_MAX: usize = 40;

/// A tmpfs mounted on a directory for the life of the value (lazily unmounted on drop, so a
/// process still holding files in it does not keep it mounted).
pub(crate) struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    pub(crate) fn mount(dir: &Path, bytes: u64) -> Tmpfs {
        fs::create_dir_all(dir).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {bytes}-byte tmpfs on {} failed (the full-disk tests need root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    /// Bytes available to an unprivileged writer, as `df` reports them.
    fn available_bytes(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.dir)
            .output()
            .expect("run df");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("df output not understood: {text}"))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Another process's file that takes every free byte of the disk.
struct Filler {
    path: PathBuf,
    file: File,
}

impl Filler {
    fn create(path: &Path) -> Filler {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("create the filler file");
        Filler {
            path: path.to_path_buf(),
            file,
        }
    }

    /// Appends until the kernel refuses even one byte (ENOSPC), in shrinking chunks.
    fn top_off(&mut self) {
        for chunk in [1024 * 1024, 4096, 1] {
            let buf = vec![0xA5u8; chunk];
            while self.file.write_all(&buf).is_ok() {}
        }
    }

    /// Tops the file off until the disk has no byte free. The relay frees what it can while it
    /// is paused (the reserve, released segments), and such a deletion may land between a
    /// top-off and the look at the free space, so this polls with a deadline.
    fn fill_to_zero(&mut self, disk: &Tmpfs) {
        let deadline = std::time::Instant::now() + DISK_TIMEOUT;
        loop {
            self.top_off();
            if disk.available_bytes() == 0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the disk could not be kept full: {} bytes free",
                disk.available_bytes()
            );
        }
    }

    fn delete(self) {
        drop(self.file);
        fs::remove_file(&self.path).expect("delete the filler file");
    }
}

fn disk_config(bed: &Bed, disk: &Tmpfs) -> RelayConfig {
    let mut config = bed.config();
    config.wal_dir = disk.dir.join("wal");
    config.segment_bytes_max = SEGMENT_BYTES;
    // The budget and the replay retention are larger than the disk: the disk fills before
    // either limit frees anything.
    config.budget_bytes_max = 4 * DISK_BYTES;
    config.retention_bytes_max = 2 * DISK_BYTES;
    config.retention_segments_max = 1_000;
    config.rows_max = 2_000;
    config
}

/// Panics with the log if the relay process has exited; otherwise checks `/health` answers 200.
async fn assert_alive(relay: &mut RelayProc) {
    if let Some(status) = relay.try_wait() {
        panic!("the relay exited with {status}; log:\n{}", relay.log());
    }
    let health = http_get(relay.metrics_addr, "/health").await;
    assert!(
        matches!(health, Ok((200, _))),
        "/health answered {health:?}; log:\n{}",
        relay.log()
    );
}

/// Polls verify until every published message is stored; panics with verify's report, the
/// WAL directory's listing and the relay's log after [`DISK_TIMEOUT`].
async fn wait_stored(bed: &Bed, relay: &RelayProc, wal_dir: &Path) -> VerifyReport {
    let deadline = std::time::Instant::now() + DISK_TIMEOUT;
    loop {
        let report = bed.verify().await;
        if report.totals().lost == 0 {
            return report;
        }
        if std::time::Instant::now() >= deadline {
            let listing = Command::new("ls")
                .args(["-la"])
                .arg(wal_dir)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let metrics: String = relay
                .metrics()
                .await
                .lines()
                .filter(|l| l.starts_with("prism_relay") || l.starts_with("marketprism"))
                .map(|l| format!("{l}\n"))
                .collect();
            panic!(
                "not everything stored after {DISK_TIMEOUT:?}:\n{report}\nWAL directory:\n{listing}\nmetrics:\n{metrics}\nlog:\n{}",
                relay.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// WARN and ERROR lines in the relay's log.
fn warn_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .count()
}

/// Panics with the log if the relay logged more WARN and ERROR lines than a rate-limited
/// condition log allows.
fn assert_log_bounded(relay: &RelayProc) {
    let log = relay.log();
    let lines = warn_lines(&log);
    assert!(
        lines <= FULL_DISK_LOG_LINES_MAX,
        "{lines} WARN/ERROR lines (at most {FULL_DISK_LOG_LINES_MAX}); log:\n{log}"
    );
}

/// The relay's `ingest_paused` gauge and received count; panics if the relay is not alive.
async fn paused_and_received(relay: &mut RelayProc) -> (f64, f64) {
    assert_alive(relay).await;
    let metrics = relay.metrics().await;
    (
        metric_sum(&metrics, "prism_relay_ingest_paused", &[]),
        metric_sum(&metrics, "marketprism_storage_messages_received_total", &[]),
    )
}

/// Polls until the `ingest_paused` gauge equals `paused` (topping off the filler, if any, at
/// every poll so the disk stays full); returns the received count then. Panics if the relay
/// dies or the timeout passes.
async fn wait_paused(relay: &mut RelayProc, paused: f64, mut filler: Option<&mut Filler>) -> f64 {
    let deadline = std::time::Instant::now() + DISK_TIMEOUT;
    loop {
        if let Some(f) = filler.as_deref_mut() {
            f.top_off();
        }
        let (now, received) = paused_and_received(relay).await;
        if now == paused {
            return received;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ingest_paused still {now}, not {paused}, after {DISK_TIMEOUT:?}; log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_to_the_last_byte_by_another_file_pauses_ingest_without_exiting_and_it_resumes_when_the_file_goes(
) {
    let bed = Bed::start();
    let disk = Tmpfs::mount(&bed.path("disk"), DISK_BYTES);
    let config = disk_config(&bed, &disk);
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    let count = 20_000;
    let load = Load::new("filler", count).rate(2_000);
    let mut filler = None;
    let fill = async {
        wait_until("some messages received", DISK_TIMEOUT, || async {
            relay
                .metric_sum("marketprism_storage_messages_received_total", &[])
                .await
                > 500.0
        })
        .await;
        let mut f = Filler::create(&disk.dir.join("filler"));
        f.fill_to_zero(&disk);
        filler = Some(f);
    };
    tokio::join!(bed.publish(load), fill);
    let mut filler = filler.expect("the filler ran");

    // The relay stays up and stops fetching while the disk stays full (the filler takes back
    // whatever the relay frees, as another process would).
    let received = wait_paused(&mut relay, 1.0, Some(&mut filler)).await;
    assert!(received < count as f64, "received {received} of {count}");
    // Held while full: the relay is alive and still paused after more retries than a retry
    // loop could survive if the full disk were fatal. (A window in which nothing may change:
    // there is no condition to await instead.)
    for _ in 0..20 {
        filler.top_off();
        let (paused, _) = paused_and_received(&mut relay).await;
        assert_eq!(paused, 1.0, "ingest resumed on a full disk");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    filler.fill_to_zero(&disk);

    filler.delete();
    assert_stored_once(&wait_stored(&bed, &relay, &config.wal_dir).await, count);
    wait_paused(&mut relay, 0.0, None).await;
    assert_log_bounded(&relay);
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_by_the_wal_itself_while_clickhouse_is_down_drains_frees_segments_and_resumes_by_itself(
) {
    let mut bed = Bed::start();
    let disk = Tmpfs::mount(&bed.path("disk"), DISK_BYTES);
    let config = disk_config(&bed, &disk);
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    bed.ch.kill9().expect("kill clickhouse");
    // About 1.7 KB per order book: half as much again as the disk holds.
    let count = 15_000;
    bed.publish(Load::new("walfull", count).mix("orderbook=1"))
        .await;
    let received = wait_paused(&mut relay, 1.0, None).await;
    assert!(received < count as f64, "received {received} of {count}");
    assert!(
        disk.available_bytes() < 2 * SEGMENT_BYTES,
        "the WAL filled the disk: {} bytes free",
        disk.available_bytes()
    );
    assert_alive(&mut relay).await;

    bed.ch.restart().expect("restart clickhouse");
    assert_stored_once(&wait_stored(&bed, &relay, &config.wal_dir).await, count);
    wait_paused(&mut relay, 0.0, None).await;
    // The messages add up to more than the disk holds, so storing them all needed drained
    // segments freed; the first segment is gone.
    let first = config.wal_dir.join(format!("{:020}.wal", 1));
    assert!(
        !first.exists(),
        "the first segment {} is still on disk",
        first.display()
    );
    assert_log_bounded(&relay);
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_while_the_disk_is_full_restarts_with_no_byte_free_stays_up_paused_and_resumes_with_exact_accounting(
) {
    let bed = Bed::start();
    let disk = Tmpfs::mount(&bed.path("disk"), DISK_BYTES);
    let config = disk_config(&bed, &disk);
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    let count = 20_000;
    let load = Load::new("restartfull", count).rate(2_000);
    let mut filler = None;
    let fill = async {
        wait_until("some messages received", DISK_TIMEOUT, || async {
            relay
                .metric_sum("marketprism_storage_messages_received_total", &[])
                .await
                > 500.0
        })
        .await;
        let mut f = Filler::create(&disk.dir.join("filler"));
        f.top_off();
        filler = Some(f);
    };
    tokio::join!(bed.publish(load), fill);
    let mut filler = filler.expect("the filler ran");
    wait_paused(&mut relay, 1.0, Some(&mut filler)).await;

    // Killed on the full disk, and started again with not a byte free. The durable mark is
    // never synced, so a power loss can take it away too; then the removal of the old mark at
    // open frees no page that the new one could take.
    relay.kill9();
    let mark = config.wal_dir.join(prism_wal::DURABLE_MARK_FILE);
    fs::remove_file(&mark).expect("remove the durable mark");
    filler.top_off();
    assert_eq!(disk.available_bytes(), 0, "the filler took every byte");
    relay.restart();
    let deadline = std::time::Instant::now() + DISK_TIMEOUT;
    loop {
        filler.top_off();
        if let Some(status) = relay.try_wait() {
            panic!(
                "the relay exited on a full disk with {status}; log:\n{}",
                relay.log()
            );
        }
        if let Ok((200, _)) = http_get(relay.metrics_addr, "/health").await {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted relay did not answer /health within {DISK_TIMEOUT:?}; log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = wait_paused(&mut relay, 1.0, Some(&mut filler)).await;
    assert!(received < count as f64, "received {received} of {count}");
    // Held while full: alive and paused after more retries than a retry loop could survive if
    // the full disk were fatal at this start. (A window in which nothing may change: there is
    // no condition to await instead.)
    for _ in 0..20 {
        filler.top_off();
        let (paused, _) = paused_and_received(&mut relay).await;
        assert_eq!(paused, 1.0, "ingest resumed on a full disk");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The relay frees what it can (released segments) while paused; the filler takes it back.
    filler.fill_to_zero(&disk);

    filler.delete();
    assert_stored_once(&wait_stored(&bed, &relay, &config.wal_dir).await, count);
    wait_paused(&mut relay, 0.0, None).await;
    assert!(relay.terminate().await.success(), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_on_a_full_disk_without_a_wal_yet_waits_for_space_instead_of_exiting_and_then_runs(
) {
    let bed = Bed::start();
    let disk = Tmpfs::mount(&bed.path("disk"), DISK_BYTES);
    let config = disk_config(&bed, &disk);
    fs::create_dir_all(&config.wal_dir).expect("create the WAL directory");
    let mut filler = Filler::create(&disk.dir.join("filler"));
    filler.top_off();
    assert_eq!(disk.available_bytes(), 0, "the filler took every byte");
    let mut relay = RelayProc::spawn(&bed, "relay", &config);
    // Its first segment cannot be created: the relay says so and keeps trying.
    let deadline = std::time::Instant::now() + DISK_TIMEOUT;
    while !relay.log().contains("cannot open the WAL yet") {
        if let Some(status) = relay.try_wait() {
            panic!(
                "the relay exited on a full disk with {status}; log:\n{}",
                relay.log()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no retry logged within {DISK_TIMEOUT:?}; log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still there after more retries than a crash loop would allow. (A window in which nothing
    // may change: there is no condition to await instead.)
    for _ in 0..10 {
        filler.top_off();
        assert!(relay.try_wait().is_none(), "exited; log:\n{}", relay.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    filler.delete();
    relay.wait_ready().await;
    let count = 2_000;
    bed.publish(Load::new("afterfull", count)).await;
    assert_stored_once(&wait_stored(&bed, &relay, &config.wal_dir).await, count);
    assert!(relay.terminate().await.success(), "{}", relay.log());
}
