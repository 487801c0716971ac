//! The JetStream source against a real nats-server: stream and consumer declaration with drift,
//! fetch metadata, explicit and ack-all acknowledgement, redelivery, sharding by filter, message
//! size limits, and a server restart.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use prism_relay::config::{AckPolicyKind, ConsumerConfig, NatsConfig, StreamConfig};
use prism_relay::source::{
    self, ensure_consumer, ensure_streams, Batch, Fetcher, SetupAction, SourceError,
};
use prism_testbed::Nats;

use crate::TestResult;

/// Bound on waiting for a condition that should hold within milliseconds.
const CONDITION_DEADLINE_MS: u64 = 10_000;

/// The shortest ack wait the configuration allows, so redelivery tests stay fast.
const ACK_WAIT_MS: u64 = 1_000;

struct Bed {
    /// Kept alive for the test; dropping it kills the server.
    nats: Nats,
    js: jetstream::Context,
}

async fn bed() -> Result<Bed, Box<dyn std::error::Error + Send + Sync>> {
    let nats = Nats::start()?;
    let nats_config = NatsConfig {
        url: nats.url(),
        name: "prism-relay-test".to_owned(),
        ..NatsConfig::default()
    };
    let client = source::connect(&nats_config).await?;
    let js = source::jetstream(client, &nats_config);
    Ok(Bed { nats, js })
}

fn stream(name: &str, subjects: &[&str]) -> StreamConfig {
    StreamConfig {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        ..StreamConfig::default()
    }
}

fn consumer_config(stream: &str, durable: &str, filters: &[&str]) -> ConsumerConfig {
    ConsumerConfig {
        stream: stream.to_owned(),
        durable: durable.to_owned(),
        filter_subjects: filters.iter().map(|s| (*s).to_owned()).collect(),
        ack_wait_ms: ACK_WAIT_MS,
        fetch_batch: 100,
        fetch_expires_ms: 300,
        ..ConsumerConfig::default()
    }
}

/// Publishes `payload` on `subject` with a `Nats-Msg-Id` and waits for the stream's ack.
async fn publish(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    payload: &str,
) -> TestResult {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    js.publish_with_headers(subject.to_owned(), headers, payload.to_owned().into())
        .await?
        .await?;
    Ok(())
}

/// Fetches until `count` messages arrived in total (several pulls if needed), or fails after the
/// deadline. Returns the batches so the caller can inspect and ack them.
async fn fetch_count(
    fetcher: &mut Fetcher,
    count: usize,
) -> Result<Vec<Batch>, Box<dyn std::error::Error + Send + Sync>> {
    let deadline = Instant::now() + Duration::from_millis(CONDITION_DEADLINE_MS);
    let mut batches = Vec::new();
    let mut got = 0;
    while got < count {
        if Instant::now() > deadline {
            return Err(format!("only {got} of {count} messages arrived").into());
        }
        let batch = fetcher.fetch().await?;
        got += batch.len();
        if !batch.is_empty() {
            batches.push(batch);
        }
    }
    Ok(batches)
}

/// Polls `backlog().num_ack_pending` until it is `expected`.
async fn await_ack_pending(fetcher: &mut Fetcher, expected: u64) -> TestResult {
    let deadline = Instant::now() + Duration::from_millis(CONDITION_DEADLINE_MS);
    loop {
        let backlog = fetcher.backlog().await?;
        if backlog.num_ack_pending == expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "num_ack_pending stayed {} (expected {expected})",
                backlog.num_ack_pending
            )
            .into());
        }
        tokio::task::yield_now().await;
    }
}

