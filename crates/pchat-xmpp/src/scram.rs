//! The server side of SASL SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677), and PLAIN
//! checking against the same stored keys. Passwords are never stored: only salt, iteration
//! count, StoredKey and ServerKey, so a stolen database does not reveal them.
//!
//! A user name without an account must be indistinguishable from one with an account and a
//! wrong password, or logins enumerate accounts. So an unknown user gets made-up keys
//! ([`decoy_keys`]): a salt of the length and an iteration count of a real one, derived with
//! HMAC-SHA-256 from the server secret (which the store keeps, the same on every server of a
//! pool) and the name, so it is the same at every try and on every server yet cannot be
//! computed from outside; and PLAIN runs the same PBKDF2 for them as for a real user.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// The hash a SCRAM mechanism uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScramHash {
    /// SCRAM-SHA-1.
    Sha1,
    /// SCRAM-SHA-256.
    Sha256,
}

impl ScramHash {
    /// SASL mechanism name.
    pub fn mechanism(self) -> &'static str {
        match self {
            ScramHash::Sha1 => "SCRAM-SHA-1",
            ScramHash::Sha256 => "SCRAM-SHA-256",
        }
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => {
                let mut m =
                    <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            ScramHash::Sha256 => {
                let mut m =
                    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => Sha1::digest(data).to_vec(),
            ScramHash::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        PBKDF2_RUNS.with(|n| n.set(n.get() + 1));
        match self {
            ScramHash::Sha1 => {
                let mut out = [0u8; 20];
                pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out);
                out.to_vec()
            }
            ScramHash::Sha256 => {
                let mut out = [0u8; 32];
                pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
                out.to_vec()
            }
        }
    }
}

/// Stored SCRAM keys for one hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramKeys {
    /// Salt.
    pub salt: Vec<u8>,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// H(ClientKey).
    pub stored_key: Vec<u8>,
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: Vec<u8>,
}

/// Iterations for new credentials: RFC 7677 asks for at least 4096.
pub const ITERATIONS_DEFAULT: u32 = 4096;

/// Salt length of new credentials, in bytes (and so of made-up ones).
pub const SALT_BYTES: usize = 16;

thread_local! {
    /// PBKDF2 derivations run on this thread: lets a test show that a login for an unknown
    /// user does the same work as one for a known user, without timing anything.
    static PBKDF2_RUNS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many PBKDF2 derivations this thread has run (a counter for tests).
pub fn pbkdf2_runs_on_this_thread() -> u64 {
    PBKDF2_RUNS.with(std::cell::Cell::get)
}

/// Made-up keys for `username`, which has no account: what the exchange shows of them (the
/// salt, of a real salt's length, and the default iteration count) looks like a real user's,
/// is the same at every try and on every server sharing `secret`, and cannot be computed
/// without `secret`. Each mechanism gets its own salt, as real credentials do.
pub fn decoy_keys(hash: ScramHash, secret: &[u8], username: &str) -> ScramKeys {
    let derive = |label: &[u8]| {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
        m.update(b"pchat decoy ");
        m.update(label);
        m.update(b"\0");
        m.update(hash.mechanism().as_bytes());
        m.update(b"\0");
        m.update(username.as_bytes());
        m.finalize().into_bytes()
    };
    let out_len = hash.hash(b"").len();
    ScramKeys {
        salt: derive(b"salt")[..SALT_BYTES].to_vec(),
        iterations: ITERATIONS_DEFAULT,
        stored_key: derive(b"stored key")[..out_len].to_vec(),
        server_key: derive(b"server key")[..out_len].to_vec(),
    }
}

/// What the server holds for the user a client names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// The account's stored keys.
    Known(ScramKeys),
    /// No such account: keys from [`decoy_keys`], which no password matches.
    Unknown(ScramKeys),
}

impl Credentials {
    /// The stored keys when the account exists, made-up ones from `secret` otherwise.
    pub fn of(
        hash: ScramHash,
        stored: Option<ScramKeys>,
        secret: &[u8],
        username: &str,
    ) -> Credentials {
        match stored {
            Some(keys) => Credentials::Known(keys),
            None => Credentials::Unknown(decoy_keys(hash, secret, username)),
        }
    }

    fn keys(&self) -> &ScramKeys {
        match self {
            Credentials::Known(k) | Credentials::Unknown(k) => k,
        }
    }
}

