//! The session table: which bound resources exist and how to reach their outbound queues.
//! Delivery never blocks a room: a client whose queue is full — in stanzas or in bytes — is
//! disconnected as too slow instead of slowing down the room that writes to it. A room's
//! fan-out shares one serialization of each message among all its recipients
//! ([`SharedStanza`]); only the `to` differs, and each session writes its own JID there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use pchat_xmpp::element::escape_into;
use pchat_xmpp::{ns, Element, Node, StreamError};
use tokio::sync::{mpsc, Notify};

/// What a session's writer receives. Small (16 bytes): tokio's bounded channel allocates its
/// slots in blocks of 32 as soon as it is created, so every idle session holds 32 of these,
/// and a pointer instead of an inline `Element` saves ~2.7 KiB per connection.
#[derive(Debug)]
pub enum Outbound {
    /// Send this stanza.
    Stanza(Box<Element>),
    /// Send this stanza of a room's fan-out, addressed to the session itself.
    Shared(Arc<SharedStanza>),
    /// Close the stream with this error (shutdown, conflict, …).
    Close(Box<(StreamError, String)>),
}

const _: () = assert!(std::mem::size_of::<Outbound>() <= 16);

/// A stanza serialized once for all the recipients of a fan-out: the same bytes except for
/// `to`, which each session fills in with its own full JID as it writes.
#[derive(Debug)]
pub struct SharedStanza {
    /// The stanza without `to`, serialized inside a `jabber:client` stream.
    xml: String,
    /// Bytes of `<name` at its start, after which `to` (and over WebSocket `xmlns`) go.
    head: usize,
}

/// Bytes a serialized stanza may need beyond [`SharedStanza::xml`] and the `to` value: the
/// attribute itself and, over WebSocket, the namespace declaration.
const SHARED_EXTRA_BYTES: usize = 48;

impl SharedStanza {
    /// `el` without its `to`, serialized once; `None` for an element that is not a
    /// `jabber:client` stanza (they are sent one by one).
    pub fn new(el: &Element) -> Option<Arc<SharedStanza>> {
        if el.ns != ns::CLIENT {
            return None;
        }
        let mut xml = String::with_capacity(256);
        let head = 1 + el.name.len();
        // What `Element::write_xml` writes, minus `to`: `<name attrs>children</name>`. The
        // children serialize the same in any parent, since they declare by their own ns.
        xml.push('<');
        xml.push_str(&el.name);
        for (k, v) in el.attrs.iter().filter(|(k, _)| k != "to") {
            xml.push(' ');
            xml.push_str(k);
            xml.push_str("='");
            escape_into(&mut xml, v, true);
            xml.push('\'');
        }
        if el.children.is_empty() {
            xml.push_str("/>");
        } else {
            xml.push('>');
            for c in &el.children {
                match c {
                    Node::Element(e) => e.write_xml(&mut xml, ns::CLIENT),
                    Node::Text(t) => escape_into(&mut xml, t, false),
                }
            }
            xml.push_str("</");
            xml.push_str(&el.name);
            xml.push('>');
        }
        Some(Arc::new(SharedStanza { xml, head }))
    }

    /// A stanza already serialized without `to` inside a `jabber:client` stream, whose
    /// `<name` is the first `head` bytes.
    pub fn from_serialized(xml: String, head: usize) -> Arc<SharedStanza> {
        Arc::new(SharedStanza { xml, head })
    }

    /// The serialized stanza without `to`.
    pub fn xml(&self) -> &str {
        &self.xml
    }

    /// Writes the stanza addressed `to`; over WebSocket, with its namespace declared (a frame
    /// is a document of its own, RFC 7395 §3.3.3).
    pub fn write_to(&self, to: &str, websocket: bool, out: &mut String) {
        out.reserve(self.wire_bytes(to));
        out.push_str(&self.xml[..self.head]);
        if websocket {
            out.push_str(" xmlns='");
            out.push_str(ns::CLIENT);
            out.push('\'');
        }
        out.push_str(" to='");
        escape_into(out, to, true);
        out.push('\'');
        out.push_str(&self.xml[self.head..]);
    }

