//! The management shell's way into a running standalone server: a Unix socket in the data
//! directory (`admin.sock`, mode 0600, in the 0700 directory), answered only for the user
//! the server runs as (or root, checked with `SO_PEERCRED`).
//!
//! Room records are changed by the server's own store writer (which keeps the rooms' state:
//! revisions, sequence numbers), so the shell never writes them behind it. A change reaches
//! the loaded room at once, which applies it to its occupants as it would a change another
//! server of a pool made: whoever may no longer stay is removed and told why. The directory
//! (walls, groups) is written by the shell itself (the writer keeps nothing of it) and the
//! server is told to read it now rather than at its next look.
//!
//! One JSON request per connection, one JSON answer; both bounded in bytes and time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pchat_room::{NewComplianceEvent, RoomRecord};
use pchat_store::{StoreError, Write, WriteOutcome};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::state::State;

/// The socket's name in the data directory.
pub const SOCKET: &str = "admin.sock";
/// Largest request accepted (a room record with a large member list fits many times).
const REQUEST_BYTES_MAX: u64 = 4 << 20;
/// Longest a client may take to send its request, and the server to answer it.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// One change the shell asks for.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminWrite {
    /// Save a room record; with `revision`, only if the stored one is still at it (0: only
    /// if the room does not exist).
    PutRoom {
        /// The record (boxed: it is far larger than the other writes).
        record: Box<RoomRecord>,
        /// The revision it replaces.
        revision: Option<i64>,
    },
    /// Delete a room and its archive (compliance keeps its events).
    DeleteRoom {
        /// Bare room JID.
        room: String,
    },
    /// Replace an archived message (see [`Write::RemoveMessage`]).
    RemoveMessage {
        /// Bare room JID.
        room: String,
        /// Its id.
        seq: i64,
        /// The tombstone or replacement stanza.
        stanza: String,
        /// Its body, if any.
        body: Option<String>,
    },
    /// Delete a room's messages from before a time (see [`Write::ClearHistory`]).
    ClearHistory {
        /// Bare room JID.
        room: String,
        /// Messages before this go.
        before: pchat_room::Timestamp,
    },
    /// Tell the room's occupants (and, in a pool, the other servers') once it commits.
    Announce {
        /// Bare room JID.
        room: String,
        /// What to tell.
        event: pchat_room::RoomEvent,
    },
    /// Record a compliance event (who changed what, from the shell).
    Compliance(NewComplianceEvent),
}

impl AdminWrite {
    /// The store write it is.
    pub fn into_write(self) -> Write {
        match self {
            AdminWrite::PutRoom { record, revision } => match revision {
                Some(revision) => Write::PutRoomIf {
                    record: *record,
                    revision,
                },
                None => Write::PutRoom(*record),
            },
            AdminWrite::DeleteRoom { room } => Write::DeleteRoom { room },
            AdminWrite::RemoveMessage {
                room,
                seq,
                stanza,
                body,
            } => Write::RemoveMessage {
                room,
                seq,
                stanza,
                body,
            },
            AdminWrite::ClearHistory { room, before } => Write::ClearHistory { room, before },
            AdminWrite::Announce { room, event } => Write::Announce { room, event },
            AdminWrite::Compliance(e) => Write::Compliance(e),
        }
    }
}

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRequest {
    /// Commit these writes in one batch.
    Commit(Vec<AdminWrite>),
    /// Read the directory now (the shell just changed it).
    DirectoryChanged,
    /// Deliver these invitations (message stanzas, `to` the invitee) now, or keep them for
    /// their invitees' next login.
    Invite(Vec<String>),
}

/// What went wrong, in the store's terms.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminError {
    /// See [`StoreError::Conflict`].
    Conflict(String),
    /// See [`StoreError::Invalid`].
    Invalid(String),
    /// See [`StoreError::Unavailable`].
    Unavailable(String),
    /// See [`StoreError::Corrupt`].
    Corrupt(String),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => AdminError::Conflict(m),
            StoreError::Invalid(m) => AdminError::Invalid(m),
            StoreError::Unavailable(m) => AdminError::Unavailable(m),
            StoreError::Corrupt(m) => AdminError::Corrupt(m),
        }
    }
}

impl From<AdminError> for StoreError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Conflict(m) => StoreError::Conflict(m),
            AdminError::Invalid(m) => StoreError::Invalid(m),
            AdminError::Unavailable(m) => StoreError::Unavailable(m),
            AdminError::Corrupt(m) => StoreError::Corrupt(m),
        }
    }
}

/// What each write did, in the order of the writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdminAnswer {
    /// Per write: the record's new revision for a save, `None` otherwise.
    pub revisions: Vec<Option<i64>>,
    /// Per write: messages removed or replaced, 0 for other writes.
    #[serde(default)]
    pub removed: Vec<u64>,
}

/// What a commit did, per write: [`AdminAnswer`]'s two lists.
pub type Outcomes = (Vec<Option<i64>>, Vec<u64>);

/// The answer for these outcomes.
pub fn outcomes(out: &[WriteOutcome]) -> Outcomes {
    (
        out.iter()
            .map(|o| match o {
                WriteOutcome::Saved { revision } => Some(*revision),
                _ => None,
            })
            .collect(),
        out.iter()
            .map(|o| match o {
                WriteOutcome::Removed { messages } => *messages,
                _ => 0,
            })
            .collect(),
    )
}

