//! PROXY protocol version 2 (HAProxy's `proxy-protocol.txt`, §2.2): a proxy in front of the
//! server (a load balancer, a TLS-terminating proxy) sends a binary header before the client's
//! bytes that says whose connection it relays. The server trusts it only from the proxies
//! named in `[proxy_protocol] trusted_proxies`, and only on the listeners configured to expect
//! it: from anyone else such a header would let a client pick the address its limits and its
//! login throttle are counted under.
//!
//! The parser is pure ([`parse`]); [`read_header`] reads exactly the header's bytes from the
//! socket and nothing after them, so the stream that follows (TLS, XML, HTTP) starts intact.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part: signature, version and command, family and transport, length.
const FIXED_BYTES: usize = 16;
/// Largest header accepted (the fixed part, addresses and TLVs). HAProxy's TLVs (ALPN, SNI,
/// TLS details, unique id) fit easily; a longer one is a broken or hostile peer, and reading
/// it would let a proxy make the server buffer 64 KiB per connection.
pub const HEADER_BYTES_MAX: usize = 4096;

/// What a complete header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// `LOCAL`: the proxy's own connection (a health check); the peer is the proxy itself.
    Local,
    /// `PROXY` over TCP: the client's address and port.
    Proxied(SocketAddr),
}

/// The outcome of looking at the first bytes of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not complete yet: the whole header is this many bytes (16 until the length is known).
    NeedBytes(usize),
    /// A complete header of `bytes` bytes.
    Done {
        /// Its length: the client's stream starts after it.
        bytes: usize,
        /// What it says.
        header: Header,
    },
}

/// Why a header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The bytes do not start with the v2 signature (no header, or version 1's text form).
    #[error("no PROXY protocol v2 signature")]
    NoSignature,
    /// The version nibble is not 2.
    #[error("PROXY protocol version {0} (only 2 is accepted)")]
    Version(u8),
    /// The command nibble is neither LOCAL nor PROXY.
    #[error("PROXY protocol command {0}")]
    Command(u8),
    /// A PROXY command for something other than TCP over IPv4 or IPv6 (UDP, UNIX sockets,
    /// unspecified): there is no client address to count the connection under.
    #[error("PROXY protocol family/transport byte {0:#04x} carries no TCP client address")]
    Family(u8),
    /// The length is shorter than the family's addresses.
    #[error("PROXY protocol header of {len} bytes is too short for its addresses ({needed})")]
    Short {
        /// The length field.
        len: usize,
        /// What the family needs.
        needed: usize,
    },
    /// Longer than [`HEADER_BYTES_MAX`].
    #[error("PROXY protocol header of {0} bytes is longer than {HEADER_BYTES_MAX}")]
    TooLong(usize),
}

/// Looks at the first bytes of a connection. Never reads past the header.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    // Compare what arrived so far, so a client that is not a proxy is refused on its first
    // byte rather than after 16.
    let sig = buf.len().min(SIGNATURE.len());
    if buf[..sig] != SIGNATURE[..sig] {
        return Err(ProxyError::NoSignature);
    }
    if buf.len() < FIXED_BYTES {
        return Ok(Parsed::NeedBytes(FIXED_BYTES));
    }
    let version = buf[12] >> 4;
    let command = buf[12] & 0x0f;
    if version != 2 {
        return Err(ProxyError::Version(version));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = FIXED_BYTES + len;
    if total > HEADER_BYTES_MAX {
        return Err(ProxyError::TooLong(total));
    }
    let family = buf[13];
    // Checked before the rest arrives, so a bad header is refused without waiting for it.
    let needed = match (command, family) {
        (0, _) => 0,
        (1, 0x11) => 12,
        (1, 0x21) => 36,
        (1, other) => return Err(ProxyError::Family(other)),
        (other, _) => return Err(ProxyError::Command(other)),
    };
    if len < needed {
        return Err(ProxyError::Short { len, needed });
    }
    if buf.len() < total {
        return Ok(Parsed::NeedBytes(total));
    }
    let a = &buf[FIXED_BYTES..total];
    let header = match (command, family) {
        (0, _) => Header::Local,
        (_, 0x11) => {
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Header::Proxied(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([a[8], a[9]]),
            ))
        }
        _ => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            Header::Proxied(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
    };
    Ok(Parsed::Done {
        bytes: total,
        header,
    })
}

/// Why no client address came from a connection's header.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The header is malformed or not a header.
    #[error(transparent)]
    Invalid(#[from] ProxyError),
    /// The connection failed or ended first.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the header at the start of `tcp` (only its bytes) and returns the client's address,
/// or `peer` itself for a LOCAL header. The caller bounds the time it takes.
pub async fn read_header(tcp: &mut TcpStream, peer: SocketAddr) -> Result<SocketAddr, ReadError> {
    let mut buf = vec![0u8; FIXED_BYTES];
    let mut have = 0;
    loop {
        // Exactly what is still missing: what follows the header belongs to the client.
        let n = tcp.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        have += n;
        match parse(&buf[..have])? {
            Parsed::NeedBytes(total) => buf.resize(total, 0),
            Parsed::Done { header, .. } => {
                return Ok(match header {
                    Header::Local => peer,
                    Header::Proxied(client) => client,
                })
            }
        }
    }
}

/// The proxies allowed to send headers: addresses and networks in CIDR notation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<(IpAddr, u8)>,
}