/// A fetcher whose pulls outlast the ack wait, to prove that nothing comes back.
async fn long_pull_fetcher(
    js: &jetstream::Context,
    config: &ConsumerConfig,
) -> Result<Fetcher, SourceError> {
    let config = ConsumerConfig {
        fetch_expires_ms: ACK_WAIT_MS * 3 / 2,
        ..config.clone()
    };
    Fetcher::new(js, &config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_is_created_when_missing_and_found_without_drift_afterwards() -> TestResult {
    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_TRADES", &["trade.>"])]).await?;
    let config = consumer_config("MARKET_TRADES", "relay", &["trade.>"]);

    let first = ensure_consumer(&bed.js, &config).await?;
    assert_eq!(first.action, SetupAction::Created);
    assert!(first.drift.is_empty());

    let second = ensure_consumer(&bed.js, &config).await?;
    assert_eq!(second.action, SetupAction::Existed);
    assert_eq!(
        second.drift,
        vec![],
        "a consumer created from its config matches it"
    );

    let info = bed
        .js
        .get_stream("MARKET_TRADES")
        .await?
        .consumer_info("relay")
        .await?;
    assert_eq!(info.config.ack_policy, consumer::AckPolicy::Explicit);
    assert_eq!(
        info.config.max_deliver, -1,
        "unlimited deliveries by default"
    );
    assert_eq!(info.config.deliver_policy, consumer::DeliverPolicy::All);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_consumer_with_another_ack_wait_reports_drift_and_keeps_its_pending_messages(
) -> TestResult {
    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_DATA", &["funding_rate.>"])]).await?;
    let config = consumer_config("MARKET_DATA", "relay", &[]);
    ensure_consumer(&bed.js, &config).await?;
    for i in 0..5 {
        publish(
            &bed.js,
            "funding_rate.binance.perpetual.BTC-USDT",
            &format!("id-{i}"),
            "{}",
        )
        .await?;
    }
    let stream_handle = bed.js.get_stream("MARKET_DATA").await?;
    let before = stream_handle.consumer_info("relay").await?;
    assert_eq!(before.num_pending, 5);

    let changed = ConsumerConfig {
        ack_wait_ms: 60_000,
        max_ack_pending: 500,
        ..config.clone()
    };
    let outcome = ensure_consumer(&bed.js, &changed).await?;
    assert_eq!(outcome.action, SetupAction::Existed);
    let fields: Vec<&str> = outcome.drift.iter().map(|d| d.field).collect();
    assert_eq!(fields, ["ack_wait_ms", "max_ack_pending"]);
    assert_eq!(outcome.drift[0].configured, "60000");
    assert_eq!(outcome.drift[0].server, ACK_WAIT_MS.to_string());

    let after = stream_handle.consumer_info("relay").await?;
    assert_eq!(
        after.created, before.created,
        "the durable was not recreated"
    );
    assert_eq!(
        after.config.ack_wait,
        Duration::from_millis(ACK_WAIT_MS),
        "not updated"
    );
    assert_eq!(after.num_pending, 5, "its pending messages are still there");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_is_created_when_missing_and_an_existing_stream_is_not_altered() -> TestResult {
    let bed = bed().await?;
    let config = stream("MARKET_BOOKS", &["orderbook.>"]);
    let created = ensure_streams(&bed.js, std::slice::from_ref(&config)).await?;
    assert_eq!(created[0].action, SetupAction::Created);
    let server = bed
        .js
        .get_stream("MARKET_BOOKS")
        .await?
        .info()
        .await?
        .config
        .clone();
    assert_eq!(server.subjects, ["orderbook.>"]);
    assert_eq!(server.max_age, Duration::from_secs(config.max_age_s));
    assert_eq!(server.max_bytes, config.max_bytes);
    assert_eq!(server.max_messages, config.max_msgs);
    assert_eq!(
        server.duplicate_window,
        Duration::from_secs(config.duplicate_window_s)
    );

    let again = ensure_streams(&bed.js, std::slice::from_ref(&config)).await?;
    assert_eq!(again[0].action, SetupAction::Existed);
    assert_eq!(again[0].drift, vec![]);

    let changed = StreamConfig {
        subjects: vec!["orderbook.>".into(), "depth.>".into()],
        max_age_s: 3_600,
        ..config.clone()
    };
    let drifted = ensure_streams(&bed.js, &[changed]).await?;
    let fields: Vec<&str> = drifted[0].drift.iter().map(|d| d.field).collect();
    assert_eq!(fields, ["subjects", "max_age_s"]);
    let unchanged = bed
        .js
        .get_stream("MARKET_BOOKS")
        .await?
        .info()
        .await?
        .config
        .clone();
    assert_eq!(unchanged.subjects, server.subjects);
    assert_eq!(unchanged.max_age, server.max_age);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_on_a_missing_stream_is_a_clear_error() -> TestResult {
    let bed = bed().await?;
    let err = ensure_consumer(&bed.js, &consumer_config("NOPE", "relay", &[]))
        .await
        .expect_err("stream missing");
    assert!(
        matches!(err, SourceError::StreamMissing { ref stream } if stream == "NOPE"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_returns_messages_with_their_metadata_headers_and_payload() -> TestResult {
    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_TRADES", &["trade.>"])]).await?;
    let config = consumer_config("MARKET_TRADES", "relay", &[]);
    ensure_consumer(&bed.js, &config).await?;
    let before_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as i64;
    let subjects = [
        "trade.binance.spot.BTC-USDT",
        "trade.okx.perpetual.ETH-USDT",
        "trade.binance.spot.BTC-USDT",
    ];
    for (i, subject) in subjects.iter().enumerate() {
        publish(
            &bed.js,
            subject,
            &format!("trade:binance:{i}"),
            &format!("{{\"n\":{i}}}"),
        )
        .await?;
    }
    // A core NATS publish (how MarketPrism sends trades) is captured too, without headers.
    let client = bed.js.client();
    client
        .publish("trade.deribit.options.BTC", "{\"n\":3}".into())
        .await?;
    client.flush().await?;
    // The server stores a core publish after the flush returns: wait for it.
    let deadline = Instant::now() + Duration::from_millis(CONDITION_DEADLINE_MS);
    while bed
        .js
        .get_stream("MARKET_TRADES")
        .await?
        .info()
        .await?
        .state
        .messages
        < 4
    {
        assert!(Instant::now() < deadline, "core publish not stored");
        tokio::task::yield_now().await;
    }
    let after_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as i64;

    let mut fetcher = Fetcher::new(&bed.js, &config).await?;
    let batches = fetch_count(&mut fetcher, 4).await?;
    let messages: Vec<_> = batches.iter().flat_map(Batch::iter).collect();
    assert_eq!(messages.len(), 4);
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m.stream(), "MARKET_TRADES");
        assert_eq!(m.stream_seq(), i as u64 + 1);
        assert_eq!(m.delivery_count(), 1);
        assert_eq!(m.payload(), format!("{{\"n\":{i}}}").as_bytes());
        assert!(
            (before_ns..=after_ns).contains(&m.published_ns()),
            "{} not in publish window {before_ns}..={after_ns}",
            m.published_ns()
        );
        if i < 3 {
            assert_eq!(m.subject(), subjects[i]);
            let id = format!("trade:binance:{i}");
            assert_eq!(m.msg_id(), Some(id.as_str()));
            assert_eq!(
                m.headers().collect::<Vec<_>>(),
                vec![("Nats-Msg-Id", id.as_str())]
            );
        } else {
            assert_eq!(m.subject(), "trade.deribit.options.BTC");
            assert_eq!(m.msg_id(), None);
            assert_eq!(m.headers().count(), 0);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stream_yields_an_empty_batch_after_fetch_expires() -> TestResult {
    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_TRADES", &["trade.>"])]).await?;
    let config = consumer_config("MARKET_TRADES", "relay", &[]);
    ensure_consumer(&bed.js, &config).await?;
    let mut fetcher = Fetcher::new(&bed.js, &config).await?;
    let started = Instant::now();
    let batch = fetcher.fetch().await?;
    let elapsed = started.elapsed();
    assert!(batch.is_empty());
    // The pull waited for messages instead of returning at once (a hot loop when idle).
    assert!(
        elapsed >= Duration::from_millis(config.fetch_expires_ms / 2),
        "returned after {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(config.fetch_expires_ms + 1_000),
        "took {elapsed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_returns_without_waiting_for_a_full_batch() -> TestResult {
    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_TRADES", &["trade.>"])]).await?;
    let config = ConsumerConfig {
        fetch_expires_ms: 5_000,
        ack_wait_ms: 30_000,
        ..consumer_config("MARKET_TRADES", "relay", &[])
    };
    ensure_consumer(&bed.js, &config).await?;
    publish(&bed.js, "trade.binance.spot.BTC-USDT", "a", "{}").await?;
    let mut fetcher = Fetcher::new(&bed.js, &config).await?;
    let started = Instant::now();
    let batch = fetcher.fetch().await?;
    let elapsed = started.elapsed();
    assert_eq!(batch.len(), 1);
    assert!(
        elapsed < Duration::from_millis(2_500),
        "a 1-message batch of 100 took {elapsed:?}"
    );
    Ok(())
}

async fn ack_leaves_nothing_pending_and_nothing_redelivered(policy: AckPolicyKind) -> TestResult {
    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_TRADES", &["trade.>"])]).await?;
    let config = ConsumerConfig {
        ack_policy: policy,
        fetch_batch: 7,
        ..consumer_config("MARKET_TRADES", "relay", &[])
    };
    ensure_consumer(&bed.js, &config).await?;
    for i in 0..20 {
        publish(
            &bed.js,
            "trade.binance.spot.BTC-USDT",
            &format!("id-{i}"),
            "{}",
        )
        .await?;
    }
    let mut fetcher = Fetcher::new(&bed.js, &config).await?;
    assert_eq!(fetcher.ack_policy(), policy);
    let batches = fetch_count(&mut fetcher, 20).await?;
    assert!(batches.len() >= 3, "fetch_batch bounds each pull");
    let mut acks = 0;
    for batch in batches {
        assert!(batch.len() <= 7);
        let summary = batch.ack().await?;
        acks += summary.acks_sent;
    }
    match policy {
        AckPolicyKind::Explicit => assert_eq!(acks, 20),
        AckPolicyKind::All => assert!(acks <= 3 + 1, "one ack per batch, got {acks}"),
    }
    await_ack_pending(&mut fetcher, 0).await?;

    let mut long = long_pull_fetcher(&bed.js, &config).await?;
    let redelivered = long.fetch().await?;
    assert!(
        redelivered.is_empty(),
        "nothing comes back after ack_wait: {redelivered:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_ack_leaves_nothing_pending_and_nothing_redelivered() -> TestResult {
    ack_leaves_nothing_pending_and_nothing_redelivered(AckPolicyKind::Explicit).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_all_with_one_ack_per_batch_leaves_nothing_pending_and_nothing_redelivered(
) -> TestResult {
    ack_leaves_nothing_pending_and_nothing_redelivered(AckPolicyKind::All).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_are_redelivered_after_ack_wait() -> TestResult {
    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_TRADES", &["trade.>"])]).await?;
    let config = consumer_config("MARKET_TRADES", "relay", &[]);
    ensure_consumer(&bed.js, &config).await?;
    for i in 0..3 {
        publish(
            &bed.js,
            "trade.binance.spot.BTC-USDT",
            &format!("id-{i}"),
            "{}",
        )
        .await?;
    }
    let mut fetcher = Fetcher::new(&bed.js, &config).await?;
    let first = fetch_count(&mut fetcher, 3).await?;
    let first_seqs: Vec<u64> = first
        .iter()
        .flat_map(Batch::iter)
        .map(|m| m.stream_seq())
        .collect();
    // Dropped without an ack: as if the WAL fsync had failed or the relay had crashed.
    drop(first);

    let again = fetch_count(&mut fetcher, 3).await?;
    let redelivered: Vec<_> = again.iter().flat_map(Batch::iter).collect();
    let seqs: Vec<u64> = redelivered.iter().map(|m| m.stream_seq()).collect();
    assert_eq!(seqs, first_seqs, "same messages, same identities");
    assert!(redelivered.iter().all(|m| m.delivery_count() == 2));
    for batch in again {
        batch.ack().await?;
    }
    await_ack_pending(&mut fetcher, 0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_with_disjoint_filters_each_get_only_their_subjects() -> TestResult {
    let bed = bed().await?;
    ensure_streams(
        &bed.js,
        &[stream(
            "MARKET_DATA",
            &["funding_rate.>", "open_interest.>"],
        )],
    )
    .await?;
    let funding = consumer_config("MARKET_DATA", "relay-funding", &["funding_rate.>"]);
    let interest = consumer_config(
        "MARKET_DATA",
        "relay-oi",
        &["open_interest.binance.>", "open_interest.okx.>"],
    );
    ensure_consumer(&bed.js, &funding).await?;
    assert_eq!(
        ensure_consumer(&bed.js, &interest).await?.action,
        SetupAction::Created
    );
    assert_eq!(
        ensure_consumer(&bed.js, &interest).await?.drift,
        vec![],
        "several filters compare as a set"
    );
    for i in 0..6 {
        let subject = match i % 3 {
            0 => "funding_rate.binance.perpetual.BTC-USDT",
            1 => "open_interest.binance.perpetual.BTC-USDT",
            _ => "open_interest.okx.perpetual.ETH-USDT",
        };
        publish(&bed.js, subject, &format!("id-{i}"), "{}").await?;
    }
    let mut f = Fetcher::new(&bed.js, &funding).await?;
    let mut o = Fetcher::new(&bed.js, &interest).await?;
    let fb = fetch_count(&mut f, 2).await?;
    let ob = fetch_count(&mut o, 4).await?;
    let fs: Vec<String> = fb
        .iter()
        .flat_map(Batch::iter)
        .map(|m| m.subject().to_owned())
        .collect();
    let os: Vec<String> = ob
        .iter()
        .flat_map(Batch::iter)
        .map(|m| m.subject().to_owned())
        .collect();
    assert_eq!(fs.len(), 2);
    assert_eq!(os.len(), 4);
    assert!(fs.iter().all(|s| s.starts_with("funding_rate.")), "{fs:?}");
    assert!(os.iter().all(|s| s.starts_with("open_interest.")), "{os:?}");
    for b in fb.into_iter().chain(ob) {
        b.ack().await?;
    }
    assert!(f.fetch().await?.is_empty());
    assert!(o.fetch().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_fetch_bytes_max_is_fetched_alone_and_the_messages_behind_it_follow(
) -> TestResult {
    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_BOOKS", &["orderbook.>"])]).await?;
    let config = ConsumerConfig {
        fetch_bytes_max: 1_024,
        ..consumer_config("MARKET_BOOKS", "relay", &[])
    };
    ensure_consumer(&bed.js, &config).await?;
    let subject = "orderbook.binance.spot.BTC-USDT";
    publish(&bed.js, subject, "big", &"x".repeat(4_096)).await?;
    publish(&bed.js, subject, "small-1", "{\"n\":1}").await?;
    publish(&bed.js, subject, "small-2", "{\"n\":2}").await?;

    let mut fetcher = Fetcher::new(&bed.js, &config).await?;
    let batches = fetch_count(&mut fetcher, 3).await?;
    // The large message comes first and alone (no pull with the byte limit can carry it), then
    // the ones behind it, in stream order.
    let first: Vec<(u64, usize)> = batches[0]
        .iter()
        .map(|m| (m.stream_seq(), m.payload().len()))
        .collect();
    assert_eq!(first, vec![(1, 4_096)]);
    let seqs: Vec<u64> = batches
        .iter()
        .flat_map(|b| b.iter().map(|m| m.stream_seq()))
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    for b in batches {
        b.ack().await?;
    }
    await_ack_pending(&mut fetcher, 0).await?;
    assert!(fetcher.fetch().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_fails_while_nats_is_down_and_recovers_after_its_restart() -> TestResult {
    let mut bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_TRADES", &["trade.>"])]).await?;
    let config = consumer_config("MARKET_TRADES", "relay", &[]);
    ensure_consumer(&bed.js, &config).await?;
    publish(
        &bed.js,
        "trade.binance.spot.BTC-USDT",
        "before",
        "{\"n\":1}",
    )
    .await?;
    let mut fetcher = Fetcher::new(&bed.js, &config).await?;
    fetch_count(&mut fetcher, 1)
        .await?
        .into_iter()
        .next()
        .ok_or("no batch")?
        .ack()
        .await?;
    await_ack_pending(&mut fetcher, 0).await?;

    bed.nats.kill9()?;
    let started = Instant::now();
    let err = loop {
        match fetcher.fetch().await {
            Err(err) => break err,
            Ok(batch) => assert!(batch.is_empty()),
        }
        assert!(
            started.elapsed() < Duration::from_millis(CONDITION_DEADLINE_MS),
            "fetch never failed"
        );
    };
    assert!(
        matches!(
            err,
            SourceError::Disconnected { .. } | SourceError::Fetch { .. }
        ),
        "{err}"
    );

    bed.nats.restart()?;
    // The client reconnects by itself; the caller just retries.
    let deadline = Instant::now() + Duration::from_millis(CONDITION_DEADLINE_MS * 3);
    loop {
        if fetcher.fetch().await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fetch did not recover after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // retry backoff, as the relay does
    }
    publish(&bed.js, "trade.binance.spot.BTC-USDT", "after", "{\"n\":2}").await?;
    // JetStream writes consumer state to its file store asynchronously, so an ack made just
    // before a kill -9 may be forgotten and "before" redelivered (at least once, which the
    // relay's row identities absorb). What must hold: the durable did not go back further than
    // that, and the new message arrives.
    let deadline = Instant::now() + Duration::from_millis(CONDITION_DEADLINE_MS);
    let mut seen = Vec::new();
    while !seen.contains(&2) {
        assert!(
            Instant::now() < deadline,
            "\"after\" never arrived; saw {seen:?}"
        );
        let batch = fetcher.fetch().await?;
        for m in batch.iter() {
            assert!(
                m.stream_seq() == 1 || (m.stream_seq() == 2 && m.msg_id() == Some("after")),
                "unexpected delivery {} {:?}",
                m.stream_seq(),
                m.msg_id()
            );
            seen.push(m.stream_seq());
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_does_not_hang_while_nats_is_frozen_and_resumes_after() -> TestResult {
    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_TRADES", &["trade.>"])]).await?;
    let config = consumer_config("MARKET_TRADES", "relay", &[]);
    ensure_consumer(&bed.js, &config).await?;
    let mut fetcher = Fetcher::new(&bed.js, &config).await?;

    bed.nats.pause()?;
    let started = Instant::now();
    let frozen = fetcher.fetch().await;
    let elapsed = started.elapsed();
    bed.nats.resume()?;
    assert!(frozen.map(|b| b.is_empty()).unwrap_or(true));
    assert!(
        elapsed < Duration::from_millis(config.fetch_expires_ms + 3_000),
        "a pull to a frozen server took {elapsed:?}"
    );

    publish(&bed.js, "trade.binance.spot.BTC-USDT", "after-pause", "{}").await?;
    let batches = fetch_count(&mut fetcher, 1).await?;
    assert_eq!(
        batches[0].iter().next().and_then(|m| m.msg_id()),
        Some("after-pause")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_all_waits_while_deliveries_of_an_abandoned_pull_are_pending_below_it_even_after_an_earlier_ack_landed(
) -> TestResult {
    use futures_util::StreamExt as _;
    use std::collections::BTreeSet;

    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_TRADES", &["trade.>"])]).await?;
    let config = ConsumerConfig {
        ack_policy: AckPolicyKind::All,
        fetch_batch: 5,
        ..consumer_config("MARKET_TRADES", "relay", &[])
    };
    ensure_consumer(&bed.js, &config).await?;
    for i in 0..15 {
        publish(
            &bed.js,
            "trade.binance.spot.BTC-USDT",
            &format!("id-{i}"),
            "{}",
        )
        .await?;
    }
    let mut fetcher = Fetcher::new(&bed.js, &config).await?;
    let seqs_of = |batches: &[Batch]| -> Vec<u64> {
        batches
            .iter()
            .flat_map(Batch::iter)
            .map(|m| m.stream_seq())
            .collect()
    };

    // 1..=5 are written and acknowledged: the server's ack floor moves to 5, while the fetcher
    // keeps them on its books until a consumer info shows that floor.
    let first = fetch_count(&mut fetcher, 5).await?;
    assert_eq!(seqs_of(&first), (1..=5).collect::<Vec<_>>());
    for batch in first {
        fetcher.ack(batch).await?;
    }
    await_ack_pending(&mut fetcher, 0).await?;

    // A pull whose reader went away: the server delivers 6..=10 to it, and they stay pending,
    // written nowhere.
    let raw: consumer::PullConsumer = bed
        .js
        .get_stream("MARKET_TRADES")
        .await?
        .get_consumer("relay")
        .await?;
    let mut abandoned = raw.fetch().max_messages(5).messages().await?;
    let mut lost_if_acked = Vec::new();
    while let Some(message) = abandoned.next().await {
        lost_if_acked.push(message?.info()?.stream_sequence);
    }
    drop(abandoned);
    assert_eq!(lost_if_acked, (6..=10).collect::<Vec<_>>());

    // 11..=15 are written; an ack-all of 15 would cover 6..=10, so it waits. Counting the stale
    // 1..=5 as pending would make the count match and send it.
    let second = fetch_count(&mut fetcher, 5).await?;
    assert_eq!(seqs_of(&second), (11..=15).collect::<Vec<_>>());
    for batch in second {
        assert_eq!(
            fetcher.ack(batch).await?.acks_sent,
            0,
            "ack-all sent over 6..=10"
        );
    }
    assert_eq!(fetcher.backlog().await?.num_ack_pending, 10);

    // After ack_wait, 6..=15 come back; written, they are acknowledged, and nothing is left.
    let deadline = Instant::now() + Duration::from_millis(CONDITION_DEADLINE_MS);
    let mut written = BTreeSet::new();
    let mut acks_sent = 0;
    while written.len() < 10 {
        assert!(Instant::now() < deadline, "only {written:?} came back");
        let batch = fetcher.fetch().await?;
        written.extend(batch.iter().map(|m| m.stream_seq()));
        acks_sent += fetcher.ack(batch).await?.acks_sent;
    }
    assert_eq!(written, (6..=15).collect::<BTreeSet<_>>());
    assert!(acks_sent >= 1);
    await_ack_pending(&mut fetcher, 0).await?;
    Ok(())
}

/// Messages of the descriptor-exhaustion test: enough to roll over the tiny segments below
/// several times.
const FD_TEST_MESSAGES: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_at_a_wal_rollover_pauses_ingest_and_loses_nothing(
) -> TestResult {
    use prism_relay::metrics::Metrics;
    use prism_wal::fault::points::SEGMENT_CREATE;
    use prism_wal::{FaultyFs, Lsn, Retention, Wal, WalOptions};

    /// EMFILE on Linux: the process is out of file descriptors.
    const EMFILE: i32 = 24;

    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("FD_TRADES", &["fdtrade.>"])]).await?;
    let mut config = consumer_config("FD_TRADES", "fd-relay", &[]);
    // One message per pull and append: the segment fills and must roll over between appends.
    config.fetch_batch = 1;
    ensure_consumer(&bed.js, &config).await?;
    let fetcher = Fetcher::new(&bed.js, &config).await?;

    // A WAL whose segments hold a few records each, on a filesystem that runs out of descriptors
    // whenever a segment is created.
    let fs = FaultyFs::new();
    let options = WalOptions {
        segment_bytes_max: 1_024,
        group_bytes_max: 64 * 1_024,
        retention: Retention {
            bytes_max: 0,
            segments_max: 0,
            age_max: Duration::from_secs(3_600),
        },
        ..WalOptions::default()
    };
    let (wal, _) = Wal::open_with_fs(
        std::path::Path::new("/fd-test-wal"),
        options,
        std::sync::Arc::new(fs.clone()),
    )?;
    fs.fail_with_errno(SEGMENT_CREATE, u32::MAX, EMFILE);

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ingest = tokio::spawn(prism_relay::ingest::run(
        fetcher,
        wal.clone(),
        metrics.clone(),
        stop_rx,
    ));
    for seq in 1..=FD_TEST_MESSAGES {
        publish(
            &bed.js,
            &format!("fdtrade.binance.spot.S{seq}"),
            &format!("fd-{seq}"),
            &"x".repeat(100),
        )
        .await?;
    }

    // Several rollovers fail; ingest must stay up, paused, with the messages unacked.
    let deadline = Instant::now() + Duration::from_millis(CONDITION_DEADLINE_MS);
    while fs.count(SEGMENT_CREATE) < 5 {
        assert!(
            !ingest.is_finished(),
            "ingest stopped on a transient WAL error: {:?}",
            ingest.await
        );
        assert!(
            Instant::now() < deadline,
            "no rollover was attempted: durable {}, segment creations {}, paused {}",
            wal.durable_lsn(),
            fs.count(SEGMENT_CREATE),
            metrics.ingest_paused.get()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!ingest.is_finished(), "ingest stopped: {:?}", ingest.await);
    assert_eq!(metrics.ingest_paused.get(), 1, "ingest is not paused");
    let durable_while_exhausted = wal.durable_lsn();
    assert!(
        durable_while_exhausted.0 < FD_TEST_MESSAGES,
        "every message fit without a rollover: the test proves nothing"
    );

    // Descriptors come back: everything is written once, in order, and acknowledged.
    fs.clear_faults();
    let deadline = Instant::now() + Duration::from_millis(CONDITION_DEADLINE_MS);
    loop {
        let info = bed
            .js
            .get_stream("FD_TRADES")
            .await?
            .consumer_info("fd-relay")
            .await?;
        if wal.durable_lsn().0 >= FD_TEST_MESSAGES
            && info.num_ack_pending == 0
            && info.num_pending == 0
        {
            break;
        }
        assert!(!ingest.is_finished(), "ingest stopped: {:?}", ingest.await);
        assert!(
            Instant::now() < deadline,
            "not resumed: durable {} of {FD_TEST_MESSAGES}, ack pending {}, pending {}",
            wal.durable_lsn(),
            info.num_ack_pending,
            info.num_pending
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut reader = wal.reader(Lsn(1))?;
    let mut seqs = Vec::new();
    while let Some(record) = reader.next()? {
        seqs.push(record.envelope()?.stream_seq.0);
    }
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs, (1..=FD_TEST_MESSAGES).collect::<Vec<_>>());

    let _ = stop_tx.send(true);
    ingest.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_caught_up_pulls_a_steady_trickle_several_messages_at_a_time_not_one_by_one(
) -> TestResult {
    const MESSAGES: usize = 200;
    /// Pause between two publishes: a steady trickle of about 200 msg/s.
    const PACE_MS: u64 = 5;
    let bed = bed().await?;
    ensure_streams(&bed.js, &[stream("MARKET_TRADES", &["trade.>"])]).await?;
    let config = ConsumerConfig {
        fetch_linger_ms: 50,
        ..consumer_config("MARKET_TRADES", "relay", &[])
    };
    ensure_consumer(&bed.js, &config).await?;
    let mut fetcher = Fetcher::new(&bed.js, &config).await?;
    let js = bed.js.clone();
    let publisher = tokio::spawn(async move {
        for i in 0..MESSAGES {
            publish(&js, "trade.binance.spot.BTC-USDT", &format!("t{i}"), "{}").await?;
            tokio::time::sleep(Duration::from_millis(PACE_MS)).await;
        }
        TestResult::Ok(())
    });
    let batches = fetch_count(&mut fetcher, MESSAGES).await?;
    publisher.await??;
    // A pull returns as soon as a message is there: without the linger, a consumer that has
    // caught up gets one or two messages per pull, each batch costing an fsync and an ack round.
    assert!(
        batches.len() <= MESSAGES / 4,
        "{} pulls for {MESSAGES} messages",
        batches.len()
    );
    Ok(())
}
