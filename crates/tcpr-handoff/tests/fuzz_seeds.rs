//! Every seed of every handoff fuzz target (and every regression input
//! kept beside them, named after what it broke) runs through the same
//! entry point as its target, on stable Rust: `fuzz/README.md`.

use std::path::Path;

fn run_seeds(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&bytes));
        assert!(outcome.is_ok(), "{} broke {target}", path.display());
        seeds += 1;
    }
    assert!(seeds >= 5, "{target}: {seeds} seeds in {}", dir.display());
}

#[test]
fn agent_reads_seeds() {
    run_seeds("agent_reads", tcpr_handoff::fuzzing::agent_reads);
}

#[test]
fn sender_reads_seeds() {
    run_seeds("sender_reads", tcpr_handoff::fuzzing::sender_reads);
}

#[test]
fn psk_exchange_seeds() {
    run_seeds("psk_exchange", tcpr_handoff::fuzzing::psk_exchange);
}

#[test]
fn unix_delivery_seeds() {
    run_seeds("unix_delivery", tcpr_handoff::fuzzing::unix_delivery);
}
