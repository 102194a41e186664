//! What the agent does with a batch's connections: restores them and
//! locks their flows, checks before READY that it could take them over,
//! takes them over at COMMIT (delivery target, journal, service address),
//! resumes and delivers them, or discards them silently.

use super::journal::BatchLog;
use super::{check_delivery, fault_point, lock, Delivery, Shared};
use crate::deliver::{self, Delivered, Reached};
use crate::machine::{self, ConnId};
use crate::relay_worker::Handed as WorkerTook;
use crate::wire::pb;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;
use tcpr_engine::lock::Releaser;
use tcpr_engine::{Flow, FlowLock, Restored};
use tcpr_image::ConnectionImage;

/// The most copies of delivered connections a batch closes after its
/// COMMITTED ([`Session::delivered_copies`]): a balancer's batches
/// (tens), not a migration's thousands, whose FINs would wait for the
/// whole batch.
const DEFERRED_CLOSES: usize = 64;

pub(super) struct Session {
    pub(super) m: machine::Agent,
    pub(super) images: HashMap<ConnId, Result<ConnectionImage, String>>,
    pub(super) restored: HashMap<ConnId, Restored>,
    /// The address the sender said (in HELLO) it will ask us to take.
    pub(super) take_ip: Option<Result<IpAddr, String>>,
    /// The address COMMIT asks us to take.
    pub(super) add_address: Option<pb::AddressMove>,
    /// The checks made once before the first READY.
    pub(super) checked: Option<Result<(), String>>,
    /// Unix or forward delivery: connected before READY, used for the
    /// first delivery.
    pub(super) target_first: Option<Reached>,
    /// Unix delivery: an idle unix connection kept from an earlier batch
    /// ([`super::kept::KeptUnix`]), taken before READY instead of
    /// [`Session::target_first`]; its receiver takes batches, and every
    /// connection of this batch goes to it in batch messages.
    pub(super) kept: Option<UnixStream>,
    pub(super) log: Option<BatchLog>,
    /// The restored flows' packets are dropped here until the take-over
    /// is about to resume them (with a journal only): should this process
    /// die first, its restored sockets go with it, and a packet meeting no
    /// socket would draw a RST before a restarted agent could hand the
    /// batch back.
    pub(super) locks: Vec<FlowLock>,
    /// The sender's host is not this network namespace (see
    /// [`sender_elsewhere`]): no lock of its can be here.
    pub(super) sender_elsewhere: bool,
    /// Restored connections that send nothing but a window probe when
    /// resumed and wait for no acknowledgement (ESTABLISHED, no unsent
    /// data, nothing in flight): in a batch message, they are
    /// resumed while this agent's lock still holds their flows (see
    /// [`UnixBatches`]).
    pub(super) quiet: HashSet<ConnId>,
    /// What taking the HELLO's address needs looked up (see
    /// [`look_ahead`]), once tried.
    pub(super) ahead: Option<Option<Ahead>>,
    /// This agent's copies of connections its receiver acknowledged in
    /// batch messages: up to [`DEFERRED_CLOSES`] close once COMMITTED is
    /// out, not before. The close of the last copy of a connection the
    /// application has answered and closed already sends its FIN, with
    /// the client's side of it run on this thread (~10 µs each on a veth
    /// pair): work the sender need not wait for.
    pub(super) delivered_copies: Vec<OwnedFd>,
}

/// The interface towards the batch's peers and the announcement of the
/// address to take there, looked up after READY while the sender switches
/// its traffic, rather than after COMMIT within the connections' pause.
pub(super) struct Ahead {
    ifindex: u32,
    ifname: String,
    announcement: tcpr_host::Announcement,
}

/// Looks up, once per batch, what the take-over of the address HELLO
/// named will need ([`Ahead`]): called after a READY went out, when the
/// agent would otherwise only wait for COMMIT. A failed look-up is done
/// again at COMMIT, as if never tried, and fails there if it still does.
pub(super) fn look_ahead(shared: &Shared, s: &mut Session) {
    if s.ahead.is_some() || s.restored.is_empty() {
        return;
    }
    let Some(Ok(ip)) = s.take_ip.clone() else {
        return;
    };
    if !shared.cfg.may_take(ip) {
        return;
    }
    let ahead = peer_of(s).and_then(|peer| {
        let (ifindex, ifname) = tcpr_host::addr::route_interface(peer).ok()?;
        let announcement = tcpr_host::Announcement::prepare(&ifname, ip).ok()?;
        Some(Ahead {
            ifindex,
            ifname,
            announcement,
        })
    });
    s.ahead = Some(ahead);
}

/// The address of the batch's peers whose route picks the interface.
fn peer_of(s: &Session) -> Option<IpAddr> {
    s.images
        .values()
        .find_map(|i| i.as_ref().ok().map(|i| i.peer.ip().to_canonical()))
}

/// True when `sender`, the address a sender's channel comes from, is not
/// an address of this network namespace: the sender runs in another, and
/// the locks it took on the batch's flows are there, not here. Then the
/// only locks here on those flows are the agent's own, released by
/// `resume_one` right before each resume, and resume need not look for one
/// per connection ([`tcpr_engine::Restored::set_no_local_lock`]). Binding
/// to an address fails with EADDRNOTAVAIL exactly when it is not assigned
/// here (ip(7)); any other answer counts as "here", which only costs the
/// look-up.
pub(super) fn sender_elsewhere(sender: std::net::SocketAddr) -> bool {
    let ip = sender.ip().to_canonical();
    match std::net::UdpSocket::bind((ip, 0)) {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EADDRNOTAVAIL),
    }
}

