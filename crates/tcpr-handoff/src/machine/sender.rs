//! The sending end of a handoff as a pure state machine: [`Sender`], the
//! actions it asks of its driver ([`SenderAction`]) and the outcome of a
//! switch ([`SwitchOutcome`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::{BatchStatus, ConnId, Fate, Framing, Msg, ServiceAddress};

/// What the sender's driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderAction {
    /// Dump and encode this connection's image, keep it until a `Prepare`
    /// names it, and report its size with [`Sender::handle_dumped`].
    Dump(ConnId),
    /// Send the flows of these connections to the agent's host; report with
    /// [`Sender::handle_switched`] (now or later).
    Switch(Vec<ConnId>),
    /// Undo the switch.
    Unswitch,
    /// Roll back: these carry on at the source.
    Thaw(Vec<ConnId>),
    /// The agent owns these: close the frozen copies silently.
    Discard(Vec<ConnId>),
    /// Ask the agent, on a new channel, what became of the batch.
    Query,
    /// Outcome unknown: leave these frozen and locked until the lease ends.
    Hold(Vec<ConnId>),
}

/// The result of a `Switch` action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwitchOutcome {
    /// The flows now go to the agent's host. When the switch took the
    /// service address off this host, the agent must take it on COMMIT.
    Switched {
        /// The address removed here.
        moved_address: Option<ServiceAddress>,
    },
    /// The switch failed, perhaps half-way (it is undone whole).
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SenderState {
    Preparing,
    Switching,
    /// The batch is given up while a switch is under way: the roll back
    /// waits for the switch to finish, so that it can be undone before any
    /// connection is thawed.
    AbortingSwitch,
    Committing,
    Querying,
    Done,
}

/// The sending end.
///
/// Call order:
/// 1. [`Sender::new`]; send everything [`Sender::poll_transmit`] gives and
///    perform every [`Sender::poll_action`] (a `Prepare` message names the
///    images that `Dump` actions produced: attach them, and an empty image
///    for an id whose dump failed);
/// 2. feed each dump's size to [`Sender::handle_dumped`], replies to
///    [`Sender::handle_message`], the result of a `Switch` action to
///    [`Sender::handle_switched`] (it may come later, between messages), a
///    lost link to [`Sender::handle_link_lost`], and the clock to
///    [`Sender::handle_timeout`] when [`Sender::poll_timeout`] passes;
/// 3. after a `Query` action, feed the answer to [`Sender::handle_status`];
/// 4. stop when [`Sender::is_done`]; then [`Sender::channel_reusable`]
///    says whether the channel may carry another batch.
#[derive(Debug)]
pub struct Sender {
    state: SenderState,
    framing: Framing,
    all: Vec<ConnId>,
    /// Not dumped yet, in order.
    to_dump: VecDeque<ConnId>,
    /// The `Dump` action under way.
    dumping: Option<ConnId>,
    /// Dumped, in the frame being filled, and its size.
    filling: Vec<ConnId>,
    filling_bytes: usize,
    /// A full frame waiting for the window to open.
    full_frame: Option<Vec<ConnId>>,
    /// PREPARE frames unanswered.
    in_flight: usize,
    /// Sent in a PREPARE, no READY yet.
    awaiting: BTreeSet<ConnId>,
    /// Dump failed: sent without an image so that the agent counts it, and
    /// rolled back already.
    withdrawn: BTreeSet<ConnId>,
    ready: BTreeSet<ConnId>,
    fates: BTreeMap<ConnId, Fate>,
    timeout: Duration,
    deadline: Option<Instant>,
    link_lost: bool,
    switched: bool,
    /// Why the batch is given up, while a switch finishes.
    abort_reason: Option<String>,
    /// The batch ended on an exchange both ends know to be complete: see
    /// [`Sender::channel_reusable`].
    quiet_end: bool,
    outbox: VecDeque<Msg>,
    actions: VecDeque<SenderAction>,
}

