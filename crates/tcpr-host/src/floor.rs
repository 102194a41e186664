//! The floor for benchmarks: the dump and restore syscall sequences of an
//! idle connection with nothing else, no image, no lock and no state
//! checks. `tcpr bench` compares the engine against this. Every call is
//! still checked: a failure is an error naming the step, never a panic.
//!
//! Two floors: the *minimal* one makes only the repair calls (what a
//! connection needs to come back at all, as CRIU's libsoccr does); the
//! *complete* one ([`dump_with_options`]) also reads every socket option
//! tcpr's image keeps and sets them all again on restore, as bare calls:
//! the same job as the engine's, with nothing saved by being clever.

use crate::sys;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// `TCP_REPAIR` modes (linux/tcp.h).
const REPAIR_ON: i32 = 1;
const REPAIR_OFF: i32 = 0;
/// `TCP_REPAIR_QUEUE` values (linux/tcp.h).
const QUEUE_NONE: i32 = 0;
const QUEUE_RECV: i32 = 1;
const QUEUE_SEND: i32 = 2;
/// `TCP_REPAIR_OPTIONS` codes (the TCP option kinds, linux/tcp.h).
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
/// `SIOCOUTQNSD` (linux/sockios.h): unsent bytes of the send queue.
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
/// `struct tcp_info` bytes the floor reads: byte 6 holds both window scales.
const TCP_INFO_LEN: usize = 8;
const TCP_INFO_WSCALE_BYTE: usize = 6;
/// `struct tcp_repair_window`: five u32.
const REPAIR_WINDOW_LEN: usize = 20;

/// What the floor's dump reads.
#[derive(Clone, Copy, Debug)]
pub struct FloorState {
    local: SocketAddr,
    peer: SocketAddr,
    recv_seq: u32,
    send_seq: u32,
    mss: i32,
    timestamp: u32,
    window: [u8; REPAIR_WINDOW_LEN],
    /// `snd_wscale | rcv_wscale << 16`, as TCP_REPAIR_OPTIONS takes it.
    wscale: u32,
    /// The socket options, for the complete floor.
    options: Option<FloorOptions>,
}

/// `SO_MEMINFO` (asm-generic/socket.h; the libc crate lacks it on x86_64)
/// and the entries of its answer the floor uses (linux/sock_diag.h).
const SO_MEMINFO: i32 = 55;
const SK_MEMINFO_LEN: usize = 9;
const SK_MEMINFO_RCVBUF: usize = 1;
const SK_MEMINFO_SNDBUF: usize = 3;
/// `TCP_CA_NAME_MAX` (net/tcp.h).
const CA_NAME_MAX: usize = 16;

