//! What a handoff reports: each connection's outcome, with the socket
//! given back whenever the connection did not move.

use super::Outgoing;
use std::os::fd::OwnedFd;
use std::time::Duration;
use tcpr_engine::Flow;

/// Progress of a handoff, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Connections in the batch.
    pub total: usize,
    /// Dumped and encoded so far.
    pub dumped: usize,
    /// Encoded image bytes so far.
    pub dumped_bytes: u64,
    /// Answered by READY.
    pub prepared: usize,
    /// Given a fate.
    pub finished: usize,
}

/// A connection that is live at the agent.
#[derive(Debug)]
pub struct Moved {
    /// Its place in the input.
    pub index: usize,
    /// The flow.
    pub flow: Flow,
}

/// A connection that is live here again.
#[derive(Debug)]
pub struct RolledBack {
    /// Its place in the input.
    pub index: usize,
    /// The flow.
    pub flow: Flow,
    /// Why it did not move.
    pub why: String,
    /// The socket handed in, given back (the same socket under another
    /// number when the batch was too large to keep both handles; `None`
    /// only when turning repair mode off failed).
    pub sock: Option<OwnedFd>,
}

/// A connection that the agent may own: frozen and locked here until the
/// lease ends.
#[derive(Debug)]
pub struct Unknown {
    /// Its place in the input.
    pub index: usize,
    /// The flow.
    pub flow: Flow,
    /// What is known.
    pub why: String,
    /// The socket handed in, still in repair mode: thaw it (`tcpr thaw`)
    /// only once the agent is known not to hold the connection. `None`
    /// when the batch was too large to keep a second handle per connection
    /// (the socket stays frozen in the handles held elsewhere).
    pub sock: Option<OwnedFd>,
}

/// Where a handoff's time went, phase by phase, as the sender saw it
/// (zero for a phase not reached).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Checking the batch (one look at each socket), then the TCP connect
    /// and TLS handshake with the agent, or the check of a channel kept
    /// from an earlier batch (a PING answered), and the batch's HELLO
    /// written, before any freeze.
    pub connect: Duration,
    /// Duplicating and freezing the batch, its flows locked.
    pub freeze: Duration,
    /// Dumping and sending the images while the agent restores them,
    /// until every READY (or the batch is given up).
    pub prepare: Duration,
    /// Moving the traffic (address move or steering).
    pub switch: Duration,
    /// COMMIT until the batch is done: the agent's take-over (journal,
    /// lock release), its resumes and deliveries, COMMITTED, our discards.
    pub commit: Duration,
    /// Releasing the source locks of moved flows.
    pub release: Duration,
}

/// What became of each connection.
#[derive(Debug, Default)]
pub struct Report {
    /// Live at the agent.
    pub moved: Vec<Moved>,
    /// Live here again, with why.
    pub rolled_back: Vec<RolledBack>,
    /// Frozen and locked here until the lease ends; the agent may own them.
    pub unknown: Vec<Unknown>,
    /// Things that went wrong without changing any connection's fate (a
    /// moved flow's lock that stays until its lease ends).
    pub warnings: Vec<String>,
    /// Where the time went.
    pub timings: Timings,
    /// The batch ran on a channel kept from an earlier batch (see
    /// [`super::MigrateOptions::reuse_channel`]), not on a new one.
    pub channel_reused: bool,
    /// The batch ran twice: its first run went out on a kept channel taken
    /// without a PING (it had been idle less than a second) that turned out
    /// dead before the agent answered anything; every connection was
    /// thawed and the batch ran again on a checked channel. The timings are
    /// the second run's.
    pub dead_channel_retried: bool,
}

impl Report {
    /// True when every connection moved.
    pub fn all_moved(&self) -> bool {
        self.rolled_back.is_empty() && self.unknown.is_empty()
    }
}

/// The handoff did not start: nothing was changed, and every connection is
/// given back as it was handed in.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Refused {
    /// Why.
    pub error: crate::Error,
    /// The connections, untouched.
    pub conns: Vec<Outgoing>,
}
