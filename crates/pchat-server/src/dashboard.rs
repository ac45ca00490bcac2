//! The admin dashboard, on the admin address beside `/metrics` (never the public HTTP
//! port): this server (serving or idle, sessions, rooms) and, in a pool, what the pool is
//! doing — its state and servers, each database's role, mirroring state and lag, log
//! shipping and its alerts, a failback under way, the last failover and failback reports.
//! The pool part is `pchat_procedures::overview`, read from etcd alone every
//! [`OVERVIEW_INTERVAL`] by [`follow`] (never on a request: a page or a scrape costs etcd
//! nothing, and answers whatever hangs). `/` is HTML that reloads itself; `/dashboard.json`
//! is the same as JSON.

use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use pchat_control::Etcd;
use pchat_procedures::overview::{self, Overview};
use pchat_procedures::steps::Step;

use crate::state::State;
use crate::web::escape_html as esc;

/// How often a pool server reads the overview.
pub const OVERVIEW_INTERVAL: Duration = Duration::from_secs(5);

/// The pool as last read (pool mode only).
#[derive(Default)]
pub struct PoolWatch {
    last: RwLock<Option<Reading>>,
}

/// One reading of the overview.
#[derive(Clone)]
pub struct Reading {
    /// The last overview read successfully.
    pub overview: Option<Arc<Overview>>,
    /// When it was read.
    pub read_at: Option<Instant>,
    /// Why the last reading failed, if it did.
    pub error: Option<String>,
}

impl PoolWatch {
    /// The last reading (`None` before the first).
    pub fn get(&self) -> Option<Reading> {
        self.last.read().ok().and_then(|r| r.clone())
    }

    fn record(&self, result: Result<Overview, String>) {
        let mut last = match self.last.write() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        let previous = last.take();
        *last = Some(match result {
            Ok(o) => Reading {
                overview: Some(Arc::new(o)),
                read_at: Some(Instant::now()),
                error: None,
            },
            // The last good overview stays, with its age, beside the error.
            Err(e) => Reading {
                overview: previous.as_ref().and_then(|p| p.overview.clone()),
                read_at: previous.as_ref().and_then(|p| p.read_at),
                error: Some(e),
            },
        });
    }
}

/// Reads pool `pool`'s overview into `state.pool_watch` until shutdown.
pub async fn follow(state: Arc<State>, etcd: Etcd, pool: String) {
    let mut shutdown = state.shutdown.subscribe();
    loop {
        let r = match tokio::time::timeout(OVERVIEW_INTERVAL, overview::read(&etcd, &pool)).await {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "etcd did not answer within {} s",
                OVERVIEW_INTERVAL.as_secs()
            )),
        };
        state.pool_watch.record(r);
        tokio::select! {
            _ = tokio::time::sleep(OVERVIEW_INTERVAL) => {}
            _ = shutdown.recv() => return,
        }
    }
}

/// What the server itself says.
fn server_json(state: &State) -> serde_json::Value {
    let serving = state.serving();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "domain": state.config.domain,
        "server": state.pool_server.as_deref(),
        "serving": serving.is_some(),
        "sessions": state.router.count(),
        "rooms_loaded": serving.map_or(0, |s| s.muc.loaded_count()),
        "resumable_sessions": state.resumable.len(),
    })
}

/// `/dashboard.json`.
pub fn json(state: &State) -> serde_json::Value {
    let pool = state.pool_watch.get().map(|r| {
        serde_json::json!({
            "overview": r.overview.as_deref(),
            "age_s": r.read_at.map(|t| t.elapsed().as_secs_f64()),
            "error": r.error,
        })
    });
    serde_json::json!({ "server": server_json(state), "pool": pool })
}

