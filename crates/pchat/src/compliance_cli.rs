//! `pchat compliance export|status`: the compliance adapter run from the shell.

use std::path::PathBuf;
use std::time::Duration;

use pchat_server::compliance::{self, ExportOptions, ExporterLock, Format};

use crate::{open, Target};

/// What `pchat compliance configure` changes (nothing given: it shows the settings).
#[derive(clap::Args)]
pub(crate) struct ConfigureArgs {
    /// Where every server's job writes (an absolute path each server may write, the same
    /// share on every server).
    #[arg(long, value_name = "DIR")]
    export_dir: Option<PathBuf>,
    /// No export job on any server of the pool (`compliance export` from the shell still
    /// works).
    #[arg(long, conflicts_with = "export_dir")]
    off: bool,
    /// Seconds between runs (Lync's RunInterval).
    #[arg(long, value_name = "SECONDS")]
    run_interval_s: Option<u64>,
    /// `lync-xml` or `jsonl`.
    #[arg(long, value_parser = ["lync-xml", "jsonl"])]
    format: Option<String>,
    /// One file per room and run (Lync's OneChatRoomPerOutputFile).
    #[arg(long, value_name = "true|false")]
    one_room_per_file: Option<bool>,
    /// Hours exported records stay before they are purged.
    #[arg(long, value_name = "HOURS")]
    retention_h: Option<u64>,
    /// Records one run exports at most.
    #[arg(long)]
    records_per_run: Option<u32>,
    /// Forget the pool's settings: each server's own `[compliance]` applies again.
    #[arg(long, conflicts_with_all = ["export_dir", "off", "run_interval_s", "format", "one_room_per_file", "retention_h", "records_per_run"])]
    reset: bool,
}

/// `pchat compliance configure`: the pool's export settings in etcd.
pub(crate) async fn configure(t: &Target, json: bool, a: ConfigureArgs) -> anyhow::Result<()> {
    let Some(pool) = &t.in_pool else {
        anyhow::bail!(
            "a standalone server's export job is set in its pchat.toml ([compliance] export_dir, run_interval_s, ...); `compliance configure` sets a pool's: add --in-pool POOL"
        );
    };
    let etcd = t.etcd.connect(Some(pool))?;
    let key = pchat_control::keys::compliance_settings(pool);
    let changes = a.export_dir.is_some()
        || a.off
        || a.run_interval_s.is_some()
        || a.format.is_some()
        || a.one_room_per_file.is_some()
        || a.retention_h.is_some()
        || a.records_per_run.is_some();
    if a.reset {
        etcd.delete(&key).await?;
    } else if changes {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let kv = etcd.get(&key).await?;
            let mut c = match &kv {
                Some(kv) => serde_json::from_slice(&kv.value).unwrap_or_default(),
                None => pchat_server::config::ComplianceConfig::default(),
            };
            if let Some(d) = &a.export_dir {
                c.export_dir = d.clone();
            }
            if a.off {
                c.export_dir = PathBuf::new();
            }
            if let Some(v) = a.run_interval_s {
                c.run_interval_s = v;
            }
            if let Some(v) = &a.format {
                c.format = v.clone();
            }
            if let Some(v) = a.one_room_per_file {
                c.one_room_per_file = v;
            }
            if let Some(v) = a.retention_h {
                c.retention_h = v;
            }
            if let Some(v) = a.records_per_run {
                c.records_per_run = v;
            }
            c.validate().map_err(anyhow::Error::msg)?;
            let revision = kv.as_ref().map_or(0, |kv| kv.mod_revision);
            if etcd
                .compare_and_put(&key, revision, &serde_json::to_vec(&c)?)
                .await?
                .is_some()
            {
                break;
            }
            anyhow::ensure!(
                attempt < 5,
                "the pool's compliance settings kept changing under this command: run it again"
            );
        }
    }
    let kv = etcd.get(&key).await?;
    let c: Option<pchat_server::config::ComplianceConfig> = kv
        .as_ref()
        .map(|kv| serde_json::from_slice(&kv.value))
        .transpose()?;
    if json {
        println!(
            "{}",
            serde_json::json!({"pool": pool, "settings": c, "source": if c.is_some() { "etcd" } else { "each server's pchat.toml" }})
        );
        return Ok(());
    }
    match c {
        None => println!(
            "pool {pool}: no compliance settings in etcd; each server's [compliance] in its pchat.toml applies"
        ),
        Some(c) => {
            println!("pool {pool} (etcd; every server follows within seconds):");
            if c.enabled() {
                println!("  export_dir        {}", c.export_dir.display());
            } else {
                println!("  export_dir        (none: no export job)");
            }
            println!("  run_interval_s    {}", c.run_interval_s);
            println!("  format            {}", c.format);
            println!("  one_room_per_file {}", c.one_room_per_file);
            println!("  retention_h       {}", c.retention_h);
            println!("  records_per_run   {}", c.records_per_run);
        }
    }
    Ok(())
}

