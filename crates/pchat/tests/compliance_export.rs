//! The compliance adapter from an operator's side, on a standalone server: `pchat compliance
//! export` writes Lync's XML (validated against docs/operations/compliance.xsd by Debian's
//! xmllint) and JSON lines; an exporter killed between any two of its steps leaves neither a
//! gap nor a duplicate once it runs again; a second exporter waits for the first; exported
//! records are purged after their retention; the server's own job (`[compliance]`) exports
//! while clients talk.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use pchat_testkit::{Client, ServerOptions, TestServer};

type R = anyhow::Result<()>;

const ROOM: &str = "desk@conference.localhost";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

fn xsd() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations/compliance.xsd")
}

async fn server(options: ServerOptions) -> anyhow::Result<TestServer> {
    let s = TestServer::start(&bin(), options).await?;
    for u in ["ann", "bob"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    Ok(s)
}

async fn login(s: &TestServer, user: &str) -> anyhow::Result<Client> {
    Ok(
        s.client(&format!("{user}@localhost"), &format!("{user}-pw"))
            .await?,
    )
}

/// `pchat --data-dir D ARGS` with `fault` in PCHAT_COMPLIANCE_FAULT.
async fn pchat(
    s: &TestServer,
    args: &[&str],
    fault: Option<&str>,
) -> anyhow::Result<std::process::Output> {
    let mut c = tokio::process::Command::new(bin());
    c.arg("--data-dir").arg(s.data_dir()).args(args);
    if let Some(f) = fault {
        c.env("PCHAT_COMPLIANCE_FAULT", f);
    }
    Ok(c.stdin(Stdio::null()).output().await?)
}

fn out_dir() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::tempdir()?)
}

/// Every record id in every file of `dir`, with how many times it appears.
fn exported(dir: &Path) -> anyhow::Result<BTreeMap<i64, usize>> {
    let mut seen = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "a temporary file was left: {name}");
        let text = std::fs::read_to_string(&path)?;
        if name.ends_with(".jsonl") {
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line)?;
                *seen.entry(v["record"].as_i64().unwrap()).or_default() += 1;
            }
        } else {
            for part in text.split(" record=\"").skip(1) {
                let id: i64 = part.split('"').next().unwrap().parse()?;
                *seen.entry(id).or_default() += 1;
            }
        }
    }
    Ok(seen)
}

/// Every compliance record id the store holds, from `pchat compliance list`.
async fn all_ids(s: &TestServer) -> anyhow::Result<Vec<i64>> {
    let out = s
        .run_cli_ok(["--json", "compliance", "list", "--limit", "10000"])
        .await?;
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(v.iter().map(|r| r["id"].as_i64().unwrap()).collect())
}

