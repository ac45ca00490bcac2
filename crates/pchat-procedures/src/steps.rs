//! The step runner the multi-step procedures run on (today `pool failback`, offline and
//! `--online`): a procedure is a short list of steps, each with a name, a precondition, a
//! postcondition (`done`) and `run`; the runner does the rest the same way for all of them.
//!
//! - **Preconditions first.** Every step not yet done has its precondition checked before
//!   the first step runs (and by `--dry-run`, which reports each failing one by step): a run
//!   that is bound to fail at step 5 refuses before step 1, so it never stops service for
//!   nothing. A precondition is what must hold *now* for its step to succeed once the steps
//!   before it are done; it is written so that those steps cannot make it true.
//! - **Postconditions.** A step whose `done` holds is skipped (a run killed after a step did
//!   its work but before it was recorded does not do it twice), and after `run` the runner
//!   checks that `done` holds. A step whose outcome cannot be observed cheaply says so
//!   ([`StepDef::observable`]); only the record says it is done, and running it twice is
//!   harmless by construction.
//! - **Record.** Each finished step, its time, and the start of the no-service window are
//!   written to the procedure's record in etcd ([`RunRecord`]) as soon as they happen: a
//!   re-run resumes at the first unfinished step, and the time without service counts from
//!   the first step that stopped service, across resumes (wall-clock time, since the
//!   resumed run is another process).
//! - **Report.** Every step is reported with its state and time ([`Step`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The bounds of the procedures' waits, in one place (the shell's flags set some).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How often a wait asks an agent or etcd again.
    pub poll_interval_ms: u64,
    /// How long a failback waits for the servers to let go of the database after the
    /// active servers were cleared (`--drain-wait-s`).
    pub drain_timeout_ms: u64,
    /// How long a failback waits for a backup an earlier, interrupted run left running.
    pub earlier_backup_timeout_ms: u64,
    /// How long an online failback waits for the primary to catch up with the backup.
    pub catch_up_timeout_ms: u64,
    /// Caught up: streaming, at most this far behind.
    pub catch_up_lag_bytes_max: u64,
    /// How long an online failback's switchover waits for the backup's last WAL to reach
    /// the primary (then the backup is started again and serves as before).
    pub last_wal_timeout_ms: u64,
    /// How long a DR failover waits for the backup to apply every copied segment.
    pub replay_timeout_ms: u64,
    /// Applied: no segment pending and the replay position still for this long (two of
    /// PostgreSQL's retries of the next segment, `wal_retrieve_retry_interval` = 1 s).
    pub replay_quiet_ms: u64,
    /// How long a DR failover waits for a primary database that still runs (a partition,
    /// not a loss) to stop.
    pub primary_stop_timeout_ms: u64,
    /// How long `log-shipping configure` waits for the secondary to replay its first
    /// shipped WAL after the seed.
    pub first_replay_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            poll_interval_ms: 200,
            drain_timeout_ms: 120_000,
            earlier_backup_timeout_ms: 3_600_000,
            catch_up_timeout_ms: 600_000,
            catch_up_lag_bytes_max: 1024 * 1024,
            last_wal_timeout_ms: 30_000,
            replay_timeout_ms: 120_000,
            replay_quiet_ms: 2_500,
            primary_stop_timeout_ms: 10_000,
            first_replay_timeout_ms: 120_000,
        }
    }
}

impl Limits {
    /// [`Limits::poll_interval_ms`] as a duration.
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

/// What a step does to the pool's service: the runner measures the time without service
/// from the first `Stops` step to the `Resumes` step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Service {
    /// Service is as before the step.
    Keeps,
    /// No service from this step on.
    Stops,
    /// Service resumes when this step is done.
    Resumes,
}

/// A step as a plan lists it.
#[derive(Clone, Debug)]
pub struct StepDef {
    /// Short and stable (kept in the record): `drain`, `restore`, …
    pub name: &'static str,
    /// What it does, in words.
    pub what: String,
    /// The command that does this step alone.
    pub command: String,
    /// Its effect on service.
    pub service: Service,
    /// Whether `done` observes the step's outcome (checked after `run`); otherwise only the
    /// record says the step is done.
    pub observable: bool,
}

