//! One run: a fresh lab, writers, the schedule's faults injected and healed one after the
//! other, a final heal and repair, then the checks ([`crate::check`]).
//!
//! Every line the run prints starts with its time since the run began, so a failure reads
//! as a timeline: the schedule as generated, each fault as resolved (which instance was the
//! principal, which member led etcd), each heal and repair, what the writers saw.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _};
use base64::Engine as _;
use nix::sys::signal::Signal;
use tokio::sync::watch;

use crate::check::{judge, Counts, Declared, Sample, Violation, WriterOutcome};
use crate::lab::{
    self, alive, process_tree, signal, Lab, Site, AGENT_PORT, DOMAIN, PASSWORD, POOL, USERS,
};
use crate::ledger::{Archive, Ledger, LedgerConfig, LedgerTask};
use crate::net::{Cut, Redirect};
use crate::netem::Netem;
use crate::proxy::DelayProxy;
use crate::schedule::{Damage, Disk, Event, Fault, Party, Proc, Role, Schedule, Volume};

/// How many times the harness's repair runs `db mirror add` before it gives up.
const REPAIR_ATTEMPTS: u32 = 4;

/// The note of a damaged segment nobody was told about; judged as a violation.
const ALERT_MISSING: &str = "ALERT MISSING";

/// How long after the final heal an old principal may still be out of recovery (its agent
/// looks for a fence every third of the 3 s lease TTL, then stops PostgreSQL).
const FENCE_GRACE: Duration = Duration::from_secs(3);

/// When to keep the lab's directory (logs, PostgreSQL's logs, the share's listing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Never.
    Never,
    /// When the run broke an invariant or could not finish.
    OnFailure,
    /// Always.
    Always,
}

/// What to run.
pub struct RunConfig {
    /// The `pchat` binary.
    pub bin: PathBuf,
    /// The schedule.
    pub schedule: Schedule,
    /// Keeps concurrent labs apart (namespace names); a few characters.
    pub id: String,
    /// When to keep the lab's directory.
    pub keep: Keep,
    /// Where the timeline goes (stderr when `None`).
    pub out: Option<Arc<Mutex<dyn std::io::Write + Send>>>,
}

/// One event as it happened.
#[derive(Clone, Debug)]
pub struct EventReport {
    /// The event as scheduled.
    pub event: Event,
    /// What it was resolved to (instances, members), or why it was skipped.
    pub resolved: String,
    /// The longest time the writers went without an acknowledgment during it (from the
    /// last one before the fault to the first after), the outage clients saw.
    pub outage: Duration,
    /// Findings of the event itself (an alert that did not come, a repair that failed).
    pub notes: Vec<String>,
}

/// A run's result.
#[derive(Debug)]
pub struct RunReport {
    /// The schedule's seed.
    pub seed: u64,
    /// Broken invariants (empty: the run passed).
    pub violations: Vec<Violation>,
    /// Why the run could not finish (the lab did not start, a step of the harness failed);
    /// judged as a failure, but of the run, not of an invariant.
    pub aborted: Option<String>,
    /// The events.
    pub events: Vec<EventReport>,
    /// Counts.
    pub counts: Counts,
    /// Whether a DR failover declared a loss, and its figures.
    pub declared: Option<String>,
    /// Lab start, seconds.
    pub setup_s: f64,
    /// Whole run, seconds.
    pub total_s: f64,
    /// The kept directory, if any.
    pub kept: Option<PathBuf>,
}

impl RunReport {
    /// True when no invariant broke and the run finished.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.aborted.is_none()
    }
}

/// Runs `cfg` to its end: the lab is made, entered, used and removed. Blocks.
pub fn run_blocking(cfg: RunConfig) -> RunReport {
    let started = Instant::now();
    let seed = cfg.schedule.seed;
    let failed = move |why: String| RunReport {
        seed,
        violations: Vec::new(),
        aborted: Some(why),
        events: Vec::new(),
        counts: Counts::default(),
        declared: None,
        setup_s: 0.0,
        total_s: started.elapsed().as_secs_f64(),
        kept: None,
    };
    let lab = match Lab::prepare(&cfg.bin, &cfg.id) {
        Ok(l) => l,
        Err(e) => return failed(format!("preparing the lab: {e:#}")),
    };
    let ns = lab.client_ns();
    let thread = std::thread::Builder::new()
        .name(format!("chaos-{}", cfg.id))
        .spawn(move || -> RunReport {
            let setns = std::fs::File::open(format!("/run/netns/{ns}"))
                .map_err(anyhow::Error::from)
                .and_then(|f| {
                    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| anyhow!("setns into {ns}: {e}"))
                });
            if let Err(e) = setns {
                return failed(format!("{e:#}"));
            }
            // Built after setns: every thread of the runtime, and every process it starts,
            // is in the client namespace.
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return failed(format!("tokio runtime: {e}")),
            };
            rt.block_on(run_in_lab(lab, cfg, started))
        });
    match thread {
        Ok(t) => t
            .join()
            .unwrap_or_else(|_| failed("the run's thread panicked".into())),
        Err(e) => failed(format!("spawning the run's thread: {e}")),
    }
}

struct Out {
    t0: Instant,
    out: Option<Arc<Mutex<dyn std::io::Write + Send>>>,
}

impl Out {
    fn say(&self, what: &str) {
        let line = format!("[{:>7.1}s] {what}\n", self.t0.elapsed().as_secs_f64());
        match &self.out {
            Some(o) => {
                if let Ok(mut o) = o.lock() {
                    let _ = o.write_all(line.as_bytes());
                    let _ = o.flush();
                }
            }
            None => {
                use std::io::Write as _;
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }
}

/// What the sampler needs of an instance, without borrowing the lab.
#[derive(Clone)]
struct Probe {
    name: &'static str,
    data: PathBuf,
    sock: PathBuf,
}

/// What one instance answered the sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PgState {
    in_recovery: bool,
    /// Out of recovery and able to acknowledge a commit: no synchronous standby named, or
    /// one attached.
    can_ack: bool,
}

impl Probe {
    async fn in_recovery(&self) -> Option<bool> {
        self.state().await.map(|s| s.in_recovery)
    }

