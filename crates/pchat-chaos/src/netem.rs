//! Packet-level link faults — delay, jitter (and so reordering) and loss of single IP
//! packets — the stand-in for `tc netem`, which this kernel lacks (`sch_netem` is not built).
//!
//! In the sending host's namespace, the packets for one destination are routed into a TUN
//! device (`ip route add TO/32 dev pnm0`) that a thread of the harness reads. Each packet is
//! dropped with the given probability or held for `delay` plus a uniform share of `jitter`,
//! then sent on, unchanged, through a raw IP socket whose mark (`SO_MARK`) selects a routing
//! table of its own where the destination is on the host's `eth0` as before. A jitter wider
//! than the gap between two packets reorders them, as netem does. Unlike the byte proxy
//! ([`crate::proxy`]) this is below TCP: established connections are affected at once (a
//! route change invalidates their cached routes), retransmission timers, duplicate
//! acknowledgments and congestion control all see the bad link, and every protocol goes
//! through it (etcd's peer traffic, PostgreSQL's replication, the agents' API).
//!
//! Bounds: at most [`QUEUE_MAX`] packets are held (netem's default `limit` is 1,000); a
//! packet past it is dropped and counted. One fault per namespace at a time (the routing
//! table and mark are fixed). Removing it deletes the route first, so new packets go straight
//! again, then drops whatever is still held (as removing a netem qdisc does).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use socket2::{Domain, Protocol, Socket, Type};
use tun_rs::{DeviceBuilder, InterruptEvent, SyncDevice};

use crate::rng::Rng;

/// Packets held at once; more are dropped (and counted).
pub const QUEUE_MAX: usize = 4_096;
/// The mark of the packets the thread sends on, and the routing table it selects.
const MARK: u32 = 0x7e;
const TABLE: &str = "126";
/// The TUN device's name in the host's namespace.
const DEV: &str = "pnm0";

/// What the link does to each packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Link {
    /// Every packet held this long…
    pub delay_ms: u32,
    /// …plus a uniform draw in `0..=jitter_ms` (reorders packets closer than that)…
    pub jitter_ms: u32,
    /// …or dropped with this probability (percent, 0..=100).
    pub loss_percent: u8,
}

/// What happened to the packets while the fault was in force.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sent on after their delay.
    pub passed: u64,
    /// Dropped by the loss draw.
    pub lost: u64,
    /// Sent on before a packet that had arrived earlier.
    pub reordered: u64,
    /// Dropped because [`QUEUE_MAX`] packets were held.
    pub overflow: u64,
    /// Still held when the fault was removed (dropped).
    pub flushed: u64,
}

/// A link fault in force on the packets from one namespace to one address.
pub struct Netem {
    ns: String,
    to: Ipv4Addr,
    stop: Arc<InterruptEvent>,
    thread: Option<JoinHandle<anyhow::Result<Counts>>>,
}

