//! `pchat-testkit`: dev-only tools for testing pchat from the outside.
//!
//! - [`Client`]: an independent async XMPP client (STARTTLS, direct TLS, WebSocket or plain
//!   TCP; SCRAM-SHA-256, SCRAM-SHA-1 or PLAIN; resource binding) with a stanza API and helpers
//!   for MUC, MAM, disco and ping.
//! - [`TestServer`]: runs the real `pchat` binary on free loopback ports in a temporary data
//!   directory, with CLI access, restart, SIGSTOP and kill -9.
//!
//! Architecture invariant: this crate depends on no other pchat crate. It has its own XML
//! tree, stream reader and SASL code, so a bug in the server's versions cannot be mirrored
//! here and cancel out in a test. Its correctness is checked against Prosody instead
//! (`tests/against_prosody.rs`, which fails, never skips, without Prosody).
//!
//! Tests of the kit itself: `cargo test -p pchat-testkit` runs the unit tests and the harness
//! tests (against a Python stand-in for `pchat`, so `python3` is needed), and the Prosody
//! validation, which needs Prosody and slixmpp installed:
//!
//! ```sh
//! apt-get update && apt-get install -y prosody
//! pip install -r tests/interop/requirements.txt
//! cargo test -p pchat-testkit --test against_prosody
//! ```
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pchat_testkit::{ServerOptions, TestServer};
//! let bin = TestServer::locate_binary()?;
//! let server = TestServer::start(&bin, ServerOptions::default()).await?;
//! server.add_user("alice@localhost", "secret").await?;
//! let mut alice = server.client("alice@localhost", "secret").await?;
//! alice.join_room("lobby@conference.localhost", "alice", None).await?;
//! let ack = alice.send_groupchat("lobby@conference.localhost", "hi", None).await?;
//! assert_eq!(ack.body().as_deref(), Some("hi"));
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod client;
mod element;
pub mod etcd;
mod framing;
pub mod ldap;
pub mod ns;
mod ports;
pub mod postgres;
mod sasl;
mod server;
mod tls;
mod xep;

pub use client::{Client, ConnectOptions, Error, Result, Stage, StanzaError, Transport};
pub use element::{Element, Node, ParseError};
pub use ports::free_port;
pub use sasl::{Mechanism, ScramError};
pub use server::{HarnessError, Ports, ServerOptions, TestServer};
pub use tls::{https_get, tls_connect, HttpsReply};
pub use xep::{
    bare, delay_stamp, forwarded_message, origin_id, stanza_id, status_codes, DiscoInfo, DiscoItem,
    History, Identity, Joined, MamPage, Rsm,
};
