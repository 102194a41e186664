//! The sender: freezes connections, prepares them at an agent, switches
//! their traffic, commits, and discards or thaws its copies. A thin driver
//! around [`crate::machine::Sender`]: the machine decides what to dump, how
//! to cut PREPARE frames and when to commit; this module does the I/O.

use crate::auth::{peek_now, Auth, AuthError, Channel, Waiting};
use crate::machine::{self, ConnId, Fate, Framing, Msg, SenderAction, SwitchOutcome};
use crate::wire::{self, pb, WireError};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tcpr_engine::{Flow, FlowLock, FreezeOptions, Frozen, ListenerOptions};

mod channel;
mod freeze;
mod report;
mod switch;
pub use channel::{MAX_IDLE_AGE, MAX_IDLE_PER_AGENT};
use freeze::freeze_with_spares;
pub use report::{Moved, Progress, Refused, Report, RolledBack, Timings, Unknown};
pub use switch::{PeerSeq, Switch, SwitchError, TrafficHook};

/// One connection to move, with its application state
/// ([`Outgoing::new`]).
#[derive(Debug)]
#[non_exhaustive]
pub struct Outgoing {
    /// The socket. The handoff freezes a duplicate of it, so this one can
    /// be the application's only handle: it is given back in the
    /// [`Report`] whenever the connection does not move.
    pub sock: OwnedFd,
    /// Opaque application state that travels with it.
    pub blob: Vec<u8>,
    /// The listener it was accepted from, when its socket options were not
    /// changed since the accept: its dump takes the options every accepted
    /// connection inherits from here ([`tcpr_engine::Frozen::dump_accepted`]).
    pub accepted_from: Option<Arc<ListenerOptions>>,
}

impl Outgoing {
    /// A connection to move, its options read in full at the dump.
    pub fn new(sock: OwnedFd, blob: Vec<u8>) -> Outgoing {
        Outgoing {
            sock,
            blob,
            accepted_from: None,
        }
    }
}

/// Settings of one handoff.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The agent.
    pub to: SocketAddr,
    /// How to authenticate.
    pub auth: Auth,
    /// Bound of every wait for the agent.
    pub timeout: Duration,
    /// Lease of the source lock.
    pub lease: Duration,
    /// How traffic moves.
    pub switch: Switch,
    /// How images are cut into PREPARE frames.
    pub framing: Framing,
    /// Take a channel to this agent kept from an earlier batch of this
    /// process, checked before anything is frozen, and keep this batch's
    /// channel for the next one when it ends cleanly (at most
    /// [`MAX_IDLE_PER_AGENT`] per agent, each for at most
    /// [`MAX_IDLE_AGE`]). Off: one new channel per batch, closed after it.
    pub reuse_channel: bool,
}

impl MigrateOptions {
    /// Defaults: 2 s timeout, 60 s lease, [`Framing::default`], channels
    /// reused.
    pub fn new(to: SocketAddr, auth: Auth) -> MigrateOptions {
        MigrateOptions {
            to,
            auth,
            timeout: Duration::from_secs(2),
            lease: tcpr_engine::DEFAULT_LEASE,
            switch: Switch::Nothing,
            framing: Framing::default(),
            reuse_channel: true,
        }
    }
}

/// Why the channel to the agent could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No TCP connection.
    #[error("cannot reach the agent at {addr}: {source}")]
    Unreachable {
        /// The agent.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// Connected, but the agent never finished the handshake.
    #[error("the agent at {addr} did not answer within {} s", after.as_secs_f64())]
    Silent {
        /// The agent.
        addr: SocketAddr,
        /// How long we waited for each answer.
        after: Duration,
    },
    /// The handshake or the authentication failed.
    #[error("agent at {addr}: {source}")]
    Auth {
        /// The agent.
        addr: SocketAddr,
        /// Why.
        source: AuthError,
    },
}

/// Bytes gathered before a write to the TLS channel (one record is 16 KiB).
const TLS_WRITE_BUFFER: usize = 64 << 10;

/// One connection of the batch, from freeze to fate.
struct Conn {
    /// The caller's socket, kept beside the frozen duplicate when the open
    /// file limit allows (see [`freeze_with_spares`]); else, once thawed,
    /// the duplicate. For a connection whose freeze failed, the caller's
    /// socket as handed in (never frozen).
    sock: Option<OwnedFd>,
    flow: Flow,
    blob: Vec<u8>,
    accepted_from: Option<Arc<ListenerOptions>>,
    /// Input position.
    index: usize,
    /// Where the peer's sequence numbers stand, as its dump found them
    /// (for a [`TrafficHook`] that checks the flow's packets against them).
    peer_seq: Option<PeerSeq>,
}

