//! The session table: which bound resources exist and how to reach their outbound queues.
//! Delivery never blocks: a client whose queue is full is disconnected as too slow instead of
//! slowing down the room that writes to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use pchat_xmpp::{Element, StreamError};
use tokio::sync::{mpsc, Notify};

/// What a session's writer receives. Boxed: tokio's bounded channel allocates its slots in
/// blocks of 32 as soon as it is created, so every idle session holds 32 of these, and a
/// pointer instead of an inline `Element` saves ~2.7 KiB per connection.
#[derive(Debug)]
pub enum Outbound {
    /// Send this stanza.
    Stanza(Box<Element>),
    /// Close the stream with this error (shutdown, conflict, …).
    Close(Box<(StreamError, String)>),
}

/// A bound session's mailbox.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    /// Unique id, so a late unregister cannot remove a newer session with the same JID.
    pub id: u64,
    /// Outbound queue.
    pub tx: mpsc::Sender<Outbound>,
    /// Signalled when the queue overflowed: the session closes itself.
    pub overflow: Arc<Notify>,
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
    /// when the requested one is taken, as RFC 6120 §7.7.2.2 allows).
    pub fn bind(&self, bare: &str, resource: &str, handle: SessionHandle) -> String {
        let mut map = self.sessions.write().unwrap_or_else(|p| p.into_inner());
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
        chosen
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

    /// Number of bound sessions.
    pub fn count(&self) -> usize {
        let map = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        map.values().map(HashMap::len).sum()
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
        let handle = {
            let map = self.sessions.read().unwrap_or_else(|p| p.into_inner());
            match map.get(bare).and_then(|r| r.get(resource)) {
                Some(h) => h.clone(),
                None => return Delivery::NoSession,
            }
        };
        match handle.tx.try_send(Outbound::Stanza(Box::new(stanza))) {
            Ok(()) => Delivery::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                handle.overflow.notify_one();
                Delivery::Overflow
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::NoSession,
        }
    }
}

fn random_suffix() -> String {
    use rand::Rng as _;
    format!("-{:08x}", rand::thread_rng().gen::<u32>())
}
