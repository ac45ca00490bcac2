//! Fixtures shared by the integration tests in `crates/pchat/tests` (include with `mod common;`).
//!
//! Each test file compiles this module on its own and uses only part of it, hence the
//! `dead_code` allowance.
#![allow(dead_code)]

pub mod http;
pub mod pg;
pub mod scenario;
pub mod secure;
pub mod twosite;
