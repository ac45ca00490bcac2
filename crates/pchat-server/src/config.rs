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
    /// Client addresses from a PROXY protocol header (behind a load balancer or TLS proxy).
    pub proxy_protocol: ProxyProtocol,
    /// Pool mode: what the server publishes of what it acknowledged (a DR failover's loss
    /// bounds).
    pub marks: MarksConfig,
    /// An external LDAP/AD directory: its groups and OUs as principals, and optionally its
    /// passwords for logins.
    pub directory: DirectoryConfig,
    /// The built-in compliance export job (Lync's compliance service and XmlAdapter).
    pub compliance: ComplianceConfig,
    /// File sharing in rooms (XEP-0363 HTTP upload on the HTTP port; Lync's file upload).
    pub upload: UploadConfig,
    /// Where `/metrics` (Prometheus text format) is served: an admin address, loopback by
    /// default, never the public HTTP port; empty serves none.
    pub metrics_addr: String,
    /// The Converse.js files served at `/` on the HTTP port; empty looks in
    /// `/usr/share/pchat/web/converse` and the checkout's `web/converse`
    /// (`scripts/fetch-converse`).
    pub web_dir: String,
}

/// `[upload]`: the file-sharing service `upload.<domain>` (XEP-0363). Files live in the
/// store, beside the rooms, so every server of a pool serves every file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct UploadConfig {
    /// Offer the service at all.
    pub enabled: bool,
    /// The service's JID; empty means `upload.<domain>`.
    pub service: String,
    /// The base of the URLs handed to clients; empty means `https://<domain>:<http_port>`
    /// (`http://` with `http_tls = false`). Set it behind a proxy or a load balancer.
    pub public_url: String,
    /// Seconds a granted upload slot stays usable.
    pub slot_timeout_s: u64,
    /// Bytes one user may hold in files, in MiB.
    pub user_quota_mb: u64,
    /// Bytes the files shared in one room may take, in MiB.
    pub room_quota_mb: u64,
    /// Uploads one server receives at the same time; more get 503 with Retry-After.
    pub uploads_max: u32,
    /// Milliseconds an upload or download may go without a byte moving before it is dropped.
    pub idle_timeout_ms: u64,
    /// Seconds a file's link works alone (a capability URL: files of open rooms, and an
    /// upload not posted yet); after that the reader signs in (HTTP Basic) as a user who may
    /// read the room (or, for a file never posted, as its owner). 0: links never expire.
    pub link_ttl_s: u64,
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig {
            enabled: true,
            service: String::new(),
            public_url: String::new(),
            slot_timeout_s: 300,
            user_quota_mb: 1024,
            room_quota_mb: 10240,
            uploads_max: 16,
            idle_timeout_ms: 30_000,
            link_ttl_s: 7 * 24 * 3600,
        }
    }
}

impl UploadConfig {
    fn validate(&self) -> Result<(), String> {
        if self.service.contains(['@', '/', ' ']) {
            return Err(format!(
                "upload.service `{}` is not a valid XMPP domain",
                self.service
            ));
        }
        let url = self.public_url.trim_end_matches('/');
        let scheme_ok = url.is_empty() || url.starts_with("https://") || url.starts_with("http://");
        if !scheme_ok || url.contains(['?', '#', ' ', '"', '<', '>']) {
            return Err(format!(
                "upload.public_url `{}`: give an http:// or https:// URL without query or fragment",
                self.public_url
            ));
        }
        if !(10..=86_400).contains(&self.slot_timeout_s) {
            return Err("upload.slot_timeout_s must be 10 to 86400".into());
        }
        if self.user_quota_mb == 0 || self.room_quota_mb == 0 {
            return Err("upload.user_quota_mb and upload.room_quota_mb must be positive".into());
        }
        if !(1..=1024).contains(&self.uploads_max) {
            return Err("upload.uploads_max must be 1 to 1024".into());
        }
        if !(1_000..=600_000).contains(&self.idle_timeout_ms) {
            return Err("upload.idle_timeout_ms must be 1000 to 600000".into());
        }
        Ok(())
    }
}

/// `[compliance]`: the export job every server runs (one at a time per pool: an etcd lease;
/// standalone, a file lock in the data directory). Off while `export_dir` is empty.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ComplianceConfig {
    /// Where files go (a directory this server's user may write); empty: no export job.
    pub export_dir: PathBuf,
    /// Seconds between runs (Lync RunInterval, 15 minutes).
    pub run_interval_s: u64,
    /// `lync-xml` or `jsonl`.
    pub format: String,
    /// One file per room and run (Lync OneChatRoomPerOutputFile).
    pub one_room_per_file: bool,
    /// Hours exported records stay in `mgccomp` before they are purged (0: purged right after
    /// their export, as Lync did).
    pub retention_h: u64,
    /// Records one run exports at most.
    pub records_per_run: u32,
}

