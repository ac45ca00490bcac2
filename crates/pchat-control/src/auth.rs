//! etcd's users and roles for a pool (`pchat control auth setup`): every endpoint logs in as
//! its own user, whose one role lets it read what it needs and write only its own keys.
//!
//! | user | role | permissions |
//! |---|---|---|
//! | `root` | `root` | everything; its password is the `etcd.password` of the operator who ran the setup first (it enabled authentication) |
//! | `operator-O` | `pchat-operator` | readwrite `/pchat/` (every pool and its secrets: the shell's commands) |
//! | `server-S` | `pchat-server-S` | read `/pchat/pools/P/`; readwrite `/pchat/pools/P/servers/S/` (its `alive` key under its lease, its `marks`); readwrite `/pchat/pools/P/compliance/` (the compliance exporter's lease); read `/pchat/secrets/P/postgres/server` |
//! | `agent-I` (I in site X) | `pchat-agent-I` | read `/pchat/pools/P/`; readwrite `/pchat/pools/P/instances/J/` for every instance J of site X (its status, and the fences an automatic failover sets and clears); readwrite `/pchat/pools/P/sites/X/` (the site's mirroring record and leader key); read `/pchat/secrets/P/postgres/replication` |
//!
//! What each writes was read from the code (every key is built in [`crate::keys`], and a test
//! there keeps each key under its writer's prefix): servers write only their `alive` and `marks` keys and the compliance exporter's lease;
//! agents write their status, their site's leader key and mirroring record (automatic
//! failover, a lost or returned mirror) and the fences of their site's instances (the
//! automatic failover fences the old principal and clears its own); everything else — the
//! topology, the pool state, log shipping, the procedures' records, fences in another site —
//! is the shell's, as an operator.
//!
//! [`plan`] is pure (a table test shows every role); [`apply`] makes etcd match it, as the
//! `root` user, and is idempotent: re-run after a topology change, it adds what is new,
//! revokes what is no longer planned, removes the users and roles of servers and instances
//! that left, and sets every password again from the identities' `etcd.password` (so a
//! re-issued password takes effect). Every change to users or roles makes etcd refuse the
//! tokens issued before it (`revision of auth store is old`); the clients log in again by
//! themselves.
//!
//! One etcd cluster serves one pool: the user names (`server-S`, …) are not qualified by
//! the pool, and the setup removes the `server-*`/`agent-*` users its topology does not name.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use std::path::Path;

use crate::etcd::{Credentials, Etcd, EtcdError};
use crate::identities::{OwnIdentity, Who, ETCD_PASSWORD_FILE};
use crate::keys;
use crate::topology::Topology;

/// The role of every operator.
pub const OPERATOR_ROLE: &str = "pchat-operator";
/// etcd's administrator: the only user that may change users and roles.
pub const ROOT: &str = "root";
/// What the operators' role covers.
const PCHAT_PREFIX: &str = "/pchat/";

/// Read only, or read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// Read (range).
    Read,
    /// Read and write (put, delete, lease revoke of its keys).
    ReadWrite,
}

impl Access {
    fn wire(self) -> &'static str {
        match self {
            Access::Read => "READ",
            Access::ReadWrite => "READWRITE",
        }
    }
}

/// One permission of a role: a key, or every key under a prefix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Permission {
    /// What it allows.
    pub access: Access,
    /// The key, or the prefix (ending in `/`).
    pub key: String,
    /// Every key starting with `key`, not only `key`.
    pub prefix: bool,
}

impl Permission {
    fn read(key: String, prefix: bool) -> Permission {
        Permission {
            access: Access::Read,
            key,
            prefix,
        }
    }

    fn write(key: String) -> Permission {
        Permission {
            access: Access::ReadWrite,
            key,
            prefix: true,
        }
    }

    /// etcd's `range_end` for this permission (empty: the key alone).
    fn range_end(&self) -> Vec<u8> {
        if self.prefix {
            prefix_end(self.key.as_bytes())
        } else {
            Vec::new()
        }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.access {
            Access::Read => "read",
            Access::ReadWrite => "readwrite",
        };
        let star = if self.prefix { "*" } else { "" };
        write!(f, "{what} {}{star}", self.key)
    }
}

