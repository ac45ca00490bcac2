//! Log shipping on one instance: SQL Server's three log-shipping jobs, done with
//! PostgreSQL's own WAL archiving and archive recovery.
//!
//! - **Backup job** (the primary site's principal *and* its mirror, role [`ShippingRole::Source`]):
//!   PostgreSQL archives every finished WAL segment into the share through
//!   [`shipping_conf::ARCHIVE_SCRIPT`] (`archive_command`), which writes the file and then a SHA-256 sidecar
//!   (`NAME.sha256`), both fsynced and renamed into place, and never overwrites a different
//!   file. `archive_timeout = backup_interval_s` switches segments at least that often while
//!   anything is written. Every instance runs with `archive_mode = always`, so the mirror
//!   archives what it receives too: shipping goes on from whichever instance is principal
//!   after a mirror failover, and a segment the dead principal never archived is archived by
//!   the mirror that has it.
//! - **Copy job** (the backup site's database, role [`ShippingRole::Secondary`], in the agent,
//!   every `copy_interval_s`): copies segments from the share into the local copy directory,
//!   in order, *as the OS user* (the seed's privileged-account note: that account needs read
//!   access to the share and write access to the copy directory). A segment is copied only
//!   when it is whole (its size) and matches its sidecar; a missing segment (a hole in the
//!   sequence), a truncated or a corrupt one stops the job at the last good segment with an
//!   alert that names the file. Nothing after a bad segment is copied, so the restore job can
//!   only ever replay a verified, gapless prefix.
//! - **Restore job** (the same instance): the standby replays from the copy directory through
//!   [`shipping_conf::RESTORE_SCRIPT`] (`restore_command`), which checks the sidecar once more before it
//!   hands a file to PostgreSQL, optionally `restore_delay_s` behind
//!   (`recovery_min_apply_delay`).
//!
//! The role is kept in a file beside the data directory (`DATA.logship.json`) and applied to
//! `postgresql.auto.conf` at every start, clone and restore, because those copy another
//! instance's settings ([`shipping_conf`], which the instance applies without knowing the
//! jobs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use pchat_agent_api::shipping::{
    Check, CopyJob, CopyRun, PreflightRequest, RestoreJob, ShippingRole, ShippingStatus,
};
use pchat_agent_api::{format_lsn, now_rfc3339, parse_lsn};

use crate::instance::Instance;
use crate::shipping_conf::{self, load_role};
use crate::AgentError;

/// How long replay must stand still, past its timeline's end with segments waiting, before
/// the standby is reported as diverged (PostgreSQL retries the next segment every second).
const DIVERGED_AFTER: Duration = Duration::from_secs(10);

/// The agent's live view of its jobs (what is not in PostgreSQL).
#[derive(Debug, Default)]
pub struct Runtime {
    copy: Mutex<CopyJob>,
    /// Replay's last position, when it got there (RFC 3339) and since when it stands still.
    restore: Mutex<(Option<u64>, Option<String>, Option<Instant>)>,
    /// One copy run at a time (the loop and `copy-now`).
    copying: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A WAL file name's parts: `(timeline, segment number)` for a segment, `None` otherwise.
pub fn parse_segment(name: &str, segment_bytes: u64) -> Option<(u32, u64)> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let tli = u32::from_str_radix(&name[..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..], 16).ok()?;
    let per_log = 0x1_0000_0000 / segment_bytes.max(1);
    Some((tli, log * per_log + seg))
}

/// The name of the segment holding `lsn` on `tli`.
pub fn segment_name(tli: u32, lsn: u64, segment_bytes: u64) -> String {
    let segment_bytes = segment_bytes.max(1);
    let per_log = 0x1_0000_0000 / segment_bytes;
    let segno = lsn / segment_bytes;
    format!("{tli:08X}{:08X}{:08X}", segno / per_log, segno % per_log)
}

/// Files shipped to a directory: those with a sidecar, by name, with their sizes.
fn shipped(dir: &Path) -> Result<BTreeMap<String, u64>, std::io::Error> {
    let mut files = BTreeMap::new();
    let mut sidecars = BTreeSet::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if let Some(base) = name.strip_suffix(".sha256") {
            sidecars.insert(base.to_owned());
        } else if let Ok(m) = e.metadata() {
            files.insert(name, m.len());
        }
    }
    files.retain(|n, _| sidecars.contains(n));
    Ok(files)
}

