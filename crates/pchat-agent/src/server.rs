//! The agent's HTTP API (endpoints and shapes in `pchat-agent-api`).
//!
//! Every request is authorized before anything else — body parsing, work — so a caller
//! refused learns nothing and changes nothing: by the certificate its connection was made
//! with (HTTPS, mutual TLS; who may do what is [`crate::access`]), or, in an insecure pool,
//! by the shared token in `Authorization: Bearer`. Each request is logged with its caller.
//! Mutating requests become jobs: one at a time, because two PostgreSQL administrations of
//! the same data directory at once (a clone during a restore…) could only destroy it.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tracing::{info, warn};

use pchat_agent_api::salvage::SalvageRequest;
use pchat_agent_api::shipping::{PreflightRequest, ShippingRequest, ShippingRole};
use pchat_agent_api::{
    now_rfc3339, BackupRequest, CloneRequest, ErrorBody, IdEpochRequest, InstallRequest, Job,
    JobState, RestoreRequest, Role, RolePasswordRequest, RoomIdsRequest, SlotRequest, Status,
    StopRequest, SyncStandbyRequest, ROOM_IDS_MAX,
};
use pchat_control::{keys, pool, OwnIdentity, Who};
use pchat_procedures::backup::BackupError;

use crate::access::{decide, Caller, Decision, PEER_JOB_KINDS};
use crate::config::AgentConfig;
use crate::instance::Instance;
use crate::listener::{Remote, Transport};
use crate::shipping;
use crate::shipping_conf::load_role;
use crate::AgentError;

/// Finished jobs kept for `GET /v1/jobs/{id}`.
const JOBS_KEPT: usize = 32;
/// Bound on a request's body: every request is a small JSON document.
pub const REQUEST_BODY_BYTES_MAX: usize = 64 * 1024;
/// Bound on one request's handling (reading its body included); the work of a job runs on
/// after its request is answered.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;

struct Jobs {
    next_id: u64,
    running: Option<u64>,
    list: VecDeque<Job>,
}

struct Shared {
    instance: Instance,
    shipping: shipping::Runtime,
    /// The insecure pool's shared token (plain HTTP); `None` with TLS.
    token: Option<String>,
    jobs: Mutex<Jobs>,
}

impl Shared {
    fn jobs(&self) -> std::sync::MutexGuard<'_, Jobs> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(&self, kind: &str) -> Result<Job, AgentError> {
        let mut jobs = self.jobs();
        if let Some(id) = jobs.running {
            let what = jobs
                .list
                .iter()
                .find(|j| j.id == id)
                .map(|j| format!("{} ({})", j.kind, j.step))
                .unwrap_or_default();
            return Err(AgentError::Busy(format!(
                "job {id} {what} is running on this instance; wait for it (GET /v1/jobs/{id}) and retry"
            )));
        }
        jobs.next_id += 1;
        let job = Job {
            id: jobs.next_id,
            kind: kind.to_owned(),
            state: JobState::Running,
            step: "starting".into(),
            percent: None,
            started_at: now_rfc3339(),
            finished_at: None,
            error: None,
            result: None,
        };
        jobs.running = Some(job.id);
        jobs.list.push_back(job.clone());
        while jobs.list.len() > JOBS_KEPT {
            jobs.list.pop_front();
        }
        Ok(job)
    }

    fn with_job(&self, id: u64, f: impl FnOnce(&mut Job)) {
        if let Some(j) = self.jobs().list.iter_mut().find(|j| j.id == id) {
            f(j);
        }
    }

    fn finish(&self, id: u64, result: Result<Value, AgentError>) {
        self.with_job(id, |j| {
            j.finished_at = Some(now_rfc3339());
            match result {
                Ok(v) => {
                    j.state = JobState::Succeeded;
                    j.step = "done".into();
                    j.percent = Some(100);
                    j.result = Some(v);
                }
                Err(e) => {
                    j.state = JobState::Failed;
                    j.error = Some(e.to_string());
                }
            }
        });
        let mut jobs = self.jobs();
        if jobs.running == Some(id) {
            jobs.running = None;
        }
    }

    fn job(&self, id: u64) -> Option<Job> {
        self.jobs().list.iter().find(|j| j.id == id).cloned()
    }

    fn current_job(&self) -> Option<Job> {
        self.jobs().list.back().cloned()
    }
}

