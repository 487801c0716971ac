//! The operator's HTTP endpoint: `/metrics` (Prometheus), `/health` (alive) and `/ready` (serving).
//!
//! `/health` (liveness) answers 200 while the WAL lives and every task loop (ingest per consumer,
//! each drain lane, the ledger keeper) makes progress or waits legitimately; a loop silent for
//! [`crate::metrics::health::LOOP_STALL_S`], or a failed WAL, answers 503 with a body naming it,
//! so a supervisor restarts the relay. `/ready` answers 503 while the drain has not reached
//! ClickHouse yet, at once on an error no retry fixes (any class but retryable), once the WAL
//! failed, and while a table's inserts have been failing for longer than `[metrics]
//! ready_insert_failing_s`; its body names each table with the last error's class and a short
//! redacted cause. It answers 200 again as soon as the table's next insert succeeds. A relay that
//! is only buffering is therefore visible to a load balancer and to alerts (see
//! [`crate::metrics::health`]). The WAL writer, idle without traffic, is watched through its group
//! commit under way: one running past the same bound fails `/health` too.
//!
//! The port is reachable by whoever can reach the node, so it must not be able to take the relay
//! down: each connection holds a file descriptor the WAL and the ClickHouse connections need too.
//! [`serve`] therefore accepts a connection only while fewer than `connections_max` are open
//! (later ones wait in the kernel's listen queue, holding no descriptor of the relay), closes a
//! connection whose request headers do not arrive within `header_read_timeout_ms` (idle and slow
//! clients), and closes every connection `request_timeout_ms` after it was accepted (a client that
//! does not read its answer). Connections serve one request each (no keep-alive), so the last
//! bound is the whole request's.
//!
//! Slow clients holding all `connections_max` connections must not fail the liveness probe: an
//! orchestrator would restart a healthy relay. So while every regular connection is taken, up to
//! [`PROBE_CONNECTIONS_MAX`] more are accepted into a reserve that answers only `/health` and
//! `/ready` (`/metrics` gets 503 and the scraper retries) and closes a connection whose headers do
//! not arrive within [`PROBE_HEADER_READ_TIMEOUT_MS`]: a probe sends its request at once, while an
//! idle client parked in the reserve loses its slot within that time. The descriptor bound is
//! `connections_max + PROBE_CONNECTIONS_MAX`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prism_wal::Wal;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::MetricsConfig;
use crate::logcond::{Condition, Occurrence};
use crate::metrics::{self, Metrics};

/// Pause after a failed `accept` (for example EMFILE while descriptors are short), so the loop
/// does not spin while the condition lasts; short enough that scrapes resume promptly.
const ACCEPT_ERROR_PAUSE_MS: u64 = 100;

/// Connections accepted beyond `connections_max` for `/health` and `/ready` only, while the
/// regular ones are all taken: two, so one probe and one readiness check pass at once; a handful
/// of extra descriptors at most.
pub const PROBE_CONNECTIONS_MAX: usize = 2;

/// Time a reserved probe connection has to send its request headers (ms): a probe sends them at
/// once, so a second is generous, and an idle client holds a reserved slot no longer than that.
pub const PROBE_HEADER_READ_TIMEOUT_MS: u64 = 1_000;

/// Time a reserved probe connection is kept at most, from accept (ms): answering `/health` takes
/// microseconds, so this only bounds a client that does not read its answer.
pub const PROBE_REQUEST_TIMEOUT_MS: u64 = 2_000;

/// The bounds of the endpoint, from `[metrics]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once, at most.
    pub connections_max: usize,
    /// Time from accept to the end of the request headers.
    pub header_read_timeout: Duration,
    /// Time from accept to the end of the answer.
    pub request_timeout: Duration,
}

impl HttpLimits {
    /// The limits `[metrics]` configures.
    pub fn from_config(config: &MetricsConfig) -> HttpLimits {
        HttpLimits {
            connections_max: config.connections_max as usize,
            header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
        }
    }
}

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

