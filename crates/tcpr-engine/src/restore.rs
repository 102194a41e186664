//! Restore: build a socket from an image, in the order the kernel enforces
//! (DESIGN.md, "Restore"), leave it in repair mode, and resume it later.

mod defaults;
mod local_route;
mod queue;
mod wire;

use crate::error::Need;
use crate::lock::{self, FlowLock, Netns};
use crate::sys::{self, Queue, RepairOpt};
use crate::{Error, Flow};
use local_route::LocalRoute;
use queue::{fill, fill_repair_queue, room_for, Buf, FillError, Patience};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};
use tcpr_image::{ConnectionImage, SocketOptions, TcpState};

const TCPOPT_MSS: u32 = 2;
/// The smallest MSS TCP_MAXSEG accepts (TCP_MIN_MSS, include/net/tcp.h).
const TCP_MIN_MSS: u32 = 88;
/// The largest MSS TCP_MAXSEG accepts (MAX_TCP_WINDOW, include/net/tcp.h).
const MAX_TCP_WINDOW: u32 = 32767;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const IPV6_TRANSPARENT: i32 = 75;

/// How long [`Restored::resume`] waits, by default, for the peer to
/// acknowledge enough that the unsent data fits the send buffer.
pub const UNSENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the socket may take to process the forged FIN (it is
/// processed on loopback, normally before `sendto` returns).
const PEER_FIN_TIMEOUT: Duration = Duration::from_secs(1);

/// A restored socket, still in repair mode: it sends nothing yet. Call
/// [`Restored::resume`] once the flow's packets can reach this host, or
/// [`Restored::discard`]. Dropping it discards.
#[must_use = "dropping a Restored socket discards it"]
#[derive(Debug)]
pub struct Restored {
    sock: Option<OwnedFd>,
    flow: Flow,
    unsent: Vec<u8>,
    /// Our FIN comes after the unsent data (it was not sent at dump time).
    fin_after_unsent: bool,
    /// Applied after the unsent data is queued (it gates sendmsg).
    notsent_lowat: Option<u32>,
    /// The original's `SO_BUF_LOCK`, applied again after the unsent data
    /// is queued (growing the buffer for it locks it).
    buf_lock: Option<u32>,
    /// The peer's FIN must be delivered to the socket (forged) on resume.
    peer_fin: Option<PendingPeerFin>,
    /// How long resume waits for room for the unsent data.
    unsent_timeout: Duration,
    /// Whether resume looks for this namespace's lock on the flow (see
    /// [`Restored::set_no_local_lock`]).
    local_lock: LocalLock,
    /// The socket's network namespace cookie, read once at restore for the
    /// option defaults and resume's lock look-up (`None`: unknown).
    netns_cookie: Option<u64>,
}

/// What [`Restored::resume`] knows of a lock on the flow in the socket's
/// network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalLock {
    /// There may be one (the flow was dumped here): look, and release it.
    MayBeHeld,
    /// The caller knows there is none: do not look.
    NoneHeld,
}

/// The peer's FIN, as the image knows it; its ACK is read at delivery.
#[derive(Debug, Clone, Copy)]
struct PendingPeerFin {
    seq: u32,
    /// The peer's window, scaled down by its shift (as a segment has it).
    window: u16,
}

/// How far [`Restored::resume`] got, for undoing it on failure.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    /// This namespace's lock on the flow was released: its packets pass.
    lock_released: bool,
    /// Repair mode is off: the socket sends and answers.
    live: bool,
}

/// An error converter for a kernel call doing `what` (a socket operation:
/// an EPERM names CAP_NET_ADMIN).
fn kernel_error(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::kernel(what, e)
}

/// Sets which buffer sizes are fixed (`SO_BUF_LOCK`) to `lock`. A kernel
/// older than 5.14 has no such option: there the sizes tcpr set stay
/// fixed, as they always were before the image carried the lock.
fn set_buf_lock(fd: BorrowedFd<'_>, lock: u32) -> Result<(), Error> {
    match sys::set_int(fd, libc::SOL_SOCKET, sys::SO_BUF_LOCK, lock as i32) {
        Err(e) if sys::raw_os_error(&e) == Some(libc::ENOPROTOOPT) => {
            tracing::debug!("SO_BUF_LOCK unknown to this kernel: buffer sizes stay fixed");
            Ok(())
        }
        r => r.map_err(kernel_error("set SO_BUF_LOCK")),
    }
}

