//! `pchat-bench`: a plain-XMPP load generator for group chat, used to measure pchat side by
//! side with ejabberd and Prosody (see `bench/run` and `docs/benchmarks.md`).
//!
//! One process, tokio, STARTTLS over TCP from many loopback source addresses (127.0.x.y, so
//! connection counts are not capped by one address's ephemeral ports), SASL SCRAM or PLAIN,
//! resource binding, MUC join, send and receive. It has its own minimal client (no DOM: an
//! incremental framer and byte-level field access) and depends on no pchat crate, so the same
//! code measures all three servers.
//!
//! Every scenario is bounded in count and in time, prints one JSON line on stdout (the harness
//! collects them) and a human table on stderr. Exit code 1 means the scenario could not run;
//! the JSON line then has `"ok": false` and the reason.
//!
//! Accounts are `{prefix}{index:05}` with one shared password; a scenario with n clients uses
//! accounts 0..n plus account n to create rooms (it creates, unlocks and leaves them).

mod conn;
mod portable;
mod sasl;
mod scenario;
mod stats;
mod xml;

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use conn::{MechChoice, Target, Transport};
use scenario::{Ctx, Report};

#[derive(Parser)]
#[command(
    name = "pchat-bench",
    version,
    about = "XMPP group-chat load generator"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Server host:port of the STARTTLS client port. `lync` also takes several (repeated or
    /// comma-separated: the servers of a pool; user i logs in to server i mod N, as Lync's
    /// load balancer spreads a pool's users); every other scenario takes one.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        action = clap::ArgAction::Append,
        default_value = "127.0.0.1:5222"
    )]
    server: Vec<String>,
    /// XMPP domain (also the TLS server name).
    #[arg(long, global = true, default_value = "localhost")]
    domain: String,
    /// MUC service; default `conference.<domain>`.
    #[arg(long, global = true)]
    muc: Option<String>,
    /// Account name prefix; accounts are `{prefix}{index:05}`.
    #[arg(long, global = true, default_value = "bench")]
    user_prefix: String,
    /// First account index this process uses.
    #[arg(long, global = true, default_value_t = 0)]
    user_offset: usize,
    /// The password shared by all bench accounts.
    #[arg(long, global = true, default_value = "bench-pass")]
    password: String,
    /// SASL mechanism.
    #[arg(long, global = true, value_enum, default_value_t = MechChoice::Auto)]
    mech: MechChoice,
    /// Room name prefix; rooms are `{prefix}-{n}@{muc}`. Make it unique per run.
    #[arg(long, global = true, default_value = "benchroom")]
    room_prefix: String,
    /// Server process id, for server CPU and RSS from /proc. `lync` also takes several
    /// (repeated or comma-separated: a pool's servers) and sums their CPU and RSS.
    #[arg(long, global = true, value_delimiter = ',', action = clap::ArgAction::Append)]
    server_pid: Vec<u32>,
    /// Server label in the results.
    #[arg(long, global = true, default_value = "server")]
    label: String,
    /// Loopback source addresses to spread connections over.
    #[arg(long, global = true, default_value_t = 250)]
    source_addrs: u32,
    /// Logins in flight at once.
    #[arg(long, global = true, default_value_t = 32)]
    connect_concurrency: usize,
    /// Seconds allowed for one login.
    #[arg(long, global = true, default_value_t = 30.0)]
    login_timeout: f64,
    /// Hard limit on the whole scenario, seconds.
    #[arg(long, global = true, default_value_t = 900.0)]
    max_seconds: f64,
    /// Directory for a short fsync-latency probe recorded with each result (the disk is
    /// shared with other work on the machine); none when absent.
    #[arg(long, global = true)]
    fsync_probe_dir: Option<std::path::PathBuf>,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Transport: STARTTLS over TCP (`--server`), or RFC 7395 WebSocket (`--ws-url`).
    #[arg(long, global = true, value_enum, default_value_t = TransportChoice::Starttls)]
    transport: TransportChoice,
    /// WebSocket endpoint for `--transport websocket`: `wss://` (TLS, any certificate
    /// accepted, as for STARTTLS) or plain `ws://`.
    #[arg(
        long,
        global = true,
        default_value = "wss://127.0.0.1:5280/xmpp-websocket"
    )]
    ws_url: String,
    /// Name recorded as `scenario` in the JSON result (default: the subcommand's), so that
    /// one scenario at two sizes stays apart in the tables.
    #[arg(long, global = true)]
    scenario_name: Option<String>,
    /// Index of the first loopback source address (worker processes get disjoint ranges).
    #[arg(long, global = true, default_value_t = 0)]
    source_first: u32,
}

