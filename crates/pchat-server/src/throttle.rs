//! The login throttle: failed logins slow down the address they come from (IPv6: its /64),
//! never the account they were aimed at. Locking an account would hand anyone who knows a
//! user name the power to lock its owner out (30 wrong passwords from one address used to
//! refuse the right one from everywhere); delaying the guesser costs the owner nothing.
//!
//! An address gets `free` failures; then each failure makes it wait before its next attempt,
//! `first` after the first one, doubling up to `max`. Its failures are forgotten after
//! `forget_after` without a new one. A success does not wipe the slate: a guesser who owns one
//! account could otherwise log in to it between guesses at another.
//!
//! The table is bounded. When full, it forgets an address whose failures are already
//! forgotten, else the one with the fewest failures (the least recent among equals): an
//! attacker flooding it from many addresses evicts its own one-failure entries, and the
//! addresses that failed most stay throttled. (Clearing the whole table at the bound, as
//! before, reset everyone, the worst offenders first among them.)

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::admission::AddressKey;

/// The throttle's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrottleLimits {
    /// Failures before any delay.
    pub free: u32,
    /// The delay after the first failure beyond `free`.
    pub first: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Failures are forgotten after this long without a new one.
    pub forget_after: Duration,
    /// Addresses remembered at most.
    pub entries_max: usize,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    last: Instant,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<AddressKey, Entry>,
    /// Eviction order for live entries: fewest failures first, then least recent.
    by_failures: BTreeSet<(u32, Instant, AddressKey)>,
    /// Entries by their last failure, to find forgotten ones first.
    by_age: BTreeSet<(Instant, AddressKey)>,
}

impl Table {
    fn remove(&mut self, key: AddressKey) {
        if let Some(e) = self.entries.remove(&key) {
            self.by_failures.remove(&(e.failures, e.last, key));
            self.by_age.remove(&(e.last, key));
        }
    }

    fn insert(&mut self, key: AddressKey, e: Entry) {
        self.entries.insert(key, e);
        self.by_failures.insert((e.failures, e.last, key));
        self.by_age.insert((e.last, key));
    }

    /// Forgets one entry: a forgotten one (no failure for `forget_after`) if any, else the
    /// one with the fewest failures, the least recent among equals.
    fn evict_one(&mut self, now: Instant, forget_after: Duration) {
        let victim = match self.by_age.first() {
            Some(&(last, key)) if now.saturating_duration_since(last) >= forget_after => Some(key),
            _ => self.by_failures.first().map(|&(_, _, key)| key),
        };
        if let Some(key) = victim {
            self.remove(key);
        }
    }
}

/// Failed logins per address, with growing delays.
#[derive(Debug)]
pub struct LoginThrottle {
    limits: ThrottleLimits,
    table: Mutex<Table>,
}

impl LoginThrottle {
    /// An empty throttle.
    pub fn new(limits: ThrottleLimits) -> LoginThrottle {
        LoginThrottle {
            limits,
            table: Mutex::new(Table::default()),
        }
    }

    /// The delay an address with `failures` failures waits after its last one.
    pub fn delay_after(&self, failures: u32) -> Duration {
        let l = &self.limits;
        if failures <= l.free {
            return Duration::ZERO;
        }
        let doublings = (failures - l.free - 1).min(31);
        l.first
            .checked_mul(1u32 << doublings)
            .unwrap_or(l.max)
            .min(l.max)
    }