/// `/`: the page.
pub fn html(state: &State) -> String {
    let mut b = String::new();
    let s = server_json(state);
    let _ = write!(
        b,
        "<h1>pchat {} — {}</h1><table><tr><th>server</th><td>{}</td></tr><tr><th>serving</th><td>{}</td></tr>\
         <tr><th>sessions</th><td>{}</td></tr><tr><th>rooms loaded</th><td>{}</td></tr></table>",
        esc(env!("CARGO_PKG_VERSION")),
        esc(&state.config.domain),
        esc(s["server"].as_str().unwrap_or("standalone")),
        if s["serving"].as_bool() == Some(true) { "yes" } else { "no (idle)" },
        s["sessions"],
        s["rooms_loaded"],
    );
    match state.pool_watch.get() {
        None if state.pool_server.as_deref().is_none() => {
            b.push_str("<p>Standalone server: no pool, no mirroring, no log shipping.</p>")
        }
        None => b.push_str("<p>The pool has not been read yet.</p>"),
        Some(r) => pool_html(&mut b, &r),
    }
    format!(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>\
         <meta http-equiv='refresh' content='{}'><title>pchat dashboard</title><style>\
         body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;margin:.5em 0}}\
         th,td{{border:1px solid #bbb;padding:.2em .6em;text-align:left}}.alert{{color:#a00}}\
         .ok{{color:#070}}</style></head><body>{b}</body></html>",
        OVERVIEW_INTERVAL.as_secs()
    )
}

fn pool_html(b: &mut String, r: &Reading) {
    if let Some(e) = &r.error {
        let _ = write!(
            b,
            "<p class='alert'>The pool could not be read from etcd: {}</p>",
            esc(e)
        );
    }
    let Some(o) = &r.overview else {
        return;
    };
    let age = r.read_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let _ = write!(
        b,
        "<h2>Pool {}</h2><table><tr><th>state</th><td id='pool-state'>{:?}</td></tr>\
         <tr><th>authoritative site</th><td>{}</td></tr><tr><th>epoch</th><td>{}</td></tr>\
         <tr><th>read</th><td>{age:.0} s ago</td></tr></table>",
        esc(&o.pool),
        o.state,
        esc(o.authoritative_site.as_deref().unwrap_or("?")),
        o.epoch
    );
    b.push_str("<h2>Alerts</h2>");
    if o.alerts.is_empty() {
        b.push_str("<p class='ok'>none</p>");
    } else {
        b.push_str("<ul>");
        for a in &o.alerts {
            let _ = write!(b, "<li class='alert'>{}</li>", esc(a));
        }
        b.push_str("</ul>");
    }
    b.push_str(
        "<h2>Servers</h2><table><tr><th>server</th><th>site</th><th>active</th><th>alive</th></tr>",
    );
    for s in &o.servers {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            esc(&s.site),
            yes(s.active),
            yes(s.alive)
        );
    }
    b.push_str("</table><h2>Databases</h2><table><tr><th>site</th><th>instance</th><th>role</th>\
        <th>mirroring</th><th>lag</th><th>messages</th><th>id epoch</th><th>job</th><th>status age</th></tr>");
    for d in &o.databases {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td>",
            esc(&d.site),
            esc(&d.instance)
        );
        match &d.status {
            None => b.push_str("<td colspan='7' class='alert'>no status published</td>"),
            Some(st) => {
                let role = serde_json::to_value(st.role)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let job = st.job.as_ref().map_or(String::new(), |j| {
                    format!("{} {:?}: {}", j.kind, j.state, j.step)
                });
                let _ = write!(
                    b,
                    "<td>{}{}</td><td>{}{}</td><td>{} bytes, {:.1} s</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
                    esc(&role),
                    if d.principal_of_site { " (site principal)" } else { "" },
                    st.mirroring.state,
                    st.mirroring
                        .partner
                        .as_deref()
                        .map_or(String::new(), |p| format!(" with {}", esc(p))),
                    st.mirroring.lag_bytes,
                    st.mirroring.lag_seconds,
                    st.messages.map_or("?".into(), |m| m.to_string()),
                    st.id_epoch.map_or("?".into(), |e| e.to_string()),
                    esc(&job),
                    d.status_age_s.map_or("?".into(), |a| format!("{a:.0} s")),
                );
            }
        }
        b.push_str("</tr>");
    }
    b.push_str("</table><h2>Log shipping</h2>");
    match &o.log_shipping {
        None => b.push_str("<p>not configured</p>"),
        Some(l) => {
            let _ = write!(
                b,
                "<table><tr><th>from → to</th><td>{} → {}</td></tr><tr><th>state</th><td>{}</td></tr>\
                 <tr><th>messages behind</th><td id='shipping-lag'>{}</td></tr>\
                 <tr><th>last replayed commit</th><td>{}</td></tr></table>",
                esc(&l.record.from_site),
                esc(&l.record.to_site),
                esc(&l.record.state),
                l.lag_messages.map_or("?".into(), |m| m.to_string()),
                l.last_commit_at.as_deref().map_or("?".into(), |at| format!(
                    "{} ({:.0} s ago)",
                    esc(at),
                    l.lag_s.unwrap_or(0.0)
                )),
            );
        }
    }
    if let Some(f) = &o.failback {
        let _ = write!(
            b,
            "<h2 class='alert'>Failback under way</h2><p>started {} (backup {}); steps done: {}</p>",
            esc(&f.started_at),
            esc(&f.backup_name),
            esc(&f.run.done_steps.join(", "))
        );
    } else if let Some(f) = &o.failover {
        let _ = write!(
            b,
            "<p>Failed over at {}: `pchat pool failback {}` brings the pool home.</p>",
            esc(&f.at),
            esc(&o.pool)
        );
    }
    if let Some(f) = &o.last_failover {
        let r = &f.report;
        let _ = write!(
            b,
            "<h2>Last failover</h2><p id='last-failover'>finished {}: site {} (principal {}), {} lost at least, {} at most, window {:.1} s, {:.1} s in all</p>",
            esc(&f.finished_at),
            esc(&r.site),
            esc(&r.principal),
            r.lost_messages_at_least,
            r.lost_messages_at_most.map_or("?".into(), |m| m.to_string()),
            r.lost_window_s,
            r.total_ms as f64 / 1000.0
        );
        steps_html(b, &r.steps);
    }
    if let Some(f) = &o.last_failback {
        let r = &f.report;
        let _ = write!(
            b,
            "<h2>Last failback</h2><p id='last-failback'>finished {}: {:.1} s without service, {:.1} s in all{}</p>",
            esc(&f.finished_at),
            r.no_service_ms as f64 / 1000.0,
            r.total_ms as f64 / 1000.0,
            if r.resumed { " (resumed)" } else { "" }
        );
        steps_html(b, &r.steps);
    }
}

