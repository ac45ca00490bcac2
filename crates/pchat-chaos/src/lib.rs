//! The chaos suite: the two-site pool in network namespaces, writers whose ledgers are
//! checked after every run, and faults injected from a seeded schedule that is printed and
//! replays exactly.
//!
//! - [`schedule`]: faults as data, generated from a seed ([`rng`]), printed and parsed back;
//! - [`net`]: one network namespace per host, nftables cuts (partitions, one-way loss) and
//!   redirections through [`proxy`], the delaying TCP proxy; [`netem`]: packet delay,
//!   reordering and loss through a TUN device (this kernel has no `sch_netem`);
//! - [`lab`]: the real `pchat` agents and servers, PostgreSQL and etcd, started inside them;
//! - [`ledger`]: the writers (the test kit's independent client) and the archive read back;
//! - [`check`]: the invariants judged from the ledgers and from PostgreSQL's own answers;
//! - [`run`]: one run, from a fresh lab to its report; [`summary`]: many runs in a table.
//!
//! Dev-only, run as root (namespaces, mounts, nftables). Like the test kit it depends on no
//! pchat crate: it judges the pool only from outside.
#![warn(missing_docs)]

pub mod check;
pub mod lab;
pub mod ledger;
pub mod net;
pub mod netem;
pub mod proxy;
pub mod rng;
pub mod run;
pub mod schedule;
pub mod summary;

pub use run::{run_blocking, Keep, RunConfig, RunReport};
pub use schedule::{Profile, Schedule};
