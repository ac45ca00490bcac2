//! Many runs in one table: per run its seed, outcome, events, the longest outage the writers
//! saw and the first broken invariant; then the totals per fault class.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::run::RunReport;

/// The table of `reports` as text.
pub fn table(reports: &[RunReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>20}  {:<7} {:>6} {:>7} {:>9} {:>6}  first failure",
        "seed", "result", "events", "acked", "outage_s", "run_s"
    );
    for r in reports {
        let outage = r
            .events
            .iter()
            .map(|e| e.outage)
            .max()
            .unwrap_or(Duration::ZERO);
        let result = if r.aborted.is_some() {
            "ABORTED"
        } else if r.passed() {
            "pass"
        } else {
            "FAIL"
        };
        let first = r
            .violations
            .first()
            .map(|v| v.to_string())
            .or_else(|| r.aborted.clone())
            .unwrap_or_default();
        let first: String = first.chars().take(110).collect();
        let _ = writeln!(
            s,
            "{:>20}  {:<7} {:>6} {:>7} {:>9.1} {:>6.0}  {}",
            r.seed,
            result,
            r.events.len(),
            r.counts.acked,
            outage.as_secs_f64(),
            r.total_s,
            first.replace('\n', " ")
        );
    }
    let passed = reports.iter().filter(|r| r.passed()).count();
    let aborted = reports.iter().filter(|r| r.aborted.is_some()).count();
    let _ = writeln!(
        s,
        "\n{passed} passed, {} failed ({aborted} of them aborted by the harness)",
        reports.len() - passed
    );
    // Per fault class: how often, the worst outage, how many runs with it failed.
    let mut by: BTreeMap<String, (usize, Duration, usize)> = BTreeMap::new();
    for r in reports {
        for e in &r.events {
            let class = e.event.fault.to_string();
            let class = class.split(' ').take(2).collect::<Vec<_>>().join(" ");
            let entry = by.entry(class).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(e.outage);
            if !r.passed() {
                entry.2 += 1;
            }
        }
    }
    let _ = writeln!(
        s,
        "\n{:<34} {:>6} {:>14} {:>14}",
        "fault", "count", "worst_outage_s", "in_failed_runs"
    );
    for (class, (n, worst, failed)) in by {
        let _ = writeln!(
            s,
            "{class:<34} {n:>6} {:>14.1} {failed:>14}",
            worst.as_secs_f64()
        );
    }
    s
}
