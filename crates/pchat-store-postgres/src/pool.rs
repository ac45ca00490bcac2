//! Connections: one [`PgConn`] per PostgreSQL session with its own prepared-statement cache,
//! and a small bounded [`Pool`] of them per database for reads.
//!
//! Why not `deadpool-postgres`: what we need is thirty lines (a semaphore, a stack of idle
//! connections, drop the broken ones), and owning them lets the store decide exactly when a
//! connection is retried after a PostgreSQL restart (only for reads, only once, only on a
//! connection that was idle; see `read_retry!` in `lib.rs`), which a general pool would
//! hide behind its own recycling policy. One dependency fewer to audit, too.

use std::collections::HashMap;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures_util::Stream;
use pchat_store::StoreError;
use pchat_tls::postgres::MakeRustlsConnect;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Row, Statement};

use crate::error::Result;
use crate::Password;

/// What a session's connection delivers besides query results (notifications, notices);
/// polling it drives the connection.
pub(crate) type Messages =
    Pin<Box<dyn Stream<Item = std::result::Result<AsyncMessage, tokio_postgres::Error>> + Send>>;

/// Statements kept per connection before the cache is emptied. Our SQL is a fixed set plus
/// the archive query's filter combinations (a few dozen), so this is never reached in
/// practice; it only bounds memory if that ever changes.
const STATEMENT_CACHE_MAX: usize = 256;

/// Session settings applied to every connection.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    /// Which database, for messages (`mgc` or `mgccomp`).
    pub(crate) name: &'static str,
    pub(crate) config: Config,
    /// `statement_timeout`, and also `idle_in_transaction_session_timeout`: a writer that
    /// stops mid-transaction (SIGSTOP, a hung host) must not hold its room locks forever
    /// against the other servers of the pool.
    pub(crate) statement_timeout_ms: u64,
    /// Longest a new connection (socket, TLS, login and session settings) or one read may
    /// take, measured here: a server that stopped answering (frozen, its host hung, packets
    /// dropped) cannot cancel anything itself, so `statement_timeout` never fires there.
    pub(crate) query_timeout: Duration,
    /// TLS that verifies the server against the pool's CA and the connection's `host`;
    /// `None`: no TLS (a unix socket, or an insecure pool).
    pub(crate) tls: Option<MakeRustlsConnect>,
    /// Where the password comes from, asked at every new connection.
    pub(crate) password: Password,
}

