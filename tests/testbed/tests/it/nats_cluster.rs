//! A JetStream cluster through `NatsCluster`: three nodes, a stream of three replicas, the
//! stream leader killed with SIGKILL and restarted on the same ports and store.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use prism_testbed::NatsCluster;

use crate::TestResult;

/// Nodes of the test's cluster, and replicas of its stream.
const NODES: usize = 3;

/// Bound on a stream leader election after its leader died; JetStream elects within seconds.
const ELECTION_DEADLINE_MS: u64 = 30_000;

/// Pause between two looks at the stream's state while waiting for an election.
const POLL_INTERVAL_MS: u64 = 100;

/// The stream's leader and its followers that are current, as the cluster reports them (`None`
/// while no leader is elected or no node answers).
async fn stream_cluster(js: &jetstream::Context, name: &str) -> Option<(String, usize)> {
    let mut stream = js.get_stream(name).await.ok()?;
    let info = stream.info().await.ok()?;
    let cluster = info.cluster.clone()?;
    let leader = cluster.leader.filter(|l| !l.is_empty())?;
    let current = cluster.replicas.iter().filter(|r| r.current).count();
    Some((leader, current))
}

/// Polls the stream until `accept` takes its leader and current followers.
async fn wait_stream(
    js: &jetstream::Context,
    name: &str,
    mut accept: impl FnMut(&str, usize) -> bool,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let deadline = Instant::now() + Duration::from_millis(ELECTION_DEADLINE_MS);
    loop {
        if let Some((leader, current)) = stream_cluster(js, name).await {
            if accept(&leader, current) {
                return Ok(leader);
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("stream {name} did not reach the awaited state").into());
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_keeps_an_r3_stream_through_the_kill_and_restart_of_its_leader(
) -> TestResult {
    let mut cluster = NatsCluster::start(NODES)?;
    assert_eq!(cluster.len(), NODES);
    assert_eq!(cluster.url().split(',').count(), NODES);
    let js = jetstream::new(async_nats::connect(cluster.urls()).await?);
    js.create_stream(stream::Config {
        name: "TRADES".into(),
        subjects: vec!["trade.>".into()],
        num_replicas: NODES,
        ..Default::default()
    })
    .await?;
    for i in 0..20 {
        js.publish("trade.binance.btc", format!("a{i}").into())
            .await?
            .await?;
    }
    let leader = wait_stream(&js, "TRADES", |_, current| current == NODES - 1).await?;
    let killed = cluster
        .index_of(&leader)
        .ok_or("the stream's leader is one of the cluster's nodes")?;
    let port = cluster.node(killed).port();
    let pid_before = cluster.node(killed).pid();

    cluster.node_mut(killed).kill9()?;
    assert_eq!(cluster.node(killed).pid(), None);
    let new_leader = wait_stream(&js, "TRADES", |l, _| l != leader).await?;
    for i in 0..20 {
        js.publish("trade.binance.btc", format!("b{i}").into())
            .await?
            .await?;
    }
    cluster.node_mut(killed).restart()?;

    assert_eq!(cluster.node(killed).port(), port);
    assert_ne!(cluster.node(killed).pid(), pid_before);
    assert_ne!(cluster.index_of(&new_leader), Some(killed));
    cluster.wait_formed()?;
    // The restarted node catches up from its store and the leader: every follower current.
    wait_stream(&js, "TRADES", |_, current| current == NODES - 1).await?;
    let mut stream = js.get_stream("TRADES").await?;
    assert_eq!(stream.info().await?.state.messages, 40);
    // The restarted node itself answers with the whole stream.
    let direct = jetstream::new(async_nats::connect(cluster.node(killed).url()).await?);
    let mut via_restarted = direct.get_stream("TRADES").await?;
    assert_eq!(via_restarted.info().await?.state.messages, 40);
    Ok(())
}
