//! File sharing in rooms (XEP-0363 HTTP File Upload; Lync's file upload in a chat room).
//!
//! A client asks the upload service (`upload.<domain>`) for a slot with the file's name, size
//! and type; the service checks the size against the pool's MaxFileSizeKB, the user's quota
//! and the category rules, records an unfinished file in the store and answers two URLs on the
//! HTTP port: `PUT /upload/<id>/<token>/<name>` (the token is an HMAC of the id under the
//! store's server secret, so any server of a pool accepts it) and `GET /files/<id>/<name>`.
//! The PUT streams the body into the store in 256 KiB pieces with its SHA-256. When the owner
//! posts the GET URL in a room, the room binds the file to itself ([`attach_files`]): from then
//! on a download follows the room's rules (a members-only room or a walled category: HTTP
//! Basic with the XMPP password, and only those who may read the room), and is recorded for
//! compliance, as the upload was. Files live in the store, so every server of a pool serves
//! them, they fail over with the database, and deleting a room deletes its files.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use hmac::Mac as _;
use pchat_muc::Publish;
use pchat_room::{ComplianceKind, NewComplianceEvent};
use pchat_store::{FileCreated, FileRecord, Store, StoreError, FILE_CHUNK_BYTES};
use pchat_xmpp::{ns, Element, Node, StanzaError, StanzaErrorType};
use sha2::Digest as _;
use tracing::{debug, warn};

use crate::datetime;
use crate::state::{Serving, State};

/// Largest file name, in bytes (a common file-system limit).
const NAME_BYTES_MAX: usize = 255;
/// Largest media type, in bytes.
const CONTENT_TYPE_BYTES_MAX: usize = 127;
/// MaxFileSizeKB when the directory sets none: Lync's default, 20000 KiB.
pub const MAX_FILE_SIZE_KB_DEFAULT: u32 = 20_000;
/// Slowest an upload may go on average, in bytes per second, before it is cut off.
const UPLOAD_RATE_MIN_BYTES_PER_S: u64 = 16 * 1024;
/// Seconds a client is told to wait when every upload place is taken.
const RETRY_AFTER_S: u64 = 5;
/// Media types served as they were declared; any other is served as
/// `application/octet-stream` (never HTML or script from our origin).
const SAFE_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "audio/mpeg",
    "audio/ogg",
    "audio/mp4",
    "video/mp4",
    "video/webm",
    "application/pdf",
    "text/plain",
];

/// The service's reply to an iq addressed to it: disco#info, a slot request.
pub async fn answer_iq(
    state: &State,
    serving: &Serving,
    iq: &Element,
    bare: &str,
    joined: &HashSet<String>,
) -> Option<Element> {
    let ty = iq.get_attr("type")?;
    if ty == "result" || ty == "error" {
        return None;
    }
    let payload = iq.elements().next()?;
    let result = || {
        Element::new("iq", ns::CLIENT)
            .attr("type", "result")
            .attr_opt("id", iq.get_attr("id"))
            .attr_opt("from", iq.get_attr("to"))
            .attr_opt("to", iq.get_attr("from"))
    };
    let max_bytes = max_file_bytes(serving).await;
    Some(match (ty, payload.name.as_str(), payload.ns.as_str()) {
        ("get", "query", ns::DISCO_INFO) => result().child(
            Element::new("query", ns::DISCO_INFO)
                .child(
                    Element::new("identity", ns::DISCO_INFO)
                        .attr("category", "store")
                        .attr("type", "file")
                        .attr("name", "File sharing"),
                )
                .child(crate::local::feature(ns::DISCO_INFO))
                .child(crate::local::feature(ns::HTTP_UPLOAD))
                .child(
                    Element::new("x", ns::DATA_FORMS)
                        .attr("type", "result")
                        .child(
                            Element::new("field", ns::DATA_FORMS)
                                .attr("var", "FORM_TYPE")
                                .attr("type", "hidden")
                                .child(Element::new("value", ns::DATA_FORMS).text(ns::HTTP_UPLOAD)),
                        )
                        .child(
                            Element::new("field", ns::DATA_FORMS)
                                .attr("var", "max-file-size")
                                .child(
                                    Element::new("value", ns::DATA_FORMS)
                                        .text(max_bytes.to_string()),
                                ),
                        ),
                ),
        ),
        ("get", "query", ns::DISCO_ITEMS) => result().child(Element::new("query", ns::DISCO_ITEMS)),
        ("get", "ping", ns::PING) => result(),
        ("get", "request", ns::HTTP_UPLOAD) => {
            match slot(state, serving, payload, bare, joined, max_bytes).await {
                Ok(slot) => result().child(slot),
                Err(refusal) => refusal.reply(iq, max_bytes),
            }
        }
        _ => StanzaError::ServiceUnavailable.reply_to(iq, None),
    })
}

