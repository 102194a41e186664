//! The two ends of a handoff as pure state machines: no sockets, no clock,
//! no kernel. Events go in (`handle_*`, with `now` as an argument), messages
//! and actions come out (`poll_transmit`, `poll_action`, `poll_timeout`).
//! The drivers in `agent` and `sender` do the I/O; the tests in this module
//! run both ends against each other over every failure point.
//!
//! The guarantee: every connection ends either live at the source (thawed)
//! or live at the agent (resumed), never both and never neither, whatever
//! fails at a message boundary: a lost link, a timeout, a crashed agent, a
//! crashed sender after COMMIT. The one outcome the sender cannot decide
//! alone (COMMIT sent, no answer) is settled by a Query on a new channel;
//! when the agent cannot be reached at all the connections stay frozen and
//! locked (never duplicated) and the sender reports them as unknown.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// A connection's number within a batch.
pub type ConnId = u32;

/// Protocol messages, as the machines see them (images travel beside).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Opens a batch.
    Hello {
        /// Batch identity.
        batch: u64,
        /// Connections in the batch.
        total: u32,
    },
    /// Restore these (the driver attaches their images).
    Prepare(Vec<ConnId>),
    /// Per-connection restore outcomes.
    Ready(Vec<(ConnId, Result<(), String>)>),
    /// Resume and deliver these; take the service address first when the
    /// sender's switch moved it.
    Commit {
        /// The connections to resume.
        ids: Vec<ConnId>,
        /// The address the sender removed, for the agent to add.
        take_address: Option<ServiceAddress>,
    },
    /// Per-connection resume outcomes.
    Committed(Vec<(ConnId, Result<(), String>)>),
    /// Give up the batch.
    Abort(String),
    /// The agent's answer to COMMIT when it resumed none of the batch: its
    /// restored sockets are closed silently and any address it took for
    /// the batch is given back, so the sender switches back and thaws.
    CommitRefused(String),
}

/// What the agent says became of a batch: the answer to a Query, from its
/// memory or, after a restart, from its journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchStatus {
    /// No record of the batch (never heard of it, or its journal is lost):
    /// nobody can tell whether anything was resumed.
    Unknown,
    /// Committed: these were resumed and delivered; any other connection
    /// of the batch may have been resumed and lost.
    Committed(Vec<ConnId>),
    /// Nothing of the batch was resumed and nothing of it is left at the
    /// agent: the sender may roll back.
    NotResumed,
}

/// How a batch's images are cut into PREPARE frames. Frames are cut by size
/// and by count, and only a few are unanswered at once, so that neither end
/// holds more than a few frames of images whatever the batch's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    /// Encoded image bytes per frame; an image larger than this travels
    /// alone in a frame of its own size.
    pub frame_bytes: usize,
    /// Images per frame.
    pub frame_images: usize,
    /// PREPARE frames sent and not yet answered by READY.
    pub frames_in_flight: usize,
}

impl Default for Framing {
    /// 4 MiB or 64 images per frame, 8 frames unanswered: the agent
    /// restores one frame while the next ones travel, and the sender holds
    /// at most one frame being filled.
    fn default() -> Framing {
        Framing {
            frame_bytes: 4 << 20,
            frame_images: 64,
            frames_in_flight: 8,
        }
    }
}

/// A service address that moves with the connections (`ip/prefix_len`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceAddress {
    /// The address.
    pub ip: std::net::IpAddr,
    /// Its prefix length on the interface.
    pub prefix_len: u8,
}

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

/// Where a connection ended, from the sender's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Moved: live at the agent.
    Moved,
    /// Rolled back: live at the source.
    RolledBack(String),
    /// Unknown: frozen and locked at the source until the lease ends.
    Unknown(String),
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
/// 4. stop when [`Sender::is_done`].
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
                self.in_flight = self.in_flight.saturating_sub(1);
                let mut refused = vec![];
                for (id, r) in outcomes {
                    if !self.awaiting.remove(&id) {
                        return self.protocol_error("READY for a connection not awaiting it");
                    }
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
                let mut moved = vec![];
                let mut failed = vec![];
                for (id, r) in outcomes {
                    if !self.ready.remove(&id) {
                        return self.protocol_error("COMMITTED for a connection not committed");
                    }
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
                SenderState::Preparing | SenderState::Switching | SenderState::Committing,
                Msg::CommitRefused(reason),
            ) => {
                self.roll_back(&format!("agent did not resume them: {reason}"));
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

#[cfg(test)]
mod tests;
