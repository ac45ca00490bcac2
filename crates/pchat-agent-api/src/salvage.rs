//! The salvage's part of the agent API (`POST /v1/salvage`): what the shell asks an old
//! principal's agent before a failback replaces it, and the messages it answers with. The
//! salvage itself runs in the agent (`pchat-agent`'s `salvage` module).

use serde::{Deserialize, Serialize};

/// `POST /v1/salvage`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SalvageRequest {
    /// Host of the authoritative database to compare with.
    pub compare_host: String,
    /// Its port.
    pub compare_port: u16,
    /// Only messages from this time on (µs since the epoch) are compared: older ones were
    /// shipped before the failover's window.
    pub since_us: i64,
    /// The authoritative instance's name: with TLS its certificate must carry
    /// `NAME.POOL.pchat`, whatever `compare_host` says.
    #[serde(default)]
    pub compare_instance: Option<String>,
    /// The password of `pchat_server`, whose rights (reading `mgc`) the comparison uses
    /// there. Sent in the request so that agents never need to read it from etcd.
    #[serde(default)]
    pub compare_password: Option<String>,
}

impl std::fmt::Debug for SalvageRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SalvageRequest")
            .field("compare_host", &self.compare_host)
            .field("compare_port", &self.compare_port)
            .field("since_us", &self.since_us)
            .field("compare_instance", &self.compare_instance)
            .finish_non_exhaustive()
    }
}

/// One message the old principal holds and the authoritative database lacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SalvagedMessage {
    /// The room's JID.
    pub room: String,
    /// Its sequence number on the old principal (not valid in the authoritative archive).
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

/// What a salvage found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SalvageReport {
    /// The messages only the old principal has, by room and sequence.
    pub messages: Vec<SalvagedMessage>,
    /// Messages compared.
    pub compared: u64,
    /// Why nothing could be compared, when so.
    pub note: Option<String>,
}
