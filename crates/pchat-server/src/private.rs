//! Files and directories only the server's OS user may read: the data directory (0700), TLS
//! keys and `data export` files (0600). (The SQLite store keeps its own database files at
//! 0600, and with them the server secret.) A mode is given when a file is created, so it is
//! never readable by others even for a moment, and set again right after, so neither the
//! process umask (000 included) nor a file left by an older pchat widens it.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::Path;

/// Mode of the data directory and the directories pchat makes in it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files that hold keys, data or secrets.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) with mode 0700. When it exists already, readable by
/// others, and owned by the user running pchat, it is tightened to 0700, unless it is a
/// shared directory with the sticky bit (`/tmp`), which pchat must not lock others out of:
/// that gets a warning. Returns whether the directory stays open to others.
pub fn create_dir(dir: &Path) -> io::Result<bool> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    let sticky = mode & 0o1000 != 0;
    if !sticky && meta.uid() == effective_uid(dir)? {
        std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))?;
        tracing::info!(dir = %dir.display(), was = format!("{mode:o}"), "data directory restricted to its owner (0700)");
        return Ok(false);
    }
    tracing::warn!(
        dir = %dir.display(),
        mode = format!("{mode:o}"),
        "the data directory is open to other users and pchat cannot restrict it: use a \
         directory of its own (chmod 700)"
    );
    Ok(true)
}

/// The effective user id of this process: the owner of a file it creates in `dir`.
fn effective_uid(dir: &Path) -> io::Result<u32> {
    let probe = dir.join(".pchat-owner-probe");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&probe)?;
    let uid = file.metadata()?.uid();
    drop(file);
    std::fs::remove_file(&probe)?;
    Ok(uid)
}

/// Creates (or truncates) `path` for writing with mode 0600.
pub fn create_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    // An existing file keeps its mode through open(): set it.
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Sets an existing file to 0600 (a key or database from an older pchat).
pub fn restrict_file(path: &Path) -> io::Result<()> {
    let mode = std::fs::metadata(path)?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn modes_are_private_whatever_existed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/data");
        assert!(!create_dir(&dir).unwrap());
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        assert!(!create_dir(&dir).unwrap());
        assert_eq!(mode(&dir), 0o700, "an existing open directory is tightened");

        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, Permissions::from_mode(0o1777)).unwrap();
        assert!(create_dir(&shared).unwrap(), "reported as open");
        assert_eq!(
            mode(&shared),
            0o1777,
            "a sticky shared directory is left alone"
        );

        let file = dir.join("key.pem");
        std::fs::write(&file, b"old").unwrap();
        std::fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();
        drop(create_file(&file).unwrap());
        assert_eq!(mode(&file), 0o600);
        std::fs::set_permissions(&file, Permissions::from_mode(0o666)).unwrap();
        restrict_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
    }
}