impl Default for ComplianceConfig {
    fn default() -> Self {
        ComplianceConfig {
            export_dir: PathBuf::new(),
            run_interval_s: 900,
            format: "lync-xml".into(),
            one_room_per_file: false,
            retention_h: 24,
            records_per_run: crate::compliance::RECORDS_PER_RUN_DEFAULT,
        }
    }
}

impl ComplianceConfig {
    /// Whether the job runs.
    pub fn enabled(&self) -> bool {
        !self.export_dir.as_os_str().is_empty()
    }

    /// Checks the values (also those a pool keeps in etcd).
    pub fn validate(&self) -> Result<(), String> {
        if crate::compliance::Format::parse(&self.format).is_none() {
            return Err(format!(
                "compliance.format `{}`: write \"lync-xml\" or \"jsonl\"",
                self.format
            ));
        }
        if !(1..=86_400).contains(&self.run_interval_s) {
            return Err("compliance.run_interval_s must be 1 to 86400".into());
        }
        if !(1..=1_000_000).contains(&self.records_per_run) {
            return Err("compliance.records_per_run must be 1 to 1000000".into());
        }
        if self.enabled() && !self.export_dir.is_absolute() {
            return Err(format!(
                "compliance.export_dir `{}` must be an absolute path",
                self.export_dir.display()
            ));
        }
        Ok(())
    }
}

/// `[directory]`: an LDAP or Active Directory server (see `ldap.rs`). Off while `url` is
/// empty.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DirectoryConfig {
    /// `ldaps://host[:port]`, or `ldap://host[:port]` (StartTLS is then required); empty:
    /// no directory.
    pub url: String,
    /// PEM file of the CA(s) the directory's certificate chains to.
    pub ca_file: String,
    /// The account pchat reads the directory as.
    pub bind_dn: String,
    /// File holding that account's password (mode 0600, one line).
    pub bind_password_file: String,
    /// Where users and groups are searched (subtree).
    pub base_dn: String,
    /// Which entries are users.
    pub user_filter: String,
    /// The attribute whose value is a user's JID local part (`uid`; `sAMAccountName` on AD).
    pub user_attr: String,
    /// Which entries are groups.
    pub group_filter: String,
    /// The attribute naming a group (`ldap:NAME`).
    pub group_attr: String,
    /// The attribute holding a group's members (their DNs: users or groups).
    pub member_attr: String,
    /// Seconds between readings: the longest a change in the directory takes to apply.
    pub refresh_s: u64,
    /// Milliseconds one directory operation (connect, bind, a search) may take.
    pub timeout_ms: u64,
    /// Users and groups read at most (a bound on memory and on a runaway filter).
    pub entries_max: usize,
    /// How users log in: `local` (their pchat password, SCRAM) or `ldap` (their directory
    /// password, checked by a bind; SASL PLAIN over TLS only, since SCRAM needs a stored
    /// verifier the directory does not give).
    pub auth: DirectoryAuth,
}

/// How users log in.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DirectoryAuth {
    /// pchat's own accounts (SCRAM-SHA-256, SCRAM-SHA-1, PLAIN over TLS).
    #[default]
    Local,
    /// The directory's passwords (PLAIN over TLS, checked by an LDAP bind).
    Ldap,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            url: String::new(),
            ca_file: String::new(),
            bind_dn: String::new(),
            bind_password_file: String::new(),
            base_dn: String::new(),
            user_filter: "(objectClass=inetOrgPerson)".into(),
            user_attr: "uid".into(),
            group_filter: "(objectClass=groupOfNames)".into(),
            group_attr: "cn".into(),
            member_attr: "member".into(),
            refresh_s: 60,
            timeout_ms: 10_000,
            entries_max: 200_000,
            auth: DirectoryAuth::Local,
        }
    }
}

