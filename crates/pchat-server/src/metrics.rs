//! What a server counts, for `/metrics` in the Prometheus text format (the
//! `prometheus-client` crate) on the admin address (`[metrics] addr`, loopback by default,
//! never the public HTTP port). Counters are atomics bumped where things happen; gauges of
//! state (sessions, loaded rooms, serving or idle) are read from the server when scraped.
//! docs/operations/monitoring.md lists every metric and what to alert on.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::state::State;

/// Labels of a family: `[(name, value)]`.
type Labels = Vec<(&'static str, &'static str)>;

/// Every metric of this process.
pub struct Metrics {
    registry: Registry,
    /// Client connections open now, by transport (`starttls`, `tls`, `websocket`).
    pub connections: Family<Labels, Gauge>,
    /// Logins by outcome (`ok`, `failed`).
    pub logins: Family<Labels, Counter>,
    /// Stanzas received from bound clients.
    pub stanzas_in: Counter,
    /// Stanzas queued for delivery to a session.
    pub deliveries: Counter,
    /// Deliveries refused because the session's queue was full (the session is dropped).
    pub queue_drops: Counter,
    /// Time of a room's commit (one group of durable effects), in seconds.
    pub commit_seconds: Histogram,
    /// Room commits that failed.
    pub store_errors: Counter,
    /// Sessions resumed (XEP-0198) and sessions that waited in vain.
    pub resumptions: Family<Labels, Counter>,
    sessions: Gauge,
    rooms_loaded: Gauge,
    resumable: Gauge,
    serving: Gauge,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pchat");
        let m = Metrics {
            registry: Registry::default(),
            connections: Family::default(),
            logins: Family::default(),
            stanzas_in: Counter::default(),
            deliveries: Counter::default(),
            queue_drops: Counter::default(),
            // 0.1 ms to ~3.3 s.
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            store_errors: Counter::default(),
            resumptions: Family::default(),
            sessions: Gauge::default(),
            rooms_loaded: Gauge::default(),
            resumable: Gauge::default(),
            serving: Gauge::default(),
        };
        registry.register(
            "connections",
            "Client connections open now, by transport",
            m.connections.clone(),
        );
        registry.register("logins", "Logins by outcome (ok, failed)", m.logins.clone());
        registry.register(
            "stanzas_in",
            "Stanzas received from bound clients",
            m.stanzas_in.clone(),
        );
        registry.register(
            "deliveries",
            "Stanzas queued for delivery to a session",
            m.deliveries.clone(),
        );
        registry.register(
            "queue_drops",
            "Deliveries refused because a session's queue was full (the session is dropped)",
            m.queue_drops.clone(),
        );
        registry.register_with_unit(
            "commit",
            "Time of one room commit (compliance and archive durable)",
            Unit::Seconds,
            m.commit_seconds.clone(),
        );
        registry.register(
            "store_errors",
            "Room commits that failed",
            m.store_errors.clone(),
        );
        registry.register(
            "resumptions",
            "XEP-0198 sessions resumed (outcome=resumed) or given up (outcome=expired)",
            m.resumptions.clone(),
        );
        registry.register("sessions", "Bound sessions now", m.sessions.clone());
        registry.register(
            "rooms_loaded",
            "Rooms loaded in memory now",
            m.rooms_loaded.clone(),
        );
        registry.register(
            "resumable_sessions",
            "Sessions waiting to be resumed or resumable now",
            m.resumable.clone(),
        );
        registry.register(
            "serving",
            "1 when this server serves clients (standalone, or active in its pool), 0 when idle",
            m.serving.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition, with the gauges of state read from `state` now.
    pub fn render(&self, state: &State) -> String {
        self.sessions.set(state.router.count() as i64);
        self.resumable.set(state.resumable.len() as i64);
        match state.serving() {
            Some(serving) => {
                self.serving.set(1);
                self.rooms_loaded.set(serving.muc.loaded_count() as i64);
            }
            None => {
                self.serving.set(0);
                self.rooms_loaded.set(0);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A connection counted in `connections` until dropped.
pub struct ConnectionGauge(&'static str);

impl ConnectionGauge {
    /// Counts a connection over `transport`.
    pub fn open(transport: &'static str) -> ConnectionGauge {
        METRICS
            .connections
            .get_or_create(&vec![("transport", transport)])
            .inc();
        ConnectionGauge(transport)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        METRICS
            .connections
            .get_or_create(&vec![("transport", self.0)])
            .dec();
    }
}

/// Counts a login.
pub fn login(ok: bool) {
    METRICS
        .logins
        .get_or_create(&vec![("outcome", if ok { "ok" } else { "failed" })])
        .inc();
}

/// Counts the end of a resumable session's wait.
pub fn resumption(resumed: bool) {
    METRICS
        .resumptions
        .get_or_create(&vec![(
            "outcome",
            if resumed { "resumed" } else { "expired" },
        )])
        .inc();
}

/// Records one room commit.
pub fn commit(took: Duration, ok: bool) {
    METRICS.commit_seconds.observe(took.as_secs_f64());
    if !ok {
        METRICS.store_errors.inc();
    }
}

/// Serves `/metrics` on `addr` until shutdown. A busy or refused address is logged and the
/// server goes on without it: the chat service matters more than its numbers.
pub async fn serve(state: Arc<State>, addr: SocketAddr) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "metrics are not served: cannot listen on [metrics] addr; choose another address, or \"\" to turn them off");
            return;
        }
    };
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let state = state.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    METRICS.render(&state),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "the metrics listener stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_labels_appear_in_the_text_format() {
        // The registry is the process's: other tests may count at the same time, so only
        // what this test made must show, not exact values.
        let g = ConnectionGauge::open("websocket");
        login(true);
        login(false);
        commit(Duration::from_millis(3), false);
        let mut out = String::new();
        encode(&mut out, &METRICS.registry).unwrap();
        assert!(
            out.contains("pchat_connections{transport=\"websocket\"} "),
            "{out}"
        );
        assert!(
            out.contains("pchat_logins_total{outcome=\"failed\"} "),
            "{out}"
        );
        assert!(
            out.contains("pchat_commit_seconds_bucket{le=\"0.0032\"}"),
            "{out}"
        );
        assert!(
            out.contains("# HELP pchat_store_errors Room commits that failed."),
            "{out}"
        );
        assert!(METRICS.store_errors.get() >= 1);
        drop(g);
    }
}
