//! Pool state and active servers in etcd (Lync's Set-CsPersistentChatActiveServer and
//! Set-CsPersistentChatState). The whole dynamic state of a pool is one etcd key; every change
//! reads it, computes the new state, and writes it back with a compare-and-swap on the revision
//! it read, so two administrators can never interleave: the second gets [`PoolError::Conflict`].

use serde::{Deserialize, Serialize};

use crate::etcd::{Etcd, EtcdError};
use crate::keys;
use crate::topology::{SiteRole, Topology};

/// Which databases are authoritative.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolStateKind {
    /// The primary site's databases (Lync PoolState Normal).
    Normal,
    /// The backup site's databases (Lync PoolState FailedOver).
    FailedOver,
}

impl PoolStateKind {
    /// Parses `normal` / `failed-over`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Some(PoolStateKind::Normal),
            "failed-over" | "failedover" => Some(PoolStateKind::FailedOver),
            _ => None,
        }
    }
}

/// The dynamic state of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolState {
    /// Normal or FailedOver.
    pub state: PoolStateKind,
    /// Servers allowed to serve, in the order given.
    pub active_servers: Vec<String>,
    /// Increases with every change: servers and agents compare epochs to ignore stale orders.
    pub epoch: u64,
}

/// A pool's topology and state as read from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolView {
    /// The published topology.
    pub topology: Topology,
    /// The current state.
    pub state: PoolState,
    /// etcd revision of the state key.
    pub revision: i64,
}

/// Why a pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// etcd could not be used.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// No topology was published for the pool.
    #[error("pool `{0}` has no published topology: run `pchat topology publish FILE` first")]
    UnknownPool(String),
    /// Somebody else changed the pool between our read and our write.
    #[error("the pool changed while this command ran (another administrator?); nothing was changed: check `pchat pool get {0}` and run the command again")]
    Conflict(String),
    /// The requested change is not allowed.
    #[error("{0}")]
    Refused(String),
    /// What is stored in etcd cannot be read.
    #[error("stored pool data is unreadable: {0}")]
    Corrupt(String),
    /// The pool is not insecure, and this process reached etcd without an identity.
    #[error("pool {0} is not insecure (its topology has no `insecure = true`), and this process has no identity: give it one (the shell: --tls-dir DIR or PCHAT_TLS_DIR; a server: `pchat serve --tls-dir DIR`; an agent: `tls_dir` in its configuration), made by `pchat pki issue`, with the topology's https:// etcd endpoints")]
    NeedsIdentity(String),
}

/// Publishes a topology; creates the pool state (Normal, no active servers) the first time.
pub async fn publish_topology(etcd: &Etcd, topology: &Topology) -> Result<(), PoolError> {
    let pool = &topology.pool.name;
    let json = serde_json::to_vec(topology).map_err(|e| PoolError::Corrupt(e.to_string()))?;
    etcd.put(&keys::topology(pool), &json).await?;
    let initial = PoolState {
        state: PoolStateKind::Normal,
        active_servers: Vec::new(),
        epoch: 1,
    };
    let json = serde_json::to_vec(&initial).map_err(|e| PoolError::Corrupt(e.to_string()))?;
    // Only if absent: republishing a topology never resets a live pool's state.
    etcd.compare_and_put(&keys::state(pool), 0, &json).await?;
    Ok(())
}

/// Reads a pool's topology and state.
pub async fn get(etcd: &Etcd, pool: &str) -> Result<PoolView, PoolError> {
    let topo = etcd
        .get(&keys::topology(pool))
        .await?
        .ok_or_else(|| PoolError::UnknownPool(pool.to_owned()))?;
    let topology: Topology =
        serde_json::from_slice(&topo.value).map_err(|e| PoolError::Corrupt(e.to_string()))?;
    // A plaintext client may follow only a pool that says it is insecure: otherwise this is
    // a misconfigured process (or etcd answering on a plaintext port it should not have).
    if !etcd.is_secure() && !topology.insecure {
        return Err(PoolError::NeedsIdentity(pool.to_owned()));
    }
    crate::topology::warn_if_insecure(&topology);
    let st = etcd
        .get(&keys::state(pool))
        .await?
        .ok_or_else(|| PoolError::UnknownPool(pool.to_owned()))?;
    let state: PoolState =
        serde_json::from_slice(&st.value).map_err(|e| PoolError::Corrupt(e.to_string()))?;
    Ok(PoolView {
        topology,
        state,
        revision: st.mod_revision,
    })
}

