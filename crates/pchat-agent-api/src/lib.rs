//! The agent's HTTP API in types: what `GET /v1/status` reports and what each `POST` takes,
//! and [`AgentClient`], the management shell's side of it. Shared by the agent (`pchat-agent`)
//! and everything that talks to it (the procedures, the shell) so the two sides cannot drift
//! apart. A leaf: it depends on no other pool crate, so both sides can depend on it.
//!
//! Callers are authenticated by TLS: the agent serves HTTPS with its instance's certificate
//! and takes only clients with a certificate of the pool (mutual TLS 1.3), then decides by the
//! caller's identity — the pool's operators may do everything, the other instances of the same
//! site only what one agent asks of another during an automatic failover (`GET /v1/status`,
//! `POST /v1/stop`, `POST /v1/start` and following those jobs), servers and anyone else nothing
//! (403). An insecure pool's agents (`insecure = true`) serve plain HTTP and take the pool's
//! shared token instead (`Authorization: Bearer <token>`). [`AgentAccess`] makes the clients.
//! Mutating requests start a *job* and
//! answer `202 {"job": {...}}` at once; the caller follows it with `GET /v1/jobs/{id}` (the
//! client does this for you). One job runs at a time per instance: a second gets `409`.
//! Errors are `{"error": "<kind>", "message": "<what happened and how to fix it>"}`.
//!
//! | endpoint | body | does |
//! |---|---|---|
//! | `GET /v1/status` | | [`Status`]: role, state, lag, timeline, LSNs, fence, current job |
//! | `GET /v1/jobs/{id}` | | one [`Job`] |
//! | `POST /v1/init` | | `initdb` if the data directory is empty |
//! | `POST /v1/start` | | start (refused when fenced and not a standby) |
//! | `POST /v1/stop` | [`StopRequest`] | stop, fast or immediate |
//! | `POST /v1/promote` | | end recovery: a writable principal on a new timeline |
//! | `POST /v1/clone-from` | [`CloneRequest`] | `pg_basebackup` from a principal, start as its mirror |
//! | `POST /v1/synchronous-standby` | [`SyncStandbyRequest`] | which standby commits wait for |
//! | `POST /v1/slot` | [`SlotRequest`] | create or drop a replication slot |
//! | `POST /v1/backup` | [`BackupRequest`] | full backup into a share, with a manifest |
//! | `POST /v1/restore` | [`RestoreRequest`] | verified restore over the instance |
//! | `GET /v1/log-shipping` | | [`shipping::ShippingStatus`] |
//! | `POST /v1/log-shipping` | [`shipping::ShippingRequest`] | set the log-shipping role |
//! | `POST /v1/log-shipping/copy` | | run the copy job now (also when paused) |
//! | `POST /v1/switch-wal` | | close the current WAL segment (it is shipped now) |
//! | `POST /v1/salvage` | [`salvage::SalvageRequest`] | an old principal's unshipped messages |
//! | `POST /v1/preflight` | [`shipping::PreflightRequest`] | prove the OS user's access |
//! | `POST /v1/install` | [`InstallRequest`] | create `mgc`/`mgccomp`, the servers' role, the schema and its grants |
//! | `POST /v1/role-password` | [`RolePasswordRequest`] | set a role's password (the principal) |
//! | `POST /v1/replication-password` | | re-read the replication password from etcd (a standby) |
//!
//! Requests that carry a password never echo it: not in a job, a log line or an error.

#![warn(missing_docs)]

pub mod access;
pub mod backup;
pub mod client;
pub mod salvage;
pub mod shipping;

pub use access::AgentAccess;
pub use client::{AgentClient, ClientError};

use serde::{Deserialize, Serialize};

/// What an instance currently is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Running and writable (SQL Server's PRINCIPAL).
    Principal,
    /// Running in recovery, streaming from a principal (SQL Server's MIRROR).
    Mirror,
    /// Running in recovery with no streaming source: a restore `--norecovery`, or a
    /// log-shipping secondary (SQL Server's RESTORING / STANDBY database).
    Standby,
    /// Not running (or not initialised).
    Stopped,
}

/// Database mirroring state, in SQL Server's words (`sys.database_mirroring.mirroring_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MirroringState {
    /// The mirror has everything the principal committed: every commit waits for it.
    Synchronized,
    /// The mirror is connected and catching up; commits wait until it has them.
    Synchronizing,
    /// Mirroring is configured but not protecting commits: the mirror's replay is paused, or
    /// the principal runs without its mirror (after a failover, until `mirror add`).
    Suspended,
    /// The partners cannot reach each other. On a principal with synchronous mirroring,
    /// commits *block* until the mirror is back (see docs/operations/mirroring.md).
    Disconnected,
    /// Not mirrored.
    None,
}

