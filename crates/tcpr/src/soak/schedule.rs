//! The soak's schedule: which connection moves at each step, with which
//! fault, and the faults around the moves, all drawn from one seeded
//! generator, so that a seed replays the same schedule.

use rand::rngs::SmallRng;
use rand::RngExt;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

/// Chance per step that packet loss starts (when none is on).
const LOSS_CHANCE: f64 = 0.04;
/// Loss rates drawn, per mille of the TCP packets a host receives.
const LOSS_PER_MILLE: std::ops::RangeInclusive<u32> = 5..=50;
/// Steps a loss period lasts.
const LOSS_STEPS: std::ops::Range<u64> = 5..40;
/// Chance per step that a client stops reading a connection.
const ZERO_WINDOW_CHANCE: f64 = 0.03;
/// Steps it stays stopped.
const ZERO_WINDOW_STEPS: std::ops::Range<u64> = 3..40;
/// Chance per step that a client half-closes a connection.
const HALF_CLOSE_CHANCE: f64 = 0.01;
/// At most this share of the connections is half-closed (they no longer
/// stream towards the server).
const HALF_CLOSED_SHARE: usize = 4;
/// Chance that a second move races the first at the same step.
const RACE_CHANCE: f64 = 0.12;
/// Chance that a move's destination agent is killed during it.
const KILL_CHANCE: f64 = 0.10;
/// With `--kill-anytime`, the share of the kills that come at a random
/// moment rather than at a protocol step.
const ANYTIME_SHARE: f64 = 0.5;
/// When such a kill comes, after the move starts (a move takes a few ms).
const KILL_AFTER_MICROS: std::ops::Range<u64> = 0..4000;
/// The agent's fault points (`TCPR_FAULT_STOP_AT` in
/// `tcpr_handoff::agent`), in protocol order.
pub const AGENT_FAULT_POINTS: [&str; 6] = [
    "hello",
    "restored",
    "ready",
    "taken",
    "delivered",
    "committed",
];
/// Chance that the control link to the destination is cut during a move.
const CUT_CHANCE: f64 = 0.06;
/// When the cut comes, after the move starts.
const CUT_AFTER_MICROS: std::ops::Range<u64> = 0..3000;
/// How long it lasts.
const CUT_MILLIS: std::ops::Range<u64> = 50..2500;
/// Chance that the sender (a `tcpr migrate` process for this move) is
/// killed during the move.
const SENDER_KILL_CHANCE: f64 = 0.04;
/// When it is killed, after it starts (it starts in a few ms).
const SENDER_KILL_AFTER_MICROS: std::ops::Range<u64> = 0..20_000;
/// The streaming time between steps.
const STEP_PAUSE_MILLIS: std::ops::Range<u64> = 0..15;

/// A fault around the moves.
#[derive(Debug, Clone, Copy)]
pub enum Ambient {
    /// Host (0 client, 1 a, 2 b) drops this share of the TCP it receives.
    LossOn { host: usize, per_mille: u32 },
    /// The host's loss ends.
    LossOff { host: usize },
    /// The client stops reading connection i (a zero window).
    Pause(usize),
    /// It reads again.
    Resume(usize),
    /// The client half-closes connection i.
    HalfClose(usize),
}

/// The fault of one move.
#[derive(Debug, Clone, Copy)]
pub enum MoveFault {
    None,
    /// The destination agent is killed (SIGKILL) when it reaches this
    /// fault point of the protocol (an index of [`AGENT_FAULT_POINTS`]),
    /// and restarted on its journal.
    KillAtStep {
        point: usize,
    },
    /// The destination agent is killed (SIGKILL) and restarted this long
    /// after the move starts: it lands on whatever it is doing then.
    KillAnytime {
        after: Duration,
    },
    /// The control link to the destination is cut then, for a while.
    CutLink {
        after: Duration,
        mend_after: Duration,
    },
    /// The move is made by a `tcpr migrate` process (the connection's
    /// socket taken from this process by pidfd), killed (SIGKILL) this
    /// long after it starts: the source side's process exits mid-move.
    KillSender {
        after: Duration,
    },
}

impl fmt::Display for MoveFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MoveFault::None => write!(f, "none"),
            MoveFault::KillAtStep { point } => write!(
                f,
                "destination agent killed at protocol step {:?}",
                AGENT_FAULT_POINTS[*point]
            ),
            MoveFault::KillAnytime { after } => write!(
                f,
                "destination agent killed {:.2} ms into the move",
                after.as_secs_f64() * 1e3
            ),
            MoveFault::KillSender { after } => write!(
                f,
                "sender process killed {:.2} ms after it started",
                after.as_secs_f64() * 1e3
            ),
            MoveFault::CutLink { after, mend_after } => write!(
                f,
                "control link cut {:.2} ms into the move for {} ms",
                after.as_secs_f64() * 1e3,
                mend_after.as_millis()
            ),
        }
    }
}

/// One move of a step.
#[derive(Debug, Clone, Copy)]
pub struct PlannedMove {
    pub conn: usize,
    pub fault: MoveFault,
}

