//! `lync`: Lync Server 2013 Persistent Chat's capacity model, scaled to one machine. Every
//! user is logged in and sits in 24 rooms: small rooms of 30, two medium rooms of 150, and the
//! first `--large` users also in one large room. Over the whole population, users rejoin a
//! room (leave, join) at `--joins-per-s` and post at `--messages-per-s` (Lync's planning
//! figures for 80,000 users: 10 joins/s, 24 messages/s). The user count steps up
//! (`--steps`); a step holds when message delivery p99 and join p99 are under `--p99-ms`,
//! at least 99% of the expected deliveries arrive and the server returns no error. The run
//! stops at the first step that does not hold and reports the largest that did.
//!
//! One process may hold at most ~20,000 open files here, and the brief's target is 19,000
//! users on one server, so the clients live in worker processes (this same binary, run as
//! `lync-worker`), each with at most `--users-per-worker` connections and its own range of
//! loopback source addresses. Workers are added as the steps grow; those of earlier steps keep
//! their users connected. The coordinator (this process) creates the rooms, starts workers,
//! tells every worker when to measure, and merges their samples. Workers and coordinator talk
//! JSON lines over the workers' stdin and stdout. Latency crosses processes, so message bodies
//! carry the scheduled send time on the wall clock (`SystemTime`, µs since the epoch; every
//! process reads the same kernel clock).
//!
//! A pool (several `--server`): user u logs in to server u mod N, as Lync's load balancer
//! spreads a pool's users, so every room has occupants on every server; room creators are
//! spread the same way. Server CPU and RSS are summed over every `--server-pid`, and with
//! `--db-pid` (the PostgreSQL postmaster) the database's CPU and proportional memory (PSS,
//! so shared buffers count once) over the postmaster and its backends are reported apart.
//!
//! Room layout (a pure function of the user index, so growing never moves a user): for small
//! slot j (21 of them, 22 for users outside the large room), user u is in group
//! (u + 11j mod 30) / 30, i.e. 30 consecutive users shifted per slot so rooms mix; medium
//! slots work the same with 150 and an offset of 53j mod 150.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{join, leave, login_all, Client, Ctx, Report};
use crate::conn::{Next, Reader, Transport, Writer};
use crate::stats::{cpu_seconds, rss_kib, CpuMark, Latency};
use crate::xml;

/// Rooms each user sits in (Lync's planning figure).
pub const ROOMS_PER_USER: usize = 24;
const SMALL: usize = 30;
const MEDIUM: usize = 150;
const MEDIUM_SLOTS: usize = 2;

/// Parameters of the Lync capacity scenario (coordinator).
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// User counts to try, rising; the run stops at the first that does not hold.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,5000,10000,19000"
    )]
    pub steps: Vec<usize>,
    /// Members of the large room (the first N users; fewer while the population is smaller).
    #[arg(long, default_value_t = 1000)]
    pub large: usize,
    /// Messages per second over the whole population.
    #[arg(long, default_value_t = 24.0)]
    pub messages_per_s: f64,
    /// Room rejoins (leave, then join) per second over the whole population.
    #[arg(long, default_value_t = 10.0)]
    pub joins_per_s: f64,
    /// Unmeasured load before each measured window, seconds.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Measured window per step, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Wait for deliveries after the last send, seconds.
    #[arg(long, default_value_t = 3.0)]
    pub drain: f64,
    /// A step holds if message and join p99 stay under this, ms.
    #[arg(long, default_value_t = 200.0)]
    pub p99_ms: f64,
    /// Most connections per worker process (one process may open at most ~20,000 files).
    #[arg(long, default_value_t = 5000)]
    pub users_per_worker: usize,
    /// Most worker processes (at most 250: each has its own 250 loopback source addresses).
    #[arg(long, default_value_t = 20)]
    pub workers_max: usize,
    /// Runtime threads per worker.
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    /// Longest time to log in and seat the users a step adds (and create its rooms), seconds;
    /// a step that cannot be set up in time does not hold.
    #[arg(long, default_value_t = 300.0)]
    pub setup_timeout: f64,
    /// Stop stepping up once this much time has passed, seconds.
    #[arg(long, default_value_t = 1200.0)]
    pub budget: f64,
    /// Register the accounts a step needs by in-band registration first (peers); pchat's
    /// accounts are imported by the harness.
    #[arg(long)]
    pub register: bool,
    /// Connections creating rooms at once.
    #[arg(long, default_value_t = 16)]
    pub create_parallel: usize,
    /// PostgreSQL postmaster of a pool's database: its CPU and memory (with its backends) are
    /// reported apart from the servers'.
    #[arg(long)]
    pub db_pid: Option<u32>,
}

/// The servers users are spread over (one, or a pool's), and their processes.
#[derive(Clone, Debug, Default)]
pub struct Servers {
    /// STARTTLS addresses; user u logs in to `addrs[u % addrs.len()]`. Empty or one: the
    /// context's target for everyone.
    pub addrs: Vec<std::net::SocketAddr>,
    /// Server processes whose CPU and RSS are summed.
    pub pids: Vec<u32>,
}

impl Servers {
    /// The target user `u` logs in to.
    fn target_for(&self, ctx: &Ctx, u: usize) -> crate::conn::Target {
        let mut t = ctx.target.clone();
        if self.addrs.len() > 1 && matches!(t.transport, Transport::Starttls) {
            t.addr = self.addrs[u % self.addrs.len()];
        }
        t
    }
}

