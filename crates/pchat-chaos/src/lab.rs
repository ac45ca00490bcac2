//! The two-site pool in network namespaces, with real processes only.
//!
//! Every host has its own namespace and address on the lab's bridge ([`crate::net`]):
//! `etcd1` (site A), `etcd2` (site B), `etcd3` (the witness), the database hosts `a_db`,
//! `a_mirror`, `b_db`, `b_mirror` (each a `pchat agent` and the PostgreSQL it starts), the
//! servers `a1`, `a2`, `b1`, `b2`, and `client`, where the shell, the writers and the checks
//! run. The pool's certificates are issued from the topology (`pchat pki issue`), so they
//! carry those addresses; etcd runs with TLS, client certificates and etcd users; PostgreSQL
//! over TLS with passwords, as `scripts/lab` sets it up on loopback.
//!
//! Each database host keeps its data directory on a small ext4 volume of its own (a sparse
//! file on a loop device, `-m 0` so `postgres` can fill it to the last block), and so does
//! the share: disk-full faults fill them with a ballast file. Every `pchat` process starts
//! under libfaketime reading its host's clock file, so a clock step on one host is one write
//! (what they start, PostgreSQL included, inherits it; etcd is Go and reads the clock without
//! libc, so its hosts cannot be stepped this way).
//!
//! The lab must be started from a thread that has entered the `client` namespace
//! ([`crate::run`] does): the shell and the writers run there, and everything else is started
//! with `ip netns exec`.

pub use pchat_testkit::postgres::process_tree;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};

use crate::net::{Net, SUBNET};

/// The pool's name.
pub const POOL: &str = "chaos";
/// The XMPP domain.
pub const DOMAIN: &str = "localhost";
/// The writers' accounts.
pub const USERS: [&str; 3] = ["alice", "bob", "carol"];
/// Their password.
pub const PASSWORD: &str = "chaos-pw";
/// PostgreSQL's binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// libfaketime from Debian's `libfaketime`.
pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// The database instances: site A's principal and mirror, site B's backup and its mirror.
pub const INSTANCES: [&str; 4] = ["a_db", "a_mirror", "b_db", "b_mirror"];
/// The servers, site A's then site B's.
pub const SERVERS: [&str; 4] = ["a1", "a2", "b1", "b2"];
/// The agents' API port on every database host.
pub const AGENT_PORT: u16 = 7070;
/// The operator identity the shell runs as.
pub const OPERATOR: &str = "admin";
/// Log shipping's backup interval: short, so a DR failover's window is small and a run sees
/// many segments shipped (each is 16 MiB on the share).
pub const BACKUP_INTERVAL_S: u64 = 5;

/// Hosts and the last octet of their address.
pub const HOSTS: &[(&str, u8)] = &[
    ("client", 2),
    ("etcd1", 11),
    ("etcd2", 12),
    ("etcd3", 13),
    ("a_db", 21),
    ("a_mirror", 22),
    ("b_db", 31),
    ("b_mirror", 32),
    ("a1", 41),
    ("a2", 42),
    ("b1", 51),
    ("b2", 52),
];

const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
const VOLUME_MB: u64 = 1024;
const SHARE_MB: u64 = 4096;

/// A site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// The primary site.
    A,
    /// The backup site.
    B,
}

impl Site {
    /// `A` or `B`.
    pub fn name(self) -> &'static str {
        match self {
            Site::A => "A",
            Site::B => "B",
        }
    }
    /// Its two database instances, the topology's `database` first.
    pub fn instances(self) -> [&'static str; 2] {
        match self {
            Site::A => ["a_db", "a_mirror"],
            Site::B => ["b_db", "b_mirror"],
        }
    }
    /// Its two servers.
    pub fn servers(self) -> [&'static str; 2] {
        match self {
            Site::A => ["a1", "a2"],
            Site::B => ["b1", "b2"],
        }
    }
    /// The site a host (instance or server) belongs to.
    pub fn of(name: &str) -> Site {
        if name.starts_with('a') {
            Site::A
        } else {
            Site::B
        }
    }
}

