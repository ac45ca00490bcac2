//! The writers and their ledgers, and the archive as a client reads it.
//!
//! A [`Ledger`] is an independent client (the test kit's) that writes numbered messages,
//! each with an origin-id, resends the same origin-id until the room acknowledges it
//! (reflection with a stanza-id), follows `see-other-host`, moves between servers when one
//! refuses or dies, and records what was acknowledged, under which archive id, when (on the
//! monotonic clock and the wall clock) and through which server. [`Archive::read`] reads a
//! room's whole archive through whichever server is active; [`crate::check`] then judges the
//! pool by them.
//!
//! Adapted from `crates/pchat/tests/common/twosite.rs` (the DR drills' ledger), which this
//! crate cannot import (it is a test fixture of another crate); the acknowledgment here also
//! keeps its wall-clock time, to compare with a failover's declared window.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context as _};
use pchat_testkit::{
    forwarded_message, ns, origin_id, stanza_id, Client, ConnectOptions, Element,
    Error as XmppError, History, Rsm, Transport,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Ids per id epoch, as the stores number them (`pchat_store::ids::IDS_PER_EPOCH`; the
/// harness shares no code with what it judges).
const IDS_PER_EPOCH: i64 = 1_000_000_000;

/// What a [`Ledger`] writes and how patiently.
#[derive(Clone, Debug)]
pub struct LedgerConfig {
    /// Servers' client (STARTTLS) addresses, tried in this order when no redirect names one.
    pub servers: Vec<SocketAddr>,
    /// Bare JID.
    pub jid: String,
    /// Password.
    pub password: String,
    /// Room JID.
    pub room: String,
    /// Nick in the room.
    pub nick: String,
    /// Message `n` has origin-id `PREFIX-n` and body `PREFIX n`.
    pub prefix: String,
    /// Pause after each acknowledged message.
    pub interval: Duration,
    /// How long one attempt waits for the reflection before resending.
    pub ack_timeout: Duration,
    /// How long one message may stay unacknowledged (across resends and reconnects) before
    /// the writer gives up with an error.
    pub stall_timeout: Duration,
    /// Names of servers, for the event log (e.g. `a1`); unnamed ones show as addresses.
    pub names: Vec<(SocketAddr, String)>,
}

impl LedgerConfig {
    /// Defaults: nick = the JID's localpart, 20 ms between messages, 3 s per attempt, give
    /// up after 120 s without an acknowledgment.
    pub fn new(
        servers: Vec<SocketAddr>,
        jid: &str,
        password: &str,
        room: &str,
        prefix: &str,
    ) -> LedgerConfig {
        LedgerConfig {
            servers,
            jid: jid.to_string(),
            password: password.to_string(),
            room: room.to_string(),
            nick: jid.split('@').next().unwrap_or("writer").to_string(),
            prefix: prefix.to_string(),
            interval: Duration::from_millis(20),
            ack_timeout: Duration::from_secs(3),
            stall_timeout: Duration::from_secs(120),
            names: Vec::new(),
        }
    }
}

/// One message the ledger sent.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its number, from 1.
    pub n: u64,
    /// Its origin-id (`PREFIX-n`).
    pub origin_id: String,
    /// Its body (`PREFIX n`).
    pub body: String,
    /// When it was first sent.
    pub first_sent: Instant,
    /// How many times it was sent.
    pub attempts: u32,
    /// Its acknowledgment, if one came.
    pub ack: Option<Ack>,
}

/// The room's acknowledgment of a message: its reflection with a stanza-id.
#[derive(Clone, Debug)]
pub struct Ack {
    /// The stanza-id, which is the MAM archive id.
    pub id: i64,
    /// When the reflection arrived.
    pub at: Instant,
    /// The same instant on the wall clock (to compare with the databases' commit times).
    pub wall: SystemTime,
    /// The server whose session carried it.
    pub server: SocketAddr,
}

/// Something that happened to the writer (reconnects, errors, redirects).
#[derive(Clone, Debug)]
pub struct Event {
    /// When (first occurrence).
    pub at: Instant,
    /// What.
    pub what: String,
    /// How many more times the same thing happened soon after (folded).
    pub repeats: u32,
    /// When it last happened.
    pub last: Instant,
}

enum Attempt {
    Acked(Ack),
    /// Resend on the same session.
    Retry,
    /// The session is unusable: reconnect (to the redirect target first, if any).
    Reconnect(Option<SocketAddr>),
}

/// The client-side record of a writer; see the module documentation.
pub struct Ledger {
    cfg: LedgerConfig,
    entries: Vec<Entry>,
    events: Vec<Event>,
    session: Option<(Client, SocketAddr)>,
    redirect: Option<SocketAddr>,
    stop: Option<watch::Receiver<bool>>,
    progress: Option<watch::Sender<Progress>>,
    acked: usize,
    nick_suffix: u32,
}

/// A running writer's progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Messages acknowledged so far.
    pub acked: usize,
    /// The server that carried the last acknowledgment.
    pub server: Option<SocketAddr>,
}

