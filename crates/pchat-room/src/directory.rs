//! Principals, groups and categories: Lync's ethical walls, as plain data and one compiled
//! view that answers "may this user be in a room of that category?" without I/O.
//!
//! A [`Directory`] is what the store keeps (one document with a revision): local groups, whose
//! members are principals (users, domains, everyone, other groups: nesting is allowed, cycles
//! are harmless), and categories, each with its allowed, denied and creator principals and its
//! flags. [`Access`] is the directory compiled for lookups: every group expanded once, so a
//! decision is a few hash lookups, whatever the nesting (a join in a category of 10,000
//! principals costs the same as in one of two).
//!
//! The rule is Lync's (S-ROLES): a user may be in a room (member, manager, presenter, occupant,
//! reader of its history) only if the room's category allows the user and does not deny it;
//! denied wins. An administrator is not bound by walls in Lync; pchat has no bypass: a
//! service administrator who must enter a walled room allows itself in the category, which
//! leaves a trace.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The category every room without another one is in; it always exists.
pub const DEFAULT_CATEGORY: &str = "default";
/// Longest group or category name, in characters.
pub const NAME_CHARS_MAX: usize = 64;
/// Most principals one group or one list of a category holds.
pub const PRINCIPALS_MAX: usize = 100_000;

/// Something a rule can name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Principal {
    /// Every user (`*`).
    Everyone,
    /// Every user of a domain (`@example.com`).
    Domain(String),
    /// A local group (`group:traders`).
    Group(String),
    /// One user, by bare JID (`alice@example.com`).
    User(String),
}

/// Why a principal, a group or a category is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DirectoryError(pub String);

fn valid_name(what: &str, name: &str) -> Result<(), DirectoryError> {
    let ok = !name.is_empty()
        && name.chars().count() <= NAME_CHARS_MAX
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DirectoryError(format!(
            "`{name}` is not a valid {what} name: use 1 to {NAME_CHARS_MAX} letters, digits, \
             `-`, `_` or `.`"
        )))
    }
}

impl Principal {
    /// Parses `*`, `@domain`, `group:NAME` or a bare JID `user@domain` (lower-cased).
    pub fn parse(text: &str) -> Result<Principal, DirectoryError> {
        let t = text.trim();
        if t == "*" {
            return Ok(Principal::Everyone);
        }
        if let Some(name) = t.strip_prefix("group:") {
            valid_name("group", name)?;
            return Ok(Principal::Group(name.to_owned()));
        }
        for (prefix, what) in [(OU_PREFIX, "OU"), (LDAP_PREFIX, "directory group")] {
            if let Some(name) = t.strip_prefix(prefix) {
                // Filled by the external directory (`[directory]`): a group of it
                // (`ldap:traders`) or an OU (`ou:legal`: every directory user whose DN holds
                // `ou=legal`, sub-OUs included). Names are compared without case, as LDAP does.
                valid_name(what, name)?;
                return Ok(Principal::Group(format!("{prefix}{}", name.to_lowercase())));
            }
        }
        let bad = || {
            DirectoryError(format!(
                "`{text}` is not a principal: write a user (alice@example.com), a domain \
                 (@example.com), a group (group:traders) or * for everyone"
            ))
        };
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 1023
                && !s
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '@'))
        };
        if let Some(domain) = t.strip_prefix('@') {
            return if plain(domain) {
                Ok(Principal::Domain(domain.to_lowercase()))
            } else {
                Err(bad())
            };
        }
        match t.split_once('@') {
            Some((local, domain)) if plain(local) && plain(domain) => {
                Ok(Principal::User(t.to_lowercase()))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Everyone => f.write_str("*"),
            Principal::Domain(d) => write!(f, "@{d}"),
            Principal::Group(g) if is_external_group(g) => f.write_str(g),
            Principal::Group(g) => write!(f, "group:{g}"),
            Principal::User(u) => f.write_str(u),
        }
    }
}

impl TryFrom<String> for Principal {
    type Error = DirectoryError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Principal::parse(&s)
    }
}

impl From<Principal> for String {
    fn from(p: Principal) -> String {
        p.to_string()
    }
}

