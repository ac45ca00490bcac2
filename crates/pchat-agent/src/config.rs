//! The agent's configuration file (TOML). Everything the agent needs to own one PostgreSQL
//! instance, and nothing it could guess wrong: a missing identity is an error, not a default.
//!
//! ```toml
//! listen = "127.0.0.1:7070"          # the agent's API (HTTPS with tls_dir)
//! pg_bin_dir = "/usr/lib/postgresql/15/bin"
//! data_dir = "/var/lib/pchat/pg"
//! port = 5432
//! listen_addresses = "127.0.0.1"     # PostgreSQL's listen_addresses
//! socket_dir = "/var/run/postgresql"
//! os_user = "postgres"
//! trusted_networks = ["127.0.0.1/32"]
//! etcd = ["https://127.0.0.1:2379"]
//! tls_dir = "/etc/pchat/pki/instances/a_db"   # its identity (`pchat pki issue`)
//! # insecure = true                 # instead of tls_dir: plaintext, insecure pools only,
//! # token_file = "/etc/pchat/agent.token"     # with the pool's shared token (0600)
//! pool = "pc1"
//! instance = "a_db"
//! leader_ttl_s = 5                   # the principal's leader lease (automatic failover)
//! auto_failover = true               # a mirror promotes itself when that lease expires
//! mirror_loss_timeout_s = 10         # a principal whose mirror is gone this long runs exposed
//! postgres_query_timeout_ms = 1000   # one status query or health probe; past it PostgreSQL has not answered
//! postgres_hung_timeout_ms = 2000    # a principal whose PostgreSQL answers nothing (or writes nothing) this long gives up its lease
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::AgentError;

/// A validated agent configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Address of the API. Loopback unless the agent must be reached from other hosts.
    pub listen: SocketAddr,
    /// An insecure pool's shared token (from `token_file`): every request must carry it, and
    /// the agent sends it to the other agents. `None` with an identity (HTTPS, no token).
    pub token: Option<String>,
    /// Directory of `initdb`, `pg_ctl`, `pg_basebackup`, `pg_controldata`.
    pub pg_bin_dir: PathBuf,
    /// PGDATA.
    pub data_dir: PathBuf,
    /// PostgreSQL's port.
    pub port: u16,
    /// PostgreSQL's `listen_addresses`.
    pub listen_addresses: String,
    /// Directory of PostgreSQL's unix socket; the agent connects through it.
    pub socket_dir: PathBuf,
    /// PostgreSQL's server log (`pg_ctl -l`).
    pub log_file: PathBuf,
    /// The OS user PostgreSQL runs as; every PostgreSQL tool runs as this user.
    pub os_user: String,
    /// Networks whose clients may connect over TCP: the servers' role to `mgc`/`mgccomp`
    /// and the replication role, each with its password (`scram-sha-256` in `pg_hba.conf`,
    /// `hostssl` with TLS).
    pub trusted_networks: Vec<String>,
    /// etcd endpoints; empty: no control plane (no fencing, no published status).
    pub etcd: Vec<String>,
    /// The instance's identity (`pchat pki issue`: `PKI/instances/NAME`): PostgreSQL serves
    /// its certificate (`ssl = on`, TCP only over TLS), the instance verifies a principal it
    /// copies or streams from against the pool's CA and that principal's name, and the agent
    /// reaches etcd over TLS as its own etcd user (`agent-NAME`). `None` only with `insecure`.
    pub tls_dir: Option<PathBuf>,
    /// No identity: plaintext on the pool's connections (PostgreSQL still with passwords,
    /// never `trust`), for a pool whose topology says `insecure = true`. Exactly one of
    /// `tls_dir` and `insecure` is set, so plaintext is always a written choice.
    pub insecure: bool,
    /// The pool.
    pub pool: String,
    /// This instance's name: its `application_name` as a standby, its key in etcd.
    pub instance: String,
    /// Start PostgreSQL when the agent starts (if initialised and not fenced).
    pub start_on_boot: bool,
    /// How often the agent publishes its status to etcd.
    pub publish_interval_ms: u64,
    /// Most WAL a principal keeps for an absent mirror (`max_slot_wal_keep_size`), so a dead
    /// mirror cannot fill the principal's disk; past it the mirror must be cloned again.
    pub slot_wal_keep_mb: u64,
    /// TTL of the leader lease the principal's agent holds while its pair runs with safety
    /// FULL (renewed every third of it). It bounds how fast a dead principal is noticed.
    pub leader_ttl_s: u64,
    /// While a mirror: promote it when the principal's leader lease expires and the
    /// principal last reported SYNCHRONIZED (see [`crate::leader`]).
    pub auto_failover: bool,
    /// While a principal with its leader lease (so with the quorum): when its synchronous
    /// mirror has been gone this long, commits stop waiting for it and the site runs
    /// SUSPENDED ("exposed", SQL Server's behaviour after its partner timeout) until the
    /// mirror is back and caught up. 0: commits wait for the mirror however long it takes.
    pub mirror_loss_timeout_s: u64,
    /// Longest one status query or health probe of the local PostgreSQL may take, in
    /// milliseconds (connection included). A hung server (frozen, its disk stalled)
    /// answers nothing and cancels nothing itself; past this the agent reports it as not
    /// answering instead of waiting, so its API and its leader loop never hang with it.
    pub postgres_query_timeout_ms: u64,
    /// While the principal holding the leader lease: how long its running PostgreSQL may
    /// answer no health probe at all — or, answering, complete none of the writes its
    /// sessions wait on (a storage stall), or have less than `DISK_FULL_BELOW` available
    /// under its data directory (a full disk) — before the agent takes it for hung, gives up
    /// the lease (so the synchronized mirror takes over at once) and fences it, in
    /// milliseconds.
    pub postgres_hung_timeout_ms: u64,
    /// Where `/metrics` (Prometheus text) is served, plain HTTP: loopback by default, for a
    /// Prometheus on the same host or a scrape through a tunnel; never the API's port.
    /// `None` (`metrics_listen = ""`): not served.
    pub metrics_listen: Option<SocketAddr>,
}

