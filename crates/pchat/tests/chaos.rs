//! The chaos suite in CI (see `crates/pchat-chaos` and docs/operations/fault-tolerance.md):
//! the two-site pool in network namespaces under writers, the CI schedule
//! (`crates/pchat-chaos/ci.sched`: one event of each fault class the pool must ride out by
//! itself — partitions, one-way loss, SIGKILL and SIGSTOP of PostgreSQL, agents, servers and
//! etcd members including the leader, delay through the harness's proxy, a fenced principal
//! coming back), then, in the same lab, the events of every regression schedule in
//! `crates/pchat-chaos/regressions/` — each a failure the suite once found, kept so that it
//! stays fixed. Each run prints its seed (0
//! for a written schedule) and its schedule; a failing one is replayed with
//! `scripts/chaos --schedule FILE` (or `--seed N --profile short`) and its lab directory is
//! kept (the path is printed).
//!
//! Needs root (namespaces, loop mounts, nftables), PostgreSQL 15, etcd, nft, curl,
//! libfaketime: a missing one fails the test with its name and the package to install.
//! `PCHAT_CHAOS_SEED=N` adds a generated short schedule of seed N. The long schedules are
//! `scripts/chaos --runs 100`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pchat_chaos::{run_blocking, summary, Keep, Profile, RunConfig, RunReport, Schedule};

fn run(schedule: Schedule, id: &str) -> RunReport {
    let out: Arc<Mutex<dyn std::io::Write + Send>> = Arc::new(Mutex::new(std::io::stderr()));
    run_blocking(RunConfig {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_pchat")),
        schedule,
        id: format!("{id}{}", std::process::id() % 1000),
        keep: Keep::OnFailure,
        out: Some(out),
    })
}

/// To stderr past the test harness's capture (as the runs' timelines go).
fn say(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(text.as_bytes());
}

fn regressions() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pchat-chaos/regressions");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "sched"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// One test, so the labs run one after the other (each is a dozen namespaces and a whole
/// pool; two at once on two cores only measure the machine).
#[test]
fn chaos_short_schedule_and_regressions_hold_every_invariant() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pchat-chaos");
    let mut reports = Vec::new();
    if let Some(seed) = std::env::var("PCHAT_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        reports.push(run(Schedule::generate(seed, Profile::Short), "sd"));
    }
    // The regression schedules run after the CI schedule's events in the same lab (each
    // event starts from a repaired pool), rather than each in a lab of its own: a lab takes
    // about a minute to start. `scripts/chaos --schedule FILE` replays one alone.
    let read = |file: &Path| -> Schedule {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        text.parse()
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
    };
    let mut schedule = read(&dir.join("ci.sched"));
    say(&format!(
        "schedule {}
",
        dir.join("ci.sched").display()
    ));
    for file in regressions() {
        say(&format!(
            "  then the regression schedule {}\n",
            file.display()
        ));
        schedule.events.extend(read(&file).events);
    }
    reports.push(run(schedule, "r"));
    let table = summary::table(&reports);
    // Printed even when the test passes: the outages are the suite's measurements.
    say(&table);
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| {
            format!(
                "seed {}: {}{}",
                r.seed,
                r.violations
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
                r.aborted.as_deref().unwrap_or("")
            )
        })
        .collect();
    assert!(failed.is_empty(), "{}\n{table}", failed.join("\n"));
}
