//! The external directory (`[directory]`): an LDAP or Active Directory server whose groups
//! and OUs become principals (`ldap:NAME`, `ou:NAME`) and, with `auth = "ldap"`, whose
//! passwords users log in with.
//!
//! Always over TLS: `ldaps://`, or `ldap://` with StartTLS; the directory's certificate must
//! chain to `ca_file` and name the host of the URL. pchat binds as `bind_dn` (password from a
//! 0600 file, never the command line) and reads, every `refresh_s`, with paged searches:
//! - users (`user_filter`): `user_attr` is the JID's local part (`alice` → `alice@DOMAIN`);
//!   every `ou=X` in a user's DN puts them in `ou:x` (sub-OUs included);
//! - groups (`group_filter`): `group_attr` names them `ldap:NAME` (lower-cased; spaces become
//!   `_`; a name that is still not valid is skipped with a warning), `member_attr` lists member
//!   DNs: a user, or another group (nesting, resolved with cycles harmless when the directory
//!   is compiled with the local one).
//!
//! The result, [`ExternalGroups`], is merged with the local directory
//! (`pchat_room::directory::Access::compile_with`). Until a first reading succeeds no
//! directory is installed, so rooms wait and then refuse rather than decide with empty groups
//! (an empty *denied* group would open a wall); when a later reading fails, the last good one
//! stays in force and a warning is logged once.
//!
//! Logins (`auth = "ldap"`): the user's DN is searched as the service account (the name
//! escaped for the filter), then a separate connection binds as that DN with the password
//! given. An empty password is refused before the directory is asked (an LDAP bind with an
//! empty password is an anonymous bind, which "succeeds").

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use pchat_room::directory::{ExternalGroups, Principal, LDAP_PREFIX, OU_PREFIX};

use crate::config::DirectoryConfig;

/// Why the directory could not be read or asked.
#[derive(Debug, thiserror::Error)]
pub enum LdapError {
    /// The configuration cannot work (a file, the CA).
    #[error("directory: {0}")]
    Config(String),
    /// The directory did not answer, refused or failed.
    #[error("directory {url}: {message}")]
    Directory {
        /// The URL.
        url: String,
        /// What happened.
        message: String,
    },
}

/// A configured directory.
pub struct Ldap {
    cfg: DirectoryConfig,
    domain: String,
    tls: Arc<rustls::ClientConfig>,
}

/// One entry's attribute values, attribute names compared without case.
fn values<'a>(attrs: &'a HashMap<String, Vec<String>>, name: &str) -> &'a [String] {
    attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map_or(&[], |(_, v)| v.as_slice())
}