/// The name prefix of the groups that stand for directory OUs (`ou:legal`).
pub const OU_PREFIX: &str = "ou:";
/// The name prefix of the external directory's groups (`ldap:traders`).
pub const LDAP_PREFIX: &str = "ldap:";

/// The group a room list entry (member, manager, presenter) names, as [`Access`] knows it:
/// `group:X` → `X`, `ldap:X` and `ou:X` as they are; `None` for a user.
pub fn group_entry(jid: &str) -> Option<&str> {
    match jid.strip_prefix("group:") {
        Some(g) => Some(g),
        None if is_external_group(jid) => Some(jid),
        None => None,
    }
}

/// Whether a group is the external directory's (an LDAP group or OU), not a local one.
pub fn is_external_group(name: &str) -> bool {
    name.starts_with(OU_PREFIX) || name.starts_with(LDAP_PREFIX)
}

/// Groups read from an external directory (LDAP/AD), named `ldap:NAME`, with their members
/// (users, and other groups of the directory: nesting), and its OUs, named `ou:NAME`.
/// Merged with the local groups when the directory is compiled; the prefixes keep the two
/// apart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExternalGroups {
    /// Group name -> members.
    pub groups: BTreeMap<String, BTreeSet<Principal>>,
}

/// A local group of principals.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Group {
    /// Free text.
    pub description: String,
    /// Its members: users, domains, everyone, other groups.
    pub members: BTreeSet<Principal>,
}

/// A category of rooms and its wall.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Category {
    /// Free text.
    pub description: String,
    /// Who may be in its rooms (Lync AllowedMembers). Empty: nobody.
    pub allowed: BTreeSet<Principal>,
    /// Who may not, even if allowed (Lync DeniedMembers): denied wins.
    pub denied: BTreeSet<Principal>,
    /// Who may create rooms in it (Lync Creators); they must be allowed too.
    pub creators: BTreeSet<Principal>,
    /// Rooms may send invitations (Lync Invitations).
    pub invitations: bool,
    /// Rooms may carry files (Lync FileUpload).
    pub file_upload: bool,
    /// Rooms keep their history (Lync ChatHistory); off: messages reach compliance only.
    pub chat_history: bool,
}

impl Default for Category {
    /// A new category: nobody allowed yet, every flag on (Lync's New-CsPersistentChatCategory).
    fn default() -> Self {
        Category {
            description: String::new(),
            allowed: BTreeSet::new(),
            denied: BTreeSet::new(),
            creators: BTreeSet::new(),
            invitations: true,
            file_upload: true,
            chat_history: true,
        }
    }
}

impl Category {
    /// The default category of a new directory: everyone allowed and a creator, so a fresh
    /// server behaves as a plain XMPP MUC service until an administrator builds walls.
    pub fn open() -> Category {
        Category {
            description: "rooms of no other category".into(),
            allowed: BTreeSet::from([Principal::Everyone]),
            creators: BTreeSet::from([Principal::Everyone]),
            ..Category::default()
        }
    }
}

/// Who may use persistent chat at all (Lync's `EnablePersistentChat` policy, global and per
/// principal). A user without it finds, joins and reads no room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// The global policy. On by default, so that a new server serves at once (Lync's global
    /// policy was off until an administrator turned it on).
    pub enabled: bool,
    /// Principals for whom it is on whatever the global policy.
    pub allow: BTreeSet<Principal>,
    /// Principals for whom it is off. Among groups, domains and everyone, off wins; a user
    /// named on either list by name is decided by that entry (a user's own policy wins, as
    /// Lync's user scope did over site and global).
    pub deny: BTreeSet<Principal>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: true,
            allow: BTreeSet::new(),
            deny: BTreeSet::new(),
        }
    }
}

/// Longest add-in name (Lync's `siopName`).
pub const ADDIN_NAME_CHARS_MAX: usize = 50;
/// Longest add-in URL (Lync's `siopUrl`).
pub const ADDIN_URL_CHARS_MAX: usize = 255;

/// An add-in (Lync's conversation extensibility pane): a page clients may show beside a room.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Addin {
    /// An http or https URL.
    pub url: String,
}

