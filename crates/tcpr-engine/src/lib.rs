//! The tcpr engine: the only code that talks to the kernel.
//!
//! Life of a connection, in call order:
//! 1. [`freeze`] a socket: its flow is locked (packets dropped both ways,
//!    with a lease) and the socket enters repair mode;
//! 2. [`Frozen::dump`] reads its complete state into a [`ConnectionImage`];
//! 3. elsewhere, [`restore()`] builds a new socket from the image, still in
//!    repair mode, then [`Restored::resume`] brings it to life (repair off,
//!    with a window probe so the peer answers at once);
//! 4. at the source, [`Frozen::discard`] closes the original without a FIN or
//!    RST, or [`Frozen::thaw`] rolls back so it carries on where it was.
//!
//! A socket left frozen by an earlier process (a dump that left the source
//! frozen, a move whose outcome was unknown) may live on elsewhere: a
//! freeze refuses it unless told otherwise ([`IfFrozen`]), and
//! [`thaw_frozen`] lets it carry on in place.
//!
//! All `unsafe` lives in the private `sys` module. This crate does not move
//! addresses, announce them, pass fds to other processes (`tcpr-host` does
//! those), steer packets or talk to other hosts.

pub mod diag;
mod error;
pub mod lock;
mod options;
mod restore;
mod sys;

pub use error::Error;
pub use lock::{Flow, FlowLock, Netns, DEFAULT_LEASE, MAX_LEASE};
pub use options::ListenerOptions;
pub use restore::{close_silently, restore, Restored, UNSENT_TIMEOUT};
pub use tcpr_image::ConnectionImage;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;
use sys::Queue;
use tcpr_image::{SendQueue, Seq, TcpOptions, TcpState};

/// How to freeze.
#[derive(Clone, Debug)]
pub struct FreezeOptions {
    /// Lock the flow (drop its packets) while frozen. Turn off only when
    /// something else keeps packets away (tests of the engine alone, benches
    /// of the floor).
    pub lock: bool,
    /// How long the lock lasts unless released.
    pub lease: Duration,
}

impl Default for FreezeOptions {
    fn default() -> Self {
        FreezeOptions {
            lock: true,
            lease: DEFAULT_LEASE,
        }
    }
}

/// Takes a duplicate of fd `fd` of process `pid` (`pidfd_getfd`, which needs
/// ptrace rights over the process).
pub fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd, Error> {
    if pid <= 0 {
        return Err(Error::NoSuchProcess(pid));
    }
    let pidfd = sys::pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => Error::NoSuchProcess(pid),
        _ => Error::kernel(format!("open process {pid}"), e),
    })?;
    sys::pidfd_getfd(pidfd.as_fd(), fd).map_err(|e| match e.raw_os_error() {
        Some(libc::EBADF) => Error::NoSuchFd { pid, fd },
        Some(libc::ESRCH) => Error::NoSuchProcess(pid),
        Some(libc::EPERM) => Error::Permission(format!(
            "cannot take fd {fd} of process {pid}: operation not permitted (ptrace rights over the process are needed: CAP_SYS_PTRACE or the same user with ptrace_scope 0)"
        )),
        _ => Error::kernel(format!("take fd {fd} of process {pid}"), e),
    })
}

/// Checks that `fd` is a connected TCP socket and returns its flow and
/// kernel state number.
pub fn inspect_socket(fd: BorrowedFd<'_>) -> Result<(Flow, u8), Error> {
    // Two calls tell a TCP socket, where SO_TYPE, SO_DOMAIN and SO_PROTOCOL
    // would take three: SO_PROTOCOL says TCP (an MPTCP socket, which also
    // answers SOL_TCP options, says IPPROTO_MPTCP), and only an IPv4 or IPv6
    // stream socket of that protocol answers TCP_INFO at SOL_TCP: raw
    // sockets refuse the level (EOPNOTSUPP, ENOPROTOOPT), as do the other
    // families whose protocol number can be 6 (netlink's NETLINK_XFRM,
    // packet sockets, CAN's ISO-TP). The address read next is checked to be
    // IPv4 or IPv6 as well.
    if protocol(fd)? != libc::IPPROTO_TCP {
        return Err(not_tcp(fd));
    }
    let info = sys::tcp_info(fd).map_err(|e| match sys::socket_kind(fd) {
        Ok(kind) if kind != TCP_SOCKET_V4 && kind != TCP_SOCKET_V6 => not_tcp(fd),
        _ => Error::kernel("read TCP_INFO", e),
    })?;
    if TcpState::from_kernel_number(info.state).is_none() {
        return Err(Error::UnsupportedState {
            state: TcpState::kernel_name(info.state),
        });
    }
    let local = sys::local_addr(fd).map_err(|e| Error::kernel("read the local address", e))?;
    let peer = sys::peer_addr(fd).map_err(|e| Error::kernel("read the peer address", e))?;
    Ok((Flow { local, peer }, info.state))
}