fn error_response(status: StatusCode, error: &str, message: String) -> Response {
    (
        status,
        Json(ErrorBody {
            error: error.into(),
            message,
        }),
    )
        .into_response()
}

fn agent_error_response(e: AgentError) -> Response {
    let (status, kind) = match &e {
        AgentError::Busy(_) => (StatusCode::CONFLICT, "busy"),
        AgentError::Refused(_) | AgentError::Fenced(_) => (StatusCode::CONFLICT, "refused"),
        AgentError::Backup(BackupError::Invalid(_)) => (StatusCode::BAD_REQUEST, "bad-request"),
        AgentError::Etcd(_) => (StatusCode::SERVICE_UNAVAILABLE, "failed"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
    };
    error_response(status, kind, e.to_string())
}

/// Compares without an early exit, so response times do not reveal how much of a guessed
/// token was right.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The caller of a plain-HTTP request (an insecure pool): the holder of the token, or no one.
fn token_caller(s: &Shared, req: &Request) -> Result<Caller, Box<Response>> {
    let Some(token) = &s.token else {
        // A TLS connection always names its caller; this cannot be one.
        return Err(Box::new(unauthorized("no caller")));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if same_token(t.trim().as_bytes(), token.as_bytes()) => Ok(Caller::Token),
        Some(_) => Err(Box::new(unauthorized("the bearer token is wrong"))),
        None => Err(Box::new(unauthorized("no bearer token"))),
    }
}

/// May peer instance `peer` make this request: of this agent's site (by the topology in
/// etcd, which only operators write), and following only a job of a kind a peer may start?
async fn check_peer(s: &Shared, peer: &str, job: Option<u64>) -> Result<(), Box<Response>> {
    if let Some(id) = job {
        let kind = s.job(id).map(|j| j.kind);
        if !kind.as_deref().is_some_and(|k| PEER_JOB_KINDS.contains(&k)) {
            return Err(Box::new(forbidden(format!(
                "instance {peer} may follow only the {} jobs it may start; job {id} is not one",
                PEER_JOB_KINDS.join(" and ")
            ))));
        }
    }
    let cfg = s.instance.config();
    let Some(etcd) = s.instance.etcd() else {
        return Err(Box::new(forbidden(format!(
            "this agent has no control plane to check instance {peer}'s site against"
        ))));
    };
    let view = pool::get(etcd, &cfg.pool).await.map_err(|e| {
        Box::new(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "failed",
            format!("cannot read the topology to check instance {peer}'s site: {e}"),
        ))
    })?;
    let site_of = |i: &str| view.topology.instance(i).map(|(site, _)| site.name.clone());
    match (site_of(peer), site_of(&cfg.instance)) {
        (Some(theirs), Some(mine)) if theirs == mine => Ok(()),
        (theirs, mine) => Err(Box::new(forbidden(format!(
            "instance {peer} (site {}) is not of this instance's site ({}): only a site's own instances take part in its failover",
            theirs.as_deref().unwrap_or("none"),
            mine.as_deref().unwrap_or("none")
        )))),
    }
}

