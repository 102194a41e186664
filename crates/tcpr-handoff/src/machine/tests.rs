//! Both machines against each other over a simulated ordered link, with a
//! fault injected at every step: every connection must end live at exactly
//! one end (or, only when the agent is unreachable after COMMIT, held
//! frozen at the source and never duplicated).

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// The link breaks (both ends see it); the agent stays reachable for Query.
    LinkCut,
    /// The link breaks and the agent cannot be reached at all.
    Partition,
    /// The agent process dies (SIGKILL): restored sockets vanish, delivered
    /// ones live on in their programs; Query is refused.
    AgentCrash,
    /// Nothing more arrives; both ends' timers fire.
    Stall,
    /// The traffic switch fails.
    SwitchFails,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Frozen,
    Live,
    Gone,
    Held,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dst {
    None,
    Restored,
    Live,
    Gone,
}

struct World {
    src: Vec<Src>,
    dst: Vec<Dst>,
    switched: bool,
}

/// Runs one batch of `n` connections (ids in `refuse` are refused by the
/// agent at restore) with `fault` at step `at`. Returns the world and the
/// sender's fates.
fn run(n: u32, refuse: &[u32], fault: Fault, at: usize) -> (World, BTreeMap<ConnId, Fate>) {
    let t0 = Instant::now();
    let timeout = Duration::from_secs(2);
    let ids: Vec<ConnId> = (0..n).collect();
    let mut s = Sender::new(7, ids, timeout, t0);
    let mut a = Agent::new(timeout, t0);
    let mut w = World {
        src: vec![Src::Frozen; n as usize],
        dst: vec![Dst::None; n as usize],
        switched: false,
    };
    let mut s2a: VecDeque<Msg> = VecDeque::new();
    let mut a2s: VecDeque<Msg> = VecDeque::new();
    let mut link = true;
    let mut agent_alive = true;
    let mut reachable = true;
    let mut stalled = false;
    let mut now = t0;
    for step in 0..10_000usize {
        if step == at && fault != Fault::None && fault != Fault::SwitchFails {
            match fault {
                Fault::LinkCut | Fault::Partition | Fault::AgentCrash if link => {
                    link = false;
                    s2a.clear();
                    a2s.clear();
                    s.handle_link_lost(now);
                    if fault == Fault::AgentCrash {
                        agent_alive = false;
                        for d in w.dst.iter_mut() {
                            if *d == Dst::Restored {
                                *d = Dst::Gone;
                            }
                        }
                    } else {
                        a.handle_link_lost();
                    }
                    reachable = fault == Fault::LinkCut;
                }
                Fault::Stall => stalled = true,
                _ => {}
            }
        }
        let mut progressed = false;
        while let Some(m) = s.poll_transmit() {
            if link {
                s2a.push_back(m);
            }
        }
        while let Some(act) = s.poll_action() {
            progressed = true;
            match act {
                SenderAction::Switch(_) => {
                    let fail = fault == Fault::SwitchFails;
                    w.switched = !fail;
                    s.handle_switched(if fail { Err("no".into()) } else { Ok(()) }, now);
                }
                SenderAction::Unswitch => w.switched = false,
                SenderAction::Thaw(ids) => ids.iter().for_each(|&i| {
                    assert_eq!(
                        w.src[i as usize],
                        Src::Frozen,
                        "thaw of a non-frozen connection"
                    );
                    w.src[i as usize] = Src::Live
                }),
                SenderAction::Discard(ids) => ids.iter().for_each(|&i| {
                    assert_eq!(w.src[i as usize], Src::Frozen);
                    w.src[i as usize] = Src::Gone
                }),
                SenderAction::Hold(ids) => ids.iter().for_each(|&i| w.src[i as usize] = Src::Held),
                SenderAction::Query => {
                    let status = if !agent_alive {
                        // A restarted agent answers from its journal: its
                        // `commit` line is written as the resumes begin, so
                        // the batch committed with what it delivered, or
                        // (only `prepared`) nothing was resumed and the
                        // restored sockets died silently with the process.
                        let live: Vec<ConnId> =
                            (0..n).filter(|&i| w.dst[i as usize] == Dst::Live).collect();
                        Ok(if live.is_empty() {
                            BatchStatus::NotResumed
                        } else {
                            BatchStatus::Committed(live)
                        })
                    } else if !reachable {
                        Err("unreachable".to_string())
                    } else {
                        Ok(a.handle_query())
                    };
                    s.handle_status(status);
                }
            }
        }
        if agent_alive {
            while let Some(act) = a.poll_action() {
                progressed = true;
                match act {
                    AgentAction::Restore(ids) => {
                        let out = ids
                            .iter()
                            .map(|&i| {
                                if refuse.contains(&i) {
                                    (i, Err("not allowed".to_string()))
                                } else {
                                    w.dst[i as usize] = Dst::Restored;
                                    (i, Ok(()))
                                }
                            })
                            .collect();
                        a.handle_restored(out);
                    }
                    AgentAction::Resume(ids) => {
                        let out = ids
                            .iter()
                            .map(|&i| {
                                assert_eq!(w.dst[i as usize], Dst::Restored);
                                w.dst[i as usize] = Dst::Live;
                                (i, Ok(()))
                            })
                            .collect();
                        a.handle_resumed(out);
                    }
                    AgentAction::Discard(ids) => {
                        ids.iter().for_each(|&i| w.dst[i as usize] = Dst::Gone)
                    }
                }
            }
            while let Some(m) = a.poll_transmit() {
                if link {
                    a2s.push_back(m);
                }
            }
        }
        if !stalled {
            if let Some(m) = s2a.pop_front() {
                progressed = true;
                if agent_alive {
                    a.handle_message(m, now);
                }
            } else if let Some(m) = a2s.pop_front() {
                progressed = true;
                s.handle_message(m, now);
            }
        }
        if !progressed {
            if s.is_done() && (a.is_done() || !agent_alive || !link) {
                break;
            }
            // Nothing moves: let the clocks run out.
            now += timeout * 2;
            s.handle_timeout(now);
            if agent_alive {
                a.handle_timeout(now);
            }
            if s.is_done() && !link {
                a.handle_link_lost();
            }
        }
    }
    assert!(s.is_done(), "sender finished ({fault:?} at {at})");
    (w, s.fates().clone())
}

