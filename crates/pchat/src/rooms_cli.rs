//! Lync's room model from the shell: groups, categories with their walls, and rooms made,
//! changed, disabled and removed by an administrator (New-/Set-/Get-/Remove-
//! CsPersistentChatCategory and …Room; `docs/lync-cmdlets.md` maps them).
//!
//! Where a change goes: in a pool, the pool's PostgreSQL (every server hears of room changes
//! at once and reads the directory within `[rooms] directory_refresh_ms`); standalone with a
//! server running, room records through the server's management socket (its own writer makes
//! them, and the loaded room applies them to its occupants at once) and the directory into
//! the data directory, then the server is told to read it; standalone without a server,
//! straight into the data directory.

use std::collections::BTreeSet;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand, ValueEnum};
use pchat_room::directory::{Access, Category, Directory, Group, Principal, DEFAULT_CATEGORY};
use pchat_room::{
    Affiliation, AffiliationEntry, ComplianceKind, NewComplianceEvent, RoomConfig, RoomRecord,
};
use pchat_server::admin::{AdminClient, AdminWrite};
use pchat_server::server::{load_config, open_store, prepare_data_dir, Overrides};
use pchat_store::{Store, StoreError};

use crate::Target;

/// Who the compliance record names for a change made from the shell.
const SHELL_ACTOR: &str = "pchat-shell";
/// Times a directory change is tried again when another administrator changed it meanwhile.
const DIRECTORY_ATTEMPTS: u32 = 3;

#[derive(Subcommand)]
pub(crate) enum GroupCommand {
    /// Create a local group.
    ///
    /// Example: pchat group new traders --member alice@example.com --member group:desk1
    New {
        /// Group name: letters, digits, `-`, `_`, `.`.
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// A member: a user, @domain, group:NAME or * (repeat the option).
        #[arg(long = "member", value_name = "PRINCIPAL")]
        members: Vec<String>,
        /// Members from a file, one principal a line (blank lines and `#` comments skipped).
        #[arg(long, value_name = "FILE")]
        from_file: Option<std::path::PathBuf>,
    },
    /// Add members to a group.
    ///
    /// Example: pchat group add traders bob@example.com group:desk2
    Add {
        /// Group name.
        name: String,
        /// Users, @domains, group:NAMEs or *.
        #[arg(value_name = "PRINCIPAL", required_unless_present = "from_file")]
        members: Vec<String>,
        /// Members from a file, one principal a line (blank lines and `#` comments skipped).
        #[arg(long, value_name = "FILE")]
        from_file: Option<std::path::PathBuf>,
    },
    /// Remove members from a group (whoever loses access through it leaves walled rooms at once).
    ///
    /// Example: pchat group remove traders bob@example.com
    Remove {
        /// Group name.
        name: String,
        /// Members to remove.
        #[arg(required = true, value_name = "PRINCIPAL")]
        members: Vec<String>,
    },
    /// Delete a group that no category and no other group names.
    ///
    /// Example: pchat group delete desk2
    Delete {
        /// Group name.
        name: String,
    },
    /// List the groups.
    ///
    /// Example: pchat group list --json
    List,
    /// Show a group's members and how many users and domains it holds once nested groups
    /// are expanded.
    ///
    /// Example: pchat group show traders
    Show {
        /// Group name.
        name: String,
    },
}

/// On or off.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

impl Switch {
    fn on(self) -> bool {
        matches!(self, Switch::On)
    }
}

/// A room's invitations (Lync: `Inherit` or `False`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum RoomInvitations {
    /// As its category says.
    Inherit,
    /// None, whatever its category says.
    Off,
}

#[derive(Args)]
pub(crate) struct CategoryChanges {
    /// Free text.
    #[arg(long)]
    description: Option<String>,
    /// Allow a principal in the category's rooms (Lync AllowedMembers; repeatable).
    #[arg(long = "add-allowed", value_name = "PRINCIPAL")]
    add_allowed: Vec<String>,
    /// Take a principal off the allowed list.
    #[arg(long = "remove-allowed", value_name = "PRINCIPAL")]
    remove_allowed: Vec<String>,
    /// Deny a principal (Lync DeniedMembers): denied wins over allowed.
    #[arg(long = "add-denied", value_name = "PRINCIPAL")]
    add_denied: Vec<String>,
    /// Take a principal off the denied list.
    #[arg(long = "remove-denied", value_name = "PRINCIPAL")]
    remove_denied: Vec<String>,
    /// Let a principal create rooms in the category (Lync Creators).
    #[arg(long = "add-creator", value_name = "PRINCIPAL")]
    add_creator: Vec<String>,
    /// Take a principal off the creators.
    #[arg(long = "remove-creator", value_name = "PRINCIPAL")]
    remove_creator: Vec<String>,
    /// Rooms may send invitations.
    #[arg(long)]
    invitations: Option<Switch>,
    /// Rooms may carry files.
    #[arg(long)]
    file_upload: Option<Switch>,
    /// Rooms keep their history (off: messages go to compliance only).
    #[arg(long)]
    chat_history: Option<Switch>,
}

#[derive(Subcommand)]
pub(crate) enum CategoryCommand {
    /// Create a category (nobody allowed until you allow someone).
    ///
    /// Example: pchat category new trading --add-allowed @bank.example --add-denied group:analysts --add-creator group:traders
    New {
        /// Category name: letters, digits, `-`, `_`, `.`.
        name: String,
        #[command(flatten)]
        changes: CategoryChanges,
    },
    /// Change a category; members of its rooms that it no longer allows are removed from
    /// them, and occupants it no longer allows leave at once (status 321).
    ///
    /// Example: pchat category set trading --add-denied carol@bank.example --chat-history off
    Set {
        /// Category name.
        name: String,
        #[command(flatten)]
        changes: CategoryChanges,
    },
    /// Show one category, or all.
    ///
    /// Example: pchat category get trading --json
    Get {
        /// Category name (all when left out).
        name: Option<String>,
    },
    /// Remove an empty category (move or remove its rooms first, as in Lync).
    ///
    /// Example: pchat category remove trading
    Remove {
        /// Category name.
        name: String,
    },
}

/// Lync's room privacy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Privacy {
    /// Anyone the category allows finds it and may enter.
    Open,
    /// Anyone the category allows finds it; only members enter (Lync's default).
    Closed,
    /// Only members find it or enter.
    Secret,
}

/// Lync's room type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum RoomType {
    /// Every member may post.
    Normal,
    /// Only presenters (and managers) post; everyone else reads.
    Auditorium,
}

#[derive(Args)]
pub(crate) struct RoomNew {
    /// The room: its JID or the name before the @ (ops → ops@conference.DOMAIN).
    room: String,
    /// The category (its wall decides who may be in the room).
    #[arg(long, default_value = DEFAULT_CATEGORY)]
    category: String,
    /// Display name (muc#roomconfig_roomname).
    #[arg(long)]
    name: Option<String>,
    /// Description.
    #[arg(long, default_value = "")]
    description: String,
    /// Privacy.
    #[arg(long, value_enum, default_value_t = Privacy::Closed)]
    privacy: Privacy,
    /// Type.
    #[arg(long = "type", value_enum, default_value_t = RoomType::Normal)]
    kind: RoomType,
    /// A manager (XMPP owner): a user or group:NAME (repeatable).
    #[arg(long = "manager", value_name = "PRINCIPAL")]
    managers: Vec<String>,
    /// A member: a user or group:NAME (repeatable).
    #[arg(long = "member", value_name = "PRINCIPAL")]
    members: Vec<String>,
    /// A presenter, who may post in an auditorium: a user or group:NAME (repeatable).
    #[arg(long = "presenter", value_name = "PRINCIPAL")]
    presenters: Vec<String>,
    /// Create it disabled.
    #[arg(long)]
    disabled: bool,
    /// Invitations: as the category says, or off for this room.
    #[arg(long, value_enum, default_value_t = RoomInvitations::Inherit)]
    invitations: RoomInvitations,
    /// Show this registered add-in with the room (`pchat addin get`).
    #[arg(long)]
    addin: Option<String>,
}

