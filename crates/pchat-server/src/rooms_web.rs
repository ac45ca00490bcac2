//! The room management page (Lync's RoomManagementUrl) at `/rooms` on the HTTP port: a user
//! logs in with the XMPP account's password, sees the rooms they own or administer, creates
//! rooms, edits a room's settings and its members, admins and owners, and searches a room's
//! history by words (`/rooms/search`). Server-rendered HTML, no script: it works without the
//! web client.
//!
//! Every change is made as the user, through the room itself: the page opens a short-lived
//! session of the user on this server (a resource `rooms-web-…` in the router) and sends the
//! same XEP-0045 requests a client would (join to create, `muc#owner` forms, `muc#admin`
//! items), so categories, walls, creation rights and every room rule apply exactly as they
//! do to XMPP clients, and in a pool the change goes through the room like any other.
//!
//! Logins: the login throttle of the client ports, by client address. Sessions: a random
//! 256-bit token in a cookie (`Secure; HttpOnly; SameSite=Strict; Path=/rooms`), kept in the
//! store under the token's SHA-256 ([`pchat_store::WebSession`]) — so any server of a pool
//! serves the session's next request (no sticky load balancer needed), a logout ends it on
//! all of them, and whoever reads the database cannot use a session — for at most
//! [`SESSION_IDLE`] of inactivity and [`SESSION_MAX_AGE`] in all, at most
//! [`pchat_store::WEB_SESSIONS_PER_USER_MAX`] per user. Every form that changes something
//! carries the session's CSRF token (a hash of the cookie's token, so every server computes
//! the same one), and a request from another origin (`Origin`, `Sec-Fetch-Site`) is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State as AxumState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Form;
use pchat_xmpp::{ns, Element};
use tokio::sync::mpsc;

use crate::router::{Outbound, SessionHandle, SessionShared};
use crate::state::{Serving, State};

/// A session ends after this long without a request.
pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// A session ends after this long whatever it does.
pub const SESSION_MAX_AGE: Duration = Duration::from_secs(8 * 3600);
/// A session's last use is written to the store at most this often.
const SESSION_TOUCH_EVERY: Duration = Duration::from_secs(60);
/// How long one request to a room may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);
const COOKIE: &str = "pchat_rooms";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a token's session is kept: its SHA-256.
fn session_id(token: &str) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(token.as_bytes()))
}

/// The CSRF token of a session: another hash of its token (a different input, so it says
/// nothing about the id kept in the store, and knowing the id does not give it).
fn csrf_of(token: &str) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"pchat /rooms csrf\0");
    h.update(token.as_bytes());
    hex(&h.finalize()[..16])
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Starts a session for `bare`: its cookie token. Expired sessions are purged on the way.
async fn create_session(
    store: &dyn pchat_store::Store,
    bare: &str,
) -> pchat_store::StoreResult<String> {
    let now = crate::datetime::now();
    let _ = store
        .web_session_purge(
            pchat_room::Timestamp(now.0.saturating_sub(micros(SESSION_IDLE))),
            pchat_room::Timestamp(now.0.saturating_sub(micros(SESSION_MAX_AGE))),
        )
        .await;
    let token = random_token();
    let session = pchat_store::WebSession {
        user: bare.to_owned(),
        created_at: now,
        seen_at: now,
    };
    store.web_session_put(&session_id(&token), &session).await?;
    Ok(token)
}

/// The user and CSRF token of the live session named by `token`; an expired one is ended.
async fn live_session(store: &dyn pchat_store::Store, token: &str) -> Option<(String, String)> {
    let id = session_id(token);
    let s = match store.web_session_get(&id).await {
        Ok(s) => s?,
        Err(e) => {
            tracing::warn!(error = %e, "/rooms: cannot read a session; it counts as logged out");
            return None;
        }
    };
    let now = crate::datetime::now();
    let since = |t: pchat_room::Timestamp| now.0.saturating_sub(t.0);
    if since(s.seen_at) >= micros(SESSION_IDLE) || since(s.created_at) >= micros(SESSION_MAX_AGE) {
        let _ = store.web_session_remove(&id).await;
        return None;
    }
    if since(s.seen_at) >= micros(SESSION_TOUCH_EVERY) {
        if let Err(e) = store.web_session_touch(&id, now).await {
            tracing::warn!(error = %e, "/rooms: cannot record a session's use");
        }
    }
    Some((s.user, csrf_of(token)))
}

fn random_token() -> String {
    use rand::Rng as _;
    let bytes: [u8; 32] = rand::thread_rng().gen();
    hex(&bytes)
}

