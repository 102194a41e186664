//! The syscall layer: the only module with `unsafe`. Three tiers, as in
//! socket2: the `syscall!` helper turns `-1` into `io::Error`; the generic
//! `getsockopt`/`setsockopt` whose contract ties `T` to the option; one safe
//! wrapper per option. Every error carries the name of the call or option.
//! The generic socket calls (int options, bind, connect, addresses, netlink
//! sockets, send/recv) are `tcpr_host::sock`'s; this layer keeps what is
//! TCP-repair specific.

use std::io;
use std::mem::{size_of, zeroed, MaybeUninit};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Calls a libc function and turns a `-1` return into the thread's errno.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: each call site documents why its arguments are valid.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 { Err(io::Error::last_os_error()) } else { Ok(res) }
    }};
}

// The generic socket calls live in `tcpr_host::sock`; this layer adds the
// TCP-repair specific ones and names errors as the engine reports them.
use tcpr_host::sock;
pub(crate) use tcpr_host::sock::{
    get_int, named, netlink_socket, netns_cookie, raw_os_error, recv_into, send_all, set_int,
    set_recv_timeout, to_sockaddr,
};

// Option numbers from linux/tcp.h (DESIGN.md lists them).
pub(crate) const TCP_REPAIR: i32 = 19;
pub(crate) const TCP_REPAIR_QUEUE: i32 = 20;
pub(crate) const TCP_QUEUE_SEQ: i32 = 21;
pub(crate) const TCP_REPAIR_OPTIONS: i32 = 22;
pub(crate) const TCP_TIMESTAMP: i32 = 24;
pub(crate) const TCP_REPAIR_WINDOW: i32 = 29;
pub(crate) const REPAIR_ON: i32 = 1;
pub(crate) const REPAIR_OFF: i32 = 0;

/// `TCP_REPAIR_QUEUE` values.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Queue {
    No = 0,
    Recv = 1,
    Send = 2,
}

