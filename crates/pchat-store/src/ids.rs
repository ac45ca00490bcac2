//! Id epochs: how a room's message ids (XEP-0359 stanza-ids, MAM ids) stay unique when a
//! database is made writable again from an earlier point — a DR failover to a backup that had
//! not received the last shipped segment, a forced mirror failover, a restore.
//!
//! Such a database does not know which ids the lost one handed out after the point it
//! resumes from, so it cannot continue the sequence where it left off: ids 280–300 of
//! acknowledged messages it never received would be given to new messages. Instead every
//! database carries an *id epoch* `e`, and a room's next id is
//!
//! ```text
//! max(last id of the room, epoch_base(e)) + 1
//! ```
//!
//! Ids handed out in epoch `e` stay below `epoch_base(e + 1)` (a room's ids of one epoch
//! number at most [`IDS_PER_EPOCH`] − 1, which the stores enforce), and whoever makes a
//! database writable again from an earlier point raises it to an epoch no database of the
//! pool has used yet (`pchat-control`'s counter in etcd hands them out). So every id the lost
//! database could have handed out lies below every id the new one hands out, whatever the
//! lost one published before it went: per room the ids stay increasing (MAM order holds),
//! an id of a lost message is never given to another one, and an `after` that names it finds
//! nothing (the archive answers `item-not-found`, telling the client to resynchronise).
//!
//! The range is decimal so an operator reads the epoch off an id (`3000000042`: epoch 3,
//! the room's 42nd id of that epoch), and small enough that every id of [`EPOCH_MAX`] epochs
//! fits in SQLite's archive key (40 bits), so `pchat data export|import` moves any archive
//! between the backends.

/// Ids of one room in one epoch: `epoch_base(e) + 1 ..= epoch_base(e) + IDS_PER_EPOCH - 1`.
pub const IDS_PER_EPOCH: i64 = 1_000_000_000;

/// The highest epoch: its ids still fit in 40 bits (SQLite's archive key, 2^40 − 1).
pub const EPOCH_MAX: u64 = 1_098;

/// Every id of epoch `epoch` is above this.
pub fn epoch_base(epoch: u64) -> i64 {
    // EPOCH_MAX keeps this far from overflow; a larger value saturates, which the stores
    // refuse before it is ever stored (`check_epoch`).
    i64::try_from(epoch)
        .ok()
        .and_then(|e| e.checked_mul(IDS_PER_EPOCH))
        .unwrap_or(i64::MAX)
}

/// The epoch an id was handed out in (0 for ids below the first base, including 0).
pub fn epoch_of(id: i64) -> u64 {
    u64::try_from(id.max(1) - 1).unwrap_or(0) / IDS_PER_EPOCH as u64
}

/// The id a room's next message gets in a database of epoch `epoch` whose last id in the room
/// is `last` (0 for none); `None` when the room has used every id of its epoch (a room of a
/// billion messages since the last failover or restore): its ids never run into the next
/// epoch's range, which another database may be using.
pub fn next_id(last: i64, epoch: u64) -> Option<i64> {
    let next = last.max(epoch_base(epoch)) + 1;
    (next < epoch_base(epoch_of(next)) + IDS_PER_EPOCH).then_some(next)
}

/// Refuses an epoch beyond [`EPOCH_MAX`].
pub fn check_epoch(epoch: u64) -> Result<(), crate::StoreError> {
    if epoch > EPOCH_MAX {
        return Err(crate::StoreError::Invalid(format!(
            "id epoch {epoch} is beyond the last one ({EPOCH_MAX}) whose ids every backend can hold"
        )));
    }
    Ok(())
}