/// `/rooms` and its forms, for the HTTP port's router.
pub fn routes() -> axum::Router<Arc<State>> {
    axum::Router::new()
        .route("/rooms", get(home))
        .route("/rooms/login", post(login))
        .route("/rooms/logout", post(logout))
        .route("/rooms/create", post(create))
        .route("/rooms/edit", get(edit_page).post(edit))
        .route("/rooms/affiliation", post(affiliation))
        .route("/rooms/search", get(search_page))
}

type Fields = Vec<(String, String)>;

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>\
         <meta name='viewport' content='width=device-width, initial-scale=1'>\
         <title>{t}</title><style>{STYLE}</style></head><body><main>\
         <h1>{t}</h1>{body}</main></body></html>",
        t = escape(title)
    )
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f4}\
main{max-width:60em;margin:auto;padding:1em 2em;background:#fff;min-height:100vh}\
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.4em;text-align:left}\
label{display:block;margin:.5em 0}input[type=text],input[type=password],textarea,select{width:100%;max-width:30em}\
.error{color:#a00;font-weight:bold}.done{color:#060;font-weight:bold}.note{color:#555}form.inline{display:inline}";

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Not no-referrer: under it browsers send `Origin: null` on the page's own
            // forms, and the origin check could not tell them from a foreign site's.
            (header::REFERRER_POLICY, "same-origin"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        ],
        Html(body),
    )
        .into_response()
}

fn redirect(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response()
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// The logged-in user and CSRF token, if any (none while this server is idle in its pool).
async fn session(state: &State, headers: &HeaderMap) -> Option<(String, String)> {
    let serving = state.serving()?;
    live_session(serving.store.as_ref(), &cookie_token(headers)?).await
}

/// A change must come from this page: a same-origin request with the session's token.
async fn check_change(
    state: &State,
    headers: &HeaderMap,
    fields: &Fields,
) -> Result<String, Box<Response>> {
    let cross_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v != "same-origin" && v != "none");
    let origin_ok = match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest == host),
        _ => true,
    };
    if cross_site || !origin_ok {
        return Err(Box::new(html(
            StatusCode::FORBIDDEN,
            page(
                "Refused",
                "<p class='error'>A request from another site was refused.</p>",
            ),
        )));
    }
    let Some((bare, csrf)) = session(state, headers).await else {
        return Err(Box::new(redirect("/rooms")));
    };
    if field(fields, "csrf") != Some(csrf.as_str()) {
        return Err(Box::new(html(
            StatusCode::FORBIDDEN,
            page(
                "Refused",
                "<p class='error'>The form is out of date (its token does not match your session); <a href='/rooms'>start again</a>.</p>",
            ),
        )));
    }
    Ok(bare)
}

/// For a form that changes something: the user (checked by [`check_change`]), what this
/// server serves with, and the session's CSRF token for the page that answers.
async fn changing(
    state: &State,
    headers: &HeaderMap,
    fields: &Fields,
) -> Result<(String, Arc<Serving>, String), Box<Response>> {
    let bare = check_change(state, headers, fields).await?;
    let serving = serving(state)?;
    let csrf = cookie_token(headers)
        .map(|t| csrf_of(&t))
        .unwrap_or_default();
    Ok((bare, serving, csrf))
}

fn serving(state: &State) -> Result<Arc<Serving>, Box<Response>> {
    state.serving().ok_or_else(|| {
        Box::new(html(
            StatusCode::SERVICE_UNAVAILABLE,
            page(
                "Not serving",
                "<p>This server is idle in its pool: use the pool's active server.</p>",
            ),
        ))
    })
}

fn login_page(message: Option<&str>) -> String {
    let error = message.map_or(String::new(), |m| {
        format!("<p class='error'>{}</p>", escape(m))
    });
    page(
        "Room management",
        &format!(
            "{error}<form method='post' action='/rooms/login'>\
             <label>User name <input type='text' name='user' autocomplete='username' required></label>\
             <label>Password <input type='password' name='password' autocomplete='current-password' required></label>\
             <button type='submit'>Log in</button></form>\
             <p class='note'>The same name and password as for chat.</p>"
        ),
    )
}

async fn home(AxumState(state): AxumState<Arc<State>>, headers: HeaderMap) -> Response {
    let Some((bare, csrf)) = session(&state, &headers).await else {
        return html(StatusCode::OK, login_page(None));
    };
    let serving = match serving(&state) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    html(
        StatusCode::OK,
        list_page(&state, &serving, &bare, &csrf, None).await,
    )
}

