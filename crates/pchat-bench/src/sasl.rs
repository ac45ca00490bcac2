//! SASL client side: SCRAM-SHA-256 / SCRAM-SHA-1 (RFC 5802, RFC 7677) and PLAIN (RFC 4616).
//!
//! No channel binding (GS2 header `n,,`), no SASLprep: bench credentials are ASCII. The salted
//! password is cached per (hash, salt, iterations) because a benchmark logs the same accounts in
//! again and again, and PBKDF2 would otherwise dominate the client's CPU during connection
//! storms and distort what the server is measured on.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// A mechanism the client can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mech {
    /// SCRAM-SHA-256 (RFC 7677).
    ScramSha256,
    /// SCRAM-SHA-1 (RFC 5802).
    ScramSha1,
    /// PLAIN, only ever sent inside TLS.
    Plain,
}

impl Mech {
    /// The IANA name as it appears in `<mechanism/>`.
    pub fn name(self) -> &'static str {
        match self {
            Mech::ScramSha256 => "SCRAM-SHA-256",
            Mech::ScramSha1 => "SCRAM-SHA-1",
            Mech::Plain => "PLAIN",
        }
    }
}

/// Bounds what a broken server can make us compute (real servers use 4096 to ~100k).
const ITERATIONS_MAX: u32 = 1_000_000;

type SaltKey = (Mech, String, Vec<u8>, u32);

fn salted_cache() -> &'static Mutex<HashMap<SaltKey, Vec<u8>>> {
    static CACHE: OnceLock<Mutex<HashMap<SaltKey, Vec<u8>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn hmac(mech: Mech, key: &[u8], data: &[u8]) -> Vec<u8> {
    match mech {
        Mech::ScramSha1 => {
            let mut m = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes any key length");
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        _ => {
            let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
    }
}

fn hash(mech: Mech, data: &[u8]) -> Vec<u8> {
    match mech {
        Mech::ScramSha1 => Sha1::digest(data).to_vec(),
        _ => Sha256::digest(data).to_vec(),
    }
}

fn salted_password(mech: Mech, password: &str, salt: &[u8], iterations: u32) -> Vec<u8> {
    let key = (mech, password.to_string(), salt.to_vec(), iterations);
    if let Some(v) = salted_cache().lock().expect("cache lock").get(&key) {
        return v.clone();
    }
    let out = match mech {
        Mech::ScramSha1 => {
            let mut out = vec![0u8; 20];
            pbkdf2::pbkdf2_hmac::<Sha1>(password.as_bytes(), salt, iterations, &mut out);
            out
        }
        _ => {
            let mut out = vec![0u8; 32];
            pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut out);
            out
        }
    };
    // Bounded: one entry per account (salts are per account), and a run has at most ~20k.
    let mut cache = salted_cache().lock().expect("cache lock");
    if cache.len() < 100_000 {
        cache.insert(key, out.clone());
    }
    out
}

/// The initial response for PLAIN: `\0user\0password`, base64.
pub fn plain_initial(user: &str, password: &str) -> String {
    B64.encode(format!("\0{user}\0{password}"))
}

/// One SCRAM exchange in progress.
pub struct Scram {
    mech: Mech,
    password: String,
    nonce: String,
    first_bare: String,
    server_signature: Option<Vec<u8>>,
}

impl Scram {
    /// Starts an exchange for `user`.
    pub fn new(mech: Mech, user: &str, password: &str) -> Scram {
        let nonce = B64.encode(rand::random::<[u8; 18]>());
        let user = user.replace('=', "=3D").replace(',', "=2C");
        Scram {
            mech,
            password: password.to_string(),
            first_bare: format!("n={user},r={nonce}"),
            nonce,
            server_signature: None,
        }
    }

    /// The base64 client-first message.
    pub fn client_first(&self) -> String {
        B64.encode(format!("n,,{}", self.first_bare))
    }

    /// Takes the base64 server-first message, returns the base64 client-final message.
    pub fn client_final(&mut self, challenge_b64: &str) -> anyhow::Result<String> {
        let server_first = String::from_utf8(B64.decode(challenge_b64.trim())?)
            .context("server-first is not UTF-8")?;
        let mut r = None;
        let mut s = None;
        let mut i = None;
        for part in server_first.split(',') {
            match part.split_once('=') {
                Some(("r", v)) => r = Some(v),
                Some(("s", v)) => s = Some(v),
                Some(("i", v)) => i = Some(v),
                Some(("m", _)) => bail!("SCRAM extension m= not supported"),
                _ => {}
            }
        }
        let (Some(r), Some(s), Some(i)) = (r, s, i) else {
            bail!("malformed server-first {server_first:?}");
        };
        if !r.starts_with(&self.nonce) {
            bail!("server nonce does not extend ours");
        }
        let iterations: u32 = i.parse().context("bad iteration count")?;
        if iterations == 0 || iterations > ITERATIONS_MAX {
            bail!("iteration count {iterations} out of bounds");
        }
        let salt = B64.decode(s).context("bad salt")?;
        let salted = salted_password(self.mech, &self.password, &salt, iterations);
        let client_key = hmac(self.mech, &salted, b"Client Key");
        let stored_key = hash(self.mech, &client_key);
        let without_proof = format!("c=biws,r={r}");
        let auth_message = format!("{},{server_first},{without_proof}", self.first_bare);
        let signature = hmac(self.mech, &stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac(self.mech, &salted, b"Server Key");
        self.server_signature = Some(hmac(self.mech, &server_key, auth_message.as_bytes()));
        Ok(B64.encode(format!("{without_proof},p={}", B64.encode(proof))))
    }

    /// Checks the server-final message (`v=`), so a server that does not know the password
    /// cannot pass as having authenticated us.
    pub fn verify(&self, server_final_b64: &str) -> anyhow::Result<()> {
        let text = String::from_utf8(B64.decode(server_final_b64.trim())?)?;
        let Some(v) = text.strip_prefix("v=") else {
            bail!("server-final without v=: {text:?}");
        };
        let v = B64.decode(v.split(',').next().unwrap_or(v))?;
        if Some(&v) != self.server_signature.as_ref() {
            bail!("server signature does not verify");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5802 §5 example, with the fixed client nonce from the RFC.
    #[test]
    fn rfc5802_vector() {
        let mut s = Scram::new(Mech::ScramSha1, "user", "pencil");
        s.nonce = "fyko+d2lbbFgONRv9qkxdawL".into();
        s.first_bare = "n=user,r=fyko+d2lbbFgONRv9qkxdawL".into();
        let server_first = "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096";
        let fin = s.client_final(&B64.encode(server_first)).unwrap();
        let fin = String::from_utf8(B64.decode(fin).unwrap()).unwrap();
        assert_eq!(
            fin,
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
        );
        s.verify(&B64.encode("v=rmF9pqV8S7suAoZWja4dJRkFsKQ="))
            .unwrap();
        assert!(s.verify(&B64.encode("v=AAAA")).is_err());
    }

    /// RFC 7677 §3 example.
    #[test]
    fn rfc7677_vector() {
        let mut s = Scram::new(Mech::ScramSha256, "user", "pencil");
        s.nonce = "rOprNGfwEbeRWgbNEkqO".into();
        s.first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let fin = s.client_final(&B64.encode(server_first)).unwrap();
        let fin = String::from_utf8(B64.decode(fin).unwrap()).unwrap();
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify(&B64.encode("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="))
            .unwrap();
    }
}
