//! A real etcd cluster for tests: N members (`etcd` from Debian's `etcd-server`) on free
//! loopback ports with data in a temporary directory. Members can be killed, paused (SIGSTOP,
//! a stand-in for a partition) and started again.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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

/// A running etcd cluster; dropping it kills every member and removes the data.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
}

fn free_port() -> Result<u16, EtcdClusterError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| EtcdClusterError::Other(e.to_string()))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| EtcdClusterError::Other(e.to_string()))
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster has a leader.
    pub async fn start(n: usize) -> Result<EtcdCluster, EtcdClusterError> {
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
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            dir,
            members,
            initial_cluster,
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
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new("etcd")
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
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .map_err(|e| EtcdClusterError::Other(e.to_string()))?;
        loop {
            for ep in self.endpoints() {
                if let Ok(r) = http.get(format!("{ep}/health")).send().await {
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
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
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
