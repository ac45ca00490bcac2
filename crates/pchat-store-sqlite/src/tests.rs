//! The conformance suite on real SQLite files, and what only SQLite has: reopening, the
//! reconcile after a crash between the two commits (simulated, then real), the schema and
//! directory guards, and batch isolation when a group fails.

use std::path::Path;

use pchat_room::{RoomConfig, RoomRecord, Timestamp};
use pchat_store::{
    ArchiveQuery, ComplianceKind, NewComplianceEvent, NewMessage, Store, StoreError, Write,
    WriteOutcome,
};
use tempfile::TempDir;

use crate::{data_files, SqliteOptions, SqliteStore};

/// A fresh store in its own temp dir; the dir lives as long as the store (see the suite's
/// `StoreFixture`).
pub(crate) async fn fresh_store() -> (SqliteStore, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        SqliteStore::open(dir.path(), SqliteOptions::default()).expect("open a fresh store");
    (store, dir)
}

pchat_store::store_conformance_tests!(crate::tests::fresh_store().await);

const ROOM: &str = "alpha@conference.localhost";

fn room(jid: &str) -> RoomRecord {
    RoomRecord {
        jid: jid.into(),
        config: RoomConfig::default(),
        affiliations: Vec::new(),
        voice: Vec::new(),
        subject: None,
        created_at: Timestamp(1),
        category: pchat_room::directory::DEFAULT_CATEGORY.into(),
        disabled: false,
        invitations_off: false,
        addin: None,
    }
}

fn message(body: &str, origin: Option<&str>) -> NewMessage {
    NewMessage {
        room: ROOM.into(),
        at: Timestamp(1_700_000_000_000_000),
        sender: "alice@localhost".into(),
        nick: "alice".into(),
        origin_id: origin.map(str::to_string),
        idempotency_key: None,
        record_revision: None,
        id_epoch: None,
        body: Some(body.into()),
        stanza: format!("<message><body>{body}</body></message>"),
    }
}

fn join_event(detail: &str) -> NewComplianceEvent {
    NewComplianceEvent {
        kind: ComplianceKind::Join,
        at: Timestamp(5),
        room: ROOM.into(),
        actor: "alice@localhost".into(),
        nick: None,
        detail: detail.into(),
    }
}

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir, SqliteOptions::default()).expect("open store")
}

async fn all_seqs(store: &SqliteStore) -> Vec<i64> {
    let page = store
        .archive_page(
            ROOM,
            &ArchiveQuery {
                limit: 1000,
                ..ArchiveQuery::default()
            },
        )
        .await
        .unwrap();
    page.messages.iter().map(|m| m.seq).collect()
}

#[tokio::test]
async fn data_files_are_mgc_and_mgccomp() {
    let (store, dir) = fresh_store().await;
    let files = data_files(dir.path());
    assert_eq!(
        files,
        [dir.path().join("mgc.db"), dir.path().join("mgccomp.db")]
    );
    assert!(files.iter().all(|f| f.exists()), "open creates both files");
    store.close().await.unwrap();
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["mgc.db", "mgccomp.db", "pchat.lock"],
        "a closed store leaves no WAL or journal behind"
    );
}

/// The server secret is made at the first open and kept by every later one (a shared open
/// included); another data directory has another.
#[tokio::test]
async fn server_secret_survives_reopen_and_differs_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let first = store.server_secret().await.unwrap();
    store.close().await.unwrap();
    let store = open(dir.path());
    assert_eq!(store.server_secret().await.unwrap(), first, "after reopen");
    let shared = SqliteStore::open(
        dir.path(),
        SqliteOptions {
            shared: true,
            ..SqliteOptions::default()
        },
    )
    .unwrap();
    assert_eq!(shared.server_secret().await.unwrap(), first, "shared open");
    let (other, _other_dir) = fresh_store().await;
    assert_ne!(other.server_secret().await.unwrap(), first);
}