/// The socket's protocol (`SO_PROTOCOL`); a file that is not a socket is
/// refused as not TCP.
pub(crate) fn protocol(fd: BorrowedFd<'_>) -> Result<i32, Error> {
    sys::socket_protocol(fd).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            Error::NotTcp("the file descriptor is not a socket".into())
        } else {
            Error::kernel("read the socket type", e)
        }
    })
}

/// `(SO_TYPE, SO_DOMAIN, SO_PROTOCOL)` of a TCP socket.
const TCP_SOCKET_V4: (i32, i32, i32) = (libc::SOCK_STREAM, libc::AF_INET, libc::IPPROTO_TCP);
const TCP_SOCKET_V6: (i32, i32, i32) = (libc::SOCK_STREAM, libc::AF_INET6, libc::IPPROTO_TCP);

/// The refusal of a socket that is not TCP, saying what it is (off the
/// common path: it reads the socket's kind in full).
fn not_tcp(fd: BorrowedFd<'_>) -> Error {
    match sys::socket_kind(fd) {
        Ok((ty, domain, proto)) => Error::NotTcp(format!(
            "the socket is not a TCP socket (domain {domain}, type {ty}, protocol {proto})"
        )),
        Err(e) => Error::kernel("read the socket type", e),
    }
}

/// A socket in repair mode whose flow is locked. Consume it with
/// [`Frozen::thaw`], [`Frozen::discard`] or [`Frozen::leave_frozen`];
/// dropping it thaws.
#[must_use = "dropping a Frozen socket thaws it"]
#[derive(Debug)]
pub struct Frozen {
    sock: Option<OwnedFd>,
    flow: Flow,
    lock: Option<FlowLock>,
    /// It was frozen before this freeze ([`IfFrozen::Take`]): dropping it
    /// leaves it as it was, frozen and locked.
    was_frozen: bool,
}

/// What a freeze does with a socket that is frozen already (in repair mode:
/// an earlier dump left it frozen, or a move's outcome is unknown). Such a
/// connection may live on elsewhere: moving it again would duplicate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfFrozen {
    /// Refuse the whole call before anything changes
    /// ([`Error::AlreadyFrozen`]).
    Refuse,
    /// Take it as it is (a retry the caller knows to be safe). It stays
    /// frozen on every path: dropping its [`Frozen`] leaves it frozen and
    /// locked for the lease instead of thawing it.
    Take,
}

/// Whether a socket is in repair mode (`getsockopt(TCP_REPAIR)`, which
/// needs no privilege).
pub fn is_frozen(fd: BorrowedFd<'_>) -> Result<bool, Error> {
    sys::repair_mode(fd).map_err(kernel_error("tell whether the socket is frozen"))
}

/// Turns repair mode off on a restored socket whose resume has nothing
/// else left to do (`Restored::done_when_live`), for a process that holds
/// a copy of it when the one that restored it is gone: the kernel sends a
/// window probe and the connection is live.
pub fn resume_in_place(fd: BorrowedFd<'_>) -> Result<(), Error> {
    sys::set_repair(fd, sys::REPAIR_OFF).map_err(kernel_error("turn off repair mode"))
}

/// Freezes one socket: locks its flow, then turns repair mode on. Refuses a
/// socket that is frozen already. On error nothing is left changed.
pub fn freeze(sock: OwnedFd, opts: &FreezeOptions) -> Result<Frozen, Error> {
    freeze_with(sock, opts, IfFrozen::Refuse)
}

/// [`freeze`], saying what to do with a socket that is frozen already.
pub fn freeze_with(
    sock: OwnedFd,
    opts: &FreezeOptions,
    if_frozen: IfFrozen,
) -> Result<Frozen, Error> {
    freeze_many_with(vec![sock], opts, if_frozen)?
        .pop()
        .expect("one in, one out")
}

/// Freezes many sockets with one lock transaction. Every socket is checked
/// before anything changes (a connected TCP socket, not frozen already, all
/// in one network namespace); a per-socket failure afterwards thaws that
/// one and is reported in its slot.
pub fn freeze_many(
    socks: Vec<OwnedFd>,
    opts: &FreezeOptions,
) -> Result<Vec<Result<Frozen, Error>>, Error> {
    freeze_many_with(socks, opts, IfFrozen::Refuse)
}