/// A connection resumed, not yet delivered.
pub(super) struct Resumed {
    pub(super) id: ConnId,
    stream: TcpStream,
    img: ConnectionImage,
    target: Option<Reached>,
    /// Resumed under this agent's lock on its flow, which is still to be
    /// released before the connection is handed over.
    locked: Option<Flow>,
    /// The relay worker holds copies of it and of its server connection
    /// since before the resume (`--forward`).
    held: Option<crate::relay_worker::Held>,
}

pub(super) fn discard(shared: &Shared, s: &mut Session, ids: Vec<ConnId>) {
    let mut flows = std::collections::HashSet::new();
    for id in ids {
        if let Some(r) = s.restored.remove(&id) {
            flows.insert(r.flow());
            r.discard();
            lock(&shared.stats).discarded += 1;
        }
    }
    // One pass over each lock (a search per flow was quadratic).
    let unlocked: Vec<FlowLock> = s
        .locks
        .iter_mut()
        .filter_map(|l| l.split_off_set(&flows))
        .collect();
    s.locks.retain(|l| !l.flows().is_empty());
    // Their flows go back to the sender: the lock here no longer matters.
    if let Err(e) = FlowLock::release_moved(unlocked) {
        tracing::warn!("cannot release the lock of discarded flows: {e}");
    }
}

/// Locks the flows of the connections just restored (see
/// [`Session::locks`]); when that fails they are discarded and refused.
pub(super) fn lock_restored(
    shared: &Shared,
    s: &mut Session,
    out: &mut [(ConnId, Result<(), String>)],
) {
    let flows: Vec<Flow> = out
        .iter()
        .filter(|(_, r)| r.is_ok())
        .filter_map(|(id, _)| s.restored.get(id).map(Restored::flow))
        .collect();
    // Without a journal nobody could answer for a batch after this
    // process died: the sender holds it as unknown either way, and an
    // in-process agent's delivered connections die with it too.
    if flows.is_empty() || shared.journal.is_none() {
        return;
    }
    let ns = tcpr_engine::Netns::current();
    match FlowLock::acquire(&flows, ns, tcpr_engine::DEFAULT_LEASE) {
        Ok(l) => s.locks.push(l),
        Err(e) => {
            let why = format!("cannot lock the restored flow: {e}");
            for (id, r) in out.iter_mut().filter(|(_, r)| r.is_ok()) {
                if let Some(restored) = s.restored.remove(id) {
                    restored.discard();
                    lock(&shared.stats).discarded += 1;
                }
                *r = Err(why.clone());
            }
        }
    }
}

/// The checks made once per batch before its first READY, so that a
/// batch this agent could not take over is refused while the sender can
/// still roll back: the address it will ask for is one we may take, the
/// delivery target is there, the journal records the batch.
///
/// For a unix delivery, an idle kept unix connection found alive
/// ([`super::kept::KeptUnix::take`]: neither closed nor reset, nothing
/// unread) is proof enough that the application is there: its receiver
/// still reads it, and it is the very connection the batch will use. It
/// is held for the batch, as a new connection would be. Should the
/// application restart before COMMIT, the check there connects anew;
/// after it, [`UnixBatches`] does.
pub(super) fn before_ready(shared: &Shared, s: &mut Session) -> Result<(), String> {
    if let Some(done) = &s.checked {
        return done.clone();
    }
    let r = (|| {
        if let Some(ip) = &s.take_ip {
            let ip = ip.clone()?;
            if !shared.cfg.may_take(ip) {
                lock(&shared.stats).refused_address += 1;
                return Err(format!(
                    "this agent may not take the address {ip} (no --allow entry names it)"
                ));
            }
        }
        s.kept = match &shared.cfg.delivery {
            Delivery::Unix(_) => shared.kept.take(),
            _ => None,
        };
        if s.kept.is_none() {
            s.target_first = check_delivery(&shared.cfg.delivery)?;
        }
        if let Some(j) = &shared.journal {
            let log = j
                .begin(s.m.batch())
                .map_err(|e| format!("cannot write the agent's journal: {e}"))?;
            s.log = Some(log);
        }
        Ok(())
    })();
    s.checked = Some(r.clone());
    r
}

