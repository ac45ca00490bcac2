//! Who is who on the pool's connections: the identity of every endpoint the topology names,
//! the names its certificate carries, and how a peer's certificate names map back to it.
//!
//! | identity | PKI directory | names (first = CN) |
//! |---|---|---|
//! | database instance I | `instances/I` | `I.POOL.pchat`, the host of its PostgreSQL address and of its agent URL |
//! | pool server S | `servers/S` | `S.servers.POOL.pchat` |
//! | etcd member k (1-based, topology order) | `etcd/k` | `etcd-k.POOL.pchat`, the host of its URL |
//! | operator O | `operators/O` | `O.operators.POOL.pchat` |
//!
//! Peers are verified against the `….pchat` name (pinned), not against the address dialled:
//! several instances may share a host, and addresses come from etcd, which agents write too.
//! etcd members are the exception: every client dials their URL from the topology, and they
//! are all equal, so their certificates carry the URL's host and are verified by it.

use pchat_tls::pki::IdentitySpec;

use crate::topology::{host_of, url_host, Topology};

/// The suffix of every pool identity name.
const SUFFIX: &str = "pchat";

/// One endpoint of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Who {
    /// The database instance of that name (its PostgreSQL and its agent).
    Instance(String),
    /// The pool server of that name.
    Server(String),
    /// The etcd member at that (1-based) position of the topology's list.
    Etcd(usize),
    /// An administrator using the management shell.
    Operator(String),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Instance(i) => write!(f, "instance {i}"),
            Who::Server(s) => write!(f, "server {s}"),
            Who::Etcd(k) => write!(f, "etcd member {k}"),
            Who::Operator(o) => write!(f, "operator {o}"),
        }
    }
}

impl Who {
    /// The identity's directory under the PKI root.
    pub fn path(&self) -> String {
        match self {
            Who::Instance(i) => format!("instances/{i}"),
            Who::Server(s) => format!("servers/{s}"),
            Who::Etcd(k) => format!("etcd/{k}"),
            Who::Operator(o) => format!("operators/{o}"),
        }
    }

    /// The name peers pin for this identity in pool `pool`.
    pub fn tls_name(&self, pool: &str) -> String {
        match self {
            Who::Instance(i) => format!("{i}.{pool}.{SUFFIX}"),
            Who::Server(s) => format!("{s}.servers.{pool}.{SUFFIX}"),
            Who::Etcd(k) => format!("etcd-{k}.{pool}.{SUFFIX}"),
            Who::Operator(o) => format!("{o}.operators.{pool}.{SUFFIX}"),
        }
    }

    /// The etcd user this identity authenticates as (etcd's JSON gateway cannot map a
    /// certificate to a user, so each identity also has a password: `etcd.password` in its
    /// directory). etcd members have none.
    pub fn etcd_user(&self) -> Option<String> {
        match self {
            Who::Instance(i) => Some(format!("agent-{i}")),
            Who::Server(s) => Some(format!("server-{s}")),
            Who::Operator(o) => Some(format!("operator-{o}")),
            Who::Etcd(_) => None,
        }
    }

    /// Which identity of pool `pool` a peer is, from the names of its (verified)
    /// certificate. `None`: not one of the pool's.
    pub fn from_cert_names(pool: &str, names: &[String]) -> Option<Who> {
        let tail = format!(".{pool}.{SUFFIX}");
        names.iter().find_map(|n| {
            let head = n.strip_suffix(&tail)?;
            if let Some(o) = head.strip_suffix(".operators") {
                (!o.contains('.')).then(|| Who::Operator(o.to_owned()))
            } else if let Some(s) = head.strip_suffix(".servers") {
                (!s.contains('.')).then(|| Who::Server(s.to_owned()))
            } else if let Some(k) = head.strip_prefix("etcd-") {
                k.parse().ok().map(Who::Etcd)
            } else {
                (!head.contains('.')).then(|| Who::Instance(head.to_owned()))
            }
        })
    }
}

impl Topology {
    /// What `who`'s certificate must carry and allow. `None`: the topology has no such
    /// endpoint (operators always exist).
    pub fn identity_spec(&self, who: &Who) -> Option<IdentitySpec> {
        let pool = &self.pool.name;
        let mut names = vec![who.tls_name(pool)];
        let (server, client) = match who {
            Who::Instance(i) => {
                let (_, db) = self.instance(i)?;
                names.push(host_of(&db.address).to_owned());
                names.push(url_host(&db.agent).to_owned());
                (true, true)
            }
            Who::Server(s) => {
                self.server(s)?;
                (false, true)
            }
            Who::Etcd(k) => {
                let url = self.etcd.get(k.checked_sub(1)?)?;
                names.push(url_host(url).to_owned());
                // Members talk to each other (peer TLS) as clients too.
                (true, true)
            }
            Who::Operator(_) => (false, true),
        };
        names.dedup();
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        Some(IdentitySpec {
            path: who.path(),
            names,
            server,
            client,
        })
    }

    /// Every identity the pool's own endpoints need (operators are issued on request).
    pub fn identities(&self) -> Vec<Who> {
        self.instances()
            .map(|(_, d)| Who::Instance(d.name.clone()))
            .chain(self.servers.iter().map(|s| Who::Server(s.name.clone())))
            .chain((1..=self.etcd.len()).map(Who::Etcd))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{parse, tests_support::GOOD};

    #[test]
    fn every_endpoint_has_an_identity_with_its_names() {
        let t = parse(GOOD).unwrap();
        let ids = t.identities();
        assert_eq!(
            ids,
            [
                Who::Instance("a_db".into()),
                Who::Instance("a_mirror".into()),
                Who::Instance("b_db".into()),
                Who::Server("a1".into()),
                Who::Server("b1".into()),
                Who::Etcd(1),
            ]
        );
        let a = t.identity_spec(&Who::Instance("a_db".into())).unwrap();
        assert_eq!(a.path, "instances/a_db");
        assert_eq!(a.names, ["a_db.pc1.pchat", "10.0.0.1"]);
        assert!(a.server && a.client);
        let s = t.identity_spec(&Who::Server("b1".into())).unwrap();
        assert_eq!(s.names, ["b1.servers.pc1.pchat"]);
        assert!(!s.server && s.client);
        let e = t.identity_spec(&Who::Etcd(1)).unwrap();
        assert_eq!(e.names, ["etcd-1.pc1.pchat", "127.0.0.1"]);
        assert!(t.identity_spec(&Who::Etcd(2)).is_none());
        assert!(t.identity_spec(&Who::Instance("zz".into())).is_none());
        assert!(t.identity_spec(&Who::Operator("root".into())).is_some());
    }

    #[test]
    fn certificate_names_map_back_to_identities() {
        let check = |names: &[&str], expect: Option<Who>| {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            assert_eq!(Who::from_cert_names("pc1", &names), expect, "{names:?}");
        };
        for who in [
            Who::Instance("a_db".into()),
            Who::Server("a1".into()),
            Who::Operator("root".into()),
            Who::Etcd(3),
        ] {
            check(&[&who.tls_name("pc1")], Some(who.clone()));
            // Another pool's identity is nobody here.
            check(&[&who.tls_name("pc2")], None);
        }
        check(
            &["10.0.0.1", "a_db.pc1.pchat"],
            Some(Who::Instance("a_db".into())),
        );
        check(&["x.y.pc1.pchat"], None);
        check(&["pc1.pchat"], None);
        check(&["evil.example"], None);
    }
}
