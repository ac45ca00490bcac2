//! One client session: stream negotiation (STARTTLS, SASL, bind), then the stanza loop that
//! stamps `from`, answers what the server itself answers, and routes the rest to rooms or
//! other sessions. One task per connection; reads and the outbound queue are awaited together.
//!
//! A client that does not keep up is dropped rather than held: every write has a deadline
//! (`write_timeout_ms`), the outbound queue is bounded in stanzas and bytes, and a client
//! silent for `ping_interval_ms` is pinged (XEP-0199, by [`run_pinger`]) and dropped when it
//! does not answer. The rooms it was in show it leaving with status 333 ("removed due to a
//! technical problem").

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use pchat_xmpp::scram::{self, ScramHash, ScramServer};
use pchat_xmpp::{ns, Element, StanzaError, StreamError};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info_span, Instrument as _};

use crate::router::{Delivery, Outbound, SessionHandle, SessionShared};
use crate::sm::{self, Refusal, Sm, Takeover};
use crate::state::{Serving, State};
use crate::transport::{Incoming, Transport};

/// Runs a session to its end. `peer` keys the login throttle.
pub async fn run(state: Arc<State>, transport: Transport, peer: IpAddr) {
    let span = info_span!("session", %peer, ws = transport.is_websocket());
    async move {
        let Some(serving) = state.serving() else {
            refuse_idle(&state, transport).await;
            return;
        };
        let write_timeout = Duration::from_millis(state.config.limits.write_timeout_ms);
        let _counted = crate::metrics::ConnectionGauge::open(if transport.is_websocket() {
            "websocket"
        } else if transport.is_secure() {
            "tls"
        } else {
            "starttls"
        });
        let mut s = Session {
            state,
            serving,
            t: transport,
            peer,
            out: Vec::new(),
            stream_open: false,
            shared: None,
            out_cost: 0,
            broken: false,
            lost: false,
            final_end: false,
            sm: None,
            takeover: None,
            held: None,
        };
        // Boxed: a task reserves the largest state its future can reach for its whole life.
        // Negotiation (TLS, SASL, store lookups) is only needed once, and a stanza's handling
        // (room routing, loads) only while it runs; inline, both would be paid by every idle
        // connection for as long as it stays.
        let negotiated = Box::pin(s.negotiate()).await;
        if let Some(Negotiated::Bind(bind)) = negotiated {
            s.bound(bind).await;
        }
        // A connection whose writes failed or stalled is dropped as it is: a goodbye would
        // only wait on the same full socket.
        if !s.broken {
            let _ = tokio::time::timeout(write_timeout, s.t.shutdown()).await;
        }
    }
    .instrument(span)
    .await
}

/// An idle server (pool mode) takes no session: it points the client at an active server
/// (`see-other-host`, RFC 6120 §4.9.3.19), or says that none is active.
async fn refuse_idle(state: &State, mut t: Transport) {
    let ws = t.is_websocket();
    // Wait for the client's header (bounded), so the error arrives in a well-formed stream.
    let _ = tokio::time::timeout(
        Duration::from_secs(state.config.limits.auth_timeout_s),
        t.next(),
    )
    .await;
    let error = drain_error(&state.idle_redirect());
    let frames = vec![
        header_frame(ws, &state.config.domain),
        error.to_xml_in(if ws { "" } else { ns::CLIENT }),
        close_frame(ws),
    ];
    let write_timeout = Duration::from_millis(state.config.limits.write_timeout_ms);
    let _ = tokio::time::timeout(write_timeout, async {
        if t.send(&frames).await.is_ok() {
            t.shutdown().await;
        }
    })
    .await;
}

/// The stream error that sends a client elsewhere: `see-other-host` naming an active server,
/// or `system-shutdown` when no server of the pool is active.
fn drain_error(redirect: &Option<String>) -> Element {
    match redirect {
        Some(addr) => Element::new("error", ns::STREAM)
            .child(
                Element::new(StreamError::SeeOtherHost.condition(), ns::STREAMS_ERR)
                    .text(addr.clone()),
            )
            .child(
                Element::new("text", ns::STREAMS_ERR)
                    .attr("xml:lang", "en")
                    .text(format!("this server is idle; the pool is served by {addr}")),
            ),
        None => StreamError::SystemShutdown
            .to_element("this server is idle and no server of its pool is active; retry later"),
    }
}

fn header_frame(ws: bool, domain: &str) -> String {
    let id = random_id();
    if ws {
        format!(
            "<open xmlns='{}' id='{id}' from='{domain}' version='1.0' xml:lang='en'/>",
            ns::FRAMING
        )
    } else {
        format!(
            "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' id='{id}' from='{domain}' version='1.0' xml:lang='en'>",
            ns::CLIENT,
            ns::STREAM
        )
    }
}

fn close_frame(ws: bool) -> String {
    if ws {
        format!("<close xmlns='{}'/>", ns::FRAMING)
    } else {
        "</stream:stream>".to_owned()
    }
}

struct Session {
    state: Arc<State>,
    serving: Arc<Serving>,
    t: Transport,
    peer: IpAddr,
    /// Serialized frames waiting to be written.
    out: Vec<String>,
    /// Our stream header has been sent (a stream error needs one first).
    stream_open: bool,
    /// Once bound: the queue's byte count and its overflow signal.
    shared: Option<Arc<SessionShared>>,
    /// Queue bytes of what `out` holds; given back once it is written, so what waits in the
    /// socket counts against the client's share until the client has read it.
    out_cost: usize,
    /// A write failed or stalled: nothing more is written.
    broken: bool,
    /// The server gave up on the client (too slow, silent, vanished): rooms show status 333.
    lost: bool,
    /// The session ends even if it could be resumed: its queue overflowed, or the server
    /// closed it.
    final_end: bool,
    /// XEP-0198 stream management, once the client enabled it.
    sm: Option<Box<Sm>>,
    /// A new connection that arrived, during a write, to resume this session.
    takeover: Option<Box<Takeover>>,
    /// XEP-0352: the client said it is inactive; presence waits here until something that
    /// matters is sent, it says it is active again, or too much waits.
    held: Option<Box<Held>>,
}

/// Stanzas held back while the client is inactive (XEP-0352), as they go on the wire.
#[derive(Default)]
struct Held {
    frames: Vec<String>,
    /// Their queue cost, given back once they are written.
    cost: usize,
}

/// Presence stanzas held for an inactive client before they are sent anyway.
const HELD_MAX: usize = 64;

/// How negotiation ended well.
enum Negotiated {
    /// The client asked to bind a resource.
    Bind(Bind),
    /// The client resumed a waiting session (XEP-0198): this connection now belongs to it.
    Resumed,
}

