//! The room domain of pchat: plain data and state machines, no I/O, no async, no clock.
//! Inputs and the current time come in; effects come out. The XMPP mapping lives in `pchat-muc`,
//! persistence in `pchat-store`.
#![warn(missing_docs)]

pub mod types;

pub use types::*;
