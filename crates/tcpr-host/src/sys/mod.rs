//! The syscall layer of the host crate: the only module with `unsafe`
//! (with its `fd` part, fd passing, and its public `sock` part, the generic
//! socket calls the engine shares). As in the engine's, a `syscall!`
//! helper turns `-1` into `io::Error`, every error carries the name of the
//! call, and everything above is safe.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Calls a libc function and turns a `-1` return into the thread's errno.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: each call site documents why its arguments are valid.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 { Err(io::Error::last_os_error()) } else { Ok(res) }
    }};
}

pub mod bpf;
pub(crate) mod detach;
mod fd;
pub mod sock;
pub(crate) mod splice;
pub use fd::{
    memfd_with, pass_socket, recv_with_fd, recv_with_fds, send_with_fd, send_with_fds, SCM_MAX_FD,
};
pub(crate) use sock::{
    bind, connect, disconnect, get_int, local_addr, named, netlink_socket, peer_addr, raw_os_error,
    recv_into, send_all, set_int, set_recv_timeout, socket, to_sockaddr,
};

/// Reads a socket option into a plain byte buffer; returns the length the
/// kernel wrote.
pub(crate) fn get_bytes(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes; the kernel writes at most
    // that many and reports how many in `len`.
    syscall!(getsockopt(
        fd.as_raw_fd(),
        level,
        name,
        buf.as_mut_ptr().cast(),
        &mut len
    ))?;
    Ok(len as usize)
}

/// Writes a socket option from a plain byte buffer.
pub(crate) fn set_bytes(fd: BorrowedFd<'_>, level: i32, name: i32, val: &[u8]) -> io::Result<()> {
    // SAFETY: `val` is readable for its length during the call.
    syscall!(setsockopt(
        fd.as_raw_fd(),
        level,
        name,
        val.as_ptr().cast(),
        val.len() as libc::socklen_t
    ))
    .map(drop)
}

/// One ioctl that writes an int.
pub(crate) fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the requests passed here (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD)
    // write one int to the pointer, which is valid and writable.
    syscall!(ioctl(fd.as_raw_fd(), req as _, &mut v as *mut libc::c_int))?;
    Ok(v)
}

/// The index of interface `name`.
pub(crate) fn if_index(name: &str) -> io::Result<u32> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name contains NUL"))?;
    // SAFETY: `cname` is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if i == 0 {
        return Err(named("if_nametoindex")(io::Error::last_os_error()));
    }
    Ok(i)
}