impl Sender {
    /// Starts a batch of `ids`; `timeout` bounds every wait for the agent.
    pub fn new(
        batch: u64,
        ids: Vec<ConnId>,
        timeout: Duration,
        framing: Framing,
        now: Instant,
    ) -> Sender {
        let mut s = Sender {
            state: SenderState::Preparing,
            framing,
            to_dump: ids.iter().copied().collect(),
            all: ids.clone(),
            dumping: None,
            filling: vec![],
            filling_bytes: 0,
            full_frame: None,
            in_flight: 0,
            awaiting: BTreeSet::new(),
            withdrawn: BTreeSet::new(),
            ready: BTreeSet::new(),
            fates: BTreeMap::new(),
            timeout,
            deadline: None,
            link_lost: false,
            switched: false,
            abort_reason: None,
            quiet_end: false,
            outbox: VecDeque::new(),
            actions: VecDeque::new(),
        };
        s.outbox.push_back(Msg::Hello {
            batch,
            total: u32::try_from(ids.len()).unwrap_or(u32::MAX),
        });
        if ids.is_empty() {
            s.finish();
        } else {
            s.pump(now);
        }
        s
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Msg> {
        self.outbox.pop_front()
    }
    /// True when a message or an action waits.
    pub fn poll_transmit_pending(&self) -> bool {
        !self.outbox.is_empty() || !self.actions.is_empty()
    }
    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<SenderAction> {
        self.actions.pop_front()
    }
    /// When [`Sender::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }
    /// True when every connection has its fate.
    pub fn is_done(&self) -> bool {
        self.state == SenderState::Done
    }
    /// The fate of each connection (complete once done).
    pub fn fates(&self) -> &BTreeMap<ConnId, Fate> {
        &self.fates
    }
    /// True when the batch is done and its channel may carry the next one:
    /// the batch ended on an exchange both ends know to be complete, so
    /// that nothing of it is still on its way in either direction and the
    /// agent waits for a new batch. That is COMMITTED for the last ready
    /// connection, COMMIT_REFUSED, or our ABORT after every READY came in
    /// with nothing ready (the agent answers an ABORT with nothing). Any
    /// other end (a timeout, a lost link, a Query, a protocol error, an
    /// ABORT either way with READYs outstanding) may leave a message of
    /// this batch on the channel, or the agent may have closed it: the
    /// driver closes it.
    pub fn channel_reusable(&self) -> bool {
        self.state == SenderState::Done && self.quiet_end
    }

    /// One timeout from `now`; none when the timeout is beyond the clock's
    /// range (a huge `--timeout` waits forever rather than overflowing).
    fn deadline_after(&self, now: Instant) -> Option<Instant> {
        now.checked_add(self.timeout)
    }

    fn finish(&mut self) {
        self.state = SenderState::Done;
        self.deadline = None;
    }

    /// Sends what the window allows and asks for the next dump.
    fn pump(&mut self, now: Instant) {
        if self.state != SenderState::Preparing {
            return;
        }
        loop {
            if let Some(frame) = self.full_frame.take() {
                if self.in_flight >= self.framing.frames_in_flight.max(1) {
                    self.full_frame = Some(frame);
                    return;
                }
                self.awaiting.extend(frame.iter().copied());
                self.in_flight += 1;
                self.outbox.push_back(Msg::Prepare(frame));
                self.deadline = self.deadline_after(now);
                continue;
            }
            if self.dumping.is_some() {
                return;
            }
            if let Some(id) = self.to_dump.pop_front() {
                self.dumping = Some(id);
                self.actions.push_back(SenderAction::Dump(id));
                return;
            }
            if !self.filling.is_empty() {
                self.full_frame = Some(std::mem::take(&mut self.filling));
                self.filling_bytes = 0;
                continue;
            }
            if self.awaiting.is_empty() {
                self.all_answered();
            }
            return;
        }
    }

    /// Every image is answered: switch, or give up when nothing is ready.
    fn all_answered(&mut self) {
        if self.ready.is_empty() {
            self.outbox
                .push_back(Msg::Abort("nothing to commit".into()));
            // Every frame is answered: nothing more comes from the agent.
            self.quiet_end = true;
            self.finish();
        } else {
            self.state = SenderState::Switching;
            self.deadline = None;
            self.actions
                .push_back(SenderAction::Switch(self.ready.iter().copied().collect()));
        }
    }

    /// The outcome of a `Dump` action: the encoded image's size, or why it
    /// could not be dumped (that connection is rolled back at once).
    pub fn handle_dumped(&mut self, id: ConnId, result: Result<usize, String>, now: Instant) {
        if self.state != SenderState::Preparing || self.dumping != Some(id) {
            return;
        }
        self.dumping = None;
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(why) => {
                self.fates
                    .insert(id, Fate::RolledBack(format!("dump failed: {why}")));
                self.withdrawn.insert(id);
                self.actions.push_back(SenderAction::Thaw(vec![id]));
                0
            }
        };
        let over_size = self.filling_bytes.saturating_add(bytes) > self.framing.frame_bytes;
        let over_count = self.filling.len() >= self.framing.frame_images.max(1);
        if !self.filling.is_empty() && (over_size || over_count) {
            // `pump` asks for a dump only while no full frame waits.
            self.full_frame = Some(std::mem::take(&mut self.filling));
            self.filling_bytes = 0;
        }
        self.filling.push(id);
        self.filling_bytes = self.filling_bytes.saturating_add(bytes);
        self.pump(now);
    }