/// Why a connected session stopped serving its connection.
enum End {
    /// The connection broke (closed, vanished, writes failed, pings unanswered): a
    /// resumable session waits for its client.
    Broken,
    /// The session is over.
    Over,
    /// A new connection resumed the session while the old one was still open.
    TakenOver(Box<Takeover>),
}

/// The next takeover of a resumable session; never, when the session is not resumable.
async fn next_takeover(sm: &mut Option<Box<Sm>>) -> Option<Box<Takeover>> {
    match sm.as_mut().and_then(|sm| sm.resume.as_mut()) {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A resource-binding request that ended negotiation.
struct Bind {
    bare: String,
    resource: String,
    iq: Element,
}

impl Session {
    fn push(&mut self, el: &Element) {
        // Over TCP stanzas inherit jabber:client from the stream header; a WebSocket frame is
        // a document of its own and must declare it (RFC 7395 §3.3.3).
        let parent_ns = if self.t.is_websocket() {
            ""
        } else {
            ns::CLIENT
        };
        let frame = el.to_xml_in(parent_ns);
        if let Some(sm) = &mut self.sm {
            if el.ns == ns::CLIENT && matches!(el.name.as_str(), "message" | "presence" | "iq") {
                sm.sent(&frame);
            }
        }
        self.out.push(frame);
    }

    /// Writes what `out` holds within the write deadline. False when the connection is
    /// unusable: the write failed, did not finish in time, or (once bound) the queue
    /// overflowed while it waited, which says the client reads too slowly just as well.
    async fn flush(&mut self) -> bool {
        if self.broken {
            return false;
        }
        if self.out.is_empty() {
            return true;
        }
        let frames = std::mem::take(&mut self.out);
        let shared = self.shared.clone();
        // Once the session is being closed as too slow, its goodbye just gets the deadline:
        // further overflows (the rooms still deliver) change nothing.
        let watch_overflow = shared.clone().filter(|_| !self.lost);
        let write_timeout = Duration::from_millis(self.state.config.limits.write_timeout_ms);
        let send = tokio::time::timeout(write_timeout, self.t.send(&frames));
        let outcome = match &watch_overflow {
            Some(sh) => tokio::select! {
                r = send => Some(r),
                () = sh.overflow.notified() => None,
                Some(tk) = next_takeover(&mut self.sm) => {
                    // The client came back on a new connection while this one stalled.
                    debug!("a new connection resumes the session during a write");
                    self.takeover = Some(tk);
                    self.broken = true;
                    return false;
                }
            },
            None => Some(send.await),
        };
        match outcome {
            Some(Ok(Ok(()))) => {
                if let Some(sh) = &shared {
                    sh.taken(std::mem::take(&mut self.out_cost));
                    sh.drained();
                }
                true
            }
            Some(Ok(Err(e))) => {
                debug!(error = %e, "write failed");
                self.broken = true;
                false
            }
            Some(Err(_)) => {
                debug!(timeout = ?write_timeout, "write deadline passed: the client reads too slowly");
                self.broken = true;
                self.lost = true;
                false
            }
            None => {
                debug!("outbound queue overflowed during a write: the client reads too slowly");
                self.broken = true;
                self.lost = true;
                // A ping unanswered also wakes the write: that is a vanished client, which
                // may come back; an overflow is not.
                self.final_end = !shared.as_ref().is_some_and(|sh| sh.is_silent());
                false
            }
        }
    }

    fn push_header(&mut self) {
        self.out.push(header_frame(
            self.t.is_websocket(),
            &self.state.config.domain,
        ));
        self.stream_open = true;
    }

    /// Sends a stream error and the stream close, then the caller drops the connection.
    async fn stream_error(&mut self, e: StreamError, text: &str) {
        debug!(condition = e.condition(), text, "stream error");
        if !self.stream_open {
            self.push_header();
        }
        self.push(&e.to_element(text));
        self.push_close();
        self.flush().await;
    }

    fn push_close(&mut self) {
        self.out.push(close_frame(self.t.is_websocket()));
    }

    /// Checks a stream header's addressing; on success sends our header.
    async fn accept_header(&mut self, attrs: &[(String, String)]) -> bool {
        let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        self.push_header();
        if get("to").is_some_and(|to| !to.eq_ignore_ascii_case(&self.state.config.domain)) {
            let text = format!("this server serves `{}`", self.state.config.domain);
            self.stream_error(StreamError::HostUnknown, &text).await;
            return false;
        }
        if get("version").is_some_and(|v| !v.starts_with("1.")) {
            self.stream_error(StreamError::UnsupportedVersion, "XMPP 1.0 streams only")
                .await;
            return false;
        }
        true
    }

    /// Waits for the stream header. `None` means the session is over.
    async fn expect_header(&mut self) -> Option<()> {
        match self.t.next().await {
            Incoming::Open(attrs) => self.accept_header(&attrs).await.then_some(()),
            Incoming::Error(e, text) => {
                self.stream_error(e, &text).await;
                None
            }
            Incoming::Stanza(_) => {
                self.stream_error(StreamError::NotWellFormed, "expected a stream header")
                    .await;
                None
            }
            Incoming::Close | Incoming::Eof | Incoming::Vanished => None,
        }
    }

    /// STARTTLS, SASL and resource binding (or the resumption of a waiting session).
    async fn negotiate(&mut self) -> Option<Negotiated> {
        let deadline = Duration::from_secs(self.state.config.limits.auth_timeout_s);
        match tokio::time::timeout(deadline, self.negotiate_inner()).await {
            Ok(r) => r,
            Err(_) => {
                self.stream_error(
                    StreamError::ConnectionTimeout,
                    "authentication took too long",
                )
                .await;
                None
            }
        }
    }

    async fn negotiate_inner(&mut self) -> Option<Negotiated> {
        self.expect_header().await?;
        // TCP on the STARTTLS port: nothing but TLS before anything else.
        if !self.t.is_secure() && !self.t.is_websocket() {
            let f = Element::new("features", ns::STREAM)
                .child(Element::new("starttls", ns::TLS).child(Element::new("required", ns::TLS)));
            self.push(&f);
            if !self.flush().await {
                return None;
            }
            match self.t.next().await {
                Incoming::Stanza(el) if el.is("starttls", ns::TLS) => {}
                Incoming::Stanza(_) => {
                    self.stream_error(
                        StreamError::PolicyViolation,
                        "STARTTLS is required before authentication",
                    )
                    .await;
                    return None;
                }
                Incoming::Error(e, text) => {
                    self.stream_error(e, &text).await;
                    return None;
                }
                _ => return None,
            }
            self.push(&Element::new("proceed", ns::TLS));
            if !self.flush().await {
                return None;
            }
            if !self
                .t
                .starttls(&self.state.tls, self.state.framer_limits())
                .await
            {
                return None;
            }
            self.stream_open = false;
            self.expect_header().await?;
        }
        let bare = self.authenticate().await?;
        self.t.restart();
        self.stream_open = false;
        self.expect_header().await?;
        let f = Element::new("features", ns::STREAM)
            .child(Element::new("bind", ns::BIND))
            .child(
                Element::new("session", ns::SESSION).child(Element::new("optional", ns::SESSION)),
            )
            .child(Element::new("sm", ns::SM))
            .child(Element::new("csi", ns::CSI));
        self.push(&f);
        if !self.flush().await {
            return None;
        }
        loop {
            match self.t.next().await {
                Incoming::Stanza(el) if el.is("iq", ns::CLIENT) => {
                    let bind = el.get_child("bind", ns::BIND);
                    if el.get_attr("type") != Some("set") || bind.is_none() {
                        self.push(
                            &StanzaError::NotAuthorized
                                .reply_to(&el, Some("bind a resource first")),
                        );
                        if !self.flush().await {
                            return None;
                        }
                        continue;
                    }
                    let requested = bind
                        .and_then(|b| b.child_text("resource", ns::BIND))
                        .unwrap_or_default();
                    let requested = requested.trim();
                    if requested.len() > 256 || requested.chars().any(char::is_control) {
                        self.push(&StanzaError::BadRequest.reply_to(&el, Some("invalid resource")));
                        if !self.flush().await {
                            return None;
                        }
                        continue;
                    }
                    return Some(Negotiated::Bind(Bind {
                        bare,
                        resource: requested.to_owned(),
                        iq: el,
                    }));
                }
                Incoming::Stanza(el) if el.is("resume", ns::SM) => {
                    match self.hand_over(&bare, &el).await {
                        Ok(()) => return Some(Negotiated::Resumed),
                        Err(Some(failed)) => {
                            self.push(&failed);
                            if !self.flush().await {
                                return None;
                            }
                        }
                        Err(None) => return None,
                    }
                }
                Incoming::Stanza(el) if el.is("enable", ns::SM) => {
                    self.push(&sm::failed(
                        "unexpected-request",
                        Some("bind a resource before enabling stream management"),
                    ));
                    if !self.flush().await {
                        return None;
                    }
                }
                // `<r/>` and `<a/>` mean nothing before `<enable/>`.
                Incoming::Stanza(el) if el.ns == ns::SM => {}
                Incoming::Stanza(_) => {
                    self.stream_error(StreamError::NotAuthorized, "bind a resource first")
                        .await;
                    return None;
                }
                Incoming::Error(e, text) => {
                    self.stream_error(e, &text).await;
                    return None;
                }
                _ => return None,
            }
        }
    }
}

fn random_id() -> String {
    use rand::Rng as _;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

fn sasl_failure(condition: &str, text: Option<&str>) -> Element {
    let mut f = Element::new("failure", ns::SASL).child(Element::new(condition, ns::SASL));
    if let Some(t) = text {
        f = f.child(
            Element::new("text", ns::SASL)
                .attr("xml:lang", "en")
                .text(t),
        );
    }
    f
}

fn decode_sasl(el: &Element) -> Option<Vec<u8>> {
    let text = el.text_content();
    let text = text.trim();
    if text.is_empty() || text == "=" {
        return Some(Vec::new());
    }
    B64.decode(text).ok()
}

/// SASL exchanges a client may fail before the stream is closed.
const SASL_ATTEMPTS_MAX: u32 = 3;

impl Session {
    /// Offers the mechanisms and runs SASL until success. Returns the bare JID.
    async fn authenticate(&mut self) -> Option<String> {
        let secure = self.t.is_secure();
        let ldap_auth = self.state.config.directory.auth == crate::config::DirectoryAuth::Ldap;
        let mut mechs = Element::new("mechanisms", ns::SASL);
        if !ldap_auth {
            // With the directory's passwords there is no stored SCRAM verifier: PLAIN only.
            mechs = mechs
                .child(Element::new("mechanism", ns::SASL).text("SCRAM-SHA-256"))
                .child(Element::new("mechanism", ns::SASL).text("SCRAM-SHA-1"));
        }
        if secure {
            // PLAIN sends the password itself: only where the hop is encrypted.
            mechs = mechs.child(Element::new("mechanism", ns::SASL).text("PLAIN"));
        }
        self.push(&Element::new("features", ns::STREAM).child(mechs));
        if !self.flush().await {
            return None;
        }
        let mut attempts = 0;
        loop {
            if attempts >= SASL_ATTEMPTS_MAX {
                self.stream_error(
                    StreamError::PolicyViolation,
                    "too many failed authentication attempts",
                )
                .await;
                return None;
            }
            let el = match self.t.next().await {
                Incoming::Stanza(el) => el,
                Incoming::Error(e, text) => {
                    self.stream_error(e, &text).await;
                    return None;
                }
                _ => return None,
            };
            if !el.is("auth", ns::SASL) {
                self.stream_error(StreamError::NotAuthorized, "authenticate first")
                    .await;
                return None;
            }
            match self.sasl_exchange(&el, secure).await {
                Ok(bare) => {
                    crate::metrics::login(true);
                    self.push(&Element::new("success", ns::SASL).text(B64.encode(&bare.1)));
                    if !self.flush().await {
                        return None;
                    }
                    return Some(bare.0);
                }
                Err(None) => return None,
                Err(Some((condition, text))) => {
                    crate::metrics::login(false);
                    attempts += 1;
                    self.push(&sasl_failure(condition, text.as_deref()));
                    if !self.flush().await {
                        return None;
                    }
                }
            }
        }
    }

    /// One SASL exchange. Ok: (bare JID, additional data for `<success/>`). Err(None): the
    /// connection is gone. Err(Some): a failure condition to report.
    #[allow(clippy::type_complexity)]
    async fn sasl_exchange(
        &mut self,
        auth: &Element,
        secure: bool,
    ) -> Result<(String, Vec<u8>), Option<(&'static str, Option<String>)>> {
        let state = self.state.clone();
        let domain = &state.config.domain;
        // Failed logins slow down the address they come from, never the account: a guesser
        // elsewhere must not lock its owner out (see `throttle`).
        if let Err(wait) = state.throttle.check(self.peer, Instant::now()) {
            return Err(Some((
                "temporary-auth-failure",
                Some(format!(
                    "too many failed logins from this address; retry in {} s",
                    wait.as_secs().max(1)
                )),
            )));
        }
        let mech = auth.get_attr("mechanism").unwrap_or_default();
        let ldap = state
            .ldap
            .clone()
            .filter(|_| state.config.directory.auth == crate::config::DirectoryAuth::Ldap);
        let hash = match mech {
            "SCRAM-SHA-256" if ldap.is_none() => Some(ScramHash::Sha256),
            "SCRAM-SHA-1" if ldap.is_none() => Some(ScramHash::Sha1),
            "PLAIN" if secure => None,
            _ => return Err(Some(("invalid-mechanism", None))),
        };
        let Some(initial) = decode_sasl(auth) else {
            return Err(Some(("incorrect-encoding", None)));
        };
        let Some(hash) = hash else {
            // PLAIN.
            let (user, password) =
                scram::parse_plain(&initial).map_err(|e| Some((e.condition(), None)))?;
            let bare = crate::auth::normalize_account(&format!("{user}@{domain}"), domain)
                .map_err(|_| Some(("not-authorized", None)))?;
            return match crate::auth::check_password(
                &state,
                &self.serving,
                &bare,
                &password,
                self.peer,
            )
            .await
            {
                Ok(true) => Ok((bare, Vec::new())),
                Ok(false) => Err(Some(("not-authorized", None))),
                Err(text) => Err(Some(("temporary-auth-failure", text.map(str::to_owned)))),
            };
        };
        let first = scram::parse_client_first(&initial).map_err(|e| Some((e.condition(), None)))?;
        let bare = crate::auth::normalize_account(&format!("{}@{domain}", first.username), domain);
        let serving = self.serving.clone();
        let secret = serving
            .server_secret()
            .await
            .map_err(|_| Some(("temporary-auth-failure", None)))?;
        let user = match &bare {
            Ok(b) => serving
                .store
                .user_get(b)
                .await
                .map_err(|_| Some(("temporary-auth-failure", None)))?,
            Err(_) => None,
        };
        let keys = user.as_ref().map(|u| crate::auth::keys_of(u, hash));
        // The made-up salt of an unknown name is keyed by the bare JID it would have, so
        // `Mallory` and `mallory` get the same one, as a real account does.
        let decoy_name = bare.as_deref().unwrap_or(&first.username);
        let credentials = scram::Credentials::of(hash, keys, secret, decoy_name);
        let (server, server_first) = ScramServer::start(hash, &first, credentials);
        self.push(&Element::new("challenge", ns::SASL).text(B64.encode(server_first)));
        if !self.flush().await {
            return Err(None);
        }
        let resp = match self.t.next().await {
            Incoming::Stanza(el) if el.is("response", ns::SASL) => el,
            Incoming::Stanza(el) if el.is("abort", ns::SASL) => {
                return Err(Some(("aborted", None)))
            }
            Incoming::Stanza(_) => {
                return Err(Some((
                    "malformed-request",
                    Some("expected <response/>".into()),
                )))
            }
            Incoming::Error(e, text) => {
                self.stream_error(e, &text).await;
                return Err(None);
            }
            _ => return Err(None),
        };
        let Some(final_msg) = decode_sasl(&resp) else {
            return Err(Some(("incorrect-encoding", None)));
        };
        match server.finish(&final_msg) {
            Ok(server_final) => Ok((
                bare.map_err(|_| Some(("not-authorized", None)))?,
                server_final,
            )),
            Err(e) => {
                state.throttle.failed(self.peer, Instant::now());
                Err(Some((e.condition(), None)))
            }
        }
    }

    /// The bound session: registers with the router, then loops over client input and the
    /// outbound queue until either side ends.
    async fn bound(&mut self, bind: Bind) {
        let state = self.state.clone();
        let limits = &state.config.limits;
        let (tx, mut rx) = mpsc::channel(limits.session_queue_stanzas_max);
        let shared = SessionShared::new(limits.session_queue_bytes_max);
        self.shared = Some(shared.clone());
        let id = state.router.next_id();
        let handle = SessionHandle {
            id,
            tx,
            shared: shared.clone(),
        };
        // Only what the whole session needs stays in this future: a local with a destructor
        // lives until the end of its scope, across every await, so the bind request and its
        // reply are consumed here rather than kept for the connection's lifetime.
        let Bind {
            bare,
            resource: requested,
            iq,
        } = bind;
        let Some(resource) =
            state
                .router
                .bind(&bare, &requested, handle, limits.sessions_per_account_max)
        else {
            // RFC 6120 §7.6.2.1: the account has as many sessions as it may.
            let text = format!(
                "this account already has {} sessions on this server",
                limits.sessions_per_account_max
            );
            self.push(&StanzaError::ResourceConstraint.reply_to(&iq, Some(&text)));
            Box::pin(self.stream_error(StreamError::PolicyViolation, &text)).await;
            return;
        };
        drop(requested);
        let full = format!("{bare}/{resource}");
        let result = Element::new("iq", ns::CLIENT)
            .attr("type", "result")
            .attr_opt("id", iq.get_attr("id"))
            .child(
                Element::new("bind", ns::BIND)
                    .child(Element::new("jid", ns::BIND).text(full.clone())),
            );
        drop(iq);
        self.push(&result);
        drop(result);
        let mut joined: HashSet<String> = HashSet::new();
        let mut shutdown = state.shutdown.subscribe();
        let mut drain = self.serving.drain.subscribe();
        let mut connected = self.flush().await;
        loop {
            let end = if connected {
                Box::pin(self.serve(
                    &mut rx,
                    &shared,
                    &bare,
                    &full,
                    &mut joined,
                    &mut shutdown,
                    &mut drain,
                ))
                .await
            } else if let Some(tk) = self.takeover.take() {
                End::TakenOver(tk)
            } else {
                End::Broken
            };
            let takeover = match end {
                End::TakenOver(tk) => Some(tk),
                End::Broken if self.resumable() => {
                    Box::pin(self.hibernate(&shared, &mut shutdown, &mut drain)).await
                }
                End::Broken | End::Over => None,
            };
            let Some(tk) = takeover else { break };
            connected = Box::pin(self.resume(tk, &shared)).await;
        }
        // Nobody resumes this session any more; a takeover that came meanwhile gets its
        // connection back, to bind a session of its own.
        if let Some((id, mut takeovers)) = self.sm.as_mut().and_then(|sm| sm.resume.take()) {
            state.resumable.remove(&id);
            takeovers.close();
            while let Ok(tk) = takeovers.try_recv() {
                let _ = tk.answer.send(Err((tk.transport, Refusal::Gone)));
            }
        }
        state.router.unbind(&bare, &resource, id);
        // Whatever a room still tries to deliver meets a closed queue; deliveries waiting for
        // room in it give up now.
        drop(rx);
        shared.drained();
        for room in joined {
            if self.lost {
                Box::pin(self.serving.muc.occupant_dropped(&room, &full)).await;
            } else {
                Box::pin(self.serving.muc.occupant_gone(&room, &full)).await;
            }
        }
    }

    /// Serves the connection until it breaks or the session ends.
    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &mut self,
        rx: &mut mpsc::Receiver<Outbound>,
        shared: &SessionShared,
        bare: &str,
        full: &str,
        joined: &mut HashSet<String>,
        shutdown: &mut broadcast::Receiver<()>,
        drain: &mut broadcast::Receiver<crate::state::Drain>,
    ) -> End {
        loop {
            tokio::select! {
                inc = self.t.next() => {
                    // Alive, whatever it said: see `run_pinger`.
                    shared.heard();
                    match inc {
                        Incoming::Stanza(el) => {
                            let handled = Box::pin(self.handle_stanza(el, bare, full, joined));
                            if !handled.await {
                                return End::Over;
                            }
                        }
                        Incoming::Close => {
                            self.push_close();
                            self.flush().await;
                            return End::Over;
                        }
                        Incoming::Error(e, text) => {
                            Box::pin(self.stream_error(e, &text)).await;
                            return End::Over;
                        }
                        Incoming::Open(_) => {
                            Box::pin(self.stream_error(StreamError::NotWellFormed, "unexpected stream header")).await;
                            return End::Over;
                        }
                        Incoming::Eof => return End::Broken,
                        Incoming::Vanished => {
                            debug!("the connection timed out (TCP keepalive)");
                            self.lost = true;
                            return End::Broken;
                        }
                    }
                },
                Some(out) = rx.recv() => {
                    if !Box::pin(self.write_outbound(out, rx, full)).await {
                        return self.after_failed_write();
                    }
                }
                () = shared.overflow.notified() => {
                    self.lost = true;
                    if shared.is_silent() {
                        Box::pin(self.stream_error(StreamError::ConnectionTimeout, "no answer to a ping (XEP-0199)")).await;
                        return End::Broken;
                    }
                    self.final_end = true;
                    Box::pin(self.stream_error(StreamError::ResourceConstraint, "the client reads too slowly; reconnect")).await;
                    return End::Over;
                }
                Some(tk) = next_takeover(&mut self.sm) => {
                    debug!("a new connection resumes the session");
                    return End::TakenOver(tk);
                }
                Ok(d) = drain.recv() => {
                    // This server stops serving: deliver what is queued, then send the
                    // client to an active server.
                    self.take_queued(rx, full);
                    self.push(&drain_error(&d.redirect));
                    self.push_close();
                    self.flush().await;
                    return End::Over;
                }
                _ = shutdown.recv() => {
                    // Deliver what rooms said on the way out (status 332) before closing.
                    self.take_queued(rx, full);
                    Box::pin(self.stream_error(StreamError::SystemShutdown, "the server is shutting down")).await;
                    return End::Over;
                }
            }
            if let Some(end) = self.check_unacked().await {
                return end;
            }
            self.request_ack();
            if !self.flush().await {
                return self.after_failed_write();
            }
        }
    }

    /// Why the connection stopped after a write failed or `write_outbound` gave up.
    fn after_failed_write(&mut self) -> End {
        match self.takeover.take() {
            Some(tk) => End::TakenOver(tk),
            None if self.broken => End::Broken,
            None => End::Over,
        }
    }

    /// May this session wait for its client to come back?
    fn resumable(&self) -> bool {
        !self.final_end && self.sm.as_ref().is_some_and(|sm| sm.resume.is_some())
    }

    /// Asks the client for an acknowledgment when stanzas wait for one (XEP-0198 `<r/>`;
    /// one request out at a time).
    fn request_ack(&mut self) {
        let ws = self.t.is_websocket();
        if let Some(sm) = self.sm.as_mut().filter(|sm| sm.should_request()) {
            sm.requested = true;
            self.out
                .push(sm::request().to_xml_in(if ws { "" } else { ns::CLIENT }));
        }
    }

    /// The stanzas the client has not acknowledged are bounded like its queue: past either
    /// limit the session ends, and cannot be resumed.
    async fn check_unacked(&mut self) -> Option<End> {
        let limits = &self.state.config.limits;
        let (count, bytes) = self.sm.as_ref()?.unacked();
        if count <= limits.session_queue_stanzas_max && bytes <= limits.session_queue_bytes_max {
            return None;
        }
        self.final_end = true;
        self.lost = true;
        let text = format!(
            "{count} stanzas ({bytes} bytes) sent and not acknowledged (XEP-0198): acknowledge \
             what you handle"
        );
        self.stream_error(StreamError::ResourceConstraint, &text)
            .await;
        Some(End::Over)
    }

    /// The connection broke: the session keeps its rooms and its queue until a new connection
    /// takes it over, the resumption window passes, the queue overflows or the server stops
    /// serving.
    async fn hibernate(
        &mut self,
        shared: &SessionShared,
        shutdown: &mut broadcast::Receiver<()>,
        drain: &mut broadcast::Receiver<crate::state::Drain>,
    ) -> Option<Box<Takeover>> {
        let window = self.sm.as_ref().map_or(Duration::ZERO, |sm| sm.window);
        shared.set_hibernating();
        // The old connection is of no further use.
        self.t = Transport::Closed;
        self.broken = true;
        debug!(window = ?window, "connection lost; the session waits to be resumed (XEP-0198)");
        let takeover = tokio::select! {
            Some(tk) = next_takeover(&mut self.sm) => Some(tk),
            () = tokio::time::sleep(window) => {
                debug!("nobody resumed the session in time");
                None
            }
            () = shared.overflow.notified() => {
                debug!("the queue overflowed while the session waited to be resumed");
                self.final_end = true;
                None
            }
            Ok(_) = drain.recv() => None,
            _ = shutdown.recv() => None,
        };
        if takeover.is_none() {
            self.lost = true;
        }
        crate::metrics::resumption(takeover.is_some());
        takeover
    }

    /// Takes a new connection over (XEP-0198 `<resumed/>`): the stanzas the client did not
    /// acknowledge are sent again, then the queue goes on. False when the new connection
    /// broke at once or was refused (the session goes on waiting).
    async fn resume(&mut self, tk: Box<Takeover>, shared: &SessionShared) -> bool {
        let Takeover {
            transport,
            h,
            answer,
        } = *tk;
        let Some(sm) = self.sm.as_mut() else {
            let _ = answer.send(Err((transport, Refusal::Gone)));
            return false;
        };
        if let Err(too_high) = sm.ack(h) {
            let _ = answer.send(Err((
                transport,
                Refusal::HandledTooHigh {
                    sent: too_high.sent,
                },
            )));
            return false;
        }
        let previd = sm
            .resume
            .as_ref()
            .map(|(id, _)| id.clone())
            .unwrap_or_default();
        let handled = sm.handled;
        sm.requested = false;
        let frames: Vec<String> = sm.frames().cloned().collect();
        // The old connection, if it was still open, is dropped without a goodbye.
        self.t = transport;
        let _ = answer.send(Ok(()));
        self.stream_open = true;
        self.broken = false;
        self.lost = false;
        self.out.clear();
        shared.taken(std::mem::take(&mut self.out_cost));
        shared.resumed();
        debug!(resent = frames.len(), "session resumed (XEP-0198)");
        self.push(
            &Element::new("resumed", ns::SM)
                .attr("previd", previd)
                .attr("h", handled.to_string()),
        );
        self.out.extend(frames);
        self.request_ack();
        self.flush().await
    }

    /// A resumption request on a new connection: hands this connection to the waiting
    /// session. `Err(Some(failed))` when that failed and this connection may still bind a
    /// session of its own; `Err(None)` when the connection is lost.
    async fn hand_over(&mut self, bare: &str, el: &Element) -> Result<(), Option<Element>> {
        let (Some(previd), Some(h)) = (el.get_attr("previd"), sm::parse_h(el)) else {
            return Err(Some(sm::failed(
                "bad-request",
                Some("<resume/> needs previd and h"),
            )));
        };
        let not_found = "no session to resume with this id on this server: bind a new \
                         session and catch up from the archive";
        let tx = match self
            .state
            .resumable
            .find(previd, bare, self.t.is_websocket())
        {
            Ok(tx) => tx,
            Err(sm::NotFound::Unknown) => return Err(Some(sm::failed("item-not-found", Some(not_found)))),
            Err(sm::NotFound::OtherTransport) => {
                return Err(Some(sm::failed(
                    "item-not-found",
                    Some("the session was on another kind of connection (WebSocket or TCP): bind a new session"),
                )))
            }
        };
        let (answer, answered) = oneshot::channel();
        let transport = std::mem::replace(&mut self.t, Transport::Closed);
        if let Err(e) = tx.try_send(Box::new(Takeover {
            transport,
            h,
            answer,
        })) {
            let tk = match e {
                mpsc::error::TrySendError::Full(tk) | mpsc::error::TrySendError::Closed(tk) => tk,
            };
            self.t = tk.transport;
            return Err(Some(sm::failed("item-not-found", Some(not_found))));
        }
        match answered.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err((transport, refusal))) => {
                self.t = transport;
                Err(Some(match refusal {
                    Refusal::Gone => sm::failed("item-not-found", Some(not_found)),
                    Refusal::HandledTooHigh { sent } => sm::failed(
                        "undefined-condition",
                        Some(&format!(
                            "handled-count-too-high: h={h}, but the session sent {sent} stanzas"
                        )),
                    ),
                }))
            }
            // The session dropped the connection without answering.
            Err(_) => Err(None),
        }
    }

    /// A stream management element (XEP-0198) on a bound stream. False ends the session.
    async fn handle_sm(&mut self, el: Element, bare: &str) -> bool {
        match el.name.as_str() {
            "enable" => {
                if self.sm.is_some() {
                    self.push(&sm::failed(
                        "unexpected-request",
                        Some("stream management is enabled already"),
                    ));
                    return true;
                }
                let limit = self.state.config.limits.resume_timeout_s;
                let (wanted, max) = sm::wants_resume(&el);
                let window_s = max.map_or(limit, |m| m.clamp(1, limit.max(1))).min(limit);
                let resume = (wanted && window_s > 0)
                    .then(|| self.state.resumable.register(bare, self.t.is_websocket()));
                let reply = sm::enabled(resume.as_ref().map(|(id, _)| (id.as_str(), window_s)));
                self.sm = Some(Box::new(Sm::new(resume, Duration::from_secs(window_s))));
                self.push(&reply);
            }
            "r" => {
                if let Some(sm) = &self.sm {
                    let a = sm::answer(sm.handled);
                    self.push(&a);
                }
            }
            "a" => {
                let Some(sm) = self.sm.as_mut() else {
                    return true;
                };
                let Some(h) = sm::parse_h(&el) else {
                    self.stream_error(
                        StreamError::BadFormat,
                        "<a/> needs h, an unsigned 32-bit integer",
                    )
                    .await;
                    return false;
                };
                if let Err(too_high) = sm.ack(h) {
                    let text = format!(
                        "handled-count-too-high: h={h}, but {} stanzas were sent",
                        too_high.sent
                    );
                    self.stream_error(StreamError::UndefinedCondition, &text)
                        .await;
                    return false;
                }
            }
            "resume" => self.push(&sm::failed(
                "unexpected-request",
                Some("this stream has a session already"),
            )),
            other => {
                let text = format!("<{other}/> is not a stream management element");
                self.stream_error(StreamError::UnsupportedStanzaType, &text)
                    .await;
                return false;
            }
        }
        true
    }

    /// Puts one queued item into `out`. False for a close request, which the caller carries
    /// out.
    fn take_outbound(&mut self, item: &Outbound, full: &str) -> bool {
        let cost = self
            .shared
            .as_ref()
            .map_or(0, |sh| item.cost(full, sh.bytes_max()));
        if self.held.is_some() {
            let presence = match item {
                Outbound::Stanza(el) => el.name == "presence",
                Outbound::Shared(s) => s.xml().starts_with("<presence"),
                Outbound::Close(_) => false,
            };
            if presence {
                self.hold(item, full, cost);
                return true;
            }
            // Something that matters: what was held goes first, in order.
            self.release_held();
        }
        self.out_cost += cost;
        match item {
            Outbound::Stanza(el) => self.push(el),
            Outbound::Shared(s) => {
                let mut frame = String::new();
                s.write_to(full, self.t.is_websocket(), &mut frame);
                if let Some(sm) = &mut self.sm {
                    sm.sent(&frame);
                }
                self.out.push(frame);
            }
            Outbound::Close(_) => return false,
        }
        true
    }

    /// Keeps a presence stanza back for an inactive client (XEP-0352).
    fn hold(&mut self, item: &Outbound, full: &str, cost: usize) {
        let ws = self.t.is_websocket();
        let frame = match item {
            Outbound::Stanza(el) => el.to_xml_in(if ws { "" } else { ns::CLIENT }),
            Outbound::Shared(s) => {
                let mut frame = String::new();
                s.write_to(full, ws, &mut frame);
                frame
            }
            Outbound::Close(_) => return,
        };
        let Some(held) = self.held.as_mut() else {
            return;
        };
        held.frames.push(frame);
        held.cost += cost;
        if held.frames.len() >= HELD_MAX {
            self.release_held();
        }
    }

    /// What was held for an inactive client goes out now, in order.
    fn release_held(&mut self) {
        let Some(held) = self.held.as_mut() else {
            return;
        };
        let frames = std::mem::take(&mut held.frames);
        self.out_cost += std::mem::take(&mut held.cost);
        for frame in frames {
            if let Some(sm) = &mut self.sm {
                sm.sent(&frame);
            }
            self.out.push(frame);
        }
    }

    /// Everything queued now, into `out` (on the way out: close requests no longer matter).
    fn take_queued(&mut self, rx: &mut mpsc::Receiver<Outbound>, full: &str) {
        self.release_held();
        self.held = None;
        while let Ok(item) = rx.try_recv() {
            self.take_outbound(&item, full);
        }
    }

    /// Queues `first` and whatever else is waiting, so a burst costs one write.
    async fn write_outbound(
        &mut self,
        first: Outbound,
        rx: &mut mpsc::Receiver<Outbound>,
        full: &str,
    ) -> bool {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(out) = next.take() {
            if !self.take_outbound(&out, full) {
                if let Outbound::Close(close) = out {
                    self.final_end = true;
                    let (e, text) = *close;
                    self.stream_error(e, &text).await;
                }
                return false;
            }
            n += 1;
            if n < OUTBOUND_BATCH_MAX {
                next = rx.try_recv().ok();
            }
        }
        true
    }

    /// Handles one stanza from the bound client. False ends the session.
    async fn handle_stanza(
        &mut self,
        mut el: Element,
        bare: &str,
        full: &str,
        joined: &mut HashSet<String>,
    ) -> bool {
        if el.ns == ns::SM {
            return self.handle_sm(el, bare).await;
        }
        if el.ns == ns::CSI {
            match el.name.as_str() {
                "inactive" => {
                    self.held.get_or_insert_with(Box::default);
                }
                "active" => {
                    self.release_held();
                    self.held = None;
                }
                other => {
                    let text = format!("<{other}/> is not a client state (XEP-0352)");
                    self.stream_error(StreamError::UnsupportedStanzaType, &text)
                        .await;
                    return false;
                }
            }
            return true;
        }
        if el.ns != ns::CLIENT || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
            self.stream_error(
                StreamError::UnsupportedStanzaType,
                &format!("<{}/> is not a stanza this server accepts", el.name),
            )
            .await;
            return false;
        }
        crate::metrics::METRICS.stanzas_in.inc();
        if let Some(sm) = &mut self.sm {
            sm.handled = sm.handled.wrapping_add(1);
        }
        // The server, never the client, says who a stanza is from.
        el.set_attr("from", full);
        if el.name == "iq" && !valid_iq(&el) {
            if !matches!(el.get_attr("type"), Some("result" | "error")) {
                self.push(
                    &StanzaError::BadRequest
                        .reply_to(&el, Some("an iq needs an id, a type and one child")),
                );
            }
            return true;
        }
        let state = self.state.clone();
        let to = el.get_attr("to").map(str::to_owned);
        let Some(to) = to else {
            self.handle_local(el, bare, joined).await;
            return true;
        };
        let (to_bare, _to_res) = match to.split_once('/') {
            Some((b, r)) => (b.to_owned(), Some(r.to_owned())),
            None => (to.clone(), None),
        };
        let to_domain = to_bare
            .rsplit('@')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if el.name == "iq"
            && to_domain == state.config.domain
            && to_bare.contains('@')
            && _to_res.is_none()
            && crate::pep::handles(&el)
        {
            // The server answers for an account (RFC 6120 §10.5.4): PEP, private storage,
            // the account's disco.
            if !is_error_or_result(&el) {
                let owner = to_bare.to_lowercase();
                let store = self.serving.store.clone();
                let reply = crate::pep::answer_iq(&state, &*store, &el, bare, &owner).await;
                self.push(&reply);
            }
        } else if to_bare.eq_ignore_ascii_case(&state.config.domain)
            || to_bare.eq_ignore_ascii_case(bare)
        {
            self.handle_local(el, bare, joined).await;
        } else if to_domain == state.muc_jid {
            if el.name == "presence" && to_bare.contains('@') {
                let room = to_bare.to_lowercase();
                if el.get_attr("type") == Some("unavailable") {
                    joined.remove(&room);
                } else if joined.len() < JOINED_ROOMS_MAX {
                    joined.insert(room);
                } else {
                    self.push(
                        &StanzaError::PolicyViolation.reply_to(&el, Some("too many rooms joined")),
                    );
                    return true;
                }
            }
            if let Some(reply) = self.serving.muc.route(el, full).await {
                self.push(&reply);
            }
        } else if state.config.upload.enabled
            && to_bare.eq_ignore_ascii_case(&state.config.upload_jid())
        {
            if el.name == "iq" {
                let serving = self.serving.clone();
                if let Some(reply) =
                    crate::upload::answer_iq(&state, &serving, &el, bare, joined).await
                {
                    self.push(&reply);
                }
            } else if !is_error_or_result(&el) && el.name != "presence" {
                self.push(
                    &StanzaError::ServiceUnavailable
                        .reply_to(&el, Some("the file service answers requests (iq) only")),
                );
            }
        } else if to_domain == state.config.domain {
            self.route_to_user(el, &to);
        } else {
            if !is_error_or_result(&el) {
                self.push(
                    &StanzaError::RemoteServerNotFound
                        .reply_to(&el, Some("this server does not federate")),
                );
            }
        }
        true
    }

    /// Stanzas to another local user: delivered to the named resource, or to every resource.
    fn route_to_user(&mut self, el: Element, to: &str) {
        let state = self.state.clone();
        let targets = if to.contains('/') {
            vec![to.to_owned()]
        } else if el.name == "message" {
            state.router.resources(to)
        } else {
            Vec::new()
        };
        let mut delivered = false;
        for t in targets {
            let mut copy = el.clone();
            copy.set_attr("to", t);
            delivered |= state.router.deliver(copy) == Delivery::Queued;
        }
        if !delivered && !is_error_or_result(&el) && el.name != "presence" {
            self.push(
                &StanzaError::ServiceUnavailable.reply_to(&el, Some("the recipient is not online")),
            );
        }
        if carbon_eligible(&el) {
            let from = el.get_attr("from").unwrap_or_default();
            let sender = from.split('/').next().unwrap_or_default();
            // To the sender's other clients: what it sent. To the recipient's other clients,
            // when it was sent to one of them: what that one received.
            send_carbons(&state.router, sender, Some(from), "sent", &el);
            if let Some((recipient, _)) = to.split_once('/') {
                send_carbons(
                    &state.router,
                    &recipient.to_lowercase(),
                    Some(to),
                    "received",
                    &el,
                );
            }
        }
    }

    /// Stanzas for the server itself or the user's own account.
    async fn handle_local(&mut self, el: Element, bare: &str, joined: &mut HashSet<String>) {
        match el.name.as_str() {
            // PEP and private storage without `to` are the user's own account's.
            "iq" if el.get_attr("to").is_none()
                && !is_error_or_result(&el)
                && el.elements().next().is_some_and(|c| {
                    c.is("pubsub", crate::pep::PUBSUB)
                        || c.is("pubsub", crate::pep::PUBSUB_OWNER)
                        || c.is("query", crate::pep::PRIVATE)
                        || c.is("vCard", crate::pep::VCARD)
                }) =>
            {
                let store = self.serving.store.clone();
                let reply = crate::pep::answer_iq(&self.state, &*store, &el, bare, bare).await;
                self.push(&reply);
            }
            "iq" if el.get_attr("type") == Some("set")
                && el.elements().next().is_some_and(|c| c.ns == ns::CARBONS) =>
            {
                let on = el.get_child("enable", ns::CARBONS).is_some();
                let off = el.get_child("disable", ns::CARBONS).is_some();
                if let (Some(shared), true) = (&self.shared, on || off) {
                    shared.set_carbons(on);
                    let result = Element::new("iq", ns::CLIENT)
                        .attr("type", "result")
                        .attr_opt("id", el.get_attr("id"))
                        .attr_opt("to", el.get_attr("from"));
                    self.push(&result);
                } else {
                    self.push(&StanzaError::BadRequest.reply_to(&el, Some("enable or disable")));
                }
            }
            "iq" => {
                if let Some(reply) = crate::local::answer_iq(&self.state, &el, bare) {
                    self.push(&reply);
                }
            }
            // Available: invitations kept while the user was offline are delivered now
            // (a client that sends presence again only finds the ones kept since).
            "presence" if el.get_attr("type").is_none() => {
                let full = el.get_attr("from").unwrap_or_default().to_owned();
                match self.serving.store.invitations_take(bare).await {
                    Ok(kept) => {
                        for text in kept {
                            if let Ok(mut m) = Element::parse(text.as_bytes(), ns::CLIENT) {
                                m.set_attr("to", full.as_str());
                                self.push(&m);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the invitations kept for a user")
                    }
                }
            }
            // Broadcast unavailable: leave every room we sent directed presence to
            // (RFC 6121 §4.6.3).
            "presence" if el.get_attr("type") == Some("unavailable") => {
                let full = el.get_attr("from").unwrap_or_default().to_owned();
                for room in std::mem::take(joined) {
                    self.serving.muc.occupant_gone(&room, &full).await;
                }
            }
            _ => {}
        }
    }
}

/// One-to-one messages that are copied to the account's other clients (XEP-0280 §6): chat
/// messages, and normal ones with a body; not those marked private or no-copy.
fn carbon_eligible(el: &Element) -> bool {
    el.name == "message"
        && match el.get_attr("type") {
            Some("chat") => true,
            None | Some("normal") => el.get_child("body", ns::CLIENT).is_some(),
            _ => false,
        }
        && el.get_child("private", ns::CARBONS).is_none()
        && el.get_child("no-copy", ns::HINTS).is_none()
        && el.get_child("x", ns::MUC_USER).is_none()
}

/// Copies of `message` (`sent` or `received`) to the sessions of `account` that enabled
/// carbons, except `except` (the session that sent or received it itself).
fn send_carbons(
    router: &crate::router::Router,
    account: &str,
    except: Option<&str>,
    how: &str,
    message: &Element,
) {
    for (full, handle) in router.handles(account) {
        if Some(full.as_str()) == except || !handle.shared.carbons() {
            continue;
        }
        let copy = Element::new("message", ns::CLIENT)
            .attr("from", account)
            .attr("to", full)
            .attr("type", message.get_attr("type").unwrap_or("normal"))
            .child(
                Element::new(how, ns::CARBONS)
                    .child(Element::new("forwarded", ns::FORWARD).child(message.clone())),
            );
        router.deliver(copy);
    }
}

/// Stanzas sent in one write at most, so one busy session cannot starve its own reads.
const OUTBOUND_BATCH_MAX: usize = 256;

/// A server-to-client ping (XEP-0199 §4.2).
fn ping(domain: &str, full: &str) -> Element {
    Element::new("iq", ns::CLIENT)
        .attr("type", "get")
        .attr("id", "pchat-ping")
        .attr("from", domain)
        .attr("to", full)
        .child(Element::new("ping", ns::PING))
}

/// XEP-0199 server-to-client pings, for every bound session from one task: every
/// `ping_interval_ms` it pings the sessions that sent nothing during the whole interval, and
/// `ping_timeout_ms` later drops those still silent (their rooms show status 333). So a
/// client is pinged after one to two intervals of silence. One task rather than a timer per
/// session: a timer is ~110 bytes in every idle session's task, and memory per idle client is
/// what bounds how many one server holds. Runs until shutdown; not at all when pings are off.
pub async fn run_pinger(state: Arc<State>) {
    let limits = &state.config.limits;
    if limits.ping_interval_ms == 0 {
        return;
    }
    let interval = Duration::from_millis(limits.ping_interval_ms);
    let timeout = Duration::from_millis(limits.ping_timeout_ms);
    let mut shutdown = state.shutdown.subscribe();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.recv() => return,
        }
        let mut pinged = Vec::new();
        for (full, handle) in state.router.sessions() {
            if handle.shared.is_hibernating()
                || handle.shared.take_heard()
                || handle.shared.is_pinged()
            {
                continue;
            }
            handle.shared.set_pinged();
            state.router.deliver(ping(&state.config.domain, &full));
            pinged.push(handle);
        }
        if pinged.is_empty() {
            continue;
        }
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            for h in pinged {
                h.shared.give_up_if_silent();
            }
        });
    }
}
/// Rooms one session may be in at once.
const JOINED_ROOMS_MAX: usize = 1000;

fn is_error_or_result(el: &Element) -> bool {
    matches!(el.get_attr("type"), Some("error" | "result"))
}

fn valid_iq(el: &Element) -> bool {
    let Some(ty) = el.get_attr("type") else {
        return false;
    };
    if el.get_attr("id").is_none() {
        return false;
    }
    match ty {
        "get" | "set" => el.elements().count() == 1,
        "result" | "error" => true,
        _ => false,
    }
}
