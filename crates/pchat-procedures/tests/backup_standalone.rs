//! Standalone backup and restore on a real data directory of the SQLite store: an online
//! backup while the store is open and writing, restore refused while it runs, refused
//! without `--overwrite`, a damaged backup detected before anything is replaced, and the
//! round trip of the data.

use std::path::Path;
use std::time::Instant;

use pchat_agent_api::backup::BackupKind;
use pchat_procedures::backup::{self, BackupError};
use pchat_room::Timestamp;
use pchat_store::{ScramCredential, Store, UserRecord};
use pchat_store_sqlite::{SqliteOptions, SqliteStore};

fn user(i: usize) -> UserRecord {
    let cred = ScramCredential {
        salt: vec![1, 2, 3],
        iterations: 4096,
        stored_key: vec![i as u8; 32],
        server_key: vec![7; 32],
    };
    UserRecord {
        jid: format!("user{i:05}@localhost"),
        scram_sha1: cred.clone(),
        scram_sha256: cred,
        created_at: Timestamp(1_700_000_000_000_000),
    }
}

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir, SqliteOptions::default()).expect("open the store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_backup_restore_round_trip() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let share = root.path().join("share");
    std::fs::create_dir_all(&share).unwrap();

    let store = open(&data);
    for i in 0..500 {
        store.user_put(user(i)).await.unwrap();
    }
    // Online: the store stays open, and keeps writing while the backup runs.
    let writer = async {
        for i in 500..600 {
            store.user_put(user(i)).await.unwrap();
        }
    };
    let share2 = share.clone();
    let data2 = data.clone();
    let t = Instant::now();
    let backup = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        let m = backup::backup_sqlite(
            &data2,
            &share2,
            "nightly",
            Some("before the upgrade"),
            &mut |p| lines.push(p.step.clone()),
        );
        (m, lines)
    });
    writer.await;
    let (manifest, lines) = backup.await.unwrap();
    let manifest = manifest.expect("online backup");
    eprintln!(
        "standalone backup: {} bytes in {:?}",
        manifest.total_bytes,
        t.elapsed()
    );
    assert!(lines.iter().any(|l| l.contains("mgc.db")), "{lines:?}");
    assert_eq!(manifest.kind, BackupKind::Sqlite);
    assert_eq!(manifest.name, "nightly");
    assert_eq!(manifest.description, "before the upgrade");
    let files: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(files, ["mgc.db", "mgccomp.db"]);
    assert!(manifest
        .files
        .iter()
        .all(|f| f.sha256.len() == 64 && f.bytes > 0));
    assert!(share.join("nightly/manifest.json").is_file());
    assert!(!share.join("nightly.partial").exists());
    let in_backup = {
        let c = rusqlite::Connection::open(share.join("nightly/mgc.db")).unwrap();
        c.query_row("SELECT count(*) FROM user", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    assert!(
        (500..=600).contains(&in_backup),
        "a consistent snapshot: {in_backup}"
    );

    // Restore while the server runs: refused, "stop the server first".
    let err =
        backup::restore_sqlite(&data, &share.join("nightly"), true, true, &mut |_| {}).unwrap_err();
    assert!(matches!(err, BackupError::ServerRunning(_)), "{err}");
    assert!(err.to_string().contains("stop the server first"), "{err}");

    store.user_put(user(9_999)).await.unwrap();
    store.close().await.unwrap();

    // Stopped, but without --overwrite: refused.
    let err = backup::restore_sqlite(&data, &share.join("nightly"), false, true, &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("--overwrite"), "{err}");
    // --norecovery means nothing without log shipping.
    let err = backup::restore_sqlite(&data, &share.join("nightly"), true, false, &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("standalone"), "{err}");

    // A damaged copy: detected by checksum, the data directory untouched.
    let damaged = share.join("damaged");
    std::fs::create_dir(&damaged).unwrap();
    for f in ["manifest.json", "mgc.db", "mgccomp.db"] {
        std::fs::copy(share.join("nightly").join(f), damaged.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(damaged.join("mgccomp.db")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(damaged.join("mgccomp.db"), bytes).unwrap();
    let before = std::fs::read(data.join("mgc.db")).unwrap();
    let err = backup::restore_sqlite(&data, &damaged, true, true, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, BackupError::Corrupt { .. }) && err.to_string().contains("mgccomp.db"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(data.join("mgc.db")).unwrap(),
        before,
        "nothing replaced"
    );
    // An unfinished backup is named as such.
    std::fs::create_dir(share.join("half.partial")).unwrap();
    let err =
        backup::restore_sqlite(&data, &share.join("half"), true, true, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("never finished"), "{err}");

    // The round trip.
    let t = Instant::now();
    backup::restore_sqlite(&data, &share.join("nightly"), true, true, &mut |_| {})
        .expect("restore");
    eprintln!("standalone restore: {:?}", t.elapsed());
    let store = open(&data);
    let users = store.user_list().await.unwrap();
    assert_eq!(users.len() as i64, in_backup);
    assert!(
        !users.contains(&"user09999@localhost".to_owned()),
        "written after the backup"
    );
    assert_eq!(
        store.user_get("user00042@localhost").await.unwrap(),
        Some(user(42))
    );
    // Restoring is repeatable: an interrupted run is simply run again.
    store.close().await.unwrap();
    std::fs::write(data.join("mgc.db.restoring"), b"left by a crash").unwrap();
    backup::restore_sqlite(&data, &share.join("nightly"), true, true, &mut |_| {})
        .expect("restore again");
    let store = open(&data);
    assert_eq!(store.user_list().await.unwrap().len() as i64, in_backup);
    store.close().await.unwrap();

    // A backup set is never overwritten; a half-done one is redone.
    let err = backup::backup_sqlite(&data, &share, "nightly", None, &mut |_| {}).unwrap_err();
    assert!(matches!(err, BackupError::Exists(_)), "{err}");
    std::fs::create_dir(share.join("second.partial")).unwrap();
    std::fs::write(share.join("second.partial/junk"), b"x").unwrap();
    let m = backup::backup_sqlite(&data, &share, "second", None, &mut |_| {}).unwrap();
    assert_eq!(
        backup::verify(&share.join("second"), &mut |_| {}).unwrap(),
        m
    );
}

#[test]
fn backup_of_a_directory_without_databases_says_so() {
    let root = tempfile::tempdir().unwrap();
    let err = backup::backup_sqlite(root.path(), root.path(), "x", None, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("no mgc.db"), "{err}");
    let err = backup::backup_sqlite(
        root.path(),
        &root.path().join("nope"),
        "x",
        None,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("no mgc.db"), "{err}");
    assert!(backup::validate_name("../escape").is_err());
}

const ROOM: &str = "ops@conference.localhost";

/// Appends `n` messages to [`ROOM`]; their ids.
async fn append(store: &SqliteStore, n: usize) -> Vec<i64> {
    use pchat_store::{NewMessage, Write, WriteOutcome};
    let writes: Vec<Write> = (0..n)
        .map(|i| {
            Write::AppendMessage(NewMessage {
                room: ROOM.into(),
                at: Timestamp(1_700_000_000_000_000 + i as i64),
                sender: "alice@localhost".into(),
                nick: "alice".into(),
                origin_id: None,
                idempotency_key: None,
                record_revision: None,
                id_epoch: None,
                body: Some(format!("m{i}")),
                stanza: "<message type='groupchat'><body>m</body></message>".into(),
            })
        })
        .collect();
    store
        .commit(writes)
        .await
        .unwrap()
        .into_iter()
        .map(|o| match o {
            WriteOutcome::Appended { seq, .. } => seq,
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Issue 12, item 2, standalone: a restore goes back to an earlier point, so the restored
/// database continues its rooms' ids in a new epoch — above those it replaces, which clients
/// may have seen — and a second restore of the same backup goes above the first's.
#[tokio::test]
async fn a_restore_never_hands_out_an_id_twice() {
    use pchat_store::ids::epoch_base;
    use pchat_store::Write;
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let share = root.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    let record = pchat_room::RoomRecord {
        jid: ROOM.into(),
        config: pchat_room::RoomConfig::default(),
        affiliations: Vec::new(),
        voice: Vec::new(),
        subject: None,
        created_at: Timestamp(1),
        category: pchat_room::directory::DEFAULT_CATEGORY.into(),
        disabled: false,
        invitations_off: false,
        addin: None,
    };
    let store = open(&data);
    store.commit(vec![Write::PutRoom(record)]).await.unwrap();
    assert_eq!(append(&store, 3).await, [1, 2, 3]);
    store.close().await.unwrap();
    backup::backup_sqlite(&data, &share, "early", None, &mut |_| {}).unwrap();
    let store = open(&data);
    // Acknowledged after the backup: a restore takes them away.
    assert_eq!(append(&store, 3).await, [4, 5, 6]);
    store.close().await.unwrap();

    let mut lines = Vec::new();
    backup::restore_sqlite(&data, &share.join("early"), true, true, &mut |p| {
        lines.push(p.step.clone())
    })
    .unwrap();
    assert!(
        lines.iter().any(|l| l.contains("epoch 1")),
        "the restore says where ids continue: {lines:?}"
    );
    let store = open(&data);
    assert_eq!(store.archive_get(ROOM, 4).await.unwrap(), None);
    assert_eq!(
        append(&store, 2).await,
        [epoch_base(1) + 1, epoch_base(1) + 2],
        "never 4 and 5 again"
    );
    store.close().await.unwrap();
    backup::restore_sqlite(&data, &share.join("early"), true, true, &mut |_| {}).unwrap();
    let store = open(&data);
    assert_eq!(
        append(&store, 1).await,
        [epoch_base(2) + 1],
        "above the ids the replaced database handed out after the first restore"
    );
    store.close().await.unwrap();
}
