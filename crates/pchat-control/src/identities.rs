//! Who is who on the pool's connections: the identity of every endpoint the topology names,
//! the names its certificate carries, and how a peer's certificate names map back to it.
//!
//! | identity | PKI directory | names (subject alternative names; no Common Name) |
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

use std::path::{Path, PathBuf};

use pchat_tls::pki::IdentitySpec;
use pchat_tls::{Identity, PeerName};

use crate::etcd::{Credentials, Etcd, EtcdError};
use crate::topology::{host_of, url_host, Topology};

/// The password of an identity's etcd user, beside its certificate (mode 0600; `pchat pki
/// issue` writes it, `pchat control auth setup` gives it to the user).
pub const ETCD_PASSWORD_FILE: &str = "etcd.password";

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

impl Who {
    /// Which pool and identity a certificate of ours is, from its own name (the first of
    /// [`Topology::identity_spec`]'s names: `I.P.pchat`, `S.servers.P.pchat`, …).
    pub fn from_own_names(names: &[String]) -> Option<(String, Who)> {
        names.iter().find_map(|n| {
            let head = n.strip_suffix(&format!(".{SUFFIX}"))?;
            let (_, pool) = head.rsplit_once('.')?;
            let who = Who::from_cert_names(pool, std::slice::from_ref(n))?;
            Some((pool.to_owned(), who))
        })
    }
}

impl Who {
    /// What this identity's certificate must carry and allow in pool `pool`, where peers dial
    /// it at `hosts` (an instance: the hosts of its PostgreSQL address and agent URL; an etcd
    /// member: its URL's; servers and operators are never dialled). Ports play no part, so a
    /// test can issue identities before it knows its ports.
    pub fn identity_spec(&self, pool: &str, hosts: &[&str]) -> IdentitySpec {
        let mut names = vec![self.tls_name(pool)];
        for h in hosts {
            if !names.iter().any(|n| n == h) {
                names.push((*h).to_owned());
            }
        }
        // Instances and etcd members serve TLS and dial their peers (replication, other
        // agents, etcd's peer port) as clients too.
        let server = matches!(self, Who::Instance(_) | Who::Etcd(_));
        IdentitySpec {
            path: self.path(),
            names,
            server,
            client: true,
        }
    }
}

/// The identity of etcd member `k` (1-based) of pool `pool` whose client URL is on `host`.
pub fn etcd_member_spec(pool: &str, k: usize, host: &str) -> IdentitySpec {
    Who::Etcd(k).identity_spec(pool, &[host])
}

/// This process's own identity: the directory given with `--tls-dir` / `tls_dir`.
#[derive(Debug)]
pub struct OwnIdentity {
    /// The certificate, key and CA.
    pub tls: Identity,
    /// The pool its certificate is for.
    pub pool: String,
    /// What it is in that pool.
    pub who: Who,
}

impl OwnIdentity {
    /// Loads the identity in `dir` and learns from its certificate what it is.
    pub fn load(dir: &Path) -> Result<OwnIdentity, EtcdError> {
        let tls = Identity::load(dir).map_err(|e| {
            EtcdError::Access(format!(
                "identity {}: {e} (`pchat pki issue` makes the identity directories)",
                dir.display()
            ))
        })?;
        let Some((pool, who)) = Who::from_own_names(tls.names()) else {
            return Err(EtcdError::Access(format!(
                "identity {}: its certificate ({}) is not a pchat pool identity (`pchat pki issue` makes them)",
                dir.display(),
                tls.names().join(", ")
            )));
        };
        Ok(OwnIdentity { tls, pool, who })
    }

    /// The password of this identity's etcd user.
    pub fn etcd_password(&self) -> Result<String, EtcdError> {
        let path = self.tls.dir().join(ETCD_PASSWORD_FILE);
        pchat_tls::fs::read_secret(&path).map_err(|e| {
            EtcdError::Access(format!(
                "{e} (`pchat pki issue` writes each identity's etcd password)"
            ))
        })
    }

    /// A TLS client with this identity, logged in as `credentials`.
    pub fn etcd_as(
        &self,
        endpoints: &[String],
        credentials: Option<Credentials>,
    ) -> Result<Etcd, EtcdError> {
        let tls = self.tls.client_config(PeerName::Dialled).map_err(|e| {
            EtcdError::Access(format!("identity {}: {e}", self.tls.dir().display()))
        })?;
        Etcd::with_tls(endpoints, &tls, credentials)
    }
}

/// How a process reaches its pool's etcd: the endpoints and its identity directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    /// Client URLs of the members.
    pub endpoints: Vec<String>,
    /// The process's identity (`pchat pki issue`); `None`: plaintext, for insecure pools.
    pub tls_dir: Option<PathBuf>,
    /// How this kind of process is given its identity, for the error that says so.
    pub hint: &'static str,
}

