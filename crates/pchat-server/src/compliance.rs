//! The compliance adapter (Lync's compliance service and its `XmlAdapter`): reads the records
//! `mgccomp` holds, writes them to files in an output directory, and purges what was exported
//! once it is older than the retention.
//!
//! One run, exactly once whatever instant a crash hits:
//! 1. read the export state; a run that began and did not finish (`pending_to`) is done
//!    again with exactly its range; otherwise the range is the records after the watermark
//!    (at most `records_max`), recorded as pending (a compare-and-set);
//! 2. write the range's file(s), each under a temporary name, `fsync`ed, renamed to a name
//!    made of the range (so doing a range again replaces its files with the same content)
//!    and the directory `fsync`ed;
//! 3. advance the watermark to the range's end and record the run, in one transaction;
//! 4. purge exported records older than the retention, in small batches.
//!
//! Only one exporter may run per database: the state moves by compare-and-set, so a second
//! one is refused at its first step; callers also hold a lock (a file lock standalone, an
//! etcd lease in a pool) so that the second one waits instead.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pchat_room::Timestamp;
use pchat_store::{
    ComplianceKind, ComplianceRecord, ExportState, NewComplianceEvent, Store, StoreError,
    COMPLIANCE_PAGE_MAX,
};
use pchat_xmpp::element::escape_into;
use serde::{Deserialize, Serialize};

/// The XML namespace of the files (the shape of Lync's `XmlAdapter` output; see
/// `docs/operations/compliance.xsd`).
pub const XML_NS: &str = "urn:xmpp:pchat:compliance:0";
/// Records exported by one run at most, by default.
pub const RECORDS_PER_RUN_DEFAULT: u32 = 100_000;
/// Records deleted by one purge statement.
pub const PURGE_BATCH: u32 = 1_000;
/// Prefix of every file an export writes (and of its temporary files, after a dot).
const FILE_PREFIX: &str = "pchat-compliance-";
/// Environment variable that makes a run abort at a step (tests only): `begin`, `file`
/// (after the first file) or `finish` (after the last file, before the watermark moves).
pub const FAULT_ENV: &str = "PCHAT_COMPLIANCE_FAULT";

/// The output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Lync's XML: `Conversations/Conversation/Channel/Messages/Message`.
    #[default]
    LyncXml,
    /// One JSON object per line, the same fields.
    Jsonl,
}

impl Format {
    /// Parses `lync-xml` or `jsonl`.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "lync-xml" | "xml" => Some(Format::LyncXml),
            "jsonl" | "json" => Some(Format::Jsonl),
            _ => None,
        }
    }
    fn extension(self) -> &'static str {
        match self {
            Format::LyncXml => "xml",
            Format::Jsonl => "jsonl",
        }
    }
}

/// What one exporter does.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Where files go; must exist and be writable.
    pub dir: PathBuf,
    /// The format.
    pub format: Format,
    /// One file per room and run (Lync's OneChatRoomPerOutputFile), else one per run.
    pub per_room: bool,
    /// Records one run exports at most.
    pub records_max: u32,
    /// The server's domain: a sender of another domain is not `internal`.
    pub domain: String,
    /// Exported records older than this are purged after a run; `None` keeps them.
    pub retention: Option<Duration>,
    /// Who exports, as the run's record says (a server's name, or the shell).
    pub exporter: String,
}

/// What one run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    /// The first record id exported.
    pub from: i64,
    /// The last record id exported.
    pub to: i64,
    /// Records written.
    pub records: u64,
    /// Of which records of changes that never committed.
    pub uncommitted: u64,
    /// Files written (full paths).
    pub files: Vec<PathBuf>,
    /// The run finished a range an earlier, interrupted run had begun.
    pub resumed: bool,
    /// Records purged after the run.
    pub purged: u64,
    /// In a pool whose database's watermark is behind the one last published in etcd (a DR
    /// failover or a restore to an earlier point): records after the first id up to the
    /// second may have been exported before, by the lost database's exporter (duplicates
    /// are possible there, gaps are not).
    pub reexport_window: Option<(i64, i64)>,
}