/// The database files (with their WAL and shared-memory files, and the lock) are readable by
/// their owner only, whatever the umask, and files an older pchat left wider are tightened.
#[tokio::test]
async fn database_files_are_private() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mode = |name: &str| std::fs::metadata(dir.join(name)).unwrap().mode() & 0o7777;
    let store = open(&dir);
    store
        .commit(vec![Write::PutRoom(room(ROOM))])
        .await
        .unwrap();
    assert_eq!(mode(""), 0o700, "the data directory");
    for name in [
        "mgc.db",
        "mgccomp.db",
        "pchat.lock",
        "mgc.db-wal",
        "mgc.db-shm",
        "mgccomp.db-wal",
    ] {
        assert_eq!(mode(name), 0o600, "{name}");
    }
    store.close().await.unwrap();
    for name in ["mgc.db", "mgccomp.db", "pchat.lock"] {
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let store = open(&dir);
    for name in ["mgc.db", "mgccomp.db", "pchat.lock"] {
        assert_eq!(mode(name), 0o600, "{name} after reopen");
    }
    store.close().await.unwrap();
}

#[tokio::test]
async fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit(vec![
            Write::PutRoom(room(ROOM)),
            Write::Compliance(join_event("j")),
        ])
        .await
        .unwrap();
    for i in 0..3 {
        store
            .commit(vec![Write::AppendMessage(message(
                &format!("body {i}"),
                Some(&format!("o{i}")),
            ))])
            .await
            .unwrap();
    }
    let user = pchat_store::UserRecord {
        jid: "alice@localhost".into(),
        scram_sha1: pchat_store::ScramCredential {
            salt: vec![1],
            iterations: 1,
            stored_key: vec![2],
            server_key: vec![3],
        },
        scram_sha256: pchat_store::ScramCredential {
            salt: vec![4],
            iterations: 2,
            stored_key: vec![5],
            server_key: vec![6],
        },
        created_at: Timestamp(9),
    };
    store.user_put(user.clone()).await.unwrap();
    let compliance = store.compliance_after(0, 100).await.unwrap();
    store.close().await.unwrap();

    let store = open(dir.path());
    assert_eq!(store.user_get("alice@localhost").await.unwrap(), Some(user));
    assert_eq!(store.room_get(ROOM).await.unwrap(), Some(room(ROOM)));
    assert_eq!(all_seqs(&store).await, [1, 2, 3]);
    assert_eq!(
        store.compliance_after(0, 100).await.unwrap(),
        compliance,
        "compliance survives a reopen"
    );
    let fulltext = ArchiveQuery {
        fulltext: Some("body".into()),
        limit: 10,
        ..ArchiveQuery::default()
    };
    assert_eq!(
        store.archive_page(ROOM, &fulltext).await.unwrap().count,
        3,
        "the full-text index survives"
    );

    // Numbering and dedupe continue from what is on disk.
    let outcomes = store
        .commit(vec![
            Write::AppendMessage(message("again", Some("o1"))),
            Write::AppendMessage(message("new", None)),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [
            WriteOutcome::Appended {
                seq: 2,
                duplicate: true
            },
            WriteOutcome::Appended {
                seq: 4,
                duplicate: false
            }
        ]
    );
    let records = store.compliance_after(0, 100).await.unwrap();
    assert!(
        records.windows(2).all(|w| w[0].id < w[1].id),
        "compliance ids keep increasing after a reopen"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn drop_flushes_and_releases_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store
            .commit(vec![
                Write::PutRoom(room(ROOM)),
                Write::AppendMessage(message("kept", None)),
            ])
            .await
            .unwrap();
    }
    let store = open(dir.path());
    assert_eq!(all_seqs(&store).await, [1]);
}

#[tokio::test]
async fn a_second_store_on_the_same_directory_is_refused() {
    let (store, dir) = fresh_store().await;
    match SqliteStore::open(dir.path(), SqliteOptions::default()) {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("in use"), "{m}"),
        other => panic!("a second open must be refused, got {other:?}"),
    }
    store.close().await.unwrap();
    open(dir.path()).close().await.unwrap();
}