/// The name of interface `index`.
pub(crate) fn if_name(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname(3) requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(named("if_indextoname")(io::Error::last_os_error()));
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// The Ethernet address of `ifname` (SIOCGIFHWADDR).
pub(crate) fn hw_addr(ifname: &str) -> io::Result<[u8; 6]> {
    let s = socket(libc::AF_INET, libc::SOCK_DGRAM, 0).map_err(named("socket"))?;
    // SAFETY: plain data, all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { zeroed() };
    for (d, b) in ifr
        .ifr_name
        .iter_mut()
        .zip(ifname.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = b as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name from and writes the address into `ifr`.
    syscall!(ioctl(
        s.as_raw_fd(),
        libc::SIOCGIFHWADDR as _,
        &mut ifr as *mut libc::ifreq
    ))
    .map_err(named("SIOCGIFHWADDR"))?;
    // SAFETY: after SIOCGIFHWADDR the union holds a sockaddr in ifru_hwaddr.
    let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    Ok(std::array::from_fn(|i| hw.sa_data[i] as u8))
}

/// A packet socket to send link-layer frames on ([`send_link_frame`]), in
/// the calling thread's network namespace. Of protocol 0, it receives
/// nothing (packet(7)); each frame names its ethertype. Its close waits
/// for an RCU grace period: hand it to [`close_off_path`].
pub(crate) fn link_socket() -> io::Result<std::os::fd::OwnedFd> {
    socket(libc::AF_PACKET, libc::SOCK_RAW, 0).map_err(named("socket(AF_PACKET)"))
}

/// Sends one link-layer frame (with its Ethernet header) of `ethertype`
/// out of interface `ifindex` on `s`, a [`link_socket`].
pub(crate) fn send_link_frame(
    s: BorrowedFd<'_>,
    ifindex: u32,
    ethertype: u16,
    dst_mac: [u8; 6],
    frame: &[u8],
) -> io::Result<()> {
    // SAFETY: plain data, all-zero is valid.
    let mut ll: libc::sockaddr_ll = unsafe { zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = ethertype.to_be();
    ll.sll_ifindex = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index too large"))?;
    ll.sll_halen = dst_mac.len() as u8;
    ll.sll_addr[..dst_mac.len()].copy_from_slice(&dst_mac);
    // SAFETY: `frame` is readable; `ll` is a valid sockaddr_ll of the given size.
    syscall!(sendto(
        s.as_raw_fd(),
        frame.as_ptr().cast(),
        frame.len(),
        0,
        (&ll as *const libc::sockaddr_ll).cast(),
        size_of::<libc::sockaddr_ll>() as libc::socklen_t
    ))
    .map_err(named("sendto(AF_PACKET)"))?;
    Ok(())
}

/// Closes `fd` on the process's closer thread, started at the first call,
/// for a socket whose close waits: a packet socket's for an RCU grace
/// period (synchronize_net in packet_release), about 10 ms. A thread
/// spawned per close cost the caller (an agent taking over an address,
/// within the moved connections' pause) a clone and a stack of its own. Sockets queued behind one whose close is waiting are closed
/// together, each on a scoped thread, so that their grace periods overlap
/// as they did with a thread each. Where no thread can be started, the
/// caller closes it (and waits).
pub(crate) fn close_off_path(fd: std::os::fd::OwnedFd) {
    use std::sync::mpsc;
    static CLOSER: std::sync::OnceLock<Option<mpsc::Sender<std::os::fd::OwnedFd>>> =
        std::sync::OnceLock::new();
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<std::os::fd::OwnedFd>();
        std::thread::Builder::new()
            .name("tcpr-closer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let more: Vec<_> = rx.try_iter().collect();
                    if more.is_empty() {
                        drop(first);
                        continue;
                    }
                    std::thread::scope(|s| {
                        for fd in std::iter::once(first).chain(more) {
                            // Where no thread starts, the failed spawn drops
                            // its closure: the closer closes it itself.
                            let _ = std::thread::Builder::new().spawn_scoped(s, move || drop(fd));
                        }
                    });
                }
            })
            .ok()
            .map(|_| tx)
    });
    match closer {
        Some(tx) => {
            if let Err(mpsc::SendError(fd)) = tx.send(fd) {
                drop(fd);
            }
        }
        None => drop(fd),
    }
}

/// Sends one ICMPv6 message from `src` to the link-scope multicast group
/// `dst` out of interface `ifindex`, with hop limit 255 as neighbour
/// discovery requires (RFC 4861 §7.1.2). The kernel computes the checksum
/// of ICMPv6 raw sockets (RFC 3542 §3.1).
pub(crate) fn send_icmpv6_multicast(
    ifindex: u32,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    msg: &[u8],
) -> io::Result<()> {
    const ND_HOP_LIMIT: i32 = 255;
    let s = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)
        .map_err(named("socket(ICMPv6)"))?;
    let ifindex_int = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index too large"))?;
    set_int(
        s.as_fd(),
        libc::SOL_IPV6,
        libc::IPV6_MULTICAST_HOPS,
        ND_HOP_LIMIT,
    )
    .map_err(named("IPV6_MULTICAST_HOPS"))?;
    set_int(
        s.as_fd(),
        libc::SOL_IPV6,
        libc::IPV6_MULTICAST_IF,
        ifindex_int,
    )
    .map_err(named("IPV6_MULTICAST_IF"))?;
    bind(s.as_fd(), SocketAddr::V6(SocketAddrV6::new(src, 0, 0, 0))).map_err(named("bind"))?;
    let (ss, len) = to_sockaddr(SocketAddr::V6(SocketAddrV6::new(dst, 0, 0, ifindex)));
    // SAFETY: `msg` is readable; `ss` holds a valid sockaddr of `len` bytes.
    syscall!(sendto(
        s.as_raw_fd(),
        msg.as_ptr().cast(),
        msg.len(),
        0,
        (&ss as *const libc::sockaddr_storage).cast(),
        len
    ))
    .map_err(named("sendto(ICMPv6)"))?;
    Ok(())
}

