//! `pchat db rotate-password`: a new password for one of the pool's PostgreSQL roles.
//!
//! 1. A new password (32 random bytes) is set on the authoritative site's principal through
//!    its agent (`ALTER ROLE … PASSWORD`, as a SCRAM verifier). Standbys — the mirror, the
//!    backup site by log shipping — get it with the principal's WAL.
//! 2. Then it is stored in etcd (`/pchat/secrets/P/postgres/ROLE`).
//! 3. For the replication role, every other instance's agent re-reads it into its passfile.
//!
//! Sessions already open keep working (PostgreSQL checks a password when a session starts);
//! every new one uses the new password: servers read theirs from etcd at each connection,
//! mirrors read their passfile at each reconnection. Between steps 1 and 2 a new session
//! gets the old password and fails (it is retried); a command that stops there leaves etcd
//! with the old one, and running it again fixes that.

use serde::{Deserialize, Serialize};

use pchat_control::postgres::{self, PgRole};

use crate::mirror::{self, Ctx, MirrorError};

/// What a rotation did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateReport {
    /// The role (`pchat_server`, `pchat_replication`).
    pub role: String,
    /// The instance that took the new password.
    pub principal: String,
    /// Instances whose agents re-read the replication password.
    pub refreshed: Vec<String>,
    /// Instances whose agents could not be reached, and why: they read the new password
    /// when their agent next starts PostgreSQL, or at `pchat db rotate-password` again.
    pub unreachable: Vec<(String, String)>,
}

/// Rotates `role`'s password (see the module docs).
pub async fn rotate_password(
    ctx: &Ctx,
    role: PgRole,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<RotateReport, MirrorError> {
    let principal = mirror::current_principal(ctx, None).await?;
    let agent = mirror::agent_client(ctx, &principal);
    let password = pchat_tls::fs::random_secret();
    progress(&format!(
        "{}: new password for {}",
        principal.name,
        role.name()
    ));
    agent.set_role_password(role, &password).await?;
    postgres::write_password(&ctx.etcd, &ctx.pool, role, &password).await?;
    progress(&format!("stored in etcd for pool {}", ctx.pool));
    let mut report = RotateReport {
        role: role.name().to_owned(),
        principal: principal.name.clone(),
        refreshed: Vec::new(),
        unreachable: Vec::new(),
    };
    if role == PgRole::Replication {
        let view = pchat_control::pool::get(&ctx.etcd, &ctx.pool).await?;
        for (_, db) in view.topology.instances() {
            if db.name == principal.name {
                continue;
            }
            match mirror::agent_client(ctx, db)
                .refresh_replication_password()
                .await
            {
                Ok(()) => {
                    progress(&format!("{}: replication password re-read", db.name));
                    report.refreshed.push(db.name.clone());
                }
                Err(e) => {
                    progress(&format!("{}: not reached ({e})", db.name));
                    report.unreachable.push((db.name.clone(), e.to_string()));
                }
            }
        }
    }
    Ok(report)
}
