//! Every etcd key pchat uses, in one place: the layout of a pool's namespace
//! (`/pchat/pools/P/…`) is the control plane's contract between servers, agents and the
//! shell, and the one list to read when deciding who may write what.

/// The published topology ([`crate::Topology`] as JSON); written by `pchat topology publish`.
pub fn topology(pool: &str) -> String {
    format!("/pchat/pools/{pool}/topology")
}

/// The pool state ([`crate::PoolState`]): Normal or FailedOver, active servers, epoch.
pub fn state(pool: &str) -> String {
    format!("/pchat/pools/{pool}/state")
}

/// A server's liveness key, kept under the server's etcd lease while it runs.
pub fn server_alive(pool: &str, server: &str) -> String {
    format!("/pchat/pools/{pool}/servers/{server}/alive")
}

/// An agent's last published status.
pub fn status(pool: &str, instance: &str) -> String {
    format!("/pchat/pools/{pool}/instances/{instance}/status")
}

/// The last status an agent published while its instance was a principal.
pub fn principal_status(pool: &str, instance: &str) -> String {
    format!("/pchat/pools/{pool}/instances/{instance}/principal-status")
}

/// An instance's fence (JSON `null` when none).
pub fn fence(pool: &str, instance: &str) -> String {
    format!("/pchat/pools/{pool}/instances/{instance}/fence")
}

/// A site's mirroring record ([`crate::mirroring::MirroringRecord`]).
pub fn mirroring(pool: &str, site: &str) -> String {
    format!("/pchat/pools/{pool}/sites/{site}/mirroring")
}

/// A site's leader key: the principal's instance name under its agent's lease.
pub fn leader(pool: &str, site: &str) -> String {
    format!("/pchat/pools/{pool}/sites/{site}/leader")
}

/// The log-shipping configuration between the sites.
pub fn log_shipping(pool: &str) -> String {
    format!("/pchat/pools/{pool}/log-shipping")
}

/// The record of the last `pchat pool failover`.
pub fn failover(pool: &str) -> String {
    format!("/pchat/pools/{pool}/procedures/failover")
}

/// A failback's progress, so a re-run resumes at the first unfinished step.
pub fn failback(pool: &str) -> String {
    format!("/pchat/pools/{pool}/procedures/failback")
}

/// The password of one of the pool's PostgreSQL roles (`server`: `pchat_server`,
/// `replication`: `pchat_replication`; see [`crate::postgres::PgRole`]). Outside the pool's
/// own prefix so that read access to the pool (`/pchat/pools/P/`) does not include it: each
/// secret is granted to whoever needs it alone (servers the server's, agents the
/// replication's).
pub fn postgres_password(pool: &str, role: &str) -> String {
    format!("/pchat/secrets/{pool}/postgres/{role}")
}
