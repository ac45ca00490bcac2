//! A real OpenLDAP directory for tests: `slapd` from Debian's `slapd` package, started on
//! free loopback ports with its database in a temporary directory, TLS on both listeners
//! (LDAPS, and plain LDAP that offers StartTLS) with a CA made for the test, and a tree
//! loaded with `slapadd` before it starts. Changes during a test go through Debian's
//! `ldapmodify` (package `ldap-utils`), a client independent of the one pchat uses.
//!
//! The tree ([`Slapd::start`] with a [`Tree`]): `dc=example,dc=org` with `ou=people` holding
//! users (`inetOrgPerson`, `uid`, `userPassword`) — optionally inside sub-OUs — and
//! `ou=groups` holding `groupOfNames` groups whose `member`s are users or other groups
//! (nesting). A service account `cn=pchat,ou=services,dc=example,dc=org` can read everything;
//! anonymous clients can only bind.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The directory's suffix.
pub const BASE: &str = "dc=example,dc=org";
/// The service account pchat binds as.
pub const SERVICE_DN: &str = "cn=pchat,ou=services,dc=example,dc=org";
/// The service account's password.
pub const SERVICE_PASSWORD: &str = "service-secret-1";
const ROOT_DN: &str = "cn=admin,dc=example,dc=org";
const ROOT_PASSWORD: &str = "root-secret-1";

/// Why the directory could not start or change.
#[derive(Debug, thiserror::Error)]
pub enum SlapdError {
    /// slapd or the LDAP tools are not installed.
    #[error("{0} is not installed: run `apt-get install -y slapd ldap-utils` (scripts/test does)")]
    Missing(&'static str),
    /// Something else.
    #[error("slapd: {0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> SlapdError {
    SlapdError::Other(e.to_string())
}

/// A user of the tree.
#[derive(Clone, Debug)]
pub struct User {
    /// `uid` (the JID's local part).
    pub uid: String,
    /// Their password.
    pub password: String,
    /// The OUs under `ou=people` they sit in, outermost first (`["legal", "emea"]` gives
    /// `uid=…,ou=emea,ou=legal,ou=people,…`).
    pub ous: Vec<String>,
}

/// A group: its `cn` and members, each `user:UID` or `group:CN`.
#[derive(Clone, Debug)]
pub struct Group {
    /// `cn`.
    pub cn: String,
    /// `user:UID` or `group:CN`.
    pub members: Vec<String>,
}

/// What to load.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    /// Users.
    pub users: Vec<User>,
    /// Groups.
    pub groups: Vec<Group>,
}

impl Tree {
    /// The DN of user `uid` in this tree.
    pub fn user_dn(&self, uid: &str) -> String {
        let ous = self
            .users
            .iter()
            .find(|u| u.uid == uid)
            .map(|u| u.ous.clone())
            .unwrap_or_default();
        let mut dn = format!("uid={uid}");
        for ou in ous.iter().rev() {
            dn.push_str(&format!(",ou={ou}"));
        }
        dn.push_str(&format!(",ou=people,{BASE}"));
        dn
    }

    /// The DN of group `cn`.
    pub fn group_dn(cn: &str) -> String {
        format!("cn={cn},ou=groups,{BASE}")
    }

    fn member_dn(&self, m: &str) -> String {
        match m.split_once(':') {
            Some(("group", cn)) => Tree::group_dn(cn),
            Some(("user", uid)) => self.user_dn(uid),
            _ => m.to_owned(),
        }
    }