fn check(n: u32, refuse: &[u32], fault: Fault, at: usize) {
    let (w, fates) = run(n, refuse, fault, at);
    for i in 0..n as usize {
        let live_src = w.src[i] == Src::Live;
        let live_dst = w.dst[i] == Dst::Live;
        let ctx = format!(
            "conn {i}, {fault:?} at step {at}: src {:?} dst {:?} fate {:?}",
            w.src[i],
            w.dst[i],
            fates.get(&(i as u32))
        );
        assert!(!(live_src && live_dst), "duplicated: {ctx}");
        assert!(
            w.dst[i] != Dst::Restored,
            "left restored in repair mode at the agent: {ctx}"
        );
        match fates.get(&(i as u32)) {
            Some(Fate::Moved) => assert!(live_dst && w.src[i] == Src::Gone, "{ctx}"),
            Some(Fate::RolledBack(_)) => assert!(live_src && !live_dst, "{ctx}"),
            Some(Fate::Unknown(_)) => {
                assert_eq!(w.src[i], Src::Held, "{ctx}");
                assert_eq!(
                    fault,
                    Fault::Partition,
                    "unknown only when the agent is unreachable: {ctx}"
                );
            }
            None => panic!("no fate: {ctx}"),
        }
        if fault != Fault::Partition {
            assert!(live_src || live_dst, "lost: {ctx}");
        }
    }
    if refuse.len() as u32 == n {
        assert!(fates.values().all(|f| matches!(f, Fate::RolledBack(_))));
    }
    // Traffic is switched exactly when something moved.
    let moved = fates.values().any(|f| *f == Fate::Moved);
    if fault != Fault::Partition {
        assert_eq!(
            w.switched, moved,
            "switch state matches the outcome ({fault:?} at {at})"
        );
    }
}

