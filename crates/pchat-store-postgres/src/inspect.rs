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

/// Messages in the archive: the sum of the rooms' message counts in `mgc` (on a schema older
/// than id epochs, of their sequence counters, which were the counts then). Compared across
/// instances it counts what one has and the other lacks.
pub async fn archive_message_count(mgc: &Client) -> Result<u64, StoreError> {
    let row = match mgc
        .query_one(
            "SELECT coalesce(sum(message_count), 0)::bigint FROM room",
            &[],
        )
        .await
    {
        Ok(row) => row,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => mgc
            .query_one("SELECT coalesce(sum(last_seq), 0)::bigint FROM room", &[])
            .await
            .map_err(Error::from)?,
        Err(e) => return Err(Error::from(e).into()),
    };
    let total: i64 = get(&row, 0)?;
    u64::try_from(total).map_err(|_| StoreError::Corrupt(format!("message count {total}")))
}

/// The id epoch of the database ([`pchat_store::ids`]); 0 on a schema older than id epochs.
pub async fn id_epoch(mgc: &Client) -> Result<u64, StoreError> {
    match mgc
        .query_one("SELECT epoch FROM id_epoch WHERE id = 1", &[])
        .await
    {
        Ok(row) => {
            let epoch: i64 = get(&row, 0)?;
            u64::try_from(epoch).map_err(|_| StoreError::Corrupt(format!("id epoch {epoch}")))
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(0),
        Err(e) => Err(Error::from(e).into()),
    }
}

/// Raises the id epoch of a principal's database to `epoch`, never lowering it, and returns
/// the epoch in force: what a procedure does (through the agent) after it made a database
/// writable again from an earlier point, before any server writes to it.
pub async fn raise_id_epoch(mgc: &Client, epoch: u64) -> Result<u64, StoreError> {
    pchat_store::ids::check_epoch(epoch)?;
    let wanted = i64::try_from(epoch)
        .map_err(|_| StoreError::Invalid(format!("id epoch {epoch} is too large")))?;
    let row = mgc
        .query_one(
            "UPDATE id_epoch SET epoch = greatest(epoch, $1) WHERE id = 1 RETURNING epoch",
            &[&wanted],
        )
        .await
        .map_err(|e| match e.code() {
            Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => StoreError::Invalid(
                "database mgc predates id epochs: run `pchat db install` to upgrade its schema"
                    .into(),
            ),
            _ => Error::from(e).into(),
        })?;
    let now: i64 = get(&row, 0)?;
    u64::try_from(now).map_err(|_| StoreError::Corrupt(format!("id epoch {now}")))
}

/// The last id of each of `rooms` that the database holds (rooms it lacks are left out):
/// what a loss estimate compares the servers' acknowledgments with, on a backup that may be
/// a read-only standby.
pub async fn room_last_ids(
    mgc: &Client,
    rooms: &[String],
) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = mgc
        .query(
            "SELECT jid, last_seq FROM room WHERE jid = ANY($1)",
            &[&rooms],
        )
        .await
        .map_err(Error::from)?;
    rows.iter()
        .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
        .collect::<Result<Vec<_>, Error>>()
        .map_err(StoreError::from)
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