/// A pool's published export watermark (`keys::compliance_exported`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Published {
    watermark: i64,
    at: String,
}

/// Pool mode, before a run: the re-export window, if the database is behind what etcd says
/// was exported.
pub async fn pool_window(
    etcd: &pchat_control::Etcd,
    pool: &str,
    store: &dyn Store,
) -> Option<(i64, i64)> {
    let kv = etcd
        .get(&pchat_control::keys::compliance_exported(pool))
        .await
        .ok()??;
    let published: Published = serde_json::from_slice(&kv.value).ok()?;
    let here = store.compliance_export_state().await.ok()?.watermark;
    (published.watermark > here).then_some((here, published.watermark))
}

/// How often the job reads the pool's settings (and wakes while it has nothing to do).
const SETTINGS_POLL: Duration = Duration::from_secs(10);

/// Pool mode: the compliance settings the pool keeps in etcd (`pchat compliance configure`),
/// when there are valid ones; `None` leaves each server's `[compliance]`.
pub async fn pool_settings(
    etcd: &pchat_control::Etcd,
    pool: &str,
) -> Option<crate::config::ComplianceConfig> {
    let kv = match etcd
        .get(&pchat_control::keys::compliance_settings(pool))
        .await
    {
        Ok(kv) => kv?,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the pool's compliance settings");
            return None;
        }
    };
    match serde_json::from_slice::<crate::config::ComplianceConfig>(&kv.value)
        .map_err(|e| e.to_string())
        .and_then(|c| c.validate().map(|()| c))
    {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "the pool's compliance settings in etcd are not usable: this server's [compliance] applies (fix them with `pchat compliance configure`)");
            None
        }
    }
}

/// Pool mode, after a run: publishes the watermark (never lowering the published one, so a
/// window stays named until the database passes it).
pub async fn pool_publish(etcd: &pchat_control::Etcd, pool: &str, watermark: i64) {
    let key = pchat_control::keys::compliance_exported(pool);
    if let Ok(Some(kv)) = etcd.get(&key).await {
        if let Ok(p) = serde_json::from_slice::<Published>(&kv.value) {
            if p.watermark >= watermark {
                return;
            }
        }
    }
    let p = Published {
        watermark,
        at: crate::datetime::format(crate::datetime::now()),
    };
    if let Ok(bytes) = serde_json::to_vec(&p) {
        if let Err(e) = etcd.put(&key, &bytes).await {
            tracing::warn!(error = %e, "cannot publish the compliance watermark in etcd");
        }
    }
}

/// Why an export could not run.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The store refused or is unreachable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The output directory is missing or not writable.
    #[error("{0}")]
    Output(String),
}