#[tokio::test]
async fn zero_sized_options_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        read_connections: 0,
        ..SqliteOptions::default()
    };
    assert!(matches!(
        SqliteStore::open(dir.path(), options),
        Err(StoreError::Invalid(_))
    ));
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    for (file, db) in [(0, "mgc.db"), (1, "mgccomp.db")] {
        let dir = tempfile::tempdir().unwrap();
        open(dir.path()).close().await.unwrap();
        let conn = rusqlite::Connection::open(&data_files(dir.path())[file]).unwrap();
        conn.execute("UPDATE schema_version SET version = 999", [])
            .unwrap();
        drop(conn);
        match SqliteStore::open(dir.path(), SqliteOptions::default()) {
            Err(StoreError::Corrupt(m)) => assert!(
                m.contains("999") && m.contains(db) && m.contains("newer"),
                "{m}"
            ),
            other => panic!("{db} with a newer schema must be refused, got {other:?}"),
        }
    }
}

/// The state a crash between the compliance commit and the mgc commit leaves, written by
/// hand: a compliance record of a batch mgc never applied.
#[tokio::test]
async fn reopen_marks_compliance_of_unapplied_batches_uncommitted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit(vec![
            Write::PutRoom(room(ROOM)),
            Write::AppendMessage(message("real", Some("a"))),
        ])
        .await
        .unwrap();
    store.close().await.unwrap();

    let [mgc, comp] = data_files(dir.path());
    let last_applied: i64 = rusqlite::Connection::open(&mgc)
        .unwrap()
        .query_row("SELECT last_batch_id FROM writer_state", [], |r| r.get(0))
        .unwrap();
    let conn = rusqlite::Connection::open(&comp).unwrap();
    conn.execute(
        "INSERT INTO compliance (batch_id, kind, at, room, actor, nick, detail, message_seq, committed) \
         VALUES (?1, 'message', 7, ?2, 'alice@localhost', 'alice', 'lost', 2, 1)",
        rusqlite::params![last_applied + 1, ROOM],
    )
    .unwrap();
    drop(conn);

    let store = open(dir.path());
    let records = store.compliance_after(0, 100).await.unwrap();
    assert_eq!(records.len(), 2);
    assert!(
        records[0].committed,
        "the applied message's record stays committed"
    );
    assert_eq!(
        (
            records[1].event.detail.as_str(),
            records[1].message_seq,
            records[1].committed
        ),
        ("lost", Some(2), false)
    );
    assert_eq!(all_seqs(&store).await, [1]);
    let outcome = store
        .commit(vec![Write::AppendMessage(message("next", None))])
        .await
        .unwrap();
    assert_eq!(
        outcome,
        [WriteOutcome::Appended {
            seq: 2,
            duplicate: false
        }],
        "no hole where the lost message was"
    );
    let records = store.compliance_after(records[1].id, 100).await.unwrap();
    assert_eq!(
        (records.len(), records[0].message_seq, records[0].committed),
        (1, Some(2), true)
    );
}

/// Child mode of [`crash_between_compliance_and_mgc_commits`]: runs only when the parent
/// sets `PCHAT_TEST_CRASH_DIR`, and then never returns (the writer aborts the process).
#[tokio::test]
async fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
        return;
    };
    let store = open(Path::new(&dir));
    let result = store
        .commit(vec![Write::AppendMessage(message(
            "doomed",
            Some("retry-me"),
        ))])
        .await;
    panic!("the writer should have aborted the process, commit returned {result:?}");
}

const CRASH_DIR_ENV: &str = "PCHAT_TEST_CRASH_DIR";

