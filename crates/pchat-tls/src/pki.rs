//! The pool's own certificate authority (`pchat pki init|issue`).
//!
//! ```text
//! PKI/ca.crt            the CA certificate (public: every identity carries a copy)
//! PKI/ca.key            the CA's key, 0600: keep it off the pool's hosts once issuing is done
//! PKI/<kind>/<name>/    one identity per endpoint (see `identity`): ca.crt, cert.pem, key.pem
//! ```
//!
//! Certificates use ECDSA P-256 keys. The CA is valid for 10 years, identities for
//! [`IDENTITY_VALIDITY_DAYS`]; issuing again keeps an identity that is still valid for its
//! names and for more than [`RENEW_BEFORE_DAYS`], and replaces (with a new key) one that is
//! not — so `pchat pki issue` is safe to re-run after every topology change.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use time::{Duration, OffsetDateTime};

use crate::identity::{read_certs, CA_FILE, CERT_FILE, KEY_FILE};
use crate::{fs, provider, TlsError};

/// The CA's key in the PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// How long an identity's certificate is valid.
pub const IDENTITY_VALIDITY_DAYS: i64 = 825;
/// An identity valid for less than this is issued again by `pki issue`.
pub const RENEW_BEFORE_DAYS: i64 = 30;
const CA_VALIDITY_DAYS: i64 = 3650;

/// What one endpoint's certificate must say and allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentitySpec {
    /// Directory under the PKI root, e.g. `instances/a_db` (the topology decides).
    pub path: String,
    /// Names peers verify: DNS names and IP addresses (subject alternative names; the
    /// certificate has no Common Name).
    pub names: Vec<String>,
    /// It serves TLS (PostgreSQL, an agent's API, an etcd member).
    pub server: bool,
    /// It connects with its certificate (mutual TLS).
    pub client: bool,
}

/// What `issue` did with an identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Issued {
    /// There was none: made.
    Created,
    /// It was missing names, expiring, from another CA, or renewal was asked: made anew.
    Renewed,
    /// Still good: left as it was.
    Kept,
}

/// The pool's CA, loaded with its key.
pub struct Ca {
    root: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
    der: CertificateDer<'static>,
}

fn days_from_now(days: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + Duration::days(days)
}

/// Creates the CA of pool `pool` in `root` (made 0700 if missing). Refuses when one exists.
pub fn init(root: &Path, pool: &str) -> Result<Ca, TlsError> {
    let key_path = root.join(CA_KEY_FILE);
    if key_path.exists() || root.join(CA_FILE).exists() {
        return Err(TlsError::CaExists(root.display().to_string()));
    }
    make_private_dir(root)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("pchat pool {pool} CA"));
    dn.push(DnType::OrganizationName, "pchat");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = days_from_now(-1);
    params.not_after = days_from_now(CA_VALIDITY_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    fs::write_private(&key_path, key.serialize_pem().as_bytes())?;
    fs::write_file(&root.join(CA_FILE), cert.pem().as_bytes(), 0o644)?;
    let der = cert.der().clone();
    Ok(Ca {
        root: root.to_owned(),
        cert,
        key,
        der,
    })
}

/// Creates `dir` (and its parents) and makes it 0700: it holds keys.
pub fn make_private_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).map_err(TlsError::io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(TlsError::io(dir))
}

/// Loads the CA in `root` to issue with it.
pub fn open(root: &Path) -> Result<Ca, TlsError> {
    let cert_path = root.join(CA_FILE);
    if !cert_path.exists() {
        return Err(TlsError::invalid(
            &cert_path,
            "no CA here: create one with `pchat pki init --dir DIR --pool POOL`",
        ));
    }
    let der = read_certs(&cert_path)?.remove(0);
    let key_path = root.join(CA_KEY_FILE);
    let key_pem = String::from_utf8(fs::read_private(&key_path)?)
        .map_err(|_| TlsError::invalid(&key_path, "not a PEM key"))?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| TlsError::invalid(&key_path, format!("not a usable key: {e}")))?;
    let params = CertificateParams::from_ca_cert_der(&der)
        .map_err(|e| TlsError::invalid(&cert_path, format!("not a usable CA: {e}")))?;
    // Re-signing with the same key and subject reproduces the issuer every identity names.
    let cert = params.self_signed(&key)?;
    Ok(Ca {
        root: root.to_owned(),
        cert,
        key,
        der,
    })
}

