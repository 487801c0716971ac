//! Deliveries the NATS client cannot parse: nats-server stores and delivers a message whose
//! subject is not UTF-8 (it does not validate subjects), and the relay must dead-letter it
//! instead of losing its connection on every redelivery, without stranding the good messages
//! delivered alongside it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::{wait_until, Bed, Load, RelayProc, DATABASE};
use crate::TestResult;

/// How long a raw publish may take before the test fails instead of hanging.
const RAW_IO_TIMEOUT_MS: u64 = 10_000;

/// Bound on waiting for the relay to account for every message: several ack_waits (the bad
/// messages come back after one) plus the drain.
const ACCOUNTING_TIMEOUT_MS: u64 = 90_000;

/// Interval between two looks at the tables while waiting for the relay.
const POLL_MS: u64 = 250;

/// The log line the relay writes on every NATS disconnect.
const CONNECTION_LOST: &str = "NATS connection lost";

/// Publishes `payload` on the raw subject bytes `subject`, with the raw header block `headers` if
/// any, through a plain TCP connection speaking the NATS text protocol (the client library refuses
/// such subjects and headers), and returns the stream and sequence from JetStream's publish
/// acknowledgement.
fn publish_raw_bytes(
    port: u16,
    subject: &[u8],
    headers: Option<&[u8]>,
    payload: &[u8],
) -> std::io::Result<(String, u64)> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_millis(RAW_IO_TIMEOUT_MS)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    assert!(line.starts_with(b"INFO "), "server greeting: {line:?}");

    let inbox = "_INBOX.raw-publisher";
    let mut out = Vec::new();
    out.extend_from_slice(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true}\r\n");
    out.extend_from_slice(format!("SUB {inbox} 1\r\n").as_bytes());
    match headers {
        None => {
            out.extend_from_slice(b"PUB ");
            out.extend_from_slice(subject);
            out.extend_from_slice(format!(" {inbox} {}\r\n", payload.len()).as_bytes());
        }
        Some(headers) => {
            out.extend_from_slice(b"HPUB ");
            out.extend_from_slice(subject);
            let total = headers.len() + payload.len();
            out.extend_from_slice(format!(" {inbox} {} {total}\r\n", headers.len()).as_bytes());
            out.extend_from_slice(headers);
        }
    }
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\nPING\r\n");
    writer.write_all(&out)?;

    // JetStream answers the publish on the reply subject: `{"stream":"S","seq":N}`.
    loop {
        line.clear();
        reader.read_until(b'\n', &mut line)?;
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text == "PING" {
            writer.write_all(b"PONG\r\n")?;
        } else if let Some(args) = text.strip_prefix("MSG ") {
            let len: usize = args
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("MSG line {text:?}"));
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body)?;
            let ack: serde_json::Value = serde_json::from_slice(&body[..len]).unwrap_or_else(|e| {
                panic!("publish ack {:?}: {e}", String::from_utf8_lossy(&body))
            });
            let stream = ack["stream"]
                .as_str()
                .unwrap_or_else(|| panic!("publish not stored: {ack}"))
                .to_string();
            let seq = ack["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("no seq: {ack}"));
            return Ok((stream, seq));
        } else if text.starts_with("-ERR") {
            panic!("server refused the raw publish: {text}");
        }
    }
}