fn steps_html(b: &mut String, steps: &[Step]) {
    b.push_str("<table><tr><th>#</th><th>step</th><th>took</th></tr>");
    for s in steps {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{} — {}</td><td>{}</td></tr>",
            s.number,
            esc(&s.name),
            esc(&s.what),
            if s.done {
                format!("{:.1} s", s.ms as f64 / 1000.0)
            } else {
                "not done".into()
            }
        );
    }
    b.push_str("</table>");
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_part_shows_state_alerts_and_databases_escaped() {
        let o: Overview = serde_json::from_value(serde_json::json!({
            "pool": "pc1", "domain": "localhost", "state": "FailedOver",
            "authoritative_site": "B", "epoch": 7,
            "servers": [{"name": "b1", "site": "B", "active": true, "alive": false}],
            "databases": [{"site": "B", "instance": "b_db", "principal_of_site": true,
                           "status": null, "status_age_s": null}],
            "log_shipping": null, "failover": null, "failback": null,
            "last_failover": null, "last_failback": null,
            "alerts": ["active server b1 is <not> alive"], "read_at": "2026-12-05T00:00:00Z"
        }))
        .unwrap();
        let watch = PoolWatch::default();
        watch.record(Ok(o));
        // A failed reading keeps the last overview beside the error.
        watch.record(Err("etcd did not answer".into()));
        let r = watch.get().unwrap();
        assert_eq!(r.error.as_deref(), Some("etcd did not answer"));
        let mut b = String::new();
        pool_html(&mut b, &r);
        assert!(b.contains("<td id='pool-state'>FailedOver</td>"), "{b}");
        assert!(b.contains("active server b1 is &lt;not&gt; alive"), "{b}");
        assert!(b.contains("no status published"), "{b}");
        assert!(
            b.contains("could not be read from etcd: etcd did not answer"),
            "{b}"
        );
        assert!(b.contains("<p>not configured</p>"), "{b}");
    }
}