/// Checks an add-in URL: http or https, no spaces or control characters, bounded.
pub fn check_addin_url(url: &str) -> Result<(), DirectoryError> {
    let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
    let host_ok = url
        .split_once("://")
        .is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/'));
    if !scheme_ok
        || !host_ok
        || url.chars().count() > ADDIN_URL_CHARS_MAX
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(DirectoryError(format!(
            "`{url}` is not an add-in URL: an http:// or https:// URL with a host, at most \
             {ADDIN_URL_CHARS_MAX} characters, no spaces"
        )));
    }
    Ok(())
}

/// The service's settings (Lync's `Set-CsPersistentChatConfiguration`): `None` leaves a value
/// to the server's configuration file. Kept in the directory document, so a change reaches
/// every server of a pool at once (and follows the database through mirroring, log shipping
/// and failover).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Messages sent on join when the client does not ask (Lync DefaultChatHistory, 1–500),
    /// for every room whose owner did not set its own.
    pub default_chat_history: Option<u32>,
    /// Presence is broadcast in a room while it has at most this many occupants (Lync
    /// ParticipantUpdateLimit, 10–20000), for every room whose owner did not set its own.
    pub participant_update_limit: Option<u32>,
    /// Largest file a user may share, in KiB (Lync MaximumFileSizeKB, 1–2097152).
    pub max_file_size_kb: Option<u32>,
    /// A page where users manage their rooms (Lync RoomManagementUrl), shown in the
    /// service's disco#info.
    pub room_management_url: Option<String>,
}

/// Bounds of [`Settings`] (Lync's, where it had them).
pub const DEFAULT_CHAT_HISTORY_RANGE: std::ops::RangeInclusive<u32> = 1..=500;
/// See [`Settings::participant_update_limit`].
pub const PARTICIPANT_UPDATE_LIMIT_RANGE: std::ops::RangeInclusive<u32> = 10..=20_000;
/// See [`Settings::max_file_size_kb`].
pub const MAX_FILE_SIZE_KB_RANGE: std::ops::RangeInclusive<u32> = 1..=2_097_152;

impl Settings {
    /// Checks the ranges and the URL.
    pub fn validate(&self) -> Result<(), DirectoryError> {
        let check = |name: &str, v: Option<u32>, r: std::ops::RangeInclusive<u32>| match v {
            Some(v) if !r.contains(&v) => Err(DirectoryError(format!(
                "{name} = {v}: give {} to {}",
                r.start(),
                r.end()
            ))),
            _ => Ok(()),
        };
        check(
            "DefaultChatHistory",
            self.default_chat_history,
            DEFAULT_CHAT_HISTORY_RANGE,
        )?;
        check(
            "ParticipantUpdateLimit",
            self.participant_update_limit,
            PARTICIPANT_UPDATE_LIMIT_RANGE,
        )?;
        check(
            "MaxFileSizeKB",
            self.max_file_size_kb,
            MAX_FILE_SIZE_KB_RANGE,
        )?;
        if let Some(u) = &self.room_management_url {
            check_addin_url(u).map_err(|_| {
                DirectoryError(format!(
                    "RoomManagementUrl `{u}`: give an http:// or https:// URL with a host, at most {ADDIN_URL_CHARS_MAX} characters"
                ))
            })?;
        }
        Ok(())
    }
}

/// Groups, categories, the policy and the add-ins: one document in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Directory {
    /// Local groups by name.
    pub groups: BTreeMap<String, Group>,
    /// Categories by name; [`DEFAULT_CATEGORY`] is always there.
    pub categories: BTreeMap<String, Category>,
    /// Who may use persistent chat.
    pub policy: Policy,
    /// Add-ins by name.
    pub addins: BTreeMap<String, Addin>,
    /// The service's settings.
    pub settings: Settings,
}

impl Default for Directory {
    fn default() -> Self {
        Directory {
            groups: BTreeMap::new(),
            categories: BTreeMap::from([(DEFAULT_CATEGORY.to_owned(), Category::open())]),
            policy: Policy::default(),
            addins: BTreeMap::new(),
            settings: Settings::default(),
        }
    }
}