/// Runs one export (and the purge after it). `Ok(None)`: nothing new to export (the purge
/// still runs).
pub async fn run_once(
    store: &dyn Store,
    o: &ExportOptions,
) -> Result<Option<RunReport>, ExportError> {
    check_dir(&o.dir)?;
    remove_temporaries(&o.dir);
    let fault = std::env::var(FAULT_ENV).ok();
    let state = store.compliance_export_state().await?;
    let (begun, records, resumed) = match state.pending_to {
        Some(to) => {
            let records = read_range(store, state.watermark, to).await?;
            (state.clone(), records, true)
        }
        None => {
            let mut records = Vec::new();
            let mut after = state.watermark;
            while records.len() < o.records_max as usize {
                let want =
                    (o.records_max as usize - records.len()).min(COMPLIANCE_PAGE_MAX as usize);
                let page = store.compliance_after(after, want as u32).await?;
                let Some(last) = page.last() else { break };
                after = last.id;
                records.extend(page);
            }
            let Some(last) = records.last() else {
                let purged = purge(store, o).await?;
                if purged > 0 {
                    tracing::info!(purged, "compliance records past their retention purged");
                }
                return Ok(None);
            };
            let begun = ExportState {
                pending_to: Some(last.id),
                ..state.clone()
            };
            step(store, &state, &begun, None).await?;
            (begun, records, false)
        }
    };
    abort_at(&fault, "begin");
    let to = begun.pending_to.unwrap_or(begun.watermark);
    let mut report = RunReport {
        from: records.first().map_or(to, |r| r.id),
        to,
        records: records.len() as u64,
        uncommitted: records.iter().filter(|r| !r.committed).count() as u64,
        resumed,
        ..RunReport::default()
    };
    let files = render(&records, o, begun.watermark + 1, to);
    for (i, (name, content)) in files.iter().enumerate() {
        let path = o.dir.join(name);
        write_atomically(&o.dir, &path, content.as_bytes())?;
        report.files.push(path);
        if i == 0 {
            abort_at(&fault, "file");
        }
    }
    abort_at(&fault, "finish");
    let now = crate::datetime::now();
    let done = ExportState {
        watermark: to,
        pending_to: None,
        runs: begun.runs + 1,
        finished_at: Some(now),
    };
    // A run that exported only earlier runs' records is not recorded, or every run would
    // leave one more record for the next.
    let run = records
        .iter()
        .any(|r| r.event.kind != ComplianceKind::ExportRun)
        .then(|| NewComplianceEvent {
            kind: ComplianceKind::ExportRun,
            at: now,
            room: String::new(),
            actor: o.exporter.clone(),
            nick: None,
            detail: format!(
                "records {}-{} ({}) to {}",
                report.from,
                report.to,
                report.records,
                files
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    step(store, &begun, &done, run).await?;
    report.purged = purge(store, o).await?;
    Ok(Some(report))
}

/// Moves the state; a conflict that finds the state already at `to` was this very step,
/// answered after it committed (a retried call).
async fn step(
    store: &dyn Store,
    from: &ExportState,
    to: &ExportState,
    run: Option<NewComplianceEvent>,
) -> Result<(), ExportError> {
    match store.compliance_export_step(from, to, run).await {
        Ok(()) => Ok(()),
        Err(StoreError::Conflict(m)) => {
            if store.compliance_export_state().await? == *to {
                Ok(())
            } else {
                Err(StoreError::Conflict(m).into())
            }
        }
        Err(e) => Err(e.into()),
    }
}

async fn read_range(
    store: &dyn Store,
    watermark: i64,
    to: i64,
) -> Result<Vec<ComplianceRecord>, ExportError> {
    let mut records = Vec::new();
    let mut after = watermark;
    loop {
        let page = store.compliance_after(after, COMPLIANCE_PAGE_MAX).await?;
        let Some(last) = page.last().map(|r| r.id) else {
            break;
        };
        records.extend(page.into_iter().filter(|r| r.id <= to));
        if last >= to {
            break;
        }
        after = last;
    }
    Ok(records)
}

async fn purge(store: &dyn Store, o: &ExportOptions) -> Result<u64, ExportError> {
    let Some(keep) = o.retention else {
        return Ok(0);
    };
    let micros = i64::try_from(keep.as_micros()).unwrap_or(i64::MAX);
    let before = Timestamp(crate::datetime::now().0.saturating_sub(micros));
    let mut purged = 0;
    loop {
        let n = store.compliance_purge(before, PURGE_BATCH).await?;
        purged += n;
        if n < u64::from(PURGE_BATCH) {
            return Ok(purged);
        }
        // Let message commits through between batches.
        tokio::task::yield_now().await;
    }
}

fn abort_at(fault: &Option<String>, step: &str) {
    if fault.as_deref() == Some(step) {
        eprintln!("{FAULT_ENV}={step}: aborting the export here (test fault)");
        std::process::abort();
    }
}

fn check_dir(dir: &Path) -> Result<(), ExportError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ExportError::Output(format!(
                "{} is not a directory: give the directory compliance files go to",
                dir.display()
            )))
        }
        Err(e) => {
            return Err(ExportError::Output(format!(
                "the compliance output directory {} cannot be used ({e}): create it (mkdir -p) \
                 or mount the share, writable by this user",
                dir.display()
            )))
        }
    }
    Ok(())
}