impl EtcdAccess {
    /// A client for pool `pool` (`None`: any pool): over TLS as the identity's etcd user, or
    /// in plaintext when there is no identity — refused when an endpoint is https://, and
    /// later by [`crate::pool::get`] when the pool's topology is not insecure.
    pub fn connect(&self, pool: Option<&str>) -> Result<Etcd, EtcdError> {
        let Some(dir) = &self.tls_dir else {
            if let Some(e) = self.endpoints.iter().find(|e| e.starts_with("https://")) {
                return Err(EtcdError::Access(format!(
                    "etcd at {e} takes only clients with a certificate of the pool: give this process its identity ({}), made by `pchat pki issue`",
                    self.hint
                )));
            }
            return Ok(Etcd::new(&self.endpoints));
        };
        let me = OwnIdentity::load(dir)?;
        if let Some(pool) = pool.filter(|p| *p != me.pool) {
            return Err(EtcdError::Access(format!(
                "identity {} is {} of pool {}, not of pool {pool}: give this process an identity of pool {pool}",
                dir.display(),
                me.who,
                me.pool
            )));
        }
        let Some(user) = me.who.etcd_user() else {
            return Err(EtcdError::Access(format!(
                "identity {} is {}, which has no etcd user: give this process its own identity",
                dir.display(),
                me.who
            )));
        };
        let password = me.etcd_password()?;
        me.etcd_as(&self.endpoints, Some(Credentials { user, password }))
    }
}

/// What [`issue`] did for one identity.
#[derive(Clone, Debug)]
pub struct IssuedIdentity {
    /// Whose it is.
    pub who: Who,
    /// Its directory.
    pub dir: PathBuf,
    /// The names its certificate carries.
    pub names: Vec<String>,
    /// What happened to the certificate.
    pub certificate: pchat_tls::pki::Issued,
    /// Whether its etcd password was made now (it is kept otherwise).
    pub etcd_password_created: bool,
}

/// Issues every identity `t` names and the `operators`' with `ca` (`pchat pki issue`): a
/// certificate that is still good for its names is kept unless `renew`, and every identity
/// with an etcd user gets an `etcd.password` if it has none.
pub fn issue(
    ca: &pchat_tls::pki::Ca,
    t: &Topology,
    operators: &[String],
    renew: bool,
) -> Result<Vec<IssuedIdentity>, pchat_tls::TlsError> {
    let whos = t
        .identities()
        .into_iter()
        .chain(operators.iter().map(|o| Who::Operator(o.clone())));
    let mut out = Vec::new();
    for who in whos {
        if let Some(spec) = t.identity_spec(&who) {
            out.push(issue_one(ca, who, spec, renew)?);
        }
    }
    Ok(out)
}

/// Issues one identity (see [`issue`]).
pub fn issue_one(
    ca: &pchat_tls::pki::Ca,
    who: Who,
    spec: IdentitySpec,
    renew: bool,
) -> Result<IssuedIdentity, pchat_tls::TlsError> {
    let certificate = ca.issue(&spec, renew)?;
    let dir = ca.dir_of(&spec);
    let etcd_password_created =
        who.etcd_user().is_some() && pchat_tls::fs::ensure_secret(&dir.join(ETCD_PASSWORD_FILE))?;
    Ok(IssuedIdentity {
        who,
        dir,
        names: spec.names,
        certificate,
        etcd_password_created,
    })
}

impl Topology {
    /// What `who`'s certificate must carry and allow. `None`: the topology has no such
    /// endpoint (operators always exist).
    pub fn identity_spec(&self, who: &Who) -> Option<IdentitySpec> {
        let hosts = match who {
            Who::Instance(i) => {
                let (_, db) = self.instance(i)?;
                vec![host_of(&db.address), url_host(&db.agent)]
            }
            Who::Server(s) => {
                self.server(s)?;
                Vec::new()
            }
            Who::Etcd(k) => vec![url_host(self.etcd.get(k.checked_sub(1)?)?)],
            Who::Operator(_) => Vec::new(),
        };
        Some(who.identity_spec(&self.pool.name, &hosts))
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
        for who in [
            Who::Instance("a_db".into()),
            Who::Server("a1".into()),
            Who::Operator("root".into()),
            Who::Etcd(3),
        ] {
            let names = vec![who.tls_name("pc-2"), "10.0.0.1".into()];
            assert_eq!(
                Who::from_own_names(&names),
                Some(("pc-2".to_owned(), who.clone()))
            );
        }
        assert_eq!(Who::from_own_names(&["db.example".into()]), None);
        assert_eq!(Who::from_own_names(&["a.b.c.pc1.pchat".into()]), None);
        check(&["x.y.pc1.pchat"], None);
        check(&["pc1.pchat"], None);
        check(&["evil.example"], None);
    }
}
