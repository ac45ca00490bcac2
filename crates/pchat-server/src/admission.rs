//! Who may hold a connection: one count of connections for all client ports together (c2s,
//! direct TLS, HTTP/WebSocket), and a share per client address, so one host cannot take all
//! the sockets a server has. IPv6 addresses are counted per /64: that is what one subscriber
//! (one host, one LAN) gets, so counting single addresses there would limit nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::proxy_protocol::canonical;

/// The unit one share is counted for: an IPv4 address, or an IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressKey {
    /// One IPv4 address (IPv4-mapped IPv6 addresses included).
    V4(u32),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl AddressKey {
    /// The key `ip` is counted under.
    pub fn of(ip: IpAddr) -> AddressKey {
        match canonical(ip) {
            IpAddr::V4(v4) => AddressKey::V4(v4.to_bits()),
            IpAddr::V6(v6) => AddressKey::V6((v6.to_bits() >> 64) as u64),
        }
    }
}

impl std::fmt::Display for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressKey::V4(a) => write!(f, "{}", std::net::Ipv4Addr::from_bits(*a)),
            AddressKey::V6(p) => write!(
                f,
                "{}/64",
                std::net::Ipv6Addr::from_bits(u128::from(*p) << 64)
            ),
        }
    }
}

/// Connection counts: in total and per address.
#[derive(Debug)]
pub struct Admission {
    total: AtomicUsize,
    total_max: usize,
    per_address_max: usize,
    per_address: Mutex<HashMap<AddressKey, usize>>,
}

/// One admitted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct ConnGuard {
    admission: Arc<Admission>,
    address: Option<AddressKey>,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The server holds `sessions_max` connections.
    #[error("the server holds its most connections")]
    Full,
    /// This address holds `connections_per_address_max` connections.
    #[error("{0} holds its most connections")]
    Address(AddressKey),
}

impl Admission {
    /// Counts for `total_max` connections in all, `per_address_max` per address.
    pub fn new(total_max: usize, per_address_max: usize) -> Arc<Admission> {
        Arc::new(Admission {
            total: AtomicUsize::new(0),
            total_max,
            per_address_max,
            per_address: Mutex::new(HashMap::new()),
        })
    }

    /// Connections held now.
    pub fn count(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Takes a place for a new connection, before its client address is known (behind a
    /// proxy it comes later, in the PROXY header): see [`ConnGuard::claim_address`].
    pub fn connection(self: &Arc<Self>) -> Result<ConnGuard, Refused> {
        let n = self.total.fetch_add(1, Ordering::Relaxed);
        // Built first, so the count is given back on refusal too.
        let guard = ConnGuard {
            admission: self.clone(),
            address: None,
        };
        if n >= self.total_max {
            return Err(Refused::Full);
        }
        Ok(guard)
    }

    /// Connections from `ip`'s address (its /64 for IPv6) now.
    pub fn count_of(&self, ip: IpAddr) -> usize {
        let map = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&AddressKey::of(ip)).copied().unwrap_or(0)
    }
}

impl ConnGuard {
    /// Counts this connection under the client's address; refused when that address already
    /// holds its share (the guard then still holds its place in the total until dropped).
    pub fn claim_address(&mut self, ip: IpAddr) -> Result<(), Refused> {
        let key = AddressKey::of(ip);
        let a = &self.admission;
        let mut map = a.per_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = self.address.take() {
            release(&mut map, old);
        }
        let n = map.entry(key).or_insert(0);
        if *n >= a.per_address_max {
            if *n == 0 {
                map.remove(&key);
            }
            return Err(Refused::Address(key));
        }
        *n += 1;
        self.address = Some(key);
        Ok(())
    }
}

fn release(map: &mut HashMap<AddressKey, usize>, key: AddressKey) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(key) = self.address {
            let mut map = self
                .admission
                .per_address
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            release(&mut map, key);
        }
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_is_counted_per_64_and_ipv4_per_address() {
        let same = [
            ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff"),
            ("2001:db8:1:2::1", "2001:db8:1:2:a:b:c:d"),
            ("192.0.2.1", "::ffff:192.0.2.1"),
        ];
        for (a, b) in same {
            assert_eq!(AddressKey::of(ip(a)), AddressKey::of(ip(b)), "{a} ~ {b}");
        }
        let different = [
            ("2001:db8:1:2::1", "2001:db8:1:3::1"),
            ("2001:db8:1:2::1", "2001:db9:1:2::1"),
            ("192.0.2.1", "192.0.2.2"),
            ("::1", "::ffff:0.0.0.1"),
            ("0.0.0.1", "::1"),
        ];
        for (a, b) in different {
            assert_ne!(AddressKey::of(ip(a)), AddressKey::of(ip(b)), "{a} !~ {b}");
        }
        assert_eq!(
            AddressKey::of(ip("2001:db8:1:2:3:4:5:6")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            AddressKey::of(ip("::ffff:192.0.2.9")).to_string(),
            "192.0.2.9"
        );
    }

    #[test]
    fn shares_and_total() {
        let a = Admission::new(5, 2);
        let mut held = Vec::new();
        for s in ["2001:db8::1", "2001:db8::2"] {
            let mut g = a.connection().unwrap();
            g.claim_address(ip(s)).unwrap();
            held.push(g);
        }
        // A third from the same /64 is refused; its place in the total is given back.
        let mut g = a.connection().unwrap();
        assert_eq!(
            g.claim_address(ip("2001:db8::ffff")),
            Err(Refused::Address(AddressKey::of(ip("2001:db8::"))))
        );
        drop(g);
        assert_eq!(a.count(), 2);
        // Another /64 and another address family have shares of their own.
        for s in ["2001:db8:0:1::1", "192.0.2.1", "192.0.2.2"] {
            let mut g = a.connection().unwrap();
            g.claim_address(ip(s)).unwrap();
            held.push(g);
        }
        // Five in all: the sixth is refused before any address is known.
        assert_eq!(a.connection().unwrap_err(), Refused::Full);
        assert_eq!(a.count(), 5);
        // Closing one gives its address a place again.
        held.remove(0);
        assert_eq!(a.count_of(ip("2001:db8::9")), 1);
        let mut g = a.connection().unwrap();
        g.claim_address(ip("2001:db8::9")).unwrap();
        drop(g);
        drop(held);
        assert_eq!(a.count(), 0);
        assert!(
            a.per_address.lock().unwrap().is_empty(),
            "no entry is left behind"
        );
    }
}
