//! Read-only queries on pchat's databases for a process that does not serve them through
//! [`Store`](pchat_store::Store): the agent beside a PostgreSQL instance, which counts the
//! archive for its status and compares an old principal with the authoritative database
//! before a failback replaces it (the salvage). They live here because only the store crates
//! know the schema; the caller brings its own session (the agent connects over the unix
//! socket as the OS user, to an instance that may be a read-only standby).

use std::collections::HashSet;

use pchat_store::StoreError;
use tokio_postgres::Client;

use crate::error::{get, Error};

/// Messages in the archive: the sum of the rooms' sequence counters in `mgc`. Compared
/// across instances it counts what one has and the other lacks.
pub async fn archive_message_count(mgc: &Client) -> Result<u64, StoreError> {
    let row = mgc
        .query_one("SELECT coalesce(sum(last_seq), 0)::bigint FROM room", &[])
        .await
        .map_err(Error::from)?;
    let total: i64 = get(&row, 0)?;
    u64::try_from(total).map_err(|_| StoreError::Corrupt(format!("message count {total}")))
}

/// One archived message, as an old principal holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedRow {
    /// The room's JID.
    pub room: String,
    /// Its sequence number in that database.
    pub seq: i64,
    /// When it was archived (µs since the epoch).
    pub at: i64,
    /// The sender's real JID.
    pub sender: String,
    /// The sender's nick.
    pub nick: String,
    /// The client's origin-id, if any.
    pub origin_id: Option<String>,
    /// The body.
    pub body: Option<String>,
    /// The stanza as archived.
    pub stanza: String,
}

/// What [`messages_missing_from`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Missing {
    /// The messages `old` has and the other database lacks, by room and sequence.
    pub messages: Vec<ArchivedRow>,
    /// Messages of `old` compared.
    pub compared: u64,
}

/// The messages archived from `since_us` on that `old`'s `mgc` holds and `authoritative`'s
/// lacks, compared by (room, sequence, time): a message the other has under the same
/// number at the same time is the same message, shipped.
pub async fn messages_missing_from(
    old: &Client,
    authoritative: &Client,
    since_us: i64,
) -> Result<Missing, StoreError> {
    let have = authoritative
        .query(
            "SELECT r.jid, m.seq, m.at FROM message m JOIN room r ON r.id = m.room_id \
             WHERE m.at >= $1",
            &[&since_us],
        )
        .await
        .map_err(Error::from)?
        .iter()
        .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?)))
        .collect::<Result<HashSet<(String, i64, i64)>, Error>>()?;
    let rows = old
        .query(
            "SELECT r.jid, m.seq, m.at, m.sender, m.nick, m.origin_id, m.body, m.stanza \
             FROM message m JOIN room r ON r.id = m.room_id WHERE m.at >= $1 \
             ORDER BY r.jid, m.seq",
            &[&since_us],
        )
        .await
        .map_err(Error::from)?;
    let mut missing = Missing {
        compared: rows.len() as u64,
        ..Missing::default()
    };
    for r in &rows {
        let key: (String, i64, i64) = (get(r, 0)?, get(r, 1)?, get(r, 2)?);
        if !have.contains(&key) {
            missing.messages.push(ArchivedRow {
                room: key.0,
                seq: key.1,
                at: key.2,
                sender: get(r, 3)?,
                nick: get(r, 4)?,
                origin_id: get(r, 5)?,
                body: get(r, 6)?,
                stanza: get(r, 7)?,
            });
        }
    }
    Ok(missing)
}
