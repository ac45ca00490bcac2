//! What every scenario shares: the run context (accounts, rooms, timing origin), bounded
//! parallel logins, MUC join/leave/create, archive pre-fill, and the result record.

pub mod ack;
pub mod fanout;
pub mod history;
pub mod idle;
pub mod lync;
pub mod mam;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::conn::{Next, Reader, Session, Target, Writer};
use crate::xml;

/// The origin of every timestamp embedded in a message body. Sender and receiver live in the
/// same process, so one monotonic clock needs no synchronisation.
pub fn t0() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// Microseconds from [`t0`] to `at`.
pub fn us_at(at: Instant) -> u64 {
    at.saturating_duration_since(t0()).as_micros() as u64
}

/// Microseconds from [`t0`] to now.
pub fn now_us() -> u64 {
    us_at(Instant::now())
}

/// Everything a scenario needs to know about the server and the accounts.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Connection parameters.
    pub target: Target,
    /// Accounts are `{user_prefix}{index:05}`.
    pub user_prefix: String,
    /// Index of the first account this process uses (so several processes can share a pool).
    pub user_offset: usize,
    /// MUC service JID.
    pub muc: String,
    /// Rooms are `{room_prefix}-{n}@{muc}`; the harness makes it unique per run.
    pub room_prefix: String,
    /// Server process, for CPU and RSS.
    pub server_pid: Option<u32>,
    /// Server label for the result record.
    pub label: String,
    /// Logins in flight at once (a connection storm is not what these scenarios measure).
    pub connect_concurrency: usize,
}

impl Ctx {
    /// Account name (local part) of user `i` of this run.
    pub fn user(&self, i: usize) -> String {
        format!("{}{:05}", self.user_prefix, self.user_offset + i)
    }

    /// Bare JID of room `n`.
    pub fn room(&self, n: usize) -> String {
        format!("{}-{n}@{}", self.room_prefix, self.muc)
    }
}

/// A connected client, split, with the nick it uses in rooms (its account name).
pub struct Client {
    /// Receiving half.
    pub r: Reader,
    /// Sending half.
    pub w: Writer,
    /// Nick in every room: the account name, so it is unique per run.
    pub nick: String,
    /// Position in the run's user list.
    pub index: usize,
}

/// Logs in user `i` as `user` at `target`, with two retries.
pub async fn login_one(
    target: &crate::conn::Target,
    user: String,
    i: usize,
) -> anyhow::Result<Client> {
    let mut last = None;
    for _attempt in 0..3 {
        match Session::login(target, &user, i).await {
            Ok(s) => {
                let (r, w) = s.split();
                return Ok(Client {
                    r,
                    w,
                    nick: user,
                    index: i,
                });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .expect("three attempts")
        .context(format!("login of {user} at {}", target.addr)))
}

/// Logs in users `range` with bounded concurrency; every login must succeed (two retries),
/// because a missing occupant would silently change the expected delivery counts.
pub async fn login_all(ctx: &Ctx, range: std::ops::Range<usize>) -> anyhow::Result<Vec<Client>> {
    let sem = Arc::new(Semaphore::new(ctx.connect_concurrency.max(1)));
    let mut set = JoinSet::new();
    for i in range.clone() {
        let ctx = ctx.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let user = ctx.user(i);
            login_one(&ctx.target, user, i).await
        });
    }
    let mut clients = Vec::with_capacity(range.len());
    while let Some(res) = set.join_next().await {
        clients.push(res??);
    }
    clients.sort_by_key(|c| c.index);
    Ok(clients)
}

/// Runs `f` on every client with at most `parallel` at once, preserving order.
pub async fn for_each_client<F, Fut>(
    clients: Vec<Client>,
    parallel: usize,
    f: F,
) -> anyhow::Result<Vec<Client>>
where
    F: Fn(Client) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Client>> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(parallel.max(1)));
    let mut set = JoinSet::new();
    for c in clients {
        let sem = sem.clone();
        let f = f.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            f(c).await
        });
    }
    let mut out = Vec::new();
    while let Some(res) = set.join_next().await {
        out.push(res??);
    }
    out.sort_by_key(|c| c.index);
    Ok(out)
}