impl Directory {
    /// Checks what no command may leave behind: valid names, the default category present,
    /// every group a rule names defined, lists within [`PRINCIPALS_MAX`].
    pub fn validate(&self) -> Result<(), DirectoryError> {
        if !self.categories.contains_key(DEFAULT_CATEGORY) {
            return Err(DirectoryError(format!(
                "the category `{DEFAULT_CATEGORY}` cannot be removed: rooms of no other category are in it"
            )));
        }
        self.settings.validate()?;
        let known = |p: &Principal, whose: &str| {
            match p {
            Principal::Group(g) if !is_external_group(g) && !self.groups.contains_key(g) => Err(DirectoryError(format!(
                "{whose} names group:{g}, which does not exist (create it with `pchat group new {g}`)"
            ))),
            _ => Ok(()),
        }
        };
        let sized = |n: usize, whose: &str| {
            if n > PRINCIPALS_MAX {
                Err(DirectoryError(format!(
                    "{whose} has {n} principals; at most {PRINCIPALS_MAX} (use groups)"
                )))
            } else {
                Ok(())
            }
        };
        for (name, g) in &self.groups {
            valid_name("group", name)?;
            let whose = format!("group {name}");
            sized(g.members.len(), &whose)?;
            g.members.iter().try_for_each(|p| known(p, &whose))?;
        }
        for (list, items) in [("allow", &self.policy.allow), ("deny", &self.policy.deny)] {
            let whose = format!("the policy's {list} list");
            sized(items.len(), &whose)?;
            items.iter().try_for_each(|p| known(p, &whose))?;
        }
        for (name, a) in &self.addins {
            valid_name("add-in", name)?;
            if name.chars().count() > ADDIN_NAME_CHARS_MAX {
                return Err(DirectoryError(format!(
                    "add-in name `{name}`: at most {ADDIN_NAME_CHARS_MAX} characters"
                )));
            }
            check_addin_url(&a.url)?;
        }
        for (name, c) in &self.categories {
            valid_name("category", name)?;
            for (list, items) in [
                ("allowed", &c.allowed),
                ("denied", &c.denied),
                ("creators", &c.creators),
            ] {
                let whose = format!("category {name}'s {list} list");
                sized(items.len(), &whose)?;
                items.iter().try_for_each(|p| known(p, &whose))?;
            }
        }
        Ok(())
    }

    /// The groups that name `group` as a member, for the error of a removal.
    pub fn groups_naming(&self, group: &str) -> Vec<String> {
        let p = Principal::Group(group.to_owned());
        self.groups
            .iter()
            .filter(|(_, g)| g.members.contains(&p))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// A set of users as a rule sees it: everyone, some domains, some users.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Expanded {
    everyone: bool,
    domains: HashSet<String>,
    users: HashSet<String>,
}

impl Expanded {
    fn contains(&self, bare: &str) -> bool {
        self.everyone
            || self.users.contains(bare)
            || bare
                .rsplit_once('@')
                .is_some_and(|(_, d)| self.domains.contains(d))
    }

    fn add(&mut self, other: &Expanded) {
        self.everyone |= other.everyone;
        self.domains.extend(other.domains.iter().cloned());
        self.users.extend(other.users.iter().cloned());
    }

    fn len(&self) -> usize {
        self.domains.len() + self.users.len() + usize::from(self.everyone)
    }
}

#[derive(Clone, Debug, Default)]
struct CompiledPolicy {
    enabled: bool,
    allow_users: HashSet<String>,
    deny_users: HashSet<String>,
    allow_rest: Expanded,
    deny_rest: Expanded,
}

#[derive(Clone, Debug, Default)]
struct CompiledCategory {
    allowed: Expanded,
    denied: Expanded,
    creators: Expanded,
    flags: Flags,
}

/// A category's switches, as a room applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags {
    /// Invitations allowed.
    pub invitations: bool,
    /// Files allowed.
    pub file_upload: bool,
    /// History kept.
    pub chat_history: bool,
}

impl Default for Flags {
    fn default() -> Self {
        Flags {
            invitations: true,
            file_upload: true,
            chat_history: true,
        }
    }
}

/// The directory compiled for decisions: groups expanded, categories' lists resolved.
/// Cheap to share ([`Arc`]); a new one is compiled when the directory changes.
#[derive(Debug)]
pub struct Access {
    revision: i64,
    policy: CompiledPolicy,
    settings: Settings,
    addins: HashMap<String, String>,
    categories: HashMap<String, CompiledCategory>,
    /// Group → everything it holds, nested groups included.
    groups: HashMap<String, Expanded>,
    /// Groups that hold everyone; by domain; by user (the reverse of `groups`).
    groups_of_everyone: Vec<String>,
    groups_of_domain: HashMap<String, Vec<String>>,
    groups_of_user: HashMap<String, Vec<String>>,
    external_stamp: u64,
}

