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
    /// etcd client endpoints (`http://host:port`).
    pub etcd: Vec<String>,
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
    if pool.name.get_ref().is_empty() {
        p(&pool.name.span(), "pool.name must not be empty".into());
    }
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
            if !valid_host_port(&db.get_ref().address) {
                p(
                    &db.span(),
                    format!(
                        "database address `{}` must be host:port",
                        db.get_ref().address
                    ),
                );
            }
            if !db.get_ref().agent.starts_with("http://")
                && !db.get_ref().agent.starts_with("https://")
            {
                p(
                    &db.span(),
                    format!("agent `{}` must be an http(s):// URL", db.get_ref().agent),
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
        if !e.get_ref().starts_with("http://") && !e.get_ref().starts_with("https://") {
            p(
                &e.span(),
                format!("etcd endpoint `{}` must be an http(s):// URL", e.get_ref()),
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
}

/// A valid topology for tests in this crate.
#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) const GOOD: &str = r#"share = "/srv/pchat-share"
etcd = ["http://127.0.0.1:2379"]

[pool]
name = "pc1"
domain = "chat.example.org"

[[sites]]
name = "A"
role = "primary"
database = { address = "10.0.0.1:5432", agent = "http://10.0.0.1:7070" }
mirror = { address = "10.0.0.2:5432", agent = "http://10.0.0.2:7070" }

[[sites]]
name = "B"
role = "backup"
database = { address = "10.1.0.1:5432", agent = "http://10.1.0.1:7070" }

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
                "etcd = [\"http://127.0.0.1:2379\"]",
                "etcd = [\"127.0.0.1:2379\"]",
            ),
            2,
            "http(s)://",
        );
        check(
            ("agent = \"http://10.1.0.1:7070\"", "agent = \"10.1.0.1\""),
            17,
            "http(s)://",
        );
    }
}
