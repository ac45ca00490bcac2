//! Accounts: SCRAM credentials from passwords, and account names. (Failed logins are
//! throttled per address in `throttle`.)

use std::net::IpAddr;
use std::time::Instant;

use pchat_room::Timestamp;
use pchat_store::{ScramCredential, UserRecord};
use pchat_xmpp::scram::{self, derive_keys, ScramHash, ScramKeys, ITERATIONS_DEFAULT};

use crate::state::{Serving, State};

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

/// Whether `password` is the one of the account `bare` (normalized): with `auth = "ldap"`
/// the directory's (a bind as the user's entry), otherwise the stored SCRAM-SHA-256 keys (an
/// unknown account's made-up keys cost the same PBKDF2 as a real one's). A wrong password
/// counts against `peer` in the login throttle. `Err` when it cannot be checked now, with a
/// text for the user when there is one. What SASL PLAIN and the HTTP port's Basic
/// authentication both check.
pub async fn check_password(
    state: &State,
    serving: &Serving,
    bare: &str,
    password: &str,
    peer: IpAddr,
) -> Result<bool, Option<&'static str>> {
    let ldap = state
        .ldap
        .as_ref()
        .filter(|_| state.config.directory.auth == crate::config::DirectoryAuth::Ldap);
    let ok = if let Some(ldap) = ldap {
        let local = bare.split_once('@').map_or(bare, |(l, _)| l);
        match ldap.verify(local, password).await {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(error = %e, "a password could not be checked against the directory");
                return Err(Some("the directory cannot be reached; retry shortly"));
            }
        }
    } else {
        let secret = serving.server_secret().await.map_err(|_| None)?;
        let user = serving.store.user_get(bare).await.map_err(|_| None)?;
        let keys = user.map(|u| keys_of(&u, ScramHash::Sha256));
        let credentials = scram::Credentials::of(ScramHash::Sha256, keys, secret, bare);
        scram::verify_plain(ScramHash::Sha256, &credentials, password)
    };
    if !ok {
        state.throttle.failed(peer, Instant::now());
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

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
