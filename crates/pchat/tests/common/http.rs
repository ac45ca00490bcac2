//! HTTPS requests as a browser or a download tool makes them, through
//! `tests/interop/http_fetch.py` (Python's own HTTP client, independent of pchat's); and
//! plain `GET`s on a server's admin address (`/metrics`, the dashboard).

use std::path::{Path, PathBuf};
use std::process::Command;

/// One request to `url`, verified against the certificate `ca`; HTTP Basic with
/// `credentials` (passed in the environment, never on a command line); `extra` are more
/// http_fetch.py arguments (`--method PUT --body-file F --content-type T`). Returns its JSON
/// line: `status`, `headers`, `length`, `sha256`, `seconds`, `text`.
pub fn http_fetch(
    ca: &Path,
    url: &str,
    credentials: Option<(&str, &str)>,
    extra: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/http_fetch.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args(["--url", url, "--ca"])
        .arg(ca)
        .args(extra);
    if let Some((u, p)) = credentials {
        cmd.env("FETCH_USER", u).env("FETCH_PASSWORD", p);
    }
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "http_fetch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `GET path` over plain HTTP on an admin address (loopback): the whole response, headers
/// included, after checking it is a 200.
pub async fn admin_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut response = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_string(&mut response),
    )
    .await??;
    anyhow::ensure!(response.starts_with("HTTP/1.1 200"), "{response}");
    Ok(response)
}

/// The admin address's `/dashboard.json` (the body of [`admin_get`]).
pub async fn dashboard(addr: std::net::SocketAddr) -> anyhow::Result<serde_json::Value> {
    let response = admin_get(addr, "/dashboard.json").await?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(serde_json::from_str(body)?)
}

/// One HTTP/1.1 request over TLS (`Connection: close` in it); the whole response as text.
pub async fn https_request(addr: std::net::SocketAddr, request: String) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tls = pchat_testkit::tls_connect(addr, "localhost", Some(b"http/1.1")).await?;
    tls.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut raw),
    )
    .await;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// A form `POST` with a cookie (and `extra` header lines, each ending in CRLF).
pub fn post(path: &str, cookie: &str, extra: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nCookie: {cookie}\r\n{extra}\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A `GET` with a cookie.
pub fn get(path: &str, cookie: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nCookie: {cookie}\r\n\r\n"
    )
}

/// The `/rooms` session cookie (`name=value`) a login response sets.
pub fn session_cookie(response: &str) -> String {
    response
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned()
}

/// The CSRF token in a `/rooms` page's forms.
pub fn csrf_token(page: &str) -> String {
    page.split("name='csrf' value='")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .expect("a CSRF token")
        .to_owned()
}
