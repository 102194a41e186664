//! The receiving end of a handoff as a pure state machine: [`Agent`], the
//! actions it asks of its driver ([`AgentAction`]) and what it knows of a
//! batch ([`BatchState`]).

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::{BatchStatus, ConnId, Msg};

/// What the agent's driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAction {
    /// Restore these images (left in repair mode); report with
    /// [`Agent::handle_restored`].
    Restore(Vec<ConnId>),
    /// Take the batch over (check the delivery target, journal the commit,
    /// take the service address), then resume and deliver these; report
    /// with [`Agent::handle_resumed`], or with
    /// [`Agent::handle_commit_refused`] when the take-over failed before
    /// anything was resumed.
    Resume(Vec<ConnId>),
    /// Close these restored sockets silently.
    Discard(Vec<ConnId>),
}

/// What the agent knows of a batch, for Query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchState {
    /// Restored, awaiting COMMIT.
    Prepared,
    /// Committed: these ids were resumed.
    Committed(Vec<ConnId>),
    /// Given up.
    Aborted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AgentState {
    AwaitHello,
    Preparing,
    Resuming,
    Done,
}

/// The receiving end.
///
/// Call order: feed each message to [`Agent::handle_message`]; perform each
/// [`Agent::poll_action`] and report its results; send each
/// [`Agent::poll_transmit`]; on a lost link call [`Agent::handle_link_lost`];
/// when [`Agent::poll_timeout`] passes call [`Agent::handle_timeout`].
/// Once [`Agent::is_done`], [`Agent::channel_reusable`] says whether the
/// channel may carry the sender's next batch.
#[derive(Debug)]
pub struct Agent {
    state: AgentState,
    batch: u64,
    total: u32,
    seen: BTreeSet<ConnId>,
    restored: BTreeSet<ConnId>,
    answered: usize,
    timeout: Duration,
    deadline: Option<Instant>,
    outbox: VecDeque<Msg>,
    actions: VecDeque<AgentAction>,
    result: Option<BatchState>,
    /// The batch ended on an exchange both ends know to be complete: see
    /// [`Agent::channel_reusable`].
    quiet_end: bool,
}

impl Agent {
    /// A new session; `timeout` bounds the wait for each next message
    /// before COMMIT.
    pub fn new(timeout: Duration, now: Instant) -> Agent {
        Agent {
            state: AgentState::AwaitHello,
            batch: 0,
            total: 0,
            seen: BTreeSet::new(),
            restored: BTreeSet::new(),
            answered: 0,
            timeout,
            deadline: now.checked_add(timeout),
            outbox: VecDeque::new(),
            actions: VecDeque::new(),
            result: None,
            quiet_end: false,
        }
    }
    /// The batch this session serves (after HELLO).
    pub fn batch(&self) -> u64 {
        self.batch
    }
    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Msg> {
        self.outbox.pop_front()
    }
    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<AgentAction> {
        self.actions.pop_front()
    }
    /// When [`Agent::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }
    /// The batch's state, for Query.
    pub fn batch_state(&self) -> BatchState {
        self.result.clone().unwrap_or(BatchState::Prepared)
    }
    /// True once the session has nothing more to do.
    pub fn is_done(&self) -> bool {
        self.state == AgentState::Done
    }
    /// True when the session is done and its channel may carry the next
    /// batch: its last message was COMMITTED or COMMIT_REFUSED (the
    /// sender's last word came before them), or it ended on the sender's
    /// ABORT (which is answered with nothing). After any other end (a
    /// timeout, a lost link, a protocol error this end answered with
    /// ABORT, a Query) the sender may still send for this batch, or has
    /// given the channel up: the driver closes it.
    pub fn channel_reusable(&self) -> bool {
        self.state == AgentState::Done && self.quiet_end
    }

    fn abort(&mut self) {
        let restored: Vec<ConnId> = std::mem::take(&mut self.restored).into_iter().collect();
        if !restored.is_empty() {
            self.actions.push_back(AgentAction::Discard(restored));
        }
        self.result = Some(BatchState::Aborted);
        self.state = AgentState::Done;
        self.deadline = None;
    }