/// The default `metrics_listen`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9282";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: String,
    token: Option<String>,
    token_file: Option<PathBuf>,
    #[serde(default = "default_bin")]
    pg_bin_dir: PathBuf,
    data_dir: PathBuf,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_listen_addresses")]
    listen_addresses: String,
    #[serde(default = "default_socket_dir")]
    socket_dir: PathBuf,
    log_file: Option<PathBuf>,
    #[serde(default = "default_user")]
    os_user: String,
    #[serde(default = "default_networks")]
    trusted_networks: Vec<String>,
    #[serde(default)]
    etcd: Vec<String>,
    tls_dir: Option<PathBuf>,
    #[serde(default)]
    insecure: bool,
    pool: String,
    instance: String,
    #[serde(default = "default_true")]
    start_on_boot: bool,
    #[serde(default = "default_publish")]
    publish_interval_ms: u64,
    #[serde(default = "default_keep")]
    slot_wal_keep_mb: u64,
    #[serde(default = "default_leader_ttl")]
    leader_ttl_s: u64,
    #[serde(default = "default_true")]
    auto_failover: bool,
    #[serde(default = "default_mirror_loss")]
    mirror_loss_timeout_s: u64,
    #[serde(default = "default_query_timeout")]
    postgres_query_timeout_ms: u64,
    #[serde(default = "default_hung_timeout")]
    postgres_hung_timeout_ms: u64,
    #[serde(default = "default_metrics_listen")]
    metrics_listen: String,
}

fn default_metrics_listen() -> String {
    DEFAULT_METRICS_LISTEN.into()
}

fn default_query_timeout() -> u64 {
    1_000
}

fn default_hung_timeout() -> u64 {
    2_000
}

fn default_mirror_loss() -> u64 {
    10
}

