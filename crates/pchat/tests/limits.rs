//! Fair share and the HTTP port (issue 11 §4), against the real binary: one connection limit
//! for every client port, a share per client address and per account, a login throttle that
//! slows the guesser without locking the account, WebSocket frames bounded by the stanza
//! limit, an HTTP header read timeout, and client addresses from PROXY protocol v2 headers.
//!
//! Raw sockets are used where the point is what the server does before or instead of XMPP;
//! a small relay stands in for a TCP proxy (and gives connections other loopback source
//! addresses, 127.0.0.x, so the server sees several clients).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pchat_testkit::{Client, ConnectOptions, Error, ServerOptions, TestServer, Transport};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

type R = anyhow::Result<()>;

const T: Duration = Duration::from_secs(10);
/// Time for the server to take in connections the test just made.
const SETTLE: Duration = Duration::from_millis(300);

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

async fn start_with(toml: &str) -> anyhow::Result<(TestServer, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("pchat.toml"), toml)?;
    let opts = ServerOptions {
        data_dir: Some(dir.path().to_owned()),
        ..ServerOptions::default()
    };
    let s = TestServer::start(&bin(), opts).await?;
    for u in ["alice", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    Ok((s, dir))
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    Ok(socket.connect(to).await?)
}

/// What the server did with a connection.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// It answered in its protocol.
    Served,
    /// It closed the connection without a word.
    Refused,
}

/// Reads until `served` is seen (served) or the connection ends with nothing read (refused).
async fn outcome<S: AsyncRead + Unpin>(io: &mut S, served: &str) -> anyhow::Result<Probe> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, io.read(&mut buf)).await {
            Err(_) => anyhow::bail!(
                "neither served nor refused in {T:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => {
                anyhow::ensure!(
                    got.is_empty(),
                    "closed after answering: {:?}",
                    String::from_utf8_lossy(&got)
                );
                return Ok(Probe::Refused);
            }
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&got).contains(served) {
                    return Ok(Probe::Served);
                }
            }
        }
    }
}

const STREAM_HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

/// Opens an XMPP stream on the STARTTLS port; the connection stays open when served.
async fn xmpp_probe(tcp: &mut TcpStream) -> anyhow::Result<Probe> {
    // A refused connection may already be closed: the write can fail, the read tells.
    let _ = tcp.write_all(STREAM_HEADER.as_bytes()).await;
    outcome(tcp, "<stream:features").await
}

/// `GET /health` on a plain HTTP port.
async fn http_probe<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> anyhow::Result<Probe> {
    let _ = io
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    outcome(io, "\r\n\r\nok\n").await
}

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// `sessions_max` counts the connections of every port together, HTTP ones included from
/// accept to close: idle HTTP connections (plain, or after their TLS handshake) used to be
/// counted only once they became WebSockets, so a client could hold any number of them.
#[tokio::test]
async fn one_connection_limit_for_every_port() -> R {
    // Plain HTTP (behind a TLS-terminating proxy): two idle HTTP connections, one idle c2s
    // connection and one direct-TLS connection fill a limit of four.
    let (s, _dir) = start_with("http_tls = false\n[limits]\nsessions_max = 4\n").await?;
    let p = s.ports();
    let http = SocketAddr::from(([127, 0, 0, 1], p.http));
    let mut idle_http = vec![
        TcpStream::connect(http).await?,
        TcpStream::connect(http).await?,
    ];
    let mut c2s = TcpStream::connect(s.c2s_addr()).await?;
    assert_eq!(xmpp_probe(&mut c2s).await?, Probe::Served);
    let _tls = TcpStream::connect(s.tls_addr()).await?;
    tokio::time::sleep(SETTLE).await;
    let mut fifth = TcpStream::connect(s.c2s_addr()).await?;
    assert_eq!(
        xmpp_probe(&mut fifth).await?,
        Probe::Refused,
        "c2s over the limit"
    );
    let mut fifth = TcpStream::connect(http).await?;
    assert_eq!(
        http_probe(&mut fifth).await?,
        Probe::Refused,
        "HTTP over the limit"
    );
    // An idle HTTP connection that closes gives its place back.
    idle_http.pop();
    tokio::time::sleep(SETTLE).await;
    let mut again = TcpStream::connect(s.c2s_addr()).await?;
    assert_eq!(xmpp_probe(&mut again).await?, Probe::Served);
    drop(again);
    // The remaining idle one is still served when it speaks.
    tokio::time::sleep(SETTLE).await;
    assert_eq!(http_probe(&mut idle_http[0]).await?, Probe::Served);
    drop(s);

    // HTTPS: connections that finished their TLS handshake and sent nothing count.
    let (s, _dir) = start_with("[limits]\nsessions_max = 2\n").await?;
    let https = SocketAddr::from(([127, 0, 0, 1], s.ports().http));
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(pchat_testkit::tls_connect(https, "localhost", Some(b"http/1.1")).await?);
    }
    tokio::time::sleep(SETTLE).await;
    let mut over = TcpStream::connect(s.c2s_addr()).await?;
    assert_eq!(xmpp_probe(&mut over).await?, Probe::Refused);
    // Yet they are served when they speak.
    assert_eq!(http_probe(&mut held[0]).await?, Probe::Served);
    Ok(())
}