fn xmllint(file: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(xsd())
        .arg(file)
        .output()
        .map_err(|e| anyhow::anyhow!("xmllint (Debian's libxml2-utils) cannot run: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{} does not validate: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

async fn talk(s: &TestServer, words: &[&str]) -> anyhow::Result<()> {
    let mut ann = login(s, "ann").await?;
    ann.join_room(ROOM, "ann", None).await?;
    for w in words {
        ann.send_groupchat(ROOM, w, None).await?;
    }
    ann.leave_room(ROOM, "ann").await?;
    ann.close().await?;
    Ok(())
}

/// Lync's XML, valid against the XSD, with joins, messages (escaped) and parts; a second run
/// exports only the first run's own record; then nothing is new.
#[tokio::test]
async fn lync_xml_validates_and_each_record_is_exported_once() -> R {
    let s = server(ServerOptions::default()).await?;
    talk(&s, &["hello <b>&amp; \"all\"", "second"]).await?;
    // Reading history is recorded (Lync's BACKCHAT): on join, and by an archive query.
    let mut bob = login(&s, "bob").await?;
    let joined = bob.join_room(ROOM, "bob", None).await?;
    assert_eq!(joined.history.len(), 2);
    let page = bob.mam_query(ROOM, &[], None).await?;
    assert_eq!(page.bodies().len(), 2);
    bob.close().await?;
    let listed = s
        .run_cli_ok(["--json", "compliance", "list", "--limit", "1000"])
        .await?;
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout)?;
    let backchat: Vec<&str> = listed
        .iter()
        .filter(|r| r["event"]["kind"] == "backchat")
        .map(|r| r["event"]["detail"].as_str().unwrap())
        .collect();
    assert_eq!(backchat.len(), 2, "{listed:?}");
    assert!(
        backchat[0].starts_with("history on join: 2 messages"),
        "{backchat:?}"
    );
    assert!(
        backchat[1].starts_with("archive query: 2 messages"),
        "{backchat:?}"
    );
    let out = out_dir()?;
    let dir = out.path().to_str().unwrap();
    let first = s
        .run_cli_ok(["--json", "compliance", "export", "--to", dir, "--once"])
        .await?;
    let report: serde_json::Value = serde_json::from_slice(&first.stdout)?;
    let files: Vec<PathBuf> = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| PathBuf::from(f.as_str().unwrap()))
        .collect();
    assert_eq!(files.len(), 1, "{report}");
    xmllint(&files[0])?;
    let text = std::fs::read_to_string(&files[0])?;
    for want in [
        "type=\"JOIN\"",
        "type=\"PART\"",
        "type=\"CHAT\" content=\"hello &lt;b&gt;&amp;amp; &quot;all&quot;\"",
        "uri=\"xmpp:desk@conference.localhost\"",
        "<Sender UserName=\"ann\" id=\"ann@localhost\" internal=\"true\"",
        "type=\"BACKCHAT\" content=\"history on join: 2 messages",
    ] {
        assert!(text.contains(want), "{want} not in {text}");
    }
    // The run's own record, then nothing.
    let second = s
        .run_cli_ok(["--json", "compliance", "export", "--to", dir, "--once"])
        .await?;
    let r2: serde_json::Value = serde_json::from_slice(&second.stdout)?;
    assert_eq!(r2["records"], 1, "{r2}");
    let f2 = PathBuf::from(r2["files"][0].as_str().unwrap());
    xmllint(&f2)?;
    assert!(std::fs::read_to_string(&f2)?.contains("type=\"EXPORTRUN\""));
    let third = s
        .run_cli_ok(["compliance", "export", "--to", dir, "--once"])
        .await?;
    assert!(
        String::from_utf8_lossy(&third.stdout).contains("nothing new"),
        "{third:?}"
    );
    let seen = exported(out.path())?;
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        all_ids(&s).await?,
        "every record, in the files"
    );
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    let status = s.run_cli_ok(["compliance", "status"]).await?;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("runs: 2"),
        "{status:?}"
    );

    // Per room, JSON lines.
    talk(&s, &["third"]).await?;
    let per = out_dir()?;
    s.run_cli_ok([
        "compliance",
        "export",
        "--to",
        per.path().to_str().unwrap(),
        "--once",
        "--per-room",
        "--format",
        "jsonl",
    ])
    .await?;
    let names: Vec<String> = std::fs::read_dir(per.path())?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // Only the room's file: the run before exported nothing but a run record, and such a run
    // is not recorded (or every run would leave one more record for the next).
    assert!(
        names.len() == 1 && names[0].ends_with("-desk@conference.localhost.jsonl"),
        "{names:?}"
    );

    // Bad arguments and a missing share change nothing.
    let missing = s
        .run_cli([
            "compliance",
            "export",
            "--to",
            "/nonexistent/share",
            "--once",
        ])
        .await?;
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("mkdir -p"),
        "{missing:?}"
    );
    let bad = s
        .run_cli(["compliance", "export", "--to", dir, "--format", "pdf"])
        .await?;
    assert!(!bad.status.success());
    Ok(())
}

/// The exporter killed (abort) after each of its steps: the next run finishes the same range,
/// so the files hold every record exactly once.
#[tokio::test]
async fn a_killed_exporter_leaves_neither_a_gap_nor_a_duplicate() -> R {
    let s = server(ServerOptions::default()).await?;
    let out = out_dir()?;
    let dir = out.path().to_str().unwrap();
    for (i, fault) in ["begin", "file", "finish"].into_iter().enumerate() {
        talk(&s, &[&format!("before {fault}"), &format!("and {i}")]).await?;
        let killed = pchat(
            &s,
            &[
                "compliance",
                "export",
                "--to",
                dir,
                "--once",
                "--format",
                "jsonl",
                "--per-room",
            ],
            Some(fault),
        )
        .await?;
        assert!(
            !killed.status.success(),
            "{fault}: the fault must abort the run"
        );
        let status = s.run_cli_ok(["compliance", "status"]).await?;
        assert!(
            String::from_utf8_lossy(&status.stdout).contains("an interrupted run"),
            "{fault}: {status:?}"
        );
        // More records arrive meanwhile: the resumed run must not take them into its range.
        talk(&s, &[&format!("after {fault}")]).await?;
        let resumed = s
            .run_cli_ok([
                "--json",
                "compliance",
                "export",
                "--to",
                dir,
                "--once",
                "--format",
                "jsonl",
                "--per-room",
            ])
            .await?;
        let r: serde_json::Value = serde_json::from_slice(&resumed.stdout)?;
        assert_eq!(r["resumed"], true, "{fault}: {r}");
    }
    // Everything else, then compare with the store.
    loop {
        let o = s
            .run_cli_ok([
                "compliance",
                "export",
                "--to",
                dir,
                "--once",
                "--format",
                "jsonl",
                "--per-room",
            ])
            .await?;
        if String::from_utf8_lossy(&o.stdout).contains("nothing new") {
            break;
        }
    }
    let seen = exported(out.path())?;
    let dupes: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(dupes.is_empty(), "duplicates: {dupes:?}");
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), all_ids(&s).await?);
    Ok(())
}

