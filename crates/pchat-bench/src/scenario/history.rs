//! `join-history`: time from sending a join presence to holding the requested history
//! (default 30 messages, Lync's default), for rooms pre-filled beyond that. Several joiners
//! work in parallel, each joining, reading, leaving, and joining again, so the server sees a
//! steady stream of joins rather than one.
//!
//! A join is complete when `history` delayed messages have arrived, or, if the server sends
//! fewer (a server-side cap), when the room subject arrives, which XEP-0045 §7.2.15 puts after
//! the history. The minimum history actually received is reported, so a capped server is
//! visible rather than looking fast.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use serde_json::{json, Map};
use tokio::time::Instant;

use super::{fill_room, for_each_client, join, join_stanza, leave, login_all, Client, Ctx, Report};
use crate::conn::Next;
use crate::stats::{CpuMark, Latency};
use crate::xml;

/// Parameters of the join-history scenario.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Rooms to join (round robin).
    #[arg(long, default_value_t = 2)]
    pub rooms: usize,
    /// Concurrent joiners.
    #[arg(long, default_value_t = 5)]
    pub clients: usize,
    /// Total joins.
    #[arg(long, default_value_t = 100)]
    pub joins: usize,
    /// History messages requested per join.
    #[arg(long, default_value_t = 30)]
    pub history: u32,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &Args) -> anyhow::Result<Report> {
    if a.rooms == 0 || a.clients == 0 || a.history == 0 {
        bail!("rooms, clients and history must be positive");
    }
    let rooms: Vec<String> = (0..a.rooms).map(|r| ctx.room(r)).collect();
    // The filler creates each room, writes history + 10 messages, and leaves.
    let mut filler = login_all(ctx, a.clients..a.clients + 1).await?;
    let mut f = filler.pop().expect("one filler");
    for room in &rooms {
        let deadline = Instant::now() + Duration::from_secs(120);
        join(&mut f, room, deadline).await?;
        fill_room(&mut f, room, a.history as usize + 10, 16, deadline).await?;
        leave(&mut f, room, deadline).await?;
    }
    f.w.close().await;

    let clients = login_all(ctx, 0..a.clients).await?;
    let lat = Arc::new(Mutex::new(Vec::<u32>::with_capacity(a.joins)));
    let min_history = Arc::new(AtomicU64::new(u64::MAX));
    let failures = Arc::new(AtomicU64::new(0));
    let rooms = Arc::new(rooms);
    let mark = CpuMark::start(ctx.server_pid);
    let started = Instant::now();
    let (joins, per_client, history) = (a.joins, a.clients, a.history);
    let (lat2, min2, fail2) = (lat.clone(), min_history.clone(), failures.clone());
    let clients = for_each_client(clients, a.clients, move |mut c: Client| {
        let (rooms, lat, min_history, failures) =
            (rooms.clone(), lat2.clone(), min2.clone(), fail2.clone());
        async move {
            // Joins for this client: every per_client-th join, so the total is exact.
            let mine: Vec<usize> = (c.index..joins).step_by(per_client).collect();
            for j in mine {
                let room = &rooms[j % rooms.len()];
                let deadline = Instant::now() + Duration::from_secs(30);
                match one_join(&mut c, room, history, deadline).await {
                    Ok((us, got)) => {
                        lat.lock().expect("lat lock").push(us);
                        min_history.fetch_min(got, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("  join failed: {e:#}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                leave(&mut c, room, deadline).await?;
            }
            Ok(c)
        }
    })
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = mark.stop(ctx.server_pid);
    super::close_all(clients.into_iter().map(|c| c.w).collect()).await;

    let mut samples = std::mem::take(&mut *lat.lock().expect("lat lock"));
    let l = Latency::from_us(&mut samples);
    let min_history = min_history.load(Ordering::Relaxed);
    let min_history = (min_history != u64::MAX).then_some(min_history);
    let mut detail = Map::new();
    detail.insert("rooms".into(), json!(a.rooms));
    detail.insert("clients".into(), json!(a.clients));
    detail.insert("joins".into(), json!(a.joins));
    detail.insert("history_requested".into(), json!(a.history));
    detail.insert("history_received_min".into(), json!(min_history));
    detail.insert("latency".into(), json!(l));
    detail.insert("cpu".into(), json!(cpu));
    Ok(Report {
        scenario: "join-history",
        headline: vec![
            ("p50_ms", Some(l.p50_ms), "lower"),
            ("p99_ms", Some(l.p99_ms), "lower"),
            (
                "joins_per_s",
                Some(l.n as f64 / elapsed.max(1e-6)),
                "higher",
            ),
            (
                "history_received_min",
                min_history.map(|v| v as f64),
                "higher",
            ),
            (
                "failures",
                Some(failures.load(Ordering::Relaxed) as f64),
                "lower",
            ),
            ("server_cores", cpu.server_cores, "lower"),
        ],
        detail,
    })
}

/// One join; returns (microseconds to complete history, history messages received).
async fn one_join(
    c: &mut Client,
    room: &str,
    history: u32,
    deadline: Instant,
) -> anyhow::Result<(u32, u64)> {
    let sent = Instant::now();
    c.w.send(&join_stanza(room, &c.nick, Some(history))).await?;
    let prefix = format!("{room}/");
    let me = format!("{room}/{}", c.nick);
    let mut got = 0u64;
    let mut joined = false;
    loop {
        let Some(Next::Elem(el)) = c.r.next(deadline).await? else {
            bail!("timed out after {got} history messages");
        };
        let from = xml::attr(el, "from").unwrap_or_default();
        match xml::name(el) {
            b"presence" if from == me.as_bytes() => {
                if xml::attr(el, "type") == Some(b"error") {
                    bail!("join refused: {}", xml::show(el));
                }
                joined |= xml::has_status(el, "110");
            }
            b"message" if from.starts_with(prefix.as_bytes()) || from == room.as_bytes() => {
                if xml::contains(el, b"<subject") && !xml::contains(el, b"<body") {
                    if joined {
                        break;
                    }
                } else if xml::contains(el, b"<delay") && xml::contains(el, b"<body") {
                    got += 1;
                    if got >= u64::from(history) {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    let us = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
    Ok((us, got))
}