/// Why a slot was refused.
enum Refusal {
    BadRequest(String),
    TooLarge,
    NotAllowed(&'static str),
    Quota(u64),
    Unavailable,
}

impl Refusal {
    fn reply(self, iq: &Element, max_bytes: u64) -> Element {
        match self {
            Refusal::BadRequest(text) => StanzaError::BadRequest.reply_to_typed(
                iq,
                StanzaErrorType::Modify,
                Some(&text),
            ),
            Refusal::TooLarge => {
                let mut reply = StanzaError::NotAcceptable.reply_to_typed(
                    iq,
                    StanzaErrorType::Modify,
                    Some(&format!(
                        "the file is too large: the largest is {max_bytes} bytes"
                    )),
                );
                // XEP-0363 §5: the limit in a form clients read.
                if let Some(Node::Element(error)) = reply
                    .children
                    .iter_mut()
                    .find(|n| matches!(n, Node::Element(e) if e.name == "error"))
                {
                    error.children.push(Node::Element(
                        Element::new("file-too-large", ns::HTTP_UPLOAD).child(
                            Element::new("max-file-size", ns::HTTP_UPLOAD)
                                .text(max_bytes.to_string()),
                        ),
                    ));
                }
                reply
            }
            Refusal::NotAllowed(text) => {
                StanzaError::NotAllowed.reply_to_typed(iq, StanzaErrorType::Cancel, Some(text))
            }
            Refusal::Quota(used) => StanzaError::ResourceConstraint.reply_to_typed(
                iq,
                StanzaErrorType::Cancel,
                Some(&format!(
                    "your files take {used} bytes and this one would pass your quota: remove files you no longer need (ask an administrator: pchat file list --owner)"
                )),
            ),
            Refusal::Unavailable => StanzaError::ServiceUnavailable.reply_to_typed(
                iq,
                StanzaErrorType::Wait,
                Some("the file store is unavailable; retry shortly"),
            ),
        }
    }
}

/// The largest file users may share: the service setting MaxFileSizeKB (etcd for a pool,
/// the directory standalone), Lync's 20000 KiB when unset.
async fn max_file_bytes(serving: &Serving) -> u64 {
    let kb = serving
        .muc
        .access_now()
        .await
        .and_then(|a| a.settings().max_file_size_kb)
        .unwrap_or(MAX_FILE_SIZE_KB_DEFAULT);
    u64::from(kb) * 1024
}

/// Grants an upload slot (XEP-0363 §4).
async fn slot(
    state: &State,
    serving: &Serving,
    request: &Element,
    bare: &str,
    joined: &HashSet<String>,
    max_bytes: u64,
) -> Result<Element, Refusal> {
    let name = request
        .get_attr("filename")
        .ok_or_else(|| Refusal::BadRequest("give the file's name (filename)".into()))?;
    let name = clean_name(name).ok_or_else(|| {
        Refusal::BadRequest(format!(
            "the file name must be 1 to {NAME_BYTES_MAX} bytes without control characters"
        ))
    })?;
    let size: u64 = request
        .get_attr("size")
        .and_then(|s| s.parse().ok())
        .filter(|s| *s > 0)
        .ok_or_else(|| Refusal::BadRequest("give the file's size in bytes (size)".into()))?;
    if size > max_bytes {
        return Err(Refusal::TooLarge);
    }
    let content_type = match request.get_attr("content-type") {
        None | Some("") => "application/octet-stream".to_owned(),
        Some(t) if valid_content_type(t) => t.to_ascii_lowercase(),
        Some(_) => {
            return Err(Refusal::BadRequest(
                "content-type must be a media type such as image/png".into(),
            ))
        }
    };
    // Files are for rooms: the user must be in one whose category allows them (Lync's
    // FileUpload flag); the room a link is posted in checks again.
    let access = serving.muc.access_now().await.ok_or(Refusal::Unavailable)?;
    let mut allowed = false;
    for room in joined {
        if let Ok(Some(r)) = serving.store.room_get(room).await {
            if access.flags(&r.category).file_upload && access.allows(&r.category, bare) {
                allowed = true;
                break;
            }
        }
    }
    if !allowed {
        return Err(Refusal::NotAllowed(
            "join a room whose category allows files before sharing one",
        ));
    }
    let id = format!("{:032x}", rand::random::<u128>());
    let now = datetime::now();
    let timeout = i64::try_from(state.config.upload.slot_timeout_s).unwrap_or(300);
    let record = FileRecord {
        id: id.clone(),
        owner: bare.to_owned(),
        room: None,
        name: name.clone(),
        content_type,
        size,
        created_at: now,
        expires_at: pchat_room::Timestamp(now.0.saturating_add(timeout * 1_000_000)),
        sha256: None,
    };
    let quota = state.config.upload.user_quota_mb.saturating_mul(1 << 20);
    match serving.store.file_create(&record, quota).await {
        Ok(FileCreated::Created) => {}
        Ok(FileCreated::OverQuota { used }) => return Err(Refusal::Quota(used)),
        Err(e) => {
            warn!(error = %e, "an upload slot could not be recorded");
            return Err(Refusal::Unavailable);
        }
    }
    let secret = serving
        .server_secret()
        .await
        .map_err(|_| Refusal::Unavailable)?;
    let base = state.config.upload_base_url();
    let encoded = encode_segment(&name);
    let put = format!("{base}/upload/{id}/{}/{encoded}", put_token(secret, &id));
    let get = format!("{base}/files/{id}/{encoded}");
    Ok(Element::new("slot", ns::HTTP_UPLOAD)
        .child(Element::new("put", ns::HTTP_UPLOAD).attr("url", put))
        .child(Element::new("get", ns::HTTP_UPLOAD).attr("url", get)))
}

/// The last path component of what a client calls the file, if it is a name we can keep.
fn clean_name(name: &str) -> Option<String> {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default().trim();
    let ok = !last.is_empty()
        && last != "."
        && last != ".."
        && last.len() <= NAME_BYTES_MAX
        && !last.chars().any(char::is_control);
    ok.then(|| last.to_owned())
}

/// `type/subtype`, tokens only (no parameters: they would only be echoed back).
fn valid_content_type(t: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    t.len() <= CONTENT_TYPE_BYTES_MAX
        && t.split_once('/').is_some_and(|(a, b)| token(a) && token(b))
}

/// A file name as one URL path segment.
fn encode_segment(name: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(name, SEGMENT).to_string()
}

/// The secret part of a PUT URL: HMAC-SHA256 of the file id under the server secret, hex.
fn put_token(secret: &[u8], id: &str) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(b"pchat upload put\0");
    mac.update(id.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Whether `token` is the PUT token of `id`, compared in constant time.
fn token_ok(secret: &[u8], id: &str, token: &str) -> bool {
    let Some(given) = unhex(token) else {
        return false;
    };
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(b"pchat upload put\0");
    mac.update(id.as_bytes());
    mac.verify_slice(&given).is_ok()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A file id as the store makes them: 32 lowercase hex characters.
fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The file-sharing routes of the HTTP port.
pub fn routes() -> axum::Router<Arc<State>> {
    axum::Router::new()
        .route(
            "/upload/{id}/{token}/{*name}",
            axum::routing::put(put_file).options(preflight),
        )
        .route(
            "/files/{id}/{*name}",
            axum::routing::get(get_file).options(preflight),
        )
}

/// A plain-text answer.
fn answer(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{text}\n"),
    )
        .into_response()
}

/// Web clients (Converse.js) upload and download from another origin than the page's.
fn cors(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, PUT, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
}

async fn preflight() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    cors(r.headers_mut());
    r
}

/// `PUT /upload/<id>/<token>/<name>`: the bytes of a granted slot.
async fn put_file(
    AxState(state): AxState<Arc<State>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path((id, token, _name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut r = put_file_inner(&state, client, &id, &token, &headers, body).await;
    cors(r.headers_mut());
    r
}

async fn put_file_inner(
    state: &State,
    client: SocketAddr,
    id: &str,
    token: &str,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let Some(serving) = state.serving() else {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server is idle; upload to an active server of the pool",
        );
    };
    let Ok(_permit) = state.uploads.clone().try_acquire_owned() else {
        let mut r = answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many uploads at once; retry shortly",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        return r;
    };
    let Ok(secret) = serving.server_secret().await else {
        return answer(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable");
    };
    if !valid_id(id) || !token_ok(secret, id, token) {
        return answer(
            StatusCode::FORBIDDEN,
            "this is not an upload URL the server gave",
        );
    }
    let file = match serving.store.file_get(id).await {
        Ok(Some(f)) => f,
        Ok(None) => {
            return answer(
                StatusCode::NOT_FOUND,
                "no such upload slot (it expired and was purged); ask for a new one",
            )
        }
        Err(_) => return answer(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable"),
    };
    if file.sha256.is_some() {
        return answer(StatusCode::CONFLICT, "this file was uploaded already");
    }
    // One PUT of a slot at a time on this server: two would interleave their pieces.
    let Some(_receiving) = Receiving::claim(state, id) else {
        return answer(
            StatusCode::CONFLICT,
            "this file is being uploaded already; wait for that upload to end",
        );
    };
    if file.expires_at < datetime::now() {
        return answer(
            StatusCode::FORBIDDEN,
            "the upload slot expired; ask for a new one",
        );
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        None => {
            return answer(
                StatusCode::LENGTH_REQUIRED,
                "send Content-Length: the size the slot was asked for",
            )
        }
        Some(n) if n != file.size => {
            return answer(
                StatusCode::BAD_REQUEST,
                &format!(
                    "Content-Length {n} is not the size the slot was asked for ({})",
                    file.size
                ),
            )
        }
        Some(_) => {}
    }
    if let Some(t) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        let essence = t.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case(&file.content_type) {
            return answer(
                StatusCode::BAD_REQUEST,
                &format!(
                    "Content-Type {essence} is not the type the slot was asked for ({})",
                    file.content_type
                ),
            );
        }
    }
    let idle = Duration::from_millis(state.config.upload.idle_timeout_ms);
    let budget = idle + Duration::from_secs(file.size / UPLOAD_RATE_MIN_BYTES_PER_S);
    match tokio::time::timeout(budget, receive(&*serving.store, &file, body, idle)).await {
        Ok(Ok(sha)) => {
            debug!(%client, id, size = file.size, "file uploaded");
            let _ = sha;
            StatusCode::CREATED.into_response()
        }
        Ok(Err(r)) => r,
        Err(_) => answer(
            StatusCode::REQUEST_TIMEOUT,
            "the upload was too slow; ask for a new slot and try again",
        ),
    }
}

/// A slot whose PUT this server is receiving; released when dropped.
struct Receiving<'a> {
    state: &'a State,
    id: String,
}

impl<'a> Receiving<'a> {
    fn claim(state: &'a State, id: &str) -> Option<Receiving<'a>> {
        let mut set = state.receiving.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(id.to_owned()).then(|| Receiving {
            state,
            id: id.to_owned(),
        })
    }
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        self.state
            .receiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// Streams the body into the store piece by piece, then finishes the file.
async fn receive(
    store: &dyn Store,
    file: &FileRecord,
    body: Body,
    idle: Duration,
) -> Result<String, Response> {
    let mut stream = body.into_data_stream();
    let mut hasher = sha2::Sha256::new();
    let mut piece: Vec<u8> = Vec::with_capacity(FILE_CHUNK_BYTES.min(file.size as usize));
    let mut index = 0u32;
    let mut total = 0u64;
    let unavailable = |e: StoreError| {
        warn!(error = %e, "an upload could not be stored");
        answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "the store is unavailable; upload again",
        )
    };
    loop {
        let frame = match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => {
                return Err(answer(
                    StatusCode::REQUEST_TIMEOUT,
                    "the upload stalled; upload again",
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return Err(answer(StatusCode::BAD_REQUEST, "the upload was cut off"))
            }
            Ok(Some(Ok(bytes))) => bytes,
        };
        total += frame.len() as u64;
        if total > file.size {
            return Err(answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the body is larger than its Content-Length",
            ));
        }
        hasher.update(&frame);
        let mut rest: &[u8] = &frame;
        while !rest.is_empty() {
            let take = (FILE_CHUNK_BYTES - piece.len()).min(rest.len());
            piece.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if piece.len() == FILE_CHUNK_BYTES {
                let full = std::mem::replace(&mut piece, Vec::with_capacity(FILE_CHUNK_BYTES));
                store
                    .file_chunk_put(&file.id, index, full)
                    .await
                    .map_err(unavailable)?;
                index += 1;
            }
        }
    }
    if total != file.size {
        return Err(answer(
            StatusCode::BAD_REQUEST,
            "the body is shorter than its Content-Length",
        ));
    }
    if !piece.is_empty() {
        store
            .file_chunk_put(&file.id, index, piece)
            .await
            .map_err(unavailable)?;
    }
    let sha = hex(&hasher.finalize());
    store
        .file_finish(&file.id, &sha)
        .await
        .map_err(unavailable)?;
    Ok(sha)
}

/// `GET /files/<id>/<name>`: a finished file, to whoever may read the room it was shared in.
async fn get_file(
    AxState(state): AxState<Arc<State>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path((id, _name)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let mut r = get_file_inner(&state, client, &id, &method, &headers).await;
    cors(r.headers_mut());
    r
}

async fn get_file_inner(
    state: &State,
    client: SocketAddr,
    id: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Response {
    let Some(serving) = state.serving() else {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server is idle; download from an active server of the pool",
        );
    };
    let not_found = || answer(StatusCode::NOT_FOUND, "no such file");
    if !valid_id(id) {
        return not_found();
    }
    let file = match serving.store.file_get(id).await {
        Ok(Some(f)) if f.sha256.is_some() => f,
        Ok(_) => return not_found(),
        Err(_) => return answer(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable"),
    };
    // A link alone (a capability URL) works for `link_ttl_s` after the upload; after that,
    // and whenever the room's rules ask (members only, a category with a wall), the reader
    // signs in.
    let ttl = i64::try_from(state.config.upload.link_ttl_s).unwrap_or(i64::MAX);
    let link_live = ttl == 0
        || datetime::now().0
            < file
                .created_at
                .0
                .saturating_add(ttl.saturating_mul(1_000_000));
    let mut reader: Option<String> = None;
    if file.room.is_none() && !link_live {
        // Never posted in a room: its owner's only.
        let user = match sign_in(state, &serving, client, headers).await {
            Ok(u) => u,
            Err(r) => return r,
        };
        if user != file.owner {
            return answer(
                StatusCode::FORBIDDEN,
                "this file was never shared in a room: only its owner may download it",
            );
        }
    }
    if let Some(room_jid) = &file.room {
        let room = match serving.store.room_get(room_jid).await {
            Ok(Some(r)) => r,
            Ok(None) => return not_found(),
            Err(_) => return answer(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable"),
        };
        let Some(access) = serving.muc.access_now().await else {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "the directory is not read yet",
            );
        };
        let open = !room.config.members_only && access.open_to_everyone(&room.category);
        if !open || room.disabled || !link_live {
            let user = match sign_in(state, &serving, client, headers).await {
                Ok(u) => u,
                Err(r) => return r,
            };
            if !crate::muc::search::may_read(&room, &user, &access) {
                return answer(
                    StatusCode::FORBIDDEN,
                    "only those who may read the room this file was shared in may download it",
                );
            }
            reader = Some(user);
        }
        // The download is on record before its first byte leaves (Lync's compliance service
        // recorded file downloads).
        if method != Method::HEAD {
            let event = NewComplianceEvent {
                kind: ComplianceKind::FileDownload,
                at: datetime::now(),
                room: room_jid.clone(),
                actor: reader.unwrap_or_else(|| format!("address {}", client.ip())),
                nick: None,
                detail: file_detail(&file),
            };
            if let Err(e) = serving
                .store
                .commit(vec![pchat_store::Write::Compliance(event)])
                .await
            {
                warn!(error = %e, "a file download could not be recorded");
                return answer(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable");
            }
        }
    }
    let etag = format!("\"{}\"", file.sha256.as_deref().unwrap_or_default());
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let content_type = if SAFE_TYPES.contains(&file.content_type.as_str()) {
        file.content_type.clone()
    } else {
        "application/octet-stream".to_owned()
    };
    let disposition = format!(
        "{}; filename*=UTF-8''{}",
        if content_type.starts_with("image/")
            || content_type.starts_with("audio/")
            || content_type.starts_with("video/")
        {
            "inline"
        } else {
            "attachment"
        },
        encode_segment(&file.name)
    );
    let pieces = file.size.div_ceil(FILE_CHUNK_BYTES as u64);
    let store = serving.store.clone();
    let file_id = file.id.clone();
    let body = futures_util::stream::unfold(0u64, move |i| {
        let store = store.clone();
        let file_id = file_id.clone();
        async move {
            if i >= pieces {
                return None;
            }
            let index = u32::try_from(i).ok()?;
            match store.file_chunk_get(&file_id, index).await {
                Ok(Some(bytes)) => Some((Ok::<_, std::io::Error>(Bytes::from(bytes)), i + 1)),
                Ok(None) => Some((
                    Err(std::io::Error::other("a piece of the file is missing")),
                    pieces,
                )),
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), pieces)),
            }
        }
    });
    let mut r = Response::new(if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from_stream(body)
    });
    let h = r.headers_mut();
    let mut set = |name: header::HeaderName, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    set(header::CONTENT_TYPE, content_type);
    set(header::CONTENT_LENGTH, file.size.to_string());
    set(header::CONTENT_DISPOSITION, disposition);
    set(header::ETAG, etag);
    set(header::CACHE_CONTROL, "private, max-age=86400".into());
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff".into());
    set(
        header::CONTENT_SECURITY_POLICY,
        "sandbox; default-src 'none'".into(),
    );
    r
}

/// The user an `Authorization: Basic` header proves (the XMPP password, the login throttle),
/// or the answer to give: 401 with a challenge, 429, 503.
async fn sign_in(
    state: &State,
    serving: &Serving,
    client: SocketAddr,
    headers: &HeaderMap,
) -> Result<String, Response> {
    let Some((user, password)) = basic_credentials(headers, &state.config.domain) else {
        return Err(challenge("sign in with your chat address and password"));
    };
    if state
        .throttle
        .check(client.ip(), std::time::Instant::now())
        .is_err()
    {
        return Err(answer(
            StatusCode::TOO_MANY_REQUESTS,
            "too many wrong passwords from this address; wait and retry",
        ));
    }
    match crate::auth::check_password(state, serving, &user, &password, client.ip()).await {
        Ok(true) => Ok(user),
        Ok(false) => Err(challenge("wrong address or password")),
        Err(text) => Err(answer(
            StatusCode::SERVICE_UNAVAILABLE,
            text.unwrap_or("passwords cannot be checked now; retry shortly"),
        )),
    }
}

/// 401 asking for HTTP Basic credentials.
fn challenge(text: &str) -> Response {
    let mut r = answer(StatusCode::UNAUTHORIZED, text);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"pchat files\", charset=\"UTF-8\""),
    );
    r
}

