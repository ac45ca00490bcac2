//! The web client on the HTTP port: `GET /` is a page that starts Converse.js configured for
//! this server (its WebSocket on the same origin, its domain and rooms service, bookmarks,
//! the archive, stream management), `GET /converse/...` its files. The files are Converse.js's
//! release (`scripts/fetch-converse` brings them into `web/converse/`; a package installs
//! them in `/usr/share/pchat/web/converse`); without them `/` says how to get them.
//!
//! Files are served from that one directory only: a path is plain names (letters, digits,
//! `.`, `-`, `_`; no `..`, no hidden names), and neither it nor a directory on the way may be
//! a symbolic link, so nothing outside the directory is ever read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State as AxumState};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::config::Config;
use crate::state::State;

/// Where the Converse.js files are looked for when `web_dir` is not set, first found first.
fn candidates() -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("/usr/share/pchat/web/converse")];
    // target/{debug,release}/pchat in a checkout: the checkout's web/converse.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            out.push(dir.join("web/converse"));
        }
    }
    out.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../web/converse"
    )));
    out
}

/// The directory of the Converse.js files, when there is one.
pub fn converse_dir(config: &Config) -> Option<PathBuf> {
    if !config.web_dir.is_empty() {
        let dir = PathBuf::from(&config.web_dir);
        return dir.join("converse.min.js").is_file().then_some(dir);
    }
    candidates()
        .into_iter()
        .find(|d| d.join("converse.min.js").is_file())
}

#[derive(Clone)]
struct Web {
    state: Arc<State>,
    dir: Option<Arc<PathBuf>>,
}

/// `/` and `/converse/...` for the HTTP port's router.
pub fn routes(state: Arc<State>) -> axum::Router<Arc<State>> {
    let dir = converse_dir(&state.config).map(Arc::new);
    match &dir {
        Some(d) => tracing::info!(dir = %d.display(), "web client (Converse.js) at /"),
        None => tracing::info!(
            "no web client files: run scripts/fetch-converse (or set web_dir) to serve Converse.js at /"
        ),
    }
    let web = Web { state, dir };
    axum::Router::new()
        .route("/", get(index))
        .route("/converse/{*path}", get(asset))
        .with_state(web)
}

async fn index(AxumState(web): AxumState<Web>) -> Response {
    let config = &web.state.config;
    if web.dir.is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Html(format!(
                "<!doctype html><html lang='en'><meta charset='utf-8'><title>pchat</title>\
                 <p>pchat serves <b>{}</b>. Its web client is not installed: run \
                 <code>scripts/fetch-converse</code> in pchat's checkout (or set \
                 <code>web_dir</code>), then restart <code>pchat serve</code>. Any XMPP \
                 client works meanwhile.</p></html>",
                escape_html(&config.domain)
            )),
        )
            .into_response();
    }
    let settings = serde_json::json!({
        "assets_path": "/converse/",
        "discover_connection_methods": false,
        "view_mode": "fullscreen",
        "i18n": "en",
        "locked_domain": config.domain,
        "muc_domain": web.state.muc_jid,
        // Room search in the "add groupchat" box asks this server's MUC service (never
        // Converse.js's default, a public directory elsewhere).
        "muc_search_service": web.state.muc_jid,
        "allow_bookmarks": true,
        "auto_reconnect": true,
        "enable_smacks": true,
        "persistent_store": "IndexedDB",
        "show_client_info": false,
        "allow_registration": false,
        // End-to-end encryption hides messages from the archive, search and compliance a
        // persistent chat room exists for.
        "blacklisted_plugins": ["converse-omemo"],
    });
    let page = format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="/converse/converse.min.css">
<script type="module" src="/converse/converse.min.js"></script>
</head>
<body class="converse-fullscreen">
<noscript>The web client needs JavaScript; any XMPP client works too.</noscript>
<script type="module">
const settings = {settings};
settings.websocket_url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/xmpp-websocket";
converse.initialize(settings);
</script>
</body>
</html>
"#,
        title = escape_html(&format!("pchat — {}", config.domain)),
        // JSON in a script element: `<` escaped so no value can close the element.
        settings = settings.to_string().replace('<', "\\u003c"),
    );
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // Everything from this server: no third-party requests from users' browsers
            // (Converse.js shows its sponsors' logos from conversejs.org otherwise), no
            // framing.
            (header::CONTENT_SECURITY_POLICY, CSP),
        ],
        Html(page),
    )
        .into_response()
}

async fn asset(AxumState(web): AxumState<Web>, UrlPath(path): UrlPath<String>) -> Response {
    let Some(dir) = web.dir else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(file) = resolve(&dir, &path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match tokio::fs::read(&file).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, content_type(&file)),
                (header::CACHE_CONTROL, "public, max-age=3600"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `path` inside `dir`, when it is plain names and no part of it is a link.
fn resolve(dir: &Path, path: &str) -> Option<PathBuf> {
    let mut at = dir.to_path_buf();
    let parts: Vec<&str> = path.split('/').collect();
    if parts.is_empty() || parts.len() > 8 {
        return None;
    }
    for part in parts {
        let plain = !part.is_empty()
            && !part.starts_with('.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !plain {
            return None;
        }
        at.push(part);
        let meta = std::fs::symlink_metadata(&at).ok()?;
        if meta.file_type().is_symlink() {
            return None;
        }
    }
    std::fs::symlink_metadata(&at).ok()?.is_file().then_some(at)
}

/// The page's content security policy. Inline script and styles: the settings script and
/// Converse.js's own style attributes.
const CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; \
                   style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; \
                   media-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn content_type(file: &Path) -> &'static str {
    match file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
    {
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "eot" => "application/vnd.ms-fontobject",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// `s` as HTML text or a quoted attribute value.
pub(crate) fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_inside_the_directory_resolve() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/logo.svg"), "<svg/>").unwrap();
        std::fs::write(dir.path().join("converse.min.js"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("passwd")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
        assert!(resolve(dir.path(), "converse.min.js").is_some());
        assert!(resolve(dir.path(), "images/logo.svg").is_some());
        for bad in [
            "../converse.min.js",
            "images/../converse.min.js",
            ".hidden",
            "passwd",
            "etc/passwd",
            "images",
            "",
            "images//logo.svg",
            "a%2e%2e",
            "images/logo.svg/x",
        ] {
            assert!(resolve(dir.path(), bad).is_none(), "{bad} resolved");
        }
    }
}
