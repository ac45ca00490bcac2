//! The storage conformance suite: what every backend must do, checked the same way on SQLite
//! and on PostgreSQL.
//!
//! Each check is a public async function that takes a fresh, empty store and panics with a
//! message naming the violated rule. A backend runs them all with one line in its tests:
//!
//! ```text
//! pchat_store::store_conformance_tests!(crate::tests::fresh_store().await);
//! ```
//!
//! The expression is evaluated once per check and may return either a bare store or a tuple
//! `(store, guard)` whose guard (a temp dir, a database cluster) must outlive the store; see
//! [`StoreFixture`]. The macro expands to one `#[tokio::test]` per check inside a module
//! `store_conformance`, so the backend crate needs `tokio` (with `macros` and `rt-multi-thread`)
//! among its dev-dependencies.
//!
//! The checks only use ASCII-letter JIDs and nicks where order matters, because PostgreSQL
//! collations may order punctuation differently from byte order.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use pchat_room::{
    Affiliation, AffiliationEntry, AllowPm, RoomConfig, RoomRecord, Subject, Timestamp, Whois,
};

use crate::{
    ArchivePage, ArchiveQuery, ArchivedMessage, ComplianceKind, ComplianceRecord, FileCreated,
    FileFilter, FileRecord, NewComplianceEvent, NewMessage, RoomStats, ScramCredential, Store,
    StoreError, StoreResult, StoredRoom, UserRecord, Write, WriteOutcome, ARCHIVE_PAGE_MAX,
    FILE_CHUNK_BYTES,
};

/// What a conformance factory returns: a store, plus whatever must stay alive as long as it.
pub trait StoreFixture {
    /// Splits the fixture into a shareable store and a guard dropped after it.
    fn into_fixture(self) -> Fixture;
}

impl<S: Store> StoreFixture for S {
    fn into_fixture(self) -> Fixture {
        Fixture {
            store: Arc::new(self),
            _guard: Box::new(()),
        }
    }
}

impl<S: Store, G: Send + 'static> StoreFixture for (S, G) {
    fn into_fixture(self) -> Fixture {
        Fixture {
            store: Arc::new(self.0),
            _guard: Box::new(self.1),
        }
    }
}

/// A store under test and its guard. Fields drop in declaration order, so the store is closed
/// before its guard (say, its temp dir) goes away, even when a check panics.
pub struct Fixture {
    /// The store under test.
    pub store: Arc<dyn Store>,
    _guard: Box<dyn Any + Send>,
}

impl Fixture {
    /// Wraps what a factory returned.
    pub fn new(fixture: impl StoreFixture) -> Fixture {
        fixture.into_fixture()
    }
}