impl MirroringState {
    /// The SQL Server spelling (`SYNCHRONIZED`, …; `NONE` when not mirrored).
    pub fn as_str(self) -> &'static str {
        match self {
            MirroringState::Synchronized => "SYNCHRONIZED",
            MirroringState::Synchronizing => "SYNCHRONIZING",
            MirroringState::Suspended => "SUSPENDED",
            MirroringState::Disconnected => "DISCONNECTED",
            MirroringState::None => "NONE",
        }
    }
}

impl std::fmt::Display for MirroringState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The replication link as one side sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mirroring {
    /// The state in SQL Server's words.
    pub state: MirroringState,
    /// On a principal: the mirror's name (its `application_name`). On a mirror: the
    /// principal's `host:port`.
    pub partner: Option<String>,
    /// PostgreSQL's own words for the link (`streaming sync`, `catchup async`, …), for
    /// operators who know them.
    pub detail: Option<String>,
    /// On a principal: WAL written here and not yet flushed by the mirror (SQL Server's send
    /// queue). On a mirror: WAL received and not yet replayed (the redo queue).
    pub lag_bytes: u64,
    /// The same lag in time (PostgreSQL's `flush_lag` on a principal; age of the last
    /// replayed commit on a mirror with a redo queue); 0 when there is no lag.
    pub lag_seconds: f64,
    /// On a principal: `synchronous_standby_names`.
    pub synchronous_standby_names: Option<String>,
}

impl Mirroring {
    /// Not mirrored.
    pub fn none() -> Self {
        Mirroring {
            state: MirroringState::None,
            partner: None,
            detail: None,
            lag_bytes: 0,
            lag_seconds: 0.0,
            synchronous_standby_names: None,
        }
    }
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The instance's name (agent config `instance`).
    pub instance: String,
    /// The pool it belongs to.
    pub pool: String,
    /// What it is now.
    pub role: Role,
    /// Whether the data directory holds a cluster.
    pub initialized: bool,
    /// PostgreSQL's data directory.
    pub data_dir: String,
    /// PostgreSQL's port.
    pub port: u16,
    /// `pg_controldata`'s system identifier: equal on a principal and its mirror.
    pub system_identifier: Option<String>,
    /// The WAL timeline (a promotion starts a new one: SQL Server's recovery fork).
    pub timeline: Option<u32>,
    /// The last WAL location: written (principal) or received and flushed (mirror).
    pub wal_lsn: Option<String>,
    /// The last replayed WAL location (mirror, standby).
    pub replay_lsn: Option<String>,
    /// The last checkpoint's location from `pg_control`; after a clean stop, the end of
    /// everything this instance wrote.
    pub checkpoint_lsn: Option<String>,
    /// `pg_controldata`'s cluster state (`in production`, `shut down`, …), when stopped.
    pub cluster_state: Option<String>,
    /// The replication link.
    pub mirroring: Mirroring,
    /// Set when etcd says this instance was failed over from: it will not start as a principal.
    pub fenced: Option<Fence>,
    /// Messages in the archive (the sum of the rooms' sequence counters in `mgc`), when the
    /// instance runs and holds pchat's databases: compared across instances, it counts what
    /// one has and the other lacks (a failover's data-loss window, log shipping's lag).
    #[serde(default)]
    pub messages: Option<u64>,
    /// Sessions connected to `mgc` or `mgccomp` other than the agent's own (the pool's
    /// servers): a failback's first step waits until there are none.
    #[serde(default)]
    pub client_connections: Option<u64>,
    /// Log shipping's jobs on this instance, when it has a log-shipping role.
    #[serde(default)]
    pub log_shipping: Option<shipping::ShippingStatus>,
    /// The running job, or the last one.
    pub job: Option<Job>,
    /// When this status was taken (RFC 3339, UTC).
    pub at: String,
}

/// A job's outcome so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Still running.
    Running,
    /// Done.
    Succeeded,
    /// Stopped with an error.
    Failed,
}

/// One long operation of the agent, with its progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Increasing per agent process.
    pub id: u64,
    /// `init`, `start`, `stop`, `promote`, `clone-from`, `backup`, `restore`, …
    pub kind: String,
    /// Running, succeeded or failed.
    pub state: JobState,
    /// The current step, in words.
    pub step: String,
    /// Progress of the current step, when known.
    pub percent: Option<u8>,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once finished.
    pub finished_at: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// What it produced (a backup's manifest, …).
    pub result: Option<serde_json::Value>,
}

