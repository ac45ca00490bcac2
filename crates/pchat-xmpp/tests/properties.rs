//! Property tests (fuzzing on stable Rust) for what a client controls in `pchat-xmpp`: the
//! stream framer, the element parser, the SCRAM and PLAIN parsers and SCRAM exchange, and JID
//! parsing. Each property says what must hold for *every* input: no panic, limits respected,
//! the same events however the bytes are split, round trips, and refusal (an error, never a
//! crash or a stanza holding what XML forbids) for invalid input.
//!
//! CI runs few cases per property (seconds in all); run longer on demand with
//! `PROPTEST_CASES=100000 cargo test --release -p pchat-xmpp --test properties`. A failure
//! is shrunk and saved in `proptest-regressions/properties.txt`, which is committed so that
//! every later run tries it first; inputs that once crashed are also kept as explicit cases
//! below.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use pchat_xmpp::element::Node;
use pchat_xmpp::scram::{
    self, derive_keys_with_salt, parse_client_first, parse_plain, Credentials, ScramHash,
    ScramServer,
};
use pchat_xmpp::{ns, Element, Framer, FramerEvent, FramerLimits, StreamError};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

/// Cases per property: few in CI, `PROPTEST_CASES` when set.
fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 64;
    }
    c
}

const HEADER: &str = "<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

fn limits() -> FramerLimits {
    FramerLimits {
        stanza_bytes_max: 4096,
        header_bytes_max: 512,
    }
}

/// Feeds `bytes` cut at `cuts` (sorted positions) and collects every event; checks on the way
/// that a working framer never holds more than a stanza's (or a header's) worth of bytes.
fn run(bytes: &[u8], cuts: &[usize], limits: FramerLimits) -> Vec<FramerEvent> {
    let mut f = Framer::new(limits);
    let mut out = Vec::new();
    let mut failed = false;
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let end = end.clamp(start, bytes.len());
        f.feed(&bytes[start..end]);
        start = end;
        while let Some(e) = f.next_event() {
            failed |= matches!(e, FramerEvent::Error(..));
            out.push(e);
        }
        if !failed {
            let bound = limits.stanza_bytes_max.max(limits.header_bytes_max);
            assert!(
                f.buffered() <= bound,
                "{} bytes buffered, bound {bound}",
                f.buffered()
            );
        }
    }
    out
}

fn cut_points(len: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0..=len, 0..8).prop_map(|mut v| {
        v.sort_unstable();
        v
    })
}

/// True when `s` holds only characters of XML 1.0's `Char` production.
fn all_xml_chars(s: &str) -> bool {
    s.chars().all(|c| {
        matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
    })
}

fn element_chars_ok(el: &Element) -> bool {
    all_xml_chars(&el.name)
        && el
            .attrs
            .iter()
            .all(|(k, v)| all_xml_chars(k) && all_xml_chars(v))
        && el.children.iter().all(|n| match n {
            Node::Element(e) => element_chars_ok(e),
            Node::Text(t) => all_xml_chars(t),
        })
}

/// Pieces a stanza stream is made of, good and bad, so random sequences of them reach deep
/// into the framer's states (a purely random byte string mostly fails on its first byte).
fn fragment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"<message>".to_vec()),
        Just(b"</message>".to_vec()),
        Just(b"<body>".to_vec()),
        Just(b"</body>".to_vec()),
        Just(b"<presence/>".to_vec()),
        Just(b"<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>".to_vec()),
        Just(b"<x a='1' b=\"2\">".to_vec()),
        Just(b"</x>".to_vec()),
        Just(b"<![CDATA[ <not a tag> ]]>".to_vec()),
        Just(b"&amp;&lt;&#x41;&#65;".to_vec()),
        Just(b"&#x1;".to_vec()),
        Just(b"&lol;".to_vec()),
        Just(b"<!-- c -->".to_vec()),
        Just(b"<?pi x?>".to_vec()),
        Just(b"</stream:stream>".to_vec()),
        Just(b"caf\xc3\xa9 \xf0\x9f\x8e\x89".to_vec()),
        Just(b"\xef\xbf\xbe".to_vec()),
        Just(b"\x00\x01\x1b".to_vec()),
        Just(b"\xc3".to_vec()),
        Just(b" \t\r\n".to_vec()),
        "[ -~]{0,12}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..6),
    ]
}

fn stream_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(fragment(), 0..24).prop_map(|parts| {
        let mut out = HEADER.as_bytes().to_vec();
        for p in parts {
            out.extend_from_slice(&p);
        }
        out
    })
}