/// Expands to one `#[tokio::test]` per conformance check, each on a store made by evaluating
/// the given expression (an async context: `.await` is allowed).
#[macro_export]
macro_rules! store_conformance_tests {
    // Internal arm first: an `expr` fragment cannot backtrack once it starts parsing.
    (@each $factory:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test]
            async fn $check() {
                let fixture = $crate::testing::Fixture::new($factory);
                $crate::testing::$check(&*fixture.store).await;
            }
        )*
    };
    ($factory:expr) => {
        mod store_conformance {
            #[allow(unused_imports)]
            use super::*;

            $crate::store_conformance_tests!(@each $factory;
                server_secret,
                users,
                rooms,
                room_delete,
                append_sequences,
                batch_outcomes_in_order,
                empty_batch,
                append_to_unknown_room_is_invalid,
                origin_id_dedupe,
                origin_id_dedupe_within_batch,
                idempotency_key_dedupe,
                record_revisions,
                announcements_store_nothing,
                message_compliance_records,
                compliance_order,
                compliance_paging,
                archive_latest_page,
                archive_forward_paging,
                archive_backward_paging,
                archive_window,
                archive_time_filters,
                archive_with_nick,
                archive_fulltext,
                archive_limits,
                archive_unknown_room,
                archive_get,
                room_stats,
                id_epochs,
                special_characters,
                forbidden_text_fails_only_its_batch,
                directory,
                content_control,
                invitations,
                pep,
                portable_pep,
                web_sessions,
                compliance_export,
                files
            );

            // Several worker threads, so that commits really race.
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_commits() {
                let fixture = $crate::testing::Fixture::new($factory);
                $crate::testing::concurrent_commits(fixture.store.clone()).await;
            }

            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn file_quota_race() {
                let fixture = $crate::testing::Fixture::new($factory);
                $crate::testing::file_quota_race(fixture.store.clone()).await;
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers

const BASE_MICROS: i64 = 1_700_000_000_000_000;

/// A timestamp `n` seconds after a fixed base time.
fn ts(n: i64) -> Timestamp {
    Timestamp(BASE_MICROS + n * 1_000_000)
}

fn room_record(jid: &str) -> RoomRecord {
    RoomRecord {
        jid: jid.to_string(),
        config: RoomConfig {
            name: format!("Room {jid}"),
            ..RoomConfig::default()
        },
        affiliations: vec![AffiliationEntry {
            jid: "owner@localhost".into(),
            affiliation: Affiliation::Owner,
            reason: None,
        }],
        voice: Vec::new(),
        subject: None,
        created_at: ts(0),
        category: pchat_room::directory::DEFAULT_CATEGORY.into(),
        disabled: false,
        invitations_off: false,
        addin: None,
    }
}

fn message(
    room: &str,
    sender: &str,
    nick: &str,
    origin: Option<&str>,
    body: Option<&str>,
    at: Timestamp,
) -> NewMessage {
    NewMessage {
        room: room.to_string(),
        at,
        sender: sender.to_string(),
        nick: nick.to_string(),
        origin_id: origin.map(str::to_string),
        idempotency_key: None,
        record_revision: None,
        id_epoch: None,
        body: body.map(str::to_string),
        stanza: format!(
            "<message type='groupchat' from='{room}/{nick}'><body>{}</body></message>",
            body.unwrap_or("")
        ),
    }
}

fn simple(room: &str, n: i64) -> NewMessage {
    message(
        room,
        "alice@localhost",
        "alice",
        None,
        Some(&format!("message number {n}")),
        ts(n),
    )
}

fn event(kind: ComplianceKind, room: &str, detail: &str, at: Timestamp) -> NewComplianceEvent {
    NewComplianceEvent {
        kind,
        at,
        room: room.to_string(),
        actor: "alice@localhost".into(),
        nick: Some("alice".into()),
        detail: detail.to_string(),
    }
}

async fn commit_ok(store: &dyn Store, writes: Vec<Write>, what: &str) -> Vec<WriteOutcome> {
    let n = writes.len();
    match store.commit(writes).await {
        Ok(outcomes) => {
            assert_eq!(
                outcomes.len(),
                n,
                "{what}: commit must return one outcome per write"
            );
            outcomes
        }
        Err(e) => panic!("{what}: commit failed: {e}"),
    }
}

async fn put_rooms(store: &dyn Store, rooms: &[&str]) {
    let writes = rooms
        .iter()
        .map(|r| Write::PutRoom(room_record(r)))
        .collect();
    commit_ok(store, writes, "creating rooms").await;
}

/// Appends messages one write each, in one batch, and returns their sequence numbers.
async fn append_all(store: &dyn Store, messages: Vec<NewMessage>, what: &str) -> Vec<i64> {
    let writes = messages.into_iter().map(Write::AppendMessage).collect();
    commit_ok(store, writes, what)
        .await
        .into_iter()
        .map(|o| match o {
            WriteOutcome::Appended {
                seq,
                duplicate: false,
            } => seq,
            other => panic!("{what}: expected a fresh append, got {other:?}"),
        })
        .collect()
}

async fn all_compliance(store: &dyn Store) -> Vec<ComplianceRecord> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .compliance_after(after, 100)
            .await
            .expect("compliance_after failed");
        match page.last() {
            None => return all,
            Some(last) => after = last.id,
        }
        all.extend(page);
    }
}

async fn page(store: &dyn Store, room: &str, query: ArchiveQuery) -> ArchivePage {
    match store.archive_page(room, &query).await {
        Ok(p) => p,
        Err(e) => panic!("archive_page({room}, {query:?}) failed: {e}"),
    }
}

fn seqs(page: &ArchivePage) -> Vec<i64> {
    page.messages.iter().map(|m| m.seq).collect()
}

fn query(limit: u32) -> ArchiveQuery {
    ArchiveQuery {
        limit,
        ..ArchiveQuery::default()
    }
}

fn range(lo: i64, hi: i64) -> Vec<i64> {
    (lo..=hi).collect()
}

/// Asserts a page's messages, completeness and count in one place, for readable failures.
fn check_page(page: &ArchivePage, want_seqs: &[i64], complete: bool, count: u64, what: &str) {
    assert_eq!(
        seqs(page),
        want_seqs,
        "{what}: wrong messages (oldest first)"
    );
    assert_eq!(page.complete, complete, "{what}: wrong `complete`");
    assert_eq!(
        page.count, count,
        "{what}: wrong `count` (all matches of the filters)"
    );
}

/// A room holding messages 1..=n at ts(1)..=ts(n).
async fn room_with(store: &dyn Store, room: &str, n: i64) {
    put_rooms(store, &[room]).await;
    let got = append_all(
        store,
        (1..=n).map(|i| simple(room, i)).collect(),
        "filling a room",
    )
    .await;
    assert_eq!(
        got,
        range(1, n),
        "a fresh room's messages must be numbered 1..=n"
    );
}

fn user(jid: &str, salt: u8) -> UserRecord {
    let cred = |len: usize| ScramCredential {
        salt: vec![salt; 16],
        iterations: 4096,
        stored_key: vec![salt.wrapping_add(1); len],
        server_key: vec![salt.wrapping_add(2); len],
    };
    UserRecord {
        jid: jid.into(),
        scram_sha1: cred(20),
        scram_sha256: cred(32),
        created_at: ts(salt.into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Users and rooms

/// The server secret exists from the first open, has its full length, is random (not all
/// zeros, different per database: two fresh stores differ with overwhelming probability,
/// checked by the backends' own tests) and reads the same every time.
pub async fn server_secret(store: &dyn Store) {
    let first = store.server_secret().await.expect("server secret");
    assert_eq!(first.len(), crate::SERVER_SECRET_BYTES);
    assert!(first.iter().any(|&b| b != 0), "a secret of zeros");
    for _ in 0..3 {
        assert_eq!(
            store.server_secret().await.expect("server secret"),
            first,
            "the secret never changes"
        );
    }
}

/// Users: put, get, replace, remove, list (sorted).
pub async fn users(store: &dyn Store) {
    assert_eq!(
        store.user_list().await.unwrap(),
        Vec::<String>::new(),
        "a fresh store has no users"
    );
    assert_eq!(
        store.user_get("alice@localhost").await.unwrap(),
        None,
        "unknown user must be None"
    );

    store.user_put(user("bob@localhost", 1)).await.unwrap();
    store.user_put(user("alice@localhost", 2)).await.unwrap();
    assert_eq!(
        store.user_get("alice@localhost").await.unwrap(),
        Some(user("alice@localhost", 2))
    );
    assert_eq!(
        store.user_list().await.unwrap(),
        vec!["alice@localhost".to_string(), "bob@localhost".to_string()],
        "user_list must be sorted"
    );

    store.user_put(user("alice@localhost", 7)).await.unwrap();
    assert_eq!(
        store.user_get("alice@localhost").await.unwrap(),
        Some(user("alice@localhost", 7)),
        "user_put must replace an existing user"
    );
    assert_eq!(
        store.user_list().await.unwrap().len(),
        2,
        "replacing must not add a user"
    );

    assert!(
        store.user_remove("alice@localhost").await.unwrap(),
        "removing a user returns true"
    );
    assert!(
        !store.user_remove("alice@localhost").await.unwrap(),
        "removing twice returns false"
    );
    assert_eq!(
        store.user_get("alice@localhost").await.unwrap(),
        None,
        "a removed user is gone"
    );
    assert_eq!(
        store.user_list().await.unwrap(),
        vec!["bob@localhost".to_string()]
    );
}

/// Rooms: put, get, list (sorted), replace; every field of the record round-trips.
pub async fn rooms(store: &dyn Store) {
    assert!(
        store.room_list().await.unwrap().is_empty(),
        "a fresh store has no rooms"
    );
    assert_eq!(
        store.room_get("alpha@conference.localhost").await.unwrap(),
        None
    );

    let bravo = room_record("bravo@conference.localhost");
    let alpha = room_record("alpha@conference.localhost");
    let outcomes = commit_ok(
        store,
        vec![Write::PutRoom(bravo.clone()), Write::PutRoom(alpha.clone())],
        "putting two rooms",
    )
    .await;
    assert_eq!(
        outcomes,
        vec![
            WriteOutcome::Saved { revision: 1 },
            WriteOutcome::Saved { revision: 1 }
        ],
        "a new room's record has revision 1"
    );
    assert_eq!(
        store.room_get(&alpha.jid).await.unwrap(),
        Some(alpha.clone())
    );
    assert_eq!(
        store.room_list().await.unwrap(),
        vec![alpha.clone(), bravo.clone()],
        "room_list sorted by JID"
    );

    // Every field different from the defaults, with text that needs escaping.
    let changed = RoomRecord {
        jid: alpha.jid.clone(),
        config: RoomConfig {
            name: "Trading desk «Ω» \"quoted\" 'single' 100%_".into(),
            description: "line one\nline two\ttab".into(),
            persistent: false,
            public: false,
            members_only: true,
            moderated: true,
            password: Some("s3cr'et\"".into()),
            whois: Whois::Moderators,
            history_stanzas_max: 100,
            history_stanzas_default: 7,
            occupants_max: 42,
            subject_changeable: true,
            members_may_invite: true,
            allow_pm: AllowPm::Moderators,
            presence_broadcast_occupants_max: 9,
            language: "fr".into(),
            // Fields added later keep their defaults; the JSON round-trip covers them anyway.
            ..RoomConfig::default()
        },
        affiliations: vec![
            AffiliationEntry {
                jid: "owner@localhost".into(),
                affiliation: Affiliation::Owner,
                reason: None,
            },
            AffiliationEntry {
                jid: "eve@localhost".into(),
                affiliation: Affiliation::Outcast,
                reason: Some("spam ✉".into()),
            },
            AffiliationEntry {
                jid: "bob@localhost".into(),
                affiliation: Affiliation::Member,
                reason: None,
            },
        ],
        voice: vec!["bob@localhost".into(), "carol@localhost".into()],
        subject: Some(Subject {
            text: "Today: ünïcödé".into(),
            nick: "owner".into(),
            at: ts(5),
        }),
        created_at: ts(3),
        category: "trading-desk".into(),
        disabled: true,
        invitations_off: true,
        addin: Some("stocks".into()),
    };
    commit_ok(
        store,
        vec![Write::PutRoom(changed.clone())],
        "replacing a room",
    )
    .await;
    assert_eq!(
        store.room_get(&alpha.jid).await.unwrap(),
        Some(changed.clone()),
        "PutRoom must replace the record"
    );
    assert_eq!(
        store.room_list().await.unwrap(),
        vec![changed, bravo],
        "replacing must not add a room"
    );
}

/// Deleting a room removes its record and archive, keeps its compliance events, leaves other
/// rooms alone, is idempotent, and a room re-created under the same JID starts again at seq 1.
pub async fn room_delete(store: &dyn Store) {
    let (a, b) = ("alpha@conference.localhost", "bravo@conference.localhost");
    put_rooms(store, &[a, b]).await;
    append_all(
        store,
        vec![simple(a, 1), simple(a, 2), simple(b, 3)],
        "appending",
    )
    .await;
    let origin = message(
        a,
        "alice@localhost",
        "alice",
        Some("o-1"),
        Some("with origin"),
        ts(4),
    );
    append_all(store, vec![origin.clone()], "appending with origin-id").await;
    commit_ok(
        store,
        vec![Write::Compliance(event(ComplianceKind::Join, a, "", ts(5)))],
        "join",
    )
    .await;
    let before = all_compliance(store).await;

    let outcomes = commit_ok(
        store,
        vec![
            Write::DeleteRoom { room: a.into() },
            Write::Compliance(event(ComplianceKind::RoomDestroyed, a, "", ts(6))),
        ],
        "deleting a room",
    )
    .await;
    assert_eq!(outcomes, vec![WriteOutcome::Done, WriteOutcome::Done]);

    assert_eq!(
        store.room_get(a).await.unwrap(),
        None,
        "a deleted room's record must be gone"
    );
    assert_eq!(
        store.room_list().await.unwrap().len(),
        1,
        "only the other room is left"
    );
    check_page(
        &page(store, a, query(10)).await,
        &[],
        true,
        0,
        "a deleted room's archive",
    );
    assert_eq!(
        store.archive_get(a, 1).await.unwrap(),
        None,
        "a deleted room's messages must be gone"
    );
    assert_eq!(
        store.room_stats(a).await.unwrap(),
        RoomStats::default(),
        "a deleted room has no stats"
    );
    check_page(
        &page(store, b, query(10)).await,
        &[1],
        true,
        1,
        "another room's archive survives",
    );

    let after = all_compliance(store).await;
    assert_eq!(
        after.len(),
        before.len() + 1,
        "deleting must keep compliance events and add its own"
    );
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "compliance events must survive the room's deletion"
    );

    let again = commit_ok(
        store,
        vec![Write::DeleteRoom { room: a.into() }],
        "deleting again",
    )
    .await;
    assert_eq!(
        again,
        vec![WriteOutcome::Done],
        "deleting a missing room is a no-op, not an error"
    );

    put_rooms(store, &[a]).await;
    let outcomes = commit_ok(
        store,
        vec![
            Write::AppendMessage(origin.clone()),
            Write::AppendMessage(simple(a, 9)),
        ],
        "re-created",
    )
    .await;
    assert_eq!(
        outcomes,
        vec![
            WriteOutcome::Appended {
                seq: 1,
                duplicate: false
            },
            WriteOutcome::Appended {
                seq: 2,
                duplicate: false
            }
        ],
        "a re-created room starts at seq 1 and forgets the deleted archive's origin-ids"
    );

    // The same inside one batch: delete, re-create, then append a known origin-id twice.
    let outcomes = commit_ok(
        store,
        vec![
            Write::DeleteRoom { room: a.into() },
            Write::PutRoom(room_record(a)),
            Write::AppendMessage(origin.clone()),
            Write::AppendMessage(origin),
        ],
        "delete and re-create in one batch",
    )
    .await;
    assert_eq!(
        outcomes,
        vec![
            WriteOutcome::Done,
            WriteOutcome::Saved { revision: 1 },
            WriteOutcome::Appended {
                seq: 1,
                duplicate: false
            },
            WriteOutcome::Appended {
                seq: 1,
                duplicate: true
            },
        ],
        "a room deleted and re-created in one batch starts afresh"
    );
    check_page(
        &page(store, a, query(10)).await,
        &[1],
        true,
        1,
        "the re-created room",
    );
}

// ---------------------------------------------------------------------------------------------
// Appends

/// Appends get per-room sequence numbers 1, 2, 3… without holes, independent per room.
pub async fn append_sequences(store: &dyn Store) {
    let (a, b) = ("alpha@conference.localhost", "bravo@conference.localhost");
    put_rooms(store, &[a, b]).await;
    assert_eq!(
        append_all(
            store,
            vec![simple(a, 1), simple(a, 2), simple(a, 3)],
            "three to A"
        )
        .await,
        vec![1, 2, 3]
    );
    assert_eq!(
        append_all(
            store,
            vec![simple(a, 4), simple(b, 5), simple(a, 6), simple(b, 7)],
            "interleaved"
        )
        .await,
        vec![4, 1, 5, 2],
        "sequence numbers are per room"
    );
    assert_eq!(
        append_all(store, vec![simple(b, 8)], "one to B").await,
        vec![3]
    );
    check_page(
        &page(store, a, query(100)).await,
        &range(1, 5),
        true,
        5,
        "room A",
    );
    check_page(
        &page(store, b, query(100)).await,
        &range(1, 3),
        true,
        3,
        "room B",
    );
    let bodies: Vec<_> = page(store, b, query(100))
        .await
        .messages
        .into_iter()
        .map(|m| m.body.unwrap())
        .collect();
    assert_eq!(
        bodies,
        ["message number 5", "message number 7", "message number 8"],
        "archive order is append order"
    );
}

/// Outcomes come back in batch order, one per write, whatever the mix of writes.
pub async fn batch_outcomes_in_order(store: &dyn Store) {
    let (a, b) = ("alpha@conference.localhost", "bravo@conference.localhost");
    put_rooms(store, &[b]).await;
    let m = message(a, "alice@localhost", "alice", Some("x1"), Some("hi"), ts(1));
    let outcomes = commit_ok(
        store,
        vec![
            Write::PutRoom(room_record(a)),
            Write::Compliance(event(ComplianceKind::RoomCreated, a, "", ts(1))),
            Write::AppendMessage(m.clone()),
            Write::AppendMessage(m),
            Write::DeleteRoom { room: b.into() },
            Write::AppendMessage(simple(a, 2)),
            Write::Compliance(event(ComplianceKind::Leave, a, "", ts(3))),
        ],
        "a mixed batch",
    )
    .await;
    assert_eq!(
        outcomes,
        vec![
            WriteOutcome::Saved { revision: 1 },
            WriteOutcome::Done,
            WriteOutcome::Appended {
                seq: 1,
                duplicate: false
            },
            WriteOutcome::Appended {
                seq: 1,
                duplicate: true
            },
            WriteOutcome::Done,
            WriteOutcome::Appended {
                seq: 2,
                duplicate: false
            },
            WriteOutcome::Done,
        ],
        "outcomes must follow the batch order"
    );
    assert_eq!(
        store.room_get(b).await.unwrap(),
        None,
        "the delete in the batch took effect"
    );
    let kinds: Vec<_> = all_compliance(store)
        .await
        .into_iter()
        .map(|r| r.event.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            ComplianceKind::RoomCreated,
            ComplianceKind::Message,
            ComplianceKind::Message,
            ComplianceKind::Leave
        ],
        "compliance records follow the batch order, one per fresh message"
    );
}

/// An empty batch commits nothing and returns no outcome.
pub async fn empty_batch(store: &dyn Store) {
    assert_eq!(
        commit_ok(store, Vec::new(), "an empty batch").await,
        Vec::new()
    );
    assert!(
        all_compliance(store).await.is_empty(),
        "an empty batch records nothing"
    );
}

/// Appending to a room that does not exist fails the whole batch with `Invalid`; nothing of the
/// batch is written, not even its compliance events, and the store keeps working.
pub async fn append_to_unknown_room_is_invalid(store: &dyn Store) {
    let (a, x) = ("alpha@conference.localhost", "ghost@conference.localhost");
    room_with(store, a, 2).await;
    let compliance_before = all_compliance(store).await;

    let result = store
        .commit(vec![
            Write::PutRoom(room_record("bravo@conference.localhost")),
            Write::Compliance(event(ComplianceKind::Join, a, "", ts(3))),
            Write::AppendMessage(simple(a, 3)),
            Write::AppendMessage(simple(x, 4)),
        ])
        .await;
    assert!(
        matches!(result, Err(StoreError::Invalid(_))),
        "append to an unknown room: got {result:?}"
    );

    let deleted = store
        .commit(vec![
            Write::PutRoom(room_record(x)),
            Write::DeleteRoom { room: x.into() },
            Write::AppendMessage(simple(x, 5)),
        ])
        .await;
    assert!(
        matches!(deleted, Err(StoreError::Invalid(_))),
        "append after delete in the same batch: got {deleted:?}"
    );

    assert_eq!(
        store.room_list().await.unwrap().len(),
        1,
        "a failed batch must create no room"
    );
    assert_eq!(
        store.room_stats(a).await.unwrap().last_seq,
        2,
        "a failed batch must append nothing"
    );
    assert_eq!(
        all_compliance(store).await,
        compliance_before,
        "a failed batch must record no compliance event"
    );
    assert_eq!(
        append_all(store, vec![simple(a, 6)], "after the failure").await,
        vec![3],
        "no hole after a failed batch"
    );
}

/// Resending the same (room, sender, origin-id) is a duplicate: the original seq, nothing new in
/// the archive or compliance. Another sender or another room with the same origin-id is new,
/// and messages without origin-id are never duplicates.
pub async fn origin_id_dedupe(store: &dyn Store) {
    let (a, b) = ("alpha@conference.localhost", "bravo@conference.localhost");
    put_rooms(store, &[a, b]).await;
    let original = message(
        a,
        "alice@localhost",
        "alice",
        Some("o-1"),
        Some("original"),
        ts(1),
    );
    assert_eq!(
        append_all(store, vec![original.clone(), simple(a, 2)], "originals").await,
        vec![1, 2]
    );
    let compliance_before = all_compliance(store).await;

    let mut resend = original.clone();
    resend.body = Some("changed on resend".into());
    resend.at = ts(9);
    resend.nick = "alice2".into();
    let outcome = commit_ok(store, vec![Write::AppendMessage(resend)], "resend").await;
    assert_eq!(
        outcome,
        vec![WriteOutcome::Appended {
            seq: 1,
            duplicate: true
        }],
        "a resend names the original seq"
    );
    assert_eq!(
        all_compliance(store).await,
        compliance_before,
        "a duplicate must not be recorded again"
    );
    check_page(
        &page(store, a, query(10)).await,
        &[1, 2],
        true,
        2,
        "after a duplicate",
    );
    let kept = store
        .archive_get(a, 1)
        .await
        .unwrap()
        .expect("original message");
    assert_eq!(
        kept.body.as_deref(),
        Some("original"),
        "a duplicate must not overwrite the original"
    );

    let other_sender = message(a, "bob@localhost", "bob", Some("o-1"), Some("bob's"), ts(3));
    let other_room = message(
        b,
        "alice@localhost",
        "alice",
        Some("o-1"),
        Some("elsewhere"),
        ts(4),
    );
    let no_origin = message(a, "alice@localhost", "alice", None, Some("same"), ts(5));
    let outcomes = commit_ok(
        store,
        vec![
            Write::AppendMessage(other_sender),
            Write::AppendMessage(other_room),
            Write::AppendMessage(no_origin.clone()),
            Write::AppendMessage(no_origin),
        ],
        "not duplicates",
    )
    .await;
    assert_eq!(
        outcomes,
        vec![
            WriteOutcome::Appended {
                seq: 3,
                duplicate: false
            },
            WriteOutcome::Appended {
                seq: 1,
                duplicate: false
            },
            WriteOutcome::Appended {
                seq: 4,
                duplicate: false
            },
            WriteOutcome::Appended {
                seq: 5,
                duplicate: false
            },
        ],
        "same origin-id from another sender or room, or no origin-id at all, is not a duplicate"
    );
    // A later batch still sees every earlier origin-id.
    let outcome = commit_ok(store, vec![Write::AppendMessage(original)], "late resend").await;
    assert_eq!(
        outcome,
        vec![WriteOutcome::Appended {
            seq: 1,
            duplicate: true
        }]
    );
}

/// A message without origin-id carries the idempotency key the server gave it: committing it
/// again (a retry after an unknown outcome) names the original seq and stores nothing, inside
/// one batch, across batches and across concurrent callers. Keys are per room and independent
/// of the sender; a room deleted and re-created forgets them.
pub async fn idempotency_key_dedupe(store: &dyn Store) {
    let (a, b) = ("alpha@conference.localhost", "bravo@conference.localhost");
    put_rooms(store, &[a, b]).await;
    let keyed = |room: &str, sender: &str, key: &str, body: &str, n: i64| NewMessage {
        idempotency_key: Some(key.into()),
        ..message(room, sender, "nick", None, Some(body), ts(n))
    };
    let first = keyed(a, "alice@localhost", "k-1", "first", 1);
    assert_eq!(
        append_all(store, vec![first.clone(), simple(a, 2)], "originals").await,
        vec![1, 2]
    );
    let compliance_before = all_compliance(store).await;
    let mut retried = first.clone();
    retried.at = ts(9);
    let outcome = commit_ok(store, vec![Write::AppendMessage(retried)], "retry").await;
    assert_eq!(
        outcome,
        vec![WriteOutcome::Appended {
            seq: 1,
            duplicate: true
        }],
        "a retried commit names the original seq"
    );
    assert_eq!(
        all_compliance(store).await,
        compliance_before,
        "a retried message is not recorded again"
    );
    assert_eq!(
        store.archive_get(a, 1).await.unwrap().map(|m| m.body),
        Some(Some("first".into()))
    );

    let outcomes = commit_ok(
        store,
        vec![
            Write::AppendMessage(keyed(a, "alice@localhost", "k-2", "second", 3)),
            Write::AppendMessage(keyed(a, "alice@localhost", "k-2", "second", 3)),
            // The key is the server's, not the sender's: another sender's message with the
            // same key is the same message (keys are never reused).
            Write::AppendMessage(keyed(a, "bob@localhost", "k-1", "first", 1)),
            Write::AppendMessage(keyed(b, "alice@localhost", "k-1", "elsewhere", 4)),
        ],
        "keys inside a batch",
    )
    .await;
    assert_eq!(
        outcomes,
        vec![
            WriteOutcome::Appended {
                seq: 3,
                duplicate: false
            },
            WriteOutcome::Appended {
                seq: 3,
                duplicate: true
            },
            WriteOutcome::Appended {
                seq: 1,
                duplicate: true
            },
            WriteOutcome::Appended {
                seq: 1,
                duplicate: false
            },
        ],
        "keys dedupe within a batch and per room"
    );

    // Concurrent retries of one new message: stored exactly once.
    let racing = keyed(a, "alice@localhost", "k-race", "racing", 5);
    let results =
        futures_join_all((0..8).map(|_| store.commit(vec![Write::AppendMessage(racing.clone())])))
            .await;
    let mut fresh = 0;
    for r in results {
        match r.expect("concurrent retry").as_slice() {
            [WriteOutcome::Appended { seq: 4, duplicate }] => fresh += usize::from(!duplicate),
            other => panic!("concurrent retries must all name seq 4, got {other:?}"),
        }
    }
    assert_eq!(fresh, 1, "exactly one of the concurrent retries is fresh");
    check_page(
        &page(store, a, query(10)).await,
        &[1, 2, 3, 4],
        true,
        4,
        "after retries",
    );

    // A re-created room forgets the keys of the deleted archive.
    commit_ok(store, vec![Write::DeleteRoom { room: a.into() }], "delete").await;
    put_rooms(store, &[a]).await;
    assert_eq!(
        append_all(store, vec![first], "after re-creation").await,
        vec![1]
    );
}

/// Every save raises a room's record revision; a message is stored only under the revision
/// its room accepted it, not counting the batch's own saves, and is otherwise refused as
/// stale without a trace. A duplicate is named as such whatever the revision.
pub async fn record_revisions(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    assert_eq!(store.room_load(a).await.unwrap(), None);
    put_rooms(store, &[a]).await;
    let record = room_record(a);
    assert_eq!(
        store.room_load(a).await.unwrap(),
        Some(StoredRoom {
            record: record.clone(),
            revision: 1
        })
    );
    let under = |revision: i64, key: &str, n: i64| NewMessage {
        record_revision: Some(revision),
        id_epoch: None,
        idempotency_key: Some(key.into()),
        ..simple(a, n)
    };
    assert_eq!(
        append_all(store, vec![under(1, "k-1", 1)], "under revision 1").await,
        vec![1]
    );
    // Another server bans someone: revision 2.
    let mut banned = record.clone();
    banned.affiliations.push(AffiliationEntry {
        jid: "mallory@localhost".into(),
        affiliation: Affiliation::Outcast,
        reason: None,
    });
    assert_eq!(
        commit_ok(store, vec![Write::PutRoom(banned.clone())], "ban").await,
        vec![WriteOutcome::Saved { revision: 2 }]
    );
    let compliance_before = all_compliance(store).await;
    let outcomes = commit_ok(
        store,
        vec![
            Write::AppendMessage(under(1, "k-2", 2)),
            Write::Compliance(event(ComplianceKind::Join, a, "", ts(2))),
            Write::AppendMessage(under(2, "k-3", 3)),
            // Already stored under revision 1: a duplicate, not stale.
            Write::AppendMessage(under(1, "k-1", 1)),
        ],
        "one stale message among others",
    )
    .await;
    assert_eq!(
        outcomes,
        vec![
            WriteOutcome::Stale,
            WriteOutcome::Done,
            WriteOutcome::Appended {
                seq: 2,
                duplicate: false
            },
            WriteOutcome::Appended {
                seq: 1,
                duplicate: true
            },
        ],
        "a stale message is refused, the rest of its batch commits"
    );
    let records = all_compliance(store).await;
    assert_eq!(
        records.len(),
        compliance_before.len() + 2,
        "the stale message has no compliance record: {records:?}"
    );
    check_page(
        &page(store, a, query(10)).await,
        &[1, 2],
        true,
        2,
        "nothing stored under a stale revision",
    );
    // The batch's own save does not count: its messages were decided together with it.
    let outcomes = commit_ok(
        store,
        vec![
            Write::PutRoom(record.clone()),
            Write::AppendMessage(under(2, "k-4", 4)),
            Write::PutRoom(record.clone()),
            Write::AppendMessage(under(2, "k-5", 5)),
        ],
        "saves and messages in one batch",
    )
    .await;
    assert_eq!(
        outcomes,
        vec![
            WriteOutcome::Saved { revision: 3 },
            WriteOutcome::Appended {
                seq: 3,
                duplicate: false
            },
            WriteOutcome::Saved { revision: 4 },
            WriteOutcome::Appended {
                seq: 4,
                duplicate: false
            },
        ]
    );
    assert_eq!(
        store.room_load(a).await.unwrap().map(|r| r.revision),
        Some(4)
    );
    assert_eq!(
        commit_ok(
            store,
            vec![Write::AppendMessage(under(3, "k-6", 6))],
            "stale"
        )
        .await,
        vec![WriteOutcome::Stale]
    );
    // Unchecked messages (imports) go in whatever the revision.
    assert_eq!(
        append_all(store, vec![simple(a, 7)], "unchecked").await,
        vec![5]
    );
    // Deleted and created again: revision 1 again.
    commit_ok(store, vec![Write::DeleteRoom { room: a.into() }], "delete").await;
    assert_eq!(
        commit_ok(store, vec![Write::PutRoom(record.clone())], "re-create").await,
        vec![WriteOutcome::Saved { revision: 1 }]
    );

    // A conditional save replaces only the revision it names (counting the batch's own
    // saves); otherwise the whole batch fails as a conflict and changes nothing.
    let put_if = |revision: i64| Write::PutRoomIf {
        record: record.clone(),
        revision,
    };
    assert_eq!(
        commit_ok(store, vec![put_if(1), put_if(2)], "conditional saves").await,
        vec![
            WriteOutcome::Saved { revision: 2 },
            WriteOutcome::Saved { revision: 3 }
        ]
    );
    let before = (
        all_compliance(store).await,
        store.room_stats(a).await.unwrap(),
    );
    for (what, writes) in [
        ("a stale save", vec![put_if(2)]),
        ("a stale creation", vec![put_if(0)]),
        (
            "a stale save after a message",
            vec![
                Write::AppendMessage(simple(a, 8)),
                Write::Compliance(event(ComplianceKind::Join, a, "", ts(8))),
                put_if(1),
            ],
        ),
    ] {
        match store.commit(writes).await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("{what}: expected a conflict, got {other:?}"),
        }
        assert_eq!(
            (
                all_compliance(store).await,
                store.room_stats(a).await.unwrap()
            ),
            before,
            "{what}: nothing of the batch is written"
        );
    }
    assert_eq!(
        store.room_load(a).await.unwrap().map(|r| r.revision),
        Some(3)
    );
    // Revision 0 creates a room that does not exist.
    let fresh = "fresh@conference.localhost";
    assert_eq!(
        commit_ok(
            store,
            vec![Write::PutRoomIf {
                record: room_record(fresh),
                revision: 0
            }],
            "conditional creation"
        )
        .await,
        vec![WriteOutcome::Saved { revision: 1 }]
    );
}

/// An announcement is for the other servers only: its outcome is `Done` and nothing is stored
/// (no record, no message, no compliance record).
pub async fn announcements_store_nothing(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    put_rooms(store, &[a]).await;
    let compliance_before = all_compliance(store).await;
    let outcomes = commit_ok(
        store,
        vec![
            Write::Announce {
                room: a.into(),
                event: pchat_room::RoomEvent::Destroyed {
                    reason: Some("moved ✉ \"quoted\"\nnext line".into()),
                    alternate: Some("other@conference.localhost".into()),
                },
            },
            Write::Announce {
                room: "missing@conference.localhost".into(),
                event: pchat_room::RoomEvent::Role {
                    server: "s2".into(),
                    nick: "bob".into(),
                    role: pchat_room::Role::None,
                    actor_role: pchat_room::Role::Moderator,
                    actor_affiliation: Affiliation::Owner,
                    actor_nick: Some("alice".into()),
                    reason: None,
                },
            },
        ],
        "announcements",
    )
    .await;
    assert_eq!(outcomes, vec![WriteOutcome::Done, WriteOutcome::Done]);
    assert_eq!(all_compliance(store).await, compliance_before);
    assert_eq!(
        store.room_load(a).await.unwrap().map(|r| r.revision),
        Some(1),
        "an announcement is no save"
    );
    assert_eq!(
        store
            .room_get("missing@conference.localhost")
            .await
            .unwrap(),
        None
    );
}

/// Duplicates inside one batch, and across batches committed at the same time.
pub async fn origin_id_dedupe_within_batch(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    put_rooms(store, &[a]).await;
    let m = message(
        a,
        "alice@localhost",
        "alice",
        Some("dup"),
        Some("once"),
        ts(1),
    );
    let outcomes = commit_ok(
        store,
        vec![
            Write::AppendMessage(m.clone()),
            Write::AppendMessage(simple(a, 2)),
            Write::AppendMessage(m.clone()),
        ],
        "duplicate inside a batch",
    )
    .await;
    assert_eq!(
        outcomes,
        vec![
            WriteOutcome::Appended {
                seq: 1,
                duplicate: false
            },
            WriteOutcome::Appended {
                seq: 2,
                duplicate: false
            },
            WriteOutcome::Appended {
                seq: 1,
                duplicate: true
            },
        ]
    );
    let messages = all_compliance(store)
        .await
        .into_iter()
        .filter(|r| r.event.kind == ComplianceKind::Message)
        .count();
    assert_eq!(
        messages, 2,
        "a duplicate inside a batch gets no compliance record"
    );

    // The same new message sent by several callers at once is archived exactly once.
    let m2 = message(
        a,
        "alice@localhost",
        "alice",
        Some("race"),
        Some("racing"),
        ts(3),
    );
    let results =
        futures_join_all((0..8).map(|_| store.commit(vec![Write::AppendMessage(m2.clone())])))
            .await;
    let mut fresh = 0;
    for r in results {
        match r.expect("concurrent resend").as_slice() {
            [WriteOutcome::Appended { seq: 3, duplicate }] => fresh += usize::from(!duplicate),
            other => panic!("concurrent resends must all name seq 3, got {other:?}"),
        }
    }
    assert_eq!(fresh, 1, "exactly one of the concurrent resends is fresh");
    check_page(
        &page(store, a, query(10)).await,
        &[1, 2, 3],
        true,
        3,
        "after concurrent resends",
    );
}

/// Polls futures concurrently on the current task (the crate deliberately has no futures dep).
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Compliance

/// Every fresh message gets a committed `Message` compliance record carrying its seq, in order
/// with the batch's other events.
pub async fn message_compliance_records(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    put_rooms(store, &[a]).await;
    let join = event(ComplianceKind::Join, a, "", ts(1));
    let m1 = message(
        a,
        "alice@localhost",
        "alice",
        Some("c1"),
        Some("hello world"),
        ts(2),
    );
    let m2 = message(a, "bob@localhost", "Bob", None, None, ts(3));
    commit_ok(
        store,
        vec![
            Write::Compliance(join.clone()),
            Write::AppendMessage(m1.clone()),
            Write::AppendMessage(m2.clone()),
        ],
        "join and two messages",
    )
    .await;
    let records = all_compliance(store).await;
    assert_eq!(
        records.len(),
        3,
        "one record per event and per message: {records:#?}"
    );
    assert_eq!(records[0].event, join);
    assert_eq!(records[0].message_seq, None, "only messages carry a seq");
    for (record, (m, seq)) in records[1..].iter().zip([(&m1, 1), (&m2, 2)]) {
        let want = NewComplianceEvent {
            kind: ComplianceKind::Message,
            at: m.at,
            room: a.into(),
            actor: m.sender.clone(),
            nick: Some(m.nick.clone()),
            detail: m.body.clone().unwrap_or_default(),
        };
        assert_eq!(
            record.event, want,
            "a message's compliance record: sender as actor, body as detail"
        );
        assert_eq!(
            record.message_seq,
            Some(seq),
            "a message's compliance record carries its seq"
        );
    }
    assert!(
        records.iter().all(|r| r.committed),
        "records of a returned commit are committed"
    );
}

/// Compliance writes are recorded in commit order, with increasing ids, every kind round-trips.
pub async fn compliance_order(store: &dyn Store) {
    use ComplianceKind::*;
    let kinds = [
        Join,
        Leave,
        Subject,
        RoomCreated,
        ConfigChange,
        AffiliationChange,
        RoleChange,
        RoomDestroyed,
        PrivateMessage,
        Invitation,
    ];
    let mut want = Vec::new();
    for (i, chunk) in kinds.chunks(3).enumerate() {
        let events: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(j, k)| {
                let mut e = event(
                    *k,
                    "alpha@conference.localhost",
                    &format!("detail {i}.{j} «ü» 'q' \"dq\""),
                    ts(i as i64),
                );
                if j == 1 {
                    e.nick = None;
                }
                e
            })
            .collect();
        want.extend(events.clone());
        commit_ok(
            store,
            events.into_iter().map(Write::Compliance).collect(),
            "compliance events",
        )
        .await;
    }
    let records = all_compliance(store).await;
    let got: Vec<_> = records.iter().map(|r| r.event.clone()).collect();
    assert_eq!(got, want, "compliance events in commit order");
    assert!(
        records.windows(2).all(|w| w[0].id < w[1].id),
        "ids must increase"
    );
    assert!(records
        .iter()
        .all(|r| r.committed && r.message_seq.is_none()));
}

