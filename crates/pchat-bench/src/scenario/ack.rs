//! `ack`: what a user feels when pressing Enter at low load. One sender sends a message,
//! waits for its own reflection (the server's acknowledgement: all three servers archive the
//! message before reflecting it), pauses, and repeats; a few other occupants just read.
//! Closed loop by design: this is latency without queueing, the floor under every other
//! figure, dominated by the archive commit (an fsync on all three servers).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde_json::{json, Map};
use tokio::time::Instant;

use super::{create_rooms, drain_until, for_each_client, join, login_all, Ctx, Report};
use crate::conn::Next;
use crate::stats::{CpuMark, Latency};
use crate::xml;

/// Parameters of the ack scenario.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Messages to send.
    #[arg(long, default_value_t = 200)]
    pub messages: usize,
    /// Pause between a reflection and the next send, milliseconds.
    #[arg(long, default_value_t = 20)]
    pub interval_ms: u64,
    /// Occupants besides the sender.
    #[arg(long, default_value_t = 4)]
    pub listeners: usize,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &Args) -> anyhow::Result<Report> {
    if a.messages == 0 {
        bail!("messages must be positive");
    }
    let room = ctx.room(0);
    let n = a.listeners + 1;
    create_rooms(ctx, n, std::slice::from_ref(&room)).await?;
    let clients = login_all(ctx, 0..n).await?;
    let room2 = room.clone();
    let mut clients = for_each_client(clients, ctx.connect_concurrency, move |mut c| {
        let room = room2.clone();
        async move {
            join(&mut c, &room, Instant::now() + Duration::from_secs(60)).await?;
            Ok(c)
        }
    })
    .await?;
    let mut sender = clients.remove(0);
    let stop = Arc::new(AtomicBool::new(false));
    let hard = Instant::now()
        + Duration::from_secs(30)
        + Duration::from_millis(a.interval_ms + 1000).saturating_mul(a.messages as u32);
    let mut drains = Vec::new();
    let mut writers = Vec::new();
    for c in clients {
        drains.push(tokio::spawn(drain_until(c.r, stop.clone(), hard)));
        writers.push(c.w);
    }

    let me = format!("{room}/{}", sender.nick);
    let mut samples = Vec::with_capacity(a.messages);
    let mut timeouts = 0usize;
    let mark = CpuMark::start(ctx.server_pid);
    for k in 0..a.messages {
        let id = format!("a{k}");
        let started = Instant::now();
        sender
            .w
            .send(&format!(
                "<message to='{room}' type='groupchat' id='{id}'><body>ack {k}</body></message>"
            ))
            .await?;
        let deadline = started + Duration::from_secs(10);
        let mut got = false;
        while let Some(Next::Elem(el)) = sender.r.next(deadline).await? {
            if xml::name(el) == b"message" && xml::attr(el, "from") == Some(me.as_bytes()) {
                if xml::attr(el, "type") == Some(b"error") {
                    bail!("message refused: {}", xml::show(el));
                }
                let body = xml::child_text(el, "body").unwrap_or_default();
                if body == format!("ack {k}").as_bytes() {
                    got = true;
                    break;
                }
            }
        }
        if got {
            samples.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
        } else {
            timeouts += 1;
        }
        tokio::time::sleep(Duration::from_millis(a.interval_ms)).await;
    }
    let cpu = mark.stop(ctx.server_pid);
    stop.store(true, Ordering::Relaxed);
    for d in drains {
        let _ = d.await;
    }
    writers.push(sender.w);
    super::close_all(writers).await;

    let l = Latency::from_us(&mut samples);
    let mut detail = Map::new();
    detail.insert("messages".into(), json!(a.messages));
    detail.insert("listeners".into(), json!(a.listeners));
    detail.insert("interval_ms".into(), json!(a.interval_ms));
    detail.insert("latency".into(), json!(l));
    detail.insert("cpu".into(), json!(cpu));
    Ok(Report {
        scenario: "ack",
        headline: vec![
            ("p50_ms", Some(l.p50_ms), "lower"),
            ("p99_ms", Some(l.p99_ms), "lower"),
            ("max_ms", Some(l.max_ms), "lower"),
            ("timeouts", Some(timeouts as f64), "lower"),
        ],
        detail,
    })
}