/// The raw subject of the `n`th poisoned message: a trade subject with a byte that is not UTF-8.
fn bad_subject(n: u8) -> Vec<u8> {
    let mut subject = b"trade.\xff.spot.X".to_vec();
    subject.push(b'0' + n);
    subject
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_messages_with_non_utf8_subjects_among_two_thousand_trades_are_dead_lettered_and_every_trade_is_stored_once(
) -> TestResult {
    poisoned_subjects_among_trades("explicit").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ack_policy_all_three_messages_with_non_utf8_subjects_are_dead_lettered_and_every_trade_is_stored_once(
) -> TestResult {
    poisoned_subjects_among_trades("all").await
}

/// Three poisoned subjects among 2,000 trades published at load, consumer `ack_wait` 3 s with
/// `ack_policy`: exact accounting of trades, dead letters and the consumer's position.
async fn poisoned_subjects_among_trades(ack_policy: &str) -> TestResult {
    let bed = Bed::start();
    let mut config = bed.config();
    config.streams.truncate(1); // MARKET_TRADES
    config.consumers.truncate(1);
    config.consumers[0].ack_wait_ms = 3_000;
    config.consumers[0].extra = format!("ack_policy = {ack_policy:?}");
    let relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    let good: u64 = 2_000;
    let port = bed.nats.port();
    let publish = bed.publish(Load::new("hostile", good).mix("trade=1").rate(1_000));
    // The bad messages go in while the good ones stream, each once the stream holds a third
    // more of them, so they land among good trades in the relay's pulls.
    let poison = async {
        let mut published = Vec::new();
        for n in 1..=3u8 {
            let threshold = u64::from(n) * good / 4;
            wait_until(
                "the stream holds enough good trades",
                Duration::from_secs(30),
                || async { bed.subject_count("MARKET_TRADES", "trade.>").await >= threshold },
            )
            .await;
            let subject = bad_subject(n);
            let payload = format!("{{\"poison\":{n}}}").into_bytes();
            let (stream, seq) = tokio::task::spawn_blocking({
                let (subject, payload) = (subject.clone(), payload.clone());
                move || publish_raw_bytes(port, &subject, None, &payload)
            })
            .await
            .expect("raw publisher task")
            .expect("raw publish");
            assert_eq!(stream, "MARKET_TRADES");
            published.push((seq, subject, payload));
        }
        published
    };
    let (_, published) = tokio::join!(publish, poison);

    let bad_seqs: Vec<u64> = published.iter().map(|(seq, _, _)| *seq).collect();
    let deadline = Instant::now() + Duration::from_millis(ACCOUNTING_TIMEOUT_MS);
    loop {
        let (trades, dead) = (bed.count_final("trades"), bed.count_dead_letters());
        if trades >= good && dead >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {ACCOUNTING_TIMEOUT_MS} ms: {trades} of {good} trades stored, {dead} of 3 dead \
             letters, {} connection losses",
            relay.log().matches(CONNECTION_LOST).count()
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }

    // Every good trade exactly once: all sequences of the stream but the bad ones.
    let rows = bed.rows(&format!(
        "SELECT count(), uniqExact(nats_seq), min(nats_seq), max(nats_seq), \
         countIf(nats_seq IN ({})) FROM {DATABASE}.trades FINAL",
        bad_seqs
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    ));
    let total = good + 3;
    assert_eq!(
        rows,
        vec![vec![
            good.to_string(),
            good.to_string(),
            "1".to_string(),
            total.to_string(),
            "0".to_string()
        ]],
        "trades stored; relay log:\n{}",
        relay.log()
    );

    // One dead letter per bad message, with its identity, subject bytes and payload.
    let dead = bed.rows(&format!(
        "SELECT nats_stream, nats_seq, hex(subject), error, hex(payload) \
         FROM {DATABASE}.dead_letters ORDER BY nats_seq"
    ));
    assert_eq!(dead.len(), 3, "{dead:?}");
    for (row, (seq, subject, payload)) in dead.iter().zip(&published) {
        assert_eq!(row[0], "MARKET_TRADES");
        assert_eq!(row[1], seq.to_string());
        let lossy = String::from_utf8_lossy(subject);
        assert_eq!(row[2], hex(lossy.as_bytes()).to_uppercase(), "{row:?}");
        assert!(
            row[3].contains(&hex(subject)),
            "the reason carries the raw subject bytes {}: {row:?}",
            hex(subject)
        );
        assert_eq!(row[4], hex(payload).to_uppercase(), "{row:?}");
    }

    // The consumer moved past everything: nothing pending, nothing waiting for an ack.
    wait_until(
        "the consumer has nothing pending",
        Duration::from_millis(ACCOUNTING_TIMEOUT_MS),
        || async {
            let info = bed
                .consumer_info("MARKET_TRADES", "prism-relay-trades")
                .await;
            info.num_pending == 0
                && info.num_ack_pending == 0
                && info.ack_floor.stream_sequence == total
        },
    )
    .await;

    // Not a reconnect loop: at most one lost connection per bad message.
    let log = relay.log();
    let drops = log.matches(CONNECTION_LOST).count();
    assert!(drops <= 3, "{drops} connection losses; relay log:\n{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trade_with_a_header_that_is_not_utf8_is_dead_lettered_with_the_reason_and_the_trades_around_it_are_stored(
) -> TestResult {
    let bed = Bed::start();
    let mut config = bed.config();
    config.streams.truncate(1); // MARKET_TRADES
    config.consumers.truncate(1);
    config.consumers[0].ack_wait_ms = 3_000;
    let relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    let good: u64 = 200;
    let before = bed
        .publish(Load::new("header-before", good / 2).mix("trade=1"))
        .await;
    let port = bed.nats.port();
    let subject = b"trade.binance.spot.BTC-USDT".to_vec();
    let payload = br#"{"poison":"header"}"#.to_vec();
    let (stream, seq) = tokio::task::spawn_blocking({
        let (subject, payload) = (subject.clone(), payload.clone());
        move || {
            publish_raw_bytes(
                port,
                &subject,
                Some(b"NATS/1.0\r\nX-Origin: caf\xe9\r\n\r\n"),
                &payload,
            )
        }
    })
    .await
    .expect("raw publisher task")
    .expect("raw publish");
    assert_eq!(stream, "MARKET_TRADES");
    bed.publish(
        Load::new("header-after", good / 2)
            .mix("trade=1")
            // Times of their own (identities stay apart) within the plausible window.
            .ts_start(before.ts_last_ms + 1_000),
    )
    .await;

    let deadline = Instant::now() + Duration::from_millis(ACCOUNTING_TIMEOUT_MS);
    loop {
        let (trades, dead) = (bed.count_final("trades"), bed.count_dead_letters());
        if trades >= good && dead >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {ACCOUNTING_TIMEOUT_MS} ms: {trades} of {good} trades stored, {dead} of 1 dead \
             letter, {} connection losses",
            relay.log().matches(CONNECTION_LOST).count()
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    assert_eq!(bed.count_final("trades"), good);
    assert_eq!(
        bed.count_where("trades", &format!("nats_seq = {seq}")),
        0,
        "the poisoned message is not a trade"
    );
    let dead = bed.rows(&format!(
        "SELECT nats_stream, nats_seq, subject, error, payload FROM {DATABASE}.dead_letters"
    ));
    assert_eq!(dead.len(), 1, "{dead:?}");
    let row = &dead[0];
    assert_eq!(
        (row[0].as_str(), row[1].as_str(), row[2].as_str()),
        (
            "MARKET_TRADES",
            seq.to_string().as_str(),
            "trade.binance.spot.BTC-USDT"
        )
    );
    assert!(row[3].contains("headers are not valid UTF-8"), "{row:?}");
    assert_eq!(row[4].as_bytes(), payload.as_slice());

    let total = good + 1;
    wait_until(
        "the consumer has nothing pending",
        Duration::from_millis(ACCOUNTING_TIMEOUT_MS),
        || async {
            let info = bed
                .consumer_info("MARKET_TRADES", "prism-relay-trades")
                .await;
            info.num_pending == 0
                && info.num_ack_pending == 0
                && info.ack_floor.stream_sequence == total
        },
    )
    .await;
    let drops = relay.log().matches(CONNECTION_LOST).count();
    assert!(
        drops <= 1,
        "{drops} connection losses; relay log:\n{}",
        relay.log()
    );
    Ok(())
}