/// A long-running process of the lab, started in its host's namespace.
pub struct Daemon {
    /// Its name (`etcd2`, `agent-a_db`, `server-a1`).
    pub name: String,
    /// Its host.
    pub host: String,
    argv: Vec<OsString>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn spawn(&mut self, ns: &str) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let err = log.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(&self.argv)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// Its pid while it runs.
    pub fn pid(&mut self) -> Option<i32> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(None) => Some(c.id() as i32),
            _ => None,
        }
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// The lab; see the module documentation.
pub struct Lab {
    /// The pchat binary.
    pub bin: PathBuf,
    /// The namespaces and cuts.
    pub net: Net,
    root: PathBuf,
    daemons: Vec<Daemon>,
    mounts: Vec<(PathBuf, PathBuf)>,
    /// The directory is bound onto itself as a shared mount (see `start`).
    root_bound: bool,
    /// The directory is removed on drop unless kept.
    pub keep: bool,
    // Last: removed after everything in it stopped.
    dir: Option<tempfile::TempDir>,
}

fn addr_of(net: &Net, host: &str) -> Ipv4Addr {
    net.host(host).addr
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends `sig` to every pid (errors ignored: a process may be gone already).
pub fn signal(sig: nix::sys::signal::Signal, pids: &[i32]) {
    for p in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), sig);
    }
}

fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Mounts a volume's image file: ext4 on a loop device, read-only after an error (what a
/// production ext4 does by default), never continuing on a damaged filesystem.
fn mount_image(image: &Path, at: &Path) -> anyhow::Result<()> {
    sh(&[
        "mount",
        "-o",
        "loop,errors=remount-ro",
        &image.display().to_string(),
        &at.display().to_string(),
    ])
    .map(drop)
}

/// The `postgres` user's uid and gid.
pub fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        Ok(sh(&["id", flag, "postgres"])
            .context("no `postgres` user: apt-get install -y postgresql")?
            .trim()
            .parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// Checks that every tool the lab needs is installed; the error names the package.
pub fn preflight() -> anyhow::Result<()> {
    for (path, fix) in [
        ("/usr/bin/etcd", "apt-get install -y etcd-server"),
        ("/usr/sbin/nft", "apt-get install -y nftables"),
        ("/usr/bin/curl", "apt-get install -y curl"),
        (FAKETIME_LIB, "apt-get install -y libfaketime"),
        ("/usr/sbin/mkfs.ext4", "apt-get install -y e2fsprogs"),
    ] {
        ensure!(Path::new(path).exists(), "{path} is missing: {fix}");
    }
    ensure!(
        Path::new(PG_BIN).join("initdb").exists(),
        "PostgreSQL 15 is missing: apt-get install -y postgresql"
    );
    ensure!(
        std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false),
        "the chaos suite makes namespaces, mounts and firewall rules: run it as root"
    );
    Ok(())
}