/// Temporary files a crashed run left (never a finished file: those have no leading dot).
fn remove_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{FILE_PREFIX}");
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Writes `content` to `path` so that a reader sees the whole file or none: a temporary file
/// in the same directory, `fsync`, rename over `path`, `fsync` of the directory.
fn write_atomically(dir: &Path, path: &Path, content: &[u8]) -> Result<(), ExportError> {
    let out = |what: &str, e: std::io::Error| {
        ExportError::Output(format!(
            "cannot {what} in the compliance output directory {} ({e}): check that it is \
             writable by this user and has space",
            dir.display()
        ))
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| out("create a file", e))?;
    let written = f.write_all(content).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(out("write a file", e));
    }
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        out("rename a file", e)
    })?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| out("sync the directory", e))?;
    Ok(())
}

/// The files of one run: `(name, content)`, in a fixed order, the same for the same records.
fn render(
    records: &[ComplianceRecord],
    o: &ExportOptions,
    from: i64,
    to: i64,
) -> Vec<(String, String)> {
    let base = format!("{FILE_PREFIX}{from:016}-{to:016}");
    let ext = o.format.extension();
    if !o.per_room {
        return vec![(format!("{base}.{ext}"), render_one(records, o))];
    }
    let mut rooms: Vec<&str> = records.iter().map(|r| r.event.room.as_str()).collect();
    rooms.sort_unstable();
    rooms.dedup();
    rooms
        .into_iter()
        .map(|room| {
            let mine: Vec<ComplianceRecord> = records
                .iter()
                .filter(|r| r.event.room == room)
                .cloned()
                .collect();
            (
                format!("{base}-{}.{ext}", file_safe(room)),
                render_one(&mine, o),
            )
        })
        .collect()
}

/// A room JID as a file name part: letters, digits, `.`, `-`, `@` kept, anything else as
/// `_XX` (hex of its bytes), so two rooms never share a name; the service's records `_`.
fn file_safe(room: &str) -> String {
    if room.is_empty() {
        return "_service".into();
    }
    let mut s = String::new();
    for b in room.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'@') {
            s.push(b as char);
        } else {
            let _ = write!(s, "_{b:02x}");
        }
    }
    s
}

fn render_one(records: &[ComplianceRecord], o: &ExportOptions) -> String {
    match o.format {
        Format::LyncXml => xml(records, o),
        Format::Jsonl => jsonl(records, o),
    }
}

/// Lync's message type of a record (its `XmlAdapter` names where Lync had the event; pchat's
/// own events in the same style). A change that never committed is `UNCOMMITTED`, never
/// `CHAT`.
pub fn message_type(r: &ComplianceRecord) -> &'static str {
    if !r.committed {
        return "UNCOMMITTED";
    }
    match r.event.kind {
        ComplianceKind::Message => "CHAT",
        ComplianceKind::Join => "JOIN",
        ComplianceKind::Leave => "PART",
        ComplianceKind::Subject => "SUBJECT",
        ComplianceKind::RoomCreated => "ROOMCREATED",
        ComplianceKind::ConfigChange => "CONFIGCHANGE",
        ComplianceKind::AffiliationChange => "AFFILIATIONCHANGE",
        ComplianceKind::RoleChange => "ROLECHANGE",
        ComplianceKind::RoomDestroyed => "ROOMDESTROYED",
        ComplianceKind::PrivateMessage => "PRIVATECHAT",
        ComplianceKind::Invitation => "INVITATION",
        ComplianceKind::MessageRemoved => "CHATDELETION",
        ComplianceKind::HistoryCleared => "CHATPURGE",
        ComplianceKind::ExportRun => "EXPORTRUN",
        ComplianceKind::Backchat => "BACKCHAT",
        ComplianceKind::FileUpload => "FILEUPLOAD",
        ComplianceKind::FileDownload => "FILEDOWNLOAD",
        ComplianceKind::FileRemoved => "FILEDELETION",
    }
}