/// The end of the range of keys starting with `prefix` (etcd's `--prefix`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the key space.
    vec![0]
}

/// One user and its one role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPlan {
    /// Whose user it is (its password is in that identity's `etcd.password`).
    pub who: Who,
    /// The etcd user.
    pub user: String,
    /// Its role.
    pub role: String,
}

/// One role and exactly its permissions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolePlan {
    /// The role.
    pub role: String,
    /// Its permissions, sorted.
    pub permissions: Vec<Permission>,
}

/// The users and roles a pool needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The pool.
    pub pool: String,
    /// Roles, in the order of their users.
    pub roles: Vec<RolePlan>,
    /// Users: the topology's servers and instances, then the operators.
    pub users: Vec<UserPlan>,
}

/// The role of `who` (`None` for etcd members, which have no user).
pub fn role_of(who: &Who) -> Option<String> {
    match who {
        Who::Operator(_) => Some(OPERATOR_ROLE.to_owned()),
        Who::Server(s) => Some(format!("pchat-server-{s}")),
        Who::Instance(i) => Some(format!("pchat-agent-{i}")),
        Who::Etcd(_) => None,
    }
}

/// The permissions of `who` in `t` (see the module's table).
pub fn permissions(t: &Topology, who: &Who) -> Vec<Permission> {
    let pool = &t.pool.name;
    let mut perms = match who {
        Who::Operator(_) => vec![Permission::write(PCHAT_PREFIX.to_owned())],
        Who::Server(s) => vec![
            Permission::read(keys::pool_prefix(pool), true),
            Permission::write(keys::server_prefix(pool, s)),
            // The compliance exporter's lease (one exporter per pool).
            Permission::write(keys::compliance_prefix(pool)),
            Permission::read(keys::postgres_password(pool, "server"), false),
        ],
        Who::Instance(i) => {
            let Some((site, _)) = t.instance(i) else {
                return Vec::new();
            };
            let mut p = vec![
                Permission::read(keys::pool_prefix(pool), true),
                Permission::write(keys::site_prefix(pool, &site.name)),
                Permission::read(keys::postgres_password(pool, "replication"), false),
            ];
            p.extend(
                std::iter::once(&site.database)
                    .chain(site.mirror.iter())
                    .map(|d| Permission::write(keys::instance_prefix(pool, &d.name))),
            );
            p
        }
        Who::Etcd(_) => Vec::new(),
    };
    perms.sort();
    perms.dedup();
    perms
}

/// The users and roles for topology `t` and the operators named.
pub fn plan(t: &Topology, operators: &[String]) -> Plan {
    let whos = t
        .identities()
        .into_iter()
        .chain(operators.iter().map(|o| Who::Operator(o.clone())));
    let mut roles: Vec<RolePlan> = Vec::new();
    let mut users = Vec::new();
    for who in whos {
        let (Some(user), Some(role)) = (who.etcd_user(), role_of(&who)) else {
            continue;
        };
        if !roles.iter().any(|r| r.role == role) {
            roles.push(RolePlan {
                role: role.clone(),
                permissions: permissions(t, &who),
            });
        }
        users.push(UserPlan { who, user, role });
    }
    Plan {
        pool: t.pool.name.clone(),
        roles,
        users,
    }
}