/// The take-over at COMMIT, before anything is resumed: the delivery
/// target is still there, the address asked for is one we may take, the
/// commit is journaled, the address is taken. An error leaves nothing
/// changed here (the address is given back if it was taken half-way).
pub(super) fn take_over(shared: &Shared, s: &mut Session, ids: &[ConnId]) -> Result<(), String> {
    let started = Instant::now();
    let address = match s.add_address.take() {
        Some(mv) => Some(address_to_take(shared, s, &mv)?),
        None => None,
    };
    // Its announcement, when looked up ahead for this very address.
    let announcement = s
        .ahead
        .as_ref()
        .and_then(Option::as_ref)
        .filter(|a| {
            address
                .as_ref()
                .is_some_and(|held| held.ifindex == a.ifindex && held.ip == a.announcement.ip())
        })
        .map(|a| &a.announcement);
    if s.kept.as_ref().is_some_and(|to| !deliver::unix_alive(to)) {
        // Its receiver went away since PREPARE: connect anew.
        s.kept = None;
    }
    match &shared.cfg.delivery {
        Delivery::Unix(_) if s.kept.is_some() => {}
        Delivery::Unix(_) | Delivery::Forward { .. } => {
            if !s.target_first.as_ref().is_some_and(Reached::alive) {
                s.target_first = check_delivery(&shared.cfg.delivery)?;
            }
        }
        d => {
            check_delivery(d)?;
        }
    }
    let target_checked = started.elapsed();
    if let Some(log) = s.log.as_mut() {
        log.commit(ids, address.as_ref().map(|a| a.ip))
            .map_err(|e| format!("cannot write the agent's journal: {e}"))?;
    }
    if let Some(held) = &address {
        if let Err(e) = take_address(held, announcement) {
            if let Some(Err(je)) = s.log.as_mut().map(BatchLog::aborted) {
                tracing::error!("the journal could not record the refused commit: {je}");
            }
            return Err(e);
        }
    }
    let address_taken = started.elapsed();
    fault_point("taken");
    // The restored flows stay locked here: each connection's lock goes in
    // `resume_one`, microseconds before its socket goes live. Released for
    // the whole batch up front, a flow whose agent died before resuming it
    // met no socket here and drew a RST (`tcpr soak --kill-anytime`); held,
    // its packets are dropped until the sender thaws its copy.
    let journaled = match (s.log.as_mut(), shared.journal.as_ref()) {
        (Some(log), Some(j)) => Some(log.resuming(j)),
        _ => None,
    };
    tracing::debug!(
        target_checked_us = target_checked.as_micros(),
        address_taken_us = address_taken.as_micros(),
        journaled_us = started.elapsed().as_micros(),
        "taken over"
    );
    if let Some(Err(e)) = journaled {
        // Nothing is resumed yet: give the address back and refuse.
        if let Some(held) = &address {
            if let Err(re) = tcpr_host::addr::remove(held) {
                tracing::error!("cannot give back {}: {re}", held.cidr());
            }
        }
        return Err(format!("cannot write the agent's journal: {e}"));
    }
    Ok(())
}

/// The address a COMMIT asks for, if this agent may take it.
pub(super) fn address_to_take(
    shared: &Shared,
    s: &Session,
    mv: &pb::AddressMove,
) -> Result<tcpr_host::addr::Assigned, String> {
    let (ip, prefix_len) = mv
        .cidr
        .split_once('/')
        .and_then(|(a, p)| Some((a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?)))
        .filter(|(ip, p)| *p <= if ip.is_ipv4() { 32 } else { 128 })
        .ok_or_else(|| format!("bad address to take: {:?}", mv.cidr))?;
    if !shared.cfg.may_take(ip) {
        lock(&shared.stats).refused_address += 1;
        return Err(format!(
            "this agent may not take the address {ip} (no --allow entry names it)"
        ));
    }
    if !mv.dev.is_empty() {
        return Err(format!(
            "the sender named the interface {:?}: this agent chooses it itself",
            mv.dev
        ));
    }
    // The interface that reaches the connections' peers, looked up after
    // READY if that worked.
    let (ifindex, ifname) = match s.ahead.as_ref().and_then(Option::as_ref) {
        Some(a) => (a.ifindex, a.ifname.clone()),
        None => {
            let peer = peer_of(s).ok_or("no connection to find the interface from")?;
            tcpr_host::addr::route_interface(peer).map_err(|e| e.to_string())?
        }
    };
    Ok(tcpr_host::addr::Assigned {
        ip,
        prefix_len,
        ifindex,
        ifname,
    })
}

/// Adds the service address here and announces it (host evacuation), with
/// `announcement` if it was prepared; on failure nothing of it stays.
pub(super) fn take_address(
    held: &tcpr_host::addr::Assigned,
    announcement: Option<&tcpr_host::Announcement>,
) -> Result<(), String> {
    tcpr_host::addr::add(held).map_err(|e| {
        format!(
            "cannot take the service address {} on {}: {e}",
            held.cidr(),
            held.ifname
        )
    })?;
    let announced = match announcement {
        Some(a) => a.send(),
        None => tcpr_host::announce(&held.ifname, held.ip),
    };
    if let Err(e) = announced {
        if let Err(re) = tcpr_host::addr::remove(held) {
            tracing::error!(
                "cannot give back {} after a failed announce: {re}",
                held.cidr()
            );
        }
        return Err(format!("cannot announce {}: {e}", held.ip));
    }
    Ok(())
}

/// Lets go of the delivery targets held for a batch that is done or given
/// up: a new unix connection (or forward one) closes empty, a kept unix
/// connection, on which nothing was sent for this batch, is kept again.
pub(super) fn let_go_targets(shared: &Shared, s: &mut Session) {
    s.target_first = None;
    if let Some(to) = s.kept.take() {
        shared.kept.put(to);
    }
}

