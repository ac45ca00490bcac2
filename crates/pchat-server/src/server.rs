//! Start-up and shutdown: data directory, configuration, store, TLS, the three listeners
//! (STARTTLS c2s, direct-TLS c2s, HTTP with WebSocket — over TLS unless `http_tls = false`),
//! and a clean stop on SIGTERM/SIGINT.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, State as AxState, WebSocketUpgrade};
use axum::routing::get;
use pchat_store::Store;
use pchat_store_sqlite::{SqliteOptions, SqliteStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::admission::ConnGuard;
use crate::config::Config;
use crate::proxy_protocol;
use crate::router::Router;
use crate::session;
use crate::state::{Serving, State};
use crate::transport::{ByteStream, Transport};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory cannot be used.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// The store could not be opened.
    #[error("cannot open the store in {path}: {source}")]
    Store {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: pchat_store::StoreError,
    },
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source} (is another server using the port? choose another with the matching --*-port flag)")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Command-line overrides of the configuration file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--domain`.
    pub domain: Option<String>,
    /// `--bind-addr`.
    pub bind_addr: Option<String>,
    /// `--c2s-port`.
    pub c2s_port: Option<u16>,
    /// `--c2s-tls-port`.
    pub c2s_tls_port: Option<u16>,
    /// `--http-port`.
    pub http_port: Option<u16>,
    /// `--metrics-addr`.
    pub metrics_addr: Option<String>,
    /// `--config`: the configuration file instead of the data directory's `pchat.toml`.
    pub config: Option<std::path::PathBuf>,
}