/// Whether `name` is a user or role the setup manages (and so removes when not planned).
fn managed_user(name: &str) -> bool {
    ["agent-", "server-", "operator-"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn managed_role(name: &str) -> bool {
    name.starts_with("pchat-")
}

fn strings(v: &Value, field: &str) -> Vec<String> {
    v.get(field)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn decode(v: Option<&Value>) -> Result<Vec<u8>, EtcdError> {
    match v.and_then(Value::as_str) {
        Some(s) => B64
            .decode(s)
            .map_err(|e| EtcdError::Protocol(format!("a role's key: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// The user and role administration the setup needs (etcd's `/v3/auth/…`, root only).
impl Etcd {
    /// Every user.
    pub async fn user_list(&self) -> Result<Vec<String>, EtcdError> {
        Ok(strings(
            &self.call("/v3/auth/user/list", json!({})).await?,
            "users",
        ))
    }

    /// The roles of `user`.
    pub async fn user_roles(&self, user: &str) -> Result<Vec<String>, EtcdError> {
        Ok(strings(
            &self
                .call("/v3/auth/user/get", json!({ "name": user }))
                .await?,
            "roles",
        ))
    }

    /// Every role.
    pub async fn role_list(&self) -> Result<Vec<String>, EtcdError> {
        Ok(strings(
            &self.call("/v3/auth/role/list", json!({})).await?,
            "roles",
        ))
    }

    /// The permissions of `role`, as (access, key, range end) — `None` for one that does
    /// not fit [`Permission`] (a range that is not a prefix), which the setup revokes.
    pub async fn role_permissions(
        &self,
        role: &str,
    ) -> Result<Vec<(Option<Permission>, Vec<u8>, Vec<u8>)>, EtcdError> {
        let v = self
            .call("/v3/auth/role/get", json!({ "role": role }))
            .await?;
        let mut out = Vec::new();
        for p in v
            .get("perm")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = decode(p.get("key"))?;
            let end = decode(p.get("range_end"))?;
            // The gateway leaves out zero values: no permType is READ.
            let access = match p.get("permType").and_then(Value::as_str) {
                None | Some("READ") => Some(Access::Read),
                Some("READWRITE") => Some(Access::ReadWrite),
                Some(_) => None,
            };
            let text = String::from_utf8(key.clone()).ok();
            let perm = match (access, text) {
                (Some(access), Some(k)) if end.is_empty() => Some(Permission {
                    access,
                    key: k,
                    prefix: false,
                }),
                (Some(access), Some(k)) if end == prefix_end(k.as_bytes()) => Some(Permission {
                    access,
                    key: k,
                    prefix: true,
                }),
                _ => None,
            };
            out.push((perm, key, end));
        }
        Ok(out)
    }

    async fn auth_call(&self, path: &str, body: Value) -> Result<(), EtcdError> {
        self.call(path, body).await.map(drop)
    }
}

/// Sets etcd user `user`'s password, on a client logged in as `root`.
pub async fn change_password(root: &Etcd, user: &str, password: &str) -> Result<(), EtcdError> {
    root.auth_call(
        "/v3/auth/user/changepw",
        json!({ "name": user, "password": password }),
    )
    .await
}

/// Makes etcd's users and roles match `plan`, then enables authentication. `etcd` is the
/// operator's client logged in as `root` with `root_password` (before authentication is
/// enabled, etcd takes the requests without a login, and `root` is created with that
/// password). `password` gives each planned user's password. Returns what it changed, one
/// line each.
pub async fn apply(
    etcd: &Etcd,
    plan: &Plan,
    root_password: &str,
    password: &dyn Fn(&Who) -> Result<String, EtcdError>,
) -> Result<Vec<String>, EtcdError> {
    let mut done = Vec::new();
    let users = etcd.user_list().await?;
    let enabled = etcd.logged_in();
    if !users.iter().any(|u| u == ROOT) {
        etcd.auth_call(
            "/v3/auth/user/add",
            json!({ "name": ROOT, "password": root_password }),
        )
        .await?;
        done.push(format!("created user {ROOT}"));
    } else if !enabled {
        // Not enabled yet: whoever enables it is root from now on.
        etcd.auth_call(
            "/v3/auth/user/changepw",
            json!({ "name": ROOT, "password": root_password }),
        )
        .await?;
    }
    if !etcd.user_roles(ROOT).await?.iter().any(|r| r == ROOT) {
        etcd.auth_call("/v3/auth/user/grant", json!({ "user": ROOT, "role": ROOT }))
            .await?;
        done.push(format!("granted role {ROOT} to user {ROOT}"));
    }

    let roles = etcd.role_list().await?;
    for r in &plan.roles {
        if !roles.contains(&r.role) {
            etcd.auth_call("/v3/auth/role/add", json!({ "name": r.role }))
                .await?;
            done.push(format!("created role {}", r.role));
        }
        let current = etcd.role_permissions(&r.role).await?;
        for (perm, key, end) in &current {
            if perm.as_ref().is_some_and(|p| r.permissions.contains(p)) {
                continue;
            }
            etcd.auth_call(
                "/v3/auth/role/revoke",
                json!({ "role": r.role, "key": B64.encode(key), "range_end": B64.encode(end) }),
            )
            .await?;
            let what = perm.as_ref().map_or_else(
                || String::from_utf8_lossy(key).into_owned(),
                ToString::to_string,
            );
            done.push(format!("revoked {what} from role {}", r.role));
        }
        for p in &r.permissions {
            if current.iter().any(|(c, _, _)| c.as_ref() == Some(p)) {
                continue;
            }
            etcd.auth_call(
                "/v3/auth/role/grant",
                json!({ "name": r.role, "perm": {
                    "permType": p.access.wire(),
                    "key": B64.encode(&p.key),
                    "range_end": B64.encode(p.range_end()),
                }}),
            )
            .await?;
            done.push(format!("granted {p} to role {}", r.role));
        }
    }

    for u in &plan.users {
        let pw = password(&u.who)?;
        if users.contains(&u.user) {
            // Always: a password issued again (`pki issue --renew`) takes effect, and etcd
            // cannot tell whether the stored one is the same.
            etcd.auth_call(
                "/v3/auth/user/changepw",
                json!({ "name": u.user, "password": pw }),
            )
            .await?;
        } else {
            etcd.auth_call(
                "/v3/auth/user/add",
                json!({ "name": u.user, "password": pw }),
            )
            .await?;
            done.push(format!("created user {} ({})", u.user, u.who));
        }
        let has = etcd.user_roles(&u.user).await?;
        for extra in has.iter().filter(|r| **r != u.role) {
            etcd.auth_call(
                "/v3/auth/user/revoke",
                json!({ "name": u.user, "role": extra }),
            )
            .await?;
            done.push(format!("revoked role {extra} from user {}", u.user));
        }
        if !has.contains(&u.role) {
            etcd.auth_call(
                "/v3/auth/user/grant",
                json!({ "user": u.user, "role": u.role }),
            )
            .await?;
            done.push(format!("granted role {} to user {}", u.role, u.user));
        }
    }

    // Whoever left the topology (or whose operator identity was removed) loses its user.
    for gone in users
        .iter()
        .filter(|u| managed_user(u) && !plan.users.iter().any(|p| &p.user == *u))
    {
        etcd.auth_call("/v3/auth/user/delete", json!({ "name": gone }))
            .await?;
        done.push(format!("removed user {gone}"));
    }
    for gone in etcd
        .role_list()
        .await?
        .iter()
        .filter(|r| managed_role(r) && !plan.roles.iter().any(|p| &p.role == *r))
    {
        etcd.auth_call("/v3/auth/role/delete", json!({ "role": gone }))
            .await?;
        done.push(format!("removed role {gone}"));
    }

    if !enabled {
        etcd.auth_call("/v3/auth/enable", json!({})).await?;
        done.push("enabled authentication".to_owned());
    }
    Ok(done)
}

/// The operators whose identities are in the PKI directory `pki` (`operators/O/` with an
/// `etcd.password`), sorted.
pub fn operators_in(pki: &Path) -> Result<Vec<String>, EtcdError> {
    let dir = pki.join("operators");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(EtcdError::Access(format!("{}: {e}", dir.display()))),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| EtcdError::Access(format!("{}: {e}", dir.display())))?;
        if e.path().join(ETCD_PASSWORD_FILE).is_file() {
            if let Some(name) = e.file_name().to_str() {
                out.push(name.to_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The client `pchat control auth setup` works with: the operator identity in `operator_dir`
/// over TLS, logged in as `root` with the operator's etcd password (which becomes root's if
/// authentication is not enabled yet). Returns it with that password.
pub fn root_client(endpoints: &[String], operator_dir: &Path) -> Result<(Etcd, String), EtcdError> {
    let me = OwnIdentity::load(operator_dir)?;
    if !matches!(me.who, Who::Operator(_)) {
        return Err(EtcdError::Access(format!(
            "{} is the identity of {}: the setup runs with an operator's identity (`pchat pki issue --operator NAME`)",
            operator_dir.display(),
            me.who
        )));
    }
    let password = me.etcd_password()?;
    let etcd = me.etcd_as(
        endpoints,
        Some(Credentials {
            user: ROOT.to_owned(),
            password: password.clone(),
        }),
    )?;
    Ok((etcd, password))
}

/// Where [`rotate_root`] keeps the new password until etcd has it, beside the operator's
/// `etcd.password` (0600): written before anything changes in etcd, so a rotation cut short
/// never leaves root with a password nobody holds.
pub const NEXT_PASSWORD_FILE: &str = "etcd.password.next";

/// `pchat control auth rotate-root`: gives etcd's `root` user — and the operator's own user,
/// which shares the operator's `etcd.password` — a new random password, and makes it the
/// operator's. Run with the identity of the operator whose password root has (the one who
/// enabled authentication). Steps: the new password into [`NEXT_PASSWORD_FILE`]; root's
/// password changed (logged in with the current one — or, after an interrupted run, found
/// already changed); the operator user's password changed; the file renamed over
/// `etcd.password`. Re-running after an interruption finishes the same rotation. Returns what
/// it did, one line each.
pub async fn rotate_root(
    endpoints: &[String],
    operator_dir: &Path,
) -> Result<Vec<String>, EtcdError> {
    let (_, current) = root_client(endpoints, operator_dir)?;
    let me = OwnIdentity::load(operator_dir)?;
    let Some(user) = me.who.etcd_user() else {
        return Err(EtcdError::Access(format!("{} has no etcd user", me.who)));
    };
    let next_path = operator_dir.join(NEXT_PASSWORD_FILE);
    let tls_error = |e: pchat_tls::TlsError| EtcdError::Access(e.to_string());
    // Kept if an interrupted run made it (etcd may already have it).
    pchat_tls::fs::ensure_secret(&next_path).map_err(tls_error)?;
    let next = pchat_tls::fs::read_secret(&next_path).map_err(tls_error)?;
    let as_root = |password: &str| {
        me.etcd_as(
            endpoints,
            Some(Credentials {
                user: ROOT.to_owned(),
                password: password.to_owned(),
            }),
        )
    };
    let mut done = Vec::new();
    let change = json!({ "name": ROOT, "password": next });
    match as_root(&current)?
        .auth_call("/v3/auth/user/changepw", change)
        .await
    {
        Ok(()) => done.push(format!("changed the password of etcd user {ROOT}")),
        Err(EtcdError::Unauthenticated { .. }) => {
            // An earlier run changed it and stopped before the rename: root has `next`.
            as_root(&next)?.user_list().await.map_err(|e| {
                EtcdError::Access(format!(
                    "neither {} nor {} is root's password ({e}): run this with the identity of the operator who enabled authentication",
                    operator_dir.join(ETCD_PASSWORD_FILE).display(),
                    next_path.display()
                ))
            })?;
            done.push(format!(
                "etcd user {ROOT} already had the new password (an interrupted rotation)"
            ));
        }
        Err(e) => return Err(e),
    }
    // The change invalidated every token: a new login, with the new password.
    as_root(&next)?
        .auth_call(
            "/v3/auth/user/changepw",
            json!({ "name": user, "password": next }),
        )
        .await?;
    done.push(format!("changed the password of etcd user {user}"));
    let file = operator_dir.join(ETCD_PASSWORD_FILE);
    std::fs::rename(&next_path, &file).map_err(|e| {
        EtcdError::Access(format!(
            "renaming {} to {}: {e} (the new password is in the first: rename it by hand)",
            next_path.display(),
            file.display()
        ))
    })?;
    done.push(format!("{} holds the new password", file.display()));
    Ok(done)
}

/// `pchat control auth setup`: the users and roles of topology `t` and of every operator in
/// the PKI directory `pki` (passwords from the identities' `etcd.password` there), applied
/// with `root` (see [`root_client`]), then authentication enabled.
pub async fn setup(
    root: &Etcd,
    root_password: &str,
    t: &Topology,
    pki: &Path,
) -> Result<(Plan, Vec<String>), EtcdError> {
    let plan = plan(t, &operators_in(pki)?);
    let password = |who: &Who| {
        pchat_tls::fs::read_secret(&pki.join(who.path()).join(ETCD_PASSWORD_FILE)).map_err(|e| {
            EtcdError::Access(format!(
                "{who}: {e} (run `pchat pki issue --dir {} --topology FILE` first)",
                pki.display()
            ))
        })
    };
    // Every password first: a missing one stops the setup before it changes anything.
    for u in &plan.users {
        password(&u.who)?;
    }
    let done = apply(root, &plan, root_password, &password).await?;
    Ok((plan, done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{parse, tests_support::GOOD};

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/pchat/"), b"/pchat0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    /// Every role of the test topology, exactly: this table is the security review of the
    /// control plane.
    #[test]
    fn every_role_and_its_permissions() {
        let t = parse(GOOD).unwrap();
        let plan = plan(&t, &["admin".to_owned(), "night".to_owned()]);
        let show: Vec<(String, String, Vec<String>)> = plan
            .users
            .iter()
            .map(|u| {
                let r = plan.roles.iter().find(|r| r.role == u.role).unwrap();
                (
                    u.user.clone(),
                    u.role.clone(),
                    r.permissions.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        let row = |user: &str, role: &str, perms: &[&str]| {
            (
                user.to_owned(),
                role.to_owned(),
                perms.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        let site_a = [
            "read /pchat/pools/pc1/*",
            "read /pchat/secrets/pc1/postgres/replication",
            "readwrite /pchat/pools/pc1/instances/a_db/*",
            "readwrite /pchat/pools/pc1/instances/a_mirror/*",
            "readwrite /pchat/pools/pc1/sites/A/*",
        ];
        assert_eq!(
            show,
            vec![
                row("agent-a_db", "pchat-agent-a_db", &site_a),
                row("agent-a_mirror", "pchat-agent-a_mirror", &site_a),
                row(
                    "agent-b_db",
                    "pchat-agent-b_db",
                    &[
                        "read /pchat/pools/pc1/*",
                        "read /pchat/secrets/pc1/postgres/replication",
                        "readwrite /pchat/pools/pc1/instances/b_db/*",
                        "readwrite /pchat/pools/pc1/sites/B/*",
                    ]
                ),
                row(
                    "server-a1",
                    "pchat-server-a1",
                    &[
                        "read /pchat/pools/pc1/*",
                        "read /pchat/secrets/pc1/postgres/server",
                        "readwrite /pchat/pools/pc1/compliance/*",
                        "readwrite /pchat/pools/pc1/servers/a1/*",
                    ]
                ),
                row(
                    "server-b1",
                    "pchat-server-b1",
                    &[
                        "read /pchat/pools/pc1/*",
                        "read /pchat/secrets/pc1/postgres/server",
                        "readwrite /pchat/pools/pc1/compliance/*",
                        "readwrite /pchat/pools/pc1/servers/b1/*",
                    ]
                ),
                row("operator-admin", OPERATOR_ROLE, &["readwrite /pchat/*"]),
                row("operator-night", OPERATOR_ROLE, &["readwrite /pchat/*"]),
            ]
        );
        // One role for all operators; etcd members have no user.
        assert_eq!(plan.roles.len(), 6);
        assert!(plan.users.iter().all(|u| !matches!(u.who, Who::Etcd(_))));
        assert!(managed_user("server-a1") && !managed_user(ROOT));
    }
}
