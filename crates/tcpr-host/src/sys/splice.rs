//! splice(2) and the pipe it moves bytes through: the zero-copy relay's
//! syscalls (`crate::relay`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::sock::named;

/// A pipe: bytes spliced into `write` are read by splicing from `read`.
#[derive(Debug)]
pub(crate) struct Pipe {
    pub(crate) read: OwnedFd,
    pub(crate) write: OwnedFd,
}

/// A new pipe, close-on-exec and non-blocking on both ends.
pub(crate) fn pipe() -> io::Result<Pipe> {
    let mut fds: [libc::c_int; 2] = [-1, -1];
    // SAFETY: `fds` is writable for the two ints pipe2(2) writes.
    syscall!(pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK))
        .map_err(named("pipe2"))?;
    // SAFETY: on success both fds are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok(Pipe { read, write })
}

/// `splice(from, NULL, to, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)`:
/// moves up to `len` bytes without copying them through userspace. No
/// SPLICE_F_MORE: into a socket it is MSG_MORE, which holds the last
/// partial segment of a reply back (about 200 ms per direction of every
/// request/response exchange) waiting for data a relay cannot promise. One of the two fds must be a pipe (splice(2)); `Ok(0)` is
/// the end of the input. The non-blocking flag covers the pipe; a socket
/// follows its own O_NONBLOCK (tcp_splice_read reads the file's flags).
pub(crate) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: both fds are open for the call (borrowed); null offsets make
    // the kernel use (and advance) the files' own positions, which splice(2)
    // requires for pipes and sockets; no memory of ours is passed.
    syscall!(splice(
        from.as_raw_fd(),
        std::ptr::null_mut(),
        to.as_raw_fd(),
        std::ptr::null_mut(),
        len,
        flags
    ))
    .map(|n| n as usize)
}

/// `F_SETPIPE_SZ`: asks for a pipe of `bytes` (rounded up to pages by the
/// kernel, capped by `fs.pipe-max-size` for the unprivileged); returns the
/// size granted.
pub(crate) fn set_pipe_size(pipe: BorrowedFd<'_>, bytes: usize) -> io::Result<usize> {
    let want = libc::c_int::try_from(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pipe size too large"))?;
    // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours.
    syscall!(fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, want))
        .map(|n| n as usize)
        .map_err(named("F_SETPIPE_SZ"))
}

/// poll(2) over `fds` for at most `timeout_ms` (-1: no limit); returns how
/// many have events. EINTR is returned as is.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, writable array of `fds.len()` pollfd
    // structs for the duration of the call.
    syscall!(poll(
        fds.as_mut_ptr(),
        fds.len() as libc::nfds_t,
        timeout_ms
    ))
    .map(|n| n as usize)
}

/// `SO_LINGER {on, 0}`: the socket's close sends a RST instead of a FIN
/// (socket(7)), so a peer of a relay learns that the other side failed
/// rather than reading a clean end of stream.
pub(crate) fn reset_on_close(sock: BorrowedFd<'_>) -> io::Result<()> {
    let reset = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `reset` is a valid struct linger, readable for its size
    // during the call, and that size is the length passed.
    syscall!(setsockopt(
        sock.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        (&reset as *const libc::linger).cast(),
        std::mem::size_of::<libc::linger>() as libc::socklen_t
    ))
    .map(drop)
    .map_err(named("SO_LINGER"))
}