fn default_bin() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}
fn default_port() -> u16 {
    5432
}
fn default_listen_addresses() -> String {
    "127.0.0.1".into()
}
fn default_socket_dir() -> PathBuf {
    PathBuf::from("/var/run/postgresql")
}
fn default_user() -> String {
    "postgres".into()
}
fn default_networks() -> Vec<String> {
    vec!["127.0.0.1/32".into()]
}
fn default_true() -> bool {
    true
}
fn default_publish() -> u64 {
    1_000
}
fn default_keep() -> u64 {
    1_024
}
fn default_leader_ttl() -> u64 {
    5
}

/// Names that go into SQL identifiers, file names and etcd keys unquoted.
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl AgentConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<AgentConfig, AgentError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<AgentConfig, AgentError> {
        let raw: Raw = toml::from_str(text).map_err(|e| AgentError::Config(e.to_string()))?;
        if raw.token.is_some() {
            return Err(AgentError::Config(
                "`token` in the configuration is not read: an agent with an identity (tls_dir) uses no token, and an insecure pool's token goes in a file of its own, mode 0600 (`pchat agent token FILE` writes one; set `token_file = \"FILE\"`)".into(),
            ));
        }
        let listen: SocketAddr = raw.listen.parse().map_err(|_| {
            AgentError::Config(format!(
                "listen `{}` must be ip:port, e.g. 127.0.0.1:7070",
                raw.listen
            ))
        })?;
        if !valid_name(&raw.instance) {
            return Err(AgentError::Config(format!(
                "instance `{}` must be 1-63 characters of a-z, 0-9 and _, starting with a letter (it becomes the standby's application_name)",
                raw.instance
            )));
        }
        if raw.pool.is_empty() || raw.pool.contains('/') {
            return Err(AgentError::Config(format!(
                "pool `{}` must be a pool name",
                raw.pool
            )));
        }
        let data_parent = raw.data_dir.parent().map(Path::to_path_buf);
        for (what, p) in [
            ("data_dir", Some(&raw.data_dir)),
            ("socket_dir", Some(&raw.socket_dir)),
            ("pg_bin_dir", Some(&raw.pg_bin_dir)),
            ("tls_dir", raw.tls_dir.as_ref()),
            ("data_dir's parent", data_parent.as_ref()),
        ]
        .into_iter()
        .filter_map(|(w, p)| Some((w, p?)))
        {
            // These go into pg_ctl's option string, libpq connection strings and pg_hba-style
            // files: keep them plain.
            let s = p.to_string_lossy();
            if !p.is_absolute() || s.contains(['\'', '"', '\n', ' ', '\\']) {
                return Err(AgentError::Config(format!(
                    "{what} `{s}` must be an absolute path without quotes or spaces"
                )));
            }
        }
        if raw.listen_addresses.contains(['\'', '"', '\n']) {
            return Err(AgentError::Config(
                "listen_addresses must not contain quotes".into(),
            ));
        }
        for n in &raw.trusted_networks {
            if !n.contains('/') || n.contains(char::is_whitespace) {
                return Err(AgentError::Config(format!(
                    "trusted network `{n}` must be an address/prefix, e.g. 10.0.0.0/24"
                )));
            }
        }
        for e in &raw.etcd {
            if !e.starts_with("http://") && !e.starts_with("https://") {
                return Err(AgentError::Config(format!(
                    "etcd endpoint `{e}` must be an http(s):// URL"
                )));
            }
        }
        match (&raw.tls_dir, raw.insecure) {
            (Some(_), true) => {
                return Err(AgentError::Config(
                    "give either tls_dir or insecure = true, not both".into(),
                ))
            }
            (None, false) => {
                return Err(AgentError::Config(format!(
                    "no identity: set `tls_dir = \"…/instances/{}\"` (the directory `pchat pki issue` made for this instance), or `insecure = true` for a throw-away lab whose pool's topology is insecure",
                    raw.instance
                )))
            }
            (Some(d), false) if !d.is_absolute() => {
                return Err(AgentError::Config(format!(
                    "tls_dir `{}` must be an absolute path",
                    d.display()
                )))
            }
            _ => {}
        }
        let token = match (&raw.token_file, raw.insecure) {
            (Some(f), true) => {
                let token = pchat_tls::fs::read_secret(f).map_err(|e| {
                    AgentError::Config(format!(
                        "token_file: {e} (`pchat agent token FILE` writes a new token, mode 0600)"
                    ))
                })?;
                // A short token can be guessed over the network; the agent can wipe a database.
                if token.len() < 16 || token.chars().any(char::is_whitespace) {
                    return Err(AgentError::Config(format!(
                        "the token in {} must be at least 16 characters without spaces (`pchat agent token FILE` writes one)",
                        f.display()
                    )));
                }
                Some(token)
            }
            (None, true) => {
                return Err(AgentError::Config(
                    "insecure = true needs the pool's shared token: set `token_file` to a file of mode 0600 holding it (`pchat agent token FILE` writes one)".into(),
                ))
            }
            (Some(_), false) => {
                return Err(AgentError::Config(
                    "token_file is for an insecure pool only: an agent with an identity (tls_dir) serves HTTPS and takes callers by their certificates; remove token_file".into(),
                ))
            }
            (None, false) => None,
        };
        let metrics_listen = match raw.metrics_listen.trim() {
            "" => None,
            a => Some(a.parse::<SocketAddr>().map_err(|_| {
                AgentError::Config(format!(
                    "metrics_listen `{a}` must be ip:port (e.g. {DEFAULT_METRICS_LISTEN}), or \"\" for no /metrics"
                ))
            })?),
        };
        if metrics_listen.is_some_and(|m| m == listen) {
            return Err(AgentError::Config(format!(
                "metrics_listen {listen} is the API's address: give /metrics an address of its own (e.g. {DEFAULT_METRICS_LISTEN})"
            )));
        }
        let log_file = raw.log_file.unwrap_or_else(|| {
            let mut s = raw.data_dir.clone().into_os_string();
            s.push(".log");
            PathBuf::from(s)
        });
        if !(2..=60).contains(&raw.leader_ttl_s) {
            return Err(AgentError::Config(format!(
                "leader_ttl_s = {} must be 2 to 60 seconds",
                raw.leader_ttl_s
            )));
        }
        if !(100..=60_000).contains(&raw.postgres_query_timeout_ms) {
            return Err(AgentError::Config(format!(
                "postgres_query_timeout_ms = {} must be 100 to 60000",
                raw.postgres_query_timeout_ms
            )));
        }
        // Below one probe's own deadline a slow answer would already count as a hang; above
        // the lease's TTL the lease would expire first and the hang would not be the reason.
        if raw.postgres_hung_timeout_ms < raw.postgres_query_timeout_ms
            || raw.postgres_hung_timeout_ms > raw.leader_ttl_s * 1_000
        {
            return Err(AgentError::Config(format!(
                "postgres_hung_timeout_ms = {} must be between postgres_query_timeout_ms ({}) and leader_ttl_s ({} s)",
                raw.postgres_hung_timeout_ms, raw.postgres_query_timeout_ms, raw.leader_ttl_s
            )));
        }
        Ok(AgentConfig {
            listen,
            token,
            pg_bin_dir: raw.pg_bin_dir,
            data_dir: raw.data_dir,
            port: raw.port,
            listen_addresses: raw.listen_addresses,
            socket_dir: raw.socket_dir,
            log_file,
            os_user: raw.os_user,
            trusted_networks: raw.trusted_networks,
            etcd: raw.etcd,
            tls_dir: raw.tls_dir,
            insecure: raw.insecure,
            pool: raw.pool,
            instance: raw.instance,
            start_on_boot: raw.start_on_boot,
            publish_interval_ms: raw.publish_interval_ms.max(100),
            slot_wal_keep_mb: raw.slot_wal_keep_mb,
            leader_ttl_s: raw.leader_ttl_s,
            auto_failover: raw.auto_failover,
            mirror_loss_timeout_s: raw.mirror_loss_timeout_s,
            postgres_query_timeout_ms: raw.postgres_query_timeout_ms,
            postgres_hung_timeout_ms: raw.postgres_hung_timeout_ms,
            metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"listen = "127.0.0.1:7070"
data_dir = "/var/lib/pchat/pg"
pool = "pc1"
instance = "a_db"
tls_dir = "/etc/pchat/pki/instances/a_db"
"#;

    #[test]
    fn defaults() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.port, 5432);
        assert_eq!(c.os_user, "postgres");
        assert_eq!(c.log_file, PathBuf::from("/var/lib/pchat/pg.log"));
        assert!(c.etcd.is_empty());
        assert_eq!((c.leader_ttl_s, c.auto_failover), (5, true));
        assert_eq!(
            (c.postgres_query_timeout_ms, c.postgres_hung_timeout_ms),
            (1_000, 2_000)
        );
    }

    fn check(edit: (&str, &str), needle: &str) {
        let text = GOOD.replacen(edit.0, edit.1, 1);
        let err = AgentConfig::parse(&text).expect_err("must be refused");
        assert!(err.to_string().contains(needle), "{needle}: got {err}");
    }

    #[test]
    fn refusals() {
        check(("instance = \"a_db\"", "instance = \"A-db\""), "a-z");
        check(("127.0.0.1:7070", "localhost"), "ip:port");
        check(("/var/lib/pchat/pg", "relative"), "absolute");
        check(
            ("pool = \"pc1\"", "pool = \"pc1\"\nbogus = 1"),
            "unknown field",
        );
        check(
            ("pool = \"pc1\"", "pool = \"pc1\"\nleader_ttl_s = 1"),
            "2 to 60",
        );
        check(
            (
                "pool = \"pc1\"",
                "pool = \"pc1\"\npostgres_query_timeout_ms = 10",
            ),
            "100 to 60000",
        );
        check(
            (
                "pool = \"pc1\"",
                "pool = \"pc1\"\npostgres_hung_timeout_ms = 6000",
            ),
            "leader_ttl_s",
        );
        // Exactly one of an identity and an explicit insecure.
        check(
            ("tls_dir = \"/etc/pchat/pki/instances/a_db\"\n", ""),
            "no identity",
        );
        check(
            ("pool = \"pc1\"", "pool = \"pc1\"\ninsecure = true"),
            "not both",
        );
        check(
            ("\"/etc/pchat/pki/instances/a_db\"", "\"pki/a_db\""),
            "absolute",
        );
    }

    /// A token is read only from a file of its own, only in an insecure pool, and only when
    /// nobody else may read it; an agent with an identity takes none.
    #[test]
    fn tokens() {
        assert_eq!(AgentConfig::parse(GOOD).unwrap().token, None);
        check(
            (
                "pool = \"pc1\"",
                "pool = \"pc1\"\ntoken = \"0123456789abcdef0123\"",
            ),
            "is not read",
        );
        check(
            (
                "pool = \"pc1\"",
                "pool = \"pc1\"\ntoken_file = \"/etc/pchat/agent.token\"",
            ),
            "insecure pool only",
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.token");
        let plain = |file: &std::path::Path| {
            GOOD.replace(
                "tls_dir = \"/etc/pchat/pki/instances/a_db\"",
                &format!("insecure = true\ntoken_file = \"{}\"", file.display()),
            )
        };
        let no_file = GOOD.replace(
            "tls_dir = \"/etc/pchat/pki/instances/a_db\"",
            "insecure = true",
        );
        let err = AgentConfig::parse(&no_file).unwrap_err().to_string();
        assert!(err.contains("token_file"), "{err}");
        pchat_tls::fs::write_private(&file, b"short\n").unwrap();
        let err = AgentConfig::parse(&plain(&file)).unwrap_err().to_string();
        assert!(err.contains("at least 16"), "{err}");
        pchat_tls::fs::write_file(&file, b"0123456789abcdef0123\n", 0o644).unwrap();
        let err = AgentConfig::parse(&plain(&file)).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        pchat_tls::fs::write_private(&file, b"0123456789abcdef0123\n").unwrap();
        let c = AgentConfig::parse(&plain(&file)).unwrap();
        assert!(c.insecure && c.tls_dir.is_none());
        assert_eq!(c.token.as_deref(), Some("0123456789abcdef0123"));
    }
}
