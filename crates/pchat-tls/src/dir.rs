//! Work inside a directory that a less trusted user owns, without following a link that user
//! planted.
//!
//! The agent runs as root and writes into directories owned by `postgres` (the data
//! directory, its copies, backup sets). Path-based calls (`std::fs::write`, `set_permissions`,
//! `chown`) follow symbolic links, so `postgres` could make root write, chmod or chown a file
//! of its choosing (root's `authorized_keys`, `/etc/shadow`). A [`Dir`] is the directory
//! opened once with `O_DIRECTORY | O_NOFOLLOW`; every operation then names one entry relative
//! to that descriptor (`openat`, `renameat`, `unlinkat`, `mkdirat`), never a path that can
//! be swapped underneath:
//!
//! - [`Dir::write`] creates a fresh name with `O_CREAT | O_EXCL | O_NOFOLLOW`, sets owner and
//!   mode on the open descriptor (`fchown`, `fchmod`), syncs, and renames it over the final
//!   name: a link planted at the final name is replaced, never followed;
//! - [`Dir::read`] opens with `O_NOFOLLOW` and refuses anything but a plain file;
//! - [`Dir::set_mode`] and [`Dir::set_owner`] act on the directory's own descriptor.
//!
//! The path given to [`Dir::open`] must itself be trusted up to its last component (its
//! parent not writable by the less trusted user): that component is opened without following
//! a link, the ones above it are not checked.

use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag, AT_FDCWD};
use nix::sys::stat::{fchmod, mkdirat, Mode};
use nix::unistd::{fchown, unlinkat, Gid, Uid, UnlinkatFlags};

use crate::TlsError;

/// Bound on a file read through [`Dir::read`]: configuration files and small markers.
pub const READ_BYTES_MAX: u64 = 16 << 20;

/// A directory opened without following links; see the module docs.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn nix_io(path: &Path, e: Errno) -> TlsError {
    if e == Errno::ELOOP {
        TlsError::invalid(
            path,
            "is a symbolic link; refused (a link here could make root write or read another file)",
        )
    } else if e == Errno::ENOTDIR {
        TlsError::invalid(
            path,
            "is not a directory (a link or a file took its place?)",
        )
    } else {
        TlsError::Io {
            path: path.display().to_string(),
            source: std::io::Error::from(e),
        }
    }
}

fn check_name(dir: &Path, name: &str) -> Result<(), TlsError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(TlsError::invalid(
            &dir.join(name),
            "must be one plain name inside its directory",
        ));
    }
    Ok(())
}

fn mode(bits: u32) -> Mode {
    Mode::from_bits_truncate(bits)
}

