//! Room ticks for the other servers of a pool: a dedicated session that `LISTEN`s on
//! [`NOTIFY_CHANNEL`](crate::NOTIFY_CHANNEL) and turns each notification into a
//! [`RoomTick`]. It reconnects by itself, and after every (re)connect sends a `*` tick, because
//! notifications sent while it was away are gone and receivers must catch up by sequence.
//! It ends, closing its session, as soon as the receiver is dropped. When the receiver falls
//! so far behind that ticks are dropped, it sends `*` ticks once it has room again: a
//! presence tick names one occupant, and a dropped one would otherwise be forgotten.

use std::time::Duration;

use futures_util::StreamExt as _;
use pchat_store::{PresenceKey, PresenceNow, RoomTick, TickKind};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use crate::pool::Session;

/// Ticks buffered for a slow receiver; beyond that they are dropped (they are only hints,
/// and the receiver is told to catch up with every room once it has room again).
const TICKS_QUEUED_MAX: usize = 4096;

/// Starts the listener; ticks arrive on the returned receiver.
pub(crate) fn spawn(session: Session) -> mpsc::Receiver<RoomTick> {
    let (tx, rx) = mpsc::channel(TICKS_QUEUED_MAX);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        while !tx.is_closed() {
            // Bounded like every connection: a frozen server would hold it for ever.
            let connected = tokio::select! {
                r = tokio::time::timeout(session.query_timeout, session.open()) => match r {
                    Ok(r) => r,
                    Err(_) => Err(pchat_store::StoreError::Unavailable(
                        "the room listener got no session in time".into(),
                    )
                    .into()),
                },
                () = tx.closed() => return,
            };
            let (client, mut messages) = match connected {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "room listener cannot connect; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = tx.closed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            let statement = format!("LISTEN {}", crate::NOTIFY_CHANNEL);
            let listen = client.batch_execute(&statement);
            tokio::pin!(listen);
            // The session must be driven while LISTEN runs: poll both.
            let mut listening = false;
            // Ticks were dropped: every room must catch up once the receiver has room.
            let mut overflowed = false;
            loop {
                tokio::select! {
                    r = &mut listen, if !listening => {
                        if r.is_err() {
                            break;
                        }
                        listening = true;
                        backoff = Duration::from_millis(100);
                        overflowed = !send_catch_up(&tx);
                    }
                    permits = tx.reserve_many(CATCH_UP_KINDS.len()), if overflowed => {
                        if let Ok(permits) = permits {
                            for (permit, kind) in permits.zip(CATCH_UP_KINDS) {
                                permit.send(catch_up(kind));
                            }
                            overflowed = false;
                        }
                    }
                    m = messages.next() => match m {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            if let Some(tick) = parse(n.payload()) {
                                overflowed |= tx.try_send(tick).is_err();
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                    () = tx.closed() => return,
                }
            }
        }
    });
    rx
}

/// What a `*` tick is sent for: every kind of change.
const CATCH_UP_KINDS: [TickKind; 4] = [
    TickKind::Messages,
    TickKind::Presence,
    TickKind::Record,
    TickKind::Directory,
];

/// A tick that makes every room re-read what changed of `kind`. There is nothing to re-read
/// of lost announcements: a room's destruction is also found by re-reading its record.
fn catch_up(kind: TickKind) -> RoomTick {
    RoomTick {
        room: "*".into(),
        kind,
        last_seq: i64::MAX,
        presence_of: None,
        presence_now: PresenceNow::Unknown,
        event: None,
        pep: None,
    }
}

/// Sends the `*` ticks; false when the receiver had no room for all of them.
fn send_catch_up(tx: &mpsc::Sender<RoomTick>) -> bool {
    CATCH_UP_KINDS
        .iter()
        .all(|&kind| tx.try_send(catch_up(kind)).is_ok())
}

/// `*:d` (the directory changed), `room:SEQ` (messages), `room:p` (presence; the whole list), `room:p` + `\nSERVER\nLEN\n` +
/// stanza + nick (one occupant's presence; see [`presence_payload`]), `room:r` (record), and
/// `room:e\n` + JSON (an announced [`pchat_room::RoomEvent`]).
///
/// [`presence_payload`]: crate::read::presence_payload
fn parse(payload: &str) -> Option<RoomTick> {
    if let Some((head, json)) = payload.split_once('\n') {
        if let Some(room) = head.strip_suffix(":e") {
            return Some(RoomTick {
                room: room.to_owned(),
                kind: TickKind::Event,
                last_seq: 0,
                presence_of: None,
                presence_now: PresenceNow::Unknown,
                event: Some(serde_json::from_str(json).ok()?),
                pep: None,
            });
        }
        if let Some(owner) = head.strip_suffix(":u") {
            let pep: pchat_store::PepEvent = serde_json::from_str(json).ok()?;
            if pep.owner != owner {
                return None;
            }
            return Some(RoomTick {
                room: owner.to_owned(),
                kind: TickKind::Pep,
                last_seq: 0,
                presence_of: None,
                presence_now: PresenceNow::Unknown,
                event: None,
                pep: Some(pep),
            });
        }
    }
    let (head, presence) = match payload.split_once('\n') {
        Some((head, rest)) => (head, Some(parse_presence(rest)?)),
        None => (payload, None),
    };
    let (room, what) = head.rsplit_once(':')?;
    let (kind, last_seq) = match (what, &presence) {
        ("p", _) => (TickKind::Presence, 0),
        // Only presence ticks name somebody.
        (_, Some(_)) => return None,
        ("r", None) => (TickKind::Record, 0),
        ("d", None) => (TickKind::Directory, 0),
        // An announcement always carries its event, a PEP change its change.
        ("e" | "u", None) => return None,
        (seq, None) => (TickKind::Messages, seq.parse().ok()?),
    };
    let (presence_of, presence_now) = match presence {
        Some((key, now)) => (Some(key), now),
        None => (None, PresenceNow::Unknown),
    };
    Some(RoomTick {
        room: room.to_owned(),
        kind,
        last_seq,
        presence_of,
        presence_now,
        event: None,
        pep: None,
    })
}

/// `SERVER\nLEN\n` + stanza + nick.
fn parse_presence(rest: &str) -> Option<(PresenceKey, PresenceNow)> {
    let (server, rest) = rest.split_once('\n')?;
    let (len, rest) = rest.split_once('\n')?;
    let (now, nick) = match len {
        "-" => (PresenceNow::Gone, rest),
        "?" => (PresenceNow::Unknown, rest),
        n if n.starts_with('-') => {
            let n: usize = n[1..].parse().ok()?;
            let stanza = rest.get(..n)?;
            (PresenceNow::Left(stanza.to_owned()), &rest[n..])
        }
        n => {
            let n: usize = n.parse().ok()?;
            let stanza = rest.get(..n)?;
            (PresenceNow::Shown(stanza.to_owned()), &rest[n..])
        }
    };
    let key = PresenceKey {
        server: server.to_owned(),
        nick: nick.to_owned(),
    };
    Some((key, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::{leave_payload, presence_payload};

    #[test]
    fn payloads_parse_into_ticks() {
        let t = parse("r@muc.example:42").unwrap();
        assert_eq!(
            (t.kind, t.last_seq, t.presence_of),
            (TickKind::Messages, 42, None)
        );
        let t = parse("r@muc.example:r").unwrap();
        assert_eq!(
            (t.room.as_str(), t.kind),
            ("r@muc.example", TickKind::Record)
        );
        let t = parse("r@muc.example:p").unwrap();
        assert_eq!((t.kind, t.presence_of), (TickKind::Presence, None));
        assert_eq!(t.presence_now, PresenceNow::Unknown);
        // A nick may hold colons and line breaks, a stanza too: lengths, not separators.
        let stanza = "<presence from='r@muc.example/a:b\nc'><status>x\ny</status></presence>";
        let t = parse(&presence_payload(
            "r@muc.example",
            "s1",
            "a:b\nc",
            Some(stanza),
        ))
        .unwrap();
        assert_eq!(
            (t.room.as_str(), t.kind),
            ("r@muc.example", TickKind::Presence)
        );
        let key = t.presence_of.unwrap();
        assert_eq!((key.server.as_str(), key.nick.as_str()), ("s1", "a:b\nc"));
        assert_eq!(t.presence_now, PresenceNow::Shown(stanza.into()));
        let t = parse(&presence_payload("r@muc.example", "s1", "é", None)).unwrap();
        assert_eq!(t.presence_of.unwrap().nick, "é");
        assert_eq!(t.presence_now, PresenceNow::Gone);
        // A departure with the presence that showed it (a ban's 301…).
        let last = "<presence type='unavailable'><x><status code='301'/></x></presence>";
        let t = parse(&leave_payload("r@muc.example", "s1", "-3", last)).unwrap();
        assert_eq!(t.presence_of.unwrap().nick, "-3");
        assert_eq!(t.presence_now, PresenceNow::Left(last.into()));
        let big = "s".repeat(8_000);
        let t = parse(&leave_payload("r@muc.example", "s1", "n", &big)).unwrap();
        assert_eq!(
            t.presence_now,
            PresenceNow::Gone,
            "too large: a plain departure"
        );
        assert!(parse("r@muc.example:p\ns1\n-99\nshort").is_none());
        assert!(parse("r@muc.example:r\ns1\n-\nnick").is_none());
        assert!(parse("r@muc.example:p\ns1\n99\nshort").is_none());
        // A length that splits a character is refused, not a panic.
        assert!(parse("r@muc.example:p\ns1\n1\né").is_none());
        assert!(parse("r@muc.example:p\nno-length").is_none());
        assert!(parse("garbage").is_none());
        // Announcements: the event on the second line, as JSON.
        let t = parse(
            "r@muc.example:e\n{\"kind\":\"destroyed\",\"reason\":\"moved\",\"alternate\":null}",
        )
        .unwrap();
        assert_eq!(
            (t.room.as_str(), t.kind),
            ("r@muc.example", TickKind::Event)
        );
        assert_eq!(
            t.event,
            Some(pchat_room::RoomEvent::Destroyed {
                reason: Some("moved".into()),
                alternate: None
            })
        );
        assert!(parse("r@muc.example:e").is_none());
        // A PEP change: the owner and the change as JSON; the owner must match.
        let change = pchat_store::PepEvent {
            server: "s2".into(),
            owner: "a@example".into(),
            node: "urn:xmpp:bookmarks:1".into(),
            change: pchat_store::PepChange::Published {
                item: "r@muc.example".into(),
            },
        };
        let payload = crate::read::pep_payload(&change).unwrap();
        let t = parse(&payload).unwrap();
        assert_eq!((t.room.as_str(), t.kind), ("a@example", TickKind::Pep));
        assert_eq!(t.pep, Some(change.clone()));
        assert!(parse(&payload.replacen("a@example:u", "b@example:u", 1)).is_none());
        assert!(parse("a@example:u").is_none());
        let long = pchat_store::PepEvent {
            node: "n".repeat(8_000),
            ..change
        };
        assert!(
            crate::read::pep_payload(&long).is_none(),
            "too large to send"
        );
        assert!(parse("r@muc.example:e\n{not json").is_none());
    }

    #[test]
    fn oversized_presence_payloads_shed_the_stanza_then_the_names() {
        let big = "s".repeat(8_000);
        let t = parse(&presence_payload("r@m", "s1", "nick", Some(&big))).unwrap();
        assert_eq!(t.presence_of.unwrap().nick, "nick");
        assert_eq!(t.presence_now, PresenceNow::Unknown);
        let nick = "n".repeat(8_000);
        assert_eq!(presence_payload("r@m", "s1", &nick, None), "r@m:p");
        let t = parse(&presence_payload("r@m", "s1", &nick, Some("<presence/>"))).unwrap();
        assert_eq!((t.kind, t.presence_of), (TickKind::Presence, None));
    }
}
