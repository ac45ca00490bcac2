//! The procedures the management shell drives across the agents of a pool, each as its
//! steps with their checks: database mirroring in a site ([`mirror`]: add, remove, status,
//! manual failover — the automatic failover of the agents runs the same steps), full backups
//! and restores ([`backup`]: the backup sets both modes write, and the standalone backup and
//! restore), log shipping between the sites ([`logship`]: configure, status, remove,
//! preflight), disaster recovery ([`dr`]: `pool failover`, the resumable `pool failback`)
//! and the PostgreSQL roles' passwords ([`credentials`]: `db rotate-password`); what they
//! share: new id epochs for databases made writable again from an earlier point ([`ids`])
//! and the bounds of what a DR failover loses ([`loss`]); and what the pool is doing, read
//! from etcd alone for the servers' dashboards ([`overview`]).
//!
//! They talk to the agents only through `pchat-agent-api` and to the control plane through
//! `pchat-control`; they never administer a PostgreSQL themselves.
#![warn(missing_docs)]

pub mod backup;
pub mod credentials;
pub mod dr;
pub mod failback;
pub mod ids;
pub mod logship;
pub mod loss;
pub mod mirror;
pub mod overview;
pub mod steps;