async fn list_page(
    state: &State,
    serving: &Serving,
    bare: &str,
    csrf: &str,
    message: Option<&str>,
) -> String {
    let rooms = serving.store.room_list().await.unwrap_or_default();
    let access = serving.muc.access_now().await;
    let mut rows = String::new();
    for r in &rooms {
        let aff = access
            .as_deref()
            .and_then(|a| crate::muc::effective_affiliation(r, bare, a));
        if aff.is_none_or(|a| a < pchat_room::Affiliation::Admin) {
            continue;
        }
        rows.push_str(&format!(
            "<tr><td><a href='/rooms/edit?room={jid}'>{jid}</a></td><td>{name}</td><td>{desc}</td><td>{kind}</td></tr>",
            jid = escape(&r.jid),
            name = escape(&r.config.name),
            desc = escape(&r.config.description),
            kind = if r.config.members_only { "members only" } else { "open" },
        ));
    }
    if rows.is_empty() {
        rows = "<tr><td colspan='4'>You manage no room yet.</td></tr>".into();
    }
    let note = message.map_or(String::new(), |m| {
        format!("<p class='error'>{}</p>", escape(m))
    });
    page(
        "Your rooms",
        &format!(
            "<p>Logged in as <b>{user}</b>. <form class='inline' method='post' action='/rooms/logout'>\
             <input type='hidden' name='csrf' value='{csrf}'><button>Log out</button></form></p>{note}\
             <table><tr><th>Room</th><th>Name</th><th>Description</th><th>Privacy</th></tr>{rows}</table>\
             <p><a href='/rooms/search'>Search a room's history</a></p>\
             <h2>Create a room</h2><form method='post' action='/rooms/create'>\
             <input type='hidden' name='csrf' value='{csrf}'>\
             <label>Address <input type='text' name='local' pattern='[a-z0-9._\\-]{{1,64}}' required> <span class='note'>@{muc}</span></label>\
             <label>Name <input type='text' name='name' maxlength='200'></label>\
             <label>Description <textarea name='description' maxlength='2000'></textarea></label>\
             <label><input type='checkbox' name='members_only' value='1'> Members only (closed)</label>\
             <label><input type='checkbox' name='public' value='1' checked> Listed in the room directory</label>\
             <button type='submit'>Create</button></form>",
            user = escape(bare),
            csrf = escape(csrf),
            muc = escape(&state.muc_jid),
        ),
    )
}

async fn login(
    AxumState(state): AxumState<Arc<State>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Form(fields): Form<Fields>,
) -> Response {
    let serving = match serving(&state) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let user = field(&fields, "user")
        .unwrap_or_default()
        .trim()
        .to_lowercase();
    let password = field(&fields, "password").unwrap_or_default();
    let bare = if user.contains('@') {
        user
    } else {
        format!("{user}@{}", state.config.domain)
    };
    if bare.len() > 1024 || password.len() > 1024 {
        return html(
            StatusCode::BAD_REQUEST,
            login_page(Some("That is too long.")),
        );
    }
    match crate::auth::check_password(&state, &serving, &bare, password, client.ip()).await {
        Ok(true) => {
            crate::metrics::login(true);
            let token = match create_session(serving.store.as_ref(), &bare).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "/rooms: cannot keep a new session");
                    return html(
                        StatusCode::SERVICE_UNAVAILABLE,
                        login_page(Some(
                            "The server cannot keep your session now; try again shortly.",
                        )),
                    );
                }
            };
            let cookie = format!(
                "{COOKIE}={token}; Path=/rooms; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
                SESSION_MAX_AGE.as_secs()
            );
            (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "/rooms".to_owned()),
                    (header::SET_COOKIE, cookie),
                ],
            )
                .into_response()
        }
        Ok(false) => {
            crate::metrics::login(false);
            html(
                StatusCode::UNAUTHORIZED,
                login_page(Some("Wrong user name or password.")),
            )
        }
        Err(reason) => html(
            StatusCode::TOO_MANY_REQUESTS,
            login_page(Some(
                reason.unwrap_or("Logins are not possible now; try again later."),
            )),
        ),
    }
}

async fn logout(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    Form(fields): Form<Fields>,
) -> Response {
    if check_change(&state, &headers, &fields).await.is_ok() {
        if let (Some(token), Some(serving)) = (cookie_token(&headers), state.serving()) {
            if let Err(e) = serving.store.web_session_remove(&session_id(&token)).await {
                tracing::warn!(error = %e, "/rooms: cannot end a session at logout");
            }
        }
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/rooms".to_owned()),
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; Path=/rooms; Secure; HttpOnly; SameSite=Strict; Max-Age=0"),
            ),
        ],
    )
        .into_response()
}

/// A short-lived session of the user on this server, through which the page asks rooms.
struct AsUser {
    state: Arc<State>,
    serving: Arc<Serving>,
    bare: String,
    resource: String,
    full: String,
    id: u64,
    shared: Arc<SessionShared>,
    rx: mpsc::Receiver<Outbound>,
}

