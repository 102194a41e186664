//! Fd plumbing: passing fds over unix sockets (SCM_RIGHTS), into a child
//! process at fixed numbers, and anonymous in-memory files.

use super::named;
use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The lowest fd number [`pass_socket`] parks its copies at before placing
/// them: above the fds it places (0, 1, 3, 4), so that placing one cannot
/// overwrite another.
const PARK_ABOVE: RawFd = 10;
/// Where the systemd `Accept=yes` convention puts the connection
/// (`SD_LISTEN_FDS_START`).
const SOCKET_FD: RawFd = 3;
/// Where tcpr puts the application blob.
const BLOB_FD: RawFd = 4;

/// Puts a copy of `sock` on fd 3 of the child (and on 0 and 1 with
/// `inetd`), for the systemd `Accept=yes` and inetd conventions, and a copy
/// of `blob`, if any, on fd 4. Wherever the caller's fds sit (even on 3 or
/// 4), each lands where it belongs.
pub fn pass_socket(
    cmd: &mut std::process::Command,
    sock: &OwnedFd,
    inetd: bool,
    blob: Option<&OwnedFd>,
) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    // The closure owns its own close-on-exec copies, so they stay open for
    // as long as the Command (and its closure) lives, whatever the caller
    // does with its fds; they close in the child at exec.
    let sock = sock.try_clone()?;
    let blob = blob.map(OwnedFd::try_clone).transpose()?;
    let place = move || -> io::Result<()> {
        // Park every copy above the target numbers first: a copy sitting on
        // 3 or 4 would otherwise be overwritten by the first dup2.
        let sock_high = syscall!(fcntl(sock.as_raw_fd(), libc::F_DUPFD_CLOEXEC, PARK_ABOVE))?;
        let blob_high = match &blob {
            Some(b) => Some(syscall!(fcntl(
                b.as_raw_fd(),
                libc::F_DUPFD_CLOEXEC,
                PARK_ABOVE
            ))?),
            None => None,
        };
        // dup2 clears FD_CLOEXEC on the copy it makes: the placed fds
        // survive exec, the parked ones do not.
        syscall!(dup2(sock_high, SOCKET_FD))?;
        if let Some(b) = blob_high {
            syscall!(dup2(b, BLOB_FD))?;
        }
        if inetd {
            syscall!(dup2(SOCKET_FD, libc::STDIN_FILENO))?;
            syscall!(dup2(SOCKET_FD, libc::STDOUT_FILENO))?;
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and only
    // calls fcntl(2) and dup2(2), which are async-signal-safe, on fds it
    // owns (open in the parent for as long as the Command lives, so
    // inherited by the child); it allocates nothing.
    unsafe {
        cmd.pre_exec(place);
    }
    Ok(())
}

/// An anonymous in-memory file holding `data`, positioned at its start:
/// a way to hand bytes to a child without touching disk.
pub fn memfd_with(name: &str, data: &[u8]) -> io::Result<OwnedFd> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))?;
    // SAFETY: `cname` is a valid NUL-terminated string; returns a new fd.
    let fd =
        syscall!(memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC)).map_err(named("memfd_create"))?;
    // SAFETY: memfd_create(2) just returned this fd; nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    std::io::Write::write_all(&mut file, data)?;
    std::io::Seek::rewind(&mut file)?;
    Ok(file.into())
}

/// The most fds one SCM_RIGHTS message can carry (`SCM_MAX_FD`,
/// include/net/scm.h).
pub const SCM_MAX_FD: usize = 253;
/// Room for the control message of [`recv_with_fds`]: as many fds as one
/// message can carry (a unix delivery batch sends that many), so that a
/// sender's extra fds are received and closed rather than dropped
/// silently by truncation.
const RECV_FDS: usize = SCM_MAX_FD;

/// `CMSG_SPACE` for `fds` fds.
const fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) as usize }
}
/// `CMSG_LEN` for `fds` fds.
fn cmsg_len(fds: usize) -> usize {
    // SAFETY: CMSG_LEN is pure arithmetic on its argument.
    unsafe { libc::CMSG_LEN((fds * size_of::<RawFd>()) as u32) as usize }
}