/// One step of a procedure, for `--dry-run` and reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// 1-based.
    pub number: u8,
    /// The step's name (see [`StepDef::name`]).
    #[serde(default)]
    pub name: String,
    /// What it does.
    pub what: String,
    /// The command that does this step alone.
    pub command: String,
    /// Whether its postcondition already holds (for a plan) or it was done (for a report).
    pub done: bool,
    /// How long it took (in the run that did it; 0 when it was found done).
    #[serde(default)]
    pub ms: u64,
    /// Its precondition, when it does not hold: why the step would fail (a run refuses
    /// before its first step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
    /// What its precondition check found worth saying (e.g. "nothing to salvage").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The runner's part of a procedure's record in etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The names of the steps done, in the order they were done.
    #[serde(default)]
    pub done_steps: Vec<String>,
    /// How long each step took in the run that did it (ms).
    #[serde(default)]
    pub step_ms: BTreeMap<String, u64>,
    /// When the first step that stopped service started (ms since the Unix epoch); cleared
    /// when service resumes.
    #[serde(default)]
    pub no_service_since_unix_ms: Option<u64>,
    /// The time without service, once it resumed (ms).
    #[serde(default)]
    pub no_service_ms: Option<u64>,
}

/// What a precondition check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The step can run.
    Holds,
    /// The step can run; this is worth telling the operator.
    Note(String),
    /// The step would fail: why, and what to do.
    Fails(String),
}

/// A step whose precondition does not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// 1-based.
    pub number: u8,
    /// The step's name.
    pub step: String,
    /// Why (and what to do).
    pub reason: String,
}

/// Why the runner stopped a procedure before or after a step (the steps' own errors are
/// the procedure's).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Preconditions that do not hold: nothing ran.
    #[error("{}", refusal(.blocked, *.service_stopped))]
    Preconditions {
        /// Each failing precondition.
        blocked: Vec<Blocked>,
        /// Whether an earlier, interrupted run had already stopped service (this one
        /// changed nothing either way).
        service_stopped: bool,
    },
    /// A step ran and its postcondition does not hold.
    #[error(
        "step {number} ({step}) ran but its outcome does not hold: {detail}; run the command again"
    )]
    Postcondition {
        /// 1-based.
        number: u8,
        /// The step's name.
        step: String,
        /// What was seen.
        detail: String,
    },
}

fn refusal(blocked: &[Blocked], service_stopped: bool) -> String {
    let mut s = String::from("refusing to start: ");
    for (i, b) in blocked.iter().enumerate() {
        if i > 0 {
            s.push_str("; ");
        }
        s.push_str(&format!(
            "step {} ({}) would fail: {}",
            b.number, b.step, b.reason
        ));
    }
    s.push_str(if service_stopped {
        ". This run changed nothing; the pool is still without service since the interrupted run stopped it: fix the above and run the command again"
    } else {
        ". Nothing was changed and the pool keeps serving"
    });
    s
}

/// A procedure as the runner sees it. `step` is an index into [`Procedure::plan`].
pub(crate) trait Procedure {
    /// The procedure's error (the runner's own are converted into it).
    type Error: From<RunError>;
    /// The steps, in order.
    fn plan(&self) -> &[StepDef];
    /// The record the runner keeps its progress in.
    fn record(&mut self) -> &mut RunRecord;
    /// Writes the record (to etcd).
    async fn save(&mut self) -> Result<(), Self::Error>;
    /// Whether the step can succeed once the steps before it are done.
    async fn precondition(&mut self, step: usize) -> Result<Check, Self::Error>;
    /// Whether the step's outcome holds (only asked of observable steps).
    async fn done(&mut self, step: usize) -> Result<bool, Self::Error>;
    /// Does the step.
    async fn run(
        &mut self,
        step: usize,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), Self::Error>;
}

/// The steps and what the runner found or did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Every step, in order.
    pub steps: Vec<Step>,
    /// The time without service this procedure caused (across resumes), once it resumed.
    pub no_service_ms: Option<u64>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn report_steps<P: Procedure>(p: &mut P) -> Vec<Step> {
    let done: Vec<String> = p.record().done_steps.clone();
    let ms = p.record().step_ms.clone();
    p.plan()
        .iter()
        .enumerate()
        .map(|(i, d)| Step {
            number: i as u8 + 1,
            name: d.name.to_owned(),
            what: d.what.clone(),
            command: d.command.clone(),
            done: done.iter().any(|n| n == d.name),
            ms: ms.get(d.name).copied().unwrap_or(0),
            blocked: None,
            note: None,
        })
        .collect()
}

/// The plan with what is done and every precondition of the steps still to do: what
/// `--dry-run` reports, and what [`run`] checks before its first step.
pub(crate) async fn plan<P: Procedure>(p: &mut P) -> Result<Outcome, P::Error> {
    let mut steps = report_steps(p);
    for (i, s) in steps.iter_mut().enumerate() {
        if s.done {
            continue;
        }
        match p.precondition(i).await? {
            Check::Holds => {}
            Check::Note(n) => s.note = Some(n),
            Check::Fails(r) => s.blocked = Some(r),
        }
    }
    let no_service_ms = p.record().no_service_ms;
    Ok(Outcome {
        steps,
        no_service_ms,
    })
}

