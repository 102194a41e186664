//! Batches one after another on one channel: when both ends may keep the
//! channel for the next batch, and that nothing of a batch is left on it
//! when they do.
// The simulation's clock starts from a real instant; the machines do not read it.
#![allow(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::*;

const TIMEOUT: Duration = Duration::from_secs(2);

/// One ordered channel between a sender and an agent, kept across batches.
#[derive(Default)]
struct Channel {
    to_agent: VecDeque<Msg>,
    to_sender: VecDeque<Msg>,
}

/// How the agent's driver answers in [`Channel::exchange`].
#[derive(Clone, Copy)]
struct AgentScript<'a> {
    /// Refused at restore.
    refuse: &'a [ConnId],
    /// The take-over after COMMIT fails.
    take_over_fails: bool,
}

impl Channel {
    /// Runs one batch over the channel until both ends are done (or
    /// nothing moves any more). The clock does not move.
    fn exchange(&mut self, s: &mut Sender, a: &mut Agent, script: AgentScript<'_>, now: Instant) {
        for _ in 0..10_000 {
            let mut progressed = false;
            while let Some(act) = s.poll_action() {
                progressed = true;
                match act {
                    SenderAction::Dump(id) => s.handle_dumped(id, Ok(500), now),
                    SenderAction::Switch(_) => s.handle_switched(
                        SwitchOutcome::Switched {
                            moved_address: None,
                        },
                        now,
                    ),
                    SenderAction::Query => panic!("no Query on a healthy channel"),
                    SenderAction::Unswitch
                    | SenderAction::Thaw(_)
                    | SenderAction::Discard(_)
                    | SenderAction::Hold(_) => {}
                }
            }
            self.to_agent
                .extend(std::iter::from_fn(|| s.poll_transmit()));
            while let Some(act) = a.poll_action() {
                progressed = true;
                match act {
                    AgentAction::Restore(ids) => a.handle_restored(
                        ids.into_iter()
                            .map(|i| {
                                if script.refuse.contains(&i) {
                                    (i, Err("not allowed".to_string()))
                                } else {
                                    (i, Ok(()))
                                }
                            })
                            .collect(),
                    ),
                    AgentAction::Resume(ids) if script.take_over_fails => {
                        a.handle_commit_refused(ids, "the address cannot be taken".into())
                    }
                    AgentAction::Resume(ids) => {
                        a.handle_resumed(ids.into_iter().map(|i| (i, Ok(()))).collect())
                    }
                    AgentAction::Discard(_) => {}
                }
            }
            self.to_sender
                .extend(std::iter::from_fn(|| a.poll_transmit()));
            if let Some(m) = self.to_agent.pop_front() {
                progressed = true;
                a.handle_message(m, now);
            } else if let Some(m) = self.to_sender.pop_front() {
                progressed = true;
                s.handle_message(m, now);
            }
            if !progressed {
                return;
            }
        }
        panic!("the batch never settled");
    }

    fn is_empty(&self) -> bool {
        self.to_agent.is_empty() && self.to_sender.is_empty()
    }
}

fn batch(id: u64, n: u32, now: Instant) -> (Sender, Agent) {
    (
        Sender::new(id, (0..n).collect(), TIMEOUT, Framing::default(), now),
        Agent::new(TIMEOUT, now),
    )
}

const EVERYTHING_WORKS: AgentScript<'static> = AgentScript {
    refuse: &[],
    take_over_fails: false,
};

#[test]
fn a_channel_carries_batches_one_after_another() {
    let now = Instant::now();
    let mut ch = Channel::default();
    for id in 1..=3 {
        let (mut s, mut a) = batch(id, 3, now);
        ch.exchange(&mut s, &mut a, EVERYTHING_WORKS, now);
        assert!(s.is_done() && a.is_done(), "batch {id} settled");
        assert!(
            s.fates().values().all(|f| *f == Fate::Moved),
            "batch {id}: {:?}",
            s.fates()
        );
        assert!(s.channel_reusable() && a.channel_reusable(), "batch {id}");
        assert!(
            ch.is_empty(),
            "nothing of batch {id} is left on the channel"
        );
    }
}

