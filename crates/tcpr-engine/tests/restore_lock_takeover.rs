//! The library path of a restore in the namespace that holds the flow's
//! lock (what an agent or an upgraded process does): `resume` releases the
//! element, so the flow carries on at once instead of after the lease.
mod common;
use common::*;
use std::io::{Read, Write};
use tcpr_engine::{freeze, restore, FreezeOptions};

#[test]
fn resume_takes_over_a_lock_held_in_its_namespace() {
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (mut client, server) = pair(addr);
            // The default lease: 60 s, far beyond anything this test waits for.
            let frozen = freeze(server.into(), &FreezeOptions::default()).unwrap();
            let img = frozen.dump().unwrap();
            assert_eq!(tcpr_engine::lock::locked_flow_count().unwrap(), 1);
            // The original goes; its lock stays for its lease.
            frozen.discard().unwrap().expect("locked").keep();
            // Sent while the flow is locked: dropped, retransmitted later.
            client.write_all(b"sent during the move").unwrap();
            let mut s2 = restore(&img).unwrap().resume().unwrap();
            assert_eq!(
                tcpr_engine::lock::locked_flow_count().unwrap(),
                0,
                "{addr}: resume released the lock"
            );
            let mut got = [0u8; 20];
            s2.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"sent during the move");
            s2.write_all(b"answer").unwrap();
            let mut got = [0u8; 6];
            client.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"answer");
        }
    });
}

/// The same with the peer's FIN to replay: the lock is released before
/// the forged FIN is delivered (the lock's prerouting rule would drop it).
#[test]
fn resume_takes_over_the_lock_before_replaying_the_peers_fin() {
    in_private_netns(|| {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (mut client, server) = pair(addr);
            client.write_all(b"request").unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            use std::os::fd::AsFd;
            while tcpr_engine::inspect_socket(server.as_fd()).unwrap().1
                != tcpr_image::TcpState::CloseWait.kernel_number()
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{addr}: no CLOSE_WAIT"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let frozen = freeze(server.into(), &FreezeOptions::default()).unwrap();
            let img = frozen.dump().unwrap();
            frozen.discard().unwrap().expect("locked").keep();
            let mut s2 = restore(&img)
                .unwrap()
                .resume()
                .unwrap_or_else(|e| panic!("{addr}: {e}"));
            assert_eq!(tcpr_engine::lock::locked_flow_count().unwrap(), 0);
            let mut got = Vec::new();
            s2.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"request", "{addr}: the request, then EOF");
            s2.write_all(b"response").unwrap();
            s2.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"response");
        }
    });
}

/// Resume may run on a thread outside the socket's namespace (a caller
/// that restores inside a host's namespace and resumes from its own): the
/// lock taken over is the one of the socket's namespace.
#[test]
fn resume_from_another_namespace_takes_over_the_sockets_own_lock() {
    use std::sync::mpsc;
    in_private_netns(|| {
        let (to_main, from_host) = mpsc::channel();
        let (ask, asked) = mpsc::channel::<()>();
        let (answer, answered) = mpsc::channel();
        let host = std::thread::spawn(move || {
            private_netns();
            let (client, server) = pair("127.0.0.1:0");
            let frozen = freeze(server.into(), &FreezeOptions::default()).unwrap();
            let img = frozen.dump().unwrap();
            frozen.discard().unwrap().expect("locked").keep();
            to_main.send((client, restore(&img).unwrap())).unwrap();
            asked.recv().unwrap();
            answer
                .send(tcpr_engine::lock::locked_flow_count().unwrap())
                .unwrap();
        });
        let (mut client, restored) = from_host.recv().unwrap();
        // This thread's namespace has no lock table at all.
        let mut s2 = restored.resume().unwrap();
        ask.send(()).unwrap();
        assert_eq!(
            answered.recv().unwrap(),
            0,
            "resume released the lock of the socket's namespace"
        );
        host.join().unwrap();
        client.write_all(b"after").unwrap();
        let mut got = [0u8; 5];
        s2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"after");
        s2.write_all(b"answer").unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"answer");
    });
}
