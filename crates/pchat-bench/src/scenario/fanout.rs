//! `fanout`: R rooms × O occupants, every occupant sends at a fixed rate, every message is
//! delivered to all O occupants (the sender's reflection included). Open loop: senders keep
//! their schedule whatever the server does, and the timestamp in the body is the *scheduled*
//! send time, so a sender held up by a slow server (or by our own scheduler on a busy 2-core
//! box) shows up as latency instead of silently lowering the offered load.
//!
//! A step has a warm-up (messages sent, not measured), a measured window, and a drain: after
//! the last send we wait until every message of the window has been delivered O times, or the
//! drain time runs out. Messages carry the step number so late ones from an earlier step never
//! pollute the next. `--find-saturation` runs steps at a rising rate on the same connections
//! and stops at the first step with p99 above the limit or deliveries falling behind.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use serde_json::{json, Map};
use tokio::time::Instant;

use super::{for_each_client, join, login_all, now_us, us_at, Client, Ctx, Report};
use crate::conn::{Next, Reader, Writer};
use crate::stats::{CpuMark, Latency, SAMPLES_MAX};
use crate::xml;

/// Parameters of the fan-out scenario.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Rooms.
    #[arg(long, default_value_t = 5)]
    pub rooms: usize,
    /// Occupants per room (each a separate TLS connection and account).
    #[arg(long, default_value_t = 10)]
    pub occupants: usize,
    /// Messages per second sent by each occupant (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Measured window per step, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured sending before the window, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Longest wait for in-flight deliveries after the last send, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Body size in bytes (padded; at least the ~30-byte timestamp header).
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Step the rate up until p99 exceeds --p99-limit-ms or deliveries fall behind.
    #[arg(long)]
    pub find_saturation: bool,
    /// Per-occupant rate multiplier between saturation steps.
    #[arg(long, default_value_t = 1.5)]
    pub step_factor: f64,
    /// Most saturation steps.
    #[arg(long, default_value_t = 12)]
    pub max_steps: u32,
    /// p99 above which a step counts as saturated, ms.
    #[arg(long, default_value_t = 200.0)]
    pub p99_limit_ms: f64,
    /// Fraction of expected deliveries below which a step counts as falling behind.
    #[arg(long, default_value_t = 0.99)]
    pub min_delivered_ratio: f64,
}