/// Where each timeline ended, from PostgreSQL timeline history files (`NNNNNNNN.history`:
/// lines `parent-timeline<TAB>switch-LSN<TAB>reason`): timeline -> the earliest LSN at which a
/// later timeline forked off it.
pub(crate) fn timeline_ends<'a>(
    histories: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<u32, u64> {
    let mut ends: BTreeMap<u32, u64> = BTreeMap::new();
    for text in histories {
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut f = line.split_whitespace();
            let (Some(tli), Some(lsn)) = (f.next(), f.next()) else {
                continue;
            };
            let (Ok(tli), Some(lsn)) = (tli.parse::<u32>(), parse_lsn(lsn)) else {
                continue;
            };
            let e = ends.entry(tli).or_insert(lsn);
            *e = (*e).min(lsn);
        }
    }
    ends
}

/// Whether segment `segno` of timeline `tli` holds WAL past the point where a later timeline
/// forked off `tli`. Such a file was written by a principal that went on after another took
/// over (the old principal of a failover): replaying it would carry the standby past the
/// fork, off the new principal's history for good (PostgreSQL then stops at the next
/// segment with "record with incorrect prev-link"). The same segment of the newer timeline
/// holds the part before the fork.
pub(crate) fn superseded(
    tli: u32,
    segno: u64,
    ends: &BTreeMap<u32, u64>,
    segment_bytes: u64,
) -> bool {
    ends.get(&tli)
        .is_some_and(|&end| (segno + 1).saturating_mul(segment_bytes.max(1)) > end)
}

/// Which shipped files to copy next, in order, and where the sequence has a hole.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct CopyPlan {
    /// Files to copy, in order (history files first, then segments by number and timeline).
    pub files: Vec<String>,
    /// The first segment number missing from the share below a later shipped one.
    pub hole: Option<u64>,
}

/// Plans a copy run: every shipped file not yet copied, segments from `start` on, in
/// (segment number, timeline) order, stopping before the first hole in the numbers.
/// `.partial` and other non-segment files except history files are not needed for replay;
/// segments [`superseded`] by a later timeline are never copied and count as absent.
pub(crate) fn plan_copy(
    share: &BTreeMap<String, u64>,
    copied: &BTreeMap<String, u64>,
    start: Option<u64>,
    segment_bytes: u64,
    ends: &BTreeMap<u32, u64>,
) -> CopyPlan {
    let mut files: Vec<String> = share
        .keys()
        .filter(|n| n.ends_with(".history") && !copied.contains_key(*n))
        .cloned()
        .collect();
    let mut present: BTreeSet<u64> = BTreeSet::new();
    let mut todo: Vec<(u64, u32, String)> = Vec::new();
    for (n, was_copied) in share
        .keys()
        .map(|n| (n, copied.contains_key(n)))
        .chain(copied.keys().map(|n| (n, true)))
    {
        let Some((tli, segno)) = parse_segment(n, segment_bytes) else {
            continue;
        };
        if start.is_some_and(|s| segno < s) || superseded(tli, segno, ends, segment_bytes) {
            continue;
        }
        present.insert(segno);
        if !was_copied {
            todo.push((segno, tli, n.clone()));
        }
    }
    todo.sort();
    todo.dedup();
    let first = start.or_else(|| present.iter().next().copied());
    let mut hole = None;
    if let (Some(first), Some(&last)) = (first, present.iter().next_back()) {
        hole = (first..last).find(|s| !present.contains(s));
    }
    files.extend(
        todo.into_iter()
            .filter(|(segno, _, _)| hole.is_none_or(|h| *segno < h))
            .map(|(_, _, n)| n),
    );
    CopyPlan { files, hole }
}

impl Runtime {
    /// The current copy job view.
    pub fn copy_job(&self) -> CopyJob {
        lock(&self.copy).clone()
    }
}