/// A change to the active-server list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActiveChange {
    /// Replace the list.
    Set(Vec<String>),
    /// Add one server.
    Add(String),
    /// Remove one server.
    Remove(String),
    /// Clear the list (the failback's first step).
    None,
    /// Active ↔ idle.
    Swap,
}

/// Computes the new state for `change`, enforcing the pool's rules.
pub fn plan_active(
    view: &PoolView,
    change: &ActiveChange,
    allow_remote_site: bool,
) -> Result<PoolState, PoolError> {
    let t = &view.topology;
    let current = &view.state.active_servers;
    let mut next: Vec<String> = match change {
        ActiveChange::Set(list) => list.clone(),
        ActiveChange::Add(s) => {
            let mut l = current.clone();
            if !l.contains(s) {
                l.push(s.clone());
            }
            l
        }
        ActiveChange::Remove(s) => {
            if !current.contains(s) {
                return Err(PoolError::Refused(format!(
                    "server `{s}` is not active (active: {})",
                    list(current)
                )));
            }
            current.iter().filter(|x| *x != s).cloned().collect()
        }
        ActiveChange::None => Vec::new(),
        ActiveChange::Swap => t
            .servers
            .iter()
            .map(|s| s.name.clone())
            .filter(|n| !current.contains(n))
            .collect(),
    };
    let mut seen = std::collections::HashSet::new();
    next.retain(|s| seen.insert(s.clone()));
    for name in &next {
        if t.server(name).is_none() {
            let known: Vec<String> = t.servers.iter().map(|s| s.name.clone()).collect();
            return Err(PoolError::Refused(format!(
                "no server `{name}` in pool `{}` (servers: {})",
                t.pool.name,
                list(&known)
            )));
        }
    }
    if next.len() > t.pool.active_servers_max {
        return Err(PoolError::Refused(format!(
            "{} active servers requested; pool `{}` allows at most {} (active_servers_max)",
            next.len(),
            t.pool.name,
            t.pool.active_servers_max
        )));
    }
    if !allow_remote_site {
        check_sites(t, view.state.state, &next)?;
    }
    Ok(PoolState {
        state: view.state.state,
        active_servers: next,
        epoch: view.state.epoch + 1,
    })
}

/// Refuses active servers outside the site whose databases `state` makes authoritative (the
/// seed's IMPORTANT note: servers must sit beside their databases).
fn check_sites(t: &Topology, state: PoolStateKind, servers: &[String]) -> Result<(), PoolError> {
    let site = t
        .authoritative_site(state)
        .map(|s| s.name.clone())
        .unwrap_or_default();
    for name in servers {
        let server_site = t.server(name).map(|s| s.site.clone()).unwrap_or_default();
        if server_site != site {
            return Err(PoolError::Refused(format!(
                "server `{name}` is in site `{server_site}`, but the pool state {state:?} makes site `{site}`'s databases authoritative; \
                 active servers must be in the same data center as the databases (add --allow-remote-site if the link is low-latency)"
            )));
        }
    }
    Ok(())
}

/// Computes the new state for a pool-state change. The active list is kept (the procedures
/// set it in their own step), so it must suit the new state's site unless
/// `allow_remote_site`: clear it or change it first.
pub fn plan_state(
    view: &PoolView,
    state: PoolStateKind,
    allow_remote_site: bool,
) -> Result<PoolState, PoolError> {
    let role = match state {
        PoolStateKind::Normal => SiteRole::Primary,
        PoolStateKind::FailedOver => SiteRole::Backup,
    };
    if !view.topology.sites.iter().any(|s| s.role == role) {
        return Err(PoolError::Refused(format!(
            "the topology has no {role:?} site, so the pool cannot be {state:?}"
        )));
    }
    if !allow_remote_site {
        check_sites(&view.topology, state, &view.state.active_servers)?;
    }
    Ok(PoolState {
        state,
        active_servers: view.state.active_servers.clone(),
        epoch: view.state.epoch + 1,
    })
}