fn fresh_name(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(".{name}.pchat-{}-{nanos}-{n}", std::process::id())
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

impl Dir {
    /// Opens `path` (its last component must not be a link).
    pub fn open(path: &Path) -> Result<Dir, TlsError> {
        let fd = openat(AT_FDCWD, path, DIR_FLAGS, Mode::empty()).map_err(|e| nix_io(path, e))?;
        Ok(Dir {
            fd,
            path: path.to_owned(),
        })
    }

    /// Opens `path`, creating it first (mode `mode`) when it is missing; then gives it to
    /// `owner` and sets `mode` on the opened directory, whatever it was.
    pub fn create(path: &Path, mode_bits: u32, owner: Option<(u32, u32)>) -> Result<Dir, TlsError> {
        match mkdirat(AT_FDCWD, path, mode(mode_bits)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(nix_io(path, e)),
        }
        let dir = Dir::open(path)?;
        if let Some((uid, gid)) = owner {
            dir.set_owner(uid, gid)?;
        }
        dir.set_mode(mode_bits)?;
        Ok(dir)
    }

    /// The path it was opened by (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory entry `name` inside it, opened the same way.
    pub fn sub(&self, name: &str) -> Result<Dir, TlsError> {
        check_name(&self.path, name)?;
        let path = self.path.join(name);
        let fd = openat(self.fd.as_fd(), name, DIR_FLAGS, Mode::empty())
            .map_err(|e| nix_io(&path, e))?;
        Ok(Dir { fd, path })
    }

    /// [`Dir::sub`], creating it first when missing; then owner and mode as
    /// [`Dir::create`] sets them.
    pub fn create_sub(
        &self,
        name: &str,
        mode_bits: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<Dir, TlsError> {
        check_name(&self.path, name)?;
        match mkdirat(self.fd.as_fd(), name, mode(mode_bits)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(nix_io(&self.path.join(name), e)),
        }
        let dir = self.sub(name)?;
        if let Some((uid, gid)) = owner {
            dir.set_owner(uid, gid)?;
        }
        dir.set_mode(mode_bits)?;
        Ok(dir)
    }

    /// Sets the directory's own mode (on its descriptor).
    pub fn set_mode(&self, mode_bits: u32) -> Result<(), TlsError> {
        fchmod(self.fd.as_fd(), mode(mode_bits)).map_err(|e| nix_io(&self.path, e))
    }

    /// Gives the directory itself to `uid:gid` (on its descriptor).
    pub fn set_owner(&self, uid: u32, gid: u32) -> Result<(), TlsError> {
        fchown(
            self.fd.as_fd(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        )
        .map_err(|e| nix_io(&self.path, e))
    }

    /// The directory's owner `(uid, gid)`.
    pub fn owner(&self) -> Result<(u32, u32), TlsError> {
        let f = std::fs::File::from(self.fd.try_clone().map_err(TlsError::io(&self.path))?);
        let m = f.metadata().map_err(TlsError::io(&self.path))?;
        Ok((m.uid(), m.gid()))
    }

    /// Writes `bytes` as entry `name` with mode `mode` (and owner `owner`), atomically:
    /// a fresh name created exclusively and never through a link, owner and mode set on the
    /// open file, synced, then renamed over `name` (replacing a link there, not following it).
    pub fn write(
        &self,
        name: &str,
        bytes: &[u8],
        mode_bits: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(), TlsError> {
        check_name(&self.path, name)?;
        let tmp = fresh_name(name);
        let tmp_path = self.path.join(&tmp);
        let fd = openat(
            self.fd.as_fd(),
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            mode(mode_bits & 0o600),
        )
        .map_err(|e| nix_io(&tmp_path, e))?;
        let result = (|| {
            if let Some((uid, gid)) = owner {
                fchown(
                    fd.as_fd(),
                    Some(Uid::from_raw(uid)),
                    Some(Gid::from_raw(gid)),
                )
                .map_err(|e| nix_io(&tmp_path, e))?;
            }
            // Owner first, then the mode: the file is never readable by others before it
            // belongs to its owner (the umask and the 0600 at creation saw to that).
            fchmod(fd.as_fd(), mode(mode_bits)).map_err(|e| nix_io(&tmp_path, e))?;
            let mut f = std::fs::File::from(fd);
            f.write_all(bytes).map_err(TlsError::io(&tmp_path))?;
            f.sync_all().map_err(TlsError::io(&tmp_path))?;
            renameat(self.fd.as_fd(), tmp.as_str(), self.fd.as_fd(), name)
                .map_err(|e| nix_io(&self.path.join(name), e))?;
            // The rename itself durable too.
            nix::unistd::fsync(self.fd.as_fd()).map_err(|e| nix_io(&self.path, e))
        })();
        if result.is_err() {
            let _ = unlinkat(self.fd.as_fd(), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    /// Reads entry `name`: `None` when it does not exist; refused when it is a link or not a
    /// plain file, or larger than [`READ_BYTES_MAX`].
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, TlsError> {
        check_name(&self.path, name)?;
        let path = self.path.join(name);
        let fd = match openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(nix_io(&path, e)),
        };
        let f = std::fs::File::from(fd);
        let meta = f.metadata().map_err(TlsError::io(&path))?;
        if !meta.is_file() {
            return Err(TlsError::invalid(&path, "is not a plain file; refused"));
        }
        let mut bytes = Vec::new();
        f.take(READ_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .map_err(TlsError::io(&path))?;
        if bytes.len() as u64 > READ_BYTES_MAX {
            return Err(TlsError::invalid(&path, "is larger than 16 MiB"));
        }
        Ok(Some(bytes))
    }

    /// Removes entry `name` (a file or a link, never what a link points to). `false`: there
    /// was none.
    pub fn remove(&self, name: &str) -> Result<bool, TlsError> {
        check_name(&self.path, name)?;
        match unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(nix_io(&self.path.join(name), e)),
        }
    }

    /// Whether entry `name` exists (as anything, a link included), without following it.
    pub fn contains(&self, name: &str) -> Result<bool, TlsError> {
        check_name(&self.path, name)?;
        match nix::sys::stat::fstatat(
            self.fd.as_fd(),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(_) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(nix_io(&self.path.join(name), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn writes_replace_a_planted_link_and_never_follow_it() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("authorized_keys");
        std::fs::write(&target, b"original").unwrap();
        let d = root.path().join("data");
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::symlink(&target, d.join("pg_hba.conf")).unwrap();
        let dir = Dir::open(&d).unwrap();
        dir.write("pg_hba.conf", b"hba", 0o600, None).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"original");
        assert_eq!(std::fs::read(d.join("pg_hba.conf")).unwrap(), b"hba");
        let m = std::fs::symlink_metadata(d.join("pg_hba.conf")).unwrap();
        assert!(m.is_file());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // Nothing else left behind.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    }

    #[test]
    fn links_are_refused_as_directories_and_on_read() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("secret"), b"s").unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = Dir::open(&link).unwrap_err().to_string();
        assert!(
            err.contains("symbolic link") || err.contains("not a directory"),
            "{err}"
        );

        let d = Dir::open(root.path()).unwrap();
        assert!(d.sub("link").is_err());
        let sub = d.sub("real").unwrap();
        assert_eq!(sub.read("secret").unwrap().as_deref(), Some(&b"s"[..]));
        std::os::unix::fs::symlink(real.join("secret"), real.join("auto.conf")).unwrap();
        let err = sub.read("auto.conf").unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(sub.read("missing").unwrap(), None);
        assert!(sub.contains("auto.conf").unwrap());
        // Removing the link removes the link, not its target.
        assert!(sub.remove("auto.conf").unwrap());
        assert_eq!(std::fs::read(real.join("secret")).unwrap(), b"s");
        assert!(!sub.remove("auto.conf").unwrap());
        for bad in ["", ".", "..", "a/b"] {
            assert!(sub.write(bad, b"x", 0o600, None).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn created_directories_get_their_mode_on_the_descriptor() {
        let root = tempfile::tempdir().unwrap();
        let p = root.path().join("d");
        let d = Dir::create(&p, 0o700, None).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let s = d.create_sub("s", 0o750, None).unwrap();
        assert_eq!(
            std::fs::metadata(s.path()).unwrap().permissions().mode() & 0o777,
            0o750
        );
        // A link where the directory should be is refused, not followed.
        let target = root.path().join("t");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&target, p.join("l")).unwrap();
        assert!(d.create_sub("l", 0o700, None).is_err());
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o755,
            "the link's target kept its mode"
        );
    }
}
