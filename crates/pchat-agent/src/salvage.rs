//! Salvage of an old principal before a failback replaces it (`pchat pool failback
//! --salvage FILE`): the messages it committed that never reached the backup site.
//!
//! The old data directory is started as a read-only standby on its unix socket only
//! (`standby.signal`, `listen_addresses = ''`): PostgreSQL replays its own WAL to the end —
//! everything it acknowledged — and no pool server can reach it. Its messages since
//! `since_us` are compared by (room, sequence, time) with the database that is now
//! authoritative (the store's query: `pchat_store_postgres::inspect`); those it has and that
//! one lacks are returned, and the instance is stopped again. Nothing is written anywhere: the salvage file is for people to read or re-post,
//! never merged into the archive (their sequence numbers may be taken by newer messages).

use pchat_agent_api::salvage::{SalvageReport, SalvageRequest, SalvagedMessage};
use pchat_agent_api::shipping::ShippingRole;
use pchat_agent_api::Role;
use pchat_store_postgres::inspect;

use crate::instance::Instance;
use crate::shipping;
use crate::AgentError;

/// Runs a salvage (see the module docs).
pub async fn salvage(inst: &Instance, req: &SalvageRequest) -> Result<SalvageReport, AgentError> {
    if req.compare_host.is_empty() || req.compare_host.contains(char::is_whitespace) {
        return Err(AgentError::Refused(format!(
            "invalid host `{}`",
            req.compare_host
        )));
    }
    if !inst.is_initialized() {
        return Ok(SalvageReport {
            note: Some("the instance holds no database: nothing to salvage".into()),
            ..SalvageReport::default()
        });
    }
    if inst.is_running().await {
        let st = inst.status().await;
        if st.role == Role::Principal {
            return Err(AgentError::Refused(
                "the instance runs as a principal: a salvage reads a stopped old principal; stop it first".into(),
            ));
        }
        inst.stop(false).await?;
    }
    // Nothing it replays may be archived into a live configuration's share.
    shipping::configure(inst, &ShippingRole::None).await?;
    let signal = inst.config().data_dir.join("standby.signal");
    inst.write_owned(&signal, b"")?;
    let result: Result<SalvageReport, AgentError> = async {
        inst.start_listening("").await?;
        let mine = inst.connect("mgc").await.map_err(|e| {
            AgentError::Refused(format!("the old database has no mgc to salvage from: {e}"))
        })?;
        let mut theirs_cfg = tokio_postgres::Config::new();
        theirs_cfg
            .host(&req.compare_host)
            .port(req.compare_port)
            .user(&inst.config().os_user)
            .dbname("mgc")
            .application_name("pchat-agent")
            .connect_timeout(std::time::Duration::from_secs(10));
        let (theirs, conn) = theirs_cfg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| {
                AgentError::Postgres(format!(
                    "connecting to the authoritative database {}:{}: {e}",
                    req.compare_host, req.compare_port
                ))
            })?;
        tokio::spawn(conn);
        let missing = inspect::messages_missing_from(&mine, &theirs, req.since_us)
            .await
            .map_err(|e| AgentError::Postgres(e.to_string()))?;
        Ok(SalvageReport {
            compared: missing.compared,
            messages: missing
                .messages
                .into_iter()
                .map(|m| SalvagedMessage {
                    room: m.room,
                    seq: m.seq,
                    at: m.at,
                    sender: m.sender,
                    nick: m.nick,
                    origin_id: m.origin_id,
                    body: m.body,
                    stanza: m.stanza,
                })
                .collect(),
            note: None,
        })
    }
    .await;
    // Stopped again whatever happened: the failback replaces this data next.
    let stopped = inst.stop(false).await;
    let _ = std::fs::remove_file(&signal);
    let report = result?;
    stopped?;
    Ok(report)
}
