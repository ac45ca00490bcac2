//! A pool's PKI and a TLS etcd cluster with authentication, as `pchat pki init|issue` and
//! `pchat control auth setup` make them, for the tests of this crate.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use pchat_control::identities::{etcd_member_spec, EtcdAccess};
use pchat_control::{auth, topology, Etcd, Topology, Who};
use pchat_testkit::etcd::{EtcdCluster, EtcdTls};
use pchat_tls::pki::{self, Ca};

/// The PKI of pool `pool` in a temporary directory, and a cluster using its etcd identities.
pub struct SecureEtcd {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub pool: String,
    pub cluster: EtcdCluster,
}

impl SecureEtcd {
    /// A CA for `pool` and `n` etcd members with TLS and client certificates required.
    pub async fn start(pool: &str, n: usize) -> anyhow::Result<SecureEtcd> {
        let dir = tempfile::tempdir()?;
        let ca = pki::init(&dir.path().join("pki"), pool)?;
        let mut members = Vec::new();
        for k in 1..=n {
            let spec = etcd_member_spec(pool, k, "127.0.0.1");
            ca.issue(&spec, false)?;
            let d = ca.dir_of(&spec);
            members.push((d.join("cert.pem"), d.join("key.pem")));
        }
        let cluster = EtcdCluster::start_tls(
            n,
            EtcdTls {
                ca: ca.root().join("ca.crt"),
                members,
            },
        )
        .await?;
        Ok(SecureEtcd {
            dir,
            ca,
            pool: pool.to_owned(),
            cluster,
        })
    }

    pub fn pki(&self) -> &Path {
        self.ca.root()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.cluster.endpoints()
    }

    /// Parses `text` and issues its identities and `operators`'.
    pub fn issue(&self, text: &str, operators: &[&str]) -> anyhow::Result<Topology> {
        let t = topology::parse(text)?;
        let ops: Vec<String> = operators.iter().map(|s| s.to_string()).collect();
        pchat_control::identities::issue(&self.ca, &t, &ops, false)?;
        Ok(t)
    }

    /// `pchat control auth setup` as operator `operator`; what it changed.
    pub async fn setup(&self, t: &Topology, operator: &str) -> anyhow::Result<Vec<String>> {
        let (root, pw) = auth::root_client(
            &self.endpoints(),
            &self.dir_of(&Who::Operator(operator.into())),
        )?;
        Ok(auth::setup(&root, &pw, t, self.pki()).await?.1)
    }

    pub fn dir_of(&self, who: &Who) -> PathBuf {
        self.pki().join(who.path())
    }

    /// The client `who`'s process builds from its identity directory.
    pub fn client(&self, who: &Who) -> anyhow::Result<Etcd> {
        Ok(EtcdAccess {
            endpoints: self.endpoints(),
            tls_dir: Some(self.dir_of(who)),
            hint: "test",
        }
        .connect(Some(&self.pool))?)
    }
}
