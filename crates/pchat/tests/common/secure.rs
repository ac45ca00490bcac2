//! The pool's PKI and its etcd with TLS and authentication, for the pool tests: what an
//! operator does with `pchat pki init|issue`, etcd members started with `--client-cert-auth`,
//! and `pchat control auth setup`.
//!
//! [`SecureEtcd::start`] makes the CA in `ROOT/pki`, the identities of the etcd members, of the
//! instances and servers named (on 127.0.0.1; ports are not part of a certificate, so they
//! are issued before the processes pick theirs) and of the operator [`OPERATOR`], and starts
//! the members. Every process of the test is then given its identity: agents `tls_dir`,
//! servers and the shell `--tls-dir` (the shell through `PCHAT_TLS_DIR`, see
//! [`SecureEtcd::env`]). Once the test has written its topology, [`SecureEtcd::setup`] checks
//! it against the certificates (`pchat topology validate --pki`) and runs `pchat control auth
//! setup`: from then on every process logs in as its own etcd user.
//!
//! The topologies are secure ones: etcd's and the agents' URLs are https://, so both are
//! reached only over TLS, each process with its own certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _};
use pchat_control::identities::issue_one;
use pchat_control::Who;
use pchat_testkit::etcd::{EtcdCluster, EtcdTls};

/// The operator identity the tests' shell commands run with.
pub const OPERATOR: &str = "admin";

/// A pool's PKI and its TLS etcd cluster.
pub struct SecureEtcd {
    /// The members.
    pub cluster: EtcdCluster,
    pki: PathBuf,
    pool: String,
}

impl SecureEtcd {
    /// The PKI in `root/pki` with the identities of `instances` and `servers` of pool
    /// `pool`, and `members` etcd members using theirs.
    pub async fn start(
        root: &Path,
        pool: &str,
        members: usize,
        instances: &[&str],
        servers: &[&str],
    ) -> anyhow::Result<SecureEtcd> {
        let pki = root.join("pki");
        let ca = pchat_tls::pki::init(&pki, pool)?;
        let whos = instances
            .iter()
            .map(|i| Who::Instance(i.to_string()))
            .chain(servers.iter().map(|s| Who::Server(s.to_string())))
            .chain((1..=members).map(Who::Etcd))
            .chain(std::iter::once(Who::Operator(OPERATOR.into())));
        for who in whos {
            let hosts: &[&str] = match who {
                Who::Instance(_) | Who::Etcd(_) => &["127.0.0.1"],
                _ => &[],
            };
            let spec = who.identity_spec(pool, hosts);
            issue_one(&ca, who, spec, false)?;
        }
        let member_files = (1..=members)
            .map(|k| {
                let d = pki.join(Who::Etcd(k).path());
                (d.join("cert.pem"), d.join("key.pem"))
            })
            .collect();
        let cluster = EtcdCluster::start_tls(
            members,
            EtcdTls {
                ca: pki.join("ca.crt"),
                members: member_files,
            },
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
        Ok(SecureEtcd {
            cluster,
            pki,
            pool: pool.to_owned(),
        })
    }

    /// The PKI directory.
    pub fn pki(&self) -> &Path {
        &self.pki
    }

    /// The members' https:// URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.cluster.endpoints()
    }

    /// The members' URLs, comma-separated (`PCHAT_ETCD`, `--topology-from-etcd`).
    pub fn endpoints_csv(&self) -> String {
        self.endpoints().join(",")
    }

    /// The members' URLs as a TOML list's items.
    pub fn endpoints_toml(&self) -> String {
        self.endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `who`'s identity directory.
    pub fn dir_of(&self, who: &Who) -> PathBuf {
        self.pki.join(who.path())
    }

    /// Instance `name`'s identity directory (its agent's `tls_dir`).
    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.dir_of(&Who::Instance(name.into()))
    }

    /// Server `name`'s identity directory (its `--tls-dir`).
    pub fn server_dir(&self, name: &str) -> PathBuf {
        self.dir_of(&Who::Server(name.into()))
    }

    /// The shell's identity directory.
    pub fn operator_dir(&self) -> PathBuf {
        self.dir_of(&Who::Operator(OPERATOR.into()))
    }

    /// `--tls-dir DIR` for server `name`, to append to its `serve` arguments.
    pub fn server_args(&self, name: &str) -> Vec<String> {
        vec![
            "--tls-dir".into(),
            self.server_dir(name).display().to_string(),
        ]
    }

    /// The shell's environment: the etcd endpoints and the operator's identity.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("PCHAT_ETCD".into(), self.endpoints_csv()),
            (
                "PCHAT_TLS_DIR".into(),
                self.operator_dir().display().to_string(),
            ),
        ]
    }

    /// `pchat topology validate FILE --pki` (every endpoint has its certificate), then
    /// `pchat control auth setup` as the operator: the users, roles and authentication.
    pub async fn setup(&self, bin: &Path, topology: &Path) -> anyhow::Result<()> {
        let pki = self.pki.display().to_string();
        let file = topology.display().to_string();
        self.pchat(bin, &["topology", "validate", &file, "--pki", &pki])
            .await?;
        let out = self
            .pchat(
                bin,
                &[
                    "control",
                    "auth",
                    "setup",
                    "--topology",
                    &file,
                    "--pki",
                    &pki,
                ],
            )
            .await?;
        ensure!(
            out.contains(&format!("pool {}", self.pool)),
            "unexpected setup output: {out}"
        );
        Ok(())
    }

    async fn pchat(&self, bin: &Path, args: &[&str]) -> anyhow::Result<String> {
        let run = tokio::process::Command::new(bin)
            .args(args)
            .envs(self.env())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .map_err(|_| anyhow!("pchat {args:?} took over 60 s"))?
            .with_context(|| format!("running pchat {args:?}"))?;
        ensure!(
            out.status.success(),
            "pchat {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
