//! Engine round trips on the real kernel, each test in a network namespace
//! of its own thread (TCP_REPAIR needs only CAP_NET_ADMIN there).
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use tcpr_engine::{freeze, restore, FreezeOptions};

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
    // Unread data sits in the server's receive queue at the dump, and the
    // client has acknowledged the server's bytes (nothing left in flight).
    wait_until(
        "the client's bytes in the server's receive queue, its send queue acknowledged",
        WAIT,
        || {
            let e = diag_entry(&server);
            e.recv_queue as usize == b"hello from client".len() && e.send_queue == 0
        },
    );
    let frozen = freeze(server.try_clone().unwrap().into(), &no_lock()).unwrap();
    let img = frozen.dump().unwrap();
    assert_eq!(img.recv_queue, b"hello from client");
    assert_eq!(
        tcpr_image::ConnectionImage::decode(&img.encode().unwrap()).unwrap(),
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
    in_private_netns(|| {
        round_trip("127.0.0.1:0");
    });
}

#[test]
fn ipv6_round_trip() {
    in_private_netns(|| {
        round_trip("[::1]:0");
    });
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
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (mut client, mut server) = pair(addr);
            server.write_all(b"last words").unwrap();
            server.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"last words");
            wait_state(&server, tcpr_image::TcpState::FinWait2);
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
    });
}

#[test]
fn peer_closed_close_wait() {
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (mut client, server) = pair(addr);
            client.write_all(b"request").unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            wait_state(&server, tcpr_image::TcpState::CloseWait);
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
    });
}

/// Sets every carried socket option to a non-default value, moves the
/// socket, and checks the restored socket reports the same values; then
/// dump -> restore -> dump must give the same image (field by field).
fn options_round_trip(addr: &str) {
    use std::os::fd::AsFd;
    let (mut client, server) = pair(addr);
    let v6 = addr.starts_with('[');
    let fd = server.as_fd();
    let set = |level, name, v: i32| setsockopt_int(fd, level, name, v);
    set(libc::SOL_TCP, libc::TCP_NODELAY, 1);
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::SOL_TCP, libc::TCP_KEEPIDLE, 33);
    set(libc::SOL_TCP, libc::TCP_KEEPINTVL, 7);
    set(libc::SOL_TCP, libc::TCP_KEEPCNT, 4);
    set(libc::SOL_TCP, libc::TCP_USER_TIMEOUT, 12345);
    set(libc::SOL_TCP, libc::TCP_NOTSENT_LOWAT, 65536);
    set(libc::SOL_SOCKET, libc::SO_MARK, 42);
    set(libc::SOL_SOCKET, libc::SO_RCVBUF, 200_000);
    set(libc::SOL_SOCKET, libc::SO_SNDBUF, 300_000);
    if v6 {
        set(libc::SOL_IPV6, libc::IPV6_TCLASS, 0x28);
        set(libc::SOL_IPV6, libc::IPV6_UNICAST_HOPS, 17);
    } else {
        set(libc::SOL_IP, libc::IP_TOS, 0x28);
        set(libc::SOL_IP, libc::IP_TTL, 17);
    }
    // After IP_TOS, which also sets the priority.
    set(libc::SOL_SOCKET, libc::SO_PRIORITY, 5);
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 3,
    };
    // SAFETY: test helper; `l` is a valid struct linger for the call.
    let r = unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    let frozen = freeze(server.into(), &no_lock()).unwrap();
    let img = frozen.dump().unwrap();
    frozen.discard().unwrap();
    let so = &img.socket_options;
    assert_eq!(so.nodelay, Some(true));
    assert_eq!(so.keepalive, Some(true));
    assert_eq!(so.keepalive_idle_secs, Some(33));
    assert_eq!(so.keepalive_interval_secs, Some(7));
    assert_eq!(so.keepalive_count, Some(4));
    assert_eq!(so.user_timeout_ms, Some(12345));
    assert_eq!(so.notsent_lowat, Some(65536));
    assert_eq!(so.mark, Some(42));
    assert_eq!(so.priority, Some(5));
    assert_eq!(so.tos, Some(0x28));
    assert_eq!(so.ttl, Some(17));
    assert_eq!(so.linger_secs, Some(3));
    assert_eq!(so.rcvbuf, Some(200_000));
    assert_eq!(so.sndbuf, Some(300_000));
    assert!(so.congestion.is_some());

    let restored = restore(&img).unwrap().resume().unwrap();
    let frozen = freeze(restored.into(), &no_lock()).unwrap();
    let again = frozen.dump().unwrap();
    // Field-by-field: everything but the clocks must be identical.
    assert_eq!(again.local, img.local);
    assert_eq!(again.peer, img.peer);
    assert_eq!(again.state, img.state);
    assert_eq!(again.send_seq, img.send_seq);
    assert_eq!(again.recv_seq, img.recv_seq);
    assert_eq!(again.recv_queue, img.recv_queue);
    assert_eq!(again.send_queue, img.send_queue);
    assert_eq!(again.options, img.options);
    assert_eq!(again.socket_options, img.socket_options);
    assert_eq!(again.window.snd_wnd, img.window.snd_wnd);
    assert_eq!(again.window.rcv_wup, img.window.rcv_wup);
    assert!(
        again.timestamp.wrapping_sub(img.timestamp) < 10_000,
        "TSval clock carried over"
    );
    let s = frozen.thaw().unwrap();
    let mut s = TcpStream::from(s);
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
}