/// Sets the role: keeps it, writes the settings, reloads a running instance.
pub async fn configure(inst: &Instance, role: &ShippingRole) -> Result<(), AgentError> {
    match role {
        ShippingRole::None => {}
        ShippingRole::Source {
            share_dir,
            backup_interval_s,
            ..
        } => {
            check_dir_arg(share_dir)?;
            if !(1..=3600).contains(backup_interval_s) {
                return Err(AgentError::Refused(format!(
                    "backup_interval_s = {backup_interval_s}: give 1 to 3600 seconds"
                )));
            }
        }
        ShippingRole::Secondary {
            share_dir,
            copy_dir,
            copy_interval_s,
            ..
        } => {
            check_dir_arg(share_dir)?;
            check_dir_arg(copy_dir)?;
            if !(1..=3600).contains(copy_interval_s) {
                return Err(AgentError::Refused(format!(
                    "copy_interval_s = {copy_interval_s}: give 1 to 3600 seconds"
                )));
            }
        }
    }
    shipping_conf::save_role(inst.config(), role)?;
    if inst.is_initialized() {
        inst.apply_shipping_role(&inst.config().data_dir)?;
        if inst.is_running().await {
            let c = inst.connect("postgres").await?;
            c.batch_execute("SELECT pg_reload_conf()")
                .await
                .map_err(|e| AgentError::Postgres(e.to_string()))?;
        }
    }
    Ok(())
}

fn check_dir_arg(d: &str) -> Result<(), AgentError> {
    if !d.starts_with('/') || d.contains(['\'', '"', '\n', '\\', '$', '`']) {
        return Err(AgentError::Refused(format!(
            "`{d}` must be an absolute path without quotes, `$`, backquotes or backslashes"
        )));
    }
    Ok(())
}

/// Proves the OS user can read and write what log shipping needs, naming what is missing.
pub async fn preflight(inst: &Instance, req: &PreflightRequest) -> Result<Vec<Check>, AgentError> {
    let user = inst.config().os_user.clone();
    let mut checks = Vec::new();
    for d in &req.read {
        check_dir_arg(d)?;
        let ok = inst
            .run_as_user(
                "sh",
                &[
                    "-c",
                    "test -d \"$1\" && test -r \"$1\" && test -x \"$1\" && ls \"$1\" >/dev/null",
                    "sh",
                    d,
                ],
            )
            .await
            .is_ok();
        checks.push(Check {
            what: format!("{user} can read {d}"),
            ok,
            fix: (!ok).then(|| access_fix(Path::new(d), &user, "rx")),
        });
    }
    for d in &req.write {
        check_dir_arg(d)?;
        let probe = format!("{d}/.pchat-preflight-{}", std::process::id());
        let ok = inst
            .run_as_user(
                "sh",
                &[
                    "-c",
                    "mkdir -p \"$1\" 2>/dev/null; test -d \"$1\" && echo probe > \"$2\" && sync \"$2\" && rm -f \"$2\"",
                    "sh",
                    d,
                    &probe,
                ],
            )
            .await
            .is_ok();
        checks.push(Check {
            what: format!("{user} can write {d}"),
            ok,
            fix: (!ok).then(|| access_fix(Path::new(d), &user, "rwx")),
        });
    }
    Ok(checks)
}

/// Names the first directory on the way to `dir` that stops `user`, with a command that fixes it.
fn access_fix(dir: &Path, user: &str, perms: &str) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let mut p = PathBuf::new();
    for c in dir.components() {
        p.push(c);
        match std::fs::metadata(&p) {
            Err(_) => {
                return format!(
                    "{} does not exist: create it (`mkdir -p {} && chown {user} {}`)",
                    p.display(),
                    dir.display(),
                    dir.display()
                )
            }
            Ok(m) if p.as_path() != dir && m.mode() & 0o001 == 0 => {
                return format!(
                    "{} (mode {:o}, owner uid {}) does not let {user} through: `setfacl -m u:{user}:x {}` or `chmod o+x {}`",
                    p.display(),
                    m.mode() & 0o7777,
                    m.uid(),
                    p.display(),
                    p.display()
                )
            }
            Ok(_) => {}
        }
    }
    let mode = std::fs::metadata(dir)
        .map(|m| format!("mode {:o}, owner uid {}", m.mode() & 0o7777, m.uid()))
        .unwrap_or_default();
    format!(
        "{user} lacks {perms} on {} ({mode}): `setfacl -m u:{user}:{perms} {}` or `chown {user} {}`",
        dir.display(),
        dir.display(),
        dir.display()
    )
}

