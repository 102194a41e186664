//! sock_diag listing on the real kernel: what `diag::list` reports for
//! connections this test made, on IPv4 and IPv6.
mod common;
use common::*;
use std::io::Write;
use std::net::TcpListener;
use tcpr_engine::diag;
use tcpr_image::TcpState;

#[test]
fn lists_our_connections_with_state_queue_and_owner() {
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let listener = TcpListener::bind(addr).unwrap();
            let (mut client, server) = pair(addr);
            // Bytes the server has not read: its receive queue.
            client.write_all(b"twelve bytes").unwrap();
            let local = server.local_addr().unwrap();
            let peer = server.peer_addr().unwrap();
            let entries = poll_list(|all| {
                all.iter()
                    .any(|e| e.local == local && e.peer == peer && e.recv_queue == 12)
            });
            let ours = entries
                .iter()
                .find(|e| e.local == local && e.peer == peer)
                .unwrap();
            assert_eq!(ours.state_name(), "ESTABLISHED");
            assert_eq!(
                TcpState::from_kernel_number(ours.state),
                Some(TcpState::Established)
            );
            assert_eq!(ours.send_queue, 0);
            assert!(ours.dumpable().is_ok(), "held by this process");
            assert!(
                entries.iter().any(|e| e.local == peer && e.peer == local),
                "the client end is listed too"
            );
            let l = listener.local_addr().unwrap();
            let listening = entries.iter().find(|e| e.local == l).unwrap();
            assert_eq!(listening.state_name(), "LISTEN");
            assert!(listening.dumpable().is_err());
        }
    });
}

/// Lists the sockets this process holds until `ready` says the kernel has
/// caught up (the bytes written have arrived).
fn poll_list(ready: impl Fn(&[diag::SocketEntry]) -> bool) -> Vec<diag::SocketEntry> {
    let pid = std::process::id() as i32;
    for _ in 0..1000 {
        let all = diag::list(Some(pid)).unwrap();
        if ready(&all) {
            return all;
        }
        std::thread::yield_now();
    }
    panic!("sock_diag never showed the expected state");
}
