//! The agent: accepts authenticated senders, restores the connections they
//! prepare (only those its allowlist names), and on COMMIT takes them over
//! (delivery target checked, commit journaled, service address taken),
//! resumes and delivers them. A thin driver around [`crate::machine::Agent`].
//!
//! What an unauthenticated client can cost it is bounded: each handshake
//! has one deadline for the whole of it, at most
//! [`AgentConfig::max_handshakes`] run at once (the oldest is dropped for a
//! new one), and a failed `accept` (out of file descriptors) is logged and
//! waited out, never the end of the agent.
//!
//! A channel carries batches one after another. After a batch that ended
//! cleanly (see [`crate::machine::Agent::channel_reusable`]) it waits for
//! the sender's next HELLO, QUERY or PING for at most
//! [`AgentConfig::idle_timeout`]; at most [`AgentConfig::max_idle_channels`]
//! wait at once (the one idle longest is closed for a newer one). A new
//! channel, and one whose PING was just answered, must carry its next
//! message within [`AgentConfig::timeout`], as every message of a batch.

mod admission;
pub(crate) mod journal;
mod kept;
mod takeover;

use crate::auth::{Auth, Channel};
use crate::deliver::{self, Delivered, Reached};
use crate::machine::{self, AgentAction, BatchStatus, ConnId};
use crate::wire::{self, pb, WireError};
use admission::{Admission, IdleChannels};
use journal::Journal;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use takeover::{
    before_ready, confirm_delivery, deliver_resumed, discard, let_go_targets, lock_restored,
    restore_one, resume_one, take_over, Session, Unacknowledged, UnixBatches,
};
use tcpr_image::ConnectionImage;

/// Where restored connections go.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// Run a shell command line per connection (fd 3, `LISTEN_FDS=1`).
    Exec {
        /// The command line.
        command: String,
        /// Also on stdin/stdout.
        inetd: bool,
    },
    /// Pass over a unix stream socket (see [`crate::deliver`]).
    Unix(PathBuf),
    /// Hand to this process (library use).
    Channel(std::sync::mpsc::Sender<Delivered>),
    /// Relay to a server (see [`crate::deliver`]), the PROXY protocol
    /// header first if `proxy` names a version.
    Forward {
        /// The server, usually local.
        server: SocketAddr,
        /// The PROXY protocol version the server expects, if any.
        proxy: Option<tcpr_host::proxy_header::ProxyVersion>,
        /// A relay worker, so relays outlive the agent (see
        /// [`crate::relay_worker`]); without one, relays run on threads of
        /// the agent and end with it.
        worker: Option<std::sync::Arc<crate::relay_worker::RelayWorker>>,
    },
}

/// Unauthenticated handshakes in flight, by default.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
/// How long a channel waits for its sender's next batch, by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Channels waiting between batches at once, by default. Each holds a
/// thread and two descriptors.
pub const DEFAULT_MAX_IDLE_CHANNELS: usize = 256;

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// How senders authenticate.
    pub auth: Auth,
    /// Local addresses (and ports) whose connections may be restored here.
    /// An image for any other local address is refused. They also bound
    /// the service addresses a sender may ask this host to take: only an
    /// address an entry names exactly (`0.0.0.0:PORT` and `[::]:PORT`
    /// allow connections on any address, never taking one).
    pub allow: Vec<SocketAddr>,
    /// How long to wait for each next message before COMMIT; also the
    /// deadline of a whole authentication handshake.
    pub timeout: Duration,
    /// Where connections go.
    pub delivery: Delivery,
    /// Directory of the journal that lets an agent restarted after a crash
    /// answer what became of a batch; `None`: no journal (a restarted
    /// agent then knows no batch, and senders report `unknown`).
    pub journal: Option<PathBuf>,
    /// Unauthenticated handshakes allowed in flight at once.
    pub max_handshakes: usize,
    /// How long a channel waits for the sender's next batch once one has
    /// ended cleanly on it, before it is closed.
    pub idle_timeout: Duration,
    /// Channels allowed to wait between batches at once; past it, the one
    /// idle longest is closed. 0: a channel closes after its batch.
    pub max_idle_channels: usize,
    /// How long [`AgentServer::bind`] waits for an address in use to come
    /// free: the stand-in of an agent that died before this one holds it
    /// for its period ([`crate::stand_in`]). Zero: an address in use is an
    /// error at once.
    pub bind_wait: Duration,
}

