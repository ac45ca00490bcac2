//! The one PostgreSQL instance an agent owns: `initdb`, `pg_ctl`, `pg_basebackup` and
//! `pg_controldata` run as the configured OS user (PostgreSQL refuses to run as root, and the
//! files must stay that user's), and status is read over the unix socket.
//!
//! Settings that differ per host (port, listen addresses, socket directory, TLS files) are
//! given on `postgres`'s command line at every start, never written into the data directory:
//! a clone or a backup copies the data directory from another host, and must not bring that
//! host's settings along. After every clone and restore the agent writes `postgresql.conf`,
//! `pg_hba.conf` and `pg_ident.conf` anew and keeps only its own settings in
//! `postgresql.auto.conf` (`primary_conninfo`, `primary_slot_name`; log shipping's are
//! re-applied at start), so no command another host set there (`archive_cleanup_command`,
//! `restore_command`, …) ever runs here. Access is the agent's at every start (`conf`).
//!
//! Security of the files: the agent runs as root, and the data directory, its copies and the
//! backup sets being written belong to `postgres`. Every write into them goes through a
//! [`Dir`] opened without following links (fresh name with `O_EXCL | O_NOFOLLOW`, owner and
//! mode set on the descriptor, rename), every read of a file there refuses a link, so
//! `postgres` cannot make root write or read a file of its choosing. The instance's TLS
//! identity and its replication password live in `DATA.private/` (owned by `postgres`,
//! 0700), beside the data directory and never inside it: clones and backups do not carry
//! them to other hosts.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;
use tokio::process::Command;

use pchat_agent_api::backup::{BackupKind, Manifest};
use pchat_agent_api::shipping::BackupJob;
use pchat_agent_api::{
    self as api, format_lsn, parse_lsn, BackupRequest, CloneRequest, Fence, InstallRequest,
    Mirroring, MirroringState, RestoreRequest, Role, Status,
};
use pchat_control::postgres::PgRole;
use pchat_control::{keys, Etcd, EtcdAccess, OwnIdentity, Who};
use pchat_procedures::backup::{self, Progress};
use pchat_tls::dir::Dir;

use crate::conf;
use crate::config::{valid_name, AgentConfig};
use crate::shipping_conf;
use crate::AgentError;

/// `pg_ctl -t`: starting may replay a lot of WAL after a crash, stopping writes a checkpoint.
const PG_CTL_TIMEOUT_S: u32 = 300;
/// How long a start retries while a killed server's processes are still being reaped (the
/// new postmaster refuses the lock file until the old pid is gone).
const START_RETRY: Duration = Duration::from_secs(20);
/// Bound on one administrative statement of a job (ALTER SYSTEM, a slot, a role): quick on
/// a healthy server, and a hung one must not keep the agent's one job slot (and so every
/// later job, a failover's among them) for as long as it hangs.
const ADMIN_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The health probe: read-only and answered from shared memory, so a hung server is the
/// only reason it gets no answer. On a principal it also returns the WAL flush position and
/// how many client sessions wait on a write (WAL or data file, or the locks of a WAL
/// write): sessions that keep waiting while the flush position stands still are a storage
/// stall, which `SELECT 1` alone would never see. A checkpoint's or the WAL writer's own
/// fsync is not counted (slow but harmless while no session waits on it), nor a query's
/// temporary files (`BufFileWrite`: a big sort on a slow disk is not a stall). On a standby
/// both are NULL.
const PROBE_QUERY: &str = "SELECT CASE WHEN pg_is_in_recovery() THEN NULL \
     ELSE pg_current_wal_flush_lsn()::text END, \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE (SELECT count(*) FROM pg_stat_activity \
       WHERE backend_type = 'client backend' \
       AND ((wait_event_type = 'IO' AND wait_event IN ('WALWrite', 'WALSync', 'WALInitWrite', \
             'WALInitSync', 'DataFileWrite', 'DataFileExtend', 'DataFileFlush', 'DataFileSync', \
             'DataFileImmediateSync', 'SLRUWrite', 'SLRUSync', 'SLRUFlushSync')) \
         OR (wait_event_type = 'LWLock' AND wait_event IN ('WALWrite', 'WALInsert'))))::text END";
/// A principal's data directory (or a `pg_wal` mounted apart) with less space than this
/// available to PostgreSQL is full: it fails a commit as soon as a table or index needs a new
/// page (`could not extend file … No space left on device`) while it still answers reads, so
/// neither the probe's silence nor a stall sees it.
pub const DISK_FULL_BELOW: u64 = 1 << 20;
/// Enough of a tool's stderr or the server log to explain a failure.
const TAIL_BYTES: usize = 4 * 1024;

/// Callback for a job's progress: step and percent.
pub type ProgressSink<'a> = &'a mut (dyn FnMut(&str, Option<u8>) + Send);

/// A local PostgreSQL instance, as its agent sees it.
#[derive(Debug)]
pub struct Instance {
    cfg: AgentConfig,
    uid: u32,
    gid: u32,
    /// The agent already runs as the OS user: no `runuser`.
    as_self: bool,
    etcd: Option<Etcd>,
    /// The instance's identity (`tls_dir`); `None` in an insecure pool.
    identity: Option<pchat_tls::Identity>,
    /// Since when the running PostgreSQL has answered nothing (health probes and status
    /// queries that ran out of time or failed); `None` while it answers.
    silent_since: std::sync::Mutex<Option<Instant>>,
    /// A principal's writes that make no progress: since when every probe has seen client
    /// sessions waiting on a WAL or data-file write while the WAL flush position stood still
    /// (at that position); `None` while writes flow or nobody writes. See
    /// [`Instance::stalled_for`].
    stalled_since: std::sync::Mutex<Option<(Instant, String)>>,
    /// Since when a principal's data directory (or `pg_wal`) has had less than
    /// [`DISK_FULL_BELOW`] available, with the least it had; `None` otherwise.
    full_since: std::sync::Mutex<Option<(Instant, u64)>>,
    /// Bytes available under the data directory (the least of its filesystems) at the last
    /// probe; `u64::MAX` before the first.
    space_available: std::sync::atomic::AtomicU64,
    /// The last status taken, what the API answers when PostgreSQL is too slow to say.
    last_status: std::sync::Mutex<Option<Status>>,
    /// PostgreSQL was stopped by this agent (an API stop, a fence, a restore) and not started
    /// since: it stays down. Cleared by a start. See [`Instance::died_on_its_own`].
    stopped_on_purpose: std::sync::atomic::AtomicBool,
}

/// A poisoned lock holds plain data: keep using it.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A directory the OS user owns, opened without following links (see the module docs).
fn pg_dir(path: &Path) -> Result<Dir, AgentError> {
    Dir::open(path).map_err(AgentError::from)
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let context = context.into();
    move |source| AgentError::Io { context, source }
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
}

fn id_of(args: &[&str]) -> Result<u32, AgentError> {
    let out = std::process::Command::new("id")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io("running `id`"))?;
    if !out.status.success() {
        return Err(AgentError::Config(format!(
            "`id {}` failed: {} (does the OS user exist? the postgresql package creates `postgres`)",
            args.join(" "),
            tail(&out.stderr)
        )));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| AgentError::Config(format!("`id {}` printed no number", args.join(" "))))
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Whether a directory is missing or has no entries.
pub(crate) fn dir_is_empty(path: &Path) -> Result<bool, AgentError> {
    match std::fs::read_dir(path) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(AgentError::Io {
            context: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

/// `application_name`s listed in `synchronous_standby_names` (`a`, `"a", b`, `FIRST 1 (a)`,
/// `ANY 1 (a, b)`).
pub(crate) fn sync_standby_names(setting: &str) -> Vec<String> {
    let s = setting.trim();
    let inner = match (s.find('('), s.rfind(')')) {
        (Some(a), Some(b)) if a < b => &s[a + 1..b],
        _ => s,
    };
    inner
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

/// One row of `pg_stat_replication`, as the principal sees a standby.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SenderRow {
    pub application_name: String,
    pub state: String,
    pub sync_state: String,
    /// WAL written here and not yet flushed by the standby.
    pub unflushed_bytes: Option<i64>,
    pub flush_lag_s: f64,
}

/// The mirroring state on a principal: its mirror is the (first) standby every commit waits
/// for; the state follows from that standby's `pg_stat_replication` row.
pub(crate) fn principal_mirroring(sync_names: &str, rows: &[SenderRow]) -> Mirroring {
    let names = sync_standby_names(sync_names);
    let Some(partner) = names.first() else {
        return Mirroring {
            synchronous_standby_names: Some(sync_names.to_owned()),
            ..Mirroring::none()
        };
    };
    let row = rows.iter().find(|r| &r.application_name == partner);
    let state = match row {
        None => MirroringState::Disconnected,
        Some(r) => match (r.state.as_str(), r.sync_state.as_str()) {
            ("streaming", "sync" | "quorum") => MirroringState::Synchronized,
            ("stopping", _) => MirroringState::Disconnected,
            _ => MirroringState::Synchronizing,
        },
    };
    Mirroring {
        state,
        partner: Some(partner.clone()),
        detail: row.map(|r| format!("{} {}", r.state, r.sync_state)),
        lag_bytes: row
            .and_then(|r| r.unflushed_bytes)
            .map_or(0, |b| b.max(0) as u64),
        lag_seconds: row.map_or(0.0, |r| r.flush_lag_s),
        synchronous_standby_names: Some(sync_names.to_owned()),
    }
}

/// `pg_stat_wal_receiver`, as a mirror sees its principal.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ReceiverRow {
    pub status: String,
    pub flushed_lsn: Option<u64>,
    /// The end of WAL the principal last reported.
    pub latest_end_lsn: Option<u64>,
    pub sender: String,
}

/// The mirroring state on a mirror: caught up with what the principal last reported, or not.
pub(crate) fn mirror_mirroring(
    receiver: Option<&ReceiverRow>,
    replay_paused: bool,
    redo_bytes: u64,
    redo_seconds: f64,
) -> Mirroring {
    let state = match receiver {
        _ if replay_paused => MirroringState::Suspended,
        None => MirroringState::Disconnected,
        Some(r) => match r.status.as_str() {
            "streaming" => match (r.flushed_lsn, r.latest_end_lsn) {
                // No end reported yet (NULL until the principal's first message after
                // connecting) means nothing newer was written there.
                (Some(f), e) if e.is_none_or(|e| f >= e) => MirroringState::Synchronized,
                _ => MirroringState::Synchronizing,
            },
            "starting" | "catchup" => MirroringState::Synchronizing,
            _ => MirroringState::Disconnected,
        },
    };
    Mirroring {
        state,
        partner: receiver.map(|r| r.sender.clone()),
        detail: receiver.map(|r| r.status.clone()),
        lag_bytes: redo_bytes,
        lag_seconds: if redo_bytes > 0 { redo_seconds } else { 0.0 },
        synchronous_standby_names: None,
    }
}

/// What `pg_controldata` says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ControlData {
    pub system_identifier: Option<String>,
    pub cluster_state: Option<String>,
    pub checkpoint_lsn: Option<String>,
    pub timeline: Option<u32>,
    pub segment_bytes: Option<u64>,
}

pub(crate) fn parse_controldata(text: &str) -> ControlData {
    let mut c = ControlData::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim().to_owned();
        match k.trim() {
            "Database system identifier" => c.system_identifier = Some(v),
            "Database cluster state" => c.cluster_state = Some(v),
            "Latest checkpoint location" => c.checkpoint_lsn = Some(v),
            "Latest checkpoint's TimeLineID" => c.timeline = v.parse().ok(),
            "Bytes per WAL segment" => c.segment_bytes = v.parse().ok(),
            _ => {}
        }
    }
    c
}

