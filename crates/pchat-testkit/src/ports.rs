//! Free loopback ports for the servers the tests start (pchat, PostgreSQL, etcd, slapd).
//!
//! They come from below the kernel's ephemeral range when there is room there: a port the
//! kernel hands out (`bind` to port 0, and every outgoing connection's local port) can be in
//! use by some other test's connection just when a stopped server starts again on its old
//! port — seen in CI as `Address already in use` when a drill restarted a server.
//!
//! A port handed out is also **reserved** for the rest of the process: never handed out again
//! by this process, and, through an open-file-description lock on byte `port` of one shared
//! file in the temporary directory, never by another test process running at the same time
//! (the lock goes with the process, however it ends). Without that, two test binaries run in
//! parallel picked the same port from the 10,000 now and then — seen in CI as a PostgreSQL of
//! one lab failing to start on a port another lab's had just taken. A server that binds a
//! port nobody reserved (another program on the machine) stays possible; each starter retries
//! on a bind error.

use std::collections::HashSet;
use std::fs::File;
use std::net::TcpListener;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;

/// The lowest port the kernel hands out on its own (`ip_local_port_range`).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// The ports this process has handed out, and the shared lock file (if it could be opened).
struct Reserved {
    ports: HashSet<u16>,
    file: Option<File>,
}

static RESERVED: Mutex<Option<Reserved>> = Mutex::new(None);

/// The shared file whose bytes stand for ports; opened for writing (a write lock needs it),
/// never through a link (the temporary directory is writable by every user, and the tests
/// may run as root).
fn lock_file() -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = std::env::temp_dir().join("pchat-test-ports.lock");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()
}

/// A write lock on byte `port` of the shared file.
fn port_lock(port: u16) -> libc::flock {
    libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: libc::off_t::from(port),
        l_len: 1,
        l_pid: 0,
    }
}

/// Reserves `port` for this process; false if this or another test process already has it.
fn reserve(port: u16) -> bool {
    let mut guard = RESERVED.lock().unwrap_or_else(|p| p.into_inner());
    let reserved = guard.get_or_insert_with(|| Reserved {
        ports: HashSet::new(),
        file: lock_file(),
    });
    if reserved.ports.contains(&port) {
        return false;
    }
    if let Some(file) = &reserved.file {
        let lock = port_lock(port);
        match fcntl(file, FcntlArg::F_OFD_SETLK(&lock)) {
            Ok(_) => {}
            Err(Errno::EAGAIN | Errno::EACCES) => return false,
            // Locks not supported here (an odd temporary file system): this process's own
            // record still keeps it from handing a port out twice.
            Err(_) => {}
        }
    }
    reserved.ports.insert(port);
    true
}

/// A listener on a free, now reserved loopback port: below the ephemeral range if it leaves
/// room (10,000 ports above 1024), else one the kernel picks. Drop it to free the port for
/// the server.
pub(crate) fn loopback_listener() -> std::io::Result<TcpListener> {
    let high = ephemeral_low();
    if high > 11_024 {
        let low = high - 10_000;
        for _ in 0..500 {
            let port = rand::Rng::gen_range(&mut rand::thread_rng(), low..high);
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                if reserve(port) {
                    return Ok(l);
                }
            }
        }
    }
    let l = TcpListener::bind("127.0.0.1:0")?;
    reserve(l.local_addr()?.port());
    Ok(l)
}

/// A free loopback port (see the module docs).
pub fn free_port() -> std::io::Result<u16> {
    Ok(loopback_listener()?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_never_handed_out_twice_in_a_process() {
        let ports: Vec<u16> = (0..300).map(|_| free_port().unwrap()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }

    #[test]
    fn another_process_cannot_take_a_reserved_port() {
        let port = free_port().unwrap();
        // Another open file description (as another process would have) conflicts.
        let other = lock_file().expect("the lock file opens");
        let lock = port_lock(port);
        assert_eq!(
            fcntl(&other, FcntlArg::F_OFD_SETLK(&lock)),
            Err(Errno::EAGAIN),
            "port {port} is locked"
        );
    }
}
