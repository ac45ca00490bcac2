//! The Debian package (`scripts/package-deb`): built from the test's binary, unpacked into a
//! temporary root (`dpkg-deb -x`: the machine's own /usr and /etc are left alone), its
//! files checked (hardened units, default configuration, manual pages, completions), then
//! the service's own command line from its unit — with the unpacked binary, a temporary
//! data directory and free ports — started, a user added and logged in. Then installed for
//! real with `dpkg -i`, maintainer scripts and all, in a private mount namespace whose /etc,
//! /usr and /var are overlays (the machine's own stay untouched): the service user and the
//! modes the postinst sets, and the installed unit's command line run as that user, serving.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pchat_testkit::{free_port, Client, ConnectOptions, Transport};

type R = anyhow::Result<()>;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `Key=value` lines of a unit's [Service] section.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

/// Whether the server `child` runs printed its `ready:` line on stdout within `timeout`.
async fn ready(child: &mut std::process::Child, timeout: Duration) -> bool {
    let stdout = child.stdout.take().expect("stdout");
    let seen = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("ready:"))
    });
    matches!(tokio::time::timeout(timeout, seen).await, Ok(Ok(true)))
}

/// alice@localhost (password `alice-pw`) logs in over STARTTLS on `c2s`.
async fn alice_logs_in(c2s: u16) -> R {
    let opts = ConnectOptions::new(
        Transport::StartTls {
            addr: ([127, 0, 0, 1], c2s).into(),
        },
        "alice@localhost",
        "alice-pw",
    );
    let client = Client::connect(opts).await?;
    assert!(client.jid().starts_with("alice@localhost/"));
    Ok(())
}

/// Builds the package from the test's binary into `out`; its path.
fn build(out: &Path) -> anyhow::Result<PathBuf> {
    let built = run(Command::new(repo().join("scripts/package-deb"))
        .args(["--fast", "--bin", env!("CARGO_BIN_EXE_pchat"), "--out"])
        .arg(out))?;
    std::fs::read_dir(out)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| anyhow::anyhow!("no .deb in {}: {built}", out.display()))
}

/// Run inside `unshare --mount`: overlays over /etc, /usr and /var, `dpkg -i`, what the
/// postinst made, a user added as the service's user, then the installed unit's
/// `Environment` and `ExecStart` run as its `User` (with the test's ports appended).
const INSTALL_AND_SERVE: &str = r#"set -eu
for d in etc usr var; do
  mkdir -p "$WORK/$d.upper" "$WORK/$d.work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$WORK/$d.upper,workdir=$WORK/$d.work" "/$d"
done
dpkg -i "$DEB" > "$WORK/dpkg.log" 2>&1 || { cat "$WORK/dpkg.log" >&2; exit 1; }
getent passwd pchat >&2
echo "modes: $(stat -c '%a %U:%G' /var/lib/pchat) $(stat -c '%a %U:%G' /etc/pchat/pchat.toml)" >&2
unit=/lib/systemd/system/pchat.service
user=$(sed -n 's/^User=//p' "$unit")
env=$(sed -n 's/^Environment=//p' "$unit")
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
as_user="setpriv --reuid $user --regid $user --init-groups"
echo alice-pw | env "$env" $as_user /usr/bin/pchat --data-dir /var/lib/pchat user add alice@localhost --password-stdin >&2
exec env "$env" $as_user $exec_start --c2s-port "$C2S" --c2s-tls-port "$TLS" --http-port "$HTTP" --metrics-addr ""
"#;

#[tokio::test]
async fn dpkg_installs_the_package_and_its_unit_serves_as_the_service_user() -> R {
    let work = tempfile::tempdir()?;
    let deb = build(&work.path().join("out"))?;
    let had_etc = Path::new("/etc/pchat").exists();
    let (c2s, tls, http) = (free_port()?, free_port()?, free_port()?);
    let stderr_file = work.path().join("install-stderr.txt");
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--fork"])
        .args(["sh", "-c", INSTALL_AND_SERVE])
        .env("WORK", work.path())
        .env("DEB", &deb)
        .env("C2S", c2s.to_string())
        .env("TLS", tls.to_string())
        .env("HTTP", http.to_string())
        .stdout(Stdio::piped())
        // A file, not a pipe: nothing the server writes can block it, and reading it never
        // waits for the server to end.
        .stderr(std::fs::File::create(&stderr_file)?)
        .spawn()?;
    let ok = ready(&mut child, Duration::from_secs(60)).await;
    let result = async {
        anyhow::ensure!(ok, "the installed service did not get ready");
        alice_logs_in(c2s).await
    }
    .await;
    // The server runs as the service's user, out of reach of a parent's death signal:
    // stopped by its command line, which names this test's port.
    let _ = Command::new("pkill")
        .args(["-f", &format!("/usr/bin/pchat .*serve --c2s-port {c2s} ")])
        .status();
    let _ = child.kill();
    let _ = child.wait();
    let err = std::fs::read_to_string(&stderr_file).unwrap_or_default();
    result.map_err(|e| anyhow::anyhow!("{e}; the install's stderr:\n{err}"))?;
    assert!(err.contains("pchat:x:"), "no service user: {err}");
    // The data directory the service's alone, its configuration readable by it alone.
    assert!(
        err.contains("modes: 700 pchat:pchat 640 root:pchat"),
        "{err}"
    );
    // The install went into the overlays, not the machine's own directories.
    assert!(work.path().join("etc.upper/pchat/pchat.toml").is_file());
    assert!(work.path().join("usr.upper/bin/pchat").is_file());
    assert_eq!(Path::new("/etc/pchat").exists(), had_etc);
    Ok(())
}