/// A real crash between the two commits: a child process (this test binary) commits one
/// message with `PCHAT_FAULT=abort-after-compliance-commit` and dies.
#[tokio::test]
async fn crash_between_compliance_and_mgc_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit(vec![Write::PutRoom(room(ROOM))])
        .await
        .unwrap();
    store.close().await.unwrap();

    let exe = std::env::current_exe().unwrap();
    let status = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "tests::crash_child",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .env(crate::FAULT_ENV, crate::FAULT_ABORT_AFTER_COMPLIANCE_COMMIT)
        .status()
        .await
        .unwrap();
    assert!(!status.success(), "the child must die in the writer");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(6),
            "the child must abort (SIGABRT), got {status:?}"
        );
    }

    let store = open(dir.path());
    assert_eq!(
        all_seqs(&store).await,
        Vec::<i64>::new(),
        "the message never reached mgc"
    );
    let records = store.compliance_after(0, 100).await.unwrap();
    assert_eq!(
        records.len(),
        1,
        "its compliance record was committed first: {records:?}"
    );
    assert_eq!(records[0].event.kind, ComplianceKind::Message);
    assert_eq!(records[0].event.detail, "doomed");
    assert_eq!(records[0].message_seq, Some(1));
    assert!(
        !records[0].committed,
        "the reconcile on open marks it uncommitted"
    );

    // The client never got an acknowledgement and resends: it is new, not a duplicate.
    let outcome = store
        .commit(vec![Write::AppendMessage(message(
            "doomed",
            Some("retry-me"),
        ))])
        .await
        .unwrap();
    assert_eq!(
        outcome,
        [WriteOutcome::Appended {
            seq: 1,
            duplicate: false
        }]
    );
    let records = store.compliance_after(0, 100).await.unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(
        (records[1].message_seq, records[1].committed),
        (Some(1), true)
    );
    assert_eq!(
        store
            .archive_get(ROOM, 1)
            .await
            .unwrap()
            .unwrap()
            .body
            .as_deref(),
        Some("doomed")
    );
    store.close().await.unwrap();
}

/// A batch that fails inside SQLite (here a trigger) fails alone: the other batches of its
/// group are retried one by one and succeed with gapless numbers, and the failed batch's
/// compliance records, if any were written, say uncommitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).close().await.unwrap();
    let [mgc, comp] = data_files(dir.path());
    rusqlite::Connection::open(&mgc)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON message WHEN NEW.body = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'poisoned message'); END;",
        )
        .unwrap();
    rusqlite::Connection::open(&comp)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON compliance WHEN NEW.detail = 'poison-compliance' \
             BEGIN SELECT RAISE(ABORT, 'poisoned compliance'); END;",
        )
        .unwrap();
    let store = std::sync::Arc::new(open(dir.path()));
    store
        .commit(vec![Write::PutRoom(room(ROOM))])
        .await
        .unwrap();

    for round in 0..5 {
        let mut tasks = Vec::new();
        for i in 0..30 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let writes = match i {
                    7 => vec![
                        Write::Compliance(join_event("poison-batch")),
                        Write::AppendMessage(message("poison", None)),
                    ],
                    19 => vec![
                        Write::AppendMessage(message("fine", None)),
                        Write::Compliance(join_event("poison-compliance")),
                    ],
                    _ => vec![Write::AppendMessage(message(
                        &format!("r{round} m{i}"),
                        Some(&format!("r{round}-{i}")),
                    ))],
                };
                (i, store.commit(writes).await)
            }));
        }
        for task in tasks {
            let (i, result) = task.await.unwrap();
            match i {
                7 | 19 => assert!(
                    matches!(result, Err(StoreError::Conflict(_))),
                    "batch {i}: {result:?}"
                ),
                _ => assert!(
                    result.is_ok(),
                    "batch {i} must not fail with the poisoned one: {result:?}"
                ),
            }
        }
    }
    let seqs = all_seqs(&store).await;
    assert_eq!(
        seqs,
        (1..=5 * 28).collect::<Vec<i64>>(),
        "gapless despite failed batches"
    );
    let page = store
        .archive_page(
            ROOM,
            &ArchiveQuery {
                limit: 1000,
                ..ArchiveQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(page
        .messages
        .iter()
        .all(|m| m.body.as_deref() != Some("poison") && m.body.as_deref() != Some("fine")));

    // A group attempt that failed in mgc leaves uncommitted records of all its batches,
    // beside the committed ones of their retries; the failed batches have no committed one.
    let records = store.compliance_after(0, 10_000).await.unwrap();
    for r in &records {
        let failed = r.event.detail == "poison"
            || r.event.detail == "poison-batch"
            || r.event.detail == "fine";
        assert!(
            !(failed && r.committed),
            "a failed batch's record must be uncommitted: {r:?}"
        );
    }
    assert!(
        records
            .iter()
            .any(|r| r.event.detail == "poison" && !r.committed),
        "the poisoned message was recorded, uncommitted"
    );
    assert!(
        !records
            .iter()
            .any(|r| r.event.detail == "poison-compliance"),
        "a refused compliance write records nothing"
    );
    let committed_messages: Vec<i64> = records
        .iter()
        .filter(|r| r.committed && r.event.kind == ComplianceKind::Message)
        .filter_map(|r| r.message_seq)
        .collect();
    let mut sorted = committed_messages.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted, seqs,
        "exactly one committed compliance record per archived message"
    );
}

