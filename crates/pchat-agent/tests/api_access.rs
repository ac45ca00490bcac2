//! Who reaches an agent, and whom an agent's callers reach (issue 11 §3, the design's §5).
//!
//! - The agent serves HTTPS with its instance's identity and takes only clients with a
//!   certificate of the pool's CA; then it decides by the certificate: the pool's operators
//!   may do everything, another instance of the same site only what a failover asks of it,
//!   a server, an etcd member or an instance of another site nothing (403). Each request is
//!   logged with its caller.
//! - A caller reaches an agent only at a URL its topology names, pinned to that instance's
//!   name, with TLS 1.3: an address that is not the topology's (one planted in etcd) gets no
//!   connection at all, and an impostor at the right address — a certificate from another
//!   CA, or another instance's — never receives a request, nor even the caller's certificate.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{topology_header, Lab, Pki, OPERATOR};
use pchat_agent_api::{AgentAccess, ClientError, Role};
use pchat_control::{keys, topology, Who};
use pchat_procedures::logship::{self, ShippingRecord};
use pchat_procedures::mirror::Ctx;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::AsyncReadExt as _;

/// The log lines of this test binary, to check that requests are logged with their callers.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_log() -> Log {
    static LOG: std::sync::OnceLock<Log> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log = Log::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_env_filter("pchat_agent=info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        log
    })
    .clone()
}

/// Sites A (a_db, a_mirror) and B (b_db), published with etcd's users and roles.
async fn two_sites(lab: &Lab) -> Ctx {
    let n = &lab.nodes;
    let text = format!(
        r#"{header}[[sites]]
name = "A"
role = "primary"
database = {{ name = "a_db", address = "{a}", agent = "{aa}" }}
mirror = {{ name = "a_mirror", address = "{m}", agent = "{ma}" }}
[[sites]]
name = "B"
role = "backup"
database = {{ name = "b_db", address = "{b}", agent = "{ba}" }}
copy_dir = "/tmp/pchat-copy"
[[servers]]
name = "a1"
site = "A"
address = "127.0.0.1:5222"
"#,
        header = topology_header(&lab.share().display().to_string(), &lab.etcd().endpoints()),
        a = n[0].address(),
        aa = n[0].url,
        m = n[1].address(),
        ma = n[1].url,
        b = n[2].address(),
        ba = n[2].url,
    );
    let t = topology::parse(&text).expect("topology");
    Ctx {
        etcd: lab.pki.setup_and_publish(&t).await,
        pool: "pc1".into(),
        agents: lab.access.clone(),
    }
}

fn read_pem(dir: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let cert = std::fs::read(dir.join("cert.pem")).unwrap();
    let key = std::fs::read(dir.join("key.pem")).unwrap();
    let chain = rustls_pemfile::certs(&mut &cert[..])
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut &key[..]).unwrap().unwrap();
    (chain, key)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that trusts the pool's CA (by the dialled address) and presents the certificate