const SIOCINQ: libc::c_ulong = libc::FIONREAD;
const SIOCOUTQ: libc::c_ulong = libc::TIOCOUTQ;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// Reads a socket option of type `T`; returns it and the length the kernel wrote.
///
/// # Safety
/// `T` must be the type the kernel writes for `(level, name)` (or a byte
/// buffer at least that large), valid for any bit pattern.
unsafe fn getsockopt<T: Copy>(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<(T, usize)> {
    let mut val = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` is a writable buffer of `len` bytes owned by this frame;
    // `len` is a valid pointer; the fd is borrowed and open.
    syscall!(getsockopt(
        fd.as_raw_fd(),
        level,
        name,
        val.as_mut_ptr().cast(),
        &mut len
    ))?;
    // SAFETY: zero-initialised and `T` is valid for any bit pattern (contract).
    Ok((unsafe { val.assume_init() }, len as usize))
}

/// Writes a socket option from `val`.
///
/// # Safety
/// `T` must be the type the kernel reads for `(level, name)`.
unsafe fn setsockopt<T>(fd: BorrowedFd<'_>, level: i32, name: i32, val: &T) -> io::Result<()> {
    // SAFETY: `val` points to `size_of::<T>()` readable bytes for the call.
    syscall!(setsockopt(
        fd.as_raw_fd(),
        level,
        name,
        (val as *const T).cast(),
        size_of::<T>() as libc::socklen_t
    ))?;
    Ok(())
}

pub(crate) fn set_repair(fd: BorrowedFd<'_>, mode: i32) -> io::Result<()> {
    set_int(fd, libc::SOL_TCP, TCP_REPAIR, mode).map_err(named("TCP_REPAIR"))
}

pub(crate) fn set_repair_queue(fd: BorrowedFd<'_>, q: Queue) -> io::Result<()> {
    set_int(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, q as i32).map_err(named("TCP_REPAIR_QUEUE"))
}

pub(crate) fn queue_seq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    get_int(fd, libc::SOL_TCP, TCP_QUEUE_SEQ)
        .map(|v| v as u32)
        .map_err(named("TCP_QUEUE_SEQ"))
}

pub(crate) fn set_queue_seq(fd: BorrowedFd<'_>, seq: u32) -> io::Result<()> {
    set_int(fd, libc::SOL_TCP, TCP_QUEUE_SEQ, seq as i32).map_err(named("TCP_QUEUE_SEQ"))
}

pub(crate) fn tcp_timestamp(fd: BorrowedFd<'_>) -> io::Result<u32> {
    get_int(fd, libc::SOL_TCP, TCP_TIMESTAMP)
        .map(|v| v as u32)
        .map_err(named("TCP_TIMESTAMP"))
}

pub(crate) fn set_tcp_timestamp(fd: BorrowedFd<'_>, ts: u32) -> io::Result<()> {
    set_int(fd, libc::SOL_TCP, TCP_TIMESTAMP, ts as i32).map_err(named("TCP_TIMESTAMP"))
}

/// `struct tcp_repair_opt`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct RepairOpt {
    pub(crate) code: u32,
    pub(crate) val: u32,
}

pub(crate) fn set_repair_options(fd: BorrowedFd<'_>, opts: &[RepairOpt]) -> io::Result<()> {
    // SAFETY: the kernel reads `len / sizeof(tcp_repair_opt)` entries from the
    // slice, which is valid for `size_of_val(opts)` bytes.
    syscall!(setsockopt(
        fd.as_raw_fd(),
        libc::SOL_TCP,
        TCP_REPAIR_OPTIONS,
        opts.as_ptr().cast(),
        std::mem::size_of_val(opts) as libc::socklen_t
    ))
    .map(drop)
    .map_err(named("TCP_REPAIR_OPTIONS"))
}

/// `struct tcp_repair_window`: five u32, 20 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct RepairWindowRaw {
    pub(crate) snd_wl1: u32,
    pub(crate) snd_wnd: u32,
    pub(crate) max_window: u32,
    pub(crate) rcv_wnd: u32,
    pub(crate) rcv_wup: u32,
}

impl From<RepairWindowRaw> for tcpr_image::RepairWindow {
    fn from(w: RepairWindowRaw) -> Self {
        tcpr_image::RepairWindow {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd,
            rcv_wup: w.rcv_wup,
        }
    }
}

impl From<tcpr_image::RepairWindow> for RepairWindowRaw {
    fn from(w: tcpr_image::RepairWindow) -> Self {
        RepairWindowRaw {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd,
            rcv_wup: w.rcv_wup,
        }
    }
}

pub(crate) fn repair_window(fd: BorrowedFd<'_>) -> io::Result<tcpr_image::RepairWindow> {
    // SAFETY: TCP_REPAIR_WINDOW writes a struct tcp_repair_window (five u32).
    let (w, len) = unsafe { getsockopt::<RepairWindowRaw>(fd, libc::SOL_TCP, TCP_REPAIR_WINDOW) }
        .map_err(named("TCP_REPAIR_WINDOW"))?;
    if len != size_of::<RepairWindowRaw>() {
        return Err(io::Error::other(
            "TCP_REPAIR_WINDOW: short answer from the kernel",
        ));
    }
    Ok(w.into())
}

pub(crate) fn set_repair_window(fd: BorrowedFd<'_>, w: tcpr_image::RepairWindow) -> io::Result<()> {
    let raw = RepairWindowRaw::from(w);
    // SAFETY: the kernel reads exactly a struct tcp_repair_window.
    unsafe { setsockopt(fd, libc::SOL_TCP, TCP_REPAIR_WINDOW, &raw) }
        .map_err(named("TCP_REPAIR_WINDOW"))
}

/// The first bytes of `struct tcp_info` that tcpr needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TcpInfo {
    pub(crate) state: u8,
    pub(crate) options: u8,
    pub(crate) snd_wscale: u8,
    pub(crate) rcv_wscale: u8,
}
pub(crate) const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub(crate) const TCPI_OPT_SACK: u8 = 2;
pub(crate) const TCPI_OPT_WSCALE: u8 = 4;

pub(crate) fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    // SAFETY: a byte buffer is valid for any bit pattern; the kernel writes at
    // most its length.
    let (buf, len) = unsafe { getsockopt::<[u8; 256]>(fd, libc::SOL_TCP, libc::TCP_INFO) }
        .map_err(named("TCP_INFO"))?;
    if len < 8 {
        return Err(io::Error::other("TCP_INFO: short answer from the kernel"));
    }
    // Byte 6 holds two 4-bit fields; on the little- and big-endian ABIs Linux
    // supports with GCC, the first declared (snd_wscale) is the low nibble on
    // little-endian.
    #[cfg(target_endian = "little")]
    let (snd, rcv) = (buf[6] & 0xf, buf[6] >> 4);
    #[cfg(target_endian = "big")]
    let (snd, rcv) = (buf[6] >> 4, buf[6] & 0xf);
    Ok(TcpInfo {
        state: buf[0],
        options: buf[5],
        snd_wscale: snd,
        rcv_wscale: rcv,
    })
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong, what: &'static str) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int to the pointer, which is valid.
    syscall!(ioctl(fd.as_raw_fd(), req as _, &mut v as *mut libc::c_int)).map_err(named(what))?;
    Ok(v as u32)
}

/// Bytes in the send queue, sent and unsent (our FIN counts one).
pub(crate) fn outq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    ioctl_int(fd, SIOCOUTQ, "SIOCOUTQ")
}
/// Bytes in the send queue not yet sent (our FIN counts one).
pub(crate) fn outq_unsent(fd: BorrowedFd<'_>) -> io::Result<u32> {
    ioctl_int(fd, SIOCOUTQNSD, "SIOCOUTQNSD")
}
/// Bytes in the receive queue (the peer's FIN excluded).
pub(crate) fn inq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    ioctl_int(fd, SIOCINQ, "SIOCINQ")
}

/// A new fd for the network namespace of a socket.
pub(crate) fn socket_netns(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd.
    let ns = syscall!(ioctl(fd.as_raw_fd(), SIOCGSKNS as _)).map_err(named("SIOCGSKNS"))?;
    // SAFETY: the kernel just returned this fd to us; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(ns) })
}

/// `recv(len + 1, MSG_PEEK | MSG_DONTWAIT)` on the selected repair queue.
pub(crate) fn peek(fd: BorrowedFd<'_>, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len + 1];
    // SAFETY: `buf` is writable for `buf.len()` bytes.
    let n = syscall!(recv(
        fd.as_raw_fd(),
        buf.as_mut_ptr().cast(),
        buf.len(),
        libc::MSG_PEEK | libc::MSG_DONTWAIT
    ));
    let n = match n {
        Ok(n) => n as usize,
        Err(e) if len == 0 && e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(named("recv(MSG_PEEK)")(e)),
    };
    buf.truncate(n);
    Ok(buf)
}

/// One `send(MSG_DONTWAIT | MSG_NOSIGNAL)`; returns the bytes taken.
pub(crate) fn send_some(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is readable for `data.len()` bytes.
    syscall!(send(
        fd.as_raw_fd(),
        data.as_ptr().cast(),
        data.len(),
        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL
    ))
    .map(|n| n as usize)
}

pub(crate) fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain call on an open fd.
    syscall!(shutdown(fd.as_raw_fd(), libc::SHUT_WR))
        .map(drop)
        .map_err(named("shutdown"))
}

/// A new TCP socket of the family of `addr`, close-on-exec.
pub(crate) fn tcp_socket(ipv6: bool) -> io::Result<OwnedFd> {
    let fam = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    sock::socket(fam, libc::SOCK_STREAM, 0).map_err(named("socket"))
}

pub(crate) fn bind(fd: BorrowedFd<'_>, a: SocketAddr) -> io::Result<()> {
    sock::bind(fd, a).map_err(named("bind"))
}

pub(crate) fn connect(fd: BorrowedFd<'_>, a: SocketAddr) -> io::Result<()> {
    sock::connect(fd, a).map_err(named("connect"))
}

/// `connect(AF_UNSPEC)`: disconnects the socket. In repair mode the kernel's
/// `tcp_disconnect` sends neither FIN nor RST.
pub(crate) fn disconnect(fd: BorrowedFd<'_>) -> io::Result<()> {
    sock::disconnect(fd).map_err(named("connect(AF_UNSPEC)"))
}

pub(crate) fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    sock::local_addr(fd).map_err(named("getsockname"))
}
pub(crate) fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    sock::peer_addr(fd).map_err(named("getpeername"))
}

/// A string socket option (TCP_CONGESTION).
pub(crate) fn get_string(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<String> {
    // SAFETY: a byte buffer is valid for any bit pattern.
    let (buf, len) = unsafe { getsockopt::<[u8; 64]>(fd, level, name) }?;
    let s = &buf[..len.min(64)];
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    Ok(String::from_utf8_lossy(&s[..end]).into_owned())
}

pub(crate) fn set_string(fd: BorrowedFd<'_>, level: i32, name: i32, v: &str) -> io::Result<()> {
    // SAFETY: the kernel reads `v.len()` bytes from the pointer.
    syscall!(setsockopt(
        fd.as_raw_fd(),
        level,
        name,
        v.as_ptr().cast(),
        v.len() as libc::socklen_t
    ))
    .map(drop)
}

pub(crate) fn linger(fd: BorrowedFd<'_>) -> io::Result<libc::linger> {
    // SAFETY: SO_LINGER writes a struct linger, plain data.
    unsafe { getsockopt::<libc::linger>(fd, libc::SOL_SOCKET, libc::SO_LINGER) }.map(|(v, _)| v)
}

pub(crate) fn set_linger(fd: BorrowedFd<'_>, secs: i32) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: secs,
    };
    // SAFETY: SO_LINGER reads a struct linger.
    unsafe { setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &l) }
}

/// `pidfd_open(pid)`.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_getfd(pidfd, fd)`: a duplicate of another process's fd.
pub(crate) fn pidfd_getfd(pidfd: BorrowedFd<'_>, target: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd from the kernel, close-on-exec per pidfd_getfd(2).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Makes `cmd` enter the network namespace `ns` in the child before exec.
pub(crate) fn command_in_netns(cmd: &mut std::process::Command, ns: &OwnedFd) {
    use std::os::unix::process::CommandExt;
    let raw = ns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setns(2), which is async-signal-safe; `raw` stays open in the parent for
    // as long as the Command is alive (the caller holds `ns`).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(raw, libc::CLONE_NEWNET) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Device and inode of an fd (to tell namespaces apart).
pub(crate) fn fd_identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: plain data, all-zero is valid.
    let mut st: libc::stat = unsafe { zeroed() };
    // SAFETY: `st` is writable.
    syscall!(fstat(fd.as_raw_fd(), &mut st)).map_err(named("fstat"))?;
    Ok((st.st_dev, st.st_ino))
}

/// The socket's type, domain and protocol (SO_TYPE, SO_DOMAIN, SO_PROTOCOL),
/// to word the refusal of a socket that is not TCP.
pub(crate) fn socket_kind(fd: BorrowedFd<'_>) -> io::Result<(i32, i32, i32)> {
    Ok((
        get_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)?,
        get_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?,
        socket_protocol(fd)?,
    ))
}

/// The socket's protocol (SO_PROTOCOL): `IPPROTO_TCP`, or `IPPROTO_MPTCP`
/// for an MPTCP socket, which also answers `SOL_TCP` options.
pub(crate) fn socket_protocol(fd: BorrowedFd<'_>) -> io::Result<i32> {
    get_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)
}

/// The sizes of a socket's two buffers, as the kernel holds them (twice
/// what `setsockopt` was given: socket(7)).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BufferSizes {
    pub(crate) rcvbuf: u32,
    pub(crate) sndbuf: u32,
}