fn setsockopt_int(fd: std::os::fd::BorrowedFd<'_>, level: i32, name: i32, v: i32) {
    use std::os::fd::AsRawFd;
    // SAFETY: test helper; `v` is a valid int for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt {level}/{name}: {}",
        std::io::Error::last_os_error()
    );
}

fn getsockopt_int(fd: std::os::fd::BorrowedFd<'_>, level: i32, name: i32) -> i32 {
    use std::os::fd::AsRawFd;
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
    assert_eq!(r, 0, "getsockopt {level}/{name}");
    v
}

#[test]
fn socket_options_and_state_round_trip() {
    in_private_netns(|| {
        options_round_trip("127.0.0.1:0");
        options_round_trip("[::1]:0");
    });
}

/// Drops, in this thread's namespace, every packet the client socket sends
/// (marked, so that the engine's forged FIN from the "peer" still passes):
/// the server's data and FIN then stay unacknowledged.
fn drop_from(client: &TcpStream, on: bool) {
    use std::os::fd::AsFd;
    if on {
        setsockopt_int(client.as_fd(), libc::SOL_SOCKET, libc::SO_MARK, 77);
        nft_script(
            "add table inet t\nadd chain inet t c { type filter hook output priority 0; }\nadd rule inet t c meta mark 77 drop\n",
        );
    } else {
        nft_script("delete table inet t\n");
    }
}

#[test]
fn we_closed_fin_unacked_fin_wait1() {
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (mut client, mut server) = pair(addr);
            drop_from(&client, true);
            server.write_all(b"response").unwrap();
            server.shutdown(std::net::Shutdown::Write).unwrap();
            wait_state(&server, tcpr_image::TcpState::FinWait1);
            let (img, mut s2) = move_in_place(server);
            assert_eq!(img.state, tcpr_image::TcpState::FinWait1);
            assert_eq!(
                img.send_queue.sent, b"response",
                "in flight, FIN not counted as data"
            );
            drop_from(&client, false);
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"response");
            wait_state(&s2, tcpr_image::TcpState::FinWait2);
            client.write_all(b"still open this way").unwrap();
            let mut buf = [0u8; 19];
            s2.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"still open this way");
        }
    });
}

#[test]
fn both_closed_last_ack() {
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (mut client, mut server) = pair(addr);
            client.write_all(b"request").unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            wait_state(&server, tcpr_image::TcpState::CloseWait);
            drop_from(&client, true);
            server.write_all(b"response").unwrap();
            server.shutdown(std::net::Shutdown::Write).unwrap();
            wait_state(&server, tcpr_image::TcpState::LastAck);
            let (img, mut s2) = move_in_place(server);
            assert_eq!(img.state, tcpr_image::TcpState::LastAck);
            assert_eq!(img.recv_queue, b"request");
            assert_eq!(img.send_queue.sent, b"response");
            drop_from(&client, false);
            let mut got = Vec::new();
            s2.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"request");
            let mut resp = Vec::new();
            client.read_to_end(&mut resp).unwrap();
            assert_eq!(resp, b"response");
        }
    });
}

/// Runs an nft script in this thread's namespace.
fn nft_script(script: &str) {
    use std::io::Write as _;
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    nft.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft: {script}");
}

/// Simultaneous close: both FINs cross, neither is acknowledged yet.
#[test]
fn simultaneous_close_closing() {
    use std::os::fd::AsFd;
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (mut client, mut server) = pair(addr);
            setsockopt_int(client.as_fd(), libc::SOL_SOCKET, libc::SO_MARK, 77);
            setsockopt_int(server.as_fd(), libc::SOL_SOCKET, libc::SO_MARK, 78);
            // Nothing gets through either way: both FINs wait.
            nft_script(
                "add table inet t\nadd chain inet t c { type filter hook output priority 0; }\nadd rule inet t c meta mark 77 drop\nadd rule inet t c meta mark 78 drop\n",
            );
            server.write_all(b"server's last words").unwrap();
            server.shutdown(std::net::Shutdown::Write).unwrap();
            client.write_all(b"client's last words").unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            // Let the client's data and FIN through, not the server's.
            nft_script("flush chain inet t c\nadd rule inet t c meta mark 78 drop\n");
            wait_state(&server, tcpr_image::TcpState::Closing);
            let (img, mut s2) = move_in_place(server);
            assert_eq!(img.state, tcpr_image::TcpState::Closing, "{addr}");
            assert_eq!(img.recv_queue, b"client's last words");
            // An output drop makes TCP keep the segments unsent (the
            // transmit failed): data and FIN wait in the unsent queue.
            let queued = [&img.send_queue.sent[..], &img.send_queue.unsent[..]].concat();
            assert_eq!(queued, b"server's last words", "FIN not counted as data");
            // The restored socket keeps SO_MARK 78: still blocked; now open.
            nft_script("delete table inet t\n");
            let mut got = Vec::new();
            s2.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"client's last words");
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"server's last words");
        }
    });
}