/// Sets or removes `key = 'value'` lines of a PostgreSQL configuration file (the agent's
/// edits of `postgresql.auto.conf`, made while the server is stopped).
pub(crate) fn edit_conf(text: &str, set: &[(&str, Option<&str>)]) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        if set.iter().any(|(k, _)| *k == key) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    for (k, v) in set {
        if let Some(v) = v {
            out.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        }
    }
    out
}

/// The agent's etcd client: over TLS as its own user `agent-NAME` with its identity, or in
/// plaintext when the configuration says `insecure = true`. An identity of another instance
/// or pool is refused at start.
fn etcd_client(cfg: &AgentConfig) -> Result<Etcd, AgentError> {
    if let Some(dir) = &cfg.tls_dir {
        let me = OwnIdentity::load(dir).map_err(|e| AgentError::Config(e.to_string()))?;
        let mine = Who::Instance(cfg.instance.clone());
        if me.who != mine || me.pool != cfg.pool {
            return Err(AgentError::Config(format!(
                "tls_dir {} holds the identity of {} of pool {}, not of {mine} of pool {}",
                dir.display(),
                me.who,
                me.pool,
                cfg.pool
            )));
        }
    }
    EtcdAccess {
        endpoints: cfg.etcd.clone(),
        tls_dir: cfg.tls_dir.clone(),
        hint: "`tls_dir` in the agent's configuration, the instance's identity PKI/instances/NAME",
    }
    .connect(Some(&cfg.pool))
    .map_err(|e| AgentError::Config(e.to_string()))
}

impl Instance {
    /// The instance of `cfg`. Resolves the OS user now, so a wrong user fails at start-up.
    pub fn new(cfg: AgentConfig) -> Result<Instance, AgentError> {
        let uid = id_of(&["-u", &cfg.os_user])?;
        let gid = id_of(&["-g", &cfg.os_user])?;
        let me = id_of(&["-u"])?;
        if me != 0 && me != uid {
            return Err(AgentError::Config(format!(
                "the agent runs as uid {me}: run it as root (it switches to `{}` with runuser) or as `{}` itself",
                cfg.os_user, cfg.os_user
            )));
        }
        check_parent(&cfg.data_dir, me)?;
        let etcd = if cfg.etcd.is_empty() {
            None
        } else {
            Some(etcd_client(&cfg)?)
        };
        let identity = match &cfg.tls_dir {
            Some(dir) => Some(pchat_tls::Identity::load(dir).map_err(|e| {
                AgentError::Config(format!(
                    "tls_dir: {e} (`pchat pki issue` makes instances/{})",
                    cfg.instance
                ))
            })?),
            None => None,
        };
        Ok(Instance {
            uid,
            gid,
            as_self: me == uid,
            etcd,
            identity,
            cfg,
            silent_since: std::sync::Mutex::new(None),
            stalled_since: std::sync::Mutex::new(None),
            full_since: std::sync::Mutex::new(None),
            space_available: std::sync::atomic::AtomicU64::new(u64::MAX),
            last_status: std::sync::Mutex::new(None),
            stopped_on_purpose: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Bound on one status query or health probe (`postgres_query_timeout_ms`).
    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.postgres_query_timeout_ms)
    }

    /// How long the running PostgreSQL has answered nothing or, answering, has completed
    /// no write its sessions wait for ([`Instance::stalled_for`]): either way every commit
    /// of the pool waits on it. `None` while it answers and writes (or when it is not
    /// running: that is a different fault, seen by [`Instance::is_running`]).
    pub fn silent_for(&self) -> Option<Duration> {
        let silent = lock(&self.silent_since).map(|t| t.elapsed());
        match (silent, self.stalled_for()) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// How long a principal's storage has stalled: its client sessions wait on WAL or
    /// data-file writes and the WAL flush position has not moved, at every probe for at
    /// least a query timeout (a frozen or failed disk, a filesystem frozen for a snapshot, a
    /// network volume cut off). `SELECT 1` still answers from memory then, so the silence
    /// of the probe alone would never see it. `None` while writes flow, nobody writes, or
    /// the instance is a standby.
    pub fn stalled_for(&self) -> Option<Duration> {
        lock(&self.stalled_since)
            .as_ref()
            .map(|(t, _)| t.elapsed())
            .filter(|d| *d >= self.query_timeout())
    }

    /// Takes in what a probe saw of the writes: the WAL flush position (`None` on a
    /// standby) and how many client sessions wait on a write.
    fn saw_writes(&self, flush_lsn: Option<&str>, waiting: u64) {
        let mut stalled = lock(&self.stalled_since);
        match flush_lsn {
            Some(lsn) if waiting > 0 => {
                if stalled.as_ref().is_none_or(|(_, at)| at != lsn) {
                    *stalled = Some((Instant::now(), lsn.to_owned()));
                }
            }
            _ => *stalled = None,
        }
    }

    /// Bytes available under the data directory at the last probe (the least of its
    /// filesystems, `pg_wal`'s included); `None` before the first.
    pub fn space_available(&self) -> Option<u64> {
        Some(
            self.space_available
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .filter(|b| *b != u64::MAX)
    }

    /// How long a principal's disk has been full ([`DISK_FULL_BELOW`]) and the space it
    /// had at the last look; `None` while it has room or the instance is not a principal.
    pub fn disk_full_for(&self) -> Option<(Duration, u64)> {
        lock(&self.full_since).map(|(t, avail)| (t.elapsed(), avail))
    }

    /// Looks at the space the instance has left (a principal's full disk is timed): the data
    /// directory's filesystem and, when `pg_wal` is a directory of its own (a mount point),
    /// that one's; a `pg_wal` that is a link is not followed. Bounded like a query: a
    /// filesystem that hangs says nothing.
    async fn saw_space(&self, principal: bool) {
        if !principal {
            *lock(&self.full_since) = None;
        }
        let data = self.cfg.data_dir.clone();
        let look = tokio::task::spawn_blocking(move || {
            let mut dirs = vec![data.clone()];
            let wal = data.join("pg_wal");
            if std::fs::symlink_metadata(&wal).is_ok_and(|m| m.is_dir()) {
                dirs.push(wal);
            }
            dirs.iter()
                .filter_map(|d| nix::sys::statvfs::statvfs(d).ok())
                .map(|st| st.blocks_available() * st.fragment_size())
                .min()
        });
        let Ok(Ok(Some(avail))) = tokio::time::timeout(self.query_timeout(), look).await else {
            return;
        };
        self.space_available
            .store(avail, std::sync::atomic::Ordering::Relaxed);
        if !principal {
            return;
        }
        let mut full = lock(&self.full_since);
        if avail < DISK_FULL_BELOW {
            let since = full.map_or_else(Instant::now, |(t, _)| t);
            *full = Some((since, avail));
        } else {
            *full = None;
        }
    }

    fn answered(&self) {
        *lock(&self.silent_since) = None;
    }

    /// A query started at `asked` got no answer in time.
    fn unanswered(&self, asked: Instant) {
        lock(&self.silent_since).get_or_insert(asked);
    }

    /// One health probe on `conn` (opened, or opened again after a failure, over the unix
    /// socket), within the query timeout: a read-only query answered from memory
    /// ([`PROBE_QUERY`]). Keeps [`Instance::silent_for`] up to date: only a probe that gets
    /// no answer in time counts as silence. A refusal is an answer (a server starting up,
    /// shutting down or out of connections is not hung, and a stopped one is the leader
    /// loop's other case). An answer also says whether a principal's writes progress
    /// ([`Instance::stalled_for`]). Returns whether PostgreSQL answered.
    pub async fn probe(&self, conn: &mut Option<tokio_postgres::Client>) -> bool {
        if !self.is_running().await {
            *conn = None;
            self.answered();
            self.saw_writes(None, 0);
            self.saw_space(false).await;
            return false;
        }
        let asked = Instant::now();
        let ask = async {
            if conn.as_ref().is_none_or(|c| c.is_closed()) {
                *conn = Some(self.connect_unbounded("postgres").await?);
            }
            let Some(c) = conn.as_ref() else {
                return Err(AgentError::Postgres("no session".into()));
            };
            let rows = c
                .simple_query(PROBE_QUERY)
                .await
                .map_err(|e| AgentError::Postgres(e.to_string()))?;
            let row = rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            });
            let lsn = row.and_then(|r| r.get(0)).map(str::to_owned);
            let waiting = row
                .and_then(|r| r.get(1))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Ok((lsn, waiting))
        };
        match tokio::time::timeout(self.query_timeout(), ask).await {
            Ok(Ok((lsn, waiting))) => {
                self.answered();
                self.saw_space(lsn.is_some()).await;
                self.saw_writes(lsn.as_deref(), waiting);
                true
            }
            Ok(Err(_)) => {
                *conn = None;
                self.answered();
                false
            }
            Err(_) => {
                // A session left waiting for an answer would only queue the next probe.
                *conn = None;
                self.unanswered(asked);
                false
            }
        }
    }

    /// `fut` within the query timeout; `None` when it fails or runs out of time.
    async fn bounded<T>(&self, fut: impl std::future::Future<Output = Option<T>>) -> Option<T> {
        tokio::time::timeout(self.query_timeout(), fut)
            .await
            .ok()
            .flatten()
    }

    /// An administrative statement of a job, bounded (see [`ADMIN_STATEMENT_TIMEOUT`]).
    async fn admin<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, AgentError>>,
    ) -> Result<T, AgentError> {
        tokio::time::timeout(ADMIN_STATEMENT_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| {
                Err(AgentError::Postgres(format!(
                    "{what}: PostgreSQL did not answer within {ADMIN_STATEMENT_TIMEOUT:?}"
                )))
            })
    }