    /// Rolls back everything that has no fate yet. While a switch is under
    /// way the roll back waits for its outcome: thawing a connection whose
    /// packets are on their way to another host would lose it.
    fn roll_back(&mut self, why: &str) {
        if self.state == SenderState::Switching {
            self.state = SenderState::AbortingSwitch;
            self.abort_reason = Some(why.to_string());
            self.deadline = None;
            return;
        }
        self.roll_back_now(why);
    }

    /// Rolls back everything that has no fate yet, with no switch under way.
    fn roll_back_now(&mut self, why: &str) {
        let open: Vec<ConnId> = self
            .all
            .iter()
            .copied()
            .filter(|i| !self.fates.contains_key(i))
            .collect();
        if self.switched {
            self.actions.push_back(SenderAction::Unswitch);
            self.switched = false;
        }
        if !open.is_empty() {
            self.actions.push_back(SenderAction::Thaw(open.clone()));
        }
        for i in open {
            self.fates.insert(i, Fate::RolledBack(why.to_string()));
        }
        self.finish();
    }

    /// A message from the agent.
    pub fn handle_message(&mut self, msg: Msg, now: Instant) {
        match (self.state, msg) {
            (SenderState::Preparing, Msg::Ready(outcomes)) => {
                // Checked whole before anything is recorded: a fate given
                // before the error would have no action (never thawed).
                if !all_distinct_in(&outcomes, &self.awaiting) {
                    return self.protocol_error("READY for a connection not awaiting it");
                }
                self.in_flight = self.in_flight.saturating_sub(1);
                let mut refused = vec![];
                for (id, r) in outcomes {
                    self.awaiting.remove(&id);
                    if self.withdrawn.contains(&id) {
                        continue;
                    }
                    match r {
                        Ok(()) => {
                            self.ready.insert(id);
                        }
                        Err(e) => {
                            self.fates
                                .insert(id, Fate::RolledBack(format!("agent refused: {e}")));
                            refused.push(id);
                        }
                    }
                }
                if !refused.is_empty() {
                    self.actions.push_back(SenderAction::Thaw(refused));
                }
                self.deadline = if self.awaiting.is_empty() {
                    None
                } else {
                    self.deadline_after(now)
                };
                self.pump(now);
            }
            (SenderState::Committing, Msg::Committed(outcomes)) => {
                // Checked whole first: one moved before the error would
                // get no Discard, and its frozen copy would be thawed
                // while the agent runs it (one connection, two ends).
                if !all_distinct_in(&outcomes, &self.ready) {
                    return self.protocol_error("COMMITTED for a connection not committed");
                }
                let mut moved = vec![];
                let mut failed = vec![];
                for (id, r) in outcomes {
                    self.ready.remove(&id);
                    match r {
                        Ok(()) => {
                            moved.push(id);
                            self.fates.insert(id, Fate::Moved);
                        }
                        Err(e) => {
                            failed.push(id);
                            self.fates.insert(
                                id,
                                Fate::Unknown(format!("agent could not resume it: {e}")),
                            );
                        }
                    }
                }
                if !moved.is_empty() {
                    self.actions.push_back(SenderAction::Discard(moved));
                }
                if !failed.is_empty() {
                    self.actions.push_back(SenderAction::Hold(failed));
                }
                if self.ready.is_empty() {
                    self.quiet_end = true;
                    self.finish();
                }
            }
            // While querying, only the answer on the new channel decides: a
            // late Abort on the old one must not thaw what the agent may own.
            (SenderState::Done | SenderState::AbortingSwitch | SenderState::Querying, _) => {}
            (_, Msg::Abort(reason)) if self.state != SenderState::Committing => {
                self.roll_back(&format!("agent aborted: {reason}"));
            }
            // The agent says for sure that it resumed none of them.
            (
                state @ (SenderState::Preparing | SenderState::Switching | SenderState::Committing),
                Msg::CommitRefused(reason),
            ) => {
                self.roll_back(&format!("agent did not resume them: {reason}"));
                // The agent's last word on a COMMIT; before one, an anomaly.
                self.quiet_end = state == SenderState::Committing;
            }
            (_, _) => self.protocol_error("unexpected message"),
        }
    }

    fn protocol_error(&mut self, what: &str) {
        match self.state {
            // Before COMMIT nothing is decided: roll back.
            SenderState::Preparing | SenderState::Switching => {
                self.outbox.push_back(Msg::Abort(what.to_string()));
                self.roll_back(&format!("protocol error: {what}"));
            }
            // After COMMIT the agent may own them: ask.
            SenderState::Committing => self.start_query(),
            SenderState::AbortingSwitch | SenderState::Querying | SenderState::Done => {}
        }
    }