/// State shared by the reader tasks of one run.
struct Shared {
    step: AtomicU32,
    win_start_us: AtomicU64,
    win_end_us: AtomicU64,
    delivered: AtomicU64,
    /// Every delivery of the run, warm-up and drain included: the denominator of CPU cost.
    delivered_all: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

/// One reader's samples for the current step.
#[derive(Default)]
struct Sink {
    lat_us: Vec<u32>,
    dropped: u64,
}

/// Body header: `b <step> <scheduled-us> <sender>` then padding.
fn parse_body(el: &[u8]) -> Option<(u32, u64)> {
    let body = xml::child_text(el, "body")?;
    let rest = body.strip_prefix(b"b ")?;
    let mut it = rest.split(|&c| c == b' ');
    let step = std::str::from_utf8(it.next()?).ok()?.parse().ok()?;
    let ts = std::str::from_utf8(it.next()?).ok()?.parse().ok()?;
    Some((step, ts))
}

async fn reader_task(
    mut r: Reader,
    shared: Arc<Shared>,
    sink: Arc<Mutex<Sink>>,
    samples_max: usize,
    hard_deadline: Instant,
) -> Reader {
    while !shared.stop.load(Ordering::Relaxed) && Instant::now() < hard_deadline {
        let tick = (Instant::now() + Duration::from_millis(200)).min(hard_deadline);
        let el = match r.next(tick).await {
            Ok(Some(Next::Elem(el))) => el,
            Ok(None) => continue,
            Ok(Some(Next::Closed)) | Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        };
        if xml::name(el) != b"message" {
            continue;
        }
        match xml::attr(el, "type") {
            Some(b"groupchat") => {}
            Some(b"error") => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            _ => continue,
        }
        let Some((step, ts)) = parse_body(el) else {
            continue;
        };
        let now = now_us();
        shared.delivered_all.fetch_add(1, Ordering::Relaxed);
        if step != shared.step.load(Ordering::Relaxed)
            || ts < shared.win_start_us.load(Ordering::Relaxed)
            || ts >= shared.win_end_us.load(Ordering::Relaxed)
        {
            continue;
        }
        let lat = now.saturating_sub(ts).min(u32::MAX as u64) as u32;
        {
            let mut s = sink.lock().expect("sink lock");
            if s.lat_us.len() < samples_max {
                s.lat_us.push(lat);
            } else {
                s.dropped += 1;
            }
        }
        shared.delivered.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// Sends on schedule from `start` until `end`; returns the writer, messages sent whose
/// scheduled time is in the window, and whether a write failed.
#[allow(clippy::too_many_arguments)]
async fn sender_task(
    mut w: Writer,
    room: String,
    me: usize,
    step: u32,
    period: Duration,
    first: Instant,
    end: Instant,
    window: (u64, u64),
    pad: Arc<String>,
) -> (Writer, u64, bool) {
    let mut next = first;
    let mut in_window = 0u64;
    let mut buf = String::with_capacity(256 + pad.len());
    // Bounded by count as well as by time: at most the schedule's length, plus one.
    let max_count = ((end - first).as_secs_f64() / period.as_secs_f64()).ceil() as u64 + 1;
    for k in 0..max_count {
        if next >= end {
            break;
        }
        tokio::time::sleep_until(next).await;
        let ts = us_at(next);
        buf.clear();
        let _ = write!(
            buf,
            "<message to='{room}' type='groupchat' id='s{step}k{k}'><body>b {step} {ts} {me} {pad}</body></message>"
        );
        if w.send(&buf).await.is_err() {
            return (w, in_window, true);
        }
        if ts >= window.0 && ts < window.1 {
            in_window += 1;
        }
        next += period;
    }
    (w, in_window, false)
}

/// Result of one step.
struct Step {
    rate: f64,
    offered_deliveries_per_s: f64,
    sent: u64,
    expected: u64,
    delivered: u64,
    errors: u64,
    latency: Latency,
    dropped_samples: u64,
    /// Server CPU over the step (warm-up to end of drain), in cores.
    server_cores: Option<f64>,
    /// Load-generator CPU over the step: when server + client approach the machine's core
    /// count, the step measured the machine, not the server.
    client_cores: Option<f64>,
    /// Server CPU per delivery over the step, every delivery counted (warm-up included).
    server_cpu_us_per_delivery: Option<f64>,
}

impl Step {
    fn delivered_per_s(&self, duration: f64) -> f64 {
        self.delivered as f64 / duration
    }

    fn messages_per_s(&self, duration: f64) -> f64 {
        self.sent as f64 / duration
    }

    fn behind(&self, min_ratio: f64) -> bool {
        (self.delivered as f64) < (self.expected as f64) * min_ratio
    }

    fn json(&self, duration: f64) -> serde_json::Value {
        json!({
            "rate_per_occupant": self.rate,
            "offered_deliveries_per_s": super::round3(self.offered_deliveries_per_s),
            "delivered_per_s": super::round3(self.delivered_per_s(duration)),
            "messages_per_s": super::round3(self.messages_per_s(duration)),
            "sent_in_window": self.sent,
            "expected": self.expected,
            "delivered": self.delivered,
            "errors": self.errors,
            "latency": self.latency,
            "dropped_samples": self.dropped_samples,
            "server_cores": self.server_cores,
            "client_cores": self.client_cores,
            "server_cpu_us_per_delivery": self.server_cpu_us_per_delivery.map(super::round3),
        })
    }
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &Args) -> anyhow::Result<Report> {
    if a.rooms == 0 || a.occupants == 0 || a.rate <= 0.0 || a.duration <= 0.0 {
        bail!("rooms, occupants, rate and duration must be positive");
    }
    let n = a.rooms * a.occupants;
    let setup_started = Instant::now();
    let rooms: Vec<String> = (0..a.rooms).map(|r| ctx.room(r)).collect();
    super::create_rooms(ctx, n, &rooms).await?;
    let clients = login_all(ctx, 0..n).await?;
    let occ = a.occupants;
    let rooms_for_join = Arc::new(rooms.clone());
    let clients = for_each_client(clients, ctx.connect_concurrency, move |mut c| {
        let rooms = rooms_for_join.clone();
        async move {
            let room = &rooms[c.index / occ];
            join(&mut c, room, Instant::now() + Duration::from_secs(60)).await?;
            Ok(c)
        }
    })
    .await?;
    let setup_s = setup_started.elapsed().as_secs_f64();

    let shared = Arc::new(Shared {
        step: AtomicU32::new(u32::MAX),
        win_start_us: AtomicU64::new(0),
        win_end_us: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        delivered_all: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let steps_max = if a.find_saturation {
        a.max_steps.max(1)
    } else {
        1
    };
    // The readers' hard deadline bounds the whole run even if the stop flag were never set.
    let per_step = a.warmup + a.duration + a.drain + 2.0;
    let hard_deadline =
        Instant::now() + Duration::from_secs_f64(per_step * steps_max as f64 + 30.0);
    let mut sinks = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    let mut writers: Vec<Option<Writer>> = Vec::with_capacity(n);
    for Client { r, w, .. } in clients {
        let sink = Arc::new(Mutex::new(Sink::default()));
        readers.push(tokio::spawn(reader_task(
            r,
            shared.clone(),
            sink.clone(),
            // Memory bound for a step: SAMPLES_MAX u32s over all readers together.
            SAMPLES_MAX / n,
            hard_deadline,
        )));
        sinks.push(sink);
        writers.push(Some(w));
    }
    let pad = Arc::new("x".repeat(a.body_bytes.saturating_sub(30)));

    let mark = CpuMark::start(ctx.server_pid);
    let mut steps: Vec<Step> = Vec::new();
    let mut rate = a.rate;
    let mut last_good: Option<usize> = None;
    for step in 0..steps_max {
        let start = Instant::now() + Duration::from_millis(200);
        let win_start = start + Duration::from_secs_f64(a.warmup);
        let end = win_start + Duration::from_secs_f64(a.duration);
        shared.delivered.store(0, Ordering::Relaxed);
        shared.delivered_all.store(0, Ordering::Relaxed);
        shared.errors.store(0, Ordering::Relaxed);
        let step_mark = CpuMark::start(ctx.server_pid);
        shared
            .win_start_us
            .store(us_at(win_start), Ordering::Relaxed);
        shared.win_end_us.store(us_at(end), Ordering::Relaxed);
        shared.step.store(step, Ordering::Relaxed);
        let period = Duration::from_secs_f64(1.0 / rate);
        let mut senders = Vec::with_capacity(n);
        for (i, w) in writers.iter_mut().enumerate() {
            let Some(w) = w.take() else { continue };
            // Spread first sends evenly over one period, so the offered load is smooth
            // rather than n messages in the same millisecond.
            let phase = period.mul_f64((i as f64 + 0.5) / n as f64);
            senders.push(tokio::spawn(sender_task(
                w,
                rooms[i / a.occupants].clone(),
                i,
                step,
                period,
                start + phase,
                end,
                (us_at(win_start), us_at(end)),
                pad.clone(),
            )));
        }
        let mut sent = 0u64;
        let mut write_failures = 0u64;
        for (i, s) in senders.into_iter().enumerate() {
            let (w, in_window, failed) = s.await?;
            sent += in_window;
            write_failures += u64::from(failed);
            writers[i] = Some(w);
        }
        let expected = sent * a.occupants as u64;
        let drain_deadline = Instant::now() + Duration::from_secs_f64(a.drain);
        while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Freeze the step before reading the sinks, so late arrivals cannot race the merge.
        shared.step.store(u32::MAX, Ordering::Relaxed);
        let step_cpu = step_mark.stop(ctx.server_pid);
        let delivered_all = shared.delivered_all.load(Ordering::Relaxed);
        // CPU per delivery: the efficiency figure that stays meaningful when the offered
        // load is below every server's capacity. Deliveries outside the window count too,
        // since the CPU interval covers warm-up and drain as well.
        let cpu_us_per_delivery = match step_cpu.server_cores {
            Some(c) if delivered_all > 0 => {
                Some(c * step_mark.elapsed_s() * 1e6 / delivered_all as f64)
            }
            _ => None,
        };
        let mut all = Vec::new();
        let mut dropped = 0;
        for s in &sinks {
            let mut s = s.lock().expect("sink lock");
            all.append(&mut s.lat_us);
            dropped += s.dropped;
            s.dropped = 0;
        }
        let result = Step {
            rate,
            offered_deliveries_per_s: rate * (n * a.occupants) as f64,
            sent,
            expected,
            delivered: shared.delivered.load(Ordering::Relaxed),
            errors: shared.errors.load(Ordering::Relaxed) + write_failures,
            latency: Latency::from_us(&mut all),
            dropped_samples: dropped,
            server_cores: step_cpu.server_cores,
            client_cores: step_cpu.client_cores,
            server_cpu_us_per_delivery: cpu_us_per_delivery,
        };
        eprintln!(
            "  step {step}: rate {:.3}/s/occupant, offered {:.0} deliveries/s, delivered {:.0}/s, p99 {:.1} ms, {}/{} delivered, {} errors, cores server {} client {}",
            rate,
            result.offered_deliveries_per_s,
            result.delivered_per_s(a.duration),
            result.latency.p99_ms,
            result.delivered,
            result.expected,
            result.errors,
            result.server_cores.map_or("?".into(), |c| format!("{c:.2}")),
            result.client_cores.map_or("?".into(), |c| format!("{c:.2}")),
        );
        let good = !result.behind(a.min_delivered_ratio)
            && result.latency.p99_ms <= a.p99_limit_ms
            && result.errors == 0;
        steps.push(result);
        if !a.find_saturation {
            break;
        }
        if !good {
            break;
        }
        last_good = Some(steps.len() - 1);
        rate *= a.step_factor;
        // Let queues empty between steps so each step starts from a quiet server.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let cpu = mark.stop(ctx.server_pid);

    shared.stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.await;
    }
    for w in writers.into_iter().flatten() {
        w.close().await;
    }

    let mut detail = Map::new();
    detail.insert("rooms".into(), json!(a.rooms));
    detail.insert("occupants".into(), json!(a.occupants));
    detail.insert("clients".into(), json!(n));
    detail.insert("duration_s".into(), json!(a.duration));
    detail.insert("body_bytes".into(), json!(a.body_bytes));
    detail.insert("setup_s".into(), json!(super::round3(setup_s)));
    detail.insert("cpu".into(), json!(cpu));
    detail.insert(
        "steps".into(),
        json!(steps.iter().map(|s| s.json(a.duration)).collect::<Vec<_>>()),
    );
    let (scenario, headline) = if a.find_saturation {
        let good = last_good.map(|i| &steps[i]);
        let bad = steps.last().filter(|_| last_good != Some(steps.len() - 1));
        detail.insert("saturated".into(), json!(bad.is_some()));
        (
            "fanout-saturation",
            vec![
                (
                    "max_good_deliveries_per_s",
                    Some(good.map_or(0.0, |s| s.delivered_per_s(a.duration))),
                    "higher",
                ),
                (
                    "max_good_messages_per_s",
                    Some(good.map_or(0.0, |s| s.messages_per_s(a.duration))),
                    "higher",
                ),
                (
                    "p99_ms_at_max_good",
                    good.map(|s| s.latency.p99_ms),
                    "lower",
                ),
                (
                    "first_bad_offered_per_s",
                    bad.map(|s| s.offered_deliveries_per_s),
                    "higher",
                ),
                (
                    "server_cores_at_max_good",
                    good.and_then(|s| s.server_cores),
                    "lower",
                ),
                (
                    "client_cores_at_max_good",
                    good.and_then(|s| s.client_cores),
                    "lower",
                ),
                (
                    "cpu_us_per_delivery_at_max_good",
                    good.and_then(|s| s.server_cpu_us_per_delivery),
                    "lower",
                ),
            ],
        )
    } else {
        let s = &steps[0];
        (
            "fanout",
            vec![
                (
                    "delivered_per_s",
                    Some(s.delivered_per_s(a.duration)),
                    "higher",
                ),
                ("offered_per_s", Some(s.offered_deliveries_per_s), "higher"),
                (
                    "messages_per_s",
                    Some(s.messages_per_s(a.duration)),
                    "higher",
                ),
                ("p50_ms", Some(s.latency.p50_ms), "lower"),
                ("p99_ms", Some(s.latency.p99_ms), "lower"),
                ("max_ms", Some(s.latency.max_ms), "lower"),
                (
                    "lost_or_late",
                    Some(s.expected.saturating_sub(s.delivered) as f64),
                    "lower",
                ),
                ("errors", Some(s.errors as f64), "lower"),
                ("server_cores", cpu.server_cores, "lower"),
                (
                    "server_cpu_us_per_delivery",
                    s.server_cpu_us_per_delivery,
                    "lower",
                ),
                ("client_cores", cpu.client_cores, "lower"),
                (
                    "server_rss_mib",
                    cpu.server_rss_kib.map(|k| k as f64 / 1024.0),
                    "lower",
                ),
            ],
        )
    };
    Ok(Report {
        scenario,
        headline,
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reflected_body() {
        let el = b"<message from='r@c/n' type='groupchat'><body>b 3 123456 7 xxxx</body><stanza-id xmlns='urn:xmpp:sid:0'/></message>";
        assert_eq!(parse_body(el), Some((3, 123456)));
        assert_eq!(parse_body(b"<message><body>hello</body></message>"), None);
    }
}