/// The compliance export's state moves only by compare-and-set; a finished run is recorded
/// (committed, after the records it exported); a purge deletes only exported records older
/// than its time, a bounded batch at a time, and ids are never reused after it.
pub async fn compliance_export(store: &dyn Store) {
    let fresh = store.compliance_export_state().await.unwrap();
    assert_eq!(fresh, crate::ExportState::default(), "nothing exported yet");
    let events: Vec<_> = (0..10)
        .map(|i| {
            Write::Compliance(event(
                ComplianceKind::Join,
                "alpha@conference.localhost",
                &format!("e{i}"),
                ts(i),
            ))
        })
        .collect();
    commit_ok(store, events, "10 events").await;
    let records = store.compliance_after(0, 100).await.unwrap();
    assert_eq!(records.len(), 10);
    let last = records.last().unwrap().id;

    let begun = crate::ExportState {
        pending_to: Some(records[5].id),
        ..fresh.clone()
    };
    store
        .compliance_export_step(&fresh, &begun, None)
        .await
        .expect("begin");
    assert_eq!(store.compliance_export_state().await.unwrap(), begun);
    // A second exporter that read the old state is refused and changes nothing.
    let other = crate::ExportState {
        pending_to: Some(last),
        ..fresh.clone()
    };
    match store.compliance_export_step(&fresh, &other, None).await {
        Err(StoreError::Conflict(_)) => {}
        r => panic!("a stale step must be a conflict, got {r:?}"),
    }
    assert_eq!(store.compliance_export_state().await.unwrap(), begun);

    let done = crate::ExportState {
        watermark: records[5].id,
        pending_to: None,
        runs: 1,
        finished_at: Some(ts(100)),
    };
    let run = NewComplianceEvent {
        kind: ComplianceKind::ExportRun,
        at: ts(100),
        room: String::new(),
        actor: "exporter".into(),
        nick: None,
        detail: "run 1".into(),
    };
    store
        .compliance_export_step(&begun, &done, Some(run))
        .await
        .expect("finish");
    assert_eq!(store.compliance_export_state().await.unwrap(), done);
    let after = store.compliance_after(last, 100).await.unwrap();
    assert_eq!(after.len(), 1, "the run is recorded: {after:?}");
    assert_eq!(after[0].event.kind, ComplianceKind::ExportRun);
    assert!(after[0].committed, "a run record is always committed");
    let run_id = after[0].id;

    // Purge: only exported (id up to the watermark, e0..e5) and older than ts(3) (e0..e2),
    // at most 2 at a time.
    assert_eq!(store.compliance_purge(ts(3), 2).await.unwrap(), 2);
    assert_eq!(store.compliance_purge(ts(3), 2).await.unwrap(), 1);
    assert_eq!(store.compliance_purge(ts(3), 2).await.unwrap(), 0);
    assert_eq!(
        store.compliance_purge(ts(1_000), 100).await.unwrap(),
        3,
        "records not exported yet stay, whatever their age"
    );
    let left = store.compliance_after(0, 100).await.unwrap();
    assert_eq!(
        left.iter()
            .map(|r| r.event.detail.as_str())
            .collect::<Vec<_>>(),
        ["e6", "e7", "e8", "e9", "run 1"]
    );
    commit_ok(
        store,
        vec![Write::Compliance(event(
            ComplianceKind::Leave,
            "alpha@conference.localhost",
            "later",
            ts(200),
        ))],
        "one more",
    )
    .await;
    let newest = store.compliance_after(run_id, 10).await.unwrap();
    assert!(
        newest.len() == 1 && newest[0].id > run_id,
        "ids are never reused: {newest:?}"
    );
}

