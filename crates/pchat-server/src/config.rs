//! Typed configuration (`pchat.toml`), its defaults, and the commented default file written on
//! first start. Every bound the server enforces lives here, with its unit last in the name.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The XMPP domain users live in.
    pub domain: String,
    /// The MUC service JID; empty means `conference.<domain>`.
    pub muc_service: String,
    /// Address the listeners bind to.
    pub bind_addr: String,
    /// Client-to-server port with STARTTLS required (RFC 6120).
    pub c2s_port: u16,
    /// Client-to-server port with TLS from the first byte (XEP-0368).
    pub c2s_tls_port: u16,
    /// HTTP port serving XMPP over WebSocket (RFC 7395) at `/xmpp-websocket`.
    pub http_port: u16,
    /// TLS on the HTTP port (`wss://`, `https://`) with the client ports' certificate. Off
    /// only behind a reverse proxy that terminates TLS for the clients.
    pub http_tls: bool,
    /// Bounds.
    pub limits: Limits,
    /// Room defaults and service rules.
    pub rooms: Rooms,
    /// Store tuning.
    pub store: StoreConfig,
}

/// Bounds on what clients can make the server hold.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest stanza accepted, in bytes on the wire.
    pub stanza_bytes_max: usize,
    /// Stanzas queued for one client before it is disconnected as too slow.
    pub session_queue_stanzas_max: usize,
    /// Concurrent client connections (a process may hold at most 20,000 files here).
    pub sessions_max: usize,
    /// Stanzas queued for one room before senders get a `wait` error.
    pub room_mailbox_stanzas_max: usize,
    /// Inputs a room handles in one batch (one group commit).
    pub room_batch_stanzas_max: usize,
    /// Failed logins per account or per address within the window before refusing.
    pub auth_failures_max: u32,
    /// Window for counting failed logins, in seconds.
    pub auth_failure_window_s: u64,
    /// Time a client has to finish authentication, in seconds.
    pub auth_timeout_s: u64,
    /// Time to finish the MUC shutdown and flush the store on SIGTERM, in milliseconds.
    pub shutdown_timeout_ms: u64,
}

/// Who may create rooms.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RoomCreation {
    /// Any local user.
    Anyone,
    /// Only service admins.
    Admins,
}

/// Room defaults and service rules.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Rooms {
    /// History sent on join when the client does not ask (Lync DefaultChatHistory).
    pub history_stanzas_default: u32,
    /// Most history a client may ask for on join.
    pub history_stanzas_max: u32,
    /// Occupants per room.
    pub occupants_max: u32,
    /// Who may create rooms.
    pub creation: RoomCreation,
    /// New rooms are members-only (Lync's default "Closed" rooms).
    pub members_only_default: bool,
    /// New rooms are listed publicly.
    pub public_default: bool,
    /// Service administrators (bare JIDs): may create rooms when creation is `admins`.
    pub admins: Vec<String>,
}

/// Store tuning.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Writes grouped into one commit at most.
    pub group_commit_max_writes: usize,
    /// Read connections to the SQLite files.
    pub read_connections: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domain: "localhost".into(),
            muc_service: String::new(),
            bind_addr: "0.0.0.0".into(),
            c2s_port: 5222,
            c2s_tls_port: 5223,
            http_port: 5280,
            http_tls: true,
            limits: Limits::default(),
            rooms: Rooms::default(),
            store: StoreConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            stanza_bytes_max: 256 * 1024,
            session_queue_stanzas_max: 4096,
            sessions_max: 19_000,
            room_mailbox_stanzas_max: 4096,
            room_batch_stanzas_max: 256,
            auth_failures_max: 5,
            auth_failure_window_s: 60,
            auth_timeout_s: 30,
            shutdown_timeout_ms: 5000,
        }
    }
}