impl DirectoryConfig {
    /// Whether a directory is configured.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            if self.auth == DirectoryAuth::Ldap {
                return Err("directory.auth = \"ldap\" needs directory.url".into());
            }
            return Ok(());
        }
        if !(self.url.starts_with("ldaps://") || self.url.starts_with("ldap://")) {
            return Err(format!(
                "directory.url `{}`: write ldaps://HOST[:PORT] or ldap://HOST[:PORT] (StartTLS)",
                self.url
            ));
        }
        for (name, v) in [
            ("ca_file", &self.ca_file),
            ("bind_dn", &self.bind_dn),
            ("bind_password_file", &self.bind_password_file),
            ("base_dn", &self.base_dn),
            ("user_attr", &self.user_attr),
            ("group_attr", &self.group_attr),
            ("member_attr", &self.member_attr),
        ] {
            if v.trim().is_empty() {
                return Err(format!(
                    "directory.{name} is needed when directory.url is set"
                ));
            }
        }
        for (name, v) in [
            ("user_filter", &self.user_filter),
            ("group_filter", &self.group_filter),
        ] {
            if !(v.starts_with('(') && v.ends_with(')')) {
                return Err(format!(
                    "directory.{name} `{v}` is not an LDAP filter: write it in parentheses, e.g. (objectClass=person)"
                ));
            }
        }
        if !(5..=86_400).contains(&self.refresh_s) {
            return Err("directory.refresh_s must be 5 to 86400".into());
        }
        if !(100..=120_000).contains(&self.timeout_ms) {
            return Err("directory.timeout_ms must be 100 to 120000".into());
        }
        if self.entries_max == 0 {
            return Err("directory.entries_max must be positive".into());
        }
        Ok(())
    }
}

/// Pool mode: the acknowledgment marks a server publishes to etcd
/// (`/pchat/pools/P/servers/S/marks`), from which `pchat pool failover` bounds what a lost
/// site took with it. See `marks.rs`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MarksConfig {
    /// A publication at most this often, and only when something changed (sooner when an
    /// acknowledgment waits for a fresh allowance), in milliseconds.
    pub publish_interval_ms: u64,
    /// A room stays listed this long after its last acknowledgment here, in seconds; then a
    /// guard message covers it. Far longer than log shipping can lag behind unnoticed.
    pub window_s: u64,
    /// Rooms listed at most (about 50 bytes each in the etcd value).
    pub rooms_max: usize,
    /// The least allowance a publication declares: messages acknowledged beyond it before
    /// the next one is visible. It adapts to twice the recent rate; a failover's upper loss
    /// bound includes it.
    pub allowance_messages_min: u64,
    /// How long an acknowledgment waits for a fresh allowance (etcd unreachable) before the
    /// room tries its commit again, in milliseconds.
    pub ack_wait_ms: u64,
}

impl Default for MarksConfig {
    fn default() -> Self {
        MarksConfig {
            // Acknowledgments of the last interval are counted only in the upper bound:
            // shorter tightens the lower one, at one small etcd write per interval.
            publish_interval_ms: 500,
            window_s: 600,
            rooms_max: 20_000,
            allowance_messages_min: 32,
            ack_wait_ms: 5000,
        }
    }
}

/// Bounds on what clients can make the server hold.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest stanza accepted, in bytes on the wire.
    pub stanza_bytes_max: usize,
    /// Stanzas queued for one client before it is disconnected as too slow.
    pub session_queue_stanzas_max: usize,
    /// Bytes (as serialized) queued for one client before it is disconnected as too slow.
    pub session_queue_bytes_max: usize,
    /// Time one write to a client may take before the client is dropped as too slow, in
    /// milliseconds.
    pub write_timeout_ms: u64,
    /// The server pings a bound client that sent nothing for a whole interval of this many
    /// milliseconds (XEP-0199), so after one to two intervals of silence; 0 sends no pings.
    pub ping_interval_ms: u64,
    /// Time a pinged client has to show it is alive (any traffic) before it is dropped, in
    /// milliseconds.
    pub ping_timeout_ms: u64,
    /// Idle time before TCP keepalive probes start on a client connection, in seconds; 0
    /// leaves keepalive off.
    pub tcp_keepalive_idle_s: u64,
    /// Concurrent connections on all client ports together (c2s, direct TLS, HTTP); a
    /// process may hold at most 20,000 files here.
    pub sessions_max: usize,
    /// Concurrent connections from one client address (IPv6: one /64) on all ports together.
    pub connections_per_address_max: usize,
    /// Concurrent bound sessions of one account on this server.
    pub sessions_per_account_max: usize,
    /// Time an HTTP client has to send a request's headers, in milliseconds (idle keep-alive
    /// connections included).
    pub http_header_read_timeout_ms: u64,
    /// Stanzas queued for one room before senders get a `wait` error.
    pub room_mailbox_stanzas_max: usize,
    /// Inputs a room handles in one batch (one group commit).
    pub room_batch_stanzas_max: usize,
    /// Failed logins from one address (IPv6: one /64) before its further attempts are
    /// delayed.
    pub auth_failures_max: u32,
    /// An address's failed logins are forgotten after this long without a new one, in seconds.
    pub auth_failure_window_s: u64,
    /// The delay after the first failure beyond `auth_failures_max`, in milliseconds; it
    /// doubles with every further failure.
    pub auth_delay_first_ms: u64,
    /// The longest delay between attempts from one address, in milliseconds.
    pub auth_delay_max_ms: u64,
    /// Addresses the login throttle remembers; when full, the address with the fewest
    /// failures (the oldest among equals) is forgotten first, so the worst offenders stay.
    pub auth_throttle_addresses_max: usize,
    /// Time a client has to finish authentication, in seconds.
    pub auth_timeout_s: u64,
    /// How long a session that enabled resumption (XEP-0198) waits, rooms and queue kept,
    /// for its client to come back after the connection broke, in seconds; 0 grants no
    /// resumption (stream management's acknowledgments still work).
    pub resume_timeout_s: u64,
    /// Time to finish the MUC shutdown and flush the store on SIGTERM, in milliseconds.
    pub shutdown_timeout_ms: u64,
}