/// Makes sure `dir` exists and is writable, with a message that says how to fix it if not.
pub fn prepare_data_dir(dir: &Path) -> Result<(), ServeError> {
    let err = |reason: String| ServeError::DataDir {
        path: dir.to_owned(),
        reason,
    };
    // 0700: the directory holds the databases, the TLS key and the server secret.
    crate::private::create_dir(dir).map_err(|e| {
        err(format!(
            "cannot create it ({e}); choose another with --data-dir"
        ))
    })?;
    let probe = dir.join(".pchat-write-test");
    std::fs::write(&probe, b"ok").map_err(|e| {
        err(format!("is not writable ({e}); fix its permissions (e.g. chown to the user running pchat) or choose another with --data-dir"))
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Loads `pchat.toml` from `dir` (writing the default on first start) and applies overrides.
pub fn load_config(dir: &Path, o: &Overrides) -> Result<Config, ServeError> {
    // `--config`, else $PCHAT_CONFIG (so the shell reads the file the service does), else
    // the data directory's.
    let file = o
        .config
        .clone()
        .or_else(|| std::env::var_os("PCHAT_CONFIG").map(std::path::PathBuf::from))
        .unwrap_or_else(|| dir.join("pchat.toml"));
    let mut config =
        Config::load_or_create(&file).map_err(|e| ServeError::Config(e.to_string()))?;
    if let Some(d) = &o.domain {
        config.domain = d.to_ascii_lowercase();
    }
    if let Some(b) = &o.bind_addr {
        config.bind_addr = b.clone();
    }
    if let Some(p) = o.c2s_port {
        config.c2s_port = p;
    }
    if let Some(p) = o.c2s_tls_port {
        config.c2s_tls_port = p;
    }
    if let Some(p) = o.http_port {
        config.http_port = p;
    }
    if let Some(a) = &o.metrics_addr {
        config.metrics_addr = a.clone();
    }
    config.validate().map_err(ServeError::Config)?;
    Ok(config)
}

/// Opens the SQLite store in `dir` with the configured tuning. `shared` opens it beside a
/// running server, for the management shell.
pub fn open_store(dir: &Path, config: &Config, shared: bool) -> Result<SqliteStore, ServeError> {
    let opts = SqliteOptions {
        shared,
        group_commit_max_writes: config.store.group_commit_max_writes,
        group_commit_delay_us: config.store.group_commit_delay_us,
        read_connections: config.store.read_connections,
        ..SqliteOptions::default()
    };
    SqliteStore::open(dir, opts).map_err(|source| ServeError::Store {
        path: dir.to_owned(),
        source,
    })
}

async fn listen(addr: &str, port: u16) -> Result<TcpListener, ServeError> {
    let a = format!("{addr}:{port}");
    let sa: SocketAddr = a
        .parse()
        .map_err(|e| ServeError::Config(format!("bind_addr `{addr}`: {e}")))?;
    TcpListener::bind(sa)
        .await
        .map_err(|source| ServeError::Bind { addr: a, source })
}

/// How the server gets its store.
#[derive(Clone, Debug)]
pub enum Mode {
    /// SQLite files in the data directory; always active.
    Standalone,
    /// A member of a pool: follows the pool state in etcd, PostgreSQL when active.
    Pool(crate::pool_mode::PoolMember),
}

/// Runs the server until SIGTERM or SIGINT.
pub async fn serve(dir: &Path, overrides: &Overrides, mode: Mode) -> Result<(), ServeError> {
    prepare_data_dir(dir)?;
    let config = load_config(dir, overrides)?;
    let store: Option<Arc<dyn Store>> = match &mode {
        Mode::Standalone => Some(Arc::new(open_store(dir, &config, false)?)),
        Mode::Pool(_) => None,
    };
    // The identity is read before any port is bound: a missing or wrong one stops the start.
    let pool_etcd = match &mode {
        Mode::Standalone => None,
        Mode::Pool(m) => Some(
            m.etcd
                .connect(Some(&m.pool))
                .map_err(|e| ServeError::Config(e.to_string()))?,
        ),
    };
    let muc_jid = config.muc_jid();
    let (tls, generated) =
        crate::tls::load_or_generate(dir, &[config.domain.clone(), muc_jid.clone()])?;
    if generated {
        info!(
            "generated a self-signed certificate for {} in {}",
            config.domain,
            dir.join("tls").display()
        );
    }
    let c2s = listen(&config.bind_addr, config.c2s_port).await?;
    let c2s_tls = listen(&config.bind_addr, config.c2s_tls_port).await?;
    let http = listen(&config.bind_addr, config.http_port).await?;
    let router = Arc::new(Router::default());
    let (shutdown, _) = broadcast::channel(1);
    // The external directory: its configuration is checked (CA, password file) before the
    // server starts; its first reading goes on in the background.
    let ldap = if config.directory.enabled() {
        let l = crate::ldap::Ldap::new(&config.directory, &config.domain)
            .map_err(|e| ServeError::Config(e.to_string()))?;
        Some(Arc::new(l))
    } else {
        None
    };
    let directory_feed = ldap.as_ref().map(|l| {
        crate::ldap::follow(
            l.clone(),
            Duration::from_secs(config.directory.refresh_s),
            shutdown.subscribe(),
        )
    });
    let standalone = store.is_some();
    let serving = store.map(|store| {
        let feeds = crate::muc::Feeds {
            external: directory_feed.clone(),
            settings: None,
        };
        Serving::new(&config, store, router.clone(), None, feeds)
    });
    let mut state = State::new(config, router, tls, shutdown);
    state.ldap = ldap;
    state.directory_feed = directory_feed;
    if let Mode::Pool(m) = &mode {
        state.pool_server = Some(m.server.clone());
    }
    let state = Arc::new(state);
    state.set_serving(serving);
    if standalone {
        // The shell's way in for changes the server's own writer must make (room records).
        let listener = crate::admin::bind(dir).map_err(|e| ServeError::DataDir {
            path: dir.to_owned(),
            reason: format!(
                "cannot create its management socket {}: {e}",
                crate::admin::SOCKET
            ),
        })?;
        tokio::spawn(crate::admin::serve(state.clone(), listener));
    }
    // In a pool the job always runs: the pool's settings in etcd may turn it on.
    if state.config.compliance.enabled() || pool_etcd.is_some() {
        let pool = match (&mode, &pool_etcd) {
            (Mode::Pool(m), Some(etcd)) => Some((etcd.clone(), m.pool.clone(), m.server.clone())),
            _ => None,
        };
        tokio::spawn(crate::compliance::job(state.clone(), dir.to_owned(), pool));
    }
    let watched = match (&mode, &pool_etcd) {
        (Mode::Pool(m), Some(etcd)) => Some((etcd.clone(), m.pool.clone())),
        _ => None,
    };
    let mut pool_task = match (mode, pool_etcd) {
        (Mode::Pool(member), Some(etcd)) => Some(tokio::spawn(crate::pool_mode::run(
            state.clone(),
            member,
            etcd,
        ))),
        _ => None,
    };
    tokio::spawn(session::run_pinger(state.clone()));
    if let Ok(addr) = state.config.metrics_addr.parse() {
        // The dashboard's and the metrics' view of the pool, read in the background.
        if let Some((etcd, pool)) = watched {
            tokio::spawn(crate::dashboard::follow(state.clone(), etcd, pool));
        }
        tokio::spawn(crate::metrics::serve(state.clone(), addr));
    }
    tokio::spawn(accept_loop(state.clone(), c2s, Port::C2s));
    tokio::spawn(accept_loop(state.clone(), c2s_tls, Port::C2sTls));
    let http_task = tokio::spawn(http_accept_loop(state.clone(), http));

    let c = &state.config;
    let shown = if c.bind_addr == "0.0.0.0" {
        "127.0.0.1"
    } else {
        c.bind_addr.as_str()
    };
    let ws_scheme = if c.http_tls { "wss" } else { "ws" };
    let web = format!(
        "{}://{}:{}/",
        if c.http_tls { "https" } else { "http" },
        shown,
        c.http_port
    );
    // Not println!: a server whose stdout was closed (`pchat serve | head -1`, a supervisor
    // that stopped reading) goes on serving instead of panicking on EPIPE.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stdout(),
        "ready: pchat {} serving {} (rooms at {}), data in {}\n  c2s {}:{} (STARTTLS), {}:{} (direct TLS), {}://{}:{}/xmpp-websocket\n  web client: {web}\n  add a user:  pchat --data-dir {} user add alice@{} --password-stdin\n  then connect any XMPP client as alice@{} (the certificate is self-signed: accept it once)",
        env!("CARGO_PKG_VERSION"), c.domain, muc_jid, dir.display(),
        shown, c.c2s_port, shown, c.c2s_tls_port, ws_scheme, shown, c.http_port,
        dir.display(), c.domain, c.domain
    );

    // A signal, or the pool loop giving up (it ends early only when it must refuse the pool).
    let mut pool_ended = false;
    let fatal = match pool_task.as_mut() {
        Some(task) => tokio::select! {
            _ = wait_for_signal() => None,
            ended = task => {
                pool_ended = true;
                match ended {
                    Ok(Ok(())) => None,
                    Ok(Err(reason)) => Some(reason),
                    Err(e) => Some(format!("the pool task failed: {e}")),
                }
            }
        },
        None => {
            wait_for_signal().await;
            None
        }
    };
    if pool_ended {
        // A finished task must not be awaited again below.
        pool_task = None;
    }
    info!("shutting down");
    let grace = Duration::from_millis(state.config.limits.shutdown_timeout_ms);
    // Rooms first, so occupants get their status-332 goodbye before the streams close.
    if let Some(serving) = state.serving() {
        let _ = tokio::time::timeout(grace, serving.muc.shutdown()).await;
    }
    let _ = state.shutdown.send(());
    let _ = tokio::time::timeout(grace, async {
        while state.admission.count() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = http_task.await;
    if let Some(t) = pool_task {
        // The pool loop drains and closes the store on shutdown.
        let _ = tokio::time::timeout(grace * 2, t).await;
    }
    match fatal {
        Some(reason) => Err(ServeError::Config(reason)),
        None => Ok(()),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The client ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Port {
    /// STARTTLS (`c2s_port`).
    C2s,
    /// Direct TLS (`c2s_tls_port`).
    C2sTls,
    /// HTTP and WebSocket (`http_port`).
    Http,
}

impl Port {
    /// Does this listener take the client's address from a PROXY protocol header?
    fn expects_proxy_header(self, config: &Config) -> bool {
        let p = &config.proxy_protocol;
        match self {
            Port::C2s => p.c2s,
            Port::C2sTls => p.c2s_tls,
            Port::Http => p.http,
        }
    }
}

/// Idle time between TCP keepalive probes once they started, and how many may go unanswered.
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// Socket options for a client connection: no Nagle delay (a stanza must not wait for its
/// timer), and keepalive probes so a peer that vanished without a word (a laptop closed, a
/// network gone) is noticed by the kernel even while the server has nothing to send.
pub fn tune_client_socket(tcp: &TcpStream, keepalive_idle_s: u64) {
    let _ = tcp.set_nodelay(true);
    if keepalive_idle_s > 0 {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(keepalive_idle_s))
            .with_interval(TCP_KEEPALIVE_INTERVAL)
            .with_retries(TCP_KEEPALIVE_RETRIES);
        if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
            debug!(error = %e, "cannot set TCP keepalive");
        }
    }
}

/// Admits a new connection under its client's address: read from the PROXY protocol header
/// on a listener that expects one (and only from a trusted proxy: anyone else is refused), or
/// the TCP peer. `None` when refused; the connection is then dropped.
async fn admit(
    state: &State,
    tcp: &mut TcpStream,
    peer: SocketAddr,
    port: Port,
    mut guard: ConnGuard,
) -> Option<(ConnGuard, SocketAddr)> {
    let client = if port.expects_proxy_header(&state.config) {
        if !state.trusted_proxies.contains(peer.ip()) {
            debug!(%peer, ?port, "refused: a PROXY protocol listener takes only trusted proxies");
            return None;
        }
        let timeout = Duration::from_millis(state.config.proxy_protocol.header_timeout_ms);
        match tokio::time::timeout(timeout, proxy_protocol::read_header(tcp, peer)).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                debug!(%peer, ?port, error = %e, "refused: no valid PROXY header");
                return None;
            }
            Err(_) => {
                debug!(%peer, ?port, "refused: no PROXY header in time");
                return None;
            }
        }
    } else {
        peer
    };
    if let Err(e) = guard.claim_address(client.ip()) {
        debug!(%client, ?port, "refused: {e}");
        return None;
    }
    Some((guard, client))
}

async fn accept_loop(state: Arc<State>, listener: TcpListener, port: Port) {
    let mut shutdown = state.shutdown.subscribe();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.recv() => return,
        };
        // Counted before anything else is spent on it: a flood of connections is bounded by
        // `sessions_max` before a task, a handshake or a header read exists for it.
        let Ok(guard) = state.admission.connection() else {
            drop(tcp);
            continue;
        };
        tune_client_socket(&tcp, state.config.limits.tcp_keepalive_idle_s);
        let state = state.clone();
        tokio::spawn(async move {
            let mut tcp = tcp;
            let Some((guard, client)) = admit(&state, &mut tcp, peer, port, guard).await else {
                return;
            };
            let Some(t) = open_transport(&state, tcp, port == Port::C2sTls).await else {
                return;
            };
            // The session gets a task of its own, holding nothing but the session's future
            // (and the guard): in this one, the socket, the address and the transport that
            // were moved out would keep their space beside it for the connection's whole life
            // (an async block does not reuse what it captured), ~200 bytes per client.
            let run = session::run(state, t, client.ip());
            tokio::spawn(futures_util::FutureExt::map(run, move |()| drop(guard)));
        });
    }
}