/// `SO_BUF_LOCK` (asm-generic/socket.h, Linux 5.14+; the libc crate lacks
/// it): which of the two buffer sizes were set (`SOCK_SNDBUF_LOCK` 1,
/// `SOCK_RCVBUF_LOCK` 2), and so are no longer autotuned. Setting it sets
/// or clears those two bits.
pub(crate) const SO_BUF_LOCK: i32 = 72;

/// `SO_MEMINFO` (asm-generic/socket.h; the libc crate lacks it on x86_64).
const SO_MEMINFO: i32 = 55;
/// `SO_MEMINFO` entries up to `SK_MEMINFO_SNDBUF`; the kernel copies at
/// most the length asked for (`sk_getsockopt` trims to it).
const MEMINFO_LEN: usize = libc::SK_MEMINFO_SNDBUF as usize + 1;

/// Both buffer sizes in one call (`SO_MEMINFO`, Linux 4.6+: `sk_rcvbuf` and
/// `sk_sndbuf`, the values `SO_RCVBUF` and `SO_SNDBUF` report), or with
/// those two where `SO_MEMINFO` is refused.
pub(crate) fn buffer_sizes(fd: BorrowedFd<'_>) -> io::Result<BufferSizes> {
    // SAFETY: SO_MEMINFO writes u32 entries, at most as many bytes as asked;
    // a u32 array is valid for any bit pattern.
    match unsafe { getsockopt::<[u32; MEMINFO_LEN]>(fd, libc::SOL_SOCKET, SO_MEMINFO) } {
        Ok((info, len)) if len == size_of::<[u32; MEMINFO_LEN]>() => Ok(BufferSizes {
            rcvbuf: info[libc::SK_MEMINFO_RCVBUF as usize],
            sndbuf: info[libc::SK_MEMINFO_SNDBUF as usize],
        }),
        _ => Ok(BufferSizes {
            rcvbuf: get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).map_err(named("SO_RCVBUF"))?
                as u32,
            sndbuf: get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).map_err(named("SO_SNDBUF"))?
                as u32,
        }),
    }
}