impl TrustedProxies {
    /// Parses `192.0.2.10`, `192.0.2.0/24`, `2001:db8::1`, `2001:db8::/32`.
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, String> {
        let mut nets = Vec::new();
        for e in entries {
            let (addr, len) = match e.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (e.as_str(), None),
            };
            let ip: IpAddr = addr.trim().parse().map_err(|_| {
                format!("`{e}` is not an IP address or network (e.g. 192.0.2.0/24)")
            })?;
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            let len = match len {
                Some(l) => l
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|l| *l <= bits)
                    .ok_or_else(|| format!("`{e}`: the prefix length must be 0 to {bits}"))?,
                None => bits,
            };
            // `::ffff:192.0.2.0/120` is written for an IPv6 socket; peers are compared in
            // their IPv4 form, so the network is too.
            let net = canonical(ip);
            let len = if ip.is_ipv6() && net.is_ipv4() {
                len.saturating_sub(96)
            } else {
                len
            };
            nets.push((net, len));
        }
        Ok(TrustedProxies { nets })
    }

    /// No proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Is `ip` one of the trusted proxies?
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|(net, len)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                prefix_eq(u128::from(n.to_bits()), u128::from(a.to_bits()), 32, *len)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(n.to_bits(), a.to_bits(), 128, *len),
            _ => false,
        })
    }
}

fn prefix_eq(a: u128, b: u128, bits: u8, len: u8) -> bool {
    if len == 0 {
        return true;
    }
    let shift = u32::from(bits - len);
    (a >> shift) == (b >> shift)
}