async fn open_transport(state: &State, tcp: TcpStream, direct_tls: bool) -> Option<Transport> {
    let limits = state.framer_limits();
    if !direct_tls {
        return Some(Transport::stream(ByteStream::Plain(tcp), limits));
    }
    // Boxed: the accept task would otherwise reserve the handshake's state (the rustls
    // connection, its buffers) inline for the whole life of the session that follows.
    let handshake = tokio::time::timeout(
        Duration::from_secs(state.config.limits.auth_timeout_s),
        Box::pin(crate::lean_tls::accept(tcp, state.tls.clone())),
    );
    match handshake.await {
        Ok(Ok(tls)) => Some(Transport::stream(ByteStream::Tls(Box::new(tls)), limits)),
        _ => None,
    }
}

/// Read buffer per WebSocket connection (tungstenite's default is 128 KiB).
const WS_READ_BUFFER_BYTES: usize = 4 * 1024;
/// Output queued before tungstenite writes to the socket; a batch is flushed at its end anyway.
const WS_WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// Accepts connections on the HTTP port and serves each in a task of its own: `/health` and
/// the upgrade to `/xmpp-websocket`, over TLS with the client ports' certificate (`wss://`,
/// `https://`) or plain with `http_tls = false`. Every connection counts against the same
/// limits as the other client ports (`sessions_max`, `connections_per_address_max`) from
/// accept to close — while its TLS handshake runs, while it sends headers, and for the life
/// of its WebSocket — so an open HTTP connection cannot escape them. The handshake is bounded
/// by `auth_timeout_s`, each request's headers (and an idle keep-alive) by
/// `http_header_read_timeout_ms`. Ends on shutdown.
async fn http_accept_loop(state: Arc<State>, listener: TcpListener) {
    let tls = state
        .config
        .http_tls
        .then(|| crate::tls::for_http(&state.tls));
    let app = axum::Router::new()
        .route("/xmpp-websocket", get(ws_handler))
        .route("/health", get(|| async { "ok\n" }))
        .merge(crate::web::routes(state.clone()))
        .merge(crate::rooms_web::routes())
        .merge(if state.config.upload.enabled {
            crate::upload::routes()
        } else {
            axum::Router::new()
        })
        .with_state(state.clone());
    let mut shutdown = state.shutdown.subscribe();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed on the HTTP port");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.recv() => return,
        };
        let Ok(guard) = state.admission.connection() else {
            drop(tcp);
            continue;
        };
        tune_client_socket(&tcp, state.config.limits.tcp_keepalive_idle_s);
        let (state, tls, app) = (state.clone(), tls.clone(), app.clone());
        tokio::spawn(async move {
            let mut tcp = tcp;
            let Some((guard, client)) = admit(&state, &mut tcp, peer, Port::Http, guard).await
            else {
                return;
            };
            let stream = match tls {
                None => HttpStream::Plain(tcp),
                Some(config) => {
                    let timeout = Duration::from_secs(state.config.limits.auth_timeout_s);
                    let handshake = Box::pin(crate::lean_tls::accept(tcp, config));
                    match tokio::time::timeout(timeout, handshake).await {
                        Ok(Ok(tls)) => HttpStream::Tls(Box::new(crate::lean_tls::LeanIo::new(tls))),
                        Ok(Err(e)) => {
                            debug!(%client, error = %e, "TLS handshake failed on the HTTP port");
                            return;
                        }
                        Err(_) => {
                            debug!(%client, "TLS handshake timed out on the HTTP port");
                            return;
                        }
                    }
                }
            };
            let io = HttpIo {
                stream,
                stall: Arc::new(StallClock::new()),
                _guard: guard,
            };
            serve_http_connection(&state, app, io, client).await;
        });
    }
}

