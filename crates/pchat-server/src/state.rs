//! What every task of a running server shares.

use std::sync::Arc;

use pchat_store::Store;
use pchat_xmpp::FramerLimits;
use tokio::sync::broadcast;

use crate::auth::AuthLimiter;
use crate::config::Config;
use crate::muc::MucService;
use crate::router::Router;

/// Shared server state.
pub struct State {
    /// Configuration after flags.
    pub config: Config,
    /// The MUC service JID.
    pub muc_jid: String,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Bound sessions.
    pub router: Arc<Router>,
    /// Rooms.
    pub muc: Arc<MucService>,
    /// TLS for client ports.
    pub tls: Arc<rustls::ServerConfig>,
    /// Login throttle.
    pub limiter: AuthLimiter,
    /// Fires once when the server begins shutting down.
    pub shutdown: broadcast::Sender<()>,
}

impl State {
    /// Limits for a new stream framer.
    pub fn framer_limits(&self) -> FramerLimits {
        FramerLimits {
            stanza_bytes_max: self.config.limits.stanza_bytes_max,
            ..FramerLimits::default()
        }
    }
}
