//! The invariants, judged after a run from what clients saw and what PostgreSQL answered.
//!
//! - I1: every acknowledged message is in the archive under the id it was acknowledged with,
//!   unless a DR failover declared it lost: acknowledged before the fence and after the last
//!   commit the backup replayed (the declared window), and no more of them than the
//!   failover's upper bound when it gives one.
//! - I2: what a DR failover lost is one tail of each room's acknowledged messages.
//! - I3: each room's archive is numbered 1, 2, 3… without holes within an id epoch, and a
//!   later epoch starts at its first id.
//! - I4: no origin-id and no body stored twice.
//! - Stable ids (XEP-0359): no id acknowledged for two different messages.
//! - I5: never two writable principals — no sample in which two instances could each
//!   acknowledge a commit (`pg_is_in_recovery() = false`, and no synchronous standby named
//!   or one attached), no sample after the final heal in which two instances answered
//!   `pg_is_in_recovery() = false` at all (an old principal still running once every agent
//!   is back: a zombie whose sessions hang), and no acknowledgment carried by a server of a
//!   fenced site after the fence. While an agent is down nothing can stop its PostgreSQL,
//!   so an old principal then may run on; its commits wait for a mirror that left it and are
//!   never acknowledged, which the first rule checks.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use crate::lab::Site;
use crate::ledger::{Archive, Ledger};

/// How far a lost message's acknowledgment may precede the backup's last replayed commit
/// and still count as inside the window: the commit stamp is taken in PostgreSQL before
/// the acknowledgment leaves the server (clock steps on the lost site come on top).
pub const WINDOW_SLACK: Duration = Duration::from_millis(500);

/// One round of the writable-principal sampler.
#[derive(Clone, Debug)]
pub struct Sample {
    /// When the round started.
    pub at: Instant,
    /// Instances that could acknowledge a commit: not in recovery, and either no
    /// synchronous standby named or one attached.
    pub writable: Vec<String>,
    /// Instances that answered `pg_is_in_recovery() = false`, whether or not they could.
    pub primaries: Vec<String>,
}

/// What a DR failover declared.
#[derive(Clone, Debug)]
pub struct Declared {
    /// When the failover command started (the old site was cut off or killed before).
    pub started: Instant,
    /// When it finished (the fence is in place by then).
    pub fenced: Instant,
    /// The site it failed over from.
    pub from: Site,
    /// The last commit the backup replayed, on the wall clock.
    pub backup_last_commit: Option<SystemTime>,
    /// `lost_messages_at_least` of its report.
    pub at_least: u64,
    /// `lost_messages_at_most`, when the report gives one.
    pub at_most: Option<u64>,
    /// Extra slack for clock steps on the lost site.
    pub clock_slack: Duration,
}

/// A writer's outcome.
pub struct WriterOutcome {
    /// Its ledger.
    pub ledger: Ledger,
    /// Why it gave up, if it did (a liveness failure, judged apart).
    pub gave_up: Option<String>,
    /// Its room's archive, or why it could not be read.
    pub archive: Result<Archive, String>,
}

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// `I1`…`I5`, `ids`, `liveness`, `procedure` (a DR failover that failed), `alert` (a
    /// damaged segment `log-shipping status` never named).
    pub invariant: &'static str,
    /// What was seen.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.invariant, self.what)
    }
}

/// Counts for the report.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Messages acknowledged, all writers.
    pub acked: usize,
    /// Acknowledged and lost inside a declared window.
    pub lost_declared: usize,
    /// Unacknowledged but stored (allowed).
    pub unacked_stored: usize,
}

fn v(invariant: &'static str, what: String) -> Violation {
    Violation { invariant, what }
}

