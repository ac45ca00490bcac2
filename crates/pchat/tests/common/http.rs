//! HTTPS requests as a browser or a download tool makes them, through
//! `tests/interop/http_fetch.py` (Python's own HTTP client, independent of pchat's).

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