    /// A message from the sender.
    pub fn handle_message(&mut self, msg: Msg, now: Instant) {
        match (self.state, msg) {
            (AgentState::AwaitHello, Msg::Hello { batch, total }) => {
                self.batch = batch;
                self.total = total;
                self.state = AgentState::Preparing;
                self.deadline = now.checked_add(self.timeout);
            }
            (AgentState::Preparing, Msg::Prepare(ids)) => {
                if ids.iter().any(|i| !self.seen.insert(*i))
                    || self.seen.len() > self.total as usize
                {
                    self.outbox.push_back(Msg::Abort("bad PREPARE".into()));
                    return self.abort();
                }
                self.deadline = now.checked_add(self.timeout);
                self.actions.push_back(AgentAction::Restore(ids));
            }
            (AgentState::Preparing, Msg::Commit { ids, .. }) => {
                if self.answered < self.total as usize {
                    self.outbox
                        .push_back(Msg::Abort("COMMIT before every READY".into()));
                    return self.abort();
                }
                let commit: BTreeSet<ConnId> = ids.into_iter().collect();
                let resume: Vec<ConnId> = self.restored.intersection(&commit).copied().collect();
                let discard: Vec<ConnId> = self.restored.difference(&commit).copied().collect();
                if !discard.is_empty() {
                    self.actions.push_back(AgentAction::Discard(discard));
                }
                let unknown: Vec<(ConnId, Result<(), String>)> = commit
                    .difference(&self.restored)
                    .map(|i| (*i, Err("not prepared".to_string())))
                    .collect();
                if !unknown.is_empty() {
                    self.outbox.push_back(Msg::Committed(unknown));
                }
                self.restored.clear();
                // The commit point: from here a Query answers "committed".
                self.result = Some(BatchState::Committed(resume.clone()));
                self.state = AgentState::Resuming;
                self.deadline = None;
                self.actions.push_back(AgentAction::Resume(resume));
            }
            (AgentState::Done | AgentState::Resuming, _) => {}
            // The sender gave the batch up: it needs no answer, and an
            // answer could only be read as the first message of its next
            // batch on this channel.
            (AgentState::AwaitHello | AgentState::Preparing, Msg::Abort(_)) => {
                self.abort();
                self.quiet_end = true;
            }
            (_, _) => {
                self.outbox
                    .push_back(Msg::Abort("unexpected message".into()));
                self.abort();
            }
        }
    }

    /// Results of a `Restore` action.
    pub fn handle_restored(&mut self, outcomes: Vec<(ConnId, Result<(), String>)>) {
        if self.state != AgentState::Preparing {
            // Aborted meanwhile: throw away what was restored.
            let late: Vec<ConnId> = outcomes
                .iter()
                .filter(|o| o.1.is_ok())
                .map(|o| o.0)
                .collect();
            if !late.is_empty() {
                self.actions.push_back(AgentAction::Discard(late));
            }
            return;
        }
        for (id, r) in &outcomes {
            if r.is_ok() {
                self.restored.insert(*id);
            }
        }
        self.answered += outcomes.len();
        self.outbox.push_back(Msg::Ready(outcomes));
    }

    /// Results of a `Resume` action.
    pub fn handle_resumed(&mut self, outcomes: Vec<(ConnId, Result<(), String>)>) {
        let ok: Vec<ConnId> = outcomes
            .iter()
            .filter(|o| o.1.is_ok())
            .map(|o| o.0)
            .collect();
        self.result = Some(BatchState::Committed(ok));
        self.outbox.push_back(Msg::Committed(outcomes));
        self.state = AgentState::Done;
        self.quiet_end = true;
    }

    /// The take-over after COMMIT failed before anything was resumed (the
    /// address could not be taken, the delivery target is gone): nothing is
    /// resumed, every restored socket of the batch is closed silently, and
    /// the sender is told so that it can switch back and thaw.
    pub fn handle_commit_refused(&mut self, ids: Vec<ConnId>, reason: String) {
        if self.state != AgentState::Resuming {
            return;
        }
        if !ids.is_empty() {
            self.actions.push_back(AgentAction::Discard(ids));
        }
        self.outbox.push_back(Msg::CommitRefused(reason));
        self.result = Some(BatchState::Aborted);
        self.state = AgentState::Done;
        self.quiet_end = true;
    }

    /// A Query for this batch from a new channel. A batch still waiting
    /// for COMMIT is given up at once, so that a COMMIT still in flight can
    /// no longer take effect: the answer is then final.
    pub fn handle_query(&mut self) -> BatchStatus {
        if matches!(self.state, AgentState::AwaitHello | AgentState::Preparing) {
            self.abort();
        }
        match &self.result {
            Some(BatchState::Committed(ids)) => BatchStatus::Committed(ids.clone()),
            Some(BatchState::Aborted) => BatchStatus::NotResumed,
            // Not reachable: a session is only asked between its steps,
            // and by then it has committed or been given up.
            Some(BatchState::Prepared) | None => BatchStatus::Unknown,
        }
    }

    /// The link broke. Before COMMIT the batch is given up.
    pub fn handle_link_lost(&mut self) {
        if matches!(self.state, AgentState::AwaitHello | AgentState::Preparing) {
            self.abort();
        }
    }

    /// The clock reached [`Agent::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d)
            && matches!(self.state, AgentState::AwaitHello | AgentState::Preparing)
        {
            self.abort();
        }
    }
}