/// The bare JID and password of an `Authorization: Basic` header; a user name without a
/// domain is in `domain`.
fn basic_credentials(headers: &HeaderMap, domain: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    let bare = if user.contains('@') {
        crate::auth::normalize_account(user, domain).ok()?
    } else {
        crate::auth::normalize_account(&format!("{user}@{domain}"), domain).ok()?
    };
    Some((bare, password.to_owned()))
}

/// What compliance records of a file say: id, name, size, type and hash.
fn file_detail(file: &FileRecord) -> String {
    serde_json::json!({
        "id": file.id,
        "name": file.name,
        "size": file.size,
        "content_type": file.content_type,
        "sha256": file.sha256,
    })
    .to_string()
}

/// The file ids a message links to (its body, XEP-0066 out-of-band data): every
/// `/files/ID/` with ID a file id, whatever the host before it, so that a link given by
/// another server of the pool (another `public_url`) is recognised too. An id that is not one
/// of the sender's files in the store is ignored by [`attach_files`].
pub fn linked_files(p: &Publish) -> Vec<String> {
    let mut ids = Vec::new();
    if let Some(text) = &p.body {
        file_ids_in(text, &mut ids);
    }
    for x in p.message.elements() {
        if x.name == "x" && x.ns == ns::OOB {
            if let Some(url) = x.child_text("url", ns::OOB) {
                file_ids_in(&url, &mut ids);
            }
        }
    }
    ids
}

