//! SASL client mechanisms: SCRAM-SHA-256 (RFC 7677), SCRAM-SHA-1 (RFC 5802) and PLAIN (RFC 4616).
//!
//! Pure functions over strings and bytes, so the RFC test vectors can pin them down without a
//! network. Channel binding is not supported, so the GS2 header is always `n,,`, which is the
//! correct header for a client that does not support it even when the server offers `-PLUS`.
//! SASLprep is not applied: test credentials are ASCII.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// A SASL mechanism the client can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// SCRAM-SHA-256 (RFC 7677), the default.
    ScramSha256,
    /// SCRAM-SHA-1 (RFC 5802).
    ScramSha1,
    /// PLAIN (RFC 4616): the password in the clear, so only over TLS.
    Plain,
}

impl Mechanism {
    /// The IANA mechanism name as it appears in `<mechanism/>`.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha1 => "SCRAM-SHA-1",
            Mechanism::Plain => "PLAIN",
        }
    }
}

/// Why a SCRAM exchange failed on the client side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The server message could not be parsed or violated RFC 5802.
    #[error("malformed SCRAM message from server: {0}")]
    Malformed(String),
    /// The server nonce does not extend the client nonce: a replay or a broken server.
    #[error("server nonce does not start with the client nonce")]
    NonceMismatch,
    /// The server reported an error in its final message (`e=`).
    #[error("server reported SCRAM error {0:?}")]
    ServerError(String),
    /// The server's signature `v=` is wrong, so the server does not know the password.
    #[error("server signature does not verify: the server does not know the credentials")]
    BadServerSignature,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum ScramHash {
    Sha1,
    Sha256,
}

impl ScramHash {
    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => Sha1::digest(data).to_vec(),
            ScramHash::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
        match self {
            ScramHash::Sha1 => {
                let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes any key length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
            ScramHash::Sha256 => {
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }

    fn hi(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => {
                let mut out = vec![0u8; 20];
                pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out);
                out
            }
            ScramHash::Sha256 => {
                let mut out = vec![0u8; 32];
                pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
                out
            }
        }
    }
}

/// The client side of one SCRAM exchange.
#[derive(Debug)]
pub(crate) struct ScramClient {
    hash: ScramHash,
    password: String,
    client_nonce: String,
    client_first_bare: String,
    /// Set once the client-final message is built; the server signature it must send back.
    expected_server_signature: Option<Vec<u8>>,
}

/// Upper bound on the iteration count we are willing to compute, so a hostile or broken server
/// cannot stall a test for minutes; real deployments use 4096 to a few hundred thousand.
const SCRAM_ITERATIONS_MAX: u32 = 10_000_000;

impl ScramClient {
    pub(crate) fn new(hash: ScramHash, username: &str, password: &str) -> ScramClient {
        let nonce: [u8; 18] = rand::random();
        ScramClient::with_nonce(hash, username, password, &BASE64.encode(nonce))
    }

    pub(crate) fn with_nonce(
        hash: ScramHash,
        username: &str,
        password: &str,
        nonce: &str,
    ) -> ScramClient {
        // RFC 5802 §5.1: ',' and '=' in the username must be escaped as =2C and =3D.
        let escaped = username.replace('=', "=3D").replace(',', "=2C");
        ScramClient {
            hash,
            password: password.to_string(),
            client_nonce: nonce.to_string(),
            client_first_bare: format!("n={escaped},r={nonce}"),
            expected_server_signature: None,
        }
    }

