//! Relocking one flow again and again while a large lock set is in use,
//! on the real kernel: every lock must be taken. A released flow's lock
//! element expires but stays in the set's hash table until the set's
//! garbage collector frees it, and the collector gives up whenever a
//! transaction commits meanwhile (here: every few ms, as under a
//! balancer's load), so the flow's expired copies pile up in one bucket;
//! from the 16th on, an insert during the table's rehash (long, for a
//! large set) is answered EBUSY. The lock tries such a transaction again
//! (`nfnl::retry_busy`) instead of failing the handoff.
mod common;
use common::*;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tcpr_engine::{lock, Flow, FlowLock, Netns};

/// Other flows locked meanwhile: enough that a rehash of the set's
/// table takes milliseconds.
const OTHERS: u32 = 100_000;

/// Relocks of the same flow: several times the 16 entries a bucket takes
/// before the table is rehashed.
const RELOCKS: u32 = 120;

/// A flow from client `client` (an index) to the front's VIP.
fn flow(client: u32) -> Flow {
    let port = 1024 + (client % 60_000) as u16;
    let ip = Ipv4Addr::from(0x0a50_0000 | (client / 60_000));
    Flow {
        local: "10.79.0.100:82".parse().unwrap(),
        peer: SocketAddr::new(ip.into(), port),
    }
}

#[test]
fn a_flow_relocked_many_times_in_a_large_set_is_locked_each_time() {
    in_private_netns(|| {
        lock::prepare().unwrap();
        let others: Vec<Flow> = (0..OTHERS).map(flow).collect();
        let held = FlowLock::acquire(&others, Netns::current(), Duration::from_secs(600)).unwrap();
        let again = Flow {
            peer: "10.81.0.1:61036".parse().unwrap(),
            ..flow(0)
        };
        let mut refused = Vec::new();
        for i in 0..RELOCKS {
            match FlowLock::acquire(&[again], Netns::current(), Duration::from_secs(60)) {
                Ok(l) => {
                    assert!(lock::is_locked(&Netns::current(), &again).unwrap());
                    // Its element expires within a jiffy or two.
                    FlowLock::release_moved(vec![l]).unwrap();
                }
                Err(e) => refused.push(format!("relock {i}: {e}")),
            }
            // Past the released element's expiry: the next lock adds a
            // new copy rather than updating this one.
            std::thread::sleep(Duration::from_millis(5));
        }
        held.release().unwrap();
        assert!(refused.is_empty(), "{}", refused.join("\n"));
        assert!(!lock::is_locked(&Netns::current(), &again).unwrap());
    });
}