impl AgentConfig {
    /// Settings with a 2 s timeout, no journal, [`DEFAULT_MAX_HANDSHAKES`],
    /// [`DEFAULT_IDLE_TIMEOUT`] and [`DEFAULT_MAX_IDLE_CHANNELS`].
    pub fn new(auth: Auth, allow: Vec<SocketAddr>, delivery: Delivery) -> AgentConfig {
        AgentConfig {
            auth,
            allow,
            timeout: Duration::from_secs(2),
            delivery,
            journal: None,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_idle_channels: DEFAULT_MAX_IDLE_CHANNELS,
            bind_wait: Duration::ZERO,
        }
    }

    /// True when an entry of the allowlist names `ip` itself.
    fn may_take(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        // A port-0 entry is a VIP of direct server return (`--vip`): it
        // lives on lo and must never be taken onto a link.
        !ip.is_unspecified()
            && self
                .allow
                .iter()
                .any(|a| a.port() != 0 && a.ip().to_canonical() == ip)
    }
}

/// Counters, for tests and logs.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Channels refused at authentication.
    pub refused_auth: u64,
    /// Images refused by the allowlist.
    pub refused_allowlist: u64,
    /// Batches refused because they asked for an address outside the
    /// allowlist.
    pub refused_address: u64,
    /// COMMITs refused before anything was resumed.
    pub refused_commit: u64,
    /// Connections delivered.
    pub delivered: u64,
    /// Connections discarded (batch aborted).
    pub discarded: u64,
    /// Connections resumed but not delivered (closed silently).
    pub undelivered: u64,
    /// Handshakes dropped to make room for newer ones.
    pub evicted_handshakes: u64,
    /// `accept` failures waited out.
    pub accept_errors: u64,
    /// Channels authenticated (each carries any number of batches).
    pub channels: u64,
    /// Batches begun (HELLOs read).
    pub batches: u64,
    /// Channels closed after waiting [`AgentConfig::idle_timeout`] for a
    /// next batch.
    pub idle_closed: u64,
    /// Idle channels closed to make room for newer ones.
    pub evicted_idle: u64,
}

/// Recent batches by id, and their order of arrival (for eviction).
#[derive(Default)]
struct Batches {
    by_id: HashMap<u64, Arc<Mutex<Session>>>,
    order: VecDeque<u64>,
}

/// Batches kept in memory for Query.
const KEPT_BATCHES: usize = 4096;
/// The pause after a failed `accept`: the error (EMFILE, ENOBUFS) lasts
/// until handshakes end, which the admission hurries along.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

struct Shared {
    cfg: AgentConfig,
    tls: Arc<rustls::ServerConfig>,
    batches: Mutex<Batches>,
    stats: Mutex<Stats>,
    journal: Option<Journal>,
    admission: Admission,
    idle: IdleChannels,
    /// Unix connections to a receiver that takes batches, idle between
    /// batches (`--unix`).
    kept: kept::KeptUnix,
}

/// A bound agent.
pub struct AgentServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The settings are unusable.
    #[error("{0}")]
    Config(String),
    /// The listening socket could not be made.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

/// Checks that connections can reach `delivery` now: the program of an
/// exec line resolves, something listens at a unix path, a forward
/// server accepts.
fn check_delivery(delivery: &Delivery) -> Result<Option<Reached>, String> {
    match delivery {
        Delivery::Exec { command, .. } => deliver::resolve_exec(command).map(|_| None),
        Delivery::Unix(path) => deliver::connect_unix(path).map(|u| Some(Reached::Unix(u))),
        Delivery::Forward { server, .. } => {
            deliver::connect_forward(*server).map(|s| Some(Reached::Forward(s)))
        }
        Delivery::Channel(_) => Ok(None),
    }
}

