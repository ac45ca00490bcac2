//! `/metrics` of one agent, in Prometheus text (the `prometheus-client` encoder), on an
//! address of its own (`metrics_listen`, loopback by default), plain HTTP, never the API's
//! port: what the agent knows of its instance right now, read from its own state — the
//! status it takes (fresh when PostgreSQL answers within the query timeout, else the last
//! one), its probes' silence and stall clocks, the space under the data directory, the jobs.
//! The servers export the pool's view as the agents published it to etcd
//! (docs/operations/monitoring.md); this is the instance's own, which still answers when
//! etcd or the servers do not.

use std::time::Duration;

use pchat_agent_api::{Role, Status};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What one scrape reads.
pub(crate) struct Readings {
    pub pool: String,
    pub instance: String,
    /// The instance's status (with its job and log shipping); `None` when PostgreSQL did not
    /// answer in time and no status was taken before.
    pub status: Option<Status>,
    /// Taken for this scrape (PostgreSQL answered in time), not the last one kept.
    pub fresh: bool,
    /// How long the running PostgreSQL has answered no probe.
    pub silent: Option<Duration>,
    /// How long, answering, it has completed none of the writes its sessions wait on.
    pub stalled: Option<Duration>,
    /// Bytes available under the data directory at the last probe.
    pub space_available: Option<u64>,
    /// How long a principal's disk has been full.
    pub disk_full: Option<Duration>,
    /// Failed jobs among the ones the agent keeps (the last 32).
    pub failed_jobs: usize,
}

type Labels = Vec<(String, String)>;

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn gauge_f(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

/// One series per value of `label`, 1 for `now` and 0 for the others: an alert can say
/// `== 1` whatever the state was before.
fn one_of(registry: &mut Registry, name: &str, help: &str, label: &str, all: &[&str], now: &str) {
    let family = Family::<Labels, Gauge>::default();
    for v in all {
        family
            .get_or_create(&vec![(label.to_owned(), (*v).to_owned())])
            .set(i64::from(*v == now));
    }
    registry.register(name, help, family);
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Principal => "principal",
        Role::Mirror => "mirror",
        Role::Standby => "standby",
        Role::Stopped => "stopped",
    }
}

/// The text a scrape gets.
pub(crate) fn render(r: &Readings) -> String {
    let mut reg = Registry::with_prefix("pchat_agent");
    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&vec![
        ("pool".to_owned(), r.pool.clone()),
        ("instance".to_owned(), r.instance.clone()),
        ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
    ])
    .set(1);
    reg.register("info", "The agent, its pool and instance", info);
    gauge(
        &mut reg,
        "status_fresh",
        "The status was taken for this scrape (0: PostgreSQL did not answer in time, the last one is shown)",
        i64::from(r.fresh),
    );
    gauge_f(
        &mut reg,
        "postgres_silent_seconds",
        "How long the running PostgreSQL has answered no probe (0: it answers)",
        r.silent.map_or(0.0, |d| d.as_secs_f64()),
    );
    gauge_f(
        &mut reg,
        "postgres_stalled_seconds",
        "How long PostgreSQL, answering, has completed none of the writes its sessions wait on (a storage stall)",
        r.stalled.map_or(0.0, |d| d.as_secs_f64()),
    );
    if let Some(bytes) = r.space_available {
        gauge(
            &mut reg,
            "data_available_bytes",
            "Bytes available under the data directory (the least of its filesystems, pg_wal's included)",
            i64::try_from(bytes).unwrap_or(i64::MAX),
        );
    }
    gauge_f(
        &mut reg,
        "disk_full_seconds",
        "How long the principal's data disk has had under 1 MiB available (the agent gives up its lease to a synchronized mirror after postgres_hung_timeout_ms)",
        r.disk_full.map_or(0.0, |d| d.as_secs_f64()),
    );
    gauge(
        &mut reg,
        "jobs_failed",
        "Failed jobs among the last 32 the agent keeps",
        i64::try_from(r.failed_jobs).unwrap_or(i64::MAX),
    );
    if let Some(st) = &r.status {
        status_series(&mut reg, st);
    }
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