/// [`freeze_many`], saying what to do with sockets that are frozen already.
pub fn freeze_many_with(
    socks: Vec<OwnedFd>,
    opts: &FreezeOptions,
    if_frozen: IfFrozen,
) -> Result<Vec<Result<Frozen, Error>>, Error> {
    let flows = socks
        .iter()
        .map(|s| inspect_socket(s.as_fd()).map(|(flow, _)| flow))
        .collect::<Result<Vec<Flow>, Error>>()?;
    freeze_many_inspected(socks, flows, opts, if_frozen)
}

/// [`freeze_many_with`] of sockets the caller checked with
/// [`inspect_socket`], which gave `flows`, one per socket in order: the
/// check is not made twice (four system calls per socket). The flows are
/// trusted: they are what the lock locks. A connection that ended since
/// its check is frozen all the same (repair mode takes a closed socket)
/// and refused alone by its dump, which reads the state again.
pub fn freeze_many_inspected(
    socks: Vec<OwnedFd>,
    flows: Vec<Flow>,
    opts: &FreezeOptions,
    if_frozen: IfFrozen,
) -> Result<Vec<Result<Frozen, Error>>, Error> {
    if socks.len() != flows.len() {
        return Err(Error::Inconsistent(format!(
            "{} sockets to freeze but {} flows",
            socks.len(),
            flows.len()
        )));
    }
    let mut already = Vec::with_capacity(socks.len());
    for (s, &flow) in socks.iter().zip(&flows) {
        let frozen = is_frozen(s.as_fd())?;
        if frozen && if_frozen == IfFrozen::Refuse {
            return Err(Error::AlreadyFrozen { flow });
        }
        already.push(frozen);
    }
    // One lock transaction goes to one namespace: that of the first socket.
    if let Some(first) = socks.first() {
        let want = netns_id(first.as_fd())?;
        for (s, flow) in socks.iter().zip(&flows).skip(1) {
            if netns_id(s.as_fd())? != want {
                return Err(Error::MixedNamespaces { other: *flow });
            }
        }
    }
    // One lock per socket, in the order of `flows`.
    let mut locks = match socks.first() {
        Some(first) if opts.lock => {
            let ns = Netns::of_socket(first.as_fd())?;
            FlowLock::acquire(&flows, ns, opts.lease)?.into_each()
        }
        _ => Vec::new(),
    }
    .into_iter();
    let mut out = Vec::with_capacity(socks.len());
    for ((sock, flow), was_frozen) in socks.into_iter().zip(flows).zip(already) {
        let my_lock = locks.next();
        match sys::set_repair(sock.as_fd(), sys::REPAIR_ON) {
            Ok(()) => out.push(Ok(Frozen {
                sock: Some(sock),
                flow,
                lock: my_lock,
                was_frozen,
            })),
            Err(e) => {
                drop(my_lock);
                out.push(Err(Error::kernel(
                    format!("turn on repair mode for {flow}"),
                    e,
                )));
            }
        }
    }
    Ok(out)
}

/// What tells a socket's network namespace apart: its cookie, or before
/// Linux 5.14 the device and inode of the namespace (`SIOCGSKNS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NetnsId {
    Cookie(u64),
    Inode { dev: u64, ino: u64 },
}

fn netns_id(fd: BorrowedFd<'_>) -> Result<NetnsId, Error> {
    match sys::netns_cookie(fd) {
        Ok(cookie) => Ok(NetnsId::Cookie(cookie)),
        Err(_) => {
            let ns = sys::socket_netns(fd)
                .map_err(kernel_error("read the socket's network namespace"))?;
            let (dev, ino) = sys::fd_identity(ns.as_fd())
                .map_err(kernel_error("identify a network namespace"))?;
            Ok(NetnsId::Inode { dev, ino })
        }
    }
}

/// Thaws a socket that an earlier dump or move left frozen (`tcpr thaw`):
/// releases its flow's lock in the socket's namespace, then turns repair
/// mode off with a window probe, so the connection carries on in place.
/// Only for a connection that was not restored elsewhere: two live copies
/// of one connection break it. Refuses a socket neither frozen nor locked.
pub fn thaw_frozen(sock: OwnedFd) -> Result<Flow, Error> {
    let flow = inspect_socket(sock.as_fd())?.0;
    let frozen = is_frozen(sock.as_fd())?;
    let ns = Netns::of_socket(sock.as_fd())?;
    let locked = lock::is_locked(&ns, &flow)?;
    if !frozen && !locked {
        return Err(Error::NotFrozen { flow });
    }
    // Release first, so the window probe's answer gets through.
    lock::release_flows(&ns, &[flow])?;
    if frozen {
        sys::set_repair_queue(sock.as_fd(), Queue::No)
            .and_then(|()| sys::set_repair(sock.as_fd(), sys::REPAIR_OFF))
            .map_err(kernel_error("turn off repair mode"))?;
    }
    Ok(flow)
}