/// The join presence; `history` = `Some(n)` asks for n messages, `None` asks for none.
pub fn join_stanza(room: &str, nick: &str, history: Option<u32>) -> String {
    let h = history.unwrap_or(0);
    format!(
        "<presence to='{room}/{nick}'><x xmlns='http://jabber.org/protocol/muc'>\
         <history maxstanzas='{h}'/></x></presence>"
    )
}

/// Joins `room` and waits for our own presence (status 110). A new room (status 201) is
/// unlocked with an empty instant-room form, as XEP-0045 §10.1.2 asks. Returns whether we
/// created the room.
pub async fn join(c: &mut Client, room: &str, deadline: Instant) -> anyhow::Result<bool> {
    c.w.send(&join_stanza(room, &c.nick, None)).await?;
    let me = format!("{room}/{}", c.nick);
    let created;
    loop {
        let Some(n) = c.r.next(deadline).await? else {
            bail!("timed out joining {room}");
        };
        let Next::Elem(el) = n else {
            bail!("stream closed while joining {room}");
        };
        if xml::name(el) != b"presence" || xml::attr(el, "from") != Some(me.as_bytes()) {
            continue;
        }
        if xml::attr(el, "type") == Some(b"error") {
            bail!("join of {room} refused: {}", xml::show(el));
        }
        if xml::has_status(el, "110") {
            created = xml::has_status(el, "201");
            break;
        }
    }
    if created {
        let id = "cfg1";
        c.w.send(&format!(
            "<iq type='set' id='{id}' to='{room}'><query xmlns='http://jabber.org/protocol/muc#owner'>\
             <x xmlns='jabber:x:data' type='submit'/></query></iq>"
        ))
        .await?;
        wait_iq(&mut c.r, id, deadline)
            .await
            .with_context(|| format!("unlocking {room}"))?;
    }
    Ok(created)
}

/// Leaves `room` and waits for our own unavailable presence.
pub async fn leave(c: &mut Client, room: &str, deadline: Instant) -> anyhow::Result<()> {
    let me = format!("{room}/{}", c.nick);
    c.w.send(&format!("<presence type='unavailable' to='{me}'/>"))
        .await?;
    loop {
        let Some(Next::Elem(el)) = c.r.next(deadline).await? else {
            bail!("no unavailable presence leaving {room}");
        };
        if xml::name(el) == b"presence"
            && xml::attr(el, "from") == Some(me.as_bytes())
            && xml::attr(el, "type") == Some(b"unavailable")
        {
            return Ok(());
        }
    }
}

/// Waits for the iq reply with `id`; an error reply is an error.
pub async fn wait_iq(r: &mut Reader, id: &str, deadline: Instant) -> anyhow::Result<()> {
    loop {
        let Some(Next::Elem(el)) = r.next(deadline).await? else {
            bail!("no reply to iq {id}");
        };
        if xml::name(el) == b"iq" && xml::attr(el, "id") == Some(id.as_bytes()) {
            if xml::attr(el, "type") == Some(b"result") {
                return Ok(());
            }
            bail!("iq {id} failed: {}", xml::show(el));
        }
    }
}

/// Makes sure rooms exist, are unlocked and are empty again, using one connection of user
/// `creator`; rooms are persistent on all three servers (configured so), so they survive
/// the creator leaving.
pub async fn create_rooms(ctx: &Ctx, creator: usize, rooms: &[String]) -> anyhow::Result<()> {
    let mut c = login_all(ctx, creator..creator + 1)
        .await?
        .pop()
        .ok_or_else(|| anyhow!("no creator"))?;
    for room in rooms {
        let deadline = Instant::now() + Duration::from_secs(20);
        join(&mut c, room, deadline).await?;
        leave(&mut c, room, deadline).await?;
    }
    c.w.close().await;
    Ok(())
}

