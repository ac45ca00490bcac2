//! Accounts and login throttling: SCRAM credentials from passwords, and a bounded table of
//! recent failures per address and per account so password guessing is slowed to a crawl.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pchat_room::Timestamp;
use pchat_store::{ScramCredential, UserRecord};
use pchat_xmpp::scram::{derive_keys, ScramHash, ScramKeys, ITERATIONS_DEFAULT};

/// Builds a user record holding only SCRAM keys for `password`.
pub fn user_record(bare: &str, password: &str, now: Timestamp) -> UserRecord {
    let k1 = derive_keys(ScramHash::Sha1, password, ITERATIONS_DEFAULT);
    let k256 = derive_keys(ScramHash::Sha256, password, ITERATIONS_DEFAULT);
    UserRecord {
        jid: bare.to_owned(),
        scram_sha1: to_cred(k1),
        scram_sha256: to_cred(k256),
        created_at: now,
    }
}

fn to_cred(k: ScramKeys) -> ScramCredential {
    ScramCredential {
        salt: k.salt,
        iterations: k.iterations,
        stored_key: k.stored_key,
        server_key: k.server_key,
    }
}

/// The stored keys of a user for one hash.
pub fn keys_of(user: &UserRecord, hash: ScramHash) -> ScramKeys {
    let c = match hash {
        ScramHash::Sha1 => &user.scram_sha1,
        ScramHash::Sha256 => &user.scram_sha256,
    };
    ScramKeys {
        salt: c.salt.clone(),
        iterations: c.iterations,
        stored_key: c.stored_key.clone(),
        server_key: c.server_key.clone(),
    }
}

/// Checks and normalizes a bare JID of a local account (`user@domain`).
pub fn normalize_account(jid: &str, domain: &str) -> Result<String, String> {
    let jid = jid.trim();
    let (local, host) = jid
        .split_once('@')
        .ok_or_else(|| format!("`{jid}` is not a bare JID: write it as user@{domain}"))?;
    if host != domain {
        return Err(format!(
            "`{jid}` is not in this server's domain `{domain}`: write it as {local}@{domain}"
        ));
    }
    let local = local.to_lowercase();
    if local.is_empty()
        || local.len() > 1023
        || local
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"&'/:<>@".contains(c))
    {
        return Err(format!(
            "`{local}` is not a valid user name (no spaces or \"&'/:<>@)"
        ));
    }
    Ok(format!("{local}@{domain}"))
}

/// Entries the limiter keeps at most; the oldest are forgotten first, so an attacker cycling
/// through addresses cannot grow it without bound.
const LIMITER_ENTRIES_MAX: usize = 100_000;

/// Counts failed logins per key (address or account) in a sliding window.
pub struct AuthLimiter {
    failures_max: u32,
    window: Duration,
    table: Mutex<HashMap<String, (u32, Instant)>>,
}

impl AuthLimiter {
    /// A limiter allowing `failures_max` failures per `window`.
    pub fn new(failures_max: u32, window: Duration) -> Self {
        AuthLimiter {
            failures_max,
            window,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// False while `key` has used up its failures in the current window.
    pub fn allowed(&self, key: &str) -> bool {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        match table.get(key) {
            Some((n, since)) if since.elapsed() < self.window => *n < self.failures_max,
            _ => true,
        }
    }

    /// Records one failure for `key`.
    pub fn failed(&self, key: &str) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() >= LIMITER_ENTRIES_MAX {
            let window = self.window;
            table.retain(|_, (_, since)| since.elapsed() < window);
            if table.len() >= LIMITER_ENTRIES_MAX {
                table.clear();
            }
        }
        let e = table.entry(key.to_owned()).or_insert((0, Instant::now()));
        if e.1.elapsed() >= self.window {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_blocks_after_max_failures() {
        let l = AuthLimiter::new(2, Duration::from_secs(60));
        assert!(l.allowed("ip:1"));
        l.failed("ip:1");
        assert!(l.allowed("ip:1"));
        l.failed("ip:1");
        assert!(!l.allowed("ip:1"));
        assert!(l.allowed("ip:2"));
    }

    #[test]
    fn account_names() {
        assert_eq!(
            normalize_account("Alice@localhost", "localhost").unwrap(),
            "alice@localhost"
        );
        for bad in [
            "alice",
            "alice@other",
            "a b@localhost",
            "@localhost",
            "a/b@localhost",
        ] {
            assert!(normalize_account(bad, "localhost").is_err(), "{bad}");
        }
    }
}