impl AsUser {
    fn open(state: &Arc<State>, serving: &Arc<Serving>, bare: &str) -> Result<AsUser, String> {
        let (tx, rx) = mpsc::channel(64);
        let shared = SessionShared::new(state.config.limits.session_queue_bytes_max);
        let id = state.router.next_id();
        let handle = SessionHandle {
            id,
            tx,
            shared: shared.clone(),
        };
        let wanted = format!("rooms-web-{}", &random_token()[..8]);
        let resource = state
            .router
            .bind(
                bare,
                &wanted,
                handle,
                state.config.limits.sessions_per_account_max,
            )
            .ok_or("you have as many sessions as an account may; close one and retry")?;
        Ok(AsUser {
            state: state.clone(),
            serving: serving.clone(),
            bare: bare.to_owned(),
            full: format!("{bare}/{resource}"),
            resource,
            id,
            shared,
            rx,
        })
    }

    /// Sends `el` as the user; the first stanza back that `answers` accepts.
    async fn send(
        &mut self,
        mut el: Element,
        answers: impl Fn(&Element) -> bool,
    ) -> Result<Element, String> {
        el.set_attr("from", self.full.as_str());
        if let Some(reply) = self.serving.muc.route(el, &self.full).await {
            if answers(&reply) {
                return Ok(reply);
            }
        }
        let deadline = tokio::time::Instant::now() + ASK_TIMEOUT;
        loop {
            let el = self.next_stanza(deadline).await?;
            if answers(&el) {
                return Ok(el);
            }
        }
    }

    /// The next stanza sent to the user's session, by `deadline`.
    async fn next_stanza(&mut self, deadline: tokio::time::Instant) -> Result<Element, String> {
        loop {
            let item = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .map_err(|_| "the room did not answer in time; try again".to_owned())?
                .ok_or("the server is shutting down")?;
            self.shared
                .taken(item.cost(&self.full, self.shared.bytes_max()));
            self.shared.drained();
            if let Outbound::Stanza(el) = item {
                return Ok(*el);
            }
        }
    }

    /// The newest `max` messages of `room`'s archive that match `words` (XEP-0313 with
    /// XEP-0431's full-text field, the last page), oldest first, and whether they are all
    /// the matches. The room decides who may read its archive, as for any client.
    async fn search(&mut self, room: &str, words: &str, max: usize) -> Result<Search, String> {
        let id = random_token()[..12].to_owned();
        let field = |var: &str, value: &str| {
            Element::new("field", ns::DATA_FORMS)
                .attr("var", var)
                .child(Element::new("value", ns::DATA_FORMS).text(value))
        };
        let query = Element::new("query", ns::MAM)
            .attr("queryid", id.as_str())
            .child(
                Element::new("x", ns::DATA_FORMS)
                    .attr("type", "submit")
                    .child(field("FORM_TYPE", ns::MAM))
                    .child(field("{urn:xmpp:fulltext:0}fulltext", words)),
            )
            .child(
                Element::new("set", ns::RSM)
                    .child(Element::new("max", ns::RSM).text(max.to_string()))
                    .child(Element::new("before", ns::RSM)),
            );
        let mut iq = Element::new("iq", ns::CLIENT)
            .attr("type", "set")
            .attr("to", room)
            .attr("id", id.as_str())
            .child(query);
        iq.set_attr("from", self.full.as_str());
        let mut hits = Vec::new();
        let mut done = self.serving.muc.route(iq, &self.full).await;
        let deadline = tokio::time::Instant::now() + ASK_TIMEOUT;
        let reply = loop {
            let el = match done.take() {
                Some(el) => el,
                None => self.next_stanza(deadline).await?,
            };
            if el.name == "iq" && el.get_attr("id") == Some(id.as_str()) {
                break el;
            }
            if let Some(hit) = Hit::of(&el, &id) {
                if hits.len() < max {
                    hits.push(hit);
                }
            }
        };
        if reply.get_attr("type") == Some("error") {
            return Err(error_text(&reply));
        }
        let complete = reply
            .get_child("fin", ns::MAM)
            .and_then(|f| f.get_attr("complete"))
            .is_some_and(|c| c == "true");
        Ok(Search { hits, complete })
    }

    async fn iq(&mut self, to: &str, ty: &str, payload: Element) -> Result<Element, String> {
        let id = random_token()[..12].to_owned();
        let iq = Element::new("iq", ns::CLIENT)
            .attr("type", ty)
            .attr("to", to)
            .attr("id", id.as_str())
            .child(payload);
        let reply = self
            .send(iq, |e| {
                e.name == "iq" && e.get_attr("id") == Some(id.as_str())
            })
            .await?;
        if reply.get_attr("type") == Some("error") {
            return Err(error_text(&reply));
        }
        Ok(reply)
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        self.state
            .router
            .unbind(&self.bare, &self.resource, self.id);
    }
}

