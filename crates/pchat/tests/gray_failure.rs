//! Gray-failure drills on the two-site lab (`common::twosite`): the principal of a
//! SYNCHRONIZED pair does not die, it hangs. Its PostgreSQL is frozen with SIGSTOP (the
//! postmaster and every backend), as a frozen VM, a storage stall or a network black hole
//! leaves it: connections stay open and nothing answers. A client ledger keeps writing
//! throughout, and everything is checked from its side: the writer is acknowledged again
//! within 10 s of the freeze, nothing acknowledged is lost (RPO 0), stored twice or out of
//! order, and the old principal, once resumed, acknowledges nothing.
//!
//! Figures are printed: run with `--nocapture`. `PCHAT_HANG_RUNS` (default 2) sets how many
//! freezes the first drill makes, alternating the two instances of site A. Each drill is
//! bounded in time (`DRILL_TIMEOUT` a freeze), so `cargo test` never waits on a hang.

mod common;

use std::time::{Duration, Instant};

use common::twosite::{CommitProbe, Ledger, Site, TwoSite, POOL};

const ROOM: &str = "hang@conference.localhost";

/// The target: the writer is acknowledged again this soon after the freeze.
const RECOVERY_TARGET: Duration = Duration::from_secs(10);

/// Bound on one drill, lab start-up included (a run takes ~40 s on a loaded 2-core box):
/// a drill that hangs fails, and its lab is torn down, thawing what it froze.
const DRILL_TIMEOUT: Duration = Duration::from_secs(120);

/// `drill` within `DRILL_TIMEOUT` per freeze (one more for the lab).
async fn bounded(
    freezes: u32,
    drill: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let limit = DRILL_TIMEOUT * (freezes + 1);
    tokio::time::timeout(limit, drill)
        .await
        .map_err(|_| anyhow::anyhow!("the drill did not end within {limit:?}"))?
}

/// One two-site lab at a time (see `dr_drill.rs`).
fn one_lab_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LAB.lock().unwrap_or_else(|p| p.into_inner())
}

/// `pchat db mirror status --site A --json`, and how long it took.
async fn mirror_status(lab: &TwoSite) -> anyhow::Result<(serde_json::Value, Duration)> {
    let t = Instant::now();
    let out = lab
        .pchat_timeout(
            &[
                "--json",
                "--in-pool",
                POOL,
                "db",
                "mirror",
                "status",
                "--site",
                "A",
            ],
            Duration::from_secs(60),
        )
        .await?;
    Ok((serde_json::from_str(&out)?, t.elapsed()))
}

/// Waits until site A is SYNCHRONIZED with `principal` as its principal, then long enough
/// for the principal to hold the leader lease and the mirror's agent to have seen it held
/// (an automatic failover needs both).
async fn wait_synchronized(lab: &TwoSite, principal: &str) -> anyhow::Result<()> {
    let address = lab.instance(principal).address();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, _) = mirror_status(lab).await?;
        if s["state"] == "SYNCHRONIZED" && s["principal"]["address"] == address.as_str() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "site A is not SYNCHRONIZED with {principal} as principal: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(())
}

