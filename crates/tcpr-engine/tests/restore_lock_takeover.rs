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