/// Serves HTTP/1.1 on one connection until it closes or is upgraded to a WebSocket (which
/// then lives on in the task `ws_handler` gives it, with the connection's guard inside).
async fn serve_http_connection(state: &State, app: axum::Router, io: HttpIo, client: SocketAddr) {
    let stall = io.stall.clone();
    let service = hyper::service::service_fn(
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            // What `ConnectInfo` extracts: the client's address (from the PROXY header if any).
            req.extensions_mut().insert(ConnectInfo(client));
            let mut app = app.clone();
            async move { tower_service::Service::call(&mut app, req.map(axum::body::Body::new)).await }
        },
    );
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(
            state.config.limits.http_header_read_timeout_ms,
        ));
    let conn = http
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut shutdown = state.shutdown.subscribe();
    // A client that stops reading a response (a download) is dropped, not waited for: its
    // writes have been pending for the upload idle timeout.
    let stall_max = Duration::from_millis(state.config.upload.idle_timeout_ms);
    let watchdog = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if stall.stalled_for().is_some_and(|d| d > stall_max) {
                return;
            }
        }
    };
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = watchdog => {
            debug!(%client, "HTTP client stopped reading; connection dropped");
            return;
        }
        _ = shutdown.recv() => {
            // Finish the request in progress, take no other: an idle keep-alive connection
            // must not hold up the shutdown until its header timeout.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%client, error = %e, "HTTP connection ended");
    }
}

