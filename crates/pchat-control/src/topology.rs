//! `topology.toml`: the static description of a pool (Lync's Topology Builder output): sites,
//! servers, the databases of each site with their agents, the log-shipping share and the etcd
//! endpoints. Validation reports every problem with its line number.

use std::collections::HashSet;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// A parsed and validated topology.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// The pool.
    pub pool: Pool,
    /// Sites (data centers), in order: the first is the primary site.
    pub sites: Vec<Site>,
    /// Every server of the pool.
    pub servers: Vec<Server>,
    /// The share log shipping and full backups go through.
    pub share: String,
    /// etcd client endpoints (`https://host:port`; `http://` only when `insecure`).
    pub etcd: Vec<String>,
    /// No TLS and no certificates on the pool's own connections (etcd, agents, PostgreSQL):
    /// for a throw-away lab only. Every process that reads such a topology warns at start.
    pub insecure: bool,
}

/// Pool settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Pool name (Lync's service identity).
    pub name: String,
    /// XMPP domain served.
    pub domain: String,
    /// Most servers active at once (Lync: 4).
    pub active_servers_max: usize,
}

/// A site and its databases.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    /// Site name.
    pub name: String,
    /// Role of the site's databases: `primary` (principal + mirror) or `backup`
    /// (log-shipping target + its mirror).
    pub role: SiteRole,
    /// The principal (primary site) or backup (backup site) database instance.
    pub database: Database,
    /// The synchronous standby in the same site, if any.
    pub mirror: Option<Database>,
    /// Backup site: the local directory on its database's host where the copy job puts the
    /// WAL shipped through the share (SQL Server log shipping's copy destination). Absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_dir: Option<String>,
}

/// A site's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteRole {
    /// Databases authoritative in state Normal.
    Primary,
    /// Databases authoritative in state FailedOver.
    Backup,
}

/// One PostgreSQL instance and the agent beside it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Database {
    /// The instance's name: its agent's `instance`, its identity in the pool's PKI
    /// (`NAME.POOL.pchat`), unique in the pool.
    pub name: String,
    /// `host:port` of PostgreSQL.
    pub address: String,
    /// Base URL of its `pchat agent`.
    pub agent: String,
}

/// One `pchat serve` of the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    /// Server name (unique in the pool).
    pub name: String,
    /// Site the server runs in.
    pub site: String,
    /// Address clients use (`host:port` of its STARTTLS port), named in `see-other-host`.
    pub address: String,
}

// The file's shape, with spans so semantic errors can name their line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    pool: Spanned<RawPool>,
    #[serde(default)]
    sites: Vec<Spanned<RawSite>>,
    #[serde(default)]
    servers: Vec<Spanned<RawServer>>,
    share: Spanned<String>,
    etcd: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    insecure: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    domain: Spanned<String>,
    #[serde(default = "default_active_max")]
    active_servers_max: Spanned<usize>,
}

fn default_active_max() -> Spanned<usize> {
    Spanned::new(0..0, 4)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: Spanned<String>,
    role: Spanned<SiteRole>,
    database: Spanned<Database>,
    mirror: Option<Spanned<Database>>,
    copy_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    name: Spanned<String>,
    site: Spanned<String>,
    address: Spanned<String>,
}

/// One problem in a topology file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// All problems found in a topology file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct Problems(pub Vec<Problem>);

