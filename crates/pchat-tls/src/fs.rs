//! Private files: keys and passwords.
//!
//! Written under a fresh name created with `O_EXCL | O_NOFOLLOW` and mode 0600 (whatever the
//! umask), synced, then renamed over the final name: a reader never sees half a key, and a
//! link planted where the file will go is replaced, never followed. Read with `O_NOFOLLOW`,
//! and refused when the group or others may read them, as ssh refuses such a key: a secret
//! that leaked through its mode must be replaced, not used.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::TlsError;

/// `O_NOFOLLOW` on Linux: opening a symbolic link fails with `ELOOP`.
const O_NOFOLLOW: i32 = 0o400000;

/// Bound on a private file read back: keys and passwords are a few KiB.
const PRIVATE_FILE_BYTES_MAX: u64 = 1 << 20;

fn fresh_name(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}-{nanos}-{n}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `bytes` to `path` with `mode`, atomically, never through a link.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = fresh_name(path);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)
            .map_err(TlsError::io(&tmp))?;
        // The umask may have taken bits away; it never adds any, but say the mode exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(TlsError::io(&tmp))?;
        f.write_all(bytes).map_err(TlsError::io(&tmp))?;
        f.sync_all().map_err(TlsError::io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(TlsError::io(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a secret: mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    write_file(path, bytes, 0o600)
}

/// Reads a file that is not a link, at most 1 MiB.
pub fn read_nofollow(path: &Path) -> Result<(Vec<u8>, std::fs::Metadata), TlsError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(40) {
                // ELOOP: the name is a symbolic link.
                TlsError::invalid(
                    path,
                    "is a symbolic link; a secret must be a plain file of its owner",
                )
            } else {
                TlsError::Io {
                    path: path.display().to_string(),
                    source: e,
                }
            }
        })?;
    let meta = f.metadata().map_err(TlsError::io(path))?;
    if !meta.is_file() {
        return Err(TlsError::invalid(path, "is not a plain file"));
    }
    let mut bytes = Vec::new();
    f.take(PRIVATE_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(TlsError::io(path))?;
    if bytes.len() as u64 > PRIVATE_FILE_BYTES_MAX {
        return Err(TlsError::invalid(path, "is larger than 1 MiB"));
    }
    Ok((bytes, meta))
}

/// Reads a secret: a plain file (not a link) that neither its group nor others may read or
/// write.
pub fn read_private(path: &Path) -> Result<Vec<u8>, TlsError> {
    let (bytes, meta) = read_nofollow(path)?;
    if meta.mode() & 0o077 != 0 {
        return Err(TlsError::invalid(
            path,
            format!(
                "mode {:o} lets other users read or change a secret: run `chmod 600 {}` (and replace the secret if others could read it)",
                meta.mode() & 0o777,
                path.display()
            ),
        ));
    }
    Ok(bytes)
}

/// Reads a one-line secret (a password or token), trimmed of surrounding white space.
pub fn read_secret(path: &Path) -> Result<String, TlsError> {
    let bytes = read_private(path)?;
    let text = String::from_utf8(bytes).map_err(|_| TlsError::invalid(path, "is not UTF-8"))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(TlsError::invalid(path, "is empty"));
    }
    Ok(secret.to_owned())
}

/// A new random secret: 32 bytes from the operating system's generator, base64 (URL-safe,
/// no padding, so it is safe in a connection string, a TOML string and a shell word).
pub fn random_secret() -> String {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Makes `path` hold a random secret unless it already holds one. `true`: made now.
pub fn ensure_secret(path: &Path) -> Result<bool, TlsError> {
    match read_secret(path) {
        Ok(_) => Ok(false),
        Err(TlsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            write_private(path, format!("{}\n", random_secret()).as_bytes())?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_private(&path, b"secret").unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_private(&path).unwrap(), b"secret");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_planted_link_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("authorized_keys");
        std::fs::write(&target, b"original").unwrap();
        let path = dir.path().join("key.pem");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_private(&path, b"secret").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"original");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn links_and_open_modes_are_refused_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        write_private(&real, b"pw").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = read_private(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");

        let open = dir.path().join("open");
        write_file(&open, b"pw", 0o644).unwrap();
        let err = read_secret(&open).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert_eq!(read_secret(&real).unwrap(), "pw");
    }

    #[test]
    fn secrets_are_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.password");
        assert!(ensure_secret(&path).unwrap());
        let first = read_secret(&path).unwrap();
        assert_eq!(first.len(), 43);
        assert!(!ensure_secret(&path).unwrap());
        assert_eq!(read_secret(&path).unwrap(), first);
        assert_ne!(random_secret(), random_secret());
    }
}