/// `compliance_after` pages by id: strictly after `after_id`, at most `limit`, empty at the end.
pub async fn compliance_paging(store: &dyn Store) {
    let events: Vec<_> = (0..25)
        .map(|i| {
            Write::Compliance(event(
                ComplianceKind::Join,
                "alpha@conference.localhost",
                &format!("e{i}"),
                ts(i),
            ))
        })
        .collect();
    commit_ok(store, events, "25 events").await;
    assert!(
        store.compliance_after(0, 0).await.unwrap().is_empty(),
        "limit 0 returns nothing"
    );

    let mut after = 0;
    let mut sizes = Vec::new();
    let mut details = Vec::new();
    loop {
        let page = store.compliance_after(after, 10).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(
            page.iter().all(|r| r.id > after),
            "every record's id must be greater than after_id"
        );
        sizes.push(page.len());
        details.extend(page.iter().map(|r| r.event.detail.clone()));
        after = page.last().unwrap().id;
        assert!(sizes.len() <= 3, "paging must end");
    }
    assert_eq!(sizes, [10, 10, 5], "pages of at most `limit`");
    assert_eq!(
        details,
        (0..25).map(|i| format!("e{i}")).collect::<Vec<_>>(),
        "paging is oldest first"
    );

    let all = all_compliance(store).await;
    let from_middle = store.compliance_after(all[11].id, 3).await.unwrap();
    assert_eq!(
        from_middle,
        all[12..15].to_vec(),
        "paging from an id in the middle"
    );
    assert!(
        store
            .compliance_after(all[24].id, 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing after the last id"
    );
}

// ---------------------------------------------------------------------------------------------
// Archive pages

/// The latest page (from_end) and the first page (forward), with `complete` and `count`.
pub async fn archive_latest_page(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    room_with(store, a, 25).await;
    let latest = ArchiveQuery {
        limit: 10,
        from_end: true,
        ..ArchiveQuery::default()
    };
    check_page(
        &page(store, a, latest).await,
        &range(16, 25),
        false,
        25,
        "latest 10 of 25",
    );
    let all = ArchiveQuery {
        limit: 100,
        from_end: true,
        ..ArchiveQuery::default()
    };
    check_page(
        &page(store, a, all).await,
        &range(1, 25),
        true,
        25,
        "latest 100 of 25",
    );
    let exact = ArchiveQuery {
        limit: 25,
        from_end: true,
        ..ArchiveQuery::default()
    };
    check_page(
        &page(store, a, exact).await,
        &range(1, 25),
        true,
        25,
        "latest 25 of 25",
    );
    check_page(
        &page(store, a, query(10)).await,
        &range(1, 10),
        false,
        25,
        "first 10 of 25",
    );
    check_page(
        &page(store, a, query(25)).await,
        &range(1, 25),
        true,
        25,
        "first 25 of 25",
    );

    let m = page(
        store,
        a,
        ArchiveQuery {
            limit: 1,
            from_end: true,
            ..ArchiveQuery::default()
        },
    )
    .await;
    assert_eq!(
        m.messages[0],
        store.archive_get(a, 25).await.unwrap().unwrap(),
        "pages and archive_get agree"
    );
}

/// Forward paging with `after_seq` walks the whole archive; only the last page is complete.
pub async fn archive_forward_paging(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    room_with(store, a, 25).await;
    let mut after = None;
    let mut got = Vec::new();
    for i in 0..5 {
        let p = page(
            store,
            a,
            ArchiveQuery {
                after_seq: after,
                limit: 5,
                ..ArchiveQuery::default()
            },
        )
        .await;
        let want = range(i * 5 + 1, i * 5 + 5);
        check_page(&p, &want, i == 4, 25, &format!("forward page {i}"));
        after = p.messages.last().map(|m| m.seq);
        got.extend(seqs(&p));
    }
    assert_eq!(got, range(1, 25));
    let past = page(
        store,
        a,
        ArchiveQuery {
            after_seq: Some(25),
            limit: 5,
            ..ArchiveQuery::default()
        },
    )
    .await;
    check_page(&past, &[], true, 25, "after the last message");
    let odd = page(
        store,
        a,
        ArchiveQuery {
            after_seq: Some(22),
            limit: 5,
            ..ArchiveQuery::default()
        },
    )
    .await;
    check_page(&odd, &[23, 24, 25], true, 25, "a short last page");
}

/// Backward paging with `before_seq` (from_end) walks the archive newest to oldest; only the
/// oldest page is complete.
pub async fn archive_backward_paging(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    room_with(store, a, 25).await;
    let mut before = None;
    let mut pages = Vec::new();
    loop {
        let p = page(
            store,
            a,
            ArchiveQuery {
                before_seq: before,
                limit: 10,
                from_end: true,
                ..ArchiveQuery::default()
            },
        )
        .await;
        pages.push((seqs(&p), p.complete, p.count));
        before = p.messages.first().map(|m| m.seq);
        if p.complete {
            break;
        }
        assert!(pages.len() < 5, "backward paging must end");
    }
    assert_eq!(
        pages,
        vec![
            (range(16, 25), false, 25),
            (range(6, 15), false, 25),
            (range(1, 5), true, 25)
        ],
        "backward pages, each oldest first"
    );
    let exact = page(
        store,
        a,
        ArchiveQuery {
            before_seq: Some(11),
            limit: 10,
            from_end: true,
            ..ArchiveQuery::default()
        },
    )
    .await;
    check_page(
        &exact,
        &range(1, 10),
        true,
        25,
        "a backward page that ends exactly at the first message",
    );
    let none = page(
        store,
        a,
        ArchiveQuery {
            before_seq: Some(1),
            limit: 10,
            from_end: true,
            ..ArchiveQuery::default()
        },
    )
    .await;
    check_page(&none, &[], true, 25, "before the first message");
}

/// `after_seq` and `before_seq` together bound a window, in either direction.
pub async fn archive_window(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    room_with(store, a, 25).await;
    let window = |limit, from_end| ArchiveQuery {
        after_seq: Some(3),
        before_seq: Some(10),
        limit,
        from_end,
        ..ArchiveQuery::default()
    };
    check_page(
        &page(store, a, window(10, false)).await,
        &range(4, 9),
        true,
        25,
        "whole window forward",
    );
    check_page(
        &page(store, a, window(10, true)).await,
        &range(4, 9),
        true,
        25,
        "whole window backward",
    );
    check_page(
        &page(store, a, window(4, false)).await,
        &range(4, 7),
        false,
        25,
        "window start",
    );
    check_page(
        &page(store, a, window(4, true)).await,
        &range(6, 9),
        false,
        25,
        "window end",
    );
    let forward_before = ArchiveQuery {
        before_seq: Some(10),
        limit: 5,
        ..ArchiveQuery::default()
    };
    check_page(
        &page(store, a, forward_before).await,
        &range(1, 5),
        false,
        25,
        "forward with before_seq",
    );
    let backward_after = ArchiveQuery {
        after_seq: Some(20),
        limit: 10,
        from_end: true,
        ..ArchiveQuery::default()
    };
    check_page(
        &page(store, a, backward_after).await,
        &range(21, 25),
        true,
        25,
        "from_end with after_seq",
    );
}

/// `start` and `end` are inclusive time bounds; `count` counts only what they match.
pub async fn archive_time_filters(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    room_with(store, a, 20).await;
    let span = |limit, from_end, after_seq| ArchiveQuery {
        start: Some(ts(5)),
        end: Some(ts(10)),
        after_seq,
        limit,
        from_end,
        ..ArchiveQuery::default()
    };
    check_page(
        &page(store, a, span(100, false, None)).await,
        &range(5, 10),
        true,
        6,
        "start..=end",
    );
    check_page(
        &page(store, a, span(4, false, None)).await,
        &range(5, 8),
        false,
        6,
        "start..=end, first 4",
    );
    check_page(
        &page(store, a, span(4, true, None)).await,
        &range(7, 10),
        false,
        6,
        "start..=end, last 4",
    );
    check_page(
        &page(store, a, span(4, false, Some(8))).await,
        &[9, 10],
        true,
        6,
        "start..=end after 8",
    );
    let start = ArchiveQuery {
        start: Some(ts(18)),
        limit: 100,
        ..ArchiveQuery::default()
    };
    check_page(
        &page(store, a, start).await,
        &[18, 19, 20],
        true,
        3,
        "start only",
    );
    let end = ArchiveQuery {
        end: Some(ts(2)),
        limit: 100,
        from_end: true,
        ..ArchiveQuery::default()
    };
    check_page(&page(store, a, end).await, &[1, 2], true, 2, "end only");
    let between = ArchiveQuery {
        start: Some(ts(5).plus_micros(1)),
        end: Some(ts(6).plus_micros(-1)),
        limit: 100,
        ..ArchiveQuery::default()
    };
    check_page(
        &page(store, a, between).await,
        &[],
        true,
        0,
        "nothing between two messages",
    );
}

/// `with_nick` keeps only one nick's messages, alone or with other filters.
pub async fn archive_with_nick(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    put_rooms(store, &[a]).await;
    let nicks = ["alice", "bob", "carol"];
    let messages = (1..=12)
        .map(|i| {
            let nick = nicks[(i as usize - 1) % 3];
            message(
                a,
                &format!("{nick}@localhost"),
                nick,
                None,
                Some(&format!(
                    "{nick} says {}",
                    if i % 2 == 0 { "even" } else { "odd" }
                )),
                ts(i),
            )
        })
        .collect();
    append_all(store, messages, "three speakers").await;
    let nick = |name: &str, limit, from_end| ArchiveQuery {
        with_nick: Some(name.into()),
        limit,
        from_end,
        ..ArchiveQuery::default()
    };
    check_page(
        &page(store, a, nick("bob", 100, false)).await,
        &[2, 5, 8, 11],
        true,
        4,
        "bob's messages",
    );
    check_page(
        &page(store, a, nick("bob", 2, true)).await,
        &[8, 11],
        false,
        4,
        "bob's latest two",
    );
    check_page(
        &page(store, a, nick("nobody", 10, false)).await,
        &[],
        true,
        0,
        "unknown nick",
    );
    let both = ArchiveQuery {
        fulltext: Some("even".into()),
        ..nick("bob", 10, false)
    };
    check_page(
        &page(store, a, both).await,
        &[2, 8],
        true,
        2,
        "bob's even messages",
    );
    let timed = ArchiveQuery {
        start: Some(ts(4)),
        end: Some(ts(9)),
        ..nick("carol", 10, false)
    };
    check_page(
        &page(store, a, timed).await,
        &[6, 9],
        true,
        2,
        "carol between 4 and 9",
    );
}

/// Full-text search: words ANDed, case-insensitive, whole words anywhere in the body, nothing
/// for absent words, never across rooms, combined with paging and other filters.
pub async fn archive_fulltext(store: &dyn Store) {
    let (a, b) = ("alpha@conference.localhost", "bravo@conference.localhost");
    put_rooms(store, &[a, b]).await;
    let bodies = [
        Some("The quick brown fox"),
        Some("jumps over the lazy dog"),
        Some("Quick thinking saves the DAY"),
        Some("nothing here"),
        None,
        Some("a fox in the snow, quickly"),
    ];
    let messages = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| message(a, "alice@localhost", "alice", None, *body, ts(i as i64 + 1)))
        .collect();
    append_all(store, messages, "bodies").await;
    append_all(
        store,
        vec![message(
            b,
            "bob@localhost",
            "bob",
            None,
            Some("another fox, quick"),
            ts(9),
        )],
        "other room",
    )
    .await;

    let search = |text: &str, limit, from_end| ArchiveQuery {
        fulltext: Some(text.into()),
        limit,
        from_end,
        ..ArchiveQuery::default()
    };
    let cases: &[(&str, &[i64])] = &[
        ("quick", &[1, 3]),
        ("QUICK", &[1, 3]),
        ("Quick", &[1, 3]),
        ("day", &[3]),
        ("fox", &[1, 6]),
        ("snow", &[6]),
        ("lazy", &[2]),
        ("quick fox", &[1]),
        ("fox quick", &[1]),
        ("  fox   snow  ", &[6]),
        ("the", &[1, 2, 3, 6]),
        ("elephant", &[]),
        ("quick elephant", &[]),
        ("qui", &[]),
    ];
    for (text, want) in cases {
        let p = page(store, a, search(text, 100, false)).await;
        check_page(
            &p,
            want,
            true,
            want.len() as u64,
            &format!("full-text {text:?}"),
        );
    }
    check_page(
        &page(store, b, search("fox", 100, false)).await,
        &[1],
        true,
        1,
        "full-text stays in its room",
    );
    check_page(
        &page(store, b, search("lazy", 100, false)).await,
        &[],
        true,
        0,
        "full-text never crosses rooms",
    );

    check_page(
        &page(store, a, search("the", 2, true)).await,
        &[3, 6],
        false,
        4,
        "full-text latest page",
    );
    check_page(
        &page(store, a, search("the", 2, false)).await,
        &[1, 2],
        false,
        4,
        "full-text first page",
    );
    let after = ArchiveQuery {
        after_seq: Some(2),
        ..search("the", 2, false)
    };
    check_page(
        &page(store, a, after).await,
        &[3, 6],
        true,
        4,
        "full-text next page",
    );
    let before = ArchiveQuery {
        before_seq: Some(3),
        ..search("the", 5, true)
    };
    check_page(
        &page(store, a, before).await,
        &[1, 2],
        true,
        4,
        "full-text previous page",
    );
    let timed = ArchiveQuery {
        start: Some(ts(2)),
        end: Some(ts(5)),
        ..search("the", 10, false)
    };
    check_page(
        &page(store, a, timed).await,
        &[2, 3],
        true,
        2,
        "full-text with time filters",
    );
}