/// Written to etcd when an instance stops being the principal through a failover: its agent
/// refuses to start it as a principal again (it may only come back as a mirror).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The instance that became principal.
    pub by: String,
    /// The mirroring record's epoch at the failover.
    pub epoch: u64,
    /// RFC 3339.
    pub at: String,
}

/// `POST /v1/stop`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRequest {
    /// `pg_ctl stop -m immediate` instead of `fast` (no shutdown checkpoint).
    #[serde(default)]
    pub immediate: bool,
}

/// `POST /v1/clone-from`: make this instance a streaming standby of a principal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRequest {
    /// The principal's PostgreSQL host (its address in the topology; a name is resolved).
    pub host: String,
    /// The principal's PostgreSQL port.
    pub port: u16,
    /// The principal's instance name: with TLS its certificate must carry
    /// `NAME.POOL.pchat` (the copy and the replication connection are `verify-full`).
    #[serde(default)]
    pub instance: Option<String>,
    /// Physical replication slot on the principal (keeps WAL for this mirror while it is away).
    pub slot: Option<String>,
    /// Replace a data directory that holds another cluster.
    #[serde(default)]
    pub overwrite: bool,
}

/// `POST /v1/synchronous-standby`: which standby every commit waits for (`None`: none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStandbyRequest {
    /// The standby's `application_name` (its instance name).
    pub name: Option<String>,
}

/// `POST /v1/slot`: create (or drop) a physical replication slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRequest {
    /// Slot name (`[a-z0-9_]`).
    pub name: String,
    /// Drop instead of create.
    #[serde(default)]
    pub drop: bool,
}

/// `POST /v1/backup`: a full backup of this instance into `to/name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRequest {
    /// The share (a directory on the agent's host).
    pub to: String,
    /// The backup set's name (≤ 128 characters, no `/`).
    pub name: String,
    /// Free text (≤ 255 characters).
    pub description: Option<String>,
}

/// `POST /v1/restore`: replace this instance's data with a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The backup directory (`SHARE/NAME`).
    pub from: String,
    /// Replace a data directory that is not empty.
    pub overwrite: bool,
    /// `true`: ready to use (RESTORE WITH RECOVERY). `false`: a standby waiting for log
    /// shipping (WITH NORECOVERY).
    pub recovery: bool,
}

/// `POST /v1/install`: on the principal, create the databases `mgc` and `mgccomp` where
/// missing, the servers' role `pchat_server` with this password, the schema (or its
/// upgrade), and the role's grants. Idempotent.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallRequest {
    /// The password of `pchat_server` (from etcd; the shell made it).
    pub server_password: String,
}

impl std::fmt::Debug for InstallRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstallRequest").finish_non_exhaustive()
    }
}

/// `POST /v1/role-password`: on the principal, create the role if it is missing (with its
/// rights: `pchat_server` LOGIN, `pchat_replication` LOGIN REPLICATION) and set its password.
/// Standbys get it through replication.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolePasswordRequest {
    /// Which role.
    pub role: pchat_control::postgres::PgRole,
    /// The new password.
    pub password: String,
}

impl std::fmt::Debug for RolePasswordRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolePasswordRequest")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Error body of every refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `unauthorized` (401), `forbidden` (403), `busy`, `refused`, `not-found`,
    /// `bad-request`, `too-large` (413), `failed`.
    pub error: String,
    /// What happened and how to fix it.
    pub message: String,
}

/// Parses a PostgreSQL LSN (`16/B374D848`) into a byte position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u64::from(u32::MAX) && lo <= u64::from(u32::MAX)).then_some((hi << 32) | lo)
}

/// Formats a byte position as a PostgreSQL LSN.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Now, RFC 3339 UTC: the spelling of every time in the API.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        for (text, value) in [
            ("0/0", 0),
            ("0/3000148", 0x300_0148),
            ("16/B374D848", 0x16_B374_D848),
        ] {
            assert_eq!(parse_lsn(text), Some(value), "{text}");
            assert_eq!(format_lsn(value), text);
        }
        for bad in ["", "0", "x/1", "1/", "100000000/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }

    #[test]
    fn states_use_sql_server_names() {
        let json = serde_json::to_string(&MirroringState::Synchronized).unwrap();
        assert_eq!(json, "\"SYNCHRONIZED\"");
        assert_eq!(MirroringState::Disconnected.to_string(), "DISCONNECTED");
    }
}