/// Authenticates and authorizes every request, bounds its time, and logs it with its caller.
async fn authorize(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let remote = req
        .extensions()
        .get::<Remote>()
        .map_or_else(String::new, |r| r.0.to_string());
    let caller = match req.extensions().get::<Caller>() {
        Some(c) => Ok(c.clone()),
        None => token_caller(&s, &req),
    };
    let caller = match caller {
        Ok(c) => c,
        Err(r) => {
            warn!(caller = "unauthenticated", %method, %path, %remote, status = r.status().as_u16(), "request refused");
            return *r;
        }
    };
    let allowed = match decide(&caller, &method, &path) {
        Decision::Allow => Ok(()),
        Decision::AllowPeer { job } => match &caller {
            Caller::Peer(peer) => check_peer(&s, peer, job).await,
            _ => Err(Box::new(forbidden("not a peer".into()))),
        },
        Decision::Forbid(why) => Err(Box::new(forbidden(why))),
    };
    let response = match allowed {
        Ok(()) => {
            match tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), next.run(req))
                .await
            {
                Ok(r) => r,
                Err(_) => error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "failed",
                    format!("the request took longer than {REQUEST_TIMEOUT_MS} ms; try again"),
                ),
            }
        }
        Err(r) => {
            warn!(%caller, %method, %path, %remote, status = r.status().as_u16(), "request refused");
            return *r;
        }
    };
    info!(%caller, %method, %path, %remote, status = response.status().as_u16(), "request");
    response
}

fn forbidden(why: String) -> Response {
    error_response(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("{why}; nothing was done"),
    )
}

fn unauthorized(why: &str) -> Response {
    let mut r = error_response(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        format!(
            "{why}: this insecure pool's agents take `Authorization: Bearer <token>` with the token of their configuration's \
             token_file (pchat commands read it from --agent-token-file FILE or PCHAT_AGENT_TOKEN); nothing was done"
        ),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

fn body<T: DeserializeOwned>(b: Result<Json<T>, JsonRejection>) -> Result<T, Box<Response>> {
    b.map(|Json(v)| v).map_err(|e| {
        // 413 for a body over `REQUEST_BODY_BYTES_MAX` (refused before it is read in full),
        // 400 or 415 for one that is not this endpoint's JSON.
        let status = e.status();
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too-large"
        } else {
            "bad-request"
        };
        Box::new(error_response(
            status,
            kind,
            format!("the request body is not what this endpoint takes: {e}"),
        ))
    })
}

/// Starts `work` as a job and answers 202 with it (or 409 if another job runs).
fn spawn_job<F, Fut>(s: Arc<Shared>, kind: &str, work: F) -> Response
where
    F: FnOnce(Arc<Shared>, u64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Value, AgentError>> + Send + 'static,
{
    let job = match s.begin(kind) {
        Ok(j) => j,
        Err(e) => return agent_error_response(e),
    };
    let id = job.id;
    info!(job = id, kind, "job started");
    let s2 = s.clone();
    tokio::spawn(async move {
        // The work runs in its own task so that a panic in it fails the job instead of
        // leaving it "running" for ever and the agent busy.
        let result = match tokio::spawn(work(s2.clone(), id)).await {
            Ok(r) => r,
            Err(e) => Err(AgentError::Failed(format!("the job's task failed: {e}"))),
        };
        match &result {
            Ok(_) => info!(job = id, "job succeeded"),
            Err(e) => warn!(job = id, error = %e, "job failed"),
        }
        s2.finish(id, result);
    });
    (StatusCode::ACCEPTED, Json(json!({ "job": job }))).into_response()
}

fn progress_of(s: &Arc<Shared>, id: u64) -> impl FnMut(&str, Option<u8>) + Send + 'static {
    let s = s.clone();
    move |step: &str, percent: Option<u8>| {
        s.with_job(id, |j| {
            j.step = step.to_owned();
            j.percent = percent;
        })
    }
}

/// The instance's status with the agent's own parts: the job and log shipping.
async fn full_status(s: &Shared) -> Status {
    let mut st = s.instance.status().await;
    st.job = s.current_job();
    if load_role(s.instance.config()) != ShippingRole::None {
        st.log_shipping = Some(shipping::status(&s.instance, &s.shipping).await);
    }
    st
}

/// How long an answer may wait for PostgreSQL: one query timeout and a little. Every query
/// behind it is bounded too; this bounds their sum.
fn answer_timeout(s: &Shared) -> Duration {
    s.instance.query_timeout() + Duration::from_millis(500)
}

/// Fresh when PostgreSQL answers in time; otherwise the last status taken (the publisher
/// takes one every `publish_interval_ms`, its queries bounded), marked as not answering.
/// The API answers whatever PostgreSQL does: a failover must learn quickly that the
/// principal is hung, not wait with it.
async fn status(State(s): State<Arc<Shared>>) -> Response {
    match tokio::time::timeout(answer_timeout(&s), full_status(&s)).await {
        Ok(st) => Json(st).into_response(),
        Err(_) => match s.instance.cached_status() {
            Some(mut st) => {
                st.job = s.current_job();
                Json(st).into_response()
            }
            None => unanswered(&s),
        },
    }
}

async fn shipping_status(State(s): State<Arc<Shared>>) -> Response {
    match tokio::time::timeout(
        answer_timeout(&s),
        shipping::status(&s.instance, &s.shipping),
    )
    .await
    {
        Ok(st) => Json(st).into_response(),
        Err(_) => unanswered(&s),
    }
}

fn unanswered(s: &Shared) -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "failed",
        format!(
            "PostgreSQL did not answer within {:?} and the agent has no earlier status; see {}",
            answer_timeout(s),
            s.instance.config().log_file.display()
        ),
    )
}

