//! What a pool is doing, read from etcd alone — no agent and no database is asked, so it
//! answers as fast as etcd does, whatever hangs: the pool state and its servers, each
//! database as its agent last published it (role, mirroring state and lag, log shipping),
//! a failback under way, and the last failover and failback reports. Every server's admin
//! dashboard and its `/metrics` show it; the procedures record their final reports here
//! ([`record_finished`]).

use serde::{Deserialize, Serialize};

use pchat_agent_api::{MirroringState, Role, Status};
use pchat_control::etcd::Etcd;
use pchat_control::pool::{self, PoolError, PoolStateKind};
use pchat_control::{keys, mirroring};

use crate::dr::{FailbackRecord, FailbackReport, FailoverRecord, FailoverReport};
use crate::logship::ShippingRecord;

/// An agent's status older than this is called stale (agents publish every few seconds).
pub const STALE_STATUS_S: f64 = 30.0;

/// A pool at one moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    /// The pool's name.
    pub pool: String,
    /// Its XMPP domain.
    pub domain: String,
    /// Normal or FailedOver.
    pub state: PoolStateKind,
    /// The site whose databases are authoritative.
    pub authoritative_site: Option<String>,
    /// The pool state's epoch.
    pub epoch: u64,
    /// Every server of the topology.
    pub servers: Vec<ServerView>,
    /// Every database instance of the topology.
    pub databases: Vec<DatabaseView>,
    /// Log shipping between the sites, when configured.
    pub log_shipping: Option<ShippingView>,
    /// The DR failover in force (until a failback completes).
    pub failover: Option<FailoverRecord>,
    /// A failback under way.
    pub failback: Option<FailbackRecord>,
    /// The last `pchat pool failover` that completed.
    pub last_failover: Option<Finished<FailoverReport>>,
    /// The last `pchat pool failback` that completed.
    pub last_failback: Option<Finished<FailbackReport>>,
    /// What needs an operator, each naming what is wrong.
    pub alerts: Vec<String>,
    /// When this was read (RFC 3339).
    pub read_at: String,
}

/// One server of the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerView {
    /// Its name.
    pub name: String,
    /// Its site.
    pub site: String,
    /// On the pool's active-server list.
    pub active: bool,
    /// Its liveness key is in etcd (it runs and reaches etcd).
    pub alive: bool,
}

/// One database instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatabaseView {
    /// Its site.
    pub site: String,
    /// The agent's instance name.
    pub instance: String,
    /// The site's principal by its mirroring record (or the topology's `database`).
    pub principal_of_site: bool,
    /// What its agent last published.
    pub status: Option<Status>,
    /// How old that is, in seconds.
    pub status_age_s: Option<f64>,
}

/// Log shipping between the sites.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShippingView {
    /// The configuration.
    pub record: ShippingRecord,
    /// Messages the source's principal holds that the secondary has not replayed, by the
    /// two agents' last statuses.
    pub lag_messages: Option<u64>,
    /// The secondary's last replayed commit (RFC 3339).
    pub last_commit_at: Option<String>,
    /// Seconds since then.
    pub lag_s: Option<f64>,
}

/// A procedure's final report and when it finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finished<T> {
    /// RFC 3339.
    pub finished_at: String,
    /// The report the command printed.
    pub report: T,
}

