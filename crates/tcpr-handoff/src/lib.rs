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

pub mod auth;
pub mod deliver;
pub mod machine;
pub mod wire;