struct Driver<'a> {
    opts: &'a MigrateOptions,
    conns: BTreeMap<ConnId, Conn>,
    frozen: BTreeMap<ConnId, Frozen>,
    /// Encoded images dumped and not yet sent (at most about a frame).
    staged: BTreeMap<ConnId, Vec<u8>>,
    /// Failures of thaw, discard or unswitch, for the report.
    trouble: BTreeMap<ConnId, String>,
    moved_address: Option<tcpr_host::addr::Assigned>,
    /// The service address as found while the agent restored, once looked
    /// for (see [`Driver::find_address_ahead`]); taken by the switch.
    found_ahead: Option<Option<tcpr_host::addr::Assigned>>,
    /// The flows a [`Switch::Hook`] switched, for its undoing.
    hooked: Vec<Flow>,
    locks: Vec<FlowLock>,
    batch: u64,
    progress: Progress,
    /// When every READY was in and the switch began, and when it ended.
    switch_started: Option<Instant>,
    switched: Option<Instant>,
    /// The channel was taken from the pool unPINGed
    /// ([`channel::Opened::unverified`]): blobs are copied into images,
    /// not moved, so that the batch can run again.
    unverified: bool,
    /// Connections whose freeze failed, and why: the agent was told of
    /// them in HELLO, so the batch withdraws them (an empty image).
    unfrozen: BTreeMap<ConnId, String>,
}

/// What travels with a connection besides its socket, kept apart while
/// the sockets are frozen.
struct Carried {
    blob: Vec<u8>,
    accepted_from: Option<Arc<ListenerOptions>>,
}

/// How one run of a batch ended.
enum Attempt {
    Done(Report),
    /// Its channel, kept and taken unPINGed, was dead: the link was lost
    /// before the agent answered anything, so before COMMIT, and every
    /// connection was thawed; here they are again, to run on a checked
    /// channel.
    DeadChannel(Vec<Outgoing>),
}

/// Said in the reason of a connection rolled back whose traffic switch
/// could not be undone ([`TrafficHook::unswitch`] failed): its packets may
/// still go to the agent's host, so it should not be served here as if
/// nothing happened.
pub const UNSWITCH_FAILED: &str = "could not undo the traffic switch";

/// Whether an agent at `to` takes handoffs now: an authenticated channel
/// opens (each step within `timeout`) and the agent answers PING with its
/// PONG, as between batches. A balancer's health check: a killed agent's
/// stand-in completes the handshake too (it answers a sender's QUERY),
/// but closes the channel on anything else, so a handshake alone took it
/// for the agent, and every connection meanwhile paid a handoff that
/// rolled back before its fallback.
pub fn probe_agent(to: SocketAddr, auth: &crate::Auth, timeout: Duration) -> Result<(), String> {
    let mut opts = MigrateOptions::new(to, auth.clone());
    opts.timeout = timeout;
    let mut ch = channel::connect(&opts).map_err(|e| e.to_string())?;
    channel::ping(&mut ch, &opts)?;
    // A clean end (close_notify): the agent logs no broken channel.
    ch.close(timeout);
    Ok(())
}

/// Moves `conns` to the agent. Every connection ends moved, rolled back
/// (thawed here, lock released, socket given back) or, only when the agent
/// became unreachable after COMMIT, unknown (left frozen and locked until
/// the lease ends, socket given back still frozen). When the batch cannot
/// start, nothing is changed and the connections come back in [`Refused`].
pub fn migrate(
    conns: Vec<Outgoing>,
    opts: &MigrateOptions,
    progress: &dyn Fn(Progress),
) -> Result<Report, Refused> {
    let (mut conns, mut ping_always) = (conns, false);
    loop {
        // At most twice: a PINGed channel is never `DeadChannel`.
        match attempt(conns, opts, progress, ping_always)? {
            Attempt::Done(mut report) => {
                report.dead_channel_retried = ping_always;
                return Ok(report);
            }
            Attempt::DeadChannel(again) => {
                tracing::info!(agent = %opts.to, "a kept channel was dead: the batch, rolled back before the agent answered, runs again on a checked one");
                (conns, ping_always) = (again, true);
            }
        }
    }
}