    /// The bytes it takes in a session's queue addressed `to` (an upper bound but for
    /// escapes in `to`).
    pub fn wire_bytes(&self, to: &str) -> usize {
        self.xml.len() + to.len() + SHARED_EXTRA_BYTES
    }
}

/// About what `el` takes when serialized: names, attributes and text, without escapes. It
/// only needs to be the same when a stanza is queued and when it is taken.
pub fn estimate_bytes(el: &Element) -> usize {
    let mut n = 2 * el.name.len() + 5;
    for (k, v) in &el.attrs {
        n += k.len() + v.len() + 4;
    }
    for c in &el.children {
        n += match c {
            Node::Element(e) => estimate_bytes(e),
            Node::Text(t) => t.len(),
        };
    }
    n
}

/// What a session shares with everyone who delivers to it.
#[derive(Debug)]
pub struct SessionShared {
    /// Signalled when the queue overflowed: the session closes itself.
    pub overflow: Notify,
    /// Signalled when the session took a batch off its queue (waiting deliveries look again).
    drained: Notify,
    /// Bytes queued now, by [`Outbound::cost`].
    queued_bytes: AtomicUsize,
    /// Liveness for XEP-0199 pings: [`HEARD`], [`PINGED`], [`SILENT`] bits.
    liveness: AtomicU8,
    /// The bound on `queued_bytes`.
    bytes_max: usize,
    /// The client enabled message carbons (XEP-0280).
    carbons: AtomicBool,
}

impl SessionShared {
    /// For a queue of at most `bytes_max` bytes.
    pub fn new(bytes_max: usize) -> Arc<SessionShared> {
        Arc::new(SessionShared {
            overflow: Notify::new(),
            drained: Notify::new(),
            queued_bytes: AtomicUsize::new(0),
            liveness: AtomicU8::new(0),
            bytes_max,
            carbons: AtomicBool::new(false),
        })
    }

    /// The bound on the bytes queued.
    pub fn bytes_max(&self) -> usize {
        self.bytes_max
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    fn reserve(&self, bytes: usize) -> bool {
        let before = self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > self.bytes_max {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn release(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The session took `bytes` off its queue.
    pub fn taken(&self, bytes: usize) {
        self.release(bytes);
    }

    /// The session took a batch off its queue, or ended: waiting deliveries look again.
    pub fn drained(&self) {
        self.drained.notify_waiters();
    }

    /// The client sent something: it is alive.
    pub fn heard(&self) {
        // A load first: most stanzas find the bit set and need not write the shared line.
        if self.liveness.load(Ordering::Relaxed) & HEARD == 0 {
            self.liveness.fetch_or(HEARD, Ordering::Relaxed);
        }
    }

    /// Was anything heard since the last call? Clears what it reports; hearing something
    /// also ends a pending ping.
    pub fn take_heard(&self) -> bool {
        self.liveness
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                (bits & HEARD != 0).then_some(bits & !(HEARD | PINGED))
            })
            .is_ok()
    }

    /// A ping was sent and not yet answered.
    pub fn is_pinged(&self) -> bool {
        self.liveness.load(Ordering::Relaxed) & PINGED != 0
    }

    /// Marks a ping sent.
    pub fn set_pinged(&self) {
        self.liveness.fetch_or(PINGED, Ordering::Relaxed);
    }

    /// The ping timeout passed: unless something was heard since the ping, the client is
    /// given up on (the session closes as it does on overflow, with `connection-timeout`).
    pub fn give_up_if_silent(&self) {
        let silent = self
            .liveness
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                (bits & (PINGED | HEARD | HIBERNATING) == PINGED).then_some(bits | SILENT)
            })
            .is_ok();
        if silent {
            self.overflow.notify_one();
        }
    }

    /// Given up on for not answering a ping.
    pub fn is_silent(&self) -> bool {
        self.liveness.load(Ordering::Relaxed) & SILENT != 0
    }

    /// The connection broke and the session waits to be resumed (XEP-0198): it is not
    /// pinged, and its queue fills until it is resumed or overflows.
    pub fn set_hibernating(&self) {
        self.liveness.fetch_or(HIBERNATING, Ordering::Relaxed);
    }

    /// The client turned message carbons (XEP-0280) on or off.
    pub fn set_carbons(&self, on: bool) {
        self.carbons.store(on, Ordering::Relaxed);
    }