/// What a search found.
struct Search {
    /// Oldest first.
    hits: Vec<Hit>,
    /// Every match is in `hits`.
    complete: bool,
}

/// One archived message a search found.
struct Hit {
    /// The archive id.
    id: String,
    /// When it was sent (XEP-0203 stamp, UTC).
    at: String,
    nick: String,
    body: String,
}

impl Hit {
    /// The archived message a MAM result of query `queryid` carries.
    fn of(el: &Element, queryid: &str) -> Option<Hit> {
        let result = el
            .get_child("result", ns::MAM)
            .filter(|r| r.get_attr("queryid") == Some(queryid))?;
        let forwarded = result.get_child("forwarded", ns::FORWARD)?;
        let message = forwarded.get_child("message", ns::CLIENT)?;
        Some(Hit {
            id: result.get_attr("id").unwrap_or_default().to_owned(),
            at: forwarded
                .get_child("delay", ns::DELAY)
                .and_then(|d| d.get_attr("stamp"))
                .unwrap_or_default()
                .to_owned(),
            nick: message
                .get_attr("from")
                .and_then(|f| f.split_once('/'))
                .map(|(_, nick)| nick.to_owned())
                .unwrap_or_default(),
            body: message.child_text("body", ns::CLIENT).unwrap_or_default(),
        })
    }
}

/// What an error reply says, for a person.
fn error_text(reply: &Element) -> String {
    let error = reply.get_child("error", ns::CLIENT);
    let text = error.and_then(|e| e.child_text("text", ns::STANZAS));
    let condition = error
        .and_then(|e| {
            e.elements()
                .find(|c| c.ns == ns::STANZAS && c.name != "text")
        })
        .map(|c| c.name.clone())
        .unwrap_or_else(|| "refused".into());
    match text {
        Some(t) => format!("{t} ({condition})"),
        None => format!("the room refused: {condition}"),
    }
}

fn submit_form(fields: Vec<(String, Vec<String>)>) -> Element {
    let mut x = Element::new("x", ns::DATA_FORMS)
        .attr("type", "submit")
        .child(
            Element::new("field", ns::DATA_FORMS)
                .attr("var", "FORM_TYPE")
                .child(Element::new("value", ns::DATA_FORMS).text(ns::MUC_ROOMCONFIG)),
        );
    for (var, values) in fields {
        let mut f = Element::new("field", ns::DATA_FORMS).attr("var", var);
        for v in values {
            f = f.child(Element::new("value", ns::DATA_FORMS).text(v));
        }
        x = x.child(f);
    }
    Element::new("query", ns::MUC_OWNER).child(x)
}

async fn create(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    Form(fields): Form<Fields>,
) -> Response {
    let (bare, serving, csrf) = match changing(&state, &headers, &fields).await {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let local = field(&fields, "local")
        .unwrap_or_default()
        .trim()
        .to_lowercase();
    let valid = !local.is_empty()
        && local.len() <= 64
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    let outcome = if valid {
        let room = format!("{local}@{}", state.muc_jid);
        create_room(&state, &serving, &bare, &room, &fields)
            .await
            .map(|()| room)
    } else {
        Err("a room's address is 1 to 64 letters, digits, dots, dashes or underscores".into())
    };
    match outcome {
        Ok(room) => redirect(&format!("/rooms/edit?room={room}")),
        Err(e) => html(
            StatusCode::BAD_REQUEST,
            list_page(
                &state,
                &serving,
                &bare,
                &csrf,
                Some(&format!("Not created: {e}")),
            )
            .await,
        ),
    }
}

async fn create_room(
    state: &Arc<State>,
    serving: &Arc<Serving>,
    bare: &str,
    room: &str,
    fields: &Fields,
) -> Result<(), String> {
    if serving
        .store
        .room_get(room)
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err(format!("{room} exists already"));
    }
    let mut me = AsUser::open(state, serving, bare)?;
    let nick = bare.split('@').next().unwrap_or("owner").to_owned();
    let occupant = format!("{room}/{nick}");
    let join = Element::new("presence", ns::CLIENT)
        .attr("to", occupant.as_str())
        .child(Element::new("x", ns::MUC));
    let joined = me
        .send(join, |e| {
            e.name == "presence" && e.get_attr("from") == Some(occupant.as_str())
        })
        .await?;
    if joined.get_attr("type") == Some("error") {
        return Err(error_text(&joined));
    }
    let checked = |name: &str| {
        if field(fields, name) == Some("1") {
            "1"
        } else {
            "0"
        }
        .to_owned()
    };
    let form = submit_form(vec![
        (
            "muc#roomconfig_roomname".into(),
            vec![field(fields, "name").unwrap_or_default().to_owned()],
        ),
        (
            "muc#roomconfig_roomdesc".into(),
            vec![field(fields, "description").unwrap_or_default().to_owned()],
        ),
        ("muc#roomconfig_persistentroom".into(), vec!["1".into()]),
        (
            "muc#roomconfig_membersonly".into(),
            vec![checked("members_only")],
        ),
        ("muc#roomconfig_publicroom".into(), vec![checked("public")]),
    ]);
    let configured = me.iq(room, "set", form).await;
    let leave = Element::new("presence", ns::CLIENT)
        .attr("to", occupant.as_str())
        .attr("type", "unavailable");
    let _ = me
        .send(leave, |e| {
            e.name == "presence" && e.get_attr("from") == Some(occupant.as_str())
        })
        .await;
    configured.map(drop)
}