/// A second exporter waits while the first holds the lock; exported records past their
/// retention are purged, the others stay.
#[tokio::test]
async fn a_second_exporter_waits_and_exported_records_are_purged() -> R {
    let s = server(ServerOptions::default()).await?;
    talk(&s, &["one", "two"]).await?;
    let out = out_dir()?;
    let dir = out.path().to_str().unwrap().to_owned();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(s.data_dir().join("compliance-export.lock"))?;
    lock.lock()?;
    let second = tokio::process::Command::new(bin())
        .arg("--data-dir")
        .arg(s.data_dir())
        .args(["compliance", "export", "--to", &dir, "--once"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        std::fs::read_dir(out.path())?.next().is_none(),
        "the second exporter must wait, not write"
    );
    lock.unlock()?;
    let done = tokio::time::timeout(Duration::from_secs(20), second.wait_with_output()).await??;
    assert!(done.status.success(), "{done:?}");
    assert!(
        String::from_utf8_lossy(&done.stderr).contains("waiting"),
        "{done:?}"
    );
    let before = all_ids(&s).await?;
    assert!(!before.is_empty());

    // Retention 0: what was exported goes; what came after stays.
    talk(&s, &["three"]).await?;
    let state: serde_json::Value = serde_json::from_slice(
        &s.run_cli_ok(["--json", "compliance", "status"])
            .await?
            .stdout,
    )?;
    let watermark = state["watermark"].as_i64().unwrap();
    // A run with retention 0 exports the new records, then purges everything exported.
    s.run_cli_ok([
        "compliance",
        "export",
        "--to",
        &dir,
        "--once",
        "--retention-h",
        "0",
    ])
    .await?;
    let left = all_ids(&s).await?;
    let state: serde_json::Value = serde_json::from_slice(
        &s.run_cli_ok(["--json", "compliance", "status"])
            .await?
            .stdout,
    )?;
    let now = state["watermark"].as_i64().unwrap();
    assert!(now > watermark);
    assert!(
        left.iter().all(|id| *id > now),
        "only records after the watermark stay: {left:?} (watermark {now})"
    );
    Ok(())
}

/// `[compliance]` in pchat.toml: the server's own job exports while clients talk.
#[tokio::test]
async fn the_servers_job_exports_on_its_interval() -> R {
    let data = tempfile::tempdir()?;
    let dir = data.path().join("data");
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let out = out_dir()?;
    std::fs::write(
        dir.join("pchat.toml"),
        format!(
            "domain = \"localhost\"\n[compliance]\nexport_dir = \"{}\"\nrun_interval_s = 1\nformat = \"lync-xml\"\n",
            out.path().display()
        ),
    )?;
    let s = server(ServerOptions {
        data_dir: Some(dir),
        ..ServerOptions::default()
    })
    .await?;
    talk(&s, &["for the job"]).await?;
    let t0 = Instant::now();
    loop {
        let seen = exported(out.path())?;
        let ids = all_ids(&s).await?;
        let chat = std::fs::read_dir(out.path())?.any(|e| {
            std::fs::read_to_string(e.unwrap().path())
                .unwrap_or_default()
                .contains("content=\"for the job\"")
        });
        let newest = seen.keys().last().copied().unwrap_or(0);
        let no_gap = ids
            .iter()
            .filter(|id| **id <= newest)
            .all(|id| seen.contains_key(id));
        if chat && no_gap {
            for e in std::fs::read_dir(out.path())? {
                xmllint(&e?.path())?;
            }
            eprintln!("the server's job exported within {:?}", t0.elapsed());
            return Ok(());
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "the job did not export: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