impl Ledger {
    /// A ledger that has sent nothing yet (it connects on the first write).
    pub fn new(cfg: LedgerConfig) -> Ledger {
        Ledger {
            cfg,
            entries: Vec::new(),
            events: Vec::new(),
            session: None,
            redirect: None,
            stop: None,
            progress: None,
            acked: 0,
            nick_suffix: 0,
        }
    }

    /// A ledger holding `entries` as if it had written them (to test the checks themselves).
    pub fn with_entries(cfg: LedgerConfig, entries: Vec<Entry>) -> Ledger {
        let mut ledger = Ledger::new(cfg);
        ledger.acked = entries.iter().filter(|e| e.ack.is_some()).count();
        ledger.entries = entries;
        ledger
    }

    /// The configuration.
    pub fn config(&self) -> &LedgerConfig {
        &self.cfg
    }

    /// Every message sent, in order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The acknowledged messages, in order (which is acknowledgment order).
    pub fn acked(&self) -> impl Iterator<Item = (&Entry, &Ack)> {
        self.entries
            .iter()
            .filter_map(|e| e.ack.as_ref().map(|a| (e, a)))
    }

    /// What happened along the way.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The events as text, with times relative to the first message.
    pub fn events_text(&self) -> String {
        let t0 = self.entries.first().map(|e| e.first_sent);
        let mut out = String::new();
        for e in &self.events {
            let at = t0
                .map(|t| format!("{:>8.3}s", e.at.saturating_duration_since(t).as_secs_f64()))
                .unwrap_or_default();
            let rep = if e.repeats > 0 {
                format!(
                    " (×{} in {:.1} s)",
                    e.repeats + 1,
                    e.last.duration_since(e.at).as_secs_f64()
                )
            } else {
                String::new()
            };
            out.push_str(&format!("{at} {}{rep}\n", e.what));
        }
        out
    }

    /// The longest time between two consecutive acknowledgments and when it ended: the
    /// writer's view of an outage.
    pub fn longest_gap(&self) -> Option<(Duration, Instant)> {
        let acks: Vec<Instant> = self.acked().map(|(_, a)| a.at).collect();
        acks.windows(2)
            .map(|w| (w[1].duration_since(w[0]), w[1]))
            .max_by_key(|(d, _)| *d)
    }

    /// The first acknowledgment at or after `t`, e.g. to measure an RTO from a fault.
    pub fn first_ack_after(&self, t: Instant) -> Option<&Ack> {
        self.acked().map(|(_, a)| a).find(|a| a.at >= t)
    }

    fn note(&mut self, what: String) {
        // A retry loop cycles through a few servers: fold a repeat of any recent event.
        let now = Instant::now();
        let recent = self.events.len().saturating_sub(8);
        if let Some(e) = self.events[recent..]
            .iter_mut()
            .find(|e| e.what == what && now.duration_since(e.last) < Duration::from_secs(2))
        {
            e.repeats += 1;
            e.last = now;
            return;
        }
        self.events.push(Event {
            at: now,
            what,
            repeats: 0,
            last: now,
        });
    }

