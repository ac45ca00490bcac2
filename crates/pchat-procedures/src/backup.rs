//! Full backups and restores (SQL Server's `BACKUP DATABASE … WITH NAME, DESCRIPTION` and
//! `RESTORE … WITH REPLACE, RECOVERY | NORECOVERY`), for both deployment modes:
//!
//! - **pool**: the agent runs `pg_basebackup` of its instance into `SHARE/NAME/data/` and
//!   restores such a directory over its data directory (`pchat-agent`'s `instance`), with the
//!   functions of this module;
//! - **standalone**: [`backup_sqlite`] copies `mgc.db` and `mgccomp.db` with SQLite's online
//!   backup API while the server keeps running; [`restore_sqlite`] puts them back while the
//!   server is stopped.
//!
//! Every backup set is a directory `SHARE/NAME/` with a `manifest.json` ([`Manifest`], a type
//! of the agent's API since a backup job answers with it): name, description, time, source,
//! LSN (pool mode), and every file with its size and SHA-256.
//!
//! Safety rules, each with a test:
//! - a backup is written under `NAME.partial` and renamed to `NAME` only once complete, with
//!   its manifest; re-running an interrupted backup starts that directory afresh;
//! - a restore verifies every file against the manifest (and refuses unknown files) *before*
//!   it stops or replaces anything, then copies into a temporary name, checking the hashes
//!   again while copying, and swaps at the end; re-running an interrupted restore is safe;
//! - a restore refuses to replace a non-empty database without `overwrite`.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use pchat_agent_api::backup::{BackupKind, FileEntry, Manifest, MANIFEST_FILE, MANIFEST_FORMAT};
use pchat_store::StoreError;
use pchat_store_sqlite::{copy_online, lock_data_dir, LockError, MGCCOMP_FILE, MGC_FILE};
use sha2::{Digest as _, Sha256};

/// The standalone databases, in backup order.
pub const SQLITE_FILES: [&str; 2] = [MGC_FILE, MGCCOMP_FILE];
/// SQL Server's limit on a backup set's name.
pub const NAME_CHARS_MAX: usize = 128;
/// SQL Server's limit on a backup set's description.
pub const DESCRIPTION_CHARS_MAX: usize = 255;
/// Copy and hash in chunks of this size.
const CHUNK_BYTES: usize = 256 * 1024;
/// Mode of every directory of a backup set or a restore: it holds every message.
const DIR_MODE: u32 = 0o700;
/// Mode of every file of a backup set or a restore.
const FILE_MODE: u32 = 0o600;

/// Creates directory `path` with mode 0700 from the start: made wider and narrowed after,
/// another user could step in between (under umask 000) and plant a file or a link in it.
fn private_dir(path: &Path, recursive: bool) -> Result<(), BackupError> {
    DirBuilder::new()
        .recursive(recursive)
        .mode(DIR_MODE)
        .create(path)
        .map_err(io(format!("creating {}", path.display())))
}

/// Creates the new file `path` (never an existing one, nor through a link) with mode 0600.
fn private_file(path: &Path) -> Result<File, BackupError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))
}

/// Why a backup or restore failed. Nothing was changed unless the message says so.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A name, description or option is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A backup set of that name already exists.
    #[error("{0}")]
    Exists(String),
    /// No backup (or no database) where one was expected.
    #[error("{0}")]
    NotFound(String),
    /// The backup does not match its manifest: never restored.
    #[error("backup {backup} is damaged: {detail}; nothing was changed — use another backup set")]
    Corrupt {
        /// The backup set.
        backup: String,
        /// Which file, and how it differs.
        detail: String,
    },
    /// A standalone server holds the data directory.
    #[error("a pchat server is running on {0} (it holds pchat.lock): stop the server first, then restore")]
    ServerRunning(PathBuf),
    /// The operation would destroy data the caller did not agree to lose.
    #[error("{0}")]
    Refused(String),
    /// File I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The SQLite store refused (its lock, its online copy).
    #[error("SQLite: {0}")]
    Store(#[from] StoreError),
    /// A file in a directory another user owns could not be used safely (a link where a
    /// file belongs, or its I/O failed).
    #[error(transparent)]
    Unsafe(#[from] pchat_tls::TlsError),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Io { context, source }
}

/// Progress of a long step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The step, in words.
    pub step: String,
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in the step (0: unknown).
    pub total_bytes: u64,
}