/// .NET ticks (100 ns since 0001-01-01) of a time, as Lync's `DateTimeUTC long`.
fn ticks(t: Timestamp) -> i64 {
    t.0.saturating_mul(10)
        .saturating_add(621_355_968_000_000_000)
}

fn internal(actor: &str, domain: &str) -> bool {
    match actor.rsplit_once('@') {
        Some((_, d)) => d.eq_ignore_ascii_case(domain),
        None => true,
    }
}

fn attr(out: &mut String, name: &str, value: &str) {
    let _ = write!(out, " {name}=\"");
    escape_into(out, value, true);
    out.push('"');
}

fn time_el(out: &mut String, name: &str, t: Timestamp) {
    let _ = write!(out, "<{name}");
    attr(out, "since1970", &t.0.div_euclid(1000).to_string());
    attr(out, "string", &crate::datetime::format(t));
    attr(out, "long", &ticks(t).to_string());
    out.push_str("/>");
}

fn xml(records: &[ComplianceRecord], o: &ExportOptions) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(out, "<Conversations xmlns=\"{XML_NS}\">");
    // One conversation per room, rooms in the order they first appear.
    let mut rooms: Vec<&str> = Vec::new();
    for r in records {
        if !rooms.contains(&r.event.room.as_str()) {
            rooms.push(&r.event.room);
        }
    }
    for room in rooms {
        let mine: Vec<&ComplianceRecord> =
            records.iter().filter(|r| r.event.room == room).collect();
        out.push_str("<Conversation>\n<Channel");
        let (uri, name) = if room.is_empty() {
            (format!("xmpp:{}", o.domain), "(service)".to_owned())
        } else {
            (
                format!("xmpp:{room}"),
                room.split('@').next().unwrap_or(room).to_owned(),
            )
        };
        attr(&mut out, "uri", &uri);
        attr(&mut out, "name", &name);
        attr(&mut out, "islogged", "true");
        out.push_str("/>\n<Messages>\n");
        for r in &mine {
            out.push_str("<Message");
            attr(&mut out, "type", message_type(r));
            attr(&mut out, "content", &r.event.detail);
            if let Some(seq) = r.message_seq {
                attr(&mut out, "id", &seq.to_string());
            }
            attr(&mut out, "record", &r.id.to_string());
            attr(&mut out, "kind", r.event.kind.as_str());
            attr(
                &mut out,
                "committed",
                if r.committed { "true" } else { "false" },
            );
            out.push_str("><Sender");
            let user = r.event.nick.as_deref().unwrap_or(&r.event.actor);
            attr(&mut out, "UserName", user);
            attr(&mut out, "id", &r.event.actor);
            attr(
                &mut out,
                "internal",
                if internal(&r.event.actor, &o.domain) {
                    "true"
                } else {
                    "false"
                },
            );
            attr(&mut out, "uri", &format!("xmpp:{}", r.event.actor));
            out.push_str("/>");
            time_el(&mut out, "DateTimeUTC", r.event.at);
            out.push_str("</Message>\n");
        }
        out.push_str("</Messages>\n");
        let first = mine.iter().map(|r| r.event.at).min().unwrap_or_default();
        let last = mine.iter().map(|r| r.event.at).max().unwrap_or_default();
        time_el(&mut out, "StartTimeUTC", first);
        time_el(&mut out, "EndTimeUTC", last);
        out.push_str("\n</Conversation>\n");
    }
    out.push_str("</Conversations>\n");
    out
}

