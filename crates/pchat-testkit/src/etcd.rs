//! A real etcd cluster for tests: N members (`etcd` from Debian's `etcd-server`) on free
//! loopback ports with data in a temporary directory. Members can be killed, paused (SIGSTOP,
//! a stand-in for a partition) and started again.
//!
//! With [`EtcdTls`] the members run as a secure pool's do: TLS on the client and peer URLs
//! with their own certificates, and only clients and peers with a certificate from the given
//! CA get in (`--client-cert-auth`, `--peer-client-cert-auth`). The test makes the
//! certificates (this crate shares no code with pchat's PKI).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum EtcdClusterError {
    /// `etcd` is not installed.
    #[error("etcd is not installed: run `apt-get install -y etcd-server` (scripts/test does)")]
    Missing,
    /// Something else.
    #[error("etcd cluster: {0}")]
    Other(String),
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// The certificates of a TLS cluster.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// The CA members trust for clients and peers (and clients for members).
    pub ca: PathBuf,
    /// Member `i`'s certificate and key (PEM); the certificate must name `127.0.0.1` and
    /// allow both server and client use (members dial each other).
    pub members: Vec<(PathBuf, PathBuf)>,
}

/// A running etcd cluster; dropping it kills every member and removes the data.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
    tls: Option<EtcdTls>,
    /// The health checks' client (with member 0's certificate when TLS is on).
    http: reqwest::Client,
}

fn free_port() -> Result<u16, EtcdClusterError> {
    crate::ports::free_port().map_err(|e| EtcdClusterError::Other(e.to_string()))
}

fn other(e: impl std::fmt::Display) -> EtcdClusterError {
    EtcdClusterError::Other(e.to_string())
}

/// A client that trusts `tls.ca` and presents member 0's certificate.
fn tls_client(tls: &EtcdTls) -> Result<reqwest::Client, EtcdClusterError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = tls
        .members
        .first()
        .ok_or_else(|| other("EtcdTls names no member certificate"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&tls.ca).map_err(other)? {
        roots.add(c.map_err(other)?).map_err(other)?;
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(other)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(other)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(other)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(other)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(other)?;
    reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .use_preconfigured_tls(config)
        .build()
        .map_err(other)
}

impl EtcdCluster {
    /// Starts `n` plaintext members and waits until the cluster has a leader.
    pub async fn start(n: usize) -> Result<EtcdCluster, EtcdClusterError> {
        Self::start_with(n, None).await
    }

    /// Starts `n` members with TLS and client certificates required (`tls.members` must
    /// hold `n` certificates) and waits until the cluster has a leader.
    pub async fn start_tls(n: usize, tls: EtcdTls) -> Result<EtcdCluster, EtcdClusterError> {
        if tls.members.len() < n {
            return Err(other(format!(
                "{n} members but {} certificates",
                tls.members.len()
            )));
        }
        Self::start_with(n, Some(tls)).await
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    async fn start_with(n: usize, tls: Option<EtcdTls>) -> Result<EtcdCluster, EtcdClusterError> {
        if Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            return Err(EtcdClusterError::Missing);
        }
        let dir = tempfile::Builder::new()
            .prefix("pchat-etcd-")
            .tempdir()
            .map_err(|e| EtcdClusterError::Other(e.to_string()))?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                child: None,
            });
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={scheme}://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let http = match &tls {
            Some(t) => tls_client(t)?,
            None => reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .build()
                .map_err(other)?,
        };
        let mut c = EtcdCluster {
            dir,
            members,
            initial_cluster,
            tls,
            http,
        };
        for i in 0..n {
            c.spawn(i, "new")?;
        }
        c.wait_healthy(Duration::from_secs(30)).await?;
        Ok(c)
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), EtcdClusterError> {
        let data: PathBuf = self.dir.path().join(&self.members[i].name);
        let log = std::fs::File::create(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .map_err(|e| EtcdClusterError::Other(e.to_string()))?;
        let scheme = self.scheme();
        let tls = self.tls.clone();
        let m = &mut self.members[i];
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("{scheme}://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        if let Some(t) = &tls {
            let (cert, key) = &t.members[i];
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--peer-cert-file")
                .arg(cert)
                .arg("--peer-key-file")
                .arg(key)
                .arg("--peer-client-cert-auth")
                .arg("--peer-trusted-ca-file")
                .arg(&t.ca);
        }
        let child = cmd
            .args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                state,
            ])
            .args([
                "--initial-cluster-token",
                "pchat-test",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ])
            // Fast elections keep failover tests short; loopback latency is microseconds.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| EtcdClusterError::Other(format!("cannot start etcd: {e}")))?;
        m.child = Some(child);
        Ok(())
    }

    async fn wait_healthy(&self, timeout: Duration) -> Result<(), EtcdClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            for ep in self.endpoints() {
                if let Ok(r) = self.http.get(format!("{ep}/health")).send().await {
                    if r.text().await.is_ok_and(|t| t.contains("\"true\"")) {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(EtcdClusterError::Other(format!(
                    "no healthy member after {timeout:?}; logs in {}",
                    self.dir.path().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port))
            .collect()
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub async fn restart(&mut self, i: usize) -> Result<(), EtcdClusterError> {
        self.kill(i);
        self.spawn(i, "existing")?;
        self.wait_healthy(Duration::from_secs(30)).await
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
