//! Free loopback ports for the servers the tests start (pchat, PostgreSQL, etcd, slapd).
//!
//! They come from below the kernel's ephemeral range when there is room there: a port the
//! kernel hands out (`bind` to port 0, and every outgoing connection's local port) can be in
//! use by some other test's connection just when a stopped server starts again on its old
//! port — seen in CI as `Address already in use` when a drill restarted a server. Two tests
//! picking the same port stays possible; each starter retries on a bind error.

use std::net::TcpListener;

/// The lowest port the kernel hands out on its own (`ip_local_port_range`).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A listener on a free loopback port: below the ephemeral range if it leaves room (10,000
/// ports above 1024), else one the kernel picks. Drop it to free the port for the server.
pub(crate) fn loopback_listener() -> std::io::Result<TcpListener> {
    let high = ephemeral_low();
    if high > 11_024 {
        let low = high - 10_000;
        for _ in 0..200 {
            let port = rand::Rng::gen_range(&mut rand::thread_rng(), low..high);
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                return Ok(l);
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
}

/// A free loopback port (see the module docs).
pub fn free_port() -> std::io::Result<u16> {
    Ok(loopback_listener()?.local_addr()?.port())
}