impl Frozen {
    /// The frozen flow.
    pub fn flow(&self) -> Flow {
        self.flow
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_ref().expect("present until consumed").as_fd()
    }

    /// Reads the socket's complete state. The socket stays frozen.
    pub fn dump(&self) -> Result<ConnectionImage, Error> {
        dump_fd(self.fd(), self.flow, None)
    }

    /// [`Frozen::dump`] of a connection accepted from the listener whose
    /// options `from` holds, and whose options nothing changed since the
    /// accept: the options every accepted connection inherits are taken
    /// from `from` instead of read again (six system calls fewer).
    pub fn dump_accepted(&self, from: &ListenerOptions) -> Result<ConnectionImage, Error> {
        dump_fd(self.fd(), self.flow, Some(from))
    }

    /// Rolls back: releases the lock and turns repair mode off (with a window
    /// probe); the connection carries on in place. Returns the socket.
    pub fn thaw(mut self) -> Result<OwnedFd, Error> {
        self.thaw_here().map_err(|(e, sock)| {
            // Put it back: Drop tries once more rather than closing it frozen.
            self.sock = Some(sock);
            e
        })
    }

    /// [`Frozen::thaw`] that gives the socket back even when repair mode
    /// cannot be turned off: still frozen then, with the error (its lock
    /// released first, as `thaw` does, so that the window probe's answer
    /// gets through). For a caller that must give every handle back in its
    /// place (a batch given up), where a handle missing would pair the
    /// rest with the wrong connections. A socket still frozen serves no
    /// one: reading it fails, and its close sends nothing.
    pub fn thaw_or_give_back(mut self) -> Result<OwnedFd, (Error, OwnedFd)> {
        self.thaw_here()
    }

    /// Releases the lock, then turns repair mode off; the socket either way.
    fn thaw_here(&mut self) -> Result<OwnedFd, (Error, OwnedFd)> {
        let sock = self.sock.take().expect("present until consumed");
        // Release first, so the window probe's answer gets through; but a
        // failed release must not keep the socket frozen: the connection
        // carries on and the lock expires with its lease.
        if let Some(l) = self.lock.take() {
            if let Err(e) = l.release() {
                tracing::warn!(
                    "thawing {}: the lock stays until its lease ends: {e}",
                    self.flow
                );
            }
        }
        match sys::set_repair_queue(sock.as_fd(), Queue::No)
            .and_then(|()| sys::set_repair(sock.as_fd(), sys::REPAIR_OFF))
        {
            Ok(()) => Ok(sock),
            Err(e) => Err((Error::kernel("turn off repair mode", e), sock)),
        }
    }

    /// Makes the connection vanish here without a FIN or RST: disconnects the
    /// socket in repair mode (also for other holders of the same socket).
    /// Returns the flow lock, which must stay until the flow's packets can no
    /// longer reach this host: release it, or `keep` it for its lease.
    pub fn discard(mut self) -> Result<Option<FlowLock>, Error> {
        let sock = self.sock.take().expect("present until consumed");
        sys::disconnect(sock.as_fd())
            .map_err(|e| Error::kernel("disconnect the frozen socket", e))?;
        drop(sock);
        Ok(self.lock.take())
    }

