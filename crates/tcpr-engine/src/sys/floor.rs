//! The floor for benchmarks: the dump and restore syscall sequences of an
//! idle connection written as bare `libc` calls, with no checks, no image
//! and no lock. `tcpr bench` compares the engine against this.

use std::mem::{size_of, zeroed};

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// What the floor's dump reads.
#[derive(Clone, Copy, Debug)]
pub struct FloorState {
    local: SocketAddr,
    peer: SocketAddr,
    recv_seq: u32,
    send_seq: u32,
    mss: i32,
    timestamp: u32,
    window: [u32; 5],
    wscale: u32,
}

fn floor_get(fd: RawFd, level: i32, name: i32) -> i32 {
    let mut v: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for the call.
    unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut i32).cast(), &mut len) };
    v
}

fn floor_set(fd: RawFd, level: i32, name: i32, v: i32) {
    // SAFETY: `v` is a valid int for the call.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
}

/// Dumps an idle connection with bare syscalls and disconnects it silently.
pub fn dump(fd: RawFd) -> FloorState {
    use super::{
        from_sockaddr, Queue, REPAIR_ON, SIOCOUTQNSD, TCP_QUEUE_SEQ, TCP_REPAIR, TCP_REPAIR_QUEUE,
        TCP_REPAIR_WINDOW, TCP_TIMESTAMP,
    };
    floor_set(fd, libc::SOL_TCP, TCP_REPAIR, REPAIR_ON);
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let mut q: i32 = 0;
    for req in [libc::TIOCOUTQ, SIOCOUTQNSD, libc::FIONREAD] {
        // SAFETY: the ioctl writes one int.
        unsafe { libc::ioctl(fd, req as _, &mut q as *mut i32) };
    }
    let mut peekbuf = [0u8; 1];
    floor_set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, Queue::Recv as i32);
    let recv_seq = floor_get(fd, libc::SOL_TCP, TCP_QUEUE_SEQ) as u32;
    // SAFETY: `peekbuf` is writable for one byte.
    unsafe {
        libc::recv(
            fd,
            peekbuf.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    floor_set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, Queue::Send as i32);
    let send_seq = floor_get(fd, libc::SOL_TCP, TCP_QUEUE_SEQ) as u32;
    // SAFETY: `peekbuf` is writable for one byte.
    unsafe {
        libc::recv(
            fd,
            peekbuf.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    floor_set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, Queue::No as i32);
    let mss = floor_get(fd, libc::SOL_TCP, libc::TCP_MAXSEG);
    let timestamp = floor_get(fd, libc::SOL_TCP, TCP_TIMESTAMP) as u32;
    let mut window = [0u32; 5];
    let mut wlen = size_of::<[u32; 5]>() as libc::socklen_t;
    // SAFETY: `window` is writable for 20 bytes.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_TCP,
            TCP_REPAIR_WINDOW,
            window.as_mut_ptr().cast(),
            &mut wlen,
        )
    };
    // SAFETY: plain data.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut sl = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` is writable for `sl` bytes.
    unsafe { libc::getsockname(fd, (&mut ss as *mut libc::sockaddr_storage).cast(), &mut sl) };
    let local = from_sockaddr(&ss).expect("an IP socket");
    let mut sl = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` is writable for `sl` bytes.
    unsafe { libc::getpeername(fd, (&mut ss as *mut libc::sockaddr_storage).cast(), &mut sl) };
    let peer = from_sockaddr(&ss).expect("an IP socket");
    // SAFETY: plain data; AF_UNSPEC disconnects (silently in repair mode).
    let mut sa: libc::sockaddr = unsafe { zeroed() };
    sa.sa_family = libc::AF_UNSPEC as _;
    // SAFETY: `sa` is a valid sockaddr.
    unsafe { libc::connect(fd, &sa, size_of::<libc::sockaddr>() as libc::socklen_t) };
    FloorState {
        local,
        peer,
        recv_seq,
        send_seq,
        mss,
        timestamp,
        window,
        wscale: u32::from(info[6] & 0xf) | u32::from(info[6] >> 4) << 16,
    }
}

/// Restores and resumes an idle connection with bare syscalls.
pub fn restore(st: &FloorState) -> OwnedFd {
    use super::{
        to_sockaddr, Queue, RepairOpt, REPAIR_OFF, REPAIR_ON, TCP_QUEUE_SEQ, TCP_REPAIR,
        TCP_REPAIR_OPTIONS, TCP_REPAIR_QUEUE, TCP_REPAIR_WINDOW, TCP_TIMESTAMP,
    };
    let fam = if st.local.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain call.
    let fd = unsafe { libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    floor_set(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1);
    floor_set(fd, libc::SOL_TCP, TCP_REPAIR, REPAIR_ON);
    floor_set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, Queue::Recv as i32);
    floor_set(fd, libc::SOL_TCP, TCP_QUEUE_SEQ, st.recv_seq as i32);
    floor_set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, Queue::Send as i32);
    floor_set(fd, libc::SOL_TCP, TCP_QUEUE_SEQ, st.send_seq as i32);
    let (ss, len) = to_sockaddr(st.local);
    // SAFETY: valid sockaddr.
    unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
    let (ss, len) = to_sockaddr(st.peer);
    // SAFETY: valid sockaddr.
    unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
    floor_set(fd, libc::SOL_TCP, TCP_TIMESTAMP, st.timestamp as i32);
    let opts = [
        RepairOpt {
            code: 2,
            val: st.mss as u32,
        },
        RepairOpt {
            code: 3,
            val: st.wscale,
        },
        RepairOpt { code: 4, val: 0 },
        RepairOpt { code: 8, val: 0 },
    ];
    // SAFETY: `opts` is readable for its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            TCP_REPAIR_OPTIONS,
            opts.as_ptr().cast(),
            std::mem::size_of_val(&opts) as libc::socklen_t,
        )
    };
    floor_set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, Queue::No as i32);
    // SAFETY: `window` is readable for 20 bytes.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            TCP_REPAIR_WINDOW,
            st.window.as_ptr().cast(),
            20,
        )
    };
    floor_set(fd, libc::SOL_TCP, TCP_REPAIR, REPAIR_OFF);
    owned
}