fn ip(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (apt-get install -y iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netem {
    /// Puts `link` in force on the packets that the host in namespace `ns` (address `from`,
    /// its one interface `eth0`) sends to `to`. `seed` makes the draws repeatable.
    pub fn start(
        ns: &str,
        from: Ipv4Addr,
        to: Ipv4Addr,
        link: Link,
        seed: u64,
    ) -> anyhow::Result<Netem> {
        if link.loss_percent > 100 {
            bail!("loss is a percentage 0..100, not {}", link.loss_percent);
        }
        let stop = Arc::new(InterruptEvent::new().context("an eventfd for the netem thread")?);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<anyhow::Result<()>>(1);
        let thread = {
            let ns = ns.to_owned();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("netem-{ns}"))
                .spawn(move || -> anyhow::Result<Counts> {
                    // The device and the socket belong to the namespace they are made in.
                    let made = (|| -> anyhow::Result<(SyncDevice, Socket)> {
                        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
                        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(|e| anyhow!("setns into {ns}: {e}"))?;
                        let dev = DeviceBuilder::new()
                            .name(DEV)
                            .mtu(1500)
                            .enable(true)
                            .build_sync()
                            .context("creating the TUN device (is /dev/net/tun there?)")?;
                        // IPPROTO_RAW: the packet is sent as read, its own header included.
                        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))
                            .context("a raw IP socket")?;
                        sock.set_mark(MARK).context("SO_MARK on the raw socket")?;
                        Ok((dev, sock))
                    })();
                    let (dev, sock) = match made {
                        Ok(m) => {
                            let _ = ready_tx.send(Ok(()));
                            m
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow!("{e:#}")));
                            return Err(e);
                        }
                    };
                    pass_packets(&dev, &sock, &stop, link, seed)
                })
                .context("spawning the netem thread")?
        };
        let netem = Netem {
            ns: ns.to_owned(),
            to,
            stop,
            thread: Some(thread),
        };
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the netem thread ended before it was ready"))??;
        // The way out for the packets it sends on, then the way in for the host's own.
        let dst = format!("{to}/32");
        let mark = MARK.to_string();
        ip(
            ns,
            &[
                "rule", "add", "fwmark", &mark, "lookup", TABLE, "pref", "100",
            ],
        )?;
        ip(ns, &["route", "add", &dst, "dev", "eth0", "table", TABLE])?;
        ip(
            ns,
            &["route", "add", &dst, "dev", DEV, "src", &from.to_string()],
        )?;
        Ok(netem)
    }

    /// Removes the fault: new packets go straight again, held ones are dropped.
    pub fn stop(mut self) -> anyhow::Result<Counts> {
        self.teardown()
    }

    fn teardown(&mut self) -> anyhow::Result<Counts> {
        let dst = format!("{}/32", self.to);
        let mark = MARK.to_string();
        // Each step is tried whatever the one before did: a half-made fault is removed too.
        let route = ip(&self.ns, &["route", "del", &dst, "dev", DEV]);
        let _ = self.stop.trigger();
        let counts = match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("the netem thread panicked"))
                .and_then(|r| r),
            None => Ok(Counts::default()),
        };
        let table = ip(&self.ns, &["route", "del", &dst, "table", TABLE]);
        let rule = ip(&self.ns, &["rule", "del", "fwmark", &mark, "lookup", TABLE]);
        let _ = (route, table, rule);
        counts
    }
}

impl Drop for Netem {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.teardown();
        }
    }
}

/// The destination of an IPv4 packet, if it is one.
fn destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

