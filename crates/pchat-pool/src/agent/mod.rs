//! `pchat agent`: the daemon beside one PostgreSQL instance (Lync's SQL Server Agent).
//!
//! It owns its instance — `initdb`, start, stop, promote, clone from a principal, full
//! backup, restore — and reports its state in SQL Server's words, over an HTTP JSON API that
//! demands a bearer token ([`api`] lists the endpoints). The management shell drives the
//! agents of a pair to build the procedures ([`mirror`]: `pchat db mirror add|remove|status|
//! failover`; [`crate::backup`]: `pchat db backup|restore`).
//!
//! - [`config`]: the TOML file; no token, no start.
//! - [`instance`]: the PostgreSQL administration itself, always as the OS user.
//! - [`serve`]: the HTTP API, one job at a time, progress in `GET /v1/status`; publishes the
//!   instance's status to etcd so a failover can judge a principal that is gone.
//! - [`AgentClient`]: the other side of the API.
//!
//! Keys in etcd (beside the pool's own, see [`crate::pool`]):
//! `/pchat/pools/P/instances/I/status` (last status), `…/principal-status` (last status taken
//! while a principal: what a failover checks when the principal is dead), `…/fence` (set by a
//! failover: the instance may not start as a principal again), and
//! `/pchat/pools/P/sites/S/mirroring` ([`mirror::MirroringRecord`]: who is principal and
//! mirror in a site, and whether commits wait for the mirror).
//!
//! Automatic failover ([`leader`]): the principal's agent holds a leader lease per site
//! (`/pchat/pools/P/sites/S/leader`) while its pair runs with safety FULL, and fences its
//! instance (fast shutdown) when it cannot renew it; the mirror's agent promotes its instance
//! when the lease expires while the principal's last status was SYNCHRONIZED — the same
//! checks and steps as [`mirror::failover`], with the lease as the witness.

pub mod api;
pub mod client;
pub mod config;
pub mod instance;
pub mod leader;
pub mod mirror;
pub mod salvage;
mod server;
pub mod shipping;

pub use api::{MirroringState, Role, Status};
pub use client::{AgentClient, ClientError};
pub use config::AgentConfig;
pub use server::{serve, AgentHandle};

use crate::backup::BackupError;
use crate::etcd::EtcdError;

/// Why the agent could not do something.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is unusable.
    #[error("agent configuration: {0}")]
    Config(String),
    /// File or process I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What the agent was doing.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// A PostgreSQL tool failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The tool.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of its output (and of the server log, for pg_ctl start).
        stderr: String,
    },
    /// A query on the local instance failed.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// The request is not acceptable in the instance's state; nothing was done.
    #[error("{0}")]
    Refused(String),
    /// Another job is running.
    #[error("{0}")]
    Busy(String),
    /// The instance was failed over from and may not start as a principal.
    #[error("fenced: {0}")]
    Fenced(String),
    /// etcd could not be used.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// A backup or restore failed.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// Something else failed.
    #[error("{0}")]
    Failed(String),
}

/// The etcd keys of the agents and of mirroring.
pub mod keys {
    /// The agent's last published status.
    pub fn status(pool: &str, instance: &str) -> String {
        format!("/pchat/pools/{pool}/instances/{instance}/status")
    }
    /// The last status the agent published while its instance was a principal.
    pub fn principal_status(pool: &str, instance: &str) -> String {
        format!("/pchat/pools/{pool}/instances/{instance}/principal-status")
    }
    /// The instance's fence (JSON `null` when none).
    pub fn fence(pool: &str, instance: &str) -> String {
        format!("/pchat/pools/{pool}/instances/{instance}/fence")
    }
    /// A site's mirroring record.
    pub fn mirroring(pool: &str, site: &str) -> String {
        format!("/pchat/pools/{pool}/sites/{site}/mirroring")
    }
    /// A site's leader key: the principal's instance name under its agent's lease.
    pub fn leader(pool: &str, site: &str) -> String {
        format!("/pchat/pools/{pool}/sites/{site}/leader")
    }
}