impl Progress {
    /// Percent done, when the total is known.
    pub fn percent(&self) -> Option<u8> {
        (self.total_bytes > 0)
            .then(|| (self.done_bytes.min(self.total_bytes) * 100 / self.total_bytes) as u8)
    }
}

/// Receives progress.
pub type ProgressFn<'a> = &'a mut dyn FnMut(&Progress);

/// Checks a backup set's name: it becomes a directory name on the share.
pub fn validate_name(name: &str) -> Result<(), BackupError> {
    let ok = !name.is_empty()
        && name.chars().count() <= NAME_CHARS_MAX
        && !name.starts_with('.')
        && !name.ends_with(".partial")
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '@'));
    if ok {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!(
            "backup name `{name}`: use 1-{NAME_CHARS_MAX} letters, digits and - _ . + @ (it becomes a directory name), not starting with `.` nor ending in `.partial`"
        )))
    }
}

/// Checks a description's length.
pub fn validate_description(description: &str) -> Result<(), BackupError> {
    if description.chars().count() > DESCRIPTION_CHARS_MAX {
        return Err(BackupError::Invalid(format!(
            "the description has {} characters; at most {DESCRIPTION_CHARS_MAX} are kept",
            description.chars().count()
        )));
    }
    Ok(())
}

/// The final and the temporary directory of a new backup set in `to`. Refuses an existing
/// set (backups are never overwritten) and clears what an interrupted run left behind.
pub fn prepare_target(to: &Path, name: &str) -> Result<(PathBuf, PathBuf), BackupError> {
    validate_name(name)?;
    if !to.is_dir() {
        return Err(BackupError::NotFound(format!(
            "the backup destination {} is not a directory (is the share mounted?)",
            to.display()
        )));
    }
    let target = to.join(name);
    if target.exists() {
        return Err(BackupError::Exists(format!(
            "backup set {} already exists: choose another --name, or remove it first",
            target.display()
        )));
    }
    let partial = to.join(format!("{name}.partial"));
    remove_dir_if_exists(&partial)?;
    Ok((target, partial))
}

fn remove_dir_if_exists(path: &Path) -> Result<(), BackupError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("removing {}", path.display()))(e)),
    }
}

fn fsync_dir(path: &Path) -> Result<(), BackupError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing directory {}", path.display())))
}

/// Writes the manifest into `partial` and renames it to `target`: from then on the set exists.
///
/// `partial` belongs to the database's OS user while `pg_basebackup` writes into it, so the
/// manifest is written through the directory's descriptor under a fresh name and renamed
/// into place: a link that user planted as `manifest.json` is replaced, never written
/// through.
pub fn finish(partial: &Path, target: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let json = serde_json::to_vec_pretty(manifest)
        .map_err(|e| BackupError::Invalid(format!("manifest: {e}")))?;
    pchat_tls::dir::Dir::open(partial)?.write(MANIFEST_FILE, &json, FILE_MODE, None)?;
    std::fs::rename(partial, target).map_err(io(format!(
        "renaming {} to {}",
        partial.display(),
        target.display()
    )))?;
    if let Some(parent) = target.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// `START WAL LOCATION` and `START TIMELINE` from a `backup_label`.
pub fn parse_backup_label(text: &str) -> (Option<String>, Option<u32>) {
    let mut lsn = None;
    let mut tli = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("START WAL LOCATION:") {
            lsn = rest.split_whitespace().next().map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("START TIMELINE:") {
            tli = rest.trim().parse().ok();
        }
    }
    (lsn, tli)
}

/// The last `End-LSN` of `WAL-Ranges` in PostgreSQL's own `backup_manifest`.
pub fn parse_pg_manifest_end_lsn(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get("WAL-Ranges")?
        .as_array()?
        .last()?
        .get("End-LSN")?
        .as_str()
        .map(str::to_owned)
}

/// Lists a directory tree: directories and files (not `manifest.json` at the top), sorted,
/// `/`-separated. Symbolic links are refused: a backup must hold the data itself.
/// Directories and (file, size) pairs of a tree.
type Listing = (Vec<String>, Vec<(String, u64)>);

fn list_tree(root: &Path) -> Result<Listing, BackupError> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(io(format!("reading {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(io(format!("reading {}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::symlink_metadata(entry.path())
                .map_err(io(format!("reading {}", entry.path().display())))?;
            if meta.file_type().is_symlink() {
                return Err(BackupError::Invalid(format!(
                    "{} is a symbolic link; backups hold plain files only",
                    entry.path().display()
                )));
            } else if meta.is_dir() {
                dirs.push(path.clone());
                stack.push((entry.path(), path));
            } else if !(rel.is_empty() && name == MANIFEST_FILE) {
                files.push((path, meta.len()));
            }
        }
    }
    dirs.sort();
    files.sort();
    Ok((dirs, files))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reports progress at most every 1% or 16 MiB, so a progress line is never the bottleneck.
struct Ticker<'a, 'b> {
    sink: &'a mut (dyn FnMut(&Progress) + 'b),
    step: String,
    done: u64,
    total: u64,
    last: u64,
}

impl Ticker<'_, '_> {
    fn add(&mut self, n: u64) {
        self.done += n;
        let every = (self.total / 100).max(16 << 20);
        if self.done - self.last >= every || self.done == self.total {
            self.last = self.done;
            (self.sink)(&Progress {
                step: self.step.clone(),
                done_bytes: self.done,
                total_bytes: self.total,
            });
        }
    }
}

/// Opens a file to read it, refusing a link (a file of a backup set is a plain file; a link
/// swapped in after the listing must not make root read another file).
fn open_nofollow(path: &Path) -> Result<File, BackupError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    const O_NOFOLLOW: i32 = 0o400000;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW)
        .open(path)
        .map_err(io(format!(
            "opening {} (a plain file, not a link)",
            path.display()
        )))
}