/// Binds `addr`, waiting up to `wait` while it is in use. A stand-in of
/// an agent that ended holds it: it is asked to let it go (whatever the
/// wait), and asked again while the wait lasts (it listens for the ask
/// only once its agent is gone).
fn bind_waiting(addr: SocketAddr, wait: Duration) -> io::Result<TcpListener> {
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        match TcpListener::bind(addr) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if crate::stand_in::ask_to_leave(addr) {
                    tracing::info!("the stand-in of an earlier agent let {addr} go");
                    if let Ok(l) = TcpListener::bind(addr) {
                        return Ok(l);
                    }
                }
                if Instant::now() >= deadline {
                    return Err(e);
                }
                if !said {
                    tracing::warn!(
                        "{addr} is in use; waiting up to {wait:?} for it (the stand-in of an \
                         agent that just ended may hold it)"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            bound => return bound,
        }
    }
}

impl AgentServer {
    /// Binds the agent's listening socket, once its delivery target and
    /// its journal are usable.
    pub fn bind(addr: SocketAddr, cfg: AgentConfig) -> Result<AgentServer, AgentError> {
        if cfg.allow.is_empty() {
            return Err(AgentError::Config(
                "the allowlist is empty: name the local ADDR:PORT of the connections this agent may take (--allow)".into(),
            ));
        }
        if cfg.max_handshakes == 0 {
            return Err(AgentError::Config(
                "at least one handshake must be allowed at a time".into(),
            ));
        }
        if cfg.idle_timeout.is_zero() {
            return Err(AgentError::Config(
                "the idle timeout of a channel must be above zero (to close channels after each batch, allow no idle channel)".into(),
            ));
        }
        // The probe connection closes empty: receivers read that as nothing.
        check_delivery(&cfg.delivery).map_err(AgentError::Config)?;
        let journal = cfg
            .journal
            .as_deref()
            .map(Journal::open)
            .transpose()
            .map_err(AgentError::Config)?;
        let tls = cfg
            .auth
            .server_config()
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let listener = bind_waiting(addr, cfg.bind_wait)
            .map_err(|source| AgentError::Listen { addr, source })?;
        // Connections that arrive here may leave again later: install the
        // lock's table now rather than in the first move's pause.
        if let Err(e) = tcpr_engine::lock::prepare() {
            tracing::warn!("the flow lock table could not be installed ahead: {e}");
        }
        Ok(AgentServer {
            listener,
            shared: Arc::new(Shared {
                admission: Admission::new(cfg.max_handshakes),
                idle: IdleChannels::new(cfg.max_idle_channels),
                kept: kept::KeptUnix::new(),
                cfg,
                tls,
                batches: Mutex::new(Batches::default()),
                stats: Mutex::new(Stats::default()),
                journal,
            }),
        })
    }

