//! Socket options across a move, read back with `getsockopt` on the
//! restored socket: every non-default option kept, every default left a
//! default (so it keeps following the namespace's sysctl, as on the
//! original), in each network namespace by its own defaults.
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use tcpr_engine::{freeze, restore, FreezeOptions};

fn no_lock() -> FreezeOptions {
    FreezeOptions {
        lock: false,
        ..Default::default()
    }
}

/// The options the engine carries, as `getsockopt` reports them.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Reported {
    nodelay: i32,
    keepalive: i32,
    keepidle: i32,
    keepintvl: i32,
    keepcnt: i32,
    user_timeout: i32,
    notsent_lowat: i32,
    mark: i32,
    priority: i32,
    tos: i32,
    ttl: i32,
    linger: Option<i32>,
    congestion: String,
    rcvbuf: i32,
    sndbuf: i32,
    /// `None` where the kernel has no SO_BUF_LOCK (before 5.14).
    buf_lock: Option<i32>,
}

/// `SO_BUF_LOCK` (asm-generic/socket.h, Linux 5.14+): which buffer sizes
/// were set, and so are not autotuned (1: send, 2: receive).
const SO_BUF_LOCK: i32 = 72;

fn get_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> i32 {
    try_get_int(fd, level, name)
        .unwrap_or_else(|| panic!("getsockopt {level}/{name}: unknown to this kernel"))
}

/// An int option, or `None` where the kernel does not know it.
fn try_get_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> Option<i32> {
    let mut v: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: test helper; `v` and `len` are valid for writes during the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut i32).cast(),
            &mut len,
        )
    };
    let e = std::io::Error::last_os_error();
    match r {
        0 => Some(v),
        _ if e.raw_os_error() == Some(libc::ENOPROTOOPT) => None,
        _ => panic!("getsockopt {level}/{name}: {e}"),
    }
}

fn set_bytes(fd: BorrowedFd<'_>, level: i32, name: i32, v: &[u8]) {
    // SAFETY: test helper; `v` is readable for its length during the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            v.as_ptr().cast(),
            v.len() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt {level}/{name}: {}",
        std::io::Error::last_os_error()
    );
}

fn set_int(fd: BorrowedFd<'_>, level: i32, name: i32, v: i32) {
    set_bytes(fd, level, name, &v.to_ne_bytes());
}

fn congestion(fd: BorrowedFd<'_>) -> String {
    let mut buf = [0u8; 16];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: test helper; `buf` and `len` are valid for writes during the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_CONGESTION,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "getsockopt TCP_CONGESTION");
    let s = &buf[..len as usize];
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..end]).into_owned()
}

fn linger(fd: BorrowedFd<'_>) -> Option<i32> {
    let mut l = libc::linger {
        l_onoff: 0,
        l_linger: 0,
    };
    let mut len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
    // SAFETY: test helper; `l` and `len` are valid for writes during the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&mut l as *mut libc::linger).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "getsockopt SO_LINGER");
    (l.l_onoff != 0).then_some(l.l_linger)
}

fn set_linger(fd: BorrowedFd<'_>, secs: i32) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: secs,
    };
    // SAFETY: a struct linger is plain data; its bytes are what SO_LINGER reads.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&l as *const libc::linger).cast::<u8>(),
            std::mem::size_of::<libc::linger>(),
        )
    };
    set_bytes(fd, libc::SOL_SOCKET, libc::SO_LINGER, bytes);
}

fn tos_ttl(v6: bool) -> [(i32, i32); 2] {
    if v6 {
        [
            (libc::SOL_IPV6, libc::IPV6_TCLASS),
            (libc::SOL_IPV6, libc::IPV6_UNICAST_HOPS),
        ]
    } else {
        [(libc::SOL_IP, libc::IP_TOS), (libc::SOL_IP, libc::IP_TTL)]
    }
}

