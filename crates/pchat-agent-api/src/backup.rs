//! Backup sets' part of the agent API: the manifest (`manifest.json`) that a backup job
//! answers with and writes into every backup set on the share, and that a restore verifies.
//! The same format serves standalone backups, so either kind of set is read one way.
//! Writing and verifying sets is `pchat-procedures`' `backup` module.

use serde::{Deserialize, Serialize};

/// The manifest's file name inside a backup set.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Manifest format written by this version.
pub const MANIFEST_FORMAT: u32 = 1;

/// What a backup set holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// A PostgreSQL instance (`data/`, from `pg_basebackup`).
    Postgresql,
    /// A standalone server's `mgc.db` and `mgccomp.db`.
    Sqlite,
}

/// One file of a backup set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path inside the backup set, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256, lower-case hex.
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// What the set holds.
    pub kind: BackupKind,
    /// The backup set's name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// When the backup finished (RFC 3339, UTC).
    pub created_at: String,
    /// The instance or data directory backed up.
    pub source: String,
    /// Pool mode: WAL location where the backup started.
    pub start_lsn: Option<String>,
    /// Pool mode: WAL location at which the copy is consistent (the end of the backup).
    pub lsn: Option<String>,
    /// Pool mode: the source's timeline.
    pub timeline: Option<u32>,
    /// Sum of the files' sizes.
    pub total_bytes: u64,
    /// Directories (PostgreSQL needs its empty ones), `/`-separated.
    pub dirs: Vec<String>,
    /// Every file but the manifest.
    pub files: Vec<FileEntry>,
}
