//! Who may call the agent's API, and what each caller may do. Pure: the caller as the TLS
//! handshake (or an insecure pool's token) established it, a method and a path in; a
//! decision out.
//!
//! | caller | may |
//! |---|---|
//! | an operator of the pool (`O.operators.P.pchat`) | everything |
//! | this instance itself (`I.P.pchat`, its own agent during an automatic failover) | everything |
//! | another instance of the pool, of the same site | [`PEER_ENDPOINTS`]: what an agent asks of another |
//! | the holder of an insecure pool's token | everything (the token is the operator's) |
//! | a pool server, an etcd member, anything else | nothing (403) |
//!
//! The peer endpoints are those the automatic failover (`pchat_procedures::mirror`, run by
//! the mirror's agent) calls on the principal's agent: its status, a clean stop of a principal
//! still running (a planned failover), a start when that stop has to be undone, and the
//! jobs those two became. Nothing else crosses from one agent to another: cloning and
//! replication go to PostgreSQL, shipping through the share, fences and records through
//! etcd. The site is checked by the server against the topology (an instance of another site
//! never takes part in this site's failover).

use pchat_control::Who;

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An operator of the pool (the management shell).
    Operator(String),
    /// This agent's own instance (the agent calling itself).
    Itself,
    /// Another instance of the pool (its agent).
    Peer(String),
    /// The holder of an insecure pool's shared token.
    Token,
    /// A certificate of the pool's CA that names no caller of agents: a server, an etcd
    /// member, another pool's identity.
    Other(String),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Operator(o) => write!(f, "operator {o}"),
            Caller::Itself => f.write_str("this instance"),
            Caller::Peer(i) => write!(f, "instance {i}"),
            Caller::Token => f.write_str("the insecure pool's token"),
            Caller::Other(what) => f.write_str(what),
        }
    }
}

impl Caller {
    /// The caller of a certificate with `names`, verified against the pool's CA by the
    /// handshake, on the agent of instance `me` of pool `pool`.
    pub fn from_cert_names(pool: &str, me: &str, names: &[String]) -> Caller {
        match Who::from_cert_names(pool, names) {
            Some(Who::Operator(o)) => Caller::Operator(o),
            Some(Who::Instance(i)) if i == me => Caller::Itself,
            Some(Who::Instance(i)) => Caller::Peer(i),
            Some(who @ (Who::Server(_) | Who::Etcd(_))) => Caller::Other(who.to_string()),
            None => Caller::Other(format!(
                "a certificate not of pool {pool} ({})",
                if names.is_empty() {
                    "no names".to_owned()
                } else {
                    names.join(", ")
                }
            )),
        }
    }
}

/// What one agent may ask of another (method, path; `{id}` is a job number).
pub const PEER_ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/v1/status"),
    ("GET", "/v1/jobs/{id}"),
    ("POST", "/v1/stop"),
    ("POST", "/v1/start"),
];

/// The jobs a peer may follow: only those it may start.
pub const PEER_JOB_KINDS: &[&str] = &["stop", "start"];

/// The decision on one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Go ahead if the peer is of this agent's site (and, for a job, if it is of
    /// [`PEER_JOB_KINDS`]); the server checks both.
    AllowPeer {
        /// The job asked for (`GET /v1/jobs/{id}`).
        job: Option<u64>,
    },
    /// 403, with the reason.
    Forbid(String),
}

fn matches(pattern: &str, path: &str) -> Option<Option<u64>> {
    match pattern.strip_suffix("{id}") {
        Some(prefix) => path
            .strip_prefix(prefix)
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|id| id.parse().ok())
            .map(Some),
        None => (pattern == path).then_some(None),
    }
}