/// Builds a socket from `img`, in repair mode. Works while the local address
/// is not (yet) assigned on this host (`IP_TRANSPARENT`). On error the new
/// socket is closed silently and nothing else changed.
pub fn restore(img: &ConnectionImage) -> Result<Restored, Error> {
    img.validate()?;
    let flow = Flow {
        local: img.local,
        peer: img.peer,
    };
    let v6 = img.local.is_ipv6();
    let sock = sys::tcp_socket(v6).map_err(kernel_error("create a socket"))?;
    let fd = sock.as_fd();
    // The local address need not be ours yet: output routing accepts a
    // non-local source only with IP_TRANSPARENT (freebind is not enough).
    let r = if v6 {
        sys::set_int(fd, libc::SOL_IPV6, IPV6_TRANSPARENT, 1)
    } else {
        sys::set_int(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1)
    };
    r.map_err(kernel_error("set IP_TRANSPARENT"))?;
    sys::set_repair(fd, sys::REPAIR_ON).map_err(kernel_error("turn on repair mode"))?;
    // SO_NETNS_COOKIE needs Linux 5.14; without it the defaults are
    // unknown and resume asks the kernel itself.
    let netns_cookie = sys::netns_cookie(fd).ok();
    let defaults = netns_cookie.and_then(|c| defaults::of_fresh_socket(fd, v6, c));
    let notsent_lowat = img
        .socket_options
        .notsent_lowat
        .filter(|&v| differs(Some(v), defaults.as_ref().map(|d| d.notsent_lowat)));
    let mut restored = Restored {
        sock: Some(sock),
        flow,
        unsent: img.send_queue.unsent.clone(),
        fin_after_unsent: false,
        notsent_lowat,
        buf_lock: img.socket_options.buf_lock,
        peer_fin: None,
        unsent_timeout: UNSENT_TIMEOUT,
        local_lock: LocalLock::MayBeHeld,
        netns_cookie,
    };
    restored.build(img, defaults.as_deref())?;
    Ok(restored)
}

impl Restored {
    /// The restored flow.
    pub fn flow(&self) -> Flow {
        self.flow
    }

    /// How long [`Restored::resume`] may wait for the peer to acknowledge
    /// enough that the unsent data fits the send buffer (only where the
    /// buffer cannot be forced large enough: an unprivileged user
    /// namespace). [`UNSENT_TIMEOUT`] unless set.
    pub fn set_unsent_timeout(&mut self, timeout: Duration) {
        self.unsent_timeout = timeout;
    }