async fn shipping_configure(
    State(s): State<Arc<Shared>>,
    b: Result<Json<ShippingRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "log-shipping", move |s, _| async move {
        shipping::configure(&s.instance, &req.role).await?;
        Ok(json!({}))
    })
}

async fn shipping_copy(State(s): State<Arc<Shared>>) -> Response {
    spawn_job(s, "copy", |s, id| async move {
        let mut p = progress_of(&s, id);
        p("copying shipped WAL from the share", None);
        let run = shipping::copy_once(&s.instance, &s.shipping, true).await?;
        serde_json::to_value(run).map_err(|e| AgentError::Failed(e.to_string()))
    })
}

async fn salvage(
    State(s): State<Arc<Shared>>,
    b: Result<Json<SalvageRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "salvage", move |s, id| async move {
        let mut p = progress_of(&s, id);
        p(
            "reading the old database as a private read-only standby",
            None,
        );
        let r = crate::salvage::salvage(&s.instance, &req).await?;
        serde_json::to_value(r).map_err(|e| AgentError::Failed(e.to_string()))
    })
}

async fn switch_wal(State(s): State<Arc<Shared>>) -> Response {
    spawn_job(s, "switch-wal", |s, _| async move {
        let c = s.instance.connect("postgres").await?;
        let row = c
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await
            .map_err(|e| AgentError::Postgres(format!("pg_switch_wal: {e}")))?;
        let closed: String = row.get(0);
        Ok(json!({ "segment": closed }))
    })
}

async fn preflight(
    State(s): State<Arc<Shared>>,
    b: Result<Json<PreflightRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "preflight", move |s, _| async move {
        let checks = shipping::preflight(&s.instance, &req).await?;
        serde_json::to_value(checks).map_err(|e| AgentError::Failed(e.to_string()))
    })
}

async fn job(State(s): State<Arc<Shared>>, Path(id): Path<u64>) -> Response {
    match s.job(id) {
        Some(j) => Json(j).into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no job {id} on this agent (only the last {JOBS_KEPT} are kept; the agent may have restarted)"),
        ),
    }
}

async fn init(State(s): State<Arc<Shared>>) -> Response {
    spawn_job(s, "init", |s, id| async move {
        let mut p = progress_of(&s, id);
        p("initdb", None);
        let created = s.instance.init().await?;
        Ok(json!({ "created": created }))
    })
}

async fn start(State(s): State<Arc<Shared>>) -> Response {
    spawn_job(s, "start", |s, _| async move {
        s.instance.start().await?;
        Ok(json!({}))
    })
}

async fn stop(
    State(s): State<Arc<Shared>>,
    b: Result<Json<StopRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "stop", move |s, _| async move {
        s.instance.stop(req.immediate).await?;
        Ok(json!({}))
    })
}

