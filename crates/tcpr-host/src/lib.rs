//! Host networking and process plumbing around repair: what a host does
//! before and after `tcpr-engine` moves a connection, none of it TCP
//! repair itself.
//!
//! - [`addr`]: service addresses over rtnetlink (find, add, remove, the
//!   interface towards a destination), the `ip addr` steps of an address
//!   move;
//! - [`announce`]: gratuitous ARP / unsolicited neighbour advertisement
//!   after an address arrived, built by the pure [`wire`] module;
//! - fd plumbing for delivering a connection: [`send_with_fd`] /
//!   [`recv_with_fd`] (SCM_RIGHTS), [`memfd_with`], [`pass_socket`] (the
//!   systemd `Accept=yes` and inetd conventions for a child process);
//! - [`enter_netns`], [`unshare_netns`], [`raise_fd_limit`];
//! - [`bpf`]: the BPF calls aya does not make for the steering datapath:
//!   running a loaded program once (its sweep), a tcx link's description,
//!   opening a pinned object, finding, mounting and unmounting a BPF file
//!   system (its pins);
//! - [`sock`]: the generic socket calls (int options, bind, connect,
//!   addresses, netlink sockets, send/recv) the engine shares;
//! - [`relay`]: a zero-copy (splice) relay between two TCP connections,
//!   passing half-closes and resets on; [`proxy_header`]: the PROXY
//!   protocol header (v1, v2) a relay writes first;
//! - [`vip`]: a direct-server-return backend's VIP on the loopback, with
//!   ARP suppressed for it;
//! - [`floor`]: the bare-syscall dump and restore `tcpr bench` compares
//!   the engine against;
//! - [`nfnl`]: nf_tables set and map elements over netlink (the engine's
//!   flow lock, the balancer's steering maps).
//!
//! All `unsafe` lives in the `sys` module (public through [`sock`] and [`bpf`]). This crate does not
//! freeze, dump or restore connections (the engine does), steer packets,
//! or talk to other hosts.

pub mod addr;
mod announce;
pub mod floor;
pub mod nfnl;
pub mod proxy_header;
pub mod relay;
mod sys;
pub mod vip;
pub mod wire;

pub use sys::{bpf, sock};

pub use announce::{announce, announce_ipv4, announce_ipv6, Announcement};
pub use sys::{
    enter_netns, flock, memfd_with, pass_socket, raise_fd_limit, recv_with_fd, recv_with_fds,
    send_with_fd, send_with_fds, thread_netns, unshare_netns, Flock, SCM_MAX_FD,
};
