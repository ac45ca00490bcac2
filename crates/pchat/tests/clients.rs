//! Clients that don't play by the rules (issue 11 §4), against the real binary: an occupant
//! that stops reading, a client that stops answering pings.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pchat_testkit::{
    ns, origin_id, stanza_id, status_codes, Client, Element, Rsm, ServerOptions, TestServer,
};

type R = anyhow::Result<()>;

const T: Duration = Duration::from_secs(10);

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

/// Starts the server with `toml` as its `pchat.toml` and the users alice, bob and carol.
async fn start_with(toml: &str) -> anyhow::Result<(TestServer, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("pchat.toml"), toml)?;
    let opts = ServerOptions {
        data_dir: Some(dir.path().to_owned()),
        ..ServerOptions::default()
    };
    let s = TestServer::start(&bin(), opts).await?;
    for u in ["alice", "bob", "carol"] {
        s.add_user(&format!("{u}@localhost"), &format!("{u}-pw"))
            .await?;
    }
    Ok((s, dir))
}

async fn login(s: &TestServer, user: &str) -> anyhow::Result<Client> {
    Ok(
        s.client(&format!("{user}@localhost"), &format!("{user}-pw"))
            .await?,
    )
}

/// Creates an instant room owned by `c`.
async fn create_instant(c: &mut Client, room: &str, nick: &str) -> R {
    c.join_room(room, nick, None).await?;
    let submit = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(
            Element::new("query", ns::MUC_OWNER)
                .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
        );
    c.iq_result(submit, T).await?;
    Ok(())
}

/// The server's resident set, from /proc/PID/status, in KiB.
fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Is `st` the presence that shows `room/nick` leaving with status `code`?
fn leaves_with(st: &Element, room: &str, nick: &str, code: u16) -> bool {
    st.is("presence", ns::CLIENT)
        && st.attr("type") == Some("unavailable")
        && st.attr("from") == Some(&*format!("{room}/{nick}"))
        && status_codes(st).contains(&code)
}

const MESSAGES: usize = 4000;
const BODY_BYTES: usize = 16 * 1024;
/// Messages alice has in flight at once: she sends the next when the room acknowledged one.
const WINDOW: usize = 16;
/// The write deadline the slow-reader test configures.
const WRITE_TIMEOUT_MS: u64 = 2000;