pub(super) fn restore_one(shared: &Shared, s: &mut Session, id: ConnId) -> Result<(), String> {
    let img = match s.images.get(&id) {
        Some(Ok(img)) => img,
        Some(Err(e)) => return Err(e.clone()),
        None => return Err("no image".into()),
    };
    // An IPv4-mapped image (a dual-stack server) matches its IPv4 entry.
    let local_ip = img.local.ip().to_canonical();
    let allowed = shared.cfg.allow.iter().any(|a| {
        // Port 0: any port of that address (a VIP of `tcpr agent --vip`).
        (a.port() == img.local.port() || (a.port() == 0 && !a.ip().is_unspecified()))
            && (a.ip().to_canonical() == local_ip || a.ip().is_unspecified())
    });
    if !allowed {
        lock(&shared.stats).refused_allowlist += 1;
        return Err(format!("{} is not in this agent's allowlist", img.local));
    }
    // Nothing in flight either: a socket waiting for the acknowledgement
    // of bytes it had sent would wait for its retransmission timer (1 s
    // on a restored socket, which has no RTT yet) when its window probe is
    // dropped, since the probe's answer is what carries that acknowledgement.
    let quiet = img.state == tcpr_image::TcpState::Established
        && img.send_queue.unsent.is_empty()
        && img.send_queue.sent.is_empty();
    let r = tcpr_engine::restore(img).map_err(|e| e.to_string())?;
    s.restored.insert(id, r);
    if quiet {
        s.quiet.insert(id);
    }
    // The queues are in the socket now (the unsent tail in `Restored`):
    // keep only what delivery needs, so a batch is not held twice.
    if let Some(Ok(img)) = s.images.get_mut(&id) {
        img.recv_queue = Vec::new();
        img.send_queue = Default::default();
    }
    Ok(())
}

/// Resumes one connection of a committed batch; `releaser` (one per batch,
/// so one netlink socket) releases this agent's own lock on its flow first.
/// `batched`: it goes in a batch message on a unix connection the agent
/// holds already ([`UnixBatches`]), and needs no target of its own; if it
/// is quiet ([`Session::quiet`]) and the lock here is this agent's alone
/// ([`Session::sender_elsewhere`]), the lock stays and the connection
/// comes back [`Resumed::locked`]: its window probe is dropped, nothing
/// else is sent, and the batch message's connections are released in one
/// transaction right before it goes ([`UnixBatches`]).
pub(super) fn resume_one(
    shared: &Shared,
    s: &mut Session,
    releaser: &mut Releaser,
    id: ConnId,
    batched: bool,
) -> Result<Resumed, String> {
    let mut r = s.restored.remove(&id).ok_or("not restored")?;
    let quiet = s.quiet.remove(&id);
    let locked = (batched && quiet && s.sender_elsewhere && !s.locks.is_empty()).then(|| r.flow());
    // Otherwise this agent's own lock on the flow (`lock_restored`) goes
    // now, microseconds before the socket is live, not for the whole batch
    // before the first resume: an agent killed in between left flows with
    // no lock and no socket here, and their clients' packets drew RSTs.
    let released_here = locked.is_some()
        || s.locks.is_empty()
        || releaser
            .release(&[r.flow()])
            .inspect_err(|e| tracing::warn!("cannot release the restored flow's lock: {e}"))
            .is_ok();
    if s.sender_elsewhere && released_here {
        r.set_no_local_lock();
    }
    let Some(Ok(img)) = s.images.remove(&id) else {
        r.discard();
        return Err("no image".into());
    };
    // A unix or forward target is reached (and the PROXY header written)
    // before the connection is resumed: if nothing takes it, it is still
    // in repair mode and closes silently.
    let target = match &shared.cfg.delivery {
        Delivery::Unix(_) if batched => None,
        Delivery::Unix(_) | Delivery::Forward { .. } => {
            let reached = match s.target_first.take() {
                Some(to) => Ok(to),
                None => check_delivery(&shared.cfg.delivery)
                    .and_then(|to| to.ok_or_else(|| "no delivery target".to_string())),
            };
            let announced = reached.and_then(|to| match (&to, &shared.cfg.delivery) {
                (Reached::Forward(server), Delivery::Forward { proxy, .. }) => {
                    deliver::announce_forward(server, *proxy, img.peer, img.local)
                        .map(|()| to)
                        .map_err(|e| format!("cannot write the PROXY header: {e}"))
                }
                _ => Ok(to),
            });
            match announced {
                Ok(to) => Some(to),
                Err(e) => {
                    r.discard();
                    lock(&shared.stats).discarded += 1;
                    return Err(format!("not resumed: {e}"));
                }
            }
        }
        _ => None,
    };
    // The relay worker takes copies before the resume, so that an agent
    // killed right after it leaves the live connection to the worker, not
    // to the kernel's close (a RST, the request unread). Only where the
    // resume ends when repair mode goes off: the worker takes a copy out
    // of repair mode for a resumed connection.
    let held = match (&shared.cfg.delivery, &target) {
        (
            Delivery::Forward {
                worker: Some(w), ..
            },
            Some(Reached::Forward(server)),
        ) if r.done_when_live() => w.hold(r.socket(), server),
        _ => None,
    };
    let stream = match r.resume() {
        Ok(stream) => stream,
        Err(e) => {
            if let Some(h) = held {
                h.drop_it();
            }
            return Err(e.to_string());
        }
    };
    Ok(Resumed {
        id,
        stream,
        img,
        target,
        locked,
        held,
    })
}