/// Serves until shutdown, within `limits` (see the module documentation).
pub async fn serve(
    listener: TcpListener,
    limits: HttpLimits,
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
        .with_state(shared.clone());
    let probe_app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .fallback(busy)
        .with_state(shared);
    let permits = Arc::new(Semaphore::new(limits.connections_max.max(1)));
    let probe_permits = Arc::new(Semaphore::new(PROBE_CONNECTIONS_MAX));
    let probe_limits = HttpLimits {
        connections_max: PROBE_CONNECTIONS_MAX,
        header_read_timeout: Duration::from_millis(PROBE_HEADER_READ_TIMEOUT_MS)
            .min(limits.header_read_timeout),
        request_timeout: Duration::from_millis(PROBE_REQUEST_TIMEOUT_MS)
            .min(limits.request_timeout),
    };
    // Accept errors repeat every ACCEPT_ERROR_PAUSE_MS while they last (and a client can provoke
    // them), so they are logged as a condition: when they start, periodically, and when they end.
    let mut accept_failing = Condition::default();
    loop {
        // Take a slot before accepting: past the cap and the probe reserve, connections wait in
        // the listen queue. A regular slot is preferred whenever one is free.
        let (permit, app, limits) = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => (permit, &app, limits),
                // The semaphore is never closed; stop serving if it ever is.
                Err(_) => return Ok(()),
            },
            permit = probe_permits.clone().acquire_owned() => match permit {
                Ok(permit) => (permit, &probe_app, probe_limits),
                Err(_) => return Ok(()),
            },
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                log_accept_ok(&mut accept_failing);
                accepted
            }
            Err(error) => {
                // Not fatal: descriptors may be short for a moment, or the peer left already.
                log_accept_error(&mut accept_failing, &error);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                }
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(false);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.request_timeout, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "metrics connection closed early");
                }
                Err(_) => {
                    tracing::debug!(%peer, "metrics connection closed at request_timeout_ms");
                }
            }
        });
    }
}

/// Logs a failed accept through `failing` (see [`crate::logcond`]).
fn log_accept_error(failing: &mut Condition, error: &std::io::Error) {
    match failing.occurred() {
        Some(Occurrence::Started) => {
            tracing::warn!(%error, "accepting a connection on the metrics port failed")
        }
        Some(o) => tracing::warn!(%error, failures = o.count(), lasted_s = o.lasted_s(),
            "accepting connections on the metrics port still fails"),
        None => {}
    }
}

/// Logs the end of failing accepts, if they were failing.
fn log_accept_ok(failing: &mut Condition) {
    if let Some(ended) = failing.cleared() {
        tracing::info!(
            failures = ended.count,
            lasted_ms = ended.lasted.as_millis() as u64,
            "accepting connections on the metrics port works again"
        );
    }
}

/// What a reserved probe connection answers for anything but `/health` and `/ready`.
async fn busy() -> impl IntoResponse {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "metrics port busy: every connection is taken; retry\n",
    )
}

async fn render_metrics(State(shared): State<Shared>) -> impl IntoResponse {
    shared
        .metrics
        .refresh(&shared.wal.stats(), shared.wal.budget_bytes_max());
    (
        [(header::CONTENT_TYPE, metrics::TEXT_FORMAT_CONTENT_TYPE)],
        metrics::render(&shared.registry),
    )
}

/// 200 while the WAL lives and every task loop beats; 503 naming what does not.
async fn health(State(shared): State<Shared>) -> impl IntoResponse {
    let wal_failed = shared.metrics.wal_failed.get() == 1;
    let commit_running = shared.wal.commit_running_for();
    match shared.metrics.health.liveness(wal_failed, commit_running) {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(body) => (StatusCode::SERVICE_UNAVAILABLE, body),
    }
}

/// 200 while the relay delivers to ClickHouse; 503 naming the tables and why.
async fn ready(State(shared): State<Shared>) -> impl IntoResponse {
    let wal_failed = shared.metrics.wal_failed.get() == 1;
    let readiness = shared.metrics.health.readiness(wal_failed);
    shared.metrics.ready.set(i64::from(readiness.is_ok()));
    match readiness {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(body) => (StatusCode::SERVICE_UNAVAILABLE, body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_repeating_every_pause_log_a_start_and_an_end_not_one_line_each() {
        const FAILURES: usize = 200;
        // A reminder interval longer than any test run: only the start and the end are due.
        let mut failing = Condition::new(Duration::from_secs(3_600));
        let error = std::io::Error::from_raw_os_error(24);
        let logs = crate::logcond::captured_logs(|| {
            for _ in 0..FAILURES {
                log_accept_error(&mut failing, &error);
            }
            log_accept_ok(&mut failing);
            log_accept_ok(&mut failing);
        });
        let failed = logs.lines().filter(|l| l.contains("WARN")).count();
        let again = logs.lines().filter(|l| l.contains("works again")).count();
        assert_eq!((failed, again), (1, 1), "{logs}");
        assert!(logs.contains(&format!("failures={FAILURES}")), "{logs}");
    }
}