/// The reproduction: 4,000 × 16 KiB messages into a room where one occupant never
/// reads. The non-reader is dropped within the write deadline, the server's resident set
/// stays bounded while it happens, the others see it leave with status 333 ("removed due to
/// a technical problem"), and every message of the writer is acknowledged, archived and
/// delivered in order to the occupant who reads.
#[tokio::test]
async fn an_occupant_that_stops_reading_is_dropped_and_memory_stays_bounded() -> R {
    let (s, _dir) = start_with(&format!(
        "[limits]\nwrite_timeout_ms = {WRITE_TIMEOUT_MS}\n"
    ))
    .await?;
    let room = "flood@conference.localhost";
    let pid = s.pid().ok_or_else(|| anyhow::anyhow!("no server pid"))?;
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, room, "alice").await?;
    let mut bob = login(&s, "bob").await?;
    bob.join_room(room, "bob", None).await?;
    let mut carol = login(&s, "carol").await?;
    carol.join_room(room, "carol", None).await?;
    // From here on carol reads nothing: the testkit's reader stops once its queue is full,
    // and TCP pushes back on the server.

    let rss_before = vm_rss_kib(pid)?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut peak = 0u64;
        loop {
            if let Ok(kib) = vm_rss_kib(pid) {
                peak = peak.max(kib);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop_rx.changed() => return peak,
            }
        }
    });

    let started = Instant::now();
    let bob_task = tokio::spawn({
        let room = room.to_owned();
        async move {
            let mut bodies = Vec::with_capacity(MESSAGES);
            let mut carol_left_after = None;
            // Bounded: the whole exchange has 4 minutes; once bob has every message, carol
            // has one more write deadline (and slack) to be gone.
            let mut deadline = Instant::now() + Duration::from_secs(240);
            while bodies.len() < MESSAGES || carol_left_after.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                let st = match bob.recv(left).await {
                    Ok(st) => st,
                    Err(pchat_testkit::Error::Timeout { .. }) if bodies.len() == MESSAGES => break,
                    Err(e) => return Err(e.into()),
                };
                if leaves_with(&st, &room, "carol", 333) {
                    carol_left_after = Some(started.elapsed());
                } else if st.is("message", ns::CLIENT) && st.attr("type") == Some("groupchat") {
                    if let Some(b) = st.body() {
                        bodies.push(b[..b.find(' ').unwrap_or(0)].to_owned());
                        if bodies.len() == MESSAGES {
                            deadline = Instant::now()
                                + Duration::from_millis(WRITE_TIMEOUT_MS)
                                + Duration::from_secs(5);
                        }
                    }
                }
            }
            anyhow::Ok((bodies, carol_left_after))
        }
    });

    let filler = "x".repeat(BODY_BYTES);
    let mut acked: HashMap<String, i64> = HashMap::new();
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while acked.len() < MESSAGES {
        while sent < MESSAGES && sent - acked.len() < WINDOW {
            let id = format!("m{sent}");
            let msg = Element::new("message", ns::CLIENT)
                .with_attr("to", room)
                .with_attr("type", "groupchat")
                .with_attr("id", id.clone())
                .with_child(Element::new("body", ns::CLIENT).with_text(format!("{id} {filler}")))
                .with_child(Element::new("origin-id", ns::SID).with_attr("id", id.clone()));
            alice.send(&msg).await?;
            sent += 1;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let st = alice.recv(left).await?;
        if !st.is("message", ns::CLIENT) {
            continue;
        }
        anyhow::ensure!(
            st.attr("type") != Some("error"),
            "a message was refused: {}",
            st.to_xml().chars().take(600).collect::<String>()
        );
        if let (Some(o), Some(seq)) = (origin_id(&st), stanza_id(&st, room)) {
            acked.insert(o, seq.parse()?);
        }
    }
    let sent_in = started.elapsed();
    let (bodies, carol_left_after) =
        tokio::time::timeout(Duration::from_secs(60), bob_task).await???;
    let _ = stop_tx.send(true);
    let peak = sampler.await?;
    let rss_after = vm_rss_kib(pid)?;
    let growth_mib = peak.saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!(
        "slow reader: {MESSAGES} x {BODY_BYTES} B sent and acknowledged in {sent_in:?}; \
         carol dropped (333 seen by bob) after {carol_left_after:?}; server VmRSS \
         {rss_before} KiB before, peak {peak} KiB (+{growth_mib:.1} MiB), {rss_after} KiB after"
    );

    // Every message acknowledged, each under its own archive id 1..=4000.
    let ids: BTreeSet<i64> = acked.values().copied().collect();
    assert_eq!(ids, (1..=MESSAGES as i64).collect::<BTreeSet<_>>());
    // ... delivered to bob in the order they were sent ...
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want, "bob got every message, in order");
    // ... and archived.
    let page = alice
        .mam_query(
            room,
            &[],
            Some(Rsm {
                max: Some(1),
                before: Some(String::new()),
                after: None,
            }),
        )
        .await?;
    assert_eq!(page.ids(), [MESSAGES.to_string()], "the last archived id");
    let count = page
        .fin
        .child("set", ns::RSM)
        .and_then(|s| s.child_text("count", ns::RSM));
    assert_eq!(count.as_deref(), Some(&*MESSAGES.to_string()));

    // Carol was dropped within the deadline: before the writer was even done, or at the
    // latest one deadline (plus scheduling slack) after.
    let left = carol_left_after.ok_or_else(|| anyhow::anyhow!("carol never left"))?;
    assert!(
        left <= sent_in + Duration::from_millis(WRITE_TIMEOUT_MS) + Duration::from_secs(5),
        "carol left after {left:?}, the writer finished after {sent_in:?}"
    );
    // Her connection is gone (whatever she had buffered, then the end).
    let end = loop {
        match carol.recv(T).await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(
        !matches!(end, pchat_testkit::Error::Timeout { .. }),
        "carol's connection is still open: {end}"
    );
    // Memory: her queue is bounded in bytes; without the bound the server grew by ~80 MiB.
    assert!(
        growth_mib < 40.0,
        "the server grew by {growth_mib:.1} MiB while carol did not read"
    );
    Ok(())
}

/// Answers the server's pings (XEP-0199) for `duration`; returns how many came and what
/// else arrived.
async fn answer_pings_for(
    c: &mut Client,
    duration: Duration,
) -> anyhow::Result<(usize, Vec<Element>)> {
    let deadline = Instant::now() + duration;
    let mut pings = 0;
    let mut other = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(st) = c.recv_opt(left).await? else {
            return Ok((pings, other));
        };
        if st.is("iq", ns::CLIENT)
            && st.attr("type") == Some("get")
            && st.has_child("ping", ns::PING)
        {
            anyhow::ensure!(
                st.attr("from") == Some("localhost"),
                "a ping from the server itself: {st}"
            );
            pings += 1;
            let pong = Element::new("iq", ns::CLIENT)
                .with_attr("type", "result")
                .with_attr("id", st.attr("id").unwrap_or_default())
                .with_attr("to", "localhost");
            c.send(&pong).await?;
        } else {
            other.push(st);
        }
    }
}