/// `--transport` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TransportChoice {
    /// TCP with STARTTLS.
    Starttls,
    /// RFC 7395 WebSocket.
    Websocket,
}

#[derive(Subcommand)]
enum Command {
    /// R rooms × O occupants sending at a fixed rate: deliveries/s and delivery latency.
    ///
    /// Example: pchat-bench --server 127.0.0.1:5222 fanout --rooms 50 --occupants 20 --rate 2
    Fanout(scenario::fanout::Args),
    /// N idle clients in K rooms each: server RSS per connection (needs --server-pid).
    ///
    /// Example: pchat-bench --server-pid 1234 idle --clients 1000 --rooms-per-client 3
    Idle(scenario::idle::Args),
    /// Join latency including 30 history messages.
    ///
    /// Example: pchat-bench join-history --joins 200 --clients 10
    JoinHistory(scenario::history::Args),
    /// MAM latest-page and full-text query latency after pre-filling a room.
    ///
    /// Example: pchat-bench mam --messages 10000 --queries 200
    Mam(scenario::mam::Args),
    /// Acknowledgement (own reflection) latency of a single sender at low load.
    ///
    /// Example: pchat-bench ack --messages 500
    Ack(scenario::ack::Args),
    /// Lync's capacity model: users in 24 rooms each (small, medium, one large), joins and
    /// messages at fixed overall rates; steps the user count up until p99 exceeds the limit.
    /// Clients live in worker processes (this binary), so counts can exceed one process's
    /// open-files limit.
    ///
    /// Example: pchat-bench lync --steps 1000,2000,5000,10000,19000 --large 1000
    Lync(scenario::lync::Args),
    /// One worker process of `lync` (started by it; not for direct use).
    #[command(hide = true)]
    LyncWorker(scenario::lync::WorkerArgs),
    /// Create accounts by in-band registration (XEP-0077), for servers that allow it.
    ///
    /// Example: pchat-bench register --count 1001
    Register {
        /// Accounts 0..count (plus --user-offset).
        #[arg(long)]
        count: usize,
        /// Registrations in flight at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
    /// Write a pchat portable archive for `pchat data import`: accounts cloned from an
    /// exported one, and/or one room's exported history extended to many messages.
    ///
    /// Example: pchat-bench portable --template export.jsonl --room r-0@conference.localhost --messages 1000000 --out big.jsonl
    Portable(portable::Args),
    /// Summarise JSON result lines (files) as a Markdown table: median and min–max per
    /// server, and the ratio of the first server to each other.
    ///
    /// Example: pchat-bench report --servers pchat,ejabberd,prosody results.jsonl
    Report {
        /// Server labels in column order; the first is the one compared.
        #[arg(long, value_delimiter = ',', default_value = "pchat,ejabberd,prosody")]
        servers: Vec<String>,
        /// Files with one JSON result per line.
        files: Vec<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Report { servers, files } = &cli.command {
        return match report(servers, files) {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pchat-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Portable(a) = &cli.command {
        let started = std::time::Instant::now();
        let res = portable::check_template(&a.template).and_then(|()| portable::generate(a));
        return match res {
            Ok((users, rooms, messages)) => {
                eprintln!(
                    "pchat-bench: wrote {:?}: {users} users, {rooms} rooms, {messages} messages in {:.1} s",
                    a.out,
                    started.elapsed().as_secs_f64()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pchat-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = cli.common.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pchat-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scenario_override = cli.common.scenario_name.clone();
    let name = match cli.common.transport {
        TransportChoice::Starttls => scenario_name(&cli.command).to_string(),
        TransportChoice::Websocket => format!("{}-ws", scenario_name(&cli.command)),
    };
    let name = scenario_override.unwrap_or(name);
    let label = cli.common.label.clone();
    let limit = Duration::from_secs_f64(cli.common.max_seconds.max(1.0));
    let result = rt.block_on(async {
        scenario::t0();
        tokio::time::timeout(limit, run(cli))
            .await
            .map_err(|_| anyhow!("scenario exceeded --max-seconds"))?
    });
    // Dropping the runtime would wait for stuck tasks; they are all bounded, but a hung
    // server must not hang the harness either.
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!(
                "{}",
                json!({"ok": false, "scenario": name, "server": label, "error": format!("{e:#}")})
            );
            eprintln!("pchat-bench: {name} on {label} failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn scenario_name(c: &Command) -> &'static str {
    match c {
        Command::Fanout(a) if a.find_saturation => "fanout-saturation",
        Command::Fanout(_) => "fanout",
        Command::Idle(_) => "idle",
        Command::JoinHistory(_) => "join-history",
        Command::Mam(_) => "mam",
        Command::Ack(_) => "ack",
        Command::Register { .. } => "register",
        Command::Lync(_) => "lync",
        Command::LyncWorker(_) => "lync-worker",
        Command::Report { .. } => "report",
        Command::Portable(_) => "portable",
    }
}

fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    server
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| anyhow!("{server} has no IPv4 address"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let c = cli.common;
    let spread = matches!(cli.command, Command::Lync(_) | Command::LyncWorker(_));
    if !spread && (c.server.len() > 1 || c.server_pid.len() > 1) {
        anyhow::bail!(
            "only lync spreads its users over several servers: give one --server and --server-pid"
        );
    }
    if c.server.len() > 1 && c.transport != TransportChoice::Starttls {
        anyhow::bail!(
            "several --server are for STARTTLS; --transport websocket takes one --ws-url"
        );
    }
    let servers = c
        .server
        .iter()
        .map(|s| resolve(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let first_server = *servers
        .first()
        .ok_or_else(|| anyhow!("--server is empty"))?;
    let (addr, transport) = match c.transport {
        TransportChoice::Starttls => (first_server, Transport::Starttls),
        TransportChoice::Websocket => {
            let (hostport, transport) = Transport::parse_ws_url(&c.ws_url)?;
            (resolve(hostport)?, transport)
        }
    };
    let target = Target {
        addr,
        transport,
        source_first: c.source_first,
        domain: c.domain.clone(),
        password: c.password.clone(),
        mech: c.mech,
        source_addrs: c.source_addrs,
        login_timeout: Duration::from_secs_f64(c.login_timeout),
    };
    let ctx = Ctx {
        target,
        user_prefix: c.user_prefix.clone(),
        user_offset: c.user_offset,
        muc: c
            .muc
            .clone()
            .unwrap_or_else(|| format!("conference.{}", c.domain)),
        room_prefix: c.room_prefix.clone(),
        server_pid: c.server_pid.first().copied(),
        label: c.label.clone(),
        connect_concurrency: c.connect_concurrency,
    };
    let env = if matches!(cli.command, Command::LyncWorker(_)) {
        json!(null)
    } else {
        stats::environment(c.fsync_probe_dir.as_deref())
    };
    let report: Report = match &cli.command {
        Command::Fanout(a) => scenario::fanout::run(&ctx, a).await?,
        Command::Idle(a) => scenario::idle::run(&ctx, a).await?,
        Command::JoinHistory(a) => scenario::history::run(&ctx, a).await?,
        Command::Mam(a) => scenario::mam::run(&ctx, a).await?,
        Command::Ack(a) => scenario::ack::run(&ctx, a).await?,
        Command::Lync(a) => {
            let pool = scenario::lync::Servers {
                addrs: servers,
                pids: c.server_pid.clone(),
            };
            scenario::lync::run(&ctx, a, &pool).await?
        }
        Command::LyncWorker(a) => {
            let pool = scenario::lync::Servers {
                addrs: servers,
                pids: Vec::new(),
            };
            return scenario::lync::worker(&ctx, a, &pool).await;
        }
        Command::Register { count, parallel } => {
            return register(&ctx, *count, *parallel).await;
        }
        Command::Report { .. } | Command::Portable(_) => {
            unreachable!("handled before the runtime starts")
        }
    };
    let mut line = report.to_json(&ctx);
    if matches!(ctx.target.transport, Transport::WebSocket { .. }) {
        // Kept apart from the same scenario over STARTTLS in every table.
        line["scenario"] = json!(format!("{}-ws", report.scenario));
    }
    if let Some(name) = &c.scenario_name {
        line["scenario"] = json!(name);
    }
    line["env"] = env;
    println!("{line}");
    eprint!("{}", report.to_table(&ctx));
    Ok(())
}

async fn register(ctx: &Ctx, count: usize, parallel: usize) -> anyhow::Result<()> {
    let sem = Arc::new(Semaphore::new(parallel.max(1)));
    let mut set = JoinSet::new();
    // Registration throttles exempt 127.0.0.1 on Prosody (registration_whitelist), so every
    // registration comes from that one address; `count` is small enough for its ports.
    let mut target = ctx.target.clone();
    target.source_addrs = 1;
    for i in 0..count {
        let (sem, target, user) = (sem.clone(), target.clone(), ctx.user(i));
        set.spawn(async move {
            let _p = sem.acquire_owned().await.expect("semaphore open");
            conn::register(&target, &user, 0).await
        });
    }
    let (mut created, mut existed) = (0, 0);
    while let Some(r) = set.join_next().await {
        if r?? {
            created += 1;
        } else {
            existed += 1;
        }
    }
    println!(
        "{}",
        json!({"ok": true, "scenario": "register", "server": ctx.label, "created": created, "existed": existed})
    );
    Ok(())
}

/// Median and range of one metric for one server.
fn summary(values: &[f64]) -> Option<(f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    Some((median, v[0], v[v.len() - 1]))
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn report(servers: &[String], files: &[std::path::PathBuf]) -> anyhow::Result<String> {
    // scenario -> metric order, and (scenario, metric, server) -> values
    let mut order: Vec<String> = Vec::new();
    let mut metrics: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut values: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
    let mut failures: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {f:?}"))?;
        for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
            let v: Value = serde_json::from_str(line).with_context(|| format!("in {f:?}"))?;
            let scen = v["scenario"].as_str().unwrap_or("?").to_string();
            let server = v["server"].as_str().unwrap_or("?").to_string();
            if scen == "register" {
                continue;
            }
            if !order.contains(&scen) {
                order.push(scen.clone());
            }
            if v["ok"] != json!(true) {
                failures
                    .entry((scen, server))
                    .or_default()
                    .push(v["error"].as_str().unwrap_or("?").to_string());
                continue;
            }
            // The conditions each run started under, tabulated like a scenario so that an
            // outlier can be matched with a busy machine or a slow disk.
            let env = [
                ("loadavg_1m", v["env"]["loadavg_1m"].as_f64()),
                (
                    "fsync_4k_p50_ms",
                    v["env"]["fsync_4k_ms"]["p50_ms"].as_f64(),
                ),
                (
                    "fsync_4k_max_ms",
                    v["env"]["fsync_4k_ms"]["max_ms"].as_f64(),
                ),
            ];
            for (k, x) in env {
                let Some(x) = x else { continue };
                let m = metrics.entry("environment".into()).or_default();
                if !m.iter().any(|(name, _)| name == k) {
                    m.push((k.into(), String::new()));
                }
                values
                    .entry(("environment".into(), k.into(), server.clone()))
                    .or_default()
                    .push(x);
            }
            let Some(head) = v["headline"].as_object() else {
                continue;
            };
            for (k, x) in head {
                let better = v["better"][k].as_str().unwrap_or("").to_string();
                let m = metrics.entry(scen.clone()).or_default();
                if !m.iter().any(|(name, _)| name == k) {
                    m.push((k.clone(), better));
                }
                if let Some(x) = x.as_f64() {
                    values
                        .entry((scen.clone(), k.clone(), server.clone()))
                        .or_default()
                        .push(x);
                }
            }
        }
    }
    let mut out = String::new();
    let first = servers.first().cloned().unwrap_or_default();
    let mut header = "| scenario | metric |".to_string();
    let mut rule = "|---|---|".to_string();
    for s in servers {
        header.push_str(&format!(" {s} median (min–max) |"));
        rule.push_str("---|");
    }
    for s in servers.iter().skip(1) {
        header.push_str(&format!(" {first}/{s} |"));
        rule.push_str("---|");
    }
    out.push_str(&format!("{header}\n{rule}\n"));
    order.push("environment".into());
    for scen in &order {
        for (metric, better) in metrics.get(scen).map(Vec::as_slice).unwrap_or(&[]) {
            let arrow = match better.as_str() {
                "higher" => " ↑",
                "lower" => " ↓",
                _ => "",
            };
            let mut row = format!("| {scen} | {metric}{arrow} |");
            let mut medians = Vec::new();
            for s in servers {
                let key = (scen.clone(), metric.clone(), s.clone());
                match values.get(&key).and_then(|v| summary(v)) {
                    Some((m, lo, hi)) => {
                        let n = values[&key].len();
                        row.push_str(&format!(
                            " {} ({}–{}, n={n}) |",
                            fmt_num(m),
                            fmt_num(lo),
                            fmt_num(hi)
                        ));
                        medians.push(Some(m));
                    }
                    None => {
                        let failed = failures.contains_key(&(scen.clone(), s.clone()));
                        row.push_str(if failed { " failed |" } else { " n/a |" });
                        medians.push(None);
                    }
                }
            }
            for m in medians.iter().skip(1) {
                match (medians[0], m) {
                    (Some(a), Some(b)) if *b != 0.0 => row.push_str(&format!(" {:.2} |", a / b)),
                    _ => row.push_str(" – |"),
                }
            }
            out.push_str(&row);
            out.push('\n');
        }
    }
    if !failures.is_empty() {
        out.push_str("\nFailed runs:\n");
        for ((scen, server), errs) in &failures {
            let mut e = errs[0].clone();
            e.truncate(300);
            out.push_str(&format!(
                "- {scen} on {server}: {} failed; first: {e}\n",
                errs.len()
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(summary(&[4.0, 1.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(summary(&[]), None);
    }

    #[test]
    fn report_table() {
        let dir = std::env::temp_dir().join(format!("pchat-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("r.jsonl");
        std::fs::write(
            &f,
            concat!(
                r#"{"ok":true,"scenario":"ack","server":"a","headline":{"p50_ms":2.0},"better":{"p50_ms":"lower"}}"#,
                "\n",
                r#"{"ok":true,"scenario":"ack","server":"b","headline":{"p50_ms":4.0},"better":{"p50_ms":"lower"}}"#,
                "\n",
                r#"{"ok":false,"scenario":"mam","server":"b","error":"boom"}"#,
                "\n"
            ),
        )
        .unwrap();
        let t = report(&["a".into(), "b".into()], &[f]).unwrap();
        assert!(
            t.contains("| ack | p50_ms ↓ | 2.00 (2.00–2.00, n=1) | 4.00 (4.00–4.00, n=1) | 0.50 |"),
            "{t}"
        );
        assert!(t.contains("mam on b: 1 failed"), "{t}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