/// Binds the socket (replacing a stale one: the caller holds the data-directory lock, so no
/// other server is listening on it) with mode 0600.
pub fn bind(dir: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(SOCKET);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers the shell until the server shuts down.
pub async fn serve(state: Arc<State>, listener: UnixListener) {
    let mut shutdown = state.shutdown.subscribe();
    // The socket file is ours: its owner is the user this server runs as.
    let me = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = shutdown.recv() => return,
        };
        let (stream, _) = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "admin socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if uid.is_none() || (uid != me && uid != Some(0)) {
            warn!(?uid, "admin socket: refused a connection from another user");
            continue;
        }
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(IO_TIMEOUT, answer(&state, stream)).await {
                debug!(error = %e, "admin socket: a client took too long");
            }
        });
    }
}

async fn answer(state: &State, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(REQUEST_BYTES_MAX));
    let reply = match reader.read_line(&mut line).await {
        Ok(_) if line.ends_with('\n') => match serde_json::from_str::<AdminRequest>(&line) {
            Ok(req) => execute(state, req).await,
            Err(e) => Err(AdminError::Invalid(format!("not a request: {e}"))),
        },
        Ok(_) => Err(AdminError::Invalid(format!(
            "the request is incomplete or larger than {REQUEST_BYTES_MAX} bytes"
        ))),
        Err(e) => Err(AdminError::Invalid(format!("cannot read the request: {e}"))),
    };
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "null".into());
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
}

async fn execute(state: &State, req: AdminRequest) -> Result<AdminAnswer, AdminError> {
    let Some(serving) = state.serving() else {
        return Err(AdminError::Unavailable("the server is not serving".into()));
    };
    match req {
        AdminRequest::DirectoryChanged => {
            serving.muc.reload_directory().await?;
            Ok(AdminAnswer {
                revisions: Vec::new(),
                removed: Vec::new(),
            })
        }
        AdminRequest::Invite(stanzas) => {
            for text in stanzas {
                let el = pchat_xmpp::Element::parse(text.as_bytes(), pchat_xmpp::ns::CLIENT)
                    .map_err(|e| AdminError::Invalid(format!("not a stanza: {e}")))?;
                serving.muc.deliver_or_keep(el).await;
            }
            Ok(AdminAnswer {
                revisions: Vec::new(),
                removed: Vec::new(),
            })
        }
        AdminRequest::Commit(writes) => {
            let mut rooms = Vec::new();
            let mut events = Vec::new();
            for w in &writes {
                match w {
                    AdminWrite::PutRoom { record, .. } => rooms.push(record.jid.clone()),
                    AdminWrite::DeleteRoom { room } => rooms.push(room.clone()),
                    AdminWrite::Announce { room, event } => {
                        events.push((room.clone(), event.clone()))
                    }
                    _ => {}
                }
            }
            let writes: Vec<Write> = writes.into_iter().map(AdminWrite::into_write).collect();
            let out = serving.store.commit(writes).await?;
            for room in rooms {
                serving.muc.record_changed(&room).await;
            }
            // A standalone store keeps no announcements: the loaded room is told here.
            for (room, event) in events {
                serving.muc.deliver_event(&room, event).await;
            }
            let (revisions, removed) = outcomes(&out);
            Ok(AdminAnswer { revisions, removed })
        }
    }
}

/// The shell's side: `None` when no server answers on the data directory's socket.
pub struct AdminClient {
    path: PathBuf,
}

impl AdminClient {
    /// Connects to the server of `dir` if one runs there (a socket left by a server that
    /// stopped refuses the connection: no server).
    pub async fn find(dir: &Path) -> Option<AdminClient> {
        let path = dir.join(SOCKET);
        UnixStream::connect(&path).await.ok()?;
        Some(AdminClient { path })
    }

    async fn call(&self, req: &AdminRequest) -> Result<AdminAnswer, StoreError> {
        let work = async {
            let mut stream = UnixStream::connect(&self.path).await.map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot reach the server at {}: {e}",
                    self.path.display()
                ))
            })?;
            let mut text = serde_json::to_string(req)
                .map_err(|e| StoreError::Invalid(format!("cannot encode the request: {e}")))?;
            text.push('\n');
            stream
                .write_all(text.as_bytes())
                .await
                .map_err(|e| StoreError::Unavailable(format!("sending to the server: {e}")))?;
            let mut answer = String::new();
            BufReader::new(stream.take(REQUEST_BYTES_MAX))
                .read_line(&mut answer)
                .await
                .map_err(|e| {
                    StoreError::Unavailable(format!("reading the server's answer: {e}"))
                })?;
            let reply: Result<AdminAnswer, AdminError> =
                serde_json::from_str(&answer).map_err(|e| {
                    StoreError::Unavailable(format!(
                        "the server's answer cannot be read ({e}); is it the same pchat version?"
                    ))
                })?;
            reply.map_err(StoreError::from)
        };
        tokio::time::timeout(IO_TIMEOUT, work)
            .await
            .map_err(|_| StoreError::Unavailable("the server did not answer in 30 s".into()))?
    }

    /// Commits writes through the server; answers what each did.
    pub async fn commit(&self, writes: Vec<AdminWrite>) -> Result<Outcomes, StoreError> {
        let a = self.call(&AdminRequest::Commit(writes)).await?;
        Ok((a.revisions, a.removed))
    }

    /// Has the server deliver invitations now (or keep them for the next login).
    pub async fn invite(&self, stanzas: Vec<String>) -> Result<(), StoreError> {
        self.call(&AdminRequest::Invite(stanzas)).await.map(|_| ())
    }

    /// Tells the server to read the directory now.
    pub async fn directory_changed(&self) -> Result<(), StoreError> {
        self.call(&AdminRequest::DirectoryChanged).await.map(|_| ())
    }
}