/// Sends `count` messages to a joined room, keeping `window` unacknowledged (reflection =
/// acknowledgement: all three servers archive before they reflect). Returns messages/s.
pub async fn fill_room(
    c: &mut Client,
    room: &str,
    count: usize,
    window: usize,
    deadline: Instant,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let me = format!("{room}/{}", c.nick);
    let mut sent = 0usize;
    let mut acked = 0usize;
    let mut batch = String::new();
    while acked < count {
        batch.clear();
        while sent < count && sent - acked < window.max(1) {
            batch.push_str(&format!(
                "<message to='{room}' type='groupchat' id='f{sent}'><body>{}</body></message>",
                fill_body(sent)
            ));
            sent += 1;
        }
        if !batch.is_empty() {
            c.w.send(&batch).await?;
        }
        let Some(Next::Elem(el)) = c.r.next(deadline).await? else {
            bail!("filling {room}: {acked}/{count} acknowledged before the deadline");
        };
        if xml::name(el) == b"message" && xml::attr(el, "from") == Some(me.as_bytes()) {
            match xml::attr(el, "type") {
                Some(b"groupchat") if xml::contains(el, b"<body>") => acked += 1,
                Some(b"error") => bail!("filling {room}: {}", xml::show(el)),
                _ => {}
            }
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64().max(1e-6))
}

/// Body of pre-fill message `n`: one word from a vocabulary of 100 so a full-text query
/// for a word matches 1% of the archive. Words are `kw00z`..`kw99z`: none is a substring of
/// another, so substring search (ejabberd's LIKE) and token search (FTS) agree.
pub fn fill_body(n: usize) -> String {
    format!("fill {n} {} lorem ipsum dolor sit amet", fill_word(n % 100))
}

/// Word number `k` (0..100) of the pre-fill vocabulary.
pub fn fill_word(k: usize) -> String {
    format!("kw{:02}z", k % 100)
}

/// One scenario result: `headline` holds the few numbers the harness tabulates; everything
/// else is detail for the JSON reader.
pub struct Report {
    /// Scenario name.
    pub scenario: &'static str,
    /// Headline metrics, in table order: (name, value, "higher"/"lower" is better).
    pub headline: Vec<(&'static str, Option<f64>, &'static str)>,
    /// Anything else.
    pub detail: Map<String, Value>,
}

impl Report {
    /// The JSON line.
    pub fn to_json(&self, ctx: &Ctx) -> Value {
        let mut head = Map::new();
        let mut better = Map::new();
        for (k, v, b) in &self.headline {
            head.insert((*k).into(), json!(v.map(round3)));
            better.insert((*k).into(), json!(b));
        }
        json!({
            "ok": true,
            "scenario": self.scenario,
            "server": ctx.label,
            "headline": head,
            "better": better,
            "detail": self.detail,
        })
    }

    /// The human table, one metric per line.
    pub fn to_table(&self, ctx: &Ctx) -> String {
        let mut out = format!("{} on {}\n", self.scenario, ctx.label);
        for (k, v, _) in &self.headline {
            let v = v.map_or("n/a".to_string(), |v| format!("{:.3}", round3(v)));
            out.push_str(&format!("  {k:<28} {v:>14}\n"));
        }
        out
    }
}

/// Rounds to 3 decimals, so the JSON stays readable.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Drains a reader until `stop` flips, discarding everything (idle occupants must still read,
/// or the server would buffer their presence floods and we would measure that instead).
pub async fn drain_until(
    mut r: Reader,
    stop: Arc<std::sync::atomic::AtomicBool>,
    hard_deadline: Instant,
) -> Reader {
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::Relaxed) && Instant::now() < hard_deadline {
        let tick = (Instant::now() + Duration::from_millis(200)).min(hard_deadline);
        match r.next(tick).await {
            Ok(Some(Next::Elem(_))) | Ok(None) => {}
            Ok(Some(Next::Closed)) | Err(_) => break,
        }
    }
    r
}

/// Closes every writer concurrently (a sequential close of thousands would dominate teardown).
pub async fn close_all(writers: Vec<Writer>) {
    let mut set = JoinSet::new();
    for w in writers {
        set.spawn(w.close());
    }
    while set.join_next().await.is_some() {}
}