/// Unsent data under a zero window, more of it than the image's send buffer
/// (the kernel moderates sk_sndbuf to half the queued memory under
/// pressure) and more than TCP_NOTSENT_LOWAT: resume must queue it all at
/// once, not wait for the peer, and keep the option.
/// Whether the established connection on local `port` sees a zero window
/// from its peer (`ss` leaves `snd_wnd` out when it is zero, or on kernels
/// that do not report it).
fn zero_window(port: u16) -> bool {
    let out = Command::new("ss")
        .args(["-Htni", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    !seen.is_empty()
        && seen
            .split_whitespace()
            .find_map(|f| f.strip_prefix("snd_wnd:"))
            .is_none_or(|w| w == "0")
}

#[test]
fn unsent_beyond_buffer_and_notsent_lowat() {
    use std::os::fd::AsFd;
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (mut client, server) = pair(addr);
            server.set_nonblocking(true).unwrap();
            let mut sent = Vec::new();
            let mut n = 0u32;
            // The client reads nothing: its window closes, data piles up.
            loop {
                let chunk: Vec<u8> = (0..8192u32)
                    .map(|i| (i.wrapping_mul(31) ^ n) as u8)
                    .collect();
                match (&server).write(&chunk) {
                    Ok(k) => sent.extend_from_slice(&chunk[..k]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("write: {e}"),
                }
                n += 1;
            }
            wait_until("the client's window closes", WAIT, || {
                zero_window(server.local_addr().unwrap().port())
            });
            // Set once the data is queued, as an application may.
            setsockopt_int(server.as_fd(), libc::SOL_TCP, libc::TCP_NOTSENT_LOWAT, 4096);
            let frozen = freeze(server.into(), &no_lock()).unwrap();
            let mut img = frozen.dump().unwrap();
            frozen.discard().unwrap();
            assert!(
                img.send_queue.unsent.len() >= 256 * 1024,
                "unsent at the dump: {}",
                img.send_queue.unsent.len()
            );
            assert_eq!(img.socket_options.notsent_lowat, Some(4096));
            // As a moderated buffer would have it: smaller than the queue.
            img.socket_options.sndbuf = Some(4096);
            // Before the fix this waited for the window and then failed.
            let s2 = restore(&img).unwrap().resume().unwrap();
            assert_eq!(
                getsockopt_int(s2.as_fd(), libc::SOL_TCP, libc::TCP_NOTSENT_LOWAT),
                4096
            );
            let mut got = vec![0u8; sent.len()];
            client.read_exact(&mut got).unwrap();
            assert!(got == sent, "the peer got every byte, in order");
        }
    });
}

/// The segment size the socket sends with (`TCP_MAXSEG` of a live socket:
/// its `mss_cache`).
fn send_mss(s: &TcpStream) -> i32 {
    use std::os::fd::AsFd;
    getsockopt_int(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_MAXSEG)
}

/// A restored connection sends segments as large as the original did: the
/// kernel sizes them at the repair-mode connect, before TCP_REPAIR_OPTIONS
/// gives it the peer's MSS, so without more the restored socket kept the
/// default 536 bytes (524 with timestamps) and sent three times the
/// segments on a 1500-byte link, tens of times on loopback.
fn mss_round_trip(addr: &str, mtu: u32) {
    let ip = Command::new("ip")
        .args(["link", "set", "lo", "mtu", &mtu.to_string()])
        .status()
        .unwrap();
    assert!(ip.success());
    let (mut client, server) = pair(addr);
    let before = send_mss(&server);
    // The MTU less the IP and TCP headers and the timestamp option.
    let header = if addr.starts_with('[') { 40 } else { 20 } + 20 + 12;
    assert_eq!(before, mtu as i32 - header, "MSS before the move");
    let (img, mut s2) = move_in_place(server);
    assert_eq!(send_mss(&s2), before, "image MSS {}", img.options.mss);
    // And it carries a segment of that size to the peer.
    let big = vec![7u8; 256 * 1024];
    s2.write_all(&big).unwrap();
    let mut got = vec![0u8; big.len()];
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, big);
}

#[test]
fn ipv4_mss_round_trip() {
    in_private_netns(|| mss_round_trip("127.0.0.1:0", 1500));
    in_private_netns(|| mss_round_trip("127.0.0.1:0", 9000));
}

#[test]
fn ipv6_mss_round_trip() {
    in_private_netns(|| mss_round_trip("[::1]:0", 1500));
    in_private_netns(|| mss_round_trip("[::1]:0", 9000));
}