    fn ldif(&self) -> String {
        let mut out = format!(
            "dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n\
             dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups\n\n\
             dn: ou=services,{BASE}\nobjectClass: organizationalUnit\nou: services\n\n\
             dn: {SERVICE_DN}\nobjectClass: person\nobjectClass: simpleSecurityObject\ncn: pchat\nsn: pchat\nuserPassword: {SERVICE_PASSWORD}\n\n"
        );
        let mut ous_made = std::collections::BTreeSet::new();
        for u in &self.users {
            let mut parent = format!("ou=people,{BASE}");
            for ou in &u.ous {
                let dn = format!("ou={ou},{parent}");
                if ous_made.insert(dn.clone()) {
                    out.push_str(&format!(
                        "dn: {dn}\nobjectClass: organizationalUnit\nou: {ou}\n\n"
                    ));
                }
                parent = dn;
            }
            out.push_str(&format!(
                "dn: {}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\nuserPassword: {pw}\n\n",
                self.user_dn(&u.uid),
                uid = u.uid,
                pw = u.password
            ));
        }
        for g in &self.groups {
            out.push_str(&format!(
                "dn: {}\nobjectClass: groupOfNames\ncn: {}\n",
                Tree::group_dn(&g.cn),
                g.cn
            ));
            // groupOfNames needs a member: an empty group holds its own DN, as is customary.
            if g.members.is_empty() {
                out.push_str(&format!("member: {}\n", Tree::group_dn(&g.cn)));
            }
            for m in &g.members {
                out.push_str(&format!("member: {}\n", self.member_dn(m)));
            }
            out.push('\n');
        }
        out
    }
}

/// A running slapd; dropping it stops it and removes its files.
pub struct Slapd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    ldaps_port: u16,
    ldap_port: u16,
    tree: Tree,
}

fn free_port() -> Result<u16, SlapdError> {
    crate::ports::free_port().map_err(other)
}

const SLAPD: &str = "/usr/sbin/slapd";
const SLAPADD: &str = "/usr/sbin/slapadd";