#[test]
fn clean_batch_moves_everything() {
    let (w, fates) = run(5, &[], Fault::None, 0);
    assert!(fates.values().all(|f| *f == Fate::Moved));
    assert!(w.dst.iter().all(|d| *d == Dst::Live));
    assert!(w.switched);
}

#[test]
fn refused_connections_roll_back_and_the_rest_move() {
    let (w, fates) = run(4, &[1, 3], Fault::None, 0);
    assert_eq!(fates[&0], Fate::Moved);
    assert!(matches!(fates[&1], Fate::RolledBack(_)));
    assert_eq!(w.src[1], Src::Live);
    assert_eq!(w.dst[2], Dst::Live);
}

#[test]
fn every_fault_at_every_step() {
    let faults = [
        Fault::LinkCut,
        Fault::Partition,
        Fault::AgentCrash,
        Fault::Stall,
        Fault::SwitchFails,
        Fault::None,
    ];
    let mut runs = 0;
    for n in [1u32, 3] {
        for refuse in [&[][..], &[0][..], &[1][..]] {
            if refuse.iter().any(|&r| r >= n) {
                continue;
            }
            for fault in faults {
                for at in 0..40 {
                    check(n, refuse, fault, at);
                    runs += 1;
                }
            }
        }
    }
    assert!(runs > 1000);
}

#[test]
fn agent_refuses_a_commit_before_every_ready() {
    let now = Instant::now();
    let mut a = Agent::new(Duration::from_secs(2), now);
    a.handle_message(Msg::Hello { batch: 1, total: 2 }, now);
    a.handle_message(Msg::Prepare(vec![0]), now);
    assert_eq!(a.poll_action(), Some(AgentAction::Restore(vec![0])));
    a.handle_restored(vec![(0, Ok(()))]);
    a.handle_message(Msg::Commit(vec![0]), now);
    assert_eq!(a.poll_action(), Some(AgentAction::Discard(vec![0])));
    assert_eq!(a.batch_state(), BatchState::Aborted);
}

#[test]
fn agent_times_out_and_discards() {
    let now = Instant::now();
    let mut a = Agent::new(Duration::from_secs(2), now);
    a.handle_message(Msg::Hello { batch: 1, total: 1 }, now);
    a.handle_message(Msg::Prepare(vec![0]), now);
    a.poll_action();
    a.handle_restored(vec![(0, Ok(()))]);
    a.handle_timeout(now + Duration::from_secs(1));
    assert!(!a.is_done());
    a.handle_timeout(now + Duration::from_secs(3));
    assert_eq!(a.poll_action(), Some(AgentAction::Discard(vec![0])));
    assert!(a.is_done());
}

proptest::proptest! {
    /// Random batch sizes, refusals, faults and fault points.
    #[test]
    fn random_schedules(n in 1u32..8, refuse_mask in 0u8.., fault in 0usize..6, at in 0usize..80) {
        let refuse: Vec<u32> = (0..n).filter(|i| refuse_mask & (1 << i) != 0).collect();
        let faults = [Fault::LinkCut, Fault::Partition, Fault::AgentCrash, Fault::Stall, Fault::SwitchFails, Fault::None];
        check(n, &refuse, faults[fault], at);
    }
}

// ---- agent additions ----

/// Runs a sender to COMMIT against an agent that restores everything, and
/// returns both with the sender's COMMIT delivered to the agent.
fn to_commit(n: u32) -> (Sender, Agent, Instant) {
    let now = Instant::now();
    let timeout = Duration::from_secs(2);
    let mut s = Sender::new(9, (0..n).collect(), timeout, now);
    let mut a = Agent::new(timeout, now);
    while let Some(m) = s.poll_transmit() {
        a.handle_message(m, now);
    }
    while let Some(act) = a.poll_action() {
        if let AgentAction::Restore(ids) = act {
            a.handle_restored(ids.into_iter().map(|i| (i, Ok(()))).collect());
        }
    }
    while let Some(m) = a.poll_transmit() {
        s.handle_message(m, now);
    }
    let switch = s.poll_action().expect("a switch once all are ready");
    assert!(matches!(switch, SenderAction::Switch(_)));
    s.handle_switched(Ok(()), now);
    let commit = s.poll_transmit().expect("COMMIT");
    assert!(matches!(commit, Msg::Commit(_)));
    a.handle_message(commit, now);
    (s, a, now)
}