/// PROXY protocol v2 (HAProxy's), per listener: a proxy in front of pchat (a load balancer,
/// a TLS-terminating proxy) tells the client's real address in a header before the stream.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyProtocol {
    /// The STARTTLS client port expects the header.
    pub c2s: bool,
    /// The direct-TLS client port expects the header.
    pub c2s_tls: bool,
    /// The HTTP (WebSocket) port expects the header.
    pub http: bool,
    /// Addresses (`192.0.2.10`) or networks (`192.0.2.0/24`, `2001:db8::/32`) of the proxies
    /// allowed to send the header. A listener that expects it refuses every other peer.
    pub trusted_proxies: Vec<String>,
    /// Time a proxy has to send the header, in milliseconds.
    pub header_timeout_ms: u64,
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
    /// How often the server looks for a changed directory (groups, categories and their
    /// walls), in milliseconds: the longest a wall change takes to apply on this server.
    pub directory_refresh_ms: u64,
}

/// Store tuning.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Writes grouped into one commit at most.
    pub group_commit_max_writes: usize,
    /// Under concurrent load, microseconds the store's writer waits after a group's first
    /// batch for more to join it (0: never); both backends.
    pub group_commit_delay_us: u64,
    /// Read connections to the SQLite files.
    pub read_connections: usize,
    /// Pool mode (PostgreSQL): longest one read, one new connection or the switch to a new
    /// principal may take, in milliseconds, whatever the database does (a frozen one never
    /// ends a statement itself); the call then fails as unavailable and is retried.
    pub pool_query_timeout_ms: u64,
    /// Pool mode: longest one group commit may wait for an answer from the database, in
    /// milliseconds (and six times it in all, while the database answers: a slow link slows
    /// commits, it does not stop them). Past it the rooms waiting for it are told the outcome
    /// is unknown and resend the same writes, which are deduplicated: a hung database holds
    /// no room longer than this.
    pub pool_commit_timeout_ms: u64,
    /// Pool mode: group commits in flight at once, each on sessions of its own (two per
    /// lane). Far from the database a group takes several round trips; with one lane a
    /// message arriving just after a group started waits for all of them first.
    pub pool_writer_lanes: usize,
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
            proxy_protocol: ProxyProtocol::default(),
            marks: MarksConfig::default(),
            directory: DirectoryConfig::default(),
            compliance: ComplianceConfig::default(),
            upload: UploadConfig::default(),
            metrics_addr: "127.0.0.1:9281".into(),
            web_dir: String::new(),
        }
    }
}