/// The handshake and upgrade request of a plain `ws://` XMPP connection; returns the socket
/// after the `101` response.
async fn ws_upgrade(port: u16) -> anyhow::Result<TcpStream> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.write_all(
        b"GET /xmpp-websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: xmpp\r\n\r\n",
    )
    .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(T, tcp.read_exact(&mut b)).await??;
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    anyhow::ensure!(head.starts_with("HTTP/1.1 101 "), "{head}");
    Ok(tcp)
}

/// A client frame header (RFC 6455 §5.2): text, final, masked, 64-bit payload length.
fn text_frame_header(len: u64, mask: [u8; 4]) -> Vec<u8> {
    let mut h = vec![0x81, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&mask);
    h
}

/// A WebSocket frame is bounded by the stanza limit as soon as its header announces its
/// size: the server refuses it (policy-violation) and closes without reading, let alone
/// buffering, the payload. (tungstenite's default bound was 16 MiB, read in full first.)
#[tokio::test]
async fn websocket_frames_are_bounded_by_the_stanza_limit() -> R {
    let (s, _dir) = start_with("http_tls = false\n[limits]\nstanza_bytes_max = 65536\n").await?;
    let mut ws = ws_upgrade(s.ports().http).await?;
    // Announce 4 MiB, send the first 64 KiB of it, and wait.
    let mask = [1, 2, 3, 4];
    ws.write_all(&text_frame_header(4 << 20, mask)).await?;
    let chunk: Vec<u8> = b"<message><body>"
        .iter()
        .chain(std::iter::repeat(&b'x'))
        .take(64 * 1024)
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    // The server may close before taking all of it.
    let _ = ws.write_all(&chunk).await;
    let started = Instant::now();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buf = [0u8; 4096];
        loop {
            match ws.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server still waits for the 4 MiB frame after {:?}",
        started.elapsed()
    );
    let said = String::from_utf8_lossy(&got);
    assert!(said.contains("policy-violation"), "{said:?}");
    Ok(())
}