    /// The OS user's `(uid, gid)`: the owner of everything the agent writes for PostgreSQL.
    pub(crate) fn owner(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// Whether PostgreSQL serves TLS (the agent has an identity).
    pub fn tls(&self) -> bool {
        self.identity.is_some()
    }

    /// The instance's private directory beside the data directory (`DATA.private`, owned by
    /// the OS user, 0700): its certificate and key for PostgreSQL, the pool's CA, the
    /// replication role's passfile. Never inside the data directory, so clones and backups
    /// never carry them to another host.
    pub fn private_dir(&self) -> PathBuf {
        sibling(&self.cfg.data_dir, ".private")
    }

    /// A TLS connector that verifies another instance of the pool by its name (`None`
    /// without an identity).
    pub(crate) fn tls_connector(
        &self,
    ) -> Result<Option<pchat_tls::postgres::MakeRustlsConnect>, AgentError> {
        match &self.identity {
            Some(id) => {
                let config = id
                    .client_config(pchat_tls::PeerName::Dialled)
                    .map_err(AgentError::from)?;
                Ok(Some(pchat_tls::postgres::MakeRustlsConnect::new(config)))
            }
            None => Ok(None),
        }
    }

    /// Copies the identity into the private directory (as the OS user's files, the key
    /// 0600: PostgreSQL refuses a key others can read) and, when etcd has one, the
    /// replication password into its passfile. At every start, so a renewed certificate or a
    /// rotated password is picked up.
    async fn install_private(&self) -> Result<(), AgentError> {
        let dir = Dir::create(&self.private_dir(), 0o700, Some(self.owner()))?;
        if let Some(id) = &self.identity {
            let (cert, _) = pchat_tls::fs::read_nofollow(&id.cert_path())?;
            let key = pchat_tls::fs::read_private(&id.key_path())?;
            let (ca, _) = pchat_tls::fs::read_nofollow(&id.ca_path())?;
            dir.write(conf::SERVER_CERT, &cert, 0o644, Some(self.owner()))?;
            dir.write(conf::SERVER_KEY, &key, 0o600, Some(self.owner()))?;
            dir.write(conf::CA_CERT, &ca, 0o644, Some(self.owner()))?;
        }
        match self.refresh_replication_password().await {
            Ok(_) => {}
            // A standby keeps streaming with the passfile it has; the next refresh fixes it.
            Err(e) => tracing::warn!(error = %e, "cannot read the replication password from etcd"),
        }
        Ok(())
    }

    /// Writes the replication role's password from etcd into the passfile. `false`: etcd
    /// has none yet (no mirror was ever added) or there is no control plane.
    pub async fn refresh_replication_password(&self) -> Result<bool, AgentError> {
        let Some(etcd) = &self.etcd else {
            return Ok(false);
        };
        let Some(pw) =
            pchat_control::postgres::read_password(etcd, &self.cfg.pool, PgRole::Replication)
                .await?
        else {
            return Ok(false);
        };
        let dir = Dir::create(&self.private_dir(), 0o700, Some(self.owner()))?;
        dir.write(
            conf::REPLICATION_PASSFILE,
            conf::replication_passfile(&pw).as_bytes(),
            0o600,
            Some(self.owner()),
        )?;
        Ok(true)
    }

    /// `pg_hba.conf` and `pg_ident.conf` in the data directory `dir`.
    fn write_access(&self, dir: &Dir) -> Result<(), AgentError> {
        let owner = Some(self.owner());
        dir.write(
            "pg_hba.conf",
            conf::hba(&self.cfg, self.tls()).as_bytes(),
            0o600,
            owner,
        )?;
        dir.write(
            "pg_ident.conf",
            conf::ident(&self.cfg).as_bytes(),
            0o600,
            owner,
        )?;
        Ok(())
    }

    /// Creates `role` if missing, gives it its rights (`pchat_server` may log in;
    /// `pchat_replication` may log in for replication; neither anything else) and the
    /// password `password` (as a SCRAM verifier). On a running principal.
    pub async fn set_role_password(&self, role: PgRole, password: &str) -> Result<(), AgentError> {
        if password.len() < 16 || password.contains(['\'', '\\', '\n', '\0']) {
            return Err(AgentError::Refused(format!(
                "the password of {} must be at least 16 characters without quotes (pchat makes them)",
                role.name()
            )));
        }
        let status = self.status().await;
        if status.role != Role::Principal {
            return Err(AgentError::Refused(format!(
                "instance {} is {:?}, not a running principal: roles are set on the principal (standbys get them by replication)",
                self.cfg.instance, status.role
            )));
        }
        let name = role.name();
        let rights = match role {
            PgRole::Server => "LOGIN NOREPLICATION",
            PgRole::Replication => "LOGIN REPLICATION",
        };
        let verifier = conf::scram_verifier(password, &conf::salt());
        let client = self.connect("postgres").await?;
        let sql = format!(
            "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN \
             CREATE ROLE {name}; END IF; END$$; \
             ALTER ROLE {name} {rights} NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS \
             PASSWORD '{verifier}'"
        );
        self.admin("setting a role's password", async {
            client
                .batch_execute(&sql)
                .await
                // Not the statement: it holds the verifier.
                .map_err(|e| AgentError::Postgres(format!("setting the password of {name}: {e}")))
        })
        .await
    }

    /// `db install` on the principal: the databases where missing, the servers' role with
    /// its password, the schema (or its upgrade) and the role's grants — all over the unix
    /// socket as the superuser. Returns the databases it created.
    pub async fn install(&self, req: &InstallRequest) -> Result<Vec<String>, AgentError> {
        self.set_role_password(PgRole::Server, &req.server_password)
            .await?;
        let conn = |db: &str| {
            format!(
                "host={} port={} user={} dbname={db} application_name=pchat-agent",
                self.cfg.socket_dir.display(),
                self.cfg.port,
                self.cfg.os_user
            )
        };
        let opts = pchat_store_postgres::PostgresOptions::new(conn("mgc"), conn("mgccomp"));
        let created = pchat_store_postgres::PostgresStore::create_databases(&opts)
            .await
            .map_err(|e| AgentError::Postgres(e.to_string()))?;
        pchat_store_postgres::PostgresStore::install(&opts, PgRole::Server.name())
            .await
            .map_err(|e| AgentError::Postgres(e.to_string()))?;
        Ok(created)
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// The etcd client, if a control plane is configured.
    pub fn etcd(&self) -> Option<&Etcd> {
        self.etcd.as_ref()
    }

    fn tool(&self, name: &str) -> Command {
        let program = self.cfg.pg_bin_dir.join(name);
        let mut c = if self.as_self {
            Command::new(program)
        } else {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.cfg.os_user, "--"]).arg(program);
            c
        };
        // The OS user may not be allowed into the agent's working directory; English output
        // because the agent parses pg_controldata.
        c.current_dir("/")
            .env("LC_ALL", "C")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null());
        c
    }

    async fn run(&self, mut cmd: Command, what: &str) -> Result<Output, AgentError> {
        let out = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(io(format!("running {what}")))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(AgentError::Command {
                command: what.to_owned(),
                status: out.status.to_string(),
                stderr: format!("{}\n{}", tail(&out.stderr), tail(&out.stdout))
                    .trim()
                    .to_owned(),
            })
        }
    }

    /// Runs a tool that prints `NN%` progress on stderr (`pg_basebackup -P`).
    async fn run_with_progress(
        &self,
        mut cmd: Command,
        what: &str,
        step: &str,
        progress: ProgressSink<'_>,
    ) -> Result<(), AgentError> {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("running {what}")))?;
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| AgentError::Failed(format!("{what}: no stderr pipe")))?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stderr
                .read(&mut buf)
                .await
                .map_err(io(format!("reading {what}'s output")))?;
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            // Progress lines end in \r; the last complete "(NN%)" is the current figure.
            let text = String::from_utf8_lossy(&seen[seen.len().saturating_sub(512)..]);
            if let Some(p) = text
                .rsplit('%')
                .nth(1)
                .and_then(|s| s.rsplit('(').next())
                .and_then(|s| s.trim().parse::<u8>().ok())
            {
                progress(step, Some(p.min(100)));
            }
            if seen.len() > 64 * TAIL_BYTES {
                seen.drain(..seen.len() - TAIL_BYTES);
            }
        }
        let status = child
            .wait()
            .await
            .map_err(io(format!("waiting for {what}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(AgentError::Command {
                command: what.to_owned(),
                status: status.to_string(),
                stderr: tail(&seen).replace('\r', "\n"),
            })
        }
    }

    /// A directory the OS user owns, mode 0700, created if missing (its parent must be
    /// root's: see `AgentConfig`), never through a link.
    fn own_dir(&self, path: &Path) -> Result<Dir, AgentError> {
        Ok(Dir::create(path, 0o700, Some(self.owner()))?)
    }

    /// The end of the server log (read without following a link: it goes into API answers).
    fn log_tail(&self) -> String {
        use std::io::{Read as _, Seek as _};
        use std::os::unix::fs::OpenOptionsExt as _;
        const O_NOFOLLOW: i32 = 0o400000;
        let Ok(mut f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NOFOLLOW)
            .open(&self.cfg.log_file)
        else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(std::io::SeekFrom::Start(
            len.saturating_sub(TAIL_BYTES as u64),
        ));
        let mut text = Vec::new();
        let _ = f.take(TAIL_BYTES as u64).read_to_end(&mut text);
        tail(&text)
    }

    /// Whether `data_dir` holds a cluster.
    pub fn is_initialized(&self) -> bool {
        self.cfg.data_dir.join("PG_VERSION").is_file()
    }

    /// Whether the postmaster runs: the pid in `postmaster.pid` is a live process. A killed
    /// postmaster can stay a zombie until its parent (init) reaps it, and `pg_ctl status`
    /// counts a zombie as running; `/proc/PID/stat` tells the two apart.
    pub async fn is_running(&self) -> bool {
        let Some(text) = pg_dir(&self.cfg.data_dir)
            .ok()
            .and_then(|d| d.read("postmaster.pid").ok().flatten())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
        else {
            return false;
        };
        let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
        else {
            return false;
        };
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // "PID (comm) STATE …": a postgres process (not a reused pid) that is not a zombie.
            Ok(stat) => stat.rsplit_once(')').is_some_and(|(head, rest)| {
                head.ends_with("(postgres")
                    && rest
                        .split_whitespace()
                        .next()
                        .is_some_and(|state| state != "Z" && state != "X")
            }),
            Err(_) => false,
        }
    }

    /// A connection over the unix socket as the superuser, within the query timeout.
    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client, AgentError> {
        // The whole of it bounded: the connect timeout covers only the socket's connect,
        // which a frozen server's kernel still accepts; the login would wait for ever.
        tokio::time::timeout(self.query_timeout(), self.connect_unbounded(db))
            .await
            .map_err(|_| {
                AgentError::Postgres(format!(
                    "connecting to the local instance: no answer within {:?}",
                    self.query_timeout()
                ))
            })?
    }

    /// [`Instance::connect`] without the overall bound, for a caller that bounds it (and
    /// must tell a refusal from no answer at all).
    async fn connect_unbounded(&self, db: &str) -> Result<tokio_postgres::Client, AgentError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.cfg.socket_dir)
            .port(self.cfg.port)
            .user(&self.cfg.os_user)
            .dbname(db)
            .application_name("pchat-agent")
            .connect_timeout(self.query_timeout());
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
            // tokio-postgres says only "db error" for what the server answered.
            let why = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned());
            AgentError::Postgres(format!("connecting to the local instance: {why}"))
        })?;
        // The connection task ends when the client is dropped.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    async fn controldata(&self) -> ControlData {
        let mut c = self.tool("pg_controldata");
        c.arg("-D").arg(&self.cfg.data_dir);
        match self.run(c, "pg_controldata").await {
            Ok(out) => parse_controldata(&String::from_utf8_lossy(&out.stdout)),
            Err(_) => ControlData::default(),
        }
    }

    /// PostgreSQL is down without having been stopped: nobody (this agent, `pg_ctl stop`)
    /// asked it to, and its control file says it did not shut down — it crashed (kill -9, the
    /// OOM killer, a PANIC on a full disk) or a start after a crash failed. A writable
    /// cluster only (`in production`, `in crash recovery`): a mirror's says `in archive
    /// recovery`. The state is `None` while PostgreSQL runs or when it was stopped.
    pub(crate) async fn died_on_its_own(&self) -> Option<String> {
        if self
            .stopped_on_purpose
            .load(std::sync::atomic::Ordering::SeqCst)
            || !self.is_initialized()
            || self.is_running().await
        {
            return None;
        }
        let state = self.controldata().await.cluster_state?;
        matches!(state.as_str(), "in production" | "in crash recovery").then_some(state)
    }

    /// This instance's fence in etcd, if any.
    pub async fn fence(&self) -> Result<Option<Fence>, AgentError> {
        let Some(etcd) = &self.etcd else {
            return Ok(None);
        };
        let kv = etcd
            .get(&keys::fence(&self.cfg.pool, &self.cfg.instance))
            .await?;
        Ok(kv.and_then(|kv| {
            serde_json::from_slice::<Option<Fence>>(&kv.value)
                .ok()
                .flatten()
        }))
    }

    /// The full status (the job is added by the server).
    pub async fn status(&self) -> Status {
        let initialized = self.is_initialized();
        let mut s = Status {
            instance: self.cfg.instance.clone(),
            pool: self.cfg.pool.clone(),
            role: Role::Stopped,
            initialized,
            data_dir: self.cfg.data_dir.display().to_string(),
            port: self.cfg.port,
            system_identifier: None,
            timeline: None,
            wal_lsn: None,
            replay_lsn: None,
            checkpoint_lsn: None,
            cluster_state: None,
            mirroring: Mirroring::none(),
            fenced: None,
            messages: None,
            client_connections: None,
            id_epoch: None,
            log_shipping: None,
            job: None,
            at: api::now_rfc3339(),
            unresponsive_ms: None,
        };
        s.fenced = tokio::time::timeout(self.query_timeout(), self.fence())
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        if !initialized {
            return s;
        }
        let live = if self.silent_for().is_some() {
            // Known hung (the probe says so, and clears it once it answers again): asking
            // again would only make this answer a query timeout late.
            Err(AgentError::Postgres("PostgreSQL answers nothing".into()))
        } else if self.is_running().await {
            let asked = Instant::now();
            match tokio::time::timeout(self.query_timeout(), self.live_status(&mut s)).await {
                Ok(r) => {
                    if r.is_ok() {
                        self.answered();
                    }
                    r
                }
                Err(_) => {
                    self.unanswered(asked);
                    Err(AgentError::Postgres("status query timed out".into()))
                }
            }
        } else {
            Err(AgentError::Refused("not running".into()))
        };
        if live.is_ok() {
            s.messages = self.bounded(self.messages()).await;
            s.client_connections = self.bounded(self.client_connections()).await;
            s.id_epoch = self.bounded(self.id_epoch()).await;
        }
        if live.is_err() {
            s.role = Role::Stopped;
            s.mirroring = Mirroring::none();
            let c = self.controldata().await;
            s.system_identifier = c.system_identifier;
            s.cluster_state = c.cluster_state;
            s.checkpoint_lsn = c.checkpoint_lsn;
            s.timeline = c.timeline;
        }
        self.mark_unresponsive(&mut s);
        *lock(&self.last_status) = Some(s.clone());
        s
    }

    /// The last status taken, marked as [`Instance::status`] would mark it now; `None`
    /// before the first. For answers that must not wait for PostgreSQL.
    pub fn cached_status(&self) -> Option<Status> {
        let mut s = lock(&self.last_status).clone()?;
        self.mark_unresponsive(&mut s);
        Some(s)
    }

    /// A running PostgreSQL that answers nothing serves nothing: whatever it last said, it
    /// is reported stopped, with how long it has been silent.
    fn mark_unresponsive(&self, s: &mut Status) {
        s.unresponsive_ms = self.silent_for().map(|d| d.as_millis() as u64);
        if s.unresponsive_ms.is_some() {
            s.role = Role::Stopped;
            s.mirroring = Mirroring::none();
        }
    }

    async fn live_status(&self, s: &mut Status) -> Result<(), AgentError> {
        let pg = |e: tokio_postgres::Error| AgentError::Postgres(e.to_string());
        let c = self.connect("postgres").await?;
        let row = c
            .query_one(
                "SELECT pg_is_in_recovery(), (SELECT system_identifier::text FROM pg_control_system()), \
                 current_setting('primary_conninfo'), current_setting('synchronous_standby_names'), \
                 (SELECT checkpoint_lsn::text FROM pg_control_checkpoint())",
                &[],
            )
            .await
            .map_err(pg)?;
        let in_recovery: bool = row.get(0);
        s.system_identifier = row.get(1);
        let conninfo: String = row.get(2);
        let sync_names: String = row.get(3);
        s.checkpoint_lsn = row.get(4);
        if !in_recovery {
            s.role = Role::Principal;
            let row = c
                .query_one(
                    "SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn())",
                    &[],
                )
                .await
                .map_err(pg)?;
            s.wal_lsn = row.get(0);
            let walfile: String = row.get(1);
            s.timeline = walfile
                .get(..8)
                .and_then(|t| u32::from_str_radix(t, 16).ok());
            let rows = c
                .query(
                    "SELECT coalesce(application_name, ''), coalesce(state, ''), coalesce(sync_state, ''), \
                     pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint, \
                     coalesce(extract(epoch FROM flush_lag), 0)::float8 \
                     FROM pg_stat_replication",
                    &[],
                )
                .await
                .map_err(pg)?;
            let rows: Vec<SenderRow> = rows
                .iter()
                .map(|r| SenderRow {
                    application_name: r.get(0),
                    state: r.get(1),
                    sync_state: r.get(2),
                    unflushed_bytes: r.get(3),
                    flush_lag_s: r.get(4),
                })
                .collect();
            s.mirroring = principal_mirroring(&sync_names, &rows);
        } else {
            s.role = if conninfo.trim().is_empty() {
                Role::Standby
            } else {
                Role::Mirror
            };
            let row = c
                .query_one(
                    "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
                     coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)::bigint, \
                     coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)::float8, \
                     pg_get_wal_replay_pause_state() <> 'not paused', \
                     (SELECT timeline_id FROM pg_control_checkpoint())",
                    &[],
                )
                .await
                .map_err(pg)?;
            let received: Option<String> = row.get(0);
            s.replay_lsn = row.get(1);
            let redo: i64 = row.get(2);
            let redo_s: f64 = row.get(3);
            let paused: bool = row.get(4);
            let checkpoint_tli: i32 = row.get(5);
            let receiver = c
                .query_opt(
                    "SELECT coalesce(status, ''), flushed_lsn::text, latest_end_lsn::text, \
                     coalesce(sender_host, ''), coalesce(sender_port, 0), coalesce(received_tli, 0) \
                     FROM pg_stat_wal_receiver",
                    &[],
                )
                .await
                .map_err(pg)?
                .map(|r| {
                    let flushed: Option<String> = r.get(1);
                    let latest: Option<String> = r.get(2);
                    let host: String = r.get(3);
                    let port: i32 = r.get(4);
                    let tli: i32 = r.get(5);
                    (
                        ReceiverRow {
                            status: r.get(0),
                            flushed_lsn: flushed.as_deref().and_then(parse_lsn),
                            latest_end_lsn: latest.as_deref().and_then(parse_lsn),
                            sender: format!("{host}:{port}"),
                        },
                        tli,
                    )
                });
            s.timeline = receiver
                .as_ref()
                .map(|(_, tli)| *tli)
                .filter(|t| *t > 0)
                .or(Some(checkpoint_tli))
                .and_then(|t| u32::try_from(t).ok());
            // What has reached this disk: the receiver's flush position, else what was replayed.
            s.wal_lsn = receiver
                .as_ref()
                .and_then(|(r, _)| r.flushed_lsn.map(format_lsn))
                .or(received)
                .or_else(|| s.replay_lsn.clone());
            s.mirroring = if s.role == Role::Mirror {
                mirror_mirroring(
                    receiver.as_ref().map(|(r, _)| r),
                    paused,
                    redo.max(0) as u64,
                    redo_s,
                )
            } else {
                Mirroring::none()
            };
        }
        Ok(())
    }

    /// `initdb` into an empty data directory, with the agent's `pg_hba.conf` and replication
    /// settings. Returns `false` when it already held a cluster (nothing done).
    pub async fn init(&self) -> Result<bool, AgentError> {
        if self.is_initialized() {
            return Ok(false);
        }
        if !dir_is_empty(&self.cfg.data_dir)? {
            return Err(AgentError::Refused(format!(
                "{} is not empty and holds no PostgreSQL cluster: empty it or point data_dir elsewhere",
                self.cfg.data_dir.display()
            )));
        }
        self.prepare_dirs()?;
        let mut c = self.tool("initdb");
        c.arg("-D")
            .arg(&self.cfg.data_dir)
            .args(["-U", &self.cfg.os_user])
            // Replaced by the agent's own files at once; never `trust`, even for a moment.
            .args(["--auth-local=peer", "--auth-host=reject"])
            .args(["--encoding=UTF8", "--locale=C.UTF-8"])
            // Checksums catch torn pages, and let pg_rewind re-seed a failed principal later.
            .arg("--data-checksums");
        self.run(c, "initdb").await?;
        let data = pg_dir(&self.cfg.data_dir)?;
        self.write_access(&data)?;
        data.write(
            "postgresql.conf",
            conf::postgresql_conf(&self.cfg).as_bytes(),
            0o600,
            Some(self.owner()),
        )?;
        // A new, empty cluster is not the data a failover fenced (the fence guards an old
        // principal's data): the instance may start, e.g. for `db install` on a rebuilt site.
        self.clear_fence().await?;
        Ok(true)
    }

    /// Data directory, socket directory and log file, owned by the OS user.
    fn prepare_dirs(&self) -> Result<(), AgentError> {
        self.own_dir(&self.cfg.data_dir)?;
        self.own_dir(&self.cfg.socket_dir)?;
        if !self.cfg.log_file.exists() {
            use std::os::unix::fs::OpenOptionsExt as _;
            const O_NOFOLLOW: i32 = 0o400000;
            let path = &self.cfg.log_file;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(O_NOFOLLOW)
                .mode(0o600)
                .open(path)
            {
                Ok(f) => std::os::unix::fs::fchown(&f, Some(self.uid), Some(self.gid)).map_err(
                    io(format!("giving {} to {}", path.display(), self.cfg.os_user)),
                )?,
                // Made meanwhile (or a link: refused by the exclusive create, and PostgreSQL
                // opens it as its own user anyway).
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(format!("creating {}", path.display()))(e)),
            }
        }
        Ok(())
    }

    /// Writes `bytes` as `name` in the OS user's directory `dir` (see the module docs).
    pub(crate) fn write_owned(
        &self,
        dir: &Path,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), AgentError> {
        pg_dir(dir)?.write(name, bytes, 0o600, Some(self.owner()))?;
        Ok(())
    }

    /// `postgresql.auto.conf` of data directory `dir`, refused when it is a link.
    fn read_auto_conf(&self, dir: &Dir) -> Result<String, AgentError> {
        let bytes = dir.read("postgresql.auto.conf")?.unwrap_or_default();
        String::from_utf8(bytes).map_err(|_| {
            AgentError::Refused(format!(
                "{}/postgresql.auto.conf is not UTF-8 text: fix or remove it",
                dir.path().display()
            ))
        })
    }

    /// Writes log shipping's settings for this instance's role into
    /// `dir/postgresql.auto.conf` (a data directory, stopped or running; the caller reloads a
    /// running one).
    pub(crate) fn apply_shipping_role(&self, dir: &Path) -> Result<(), AgentError> {
        let set = shipping_conf::role_settings(&self.cfg)?;
        let dir = pg_dir(dir)?;
        let text = self.read_auto_conf(&dir)?;
        let pairs: Vec<(&str, Option<&str>)> =
            set.iter().map(|(k, v)| (*k, v.as_deref())).collect();
        dir.write(
            "postgresql.auto.conf",
            edit_conf(&text, &pairs).as_bytes(),
            0o600,
            Some(self.owner()),
        )?;
        Ok(())
    }

    /// Starts PostgreSQL. Refuses to start a fenced instance as a principal, and (with a
    /// control plane) refuses when etcd cannot say whether it is fenced: a principal that
    /// cannot reach the witness must not serve (SQL Server's quorum rule).
    pub async fn start(&self) -> Result<(), AgentError> {
        let listen = self.cfg.listen_addresses.clone();
        self.start_listening(&listen).await
    }

    /// [`Instance::start`] with PostgreSQL's `listen_addresses` given: empty for the unix
    /// socket only (a salvage, which no server may reach).
    pub(crate) async fn start_listening(&self, listen_addresses: &str) -> Result<(), AgentError> {
        if !self.is_initialized() {
            return Err(AgentError::Refused(format!(
                "{} holds no cluster: run init (or clone-from, restore) first",
                self.cfg.data_dir.display()
            )));
        }
        if self.is_running().await {
            return Ok(());
        }
        let standby = self.cfg.data_dir.join("standby.signal").exists();
        if !standby {
            match self.fence().await {
                Ok(Some(f)) => {
                    return Err(AgentError::Fenced(format!(
                        "instance {} was failed over to {} at {} (epoch {}); it may come back only as a mirror: \
                         run `pchat db mirror add` to re-seed it from the principal",
                        self.cfg.instance, f.by, f.at, f.epoch
                    )))
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(AgentError::Fenced(format!(
                        "cannot confirm with etcd that instance {} is still the principal ({e}); not starting it",
                        self.cfg.instance
                    )))
                }
            }
        }
        self.prepare_dirs()?;
        // Who may connect is the agent's, whatever the data directory holds.
        self.write_access(&pg_dir(&self.cfg.data_dir)?)?;
        self.install_private().await?;
        // Log shipping's settings follow this instance's role, not whatever a clone or a
        // restore copied from another instance.
        self.apply_shipping_role(&self.cfg.data_dir)?;
        // `always`: a mirror archives what it receives, so shipping survives a failover.
        let mut opts = format!(
            "-c port={} -c listen_addresses='{}' -c unix_socket_directories='{}' -c archive_mode=always",
            self.cfg.port,
            listen_addresses,
            self.cfg.socket_dir.display()
        );
        if self.tls() {
            let p = self.private_dir();
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file='{}' -c ssl_key_file='{}' -c ssl_ca_file='{}'",
                p.join(conf::SERVER_CERT).display(),
                p.join(conf::SERVER_KEY).display(),
                p.join(conf::CA_CERT).display()
            ));
        }
        let deadline = Instant::now() + START_RETRY;
        loop {
            let mut c = self.tool("pg_ctl");
            c.arg("start")
                .arg("-D")
                .arg(&self.cfg.data_dir)
                .arg("-l")
                .arg(&self.cfg.log_file)
                .args(["-w", "-t", &PG_CTL_TIMEOUT_S.to_string(), "-s", "-o", &opts]);
            match self.run(c, "pg_ctl start").await {
                Ok(_) => {
                    self.stopped_on_purpose
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                    return Ok(());
                }
                // A killed server's processes may not be reaped yet: its pid still "exists".
                Err(_) if Instant::now() < deadline && self.log_tail().contains("lock file") => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(AgentError::Command {
                    command,
                    status,
                    stderr,
                }) => {
                    return Err(AgentError::Command {
                        command,
                        status,
                        stderr: format!("{stderr}\n--- server log ---\n{}", self.log_tail()),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops PostgreSQL (`fast`: a clean shutdown that first sends all WAL to connected
    /// standbys; `immediate`: no shutdown checkpoint, crash recovery at next start).
    pub async fn stop(&self, immediate: bool) -> Result<(), AgentError> {
        self.stopped_on_purpose
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if !self.is_running().await {
            return Ok(());
        }
        let mut c = self.tool("pg_ctl");
        c.arg("stop")
            .arg("-D")
            .arg(&self.cfg.data_dir)
            .args(["-m", if immediate { "immediate" } else { "fast" }])
            .args(["-w", "-t", &PG_CTL_TIMEOUT_S.to_string(), "-s"]);
        self.run(c, "pg_ctl stop").await.map(drop)
    }

    /// Asks PostgreSQL to stop (`fast`: sessions terminated, a commit waiting for a mirror
    /// ends without an acknowledgment) without waiting for it. A hung server gets the
    /// request now and acts on it the moment it runs again: what fencing needs, where
    /// [`Instance::stop`] would wait for as long as it hangs.
    pub async fn stop_nowait(&self) -> Result<(), AgentError> {
        self.stopped_on_purpose
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if !self.is_running().await {
            return Ok(());
        }
        let mut c = self.tool("pg_ctl");
        c.arg("stop")
            .arg("-D")
            .arg(&self.cfg.data_dir)
            .args(["-m", "fast", "-W", "-s"]);
        self.run(c, "pg_ctl stop -W").await.map(drop)
    }

    /// Ends recovery: this mirror or standby becomes a writable principal on a new timeline.
    pub async fn promote(&self) -> Result<(), AgentError> {
        let status = self.status().await;
        match status.role {
            Role::Principal => return Ok(()),
            Role::Mirror | Role::Standby => {}
            Role::Stopped => {
                return Err(AgentError::Refused(
                    "the instance is not running: start it (as a standby) before promoting".into(),
                ))
            }
        }
        let mut c = self.tool("pg_ctl");
        c.arg("promote").arg("-D").arg(&self.cfg.data_dir).args([
            "-w",
            "-t",
            &PG_CTL_TIMEOUT_S.to_string(),
            "-s",
        ]);
        self.run(c, "pg_ctl promote").await?;
        // A principal streams from nobody and, until a mirror is attached, waits for nobody.
        let client = self.connect("postgres").await?;
        for sql in [
            "ALTER SYSTEM RESET primary_conninfo",
            "ALTER SYSTEM RESET primary_slot_name",
            "ALTER SYSTEM RESET synchronous_standby_names",
            "SELECT pg_reload_conf()",
        ] {
            self.admin(sql, async {
                client
                    .batch_execute(sql)
                    .await
                    .map_err(|e| AgentError::Postgres(format!("{sql}: {e}")))
            })
            .await?;
        }
        Ok(())
    }

    /// Sets (or clears) the standby every commit must wait for.
    pub async fn set_sync_standby(&self, name: Option<&str>) -> Result<(), AgentError> {
        let client = self.connect("postgres").await?;
        let sql = match name {
            Some(n) if valid_name(n) => {
                format!("ALTER SYSTEM SET synchronous_standby_names = '\"{n}\"'")
            }
            Some(n) => return Err(AgentError::Refused(format!("invalid standby name `{n}`"))),
            None => "ALTER SYSTEM RESET synchronous_standby_names".to_owned(),
        };
        for sql in [sql.as_str(), "SELECT pg_reload_conf()"] {
            self.admin(sql, async {
                client
                    .batch_execute(sql)
                    .await
                    .map_err(|e| AgentError::Postgres(format!("{sql}: {e}")))
            })
            .await?;
        }
        Ok(())
    }

    /// Creates (idempotently) or drops a physical replication slot.
    pub async fn slot(&self, name: &str, drop: bool) -> Result<(), AgentError> {
        if !valid_name(name) {
            return Err(AgentError::Refused(format!("invalid slot name `{name}`")));
        }
        let client = self.connect("postgres").await?;
        self.admin("a replication slot", self.slot_on(&client, name, drop))
            .await
    }

    async fn slot_on(
        &self,
        client: &tokio_postgres::Client,
        name: &str,
        drop: bool,
    ) -> Result<(), AgentError> {
        let pg = |e: tokio_postgres::Error| AgentError::Postgres(e.to_string());
        let existing = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .map_err(pg)?;
        match (existing, drop) {
            (None, false) => client
                .execute(
                    "SELECT pg_create_physical_replication_slot($1, true)",
                    &[&name],
                )
                .await
                .map(drop_count)
                .map_err(pg),
            (Some(_), false) | (None, true) => Ok(()),
            (Some(row), true) => {
                let active: bool = row.get(0);
                if active {
                    return Err(AgentError::Refused(format!(
                        "replication slot {name} is in use by a connected standby: stop the standby first"
                    )));
                }
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                    .await
                    .map(drop_count)
                    .map_err(pg)
            }
        }
    }

    /// Makes this instance a streaming standby of the principal at `req.host:req.port`:
    /// `pg_basebackup` into a temporary directory, standby settings, swap, start.
    pub async fn clone_from(
        &self,
        req: &CloneRequest,
        progress: ProgressSink<'_>,
    ) -> Result<String, AgentError> {
        if req.host.is_empty() || req.host.contains(|c: char| c.is_whitespace() || c == '\'') {
            return Err(AgentError::Refused(format!("invalid host `{}`", req.host)));
        }
        let upstream = self.upstream(&req.host, req.port, req.instance.as_deref())?;
        if let Some(slot) = &req.slot {
            if !valid_name(slot) {
                return Err(AgentError::Refused(format!("invalid slot name `{slot}`")));
            }
        }
        let status = self.status().await;
        let source = format!("{}:{}", req.host, req.port);
        if status.role == Role::Mirror
            && status.mirroring.partner.as_deref() == Some(source.as_str())
        {
            return Ok(format!("already a mirror of {source}"));
        }
        if !dir_is_empty(&self.cfg.data_dir)? && !req.overwrite {
            return Err(AgentError::Refused(format!(
                "{} already holds a database: cloning would replace it; repeat with overwrite (--overwrite) if that is intended",
                self.cfg.data_dir.display()
            )));
        }
        // The copy and the stream authenticate as the replication role: its password first.
        if !self.refresh_replication_password().await? {
            return Err(AgentError::Refused(
                "etcd holds no replication password for this pool: `pchat db mirror add` makes one"
                    .into(),
            ));
        }
        progress("stopping the local instance", None);
        self.stop(false).await?;
        self.prepare_dirs()?;
        self.install_private().await?;
        let tmp = sibling(&self.cfg.data_dir, ".clone");
        remove_dir_if_exists(&tmp)?;
        self.own_dir(&tmp)?;
        let conninfo = conf::upstream_conninfo(&upstream, &self.private_dir(), &self.cfg.instance);
        let mut c = self.tool("pg_basebackup");
        c.arg("-d")
            .arg(&conninfo)
            .arg("-D")
            .arg(&tmp)
            .args(["-X", "stream", "-c", "fast", "-P"]);
        if let Some(slot) = &req.slot {
            c.args(["-S", slot]);
        }
        self.run_with_progress(c, "pg_basebackup", &format!("copying {source}"), progress)
            .await?;
        progress("configuring the standby", None);
        self.write_pair_settings(&tmp, Some(&conninfo), req.slot.as_deref())?;
        self.write_owned(&tmp, "standby.signal", b"")?;
        self.swap_in(&tmp)?;
        progress("starting the mirror", None);
        self.start().await?;
        Ok(format!("cloned from {source}"))
    }

    /// Makes a copy of another instance's data directory (a clone, a restore) this
    /// instance's, stopped: the agent's own `postgresql.conf`, access files and
    /// `postgresql.auto.conf` with only what makes it one half of a pair. Nothing the source
    /// set survives (its `archive_cleanup_command`, `restore_command`, `archive_library`,
    /// `synchronous_standby_names`… would run or wait here).
    fn write_pair_settings(
        &self,
        dir: &Path,
        primary_conninfo: Option<&str>,
        slot: Option<&str>,
    ) -> Result<(), AgentError> {
        let dir = pg_dir(dir)?;
        let owner = Some(self.owner());
        dir.write(
            "postgresql.conf",
            conf::postgresql_conf(&self.cfg).as_bytes(),
            0o600,
            owner,
        )?;
        dir.write(
            "postgresql.auto.conf",
            conf::fresh_auto_conf(&[
                ("primary_conninfo", primary_conninfo),
                ("primary_slot_name", slot),
            ])
            .as_bytes(),
            0o600,
            owner,
        )?;
        // The source's pg_hba.conf names the source's networks; this host has its own.
        self.write_access(&dir)?;
        for f in [
            "standby.signal",
            "recovery.signal",
            "postmaster.pid",
            "postmaster.opts",
            // PostgreSQL 12+ refuses to start with one; older tools leave it behind.
            "recovery.conf",
        ] {
            dir.remove(f)?;
        }
        Ok(())
    }

    /// Where a principal at `host:port` is, and (with TLS) the name it must prove.
    fn upstream(
        &self,
        host: &str,
        port: u16,
        instance: Option<&str>,
    ) -> Result<conf::Upstream, AgentError> {
        let (hostaddr, port) = pchat_control::postgres::resolve(&format!("{host}:{port}"))
            .map_err(AgentError::Refused)?;
        let tls_name = match (self.tls(), instance) {
            (false, _) => None,
            (true, Some(i)) if valid_name(i) => {
                Some(pchat_control::Who::Instance(i.to_owned()).tls_name(&self.cfg.pool))
            }
            (true, Some(i)) => {
                return Err(AgentError::Refused(format!("invalid instance name `{i}`")))
            }
            (true, None) => {
                return Err(AgentError::Refused(
                    "the request does not name the principal's instance: its certificate cannot be checked (update the shell)".into(),
                ))
            }
        };
        Ok(conf::Upstream {
            tls_name,
            hostaddr,
            port,
        })
    }

    /// Replaces the data directory with `new` (both on the same file system): the old one is
    /// renamed away first and removed last, so a crash leaves one of them whole.
    fn swap_in(&self, new: &Path) -> Result<(), AgentError> {
        let data = &self.cfg.data_dir;
        let old = sibling(data, ".old");
        remove_dir_if_exists(&old)?;
        if data.exists() {
            std::fs::rename(data, &old).map_err(io(format!("moving {} aside", data.display())))?;
        }
        std::fs::rename(new, data).map_err(io(format!("moving {} into place", new.display())))?;
        pg_dir(data)?.set_mode(0o700)?;
        remove_dir_if_exists(&old)
    }

    /// A full backup of this (running) instance into `req.to/req.name`, with a manifest.
    pub async fn backup(
        &self,
        req: &BackupRequest,
        progress: ProgressSink<'_>,
    ) -> Result<Manifest, AgentError> {
        backup::validate_name(&req.name)?;
        if let Some(d) = &req.description {
            backup::validate_description(d)?;
        }
        let status = self.status().await;
        if status.role == Role::Stopped {
            return Err(AgentError::Refused(
                "the instance is not running: start it before a backup".into(),
            ));
        }
        let (target, partial) = backup::prepare_target(Path::new(&req.to), &req.name)?;
        let partial_dir = self.own_dir(&partial)?;
        let data = partial.join("data");
        let mut c = self.tool("pg_basebackup");
        c.arg("-h")
            .arg(&self.cfg.socket_dir)
            .args([
                "-p",
                &self.cfg.port.to_string(),
                "-U",
                &self.cfg.os_user,
                "-D",
            ])
            .arg(&data)
            .args(["-X", "stream", "-c", "fast", "-P"]);
        self.run_with_progress(c, "pg_basebackup", "copying the database", progress)
            .await?;
        // Files the OS user wrote: read without following a link.
        let data_dir = partial_dir.sub("data")?;
        let read = |name: &str| {
            data_dir
                .read(name)
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let label = read("backup_label");
        let pg_manifest = read("backup_manifest");
        let (start_lsn, timeline) = backup::parse_backup_label(&label);
        let end_lsn = backup::parse_pg_manifest_end_lsn(&pg_manifest);
        let source = format!(
            "{} ({}, port {})",
            self.cfg.instance,
            hostname(),
            self.cfg.port
        );
        let partial2 = partial.clone();
        let name = req.name.clone();
        let description = req.description.clone().unwrap_or_default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Option<u8>)>();
        let work = tokio::task::spawn_blocking(move || {
            let mut report = |p: &Progress| {
                let _ = tx.send((p.step.clone(), p.percent()));
            };
            let (dirs, files) = backup::hash_tree(&partial2, &mut report)?;
            let manifest = backup::new_manifest(
                BackupKind::Postgresql,
                name,
                description,
                source,
                dirs,
                files,
                start_lsn,
                end_lsn,
                timeline,
            );
            backup::finish(&partial2, &target, &manifest)?;
            Ok::<Manifest, backup::BackupError>(manifest)
        });
        tokio::pin!(work);
        loop {
            tokio::select! {
                Some((step, pct)) = rx.recv() => progress(&step, pct),
                done = &mut work => {
                    return done
                        .map_err(|e| AgentError::Failed(format!("backup task: {e}")))?
                        .map_err(AgentError::from);
                }
            }
        }
    }

    /// Replaces this instance's data with a verified backup. Nothing is stopped or replaced
    /// until every file of the backup matches its manifest.
    pub async fn restore(
        &self,
        req: &RestoreRequest,
        progress: ProgressSink<'_>,
    ) -> Result<Manifest, AgentError> {
        let from = PathBuf::from(&req.from);
        if !dir_is_empty(&self.cfg.data_dir)? && !req.overwrite {
            return Err(AgentError::Refused(format!(
                "{} is not empty: a restore would replace that database; repeat with --overwrite if that is intended",
                self.cfg.data_dir.display()
            )));
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Option<u8>)>();
        let tx2 = tx.clone();
        let from2 = from.clone();
        let verify = tokio::task::spawn_blocking(move || {
            let mut report = |p: &Progress| {
                let _ = tx2.send((p.step.clone(), p.percent()));
            };
            backup::verify(&from2, &mut report)
        });
        tokio::pin!(verify);
        let manifest = loop {
            tokio::select! {
                Some((step, pct)) = rx.recv() => progress(&step, pct),
                done = &mut verify => {
                    break done.map_err(|e| AgentError::Failed(format!("verify task: {e}")))??;
                }
            }
        };
        if manifest.kind != BackupKind::Postgresql {
            return Err(AgentError::Refused(format!(
                "{} is a {:?} backup; the agent restores PostgreSQL backups (standalone backups are restored with --data-dir)",
                from.display(),
                manifest.kind
            )));
        }
        progress("stopping the local instance", None);
        self.stop(false).await?;
        self.prepare_dirs()?;
        let tmp = sibling(&self.cfg.data_dir, ".restore");
        remove_dir_if_exists(&tmp)?;
        let (uid, gid) = (self.uid, self.gid);
        let tmp2 = tmp.clone();
        let manifest2 = manifest.clone();
        let copy = tokio::task::spawn_blocking(move || {
            let mut report = |p: &Progress| {
                let _ = tx.send((p.step.clone(), p.percent()));
            };
            backup::copy_verified(
                &from,
                &manifest2,
                "data",
                &tmp2,
                Some((uid, gid)),
                &mut report,
            )
        });
        tokio::pin!(copy);
        loop {
            tokio::select! {
                Some((step, pct)) = rx.recv() => progress(&step, pct),
                done = &mut copy => {
                    done.map_err(|e| AgentError::Failed(format!("copy task: {e}")))??;
                    break;
                }
            }
        }
        progress("configuring the restored database", None);
        self.write_pair_settings(&tmp, None, None)?;
        if !req.recovery {
            // WITH NORECOVERY: a standby that waits for log shipping to bring more WAL.
            self.write_owned(&tmp, "standby.signal", b"")?;
        }
        self.swap_in(&tmp)?;
        if req.recovery {
            // The administrator chose this data as the principal's: an old fence no longer applies.
            self.clear_fence().await?;
        }
        progress("starting the restored database", None);
        self.start().await?;
        if req.recovery {
            self.wait_writable(Duration::from_secs(120)).await?;
        }
        Ok(manifest)
    }

    async fn wait_writable(&self, timeout: Duration) -> Result<(), AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            let in_recovery = self
                .bounded(async {
                    let c = self.connect("postgres").await.ok()?;
                    let row = c.query_one("SELECT pg_is_in_recovery()", &[]).await.ok()?;
                    Some(row.get::<_, bool>(0))
                })
                .await;
            if in_recovery == Some(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(AgentError::Failed(format!(
                    "the restored database is still in recovery after {timeout:?}; see {}",
                    self.cfg.log_file.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Messages in the archive: the sum of the rooms' sequence counters in `mgc`.
    pub(crate) async fn messages(&self) -> Option<u64> {
        self.bounded(self.messages_unbounded()).await
    }

    async fn messages_unbounded(&self) -> Option<u64> {
        let c = self.connect("mgc").await.ok()?;
        pchat_store_postgres::inspect::archive_message_count(&c)
            .await
            .ok()
    }

    /// The id epoch of `mgc` (`pchat_store::ids`), when it can be read.
    pub(crate) async fn id_epoch(&self) -> Option<u64> {
        let c = self.connect("mgc").await.ok()?;
        pchat_store_postgres::inspect::id_epoch(&c).await.ok()
    }

    /// Raises the id epoch of `mgc` (a principal: a standby is read-only and refuses). An
    /// instance without pchat's databases has handed out no ids: there is nothing to raise,
    /// and `db install` creates them later in a database no server ever wrote.
    pub(crate) async fn raise_id_epoch(&self, epoch: u64) -> Result<u64, AgentError> {
        let admin = self.connect("postgres").await?;
        let has_mgc = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = 'mgc'", &[])
            .await
            .map_err(|e| AgentError::Postgres(e.to_string()))?
            .is_some();
        if !has_mgc {
            tracing::info!(
                epoch,
                "no database mgc: no message ids to move to a new epoch"
            );
            return Ok(epoch);
        }
        let c = self.connect("mgc").await?;
        pchat_store_postgres::inspect::raise_id_epoch(&c, epoch)
            .await
            .map_err(|e| AgentError::Postgres(format!("raising the id epoch to {epoch}: {e}")))
    }

    /// The last id of each of `rooms` that `mgc` holds, with its id epoch.
    pub(crate) async fn room_ids(&self, rooms: &[String]) -> Result<api::RoomIds, AgentError> {
        let c = self.connect("mgc").await?;
        let id_epoch = pchat_store_postgres::inspect::id_epoch(&c)
            .await
            .map_err(|e| AgentError::Postgres(e.to_string()))?;
        let last_ids = pchat_store_postgres::inspect::room_last_ids(&c, rooms)
            .await
            .map_err(|e| AgentError::Postgres(e.to_string()))?
            .into_iter()
            .collect();
        Ok(api::RoomIds { id_epoch, last_ids })
    }

    /// A standby's replication as this principal sees it: its state and the WAL it has not
    /// flushed yet.
    pub(crate) async fn standby_link(&self, name: &str) -> Option<(String, i64)> {
        self.bounded(self.standby_link_unbounded(name)).await
    }

    async fn standby_link_unbounded(&self, name: &str) -> Option<(String, i64)> {
        let c = self.connect("postgres").await.ok()?;
        let row = c
            .query_opt(
                "SELECT coalesce(state, ''), \
                 coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn), -1)::bigint \
                 FROM pg_stat_replication WHERE application_name = $1",
                &[&name],
            )
            .await
            .ok()??;
        Some((row.get(0), row.get(1)))
    }

    /// Sessions on `mgc`/`mgccomp` that are not the agent's.
    pub(crate) async fn client_connections(&self) -> Option<u64> {
        self.bounded(self.client_connections_unbounded()).await
    }

    async fn client_connections_unbounded(&self) -> Option<u64> {
        let c = self.connect("postgres").await.ok()?;
        let row = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname IN ('mgc', 'mgccomp') \
                 AND backend_type = 'client backend' AND application_name <> 'pchat-agent'",
                &[],
            )
            .await
            .ok()?;
        u64::try_from(row.get::<_, i64>(0)).ok()
    }

    /// Runs `program args` as the OS user; `Err(exit code)` when it fails.
    pub(crate) async fn run_as_user(
        &self,
        program: &str,
        args: &[&str],
    ) -> Result<(), Option<i32>> {
        let mut c = if self.as_self {
            Command::new(program)
        } else {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.cfg.os_user, "--"]).arg(program);
            c
        };
        c.args(args)
            .current_dir("/")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match c.status().await {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(s.code()),
            Err(_) => Err(None),
        }
    }

    /// The cluster's WAL segment size in bytes (16 MiB unless initdb chose otherwise).
    pub(crate) async fn segment_bytes(&self) -> u64 {
        let asked = async {
            let c = self.connect("postgres").await.ok()?;
            let row = c
                .query_one(
                    "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'",
                    &[],
                )
                .await
                .ok()?;
            u64::try_from(row.get::<_, i64>(0)).ok().filter(|v| *v > 0)
        };
        if let Some(v) = self.bounded(asked).await {
            return v;
        }
        self.controldata()
            .await
            .segment_bytes
            .unwrap_or(16 * 1024 * 1024)
    }

    /// The WAL file of the last restart point's redo position (what a standby still needs).
    pub(crate) async fn redo_segment(&self) -> Option<String> {
        self.bounded(self.redo_segment_unbounded()).await
    }

    async fn redo_segment_unbounded(&self) -> Option<String> {
        let c = self.connect("postgres").await.ok()?;
        let row = c
            .query_one("SELECT redo_wal_file FROM pg_control_checkpoint()", &[])
            .await
            .ok()?;
        row.get(0)
    }

    /// `pg_stat_archiver`, on a running instance.
    pub(crate) async fn archiver(&self) -> Option<BackupJob> {
        self.bounded(self.archiver_unbounded()).await
    }

    async fn archiver_unbounded(&self) -> Option<BackupJob> {
        let c = self.connect("postgres").await.ok()?;
        let row = c
            .query_one(
                "SELECT last_archived_wal, \
                 to_char(last_archived_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                 failed_count, last_failed_wal, \
                 to_char(last_failed_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                 coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) \
                 FROM pg_stat_archiver",
                &[],
            )
            .await
            .ok()?;
        Some(BackupJob {
            last_archived: row.get(0),
            last_archived_at: row.get(1),
            failures: row.get(2),
            last_failed: row.get(3),
            last_failed_at: row.get(4),
            failing: row.get(5),
        })
    }

    /// Replay position, last replayed commit time and timeline of a standby.
    pub(crate) async fn replay_position(&self) -> (Option<String>, Option<String>, Option<u32>) {
        self.bounded(async { Some(self.replay_position_unbounded().await) })
            .await
            .unwrap_or((None, None, None))
    }

    async fn replay_position_unbounded(&self) -> (Option<String>, Option<String>, Option<u32>) {
        let Ok(c) = self.connect("postgres").await else {
            return (None, None, None);
        };
        match c
            .query_one(
                "SELECT pg_last_wal_replay_lsn()::text, \
                 to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                 (SELECT timeline_id FROM pg_control_checkpoint())",
                &[],
            )
            .await
        {
            Ok(row) => {
                let tli: i32 = row.get(2);
                (row.get(0), row.get(1), u32::try_from(tli).ok())
            }
            Err(_) => (None, None, None),
        }
    }

    /// Removes this instance's fence (it is a principal again by an administrator's restore).
    pub async fn clear_fence(&self) -> Result<(), AgentError> {
        if let Some(etcd) = &self.etcd {
            etcd.put(&keys::fence(&self.cfg.pool, &self.cfg.instance), b"null")
                .await?;
        }
        Ok(())
    }
}

/// The data directory's parent must be the agent's own (root's, or the OS user's when the
/// agent runs as that user) and writable by nobody else: the agent writes beside the data
/// directory (`DATA.private`, `DATA.scripts`, the role file, clones and restores being built)
/// and trusts that `postgres` cannot swap those names for links (Debian's
/// `/var/lib/postgresql/15/` belongs to `postgres`: use another parent).
fn check_parent(data_dir: &Path, me: u32) -> Result<(), AgentError> {
    use std::os::unix::fs::MetadataExt as _;
    let Some(parent) = data_dir.parent() else {
        return Ok(());
    };
    let m = match std::fs::metadata(parent) {
        Ok(m) => m,
        // Made later by whoever provisions the host; checked again at the next start.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(format!("reading {}", parent.display()))(e)),
    };
    if (m.uid() != 0 && m.uid() != me) || m.mode() & 0o022 != 0 {
        return Err(AgentError::Config(format!(
            "{} (the data directory's parent) belongs to uid {} with mode {:o}: it must belong to root (or to the agent's user) \
             and be writable by nobody else, because the agent writes beside the data directory as root",
            parent.display(),
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

fn drop_count(_: u64) {}

fn remove_dir_if_exists(path: &Path) -> Result<(), AgentError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("removing {}", path.display()))(e)),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(state: &str, sync: &str) -> SenderRow {
        SenderRow {
            application_name: "a_mirror".into(),
            state: state.into(),
            sync_state: sync.into(),
            unflushed_bytes: Some(120),
            flush_lag_s: 0.25,
        }
    }

    #[test]
    fn principal_states() {
        use MirroringState::*;
        let table: &[(&str, &[SenderRow], MirroringState)] = &[
            ("", &[], None),
            ("", &[sender("streaming", "async")], None),
            ("\"a_mirror\"", &[], Disconnected),
            ("\"a_mirror\"", &[sender("streaming", "sync")], Synchronized),
            (
                "FIRST 1 (a_mirror)",
                &[sender("streaming", "sync")],
                Synchronized,
            ),
            (
                "ANY 1 (a_mirror, b)",
                &[sender("streaming", "quorum")],
                Synchronized,
            ),
            (
                "\"a_mirror\"",
                &[sender("catchup", "potential")],
                Synchronizing,
            ),
            ("\"a_mirror\"", &[sender("startup", "async")], Synchronizing),
            ("\"a_mirror\"", &[sender("stopping", "sync")], Disconnected),
            ("\"other\"", &[sender("streaming", "async")], Disconnected),
        ];
        for (names, rows, want) in table {
            let m = principal_mirroring(names, rows);
            assert_eq!(m.state, *want, "{names:?} {rows:?}");
        }
        let m = principal_mirroring("\"a_mirror\"", &[sender("streaming", "sync")]);
        assert_eq!((m.lag_bytes, m.partner.as_deref()), (120, Some("a_mirror")));
    }

    #[test]
    fn mirror_states() {
        use MirroringState::*;
        let r = |status: &str, flushed: u64, end: u64| ReceiverRow {
            status: status.into(),
            flushed_lsn: Some(flushed),
            latest_end_lsn: Some(end),
            sender: "127.0.0.1:5432".into(),
        };
        let table = [
            (Option::None, false, Disconnected),
            (Some(r("streaming", 10, 10)), false, Synchronized),
            (Some(r("streaming", 9, 10)), false, Synchronizing),
            (
                Some(ReceiverRow {
                    latest_end_lsn: Option::None,
                    ..r("streaming", 10, 0)
                }),
                false,
                Synchronized,
            ),
            (Some(r("starting", 0, 0)), false, Synchronizing),
            (Some(r("waiting", 10, 10)), false, Disconnected),
            (Some(r("streaming", 10, 10)), true, Suspended),
        ];
        for (row, paused, want) in table {
            assert_eq!(
                mirror_mirroring(row.as_ref(), paused, 0, 0.0).state,
                want,
                "{row:?} paused={paused}"
            );
        }
        assert_eq!(
            mirror_mirroring(Option::None, false, 0, 9.0).lag_seconds,
            0.0
        );
        assert_eq!(
            mirror_mirroring(Option::None, false, 5, 9.0).lag_seconds,
            9.0
        );
    }

    #[test]
    fn conf_edits() {
        let text = "# Do not edit\nsynchronous_standby_names = '\"x\"'\nwork_mem = '4MB'\nprimary_conninfo = 'old'\n";
        let got = edit_conf(
            text,
            &[
                ("primary_conninfo", Some("host=a port=1 user=postgres")),
                ("synchronous_standby_names", None),
            ],
        );
        assert_eq!(
            got,
            "# Do not edit\nwork_mem = '4MB'\nprimary_conninfo = 'host=a port=1 user=postgres'\n"
        );
        assert_eq!(edit_conf("", &[("k", Some("it's"))]), "k = 'it''s'\n");
    }

    #[test]
    fn controldata_fields() {
        let c = parse_controldata(
            "pg_control version number:            1300\n\
             Database system identifier:           7312345678901234567\n\
             Database cluster state:               shut down in recovery\n\
             Latest checkpoint location:           0/3000060\n\
             Latest checkpoint's TimeLineID:       2\n",
        );
        assert_eq!(c.system_identifier.as_deref(), Some("7312345678901234567"));
        assert_eq!(c.cluster_state.as_deref(), Some("shut down in recovery"));
        assert_eq!(c.checkpoint_lsn.as_deref(), Some("0/3000060"));
        assert_eq!(c.timeline, Some(2));
    }

    #[test]
    fn standby_name_lists() {
        assert_eq!(sync_standby_names(""), Vec::<String>::new());
        assert_eq!(sync_standby_names("\"a\""), ["a"]);
        assert_eq!(sync_standby_names("FIRST 1 (a, \"b\")"), ["a", "b"]);
    }
}