    /// `Err(wait)` while `ip` must still wait before its next attempt.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = AddressKey::of(ip);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = t.entries.get(&key).copied() else {
            return Ok(());
        };
        let since = now.saturating_duration_since(e.last);
        if since >= self.limits.forget_after {
            t.remove(key);
            return Ok(());
        }
        let delay = self.delay_after(e.failures);
        if since < delay {
            return Err(delay - since);
        }
        Ok(())
    }

    /// Records a failed login from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let key = AddressKey::of(ip);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let failures = match t.entries.get(&key).copied() {
            Some(e) if now.saturating_duration_since(e.last) < self.limits.forget_after => {
                e.failures.saturating_add(1)
            }
            _ => 1,
        };
        t.remove(key);
        while t.entries.len() >= self.limits.entries_max {
            t.evict_one(now, self.limits.forget_after);
        }
        t.insert(
            key,
            Entry {
                failures,
                last: now,
            },
        );
    }

    /// Failures remembered for `ip`'s address (0 when forgotten).
    pub fn failures(&self, ip: IpAddr) -> u32 {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.entries.get(&AddressKey::of(ip)).map_or(0, |e| e.failures)
    }

    /// Addresses remembered.
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    /// Nothing remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn limits() -> ThrottleLimits {
        ThrottleLimits {
            free: 2,
            first: S,
            max: 8 * S,
            forget_after: 60 * S,
            entries_max: 1000,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn delays_grow_and_stop_at_the_max() {
        let t = LoginThrottle::new(limits());
        let got: Vec<u64> = (0..9).map(|f| t.delay_after(f).as_secs()).collect();
        assert_eq!(got, [0, 0, 0, 1, 2, 4, 8, 8, 8]);
        assert_eq!(t.delay_after(u32::MAX), 8 * S);
    }

    #[test]
    fn the_guesser_waits_and_nobody_else_does() {
        let t = LoginThrottle::new(limits());
        let t0 = Instant::now();
        let guesser = ip("192.0.2.66");
        for i in 0..30 {
            t.failed(guesser, t0 + i * 10 * S);
        }
        let last = t0 + 290 * S;
        assert_eq!(
            t.check(guesser, last + S),
            Err(7 * S),
            "waits the longest delay"
        );
        assert_eq!(
            t.check(guesser, last + 8 * S),
            Ok(()),
            "then may try once more"
        );
        // The same account from anywhere else is not affected: there is no account key.
        assert_eq!(t.check(ip("198.51.100.7"), last), Ok(()));
        // Its neighbours in the same IPv4 block are other addresses; in an IPv6 /64, not.
        assert_eq!(t.check(ip("192.0.2.67"), last), Ok(()));
        let v6 = ip("2001:db8:1:2::1");
        for _ in 0..3 {
            t.failed(v6, last);
        }
        assert_eq!(t.check(ip("2001:db8:1:2:ffff::9"), last), Err(S));
        assert_eq!(t.check(ip("2001:db8:1:3::1"), last), Ok(()));
        // Forgotten after a quiet window.
        assert_eq!(t.check(guesser, last + 61 * S), Ok(()));
        assert_eq!(t.failures(guesser), 0);
    }

    /// A full table forgets the addresses with the fewest failures: flooding it from new
    /// addresses does not reset the worst offender (the old code cleared everything).
    #[test]
    fn a_full_table_keeps_the_worst_offenders() {
        let t = LoginThrottle::new(ThrottleLimits {
            entries_max: 100,
            ..limits()
        });
        let t0 = Instant::now();
        let worst = ip("192.0.2.1");
        for _ in 0..20 {
            t.failed(worst, t0);
        }
        let second = ip("192.0.2.2");
        for _ in 0..5 {
            t.failed(second, t0);
        }
        // 100,000 one-failure addresses from a botnet, newer than the offenders.
        for i in 0..100_000u32 {
            let a = std::net::Ipv4Addr::from_bits(0x0a00_0000 + i);
            t.failed(IpAddr::V4(a), t0 + S);
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.failures(worst), 20);
        assert_eq!(t.failures(second), 5);
        assert!(t.check(worst, t0 + 2 * S).is_err());
        // Forgotten entries go before anyone with failures that still count.
        let t = LoginThrottle::new(ThrottleLimits {
            entries_max: 2,
            ..limits()
        });
        t.failed(worst, t0);
        t.failed(worst, t0);
        t.failed(worst, t0);
        t.failed(second, t0 + 100 * S);
        t.failed(ip("192.0.2.3"), t0 + 100 * S);
        assert_eq!(t.failures(worst), 0, "its failures were forgotten anyway");
        assert_eq!(t.failures(second), 1);
    }
}
