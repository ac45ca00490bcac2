//! XEP-0198 stream management: the counters and the queue of stanzas the client has not
//! acknowledged (`Sm`, pure), and the table of sessions a new connection may resume
//! (`Resumable`).
//!
//! A session that enabled resumption does not end when its connection breaks: it waits
//! (`limits.resume_timeout_s`) with its rooms and its queue as they were, and a new
//! connection of the same account that sends `<resume previd h/>` hands its transport to the
//! waiting session's task, which re-sends what the client had not acknowledged and goes on.
//! The session task owns everything, so resuming moves a socket, not a session. Nothing is
//! shared between servers: on another server of a pool the id is unknown, the client is told
//! `item-not-found`, binds a new session and catches up from the archive (MAM).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use pchat_xmpp::{ns, Element};
use tokio::sync::{mpsc, oneshot};

use crate::transport::Transport;

/// A new connection's request to take over a waiting session.
pub struct Takeover {
    /// The new connection, authenticated as the session's account, its stream open.
    pub transport: Transport,
    /// The `h` the client sent: how many of our stanzas it handled.
    pub h: u32,
    /// `Ok` once the session took the connection; otherwise the connection back with the
    /// reason, so the new connection can bind a session of its own.
    pub answer: oneshot::Sender<Result<(), (Transport, Refusal)>>,
}

/// Why a session refused a takeover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The session ended meanwhile.
    Gone,
    /// The client says it handled more stanzas than the session sent.
    HandledTooHigh {
        /// What the session sent in all.
        sent: u32,
    },
}

struct Entry {
    bare: String,
    websocket: bool,
    tx: mpsc::Sender<Box<Takeover>>,
}

/// The sessions that may be resumed, by resumption id.
#[derive(Default)]
pub struct Resumable {
    entries: Mutex<HashMap<String, Entry>>,
}

/// Why a resumption failed before reaching the session.
#[derive(Debug, PartialEq, Eq)]
pub enum NotFound {
    /// No such id for this account (or the session is being resumed already).
    Unknown,
    /// The session was on the other kind of connection (WebSocket vs. TCP).
    OtherTransport,
}

impl Resumable {
    /// Registers a session; returns its resumption id and the receiver of takeovers.
    pub fn register(&self, bare: &str, websocket: bool) -> (String, mpsc::Receiver<Box<Takeover>>) {
        let (tx, rx) = mpsc::channel(1);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let id = loop {
            let id = new_id();
            if !entries.contains_key(&id) {
                break id;
            }
        };
        entries.insert(
            id.clone(),
            Entry {
                bare: bare.to_owned(),
                websocket,
                tx,
            },
        );
        (id, rx)
    }

    /// Forgets a session (it ended).
    pub fn remove(&self, id: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// The mailbox of the session `id` of account `bare`, over the same kind of connection.
    pub fn find(
        &self,
        id: &str,
        bare: &str,
        websocket: bool,
    ) -> Result<mpsc::Sender<Box<Takeover>>, NotFound> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // Another account's id is as unknown as one that never existed: ids are not
        // confirmed to whoever guesses them.
        let entry = entries
            .get(id)
            .filter(|e| e.bare == bare)
            .ok_or(NotFound::Unknown)?;
        if entry.websocket != websocket {
            return Err(NotFound::OtherTransport);
        }
        Ok(entry.tx.clone())
    }

    /// Sessions that may be resumed now.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// No session may be resumed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn new_id() -> String {
    use rand::Rng as _;
    let bytes: [u8; 16] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stream's management state once the client sent `<enable/>`.
pub struct Sm {
    /// Resumption id and the takeover mailbox, when resumption was granted.
    pub resume: Option<(String, mpsc::Receiver<Box<Takeover>>)>,
    /// Stanzas received from the client since `<enable/>` (mod 2^32).
    pub handled: u32,
    /// The client's last `h`: our stanzas it acknowledged.
    acked: u32,
    /// Stanzas sent and not acknowledged, oldest first, as they went on the wire.
    unacked: VecDeque<String>,
    unacked_bytes: usize,
    /// A `<r/>` is out and not answered.
    pub requested: bool,
    /// How long the session waits to be resumed after its connection broke.
    pub window: std::time::Duration,
}

/// The client acknowledged more than was sent: a protocol error that ends the stream.
#[derive(Debug, PartialEq, Eq)]
pub struct TooHigh {
    /// The stanzas sent in all (mod 2^32).
    pub sent: u32,
}

impl Sm {
    /// Counters at zero, as `<enable/>` sets them.
    pub fn new(
        resume: Option<(String, mpsc::Receiver<Box<Takeover>>)>,
        window: std::time::Duration,
    ) -> Sm {
        Sm {
            resume,
            handled: 0,
            acked: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            requested: false,
            window,
        }
    }

    /// A stanza went out (`frame` as written).
    pub fn sent(&mut self, frame: &str) {
        self.unacked_bytes += frame.len();
        self.unacked.push_back(frame.to_owned());
    }

    /// Stanzas sent in all (mod 2^32).
    pub fn sent_count(&self) -> u32 {
        self.acked.wrapping_add(self.unacked.len() as u32)
    }