/// One run of [`migrate`]; `ping_always`: take no kept channel unPINGed.
fn attempt(
    conns: Vec<Outgoing>,
    opts: &MigrateOptions,
    progress: &dyn Fn(Progress),
    ping_always: bool,
) -> Result<Attempt, Refused> {
    let started = Instant::now();
    // Everything that can refuse the batch is checked before any freeze.
    let mut flows = Vec::with_capacity(conns.len());
    for c in &conns {
        match tcpr_engine::inspect_socket(c.sock.as_fd()) {
            Ok((flow, _state)) => flows.push(flow),
            Err(e) => {
                return Err(Refused {
                    error: e.into(),
                    conns,
                })
            }
        }
    }
    if let Switch::MoveAddress = opts.switch {
        let ips: BTreeSet<IpAddr> = flows.iter().map(|f| f.wire().local.ip()).collect();
        if ips.len() > 1 {
            return Err(Refused {
                error: crate::Error::Usage(
                    "--move-address moves one address: the connections have several local addresses"
                        .into(),
                ),
                conns,
            });
        }
    }
    let mut report = Report::default();
    // The channel first: a handshake, or the check of a kept channel, is
    // not part of any connection's pause, and an unreachable or
    // unauthenticated agent costs no freeze at all.
    let opened = match channel::open(opts, ping_always) {
        Ok(opened) => opened,
        Err(e) => {
            report.rolled_back = untouched(conns, flows, &e.to_string());
            return Ok(Attempt::Done(report));
        }
    };
    let channel::Opened {
        ch,
        reused,
        unverified,
        key: channel_key,
    } = opened;
    report.channel_reused = reused;
    let total = conns.len();
    // HELLO goes before the freeze: the agent, most likely asleep, wakes
    // and sets its side of the batch up while the connections are frozen
    // and dumped, instead of after (~0.1 ms of a one-connection handoff).
    let batch = batch_id();
    let mut ch = ch;
    if let Err(e) = say_hello(&mut ch, batch, total, opts, &flows) {
        // Nothing is frozen yet.
        channel::forget(&channel_key);
        if unverified {
            return Ok(Attempt::DeadChannel(conns));
        }
        let why = format!(
            "cannot reach the agent at {} over its channel: {e}",
            opts.to
        );
        report.rolled_back = untouched(conns, flows, &why);
        return Ok(Attempt::Done(report));
    }
    let channel_up = Instant::now();
    report.timings.connect = channel_up - started;
    tracing::debug!(us = started.elapsed().as_micros(), "channel up");
    let (socks, carried): (Vec<OwnedFd>, Vec<Carried>) = conns
        .into_iter()
        .map(|c| {
            let carried = Carried {
                blob: c.blob,
                accepted_from: c.accepted_from,
            };
            (c.sock, carried)
        })
        .unzip();
    let fo = FreezeOptions {
        lock: true,
        lease: opts.lease,
    };
    let frozen = match freeze_with_spares(socks, &flows, &fo) {
        Ok(mut f) => {
            freeze::fault_unfrozen(&mut f);
            f
        }
        Err((error, socks)) => {
            // The agent heard HELLO: closed, the channel tells it the
            // batch is over (it holds nothing of it yet).
            channel::close(ch);
            let conns = socks
                .into_iter()
                .zip(carried)
                .map(|(sock, c)| Outgoing {
                    sock,
                    blob: c.blob,
                    accepted_from: c.accepted_from,
                })
                .collect();
            return Err(Refused { error, conns });
        }
    };
    let mut d = Driver {
        opts,
        conns: BTreeMap::new(),
        frozen: BTreeMap::new(),
        staged: BTreeMap::new(),
        trouble: BTreeMap::new(),
        moved_address: None,
        found_ahead: None,
        hooked: vec![],
        locks: vec![],
        batch,
        switch_started: None,
        switched: None,
        unverified,
        unfrozen: BTreeMap::new(),
        progress: Progress {
            total,
            dumped: 0,
            dumped_bytes: 0,
            prepared: 0,
            finished: 0,
        },
    };
    // Ids in input order, as HELLO counted them.
    for (index, ((slot, c), flow)) in frozen.into_iter().zip(carried).zip(flows).enumerate() {
        let id = index as ConnId;
        match slot.frozen {
            Ok(f) => {
                d.frozen.insert(id, f);
            }
            Err(e) => {
                d.unfrozen.insert(id, format!("cannot freeze it: {e}"));
            }
        }
        d.conns.insert(
            id,
            Conn {
                sock: slot.spare,
                flow,
                blob: c.blob,
                accepted_from: c.accepted_from,
                index,
                peer_seq: None,
            },
        );
    }
    let frozen_at = Instant::now();
    report.timings.freeze = frozen_at - channel_up;
    tracing::debug!(us = started.elapsed().as_micros(), "frozen");
    if !d.unfrozen.is_empty()
        && matches!(opts.switch, Switch::MoveAddress | Switch::Commands { .. })
    {
        // The switch moves the traffic of every connection of the batch
        // (their one address, or whatever the commands do): one that
        // stays here, not frozen, would lose its packets to the agent's
        // host. The agent heard HELLO only: the closed channel ends it.
        channel::close(ch);
        report.rolled_back = d.roll_back_unswitchable();
        report.timings.release = Duration::ZERO;
        return Ok(Attempt::Done(report));
    }
    let (fates, clean, dead_channel) = d.run(ch, progress);
    if dead_channel {
        channel::forget(&channel_key);
        if d.unfrozen.is_empty() {
            if let Some(again) = d.take_back(&fates) {
                return Ok(Attempt::DeadChannel(again));
            }
        }
    }
    if let Some(ch) = clean {
        channel::give_back(channel_key, ch);
    }
    let done = Instant::now();
    let t = &mut report.timings;
    match (d.switch_started, d.switched) {
        (Some(from), Some(to)) => {
            t.prepare = from - frozen_at;
            t.switch = to - from;
            t.commit = done - to;
        }
        _ => t.prepare = done - frozen_at,
    }
    tracing::debug!(us = started.elapsed().as_micros(), "protocol done");
    // Locks of moved flows: the traffic went elsewhere, release them;
    // with no switch at all they stay for their lease.
    let locks = std::mem::take(&mut d.locks);
    if matches!(opts.switch, Switch::Nothing) {
        locks.into_iter().for_each(FlowLock::keep);
    } else if let Err(e) = FlowLock::release_moved(locks) {
        // The connections have moved: a lock that stays only drops packets
        // that no longer come here, until its lease ends.
        report.warnings.push(format!(
            "the locks of moved connections stay until their lease ends: {e}"
        ));
    }
    report.timings.release = done.elapsed();
    tracing::debug!(us = started.elapsed().as_micros(), "locks released");
    for (id, mut c) in std::mem::take(&mut d.conns) {
        let trouble = d.trouble.remove(&id);
        let fate = match d.unfrozen.remove(&id) {
            Some(why) => Some(Fate::RolledBack(why)),
            None => fates.get(&id).cloned(),
        };
        let fate = fate.unwrap_or_else(|| {
            // The machine gives every connection a fate; should it not, the
            // frozen copy is thawed here and the connection stays.
            Fate::RolledBack("no outcome".into())
        });
        // A frozen copy left here is one whose fate's action was never
        // performed.
        if let Err(e) = d.thaw_into(id, &mut c) {
            tracing::error!("thaw of {} failed: {e}", c.flow.local);
        }
        match fate {
            Fate::Moved => report.moved.push(Moved {
                index: c.index,
                flow: c.flow,
            }),
            Fate::RolledBack(why) => report.rolled_back.push(RolledBack {
                index: c.index,
                flow: c.flow,
                why: match trouble {
                    Some(t) => format!("{why}; {t}"),
                    None => why,
                },
                sock: c.sock,
            }),
            Fate::Unknown(why) => report.unknown.push(Unknown {
                index: c.index,
                flow: c.flow,
                why,
                sock: c.sock,
            }),
        }
    }
    report.rolled_back.sort_by_key(|r| r.index);
    Ok(Attempt::Done(report))
}