/// The agent cannot take the batch over (address, delivery target): it
/// resumes nothing, discards every restored socket, says so, and the
/// sender switches back and thaws: one live copy, at the source.
#[test]
fn a_refused_take_over_rolls_the_sender_back() {
    let (mut s, mut a, now) = to_commit(3);
    let AgentAction::Resume(ids) = a.poll_action().expect("resume") else {
        panic!("the commit asks for a resume")
    };
    a.handle_commit_refused(ids.clone(), "cannot take the service address".into());
    assert_eq!(a.poll_action(), Some(AgentAction::Discard(ids)));
    assert!(a.is_done());
    assert_eq!(a.handle_query(), BatchStatus::NotResumed);
    let refused = a.poll_transmit().expect("the refusal");
    assert!(matches!(refused, Msg::CommitRefused(_)));
    s.handle_message(refused, now);
    assert_eq!(s.poll_action(), Some(SenderAction::Unswitch));
    assert_eq!(s.poll_action(), Some(SenderAction::Thaw(vec![0, 1, 2])));
    assert!(s.is_done());
    assert!(s
        .fates()
        .values()
        .all(|f| matches!(f, Fate::RolledBack(why) if why.contains("did not resume"))));
}

/// After COMMIT, only the agent's word that nothing was resumed rolls
/// back; an agent that cannot be asked, or that has no record of the
/// batch, leaves the connections frozen (unknown), never thawed.
#[test]
fn after_commit_only_not_resumed_rolls_back() {
    let answers: [(Result<BatchStatus, String>, bool); 4] = [
        (Ok(BatchStatus::NotResumed), true),
        (Ok(BatchStatus::Unknown), false),
        (Err("connection refused".into()), false),
        (Ok(BatchStatus::Committed(vec![])), false),
    ];
    for (answer, rolls_back) in answers {
        let (mut s, _a, now) = to_commit(2);
        s.handle_link_lost(now);
        assert_eq!(s.poll_action(), Some(SenderAction::Query));
        s.handle_status(answer.clone());
        assert!(s.is_done(), "{answer:?}");
        let actions: Vec<SenderAction> = std::iter::from_fn(|| s.poll_action()).collect();
        if rolls_back {
            assert_eq!(
                actions,
                vec![SenderAction::Unswitch, SenderAction::Thaw(vec![0, 1])]
            );
        } else {
            assert_eq!(actions, vec![SenderAction::Hold(vec![0, 1])], "{answer:?}");
            assert!(s.fates().values().all(|f| matches!(f, Fate::Unknown(_))));
        }
    }
}

/// A Query answered from the agent's memory: a batch waiting for COMMIT
/// is given up (NOT_RESUMED, final), a committed one says what resumed.
#[test]
fn agent_answers_queries_with_a_typed_status() {
    let (_s, mut a, _now) = to_commit(2);
    let AgentAction::Resume(ids) = a.poll_action().expect("resume") else {
        panic!("the commit asks for a resume")
    };
    a.handle_resumed(vec![(ids[0], Ok(())), (ids[1], Err("gone".into()))]);
    assert_eq!(a.handle_query(), BatchStatus::Committed(vec![ids[0]]));

    let now = Instant::now();
    let mut waiting = Agent::new(Duration::from_secs(2), now);
    waiting.handle_message(Msg::Hello { batch: 1, total: 1 }, now);
    assert_eq!(waiting.handle_query(), BatchStatus::NotResumed);
    assert!(waiting.is_done());
}

/// A timeout too large for the clock never panics: the agent simply has
/// no deadline.
#[test]
fn agent_takes_a_huge_timeout() {
    let now = Instant::now();
    let mut a = Agent::new(Duration::MAX, now);
    a.handle_message(Msg::Hello { batch: 1, total: 1 }, now);
    assert_eq!(a.poll_timeout(), None);
    a.handle_timeout(now + Duration::from_secs(3600));
    assert!(!a.is_done());
}
