//! Engine round trips on the real kernel, each test in a network namespace
//! of its own thread (TCP_REPAIR needs only CAP_NET_ADMIN there).
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use tcpr_engine::{freeze, restore, FreezeOptions};

fn private_netns() {
    tcpr_engine::unshare_netns().expect("unshare a network namespace (run as root)");
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(st.success());
}

fn pair(addr: &str) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(addr).unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

fn no_lock() -> FreezeOptions {
    FreezeOptions {
        lock: false,
        ..Default::default()
    }
}

fn round_trip(addr: &str) {
    let (mut client, mut server) = pair(addr);
    client.write_all(b"hello from client").unwrap();
    server.write_all(b"hi from server").unwrap();
    let mut buf = [0u8; 14];
    client.read_exact(&mut buf).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Unread data sits in the server's receive queue at the dump.
    let frozen = freeze(server.try_clone().unwrap().into(), &no_lock()).unwrap();
    let img = frozen.dump().unwrap();
    assert_eq!(img.recv_queue, b"hello from client");
    assert_eq!(
        tcpr_image::ConnectionImage::decode(&img.encode()).unwrap(),
        img
    );
    let lock = frozen.discard().unwrap();
    assert!(lock.is_none());
    drop(server);
    let r = restore(&img).unwrap();
    let mut s2 = r.resume().unwrap();
    let mut got = [0u8; 17];
    s2.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello from client");
    s2.write_all(b"after the move").unwrap();
    let mut buf = [0u8; 14];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after the move");
    client.write_all(b"and back").unwrap();
    let mut buf = [0u8; 8];
    s2.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"and back");
}

#[test]
fn ipv4_round_trip() {
    std::thread::spawn(|| {
        private_netns();
        round_trip("127.0.0.1:0");
    })
    .join()
    .unwrap();
}

#[test]
fn ipv6_round_trip() {
    std::thread::spawn(|| {
        private_netns();
        round_trip("[::1]:0");
    })
    .join()
    .unwrap();
}

/// Waits until the socket reaches kernel state `want`.
fn wait_state(s: &TcpStream, want: u8) {
    use std::os::fd::AsFd;
    for _ in 0..500 {
        if tcpr_engine::inspect_socket(s.as_fd()).unwrap().1 == want {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    panic!("socket never reached state {want}");
}

/// Moves the server side of `(client, server)` to a new socket in place.
fn move_in_place(server: TcpStream) -> (tcpr_image::ConnectionImage, TcpStream) {
    let frozen = freeze(server.into(), &no_lock()).unwrap();
    let img = frozen.dump().unwrap();
    frozen.discard().unwrap();
    let s2 = restore(&img).unwrap().resume().unwrap();
    (img, s2)
}

#[test]
fn we_closed_fin_wait2() {
    std::thread::spawn(|| {
        private_netns();
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (mut client, mut server) = pair(addr);
            server.write_all(b"last words").unwrap();
            server.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"last words");
            wait_state(&server, 5);
            let (img, mut s2) = move_in_place(server);
            assert_eq!(img.state, tcpr_image::TcpState::FinWait2);
            // The open direction still works after the move.
            client.write_all(b"peer still talks").unwrap();
            let mut buf = [0u8; 16];
            s2.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"peer still talks");
            drop(client);
            let mut rest = Vec::new();
            s2.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
        }
    })
    .join()
    .unwrap();
}

#[test]
fn peer_closed_close_wait() {
    std::thread::spawn(|| {
        private_netns();
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (mut client, server) = pair(addr);
            client.write_all(b"request").unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let (img, mut s2) = move_in_place(server);
            assert_eq!(img.state, tcpr_image::TcpState::CloseWait);
            assert_eq!(img.recv_queue, b"request");
            let mut got = Vec::new();
            s2.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"request", "data then the peer's EOF after the move");
            s2.write_all(b"response").unwrap();
            s2.shutdown(std::net::Shutdown::Write).unwrap();
            let mut resp = Vec::new();
            client.read_to_end(&mut resp).unwrap();
            assert_eq!(resp, b"response");
        }
    })
    .join()
    .unwrap();
}