fn reported(s: &TcpStream) -> Reported {
    let fd = s.as_fd();
    let v6 = s.local_addr().unwrap().is_ipv6();
    let [tos, ttl] = tos_ttl(v6);
    let tcp = |name| get_int(fd, libc::SOL_TCP, name);
    let sock = |name| get_int(fd, libc::SOL_SOCKET, name);
    Reported {
        nodelay: tcp(libc::TCP_NODELAY),
        keepalive: sock(libc::SO_KEEPALIVE),
        keepidle: tcp(libc::TCP_KEEPIDLE),
        keepintvl: tcp(libc::TCP_KEEPINTVL),
        keepcnt: tcp(libc::TCP_KEEPCNT),
        user_timeout: tcp(libc::TCP_USER_TIMEOUT),
        notsent_lowat: tcp(libc::TCP_NOTSENT_LOWAT),
        mark: sock(libc::SO_MARK),
        priority: sock(libc::SO_PRIORITY),
        tos: get_int(fd, tos.0, tos.1),
        ttl: get_int(fd, ttl.0, ttl.1),
        linger: linger(fd),
        congestion: congestion(fd),
        rcvbuf: sock(libc::SO_RCVBUF),
        sndbuf: sock(libc::SO_SNDBUF),
        buf_lock: try_get_int(fd, libc::SOL_SOCKET, SO_BUF_LOCK),
    }
}

/// Moves the server end to a new socket (freeze, dump, discard, restore,
/// resume) and checks that the pair still carries a byte each way.
fn move_server(client: &mut TcpStream, server: TcpStream) -> TcpStream {
    let mut moved = moved(server);
    moved.write_all(b"s").unwrap();
    let mut b = [0u8; 1];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"s");
    client.write_all(b"c").unwrap();
    moved.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"c");
    moved
}

/// `sock` moved to a new socket: frozen, dumped, discarded, restored and
/// resumed.
fn moved(sock: TcpStream) -> TcpStream {
    let frozen = freeze(sock.into(), &no_lock()).unwrap();
    let img = frozen.dump().unwrap();
    frozen.discard().unwrap();
    restore(&img).unwrap().resume().unwrap()
}

/// A congestion control algorithm other than `now` that this kernel has.
fn other_congestion(now: &str) -> String {
    let all = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .expect("read the available congestion controls");
    all.split_whitespace()
        .find(|cc| *cc != now)
        .unwrap_or_else(|| panic!("only {now:?} is available: no other to set"))
        .to_string()
}

/// Writes a sysctl of the calling thread's network namespace.
fn sysctl(path: &str, value: &str) {
    std::fs::write(path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
}

const KEEPALIVE_TIME: &str = "/proc/sys/net/ipv4/tcp_keepalive_time";

fn non_default_options_kept(addr: &str) {
    let (mut client, server) = pair(addr);
    let v6 = server.local_addr().unwrap().is_ipv6();
    let fresh = reported(&server);
    let fd = server.as_fd();
    set_all(fd, v6, &fresh);
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 200_000);
    set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 300_000);
    let before = reported(&server);
    // Every option differs from a new socket's, so each one is tested.
    let differing = [
        before.nodelay != fresh.nodelay,
        before.keepalive != fresh.keepalive,
        before.keepidle != fresh.keepidle,
        before.keepintvl != fresh.keepintvl,
        before.keepcnt != fresh.keepcnt,
        before.user_timeout != fresh.user_timeout,
        before.notsent_lowat != fresh.notsent_lowat,
        before.mark != fresh.mark,
        before.priority != fresh.priority,
        before.tos != fresh.tos,
        before.ttl != fresh.ttl,
        before.linger != fresh.linger,
        before.congestion != fresh.congestion,
        before.rcvbuf != fresh.rcvbuf,
        before.sndbuf != fresh.sndbuf,
        fresh.buf_lock.is_none() || before.buf_lock != fresh.buf_lock,
    ];
    assert!(
        differing.iter().all(|&d| d),
        "{before:?} vs a new socket's {fresh:?}"
    );
    let moved = move_server(&mut client, server);
    assert_eq!(reported(&moved), before, "{addr}");
}