/// A control-message buffer aligned for `cmsghdr`, as `CMSG_FIRSTHDR` and
/// `CMSG_NXTHDR` assume (cmsg(3)): a byte array alone has alignment 1.
#[repr(C)]
union CmsgBuffer<const N: usize> {
    header: libc::cmsghdr,
    bytes: [u8; N],
}
impl<const N: usize> CmsgBuffer<N> {
    fn zeroed() -> Self {
        CmsgBuffer { bytes: [0; N] }
    }
}
const SEND_SPACE: usize = cmsg_space(SCM_MAX_FD);
const RECV_SPACE: usize = cmsg_space(RECV_FDS);

/// Sends `data` on a unix stream socket with `fd` attached (SCM_RIGHTS).
pub fn send_with_fd(sock: BorrowedFd<'_>, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    send_with_fds(sock, data, &[fd])
}

/// Sends `data` on a unix stream socket with `fds` attached (SCM_RIGHTS,
/// at most [`SCM_MAX_FD`]); the fds travel with the first byte.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if data.is_empty() || fds.is_empty() || fds.len() > SCM_MAX_FD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "send_with_fds: needs at least one byte and 1 to 253 fds",
        ));
    }
    let mut cbuf = CmsgBuffer::<SEND_SPACE>::zeroed();
    let space = cmsg_space(fds.len());
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: plain data, all-zero is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (&mut cbuf as *mut CmsgBuffer<SEND_SPACE>).cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points to a cmsghdr-aligned buffer of at least
    // `space` bytes (SEND_SPACE >= space), room for one header carrying
    // `fds.len()` fds; CMSG_FIRSTHDR returns its start (non-null since
    // msg_controllen >= sizeof(cmsghdr)) and CMSG_DATA stays inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = cmsg_len(fds.len()) as _;
        let data = libc::CMSG_DATA(c).cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
        }
    }
    // SAFETY: `msg` and everything it points to are valid for the call.
    let n = syscall!(sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL))
        .map_err(named("sendmsg"))? as usize;
    // The rest goes without the fds.
    let mut off = n;
    while off < data.len() {
        // SAFETY: `data[off..]` is readable for its length.
        let m = syscall!(send(
            sock.as_raw_fd(),
            data[off..].as_ptr().cast(),
            data.len() - off,
            libc::MSG_NOSIGNAL
        ))
        .map_err(named("send"))?;
        off += m as usize;
    }
    Ok(())
}

/// Receives into `buf` from a unix stream socket, with at most one fd
/// attached (SCM_RIGHTS). Returns the bytes read and the fd, if any. Every
/// fd the kernel hands over is taken: extra fds a sender attached are
/// closed, and a control message cut short (`MSG_CTRUNC`: more fds than
/// expected, whose overflow the kernel has already closed) is an error.
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    // Extra fds beyond the first close as the vector drops.
    recv_with_fds(sock, buf).map(|(n, fds)| (n, fds.into_iter().next()))
}

/// [`recv_with_fd`] keeping every fd attached (up to [`SCM_MAX_FD`]), in the order
/// they were sent.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cbuf = CmsgBuffer::<RECV_SPACE>::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: plain data, all-zero is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (&mut cbuf as *mut CmsgBuffer<RECV_SPACE>).cast();
    msg.msg_controllen = RECV_SPACE as _;
    // SAFETY: `msg` points to valid, writable buffers of the given sizes.
    let n = syscall!(recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC))
        .map_err(named("recvmsg"))? as usize;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut foreign = false;
    // SAFETY: the kernel filled `msg_controllen` bytes of the aligned
    // control buffer; CMSG_FIRSTHDR/CMSG_NXTHDR walk headers inside it and
    // return null at its end. An SCM_RIGHTS header's data holds
    // `(cmsg_len - CMSG_LEN(0)) / sizeof(int)` new fds, installed in this
    // process for us: each is taken exactly once.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count =
                    ((*c).cmsg_len as usize).saturating_sub(cmsg_len(0)) / size_of::<RawFd>();
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            } else {
                foreign = true;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // `fds` drops here: everything that did arrive is closed.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "recvmsg: control message truncated (the sender attached more than {RECV_FDS} fds)"
            ),
        ));
    }
    if foreign {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "recvmsg: unexpected control message (only SCM_RIGHTS is expected)",
        ));
    }
    Ok((n, fds))
}