fn line_of(text: &str, span: &Range<usize>) -> usize {
    text[..span.start.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

fn valid_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// A name that becomes a DNS label of an identity: letters, digits, `-` and `_`.
fn valid_label(s: &str, underscore: bool) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || (underscore && b == b'_'))
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The host of `host:port` (IPv6 without its brackets).
pub fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The host of an `http(s)://host:port/…` URL.
pub fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// Parses and validates `text`.
pub fn parse(text: &str) -> Result<Topology, Problems> {
    let raw: RawTopology = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, &s)).unwrap_or(1);
        Problems(vec![Problem {
            line,
            message: e.message().trim().to_owned(),
        }])
    })?;
    let mut problems = Vec::new();
    let mut p = |span: &Range<usize>, message: String| {
        problems.push(Problem {
            line: line_of(text, span),
            message,
        })
    };

    let pool = raw.pool.get_ref();
    if !valid_label(pool.name.get_ref(), false) {
        p(
            &pool.name.span(),
            format!(
                "pool.name `{}` must be 1-63 letters, digits or `-` (it is part of every certificate name)",
                pool.name.get_ref()
            ),
        );
    }
    let scheme_ok =
        |url: &str| url.starts_with("https://") || (raw.insecure && url.starts_with("http://"));
    let scheme_rule = if raw.insecure {
        "an http(s):// URL"
    } else {
        "an https:// URL (plain http only with `insecure = true`)"
    };
    let mut instance_names = HashSet::new();
    if pool.domain.get_ref().is_empty() || pool.domain.get_ref().contains(['@', '/', ' ']) {
        p(
            &pool.domain.span(),
            format!(
                "pool.domain `{}` is not a valid XMPP domain",
                pool.domain.get_ref()
            ),
        );
    }
    if *pool.active_servers_max.get_ref() == 0 {
        p(
            &pool.active_servers_max.span(),
            "pool.active_servers_max must be at least 1".into(),
        );
    }

    let mut site_names = HashSet::new();
    let mut primaries = 0;
    let mut backups = 0;
    for s in &raw.sites {
        let site = s.get_ref();
        if !site_names.insert(site.name.get_ref().clone()) {
            p(
                &site.name.span(),
                format!("site `{}` is defined twice", site.name.get_ref()),
            );
        }
        match site.role.get_ref() {
            SiteRole::Primary => primaries += 1,
            SiteRole::Backup => backups += 1,
        }
        if let Some(c) = &site.copy_dir {
            if !c.get_ref().starts_with('/') || c.get_ref().contains(['\'', '"', '\n']) {
                p(
                    &c.span(),
                    format!(
                        "copy_dir `{}` must be an absolute path without quotes",
                        c.get_ref()
                    ),
                );
            }
        }
        for db in std::iter::once(&site.database).chain(site.mirror.iter()) {
            let name = &db.get_ref().name;
            if !valid_label(name, true) || name.starts_with("etcd-") {
                p(
                    &db.span(),
                    format!("database name `{name}` must be 1-63 letters, digits, `-` or `_`, not starting with `etcd-` (the etcd members' names)"),
                );
            } else if !instance_names.insert(name.clone()) {
                p(&db.span(), format!("database `{name}` is defined twice"));
            }
            if !valid_host_port(&db.get_ref().address) {
                p(
                    &db.span(),
                    format!(
                        "database address `{}` must be host:port",
                        db.get_ref().address
                    ),
                );
            }
            if !scheme_ok(&db.get_ref().agent) {
                p(
                    &db.span(),
                    format!("agent `{}` must be {scheme_rule}", db.get_ref().agent),
                );
            }
        }
    }
    if primaries != 1 {
        p(
            &raw.pool.span(),
            format!("exactly one site must have role = \"primary\" (found {primaries})"),
        );
    }
    if backups > 1 {
        p(
            &raw.pool.span(),
            format!("at most one site may have role = \"backup\" (found {backups})"),
        );
    }

    let mut server_names = HashSet::new();
    for s in &raw.servers {
        let server = s.get_ref();
        if !valid_label(server.name.get_ref(), true) {
            p(
                &server.name.span(),
                format!(
                    "server name `{}` must be 1-63 letters, digits, `-` or `_`",
                    server.name.get_ref()
                ),
            );
        }
        if !server_names.insert(server.name.get_ref().clone()) {
            p(
                &server.name.span(),
                format!("server `{}` is defined twice", server.name.get_ref()),
            );
        }
        if !site_names.contains(server.site.get_ref()) {
            let known: Vec<_> = raw
                .sites
                .iter()
                .map(|s| s.get_ref().name.get_ref().as_str())
                .collect();
            p(
                &server.site.span(),
                format!(
                    "server `{}` names unknown site `{}` (sites: {})",
                    server.name.get_ref(),
                    server.site.get_ref(),
                    known.join(", ")
                ),
            );
        }
        if !valid_host_port(server.address.get_ref()) {
            p(
                &server.address.span(),
                format!(
                    "server address `{}` must be host:port",
                    server.address.get_ref()
                ),
            );
        }
    }
    if raw.servers.is_empty() {
        p(&raw.pool.span(), "the pool has no [[servers]]".into());
    }
    if raw.share.get_ref().is_empty() {
        p(
            &raw.share.span(),
            "share must name the log-shipping share".into(),
        );
    }
    if raw.etcd.get_ref().is_empty() {
        p(
            &raw.etcd.span(),
            "etcd must list at least one endpoint".into(),
        );
    }
    for e in raw.etcd.get_ref() {
        if !scheme_ok(e.get_ref()) {
            p(
                &e.span(),
                format!("etcd endpoint `{}` must be {scheme_rule}", e.get_ref()),
            );
        }
    }
    if !problems.is_empty() {
        problems.sort_by_key(|x| x.line);
        return Err(Problems(problems));
    }
    let sites = raw
        .sites
        .into_iter()
        .map(|s| {
            let s = s.into_inner();
            Site {
                name: s.name.into_inner(),
                role: s.role.into_inner(),
                database: s.database.into_inner(),
                mirror: s.mirror.map(Spanned::into_inner),
                copy_dir: s.copy_dir.map(Spanned::into_inner),
            }
        })
        .collect();
    let servers = raw
        .servers
        .into_iter()
        .map(|s| {
            let s = s.into_inner();
            Server {
                name: s.name.into_inner(),
                site: s.site.into_inner(),
                address: s.address.into_inner(),
            }
        })
        .collect();
    let pool = raw.pool.into_inner();
    Ok(Topology {
        pool: Pool {
            name: pool.name.into_inner(),
            domain: pool.domain.into_inner(),
            active_servers_max: pool.active_servers_max.into_inner(),
        },
        sites,
        servers,
        share: raw.share.into_inner(),
        etcd: raw
            .etcd
            .into_inner()
            .into_iter()
            .map(Spanned::into_inner)
            .collect(),
        insecure: raw.insecure,
    })
}