// ---- cli additions ----

/// Whether the socket is in repair mode. `do_tcp_getsockopt` answers
/// `TCP_REPAIR` with `tp->repair` for anyone holding the socket: no
/// capability is checked on reads.
pub(crate) fn repair_mode(fd: BorrowedFd<'_>) -> io::Result<bool> {
    get_int(fd, libc::SOL_TCP, TCP_REPAIR)
        .map(|mode| mode != REPAIR_OFF)
        .map_err(named("read TCP_REPAIR"))
}

// ---- restore additions ----

/// Sends one raw IP packet (its IP header included: `IPPROTO_RAW` implies
/// `IP_HDRINCL` / `IPV6_HDRINCL`) to `dst`, from a socket carrying
/// `SO_MARK` `mark`, so that policy routing can pick its route.
pub(crate) fn send_raw_ip_marked(
    packet: &[u8],
    dst: std::net::IpAddr,
    mark: u32,
) -> io::Result<()> {
    let fam = if dst.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    let raw =
        sock::socket(fam, libc::SOCK_RAW, libc::IPPROTO_RAW).map_err(named("socket(SOCK_RAW)"))?;
    set_int(raw.as_fd(), libc::SOL_SOCKET, libc::SO_MARK, mark as i32).map_err(named("SO_MARK"))?;
    let (ss, len) = to_sockaddr(SocketAddr::new(dst, 0));
    // SAFETY: `packet` is readable; `ss` holds a valid sockaddr of `len` bytes.
    syscall!(sendto(
        raw.as_raw_fd(),
        packet.as_ptr().cast(),
        packet.len(),
        0,
        (&ss as *const libc::sockaddr_storage).cast(),
        len
    ))
    .map_err(named("sendto(raw)"))?;
    Ok(())
}

/// Waits until `fd` is writable (`POLLOUT`) or `timeout` passes; returns
/// whether it is writable. An error condition on the socket counts as
/// writable: the next `send` reports it.
pub(crate) fn wait_writable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let n = match syscall!(poll(&mut p, 1, ms)) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
        Err(e) => return Err(named("poll")(e)),
    };
    Ok(n > 0)
}