/// Removes the shared memory and semaphores libfaketime left in `/dev/shm` for processes
/// that are gone. It names them by the creating process's id and never removes them; once
/// such a file of root's (mode 0600) carries the pid a `postgres` process gets later, that
/// process cannot open or recreate it and exits ("sem_open failed … Permission denied"), so
/// a mirror's `pg_ctl start` failed at random once enough runs had left their files.
pub fn remove_stale_faketime_files() {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("sem.faketime_sem_")
            .or_else(|| name.strip_prefix("faketime_shm_"))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl Lab {
    /// Makes the namespaces (before any thread enters one) and the lab's directory.
    pub fn prepare(bin: &Path, id: &str) -> anyhow::Result<Lab> {
        preflight()?;
        remove_stale_faketime_files();
        crate::net::remove_leftovers(id);
        let dir = tempfile::Builder::new()
            .prefix(&format!("pchat-chaos-{id}-"))
            .tempdir()?;
        let root = dir.path().to_path_buf();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        let net = Net::create(id, HOSTS)?;
        Ok(Lab {
            bin: bin.to_path_buf(),
            net,
            root,
            daemons: Vec::new(),
            mounts: Vec::new(),
            root_bound: false,
            keep: false,
            dir: Some(dir),
        })
    }

    /// The lab's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The namespace of the client host, which the calling thread must enter.
    pub fn client_ns(&self) -> String {
        self.net.host("client").ns.clone()
    }

    /// etcd's client URLs.
    pub fn etcd_urls(&self) -> Vec<String> {
        (1..=3)
            .map(|k| format!("https://{}:2379", addr_of(&self.net, &format!("etcd{k}"))))
            .collect()
    }

    fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }

    /// The share's directory (its own volume).
    pub fn share(&self) -> PathBuf {
        self.root.join("share")
    }

    /// Site B's copy directory.
    pub fn copy_dir(&self) -> PathBuf {
        self.root.join("b_copy")
    }

    /// An instance's volume (its data directory lives in `data/` under it).
    pub fn volume(&self, instance: &str) -> PathBuf {
        self.root.join(instance).join("vol")
    }

    /// An instance's data directory.
    pub fn data_dir(&self, instance: &str) -> PathBuf {
        self.volume(instance).join("data")
    }

    /// An instance's unix socket directory.
    pub fn socket_dir(&self, instance: &str) -> PathBuf {
        self.root.join(instance).join("sock")
    }

    /// An instance's agent URL.
    pub fn agent_url(&self, instance: &str) -> String {
        format!("https://{}:{AGENT_PORT}", addr_of(&self.net, instance))
    }

    /// A server's client (STARTTLS) address.
    pub fn server_addr(&self, server: &str) -> SocketAddr {
        SocketAddr::new(addr_of(&self.net, server).into(), 5222)
    }

    /// Every server's client address, in [`SERVERS`] order.
    pub fn server_addrs(&self) -> Vec<SocketAddr> {
        SERVERS.iter().map(|s| self.server_addr(s)).collect()
    }

    /// The server whose client address this is.
    pub fn server_named(&self, addr: SocketAddr) -> Option<&'static str> {
        SERVERS
            .iter()
            .copied()
            .find(|s| self.server_addr(s) == addr)
    }

    /// The file libfaketime reads for `host`'s clock offset.
    pub fn clock_file(&self, host: &str) -> PathBuf {
        self.root.join("clock").join(host)
    }

    /// The pid of an instance's postmaster, if one runs.
    pub fn postmaster_pid(&self, instance: &str) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir(instance).join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }

    /// A daemon by name (`etcd1`, `agent-a_db`, `server-a1`).
    pub fn daemon_mut(&mut self, name: &str) -> Option<&mut Daemon> {
        self.daemons.iter_mut().find(|d| d.name == name)
    }

    /// Starts daemon `name` again (it must have stopped or been killed).
    pub fn respawn(&mut self, name: &str) -> anyhow::Result<()> {
        let d = self
            .daemons
            .iter_mut()
            .find(|d| d.name == name)
            .ok_or_else(|| anyhow!("no daemon {name}"))?;
        if d.pid().is_some() {
            return Ok(());
        }
        d.kill();
        let ns = self.net.host(&d.host).ns.clone();
        d.spawn(&ns)
    }

    fn add_daemon(
        &mut self,
        name: &str,
        host: &str,
        argv: Vec<OsString>,
        faketime: bool,
    ) -> anyhow::Result<()> {
        let mut env = Vec::new();
        if faketime {
            env.push(("LD_PRELOAD".into(), FAKETIME_LIB.into()));
            env.push((
                "FAKETIME_TIMESTAMP_FILE".into(),
                self.clock_file(host).display().to_string(),
            ));
            // Wall clock only: a step of NTP moves CLOCK_REALTIME, never CLOCK_MONOTONIC.
            env.push(("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()));
            env.push(("FAKETIME_CACHE_DURATION".into(), "1".into()));
        }
        let mut d = Daemon {
            name: name.to_owned(),
            host: host.to_owned(),
            argv,
            env,
            log: self.root.join("logs").join(format!("{name}.log")),
            child: None,
        };
        d.spawn(&self.net.host(host).ns)?;
        self.daemons.push(d);
        Ok(())
    }

    fn mount_volume(&mut self, image: PathBuf, at: PathBuf, mb: u64) -> anyhow::Result<()> {
        std::fs::create_dir_all(&at)?;
        let f = std::fs::File::create(&image)?;
        f.set_len(mb * 1024 * 1024)?;
        drop(f);
        sh(&[
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            &image.display().to_string(),
        ])?;
        mount_image(&image, &at)?;
        self.mounts.push((at.clone(), image));
        // ext4 makes lost+found; nothing of the lab's uses it.
        let _ = std::fs::remove_dir(at.join("lost+found"));
        Ok(())
    }

    /// Runs `pchat ARGS…` as the operator (in the calling thread's namespace: `client`).
    pub async fn pchat(&self, args: &[&str]) -> anyhow::Result<String> {
        self.pchat_timeout(args, COMMAND_TIMEOUT).await
    }

    /// [`Lab::pchat`] with its own bound.
    pub async fn pchat_timeout(&self, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let run = tokio::process::Command::new(&self.bin)
            .args(args)
            .env("PCHAT_ETCD", self.etcd_urls().join(","))
            .env("PCHAT_TLS_DIR", self.pki().join("operators").join(OPERATOR))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| anyhow!("pchat {args:?} did not finish within {timeout:?}"))??;
        ensure!(
            out.status.success(),
            "pchat {args:?} failed with {}\nstderr:\n{}\nstdout:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    fn topology_toml(&self) -> String {
        let eps = self
            .etcd_urls()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut t = format!(
            "# The chaos lab: every host in its own network namespace on {SUBNET}.\n\
             share = \"{}\"\netcd = [{eps}]\n\n[pool]\nname = \"{POOL}\"\n\
             domain = \"{DOMAIN}\"\n",
            self.share().display()
        );
        for site in [Site::A, Site::B] {
            let [db, mirror] = site.instances();
            let inst = |i: &str| {
                format!(
                    "{{ name = \"{i}\", address = \"{}:5432\", agent = \"{}\" }}",
                    addr_of(&self.net, i),
                    self.agent_url(i)
                )
            };
            t.push_str(&format!(
                "\n[[sites]]\nname = \"{}\"\nrole = \"{}\"\ndatabase = {}\nmirror = {}\n",
                site.name(),
                if site == Site::A { "primary" } else { "backup" },
                inst(db),
                inst(mirror)
            ));
            if site == Site::B {
                t.push_str(&format!("copy_dir = \"{}\"\n", self.copy_dir().display()));
            }
        }
        for s in SERVERS {
            t.push_str(&format!(
                "\n[[servers]]\nname = \"{s}\"\nsite = \"{}\"\naddress = \"{}\"\n",
                Site::of(s).name(),
                self.server_addr(s)
            ));
        }
        t
    }

    /// Starts everything and brings the pool to its steady state: site A installed and
    /// mirrored, servers a1 and a2 active, log shipping A → B seeded.
    pub async fn start(&mut self, progress: &dyn Fn(&str)) -> anyhow::Result<()> {
        let (uid, gid) = postgres_ids()?;
        let root = self.root.clone();
        for d in ["logs", "etcd", "servers", "clock", "b_copy"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        for (h, _) in HOSTS {
            let f = self.clock_file(h);
            std::fs::write(&f, "+0\n")?;
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644))?;
        }
        // The lab's directory as a shared mount of its own: the daemons run in mount
        // namespaces of their own (`ip netns exec`), copies of this one made when they
        // start, and `/` is private here. Under a shared mount a volume's unmount reaches
        // their copies too, so a repaired disk (`repair_disk`) is really let go of.
        let r = root.display().to_string();
        sh(&["mount", "--bind", &r, &r])?;
        self.root_bound = true;
        sh(&["mount", "--make-shared", &r])?;
        self.mount_volume(root.join("share.img"), self.share(), SHARE_MB)?;
        for d in [self.share(), self.copy_dir()] {
            std::os::unix::fs::chown(&d, Some(uid), Some(gid))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o750))?;
        }
        for i in INSTANCES {
            let d = root.join(i);
            std::fs::create_dir_all(&d)?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
            self.mount_volume(d.join("vol.img"), self.volume(i), VOLUME_MB)?;
            std::fs::set_permissions(self.volume(i), std::fs::Permissions::from_mode(0o755))?;
        }

        progress("PKI from the topology (every certificate carries its host's address)");
        let topology = root.join("topology.toml");
        std::fs::write(&topology, self.topology_toml())?;
        let pki = self.pki().display().to_string();
        let topo = topology.display().to_string();
        self.pchat(&["pki", "init", "--dir", &pki, "--pool", POOL])
            .await?;
        self.pchat(&[
            "pki",
            "issue",
            "--dir",
            &pki,
            "--topology",
            &topo,
            "--operator",
            OPERATOR,
        ])
        .await?;
        self.pchat(&["topology", "validate", &topo, "--pki", &pki])
            .await?;

        progress("etcd: 3 members (site A, site B, witness), TLS and client certificates");
        let cluster = (1..=3)
            .map(|k| {
                format!(
                    "m{k}=https://{}:2380",
                    addr_of(&self.net, &format!("etcd{k}"))
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        for k in 1..=3 {
            let host = format!("etcd{k}");
            let a = addr_of(&self.net, &host);
            let id = self.pki().join("etcd").join(k.to_string());
            let data = root.join("etcd").join(format!("m{k}"));
            let argv: Vec<OsString> = vec![
                "etcd".into(),
                "--name".into(),
                format!("m{k}").into(),
                "--data-dir".into(),
                data.into(),
                "--listen-client-urls".into(),
                format!("https://{a}:2379").into(),
                "--advertise-client-urls".into(),
                format!("https://{a}:2379").into(),
                "--listen-peer-urls".into(),
                format!("https://{a}:2380").into(),
                "--initial-advertise-peer-urls".into(),
                format!("https://{a}:2380").into(),
                "--initial-cluster".into(),
                cluster.clone().into(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                "pchat-chaos".into(),
                // As README recommends: a member back from a partition asks before it calls
                // an election, so it does not depose a leader the others still follow.
                "--pre-vote".into(),
                "--cert-file".into(),
                id.join("cert.pem").into(),
                "--key-file".into(),
                id.join("key.pem").into(),
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                self.pki().join("ca.crt").into(),
                "--peer-cert-file".into(),
                id.join("cert.pem").into(),
                "--peer-key-file".into(),
                id.join("key.pem").into(),
                "--peer-client-cert-auth".into(),
                "--peer-trusted-ca-file".into(),
                self.pki().join("ca.crt").into(),
            ];
            self.add_daemon(&host, &host, argv, false)?;
        }
        self.wait_etcd(Duration::from_secs(60)).await?;
        self.pchat(&[
            "control",
            "auth",
            "setup",
            "--topology",
            &topo,
            "--pki",
            &pki,
        ])
        .await?;

        progress("agents a_db a_mirror b_db b_mirror; servers a1 a2 b1 b2");
        let eps = self
            .etcd_urls()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        for i in INSTANCES {
            let a = addr_of(&self.net, i);
            let config = root.join(i).join("agent.toml");
            std::fs::write(
                &config,
                format!(
                    "listen = \"{a}:{AGENT_PORT}\"\ntls_dir = \"{}\"\n\
                     pg_bin_dir = \"{PG_BIN}\"\ndata_dir = \"{}\"\nsocket_dir = \"{}\"\n\
                     port = 5432\nlisten_addresses = \"{a}\"\ntrusted_networks = [\"{SUBNET}\"]\n\
                     etcd = [{eps}]\npool = \"{POOL}\"\ninstance = \"{i}\"\n\
                     start_on_boot = false\npublish_interval_ms = 200\n",
                    self.pki().join("instances").join(i).display(),
                    self.data_dir(i).display(),
                    self.socket_dir(i).display(),
                ),
            )?;
            let argv = vec![
                self.bin.clone().into(),
                "agent".into(),
                "run".into(),
                "--config".into(),
                config.into(),
            ];
            self.add_daemon(&format!("agent-{i}"), i, argv, true)?;
        }
        let etcd_csv = self.etcd_urls().join(",");
        for s in SERVERS {
            let a = addr_of(&self.net, s);
            let data = root.join("servers").join(s);
            std::fs::create_dir_all(&data)?;
            let argv: Vec<OsString> = [
                self.bin.display().to_string(),
                "--data-dir".into(),
                data.display().to_string(),
                "--tls-dir".into(),
                self.pki().join("servers").join(s).display().to_string(),
                "serve".into(),
                "--bind-addr".into(),
                a.to_string(),
                "--c2s-port".into(),
                "5222".into(),
                "--c2s-tls-port".into(),
                "5223".into(),
                "--http-port".into(),
                "5280".into(),
                "--topology-from-etcd".into(),
                etcd_csv.clone(),
                "--pool".into(),
                POOL.into(),
                "--server".into(),
                s.into(),
                "--pool-poll-ms".into(),
                "100".into(),
                "--drain-timeout-ms".into(),
                "1000".into(),
            ]
            .into_iter()
            .map(OsString::from)
            .collect();
            self.add_daemon(&format!("server-{s}"), s, argv, true)?;
        }
        for i in INSTANCES {
            self.wait_agent(i, Duration::from_secs(30)).await?;
        }
        for s in SERVERS {
            self.wait_ready(s, Duration::from_secs(60)).await?;
        }

        progress("topology published; site A installed, users added, a_mirror added");
        self.pchat(&["topology", "publish", &topo]).await?;
        let url = self.agent_url("a_db");
        self.pchat(&["agent", "init", "--url", &url]).await?;
        self.pchat(&["agent", "start", "--url", &url]).await?;
        self.pchat(&["--in-pool", POOL, "db", "install", "--site", "A"])
            .await?;
        for u in USERS {
            let jid = format!("{u}@{DOMAIN}");
            self.pchat(&[
                "--in-pool",
                POOL,
                "user",
                "add",
                &jid,
                "--password",
                PASSWORD,
            ])
            .await?;
        }
        self.pchat(&["--in-pool", POOL, "db", "mirror", "add", "--site", "A"])
            .await?;
        self.pchat(&["pool", "set-active-servers", POOL, "a1", "a2"])
            .await?;
        progress("log shipping A -> share -> b_db (seeded), b_mirror stays empty");
        let interval = BACKUP_INTERVAL_S.to_string();
        self.pchat(&[
            "--in-pool",
            POOL,
            "db",
            "log-shipping",
            "configure",
            "--backup-interval-s",
            &interval,
            "--copy-interval-s",
            "1",
        ])
        .await?;
        Ok(())
    }

    /// Waits until every etcd member answers `/health` with the operator's certificate.
    pub async fn wait_etcd(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for url in self.etcd_urls() {
            loop {
                let out = self.curl(&format!("{url}/health"), None).await;
                if out.as_deref().is_ok_and(|o| o.contains("true")) {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "etcd {url} not healthy within {timeout:?}: {out:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// `curl` with the operator's certificate (from the client host), bounded to 3 s.
    pub async fn curl(&self, url: &str, post: Option<&str>) -> anyhow::Result<String> {
        let op = self.pki().join("operators").join(OPERATOR);
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "3", "--cacert"])
            .arg(self.pki().join("ca.crt"))
            .arg("--cert")
            .arg(op.join("cert.pem"))
            .arg("--key")
            .arg(op.join("key.pem"));
        if let Some(body) = post {
            cmd.args(["-X", "POST", "-d", body]);
        }
        let out = cmd
            .arg(url)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The etcd member (1..=3) that leads now, by asking the members in turn.
    pub async fn etcd_leader(&self) -> Option<u8> {
        let mut ids = Vec::new();
        let mut leader = None;
        for (k, url) in self.etcd_urls().iter().enumerate() {
            let Ok(out) = self
                .curl(&format!("{url}/v3/maintenance/status"), Some("{}"))
                .await
            else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) else {
                continue;
            };
            let me = v["header"]["member_id"].as_str().map(str::to_owned);
            ids.push((k as u8 + 1, me));
            if let Some(l) = v["leader"].as_str() {
                leader = Some(l.to_owned());
            }
        }
        let leader = leader?;
        ids.into_iter()
            .find(|(_, me)| me.as_deref() == Some(leader.as_str()))
            .map(|(k, _)| k)
    }

    /// Waits until an instance's agent answers `agent status`.
    pub async fn wait_agent(&self, instance: &str, timeout: Duration) -> anyhow::Result<()> {
        let url = self.agent_url(instance);
        // The topology file pins the instance the agent's certificate must name (the
        // published one may not exist yet, at the lab's start).
        let topology = self.root.join("topology.toml").display().to_string();
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .pchat_timeout(
                    &["agent", "status", "--url", &url, "--topology", &topology],
                    Duration::from_secs(5),
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!("the agent of {instance} did not answer within {timeout:?}: {e:#}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Waits until server `s` printed `ready` since its last start.
    pub async fn wait_ready(&self, s: &str, timeout: Duration) -> anyhow::Result<()> {
        let log = self.root.join("logs").join(format!("server-{s}.log"));
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().any(|l| l.starts_with("ready")) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "server {s} not ready within {timeout:?}; log tail:\n{}",
                tail(&log, 2000)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `select pg_is_in_recovery()` on `instance` over its unix socket as the superuser,
    /// bounded to 2 s: `Some(true)` standby, `Some(false)` writable, `None` no answer.
    pub async fn in_recovery(&self, instance: &str) -> Option<bool> {
        self.postmaster_pid(instance)?;
        let run = tokio::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("psql"))
            .arg("-h")
            .arg(self.socket_dir(instance))
            .args([
                "-p",
                "5432",
                "-d",
                "postgres",
                "-AtXq",
                "-c",
                "select pg_is_in_recovery()",
            ])
            .env("PGCONNECT_TIMEOUT", "2")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(2), run)
            .await
            .ok()?
            .ok()?;
        match String::from_utf8_lossy(&out.stdout).trim() {
            "t" => Some(true),
            "f" => Some(false),
            _ => None,
        }
    }

    /// The tail of a daemon's log.
    pub fn log_tail(&self, daemon: &str, bytes: usize) -> String {
        tail(&self.root.join("logs").join(format!("{daemon}.log")), bytes)
    }

    /// Freezes (`true`) or thaws the filesystem mounted at `at`, one of the lab's volumes
    /// (`fsfreeze`): while frozen every write to it waits (in the kernel: the writer cannot
    /// even be killed), reads go on.
    pub fn stall(&self, at: &Path, stall: bool) -> anyhow::Result<()> {
        ensure!(
            self.mounts.iter().any(|(m, _)| m == at),
            "{} is not a volume of the lab",
            at.display()
        );
        let flag = if stall { "--freeze" } else { "--unfreeze" };
        sh(&["fsfreeze", flag, &at.display().to_string()]).map(drop)
    }

    /// Makes the filesystem mounted at `at`, one of the lab's volumes, fail as ext4 does
    /// after an I/O error on its disk: the journal aborts and the filesystem turns
    /// read-only (`errors=remount-ro`), so every write fails (EROFS) and reads go on. The
    /// kernel's own test hook (`/sys/fs/ext4/DEV/trigger_fs_error`) raises the error: no
    /// device-mapper target here to fail the blocks themselves.
    pub fn fail_disk(&self, at: &Path) -> anyhow::Result<()> {
        ensure!(
            self.mounts.iter().any(|(m, _)| m == at),
            "{} is not a volume of the lab",
            at.display()
        );
        let source = sh(&["findmnt", "-n", "-o", "SOURCE", &at.display().to_string()])?;
        let dev = Path::new(source.trim())
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("no device under {}", at.display()))?
            .to_owned();
        std::fs::write(
            format!("/sys/fs/ext4/{dev}/trigger_fs_error"),
            "chaos: disk error injected\n",
        )
        .with_context(|| format!("raising an ext4 error on {dev}"))
    }

    /// The failed disk of `at` repaired as an operator would once nothing uses it: unmounted,
    /// `e2fsck -fy`, mounted again (read-write).
    pub fn repair_disk(&self, at: &Path) -> anyhow::Result<()> {
        let Some((_, image)) = self.mounts.iter().find(|(m, _)| m == at) else {
            bail!("{} is not a volume of the lab", at.display());
        };
        sh(&["umount", &at.display().to_string()])?;
        // Checking a filesystem that is still mounted somewhere would damage it: wait until
        // its loop device is let go of (every namespace's copy unmounted with it).
        let released = Instant::now() + Duration::from_secs(5);
        let image_arg = image.display().to_string();
        while !sh(&["losetup", "-j", &image_arg])?.trim().is_empty() {
            ensure!(
                Instant::now() < released,
                "{} is unmounted here but still in use elsewhere: not checking it",
                image.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // 0: clean; 1: errors corrected; 2: corrected, reboot advised (a loop file: no).
        let out = Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(image)
            .stdin(Stdio::null())
            .output()
            .context("running e2fsck")?;
        ensure!(
            matches!(out.status.code(), Some(0..=2)),
            "e2fsck {} failed ({}): {}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        );
        mount_image(image, at)
    }

    /// Thaws every volume (one that is not frozen says so, which is ignored): nothing of
    /// the lab can stop, or be killed, while a write of it waits on a frozen filesystem.
    pub fn thaw_all(&self) {
        for (at, _) in &self.mounts {
            let _ = sh(&["fsfreeze", "--unfreeze", &at.display().to_string()]);
        }
    }

    /// Kills every process of the lab (agents first, so none restarts anything), unmounts
    /// the volumes; the namespaces go with [`Net`]'s drop.
    pub fn shutdown(&mut self) {
        self.thaw_all();
        for d in self
            .daemons
            .iter_mut()
            .filter(|d| d.name.starts_with("agent-"))
        {
            d.kill();
        }
        let mut pids = Vec::new();
        for i in INSTANCES {
            if let Some(pm) = self.postmaster_pid(i) {
                pids.extend(process_tree(pm));
            }
        }
        // Resume anything frozen, or SIGKILL is held until it is.
        signal(nix::sys::signal::Signal::SIGCONT, &pids);
        signal(nix::sys::signal::Signal::SIGKILL, &pids);
        for d in &mut self.daemons {
            if let Some(p) = d.pid() {
                signal(nix::sys::signal::Signal::SIGCONT, &[p]);
            }
            d.kill();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for (at, image) in self.mounts.drain(..).rev() {
            if self.keep {
                // PostgreSQL's logs live on the volume: keep a copy beside it.
                if let Some(name) = at.parent().and_then(|p| p.file_name()) {
                    let _ = std::fs::copy(
                        at.join("data.log"),
                        self.root
                            .join("logs")
                            .join(format!("{}-postgres.log", name.to_string_lossy())),
                    );
                }
            }
            let _ = sh(&["umount", "-l", &at.display().to_string()]);
            let _ = std::fs::remove_file(&image);
        }
        if std::mem::take(&mut self.root_bound) {
            let _ = sh(&["umount", "-l", &self.root.display().to_string()]);
        }
    }

    /// Keeps the lab's directory (logs) after the drop; returns where it is.
    pub fn keep_dir(&mut self) -> PathBuf {
        self.keep = true;
        self.root.clone()
    }
}

/// The last `bytes` of a file.
pub fn tail(path: &Path, bytes: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(bytes);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.shutdown();
        remove_stale_faketime_files();
        if self.keep {
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
        }
    }
}