impl Access {
    /// Everyone allowed everywhere, no groups: what a room sees before a directory is read,
    /// and in tests that are not about walls.
    pub fn open() -> Arc<Access> {
        Arc::new(Access::compile(&Directory::default(), 0))
    }

    /// Compiles a directory read at `revision` with the groups of an external directory
    /// (`external_stamp` tells one reading of it from another).
    pub fn compile_with(
        dir: &Directory,
        revision: i64,
        external: &ExternalGroups,
        external_stamp: u64,
    ) -> Access {
        if external.groups.is_empty() {
            let mut a = Access::compile(dir, revision);
            a.external_stamp = external_stamp;
            return a;
        }
        let mut merged = dir.clone();
        for (name, members) in &external.groups {
            merged
                .groups
                .entry(name.clone())
                .or_default()
                .members
                .extend(members.iter().cloned());
        }
        let mut a = Access::compile(&merged, revision);
        a.external_stamp = external_stamp;
        a
    }

    /// The service's settings as stored.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Which reading of the external directory this was compiled with (0: none).
    pub fn external_stamp(&self) -> u64 {
        self.external_stamp
    }

    /// Compiles a directory read at `revision`.
    pub fn compile(dir: &Directory, revision: i64) -> Access {
        let mut groups: HashMap<String, Expanded> = HashMap::new();
        for name in dir.groups.keys() {
            let mut seen = HashSet::new();
            let e = expand_group(dir, name, &mut seen);
            groups.insert(name.clone(), e);
        }
        let resolve = |set: &BTreeSet<Principal>| {
            let mut e = Expanded::default();
            for p in set {
                match p {
                    Principal::Everyone => e.everyone = true,
                    Principal::Domain(d) => {
                        e.domains.insert(d.clone());
                    }
                    Principal::User(u) => {
                        e.users.insert(u.clone());
                    }
                    Principal::Group(g) => {
                        if let Some(x) = groups.get(g) {
                            e.add(x);
                        }
                    }
                }
            }
            e
        };
        let categories = dir
            .categories
            .iter()
            .map(|(name, c)| {
                (
                    name.clone(),
                    CompiledCategory {
                        allowed: resolve(&c.allowed),
                        denied: resolve(&c.denied),
                        creators: resolve(&c.creators),
                        flags: Flags {
                            invitations: c.invitations,
                            file_upload: c.file_upload,
                            chat_history: c.chat_history,
                        },
                    },
                )
            })
            .collect();
        let mut groups_of_everyone = Vec::new();
        let mut groups_of_domain: HashMap<String, Vec<String>> = HashMap::new();
        let mut groups_of_user: HashMap<String, Vec<String>> = HashMap::new();
        let mut names: Vec<&String> = groups.keys().collect();
        names.sort();
        for name in names {
            let e = &groups[name];
            if e.everyone {
                groups_of_everyone.push(name.clone());
            }
            for d in &e.domains {
                groups_of_domain
                    .entry(d.clone())
                    .or_default()
                    .push(name.clone());
            }
            for u in &e.users {
                groups_of_user
                    .entry(u.clone())
                    .or_default()
                    .push(name.clone());
            }
        }
        let mut policy = CompiledPolicy {
            enabled: dir.policy.enabled,
            ..CompiledPolicy::default()
        };
        for (set, users, rest) in [
            (
                &dir.policy.allow,
                &mut policy.allow_users,
                &mut policy.allow_rest,
            ),
            (
                &dir.policy.deny,
                &mut policy.deny_users,
                &mut policy.deny_rest,
            ),
        ] {
            for p in set {
                match p {
                    Principal::User(u) => {
                        users.insert(u.clone());
                    }
                    other => rest.add(&resolve(&BTreeSet::from([other.clone()]))),
                }
            }
        }
        Access {
            revision,
            policy,
            settings: dir.settings.clone(),
            addins: dir
                .addins
                .iter()
                .map(|(n, a)| (n.clone(), a.url.clone()))
                .collect(),
            categories,
            groups,
            groups_of_everyone,
            groups_of_domain,
            groups_of_user,
            external_stamp: 0,
        }
    }

