//! The two ends of a handoff as pure state machines: no sockets, no clock,
//! no kernel. Events go in (`handle_*`, with `now` as an argument), messages
//! and actions come out (`poll_transmit`, `poll_action`, `poll_timeout`).
//! The drivers in `agent` and `sender` do the I/O; the tests in this module
//! run both ends against each other over every failure point.
//!
//! The guarantee: every connection ends either live at the source (thawed)
//! or live at the agent (resumed), never both and never neither, whatever
//! fails at a message boundary: a lost link, a timeout, a crashed agent, a
//! crashed sender after COMMIT. The one outcome the sender cannot decide
//! alone (COMMIT sent, no answer) is settled by a Query on a new channel;
//! when the agent cannot be reached at all the connections stay frozen and
//! locked (never duplicated) and the sender reports them as unknown.
//!
//! This module holds what both ends share (the messages, the framing, the
//! fates); `sender` holds the sending end and `agent` the receiving end.

mod agent;
mod sender;

pub use agent::{Agent, AgentAction, BatchState};
pub use sender::{Sender, SenderAction, SwitchOutcome};

/// A connection's number within a batch.
pub type ConnId = u32;

/// Protocol messages, as the machines see them (images travel beside).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Opens a batch.
    Hello {
        /// Batch identity.
        batch: u64,
        /// Connections in the batch.
        total: u32,
    },
    /// Restore these (the driver attaches their images).
    Prepare(Vec<ConnId>),
    /// Per-connection restore outcomes.
    Ready(Vec<(ConnId, Result<(), String>)>),
    /// Resume and deliver these; take the service address first when the
    /// sender's switch moved it.
    Commit {
        /// The connections to resume.
        ids: Vec<ConnId>,
        /// The address the sender removed, for the agent to add.
        take_address: Option<ServiceAddress>,
    },
    /// Per-connection resume outcomes.
    Committed(Vec<(ConnId, Result<(), String>)>),
    /// Give up the batch.
    Abort(String),
    /// The agent's answer to COMMIT when it resumed none of the batch: its
    /// restored sockets are closed silently and any address it took for
    /// the batch is given back, so the sender switches back and thaws.
    CommitRefused(String),
}

/// What the agent says became of a batch: the answer to a Query, from its
/// memory or, after a restart, from its journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchStatus {
    /// No record of the batch (never heard of it, or its journal is lost):
    /// nobody can tell whether anything was resumed.
    Unknown,
    /// Committed: these were resumed and delivered; any other connection
    /// of the batch may have been resumed and lost.
    Committed(Vec<ConnId>),
    /// Nothing of the batch was resumed and nothing of it is left at the
    /// agent: the sender may roll back.
    NotResumed,
}

/// How a batch's images are cut into PREPARE frames. Frames are cut by size
/// and by count, and only a few are unanswered at once, so that neither end
/// holds more than a few frames of images whatever the batch's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    /// Encoded image bytes per frame; an image larger than this travels
    /// alone in a frame of its own size.
    pub frame_bytes: usize,
    /// Images per frame.
    pub frame_images: usize,
    /// PREPARE frames sent and not yet answered by READY.
    pub frames_in_flight: usize,
}

impl Default for Framing {
    /// 4 MiB or 64 images per frame, 8 frames unanswered: the agent
    /// restores one frame while the next ones travel, and the sender holds
    /// at most one frame being filled.
    fn default() -> Framing {
        Framing {
            frame_bytes: 4 << 20,
            frame_images: 64,
            frames_in_flight: 8,
        }
    }
}

/// A service address that moves with the connections (`ip/prefix_len`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceAddress {
    /// The address.
    pub ip: std::net::IpAddr,
    /// Its prefix length on the interface.
    pub prefix_len: u8,
}

/// Where a connection ended, from the sender's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Moved: live at the agent.
    Moved,
    /// Rolled back: live at the source.
    RolledBack(String),
    /// Unknown: frozen and locked at the source until the lease ends.
    Unknown(String),
}

#[cfg(test)]
mod channel_tests;
#[cfg(test)]
mod tests;