/// An HTTP client has `http_header_read_timeout_ms` to send its request's headers; one that
/// trickles them, or connects and says nothing, is closed.
#[tokio::test]
async fn http_headers_have_a_read_timeout() -> R {
    let (s, _dir) =
        start_with("http_tls = false\n[limits]\nhttp_header_read_timeout_ms = 1000\n").await?;
    let http = SocketAddr::from(([127, 0, 0, 1], s.ports().http));
    let mut silent = TcpStream::connect(http).await?;
    let mut partial = TcpStream::connect(http).await?;
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        .await?;
    let started = Instant::now();
    for (name, c) in [("silent", &mut silent), ("partial", &mut partial)] {
        let mut buf = [0u8; 512];
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the {name} connection is still open after 5 s");
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A client that sends its request in time is served.
    let mut ok = TcpStream::connect(http).await?;
    assert_eq!(http_probe(&mut ok).await?, Probe::Served);
    Ok(())
}

/// Connections from one address (IPv6: one /64, see the unit test in `admission`) share
/// `connections_per_address_max`, on every port together; other addresses are unaffected.
#[tokio::test]
async fn connections_per_address_are_limited() -> R {
    let (s, _dir) = start_with("[limits]\nconnections_per_address_max = 2\n").await?;
    let a = Ipv4Addr::new(127, 0, 0, 4);
    let b = Ipv4Addr::new(127, 0, 0, 5);
    let mut first = connect_from(a, s.c2s_addr()).await?;
    assert_eq!(xmpp_probe(&mut first).await?, Probe::Served);
    let https = SocketAddr::from(([127, 0, 0, 1], s.ports().http));
    let _second = connect_from(a, https).await?;
    tokio::time::sleep(SETTLE).await;
    let mut third = connect_from(a, s.c2s_addr()).await?;
    assert_eq!(xmpp_probe(&mut third).await?, Probe::Refused);
    let mut other = connect_from(b, s.c2s_addr()).await?;
    assert_eq!(xmpp_probe(&mut other).await?, Probe::Served);
    drop(first);
    tokio::time::sleep(SETTLE).await;
    let mut again = connect_from(a, s.c2s_addr()).await?;
    assert_eq!(xmpp_probe(&mut again).await?, Probe::Served);
    Ok(())
}

/// An account may have `sessions_per_account_max` sessions: one more gets
/// `resource-constraint` at bind (RFC 6120 §7.6.2.1); a closed one makes room.
#[tokio::test]
async fn sessions_per_account_are_limited() -> R {
    let (s, _dir) = start_with("[limits]\nsessions_per_account_max = 2\n").await?;
    let one = s.client("alice@localhost", "alice-pw").await?;
    let _two = s.client("alice@localhost", "alice-pw").await?;
    let err = s
        .client("alice@localhost", "alice-pw")
        .await
        .expect_err("a third session");
    assert!(
        matches!(&err, pchat_testkit::HarnessError::Client(Error::Stanza { error, .. }) if error.condition == "resource-constraint"),
        "{err:?}"
    );
    // Another account is not affected.
    s.client("bob@localhost", "bob-pw").await?;
    one.close().await?;
    tokio::time::sleep(SETTLE).await;
    s.client("alice@localhost", "alice-pw").await?;
    Ok(())
}

/// A TCP relay on a loopback port of its own: each connection is forwarded to `target` from
/// the source address `from`, after `preamble` (a PROXY header, as a load balancer sends).
async fn relay(
    from: Ipv4Addr,
    target: SocketAddr,
    preamble: Vec<u8>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let preamble = preamble.clone();
            tokio::spawn(async move {
                let Ok(mut upstream) = connect_from(from, target).await else {
                    return;
                };
                if upstream.write_all(&preamble).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    Ok(addr)
}

async fn login_via(addr: SocketAddr, user: &str, password: &str) -> Result<Client, Error> {
    Client::connect(ConnectOptions::new(
        Transport::StartTls { addr },
        &format!("{user}@localhost"),
        password,
    ))
    .await
}

fn condition(e: &Error) -> Option<&str> {
    match e {
        Error::Sasl { condition, .. } => Some(condition),
        _ => None,
    }
}

/// The lockout scenario: 30 wrong passwords from one address slow that address down — even
/// its right password waits — while the account's owner logs in from another address at
/// once. (Before, the account itself was locked: the right password failed from everywhere.)
/// The guesser is delayed, not banned: after the wait it may try again.
#[tokio::test]
async fn a_guesser_is_slowed_without_locking_the_owner_out() -> R {
    let (s, _dir) = start_with("").await?;
    let guesser = relay(Ipv4Addr::new(127, 0, 0, 2), s.c2s_addr(), Vec::new()).await?;
    let owner = relay(Ipv4Addr::new(127, 0, 0, 3), s.c2s_addr(), Vec::new()).await?;
    let mut refused = 0;
    let mut throttled = 0;
    for _ in 0..30 {
        let err = login_via(guesser, "alice", "guess")
            .await
            .expect_err("wrong password");
        match condition(&err) {
            Some("not-authorized") => refused += 1,
            Some("temporary-auth-failure") => throttled += 1,
            _ => anyhow::bail!("unexpected: {err:?}"),
        }
    }
    assert!(
        refused >= 5,
        "the first failures are plain refusals ({refused})"
    );
    assert!(
        throttled > 0,
        "then the address is slowed down ({throttled})"
    );
    let err = login_via(guesser, "alice", "alice-pw")
        .await
        .expect_err("the guessing address waits, right password or not");
    assert_eq!(condition(&err), Some("temporary-auth-failure"), "{err:?}");
    let text = match &err {
        Error::Sasl { text, .. } => text.clone().unwrap_or_default(),
        _ => String::new(),
    };

    // The owner, elsewhere, is not locked out.
    let mut alice = login_via(owner, "alice", "alice-pw").await?;
    alice.ping("localhost").await?;

    // The guesser's wait ends: it is a delay, not a ban.
    let wait: u64 = text
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no wait in {text:?}"))?;
    assert!(wait <= 60, "{text}");
    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(200)).await;
    login_via(guesser, "alice", "alice-pw").await?;
    Ok(())
}

/// A PROXY protocol v2 header for a TCP connection from `client` (RFC-less, HAProxy's
/// `proxy-protocol.txt` §2.2), written out by hand so the test shares nothing with the
/// server's parser.
fn proxy_v2(client: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    match client {
        SocketAddr::V4(c) => {
            h.push(0x11); // TCP over IPv4
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&c.ip().octets());
            h.extend_from_slice(&[127, 0, 0, 1]);
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&5222u16.to_be_bytes());
        }
        SocketAddr::V6(c) => {
            h.push(0x21); // TCP over IPv6
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&c.ip().octets());
            h.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
            h.extend_from_slice(&c.port().to_be_bytes());
            h.extend_from_slice(&5222u16.to_be_bytes());
        }
    }
    h
}

