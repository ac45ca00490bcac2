//! `pchat test message`: Lync's Test-CsPersistentChatMessage, a synthetic transaction a
//! monitoring system can run. Two users log in over direct TLS (XEP-0368), join a test room,
//! one sends a message the other must receive, the archive must hold it (MAM) and full-text
//! search must find it, both leave. Each step's time is printed; the first step that fails
//! ends the run with its name and a non-zero exit.
//!
//! Its own small client on `pchat-xmpp`'s framer, so the probe exercises the server as any
//! client would; passwords come from files, never the command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use base64::Engine as _;
use pchat_xmpp::{ns, Element, Framer, FramerEvent, FramerLimits};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// What `pchat test message` was asked.
pub(crate) struct Probe {
    /// `host:port` of the direct-TLS client port.
    pub server: String,
    /// The two users and their password files.
    pub users: [(String, PathBuf); 2],
    /// The test room's bare JID.
    pub room: String,
    /// How the server's certificate is trusted: pinned (this exact certificate) or as a CA.
    pub trust: Trust,
    /// Longest each step may take.
    pub step_timeout: Duration,
}

/// How the probe trusts the server's certificate.
pub(crate) enum Trust {
    /// Exactly this certificate (a standalone server's self-signed `tls/cert.pem`).
    Pinned(PathBuf),
    /// Certificates issued by these CAs for the user's domain.
    Ca(PathBuf),
}

/// One finished step.
#[derive(serde::Serialize)]
pub(crate) struct Step {
    pub name: &'static str,
    pub ms: f64,
}

struct Conn {
    tls: TlsStream<TcpStream>,
    framer: Framer,
    jid: String,
    next_id: u64,
}

fn read_password(file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the password file {}", file.display()))?;
    let pw = text.lines().next().unwrap_or_default().to_owned();
    if pw.is_empty() {
        bail!("{} holds no password (first line)", file.display());
    }
    Ok(pw)
}

fn client_config(trust: &Trust) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let read = |p: &Path| -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
        let pem = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        let certs = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{} holds no PEM certificate", p.display()))?;
        if certs.is_empty() {
            bail!("{} holds no PEM certificate", p.display());
        }
        Ok(certs)
    };
    let provider = pchat_tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    let config = match trust {
        Trust::Ca(file) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read(file)? {
                roots.add(c).context("adding a CA certificate")?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Pinned(file) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                cert: read(file)?.remove(0),
                provider,
            }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Accepts exactly one certificate (byte for byte), with the handshake signatures checked
/// as usual: a self-signed certificate is trusted by being the one expected.
#[derive(Debug)]
struct Pinned {
    cert: rustls::pki_types::CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the pinned one".into(),
            ))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl Conn {
    async fn send(&mut self, xml: &str) -> anyhow::Result<()> {
        self.tls.write_all(xml.as_bytes()).await?;
        self.tls.flush().await?;
        Ok(())
    }

    async fn next_event(&mut self) -> anyhow::Result<FramerEvent> {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(e) = self.framer.next_event() {
                return Ok(e);
            }
            let n = self.tls.read(&mut buf).await?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            self.framer.feed(&buf[..n]);
        }
    }

    /// The next stanza satisfying `want` (others are dropped); a stream error or close fails.
    async fn wait(&mut self, want: impl Fn(&Element) -> bool) -> anyhow::Result<Element> {
        loop {
            match self.next_event().await? {
                FramerEvent::Stanza(el) if want(&el) => return Ok(el),
                FramerEvent::Stanza(el) if el.name == "error" => {
                    bail!("stream error: {}", el.to_xml())
                }
                FramerEvent::StreamClose => bail!("the server closed the stream"),
                FramerEvent::Error(e, text) => bail!("bad XML from the server ({e:?}): {text}"),
                _ => {}
            }
        }
    }

    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("probe{}", self.next_id)
    }

    async fn open_stream(&mut self, domain: &str) -> anyhow::Result<Element> {
        self.framer.reset();
        self.send(&format!(
            "<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
        ))
        .await?;
        self.wait(|e| e.name == "features").await
    }

    /// An IQ and its result (an error reply fails with its condition).
    async fn iq(&mut self, iq: Element) -> anyhow::Result<Element> {
        let id = self.id();
        let iq = iq.attr("id", id.clone());
        self.send(&iq.to_xml()).await?;
        let reply = self
            .wait(|e| e.name == "iq" && e.get_attr("id") == Some(id.as_str()))
            .await?;
        if reply.get_attr("type") == Some("error") {
            bail!("error reply: {}", reply.to_xml());
        }
        Ok(reply)
    }
}

