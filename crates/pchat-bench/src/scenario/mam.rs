//! `mam`: archive query latency on one room pre-filled with M messages: the latest page
//! (`<before/>` with `<max>20</max>`, what a client asks for when it opens a room) and a
//! full-text search for a word that matches 1% of the archive.
//!
//! The pre-fill doubles as an archive-write measurement: one sender keeps a window of
//! messages in flight and counts reflections, and all three servers reflect only after the
//! archive write, so it is durable-write throughput through one room.
//!
//! Full-text support differs: pchat implements XEP-0431 and accepts ejabberd's `withtext`,
//! ejabberd 23 has `withtext`, Prosody 0.12 has none. Each full-text reply is checked: a
//! server that ignores the filter (returns messages without the word) or refuses it is
//! reported as unsupported rather than as fast.

use std::time::Duration;

use anyhow::bail;
use serde_json::{json, Map};
use tokio::time::Instant;

use super::{fill_room, join, login_all, Client, Ctx, Report};
use crate::conn::Next;
use crate::stats::{CpuMark, Latency};
use crate::xml;

/// Parameters of the MAM scenario.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Messages to pre-fill the room with.
    #[arg(long, default_value_t = 2000)]
    pub messages: usize,
    /// The room already holds this many messages (loaded in bulk by the harness): skip the
    /// pre-fill and check that the latest page ends at this count.
    #[arg(long)]
    pub prefilled: Option<usize>,
    /// Pre-fill window: messages in flight at once.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Queries of each kind.
    #[arg(long, default_value_t = 100)]
    pub queries: usize,
    /// Page size.
    #[arg(long, default_value_t = 20)]
    pub page: usize,
    /// Data-form field for full-text search (`withtext` is understood by ejabberd and pchat;
    /// XEP-0431's is `{urn:xmpp:fulltext:0}fulltext`).
    #[arg(long, default_value = "withtext")]
    pub fulltext_field: String,
}

/// Outcome of one query.
struct QueryResult {
    us: u32,
    results: usize,
    all_match: bool,
}

async fn query(
    c: &mut Client,
    room: &str,
    id: &str,
    page: usize,
    text: Option<(&str, &str)>,
    deadline: Instant,
) -> anyhow::Result<QueryResult> {
    let form = match text {
        None => String::new(),
        Some((field, word)) => format!(
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>\
             <value>urn:xmpp:mam:2</value></field><field var='{}'><value>{}</value></field></x>",
            xml::escape(field),
            xml::escape(word)
        ),
    };
    let started = Instant::now();
    c.w.send(&format!(
        "<iq type='set' id='{id}' to='{room}'><query xmlns='urn:xmpp:mam:2' queryid='{id}'>{form}\
         <set xmlns='http://jabber.org/protocol/rsm'><max>{page}</max><before/></set></query></iq>"
    ))
    .await?;
    let mut results = 0;
    let mut all_match = true;
    let needle = text.map(|(_, w)| format!(" {w} "));
    loop {
        let Some(Next::Elem(el)) = c.r.next(deadline).await? else {
            bail!("MAM query {id} timed out");
        };
        match xml::name(el) {
            b"message" if xml::child_attr(el, "result", "queryid") == Some(id.as_bytes()) => {
                results += 1;
                if let Some(n) = &needle {
                    let body = xml::child_text(el, "body").unwrap_or_default();
                    let mut padded = Vec::with_capacity(body.len() + 2);
                    padded.push(b' ');
                    padded.extend_from_slice(body);
                    padded.push(b' ');
                    all_match &= xml::contains(&padded, n.as_bytes());
                }
            }
            b"iq" if xml::attr(el, "id") == Some(id.as_bytes()) => {
                if xml::attr(el, "type") != Some(b"result") {
                    bail!("MAM query refused: {}", xml::show(el));
                }
                break;
            }
            _ => {}
        }
    }
    Ok(QueryResult {
        us: started.elapsed().as_micros().min(u32::MAX as u128) as u32,
        results,
        all_match,
    })
}

