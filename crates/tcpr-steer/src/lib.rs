//! Steering: after a connection was handed off, its client's packets still
//! reach the front host (they are addressed to the virtual address). A
//! steering datapath on the front forwards each such flow's packets, at L2,
//! to the backend host that now owns the connection; the backend answers
//! the client directly from the VIP (direct server return).
//!
//! The balancer sees only the [`Steering`] trait; the datapath behind it is
//! chosen at run time.
//!
//! This crate does not hand connections off (`tcpr-handoff` does) and does
//! not prepare the backend host (the agent's `--vip` does).

use std::net::{IpAddr, SocketAddr};

/// One flow to steer: the packets from `client` to `vip` go to `backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SteeredFlow {
    /// The client's address and port, as the front host sees them.
    pub client: SocketAddr,
    /// The virtual address and port the client connected to.
    pub vip: SocketAddr,
    /// The backend host's address on the front's link: the next hop the
    /// flow's packets are forwarded to, unchanged but for the L2 header.
    pub backend: IpAddr,
    /// Where the client's sequence numbers stand (what the front's socket
    /// expected when it was frozen), when known: the BPF datapath ends the
    /// flow only at a FIN or RST in sequence from the start; unknown, it
    /// learns them from the flow's first packet.
    pub client_seq: Option<ClientSeq>,
}

/// Where a client's sequence numbers stand at its handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientSeq {
    /// The sequence number the client sends next.
    pub next: u32,
    /// The lowest acknowledgement number it may send now (the server's
    /// oldest unacknowledged byte).
    pub ack: u32,
}

/// Why a steering call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SteerError {
    /// The table is full: the caller proxies the connection instead.
    #[error("steering table full ({capacity} flows)")]
    Full {
        /// The table's capacity, in flows.
        capacity: usize,
    },
    /// The datapath cannot steer this flow (another family, no route to
    /// the backend on a steered interface, ...).
    #[error("cannot steer {client} → {vip}: {reason}")]
    Unsupported {
        /// The flow's client.
        client: SocketAddr,
        /// The flow's virtual address.
        vip: SocketAddr,
        /// What is missing.
        reason: String,
    },
    /// The kernel refused.
    #[error("steering datapath: {0}")]
    Kernel(#[from] std::io::Error),
}

/// A steering datapath on the front host.
///
/// Contract (the balancer relies on it):
/// 1. `steer` returns only once the flow's next packet will be forwarded
///    (microseconds: no process is spawned, no timer waited for);
/// 2. an entry goes by itself when its flow ends (the client's FIN or RST
///    seen, then a short linger) or idles out (nf_tables: always, by the
///    kernel's timeouts; BPF: while a process sweeps: flows left to the
///    kernel by a pinned program stay, unswept, until the next datapath
///    on the interface takes them over, or they are removed by hand);
/// 3. `unsteer` removes an entry at once (a handoff rolled back);
/// 4. [`Steering::close`] ends it, leaving the flows steered now to the
///    next datapath or not; dropping it without `close` is a crash's end
///    (it leaves the flows: BPF pinned, nf_tables its table; an unpinned
///    BPF datapath's end with it).
pub trait Steering: Send + Sync {
    /// Forwards `flow`'s packets to its backend from now on.
    fn steer(&self, flow: &SteeredFlow) -> Result<(), SteerError> {
        self.steer_batch(std::slice::from_ref(flow))
    }
    /// Stops forwarding the flow from `client` to `vip` (absent is fine).
    fn unsteer(&self, client: SocketAddr, vip: SocketAddr) -> Result<(), SteerError> {
        self.unsteer_batch(&[SteeredFlow {
            client,
            vip,
            backend: vip.ip(),
            client_seq: None,
        }])
    }
    /// Steers all of `flows` or none: a handoff batch's flows switch
    /// together (nf_tables: one transaction; BPF: one by one, a refused
    /// one undoing the others).
    fn steer_batch(&self, flows: &[SteeredFlow]) -> Result<(), SteerError>;
    /// Stops forwarding each of `flows` (their `backend` is not read;
    /// absent ones are fine). Tries every flow; the first failure is
    /// returned.
    fn unsteer_batch(&self, flows: &[SteeredFlow]) -> Result<(), SteerError>;
    /// Stops forwarding a flow whose tuple a new connection, accepted by
    /// the front after its handshake, now uses (its client reused it):
    /// the old entry, if any, must not take the new connection's later
    /// packets. BPF keeps a live flow's entry at a SYN (one could be
    /// forged) and passes only the new connection's sequence space to the
    /// front's stack until this; nf_tables removes the entry at the SYN.
    /// By default, [`Steering::unsteer`].
    fn forget_reused(&self, client: SocketAddr, vip: SocketAddr) -> Result<(), SteerError> {
        self.unsteer(client, vip)
    }
    /// The flows steered now (the `tcpr_balance_flows_active` gauge).
    fn active(&self) -> Result<usize, SteerError>;
    /// The most flows it steers at once.
    fn capacity(&self) -> usize;
    /// The datapath's name, for logs and metrics ("nftables-netdev", ...).
    fn name(&self) -> &'static str;
    /// Ends the datapath (at a balancer's exit). With `keep_flows`, a
    /// datapath that can leaves the flows it steers now in the kernel,
    /// for the next datapath on the interface to take over, or hands
    /// them to the one that took over meanwhile: a restart then resets no
    /// connection handed off. Returns how many it left or handed (`None`:
    /// none; it removed what it installed). The default: nothing to do
    /// until dropped.
    fn close(&self, keep_flows: bool) -> Option<usize> {
        let _ = keep_flows;
        None
    }
}

pub mod bpf;
mod common;
pub mod nft;
mod pin;
mod rule;
pub use bpf::{BpfConfig, BpfSteering, CarriedOver};
pub use nft::{NftConfig, NftSteering};
pub use pin::DEFAULT_PIN_DIR;
