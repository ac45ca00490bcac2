//! What a DR failover loses, bounded from what the servers acknowledged: each active server
//! publishes, per room, the highest id it acknowledged, how many more it may acknowledge
//! before it publishes again (its allowance) and a guard for the rooms it no longer lists
//! (`pchat_control::marks`). Against what the backup holds:
//!
//! - **at least**: the acknowledged ids the backup lacks, per room from the backup's last id
//!   to the highest acknowledged one (ids are gapless within an id epoch, so their number is
//!   the number of messages);
//! - **at most**: that, plus every server's allowance — provided the backup holds every
//!   server's guard (so it holds whatever the listings leave out) and no room's ids span an
//!   id epoch the backup never entered (whose ids it cannot count).
//!
//! `pool failover --dry-run` and the failover itself compute it the same way ([`estimate`]);
//! the failover does it after the last copy and replay, so its figures can only be lower.

use std::collections::BTreeMap;

use pchat_agent_api::{AgentClient, RoomIds};
use pchat_control::marks::ServerMarks;
use pchat_control::{keys, Topology};
use pchat_store::ids::ids_between;
use serde::{Deserialize, Serialize};

use crate::dr::DrError;
use crate::mirror::Ctx;

/// The bounds of a failover's loss, in acknowledged messages.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossEstimate {
    /// Acknowledged messages the backup lacks, for certain.
    pub at_least: u64,
    /// At most this many acknowledged messages are lost; `None`: no bound (see `notes`).
    pub at_most: Option<u64>,
    /// Why there is no upper bound, or what it rests on.
    pub notes: Vec<String>,
    /// The servers whose marks were read.
    pub servers: Vec<String>,
    /// Rooms the marks list.
    pub rooms: usize,
    /// Rooms in which the backup lacks acknowledged messages.
    pub rooms_behind: usize,
}

/// The bounds, from the servers' marks and what the backup holds of the rooms they name
/// (its last id per room and its id epoch).
pub fn bounds(marks: &[(String, ServerMarks)], backup: &RoomIds) -> LossEstimate {
    let mut e = LossEstimate {
        servers: marks.iter().map(|(s, _)| s.clone()).collect(),
        ..LossEstimate::default()
    };
    if marks.is_empty() {
        e.notes.push(
            "no server published what it acknowledged (servers older than this pchat, or none ever served): no bounds"
                .into(),
        );
        return e;
    }
    // The highest id acknowledged in each room, by any server.
    let mut highest: BTreeMap<&str, i64> = BTreeMap::new();
    for (_, m) in marks {
        for (room, id) in &m.rooms {
            let h = highest.entry(room.as_str()).or_insert(0);
            *h = (*h).max(*id);
        }
    }
    e.rooms = highest.len();
    let mut upper = Some(0u64);
    for (room, id) in &highest {
        let have = backup.last_ids.get(*room).copied().unwrap_or(0);
        let (low, high) = ids_between(have, *id, backup.id_epoch);
        e.at_least += low;
        if low > 0 {
            e.rooms_behind += 1;
        }
        match high {
            Some(h) => upper = upper.map(|u| u + h),
            None => {
                upper = None;
                e.notes.push(format!(
                    "room {room}: the lost site numbered ids in an id epoch the backup never entered (up to {id}; the backup has {have}): their number is unknown"
                ));
            }
        }
    }
    for (server, m) in marks {
        upper = upper.map(|u| u + m.allowance);
        if m.incomplete {
            upper = None;
            e.notes.push(format!(
                "server {server} left rooms out of its marks without a guard: what it acknowledged there is unknown"
            ));
        }
        if let Some(g) = &m.guard {
            let have = backup.last_ids.get(&g.room).copied().unwrap_or(0);
            if have < g.id {
                upper = None;
                e.notes.push(format!(
                    "server {server}'s guard message {} of {} is not on the backup (it has {have}): what the server acknowledged in rooms it no longer lists may be lost too",
                    g.id, g.room
                ));
            }
        }
    }
    let allowance: u64 = marks.iter().map(|(_, m)| m.allowance).sum();
    if upper.is_some() && allowance > 0 {
        e.notes.push(format!(
            "the upper bound includes {allowance} message(s) the servers may have acknowledged since they last published"
        ));
    }
    e.at_most = upper;
    e
}

