//! A small etcd v3 client over etcd's JSON gateway (`/v3/kv/…`), so the default build needs
//! nothing outside crates.io (the gRPC client crates compile protobufs and need `protoc`).
//! Only what the control plane uses: get, put, delete, compare-and-swap transactions, leases
//! (grant, keep-alive, revoke; a key put under a lease vanishes when it expires), and the user
//! and role administration of `pchat control auth setup` ([`crate::auth`]).
//!
//! A secure pool's etcd takes TLS with a certificate from the pool's CA (`--client-cert-auth`)
//! and then an etcd user: [`Etcd::with_tls`] presents the process's identity and logs in as
//! its user (`POST /v3/auth/authenticate` with the password from the identity's
//! `etcd.password`), then sends the token in the `Authorization` header of every request.
//!
//! Why users with passwords, not the certificate alone: etcd maps a client certificate's
//! Common Name to a user only on its gRPC port. Measured with etcd 3.4.23, client-cert-auth and
//! auth enabled, through the JSON gateway:
//! - a client certificate *with* a Common Name gets `400 CommonName of client sending a
//!   request against gateway will be ignored and not used as expected` on every `/v3/` path,
//!   `/v3/auth/authenticate` included (so pool identities carry no Common Name);
//! - without a token: `400 etcdserver: user name is empty` (the gateway's own connection to
//!   etcd uses the member's certificate, whose name etcd ignores for the gateway);
//! - with a token: the user's roles decide (`403 etcdserver: permission denied` outside them);
//! - a token etcd no longer knows (member restarted, 5 minutes unused on that member):
//!   `401 etcdserver: invalid auth token`; a token from before any change to users or roles:
//!   `400 etcdserver: revision of auth store is old`. The client logs in again once and
//!   repeats the request;
//! - before auth is enabled, `/v3/auth/authenticate` answers `authentication is not enabled`:
//!   the client then sends no token (a fresh cluster, before `pchat control auth setup`).
//!   Lease grant needs no permission; revoking a lease needs write access to its keys.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error("etcd unreachable at {endpoints}: {last} (is etcd running? check the etcd endpoints in the topology)")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last error.
        last: String,
    },
    /// etcd answered with an error (no quorum, bad request…).
    #[error("etcd refused the request: {0}")]
    Refused(String),
    /// The answer did not have the expected shape.
    #[error("unexpected answer from etcd: {0}")]
    Protocol(String),
    /// etcd did not accept this client's user: wrong password, unknown user, or a token it
    /// refused again right after logging in.
    #[error("etcd did not accept user `{user}`: {reason}")]
    Unauthenticated {
        /// The etcd user.
        user: String,
        /// etcd's answer, and what to do.
        reason: String,
    },
    /// The user may not do this (its roles do not cover the key).
    #[error("etcd user `{user}` may not do this: {reason}")]
    PermissionDenied {
        /// The etcd user (`(none)` on a client without one).
        user: String,
        /// etcd's answer.
        reason: String,
    },
    /// This process cannot reach etcd as configured: no identity for a TLS endpoint, an
    /// identity that cannot be read or belongs to another pool, an identity with a plaintext
    /// endpoint.
    #[error("{0}")]
    Access(String),
}

/// A key's value and the revision that last changed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The value.
    pub value: Vec<u8>,
    /// etcd `mod_revision`.
    pub mod_revision: i64,
    /// The lease the key lives under (0: none).
    pub lease: i64,
}

/// An etcd user and its password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// What this client last learnt about its login.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Login {
    /// Not tried yet.
    Unknown,
    /// Authentication is not enabled on the cluster: requests carry no token.
    NotEnabled,
    /// The token to send.
    Token(String),
}

#[derive(Debug)]
struct Auth {
    credentials: Credentials,
    login: Mutex<Login>,
    /// One login at a time: the requests that find the token stale wait for the one login
    /// instead of each making their own (every login is a raft write and a bcrypt on etcd).
    logging_in: tokio::sync::Mutex<()>,
}

impl Auth {
    fn current(&self) -> Login {
        self.login.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, login: Login) {
        *self.login.lock().unwrap_or_else(|p| p.into_inner()) = login;
    }
}

/// Client for a set of etcd endpoints. Each call starts with the member that answered last
/// and goes round the others until one answers; a member that fails, or that a caller gave
/// up waiting for, is passed over from then on. So one hung member (frozen, cut off, without
/// a leader) costs the first call that meets it, not every call for as long as it hangs
/// (found by the chaos suite: `freeze etcd-leader` held every agent and server for the
/// whole freeze, since all of them asked the first member first).
#[derive(Clone, Debug)]
pub struct Etcd {
    endpoints: Vec<String>,
    http: reqwest::Client,
    tls: bool,
    auth: Option<Arc<Auth>>,
    /// The index of the member to ask first (shared by the clones of this client).
    preferred: Arc<AtomicUsize>,
}

