//! What every task of a running server shares.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use pchat_store::{Store, StoreResult};
use pchat_xmpp::FramerLimits;
use tokio::sync::broadcast;

use crate::admission::Admission;
use crate::config::Config;
use crate::muc::MucService;
use crate::proxy_protocol::TrustedProxies;
use crate::router::Router;
use crate::throttle::{LoginThrottle, ThrottleLimits};

/// Shared server state.
pub struct State {
    /// Configuration after flags.
    pub config: Config,
    /// The MUC service JID.
    pub muc_jid: String,
    /// Bound sessions.
    pub router: Arc<Router>,
    /// TLS for client ports.
    pub tls: Arc<rustls::ServerConfig>,
    /// Login throttle, per client address.
    pub throttle: LoginThrottle,
    /// Connection counts, in total and per client address, for every client port.
    pub admission: Arc<Admission>,
    /// Proxies allowed to send PROXY protocol headers.
    pub trusted_proxies: TrustedProxies,
    /// Fires once when the process begins shutting down.
    pub shutdown: broadcast::Sender<()>,
    /// What the server serves with while it is active; `None` while idle (pool mode), when it
    /// accepts no session and holds no database connection.
    serving: RwLock<Option<Arc<Serving>>>,
    /// Where an idle server sends clients (pool mode): an active server's address.
    redirect: RwLock<Option<String>>,
    /// The external directory (`[directory]`), when configured: logins with `auth = "ldap"`.
    pub ldap: Option<Arc<crate::ldap::Ldap>>,
    /// Its groups as last read, for every serving period's rooms.
    pub directory_feed: Option<crate::ldap::Feed>,
    /// Places for uploads received at the same time (`upload.uploads_max`).
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// The file ids whose upload this server is receiving now.
    pub receiving: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Sessions waiting to be resumed (XEP-0198), by resumption id.
    pub resumable: crate::sm::Resumable,
    /// This server's name in its pool (`None`: standalone).
    pub pool_server: Option<String>,
    /// The pool as last read for the dashboard and `/metrics` (pool mode).
    pub pool_watch: crate::dashboard::PoolWatch,
}

/// Why sessions are being drained, and where their clients should go.
#[derive(Clone, Debug)]
pub struct Drain {
    /// `host:port` of an active server for `see-other-host`, when there is one.
    pub redirect: Option<String>,
}

/// The store and rooms of an active server. Sessions and room actors hold it; once the
/// server goes idle and they have all ended, the last reference closes the store.
pub struct Serving {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Rooms.
    pub muc: Arc<MucService>,
    /// Tells the sessions of this serving period to leave.
    pub drain: broadcast::Sender<Drain>,
    /// The store's server secret, read at the first login of the period (the same for every
    /// login, so reading it never depends on who logs in).
    secret: tokio::sync::OnceCell<Vec<u8>>,
}

impl Serving {
    /// Serving with `store`.
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        router: Arc<Router>,
        pool_server: Option<String>,
        feeds: crate::muc::Feeds,
    ) -> Arc<Serving> {
        let muc = MucService::new(config, store.clone(), router, pool_server, feeds);
        let (drain, _) = broadcast::channel(1);
        // The walls and groups rooms decide with, read now and whenever they change.
        tokio::spawn(MucService::follow_directory(
            Arc::downgrade(&muc),
            drain.subscribe(),
            Duration::from_millis(config.rooms.directory_refresh_ms),
        ));
        let serving = Arc::new(Serving {
            store,
            muc,
            drain,
            secret: tokio::sync::OnceCell::new(),
        });
        tokio::spawn(crate::upload::purge_unfinished(Arc::downgrade(&serving)));
        serving
    }

    /// The server secret (see [`Store::server_secret`]), read once per serving period.
    pub async fn server_secret(&self) -> StoreResult<&[u8]> {
        self.secret
            .get_or_try_init(|| self.store.server_secret())
            .await
            .map(Vec::as_slice)
    }
}

impl State {
    /// A server that starts idle.
    pub fn new(
        config: Config,
        router: Arc<Router>,
        tls: Arc<rustls::ServerConfig>,
        shutdown: broadcast::Sender<()>,
    ) -> State {
        let muc_jid = config.muc_jid();
        let l = &config.limits;
        let throttle = LoginThrottle::new(ThrottleLimits {
            free: l.auth_failures_max,
            first: Duration::from_millis(l.auth_delay_first_ms),
            max: Duration::from_millis(l.auth_delay_max_ms),
            forget_after: Duration::from_secs(l.auth_failure_window_s),
            entries_max: l.auth_throttle_addresses_max,
        });
        let admission = Admission::new(l.sessions_max, l.connections_per_address_max);
        let uploads = Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(config.upload.uploads_max).unwrap_or(16),
        ));
        // `Config::validate` checked the list; an entry it refused cannot get here.
        let trusted_proxies =
            TrustedProxies::parse(&config.proxy_protocol.trusted_proxies).unwrap_or_default();
        State {
            config,
            muc_jid,
            router,
            tls,
            throttle,
            admission,
            trusted_proxies,
            shutdown,
            serving: RwLock::new(None),
            redirect: RwLock::new(None),
            ldap: None,
            directory_feed: None,
            uploads,
            receiving: Default::default(),
            resumable: Default::default(),
            pool_server: None,
            pool_watch: Default::default(),
        }
    }

    /// Limits for a new stream framer.
    pub fn framer_limits(&self) -> FramerLimits {
        FramerLimits {
            stanza_bytes_max: self.config.limits.stanza_bytes_max,
            ..FramerLimits::default()
        }
    }

    /// The current serving period, if the server is active.
    pub fn serving(&self) -> Option<Arc<Serving>> {
        self.serving
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Where an idle server sends clients.
    pub fn idle_redirect(&self) -> Option<String> {
        self.redirect
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets where an idle server sends clients.
    pub fn set_idle_redirect(&self, to: Option<String>) {
        *self.redirect.write().unwrap_or_else(|p| p.into_inner()) = to;
    }

    /// Starts or ends a serving period; returns the previous one.
    pub fn set_serving(&self, serving: Option<Arc<Serving>>) -> Option<Arc<Serving>> {
        std::mem::replace(
            &mut *self.serving.write().unwrap_or_else(|p| p.into_inner()),
            serving,
        )
    }
}
