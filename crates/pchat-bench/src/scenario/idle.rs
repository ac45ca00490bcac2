//! `idle`: N logged-in clients, each with initial presence and joined to K rooms, doing
//! nothing. Reports the server's RSS growth per connection (from /proc/PID/status), which is
//! what bounds how many users one server can hold.
//!
//! The baseline is taken after the rooms exist but before any client connects, so room state
//! is not charged to connections; the final reading is taken after a settle time, with every
//! client still reading its socket (otherwise the server would hold undelivered presence for
//! it and we would measure buffers, not sessions).
//!
//! Clients log in and join in waves of [`WAVE`]; once `--seat-limit` seconds have passed, no
//! new wave starts, and the figure is per client seated (the report says how many), so a
//! server that logs clients in slowly yields a figure instead of running out the clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde_json::{json, Map};
use tokio::time::Instant;

use super::{create_rooms, drain_until, for_each_client, join, login_all, Ctx, Report};
use crate::stats::{rss_kib, CpuMark};

/// Parameters of the idle scenario.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Clients.
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Rooms each client joins.
    #[arg(long, default_value_t = 3)]
    pub rooms_per_client: usize,
    /// Occupants per room (so rooms = clients × rooms-per-client / occupants).
    #[arg(long, default_value_t = 20)]
    pub occupants: usize,
    /// Seconds to wait after the last join before reading RSS.
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
    /// Seconds after which no new wave of clients starts logging in (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    pub seat_limit: f64,
}

/// Clients per wave of logins and joins.
const WAVE: usize = 500;

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &Args) -> anyhow::Result<Report> {
    if a.clients == 0 || a.occupants == 0 {
        bail!("clients and occupants must be positive");
    }
    let k = a.rooms_per_client;
    let room_count = (a.clients * k).div_ceil(a.occupants).max(k.max(1));
    let rooms: Vec<String> = (0..room_count).map(|r| ctx.room(r)).collect();
    create_rooms(ctx, a.clients, &rooms).await?;
    // Let the server settle after room creation before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = ctx.server_pid.and_then(rss_kib);
    let mark = CpuMark::start(ctx.server_pid);
    let started = Instant::now();
    let rooms = Arc::new(rooms);
    // Each wave's clients read their streams from the moment they are seated: the presence
    // of later joiners must not pile up unread in the server (that would measure buffers).
    let stop = Arc::new(AtomicBool::new(false));
    let hard =
        Instant::now() + Duration::from_secs_f64(a.seat_limit.max(600.0) + 300.0 + a.settle + 60.0);
    let mut drains = Vec::with_capacity(a.clients);
    let mut writers = Vec::with_capacity(a.clients);
    let mut login_s = 0.0;
    let mut first = 0;
    while first < a.clients {
        if a.seat_limit > 0.0 && started.elapsed().as_secs_f64() > a.seat_limit {
            break;
        }
        let wave = first..(first + WAVE).min(a.clients);
        first = wave.end;
        let logins = Instant::now();
        let wave = login_all(ctx, wave).await?;
        login_s += logins.elapsed().as_secs_f64();
        let rooms = rooms.clone();
        let wave = for_each_client(wave, ctx.connect_concurrency, move |mut c| {
            let rooms = rooms.clone();
            async move {
                c.w.send("<presence/>").await?;
                let deadline = Instant::now() + Duration::from_secs(120);
                for j in 0..k {
                    // Clients rooms/k apart share a room (a room gathers one client per
                    // wave at full size), so each room ends with ~`occupants` members.
                    let room = &rooms[(c.index * k + j) % rooms.len()];
                    join(&mut c, room, deadline).await?;
                }
                Ok(c)
            }
        })
        .await?;
        for c in wave {
            drains.push(tokio::spawn(drain_until(c.r, stop.clone(), hard)));
            writers.push(c.w);
        }
    }
    let seated = writers.len();
    let joined_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let rss_after = ctx.server_pid.and_then(rss_kib);
    let cpu = mark.stop(ctx.server_pid);
    stop.store(true, Ordering::Relaxed);
    for d in drains {
        let _ = d.await;
    }
    super::close_all(writers).await;

    let per_conn_kib = match (rss_before, rss_after) {
        (Some(b), Some(a2)) => Some((a2 as f64 - b as f64) / seated.max(1) as f64),
        _ => None,
    };
    let mut detail = Map::new();
    detail.insert("clients".into(), json!(seated));
    detail.insert("clients_asked".into(), json!(a.clients));
    if seated < a.clients {
        detail.insert(
            "seat_limit_note".into(),
            json!(format!(
                "{seated} of {} clients seated within the {} s seat limit",
                a.clients, a.seat_limit
            )),
        );
    }
    detail.insert("rooms".into(), json!(room_count));
    detail.insert("rooms_per_client".into(), json!(k));
    detail.insert("rss_before_kib".into(), json!(rss_before));
    detail.insert("rss_after_kib".into(), json!(rss_after));
    detail.insert("login_s".into(), json!(super::round3(login_s)));
    detail.insert("login_and_join_s".into(), json!(super::round3(joined_s)));
    detail.insert("cpu".into(), json!(cpu));
    Ok(Report {
        scenario: "idle",
        headline: vec![
            ("rss_per_client_kib", per_conn_kib, "lower"),
            ("clients_seated", Some(seated as f64), "higher"),
            (
                "logins_per_s",
                Some(seated as f64 / login_s.max(1e-6)),
                "higher",
            ),
            ("login_and_join_s", Some(joined_s), "lower"),
            (
                "server_rss_mib",
                rss_after.map(|k| k as f64 / 1024.0),
                "lower",
            ),
        ],
        detail,
    })
}
