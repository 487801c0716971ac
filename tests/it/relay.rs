//! The relay end to end: the binary (or the library) between real NATS and ClickHouse
//! servers, with exact accounting of what was published and what was stored.

use crate::harness::{Bed, Load, RelayProc, DRAIN_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_traffic_is_stored_exactly_once() {
    let bed = Bed::start();
    let mut relay = RelayProc::spawn(&bed, "relay", &bed.config());
    relay.wait_ready().await;
    let summary = bed.publish(Load::new("smoke", 800)).await;
    let report = bed.wait_accounted(DRAIN_TIMEOUT).await;
    let totals = report.totals();
    assert_eq!(totals.published, summary.published_total(), "{report}");
    assert_eq!(totals.stored, 800, "{report}");
    assert_eq!(
        (totals.lost, totals.duplicated, totals.dead_lettered),
        (0, 0, 0),
        "{report}"
    );
    assert_eq!(bed.count_all_tables(), 800);
    assert!(relay.terminate().await.success(), "{}", relay.log());
}