/// One run of the copy job. Does nothing unless the role is Secondary (and, unless `force`,
/// not paused).
pub async fn copy_once(inst: &Instance, rt: &Runtime, force: bool) -> Result<CopyRun, AgentError> {
    let _one = rt.copying.lock().await;
    let ShippingRole::Secondary {
        share_dir,
        copy_dir,
        start_lsn,
        copy_paused,
        ..
    } = load_role(inst.config())
    else {
        return Ok(CopyRun::default());
    };
    if copy_paused && !force {
        lock(&rt.copy).paused = true;
        return Ok(CopyRun::default());
    }
    let segment_bytes = inst.segment_bytes().await;
    let share_path = PathBuf::from(&share_dir);
    let copy_path = PathBuf::from(&copy_dir);
    let share = tokio::task::spawn_blocking({
        let p = share_path.clone();
        move || shipped(&p)
    })
    .await
    .map_err(|e| AgentError::Failed(e.to_string()))?;
    let share = match share {
        Ok(s) => s,
        Err(e) => {
            let error = format!(
                "cannot list the share {share_dir}: {e}; run `pchat db log-shipping preflight`"
            );
            let mut c = lock(&rt.copy);
            c.error = Some(error.clone());
            c.paused = copy_paused;
            c.last_run_at = Some(now_rfc3339());
            return Ok(CopyRun {
                error: Some(error),
                ..CopyRun::default()
            });
        }
    };
    if !copy_path.exists() {
        inst.run_as_user("mkdir", &["-p", &copy_dir]).await.ok();
    }
    let mut copied = shipped(&copy_path).unwrap_or_default();
    let ends = tokio::task::spawn_blocking({
        let (s, c) = (share_path.clone(), copy_path.clone());
        let names: Vec<String> = share
            .keys()
            .chain(copied.keys())
            .filter(|n| n.ends_with(".history"))
            .cloned()
            .collect();
        move || read_timeline_ends(&s, &c, &names)
    })
    .await
    .unwrap_or_default();
    drop_superseded(&copy_path, &mut copied, &ends, segment_bytes);
    let start = start_lsn
        .as_deref()
        .and_then(parse_lsn)
        .map(|l| l / segment_bytes.max(1));
    let plan = plan_copy(&share, &copied, start, segment_bytes, &ends);
    let not_copied = share
        .keys()
        .filter(|n| {
            parse_segment(n, segment_bytes).is_some_and(|(tli, s)| {
                start.is_none_or(|st| s >= st) && !superseded(tli, s, &ends, segment_bytes)
            })
        })
        .filter(|n| !copied.contains_key(*n))
        .count() as u64;
    let mut run = CopyRun::default();
    let script = shipping_conf::scripts_dir(inst.config()).join("copy-wal.sh");
    for name in &plan.files {
        let size = share.get(name).copied().unwrap_or(0);
        if parse_segment(name, segment_bytes).is_some() && size != segment_bytes {
            run.error = Some(format!(
                "segment {name} in the share is truncated ({size} of {segment_bytes} bytes): the copy job stopped before it and nothing after it is applied; \
                 replace {share_dir}/{name} with a whole copy (from the principal's pg_wal or its mirror's)"
            ));
            break;
        }
        let script_s = script.display().to_string();
        match inst
            .run_as_user("/bin/sh", &[&script_s, &share_dir, &copy_dir, name])
            .await
        {
            Ok(()) => {
                run.copied += 1;
                let mut c = lock(&rt.copy);
                c.last_copied = Some(name.clone());
                c.last_copy_at = Some(now_rfc3339());
            }
            Err(code) => {
                run.error = Some(match code {
                    Some(3) => format!(
                        "segment {name} in the share does not match its checksum (corrupt): the copy job stopped before it and nothing after it is applied; \
                         replace {share_dir}/{name} with a good copy"
                    ),
                    Some(2) => format!("{name} disappeared from the share while being copied"),
                    _ => format!(
                        "{} cannot copy {share_dir}/{name} into {copy_dir}: run `pchat db log-shipping preflight` to see which permission is missing",
                        inst.config().os_user
                    ),
                });
                break;
            }
        }
    }
    if run.error.is_none() {
        if let Some(h) = plan.hole {
            let name = segment_name(1, h * segment_bytes, segment_bytes);
            run.error = Some(format!(
                "a segment is missing from the share: position {} (file ????????{}), while later ones are there; the restore job stopped at the last segment before it. \
                 Copy the missing segment into {share_dir} (with its .sha256) or re-seed the secondary with `pchat db log-shipping configure`",
                format_lsn(h * segment_bytes),
                &name[8..]
            ));
        }
    }
    run.pending = not_copied.saturating_sub(run.copied);
    {
        let mut c = lock(&rt.copy);
        c.paused = copy_paused;
        c.pending = run.pending;
        c.error = run.error.clone();
        c.last_run_at = Some(now_rfc3339());
    }
    cleanup_copy_dir(inst, &copy_path, segment_bytes).await;
    Ok(run)
}