/// Moves the calling thread into the network namespace at `path` (such as
/// `/run/netns/NAME` or `/proc/PID/ns/net`). Sockets the thread creates
/// afterwards belong to that namespace.
pub fn enter_netns(path: &str) -> io::Result<()> {
    let ns = std::fs::File::open(path).map_err(named("open the network namespace"))?;
    THREAD_NETNS.set(None);
    syscall!(setns(ns.as_raw_fd(), libc::CLONE_NEWNET))
        .map(drop)
        .map_err(named("setns"))
}

/// Moves the calling thread into a new network namespace (with `lo` down).
pub fn unshare_netns() -> io::Result<()> {
    THREAD_NETNS.set(None);
    syscall!(unshare(libc::CLONE_NEWNET))
        .map(drop)
        .map_err(named("unshare(CLONE_NEWNET)"))
}

thread_local! {
    /// The calling thread's network namespace, once read.
    static THREAD_NETNS: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// Device and inode of the calling thread's network namespace (of
/// `/proc/thread-self/ns/net`), which tell namespaces apart. Read once per
/// thread and remembered: the `statx` of a `/proc` path cost ~2% of a busy
/// front's CPU, called per handoff. A thread changes its namespace in this
/// project only through [`enter_netns`] and [`unshare_netns`], which
/// forget it; code that calls `setns` itself must not use this.
pub fn thread_netns() -> io::Result<(u64, u64)> {
    if let Some(id) = THREAD_NETNS.get() {
        return Ok(id);
    }
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(named("stat /proc/thread-self/ns/net"))?;
    let id = (m.dev(), m.ino());
    THREAD_NETNS.set(Some(id));
    Ok(id)
}

/// Raises RLIMIT_NOFILE to at least `want` (raising the hard limit too when
/// privileged, up to fs.nr_open); returns the new soft limit.
pub fn raise_fd_limit(want: u64) -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is writable.
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut r)).map_err(named("getrlimit"))?;
    if r.rlim_max < want {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(r.rlim_max);
        let raised = libc::rlimit {
            rlim_cur: want.min(nr_open),
            rlim_max: want.min(nr_open),
        };
        // SAFETY: `raised` is a valid rlimit.
        if syscall!(setrlimit(libc::RLIMIT_NOFILE, &raised)).is_ok() {
            return Ok(raised.rlim_cur);
        }
    }
    r.rlim_cur = r.rlim_max;
    // SAFETY: `r` is a valid rlimit.
    syscall!(setrlimit(libc::RLIMIT_NOFILE, &r)).map_err(named("setrlimit"))?;
    Ok(r.rlim_cur)
}

/// How [`flock`] locks a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flock {
    /// Shared with other holders of `Shared`; waits for an exclusive one.
    Shared,
    /// Alone; waits for every other holder.
    Exclusive,
    /// Alone, or not at all: answers `false` at once when another holds
    /// it (a shared lock of the caller's is converted).
    ExclusiveNow,
}

/// `flock(2)` on `fd`; `false` only for [`Flock::ExclusiveNow`] when
/// another holds the lock. A lock lasts until every descriptor of that
/// open file is closed (or the process ends, however it ends). Written
/// here rather than with `File::lock` (Rust 1.89, above this project's
/// minimum).
pub fn flock(fd: BorrowedFd<'_>, how: Flock) -> io::Result<bool> {
    let op = match how {
        Flock::Shared => libc::LOCK_SH,
        Flock::Exclusive => libc::LOCK_EX,
        Flock::ExclusiveNow => libc::LOCK_EX | libc::LOCK_NB,
    };
    loop {
        // SAFETY: plain syscall on a descriptor borrowed for the call.
        if unsafe { libc::flock(fd.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock if how == Flock::ExclusiveNow => return Ok(false),
            _ => return Err(e),
        }
    }
}
