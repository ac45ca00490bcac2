//! The management shell's side of the agent API: one call per endpoint; mutating calls
//! follow their job to the end and hand its progress to the caller.

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::backup::Manifest;
use crate::salvage::{SalvageReport, SalvageRequest};
use crate::shipping::{
    Check, CopyRun, PreflightRequest, ShippingRequest, ShippingRole, ShippingStatus,
};
use crate::{
    BackupRequest, CloneRequest, ErrorBody, InstallRequest, Job, JobState, RestoreRequest,
    RolePasswordRequest, SlotRequest, Status, StopRequest, SyncStandbyRequest,
};

/// Bound on one HTTP request (jobs are followed by polling, so none is long).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a job is polled.
const POLL: Duration = Duration::from_millis(200);
/// How long a job may go unobserved (agent unreachable) before the caller gives up on it.
const POLL_GIVE_UP: Duration = Duration::from_secs(30);

/// Why a call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered.
    #[error("agent {agent} unreachable: {detail} (is `pchat agent` running there?)")]
    Unreachable {
        /// The agent's URL.
        agent: String,
        /// The transport error.
        detail: String,
    },
    /// Nothing was sent: the agent cannot be reached safely (a URL the topology does not
    /// name, no identity for an https:// agent, no token for an http:// one).
    #[error("agent {agent}: {detail}")]
    Access {
        /// The agent's URL.
        agent: String,
        /// Why, and how to fix it.
        detail: String,
    },
    /// The agent refused the caller (401: no or a wrong token; 403: a certificate that may
    /// not do this).
    #[error("agent {agent} refused this caller: {message}")]
    Unauthorized {
        /// The agent's URL.
        agent: String,
        /// The agent's explanation.
        message: String,
    },
    /// The agent refused the request (busy, not in a state that allows it, bad request).
    #[error("agent {agent}: {message}")]
    Refused {
        /// The agent's URL.
        agent: String,
        /// HTTP status.
        status: u16,
        /// Error kind (`busy`, `refused`, …).
        error: String,
        /// The agent's explanation.
        message: String,
    },
    /// The job ran and failed.
    #[error("agent {agent}: {kind} failed: {message}")]
    JobFailed {
        /// The agent's URL.
        agent: String,
        /// The job's kind.
        kind: String,
        /// Why.
        message: String,
    },
    /// The answer made no sense.
    #[error("agent {agent}: unexpected answer: {detail}")]
    Protocol {
        /// The agent's URL.
        agent: String,
        /// What was wrong.
        detail: String,
    },
}

/// How long a request waits for another job of the agent to finish.
const BUSY_WAIT: Duration = Duration::from_secs(600);

/// A client for one agent, made by [`crate::AgentAccess`].
#[derive(Clone)]
pub struct AgentClient {
    base: String,
    /// The shared token of an insecure pool (`http://` agents only).
    token: Option<String>,
    /// `Err`: why no request may be sent to this agent.
    http: Result<reqwest::Client, String>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("base", &self.base)
            .field("refused", &self.http.as_ref().err())
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    pub(crate) fn with(base: &str, http: reqwest::Client, token: Option<String>) -> AgentClient {
        AgentClient {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: Ok(http),
        }
    }

    pub(crate) fn refusing(base: &str, why: String) -> AgentClient {
        AgentClient {
            base: base.trim_end_matches('/').to_owned(),
            token: None,
            http: Err(why),
        }
    }

