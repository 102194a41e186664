//! tcpr handoff: moves live TCP connections from one host to another in
//! two phases, so that a failure never loses one.
//!
//! - [`machine`]: the protocol's two ends as pure state machines;
//! - [`wire`]: framing and the protobuf messages;
//! - [`auth`]: the TLS channel, mutually authenticated by certificates or
//!   by a pre-shared key bound to the TLS session;
//! - [`agent`]: the receiving end (restore, then resume and deliver);
//! - [`sender`]: the sending end (freeze, dump, prepare, switch, commit);
//! - [`deliver`]: handing restored connections to applications.
//!
//! This crate does not steer packets by itself: the sender switches traffic
//! by moving an address or by a hook the caller supplies.

pub mod agent;
pub mod auth;
pub mod deliver;
pub mod machine;
pub mod sender;
pub mod wire;

pub use agent::{AgentConfig, AgentServer, Delivery};
pub use auth::Auth;
pub use deliver::Delivered;
pub use sender::{migrate, MigrateOptions, Outgoing, Report, Switch};

/// Errors of a handoff as a whole (per-connection outcomes are in the
/// [`Report`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine refused (freeze, lock).
    #[error(transparent)]
    Engine(#[from] tcpr_engine::Error),
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Usage(String),
}
