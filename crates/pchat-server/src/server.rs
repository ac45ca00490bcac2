//! Start-up and shutdown: data directory, configuration, store, TLS, the three listeners
//! (STARTTLS c2s, direct-TLS c2s, HTTP with WebSocket — over TLS unless `http_tls = false`),
//! and a clean stop on SIGTERM/SIGINT.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, State as AxState, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use pchat_store::Store;
use pchat_store_sqlite::{SqliteOptions, SqliteStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, info, warn};

use crate::auth::AuthLimiter;
use crate::config::Config;
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
}

/// Makes sure `dir` exists and is writable, with a message that says how to fix it if not.
pub fn prepare_data_dir(dir: &Path) -> Result<(), ServeError> {
    let err = |reason: String| ServeError::DataDir {
        path: dir.to_owned(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| {
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
    let mut config = Config::load_or_create(&dir.join("pchat.toml"))
        .map_err(|e| ServeError::Config(e.to_string()))?;
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
    config.validate().map_err(ServeError::Config)?;
    Ok(config)
}

/// Opens the SQLite store in `dir` with the configured tuning. `shared` opens it beside a
/// running server, for the management shell.
pub fn open_store(dir: &Path, config: &Config, shared: bool) -> Result<SqliteStore, ServeError> {
    let opts = SqliteOptions {
        shared,
        group_commit_max_writes: config.store.group_commit_max_writes,
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
    let limiter = AuthLimiter::new(
        config.limits.auth_failures_max,
        Duration::from_secs(config.limits.auth_failure_window_s),
    );
    let serving = store.map(|store| Serving::new(&config, store, router.clone(), None));
    let state = Arc::new(State::new(config, router, tls, limiter, shutdown));
    state.set_serving(serving);
    let mut pool_task = match (mode, pool_etcd) {
        (Mode::Pool(member), Some(etcd)) => Some(tokio::spawn(crate::pool_mode::run(
            state.clone(),
            member,
            etcd,
        ))),
        _ => None,
    };
    let conns = Arc::new(AtomicUsize::new(0));

    tokio::spawn(accept_loop(state.clone(), c2s, false, conns.clone()));
    tokio::spawn(accept_loop(state.clone(), c2s_tls, true, conns.clone()));
    let http_task = tokio::spawn(serve_http(
        state.clone(),
        http,
        conns.clone(),
        state.shutdown.subscribe(),
    ));

    let c = &state.config;
    let shown = if c.bind_addr == "0.0.0.0" {
        "127.0.0.1"
    } else {
        c.bind_addr.as_str()
    };
    let ws_scheme = if c.http_tls { "wss" } else { "ws" };
    println!(
        "ready: pchat {} serving {} (rooms at {}), data in {}\n  c2s {}:{} (STARTTLS), {}:{} (direct TLS), {}://{}:{}/xmpp-websocket\n  add a user:  pchat --data-dir {} user add alice@{} --password-stdin\n  then connect any XMPP client as alice@{} (the certificate is self-signed: accept it once)",
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
        while conns.load(Ordering::Relaxed) > 0 {
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

/// Counts a connection for as long as it lives.
struct ConnGuard(Arc<AtomicUsize>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn admit(state: &State, conns: &Arc<AtomicUsize>) -> Option<ConnGuard> {
    let n = conns.fetch_add(1, Ordering::Relaxed);
    let guard = ConnGuard(conns.clone());
    (n < state.config.limits.sessions_max).then_some(guard)
}

async fn accept_loop(
    state: Arc<State>,
    listener: TcpListener,
    direct_tls: bool,
    conns: Arc<AtomicUsize>,
) {
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
        let Some(guard) = admit(&state, &conns) else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let Some(t) = open_transport(&state, tcp, direct_tls).await else {
                return;
            };
            // The session gets a task of its own, holding nothing but the session's future
            // (and the guard): in this one, the socket, the address and the transport that
            // were moved out would keep their space beside it for the connection's whole life
            // (an async block does not reuse what it captured), ~200 bytes per client.
            let run = session::run(state, t, peer.ip());
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

type HttpState = (Arc<State>, Arc<AtomicUsize>);

/// Connections finished with their TLS handshake and not yet taken by the HTTP server. It
/// takes them as fast as it can spawn a task, so this only smooths bursts; a handshake task
/// that finds it full waits (bounded by the handshake count, see [`http_accept_loop`]).
const HTTP_READY_CONNECTIONS_MAX: usize = 64;

/// Serves `/xmpp-websocket` and `/health` on `listener` until `shutdown` fires: over TLS with
/// the client ports' certificate (`wss://`, `https://`), or plain with `http_tls = false`.
async fn serve_http(
    state: Arc<State>,
    listener: TcpListener,
    conns: Arc<AtomicUsize>,
    mut shutdown: broadcast::Receiver<()>,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "the HTTP listener has no local address; not serving HTTP");
            return;
        }
    };
    let tls = state
        .config
        .http_tls
        .then(|| crate::tls::for_http(&state.tls));
    let (ready, taken) = mpsc::channel(HTTP_READY_CONNECTIONS_MAX);
    tokio::spawn(http_accept_loop(
        state.clone(),
        listener,
        tls,
        conns.clone(),
        ready,
    ));
    let app = axum::Router::new()
        .route("/xmpp-websocket", get(ws_handler))
        .route("/health", get(|| async { "ok\n" }))
        .with_state((state, conns));
    let _ = axum::serve(
        HttpListener { taken, local },
        app.into_make_service_with_connect_info::<HttpPeer>(),
    )
    .with_graceful_shutdown(async move {
        let _ = shutdown.recv().await;
    })
    .await;
}

/// Accepts TCP connections on the HTTP port and hands them to the HTTP server through
/// `ready`: at once when plain, after a TLS handshake otherwise. Each handshake runs in its own
/// task, bounded by `limits.auth_timeout_s` and counted as a connection against
/// `limits.sessions_max` (as on the direct-TLS port), so a slow or silent client delays no
/// one else and a flood of them is bounded. Ends when the HTTP server stops taking
/// connections (shutdown).
async fn http_accept_loop(
    state: Arc<State>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    conns: Arc<AtomicUsize>,
    ready: mpsc::Sender<(HttpIo, SocketAddr)>,
) {
    let handshake_timeout = Duration::from_secs(state.config.limits.auth_timeout_s);
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
            _ = ready.closed() => return,
        };
        // As on the TCP ports: a WebSocket frame must not wait for Nagle's timer.
        let _ = tcp.set_nodelay(true);
        let Some(config) = &tls else {
            if ready.send((HttpIo::Plain(tcp), peer)).await.is_err() {
                return;
            }
            continue;
        };
        let Some(guard) = admit(&state, &conns) else {
            drop(tcp);
            continue;
        };
        let config = config.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let handshake =
                tokio::time::timeout(handshake_timeout, crate::lean_tls::accept(tcp, config));
            let io = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(tls)) => HttpIo::Tls(Box::new(crate::lean_tls::LeanIo::new(tls))),
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed on the HTTP port");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out on the HTTP port");
                        return;
                    }
                },
                _ = ready.closed() => return,
            };
            let _ = ready.send((io, peer)).await;
        });
    }
}

