//! The independent clients' scenarios (`tests/interop/*.py` with slixmpp, `tests/web/*.py`
//! with Playwright): run one, fail with its output when it fails, and read the one JSON
//! line it prints on success.

use std::path::PathBuf;
use std::process::Command;

/// Runs `python3 <repo>/<script> <args>`; its last line starting with `{`, parsed.
pub async fn run(script: &str, args: Vec<String>) -> anyhow::Result<serde_json::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(script);
    let out =
        tokio::task::spawn_blocking(move || Command::new("python3").arg(path).args(args).output())
            .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("{}");
    Ok(serde_json::from_str(line)?)
}

/// Whether python3 can import `module`.
pub fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
