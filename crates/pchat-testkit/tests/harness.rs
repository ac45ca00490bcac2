//! Tests of [`TestServer`] against a stand-in for the `pchat` binary.
//!
//! The real server is written concurrently, so a small Python script plays its operator-facing
//! part: it records its arguments, prints `ready`, listens on the c2s port, handles SIGTERM and
//! implements `user add`. Behaviour switches (never ready, exit at once, ignore SIGTERM) are
//! files in the data directory, so they can change between restarts.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pchat_testkit::{HarnessError, ServerOptions, TestServer};

const FAKE_PCHAT: &str = r#"#!/usr/bin/env python3
import os, signal, socket, sys, time

args = sys.argv[1:]
def opt(name):
    return args[args.index(name) + 1]

if args[:1] == ["--data-dir"]:
    data, rest = args[1], args[2:]
    if rest[:2] == ["user", "add"] and rest[3] == "--password":
        with open(os.path.join(data, "users.txt"), "a") as f:
            f.write(f"{rest[2]} {rest[4]}\n")
        print("user added")
        sys.exit(0)
    print(f"unknown command {rest}", file=sys.stderr)
    sys.exit(2)

assert args[0] == "serve", args
data = opt("--data-dir")
with open(os.path.join(data, "args.txt"), "a") as f:
    f.write(" ".join(args) + f" env={os.environ.get('FAKE_ENV', '')}\n")
if os.path.exists(os.path.join(data, "exit-now")):
    print("fatal: cannot open the database", file=sys.stderr)
    sys.exit(3)
if os.path.exists(os.path.join(data, "ignore-term")):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(opt("--c2s-port"))))
listener.listen()
print("starting", flush=True)
if not os.path.exists(os.path.join(data, "never-ready")):
    print("ready c2s=" + opt("--c2s-port"), flush=True)
while True:
    conn, _ = listener.accept()
    conn.close()
"#;

/// Writes the fake binary into `dir` and returns its path.
fn fake_binary(dir: &Path) -> PathBuf {
    let has_python = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_python,
        "these tests need python3 for the fake server: `apt-get install -y python3`"
    );
    let path = dir.join("pchat");
    std::fs::write(&path, FAKE_PCHAT).expect("write fake binary");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[tokio::test]
async fn starts_runs_cli_stops_and_restarts() {
    let bin_dir = tempfile::tempdir().expect("temp dir");
    let bin = fake_binary(bin_dir.path());
    let opts = ServerOptions {
        extra_args: vec!["--extra".into()],
        env: vec![("FAKE_ENV".into(), "yes".into())],
        ..ServerOptions::default()
    };
    let mut server = TestServer::start(&bin, opts).await.expect("start");
    let ports = server.ports();
    let args = std::fs::read_to_string(server.data_dir().join("args.txt")).expect("args");
    let expected = format!(
        "serve --data-dir {} --domain localhost --bind-addr 127.0.0.1 --c2s-port {} \
         --c2s-tls-port {} --http-port {} --metrics-addr 127.0.0.1:{} --extra env=yes\n",
        server.data_dir().display(),
        ports.c2s,
        ports.c2s_tls,
        ports.http,
        ports.metrics
    );
    assert_eq!(args, expected);
    assert_eq!(server.c2s_addr().port(), ports.c2s);
    assert_eq!(server.tls_addr().port(), ports.c2s_tls);
    assert_eq!(
        server.ws_url(),
        format!("wss://127.0.0.1:{}/xmpp-websocket", ports.http)
    );
    assert_eq!(
        std::collections::HashSet::from([ports.c2s, ports.c2s_tls, ports.http, ports.metrics])
            .len(),
        4
    );

    server
        .add_user("alice@localhost", "pw")
        .await
        .expect("add user");
    let users = std::fs::read_to_string(server.data_dir().join("users.txt")).expect("users");
    assert_eq!(users, "alice@localhost pw\n");
    let out = server.run_cli(["frobnicate"]).await.expect("run cli");
    assert_eq!(out.status.code(), Some(2));
    match server.run_cli_ok(["frobnicate"]).await {
        Err(HarnessError::Command { stderr, .. }) => assert!(stderr.contains("unknown command")),
        other => panic!("expected a command error, got {other:?}"),
    }

    let status = server.stop().await.expect("stop").expect("was running");
    assert!(
        status.success(),
        "SIGTERM should end the fake cleanly: {status}"
    );
    assert!(tokio::net::TcpStream::connect(server.c2s_addr())
        .await
        .is_err());

    server.restart().await.expect("restart on the same ports");
    assert_eq!(server.ports(), ports);
    assert!(tokio::net::TcpStream::connect(server.c2s_addr())
        .await
        .is_ok());

    // The old `ready` line is still in the log: a restart must wait for a new one.
    std::fs::write(server.data_dir().join("never-ready"), "").expect("switch");
    let data_dir = server.data_dir().to_path_buf();
    server.kill9().expect("was running");
    let err = tokio::time::timeout(Duration::from_secs(5), async {
        // A short ready timeout keeps this test fast.
        let mut again = TestServer::start(
            &bin,
            ServerOptions {
                data_dir: Some(data_dir.clone()),
                ready_timeout: Duration::from_millis(800),
                ..ServerOptions::default()
            },
        )
        .await;
        if let Ok(server) = &mut again {
            let _ = server.stop().await;
        }
        again
    })
    .await
    .expect("start gives up on its own");
    match err {
        Err(HarnessError::NotReady { reason, logs }) => {
            assert!(reason.contains("ready"), "{reason}");
            assert!(logs.contains("starting"), "{logs}");
        }
        Err(other) => panic!("expected NotReady, got {other}"),
        Ok(_) => panic!("started without printing ready"),
    }
}

#[tokio::test]
async fn reports_early_exit_with_logs() {
    let bin_dir = tempfile::tempdir().expect("temp dir");
    let bin = fake_binary(bin_dir.path());
    let data = tempfile::tempdir().expect("data dir");
    std::fs::write(data.path().join("exit-now"), "").expect("switch");
    let result = TestServer::start(
        &bin,
        ServerOptions {
            data_dir: Some(data.path().to_path_buf()),
            ..ServerOptions::default()
        },
    )
    .await;
    match result {
        Err(HarnessError::NotReady { reason, logs }) => {
            assert!(reason.contains("exited"), "{reason}");
            assert!(logs.contains("cannot open the database"), "{logs}");
        }
        Err(other) => panic!("expected NotReady, got {other}"),
        Ok(_) => panic!("a server that exits must not count as ready"),
    }
}

#[tokio::test]
async fn stop_falls_back_to_sigkill_and_kill9_kills() {
    let bin_dir = tempfile::tempdir().expect("temp dir");
    let bin = fake_binary(bin_dir.path());
    let data = tempfile::tempdir().expect("data dir");
    std::fs::write(data.path().join("ignore-term"), "").expect("switch");
    let opts = ServerOptions {
        data_dir: Some(data.path().to_path_buf()),
        stop_timeout: Duration::from_millis(500),
        ..ServerOptions::default()
    };
    let mut server = TestServer::start(&bin, opts).await.expect("start");
    let status = server.stop().await.expect("stop").expect("was running");
    assert_eq!(status.signal(), Some(9), "{status}");

    server.start_again().await.expect("start again");
    server.pause().expect("SIGSTOP");
    server.resume().expect("SIGCONT");
    let status = server.kill9().expect("was running");
    assert_eq!(status.signal(), Some(9));
    assert!(server.pid().is_none());
}