/// After the old principal was resumed: for `watch`, it never acknowledges a commit, and
/// it has stopped (fenced) by the end. Returns how long it took to stop.
async fn check_fenced(lab: &TwoSite, name: &str, watch: Duration) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut stopped = None;
    while t.elapsed() < watch {
        let probe = lab.try_commit(name, Duration::from_secs(2)).await;
        anyhow::ensure!(
            probe != CommitProbe::Committed,
            "I5: the old principal {name} acknowledged a commit {:?} after it was resumed",
            t.elapsed()
        );
        if lab.instance(name).postmaster_pid().is_none() {
            stopped.get_or_insert(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stopped.ok_or_else(|| {
        anyhow::anyhow!("the old principal {name} still runs {watch:?} after it was resumed")
    })
}

/// The first acknowledgment after a freeze at `t0`. Nothing can commit on a frozen server;
/// acknowledgments of commits made just before the freeze arrive within milliseconds, so
/// the first one more than 250 ms later is the first made after the recovery.
fn recovery(ledger: &Ledger, t0: Instant) -> Option<Duration> {
    ledger
        .first_ack_after(t0 + Duration::from_millis(250))
        .map(|a| a.at.duration_since(t0))
}

fn spread(mut v: Vec<Duration>) -> String {
    v.sort();
    match (v.first(), v.get(v.len() / 2), v.last()) {
        (Some(min), Some(median), Some(max)) => format!(
            "min {:.2} s, median {:.2} s, max {:.2} s over {} run(s)",
            min.as_secs_f64(),
            median.as_secs_f64(),
            max.as_secs_f64(),
            v.len()
        ),
        _ => "no runs".into(),
    }
}

/// The drill: the principal's PostgreSQL frozen, its agent alive, automatic
/// failover on. Each run freezes the current principal, checks the agents still answer,
/// waits for the writer, resumes the old principal and checks it is fenced, then re-seeds
/// it as the mirror for the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // one lab at a time, on purpose
async fn a_frozen_principal_is_replaced_and_the_writer_goes_on() -> anyhow::Result<()> {
    let _one_lab = one_lab_at_a_time();
    let runs: u32 = std::env::var("PCHAT_HANG_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .clamp(1, 20);
    bounded(runs, frozen_principal_drill(runs)).await
}

async fn frozen_principal_drill(runs: u32) -> anyhow::Result<()> {
    let lab = TwoSite::start().await?;
    let mut cfg = lab.ledger_config("alice", ROOM, "h");
    cfg.servers = lab.site_server_addrs(Site::A);
    cfg.stall_timeout = Duration::from_secs(90);
    let mut writer = Ledger::new(cfg).spawn();
    writer.wait_acked(20, Duration::from_secs(60)).await?;

    let (mut principal, mut mirror) = ("a_db", "a_mirror");
    let mut freezes = Vec::new();
    let mut status_times = Vec::new();
    for run in 1..=runs {
        wait_synchronized(&lab, principal).await?;
        writer.wait_more(5, Duration::from_secs(30)).await?;
        let frozen = lab.freeze_postgres(principal)?;
        let t0 = Instant::now();
        eprintln!(
            "run {run}: {principal}'s PostgreSQL frozen ({} processes)",
            frozen.len()
        );
        // The agents answer whatever their PostgreSQL does.
        let (_, took) = mirror_status(&lab).await?;
        status_times.push(took);
        let outcome = writer.wait_more(10, Duration::from_secs(60)).await;
        let waited = t0.elapsed();
        if outcome.is_err() {
            lab.thaw(&frozen);
        }
        outcome.map_err(|e| {
            anyhow::anyhow!(
                "run {run}: the writer was not acknowledged again {waited:?} after the freeze: {e}"
            )
        })?;
        let (s, _) = mirror_status(&lab).await?;
        assert_eq!(
            s["principal"]["address"],
            lab.instance(mirror).address().as_str(),
            "run {run}: {mirror} is the principal now: {s}"
        );
        // The old principal comes back to life: it must acknowledge nothing.
        lab.thaw(&frozen);
        let stopped = check_fenced(&lab, principal, Duration::from_secs(8)).await?;
        eprintln!(
            "run {run}: `db mirror status` took {took:?} during the freeze; the resumed {principal} stopped after {stopped:?}"
        );
        writer.wait_more(10, Duration::from_secs(30)).await?;
        freezes.push(t0);
        lab.pchat(&["--in-pool", POOL, "db", "mirror", "add", "--site", "A"])
            .await?;
        std::mem::swap(&mut principal, &mut mirror);
    }

    writer.wait_more(10, Duration::from_secs(30)).await?;
    let ledger = writer.stop().await?;
    let archive = lab.read_archive("alice", ROOM).await?;
    let summary = ledger.check_no_loss(&archive)?;
    let recoveries: Vec<Duration> = freezes
        .iter()
        .map(|t0| recovery(&ledger, *t0))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| anyhow::anyhow!("a freeze without a later acknowledgment"))?;
    eprintln!(
        "ledger: {summary:?}\nfreeze to the next acknowledgment: {}\n`db mirror status` during a freeze: {}\nevents:\n{}",
        spread(recoveries.clone()),
        spread(status_times.clone()),
        ledger.events_text()
    );
    for (i, r) in recoveries.iter().enumerate() {
        assert!(
            *r <= RECOVERY_TARGET,
            "run {}: the writer waited {r:?} after the freeze (target {RECOVERY_TARGET:?})",
            i + 1
        );
    }
    for t in &status_times {
        assert!(
            *t <= Duration::from_secs(3),
            "`db mirror status` took {t:?} while a principal was frozen"
        );
    }
    Ok(())
}

/// The principal's whole host hangs (its PostgreSQL and its agent frozen) and the mirror
/// does not fail over by itself (`auto_failover = false`): the operator's
/// `db mirror failover` goes through without the old principal's agent, fences it through
/// etcd, says what it could not reach, and the writer is acknowledged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // one lab at a time, on purpose
async fn manual_failover_away_from_a_hung_principal_host() -> anyhow::Result<()> {
    let _one_lab = one_lab_at_a_time();
    bounded(1, manual_failover_drill()).await
}

async fn manual_failover_drill() -> anyhow::Result<()> {
    let mut lab = TwoSite::start().await?;
    lab.configure_agent("a_mirror", "auto_failover = false\n")
        .await?;
    wait_synchronized(&lab, "a_db").await?;
    let mut cfg = lab.ledger_config("alice", ROOM, "m");
    cfg.servers = lab.site_server_addrs(Site::A);
    cfg.stall_timeout = Duration::from_secs(90);
    let mut writer = Ledger::new(cfg).spawn();
    writer.wait_acked(20, Duration::from_secs(60)).await?;

    let mut frozen = lab.freeze_postgres("a_db")?;
    frozen.extend(lab.freeze_agent("a_db")?);
    let t0 = Instant::now();
    // Past the leader lease: nothing fails over by itself.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let started = Instant::now();
    let out = lab
        .pchat_timeout(
            &[
                "--json",
                "--in-pool",
                POOL,
                "db",
                "mirror",
                "failover",
                "--site",
                "A",
            ],
            Duration::from_secs(60),
        )
        .await;
    let took = started.elapsed();
    let report: serde_json::Value = match out {
        Ok(text) => serde_json::from_str(&text)?,
        Err(e) => {
            lab.thaw(&frozen);
            return Err(e.context(format!(
                "`db mirror failover` against the hung principal host, after {took:?}"
            )));
        }
    };
    eprintln!("`db mirror failover` took {took:?}: {report}");
    assert_eq!(report["new_principal"], "a_mirror", "{report}");
    assert_eq!(report["planned"], false, "{report}");
    assert_eq!(report["possible_loss_bytes"], 0, "{report}");
    let unreachable = report["unreachable"].to_string();
    assert!(
        unreachable.contains(&lab.instance("a_db").agent_url()),
        "the report names the agent it could not reach: {report}"
    );
    assert!(
        took <= Duration::from_secs(10),
        "the failover waited {took:?} for the hung principal"
    );
    writer.wait_more(10, Duration::from_secs(60)).await?;

    lab.thaw(&frozen);
    let stopped = check_fenced(&lab, "a_db", Duration::from_secs(8)).await?;
    writer.wait_more(10, Duration::from_secs(30)).await?;
    let ledger = writer.stop().await?;
    let archive = lab.read_archive("alice", ROOM).await?;
    let summary = ledger.check_no_loss(&archive)?;
    let r = recovery(&ledger, t0)
        .ok_or_else(|| anyhow::anyhow!("no acknowledgment after the freeze"))?;
    eprintln!(
        "ledger: {summary:?}\nhost frozen to the next acknowledgment: {r:?} (failover started 4 s after the freeze and took {took:?}); the resumed a_db stopped after {stopped:?}\nevents:\n{}",
        ledger.events_text()
    );
    Ok(())
}