    /// The client handled `h` of our stanzas: they leave the queue.
    pub fn ack(&mut self, h: u32) -> Result<(), TooHigh> {
        let newly = h.wrapping_sub(self.acked) as usize;
        if newly > self.unacked.len() {
            return Err(TooHigh {
                sent: self.sent_count(),
            });
        }
        for frame in self.unacked.drain(..newly) {
            self.unacked_bytes -= frame.len();
        }
        self.acked = h;
        self.requested = false;
        Ok(())
    }

    /// Stanzas not acknowledged, and their bytes.
    pub fn unacked(&self) -> (usize, usize) {
        (self.unacked.len(), self.unacked_bytes)
    }

    /// The frames not acknowledged, oldest first, to send again on a resumed stream (they
    /// stay in the queue until acknowledged there).
    pub fn frames(&self) -> impl Iterator<Item = &String> {
        self.unacked.iter()
    }

    /// Whether to ask the client for an acknowledgment now: something is unacknowledged and
    /// no request is out (one request per round trip at most).
    pub fn should_request(&self) -> bool {
        !self.requested && !self.unacked.is_empty()
    }
}

/// `<enabled/>`, with the resumption id and window when resumption was granted.
pub fn enabled(resume: Option<(&str, u64)>) -> Element {
    let e = Element::new("enabled", ns::SM);
    match resume {
        Some((id, max)) => e
            .attr("id", id)
            .attr("resume", "true")
            .attr("max", max.to_string()),
        None => e,
    }
}

/// `<failed/>` with a stanza error condition and, when given, a text.
pub fn failed(condition: &str, text: Option<&str>) -> Element {
    let mut f = Element::new("failed", ns::SM).child(Element::new(condition, ns::STANZAS));
    if let Some(text) = text {
        f = f.child(
            Element::new("text", ns::STANZAS)
                .attr("xml:lang", "en")
                .text(text),
        );
    }
    f
}

/// `<a h/>`.
pub fn answer(h: u32) -> Element {
    Element::new("a", ns::SM).attr("h", h.to_string())
}

/// `<r/>`.
pub fn request() -> Element {
    Element::new("r", ns::SM)
}

/// `h` as XEP-0198 writes it (an unsigned 32-bit integer).
pub fn parse_h(el: &Element) -> Option<u32> {
    el.get_attr("h")?.parse().ok()
}

/// Whether an `<enable/>` asks for resumption (`resume='true'` or `'1'`), and the longest
/// window the client wants (`max`, seconds).
pub fn wants_resume(el: &Element) -> (bool, Option<u64>) {
    let on = matches!(el.get_attr("resume"), Some("true" | "1"));
    (on, el.get_attr("max").and_then(|m| m.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_drop_what_the_client_handled_and_refuse_more_than_was_sent() {
        let mut sm = Sm::new(None, std::time::Duration::ZERO);
        for f in ["<a/>", "<bb/>", "<ccc/>"] {
            sm.sent(f);
        }
        assert_eq!(sm.unacked(), (3, 15));
        assert!(sm.should_request());
        sm.requested = true;
        assert!(!sm.should_request());
        sm.ack(2).unwrap();
        assert_eq!(sm.unacked(), (1, 6));
        assert_eq!(sm.frames().collect::<Vec<_>>(), ["<ccc/>"]);
        assert!(!sm.requested, "an answer ends the request");
        sm.ack(2).unwrap();
        assert_eq!(sm.ack(4), Err(TooHigh { sent: 3 }));
        assert_eq!(sm.unacked(), (1, 6), "a refused ack changes nothing");
        sm.ack(3).unwrap();
        assert_eq!(sm.unacked(), (0, 0));
        assert!(!sm.should_request());
    }

    #[test]
    fn counters_wrap_at_two_to_the_32() {
        let mut sm = Sm::new(None, std::time::Duration::ZERO);
        sm.acked = u32::MAX - 1;
        sm.sent("<x/>");
        sm.sent("<y/>");
        sm.sent("<z/>");
        assert_eq!(sm.sent_count(), 1);
        sm.ack(0).unwrap();
        assert_eq!(sm.unacked(), (1, 4));
        sm.ack(1).unwrap();
        assert_eq!(sm.unacked(), (0, 0));
        assert_eq!(sm.ack(2), Err(TooHigh { sent: 1 }));
    }

    #[test]
    fn an_id_is_found_only_by_its_account_over_its_kind_of_connection() {
        let table = Resumable::default();
        let (id, _rx) = table.register("alice@localhost", false);
        assert_eq!(id.len(), 32);
        assert!(table.find(&id, "alice@localhost", false).is_ok());
        assert_eq!(
            table.find(&id, "mallory@localhost", false).err(),
            Some(NotFound::Unknown)
        );
        assert_eq!(
            table.find(&id, "alice@localhost", true).err(),
            Some(NotFound::OtherTransport)
        );
        table.remove(&id);
        assert_eq!(
            table.find(&id, "alice@localhost", false).err(),
            Some(NotFound::Unknown)
        );
        assert!(table.is_empty());
    }

    #[test]
    fn enable_asks_for_resumption_with_true_or_1() {
        let e = |r: &str| Element::new("enable", ns::SM).attr("resume", r);
        assert_eq!(wants_resume(&e("true")), (true, None));
        assert_eq!(wants_resume(&e("1").attr("max", "60")), (true, Some(60)));
        assert_eq!(wants_resume(&e("false")), (false, None));
        assert_eq!(wants_resume(&Element::new("enable", ns::SM)), (false, None));
    }
}
