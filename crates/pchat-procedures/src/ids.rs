//! New id epochs for databases made writable again from an earlier point (see
//! `pchat_store::ids` for why): a step of `pool failover`, `pool failback`, `db restore`
//! and a forced `db mirror failover` calls [`advance`] (or [`draw`], then [`raise`] once the
//! database is writable) before any server writes to the database.

use pchat_agent_api::{AgentClient, ClientError};
use pchat_control::EtcdError;

use crate::mirror::Ctx;

/// Why a new epoch could not be drawn or set.
#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    /// The counter in etcd could not be read or advanced.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The database's agent failed or refused.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The database did not end up in the epoch.
    #[error("{0}")]
    Refused(String),
}

/// Draws an epoch above every epoch drawn so far and above the one of the database behind
/// `db` (its agent's status says which; a stopped or unreadable one counts as 0).
pub async fn draw(ctx: &Ctx, db: &AgentClient, reason: &str) -> Result<u64, IdsError> {
    let current = db.status().await.ok().and_then(|s| s.id_epoch).unwrap_or(0);
    Ok(pchat_control::ids::draw(
        &ctx.etcd,
        &ctx.pool,
        current,
        reason,
        &pchat_agent_api::now_rfc3339(),
    )
    .await?)
}

/// Raises the (writable) database behind `db` to `epoch`; idempotent, so a resumed step
/// raises again harmlessly.
pub async fn raise(db: &AgentClient, epoch: u64) -> Result<u64, IdsError> {
    let now = db.raise_id_epoch(epoch).await?;
    if now < epoch {
        return Err(IdsError::Refused(format!(
            "agent {} reports id epoch {now} after raising it to {epoch}",
            db.url()
        )));
    }
    Ok(now)
}

/// [`draw`] then [`raise`]: the database's next ids lie above every id any database of the
/// pool handed out before.
pub async fn advance(
    ctx: &Ctx,
    db: &AgentClient,
    reason: &str,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<u64, IdsError> {
    let epoch = draw(ctx, db, reason).await?;
    let now = raise(db, epoch).await?;
    progress(&format!(
        "  message ids continue in epoch {now} (above {}): none handed out before is used again",
        pchat_store::ids::epoch_base(now)
    ));
    Ok(now)
}
