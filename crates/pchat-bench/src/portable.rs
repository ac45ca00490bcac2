//! Generates pchat portable archives (`pchat data export` format: JSON lines, then an end line
//! with counts and the SHA-256 of every line before it) for bulk loading with
//! `pchat data import`: many accounts cloned from one exported account, and one room's history
//! extended to a large message count. Filling a room with 10^6 messages through XMPP would take
//! minutes on pchat and hours on the peers (one transaction with fsyncs per message); the
//! harness loads every server in bulk instead, pchat through its supported import path and the
//! peers through SQL on their own SQLite files, each time cloning rows that the server itself
//! wrote for real messages (see `bench/run`).
//!
//! The generator reads only the template's JSON, never pchat's types: it depends on no pchat
//! crate, like the rest of the load generator.

use std::io::{BufRead as _, BufWriter, Write as _};
use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// What to generate.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// An archive written by `pchat data export`: its first user is the account template,
    /// and `--room`'s messages are the history template.
    #[arg(long)]
    pub template: std::path::PathBuf,
    /// Accounts `{prefix}{index:05}@{domain}` for index in 0..users (0 = none).
    #[arg(long, default_value_t = 0)]
    pub users: usize,
    /// Account name prefix.
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Room whose history is extended (bare JID); none = accounts only.
    #[arg(long)]
    pub room: Option<String>,
    /// Total messages the room holds after import (its exported messages come first,
    /// unchanged, so that import resumes after them).
    #[arg(long, default_value_t = 0)]
    pub messages: u64,
    /// Output file.
    #[arg(long)]
    pub out: std::path::PathBuf,
}

struct Out {
    w: BufWriter<std::fs::File>,
    hash: Sha256,
}

impl Out {
    fn line(&mut self, v: &Value) -> anyhow::Result<()> {
        let mut bytes = serde_json::to_vec(v)?;
        bytes.push(b'\n');
        self.hash.update(&bytes);
        self.w.write_all(&bytes)?;
        Ok(())
    }
}

/// Writes the archive; returns (users, rooms, messages).
pub fn generate(a: &Args) -> anyhow::Result<(u64, u64, u64)> {
    let mut user_template: Option<Value> = None;
    let mut room_line: Option<Value> = None;
    let mut messages: Vec<Value> = Vec::new();
    let input = std::io::BufReader::new(
        std::fs::File::open(&a.template).with_context(|| format!("opening {:?}", a.template))?,
    );
    for line in input.lines() {
        let v: Value = serde_json::from_str(&line?)?;
        if let Some(u) = v.get("user") {
            user_template.get_or_insert_with(|| u.clone());
        } else if let Some(r) = v.get("room") {
            if Some(r["jid"].as_str().unwrap_or("")) == a.room.as_deref() {
                room_line = Some(r.clone());
            }
        } else if let Some(m) = v.get("message") {
            if Some(m["room"].as_str().unwrap_or("")) == a.room.as_deref() {
                messages.push(m.clone());
            }
        }
    }
    let mut out = Out {
        w: BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&a.out).with_context(|| format!("creating {:?}", a.out))?,
        ),
        hash: Sha256::new(),
    };
    let (mut users, mut rooms, mut total) = (0u64, 0u64, 0u64);
    out.line(&json!({"header": {"pchat_export": 1}}))?;
    if a.users > 0 {
        let t = user_template.ok_or_else(|| anyhow!("no user in {:?}", a.template))?;
        let jid = t["jid"].as_str().unwrap_or_default();
        let domain = jid
            .split_once('@')
            .map(|(_, d)| d)
            .ok_or_else(|| anyhow!("template user {jid:?} has no domain"))?;
        for i in 0..a.users {
            let mut u = t.clone();
            // SCRAM credentials depend on the password and salt only, not on the name, so
            // every clone logs in with the template's password.
            u["jid"] = json!(format!("{}{i:05}@{domain}", a.prefix));
            out.line(&json!({ "user": u }))?;
            users += 1;
        }
    }
    if let Some(room) = &a.room {
        let r = room_line.ok_or_else(|| anyhow!("room {room} is not in {:?}", a.template))?;
        let last = messages
            .last()
            .cloned()
            .ok_or_else(|| anyhow!("room {room} has no message in {:?} to clone", a.template))?;
        if (messages.len() as u64) > a.messages {
            bail!(
                "room {room} already has {} messages, more than --messages",
                messages.len()
            );
        }
        out.line(&json!({ "room": r }))?;
        rooms += 1;
        for m in &messages {
            out.line(&json!({ "message": m }))?;
            total += 1;
        }
        let old_body = last["body"].as_str().unwrap_or_default().to_string();
        let stanza = last["stanza"].as_str().unwrap_or_default().to_string();
        let at0 = last["at"]
            .as_i64()
            .ok_or_else(|| anyhow!("message time is not an integer"))?;
        let seq0 = last["seq"].as_i64().unwrap_or(0);
        if old_body.is_empty() || !stanza.contains(&old_body) {
            bail!("template message has no body inside its stanza");
        }
        let (before, after) = stanza.split_at(stanza.find(&old_body).unwrap_or(0));
        let after = &after[old_body.len()..];
        for k in 1..=(a.messages - messages.len() as u64) {
            let n = (seq0 as u64 + k - 1) as usize;
            let body = crate::scenario::fill_body(n);
            let mut m = last.clone();
            m["seq"] = json!(seq0 + k as i64);
            // One millisecond apart, as a busy room would be; strictly increasing.
            m["at"] = json!(at0 + 1000 * k as i64);
            m["origin_id"] = Value::Null;
            m["stanza"] = json!(format!("{before}{body}{after}"));
            m["body"] = json!(body);
            out.line(&json!({ "message": m }))?;
            total += 1;
        }
    }
    let sha = out
        .hash
        .clone()
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let end = json!({"end": {"users": users, "rooms": rooms, "messages": total, "sha256": sha}});
    let mut bytes = serde_json::to_vec(&end)?;
    bytes.push(b'\n');
    out.w.write_all(&bytes)?;
    out.w.flush()?;
    Ok((users, rooms, total))
}

/// Whether `path` looks like a pchat export (for a clear error before parsing).
pub fn check_template(path: &Path) -> anyhow::Result<()> {
    let first = std::io::BufReader::new(std::fs::File::open(path)?)
        .lines()
        .next()
        .transpose()?
        .unwrap_or_default();
    if !first.contains("pchat_export") {
        bail!("{path:?} is not a pchat export (no header line)");
    }
    Ok(())
}