/// Logs in users `range` like [`login_all`], each to its own server of `servers`.
async fn login_spread(
    ctx: &Ctx,
    servers: &Servers,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<Client>> {
    if servers.addrs.len() <= 1 {
        return login_all(ctx, range).await;
    }
    let sem = Arc::new(Semaphore::new(ctx.connect_concurrency.max(1)));
    let mut set = JoinSet::new();
    for i in range.clone() {
        let target = servers.target_for(ctx, i);
        let user = ctx.user(i);
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            super::login_one(&target, user, i).await
        });
    }
    let mut clients = Vec::with_capacity(range.len());
    while let Some(res) = set.join_next().await {
        clients.push(res??);
    }
    clients.sort_by_key(|c| c.index);
    Ok(clients)
}

/// CPU seconds and RSS (KiB) summed over `pids`; `None` when none can be read.
fn sum_cpu(pids: &[u32]) -> Option<f64> {
    let v: Vec<f64> = pids.iter().filter_map(|&p| cpu_seconds(p)).collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

fn sum_rss(pids: &[u32]) -> Option<u64> {
    let v: Vec<u64> = pids.iter().filter_map(|&p| rss_kib(p)).collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// `/proc/PID/stat` fields after the command name (state is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The postmaster and its live children (the backends, the WAL writer, the checkpointer…).
fn process_tree(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid != root && stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(root)
        {
            out.push(pid);
        }
    }
    out
}

/// CPU seconds of the database: the live processes of the tree plus the children the
/// postmaster has already reaped (cutime + cstime).
fn db_cpu_seconds(root: u32) -> Option<f64> {
    let f = stat_fields(root)?;
    let reaped: f64 = [13, 14]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<f64>().ok())
        .sum::<f64>()
        / 100.0;
    Some(reaped + sum_cpu(&process_tree(root)).unwrap_or(0.0))
}

/// Proportional set size of the database's processes, KiB (shared buffers counted once).
fn db_pss_kib(root: u32) -> Option<u64> {
    let v: Vec<u64> = process_tree(root)
        .into_iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok()?;
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// Parameters of one worker process (internal: started by the coordinator).
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// First user index (of the whole population).
    #[arg(long)]
    pub first: usize,
    /// Users this worker holds.
    #[arg(long)]
    pub count: usize,
    /// Members of the large room.
    #[arg(long)]
    pub large: usize,
    /// Worker number, for message ids.
    #[arg(long)]
    pub worker: usize,
}

/// A room of the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RoomId {
    /// Small slot, group.
    Small(usize, usize),
    /// Medium slot, group.
    Medium(usize, usize),
    /// The large room.
    Large,
}

fn small_offset(slot: usize) -> usize {
    (slot * 11) % SMALL
}

fn medium_offset(slot: usize) -> usize {
    (slot * 53) % MEDIUM
}

/// The 24 rooms of user `u`.
pub fn rooms_of(u: usize, large: usize) -> Vec<RoomId> {
    let mut out = Vec::with_capacity(ROOMS_PER_USER);
    let small_slots = if u < large {
        ROOMS_PER_USER - MEDIUM_SLOTS - 1
    } else {
        ROOMS_PER_USER - MEDIUM_SLOTS
    };
    for j in 0..small_slots {
        out.push(RoomId::Small(j, (u + small_offset(j)) / SMALL));
    }
    for j in 0..MEDIUM_SLOTS {
        out.push(RoomId::Medium(j, (u + medium_offset(j)) / MEDIUM));
    }
    if u < large {
        out.push(RoomId::Large);
    }
    out
}

/// Members of `room` when users 0..n are seated.
pub fn occupancy(room: RoomId, n: usize, large: usize) -> usize {
    let span = |size: usize, offset: usize, group: usize, min_user: usize| {
        let lo = (group * size).saturating_sub(offset).max(min_user);
        let hi = (group * size + size).saturating_sub(offset).min(n);
        hi.saturating_sub(lo)
    };
    match room {
        RoomId::Small(j, g) => {
            let min_user = if j == ROOMS_PER_USER - MEDIUM_SLOTS - 1 {
                large
            } else {
                0
            };
            span(SMALL, small_offset(j), g, min_user)
        }
        RoomId::Medium(j, g) => span(MEDIUM, medium_offset(j), g, 0),
        RoomId::Large => n.min(large),
    }
}