/// The timelines' ends from the history files in the share and the copy directory (both
/// writable by the OS user: read without following links, a file that cannot be read is
/// skipped — its copy in the other directory, or the next run, supplies it).
fn read_timeline_ends(share: &Path, copy: &Path, names: &[String]) -> BTreeMap<u32, u64> {
    let dirs: Vec<_> = [share, copy]
        .into_iter()
        .filter_map(|p| pchat_tls::dir::Dir::open(p).ok())
        .collect();
    let mut texts = Vec::new();
    for n in names {
        for d in &dirs {
            if let Ok(Some(b)) = d.read(n) {
                texts.push(String::from_utf8_lossy(&b).into_owned());
                break;
            }
        }
    }
    timeline_ends(texts.iter().map(String::as_str))
}

/// Deletes from the copy directory the segments a later timeline superseded (copied before
/// its history file arrived), so the restore job can never hand them to PostgreSQL.
fn drop_superseded(
    copy_dir: &Path,
    copied: &mut BTreeMap<String, u64>,
    ends: &BTreeMap<u32, u64>,
    segment_bytes: u64,
) {
    let stale: Vec<String> = copied
        .keys()
        .filter(|n| {
            parse_segment(n, segment_bytes)
                .is_some_and(|(tli, s)| superseded(tli, s, ends, segment_bytes))
        })
        .cloned()
        .collect();
    if stale.is_empty() {
        return;
    }
    let Ok(dir) = pchat_tls::dir::Dir::open(copy_dir) else {
        return;
    };
    for n in stale {
        tracing::warn!(
            segment = %n,
            "log shipping copy job: deleted a copied segment that runs past its timeline's fork (the old principal wrote on after a failover); the newer timeline's segment replaces it"
        );
        let _ = dir.remove(&format!("{n}.sha256"));
        if dir.remove(&n).is_ok() {
            copied.remove(&n);
        }
    }
}

/// Removes copied segments the standby no longer needs (before its restart point).
async fn cleanup_copy_dir(inst: &Instance, copy_dir: &Path, segment_bytes: u64) {
    let Some(redo) = inst.redo_segment().await else {
        return;
    };
    let Some((_, keep_from)) = parse_segment(&redo, segment_bytes) else {
        return;
    };
    let Ok(files) = shipped(copy_dir) else {
        return;
    };
    // The copy directory is the OS user's: entries are removed relative to its descriptor,
    // so a link swapped in for the directory cannot make root delete elsewhere.
    let Ok(dir) = pchat_tls::dir::Dir::open(copy_dir) else {
        return;
    };
    for n in files.keys() {
        if parse_segment(n, segment_bytes).is_some_and(|(_, s)| s + 1 < keep_from) {
            let _ = dir.remove(&format!("{n}.sha256"));
            let _ = dir.remove(n);
        }
    }
}

/// Deletes shipped files older than the retention from the share (the source's backup job).
/// The share directory is writable by the OS user: entries are listed and removed relative
/// to a descriptor opened without following links.
fn cleanup_share(share_dir: &Path, retention_h: u64) {
    let Ok(dir) = pchat_tls::dir::Dir::open(share_dir) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(share_dir) else {
        return;
    };
    let limit = Duration::from_secs(retention_h.saturating_mul(3600));
    for e in entries.flatten() {
        let old = std::fs::symlink_metadata(e.path())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > limit);
        if old {
            let _ = dir.remove(&e.file_name().to_string_lossy());
        }
    }
}

