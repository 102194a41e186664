//! The flow lock on the real kernel, each test in a network namespace of
//! its own thread: elements added over netlink must be the ones `nft`
//! itself would write (checked against its own listing), must drop the
//! flow's packets, and must be gone when a release returns.
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;
use tcpr_engine::{lock::locked_flow_count, Flow, FlowLock, Netns};

fn nft_list(set: &str) -> String {
    let out = Command::new("nft")
        .args(["list", "set", "inet", "tcpr", set])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn flow(local: &str, peer: &str) -> Flow {
    Flow {
        local: local.parse().unwrap(),
        peer: peer.parse().unwrap(),
    }
}

#[test]
fn netlink_elements_match_what_nft_lists() {
    in_private_netns(|| {
        // The first lock in a namespace installs the table (through nft).
        let first = FlowLock::acquire(
            &[flow("10.1.1.1:1", "10.1.1.2:2")],
            Netns::current(),
            Duration::from_secs(60),
        )
        .unwrap();
        // These go over netlink.
        let v4 = flow("192.0.2.10:8080", "198.51.100.7:40123");
        let v6 = flow("[2001:db8::10]:443", "[2001:db8:ffff::7]:51000");
        let lock = FlowLock::acquire(&[v4, v6], Netns::current(), Duration::from_secs(90)).unwrap();
        assert_eq!(locked_flow_count().unwrap(), 3);
        let l4 = nft_list("flows4");
        assert!(
            l4.contains("198.51.100.7 . 40123 . 192.0.2.10 . 8080 timeout 1m30s"),
            "{l4}"
        );
        let l6 = nft_list("flows6");
        assert!(
            l6.contains("2001:db8:ffff::7 . 51000 . 2001:db8::10 . 443 timeout 1m30s"),
            "{l6}"
        );
        lock.release().unwrap();
        assert_eq!(locked_flow_count().unwrap(), 1);
        // Locked again at once after a release (as a retried move does):
        // the element is renewed, not left to its 1 ms expiry.
        let again = FlowLock::acquire(&[v4], Netns::current(), Duration::from_secs(90)).unwrap();
        // Not a wait: outlasts the released element's 1 ms expiry, to show
        // the element was renewed.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(locked_flow_count().unwrap(), 2, "{}", nft_list("flows4"));
        again.release().unwrap();
        assert_eq!(locked_flow_count().unwrap(), 1);
        // Released at once (its element in `flows4` may take a jiffy to expire).
        for f in [v4, v6] {
            assert!(!tcpr_engine::lock::is_locked(&Netns::current(), &f).unwrap());
        }
        first.release().unwrap();
        assert_eq!(locked_flow_count().unwrap(), 0);
        // Releasing what is no longer locked is not an error.
        tcpr_engine::lock::release_flows(&Netns::current(), &[v4, v6]).unwrap();
    });
}

#[test]
fn netlink_lock_drops_the_flow_and_release_lets_it_through() {
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let l = TcpListener::bind(addr).unwrap();
            let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            let f = Flow {
                local: s.local_addr().unwrap(),
                peer: s.peer_addr().unwrap(),
            };
            // Make sure the table exists, so this lock takes the fast path.
            FlowLock::acquire(&[f], Netns::current(), Duration::from_secs(60))
                .unwrap()
                .release()
                .unwrap();
            let lock = FlowLock::acquire(&[f], Netns::current(), Duration::from_secs(60)).unwrap();
            c.write_all(b"held").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut buf = [0u8; 4];
            let e = s.read(&mut buf).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "locked: {e}");
            lock.release().unwrap();
            // The client retransmits; the bytes now arrive.
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"held");
        }
    });
}

#[test]
fn prepare_installs_the_table_once() {
    in_private_netns(|| {
        let listed = || {
            Command::new("nft")
                .args(["list", "table", "inet", "tcpr"])
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(!listed(), "no table in a fresh namespace");
        tcpr_engine::lock::prepare().unwrap();
        assert!(listed());
        // Idempotent, and it leaves existing locks alone.
        let f = flow("10.2.2.1:80", "10.2.2.2:5000");
        let lock = FlowLock::acquire(&[f], Netns::current(), Duration::from_secs(60)).unwrap();
        tcpr_engine::lock::prepare().unwrap();
        assert_eq!(locked_flow_count().unwrap(), 1);
        lock.release().unwrap();
    });
}

#[test]
fn moved_release_expires_within_milliseconds() {
    in_private_netns(|| {
        tcpr_engine::lock::prepare().unwrap();
        let f = flow("10.3.3.1:80", "10.3.3.2:6000");
        // The first release in a process learns whether expiry updates work.
        FlowLock::acquire(&[f], Netns::current(), Duration::from_secs(60))
            .unwrap()
            .release()
            .unwrap();
        let lock = FlowLock::acquire(&[f], Netns::current(), Duration::from_secs(60)).unwrap();
        FlowLock::release_moved(vec![lock]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_millis(200);
        while locked_flow_count().unwrap() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the element never expired"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    });
}
