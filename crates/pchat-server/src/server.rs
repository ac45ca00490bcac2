//! Start-up and shutdown: data directory, configuration, store, TLS, the three listeners
//! (STARTTLS c2s, direct-TLS c2s, HTTP with WebSocket), and a clean stop on SIGTERM/SIGINT.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State as AxState, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use pchat_store::Store;
use pchat_store_sqlite::{SqliteOptions, SqliteStore};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tracing::{info, warn};

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
    let pool_task = match mode {
        Mode::Standalone => None,
        Mode::Pool(member) => Some(tokio::spawn(crate::pool_mode::run(state.clone(), member))),
    };
    let conns = Arc::new(AtomicUsize::new(0));

    tokio::spawn(accept_loop(state.clone(), c2s, false, conns.clone()));
    tokio::spawn(accept_loop(state.clone(), c2s_tls, true, conns.clone()));
    let app = axum::Router::new()
        .route("/xmpp-websocket", get(ws_handler))
        .route("/health", get(|| async { "ok\n" }))
        .with_state((state.clone(), conns.clone()));
    let mut http_shutdown = state.shutdown.subscribe();
    let http_task = tokio::spawn(async move {
        use axum::serve::ListenerExt as _;
        // As on the TCP ports: a WebSocket frame must not wait for Nagle's timer.
        let http = http.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let _ = axum::serve(
            http,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = http_shutdown.recv().await;
        })
        .await;
    });

    let c = &state.config;
    let shown = if c.bind_addr == "0.0.0.0" {
        "127.0.0.1"
    } else {
        c.bind_addr.as_str()
    };
    println!(
        "ready: pchat {} serving {} (rooms at {}), data in {}\n  c2s {}:{} (STARTTLS), {}:{} (direct TLS), ws://{}:{}/xmpp-websocket\n  add a user:  pchat --data-dir {} user add alice@{} --password-stdin\n  then connect any XMPP client as alice@{} (the certificate is self-signed: accept it once)",
        env!("CARGO_PKG_VERSION"), c.domain, muc_jid, dir.display(),
        shown, c.c2s_port, shown, c.c2s_tls_port, shown, c.http_port,
        dir.display(), c.domain, c.domain
    );

    wait_for_signal().await;
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
    Ok(())
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
            let _guard = guard;
            if let Some(t) = open_transport(&state, tcp, direct_tls).await {
                session::run(state, t, peer.ip()).await;
            }
        });
    }
}

async fn open_transport(state: &State, tcp: TcpStream, direct_tls: bool) -> Option<Transport> {
    let limits = state.framer_limits();
    if !direct_tls {
        return Some(Transport::stream(ByteStream::Plain(tcp), limits));
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(state.tls.clone());
    let handshake = tokio::time::timeout(
        Duration::from_secs(state.config.limits.auth_timeout_s),
        acceptor.accept(tcp),
    );
    match handshake.await {
        Ok(Ok(tls)) => Some(Transport::stream(ByteStream::Tls(Box::new(tls)), limits)),
        _ => None,
    }
}

type HttpState = (Arc<State>, Arc<AtomicUsize>);

async fn ws_handler(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
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
    ws.protocols(["xmpp"])
        .max_message_size(max + 1024)
        .on_upgrade(move |socket| async move {
            let _guard = guard;
            let ip: IpAddr = peer.ip();
            session::run(
                state,
                Transport::Ws {
                    ws: Box::new(socket),
                    stanza_bytes_max: max,
                },
                ip,
            )
            .await;
        })
}