/// A connection sent to a unix receiver that has not acknowledged it yet:
/// it is still ours (see [`deliver::await_unix_ack`]).
pub(super) struct Unacknowledged {
    pub(super) id: ConnId,
    to: UnixStream,
    fd: OwnedFd,
    /// The receiver's acknowledgement timeout runs from here at the
    /// earliest.
    sent_at: Instant,
}

/// Hands a resumed connection over. A unix delivery comes back
/// unacknowledged (`Ok(Some)`): [`confirm_delivery`] waits for the
/// receiver, so that the next connections can be resumed and sent
/// meanwhile. Any other is delivered (and journaled) on return.
pub(super) fn deliver_resumed(
    shared: &Shared,
    s: &mut Session,
    r: Resumed,
) -> Result<Option<Unacknowledged>, String> {
    let id = r.id;
    match deliver_one(&shared.cfg.delivery, r.stream, r.img, r.target, r.held) {
        Ok(Handed::Delivered) => {
            delivered(shared, s, &[id]);
            Ok(None)
        }
        Ok(Handed::Sent { to, fd }) => Ok(Some(Unacknowledged {
            id,
            to,
            fd,
            sent_at: Instant::now(),
        })),
        Err(e) => {
            lock(&shared.stats).undelivered += 1;
            Err(e)
        }
    }
}

/// Waits for the receiver's acknowledgement of a unix delivery, until
/// [`deliver::ACK_TIMEOUT`] after the later of its send and `turn` (when
/// the receiver was done with the one before): the connection is
/// delivered then (and journaled), or closed silently and reported, as
/// when it was sent alone. A receiver that takes batches gives its unix
/// connection back (`Ok(Some)`), for [`UnixBatches`], with what it said.
pub(super) fn confirm_delivery(
    shared: &Shared,
    s: &mut Session,
    turn: Instant,
    u: Unacknowledged,
) -> Result<Option<(UnixStream, deliver::Receives)>, String> {
    let since = u.sent_at.max(turn);
    let left = deliver::ACK_TIMEOUT.saturating_sub(since.elapsed());
    match deliver::await_first_ack(&u.to, left) {
        Ok(receives) => {
            delivered(shared, s, &[u.id]);
            Ok(receives.batches().then_some((u.to, receives)))
        }
        Err(e) => {
            lock(&shared.stats).undelivered += 1;
            Err(close_undelivered(u.fd, unix_failure(shared, &e)))
        }
    }
}

/// What a failed unix delivery reports.
fn unix_failure(shared: &Shared, e: &std::io::Error) -> String {
    let path = match &shared.cfg.delivery {
        Delivery::Unix(path) => path.display().to_string(),
        _ => String::new(),
    };
    format!("the application at {path}: {e}")
}

fn delivered(shared: &Shared, s: &mut Session, ids: &[ConnId]) {
    lock(&shared.stats).delivered += ids.len() as u64;
    if let Some(Err(e)) = s.log.as_mut().map(|l| l.delivered(ids)) {
        tracing::error!("the journal could not record a delivery: {e}");
    }
}

/// Each connection's outcome, in the order settled.
type Outcomes = Vec<(ConnId, Result<(), String>)>;

/// Batch messages sent and not yet acknowledged, at most: the agent
/// resumes the next batch while the receiver takes these.
const BATCHES_IN_FLIGHT: usize = 2;

/// Resumed connections going to a unix receiver that takes batches (see
/// [`crate::deliver`]), on the unix connection of its first delivery: up
/// to [`deliver::BATCH_MAX`] per message, up to [`BATCHES_IN_FLIGHT`]
/// messages unacknowledged. Each connection is the agent's until its
/// message's acknowledgement; one whose message is not acknowledged (the
/// receiver died, failed, or took too long) is closed silently and
/// reported, as a connection sent alone. After a failure the unix
/// connection is given up ([`UnixBatches::broken`]): acknowledgements
/// after a missing one could be taken for the wrong message. Otherwise,
/// once every message on it was acknowledged, the unix connection is kept
/// for the next batch ([`UnixBatches::into_kept`]), whose connections all
/// go in batch messages on it ([`UnixBatches::kept`]).
///
/// A kept connection whose receiver closed it since (the application
/// restarted) fails the first send on it (EPIPE, ECONNRESET): nothing was
/// delivered on it (a receiver acknowledges only whole messages and drops
/// the descriptors of a partial one), so a new unix connection takes the
/// message's connections, the first alone as on any new unix connection
/// (the receiver's answer says whether the rest go in a batch message or
/// one per unix connection), and the batch goes on. A receiver that
/// closes it after the send, before its acknowledgement, loses that
/// message's connections (closed silently here, reported), as a receiver
/// that stops while any delivery is on its way does.
///
/// A message's quiet connections were resumed under this agent's lock
/// ([`resume_one`]): their flows are released together, in one nf_tables
/// transaction, right before the message is sent, so that no flow is ever
/// without both lock and live socket here (an agent killed before leaves
/// them locked; the sockets it had resumed close with it, and their FINs
/// meet the lock), and no application holds a connection whose packets
/// are still dropped. One transaction per connection was about a quarter
/// of a 10,000-connection commit; the window probe each sent on resume,
/// answered at once by the peer, another large share. Dropped here, the
/// probe costs only the peer's early answer: the socket has the peer's
/// window from the image (a zero one is probed by its own timer), and
/// what the peer had not acknowledged goes again on the socket's
/// retransmission timer, as it would after the answer. A client's packet
/// that arrives between the resume and the release (a millisecond or
/// two) is dropped, as it was before the resume.
pub(super) struct UnixBatches {
    to: UnixStream,
    /// `to` was kept from an earlier batch and nothing was sent on it for
    /// this one yet.
    kept: bool,
    /// Its receiver answered "kK": `to` may be kept for the next batch.
    keepable: bool,
    /// Resumed, not sent yet, with the flows still locked here.
    pending: Vec<Pending>,
    /// Sent, oldest first: the connections and when.
    sent: VecDeque<(Vec<(ConnId, OwnedFd)>, Instant)>,
    /// When the receiver was done with the message before.
    settled: Instant,
    /// Why the unix connection was given up.
    broken: Option<String>,
}

