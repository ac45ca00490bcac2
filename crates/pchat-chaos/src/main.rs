//! `pchat-chaos`: runs the chaos suite (see the crate's documentation and
//! docs/operations/fault-tolerance.md). As root; `scripts/chaos` builds and calls it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use pchat_chaos::{run_blocking, summary, Keep, Profile, RunConfig, Schedule};

#[derive(Parser)]
#[command(
    about = "Seeded fault schedules against the two-site pchat pool, checked from the clients' ledgers"
)]
struct Cli {
    /// The pchat binary (default: target/debug/pchat, else target/release/pchat).
    #[arg(long, global = true)]
    pchat: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProfileArg {
    Short,
    Long,
}

#[derive(Clone, Copy, ValueEnum)]
enum KeepArg {
    Never,
    Failure,
    Always,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the schedule of a seed without running it.
    /// Example: pchat-chaos show --seed 7 --profile long
    Show {
        #[arg(long)]
        seed: u64,
        #[arg(long, value_enum, default_value = "long")]
        profile: ProfileArg,
    },
    /// Run one seed, or a schedule file (`--schedule`), once.
    /// Example: pchat-chaos run --seed 7 --profile long
    Run {
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        schedule: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "long")]
        profile: ProfileArg,
        #[arg(long, value_enum, default_value = "failure")]
        keep: KeepArg,
    },
    /// Run many seeds one after the other within a time budget; print the summary table.
    /// Example: pchat-chaos runs --runs 100 --first-seed 1 --budget-min 600
    Runs {
        #[arg(long, default_value_t = 100)]
        runs: u64,
        #[arg(long, default_value_t = 1)]
        first_seed: u64,
        #[arg(long, value_enum, default_value = "long")]
        profile: ProfileArg,
        /// Stop starting runs after this many minutes.
        #[arg(long, default_value_t = 600)]
        budget_min: u64,
        #[arg(long, value_enum, default_value = "failure")]
        keep: KeepArg,
        /// Also write the table here.
        #[arg(long)]
        summary: Option<PathBuf>,
    },
}

fn locate(pchat: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = pchat.or_else(|| std::env::var_os("PCHAT_BIN").map(PathBuf::from)) {
        return Ok(p);
    }
    let here = std::env::current_exe()?;
    let dir = here.parent().context("no directory")?;
    for c in [
        dir.join("pchat"),
        dir.join("../debug/pchat"),
        dir.join("../release/pchat"),
    ] {
        if c.is_file() {
            return Ok(c);
        }
    }
    bail!(
        "no pchat binary beside {}: cargo build -p pchat, or --pchat PATH",
        here.display()
    )
}

fn profile(p: ProfileArg) -> Profile {
    match p {
        ProfileArg::Short => Profile::Short,
        ProfileArg::Long => Profile::Long,
    }
}

fn keep(k: KeepArg) -> Keep {
    match k {
        KeepArg::Never => Keep::Never,
        KeepArg::Failure => Keep::OnFailure,
        KeepArg::Always => Keep::Always,
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Show { seed, profile: p } => {
            print!("{}", Schedule::generate(seed, profile(p)));
            Ok(())
        }
        Cmd::Run {
            seed,
            schedule,
            profile: p,
            keep: k,
        } => {
            let bin = locate(cli.pchat)?;
            let schedule = match (seed, schedule) {
                (Some(s), None) => Schedule::generate(s, profile(p)),
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("{}: {e}", f.display()))?,
                _ => bail!("give --seed N or --schedule FILE"),
            };
            let report = run_blocking(RunConfig {
                bin,
                schedule,
                id: format!("{}", std::process::id() % 10_000),
                keep: keep(k),
                out: None,
            });
            print!("{}", summary::table(std::slice::from_ref(&report)));
            if !report.passed() {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Runs {
            runs,
            first_seed,
            profile: p,
            budget_min,
            keep: k,
            summary: file,
        } => {
            let bin = locate(cli.pchat)?;
            let budget = Duration::from_secs(budget_min * 60);
            let started = Instant::now();
            let mut reports = Vec::new();
            for seed in first_seed..first_seed.saturating_add(runs) {
                if started.elapsed() >= budget {
                    eprintln!(
                        "time budget of {budget_min} min used: {} of {runs} runs done",
                        reports.len()
                    );
                    break;
                }
                let out: Arc<Mutex<dyn std::io::Write + Send>> =
                    Arc::new(Mutex::new(std::io::stderr()));
                let report = run_blocking(RunConfig {
                    bin: bin.clone(),
                    schedule: Schedule::generate(seed, profile(p)),
                    id: format!("{}", std::process::id() % 10_000),
                    keep: keep(k),
                    out: Some(out),
                });
                eprintln!(
                    "seed {seed}: {}",
                    if report.passed() { "pass" } else { "FAIL" }
                );
                reports.push(report);
                let table = summary::table(&reports);
                if let Some(f) = &file {
                    std::fs::write(f, &table)?;
                }
            }
            let table = summary::table(&reports);
            print!("{table}");
            if reports.iter().any(|r| !r.passed()) {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
