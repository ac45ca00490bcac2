//! Room ticks for the other servers of a pool: a dedicated session that `LISTEN`s on
//! [`NOTIFY_CHANNEL`](crate::NOTIFY_CHANNEL) and turns each notification into a
//! [`RoomTick`]. It reconnects by itself, and after every (re)connect sends a `*` tick, because
//! notifications sent while it was away are gone and receivers must catch up by sequence.
//! It ends, closing its session, as soon as the receiver is dropped.

use std::time::Duration;

use futures_util::StreamExt as _;
use pchat_store::{RoomTick, TickKind};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Config, NoTls};

/// Ticks buffered for a slow receiver; beyond that they are dropped (they are only hints).
const TICKS_QUEUED_MAX: usize = 4096;

/// Starts the listener; ticks arrive on the returned receiver.
pub(crate) fn spawn(config: Config) -> mpsc::Receiver<RoomTick> {
    let (tx, rx) = mpsc::channel(TICKS_QUEUED_MAX);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        while !tx.is_closed() {
            let connected = tokio::select! {
                r = config.connect(NoTls) => r,
                () = tx.closed() => return,
            };
            let (client, mut connection) = match connected {
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
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            let statement = format!("LISTEN {}", crate::NOTIFY_CHANNEL);
            let listen = client.batch_execute(&statement);
            tokio::pin!(listen);
            // The session must be driven while LISTEN runs: poll both.
            let mut listening = false;
            loop {
                tokio::select! {
                    r = &mut listen, if !listening => {
                        if r.is_err() {
                            break;
                        }
                        listening = true;
                        backoff = Duration::from_millis(100);
                        for kind in [TickKind::Messages, TickKind::Presence, TickKind::Record] {
                            let _ = tx.try_send(RoomTick { room: "*".into(), kind, last_seq: i64::MAX });
                        }
                    }
                    m = messages.next() => match m {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            if let Some(tick) = parse(n.payload()) {
                                let _ = tx.try_send(tick);
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

/// `room:SEQ` (messages), `room:p` (presence), `room:r` (record).
fn parse(payload: &str) -> Option<RoomTick> {
    let (room, what) = payload.rsplit_once(':')?;
    let (kind, last_seq) = match what {
        "p" => (TickKind::Presence, 0),
        "r" => (TickKind::Record, 0),
        seq => (TickKind::Messages, seq.parse().ok()?),
    };
    Some(RoomTick {
        room: room.to_owned(),
        kind,
        last_seq,
    })
}