    /// The listening socket (for a copy the stand-in keeps).
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A copy of the counters.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    /// Serves senders, one thread per channel. A failed `accept` never
    /// ends it: the error is logged, and once out of file descriptors the
    /// oldest handshake in flight is dropped to free one.
    pub fn run(&self) -> io::Result<()> {
        let mut last_logged: Option<Instant> = None;
        loop {
            let (tcp, from) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) => {
                    lock(&self.shared.stats).accept_errors += 1;
                    if last_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!("accept failed (waiting it out): {e}");
                        last_logged = Some(Instant::now());
                    }
                    if out_of_resources(&e) && self.shared.admission.evict_oldest() {
                        lock(&self.shared.stats).evicted_handshakes += 1;
                    }
                    std::thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            let Some(ticket) = self.shared.admission.admit(&tcp) else {
                // Not even a descriptor to track it: drop it.
                continue;
            };
            if ticket.evicted {
                lock(&self.shared.stats).evicted_handshakes += 1;
            }
            let shared = self.shared.clone();
            let id = ticket.id;
            let spawned = std::thread::Builder::new()
                .name("tcpr-handoff".into())
                .spawn(move || {
                    let span = tracing::info_span!("handoff", %from);
                    let _g = span.enter();
                    if let Err(e) = serve(&shared, tcp, id) {
                        tracing::warn!("channel from {from} ended: {e}");
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a thread for {from}: {e}");
                self.shared.admission.done(id);
            }
        }
    }
}

fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Fault injection for tests: when `TCPR_FAULT_STOP_AT` names this point,
/// the thread serving the batch holds there, so that a test can kill the
/// agent or cut its link at an exact protocol step. On arrival it creates
/// `$TCPR_FAULT_DIR/reached-POINT`; it goes on once
/// `$TCPR_FAULT_DIR/release-POINT` exists. Points: `hello`, `restored`
/// (before READY is sent), `ready` (after), `taken` (COMMIT journaled and
/// the address taken, nothing resumed yet), `delivered` (every connection
/// delivered and journaled, COMMITTED not yet sent), `committed` (after
/// COMMITTED).
fn fault_point(name: &str) {
    if !std::env::var("TCPR_FAULT_STOP_AT").is_ok_and(|v| v == name) {
        return;
    }
    let dir = PathBuf::from(std::env::var_os("TCPR_FAULT_DIR").unwrap_or_else(|| "/tmp".into()));
    tracing::warn!("fault injection: holding at {name}");
    let _ = std::fs::write(dir.join(format!("reached-{name}")), b"");
    while !dir.join(format!("release-{name}")).exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve(shared: &Arc<Shared>, tcp: TcpStream, ticket: u64) -> Result<(), WireError> {
    let timeout = shared.cfg.timeout;
    let _ = tcp.set_nodelay(true);
    // One deadline for the whole handshake, however the bytes trickle in.
    let deadline = Instant::now().checked_add(timeout);
    let accepted = shared
        .cfg
        .auth
        .accept_until(shared.tls.clone(), tcp, deadline);
    shared.admission.done(ticket);
    let mut ch = match accepted {
        Ok(ch) => ch,
        Err(e) => {
            lock(&shared.stats).refused_auth += 1;
            tracing::warn!("refused an unauthenticated sender: {e}");
            return Ok(());
        }
    };
    lock(&shared.stats).channels += 1;
    ch.tcp()
        .set_write_timeout(Some(timeout.saturating_mul(4)))?;
    // A new channel's first message is due like any message of a batch.
    let mut wait = Wait::Due;
    loop {
        let msg = match next_message(shared, &mut ch, wait)? {
            Next::Message(msg) => msg,
            Next::Closed => return Ok(()),
            Next::IdleTimeout => {
                lock(&shared.stats).idle_closed += 1;
                tracing::debug!("closed a channel idle for {:?}", shared.cfg.idle_timeout);
                ch.close(CLOSE_TIMEOUT);
                return Ok(());
            }
        };
        match msg.kind {
            Some(pb::message::Kind::Ping(p)) => {
                wire::write_msg(&mut ch, &wire::pong(p.nonce))?;
                ch.flush()?;
                // The sender took the channel up for a batch: not idle.
                wait = Wait::Due;
            }
            Some(pb::message::Kind::Query(q)) => {
                let status = query(shared, q.batch);
                tracing::info!(batch = q.batch, ?status, "answered a query");
                wire::write_msg(
                    &mut ch,
                    &pb::Message {
                        kind: Some(pb::message::Kind::Status(wire::status_to_wire(
                            q.batch, &status,
                        ))),
                    },
                )?;
                ch.flush()?;
                wait = Wait::Idle;
            }
            Some(pb::message::Kind::Hello(_)) => {
                lock(&shared.stats).batches += 1;
                match batch(shared, &mut ch, msg)? {
                    AfterBatch::Idle => wait = Wait::Idle,
                    AfterBatch::Close => return Ok(()),
                }
            }
            _ => {
                return Err(WireError::Unexpected(
                    "a channel's next message must be HELLO, QUERY or PING",
                ))
            }
        }
    }
}

/// How long a channel waits for its next message.
#[derive(Clone, Copy)]
enum Wait {
    /// [`AgentConfig::timeout`]: a new channel, or one the sender just
    /// took up with a PING.
    Due,
    /// [`AgentConfig::idle_timeout`], counted among the idle channels.
    Idle,
}

/// What came on a channel between batches.
enum Next {
    Message(pb::Message),
    /// The sender closed it (or it was closed to make room).
    Closed,
    /// Nothing came within the idle timeout.
    IdleTimeout,
}

/// The bound on sending a TLS close_notify as a channel is closed.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(100);

/// Waits for the next message between batches.
fn next_message(shared: &Shared, ch: &mut Channel, wait: Wait) -> Result<Next, WireError> {
    let quiet_end = |got: Result<pb::Message, WireError>| match got {
        Ok(msg) => Ok(Next::Message(msg)),
        // A sender that authenticated and closed (a balancer's health
        // check), or closed a kept channel: with or without close_notify.
        Err(WireError::Closed) => Ok(Next::Closed),
        Err(WireError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Next::Closed),
        Err(e) => Err(e),
    };
    match wait {
        Wait::Due => {
            ch.tcp().set_read_timeout(Some(shared.cfg.timeout))?;
            quiet_end(wire::read_msg(ch))
        }
        Wait::Idle => {
            let Some(slot) = shared.idle.enter(ch.tcp()) else {
                // No channel may wait (`max_idle_channels` 0).
                return Ok(Next::Closed);
            };
            if slot.evicted > 0 {
                lock(&shared.stats).evicted_idle += slot.evicted;
            }
            let got = ch
                .tcp()
                .set_read_timeout(Some(shared.cfg.idle_timeout))
                .map_err(WireError::from)
                .and_then(|()| wire::read_msg(ch));
            if shared.idle.leave(slot.id) {
                // Shut down to make room, perhaps as a message came in: the
                // sender reads the end, before it froze anything.
                return Ok(Next::Closed);
            }
            match got {
                Err(WireError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    Ok(Next::IdleTimeout)
                }
                got => quiet_end(got),
            }
        }
    }
}

/// What became of a batch: from memory while this process has it, from
/// the journal after a restart.
fn query(shared: &Shared, batch: u64) -> BatchStatus {
    let sess = lock(&shared.batches).by_id.get(&batch).cloned();
    match sess {
        Some(sess) => {
            let mut s = lock(&sess);
            let status = s.m.handle_query();
            run_discards(shared, &mut s);
            status
        }
        None => match &shared.journal {
            Some(j) => from_journal(j, batch),
            None => BatchStatus::Unknown,
        },
    }
}

/// A batch's status after a restart. One that committed but resumed
/// nothing may have taken its address here: it is given back before the
/// sender is told it may roll back (and put the address back at home).
pub(crate) fn from_journal(j: &Journal, batch: u64) -> BatchStatus {
    let recorded = j.status(batch);
    let Some(ip) = recorded.give_back else {
        return recorded.status;
    };
    let given_back = match tcpr_host::addr::find(ip) {
        Ok(held) => tcpr_host::addr::remove(&held).map_err(|e| e.to_string()),
        Err(tcpr_host::addr::Error::NotFound(_)) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    match given_back.and_then(|()| j.mark_aborted(batch).map_err(|e| e.to_string())) {
        Ok(()) => {
            tracing::info!(
                batch,
                "gave back {ip}, taken for a batch that resumed nothing"
            );
            recorded.status
        }
        Err(e) => {
            tracing::error!(batch, "cannot give back {ip}: {e}");
            BatchStatus::Unknown
        }
    }
}

/// Performs the machine's discards when nothing can be sent any more.
fn run_discards(shared: &Shared, s: &mut Session) {
    while let Some(a) = s.m.poll_action() {
        if let AgentAction::Discard(ids) = a {
            discard(shared, s, ids);
        }
    }
    while s.m.poll_transmit().is_some() {}
    // A unix connection held for this batch closes empty, or is kept.
    let_go_targets(shared, s);
    s.ahead = None;
}

/// What a channel does after a batch.
enum AfterBatch {
    /// Wait for the sender's next batch.
    Idle,
    /// Close: the batch did not end cleanly on it.
    Close,
}

fn batch(
    shared: &Arc<Shared>,
    ch: &mut Channel,
    hello: pb::Message,
) -> Result<AfterBatch, WireError> {
    let take_ip = match &hello.kind {
        Some(pb::message::Kind::Hello(h)) if !h.take_address.is_empty() => Some(
            h.take_address
                .parse::<IpAddr>()
                .map_err(|_| format!("bad address to take: {:?}", h.take_address)),
        ),
        _ => None,
    };
    let now = Instant::now();
    let mut m = machine::Agent::new(shared.cfg.timeout, now);
    m.handle_message(wire::from_wire(hello)?, now);
    let id = m.batch();
    fault_point("hello");
    let sender_elsewhere = ch.tcp().peer_addr().is_ok_and(takeover::sender_elsewhere);
    let sess = Arc::new(Mutex::new(Session {
        m,
        images: HashMap::new(),
        restored: HashMap::new(),
        take_ip,
        add_address: None,
        checked: None,
        target_first: None,
        kept: None,
        log: None,
        locks: Vec::new(),
        sender_elsewhere,
        quiet: Default::default(),
        ahead: None,
        delivered_copies: Vec::new(),
    }));
    let r = batch_loop(shared, ch, &sess, id);
    let mut s = lock(&sess);
    // Whatever became of COMMITTED: the session may stay to answer a
    // later query, its copies must not.
    s.delivered_copies.clear();
    if r.is_err() {
        s.m.handle_link_lost();
        run_discards(shared, &mut s);
    }
    drop(s);
    r
}

/// Runs one batch on the channel; says whether it ended cleanly there
/// ([`machine::Agent::channel_reusable`], and no read timed out, which may
/// have left half a frame behind).
fn batch_loop(
    shared: &Arc<Shared>,
    ch: &mut Channel,
    sess: &Arc<Mutex<Session>>,
    id: u64,
) -> Result<AfterBatch, WireError> {
    {
        // Remember recent batches for Query (bounded).
        let mut b = lock(&shared.batches);
        b.by_id.insert(id, sess.clone());
        b.order.push_back(id);
        while b.order.len() > KEPT_BATCHES {
            if let Some(old) = b.order.pop_front() {
                b.by_id.remove(&old);
            }
        }
    }
    let mut read_timed_out = false;
    loop {
        let deadline = {
            let mut s = lock(sess);
            drive(shared, &mut s, ch)?;
            if s.m.is_done() {
                let_go_targets(shared, &mut s);
                // Its packet socket, if any, closes (off this path).
                s.ahead = None;
                return Ok(if s.m.channel_reusable() && !read_timed_out {
                    AfterBatch::Idle
                } else {
                    AfterBatch::Close
                });
            }
            s.m.poll_timeout()
        };
        let wait = deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        ch.tcp().set_read_timeout(wait)?;
        let got = wire::read_msg(ch);
        let mut s = lock(sess);
        let now = Instant::now();
        match got {
            Ok(msg) => {
                if let Some(pb::message::Kind::Prepare(p)) = &msg.kind {
                    for c in &p.connections {
                        let img = ConnectionImage::decode(&c.image)
                            .map_err(|e| format!("bad image: {e}"));
                        s.images.insert(c.id, img);
                    }
                }
                if let Some(pb::message::Kind::Commit(c)) = &msg.kind {
                    s.add_address = c.add_address.clone();
                }
                match wire::from_wire(msg) {
                    Ok(m) => s.m.handle_message(m, now),
                    Err(e) => {
                        tracing::warn!("sender misbehaved: {e}");
                        s.m.handle_link_lost();
                    }
                }
            }
            Err(WireError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                read_timed_out = true;
                s.m.handle_timeout(now);
            }
            Err(e) => {
                tracing::info!("link lost: {e}");
                s.m.handle_link_lost();
                // Run the resulting discards; nothing can be sent any more.
                run_discards(shared, &mut s);
                return Ok(AfterBatch::Close);
            }
        }
    }
}

/// Unix deliveries sent and not yet acknowledged, at most: the agent
/// resumes and sends the next connections while the receiver takes these.
/// Each holds a unix connection the receiver has not necessarily
/// accepted yet, so this stays well below a listen backlog (a receiver
/// taking one connection at a time on a backlog of 64 is tested).
const UNACKNOWLEDGED_MAX: usize = 16;

/// What a unix receiver takes, as far as the agent knows.
enum Receiving {
    /// Not known before its first acknowledgement.
    Unknown,
    /// One connection per unix connection, pipelined.
    OneAtATime,
    /// Batch messages on the unix connection of the acknowledgement that
    /// asked for them.
    Batches(UnixBatches),
}

/// Resumes and delivers a committed batch. Each connection is delivered
/// as soon as it is resumed: a unix receiver takes one connection at a
/// time, so connecting a batch's worth of unix sockets first would fill
/// its listen backlog and block (10,000 connections stalled for seconds).
/// Unix deliveries are pipelined: up to [`UNACKNOWLEDGED_MAX`] are in the
/// receiver's hands before their acknowledgements are read, each still
/// the agent's until its own comes. A receiver that asks for batches in
/// its first acknowledgement read gets the rest in batch messages on that
/// unix connection ([`UnixBatches`]); the connections sent before on
/// unix connections of their own are settled after it is closed (a
/// receiver reading one unix connection at a time reads them then).
///
/// A unix connection kept from an earlier batch (taken before READY,
/// [`Session::kept`]) takes all of the batch's connections in batch
/// messages. At the end, the unix connection of a receiver that takes
/// batches, every message on it acknowledged, is kept for the next batch
/// ([`kept::KeptUnix`]): the batch messages' one, or else the last
/// connection settled alone. Never one while another unix connection of
/// the batch still awaits its acknowledgement: a receiver reading one
/// unix connection at a time would not read that one before this one
/// closed.
fn resume_and_deliver(
    shared: &Shared,
    s: &mut Session,
    ids: &[ConnId],
) -> Vec<(ConnId, Result<(), String>)> {
    let mut out = Vec::with_capacity(ids.len());
    let mut unacknowledged: VecDeque<Unacknowledged> = VecDeque::new();
    // A receiver takes its connections in turn: each has the whole
    // acknowledgement timeout from when the one before was settled, not
    // from its send, so a slow receiver is given what it had unpipelined.
    let started = Instant::now();
    let mut settled = started;
    let mut receiver = match s.kept.take() {
        Some(to) => Receiving::Batches(UnixBatches::kept(to)),
        None => Receiving::Unknown,
    };
    let mut releaser = tcpr_engine::lock::Releaser::new(tcpr_engine::Netns::current());
    for &id in ids {
        if let Receiving::Batches(b) = &mut receiver {
            match resume_one(shared, s, &mut releaser, id, true) {
                Ok(r) => b.push(shared, s, &mut releaser, r, &mut out),
                Err(e) => out.push((id, Err(e))),
            }
            if b.broken() {
                // Everything it took is settled; the rest go one by one.
                b.finish(shared, s, &mut releaser, &mut out);
                receiver = Receiving::OneAtATime;
            }
            continue;
        }
        match resume_one(shared, s, &mut releaser, id, false)
            .and_then(|r| deliver_resumed(shared, s, r))
        {
            Ok(Some(sent)) => unacknowledged.push_back(sent),
            Ok(None) => out.push((id, Ok(()))),
            Err(e) => out.push((id, Err(e))),
        }
        while unacknowledged.len() >= UNACKNOWLEDGED_MAX {
            let Some(u) = unacknowledged.pop_front() else {
                break;
            };
            let id = u.id;
            let outcome = confirm_delivery(shared, s, settled, u);
            settled = Instant::now();
            match outcome {
                Ok(to) => {
                    out.push((id, Ok(())));
                    if matches!(receiver, Receiving::Unknown) {
                        receiver = match to {
                            Some((to, receives)) => {
                                Receiving::Batches(UnixBatches::new(to, receives))
                            }
                            None => Receiving::OneAtATime,
                        };
                    }
                }
                Err(e) => out.push((id, Err(e))),
            }
            if matches!(receiver, Receiving::Batches(_)) {
                // The others sent alone wait until the batches are done.
                break;
            }
        }
    }
    if let Receiving::Batches(mut b) = receiver {
        b.finish(shared, s, &mut releaser, &mut out);
        match b.into_kept() {
            Some(to) if unacknowledged.is_empty() => shared.kept.put(to),
            // Closed here.
            _ => {}
        }
        settled = Instant::now();
    }
    let last = unacknowledged.len();
    for (i, u) in unacknowledged.into_iter().enumerate() {
        let id = u.id;
        let outcome = confirm_delivery(shared, s, settled, u);
        settled = Instant::now();
        // Earlier ones close as they are settled; only a receiver that
        // answered "kK" has its unix connection kept.
        match outcome {
            Ok(Some((to, deliver::Receives::KeptBatches))) if i + 1 == last => {
                shared.kept.put(to);
                out.push((id, Ok(())));
            }
            Ok(_) => out.push((id, Ok(()))),
            Err(e) => out.push((id, Err(e))),
        }
    }
    tracing::debug!(
        connections = ids.len(),
        us = started.elapsed().as_micros(),
        "resumed and delivered"
    );
    out
}

/// Performs the machine's actions and sends its messages.
fn drive(shared: &Shared, s: &mut Session, ch: &mut Channel) -> Result<(), WireError> {
    let mut sent_ready = false;
    loop {
        let mut busy = false;
        while let Some(a) = s.m.poll_action() {
            busy = true;
            match a {
                AgentAction::Restore(ids) => {
                    let ready = before_ready(shared, s);
                    let mut out: Vec<(ConnId, Result<(), String>)> = ids
                        .iter()
                        .map(|&id| {
                            let r = match &ready {
                                Ok(()) => restore_one(shared, s, id),
                                Err(e) => Err(e.clone()),
                            };
                            (id, r)
                        })
                        .collect();
                    lock_restored(shared, s, &mut out);
                    s.m.handle_restored(out);
                    fault_point("restored");
                }
                AgentAction::Resume(ids) => match take_over(shared, s, &ids) {
                    Ok(()) => {
                        let out = resume_and_deliver(shared, s, &ids);
                        // Each resumed flow's lock went in `resume_one`;
                        // one not resumed stays dropped here until its
                        // lease ends (no socket: a packet would draw a
                        // RST). Dropped, the guards would release them,
                        // and later locks of a flow that moved on.
                        for l in std::mem::take(&mut s.locks) {
                            l.keep();
                        }
                        fault_point("delivered");
                        s.m.handle_resumed(out);
                    }
                    Err(reason) => {
                        tracing::warn!("COMMIT refused, nothing resumed: {reason}");
                        lock(&shared.stats).refused_commit += 1;
                        let_go_targets(shared, s);
                        s.m.handle_commit_refused(ids, reason);
                    }
                },
                AgentAction::Discard(ids) => discard(shared, s, ids),
            }
        }
        while let Some(msg) = s.m.poll_transmit() {
            busy = true;
            wire::write_msg(ch, &wire::to_wire(&msg))?;
            ch.flush()?;
            match msg {
                machine::Msg::Ready(_) => {
                    fault_point("ready");
                    sent_ready = true;
                }
                machine::Msg::Committed(_) => fault_point("committed"),
                _ => {}
            }
        }
        if !busy {
            break;
        }
    }
    if sent_ready {
        // The sender reads READY and switches meanwhile.
        takeover::look_ahead(shared, s);
    }
    ch.flush()?;
    // COMMITTED, if due, is out.
    s.delivered_copies.clear();
    Ok(())
}