/// IPv4 addresses seen through an IPv6 socket (`::ffff:192.0.2.1`) are IPv4 addresses.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    fn tcp4() -> Vec<u8> {
        // 203.0.113.7:51000 → 192.0.2.1:5222
        v2(
            1,
            0x11,
            &[203, 0, 113, 7, 192, 0, 2, 1, 0xc7, 0x38, 0x14, 0x66],
        )
    }

    fn tcp6() -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        a.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        a.extend_from_slice(&443u16.to_be_bytes());
        a.extend_from_slice(&5280u16.to_be_bytes());
        v2(1, 0x21, &a)
    }

    #[test]
    fn headers_table() {
        let with_tlv = {
            // 203.0.113.7 plus an ALPN TLV (type 0x01, length 2, "h2") after the addresses.
            let mut a = vec![203, 0, 113, 7, 192, 0, 2, 1, 0xc7, 0x38, 0x14, 0x66];
            a.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']);
            v2(1, 0x11, &a)
        };
        let huge = {
            let mut h = tcp4();
            h[14..16].copy_from_slice(&(5000u16).to_be_bytes());
            h
        };
        let short = v2(1, 0x11, &[203, 0, 113, 7]);
        let v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 5222\r\n".to_vec();
        let mut bad_version = tcp4();
        bad_version[12] = 0x11;
        let mut bad_command = tcp4();
        bad_command[12] = 0x2f;
        let udp = v2(1, 0x12, &[0; 12]);
        let unix = v2(1, 0x31, &[0; 216]);
        let unspec = v2(1, 0x00, &[]);
        let addr4: SocketAddr = "203.0.113.7:51000".parse().unwrap();
        let addr6: SocketAddr = "[2001:db8::7]:443".parse().unwrap();
        let cases: Vec<(&str, Vec<u8>, Result<Parsed, ProxyError>)> = vec![
            (
                "TCP over IPv4",
                tcp4(),
                Ok(Parsed::Done {
                    bytes: 28,
                    header: Header::Proxied(addr4),
                }),
            ),
            (
                "TCP over IPv6",
                tcp6(),
                Ok(Parsed::Done {
                    bytes: 52,
                    header: Header::Proxied(addr6),
                }),
            ),
            (
                "TLVs after the addresses are skipped",
                with_tlv,
                Ok(Parsed::Done {
                    bytes: 33,
                    header: Header::Proxied(addr4),
                }),
            ),
            (
                "LOCAL (a health check) with no addresses",
                v2(0, 0x00, &[]),
                Ok(Parsed::Done {
                    bytes: 16,
                    header: Header::Local,
                }),
            ),
            (
                "LOCAL ignores whatever addresses it carries",
                v2(0, 0x11, &[1; 12]),
                Ok(Parsed::Done {
                    bytes: 28,
                    header: Header::Local,
                }),
            ),
            ("empty", Vec::new(), Ok(Parsed::NeedBytes(16))),
            (
                "part of the signature",
                SIGNATURE[..5].to_vec(),
                Ok(Parsed::NeedBytes(16)),
            ),
            (
                "fixed part, no addresses yet",
                tcp4()[..16].to_vec(),
                Ok(Parsed::NeedBytes(28)),
            ),
            (
                "truncated addresses",
                tcp4()[..20].to_vec(),
                Ok(Parsed::NeedBytes(28)),
            ),
            (
                "an XMPP client",
                b"<?xml version='1.0'?>".to_vec(),
                Err(ProxyError::NoSignature),
            ),
            (
                "a TLS ClientHello",
                vec![0x16, 0x03, 0x01, 0x02, 0x00],
                Err(ProxyError::NoSignature),
            ),
            (
                "an HTTP request",
                b"GET / HTTP/1.1\r\n".to_vec(),
                Err(ProxyError::NoSignature),
            ),
            ("PROXY protocol v1 (text)", v1, Err(ProxyError::NoSignature)),
            (
                "signature then garbage",
                [&SIGNATURE[..11], b"X"].concat(),
                Err(ProxyError::NoSignature),
            ),
            (
                "version 1 in the binary form",
                bad_version,
                Err(ProxyError::Version(1)),
            ),
            ("unknown command", bad_command, Err(ProxyError::Command(15))),
            ("UDP", udp, Err(ProxyError::Family(0x12))),
            ("UNIX socket", unix, Err(ProxyError::Family(0x31))),
            (
                "PROXY with no family",
                unspec,
                Err(ProxyError::Family(0x00)),
            ),
            (
                "length too short for IPv4",
                short,
                Err(ProxyError::Short { len: 4, needed: 12 }),
            ),
            ("longer than allowed", huge, Err(ProxyError::TooLong(5016))),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(parse(&bytes), want, "{name}");
        }
    }

    /// Every prefix of a valid header asks for more and never errs; the whole one is done.
    #[test]
    fn every_prefix_asks_for_more() {
        for h in [tcp4(), tcp6(), v2(0, 0, &[])] {
            for cut in 0..h.len() {
                assert!(
                    matches!(parse(&h[..cut]), Ok(Parsed::NeedBytes(n)) if n > cut && n <= h.len()),
                    "{cut} of {}",
                    h.len()
                );
            }
            assert!(matches!(parse(&h), Ok(Parsed::Done { bytes, .. }) if bytes == h.len()));
        }
    }

    /// Bytes after the header are not the parser's: the header's length is reported, and
    /// whatever follows is left to the stream.
    #[test]
    fn the_stream_after_the_header_is_untouched() {
        let mut bytes = tcp4();
        bytes.extend_from_slice(b"<?xml version='1.0'?>");
        assert!(matches!(parse(&bytes), Ok(Parsed::Done { bytes: 28, .. })));
    }

    #[tokio::test]
    async fn read_header_stops_at_the_header() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let h = tcp6();
            // In pieces, then the client's own first bytes in the same write as the last one.
            c.write_all(&h[..3]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            c.write_all(&h[3..20]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            c.write_all(&[&h[20..], b"<stream>".as_slice()].concat())
                .await
                .unwrap();
            c
        });
        let (mut s, peer) = listener.accept().await.unwrap();
        let got = read_header(&mut s, peer).await.unwrap();
        assert_eq!(got, "[2001:db8::7]:443".parse().unwrap());
        let mut rest = [0u8; 8];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"<stream>");
        drop(client.await.unwrap());

        // LOCAL: the peer itself.
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&v2(0, 0, &[])).await.unwrap();
            c
        });
        let (mut s, peer) = listener.accept().await.unwrap();
        assert_eq!(read_header(&mut s, peer).await.unwrap(), peer);
        drop(client.await.unwrap());

        // Garbage and truncation are errors, not hangs.
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"<?xml").await.unwrap();
            c
        });
        let (mut s, peer) = listener.accept().await.unwrap();
        assert!(matches!(
            read_header(&mut s, peer).await,
            Err(ReadError::Invalid(ProxyError::NoSignature))
        ));
        drop(client.await.unwrap());
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&tcp4()[..20]).await.unwrap();
            c.shutdown().await.unwrap();
            c
        });
        let (mut s, peer) = listener.accept().await.unwrap();
        assert!(matches!(
            read_header(&mut s, peer).await,
            Err(ReadError::Io(_))
        ));
        drop(client.await.unwrap());
    }

    #[test]
    fn trusted_proxies() {
        let t = TrustedProxies::parse(&[
            "192.0.2.10".into(),
            "198.51.100.0/24".into(),
            "2001:db8:1::/48".into(),
        ])
        .unwrap();
        for (ip, want) in [
            ("192.0.2.10", true),
            ("192.0.2.11", false),
            ("198.51.100.200", true),
            ("198.51.101.1", false),
            ("::ffff:192.0.2.10", true),
            ("2001:db8:1:ffff::1", true),
            ("2001:db8:2::1", false),
        ] {
            assert_eq!(t.contains(ip.parse().unwrap()), want, "{ip}");
        }
        assert!(TrustedProxies::parse(&["0.0.0.0/0".into()])
            .unwrap()
            .contains("203.0.113.1".parse().unwrap()));
        for bad in [
            "proxy.example",
            "192.0.2.0/33",
            "2001:db8::/129",
            "10.0.0.0/x",
        ] {
            assert!(TrustedProxies::parse(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(TrustedProxies::parse(&[]).unwrap().is_empty());
    }
}