    /// The restored socket, for a caller that gives a copy of it to
    /// another process before resuming it (see
    /// [`Restored::done_when_live`]).
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.sock.as_ref().expect("present until consumed").as_fd()
    }

    /// True when turning repair mode off is all [`Restored::resume`] has
    /// left to do that matters: no peer's FIN to deliver first, no unsent
    /// data to queue and no FIN of ours to replay after (only
    /// `TCP_NOTSENT_LOWAT`, if the image had one, is set after), and
    /// this namespace's lock on the flow already released (see
    /// [`Restored::set_no_local_lock`]). A copy of the socket found out of
    /// repair mode is then a resumed connection, and one still in it can be
    /// resumed by turning repair mode off, whatever became of the process
    /// that restored it.
    pub fn done_when_live(&self) -> bool {
        self.peer_fin.is_none()
            && self.unsent.is_empty()
            && !self.fin_after_unsent
            && matches!(self.local_lock, LocalLock::NoneHeld)
    }

    /// Tells [`Restored::resume`] that the socket's network namespace
    /// holds no lock on the flow, so it skips looking for one (a netlink
    /// socket and one or two nf_tables requests per connection: most of
    /// an agent's resume of a large batch). For a caller that knows the
    /// connection was dumped in another namespace (an agent whose sender
    /// is on another host) and released its own locks on the flow; a lock
    /// left here by someone else would then hold the flow's packets until
    /// its lease ends.
    pub fn set_no_local_lock(&mut self) {
        self.local_lock = LocalLock::NoneHeld;
    }

    fn build(
        &mut self,
        img: &ConnectionImage,
        defaults: Option<&SocketOptions>,
    ) -> Result<(), Error> {
        let sock = self.sock.take().expect("present until consumed");
        let r = self.build_on(sock.as_fd(), img, defaults);
        self.sock = Some(sock);
        r
    }

    fn build_on(
        &mut self,
        fd: BorrowedFd<'_>,
        img: &ConnectionImage,
        defaults: Option<&SocketOptions>,
    ) -> Result<(), Error> {
        let so = &img.socket_options;
        // Buffers first, so that the queues fit. The original's buffer can
        // be smaller than its queue (the kernel moderates sk_sndbuf to half
        // the queued memory under pressure), so the queue sets the floor.
        let send_len = img.send_queue.sent.len() + img.send_queue.unsent.len();
        let recv_want = (so.rcvbuf.unwrap_or(0) as usize).max(room_for(img.recv_queue.len()));
        let send_want = (so.sndbuf.unwrap_or(0) as usize).max(room_for(send_len));
        // A new socket's buffers are its namespace's defaults: no need to
        // read them again.
        let raised = match defaults.and_then(|d| d.rcvbuf.zip(d.sndbuf)) {
            Some((rcvbuf, sndbuf)) => {
                Buf::Recv.raise(fd, recv_want, rcvbuf as usize)
                    | Buf::Send.raise(fd, send_want, sndbuf as usize)
            }
            // Whether it asked (as `raise`), not whether the buffer grew:
            // a size the kernel clamped locks the buffer all the same.
            None => {
                Buf::Recv.raise(fd, recv_want, Buf::Recv.current(fd))
                    | Buf::Send.raise(fd, send_want, Buf::Send.current(fd))
            }
        };
        // Sequence numbers are accepted only in CLOSE, so before connect.
        let recv_start = img.recv_seq.back(img.recv_queue.len() as u32);
        let send_start = img.send_seq.back(img.send_queue.len() as u32);
        sys::set_repair_queue(fd, Queue::Recv).map_err(kernel_error("select the receive queue"))?;
        sys::set_queue_seq(fd, recv_start.0).map_err(kernel_error("set the receive sequence"))?;
        sys::set_repair_queue(fd, Queue::Send).map_err(kernel_error("select the send queue"))?;
        sys::set_queue_seq(fd, send_start.0).map_err(kernel_error("set the send sequence"))?;

        let in_use = |e: std::io::Error| match sys::raw_os_error(&e) {
            Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL) => Error::AddressInUse {
                local: img.local,
                peer: img.peer,
            },
            _ => Error::kernel(format!("restore {} -> {}", img.local, img.peer), e),
        };
        let o = &img.options;
        // The kernel sizes the segments it sends (mss_cache) at connect, from
        // the path MTU and the peer's MSS as it then knows it, and not again
        // when TCP_REPAIR_OPTIONS gives it the peer's MSS below: a restored
        // socket sent 536-byte segments (1220 over IPv6) on any link. As
        // TCP_MAXSEG, the peer's MSS is known at connect. It stays the
        // socket's own limit, equal to what the peer allows anyway.
        // (At most MAX_TCP_WINDOW: only loopback's MTU goes beyond, where
        // the kernel's own choice is half the window, 32 KiB, anyway.)
        if u32::from(o.mss) >= TCP_MIN_MSS {
            let mss = u32::from(o.mss).min(MAX_TCP_WINDOW) as i32;
            sys::set_int(fd, libc::SOL_TCP, libc::TCP_MAXSEG, mss)
                .map_err(kernel_error("set TCP_MAXSEG"))?;
        }
        // In repair mode bind forces the address (SK_FORCE_REUSE) and connect
        // goes straight to ESTABLISHED without a SYN.
        sys::bind(fd, img.local).map_err(in_use)?;
        sys::connect(fd, img.peer).map_err(in_use)?;

        if o.timestamps {
            sys::set_tcp_timestamp(fd, img.timestamp).map_err(kernel_error("set TCP_TIMESTAMP"))?;
        }
        // Only in ESTABLISHED and, since Linux 6.2, before any data is queued.
        let mut opts = vec![RepairOpt {
            code: TCPOPT_MSS,
            val: o.mss.into(),
        }];
        if o.window_scaling {
            opts.push(RepairOpt {
                code: TCPOPT_WINDOW,
                val: u32::from(o.snd_wscale) | u32::from(o.rcv_wscale) << 16,
            });
        }
        if o.sack {
            opts.push(RepairOpt {
                code: TCPOPT_SACK_PERM,
                val: 0,
            });
        }
        if o.timestamps {
            opts.push(RepairOpt {
                code: TCPOPT_TIMESTAMP,
                val: 0,
            });
        }
        sys::set_repair_options(fd, &opts).map_err(kernel_error("set TCP_REPAIR_OPTIONS"))?;

        // The send queue is still selected from its sequence number above.
        if !img.recv_queue.is_empty() {
            sys::set_repair_queue(fd, Queue::Recv)
                .map_err(kernel_error("select the receive queue"))?;
            fill_repair_queue(fd, &img.recv_queue, Buf::Recv, "queue the receive queue")?;
            sys::set_repair_queue(fd, Queue::Send)
                .map_err(kernel_error("select the send queue"))?;
        }
        fill_repair_queue(fd, &img.send_queue.sent, Buf::Send, "queue the send queue")?;
        // Our FIN, if it was already sent: replayed while the send queue is
        // selected, so the kernel marks it sent instead of transmitting it.
        let peer_fin = img.state.peer_closed();
        if img.state.we_closed() {
            if img.send_queue.unsent.is_empty() && !peer_fin {
                sys::shutdown_write(fd).map_err(kernel_error("replay our FIN"))?;
            } else {
                self.fin_after_unsent = true;
            }
        }
        sys::set_repair_queue(fd, Queue::No).map_err(kernel_error("leave the repair queue"))?;

        let mut w = img.window;
        if peer_fin {
            // rcv_nxt is one short of the peer's FIN, which is replayed on
            // resume; the kernel requires rcv_wup <= rcv_nxt.
            if w.rcv_wup == img.recv_seq.forward(1).0 {
                w.rcv_wup = w.rcv_wup.wrapping_sub(1);
                w.rcv_wnd = w.rcv_wnd.saturating_add(1);
            }
            let shift = if o.window_scaling { o.snd_wscale } else { 0 };
            self.peer_fin = Some(PendingPeerFin {
                seq: img.recv_seq.0,
                window: u16::try_from(img.window.snd_wnd >> shift).unwrap_or(u16::MAX),
            });
        }
        sys::set_repair_window(fd, w).map_err(kernel_error("set TCP_REPAIR_WINDOW"))?;
        apply_socket_options(fd, so, defaults, img.local.is_ipv6())?;
        // Sizing a buffer (above, or when a queue did not fit; even a size
        // the kernel clamped) locked it; the original's lock is put back,
        // so a buffer the kernel was autotuning is autotuned again from the
        // size it had reached. A new socket with nothing sized or queued
        // has the lock of one that set nothing: no call then.
        let queued = !img.recv_queue.is_empty() || !img.send_queue.sent.is_empty();
        let touched = raised || queued;
        if let Some(lock) = so.buf_lock.filter(|&l| l != 0 || touched) {
            set_buf_lock(fd, lock)?;
        }
        Ok(())
    }

    /// Brings the connection to life and returns it, ready for the
    /// application:
    /// 1. if the flow is locked in this network namespace (a restore on the
    ///    host it was dumped on, such as a process upgrade), releases that
    ///    lock, so the flow is taken over at once instead of after the lease
    ///    (unless told there is none: [`Restored::set_no_local_lock`]);
    /// 2. delivers the peer's FIN if it had closed (whether or not the local
    ///    address is assigned here yet: see `local_route`);
    /// 3. turns repair mode off (the kernel sends a window probe, so the
    ///    peer answers at once);
    /// 4. queues the unsent data; where the send buffer cannot be made
    ///    large enough (an unprivileged namespace), feeds it as the peer
    ///    acknowledges, for up to the unsent timeout;
    /// 5. replays our FIN if it was not yet sent.
    ///
    /// On failure the socket is closed without a FIN or RST (in repair
    /// mode), and if its flow's packets could reach it by then, the flow
    /// is locked here for [`lock::DEFAULT_LEASE`] so that they meet no
    /// RST either: the image can be restored again.
    pub fn resume(mut self) -> Result<TcpStream, Error> {
        let sock = self.sock.take().expect("present until consumed");
        let mut progress = Progress::default();
        match self.bring_up(sock.as_fd(), &mut progress) {
            Ok(()) => Ok(TcpStream::from(sock)),
            Err(e) => {
                self.abandon(sock, progress);
                Err(e)
            }
        }
    }

    fn bring_up(&self, fd: BorrowedFd<'_>, progress: &mut Progress) -> Result<(), Error> {
        progress.lock_released = match self.local_lock {
            LocalLock::MayBeHeld => release_local_lock(fd, self.flow, self.netns_cookie)?,
            LocalLock::NoneHeld => false,
        };
        if let Some(fin) = self.peer_fin {
            self.deliver_peer_fin(fd, fin)?;
        }
        sys::set_repair(fd, sys::REPAIR_OFF).map_err(kernel_error("turn off repair mode"))?;
        progress.live = true;
        let deadline = Instant::now() + self.unsent_timeout;
        fill(
            fd,
            &self.unsent,
            Buf::Send,
            Patience::Until(deadline),
            "queue the unsent data",
        )
        .map_err(|e| match e {
            FillError::Kernel(e) => e,
            FillError::Full { queued } => Error::UnsentNotQueued {
                local: self.flow.local,
                peer: self.flow.peer,
                queued,
                unsent: self.unsent.len(),
                waited: self.unsent_timeout,
            },
        })?;
        // Queuing them may have grown (so locked) the send buffer. The
        // connection is live by now: a refusal is not worth ending it.
        if let Some(lock) = self.buf_lock.filter(|_| !self.unsent.is_empty()) {
            if let Err(e) = set_buf_lock(fd, lock) {
                tracing::warn!("{e}: the send buffer stays at its size");
            }
        }
        // TCP_NOTSENT_LOWAT gates sendmsg on the unsent bytes, so it is
        // set only once they are queued.
        if let Some(v) = self.notsent_lowat {
            sys::set_int(fd, libc::SOL_TCP, libc::TCP_NOTSENT_LOWAT, v as i32)
                .map_err(kernel_error("set TCP_NOTSENT_LOWAT"))?;
        }
        if self.fin_after_unsent {
            sys::shutdown_write(fd).map_err(kernel_error("replay our FIN"))?;
        }
        Ok(())
    }

    /// Closes a socket whose resume failed, sending nothing: repair mode
    /// goes back on (closing in repair mode sends neither FIN nor RST), and
    /// if the flow's packets could reach this host, the flow is locked
    /// here first, so that none meets a missing socket and draws a RST.
    fn abandon(&self, sock: OwnedFd, progress: Progress) {
        let flow = self.flow;
        if progress.lock_released || progress.live {
            // The socket's namespace: resume may run on a thread elsewhere.
            let ns = Netns::of_socket(sock.as_fd()).unwrap_or_else(|_| Netns::current());
            match FlowLock::acquire(&[flow], ns, lock::DEFAULT_LEASE) {
                Ok(l) => l.keep(),
                Err(e) => tracing::warn!(
                    "{} -> {}: cannot lock the flow after a failed resume ({e}); \
                     its next packet here may draw a RST",
                    flow.local,
                    flow.peer
                ),
            }
        }
        if progress.live {
            if let Err(e) = sys::set_repair(sock.as_fd(), sys::REPAIR_ON) {
                // Closing a live socket would send a FIN or a RST: keep it
                // open instead, so the connection is not ended from here.
                tracing::error!(
                    "{} -> {}: cannot turn repair mode back on after a failed resume ({e}); \
                     the socket is left open rather than closed with a FIN or RST",
                    flow.local,
                    flow.peer
                );
                std::mem::forget(sock);
                return;
            }
        }
        drop(sock);
    }

    /// Delivers a forged FIN|ACK from the peer to the restored socket (there
    /// is no socket call for "the peer closed"). Its ACK must be current
    /// (snd_una now) and it carries no timestamp option. It reaches the
    /// socket through a local route for marked packets (`local_route`), so
    /// the local address need not be assigned here yet.
    fn deliver_peer_fin(&self, fd: BorrowedFd<'_>, fin: PendingPeerFin) -> Result<(), Error> {
        sys::set_repair_queue(fd, Queue::Send).map_err(kernel_error("select the send queue"))?;
        let write_seq = sys::queue_seq(fd).map_err(kernel_error("read the send sequence"))?;
        sys::set_repair_queue(fd, Queue::No).map_err(kernel_error("leave the repair queue"))?;
        let outq = sys::outq(fd).map_err(kernel_error("read the send queue size"))?;
        let snd_una = write_seq.wrapping_sub(outq);
        let packet = wire::PeerFin {
            from: self.flow.peer,
            to: self.flow.local,
            seq: fin.seq,
            ack: snd_una,
            window: fin.window,
        }
        .packet()
        .map_err(|e| {
            Error::Inconsistent(format!(
                "{} -> {}: cannot forge the peer's FIN: {e:?}",
                self.flow.local, self.flow.peer
            ))
        })?;
        let to = wire::wire_ip(self.flow.local.ip());
        let route = LocalRoute::install(to.is_ipv6())?;
        sys::send_raw_ip_marked(&packet, to, route.mark()).map_err(|e| {
            Error::kernel_needing("deliver the peer's FIN from a raw socket", Need::NetRaw, e)
        })?;
        drop(route);
        let established = TcpState::Established.kernel_number();
        let deadline = Instant::now() + PEER_FIN_TIMEOUT;
        loop {
            let state = sys::tcp_info(fd)
                .map_err(kernel_error("read TCP_INFO"))?
                .state;
            if state != established {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Inconsistent(format!(
                    "{} -> {}: the socket did not take the replayed FIN of the peer within {PEER_FIN_TIMEOUT:?}",
                    self.flow.local, self.flow.peer
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Closes the socket while in repair mode: no FIN, no RST.
    pub fn discard(mut self) {
        drop(self.sock.take());
    }
}

/// Closes a live connection without a FIN or a RST: repair mode goes back
/// on first, and a socket closed in repair mode sends nothing (`__tcp_close`
/// hands a repair-mode socket to `tcp_disconnect`, which skips the reset).
/// For a connection resumed but not delivered: its peer sees silence, never
/// a clean end of stream that would pass for a complete response.
pub fn close_silently(sock: std::os::fd::OwnedFd) -> Result<(), Error> {
    sys::set_repair(sock.as_fd(), sys::REPAIR_ON)
        .map_err(|e| Error::kernel("turn repair mode back on to close silently", e))
}

impl Drop for Restored {
    fn drop(&mut self) {
        // Closing in repair mode sends nothing.
        drop(self.sock.take());
    }
}

/// Releases the lock on `flow` if this network namespace holds one (the
/// flow was dumped here: a process upgrade, or a handoff between two
/// processes of one host). Its packets then reach the restored socket at
/// once rather than when the lease ends. Returns whether there was one.
fn release_local_lock(
    fd: BorrowedFd<'_>,
    flow: Flow,
    netns_cookie: Option<u64>,
) -> Result<bool, Error> {
    // The socket's namespace, not the calling thread's: a caller may
    // restore inside a namespace and resume from outside it. One netlink
    // GET in the common case (a missing table or set answers "absent"):
    // this runs on every resume, also an agent's thousands. The lock keys
    // a flow by its wire family (an IPv4-mapped flow as IPv4).
    let held = lock::take_over(fd, &flow, netns_cookie).map_err(|e| {
        Error::Lock(format!(
            "{} -> {}: cannot release this namespace's lock on the flow to take it over: {e}",
            flow.local, flow.peer
        ))
    })?;
    if held {
        tracing::debug!(local = %flow.local, peer = %flow.peer, "took over the flow's local lock");
    }
    Ok(held)
}

/// Whether an image's `value` must be set on a new socket whose default is
/// `default` (`None` inside: unknown): an option the image lacks stays at
/// the default, and one the image holds at the default is left alone.
fn differs<T: PartialEq>(value: Option<T>, default: Option<Option<T>>) -> bool {
    match (value, default) {
        (None, _) => false,
        (Some(v), Some(Some(d))) => v != d,
        (Some(_), _) => true,
    }
}

/// Sets the options of `so` that differ from a new socket's `defaults`
/// (all of them when the defaults are unknown).
fn apply_socket_options(
    fd: BorrowedFd<'_>,
    so: &SocketOptions,
    defaults: Option<&SocketOptions>,
    v6: bool,
) -> Result<(), Error> {
    let set = |level: i32,
               name: i32,
               v: Option<u32>,
               default: fn(&SocketOptions) -> Option<u32>,
               what: &'static str|
     -> Result<bool, Error> {
        match v {
            Some(v) if differs(Some(v), defaults.map(default)) => {
                sys::set_int(fd, level, name, v as i32)
                    .map_err(|e| Error::kernel(format!("set {what}"), e))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let b = |v: Option<bool>| v.map(u32::from);
    set(
        libc::SOL_TCP,
        libc::TCP_NODELAY,
        b(so.nodelay),
        |d| d.nodelay.map(u32::from),
        "TCP_NODELAY",
    )?;
    set(
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        b(so.keepalive),
        |d| d.keepalive.map(u32::from),
        "SO_KEEPALIVE",
    )?;
    set(
        libc::SOL_TCP,
        libc::TCP_KEEPIDLE,
        so.keepalive_idle_secs,
        |d| d.keepalive_idle_secs,
        "TCP_KEEPIDLE",
    )?;
    set(
        libc::SOL_TCP,
        libc::TCP_KEEPINTVL,
        so.keepalive_interval_secs,
        |d| d.keepalive_interval_secs,
        "TCP_KEEPINTVL",
    )?;
    set(
        libc::SOL_TCP,
        libc::TCP_KEEPCNT,
        so.keepalive_count,
        |d| d.keepalive_count,
        "TCP_KEEPCNT",
    )?;
    set(
        libc::SOL_TCP,
        libc::TCP_USER_TIMEOUT,
        so.user_timeout_ms,
        |d| d.user_timeout_ms,
        "TCP_USER_TIMEOUT",
    )?;
    set(
        libc::SOL_SOCKET,
        libc::SO_MARK,
        so.mark,
        |d| d.mark,
        "SO_MARK",
    )?;
    // The hop limit is always set: a socket that never set it answers the
    // route's limit (IPv6) or sends with it (ip4_dst_hoplimit), and the
    // routes here may differ from the original's; the image's value is
    // what the original reported.
    let always = |_: &SocketOptions| None;
    let tos_set = if v6 {
        let tos_set = set(
            libc::SOL_IPV6,
            libc::IPV6_TCLASS,
            so.tos,
            |d| d.tos,
            "IPV6_TCLASS",
        )?;
        set(
            libc::SOL_IPV6,
            libc::IPV6_UNICAST_HOPS,
            so.ttl,
            always,
            "IPV6_UNICAST_HOPS",
        )?;
        tos_set
    } else {
        let tos_set = set(libc::SOL_IP, libc::IP_TOS, so.tos, |d| d.tos, "IP_TOS")?;
        set(libc::SOL_IP, libc::IP_TTL, so.ttl, always, "IP_TTL")?;
        tos_set
    };
    // After IP_TOS, which also sets the priority on older kernels (ip(7)):
    // then the priority is set even at its default.
    set(
        libc::SOL_SOCKET,
        libc::SO_PRIORITY,
        so.priority,
        if tos_set { always } else { |d| d.priority },
        "SO_PRIORITY",
    )?;
    if let Some(cc) = &so.congestion {
        // An algorithm missing on this host is not fatal: the connection
        // carries on with the default one.
        let default = defaults.and_then(|d| d.congestion.as_deref());
        if default != Some(cc.as_str()) {
            if let Err(e) = sys::set_string(fd, libc::SOL_TCP, libc::TCP_CONGESTION, cc) {
                tracing::warn!(
                    "congestion control {cc:?} unavailable here ({e}); using the default"
                );
            }
        }
    }
    // A new socket does not linger (the image holds only a linger that is on).
    if let Some(l) = so.linger_secs {
        sys::set_linger(fd, l as i32).map_err(kernel_error("set SO_LINGER"))?;
    }
    Ok(())
}