    /// The outcome of a `Switch` action.
    pub fn handle_switched(&mut self, outcome: SwitchOutcome, now: Instant) {
        match (self.state, outcome) {
            (SenderState::Switching, SwitchOutcome::Switched { moved_address }) => {
                self.switched = true;
                if self.link_lost {
                    return self.roll_back_now("link to the agent lost");
                }
                self.state = SenderState::Committing;
                self.outbox.push_back(Msg::Commit {
                    ids: self.ready.iter().copied().collect(),
                    take_address: moved_address,
                });
                self.deadline = self.deadline_after(now);
            }
            (SenderState::Switching, SwitchOutcome::Failed(e)) => {
                // A switch may fail half-way: undo it whole.
                self.switched = true;
                self.outbox
                    .push_back(Msg::Abort(format!("switch failed: {e}")));
                self.roll_back_now(&format!("switch failed: {e}"));
            }
            (SenderState::AbortingSwitch, _) => {
                // Succeeded or failed half-way: undo it whole, then thaw.
                self.switched = true;
                let why = self
                    .abort_reason
                    .take()
                    .unwrap_or_else(|| "batch given up".into());
                self.roll_back_now(&why);
            }
            _ => {}
        }
    }

    fn start_query(&mut self) {
        self.state = SenderState::Querying;
        self.deadline = None;
        self.actions.push_back(SenderAction::Query);
    }

    /// The link to the agent broke (EOF, reset, TLS error).
    pub fn handle_link_lost(&mut self, _now: Instant) {
        match self.state {
            SenderState::Preparing => self.roll_back("link to the agent lost"),
            SenderState::Switching => self.link_lost = true,
            SenderState::Committing => self.start_query(),
            SenderState::AbortingSwitch | SenderState::Querying | SenderState::Done => {}
        }
    }

    /// The clock reached [`Sender::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_none_or(|d| now < d) {
            return;
        }
        match self.state {
            SenderState::Preparing => {
                self.outbox.push_back(Msg::Abort("timeout".into()));
                self.roll_back("timed out waiting for the agent");
            }
            SenderState::Committing => self.start_query(),
            _ => {}
        }
    }

    /// The answer to a `Query`, or `Err` when the agent could not be asked
    /// (an agent that does not answer after COMMIT may have delivered the
    /// connections before it died: only its word, [`BatchStatus::NotResumed`],
    /// allows a roll back).
    pub fn handle_status(&mut self, status: Result<BatchStatus, String>) {
        if self.state != SenderState::Querying {
            return;
        }
        match status {
            Ok(BatchStatus::Committed(committed)) => {
                let committed: BTreeSet<ConnId> = committed.into_iter().collect();
                let moved: Vec<ConnId> = self
                    .ready
                    .iter()
                    .copied()
                    .filter(|i| committed.contains(i))
                    .collect();
                let lost: Vec<ConnId> = self
                    .ready
                    .iter()
                    .copied()
                    .filter(|i| !committed.contains(i))
                    .collect();
                for &i in &moved {
                    self.fates.insert(i, Fate::Moved);
                }
                if !moved.is_empty() {
                    self.actions.push_back(SenderAction::Discard(moved));
                }
                if !lost.is_empty() {
                    for &i in &lost {
                        self.fates.insert(
                            i,
                            Fate::Unknown("agent committed the batch without it".into()),
                        );
                    }
                    self.actions.push_back(SenderAction::Hold(lost));
                }
                self.ready.clear();
                self.finish();
            }
            Ok(BatchStatus::NotResumed) => self.roll_back("the agent resumed none of them"),
            Ok(BatchStatus::Unknown) => {
                self.hold_ready("the agent has no record of the batch after COMMIT")
            }
            Err(e) => self.hold_ready(&format!("agent unreachable after COMMIT: {e}")),
        }
    }

    /// Leaves every connection still awaiting its fate frozen and locked.
    fn hold_ready(&mut self, why: &str) {
        let held: Vec<ConnId> = std::mem::take(&mut self.ready).into_iter().collect();
        for &i in &held {
            self.fates.insert(i, Fate::Unknown(why.to_string()));
        }
        if !held.is_empty() {
            self.actions.push_back(SenderAction::Hold(held));
        }
        self.finish();
    }
}

/// True when the outcomes name each connection once, and only ones in
/// `expected`.
fn all_distinct_in(outcomes: &[(ConnId, Result<(), String>)], expected: &BTreeSet<ConnId>) -> bool {
    let mut named = BTreeSet::new();
    outcomes
        .iter()
        .all(|(id, _)| expected.contains(id) && named.insert(*id))
}