/// The jobs' status, with the instance's own alerts.
pub async fn status(inst: &Instance, rt: &Runtime) -> ShippingStatus {
    let role = load_role(inst.config());
    let mut s = ShippingStatus {
        role: role.clone(),
        ..ShippingStatus::default()
    };
    // A PostgreSQL that answers nothing is not asked again here: each question would cost
    // a whole query timeout, and the answer is wanted now.
    let answering = inst.silent_for().is_none();
    match &role {
        ShippingRole::None => {}
        ShippingRole::Source { .. } => {
            let b = if answering {
                inst.archiver().await
            } else {
                None
            };
            if let Some(b) = &b {
                if b.failing {
                    s.alerts.push(format!(
                        "the backup job cannot archive {} (last failure {}); see the PostgreSQL log {} and run `pchat db log-shipping preflight`",
                        b.last_failed.as_deref().unwrap_or("?"),
                        b.last_failed_at.as_deref().unwrap_or("?"),
                        inst.config().log_file.display()
                    ));
                }
            }
            s.backup = b;
        }
        ShippingRole::Secondary {
            copy_dir,
            restore_delay_s,
            ..
        } => {
            let copy = rt.copy_job();
            if let Some(e) = &copy.error {
                s.alerts.push(format!("copy job: {e}"));
            }
            let (segment_bytes, (replay, commit_at, tli)) = if answering {
                (inst.segment_bytes().await, inst.replay_position().await)
            } else {
                (16 * 1024 * 1024, (None, None, None))
            };
            let mut r = RestoreJob {
                delay_s: *restore_delay_s,
                last_commit_at: commit_at,
                ..RestoreJob::default()
            };
            if let Some(lsn) = replay.as_deref().and_then(parse_lsn) {
                let seg = segment_name(tli.unwrap_or(1), lsn, segment_bytes);
                let segno = lsn / segment_bytes.max(1);
                r.pending = shipped(Path::new(copy_dir))
                    .map(|f| {
                        f.keys()
                            .filter(|n| {
                                parse_segment(n, segment_bytes).is_some_and(|(_, s)| s > segno)
                            })
                            .count() as u64
                    })
                    .unwrap_or(0);
                r.segment = Some(seg);
                let still_for = {
                    let mut last = lock(&rt.restore);
                    if last.0 != Some(lsn) {
                        *last = (Some(lsn), Some(now_rfc3339()), Some(Instant::now()));
                    }
                    r.last_restore_at = last.1.clone();
                    last.2.map_or(Duration::ZERO, |t| t.elapsed())
                };
                // Replay past the end of the timeline it is on, with segments waiting and
                // no progress: it applied WAL the old principal wrote after a failover.
                if r.pending > 0 && still_for >= DIVERGED_AFTER {
                    if let Some(tli) = tli {
                        let names: Vec<String> = shipped(Path::new(copy_dir))
                            .map(|f| f.into_keys().filter(|n| n.ends_with(".history")).collect())
                            .unwrap_or_default();
                        let ends =
                            read_timeline_ends(Path::new(copy_dir), Path::new(copy_dir), &names);
                        if let Some(&end) = ends.get(&tli).filter(|&&end| lsn > end) {
                            let text = format!(
                                "replay is at {} on timeline {tli}, past {} where timeline {tli} ended (a newer principal forked off it there), and has not moved for {} s:                                  this database applied WAL an old principal wrote after a failover and can never follow the new principal.                                  Seed it again: `pchat db log-shipping configure` (then `pchat db log-shipping status` shows it catching up)",
                                format_lsn(lsn),
                                format_lsn(end),
                                still_for.as_secs()
                            );
                            s.alerts.push(format!("restore job: {text}"));
                            r.diverged = Some(text);
                        }
                    }
                }
            }
            r.replay_lsn = replay;
            // Written by the OS user's restore script: read without following a link (its
            // content goes into the status answer).
            r.rejected = pchat_tls::dir::Dir::open(Path::new(copy_dir))
                .and_then(|d| d.read(".rejected"))
                .ok()
                .flatten()
                .map(|b| {
                    String::from_utf8_lossy(&b[..b.len().min(256)])
                        .trim()
                        .to_owned()
                })
                .filter(|t| !t.is_empty());
            if let Some(f) = &r.rejected {
                s.alerts.push(format!(
                    "restore job: {copy_dir}/{f} does not match its checksum and was not applied; delete it and its .sha256 so the copy job fetches it again, then delete {copy_dir}/.rejected"
                ));
            }
            s.copy = Some(copy);
            s.restore = Some(r);
        }
    }
    s
}

