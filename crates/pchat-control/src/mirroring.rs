//! Who is principal in a site: the site's mirroring record in etcd
//! (`/pchat/pools/P/sites/S/mirroring`), written by the mirroring procedures and the agents'
//! automatic failover, read by everyone — the pool's servers follow its principal.
//!
//! Until mirroring is set up in a site there is no record and the topology's `database` is
//! the principal; a failover swaps the roles in the record.

use serde::{Deserialize, Serialize};

use crate::etcd::Etcd;
use crate::keys;
use crate::pool::PoolError;
use crate::topology::{Database, Site};

/// One instance of a pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The agent's instance name.
    pub instance: String,
    /// PostgreSQL's `host:port`.
    pub address: String,
    /// The agent's URL.
    pub agent: String,
}

/// Whether commits wait for the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Safety {
    /// Established: every commit waits for the mirror (SQL Server SAFETY FULL).
    Full,
    /// A pair exists but the principal runs without its mirror (after a failover, until
    /// `add` re-seeds the old principal): SUSPENDED.
    Suspended,
    /// Removed.
    Off,
}

/// `/pchat/pools/P/sites/S/mirroring`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirroringRecord {
    /// The current principal.
    pub principal: Member,
    /// Its mirror (or the instance that will be re-seeded as one).
    pub mirror: Option<Member>,
    /// Whether commits wait for the mirror.
    pub safety: Safety,
    /// Rises with every change (a failover is a new epoch: SQL Server's recovery fork).
    pub epoch: u64,
    /// RFC 3339.
    pub changed_at: String,
    /// What changed it last.
    pub note: String,
}

/// A site's mirroring record and its etcd revision (0 when there is none).
pub async fn read_record(
    etcd: &Etcd,
    pool: &str,
    site: &str,
) -> Result<(Option<MirroringRecord>, i64), PoolError> {
    match etcd.get(&keys::mirroring(pool, site)).await? {
        Some(kv) => {
            let r: MirroringRecord = serde_json::from_slice(&kv.value)
                .map_err(|e| PoolError::Corrupt(format!("mirroring record of site {site}: {e}")))?;
            Ok((Some(r), kv.mod_revision))
        }
        None => Ok((None, 0)),
    }
}

/// Replaces a site's mirroring record if it is still at etcd revision `revision` (0: if
/// there is none). `false`: somebody changed it meanwhile, and nothing was written.
pub async fn write_record(
    etcd: &Etcd,
    pool: &str,
    site: &str,
    revision: i64,
    record: &MirroringRecord,
) -> Result<bool, PoolError> {
    let json = serde_json::to_vec(record).map_err(|e| PoolError::Corrupt(e.to_string()))?;
    Ok(etcd
        .compare_and_put(&keys::mirroring(pool, site), revision, &json)
        .await?
        .is_some())
}

/// The current principal of a site, for the pool's servers (no agent token needed): the
/// mirroring record's principal once mirroring was set up, the topology's `database` before.
/// A server that follows this instead of `site.database` moves to the new principal after a
/// mirror failover.
pub async fn principal_of(etcd: &Etcd, pool: &str, site: &Site) -> Result<Database, PoolError> {
    Ok(match read_record(etcd, pool, &site.name).await?.0 {
        Some(r) => site_instance(site, &r.principal)?.clone(),
        None => site.database.clone(),
    })
}

/// The topology's instance of `site` that a mirroring record's `member` names. Records are
/// written to etcd by agents as well as by the shell, so a record is followed only where it
/// agrees with the topology (name, address and agent): an address planted in etcd cannot
/// steer servers or the shell to a database or an agent that is not the site's.
pub fn site_instance<'a>(site: &'a Site, member: &Member) -> Result<&'a Database, PoolError> {
    std::iter::once(&site.database)
        .chain(site.mirror.iter())
        .find(|d| d.name == member.instance && d.address == member.address && d.agent == member.agent)
        .ok_or_else(|| {
            PoolError::Corrupt(format!(
                "the mirroring record of site {} names instance `{}` at {} (agent {}), which is not one of the site's instances in the topology; nothing connects to it (republish the topology if the site changed, or check who writes /pchat keys in etcd)",
                site.name, member.instance, member.address, member.agent
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{parse, tests_support::GOOD};

    #[test]
    fn records_are_followed_only_where_they_agree_with_the_topology() {
        let t = parse(GOOD).unwrap();
        let a = t.site("A").unwrap();
        let member = |instance: &str, address: &str, agent: &str| Member {
            instance: instance.into(),
            address: address.into(),
            agent: agent.into(),
        };
        let mirror = member("a_mirror", "10.0.0.2:5432", "https://10.0.0.2:7070");
        assert_eq!(site_instance(a, &mirror).unwrap().name, "a_mirror");
        // A known name at an unknown address, or another site's instance: refused.
        for rogue in [
            member("a_mirror", "10.6.6.6:5432", "https://10.0.0.2:7070"),
            member("a_mirror", "10.0.0.2:5432", "https://10.6.6.6:7070"),
            member("b_db", "10.1.0.1:5432", "https://10.1.0.1:7070"),
        ] {
            let err = site_instance(a, &rogue).unwrap_err().to_string();
            assert!(err.contains("not one of the site's instances"), "{err}");
        }
    }
}