/// Every option that the original left at its default is left at the
/// default on the restored socket too: it reports the same values, and
/// the ones that come from a sysctl keep following it.
fn defaults_kept(addr: &str) {
    let (mut client, server) = pair(addr);
    let before = reported(&server);
    let mut moved = move_server(&mut client, server);
    let after = reported(&moved);
    // The send buffer is carried at the size the kernel had grown it to.
    assert_eq!(
        Reported {
            sndbuf: before.sndbuf,
            ..after.clone()
        },
        before,
        "{addr}"
    );
    assert!(after.sndbuf >= before.sndbuf, "{addr}: {after:?}");
    let keepidle = before.keepidle + 11;
    sysctl(KEEPALIVE_TIME, &keepidle.to_string());
    assert_eq!(
        get_int(moved.as_fd(), libc::SOL_TCP, libc::TCP_KEEPIDLE),
        keepidle,
        "{addr}: the restored socket's keepalive time no longer follows the namespace's default"
    );
    sysctl(KEEPALIVE_TIME, &before.keepidle.to_string());
    moved.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    client.read_exact(&mut b).unwrap();
}

#[test]
fn non_default_options_survive_a_move() {
    in_private_netns(|| {
        non_default_options_kept("127.0.0.1:0");
        non_default_options_kept("[::1]:0");
    });
}

#[test]
fn default_options_stay_defaults() {
    in_private_netns(|| {
        defaults_kept("127.0.0.1:0");
        defaults_kept("[::1]:0");
    });
}

/// Each namespace has its own defaults: an option held at one
/// namespace's default is set where the default differs, right after a
/// restore in the first namespace.
#[test]
fn defaults_are_those_of_the_restoring_namespace() {
    let first = std::thread::spawn(|| {
        private_netns();
        let (mut client, server) = pair("127.0.0.1:0");
        let keepidle = reported(&server).keepidle;
        move_server(&mut client, server);
        keepidle
    });
    let first_default = first.join().unwrap();
    in_private_netns(move || {
        sysctl(KEEPALIVE_TIME, &(first_default / 2).to_string());
        let (mut client, server) = pair("127.0.0.1:0");
        set_int(
            server.as_fd(),
            libc::SOL_TCP,
            libc::TCP_KEEPIDLE,
            first_default,
        );
        let moved = move_server(&mut client, server);
        assert_eq!(
            get_int(moved.as_fd(), libc::SOL_TCP, libc::TCP_KEEPIDLE),
            first_default
        );
    });
}

