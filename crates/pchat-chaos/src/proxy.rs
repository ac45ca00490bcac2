//! A delaying TCP proxy: the stand-in for `tc netem`'s delay, which this kernel lacks
//! (`sch_netem` is not built: "Specified qdisc kind is unknown").
//!
//! The lab sends one host's new connections to one port of another host through it (an
//! nftables `dnat` in the connecting host's namespace, and its established connections to
//! that port aborted with `ss -K` so they reconnect through the proxy); every chunk read on
//! either side is written to the other only after `delay` plus up to `jitter`, in order.
//! What it cannot do is said in docs/operations/fault-tolerance.md: it delays bytes, not
//! packets — TCP's own retransmission, reordering and congestion behaviour below it stay
//! those of a clean link. [`crate::netem`] does packets.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::rng::Rng;

/// Chunks in flight per direction before the reader waits: bounds the proxy's memory.
const CHUNKS_IN_FLIGHT_MAX: usize = 256;
/// Bytes per read.
const CHUNK_BYTES: usize = 16 * 1024;

/// A running proxy; dropping it (or [`DelayProxy::stop`]) closes every connection.
pub struct DelayProxy {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on `listen` (port 0: any) and forwards to `target`.
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        delay: Duration,
        jitter: Duration,
        seed: u64,
    ) -> std::io::Result<DelayProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut rng = Rng::new(seed);
            let mut stopped_accept = stopped.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped_accept.changed() => return,
                };
                let Ok((inbound, _)) = accepted else {
                    continue;
                };
                let seed = rng.next_u64();
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let up = pump(ri, wo, delay, jitter, seed);
                    let down = pump(ro, wi, delay, jitter, seed ^ 0x5555);
                    let mut stopped = stopped;
                    tokio::select! {
                        _ = async { tokio::join!(up, down) } => {}
                        _ = stopped.changed() => {}
                    }
                });
            }
        });
        Ok(DelayProxy { addr, stop, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listener and every connection through it.
    pub fn stop(self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

/// Copies `from` to `to`, each chunk held until its time; in order, bounded in chunks.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    jitter: Duration,
    seed: u64,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT_MAX);
    let reader = async move {
        let mut rng = Rng::new(seed);
        let mut last = Instant::now();
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let extra = Duration::from_micros(rng.range(0, jitter.as_micros() as u64));
            // Never before the chunk ahead of it: a byte stream stays in order.
            let at = (Instant::now() + delay + extra).max(last);
            last = at;
            if tx.send((at, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_arrive_in_order_and_late() {
        let echo = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let target = echo.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            if let Ok((mut s, _)) = echo.accept().await {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let delay = Duration::from_millis(150);
        let p = DelayProxy::start(
            "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
            target,
            delay,
            Duration::from_millis(20),
            7,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let mut c = TcpStream::connect(p.addr())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        let mut want = Vec::new();
        for i in 0..50u8 {
            c.write_all(&[i]).await.unwrap_or_else(|e| panic!("{e}"));
            want.push(i);
        }
        let mut got = vec![0u8; 50];
        c.read_exact(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, want);
        // There and back: twice the delay at least.
        assert!(t.elapsed() >= delay * 2, "{:?}", t.elapsed());
        p.stop();
    }
}