fn hash_file(path: &Path, ticker: &mut Ticker<'_, '_>) -> Result<(u64, String), BackupError> {
    let mut f = open_nofollow(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut n_total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        n_total += n as u64;
        ticker.add(n as u64);
    }
    Ok((n_total, hex(&h.finalize())))
}

/// Hashes every file under `root` (a backup set being written).
pub fn hash_tree(
    root: &Path,
    progress: ProgressFn<'_>,
) -> Result<(Vec<String>, Vec<FileEntry>), BackupError> {
    let (dirs, listed) = list_tree(root)?;
    let total = listed.iter().map(|(_, b)| b).sum();
    let mut ticker = Ticker {
        sink: progress,
        step: "computing checksums".into(),
        done: 0,
        total,
        last: 0,
    };
    let mut files = Vec::with_capacity(listed.len());
    for (path, _) in listed {
        let (bytes, sha256) = hash_file(&root.join(&path), &mut ticker)?;
        files.push(FileEntry {
            path,
            bytes,
            sha256,
        });
    }
    Ok((dirs, files))
}

/// Reads a backup set's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest, BackupError> {
    let path = dir.join(MANIFEST_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let partial = PathBuf::from(format!("{}.partial", dir.display()));
            return Err(if partial.exists() {
                BackupError::NotFound(format!(
                    "backup {} was never finished (only {} exists): take the backup again",
                    dir.display(),
                    partial.display()
                ))
            } else {
                BackupError::NotFound(format!(
                    "no backup set at {} (no {MANIFEST_FILE})",
                    dir.display()
                ))
            });
        }
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| BackupError::Corrupt {
        backup: dir.display().to_string(),
        detail: format!("{MANIFEST_FILE} is unreadable ({e})"),
    })?;
    if m.format != MANIFEST_FORMAT {
        return Err(BackupError::Invalid(format!(
            "backup {} has manifest format {}; this pchat reads format {MANIFEST_FORMAT}",
            dir.display(),
            m.format
        )));
    }
    Ok(m)
}