/// A socket of `(domain, type, protocol)`, or `None` where this kernel
/// does not build one (MPTCP turned off, say).
fn socket_of(domain: i32, ty: i32, protocol: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
    // SAFETY: a fresh fd from the kernel, owned from here.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// The check that a socket is TCP reads SO_PROTOCOL and TCP_INFO only:
/// every other socket, also those whose protocol number is TCP's (a raw
/// socket, netlink's NETLINK_XFRM) or that answer TCP options (MPTCP), is
/// refused as not TCP, and a TCP socket in a state with no connection as
/// unsupported.
#[test]
fn only_connected_tcp_sockets_pass_inspection() {
    in_private_netns(|| {
        let mptcp = 262;
        let kinds = [
            (libc::AF_INET, libc::SOCK_DGRAM, 0),
            (libc::AF_INET6, libc::SOCK_DGRAM, 0),
            (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP),
            (libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_TCP),
            (libc::AF_UNIX, libc::SOCK_STREAM, 0),
            (libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_XFRM),
            (libc::AF_INET, libc::SOCK_STREAM, mptcp),
        ];
        for (domain, ty, protocol) in kinds {
            let Some(sock) = socket_of(domain, ty, protocol) else {
                assert_eq!(
                    protocol, mptcp,
                    "cannot build socket {domain}/{ty}/{protocol}"
                );
                continue;
            };
            match tcpr_engine::inspect_socket(sock.as_fd()) {
                Err(tcpr_engine::Error::NotTcp(why)) => assert!(
                    why.contains("not a TCP socket"),
                    "{domain}/{ty}/{protocol}: {why}"
                ),
                other => panic!("{domain}/{ty}/{protocol}: {other:?}"),
            }
        }
        let (read_end, _write_end) = std::io::pipe().unwrap();
        assert!(matches!(
            tcpr_engine::inspect_socket(read_end.as_fd()),
            Err(tcpr_engine::Error::NotTcp(why)) if why.contains("not a socket")
        ));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(matches!(
            tcpr_engine::inspect_socket(listener.as_fd()),
            Err(tcpr_engine::Error::UnsupportedState { state: "LISTEN" })
        ));
        let (_client, server) = pair("[::1]:0");
        let (flow, _) = tcpr_engine::inspect_socket(server.as_fd()).unwrap();
        assert_eq!(flow.local, server.local_addr().unwrap());
    });
}

/// Sets every option the engine carries on `fd` to a value no new socket
/// has (`fresh` is a new socket's report).
fn set_all(fd: BorrowedFd<'_>, v6: bool, fresh: &Reported) {
    set_int(fd, libc::SOL_TCP, libc::TCP_NODELAY, 1);
    set_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set_int(fd, libc::SOL_TCP, libc::TCP_KEEPIDLE, 33);
    set_int(fd, libc::SOL_TCP, libc::TCP_KEEPINTVL, 7);
    set_int(fd, libc::SOL_TCP, libc::TCP_KEEPCNT, 4);
    set_int(fd, libc::SOL_TCP, libc::TCP_USER_TIMEOUT, 12_345);
    set_int(fd, libc::SOL_TCP, libc::TCP_NOTSENT_LOWAT, 65_536);
    set_int(fd, libc::SOL_SOCKET, libc::SO_MARK, 42);
    let [tos, ttl] = tos_ttl(v6);
    set_int(fd, tos.0, tos.1, 0x28);
    set_int(fd, ttl.0, ttl.1, 17);
    set_int(fd, libc::SOL_SOCKET, libc::SO_PRIORITY, 5);
    set_linger(fd, 3);
    let cc = other_congestion(&fresh.congestion);
    set_bytes(fd, libc::SOL_TCP, libc::TCP_CONGESTION, cc.as_bytes());
    // Sized, so no longer autotuned: SO_BUF_LOCK reports it.
    set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 300_000);
}

/// The socket options of `server` (accepted from `listener`) as a full
/// dump reads them and as `dump_accepted` does; both images also restore.
fn both_dumps(
    listener: &std::net::TcpListener,
    server: TcpStream,
) -> (tcpr_image::SocketOptions, tcpr_image::SocketOptions) {
    let from = tcpr_engine::ListenerOptions::read(listener.as_fd()).unwrap();
    let frozen = freeze(server.into(), &no_lock()).unwrap();
    let full = frozen.dump().unwrap();
    let accepted = frozen.dump_accepted(&from).unwrap();
    // The TCP timestamp is the connection's clock, read at each dump: a
    // millisecond may pass between the two (it did on a loaded CI).
    let ts_gap = accepted.timestamp.wrapping_sub(full.timestamp);
    assert!(
        ts_gap < 1000,
        "the timestamp went back or jumped: {ts_gap} ms"
    );
    assert_eq!(
        tcpr_image::ConnectionImage {
            socket_options: full.socket_options.clone(),
            dumped_at_unix_ns: full.dumped_at_unix_ns,
            timestamp: full.timestamp,
            ..accepted.clone()
        },
        full,
        "the images differ beyond their socket options"
    );
    frozen.thaw().unwrap();
    (full.socket_options, accepted.socket_options)
}

