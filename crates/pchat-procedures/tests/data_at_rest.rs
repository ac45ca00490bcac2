//! Data at rest on the procedures' side (issue 11 §6): backup sets (the set's directory, its
//! manifest, the database copies), restores (the copies of a standalone restore, a data
//! directory the restore makes, its lock; the directories and files of a PostgreSQL restore
//! copy) and salvage files are readable by their owner only — 0700 directories, 0600 files —
//! under the loosest umask, 000.
//!
//! The umask is the process's, so this file holds one test: it sets umask 000 first and
//! nothing else in this binary runs beside it.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use pchat_agent_api::salvage::SalvagedMessage;
use pchat_procedures::backup;
use pchat_room::Timestamp;
use pchat_store::{ScramCredential, Store, UserRecord};
use pchat_store_sqlite::{SqliteOptions, SqliteStore};

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// Every directory under `root` (itself included) is 0700 and every file 0600.
fn all_private(root: &Path) {
    assert_eq!(mode(root), 0o700, "{}", root.display());
    for entry in std::fs::read_dir(root).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            all_private(&p);
        } else {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_sets_restores_and_salvage_files_are_private_whatever_the_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let root = tempfile::tempdir().unwrap();
    // The places themselves are as open as the umask lets them be.
    let share = root.path().join("share");
    std::fs::create_dir(&share).unwrap();
    assert_eq!(mode(&share), 0o777, "umask 000 is in force");

    // A standalone data directory with a user in it.
    let data = root.path().join("data");
    let store = SqliteStore::open(&data, SqliteOptions::default()).expect("store");
    let cred = ScramCredential {
        salt: vec![1, 2, 3],
        iterations: 4096,
        stored_key: vec![1; 32],
        server_key: vec![7; 32],
    };
    store
        .user_put(UserRecord {
            jid: "alice@localhost".into(),
            scram_sha1: cred.clone(),
            scram_sha256: cred,
            created_at: Timestamp(1_700_000_000_000_000),
        })
        .await
        .unwrap();
    drop(store);

    // The backup set: its directory, the copies of the databases, the manifest.
    let (d, s) = (data.clone(), share.clone());
    let _manifest = tokio::task::spawn_blocking(move || {
        backup::backup_sqlite(&d, &s, "nightly", None, &mut |_| {})
    })
    .await
    .unwrap()
    .expect("backup");
    let set = share.join("nightly");
    all_private(&set);

    // A restore into a data directory that does not exist yet: the restore makes it, takes
    // its lock, copies the databases in.
    let fresh = root.path().join("restored/data");
    let (f, s2) = (fresh.clone(), set.clone());
    tokio::task::spawn_blocking(move || backup::restore_sqlite(&f, &s2, false, true, &mut |_| {}))
        .await
        .unwrap()
        .expect("restore");
    all_private(&fresh);
    assert!(fresh.join("mgc.db").is_file() && fresh.join("pchat.lock").is_file());

    // The data directory's lock on its own, in a new directory.
    let locked = root.path().join("locked");
    let lock = pchat_store_sqlite::lock_data_dir(&locked).expect("lock");
    all_private(&locked);
    drop(lock);

    // A PostgreSQL-style restore copy (what the agent puts in place of a data directory).
    let pg_set = root.path().join("pgset");
    std::fs::create_dir_all(pg_set.join("data/base/1")).unwrap();
    std::fs::write(pg_set.join("data/PG_VERSION"), "15\n").unwrap();
    std::fs::write(pg_set.join("data/base/1/1259"), vec![7u8; 8192]).unwrap();
    let (dirs, files) = backup::hash_tree(&pg_set, &mut |_| {}).unwrap();
    let pg_manifest = backup::new_manifest(
        pchat_agent_api::backup::BackupKind::Postgresql,
        "pgset".into(),
        String::new(),
        "test".into(),
        dirs,
        files,
        None,
        None,
        None,
    );
    let copy = root.path().join("pgdata");
    backup::copy_verified(&pg_set, &pg_manifest, "data", &copy, None, &mut |_| {}).expect("copy");
    all_private(&copy);

    // A failback's salvage file.
    let salvage = root.path().join("salvage.jsonl");
    pchat_procedures::dr::write_salvage(
        &salvage,
        &[SalvagedMessage {
            room: "r@conference.localhost".into(),
            seq: 1,
            at: 0,
            sender: "alice@localhost".into(),
            nick: "alice".into(),
            origin_id: None,
            body: Some("not shipped".into()),
            stanza: "<message/>".into(),
        }],
    )
    .expect("salvage");
    assert_eq!(mode(&salvage), 0o600);
    assert!(std::fs::read_to_string(&salvage)
        .unwrap()
        .contains("not shipped"));
}