async fn promote(State(s): State<Arc<Shared>>) -> Response {
    spawn_job(s, "promote", |s, _| async move {
        s.instance.promote().await?;
        Ok(json!({}))
    })
}

async fn clone_from(
    State(s): State<Arc<Shared>>,
    b: Result<Json<CloneRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "clone-from", move |s, id| async move {
        let mut p = progress_of(&s, id);
        let what = s.instance.clone_from(&req, &mut p).await?;
        Ok(json!({ "outcome": what }))
    })
}

async fn sync_standby(
    State(s): State<Arc<Shared>>,
    b: Result<Json<SyncStandbyRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "synchronous-standby", move |s, _| async move {
        s.instance.set_sync_standby(req.name.as_deref()).await?;
        Ok(json!({}))
    })
}

async fn slot(
    State(s): State<Arc<Shared>>,
    b: Result<Json<SlotRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "slot", move |s, _| async move {
        s.instance.slot(&req.name, req.drop).await?;
        Ok(json!({}))
    })
}

async fn backup(
    State(s): State<Arc<Shared>>,
    b: Result<Json<BackupRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "backup", move |s, id| async move {
        let mut p = progress_of(&s, id);
        let m = s.instance.backup(&req, &mut p).await?;
        serde_json::to_value(m).map_err(|e| AgentError::Failed(e.to_string()))
    })
}

async fn restore(
    State(s): State<Arc<Shared>>,
    b: Result<Json<RestoreRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "restore", move |s, id| async move {
        let mut p = progress_of(&s, id);
        let m = s.instance.restore(&req, &mut p).await?;
        serde_json::to_value(m).map_err(|e| AgentError::Failed(e.to_string()))
    })
}

async fn install(
    State(s): State<Arc<Shared>>,
    b: Result<Json<InstallRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "install", move |s, id| async move {
        let mut p = progress_of(&s, id);
        p(
            "databases, the servers' role, the schema and its grants",
            None,
        );
        let created = s.instance.install(&req).await?;
        Ok(json!({ "created": created }))
    })
}

async fn role_password(
    State(s): State<Arc<Shared>>,
    b: Result<Json<RolePasswordRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "role-password", move |s, _| async move {
        s.instance
            .set_role_password(req.role, &req.password)
            .await?;
        Ok(json!({ "role": req.role.name() }))
    })
}

async fn replication_password(State(s): State<Arc<Shared>>) -> Response {
    spawn_job(s, "replication-password", |s, _| async move {
        if !s.instance.refresh_replication_password().await? {
            return Err(AgentError::Refused(
                "etcd holds no replication password for this pool (or the agent has no etcd)"
                    .into(),
            ));
        }
        // A running standby picks the new passfile up at its next connection; a reload
        // makes it re-read its settings now.
        if s.instance.is_running().await {
            if let Ok(c) = s.instance.connect("postgres").await {
                let _ = c.batch_execute("SELECT pg_reload_conf()").await;
            }
        }
        Ok(json!({}))
    })
}

async fn id_epoch(
    State(s): State<Arc<Shared>>,
    b: Result<Json<IdEpochRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    spawn_job(s, "id-epoch", move |s, _| async move {
        let epoch = s.instance.raise_id_epoch(req.epoch).await?;
        Ok(json!({ "epoch": epoch }))
    })
}

/// A read, answered at once: a loss estimate asks a backup that may be busy with a job.
async fn room_ids(
    State(s): State<Arc<Shared>>,
    b: Result<Json<RoomIdsRequest>, JsonRejection>,
) -> Response {
    let req = match body(b) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if req.rooms.len() > ROOM_IDS_MAX {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!(
                "{} rooms in one request; at most {ROOM_IDS_MAX} (ask in chunks)",
                req.rooms.len()
            ),
        );
    }
    match tokio::time::timeout(Duration::from_secs(8), s.instance.room_ids(&req.rooms)).await {
        Ok(Ok(ids)) => Json(ids).into_response(),
        Ok(Err(e)) => agent_error_response(e),
        Err(_) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "failed",
            "reading the rooms' last ids took over 8 s".into(),
        ),
    }
}

