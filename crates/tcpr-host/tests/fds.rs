//! Fd passing over unix sockets (SCM_RIGHTS) and into child processes, on
//! the real kernel: every fd the kernel hands over is accounted for.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Command;

/// What `/proc/self/fd/N` points to.
fn target_of(fd: &impl AsRawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// How many fds of this process point to `target` (such as `pipe:[123]`).
fn open_fds_to(target: &str) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy() == target)
        .count()
}

#[test]
fn one_fd_travels_with_its_bytes() {
    let (a, b) = UnixStream::pair().unwrap();
    let (mut sock, peer) = UnixStream::pair().unwrap();
    tcpr_host::send_with_fd(a.as_fd(), b"hello", peer.as_fd()).unwrap();
    let mut buf = [0u8; 16];
    let (n, fd) = tcpr_host::recv_with_fd(b.as_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    let mut got = UnixStream::from(fd.expect("an fd arrived"));
    assert_eq!(target_of(&got), target_of(&peer));
    drop(peer);
    sock.write_all(b"ping").unwrap();
    let mut four = [0u8; 4];
    got.read_exact(&mut four).unwrap();
    assert_eq!(&four, b"ping");
}

#[test]
fn extra_fds_a_sender_attaches_are_closed() {
    let (a, b) = UnixStream::pair().unwrap();
    let (_sock, peer) = UnixStream::pair().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    let pipe = target_of(&reader);
    tcpr_host::send_with_fds(a.as_fd(), b"hello", &[peer.as_fd(), writer.as_fd()]).unwrap();
    drop(writer);
    let mut buf = [0u8; 16];
    let (n, fd) = tcpr_host::recv_with_fd(b.as_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    // The first fd is the one returned...
    assert_eq!(target_of(&fd.expect("an fd arrived")), target_of(&peer));
    // ...and the pipe's write end that came with it is not left open in
    // this process: only our read end points to the pipe.
    assert_eq!(open_fds_to(&pipe), 1, "a received fd leaked");
}

/// The receive side has room for as many fds as one message can carry
/// (a unix delivery batch sends that many): none is cut off (MSG_CTRUNC),
/// `recv_with_fds` returns them all, `recv_with_fd` the first, and the
/// others close.
#[test]
fn a_full_control_message_is_received_whole_and_leaks_nothing() {
    let (reader, writer) = std::io::pipe().unwrap();
    let pipe = target_of(&reader);
    let many: Vec<_> = std::iter::repeat_n(writer.as_fd(), tcpr_host::SCM_MAX_FD).collect();
    let (a, b) = UnixStream::pair().unwrap();
    tcpr_host::send_with_fds(a.as_fd(), b"x", &many).unwrap();
    tcpr_host::send_with_fds(a.as_fd(), b"y", &many).unwrap();
    drop(many);
    drop(writer);
    let mut buf = [0u8; 1];
    let (n, fds) = tcpr_host::recv_with_fds(b.as_fd(), &mut buf).unwrap();
    assert_eq!((n, fds.len()), (1, tcpr_host::SCM_MAX_FD));
    drop(fds);
    let (n, fd) = tcpr_host::recv_with_fd(b.as_fd(), &mut buf).unwrap();
    assert_eq!(n, 1);
    assert_eq!(open_fds_to(&pipe), 2, "the first fd and our read end");
    drop(fd);
    assert_eq!(open_fds_to(&pipe), 1, "a received fd leaked");
}

#[test]
fn sending_no_fd_or_too_many_is_refused() {
    let (a, _b) = UnixStream::pair().unwrap();
    assert!(tcpr_host::send_with_fds(a.as_fd(), b"x", &[]).is_err());
    let many: Vec<_> = std::iter::repeat_n(a.as_fd(), tcpr_host::SCM_MAX_FD + 1).collect();
    assert!(tcpr_host::send_with_fds(a.as_fd(), b"x", &many).is_err());
}

#[test]
fn inetd_puts_the_socket_on_0_1_and_3() {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let theirs = OwnedFd::from(theirs);
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("readlink /proc/self/fd/0 /proc/self/fd/1 /proc/self/fd/3; cat");
    tcpr_host::pass_socket(&mut cmd, &theirs, true, None).unwrap();
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let sock = target_of(&theirs);
    drop(theirs);
    ours.write_all(b"echoed back").unwrap();
    ours.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = String::new();
    ours.read_to_string(&mut got).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(got, format!("{sock}\n{sock}\n{sock}\nechoed back"));
}