/// A random element tree with names, namespaces, attributes and text as a client may send
/// them (every XML character, the special ones included), in the parser's normal form: no
/// empty or adjacent text nodes.
fn element_tree() -> impl Strategy<Value = Element> {
    let text = "[\\PC\t\n\r&<>'\"]{1,12}".prop_filter("XML characters", |s| all_xml_chars(s));
    let name = "[a-z][a-z0-9_.-]{0,6}";
    let ns_uri = prop_oneof![
        Just(ns::CLIENT.to_owned()),
        Just("urn:xmpp:ping".to_owned()),
        Just("urn:example:a&b<c>".to_owned()),
    ];
    let attrs = proptest::collection::btree_map("[a-w][a-z]{0,4}", text.clone(), 0..3);
    let leaf = (
        name,
        ns_uri.clone(),
        attrs.clone(),
        proptest::option::of(text.clone()),
    )
        .prop_map(|(name, ns, attrs, text)| {
            let mut el = Element::new(name, ns);
            el.attrs = attrs.into_iter().collect();
            if let Some(t) = text {
                el.children.push(Node::Text(t));
            }
            el
        });
    leaf.prop_recursive(4, 24, 4, move |inner| {
        (
            "[a-z][a-z0-9]{0,6}",
            ns_uri.clone(),
            attrs.clone(),
            proptest::collection::vec(
                prop_oneof![
                    inner.prop_map(Node::Element),
                    text.clone().prop_map(Node::Text)
                ],
                0..4,
            ),
        )
            .prop_map(|(name, ns, attrs, nodes)| {
                let mut el = Element::new(name, ns);
                el.attrs = attrs.into_iter().collect();
                for n in nodes {
                    match (el.children.last_mut(), n) {
                        (Some(Node::Text(prev)), Node::Text(t)) => prev.push_str(&t),
                        (_, n) => el.children.push(n),
                    }
                }
                el
            })
    })
}

proptest! {
    #![proptest_config(config())]

    /// The framer never panics, never holds more than its bounds, and gives the same events
    /// (errors included) however the bytes are split into reads; no stanza it hands out holds
    /// a character XML forbids.
    #[test]
    fn framer_is_split_invariant_and_bounded(
        (bytes, cuts) in stream_bytes().prop_flat_map(|b| { let n = b.len(); (Just(b), cut_points(n)) })
    ) {
        let whole = run(&bytes, &[], limits());
        let split = run(&bytes, &cuts, limits());
        prop_assert_eq!(&whole, &split);
        let singles: Vec<usize> = (1..bytes.len()).collect();
        prop_assert_eq!(&whole, &run(&bytes, &singles, limits()));
        for e in &whole {
            if let FramerEvent::Stanza(el) = e {
                prop_assert!(element_chars_ok(el), "{el:?}");
            }
        }
        // After an error nothing more comes out.
        if let Some(i) = whole.iter().position(|e| matches!(e, FramerEvent::Error(..))) {
            prop_assert_eq!(i, whole.len() - 1);
        }
    }

    /// Arbitrary bytes after the header: no panic, bounded, split-invariant.
    #[test]
    fn framer_survives_random_bytes(
        (tail, cuts) in proptest::collection::vec(any::<u8>(), 0..600)
            .prop_flat_map(|b| { let n = b.len() + HEADER.len(); (Just(b), cut_points(n)) })
    ) {
        let bytes = [HEADER.as_bytes(), &tail].concat();
        prop_assert_eq!(run(&bytes, &[], limits()), run(&bytes, &cuts, limits()));
    }

    /// Serialize any element tree, send it as a stanza split anywhere: the framer gives back
    /// exactly that tree.
    #[test]
    fn stanzas_round_trip_through_the_framer(
        (el, cuts) in element_tree().prop_flat_map(|el| {
            let n = HEADER.len() + el.to_xml_in(ns::CLIENT).len();
            (Just(el), cut_points(n))
        })
    ) {
        let xml = el.to_xml_in(ns::CLIENT);
        let bytes = [HEADER.as_bytes(), xml.as_bytes()].concat();
        let big = FramerLimits { stanza_bytes_max: 1 << 20, header_bytes_max: 512 };
        let events = run(&bytes, &cuts, big);
        prop_assert_eq!(events.len(), 2, "{:?}", events);
        prop_assert_eq!(&events[1], &FramerEvent::Stanza(el.clone()));
        // And the parser alone agrees.
        prop_assert_eq!(Element::parse(xml.as_bytes(), ns::CLIENT).unwrap(), el);
    }

    /// A character XML forbids anywhere in a stanza's text or attribute, raw or as a
    /// character reference, ends the stream with not-well-formed: never a stanza.
    #[test]
    fn forbidden_characters_are_refused(
        cp in prop_oneof![0u32..0x9, Just(0xb), Just(0xc), 0xeu32..0x20, Just(0xfffe), Just(0xffff), 0xd800u32..0xe000],
        as_ref in any::<bool>(),
        in_attr in any::<bool>(),
        before in "[a-z ]{0,5}",
        cuts in cut_points(120),
    ) {
        let bad: Vec<u8> = match (as_ref, char::from_u32(cp)) {
            (false, Some(c)) => c.to_string().into_bytes(),
            // Surrogates cannot be encoded in UTF-8; their 3-byte form is invalid UTF-8.
            (false, None) => vec![0xed, 0xa0 | ((cp >> 6) & 0x1f) as u8, 0x80 | (cp & 0x3f) as u8],
            (true, _) => format!("&#x{cp:X};").into_bytes(),
        };
        let stanza = if in_attr {
            [b"<message a='".as_slice(), before.as_bytes(), &bad, b"'/>"].concat()
        } else {
            [b"<message><body>".as_slice(), before.as_bytes(), &bad, b"</body></message>"].concat()
        };
        let bytes = [HEADER.as_bytes(), &stanza].concat();
        let events = run(&bytes, &cuts, limits());
        prop_assert_eq!(events.len(), 2, "{:?}", events);
        prop_assert!(
            matches!(&events[1], FramerEvent::Error(StreamError::NotWellFormed, _)),
            "{:?}", events
        );
    }

    /// An end tag that names another element than the open one is refused when it arrives,
    /// whatever follows.
    #[test]
    fn mismatched_end_tags_are_refused_at_once(
        open in "[a-z]{1,6}",
        close in "[a-z]{1,6}",
        inner in "[a-z ]{0,10}",
    ) {
        prop_assume!(open != close);
        let bytes = format!("{HEADER}<message><{open}>{inner}</{close}>");
        let events = run(bytes.as_bytes(), &[], limits());
        prop_assert!(
            matches!(events.last(), Some(FramerEvent::Error(StreamError::NotWellFormed, t)) if t.contains("does not match")),
            "{:?}", events
        );
    }

    /// The parser never panics on arbitrary bytes, and what it accepts serializes to bytes it
    /// parses again to the same tree.
    #[test]
    fn parser_survives_and_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(el) = Element::parse(&bytes, ns::CLIENT) {
            prop_assert!(element_chars_ok(&el));
            let again = Element::parse(el.to_xml_in(ns::CLIENT).as_bytes(), ns::CLIENT).unwrap();
            prop_assert_eq!(again, el);
        }
    }

    /// Serialization never writes a character XML forbids, whatever an element holds.
    #[test]
    fn serialization_never_writes_forbidden_characters(text in ".{0,20}", attr in ".{0,20}") {
        let el = Element::new("m", ns::CLIENT).attr("a", attr).text(text);
        let xml = el.to_xml();
        prop_assert!(all_xml_chars(&xml), "{xml:?}");
        prop_assert!(Element::parse(xml.as_bytes(), "").is_ok());
    }
}