    async fn state(&self) -> Option<PgState> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        if !lab::alive(pid) {
            return None;
        }
        let run = tokio::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(lab::PG_BIN).join("psql"))
            .arg("-h")
            .arg(&self.sock)
            .args([
                "-p",
                "5432",
                "-d",
                "postgres",
                "-AtXq",
                "-c",
                "select pg_is_in_recovery(), \
                 current_setting('synchronous_standby_names') = '' \
                 or exists (select 1 from pg_stat_replication \
                 where sync_state in ('sync', 'quorum'))",
            ])
            .env("PGCONNECT_TIMEOUT", "2")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(2), run)
            .await
            .ok()?
            .ok()?;
        let (rec, ack) = match String::from_utf8_lossy(&out.stdout).trim() {
            "t|t" => (true, true),
            "t|f" => (true, false),
            "f|t" => (false, true),
            "f|f" => (false, false),
            _ => return None,
        };
        Some(PgState {
            in_recovery: rec,
            can_ack: !rec && ack,
        })
    }
}

/// The sampler: every 500 ms, every instance's `pg_is_in_recovery()` (in parallel, each
/// bounded to 2 s), until told to stop.
async fn sampler(probes: Vec<Probe>, stop: watch::Receiver<bool>) -> Vec<Sample> {
    let mut samples = Vec::new();
    // Bounded: a run lasts well under an hour.
    for _ in 0..20_000 {
        if *stop.borrow() {
            break;
        }
        let at = Instant::now();
        let answers = futures_join_all(
            probes
                .iter()
                .cloned()
                .map(|p| async move { (p.name, p.state().await) }),
        )
        .await;
        let named = |f: fn(&PgState) -> bool| {
            answers
                .iter()
                .filter(|(_, s)| s.as_ref().is_some_and(f))
                .map(|(n, _)| (*n).to_owned())
                .collect()
        };
        samples.push(Sample {
            at,
            writable: named(|s| s.can_ack),
            primaries: named(|s| !s.in_recovery),
        });
        tokio::time::sleep(Duration::from_millis(500).saturating_sub(at.elapsed())).await;
    }
    samples
}

async fn futures_join_all<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(t) = h.await {
            out.push(t);
        }
    }
    out
}

struct Chaos {
    lab: Lab,
    out: Out,
    serving: Site,
    principal: HashMap<Site, &'static str>,
    declared: Option<Declared>,
    clock_slack: Duration,
    probes: Vec<Probe>,
    /// Procedures of the pool that failed (a DR failover that could not finish): findings,
    /// reported as violations of the procedure's promise.
    failed_procedures: Vec<Violation>,
    /// Set when the pool cannot go on (the lost site's failover failed): later events are
    /// skipped.
    dead: bool,
}

async fn run_in_lab(lab: Lab, cfg: RunConfig, t0: Instant) -> RunReport {
    let out = Out {
        t0,
        out: cfg.out.clone(),
    };
    out.say(&format!(
        "chaos run, seed {} ({} events, {:.0} s of faults); lab {} in {}",
        cfg.schedule.seed,
        cfg.schedule.events.len(),
        cfg.schedule.duration_ms() as f64 / 1000.0,
        cfg.id,
        lab.root().display()
    ));
    for line in cfg.schedule.to_string().lines() {
        out.say(&format!("  {line}"));
    }
    let probes = lab::INSTANCES
        .iter()
        .map(|i| Probe {
            name: i,
            data: lab.data_dir(i),
            sock: lab.socket_dir(i),
        })
        .collect();
    let mut chaos = Chaos {
        lab,
        out,
        serving: Site::A,
        principal: HashMap::from([(Site::A, "a_db"), (Site::B, "b_db")]),
        declared: None,
        clock_slack: Duration::ZERO,
        probes,
        failed_procedures: Vec::new(),
        dead: false,
    };
    let mut report = RunReport {
        seed: cfg.schedule.seed,
        violations: Vec::new(),
        aborted: None,
        events: Vec::new(),
        counts: Counts::default(),
        declared: None,
        setup_s: 0.0,
        total_s: 0.0,
        kept: None,
    };
    if let Err(e) = chaos.body(&cfg.schedule, &mut report).await {
        report.aborted = Some(format!("{e:#}"));
        chaos.out.say(&format!("run aborted: {e:#}"));
    }
    report.total_s = t0.elapsed().as_secs_f64();
    let keep = match cfg.keep {
        Keep::Always => true,
        Keep::OnFailure => !report.passed(),
        Keep::Never => false,
    };
    if keep {
        report.kept = Some(chaos.lab.keep_dir());
        if let Some(d) = &report.kept {
            chaos.out.say(&format!("kept {}", d.display()));
        }
    }
    report
}