/// Several processes opening a fresh data directory at once (two `pchat user add` right after
/// install) all succeed: the migration is applied once, under the write lock.
#[test]
fn concurrent_first_opens_migrate_once() {
    let dir = tempfile::tempdir().unwrap();
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let path = dir.path().to_owned();
            std::thread::spawn(move || {
                let options = SqliteOptions {
                    shared: true,
                    ..SqliteOptions::default()
                };
                SqliteStore::open(&path, options).map(|_| ())
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().expect("every concurrent open succeeds");
    }
}

/// The id epoch is stored: a reopened store keeps numbering above its base; the file-level
/// raise a standalone restore uses (on a closed directory) is what the next open sees, and
/// reading a missing file's epoch says nothing rather than 0.
#[tokio::test]
async fn id_epoch_survives_reopen_and_a_file_level_raise() {
    use pchat_store::ids::epoch_base;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit(vec![Write::PutRoom(room(ROOM))])
        .await
        .unwrap();
    store
        .commit(vec![Write::AppendMessage(message("one", None))])
        .await
        .unwrap();
    assert_eq!(store.raise_id_epoch(1).await.unwrap(), 1);
    store.close().await.unwrap();
    let [mgc, _] = data_files(dir.path());
    assert_eq!(crate::file_id_epoch(&mgc), Some(1));
    let store = open(dir.path());
    store
        .commit(vec![Write::AppendMessage(message("two", None))])
        .await
        .unwrap();
    assert_eq!(all_seqs(&store).await, vec![1, epoch_base(1) + 1]);
    store.close().await.unwrap();
    assert_eq!(crate::raise_file_id_epoch(&mgc, 3).unwrap(), 3);
    assert_eq!(
        crate::raise_file_id_epoch(&mgc, 2).unwrap(),
        3,
        "never lowered"
    );
    let store = open(dir.path());
    assert_eq!(store.id_epoch().await.unwrap(), 3);
    store
        .commit(vec![Write::AppendMessage(message("three", None))])
        .await
        .unwrap();
    assert_eq!(
        all_seqs(&store).await,
        vec![1, epoch_base(1) + 1, epoch_base(3) + 1]
    );
    assert_eq!(crate::file_id_epoch(&dir.path().join("nothing.db")), None);
}

/// `pchat data export|import` keeps ids across id-epoch jumps: the file verifies, the
/// target numbers each message as the source did, and ends in the source's epoch, so its
/// next ids stay above every id the source handed out. A jump that does not land on an
/// epoch's first id is refused as damage.
#[tokio::test]
async fn export_and_import_keep_ids_across_epochs() {
    use pchat_store::ids::epoch_base;
    use pchat_store::portable;
    let (source, _d1) = fresh_store().await;
    source
        .commit(vec![Write::PutRoom(room(ROOM))])
        .await
        .unwrap();
    for (i, epoch) in [(0, 0), (1, 0), (2, 2), (3, 2), (4, 4)] {
        source.raise_id_epoch(epoch).await.unwrap();
        source
            .commit(vec![Write::AppendMessage(message(&format!("m{i}"), None))])
            .await
            .unwrap();
    }
    source.raise_id_epoch(6).await.unwrap();
    let want = vec![
        1,
        2,
        epoch_base(2) + 1,
        epoch_base(2) + 2,
        epoch_base(4) + 1,
    ];
    assert_eq!(all_seqs(&source).await, want);
    let mut file = Vec::new();
    portable::export(&source, &mut file, &mut |_, _| {})
        .await
        .unwrap();
    let totals = portable::verify(&file[..]).unwrap();
    assert_eq!(totals.messages, 5);
    let (target, _d2) = fresh_store().await;
    portable::import(&target, &file[..], totals.messages, &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(all_seqs(&target).await, want, "ids kept");
    assert_eq!(target.id_epoch().await.unwrap(), 6, "the source's epoch");
    target
        .commit(vec![Write::AppendMessage(message("new", None))])
        .await
        .unwrap();
    assert_eq!(
        all_seqs(&target).await.last(),
        Some(&(epoch_base(6) + 1)),
        "new ids above everything the source handed out"
    );

    // A message id moved off an epoch's first id: damage, refused.
    let text = String::from_utf8(file).unwrap();
    let bad = text.replacen(
        &format!("\"seq\":{}", epoch_base(4) + 1),
        &format!("\"seq\":{}", epoch_base(4) + 7),
        1,
    );
    assert_ne!(bad, text);
    match portable::verify(bad.as_bytes()) {
        Err(portable::PortableError::Invalid(m)) => assert!(m.contains("out of order"), "{m}"),
        other => panic!("a jump off an epoch's first id: {other:?}"),
    }
}

/// `pchat data export|import` carries the files shared in rooms: the same bytes, hash, owner
/// and room on the target; an upload never posted is not carried; a damaged piece fails the
/// file's check.
#[tokio::test]
async fn export_and_import_carry_shared_files() {
    use pchat_store::portable;
    use pchat_store::{FileFilter, FileRecord, FILE_CHUNK_BYTES};
    use sha2::Digest as _;
    let (source, _d1) = fresh_store().await;
    source
        .commit(vec![Write::PutRoom(room(ROOM))])
        .await
        .unwrap();
    let bytes: Vec<u8> = (0..FILE_CHUNK_BYTES + 10)
        .map(|i| (i % 253) as u8)
        .collect();
    let sha: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = |n: u32| FileRecord {
        id: format!("{n:032x}"),
        owner: "alice@localhost".into(),
        room: None,
        name: format!("f{n}.bin"),
        content_type: "application/octet-stream".into(),
        size: bytes.len() as u64,
        created_at: Timestamp(10),
        expires_at: Timestamp(i64::MAX),
        sha256: None,
    };
    for n in [1, 2] {
        source.file_create(&file(n), u64::MAX).await.unwrap();
        source
            .file_chunk_put(&file(n).id, 0, bytes[..FILE_CHUNK_BYTES].to_vec())
            .await
            .unwrap();
        source
            .file_chunk_put(&file(n).id, 1, bytes[FILE_CHUNK_BYTES..].to_vec())
            .await
            .unwrap();
        source.file_finish(&file(n).id, &sha).await.unwrap();
    }
    assert!(source
        .file_bind(&file(1).id, "alice@localhost", ROOM)
        .await
        .unwrap());
    let mut out = Vec::new();
    portable::export(&source, &mut out, &mut |_, _| {})
        .await
        .unwrap();
    let totals = portable::verify(&out[..]).unwrap();
    assert_eq!(totals.files, 1, "only the file posted in a room");
    let (target, _d2) = fresh_store().await;
    portable::import(&target, &out[..], totals.messages, &mut |_, _| {})
        .await
        .unwrap();
    let got = target.file_get(&file(1).id).await.unwrap().unwrap();
    assert_eq!(got.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(got.room.as_deref(), Some(ROOM));
    assert_eq!(got.owner, "alice@localhost");
    let mut copy = target.file_chunk_get(&got.id, 0).await.unwrap().unwrap();
    copy.extend(target.file_chunk_get(&got.id, 1).await.unwrap().unwrap());
    assert_eq!(copy, bytes);
    assert!(target.file_get(&file(2).id).await.unwrap().is_none());
    // Importing again (a resumed run) changes nothing.
    portable::import(&target, &out[..], totals.messages, &mut |_, _| {})
        .await
        .unwrap();
    let listed = target
        .file_list(&FileFilter {
            owner: None,
            room: Some(ROOM.into()),
            limit: 0,
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    // A piece cut short: the archive no longer verifies.
    let text = String::from_utf8(out).unwrap();
    let at = text.find("\"file_piece\"").unwrap();
    let data = text[at..].find("\"data\":\"").unwrap() + at + 8;
    let mut bad = text.clone();
    bad.replace_range(data..data + 4, "");
    assert!(portable::verify(bad.as_bytes()).is_err());
}

/// Uploaded files can be changed through a store opened shared beside a running one (the
/// shell beside the server), and each side sees the other's changes: neither writer keeps
/// anything of files in memory, and both take SQLite's write lock per change.
#[tokio::test]
async fn files_beside_a_running_server() {
    use pchat_store::{FileCreated, FileFilter, FileRecord};
    let dir = tempfile::tempdir().unwrap();
    let server = open(dir.path());
    let shell = SqliteStore::open(
        dir.path(),
        SqliteOptions {
            shared: true,
            ..SqliteOptions::default()
        },
    )
    .expect("a shared open beside the server");
    let slot = |n: u32, size: u64| FileRecord {
        id: format!("{n:032x}"),
        owner: "alice@localhost".into(),
        room: None,
        name: "notes.txt".into(),
        content_type: "text/plain".into(),
        size,
        created_at: Timestamp(10),
        expires_at: Timestamp(100),
        sha256: None,
    };
    let hash = "0".repeat(64);
    assert_eq!(
        server.file_create(&slot(1, 3), 5).await.unwrap(),
        FileCreated::Created
    );
    assert_eq!(
        shell.file_create(&slot(2, 3), 5).await.unwrap(),
        FileCreated::OverQuota { used: 3 },
        "the shell counts the server's slot"
    );
    shell
        .file_chunk_put(&slot(1, 3).id, 0, vec![0, 1, 255])
        .await
        .unwrap();
    shell.file_finish(&slot(1, 3).id, &hash).await.unwrap();
    assert!(server
        .file_bind(&slot(1, 3).id, "alice@localhost", ROOM)
        .await
        .unwrap());
    assert_eq!(
        shell
            .file_get(&slot(1, 3).id)
            .await
            .unwrap()
            .unwrap()
            .room
            .as_deref(),
        Some(ROOM)
    );
    assert_eq!(
        server.file_chunk_get(&slot(1, 3).id, 0).await.unwrap(),
        Some(vec![0, 1, 255])
    );
    assert!(shell.file_remove(&slot(1, 3).id).await.unwrap());
    assert!(server
        .file_list(&FileFilter::default())
        .await
        .unwrap()
        .is_empty());
    shell.close().await.unwrap();
    server.close().await.unwrap();
}

/// With a group-commit delay, racing callers still all commit, gapless and in order (the
/// delay only lets groups grow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_with_a_group_commit_delay() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        dir.path(),
        SqliteOptions {
            group_commit_delay_us: 3_000,
            ..SqliteOptions::default()
        },
    )
    .unwrap();
    pchat_store::testing::concurrent_commits(std::sync::Arc::new(store)).await;
}

/// One caller alone never waits for the delay: it is for groups that can grow.
#[tokio::test]
async fn a_lone_caller_never_waits_for_the_group_commit_delay() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        dir.path(),
        SqliteOptions {
            group_commit_delay_us: 5_000_000,
            ..SqliteOptions::default()
        },
    )
    .unwrap();
    store
        .commit(vec![Write::PutRoom(room(ROOM))])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for i in 0..5 {
        store
            .commit(vec![Write::AppendMessage(message(&format!("m{i}"), None))])
            .await
            .unwrap();
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "five lone commits took {:?}: the writer waited for companions that could not come",
        started.elapsed()
    );
    assert_eq!(all_seqs(&store).await, vec![1, 2, 3, 4, 5]);
}