/// Verifies a backup set: the same directories and files as its manifest, each with the
/// recorded size and SHA-256. Reads everything; changes nothing.
pub fn verify(dir: &Path, progress: ProgressFn<'_>) -> Result<Manifest, BackupError> {
    let m = read_manifest(dir)?;
    let corrupt = |detail: String| BackupError::Corrupt {
        backup: dir.display().to_string(),
        detail,
    };
    let (dirs, listed) = list_tree(dir)?;
    let mut want_dirs = m.dirs.clone();
    want_dirs.sort();
    if dirs != want_dirs {
        let missing: Vec<_> = want_dirs.iter().filter(|d| !dirs.contains(d)).collect();
        let extra: Vec<_> = dirs.iter().filter(|d| !want_dirs.contains(d)).collect();
        return Err(corrupt(format!(
            "directories differ from the manifest (missing: {missing:?}, unexpected: {extra:?})"
        )));
    }
    let mut want: Vec<&FileEntry> = m.files.iter().collect();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    for (i, e) in want.iter().enumerate() {
        match listed.get(i) {
            Some((p, _)) if *p == e.path => {}
            _ => {
                let present: Vec<&String> = listed.iter().map(|(p, _)| p).collect();
                let missing = want.iter().find(|e| !present.contains(&&e.path));
                let extra = listed
                    .iter()
                    .find(|(p, _)| !want.iter().any(|e| &e.path == p));
                return Err(corrupt(match (missing, extra) {
                    (Some(m), _) => format!("file {} is missing", m.path),
                    (None, Some((p, _))) => format!("file {p} is not in the manifest"),
                    (None, None) => "the file list differs from the manifest".into(),
                }));
            }
        }
    }
    if listed.len() != want.len() {
        let (p, _) = &listed[want.len()];
        return Err(corrupt(format!("file {p} is not in the manifest")));
    }
    for ((path, bytes), e) in listed.iter().zip(&want) {
        if *bytes != e.bytes {
            return Err(corrupt(format!(
                "file {path} has {bytes} bytes, the manifest says {}",
                e.bytes
            )));
        }
    }
    let mut ticker = Ticker {
        sink: progress,
        step: "verifying checksums".into(),
        done: 0,
        total: m.total_bytes,
        last: 0,
    };
    for e in &want {
        let (_, sha) = hash_file(&dir.join(&e.path), &mut ticker)?;
        if sha != e.sha256 {
            return Err(corrupt(format!(
                "file {} has SHA-256 {sha}, the manifest says {}",
                e.path, e.sha256
            )));
        }
    }
    Ok(m)
}

/// Copies `src` to `dst` (created, fsynced), hashing on the way: the copy must still match
/// the manifest, or it is removed and the restore stops before anything is replaced.
fn copy_file_verified(
    backup: &Path,
    entry: &FileEntry,
    dst: &Path,
    ticker: &mut Ticker<'_, '_>,
) -> Result<(), BackupError> {
    let src = backup.join(&entry.path);
    let mut from = open_nofollow(&src)?;
    let mut to = private_file(dst)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = from
            .read(&mut buf)
            .map_err(io(format!("reading {}", src.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        to.write_all(&buf[..n])
            .map_err(io(format!("writing {}", dst.display())))?;
        ticker.add(n as u64);
    }
    to.sync_all()
        .map_err(io(format!("syncing {}", dst.display())))?;
    let sha = hex(&h.finalize());
    if sha != entry.sha256 {
        let _ = std::fs::remove_file(dst);
        return Err(BackupError::Corrupt {
            backup: backup.display().to_string(),
            detail: format!(
                "file {} changed while it was restored (SHA-256 {sha}, the manifest says {})",
                entry.path, entry.sha256
            ),
        });
    }
    Ok(())
}

/// Copies the part of a verified backup set under `prefix/` into a new directory `dst`
/// (PostgreSQL's modes: 0700 directories, 0600 files; owned by `owner` when given).
///
/// Everything is created by the caller (root) in `dst` while `dst` is still root's (0700):
/// the owner-to-be cannot reach into it and plant a link where a file is about to be
/// written. Ownership is handed over last, entries first (without following links) and
/// `dst` itself at the very end.
pub fn copy_verified(
    backup: &Path,
    manifest: &Manifest,
    prefix: &str,
    dst: &Path,
    owner: Option<(u32, u32)>,
    progress: ProgressFn<'_>,
) -> Result<(), BackupError> {
    use std::os::unix::fs::PermissionsExt as _;
    let strip = format!("{prefix}/");
    let chown = |p: &Path| match owner {
        Some((u, g)) => std::os::unix::fs::lchown(p, Some(u), Some(g))
            .map_err(io(format!("changing the owner of {}", p.display()))),
        None => Ok(()),
    };
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
            .map_err(io(format!("setting the mode of {}", p.display())))
    };
    private_dir(dst, false)?;
    mode(dst, 0o700)?;
    let mut made: Vec<PathBuf> = Vec::new();
    let mut dirs: Vec<&str> = manifest
        .dirs
        .iter()
        .filter_map(|d| d.strip_prefix(&strip))
        .collect();
    // Parents before children.
    dirs.sort();
    for rel in dirs {
        let p = dst.join(rel);
        private_dir(&p, false)?;
        mode(&p, 0o700)?;
        made.push(p);
    }
    let entries: Vec<&FileEntry> = manifest
        .files
        .iter()
        .filter(|e| e.path.starts_with(&strip))
        .collect();
    let mut ticker = Ticker {
        sink: progress,
        step: "copying".into(),
        done: 0,
        total: entries.iter().map(|e| e.bytes).sum(),
        last: 0,
    };
    for e in entries {
        let p = dst.join(&e.path[strip.len()..]);
        copy_file_verified(backup, e, &p, &mut ticker)?;
        mode(&p, 0o600)?;
        made.push(p);
    }
    fsync_dir(dst)?;
    for p in made.iter().rev() {
        chown(p)?;
    }
    chown(dst)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A manifest for files just hashed.
#[allow(clippy::too_many_arguments)]
pub fn new_manifest(
    kind: BackupKind,
    name: String,
    description: String,
    source: String,
    dirs: Vec<String>,
    files: Vec<FileEntry>,
    start_lsn: Option<String>,
    lsn: Option<String>,
    timeline: Option<u32>,
) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        kind,
        name,
        description,
        created_at: now_rfc3339(),
        source,
        start_lsn,
        lsn,
        timeline,
        total_bytes: files.iter().map(|f| f.bytes).sum(),
        dirs,
        files,
    }
}