impl Session {
    /// Parses a connection string and fills in what we rely on when it is missing.
    pub(crate) fn new(
        name: &'static str,
        conn: &str,
        statement_timeout_ms: u64,
        query_timeout_ms: u64,
        tls: Option<MakeRustlsConnect>,
        password: Password,
    ) -> std::result::Result<Session, StoreError> {
        let mut config: Config = conn.parse().map_err(|e| {
            StoreError::Invalid(format!("the {name} connection string is invalid: {e}"))
        })?;
        if config.get_password().is_some() {
            // A password in a connection string ends up in logs and `ps`; it comes from
            // `PostgresOptions::password` only.
            return Err(StoreError::Invalid(format!(
                "the {name} connection string holds a password: give it as the options' password instead"
            )));
        }
        if tls.is_some() {
            // Never fall back to plaintext: a man in the middle could otherwise answer
            // "no SSL" and read everything.
            config.ssl_mode(SslMode::Require);
        }
        if config.get_application_name().is_none() {
            config.application_name("pchat");
        }
        // Without a connect timeout a black-holed server would stall callers for minutes
        // (the kernel's SYN retries) instead of failing them as unavailable.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_millis(
                statement_timeout_ms.clamp(1_000, 10_000),
            ));
        }
        // A peer that vanished without a word (host lost, cable cut) is found by the kernel
        // rather than by the next caller's timeout: probes after 5 s of silence, every 2 s,
        // three unanswered ones end the connection; and data sent but unacknowledged for the
        // query timeout ends it too. (A frozen server's kernel still answers both: only our
        // own timeouts catch that.)
        config.keepalives_idle(Duration::from_secs(5));
        config.keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
        config.tcp_user_timeout(Duration::from_millis(query_timeout_ms.max(1_000)));
        Ok(Session {
            name,
            config,
            statement_timeout_ms,
            query_timeout: Duration::from_millis(query_timeout_ms),
            tls,
            password,
        })
    }

    /// The configuration with this connection's password filled in.
    async fn config_now(&self) -> std::result::Result<Config, StoreError> {
        let mut config = self.config.clone();
        if let Some(pw) = self.password.get().await.map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot get the password of database {}: {e}",
                self.name
            ))
        })? {
            config.password(pw);
        }
        Ok(config)
    }

    /// A new connection and the stream that drives it (and carries its notifications).
    pub(crate) async fn open(&self) -> Result<(Client, Messages)> {
        let config = self.config_now().await?;
        Ok(match &self.tls {
            None => {
                let (client, mut conn) = config.connect(NoTls).await?;
                let messages: Messages = Box::pin(futures_util::stream::poll_fn(move |cx| {
                    conn.poll_message(cx)
                }));
                (client, messages)
            }
            Some(tls) => {
                let (client, mut conn) = config.connect(tls.clone()).await?;
                let messages: Messages = Box::pin(futures_util::stream::poll_fn(move |cx| {
                    conn.poll_message(cx)
                }));
                (client, messages)
            }
        })
    }

    /// A new connection driven by its own task until the client is dropped.
    pub(crate) async fn client(&self) -> Result<Client> {
        use futures_util::StreamExt as _;
        let (client, mut messages) = self.open().await?;
        let name = self.name;
        tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                if let Err(e) = m {
                    tracing::debug!(database = name, error = %e, "PostgreSQL connection ended");
                    break;
                }
            }
        });
        Ok(client)
    }
}

/// One PostgreSQL session and its prepared statements.
pub(crate) struct PgConn {
    client: Client,
    statements: HashMap<String, Statement>,
    /// Marked at every answer, when someone watches this session's progress.
    answered: Option<Answered>,
}