/// A connection on the HTTP port, counted for as long as it lives.
struct HttpIo {
    stream: HttpStream,
    /// Since when its writes wait for the peer to read.
    stall: Arc<StallClock>,
    _guard: ConnGuard,
}

/// Since when a connection's writes have been waiting for its peer (milliseconds after
/// `start`, plus one; 0: not waiting).
struct StallClock {
    start: std::time::Instant,
    since: std::sync::atomic::AtomicU64,
}

impl StallClock {
    fn new() -> StallClock {
        StallClock {
            start: std::time::Instant::now(),
            since: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// Records the outcome of a write: pending starts the clock (if not running), progress
    /// stops it.
    fn note<T>(&self, poll: Poll<T>) -> Poll<T> {
        use std::sync::atomic::Ordering::Relaxed;
        if poll.is_pending() {
            let _ = self.since.compare_exchange(0, self.now(), Relaxed, Relaxed);
        } else {
            self.since.store(0, Relaxed);
        }
        poll
    }

    /// How long writes have been waiting, if they are.
    fn stalled_for(&self) -> Option<Duration> {
        let since = self.since.load(std::sync::atomic::Ordering::Relaxed);
        (since != 0).then(|| Duration::from_millis(self.now().saturating_sub(since)))
    }
}

/// The bytes of an HTTP connection.
enum HttpStream {
    /// `http_tls = false`: behind a proxy that terminates TLS.
    Plain(TcpStream),
    /// The default: TLS with buffers we own, as on the client ports.
    Tls(Box<crate::lean_tls::LeanIo>),
}

impl AsyncRead for HttpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().stream {
            HttpStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            HttpStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HttpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = match &mut this.stream {
            HttpStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            HttpStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        this.stall.note(poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = match &mut this.stream {
            HttpStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            // tokio's default: the first non-empty buffer, encrypted whole.
            HttpStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        this.stall.note(poll)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            HttpStream::Plain(s) => s.is_write_vectored(),
            HttpStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = match &mut this.stream {
            HttpStream::Plain(s) => Pin::new(s).poll_flush(cx),
            HttpStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        };
        this.stall.note(poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().stream {
            HttpStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            HttpStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

async fn ws_handler(
    ws: WebSocketUpgrade,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    AxState(state): AxState<Arc<State>>,
) -> axum::response::Response {
    let max = state.config.limits.stanza_bytes_max;
    // Over wss:// the hop is encrypted, so the session may offer PLAIN as over TLS on TCP.
    let secure = state.config.http_tls;
    // tungstenite's defaults (128 KiB read buffer, 128 KiB write threshold) suit a few
    // bulk-transfer sockets, not thousands of chat clients that are mostly idle: they made a
    // WebSocket session cost several times a TLS one. XMPP frames are small; a frame larger
    // than the read buffer just takes more reads. One stanza per message (RFC 7395), so
    // frames and messages are bounded by the stanza limit, and tungstenite refuses a larger
    // one when its header announces it, before buffering any of it (its default would buffer
    // 16 MiB first).
    ws.protocols(["xmpp"])
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_frame_size(max)
        .max_message_size(max)
        .on_upgrade(move |socket| async move {
            let ip: IpAddr = client.ip();
            session::run(
                state,
                Transport::Ws {
                    ws: Box::new(socket),
                    stanza_bytes_max: max,
                    secure,
                },
                ip,
            )
            .await;
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Client sockets get keepalive with the configured idle time, so a vanished peer is
    /// found by the kernel: `tcp_keepalive_idle_s`, then a probe every 10 s, 3 unanswered.
    #[tokio::test]
    async fn client_sockets_have_tcp_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        tune_client_socket(&server_side, 45);
        let sock = socket2::SockRef::from(&server_side);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(45));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            TCP_KEEPALIVE_INTERVAL
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), TCP_KEEPALIVE_RETRIES);
        assert!(server_side.nodelay().unwrap());

        let _client = TcpStream::connect(addr).await.unwrap();
        let (off, _) = listener.accept().await.unwrap();
        tune_client_socket(&off, 0);
        assert!(!socket2::SockRef::from(&off).keepalive().unwrap());
    }
}
