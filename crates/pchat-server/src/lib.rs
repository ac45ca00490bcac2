//! The pchat server: the only crate with listeners, TLS, tokio tasks, configuration loading
//! and tracing. It wires the XMPP stream code (`pchat-xmpp`), the room domain and its XMPP
//! mapping (`pchat-room`, `pchat-muc`) and a store (`pchat-store-*`) into a running service.
#![warn(missing_docs)]

pub mod admin;
pub mod admission;
pub mod auth;
pub mod compliance;
pub mod config;
pub mod dashboard;
pub mod datetime;
pub mod ldap;
pub mod lean_tls;
pub mod local;
pub mod mam;
pub mod marks;
pub mod metrics;
pub mod muc;
pub mod pep;
pub mod pool_mode;
pub mod private;
pub mod proxy_protocol;
pub mod rooms_web;
pub mod router;
pub mod server;
pub mod session;
pub mod sm;
pub mod state;
pub mod throttle;
pub mod tls;
pub mod transport;
pub mod upload;
pub mod web;

pub use config::Config;
pub use server::{serve, Mode, Overrides, ServeError};
