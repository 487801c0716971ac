//! `prism-relay replay` against a WAL the relay wrote and a real ClickHouse: replay reproduces
//! the relay's rows, honours LSN, time and table ranges, runs next to a live relay, is
//! idempotent, starts at the oldest segment retention kept, and stops at (or, when asked,
//! reports and skips) a corrupt segment; on a modern engine (`modern::ChdbServer`) a second
//! replay inserts nothing at all. Also `wal dump` (byte-exact payloads) and `wal
//! inspect` (what retention deletes next), on WALs the tests write themselves.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::Path;

use prism_wal::{Envelope, Ledger, Lsn, StreamSeq, Wal, WalOptions};

use crate::harness::{
    relay_command, wait_until_sync, Bed, InProcRelay, Load, RelayConfig, DATABASE, DRAIN_TIMEOUT,
    TABLES,
};
use crate::TestResult;

/// The database replays write into in these tests.
const REPLAYED: &str = "replayed";

/// One WAL record's identity and publish time, read back with the WAL's own reader.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Record {
    lsn: u64,
    stream: String,
    seq: u64,
    published_ns: i64,
}

/// Every record on disk in `dir`, from the oldest segment.
fn wal_records(dir: &Path) -> Vec<Record> {
    let segments = prism_wal::list_segments(dir).expect("list segments");
    let Some(first) = segments.first() else {
        return Vec::new();
    };
    let mut reader = prism_wal::read_dir(dir, first.first_lsn).expect("read WAL");
    let mut out = Vec::new();
    while let Some(record) = reader.next().expect("WAL reads") {
        let envelope = record.envelope().expect("envelope decodes");
        out.push(Record {
            lsn: record.lsn.0,
            stream: envelope.stream.to_string(),
            seq: envelope.stream_seq.0,
            published_ns: envelope.published_ns,
        });
    }
    out
}

/// A relay configuration with small segments, so a few thousand messages span many of them.
fn small_segments(bed: &Bed) -> RelayConfig {
    let mut config = bed.config();
    config.segment_bytes_max = 65_536;
    config
}

/// Runs the relay in-process until `count` messages are stored, then stops it.
async fn relay_writes(bed: &Bed, config: &RelayConfig, run_id: &str, count: u64) {
    let relay = InProcRelay::spawn(config);
    relay.wait_ready().await;
    bed.publish(Load::new(run_id, count)).await;
    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert_eq!(report.totals().duplicated, 0, "{report}");
    relay.stop().await.expect("relay stops cleanly");
}

/// Creates `db` with empty copies of the relay's tables, so a replay finds its schema.
fn empty_copy_of_the_relay_tables(bed: &Bed, db: &str) {
    bed.sql(&format!("CREATE DATABASE IF NOT EXISTS {db}"));
    for table in TABLES.iter().chain(["dead_letters"].iter()) {
        bed.sql(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.{table} AS {DATABASE}.{table}"
        ));
    }
}

/// The (stream, seq) identities stored in every typed table of `db`, under FINAL.
fn identities(bed: &Bed, db: &str) -> BTreeSet<(String, u64)> {
    let mut out = BTreeSet::new();
    for table in TABLES {
        for row in bed.rows(&format!(
            "SELECT nats_stream, nats_seq FROM {db}.{table} FINAL"
        )) {
            out.insert((
                row[0].clone(),
                row[1].parse().expect("nats_seq is a number"),
            ));
        }
    }
    out
}

/// Every column the relay writes (all but the server-filled `created_at`) of every row of
/// `table` in `db` under FINAL, restricted to the identities the replayed copy holds, in
/// identity order.
fn rows_of(bed: &Bed, db: &str, table: &str) -> String {
    let columns: Vec<String> = bed
        .rows(&format!(
            "SELECT name FROM system.columns WHERE database = '{DATABASE}' AND table = '{table}' \
             AND name != 'created_at'"
        ))
        .into_iter()
        .map(|row| format!("`{}`", row[0]))
        .collect();
    assert!(columns.len() > 2, "columns of {table}: {columns:?}");
    bed.sql(&format!(
        "SELECT {} FROM {db}.{table} FINAL WHERE (nats_stream, nats_seq) IN \
         (SELECT nats_stream, nats_seq FROM {REPLAYED}.{table}) ORDER BY nats_stream, nats_seq",
        columns.join(", ")
    ))
}