/// The series read from the instance's status.
fn status_series(reg: &mut Registry, st: &Status) {
    one_of(
        reg,
        "role",
        "The instance's role now (1) and the others (0); a hung PostgreSQL is stopped",
        "role",
        &["principal", "mirror", "standby", "stopped"],
        role_name(st.role),
    );
    gauge(
        reg,
        "initialized",
        "The data directory holds a cluster",
        i64::from(st.initialized),
    );
    one_of(
        reg,
        "mirroring_state",
        "Database mirroring state in SQL Server's words (1 for the current one)",
        "state",
        &[
            "SYNCHRONIZED",
            "SYNCHRONIZING",
            "SUSPENDED",
            "DISCONNECTED",
            "NONE",
        ],
        st.mirroring.state.as_str(),
    );
    gauge(
        reg,
        "mirroring_lag_bytes",
        "On a principal the WAL its mirror has not flushed (send queue); on a mirror the WAL not replayed (redo queue)",
        i64::try_from(st.mirroring.lag_bytes).unwrap_or(i64::MAX),
    );
    gauge_f(
        reg,
        "mirroring_lag_seconds",
        "The same lag in time",
        st.mirroring.lag_seconds,
    );
    gauge(
        reg,
        "fenced",
        "etcd says this instance was failed over from: it will not run as a principal",
        i64::from(st.fenced.is_some()),
    );
    if let Some(n) = st.messages {
        gauge(
            reg,
            "archive_messages",
            "Messages in the archive (the rooms' counters in mgc)",
            i64::try_from(n).unwrap_or(i64::MAX),
        );
    }
    if let Some(n) = st.client_connections {
        gauge(
            reg,
            "client_connections",
            "Sessions of the pool's servers to mgc and mgccomp",
            i64::try_from(n).unwrap_or(i64::MAX),
        );
    }
    let running = st.job.as_ref().filter(|j| j.finished_at.is_none());
    gauge(
        reg,
        "job_running",
        "A job (backup, restore, clone, …) runs on this instance",
        i64::from(running.is_some()),
    );
    gauge(
        reg,
        "job_percent",
        "How far the running job is, when it says (0 otherwise)",
        running.and_then(|j| j.percent).map_or(0, i64::from),
    );
    if let Some(ls) = &st.log_shipping {
        gauge(
            reg,
            "log_shipping_alerts",
            "Log-shipping problems the agent reports (each names what to do: pchat log-shipping status)",
            i64::try_from(ls.alerts.len()).unwrap_or(i64::MAX),
        );
        if let Some(b) = &ls.backup {
            gauge(
                reg,
                "log_shipping_archive_failing",
                "The backup job (archive_command) fails now",
                i64::from(b.failing),
            );
            gauge(
                reg,
                "log_shipping_archive_failures",
                "Failed archive attempts PostgreSQL counted",
                b.failures,
            );
        }
        if let Some(c) = &ls.copy {
            gauge(
                reg,
                "log_shipping_copy_pending",
                "Shipped WAL segments not yet copied to this site",
                i64::try_from(c.pending).unwrap_or(i64::MAX),
            );
        }
        if let Some(re) = &ls.restore {
            gauge(
                reg,
                "log_shipping_restore_pending",
                "Copied WAL segments not yet restored",
                i64::try_from(re.pending).unwrap_or(i64::MAX),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pchat_agent_api::{Mirroring, MirroringState};

    fn status(role: Role) -> Status {
        Status {
            instance: "a_db".into(),
            pool: "lync".into(),
            role,
            initialized: true,
            data_dir: "/srv/pg".into(),
            port: 5432,
            system_identifier: None,
            timeline: Some(1),
            wal_lsn: None,
            replay_lsn: None,
            checkpoint_lsn: None,
            cluster_state: None,
            mirroring: Mirroring {
                state: MirroringState::Synchronized,
                lag_bytes: 4096,
                ..Mirroring::none()
            },
            fenced: None,
            messages: Some(12),
            client_connections: Some(3),
            id_epoch: None,
            log_shipping: None,
            job: None,
            at: String::new(),
            unresponsive_ms: None,
        }
    }

    #[test]
    fn a_principal_with_a_full_disk_says_so_in_the_text_format() {
        let text = render(&Readings {
            pool: "lync".into(),
            instance: "a_db".into(),
            status: Some(status(Role::Principal)),
            fresh: true,
            silent: None,
            stalled: None,
            space_available: Some(512 * 1024),
            disk_full: Some(Duration::from_millis(1_500)),
            failed_jobs: 1,
        });
        for line in [
            "pchat_agent_info{pool=\"lync\",instance=\"a_db\",version=",
            "pchat_agent_role{role=\"principal\"} 1",
            "pchat_agent_role{role=\"mirror\"} 0",
            "pchat_agent_mirroring_state{state=\"SYNCHRONIZED\"} 1",
            "pchat_agent_mirroring_lag_bytes 4096",
            "pchat_agent_data_available_bytes 524288",
            "pchat_agent_disk_full_seconds 1.5",
            "pchat_agent_archive_messages 12",
            "pchat_agent_jobs_failed 1",
            "pchat_agent_status_fresh 1",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }
}
