//! The pool's id-epoch counter (`/pchat/pools/P/id-epoch`). Whoever makes a database
//! writable again from an earlier point — `pchat pool failover`, a failback's restore,
//! `pchat db restore`, a forced mirror failover — draws a new epoch here and raises the
//! database to it before any server writes (`pchat_store::ids` says why that keeps every
//! message id unique). etcd is the witness the pool keeps through the loss of a site, so the
//! counter outlives whichever database handed out the previous epoch's ids.

use serde::{Deserialize, Serialize};

use crate::{keys, Etcd, EtcdError};

/// The counter's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdEpochRecord {
    /// The last epoch drawn.
    pub epoch: u64,
    /// When (RFC 3339).
    pub at: String,
    /// What drew it (`pool failover`, `pool failback`, `db restore`, …).
    pub reason: String,
}

/// How many times a draw retries when another one changed the counter first.
const DRAW_TRIES: u32 = 20;

/// The epoch a draw takes: above the counter and above the database's own epoch (which is
/// higher only if the counter was lost, e.g. etcd rebuilt from nothing).
pub fn next_epoch(counter: Option<u64>, database: u64) -> u64 {
    counter.unwrap_or(0).max(database) + 1
}

/// Draws a new epoch, above `database_epoch`, with one compare-and-swap: no two draws get
/// the same epoch, whoever runs them.
pub async fn draw(
    etcd: &Etcd,
    pool: &str,
    database_epoch: u64,
    reason: &str,
    now_rfc3339: &str,
) -> Result<u64, EtcdError> {
    let key = keys::id_epoch(pool);
    for _ in 0..DRAW_TRIES {
        let current = etcd.get(&key).await?;
        let (counter, revision) = match &current {
            Some(kv) => {
                let r: IdEpochRecord = serde_json::from_slice(&kv.value).map_err(|e| {
                    EtcdError::Protocol(format!("{key} is not an id-epoch record: {e}"))
                })?;
                (Some(r.epoch), kv.mod_revision)
            }
            None => (None, 0),
        };
        let epoch = next_epoch(counter, database_epoch);
        let record = IdEpochRecord {
            epoch,
            at: now_rfc3339.to_owned(),
            reason: reason.to_owned(),
        };
        let json = serde_json::to_vec(&record).map_err(|e| EtcdError::Protocol(e.to_string()))?;
        if etcd.compare_and_put(&key, revision, &json).await?.is_some() {
            return Ok(epoch);
        }
    }
    Err(EtcdError::Refused(format!(
        "{key} changed {DRAW_TRIES} times while an id epoch was drawn: another procedure is drawing; run the command again"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draw_goes_above_the_counter_and_the_database() {
        for (counter, database, want) in [
            (None, 0, 1),
            (Some(1), 0, 2),
            (Some(1), 1, 2),
            // The counter was lost (etcd rebuilt): the database's own epoch still counts.
            (None, 4, 5),
            (Some(2), 4, 5),
            (Some(7), 4, 8),
        ] {
            assert_eq!(
                next_epoch(counter, database),
                want,
                "{counter:?} {database}"
            );
        }
    }
}
