//! Generic socket syscalls, shared by this crate and `tcpr-engine` (whose
//! `sys` layer keeps only what is TCP-repair specific). Every function is
//! safe; every error keeps its kind and raw OS error, and those made by
//! [`named`] also carry the name of the call (read the errno back with
//! [`raw_os_error`]).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Adds the name of the failing operation to an error, keeping its kind
/// (and its raw OS error reachable through [`raw_os_error`]).
pub fn named(what: &'static str) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), Named { what, source: e })
}

/// An `io::Error` payload naming the call that failed.
#[derive(Debug)]
struct Named {
    what: &'static str,
    source: io::Error,
}
impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}
impl std::error::Error for Named {}

/// The raw OS error of an error made by [`named`] or directly by the OS.
pub fn raw_os_error(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Named>())
            .and_then(|n| n.source.raw_os_error())
    })
}

/// Makes the socket's close send a RST instead of a FIN (`SO_LINGER`
/// on, 0 s): an abort, as a relay does to the side that did not fail, or
/// a client that gives up.
pub fn reset_on_close(fd: BorrowedFd<'_>) -> io::Result<()> {
    super::splice::reset_on_close(fd)
}

/// Writes an `int` socket option.
pub fn set_int(fd: BorrowedFd<'_>, level: i32, name: i32, val: i32) -> io::Result<()> {
    // SAFETY: `val` is a C int readable for `size_of::<i32>()` bytes during
    // the call, and that is the length passed: the kernel reads no more.
    syscall!(setsockopt(
        fd.as_raw_fd(),
        level,
        name,
        (&val as *const i32).cast(),
        size_of::<i32>() as libc::socklen_t
    ))
    .map(drop)
}

/// Reads an `int` socket option.
pub fn get_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut val: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: `val` is writable for `len` bytes, `len` is a valid pointer;
    // the kernel writes at most `len` bytes.
    syscall!(getsockopt(
        fd.as_raw_fd(),
        level,
        name,
        (&mut val as *mut i32).cast(),
        &mut len
    ))?;
    Ok(val)
}

/// The user id of the process at the other end of a unix socket, as the
/// kernel recorded it when the connection was made (`SO_PEERCRED`).
pub fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: plain data, all-zero is valid.
    let mut cred: libc::ucred = unsafe { zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is writable for `len` bytes, `len` is a valid
    // pointer; the kernel writes at most `len` bytes.
    syscall!(getsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_PEERCRED,
        (&mut cred as *mut libc::ucred).cast(),
        &mut len
    ))
    .map_err(named("getsockopt SO_PEERCRED"))?;
    Ok(cred.uid)
}

/// A new socket, close-on-exec.
pub fn socket(domain: i32, ty: i32, proto: i32) -> io::Result<OwnedFd> {
    let fd = syscall!(socket(domain, ty | libc::SOCK_CLOEXEC, proto))?;
    // SAFETY: socket(2) just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A sockaddr big enough for IPv4 and IPv6, and its length.
pub fn to_sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as _,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as _,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// The IPv4 or IPv6 address held in `ss`; an error for any other family.
pub fn from_sockaddr(ss: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        f => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not an IP socket (address family {f})"),
        )),
    }
}

/// `bind(2)` to `a`.
pub fn bind(fd: BorrowedFd<'_>, a: SocketAddr) -> io::Result<()> {
    let (ss, len) = to_sockaddr(a);
    // SAFETY: `ss` holds a valid sockaddr of `len` bytes.
    syscall!(bind(
        fd.as_raw_fd(),
        (&ss as *const libc::sockaddr_storage).cast(),
        len
    ))
    .map(drop)
}

/// A TCP listener on `a` that other processes of the same user may bind
/// too (`SO_REUSEPORT`: the kernel spreads new connections over the
/// group's listeners), with `SO_REUSEADDR` as `TcpListener::bind` sets it
/// and the kernel's largest backlog (`somaxconn` caps it). What lets a
/// new server start beside the one it replaces, so that no connection
/// finds the port closed between them.
pub fn listen_shared(a: SocketAddr) -> io::Result<std::net::TcpListener> {
    let fd = bind_shared(a)?;
    // SAFETY: plain syscall on a descriptor we own.
    syscall!(listen(fd.as_raw_fd(), libc::SOMAXCONN))?;
    Ok(std::net::TcpListener::from(fd))
}

/// Stops a listening socket from listening (`shutdown(SHUT_RD)` on a
/// listener: it leaves its `SO_REUSEPORT` group, and a thread blocked in
/// its `accept` wakes with an error); the descriptor stays open.
pub fn stop_listening(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed descriptor.
    syscall!(shutdown(fd.as_raw_fd(), libc::SHUT_RD)).map(drop)
}

/// A TCP socket bound to `a` as [`listen_shared`] binds it, not listening
/// (so it takes no connection): whether a shared listener could be opened
/// there now (it fails where another socket holds the address without
/// `SO_REUSEPORT`, or another user's does).
pub fn bind_shared(a: SocketAddr) -> io::Result<OwnedFd> {
    let domain = if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = socket(domain, libc::SOCK_STREAM, 0)?;
    set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    bind(fd.as_fd(), a)?;
    Ok(fd)
}

/// `connect(2)` to `a`.
pub fn connect(fd: BorrowedFd<'_>, a: SocketAddr) -> io::Result<()> {
    let (ss, len) = to_sockaddr(a);
    // SAFETY: `ss` holds a valid sockaddr of `len` bytes.
    syscall!(connect(
        fd.as_raw_fd(),
        (&ss as *const libc::sockaddr_storage).cast(),
        len
    ))
    .map(drop)
}