/// Adds the file ids `text` links to (see [`linked_files`]) to `ids`, at most 8 in all.
pub fn file_ids_in(text: &str, ids: &mut Vec<String>) {
    const PREFIX: &str = "/files/";
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        rest = &rest[at + PREFIX.len()..];
        let followed_by_name = rest.as_bytes().get(32) == Some(&b'/');
        if let Some(id) = rest.get(..32).filter(|id| valid_id(id) && followed_by_name) {
            if !ids.iter().any(|i| i == id) && ids.len() < 8 {
                ids.push(id.to_owned());
            }
        }
    }
}

/// The files a removed message (retracted, moderated) took with it: those its stanza links to
/// that are bound to its room, with the FILEDELETION record of each, to commit with the
/// removal. Read before the removal commits; the files are deleted after it did.
pub async fn files_of_removed_message(
    store: &dyn Store,
    room_jid: &str,
    seq: i64,
    actor: &str,
) -> (Vec<String>, Vec<NewComplianceEvent>) {
    let Ok(Some(m)) = store.archive_get(room_jid, seq).await else {
        return (Vec::new(), Vec::new());
    };
    let mut ids = Vec::new();
    file_ids_in(&m.stanza, &mut ids);
    let (mut gone, mut records) = (Vec::new(), Vec::new());
    for id in ids {
        if let Ok(Some(file)) = store.file_get(&id).await {
            if file.room.as_deref() == Some(room_jid) {
                records.push(NewComplianceEvent {
                    kind: ComplianceKind::FileRemoved,
                    at: datetime::now(),
                    room: room_jid.to_owned(),
                    actor: actor.to_owned(),
                    nick: None,
                    detail: format!("with message {seq}: {}", file_detail(&file)),
                });
                gone.push(id);
            }
        }
    }
    (gone, records)
}

