//! Property tests (fuzzing on stable Rust) for the JIDs pchat builds from what clients and
//! operators type: account names (`auth::normalize_account`, used by SASL and the shell) and
//! the room layer's bare-JID and nick rules. No input panics; what is accepted is bounded,
//! normalized once and for all (normalizing again changes nothing), and a valid JID.
//!
//! CI runs few cases; `PROPTEST_CASES=100000 cargo test --release -p pchat-server --test
//! jid_properties` runs longer. Failures are kept in `proptest-regressions/`.

use pchat_room::rules::nick_rule;
use pchat_server::auth::normalize_account;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 64;
    }
    c
}

/// Account-name-like text: mostly ASCII with the separators and some Unicode.
fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9._-]{0,12}(@[a-z.]{0,12})?",
        "([a-zA-Z@/: \t&'\"<>]|\\PC){0,16}",
        ".{0,40}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// An accepted account is `local@domain`, lower-case, bounded, free of the characters
    /// JIDs and logs cannot take, a valid bare JID, and normalizing it again changes nothing.
    #[test]
    fn accounts_normalize_once_and_are_valid_jids(input in name_text(), upper in any::<bool>()) {
        let domain = "localhost";
        let input = if upper { input.to_uppercase() } else { input };
        if let Ok(bare) = normalize_account(&input, domain) {
            let (local, host) = bare.split_once('@').unwrap();
            prop_assert_eq!(host, domain);
            prop_assert!(!local.is_empty() && local.len() <= 1023);
            prop_assert!(!local.chars().any(|c| c.is_whitespace() || c.is_control() || "\"&'/:<>@".contains(c)));
            prop_assert_eq!(normalize_account(&bare, domain), Ok(bare.clone()));
            prop_assert!(bare.parse::<pchat_xmpp::BareJid>().is_ok(), "{bare:?} is not a bare JID");
        }
        // Another domain is always refused.
        let elsewhere = format!("{input}@elsewhere");
        prop_assert!(normalize_account(&elsewhere, domain).is_err());
    }

    /// `bare_jid` never panics, drops any resource and is idempotent.
    #[test]
    fn bare_jid_is_idempotent(input in ".{0,40}") {
        let bare = pchat_room::bare_jid(&input);
        prop_assert!(!bare.contains('/'));
        prop_assert_eq!(pchat_room::bare_jid(&bare), bare);
    }

    /// An accepted nick is bounded in characters and holds no control character.
    #[test]
    fn accepted_nicks_are_bounded(nick in ".{0,80}", max in 1usize..64) {
        if nick_rule(&nick, max).is_ok() {
            prop_assert!(nick.chars().count() <= max);
            prop_assert!(!nick.trim().is_empty());
            prop_assert!(!nick.chars().any(char::is_control));
        }
    }
}