    /// Copies of the account's one-to-one messages go to this session (XEP-0280).
    pub fn carbons(&self) -> bool {
        self.carbons.load(Ordering::Relaxed)
    }

    /// Waiting to be resumed.
    pub fn is_hibernating(&self) -> bool {
        self.liveness.load(Ordering::Relaxed) & HIBERNATING != 0
    }

    /// Resumed on a new connection: alive, no ping pending.
    pub fn resumed(&self) {
        self.liveness.store(HEARD, Ordering::Relaxed);
    }
}

/// [`SessionShared`] liveness bits: something arrived since the pinger last looked.
const HEARD: u8 = 1;
/// A ping was sent and nothing arrived since.
const PINGED: u8 = 2;
/// The ping went unanswered for the whole timeout.
const SILENT: u8 = 4;
/// Waiting to be resumed (XEP-0198): not pinged.
const HIBERNATING: u8 = 8;

impl Outbound {
    /// What this item counts for in a queue of at most `bytes_max` bytes, for the session
    /// `to` (capped, so that one stanza of the largest size still passes an empty queue).
    pub fn cost(&self, to: &str, bytes_max: usize) -> usize {
        match self {
            Outbound::Stanza(el) => estimate_bytes(el),
            Outbound::Shared(s) => s.wire_bytes(to),
            Outbound::Close(_) => 0,
        }
        .min(bytes_max)
    }
}

/// A bound session's mailbox.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    /// Unique id, so a late unregister cannot remove a newer session with the same JID.
    pub id: u64,
    /// Outbound queue.
    pub tx: mpsc::Sender<Outbound>,
    /// Its byte count and signals.
    pub shared: Arc<SessionShared>,
}

/// Bare JID → resource → session.
#[derive(Default)]
pub struct Router {
    sessions: RwLock<HashMap<String, HashMap<String, SessionHandle>>>,
    next_id: AtomicU64,
}

/// Outcome of a delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the session.
    Queued,
    /// No such session.
    NoSession,
    /// The session is too slow; it has been told to close.
    Overflow,
}

impl Router {
    /// A fresh id for a new session.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Binds `resource` for `bare`; returns the resource actually bound (a suffix is added
    /// when the requested one is taken, as RFC 6120 §7.7.2.2 allows), or `None` when the
    /// account already has `per_account_max` sessions (RFC 6120 §7.6.2.1's
    /// `resource-constraint`).
    pub fn bind(
        &self,
        bare: &str,
        resource: &str,
        handle: SessionHandle,
        per_account_max: usize,
    ) -> Option<String> {
        let mut map = self.sessions.write().unwrap_or_else(|p| p.into_inner());
        if map.get(bare).is_some_and(|r| r.len() >= per_account_max) {
            return None;
        }
        let resources = map.entry(bare.to_owned()).or_default();
        let mut chosen = resource.to_owned();
        while chosen.is_empty() || resources.contains_key(&chosen) {
            chosen = format!(
                "{}{}",
                if resource.is_empty() {
                    "pchat-"
                } else {
                    resource
                },
                random_suffix()
            );
        }
        resources.insert(chosen.clone(), handle);
        Some(chosen)
    }

    /// Removes a session if it is still the one with `id`.
    pub fn unbind(&self, bare: &str, resource: &str, id: u64) {
        let mut map = self.sessions.write().unwrap_or_else(|p| p.into_inner());
        if let Some(resources) = map.get_mut(bare) {
            if resources.get(resource).is_some_and(|h| h.id == id) {
                resources.remove(resource);
            }
            if resources.is_empty() {
                map.remove(bare);
            }
        }
    }

    /// Full JIDs of a bare JID's sessions.
    pub fn resources(&self, bare: &str) -> Vec<String> {
        let map = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        map.get(bare)
            .map(|r| r.keys().map(|res| format!("{bare}/{res}")).collect())
            .unwrap_or_default()
    }

