//! The socket options an image carries, read from the socket itself or,
//! for a connection accepted from a listener read once, partly from that
//! listener.

use crate::sys;
use crate::Error;
use std::os::fd::BorrowedFd;
use tcpr_image::SocketOptions;

/// Reads the socket options tcpr carries. An option the kernel will not
/// answer is left out (restored as the default).
pub(crate) fn read(fd: BorrowedFd<'_>, ipv6: bool) -> SocketOptions {
    with_inherited(&inherited(fd), per_connection(fd, ipv6))
}

/// The options an accepted connection starts with as its listener's
/// (`sk_clone_lock` copies them) and that report what was set, not a
/// sysctl's value of the moment; the others left out.
fn inherited(fd: BorrowedFd<'_>) -> SocketOptions {
    SocketOptions {
        nodelay: bool_opt(fd, libc::SOL_TCP, libc::TCP_NODELAY),
        keepalive: bool_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        user_timeout_ms: u32_opt(fd, libc::SOL_TCP, libc::TCP_USER_TIMEOUT),
        notsent_lowat: u32_opt(fd, libc::SOL_TCP, libc::TCP_NOTSENT_LOWAT),
        linger_secs: sys::linger(fd)
            .ok()
            .filter(|l| l.l_onoff != 0)
            .map(|l| l.l_linger as u32),
        buf_lock: u32_opt(fd, libc::SOL_SOCKET, sys::SO_BUF_LOCK),
        ..SocketOptions::default()
    }
}

/// `own` with the [`inherited`] options of `from`.
fn with_inherited(from: &SocketOptions, own: SocketOptions) -> SocketOptions {
    SocketOptions {
        nodelay: from.nodelay,
        keepalive: from.keepalive,
        user_timeout_ms: from.user_timeout_ms,
        notsent_lowat: from.notsent_lowat,
        linger_secs: from.linger_secs,
        buf_lock: from.buf_lock,
        ..own
    }
}

/// The options that can differ between two connections of one listener,
/// the rest left out:
/// - the buffer sizes: the kernel sizes each connection's at accept, and
///   autotunes them;
/// - TOS (traffic class) and SO_MARK: `tcp_reflect_tos` and
///   `tcp_fwmark_accept` take them from the client's SYN;
/// - the priority: a connection does not start with its listener's (here
///   one accepted under a listener at priority 5 had 0);
/// - the TTL (hop limit) and the keepalive time, interval and count: one
///   never set reports the route's or the namespace's sysctl as it is now;
/// - the congestion control: chosen at accept, by the route's `congctl` or
///   the namespace's default of that moment.
fn per_connection(fd: BorrowedFd<'_>, ipv6: bool) -> SocketOptions {
    let (tos, ttl) = if ipv6 {
        (
            u32_opt(fd, libc::SOL_IPV6, libc::IPV6_TCLASS),
            u32_opt(fd, libc::SOL_IPV6, libc::IPV6_UNICAST_HOPS),
        )
    } else {
        (
            u32_opt(fd, libc::SOL_IP, libc::IP_TOS),
            u32_opt(fd, libc::SOL_IP, libc::IP_TTL),
        )
    };
    let buffers = sys::buffer_sizes(fd).ok();
    SocketOptions {
        keepalive_idle_secs: u32_opt(fd, libc::SOL_TCP, libc::TCP_KEEPIDLE),
        keepalive_interval_secs: u32_opt(fd, libc::SOL_TCP, libc::TCP_KEEPINTVL),
        keepalive_count: u32_opt(fd, libc::SOL_TCP, libc::TCP_KEEPCNT),
        congestion: sys::get_string(fd, libc::SOL_TCP, libc::TCP_CONGESTION).ok(),
        // The kernel reports twice what was set (socket(7)); store what to set.
        rcvbuf: buffers.map(|b| b.rcvbuf / 2),
        sndbuf: buffers.map(|b| b.sndbuf / 2),
        mark: u32_opt(fd, libc::SOL_SOCKET, libc::SO_MARK),
        priority: u32_opt(fd, libc::SOL_SOCKET, libc::SO_PRIORITY),
        tos,
        ttl,
        ..SocketOptions::default()
    }
}

fn u32_opt(fd: BorrowedFd<'_>, level: i32, name: i32) -> Option<u32> {
    sys::get_int(fd, level, name).ok().map(|v| v as u32)
}

fn bool_opt(fd: BorrowedFd<'_>, level: i32, name: i32) -> Option<bool> {
    sys::get_int(fd, level, name).ok().map(|v| v != 0)
}

/// The socket options a TCP listener's connections start with, read once
/// ([`ListenerOptions::read`]). The kernel copies a listening socket into
/// each connection it accepts (`sk_clone_lock`), options included, so for
/// a connection whose options nothing changed since its accept,
/// [`Frozen::dump_accepted`](crate::Frozen::dump_accepted) takes six of
/// them from here (`TCP_NODELAY`, `SO_KEEPALIVE`, `TCP_USER_TIMEOUT`,
/// `TCP_NOTSENT_LOWAT`, `SO_LINGER`, `SO_BUF_LOCK`) and reads only those
/// that can differ per connection: six `getsockopt` calls fewer per dump,
/// for a server that dumps every connection it accepts.
///
/// "Nothing changed" includes the application after the accept and a BPF
/// `sock_ops` program that sets options on new connections.
#[derive(Clone, Debug)]
pub struct ListenerOptions {
    /// The inherited options; the others left out.
    inherited: SocketOptions,
}

impl ListenerOptions {
    /// Reads the options of `listener`, a listening TCP socket. Read them
    /// again after changing any of the listener's options.
    pub fn read(listener: BorrowedFd<'_>) -> Result<ListenerOptions, Error> {
        let proto = crate::protocol(listener)?;
        let listening = sys::get_int(listener, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
            .map_err(|e| Error::kernel("read SO_ACCEPTCONN", e))?;
        if proto != libc::IPPROTO_TCP || listening == 0 {
            return Err(Error::NotTcp(
                "the socket is not a listening TCP socket".into(),
            ));
        }
        Ok(ListenerOptions {
            inherited: inherited(listener),
        })
    }

    /// The options of `fd`, a connection accepted from this listener.
    pub(crate) fn of_accepted(&self, fd: BorrowedFd<'_>, ipv6: bool) -> SocketOptions {
        with_inherited(&self.inherited, per_connection(fd, ipv6))
    }
}
