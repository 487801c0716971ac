//! JetStream through `Nats`: publish and durable pull, SIGKILL and restart, drop.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use prism_testbed::Nats;

use crate::TestResult;

/// Bound on collecting a test's messages from JetStream.
const FETCH_DEADLINE_MS: u64 = 10_000;

/// Pulls from `consumer` until `count` messages arrived, acking each with a
/// double ack so the consumer's state is settled when this returns.
async fn pull_and_ack(
    consumer: &consumer::PullConsumer,
    count: usize,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    let mut payloads = Vec::with_capacity(count);
    let collect = async {
        while payloads.len() < count {
            let mut batch = consumer
                .fetch()
                .max_messages(count - payloads.len())
                .expires(Duration::from_millis(500))
                .messages()
                .await?;
            while let Some(message) = batch.next().await {
                let message = message?;
                payloads.push(String::from_utf8(message.payload.to_vec())?);
                message.double_ack().await?;
            }
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    tokio::time::timeout(Duration::from_millis(FETCH_DEADLINE_MS), collect).await??;
    Ok(payloads)
}

fn durable(name: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ..Default::default()
    }
}

fn stream_config(name: &str, subject: &str) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

#[tokio::test]
async fn published_messages_are_pulled_in_order_by_a_durable_consumer_and_acked() -> TestResult {
    let nats = Nats::start()?;
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port()));
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let stream = js
        .create_stream(stream_config("TRADES", "trades.>"))
        .await?;
    for i in 0..10 {
        js.publish(
            format!("trades.binance.btc-usdt.{i}"),
            format!("m{i}").into(),
        )
        .await?
        .await?;
    }
    let mut consumer: consumer::PullConsumer = stream.create_consumer(durable("relay")).await?;

    let payloads = pull_and_ack(&consumer, 10).await?;

    let expected: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads, expected);
    let info = consumer.info().await?;
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
    Ok(())
}

#[tokio::test]
async fn stream_consumer_and_messages_survive_sigkill_and_restart_on_the_same_store() -> TestResult
{
    let mut nats = Nats::start()?;
    let port = nats.port();
    let pid_before = nats.pid();
    {
        let js = jetstream::new(async_nats::connect(nats.url()).await?);
        let stream = js
            .create_stream(stream_config("FUNDING", "funding.>"))
            .await?;
        let _: consumer::PullConsumer = stream.create_consumer(durable("relay")).await?;
        for i in 0..5 {
            // Awaiting the publish ack means JetStream has stored the message.
            js.publish("funding.okx.btc", format!("f{i}").into())
                .await?
                .await?;
        }
    }

    nats.kill9()?;
    assert_eq!(nats.pid(), None);
    nats.restart()?;

    assert_eq!(nats.port(), port);
    assert_ne!(nats.pid(), pid_before);
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let mut stream = js.get_stream("FUNDING").await?;
    assert_eq!(stream.info().await?.state.messages, 5);
    let consumer: consumer::PullConsumer = stream.get_consumer("relay").await?;
    let payloads = pull_and_ack(&consumer, 5).await?;
    assert_eq!(payloads, ["f0", "f1", "f2", "f3", "f4"]);
    Ok(())
}

#[test]
fn dropping_the_handle_kills_the_server_and_removes_its_directory() -> TestResult {
    let nats = Nats::start()?;
    let pid = nats.pid().ok_or("a started server has a pid")?;
    let data_dir = nats.data_dir();
    assert!(
        data_dir.is_dir(),
        "JetStream store {} exists",
        data_dir.display()
    );
    let server_dir = data_dir
        .parent()
        .ok_or("the store is inside the server's directory")?
        .to_owned();

    drop(nats);

    // Reaped, so not even a zombie is left under this pid (a reuse of the pid
    // within this instant is not a concern on a test machine).
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} is gone"
    );
    assert!(!server_dir.exists(), "{} is removed", server_dir.display());
    Ok(())
}

#[test]
fn terminate_stops_the_server_gracefully_and_restart_brings_it_back() -> TestResult {
    let mut nats = Nats::start()?;

    let status = nats
        .terminate()?
        .ok_or("nats-server exits by itself on SIGTERM")?;

    assert!(status.success(), "graceful exit, got {status}");
    assert_eq!(nats.pid(), None);
    nats.restart()?;
    assert!(nats.pid().is_some());
    Ok(())
}