/// What `pchat compliance export` was given.
pub(crate) struct ExportArgs {
    pub to: PathBuf,
    pub format: String,
    pub once: bool,
    pub per_room: bool,
    pub interval_s: u64,
    pub retention_h: Option<u64>,
    pub records_max: u32,
}

pub(crate) async fn export(t: &Target, json: bool, a: ExportArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=1_000_000).contains(&a.records_max),
        "--records-max takes 1 to 1000000"
    );
    anyhow::ensure!(
        (1..=86_400).contains(&a.interval_s),
        "--interval-s takes 1 to 86400"
    );
    let format = Format::parse(&a.format)
        .ok_or_else(|| anyhow::anyhow!("--format takes lync-xml or jsonl"))?;
    let (config, store) = open(t).await?;
    let options = ExportOptions {
        dir: a.to.clone(),
        format,
        per_room: a.per_room,
        records_max: a.records_max,
        domain: config.domain.clone(),
        retention: a
            .retention_h
            .map(|h| Duration::from_secs(h.saturating_mul(3600))),
        exporter: "pchat compliance export".into(),
    };
    let etcd = match &t.in_pool {
        Some(pool) => Some((t.etcd.connect(Some(pool))?, pool.clone())),
        None => None,
    };
    loop {
        let waiting = || eprintln!("another compliance exporter runs: waiting for it to finish");
        let lock = match &etcd {
            Some((etcd, pool)) => {
                ExporterLock::etcd(etcd, pool, "pchat compliance export", waiting).await?
            }
            None => ExporterLock::file(&t.data_dir, waiting).await?,
        };
        let window = match &etcd {
            Some((etcd, pool)) => compliance::pool_window(etcd, pool, &*store).await,
            None => None,
        };
        let ran = compliance::run_once(&*store, &options).await;
        if let (Ok(Some(r)), Some((etcd, pool))) = (&ran, &etcd) {
            compliance::pool_publish(etcd, pool, r.to).await;
        }
        lock.release().await;
        match ran? {
            Some(mut r) => {
                r.reexport_window = window;
                if let Some((from, to)) = window {
                    eprintln!(
                        "this database's export watermark ({from}) is behind the pool's ({to}): \
                         it was failed over or restored to an earlier point, so records \
                         {}-{to} may have been exported before (duplicates are possible there; \
                         the record attribute tells them apart from new ones only within one \
                         database's life)",
                        from + 1
                    );
                }
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "exported records {}-{} ({} records{}{}) to {}{}",
                        r.from,
                        r.to,
                        r.records,
                        if r.uncommitted > 0 {
                            format!(", {} of changes that never committed", r.uncommitted)
                        } else {
                            String::new()
                        },
                        if r.resumed {
                            ", finishing an interrupted run"
                        } else {
                            ""
                        },
                        r.files
                            .iter()
                            .map(|f| f.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        if r.purged > 0 {
                            format!("; purged {} exported records", r.purged)
                        } else {
                            String::new()
                        }
                    );
                }
            }
            None => {
                if json {
                    println!("null");
                } else {
                    println!("nothing new to export");
                }
            }
        }
        if a.once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(a.interval_s)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

pub(crate) async fn status(t: &Target, json: bool) -> anyhow::Result<()> {
    let (_, store) = open(t).await?;
    let s = store.compliance_export_state().await?;
    let waiting = store.compliance_after(s.watermark, 1).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "watermark": s.watermark,
                "pending_to": s.pending_to,
                "runs": s.runs,
                "finished_at": s.finished_at.map(pchat_server::datetime::format),
                "records_waiting": !waiting.is_empty(),
            })
        );
        return Ok(());
    }
    println!("exported up to record {}", s.watermark);
    if let Some(to) = s.pending_to {
        println!(
            "an interrupted run: records {}-{to} (the next run writes them again, same files)",
            s.watermark + 1
        );
    }
    println!(
        "runs: {}{}",
        s.runs,
        s.finished_at
            .map(|t| format!(", last finished {}", pchat_server::datetime::format(t)))
            .unwrap_or_default()
    );
    println!(
        "{}",
        if waiting.is_empty() {
            "nothing waiting to be exported"
        } else {
            "records are waiting to be exported"
        }
    );
    Ok(())
}
