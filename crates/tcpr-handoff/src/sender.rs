//! The sender: freezes connections, prepares them at an agent, switches
//! their traffic, commits, and discards or thaws its copies. A thin driver
//! around [`crate::machine::Sender`].

use crate::auth::{Auth, Channel};
use crate::machine::{self, ConnId, Fate, Msg, SenderAction};
use crate::wire::{self, pb, WireError};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::process::Command;
use std::time::{Duration, Instant};
use tcpr_engine::{freeze_many, Flow, FlowLock, FreezeOptions, Frozen};

/// One connection to move, with its application state.
#[derive(Debug)]
pub struct Outgoing {
    /// The socket (a duplicate of the application's is fine).
    pub sock: OwnedFd,
    /// Opaque application state that travels with it.
    pub blob: Vec<u8>,
}

/// How the flows' packets reach the agent's host once committed.
#[derive(Debug, Clone)]
pub enum Switch {
    /// Something else takes care of it (or the test does).
    Nothing,
    /// The connections' local address moves: removed here, added at the
    /// agent's host and announced there.
    MoveAddress,
    /// Shell commands: `switch` before COMMIT, `unswitch` on roll back.
    Commands {
        /// Run to send the flows to the agent.
        switch: String,
        /// Run to undo it.
        unswitch: String,
    },
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
    /// Images per PREPARE frame.
    pub chunk: usize,
}

impl MigrateOptions {
    /// Defaults: 2 s timeout, 60 s lease, 64 images per frame.
    pub fn new(to: SocketAddr, auth: Auth) -> MigrateOptions {
        MigrateOptions {
            to,
            auth,
            timeout: Duration::from_secs(2),
            lease: tcpr_engine::DEFAULT_LEASE,
            switch: Switch::Nothing,
            chunk: 64,
        }
    }
}

/// Progress of a handoff, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Connections in the batch.
    pub total: usize,
    /// Answered by READY.
    pub prepared: usize,
    /// Given a fate.
    pub finished: usize,
}

/// What became of each connection.
#[derive(Debug, Default)]
pub struct Report {
    /// Live at the agent.
    pub moved: Vec<Flow>,
    /// Live here again, with why.
    pub rolled_back: Vec<(Flow, String)>,
    /// Frozen and locked here until the lease ends; the agent may own them.
    pub unknown: Vec<(Flow, String)>,
}

impl Report {
    /// True when every connection moved.
    pub fn all_moved(&self) -> bool {
        self.rolled_back.is_empty() && self.unknown.is_empty()
    }
}

fn sh(cmd: &str) -> Result<(), String> {
    let st = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .map_err(|e| e.to_string())?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("`{cmd}` failed ({st})"))
    }
}

struct Driver<'a> {
    opts: &'a MigrateOptions,
    frozen: BTreeMap<ConnId, Frozen>,
    images: BTreeMap<ConnId, Vec<u8>>,
    flows: BTreeMap<ConnId, Flow>,
    moved_address: Option<tcpr_engine::addr::Assigned>,
    locks: Vec<FlowLock>,
    batch: u64,
}

/// Moves `conns` to the agent. Every connection ends moved, rolled back
/// (thawed here, lock released) or, only when the agent became unreachable
/// after COMMIT, unknown (left frozen and locked until the lease ends).
pub fn migrate(
    conns: Vec<Outgoing>,
    opts: &MigrateOptions,
    progress: &dyn Fn(Progress),
) -> Result<Report, crate::Error> {
    let mut report = Report::default();
    let blobs: Vec<Vec<u8>> = conns.iter().map(|c| c.blob.clone()).collect();
    let socks: Vec<OwnedFd> = conns.into_iter().map(|c| c.sock).collect();
    let total = socks.len();
    let started = Instant::now();
    // The channel first: a handshake is not part of any connection's pause,
    // and an unreachable or unauthenticated agent costs no freeze at all.
    let ch = match connect(opts) {
        Ok(ch) => ch,
        Err(e) => {
            for s in &socks {
                let flow = tcpr_engine::inspect_socket(std::os::fd::AsFd::as_fd(s))?.0;
                report.rolled_back.push((flow, e.clone()));
            }
            return Ok(report);
        }
    };
    tracing::debug!(us = started.elapsed().as_micros(), "channel up");
    let frozen = freeze_many(
        socks,
        &FreezeOptions {
            lock: true,
            lease: opts.lease,
        },
    )?;
    let mut d = Driver {
        opts,
        frozen: BTreeMap::new(),
        images: BTreeMap::new(),
        flows: BTreeMap::new(),
        moved_address: None,
        locks: vec![],
        batch: batch_id(),
    };
    for (i, (f, blob)) in frozen.into_iter().zip(blobs).enumerate() {
        let id = i as ConnId;
        match f {
            Ok(f) => match f.dump() {
                Ok(mut img) => {
                    img.app_blob = blob;
                    d.flows.insert(id, f.flow());
                    d.images.insert(id, img.encode());
                    d.frozen.insert(id, f);
                }
                Err(e) => {
                    let flow = f.flow();
                    drop(f); // thaws
                    report.rolled_back.push((flow, format!("dump failed: {e}")));
                }
            },
            Err(e) => report.rolled_back.push((
                Flow {
                    local: SocketAddr::from(([0, 0, 0, 0], 0)),
                    peer: SocketAddr::from(([0, 0, 0, 0], 0)),
                },
                e.to_string(),
            )),
        }
    }
    tracing::debug!(us = started.elapsed().as_micros(), "frozen and dumped");
    if let Switch::MoveAddress = opts.switch {
        let ips: std::collections::BTreeSet<IpAddr> =
            d.flows.values().map(|f| f.local.ip()).collect();
        if ips.len() > 1 {
            return Err(crate::Error::Usage(
                "--move-address moves one address: the connections have several local addresses"
                    .into(),
            ));
        }
    }
    let ids: Vec<ConnId> = d.frozen.keys().copied().collect();
    let fates = d.run(ids, total, ch, progress);
    tracing::debug!(us = started.elapsed().as_micros(), "protocol done");
    for (id, fate) in fates {
        let flow = d.flows[&id];
        match fate {
            Fate::Moved => report.moved.push(flow),
            Fate::RolledBack(why) => report.rolled_back.push((flow, why)),
            Fate::Unknown(why) => report.unknown.push((flow, why)),
        }
    }
    // Locks of moved flows: the traffic went elsewhere, release them;
    // with no switch at all they stay for their lease.
    let release = !matches!(opts.switch, Switch::Nothing);
    let locks = std::mem::take(&mut d.locks);
    if release {
        FlowLock::release_moved(locks)?;
    } else {
        locks.into_iter().for_each(FlowLock::keep);
    }
    tracing::debug!(us = started.elapsed().as_micros(), "locks released");
    Ok(report)
}

