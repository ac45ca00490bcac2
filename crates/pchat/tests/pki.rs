//! `pchat pki init|issue` and `pchat topology validate --pki`, with the real binary.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command, Output};

fn pchat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pchat"))
        .args(args)
        .output()
        .expect("run pchat")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const TOPOLOGY: &str = r#"share = "/srv/share"
etcd = ["https://127.0.0.1:2379", "https://127.0.0.2:2379"]

[pool]
name = "pc1"
domain = "localhost"

[[sites]]
name = "A"
role = "primary"
database = { name = "a_db", address = "127.0.0.1:5432", agent = "https://127.0.0.1:7070" }
mirror = { name = "a_mirror", address = "127.0.0.1:5433", agent = "https://127.0.0.1:7071" }

[[servers]]
name = "a1"
site = "A"
address = "127.0.0.1:5222"
"#;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o777
}

#[test]
fn pki_issues_every_identity_and_validate_checks_them() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let topo = dir.path().join("topology.toml");
    std::fs::write(&topo, TOPOLOGY).unwrap();
    let (pki_s, topo_s) = (pki.to_str().unwrap(), topo.to_str().unwrap());

    let o = pchat(&["pki", "init", "--dir", pki_s, "--pool", "pc1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(mode(&pki), 0o700);
    assert_eq!(mode(&pki.join("ca.key")), 0o600);
    // The CA is never replaced.
    let o = pchat(&["pki", "init", "--dir", pki_s, "--pool", "pc1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("a CA already exists"), "{}", text(&o));

    // Before issuing, validate names what is missing.
    let o = pchat(&["topology", "validate", topo_s, "--pki", pki_s]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("instance a_db"), "{}", text(&o));

    let o = pchat(&[
        "pki",
        "issue",
        "--dir",
        pki_s,
        "--topology",
        topo_s,
        "--operator",
        "admin",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for id in [
        "instances/a_db",
        "instances/a_mirror",
        "servers/a1",
        "etcd/1",
        "etcd/2",
        "operators/admin",
    ] {
        let d = pki.join(id);
        assert_eq!(mode(&d), 0o700, "{id}");
        assert_eq!(mode(&d.join("key.pem")), 0o600, "{id}");
        assert!(
            d.join("cert.pem").exists() && d.join("ca.crt").exists(),
            "{id}"
        );
        // etcd members authenticate with their certificate alone; everyone else has a user.
        assert_eq!(
            d.join("etcd.password").exists(),
            !id.starts_with("etcd"),
            "{id}"
        );
    }
    let o = pchat(&["topology", "validate", topo_s, "--pki", pki_s]);
    assert!(o.status.success(), "{}", text(&o));

    // Re-running keeps everything; a new server gets its identity; the old ones are kept.
    let key_before = std::fs::read(pki.join("instances/a_db/key.pem")).unwrap();
    let grown = format!(
        "{TOPOLOGY}\n[[servers]]\nname = \"a2\"\nsite = \"A\"\naddress = \"127.0.0.1:5322\"\n"
    );
    std::fs::write(&topo, grown).unwrap();
    let o = pchat(&["topology", "validate", topo_s, "--pki", pki_s]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("server a2"), "{}", text(&o));
    let o = pchat(&[
        "--json",
        "pki",
        "issue",
        "--dir",
        pki_s,
        "--topology",
        topo_s,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let created: Vec<_> = report
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["certificate"] == "created")
        .map(|r| r["identity"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(created, ["server a2"]);
    assert_eq!(
        std::fs::read(pki.join("instances/a_db/key.pem")).unwrap(),
        key_before
    );
    let o = pchat(&["topology", "validate", topo_s, "--pki", pki_s]);
    assert!(o.status.success(), "{}", text(&o));

    // A key readable by others is refused, with the fix.
    std::fs::set_permissions(
        pki.join("servers/a1/key.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let o = pchat(&["topology", "validate", topo_s, "--pki", pki_s]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("chmod 600"), "{}", text(&o));
}

#[test]
fn plain_http_needs_an_explicit_insecure_pool_which_warns() {
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("topology.toml");
    let plain = TOPOLOGY.replace("https://", "http://");
    std::fs::write(&topo, &plain).unwrap();
    let o = pchat(&["topology", "validate", topo.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("only with `insecure = true`"),
        "{}",
        text(&o)
    );
    std::fs::write(&topo, format!("insecure = true\n{plain}")).unwrap();
    let o = pchat(&["topology", "validate", topo.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("WARNING: pool pc1 is insecure"),
        "{}",
        text(&o)
    );
}
