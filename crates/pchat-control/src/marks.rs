//! What each active server publishes of the messages it acknowledged
//! (`/pchat/pools/P/servers/S/marks`), from which `pchat pool failover` bounds what a lost
//! site took with it: at least the acknowledged messages the backup lacks, at most that plus
//! what the servers may have acknowledged since they last published.
//!
//! A server publishes one key, cheaply: only when something changed, at most every
//! `marks_publish_interval_ms`, listing only the rooms it acknowledged in recently (with tens
//! of thousands of rooms, a handful per second change). What makes the upper bound hold:
//! - the *allowance*: a server acknowledges at most this many messages beyond what its
//!   last visible publication lists; when they are used up, the next acknowledgment waits
//!   until a new publication is in etcd;
//! - the *guard*: rooms drop out of the listing once their last acknowledgment is older
//!   than `marks_window_s`, and the guard names a message this server committed after every
//!   acknowledgment it no longer lists (committed by this server, so later in the WAL than
//!   all of them): a backup that holds the guard holds all of them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A message, by room and id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRef {
    /// The room's JID.
    pub room: String,
    /// Its id (the stanza-id).
    pub id: i64,
}

/// One server's marks, as it last published them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerMarks {
    /// Increases with every publication of one server process.
    pub serial: u64,
    /// When the marks were taken (RFC 3339, the server's clock), for operators.
    pub at: String,
    /// Room → the highest id this server acknowledged there, for every room it acknowledged
    /// in within the window (and every room not covered by `guard`).
    pub rooms: BTreeMap<String, i64>,
    /// How many more messages the server may acknowledge before its next publication is in
    /// etcd (0 once it stopped serving).
    pub allowance: u64,
    /// Every acknowledgment of this server in a room not listed came before this message was
    /// committed; `None` when no room was ever left out.
    pub guard: Option<MessageRef>,
    /// Rooms were left out without a guard (more than `marks_rooms_max` acknowledged in
    /// within moments): the upper bound is unknown.
    #[serde(default)]
    pub incomplete: bool,
}

impl ServerMarks {
    /// The value written to etcd (JSON).
    pub fn encode(&self) -> Vec<u8> {
        // A map of strings and integers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a value written by [`ServerMarks::encode`].
    pub fn decode(bytes: &[u8]) -> Result<ServerMarks, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}