    /// The sessions of `bare`, by full JID.
    pub fn handles(&self, bare: &str) -> Vec<(String, SessionHandle)> {
        let map = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        map.get(bare)
            .map(|r| {
                r.iter()
                    .map(|(res, h)| (format!("{bare}/{res}"), h.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Number of bound sessions.
    pub fn count(&self) -> usize {
        let map = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        map.values().map(HashMap::len).sum()
    }

    /// Every bound session: its full JID and handle.
    pub fn sessions(&self) -> Vec<(String, SessionHandle)> {
        let map = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .flat_map(|(bare, r)| {
                r.iter()
                    .map(move |(res, h)| (format!("{bare}/{res}"), h.clone()))
            })
            .collect()
    }

    /// Every session handle (for shutdown).
    pub fn all(&self) -> Vec<SessionHandle> {
        let map = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        map.values().flat_map(|r| r.values().cloned()).collect()
    }

    /// Queues `stanza` for the full JID in its `to` attribute; a bare JID reaches every
    /// session of that account (room invitations are addressed that way).
    pub fn deliver(&self, stanza: Element) -> Delivery {
        let Some(to) = stanza.get_attr("to") else {
            return Delivery::NoSession;
        };
        let Some((bare, resource)) = to.split_once('/') else {
            let mut result = Delivery::NoSession;
            for full in self.resources(to) {
                let mut copy = stanza.clone();
                copy.set_attr("to", full);
                if self.deliver(copy) == Delivery::Queued {
                    result = Delivery::Queued;
                }
            }
            return result;
        };
        let Some(handle) = self.handle(bare, resource) else {
            return Delivery::NoSession;
        };
        let cost = estimate_bytes(&stanza).min(handle.shared.bytes_max);
        enqueue(&handle, Outbound::Stanza(Box::new(stanza)), cost)
    }

    /// Queues a room's fan-out stanza for the session `to` (a full JID).
    pub fn deliver_shared(&self, to: &str, stanza: &Arc<SharedStanza>) -> Delivery {
        let Some((bare, resource)) = to.split_once('/') else {
            return Delivery::NoSession;
        };
        let Some(handle) = self.handle(bare, resource) else {
            return Delivery::NoSession;
        };
        let cost = stanza.wire_bytes(to).min(handle.shared.bytes_max);
        enqueue(&handle, Outbound::Shared(stanza.clone()), cost)
    }

    /// Queues `stanza` (addressed to a full JID) once the session's queue is at most half
    /// full, in bytes and in stanzas, waiting up to `wait_max` for it to drain: for bulk
    /// answers (an archive page) that may exceed a queue but must not crowd out live traffic
    /// or get a client that reads at a normal pace dropped. A client that does not read is
    /// dropped by its write deadline meanwhile, which ends the wait.
    pub async fn deliver_waiting(&self, stanza: Element, wait_max: Duration) -> Delivery {
        let Some((bare, resource)) = stanza.get_attr("to").and_then(|t| t.split_once('/')) else {
            return Delivery::NoSession;
        };
        let Some(handle) = self.handle(bare, resource) else {
            return Delivery::NoSession;
        };
        let shared = &handle.shared;
        let cost = estimate_bytes(&stanza).min(shared.bytes_max);
        let deadline = tokio::time::Instant::now() + wait_max;
        loop {
            let drained = shared.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if handle.tx.is_closed() {
                return Delivery::NoSession;
            }
            let bytes_ok = shared.queued_bytes() + cost <= shared.bytes_max / 2;
            let slots_ok = handle.tx.capacity() >= handle.tx.max_capacity() / 2;
            if bytes_ok && slots_ok {
                break;
            }
            // The session signals each batch it takes; the tick covers a batch taken between
            // the look above and `enable` on some other path, and a session that ended.
            let tick = tokio::time::Instant::now() + WAITING_TICK;
            tokio::select! {
                () = &mut drained => {}
                () = tokio::time::sleep_until(tick.min(deadline)) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Delivery::Overflow;
            }
        }
        enqueue(&handle, Outbound::Stanza(Box::new(stanza)), cost)
    }

    fn handle(&self, bare: &str, resource: &str) -> Option<SessionHandle> {
        let map = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        map.get(bare).and_then(|r| r.get(resource)).cloned()
    }
}

/// How often a waiting delivery looks at its session's queue without being signalled.
const WAITING_TICK: Duration = Duration::from_millis(100);

/// Queues `item` of `cost` bytes, or tells the session it is too slow.
fn enqueue(handle: &SessionHandle, item: Outbound, cost: usize) -> Delivery {
    let shared = &handle.shared;
    if !shared.reserve(cost) {
        shared.overflow.notify_one();
        crate::metrics::METRICS.queue_drops.inc();
        return Delivery::Overflow;
    }
    match handle.tx.try_send(item) {
        Ok(()) => {
            crate::metrics::METRICS.deliveries.inc();
            Delivery::Queued
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            shared.release(cost);
            shared.overflow.notify_one();
            crate::metrics::METRICS.queue_drops.inc();
            Delivery::Overflow
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            shared.release(cost);
            Delivery::NoSession
        }
    }
}

fn random_suffix() -> String {
    use rand::Rng as _;
    format!("-{:08x}", rand::thread_rng().gen::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Element {
        Element::new("message", ns::CLIENT)
            .attr("from", "r@conference.localhost/al'ice")
            .attr("type", "groupchat")
            .attr("id", "m&1")
            .child(Element::new("body", ns::CLIENT).text("<hi> & 'bye'"))
            .child(
                Element::new("stanza-id", "urn:xmpp:sid:0")
                    .attr("by", "r@conference.localhost")
                    .attr("id", "7"),
            )
    }

    /// A shared stanza is, byte for byte, what the session would have written for its own
    /// copy, over TCP and over WebSocket, for any recipient.
    #[test]
    fn shared_stanza_is_the_per_recipient_serialization() {
        let m = message();
        let shared = SharedStanza::new(&m).unwrap();
        for to in ["bob@localhost/phone", "o'brien@localhost/a<b>&c"] {
            let mut copy = m.clone();
            copy.set_attr("to", to);
            for (ws, parent) in [(false, ns::CLIENT), (true, "")] {
                let mut out = String::new();
                shared.write_to(to, ws, &mut out);
                let want = copy.to_xml_in(parent);
                // The same element, `to` in another place among the attributes.
                let parsed = |xml: &str| {
                    let mut el = Element::parse(xml.as_bytes(), ns::CLIENT).unwrap();
                    el.attrs.sort();
                    el
                };
                assert_eq!(parsed(&out), parsed(&want), "to {to}, websocket {ws}");
                assert_eq!(out.len(), want.len(), "to {to}, websocket {ws}");
                assert!(out.len() <= shared.wire_bytes(to));
            }
        }
        // A `to` already present is replaced, not doubled.
        let mut addressed = m.clone();
        addressed.set_attr("to", "someone@else");
        let mut out = String::new();
        SharedStanza::new(&addressed)
            .unwrap()
            .write_to("bob@localhost/x", false, &mut out);
        assert_eq!(out.matches(" to=").count(), 1, "{out}");
        // Empty stanzas too.
        let empty = Element::new("presence", ns::CLIENT).attr("type", "unavailable");
        let mut out = String::new();
        SharedStanza::new(&empty)
            .unwrap()
            .write_to("b@l/r", false, &mut out);
        assert_eq!(out, "<presence to='b@l/r' type='unavailable'/>");
        assert!(SharedStanza::new(&Element::new("x", "other")).is_none());
    }

    fn bound(
        router: &Router,
        full: &str,
        stanzas: usize,
        bytes: usize,
    ) -> mpsc::Receiver<Outbound> {
        let (tx, rx) = mpsc::channel(stanzas);
        let (bare, res) = full.split_once('/').unwrap();
        let handle = SessionHandle {
            id: router.next_id(),
            tx,
            shared: SessionShared::new(bytes),
        };
        assert!(router.bind(bare, res, handle, 10).is_some());
        rx
    }

    fn shared_of(router: &Router, full: &str) -> Arc<SessionShared> {
        let (bare, res) = full.split_once('/').unwrap();
        router.handle(bare, res).unwrap().shared
    }

    /// The queue is bounded in bytes as well as in stanzas: a reader that falls 64 KiB behind
    /// a 64 KiB queue overflows long before 4096 stanzas, and what it had queued counts
    /// until the session takes it.
    #[test]
    fn queue_is_bounded_in_bytes() {
        let router = Router::default();
        let mut rx = bound(&router, "c@l/r", 4096, 64 * 1024);
        let big = Element::new("message", ns::CLIENT)
            .attr("to", "c@l/r")
            .child(Element::new("body", ns::CLIENT).text("x".repeat(16 * 1024)));
        let shared = SharedStanza::new(&big).unwrap();
        let mut queued = 0;
        while router.deliver_shared("c@l/r", &shared) == Delivery::Queued {
            queued += 1;
            assert!(queued < 10, "never overflowed");
        }
        assert_eq!(queued, 3);
        let s = shared_of(&router, "c@l/r");
        assert!(s.queued_bytes() <= 64 * 1024);
        // Taking one makes room for one more.
        let item = rx.try_recv().unwrap();
        s.taken(item.cost("c@l/r", 64 * 1024));
        assert_eq!(router.deliver_shared("c@l/r", &shared), Delivery::Queued);
        assert_eq!(router.deliver(big.clone()), Delivery::Overflow);
        // One stanza larger than the whole queue still passes an empty queue.
        let mut rx = bound(&router, "d@l/r", 16, 1024);
        let mut huge = big.clone();
        huge.set_attr("to", "d@l/r");
        assert_eq!(router.deliver(huge.clone()), Delivery::Queued);
        assert_eq!(router.deliver(huge.clone()), Delivery::Overflow);
        let item = rx.try_recv().unwrap();
        let s = shared_of(&router, "d@l/r");
        s.taken(item.cost("d@l/r", 1024));
        assert_eq!(s.queued_bytes(), 0);
    }

    /// The pinger's view of a session: heard → no ping; silent → pinged; an answer before
    /// the timeout saves it; none gives up on it.
    #[test]
    fn liveness_for_pings() {
        let s = SessionShared::new(1024);
        assert!(!s.take_heard(), "nothing heard yet");
        s.set_pinged();
        s.heard();
        s.give_up_if_silent();
        assert!(!s.is_silent(), "answered in time");
        assert!(s.take_heard());
        assert!(!s.is_pinged(), "hearing ends the ping");
        assert!(!s.take_heard(), "a whole interval of silence");
        s.set_pinged();
        assert!(
            !s.take_heard() && s.is_pinged(),
            "still waiting for the answer"
        );
        s.give_up_if_silent();
        assert!(s.is_silent());
    }

    #[test]
    fn accounts_have_a_session_limit() {
        let router = Router::default();
        let handle = || SessionHandle {
            id: router.next_id(),
            tx: mpsc::channel(1).0,
            shared: SessionShared::new(1024),
        };
        assert!(router.bind("a@l", "1", handle(), 2).is_some());
        assert!(router.bind("a@l", "2", handle(), 2).is_some());
        assert!(router.bind("a@l", "3", handle(), 2).is_none());
        assert!(router.bind("b@l", "1", handle(), 2).is_some());
    }

    /// A waiting delivery goes in once the queue is half empty; it gives up when the session
    /// never drains.
    #[tokio::test]
    async fn waiting_delivery_waits_for_half_a_queue() {
        let router = Arc::new(Router::default());
        let mut rx = bound(&router, "c@l/r", 4096, 4096);
        let el = |n: usize| {
            Element::new("message", ns::CLIENT)
                .attr("to", "c@l/r")
                .child(Element::new("body", ns::CLIENT).text("x".repeat(n)))
        };
        assert_eq!(router.deliver(el(3000)), Delivery::Queued);
        let r = router.clone();
        let waiting =
            tokio::spawn(async move { r.deliver_waiting(el(500), Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "3000 of 4096 bytes queued: more than half"
        );
        let item = rx.recv().await.unwrap();
        let s = shared_of(&router, "c@l/r");
        s.taken(item.cost("c@l/r", 4096));
        s.drained();
        assert_eq!(waiting.await.unwrap(), Delivery::Queued);
        assert_eq!(router.deliver(el(3000)), Delivery::Queued);
        let t0 = std::time::Instant::now();
        assert_eq!(
            router
                .deliver_waiting(el(500), Duration::from_millis(300))
                .await,
            Delivery::Overflow
        );
        assert!(t0.elapsed() >= Duration::from_millis(300));
        drop(rx);
        assert_eq!(
            router
                .deliver_waiting(el(500), Duration::from_secs(10))
                .await,
            Delivery::NoSession
        );
    }
}