impl UnixBatches {
    /// Batches on `to`, the unix connection of a receiver that asked for
    /// them; `receives` is what it answered.
    pub(super) fn new(to: UnixStream, receives: deliver::Receives) -> UnixBatches {
        bound_sends(&to);
        UnixBatches::on(to, false, receives == deliver::Receives::KeptBatches)
    }

    /// Batches on `to`, a unix connection kept from an earlier batch
    /// ([`super::kept::KeptUnix`], which bounded its sends): its receiver
    /// took batches there, so this batch's first message is a batch
    /// message too.
    pub(super) fn kept(to: UnixStream) -> UnixBatches {
        UnixBatches::on(to, true, true)
    }

    fn on(to: UnixStream, kept: bool, keepable: bool) -> UnixBatches {
        UnixBatches {
            to,
            kept,
            keepable,
            pending: Vec::new(),
            sent: VecDeque::new(),
            settled: Instant::now(),
            broken: None,
        }
    }

    /// The unix connection, to keep for the next batch, once [`finish`]
    /// ed with every message on it acknowledged; `None` when it was given
    /// up (it closes).
    ///
    /// [`finish`]: UnixBatches::finish
    pub(super) fn into_kept(self) -> Option<UnixStream> {
        (self.keepable && self.broken.is_none() && self.pending.is_empty() && self.sent.is_empty())
            .then_some(self.to)
    }

    /// True once the unix connection was given up: the batch's further
    /// connections go one per unix connection.
    pub(super) fn broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Takes a resumed connection (from [`resume_one`] with `batched`);
    /// sends a full batch.
    pub(super) fn push(
        &mut self,
        shared: &Shared,
        s: &mut Session,
        releaser: &mut Releaser,
        r: Resumed,
        out: &mut Outcomes,
    ) {
        self.pending.push((r.id, r.stream.into(), r.img, r.locked));
        if self.pending.len() >= deliver::BATCH_MAX {
            self.send(shared, s, releaser, out);
        }
    }