/// Reads every server's marks (servers of the topology that published any).
pub async fn read_marks(
    ctx: &Ctx,
    topology: &Topology,
) -> Result<Vec<(String, ServerMarks)>, DrError> {
    let mut out = Vec::new();
    for s in &topology.servers {
        let Some(kv) = ctx
            .etcd
            .get(&keys::server_marks(&ctx.pool, &s.name))
            .await?
        else {
            continue;
        };
        let m = ServerMarks::decode(&kv.value).map_err(|e| {
            DrError::Refused(format!(
                "the marks of server {} in etcd are unreadable ({e}): delete {} and retry (the bounds then leave that server out)",
                s.name,
                keys::server_marks(&ctx.pool, &s.name)
            ))
        })?;
        out.push((s.name.clone(), m));
    }
    Ok(out)
}

/// The bounds of what failing over to the database behind `backup` now would lose.
pub async fn estimate(
    ctx: &Ctx,
    topology: &Topology,
    backup: &AgentClient,
) -> Result<LossEstimate, DrError> {
    let marks = read_marks(ctx, topology).await?;
    let mut rooms: Vec<String> = marks
        .iter()
        .flat_map(|(_, m)| {
            m.rooms
                .keys()
                .cloned()
                .chain(m.guard.as_ref().map(|g| g.room.clone()))
        })
        .collect();
    rooms.sort();
    rooms.dedup();
    let held = backup.room_ids(&rooms).await?;
    Ok(bounds(&marks, &held))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pchat_control::marks::MessageRef;
    use pchat_store::ids::epoch_base;

    fn marks(rooms: &[(&str, i64)], allowance: u64, guard: Option<(&str, i64)>) -> ServerMarks {
        ServerMarks {
            serial: 1,
            at: String::new(),
            rooms: rooms.iter().map(|(r, i)| (r.to_string(), *i)).collect(),
            allowance,
            guard: guard.map(|(room, id)| MessageRef {
                room: room.into(),
                id,
            }),
            incomplete: false,
        }
    }

    fn backup(epoch: u64, rooms: &[(&str, i64)]) -> RoomIds {
        RoomIds {
            id_epoch: epoch,
            last_ids: rooms.iter().map(|(r, i)| (r.to_string(), *i)).collect(),
        }
    }

    /// What, the servers' marks, the backup, at least, at most.
    type Case = (
        &'static str,
        Vec<(String, ServerMarks)>,
        RoomIds,
        u64,
        Option<u64>,
    );

    #[test]
    fn bounds_table() {
        let cases: Vec<Case> = vec![
            ("nothing published", vec![], backup(0, &[("a", 5)]), 0, None),
            (
                "the backup holds everything: only the allowances remain",
                vec![("s1".into(), marks(&[("a", 300)], 16, None))],
                backup(0, &[("a", 300)]),
                0,
                Some(16),
            ),
            (
                "280..300 lost in one room, 5 in another, two servers",
                vec![
                    ("s1".into(), marks(&[("a", 300), ("b", 10)], 16, None)),
                    ("s2".into(), marks(&[("a", 290)], 8, None)),
                ],
                backup(0, &[("a", 279), ("b", 5)]),
                26,
                Some(26 + 24),
            ),
            (
                "a room the backup never received",
                vec![("s1".into(), marks(&[("new", 7)], 4, None))],
                backup(0, &[]),
                7,
                Some(11),
            ),
            (
                "the guard is on the backup: the unlisted rooms are covered",
                vec![("s1".into(), marks(&[("a", 12)], 4, Some(("old", 40))))],
                backup(0, &[("a", 10), ("old", 41)]),
                2,
                Some(6),
            ),
            (
                "the guard is not on the backup: no upper bound",
                vec![("s1".into(), marks(&[("a", 12)], 4, Some(("old", 40))))],
                backup(0, &[("a", 10), ("old", 39)]),
                2,
                None,
            ),
            (
                "ids of an epoch the backup replayed the raise of: exact",
                vec![("s1".into(), marks(&[("a", epoch_base(3) + 5)], 0, None))],
                backup(3, &[("a", 17)]),
                5,
                Some(5),
            ),
            (
                "ids of an epoch the backup never entered: at least those, no upper bound",
                vec![("s1".into(), marks(&[("a", epoch_base(3) + 5)], 0, None))],
                backup(2, &[("a", 17)]),
                5,
                None,
            ),
        ];
        for (what, m, b, least, most) in cases {
            let e = bounds(&m, &b);
            assert_eq!((e.at_least, e.at_most), (least, most), "{what}: {e:?}");
            if most.is_none() {
                assert!(!e.notes.is_empty(), "{what}: says why there is no bound");
            }
        }
        let mut incomplete = marks(&[("a", 3)], 1, None);
        incomplete.incomplete = true;
        let e = bounds(&[("s1".into(), incomplete)], &backup(0, &[("a", 1)]));
        assert_eq!((e.at_least, e.at_most), (2, None));
    }
}