/// `limit` is capped at [`ARCHIVE_PAGE_MAX`]; `limit` 0 gives an empty page with the count.
pub async fn archive_limits(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    let n = i64::from(ARCHIVE_PAGE_MAX) + 5;
    room_with(store, a, n).await;
    let total = n as u64;
    check_page(
        &page(store, a, query(u32::MAX)).await,
        &range(1, n - 5),
        false,
        total,
        "forward, limit above max",
    );
    let latest = ArchiveQuery {
        limit: ARCHIVE_PAGE_MAX + 1,
        from_end: true,
        ..ArchiveQuery::default()
    };
    check_page(
        &page(store, a, latest).await,
        &range(6, n),
        false,
        total,
        "backward, limit above max",
    );
    check_page(
        &page(store, a, query(ARCHIVE_PAGE_MAX)).await,
        &range(1, n - 5),
        false,
        total,
        "limit = max",
    );
    let p = page(store, a, query(0)).await;
    assert!(p.messages.is_empty(), "limit 0 returns no message");
    assert_eq!(
        p.count, total,
        "limit 0 still counts (RSM count-only query)"
    );
    assert!(
        !p.complete,
        "limit 0 on a non-empty archive is not complete"
    );
    let p = page(
        store,
        a,
        ArchiveQuery {
            limit: 0,
            from_end: true,
            ..ArchiveQuery::default()
        },
    )
    .await;
    assert!(
        p.messages.is_empty() && p.count == total,
        "limit 0 from the end"
    );
}

/// Any query on an unknown or empty room: an empty, complete page.
pub async fn archive_unknown_room(store: &dyn Store) {
    for query in [
        query(10),
        ArchiveQuery {
            from_end: true,
            ..query(10)
        },
        ArchiveQuery {
            fulltext: Some("x".into()),
            ..query(10)
        },
    ] {
        check_page(
            &page(store, "ghost@conference.localhost", query.clone()).await,
            &[],
            true,
            0,
            "unknown room",
        );
    }
    put_rooms(store, &["empty@conference.localhost"]).await;
    check_page(
        &page(store, "empty@conference.localhost", query(10)).await,
        &[],
        true,
        0,
        "empty room",
    );
}

/// `archive_get` returns exactly what was appended, with its seq; None for anything else.
pub async fn archive_get(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    put_rooms(store, &[a]).await;
    let m1 = message(
        a,
        "alice@localhost",
        "Alice W.",
        Some("o-1"),
        Some("first"),
        ts(1),
    );
    let m2 = message(a, "bob@localhost", "bob", None, None, ts(2));
    append_all(store, vec![m1.clone(), m2.clone()], "two messages").await;
    for (m, seq) in [(m1, 1), (m2, 2)] {
        let want = ArchivedMessage {
            room: m.room,
            seq,
            at: m.at,
            sender: m.sender,
            nick: m.nick,
            origin_id: m.origin_id,
            body: m.body,
            stanza: m.stanza,
        };
        assert_eq!(
            store.archive_get(a, seq).await.unwrap(),
            Some(want),
            "archive_get({seq})"
        );
    }
    for seq in [0, -1, 3, i64::MAX] {
        assert_eq!(
            store.archive_get(a, seq).await.unwrap(),
            None,
            "archive_get({seq}) of a missing seq"
        );
    }
    assert_eq!(
        store
            .archive_get("ghost@conference.localhost", 1)
            .await
            .unwrap(),
        None,
        "unknown room"
    );
}

/// `room_stats`: message count, last seq and the time of the newest message.
pub async fn room_stats(store: &dyn Store) {
    let (a, b) = ("alpha@conference.localhost", "bravo@conference.localhost");
    put_rooms(store, &[a, b]).await;
    assert_eq!(
        store.room_stats(a).await.unwrap(),
        RoomStats::default(),
        "an empty room"
    );
    assert_eq!(
        store
            .room_stats("ghost@conference.localhost")
            .await
            .unwrap(),
        RoomStats::default(),
        "unknown room"
    );
    append_all(
        store,
        vec![simple(a, 1), simple(b, 2), simple(a, 3), simple(a, 7)],
        "messages",
    )
    .await;
    assert_eq!(
        store.room_stats(a).await.unwrap(),
        RoomStats {
            messages: 3,
            last_seq: 3,
            last_at: Some(ts(7))
        }
    );
    assert_eq!(
        store.room_stats(b).await.unwrap(),
        RoomStats {
            messages: 1,
            last_seq: 1,
            last_at: Some(ts(2))
        }
    );
}