/// Asserts two TSV results are equal, naming the first line that differs (not the whole text).
fn assert_same_rows(left: &str, right: &str, what: &str) {
    let (l, r): (Vec<&str>, Vec<&str>) = (left.lines().collect(), right.lines().collect());
    if let Some(i) = (0..l.len().max(r.len())).find(|i| l.get(*i) != r.get(*i)) {
        panic!(
            "{what}: {} vs {} lines; line {i} differs:\n  {:?}\n  {:?}",
            l.len(),
            r.len(),
            l.get(i),
            r.get(i)
        );
    }
}

fn identities_of<'r>(records: impl IntoIterator<Item = &'r Record>) -> BTreeSet<(String, u64)> {
    records
        .into_iter()
        .map(|r| (r.stream.clone(), r.seq))
        .collect()
}

async fn replay(config_path: &Path, extra: &[&str]) -> (bool, String) {
    let config = config_path.display().to_string();
    let mut args = vec![
        "replay",
        "--config",
        config.as_str(),
        "--database",
        REPLAYED,
    ];
    args.extend_from_slice(extra);
    let (status, output) = relay_command(&args).await;
    (status.success(), output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_without_a_range_starts_at_the_oldest_segment_retention_kept_and_reproduces_every_column(
) -> TestResult {
    let bed = Bed::start();
    let mut config = small_segments(&bed);
    // Keep two released segments: retention deletes the older ones, LSN 1 among them.
    config.retention_segments_max = 2;
    relay_writes(&bed, &config, "oldest", 3_000).await;
    let wal = config.wal_dir.clone();
    let segments = prism_wal::list_segments(&wal)?;
    assert!(
        segments.first().is_some_and(|s| s.first_lsn > Lsn(1)),
        "retention deleted the first segments: {segments:?}"
    );
    let on_disk = wal_records(&wal);
    assert!(!on_disk.is_empty());
    empty_copy_of_the_relay_tables(&bed, REPLAYED);
    let path = config.write(&bed.path("relay.toml"));

    let (ok, output) = replay(&path, &[]).await;

    assert!(ok, "replay failed:\n{output}");
    assert_eq!(
        identities(&bed, REPLAYED),
        identities_of(&on_disk),
        "{output}"
    );
    for table in TABLES {
        assert_same_rows(
            &rows_of(&bed, REPLAYED, table),
            &rows_of(&bed, DATABASE, table),
            &format!("every column of {table} as the relay wrote it"),
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_an_lsn_range_or_a_publish_time_range_inserts_exactly_the_records_inside_it(
) -> TestResult {
    let bed = Bed::start();
    let config = small_segments(&bed);
    relay_writes(&bed, &config, "ranges", 2_000).await;
    let records = wal_records(&config.wal_dir);
    let path = config.write(&bed.path("relay.toml"));
    empty_copy_of_the_relay_tables(&bed, REPLAYED);

    // An LSN range inside the WAL, crossing segments.
    let (from, to) = (records[300].lsn, records[1_400].lsn);
    let (ok, output) = replay(
        &path,
        &["--from-lsn", &from.to_string(), "--to-lsn", &to.to_string()],
    )
    .await;
    assert!(ok, "{output}");
    let expected = identities_of(records.iter().filter(|r| (from..=to).contains(&r.lsn)));
    assert_eq!(identities(&bed, REPLAYED), expected, "{output}");

    // A publish-time range, one bound in RFC 3339 and one in epoch milliseconds.
    for table in TABLES {
        bed.sql(&format!("TRUNCATE TABLE {REPLAYED}.{table}"));
    }
    let mut times: Vec<i64> = records.iter().map(|r| r.published_ns / 1_000_000).collect();
    times.sort();
    let (from_ms, to_ms) = (times[times.len() / 4], times[times.len() * 3 / 4]);
    let from_rfc3339 = rfc3339(from_ms);
    let (ok, output) = replay(
        &path,
        &[
            "--from-time",
            &from_rfc3339,
            "--to-time",
            &to_ms.to_string(),
        ],
    )
    .await;
    assert!(ok, "{output}");
    let expected =
        identities_of(records.iter().filter(|r| {
            r.published_ns >= from_ms * 1_000_000 && r.published_ns <= to_ms * 1_000_000
        }));
    assert!(!expected.is_empty() && expected.len() < records.len());
    assert_eq!(identities(&bed, REPLAYED), expected, "{output}");
    Ok(())
}

/// `ms` as RFC 3339 with a +01:00 offset, computed independently of the parser under test.
fn rfc3339(ms: i64) -> String {
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}", (ms + 3_600_000) / 1000),
            "+%Y-%m-%dT%H:%M:%S",
        ])
        .output()
        .expect("date runs");
    let text = String::from_utf8(out.stdout).expect("date prints UTF-8");
    format!("{}.{:03}+01:00", text.trim(), ms.rem_euclid(1000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_twice_changes_nothing_under_final_and_a_table_filter_touches_only_its_tables(
) -> TestResult {
    let bed = Bed::start();
    let config = small_segments(&bed);
    relay_writes(&bed, &config, "twice", 1_600).await;
    let path = config.write(&bed.path("relay.toml"));
    empty_copy_of_the_relay_tables(&bed, REPLAYED);

    let (ok, output) = replay(&path, &["--table", "trades", "--table", "funding_rates"]).await;
    assert!(ok, "{output}");
    for table in TABLES {
        let count: u64 = bed
            .sql(&format!("SELECT count() FROM {REPLAYED}.{table}"))
            .trim()
            .parse()?;
        let selected = table == "trades" || table == "funding_rates";
        assert_eq!(count > 0, selected, "{table} after a replay of two tables");
    }

    let (ok, output) = replay(&path, &[]).await;
    assert!(ok, "{output}");
    let first: Vec<String> = TABLES.iter().map(|t| rows_of(&bed, REPLAYED, t)).collect();
    let (ok, output) = replay(&path, &[]).await;
    assert!(ok, "{output}");
    let second: Vec<String> = TABLES.iter().map(|t| rows_of(&bed, REPLAYED, t)).collect();
    for (table, (first, second)) in TABLES.iter().zip(first.iter().zip(&second)) {
        assert_same_rows(
            first,
            second,
            &format!("{table} under FINAL after a second replay"),
        );
    }
    assert_eq!(
        identities(&bed, REPLAYED),
        identities(&bed, DATABASE),
        "the replays reproduce the relay's identities"
    );

    let (ok, output) = replay(&path, &["--table", "trade"]).await;
    assert!(!ok, "an unknown table is an error");
    assert!(
        output.contains("unknown table \"trade\"") && output.contains("trades, orderbooks"),
        "{output}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_next_to_a_running_relay_reads_its_wal_and_leaves_its_cursors_and_segments_alone(
) -> TestResult {
    let bed = Bed::start();
    let mut config = small_segments(&bed);
    // Retention keeps every released segment, so the test can show the replay deleted none.
    config.retention_segments_max = 100_000;
    config.retention_bytes_max = u64::MAX;
    let relay = InProcRelay::spawn(&config);
    relay.wait_ready().await;
    bed.publish(Load::new("live-1", 1_500)).await;
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    let wal = config.wal_dir.clone();
    let ledger_before = prism_wal::load_ledger(&wal)?;
    let segments_before = prism_wal::list_segments(&wal)?;
    empty_copy_of_the_relay_tables(&bed, REPLAYED);
    let path = config.write(&bed.path("relay.toml"));

    // The relay holds the WAL's lock and keeps ingesting while the replay reads.
    let publishing = {
        let nats = bed.nats.url();
        tokio::spawn(async move {
            let opts = prism_relay::tools::loadgen::LoadgenOptions {
                nats_url: nats,
                create_streams: false,
                count: Some(1_000),
                rate_per_s: 2_000,
                run_id: Some("live-2".into()),
                progress: false,
                ..Default::default()
            };
            prism_relay::tools::loadgen::run(&opts).await
        })
    };
    let last_before = segments_before
        .last()
        .and_then(|s| s.last_lsn)
        .expect("records before the replay");
    let (ok, output) = replay(&path, &["--to-lsn", &last_before.0.to_string()]).await;
    assert!(ok, "replay next to a running relay:\n{output}");
    let summary = publishing.await??;
    assert!(summary.ok(), "{summary}");
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    // The replay wrote no ledger and removed no segment: what the relay does with them since
    // is its own progress, which only moves forward.
    let ledger_after = prism_wal::load_ledger(&wal)?;
    for (lane, cursor) in &ledger_before.cursors {
        assert!(ledger_after.cursors.get(lane).is_some_and(|c| c >= cursor));
    }
    relay.stop().await?;
    let on_disk = wal_records(&wal);
    let expected = identities_of(on_disk.iter().filter(|r| r.lsn <= last_before.0));
    assert_eq!(identities(&bed, REPLAYED), expected, "{output}");
    assert_eq!(
        segments_before.first().map(|s| s.id),
        prism_wal::list_segments(&wal)?.first().map(|s| s.id),
        "no segment deleted"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_segment_stops_replay_naming_segment_and_offset_unless_skipping_is_asked_for(
) -> TestResult {
    let bed = Bed::start();
    let config = small_segments(&bed);
    relay_writes(&bed, &config, "corrupt", 2_000).await;
    let wal = config.wal_dir.clone();
    let records = wal_records(&wal);
    let segments = prism_wal::list_segments(&wal)?;
    assert!(segments.len() >= 3, "{segments:?}");
    let bad = &segments[1];
    let next = &segments[2];
    // Flip a byte inside the first record's body: its CRC fails at the segment's first record.
    let offset = prism_wal::segment::SEGMENT_HEADER_BYTES as u64;
    let mut bytes = std::fs::read(&bad.path)?;
    let at = prism_wal::segment::SEGMENT_HEADER_BYTES + prism_wal::segment::RECORD_HEADER_BYTES + 8;
    bytes[at] ^= 0xff;
    std::fs::write(&bad.path, bytes)?;
    empty_copy_of_the_relay_tables(&bed, REPLAYED);
    let path = config.write(&bed.path("relay.toml"));

    let (ok, output) = replay(&path, &[]).await;
    assert!(!ok, "a corrupt segment stops the replay");
    assert!(
        output.contains(&format!(
            "corrupt record in segment {} at offset {offset}",
            bad.id
        )),
        "{output}"
    );

    for table in TABLES {
        bed.sql(&format!("TRUNCATE TABLE {REPLAYED}.{table}"));
    }
    let (ok, output) = replay(&path, &["--skip-corrupt"]).await;
    assert!(!ok, "skipping still exits non-zero");
    let skipped_last = next.first_lsn.0 - 1;
    assert!(
        output.contains(&format!(
            "skipped: lsn {}..={skipped_last} (segment {} at offset {offset})",
            bad.first_lsn, bad.id
        )),
        "{output}"
    );
    let expected = identities_of(
        records
            .iter()
            .filter(|r| !(bad.first_lsn.0..=skipped_last).contains(&r.lsn)),
    );
    assert_eq!(identities(&bed, REPLAYED), expected, "{output}");
    Ok(())
}

fn envelope(seq: u64, payload: &[u8]) -> Envelope<'static> {
    Envelope {
        stream: Cow::Borrowed("MARKET_TRADES"),
        stream_seq: StreamSeq(seq),
        subject: Cow::Borrowed("trade.binance.spot.BTC-USDT"),
        headers: Vec::new(),
        published_ns: 1_700_000_000_000_000_000 + seq as i64,
        payload: Cow::Owned(payload.to_vec()),
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for chunk in text.as_bytes().chunks(4) {
        let digits: Vec<u8> = chunk
            .iter()
            .filter(|c| **c != b'=')
            .map(|c| value(*c))
            .collect();
        let n = digits
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | (u32::from(*d) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..digits.len()]);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_dump_writes_every_payload_byte_exact_and_takes_the_flags_of_replay() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (wal, _) = Wal::open(dir.path(), WalOptions::default())?;
    let binary: Vec<u8> = vec![0xff, 0xfe, b'{', 0x00, 0x80, b'}', 0xc3];
    let text = "{\"price\":\"1.5\",\"note\":\"é\"}".as_bytes().to_vec();
    wal.append(&[envelope(1, &text), envelope(2, &binary), envelope(3, b"x")])
        .await?;
    wal.close().await?;
    let dir_arg = dir.path().display().to_string();

    let (status, output) = relay_command(&[
        "wal",
        "dump",
        "--dir",
        &dir_arg,
        "--from-lsn",
        "1",
        "--to-lsn",
        "2",
        "--limit",
        "10",
    ])
    .await;

    assert!(status.success(), "{output}");
    let lines: Vec<serde_json::Value> = output
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{output}");
    assert_eq!(
        lines[0]["payload"].as_str().map(str::as_bytes),
        Some(&text[..])
    );
    let encoded = lines[1]["payload_base64"].as_str().expect("payload_base64");
    assert_eq!(base64_decode(encoded), binary);
    assert!(lines[1].get("payload").is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_inspect_names_the_segments_retention_deletes_next_and_what_holds_the_others(
) -> TestResult {
    let dir = tempfile::tempdir()?;
    let options = WalOptions {
        segment_bytes_max: 4096,
        ..WalOptions::default()
    };
    let (wal, _) = Wal::open(dir.path(), options)?;
    let payload = vec![b'p'; 1000];
    for seq in 1..=24 {
        wal.append(&[envelope(seq, &payload)]).await?;
    }
    let segments = prism_wal::list_segments(dir.path())?;
    assert!(segments.len() >= 5, "{segments:?}");
    // The cursor stands in the fourth segment: the first three are released.
    let cursor = segments[3].first_lsn;
    let mut ledger = Ledger::default();
    ledger.cursors.insert("trades".into(), cursor);
    wal.commit_ledger(&ledger)?;
    wal.close().await?;
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, "[wal]\nretention_segments_max = 1\n")?;

    let (status, output) = relay_command(&[
        "wal",
        "inspect",
        "--dir",
        &dir.path().display().to_string(),
        "--config",
        &config.display().to_string(),
    ])
    .await;

    assert!(status.success(), "{output}");
    let line = |id: &prism_wal::SegmentId| {
        output
            .lines()
            .find(|l| l.starts_with(&format!("retention {id}:")))
            .unwrap_or_else(|| panic!("no retention line for {id}:\n{output}"))
            .to_string()
    };
    for s in &segments[..2] {
        let l = line(&s.id);
        assert!(
            l.contains("deleted next") && l.contains("retention_segments_max 1"),
            "{l}"
        );
    }
    assert!(line(&segments[2].id).contains("kept"), "{output}");
    assert!(
        line(&segments[3].id).contains(&format!(
            "held: needed by the cursor of trades at lsn {}",
            cursor.0
        )),
        "{output}"
    );
    assert!(
        line(&segments[segments.len() - 1].id).contains("active segment"),
        "{output}"
    );
    Ok(())
}

/// A WAL of 40 records (five of each MarketPrism message of `modern::MESSAGES`) and a
/// configuration that replays it into `server`'s `REPLAYED` database with the modern profile;
/// returns the directory (holding both) and the configuration's path.
async fn modern_replay_setup(
    server: &crate::modern::ChdbServer,
) -> Result<(tempfile::TempDir, String), Box<dyn std::error::Error + Send + Sync>> {
    let dir = tempfile::tempdir()?;
    let (wal, _) = Wal::open(dir.path(), WalOptions::default())?;
    let messages: Vec<Envelope<'static>> = (0..40u64)
        .map(|i| {
            let (stream, subject, payload) = crate::modern::MESSAGES[(i % 8) as usize];
            Envelope {
                stream: Cow::Owned(stream.to_string()),
                stream_seq: StreamSeq(7_000 + i),
                subject: Cow::Owned(subject.to_string()),
                headers: Vec::new(),
                published_ns: 1_761_714_400_000_000_000 + i as i64,
                payload: Cow::Owned(payload.as_bytes().to_vec()),
            }
        })
        .collect();
    wal.append(&messages).await?;
    wal.close().await?;
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[wal]\ndir = {:?}\n\n[clickhouse]\nurl = {:?}\ndatabase = {REPLAYED:?}\n\
             profile = \"modern\"\ncreate_schema = true\n",
            dir.path().display().to_string(),
            server.url()
        ),
    )?;
    Ok((dir, config.display().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replay_of_the_same_range_inserts_nothing_at_all_on_a_modern_server() -> TestResult
{
    let server = crate::modern::ChdbServer::start();
    let (_dir, config) = modern_replay_setup(&server).await?;
    let count = TABLES
        .iter()
        .map(|t| format!("(SELECT count() FROM {REPLAYED}.{t})"))
        .collect::<Vec<_>>()
        .join(" + ");
    let count = format!("SELECT {count}");

    let (status, output) = relay_command(&["replay", "--config", &config]).await;
    assert!(status.success(), "{output}");
    // Without merges only the server's deduplication can keep a second copy out.
    let probe = prism_relay::sink::Sink::new(server.sink_options("system"))?;
    for table in TABLES {
        probe
            .execute(&format!("SYSTEM STOP MERGES {REPLAYED}.{table}"))
            .await?;
    }
    let first = server.query(&count, "TabSeparated").await;
    // Five copies of one message per table, collapsed on their identity within each insert
    // (the server's `optimize_on_insert`): one row per table.
    assert_eq!(
        first.trim(),
        "8",
        "one row in each of eight tables: {output}"
    );
    let (status, output) = relay_command(&["replay", "--config", &config]).await;
    assert!(status.success(), "{output}");

    let second = server.query(&count, "TabSeparated").await;
    assert_eq!(
        second.trim(),
        first.trim(),
        "rows after a second replay: {output}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_batch_the_server_drops_as_a_duplicate_of_an_insert_it_never_stored_is_inserted_again(
) -> TestResult {
    let server = crate::modern::ChdbServer::start();
    let (_dir, config) = modern_replay_setup(&server).await?;
    // The replay's first insert into trades is stored under its token, then its rows vanish and
    // no answer comes back: a server killed between recording the token and committing the
    // part. The retry carries the same token and is answered as a duplicate.
    server.engine().lose_next_insert("trades")?;
    let (status, output) = relay_command(&["replay", "--config", &config]).await;
    assert!(status.success(), "{output}");
    assert!(
        !server.engine().losing_next_insert(),
        "the stand-in never lost an insert: {output}"
    );
    assert!(
        output.contains("inserting them again under a new token"),
        "{output}"
    );
    // Five copies of the one trade collapse into one row on insert.
    let trades = server
        .query(
            &format!("SELECT count() FROM {REPLAYED}.trades"),
            "TabSeparated",
        )
        .await;
    assert_eq!(trades.trim(), "1", "{output}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_record_replays_into_dead_letters_with_its_reason_whatever_its_subject(
) -> TestResult {
    let bed = Bed::start();
    let dir = tempfile::tempdir()?;
    let (wal, _) = Wal::open(dir.path(), WalOptions::default())?;
    // What ingest writes in place of a message too large for the WAL: the identity, the payload
    // cut (here still a valid trade), and the reason in the dead-letter header.
    let (stream, subject, payload) = crate::modern::MESSAGES[0];
    let reason = "message of 20000000 bytes exceeds the WAL record limit of 16777216 bytes";
    let record = Envelope {
        stream: Cow::Borrowed(stream),
        stream_seq: StreamSeq(42),
        subject: Cow::Borrowed(subject),
        headers: vec![(
            Cow::Borrowed(prism_relay::drain::route::DEAD_LETTER_HEADER),
            Cow::Borrowed(reason),
        )],
        published_ns: 1_761_714_400_000_000_000,
        payload: Cow::Borrowed(payload.as_bytes()),
    };
    wal.append(&[record]).await?;
    wal.close().await?;
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[wal]\ndir = {:?}\n\n[clickhouse]\nurl = {:?}\ndatabase = {REPLAYED:?}\n\
             create_schema = true\n",
            dir.path().display().to_string(),
            bed.ch.http_url()
        ),
    )?;

    let (status, output) =
        relay_command(&["replay", "--config", &config.display().to_string()]).await;

    assert!(status.success(), "{output}");
    assert_eq!(
        bed.sql(&format!("SELECT count() FROM {REPLAYED}.trades"))
            .trim(),
        "0",
        "{output}"
    );
    assert_eq!(
        bed.rows(&format!(
            "SELECT nats_stream, nats_seq, error FROM {REPLAYED}.dead_letters"
        )),
        vec![vec![
            stream.to_string(),
            "42".to_string(),
            reason.to_string()
        ]],
        "{output}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_carries_its_record_lsn_and_replaying_that_lsn_range_writes_the_range_again(
) -> TestResult {
    let bed = Bed::start();
    let config = bed.config();
    let relay = InProcRelay::spawn(&config);
    relay.wait_ready().await;
    // Good traffic, a payload no codec reads, more traffic, another one: the dead letters'
    // LSN range has good records inside it.
    let first = bed.publish(Load::new("dl-lsn-a", 200)).await;
    let bad_a = bed
        .publish_raw("trade.binance.spot.BTC-USDT", "not json")
        .await;
    // Once the first dead letter is stored its record is in the WAL, so every record of the
    // next traffic comes after it.
    wait_until_sync("the first dead letter", DRAIN_TIMEOUT, || {
        bed.count_dead_letters() == 1
    })
    .await;
    bed.publish(Load::new("dl-lsn-b", 200).ts_start(first.ts_last_ms + 1))
        .await;
    // Likewise once the second traffic is stored, every record of it is in the WAL before the
    // second dead letter: the three streams' consumers append in no common order, and a
    // consumer waiting out its pull linger appends after another's later message.
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    let bad_b = bed
        .publish_raw("funding_rate.okx.perpetual.BTC-USDT", "{\"broken\"")
        .await;
    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    assert_eq!(report.totals().dead_lettered, 2, "{report}");
    relay.stop().await.expect("relay stops cleanly");

    let records = wal_records(&config.wal_dir);
    let lsn_of = |(stream, seq): &(String, u64)| {
        records
            .iter()
            .find(|r| &r.stream == stream && r.seq == *seq)
            .map(|r| r.lsn.to_string())
            .expect("the dead-lettered message is in the WAL")
    };
    let letters = bed.rows(&format!(
        "SELECT nats_stream, nats_seq, wal_lsn FROM {DATABASE}.dead_letters ORDER BY wal_lsn"
    ));
    let expected: Vec<Vec<String>> = [&bad_a, &bad_b]
        .iter()
        .map(|id| vec![id.0.clone(), id.1.to_string(), lsn_of(id)])
        .collect();
    assert_eq!(letters, expected, "each dead letter names its record's LSN");

    // The command docs/OPERATIONS.md gives: replay the dead letters' LSN range.
    let (from, to) = (expected[0][2].clone(), expected[1][2].clone());
    let path = config.write(&bed.path("relay.toml"));
    empty_copy_of_the_relay_tables(&bed, REPLAYED);
    let (ok, output) = replay(&path, &["--from-lsn", &from, "--to-lsn", &to]).await;
    assert!(ok, "{output}");
    assert_eq!(
        bed.rows(&format!(
            "SELECT nats_stream, nats_seq, wal_lsn FROM {REPLAYED}.dead_letters FINAL ORDER BY wal_lsn"
        )),
        expected,
        "{output}"
    );
    let (from, to): (u64, u64) = (from.parse()?, to.parse()?);
    let bad: BTreeSet<(String, u64)> = [bad_a, bad_b].into_iter().collect();
    let inside: BTreeSet<(String, u64)> =
        identities_of(records.iter().filter(|r| (from..=to).contains(&r.lsn)))
            .difference(&bad)
            .cloned()
            .collect();
    assert!(
        inside.len() >= 200,
        "good records between the dead letters: {}",
        inside.len()
    );
    assert_eq!(identities(&bed, REPLAYED), inside, "{output}");
    Ok(())
}