/// What a room does with the files a message links to, before the message is committed:
/// one that names a file of this store is refused in a category without file upload;
/// otherwise each finished file of the sender's that is not yet in a room is bound to this
/// one (within the room's quota) and its upload goes on record with the message.
pub enum Attach {
    /// Send the message, with these compliance records.
    Send(Vec<NewComplianceEvent>),
    /// Refuse it with this text.
    Refuse(&'static str),
}

/// Decides [`Attach`] for one message of `room_jid` whose category allows files or not.
pub async fn attach_files(
    store: &dyn Store,
    config: &crate::config::Config,
    room_jid: &str,
    files_allowed: bool,
    p: &Publish,
) -> Attach {
    if !config.upload.enabled {
        return Attach::Send(Vec::new());
    }
    let ids = linked_files(p);
    if ids.is_empty() {
        return Attach::Send(Vec::new());
    }
    let mut records = Vec::new();
    for id in ids {
        // Only a file of this service counts: any host's `/files/ID/` URL matches the pattern.
        let Ok(Some(file)) = store.file_get(&id).await else {
            continue;
        };
        if !files_allowed {
            return Attach::Refuse("this room's category does not allow files");
        }
        if file.sha256.is_none() || file.room.is_some() || file.owner != p.sender_bare {
            continue;
        }
        let quota = config.upload.room_quota_mb.saturating_mul(1 << 20);
        match store.file_room_bytes(room_jid).await {
            Ok(used) if used.saturating_add(file.size) > quota => {
                return Attach::Refuse("this room's files have reached their quota; ask an administrator to remove some (pchat file remove)");
            }
            Ok(_) => {}
            Err(_) => return Attach::Refuse("the file store is unavailable; send it again"),
        }
        match store.file_bind(&id, &p.sender_bare, room_jid).await {
            Ok(true) => records.push(NewComplianceEvent {
                kind: ComplianceKind::FileUpload,
                at: datetime::now(),
                room: room_jid.to_owned(),
                actor: p.sender_bare.clone(),
                nick: Some(p.nick.clone()),
                detail: file_detail(&file),
            }),
            Ok(false) => {}
            Err(_) => return Attach::Refuse("the file store is unavailable; send it again"),
        }
    }
    Attach::Send(records)
}

/// Removes the slots never finished, every minute, while `serving` lives.
pub async fn purge_unfinished(serving: std::sync::Weak<Serving>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(serving) = serving.upgrade() else {
            return;
        };
        match serving
            .store
            .file_purge_unfinished(datetime::now(), 1000)
            .await
        {
            Ok(0) => {}
            Ok(n) => debug!(files = n, "expired upload slots purged"),
            Err(e) => debug!(error = %e, "expired upload slots not purged this time"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cut_to_their_last_component() {
        assert_eq!(clean_name("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(
            clean_name("C:\\x\\report.pdf").as_deref(),
            Some("report.pdf")
        );
        assert_eq!(
            clean_name("très cool.jpg").as_deref(),
            Some("très cool.jpg")
        );
        assert_eq!(clean_name(".."), None);
        assert_eq!(clean_name("a/"), None);
        assert_eq!(clean_name("bad\nname"), None);
        assert_eq!(clean_name(&"x".repeat(256)), None);
    }

    #[test]
    fn media_types_are_checked() {
        assert!(valid_content_type("image/png"));
        assert!(valid_content_type("application/vnd.ms-excel"));
        assert!(!valid_content_type("text/html; charset=utf-8"));
        assert!(!valid_content_type("image"));
        assert!(!valid_content_type("a/b\r\nX-Evil: 1"));
    }

    #[test]
    fn links_are_found_whatever_the_host() {
        let id = "0123456789abcdef0123456789abcdef";
        let oob = Element::new("x", ns::OOB)
            .child(Element::new("url", ns::OOB).text(format!("https://b:1/files/{id}/x.png")));
        let p = Publish {
            message: Element::new("message", ns::CLIENT).child(oob),
            sender_bare: "a@x".into(),
            sender_full: "a@x/r".into(),
            nick: "a".into(),
            origin_id: None,
            body: Some(format!(
                "see https://a:5280/files/{id}/x.png, /files/{id}0/y, /files/ABC/z"
            )),
            recipients: Vec::new(),
        };
        assert_eq!(linked_files(&p), vec![id.to_owned()]);
    }

    #[test]
    fn put_tokens_are_bound_to_their_id_and_secret() {
        let t = put_token(b"secret", "0123456789abcdef0123456789abcdef");
        assert!(token_ok(b"secret", "0123456789abcdef0123456789abcdef", &t));
        assert!(!token_ok(b"other", "0123456789abcdef0123456789abcdef", &t));
        assert!(!token_ok(b"secret", "1123456789abcdef0123456789abcdef", &t));
        assert!(!token_ok(
            b"secret",
            "0123456789abcdef0123456789abcdef",
            "zz"
        ));
        assert_eq!(encode_segment("très cool.jpg"), "tr%C3%A8s%20cool.jpg");
    }
}