/// A connection accepted from a listener whose options were read once is
/// dumped with the same socket options as by a full read: with the
/// defaults, with every option set on the listener (the kernel copies
/// them into the connection), and where the connection's own differ from
/// the listener's without anyone setting them: the TOS reflected from the
/// client's SYN (`tcp_reflect_tos`), a congestion control and keepalive
/// settings whose defaults changed after the listener was read.
#[test]
fn an_accepted_connection_dumps_as_a_full_read_does() {
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let v6 = addr.starts_with('[');
            // Defaults.
            let l = std::net::TcpListener::bind(addr).unwrap();
            let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            let fresh = reported(&s);
            let (full, accepted) = both_dumps(&l, s);
            assert_eq!(accepted, full, "{addr}, defaults");
            // Every option set on the listener.
            set_all(l.as_fd(), v6, &fresh);
            let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            let set = reported(&s);
            assert_ne!(set.keepidle, fresh.keepidle, "{addr}: not inherited");
            let (full, accepted) = both_dumps(&l, s);
            assert_eq!(accepted, full, "{addr}, options set on the listener");
            assert_eq!(full.keepalive_idle_secs, Some(33), "{addr}");
            assert_eq!(full.linger_secs, Some(3), "{addr}");
            let want = set.buf_lock.map(|_| tcpr_image::BUF_LOCK_SEND);
            assert_eq!(full.buf_lock, want, "{addr}");
        }
        // Per connection: the client's TOS reflected, a new default
        // congestion control.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let from = tcpr_engine::ListenerOptions::read(l.as_fd()).unwrap();
        let (_c0, s0) = (
            TcpStream::connect(l.local_addr().unwrap()).unwrap(),
            l.accept().unwrap().0,
        );
        let was = reported(&s0);
        sysctl("/proc/sys/net/ipv4/tcp_reflect_tos", "1");
        sysctl(KEEPALIVE_TIME, &(was.keepidle + 11).to_string());
        sysctl(
            "/proc/sys/net/ipv4/tcp_keepalive_intvl",
            &(was.keepintvl + 3).to_string(),
        );
        sysctl(
            "/proc/sys/net/ipv4/tcp_keepalive_probes",
            &(was.keepcnt + 2).to_string(),
        );
        sysctl(
            "/proc/sys/net/ipv4/tcp_congestion_control",
            &other_congestion(&was.congestion),
        );
        let _client = connect_with_tos(l.local_addr().unwrap(), 0x48);
        let (s, _) = l.accept().unwrap();
        let now = reported(&s);
        assert_ne!(now.tos, was.tos, "the SYN's TOS was not reflected");
        assert_ne!(now.congestion, was.congestion, "the new default not taken");
        assert_eq!(
            (now.keepidle, now.keepintvl, now.keepcnt),
            (was.keepidle + 11, was.keepintvl + 3, was.keepcnt + 2),
            "the keepalive settings follow the sysctls"
        );
        let frozen = freeze(s.into(), &no_lock()).unwrap();
        let (full, accepted) = (frozen.dump().unwrap(), frozen.dump_accepted(&from).unwrap());
        assert_eq!(accepted.socket_options, full.socket_options);
        assert_eq!(accepted.socket_options.tos, Some(now.tos as u32));
        frozen.thaw().unwrap();
        drop(s0);
    });
}

/// A connection to `to` (IPv4) whose SYN carries `tos`.
fn connect_with_tos(to: std::net::SocketAddr, tos: i32) -> TcpStream {
    let std::net::SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let sock = socket_of(libc::AF_INET, libc::SOCK_STREAM, 0).expect("a TCP socket");
    set_int(sock.as_fd(), libc::SOL_IP, libc::IP_TOS, tos);
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: test helper; `sin` is a valid sockaddr_in for the call.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
    TcpStream::from(sock)
}