impl Chaos {
    async fn body(&mut self, schedule: &Schedule, report: &mut RunReport) -> anyhow::Result<()> {
        let setup = Instant::now();
        let out = &self.out;
        tokio::time::timeout(
            Duration::from_secs(420),
            self.lab.start(&|s: &str| out.say(s)),
        )
        .await
        .map_err(|_| anyhow!("the lab did not start within 420 s"))?
        .context("starting the lab")?;
        report.setup_s = setup.elapsed().as_secs_f64();
        self.out.say(&format!("lab up in {:.1} s", report.setup_s));

        let (stop_tx, stop_rx) = watch::channel(false);
        let sampler = tokio::spawn(sampler(self.probes.clone(), stop_rx));
        let mut writers = self.start_writers();
        for w in &mut writers {
            w.wait_acked(10, Duration::from_secs(90))
                .await
                .context("the writers' first acknowledgments")?;
        }
        self.out.say("writers acknowledged; faults begin");

        for event in &schedule.events {
            if self.dead {
                self.out.say(&format!(
                    "skipped (the pool has no site left to serve): {event}"
                ));
                continue;
            }
            let start = Instant::now();
            let (resolved, notes) = match self.event(event).await {
                Ok(r) => r,
                Err(e) => (format!("harness error: {e:#}"), vec![format!("{e:#}")]),
            };
            report.events.push(EventReport {
                event: *event,
                resolved,
                outage: Duration::ZERO,
                notes,
            });
            // The outage is measured afterwards from the ledgers; keep the window.
            let _ = start;
        }

        self.out
            .say("final heal: every cut lifted, every process resumed");
        self.heal_everything().await;
        // Every agent runs again: give them a moment to act on what they find (an old
        // principal's agent fences it within a second), then no old principal may still be
        // out of recovery. Judged before the operator's repair, which would re-seed it.
        tokio::time::sleep(FENCE_GRACE).await;
        let settled = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let site = self.serving;
        self.repair(site).await;
        let mut live = true;
        for w in &mut writers {
            if let Err(e) = w.wait_more(5, Duration::from_secs(120)).await {
                live = false;
                report.violations.push(Violation {
                    invariant: "liveness",
                    what: format!("no service 120 s after the final heal: {e:#}"),
                });
            }
        }
        if live {
            self.out
                .say("every writer acknowledged again after the final heal");
        }
        let mut outcomes = Vec::new();
        for w in writers {
            let (ledger, gave_up) = w.stop().await?;
            let archive = Archive::read(
                &self.lab.server_addrs(),
                &ledger.config().jid,
                PASSWORD,
                &ledger.config().room,
                Duration::from_secs(120),
            )
            .await
            .map_err(|e| format!("{e:#}"));
            outcomes.push(WriterOutcome {
                ledger,
                gave_up,
                archive,
            });
        }
        let _ = stop_tx.send(true);
        let samples = sampler.await.unwrap_or_default();
        self.out
            .say(&format!("{} writable-principal samples", samples.len()));

        // Outages per event, from the ledgers.
        let mut t = self.event_windows(report);
        for (i, e) in report.events.iter_mut().enumerate() {
            if let Some((from, to)) = t.get_mut(i) {
                e.outage = outcomes
                    .iter()
                    .map(|w| longest_gap(&w.ledger, *from, *to))
                    .max()
                    .unwrap_or_default();
            }
        }
        let lab = &self.lab;
        let site_of = |a: SocketAddr| lab.server_named(a).map(Site::of);
        let (violations, counts) = judge(
            &outcomes,
            &samples,
            Some(settled),
            self.declared.as_ref(),
            &site_of,
        );
        report.violations.extend(violations);
        report.violations.append(&mut self.failed_procedures);
        // A damaged segment that was not copied before the damage must be named by
        // `log-shipping status` (what the pool promises for a corrupt or missing segment).
        for e in &report.events {
            for n in e.notes.iter().filter(|n| n.starts_with(ALERT_MISSING)) {
                report.violations.push(Violation {
                    invariant: "alert",
                    what: format!("{}: {n}", e.event.fault),
                });
            }
        }
        report.counts = counts;
        if let Some(d) = &self.declared {
            report.declared = Some(format!(
                "DR failover from site {}: at least {} lost (at most {}), the writers lost {}",
                d.from.name(),
                d.at_least,
                d.at_most.map_or("not given".into(), |m| m.to_string()),
                report.counts.lost_declared
            ));
        }
        // Each writer's timeline beside the processes' logs, for a kept lab: its
        // acknowledgments (time on the run's clock, id, server) and what it noted.
        for (i, w) in outcomes.iter().enumerate() {
            let path = self.lab.root().join("logs").join(format!("writer-{i}.log"));
            let _ = std::fs::write(
                &path,
                writer_timeline(&w.ledger, self.out.t0, &|a| {
                    lab.server_named(a)
                        .map_or_else(|| a.to_string(), str::to_owned)
                }),
            );
        }
        for w in &outcomes {
            if !report.passed() {
                self.out.say(&format!(
                    "writer {} events:\n{}",
                    w.ledger.config().room,
                    w.ledger.events_text()
                ));
            }
        }
        for v in &report.violations {
            self.out.say(&format!("VIOLATION {v}"));
        }
        Ok(())
    }

    /// The windows of the events, recorded as they ran (see `event`).
    fn event_windows(&self, report: &RunReport) -> Vec<(Instant, Instant)> {
        report
            .events
            .iter()
            .filter_map(|e| {
                e.notes
                    .iter()
                    .find_map(|n| n.strip_prefix("window:").map(str::to_owned))
            })
            .filter_map(|w| {
                let (a, b) = w.split_once(',')?;
                let a: u64 = a.parse().ok()?;
                let b: u64 = b.parse().ok()?;
                Some((
                    self.out.t0 + Duration::from_millis(a),
                    self.out.t0 + Duration::from_millis(b),
                ))
            })
            .collect()
    }

    fn start_writers(&self) -> Vec<LedgerTask> {
        let all = self.lab.server_addrs();
        USERS
            .iter()
            .enumerate()
            .map(|(k, user)| {
                // Each writer starts at another server, so the active ones share the load.
                let mut order = all.clone();
                order.rotate_left(k % 2);
                let room = format!("chaos{}@conference.{DOMAIN}", k + 1);
                let mut cfg = LedgerConfig::new(
                    order,
                    &format!("{user}@{DOMAIN}"),
                    PASSWORD,
                    &room,
                    &format!("w{}", k + 1),
                );
                cfg.names = lab::SERVERS
                    .iter()
                    .map(|s| (self.lab.server_addr(s), (*s).to_owned()))
                    .collect();
                cfg.interval = Duration::from_millis(100);
                cfg.stall_timeout = Duration::from_secs(300);
                Ledger::new(cfg).spawn()
            })
            .collect()
    }

    fn ms(&self) -> u64 {
        self.out.t0.elapsed().as_millis() as u64
    }

    /// Injects, holds, heals and settles one event; returns what it resolved to and notes
    /// (the first note is its window on the run's clock, for the outage).
    async fn event(&mut self, e: &Event) -> anyhow::Result<(String, Vec<String>)> {
        let from = self.ms();
        self.out.say(&format!("inject: {e}"));
        let mut notes = Vec::new();
        let site = self.serving;
        let before = self.principal_of(site).await;
        let resolved = match self.inject_hold_heal(e, &mut notes).await {
            Ok(r) => r,
            Err(err) => {
                // The harness could not do what was asked: heal what it can and say so.
                self.heal_everything().await;
                notes.push(format!("harness: {err:#}"));
                format!("not done: {err:#}")
            }
        };
        // Whatever the fault, a site that failed over runs without its mirror until an
        // operator re-seeds it; left so, the next events would meet a pair that cannot fail
        // over (seed 28: an etcd fault failed the pair over, and a later freeze of the new
        // principal had no mirror to go to). The operator repairs it — and a failover that
        // nothing about the fault explains is a finding of its own.
        if !self.dead && self.serving == site && !matches!(e.fault, Fault::SiteLoss) {
            let after = self.principal_of(site).await;
            if after != before {
                if !e.fault.may_fail_over() {
                    notes.push(format!(
                        "{before} was failed over to {after} though the fault touched no database, agent or link"
                    ));
                }
                self.repair(site).await;
            }
        }
        self.out.say(&format!("  resolved: {resolved}"));
        for n in &notes {
            self.out.say(&format!("  note: {n}"));
        }
        tokio::time::sleep(Duration::from_millis(e.settle_ms)).await;
        let to = self.ms();
        notes.insert(0, format!("window:{from},{to}"));
        Ok((resolved, notes))
    }