#[derive(Args)]
pub(crate) struct RoomSet {
    /// The room: its JID or the name before the @.
    room: String,
    /// Move it to another category; members the new one does not allow are removed.
    #[arg(long)]
    category: Option<String>,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Description.
    #[arg(long)]
    description: Option<String>,
    /// Privacy.
    #[arg(long, value_enum)]
    privacy: Option<Privacy>,
    /// Type.
    #[arg(long = "type", value_enum)]
    kind: Option<RoomType>,
    /// Add a manager (user or group:NAME).
    #[arg(long = "add-manager", value_name = "PRINCIPAL")]
    add_managers: Vec<String>,
    /// Remove a manager.
    #[arg(long = "remove-manager", value_name = "PRINCIPAL")]
    remove_managers: Vec<String>,
    /// Add a member (user or group:NAME).
    #[arg(long = "add-member", value_name = "PRINCIPAL")]
    add_members: Vec<String>,
    /// Remove a member.
    #[arg(long = "remove-member", value_name = "PRINCIPAL")]
    remove_members: Vec<String>,
    /// Add a presenter (user or group:NAME).
    #[arg(long = "add-presenter", value_name = "PRINCIPAL")]
    add_presenters: Vec<String>,
    /// Remove a presenter.
    #[arg(long = "remove-presenter", value_name = "PRINCIPAL")]
    remove_presenters: Vec<String>,
    /// Show this registered add-in with the room.
    #[arg(long, conflicts_with = "no_addin")]
    addin: Option<String>,
    /// Show no add-in.
    #[arg(long)]
    no_addin: bool,
    /// Invitations: as the category says, or off for this room.
    #[arg(long, value_enum)]
    invitations: Option<RoomInvitations>,
}

/// Where the shell's changes go (see the module's documentation).
pub(crate) struct Admin {
    pub config: pchat_server::Config,
    pub store: Box<dyn Store>,
    server: Option<AdminClient>,
}

impl Admin {
    pub async fn open(t: &Target) -> anyhow::Result<Admin> {
        if t.in_pool.is_some() {
            let (config, store) = crate::open(t).await?;
            return Ok(Admin {
                config,
                store,
                server: None,
            });
        }
        let dir = &t.data_dir;
        prepare_data_dir(dir)?;
        let config = load_config(dir, &Overrides::default())?;
        if let Some(server) = AdminClient::find(dir).await {
            let store = open_store(dir, &config, true)?;
            return Ok(Admin {
                config,
                store: Box::new(store),
                server: Some(server),
            });
        }
        let store = open_store(dir, &config, false).with_context(|| {
            format!(
                "opening {} (no server answers on its {} socket)",
                dir.display(),
                pchat_server::admin::SOCKET
            )
        })?;
        Ok(Admin {
            config,
            store: Box::new(store),
            server: None,
        })
    }

    /// Commits room changes; answers what each write did (see [`pchat_server::admin::Outcomes`]).
    pub(crate) async fn commit(
        &self,
        writes: Vec<AdminWrite>,
    ) -> Result<pchat_server::admin::Outcomes, StoreError> {
        if let Some(server) = &self.server {
            return server.commit(writes).await;
        }
        let writes = writes.into_iter().map(AdminWrite::into_write).collect();
        Ok(pchat_server::admin::outcomes(
            &self.store.commit(writes).await?,
        ))
    }

    /// Invites users to a room (Lync: members added to a room with invitations on are told):
    /// delivered now by a running standalone server, otherwise kept for each user's next
    /// login (in a pool, on whichever server it logs in to).
    async fn invite(&self, room: &RoomRecord, users: &[String]) -> anyhow::Result<()> {
        let name = if room.config.name.is_empty() {
            room.jid.clone()
        } else {
            room.config.name.clone()
        };
        let reason = format!("You are now a member of {name}");
        let stanzas: Vec<(String, String)> = users
            .iter()
            .filter(|u| pchat_room::directory::group_entry(u).is_none())
            .map(|u| {
                let m = pchat_xmpp::Element::new("message", pchat_xmpp::ns::CLIENT)
                    .attr("from", room.jid.as_str())
                    .attr("to", u.as_str())
                    .child(
                        pchat_xmpp::Element::new("x", pchat_xmpp::ns::MUC_USER).child(
                            pchat_xmpp::Element::new("invite", pchat_xmpp::ns::MUC_USER)
                                .attr("from", room.jid.as_str())
                                .child(
                                    pchat_xmpp::Element::new("reason", pchat_xmpp::ns::MUC_USER)
                                        .text(reason.as_str()),
                                ),
                        ),
                    )
                    .child(
                        pchat_xmpp::Element::new("x", pchat_xmpp::ns::CONFERENCE)
                            .attr("jid", room.jid.as_str())
                            .attr("reason", reason.as_str()),
                    );
                (u.clone(), m.to_xml())
            })
            .collect();
        if stanzas.is_empty() {
            return Ok(());
        }
        match &self.server {
            Some(server) => server
                .invite(stanzas.into_iter().map(|(_, s)| s).collect())
                .await
                .context("telling the new members")?,
            None => {
                for (user, stanza) in stanzas {
                    self.store.invitation_keep(&user, &stanza).await?;
                }
            }
        }
        Ok(())
    }

    /// Tells a running standalone server to read the directory now (a pool's servers look
    /// every `directory_refresh_ms`).
    async fn directory_changed(&self) -> anyhow::Result<()> {
        if let Some(server) = &self.server {
            server
                .directory_changed()
                .await
                .context("the directory is saved, but the running server could not be told")?;
        }
        Ok(())
    }
}

