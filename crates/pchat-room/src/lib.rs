//! The room domain of pchat: plain data and state machines, no I/O, no async, no clock.
//! Inputs and the current time come in; outcomes come out. The XMPP mapping lives in
//! `pchat-muc`, persistence in `pchat-store`.
//!
//! - [`types`]: the durable record shared with the store.
//! - [`rules`]: XEP-0045's permission rules as pure functions returning `Result<_, Refusal>`.
//! - [`directory`]: groups and categories (ethical walls), compiled for decisions.
//! - [`room`]: a room's live state and its transitions, each guarded by a rule.
#![warn(missing_docs)]

pub mod directory;
pub mod room;
pub mod rules;
pub mod types;

pub use room::{
    bare_jid, config_diff, validate_config, AffiliationChanged, ConfigChanged, ConfigError,
    Invited, JoinRequest, Joined, Left, Limits, Occupant, RecordAdopted, Removed, RoleChanged,
    Room,
};
pub use rules::{HistoryAsk, HistoryLimits, JoinKind, ListKind, NickHolder, Refusal, Removal};
pub use types::*;