    /// The directory revision this was compiled from (0: none read).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// May `bare` (a lower-case bare JID) be in a room of `category`? The policy lets it use
    /// persistent chat, and the category allows it and does not deny it.
    pub fn allows(&self, category: &str, bare: &str) -> bool {
        self.policy_allows(bare) && self.category_allows(category, bare)
    }

    /// The category's wall alone: allowed and not denied. A category that does not exist
    /// allows nobody: a wall fails closed. (What room lists are purged by: a user whose
    /// policy is off keeps its memberships for when it is on again.)
    pub fn category_allows(&self, category: &str, bare: &str) -> bool {
        self.categories
            .get(category)
            .is_some_and(|c| c.allowed.contains(bare) && !c.denied.contains(bare))
    }

    /// True when every user may be in the rooms of `category`: the policy lets everyone use
    /// persistent chat, and the category allows everyone and denies nobody. (Files shared in
    /// an open room of such a category are served to whoever holds their link.)
    pub fn open_to_everyone(&self, category: &str) -> bool {
        let p = &self.policy;
        p.enabled
            && p.deny_users.is_empty()
            && p.deny_rest.len() == 0
            && self
                .categories
                .get(category)
                .is_some_and(|c| c.allowed.everyone && c.denied.len() == 0)
    }

    /// May `bare` use persistent chat at all (see [`Policy`])?
    pub fn policy_allows(&self, bare: &str) -> bool {
        let p = &self.policy;
        if p.deny_users.contains(bare) {
            return false;
        }
        if p.allow_users.contains(bare) {
            return true;
        }
        if p.deny_rest.contains(bare) {
            return false;
        }
        p.enabled || p.allow_rest.contains(bare)
    }

    /// The URL of an add-in, if it exists.
    pub fn addin_url(&self, name: &str) -> Option<&str> {
        self.addins.get(name).map(String::as_str)
    }

    /// May `bare` create rooms in `category`? A creator who is also allowed there.
    pub fn may_create(&self, category: &str, bare: &str) -> bool {
        self.allows(category, bare)
            && self
                .categories
                .get(category)
                .is_some_and(|c| c.creators.contains(bare))
    }

    /// True when the category exists.
    pub fn has_category(&self, category: &str) -> bool {
        self.categories.contains_key(category)
    }

    /// The category's switches (defaults for one that does not exist).
    pub fn flags(&self, category: &str) -> Flags {
        self.categories
            .get(category)
            .map(|c| c.flags)
            .unwrap_or_default()
    }

    /// Is `bare` in `group`, directly or through nested groups?
    pub fn in_group(&self, group: &str, bare: &str) -> bool {
        self.groups.get(group).is_some_and(|e| e.contains(bare))
    }

    /// Every group `bare` is in, directly or through nesting.
    pub fn groups_of(&self, bare: &str) -> impl Iterator<Item = &str> {
        let domain = bare.rsplit_once('@').map_or("", |(_, d)| d);
        self.groups_of_everyone
            .iter()
            .chain(self.groups_of_domain.get(domain).into_iter().flatten())
            .chain(self.groups_of_user.get(bare).into_iter().flatten())
            .map(String::as_str)
    }

    /// Number of users and domains a group holds once expanded (1 for everyone).
    pub fn group_size(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, Expanded::len)
    }
}

