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
    let data = inst.config().data_dir.clone();
    inst.write_owned(&data, "standby.signal", b"")?;
    let result: Result<SalvageReport, AgentError> = async {
        inst.start_listening("").await?;
        let mine = inst.connect("mgc").await.map_err(|e| {
            AgentError::Refused(format!("the old database has no mgc to salvage from: {e}"))
        })?;
        let theirs = connect_authoritative(inst, req).await?;
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
    if let Ok(d) = pchat_tls::dir::Dir::open(&data) {
        let _ = d.remove("standby.signal");
    }
    let report = result?;
    stopped?;
    Ok(report)
}

/// A session on the authoritative database's `mgc` as the servers' role: over TLS verified
/// against that instance's name when the agent has an identity (the password goes only to
/// the instance the topology names), in plaintext in an insecure pool.
async fn connect_authoritative(
    inst: &Instance,
    req: &SalvageRequest,
) -> Result<tokio_postgres::Client, AgentError> {
    let (hostaddr, port) =
        pchat_control::postgres::resolve(&format!("{}:{}", req.compare_host, req.compare_port))
            .map_err(AgentError::Refused)?;
    let mut config = tokio_postgres::Config::new();
    config
        .hostaddr(hostaddr)
        .port(port)
        .user(pchat_control::postgres::PgRole::Server.name())
        .dbname("mgc")
        .application_name("pchat-agent")
        .connect_timeout(std::time::Duration::from_secs(10));
    if let Some(pw) = &req.compare_password {
        config.password(pw.as_str());
    }
    let fail = |e: tokio_postgres::Error| {
        AgentError::Postgres(format!(
            "connecting to the authoritative database {}:{}: {e}",
            req.compare_host, req.compare_port
        ))
    };
    match inst.tls_connector()? {
        Some(tls) => {
            let Some(name) = req.compare_instance.as_deref() else {
                return Err(AgentError::Refused(
                    "the request does not name the authoritative instance: its certificate cannot be checked (update the shell)".into(),
                ));
            };
            config
                .host(pchat_control::Who::Instance(name.to_owned()).tls_name(&inst.config().pool))
                .ssl_mode(tokio_postgres::config::SslMode::Require);
            let (client, conn) = config.connect(tls).await.map_err(fail)?;
            tokio::spawn(conn);
            Ok(client)
        }
        None => {
            config.host(hostaddr.to_string());
            let (client, conn) = config.connect(tokio_postgres::NoTls).await.map_err(fail)?;
            tokio::spawn(conn);
            Ok(client)
        }
    }
}