#[derive(serde::Deserialize)]
struct RoomQuery {
    room: String,
}

/// The most matches one search shows (the newest).
const SEARCH_HITS_MAX: usize = 50;
/// The longest search text taken.
const SEARCH_WORDS_MAX: usize = 200;

#[derive(serde::Deserialize)]
struct SearchQuery {
    #[serde(default)]
    room: String,
    #[serde(default)]
    q: String,
}

/// `/rooms/search`: a room's history searched by words (Lync's chat room search). A search
/// changes nothing, so it is a GET without the CSRF token; the cookie is `SameSite=Strict`,
/// so another site cannot make a user search.
async fn search_page(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    Query(q): Query<SearchQuery>,
) -> Response {
    let Some((bare, _csrf)) = session(&state, &headers).await else {
        return redirect("/rooms");
    };
    let serving = match serving(&state) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let room = q.room.trim().to_lowercase();
    let words: String = q.q.trim().chars().take(SEARCH_WORDS_MAX).collect();
    let form = format!(
        "<p><a href='/rooms'>← your rooms</a></p>         <form method='get' action='/rooms/search'>         <label>Room (name@{muc}) <input type='text' name='room' value='{room}' required></label>         <label>Words <input type='text' name='q' value='{words}' maxlength='{SEARCH_WORDS_MAX}' required></label>         <button type='submit'>Search</button></form>",
        muc = escape(&state.muc_jid),
        room = escape(&room),
        words = escape(&words),
    );
    if room.is_empty() || words.is_empty() {
        return html(StatusCode::OK, page("Search a room's history", &form));
    }
    let found = match AsUser::open(&state, &serving, &bare) {
        Ok(mut me) => me.search(&room, &words, SEARCH_HITS_MAX).await,
        Err(e) => Err(e),
    };
    let (status, results) = match found {
        Ok(search) if search.hits.is_empty() => (
            StatusCode::OK,
            "<p class='note'>No message matches.</p>".to_owned(),
        ),
        Ok(search) => {
            let mut rows = String::new();
            for h in &search.hits {
                rows.push_str(&format!(
                    "<tr><td>{at}</td><td>{nick}</td><td>{body}</td><td class='note'>{id}</td></tr>",
                    at = escape(&h.at),
                    nick = escape(&h.nick),
                    body = escape(&h.body),
                    id = escape(&h.id),
                ));
            }
            let count = if search.complete {
                match search.hits.len() {
                    1 => "1 message matches.".to_owned(),
                    n => format!("{n} messages match."),
                }
            } else {
                format!(
                    "The newest {} matches (there are more: add words to narrow the search).",
                    search.hits.len()
                )
            };
            (
                StatusCode::OK,
                format!(
                    "<p class='done'>{count}</p><table><tr><th>When (UTC)</th><th>Who</th>                     <th>Message</th><th>Id</th></tr>{rows}</table>"
                ),
            )
        }
        Err(e) => (
            StatusCode::FORBIDDEN,
            format!("<p class='error'>{}: {}</p>", escape(&room), escape(&e)),
        ),
    };
    html(
        status,
        page("Search a room's history", &format!("{form}{results}")),
    )
}

async fn edit_page(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    Query(q): Query<RoomQuery>,
) -> Response {
    let Some((bare, csrf)) = session(&state, &headers).await else {
        return redirect("/rooms");
    };
    let serving = match serving(&state) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    match room_page(&state, &serving, &bare, &csrf, &q.room, None).await {
        Ok(body) => html(StatusCode::OK, body),
        Err(e) => html(
            StatusCode::FORBIDDEN,
            list_page(
                &state,
                &serving,
                &bare,
                &csrf,
                Some(&format!("{}: {e}", q.room)),
            )
            .await,
        ),
    }
}