/// Bound on one etcd request: a member without quorum must not hang an admin command.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on asking one member while others are left to try: etcd answers in milliseconds
/// when it has a leader, and a member that has none answers only after its own timeout.
const TRY_TIMEOUT: Duration = Duration::from_secs(2);

/// Passes over the member being asked unless it answered: dropped on an error, a timeout,
/// or when the caller stops waiting (its own deadline), it makes the next member the first
/// one asked — unless another call has already moved on.
struct PassOver<'a> {
    preferred: &'a AtomicUsize,
    at: usize,
    of: usize,
    answered: bool,
}

impl Drop for PassOver<'_> {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.preferred.compare_exchange(
                self.at,
                (self.at + 1) % self.of,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}
/// Bound on connecting (and the TLS handshake) to one member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn int(v: &Value) -> i64 {
    // The gateway encodes int64 as strings and leaves zero values out.
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// An error with its causes: reqwest's own message hides why a TLS handshake failed.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// How one endpoint answered.
enum Answer {
    Ok(Value),
    /// Try the next endpoint (unreachable, no leader, timed out).
    Next(String),
    /// The token is missing, unknown or stale: log in again.
    Stale(String),
    Denied(String),
    Refused(String),
}

impl Etcd {
    /// A plaintext client for `endpoints` (`http://host:port`): insecure pools and tests only.
    pub fn new(endpoints: &[String]) -> Self {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .unwrap_or_default();
        Etcd {
            endpoints: trim(endpoints),
            http,
            tls: false,
            auth: None,
            preferred: Arc::default(),
        }
    }