/// Principals listed in a file, one a line; none without a file.
fn read_principals(file: Option<&std::path::Path>) -> anyhow::Result<Vec<String>> {
    let Some(file) = file else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading principals from {}", file.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

fn principals(items: &[String]) -> anyhow::Result<Vec<Principal>> {
    items
        .iter()
        .map(|s| Principal::parse(s).map_err(|e| anyhow::anyhow!(e.0)))
        .collect()
}

fn compliance(kind: ComplianceKind, room: &str, detail: String) -> AdminWrite {
    AdminWrite::Compliance(NewComplianceEvent {
        kind,
        at: pchat_server::datetime::now(),
        room: room.to_owned(),
        actor: SHELL_ACTOR.to_owned(),
        nick: None,
        detail,
    })
}

/// Changes the directory with `edit` (read, edit, compare-and-set, retried when another
/// administrator won the race), tells the server, then brings every room record in line
/// with the new walls. Returns the directory saved.
async fn edit_directory(
    admin: &Admin,
    edit: impl Fn(&mut Directory) -> anyhow::Result<()>,
) -> anyhow::Result<Directory> {
    let mut attempt = 0;
    let saved = loop {
        attempt += 1;
        let stored = admin.store.directory_get().await?;
        let mut d = stored.directory.clone();
        edit(&mut d)?;
        d.validate().map_err(|e| anyhow::anyhow!(e.0))?;
        match admin.store.directory_put(&d, stored.revision).await {
            Ok(revision) => break (d, revision),
            Err(StoreError::Conflict(_)) if attempt < DIRECTORY_ATTEMPTS => continue,
            Err(e) => return Err(e.into()),
        }
    };
    admin.directory_changed().await?;
    let (d, revision) = saved;
    purge_walled(admin, &Access::compile(&d, revision)).await?;
    Ok(d)
}

/// Removes from every room's record the members, managers and presenters its category no
/// longer allows (Lync purges them when a wall changes), recording each removal. Occupants
/// leave by the servers' own check; this keeps the lists honest.
async fn purge_walled(admin: &Admin, access: &Access) -> anyhow::Result<()> {
    for record in admin.store.room_list().await? {
        for _ in 0..3 {
            let Some(stored) = admin.store.room_load(&record.jid).await? else {
                break;
            };
            let mut r = stored.record.clone();
            let removed = walled_entries(&mut r, access);
            if removed.is_empty() {
                break;
            }
            let detail = format!(
                "removed by the wall of category {}: {}",
                r.category,
                removed.join(", ")
            );
            let jid = r.jid.clone();
            match admin
                .commit(vec![
                    AdminWrite::PutRoom {
                        record: Box::new(r),
                        revision: Some(stored.revision),
                    },
                    compliance(ComplianceKind::AffiliationChange, &jid, detail.clone()),
                ])
                .await
            {
                Ok(_) => {
                    println!("{jid}: {detail}");
                    break;
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Takes the entries of users the room's category does not allow off its affiliation and
/// voice lists (bans stay: they keep someone out, which a wall never undoes); returns them.
fn walled_entries(r: &mut RoomRecord, access: &Access) -> Vec<String> {
    let mut removed = Vec::new();
    let category = r.category.clone();
    r.affiliations.retain(|a| {
        let keep = a.affiliation == Affiliation::Outcast
            || pchat_room::directory::group_entry(&a.jid).is_some()
            || access.category_allows(&category, &a.jid);
        if !keep {
            removed.push(format!("{} ({})", a.jid, a.affiliation.as_str()));
        }
        keep
    });
    r.voice.retain(|j| {
        let keep =
            pchat_room::directory::group_entry(j).is_some() || access.category_allows(&category, j);
        if !keep {
            removed.push(format!("{j} (presenter)"));
        }
        keep
    });
    removed
}

fn print_json_or<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce()) {
    if json {
        println!("{}", serde_json::to_string(value).unwrap_or_default());
    } else {
        text();
    }
}

pub(crate) async fn group(t: &Target, json: bool, cmd: GroupCommand) -> anyhow::Result<()> {
    let admin = Admin::open(t).await?;
    match cmd {
        GroupCommand::New {
            name,
            description,
            mut members,
            from_file,
        } => {
            members.extend(read_principals(from_file.as_deref())?);
            let members = principals(&members)?;
            edit_directory(&admin, |d| {
                if d.groups.contains_key(&name) {
                    bail!("group {name} exists already (see `pchat group show {name}`)");
                }
                d.groups.insert(
                    name.clone(),
                    Group {
                        description: description.clone(),
                        members: members.iter().cloned().collect(),
                    },
                );
                Ok(())
            })
            .await?;
            println!("group {name} created");
        }
        GroupCommand::Add {
            name,
            mut members,
            from_file,
        } => {
            members.extend(read_principals(from_file.as_deref())?);
            let members = principals(&members)?;
            edit_directory(&admin, |d| {
                let g = d
                    .groups
                    .get_mut(&name)
                    .ok_or_else(|| anyhow::anyhow!("no group {name} (see `pchat group list`)"))?;
                g.members.extend(members.iter().cloned());
                Ok(())
            })
            .await?;
            println!("group {name}: {} added", members.len());
        }
        GroupCommand::Remove { name, members } => {
            let members = principals(&members)?;
            edit_directory(&admin, |d| {
                let g = d
                    .groups
                    .get_mut(&name)
                    .ok_or_else(|| anyhow::anyhow!("no group {name} (see `pchat group list`)"))?;
                for m in &members {
                    if !g.members.remove(m) {
                        bail!("{m} is not a member of group {name}");
                    }
                }
                Ok(())
            })
            .await?;
            println!("group {name}: {} removed", members.len());
        }
        GroupCommand::Delete { name } => {
            edit_directory(&admin, |d| {
                if !d.groups.contains_key(&name) {
                    bail!("no group {name} (see `pchat group list`)");
                }
                let p = Principal::Group(name.clone());
                let mut users: Vec<String> = d
                    .groups_naming(&name)
                    .into_iter()
                    .map(|g| format!("group {g}"))
                    .collect();
                users.extend(
                    d.categories
                        .iter()
                        .filter(|(_, c)| {
                            c.allowed.contains(&p)
                                || c.denied.contains(&p)
                                || c.creators.contains(&p)
                        })
                        .map(|(n, _)| format!("category {n}")),
                );
                if !users.is_empty() {
                    bail!(
                        "group {name} is still named by {}: take it off there first",
                        users.join(", ")
                    );
                }
                d.groups.remove(&name);
                Ok(())
            })
            .await?;
            println!("group {name} deleted");
        }
        GroupCommand::List => {
            let d = admin.store.directory_get().await?.directory;
            let rows: Vec<_> = d
                .groups
                .iter()
                .map(|(n, g)| serde_json::json!({"name": n, "members": g.members.len(), "description": g.description}))
                .collect();
            print_json_or(json, &rows, || {
                if d.groups.is_empty() {
                    println!("no groups yet: create one with `pchat group new NAME --member USER`");
                }
                for (n, g) in &d.groups {
                    println!("{n:<24} {:>6} members  {}", g.members.len(), g.description);
                }
            });
        }
        GroupCommand::Show { name } => {
            let stored = admin.store.directory_get().await?;
            let Some(g) = stored.directory.groups.get(&name) else {
                bail!("no group {name} (see `pchat group list`)");
            };
            let access = Access::compile(&stored.directory, stored.revision);
            let value = serde_json::json!({
                "name": name, "description": g.description, "members": g.members,
                "expanded": access.group_size(&name),
            });
            print_json_or(json, &value, || {
                println!("group        {name}");
                println!("description  {}", g.description);
                println!(
                    "expanded     {} users and domains, nested groups included",
                    access.group_size(&name)
                );
                for m in &g.members {
                    println!("member       {m}");
                }
            });
        }
    }
    Ok(())
}

fn apply_category(c: &mut Category, ch: &CategoryChanges) -> anyhow::Result<()> {
    if let Some(d) = &ch.description {
        c.description = d.clone();
    }
    for (add, remove, list) in [
        (&ch.add_allowed, &ch.remove_allowed, &mut c.allowed),
        (&ch.add_denied, &ch.remove_denied, &mut c.denied),
        (&ch.add_creator, &ch.remove_creator, &mut c.creators),
    ] {
        list.extend(principals(add)?);
        for p in principals(remove)? {
            if !list.remove(&p) {
                bail!("{p} is not on that list of the category");
            }
        }
    }
    if let Some(s) = ch.invitations {
        c.invitations = s.on();
    }
    if let Some(s) = ch.file_upload {
        c.file_upload = s.on();
    }
    if let Some(s) = ch.chat_history {
        c.chat_history = s.on();
    }
    Ok(())
}

fn print_category(name: &str, c: &Category) {
    let list = |s: &BTreeSet<Principal>| {
        if s.is_empty() {
            "(nobody)".to_owned()
        } else {
            s.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let on = |b: bool| if b { "on" } else { "off" };
    println!("category     {name}");
    println!("description  {}", c.description);
    println!("allowed      {}", list(&c.allowed));
    println!("denied       {}", list(&c.denied));
    println!("creators     {}", list(&c.creators));
    println!(
        "flags        invitations {}, file upload {}, chat history {}",
        on(c.invitations),
        on(c.file_upload),
        on(c.chat_history)
    );
}

pub(crate) async fn category(t: &Target, json: bool, cmd: CategoryCommand) -> anyhow::Result<()> {
    let admin = Admin::open(t).await?;
    match cmd {
        CategoryCommand::New { name, changes } => {
            let d = edit_directory(&admin, |d| {
                if d.categories.contains_key(&name) {
                    bail!("category {name} exists already (change it with `pchat category set {name}`)");
                }
                let mut c = Category::default();
                apply_category(&mut c, &changes)?;
                d.categories.insert(name.clone(), c);
                Ok(())
            })
            .await?;
            if !json {
                println!("category {name} created");
            }
            print_json_or(json, &d.categories[&name], || {});
        }
        CategoryCommand::Set { name, changes } => {
            let d = edit_directory(&admin, |d| {
                let c = d.categories.get_mut(&name).ok_or_else(|| {
                    anyhow::anyhow!("no category {name} (see `pchat category get`)")
                })?;
                apply_category(c, &changes)
            })
            .await?;
            print_json_or(json, &d.categories[&name], || {
                print_category(&name, &d.categories[&name])
            });
        }
        CategoryCommand::Get { name } => {
            let d = admin.store.directory_get().await?.directory;
            match name {
                Some(name) => {
                    let Some(c) = d.categories.get(&name) else {
                        bail!("no category {name} (see `pchat category get`)");
                    };
                    print_json_or(json, c, || print_category(&name, c));
                }
                None => print_json_or(json, &d.categories, || {
                    for (n, c) in &d.categories {
                        print_category(n, c);
                        println!();
                    }
                }),
            }
        }
        CategoryCommand::Remove { name } => {
            let rooms: Vec<String> = admin
                .store
                .room_list()
                .await?
                .into_iter()
                .filter(|r| r.category == name)
                .map(|r| r.jid)
                .collect();
            if !rooms.is_empty() {
                bail!(
                    "category {name} still holds {} room(s) ({}): move them with `pchat room set ROOM --category OTHER` or remove them first",
                    rooms.len(),
                    rooms.join(", ")
                );
            }
            edit_directory(&admin, |d| {
                if name == DEFAULT_CATEGORY {
                    bail!("the category {DEFAULT_CATEGORY} cannot be removed: rooms of no other category are in it");
                }
                if d.categories.remove(&name).is_none() {
                    bail!("no category {name} (see `pchat category get`)");
                }
                Ok(())
            })
            .await?;
            println!("category {name} removed");
        }
    }
    Ok(())
}

/// The record's lists in Lync's words.
fn lists(r: &RoomRecord) -> (Vec<String>, Vec<String>, Vec<String>) {
    let with = |aff: Affiliation| {
        r.affiliations
            .iter()
            .filter(|a| a.affiliation == aff)
            .map(|a| a.jid.clone())
            .collect::<Vec<_>>()
    };
    (
        with(Affiliation::Owner),
        with(Affiliation::Member),
        r.voice.clone(),
    )
}

fn privacy_of(c: &RoomConfig) -> &'static str {
    match (c.public, c.members_only) {
        (false, true) => "secret",
        (_, true) => "closed",
        (false, false) => "hidden",
        (true, false) => "open",
    }
}

fn set_privacy(c: &mut RoomConfig, p: Privacy) {
    (c.public, c.members_only) = match p {
        Privacy::Open => (true, false),
        Privacy::Closed => (true, true),
        Privacy::Secret => (false, true),
    };
}

fn set_type(c: &mut RoomConfig, t: RoomType) {
    c.moderated = t == RoomType::Auditorium;
    c.members_have_voice = false;
}

/// A principal for a room list: a user or a group. Everyone and domains are for walls.
fn room_principal(text: &str) -> anyhow::Result<String> {
    match Principal::parse(text).map_err(|e| anyhow::anyhow!(e.0))? {
        p @ (Principal::User(_) | Principal::Group(_)) => Ok(p.to_string()),
        p => bail!(
            "{p} cannot be a room's manager, member or presenter: name users or groups (put a domain or everyone in a group, or allow it in the category)"
        ),
    }
}

/// Refuses principals the room's category does not allow (a group is checked member by
/// member when it is used).
fn check_wall(access: &Access, category: &str, names: &[String]) -> anyhow::Result<()> {
    let walled: Vec<&String> = names
        .iter()
        .filter(|n| {
            pchat_room::directory::group_entry(n).is_none() && !access.category_allows(category, n)
        })
        .collect();
    if !walled.is_empty() {
        bail!(
            "category {category} does not allow {}: allow them first (`pchat category set {category} --add-allowed USER`) or choose another category",
            walled.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

fn put_affiliation(r: &mut RoomRecord, jid: &str, aff: Affiliation) {
    r.affiliations.retain(|a| a.jid != jid);
    if aff != Affiliation::None {
        r.affiliations.push(AffiliationEntry {
            jid: jid.to_owned(),
            affiliation: aff,
            reason: None,
        });
    }
}

fn print_room(r: &RoomRecord, stats: &pchat_store::RoomStats) {
    let (managers, members, presenters) = lists(r);
    println!("room         {}", r.jid);
    println!("name         {}", r.config.name);
    println!("description  {}", r.config.description);
    println!("category     {}", r.category);
    println!(
        "privacy      {} ({})",
        privacy_of(&r.config),
        if r.config.moderated {
            "auditorium"
        } else {
            "normal"
        }
    );
    println!(
        "state        {}",
        if r.disabled { "disabled" } else { "enabled" }
    );
    println!(
        "invitations  {}",
        if r.invitations_off {
            "off"
        } else {
            "inherit (the category's)"
        }
    );
    println!(
        "password     {}",
        if r.config.password.is_some() {
            "set"
        } else {
            "none"
        }
    );
    println!(
        "subject      {}",
        r.subject.as_ref().map(|s| s.text.as_str()).unwrap_or("")
    );
    println!(
        "messages     {} (last id {})",
        stats.messages, stats.last_seq
    );
    println!("add-in       {}", r.addin.as_deref().unwrap_or("none"));
    println!("managers     {}", managers.join(", "));
    println!("members      {}", members.join(", "));
    println!("presenters   {}", presenters.join(", "));
    for a in r
        .affiliations
        .iter()
        .filter(|a| matches!(a.affiliation, Affiliation::Admin | Affiliation::Outcast))
    {
        println!("{:<12} {}", a.affiliation.as_str(), a.jid);
    }
}

pub(crate) async fn room_get(t: &Target, json: bool, room: &str) -> anyhow::Result<()> {
    let admin = Admin::open(t).await?;
    let jid = crate::room_jid(&admin.config, room);
    let Some(r) = admin.store.room_get(&jid).await? else {
        bail!("no room {jid} (see `pchat room list`)")
    };
    let stats = admin.store.room_stats(&jid).await?;
    let (managers, members, presenters) = lists(&r);
    let value = serde_json::json!({
        "room": r, "privacy": privacy_of(&r.config),
        "type": if r.config.moderated { "auditorium" } else { "normal" },
        "managers": managers, "members": members, "presenters": presenters,
        "messages": stats.messages, "last_seq": stats.last_seq,
    });
    print_json_or(json, &value, || print_room(&r, &stats));
    Ok(())
}

pub(crate) async fn room_new(t: &Target, json: bool, a: RoomNew) -> anyhow::Result<()> {
    let admin = Admin::open(t).await?;
    let jid = crate::room_jid(&admin.config, &a.room);
    let stored = admin.store.directory_get().await?;
    if !stored.directory.categories.contains_key(&a.category) {
        bail!(
            "no category {} (see `pchat category get`; create it with `pchat category new {}`)",
            a.category,
            a.category
        );
    }
    let access = Access::compile(&stored.directory, stored.revision);
    if let Some(name) = &a.addin {
        if access.addin_url(name).is_none() {
            bail!("no add-in {name} (see `pchat addin get`)");
        }
    }
    let managers = a
        .managers
        .iter()
        .map(|p| room_principal(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let members = a
        .members
        .iter()
        .map(|p| room_principal(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let presenters = a
        .presenters
        .iter()
        .map(|p| room_principal(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let all: Vec<String> = managers
        .iter()
        .chain(&members)
        .chain(&presenters)
        .cloned()
        .collect();
    check_wall(&access, &a.category, &all)?;
    let mut config = RoomConfig {
        name: a.name.clone().unwrap_or_default(),
        description: a.description.clone(),
        history_stanzas_default: admin.config.rooms.history_stanzas_default,
        history_stanzas_max: admin.config.rooms.history_stanzas_max,
        ..RoomConfig::default()
    };
    set_privacy(&mut config, a.privacy);
    set_type(&mut config, a.kind);
    let mut record = RoomRecord {
        jid: jid.clone(),
        config,
        affiliations: Vec::new(),
        voice: presenters.clone(),
        subject: None,
        created_at: pchat_server::datetime::now(),
        category: a.category.clone(),
        disabled: a.disabled,
        invitations_off: a.invitations == RoomInvitations::Off,
        addin: a.addin.clone(),
    };
    for m in &members {
        put_affiliation(&mut record, m, Affiliation::Member);
    }
    for m in &managers {
        put_affiliation(&mut record, m, Affiliation::Owner);
    }
    let detail = format!(
        "created from the shell in category {} ({}, {})",
        a.category,
        privacy_of(&record.config),
        if record.config.moderated {
            "auditorium"
        } else {
            "normal"
        }
    );
    match admin
        .commit(vec![
            AdminWrite::PutRoom {
                record: Box::new(record.clone()),
                revision: Some(0),
            },
            compliance(ComplianceKind::RoomCreated, &jid, detail),
        ])
        .await
    {
        Ok(_) => {}
        Err(StoreError::Conflict(_)) => {
            bail!("room {jid} exists already (change it with `pchat room set {jid}`)")
        }
        Err(e) => return Err(e.into()),
    }
    if access.flags(&a.category).invitations && !a.disabled && !record.invitations_off {
        admin.invite(&record, &members).await?;
    }
    if managers.is_empty() && !json {
        println!(
            "note: {jid} has no manager; add one with `pchat room set {jid} --add-manager USER`"
        );
    }
    print_json_or(json, &record, || {
        println!("room {jid} created ({})", privacy_of(&record.config))
    });
    Ok(())
}

pub(crate) async fn room_set(t: &Target, json: bool, a: RoomSet) -> anyhow::Result<()> {
    let admin = Admin::open(t).await?;
    let jid = crate::room_jid(&admin.config, &a.room);
    let stored_dir = admin.store.directory_get().await?;
    let access = Access::compile(&stored_dir.directory, stored_dir.revision);
    let to_list = |v: &[String]| {
        v.iter()
            .map(|p| room_principal(p))
            .collect::<anyhow::Result<Vec<_>>>()
    };
    let (add_managers, remove_managers) = (to_list(&a.add_managers)?, to_list(&a.remove_managers)?);
    let (add_members, remove_members) = (to_list(&a.add_members)?, to_list(&a.remove_members)?);
    let (add_presenters, remove_presenters) =
        (to_list(&a.add_presenters)?, to_list(&a.remove_presenters)?);
    if let Some(c) = &a.category {
        if !stored_dir.directory.categories.contains_key(c) {
            bail!("no category {c} (see `pchat category get`)");
        }
    }
    if let Some(name) = &a.addin {
        if access.addin_url(name).is_none() {
            bail!("no add-in {name} (see `pchat addin get`)");
        }
    }
    for _ in 0..3 {
        let Some(stored) = admin.store.room_load(&jid).await? else {
            bail!("no room {jid} (see `pchat room list`)");
        };
        let mut r = stored.record.clone();
        let mut changes = Vec::new();
        if let Some(c) = &a.category {
            if *c != r.category {
                changes.push(format!("category {} → {c}", r.category));
                r.category = c.clone();
            }
        }
        if let Some(n) = &a.name {
            r.config.name = n.clone();
            changes.push("name".into());
        }
        if let Some(d) = &a.description {
            r.config.description = d.clone();
            changes.push("description".into());
        }
        if let Some(p) = a.privacy {
            set_privacy(&mut r.config, p);
            changes.push(format!("privacy {}", privacy_of(&r.config)));
        }
        if let Some(k) = a.kind {
            set_type(&mut r.config, k);
            changes.push(format!("type {k:?}").to_lowercase());
        }
        if a.addin.is_some() || a.no_addin {
            r.addin = a.addin.clone();
            changes.push(format!("add-in {}", a.addin.as_deref().unwrap_or("none")));
        }
        if let Some(i) = a.invitations {
            r.invitations_off = i == RoomInvitations::Off;
            changes.push(format!(
                "invitations {}",
                if r.invitations_off { "off" } else { "inherit" }
            ));
        }
        let added: Vec<String> = add_managers
            .iter()
            .chain(&add_members)
            .chain(&add_presenters)
            .cloned()
            .collect();
        check_wall(&access, &r.category, &added)?;
        // One affiliation per principal in XMPP: a manager is a member too. Removing a
        // manager leaves a member; adding a member never demotes a manager.
        let current = |r: &RoomRecord, m: &str| {
            r.affiliations
                .iter()
                .find(|a| a.jid == m)
                .map_or(Affiliation::None, |a| a.affiliation)
        };
        for m in &remove_managers {
            if current(&r, m) != Affiliation::Owner {
                bail!("{m} is not a manager of {jid}");
            }
            put_affiliation(&mut r, m, Affiliation::Member);
            changes.push(format!("manager -{m} (stays a member)"));
        }
        for m in &remove_members {
            match current(&r, m) {
                Affiliation::Member => put_affiliation(&mut r, m, Affiliation::None),
                Affiliation::Owner | Affiliation::Admin => bail!(
                    "{m} manages {jid}: take it off the managers first (--remove-manager {m})"
                ),
                _ => bail!("{m} is not a member of {jid}"),
            }
            changes.push(format!("member -{m}"));
        }
        for m in &add_members {
            if current(&r, m) < Affiliation::Member {
                put_affiliation(&mut r, m, Affiliation::Member);
                changes.push(format!("member +{m}"));
            }
        }
        for m in &add_managers {
            put_affiliation(&mut r, m, Affiliation::Owner);
            changes.push(format!("manager +{m}"));
        }
        for m in &remove_presenters {
            r.voice.retain(|v| v != m);
            changes.push(format!("presenter -{m}"));
        }
        for m in &add_presenters {
            if !r.voice.contains(m) {
                r.voice.push(m.clone());
            }
            changes.push(format!("presenter +{m}"));
        }
        // Moving to another category purges whoever the new wall does not allow.
        let purged = walled_entries(&mut r, &access);
        if !purged.is_empty() {
            changes.push(format!(
                "removed by the wall of category {}: {}",
                r.category,
                purged.join(", ")
            ));
        }
        if changes.is_empty() {
            bail!("nothing to change (see `pchat room set --help`)");
        }
        let detail = changes.join("; ");
        match admin
            .commit(vec![
                AdminWrite::PutRoom {
                    record: Box::new(r.clone()),
                    revision: Some(stored.revision),
                },
                compliance(ComplianceKind::ConfigChange, &jid, detail.clone()),
            ])
            .await
        {
            Ok(_) => {
                if access.flags(&r.category).invitations && !r.disabled && !r.invitations_off {
                    admin.invite(&r, &add_members).await?;
                }
                print_json_or(json, &r, || println!("{jid}: {detail}"));
                return Ok(());
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("{jid} kept changing meanwhile (three tries); run the command again")
}

/// Disables or enables a room (Lync Set-CsPersistentChatRoom -Disabled).
pub(crate) async fn room_enable(t: &Target, room: &str, enable: bool) -> anyhow::Result<()> {
    let admin = Admin::open(t).await?;
    let jid = crate::room_jid(&admin.config, room);
    for _ in 0..3 {
        let Some(stored) = admin.store.room_load(&jid).await? else {
            bail!("no room {jid} (see `pchat room list`)");
        };
        if stored.record.disabled != enable {
            println!(
                "{jid} is {} already",
                if enable { "enabled" } else { "disabled" }
            );
            return Ok(());
        }
        let mut r = stored.record;
        r.disabled = !enable;
        let what = if enable { "enabled" } else { "disabled" };
        match admin
            .commit(vec![
                AdminWrite::PutRoom {
                    record: Box::new(r),
                    revision: Some(stored.revision),
                },
                compliance(
                    ComplianceKind::ConfigChange,
                    &jid,
                    format!("room {what} from the shell"),
                ),
            ])
            .await
        {
            Ok(_) => {
                println!("{jid} {what}");
                return Ok(());
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("{jid} kept changing meanwhile (three tries); run the command again")
}

/// Removes a room and its history (compliance keeps its record).
pub(crate) async fn room_remove(t: &Target, room: &str, yes: bool) -> anyhow::Result<()> {
    let admin = Admin::open(t).await?;
    let jid = crate::room_jid(&admin.config, room);
    if admin.store.room_get(&jid).await?.is_none() {
        bail!("no room {jid} (see `pchat room list`)");
    }
    if !yes {
        let stats = admin.store.room_stats(&jid).await?;
        bail!(
            "removing {jid} deletes its {} message(s) for good (compliance keeps its record; `pchat room disable` keeps everything): add --yes to remove it",
            stats.messages
        );
    }
    admin
        .commit(vec![
            AdminWrite::DeleteRoom { room: jid.clone() },
            compliance(
                ComplianceKind::RoomDestroyed,
                &jid,
                "removed from the shell".into(),
            ),
        ])
        .await?;
    println!("{jid} removed");
    Ok(())
}

#[derive(Subcommand)]
pub(crate) enum MessageCommand {
    /// Remove (or replace) archived messages (Lync's Remove-CsPersistentChatMessage): one by
    /// its id, or every message matching filters (a sender, words, a time range). History,
    /// search and exports no longer show their text; the compliance record keeps it;
    /// occupants are told (XEP-0425) so their clients hide them.
    ///
    /// Example: pchat message remove ops 42 --reason "customer data" --replace "[removed]"
    /// Example: pchat message remove ops --user eve@example.com --words "account number" --yes
    Remove {
        /// The room: its JID or the name before the @.
        room: String,
        /// The message's id (its stanza-id; `pchat room history ROOM` shows them).
        id: Option<i64>,
        /// Only messages from this user (bare JID).
        #[arg(long, conflicts_with = "id")]
        user: Option<String>,
        /// Only messages containing all these words (full-text, as MAM search).
        #[arg(long, conflicts_with = "id")]
        words: Option<String>,
        /// Only messages at or after this date (2026-01-01 or an RFC 3339 time).
        #[arg(long, conflicts_with = "id")]
        from: Option<String>,
        /// Only messages before this date.
        #[arg(long, conflicts_with = "id")]
        to: Option<String>,
        /// Text to show instead of each message.
        #[arg(long)]
        replace: Option<String>,
        /// Why, shown to occupants and recorded.
        #[arg(long)]
        reason: Option<String>,
        /// With filters: yes, remove every match (without it, the matches are counted).
        #[arg(long)]
        yes: bool,
    },
}

/// Messages removed from the shell in one commit at most.
const REMOVALS_PER_COMMIT: usize = 100;

/// Removes or replaces archived messages: one by id, or every match of the filters.
pub(crate) async fn message(t: &Target, json: bool, cmd: MessageCommand) -> anyhow::Result<()> {
    let MessageCommand::Remove {
        room,
        id,
        user,
        words,
        from,
        to,
        replace,
        reason,
        yes,
    } = cmd;
    let admin = Admin::open(t).await?;
    let jid = crate::room_jid(&admin.config, &room);
    let targets = match id {
        Some(id) => {
            let Some(m) = admin.store.archive_get(&jid, id).await? else {
                bail!("room {jid} has no message {id} (see `pchat room history {jid}`)");
            };
            vec![m]
        }
        None => {
            if user.is_none() && words.is_none() && from.is_none() && to.is_none() {
                bail!("name a message by its id, or filter with --user, --words, --from or --to");
            }
            if admin.store.room_get(&jid).await?.is_none() {
                bail!("no room {jid} (see `pchat room list`)");
            }
            let user = user.map(|u| u.to_lowercase());
            let mut query = pchat_store::ArchiveQuery {
                start: from.as_deref().map(parse_date).transpose()?,
                end: to
                    .as_deref()
                    .map(parse_date)
                    .transpose()?
                    .map(|t| pchat_room::Timestamp(t.0 - 1)),
                fulltext: words.clone(),
                limit: pchat_store::ARCHIVE_PAGE_MAX,
                ..Default::default()
            };
            let mut found = Vec::new();
            loop {
                let page = admin.store.archive_page(&jid, &query).await?;
                let Some(last) = page.messages.last().map(|m| m.seq) else {
                    break;
                };
                found.extend(page.messages.into_iter().filter(|m| {
                    // A tombstone has no body; there is nothing left to remove.
                    m.body.is_some() && user.as_ref().is_none_or(|u| *u == m.sender)
                }));
                if page.complete {
                    break;
                }
                query.after_seq = Some(last);
            }
            if !yes {
                let value = serde_json::json!({"room": jid, "matches": found.len(), "removed": 0});
                print_json_or(json, &value, || {
                    println!(
                        "{jid}: {} message(s) match; add --yes to remove them",
                        found.len()
                    )
                });
                return Ok(());
            }
            found
        }
    };
    let what = if replace.is_some() {
        "replaced"
    } else {
        "removed"
    };
    let mut done = 0u64;
    for chunk in targets.chunks(REMOVALS_PER_COMMIT) {
        let now = pchat_server::datetime::now();
        let mut writes = Vec::with_capacity(chunk.len() * 3);
        // The files the messages shared go with them (recorded in the same commit).
        let mut files = Vec::new();
        for m in chunk {
            let (ids, records) = pchat_server::upload::files_of_removed_message(
                &*admin.store,
                &jid,
                m.seq,
                SHELL_ACTOR,
            )
            .await;
            files.extend(ids);
            writes.extend(records.into_iter().map(AdminWrite::Compliance));
            let stanza = pchat_muc::moderation::tombstone(
                &format!("{jid}/{}", m.nick),
                &jid,
                reason.as_deref(),
                replace.as_deref(),
                &pchat_server::datetime::format(now),
            );
            writes.push(AdminWrite::RemoveMessage {
                room: jid.clone(),
                seq: m.seq,
                stanza: stanza.to_xml(),
                body: replace.clone(),
            });
            writes.push(AdminWrite::Compliance(NewComplianceEvent {
                kind: ComplianceKind::MessageRemoved,
                at: now,
                room: jid.clone(),
                actor: SHELL_ACTOR.to_owned(),
                nick: None,
                detail: format!(
                    "message {} of {} ({}) {what} by an administrator{}",
                    m.seq,
                    m.nick,
                    m.sender,
                    reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
            }));
            writes.push(AdminWrite::Announce {
                room: jid.clone(),
                event: pchat_room::RoomEvent::Retracted {
                    id: m.seq,
                    by: jid.clone(),
                    reason: reason.clone(),
                },
            });
        }
        let (_, removed) = admin.commit(writes).await?;
        done += removed.iter().sum::<u64>();
        for id in files {
            admin.store.file_remove(&id).await.with_context(|| {
                format!("the message is removed but its file {id} is left: run `pchat file remove {id}`")
            })?;
        }
    }
    if id.is_some() && done == 0 {
        bail!(
            "room {jid} has no message {} any more (removed meanwhile?)",
            targets[0].seq
        );
    }
    let ids: Vec<i64> = targets.iter().map(|m| m.seq).collect();
    let value = serde_json::json!({"room": jid, "ids": ids, "removed": done, "result": what});
    print_json_or(json, &value, || {
        println!("{jid}: {done} message(s) {what} by an administrator")
    });
    Ok(())
}

/// Parses `YYYY-MM-DD` (midnight UTC) or an RFC 3339 date-time.
fn parse_date(s: &str) -> anyhow::Result<pchat_room::Timestamp> {
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    pchat_server::datetime::parse(&full).ok_or_else(|| {
        anyhow::anyhow!("`{s}` is not a date: write 2026-12-01 or 2026-12-01T09:30:00Z")
    })
}

/// Deletes a room's history up to a date (Lync's Clear-CsPersistentChatRoom).
pub(crate) async fn room_clear(
    t: &Target,
    json: bool,
    room: &str,
    before: &str,
    yes: bool,
) -> anyhow::Result<()> {
    let before = parse_date(before)?;
    let admin = Admin::open(t).await?;
    let jid = crate::room_jid(&admin.config, room);
    if admin.store.room_get(&jid).await?.is_none() {
        bail!("no room {jid} (see `pchat room list`)");
    }
    let stamp = pchat_server::datetime::format(before);
    if !yes {
        let page = admin
            .store
            .archive_page(
                &jid,
                &pchat_store::ArchiveQuery {
                    end: Some(pchat_room::Timestamp(before.0 - 1)),
                    limit: 1,
                    ..Default::default()
                },
            )
            .await?;
        bail!(
            "clearing {jid} before {stamp} deletes {} message(s) for good (compliance keeps them): add --yes",
            page.count
        );
    }
    let (_, removed) = admin
        .commit(vec![
            AdminWrite::ClearHistory {
                room: jid.clone(),
                before,
            },
            AdminWrite::Compliance(NewComplianceEvent {
                kind: ComplianceKind::HistoryCleared,
                at: pchat_server::datetime::now(),
                room: jid.clone(),
                actor: SHELL_ACTOR.to_owned(),
                nick: None,
                detail: format!("history before {stamp} cleared by an administrator"),
            }),
        ])
        .await?;
    let n = removed.first().copied().unwrap_or(0);
    let value = serde_json::json!({"room": jid, "before": stamp, "removed": n});
    print_json_or(json, &value, || {
        println!("{jid}: {n} message(s) before {stamp} removed")
    });
    Ok(())
}

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Show who may use persistent chat.
    ///
    /// Example: pchat policy get
    Get,
    /// Change who may use persistent chat (Lync's EnablePersistentChat, global and per
    /// principal). Users it turns off leave every room at once; their memberships stay.
    ///
    /// Example: pchat policy set --global off --allow group:staff --deny eve@example.com
    Set {
        /// The global policy.
        #[arg(long)]
        global: Option<Switch>,
        /// Turn it on for a principal (repeatable).
        #[arg(long = "allow", value_name = "PRINCIPAL")]
        allow: Vec<String>,
        /// Turn it off for a principal (repeatable).
        #[arg(long = "deny", value_name = "PRINCIPAL")]
        deny: Vec<String>,
        /// Take a principal off both lists (repeatable).
        #[arg(long = "clear", value_name = "PRINCIPAL")]
        clear: Vec<String>,
    },
}

pub(crate) async fn policy(t: &Target, json: bool, cmd: PolicyCommand) -> anyhow::Result<()> {
    let admin = Admin::open(t).await?;
    let d = match cmd {
        PolicyCommand::Get => admin.store.directory_get().await?.directory,
        PolicyCommand::Set {
            global,
            allow,
            deny,
            clear,
        } => {
            let (allow, deny, clear) =
                (principals(&allow)?, principals(&deny)?, principals(&clear)?);
            if global.is_none() && allow.is_empty() && deny.is_empty() && clear.is_empty() {
                bail!("nothing to change (see `pchat policy set --help`)");
            }
            edit_directory(&admin, |d| {
                if let Some(g) = global {
                    d.policy.enabled = g.on();
                }
                for p in &clear {
                    if !d.policy.allow.remove(p) && !d.policy.deny.remove(p) {
                        bail!("{p} is on neither list of the policy");
                    }
                }
                for p in &allow {
                    d.policy.deny.remove(p);
                    d.policy.allow.insert(p.clone());
                }
                for p in &deny {
                    d.policy.allow.remove(p);
                    d.policy.deny.insert(p.clone());
                }
                Ok(())
            })
            .await?
        }
    };
    let p = &d.policy;
    print_json_or(json, p, || {
        let list = |s: &BTreeSet<Principal>| {
            s.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("global       {}", if p.enabled { "on" } else { "off" });
        println!("on for       {}", list(&p.allow));
        println!("off for      {}", list(&p.deny));
    });
    Ok(())
}

#[derive(Subcommand)]
pub(crate) enum AddinCommand {
    /// Register an add-in: a page clients may show beside a room.
    ///
    /// Example: pchat addin new stocks --url https://stocks.example/pane
    New {
        /// Name: letters, digits, `-`, `_`, `.` (at most 50).
        name: String,
        /// An http:// or https:// URL.
        #[arg(long)]
        url: String,
    },
    /// Change an add-in's URL.
    ///
    /// Example: pchat addin set stocks --url https://stocks.example/v2
    Set {
        /// Name.
        name: String,
        /// An http:// or https:// URL.
        #[arg(long)]
        url: String,
    },
    /// Show one add-in, or all.
    ///
    /// Example: pchat addin get
    Get {
        /// Name (all when left out).
        name: Option<String>,
    },
    /// Remove an add-in no room uses.
    ///
    /// Example: pchat addin remove stocks
    Remove {
        /// Name.
        name: String,
    },
}

pub(crate) async fn addin(t: &Target, json: bool, cmd: AddinCommand) -> anyhow::Result<()> {
    let admin = Admin::open(t).await?;
    match cmd {
        AddinCommand::New { name, url } => {
            edit_directory(&admin, |d| {
                if d.addins.contains_key(&name) {
                    bail!("add-in {name} exists already (change it with `pchat addin set {name}`)");
                }
                d.addins.insert(
                    name.clone(),
                    pchat_room::directory::Addin { url: url.clone() },
                );
                Ok(())
            })
            .await?;
            println!("add-in {name} registered");
        }
        AddinCommand::Set { name, url } => {
            edit_directory(&admin, |d| {
                let a = d
                    .addins
                    .get_mut(&name)
                    .ok_or_else(|| anyhow::anyhow!("no add-in {name} (see `pchat addin get`)"))?;
                a.url = url.clone();
                Ok(())
            })
            .await?;
            println!("add-in {name}: {url}");
        }
        AddinCommand::Get { name } => {
            let d = admin.store.directory_get().await?.directory;
            match name {
                Some(n) => {
                    let Some(a) = d.addins.get(&n) else {
                        bail!("no add-in {n} (see `pchat addin get`)");
                    };
                    print_json_or(json, a, || println!("{n:<24} {}", a.url));
                }
                None => {
                    print_json_or(json, &d.addins, || {
                        if d.addins.is_empty() {
                            println!("no add-ins yet: register one with `pchat addin new NAME --url URL`");
                        }
                        for (n, a) in &d.addins {
                            println!("{n:<24} {}", a.url);
                        }
                    })
                }
            }
        }
        AddinCommand::Remove { name } => {
            let users: Vec<String> = admin
                .store
                .room_list()
                .await?
                .into_iter()
                .filter(|r| r.addin.as_deref() == Some(name.as_str()))
                .map(|r| r.jid)
                .collect();
            if !users.is_empty() {
                bail!(
                    "add-in {name} is shown by {}: take it off them first (`pchat room set ROOM --no-addin`)",
                    users.join(", ")
                );
            }
            edit_directory(&admin, |d| {
                if d.addins.remove(&name).is_none() {
                    bail!("no add-in {name} (see `pchat addin get`)");
                }
                Ok(())
            })
            .await?;
            println!("add-in {name} removed");
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Print a complete pchat.toml: every server setting at its default, with its comment
    /// (what a server writes into its data directory on its first start).
    ///
    /// Example: pchat config example > /etc/pchat/pchat.toml
    Example,
    /// Show the service's settings (Lync's Get-CsPersistentChatConfiguration): each value and
    /// where it comes from (set here, or the server's pchat.toml).
    ///
    /// Example: pchat config get
    Get,
    /// Change one setting (Lync's Set-CsPersistentChatConfiguration); every server applies it
    /// at once, no restart. NAME: DefaultChatHistory (1-500), ParticipantUpdateLimit
    /// (10-20000), MaxFileSizeKB (1-2097152), RoomManagementUrl (http(s) URL). VALUE
    /// `default` gives the value back to pchat.toml. DefaultChatHistory and
    /// ParticipantUpdateLimit apply to every room whose owner did not set its own.
    ///
    /// Example: pchat config set DefaultChatHistory 50
    Set {
        /// The setting's name (Lync's, any case; dashes allowed: default-chat-history).
        name: String,
        /// Its new value, or `default`.
        value: String,
    },
}

/// A setting's canonical (Lync) name from what was typed.
fn setting_name(name: &str) -> anyhow::Result<&'static str> {
    let key: String = name
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .collect::<String>()
        .to_lowercase();
    Ok(match key.as_str() {
        "defaultchathistory" => "DefaultChatHistory",
        "participantupdatelimit" => "ParticipantUpdateLimit",
        "maxfilesizekb" | "maximumfilesizekb" => "MaxFileSizeKB",
        "roommanagementurl" => "RoomManagementUrl",
        _ => bail!(
            "no setting `{name}`: give DefaultChatHistory, ParticipantUpdateLimit, MaxFileSizeKB or RoomManagementUrl"
        ),
    })
}

#[derive(serde::Serialize)]
struct SettingView {
    name: &'static str,
    value: Option<String>,
    source: &'static str,
}

pub(crate) async fn config(t: &Target, json: bool, cmd: ConfigCommand) -> anyhow::Result<()> {
    use pchat_room::directory::Settings;
    let admin = Admin::open(t).await?;
    // In a pool the settings live in etcd (every server follows the key); until the first
    // `pchat config set` there, the database's (from a standalone server) apply.
    let pool = match &t.in_pool {
        Some(pool) => Some((
            t.etcd.connect(Some(pool))?,
            pchat_control::keys::settings(pool),
        )),
        None => None,
    };
    let in_etcd = |kv: &Option<pchat_control::etcd::KeyValue>| -> anyhow::Result<Option<Settings>> {
        kv.as_ref()
            .map(|kv| {
                serde_json::from_slice::<Settings>(&kv.value).map_err(|e| {
                    anyhow::anyhow!(
                        "the pool's settings in etcd are not readable ({e}): set each one again"
                    )
                })
            })
            .transpose()
    };
    let read = || async {
        let kv = match &pool {
            Some((etcd, key)) => etcd.get(key).await?,
            None => None,
        };
        let settings = match in_etcd(&kv)? {
            Some(s) => s,
            None => admin.store.directory_get().await?.directory.settings,
        };
        anyhow::Ok((settings, kv))
    };
    let s = match cmd {
        // Printed by main before anything is opened.
        ConfigCommand::Example => return Ok(()),
        ConfigCommand::Get => read().await?.0,
        ConfigCommand::Set { name, value } => {
            let name = setting_name(&name)?;
            let reset = value.trim().eq_ignore_ascii_case("default");
            let number = |v: &str| -> anyhow::Result<Option<u32>> {
                if reset {
                    return Ok(None);
                }
                v.trim().parse::<u32>().map(Some).map_err(|_| {
                    anyhow::anyhow!("{name} takes a whole number (or `default`), not `{v}`")
                })
            };
            let mut change = Settings::default();
            let apply: Box<dyn Fn(&mut Settings) + Send + Sync> = match name {
                "DefaultChatHistory" => {
                    change.default_chat_history = number(&value)?;
                    Box::new(move |s: &mut Settings| {
                        s.default_chat_history = change.default_chat_history
                    })
                }
                "ParticipantUpdateLimit" => {
                    change.participant_update_limit = number(&value)?;
                    Box::new(move |s: &mut Settings| {
                        s.participant_update_limit = change.participant_update_limit
                    })
                }
                "MaxFileSizeKB" => {
                    change.max_file_size_kb = number(&value)?;
                    Box::new(move |s: &mut Settings| s.max_file_size_kb = change.max_file_size_kb)
                }
                _ => {
                    let url = (!reset).then(|| value.trim().to_owned());
                    Box::new(move |s: &mut Settings| s.room_management_url = url.clone())
                }
            };
            match &pool {
                None => {
                    edit_directory(&admin, |d| {
                        apply(&mut d.settings);
                        d.settings.validate().map_err(|e| anyhow::anyhow!(e.0))
                    })
                    .await?
                    .settings
                }
                Some((etcd, key)) => {
                    let mut attempt = 0;
                    loop {
                        attempt += 1;
                        let (mut s, kv) = read().await?;
                        apply(&mut s);
                        s.validate().map_err(|e| anyhow::anyhow!(e.0))?;
                        let revision = kv.as_ref().map_or(0, |kv| kv.mod_revision);
                        let bytes = serde_json::to_vec(&s)?;
                        if etcd.compare_and_put(key, revision, &bytes).await?.is_some() {
                            break s;
                        }
                        if attempt >= DIRECTORY_ATTEMPTS {
                            anyhow::bail!(
                                "the pool's settings kept changing under this command: run it again"
                            );
                        }
                    }
                }
            }
        }
    };
    let stored_in = if pool.is_some() {
        "pchat config (etcd)"
    } else {
        "pchat config"
    };
    let s = &s;
    let file_history = admin.config.rooms.history_stanzas_default;
    let view = |name: &'static str, set: Option<String>, file: Option<String>| SettingView {
        name,
        source: if set.is_some() {
            stored_in
        } else if file.is_some() {
            "pchat.toml"
        } else {
            "not set"
        },
        value: set.or(file),
    };
    let views = [
        view(
            "DefaultChatHistory",
            s.default_chat_history.map(|v| v.to_string()),
            Some(file_history.to_string()),
        ),
        view(
            "ParticipantUpdateLimit",
            s.participant_update_limit.map(|v| v.to_string()),
            Some(
                pchat_room::RoomConfig::default()
                    .presence_broadcast_occupants_max
                    .to_string(),
            ),
        ),
        view(
            "MaxFileSizeKB",
            s.max_file_size_kb.map(|v| v.to_string()),
            None,
        ),
        view("RoomManagementUrl", s.room_management_url.clone(), None),
    ];
    print_json_or(json, &views, || {
        for v in &views {
            println!(
                "{:<24} {:<40} ({})",
                v.name,
                v.value.as_deref().unwrap_or("-"),
                v.source
            );
        }
    });
    Ok(())
}
