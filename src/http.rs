//! The operator's HTTP endpoint: `/metrics` (Prometheus), `/health` (alive) and `/ready` (serving).
//!
//! `/health` answers 200 while the process and its WAL writer live, so a supervisor restarts a relay
//! whose WAL failed; `/ready` answers 200 only while ClickHouse accepts inserts and the schema matched,
//! so a load balancer or an alert sees a relay that is only buffering.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prism_wal::Wal;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{self, Metrics};

/// What the handlers read.
#[derive(Clone)]
struct Shared {
    /// The registry rendered by `/metrics`.
    registry: Arc<Registry>,
    /// Gauges read by `/ready` and refreshed before each scrape.
    metrics: Metrics,
    /// The WAL, for `/health` and the WAL gauges.
    wal: Wal,
}

/// Binds the listener; separate from [`serve`] so a bad address fails start-up, not later.
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen).await
}

/// Serves until shutdown.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    metrics: Metrics,
    wal: Wal,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let shared = Shared {
        registry,
        metrics,
        wal,
    };
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

async fn render_metrics(State(shared): State<Shared>) -> impl IntoResponse {
    let stats = shared.wal.stats();
    shared.metrics.wal_bytes.set(stats.bytes_on_disk as i64);
    shared.metrics.wal_segments.set(stats.segments as i64);
    shared
        .metrics
        .wal_durable_lsn
        .set(stats.durable_lsn.0 as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics::render(&shared.registry),
    )
}

async fn health(State(shared): State<Shared>) -> impl IntoResponse {
    if shared.metrics.wal_failed.get() == 1 {
        (StatusCode::SERVICE_UNAVAILABLE, "wal failed\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn ready(State(shared): State<Shared>) -> impl IntoResponse {
    if shared.metrics.ready.get() == 1 && shared.metrics.wal_failed.get() != 1 {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