    /// Releases the pending connections' flows still locked here, then
    /// sends the connections in one message, then reads the
    /// acknowledgements beyond [`BATCHES_IN_FLIGHT`].
    fn send(
        &mut self,
        shared: &Shared,
        s: &mut Session,
        releaser: &mut Releaser,
        out: &mut Outcomes,
    ) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        let flows: Vec<Flow> = pending.iter().filter_map(|p| p.3).collect();
        let released = self.broken.is_none();
        if released {
            release_resumed(releaser, &flows);
        }
        let sent = match &self.broken {
            Some(why) => Err(why.clone()),
            None => match send_batch(&self.to, &pending) {
                Err(e) if self.kept && closed(&e) => {
                    tracing::debug!(
                        "the kept unix connection was closed (the application restarted?): {e}; \
                         connecting anew"
                    );
                    match self.reopen(shared, s, pending, out) {
                        Ok(rest) => {
                            pending = rest;
                            if pending.is_empty() {
                                Ok(())
                            } else {
                                send_batch(&self.to, &pending).map_err(|e| unix_failure(shared, &e))
                            }
                        }
                        Err((rest, why)) => {
                            pending = rest;
                            Err(why)
                        }
                    }
                }
                sent => sent.map_err(|e| unix_failure(shared, &e)),
            },
        };
        self.kept = false;
        let conns: Vec<(ConnId, OwnedFd)> =
            pending.into_iter().map(|(id, fd, _, _)| (id, fd)).collect();
        match sent {
            Ok(()) if conns.is_empty() => {}
            Ok(()) => self.sent.push_back((conns, Instant::now())),
            Err(why) => {
                // Those sent before may still be acknowledged, in order.
                self.settle_all(shared, s, out);
                self.broken = Some(why.clone());
                undelivered(shared, conns, &why, out);
                if !released {
                    // Closed here: their clients' next packets draw a RST
                    // at once rather than silence until the lease ends.
                    release_resumed(releaser, &flows);
                }
            }
        }
        while self.sent.len() > BATCHES_IN_FLIGHT {
            self.settle_oldest(shared, s, out);
        }
    }

    /// The kept unix connection was found closed by the first send on it
    /// (see [`UnixBatches`]): nothing was delivered on it. A new unix
    /// connection takes `pending`'s first connection alone; if its
    /// receiver takes batches, it replaces the kept one and the rest are
    /// returned, to go on it in a batch message; if not (an older
    /// receiver), each of the rest goes alone on a unix connection of its
    /// own, and the batch's further connections too ([`Self::broken`]).
    /// `Err`: no new unix connection could be made, or its first message
    /// was not acknowledged; the connections returned were not sent.
    fn reopen(
        &mut self,
        shared: &Shared,
        s: &mut Session,
        mut pending: Vec<Pending>,
        out: &mut Outcomes,
    ) -> Result<Vec<Pending>, (Vec<Pending>, String)> {
        let Delivery::Unix(path) = &shared.cfg.delivery else {
            return Err((pending, "not a unix delivery".into()));
        };
        let to = match deliver::connect_unix(path) {
            Ok(to) => to,
            Err(why) => return Err((pending, why)),
        };
        bound_sends(&to);
        let (id, fd, img, _) = pending.remove(0);
        let first = deliver::send_unix_message(&to, &fd, &img.app_blob, img.local, img.peer)
            .and_then(|()| deliver::await_first_ack(&to, deliver::ACK_TIMEOUT));
        self.settled = Instant::now();
        let receives = match first {
            Ok(receives) => receives,
            Err(e) => {
                let why = unix_failure(shared, &e);
                undelivered(shared, vec![(id, fd)], &why, out);
                return Err((pending, why));
            }
        };
        delivered(shared, s, &[id]);
        out.push((id, Ok(())));
        drop(fd);
        if receives.batches() {
            self.to = to;
            self.keepable = receives == deliver::Receives::KeptBatches;
            return Ok(pending);
        }
        // A receiver that takes one connection per unix connection may read
        // them one after the other: this one closes before the next is
        // sent, or the receiver would sit on it while the next one's
        // acknowledgement timed out.
        drop(to);
        for (id, fd, img, _) in pending {
            let sent = deliver::connect_unix(path).and_then(|to| {
                deliver::send_unix(&to, &fd, &img.app_blob, img.local, img.peer)
                    .map_err(|e| unix_failure(shared, &e))
            });
            match sent {
                Ok(()) => {
                    delivered(shared, s, &[id]);
                    out.push((id, Ok(())));
                }
                Err(why) => undelivered(shared, vec![(id, fd)], &why, out),
            }
        }
        self.broken = Some("the application takes no batches".into());
        Ok(Vec::new())
    }

    /// Reads the acknowledgement of the oldest message sent: its
    /// connections are delivered, or closed silently and reported.
    fn settle_oldest(&mut self, shared: &Shared, s: &mut Session, out: &mut Outcomes) {
        let Some((conns, sent_at)) = self.sent.pop_front() else {
            return;
        };
        let acked = match &self.broken {
            Some(why) => Err(why.clone()),
            None => {
                // As for connections sent alone: the whole timeout from
                // when the receiver was done with the message before.
                let left = deliver::ACK_TIMEOUT.saturating_sub(sent_at.max(self.settled).elapsed());
                deliver::await_batch_ack(&self.to, left).map_err(|e| unix_failure(shared, &e))
            }
        };
        self.settled = Instant::now();
        match acked {
            Ok(leaving) => {
                // The receiver is leaving: the batch's messages still go,
                // but the unix connection is not kept.
                self.keepable &= !leaving;
                let ids: Vec<ConnId> = conns.iter().map(|(id, _)| *id).collect();
                delivered(shared, s, &ids);
                out.extend(ids.into_iter().map(|id| (id, Ok(()))));
                // The receiver holds each connection: our copies close
                // once COMMITTED is out, or now beyond a large batch's
                // first few (its clients' FINs would wait for the rest).
                if s.delivered_copies.len() + conns.len() > DEFERRED_CLOSES {
                    drop(conns);
                } else {
                    s.delivered_copies
                        .extend(conns.into_iter().map(|(_, fd)| fd));
                }
            }
            Err(why) => {
                self.broken = Some(why.clone());
                undelivered(shared, conns, &why, out);
            }
        }
    }

    /// Reads every acknowledgement outstanding.
    fn settle_all(&mut self, shared: &Shared, s: &mut Session, out: &mut Outcomes) {
        while !self.sent.is_empty() {
            self.settle_oldest(shared, s, out);
        }
    }

    /// Sends what is pending and settles every message: each connection
    /// taken is in `out`.
    pub(super) fn finish(
        &mut self,
        shared: &Shared,
        s: &mut Session,
        releaser: &mut Releaser,
        out: &mut Outcomes,
    ) {
        self.send(shared, s, releaser, out);
        self.settle_all(shared, s, out);
    }
}

/// A receiver that stops reading must not hold the agent: a send on `to`
/// that blocks [`deliver::ACK_TIMEOUT`] fails the batch.
fn bound_sends(to: &UnixStream) {
    if let Err(e) = to.set_write_timeout(Some(deliver::ACK_TIMEOUT)) {
        tracing::warn!("cannot bound the unix delivery's sends: {e}");
    }
}

/// A resumed connection waiting for its batch message: its fd, what the
/// message says of it, its flow if still locked here.
type Pending = (ConnId, OwnedFd, ConnectionImage, Option<Flow>);