/// Opens the authenticated channel to the agent.
fn connect(opts: &MigrateOptions) -> Result<Channel, String> {
    let tcp = TcpStream::connect_timeout(&opts.to, opts.timeout)
        .map_err(|e| format!("cannot reach the agent at {}: {e}", opts.to))?;
    tcp.set_read_timeout(Some(opts.timeout))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(opts.timeout * 4))
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let cfg = opts.auth.client_config().map_err(|e| e.to_string())?;
    opts.auth
        .connect(cfg, opts.to.ip(), tcp)
        .map_err(|e| format!("agent at {}: {e}", opts.to))
}

fn batch_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 40)
}

impl Driver<'_> {
    fn run(
        &mut self,
        ids: Vec<ConnId>,
        total: usize,
        ch: Channel,
        progress: &dyn Fn(Progress),
    ) -> BTreeMap<ConnId, Fate> {
        let now = Instant::now();
        let mut m = machine::Sender::new(self.batch, ids.clone(), self.opts.timeout, now);
        if ids.is_empty() {
            return BTreeMap::new();
        }
        let mut ch = Some(ch);
        let mut prepared = 0usize;
        loop {
            // Send what the machine wants sent.
            while let Some(msg) = m.poll_transmit() {
                let Some(c) = ch.as_mut() else { continue };
                if let Err(e) = self.send(c, &msg, &mut m, &mut prepared, total, progress) {
                    tracing::info!("link lost while sending: {e}");
                    ch = None;
                    m.handle_link_lost(Instant::now());
                }
            }
            while let Some(a) = m.poll_action() {
                self.act(a, &mut m);
            }
            if m.is_done() {
                break;
            }
            if m.poll_transmit_pending() {
                continue;
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
            if let Some(d) = m.poll_timeout() {
                let wait = d
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                let _ = c.tcp().set_read_timeout(Some(wait));
            } else {
                let _ = c.tcp().set_read_timeout(None);
            }
            match wire::read_msg(c) {
                Ok(msg) => match wire::from_wire(msg) {
                    Ok(msg) => {
                        if let Msg::Ready(o) = &msg {
                            prepared += o.len();
                            progress(Progress {
                                total,
                                prepared,
                                finished: m.fates().len(),
                            });
                        }
                        m.handle_message(msg, Instant::now());
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
                    m.handle_timeout(Instant::now());
                }
                Err(e) => {
                    tracing::info!("link to the agent lost: {e}");
                    ch = None;
                    m.handle_link_lost(Instant::now());
                }
            }
        }
        progress(Progress {
            total,
            prepared,
            finished: m.fates().len(),
        });
        m.fates().clone()
    }

    /// Writes one machine message; PREPARE is split into frames of images,
    /// with READY answers read in between so neither side's buffer fills.
    fn send(
        &mut self,
        c: &mut Channel,
        msg: &Msg,
        m: &mut machine::Sender,
        prepared: &mut usize,
        total: usize,
        progress: &dyn Fn(Progress),
    ) -> Result<(), WireError> {
        match msg {
            Msg::Prepare(ids) => {
                let mut in_flight = 0usize;
                for chunk in ids.chunks(self.opts.chunk.max(1)) {
                    let frame = pb::Message {
                        kind: Some(pb::message::Kind::Prepare(pb::Prepare {
                            connections: chunk
                                .iter()
                                .map(|&id| pb::PreparedConnection {
                                    id,
                                    image: self.images.get(&id).cloned().unwrap_or_default(),
                                })
                                .collect(),
                        })),
                    };
                    wire::write_msg(c, &frame)?;
                    c.flush()?;
                    in_flight += 1;
                    // Keep at most 8 frames unanswered.
                    while in_flight >= 8 {
                        let r = wire::from_wire(wire::read_msg(c)?)?;
                        if let Msg::Ready(o) = &r {
                            *prepared += o.len();
                            in_flight -= 1;
                            progress(Progress {
                                total,
                                prepared: *prepared,
                                finished: 0,
                            });
                        }
                        m.handle_message(r, Instant::now());
                        if m.is_done() {
                            return Ok(());
                        }
                    }
                }
                Ok(())
            }
            Msg::Commit(_) => {
                let mut w = wire::to_wire(msg);
                if let (Some(moved), Some(pb::message::Kind::Commit(c))) =
                    (&self.moved_address, w.kind.as_mut())
                {
                    c.add_address = Some(pb::AddressMove {
                        cidr: moved.cidr(),
                        dev: String::new(),
                    });
                }
                wire::write_msg(c, &w)?;
                c.flush()?;
                Ok(())
            }
            Msg::Hello { .. } => {
                let mut w = wire::to_wire(msg);
                if let (Switch::MoveAddress, Some(pb::message::Kind::Hello(h))) =
                    (&self.opts.switch, w.kind.as_mut())
                {
                    // The agent checks before READY that it may take it.
                    if let Some(f) = self.flows.values().next() {
                        h.take_address = f.local.ip().to_string();
                    }
                }
                wire::write_msg(c, &w)?;
                c.flush()?;
                Ok(())
            }
            other => {
                wire::write_msg(c, &wire::to_wire(other))?;
                c.flush()?;
                Ok(())
            }
        }
    }

    fn act(&mut self, a: SenderAction, m: &mut machine::Sender) {
        match a {
            SenderAction::Switch(ids) => {
                tracing::debug!("all ready: switching");
                let r = self.switch(&ids);
                tracing::debug!("switched");
                m.handle_switched(r, Instant::now());
            }
            SenderAction::Unswitch => {
                if let Err(e) = self.unswitch() {
                    tracing::error!("could not undo the traffic switch: {e}");
                }
            }
            SenderAction::Thaw(ids) => {
                for id in ids {
                    if let Some(f) = self.frozen.remove(&id) {
                        if let Err(e) = f.thaw() {
                            tracing::error!("thaw failed: {e}");
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

    fn switch(&mut self, ids: &[ConnId]) -> Result<(), String> {
        match &self.opts.switch {
            Switch::Nothing => Ok(()),
            Switch::Commands { switch, .. } => sh(switch),
            Switch::MoveAddress => {
                let ip = ids
                    .first()
                    .and_then(|id| self.flows.get(id))
                    .map(|f| f.local.ip())
                    .ok_or("nothing to switch")?;
                let held = tcpr_engine::addr::find(ip).map_err(|e| e.to_string())?;
                tcpr_engine::addr::remove(&held)
                    .map_err(|e| format!("remove {} from {}: {e}", held.cidr(), held.ifname))?;
                self.moved_address = Some(held);
                Ok(())
            }
        }
    }

    fn unswitch(&mut self) -> Result<(), String> {
        match &self.opts.switch {
            Switch::Nothing => Ok(()),
            Switch::Commands { unswitch, .. } => sh(unswitch),
            Switch::MoveAddress => {
                let Some(held) = self.moved_address.take() else {
                    return Ok(());
                };
                tcpr_engine::addr::add(&held)
                    .map_err(|e| format!("put {} back on {}: {e}", held.cidr(), held.ifname))?;
                tcpr_engine::announce(&held.ifname, held.ip).map_err(|e| e.to_string())
            }
        }
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
        let tcp = TcpStream::connect_timeout(&self.opts.to, self.opts.timeout)
            .map_err(|e| format!("cannot reach the agent: {e}"))?;
        tcp.set_read_timeout(Some(self.opts.timeout))
            .map_err(|e| e.to_string())?;
        let cfg = self.opts.auth.client_config().map_err(|e| e.to_string())?;
        let mut ch = self
            .opts
            .auth
            .connect(cfg, self.opts.to.ip(), tcp)
            .map_err(|e| e.to_string())?;
        let q = pb::Message {
            kind: Some(pb::message::Kind::Query(pb::Query { batch: self.batch })),
        };
        wire::write_msg(&mut ch, &q).map_err(|e| e.to_string())?;
        ch.flush().map_err(|e| e.to_string())?;
        match wire::read_msg(&mut ch).map_err(|e| e.to_string())?.kind {
            Some(pb::message::Kind::Status(s)) if s.batch == self.batch => {
                Ok(wire::status_from_wire(s))
            }
            _ => Err("the agent answered QUERY with something else".into()),
        }
    }
}