fn expand_group(dir: &Directory, name: &str, seen: &mut HashSet<String>) -> Expanded {
    let mut e = Expanded::default();
    if !seen.insert(name.to_owned()) {
        // A cycle (a ⊂ b ⊂ a): everything is already being collected.
        return e;
    }
    let Some(g) = dir.groups.get(name) else {
        return e;
    };
    for p in &g.members {
        match p {
            Principal::Everyone => e.everyone = true,
            Principal::Domain(d) => {
                e.domains.insert(d.clone());
            }
            Principal::User(u) => {
                e.users.insert(u.clone());
            }
            Principal::Group(inner) => {
                let x = expand_group(dir, inner, seen);
                e.add(&x);
            }
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Principal {
        Principal::parse(s).unwrap()
    }

    fn set(items: &[&str]) -> BTreeSet<Principal> {
        items.iter().map(|s| p(s)).collect()
    }

    #[test]
    fn principals_parse_and_print_back() {
        for s in ["*", "@example.com", "group:traders", "alice@example.com"] {
            assert_eq!(p(s).to_string(), s);
        }
        assert_eq!(p("Alice@Example.COM").to_string(), "alice@example.com");
        for bad in [
            "",
            "alice",
            "a@b@c",
            "group:",
            "group:a b",
            "@",
            "al ice@x",
            "a@x/res",
        ] {
            assert!(Principal::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Traders and analysts (the reference's ethical wall): nested groups, a denied group
    /// inside an allowed domain, and denied winning over allowed.
    fn wall() -> Directory {
        let mut d = Directory::default();
        d.groups.insert(
            "desk1".into(),
            Group {
                members: set(&["ann@bank.example", "bob@bank.example"]),
                ..Group::default()
            },
        );
        d.groups.insert(
            "traders".into(),
            Group {
                members: set(&["group:desk1", "tom@bank.example"]),
                ..Group::default()
            },
        );
        d.groups.insert(
            "analysts".into(),
            Group {
                members: set(&["ana@bank.example", "group:analysts"]),
                ..Group::default()
            },
        );
        d.categories.insert(
            "trading".into(),
            Category {
                allowed: set(&["@bank.example"]),
                denied: set(&["group:analysts"]),
                creators: set(&["group:traders"]),
                ..Category::default()
            },
        );
        d.validate().unwrap();
        d
    }

    #[test]
    fn the_wall_allows_by_domain_and_group_and_denied_wins() {
        let a = Access::compile(&wall(), 7);
        assert_eq!(a.revision(), 7);
        assert!(a.allows("trading", "ann@bank.example"), "nested group");
        assert!(a.allows("trading", "zed@bank.example"), "domain");
        assert!(!a.allows("trading", "ana@bank.example"), "denied wins");
        assert!(!a.allows("trading", "eve@other.example"), "not allowed");
        assert!(!a.allows("nosuch", "ann@bank.example"), "fails closed");
        assert!(a.allows(DEFAULT_CATEGORY, "eve@other.example"));
        assert!(a.may_create("trading", "bob@bank.example"));
        assert!(!a.may_create("trading", "zed@bank.example"));
        let mut g: Vec<&str> = a.groups_of("ann@bank.example").collect();
        g.sort();
        assert_eq!(g, ["desk1", "traders"]);
        assert!(
            a.in_group("analysts", "ana@bank.example"),
            "a cycle is harmless"
        );
    }

    #[test]
    fn the_policy_decides_before_any_wall_and_a_users_own_entry_wins() {
        let mut d = wall();
        d.policy.enabled = false;
        d.policy.allow.insert(p("group:traders"));
        d.policy.deny.insert(p("group:desk1"));
        d.policy.allow.insert(p("bob@bank.example"));
        let a = Access::compile(&d, 1);
        assert!(a.allows("trading", "tom@bank.example"), "allowed by group");
        assert!(
            !a.allows("trading", "ann@bank.example"),
            "denied group wins over allowed group"
        );
        assert!(
            a.allows("trading", "bob@bank.example"),
            "own entry wins over a denied group"
        );
        assert!(
            !a.allows(DEFAULT_CATEGORY, "eve@other.example"),
            "global off"
        );
        assert!(
            a.category_allows(DEFAULT_CATEGORY, "eve@other.example"),
            "the wall alone"
        );
        d.policy = Policy::default();
        assert!(Access::compile(&d, 2).allows(DEFAULT_CATEGORY, "eve@other.example"));
    }

    #[test]
    fn add_ins_need_an_http_url() {
        let mut d = wall();
        d.addins.insert(
            "stocks".into(),
            Addin {
                url: "https://stocks.example/pane".into(),
            },
        );
        d.validate().unwrap();
        assert_eq!(
            Access::compile(&d, 1).addin_url("stocks"),
            Some("https://stocks.example/pane")
        );
        for bad in [
            "ftp://x",
            "https://",
            "javascript:alert(1)",
            "https://a b",
            "https:///x",
        ] {
            d.addins.get_mut("stocks").unwrap().url = bad.into();
            assert!(d.validate().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn validation_names_the_missing_group_and_keeps_the_default_category() {
        let mut d = wall();
        d.categories
            .get_mut("trading")
            .unwrap()
            .allowed
            .insert(p("group:nosuch"));
        let e = d.validate().unwrap_err().0;
        assert!(
            e.contains("group:nosuch") && e.contains("pchat group new"),
            "{e}"
        );
        let mut d = wall();
        d.categories.remove(DEFAULT_CATEGORY);
        assert!(d.validate().is_err());
        let mut d = wall();
        d.groups.insert("bad name".into(), Group::default());
        assert!(d.validate().is_err());
    }

    #[test]
    fn the_directory_round_trips_through_json() {
        let d = wall();
        let text = serde_json::to_string(&d).unwrap();
        assert!(text.contains("\"group:desk1\""), "{text}");
        let back: Directory = serde_json::from_str(&text).unwrap();
        assert_eq!(back, d);
        assert!(serde_json::from_str::<Directory>(
            r#"{"groups":{"g":{"members":["not a principal"]}}}"#
        )
        .is_err());
    }

    #[test]
    fn ten_thousand_principals_in_nested_groups_compile_and_answer() {
        let mut d = Directory::default();
        for i in 0..100 {
            d.groups.insert(
                format!("team{i}"),
                Group {
                    members: (0..100)
                        .map(|j| p(&format!("u{i}-{j}@big.example")))
                        .collect(),
                    ..Group::default()
                },
            );
        }
        d.groups.insert(
            "all".into(),
            Group {
                members: (0..100).map(|i| p(&format!("group:team{i}"))).collect(),
                ..Group::default()
            },
        );
        d.categories.insert(
            "big".into(),
            Category {
                allowed: set(&["group:all"]),
                ..Category::default()
            },
        );
        d.validate().unwrap();
        let a = Access::compile(&d, 1);
        assert_eq!(a.group_size("all"), 10_000);
        assert_eq!(a.external_stamp(), 0);
        assert!(a.allows("big", "u99-99@big.example"));
        assert!(!a.allows("big", "u100-0@big.example"));
    }

    #[test]
    fn directory_groups_and_ous_come_from_the_external_directory() {
        assert_eq!(p("ldap:Traders"), Principal::Group("ldap:traders".into()));
        assert_eq!(p("ou:Legal").to_string(), "ou:legal");
        assert_eq!(p("ldap:traders").to_string(), "ldap:traders");
        assert!(Principal::parse("ldap:").is_err());
        assert!(Principal::parse("ou:a b").is_err());
        // Rules may name them before the directory has been read: not refused as unknown.
        let mut d = Directory::default();
        d.categories.insert(
            "desk".into(),
            Category {
                allowed: set(&["ldap:traders", "ou:legal"]),
                denied: set(&["ldap:compliance"]),
                ..Category::default()
            },
        );
        d.groups.insert(
            "local".into(),
            Group {
                members: set(&["ldap:traders"]),
                ..Group::default()
            },
        );
        d.validate().unwrap();
        // Without the directory's groups nobody is in them.
        let a = Access::compile(&d, 3);
        assert!(!a.allows("desk", "alice@example.com"));
        // Nested: ldap:traders holds ldap:fx, which holds alice; bob is in ou:legal;
        // carol is a trader but also in compliance (denied wins).
        let ext = ExternalGroups {
            groups: BTreeMap::from([
                (
                    "ldap:traders".into(),
                    set(&["ldap:fx", "carol@example.com"]),
                ),
                ("ldap:fx".into(), set(&["alice@example.com"])),
                ("ldap:compliance".into(), set(&["carol@example.com"])),
                ("ou:legal".into(), set(&["bob@example.com"])),
            ]),
        };
        let a = Access::compile_with(&d, 3, &ext, 7);
        assert_eq!(a.revision(), 3);
        assert_eq!(a.external_stamp(), 7);
        assert!(a.allows("desk", "alice@example.com"));
        assert!(a.allows("desk", "bob@example.com"));
        assert!(!a.allows("desk", "carol@example.com"));
        assert!(!a.allows("desk", "dave@example.com"));
        assert!(
            a.in_group("local", "alice@example.com"),
            "a local group nests a directory one"
        );
    }
}