/// A room's settings (its owner form, rendered) and its affiliations.
async fn room_page(
    state: &Arc<State>,
    serving: &Arc<Serving>,
    bare: &str,
    csrf: &str,
    room: &str,
    message: Option<(&str, bool)>,
) -> Result<String, String> {
    let room = room.trim().to_lowercase();
    let mut me = AsUser::open(state, serving, bare)?;
    let form = me
        .iq(&room, "get", Element::new("query", ns::MUC_OWNER))
        .await?;
    let x = form
        .get_child("query", ns::MUC_OWNER)
        .and_then(|q| q.get_child("x", ns::DATA_FORMS))
        .ok_or("the room sent no settings form")?;
    let mut inputs = String::new();
    for f in x.elements().filter(|e| e.is("field", ns::DATA_FORMS)) {
        let var = f.get_attr("var").unwrap_or_default();
        let label = escape(f.get_attr("label").unwrap_or(var));
        let values: Vec<String> = f
            .elements()
            .filter(|v| v.is("value", ns::DATA_FORMS))
            .map(|v| v.text_content())
            .collect();
        let one = escape(values.first().map(String::as_str).unwrap_or_default());
        let name = escape(var);
        match f.get_attr("type").unwrap_or("text-single") {
            "hidden" | "fixed" => {}
            "boolean" => inputs.push_str(&format!(
                "<input type='hidden' name='__bool' value='{name}'><label><input type='checkbox' name='{name}' value='1'{}> {label}</label>",
                if matches!(one.as_str(), "1" | "true") { " checked" } else { "" }
            )),
            "list-single" => {
                let mut options = String::new();
                for o in f.elements().filter(|o| o.is("option", ns::DATA_FORMS)) {
                    let v = escape(&o.child_text("value", ns::DATA_FORMS).unwrap_or_default());
                    let l = escape(o.get_attr("label").unwrap_or(&v));
                    let sel = if v == one { " selected" } else { "" };
                    options.push_str(&format!("<option value='{v}'{sel}>{l}</option>"));
                }
                inputs.push_str(&format!(
                    "<label>{label} <select name='{name}'>{options}</select></label>"
                ));
            }
            "text-multi" | "jid-multi" | "list-multi" => inputs.push_str(&format!(
                "<input type='hidden' name='__multi' value='{name}'><label>{label} <textarea name='{name}'>{}</textarea></label>",
                escape(&values.join("\n"))
            )),
            "text-private" => inputs.push_str(&format!(
                "<label>{label} <input type='password' name='{name}' value='{one}'></label>"
            )),
            _ => inputs.push_str(&format!(
                "<label>{label} <input type='text' name='{name}' value='{one}'></label>"
            )),
        }
    }
    let mut people = String::new();
    for aff in ["owner", "admin", "member", "outcast"] {
        let list = me
            .iq(
                &room,
                "get",
                Element::new("query", ns::MUC_ADMIN)
                    .child(Element::new("item", ns::MUC_ADMIN).attr("affiliation", aff)),
            )
            .await;
        let Ok(list) = list else { continue };
        for item in list
            .get_child("query", ns::MUC_ADMIN)
            .map(|q| {
                q.elements()
                    .filter(|i| i.is("item", ns::MUC_ADMIN))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
        {
            let jid = escape(item.get_attr("jid").unwrap_or_default());
            people.push_str(&format!(
                "<tr><td>{jid}</td><td>{aff}</td><td><form class='inline' method='post' action='/rooms/affiliation'>\
                 <input type='hidden' name='csrf' value='{csrf}'><input type='hidden' name='room' value='{room}'>\
                 <input type='hidden' name='jid' value='{jid}'><input type='hidden' name='affiliation' value='none'>\
                 <button>Remove</button></form></td></tr>",
                csrf = escape(csrf),
                room = escape(&room),
            ));
        }
    }
    let note = message.map_or(String::new(), |(m, ok)| {
        format!(
            "<p class='{}'>{}</p>",
            if ok { "done" } else { "error" },
            escape(m)
        )
    });
    Ok(page(
        &format!("Room {room}"),
        &format!(
            "<p><a href='/rooms'>← your rooms</a> · <a href='/rooms/search?room={r}'>search its history</a></p>{note}\
             <h2>Settings</h2><form method='post' action='/rooms/edit'>\
             <input type='hidden' name='csrf' value='{csrf}'><input type='hidden' name='room' value='{r}'>\
             {inputs}<button type='submit'>Save</button></form>\
             <h2>Owners, managers, members, banned</h2><table><tr><th>User or group</th><th>Affiliation</th><th></th></tr>{people}</table>\
             <form method='post' action='/rooms/affiliation'><input type='hidden' name='csrf' value='{csrf}'>\
             <input type='hidden' name='room' value='{r}'>\
             <label>User (name@domain) or group <input type='text' name='jid' required></label>\
             <label>As <select name='affiliation'><option value='member'>member</option>\
             <option value='admin'>manager (admin)</option><option value='owner'>owner</option>\
             <option value='outcast'>banned</option></select></label><button>Add</button></form>",
            csrf = escape(csrf),
            r = escape(&room),
        ),
    ))
}

async fn edit(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    Form(fields): Form<Fields>,
) -> Response {
    let (bare, serving, csrf) = match changing(&state, &headers, &fields).await {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let room = field(&fields, "room").unwrap_or_default().to_owned();
    let booleans: Vec<&str> = fields
        .iter()
        .filter(|(k, _)| k == "__bool")
        .map(|(_, v)| v.as_str())
        .collect();
    let multi: Vec<&str> = fields
        .iter()
        .filter(|(k, _)| k == "__multi")
        .map(|(_, v)| v.as_str())
        .collect();
    let mut submit: Vec<(String, Vec<String>)> = Vec::new();
    for (k, v) in &fields {
        if matches!(k.as_str(), "csrf" | "room" | "__bool" | "__multi")
            || booleans.contains(&k.as_str())
        {
            continue;
        }
        let values = if multi.contains(&k.as_str()) {
            v.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        } else {
            vec![v.clone()]
        };
        submit.push((k.clone(), values));
    }
    for b in booleans {
        let on = field(&fields, b) == Some("1");
        submit.push((b.to_owned(), vec![if on { "1" } else { "0" }.to_owned()]));
    }
    let outcome = async {
        let mut me = AsUser::open(&state, &serving, &bare)?;
        me.iq(&room, "set", submit_form(submit)).await.map(drop)
    }
    .await;
    let message = match &outcome {
        Ok(()) => "Saved.".to_owned(),
        Err(e) => format!("Not saved: {e}"),
    };
    page_after(
        &state,
        &serving,
        &bare,
        &csrf,
        &room,
        &message,
        outcome.is_ok(),
    )
    .await
}

async fn affiliation(
    AxumState(state): AxumState<Arc<State>>,
    headers: HeaderMap,
    Form(fields): Form<Fields>,
) -> Response {
    let (bare, serving, csrf) = match changing(&state, &headers, &fields).await {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let room = field(&fields, "room").unwrap_or_default().to_owned();
    let jid = field(&fields, "jid").unwrap_or_default().trim().to_owned();
    let aff = field(&fields, "affiliation").unwrap_or_default().to_owned();
    let outcome = if jid.is_empty()
        || !matches!(
            aff.as_str(),
            "owner" | "admin" | "member" | "outcast" | "none"
        ) {
        Err("name a user or group and an affiliation".to_owned())
    } else {
        async {
            let mut me = AsUser::open(&state, &serving, &bare)?;
            let item = Element::new("item", ns::MUC_ADMIN)
                .attr("jid", jid.as_str())
                .attr("affiliation", aff.as_str());
            me.iq(
                &room,
                "set",
                Element::new("query", ns::MUC_ADMIN).child(item),
            )
            .await
            .map(drop)
        }
        .await
    };
    let message = match &outcome {
        Ok(()) => format!("{jid} is now {aff}."),
        Err(e) => format!("Not changed: {e}"),
    };
    page_after(
        &state,
        &serving,
        &bare,
        &csrf,
        &room,
        &message,
        outcome.is_ok(),
    )
    .await
}

async fn page_after(
    state: &Arc<State>,
    serving: &Arc<Serving>,
    bare: &str,
    csrf: &str,
    room: &str,
    message: &str,
    ok: bool,
) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    match room_page(state, serving, bare, csrf, room, Some((message, ok))).await {
        Ok(body) => html(status, body),
        Err(e) => html(
            StatusCode::FORBIDDEN,
            list_page(state, serving, bare, csrf, Some(&format!("{room}: {e}"))).await,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_ids_and_csrf_tokens_are_distinct_hashes() {
        let token = random_token();
        assert_eq!(token.len(), 64);
        assert_ne!(token, random_token());
        let (id, csrf) = (session_id(&token), csrf_of(&token));
        assert_eq!(id.len(), 64);
        assert_eq!(csrf.len(), 32);
        assert!(!id.starts_with(&csrf) && id != token && csrf != token[..32]);
        assert_eq!(csrf_of(&token), csrf, "every server computes the same");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=b; pchat_rooms=XYZ; c=d".parse().unwrap());
        assert_eq!(cookie_token(&h).as_deref(), Some("XYZ"));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "pchat_roomsX=1".parse().unwrap());
        assert_eq!(cookie_token(&h), None);
    }
}