/// A connection on the HTTP port.
enum HttpIo {
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
        match self.get_mut() {
            HttpIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            HttpIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HttpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            HttpIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            HttpIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            HttpIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            // tokio's default: the first non-empty buffer, encrypted whole.
            HttpIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            HttpIo::Plain(s) => s.is_write_vectored(),
            HttpIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HttpIo::Plain(s) => Pin::new(s).poll_flush(cx),
            HttpIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            HttpIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            HttpIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The HTTP server's view of the port: connections ready for HTTP, handshakes done.
struct HttpListener {
    taken: mpsc::Receiver<(HttpIo, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for HttpListener {
    type Io = HttpIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (HttpIo, SocketAddr) {
        match self.taken.recv().await {
            Some(c) => c,
            // The accept loop only ends once the server stopped taking connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The client's address, for handlers (axum only derives `SocketAddr` for its own listeners).
#[derive(Clone, Copy, Debug)]
struct HttpPeer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, HttpListener>>
    for HttpPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, HttpListener>) -> Self {
        HttpPeer(*stream.remote_addr())
    }
}

async fn ws_handler(
    ws: WebSocketUpgrade,
    ConnectInfo(HttpPeer(peer)): ConnectInfo<HttpPeer>,
    AxState((state, conns)): AxState<HttpState>,
) -> axum::response::Response {
    let Some(guard) = admit(&state, &conns) else {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too many connections\n",
        )
            .into_response();
    };
    let max = state.config.limits.stanza_bytes_max;
    // Over wss:// the hop is encrypted, so the session may offer PLAIN as over TLS on TCP.
    let secure = state.config.http_tls;
    // tungstenite's defaults (128 KiB read buffer, 128 KiB write threshold) suit a few
    // bulk-transfer sockets, not thousands of chat clients that are mostly idle: they made a
    // WebSocket session cost several times a TLS one. XMPP frames are small; a frame larger
    // than the read buffer just takes more reads.
    ws.protocols(["xmpp"])
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_message_size(max + 1024)
        .on_upgrade(move |socket| async move {
            let _guard = guard;
            let ip: IpAddr = peer.ip();
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