/// Every connection of a batch that ended before any freeze, as handed
/// in, rolled back for `why`.
fn untouched(conns: Vec<Outgoing>, flows: Vec<Flow>, why: &str) -> Vec<RolledBack> {
    conns
        .into_iter()
        .zip(flows)
        .enumerate()
        .map(|(index, (c, flow))| RolledBack {
            index,
            flow,
            why: why.to_string(),
            sock: Some(c.sock),
        })
        .collect()
}

/// Sends the batch's HELLO: the message the machine
/// ([`machine::Sender::new`]) begins with for `total` connections, and,
/// with `--move-address`, the address to take (the agent checks before
/// READY that it may).
fn say_hello(
    ch: &mut Channel,
    batch: u64,
    total: usize,
    opts: &MigrateOptions,
    flows: &[Flow],
) -> Result<(), WireError> {
    let mut hello = wire::to_wire(&Msg::Hello {
        batch,
        total: u32::try_from(total).unwrap_or(u32::MAX),
    });
    if let (Switch::MoveAddress, Some(pb::message::Kind::Hello(h)), Some(flow)) =
        (&opts.switch, hello.kind.as_mut(), flows.first())
    {
        h.take_address = flow.wire().local.ip().to_string();
    }
    wire::write_msg(ch, &hello)?;
    ch.flush()?;
    Ok(())
}