/// Checks a PLAIN password. The PBKDF2 derivation runs for unknown users too, against their
/// made-up keys, so the answer takes as long either way; it is `false` for them whatever the
/// password.
pub fn verify_plain(hash: ScramHash, credentials: &Credentials, password: &str) -> bool {
    let matches = verify_password(hash, credentials.keys(), password);
    matches && matches!(credentials, Credentials::Known(_))
}

/// Derives stored keys from a password with a fresh random salt.
pub fn derive_keys(hash: ScramHash, password: &str, iterations: u32) -> ScramKeys {
    let mut salt = vec![0u8; SALT_BYTES];
    rand::thread_rng().fill_bytes(&mut salt);
    derive_keys_with_salt(hash, password, salt, iterations)
}

/// Derives stored keys with a given salt (tests and imports).
pub fn derive_keys_with_salt(
    hash: ScramHash,
    password: &str,
    salt: Vec<u8>,
    iterations: u32,
) -> ScramKeys {
    let salted = hash.salted_password(password.as_bytes(), &salt, iterations);
    let client_key = hash.hmac(&salted, b"Client Key");
    let stored_key = hash.hash(&client_key);
    let server_key = hash.hmac(&salted, b"Server Key");
    ScramKeys {
        salt,
        iterations,
        stored_key,
        server_key,
    }
}

/// Checks a plain password against stored keys (SASL PLAIN over TLS) in constant time.
pub fn verify_password(hash: ScramHash, keys: &ScramKeys, password: &str) -> bool {
    let salted = hash.salted_password(password.as_bytes(), &keys.salt, keys.iterations);
    let stored = hash.hash(&hash.hmac(&salted, b"Client Key"));
    constant_time_eq(&stored, &keys.stored_key)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a SCRAM exchange failed; all map to the SASL conditions in [`ScramError::condition`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// The client message does not follow RFC 5802.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// Channel binding was requested; pchat does not offer the -PLUS mechanisms.
    #[error("channel binding is not supported")]
    ChannelBinding,
    /// Authorization identity differs from the authentication identity.
    #[error("authorization identity not allowed")]
    InvalidAuthzid,
    /// The proof does not match: wrong password or unknown user.
    #[error("wrong credentials")]
    NotAuthorized,
}

impl ScramError {
    /// The SASL failure condition element name.
    pub fn condition(&self) -> &'static str {
        match self {
            ScramError::Malformed(_) | ScramError::ChannelBinding => "malformed-request",
            ScramError::InvalidAuthzid => "invalid-authzid",
            ScramError::NotAuthorized => "not-authorized",
        }
    }
}

/// The first client message, parsed.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientFirst {
    /// The username (`n=`), unescaped.
    pub username: String,
    gs2_header: String,
    bare: String,
    nonce: String,
}

/// Parses `client-first-message`.
pub fn parse_client_first(msg: &[u8]) -> Result<ClientFirst, ScramError> {
    let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let (cb, rest) = msg
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    match cb {
        "n" | "y" => {}
        c if c.starts_with("p=") => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed("bad channel-binding flag")),
    }
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    let gs2_header = format!("{cb},{authzid},");
    let mut username = None;
    let mut nonce = None;
    for part in bare.split(',') {
        if let Some(v) = part.strip_prefix("n=") {
            username = Some(unescape_saslname(v)?);
        } else if let Some(v) = part.strip_prefix("r=") {
            nonce = Some(v.to_owned());
        } else if part.starts_with("m=") {
            return Err(ScramError::Malformed("mandatory extension not supported"));
        }
    }
    let username = username
        .filter(|u| !u.is_empty())
        .ok_or(ScramError::Malformed("no username"))?;
    let nonce = nonce
        .filter(|n| !n.is_empty())
        .ok_or(ScramError::Malformed("no nonce"))?;
    if let Some(a) = authzid.strip_prefix("a=") {
        let a = unescape_saslname(a)?;
        // Only "act as myself" is allowed: the authzid may be the bare JID of the same user.
        let local = a.split('@').next().unwrap_or_default();
        if !local.eq_ignore_ascii_case(&username) && !a.eq_ignore_ascii_case(&username) {
            return Err(ScramError::InvalidAuthzid);
        }
    } else if !authzid.is_empty() {
        return Err(ScramError::Malformed("bad authzid"));
    }
    Ok(ClientFirst {
        username,
        gs2_header,
        bare: bare.to_owned(),
        nonce,
    })
}