/// A DN in a form two spellings of it share (case, spaces around `,` and `=`).
fn norm_dn(dn: &str) -> String {
    dn.split(',')
        .map(|rdn| {
            let (k, v) = rdn.split_once('=').unwrap_or((rdn, ""));
            format!("{}={}", k.trim().to_lowercase(), v.trim().to_lowercase())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `ou=Legal,ou=People,dc=…` → `["legal", "people"]`.
fn ous_of(dn: &str) -> Vec<String> {
    dn.split(',')
        .filter_map(|rdn| {
            let (k, v) = rdn.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("ou")
                .then(|| v.trim().to_lowercase())
        })
        .collect()
}

/// A directory name as a principal's name: lower-cased, whitespace as `_`.
fn principal_name(prefix: &str, name: &str) -> Option<String> {
    let n: String = name
        .trim()
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect::<String>()
        .to_lowercase();
    match Principal::parse(&format!("{prefix}{n}")) {
        Ok(Principal::Group(g)) => Some(g),
        _ => None,
    }
}

impl Ldap {
    /// Checks the configuration's files and builds the TLS client.
    pub fn new(cfg: &DirectoryConfig, domain: &str) -> Result<Ldap, LdapError> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::CertificateDer;
        let bad = |m: String| LdapError::Config(m);
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&cfg.ca_file)
            .map_err(|e| bad(format!("directory.ca_file {}: {e}", cfg.ca_file)))?;
        for c in certs {
            let c = c.map_err(|e| bad(format!("directory.ca_file {}: {e}", cfg.ca_file)))?;
            roots
                .add(c)
                .map_err(|e| bad(format!("directory.ca_file {}: {e}", cfg.ca_file)))?;
        }
        if roots.is_empty() {
            return Err(bad(format!(
                "directory.ca_file {} holds no certificate",
                cfg.ca_file
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let ldap = Ldap {
            cfg: cfg.clone(),
            domain: domain.to_lowercase(),
            tls: Arc::new(tls),
        };
        // Read now, so a missing or readable-by-others file is said at start.
        ldap.service_password()?;
        Ok(ldap)
    }

    fn service_password(&self) -> Result<String, LdapError> {
        let path = std::path::Path::new(&self.cfg.bind_password_file);
        pchat_tls::fs::read_secret(path)
            .map_err(|e| LdapError::Config(format!("directory.bind_password_file: {e}")))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.timeout_ms)
    }

    fn err(&self, e: impl std::fmt::Display) -> LdapError {
        LdapError::Directory {
            url: self.cfg.url.clone(),
            message: e.to_string(),
        }
    }

    /// A TLS connection (LDAPS or StartTLS), not bound yet.
    async fn connect(&self) -> Result<ldap3::Ldap, LdapError> {
        let settings = LdapConnSettings::new()
            .set_conn_timeout(self.timeout())
            .set_config(self.tls.clone())
            .set_starttls(self.cfg.url.starts_with("ldap://"));
        let (conn, ldap) = tokio::time::timeout(
            self.timeout(),
            LdapConnAsync::with_settings(settings, &self.cfg.url),
        )
        .await
        .map_err(|_| self.err("no connection within the timeout"))?
        .map_err(|e| self.err(e))?;
        ldap3::drive!(conn);
        Ok(ldap)
    }

    async fn bind(
        &self,
        ldap: &mut ldap3::Ldap,
        dn: &str,
        password: &str,
    ) -> Result<(), LdapError> {
        ldap.with_timeout(self.timeout())
            .simple_bind(dn, password)
            .await
            .map_err(|e| self.err(e))?
            .success()
            .map_err(|e| self.err(format!("bind as {dn}: {e}")))?;
        Ok(())
    }

    /// Every entry of a paged subtree search, bounded by `entries_max` in all.
    async fn search_all(
        &self,
        ldap: &mut ldap3::Ldap,
        filter: &str,
        attrs: Vec<String>,
        budget: &mut usize,
    ) -> Result<Vec<SearchEntry>, LdapError> {
        let adapters: Vec<Box<dyn Adapter<_, _>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(500)),
        ];
        let mut stream = ldap
            .with_timeout(self.timeout())
            .streaming_search_with(adapters, &self.cfg.base_dn, Scope::Subtree, filter, attrs)
            .await
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(self.timeout(), stream.next())
                .await
                .map_err(|_| self.err(format!("search {filter}: no answer within the timeout")))?
                .map_err(|e| self.err(e))?;
            let Some(entry) = next else { break };
            if *budget == 0 {
                // The connection is dropped with the stream: the search ends there.
                drop(stream);
                return Err(self.err(format!(
                    "more than directory.entries_max = {} users and groups; narrow the filters or raise it",
                    self.cfg.entries_max
                )));
            }
            *budget -= 1;
            out.push(SearchEntry::construct(entry));
        }
        stream
            .finish()
            .await
            .success()
            .map_err(|e| self.err(format!("search {filter}: {e}")))?;
        Ok(out)
    }

    /// Reads the users' OUs and the groups.
    pub async fn read(&self) -> Result<ExternalGroups, LdapError> {
        let mut ldap = self.connect().await?;
        let password = self.service_password()?;
        self.bind(&mut ldap, &self.cfg.bind_dn, &password).await?;
        let mut budget = self.cfg.entries_max;
        let users = self
            .search_all(
                &mut ldap,
                &self.cfg.user_filter,
                vec![self.cfg.user_attr.clone()],
                &mut budget,
            )
            .await?;
        let groups = self
            .search_all(
                &mut ldap,
                &self.cfg.group_filter,
                vec![self.cfg.group_attr.clone(), self.cfg.member_attr.clone()],
                &mut budget,
            )
            .await?;
        let _ = ldap.unbind().await;
        Ok(self.resolve(&users, &groups))
    }

    /// The groups from the entries read (separate for its tests).
    fn resolve(&self, users: &[SearchEntry], groups: &[SearchEntry]) -> ExternalGroups {
        let mut by_dn: HashMap<String, Principal> = HashMap::new();
        let mut out: BTreeMap<String, BTreeSet<Principal>> = BTreeMap::new();
        for u in users {
            let Some(local) = values(&u.attrs, &self.cfg.user_attr).first() else {
                continue;
            };
            let Ok(user) = Principal::parse(&format!("{}@{}", local.to_lowercase(), self.domain))
            else {
                tracing::warn!(dn = %u.dn, "directory user skipped: `{local}` is not a JID local part");
                continue;
            };
            by_dn.insert(norm_dn(&u.dn), user.clone());
            for ou in ous_of(&u.dn) {
                if let Some(g) = principal_name(OU_PREFIX, &ou) {
                    out.entry(g).or_default().insert(user.clone());
                }
            }
        }
        let mut named = Vec::new();
        for g in groups {
            let Some(name) = values(&g.attrs, &self.cfg.group_attr).first() else {
                continue;
            };
            let Some(pname) = principal_name(LDAP_PREFIX, name) else {
                tracing::warn!(dn = %g.dn, "directory group skipped: `{name}` cannot be a principal name (letters, digits, - _ .)");
                continue;
            };
            by_dn.insert(norm_dn(&g.dn), Principal::Group(pname.clone()));
            named.push((pname, g));
        }
        for (pname, g) in named {
            let itself = Principal::Group(pname.clone());
            let members = values(&g.attrs, &self.cfg.member_attr)
                .iter()
                .filter_map(|dn| by_dn.get(&norm_dn(dn)).cloned())
                // A group that names itself (groupOfNames must have a member) holds nothing.
                .filter(|p| *p != itself);
            out.entry(pname).or_default().extend(members);
        }
        ExternalGroups { groups: out }
    }

    /// Checks a user's directory password: `Ok(true)` when a bind as their entry succeeds,
    /// `Ok(false)` for a wrong password or no such user, `Err` when the directory cannot say.
    pub async fn verify(&self, local: &str, password: &str) -> Result<bool, LdapError> {
        if password.is_empty() || local.is_empty() {
            return Ok(false);
        }
        let mut ldap = self.connect().await?;
        let service = self.service_password()?;
        self.bind(&mut ldap, &self.cfg.bind_dn, &service).await?;
        let filter = format!(
            "(&{}({}={}))",
            self.cfg.user_filter,
            self.cfg.user_attr,
            ldap3::ldap_escape(local)
        );
        let (entries, _) = ldap
            .with_timeout(self.timeout())
            .search(&self.cfg.base_dn, Scope::Subtree, &filter, vec!["1.1"])
            .await
            .map_err(|e| self.err(e))?
            .success()
            .map_err(|e| self.err(e))?;
        let _ = ldap.unbind().await;
        let [entry] = entries.as_slice() else {
            // None, or the same name twice: nobody to log in as.
            return Ok(false);
        };
        let dn = SearchEntry::construct(entry.clone()).dn;
        let mut user = self.connect().await?;
        let result = user
            .with_timeout(self.timeout())
            .simple_bind(&dn, password)
            .await
            .map_err(|e| self.err(e))?;
        let _ = user.unbind().await;
        match result.rc {
            0 => Ok(true),
            // invalidCredentials; and the account-state results AD gives a locked or
            // disabled account.
            49 | 50 | 53 => Ok(false),
            rc => Err(self.err(format!("bind as {dn}: result {rc} {}", result.text))),
        }
    }
}

/// The directory's groups as last read, with a stamp that changes with every new reading
/// that differs; `None` until a first reading succeeds.
pub type Feed = tokio::sync::watch::Receiver<Option<(Arc<ExternalGroups>, u64)>>;

/// Longest wait between attempts while no reading has succeeded yet.
const FIRST_READ_RETRY: Duration = Duration::from_secs(5);

/// Reads the directory now and every `every` until `shutdown`; the feed gives each reading
/// that differs from the one before.
pub fn follow(
    ldap: Arc<Ldap>,
    every: Duration,
    mut shutdown: tokio::sync::broadcast::Receiver<()>,
) -> Feed {
    let (tx, rx) = tokio::sync::watch::channel(None::<(Arc<ExternalGroups>, u64)>);
    tokio::spawn(async move {
        let mut stamp = 0u64;
        let mut failing = false;
        loop {
            let started = std::time::Instant::now();
            match ldap.read().await {
                Ok(groups) => {
                    if failing {
                        tracing::info!("directory readable again");
                    }
                    failing = false;
                    let changed = tx.borrow().as_ref().is_none_or(|(g, _)| **g != groups);
                    if changed {
                        stamp += 1;
                        let members: usize = groups.groups.values().map(BTreeSet::len).sum();
                        tracing::info!(
                            groups = groups.groups.len(),
                            memberships = members,
                            ms = started.elapsed().as_millis() as u64,
                            "directory read"
                        );
                        tx.send_replace(Some((Arc::new(groups), stamp)));
                    }
                }
                Err(e) => {
                    if !failing {
                        if tx.borrow().is_some() {
                            tracing::warn!(error = %e, "cannot read the directory; its groups as last read stay in force");
                        } else {
                            tracing::warn!(error = %e, "cannot read the directory; rooms refuse joins until it can be read (a wall must not open for lack of its groups)");
                        }
                    }
                    failing = true;
                }
            }
            let wait = if tx.borrow().is_none() {
                every.min(FIRST_READ_RETRY)
            } else {
                every
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.recv() => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dn: &str, attrs: &[(&str, &[&str])]) -> SearchEntry {
        SearchEntry {
            dn: dn.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
            bin_attrs: HashMap::new(),
        }
    }

    fn ldap() -> Ldap {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        Ldap {
            cfg: DirectoryConfig::default(),
            domain: "example.com".into(),
            tls: Arc::new(tls),
        }
    }

    #[test]
    fn groups_nest_by_dn_and_ous_hold_their_users() {
        let users = [
            entry(
                "uid=alice,ou=EMEA,ou=Legal,ou=people,dc=ex",
                &[("UID", &["Alice"])],
            ),
            entry("uid=bob,ou=people,dc=ex", &[("uid", &["bob"])]),
            entry("uid=x,ou=people,dc=ex", &[("cn", &["no uid"])]),
        ];
        let groups = [
            entry(
                "cn=Trading Desk,ou=groups,dc=ex",
                &[(
                    "member",
                    &[
                        "cn=fx,ou=groups,dc=ex",
                        "UID=Bob, OU=People, DC=ex",
                        "cn=unknown,dc=ex",
                    ],
                )],
            )
            .with_cn("Trading Desk"),
            entry(
                "cn=fx,ou=groups,dc=ex",
                &[("member", &["uid=alice,ou=EMEA,ou=Legal,ou=people,dc=ex"])],
            )
            .with_cn("fx"),
            entry(
                "cn=empty,ou=groups,dc=ex",
                &[("member", &["cn=empty,ou=groups,dc=ex"])],
            )
            .with_cn("empty"),
            entry("cn=bad,ou=groups,dc=ex", &[]).with_cn("bad/name"),
        ];
        let g = ldap().resolve(&users, &groups).groups;
        let p = |s: &str| Principal::parse(s).unwrap();
        assert_eq!(
            g["ldap:trading_desk"],
            BTreeSet::from([p("ldap:fx"), p("bob@example.com")])
        );
        assert_eq!(g["ldap:fx"], BTreeSet::from([p("alice@example.com")]));
        assert!(g["ldap:empty"].is_empty());
        assert!(!g.contains_key("ldap:bad/name"));
        assert_eq!(g["ou:legal"], BTreeSet::from([p("alice@example.com")]));
        assert_eq!(g["ou:emea"], BTreeSet::from([p("alice@example.com")]));
        assert_eq!(
            g["ou:people"],
            BTreeSet::from([p("alice@example.com"), p("bob@example.com")])
        );
    }

    trait WithCn {
        fn with_cn(self, cn: &str) -> SearchEntry;
    }
    impl WithCn for SearchEntry {
        fn with_cn(mut self, cn: &str) -> SearchEntry {
            self.attrs.insert("cn".into(), vec![cn.into()]);
            self
        }
    }
}