    /// The client-first message, including the GS2 header.
    pub(crate) fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Consumes the server-first message and returns the client-final message.
    pub(crate) fn client_final(&mut self, server_first: &str) -> Result<String, ScramError> {
        let attrs = parse_attrs(server_first)?;
        if attrs.first().map(|(k, _)| *k) == Some('m') {
            return Err(ScramError::Malformed(
                "mandatory extension m= not supported".into(),
            ));
        }
        let nonce = lookup(&attrs, 'r')?;
        let salt = BASE64
            .decode(lookup(&attrs, 's')?)
            .map_err(|e| ScramError::Malformed(format!("salt is not base64: {e}")))?;
        let iterations: u32 = lookup(&attrs, 'i')?
            .parse()
            .map_err(|e| ScramError::Malformed(format!("iteration count: {e}")))?;
        if iterations == 0 || iterations > SCRAM_ITERATIONS_MAX {
            return Err(ScramError::Malformed(format!(
                "iteration count {iterations} outside 1..={SCRAM_ITERATIONS_MAX}"
            )));
        }
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        // "biws" is base64("n,,"): the GS2 header without channel binding data.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, server_first, without_proof
        );
        let h = self.hash;
        let salted = h.hi(self.password.as_bytes(), &salt, iterations);
        let client_key = h.hmac(&salted, b"Client Key");
        let stored_key = h.hash(&client_key);
        let client_signature = h.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&client_signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = h.hmac(&salted, b"Server Key");
        self.expected_server_signature = Some(h.hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)))
    }

    /// Checks the server-final message; success only when `v=` matches our own computation.
    pub(crate) fn verify_server_final(&self, server_final: &str) -> Result<(), ScramError> {
        let attrs = parse_attrs(server_final)?;
        if let Ok(e) = lookup(&attrs, 'e') {
            return Err(ScramError::ServerError(e.to_string()));
        }
        let v = BASE64
            .decode(lookup(&attrs, 'v')?)
            .map_err(|e| ScramError::Malformed(format!("v= is not base64: {e}")))?;
        match &self.expected_server_signature {
            Some(expected) if *expected == v => Ok(()),
            Some(_) => Err(ScramError::BadServerSignature),
            None => Err(ScramError::Malformed(
                "server-final before client-final".into(),
            )),
        }
    }
}

/// The PLAIN initial response: no authorization identity, then authcid and password.
pub(crate) fn plain_initial(username: &str, password: &str) -> Vec<u8> {
    format!("\0{username}\0{password}").into_bytes()
}

fn parse_attrs(msg: &str) -> Result<Vec<(char, &str)>, ScramError> {
    msg.split(',')
        .map(|part| {
            let mut chars = part.chars();
            match (chars.next(), chars.next()) {
                (Some(k), Some('=')) if k.is_ascii_alphabetic() => Ok((k, &part[2..])),
                _ => Err(ScramError::Malformed(format!(
                    "bad attribute {part:?} in {msg:?}"
                ))),
            }
        })
        .collect()
}

fn lookup<'a>(attrs: &[(char, &'a str)], key: char) -> Result<&'a str, ScramError> {
    attrs
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .ok_or_else(|| ScramError::Malformed(format!("missing {key}=")))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Vector {
        hash: ScramHash,
        nonce: &'static str,
        server_first: &'static str,
        client_final: &'static str,
        server_final: &'static str,
    }

    fn check(v: Vector) {
        let mut c = ScramClient::with_nonce(v.hash, "user", "pencil", v.nonce);
        assert_eq!(c.client_first(), format!("n,,n=user,r={}", v.nonce));
        assert_eq!(c.client_final(v.server_first).unwrap(), v.client_final);
        c.verify_server_final(v.server_final).unwrap();
        assert_eq!(
            c.verify_server_final("v=AAAA"),
            Err(ScramError::BadServerSignature)
        );
        assert_eq!(
            c.verify_server_final("e=invalid-proof"),
            Err(ScramError::ServerError("invalid-proof".into()))
        );
    }

    #[test]
    fn rfc5802_sha1_vector() {
        check(Vector {
            hash: ScramHash::Sha1,
            nonce: "fyko+d2lbbFgONRv9qkxdawL",
            server_first: "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
            client_final:
                "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            server_final: "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        });
    }

    #[test]
    fn rfc7677_sha256_vector() {
        check(Vector {
            hash: ScramHash::Sha256,
            nonce: "rOprNGfwEbeRWgbNEkqO",
            server_first: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            client_final: "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            server_final: "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        });
    }

    #[test]
    fn rejects_bad_server_first() {
        let mut c = ScramClient::with_nonce(ScramHash::Sha256, "user", "pencil", "abc");
        for (server_first, want) in [
            ("r=xyz123,s=AAAA,i=4096", ScramError::NonceMismatch),
            ("r=abc,s=AAAA,i=4096", ScramError::NonceMismatch),
            (
                "r=abcdef,s=AAAA",
                ScramError::Malformed("missing i=".into()),
            ),
        ] {
            assert_eq!(c.client_final(server_first), Err(want));
        }
        assert!(matches!(
            c.client_final("r=abcdef,s=AAAA,i=0"),
            Err(ScramError::Malformed(_))
        ));
    }

    #[test]
    fn escapes_username() {
        let c = ScramClient::with_nonce(ScramHash::Sha1, "a,b=c", "p", "n");
        assert_eq!(c.client_first(), "n,,n=a=2Cb=3Dc,r=n");
    }
}