/// The backup job's watchdog on a source principal: PostgreSQL's `archive_timeout` compares
/// wall-clock times, so a clock stepped back on this host stops its segment switches (and
/// with them log shipping) for as long as the step — found by the chaos suite (a +600 s
/// step undone: nothing shipped for the rest of the run). On the monotonic clock, when the
/// current segment has stayed the same for two backup intervals while WAL was written into
/// it, the agent switches it (`pg_switch_wal()`). PostgreSQL's own count stays stuck until
/// its clock passes the time it last saw, so until then segments ship every two intervals
/// (each switch logged). With a sane clock PostgreSQL switches first and this never fires.
#[derive(Default)]
struct SwitchWatch {
    /// The segment being written, the insert position when it was first seen, and when.
    seen: Option<(String, i64, Instant)>,
    /// When the database was last asked.
    asked: Option<Instant>,
}

impl SwitchWatch {
    async fn check(&mut self, inst: &Instance, interval: Duration) {
        if self.asked.is_some_and(|t| t.elapsed() < interval / 2) {
            return;
        }
        self.asked = Some(Instant::now());
        let Ok(c) = inst.connect("postgres").await else {
            self.seen = None;
            return;
        };
        let q = "SELECT CASE WHEN pg_is_in_recovery() THEN NULL \
                 ELSE pg_walfile_name(pg_current_wal_insert_lsn()) END, \
                 CASE WHEN pg_is_in_recovery() THEN NULL \
                 ELSE (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint END";
        let row = match tokio::time::timeout(Duration::from_secs(2), c.query_one(q, &[])).await {
            Ok(Ok(row)) => row,
            _ => return,
        };
        let (Ok(Some(segment)), Ok(Some(lsn))) = (
            row.try_get::<_, Option<String>>(0),
            row.try_get::<_, Option<i64>>(1),
        ) else {
            // A standby (the mirror): it archives what it receives, nothing to switch.
            self.seen = None;
            return;
        };
        match &self.seen {
            Some((s, first_lsn, since)) if *s == segment => {
                if since.elapsed() >= 2 * interval && lsn > *first_lsn {
                    let switched = tokio::time::timeout(
                        Duration::from_secs(2),
                        c.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]),
                    )
                    .await;
                    tracing::warn!(
                        segment = %segment,
                        stalled_s = since.elapsed().as_secs(),
                        ok = matches!(switched, Ok(Ok(_))),
                        "archive_timeout did not switch a written WAL segment for two backup intervals (a clock stepped back on this host?): switched it"
                    );
                    self.seen = None;
                }
            }
            _ => self.seen = Some((segment, lsn, Instant::now())),
        }
    }
}