/// Keeps a procedure's final report for the dashboards (`failover`, `failback`). A report
/// that cannot be written is said on `progress`: the procedure itself is done.
pub(crate) async fn record_finished<T: Serialize>(
    etcd: &Etcd,
    pool: &str,
    procedure: &str,
    report: &T,
    progress: &mut (dyn FnMut(&str) + Send),
) {
    let f = Finished {
        finished_at: pchat_agent_api::now_rfc3339(),
        report,
    };
    let r = match serde_json::to_vec(&f) {
        Ok(json) => etcd
            .put(&keys::last_report(pool, procedure), &json)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = r {
        progress(&format!(
            "the {procedure} report was not kept in etcd for the dashboards: {e}"
        ));
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    etcd: &Etcd,
    key: &str,
    alerts: &mut Vec<String>,
) -> Result<Option<T>, PoolError> {
    Ok(match etcd.get(key).await? {
        Some(kv) => match serde_json::from_slice(&kv.value) {
            Ok(v) => Some(v),
            Err(e) => {
                alerts.push(format!("{key} in etcd cannot be read: {e}"));
                None
            }
        },
        None => None,
    })
}

fn age_s(at: &str, now: time::OffsetDateTime) -> Option<f64> {
    let t = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()?;
    Some(((now - t).as_seconds_f64()).max(0.0))
}

/// Reads pool `pool` from etcd.
pub async fn read(etcd: &Etcd, pool: &str) -> Result<Overview, PoolError> {
    let now = time::OffsetDateTime::now_utc();
    let view = pool::get(etcd, pool).await?;
    let t = &view.topology;
    let mut alerts = Vec::new();

    let mut servers = Vec::new();
    for s in &t.servers {
        let active = view.state.active_servers.contains(&s.name);
        let alive = etcd
            .get(&keys::server_alive(pool, &s.name))
            .await?
            .is_some();
        if active && !alive {
            alerts.push(format!(
                "active server {} is not alive (no liveness key in etcd): its users have no service until it runs again or `pchat pool active-servers` replaces it",
                s.name
            ));
        }
        servers.push(ServerView {
            name: s.name.clone(),
            site: s.site.clone(),
            active,
            alive,
        });
    }

    let mut databases = Vec::new();
    for site in &t.sites {
        let principal = match mirroring::principal_of(etcd, pool, site).await {
            Ok(db) => db.name,
            Err(PoolError::Etcd(e)) => return Err(PoolError::Etcd(e)),
            Err(e) => {
                alerts.push(e.to_string());
                site.database.name.clone()
            }
        };
        for db in std::iter::once(&site.database).chain(site.mirror.iter()) {
            let status: Option<Status> =
                read_json(etcd, &keys::status(pool, &db.name), &mut alerts).await?;
            let status_age_s = status.as_ref().and_then(|s| age_s(&s.at, now));
            let is_principal = db.name == principal;
            alerts.extend(database_alerts(
                &db.name,
                is_principal && site.mirror.is_some(),
                status.as_ref(),
                status_age_s,
            ));
            databases.push(DatabaseView {
                site: site.name.clone(),
                instance: db.name.clone(),
                principal_of_site: is_principal,
                status,
                status_age_s,
            });
        }
    }

    let log_shipping = read_json::<ShippingRecord>(etcd, &keys::log_shipping(pool), &mut alerts)
        .await?
        .map(|record| shipping_view(record, &databases, now));
    for d in &databases {
        if let Some(l) = d.status.as_ref().and_then(|s| s.log_shipping.as_ref()) {
            for a in &l.alerts {
                alerts.push(format!("log shipping on {}: {a}", d.instance));
            }
        }
    }
    if let Some(l) = &log_shipping {
        if let Some(lag) = l.lag_s {
            if lag > l.record.alert_lag_s as f64 && l.lag_messages.unwrap_or(1) > 0 {
                alerts.push(format!(
                    "log shipping: site {}'s last replayed commit is {lag:.0} s old, more than the alert threshold of {} s",
                    l.record.to_site, l.record.alert_lag_s
                ));
            }
        }
    }

    let failover = read_json(etcd, &keys::failover(pool), &mut alerts).await?;
    let failback: Option<FailbackRecord> =
        read_json(etcd, &keys::failback(pool), &mut alerts).await?;
    if let Some(since) = failback
        .as_ref()
        .and_then(|f| f.run.no_service_since_unix_ms)
    {
        let ms = now.unix_timestamp_nanos() / 1_000_000 - i128::from(since);
        alerts.push(format!(
            "a failback has left the pool without service for {:.0} s: run `pchat pool failback {pool}` to resume it",
            ms.max(0) as f64 / 1000.0
        ));
    }
    let last_failover = read_json(etcd, &keys::last_report(pool, "failover"), &mut alerts).await?;
    let last_failback = read_json(etcd, &keys::last_report(pool, "failback"), &mut alerts).await?;
    Ok(Overview {
        pool: pool.to_owned(),
        domain: t.pool.domain.clone(),
        state: view.state.state,
        authoritative_site: t
            .authoritative_site(view.state.state)
            .map(|s| s.name.clone()),
        epoch: view.state.epoch,
        servers,
        databases,
        log_shipping,
        failover,
        failback,
        last_failover,
        last_failback,
        alerts,
        read_at: pchat_agent_api::now_rfc3339(),
    })
}

/// What one database's last status says is wrong.
fn database_alerts(
    instance: &str,
    mirrored_principal: bool,
    status: Option<&Status>,
    age_s: Option<f64>,
) -> Vec<String> {
    let mut out = Vec::new();
    let Some(s) = status else {
        out.push(format!(
            "database {instance}: its agent has published no status (is `pchat agent run` running there?)"
        ));
        return out;
    };
    if let Some(age) = age_s.filter(|a| *a > STALE_STATUS_S) {
        out.push(format!(
            "database {instance}: its agent's last status is {age:.0} s old (the agent is down or cannot reach etcd)"
        ));
    }
    if let Some(ms) = s.unresponsive_ms {
        out.push(format!(
            "database {instance}: PostgreSQL runs but has not answered for {:.1} s (hung, or its disk stalled)",
            ms as f64 / 1000.0
        ));
    }
    if mirrored_principal && s.role == Role::Principal {
        match s.mirroring.state {
            MirroringState::Synchronized | MirroringState::Synchronizing => {}
            other => out.push(format!(
                "database {instance}: mirroring is {other}: commits are not protected by the mirror (see `pchat db mirror status`)"
            )),
        }
    }
    out
}

fn shipping_view(
    record: ShippingRecord,
    databases: &[DatabaseView],
    now: time::OffsetDateTime,
) -> ShippingView {
    let principal_of = |site: &str| {
        databases
            .iter()
            .find(|d| d.site == site && d.principal_of_site)
            .and_then(|d| d.status.as_ref())
    };
    let source = principal_of(&record.from_site);
    let secondary = principal_of(&record.to_site);
    let lag_messages = match (
        source.and_then(|s| s.messages),
        secondary.and_then(|s| s.messages),
    ) {
        (Some(a), Some(b)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    let last_commit_at = secondary
        .and_then(|s| s.log_shipping.as_ref())
        .and_then(|l| l.restore.as_ref())
        .and_then(|r| r.last_commit_at.clone());
    let lag_s = last_commit_at.as_deref().and_then(|at| age_s(at, now));
    ShippingView {
        record,
        lag_messages,
        last_commit_at,
        lag_s,
    }
}

impl Overview {
    /// The number of the failback's steps done, while one is under way.
    pub fn failback_steps_done(&self) -> Option<usize> {
        self.failback.as_ref().map(|f| f.run.done_steps.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(role: Role, state: MirroringState) -> Status {
        serde_json::from_value(serde_json::json!({
            "instance": "a_db", "pool": "pc1", "role": role, "initialized": true,
            "data_dir": "/d", "port": 5432, "system_identifier": null, "timeline": 1,
            "wal_lsn": null, "replay_lsn": null, "checkpoint_lsn": null, "cluster_state": null,
            "mirroring": {"state": state, "partner": null, "detail": null, "lag_bytes": 0,
                          "lag_seconds": 0.0, "synchronous_standby_names": null},
            "fenced": null, "job": null, "at": "2026-12-05T00:00:00Z"
        }))
        .unwrap()
    }

    #[test]
    fn a_database_is_alerted_on_when_it_is_silent_stale_hung_or_unprotected() {
        assert!(database_alerts("a_db", true, None, None)[0].contains("no status"));
        let ok = status(Role::Principal, MirroringState::Synchronized);
        assert!(database_alerts("a_db", true, Some(&ok), Some(1.0)).is_empty());
        let stale = database_alerts("a_db", true, Some(&ok), Some(95.0));
        assert!(stale[0].contains("95 s old"), "{stale:?}");
        let mut hung = ok.clone();
        hung.unresponsive_ms = Some(4200);
        assert!(database_alerts("a_db", true, Some(&hung), Some(1.0))[0].contains("4.2 s"));
        let alone = status(Role::Principal, MirroringState::Disconnected);
        assert!(database_alerts("a_db", true, Some(&alone), Some(1.0))[0].contains("DISCONNECTED"));
        // A principal whose site has no mirror is not expected to be mirrored.
        assert!(database_alerts("a_db", false, Some(&alone), Some(1.0)).is_empty());
    }
}
