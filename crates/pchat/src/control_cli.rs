//! `pchat control auth setup`: etcd's users and roles for a pool, then authentication on
//! (the work is `pchat_control::auth`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use pchat_control::{auth, Topology};

#[derive(clap::Subcommand)]
pub enum ControlCommand {
    /// etcd's users and roles.
    #[command(subcommand)]
    Auth(AuthCommand),
}

#[derive(clap::Subcommand)]
pub enum AuthCommand {
    /// Create or update one etcd user per identity of the topology and per operator of the
    /// PKI directory (its password: the identity's etcd.password), each with a role that
    /// lets it write only its own keys; remove those of servers and instances that left;
    /// then enable authentication. Run it as an operator (--tls-dir PKI/operators/NAME)
    /// against members started with TLS and --client-cert-auth. The first run makes that
    /// operator's etcd password the password of etcd's `root` user: later runs must use the
    /// same operator. Safe to re-run; re-run after every topology change.
    ///
    /// Example: pchat --tls-dir /etc/pchat/pki/operators/admin control auth setup --topology topology.toml --pki /etc/pchat/pki
    Setup {
        /// The topology whose endpoints get users (its etcd endpoints are used).
        #[arg(long)]
        topology: PathBuf,
        /// The PKI directory of `pchat pki issue` (the identities' etcd passwords).
        #[arg(long, value_name = "DIR")]
        pki: PathBuf,
        /// Print the users, roles and permissions only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Give etcd's `root` user (and the operator's own etcd user, which shares its password)
    /// a new random password, and write it into the operator's etcd.password. Run it with
    /// the identity of the operator who enabled authentication, in the PKI directory (so that
    /// `control auth setup --pki` reads the same file); copy that directory wherever else the
    /// operator works. An interrupted run is finished by running it again.
    ///
    /// Example: pchat --tls-dir /etc/pchat/pki/operators/admin control auth rotate-root --topology topology.toml
    RotateRoot {
        /// The topology (its etcd endpoints are used).
        #[arg(long)]
        topology: PathBuf,
    },
}

pub async fn run(
    cmd: ControlCommand,
    json: bool,
    tls_dir: Option<&Path>,
    read_topology: impl Fn(&Path) -> anyhow::Result<Topology>,
) -> anyhow::Result<()> {
    let (topology, pki, dry_run) = match cmd {
        ControlCommand::Auth(AuthCommand::Setup {
            topology,
            pki,
            dry_run,
        }) => (topology, pki, dry_run),
        ControlCommand::Auth(AuthCommand::RotateRoot { topology }) => {
            let t = read_topology(&topology)?;
            let operator_dir = tls_dir.context(
                "the rotation runs as the operator whose password is root's: give --tls-dir PKI/operators/NAME (or PCHAT_TLS_DIR)",
            )?;
            let done = auth::rotate_root(&t.etcd, operator_dir).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "pool": t.pool.name, "changes": done })
                );
            } else {
                for line in &done {
                    println!("{line}");
                }
            }
            return Ok(());
        }
    };
    let t = read_topology(&topology)?;
    let plan = auth::plan(&t, &auth::operators_in(&pki)?);
    if dry_run {
        print_plan(&plan, json);
        return Ok(());
    }
    let operator_dir = tls_dir.context(
        "the setup runs as an operator over TLS: give --tls-dir PKI/operators/NAME (or PCHAT_TLS_DIR); `pchat pki issue --operator NAME` makes one",
    )?;
    let (root, password) = auth::root_client(&t.etcd, operator_dir)?;
    let (plan, done) = auth::setup(&root, &password, &t, &pki).await.map_err(|e| {
        let hint = if matches!(&e, pchat_control::EtcdError::Unauthenticated { user, .. } if user == auth::ROOT)
        {
            "\netcd's root password is the etcd.password of the operator who first ran this setup: run it with that operator's identity"
        } else {
            ""
        };
        anyhow::anyhow!("{e}{hint}")
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "pool": plan.pool, "users": plan.users.len(), "roles": plan.roles.len(), "changes": done })
        );
    } else {
        for line in &done {
            println!("{line}");
        }
        println!(
            "pool {}: {} etcd users with their roles; authentication is on",
            plan.pool,
            plan.users.len()
        );
    }
    Ok(())
}

fn print_plan(plan: &auth::Plan, json: bool) {
    if json {
        let roles: Vec<_> = plan
            .roles
            .iter()
            .map(|r| {
                serde_json::json!({
                    "role": r.role,
                    "permissions": r.permissions.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            })
            .collect();
        let users: Vec<_> = plan
            .users
            .iter()
            .map(|u| serde_json::json!({ "user": u.user, "role": u.role, "identity": u.who.to_string() }))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "pool": plan.pool, "users": users, "roles": roles })
        );
        return;
    }
    println!("user {} (role {}): everything", auth::ROOT, auth::ROOT);
    for u in &plan.users {
        println!("user {} ({}): role {}", u.user, u.who, u.role);
    }
    for r in &plan.roles {
        println!("role {}:", r.role);
        for p in &r.permissions {
            println!("  {p}");
        }
    }
}
