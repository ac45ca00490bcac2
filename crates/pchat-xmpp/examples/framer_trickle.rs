//! Times the stream framer on a large stanza fed one byte per read, against the same stanza in
//! one read: a framer that rescans an unfinished tag on every read is quadratic here.
//!
//! `cargo run --release -p pchat-xmpp --example framer_trickle [KIB]` (default 256 KiB).

use std::time::{Duration, Instant};

use pchat_xmpp::{Framer, FramerEvent, FramerLimits};

const HEADER: &str = "<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

fn run(stanza: &[u8], chunk: usize, limits: FramerLimits) -> (Duration, bool) {
    let mut f = Framer::new(limits);
    f.feed(HEADER.as_bytes());
    while f.next_event().is_some() {}
    let start = Instant::now();
    let mut ok = false;
    for c in stanza.chunks(chunk) {
        f.feed(c);
        while let Some(ev) = f.next_event() {
            ok = matches!(ev, FramerEvent::Stanza(_));
        }
    }
    (start.elapsed(), ok)
}

fn main() {
    let kib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let n = kib * 1024;
    let limits = FramerLimits {
        stanza_bytes_max: n + 1024,
        ..FramerLimits::default()
    };
    let shapes = [
        (
            "one long attribute (an unfinished tag)",
            format!("<message a='{}'/>", "x".repeat(n - 16)),
        ),
        (
            "one long body (unfinished text)",
            format!("<message><body>{}</body></message>", "y".repeat(n - 40)),
        ),
    ];
    for (what, stanza) in shapes {
        let (whole, ok1) = run(stanza.as_bytes(), stanza.len(), limits);
        let (bytewise, ok2) = run(stanza.as_bytes(), 1, limits);
        println!(
            "{kib} KiB, {what}: one read {:.2} ms, 1-byte reads {:.2} ms (stanza parsed: {ok1}/{ok2})",
            whole.as_secs_f64() * 1e3,
            bytewise.as_secs_f64() * 1e3
        );
    }
}
