//! The bench floor on the real kernel: an idle connection moves with bare
//! syscalls, and anything that is not one is an error, never a panic.

mod common;
use common::in_private_netns;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use tcpr_host::floor;

fn pair(addr: &str) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(addr).unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

fn exchange(a: &mut TcpStream, b: &mut TcpStream) {
    a.write_all(b"to the restored side").unwrap();
    let mut buf = [0u8; 20];
    b.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to the restored side");
    b.write_all(b"and back").unwrap();
    let mut buf = [0u8; 8];
    a.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"and back");
}

#[test]
fn an_idle_connection_moves_and_carries_bytes_both_ways() {
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (mut client, server) = pair(addr);
            let state = floor::dump(server.as_fd()).unwrap();
            drop(server);
            let mut restored = TcpStream::from(floor::restore(&state).unwrap());
            exchange(&mut client, &mut restored);
            // The same connection cannot be restored twice: an error, not
            // a half-made socket.
            let err = floor::restore(&state).unwrap_err();
            assert!(err.to_string().starts_with("floor: "), "{err}");
        }
    });
}

#[test]
fn what_is_not_a_tcp_connection_is_an_error() {
    let memfd = tcpr_host::memfd_with("not-a-socket", b"x").unwrap();
    let err = floor::dump(memfd.as_fd()).unwrap_err();
    assert!(err.to_string().contains("getsockname"), "{err}");
    let (unix, _other) = UnixStream::pair().unwrap();
    let unix = OwnedFd::from(unix);
    assert!(floor::dump(unix.as_fd()).is_err());
}