#[tokio::test]
async fn the_package_installs_a_hardened_service_that_serves_clients() -> R {
    let work = tempfile::tempdir()?;
    let out = work.path().join("out");
    let deb = build(&out)?;
    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb))?;
    assert!(info.contains("Package: pchat"), "{info}");
    let root = work.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let control = work.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control))?;
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles"))?.trim(),
        "/etc/pchat/pchat.toml"
    );
    let postinst = std::fs::read_to_string(control.join("postinst"))?;
    assert!(postinst.contains("adduser --system") && postinst.contains("-m 0700"));

    for file in [
        "usr/bin/pchat",
        "etc/pchat/pchat.toml",
        "usr/share/man/man1/pchat.1.gz",
        "usr/share/man/man1/pchat-serve.1.gz",
        "usr/share/man/man1/pchat-agent-run.1.gz",
        "usr/share/bash-completion/completions/pchat",
        "usr/share/zsh/vendor-completions/_pchat",
        "usr/share/fish/vendor_completions.d/pchat.fish",
        "usr/share/doc/pchat/copyright",
        "usr/share/doc/pchat/operations/monitoring.md",
    ] {
        assert!(root.join(file).is_file(), "{file} is not in the package");
    }
    let serve_unit = std::fs::read_to_string(root.join("lib/systemd/system/pchat.service"))?;
    let agent_unit = std::fs::read_to_string(root.join("lib/systemd/system/pchat-agent.service"))?;
    for (unit, user) in [(&serve_unit, "pchat"), (&agent_unit, "postgres")] {
        assert_eq!(unit_values(unit, "User"), [user]);
        for (key, value) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(unit_values(unit, key), [value], "{key} in\n{unit}");
        }
    }

    // The unit's command line, with the unpacked files instead of the installed ones.
    let exec = unit_values(&serve_unit, "ExecStart").remove(0);
    let env = unit_values(&serve_unit, "Environment").remove(0);
    let (env_key, config) = env.split_once('=').expect("KEY=VALUE");
    let unpacked = |p: &str| root.join(p.trim_start_matches('/'));
    let data = work.path().join("data");
    let mut words = exec.split_whitespace();
    let program = unpacked(words.next().expect("a program"));
    let args: Vec<String> = words
        .map(|w| {
            if w == "/var/lib/pchat" {
                data.display().to_string()
            } else {
                w.to_owned()
            }
        })
        .collect();
    assert_eq!(args.last().map(String::as_str), Some("serve"), "{exec}");
    let (c2s, tls, http) = (free_port()?, free_port()?, free_port()?);
    let mut child = Command::new(&program)
        .args(&args)
        .args([
            "--c2s-port",
            &c2s.to_string(),
            "--c2s-tls-port",
            &tls.to_string(),
        ])
        .args(["--http-port", &http.to_string(), "--metrics-addr", ""])
        .env(env_key, unpacked(config))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let started = Instant::now();
    let ok = ready(&mut child, Duration::from_secs(30)).await;
    let result = async {
        anyhow::ensure!(
            ok,
            "the packaged service did not get ready in {:?}",
            started.elapsed()
        );
        let mut add = Command::new(&program);
        add.arg("--data-dir")
            .arg(&data)
            .args(["user", "add", "alice@localhost", "--password-stdin"])
            .env(env_key, unpacked(config))
            .stdin(Stdio::piped());
        let mut adding = add.stdout(Stdio::null()).spawn()?;
        use std::io::Write as _;
        adding
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"alice-pw\n")?;
        anyhow::ensure!(adding.wait()?.success(), "user add failed");
        alice_logs_in(c2s).await
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result?;
    // The data directory the unit names is the service's own, at 0700.
    assert_mode(&data, 0o700)?;
    Ok(())
}

fn assert_mode(path: &Path, mode: u32) -> R {
    use std::os::unix::fs::PermissionsExt as _;
    let actual = std::fs::metadata(path)?.permissions().mode() & 0o777;
    anyhow::ensure!(
        actual == mode,
        "{} is {actual:o}, not {mode:o}",
        path.display()
    );
    Ok(())
}