/// One exported record as a JSON line.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JsonRecord {
    /// The record's id in `mgccomp`.
    pub record: i64,
    /// Lync's message type ([`message_type`]).
    #[serde(rename = "type")]
    pub kind_lync: String,
    /// pchat's event kind.
    pub kind: String,
    /// Whether the change committed.
    pub committed: bool,
    /// Room JID (empty for the service).
    pub room: String,
    /// Who (bare JID).
    pub sender: String,
    /// Their nick in the room.
    pub nick: Option<String>,
    /// Whether the sender is of this server's domain.
    pub internal: bool,
    /// The message body, file name or change.
    pub content: String,
    /// The archived message's id, for messages.
    pub message_id: Option<i64>,
    /// When, ISO 8601.
    pub time_utc: String,
    /// When, milliseconds since 1970.
    pub since1970: i64,
}

fn jsonl(records: &[ComplianceRecord], o: &ExportOptions) -> String {
    let mut out = String::new();
    for r in records {
        let line = JsonRecord {
            record: r.id,
            kind_lync: message_type(r).to_owned(),
            kind: r.event.kind.as_str().to_owned(),
            committed: r.committed,
            room: r.event.room.clone(),
            sender: r.event.actor.clone(),
            nick: r.event.nick.clone(),
            internal: internal(&r.event.actor, &o.domain),
            content: r.event.detail.clone(),
            message_id: r.message_seq,
            time_utc: crate::datetime::format(r.event.at),
            since1970: r.event.at.0.div_euclid(1000),
        };
        if let Ok(s) = serde_json::to_string(&line) {
            out.push_str(&s);
            out.push('\n');
        }
    }
    out
}

/// How long an exporter waits between two tries of a lock another exporter holds.
const LOCK_RETRY: Duration = Duration::from_millis(500);
/// The etcd lease of the pool's exporter lock, in seconds (renewed every third of it).
const LEASE_TTL_S: u64 = 15;

/// The right to export, held for one run (or more); released when dropped (a file lock) or
/// by [`ExporterLock::release`] (the etcd lease; it also expires on its own).
pub enum ExporterLock {
    /// Standalone: an exclusive lock on a file in the data directory.
    File(std::fs::File),
    /// A pool: a key under this exporter's etcd lease, renewed by a task.
    Etcd {
        /// The client.
        etcd: pchat_control::Etcd,
        /// The lease.
        lease: i64,
        /// Renews the lease.
        renew: tokio::task::JoinHandle<()>,
    },
}