/// Standalone: a full online backup of `data_dir`'s `mgc.db` and `mgccomp.db` into
/// `to/name`, while the server may keep running.
pub fn backup_sqlite(
    data_dir: &Path,
    to: &Path,
    name: &str,
    description: Option<&str>,
    progress: ProgressFn<'_>,
) -> Result<Manifest, BackupError> {
    validate_name(name)?;
    if let Some(d) = description {
        validate_description(d)?;
    }
    for f in SQLITE_FILES {
        if !data_dir.join(f).is_file() {
            return Err(BackupError::NotFound(format!(
                "no {f} in {}: is it a pchat data directory? (pool databases are backed up with --in-pool)",
                data_dir.display()
            )));
        }
    }
    let (target, partial) = prepare_target(to, name)?;
    private_dir(&partial, false)?;
    // mgc first, then mgccomp: the server commits compliance records before the messages
    // they describe, so the later mgccomp copy has the record of every message in the mgc
    // copy (extra records of later messages are marked never-committed when it is opened).
    for f in SQLITE_FILES {
        progress(&Progress {
            step: format!("backing up {f}"),
            done_bytes: 0,
            total_bytes: 0,
        });
        copy_online(&data_dir.join(f), &partial.join(f))?;
    }
    let (dirs, files) = hash_tree(&partial, progress)?;
    let source = format!(
        "standalone {} on {}",
        std::fs::canonicalize(data_dir)
            .unwrap_or_else(|_| data_dir.to_path_buf())
            .display(),
        std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into())
    );
    let manifest = new_manifest(
        BackupKind::Sqlite,
        name.to_owned(),
        description.unwrap_or_default().to_owned(),
        source,
        dirs,
        files,
        None,
        None,
        None,
    );
    finish(&partial, &target, &manifest)?;
    Ok(manifest)
}

