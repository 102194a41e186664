//! Queue data of a restored socket: sizing its buffers and filling its
//! queues, in repair mode (receive queue, sent data) and once live (the
//! unsent data), within what this process may set.

use crate::sys;
use crate::Error;
use std::os::fd::BorrowedFd;
use std::time::Instant;

const SO_SNDBUFFORCE: i32 = 32;
const SO_RCVBUFFORCE: i32 = 33;
/// Bounds of one `send` of queue data: a large one can fail with ENOMEM.
const MAX_CHUNK: usize = 256 * 1024;
const MIN_CHUNK: usize = 1024;
/// The smallest buffer the growth doubles from.
const MIN_BUFFER: usize = 64 * 1024;

/// Which socket buffer a queue is charged to.
#[derive(Clone, Copy, Debug)]
pub(super) enum Buf {
    Recv,
    Send,
}

/// The two options that size one buffer.
struct BufOptions {
    /// Any size; needs CAP_NET_ADMIN in the *initial* user namespace
    /// (`sock_setsockopt` checks `capable()`, not `ns_capable()`).
    force: i32,
    /// Up to net.core.rmem_max / wmem_max, for anyone.
    plain: i32,
}

impl Buf {
    fn options(self) -> BufOptions {
        match self {
            Buf::Recv => BufOptions {
                force: SO_RCVBUFFORCE,
                plain: libc::SO_RCVBUF,
            },
            Buf::Send => BufOptions {
                force: SO_SNDBUFFORCE,
                plain: libc::SO_SNDBUF,
            },
        }
    }

    /// The buffer's size as `setsockopt` takes it (the kernel doubles it
    /// for its own overhead, and `getsockopt` shows the doubled value).
    pub(super) fn current(self, fd: BorrowedFd<'_>) -> usize {
        sys::get_int(fd, libc::SOL_SOCKET, self.options().plain)
            .unwrap_or(0)
            .max(0) as usize
            / 2
    }

    /// Sets the buffer to at least `want` bytes (as `setsockopt` takes
    /// it), as far as this process may: forced when privileged in the
    /// initial user namespace, else up to the sysctl maximum (an
    /// unprivileged user namespace). The buffer never shrinks. Returns
    /// whether it grew.
    pub(super) fn ensure(self, fd: BorrowedFd<'_>, want: usize) -> bool {
        let before = self.current(fd);
        if !self.raise(fd, want, before) {
            return false;
        }
        self.current(fd) > before
    }

    /// Sets the buffer, now `before` bytes (as `setsockopt` takes it), to
    /// at least `want`, as [`Buf::ensure`] does, without reading it: for a
    /// new socket, whose size is its namespace's default. Returns whether
    /// it asked for more (not whether the kernel gave it).
    pub(super) fn raise(self, fd: BorrowedFd<'_>, want: usize, before: usize) -> bool {
        if want <= before {
            return false;
        }
        let opts = self.options();
        let size = want.min(i32::MAX as usize / 2) as i32;
        if let Err(e) = sys::set_int(fd, libc::SOL_SOCKET, opts.force, size) {
            if e.raw_os_error() == Some(libc::EPERM) {
                // Best effort: a refusal shows up as EAGAIN/ENOMEM in `fill`.
                let _ = sys::set_int(fd, libc::SOL_SOCKET, opts.plain, size);
            }
        }
        true
    }
}

/// Room for a queue of `len` bytes beyond the data itself (skb overhead).
pub(super) fn room_for(len: usize) -> usize {
    len + len / 4 + MIN_BUFFER
}

/// Whether [`fill`] may wait for the peer when the buffer is full and
/// cannot grow.
#[derive(Clone, Copy, Debug)]
pub(super) enum Patience {
    /// Repair queues: the peer acknowledges nothing while in repair mode.
    None,
    /// A live socket: wait for the peer's acknowledgements to free room,
    /// until this instant.
    Until(Instant),
}

/// Why [`fill`] stopped.
#[derive(Debug)]
pub(super) enum FillError {
    /// The kernel refused a `send` for another reason.
    Kernel(Error),
    /// The buffer stayed full: this many bytes were queued.
    Full { queued: usize },
}

/// Queues `data` (on the selected repair queue, or as ordinary data once
/// repair is off), in chunks: a large `send` can fail with ENOMEM, and a
/// full buffer answers EAGAIN. A full buffer is made larger first: the
/// original socket held this data, so the copy should hold it too, even
/// while the peer offers a zero window. Where the buffer cannot grow (an
/// unprivileged namespace caps it) a live socket waits for the peer's
/// acknowledgements, as `patience` allows.
pub(super) fn fill(
    fd: BorrowedFd<'_>,
    data: &[u8],
    buf: Buf,
    patience: Patience,
    what: &'static str,
) -> Result<(), FillError> {
    let mut off = 0;
    let mut chunk = MAX_CHUNK;
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        let e = match sys::send_some(fd, &data[off..end]) {
            Ok(n) => {
                off += n;
                continue;
            }
            Err(e) => e,
        };
        let errno = e.raw_os_error();
        if !matches!(errno, Some(libc::ENOMEM) | Some(libc::EAGAIN)) {
            return Err(FillError::Kernel(Error::kernel(what, e)));
        }
        if errno == Some(libc::ENOMEM) && chunk > MIN_CHUNK {
            chunk /= 2;
            continue;
        }
        if buf.ensure(fd, buf.current(fd).max(MIN_BUFFER) * 2) {
            continue;
        }
        match patience {
            Patience::Until(deadline) => {
                tracing::debug!(
                    queued = off,
                    total = data.len(),
                    "the send buffer is full and cannot grow: waiting for the peer"
                );
                let left = deadline.saturating_duration_since(Instant::now());
                let writable = !left.is_zero()
                    && sys::wait_writable(fd, left)
                        .map_err(|e| FillError::Kernel(Error::kernel(what, e)))?;
                if !writable {
                    return Err(FillError::Full { queued: off });
                }
            }
            Patience::None if chunk > MIN_CHUNK => chunk /= 2,
            Patience::None => return Err(FillError::Full { queued: off }),
        }
    }
    Ok(())
}

/// Queues one repair queue whole (there is no waiting in repair mode).
pub(super) fn fill_repair_queue(
    fd: BorrowedFd<'_>,
    data: &[u8],
    buf: Buf,
    what: &'static str,
) -> Result<(), Error> {
    fill(fd, data, buf, Patience::None, what).map_err(|e| match e {
        FillError::Kernel(e) => e,
        FillError::Full { queued } => Error::Inconsistent(format!(
            "cannot {what}: {} bytes do not fit the largest {} buffer this process may set \
             ({queued} fit; SO_{}BUFFORCE needs CAP_NET_ADMIN in the initial user namespace, \
             and net.core.{}mem_max caps the rest)",
            data.len(),
            match buf {
                Buf::Recv => "receive",
                Buf::Send => "send",
            },
            match buf {
                Buf::Recv => "RCV",
                Buf::Send => "SND",
            },
            match buf {
                Buf::Recv => "r",
                Buf::Send => "w",
            },
        )),
    })
}
