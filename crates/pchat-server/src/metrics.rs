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
/// Labels whose values are names read at run time (instances, servers).
type NamedLabels = Vec<(&'static str, String)>;
/// A gauge of a measured quantity (seconds, bytes as measured).
type Measure = Gauge<f64, std::sync::atomic::AtomicU64>;

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
    pool: PoolGauges,
}

/// What a pool server exports of its pool (`pchat_procedures::overview`, read from etcd
/// every few seconds); all empty on a standalone server.
#[derive(Default)]
struct PoolGauges {
    failed_over: Family<NamedLabels, Gauge>,
    overview_age: Family<NamedLabels, Measure>,
    server_active: Family<NamedLabels, Gauge>,
    server_alive: Family<NamedLabels, Gauge>,
    db_role: Family<NamedLabels, Gauge>,
    mirroring_state: Family<NamedLabels, Gauge>,
    mirroring_lag_bytes: Family<NamedLabels, Gauge>,
    mirroring_lag_seconds: Family<NamedLabels, Measure>,
    status_age: Family<NamedLabels, Measure>,
    shipping_lag_messages: Family<NamedLabels, Gauge>,
    shipping_lag_seconds: Family<NamedLabels, Measure>,
    alerts: Family<NamedLabels, Gauge>,
    failback_steps_done: Family<NamedLabels, Gauge>,
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
            pool: PoolGauges::default(),
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
        let p = &m.pool;
        for (name, help, family) in [
            (
                "pool_failed_over",
                "1 when the pool serves from its backup site (FailedOver), 0 when Normal",
                &p.failed_over,
            ),
            (
                "pool_server_active",
                "1 when the server is on the pool's active-server list",
                &p.server_active,
            ),
            (
                "pool_server_alive",
                "1 when the server's liveness key is in etcd",
                &p.server_alive,
            ),
            (
                "db_role",
                "1 for each database instance's role as its agent last published it",
                &p.db_role,
            ),
            (
                "db_mirroring_state",
                "1 for each database instance's mirroring state (SQL Server's words)",
                &p.mirroring_state,
            ),
            (
                "db_mirroring_lag_bytes",
                "WAL not yet flushed by the mirror (principal) or not yet replayed (mirror)",
                &p.mirroring_lag_bytes,
            ),
            (
                "log_shipping_lag_messages",
                "Messages the source site's principal holds that the backup site has not replayed",
                &p.shipping_lag_messages,
            ),
            (
                "pool_alerts",
                "Problems the pool overview names (see the dashboard)",
                &p.alerts,
            ),
            (
                "failback_steps_done",
                "Steps done of the failback under way (absent when none is)",
                &p.failback_steps_done,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        for (name, help, family) in [
            (
                "pool_overview_age",
                "Age of this server's last reading of the pool from etcd",
                &p.overview_age,
            ),
            (
                "db_mirroring_lag",
                "The mirroring lag in time",
                &p.mirroring_lag_seconds,
            ),
            (
                "db_status_age",
                "Age of each agent's last published status",
                &p.status_age,
            ),
            (
                "log_shipping_lag",
                "Age of the backup site's last replayed commit",
                &p.shipping_lag_seconds,
            ),
        ] {
            registry.register_with_unit(name, help, Unit::Seconds, family.clone());
        }
        Metrics { registry, ..m }
    }

    /// Sets the pool gauges from the last reading (cleared first: an instance that left
    /// the topology, or a failback that ended, leaves no series behind).
    fn set_pool(&self, state: &State) {
        let p = &self.pool;
        p.failed_over.clear();
        p.overview_age.clear();
        p.server_active.clear();
        p.server_alive.clear();
        p.db_role.clear();
        p.mirroring_state.clear();
        p.mirroring_lag_bytes.clear();
        p.mirroring_lag_seconds.clear();
        p.status_age.clear();
        p.shipping_lag_messages.clear();
        p.shipping_lag_seconds.clear();
        p.alerts.clear();
        p.failback_steps_done.clear();
        let Some(reading) = state.pool_watch.get() else {
            return;
        };
        let Some(o) = reading.overview else {
            return;
        };
        let pool = || vec![("pool", o.pool.clone())];
        if let Some(t) = reading.read_at {
            p.overview_age
                .get_or_create(&pool())
                .set(t.elapsed().as_secs_f64());
        }
        p.failed_over.get_or_create(&pool()).set(i64::from(
            o.state == pchat_control::PoolStateKind::FailedOver,
        ));
        p.alerts.get_or_create(&pool()).set(o.alerts.len() as i64);
        if let Some(n) = o.failback_steps_done() {
            p.failback_steps_done.get_or_create(&pool()).set(n as i64);
        }
        for s in &o.servers {
            let l = vec![("server", s.name.clone())];
            p.server_active.get_or_create(&l).set(i64::from(s.active));
            p.server_alive.get_or_create(&l).set(i64::from(s.alive));
        }
        for d in &o.databases {
            let l = vec![("instance", d.instance.clone())];
            if let Some(age) = d.status_age_s {
                p.status_age.get_or_create(&l).set(age);
            }
            let Some(st) = &d.status else { continue };
            let role = serde_json::to_value(st.role)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            p.db_role
                .get_or_create(&vec![("instance", d.instance.clone()), ("role", role)])
                .set(1);
            p.mirroring_state
                .get_or_create(&vec![
                    ("instance", d.instance.clone()),
                    ("state", st.mirroring.state.as_str().to_owned()),
                ])
                .set(1);
            p.mirroring_lag_bytes
                .get_or_create(&l)
                .set(i64::try_from(st.mirroring.lag_bytes).unwrap_or(i64::MAX));
            p.mirroring_lag_seconds
                .get_or_create(&l)
                .set(st.mirroring.lag_seconds);
        }
        if let Some(l) = &o.log_shipping {
            let labels = vec![("to_site", l.record.to_site.clone())];
            if let Some(m) = l.lag_messages {
                p.shipping_lag_messages
                    .get_or_create(&labels)
                    .set(i64::try_from(m).unwrap_or(i64::MAX));
            }
            if let Some(s) = l.lag_s {
                p.shipping_lag_seconds.get_or_create(&labels).set(s);
            }
        }
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
        self.set_pool(state);
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

/// Serves `/metrics` and the dashboard (`/`, `/dashboard.json`) on `addr` until shutdown. A busy or refused address is logged and the
/// server goes on without it: the chat service matters more than its numbers.
pub async fn serve(state: Arc<State>, addr: SocketAddr) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "metrics are not served: cannot listen on [metrics] addr; choose another address, or \"\" to turn them off");
            return;
        }
    };
    tracing::info!(%addr, "metrics at http://{addr}/metrics, the dashboard at http://{addr}/");
    let (s1, s2, s3) = (state.clone(), state.clone(), state);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let state = s1.clone();
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
        )
        .route(
            "/",
            axum::routing::get(move || {
                let state = s2.clone();
                async move { axum::response::Html(crate::dashboard::html(&state)) }
            }),
        )
        .route(
            "/dashboard.json",
            axum::routing::get(move || {
                let state = s3.clone();
                async move { axum::Json(crate::dashboard::json(&state)) }
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