fn room_jid(ctx: &Ctx, r: RoomId) -> String {
    match r {
        RoomId::Small(j, g) => format!("{}-s{j}-{g}@{}", ctx.room_prefix, ctx.muc),
        RoomId::Medium(j, g) => format!("{}-m{j}-{g}@{}", ctx.room_prefix, ctx.muc),
        RoomId::Large => format!("{}-large@{}", ctx.room_prefix, ctx.muc),
    }
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Messages between coordinator and workers.
// ---------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Command {
    Measure {
        step: u32,
        population: usize,
        messages_per_s: f64,
        joins_per_s: f64,
        start_us: u64,
        warmup: f64,
        duration: f64,
        drain: f64,
    },
    Quit,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct Ready {
    ok: bool,
    error: Option<String>,
    /// When the worker's last login finished (logins and joins overlap: each user joins its
    /// rooms right after its own login).
    login_s: f64,
    /// The rest of the set-up, after the last login.
    seat_s: f64,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct StepResult {
    step: u32,
    sent: u64,
    expected: u64,
    delivered: u64,
    errors: u64,
    closed: u64,
    skipped: u64,
    joins: u64,
    msg_us: Vec<u32>,
    join_us: Vec<u32>,
    first_error: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Worker.
// ---------------------------------------------------------------------------------------------

/// What the readers of one worker record.
#[derive(Default)]
struct Shared {
    step: AtomicU32,
    delivered: AtomicU64,
    errors: AtomicU64,
    closed: AtomicU64,
    msg_us: Mutex<Vec<u32>>,
    join_us: Mutex<Vec<u32>>,
    first_error: Mutex<Option<String>>,
}

/// One seated user as the scheduler sees it.
struct Seat {
    index: usize,
    nick: String,
    w: Arc<tokio::sync::Mutex<Writer>>,
    /// A rejoin in flight: (room/nick, send time µs); the reader clears it on arrival.
    rejoin: Arc<Mutex<Option<(String, u64)>>>,
}

/// Sends the 24 join presences at once and waits for the 24 own presences.
async fn seat(c: &mut Client, rooms: &[String], deadline: Instant) -> anyhow::Result<()> {
    let mut batch = String::from("<presence/>");
    for r in rooms {
        batch.push_str(&super::join_stanza(r, &c.nick, None));
    }
    c.w.send(&batch).await?;
    let mut pending: BTreeSet<String> = rooms.iter().map(|r| format!("{r}/{}", c.nick)).collect();
    while !pending.is_empty() {
        let Some(n) = c.r.next(deadline).await? else {
            bail!(
                "timed out seating {}: {} of {} joins unanswered",
                c.nick,
                pending.len(),
                rooms.len()
            );
        };
        let Next::Elem(el) = n else {
            bail!("stream closed while seating {}", c.nick);
        };
        if xml::name(el) != b"presence" {
            continue;
        }
        let Some(from) = xml::attr(el, "from") else {
            continue;
        };
        let from = String::from_utf8_lossy(from).into_owned();
        if !pending.contains(&from) {
            continue;
        }
        if xml::attr(el, "type") == Some(b"error") {
            bail!("join refused: {}", xml::show(el));
        }
        if xml::has_status(el, "110") {
            pending.remove(&from);
        }
    }
    Ok(())
}

/// Parses `L step measured sched_us …` bodies.
fn parse_body(el: &[u8]) -> Option<(u32, bool, u64)> {
    let body = xml::child_text(el, "body")?;
    let mut it = body.split(|&b| b == b' ');
    if it.next()? != b"L" {
        return None;
    }
    let num = |s: &[u8]| std::str::from_utf8(s).ok()?.parse::<u64>().ok();
    let step = num(it.next()?)? as u32;
    let measured = it.next()? == b"1";
    let sched = num(it.next()?)?;
    Some((step, measured, sched))
}

async fn read_loop(
    mut r: Reader,
    shared: Arc<Shared>,
    rejoin: Arc<Mutex<Option<(String, u64)>>>,
    stop: Arc<AtomicBool>,
) {
    let tick = Duration::from_millis(500);
    while !stop.load(Ordering::Relaxed) {
        let el = match r.next(Instant::now() + tick).await {
            Ok(Some(Next::Elem(el))) => el,
            Ok(None) => continue,
            Ok(Some(Next::Closed)) | Err(_) => {
                shared.closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let now = wall_us();
        let kind = xml::attr(el, "type");
        if kind == Some(b"error") {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            let mut first = shared.first_error.lock().expect("lock");
            if first.is_none() {
                *first = Some(xml::show(el));
            }
            continue;
        }
        match xml::name(el) {
            b"message" if kind == Some(b"groupchat") => {
                if let Some((step, measured, sched)) = parse_body(el) {
                    if measured && step == shared.step.load(Ordering::Relaxed) {
                        shared.delivered.fetch_add(1, Ordering::Relaxed);
                        let us = now.saturating_sub(sched).min(u32::MAX as u64) as u32;
                        shared.msg_us.lock().expect("lock").push(us);
                    }
                }
            }
            b"presence" if kind.is_none() && xml::has_status(el, "110") => {
                let mut slot = rejoin.lock().expect("lock");
                if let Some((me, sent)) = slot.as_ref() {
                    if xml::attr(el, "from") == Some(me.as_bytes()) {
                        let us = now.saturating_sub(*sent).min(u32::MAX as u64) as u32;
                        shared.join_us.lock().expect("lock").push(us);
                        *slot = None;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Runs a worker: seats its users, then obeys commands on stdin until `quit` or EOF.
pub async fn worker(ctx: &Ctx, a: &WorkerArgs, servers: &Servers) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut ready = Ready {
        ok: true,
        ..Ready::default()
    };
    let shared = Arc::new(Shared::default());
    let stop = Arc::new(AtomicBool::new(false));
    let setup = async {
        // One task per user: log in, seat, then read for good, at most `connect_concurrency`
        // users at a time. Logging a whole worker in before seating anyone left thousands of
        // logged-in clients unread for minutes: they answered no XEP-0199 ping, and the
        // servers rightly dropped them ("stream closed while seating", 2026-12-06).
        let sem = Arc::new(Semaphore::new(ctx.connect_concurrency.max(1)));
        let last_login = Arc::new(Mutex::new(0.0f64));
        let mut set = JoinSet::new();
        for i in a.first..a.first + a.count {
            let target = servers.target_for(ctx, i);
            let user = ctx.user(i);
            // `index` is relative to the user offset; rooms and nicks use it as is.
            let rooms: Vec<String> = rooms_of(i, a.large)
                .into_iter()
                .map(|r| room_jid(ctx, r))
                .collect();
            let (sem, shared, stop) = (sem.clone(), shared.clone(), stop.clone());
            let last_login = last_login.clone();
            set.spawn(async move {
                let _permit = sem.acquire_owned().await.expect("semaphore open");
                let mut c = super::login_one(&target, user, i).await?;
                {
                    let mut l = last_login.lock().expect("login clock");
                    *l = l.max(started.elapsed().as_secs_f64());
                }
                seat(&mut c, &rooms, Instant::now() + Duration::from_secs(120)).await?;
                // Read from now on: a seated user gets the presence of everyone who joins its
                // rooms later. Left unread until the whole worker is seated, that piled up in
                // the sockets (gigabytes at 19,000 users, minutes of seating) and the first
                // measured window waited behind it.
                let rejoin = Arc::new(Mutex::new(None));
                let reader = tokio::spawn(read_loop(c.r, shared, rejoin.clone(), stop));
                let seat = Seat {
                    index: c.index,
                    nick: c.nick,
                    w: Arc::new(tokio::sync::Mutex::new(c.w)),
                    rejoin,
                };
                anyhow::Ok((seat, reader))
            });
        }
        let mut seats = Vec::with_capacity(a.count);
        let mut readers = Vec::with_capacity(a.count);
        while let Some(r) = set.join_next().await {
            let (seat, reader) = r??;
            seats.push(seat);
            readers.push(reader);
        }
        seats.sort_by_key(|s| s.index);
        let login_s = *last_login.lock().expect("login clock");
        anyhow::Ok((seats, readers, login_s))
    };
    let (seats, readers) = match setup.await {
        Ok((seats, readers, login_s)) => {
            ready.login_s = login_s;
            ready.seat_s = started.elapsed().as_secs_f64() - login_s;
            (seats, readers)
        }
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            ready.ok = false;
            ready.error = Some(format!("{e:#}"));
            println!("{}", serde_json::to_string(&ready)?);
            return Ok(());
        }
    };
    println!("{}", serde_json::to_string(&ready)?);
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        let cmd: Command = serde_json::from_str(&line).context("worker command")?;
        match cmd {
            Command::Quit => break,
            Command::Measure {
                step,
                population,
                messages_per_s,
                joins_per_s,
                start_us,
                warmup,
                duration,
                drain,
            } => {
                let share = seats.len() as f64 / population.max(1) as f64;
                let r = measure(
                    ctx,
                    a,
                    &seats,
                    &shared,
                    MeasureSpec {
                        step,
                        population,
                        messages_per_s: messages_per_s * share,
                        joins_per_s: joins_per_s * share,
                        start_us,
                        warmup,
                        duration,
                        drain,
                    },
                )
                .await;
                println!("{}", serde_json::to_string(&r)?);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut writers = Vec::new();
    for s in seats {
        if let Ok(m) = Arc::try_unwrap(s.w) {
            writers.push(m.into_inner());
        }
    }
    super::close_all(writers).await;
    for r in readers {
        r.abort();
    }
    Ok(())
}

struct MeasureSpec {
    step: u32,
    population: usize,
    messages_per_s: f64,
    joins_per_s: f64,
    start_us: u64,
    warmup: f64,
    duration: f64,
    drain: f64,
}

async fn measure(
    ctx: &Ctx,
    a: &WorkerArgs,
    seats: &[Seat],
    shared: &Arc<Shared>,
    m: MeasureSpec,
) -> StepResult {
    shared.step.store(m.step, Ordering::Relaxed);
    shared.delivered.store(0, Ordering::Relaxed);
    shared.errors.store(0, Ordering::Relaxed);
    shared.msg_us.lock().expect("lock").clear();
    shared.join_us.lock().expect("lock").clear();
    *shared.first_error.lock().expect("lock") = None;
    let mut out = StepResult {
        step: m.step,
        ..StepResult::default()
    };
    // Both schedules are open loop with fixed spacing from a common start on the wall clock.
    let now_wall = wall_us();
    let start = Instant::now() + Duration::from_micros(m.start_us.saturating_sub(now_wall));
    let total_s = m.warmup + m.duration;
    let msg_n = (m.messages_per_s * total_s).floor() as u64;
    let join_n = (m.joins_per_s * total_s).floor() as u64;
    let mut events: Vec<(f64, bool)> = (0..msg_n)
        .map(|k| (k as f64 / m.messages_per_s, true))
        .chain((0..join_n).map(|k| ((k as f64 + 0.5) / m.joins_per_s, false)))
        .collect();
    events.sort_by(|x, y| x.0.total_cmp(&y.0));
    let in_flight = Arc::new(AtomicU64::new(0));
    let mut sends = JoinSet::new();
    let mut rng = rand::rngs::StdRng::from_entropy();
    for (k, (at_s, is_msg)) in events.into_iter().enumerate() {
        let at = start + Duration::from_secs_f64(at_s);
        tokio::time::sleep_until(at).await;
        if seats.is_empty() {
            break;
        }
        // A stuck server must not make us pile up sends without bound.
        if in_flight.load(Ordering::Relaxed) > 2_000 {
            out.skipped += 1;
            continue;
        }
        // Skip users with a rejoin in flight: they are briefly outside one of their rooms.
        let mut pick = None;
        for _ in 0..4 {
            let s = &seats[rng.gen_range(0..seats.len())];
            if s.rejoin.lock().expect("lock").is_none() {
                pick = Some(s);
                break;
            }
        }
        let Some(s) = pick else {
            out.skipped += 1;
            continue;
        };
        let rooms = rooms_of(s.index, a.large);
        let room = rooms[rng.gen_range(0..rooms.len())];
        let jid = room_jid(ctx, room);
        let sched_us = m.start_us + (at_s * 1e6) as u64;
        let text = if is_msg {
            let measured = at_s >= m.warmup;
            if measured {
                out.sent += 1;
                out.expected += occupancy(room, m.population, a.large) as u64;
            }
            format!(
                "<message to='{jid}' type='groupchat' id='w{}s{}k{k}'><body>L {} {} {sched_us} w{} pad pad pad</body></message>",
                a.worker,
                m.step,
                m.step,
                u8::from(measured),
                a.worker
            )
        } else {
            let me = format!("{jid}/{}", s.nick);
            out.joins += 1;
            *s.rejoin.lock().expect("lock") = Some((me.clone(), wall_us()));
            format!(
                "<presence type='unavailable' to='{me}'/>{}",
                super::join_stanza(&jid, &s.nick, None)
            )
        };
        let w = s.w.clone();
        let flight = in_flight.clone();
        flight.fetch_add(1, Ordering::Relaxed);
        sends.spawn(async move {
            let r = w.lock().await.send(&text).await;
            flight.fetch_sub(1, Ordering::Relaxed);
            r
        });
        while let Some(r) = sends.try_join_next() {
            if let Ok(Err(e)) = r {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("send: {e:#}"));
            }
        }
    }
    let end = start + Duration::from_secs_f64(total_s + m.drain);
    tokio::time::sleep_until(end).await;
    sends.abort_all();
    out.delivered = shared.delivered.load(Ordering::Relaxed);
    out.errors += shared.errors.load(Ordering::Relaxed);
    out.closed = shared.closed.load(Ordering::Relaxed);
    out.msg_us = std::mem::take(&mut *shared.msg_us.lock().expect("lock"));
    out.join_us = std::mem::take(&mut *shared.join_us.lock().expect("lock"));
    // A rejoin whose presence never came is a join that did not complete in time.
    for s in seats {
        if s.rejoin.lock().expect("lock").take().is_some() {
            out.join_us.push(u32::MAX);
        }
    }
    if out.first_error.is_none() {
        out.first_error = shared.first_error.lock().expect("lock").take();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Coordinator.
// ---------------------------------------------------------------------------------------------

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    pid: Option<u32>,
    users: usize,
}

impl Worker {
    async fn send(&mut self, cmd: &Command) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(cmd)?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn recv<T: for<'de> Deserialize<'de>>(&mut self, deadline: Instant) -> anyhow::Result<T> {
        loop {
            let line = tokio::time::timeout_at(deadline, self.stdout.next_line())
                .await
                .map_err(|_| anyhow!("worker did not answer in time"))??
                .ok_or_else(|| anyhow!("worker exited"))?;
            if line.trim_start().starts_with('{') {
                return Ok(serde_json::from_str(&line)?);
            }
        }
    }
}

fn worker_command(
    ctx: &Ctx,
    a: &Args,
    servers: &Servers,
    first: usize,
    count: usize,
    index: usize,
    remaining_s: f64,
) -> anyhow::Result<tokio::process::Command> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cmd = tokio::process::Command::new(exe);
    match &ctx.target.transport {
        Transport::Starttls if servers.addrs.len() > 1 => {
            let all: Vec<String> = servers.addrs.iter().map(|s| s.to_string()).collect();
            cmd.arg("--server").arg(all.join(","));
        }
        Transport::Starttls => {
            cmd.arg("--server").arg(ctx.target.addr.to_string());
        }
        t @ Transport::WebSocket { .. } => {
            cmd.args(["--transport", "websocket", "--ws-url"])
                .arg(t.ws_url(ctx.target.addr).unwrap_or_default());
        }
    }
    let mech = clap::ValueEnum::to_possible_value(&ctx.target.mech)
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| "auto".into());
    cmd.args(["--domain", &ctx.target.domain])
        .args(["--muc", &ctx.muc])
        .args(["--user-prefix", &ctx.user_prefix])
        .args(["--user-offset", &ctx.user_offset.to_string()])
        .args(["--password", &ctx.target.password])
        .args(["--mech", &mech])
        .args(["--room-prefix", &ctx.room_prefix])
        .args(["--label", &ctx.label])
        // 250 addresses per worker: disjoint ranges, 127.0.(2 + index).x; the coordinator's
        // room creators use 127.0.1.x (source addresses 0..250).
        .args(["--source-addrs", "250"])
        .args(["--source-first", &((index + 1) * 250).to_string()])
        .args([
            "--connect-concurrency",
            &ctx.connect_concurrency.to_string(),
        ])
        .args([
            "--login-timeout",
            &ctx.target.login_timeout.as_secs_f64().to_string(),
        ])
        .args(["--threads", &a.worker_threads.max(1).to_string()])
        .args(["--max-seconds", &format!("{:.0}", remaining_s.max(10.0))])
        .arg("lync-worker")
        .args(["--first", &first.to_string()])
        .args(["--count", &count.to_string()])
        .args(["--large", &a.large.to_string()])
        .args(["--worker", &index.to_string()]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    Ok(cmd)
}

/// Creates (join, unlock, leave) every room in `rooms`, `parallel` connections at once, as
/// users `creators`.
async fn create_rooms(
    ctx: &Ctx,
    servers: &Servers,
    creators: std::ops::Range<usize>,
    rooms: Vec<String>,
    deadline: Instant,
) -> anyhow::Result<()> {
    if rooms.is_empty() {
        return Ok(());
    }
    let n = creators.len().min(rooms.len()).max(1);
    let clients = login_spread(ctx, servers, creators.start..creators.start + n).await?;
    let queue = Arc::new(Mutex::new(rooms));
    let mut set = JoinSet::new();
    for mut c in clients {
        let queue = queue.clone();
        set.spawn(async move {
            loop {
                let Some(room) = queue.lock().expect("lock").pop() else {
                    break;
                };
                join(&mut c, &room, deadline).await?;
                leave(&mut c, &room, deadline).await?;
            }
            c.w.close().await;
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

#[derive(Serialize, Clone, Debug)]
struct StepSummary {
    users: usize,
    holds: bool,
    why_not: Option<String>,
    workers: usize,
    setup_s: f64,
    rooms_created: usize,
    /// Of `setup_s`: creating the step's rooms; the slowest new worker's logins; and its
    /// seating (24 joins per user).
    rooms_s: f64,
    login_s: f64,
    seat_s: f64,
    messages_sent: u64,
    deliveries_expected: u64,
    deliveries: u64,
    errors: u64,
    skipped: u64,
    message_latency: Latency,
    join_latency: Latency,
    server_cores: Option<f64>,
    generator_cores: Option<f64>,
    server_rss_kib: Option<u64>,
    /// The database's CPU (postmaster and backends; with `--db-pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    db_cores: Option<f64>,
    /// The database's proportional set size at the end of the window, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    db_pss_kib: Option<u64>,
    first_error: Option<String>,
}

/// Runs the coordinator.
pub async fn run(ctx: &Ctx, a: &Args, servers: &Servers) -> anyhow::Result<Report> {
    if a.steps.is_empty() || a.steps.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--steps must be rising user counts");
    }
    if a.workers_max > 250 {
        bail!("--workers-max is at most 250 (each worker has its own 250 loopback addresses)");
    }
    // Server processes whose CPU and RSS count: every --server-pid (one for a single server).
    let server_pids: Vec<u32> = if servers.pids.is_empty() {
        ctx.server_pid.into_iter().collect()
    } else {
        servers.pids.clone()
    };
    if a.steps[0] < SMALL {
        bail!("the smallest step must seat at least {SMALL} users");
    }
    let run_started = Instant::now();
    let mut workers: Vec<Worker> = Vec::new();
    let mut seated = 0usize;
    let mut created: BTreeSet<RoomId> = BTreeSet::new();
    let mut steps: Vec<StepSummary> = Vec::new();
    let mut stop_reason = None;
    let rss_start = sum_rss(&server_pids);
    for (k, &n) in a.steps.iter().enumerate() {
        if run_started.elapsed().as_secs_f64() > a.budget {
            stop_reason = Some(format!("time budget of {} s used up", a.budget));
            break;
        }
        let step_started = Instant::now();
        let setup_deadline = step_started + Duration::from_secs_f64(a.setup_timeout);
        let mut summary = StepSummary {
            users: n,
            holds: false,
            why_not: None,
            workers: 0,
            setup_s: 0.0,
            rooms_created: 0,
            rooms_s: 0.0,
            login_s: 0.0,
            seat_s: 0.0,
            messages_sent: 0,
            deliveries_expected: 0,
            deliveries: 0,
            errors: 0,
            skipped: 0,
            message_latency: Latency::default(),
            join_latency: Latency::default(),
            server_cores: None,
            generator_cores: None,
            server_rss_kib: None,
            db_cores: None,
            db_pss_kib: None,
            first_error: None,
        };
        let setup = async {
            if a.register {
                register_range(ctx, seated..n).await?;
            }
            // Rooms the new users need that do not exist yet.
            let mut new_rooms = BTreeSet::new();
            for u in seated..n {
                for r in rooms_of(u, a.large) {
                    if !created.contains(&r) {
                        new_rooms.insert(r);
                    }
                }
            }
            let jids: Vec<String> = new_rooms.iter().map(|&r| room_jid(ctx, r)).collect();
            let creators = seated..seated + a.create_parallel.max(1).min(n - seated);
            create_rooms(ctx, servers, creators, jids, setup_deadline).await?;
            let rooms_s = step_started.elapsed().as_secs_f64();
            // The creators' sessions must be gone before the step's users log in: a server
            // at its session limit (pchat: 19,000 by default) would refuse the last ones.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let count = new_rooms.len();
            created.extend(new_rooms);
            // New workers for the new users.
            let mut first = seated;
            let mut fresh = Vec::new();
            while first < n {
                let count = (n - first).min(a.users_per_worker.max(1));
                if workers.len() + fresh.len() >= a.workers_max {
                    bail!(
                        "{n} users need more than --workers-max {} workers",
                        a.workers_max
                    );
                }
                let remaining = a.budget + 600.0 - run_started.elapsed().as_secs_f64();
                let mut child = worker_command(
                    ctx,
                    a,
                    servers,
                    first,
                    count,
                    workers.len() + fresh.len(),
                    remaining,
                )?
                .spawn()
                .context("starting a worker process")?;
                let stdin = child
                    .stdin
                    .take()
                    .ok_or_else(|| anyhow!("no worker stdin"))?;
                let stdout = child
                    .stdout
                    .take()
                    .ok_or_else(|| anyhow!("no worker stdout"))?;
                let pid = child.id();
                fresh.push(Worker {
                    child,
                    stdin,
                    stdout: BufReader::new(stdout).lines(),
                    pid,
                    users: count,
                });
                first += count;
            }
            let mut problems = Vec::new();
            let (mut login_s, mut seat_s) = (0.0f64, 0.0f64);
            for w in &mut fresh {
                let r: Ready = w.recv(setup_deadline).await?;
                if !r.ok {
                    problems.push(r.error.unwrap_or_default());
                }
                login_s = login_s.max(r.login_s);
                seat_s = seat_s.max(r.seat_s);
            }
            workers.extend(fresh);
            if !problems.is_empty() {
                bail!("{}", problems.join("; "));
            }
            anyhow::Ok((count, rooms_s, login_s, seat_s))
        };
        match setup.await {
            Ok((count, rooms_s, login_s, seat_s)) => {
                summary.rooms_created = count;
                summary.rooms_s = super::round3(rooms_s);
                summary.login_s = super::round3(login_s);
                summary.seat_s = super::round3(seat_s);
            }
            Err(e) => {
                summary.why_not = Some(format!("setup failed: {e:#}"));
                summary.setup_s = step_started.elapsed().as_secs_f64();
                eprintln!(
                    "lync: {n} users: {}",
                    summary.why_not.as_deref().unwrap_or("")
                );
                steps.push(summary);
                break;
            }
        }
        seated = n;
        summary.workers = workers.len();
        summary.setup_s = step_started.elapsed().as_secs_f64();
        // Let join storms settle before measuring.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let start_us = wall_us() + 1_000_000;
        let cmd = Command::Measure {
            step: k as u32 + 1,
            population: n,
            messages_per_s: a.messages_per_s,
            joins_per_s: a.joins_per_s,
            start_us,
            warmup: a.warmup,
            duration: a.duration,
            drain: a.drain,
        };
        let gen_before: Vec<Option<f64>> = workers
            .iter()
            .map(|w| w.pid.and_then(cpu_seconds))
            .collect();
        let mark = CpuMark::start(None);
        let server_before = sum_cpu(&server_pids);
        let db_before = a.db_pid.and_then(db_cpu_seconds);
        let mut failed = None;
        for w in &mut workers {
            if let Err(e) = w.send(&cmd).await {
                failed = Some(format!("worker: {e:#}"));
            }
        }
        let deadline =
            Instant::now() + Duration::from_secs_f64(a.warmup + a.duration + a.drain + 60.0);
        let mut msg_us = Vec::new();
        let mut join_us = Vec::new();
        for w in &mut workers {
            match w.recv::<StepResult>(deadline).await {
                Ok(r) => {
                    summary.messages_sent += r.sent;
                    summary.deliveries_expected += r.expected;
                    summary.deliveries += r.delivered;
                    summary.errors += r.errors + r.closed;
                    summary.skipped += r.skipped;
                    if summary.first_error.is_none() {
                        summary.first_error = r.first_error;
                    }
                    msg_us.extend(r.msg_us);
                    join_us.extend(r.join_us);
                }
                Err(e) => failed = Some(format!("worker: {e:#}")),
            }
        }
        let secs = mark.elapsed_s().max(1e-3);
        let round2 = |v: f64| (v * 100.0).round() / 100.0;
        let server_after = sum_cpu(&server_pids);
        let db_after = a.db_pid.and_then(db_cpu_seconds);
        let gen: f64 = workers
            .iter()
            .zip(&gen_before)
            .filter_map(|(w, b)| Some(w.pid.and_then(cpu_seconds)? - (*b)?))
            .sum();
        summary.generator_cores = Some(super::round3(gen / secs));
        summary.server_cores = match (server_before, server_after) {
            (Some(b), Some(e)) => Some(round2((e - b) / secs)),
            _ => None,
        };
        summary.server_rss_kib = sum_rss(&server_pids);
        summary.db_cores = match (db_before, db_after) {
            (Some(b), Some(e)) => Some(round2((e - b) / secs)),
            _ => None,
        };
        summary.db_pss_kib = a.db_pid.and_then(db_pss_kib);
        summary.message_latency = Latency::from_us(&mut msg_us);
        summary.join_latency = Latency::from_us(&mut join_us);
        let why_not = if let Some(f) = failed {
            Some(f)
        } else if summary.errors > 0 {
            Some(format!(
                "{} errors or closed streams (first: {})",
                summary.errors,
                summary.first_error.as_deref().unwrap_or("?")
            ))
        } else if summary.messages_sent == 0 {
            Some("no message sent".into())
        } else if (summary.deliveries as f64) < 0.99 * summary.deliveries_expected as f64 {
            Some(format!(
                "{} of {} deliveries",
                summary.deliveries, summary.deliveries_expected
            ))
        } else if summary.skipped > summary.messages_sent / 10 {
            Some(format!("{} sends skipped (backlog)", summary.skipped))
        } else if summary.message_latency.p99_ms >= a.p99_ms {
            Some(format!("message p99 {} ms", summary.message_latency.p99_ms))
        } else if summary.join_latency.p99_ms >= a.p99_ms {
            Some(format!("join p99 {} ms", summary.join_latency.p99_ms))
        } else {
            None
        };
        summary.holds = why_not.is_none();
        summary.why_not = why_not;
        eprintln!(
            "lync: {n} users ({} workers, setup {:.1} s): {} — message p50/p99 {}/{} ms, join p99 {} ms, {}/{} deliveries, server {:?} cores, RSS {:?} KiB",
            summary.workers,
            summary.setup_s,
            if summary.holds { "holds" } else { "does not hold" },
            summary.message_latency.p50_ms,
            summary.message_latency.p99_ms,
            summary.join_latency.p99_ms,
            summary.deliveries,
            summary.deliveries_expected,
            summary.server_cores,
            summary.server_rss_kib,
        );
        eprintln!(
            "lync: {n} users: set-up {} rooms in {:.1} s, logins {:.1} s, seating {:.1} s",
            summary.rooms_created, summary.rooms_s, summary.login_s, summary.seat_s
        );
        if a.db_pid.is_some() {
            eprintln!(
                "lync: {n} users: {} servers, database {:?} cores, PSS {:?} KiB",
                server_pids.len(),
                summary.db_cores,
                summary.db_pss_kib
            );
        }
        let holds = summary.holds;
        steps.push(summary);
        if !holds {
            break;
        }
    }
    // Tear down: quit, then wait (bounded) and kill what is left.
    for w in &mut workers {
        let _ = w.send(&Command::Quit).await;
    }
    for w in &mut workers {
        if tokio::time::timeout(Duration::from_secs(30), w.child.wait())
            .await
            .is_err()
        {
            let _ = w.child.kill().await;
        }
    }
    let good = steps.iter().rev().find(|s| s.holds);
    let bad = steps.iter().find(|s| !s.holds);
    let mut detail = Map::new();
    detail.insert("steps".into(), json!(steps));
    detail.insert("large".into(), json!(a.large));
    detail.insert("messages_per_s".into(), json!(a.messages_per_s));
    detail.insert("joins_per_s".into(), json!(a.joins_per_s));
    detail.insert("stopped".into(), json!(stop_reason));
    if servers.addrs.len() > 1 {
        detail.insert(
            "servers".into(),
            json!(servers
                .addrs
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()),
        );
        detail.insert("server_pids".into(), json!(server_pids));
    }
    detail.insert(
        "users_per_worker".into(),
        json!(workers.iter().map(|w| w.users).collect::<Vec<_>>()),
    );
    let rss_per_user = match (rss_start, good.and_then(|g| g.server_rss_kib)) {
        (Some(b), Some(e)) => good.map(|g| (e as f64 - b as f64) / g.users as f64),
        _ => None,
    };
    let mut headline = vec![
        (
            "max_users_held",
            Some(good.map_or(0.0, |g| g.users as f64)),
            "higher",
        ),
        ("first_failing_users", bad.map(|b| b.users as f64), "higher"),
        (
            "msg_p50_ms_at_max",
            good.map(|g| g.message_latency.p50_ms),
            "lower",
        ),
        (
            "msg_p99_ms_at_max",
            good.map(|g| g.message_latency.p99_ms),
            "lower",
        ),
        (
            "join_p99_ms_at_max",
            good.map(|g| g.join_latency.p99_ms),
            "lower",
        ),
        (
            "server_cores_at_max",
            good.and_then(|g| g.server_cores),
            "lower",
        ),
        (
            "server_rss_mib_at_max",
            good.and_then(|g| g.server_rss_kib)
                .map(|k| k as f64 / 1024.0),
            "lower",
        ),
        ("rss_kib_per_user_at_max", rss_per_user, "lower"),
        (
            "setup_s_per_1000_users",
            good.map(|g| {
                let prev = steps
                    .iter()
                    .take_while(|s| s.users < g.users)
                    .map(|s| s.setup_s)
                    .sum::<f64>();
                (prev + g.setup_s) / g.users as f64 * 1000.0
            }),
            "lower",
        ),
    ];
    if a.db_pid.is_some() {
        headline.push(("db_cores_at_max", good.and_then(|g| g.db_cores), "lower"));
        headline.push((
            "db_pss_mib_at_max",
            good.and_then(|g| g.db_pss_kib).map(|k| k as f64 / 1024.0),
            "lower",
        ));
    }
    Ok(Report {
        scenario: "lync",
        headline,
        detail,
    })
}

/// Registers accounts `range` in-band (XEP-0077), for servers that allow it.
async fn register_range(ctx: &Ctx, range: std::ops::Range<usize>) -> anyhow::Result<()> {
    let sem = Arc::new(Semaphore::new(16));
    let mut set = JoinSet::new();
    let mut target = ctx.target.clone();
    // Registration throttles exempt 127.0.0.1 (see `register` in main.rs).
    target.source_addrs = 1;
    target.source_first = 0;
    for i in range {
        let (sem, target, user) = (sem.clone(), target.clone(), ctx.user(i));
        set.spawn(async move {
            let _p = sem.acquire_owned().await.expect("semaphore open");
            crate::conn::register(&target, &user, 0).await
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_has_24_distinct_rooms() {
        for u in [0, 1, 29, 30, 999, 1000, 1001, 18_999] {
            let rooms = rooms_of(u, 1000);
            assert_eq!(rooms.len(), ROOMS_PER_USER, "user {u}");
            let set: BTreeSet<_> = rooms.iter().collect();
            assert_eq!(set.len(), ROOMS_PER_USER, "user {u}");
        }
    }

    #[test]
    fn occupancy_matches_the_layout() {
        // Count members by brute force and compare with the closed form.
        let (n, large) = (2_345, 1_000);
        let mut counts = std::collections::BTreeMap::new();
        for u in 0..n {
            for r in rooms_of(u, large) {
                *counts.entry(r).or_insert(0usize) += 1;
            }
        }
        for (r, c) in &counts {
            assert_eq!(occupancy(*r, n, large), *c, "{r:?}");
        }
        assert_eq!(counts[&RoomId::Large], 1_000);
        assert!(counts
            .iter()
            .all(|(r, &c)| *r == RoomId::Large || c <= MEDIUM));
        let full_small = counts
            .iter()
            .filter(|(r, &c)| matches!(r, RoomId::Small(..)) && c == SMALL)
            .count();
        assert!(full_small > 1_500, "{full_small} full small rooms");
    }

    #[test]
    fn parses_lync_bodies() {
        let el = b"<message type='groupchat'><body>L 3 1 1700000000000000 w0 pad</body></message>";
        assert_eq!(parse_body(el), Some((3, true, 1_700_000_000_000_000)));
        assert_eq!(parse_body(b"<message><body>b 3 1</body></message>"), None);
    }
}