fn unescape_saslname(s: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(s.len());
    let mut it = s.split('=');
    out.push_str(it.next().unwrap_or_default());
    for piece in it {
        if let Some(rest) = piece.strip_prefix("2C") {
            out.push(',');
            out.push_str(rest);
        } else if let Some(rest) = piece.strip_prefix("3D") {
            out.push('=');
            out.push_str(rest);
        } else {
            return Err(ScramError::Malformed("bad escape in username"));
        }
    }
    Ok(out)
}

/// A SCRAM exchange after the server's first message.
#[derive(Debug)]
pub struct ScramServer {
    hash: ScramHash,
    keys: ScramKeys,
    client_first_bare: String,
    gs2_header: String,
    server_first: String,
    nonce: String,
    known_user: bool,
}

impl ScramServer {
    /// Starts the exchange. For an unknown user it runs with made-up keys and fails at the
    /// proof, so a client cannot tell unknown users from wrong passwords.
    pub fn start(
        hash: ScramHash,
        first: &ClientFirst,
        credentials: Credentials,
    ) -> (Self, Vec<u8>) {
        let (known_user, keys) = match credentials {
            Credentials::Known(k) => (true, k),
            Credentials::Unknown(k) => (false, k),
        };
        let mut r = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut r);
        let nonce = format!("{}{}", first.nonce, B64.encode(r));
        let server_first = format!(
            "r={},s={},i={}",
            nonce,
            B64.encode(&keys.salt),
            keys.iterations
        );
        let out = server_first.clone().into_bytes();
        (
            ScramServer {
                hash,
                keys,
                client_first_bare: first.bare.clone(),
                gs2_header: first.gs2_header.clone(),
                server_first,
                nonce,
                known_user,
            },
            out,
        )
    }

    /// Checks `client-final-message`; on success returns `server-final-message`.
    pub fn finish(self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut cbind = None;
        let mut nonce = None;
        for part in without_proof.split(',') {
            if let Some(v) = part.strip_prefix("c=") {
                cbind = Some(v);
            } else if let Some(v) = part.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        let cbind = cbind.ok_or(ScramError::Malformed("no channel binding"))?;
        if B64.decode(cbind).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = self
            .hash
            .hmac(&self.keys.stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err(ScramError::NotAuthorized);
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(a, b)| a ^ b)
            .collect();
        if !self.known_user
            || !constant_time_eq(&self.hash.hash(&client_key), &self.keys.stored_key)
        {
            return Err(ScramError::NotAuthorized);
        }
        let server_signature = self
            .hash
            .hmac(&self.keys.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

/// Parses SASL PLAIN `authzid\0authcid\0passwd`.
pub fn parse_plain(msg: &[u8]) -> Result<(String, String), ScramError> {
    let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let mut parts = msg.split('\0');
    let (Some(authzid), Some(user), Some(pass), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ScramError::Malformed("PLAIN needs three fields"));
    };
    if !authzid.is_empty() {
        let local = authzid.split('@').next().unwrap_or_default();
        if !local.eq_ignore_ascii_case(user) {
            return Err(ScramError::InvalidAuthzid);
        }
    }
    Ok((user.to_owned(), pass.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 §3 test vector (user "user", password "pencil").
    #[test]
    fn rfc7677_vector() {
        let keys = derive_keys_with_salt(
            ScramHash::Sha256,
            "pencil",
            B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
            4096,
        );
        let first = parse_client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        assert_eq!(first.username, "user");
        let (mut server, _) =
            ScramServer::start(ScramHash::Sha256, &first, Credentials::Known(keys));
        // Pin the server nonce to the RFC's so the client proof matches.
        server.nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into();
        server.server_first = format!("r={},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", server.nonce);
        let fin = server
            .finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(fin, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    #[test]
    fn wrong_proof_and_unknown_user_fail_alike() {
        let keys = derive_keys(ScramHash::Sha256, "secret", 4096);
        let first = parse_client_first(b"n,,n=alice,r=abc").unwrap();
        let unknown = Credentials::of(ScramHash::Sha256, None, b"secret", "alice");
        for k in [Credentials::Known(keys), unknown] {
            let (server, sf) = ScramServer::start(ScramHash::Sha256, &first, k);
            let nonce = String::from_utf8(sf).unwrap();
            let nonce = nonce.split(',').next().unwrap().to_owned();
            let msg = format!("c=biws,{nonce},p={}", B64.encode([0u8; 32]));
            assert_eq!(
                server.finish(msg.as_bytes()),
                Err(ScramError::NotAuthorized)
            );
        }
    }

    /// The `s=` and `i=` of a server-first message.
    fn salt_and_iterations(server_first: &[u8]) -> (Vec<u8>, String) {
        let text = std::str::from_utf8(server_first).unwrap();
        let mut salt = None;
        let mut iterations = None;
        for part in text.split(',') {
            if let Some(v) = part.strip_prefix("s=") {
                salt = Some(B64.decode(v).unwrap());
            } else if let Some(v) = part.strip_prefix("i=") {
                iterations = Some(v.to_owned());
            }
        }
        (salt.unwrap(), iterations.unwrap())
    }

    fn first_salt(hash: ScramHash, credentials: Credentials, user: &str) -> (Vec<u8>, String) {
        let msg = format!("n,,n={user},r=abc");
        let first = parse_client_first(msg.as_bytes()).unwrap();
        salt_and_iterations(&ScramServer::start(hash, &first, credentials).1)
    }

    /// An unknown user's salt is stable across tries, keyed by the server secret (not the old
    /// SHA-256 of the name anyone could compute), and shaped like a real user's: same length,
    /// same iteration count, a different salt per mechanism.
    #[test]
    fn unknown_user_salt_is_keyed_stable_and_shaped_like_a_real_one() {
        let secret = [7u8; 32];
        let unknown = |hash, secret: &[u8], user: &str| {
            first_salt(hash, Credentials::of(hash, None, secret, user), user)
        };
        let (salt, iterations) = unknown(ScramHash::Sha256, &secret, "mallory");
        assert_eq!(
            unknown(ScramHash::Sha256, &secret, "mallory"),
            (salt.clone(), iterations.clone()),
            "stable across tries"
        );
        assert_ne!(
            salt,
            Sha256::digest(b"mallory")[..16].to_vec(),
            "not computable from the name"
        );
        assert_ne!(unknown(ScramHash::Sha256, &[8u8; 32], "mallory").0, salt);
        assert_ne!(unknown(ScramHash::Sha256, &secret, "mallorie").0, salt);
        assert_ne!(unknown(ScramHash::Sha1, &secret, "mallory").0, salt);
        for hash in [ScramHash::Sha1, ScramHash::Sha256] {
            let real = derive_keys(hash, "pw", ITERATIONS_DEFAULT);
            let (real_salt, real_iterations) =
                first_salt(hash, Credentials::Known(real.clone()), "alice");
            let (fake_salt, fake_iterations) = unknown(hash, &secret, "mallory");
            assert_eq!(fake_salt.len(), real_salt.len(), "{hash:?}: salt length");
            assert_eq!(fake_iterations, real_iterations, "{hash:?}: iterations");
            let fake = decoy_keys(hash, &secret, "mallory");
            assert_eq!(fake.stored_key.len(), real.stored_key.len());
            assert_eq!(fake.server_key.len(), real.server_key.len());
        }
    }

    /// PLAIN runs one PBKDF2 derivation whether the user exists or not (counted, not timed),
    /// and never accepts an unknown user.
    #[test]
    fn plain_does_the_same_work_for_unknown_users() {
        let hash = ScramHash::Sha256;
        let known = Credentials::Known(derive_keys(hash, "pw", ITERATIONS_DEFAULT));
        let unknown = Credentials::of(hash, None, b"secret", "mallory");
        for (credentials, password, expect) in [
            (&known, "pw", true),
            (&known, "wrong", false),
            (&unknown, "pw", false),
            (&unknown, "", false),
        ] {
            let before = pbkdf2_runs_on_this_thread();
            assert_eq!(verify_plain(hash, credentials, password), expect);
            assert_eq!(
                pbkdf2_runs_on_this_thread() - before,
                1,
                "one derivation for {credentials:?}"
            );
        }
    }

    #[test]
    fn parse_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"p=tls-unique,,n=a,r=b", "malformed-request"),
            (b"n,,r=b", "malformed-request"),
            (b"n,a=bob,n=alice,r=b", "invalid-authzid"),
            (b"n,,n=a=ZZ,r=b", "malformed-request"),
            (b"\xff", "malformed-request"),
        ];
        for (msg, cond) in cases {
            assert_eq!(parse_client_first(msg).unwrap_err().condition(), *cond);
        }
        assert_eq!(
            parse_client_first(b"n,a=alice@localhost,n=alice,r=x")
                .unwrap()
                .username,
            "alice"
        );
        assert_eq!(
            parse_plain(b"\0alice\0pw").unwrap(),
            ("alice".into(), "pw".into())
        );
        assert!(verify_password(
            ScramHash::Sha1,
            &derive_keys(ScramHash::Sha1, "pw", 4096),
            "pw"
        ));
    }
}
