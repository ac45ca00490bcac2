//! `pchat pki init|issue`: the pool's own CA and the identities its topology names, and the
//! certificate check behind `pchat topology validate --pki`.

use std::path::{Path, PathBuf};

use pchat_control::Topology;
use pchat_tls::pki::{self, Issued, RENEW_BEFORE_DAYS};

use pchat_control::identities::ETCD_PASSWORD_FILE;

#[derive(clap::Subcommand)]
pub enum PkiCommand {
    /// Create the pool's certificate authority in DIR (ca.crt, and ca.key mode 0600).
    ///
    /// Keep ca.key off the pool's hosts once the identities are issued.
    ///
    /// Example: pchat pki init --dir /etc/pchat/pki --pool pc1
    Init {
        /// The PKI directory (created 0700).
        #[arg(long)]
        dir: PathBuf,
        /// The pool the CA serves (named in its certificate).
        #[arg(long)]
        pool: String,
    },
    /// Issue every identity the topology names (instances, servers, etcd members) and the
    /// operators given, each in DIR/<kind>/<name>/ with ca.crt, cert.pem, key.pem and
    /// etcd.password; identities still valid for their names are kept, so it is safe to
    /// re-run after each topology change. Copy each directory to the host that uses it.
    ///
    /// Example: pchat pki issue --dir /etc/pchat/pki --topology topology.toml --operator admin
    Issue {
        /// The PKI directory made by `pki init`.
        #[arg(long)]
        dir: PathBuf,
        /// The topology whose endpoints need identities.
        #[arg(long)]
        topology: PathBuf,
        /// An operator identity to issue as well (repeatable).
        #[arg(long = "operator", value_name = "NAME")]
        operators: Vec<String>,
        /// Issue anew (new keys) even identities that are still good.
        #[arg(long)]
        renew: bool,
    },
}

pub fn run(
    cmd: PkiCommand,
    json: bool,
    read_topology: impl Fn(&Path) -> anyhow::Result<Topology>,
) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init { dir, pool } => {
            pki::init(&dir, &pool)?;
            if json {
                println!("{}", serde_json::json!({ "ca": dir.join("ca.crt") }));
            } else {
                println!(
                    "created the CA of pool {pool} in {} (ca.crt; ca.key is mode 0600: keep it safe)",
                    dir.display()
                );
            }
        }
        PkiCommand::Issue {
            dir,
            topology,
            operators,
            renew,
        } => {
            let t = read_topology(&topology)?;
            let ca = pki::open(&dir)?;
            for o in &operators {
                anyhow::ensure!(
                    !o.is_empty()
                        && o.len() <= 63
                        && o.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                    "operator name `{o}` must be 1-63 letters, digits, `-` or `_`"
                );
            }
            let mut report = Vec::new();
            for id in pchat_control::identities::issue(&ca, &t, &operators, renew)? {
                let what = match id.certificate {
                    Issued::Created => "created",
                    Issued::Renewed => "renewed",
                    Issued::Kept => "kept",
                };
                if json {
                    report.push(serde_json::json!({
                        "identity": id.who.to_string(), "dir": id.dir, "names": id.names,
                        "certificate": what, "etcd_password_created": id.etcd_password_created,
                    }));
                } else {
                    println!(
                        "{what:8} {:28} {} ({})",
                        id.who.to_string(),
                        id.dir.display(),
                        id.names.join(", ")
                    );
                }
            }
            if json {
                println!("{}", serde_json::Value::Array(report));
            }
        }
    }
    Ok(())
}

/// Problems with the identities of `t` in the PKI directory `dir`, one line each (empty: all
/// good for at least 30 more days).
pub fn check(t: &Topology, dir: &Path) -> anyhow::Result<Vec<String>> {
    let ca = pki::open(dir)?;
    let mut problems = Vec::new();
    for who in t.identities() {
        let Some(spec) = t.identity_spec(&who) else {
            continue;
        };
        if let Err(e) = ca.check(&spec, RENEW_BEFORE_DAYS) {
            problems.push(format!("{who}: {e}"));
            continue;
        }
        if who.etcd_user().is_some() {
            if let Err(e) = pchat_tls::fs::read_secret(&ca.dir_of(&spec).join(ETCD_PASSWORD_FILE)) {
                problems.push(format!("{who}: {e}"));
            }
        }
    }
    Ok(problems)
}
