//! How a process reaches the pool's agents: which URL is whose, and with what credential.
//!
//! An agent is reached only as an instance the topology names. Its URL comes from the
//! topology (or from an etcd record, which must match the topology: [`AgentAccess::by_url`]),
//! and the connection is bound to that instance:
//!
//! - `https://` (every secure pool): TLS 1.3 with the caller's own identity, the agent's
//!   certificate verified against the pool's CA and *pinned* to the instance's name
//!   (`I.POOL.pchat`) whatever address was dialled. The caller's certificate — its only
//!   credential — is sent encrypted and only after the agent proved its own, so an address
//!   planted in etcd, or another instance answering there, learns nothing and receives no
//!   request. There is no token.
//! - `http://` (a topology with `insecure = true` only): plaintext with the pool's shared
//!   token in `Authorization: Bearer`, as before certificates existed. Anyone on the path
//!   reads it; the topology's warning says so.
//!
//! A client whose agent cannot be reached this way is still made, but every call fails
//! before any connection is attempted ([`ClientError::Access`]): call sites stay simple and
//! nothing slips out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pchat_control::topology::{Database, Topology};
use pchat_control::Who;
use pchat_tls::{Identity, PeerName};

use crate::client::{AgentClient, REQUEST_TIMEOUT};

/// Bound on connecting to an agent, the TLS handshake included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an idle connection to an agent is kept for the next request.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The credentials a process holds for the agents of one pool, and the clients made with
/// them (one per instance, so connections are reused).
#[derive(Clone)]
pub struct AgentAccess {
    pool: String,
    identity: Option<Arc<Identity>>,
    token: Option<String>,
    clients: Arc<Mutex<HashMap<String, reqwest::Client>>>,
}

impl std::fmt::Debug for AgentAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentAccess")
            .field("pool", &self.pool)
            .field("identity", &self.identity.as_ref().map(|i| i.names()))
            .field("token", &self.token.as_ref().map(|_| "(hidden)"))
            .finish()
    }
}

impl AgentAccess {
    /// Access to the agents of pool `pool` with this process's `identity` (for `https://`
    /// agents) and the shared `token` of an insecure pool (for `http://` agents); either may
    /// be missing, and a call that needs it then fails before connecting.
    pub fn new(pool: &str, identity: Option<Arc<Identity>>, token: Option<String>) -> AgentAccess {
        AgentAccess {
            pool: pool.to_owned(),
            identity,
            token: token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()),
            clients: Arc::default(),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// A client for the agent of instance `db` (as the topology names it).
    pub fn instance(&self, db: &Database) -> AgentClient {
        self.named(&db.name, &db.agent)
    }

    /// A client for the agent at `url`, which must be the agent of an instance of `topology`
    /// (an agent URL read from etcd is checked here: one that the topology does not name
    /// gets a client that refuses every call, before any connection).
    pub fn by_url(&self, topology: &Topology, url: &str) -> AgentClient {
        match topology.instance_by_agent(url) {
            Some((_, db)) => self.instance(db),
            None => AgentClient::refusing(
                url,
                format!(
                    "{url} is not the agent of any instance in pool {}'s topology; nothing was sent to it (an agent is reached only at the URL the topology gives it)",
                    topology.pool.name
                ),
            ),
        }
    }

    /// A client for instance `name`'s agent at `url`.
    pub fn named(&self, name: &str, url: &str) -> AgentClient {
        if url.starts_with("https://") {
            let Some(identity) = &self.identity else {
                return AgentClient::refusing(
                    url,
                    "the agents of this pool take only callers with a certificate of the pool: give this command its identity (--tls-dir or PCHAT_TLS_DIR; `pchat pki issue --operator NAME` makes an operator's)".into(),
                );
            };
            match self.tls_client(identity, name) {
                Ok(http) => AgentClient::with(url, http, None),
                Err(e) => AgentClient::refusing(url, e),
            }
        } else if url.starts_with("http://") {
            let Some(token) = &self.token else {
                return AgentClient::refusing(
                    url,
                    "the agents of an insecure pool take its shared token: give --agent-token-file FILE or set PCHAT_AGENT_TOKEN (`pchat agent token FILE` writes one)".into(),
                );
            };
            match self.plain_client() {
                Ok(http) => AgentClient::with(url, http, Some(token.clone())),
                Err(e) => AgentClient::refusing(url, e),
            }
        } else {
            AgentClient::refusing(
                url,
                "an agent URL is https:// (or http:// in an insecure pool)".into(),
            )
        }
    }

    fn cached(
        &self,
        key: &str,
        make: impl FnOnce() -> Result<reqwest::Client, String>,
    ) -> Result<reqwest::Client, String> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(key) {
            return Ok(c.clone());
        }
        let c = make()?;
        clients.insert(key.to_owned(), c.clone());
        Ok(c)
    }

    fn tls_client(&self, identity: &Identity, instance: &str) -> Result<reqwest::Client, String> {
        let pinned = Who::Instance(instance.to_owned()).tls_name(&self.pool);
        self.cached(&format!("tls {pinned}"), || {
            let tls = identity
                .client_config_tls13(PeerName::Pinned(pinned.clone()))
                .map_err(|e| format!("identity {}: {e}", identity.dir().display()))?;
            builder()
                .use_preconfigured_tls((*tls).clone())
                // Never plaintext with an identity, whatever a URL says.
                .https_only(true)
                .build()
                .map_err(|e| format!("HTTPS client for {pinned}: {e}"))
        })
    }

    fn plain_client(&self) -> Result<reqwest::Client, String> {
        self.cached("plain", || {
            builder().build().map_err(|e| format!("HTTP client: {e}"))
        })
    }
}

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        // The agent closes a connection idle for 10 s (its header read timeout): let go of it
        // first, so no request is ever sent on one the agent is closing.
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        // An agent answers; it never sends the caller elsewhere (a redirect would carry the
        // token of an insecure pool to wherever it points).
        .redirect(reqwest::redirect::Policy::none())
}