    async fn principal_of(&mut self, site: Site) -> &'static str {
        for i in site.instances() {
            if let Some(p) = self.probes.iter().find(|p| p.name == i) {
                if p.in_recovery().await == Some(false) {
                    self.principal.insert(site, i);
                    return i;
                }
            }
        }
        self.principal
            .get(&site)
            .copied()
            .unwrap_or(site.instances()[0])
    }

    async fn role(&mut self, r: Role) -> Option<&'static str> {
        let site = self.serving;
        let p = self.principal_of(site).await;
        match r {
            Role::Principal => Some(p),
            Role::Mirror => site.instances().into_iter().find(|i| *i != p),
            Role::Backup => (site == Site::A).then_some("b_db"),
        }
    }

    /// A party's host name and, for an agent's API, the port.
    async fn party(&mut self, p: Party) -> Option<(String, Option<u16>)> {
        Some(match p {
            Party::Db(r) => (self.role(r).await?.to_owned(), None),
            Party::Api(r) => (self.role(r).await?.to_owned(), Some(AGENT_PORT)),
            Party::Server(i) => (self.serving.servers()[usize::from(i) % 2].to_owned(), None),
            Party::Etcd(k) => (format!("etcd{k}"), None),
            Party::EtcdLeader => (
                format!("etcd{}", self.lab.etcd_leader().await.unwrap_or(1)),
                None,
            ),
            Party::Operator => ("client".to_owned(), None),
        })
    }

    /// A process's daemon name, or for PostgreSQL `postgres-INSTANCE`.
    async fn process(&mut self, p: Proc) -> Option<String> {
        Some(match p {
            Proc::Postgres(r) => format!("postgres-{}", self.role(r).await?),
            Proc::Agent(r) => format!("agent-{}", self.role(r).await?),
            Proc::Server(i) => format!("server-{}", self.serving.servers()[usize::from(i) % 2]),
            Proc::Etcd(k) => format!("etcd{k}"),
            Proc::EtcdLeader => format!("etcd{}", self.lab.etcd_leader().await.unwrap_or(1)),
        })
    }

    fn cuts(
        &self,
        a: &(String, Option<u16>),
        b: &(String, Option<u16>),
        percent: u8,
        both: bool,
    ) -> Vec<Cut> {
        let addr = |h: &str| self.lab.net.host(h).addr;
        // A port belongs to the side that listens on it: the cut is on what reaches it.
        match (a.1, b.1) {
            (Some(p), _) => vec![Cut {
                from: addr(&b.0),
                to: addr(&a.0),
                percent,
                port: Some(p),
            }],
            (None, Some(p)) => vec![Cut {
                from: addr(&a.0),
                to: addr(&b.0),
                percent,
                port: Some(p),
            }],
            (None, None) => {
                let mut v = vec![Cut {
                    from: addr(&a.0),
                    to: addr(&b.0),
                    percent,
                    port: None,
                }];
                if both {
                    v.push(Cut {
                        from: addr(&b.0),
                        to: addr(&a.0),
                        percent,
                        port: None,
                    });
                }
                v
            }
        }
    }

    fn pids_of(&mut self, proc_name: &str) -> Vec<i32> {
        if let Some(i) = proc_name.strip_prefix("postgres-") {
            return self
                .lab
                .postmaster_pid(i)
                .map(process_tree)
                .unwrap_or_default();
        }
        self.lab
            .daemon_mut(proc_name)
            .and_then(|d| d.pid())
            .into_iter()
            .collect()
    }

    async fn inject_hold_heal(
        &mut self,
        e: &Event,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<String> {
        let hold = Duration::from_millis(e.hold_ms);
        match e.fault {
            Fault::Partition(a, b) | Fault::Loss(a, b, _) => {
                let (Some(pa), Some(pb)) = (self.party(a).await, self.party(b).await) else {
                    return Ok("skipped: a party does not exist now".into());
                };
                if pa.0 == pb.0 {
                    return Ok(format!("skipped: both parties are {}", pa.0));
                }
                let (percent, both) = match e.fault {
                    Fault::Loss(_, _, p) => (p, false),
                    _ => (100, true),
                };
                let cuts = self.cuts(&pa, &pb, percent, both);
                for c in &cuts {
                    self.lab.net.add(c.clone())?;
                }
                tokio::time::sleep(hold).await;
                for c in &cuts {
                    self.lab.net.remove(c)?;
                }
                self.out.say("  healed: cut lifted");
                Ok(format!(
                    "{} ↔ {} ({percent}%{})",
                    show(&pa),
                    show(&pb),
                    if both { ", both ways" } else { ", one way" }
                ))
            }
            Fault::Kill(p) => {
                let Some(name) = self.process(p).await else {
                    return Ok("skipped: no such process now".into());
                };
                let pids = self.pids_of(&name);
                if pids.is_empty() {
                    return Ok(format!("skipped: {name} is not running"));
                }
                signal(Signal::SIGKILL, &pids);
                if let Some(d) = self.lab.daemon_mut(&name) {
                    d.kill();
                }
                tokio::time::sleep(hold).await;
                self.restart(&name, notes).await;
                Ok(format!("SIGKILL {name} ({} process(es))", pids.len()))
            }
            Fault::Freeze(p) => {
                let Some(name) = self.process(p).await else {
                    return Ok("skipped: no such process now".into());
                };
                let pids = self.pids_of(&name);
                if pids.is_empty() {
                    return Ok(format!("skipped: {name} is not running"));
                }
                signal(Signal::SIGSTOP, &pids);
                tokio::time::sleep(hold).await;
                signal(Signal::SIGCONT, &pids);
                self.out.say(&format!("  healed: SIGCONT {name}"));
                if name.starts_with("postgres-") {
                    // A principal frozen long enough was replaced: the pair needs its mirror.
                    let site = self.serving;
                    self.repair(site).await;
                }
                Ok(format!("SIGSTOP {name} ({} process(es))", pids.len()))
            }
            Fault::FencedReturn => {
                let site = self.serving;
                // The event is about a fenced principal coming back: it needs a pair that
                // can fail over (an earlier fault may have left the site without a mirror).
                self.repair(site).await;
                let old = self.principal_of(site).await;
                let Some(mirror) = site.instances().into_iter().find(|i| *i != old) else {
                    return Ok("skipped".into());
                };
                let mut pids = self.pids_of(&format!("postgres-{old}"));
                if let Some(d) = self.lab.daemon_mut(&format!("agent-{old}")) {
                    pids.extend(d.pid());
                    d.kill();
                }
                signal(Signal::SIGKILL, &pids);
                // The mirror takes over (automatic failover), then the old host comes back.
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut promoted = false;
                while Instant::now() < deadline {
                    if self.probe(mirror).in_recovery().await == Some(false) {
                        promoted = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if !promoted {
                    notes.push(format!(
                        "{mirror} was not promoted within 30 s of losing {old}"
                    ));
                }
                tokio::time::sleep(hold).await;
                self.lab.respawn(&format!("agent-{old}"))?;
                self.lab.wait_agent(old, Duration::from_secs(30)).await?;
                let url = self.lab.agent_url(old);
                let started = self
                    .lab
                    .pchat_timeout(&["agent", "start", "--url", &url], Duration::from_secs(60))
                    .await;
                match &started {
                    Ok(_) => notes.push(format!(
                        "the agent of fenced {old} started it again on its old data directory"
                    )),
                    Err(e) => self.out.say(&format!(
                        "  {old}'s agent refused to start it: {}",
                        first_line(&format!("{e:#}"))
                    )),
                }
                // Give a resurrected principal time to show itself to the sampler.
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.repair(site).await;
                Ok(format!(
                    "{old} lost (agent and PostgreSQL), {mirror} {}; {old} restarted: {}",
                    if promoted { "promoted" } else { "NOT promoted" },
                    if started.is_ok() {
                        "started"
                    } else {
                        "refused"
                    }
                ))
            }
            Fault::DiskFull(v) => {
                let (what, dir) = match v {
                    Volume::PrincipalWal => {
                        let site = self.serving;
                        let p = self.principal_of(site).await;
                        (format!("{p}'s data volume"), self.lab.volume(p))
                    }
                    Volume::Share => ("the share".to_owned(), self.lab.share()),
                };
                let ballast = dir.join("chaos-ballast");
                fill(&ballast)?;
                tokio::time::sleep(hold).await;
                std::fs::remove_file(&ballast)
                    .with_context(|| format!("removing {}", ballast.display()))?;
                self.out.say(&format!("  healed: {what} has room again"));
                let site = self.serving;
                self.repair(site).await;
                Ok(format!("{what} full"))
            }
            Fault::Stall(d) => {
                let (what, dir) = match d {
                    Disk::Db(r) => {
                        let Some(i) = self.role(r).await else {
                            return Ok("skipped: no such instance now".into());
                        };
                        (format!("{i}'s data volume"), self.lab.volume(i))
                    }
                    Disk::Share => ("the share".to_owned(), self.lab.share()),
                };
                self.lab.stall(&dir, true)?;
                tokio::time::sleep(hold).await;
                self.lab.stall(&dir, false)?;
                self.out.say(&format!("  healed: {what} thawed"));
                // A principal whose writes stalled long enough was replaced: the pair needs
                // its mirror again.
                let site = self.serving;
                self.repair(site).await;
                Ok(format!("{what} frozen (writes wait, reads go on)"))
            }
            Fault::DiskError(r) => {
                let Some(i) = self.role(r).await else {
                    return Ok("skipped: no such instance now".into());
                };
                let dir = self.lab.volume(i);
                self.lab.fail_disk(&dir)?;
                tokio::time::sleep(hold).await;
                // The operator's repair: nothing may use the filesystem while it is checked.
                let mut pids = self.pids_of(&format!("postgres-{i}"));
                if let Some(d) = self.lab.daemon_mut(&format!("agent-{i}")) {
                    pids.extend(d.pid());
                    d.kill();
                }
                signal(Signal::SIGKILL, &pids);
                let gone = Instant::now() + Duration::from_secs(10);
                while pids.iter().any(|p| alive(*p)) && Instant::now() < gone {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                match self.lab.repair_disk(&dir) {
                    Ok(()) => self.out.say(&format!(
                        "  healed: {i}'s disk checked (e2fsck) and mounted again"
                    )),
                    Err(e) => notes.push(format!("repairing {i}'s disk: {e:#}")),
                }
                // Its agent started again; the pair repaired (`db mirror add` re-seeds it).
                let site = self.serving;
                self.repair(site).await;
                Ok(format!(
                    "{i}'s data volume failed (ext4 error: journal aborted, read-only)"
                ))
            }
            Fault::ClockStep(h, secs) => {
                let Some((host, _)) = self.party(h).await else {
                    return Ok("skipped".into());
                };
                if host.starts_with("etcd") || host == "client" {
                    return Ok(format!("skipped: {host} runs nothing under libfaketime"));
                }
                let file = self.lab.clock_file(&host);
                std::fs::write(&file, format!("{secs:+}s\n"))?;
                if Site::of(&host) == Site::A && !host.starts_with('b') {
                    self.clock_slack = self
                        .clock_slack
                        .max(Duration::from_secs(secs.unsigned_abs().into()));
                }
                tokio::time::sleep(hold).await;
                std::fs::write(&file, "+0\n")?;
                self.out.say(&format!("  healed: {host}'s clock back"));
                Ok(format!("{host}'s wall clock {secs:+} s"))
            }
            Fault::DamageShare(d) => self.damage(d, hold, notes).await,
            Fault::SiteLoss => self.site_loss(notes).await,
            Fault::Delay(a, b, ms) => {
                let (Some(pa), Some(pb)) = (self.party(a).await, self.party(b).await) else {
                    return Ok("skipped: a party does not exist now".into());
                };
                if pa.0 == pb.0 || pa.0 == "client" {
                    return Ok(format!("skipped: {} to {}", pa.0, pb.0));
                }
                let port = match b {
                    Party::Db(_) => 5432,
                    Party::Api(_) => AGENT_PORT,
                    Party::Etcd(_) | Party::EtcdLeader => 2379,
                    Party::Server(_) => 5222,
                    Party::Operator => return Ok("skipped: nothing listens on the operator".into()),
                };
                let to = self.lab.net.host(&pb.0).addr;
                let from = self.lab.net.host(&pa.0).addr;
                let client = self.lab.net.host("client").addr;
                let delay = Duration::from_millis(ms.into());
                let proxy = DelayProxy::start(
                    SocketAddr::new(client.into(), 0),
                    SocketAddr::new(to.into(), port),
                    delay,
                    delay / 2,
                    u64::from(ms) ^ u64::from(u32::from(from)),
                )
                .await?;
                let via = match proxy.addr() {
                    SocketAddr::V4(v) => v,
                    SocketAddr::V6(_) => bail!("the proxy listens on IPv6"),
                };
                let r = Redirect {
                    from,
                    to,
                    port,
                    via,
                };
                self.lab.net.redirect(r.clone())?;
                tokio::time::sleep(hold).await;
                self.lab.net.unredirect(&r)?;
                proxy.stop();
                self.out
                    .say("  healed: redirection lifted, proxied connections aborted");
                Ok(format!(
                    "{} → {}:{port} through the proxy, {ms} ms + up to {} ms",
                    pa.0,
                    pb.0,
                    ms / 2
                ))
            }
            Fault::Netem(a, b, link) => {
                let (Some(pa), Some(pb)) = (self.party(a).await, self.party(b).await) else {
                    return Ok("skipped: a party does not exist now".into());
                };
                if pa.0 == pb.0 || pa.0 == "client" || pb.0 == "client" {
                    return Ok(format!("skipped: {} to {}", pa.0, pb.0));
                }
                let ha = self.lab.net.host(&pa.0).clone();
                let hb = self.lab.net.host(&pb.0).clone();
                let seed = u64::from(link.delay_ms) << 32 ^ u64::from(u32::from(ha.addr));
                let there = Netem::start(&ha.ns, ha.addr, hb.addr, link, seed)?;
                let back = match Netem::start(&hb.ns, hb.addr, ha.addr, link, seed ^ 1) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = there.stop();
                        return Err(e);
                    }
                };
                tokio::time::sleep(hold).await;
                let (c1, c2) = (there.stop(), back.stop());
                let (c1, c2) = (c1?, c2?);
                self.out.say("  healed: link clean again");
                Ok(format!(
                    "{} ↔ {}: {} ms + up to {} ms, {}% lost, each way; packets {} passed ({} out of order), {} lost, {} over the limit, {} held at the end",
                    pa.0,
                    pb.0,
                    link.delay_ms,
                    link.jitter_ms,
                    link.loss_percent,
                    c1.passed + c2.passed,
                    c1.reordered + c2.reordered,
                    c1.lost + c2.lost,
                    c1.overflow + c2.overflow,
                    c1.flushed + c2.flushed,
                ))
            }
        }
    }

    fn probe(&self, instance: &str) -> Probe {
        self.probes
            .iter()
            .find(|p| p.name == instance)
            .cloned()
            .unwrap_or_else(|| panic!("no instance {instance}"))
    }

    /// Starts a killed process again.
    async fn restart(&mut self, name: &str, notes: &mut Vec<String>) {
        if name.starts_with("postgres-") {
            let site = self.serving;
            self.repair(site).await;
            return;
        }
        let log_len = std::fs::metadata(self.lab.root().join("logs").join(format!("{name}.log")))
            .map(|m| m.len())
            .unwrap_or(0);
        if let Err(e) = self.lab.respawn(name) {
            notes.push(format!("restarting {name}: {e:#}"));
            return;
        }
        self.out.say(&format!("  healed: {name} started again"));
        let waited = if let Some(i) = name.strip_prefix("agent-") {
            self.lab.wait_agent(i, Duration::from_secs(30)).await
        } else if let Some(s) = name.strip_prefix("server-") {
            wait_ready_since(&self.lab, s, log_len, Duration::from_secs(60)).await
        } else {
            self.lab.wait_etcd(Duration::from_secs(60)).await
        };
        if let Err(e) = waited {
            notes.push(format!("{name} did not come back: {e:#}"));
        }
    }

    /// The operator's repair after a database fault in `site`: dead agents started, the
    /// principal found, a missing mirror added again (`db mirror add` re-seeds it), the
    /// log-shipping standby started again.
    async fn repair(&mut self, site: Site) {
        for i in lab::INSTANCES {
            let dead_site = self
                .declared
                .as_ref()
                .is_some_and(|d| d.from == Site::of(i));
            if dead_site {
                continue;
            }
            let name = format!("agent-{i}");
            if self.lab.daemon_mut(&name).and_then(|d| d.pid()).is_none()
                && self.lab.respawn(&name).is_ok()
            {
                let _ = self.lab.wait_agent(i, Duration::from_secs(30)).await;
            }
        }
        // Wait for a principal (an automatic failover may be under way).
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut principal = None;
        while Instant::now() < deadline {
            for i in site.instances() {
                if self.probe(i).in_recovery().await == Some(false) {
                    principal = Some(i);
                }
            }
            if principal.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let Some(p) = principal else {
            self.out.say(&format!(
                "  repair: site {} has no writable principal 30 s after the heal",
                site.name()
            ));
            return;
        };
        self.principal.insert(site, p);
        let m = site.instances().into_iter().find(|i| *i != p).unwrap_or(p);
        let mirror_ok =
            self.probe(m).in_recovery().await == Some(true) && self.mirror_streams(site).await;
        if !mirror_ok {
            self.out.say(&format!(
                "  repair: {m} is not a streaming mirror of {p}: db mirror add --site {}",
                site.name()
            ));
            let t = Instant::now();
            // Right after an automatic failover the pool's record may still name the old
            // principal, or the new one still hold the old pair's slot: an operator reads the
            // refusal and tries again, so the harness does, a few times.
            for attempt in 1..=REPAIR_ATTEMPTS {
                match self
                    .lab
                    .pchat_timeout(
                        &[
                            "--in-pool",
                            POOL,
                            "db",
                            "mirror",
                            "add",
                            "--site",
                            site.name(),
                        ],
                        Duration::from_secs(240),
                    )
                    .await
                {
                    Ok(_) => {
                        self.out.say(&format!(
                            "  repair: mirror added in {:.1} s",
                            t.elapsed().as_secs_f64()
                        ));
                        break;
                    }
                    Err(e) => {
                        self.out.say(&format!(
                            "  repair: db mirror add failed (attempt {attempt}): {}",
                            first_line(&format!("{e:#}"))
                        ));
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                }
            }
        }
        if site == Site::A
            && self.declared.is_none()
            && self.probe("b_db").in_recovery().await.is_none()
        {
            let url = self.lab.agent_url("b_db");
            match self
                .lab
                .pchat_timeout(&["agent", "start", "--url", &url], Duration::from_secs(60))
                .await
            {
                Ok(_) => self
                    .out
                    .say("  repair: b_db (log-shipping standby) started again"),
                Err(e) => self.out.say(&format!(
                    "  repair: starting b_db failed: {}",
                    first_line(&format!("{e:#}"))
                )),
            }
        }
    }

    /// Whether `db mirror status` says the site's pair is synchronized.
    async fn mirror_streams(&self, site: Site) -> bool {
        let out = self
            .lab
            .pchat_timeout(
                &[
                    "--json",
                    "--in-pool",
                    POOL,
                    "db",
                    "mirror",
                    "status",
                    "--site",
                    site.name(),
                ],
                Duration::from_secs(20),
            )
            .await;
        out.is_ok_and(|o| {
            o.contains("SYNCHRONIZED") || o.contains("Synchronized") || o.contains("synchronized")
        })
    }

    async fn heal_everything(&mut self) {
        if let Err(e) = self.lab.net.heal_all() {
            self.out.say(&format!("  heal: {e:#}"));
        }
        self.lab.thaw_all();
        for (h, _) in lab::HOSTS {
            let _ = std::fs::write(self.lab.clock_file(h), "+0\n");
        }
        let mut pids = Vec::new();
        for i in lab::INSTANCES {
            if let Some(pm) = self.lab.postmaster_pid(i) {
                pids.extend(process_tree(pm));
            }
        }
        signal(Signal::SIGCONT, &pids);
        for name in daemon_names() {
            if let Some(p) = self.lab.daemon_mut(&name).and_then(|d| d.pid()) {
                signal(Signal::SIGCONT, &[p]);
            }
        }
        for v in [self.lab.share()]
            .into_iter()
            .chain(lab::INSTANCES.iter().map(|i| self.lab.volume(i)))
        {
            let _ = std::fs::remove_file(v.join("chaos-ballast"));
        }
        // Whatever a failed event left dead (the lost site stays dead).
        let mut notes = Vec::new();
        for name in daemon_names() {
            let dead_site = self.declared.as_ref().is_some_and(|d| {
                let host = name.split_once('-').map_or(name.as_str(), |(_, h)| h);
                !host.starts_with("etcd") && Site::of(host) == d.from
            });
            if dead_site || name.starts_with("agent-") {
                continue;
            }
            if self.lab.daemon_mut(&name).and_then(|d| d.pid()).is_none() {
                self.restart(&name, &mut notes).await;
            }
        }
        for n in notes {
            self.out.say(&format!("  heal: {n}"));
        }
    }

    /// Damages the next segment shipped to the share, then checks that the copy job alerts
    /// naming it; healed by putting the segment back as it was.
    async fn damage(
        &mut self,
        d: Damage,
        hold: Duration,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<String> {
        if self.serving != Site::A || self.declared.is_some() {
            return Ok("skipped: no log shipping after a DR failover".into());
        }
        let share = self.lab.share();
        let before = segments(&share);
        let deadline = Instant::now() + Duration::from_secs(20);
        let newest = loop {
            let now = segments(&share);
            if let Some(n) = now.iter().rev().find(|s| !before.contains(s)) {
                break n.clone();
            }
            if Instant::now() > deadline {
                return Ok("skipped: no new segment reached the share in 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let name = newest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let copied_before = self.lab.copy_dir().join(&name).exists();
        let original = std::fs::read(&newest)?;
        let sidecar = newest.with_file_name(format!("{name}.sha256"));
        let original_sidecar = std::fs::read(&sidecar).ok();
        match d {
            Damage::Corrupt => {
                let mut bytes = original.clone();
                let mid = bytes.len() / 2;
                for b in bytes.iter_mut().skip(mid).take(64) {
                    *b ^= 0x5a;
                }
                std::fs::write(&newest, bytes)?;
            }
            Damage::Truncate => {
                std::fs::write(&newest, &original[..original.len() / 2])?;
            }
            Damage::Remove => {
                std::fs::remove_file(&newest)?;
                let _ = std::fs::remove_file(&sidecar);
            }
            Damage::Reorder => {
                let prev = segments(&share).into_iter().rfind(|s| *s < newest);
                match prev {
                    Some(p) => std::fs::write(&newest, std::fs::read(p)?)?,
                    None => return Ok("skipped: no earlier segment to swap with".into()),
                }
            }
        }
        // A hole shows only once the next segment arrives: hold long enough for that.
        let hold = hold.max(Duration::from_secs(lab::BACKUP_INTERVAL_S * 2 + 4));
        let until = Instant::now() + hold;
        let mut alerted = false;
        while Instant::now() < until {
            if let Ok(s) = self
                .lab
                .pchat_timeout(
                    &["--json", "--in-pool", POOL, "db", "log-shipping", "status"],
                    Duration::from_secs(20),
                )
                .await
            {
                if s.contains(&name) {
                    alerted = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
        std::fs::write(&newest, &original)?;
        if let Some(s) = original_sidecar {
            std::fs::write(&sidecar, s)?;
        }
        self.out
            .say(&format!("  healed: {name} restored on the share"));
        if !copied_before && !alerted {
            notes.push(format!(
                "{ALERT_MISSING}: log-shipping status never named the damaged segment {name}"
            ));
        }
        Ok(format!(
            "{d:?} {name} (copied before the damage: {copied_before}; alert naming it: {alerted})"
        ))
    }

    /// The serving site lost whole, then `pchat pool failover`.
    async fn site_loss(&mut self, notes: &mut Vec<String>) -> anyhow::Result<String> {
        if self.serving != Site::A {
            return Ok("skipped: already failed over".into());
        }
        let site = Site::A;
        let mut pids = Vec::new();
        for i in site.instances() {
            if let Some(d) = self.lab.daemon_mut(&format!("agent-{i}")) {
                d.kill();
            }
            if let Some(pm) = self.lab.postmaster_pid(i) {
                pids.extend(process_tree(pm));
            }
        }
        signal(Signal::SIGCONT, &pids);
        signal(Signal::SIGKILL, &pids);
        for s in site.servers() {
            if let Some(d) = self.lab.daemon_mut(&format!("server-{s}")) {
                d.kill();
            }
        }
        self.out
            .say("  site A lost (agents, PostgreSQL, servers killed); pool failover");
        let started = Instant::now();
        let out = self
            .lab
            .pchat_timeout(
                &["--json", "pool", "failover", POOL],
                Duration::from_secs(240),
            )
            .await;
        let fenced = Instant::now();
        let report: serde_json::Value = match out {
            Ok(o) => serde_json::from_str(&o).unwrap_or_default(),
            Err(e) => {
                let why = format!("{e:#}");
                let reason = why
                    .lines()
                    .find(|l| l.starts_with("pchat: "))
                    .unwrap_or_else(|| why.lines().next().unwrap_or(""))
                    .to_owned();
                self.failed_procedures.push(Violation {
                    invariant: "procedure",
                    what: format!("pool failover after the loss of site A failed: {reason}"),
                });
                self.dead = true;
                return Ok(format!("pool failover FAILED: {reason}"));
            }
        };
        let last_commit = self
            .etcd_get(&format!("/pchat/pools/{POOL}/procedures/failover"))
            .await
            .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
            .and_then(|v| v["backup_last_commit_us"].as_i64())
            .and_then(|us| u64::try_from(us).ok())
            .map(|us| SystemTime::UNIX_EPOCH + Duration::from_micros(us));
        if last_commit.is_none() {
            notes.push("the failover record has no backup_last_commit_us: the window's start is unknown, every loss before the fence is accepted".into());
        }
        let declared = Declared {
            started,
            fenced,
            from: site,
            backup_last_commit: last_commit,
            at_least: report["lost_messages_at_least"].as_u64().unwrap_or(0),
            at_most: report["lost_messages_at_most"].as_u64(),
            clock_slack: self.clock_slack,
        };
        let text = format!(
            "failover in {:.1} s: at least {} lost, at most {}, window {:.1} s",
            fenced.duration_since(started).as_secs_f64(),
            declared.at_least,
            declared
                .at_most
                .map_or("not given".to_owned(), |m| m.to_string()),
            report["lost_window_s"].as_f64().unwrap_or(0.0)
        );
        self.declared = Some(declared);
        self.serving = Site::B;
        self.principal.insert(Site::B, "b_db");
        Ok(text)
    }

    /// An etcd key's value, read as the operator (login, then range).
    async fn etcd_get(&self, key: &str) -> Option<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let pki = self
            .lab
            .root()
            .join("pki")
            .join("operators")
            .join(lab::OPERATOR);
        let password = std::fs::read_to_string(pki.join("etcd.password")).ok()?;
        let url = self.lab.etcd_urls().into_iter().nth(1)?;
        let login = serde_json::json!({"name": format!("operator-{}", lab::OPERATOR), "password": password.trim()});
        let auth = self
            .lab
            .curl(
                &format!("{url}/v3/auth/authenticate"),
                Some(&login.to_string()),
            )
            .await
            .ok()?;
        let token = serde_json::from_str::<serde_json::Value>(&auth).ok()?["token"]
            .as_str()?
            .to_owned();
        let body = serde_json::json!({"key": b64.encode(key)});
        let op = pki;
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "3", "--cacert"])
            .arg(self.lab.root().join("pki").join("ca.crt"))
            .arg("--cert")
            .arg(op.join("cert.pem"))
            .arg("--key")
            .arg(op.join("key.pem"))
            .args([
                "-H",
                &format!("Authorization: {token}"),
                "-X",
                "POST",
                "-d",
                &body.to_string(),
            ])
            .arg(format!("{url}/v3/kv/range"))
            .output()
            .await
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let value = v["kvs"][0]["value"].as_str()?;
        String::from_utf8(b64.decode(value).ok()?).ok()
    }
}

fn show(p: &(String, Option<u16>)) -> String {
    match p.1 {
        Some(port) => format!("{}:{port}", p.0),
        None => p.0.clone(),
    }
}

fn first_line(s: &str) -> String {
    s.lines().take(3).collect::<Vec<_>>().join(" / ")
}

fn daemon_names() -> Vec<String> {
    (1..=3)
        .map(|k| format!("etcd{k}"))
        .chain(lab::INSTANCES.iter().map(|i| format!("agent-{i}")))
        .chain(lab::SERVERS.iter().map(|s| format!("server-{s}")))
        .collect()
}

/// Shipped WAL segments on the share, in name order (24 hex digits, no sidecars).
fn segments(share: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(ids) = std::fs::read_dir(share.join("wal")) else {
        return out;
    };
    for id in ids.flatten() {
        if let Ok(files) = std::fs::read_dir(id.path()) {
            for f in files.flatten() {
                let n = f.file_name().to_string_lossy().into_owned();
                if n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit()) {
                    out.push(f.path());
                }
            }
        }
    }
    out.sort_by_key(|p| p.file_name().map(|n| n.to_owned()));
    out
}

/// Fills the filesystem of `path` to its last block with one file.
fn fill(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().ok_or_else(|| anyhow!("no parent"))?;
    let st = nix::sys::statvfs::statvfs(dir)?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    let out = std::process::Command::new("fallocate")
        .args(["-l", &free.to_string()])
        .arg(path)
        .output()?;
    if !out.status.success() {
        // fallocate may refuse the very last blocks: take what it can, then fill with writes.
        let _ = std::process::Command::new("dd")
            .args([
                "if=/dev/zero",
                "bs=1M",
                "status=none",
                "oflag=append",
                "conv=notrunc",
            ])
            .arg(format!("of={}", path.display()))
            .output();
    }
    Ok(())
}

async fn wait_ready_since(
    lab: &Lab,
    s: &str,
    offset: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let log = lab.root().join("logs").join(format!("server-{s}.log"));
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read(&log).unwrap_or_default();
        let start = (offset as usize).min(text.len());
        if String::from_utf8_lossy(&text[start..])
            .lines()
            .any(|l| l.starts_with("ready"))
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("server {s} not ready within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A writer's room, its acknowledgments one a line (`  12.345s id 17 a1 (2 attempts)`, the
/// time on the run's clock) and then its notes.
fn writer_timeline(ledger: &Ledger, t0: Instant, name: &dyn Fn(SocketAddr) -> String) -> String {
    let mut out = format!("room {}\n", ledger.config().room);
    for (entry, ack) in ledger.acked() {
        out.push_str(&format!(
            "{:>9.3}s id {} {} ({} attempt{}, first sent at {:.3}s)\n",
            ack.at.saturating_duration_since(t0).as_secs_f64(),
            ack.id,
            name(ack.server),
            entry.attempts,
            if entry.attempts == 1 { "" } else { "s" },
            entry.first_sent.saturating_duration_since(t0).as_secs_f64(),
        ));
    }
    out.push_str("notes (times from the writer's first message):\n");
    out.push_str(&ledger.events_text());
    out
}

/// The longest time without an acknowledgment inside `[from, to]`: each gap between two
/// acknowledgments (and after the last one) clipped to the window, so an outage that goes on
/// into the next event is counted in each event for its own part.
fn longest_gap(ledger: &Ledger, from: Instant, to: Instant) -> Duration {
    let acks: Vec<Instant> = ledger.acked().map(|(_, a)| a.at).collect();
    let mut best = Duration::ZERO;
    let mut prev: Option<Instant> = None;
    for a in acks.into_iter().chain(std::iter::once(to)) {
        if let Some(p) = prev {
            let (start, end) = (p.max(from), a.min(to));
            if end > start {
                best = best.max(end.duration_since(start));
            }
        }
        prev = Some(a);
    }
    best
}