impl Topology {
    /// The site whose databases are authoritative in `state`.
    pub fn authoritative_site(&self, state: crate::pool::PoolStateKind) -> Option<&Site> {
        let role = match state {
            crate::pool::PoolStateKind::Normal => SiteRole::Primary,
            crate::pool::PoolStateKind::FailedOver => SiteRole::Backup,
        };
        self.sites.iter().find(|s| s.role == role)
    }

    /// A server by name.
    pub fn server(&self, name: &str) -> Option<&Server> {
        self.servers.iter().find(|s| s.name == name)
    }

    /// A site by name.
    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }

    /// Every database instance, with its site.
    pub fn instances(&self) -> impl Iterator<Item = (&Site, &Database)> {
        self.sites.iter().flat_map(|s| {
            std::iter::once(&s.database)
                .chain(s.mirror.iter())
                .map(move |d| (s, d))
        })
    }

    /// A database instance by name, with its site.
    pub fn instance(&self, name: &str) -> Option<(&Site, &Database)> {
        self.instances().find(|(_, d)| d.name == name)
    }

    /// The instance whose agent is at `url` (trailing `/` ignored), with its site.
    pub fn instance_by_agent(&self, url: &str) -> Option<(&Site, &Database)> {
        let url = url.trim_end_matches('/');
        self.instances()
            .find(|(_, d)| d.agent.trim_end_matches('/') == url)
    }

    /// The warning every process prints when it reads an insecure topology.
    pub fn insecure_warning(&self) -> Option<String> {
        // What is plaintext follows from the URLs an insecure topology may give: etcd and the
        // agents on http://; PostgreSQL for every process that runs without an identity.
        let mut plain = Vec::new();
        if self.etcd.iter().any(|e| e.starts_with("http://")) {
            plain.push("etcd");
        }
        if self
            .instances()
            .any(|(_, d)| d.agent.starts_with("http://"))
        {
            plain.push("the agents' API (with one shared token)");
        }
        plain.push("PostgreSQL (for a process without an identity)");
        self.insecure.then(|| {
            format!(
                "WARNING: pool {} is insecure (`insecure = true` in its topology): {} reached without TLS or certificates; anyone on the network can read and change the pool. Use it for a throw-away lab only.",
                self.pool.name,
                plain.join(", ")
            )
        })
    }
}

/// Prints the topology's insecure warning on standard error (where every pchat process logs),
/// once per pool and process: at a server's first read of the pool, not at every poll.
pub fn warn_if_insecure(t: &Topology) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let Some(warning) = t.insecure_warning() else {
        return;
    };
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if !warned.contains(&t.pool.name) {
        warned.push(t.pool.name.clone());
        eprintln!("{warning}");
    }
}

/// A valid topology for tests in this crate.
#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) const GOOD: &str = r#"share = "/srv/pchat-share"
etcd = ["https://127.0.0.1:2379"]

[pool]
name = "pc1"
domain = "chat.example.org"

[[sites]]
name = "A"
role = "primary"
database = { name = "a_db", address = "10.0.0.1:5432", agent = "https://10.0.0.1:7070" }
mirror = { name = "a_mirror", address = "10.0.0.2:5432", agent = "https://10.0.0.2:7070" }

[[sites]]
name = "B"
role = "backup"
database = { name = "b_db", address = "10.1.0.1:5432", agent = "https://10.1.0.1:7070" }