/// One step.
#[derive(Debug)]
pub struct Step {
    pub ambient: Vec<Ambient>,
    pub moves: Vec<PlannedMove>,
    /// Streaming time after the step.
    pub pause: Duration,
}

/// The generator and what it has turned on.
pub struct Schedule {
    rng: SmallRng,
    n: usize,
    kill_anytime: bool,
    /// The host losing packets, and the step the loss ends.
    loss: Option<(usize, u64)>,
    /// Connections not read, with the step they are read again.
    paused: BTreeMap<usize, u64>,
    half_closed: BTreeSet<usize>,
}

impl Schedule {
    pub fn new(rng: SmallRng, n: usize, kill_anytime: bool) -> Schedule {
        Schedule {
            rng,
            n,
            kill_anytime,
            loss: None,
            paused: BTreeMap::new(),
            half_closed: BTreeSet::new(),
        }
    }

    pub fn next(&mut self, step: u64) -> Step {
        let mut ambient = vec![];
        match self.loss {
            Some((host, until)) if step >= until => {
                ambient.push(Ambient::LossOff { host });
                self.loss = None;
            }
            None if self.rng.random_bool(LOSS_CHANCE) => {
                let host = self.rng.random_range(0..3);
                let per_mille = self.rng.random_range(LOSS_PER_MILLE);
                self.loss = Some((host, step + self.rng.random_range(LOSS_STEPS)));
                ambient.push(Ambient::LossOn { host, per_mille });
            }
            _ => {}
        }
        let due: Vec<usize> = self
            .paused
            .iter()
            .filter(|(_, until)| **until <= step)
            .map(|(i, _)| *i)
            .collect();
        for i in due {
            self.paused.remove(&i);
            ambient.push(Ambient::Resume(i));
        }
        if self.rng.random_bool(ZERO_WINDOW_CHANCE) {
            let i = self.rng.random_range(0..self.n);
            let until = step + self.rng.random_range(ZERO_WINDOW_STEPS);
            if let std::collections::btree_map::Entry::Vacant(e) = self.paused.entry(i) {
                e.insert(until);
                ambient.push(Ambient::Pause(i));
            }
        }
        if self.rng.random_bool(HALF_CLOSE_CHANCE) {
            let i = self.rng.random_range(0..self.n);
            if self.half_closed.len() < self.n / HALF_CLOSED_SHARE && self.half_closed.insert(i) {
                ambient.push(Ambient::HalfClose(i));
            }
        }
        let first = self.rng.random_range(0..self.n);
        let mut moves = vec![PlannedMove {
            conn: first,
            fault: self.fault(),
        }];
        if self.n > 1 && self.rng.random_bool(RACE_CHANCE) {
            let second = (first + self.rng.random_range(1..self.n)) % self.n;
            moves.push(PlannedMove {
                conn: second,
                fault: self.fault(),
            });
        }
        Step {
            ambient,
            moves,
            pause: Duration::from_millis(self.rng.random_range(STEP_PAUSE_MILLIS)),
        }
    }

    fn fault(&mut self) -> MoveFault {
        let roll: f64 = self.rng.random_range(0.0..1.0);
        if roll < KILL_CHANCE {
            if self.kill_anytime && self.rng.random_bool(ANYTIME_SHARE) {
                MoveFault::KillAnytime {
                    after: Duration::from_micros(self.rng.random_range(KILL_AFTER_MICROS)),
                }
            } else {
                MoveFault::KillAtStep {
                    point: self.rng.random_range(0..AGENT_FAULT_POINTS.len()),
                }
            }
        } else if roll < KILL_CHANCE + CUT_CHANCE {
            MoveFault::CutLink {
                after: Duration::from_micros(self.rng.random_range(CUT_AFTER_MICROS)),
                mend_after: Duration::from_millis(self.rng.random_range(CUT_MILLIS)),
            }
        } else if roll < KILL_CHANCE + CUT_CHANCE + SENDER_KILL_CHANCE {
            MoveFault::KillSender {
                after: Duration::from_micros(self.rng.random_range(SENDER_KILL_AFTER_MICROS)),
            }
        } else {
            MoveFault::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A seed replays its schedule, and every kind of fault comes up.
    #[test]
    fn a_seed_replays_and_every_fault_comes_up() {
        let draw = |seed| {
            let mut s = Schedule::new(SmallRng::seed_from_u64(seed), 10, true);
            (1..=2000)
                .map(|i| format!("{:?}", s.next(i)))
                .collect::<Vec<_>>()
        };
        let one = draw(1);
        assert_eq!(one, draw(1));
        assert_ne!(one, draw(2));
        let all = one.concat();
        for kind in [
            "KillAtStep",
            "KillAnytime",
            "CutLink",
            "KillSender",
            "LossOn",
            "LossOff",
            "Pause",
            "Resume",
            "HalfClose",
        ] {
            assert!(all.contains(kind), "{kind} never drawn");
        }
    }
}