    /// The agent's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        let http = self.http.as_ref().map_err(|why| ClientError::Access {
            agent: self.base.clone(),
            detail: why.clone(),
        })?;
        let r = http.request(method, format!("{}{path}", self.base));
        Ok(match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        })
    }

    async fn answer<T: DeserializeOwned>(
        &self,
        r: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, ClientError> {
        let r = r.map_err(|e| ClientError::Unreachable {
            agent: self.base.clone(),
            detail: e.to_string(),
        })?;
        let status = r.status();
        let bytes = r.bytes().await.map_err(|e| ClientError::Unreachable {
            agent: self.base.clone(),
            detail: e.to_string(),
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
                agent: self.base.clone(),
                detail: format!("{e}: {}", String::from_utf8_lossy(&bytes)),
            });
        }
        let err: ErrorBody = serde_json::from_slice(&bytes).unwrap_or(ErrorBody {
            error: "failed".into(),
            message: String::from_utf8_lossy(&bytes).into_owned(),
        });
        if matches!(status.as_u16(), 401 | 403) {
            return Err(ClientError::Unauthorized {
                agent: self.base.clone(),
                message: err.message,
            });
        }
        Err(ClientError::Refused {
            agent: self.base.clone(),
            status: status.as_u16(),
            error: err.error,
            message: err.message,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let r = self.request(reqwest::Method::GET, path)?.send().await;
        self.answer(r).await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.get("/v1/status").await
    }

    /// `GET /v1/jobs/{id}`.
    pub async fn job(&self, id: u64) -> Result<Job, ClientError> {
        self.get(&format!("/v1/jobs/{id}")).await
    }

    /// Starts a job without waiting for it.
    pub async fn start_job(&self, path: &str, body: &Value) -> Result<Job, ClientError> {
        let r = self
            .request(reqwest::Method::POST, path)?
            .json(body)
            .send()
            .await;
        let v: Value = self.answer(r).await?;
        serde_json::from_value(v.get("job").cloned().unwrap_or_default()).map_err(|e| {
            ClientError::Protocol {
                agent: self.base.clone(),
                detail: format!("no job in the answer: {e}"),
            }
        })
    }

    /// Starts a job and follows it to the end, reporting each change of step or percent.
    pub async fn run(
        &self,
        path: &str,
        body: &Value,
        progress: &mut (dyn FnMut(&Job) + Send),
    ) -> Result<Job, ClientError> {
        // Another job runs (say, one started by a command that was killed and is now run
        // again): wait for it, bounded, then start ours.
        let busy_until = Instant::now() + BUSY_WAIT;
        let mut job = loop {
            match self.start_job(path, body).await {
                Err(ClientError::Refused {
                    status: 409,
                    ref error,
                    ..
                }) if error == "busy" && Instant::now() < busy_until => {
                    tokio::time::sleep(POLL).await
                }
                r => break r?,
            }
        };
        let mut last_seen = Instant::now();
        let mut shown = (String::new(), None);
        loop {
            if (job.step.clone(), job.percent) != shown {
                shown = (job.step.clone(), job.percent);
                progress(&job);
            }
            match job.state {
                JobState::Succeeded => return Ok(job),
                JobState::Failed => {
                    return Err(ClientError::JobFailed {
                        agent: self.base.clone(),
                        kind: job.kind,
                        message: job.error.unwrap_or_default(),
                    })
                }
                JobState::Running => {}
            }
            tokio::time::sleep(POLL).await;
            match self.job(job.id).await {
                Ok(j) => {
                    job = j;
                    last_seen = Instant::now();
                }
                Err(ClientError::Unreachable { .. }) if last_seen.elapsed() < POLL_GIVE_UP => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn json<T: serde::Serialize>(v: &T) -> Value {
        serde_json::to_value(v).unwrap_or_default()
    }

    /// `initdb` if the data directory is empty. Returns whether a cluster was created.
    pub async fn init(&self, progress: &mut (dyn FnMut(&Job) + Send)) -> Result<bool, ClientError> {
        let j = self.run("/v1/init", &Value::Null, progress).await?;
        Ok(j.result
            .as_ref()
            .and_then(|r| r.get("created"))
            .and_then(Value::as_bool)
            .unwrap_or(false))
    }

    /// Starts PostgreSQL.
    pub async fn start(&self) -> Result<(), ClientError> {
        self.run("/v1/start", &Value::Null, &mut |_| {})
            .await
            .map(drop)
    }

    /// Stops PostgreSQL.
    pub async fn stop(&self, immediate: bool) -> Result<(), ClientError> {
        self.run(
            "/v1/stop",
            &Self::json(&StopRequest { immediate }),
            &mut |_| {},
        )
        .await
        .map(drop)
    }

    /// Promotes a mirror or standby.
    pub async fn promote(&self) -> Result<(), ClientError> {
        self.run("/v1/promote", &Value::Null, &mut |_| {})
            .await
            .map(drop)
    }

    /// Clones a principal into this instance and starts it as its mirror.
    pub async fn clone_from(
        &self,
        req: &CloneRequest,
        progress: &mut (dyn FnMut(&Job) + Send),
    ) -> Result<String, ClientError> {
        let j = self
            .run("/v1/clone-from", &Self::json(req), progress)
            .await?;
        Ok(j.result
            .as_ref()
            .and_then(|r| r.get("outcome"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned())
    }

    /// Sets (or clears) the standby every commit waits for.
    pub async fn set_sync_standby(&self, name: Option<&str>) -> Result<(), ClientError> {
        let req = SyncStandbyRequest {
            name: name.map(str::to_owned),
        };
        self.run("/v1/synchronous-standby", &Self::json(&req), &mut |_| {})
            .await
            .map(drop)
    }

    /// Creates or drops a replication slot.
    pub async fn slot(&self, name: &str, drop: bool) -> Result<(), ClientError> {
        let req = SlotRequest {
            name: name.to_owned(),
            drop,
        };
        self.run("/v1/slot", &Self::json(&req), &mut |_| {})
            .await
            .map(|_| ())
    }

    fn manifest_of(&self, j: Job) -> Result<Manifest, ClientError> {
        serde_json::from_value(j.result.unwrap_or_default()).map_err(|e| ClientError::Protocol {
            agent: self.base.clone(),
            detail: format!("no manifest in the job's result: {e}"),
        })
    }

    /// A full backup of the instance into the share.
    pub async fn backup(
        &self,
        req: &BackupRequest,
        progress: &mut (dyn FnMut(&Job) + Send),
    ) -> Result<Manifest, ClientError> {
        let j = self.run("/v1/backup", &Self::json(req), progress).await?;
        self.manifest_of(j)
    }

    /// Restores a backup over the instance.
    pub async fn restore(
        &self,
        req: &RestoreRequest,
        progress: &mut (dyn FnMut(&Job) + Send),
    ) -> Result<Manifest, ClientError> {
        let j = self.run("/v1/restore", &Self::json(req), progress).await?;
        self.manifest_of(j)
    }

    /// `GET /v1/log-shipping`.
    pub async fn log_shipping(&self) -> Result<ShippingStatus, ClientError> {
        self.get("/v1/log-shipping").await
    }

    /// Sets the instance's log-shipping role.
    pub async fn set_log_shipping(&self, role: &ShippingRole) -> Result<(), ClientError> {
        let req = ShippingRequest { role: role.clone() };
        self.run("/v1/log-shipping", &Self::json(&req), &mut |_| {})
            .await
            .map(drop)
    }

    /// Runs the copy job now (also when paused) and says what it did.
    pub async fn copy_now(&self) -> Result<CopyRun, ClientError> {
        let j = self
            .run("/v1/log-shipping/copy", &Value::Null, &mut |_| {})
            .await?;
        serde_json::from_value(j.result.unwrap_or_default()).map_err(|e| ClientError::Protocol {
            agent: self.base.clone(),
            detail: format!("no copy report in the job's result: {e}"),
        })
    }

    /// Closes the principal's current WAL segment so it is archived now; returns its name.
    pub async fn switch_wal(&self) -> Result<String, ClientError> {
        let j = self
            .run("/v1/switch-wal", &Value::Null, &mut |_| {})
            .await?;
        Ok(j.result
            .as_ref()
            .and_then(|r| r.get("segment"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned())
    }

    /// Reads an old principal's messages that the database at `req.compare_*` lacks.
    pub async fn salvage(&self, req: &SalvageRequest) -> Result<SalvageReport, ClientError> {
        let j = self
            .run("/v1/salvage", &Self::json(req), &mut |_| {})
            .await?;
        serde_json::from_value(j.result.unwrap_or_default()).map_err(|e| ClientError::Protocol {
            agent: self.base.clone(),
            detail: format!("no salvage report in the job's result: {e}"),
        })
    }

    /// Proves the agent's OS user can read and write the given directories.
    pub async fn preflight(&self, req: &PreflightRequest) -> Result<Vec<Check>, ClientError> {
        let j = self
            .run("/v1/preflight", &Self::json(req), &mut |_| {})
            .await?;
        serde_json::from_value(j.result.unwrap_or_default()).map_err(|e| ClientError::Protocol {
            agent: self.base.clone(),
            detail: format!("no checks in the job's result: {e}"),
        })
    }

    /// Creates the databases, the servers' role (with `server_password`), the schema and the
    /// grants on the principal (`db install`).
    pub async fn install(
        &self,
        server_password: &str,
        progress: &mut (dyn FnMut(&Job) + Send),
    ) -> Result<(), ClientError> {
        let req = InstallRequest {
            server_password: server_password.to_owned(),
        };
        self.run("/v1/install", &Self::json(&req), progress)
            .await
            .map(drop)
    }

    /// Sets a role's password on the principal (creating the role if missing).
    pub async fn set_role_password(
        &self,
        role: pchat_control::postgres::PgRole,
        password: &str,
    ) -> Result<(), ClientError> {
        let req = RolePasswordRequest {
            role,
            password: password.to_owned(),
        };
        self.run("/v1/role-password", &Self::json(&req), &mut |_| {})
            .await
            .map(drop)
    }

    /// Has a standby re-read the replication password from etcd (after a rotation).
    pub async fn refresh_replication_password(&self) -> Result<(), ClientError> {
        self.run("/v1/replication-password", &Value::Null, &mut |_| {})
            .await
            .map(drop)
    }
}