/// When a watched session last got an answer from the database: what tells a slow database
/// (or a slow link to it), which answers every statement late, from a hung one, which
/// answers none. Cheap to clone; the clones share the mark.
#[derive(Clone, Debug)]
pub(crate) struct Answered {
    epoch: std::time::Instant,
    /// Milliseconds since `epoch` of the last answer.
    at_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Answered {
    pub(crate) fn new() -> Answered {
        Answered {
            epoch: std::time::Instant::now(),
            at_ms: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// An answer came now.
    pub(crate) fn mark(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.at_ms
            .fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// When the last answer came.
    pub(crate) fn last(&self) -> std::time::Instant {
        self.epoch + Duration::from_millis(self.at_ms.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl PgConn {
    /// Opens a session (TLS as the options say: see the crate docs) and drives it on a
    /// tokio task; within the session's query timeout, or unavailable. (tokio-postgres's own
    /// connect timeout covers only the socket's connect: a frozen server's kernel accepts
    /// it, and the TLS handshake and the login would then wait for ever.)
    pub(crate) async fn connect(session: &Session) -> Result<PgConn> {
        match tokio::time::timeout(session.query_timeout, Self::connect_unbounded(session)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "database {}: no session within {} ms (the server does not answer)",
                session.name,
                session.query_timeout.as_millis()
            ))
            .into()),
        }
    }

    async fn connect_unbounded(session: &Session) -> Result<PgConn> {
        let client = session.client().await?;
        let ms = session.statement_timeout_ms;
        client
            .batch_execute(&format!(
                "SET statement_timeout = {ms}; SET idle_in_transaction_session_timeout = {ms}"
            ))
            .await?;
        Ok(PgConn {
            client,
            statements: HashMap::new(),
            answered: None,
        })
    }

    /// This session marks `answered` at every answer it gets (an error is an answer too).
    pub(crate) fn watched(mut self, answered: Answered) -> PgConn {
        answered.mark();
        self.answered = Some(answered);
        self
    }

    fn mark(&self) {
        if let Some(a) = &self.answered {
            a.mark();
        }
    }

    /// True once the session is known to be gone; it is then never used again.
    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn statement(&mut self, sql: &str) -> Result<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await;
        self.mark();
        let statement = statement?;
        if self.statements.len() >= STATEMENT_CACHE_MAX {
            self.statements.clear();
        }
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    /// Runs a (cached, prepared) statement and returns its rows.
    pub(crate) async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let statement = self.statement(sql).await?;
        let answer = self.client.query(&statement, params).await;
        self.mark();
        Ok(answer?)
    }

    /// Runs a statement that returns at most one row.
    pub(crate) async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let statement = self.statement(sql).await?;
        let answer = self.client.query_opt(&statement, params).await;
        self.mark();
        Ok(answer?)
    }

    /// Runs a statement that returns exactly one row.
    pub(crate) async fn query_one(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row> {
        let statement = self.statement(sql).await?;
        let answer = self.client.query_one(&statement, params).await;
        self.mark();
        Ok(answer?)
    }

    /// Runs a statement and returns how many rows it changed.
    pub(crate) async fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let statement = self.statement(sql).await?;
        let answer = self.client.execute(&statement, params).await;
        self.mark();
        Ok(answer?)
    }

    /// Sends every step before reading any answer, and returns each step's rows in order:
    /// one round trip to the database for all of them instead of one each (uncached
    /// statements are prepared first, together: one more). PostgreSQL still runs them one
    /// after the other, in order, so a step sees what the earlier ones did; inside a
    /// transaction an error aborts it and the later steps fail too. The first error in
    /// step order is returned, once every answer is in (the session is then idle again).
    pub(crate) async fn pipeline(&mut self, steps: &[Step<'_>]) -> Result<Vec<Vec<Row>>> {
        self.pipeline_each(steps).await?.into_iter().collect()
    }

    /// [`PgConn::pipeline`], with each step's own answer (the error is the preparing's).
    pub(crate) async fn pipeline_each(
        &mut self,
        steps: &[Step<'_>],
    ) -> Result<Vec<Result<Vec<Row>>>> {
        let mut missing: Vec<&str> = steps
            .iter()
            .filter_map(|step| match step {
                Step::Query(sql, _) if !self.statements.contains_key(*sql) => Some(*sql),
                _ => None,
            })
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            let client = &self.client;
            let prepared =
                futures_util::future::join_all(missing.iter().map(|sql| client.prepare(sql))).await;
            self.mark();
            if self.statements.len() + missing.len() > STATEMENT_CACHE_MAX {
                self.statements.clear();
            }
            for (sql, statement) in missing.into_iter().zip(prepared) {
                self.statements.insert(sql.to_string(), statement?);
            }
        }
        let client = &self.client;
        let answered = self.answered.clone();
        let mut answers: Vec<_> = steps
            .iter()
            .map(|step| {
                let statement = match step {
                    Step::Query(sql, _) => self.statements.get(*sql).cloned(),
                    Step::Simple(_) => None,
                };
                let answered = answered.clone();
                futures_util::future::maybe_done(Box::pin(async move {
                    let answer = match (step, statement) {
                        (Step::Query(_, params), Some(statement)) => {
                            client.query(&statement, params).await
                        }
                        (Step::Simple(sql), _) => {
                            client.batch_execute(sql).await.map(|()| Vec::new())
                        }
                        // Cached just above: an empty cache here is our own bug.
                        (Step::Query(sql, _), None) => {
                            return Err(StoreError::Unavailable(format!(
                                "statement not prepared: {sql}"
                            ))
                            .into())
                        }
                    };
                    if let Some(a) = &answered {
                        a.mark();
                    }
                    Ok::<_, crate::error::Error>(answer?)
                }))
            })
            .collect();
        // Each request goes out at its future's first poll: poll them in step order, every
        // time, so the requests leave in order (a general join may rotate its start).
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for answer in &mut answers {
                pending |= Pin::new(answer).poll(cx).is_pending();
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        Ok(answers
            .iter_mut()
            .map(|answer| {
                Pin::new(answer).take_output().unwrap_or_else(|| {
                    Err(
                        StoreError::Unavailable("a pipelined statement gave no answer".into())
                            .into(),
                    )
                })
            })
            .collect())
    }

    /// Runs parameterless SQL (transaction control, migrations) with the simple protocol.
    pub(crate) async fn batch(&self, sql: &str) -> Result<()> {
        let answer = self.client.batch_execute(sql).await;
        self.mark();
        Ok(answer?)
    }
}

/// One statement of a [`PgConn::pipeline`].
pub(crate) enum Step<'a> {
    /// Parameterless SQL with the simple protocol (transaction control); no rows.
    Simple(&'static str),
    /// A (cached, prepared) statement and its parameters.
    Query(&'a str, &'a [&'a (dyn ToSql + Sync)]),
}

/// A bounded pool of sessions to one database: at most `size` in use at once, opened on
/// demand, broken ones dropped.
pub(crate) struct Pool {
    session: Session,
    idle: Mutex<Vec<PgConn>>,
    permits: Semaphore,
}

impl Pool {
    /// The session settings the pool connects with.
    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    pub(crate) fn new(session: Session, size: usize) -> Pool {
        Pool {
            session,
            idle: Mutex::new(Vec::with_capacity(size)),
            permits: Semaphore::new(size),
        }
    }

    /// A session: an idle one that still looks alive, else a new one.
    pub(crate) async fn get(&self) -> Result<Pooled<'_>> {
        let permit = self.permits.acquire().await.map_err(|_| {
            StoreError::Unavailable(format!("the {} pool is closed", self.session.name))
        })?;
        loop {
            let idle = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match idle {
                Some(conn) if conn.is_closed() => continue,
                Some(conn) => {
                    return Ok(Pooled {
                        conn: Some(conn),
                        reused: true,
                        finished: false,
                        pool: self,
                        _permit: permit,
                    })
                }
                None => break,
            }
        }
        let conn = PgConn::connect(&self.session).await?;
        Ok(Pooled {
            conn: Some(conn),
            reused: false,
            finished: false,
            pool: self,
            _permit: permit,
        })
    }

    /// Closes the idle sessions and refuses new ones.
    pub(crate) fn close(&self) {
        self.permits.close();
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// A session borrowed from a [`Pool`]; it goes back when dropped, unless broken or left in
/// the middle of a call.
pub(crate) struct Pooled<'a> {
    conn: Option<PgConn>,
    /// It was idle in the pool: it may have died unnoticed (say, PostgreSQL restarted).
    reused: bool,
    /// The call made on it returned ([`Pooled::finish`]). A call abandoned at a timeout
    /// leaves its answer still to come: the next caller would wait behind it.
    finished: bool,
    pool: &'a Pool,
    _permit: SemaphorePermit<'a>,
}

impl Pooled<'_> {
    /// Whether this session was taken from the idle stack rather than freshly opened.
    pub(crate) fn reused(&self) -> bool {
        self.reused
    }

    /// Throws the session away instead of returning it to the pool.
    pub(crate) fn discard(mut self) {
        self.conn = None;
    }

    /// The call made on it has returned: the session may serve the next caller.
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl std::ops::Deref for Pooled<'_> {
    type Target = PgConn;
    fn deref(&self) -> &PgConn {
        // Only `discard` (which consumes self) and `drop` empty it.
        self.conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("a discarded session was used"))
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut PgConn {
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("a discarded session was used"))
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.finished && !conn.is_closed() && !self.pool.permits.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(conn);
            }
        }
    }
}
