//! A small etcd v3 client over etcd's JSON gateway (`/v3/kv/…`), so the default build needs
//! nothing outside crates.io (the gRPC client crates compile protobufs and need `protoc`).
//! Only what the control plane uses: get, put, delete, compare-and-swap transactions, and
//! leases (grant, keep-alive, revoke; a key put under a lease vanishes when it expires).

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
}

/// A key's value and the revision that last changed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The value.
    pub value: Vec<u8>,
    /// etcd `mod_revision`.
    pub mod_revision: i64,
}

/// Client for a set of etcd endpoints; each call tries them in order until one answers.
#[derive(Clone, Debug)]
pub struct Etcd {
    endpoints: Vec<String>,
    http: reqwest::Client,
}

/// Bound on one etcd request: a member without quorum must not hang an admin command.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn int(v: &Value) -> i64 {
    // The gateway encodes int64 as strings and leaves zero values out.
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

impl Etcd {
    /// A client for `endpoints` (`http://host:port`).
    pub fn new(endpoints: &[String]) -> Self {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        Etcd {
            endpoints: endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_owned())
                .collect(),
            http,
        }
    }

    async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let mut last = String::from("no endpoints configured");
        for ep in &self.endpoints {
            let resp = match self
                .http
                .post(format!("{ep}{path}"))
                .json(&body)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{ep}: {e}");
                    continue;
                }
            };
            let status = resp.status();
            let v: Value = match resp.json().await {
                Ok(v) => v,
                Err(e) => {
                    last = format!("{ep}: {e}");
                    continue;
                }
            };
            if !status.is_success() || v.get("error").is_some() {
                let msg = v
                    .get("message")
                    .or_else(|| v.get("error"))
                    .map(ToString::to_string)
                    .unwrap_or_default();
                // A member that lost quorum answers with an error: another member may not have.
                last = format!("{ep}: {status} {msg}");
                if msg.contains("leader") || msg.contains("timed out") || status.is_server_error() {
                    continue;
                }
                return Err(EtcdError::Refused(last));
            }
            return Ok(v);
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints.join(","),
            last,
        })
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