async fn not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such endpoint; see the agent API in the pchat documentation".into(),
    )
}

/// A running agent.
pub struct AgentHandle {
    addr: SocketAddr,
    tls: bool,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl AgentHandle {
    /// The address the API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API's base URL: https:// with an identity, http:// in an insecure pool.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops the API, the publisher and the leader loop. PostgreSQL keeps running, as SQL
    /// Server does when its Agent stops; a leader lease it held is not revoked but expires
    /// (a stopped agent looks like a dead one: with a synchronized mirror, that is a failover).
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

/// Starts an agent: binds the API, starts the status publisher and (with `start_on_boot`)
/// the instance.
pub async fn serve(cfg: AgentConfig) -> Result<AgentHandle, AgentError> {
    let transport = match own_identity(&cfg)? {
        Some(me) => {
            let tls = me
                .tls
                .server_config_tls13(pchat_tls::ClientAuth::Required)
                .map_err(|e| AgentError::Config(format!("the agent's TLS settings: {e}")))?;
            Transport::Tls {
                acceptor: tokio_rustls::TlsAcceptor::from(tls),
                pool: cfg.pool.clone(),
                instance: cfg.instance.clone(),
            }
        }
        None => Transport::Plain,
    };
    let instance = Instance::new(cfg.clone())?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| AgentError::Io {
            context: format!("binding the agent API to {}", cfg.listen),
            source: e,
        })?;
    let addr = listener.local_addr().map_err(|e| AgentError::Io {
        context: "reading the bound address".into(),
        source: e,
    })?;
    let shared = Arc::new(Shared {
        instance,
        shipping: shipping::Runtime::default(),
        token: match transport {
            Transport::Plain => cfg.token.clone(),
            Transport::Tls { .. } => None,
        },
        jobs: Mutex::new(Jobs {
            next_id: 0,
            running: None,
            list: VecDeque::new(),
        }),
    });
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/init", post(init))
        .route("/v1/start", post(start))
        .route("/v1/stop", post(stop))
        .route("/v1/promote", post(promote))
        .route("/v1/clone-from", post(clone_from))
        .route("/v1/synchronous-standby", post(sync_standby))
        .route("/v1/slot", post(slot))
        .route("/v1/backup", post(backup))
        .route("/v1/restore", post(restore))
        .route(
            "/v1/log-shipping",
            get(shipping_status).post(shipping_configure),
        )
        .route("/v1/log-shipping/copy", post(shipping_copy))
        .route("/v1/preflight", post(preflight))
        .route("/v1/switch-wal", post(switch_wal))
        .route("/v1/salvage", post(salvage))
        .route("/v1/install", post(install))
        .route("/v1/role-password", post(role_password))
        .route("/v1/replication-password", post(replication_password))
        .route("/v1/id-epoch", post(id_epoch))
        .route("/v1/room-ids", post(room_ids))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX))
        .layer(middleware::from_fn_with_state(shared.clone(), authorize))
        .with_state(shared.clone());
    let (tx, rx) = tokio::sync::watch::channel(false);
    let tls = matches!(transport, Transport::Tls { .. });
    let server = tokio::spawn(crate::listener::run(listener, transport, app, rx.clone()));
    let publisher = tokio::spawn(publish(shared.clone(), rx.clone()));
    let s3 = shared.clone();
    let rx3 = rx.clone();
    let jobs =
        tokio::spawn(async move { shipping::run_jobs(&s3.instance, &s3.shipping, rx3).await });
    let mut tasks = vec![server, publisher, jobs];
    if let Some(at) = cfg.metrics_listen {
        tasks.push(tokio::spawn(serve_metrics(shared.clone(), at, rx.clone())));
    }
    let s2 = shared.clone();
    let leader = tokio::spawn(async move { crate::leader::run(&s2.instance, rx).await });
    tasks.push(leader);
    info!(%addr, instance = %cfg.instance, tls, "agent listening");
    if cfg.start_on_boot && shared.instance.is_initialized() && !shared.instance.is_running().await
    {
        // As a job, so that status shows it and a refusal (fenced) is visible.
        let _ = spawn_job(shared.clone(), "start", |s, _| async move {
            s.instance.start().await?;
            Ok(json!({}))
        });
    }
    Ok(AgentHandle {
        addr,
        tls,
        shutdown: Some(tx),
        tasks,
    })
}