impl Default for ProxyProtocol {
    fn default() -> Self {
        ProxyProtocol {
            c2s: false,
            c2s_tls: false,
            http: false,
            trusted_proxies: Vec::new(),
            header_timeout_ms: 5000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            stanza_bytes_max: 256 * 1024,
            session_queue_stanzas_max: 4096,
            session_queue_bytes_max: 4 * 1024 * 1024,
            write_timeout_ms: 30_000,
            ping_interval_ms: 60_000,
            ping_timeout_ms: 30_000,
            tcp_keepalive_idle_s: 60,
            sessions_max: 19_000,
            connections_per_address_max: 1000,
            sessions_per_account_max: 10,
            http_header_read_timeout_ms: 10_000,
            room_mailbox_stanzas_max: 4096,
            room_batch_stanzas_max: 256,
            auth_failures_max: 5,
            auth_failure_window_s: 900,
            auth_delay_first_ms: 1000,
            auth_delay_max_ms: 60_000,
            auth_throttle_addresses_max: 100_000,
            auth_timeout_s: 30,
            resume_timeout_s: 300,
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
            directory_refresh_ms: 1_000,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            group_commit_max_writes: 1024,
            group_commit_delay_us: 4_000,
            read_connections: 4,
            pool_query_timeout_ms: 5_000,
            pool_commit_timeout_ms: 5_000,
            pool_writer_lanes: 3,
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
    /// The file-upload service JID (XEP-0363).
    pub fn upload_jid(&self) -> String {
        if self.upload.service.is_empty() {
            format!("upload.{}", self.domain)
        } else {
            self.upload.service.clone()
        }
    }

    /// The base of upload and download URLs, without a trailing slash.
    pub fn upload_base_url(&self) -> String {
        if self.upload.public_url.is_empty() {
            let scheme = if self.http_tls { "https" } else { "http" };
            format!("{scheme}://{}:{}", self.domain, self.http_port)
        } else {
            self.upload.public_url.trim_end_matches('/').to_owned()
        }
    }

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
        if !self.metrics_addr.is_empty()
            && self.metrics_addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(format!(
                "metrics_addr `{}` is not an address with a port (127.0.0.1:9281), or \"\" for none",
                self.metrics_addr
            ));
        }
        if self.domain.is_empty() || self.domain.contains(['@', '/', ' ']) {
            return Err(format!(
                "domain `{}` is not a valid XMPP domain",
                self.domain
            ));
        }
        if !(1..=500).contains(&self.rooms.history_stanzas_default) {
            return Err("rooms.history_stanzas_default must be 1 to 500 (Lync's range)".into());
        }
        if !(100..=60_000).contains(&self.rooms.directory_refresh_ms) {
            return Err("rooms.directory_refresh_ms must be 100 to 60000".into());
        }
        if self.limits.stanza_bytes_max < 4096 {
            return Err("limits.stanza_bytes_max must be at least 4096".into());
        }
        let l = &self.limits;
        for (name, value) in [
            ("sessions_max", l.sessions_max),
            ("room_batch_stanzas_max", l.room_batch_stanzas_max),
            ("connections_per_address_max", l.connections_per_address_max),
            ("sessions_per_account_max", l.sessions_per_account_max),
            ("auth_throttle_addresses_max", l.auth_throttle_addresses_max),
        ] {
            if value == 0 {
                return Err(format!("limits.{name} must be positive"));
            }
        }
        // A client must be able to receive at least one stanza of the largest size; the
        // counter is 32-bit wide on purpose (no sane queue is 4 GiB).
        if l.session_queue_bytes_max < l.stanza_bytes_max
            || l.session_queue_bytes_max > u32::MAX as usize
        {
            return Err(format!(
                "limits.session_queue_bytes_max must be at least limits.stanza_bytes_max ({}) and below 4 GiB",
                l.stanza_bytes_max
            ));
        }
        for (name, value) in [
            ("write_timeout_ms", l.write_timeout_ms),
            ("ping_timeout_ms", l.ping_timeout_ms),
            ("http_header_read_timeout_ms", l.http_header_read_timeout_ms),
        ] {
            if value == 0 {
                return Err(format!("limits.{name} must be positive"));
            }
        }
        if l.auth_delay_first_ms > l.auth_delay_max_ms {
            return Err(
                "limits.auth_delay_first_ms must not exceed limits.auth_delay_max_ms".into(),
            );
        }
        let p = &self.proxy_protocol;
        let proxies = crate::proxy_protocol::TrustedProxies::parse(&p.trusted_proxies)
            .map_err(|e| format!("proxy_protocol.trusted_proxies: {e}"))?;
        if (p.c2s || p.c2s_tls || p.http) && proxies.is_empty() {
            return Err("proxy_protocol: a listener expects PROXY headers but trusted_proxies is empty; name the proxies' addresses".into());
        }
        if p.header_timeout_ms == 0 {
            return Err("proxy_protocol.header_timeout_ms must be positive".into());
        }
        let m = &self.marks;
        if m.publish_interval_ms == 0 || m.window_s == 0 || m.rooms_max == 0 || m.ack_wait_ms == 0 {
            return Err(
                "marks: publish_interval_ms, window_s, rooms_max and ack_wait_ms must be positive"
                    .into(),
            );
        }
        if m.allowance_messages_min == 0 {
            return Err("marks.allowance_messages_min must be positive: with none, every acknowledgment would wait for etcd".into());
        }
        self.directory.validate()?;
        self.compliance.validate()?;
        self.upload.validate()?;
        for (name, value) in [
            ("pool_query_timeout_ms", self.store.pool_query_timeout_ms),
            ("pool_commit_timeout_ms", self.store.pool_commit_timeout_ms),
        ] {
            // Below that, a healthy database under load would be taken for a hung one.
            if value < 100 {
                return Err(format!("store.{name} must be at least 100"));
            }
        }
        if !(1..=16).contains(&self.store.pool_writer_lanes) {
            return Err(format!(
                "store.pool_writer_lanes must be between 1 and 16 (got {}): each lane holds two \
                 PostgreSQL sessions",
                self.store.pool_writer_lanes
            ));
        }
        if self.store.group_commit_delay_us > 100_000 {
            return Err(format!(
                "store.group_commit_delay_us must be at most 100000 (got {}): every message \
                 under load waits that long before it is durable and delivered",
                self.store.group_commit_delay_us
            ));
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
    let p = &d.proxy_protocol;
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
# /metrics (Prometheus text format) for monitoring: an admin address, loopback by default;
# "" serves none. See docs/operations/monitoring.md.
metrics_addr = "{metrics_addr}"
# The web client (Converse.js) served at https://HOST:<http_port>/: its files' directory;
# empty looks in /usr/share/pchat/web/converse and in the checkout's web/converse (which
# scripts/fetch-converse fills).
web_dir = ""

[limits]
# Largest stanza accepted, in bytes; larger ones close the stream with policy-violation.
stanza_bytes_max = {sbm}
# Stanzas queued for one client before it is disconnected as too slow.
session_queue_stanzas_max = {sq}
# Bytes queued for one client (as they go on the wire) before it is disconnected as too slow;
# at least stanza_bytes_max. History on join is cut to half of it (MAM serves the rest).
session_queue_bytes_max = {sqb}
# Milliseconds one write to a client may take; a client that reads slower is disconnected
# and the rooms it was in show it leaving with status 333.
write_timeout_ms = {wt}
# The server pings a client that sent nothing for a whole interval of this many milliseconds
# (XEP-0199), so after one to two intervals of silence; 0 = never.
ping_interval_ms = {pi}
# Milliseconds a pinged client has to answer (any traffic counts) before it is disconnected.
ping_timeout_ms = {pt}
# Seconds of idleness before TCP keepalive probes start (then every 10 s, 3 unanswered
# probes drop the connection); 0 = no keepalive.
tcp_keepalive_idle_s = {tka}
# Concurrent connections on all client ports together (c2s, direct TLS, HTTP).
sessions_max = {sm}
# Concurrent connections from one address (IPv6: from one /64), all ports together. Clients
# behind one NAT share it; behind a proxy, see [proxy_protocol].
connections_per_address_max = {cpa}
# Concurrent sessions (bound resources) of one account on this server.
sessions_per_account_max = {spa}
# Milliseconds an HTTP client has to send a request's headers (idle keep-alive included).
http_header_read_timeout_ms = {hrt}
# Stanzas queued for one room before senders get a "wait" error.
room_mailbox_stanzas_max = {rm}
# Inputs one room handles per batch (one group commit).
room_batch_stanzas_max = {rb}
# Failed logins from one address (IPv6: one /64) before its further attempts are delayed.
# Accounts are never locked: a guesser elsewhere cannot lock a user out.
auth_failures_max = {afm}
# Seconds without a new failure after which an address's failures are forgotten.
auth_failure_window_s = {afw}
# Milliseconds an address waits after its first failure beyond auth_failures_max; the delay
# doubles with each further failure, up to auth_delay_max_ms.
auth_delay_first_ms = {adf}
auth_delay_max_ms = {adm}
# Addresses the login throttle remembers; when full it forgets the address with the fewest
# failures (the oldest among equals), so the worst offenders stay throttled.
auth_throttle_addresses_max = {ata}
# Seconds a client has to finish authentication.
auth_timeout_s = {ats}
# Seconds a session that enabled resumption (XEP-0198 stream management) is kept, with its
# rooms and undelivered stanzas, after its connection broke, for the client to resume it;
# 0 = no resumption. Its queue stays bounded by the two session_queue limits above.
resume_timeout_s = {rts}
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
# How often the directory (groups, categories, walls) is looked at, in milliseconds.
directory_refresh_ms = {drm}

[store]
# Most writes grouped into one durable commit.
group_commit_max_writes = {gc}
# Under concurrent load, microseconds the store's writer waits after a group's first write
# for more to join it (0: never). A commit costs the same two fsyncs (and, on PostgreSQL,
# round trips) for 4 messages or 20, so larger groups cost far less per message; one sender
# alone never waits.
group_commit_delay_us = {gcd}
# Read connections to the SQLite files.
read_connections = {rc}
# Pool mode (PostgreSQL): milliseconds one read, one new connection or the switch to a new
# principal may take, whatever the database does (a frozen one never ends a statement
# itself); the call then fails as unavailable and is retried.
pool_query_timeout_ms = {pqt}
# Pool mode: milliseconds one group commit may wait for an answer from the database (six
# times it in all while the database answers, for a slow link). Past it the rooms waiting
# for it are told the outcome is unknown and resend the same messages, which are stored
# once: a hung database holds no room longer than this.
pool_commit_timeout_ms = {pct}
# Pool mode: group commits in flight at once (two PostgreSQL sessions each). More lanes
# keep a server far from its database acknowledging; each costs two connections.
pool_writer_lanes = {pwl}

[proxy_protocol]
# Behind a load balancer or TLS-terminating proxy, take each client's address (for the
# per-address limits and the login throttle) from a PROXY protocol v2 header that the proxy
# sends first. Per listener; a listener that expects it refuses every peer that is not one
# of trusted_proxies.
c2s = {pc2s}
c2s_tls = {ptls}
http = {phttp}
# Proxy addresses or networks, e.g. ["192.0.2.10", "2001:db8::/32"].
trusted_proxies = []
# Milliseconds a proxy has to send its header.
header_timeout_ms = {pht}

[marks]
# Pool mode only. Each active server publishes to etcd, per room, the highest message id it
# acknowledged; `pchat pool failover` (and its --dry-run) bounds what a lost site took with
# it from these: at least the acknowledged messages the backup lacks, at most that plus the
# allowances below. A publication at most every this many milliseconds, and only when
# something changed.
publish_interval_ms = {mpi}
# Seconds a room stays listed after its last acknowledgment; then a "guard" message covers
# it (keep it far above the time log shipping may lag unnoticed).
window_s = {mws}
# Rooms listed at most (about 50 bytes each in one etcd value).
rooms_max = {mrm}
# Messages a server may acknowledge beyond its last publication before it must publish
# again (it adapts to twice the recent rate); the upper loss bound includes them.
allowance_messages_min = {mam}
# Milliseconds an acknowledgment waits for a publication when etcd cannot be reached, before
# the room tries its commit again (the message is stored once, whatever happens).
ack_wait_ms = {maw}

[directory]
# An LDAP or Active Directory server. Its groups become principals `ldap:NAME` and its OUs
# `ou:NAME` (in categories, the policy, local groups and room lists); membership is read
# every refresh_s and a change applies on its own (who leaves a group that a wall needs is
# removed from its rooms). Empty url: no directory.
# url = "ldaps://ldap.example.com"   # or ldap://... with StartTLS; plain LDAP is refused
url = ""
# PEM file of the CA the directory's certificate chains to.
ca_file = ""
# The account pchat reads the directory as, and a file (mode 0600) with its password.
bind_dn = ""
bind_password_file = ""
# Where users and groups are searched (subtree), e.g. "dc=example,dc=com".
base_dn = ""
# Users: the filter, and the attribute that is their JID's local part (AD: sAMAccountName).
user_filter = "{duf}"
user_attr = "{dua}"
# Groups: the filter, the attribute naming them, the attribute listing member DNs. A
# member that is itself a group nests.
group_filter = "{dgf}"
group_attr = "{dga}"
member_attr = "{dma}"
refresh_s = {drs}
# Milliseconds one directory operation may take.
timeout_ms = {dto}
# Users and groups read at most.
entries_max = {dem}
# "local": pchat's own passwords (SCRAM). "ldap": the directory's (checked by a bind), so
# only SASL PLAIN, and only over TLS, is offered.
auth = "local"

[compliance]
# The compliance export job (Lync's compliance service): every run_interval_s it writes the
# new compliance records (joins, parts, messages, removals, ...) to files in export_dir,
# exactly once, and purges exported records older than retention_h hours. One exporter runs
# at a time (a file lock here; an etcd lease in a pool). Empty export_dir: no job (the
# shell's `pchat compliance export` still works).
export_dir = ""
run_interval_s = {cri}
# "lync-xml" (Lync's XmlAdapter shape, docs/operations/compliance.xsd) or "jsonl".
format = "{cfm}"
one_room_per_file = {cor}
retention_h = {crh}
records_per_run = {crp}

[upload]
# File sharing in rooms (XEP-0363 HTTP upload, Lync's file upload): a client asks the
# service for a slot, PUTs the file to the HTTP port and posts the link in a room. Files
# live in the store (every server of a pool serves them); a file shared in a members-only
# room is served to its members only (HTTP Basic with the XMPP password). A category's
# file_upload flag and the service setting MaxFileSizeKB (`pchat config set`, 20000 KiB
# by default) apply.
enabled = {uen}
# The service's JID; empty means "upload.<domain>".
service = ""
# Base of the URLs given to clients; empty means https://<domain>:<http_port>. Set it
# when clients reach the HTTP port through a proxy or under another name.
public_url = ""
slot_timeout_s = {ust}
# What one user's files and one room's files may take, in MiB.
user_quota_mb = {uuq}
room_quota_mb = {urq}
# Uploads received at the same time; more are answered 503 with Retry-After.
uploads_max = {uum}
# Milliseconds an upload or download may stall before it is dropped.
idle_timeout_ms = {uit}
# Seconds a link works without signing in (files of open rooms, uploads not posted yet);
# after that a download asks for the chat address and password. 0: links never expire.
link_ttl_s = {ult}
"#,
        ult = d.upload.link_ttl_s,
        uen = d.upload.enabled,
        ust = d.upload.slot_timeout_s,
        uuq = d.upload.user_quota_mb,
        urq = d.upload.room_quota_mb,
        uum = d.upload.uploads_max,
        uit = d.upload.idle_timeout_ms,
        domain = d.domain,
        bind = d.bind_addr,
        c2s = d.c2s_port,
        tls = d.c2s_tls_port,
        cri = d.compliance.run_interval_s,
        cfm = d.compliance.format,
        cor = d.compliance.one_room_per_file,
        crh = d.compliance.retention_h,
        crp = d.compliance.records_per_run,
        http = d.http_port,
        http_tls = d.http_tls,
        metrics_addr = d.metrics_addr,
        sbm = l.stanza_bytes_max,
        sq = l.session_queue_stanzas_max,
        sqb = l.session_queue_bytes_max,
        wt = l.write_timeout_ms,
        pi = l.ping_interval_ms,
        pt = l.ping_timeout_ms,
        tka = l.tcp_keepalive_idle_s,
        sm = l.sessions_max,
        cpa = l.connections_per_address_max,
        spa = l.sessions_per_account_max,
        hrt = l.http_header_read_timeout_ms,
        rm = l.room_mailbox_stanzas_max,
        rb = l.room_batch_stanzas_max,
        afm = l.auth_failures_max,
        afw = l.auth_failure_window_s,
        adf = l.auth_delay_first_ms,
        adm = l.auth_delay_max_ms,
        ata = l.auth_throttle_addresses_max,
        ats = l.auth_timeout_s,
        rts = l.resume_timeout_s,
        stm = l.shutdown_timeout_ms,
        hsd = r.history_stanzas_default,
        hsm = r.history_stanzas_max,
        om = r.occupants_max,
        mod_ = r.members_only_default,
        pd = r.public_default,
        drm = r.directory_refresh_ms,
        gc = s.group_commit_max_writes,
        gcd = s.group_commit_delay_us,
        rc = s.read_connections,
        pqt = s.pool_query_timeout_ms,
        pct = s.pool_commit_timeout_ms,
        pwl = s.pool_writer_lanes,
        pc2s = p.c2s,
        ptls = p.c2s_tls,
        phttp = p.http,
        pht = p.header_timeout_ms,
        mpi = d.marks.publish_interval_ms,
        mws = d.marks.window_s,
        mrm = d.marks.rooms_max,
        mam = d.marks.allowance_messages_min,
        maw = d.marks.ack_wait_ms,
        duf = d.directory.user_filter,
        dua = d.directory.user_attr,
        dgf = d.directory.group_filter,
        dga = d.directory.group_attr,
        dma = d.directory.member_attr,
        drs = d.directory.refresh_s,
        dto = d.directory.timeout_ms,
        dem = d.directory.entries_max,
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
    fn limits_that_cannot_work_are_refused() {
        let check = |toml: &str| toml::from_str::<Config>(toml).unwrap().validate();
        let err = check("[proxy_protocol]\nc2s = true\n").unwrap_err();
        assert!(err.contains("trusted_proxies"), "{err}");
        assert!(
            check("[proxy_protocol]\nhttp = true\ntrusted_proxies = ['10.0.0.0/8', '::1']\n")
                .is_ok()
        );
        let err = check("[proxy_protocol]\ntrusted_proxies = ['lb.example']\n").unwrap_err();
        assert!(err.contains("lb.example"), "{err}");
        for bad in [
            "[limits]\nsession_queue_bytes_max = 1000\n",
            "[limits]\nwrite_timeout_ms = 0\n",
            "[limits]\nconnections_per_address_max = 0\n",
            "[limits]\nsessions_per_account_max = 0\n",
            "[limits]\nauth_delay_first_ms = 90000\n",
            "[store]\npool_commit_timeout_ms = 0\n",
            "[store]\npool_query_timeout_ms = 10\n",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
        // Pings may be turned off; keepalive too.
        assert!(check("[limits]\nping_interval_ms = 0\ntcp_keepalive_idle_s = 0\n").is_ok());
    }

    #[test]
    fn unknown_keys_are_refused_with_position() {
        let err = toml::from_str::<Config>("domian = 'x'\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("domian") && err.contains("line 1"), "{err}");
    }
}
