//! Sessions of the room management page (`/rooms`) in `mgc`: changes are IMMEDIATE
//! transactions on the writer thread's connection (nothing kept in memory, so the shell's
//! store beside a server sees the same), reads one statement on the read pool.

use pchat_room::Timestamp;
use pchat_store::{WebSession, WEB_SESSIONS_PER_USER_MAX};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::error::Result;
use crate::writer::Reply;

/// A change to the sessions, served by the writer thread.
pub(crate) enum WebSessionWrite {
    /// [`pchat_store::Store::web_session_put`].
    Put {
        id: String,
        session: WebSession,
        reply: Reply<()>,
    },
    /// [`pchat_store::Store::web_session_touch`].
    Touch {
        id: String,
        seen_at: Timestamp,
        reply: Reply<()>,
    },
    /// [`pchat_store::Store::web_session_remove`].
    Remove { id: String, reply: Reply<bool> },
    /// [`pchat_store::Store::web_session_purge`].
    Purge {
        seen_before: Timestamp,
        created_before: Timestamp,
        reply: Reply<u64>,
    },
}

impl WebSessionWrite {
    /// Runs the change on the writer's `mgc` connection and answers its caller.
    pub(crate) fn serve(self, mgc: &mut Connection) {
        match self {
            WebSessionWrite::Put { id, session, reply } => {
                let _ = reply.send(put(mgc, &id, &session).map_err(Into::into));
            }
            WebSessionWrite::Touch { id, seen_at, reply } => {
                let _ = reply.send(
                    mgc.prepare_cached(
                        "UPDATE web_session SET seen_at = max(seen_at, ?2) WHERE id = ?1",
                    )
                    .and_then(|mut s| s.execute(params![id, seen_at.0]))
                    .map(|_| ())
                    .map_err(|e| crate::error::Error::from(e).into()),
                );
            }
            WebSessionWrite::Remove { id, reply } => {
                let _ = reply.send(
                    mgc.prepare_cached("DELETE FROM web_session WHERE id = ?1")
                        .and_then(|mut s| s.execute([id]))
                        .map(|n| n > 0)
                        .map_err(|e| crate::error::Error::from(e).into()),
                );
            }
            WebSessionWrite::Purge {
                seen_before,
                created_before,
                reply,
            } => {
                let _ = reply.send(
                    mgc.prepare_cached(
                        "DELETE FROM web_session WHERE seen_at < ?1 OR created_at < ?2",
                    )
                    .and_then(|mut s| s.execute(params![seen_before.0, created_before.0]))
                    .map(|n| n as u64)
                    .map_err(|e| crate::error::Error::from(e).into()),
                );
            }
        }
    }
}

fn put(mgc: &mut Connection, id: &str, s: &WebSession) -> Result<()> {
    let tx = mgc.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.prepare_cached(
        "INSERT INTO web_session (id, username, created_at, seen_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (id) DO NOTHING",
    )?
    .execute(params![id, s.user, s.created_at.0, s.seen_at.0])?;
    tx.prepare_cached(
        "DELETE FROM web_session WHERE username = ?1 AND id NOT IN \
         (SELECT id FROM web_session WHERE username = ?1 ORDER BY created_at DESC, id LIMIT ?2)",
    )?
    .execute(params![s.user, WEB_SESSIONS_PER_USER_MAX])?;
    tx.commit()?;
    Ok(())
}

/// [`pchat_store::Store::web_session_get`].
pub(crate) fn get(mgc: &Connection, id: &str) -> Result<Option<WebSession>> {
    Ok(mgc
        .prepare_cached("SELECT username, created_at, seen_at FROM web_session WHERE id = ?1")?
        .query_row([id], |r| {
            Ok(WebSession {
                user: r.get(0)?,
                created_at: Timestamp(r.get(1)?),
                seen_at: Timestamp(r.get(2)?),
            })
        })
        .optional()?)
}