/// Judges the writers and the samples; `server_site` names the site of a server address.
pub fn judge(
    writers: &[WriterOutcome],
    samples: &[Sample],
    settled: Option<Instant>,
    declared: Option<&Declared>,
    server_site: &dyn Fn(std::net::SocketAddr) -> Option<Site>,
) -> (Vec<Violation>, Counts) {
    let mut out = Vec::new();
    let mut counts = Counts::default();
    for w in writers {
        let room = &w.ledger.config().room;
        let archive = match &w.archive {
            Ok(a) => a,
            Err(e) => {
                out.push(v("liveness", format!("{room}: archive unreadable: {e}")));
                continue;
            }
        };
        if let Err(e) = archive.check_order() {
            out.push(v("I3", format!("{e:#}")));
        }
        if let Err(e) = archive.check_unique() {
            out.push(v("I4", format!("{e:#}")));
        }
        let by_origin: HashMap<&str, &crate::ledger::Archived> = archive
            .messages
            .iter()
            .filter_map(|m| m.origin_id.as_deref().map(|o| (o, m)))
            .collect();
        let mut ids: HashMap<i64, &str> = HashMap::new();
        let mut lost: Vec<(u64, &str)> = Vec::new();
        let mut kept_before_fence: Vec<u64> = Vec::new();
        for e in w.ledger.entries() {
            let stored = by_origin.get(e.origin_id.as_str());
            let Some(ack) = &e.ack else {
                if stored.is_some() {
                    counts.unacked_stored += 1;
                }
                continue;
            };
            counts.acked += 1;
            if let Some(other) = ids.insert(ack.id, e.origin_id.as_str()) {
                out.push(v(
                    "ids",
                    format!(
                        "{room}: id {} acknowledged for {other} and again for {} (XEP-0359 ids \
                         must be unique and stable)",
                        ack.id, e.origin_id
                    ),
                ));
            }
            if let Some(d) = declared {
                if ack.at > d.fenced && server_site(ack.server) == Some(d.from) {
                    out.push(v(
                        "I5",
                        format!(
                            "{room}: {} acknowledged through a server of fenced site {} after \
                             the failover",
                            e.origin_id,
                            d.from.name()
                        ),
                    ));
                }
            }
            match stored {
                Some(s) => {
                    if s.id != ack.id {
                        out.push(v(
                            "I1",
                            format!(
                                "{room}: {} acknowledged as id {} but archived as id {}",
                                e.origin_id, ack.id, s.id
                            ),
                        ));
                    }
                    if declared.is_some_and(|d| ack.at < d.started) {
                        kept_before_fence.push(e.n);
                    }
                }
                None => {
                    let inside = declared.is_some_and(|d| {
                        ack.at < d.fenced
                            && d.backup_last_commit
                                .is_none_or(|c| ack.wall + WINDOW_SLACK + d.clock_slack >= c)
                    });
                    if inside {
                        lost.push((e.n, e.origin_id.as_str()));
                    } else {
                        out.push(v(
                            "I1",
                            format!(
                                "{room}: {} acknowledged as id {} is not in the archive{}",
                                e.origin_id,
                                ack.id,
                                if declared.is_some() {
                                    " and was outside the failover's declared window"
                                } else {
                                    " (no DR failover declared any loss)"
                                }
                            ),
                        ));
                    }
                }
            }
        }
        if let Some((first, name)) = lost.first() {
            if let Some(k) = kept_before_fence.iter().find(|n| *n > first) {
                out.push(v(
                    "I2",
                    format!(
                        "{room}: the loss is not a tail: {name} was lost but message {k}, \
                         acknowledged after it and before the failover, was kept"
                    ),
                ));
            }
        }
        counts.lost_declared += lost.len();
        if let Some(g) = &w.gave_up {
            out.push(v("liveness", format!("{room}: the writer gave up: {g}")));
        }
    }
    if let Some(d) = declared {
        if let Some(max) = d.at_most {
            if counts.lost_declared as u64 > max {
                out.push(v(
                    "I2",
                    format!(
                        "the writers lost {} acknowledged messages, more than the failover's \
                         upper bound {max}",
                        counts.lost_declared
                    ),
                ));
            }
        }
    }
    let two: Vec<&Sample> = samples.iter().filter(|s| s.writable.len() > 1).collect();
    if let Some(first) = two.first() {
        out.push(v(
            "I5",
            format!(
                "two writable principals in {} sample(s); first: {:?}",
                two.len(),
                first.writable
            ),
        ));
    }
    if let Some(settled) = settled {
        let zombies: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.at >= settled && s.primaries.len() > 1)
            .collect();
        if let (Some(first), Some(last)) = (zombies.first(), zombies.last()) {
            out.push(v(
                "I5",
                format!(
                    "two instances out of recovery after the final heal, every agent running, \
                     in {} sample(s) over {:.1} s: {:?}",
                    zombies.len(),
                    last.at.duration_since(first.at).as_secs_f64(),
                    first.primaries
                ),
            ));
        }
    }
    (out, counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Ack, Archived, Entry, LedgerConfig};
    use std::net::SocketAddr;

    fn addr() -> SocketAddr {
        "198.18.0.41:5222"
            .parse()
            .unwrap_or_else(|_| unreachable!())
    }

    fn ledger(acks: &[(u64, Option<i64>)], t0: Instant) -> Ledger {
        let cfg = LedgerConfig::new(
            vec![addr()],
            "a@localhost",
            "pw",
            "r@conference.localhost",
            "w",
        );
        let entries = acks
            .iter()
            .map(|(n, id)| Entry {
                n: *n,
                origin_id: format!("w-{n}"),
                body: format!("w {n}"),
                first_sent: t0,
                attempts: 1,
                ack: id.map(|id| Ack {
                    id,
                    at: t0 + Duration::from_millis(*n * 10),
                    wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + *n),
                    server: addr(),
                }),
            })
            .collect();
        Ledger::with_entries(cfg, entries)
    }

    fn archive(ns: &[u64]) -> Archive {
        Archive {
            room: "r@conference.localhost".into(),
            messages: ns
                .iter()
                .enumerate()
                .map(|(i, n)| Archived {
                    id: i as i64 + 1,
                    origin_id: Some(format!("w-{n}")),
                    body: Some(format!("w {n}")),
                })
                .collect(),
        }
    }

    fn judged(l: Ledger, a: Archive, d: Option<&Declared>) -> Vec<&'static str> {
        let w = [WriterOutcome {
            ledger: l,
            gave_up: None,
            archive: Ok(a),
        }];
        judge(&w, &[], None, d, &|_| Some(Site::A))
            .0
            .iter()
            .map(|v| v.invariant)
            .collect()
    }

    #[test]
    fn each_invariant_catches_its_case() {
        let t0 = Instant::now();
        let ok = ledger(&[(1, Some(1)), (2, Some(2)), (3, None)], t0);
        assert!(judged(ok, archive(&[1, 2]), None).is_empty());
        // An acknowledged message missing without a declared loss.
        let l = ledger(&[(1, Some(1)), (2, Some(2))], t0);
        assert_eq!(judged(l, archive(&[1]), None), vec!["I1"]);
        // Archived under another id than acknowledged.
        let l = ledger(&[(1, Some(1)), (2, Some(3))], t0);
        assert_eq!(judged(l, archive(&[1, 2]), None), vec!["I1"]);
        // Stored twice.
        let l = ledger(&[(1, Some(1))], t0);
        assert!(judged(l, archive(&[1, 1]), None).contains(&"I4"));
        // A hole in the archive's ids.
        let l = ledger(&[(1, Some(1))], t0);
        let mut a = archive(&[1]);
        a.messages[0].id = 2;
        assert!(judged(l, a, None).contains(&"I3"));
        // Id epochs: a later epoch starts at its first id; anything else is a hole.
        let epochs = |ids: &[i64]| {
            let mut a = archive(&(0..ids.len() as u64).collect::<Vec<_>>());
            for (m, id) in a.messages.iter_mut().zip(ids) {
                m.id = *id;
            }
            a.check_order().is_ok()
        };
        assert!(epochs(&[1, 2, 1_000_000_001, 1_000_000_002]));
        assert!(epochs(&[3_000_000_001, 3_000_000_002]));
        assert!(!epochs(&[1, 2, 1_000_000_002]));
        assert!(!epochs(&[1_000_000_001, 2]));
        assert!(!epochs(&[1, 3]));
        // One id handed out twice.
        let l = ledger(&[(1, Some(1)), (2, Some(1))], t0);
        assert!(judged(l, archive(&[1]), None).contains(&"ids"));
    }

    #[test]
    fn a_declared_tail_loss_passes_and_anything_else_fails() {
        let t0 = Instant::now();
        let d = Declared {
            started: t0 + Duration::from_millis(45),
            fenced: t0 + Duration::from_millis(50),
            from: Site::A,
            backup_last_commit: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1002)),
            at_least: 1,
            at_most: Some(3),
            clock_slack: Duration::ZERO,
        };
        let acks = [(1, Some(1)), (2, Some(2)), (3, Some(3)), (4, Some(4))];
        // 3 and 4 lost: a tail, inside the window.
        assert!(judged(ledger(&acks, t0), archive(&[1, 2]), Some(&d)).is_empty());
        // 1 lost: before the backup's last replayed commit.
        assert!(judged(ledger(&acks, t0), archive(&[2, 3, 4]), Some(&d)).contains(&"I1"));
        // 3 lost but 4 kept: not a tail.
        assert!(judged(ledger(&acks, t0), archive(&[1, 2, 4]), Some(&d)).contains(&"I2"));
        // More lost than the upper bound.
        let tight = Declared {
            at_most: Some(1),
            ..d.clone()
        };
        assert!(judged(ledger(&acks, t0), archive(&[1, 2]), Some(&tight)).contains(&"I2"));
        // Acknowledged after the failover through the fenced site's server.
        let acks = [(1, Some(1)), (9, Some(2))];
        assert!(judged(ledger(&acks, t0), archive(&[1, 9]), Some(&d)).contains(&"I5"));
    }

    fn sample(at: Instant, writable: &[&str], primaries: &[&str]) -> Sample {
        Sample {
            at,
            writable: writable.iter().map(|s| s.to_string()).collect(),
            primaries: primaries.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn two_writable_instances_in_one_sample_break_i5() {
        let t = Instant::now();
        let s = [
            sample(t, &["a_db"], &["a_db"]),
            sample(t, &["a_db", "a_mirror"], &["a_db", "a_mirror"]),
        ];
        let (v, _) = judge(&[], &s, None, None, &|_| None);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].invariant, "I5");
    }

    #[test]
    fn an_old_principal_out_of_recovery_breaks_i5_only_after_the_final_heal() {
        let t = Instant::now();
        let later = t + Duration::from_secs(10);
        // Its agent dead: the old principal runs on, but cannot acknowledge (its
        // synchronous mirror left it).
        let during = [sample(t, &["a_mirror"], &["a_db", "a_mirror"])];
        let (v, _) = judge(&[], &during, Some(later), None, &|_| None);
        assert!(v.is_empty(), "{v:?}");
        // Every agent back, and it still runs: a zombie.
        let after = [
            sample(t, &["a_mirror"], &["a_db", "a_mirror"]),
            sample(later, &["a_mirror"], &["a_db", "a_mirror"]),
        ];
        let (v, _) = judge(&[], &after, Some(later), None, &|_| None);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].invariant, "I5");
    }
}