/// Behind a proxy, the client's address comes from its PROXY v2 header: limits count the
/// address the proxy names, not the proxy's. A whole XMPP session runs through the header;
/// a header from a peer that is not a trusted proxy is refused, and so is a trusted peer
/// that sends none.
#[tokio::test]
async fn client_addresses_come_from_proxy_headers_of_trusted_proxies() -> R {
    let (s, _dir) = start_with(
        "[limits]\nconnections_per_address_max = 1\n\
         [proxy_protocol]\nc2s = true\ntrusted_proxies = [\"127.0.0.1\"]\n",
    )
    .await?;
    let c2s = s.c2s_addr();
    let seven: SocketAddr = "203.0.113.7:50000".parse()?;
    let eight: SocketAddr = "[2001:db8::8]:50001".parse()?;
    let via_seven = relay(LOCALHOST, c2s, proxy_v2(seven)).await?;
    let mut alice = login_via(via_seven, "alice", "alice-pw").await?;
    alice.ping("localhost").await?;
    // 203.0.113.7 holds its one connection; the proxy's own address is not what counts.
    let err = login_via(via_seven, "bob", "bob-pw")
        .await
        .expect_err("a second connection from 203.0.113.7");
    assert!(
        matches!(err, Error::ConnectionClosed | Error::Io(_)),
        "{err:?}"
    );
    let via_eight = relay(LOCALHOST, c2s, proxy_v2(eight)).await?;
    let mut bob = login_via(via_eight, "bob", "bob-pw").await?;
    bob.ping("localhost").await?;
    // A header from a peer that is not a trusted proxy is refused...
    let untrusted = relay(
        Ipv4Addr::new(127, 0, 0, 2),
        c2s,
        proxy_v2("203.0.113.9:1".parse()?),
    )
    .await?;
    let err = login_via(untrusted, "bob", "bob-pw")
        .await
        .expect_err("an untrusted proxy");
    assert!(
        matches!(err, Error::ConnectionClosed | Error::Io(_)),
        "{err:?}"
    );
    // ... and so is the trusted proxy without a header (or with garbage for one).
    let mut bare = TcpStream::connect(c2s).await?;
    assert_eq!(xmpp_probe(&mut bare).await?, Probe::Refused);
    alice.close().await?;
    bob.close().await?;
    Ok(())
}