/// The int options of the image (`tcpr_image::SocketOptions`), by level and
/// name; the last two are the IP-version ones, per family.
const INT_OPTIONS: [(i32, i32, &str); 9] = [
    (libc::SOL_TCP, libc::TCP_NODELAY, "TCP_NODELAY"),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE, "SO_KEEPALIVE"),
    (libc::SOL_TCP, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE"),
    (libc::SOL_TCP, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL"),
    (libc::SOL_TCP, libc::TCP_KEEPCNT, "TCP_KEEPCNT"),
    (libc::SOL_TCP, libc::TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT"),
    (libc::SOL_TCP, libc::TCP_NOTSENT_LOWAT, "TCP_NOTSENT_LOWAT"),
    (libc::SOL_SOCKET, libc::SO_MARK, "SO_MARK"),
    (libc::SOL_SOCKET, libc::SO_PRIORITY, "SO_PRIORITY"),
];

/// Traffic class and hop limit, per family.
fn ip_options(ipv6: bool) -> [(i32, i32, &'static str); 2] {
    if ipv6 {
        [
            (libc::SOL_IPV6, libc::IPV6_TCLASS, "IPV6_TCLASS"),
            (libc::SOL_IPV6, libc::IPV6_UNICAST_HOPS, "IPV6_UNICAST_HOPS"),
        ]
    } else {
        [
            (libc::SOL_IP, libc::IP_TOS, "IP_TOS"),
            (libc::SOL_IP, libc::IP_TTL, "IP_TTL"),
        ]
    }
}

/// What the complete floor reads besides the repair state: the same 14
/// option reads as the engine's dump.
#[derive(Clone, Copy, Debug)]
struct FloorOptions {
    ints: [i32; INT_OPTIONS.len() + 2],
    congestion: [u8; CA_NAME_MAX],
    congestion_len: usize,
    rcvbuf: u32,
    sndbuf: u32,
    linger: [u8; std::mem::size_of::<libc::linger>()],
}

fn read_options(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<FloorOptions> {
    let mut ints = [0; INT_OPTIONS.len() + 2];
    for (v, (level, name, what)) in ints
        .iter_mut()
        .zip(INT_OPTIONS.iter().chain(&ip_options(ipv6)))
    {
        *v = sys::get_int(fd, *level, *name).map_err(step(what))?;
    }
    let mut congestion = [0u8; CA_NAME_MAX];
    let congestion_len = sys::get_bytes(fd, libc::SOL_TCP, libc::TCP_CONGESTION, &mut congestion)
        .map_err(step("TCP_CONGESTION"))?;
    let mut mem = [0u8; SK_MEMINFO_LEN * 4];
    sys::get_bytes(fd, libc::SOL_SOCKET, SO_MEMINFO, &mut mem).map_err(step("SO_MEMINFO"))?;
    let entry =
        |i: usize| u32::from_ne_bytes([mem[4 * i], mem[4 * i + 1], mem[4 * i + 2], mem[4 * i + 3]]);
    let mut linger = [0u8; std::mem::size_of::<libc::linger>()];
    sys::get_bytes(fd, libc::SOL_SOCKET, libc::SO_LINGER, &mut linger)
        .map_err(step("SO_LINGER"))?;
    Ok(FloorOptions {
        ints,
        congestion,
        congestion_len: congestion_len.min(CA_NAME_MAX),
        // The kernel reports twice what was set (socket(7)).
        rcvbuf: entry(SK_MEMINFO_RCVBUF) / 2,
        sndbuf: entry(SK_MEMINFO_SNDBUF) / 2,
        linger,
    })
}

/// Sets every option read by [`read_options`]: 15 calls.
fn write_options(fd: BorrowedFd<'_>, o: &FloorOptions, ipv6: bool) -> io::Result<()> {
    for (v, (level, name, what)) in o
        .ints
        .iter()
        .zip(INT_OPTIONS.iter().chain(&ip_options(ipv6)))
    {
        sys::set_int(fd, *level, *name, *v).map_err(step(what))?;
    }
    let name = &o.congestion[..o.congestion_len];
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
    sys::set_bytes(fd, libc::SOL_TCP, libc::TCP_CONGESTION, name)
        .map_err(step("TCP_CONGESTION"))?;
    for (name, v, what) in [
        (libc::SO_RCVBUF, o.rcvbuf, "SO_RCVBUF"),
        (libc::SO_SNDBUF, o.sndbuf, "SO_SNDBUF"),
    ] {
        sys::set_int(fd, libc::SOL_SOCKET, name, v as i32).map_err(step(what))?;
    }
    sys::set_bytes(fd, libc::SOL_SOCKET, libc::SO_LINGER, &o.linger).map_err(step("SO_LINGER"))
}

/// The complete floor's dump: [`dump`] and a read of every socket option
/// the image keeps; [`restore`] then sets them all.
pub fn dump_with_options(fd: BorrowedFd<'_>) -> io::Result<FloorState> {
    dump_inner(fd, true)
}

fn step(what: &'static str) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("floor: {what}: {e}"))
}

fn set_tcp(fd: BorrowedFd<'_>, name: i32, v: i32, what: &'static str) -> io::Result<()> {
    sys::set_int(fd, libc::SOL_TCP, name, v).map_err(step(what))
}

fn get_tcp(fd: BorrowedFd<'_>, name: i32, what: &'static str) -> io::Result<i32> {
    sys::get_int(fd, libc::SOL_TCP, name).map_err(step(what))
}

/// Dumps an idle connection with bare syscalls and disconnects it silently.
/// On error the socket may be left in repair mode; it is the caller's.
pub fn dump(fd: BorrowedFd<'_>) -> io::Result<FloorState> {
    dump_inner(fd, false)
}

fn dump_inner(fd: BorrowedFd<'_>, with_options: bool) -> io::Result<FloorState> {
    // The addresses first: they tell a TCP socket from anything else before
    // repair mode is touched.
    let local = sys::local_addr(fd).map_err(step("getsockname"))?;
    let peer = sys::peer_addr(fd).map_err(step("getpeername"))?;
    let options = if with_options {
        Some(read_options(fd, local.is_ipv6())?)
    } else {
        None
    };
    set_tcp(fd, libc::TCP_REPAIR, REPAIR_ON, "TCP_REPAIR on")?;
    let mut info = [0u8; 256];
    let got =
        sys::get_bytes(fd, libc::SOL_TCP, libc::TCP_INFO, &mut info).map_err(step("TCP_INFO"))?;
    if got < TCP_INFO_LEN {
        return Err(step("TCP_INFO")(io::Error::other("short answer")));
    }
    // The engine reads the three queue sizes; so does the floor.
    for (req, what) in [
        (libc::TIOCOUTQ, "SIOCOUTQ"),
        (SIOCOUTQNSD, "SIOCOUTQNSD"),
        (libc::FIONREAD, "SIOCINQ"),
    ] {
        sys::ioctl_int(fd, req).map_err(step(what))?;
    }
    let recv_seq = queue_seq(fd, QUEUE_RECV)?;
    let send_seq = queue_seq(fd, QUEUE_SEND)?;
    set_tcp(fd, libc::TCP_REPAIR_QUEUE, QUEUE_NONE, "TCP_REPAIR_QUEUE")?;
    let mss = get_tcp(fd, libc::TCP_MAXSEG, "TCP_MAXSEG")?;
    let timestamp = get_tcp(fd, libc::TCP_TIMESTAMP, "TCP_TIMESTAMP")? as u32;
    let mut window = [0u8; REPAIR_WINDOW_LEN];
    let got = sys::get_bytes(fd, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, &mut window)
        .map_err(step("TCP_REPAIR_WINDOW"))?;
    if got != REPAIR_WINDOW_LEN {
        return Err(step("TCP_REPAIR_WINDOW")(io::Error::other("short answer")));
    }
    sys::disconnect(fd).map_err(step("connect(AF_UNSPEC)"))?;
    let scales = info[TCP_INFO_WSCALE_BYTE];
    Ok(FloorState {
        local,
        peer,
        recv_seq,
        send_seq,
        mss,
        timestamp,
        window,
        wscale: u32::from(scales & 0xf) | u32::from(scales >> 4) << 16,
        options,
    })
}

/// Selects a repair queue, reads its sequence number and peeks at it (the
/// engine peeks at every queue; an idle connection's are empty).
fn queue_seq(fd: BorrowedFd<'_>, queue: i32) -> io::Result<u32> {
    set_tcp(fd, libc::TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE")?;
    let seq = get_tcp(fd, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")? as u32;
    let mut one = [0u8; 1];
    match sys::sock::peek_now(fd, &mut one) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(step("recv(MSG_PEEK)")(e)),
    }
    Ok(seq)
}

/// Restores and resumes an idle connection with bare syscalls (and sets
/// its options, when [`dump_with_options`] read them).
pub fn restore(st: &FloorState) -> io::Result<OwnedFd> {
    let (family, transparent) = if st.local.is_ipv6() {
        (libc::AF_INET6, (libc::SOL_IPV6, libc::IPV6_TRANSPARENT))
    } else {
        (libc::AF_INET, (libc::SOL_IP, libc::IP_TRANSPARENT))
    };
    let sock = sys::socket(family, libc::SOCK_STREAM, 0).map_err(step("socket"))?;
    let fd = sock.as_fd();
    sys::set_int(fd, transparent.0, transparent.1, 1).map_err(step("IP_TRANSPARENT"))?;
    set_tcp(fd, libc::TCP_REPAIR, REPAIR_ON, "TCP_REPAIR on")?;
    set_tcp(fd, libc::TCP_REPAIR_QUEUE, QUEUE_RECV, "TCP_REPAIR_QUEUE")?;
    set_tcp(fd, libc::TCP_QUEUE_SEQ, st.recv_seq as i32, "TCP_QUEUE_SEQ")?;
    set_tcp(fd, libc::TCP_REPAIR_QUEUE, QUEUE_SEND, "TCP_REPAIR_QUEUE")?;
    set_tcp(fd, libc::TCP_QUEUE_SEQ, st.send_seq as i32, "TCP_QUEUE_SEQ")?;
    // The peer's MSS before connect, which sizes the segments (as tcpr's
    // restore does: after connect it would not count).
    if st.mss >= 88 {
        set_tcp(fd, libc::TCP_MAXSEG, st.mss.min(32767), "TCP_MAXSEG")?;
    }
    sys::bind(fd, st.local).map_err(step("bind"))?;
    sys::connect(fd, st.peer).map_err(step("connect"))?;
    set_tcp(
        fd,
        libc::TCP_TIMESTAMP,
        st.timestamp as i32,
        "TCP_TIMESTAMP",
    )?;
    // `struct tcp_repair_opt { u32 code; u32 val; }` pairs, native endian.
    let mut opts = Vec::with_capacity(4 * 8);
    for (code, val) in [
        (TCPOPT_MAXSEG, st.mss as u32),
        (TCPOPT_WINDOW, st.wscale),
        (TCPOPT_SACK_PERM, 0),
        (TCPOPT_TIMESTAMP, 0),
    ] {
        opts.extend_from_slice(&code.to_ne_bytes());
        opts.extend_from_slice(&val.to_ne_bytes());
    }
    sys::set_bytes(fd, libc::SOL_TCP, libc::TCP_REPAIR_OPTIONS, &opts)
        .map_err(step("TCP_REPAIR_OPTIONS"))?;
    set_tcp(fd, libc::TCP_REPAIR_QUEUE, QUEUE_NONE, "TCP_REPAIR_QUEUE")?;
    sys::set_bytes(fd, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, &st.window)
        .map_err(step("TCP_REPAIR_WINDOW"))?;
    if let Some(o) = &st.options {
        write_options(fd, o, st.local.is_ipv6())?;
    }
    set_tcp(fd, libc::TCP_REPAIR, REPAIR_OFF, "TCP_REPAIR off")?;
    Ok(sock)
}