/// The copy loop: runs the copy job every `copy_interval_s` while the role is Secondary, and
/// trims the share on a source. Ends when `stop` turns true.
pub async fn run_jobs(inst: &Instance, rt: &Runtime, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut last_trim = Instant::now() - Duration::from_secs(3600);
    let mut switch = SwitchWatch::default();
    loop {
        let wait = match load_role(inst.config()) {
            ShippingRole::Secondary {
                copy_interval_s, ..
            } => {
                if let Ok(run) = copy_once(inst, rt, false).await {
                    if let Some(e) = run.error {
                        tracing::warn!(error = %e, "log shipping copy job");
                    }
                }
                Duration::from_secs(copy_interval_s.max(1))
            }
            ShippingRole::Source {
                share_dir,
                retention_h,
                backup_interval_s,
            } => {
                switch
                    .check(inst, Duration::from_secs(backup_interval_s.max(1)))
                    .await;
                if last_trim.elapsed() > Duration::from_secs(600) {
                    last_trim = Instant::now();
                    let d = PathBuf::from(share_dir);
                    let _ =
                        tokio::task::spawn_blocking(move || cleanup_share(&d, retention_h)).await;
                }
                Duration::from_secs(1)
            }
            ShippingRole::None => Duration::from_secs(1),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1024 * 1024;

    fn files(names: &[&str]) -> BTreeMap<String, u64> {
        names.iter().map(|n| (n.to_string(), MB)).collect()
    }

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(
            parse_segment("000000010000000000000003", 16 * MB),
            Some((1, 3))
        );
        assert_eq!(
            parse_segment("000000020000000100000002", 16 * MB),
            Some((2, 256 + 2))
        );
        assert_eq!(parse_segment("00000002.history", 16 * MB), None);
        assert_eq!(
            segment_name(1, 0x300_0148, 16 * MB),
            "000000010000000000000003"
        );
        assert_eq!(
            segment_name(2, 0x1_0200_0000, 16 * MB),
            "000000020000000100000002"
        );
        assert_eq!(segment_name(1, 5 * MB + 7, MB), "000000010000000000000005");
    }

    #[test]
    fn copy_plan_is_ordered_and_stops_at_a_hole() {
        let share = files(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000006",
            "00000002.history",
            "000000010000000000000001",
        ]);
        let copied = files(&["000000010000000000000002"]);
        let p = plan_copy(&share, &copied, Some(2), MB, &BTreeMap::new());
        assert_eq!(p.hole, Some(5));
        assert_eq!(
            p.files,
            vec![
                "00000002.history",
                "000000010000000000000003",
                "000000010000000000000004"
            ]
        );
    }

    #[test]
    fn copy_plan_follows_a_new_timeline() {
        let share = files(&[
            "000000010000000000000003",
            "000000020000000000000003",
            "000000020000000000000004",
        ]);
        // Timeline 2 forked off timeline 1 inside segment 3: timeline 1's segment 3 holds
        // WAL past the fork and is never copied.
        let ends = timeline_ends(["1\t0/30A418\tno recovery target specified\n"]);
        let p = plan_copy(&share, &BTreeMap::new(), Some(3), MB, &ends);
        assert_eq!(p.hole, None);
        assert_eq!(
            p.files,
            vec!["000000020000000000000003", "000000020000000000000004"]
        );
    }

    #[test]
    fn a_segment_past_a_fork_is_never_copied_and_the_newer_one_is_awaited() {
        // seed 16 of the chaos runs: the old principal (timeline 1) archived segments A and
        // B after the mirror was promoted at 0/A01A418; the new principal's segment A is not
        // in the share yet. Copying the old A would carry the backup past the fork for good.
        let share = files(&[
            "000000010000000000000009",
            "00000002.history",
            "00000001000000000000000A",
            "00000001000000000000000B",
            "00000002000000000000000B",
        ]);
        let copied = files(&["000000010000000000000009"]);
        let ends = timeline_ends(["1\t0/A01A418\tno recovery target specified\n"]);
        let p = plan_copy(&share, &copied, Some(9), 16 * MB, &ends);
        assert_eq!(p.files, vec!["00000002.history"]);
        assert_eq!(p.hole, Some(0xA), "segment A of timeline 2 is awaited");
        // A segment that ended before the fork is not superseded; one that holds it is.
        assert!(!superseded(1, 9, &ends, 16 * MB));
        assert!(superseded(1, 0xA, &ends, 16 * MB));
        assert!(superseded(1, 0xB, &ends, 16 * MB));
        assert!(!superseded(2, 0xA, &ends, 16 * MB));
        // A fork exactly at a segment boundary leaves the segment before it whole.
        let ends = timeline_ends(["1\t0/A000000\treason\n"]);
        assert!(!superseded(1, 9, &ends, 16 * MB));
        assert!(superseded(1, 0xA, &ends, 16 * MB));
    }

    #[test]
    fn timeline_history_files_are_read_leniently() {
        let ends = timeline_ends([
            "1\t0/A01A418\tno recovery target specified\n",
            "# comment\n\n1\t0/A01A418\tx\n2\t1/2000000\tx\ngarbage\n3\tnot-an-lsn\n",
            "1\t0/900000\tan earlier fork (a restore to an earlier point)\n",
        ]);
        assert_eq!(ends.get(&1), Some(&0x90_0000));
        assert_eq!(ends.get(&2), Some(&0x1_0200_0000));
        assert_eq!(ends.get(&3), None);
    }

    #[test]
    fn directory_arguments_are_plain_absolute_paths() {
        assert!(check_dir_arg("/a/b").is_ok());
        for bad in ["rel", "/a'b", "/a$b", "/a`b"] {
            assert!(check_dir_arg(bad).is_err(), "{bad}");
        }
    }
}
