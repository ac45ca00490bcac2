//! Latency summaries and process metrics read from `/proc`.
//!
//! Latencies are kept as raw microsecond samples and sorted once at the end: exact percentiles
//! are affordable at these volumes (a few million samples at most, bounded by the scenario's
//! rate × duration), and exactness avoids arguing about histogram bucket error when comparing
//! three servers whose p99s can differ by a few percent.

use serde::Serialize;

/// Upper bound on kept samples per scenario step; beyond it samples are dropped (counted).
pub const SAMPLES_MAX: usize = 20_000_000;

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl Latency {
    /// Summarises microsecond samples (sorts them in place).
    pub fn from_us(samples: &mut [u32]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            // Nearest-rank percentile: the smallest sample with at least q of the mass at or
            // below it.
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1] as f64 / 1000.0
        };
        Latency {
            n: samples.len(),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: samples[samples.len() - 1] as f64 / 1000.0,
        }
    }
}

/// Linux's USER_HZ: /proc/PID/stat counts CPU time in these ticks (100 on every mainstream
/// architecture; reading it properly would need libc's sysconf, not worth a dependency).
const TICKS_PER_S: f64 = 100.0;

/// CPU seconds (user + system) consumed so far by `pid` (all its threads; children are not
/// counted, and none of the servers under test forks workers).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ... utime is field 14 of the full line, i.e. index 11 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_S)
}

/// Resident set size of `pid` in KiB (`VmRSS` in /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU and memory of the server (if its pid is known) and of this process over an interval.
#[derive(Clone, Copy, Debug)]
pub struct CpuMark {
    server: Option<f64>,
    client: Option<f64>,
    at: std::time::Instant,
}

/// What a [`CpuMark`] measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuUse {
    /// Server CPU, in cores (1.0 = one core fully busy) over the interval.
    pub server_cores: Option<f64>,
    /// Load-generator CPU, in cores.
    pub client_cores: Option<f64>,
    /// Server RSS at the end, KiB.
    pub server_rss_kib: Option<u64>,
}

impl CpuMark {
    /// Starts measuring.
    pub fn start(server_pid: Option<u32>) -> CpuMark {
        CpuMark {
            server: server_pid.and_then(cpu_seconds),
            client: cpu_seconds(std::process::id()),
            at: std::time::Instant::now(),
        }
    }

    /// Seconds since the mark.
    pub fn elapsed_s(&self) -> f64 {
        self.at.elapsed().as_secs_f64()
    }

    /// Ends measuring.
    pub fn stop(&self, server_pid: Option<u32>) -> CpuUse {
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        let server_now = server_pid.and_then(cpu_seconds);
        let client_now = cpu_seconds(std::process::id());
        let round = |v: f64| (v * 100.0).round() / 100.0;
        CpuUse {
            server_cores: match (self.server, server_now) {
                (Some(a), Some(b)) => Some(round((b - a) / secs)),
                _ => None,
            },
            client_cores: match (self.client, client_now) {
                (Some(a), Some(b)) => Some(round((b - a) / secs)),
                _ => None,
            },
            server_rss_kib: server_pid.and_then(rss_kib),
        }
    }
}

/// What else was happening on the machine when a scenario started: the 1-minute load average
/// and the latency of small fsyncs in `dir`. The benchmark machine is shared (builds run
/// beside it), and every server under test fsyncs on commit, so a slow disk moment explains
/// an outlier better than any server property.
pub fn environment(dir: Option<&std::path::Path>) -> serde_json::Value {
    let load1 = std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| {
        s.split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
    });
    let fsync = dir.and_then(|d| fsync_probe(d, 20).ok());
    serde_json::json!({
        "loadavg_1m": load1,
        "fsync_4k_ms": fsync,
    })
}

/// Writes and fsyncs 4 KiB `count` times; returns the latency summary (ms).
fn fsync_probe(dir: &std::path::Path, count: usize) -> std::io::Result<Latency> {
    use std::io::Write as _;
    let path = dir.join(format!(".pchat-bench-fsync-{}", std::process::id()));
    let mut f = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut us = Vec::with_capacity(count);
    for _ in 0..count {
        let t = std::time::Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(Latency::from_us(&mut us))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<u32> = (1..=1000).map(|x| x * 1000).collect();
        let l = Latency::from_us(&mut v);
        assert_eq!(l.n, 1000);
        assert_eq!(l.p50_ms, 500.0);
        assert_eq!(l.p99_ms, 990.0);
        assert_eq!(l.max_ms, 1000.0);
        assert_eq!(Latency::from_us(&mut []).n, 0);
    }

    #[test]
    fn reads_own_proc() {
        assert!(cpu_seconds(std::process::id()).is_some());
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
