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

/// What a server acknowledged, per room, as it last published it
/// ([`crate::marks::ServerMarks`]): a DR failover's loss bounds are computed from these.
pub fn server_marks(pool: &str, server: &str) -> String {
    format!("/pchat/pools/{pool}/servers/{server}/marks")
}

/// The pool's id-epoch counter ([`crate::ids::IdEpochRecord`]): every epoch a database of
/// the pool was raised to was drawn here once.
pub fn id_epoch(pool: &str) -> String {
    format!("/pchat/pools/{pool}/id-epoch")
}

/// The service's settings (`pchat config set` in a pool: Lync's
/// `Set-CsPersistentChatConfiguration`), JSON; every server follows it without a restart.
/// While it does not exist, the settings kept in the pool's database apply (what a standalone
/// server set before its data was imported into the pool).
pub fn settings(pool: &str) -> String {
    format!("/pchat/pools/{pool}/settings")
}

/// The pool's compliance export settings (`pchat --in-pool P compliance configure`): JSON of
/// `[compliance]`, which replaces every server's own section while it exists. Outside the
/// `compliance/` prefix servers may write: only operators change it.
pub fn compliance_settings(pool: &str) -> String {
    format!("/pchat/pools/{pool}/compliance-settings")
}

/// The compliance exporter's lock: the holder's name under its etcd lease (one exporter per
/// pool at a time).
pub fn compliance_exporter(pool: &str) -> String {
    format!("/pchat/pools/{pool}/compliance/exporter")
}

/// The last compliance export watermark of the pool, published after each run: after a DR
/// failover (or a restore) the database's own watermark may be behind it, and the records
/// between the two may be exported twice (never skipped).
pub fn compliance_exported(pool: &str) -> String {
    format!("/pchat/pools/{pool}/compliance/exported")
}

/// Every key of the compliance export (a prefix): servers may write it.
pub fn compliance_prefix(pool: &str) -> String {
    format!("/pchat/pools/{pool}/compliance/")
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

/// Set by a principal's agent when it gives the leader key up on purpose (its PostgreSQL
/// died or hangs): the mirror then takes over at once. A key that vanished without it was
/// lost or revoked, and the mirror gives the principal a moment to take it back.
pub fn leader_released(pool: &str, site: &str) -> String {
    format!("/pchat/pools/{pool}/sites/{site}/leader-released")
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

/// The final report of the last `pchat pool failover` or `pchat pool failback` that
/// completed (`procedure`: `failover`, `failback`), kept for the servers' dashboards.
pub fn last_report(pool: &str, procedure: &str) -> String {
    format!("/pchat/pools/{pool}/procedures/last-{procedure}")
}

/// Every key of pool `pool` (a prefix, with its trailing `/`).
pub fn pool_prefix(pool: &str) -> String {
    format!("/pchat/pools/{pool}/")
}

/// Every key a server owns (a prefix): what its etcd role may write.
pub fn server_prefix(pool: &str, server: &str) -> String {
    format!("/pchat/pools/{pool}/servers/{server}/")
}

/// Every key of one database instance (a prefix): its status, principal-status and fence.
pub fn instance_prefix(pool: &str, instance: &str) -> String {
    format!("/pchat/pools/{pool}/instances/{instance}/")
}

/// Every key of one site (a prefix): its mirroring record and leader key.
pub fn site_prefix(pool: &str, site: &str) -> String {
    format!("/pchat/pools/{pool}/sites/{site}/")
}

/// The password of one of the pool's PostgreSQL roles (`server`: `pchat_server`,
/// `replication`: `pchat_replication`; see [`crate::postgres::PgRole`]). Outside the pool's
/// own prefix so that read access to the pool (`/pchat/pools/P/`) does not include it: each
/// secret is granted to whoever needs it alone (servers the server's, agents the
/// replication's).
pub fn postgres_password(pool: &str, role: &str) -> String {
    format!("/pchat/secrets/{pool}/postgres/{role}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The etcd roles grant prefixes ([`crate::auth`]): every key must sit under the prefix
    /// of whoever writes it, or a role stops covering it silently.
    #[test]
    fn keys_sit_under_their_owners_prefixes() {
        let (p, s, i, x) = ("pc1", "a1", "a_db", "A");
        assert!(server_alive(p, s).starts_with(&server_prefix(p, s)));
        assert!(server_marks(p, s).starts_with(&server_prefix(p, s)));
        for k in [status(p, i), principal_status(p, i), fence(p, i)] {
            assert!(k.starts_with(&instance_prefix(p, i)), "{k}");
        }
        for k in [mirroring(p, x), leader(p, x), leader_released(p, x)] {
            assert!(k.starts_with(&site_prefix(p, x)), "{k}");
        }
        for k in [
            topology(p),
            state(p),
            server_alive(p, s),
            status(p, i),
            mirroring(p, x),
            log_shipping(p),
            failover(p),
            failback(p),
            last_report(p, "failover"),
            server_marks(p, s),
            id_epoch(p),
        ] {
            assert!(k.starts_with(&pool_prefix(p)), "{k}");
            // Another pool whose name starts with this one's is not under its prefix.
            assert!(!k.starts_with(&pool_prefix("pc")), "{k}");
        }
        assert!(!postgres_password(p, "server").starts_with(&pool_prefix(p)));
        assert!(!server_alive(p, "a10").starts_with(&server_prefix(p, s)));
    }
}