// ---------------------------------------------------------------------------------------------
// SASL

/// RFC 5802's saslname escaping of a user name.
fn saslname(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

fn hmac256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

proptest! {
    #![proptest_config(config())]

    /// No client message makes the SCRAM or PLAIN parsers panic; what they accept has a user
    /// name, and a SCRAM exchange fed junk as its final message fails rather than succeeds.
    #[test]
    fn sasl_parsers_survive_anything(
        first in proptest::collection::vec(any::<u8>(), 0..120),
        last in proptest::collection::vec(any::<u8>(), 0..160),
    ) {
        if let Ok(parsed) = parse_client_first(&first) {
            prop_assert!(!parsed.username.is_empty());
            let keys = scram::derive_keys(ScramHash::Sha256, "pw", 1);
            let (server, _) = ScramServer::start(ScramHash::Sha256, &parsed, Credentials::Known(keys));
            prop_assert!(server.finish(&last).is_err());
        }
        if let Ok((user, pass)) = parse_plain(&first) {
            prop_assert!(!user.contains('\0') && !pass.contains('\0'));
        }
        let _ = parse_plain(&last);
    }

    /// Structured junk reaches further than random bytes: a GS2 header and attributes in any
    /// order, with odd escapes.
    #[test]
    fn scram_first_messages_with_structure(
        cb in prop_oneof![Just("n"), Just("y"), Just("p=tls-unique"), Just("x")],
        authzid in prop_oneof![Just(String::new()), "a=[a-z=,2CD3]{0,6}"],
        parts in proptest::collection::vec(prop_oneof!["n=[a-z=,2CD3]{0,6}", "r=[ -~]{0,8}", "m=x", "[a-z]=[a-z]{0,3}"], 0..5),
    ) {
        let msg = format!("{cb},{authzid},{}", parts.join(","));
        let _ = parse_client_first(msg.as_bytes());
    }

    /// A correct client succeeds and a client whose proof is off by one bit fails, for every
    /// user name (escapes included), password, salt and nonce; an unknown user fails with the
    /// correct proof for its made-up keys too.
    #[test]
    fn scram_exchange_round_trips(
        user in "[^\u{0}]{1,12}",
        password in ".{0,16}",
        salt in proptest::collection::vec(any::<u8>(), 1..24),
        iterations in 1u32..8,
        nonce in "[!-+--~]{1,16}",
        flip in any::<prop::sample::Index>(),
    ) {
        let hash = ScramHash::Sha256;
        let keys = derive_keys_with_salt(hash, &password, salt.clone(), iterations);
        let first_bare = format!("n={},r={nonce}", saslname(&user));
        let first = parse_client_first(format!("n,,{first_bare}").as_bytes()).unwrap();
        prop_assert_eq!(&first.username, &user);

        let client_final = |server_first: &str, keys: &scram::ScramKeys, flip: Option<usize>| {
            let r = server_first.split(',').find_map(|p| p.strip_prefix("r=")).unwrap();
            let without_proof = format!("c=biws,r={r}");
            let auth = format!("{first_bare},{server_first},{without_proof}");
            let mut salted = [0u8; 32];
            pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &keys.salt, keys.iterations, &mut salted);
            let client_key = hmac256(&salted, b"Client Key");
            let stored = Sha256::digest(&client_key);
            let signature = hmac256(&stored, auth.as_bytes());
            let mut proof: Vec<u8> = client_key.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
            if let Some(i) = flip {
                proof[i % 32] ^= 1;
            }
            format!("{without_proof},p={}", B64.encode(proof))
        };
        let (server, server_first) = ScramServer::start(hash, &first, Credentials::Known(keys.clone()));
        let server_first = String::from_utf8(server_first).unwrap();
        prop_assert!(server.finish(client_final(&server_first, &keys, None).as_bytes()).is_ok());
        let (server, server_first) = ScramServer::start(hash, &first, Credentials::Known(keys.clone()));
        let server_first = String::from_utf8(server_first).unwrap();
        let bad = client_final(&server_first, &keys, Some(flip.index(32)));
        prop_assert!(server.finish(bad.as_bytes()).is_err());
        // Unknown user: even the proof for its own made-up salt and iterations fails.
        let decoy = scram::decoy_keys(hash, b"secret", &user);
        let (server, server_first) = ScramServer::start(hash, &first, Credentials::Unknown(decoy.clone()));
        let server_first = String::from_utf8(server_first).unwrap();
        prop_assert!(server.finish(client_final(&server_first, &decoy, None).as_bytes()).is_err());
    }

    /// PLAIN messages round-trip: authzid, user and password without NUL come back as sent.
    #[test]
    fn plain_round_trips(user in "[^\u{0}@]{0,12}", pass in "[^\u{0}]{0,16}") {
        let msg = format!("\0{user}\0{pass}");
        prop_assert_eq!(parse_plain(msg.as_bytes()).unwrap(), (user.clone(), pass));
        let with_authzid = format!("{user}@localhost\0{user}\0x");
        prop_assert!(parse_plain(with_authzid.as_bytes()).is_ok());
    }
}