/// Serves `/metrics` on `at` until `stop` (see [`crate::metrics`]). An address already in
/// use costs the metrics, not the agent: the error says so and the agent runs on.
async fn serve_metrics(
    s: Arc<Shared>,
    at: SocketAddr,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::bind(at).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%at, error = %e, "metrics are not served: cannot listen on metrics_listen; choose another address, or \"\" to turn them off");
            return;
        }
    };
    info!(%at, "agent metrics at http://{at}/metrics");
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Arc<Shared>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    crate::metrics::render(&readings(&s).await),
                )
            }),
        )
        .with_state(s);
    let shutdown = async move {
        let _ = stop.wait_for(|v| *v).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        warn!(error = %e, "the metrics listener stopped");
    }
}

/// What a scrape reports: a status taken now when PostgreSQL answers within the API's own
/// deadline, else the last one (as `GET /v1/status` does), and the probes' clocks.
async fn readings(s: &Shared) -> crate::metrics::Readings {
    let (status, fresh) = match tokio::time::timeout(answer_timeout(s), full_status(s)).await {
        Ok(st) => (Some(st), true),
        Err(_) => (
            s.instance.cached_status().map(|mut st| {
                st.job = s.current_job();
                st
            }),
            false,
        ),
    };
    let cfg = s.instance.config();
    crate::metrics::Readings {
        pool: cfg.pool.clone(),
        instance: cfg.instance.clone(),
        status,
        fresh,
        silent: s.instance.silent_for(),
        stalled: s.instance.stalled_for(),
        space_available: s.instance.space_available(),
        disk_full: s.instance.disk_full_for().map(|(d, _)| d),
        failed_jobs: s
            .jobs()
            .list
            .iter()
            .filter(|j| j.state == JobState::Failed)
            .count(),
    }
}

/// The instance's identity (`tls_dir`), checked to be this instance's of this pool; `None` in
/// an insecure pool.
pub(crate) fn own_identity(cfg: &AgentConfig) -> Result<Option<OwnIdentity>, AgentError> {
    let Some(dir) = &cfg.tls_dir else {
        return Ok(None);
    };
    let me = OwnIdentity::load(dir).map_err(|e| AgentError::Config(e.to_string()))?;
    let mine = Who::Instance(cfg.instance.clone());
    if me.who != mine || me.pool != cfg.pool {
        return Err(AgentError::Config(format!(
            "tls_dir {} holds the identity of {} of pool {}, not of {mine} of pool {}",
            dir.display(),
            me.who,
            me.pool,
            cfg.pool
        )));
    }
    Ok(Some(me))
}

/// Publishes the status to etcd every `publish_interval_ms`, so a failover can judge a
/// principal whose host is gone by what it last said.
async fn publish(s: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let cfg = s.instance.config().clone();
    let Some(etcd) = s.instance.etcd().cloned() else {
        return;
    };
    let mut failing = false;
    loop {
        let st = full_status(&s).await;
        if let Ok(json) = serde_json::to_vec(&st) {
            let mut r = etcd
                .put(&keys::status(&cfg.pool, &cfg.instance), &json)
                .await;
            if r.is_ok() && st.role == Role::Principal {
                r = etcd
                    .put(&keys::principal_status(&cfg.pool, &cfg.instance), &json)
                    .await;
            }
            match r {
                Err(e) if !failing => {
                    warn!(error = %e, "cannot publish the instance status to etcd");
                    failing = true;
                }
                Ok(_) => failing = false,
                Err(_) => {}
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(cfg.publish_interval_ms)) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
    }
}