[[servers]]
name = "a1"
site = "A"
address = "10.0.0.10:5222"

[[servers]]
name = "b1"
site = "B"
address = "10.1.0.10:5222"
"#;
}

#[cfg(test)]
mod tests {
    use super::tests_support::GOOD;
    use super::*;

    #[test]
    fn parses_a_good_topology() {
        let t = parse(GOOD).unwrap();
        assert_eq!(t.pool.active_servers_max, 4);
        assert_eq!(t.servers.len(), 2);
        assert_eq!(
            t.authoritative_site(crate::pool::PoolStateKind::FailedOver)
                .map(|s| s.name.as_str()),
            Some("B")
        );
    }

    fn check(edit: (&str, &str), line: usize, needle: &str) {
        let text = GOOD.replacen(edit.0, edit.1, 1);
        let err = parse(&text).expect_err("must be refused");
        assert!(
            err.0
                .iter()
                .any(|p| p.line == line && p.message.contains(needle)),
            "expected line {line} `{needle}`, got {err}"
        );
    }

    #[test]
    fn reports_problems_with_lines() {
        check(("site = \"B\"", "site = \"C\""), 26, "unknown site `C`");
        check(("name = \"b1\"", "name = \"a1\""), 25, "defined twice");
        check(
            ("address = \"10.1.0.10:5222\"", "address = \"nowhere\""),
            27,
            "host:port",
        );
        check(
            ("role = \"backup\"", "role = \"primary\""),
            4,
            "exactly one site",
        );
        check(
            ("role = \"backup\"", "role = \"spare\""),
            16,
            "unknown variant",
        );
        check(
            ("domain = \"chat.example.org\"", "domian = \"x\""),
            6,
            "unknown field",
        );
        check(
            (
                "etcd = [\"https://127.0.0.1:2379\"]",
                "etcd = [\"127.0.0.1:2379\"]",
            ),
            2,
            "https://",
        );
        check(
            ("agent = \"https://10.1.0.1:7070\"", "agent = \"10.1.0.1\""),
            17,
            "https://",
        );
        // Plain http is refused unless the topology says it is insecure.
        check(
            (
                "etcd = [\"https://127.0.0.1:2379\"]",
                "etcd = [\"http://127.0.0.1:2379\"]",
            ),
            2,
            "only with `insecure = true`",
        );
        let insecure = format!("insecure = true\n{}", GOOD.replace("https://", "http://"));
        let t = parse(&insecure).unwrap();
        assert!(t.insecure);
        let warning = t.insecure_warning().unwrap();
        assert!(warning.contains("pool pc1 is insecure"), "{warning}");
        assert!(
            warning.contains("etcd, the agents' API (with one shared token), PostgreSQL"),
            "{warning}"
        );
        // With https:// etcd and agents, only PostgreSQL is left to name.
        let half = format!("insecure = true\n{GOOD}");
        let warning = parse(&half).unwrap().insecure_warning().unwrap();
        assert!(
            !warning.contains("etcd") && !warning.contains("agents"),
            "{warning}"
        );
        assert!(parse(GOOD).unwrap().insecure_warning().is_none());
        // Instance names are identities: unique, and usable in a certificate name.
        check(
            ("name = \"a_mirror\"", "name = \"a_db\""),
            12,
            "defined twice",
        );
        check(
            ("name = \"b_db\"", "name = \"b db\""),
            17,
            "database name `b db`",
        );
        check(("name = \"pc1\"", "name = \"pc_1\""), 5, "pool.name `pc_1`");
    }

    #[test]
    fn instances_and_hosts() {
        let t = parse(GOOD).unwrap();
        let names: Vec<_> = t
            .instances()
            .map(|(s, d)| (s.name.as_str(), d.name.as_str()))
            .collect();
        assert_eq!(names, [("A", "a_db"), ("A", "a_mirror"), ("B", "b_db")]);
        assert_eq!(
            t.instance_by_agent("https://10.0.0.2:7070/")
                .unwrap()
                .1
                .name,
            "a_mirror"
        );
        assert!(t.instance_by_agent("https://10.9.9.9:7070").is_none());
        assert_eq!(host_of("10.0.0.1:5432"), "10.0.0.1");
        assert_eq!(host_of("[::1]:5432"), "::1");
        assert_eq!(url_host("https://db.example:7070/v1"), "db.example");
        assert_eq!(url_host("https://[fd00::1]:7070"), "fd00::1");
        assert_eq!(url_host("http://127.0.0.1:2379"), "127.0.0.1");
    }
}
