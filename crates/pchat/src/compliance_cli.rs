//! `pchat compliance export|status`: the compliance adapter run from the shell.

use std::path::PathBuf;
use std::time::Duration;

use pchat_server::compliance::{self, ExportOptions, ExporterLock, Format};

use crate::{open, Target};

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