/// in `cert_dir`, or none: to see what the agent's server side refuses on its own.
fn raw_client(ca: &Path, cert_dir: Option<&Path>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(ca).unwrap();
    for c in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let tls = match cert_dir {
        Some(d) => {
            let (chain, key) = read_pem(d);
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn refused(r: Result<Role, ClientError>) -> String {
    match r {
        Err(ClientError::Unauthorized { message, .. }) => message,
        other => panic!("expected 403, got {other:?}"),
    }
}

/// Operators may do everything; a server, an etcd member, an instance of another site
/// nothing; the site's other instance only status, stop, start and those jobs; a client
/// without a certificate of the pool does not even get a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_each_caller_by_its_certificate() {
    let log = capture_log();
    let lab = Lab::new(&["a_db", "a_mirror", "b_db"], true).await;
    let _ctx = two_sites(&lab).await;
    let a_db = &lab.nodes[0];
    assert!(a_db.url.starts_with("https://"), "{}", a_db.url);
    let pki = &lab.pki;
    let status = |access: AgentAccess| {
        let url = a_db.url.clone();
        async move { access.named("a_db", &url).status().await.map(|s| s.role) }
    };

    // No certificate, or one from another CA: the handshake fails, nothing is answered.
    let ca = pki.dir.join("ca.crt");
    for cert in [None, Some(other_ca_operator(lab.root.path()))] {
        let r = raw_client(&ca, cert.as_deref())
            .get(format!("{}/v1/status", a_db.url))
            .send()
            .await;
        assert!(r.is_err(), "{cert:?}: {:?}", r.map(|r| r.status()));
    }
    // With the pool's certificate, the same raw client gets an answer (the check above is
    // about the certificate, not the client).
    let ok = raw_client(&ca, Some(&pki.operator_dir()))
        .get(format!("{}/v1/status", a_db.url))
        .send()
        .await
        .expect("the operator's certificate");
    assert_eq!(ok.status().as_u16(), 200);

    // The operator: everything.
    assert_eq!(status(pki.agents()).await.unwrap(), Role::Stopped);
    let op = pki.agents().named("a_db", &a_db.url);
    assert!(op.init(&mut |_| {}).await.expect("operator init"));
    let init_job = op.status().await.unwrap().job.expect("the init job").id;

    // A server and an etcd member: nothing.
    let server = pki.issue(Who::Server("a1".into()), &[]);
    let why = refused(status(pki.agents_as(&server)).await);
    assert!(why.contains("server a1"), "{why}");
    let why = refused(status(pki.agents_as(&pki.dir.join("etcd/1"))).await);
    assert!(why.contains("etcd member 1"), "{why}");

    // An instance of site B: nothing, not even the status.
    let b_db = pki.agents_as(&pki.instance("b_db"));
    let why = refused(status(b_db.clone()).await);
    assert!(why.contains("site B"), "{why}");

    // The mirror of site A: status, stop and start, and the jobs they became; no more.
    let peer = pki.agents_as(&pki.instance("a_mirror"));
    let pc = peer.named("a_db", &a_db.url);
    assert_eq!(pc.status().await.unwrap().role, Role::Stopped);
    pc.start().await.expect("a peer may start the instance");
    assert_eq!(pc.status().await.unwrap().role, Role::Principal);
    pc.stop(false).await.expect("a peer may stop the instance");
    let refused_job = pc.job(init_job).await;
    assert!(
        matches!(refused_job, Err(ClientError::Unauthorized { .. })),
        "a peer may not read the operator's init job: {refused_job:?}"
    );
    for r in [
        pc.init(&mut |_| {}).await.map(|_| Role::Stopped),
        pc.promote().await.map(|_| Role::Stopped),
        pc.set_sync_standby(Some("x")).await.map(|_| Role::Stopped),
        pc.log_shipping().await.map(|_| Role::Stopped),
    ] {
        let why = refused(r);
        assert!(why.contains("operators"), "{why}");
    }
    // Nothing a refused caller asked was done: the instance is as the operator left it.
    let s = op.status().await.unwrap();
    assert_eq!(s.role, Role::Stopped);
    assert_eq!(s.job.map(|j| j.kind).as_deref(), Some("stop"));

    // Every request in the log with its caller, refusals too.
    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    for caller in [
        format!("caller=operator {OPERATOR}"),
        "caller=server a1".into(),
        "caller=etcd member 1".into(),
        "caller=instance b_db".into(),
        "caller=instance a_mirror".into(),
    ] {
        assert!(text.contains(&caller), "no log line with `{caller}`");
    }
}

/// An operator identity issued by another CA for the same pool name.
fn other_ca_operator(root: &Path) -> std::path::PathBuf {
    let other = Pki::new(&root.join("other"));
    other.operator_dir()
}

/// What a rogue TLS server saw of one client.
#[derive(Debug, Default)]
struct Seen {
    handshake_done: AtomicBool,
    client_certificate: AtomicBool,
    request_bytes: AtomicUsize,
}

/// Accepts anything the client presents, and says so.
#[derive(Debug)]
struct Recording(Arc<Seen>);

impl ClientCertVerifier for Recording {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.client_certificate.store(true, Ordering::SeqCst);
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS server with the certificate in `cert_dir` that takes one connection and records
/// what it receives; returns its URL.
async fn rogue(cert_dir: &Path, seen: Arc<Seen>) -> String {
    let (chain, key) = read_pem(cert_dir);
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(Arc::new(Recording(seen.clone())))
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut tls) = acceptor.accept(tcp).await else {
            return;
        };
        seen.handshake_done.store(true, Ordering::SeqCst);
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            seen.request_bytes.store(n, Ordering::SeqCst);
        }
    });
    url
}

