//! Unit tests of the flow lock: set keys by family, the element count of
//! an nft listing, lease bounds.

use super::*;

fn flow(local: &str, peer: &str) -> Flow {
    Flow {
        local: local.parse().unwrap(),
        peer: peer.parse().unwrap(),
    }
}

#[test]
fn keys_are_register_aligned() {
    let f = flow("10.0.0.2:80", "10.0.0.1:40000");
    assert_eq!(
        f.key(),
        [10, 0, 0, 1, 0x9c, 0x40, 0, 0, 10, 0, 0, 2, 0, 80, 0, 0]
    );
    assert_eq!(f.set(), LockSet::V4);
    let f6 = flow("[fd00::2]:443", "[fd00::1]:1");
    assert_eq!(f6.key().len(), KEY_BYTES_V6);
    assert_eq!(f6.set(), LockSet::V6);
}

#[test]
fn mapped_flows_are_keyed_by_their_wire_family() {
    // A dual-stack socket's IPv4 connection: its packets are IPv4.
    let mapped = flow("[::ffff:10.0.0.2]:80", "[::ffff:10.0.0.1]:40000");
    let plain = flow("10.0.0.2:80", "10.0.0.1:40000");
    assert_eq!(mapped.wire(), plain);
    assert_eq!(mapped.set(), LockSet::V4);
    assert_eq!(mapped.key(), plain.key());
    assert_eq!(mapped.element(), "10.0.0.1 . 40000 . 10.0.0.2 . 80");
    // The flow itself keeps the addresses as the application reads them.
    assert_eq!(
        mapped.to_string(),
        "[::ffff:10.0.0.2]:80 -> [::ffff:10.0.0.1]:40000"
    );
}

#[test]
fn nft_json_elements_are_counted_per_lock_set() {
    let listing = br#"{"nftables": [{"metainfo": {"json_schema_version": 1}},
            {"table": {"family": "inet", "name": "tcpr", "handle": 1}},
            {"set": {"family": "inet", "name": "flows4", "table": "tcpr",
              "elem": [{"elem": {"val": {"concat": ["10.0.0.1", 1, "10.0.0.2", 2]}, "timeout": 60}},
                       {"elem": {"val": {"concat": ["10.0.0.3", 1, "10.0.0.2", 2]}, "timeout": 60}}]}},
            {"set": {"family": "inet", "name": "flows6", "table": "tcpr"}},
            {"set": {"family": "inet", "name": "other", "table": "tcpr", "elem": [1, 2, 3]}}]}"#;
    assert_eq!(count_elements(listing).unwrap(), 2);
    // Released flows (also in `unlocked`) and the mode probe are not locked.
    let released = br#"{"nftables": [
            {"set": {"name": "flows4", "elem": [
              {"elem": {"val": {"concat": ["10.0.0.1", 1, "10.0.0.2", 2]}, "timeout": 60}},
              {"elem": {"val": {"concat": ["10.0.0.3", 1, "10.0.0.2", 2]}, "timeout": 60}},
              {"elem": {"val": {"concat": ["0.0.0.0", 0, "0.0.0.0", 0]}, "timeout": 1}}]}},
            {"set": {"name": "unlocked4", "elem": [
              {"elem": {"val": {"concat": ["10.0.0.1", 1, "10.0.0.2", 2]}, "timeout": 1}}]}}]}"#;
    assert_eq!(count_elements(released).unwrap(), 1);
    assert!(count_elements(b"{}").is_err());
    assert!(count_elements(b"not json").is_err());
}

#[test]
fn leases_outside_the_bounds_are_refused() {
    for lease in [Duration::ZERO, MAX_LEASE + Duration::from_secs(1)] {
        let err = FlowLock::acquire(&[], Netns::current(), lease).unwrap_err();
        assert!(matches!(err, Error::LeaseOutOfRange { .. }), "{err}");
    }
}

/// A lock of `flows` that no kernel holds: kept, so that no drop releases it.
fn unheld(flows: Vec<Flow>) -> FlowLock {
    FlowLock {
        flows,
        ns: Netns::current(),
        released: false,
    }
}

#[test]
fn a_lock_splits_into_one_per_flow_in_order_or_by_a_set_of_flows() {
    let fs: Vec<Flow> = (1..=5)
        .map(|i| flow("10.0.0.2:80", &format!("10.0.0.1:{}", 40000 + i)))
        .collect();
    let each = unheld(fs.clone()).into_each();
    assert_eq!(
        each.iter().map(|l| l.flows().to_vec()).collect::<Vec<_>>(),
        fs.iter().map(|f| vec![*f]).collect::<Vec<_>>()
    );
    each.into_iter().for_each(FlowLock::keep);

    let mut all = unheld(fs.clone());
    let wanted: std::collections::HashSet<Flow> = [fs[1], fs[3]].into();
    let out = all.split_off_set(&wanted).expect("two of its flows");
    assert_eq!(out.flows(), &[fs[1], fs[3]]);
    assert_eq!(all.flows(), &[fs[0], fs[2], fs[4]]);
    assert!(all.split_off_set(&wanted).is_none(), "split off already");
    out.keep();
    all.keep();
}