impl ExporterLock {
    /// Takes the standalone lock (`compliance-export.lock` in the data directory), waiting
    /// while another exporter holds it; `waiting` is called once if it must wait.
    pub async fn file(
        data_dir: &Path,
        waiting: impl FnOnce(),
    ) -> Result<ExporterLock, ExportError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        /// `O_NOFOLLOW` on Linux: a link planted in the data directory is never followed
        /// (the shell may run as root beside a server running as its own user).
        const O_NOFOLLOW: i32 = 0o400000;
        let path = data_dir.join("compliance-export.lock");
        // Read-only is enough for a lock, and works whichever of the server's user and the
        // shell's created the file; whoever comes first creates it, readable by both.
        let open = |create: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).custom_flags(O_NOFOLLOW);
            if create {
                o.write(true).create_new(true).mode(0o644);
            }
            o.open(&path)
        };
        let f = match open(false) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match open(true) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => open(false),
                r => r,
            },
            r => r,
        }
        .map_err(|e| {
            ExportError::Output(format!(
                "cannot open the exporters' lock {} ({e}): it must be a plain file",
                path.display()
            ))
        })?;
        let mut waiting = Some(waiting);
        loop {
            match f.try_lock() {
                Ok(()) => return Ok(ExporterLock::File(f)),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if let Some(w) = waiting.take() {
                        w();
                    }
                    tokio::time::sleep(LOCK_RETRY).await;
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(ExportError::Output(format!(
                        "cannot lock {}: {e}",
                        path.display()
                    )))
                }
            }
        }
    }

    /// Takes the pool's lock (an etcd key under a lease), waiting while another exporter
    /// holds it; `waiting` is called once if it must wait.
    pub async fn etcd(
        etcd: &pchat_control::Etcd,
        pool: &str,
        holder: &str,
        waiting: impl FnOnce(),
    ) -> Result<ExporterLock, ExportError> {
        let key = pchat_control::keys::compliance_exporter(pool);
        let etcd_err = |e: pchat_control::EtcdError| {
            ExportError::Output(format!("the pool's exporter lock in etcd: {e}"))
        };
        let mut waiting = Some(waiting);
        loop {
            let lease = etcd.lease_grant(LEASE_TTL_S).await.map_err(etcd_err)?;
            match etcd
                .put_if_absent(&key, holder.as_bytes(), Some(lease))
                .await
                .map_err(etcd_err)?
            {
                Some(_) => {
                    let (e2, renew_every) = (etcd.clone(), Duration::from_secs(LEASE_TTL_S / 3));
                    let renew = tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(renew_every).await;
                            if let Ok(None) = e2.lease_keepalive(lease).await {
                                tracing::warn!("the compliance exporter's etcd lease ended");
                                return;
                            }
                        }
                    });
                    return Ok(ExporterLock::Etcd {
                        etcd: etcd.clone(),
                        lease,
                        renew,
                    });
                }
                None => {
                    let _ = etcd.lease_revoke(lease).await;
                    if let Some(w) = waiting.take() {
                        w();
                    }
                    tokio::time::sleep(LOCK_RETRY).await;
                }
            }
        }
    }

    /// Gives the lock back now.
    pub async fn release(self) {
        match self {
            ExporterLock::File(f) => drop(f),
            ExporterLock::Etcd { etcd, lease, renew } => {
                renew.abort();
                let _ = etcd.lease_revoke(lease).await;
            }
        }
    }
}