fn batch_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 40)
}

impl Driver<'_> {
    /// Runs the batch on `ch`; gives the channel back when the batch
    /// ended cleanly on it ([`machine::Sender::channel_reusable`], and no
    /// read of it timed out, which may have left half a frame behind).
    /// Says too whether an unverified channel was dead: its link lost
    /// (not timed out) before the agent sent a single message.
    fn run(
        &mut self,
        ch: Channel,
        progress: &dyn Fn(Progress),
    ) -> (BTreeMap<ConnId, Fate>, Option<Channel>, bool) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        if ids.is_empty() {
            channel::close(ch);
            return (BTreeMap::new(), None, false);
        }
        let mut m = machine::Sender::new(
            self.batch,
            ids,
            self.opts.timeout,
            self.opts.framing,
            Instant::now(),
        );
        let mut ch = Some(ch);
        let mut read_timed_out = false;
        // Any message read from the agent, and a link lost (not a timeout).
        let (mut heard, mut lost) = (false, false);
        loop {
            // Messages first, then one action: a frame goes out as soon as
            // it is cut, so at most about one frame of images waits here.
            while let Some(msg) = m.poll_transmit() {
                let Some(c) = ch.as_mut() else { continue };
                if let Err(e) = self.send(c, msg) {
                    tracing::info!("link lost while sending: {e}");
                    lost = true;
                    ch = None;
                    m.handle_link_lost(Instant::now());
                }
            }
            if let Some(a) = m.poll_action() {
                self.act(a, &mut m, ch.as_ref());
                self.progress.finished = m.fates().len();
                progress(self.progress);
                continue;
            }
            if m.is_done() {
                break;
            }
            // Wait for the agent.
            let Some(c) = ch.as_mut() else {
                // No link: the machine moves on by the clock.
                let now = Instant::now();
                if let Some(d) = m.poll_timeout() {
                    std::thread::sleep(d.saturating_duration_since(now));
                }
                m.handle_timeout(Instant::now());
                continue;
            };
            self.find_address_ahead();
            let wait = m.poll_timeout().map(|d| {
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            });
            let _ = c.tcp().set_read_timeout(wait);
            let got = wire::read_msg(c);
            heard |= got.is_ok();
            match got {
                Ok(msg) => match wire::from_wire(msg) {
                    Ok(msg) => {
                        if let Msg::Ready(o) = &msg {
                            self.progress.prepared += o.len();
                        }
                        m.handle_message(msg, Instant::now());
                        self.progress.finished = m.fates().len();
                        progress(self.progress);
                    }
                    Err(e) => {
                        tracing::warn!("agent misbehaved: {e}");
                        ch = None;
                        m.handle_link_lost(Instant::now());
                    }
                },
                Err(WireError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    read_timed_out = true;
                    m.handle_timeout(Instant::now());
                }
                Err(e) => {
                    tracing::info!("link to the agent lost: {e}");
                    lost = true;
                    ch = None;
                    m.handle_link_lost(Instant::now());
                }
            }
        }
        // Images of a batch given up mid-way.
        self.staged.clear();
        let clean = ch.filter(|_| m.channel_reusable() && !read_timed_out);
        let dead_channel = self.unverified && lost && !heard && !read_timed_out;
        (m.fates().clone(), clean, dead_channel)
    }

    /// Thaws every frozen connection of a batch that cannot switch (some
    /// of its connections could not be frozen, and the switch would move
    /// theirs too) and gives all back, rolled back, in their order.
    fn roll_back_unswitchable(&mut self) -> Vec<RolledBack> {
        let why_all = format!(
            "not moved: {} connection(s) of the batch could not be frozen, and the traffic \
             switch moves every connection's traffic",
            self.unfrozen.len()
        );
        let mut out = Vec::with_capacity(self.conns.len());
        for (id, mut c) in std::mem::take(&mut self.conns) {
            let why = match self.unfrozen.remove(&id) {
                Some(why) => why,
                None => match self.thaw_into(id, &mut c) {
                    Ok(()) => why_all.clone(),
                    Err(e) => format!("{why_all}; thaw failed: {e}"),
                },
            };
            out.push(RolledBack {
                index: c.index,
                flow: c.flow,
                why,
                sock: c.sock,
            });
        }
        out
    }

    /// Thaws the frozen copy of `id`, taken out of the batch as `c`, if it
    /// has one. The caller's socket, when kept beside the copy, stays in
    /// `c`; else the thawed copy takes its place. The copy is gone either
    /// way; an error says why its thaw failed.
    fn thaw_into(&mut self, id: ConnId, c: &mut Conn) -> Result<(), tcpr_engine::Error> {
        if let Some(f) = self.frozen.remove(&id) {
            c.sock.get_or_insert(f.thaw()?);
        }
        Ok(())
    }

    /// The connections again, in their order, for another run of the
    /// batch: only when every one of them was rolled back, thawed without
    /// trouble and has its socket (else `None`, and the report says what
    /// became of each, as for any batch).
    fn take_back(&mut self, fates: &BTreeMap<ConnId, Fate>) -> Option<Vec<Outgoing>> {
        let whole = self.frozen.is_empty()
            && self.trouble.is_empty()
            && self.conns.iter().all(|(id, c)| {
                c.sock.is_some() && matches!(fates.get(id), Some(Fate::RolledBack(_)))
            });
        if !whole {
            return None;
        }
        // Ids were given in input order, every connection froze.
        let conns = std::mem::take(&mut self.conns);
        Some(
            conns
                .into_values()
                .filter_map(|c| {
                    c.sock.map(|sock| Outgoing {
                        sock,
                        blob: c.blob,
                        accepted_from: c.accepted_from,
                    })
                })
                .collect(),
        )
    }

    /// Writes one machine message; a PREPARE carries the staged images of
    /// the connections it names (an empty one for a dump that failed: the
    /// agent refuses it, and the machine has rolled it back already).
    fn send(&mut self, c: &mut Channel, msg: Msg) -> Result<(), WireError> {
        match msg {
            Msg::Prepare(ids) => {
                let images: Vec<(ConnId, Vec<u8>)> = ids
                    .into_iter()
                    .map(|id| (id, self.staged.remove(&id).unwrap_or_default()))
                    .collect();
                let refs: Vec<(ConnId, &[u8])> =
                    images.iter().map(|(id, img)| (*id, &img[..])).collect();
                // Headers and images in TLS records of a useful size.
                let mut w = io::BufWriter::with_capacity(TLS_WRITE_BUFFER, &mut *c);
                wire::write_prepare(&mut w, &refs)?;
                w.flush()?;
            }
            // Sent before the freeze (`say_hello`), for the same batch
            // and count.
            Msg::Hello { batch, total } => {
                debug_assert_eq!(
                    (batch, total as usize),
                    (self.batch, self.progress.total),
                    "the machine's HELLO is the one sent before the freeze"
                );
                return Ok(());
            }
            other => wire::write_msg(c, &wire::to_wire(&other))?,
        }
        c.flush()?;
        Ok(())
    }

    fn act(&mut self, a: SenderAction, m: &mut machine::Sender, ch: Option<&Channel>) {
        let linked = ch.is_some();
        match a {
            SenderAction::Dump(id) => {
                let r = self.dump(id, linked);
                m.handle_dumped(id, r, Instant::now());
            }
            SenderAction::Switch(ids) => {
                tracing::debug!("all ready: switching");
                self.switch_started = Some(Instant::now());
                let r = match self.switch(&ids) {
                    Ok(moved_address) => SwitchOutcome::Switched { moved_address },
                    Err(e) => SwitchOutcome::Failed(e.to_string()),
                };
                self.switched = Some(Instant::now());
                tracing::debug!("switched");
                // An agent that died while we switched (its end of the
                // channel closed or reset) never reads the COMMIT we would
                // send: roll back now rather than hold the connections as
                // unknown (frozen here, owned by no one).
                if ch.is_some_and(|c| peek_now(c.tcp()) == Waiting::End) {
                    tracing::info!("link to the agent lost while switching");
                    m.handle_link_lost(Instant::now());
                }
                m.handle_switched(r, Instant::now());
            }
            SenderAction::Unswitch => {
                if let Err(e) = self.unswitch() {
                    tracing::error!("{UNSWITCH_FAILED}: {e}");
                    let why = format!("{UNSWITCH_FAILED}: {e}");
                    for id in self.frozen.keys() {
                        self.trouble.insert(*id, why.clone());
                    }
                }
            }
            SenderAction::Thaw(ids) => {
                for id in ids {
                    if let Some(f) = self.frozen.remove(&id) {
                        match f.thaw() {
                            // Without a spare handle, the thawed one goes back.
                            Ok(fd) => {
                                if let Some(c) = self.conns.get_mut(&id) {
                                    c.sock.get_or_insert(fd);
                                }
                            }
                            Err(e) => {
                                tracing::error!("thaw failed: {e}");
                                self.trouble.insert(id, format!("thaw failed: {e}"));
                            }
                        }
                    }
                }
            }
            SenderAction::Discard(ids) => {
                for id in ids {
                    if let Some(f) = self.frozen.remove(&id) {
                        match f.discard() {
                            Ok(Some(l)) => self.locks.push(l),
                            Ok(None) => {}
                            Err(e) => tracing::error!("discard failed: {e}"),
                        }
                    }
                }
            }
            SenderAction::Hold(ids) => {
                for id in ids {
                    if let Some(f) = self.frozen.remove(&id) {
                        f.leave_frozen();
                    }
                }
            }
            SenderAction::Query => {
                let status = self.query();
                m.handle_status(status);
            }
        }
    }

    /// Dumps and encodes one image and stages it for its PREPARE frame.
    /// Without a link the machine is rolling back: nothing is dumped.
    fn dump(&mut self, id: ConnId, linked: bool) -> Result<usize, String> {
        if !linked {
            return Err("the link to the agent is lost".into());
        }
        let f = self.frozen.get(&id).ok_or("not frozen")?;
        let accepted_from = self.conns.get(&id).and_then(|c| c.accepted_from.as_deref());
        let mut img = match accepted_from {
            Some(from) => f.dump_accepted(from),
            None => f.dump(),
        }
        .map_err(|e| e.to_string())?;
        if let Some(c) = self.conns.get_mut(&id) {
            c.peer_seq = Some(PeerSeq {
                next: img.recv_seq.0,
                ack: img
                    .send_seq
                    .back(u32::try_from(img.send_queue.len()).unwrap_or(u32::MAX))
                    .0,
            });
            img.app_blob = if self.unverified {
                c.blob.clone()
            } else {
                std::mem::take(&mut c.blob)
            };
        }
        let bytes = img.encode().map_err(|e| e.to_string())?;
        drop(img);
        let len = bytes.len();
        self.staged.insert(id, bytes);
        self.progress.dumped += 1;
        self.progress.dumped_bytes += len as u64;
        Ok(len)
    }

    /// Asks the agent, on a new channel, what became of the batch. Retries
    /// for one timeout: a dying agent may still accept a connection it then
    /// resets, and a restarted one answers from its journal once it
    /// listens again. An agent that cannot be asked is not an answer: it
    /// may have delivered the connections before it went away.
    fn query(&self) -> Result<machine::BatchStatus, String> {
        let deadline = Instant::now().checked_add(self.opts.timeout);
        loop {
            match self.query_once() {
                Ok(r) => return Ok(r),
                Err(e) if deadline.is_none_or(|d| Instant::now() >= d) => return Err(e),
                Err(e) => {
                    tracing::info!("query failed, retrying: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn query_once(&self) -> Result<machine::BatchStatus, String> {
        let mut ch = channel::connect(self.opts).map_err(|e| e.to_string())?;
        let q = pb::Message {
            kind: Some(pb::message::Kind::Query(pb::Query { batch: self.batch })),
        };
        wire::write_msg(&mut ch, &q).map_err(|e| e.to_string())?;
        ch.flush().map_err(|e| e.to_string())?;
        let answer = wire::read_msg(&mut ch).map_err(|e| e.to_string())?;
        channel::close(ch);
        match answer.kind {
            Some(pb::message::Kind::Status(s)) if s.batch == self.batch => {
                Ok(wire::status_from_wire(s))
            }
            _ => Err("the agent answered QUERY with something else".into()),
        }
    }
}
