//! `pass_socket` places the connection on fd 3 and the blob on fd 4 of a
//! child wherever the caller's fds sit. The one test of this binary takes
//! fd 3 of the process, so nothing else may run beside it.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Command;

const BLOB: &[u8] = b"application state carried with the connection";

/// Moves `fd` onto fd number 3, which must be free or `fd` itself.
fn onto_fd_3(fd: OwnedFd) -> OwnedFd {
    const TARGET: i32 = 3;
    if fd.as_raw_fd() == TARGET {
        return fd;
    }
    // SAFETY: F_GETFD on a number only asks whether it is open.
    let taken = unsafe { libc::fcntl(TARGET, libc::F_GETFD) } != -1;
    assert!(!taken, "fd 3 is already open in the test process");
    // SAFETY: `fd` is open; fd 3 is free, so dup3 takes nothing from anyone.
    let r = unsafe { libc::dup3(fd.as_raw_fd(), TARGET, libc::O_CLOEXEC) };
    assert_eq!(r, TARGET, "dup3: {}", std::io::Error::last_os_error());
    // SAFETY: dup3 just made fd 3 a copy that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(TARGET) }
}

#[test]
fn a_blob_sitting_on_fd_3_lands_on_fd_4_and_the_socket_on_fd_3() {
    let blob = onto_fd_3(tcpr_host::memfd_with("tcpr-app-blob", BLOB).unwrap());
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let theirs = OwnedFd::from(theirs);
    let mut cmd = Command::new("/bin/sh");
    // The child names what it holds on 3 and 4, then copies fd 4 to fd 3.
    cmd.arg("-c")
        .arg("readlink /proc/self/fd/3 /proc/self/fd/4 >&3; cat <&4 >&3");
    tcpr_host::pass_socket(&mut cmd, &theirs, false, Some(&blob)).unwrap();
    let mut child = cmd.spawn().unwrap();
    // Only the child holds the other end now: its exit ends the stream.
    drop(cmd);
    drop(theirs);
    drop(blob);
    // Were the socket on fd 4 too, `cat` would read the socket: give it
    // an end of file so that the test fails instead of hanging.
    ours.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    ours.read_to_end(&mut got).unwrap();
    assert!(child.wait().unwrap().success());
    let got = String::from_utf8_lossy(&got);
    let mut lines = got.splitn(3, '\n');
    let (fd3, fd4, rest) = (
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
    );
    assert!(fd3.starts_with("socket:["), "fd 3 of the child: {got:?}");
    assert_eq!(
        fd4, "/memfd:tcpr-app-blob (deleted)",
        "fd 4 of the child: {got:?}"
    );
    assert_eq!(rest.as_bytes(), BLOB, "the blob read from fd 4: {got:?}");
}
