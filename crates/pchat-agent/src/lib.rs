//! `pchat agent`: the daemon beside one PostgreSQL instance (Lync's SQL Server Agent).
//!
//! It owns its instance — `initdb`, start, stop, promote, clone from a principal, full
//! backup, restore — and reports its state in SQL Server's words, over an HTTPS JSON API
//! that takes only callers with a certificate of the pool (the endpoints and their types are
//! `pchat-agent-api`). The management shell drives the agents of a pair through that API to
//! build the procedures (`pchat-procedures`).
//!
//! - [`config`]: the TOML file; an identity (`tls_dir`) or an explicit `insecure = true` with
//!   a token file, or no start.
//! - [`instance`]: the PostgreSQL administration itself, always as the OS user.
//! - [`serve`]: the API, one job at a time, progress in `GET /v1/status`; publishes the
//!   instance's status to etcd so a failover can judge a principal that is gone. Its listener
//!   (`listener`: mutual TLS 1.3 with the instance's identity, bounded connections and
//!   times) and who may call what ([`access`]: operators everything, the site's other
//!   instances what a failover asks, nobody else anything).
//! - [`shipping`]: the log-shipping jobs on this instance (archive, verified copy, restore),
//!   with [`shipping_conf`]: the role kept beside the data directory and the settings and
//!   scripts it puts into PostgreSQL's configuration.
//! - [`salvage`]: an old principal's unshipped messages, read before a failback replaces it.
//! - [`leader`]: the site's leader lease and automatic failover.
//!
//! Keys in etcd (names in `pchat_control::keys`): `…/instances/I/status` (last status),
//! `…/principal-status` (last status taken while a principal: what a failover checks when
//! the principal is dead), `…/fence` (set by a failover: the instance may not start as a
//! principal again), and the site's mirroring record (`pchat_control::mirroring`: who is
//! principal and mirror in a site, and whether commits wait for the mirror).
//!
//! Automatic failover ([`leader`]): the principal's agent holds a leader lease per site
//! (`/pchat/pools/P/sites/S/leader`) while its pair runs with safety FULL, and fences its
//! instance (fast shutdown) when it cannot renew it; the mirror's agent promotes its instance
//! when the lease expires while the principal's last status was SYNCHRONIZED — the same
//! checks and steps as `pchat db mirror failover` (`pchat_procedures::mirror`), with the
//! lease as the witness.
#![warn(missing_docs)]

pub mod access;
mod conf;
pub mod config;
pub mod instance;
pub mod leader;
mod listener;
mod metrics;
pub mod salvage;
mod server;
pub mod shipping;
pub mod shipping_conf;

pub use config::AgentConfig;
pub use server::{serve, AgentHandle};

use pchat_control::EtcdError;
use pchat_procedures::backup::BackupError;

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
    /// TLS material or a file in the OS user's directories could not be used (a planted
    /// link is refused here).
    #[error(transparent)]
    Tls(#[from] pchat_tls::TlsError),
    /// Something else failed.
    #[error("{0}")]
    Failed(String),
}
