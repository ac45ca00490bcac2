//! XMPP building blocks for pchat: the element tree, the sans-I/O stream framer that enforces
//! RFC 6120's restricted XML and pchat's size limits, namespaces, stream and stanza errors, and
//! the server side of SASL SCRAM. Nothing here does I/O, spawns tasks or reads a clock.
#![warn(missing_docs)]

pub mod element;
pub mod error;
pub mod framer;
pub mod ns;
pub mod scram;

pub use element::{Element, Node};
pub use error::{StanzaError, StanzaErrorType, StreamError};
pub use framer::{Framer, FramerEvent, FramerLimits};

pub use jid::{BareJid, FullJid, Jid};