/// Runs the steps not yet done, in order (see the module docs).
pub(crate) async fn run<P: Procedure>(
    p: &mut P,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Outcome, P::Error> {
    let Outcome { mut steps, .. } = plan(p).await?;
    let blocked: Vec<Blocked> = steps
        .iter()
        .filter_map(|s| {
            s.blocked.as_ref().map(|r| Blocked {
                number: s.number,
                step: s.name.clone(),
                reason: r.clone(),
            })
        })
        .collect();
    if !blocked.is_empty() {
        let service_stopped = p.record().no_service_since_unix_ms.is_some();
        return Err(RunError::Preconditions {
            blocked,
            service_stopped,
        }
        .into());
    }
    for s in &steps {
        if let Some(n) = &s.note {
            progress(&format!("step {} ({}): {n}", s.number, s.name));
        }
    }
    let total = steps.len();
    for (i, step) in steps.iter_mut().enumerate() {
        if step.done {
            continue;
        }
        let def = p.plan()[i].clone();
        let number = step.number;
        if def.service == Service::Stops && p.record().no_service_since_unix_ms.is_none() {
            // Saved before the step starts: if this run dies inside it, the resumed run
            // still counts the time without service from here.
            p.record().no_service_since_unix_ms = Some(now_unix_ms());
            p.record().no_service_ms = None;
            p.save().await?;
        }
        let started = Instant::now();
        let found_done = def.observable && p.done(i).await?;
        if found_done {
            progress(&format!(
                "step {number}/{total} ({}): {} — already done",
                def.name, def.what
            ));
        } else {
            progress(&format!(
                "step {number}/{total} ({}): {}",
                def.name, def.what
            ));
            p.run(i, progress).await?;
            if def.observable && !p.done(i).await? {
                return Err(RunError::Postcondition {
                    number,
                    step: def.name.to_owned(),
                    detail: def.what.clone(),
                }
                .into());
            }
        }
        let ms = if found_done {
            0
        } else {
            started.elapsed().as_millis() as u64
        };
        let rec = p.record();
        if def.service == Service::Resumes {
            if let Some(since) = rec.no_service_since_unix_ms.take() {
                rec.no_service_ms = Some(now_unix_ms().saturating_sub(since));
            }
        }
        if !rec.done_steps.iter().any(|n| n == def.name) {
            rec.done_steps.push(def.name.to_owned());
        }
        rec.step_ms.insert(def.name.to_owned(), ms);
        p.save().await?;
        step.done = true;
        step.ms = ms;
        if !found_done {
            progress(&format!(
                "step {number}/{total} ({}) — done in {:.1} s",
                def.name,
                ms as f64 / 1000.0
            ));
        }
    }
    let no_service_ms = p.record().no_service_ms;
    Ok(Outcome {
        steps,
        no_service_ms,
    })
}

/// Polls `check` every `poll` until it returns `Some` or `timeout` passes (then `None`).
pub(crate) async fn poll_until<T, E, F, Fut>(
    timeout: Duration,
    poll: Duration,
    mut check: F,
) -> Result<Option<T>, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, E>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A procedure of three steps over plain state: step 2 stops service, step 3 resumes
    /// it; `fail_at` makes a step's run fail (an interruption), `blocked` a precondition.
    struct Toy {
        plan: Vec<StepDef>,
        rec: RunRecord,
        saved: Vec<RunRecord>,
        state: [bool; 3],
        ran: Vec<usize>,
        fail_at: Option<usize>,
        blocked: Option<usize>,
    }

    #[derive(Debug, thiserror::Error)]
    enum ToyError {
        #[error(transparent)]
        Run(#[from] RunError),
        #[error("step {0} failed")]
        Failed(usize),
    }

    fn def(name: &'static str, service: Service) -> StepDef {
        StepDef {
            name,
            what: format!("do {name}"),
            command: format!("toy {name}"),
            service,
            observable: true,
        }
    }

    impl Toy {
        fn new() -> Toy {
            Toy {
                plan: vec![
                    def("one", Service::Keeps),
                    def("two", Service::Stops),
                    def("three", Service::Resumes),
                ],
                rec: RunRecord::default(),
                saved: vec![],
                state: [false; 3],
                ran: vec![],
                fail_at: None,
                blocked: None,
            }
        }
    }

    impl Procedure for Toy {
        type Error = ToyError;
        fn plan(&self) -> &[StepDef] {
            &self.plan
        }
        fn record(&mut self) -> &mut RunRecord {
            &mut self.rec
        }
        async fn save(&mut self) -> Result<(), ToyError> {
            self.saved.push(self.rec.clone());
            Ok(())
        }
        async fn precondition(&mut self, step: usize) -> Result<Check, ToyError> {
            Ok(if self.blocked == Some(step) {
                Check::Fails("it cannot".into())
            } else {
                Check::Holds
            })
        }
        async fn done(&mut self, step: usize) -> Result<bool, ToyError> {
            Ok(self.state[step])
        }
        async fn run(
            &mut self,
            step: usize,
            _: &mut (dyn FnMut(&str) + Send),
        ) -> Result<(), ToyError> {
            if self.fail_at == Some(step) {
                return Err(ToyError::Failed(step));
            }
            self.ran.push(step);
            self.state[step] = true;
            if step == 1 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            Ok(())
        }
    }

    fn quiet() -> impl FnMut(&str) + Send {
        |_: &str| {}
    }

    #[tokio::test]
    async fn a_failing_precondition_of_a_later_step_stops_the_run_before_its_first_step() {
        let mut toy = Toy::new();
        toy.blocked = Some(2);
        let planned = plan(&mut toy).await.unwrap();
        assert_eq!(planned.steps[2].blocked.as_deref(), Some("it cannot"));
        let err = run(&mut toy, &mut quiet()).await.unwrap_err();
        assert!(toy.ran.is_empty(), "nothing ran: {:?}", toy.ran);
        assert!(toy.rec.no_service_since_unix_ms.is_none());
        let text = err.to_string();
        assert!(
            text.contains("step 3 (three) would fail: it cannot") && text.contains("keeps serving"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_resumed_run_skips_what_is_done_and_counts_no_service_from_the_first_run() {
        let mut toy = Toy::new();
        toy.fail_at = Some(2);
        assert!(run(&mut toy, &mut quiet()).await.is_err());
        assert_eq!(toy.ran, vec![0, 1]);
        let since = toy
            .rec
            .no_service_since_unix_ms
            .expect("service stopped at step 2");
        // The record as saved (what a new process reads back) holds the start too.
        assert_eq!(
            toy.saved.last().unwrap().no_service_since_unix_ms,
            Some(since)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The resumed run: a new procedure value on the saved record.
        let mut again = Toy::new();
        again.rec = toy.saved.last().unwrap().clone();
        again.state = toy.state;
        let out = run(&mut again, &mut quiet()).await.unwrap();
        assert_eq!(again.ran, vec![2], "only the unfinished step ran");
        assert!(out.steps.iter().all(|s| s.done));
        let ms = out.no_service_ms.expect("service resumed");
        assert!(
            ms >= 80,
            "{ms} ms counts the first run's 30 ms step and the 50 ms pause"
        );
        assert!(again.rec.no_service_since_unix_ms.is_none());
    }

    #[tokio::test]
    async fn a_step_found_done_is_not_run_again_and_a_false_postcondition_stops() {
        let mut toy = Toy::new();
        toy.state[0] = true;
        run(&mut toy, &mut quiet()).await.unwrap();
        assert_eq!(toy.ran, vec![1, 2]);
        assert_eq!(toy.rec.done_steps, vec!["one", "two", "three"]);

        struct Liar(Toy);
        impl Procedure for Liar {
            type Error = ToyError;
            fn plan(&self) -> &[StepDef] {
                self.0.plan()
            }
            fn record(&mut self) -> &mut RunRecord {
                self.0.record()
            }
            async fn save(&mut self) -> Result<(), ToyError> {
                self.0.save().await
            }
            async fn precondition(&mut self, s: usize) -> Result<Check, ToyError> {
                self.0.precondition(s).await
            }
            async fn done(&mut self, _: usize) -> Result<bool, ToyError> {
                Ok(false)
            }
            async fn run(
                &mut self,
                s: usize,
                p: &mut (dyn FnMut(&str) + Send),
            ) -> Result<(), ToyError> {
                self.0.run(s, p).await
            }
        }
        let mut liar = Liar(Toy::new());
        let err = run(&mut liar, &mut quiet()).await.unwrap_err();
        assert!(
            matches!(
                err,
                ToyError::Run(RunError::Postcondition { number: 1, .. })
            ),
            "{err}"
        );
        assert!(liar.0.rec.done_steps.is_empty());
    }
}