    /// Closes only this handle: the socket stays frozen in any process that
    /// still holds it, and the lock stays until its lease expires.
    pub fn leave_frozen(mut self) {
        drop(self.sock.take());
        if let Some(l) = self.lock.take() {
            l.keep();
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.was_frozen {
            // Leave it as the freeze found it: frozen, and locked for the lease.
            if let Some(l) = self.lock.take() {
                l.keep();
            }
            return;
        }
        if let Some(sock) = self.sock.take() {
            let _ = sys::set_repair_queue(sock.as_fd(), Queue::No);
            let _ = sys::set_repair(sock.as_fd(), sys::REPAIR_OFF);
        }
        // The lock, if any, is released by its own Drop after repair is off.
    }
}

/// Turns a syscall's error into an engine error saying what tcpr was doing.
fn kernel_error(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::kernel(what, e)
}

/// Reads the state of a socket already in repair mode (its options partly
/// from `accepted_from`, when given).
fn dump_fd(
    fd: BorrowedFd<'_>,
    flow: Flow,
    accepted_from: Option<&ListenerOptions>,
) -> Result<ConnectionImage, Error> {
    let info = sys::tcp_info(fd).map_err(kernel_error("read TCP_INFO"))?;
    let state = TcpState::from_kernel_number(info.state).ok_or(Error::UnsupportedState {
        state: TcpState::kernel_name(info.state),
    })?;
    let outq = sys::outq(fd).map_err(kernel_error("read the send queue size"))?;
    // The unsent part of an empty send queue is empty; a byte queued after
    // SIOCOUTQ read none shows in the send queue's peek below (len + 1).
    let unsent_raw = if outq == 0 {
        0
    } else {
        sys::outq_unsent(fd).map_err(kernel_error("read the unsent queue size"))?
    };
    let inq = sys::inq(fd).map_err(kernel_error("read the receive queue size"))?;

    // Our FIN takes a sequence number but is not data (DESIGN.md, step 7).
    let we_closed = u32::from(state.we_closed());
    let fin_in_outq = u32::from(state.fin_unacked());
    let send_len = outq.checked_sub(fin_in_outq).unwrap_or(outq);
    let unsent_len = if state.we_closed() && unsent_raw > 0 {
        unsent_raw - 1
    } else {
        unsent_raw
    };

    sys::set_repair_queue(fd, Queue::Recv).map_err(kernel_error("select the receive queue"))?;
    let rcv_nxt = sys::queue_seq(fd).map_err(kernel_error("read the receive sequence"))?;
    let recv_queue = sys::peek(fd, inq as usize).map_err(kernel_error("read the receive queue"))?;
    sys::set_repair_queue(fd, Queue::Send).map_err(kernel_error("select the send queue"))?;
    let write_seq = sys::queue_seq(fd).map_err(kernel_error("read the send sequence"))?;
    let mut send_data =
        sys::peek(fd, send_len as usize).map_err(kernel_error("read the send queue"))?;
    sys::set_repair_queue(fd, Queue::No).map_err(kernel_error("leave the repair queue"))?;
    if recv_queue.len() != inq as usize || send_data.len() != send_len as usize {
        return Err(Error::Inconsistent(format!(
            "the queues of {flow} changed during the dump (receive {} of {inq}, send {} of {send_len} bytes)",
            recv_queue.len(),
            send_data.len()
        )));
    }
    let unsent_len = (unsent_len as usize).min(send_data.len());
    let split = send_data.len() - unsent_len;
    let unsent = send_data.split_off(split);
    let send_queue = SendQueue {
        sent: send_data,
        unsent,
    };

    let mss = sys::get_int(fd, libc::SOL_TCP, libc::TCP_MAXSEG)
        .map_err(kernel_error("read TCP_MAXSEG"))?;
    let timestamp = sys::tcp_timestamp(fd).map_err(kernel_error("read TCP_TIMESTAMP"))?;
    let w = sys::repair_window(fd).map_err(kernel_error("read TCP_REPAIR_WINDOW"))?;
    let window_scaling = info.options & sys::TCPI_OPT_WSCALE != 0;
    let img = ConnectionImage {
        local: flow.local,
        peer: flow.peer,
        state,
        send_seq: Seq(write_seq).back(we_closed),
        recv_seq: Seq(rcv_nxt).back(u32::from(state.peer_closed())),
        recv_queue,
        send_queue,
        options: TcpOptions {
            mss: u16::try_from(mss).unwrap_or(u16::MAX).max(1),
            sack: info.options & sys::TCPI_OPT_SACK != 0,
            timestamps: info.options & sys::TCPI_OPT_TIMESTAMPS != 0,
            window_scaling,
            snd_wscale: if window_scaling { info.snd_wscale } else { 0 },
            rcv_wscale: if window_scaling { info.rcv_wscale } else { 0 },
        },
        window: w,
        timestamp,
        socket_options: match accepted_from {
            Some(l) => l.of_accepted(fd, flow.local.is_ipv6()),
            None => options::read(fd, flow.local.is_ipv6()),
        },
        app_blob: Vec::new(),
        dumped_at_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    img.validate()?;
    Ok(img)
}

/// The flow of an image, for locks and messages.
pub fn flow_of(img: &ConnectionImage) -> Flow {
    Flow {
        local: img.local,
        peer: img.peer,
    }
}
