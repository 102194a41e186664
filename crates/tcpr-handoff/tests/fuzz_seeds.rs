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

/// Runs one regression input of `target`'s seeds.
fn run_regression(target: &str, name: &str, run: fn(&[u8])) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target)
        .join(format!("regression-{name}.bin"));
    run(&std::fs::read(&path).unwrap());
}

#[test]
fn ready_naming_a_stranger_left_a_refused_connection_frozen() {
    run_regression(
        "sender_reads",
        "ready-naming-a-stranger-left-a-refused-connection-frozen",
        tcpr_handoff::fuzzing::sender_reads,
    );
}

#[test]
fn committed_naming_a_stranger_thawed_a_moved_connection() {
    run_regression(
        "sender_reads",
        "committed-naming-a-stranger-thawed-a-moved-connection",
        tcpr_handoff::fuzzing::sender_reads,
    );
}

mod sender_machine {
    use std::time::{Duration, Instant};
    use tcpr_handoff::machine::{Fate, Framing, Msg, Sender, SenderAction, SwitchOutcome};

    /// A sender of connections 0 and 1 whose images are dumped and sent.
    fn prepared(now: Instant) -> Sender {
        let mut s = Sender::new(
            1,
            vec![0, 1],
            Duration::from_secs(5),
            Framing::default(),
            now,
        );
        while let Some(a) = s.poll_action() {
            if let SenderAction::Dump(id) = a {
                s.handle_dumped(id, Ok(10), now);
            }
        }
        s
    }

    fn actions(s: &mut Sender) -> Vec<SenderAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    /// A READY that refuses 0 and then names a stranger is a protocol
    /// error: everything rolls back, 0 included (it was left out of the
    /// Thaw: frozen until the driver's last resort).
    #[test]
    fn a_ready_naming_a_stranger_thaws_every_connection() {
        let now = Instant::now();
        let mut s = prepared(now);
        s.handle_message(Msg::Ready(vec![(0, Err("no".into())), (7, Ok(()))]), now);
        let thawed: Vec<u32> = actions(&mut s)
            .into_iter()
            .filter_map(|a| match a {
                SenderAction::Thaw(ids) => Some(ids),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(thawed, [0, 1]);
    }

    /// A COMMITTED that names 0 and then a stranger: 0 moved (the agent
    /// said so) and must be discarded here, never left for a thaw.
    #[test]
    fn a_committed_naming_a_stranger_discards_what_moved() {
        let now = Instant::now();
        let mut s = prepared(now);
        s.handle_message(Msg::Ready(vec![(0, Ok(())), (1, Ok(()))]), now);
        assert!(actions(&mut s).contains(&SenderAction::Switch(vec![0, 1])));
        s.handle_switched(
            SwitchOutcome::Switched {
                moved_address: None,
            },
            now,
        );
        s.handle_message(Msg::Committed(vec![(0, Ok(())), (7, Ok(()))]), now);
        assert_eq!(actions(&mut s), [SenderAction::Query]);
        s.handle_status(Ok(tcpr_handoff::machine::BatchStatus::Committed(vec![
            0, 1,
        ])));
        assert_eq!(actions(&mut s), [SenderAction::Discard(vec![0, 1])]);
        assert!(s.fates().values().all(|f| *f == Fate::Moved));
    }
}