/// The export job `[compliance]` configures — in a pool, the pool's settings in etcd when it
/// has some (`pchat compliance configure`, read every few seconds, so a change needs no
/// restart): every `run_interval_s`, while this server serves (an idle pool server holds no
/// store), take the lock, run, give it back. Ends with the server.
pub async fn job(
    state: std::sync::Arc<crate::state::State>,
    data_dir: PathBuf,
    pool: Option<(pchat_control::Etcd, String, String)>,
) {
    let mut shutdown = state.shutdown.subscribe();
    let mut failing = false;
    let mut last_run: Option<std::time::Instant> = None;
    let mut settings = state.config.compliance.clone();
    loop {
        // Awake often enough to follow a change of the pool's settings.
        let tick = if settings.enabled() {
            Duration::from_secs(settings.run_interval_s).min(SETTINGS_POLL)
        } else {
            SETTINGS_POLL
        };
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.recv() => return,
        }
        settings = match &pool {
            Some((etcd, name, _)) => pool_settings(etcd, name)
                .await
                .unwrap_or_else(|| state.config.compliance.clone()),
            None => state.config.compliance.clone(),
        };
        let every = Duration::from_secs(settings.run_interval_s);
        if !settings.enabled() || last_run.is_some_and(|t| t.elapsed() < every) {
            continue;
        }
        let Some(serving) = state.serving() else {
            continue;
        };
        last_run = Some(std::time::Instant::now());
        let c = &settings;
        let options = ExportOptions {
            dir: c.export_dir.clone(),
            format: Format::parse(&c.format).unwrap_or_default(),
            per_room: c.one_room_per_file,
            records_max: c.records_per_run,
            domain: state.config.domain.clone(),
            retention: Some(Duration::from_secs(c.retention_h.saturating_mul(3600))),
            exporter: match &pool {
                Some((_, _, server)) => format!("server {server}"),
                None => "server".into(),
            },
        };
        let lock = match &pool {
            Some((etcd, name, server)) => {
                ExporterLock::etcd(etcd, name, server, || {
                    tracing::info!("another server exports compliance records: waiting")
                })
                .await
            }
            None => {
                ExporterLock::file(&data_dir, || {
                    tracing::info!("another exporter (the shell?) runs: waiting")
                })
                .await
            }
        };
        let lock = match lock {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the compliance exporter's lock");
                continue;
            }
        };
        let window = match &pool {
            Some((etcd, name, _)) => pool_window(etcd, name, &*serving.store).await,
            None => None,
        };
        match run_once(&*serving.store, &options).await {
            Ok(Some(mut r)) => {
                failing = false;
                r.reexport_window = window;
                if let Some((from, to)) = window {
                    tracing::warn!(
                        from,
                        to,
                        "the database's export watermark is behind the pool's (a failover or restore): records {from}-{to} may be exported a second time"
                    );
                }
                if let Some((etcd, name, _)) = &pool {
                    pool_publish(etcd, name, r.to).await;
                }
                tracing::info!(
                    from = r.from,
                    to = r.to,
                    records = r.records,
                    files = r.files.len(),
                    purged = r.purged,
                    resumed = r.resumed,
                    "compliance records exported"
                );
            }
            Ok(None) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "the compliance export failed; it is tried again every run_interval_s");
                }
                failing = true;
            }
        }
        lock.release().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        id: i64,
        kind: ComplianceKind,
        room: &str,
        detail: &str,
        committed: bool,
    ) -> ComplianceRecord {
        ComplianceRecord {
            id,
            event: NewComplianceEvent {
                kind,
                at: Timestamp(1_700_000_000_000_000 + id),
                room: room.into(),
                actor: "ann@localhost".into(),
                nick: Some("ann".into()),
                detail: detail.into(),
            },
            message_seq: (kind == ComplianceKind::Message).then_some(id),
            committed,
        }
    }

    fn opts(per_room: bool, format: Format) -> ExportOptions {
        ExportOptions {
            dir: PathBuf::from("/nonexistent"),
            format,
            per_room,
            records_max: 10,
            domain: "localhost".into(),
            retention: None,
            exporter: "test".into(),
        }
    }

    #[test]
    fn files_are_named_by_range_and_room_and_are_the_same_every_time() {
        let records = vec![
            rec(3, ComplianceKind::Join, "a@conference.localhost", "", true),
            rec(
                4,
                ComplianceKind::Message,
                "b/x@conference.localhost",
                "hi <&>",
                true,
            ),
            rec(
                5,
                ComplianceKind::Message,
                "a@conference.localhost",
                "lost",
                false,
            ),
        ];
        let one = render(&records, &opts(false, Format::LyncXml), 3, 5);
        assert_eq!(one.len(), 1);
        assert_eq!(
            one[0].0,
            "pchat-compliance-0000000000000003-0000000000000005.xml"
        );
        assert_eq!(one, render(&records, &opts(false, Format::LyncXml), 3, 5));
        assert!(
            one[0].1.contains("content=\"hi &lt;&amp;&gt;\""),
            "{}",
            one[0].1
        );
        assert!(one[0].1.contains("type=\"UNCOMMITTED\""), "{}", one[0].1);
        let per = render(&records, &opts(true, Format::Jsonl), 3, 5);
        let names: Vec<&str> = per.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "pchat-compliance-0000000000000003-0000000000000005-a@conference.localhost.jsonl",
                "pchat-compliance-0000000000000003-0000000000000005-b_2fx@conference.localhost.jsonl"
            ]
        );
        let lines: Vec<JsonRecord> = per[0]
            .1
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            (lines[1].kind_lync.as_str(), lines[1].committed),
            ("UNCOMMITTED", false)
        );
    }

    #[test]
    fn ticks_are_dotnet_ticks() {
        assert_eq!(ticks(Timestamp(0)), 621_355_968_000_000_000);
        assert_eq!(ticks(Timestamp(1)), 621_355_968_000_000_010);
    }
}
