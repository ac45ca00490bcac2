//! Fault injection against the real binary: kill -9 under load and a crash between the
//! compliance commit and the archive commit. Each test checks the outcome from a client's
//! ledger of acknowledged stanza-ids and from the compliance record.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use pchat_testkit::{ns, stanza_id, Client, Element, ServerOptions, TestServer};

type R = anyhow::Result<()>;

const ROOM: &str = "ledger@conference.localhost";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

async fn start(dir: &std::path::Path, env: Vec<(String, String)>) -> anyhow::Result<TestServer> {
    let opts = ServerOptions {
        data_dir: Some(dir.to_owned()),
        env,
        ..ServerOptions::default()
    };
    Ok(TestServer::start(&bin(), opts).await?)
}

async fn create_room(c: &mut Client) -> R {
    c.join_room(ROOM, "alice", None).await?;
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", ROOM)
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    c.iq_result(submit, Duration::from_secs(10)).await?;
    Ok(())
}

#[derive(serde::Deserialize)]
struct Record {
    event: Event,
    message_seq: Option<i64>,
    committed: bool,
}

#[derive(serde::Deserialize)]
struct Event {
    kind: String,
    room: String,
}

/// Message compliance records of the ledger room: seq → committed flags seen.
async fn compliance(s: &TestServer) -> anyhow::Result<BTreeMap<i64, Vec<bool>>> {
    let out = s
        .run_cli_ok(["--json", "compliance", "list", "--limit", "100000"])
        .await?;
    let records: Vec<Record> = serde_json::from_slice(&out.stdout)?;
    let mut map: BTreeMap<i64, Vec<bool>> = BTreeMap::new();
    for r in records
        .into_iter()
        .filter(|r| r.event.kind == "message" && r.event.room == ROOM)
    {
        map.entry(r.message_seq.expect("message records carry their seq"))
            .or_default()
            .push(r.committed);
    }
    Ok(map)
}

/// I1 and I3 through a kill -9 in the middle of a stream of messages: every acknowledged
/// message is in the archive after restart, ids have no holes, and every archived message has
/// a committed compliance record.
#[tokio::test]
async fn kill9_under_load_loses_no_acknowledged_message() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = start(dir.path(), Vec::new()).await?;
    s.add_user("alice@localhost", "pw").await?;
    let mut alice = s.client("alice@localhost", "pw").await?;
    create_room(&mut alice).await?;
    let writer = tokio::spawn(async move {
        let mut acked = Vec::new();
        // Bounded: at most 2,000 messages or until the server dies.
        for i in 0..2000 {
            match alice
                .send_groupchat(ROOM, &format!("n{i}"), Some(&format!("o{i}")))
                .await
            {
                Ok(ack) => acked.push(
                    stanza_id(&ack, ROOM)
                        .and_then(|x| x.parse::<i64>().ok())
                        .unwrap_or(-1),
                ),
                Err(_) => break,
            }
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.kill9();
    let acked = tokio::time::timeout(Duration::from_secs(30), writer).await??;
    assert!(
        acked.len() > 5,
        "the writer got going before the kill ({} acks)",
        acked.len()
    );
    s.start_again().await?;
    let mut alice = s.client("alice@localhost", "pw").await?;
    let ids = alice.mam_all_ids(ROOM).await?;
    for a in &acked {
        assert!(ids.contains(a), "acknowledged message {a} lost");
    }
    let expect: Vec<i64> = (1..=ids.len() as i64).collect();
    assert_eq!(ids, expect, "archive ids are gapless and ordered");
    let comp = compliance(&s).await?;
    for id in &ids {
        assert!(
            comp.get(id).is_some_and(|v| v.contains(&true)),
            "archived message {id} has no committed compliance record"
        );
    }
    Ok(())
}

/// A crash after the compliance commit and before the archive commit: the message was never
/// acknowledged, is not in the archive, its compliance record says it never committed, and a
/// retry with the same origin-id stores it once.
#[tokio::test]
async fn crash_between_compliance_and_archive_commits() -> R {
    let dir = tempfile::tempdir()?;
    let mut s = start(dir.path(), Vec::new()).await?;
    s.add_user("alice@localhost", "pw").await?;
    let mut alice = s.client("alice@localhost", "pw").await?;
    create_room(&mut alice).await?;
    alice.send_groupchat(ROOM, "first", Some("o-1")).await?;
    drop(alice);
    s.stop().await?;

    let fault = vec![(
        "PCHAT_FAULT".to_owned(),
        "abort-after-compliance-commit".to_owned(),
    )];
    let mut s = start(dir.path(), fault).await?;
    let mut alice = s.client("alice@localhost", "pw").await?;
    alice.join_room(ROOM, "alice", None).await?;
    let lost = alice.send_groupchat(ROOM, "second", Some("o-2")).await;
    assert!(lost.is_err(), "the server aborted: no acknowledgment");
    let _ = s.kill9();

    let s = start(dir.path(), Vec::new()).await?;
    let mut alice = s.client("alice@localhost", "pw").await?;
    let joined = alice.join_room(ROOM, "alice", None).await?;
    assert_eq!(
        joined.history_bodies(),
        ["first"],
        "the unacknowledged message is not in the archive"
    );
    let comp = compliance(&s).await?;
    assert_eq!(
        comp.get(&2).map(Vec::as_slice),
        Some(&[false][..]),
        "recorded as never committed"
    );
    let ack = alice.send_groupchat(ROOM, "second", Some("o-2")).await?;
    assert_eq!(stanza_id(&ack, ROOM).as_deref(), Some("2"));
    let comp = compliance(&s).await?;
    assert_eq!(comp.get(&2).map(Vec::as_slice), Some(&[false, true][..]));
    Ok(())
}