/// Standalone: restores `from` (a backup set of [`backup_sqlite`]) into `data_dir` while no
/// server runs there. `recovery` must be true: standalone mode has no log shipping to wait for.
pub fn restore_sqlite(
    data_dir: &Path,
    from: &Path,
    overwrite: bool,
    recovery: bool,
    progress: ProgressFn<'_>,
) -> Result<Manifest, BackupError> {
    if !recovery {
        return Err(BackupError::Invalid(
            "--norecovery leaves a database waiting for log shipping, which standalone mode does not have: use --recovery".into(),
        ));
    }
    // The server's own lock, so no server can start while the files are swapped (and a
    // running one makes taking it fail).
    let _lock = lock_data_dir(data_dir).map_err(|e| match e {
        LockError::Held { .. } => BackupError::ServerRunning(data_dir.to_path_buf()),
        LockError::Store(e) => BackupError::Store(e),
    })?;
    let present: Vec<&str> = SQLITE_FILES
        .iter()
        .copied()
        .filter(|f| data_dir.join(f).exists())
        .collect();
    if !present.is_empty() && !overwrite {
        return Err(BackupError::Refused(format!(
            "{} already holds {}: the restore would replace them; repeat with --overwrite if that is intended",
            data_dir.display(),
            present.join(" and ")
        )));
    }
    let manifest = verify(from, progress)?;
    let names: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    if manifest.kind != BackupKind::Sqlite || names != SQLITE_FILES {
        return Err(BackupError::Invalid(format!(
            "{} is not a standalone backup (kind {:?}, files {names:?}); PostgreSQL backups are restored with --in-pool",
            from.display(),
            manifest.kind
        )));
    }
    let mut ticker = Ticker {
        sink: progress,
        step: "copying".into(),
        done: 0,
        total: manifest.total_bytes,
        last: 0,
    };
    // Copy both under temporary names first, then swap both: never one new file beside an
    // old one unless a crash hits between two renames (a re-run then finishes the job).
    for e in &manifest.files {
        let tmp = data_dir.join(format!("{}.restoring", e.path));
        // What an interrupted restore left (or a link where the copy goes: removed, not
        // followed), so the copy below creates a file of its own (0600, new).
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(io(format!("removing {}", tmp.display()))(err)),
        }
        copy_file_verified(from, e, &tmp, &mut ticker)?;
        // Keep the owner of the file being replaced (the server's account); the mode stays
        // 0600, as the server itself makes its databases.
        if let Ok(meta) = std::fs::metadata(data_dir.join(&e.path)) {
            use std::os::unix::fs::MetadataExt as _;
            std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()))
                .map_err(io(format!("changing the owner of {}", tmp.display())))?;
        }
    }
    for e in &manifest.files {
        // A WAL left beside the old file would be replayed into the restored one.
        for suffix in ["-wal", "-shm", "-journal"] {
            let p = data_dir.join(format!("{}{suffix}", e.path));
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(io(format!("removing {}", p.display()))(err)),
            }
        }
        let tmp = data_dir.join(format!("{}.restoring", e.path));
        std::fs::rename(&tmp, data_dir.join(&e.path))
            .map_err(io(format!("renaming {}", tmp.display())))?;
    }
    fsync_dir(data_dir)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backup set being written belongs to the database's OS user, who may plant a link
    /// as `manifest.json`: finishing replaces the link and leaves its target alone (the old
    /// code created the manifest through the link, as root).
    #[test]
    fn finishing_a_set_never_writes_through_a_planted_link() {
        let share = tempfile::tempdir().unwrap();
        let target_file = share.path().join("authorized_keys");
        std::fs::write(&target_file, "root's own\n").unwrap();
        let partial = share.path().join("b1.partial");
        std::fs::create_dir(&partial).unwrap();
        std::fs::write(partial.join("f"), b"data").unwrap();
        std::os::unix::fs::symlink(&target_file, partial.join(MANIFEST_FILE)).unwrap();
        let m = new_manifest(
            BackupKind::Postgresql,
            "b1".into(),
            String::new(),
            "test".into(),
            Vec::new(),
            Vec::new(),
            None,
            None,
            None,
        );
        let target = share.path().join("b1");
        finish(&partial, &target, &m).unwrap();
        assert_eq!(
            std::fs::read_to_string(&target_file).unwrap(),
            "root's own\n"
        );
        let written = std::fs::symlink_metadata(target.join(MANIFEST_FILE)).unwrap();
        assert!(written.file_type().is_file());
        assert_eq!(read_manifest(&target).unwrap().name, "b1");
    }

    #[test]
    fn names() {
        for ok in ["full-2024-05-01", "mgc_backup.1", "a"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(NAME_CHARS_MAX + 1);
        for bad in [
            "",
            ".hidden",
            "a/b",
            "../x",
            "x.partial",
            "with space",
            long.as_str(),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_description(&"d".repeat(DESCRIPTION_CHARS_MAX)).is_ok());
        assert!(validate_description(&"d".repeat(DESCRIPTION_CHARS_MAX + 1)).is_err());
    }

    #[test]
    fn postgres_labels() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 1\n";
        assert_eq!(
            parse_backup_label(label),
            (Some("0/2000028".to_owned()), Some(1))
        );
        let m = r#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [],
            "WAL-Ranges": [{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }]}"#;
        assert_eq!(parse_pg_manifest_end_lsn(m).as_deref(), Some("0/2000100"));
    }

    #[test]
    fn progress_percent() {
        let p = |d, t| Progress {
            step: String::new(),
            done_bytes: d,
            total_bytes: t,
        };
        assert_eq!(p(0, 0).percent(), None);
        assert_eq!(p(50, 200).percent(), Some(25));
        assert_eq!(p(300, 200).percent(), Some(100));
    }
}
