//! Pool mode: the topology of a pool, the etcd control plane (pool state, active servers) and,
//! as they land, the agent and the HA/DR procedures as explicit step lists.
//! Only this crate knows etcd.
#![warn(missing_docs)]

pub mod agent;
pub mod backup;
pub mod dr;
pub mod etcd;
pub mod logship;
pub mod pool;
pub mod topology;

pub use etcd::{Etcd, EtcdError};
pub use pool::{ActiveChange, PoolError, PoolState, PoolStateKind, PoolView};
pub use topology::Topology;