/// XEP-0199 server-to-client pings: a client that answers them stays, however quiet; one
/// that stops answering (its connection still open) is dropped after the ping timeout, and
/// the room shows it leaving with status 333.
#[tokio::test]
async fn a_client_that_stops_answering_pings_is_dropped() -> R {
    let (s, _dir) =
        start_with("[limits]\nping_interval_ms = 500\nping_timeout_ms = 1500\n").await?;
    let room = "pinged@conference.localhost";
    let mut alice = login(&s, "alice").await?;
    alice.set_answer_pings(false);
    create_instant(&mut alice, room, "alice").await?;
    let mut carol = login(&s, "carol").await?;
    carol.set_answer_pings(false);
    carol.join_room(room, "carol", None).await?;

    // Bob's client answers pings by itself (the testkit's default) while it waits.
    let mut bob = login(&s, "bob").await?;
    bob.join_room(room, "bob", None).await?;

    // Quiet but alive: all answer for a few intervals, and all stay.
    let (a, c, b) = tokio::join!(
        answer_pings_for(&mut alice, Duration::from_secs(3)),
        answer_pings_for(&mut carol, Duration::from_secs(3)),
        bob.collect_for(Duration::from_secs(3)),
    );
    let ((alice_pings, seen), (carol_pings, _)) = (a?, c?);
    assert!(
        !b?.iter().any(|st| st.has_child("ping", ns::PING)),
        "bob's client answered its pings without showing them"
    );
    assert!(
        alice_pings >= 2 && carol_pings >= 2,
        "pinged while silent: alice {alice_pings}, carol {carol_pings}"
    );
    assert!(
        !seen.iter().any(|st| leaves_with(st, room, "carol", 333)),
        "carol answered and stays"
    );

    // Carol stops answering (her client still reads: only XMPP is silent). Alice goes on.
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(10);
    let mut left_after = None;
    while left_after.is_none() && Instant::now() < deadline {
        let (a, b) = tokio::join!(
            answer_pings_for(&mut alice, Duration::from_millis(200)),
            bob.collect_for(Duration::from_millis(200)),
        );
        let (_, seen) = a?;
        b?;
        if seen.iter().any(|st| leaves_with(st, room, "carol", 333)) {
            left_after = Some(stopped.elapsed());
        }
    }
    let left_after = left_after.ok_or_else(|| anyhow::anyhow!("carol was never dropped"))?;
    // Silence is noticed within two intervals, then the ping times out.
    assert!(
        left_after <= Duration::from_millis(2 * 500 + 1500 + 1500),
        "dropped after {left_after:?}"
    );
    // What carol got: pings she did not answer, then the stream error.
    let end = loop {
        match carol.recv(T).await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&end, pchat_testkit::Error::Stream { condition, .. } if condition == "connection-timeout"),
        "{end}"
    );
    // Alice, who answered throughout, is still there, and so is bob.
    alice.ping("localhost").await?;
    bob.collect_for(Duration::from_secs(2)).await?;
    bob.ping("localhost").await?;
    Ok(())
}

/// Bursts larger than a client's queue do not get a client that reads dropped: history on
/// join is cut to the newest messages that fit in half the queue (the rest stays in the
/// archive), and an archive page larger than the whole queue is delivered as the client reads
/// it.
#[tokio::test]
async fn bursts_larger_than_the_queue_reach_a_client_that_reads() -> R {
    const QUEUE_BYTES: usize = 64 * 1024;
    let (s, _dir) = start_with(&format!(
        "[limits]\nstanza_bytes_max = 16384\nsession_queue_bytes_max = {QUEUE_BYTES}\n"
    ))
    .await?;
    let room = "burst@conference.localhost";
    let mut alice = login(&s, "alice").await?;
    create_instant(&mut alice, room, "alice").await?;
    let filler = "y".repeat(8000);
    for i in 0..20 {
        alice
            .send_groupchat(room, &format!("b{i:02} {filler}"), None)
            .await?;
    }
    let mut bob = login(&s, "bob").await?;
    let joined = bob
        .join_room(
            room,
            "bob",
            Some(pchat_testkit::History {
                max_stanzas: Some(20),
                ..Default::default()
            }),
        )
        .await?;
    let got: Vec<String> = joined
        .history_bodies()
        .iter()
        .map(|b| b[..3].to_owned())
        .collect();
    let n = got.len();
    assert!(
        (1..20).contains(&n),
        "history cut to what fits in half the queue: {got:?}"
    );
    let want: Vec<String> = (20 - n..20).map(|i| format!("b{i:02}")).collect();
    assert_eq!(got, want, "the newest messages, in order");
    assert!(n * 8000 <= QUEUE_BYTES / 2);

    // The whole archive in one page: 160 KiB through a 64 KiB queue.
    let page = bob
        .mam_query(
            room,
            &[],
            Some(Rsm {
                max: Some(20),
                before: None,
                after: None,
            }),
        )
        .await?;
    assert_eq!(page.ids().len(), 20);
    // Still connected.
    bob.ping("localhost").await?;
    Ok(())
}