    /// A client over TLS with `tls` (the process's identity: it verifies the members against
    /// the pool's CA and presents its certificate), logging in as `credentials` when given.
    /// Every endpoint must be `https://`: an identity is never used in plaintext.
    pub fn with_tls(
        endpoints: &[String],
        tls: &rustls::ClientConfig,
        credentials: Option<Credentials>,
    ) -> Result<Self, EtcdError> {
        if let Some(e) = endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(EtcdError::Access(format!(
                "etcd endpoint `{e}` is not https://: a process with an identity reaches etcd only over TLS (use the https:// endpoints of the topology)"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .use_preconfigured_tls(tls.clone())
            .build()
            .map_err(|e| EtcdError::Access(format!("etcd client: {}", chain(&e))))?;
        Ok(Etcd {
            endpoints: trim(endpoints),
            http,
            tls: true,
            preferred: Arc::default(),
            auth: credentials.map(|credentials| {
                Arc::new(Auth {
                    credentials,
                    login: Mutex::new(Login::Unknown),
                    logging_in: tokio::sync::Mutex::new(()),
                })
            }),
        })
    }

    /// Whether this client uses TLS (with a pool identity).
    pub fn is_secure(&self) -> bool {
        self.tls
    }

    /// The etcd user this client logs in as, if any.
    pub fn user(&self) -> Option<&str> {
        self.auth.as_ref().map(|a| a.credentials.user.as_str())
    }

    /// Whether this client's requests carry a token: it has a user and etcd's authentication
    /// is enabled. Known after its first request.
    pub fn logged_in(&self) -> bool {
        self.auth
            .as_ref()
            .is_some_and(|a| matches!(a.current(), Login::Token(_)))
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn user_or_none(&self) -> String {
        self.user().unwrap_or("(none)").to_owned()
    }

    /// One request to the first endpoint that answers, logging in first (and once more on a
    /// stale token) when this client has a user.
    pub(crate) async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let Some(auth) = &self.auth else {
            return self.send(path, &body, None).await;
        };
        let mut login = auth.current();
        if login == Login::Unknown {
            login = self.log_in(auth, &login).await?;
        }
        match self.send(path, &body, Some(&login)).await {
            Err(EtcdError::Unauthenticated { .. }) => {
                let fresh = self.log_in(auth, &login).await?;
                self.send(path, &body, Some(&fresh)).await
            }
            r => r,
        }
    }

    /// Logs in unless another request already replaced `stale`; returns the login to use.
    async fn log_in(&self, auth: &Auth, stale: &Login) -> Result<Login, EtcdError> {
        let _one = auth.logging_in.lock().await;
        let now = auth.current();
        if now != *stale && now != Login::Unknown {
            return Ok(now);
        }
        let c = &auth.credentials;
        let body = json!({ "name": c.user, "password": c.password });
        let login = match self.send("/v3/auth/authenticate", &body, None).await {
            Ok(v) => match v.get("token").and_then(Value::as_str) {
                Some(t) if !t.is_empty() => Login::Token(t.to_owned()),
                _ => {
                    return Err(EtcdError::Protocol(format!(
                        "authenticate answered without a token: {v}"
                    )))
                }
            },
            Err(EtcdError::Refused(m)) if m.contains("authentication is not enabled") => {
                Login::NotEnabled
            }
            Err(EtcdError::Refused(m)) | Err(EtcdError::Unauthenticated { reason: m, .. })
                if m.contains("authentication failed") =>
            {
                auth.set(Login::Unknown);
                return Err(EtcdError::Unauthenticated {
                    user: c.user.clone(),
                    reason: format!(
                        "{m} (the user's password is the identity's etcd.password; `pchat control auth setup` creates the users and sets their passwords)"
                    ),
                });
            }
            Err(e) => return Err(e),
        };
        auth.set(login.clone());
        Ok(login)
    }

    async fn send(
        &self,
        path: &str,
        body: &Value,
        login: Option<&Login>,
    ) -> Result<Value, EtcdError> {
        let mut last = String::from("no endpoints configured");
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed);
        for i in 0..n {
            let at = (first + i) % n;
            let ep = &self.endpoints[at];
            let mut pass = PassOver {
                preferred: &self.preferred,
                at,
                of: n,
                answered: false,
            };
            let within = if i + 1 < n {
                TRY_TIMEOUT
            } else {
                REQUEST_TIMEOUT
            };
            let answer = tokio::time::timeout(within, self.send_to(ep, path, body, login))
                .await
                .unwrap_or_else(|_| Answer::Next(format!("{ep}: no answer within {within:?}")));
            // Any answer but "try another" comes from a member that works.
            pass.answered = !matches!(answer, Answer::Next(_));
            if pass.answered {
                self.preferred.store(at, Ordering::Relaxed);
            }
            drop(pass);
            match answer {
                Answer::Ok(v) => return Ok(v),
                Answer::Next(m) => last = m,
                Answer::Stale(reason) => {
                    return Err(EtcdError::Unauthenticated {
                        user: self.user_or_none(),
                        reason,
                    })
                }
                Answer::Denied(reason) => {
                    return Err(EtcdError::PermissionDenied {
                        user: self.user_or_none(),
                        reason,
                    })
                }
                Answer::Refused(m) => return Err(EtcdError::Refused(m)),
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints.join(","),
            last,
        })
    }

    async fn send_to(&self, ep: &str, path: &str, body: &Value, login: Option<&Login>) -> Answer {
        let mut req = self.http.post(format!("{ep}{path}")).json(body);
        if let Some(Login::Token(t)) = login {
            req = req.header(reqwest::header::AUTHORIZATION, t);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Answer::Next(format!("{ep}: {}", chain(&e))),
        };
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Answer::Next(format!("{ep}: {}", chain(&e))),
        };
        let v: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(_) => {
                // Not JSON: an HTTP-level refusal (e.g. the gateway's Common Name check).
                let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
                    .trim()
                    .to_owned();
                let m = format!("{ep}: {status} {text}");
                return if status.is_server_error() || status.is_success() {
                    Answer::Next(m)
                } else {
                    Answer::Refused(m)
                };
            }
        };
        if status.is_success() && v.get("error").is_none() {
            return Answer::Ok(v);
        }
        let msg = v
            .get("message")
            .or_else(|| v.get("error"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let m = format!("{ep}: {status} {msg}");
        if msg.contains("invalid auth token")
            || msg.contains("user name is empty")
            || msg.contains("revision of auth store is old")
        {
            return Answer::Stale(m);
        }
        if msg.contains("permission denied") {
            return Answer::Denied(m);
        }
        // A member that lost quorum answers with an error: another member may not have.
        if msg.contains("leader") || msg.contains("timed out") || status.is_server_error() {
            return Answer::Next(m);
        }
        Answer::Refused(m)
    }

    /// The value of `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let v = self
            .call("/v3/kv/range", json!({ "key": B64.encode(key) }))
            .await?;
        let Some(kv) = v
            .get("kvs")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        else {
            return Ok(None);
        };
        let value = match kv.get("value").and_then(Value::as_str) {
            Some(s) => B64
                .decode(s)
                .map_err(|e| EtcdError::Protocol(e.to_string()))?,
            None => Vec::new(),
        };
        Ok(Some(KeyValue {
            value,
            mod_revision: kv.get("mod_revision").map(int).unwrap_or(0),
            lease: kv.get("lease").map(int).unwrap_or(0),
        }))
    }

    /// Sets `key` unconditionally; returns the new revision.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<i64, EtcdError> {
        let v = self
            .call(
                "/v3/kv/put",
                json!({ "key": B64.encode(key), "value": B64.encode(value) }),
            )
            .await?;
        Ok(v.pointer("/header/revision").map(int).unwrap_or(0))
    }