/// Only a listening TCP socket's options are read as a listener's.
#[test]
fn listener_options_refuse_what_is_not_a_tcp_listener() {
    in_private_netns(|| {
        let (_client, server) = pair("127.0.0.1:0");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (read_end, _write_end) = std::io::pipe().unwrap();
        let cases = [
            (server.as_fd(), "not a listening TCP socket"),
            (udp.as_fd(), "not a listening TCP socket"),
            (read_end.as_fd(), "not a socket"),
        ];
        for (fd, why) in cases {
            match tcpr_engine::ListenerOptions::read(fd) {
                Err(tcpr_engine::Error::NotTcp(said)) => assert!(said.contains(why), "{said}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    });
}

const WMEM: &str = "/proc/sys/net/ipv4/tcp_wmem";

/// A buffer the application never sized is autotuned by the kernel; one
/// it sized is fixed. A restore sizes both buffers (to fit the queues and
/// carry the size the original had reached), which fixes them, then puts
/// the original's lock back: here with both buffers autotuned, with only
/// the send buffer sized, and with only the receive buffer sized, each
/// with a receive queue to restore.
fn buffer_locks_kept(addr: &str) {
    for (what, lock) in [("none set", 0), ("send set", 1), ("receive set", 2)] {
        let (mut client, server) = pair(addr);
        if lock & 1 != 0 {
            set_int(server.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, 150_000);
        }
        if lock & 2 != 0 {
            set_int(server.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 150_000);
        }
        client.write_all(&[7u8; 3000]).unwrap();
        wait_queued(&server, 3000);
        let before = reported(&server);
        // Before Linux 5.14 there is no lock to read or carry.
        let lock = before.buf_lock.map(|_| lock);
        assert_eq!(before.buf_lock, lock, "{addr}, {what}: the original's lock");
        let mut moved = moved(server);
        let after = reported(&moved);
        assert_eq!(after.buf_lock, lock, "{addr}, {what}: {after:?}");
        let mut queued = [0u8; 3000];
        moved.read_exact(&mut queued).unwrap();
        assert!(queued.iter().all(|&b| b == 7), "{addr}, {what}");
    }
}

/// Waits until `sock`'s receive queue holds `len` bytes.
fn wait_queued(sock: &TcpStream, len: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int to `n`, valid for the call.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        if n == len {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} of {len} bytes queued"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The send buffer of a moved connection whose application never sized it
/// keeps growing with the transfer, as the original's would: a restored
/// socket used to keep the size it was restored with, which bounds a
/// download to that size per round trip (128 KiB per 20 ms is 6.5 MB/s).
fn moved_send_buffer_autotunes(addr: &str) {
    let (client, server) = pair(addr);
    let moved = move_server(&mut client.try_clone().unwrap(), server);
    let restored_size = get_int(moved.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF);
    let reader = std::thread::spawn(move || {
        let mut client = client;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            match client.read(&mut buf).unwrap() {
                0 => return total,
                n => total += n,
            }
        }
    });
    let mut moved = moved;
    let chunk = vec![1u8; 1 << 20];
    for _ in 0..256 {
        moved.write_all(&chunk).unwrap();
    }
    let grown = get_int(moved.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF);
    moved.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reader.join().unwrap(), 256 << 20, "{addr}");
    if try_get_int(moved.as_fd(), libc::SOL_SOCKET, SO_BUF_LOCK).is_none() {
        // Before Linux 5.14 a sized buffer cannot be unlocked: it stays.
        assert_eq!(grown, restored_size, "{addr}");
        return;
    }
    assert!(
        grown > restored_size,
        "{addr}: the moved socket's send buffer stayed at {restored_size} bytes \
         through 256 MiB (now {grown}): not autotuned"
    );
}

#[test]
fn buffer_locks_survive_a_move_and_autotuning_goes_on() {
    in_private_netns(|| {
        // Room above the size a loopback connection starts with (about
        // 4 MB), so that autotuning can show.
        sysctl(WMEM, "4096 16384 33554432");
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            buffer_locks_kept(addr);
            moved_send_buffer_autotunes(addr);
        }
    });
}