impl Default for Rooms {
    fn default() -> Self {
        Rooms {
            history_stanzas_default: 30,
            history_stanzas_max: 500,
            occupants_max: 20_000,
            creation: RoomCreation::Anyone,
            members_only_default: false,
            public_default: true,
            admins: Vec::new(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            group_commit_max_writes: 1024,
            read_connections: 4,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
}

impl Config {
    /// The MUC service JID.
    pub fn muc_jid(&self) -> String {
        if self.muc_service.is_empty() {
            format!("conference.{}", self.domain)
        } else {
            self.muc_service.clone()
        }
    }

    /// Checks values that TOML types cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.domain.is_empty() || self.domain.contains(['@', '/', ' ']) {
            return Err(format!(
                "domain `{}` is not a valid XMPP domain",
                self.domain
            ));
        }
        if !(1..=500).contains(&self.rooms.history_stanzas_default) {
            return Err("rooms.history_stanzas_default must be 1 to 500 (Lync's range)".into());
        }
        if self.limits.stanza_bytes_max < 4096 {
            return Err("limits.stanza_bytes_max must be at least 4096".into());
        }
        if self.limits.sessions_max == 0 || self.limits.room_batch_stanzas_max == 0 {
            return Err(
                "limits.sessions_max and limits.room_batch_stanzas_max must be positive".into(),
            );
        }
        Ok(())
    }

    /// Loads `path`, or writes the commented default there when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Invalid {
                path: path.to_owned(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(path, default_file()).map_err(|source| ConfigError::Io {
                    path: path.to_owned(),
                    source,
                })?;
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

/// The default configuration file, every setting written out with its default and a comment.
pub fn default_file() -> String {
    let d = Config::default();
    let l = &d.limits;
    let r = &d.rooms;
    let s = &d.store;
    format!(
        r#"# pchat configuration. Every setting is shown with its default value.
# Command-line flags (--domain, --c2s-port, ...) override what is set here.

# The XMPP domain of user accounts (alice@DOMAIN).
domain = "{domain}"
# The multi-user chat service; empty means "conference.<domain>".
muc_service = ""
# Address the listeners bind to ("127.0.0.1" to accept local clients only).
bind_addr = "{bind}"
# Client port, STARTTLS required before authentication (RFC 6120).
c2s_port = {c2s}
# Client port with TLS from the first byte (XEP-0368 direct TLS).
c2s_tls_port = {tls}
# HTTP port; XMPP over WebSocket (RFC 7395) is served at /xmpp-websocket.
http_port = {http}
# TLS on the HTTP port (wss:// and https://) with the certificate of the client ports.
# Set it to false only behind a reverse proxy that terminates TLS for the clients and
# forwards plain ws:// to pchat: without TLS passwords would cross the network readable,
# so over plain ws:// the server does not offer SASL PLAIN.
http_tls = {http_tls}

[limits]
# Largest stanza accepted, in bytes; larger ones close the stream with policy-violation.
stanza_bytes_max = {sbm}
# Stanzas queued for one client before it is disconnected as too slow.
session_queue_stanzas_max = {sq}
# Concurrent client connections.
sessions_max = {sm}
# Stanzas queued for one room before senders get a "wait" error.
room_mailbox_stanzas_max = {rm}
# Inputs one room handles per batch (one group commit).
room_batch_stanzas_max = {rb}
# Failed logins per account or per address within the window before logins are refused.
auth_failures_max = {afm}
auth_failure_window_s = {afw}
# Seconds a client has to finish authentication.
auth_timeout_s = {ats}
# Milliseconds allowed for a clean shutdown on SIGTERM.
shutdown_timeout_ms = {stm}

[rooms]
# Messages sent on join when the client does not ask (Lync DefaultChatHistory, 1-500).
history_stanzas_default = {hsd}
# Most history a client may fetch on join.
history_stanzas_max = {hsm}
# Occupants per room.
occupants_max = {om}
# Who may create rooms: "anyone" (any local user) or "admins".
creation = "anyone"
# New rooms are members-only ("Closed" in Lync terms).
members_only_default = {mod_}
# New rooms are listed in the service's room list.
public_default = {pd}
# Service administrators (bare JIDs).
admins = []

[store]
# Most writes grouped into one durable commit.
group_commit_max_writes = {gc}
# Read connections to the SQLite files.
read_connections = {rc}
"#,
        domain = d.domain,
        bind = d.bind_addr,
        c2s = d.c2s_port,
        tls = d.c2s_tls_port,
        http = d.http_port,
        http_tls = d.http_tls,
        sbm = l.stanza_bytes_max,
        sq = l.session_queue_stanzas_max,
        sm = l.sessions_max,
        rm = l.room_mailbox_stanzas_max,
        rb = l.room_batch_stanzas_max,
        afm = l.auth_failures_max,
        afw = l.auth_failure_window_s,
        ats = l.auth_timeout_s,
        stm = l.shutdown_timeout_ms,
        hsd = r.history_stanzas_default,
        hsm = r.history_stanzas_max,
        om = r.occupants_max,
        mod_ = r.members_only_default,
        pd = r.public_default,
        gc = s.group_commit_max_writes,
        rc = s.read_connections,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_to_defaults() {
        let parsed: Config = toml::from_str(&default_file()).unwrap();
        assert_eq!(parsed, Config::default());
        assert!(parsed.validate().is_ok());
    }

    #[test]
    fn http_tls_is_on_unless_turned_off() {
        assert!(Config::default().http_tls);
        assert!(default_file().contains("\nhttp_tls = true\n"));
        let plain: Config = toml::from_str("http_tls = false\n").unwrap();
        assert!(!plain.http_tls);
        assert_eq!(plain.http_port, 5280);
    }

    #[test]
    fn unknown_keys_are_refused_with_position() {
        let err = toml::from_str::<Config>("domian = 'x'\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("domian") && err.contains("line 1"), "{err}");
    }
}
