//! What operators watch, against the real binary: `/metrics` on the admin address (and not
//! on the public HTTP port), and log lines as text without terminal escapes or as JSON.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pchat_testkit::{https_get, ServerOptions, TestServer};

mod common;

type R = anyhow::Result<()>;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pchat"))
}

/// `GET /metrics` over plain HTTP (the admin address is loopback).
async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    common::http::admin_get(addr, "/metrics").await
}

/// The value of the sample line that starts with `name` (name and labels, exactly).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_count_what_the_server_does_on_the_admin_address_only() -> R {
    let s = TestServer::start(&bin(), ServerOptions::default()).await?;
    s.add_user("alice@localhost", "alice-pw").await?;
    s.add_user("bob@localhost", "bob-pw").await?;
    let mut alice = s.client("alice@localhost", "alice-pw").await?;
    let wrong = s.client("bob@localhost", "not-the-password").await;
    assert!(wrong.is_err());
    let room = "metrics@conference.localhost";
    alice.join_room(room, "alice", None).await?;
    let submit = pchat_testkit::Element::new("iq", pchat_testkit::ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(
            pchat_testkit::Element::new("query", pchat_testkit::ns::MUC_OWNER).with_child(
                pchat_testkit::Element::new("x", pchat_testkit::ns::DATA_FORMS)
                    .with_attr("type", "submit"),
            ),
        );
    alice.iq_result(submit, Duration::from_secs(10)).await?;
    alice.send_groupchat(room, "counted", None).await?;

    let addr: SocketAddr = format!("127.0.0.1:{}", s.ports().metrics).parse()?;
    let text = scrape(addr).await?;
    assert!(
        text.contains("content-type: text/plain; version=0.0.4"),
        "{text}"
    );
    for (name, at_least) in [
        ("pchat_logins_total{outcome=\"ok\"}", 1.0),
        ("pchat_logins_total{outcome=\"failed\"}", 1.0),
        ("pchat_sessions", 1.0),
        ("pchat_connections{transport=\"starttls\"}", 1.0),
        ("pchat_serving", 1.0),
        ("pchat_rooms_loaded", 1.0),
        ("pchat_stanzas_in_total", 3.0),
        ("pchat_deliveries_total", 2.0),
        ("pchat_commit_seconds_count", 1.0),
    ] {
        let value = sample(&text, name).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
        assert!(
            value >= at_least,
            "{name} = {value}, expected at least {at_least}"
        );
    }
    assert_eq!(sample(&text, "pchat_store_errors_total"), Some(0.0));
    // A standalone server exports no pool series.
    assert!(!text.contains("pchat_pool_failed_over{"), "{text}");
    // The dashboard beside them: this server, and no pool.
    let page = common::http::admin_get(addr, "/").await?;
    assert!(page.contains("text/html"), "{page}");
    assert!(page.contains("Standalone server"), "{page}");
    let board = common::http::dashboard(addr).await?;
    assert_eq!(board["server"]["serving"], true, "{board}");
    assert!(board["server"]["sessions"].as_u64() >= Some(1), "{board}");
    assert!(board["pool"].is_null(), "{board}");
    // Not on the public port.
    let public: SocketAddr = format!("127.0.0.1:{}", s.ports().http).parse()?;
    let reply = https_get(public, "localhost", "/metrics").await?;
    assert!(
        !reply.response.contains("pchat_logins_total"),
        "metrics on the public HTTP port: {}",
        reply.response
    );
    Ok(())
}

#[tokio::test]
async fn logs_are_plain_text_off_a_terminal_and_json_on_request() -> R {
    let text = TestServer::start(&bin(), ServerOptions::default()).await?;
    let log = std::fs::read_to_string(text.data_dir().join("pchat-test-stderr.log"))?;
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "terminal escapes in a log file: {log:?}"
    );
    drop(text);

    let opts = ServerOptions {
        extra_args: vec!["--log-format".into(), "json".into()],
        ..ServerOptions::default()
    };
    let json = TestServer::start(&bin(), opts).await?;
    let log = std::fs::read_to_string(json.data_dir().join("pchat-test-stderr.log"))?;
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON ({e}): {line}"))?;
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        lines += 1;
    }
    assert!(lines > 0, "no log lines");
    Ok(())
}
