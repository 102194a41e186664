//! The flow lock on a kernel without DESTROYSETELEM or element expiry
//! updates (simulated with `TCPR_LOCK_LEGACY`, read once per process, so
//! this file holds one test): locks and releases delete elements, no
//! `unlocked` element is used, and a release still takes effect when it
//! returns.
mod common;
mod lock_peer;
use common::*;
use lock_peer::PyPair;
use std::process::Command;
use std::time::Duration;
use tcpr_engine::{lock, FlowLock, Netns};

fn nft(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn without_destroy_or_expiry_updates_releases_delete() {
    // Before any lock call of this process.
    std::env::set_var(lock::LEGACY_ENV, "1");
    in_private_netns(|| {
        lock::prepare().unwrap();
        let baseline = nft(&["list", "ruleset"]);
        let mut p = PyPair::new(false);
        let l = FlowLock::acquire(&[p.flow], Netns::current(), Duration::from_secs(60)).unwrap();
        p.dropped_both_ways("held");
        l.release().unwrap();
        // Deleted, not shadowed: both sets are as before, at once.
        assert_eq!(nft(&["list", "ruleset"]), baseline);
        p.delivers_late("held");
        let l = FlowLock::acquire(&[p.flow], Netns::current(), Duration::from_secs(60)).unwrap();
        FlowLock::release_moved(vec![l]).unwrap();
        p.passes_at_once("after");
        assert_eq!(nft(&["list", "ruleset"]), baseline);
    });
}