    /// Sets `key` only if its `mod_revision` is still `expected` (0: the key must not exist).
    /// Returns `Some(new revision)` on success, `None` when someone else changed it first.
    pub async fn compare_and_put(
        &self,
        key: &str,
        expected: i64,
        value: &[u8],
    ) -> Result<Option<i64>, EtcdError> {
        let k = B64.encode(key);
        let body = json!({
            "compare": [{ "key": k, "target": "MOD", "result": "EQUAL", "mod_revision": expected.to_string() }],
            "success": [{ "request_put": { "key": k, "value": B64.encode(value) } }],
        });
        let v = self.call("/v3/kv/txn", body).await?;
        let ok = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        Ok(ok.then(|| v.pointer("/header/revision").map(int).unwrap_or(0)))
    }

    /// Deletes `key` (no error when it does not exist).
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        self.call("/v3/kv/deleterange", json!({ "key": B64.encode(key) }))
            .await
            .map(drop)
    }

    /// Grants a lease of `ttl_s` seconds; returns its id. The lease expires unless
    /// [`Etcd::lease_keepalive`] renews it within `ttl_s`.
    pub async fn lease_grant(&self, ttl_s: u64) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/grant", json!({ "TTL": ttl_s.to_string() }))
            .await?;
        match v.get("ID").map(int) {
            Some(id) if id != 0 => Ok(id),
            _ => Err(EtcdError::Protocol(format!(
                "lease grant without an ID: {v}"
            ))),
        }
    }

    /// Renews lease `id` once; returns its TTL in seconds from now, or `None` when the lease
    /// no longer exists (it expired or was revoked: the keys under it are gone).
    pub async fn lease_keepalive(&self, id: i64) -> Result<Option<i64>, EtcdError> {
        let v = self
            .call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))
            .await?;
        // The gateway streams `{"result": {...}}`; a lease that is gone comes back with TTL 0.
        let ttl = v
            .get("result")
            .and_then(|r| r.get("TTL"))
            .map(int)
            .unwrap_or(0);
        Ok((ttl > 0).then_some(ttl))
    }

    /// Revokes lease `id`: the keys under it are deleted now. A lease that is already gone
    /// is not an error.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        match self
            .call("/v3/lease/revoke", json!({ "ID": id.to_string() }))
            .await
        {
            Err(EtcdError::Refused(m)) if m.contains("not found") => Ok(()),
            r => r.map(drop),
        }
    }

    /// Sets `key` under lease `lease` (the key is deleted when the lease ends); returns the
    /// new revision.
    pub async fn put_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
    ) -> Result<i64, EtcdError> {
        let v = self
            .call(
                "/v3/kv/put",
                json!({ "key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string() }),
            )
            .await?;
        Ok(v.pointer("/header/revision").map(int).unwrap_or(0))
    }

    /// Creates `key` only if it does not exist, under `lease` when given. Returns
    /// `Some(new revision)` when this call created it, `None` when the key exists.
    pub async fn put_if_absent(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<Option<i64>, EtcdError> {
        let compare = json!({ "key": B64.encode(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" });
        self.put_if(compare, key, value, lease).await
    }

    /// Replaces `key` only if its value is still `expected`, under `lease` when given.
    /// Returns `Some(new revision)` on success, `None` when the value differs or the key is
    /// gone.
    pub async fn put_if_value(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<Option<i64>, EtcdError> {
        let compare = json!({ "key": B64.encode(key), "target": "VALUE", "result": "EQUAL", "value": B64.encode(expected) });
        self.put_if(compare, key, value, lease).await
    }

    async fn put_if(
        &self,
        compare: Value,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<Option<i64>, EtcdError> {
        let mut put = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if let Some(l) = lease {
            put["lease"] = json!(l.to_string());
        }
        let body = json!({
            "compare": [compare],
            "success": [{ "request_put": put }],
        });
        let v = self.call("/v3/kv/txn", body).await?;
        let ok = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        Ok(ok.then(|| v.pointer("/header/revision").map(int).unwrap_or(0)))
    }
}

fn trim(endpoints: &[String]) -> Vec<String> {
    endpoints
        .iter()
        .map(|e| e.trim_end_matches('/').to_owned())
        .collect()
}