async fn login(p: &Probe, user: &str, password: &str) -> anyhow::Result<Conn> {
    let domain = user
        .split_once('@')
        .map(|(_, d)| d.to_owned())
        .ok_or_else(|| anyhow!("{user} is not a bare JID user@domain"))?;
    let tcp = TcpStream::connect(&p.server)
        .await
        .with_context(|| format!("connecting to {}", p.server))?;
    let name = rustls::pki_types::ServerName::try_from(domain.clone())
        .map_err(|e| anyhow!("{domain}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(client_config(&p.trust)?)
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let mut c = Conn {
        tls,
        framer: Framer::new(FramerLimits::default()),
        jid: String::new(),
        next_id: 0,
    };
    let features = c.open_stream(&domain).await?;
    let plain = features
        .get_child("mechanisms", ns::SASL)
        .is_some_and(|m| m.elements().any(|e| e.text_content() == "PLAIN"));
    if !plain {
        bail!("the server offers no PLAIN over TLS: {}", features.to_xml());
    }
    let local = user.split('@').next().unwrap_or_default();
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{local}\0{password}"));
    c.send(&format!(
        "<auth xmlns='{}' mechanism='PLAIN'>{token}</auth>",
        ns::SASL
    ))
    .await?;
    let answer = c
        .wait(|e| e.name == "success" || e.name == "failure")
        .await?;
    if answer.name == "failure" {
        bail!("authentication failed for {user}: {}", answer.to_xml());
    }
    c.open_stream(&domain).await?;
    let bound = c
        .iq(Element::new("iq", ns::CLIENT).attr("type", "set").child(
            Element::new("bind", ns::BIND)
                .child(Element::new("resource", ns::BIND).text("pchat-probe")),
        ))
        .await?;
    c.jid = bound
        .get_child("bind", ns::BIND)
        .and_then(|b| b.child_text("jid", ns::BIND))
        .ok_or_else(|| anyhow!("no JID in the bind result"))?;
    Ok(c)
}

fn self_presence(room: &str) -> impl Fn(&Element) -> bool + '_ {
    move |e| {
        e.name == "presence"
            && e.get_attr("from").is_some_and(|f| f.starts_with(room))
            && (e.get_attr("type") == Some("error")
                || e.get_child("x", ns::MUC_USER).is_some_and(|x| {
                    x.elements()
                        .any(|s| s.name == "status" && s.get_attr("code") == Some("110"))
                }))
    }
}

async fn join(c: &mut Conn, room: &str, nick: &str) -> anyhow::Result<bool> {
    c.send(
        &Element::new("presence", ns::CLIENT)
            .attr("to", format!("{room}/{nick}"))
            .child(
                Element::new("x", ns::MUC)
                    .child(Element::new("history", ns::MUC).attr("maxstanzas", "0")),
            )
            .to_xml(),
    )
    .await?;
    let p = c.wait(self_presence(room)).await?;
    if p.get_attr("type") == Some("error") {
        bail!("the room refused the join: {}", p.to_xml());
    }
    let created = p.get_child("x", ns::MUC_USER).is_some_and(|x| {
        x.elements()
            .any(|s| s.name == "status" && s.get_attr("code") == Some("201"))
    });
    Ok(created)
}

/// Runs the probe; returns the steps it finished (all of them on success).
pub(crate) async fn run(p: &Probe, mut report: impl FnMut(&Step)) -> anyhow::Result<Vec<Step>> {
    let passwords = [read_password(&p.users[0].1)?, read_password(&p.users[1].1)?];
    let token = format!(
        "probe{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let mut steps = Vec::new();
    macro_rules! step {
        ($name:expr, $body:expr) => {{
            let t0 = Instant::now();
            let out = tokio::time::timeout(p.step_timeout, $body)
                .await
                .map_err(|_| anyhow!("{}: no answer within {:?}", $name, p.step_timeout))?
                .with_context(|| format!("step {} failed", $name))?;
            let s = Step {
                name: $name,
                ms: t0.elapsed().as_secs_f64() * 1000.0,
            };
            report(&s);
            steps.push(s);
            out
        }};
    }
    let mut a = step!("login user1", login(p, &p.users[0].0, &passwords[0]));
    let mut b = step!("login user2", login(p, &p.users[1].0, &passwords[1]));
    let created = step!("join user1", join(&mut a, &p.room, "probe-1"));
    if created {
        // A room the probe made: accept the defaults so the second user may enter.
        step!(
            "create room",
            a.iq(Element::new("iq", ns::CLIENT)
                .attr("type", "set")
                .attr("to", p.room.as_str())
                .child(
                    Element::new("query", ns::MUC_OWNER)
                        .child(Element::new("x", ns::DATA_FORMS).attr("type", "submit")),
                ),)
        );
    }
    step!("join user2", join(&mut b, &p.room, "probe-2"));
    let body = format!("{token} persistent chat probe");
    step!("send", async {
        a.send(
            &Element::new("message", ns::CLIENT)
                .attr("to", p.room.as_str())
                .attr("type", "groupchat")
                .attr("id", token.as_str())
                .child(Element::new("body", ns::CLIENT).text(body.as_str()))
                .to_xml(),
        )
        .await?;
        let echo = a
            .wait(|e| e.name == "message" && e.get_attr("id") == Some(token.as_str()))
            .await?;
        if echo.get_attr("type") == Some("error") {
            bail!("the room refused the message: {}", echo.to_xml());
        }
        Ok(())
    });
    step!(
        "receive",
        b.wait(|e| e.name == "message"
            && e.child_text("body", ns::CLIENT).as_deref() == Some(body.as_str()))
    );
    for (name, fields) in [
        ("history (MAM)", Vec::new()),
        (
            "search (full text)",
            vec![("{urn:xmpp:fulltext:0}fulltext", token.clone())],
        ),
    ] {
        step!(name, async {
            let qid = b.id();
            let mut form = Element::new("x", ns::DATA_FORMS)
                .attr("type", "submit")
                .child(
                    Element::new("field", ns::DATA_FORMS)
                        .attr("var", "FORM_TYPE")
                        .attr("type", "hidden")
                        .child(Element::new("value", ns::DATA_FORMS).text(ns::MAM)),
                );
            for (var, value) in &fields {
                form = form.child(
                    Element::new("field", ns::DATA_FORMS)
                        .attr("var", *var)
                        .child(Element::new("value", ns::DATA_FORMS).text(value.as_str())),
                );
            }
            let query = Element::new("query", ns::MAM)
                .attr("queryid", qid.clone())
                .child(form)
                .child(
                    Element::new("set", ns::RSM)
                        .child(Element::new("max", ns::RSM).text("10"))
                        .child(Element::new("before", ns::RSM)),
                );
            let id = b.id();
            b.send(
                &Element::new("iq", ns::CLIENT)
                    .attr("type", "set")
                    .attr("id", id.as_str())
                    .attr("to", p.room.as_str())
                    .child(query)
                    .to_xml(),
            )
            .await?;
            let mut found = false;
            loop {
                let el = b
                    .wait(|e| {
                        (e.name == "iq" && e.get_attr("id") == Some(id.as_str()))
                            || (e.name == "message" && e.get_child("result", ns::MAM).is_some())
                    })
                    .await?;
                if el.name == "iq" {
                    if el.get_attr("type") == Some("error") {
                        bail!("the archive refused the query: {}", el.to_xml());
                    }
                    break;
                }
                found |= el.to_xml().contains(token.as_str());
            }
            if !found {
                bail!("the message is not there");
            }
            Ok(())
        });
    }
    step!("leave", async {
        for (c, nick) in [(&mut a, "probe-1"), (&mut b, "probe-2")] {
            c.send(
                &Element::new("presence", ns::CLIENT)
                    .attr("to", format!("{}/{nick}", p.room))
                    .attr("type", "unavailable")
                    .to_xml(),
            )
            .await?;
            c.wait(self_presence(&p.room)).await?;
            c.send("</stream:stream>").await?;
        }
        Ok::<_, anyhow::Error>(())
    });
    Ok(steps)
}