#[test]
fn a_batch_refused_whole_leaves_the_channel_clean() {
    let now = Instant::now();
    let mut ch = Channel::default();
    let (mut s, mut a) = batch(1, 2, now);
    let refuse_all = AgentScript {
        refuse: &[0, 1],
        take_over_fails: false,
    };
    ch.exchange(&mut s, &mut a, refuse_all, now);
    assert!(s.fates().values().all(|f| matches!(f, Fate::RolledBack(_))));
    // Our ABORT ("nothing to commit") is answered with nothing.
    assert!(s.channel_reusable() && a.channel_reusable());
    assert!(ch.is_empty());
    let (mut s, mut a) = batch(2, 2, now);
    ch.exchange(&mut s, &mut a, EVERYTHING_WORKS, now);
    assert!(s.fates().values().all(|f| *f == Fate::Moved));
}

#[test]
fn a_refused_commit_leaves_the_channel_clean() {
    let now = Instant::now();
    let mut ch = Channel::default();
    let (mut s, mut a) = batch(1, 2, now);
    let refuse_commit = AgentScript {
        refuse: &[],
        take_over_fails: true,
    };
    ch.exchange(&mut s, &mut a, refuse_commit, now);
    assert!(s.fates().values().all(|f| matches!(f, Fate::RolledBack(_))));
    assert!(s.channel_reusable() && a.channel_reusable());
    assert!(ch.is_empty());
}

/// The agent answered an ABORT with an ABORT before: on a channel kept
/// for the next batch, that answer would be read as that batch's first
/// message.
#[test]
fn the_agent_answers_an_abort_with_nothing() {
    let now = Instant::now();
    let mut a = Agent::new(TIMEOUT, now);
    a.handle_message(Msg::Hello { batch: 1, total: 1 }, now);
    a.handle_message(Msg::Prepare(vec![0]), now);
    assert_eq!(a.poll_action(), Some(AgentAction::Restore(vec![0])));
    a.handle_restored(vec![(0, Ok(()))]);
    assert!(matches!(a.poll_transmit(), Some(Msg::Ready(_))));
    a.handle_message(Msg::Abort("switch failed".into()), now);
    assert_eq!(a.poll_action(), Some(AgentAction::Discard(vec![0])));
    assert_eq!(a.poll_transmit(), None);
    assert!(a.is_done() && a.channel_reusable());
}

/// Ends where a message of the batch may still travel, or where one end
/// gave the channel up: neither end keeps it.
#[test]
fn timeouts_and_protocol_errors_close_the_channel() {
    let now = Instant::now();
    let later = now + TIMEOUT * 2;

    // The agent gives up waiting for COMMIT.
    let mut a = Agent::new(TIMEOUT, now);
    a.handle_message(Msg::Hello { batch: 1, total: 1 }, now);
    a.handle_timeout(later);
    assert!(a.is_done() && !a.channel_reusable());

    // The agent refuses a PREPARE (and says so with an ABORT).
    let mut a = Agent::new(TIMEOUT, now);
    a.handle_message(Msg::Hello { batch: 1, total: 1 }, now);
    a.handle_message(Msg::Prepare(vec![0, 0]), now);
    assert!(a.is_done() && !a.channel_reusable());

    // The sender gives up waiting for READY: the READY may be on its way.
    let mut s = Sender::new(1, vec![0], TIMEOUT, Framing::default(), now);
    assert_eq!(s.poll_action(), Some(SenderAction::Dump(0)));
    s.handle_dumped(0, Ok(100), now);
    s.handle_timeout(later);
    assert!(s.is_done() && !s.channel_reusable());

    // The link breaks after COMMIT: a Query on a new channel decides.
    let mut s = Sender::new(1, vec![0], TIMEOUT, Framing::default(), now);
    assert_eq!(s.poll_action(), Some(SenderAction::Dump(0)));
    s.handle_dumped(0, Ok(100), now);
    while s.poll_transmit().is_some() {}
    s.handle_message(Msg::Ready(vec![(0, Ok(()))]), now);
    assert_eq!(s.poll_action(), Some(SenderAction::Switch(vec![0])));
    let switched = SwitchOutcome::Switched {
        moved_address: None,
    };
    s.handle_switched(switched, now);
    assert!(matches!(s.poll_transmit(), Some(Msg::Commit { .. })));
    s.handle_link_lost(now);
    assert_eq!(s.poll_action(), Some(SenderAction::Query));
    s.handle_status(Ok(BatchStatus::Committed(vec![0])));
    assert!(s.is_done() && !s.channel_reusable());
}