/// Id epochs ([`crate::ids`]): a fresh store is in epoch 0; a raise never lowers it and makes
/// every room's next id jump above the new epoch's base once — rooms that had messages,
/// rooms without, rooms created afterwards — and the room counts on from there. Ids stay
/// increasing, so the archive pages across the jump in order, a resend of a message from
/// before the raise is found under its old id, room statistics count the messages, not the
/// ids, and an import can number a message in a later epoch than the database's.
pub async fn id_epochs(store: &dyn Store) {
    use crate::ids::{epoch_base, EPOCH_MAX};
    let (a, b, c) = (
        "alpha@conference.localhost",
        "bravo@conference.localhost",
        "charlie@conference.localhost",
    );
    assert_eq!(store.id_epoch().await.unwrap(), 0, "a fresh store");
    put_rooms(store, &[a, b]).await;
    let early = message(
        a,
        "alice@localhost",
        "alice",
        Some("e-1"),
        Some("early"),
        ts(1),
    );
    append_all(
        store,
        vec![early.clone(), simple(a, 2), simple(a, 3)],
        "epoch 0",
    )
    .await;
    assert_eq!(store.raise_id_epoch(2).await.unwrap(), 2);
    assert_eq!(
        store.raise_id_epoch(1).await.unwrap(),
        2,
        "an epoch is never lowered"
    );
    assert_eq!(store.id_epoch().await.unwrap(), 2);
    let base = epoch_base(2);
    assert_eq!(
        append_all(store, vec![simple(a, 4), simple(a, 5)], "after the raise").await,
        vec![base + 1, base + 2],
        "a room's next id jumps above the new base, then counts on"
    );
    assert_eq!(
        append_all(store, vec![simple(b, 6)], "a room without messages").await,
        vec![base + 1]
    );
    put_rooms(store, &[c]).await;
    assert_eq!(
        append_all(store, vec![simple(c, 7)], "a room created after the raise").await,
        vec![base + 1]
    );
    let resent = commit_ok(store, vec![Write::AppendMessage(early)], "a resend").await;
    assert_eq!(
        resent,
        vec![WriteOutcome::Appended {
            seq: 1,
            duplicate: true
        }],
        "a message from before the raise is found under its old id"
    );
    check_page(
        &page(store, a, query(100)).await,
        &[1, 2, 3, base + 1, base + 2],
        true,
        5,
        "the archive across the jump",
    );
    check_page(
        &page(
            store,
            a,
            ArchiveQuery {
                after_seq: Some(3),
                ..query(1)
            },
        )
        .await,
        &[base + 1],
        false,
        5,
        "after the last id of epoch 0",
    );
    check_page(
        &page(
            store,
            a,
            ArchiveQuery {
                before_seq: Some(base + 1),
                from_end: true,
                ..query(2)
            },
        )
        .await,
        &[2, 3],
        false,
        5,
        "before the first id of epoch 2",
    );
    assert_eq!(
        store.room_stats(a).await.unwrap(),
        RoomStats {
            messages: 5,
            last_seq: base + 2,
            last_at: Some(ts(5))
        },
        "room statistics count messages across epochs"
    );
    // An import numbers a message in the epoch it had where it came from.
    let mut imported = simple(c, 8);
    imported.id_epoch = Some(5);
    assert_eq!(
        append_all(store, vec![imported, simple(c, 9)], "an imported jump").await,
        vec![epoch_base(5) + 1, epoch_base(5) + 2]
    );
    assert_eq!(
        store.id_epoch().await.unwrap(),
        2,
        "an import's epoch raises nothing"
    );
    assert!(
        matches!(
            store.raise_id_epoch(EPOCH_MAX + 1).await,
            Err(StoreError::Invalid(_))
        ),
        "an epoch whose ids do not fit every backend is refused"
    );
    assert_eq!(store.raise_id_epoch(EPOCH_MAX).await.unwrap(), EPOCH_MAX);
    assert_eq!(
        append_all(store, vec![simple(b, 10)], "the last epoch").await,
        vec![epoch_base(EPOCH_MAX) + 1]
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrency

/// Many tasks committing at once (group commit): all succeed, every room's sequence is gapless,
/// each task's messages keep its own order, resends are duplicates, compliance has one record
/// per message.
pub async fn concurrent_commits(store: Arc<dyn Store>) {
    const TASKS: usize = 50;
    const APPENDS: usize = 20;
    const ROOMS: usize = 5;
    let room = |i: usize| format!("room{}@conference.localhost", ["a", "b", "c", "d", "e"][i]);
    put_rooms(
        &*store,
        &(0..ROOMS)
            .map(room)
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let sender = format!("user{t}@localhost");
            let mut acked = Vec::new();
            for i in 0..APPENDS {
                let r = room((t + i) % ROOMS);
                let origin = format!("t{t}-m{i}");
                let m = message(
                    &r,
                    &sender,
                    &format!("user{t}"),
                    Some(&origin),
                    Some(&format!("task {t} message {i}")),
                    ts(i as i64),
                );
                // Every fifth commit also carries a compliance event, to mix batch shapes.
                let mut writes = vec![Write::AppendMessage(m)];
                if i % 5 == 0 {
                    writes.push(Write::Compliance(event(
                        ComplianceKind::Join,
                        &r,
                        &origin,
                        ts(i as i64),
                    )));
                }
                let outcomes = store
                    .commit(writes)
                    .await
                    .unwrap_or_else(|e| panic!("task {t} commit {i}: {e}"));
                match outcomes[0] {
                    WriteOutcome::Appended {
                        seq,
                        duplicate: false,
                    } => acked.push((r, origin, seq)),
                    ref other => panic!("task {t} commit {i}: unexpected {other:?}"),
                }
            }
            // A resend of the first message, as after a client timeout.
            let (r, origin, seq) = acked[0].clone();
            let resend = message(&r, &sender, "again", Some(&origin), Some("resent"), ts(99));
            let outcomes = store
                .commit(vec![Write::AppendMessage(resend)])
                .await
                .expect("resend");
            assert_eq!(
                outcomes,
                vec![WriteOutcome::Appended {
                    seq,
                    duplicate: true
                }],
                "task {t}: resend"
            );
            acked
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("a committing task panicked"));
    }
    assert_eq!(acked.len(), TASKS * APPENDS);

    let mut by_origin = HashMap::new();
    let mut by_body = HashMap::new();
    for r in 0..ROOMS {
        let r = room(r);
        let p = page(&*store, &r, query(ARCHIVE_PAGE_MAX)).await;
        let n = (TASKS * APPENDS / ROOMS) as i64;
        check_page(
            &p,
            &range(1, n),
            true,
            n as u64,
            &format!("{r} after concurrent commits"),
        );
        let mut last_seen: BTreeMap<String, usize> = BTreeMap::new();
        for m in p.messages {
            let origin = m.origin_id.clone().expect("origin-id kept");
            let (t, i) = origin
                .trim_start_matches('t')
                .split_once("-m")
                .expect("origin format");
            let i: usize = i.parse().unwrap();
            if let Some(prev) = last_seen.insert(t.to_string(), i) {
                assert!(
                    prev < i,
                    "{r}: task {t}'s messages out of order ({prev} then {i})"
                );
            }
            by_origin.insert((r.clone(), origin), m.seq);
            by_body.insert(m.body.clone().unwrap_or_default(), (r.clone(), m.seq));
        }
    }
    for (r, origin, seq) in &acked {
        assert_eq!(
            by_origin.get(&(r.clone(), origin.clone())),
            Some(seq),
            "the acknowledged seq of {origin} is in the archive"
        );
    }
    let records = all_compliance(&*store).await;
    let messages: Vec<_> = records
        .iter()
        .filter(|r| r.event.kind == ComplianceKind::Message)
        .collect();
    assert_eq!(
        messages.len(),
        TASKS * APPENDS,
        "one compliance record per message, none for resends"
    );
    assert!(
        records.iter().all(|r| r.committed),
        "every record committed"
    );
    assert!(
        records.windows(2).all(|w| w[0].id < w[1].id),
        "compliance ids increase"
    );
    for record in messages {
        // Bodies are unique ("task T message I"), and the store puts the body in `detail`.
        assert_eq!(
            by_body.get(&record.event.detail),
            Some(&(record.event.room.clone(), record.message_seq.unwrap_or(-1))),
            "a message's compliance record carries its room and archive seq: {record:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile text

/// Quotes, unicode, `%`, `_`, and FTS operators round-trip in bodies and are plain words in
/// full-text queries: no query text ever makes the store fail.
pub async fn special_characters(store: &dyn Store) {
    let a = "alpha@conference.localhost";
    put_rooms(store, &[a]).await;
    let bodies = [
        "it's \"quoted\" and 'single'",
        "100% sure_thing under_score",
        "AND OR NOT NEAR(alpha beta) star* ^caret col:umn -minus +plus {braces} [brackets]",
        "naïve café Ünïcödé 日本語 emoji 🎉 ZWJ 👩‍💻",
        "backslash \\ and semicolon; DROP TABLE message; --",
        "<xml attr='1'>&amp;</xml>",
    ];
    let messages = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            message(
                a,
                "o'neil@localhost",
                "O'Neil \"the\" 🎉",
                Some(&format!("o'\"%_{i}")),
                Some(body),
                ts(i as i64),
            )
        })
        .collect();
    append_all(store, messages, "hostile bodies").await;
    for (i, body) in bodies.iter().enumerate() {
        let m = store
            .archive_get(a, i as i64 + 1)
            .await
            .unwrap()
            .expect("message");
        assert_eq!(
            m.body.as_deref(),
            Some(*body),
            "bodies round-trip byte for byte"
        );
        assert_eq!(m.nick, "O'Neil \"the\" 🎉");
        assert_eq!(m.origin_id, Some(format!("o'\"%_{i}")));
    }
    let nick = ArchiveQuery {
        with_nick: Some("O'Neil \"the\" 🎉".into()),
        ..query(100)
    };
    assert_eq!(
        page(store, a, nick).await.count,
        6,
        "nick filter with quotes"
    );

    let queries = [
        "%",
        "_",
        "%%",
        "'",
        "\"",
        "\"\"",
        "\"unclosed",
        "*",
        "star*",
        "AND",
        "OR",
        "NOT",
        "a AND",
        "AND b",
        "NEAR(",
        "NEAR(alpha beta)",
        "NEAR(alpha, 2)",
        "col:umn",
        "^caret",
        "-minus",
        "+plus",
        "(",
        ")",
        "{braces}",
        "[",
        "\\",
        ";",
        "--",
        "' OR '1'='1",
        "\u{0}",
        "🎉",
        "日本語",
        "",
        "   ",
        "a\"b",
    ];
    for q in queries {
        let query = ArchiveQuery {
            fulltext: Some(q.into()),
            ..query(100)
        };
        if let Err(e) = store.archive_page(a, &query).await {
            panic!("full-text query {q:?} must not fail: {e}");
        }
        let backward = ArchiveQuery {
            from_end: true,
            ..query
        };
        if let Err(e) = store.archive_page(a, &backward).await {
            panic!("full-text query {q:?} (from end) must not fail: {e}");
        }
    }
    let search = |q: &str| ArchiveQuery {
        fulltext: Some(q.into()),
        ..query(100)
    };
    let expect: &[(&str, &[i64])] = &[
        ("quoted", &[1]),
        ("\"quoted\"", &[1]),
        ("sure", &[2]),
        ("100%", &[2]),
        ("café", &[4]),
        ("AND", &[1, 3, 5]),
        ("NEAR(alpha", &[3]),
        ("star*", &[3]),
        ("table", &[5]),
        ("%", &[]),
        ("", &[]),
    ];
    for (q, want) in expect {
        let p = page(store, a, search(q)).await;
        check_page(
            &p,
            want,
            true,
            want.len() as u64,
            &format!("full-text {q:?} as plain words"),
        );
    }
}

/// A batch carrying a character XML forbids (NUL, which PostgreSQL text cannot hold, another
/// control character, U+FFFE/U+FFFF), in any text it would store, fails alone with `Invalid`:
/// the batches committed with it in the same group (other rooms', and the same room's) are
/// stored with gapless numbers, and nothing of the bad one is (no message, no compliance
/// record, no room change).
pub async fn forbidden_text_fails_only_its_batch(store: &dyn Store) {
    let (a, b) = ("alpha@conference.localhost", "bravo@conference.localhost");
    put_rooms(store, &[a, b]).await;
    let compliance_before = all_compliance(store).await.len();
    let good = |room: &str, n: i64| {
        vec![
            Write::AppendMessage(simple(room, n)),
            Write::Compliance(event(ComplianceKind::Join, room, "fine", ts(n))),
        ]
    };
    let with = |f: &dyn Fn(&mut NewMessage)| {
        let mut m = simple(a, 50);
        f(&mut m);
        vec![Write::AppendMessage(m)]
    };
    let mut subject_record = room_record(b);
    subject_record.subject = Some(pchat_room::Subject {
        text: "nul \u{0} subject".into(),
        nick: "alice".into(),
        at: ts(1),
    });
    let mut name_record = room_record(a);
    name_record.config.name = "bell \u{7}".into();
    let bad: Vec<(&str, Vec<Write>)> = vec![
        (
            "NUL in a body",
            with(&|m| m.body = Some("a \u{0} b".into())),
        ),
        (
            "U+0001 in a stanza",
            with(&|m| m.stanza = "<message><body>\u{1}</body></message>".into()),
        ),
        ("U+FFFE in a nick", with(&|m| m.nick = "x\u{fffe}".into())),
        (
            "U+FFFF in an origin-id",
            with(&|m| m.origin_id = Some("o\u{ffff}".into())),
        ),
        (
            "NUL in a sender",
            with(&|m| m.sender = "a\u{0}@localhost".into()),
        ),
        (
            "ESC in a compliance detail, beside a good append",
            vec![
                Write::AppendMessage(simple(b, 51)),
                Write::Compliance(event(ComplianceKind::Join, b, "esc \u{1b}", ts(51))),
            ],
        ),
        (
            "NUL in a room subject",
            vec![Write::PutRoom(subject_record)],
        ),
        ("BEL in a room name", vec![Write::PutRoom(name_record)]),
    ];
    // Good and bad batches interleaved and submitted at once, so that the writer takes them
    // in one group where it can.
    let mut batches: Vec<(Option<&str>, Vec<Write>)> = Vec::new();
    let mut good_count = 0;
    for (i, (what, writes)) in bad.into_iter().enumerate() {
        let room = if i % 2 == 0 { a } else { b };
        batches.push((None, good(room, i as i64)));
        good_count += 1;
        batches.push((Some(what), writes));
    }
    batches.push((None, good(a, 99)));
    good_count += 1;
    let results = futures_join_all(batches.iter().map(|(_, w)| store.commit(w.clone()))).await;
    for ((what, _), result) in batches.iter().zip(&results) {
        match (what, result) {
            (None, Ok(_)) => {}
            (None, Err(e)) => panic!("a good batch failed beside bad ones: {e}"),
            (Some(_), Err(StoreError::Invalid(_))) => {}
            (Some(what), other) => panic!("{what}: expected Invalid, got {other:?}"),
        }
    }

    let mut stored = 0;
    for room in [a, b] {
        let p = page(store, room, query(100)).await;
        let n = p.messages.len() as i64;
        check_page(
            &p,
            &range(1, n),
            true,
            n as u64,
            &format!("{room} after the group"),
        );
        for m in &p.messages {
            assert!(
                m.body
                    .as_deref()
                    .is_some_and(|b| b.starts_with("message number")),
                "only good messages are stored: {m:?}"
            );
            assert!(!m.stanza.contains('\u{1}') && m.nick == "alice");
        }
        stored += n;
        let record = store.room_get(room).await.unwrap().expect("room kept");
        assert_eq!(record, room_record(room), "{room}: its record is unchanged");
    }
    assert_eq!(stored, good_count, "every good batch's message is stored");
    let records = all_compliance(store).await;
    assert_eq!(
        records.len() - compliance_before,
        2 * good_count as usize,
        "a message and a join record per good batch, none from a bad one"
    );
    for r in &records {
        assert!(
            r.event
                .detail
                .chars()
                .all(|c| c >= ' ' || c == '\n' || c == '\t'),
            "{r:?}"
        );
    }
    // The store goes on.
    assert_eq!(
        append_all(store, vec![simple(a, 100)], "after the refusals")
            .await
            .len(),
        1
    );
}

/// The directory: the default until saved, compare-and-set on its revision, an invalid one
/// refused, and the room record's category and disabled flag round-trip.
pub async fn directory(store: &dyn Store) {
    use pchat_room::directory::{Category, Directory, Group, Principal, DEFAULT_CATEGORY};
    let first = store.directory_get().await.unwrap();
    assert_eq!(first.revision, 0, "nothing saved yet");
    assert_eq!(first.directory, Directory::default());
    assert_eq!(store.directory_revision().await.unwrap(), 0);

    let mut d = Directory::default();
    d.groups.insert(
        "traders".into(),
        Group {
            description: "desk «1»".into(),
            members: [Principal::parse("ann@localhost").unwrap()].into(),
        },
    );
    d.categories.insert(
        "trading".into(),
        Category {
            allowed: [Principal::parse("group:traders").unwrap()].into(),
            chat_history: false,
            ..Category::default()
        },
    );
    assert_eq!(store.directory_put(&d, 0).await.unwrap(), 1);
    let got = store.directory_get().await.unwrap();
    assert_eq!((got.revision, &got.directory), (1, &d));
    assert_eq!(store.directory_revision().await.unwrap(), 1);

    // A save from a stale read changes nothing.
    let mut stale = d.clone();
    stale.groups.clear();
    stale.categories.remove("trading");
    match store.directory_put(&stale, 0).await {
        Err(StoreError::Conflict(m)) => assert!(m.contains("revision 1"), "{m}"),
        other => panic!("a stale save must conflict: {other:?}"),
    }
    assert_eq!(store.directory_get().await.unwrap().directory, d);

    // An invalid directory (a category naming a group that does not exist) is refused.
    let mut bad = d.clone();
    bad.categories
        .get_mut("trading")
        .unwrap()
        .denied
        .insert(Principal::parse("group:nosuch").unwrap());
    assert!(matches!(
        store.directory_put(&bad, 1).await,
        Err(StoreError::Invalid(_))
    ));
    let mut no_default = d.clone();
    no_default.categories.remove(DEFAULT_CATEGORY);
    assert!(matches!(
        store.directory_put(&no_default, 1).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(store.directory_put(&stale, 1).await.unwrap(), 2);
    assert_eq!(store.directory_get().await.unwrap().directory, stale);

    // A room record carries its category and disabled flag.
    let mut r = room_record("walled@conference.localhost");
    r.category = "trading".into();
    r.disabled = true;
    store.commit(vec![Write::PutRoom(r.clone())]).await.unwrap();
    assert_eq!(store.room_get(&r.jid).await.unwrap(), Some(r));
}

/// Content control: a removed message keeps its id, time and sender with the new stanza and
/// body, search forgets its old words; a missing one removes nothing; clearing history deletes
/// what is older than the date and never lets an id be handed out again.
pub async fn content_control(store: &dyn Store) {
    let room = "control@conference.localhost";
    store
        .commit(vec![Write::PutRoom(room_record(room))])
        .await
        .unwrap();
    for (n, body) in [(1, "alpha bravo"), (2, "charlie"), (3, "delta")] {
        let m = message(room, "ann@localhost", "ann", None, Some(body), ts(n));
        store.commit(vec![Write::AppendMessage(m)]).await.unwrap();
    }
    let tomb = format!("<message type='groupchat' from='{room}/ann'><retracted/></message>");
    let out = store
        .commit(vec![
            Write::RemoveMessage {
                room: room.into(),
                seq: 2,
                stanza: tomb.clone(),
                body: None,
            },
            Write::RemoveMessage {
                room: room.into(),
                seq: 99,
                stanza: tomb.clone(),
                body: None,
            },
            Write::RemoveMessage {
                room: room.into(),
                seq: 1,
                stanza: "<message><body>[removed by an administrator]</body></message>".into(),
                body: Some("[removed by an administrator]".into()),
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            WriteOutcome::Removed { messages: 1 },
            WriteOutcome::Removed { messages: 0 },
            WriteOutcome::Removed { messages: 1 },
        ]
    );
    let two = store.archive_get(room, 2).await.unwrap().unwrap();
    assert_eq!(
        (two.stanza.as_str(), two.body.as_deref()),
        (tomb.as_str(), None)
    );
    assert_eq!(
        (two.nick.as_str(), two.at),
        ("ann", ts(2)),
        "id, time and sender stay"
    );
    let search = |words: &str| ArchiveQuery {
        fulltext: Some(words.into()),
        limit: 10,
        ..ArchiveQuery::default()
    };
    for gone in ["charlie", "alpha"] {
        let page = store.archive_page(room, &search(gone)).await.unwrap();
        assert!(page.messages.is_empty(), "{gone} is still found");
    }
    let page = store
        .archive_page(room, &search("administrator"))
        .await
        .unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1]);

    // Clear what is older than message 3; then everything; the next id is still 4.
    let out = store
        .commit(vec![Write::ClearHistory {
            room: room.into(),
            before: ts(3),
        }])
        .await
        .unwrap();
    assert_eq!(out, vec![WriteOutcome::Removed { messages: 2 }]);
    let all = ArchiveQuery {
        limit: 10,
        ..ArchiveQuery::default()
    };
    let left = store.archive_page(room, &all).await.unwrap();
    assert_eq!(left.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [3]);
    let out = store
        .commit(vec![Write::ClearHistory {
            room: room.into(),
            before: ts(1000),
        }])
        .await
        .unwrap();
    assert_eq!(out, vec![WriteOutcome::Removed { messages: 1 }]);
    assert!(store
        .archive_page(room, &all)
        .await
        .unwrap()
        .messages
        .is_empty());
    assert!(store
        .archive_page(room, &search("delta"))
        .await
        .unwrap()
        .messages
        .is_empty());
    let m = message(room, "ann@localhost", "ann", None, Some("after"), ts(5));
    let out = store.commit(vec![Write::AppendMessage(m)]).await.unwrap();
    assert_eq!(
        out,
        vec![WriteOutcome::Appended {
            seq: 4,
            duplicate: false
        }],
        "an id is never handed out twice"
    );
}

/// Sessions of the room management page: kept by id, touched forward only, at most
/// [`crate::WEB_SESSIONS_PER_USER_MAX`] per user (a new login ends the oldest), removed by
/// logout, purged by age.
pub async fn web_sessions(store: &dyn Store) {
    use crate::{WebSession, WEB_SESSIONS_PER_USER_MAX};
    let session = |user: &str, created: i64| WebSession {
        user: user.to_owned(),
        created_at: Timestamp(created),
        seen_at: Timestamp(created),
    };
    assert_eq!(store.web_session_get("nope").await.unwrap(), None);
    store
        .web_session_put("a1", &session("ann@localhost", 100))
        .await
        .unwrap();
    // A retried write leaves the session as it was.
    store
        .web_session_put("a1", &session("ann@localhost", 999))
        .await
        .unwrap();
    assert_eq!(
        store.web_session_get("a1").await.unwrap(),
        Some(session("ann@localhost", 100))
    );
    store.web_session_touch("a1", Timestamp(500)).await.unwrap();
    store.web_session_touch("a1", Timestamp(300)).await.unwrap();
    let got = store.web_session_get("a1").await.unwrap().unwrap();
    assert_eq!(
        (got.created_at, got.seen_at),
        (Timestamp(100), Timestamp(500))
    );
    // The oldest of a user's sessions go beyond the limit; other users' stay.
    store
        .web_session_put("b1", &session("ben@localhost", 150))
        .await
        .unwrap();
    for i in 0..WEB_SESSIONS_PER_USER_MAX {
        store
            .web_session_put(
                &format!("a-{i}"),
                &session("ann@localhost", 200 + i64::from(i)),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        store.web_session_get("a1").await.unwrap(),
        None,
        "the oldest went"
    );
    assert!(store.web_session_get("a-0").await.unwrap().is_some());
    assert!(store.web_session_get("b1").await.unwrap().is_some());
    assert!(store.web_session_remove("b1").await.unwrap());
    assert!(!store.web_session_remove("b1").await.unwrap());
    assert_eq!(store.web_session_get("b1").await.unwrap(), None);
    // Purged: last used before 205, or made before 0 (none).
    let purged = store
        .web_session_purge(Timestamp(205), Timestamp(0))
        .await
        .unwrap();
    assert_eq!(purged, 5);
    assert_eq!(store.web_session_get("a-4").await.unwrap(), None);
    assert!(store.web_session_get("a-5").await.unwrap().is_some());
    let purged = store
        .web_session_purge(Timestamp(0), Timestamp(210))
        .await
        .unwrap();
    assert_eq!(purged, 5, "made before 210");
    assert!(store.web_session_get("a-10").await.unwrap().is_some());
}

/// `pchat data export|import` carries users' PEP nodes (bookmarks, vCards, private XML):
/// each node's access model, item limit, and items with their ids, payloads, times and
/// order. Exported, the nodes deleted, imported back: all as before; imported again:
/// nothing changes. An item in the wrong node, or a node not after its user, is refused.
pub async fn portable_pep(store: &dyn Store) {
    use crate::portable;
    use crate::{PepAccess, PepItem, PepNode};
    const BM: &str = "urn:xmpp:bookmarks:1";
    const VCARD: &str = "jabber:iq:private#vcard-temp#vCard";
    let item = |id: &str, payload: &str, at: i64| PepItem {
        id: id.to_owned(),
        payload: payload.to_owned(),
        at: Timestamp(at),
    };
    store.user_put(user("dan@localhost", 4)).await.unwrap();
    store.user_put(user("eve@localhost", 5)).await.unwrap();
    let bookmarks = PepNode {
        access: PepAccess::Owner,
        max_items: crate::PEP_ITEMS_MAX,
    };
    let open = PepNode {
        access: PepAccess::Users,
        max_items: 1,
    };
    // Published out of id order, one replaced: the order is publication's, not the ids'.
    let b = "<conference xmlns='urn:xmpp:bookmarks:1' name='B &amp; \u{e9}'/>";
    for (id, at) in [
        ("b@conf", 20),
        ("a@conf", 21),
        ("c@conf", 22),
        ("b@conf", 23),
    ] {
        store
            .pep_publish("dan@localhost", BM, bookmarks, item(id, b, at))
            .await
            .unwrap();
    }
    let card = "<vCard xmlns='vcard-temp'><FN>Dan \u{1f600}</FN></vCard>";
    store
        .pep_publish("dan@localhost", VCARD, open, item("current", card, 30))
        .await
        .unwrap();
    let snapshot = || async {
        let mut all = Vec::new();
        for owner in ["dan@localhost", "eve@localhost"] {
            for node in store.pep_nodes(owner).await.unwrap() {
                let config = store.pep_node(owner, &node).await.unwrap();
                let items = store.pep_items(owner, &node).await.unwrap();
                all.push((owner, node, config, items));
            }
        }
        all
    };
    let before = snapshot().await;
    assert_eq!(before.len(), 2);

    let mut file = Vec::new();
    portable::export(store, &mut file, &mut |_, _| {})
        .await
        .unwrap();
    let totals = portable::verify(&file[..]).unwrap();
    assert_eq!((totals.pep_nodes, totals.pep_items), (2, 4));
    assert!(store.pep_delete("dan@localhost", BM).await.unwrap());
    assert!(store.pep_delete("dan@localhost", VCARD).await.unwrap());
    let done = portable::import(store, &file[..], totals.messages, &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!((done.pep_nodes, done.pep_items), (2, 4));
    assert_eq!(
        snapshot().await,
        before,
        "nodes, items, times and order back"
    );
    portable::import(store, &file[..], totals.messages, &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(snapshot().await, before, "a second import changes nothing");

    let text = String::from_utf8(file).unwrap();
    // An item moved to another user's node: refused before anything is written.
    let moved = text.replacen(
        "\"pep_item\":{\"owner\":\"dan@localhost\"",
        "\"pep_item\":{\"owner\":\"eve@localhost\"",
        1,
    );
    assert_ne!(moved, text);
    match portable::verify(moved.as_bytes()) {
        Err(portable::PortableError::Invalid(m)) => {
            assert!(m.contains("does not follow its node"), "{m}")
        }
        other => panic!("an item in the wrong node: {other:?}"),
    }
    let foreign = text.replacen(
        "\"pep_node\":{\"owner\":\"dan@localhost\"",
        "\"pep_node\":{\"owner\":\"eve@localhost\"",
        1,
    );
    assert!(portable::verify(foreign.as_bytes()).is_err());
}

/// PEP nodes of a user's account (XEP-0163; bookmarks are XEP-0402's node): created by the
/// first publication, items replaced by id and kept in publication order up to the node's
/// `max_items`, the configuration replaced by a publication with another one, per owner,
/// and gone with the user.
pub async fn pep(store: &dyn Store) {
    use crate::{PepAccess, PepItem, PepNode};
    const BM: &str = "urn:xmpp:bookmarks:1";
    let owner_only = PepNode {
        access: PepAccess::Owner,
        max_items: crate::PEP_ITEMS_MAX,
    };
    let item = |id: &str, payload: &str, at: i64| PepItem {
        id: id.to_owned(),
        payload: payload.to_owned(),
        at: Timestamp(at),
    };
    let ids = |items: Vec<PepItem>| items.into_iter().map(|i| i.id).collect::<Vec<_>>();
    store.user_put(user("cat@localhost", 3)).await.unwrap();
    assert_eq!(store.pep_node("cat@localhost", BM).await.unwrap(), None);
    assert!(store
        .pep_items("cat@localhost", BM)
        .await
        .unwrap()
        .is_empty());
    assert!(store.pep_nodes("cat@localhost").await.unwrap().is_empty());
    assert!(!store.pep_retract("cat@localhost", BM, "x").await.unwrap());
    assert!(!store.pep_delete("cat@localhost", BM).await.unwrap());

    let a = "<conference xmlns='urn:xmpp:bookmarks:1' autojoin='true' name='A &amp; \u{e9}'/>";
    store
        .pep_publish("cat@localhost", BM, owner_only, item("a@conf", a, 10))
        .await
        .unwrap();
    assert_eq!(
        store.pep_node("cat@localhost", BM).await.unwrap(),
        Some(owner_only)
    );
    let items = store.pep_items("cat@localhost", BM).await.unwrap();
    assert_eq!(items, [item("a@conf", a, 10)], "payload kept byte for byte");
    store
        .pep_publish("cat@localhost", BM, owner_only, item("b@conf", "<b/>", 11))
        .await
        .unwrap();
    // Publishing an id again replaces the item, which becomes the newest.
    store
        .pep_publish("cat@localhost", BM, owner_only, item("a@conf", "<a2/>", 12))
        .await
        .unwrap();
    let items = store.pep_items("cat@localhost", BM).await.unwrap();
    assert_eq!(
        items,
        [item("b@conf", "<b/>", 11), item("a@conf", "<a2/>", 12)]
    );

    // max_items: the oldest go.
    let two = PepNode {
        access: PepAccess::Users,
        max_items: 2,
    };
    for (i, id) in ["x", "y", "z"].iter().enumerate() {
        store
            .pep_publish("cat@localhost", "n", two, item(id, "<p/>", 20 + i as i64))
            .await
            .unwrap();
    }
    assert_eq!(
        ids(store.pep_items("cat@localhost", "n").await.unwrap()),
        ["y", "z"]
    );
    // Another configuration replaces the node's.
    let three = PepNode {
        access: PepAccess::Owner,
        max_items: 3,
    };
    store
        .pep_publish("cat@localhost", "n", three, item("w", "<p/>", 30))
        .await
        .unwrap();
    assert_eq!(
        store.pep_node("cat@localhost", "n").await.unwrap(),
        Some(three)
    );
    assert_eq!(
        ids(store.pep_items("cat@localhost", "n").await.unwrap()),
        ["y", "z", "w"]
    );
    assert_eq!(
        store.pep_nodes("cat@localhost").await.unwrap(),
        ["n", BM],
        "sorted"
    );
    // Another owner's nodes are apart.
    assert!(store.pep_nodes("dog@localhost").await.unwrap().is_empty());
    assert_eq!(store.pep_node("dog@localhost", BM).await.unwrap(), None);

    assert!(store.pep_retract("cat@localhost", "n", "z").await.unwrap());
    assert!(!store.pep_retract("cat@localhost", "n", "z").await.unwrap());
    assert_eq!(
        ids(store.pep_items("cat@localhost", "n").await.unwrap()),
        ["y", "w"]
    );
    assert!(store.pep_delete("cat@localhost", "n").await.unwrap());
    assert!(store
        .pep_items("cat@localhost", "n")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.pep_node("cat@localhost", "n").await.unwrap(), None);
    assert_eq!(store.pep_nodes("cat@localhost").await.unwrap(), [BM]);

    // A removed user's nodes go with the account.
    assert!(store.user_remove("cat@localhost").await.unwrap());
    assert!(store.pep_nodes("cat@localhost").await.unwrap().is_empty());
    assert!(store
        .pep_items("cat@localhost", BM)
        .await
        .unwrap()
        .is_empty());
}

/// Invitations kept for a user's next login: taken once, oldest first, at most
/// [`crate::INVITATIONS_KEPT_MAX`] per user.
pub async fn invitations(store: &dyn Store) {
    assert!(store
        .invitations_take("cat@localhost")
        .await
        .unwrap()
        .is_empty());
    store
        .invitation_keep("cat@localhost", "<message n='1'/>")
        .await
        .unwrap();
    store
        .invitation_keep("dog@localhost", "<message n='x'/>")
        .await
        .unwrap();
    store
        .invitation_keep("cat@localhost", "<message n='2'/>")
        .await
        .unwrap();
    assert_eq!(
        store.invitations_take("cat@localhost").await.unwrap(),
        ["<message n='1'/>", "<message n='2'/>"]
    );
    assert!(
        store
            .invitations_take("cat@localhost")
            .await
            .unwrap()
            .is_empty(),
        "taken once"
    );
    assert_eq!(
        store.invitations_take("dog@localhost").await.unwrap().len(),
        1
    );
    for i in 0..crate::INVITATIONS_KEPT_MAX + 5 {
        store
            .invitation_keep("eel@localhost", &format!("<message n='{i}'/>"))
            .await
            .unwrap();
    }
    let kept = store.invitations_take("eel@localhost").await.unwrap();
    assert_eq!(kept.len() as i64, crate::INVITATIONS_KEPT_MAX);
    assert_eq!(kept[0], "<message n='5'/>", "the oldest went");
}

// ---------------------------------------------------------------------------------------------
// Files (XEP-0363 uploads)

/// The `n`th test file's id: 32 lowercase hex digits, as the server makes them.
fn file_id(n: u32) -> String {
    format!("{n:032x}")
}

/// An upload slot of `size` bytes given at `created` and open until `expires`.
fn file_slot(n: u32, owner: &str, size: u64, created: Timestamp, expires: Timestamp) -> FileRecord {
    FileRecord {
        id: file_id(n),
        owner: owner.to_string(),
        room: None,
        name: format!("picture {n}.png"),
        content_type: "image/png".into(),
        size,
        created_at: created,
        expires_at: expires,
        sha256: None,
    }
}

/// Hex SHA-256 of `bytes`, as the upload service records it.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn create_ok(store: &dyn Store, file: &FileRecord, quota: u64) {
    match store.file_create(file, quota).await {
        Ok(FileCreated::Created) => {}
        other => panic!("creating file {} ({} bytes): {other:?}", file.id, file.size),
    }
}

/// Stores `content` in pieces of [`FILE_CHUNK_BYTES`] and finishes the file.
async fn upload(store: &dyn Store, id: &str, content: &[u8]) {
    for (index, piece) in content.chunks(FILE_CHUNK_BYTES).enumerate() {
        store
            .file_chunk_put(id, index as u32, piece.to_vec())
            .await
            .unwrap_or_else(|e| panic!("file {id}, piece {index}: {e}"));
    }
    store
        .file_finish(id, &sha256_hex(content))
        .await
        .unwrap_or_else(|e| panic!("finishing file {id}: {e}"));
}

/// Every piece of a file, joined.
async fn download(store: &dyn Store, id: &str) -> Vec<u8> {
    let mut content = Vec::new();
    for index in 0.. {
        match store.file_chunk_get(id, index).await.unwrap() {
            Some(piece) => {
                assert!(piece.len() <= FILE_CHUNK_BYTES, "piece {index} too big");
                content.extend(piece);
            }
            None => break,
        }
    }
    content
}

fn is_invalid<T>(result: StoreResult<T>) -> bool {
    matches!(result, Err(StoreError::Invalid(_)))
}

/// Files: slots and the owner's quota, pieces, finishing, binding to a room, listing,
/// removing, purging expired slots, and the files a room's deletion or clearing takes.
pub async fn files(store: &dyn Store) {
    const QUOTA: u64 = 100;
    let (alice, bob) = ("alice@localhost", "bob@localhost");
    let room = "files@conference.localhost";

    // A slot, read back as created.
    let f1 = file_slot(1, alice, 10, ts(0), ts(100));
    create_ok(store, &f1, QUOTA).await;
    assert_eq!(store.file_get(&f1.id).await.unwrap(), Some(f1.clone()));
    assert_eq!(store.file_get(&file_id(999)).await.unwrap(), None);
    assert!(
        matches!(
            store.file_create(&f1, QUOTA).await,
            Err(StoreError::Conflict(_))
        ),
        "an id is never given twice"
    );

    // Refused before anything is written: a hash, a room, an empty or NUL text.
    let refused = [
        FileRecord {
            sha256: Some(sha256_hex(b"")),
            ..file_slot(2, alice, 1, ts(0), ts(100))
        },
        FileRecord {
            room: Some(room.into()),
            ..file_slot(2, alice, 1, ts(0), ts(100))
        },
        FileRecord {
            name: String::new(),
            ..file_slot(2, alice, 1, ts(0), ts(100))
        },
        FileRecord {
            content_type: String::new(),
            ..file_slot(2, alice, 1, ts(0), ts(100))
        },
        file_slot(2, "", 1, ts(0), ts(100)),
        FileRecord {
            id: String::new(),
            ..file_slot(2, alice, 1, ts(0), ts(100))
        },
        FileRecord {
            name: "a\0b".into(),
            ..file_slot(2, alice, 1, ts(0), ts(100))
        },
    ];
    for file in &refused {
        assert!(
            is_invalid(store.file_create(file, QUOTA).await),
            "refused: {file:?}"
        );
    }
    assert_eq!(store.file_get(&file_id(2)).await.unwrap(), None);

    // Pieces: unknown file, too big, more than the declared size (replacing a piece counts
    // only the new one).
    assert!(is_invalid(
        store.file_chunk_put(&file_id(999), 0, vec![1]).await
    ));
    assert!(is_invalid(
        store
            .file_chunk_put(&f1.id, 0, vec![0; FILE_CHUNK_BYTES + 1])
            .await
    ));
    assert!(is_invalid(
        store.file_chunk_put(&f1.id, 0, vec![0; 11]).await
    ));
    store.file_chunk_put(&f1.id, 0, vec![1; 6]).await.unwrap();
    assert!(
        is_invalid(store.file_chunk_put(&f1.id, 1, vec![2; 5]).await),
        "6 + 5 bytes overflow a 10-byte file"
    );
    store.file_chunk_put(&f1.id, 1, vec![2; 4]).await.unwrap();
    store
        .file_chunk_put(&f1.id, 0, vec![3; 6])
        .await
        .expect("a piece written again replaces it");
    assert!(
        is_invalid(store.file_chunk_put(&f1.id, 0, vec![3; 7]).await),
        "7 + 4 bytes overflow, whatever piece 0 held"
    );
    assert_eq!(
        store.file_chunk_get(&f1.id, 0).await.unwrap(),
        Some(vec![3; 6])
    );
    assert_eq!(
        store.file_chunk_get(&f1.id, 1).await.unwrap(),
        Some(vec![2; 4])
    );
    assert_eq!(store.file_chunk_get(&f1.id, 2).await.unwrap(), None);
    assert_eq!(store.file_chunk_get(&file_id(999), 0).await.unwrap(), None);
    assert_eq!(store.file_get(&f1.id).await.unwrap().unwrap().sha256, None);

    // Finishing: only with pieces 0..n holding exactly the size; then idempotent.
    let content = [vec![3u8; 6], vec![2u8; 4]].concat();
    let hash = sha256_hex(&content);
    assert!(is_invalid(store.file_finish(&file_id(999), &hash).await));
    assert!(
        is_invalid(store.file_finish(&f1.id, "not a hash").await),
        "a hash is 64 hex digits"
    );
    let short = file_slot(3, alice, 10, ts(0), ts(100));
    create_ok(store, &short, QUOTA).await;
    store
        .file_chunk_put(&short.id, 0, vec![7; 9])
        .await
        .unwrap();
    assert!(
        is_invalid(store.file_finish(&short.id, &hash).await),
        "9 bytes of 10"
    );
    let gap = file_slot(4, alice, 4, ts(0), ts(100));
    create_ok(store, &gap, QUOTA).await;
    store.file_chunk_put(&gap.id, 1, vec![7; 4]).await.unwrap();
    assert!(
        is_invalid(store.file_finish(&gap.id, &hash).await),
        "the size is right but piece 0 is missing"
    );
    assert_eq!(store.file_get(&gap.id).await.unwrap().unwrap().sha256, None);
    store.file_finish(&f1.id, &hash).await.unwrap();
    store
        .file_finish(&f1.id, &hash)
        .await
        .expect("finishing again with the same hash");
    assert!(
        matches!(
            store.file_finish(&f1.id, &sha256_hex(b"other")).await,
            Err(StoreError::Conflict(_))
        ),
        "finished with another hash"
    );
    assert_eq!(
        store.file_get(&f1.id).await.unwrap(),
        Some(FileRecord {
            sha256: Some(hash.clone()),
            ..f1.clone()
        })
    );
    assert!(
        is_invalid(store.file_chunk_put(&f1.id, 1, vec![2; 4]).await),
        "a finished file's pieces no longer change"
    );
    assert_eq!(download(store, &f1.id).await, content);
    let empty = file_slot(5, alice, 0, ts(0), ts(100));
    create_ok(store, &empty, QUOTA).await;
    store
        .file_finish(&empty.id, &sha256_hex(b""))
        .await
        .expect("an empty file has no pieces");
    store.file_remove(&short.id).await.unwrap();
    store.file_remove(&gap.id).await.unwrap();

    // Quota: finished files and unexpired slots count, expired slots do not, per owner.
    let f2 = file_slot(6, alice, 91, ts(1), ts(100));
    assert_eq!(
        store.file_create(&f2, QUOTA).await.unwrap(),
        FileCreated::OverQuota { used: 10 }
    );
    assert_eq!(
        store.file_get(&f2.id).await.unwrap(),
        None,
        "nothing written"
    );
    let f2 = file_slot(6, alice, 90, ts(1), ts(100));
    create_ok(store, &f2, QUOTA).await;
    assert_eq!(
        store
            .file_create(&file_slot(7, alice, 1, ts(2), ts(100)), QUOTA)
            .await
            .unwrap(),
        FileCreated::OverQuota { used: 100 }
    );
    create_ok(store, &file_slot(8, bob, 100, ts(2), ts(100)), QUOTA).await;
    // At 150 f2 has expired unfinished; f1, finished, still counts.
    let f3 = file_slot(9, alice, 90, ts(150), ts(250));
    create_ok(store, &f3, QUOTA).await;
    assert_eq!(
        store
            .file_create(&file_slot(10, alice, 1, ts(150), ts(300)), QUOTA)
            .await
            .unwrap(),
        FileCreated::OverQuota { used: 100 }
    );
    // A slot that expires at the very time another is given no longer counts.
    create_ok(store, &file_slot(10, alice, 90, ts(250), ts(300)), QUOTA).await;

    // Binding: only a finished file, only by its owner, only once.
    assert!(!store.file_bind(&f1.id, bob, room).await.unwrap());
    assert!(
        !store.file_bind(&f3.id, alice, room).await.unwrap(),
        "unfinished"
    );
    assert!(!store.file_bind(&file_id(999), alice, room).await.unwrap());
    assert_eq!(store.file_room_bytes(room).await.unwrap(), 0);
    assert!(store.file_bind(&f1.id, alice, room).await.unwrap());
    assert!(
        !store
            .file_bind(&f1.id, alice, "other@conference.localhost")
            .await
            .unwrap(),
        "bound once"
    );
    assert_eq!(
        store
            .file_get(&f1.id)
            .await
            .unwrap()
            .unwrap()
            .room
            .as_deref(),
        Some(room)
    );
    assert_eq!(store.file_room_bytes(room).await.unwrap(), 10);
    assert_eq!(
        store
            .file_room_bytes("other@conference.localhost")
            .await
            .unwrap(),
        0
    );

    // Listing: oldest first, ties by id; filters; limits.
    let tie_b = file_slot(12, bob, 1, ts(400), ts(500));
    let tie_a = file_slot(11, bob, 1, ts(400), ts(500));
    create_ok(store, &tie_b, u64::MAX).await;
    create_ok(store, &tie_a, u64::MAX).await;
    let ids = |files: Vec<FileRecord>| files.into_iter().map(|f| f.id).collect::<Vec<_>>();
    let list = |owner: Option<&str>, room: Option<&str>, limit: u32| FileFilter {
        owner: owner.map(str::to_string),
        room: room.map(str::to_string),
        limit,
    };
    assert_eq!(
        ids(store.file_list(&list(Some(bob), None, 0)).await.unwrap()),
        [file_id(8), file_id(11), file_id(12)]
    );
    assert_eq!(
        ids(store.file_list(&list(Some(bob), None, 2)).await.unwrap()),
        [file_id(8), file_id(11)]
    );
    assert_eq!(
        ids(store.file_list(&list(Some(alice), None, 0)).await.unwrap()),
        [file_id(1), file_id(5), file_id(6), file_id(9), file_id(10)]
    );
    assert_eq!(
        ids(store.file_list(&list(None, Some(room), 0)).await.unwrap()),
        [file_id(1)]
    );
    assert_eq!(
        ids(store
            .file_list(&list(Some(alice), Some(room), 0))
            .await
            .unwrap()),
        [file_id(1)]
    );
    assert!(store
        .file_list(&list(Some(bob), Some(room), 0))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.file_list(&FileFilter::default()).await.unwrap().len(),
        8
    );
    assert_eq!(
        store.file_list(&list(Some(bob), None, 0)).await.unwrap()[0],
        file_slot(8, bob, 100, ts(2), ts(100)),
        "listed as stored"
    );

    // Removing: the record and its pieces.
    assert!(store.file_remove(&f1.id).await.unwrap());
    assert!(!store.file_remove(&f1.id).await.unwrap());
    assert_eq!(store.file_get(&f1.id).await.unwrap(), None);
    assert_eq!(store.file_chunk_get(&f1.id, 0).await.unwrap(), None);
    assert_eq!(store.file_room_bytes(room).await.unwrap(), 0);

    // Every byte value, in several pieces, comes back exactly.
    let bytes: Vec<u8> = (0..=255u8)
        .cycle()
        .take(2 * FILE_CHUNK_BYTES + 300)
        .collect();
    let big = file_slot(13, "carol@localhost", bytes.len() as u64, ts(0), ts(100));
    create_ok(store, &big, u64::MAX).await;
    upload(store, &big.id, &bytes).await;
    assert_eq!(
        store
            .file_chunk_get(&big.id, 0)
            .await
            .unwrap()
            .map(|p| p.len()),
        Some(FILE_CHUNK_BYTES)
    );
    assert!(download(store, &big.id).await == bytes, "the bytes differ");
    let all: Vec<u8> = (0..=255u8).collect();
    let small = file_slot(14, "carol@localhost", 256, ts(0), ts(100));
    create_ok(store, &small, u64::MAX).await;
    upload(store, &small.id, &all).await;
    assert_eq!(
        store.file_chunk_get(&small.id, 0).await.unwrap(),
        Some(all.clone())
    );

    // Purging: only unfinished slots that expired, oldest first, at most `limit`.
    let dave = "dave@localhost";
    let d1 = file_slot(21, dave, 3, ts(-200), ts(-100));
    let d2 = file_slot(22, dave, 3, ts(-200), ts(-90));
    let d3 = file_slot(23, dave, 3, ts(-200), ts(-150));
    let d4 = file_slot(24, dave, 3, ts(-200), ts(-80));
    let d5 = file_slot(25, dave, 3, ts(-200), ts(-70));
    for d in [&d1, &d2, &d3, &d4, &d5] {
        create_ok(store, d, u64::MAX).await;
    }
    store.file_chunk_put(&d1.id, 0, vec![1, 2]).await.unwrap();
    upload(store, &d3.id, b"abc").await;
    assert_eq!(store.file_purge_unfinished(ts(-95), 10).await.unwrap(), 1);
    assert_eq!(store.file_get(&d1.id).await.unwrap(), None);
    assert_eq!(store.file_chunk_get(&d1.id, 0).await.unwrap(), None);
    assert_eq!(store.file_purge_unfinished(ts(-60), 1).await.unwrap(), 1);
    assert_eq!(store.file_get(&d2.id).await.unwrap(), None, "oldest first");
    assert!(store.file_get(&d4.id).await.unwrap().is_some());
    assert_eq!(store.file_purge_unfinished(ts(-60), 0).await.unwrap(), 0);
    assert_eq!(store.file_purge_unfinished(ts(-60), 10).await.unwrap(), 2);
    assert_eq!(store.file_purge_unfinished(ts(-60), 10).await.unwrap(), 0);
    assert!(
        store.file_get(&d3.id).await.unwrap().is_some(),
        "a finished file is never purged"
    );
    assert_eq!(
        ids(store.file_list(&list(Some(dave), None, 0)).await.unwrap()),
        [file_id(23)]
    );

    // Deleting a room deletes its files; clearing its history deletes those posted before.
    let (gone, cleared) = ("gone@conference.localhost", "cleared@conference.localhost");
    put_rooms(store, &[gone, cleared]).await;
    let erin = "erin@localhost";
    let posted = [
        (31, gone, ts(10)),
        (32, cleared, ts(10)),
        (33, cleared, ts(19)),
        (34, cleared, ts(20)),
        (35, cleared, ts(30)),
    ];
    for (n, room, at) in posted {
        let file = file_slot(n, erin, 2, at, ts(1000));
        create_ok(store, &file, u64::MAX).await;
        upload(store, &file.id, &[n as u8, 0]).await;
        assert!(store.file_bind(&file.id, erin, room).await.unwrap());
    }
    assert_eq!(store.file_room_bytes(cleared).await.unwrap(), 8);
    let outcomes = commit_ok(
        store,
        vec![Write::ClearHistory {
            room: cleared.into(),
            before: ts(20),
        }],
        "clearing a room",
    )
    .await;
    assert_eq!(outcomes, [WriteOutcome::Removed { messages: 0 }]);
    assert_eq!(
        ids(store
            .file_list(&list(None, Some(cleared), 0))
            .await
            .unwrap()),
        [file_id(34), file_id(35)],
        "only the files posted before go"
    );
    assert_eq!(store.file_chunk_get(&file_id(32), 0).await.unwrap(), None);
    assert_eq!(store.file_room_bytes(cleared).await.unwrap(), 4);
    assert_eq!(store.file_room_bytes(gone).await.unwrap(), 2);
    commit_ok(
        store,
        vec![Write::DeleteRoom { room: gone.into() }],
        "deleting a room",
    )
    .await;
    assert_eq!(store.file_get(&file_id(31)).await.unwrap(), None);
    assert_eq!(store.file_chunk_get(&file_id(31), 0).await.unwrap(), None);
    assert_eq!(store.file_room_bytes(gone).await.unwrap(), 0);
    assert_eq!(
        store.file_room_bytes(cleared).await.unwrap(),
        4,
        "another room's files stay"
    );
}

/// Slots created at once for one owner never pass its quota together.
pub async fn file_quota_race(store: Arc<dyn Store>) {
    const TASKS: u32 = 20;
    let mut tasks = Vec::new();
    for n in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let slot = file_slot(n + 1, "racer@localhost", 10, ts(0), ts(100));
            store.file_create(&slot, 100).await
        }));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.expect("a create task panicked") {
            Ok(FileCreated::Created) => created += 1,
            Ok(FileCreated::OverQuota { used }) => assert!(used >= 91, "refused at {used}"),
            Err(e) => panic!("a create failed: {e}"),
        }
    }
    assert_eq!(created, 10, "exactly the quota's worth of slots");
    let held: u64 = store
        .file_list(&FileFilter {
            owner: Some("racer@localhost".into()),
            ..FileFilter::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|f| f.size)
        .sum();
    assert_eq!(held, 100);
}
