//! Pool mode's control plane: what a pool is (`topology.toml`, [`topology`]), where its
//! dynamic state lives (etcd, through the small JSON-gateway client in [`etcd`]), the pool
//! state and active servers with their rules ([`pool`]), who is principal in each site
//! ([`mirroring`]), the name of every etcd key pchat uses ([`keys`]), the identity of every
//! endpoint on the pool's TLS connections and how a process reaches etcd with its own
//! ([`identities`]), the etcd users and roles that let each endpoint write only its own
//! keys ([`auth`]), and the pool's PostgreSQL roles, their passwords and how every client
//! names an instance ([`postgres`]).
//!
//! Everything here is shared by the servers, the agents and the management shell, so it
//! depends on no other pool crate: the agent's API is `pchat-agent-api`, the daemon
//! `pchat-agent`, the procedures the shell drives `pchat-procedures`.
#![warn(missing_docs)]

pub mod auth;
pub mod etcd;
pub mod identities;
pub mod keys;
pub mod mirroring;
pub mod pool;
pub mod postgres;
pub mod topology;

pub use etcd::{Credentials, Etcd, EtcdError};
pub use identities::{EtcdAccess, OwnIdentity, Who};
pub use pool::{ActiveChange, PoolError, PoolState, PoolStateKind, PoolView};
pub use topology::Topology;