/// The newest message's body, by a latest-page query of one.
async fn query_last_body(
    c: &mut Client,
    room: &str,
    deadline: Instant,
) -> anyhow::Result<(usize, String)> {
    c.w.send(&format!(
        "<iq type='set' id='chk' to='{room}'><query xmlns='urn:xmpp:mam:2' queryid='chk'>\
         <set xmlns='http://jabber.org/protocol/rsm'><max>1</max><before/></set></query></iq>"
    ))
    .await?;
    let mut body = String::new();
    let mut n = 0;
    loop {
        let Some(Next::Elem(el)) = c.r.next(deadline).await? else {
            bail!("MAM query timed out");
        };
        match xml::name(el) {
            b"message" if xml::child_attr(el, "result", "queryid") == Some(b"chk") => {
                n += 1;
                body = String::from_utf8_lossy(xml::child_text(el, "body").unwrap_or_default())
                    .into_owned();
            }
            b"iq" if xml::attr(el, "id") == Some(b"chk") => {
                if xml::attr(el, "type") != Some(b"result") {
                    bail!("MAM query refused: {}", xml::show(el));
                }
                return Ok((n, body));
            }
            _ => {}
        }
    }
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &Args) -> anyhow::Result<Report> {
    if a.messages == 0 || a.queries == 0 || a.page == 0 {
        bail!("messages, queries and page must be positive");
    }
    let room = ctx.room(0);
    let mut c = login_all(ctx, 0..1).await?.pop().expect("one client");
    let deadline = Instant::now() + Duration::from_secs(1200);
    join(&mut c, &room, deadline).await?;
    let fill_mark = CpuMark::start(ctx.server_pid);
    let (messages, fill_rate) = match a.prefilled {
        Some(n) => {
            // The newest message must be the bulk load's last one, or the server is not
            // querying the archive we think it is.
            let want = format!(" {} ", super::fill_body(n - 1));
            let d = Instant::now() + Duration::from_secs(60);
            let (_, last) = query_last_body(&mut c, &room, d).await?;
            if !format!(" {last} ").contains(&want) {
                bail!("room {room} is not pre-filled: newest body is {last:?}, expected {want:?}");
            }
            (n, None)
        }
        None => (
            a.messages,
            Some(fill_room(&mut c, &room, a.messages, a.window, deadline).await?),
        ),
    };
    let fill_cpu = fill_mark.stop(ctx.server_pid);

    let mark = CpuMark::start(ctx.server_pid);
    let mut latest = Vec::with_capacity(a.queries);
    let mut short_pages = 0;
    for q in 0..a.queries {
        let d = Instant::now() + Duration::from_secs(30);
        let r = query(&mut c, &room, &format!("l{q}"), a.page, None, d).await?;
        if r.results < a.page.min(messages) {
            short_pages += 1;
        }
        latest.push(r.us);
    }
    let latest = Latency::from_us(&mut latest);

    let mut text = Vec::with_capacity(a.queries);
    let mut text_results = 0usize;
    let mut text_problem: Option<String> = None;
    for q in 0..a.queries {
        let word = super::fill_word(q * 37);
        let d = Instant::now() + Duration::from_secs(30);
        match query(
            &mut c,
            &room,
            &format!("t{q}"),
            a.page,
            Some((&a.fulltext_field, &word)),
            d,
        )
        .await
        {
            Ok(r) if r.all_match && r.results > 0 => {
                text_results += r.results;
                text.push(r.us);
            }
            Ok(r) => {
                text_problem = Some(if r.results == 0 {
                    "no results for a word present in 1% of messages".into()
                } else {
                    "filter ignored: results without the word".into()
                });
                break;
            }
            Err(e) => {
                text_problem = Some(format!("{e:#}"));
                break;
            }
        }
    }
    let cpu = mark.stop(ctx.server_pid);
    let text = (text_problem.is_none()).then(|| Latency::from_us(&mut text));
    c.w.close().await;

    let mut detail = Map::new();
    detail.insert("messages".into(), json!(messages));
    detail.insert("prefilled".into(), json!(a.prefilled.is_some()));
    detail.insert("page".into(), json!(a.page));
    detail.insert("queries".into(), json!(a.queries));
    detail.insert("latest_page".into(), json!(latest));
    detail.insert("latest_short_pages".into(), json!(short_pages));
    detail.insert("fulltext".into(), json!(text));
    detail.insert("fulltext_results".into(), json!(text_results));
    detail.insert("fulltext_unsupported".into(), json!(text_problem));
    detail.insert("fill_cpu".into(), json!(fill_cpu));
    detail.insert("query_cpu".into(), json!(cpu));
    Ok(Report {
        scenario: "mam",
        headline: vec![
            ("latest_p50_ms", Some(latest.p50_ms), "lower"),
            ("latest_p99_ms", Some(latest.p99_ms), "lower"),
            ("fulltext_p50_ms", text.as_ref().map(|l| l.p50_ms), "lower"),
            ("fulltext_p99_ms", text.as_ref().map(|l| l.p99_ms), "lower"),
            ("archive_fill_msgs_per_s", fill_rate, "higher"),
            (
                "fill_server_cores",
                fill_rate.and(fill_cpu.server_cores),
                "lower",
            ),
        ],
        detail,
    })
}