/// Decides whether `caller` may `method path`.
pub fn decide(caller: &Caller, method: &str, path: &str) -> Decision {
    match caller {
        Caller::Operator(_) | Caller::Itself | Caller::Token => Decision::Allow,
        Caller::Peer(i) => PEER_ENDPOINTS
            .iter()
            .filter(|(m, _)| *m == method)
            .find_map(|(_, p)| matches(p, path))
            .map(|job| Decision::AllowPeer { job })
            .unwrap_or_else(|| {
                Decision::Forbid(format!(
                    "instance {i} may ask this agent only what one agent asks of another in a failover ({}); {method} {path} is for the pool's operators",
                    PEER_ENDPOINTS
                        .iter()
                        .map(|(m, p)| format!("{m} {p}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }),
        Caller::Other(what) => Decision::Forbid(format!(
            "{what} may not use the agent's API: only the pool's operators (`pchat pki issue --operator NAME`) and, for a failover, the other instances of the site may"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn callers_from_certificates() {
        let check = |n: &[&str], want: Caller| {
            assert_eq!(
                Caller::from_cert_names("pc1", "a_db", &names(n)),
                want,
                "{n:?}"
            );
        };
        check(
            &["admin.operators.pc1.pchat"],
            Caller::Operator("admin".into()),
        );
        check(&["a_db.pc1.pchat", "127.0.0.1"], Caller::Itself);
        check(&["a_mirror.pc1.pchat"], Caller::Peer("a_mirror".into()));
        check(&["a1.servers.pc1.pchat"], Caller::Other("server a1".into()));
        check(&["etcd-1.pc1.pchat"], Caller::Other("etcd member 1".into()));
        // Another pool's operator is nobody here.
        assert!(matches!(
            Caller::from_cert_names("pc1", "a_db", &names(&["admin.operators.pc2.pchat"])),
            Caller::Other(_)
        ));
        assert!(matches!(
            Caller::from_cert_names("pc1", "a_db", &[]),
            Caller::Other(_)
        ));
    }

    #[test]
    fn decisions() {
        let op = Caller::Operator("admin".into());
        let peer = Caller::Peer("a_mirror".into());
        let server = Caller::Other("server a1".into());
        let table: &[(&Caller, &str, &str, Decision)] = &[
            (&op, "POST", "/v1/restore", Decision::Allow),
            (&op, "POST", "/v1/install", Decision::Allow),
            (&Caller::Itself, "POST", "/v1/promote", Decision::Allow),
            (&Caller::Token, "POST", "/v1/backup", Decision::Allow),
            (
                &peer,
                "GET",
                "/v1/status",
                Decision::AllowPeer { job: None },
            ),
            (&peer, "POST", "/v1/stop", Decision::AllowPeer { job: None }),
            (
                &peer,
                "POST",
                "/v1/start",
                Decision::AllowPeer { job: None },
            ),
            (
                &peer,
                "GET",
                "/v1/jobs/17",
                Decision::AllowPeer { job: Some(17) },
            ),
        ];
        for (caller, method, path, want) in table {
            assert_eq!(
                &decide(caller, method, path),
                want,
                "{caller} {method} {path}"
            );
        }
        // Everything else is refused to peers (a wrong method too), and all to servers.
        for (method, path) in [
            ("POST", "/v1/status"),
            ("GET", "/v1/stop"),
            ("POST", "/v1/promote"),
            ("POST", "/v1/backup"),
            ("POST", "/v1/restore"),
            ("POST", "/v1/clone-from"),
            ("POST", "/v1/salvage"),
            ("POST", "/v1/install"),
            ("POST", "/v1/role-password"),
            ("GET", "/v1/log-shipping"),
            ("GET", "/v1/jobs/"),
            ("GET", "/v1/jobs/1/x"),
            ("GET", "/v1/jobs/-1"),
            ("GET", "/v1/status/"),
            ("GET", "/v1/../v1/status"),
        ] {
            assert!(
                matches!(decide(&peer, method, path), Decision::Forbid(_)),
                "peer {method} {path}"
            );
        }
        for (method, path) in [("GET", "/v1/status"), ("GET", "/v1/jobs/1")] {
            assert!(matches!(decide(&server, method, path), Decision::Forbid(_)));
        }
    }
}
