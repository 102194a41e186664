//! Dual-stack sockets on the real kernel: a server listening on `[::]`
//! gets an AF_INET6 socket with IPv4-mapped addresses for an IPv4 client,
//! but its packets are IPv4 on the wire. The lock must key such a flow by
//! its wire family, or a frozen-then-closed socket's peer draws a RST.
mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};
use tcpr_engine::{freeze, lock::locked_flow_count, FreezeOptions};

/// A dual-stack listener on `[::]` and an IPv4 client of it.
fn mapped_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("[::]:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

fn nft_list(set: &str) -> String {
    let out = Command::new("nft")
        .args(["list", "set", "inet", "tcpr", set])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ss` on the client's own connection (local port `port`).
fn client_ss(port: u16) -> String {
    let out = Command::new("ss")
        .args(["-Htni", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_mapped_flow_is_locked_as_ipv4() {
    in_private_netns(|| {
        let (c, s) = mapped_pair();
        let local = s.local_addr().unwrap();
        assert!(
            local.to_string().starts_with("[::ffff:127.0.0.1]"),
            "a dual-stack socket reads mapped addresses: {local}"
        );
        let frozen = freeze(s.into(), &FreezeOptions::default()).unwrap();
        assert_eq!(locked_flow_count().unwrap(), 1);
        let element = format!(
            "127.0.0.1 . {} . 127.0.0.1 . {}",
            c.local_addr().unwrap().port(),
            local.port()
        );
        let v4 = nft_list("flows4");
        assert!(v4.contains(&element), "the IPv4 set holds {element}: {v4}");
        assert!(
            !nft_list("flows6").contains("ffff"),
            "nothing mapped in the IPv6 set"
        );
        // The flow keeps the addresses as the application reads them.
        assert_eq!(frozen.flow().local, local);
        drop(frozen.thaw().unwrap());
        assert_eq!(locked_flow_count().unwrap(), 0);
    });
}

#[test]
fn a_discarded_mapped_flow_draws_no_rst() {
    in_private_netns(|| {
        let (mut c, s) = mapped_pair();
        let frozen = freeze(s.into(), &FreezeOptions::default()).unwrap();
        // The connection vanishes here without FIN or RST, as after a move;
        // only the lock keeps the client's next segment from meeting no
        // socket (which the kernel answers with a RST).
        let lock = frozen.discard().unwrap();
        c.write_all(b"after the move").unwrap();
        c.set_nonblocking(true).unwrap();
        let port = c.local_addr().unwrap().port();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut buf = [0u8; 16];
            match c.read(&mut buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    panic!("the client was reset: the lock did not hold the mapped flow")
                }
                other => panic!("unexpected read: {other:?}"),
            }
            // The segment went out and was dropped: the client retransmits.
            let seen = client_ss(port);
            if seen.contains("retrans:") {
                break;
            }
            assert!(Instant::now() < deadline, "no retransmission seen: {seen}");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(lock);
    });
}
