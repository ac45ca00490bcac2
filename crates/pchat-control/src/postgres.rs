//! The pool's PostgreSQL roles, where their passwords live, and how every client of an
//! instance names and reaches it.
//!
//! | role | who connects with it | may | password in etcd |
//! |---|---|---|---|
//! | `pchat_server` | the pool's servers, the shell's `--in-pool` commands | DML on the tables of `mgc`/`mgccomp` | [`PgRole::Server`]: `/pchat/secrets/P/postgres/server` |
//! | `pchat_replication` | mirrors (streaming), `pg_basebackup` of a clone | replication only | [`PgRole::Replication`]: `/pchat/secrets/P/postgres/replication` |
//!
//! The superuser `postgres` has no password at all: only the OS users `postgres` and root
//! (the agent) reach it, over the unix socket (`peer`).
//!
//! Passwords are made by the shell (`db install`, `db mirror add`, `db log-shipping configure`,
//! `db rotate-password`): 32 random bytes, URL-safe base64, safe in a connection string
//! and a passfile. Every client of an instance over TCP connects to [`Endpoint::hostaddr`] and
//! verifies the instance's certificate against [`Endpoint::tls_name`], the name the
//! topology gives it (`I.POOL.pchat`): an address planted in etcd or DNS can only lead to a
//! refused handshake, never to another instance that would collect the password.

use std::net::{IpAddr, ToSocketAddrs as _};

use serde::{Deserialize, Serialize};

use crate::etcd::{Etcd, EtcdError};
use crate::identities::Who;
use crate::keys;
use crate::topology::Database;

/// A role of the pool's PostgreSQL instances that has a password.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgRole {
    /// `pchat_server`: the servers and the shell.
    Server,
    /// `pchat_replication`: mirrors and clones.
    Replication,
}

impl PgRole {
    /// The role's name in PostgreSQL.
    pub fn name(self) -> &'static str {
        match self {
            PgRole::Server => "pchat_server",
            PgRole::Replication => "pchat_replication",
        }
    }

    /// Its word on the command line and in etcd (`server`, `replication`).
    pub fn word(self) -> &'static str {
        match self {
            PgRole::Server => "server",
            PgRole::Replication => "replication",
        }
    }

    /// `server` or `replication`.
    pub fn parse(s: &str) -> Option<PgRole> {
        match s {
            "server" => Some(PgRole::Server),
            "replication" => Some(PgRole::Replication),
            _ => None,
        }
    }
}

/// The role's current password, if one was made.
pub async fn read_password(
    etcd: &Etcd,
    pool: &str,
    role: PgRole,
) -> Result<Option<String>, EtcdError> {
    let Some(kv) = etcd
        .get(&keys::postgres_password(pool, role.word()))
        .await?
    else {
        return Ok(None);
    };
    let text = String::from_utf8(kv.value)
        .map_err(|_| EtcdError::Protocol(format!("the {} password is not UTF-8", role.name())))?;
    let pw = text.trim();
    Ok((!pw.is_empty()).then(|| pw.to_owned()))
}

/// The role's password: the one in etcd, or a new one stored there now (`true`: made now).
/// Two shells doing this at once agree on one password (etcd create-if-absent).
pub async fn ensure_password(
    etcd: &Etcd,
    pool: &str,
    role: PgRole,
) -> Result<(String, bool), EtcdError> {
    if let Some(pw) = read_password(etcd, pool, role).await? {
        return Ok((pw, false));
    }
    let pw = pchat_tls::fs::random_secret();
    let key = keys::postgres_password(pool, role.word());
    if etcd
        .put_if_absent(&key, pw.as_bytes(), None)
        .await?
        .is_some()
    {
        return Ok((pw, true));
    }
    // Somebody else made one first: theirs it is.
    match read_password(etcd, pool, role).await? {
        Some(pw) => Ok((pw, false)),
        None => Err(EtcdError::Protocol(format!(
            "the {} password vanished from etcd while it was being made",
            role.name()
        ))),
    }
}

/// Stores a new password for the role (after the principal took it: `rotate-password`).
pub async fn write_password(
    etcd: &Etcd,
    pool: &str,
    role: PgRole,
    password: &str,
) -> Result<(), EtcdError> {
    etcd.put(
        &keys::postgres_password(pool, role.word()),
        password.as_bytes(),
    )
    .await
    .map(drop)
}

/// Where and how a client reaches one instance's PostgreSQL over TCP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The name its certificate must carry: `I.POOL.pchat` (libpq's and tokio-postgres's
    /// `host`, which they verify with `sslmode=verify-full`).
    pub tls_name: String,
    /// The address dialled (`hostaddr`): the topology's address, resolved when it is a name.
    pub hostaddr: IpAddr,
    /// The port.
    pub port: u16,
}

impl Endpoint {
    /// The connection-string words that say where to go: `host=… hostaddr=… port=…` with
    /// TLS (the host is the pinned name), `host=IP port=…` without.
    pub fn conn_words(&self, tls: bool) -> String {
        if tls {
            format!(
                "host={} hostaddr={} port={}",
                self.tls_name, self.hostaddr, self.port
            )
        } else {
            format!("host={} port={}", self.hostaddr, self.port)
        }
    }
}

/// Resolves `host:port` (a name is looked up; IPv6 may be bracketed).
pub fn resolve(address: &str) -> Result<(IpAddr, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("address `{address}` is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("address `{address}`: `{port}` is not a port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((ip, port));
    }
    let ip = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
        .map(|a| a.ip())
        .next()
        .ok_or_else(|| format!("`{host}` resolves to no address"))?;
    Ok((ip, port))
}

/// Where the topology's instance `db` of pool `pool` is, and the name it must prove.
pub fn endpoint(pool: &str, db: &Database) -> Result<Endpoint, String> {
    let (hostaddr, port) = resolve(&db.address)?;
    Ok(Endpoint {
        tls_name: Who::Instance(db.name.clone()).tls_name(pool),
        hostaddr,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_pin_the_instance_name_and_dial_the_address() {
        let db = Database {
            name: "a_db".into(),
            address: "127.0.0.1:5433".into(),
            agent: "https://127.0.0.1:7070".into(),
        };
        let e = endpoint("pc1", &db).unwrap();
        assert_eq!(e.tls_name, "a_db.pc1.pchat");
        assert_eq!(
            e.conn_words(true),
            "host=a_db.pc1.pchat hostaddr=127.0.0.1 port=5433"
        );
        assert_eq!(e.conn_words(false), "host=127.0.0.1 port=5433");
        assert_eq!(resolve("[::1]:5432").unwrap().0.to_string(), "::1");
        assert_eq!(resolve("localhost:5432").unwrap().1, 5432);
        for bad in ["nohost", "h:port", "h:99999"] {
            assert!(resolve(bad).is_err(), "{bad}");
        }
        for (w, r) in [
            ("server", PgRole::Server),
            ("replication", PgRole::Replication),
        ] {
            assert_eq!(PgRole::parse(w), Some(r));
            assert_eq!(r.word(), w);
        }
        assert_eq!(PgRole::Server.name(), "pchat_server");
        assert_eq!(PgRole::parse("postgres"), None);
    }
}
