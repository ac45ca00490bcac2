//! The server side of SASL SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677), and PLAIN
//! checking against the same stored keys. Passwords are never stored: only salt, iteration
//! count, StoredKey and ServerKey, so a stolen database does not reveal them.

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

/// Derives stored keys from a password with a fresh random salt.
pub fn derive_keys(hash: ScramHash, password: &str, iterations: u32) -> ScramKeys {
    let mut salt = vec![0u8; 16];
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
    /// Starts the exchange. `keys` is `None` for an unknown user: the exchange then runs with
    /// made-up keys and fails at the proof, so a client cannot tell unknown users from wrong
    /// passwords.
    pub fn start(hash: ScramHash, first: &ClientFirst, keys: Option<ScramKeys>) -> (Self, Vec<u8>) {
        let known_user = keys.is_some();
        let keys = keys.unwrap_or_else(|| ScramKeys {
            salt: hash.hash(first.username.as_bytes())[..16].to_vec(),
            iterations: ITERATIONS_DEFAULT,
            stored_key: vec![0; 32],
            server_key: vec![0; 32],
        });
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
        let (mut server, _) = ScramServer::start(ScramHash::Sha256, &first, Some(keys));
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
        for k in [Some(keys), None] {
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