// ---------------------------------------------------------------------------------------------
// JIDs

proptest! {
    #![proptest_config(config())]

    /// JID parsing never panics; what parses prints as a JID that parses to the same value,
    /// with every part within RFC 7622's 1023 bytes.
    #[test]
    fn jids_parse_print_and_reparse(s in "([a-zA-Z0-9@/.\\-_ ]|\\PC){0,40}") {
        if let Ok(jid) = s.parse::<pchat_xmpp::Jid>() {
            let printed = jid.to_string();
            let again: pchat_xmpp::Jid = printed.parse().unwrap();
            prop_assert_eq!(&again, &jid);
            prop_assert!(jid.node().is_none_or(|n| n.as_str().len() <= 1023));
            prop_assert!(jid.domain().as_str().len() <= 1023);
            prop_assert!(jid.resource().is_none_or(|r| r.as_str().len() <= 1023));
        }
    }

    /// Structured JIDs: a valid node, domain and resource parse to exactly those parts.
    #[test]
    fn jids_keep_their_parts(
        node in "[a-z0-9._-]{1,12}",
        domain in "[a-z0-9]{1,10}(\\.[a-z]{2,5}){0,2}",
        resource in proptest::option::of("[ -~]{1,12}"),
    ) {
        let text = match &resource {
            Some(r) => format!("{node}@{domain}/{r}"),
            None => format!("{node}@{domain}"),
        };
        if let Ok(jid) = text.parse::<pchat_xmpp::Jid>() {
            prop_assert_eq!(jid.node().map(|n| n.as_str().to_owned()), Some(node));
            prop_assert_eq!(jid.domain().as_str(), domain.as_str());
            prop_assert_eq!(jid.resource().map(|r| r.as_str().to_owned()), resource);
        }
    }
}