/// Writes `next` if the pool is still at `view.revision`.
pub async fn commit(etcd: &Etcd, view: &PoolView, next: &PoolState) -> Result<PoolView, PoolError> {
    let pool = &view.topology.pool.name;
    let json = serde_json::to_vec(next).map_err(|e| PoolError::Corrupt(e.to_string()))?;
    match etcd
        .compare_and_put(&keys::state(pool), view.revision, &json)
        .await?
    {
        Some(revision) => Ok(PoolView {
            topology: view.topology.clone(),
            state: next.clone(),
            revision,
        }),
        None => Err(PoolError::Conflict(pool.clone())),
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(active: &[&str], state: PoolStateKind) -> PoolView {
        let mut text = crate::topology::tests_support::GOOD.to_owned();
        text = text.replace("[pool]\n", "[pool]\nactive_servers_max = 2\n");
        text.push_str("\n[[servers]]\nname = \"a2\"\nsite = \"A\"\naddress = \"10.0.0.11:5222\"\n");
        text.push_str("\n[[servers]]\nname = \"a3\"\nsite = \"A\"\naddress = \"10.0.0.12:5222\"\n");
        let topology = crate::topology::parse(&text).unwrap();
        PoolView {
            topology,
            state: PoolState {
                state,
                active_servers: active.iter().map(|s| s.to_string()).collect(),
                epoch: 7,
            },
            revision: 3,
        }
    }

    fn check(
        active: &[&str],
        state: PoolStateKind,
        change: ActiveChange,
        remote: bool,
        expect: Result<&[&str], &str>,
    ) {
        let got = plan_active(&view(active, state), &change, remote);
        match (got, expect) {
            (Ok(s), Ok(want)) => {
                assert_eq!(s.active_servers, want, "{change:?}");
                assert_eq!(s.epoch, 8);
            }
            (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{change:?}: {e}"),
            (got, want) => panic!("{change:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn active_server_rules() {
        use ActiveChange::*;
        use PoolStateKind::*;
        check(
            &[],
            Normal,
            Set(vec!["a1".into(), "a2".into()]),
            false,
            Ok(&["a1", "a2"]),
        );
        check(
            &[],
            Normal,
            Set(vec!["a1".into(), "a2".into(), "a3".into()]),
            false,
            Err("at most 2"),
        );
        check(&[], Normal, Set(vec!["b1".into()]), false, Err("site `B`"));
        check(&[], Normal, Set(vec!["b1".into()]), true, Ok(&["b1"]));
        check(&[], FailedOver, Set(vec!["b1".into()]), false, Ok(&["b1"]));
        check(
            &[],
            FailedOver,
            Set(vec!["a1".into()]),
            false,
            Err("site `A`"),
        );
        check(&["a1"], Normal, Add("a2".into()), false, Ok(&["a1", "a2"]));
        check(&["a1"], Normal, Add("a1".into()), false, Ok(&["a1"]));
        check(
            &["a1", "a2"],
            Normal,
            Remove("a1".into()),
            false,
            Ok(&["a2"]),
        );
        check(
            &["a1"],
            Normal,
            Remove("a3".into()),
            false,
            Err("not active"),
        );
        check(&["a1", "a2"], Normal, None, false, Ok(&[]));
        check(
            &[],
            Normal,
            Set(vec!["zz".into()]),
            false,
            Err("no server `zz`"),
        );
        // Swap: the idle servers become active; b1 is remote, so a plain swap is refused.
        check(&["a1"], Normal, Swap, false, Err("at most 2"));
        check(&["a1", "b1"], Normal, Swap, false, Ok(&["a2", "a3"]));
    }

    #[test]
    fn state_change_keeps_active_list() {
        let v = view(&["a1"], PoolStateKind::Normal);
        let err = plan_state(&v, PoolStateKind::FailedOver, false).unwrap_err();
        assert!(err.to_string().contains("site `B`"), "{err}");
        let s = plan_state(&v, PoolStateKind::FailedOver, true).unwrap();
        assert_eq!(
            (s.state, s.active_servers.as_slice(), s.epoch),
            (PoolStateKind::FailedOver, &["a1".to_owned()][..], 8)
        );
    }
}