/// The thread's loop: read, draw, hold, send on; until `stop`.
fn pass_packets(
    dev: &SyncDevice,
    sock: &Socket,
    stop: &InterruptEvent,
    link: Link,
    seed: u64,
) -> anyhow::Result<Counts> {
    let mut rng = Rng::new(seed);
    let mut counts = Counts::default();
    // (release time, arrival number, packet); the arrival number keeps equal times in order
    // and shows reordering.
    let mut held: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut arrivals = 0u64;
    let mut last_sent: Option<u64> = None;
    let mut buf = vec![0u8; 65_536];
    loop {
        let now = Instant::now();
        while held.peek().is_some_and(|Reverse((t, ..))| *t <= now) {
            let Some(Reverse((_, n, packet))) = held.pop() else {
                break;
            };
            if let Some(dst) = destination(&packet) {
                // A send that fails (no route for a moment, a full buffer) is a lost packet,
                // as on a real link.
                let _ = sock.send_to(&packet, &SocketAddrV4::new(dst, 0).into());
            }
            counts.passed += 1;
            if last_sent.is_some_and(|l| n < l) {
                counts.reordered += 1;
            }
            last_sent = Some(last_sent.map_or(n, |l| l.max(n)));
        }
        let wait = held
            .peek()
            .map(|Reverse((t, ..))| t.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(200));
        match dev.recv_intr_timeout(&mut buf, stop, Some(wait)) {
            Ok(len) => {
                arrivals += 1;
                if link.loss_percent > 0 && rng.chance(u64::from(link.loss_percent)) {
                    counts.lost += 1;
                    continue;
                }
                if held.len() >= QUEUE_MAX {
                    counts.overflow += 1;
                    continue;
                }
                let extra = if link.jitter_ms > 0 {
                    rng.range(0, u64::from(link.jitter_ms))
                } else {
                    0
                };
                let release = Instant::now()
                    + Duration::from_millis(u64::from(link.delay_ms))
                    + Duration::from_millis(extra);
                held.push(Reverse((release, arrivals, buf[..len].to_vec())));
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                if stop.is_trigger() {
                    counts.flushed = held.len() as u64;
                    return Ok(counts);
                }
            }
            Err(e) => return Err(anyhow!("reading the TUN device: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Net;
    use std::net::UdpSocket;

    /// What `make` returns, made on a thread inside namespace `ns`.
    fn in_ns<T: Send + 'static>(
        ns: &str,
        make: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> T {
        let ns = ns.to_owned();
        std::thread::spawn(move || {
            let f =
                std::fs::File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("{e}"));
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {ns}: {e} (run as root)"));
            make().unwrap_or_else(|e| panic!("in {ns}: {e}"))
        })
        .join()
        .unwrap_or_else(|_| panic!("in the namespace"))
    }

    /// A UDP socket bound in namespace `ns` (the socket keeps it; the thread is gone).
    fn udp_in(ns: &str, addr: SocketAddrV4) -> UdpSocket {
        in_ns(ns, move || UdpSocket::bind(addr))
    }

    /// `link` from `from` (a host of `net`) to `to`'s address, seeded with `seed`.
    fn fault(
        from: &crate::net::Host,
        to: &crate::net::Host,
        d: u32,
        j: u32,
        l: u8,
        seed: u64,
    ) -> Netem {
        let link = Link {
            delay_ms: d,
            jitter_ms: j,
            loss_percent: l,
        };
        Netem::start(&from.ns, from.addr, to.addr, link, seed).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn stopped(n: Netem) -> Counts {
        n.stop().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Sends `n` numbered datagrams from `tx` to `to`, 1 ms apart, while `rx` receives them
    /// on a thread of its own; returns the numbers in arrival order (within `wait` after the
    /// last was sent) and the shortest transit time.
    fn burst(
        tx: &UdpSocket,
        rx: &UdpSocket,
        to: SocketAddrV4,
        n: u32,
        wait: Duration,
    ) -> (Vec<u32>, Option<Duration>) {
        let t0 = Instant::now();
        let rx = rx.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let deadline = t0 + Duration::from_millis(u64::from(n) * 2) + wait;
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut fastest: Option<Duration> = None;
            let mut buf = [0u8; 16];
            while got.len() < n as usize {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                rx.set_read_timeout(Some(left))
                    .unwrap_or_else(|e| panic!("{e}"));
                let Ok((12, _)) = rx.recv_from(&mut buf) else {
                    continue;
                };
                let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&buf[4..12]);
                let transit = t0.elapsed() - Duration::from_micros(u64::from_be_bytes(sent));
                fastest = Some(fastest.map_or(transit, |f| f.min(transit)));
                got.push(seq);
            }
            (got, fastest)
        });
        for i in 0..n {
            let mut d = [0u8; 12];
            d[..4].copy_from_slice(&i.to_be_bytes());
            d[4..].copy_from_slice(&(t0.elapsed().as_micros() as u64).to_be_bytes());
            tx.send_to(&d, to).unwrap_or_else(|e| panic!("{e}"));
            std::thread::sleep(Duration::from_millis(1));
        }
        receiver
            .join()
            .unwrap_or_else(|_| panic!("the receiving thread"))
    }

    #[test]
    fn packets_are_delayed_reordered_and_lost_between_two_namespaces_then_go_straight() {
        let id = format!("nm{}", std::process::id() % 100_000);
        let net = Net::create(&id, &[("a", 1), ("b", 2)]).unwrap_or_else(|e| panic!("{e:#}"));
        let (a, b) = (net.host("a").clone(), net.host("b").clone());
        let tx = udp_in(&a.ns, SocketAddrV4::new(a.addr, 0));
        let to = SocketAddrV4::new(b.addr, 9_999);
        let rx = udp_in(&b.ns, to);

        // A clean link: everything, in order, at once.
        let (got, first) = burst(&tx, &rx, to, 50, Duration::from_secs(2));
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        assert!(
            first.is_some_and(|t| t < Duration::from_millis(30)),
            "{first:?}"
        );

        // 40 ms + up to 60 ms: late, all there, not in order.
        let f = fault(&a, &b, 40, 60, 0, 1);
        let (got, first) = burst(&tx, &rx, to, 200, Duration::from_secs(3));
        let counts = stopped(f);
        assert!(
            first.is_some_and(|t| t >= Duration::from_millis(40)),
            "{first:?}"
        );
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..200).collect::<Vec<_>>(), "every datagram once");
        assert_ne!(got, sorted, "a 60 ms jitter on 1 ms gaps reorders");
        assert!(counts.reordered > 0 && counts.passed >= 200, "{counts:?}");

        // 30 % loss: about 70 of 100 arrive, none twice.
        let f = fault(&a, &b, 0, 0, 30, 2);
        let (got, _) = burst(&tx, &rx, to, 100, Duration::from_millis(500));
        let counts = stopped(f);
        assert!((45..=90).contains(&got.len()), "{} arrived", got.len());
        // Every missing datagram was a drawn loss (the host's other packets to b, if any,
        // are counted too).
        assert!(counts.lost as usize >= 100 - got.len(), "{counts:?}");
        assert_eq!(counts.overflow + counts.flushed, 0, "{counts:?}");

        // TCP on a connection made before the fault: 1 MiB each way through 10 ms + up to
        // 20 ms and 5 % loss arrives whole, in order (retransmitted, reassembled).
        let listener = in_ns(&b.ns, move || {
            std::net::TcpListener::bind(SocketAddrV4::new(b.addr, 9_998))
        });
        let client = in_ns(&a.ns, move || {
            std::net::TcpStream::connect(SocketAddrV4::new(b.addr, 9_998))
        });
        let (server, _) = listener.accept().unwrap_or_else(|e| panic!("{e}"));
        let (there, back) = (fault(&a, &b, 10, 20, 5, 3), fault(&b, &a, 10, 20, 5, 4));
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        for (mut from, mut to) in [
            (
                client.try_clone().unwrap_or_else(|e| panic!("{e}")),
                server.try_clone().unwrap_or_else(|e| panic!("{e}")),
            ),
            (server, client),
        ] {
            use std::io::{Read as _, Write as _};
            to.set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap_or_else(|e| panic!("{e}"));
            let sent = data.clone();
            let writer = std::thread::spawn(move || from.write_all(&sent));
            let mut got = vec![0u8; data.len()];
            to.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("reading through the bad link: {e}"));
            writer
                .join()
                .unwrap_or_else(|_| panic!("writer"))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(got == data, "the bytes arrived changed");
        }
        let (c1, c2) = (stopped(there), stopped(back));
        assert!(
            c1.lost + c2.lost > 0 && c1.reordered + c2.reordered > 0,
            "{c1:?} {c2:?}"
        );

        // Removed: a clean link again, and no route or device left behind.
        let (got, first) = burst(&tx, &rx, to, 50, Duration::from_secs(2));
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        assert!(
            first.is_some_and(|t| t < Duration::from_millis(30)),
            "{first:?}"
        );
        let routes = Command::new("ip")
            .args(["-n", &a.ns, "route", "show", "table", "all"])
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(
            !routes.contains(DEV) && !routes.contains("table 126"),
            "{routes}"
        );
    }

    #[test]
    fn only_ipv4_packets_have_a_destination() {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[198, 18, 0, 21]);
        assert_eq!(destination(&p), Some(Ipv4Addr::new(198, 18, 0, 21)));
        p[0] = 0x60;
        assert_eq!(destination(&p), None);
        assert_eq!(destination(&[0x45; 10]), None);
    }
}