impl Ca {
    /// The PKI directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of `spec`'s identity.
    pub fn dir_of(&self, spec: &IdentitySpec) -> PathBuf {
        self.root.join(&spec.path)
    }

    /// Issues `spec`'s identity unless a good one exists (`renew`: always anew).
    pub fn issue(&self, spec: &IdentitySpec, renew: bool) -> Result<Issued, TlsError> {
        let dir = self.dir_of(spec);
        let existed = dir.join(CERT_FILE).exists();
        if existed && !renew && self.check(spec, RENEW_BEFORE_DAYS).is_ok() {
            return Ok(Issued::Kept);
        }
        if spec.names.is_empty() {
            return Err(TlsError::invalid(
                &dir,
                "an identity needs at least one name",
            ));
        }
        let mut params = CertificateParams::default();
        // No Common Name: peers verify the subject alternative names only, and etcd's JSON
        // gateway answers 400 ("CommonName of client sending a request against gateway will
        // be ignored") to every request whose client certificate carries one once
        // authentication is on (measured with etcd 3.4.23), which would lock the pool out.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "pchat");
        params.distinguished_name = dn;
        params.subject_alt_names = spec
            .names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if spec.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        params.not_before = days_from_now(-1);
        params.not_after = days_from_now(IDENTITY_VALIDITY_DAYS);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        make_private_dir(&dir)?;
        fs::write_private(&dir.join(KEY_FILE), key.serialize_pem().as_bytes())?;
        fs::write_file(&dir.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
        fs::write_file(&dir.join(CA_FILE), self.cert_pem().as_bytes(), 0o644)?;
        Ok(if existed {
            Issued::Renewed
        } else {
            Issued::Created
        })
    }

    fn cert_pem(&self) -> String {
        // The CA file as written at `init` (not the re-signed copy: peers trust that one).
        std::fs::read_to_string(self.root.join(CA_FILE)).unwrap_or_else(|_| self.cert.pem())
    }

    /// Checks `spec`'s identity as a peer will: its CA is this CA, its key matches, its chain
    /// verifies for the uses it needs, it carries every name, and it stays valid for
    /// `days_left_min` more days. The error says what is wrong.
    pub fn check(&self, spec: &IdentitySpec, days_left_min: i64) -> Result<(), TlsError> {
        self.check_at(&self.dir_of(spec), spec, days_left_min)
    }

    /// [`Ca::check`] for an identity deployed in `dir`.
    pub fn check_at(
        &self,
        dir: &Path,
        spec: &IdentitySpec,
        days_left_min: i64,
    ) -> Result<(), TlsError> {
        let unusable = |problem: String| TlsError::Unusable {
            path: dir.display().to_string(),
            problem,
        };
        let identity = crate::Identity::load(dir)?;
        if identity.ca() != &self.der {
            return Err(unusable(
                "its ca.crt is not this pool's CA: issue it again (`pchat pki issue`)".into(),
            ));
        }
        let leaf = read_certs(&identity.cert_path())?.remove(0);
        let ee = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|e| unusable(format!("cert.pem is not a usable certificate: {e}")))?;
        let anchor = webpki::anchor_from_trusted_cert(&self.der)
            .map_err(|e| unusable(format!("the CA is not usable: {e}")))?;
        let algs = provider().signature_verification_algorithms.all;
        let mut usages = Vec::new();
        if spec.server {
            usages.push(("server", webpki::KeyUsage::server_auth()));
        }
        if spec.client {
            usages.push(("client", webpki::KeyUsage::client_auth()));
        }
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            days_from_now(days_left_min).unix_timestamp().max(0) as u64,
        ));
        for (what, usage) in usages {
            ee.verify_for_usage(
                algs,
                std::slice::from_ref(&anchor),
                &[],
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .map_err(|e| unusable(format!("not valid as a TLS {what} now: {e:?}")))?;
            ee.verify_for_usage(
                algs,
                std::slice::from_ref(&anchor),
                &[],
                later,
                usage,
                None,
                None,
            )
            .map_err(|_| {
                unusable(format!(
                    "expires within {days_left_min} days: run `pchat pki issue` to renew it"
                ))
            })?;
        }
        if has_common_name(&leaf) {
            return Err(unusable(
                "carries a Common Name, which etcd's JSON gateway refuses on client certificates once etcd authentication is on: issue it again (`pchat pki issue`)".into(),
            ));
        }
        for name in &spec.names {
            let server_name = ServerName::try_from(name.as_str())
                .map_err(|_| unusable(format!("`{name}` is not a DNS name or IP address")))?;
            ee.verify_is_valid_for_subject_name(&server_name)
                .map_err(|_| unusable(format!("is not valid for the name `{name}`")))?;
        }
        Ok(())
    }
}

