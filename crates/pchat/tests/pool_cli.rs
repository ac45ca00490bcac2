//! The pool commands of the management shell against a real 3-member etcd.

use std::path::PathBuf;
use std::process::Command;

use pchat_testkit::etcd::EtcdCluster;

fn pchat(args: &[&str], etcd: &str) -> std::process::Output {
    Command::new(PathBuf::from(env!("CARGO_BIN_EXE_pchat")))
        .args(args)
        .env("PCHAT_ETCD", etcd)
        .output()
        .expect("run pchat")
}

fn topology(eps: &[String]) -> String {
    let eps = eps
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "insecure = true\nshare = \"/tmp/share\"\netcd = [{eps}]\n[pool]\nname = \"pc1\"\ndomain = \"localhost\"\nactive_servers_max = 2\n\
         [[sites]]\nname = \"A\"\nrole = \"primary\"\ndatabase = {{ name = \"a_db\", address = \"127.0.0.1:5432\", agent = \"http://127.0.0.1:7070\" }}\n\
         [[sites]]\nname = \"B\"\nrole = \"backup\"\ndatabase = {{ name = \"b_db\", address = \"127.0.0.1:5433\", agent = \"http://127.0.0.1:7071\" }}\n\
         [[servers]]\nname = \"a1\"\nsite = \"A\"\naddress = \"127.0.0.1:5222\"\n\
         [[servers]]\nname = \"a2\"\nsite = \"A\"\naddress = \"127.0.0.1:5322\"\n\
         [[servers]]\nname = \"a3\"\nsite = \"A\"\naddress = \"127.0.0.1:5522\"\n\
         [[servers]]\nname = \"b1\"\nsite = \"B\"\naddress = \"127.0.0.1:5422\"\n"
    )
}

#[tokio::test]
async fn topology_and_pool_commands() -> anyhow::Result<()> {
    let cluster = EtcdCluster::start(3).await?;
    let eps = cluster.endpoints();
    let etcd = eps.join(",");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("topology.toml");

    // A bad file: every problem with its line, nothing published.
    std::fs::write(
        &file,
        topology(&eps).replace("site = \"B\"", "site = \"Z\""),
    )?;
    let out = pchat(
        &["topology", "validate", file.to_str().unwrap_or_default()],
        &etcd,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr)?;
    assert!(
        err.contains("line 30") && err.contains("unknown site `Z`"),
        "{err}"
    );
    let out = pchat(&["pool", "get", "pc1"], &etcd);
    assert!(
        String::from_utf8(out.stderr)?.contains("topology publish"),
        "unpublished pool says how to fix"
    );

    std::fs::write(&file, topology(&eps))?;
    let out = pchat(
        &["topology", "validate", file.to_str().unwrap_or_default()],
        &etcd,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pchat(
        &["topology", "publish", file.to_str().unwrap_or_default()],
        &etcd
    )
    .status
    .success());

    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let v = json(pchat(
        &["--json", "pool", "set-active-servers", "pc1", "a1", "a2"],
        &etcd,
    ));
    assert_eq!(v["active_servers"], serde_json::json!(["a1", "a2"]));
    // The seed's IMPORTANT note: servers outside the authoritative site are refused.
    let out = pchat(&["pool", "set-active-servers", "pc1", "a1", "b1"], &etcd);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)?.contains("--allow-remote-site"));
    // More than active_servers_max is refused.
    let out = pchat(
        &["pool", "set-active-servers", "pc1", "a1", "a2", "a3"],
        &etcd,
    );
    assert!(String::from_utf8(out.stderr)?.contains("at most 2"));
    let v = json(pchat(
        &[
            "--json",
            "pool",
            "set-active-servers",
            "pc1",
            "--remove",
            "a2",
        ],
        &etcd,
    ));
    assert_eq!(v["active_servers"], serde_json::json!(["a1"]));
    let v = json(pchat(
        &["--json", "pool", "set-active-servers", "pc1", "--none"],
        &etcd,
    ));
    assert_eq!(v["active_servers"], serde_json::json!([]));
    let v = json(pchat(
        &["--json", "pool", "set-state", "pc1", "failed-over"],
        &etcd,
    ));
    assert_eq!(v["state"], "FailedOver");
    let v = json(pchat(
        &["--json", "pool", "set-active-servers", "pc1", "b1"],
        &etcd,
    ));
    assert_eq!(v["active_servers"], serde_json::json!(["b1"]));
    let out = pchat(&["pool", "set-state", "pc1", "sideways"], &etcd);
    assert!(String::from_utf8(out.stderr)?.contains("normal"));
    let v = json(pchat(&["--json", "pool", "get", "pc1"], &etcd));
    assert_eq!(v["epoch"], 6);
    // Bad usage is exit code 2.
    assert_eq!(
        pchat(
            &["pool", "set-active-servers", "pc1", "a1", "--none"],
            &etcd
        )
        .status
        .code(),
        Some(2)
    );
    Ok(())
}