/// `connect(AF_UNSPEC)`: in repair mode the kernel's `tcp_disconnect` sends
/// neither FIN nor RST.
pub fn disconnect(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: sockaddr is plain data; all-zero with AF_UNSPEC is valid.
    let mut sa: libc::sockaddr = unsafe { zeroed() };
    sa.sa_family = libc::AF_UNSPEC as _;
    // SAFETY: `sa` is a valid sockaddr for the length passed.
    syscall!(connect(
        fd.as_raw_fd(),
        &sa,
        size_of::<libc::sockaddr>() as libc::socklen_t
    ))
    .map(drop)
}

/// The local (`peer == false`) or peer address of a socket.
fn socket_name(fd: BorrowedFd<'_>, peer: bool) -> io::Result<SocketAddr> {
    // SAFETY: plain data, all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast();
    if peer {
        // SAFETY: `p` is writable for `len` bytes.
        syscall!(getpeername(fd.as_raw_fd(), p, &mut len))?;
    } else {
        // SAFETY: `p` is writable for `len` bytes.
        syscall!(getsockname(fd.as_raw_fd(), p, &mut len))?;
    }
    from_sockaddr(&ss)
}

/// The local address of a socket (`getsockname(2)`).
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    socket_name(fd, false)
}

/// The peer address of a socket (`getpeername(2)`).
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    socket_name(fd, true)
}

/// A netlink socket of `proto`, close-on-exec.
pub fn netlink_socket(proto: i32) -> io::Result<OwnedFd> {
    socket(libc::AF_NETLINK, libc::SOCK_DGRAM, proto).map_err(named("socket(AF_NETLINK)"))
}

/// Sets `SO_RCVTIMEO`.
pub fn set_recv_timeout(fd: BorrowedFd<'_>, t: Duration) -> io::Result<()> {
    set_timeval(fd, libc::SO_RCVTIMEO, t).map_err(named("setsockopt SO_RCVTIMEO"))
}

/// Sets `SO_SNDTIMEO`, which also bounds a blocking `connect` (socket(7);
/// one that runs out fails with `EINPROGRESS`).
pub fn set_send_timeout(fd: BorrowedFd<'_>, t: Duration) -> io::Result<()> {
    set_timeval(fd, libc::SO_SNDTIMEO, t).map_err(named("setsockopt SO_SNDTIMEO"))
}

fn set_timeval(fd: BorrowedFd<'_>, name: i32, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval for the duration of the call.
    syscall!(setsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        name,
        (&tv as *const libc::timeval).cast(),
        size_of::<libc::timeval>() as libc::socklen_t
    ))
    .map(drop)
}

/// `send` of a whole datagram.
pub fn send_all(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    // SAFETY: `data` is readable for its length.
    syscall!(send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0)).map_err(named("send"))?;
    Ok(())
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)`: what `buf` can hold of the queued
/// bytes, left queued, whatever the socket's own O_NONBLOCK; `Ok(0)` at
/// end of stream, `WouldBlock` when nothing is queued.
pub fn peek_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    syscall!(recv(
        fd.as_raw_fd(),
        buf.as_mut_ptr().cast(),
        buf.len(),
        libc::MSG_PEEK | libc::MSG_DONTWAIT
    ))
    .map(|n| n as usize)
}

/// One `recv` into `buf`.
pub fn recv_into(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    syscall!(recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0))
        .map(|n| n as usize)
        .map_err(named("recv"))
}

/// A netlink socket of `proto` in the network namespace `ns` (the
/// caller's own when `None`): a socket belongs to the namespace it was
/// created in, so it is created on a short-lived thread that entered `ns`.
pub fn netlink_socket_in(ns: Option<BorrowedFd<'_>>, proto: i32) -> io::Result<OwnedFd> {
    let Some(ns) = ns else {
        return netlink_socket(proto);
    };
    let raw = ns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: `raw` is an open namespace fd borrowed for this scope;
            // setns only changes this (throwaway) thread.
            syscall!(setns(raw, libc::CLONE_NEWNET)).map_err(named("setns"))?;
            netlink_socket(proto)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netlink thread panicked")))
    })
}

/// `SO_NETNS_COOKIE` (`asm-generic/socket.h`, Linux 5.14): a u64 naming the
/// socket's network namespace, unique for the boot.
const SO_NETNS_COOKIE: i32 = 71;

/// The cookie of a socket's network namespace (any socket, netlink ones
/// too): one `getsockopt`, where `SIOCGSKNS` would open an fd.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is writable for `len` bytes and `len` is a valid
    // pointer; the kernel writes a u64 (`sock_gen_cookie` of the namespace).
    syscall!(getsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        SO_NETNS_COOKIE,
        (&mut cookie as *mut u64).cast(),
        &mut len
    ))
    .map_err(named("read SO_NETNS_COOKIE"))?;
    Ok(cookie)
}

/// Waits, without limit, until one of `fds` has something to read (or
/// its end, or an error: a read will not block); says which. poll(2),
/// its EINTR waited out.
pub fn wait_readable(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<bool>> {
    wait_readable_for(fds, None)
}

/// [`wait_readable`] for at most `limit` (`None`: without limit); all
/// false when it passed with nothing to read. (An EINTR starts the wait
/// again: it may last a little longer than `limit`.)
pub fn wait_readable_for(
    fds: &[BorrowedFd<'_>],
    limit: Option<std::time::Duration>,
) -> io::Result<Vec<bool>> {
    let timeout = limit.map_or(-1, |d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX));
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        match super::splice::poll(&mut polled, timeout) {
            Ok(_) => return Ok(polled.iter().map(|p| p.revents != 0).collect()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(named("poll")(e)),
        }
    }
}