/// How many ids were handed out in a room between `from` (exclusive) and `to` (inclusive),
/// both ids of the same room, as far as the ids alone tell: within one epoch every id is
/// used, so the count is exact; across epochs the ids of the older epoch above `from` are
/// unknown (`None`), unless `to` is in an epoch `from`'s database had already entered
/// (`from_epoch`), in which case the room had no ids of older epochs beyond `from` there.
///
/// This is what a loss estimate needs: `from` is what the backup holds, `to` what a server
/// acknowledged on the lost site, `from_epoch` the backup's id epoch.
pub fn ids_between(from: i64, to: i64, from_epoch: u64) -> (u64, Option<u64>) {
    if to <= from {
        return (0, Some(0));
    }
    let (ef, et) = (epoch_of(from), epoch_of(to));
    if ef == et {
        let n = (to - from) as u64;
        return (n, Some(n));
    }
    // `to` lies in a later epoch than `from`: at least its own epoch's part is certain.
    let lower = (to - epoch_base(et).max(from)) as u64;
    if et <= from_epoch {
        // The backup had already entered `to`'s epoch (it replayed the raise): everything the
        // lost site numbered in older epochs it had numbered before that raise, which the
        // backup replayed too. So `from` is the room's last id of those epochs there.
        (lower, Some(lower))
    } else {
        (lower, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_and_epochs() {
        for (id, epoch) in [
            (0, 0),
            (1, 0),
            (999_999_999, 0),
            (1_000_000_000, 0),
            (1_000_000_001, 1),
            (3_000_000_042, 3),
        ] {
            assert_eq!(epoch_of(id), epoch, "epoch_of({id})");
        }
        assert_eq!(epoch_base(0), 0);
        assert_eq!(epoch_base(2), 2_000_000_000);
        // Every id of the last epoch fits in SQLite's 40-bit archive key.
        assert!(epoch_base(EPOCH_MAX) + IDS_PER_EPOCH - 1 < 1 << 40);
        assert!(epoch_base(EPOCH_MAX + 1) + IDS_PER_EPOCH > 1 << 40);
        assert!(check_epoch(EPOCH_MAX).is_ok());
        assert!(check_epoch(EPOCH_MAX + 1).is_err());
        assert_eq!(epoch_base(u64::MAX), i64::MAX);
    }

    #[test]
    fn next_ids() {
        for (last, epoch, next) in [
            // A fresh room, epoch 0: 1, 2, 3…
            (0, 0, Some(1)),
            (41, 0, Some(42)),
            // The database entered epoch 2: the room's next id jumps above its base, once.
            (41, 2, Some(2_000_000_001)),
            (2_000_000_001, 2, Some(2_000_000_002)),
            // A room created after the raise starts at the base too.
            (0, 2, Some(2_000_000_001)),
            // A room that used every id of its epoch: refused, never into the next range.
            (1_999_999_999, 1, None),
            (999_999_999, 0, None),
            // An archive imported with ids of a later epoch than the database's continues them.
            (3_000_000_007, 0, Some(3_000_000_008)),
        ] {
            assert_eq!(next_id(last, epoch), next, "next_id({last}, {epoch})");
        }
    }

    #[test]
    fn ids_between_counts_what_the_ids_tell() {
        for (from, to, from_epoch, want) in [
            (10, 10, 0, (0, Some(0))),
            (12, 10, 0, (0, Some(0))),
            (10, 57, 0, (47, Some(47))),
            (0, 5, 0, (5, Some(5))),
            (1_000_000_010, 1_000_000_057, 1, (47, Some(47))),
            // The lost site raised its epoch after the backup's last segment: its old-epoch
            // ids above 10 are unknown.
            (10, 1_000_000_003, 0, (3, None)),
            // The backup replayed the raise: 10 was the last old-epoch id.
            (10, 1_000_000_003, 1, (3, Some(3))),
            // A room the backup does not hold at all, created after a raise it replayed.
            (0, 2_000_000_004, 2, (4, Some(4))),
        ] {
            assert_eq!(
                ids_between(from, to, from_epoch),
                want,
                "ids_between({from}, {to}, {from_epoch})"
            );
        }
    }
}