/// Whether `cert`'s subject has a Common Name (an unparsable certificate counts as having one:
/// it is refused anyway).
fn has_common_name(cert: &CertificateDer<'_>) -> bool {
    match x509_parser::parse_x509_certificate(cert) {
        Ok((_, parsed)) => parsed.subject().iter_common_name().next().is_some(),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{peer_names, ClientAuth, PeerName};
    use std::os::unix::fs::MetadataExt as _;
    use std::sync::Arc;

    fn spec(path: &str, names: &[&str]) -> IdentitySpec {
        IdentitySpec {
            path: path.into(),
            names: names.iter().map(|s| s.to_string()).collect(),
            server: true,
            client: true,
        }
    }

    #[test]
    fn init_issue_check_and_reissue() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pki");
        let ca = init(&root, "pc1").unwrap();
        assert!(matches!(init(&root, "pc1"), Err(TlsError::CaExists(_))));
        assert_eq!(
            std::fs::metadata(root.join(CA_KEY_FILE)).unwrap().mode() & 0o777,
            0o600
        );
        let a = spec("instances/a_db", &["a_db.pc1.pchat", "127.0.0.1"]);
        assert_eq!(ca.issue(&a, false).unwrap(), Issued::Created);
        ca.check(&a, RENEW_BEFORE_DAYS).unwrap();
        let d = ca.dir_of(&a);
        assert_eq!(
            std::fs::metadata(d.join(KEY_FILE)).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        // Re-running keeps a good identity; a new name, or --renew, makes a new one.
        assert_eq!(ca.issue(&a, false).unwrap(), Issued::Kept);
        let reopened = open(&root).unwrap();
        assert_eq!(reopened.issue(&a, false).unwrap(), Issued::Kept);
        let wider = spec(
            "instances/a_db",
            &["a_db.pc1.pchat", "127.0.0.1", "db1.example"],
        );
        assert!(reopened.check(&wider, 0).is_err());
        assert_eq!(reopened.issue(&wider, false).unwrap(), Issued::Renewed);
        reopened.check(&wider, RENEW_BEFORE_DAYS).unwrap();
        // No Common Name (etcd's gateway refuses client certificates with one); an identity
        // issued with one, as before, is replaced by the next `issue`.
        let leaf = read_certs(&reopened.dir_of(&wider).join(CERT_FILE))
            .unwrap()
            .remove(0);
        assert!(!has_common_name(&leaf));
        let mut old = CertificateParams::new(wider.names.clone()).unwrap();
        old.distinguished_name
            .push(DnType::CommonName, wider.names[0].clone());
        old.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = old.signed_by(&key, &reopened.cert, &reopened.key).unwrap();
        let d = reopened.dir_of(&wider);
        fs::write_private(&d.join(KEY_FILE), key.serialize_pem().as_bytes()).unwrap();
        fs::write_file(&d.join(CERT_FILE), cert.pem().as_bytes(), 0o644).unwrap();
        let err = reopened.check(&wider, 0).unwrap_err().to_string();
        assert!(err.contains("Common Name"), "{err}");
        assert_eq!(reopened.issue(&wider, false).unwrap(), Issued::Renewed);
        reopened.check(&wider, RENEW_BEFORE_DAYS).unwrap();
        // Far enough in the future every identity is due for renewal.
        let err = reopened
            .check(&wider, IDENTITY_VALIDITY_DAYS + 1)
            .unwrap_err();
        assert!(err.to_string().contains("expires within"), "{err}");
        // Another CA's identity is not this pool's.
        let other = init(&dir.path().join("other"), "pc2").unwrap();
        let err = other
            .check_at(&reopened.dir_of(&wider), &wider, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not this pool's CA"), "{err}");
    }

    /// Pinned names, mutual TLS and peer names, over a real handshake in memory.
    #[test]
    fn mutual_tls_with_pinned_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init(dir.path(), "pc1").unwrap();
        let server = spec("instances/a_db", &["a_db.pc1.pchat", "127.0.0.1"]);
        let other = spec("instances/b_db", &["b_db.pc1.pchat", "127.0.0.1"]);
        let client = spec("operators/root", &["root.operators.pc1.pchat"]);
        for s in [&server, &other, &client] {
            ca.issue(s, false).unwrap();
        }
        let load = |s: &IdentitySpec| crate::Identity::load(&ca.dir_of(s)).unwrap();
        let (server, other, client) = (load(&server), load(&other), load(&client));
        let dialled = ServerName::try_from("127.0.0.1").unwrap();

        let handshake = |client_cfg: Arc<rustls::ClientConfig>,
                         server_cfg: Arc<rustls::ServerConfig>|
         -> Result<Vec<String>, rustls::Error> {
            let mut c = rustls::ClientConnection::new(client_cfg, dialled.clone())?;
            let mut s = rustls::ServerConnection::new(server_cfg)?;
            for _ in 0..10 {
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut &buf[..]).unwrap();
                s.process_new_packets()?;
                let mut buf = Vec::new();
                s.write_tls(&mut buf).unwrap();
                c.read_tls(&mut &buf[..]).unwrap();
                c.process_new_packets()?;
                if !c.is_handshaking() && !s.is_handshaking() {
                    // TLS 1.3: the server learns the client's certificate with its Finished.
                    let mut buf = Vec::new();
                    c.write_tls(&mut buf).unwrap();
                    s.read_tls(&mut &buf[..]).unwrap();
                    s.process_new_packets()?;
                    return Ok(peer_names(s.peer_certificates()));
                }
            }
            panic!("handshake did not finish");
        };

        let mtls = server.server_config(ClientAuth::Required).unwrap();
        // Pinned to the right name: accepted, and the server sees the client's name.
        let names = handshake(
            client
                .client_config(PeerName::Pinned("a_db.pc1.pchat".into()))
                .unwrap(),
            mtls.clone(),
        )
        .unwrap();
        assert_eq!(names, vec!["root.operators.pc1.pchat".to_string()]);
        // The same address answered by another endpoint of the same CA: refused.
        let err = handshake(
            client
                .client_config(PeerName::Pinned("a_db.pc1.pchat".into()))
                .unwrap(),
            other.server_config(ClientAuth::Required).unwrap(),
        )
        .unwrap_err();
        assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");
        // Standard verification by the dialled address works for a cert carrying it.
        handshake(
            client.client_config(PeerName::Dialled).unwrap(),
            mtls.clone(),
        )
        .unwrap();
        // A client whose certificate is from another CA is refused by a mutual-TLS server.
        let stranger_dir = tempfile::tempdir().unwrap();
        let stranger_ca = init(stranger_dir.path(), "evil").unwrap();
        let stranger = spec("operators/mallory", &["mallory.example"]);
        stranger_ca.issue(&stranger, false).unwrap();
        // It trusts our CA (it read ca.crt somewhere) but holds no certificate of ours.
        std::fs::copy(
            dir.path().join(CA_FILE),
            stranger_ca.dir_of(&stranger).join(CA_FILE),
        )
        .unwrap();
        let stranger = crate::Identity::load(&stranger_ca.dir_of(&stranger)).unwrap();
        assert!(handshake(
            stranger
                .client_config(PeerName::Pinned("a_db.pc1.pchat".into()))
                .unwrap(),
            mtls
        )
        .is_err());
    }
}
