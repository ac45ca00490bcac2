//! The API's listener: HTTPS with mutual TLS 1.3 for a pool with certificates, plain HTTP for
//! an insecure one, and the bounds that keep a caller — even one holding a certificate —
//! from tying the agent up.
//!
//! With TLS, a connection is served only after its handshake proved a client certificate
//! from the pool's CA ([`pchat_tls::ClientAuth::Required`]); the certificate's names become the
//! [`Caller`] of every request on it, which the API's middleware authorizes. Bounds: at most
//! [`CONNECTIONS_MAX`] connections at once (more are closed at accept), the handshake within
//! [`TLS_HANDSHAKE_TIMEOUT_MS`], each request's headers — and an idle keep-alive — within
//! [`HEADER_READ_TIMEOUT_MS`]; the body's size and the request's time are bounded by the
//! router (`server.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::access::Caller;

/// Connections served at once: the shell and a failing-over peer need a handful.
pub const CONNECTIONS_MAX: usize = 64;
/// Bound on the TLS handshake of one connection.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Bound on reading a request's headers, and on a keep-alive connection's idleness.
pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// How long a stopping agent waits for the requests in progress.
const SHUTDOWN_WAIT_MS: u64 = 5_000;

/// How connections are taken.
#[derive(Clone)]
pub(crate) enum Transport {
    /// Plain HTTP: an insecure pool; requests carry its token.
    Plain,
    /// HTTPS with the instance's identity; clients must present a pool certificate.
    Tls {
        acceptor: TlsAcceptor,
        pool: String,
        instance: String,
    },
}

/// The remote address of a request's connection (for the log).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Remote(pub SocketAddr);

/// Serves `app` on `listener` until `stop` turns true.
pub(crate) async fn run(
    listener: TcpListener,
    transport: Transport,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut conns = JoinSet::new();
    let mut told_full = false;
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed on the agent's API");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            true = stopped(&mut stop) => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !told_full {
                warn!(%remote, "{CONNECTIONS_MAX} connections are open: refusing more until some close");
                told_full = true;
            }
            continue;
        };
        told_full = false;
        let (transport, app, stop) = (transport.clone(), app.clone(), stop.clone());
        conns.spawn(async move {
            let _slot = slot;
            match transport {
                Transport::Plain => serve(tcp, None, app, remote, stop).await,
                Transport::Tls {
                    acceptor,
                    pool,
                    instance,
                } => {
                    let handshake = tokio::time::timeout(
                        Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS),
                        acceptor.accept(tcp),
                    );
                    let tls = match handshake.await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            info!(%remote, error = %e, "refused a connection: no valid certificate of the pool");
                            return;
                        }
                        Err(_) => {
                            info!(%remote, "refused a connection: TLS handshake timed out");
                            return;
                        }
                    };
                    let names = pchat_tls::identity::peer_names(tls.get_ref().1.peer_certificates());
                    let caller = Caller::from_cert_names(&pool, &instance, &names);
                    debug!(%remote, %caller, "connection");
                    serve(tls, Some(caller), app, remote, stop).await
                }
            }
        });
    }
    // Finish what is in progress (each connection takes no new request), bounded.
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_millis(SHUTDOWN_WAIT_MS), drain)
        .await
        .is_err()
    {
        conns.abort_all();
    }
}

/// Serves HTTP/1.1 on one connection until it closes or the agent stops.
async fn serve<I>(
    io: I,
    caller: Option<Caller>,
    app: axum::Router,
    remote: SocketAddr,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            // Set here, by the transport, and nowhere else: a request cannot name its caller.
            if let Some(c) = &caller {
                req.extensions_mut().insert(c.clone());
            }
            req.extensions_mut().insert(Remote(remote));
            let mut app = app.clone();
            async move { tower_service::Service::call(&mut app, req.map(axum::body::Body::new)).await }
        },
    );
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS));
    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        true = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%remote, error = %e, "agent API connection ended");
    }
}

/// Waits until the agent stops (or its handle is gone). The watch's guard is dropped here,
/// not held on into a `select!` branch (it is not `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) -> bool {
    let _ = stop.wait_for(|v| *v).await;
    true
}