/// Sends `pending` in one batch message on `to`.
fn send_batch(to: &UnixStream, pending: &[Pending]) -> std::io::Result<()> {
    let conns: Vec<deliver::Outgoing<'_>> = pending
        .iter()
        .map(|(_, fd, img, _)| deliver::Outgoing {
            fd: fd.as_fd(),
            blob: &img.app_blob,
            local: img.local,
            peer: img.peer,
        })
        .collect();
    deliver::send_unix_batch(to, &conns)
}

/// True when a send failed because the receiver's end is closed (EPIPE,
/// ECONNRESET): nothing of the message can reach it, and no
/// acknowledgement can come, so the receiver holds none of its
/// connections (it acknowledges a message only once read whole).
fn closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

/// Releases, in one transaction, this agent's lock on the flows of resumed
/// connections about to be handed over (see [`UnixBatches`]). Should that
/// fail, each is tried alone; a flow whose lock still cannot go keeps it
/// until its lease ends (its connection is delivered all the same: it
/// carries on once the lock expires, where closing it would end it).
fn release_resumed(releaser: &mut Releaser, flows: &[Flow]) {
    if flows.is_empty() || releaser.release(flows).is_ok() {
        return;
    }
    for &flow in flows {
        if let Err(e) = releaser.release(&[flow]) {
            tracing::warn!("{flow}: the lock stays until its lease ends, and its packets are dropped until then: {e}");
        }
    }
}

/// Closes silently, and reports, connections a unix receiver did not
/// acknowledge.
fn undelivered(shared: &Shared, conns: Vec<(ConnId, OwnedFd)>, why: &str, out: &mut Outcomes) {
    lock(&shared.stats).undelivered += conns.len() as u64;
    for (id, fd) in conns {
        out.push((id, Err(close_undelivered(fd, why.to_string()))));
    }
}

/// How a resumed connection was handed over.
pub(super) enum Handed {
    /// The application (or the program, or the relay) holds it.
    Delivered,
    /// Sent to a unix receiver, not acknowledged yet: still ours.
    Sent {
        /// The unix connection the acknowledgement comes on.
        to: UnixStream,
        /// Our handle on the connection.
        fd: OwnedFd,
    },
}

/// Closes a resumed connection that was not handed over silently (repair
/// mode back on: no FIN its peer could take for the end of a complete
/// response); returns the error to report.
fn close_undelivered(fd: OwnedFd, why: String) -> String {
    match tcpr_engine::close_silently(fd) {
        Ok(()) => format!("resumed but not delivered, closed silently: {why}"),
        Err(e) => format!("resumed but not delivered ({why}); {e}"),
    }
}

/// Hands a resumed connection over; to a unix receiver, it is only sent
/// (see [`Handed::Sent`]). One that cannot be handed over is closed
/// silently (see [`close_undelivered`]) and reported.
pub(super) fn deliver_one(
    d: &Delivery,
    stream: TcpStream,
    img: ConnectionImage,
    target: Option<Reached>,
    held: Option<crate::relay_worker::Held>,
) -> Result<Handed, String> {
    let fail =
        |fd: OwnedFd, why: String| -> Result<Handed, String> { Err(close_undelivered(fd, why)) };
    match d {
        Delivery::Channel(tx) => {
            let delivered = Delivered {
                stream,
                blob: img.app_blob,
                local: img.local,
                peer: img.peer,
            };
            match tx.send(delivered) {
                Ok(()) => Ok(Handed::Delivered),
                Err(back) => fail(
                    back.0.stream.into(),
                    "the application stopped accepting connections".into(),
                ),
            }
        }
        Delivery::Exec { command, inetd } => {
            let fd: OwnedFd = stream.into();
            let mut cmd = deliver::shell_command(command);
            match deliver::spawn(&mut cmd, &fd, &img.app_blob, img.local, img.peer, *inetd) {
                Ok(mut child) => {
                    // Reap it when it ends; the connection lives in the child.
                    std::thread::spawn(move || {
                        let _ = child.wait();
                    });
                    Ok(Handed::Delivered)
                }
                Err(e) => fail(fd, format!("cannot run {command}: {e}")),
            }
        }
        Delivery::Unix(path) => {
            let fd: OwnedFd = stream.into();
            let Some(Reached::Unix(to)) = target else {
                return fail(fd, "no connection to the application".into());
            };
            match deliver::send_unix_message(&to, &fd, &img.app_blob, img.local, img.peer) {
                Ok(()) => Ok(Handed::Sent { to, fd }),
                Err(e) => fail(fd, format!("the application at {}: {e}", path.display())),
            }
        }
        Delivery::Forward { server, worker, .. } => {
            let Some(Reached::Forward(to)) = target else {
                return fail(stream.into(), "no connection to the server".into());
            };
            // Held since before the resume: once told, the worker relays
            // it and our copies close. Its worker gone (its copies with
            // it), the pair goes to another as if never held.
            if held.is_some_and(|h| h.go()) {
                return Ok(Handed::Delivered);
            }
            let (stream, to) = match worker {
                Some(w) => match w.hand(stream, to) {
                    WorkerTook::ToWorker => return Ok(Handed::Delivered),
                    WorkerTook::Back(stream, to) => (stream, to),
                },
                None => (stream, to),
            };
            deliver::forward(stream, to, img.peer)
                .map(|()| Handed::Delivered)
                .or_else(|(stream, e)| {
                    fail(stream.into(), format!("cannot relay to {server}: {e}"))
                })
        }
    }
}