    /// A server's name from the configuration, else its address.
    fn label(&self, addr: SocketAddr) -> String {
        self.cfg
            .names
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| addr.to_string())
    }

    fn stopping(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| *s.borrow())
    }

    /// Logs in to an active server (following redirects) and joins the room, configuring it
    /// when this creates it. Bounded by the stall timeout.
    pub async fn connect(&mut self) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + self.cfg.stall_timeout;
        self.reconnect(deadline)
            .await?
            .ok_or_else(|| anyhow!("stopped while connecting"))
    }

    /// `Ok(None)` when told to stop before a session was found.
    async fn reconnect(&mut self, deadline: Instant) -> anyhow::Result<Option<SocketAddr>> {
        if let Some((old, _)) = self.session.take() {
            drop(old);
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let first = self.redirect.take();
            let mut queue: VecDeque<SocketAddr> = first
                .into_iter()
                .chain(self.cfg.servers.iter().copied())
                .collect();
            let mut tried = HashSet::new();
            while let Some(addr) = queue.pop_front() {
                if !tried.insert(addr) {
                    continue;
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    break;
                }
                let name = self.label(addr);
                match self.open_session(addr, remaining).await {
                    Ok(client) => {
                        self.note(format!("joined {} through {name}", self.cfg.room));
                        self.session = Some((client, addr));
                        return Ok(Some(addr));
                    }
                    Err(SessionError::Redirect(to)) => {
                        let to_name = self.label(to);
                        self.note(format!("{name}: see-other-host {to_name}"));
                        queue.push_front(to);
                    }
                    Err(SessionError::Other(e)) => self.note(format!("{name}: {e}")),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "no server took the session within the stall timeout ({:?}); events:\n{}",
                    self.cfg.stall_timeout,
                    self.events_text()
                );
            }
            if self.stopping() {
                return Ok(None);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(400));
        }
    }

    async fn open_session(
        &mut self,
        addr: SocketAddr,
        remaining: Duration,
    ) -> Result<Client, SessionError> {
        let mut client = login(addr, &self.cfg.jid, &self.cfg.password, remaining).await?;
        client.set_reply_timeout(self.cfg.ack_timeout.max(Duration::from_secs(5)));
        let history = History {
            max_stanzas: Some(0),
            ..History::default()
        };
        let nick = match self.nick_suffix {
            0 => self.cfg.nick.clone(),
            k => format!("{}-{k}", self.cfg.nick),
        };
        let joined = match client.join_room(&self.cfg.room, &nick, Some(history)).await {
            Ok(j) => j,
            Err(XmppError::Stanza { error, .. }) if error.condition == "conflict" => {
                // The nick is still held, e.g. by the presence a killed server left behind.
                self.nick_suffix += 1;
                return Err(SessionError::Other(format!(
                    "nick {nick} in use; next join as {}-{}",
                    self.cfg.nick, self.nick_suffix
                )));
            }
            Err(e) => return Err(e.into()),
        };
        if joined.self_status_codes().contains(&201) {
            // A new room stays locked until its owner accepts a configuration.
            let submit = Element::new("iq", ns::CLIENT)
                .with_attr("type", "set")
                .with_attr("to", self.cfg.room.as_str())
                .with_child(
                    Element::new("query", ns::MUC_OWNER)
                        .with_child(Element::new("x", ns::DATA_FORMS).with_attr("type", "submit")),
                );
            client
                .iq_result(submit, Duration::from_secs(10))
                .await
                .map_err(SessionError::from)?;
            self.note(format!("created and configured {}", self.cfg.room));
        }
        client.set_reply_timeout(self.cfg.ack_timeout);
        Ok(client)
    }

    /// Sends the next message, resending it (same origin-id) until it is acknowledged.
    /// `Ok(None)` when the writer was told to stop first (the message stays unacknowledged).
    pub async fn write_next(&mut self) -> anyhow::Result<Option<&Entry>> {
        if self.stopping() {
            return Ok(None);
        }
        let n = self.entries.len() as u64 + 1;
        let prefix = &self.cfg.prefix;
        self.entries.push(Entry {
            n,
            origin_id: format!("{prefix}-{n}"),
            body: format!("{prefix} {n}"),
            first_sent: Instant::now(),
            attempts: 0,
            ack: None,
        });
        let idx = self.entries.len() - 1;
        let deadline = Instant::now() + self.cfg.stall_timeout;
        loop {
            if self.session.is_none()
                && (self.stopping() || self.reconnect(deadline).await?.is_none())
            {
                return Ok(None);
            }
            ensure!(
                Instant::now() < deadline,
                "message {n} unacknowledged after {:?}; events:\n{}",
                self.cfg.stall_timeout,
                self.events_text()
            );
            self.entries[idx].attempts += 1;
            match self.attempt(idx).await {
                Attempt::Acked(ack) => {
                    let server = ack.server;
                    self.entries[idx].ack = Some(ack);
                    self.acked += 1;
                    if let Some(p) = &self.progress {
                        let _ = p.send(Progress {
                            acked: self.acked,
                            server: Some(server),
                        });
                    }
                    return Ok(Some(&self.entries[idx]));
                }
                Attempt::Retry => {
                    if self.stopping() {
                        return Ok(None);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Attempt::Reconnect(to) => {
                    self.session = None;
                    self.redirect = to;
                    if self.stopping() {
                        return Ok(None);
                    }
                }
            }
        }
    }

    async fn attempt(&mut self, idx: usize) -> Attempt {
        let (room, body, origin) = (
            self.cfg.room.clone(),
            self.entries[idx].body.clone(),
            self.entries[idx].origin_id.clone(),
        );
        let Some(addr) = self.session.as_ref().map(|(_, a)| *a) else {
            return Attempt::Reconnect(None);
        };
        let name = self.label(addr);
        let Some((client, _)) = self.session.as_mut() else {
            return Attempt::Reconnect(None);
        };
        let result = client.send_groupchat(&room, &body, Some(&origin)).await;
        match result {
            Ok(reflection) => {
                // Drop whatever else is buffered (late reflections of earlier attempts,
                // other occupants' messages), so the buffer stays small.
                let _ = client.collect_for(Duration::ZERO).await;
                match stanza_id(&reflection, &room).and_then(|s| s.parse::<i64>().ok()) {
                    Some(id) => Attempt::Acked(Ack {
                        id,
                        at: Instant::now(),
                        wall: SystemTime::now(),
                        server: addr,
                    }),
                    None => {
                        self.note(format!(
                            "{name}: reflection of {origin} without a numeric stanza-id: {reflection}"
                        ));
                        Attempt::Retry
                    }
                }
            }
            Err(XmppError::Stanza { error, .. }) if error.error_type == "wait" => {
                self.note(format!(
                    "{name}: {origin}: wait <{}/>{}",
                    error.condition,
                    error.text.map(|t| format!(": {t}")).unwrap_or_default()
                ));
                Attempt::Retry
            }
            Err(XmppError::Stanza { error, .. }) => {
                // Not an occupant any more, room gone or locked: join again.
                self.note(format!(
                    "{name}: {origin}: {} <{}/>; rejoining",
                    error.error_type, error.condition
                ));
                Attempt::Reconnect(None)
            }
            Err(XmppError::Timeout { .. }) => {
                self.note(format!(
                    "{name}: {origin}: no reflection in time; resending"
                ));
                // Two silent attempts in a row on one session: try another session.
                if self.entries[idx].attempts.is_multiple_of(2) {
                    Attempt::Reconnect(None)
                } else {
                    Attempt::Retry
                }
            }
            Err(e) => {
                let to = redirect_target(&e);
                self.note(format!("{name}: session ended: {e}"));
                Attempt::Reconnect(to)
            }
        }
    }

    /// Writes `count` more messages, each until acknowledged.
    pub async fn write(&mut self, count: usize) -> anyhow::Result<()> {
        for _ in 0..count {
            if self.write_next().await?.is_none() {
                break;
            }
            tokio::time::sleep(self.cfg.interval).await;
        }
        Ok(())
    }

    /// Runs the writer as a background task until [`LedgerTask::stop`].
    pub fn spawn(mut self) -> LedgerTask {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (progress_tx, progress_rx) = watch::channel(Progress {
            acked: self.acked,
            server: self.acked().last().map(|(_, a)| a.server),
        });
        self.stop = Some(stop_rx);
        self.progress = Some(progress_tx);
        let handle = tokio::spawn(async move {
            let result = loop {
                match self.write_next().await {
                    Ok(Some(_)) => tokio::time::sleep(self.cfg.interval).await,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            self.stop = None;
            self.progress = None;
            if let Some((client, _)) = self.session.take() {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
            }
            (self, result)
        });
        LedgerTask {
            stop: stop_tx,
            progress: progress_rx,
            handle,
        }
    }

    /// Closes the session, if any, cleanly (bounded).
    pub async fn close(&mut self) {
        if let Some((client, _)) = self.session.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
        }
    }
}

/// A handle on a writer running in the background.
pub struct LedgerTask {
    stop: watch::Sender<bool>,
    progress: watch::Receiver<Progress>,
    handle: JoinHandle<(Ledger, anyhow::Result<()>)>,
}

impl LedgerTask {
    /// Messages acknowledged so far.
    pub fn acked(&self) -> usize {
        self.progress.borrow().acked
    }

    /// The server that carried the last acknowledgment.
    pub fn current_server(&self) -> Option<SocketAddr> {
        self.progress.borrow().server
    }

    /// Waits until at least `n` messages are acknowledged in all; fails when the writer
    /// ended (it gave up) or after `timeout`.
    pub async fn wait_acked(&mut self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let outcome = tokio::time::timeout(timeout, self.progress.wait_for(|p| p.acked >= n))
            .await
            .map(|r| r.map(drop));
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => bail!("the writer ended before {n} acknowledgments"),
            Err(_) => bail!(
                "only {} of {n} messages acknowledged after {timeout:?}",
                self.acked()
            ),
        }
    }

    /// Waits for `more` acknowledgments beyond the current count.
    pub async fn wait_more(&mut self, more: usize, timeout: Duration) -> anyhow::Result<()> {
        let n = self.acked() + more;
        self.wait_acked(n, timeout).await
    }

    /// True once the writer has ended (it stops only when told to, or when it gave up).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Tells the writer to stop after the message in hand (or between its resends) and
    /// returns its ledger, with the error that made it give up if it did (the ledger is
    /// judged all the same: what it saw acknowledged must hold).
    pub async fn stop(self) -> anyhow::Result<(Ledger, Option<String>)> {
        let _ = self.stop.send(true);
        let (ledger, result) = self
            .handle
            .await
            .map_err(|e| anyhow!("the writer task failed: {e}"))?;
        Ok((ledger, result.err().map(|e| format!("{e:#}"))))
    }
}

enum SessionError {
    Redirect(SocketAddr),
    Other(String),
}

impl From<XmppError> for SessionError {
    fn from(e: XmppError) -> SessionError {
        match redirect_target(&e) {
            Some(to) => SessionError::Redirect(to),
            None => SessionError::Other(e.to_string()),
        }
    }
}

/// The server a `see-other-host` stream error names. The test kit keeps only the error's
/// `<text/>`, which pchat writes as "… the pool is served by HOST:PORT".
fn redirect_target(e: &XmppError) -> Option<SocketAddr> {
    match e {
        XmppError::Stream {
            condition,
            text: Some(text),
        } if condition == "see-other-host" => text
            .split_whitespace()
            .last()
            .map(|t| t.trim_end_matches(['.', ',', ';']))
            .and_then(|t| t.parse().ok()),
        _ => None,
    }
}

async fn login(
    addr: SocketAddr,
    jid: &str,
    password: &str,
    remaining: Duration,
) -> Result<Client, SessionError> {
    let mut opts = ConnectOptions::new(Transport::StartTls { addr }, jid, password);
    opts.connect_timeout = remaining.min(Duration::from_secs(5));
    Client::connect(opts).await.map_err(SessionError::from)
}

/// Logs in to whichever of `servers` serves (following `see-other-host`), within `timeout`.
pub async fn login_active(
    servers: &[SocketAddr],
    jid: &str,
    password: &str,
    timeout: Duration,
) -> anyhow::Result<(Client, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    let mut redirect = None;
    loop {
        let mut queue: VecDeque<SocketAddr> = redirect
            .take()
            .into_iter()
            .chain(servers.iter().copied())
            .collect();
        let mut tried = HashSet::new();
        while let Some(addr) = queue.pop_front() {
            if !tried.insert(addr) {
                continue;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            match login(addr, jid, password, remaining).await {
                Ok(c) => return Ok((c, addr)),
                Err(SessionError::Redirect(to)) => queue.push_front(to),
                Err(SessionError::Other(e)) => last = format!("{addr}: {e}"),
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no server of {servers:?} took a session within {timeout:?}; last error: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One archived message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archived {
    /// The MAM id (-1 when it is not a number).
    pub id: i64,
    /// Its origin-id, if it has one.
    pub origin_id: Option<String>,
    /// Its body.
    pub body: Option<String>,
}

/// A room's archive as a client reads it with MAM.
#[derive(Clone, Debug)]
pub struct Archive {
    /// The room.
    pub room: String,
    /// Every message, in archive order.
    pub messages: Vec<Archived>,
}

impl Archive {
    /// Reads the whole archive of `room`, page by page, through whichever server is active.
    pub async fn read(
        servers: &[SocketAddr],
        jid: &str,
        password: &str,
        room: &str,
        timeout: Duration,
    ) -> anyhow::Result<Archive> {
        let deadline = Instant::now() + timeout;
        let (mut client, addr) = login_active(servers, jid, password, timeout).await?;
        client.set_reply_timeout(Duration::from_secs(20));
        let mut messages = Vec::new();
        let mut after = None;
        for _ in 0..100_000 {
            ensure!(
                Instant::now() < deadline,
                "reading the archive of {room} took over {timeout:?}"
            );
            let rsm = Rsm {
                max: Some(500),
                before: None,
                after: after.clone(),
            };
            let page = client
                .mam_query(room, &[], Some(rsm))
                .await
                .with_context(|| format!("MAM query of {room} through {addr}"))?;
            for r in &page.results {
                let m = forwarded_message(r);
                messages.push(Archived {
                    id: r.attr("id").and_then(|i| i.parse().ok()).unwrap_or(-1),
                    origin_id: m.and_then(origin_id),
                    body: m.and_then(Element::body),
                });
            }
            if page.complete() || page.results.is_empty() {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
                return Ok(Archive {
                    room: room.to_string(),
                    messages,
                });
            }
            after = page.last();
        }
        bail!("the archive of {room} did not end after 100,000 pages")
    }

    /// The archive ids in order.
    pub fn ids(&self) -> Vec<i64> {
        self.messages.iter().map(|m| m.id).collect()
    }

    /// I3: the ids are 1, 2, 3, … — strictly increasing, without holes.
    ///
    /// Ids come in id epochs (the stores' `IDS_PER_EPOCH`): a database made writable again
    /// from an earlier point (DR failover, restore) numbers every room from the next
    /// epoch's base. So: within an epoch 1, 2, 3… without holes; at an epoch change, the
    /// first id of a later epoch (its base + 1).
    pub fn check_order(&self) -> anyhow::Result<()> {
        let mut prev: Option<i64> = None;
        for (i, m) in self.messages.iter().enumerate() {
            let epoch_start = |id: i64| id.rem_euclid(IDS_PER_EPOCH) == 1;
            let ok = match prev {
                None => epoch_start(m.id),
                Some(p) if m.id / IDS_PER_EPOCH == p / IDS_PER_EPOCH => m.id == p + 1,
                Some(p) => m.id / IDS_PER_EPOCH > p / IDS_PER_EPOCH && epoch_start(m.id),
            };
            ensure!(
                ok,
                "I3: archive of {} has id {} at position {} after {} (ids around it: {:?})",
                self.room,
                m.id,
                i + 1,
                prev.map_or("nothing".to_owned(), |p| p.to_string()),
                &self.ids()[i.saturating_sub(3)..(i + 3).min(self.messages.len())]
            );
            prev = Some(m.id);
        }
        Ok(())
    }

    /// I4: no origin-id and no body is stored twice.
    pub fn check_unique(&self) -> anyhow::Result<()> {
        let mut origins = HashMap::new();
        let mut bodies = HashMap::new();
        for m in &self.messages {
            if let Some(o) = &m.origin_id {
                if let Some(first) = origins.insert(o.as_str(), m.id) {
                    bail!(
                        "I4: origin-id {o} stored twice, as ids {first} and {}",
                        m.id
                    );
                }
            }
            if let Some(b) = &m.body {
                if let Some(first) = bodies.insert(b.as_str(), m.id) {
                    bail!("I4: body {b:?} stored twice, as ids {first} and {}", m.id);
                }
            }
        }
        Ok(())
    }
}
