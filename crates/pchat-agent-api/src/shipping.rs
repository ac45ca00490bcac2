//! Log shipping's part of the agent API: the role an instance plays
//! (`POST /v1/log-shipping`), the preflight's request and checks (`POST /v1/preflight`), and
//! what the three jobs report (`GET /v1/log-shipping`, and in [`crate::Status`]). The jobs
//! themselves run in the agent (`pchat-agent`'s `shipping` module).

use serde::{Deserialize, Serialize};

/// What log shipping makes of this instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum ShippingRole {
    /// No log shipping.
    #[default]
    None,
    /// Archives its WAL into the share (backup job).
    Source {
        /// The configuration's WAL directory in the share.
        share_dir: String,
        /// `archive_timeout`: the longest a written segment waits to be shipped.
        backup_interval_s: u64,
        /// Shipped files older than this are deleted from the share (SQL Server: 72 h).
        retention_h: u64,
    },
    /// Copies from the share and replays (copy and restore jobs).
    Secondary {
        /// The configuration's WAL directory in the share.
        share_dir: String,
        /// The local copy directory.
        copy_dir: String,
        /// How often the copy job runs.
        copy_interval_s: u64,
        /// `recovery_min_apply_delay` in seconds.
        restore_delay_s: u64,
        /// Where the seeding backup started (an LSN): the standby needs the segments from
        /// there on; older ones in the share are ignored.
        start_lsn: Option<String>,
        /// The copy job is paused (`pchat db log-shipping pause`).
        #[serde(default)]
        copy_paused: bool,
    },
}

/// `POST /v1/log-shipping`: the instance's role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippingRequest {
    /// The new role.
    pub role: ShippingRole,
}

/// `POST /v1/preflight`: what the OS user must be able to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightRequest {
    /// Directories the OS user must read.
    pub read: Vec<String>,
    /// Directories the OS user must write (created if missing and the parent allows it).
    pub write: Vec<String>,
}

/// One preflight check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked.
    pub what: String,
    /// Whether it holds.
    pub ok: bool,
    /// What is missing and how to grant it, when it does not.
    pub fix: Option<String>,
}

/// The backup job as the source sees it (PostgreSQL's `pg_stat_archiver`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupJob {
    /// The last segment archived.
    pub last_archived: Option<String>,
    /// When (RFC 3339).
    pub last_archived_at: Option<String>,
    /// Failed attempts since the statistics were reset.
    pub failures: i64,
    /// The last file that failed, and when.
    pub last_failed: Option<String>,
    /// When (RFC 3339).
    pub last_failed_at: Option<String>,
    /// Whether the newest attempt failed (the archiver retries it).
    pub failing: bool,
}

/// The copy job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CopyJob {
    /// Paused by an administrator.
    pub paused: bool,
    /// The last file copied.
    pub last_copied: Option<String>,
    /// When (RFC 3339).
    pub last_copy_at: Option<String>,
    /// When the job last ran (RFC 3339).
    pub last_run_at: Option<String>,
    /// Shipped files not copied yet.
    pub pending: u64,
    /// Why the job stopped short, naming the file.
    pub error: Option<String>,
}

/// The restore job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreJob {
    /// Where replay is.
    pub replay_lsn: Option<String>,
    /// The segment being replayed.
    pub segment: Option<String>,
    /// The time of the last replayed commit (RFC 3339).
    pub last_commit_at: Option<String>,
    /// When replay last advanced (RFC 3339).
    pub last_restore_at: Option<String>,
    /// Copied segments beyond the one being replayed.
    pub pending: u64,
    /// `recovery_min_apply_delay`.
    pub delay_s: u64,
    /// A copied file the restore command refused (checksum mismatch).
    pub rejected: Option<String>,
    /// Set when replay went past the point where its timeline ended (it applied WAL an old
    /// principal wrote after a failover) and has stood still since: this standby can never
    /// follow the new principal and must be seeded again. What happened and what to do.
    #[serde(default)]
    pub diverged: Option<String>,
}

/// `GET /v1/log-shipping`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShippingStatus {
    /// The configured role.
    pub role: ShippingRole,
    /// Source: the backup job.
    pub backup: Option<BackupJob>,
    /// Secondary: the copy job.
    pub copy: Option<CopyJob>,
    /// Secondary: the restore job.
    pub restore: Option<RestoreJob>,
    /// Problems, each naming what to do.
    pub alerts: Vec<String>,
}

/// What a run of the copy job did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRun {
    /// Files copied in this run.
    pub copied: u64,
    /// Shipped files still not copied.
    pub pending: u64,
    /// Why it stopped short.
    pub error: Option<String>,
}