/// An impostor where instance a_db's agent should be — with a certificate from another CA
/// for the same names, or with another instance's genuine certificate — never receives a
/// request, nor the caller's certificate. The same rogue with a_db's own certificate does
/// (so the two checks above can tell).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_agent_never_receives_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a_db = pki.instance("a_db");
    let b_db = pki.instance("b_db");
    let other = Pki::new(&dir.path().join("other"));
    let forged = other.instance("a_db");
    let operator = pki.agents();
    for (label, cert, genuine) in [
        ("another CA's a_db", &forged, false),
        ("instance b_db", &b_db, false),
        ("a_db itself", &a_db, true),
    ] {
        let seen = Arc::new(Seen::default());
        let url = rogue(cert, seen.clone()).await;
        let r = operator.named("a_db", &url).status().await;
        // Let the rogue finish reading whatever it was sent.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (done, cert_seen, bytes) = (
            seen.handshake_done.load(Ordering::SeqCst),
            seen.client_certificate.load(Ordering::SeqCst),
            seen.request_bytes.load(Ordering::SeqCst),
        );
        if genuine {
            assert!(
                done && cert_seen && bytes > 0,
                "{label}: the control must see the request ({done} {cert_seen} {bytes})"
            );
        } else {
            assert!(
                matches!(r, Err(ClientError::Unreachable { .. })),
                "{label}: {r:?}"
            );
            assert!(!done, "{label}: the handshake must not complete");
            assert!(!cert_seen, "{label}: the caller's certificate was sent");
            assert_eq!(bytes, 0, "{label}: a request was sent");
        }
    }
}

/// A URL the topology does not name — given on the command line or planted in etcd's
/// log-shipping record — gets no connection at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_url_not_in_the_topology_is_never_dialled() {
    let lab = Lab::new(&["a_db", "a_mirror", "b_db"], true).await;
    let ctx = two_sites(&lab).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let planted = format!("https://{}", listener.local_addr().unwrap());
    let t = pchat_control::pool::get(&ctx.etcd, "pc1")
        .await
        .unwrap()
        .topology;

    let r = ctx.agents.by_url(&t, &planted).status().await;
    match r {
        Err(ClientError::Access { detail, .. }) => {
            assert!(detail.contains("not the agent of any instance"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    // The topology's own URL works with the same access.
    let ok = ctx.agents.by_url(&t, &lab.nodes[0].url).status().await;
    assert_eq!(ok.unwrap().instance, "a_db");

    // An operator's etcd writes a log-shipping record naming the planted URL (etcd is
    // writable by more than the topology's author: agents write their site's keys).
    let record = ShippingRecord {
        id: "x".into(),
        from_site: "A".into(),
        to_site: "B".into(),
        sources: vec![planted.clone()],
        source_instances: vec![],
        secondary: planted.clone(),
        share_dir: "/tmp/x".into(),
        copy_dir: "/tmp/y".into(),
        backup_interval_s: 5,
        copy_interval_s: 5,
        restore_delay_s: 0,
        alert_lag_s: 60,
        state: "active".into(),
        configured_at: pchat_agent_api::now_rfc3339(),
    };
    ctx.etcd
        .put(
            &keys::log_shipping("pc1"),
            &serde_json::to_vec(&record).unwrap(),
        )
        .await
        .unwrap();
    let report = logship::status(&ctx).await.expect("status");
    let secondary = report.secondary.expect("the secondary's part");
    assert!(
        secondary
            .error
            .as_deref()
            .is_some_and(|e| e.contains("not the agent of any instance")),
        "{secondary:?}"
    );
    let err = logship::pause_copy(&ctx, true).await.unwrap_err();
    assert!(
        err.to_string().contains("not the agent of any instance"),
        "{err}"
    );
    let err = logship::remove(&ctx, &mut |_| {}).await;
    assert!(
        err.is_ok(),
        "remove reports the unreachable parties: {err:?}"
    );
    // Not a single connection reached the planted address.
    let mut stream = listener.accept();
    assert!(
        matches!(&stream, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the planted URL was dialled: {:?}",
        stream.as_mut().map(|s| s.1)
    );
    let _ = std::io::stderr().flush();
}