impl Slapd {
    /// Makes the CA and the server's certificate (for 127.0.0.1), loads `tree` and starts
    /// slapd; returns once it answers on LDAPS.
    pub fn start(tree: Tree) -> Result<Slapd, SlapdError> {
        if !Path::new(SLAPD).exists() || !Path::new(SLAPADD).exists() {
            return Err(SlapdError::Missing("slapd"));
        }
        if Command::new("ldapmodify")
            .arg("-VV")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Err(SlapdError::Missing("ldap-utils (ldapmodify)"));
        }
        let dir = tempfile::Builder::new()
            .prefix("pchat-slapd-")
            .tempdir()
            .map_err(other)?;
        let d = dir.path();
        // TLS: a CA of the test's own and a certificate for 127.0.0.1.
        let ca_key = rcgen::KeyPair::generate().map_err(other)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(other)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pchat test LDAP CA");
        let ca = ca_params.self_signed(&ca_key).map_err(other)?;
        let key = rcgen::KeyPair::generate().map_err(other)?;
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .map_err(other)?
            .signed_by(&key, &ca, &ca_key)
            .map_err(other)?;
        std::fs::write(d.join("ca.pem"), ca.pem()).map_err(other)?;
        std::fs::write(d.join("cert.pem"), cert.pem()).map_err(other)?;
        std::fs::write(d.join("key.pem"), key.serialize_pem()).map_err(other)?;
        std::fs::create_dir_all(d.join("db")).map_err(other)?;
        let conf = format!(
            "include /etc/ldap/schema/core.schema\n\
             include /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/inetorgperson.schema\n\
             modulepath /usr/lib/ldap\n\
             moduleload back_mdb\n\
             pidfile {d}/slapd.pid\n\
             TLSCACertificateFile {d}/ca.pem\n\
             TLSCertificateFile {d}/cert.pem\n\
             TLSCertificateKeyFile {d}/key.pem\n\
             security simple_bind=128\n\
             database mdb\n\
             maxsize 67108864\n\
             suffix \"{BASE}\"\n\
             rootdn \"{ROOT_DN}\"\n\
             rootpw {ROOT_PASSWORD}\n\
             directory {d}/db\n\
             index objectClass eq\n\
             index uid,cn,member eq\n\
             access to attrs=userPassword by self write by anonymous auth by * none\n\
             access to * by dn.exact=\"{SERVICE_DN}\" read by self read by anonymous auth by * none\n",
            d = d.display()
        );
        std::fs::write(d.join("slapd.conf"), conf).map_err(other)?;
        let ldif = d.join("tree.ldif");
        std::fs::write(&ldif, tree.ldif()).map_err(other)?;
        let out = Command::new(SLAPADD)
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .arg("-l")
            .arg(&ldif)
            .output()
            .map_err(other)?;
        if !out.status.success() {
            return Err(other(format!(
                "slapadd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let ldaps_port = free_port()?;
        let ldap_port = free_port()?;
        let mut s = Slapd {
            dir,
            child: None,
            ldaps_port,
            ldap_port,
            tree,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), SlapdError> {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("slapd.log"))
            .map_err(other)?;
        let child = Command::new(SLAPD)
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .arg("-h")
            .arg(format!(
                "ldaps://127.0.0.1:{}/ ldap://127.0.0.1:{}/",
                self.ldaps_port, self.ldap_port
            ))
            // -d keeps it in the foreground (a child the kit can kill); 0: no debug output.
            .args(["-d", "0"])
            .stdout(Stdio::from(log.try_clone().map_err(other)?))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(other)?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.search_as_service("(uid=*)").is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(other(format!(
                        "slapd exited ({st}); log: {}",
                        std::fs::read_to_string(d.join("slapd.log")).unwrap_or_default()
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(other("slapd did not answer within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ldaps://127.0.0.1:PORT`.
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://127.0.0.1:{}", self.ldaps_port)
    }

    /// `ldap://127.0.0.1:PORT` (StartTLS is offered; a simple bind without it is refused).
    pub fn ldap_url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.ldap_port)
    }

    /// The CA that signed the server's certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The tree loaded at the start (DN helpers).
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    fn tool(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("LDAPTLS_CACERT", self.ca_file())
            .env("LDAPTLS_REQCERT", "demand")
            .env("LDAPCONF", "/dev/null")
            .env("LDAPRC", "/dev/null")
            .arg("-H")
            .arg(self.ldaps_url())
            .arg("-x");
        c
    }

    fn password_file(&self, name: &str, password: &str) -> Result<PathBuf, SlapdError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let p = self.dir.path().join(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&p)
            .map_err(other)?;
        f.write_all(password.as_bytes()).map_err(other)?;
        Ok(p)
    }

    fn search_as_service(&self, filter: &str) -> Result<String, SlapdError> {
        let pw = self.password_file("service.pw", SERVICE_PASSWORD)?;
        let out = self
            .tool("ldapsearch")
            .args(["-D", SERVICE_DN, "-y"])
            .arg(&pw)
            .args(["-b", BASE, "-LLL", filter, "dn"])
            .output()
            .map_err(other)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(other(String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Applies an LDIF change (`changetype: modify` etc.) as the directory's administrator.
    pub fn modify(&self, ldif: &str) -> Result<(), SlapdError> {
        let pw = self.password_file("root.pw", ROOT_PASSWORD)?;
        let mut child = self
            .tool("ldapmodify")
            .args(["-D", ROOT_DN, "-y"])
            .arg(&pw)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(other)?;
        child
            .stdin
            .take()
            .ok_or_else(|| other("no stdin"))?
            .write_all(ldif.as_bytes())
            .map_err(other)?;
        let out = child.wait_with_output().map_err(other)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(other(format!(
                "ldapmodify failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }

    /// Removes `member` (`user:UID` or `group:CN`) from group `cn`.
    pub fn remove_member(&self, cn: &str, member: &str) -> Result<(), SlapdError> {
        self.modify(&format!(
            "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
            Tree::group_dn(cn),
            self.tree.member_dn(member)
        ))
    }

    /// Adds `member` to group `cn`.
    pub fn add_member(&self, cn: &str, member: &str) -> Result<(), SlapdError> {
        self.modify(&format!(
            "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n",
            Tree::group_dn(cn),
            self.tree.member_dn(member)
        ))
    }

    /// Sets user `uid`'s password.
    pub fn set_password(&self, uid: &str, password: &str) -> Result<(), SlapdError> {
        self.modify(&format!(
            "dn: {}\nchangetype: modify\nreplace: userPassword\nuserPassword: {password}\n",
            self.tree.user_dn(uid)
        ))
    }

    /// Stops slapd (SIGKILL), as a directory outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports.
    pub fn restart(&mut self) -> Result<(), SlapdError> {
        self.stop();
        self.spawn()
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}
