//! The balancer at work: listeners, the head peek, the decision, the
//! handoff with steering, the fallback proxy, health checks, SIGHUP reload
//! and SIGTERM drain.
//!
//! Threads: one per listening address (accept; it also decides the
//! connections whose head is whole when they are accepted), one per
//! connection whose head is not, until it is decided (its head peek never
//! waits on another's), two per agent that hand off in batches whatever
//! connections wait for it (see [`crate::batch`] for when the second
//! starts a batch while the first's is in flight), two per
//! proxied connection (splice each way, the first one connects to the
//! server), one for health checks, one for the metrics endpoint; the
//! calling thread waits for signals.

use crate::batch::{BatchQueue, Policy};
use crate::health::{Health, Target, CHECK_INTERVAL};
use crate::{
    config, head, AgentsAuth, Config, Head, HeadError, HeadErrorKind, Listener, MemberConfig,
    MemberId, Metrics, Pool, Protocol, Router,
};
use nix::sys::signal::{SigSet, Signal};
use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tcpr_engine::ListenerOptions;
use tcpr_handoff::{Auth, HandOff, MigrateOptions, Outgoing, Switch, TrafficHook};
use tcpr_steer::{SteeredFlow, Steering};

/// How often an idle accept loop looks at its stop flag.
const ACCEPT_WAKEUP: Duration = Duration::from_millis(200);
/// Connections an accept loop told to stop takes from its backlog at
/// most: the kernel's default `somaxconn` (a listener's backlog is at most
/// that), so that arrivals while it drains cannot keep it going.
const STOP_BACKLOG: usize = 4096;
/// How long the kernel holds a new connection of an HTTP or TLS listener
/// whose first bytes have not come (`TCP_DEFER_ACCEPT`, seconds).
const DEFER_ACCEPT_SECS: i32 = 1;
/// How connections decided for one agent are cut into batches: up to 256
/// a batch, two batches in flight at most, the second only when at least
/// 4 connections wait (fewer join the next batch rather than pay a
/// batch's fixed cost of their own; see [`crate::batch`]).
const BATCHING: Policy = Policy {
    max_batch: 256,
    max_in_flight: 2,
    overlap_min: 4,
};
/// Reads of 16 KiB a refusal makes at most to drop what the client sent
/// (its head, up to `max_head_bytes`, and a little more).
const REFUSE_DRAIN_READS: usize = 8;
/// How long a fallback waits for a server's connection.
const SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// TLS alert `unrecognized_name` (RFC 6066): no route for this SNI.
const ALERT_UNRECOGNIZED_NAME: u8 = 112;
/// TLS alert `internal_error` (RFC 8446): no member can take it.
const ALERT_INTERNAL_ERROR: u8 = 80;
/// HTTP statuses the balancer answers itself.
const HTTP_REQUEST_TIMEOUT: u16 = 408;
const HTTP_BAD_REQUEST: u16 = 400;
const HTTP_HEADER_TOO_LARGE: u16 = 431;
const HTTP_NOT_FOUND: u16 = 404;
const HTTP_UNAVAILABLE: u16 = 503;

/// How the balancer runs.
pub struct Options {
    /// The config file (read again on SIGHUP).
    pub config_path: PathBuf,
    /// The config [`check_start`] read and checked: the one it runs with
    /// (the file is read again only at a reload).
    pub checked: Checked,
    /// The steering datapath; without one every connection is proxied (a
    /// handed-off flow whose packets still reach this host would stall).
    pub steering: Option<Arc<dyn Steering>>,
    /// Bound of every wait for an agent during a handoff.
    pub handoff_timeout: Duration,
    /// How long SIGTERM's drain waits for the proxied connections (the
    /// only work in flight without a bound of its own) before it resets
    /// them; `None`: as long as they last.
    pub drain_timeout: Option<Duration>,
}

/// Why the balancer could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The config file.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The agents' credentials.
    #[error("[agents]: {0}")]
    Auth(String),
    /// A listening address.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// Anything else the kernel refused.
    #[error("{what}: {source}")]
    Kernel {
        /// What was tried.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// One loaded config, with what is built from it.
struct Active {
    config: Config,
    routers: HashMap<String, Router>,
    pools: HashMap<String, Pool>,
    /// How to authenticate to agents (none: every connection is proxied).
    auth: Option<Auth>,
}

impl Active {
    fn build(config: Config) -> Result<Active, StartError> {
        let auth = match &config.agents {
            AgentsAuth::Psk { psk_file } => Some(Auth::psk_file(psk_file)),
            AgentsAuth::Certs { cert, key, ca } => Some(Auth::cert_files(cert, key, ca)),
            AgentsAuth::None => None,
        }
        .transpose()
        .map_err(|e| StartError::Auth(e.to_string()))?;
        let routers = config
            .listeners
            .iter()
            .map(|l| (l.name.clone(), Router::new(l)))
            .collect();
        let pools = config
            .pools
            .iter()
            .map(|p| (p.name.clone(), Pool::new(p)))
            .collect();
        Ok(Active {
            config,
            routers,
            pools,
            auth,
        })
    }

    /// The listener (and its router) that owns the address `bind`.
    fn listener_for(&self, bind: SocketAddr) -> Option<(&Listener, &Router)> {
        let l = self
            .config
            .listeners
            .iter()
            .find(|l| l.bind.contains(&bind))?;
        Some((l, self.routers.get(&l.name)?))
    }

    fn binds(&self) -> BTreeSet<SocketAddr> {
        self.config
            .listeners
            .iter()
            .flat_map(|l| l.bind.iter().copied())
            .collect()
    }

    /// Everything the health checks look at.
    fn targets(&self) -> Vec<Target> {
        let mut t: BTreeSet<(u8, SocketAddr)> = BTreeSet::new();
        for p in &self.config.pools {
            for m in &p.members {
                if let Some(a) = m.agent {
                    t.insert((0, a));
                }
                if let Some(s) = m.server {
                    t.insert((1, s));
                }
            }
        }
        t.into_iter()
            .map(|(kind, a)| {
                if kind == 0 {
                    Target::Agent(a)
                } else {
                    Target::Server(a)
                }
            })
            .collect()
    }
}

/// Work not finished yet (heads, handoffs, relays): SIGTERM waits for it.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    done: Condvar,
}

/// One unit of [`InFlight`] work; dropping it finishes it. Once its
/// connection is decided for a member, it counts among that member's open
/// connections (least-conn) until dropped too.
struct Busy(Arc<Shared>, Option<Counted>);

/// A connection counted open to a member of a pool, in the config it was
/// decided under (`MemberId`s are that config's); dropping it closes it.
struct Counted {
    active: Arc<Active>,
    pool: String,
    id: MemberId,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(pool) = self.active.pools.get(&self.pool) {
            pool.closed(self.id);
        }
    }
}

impl Busy {
    fn new(shared: &Arc<Shared>) -> Busy {
        *shared
            .in_flight
            .count
            .lock()
            .unwrap_or_else(|e| e.into_inner()) += 1;
        Busy(Arc::clone(shared), None)
    }

    /// Counts the connection open to member `id` of `pool` in `active`,
    /// for as long as the balancer holds it: while it waits for and goes
    /// through its handoff, and while it is proxied (a handed-off
    /// connection lives on at the backend, where the balancer does not see
    /// it end).
    fn count(&mut self, active: &Arc<Active>, pool: &str, id: MemberId) {
        if let Some(p) = active.pools.get(pool) {
            p.opened(id);
            self.1 = Some(Counted {
                active: Arc::clone(active),
                pool: pool.to_string(),
                id,
            });
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // The member's count first: the drain may end right after.
        drop(self.1.take());
        let mut n = self
            .0
            .in_flight
            .count
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            self.0.in_flight.done.notify_all();
        }
    }
}

/// A connection decided for an agent, waiting for its batch.
struct Job {
    stream: TcpStream,
    /// The options of the listener that accepted it: the balancer changes
    /// none of an accepted connection's options, so its dump need not read
    /// them all again.
    accepted_from: Option<Arc<ListenerOptions>>,
    pool: String,
    /// The member it was decided for, as configured then: a reload may
    /// change the pool meanwhile (a `MemberId` is an index into one
    /// config's pool).
    member: MemberConfig,
    decided: Instant,
    busy: Busy,
}

struct Shared {
    active: RwLock<Arc<Active>>,
    metrics: Metrics,
    health: Health,
    steering: Option<Arc<dyn Steering>>,
    handoff_timeout: Duration,
    in_flight: InFlight,
    /// Each agent's queue of batches, served by its batching threads.
    agents: Mutex<HashMap<SocketAddr, Arc<BatchQueue<Job>>>>,
    /// Connections whose handoff ended unknown: kept frozen here until
    /// their lock's lease ends (the agent may own them).
    unknown: Mutex<Vec<(Instant, TcpStream)>>,
    /// Ends the relays of proxied connections when the drain times out.
    cut: tcpr_host::relay::Cut,
    /// The relays the cut reset (or that it kept from starting).
    cut_relays: std::sync::atomic::AtomicUsize,
}

impl Shared {
    fn active(&self) -> Arc<Active> {
        Arc::clone(&self.active.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A listening address and its accept thread.
struct Bound {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Checks the file at `path` as [`run`] would load it: the config, and the
/// agents' credentials it names (key files read, a PSK long enough). What
/// `tcpr balance --check` answers.
pub fn check(path: &std::path::Path) -> Result<(), StartError> {
    match Active::build(Config::load(path)?) {
        Ok(_) => Ok(()),
        // Named with the file, as the file's other errors are.
        Err(StartError::Auth(message)) => Err(StartError::Config(config::ConfigError {
            file: path.to_path_buf(),
            position: None,
            message: format!("[agents]: {message}"),
        })),
        Err(e) => Err(e),
    }
}

/// A config [`check_start`] read, built and found listenable: what
/// [`run`] runs with, so that a file changed in between is not run
/// unchecked.
pub struct Checked(Active);

impl Checked {
    /// The config.
    pub fn config(&self) -> &Config {
        &self.0.config
    }
}

/// [`check`], and that every address the balancer will listen on (the
/// listeners' and the metrics') can be bound now, as they will be (shared:
/// see [`run`]). Run before anything that outlives a failed start, such as
/// the steering datapath (which takes over a running balancer's flows): a
/// balancer that cannot listen then fails having changed nothing. Each
/// address is bound (not listened on) and closed at once.
pub fn check_start(path: &std::path::Path) -> Result<Checked, StartError> {
    let config = Config::load(path)?;
    let metrics = config.metrics.as_ref().map(|m| m.listen);
    let active = Active::build(config)?;
    for addr in metrics.into_iter().chain(active.binds()) {
        tcpr_host::sock::bind_shared(addr).map_err(|source| StartError::Listen { addr, source })?;
    }
    Ok(Checked(active))
}

/// Blocks SIGHUP, SIGTERM and SIGINT in the calling thread, so that every
/// thread it starts from now on inherits the mask and only [`run`]'s
/// `sigwait` sees them. Call it before starting any thread of the
/// balancer's (the steering datapath's sweeper is one): a thread started
/// before took a signal that came while `run` was not waiting for one (a
/// second SIGTERM, or a SIGHUP, during the drain), and its default action
/// killed the process, resetting every proxied connection. `run` calls it
/// too.
pub fn block_signals() -> Result<SigSet, StartError> {
    let mut signals = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| StartError::Kernel {
        what: "block signals",
        source: e.into(),
    })?;
    Ok(signals)
}

/// Runs the balancer until SIGTERM (or SIGINT) has drained it. Prints
/// `tcpr balance listening on ADDR` per address, then `tcpr balance ready`.
pub fn run(opts: Options) -> Result<(), StartError> {
    let signals = block_signals()?;
    let Checked(active) = opts.checked;
    let metrics_listen = active.config.metrics.as_ref().map(|m| m.listen);
    let metrics = Metrics::new();
    register_members(&metrics, &active);
    let shared = Arc::new(Shared {
        active: RwLock::new(Arc::new(active)),
        metrics,
        health: Health::default(),
        steering: opts.steering,
        handoff_timeout: opts.handoff_timeout,
        in_flight: InFlight::default(),
        agents: Mutex::new(HashMap::new()),
        unknown: Mutex::new(Vec::new()),
        cut: tcpr_host::relay::Cut::new().map_err(|source| StartError::Kernel {
            what: "create the drain's pipe",
            source,
        })?,
        cut_relays: std::sync::atomic::AtomicUsize::new(0),
    });
    let mut metrics_serving = None;
    if let Some(addr) = metrics_listen {
        let s = Arc::clone(&shared);
        let render = Arc::new(move || {
            if let Some(st) = &s.steering {
                if let Ok(n) = st.active() {
                    s.metrics.set_flows_active(n as u64);
                }
            }
            s.metrics.render()
        });
        let (bound, serving) = crate::serve_metrics::serve(addr, render)
            .map_err(|source| StartError::Listen { addr, source })?;
        metrics_serving = Some(serving);
        println!("tcpr balance metrics on {bound}");
    }
    migrate_requests();
    let mut listeners: HashMap<SocketAddr, Bound> = HashMap::new();
    for addr in shared.active().binds() {
        let b = listen(&shared, addr)?;
        listeners.insert(addr, b);
    }
    start_health(&shared);
    match &shared.steering {
        Some(s) => tracing::info!("steering by {}", s.name()),
        None => tracing::warn!("no steering datapath: every connection is proxied"),
    }
    println!("tcpr balance ready");
    let _ = io::stdout().flush();
    loop {
        let sig = signals.wait().map_err(|e| StartError::Kernel {
            what: "wait for signals",
            source: e.into(),
        })?;
        match sig {
            Signal::SIGHUP => reload(&shared, &opts.config_path, &mut listeners),
            _ => break,
        }
    }
    tracing::info!("draining: no new connections; waiting for those in flight");
    println!("tcpr balance draining");
    let _ = io::stdout().flush();
    stop_all(listeners.drain().map(|(_, b)| b).collect());
    // As its listeners: scrapes go to the balancer started beside it, if
    // any, rather than alternate between the two for the whole drain.
    if let Some(m) = &metrics_serving {
        m.stop();
    }
    if !drained_within(&shared, opts.drain_timeout) {
        // Heads and handoffs end by their own timeouts; relays only when
        // both their ends close.
        let waiting = *shared
            .in_flight
            .count
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let secs = opts.drain_timeout.unwrap_or_default().as_secs_f64();
        tracing::warn!(
            "the drain timed out after {secs} s (connections in flight: {waiting}): \
             resetting the proxied ones"
        );
        println!("tcpr balance drain timed out: resetting the proxied connections left");
        let _ = io::stdout().flush();
        shared.cut.cut();
        drained_within(&shared, None);
        // Counted as failures too, which no scrape sees now (the metrics
        // endpoint closed with the listeners): said here.
        let reset = shared.cut_relays.load(Ordering::Relaxed);
        println!("tcpr balance reset {reset} proxied connections");
        let _ = io::stdout().flush();
    }
    // The connections handed off live on at the backends: their flows stay
    // steered for the next balancer on the interface, where the datapath
    // can leave them to the kernel.
    // (None, or a hand-back of nothing to the balancer that took over: no
    // line.)
    if let Some(n @ 1..) = shared.steering.as_ref().and_then(|s| s.close(true)) {
        // usize::MAX: the last sweep failed, so the count is unknown.
        let n = if n == usize::MAX {
            "an unknown number of".to_string()
        } else {
            n.to_string()
        };
        println!(
            "tcpr balance left {n} steered flows to the kernel for the next tcpr balance \
             (or to the one running)"
        );
    }
    println!("tcpr balance drained");
    Ok(())
}

/// Waits until no work is in flight, for `timeout` at most (`None`: for
/// as long as it takes); whether none is.
fn drained_within(shared: &Shared, timeout: Option<Duration>) -> bool {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut n = shared
        .in_flight
        .count
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    while *n > 0 {
        n = match deadline {
            None => shared
                .in_flight
                .done
                .wait(n)
                .unwrap_or_else(|e| e.into_inner()),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                shared
                    .in_flight
                    .done
                    .wait_timeout(n, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
    true
}

/// Every member shows in the metrics from the start, with zero counts.
fn register_members(metrics: &Metrics, active: &Active) {
    for listener in &active.config.listeners {
        metrics.register_listener(&listener.name);
    }
    for (name, pool) in &active.pools {
        for (_, m) in pool.members() {
            metrics.register_member(name, &m.label());
        }
    }
}

/// Reads the config again: new listeners open, removed ones close, those
/// whose address is unchanged keep their socket (and its backlog); no
/// connection in flight is touched. A bad file changes nothing.
fn reload(
    shared: &Arc<Shared>,
    path: &std::path::Path,
    listeners: &mut HashMap<SocketAddr, Bound>,
) {
    let active = match Config::load(path)
        .map_err(StartError::from)
        .and_then(Active::build)
    {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("reload refused, the running config stays: {e}");
            println!("tcpr balance reload failed: {e}");
            let _ = io::stdout().flush();
            return;
        }
    };
    let binds = active.binds();
    register_members(&shared.metrics, &active);
    *shared.active.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(active);
    let gone: Vec<SocketAddr> = listeners
        .keys()
        .filter(|a| !binds.contains(a))
        .copied()
        .collect();
    let stopped: Vec<Bound> = gone.iter().filter_map(|a| listeners.remove(a)).collect();
    stop_all(stopped);
    for a in gone {
        println!("tcpr balance stopped listening on {a}");
    }
    for a in binds {
        if listeners.contains_key(&a) {
            continue;
        }
        match listen(shared, a) {
            Ok(b) => {
                listeners.insert(a, b);
            }
            Err(e) => tracing::error!("{e}"),
        }
    }
    println!("tcpr balance reloaded");
    let _ = io::stdout().flush();
}

fn listen(shared: &Arc<Shared>, addr: SocketAddr) -> Result<Bound, StartError> {
    // Shared (SO_REUSEPORT): a new balancer listens beside the one it
    // replaces, then that one is stopped; no connection finds the port
    // closed in between (see `migrate_requests`).
    let listener = tcpr_host::sock::listen_shared(addr)
        .map_err(|source| StartError::Listen { addr, source })?;
    // A blocking accept that gives up after the wakeup (accept honours
    // SO_RCVTIMEO, answering EAGAIN): one syscall per connection, where a
    // non-blocking accept and a poll took three per wakeup.
    tcpr_host::sock::set_recv_timeout(listener.as_fd(), ACCEPT_WAKEUP)
        .map_err(|source| StartError::Listen { addr, source })?;
    let client_speaks_first = shared
        .active()
        .listener_for(addr)
        .is_some_and(|(l, _)| l.protocol != Protocol::Tcp);
    if client_speaks_first {
        // HTTP and TLS clients speak first: accept() returns a connection
        // once its first bytes are in, so the head is almost always whole
        // at accept (no thread of its own, one wake-up fewer). One that
        // says nothing is accepted after DEFER_ACCEPT_SECS anyway and
        // given its head timeout.
        tcpr_host::sock::set_int(
            listener.as_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            DEFER_ACCEPT_SECS,
        )
        .map_err(|source| StartError::Listen { addr, source })?;
    }
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr, source })?;
    // Read once, after the last option set on the listener.
    let accepted_from = match ListenerOptions::read(listener.as_fd()) {
        Ok(o) => Some(Arc::new(o)),
        Err(e) => {
            tracing::warn!("{addr}: each handoff reads its socket's options in full: {e}");
            None
        }
    };
    println!("tcpr balance listening on {bound}");
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (Arc::clone(shared), Arc::clone(&stop));
    let thread = std::thread::Builder::new()
        .name(format!("accept {addr}"))
        .spawn(move || accept_loop(&s, &listener, addr, accepted_from, &st))
        .map_err(|source| StartError::Kernel {
            what: "start a thread",
            source,
        })?;
    Ok(Bound { stop, thread })
}

/// `net.ipv4.tcp_migrate_req` (Linux 5.14, IPv4 and IPv6 alike): when a
/// listener of a `SO_REUSEPORT` group closes, the connections in its
/// queues (handshakes, and those established and not accepted yet) move
/// to another listener of the group instead of being reset. A balancer
/// stopped while its replacement listens beside it then loses none, even
/// those that arrive between its last accept and its close. Set to 1 in
/// the balancer's network namespace when it is 0 (a listener alone in its
/// group is not concerned), and said.
fn migrate_requests() {
    const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(SYSCTL) {
        Ok(v) if v.trim() == "0" => match std::fs::write(SYSCTL, "1") {
            Ok(()) => println!(
                "tcpr balance set net.ipv4.tcp_migrate_req to 1: a balancer that stops \
                 hands the connections it has not accepted to the one listening beside it"
            ),
            Err(e) => tracing::warn!(
                "cannot set {SYSCTL} ({e}): a balancer stopped beside its replacement \
                 resets the connections it has not accepted"
            ),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read {SYSCTL} ({e})"),
    }
}

/// Stops accept loops: each takes what is already in its backlog, then
/// closes its socket. All are told before any is waited for.
fn stop_all(bound: Vec<Bound>) {
    for b in &bound {
        b.stop.store(true, Ordering::SeqCst);
    }
    for b in bound {
        let _ = b.thread.join();
    }
}

fn accept_loop(
    shared: &Arc<Shared>,
    listener: &TcpListener,
    bind: SocketAddr,
    accepted_from: Option<Arc<ListenerOptions>>,
    stop: &AtomicBool,
) {
    let mut head_buf = Vec::new();
    // Accepts left once told to stop: the backlog then (the listen
    // backlog's size at most) is taken, not what arrives while it is.
    let mut last = None;
    loop {
        if last.is_none() && stop.load(Ordering::SeqCst) {
            // Under steady load the backlog is never empty for a wakeup:
            // from now on an empty backlog answers at once.
            if let Err(e) = listener.set_nonblocking(true) {
                tracing::warn!("{bind}: {e}");
                return;
            }
            last = Some(STOP_BACKLOG);
        }
        if let Some(left) = last.as_mut() {
            if *left == 0 {
                return;
            }
            *left -= 1;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                if !forget_reused(shared, &stream, peer, bind) {
                    continue;
                }
                let busy = Busy::new(shared);
                let accepted = Accepted {
                    stream,
                    peer,
                    bind,
                    from: accepted_from.clone(),
                };
                // Most clients send their head with (or right after) the
                // handshake: when it is whole already, the decision is
                // taken here, which blocks on nothing (a handoff is queued,
                // a fallback runs on a thread of its own), and no thread
                // is started for the connection.
                if let Some(head) = head_now(shared, &accepted.stream, bind, &mut head_buf) {
                    serve(shared, accepted, busy, Some(head));
                    continue;
                }
                let s = Arc::clone(shared);
                let spawned = std::thread::Builder::new()
                    .name("head".into())
                    .spawn(move || serve(&s, accepted, busy, None));
                if let Err(e) = spawned {
                    tracing::error!("cannot start a connection thread: {e}");
                    shared.metrics.failure("thread");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The backlog stayed empty for a wakeup: the one moment
                // stopping loses nothing.
                if stop.load(Ordering::SeqCst) {
                    return;
                }
            }
            Err(e) => {
                // ECONNABORTED, EMFILE, ...: this one is lost, the next may not be.
                tracing::warn!("accept on {bind}: {e}");
                shared.metrics.failure("accept");
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Removes the steering entry a just accepted connection's tuple may
/// still have (see [`Steering::forget_reused`]): its client reused the
/// tuple of a flow that lives on, as far as the front knows, and the
/// entry would take the new connection's packets past the first 256 KiB
/// (or past 10 s) to the old flow's backend. At the accept, before any
/// wait: one map look-up (BPF; nothing for nf_tables, whose SYN removed
/// it), and a `getsockname` on a wildcard listener. Should the removal fail, the connection is reset (its later
/// packets would meet a backend with no socket for them) and `false`
/// returned.
fn forget_reused(shared: &Shared, stream: &TcpStream, peer: SocketAddr, bind: SocketAddr) -> bool {
    let Some(st) = &shared.steering else {
        return true;
    };
    // A wildcard listener's: the address the client connected to.
    let vip = if bind.ip().is_unspecified() {
        match stream.local_addr() {
            Ok(a) => a,
            Err(_) => return true,
        }
    } else {
        bind
    };
    match st.forget_reused(peer, vip) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("{bind}: cannot remove the stale steering entry of {peer} ({e}): reset");
            shared.metrics.failure("steering");
            let _ = tcpr_host::sock::reset_on_close(stream.as_fd());
            false
        }
    }
}

/// The head of a just accepted connection if it is whole in the receive
/// queue already (peeked without waiting); `None` when it is not, or is
/// bad: the connection's own thread then waits for it, or answers.
fn head_now(
    shared: &Shared,
    stream: &TcpStream,
    bind: SocketAddr,
    buf: &mut Vec<u8>,
) -> Option<Head> {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let active = shared.active();
    let (l, _) = active.listener_for(bind)?;
    if l.protocol == Protocol::Tcp {
        return Some(Head::Tcp);
    }
    buf.resize(l.max_head_bytes + 1, 0);
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match recv(stream.as_raw_fd(), buf, flags) {
        Ok(n) if n > 0 => head::parse(l.protocol, &buf[..n], l.max_head_bytes).ok(),
        _ => None,
    }
}

/// Why a head was not read.
enum HeadFailure {
    Timeout,
    Malformed(String),
    TooLarge,
    /// The client closed or reset before its head was whole.
    Gone,
}

/// Peeks at the head until it parses, without consuming a byte: what is
/// peeked stays in the receive queue and travels in the image.
fn peek_head(stream: &TcpStream, l: &Listener) -> Result<Head, HeadFailure> {
    if l.protocol == Protocol::Tcp {
        return Ok(Head::Tcp);
    }
    let deadline = Instant::now() + l.head_timeout;
    let mut buf = vec![0u8; l.max_head_bytes + 1];
    let mut seen = 0usize;
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(HeadFailure::Timeout);
        }
        if stream.set_read_timeout(Some(left)).is_err() {
            break Err(HeadFailure::Gone);
        }
        let n = match stream.peek(&mut buf) {
            Ok(0) => break Err(HeadFailure::Gone),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break Err(HeadFailure::Timeout)
            }
            Err(_) => break Err(HeadFailure::Gone),
        };
        if n == seen {
            // No new byte: at the deadline a blocking recv returns what it
            // has (SO_RCVTIMEO with bytes copied); before it, only the
            // client's FIN ends the wait whatever SO_RCVLOWAT says.
            break Err(if Instant::now() >= deadline {
                HeadFailure::Timeout
            } else {
                HeadFailure::Gone
            });
        }
        seen = n;
        match head::parse(l.protocol, &buf[..n], l.max_head_bytes) {
            Ok(h) => break Ok(h),
            Err(HeadError::Incomplete) if n > l.max_head_bytes => break Err(HeadFailure::TooLarge),
            Err(HeadError::Incomplete) => {
                // The next peek returns once one more byte is in (or at the
                // deadline): SO_RCVLOWAT bounds a blocking recv's wait.
                if set_rcvlowat(stream, n + 1).is_err() {
                    break Err(HeadFailure::Gone);
                }
            }
            Err(HeadError::Malformed(why)) => break Err(HeadFailure::Malformed(why)),
            Err(HeadError::TooLarge) => break Err(HeadFailure::TooLarge),
        }
    };
    // Back to the defaults: the image, a relay and the backend see the
    // socket as accept() gave it.
    let _ = set_rcvlowat(stream, 1);
    let _ = stream.set_read_timeout(None);
    result
}

fn set_rcvlowat(stream: &TcpStream, bytes: usize) -> io::Result<()> {
    let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
    tcpr_host::sock::set_int(stream.as_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// Answers the client itself and closes: an HTTP error, a TLS alert, or
/// nothing (tcp).
fn refuse(mut stream: TcpStream, protocol: Protocol, status: u16, alert: u8) {
    let _ = stream.set_write_timeout(Some(SERVER_CONNECT_TIMEOUT));
    let _ = match protocol {
        Protocol::Http => stream.write_all(head::http_error_response(status)),
        Protocol::Tls => stream.write_all(&head::tls_alert(alert)),
        Protocol::Tcp => Ok(()),
    };
    let _ = stream.shutdown(Shutdown::Write);
    // The head was only peeked: closed unread, the kernel would answer
    // with a RST, which may reach the client before it read the answer
    // (and some clients then drop it). What is in now is read and
    // dropped, without waiting (this may run on an accept loop), so the
    // close sends nothing more than the FIN above; bytes still on their
    // way still draw a RST.
    if stream.set_nonblocking(true).is_ok() {
        let mut sink = [0u8; 16 * 1024];
        for _ in 0..REFUSE_DRAIN_READS {
            match stream.read(&mut sink) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
}

/// A connection as its listener accepted it.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    /// The listener's address.
    bind: SocketAddr,
    /// The listener's options ([`Job::accepted_from`]).
    from: Option<Arc<ListenerOptions>>,
}

/// One accepted connection: peek (unless its `head` was read already),
/// decide, hand off or proxy. Once the head is in, nothing here waits:
/// a handoff is queued for its agent's batch, a fallback proxies on a
/// thread of its own, a refusal writes a few bytes to a new connection's
/// empty send buffer.
fn serve(shared: &Arc<Shared>, accepted: Accepted, busy: Busy, head: Option<Head>) {
    let Accepted {
        stream,
        peer,
        bind,
        from,
    } = accepted;
    let active = shared.active();
    let Some((listener, router)) = active.listener_for(bind) else {
        // Its listener went away in a reload while it was being accepted.
        shared.metrics.failure("no_listener");
        return;
    };
    shared.metrics.accepted(&listener.name);
    let head = match head.map_or_else(|| peek_head(&stream, listener), Ok) {
        Ok(h) => h,
        Err(f) => {
            let (kind, status, why) = match f {
                HeadFailure::Timeout => (
                    HeadErrorKind::Timeout,
                    HTTP_REQUEST_TIMEOUT,
                    "timed out".to_string(),
                ),
                HeadFailure::Malformed(w) => (HeadErrorKind::Malformed, HTTP_BAD_REQUEST, w),
                HeadFailure::TooLarge => (
                    HeadErrorKind::TooLarge,
                    HTTP_HEADER_TOO_LARGE,
                    "too large".to_string(),
                ),
                HeadFailure::Gone => {
                    shared.metrics.failure("client_gone");
                    return;
                }
            };
            tracing::info!("{peer} on {}: head {why}", listener.name);
            shared.metrics.head_error(kind);
            refuse(stream, listener.protocol, status, ALERT_INTERNAL_ERROR);
            return;
        }
    };
    let Some(pool_name) = router.pick(&head) else {
        tracing::info!("{peer} on {}: no route for {head:?}", listener.name);
        shared.metrics.failure("no_route");
        refuse(
            stream,
            listener.protocol,
            HTTP_NOT_FOUND,
            ALERT_UNRECOGNIZED_NAME,
        );
        return;
    };
    let Some(pool) = active.pools.get(pool_name) else {
        shared.metrics.failure("no_route");
        refuse(
            stream,
            listener.protocol,
            HTTP_NOT_FOUND,
            ALERT_UNRECOGNIZED_NAME,
        );
        return;
    };
    let health = &shared.health;
    let usable = |id: MemberId| {
        let m = pool.member(id);
        m.agent.is_some_and(|a| health.is_up(Target::Agent(a)))
            || m.server.is_some_and(|s| health.is_up(Target::Server(s)))
    };
    let Some(id) = pool.pick(peer, &usable) else {
        tracing::warn!("{peer}: no member of pool {pool_name} is up");
        shared.metrics.failure("no_member");
        refuse(
            stream,
            listener.protocol,
            HTTP_UNAVAILABLE,
            ALERT_INTERNAL_ERROR,
        );
        return;
    };
    let mut busy = busy;
    busy.count(&active, pool_name, id);
    let member = pool.member(id);
    let agent = member
        .agent
        .filter(|a| health.is_up(Target::Agent(*a)))
        .filter(|_| shared.steering.is_some() && active.auth.is_some());
    match agent {
        Some(agent) => {
            let job = Job {
                stream,
                accepted_from: from,
                pool: pool_name.to_string(),
                member: member.clone(),
                decided: Instant::now(),
                busy,
            };
            if let Some(queue) = batcher(shared, agent) {
                queue.push(job);
            } else {
                fallback(
                    shared,
                    job.stream,
                    &job.pool,
                    job.member,
                    "the agent's batching threads could not start",
                    job.busy,
                );
            }
        }
        None => {
            let why = if member.agent.is_none() {
                "the member has no agent"
            } else {
                "its agent is down or there is no steering"
            };
            fallback(shared, stream, pool_name, member.clone(), why, busy);
        }
    }
}

/// The queue of `agent`'s batches, with its batching threads (started on
/// first use); `None` when no thread could be started.
fn batcher(shared: &Arc<Shared>, agent: SocketAddr) -> Option<Arc<BatchQueue<Job>>> {
    let mut agents = shared.agents.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(q) = agents.get(&agent) {
        return Some(Arc::clone(q));
    }
    let queue = Arc::new(BatchQueue::new(BATCHING));
    let mut started = 0;
    for _ in 0..BATCHING.max_in_flight {
        let (s, q) = (Arc::clone(shared), Arc::clone(&queue));
        let spawned = std::thread::Builder::new()
            .name(format!("handoff {agent}"))
            .spawn(move || loop {
                let (batch, _in_flight) = q.next_batch();
                // A bug that panics loses its batch's connections, not the
                // agent's queue: a thread that died would leave every
                // later connection for the agent waiting, and a drain
                // waiting for them.
                let handed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    hand_off_batch(&s, agent, batch)
                }));
                if handed.is_err() {
                    tracing::error!(
                        "a handoff batch to {agent} panicked; its connections are lost"
                    );
                    s.metrics.failure("panic");
                }
            });
        match spawned {
            Ok(_) => started += 1,
            Err(e) => tracing::error!("cannot start a batcher of {agent}: {e}"),
        }
    }
    if started == 0 {
        return None;
    }
    agents.insert(agent, Arc::clone(&queue));
    Some(queue)
}

/// The steering datapath as the handoff's traffic switch: each flow is
/// steered to the agent's host between READY and COMMIT, and unsteered if
/// the batch rolls back.
struct SteerHook {
    steering: Arc<dyn Steering>,
    backend: IpAddr,
}

impl std::fmt::Debug for SteerHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} to {}", self.steering.name(), self.backend)
    }
}

impl SteerHook {
    fn steered(&self, flows: &[tcpr_engine::Flow]) -> Vec<SteeredFlow> {
        flows
            .iter()
            .map(|f| SteeredFlow {
                client: f.peer,
                vip: f.local,
                backend: self.backend,
                client_seq: None,
            })
            .collect()
    }
}

impl TrafficHook for SteerHook {
    /// All or none, in one steering transaction: the batch rolls back as
    /// one.
    fn switch(&self, flows: &[tcpr_engine::Flow]) -> Result<(), String> {
        self.steering
            .steer_batch(&self.steered(flows))
            .map_err(|e| e.to_string())
    }
    /// [`TrafficHook::switch`], each flow with its client's next sequence
    /// number: from its first packet on, a FIN or RST out of sequence
    /// (forged) does not end its steering (BPF).
    fn switch_expecting(
        &self,
        flows: &[(tcpr_engine::Flow, Option<tcpr_handoff::PeerSeq>)],
    ) -> Result<(), String> {
        let steered: Vec<SteeredFlow> = flows
            .iter()
            .map(|(f, seq)| SteeredFlow {
                client: f.peer,
                vip: f.local,
                backend: self.backend,
                client_seq: seq.map(|s| tcpr_steer::ClientSeq {
                    next: s.next,
                    ack: s.ack,
                }),
            })
            .collect();
        self.steering
            .steer_batch(&steered)
            .map_err(|e| e.to_string())
    }
    /// Tried three times: a flow left steered after its rollback reaches a
    /// backend that has no socket for it (see `hand_off_batch`).
    fn unswitch(&self, flows: &[tcpr_engine::Flow]) -> Result<(), String> {
        let steered = self.steered(flows);
        let mut tried = 0;
        loop {
            match self.steering.unsteer_batch(&steered) {
                Ok(()) => return Ok(()),
                Err(e) if tried == 2 => return Err(e.to_string()),
                Err(e) => {
                    tracing::warn!("unsteering a rolled-back batch: {e}; trying again");
                    tried += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

fn hand_off_batch(shared: &Arc<Shared>, agent: SocketAddr, batch: Vec<Job>) {
    let active = shared.active();
    let (Some(steering), Some(auth)) = (shared.steering.clone(), active.auth.clone()) else {
        for j in batch {
            fallback(
                shared,
                j.stream,
                &j.pool,
                j.member,
                "no steering or no [agents]",
                j.busy,
            );
        }
        return;
    };
    let mut opts = MigrateOptions::new(agent, auth);
    opts.timeout = shared.handoff_timeout;
    opts.switch = Switch::Hook(Arc::new(SteerHook {
        steering,
        backend: agent.ip(),
    }));
    // The streams go to the handoff whole (no second handle per
    // connection): it gives back every one that stays, and one whose fate
    // is unknown still frozen.
    let (conns, rest): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|j| {
            let mut out = Outgoing::new(j.stream.into(), Vec::new());
            out.accepted_from = j.accepted_from;
            (out, (j.pool, j.member, j.decided, j.busy))
        })
        .unzip();
    let results = match tcpr_handoff::hand_off_outgoing(conns, &opts) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("handoff to {agent} refused: {}", e.error);
            shared.metrics.failure("handoff_refused");
            for ((stream, _), (pool, member, _, busy)) in e.conns.into_iter().zip(rest) {
                fallback(shared, stream, &pool, member, "handoff refused", busy);
            }
            return;
        }
    };
    for ((pool, member, decided, busy), r) in rest.into_iter().zip(results) {
        match r {
            HandOff::Moved => {
                // The sender disconnected the socket in repair mode and
                // closed it: nothing reaches the client from here.
                let label = member.label();
                shared
                    .metrics
                    .handoff_ok(&pool, &label, decided.elapsed().as_secs_f64());
                drop(busy);
            }
            HandOff::Stayed(stream, why) if why.contains(tcpr_handoff::UNSWITCH_FAILED) => {
                // Its packets still go to the backend, which has no socket
                // for it: relayed here it would hang, or answer garbage.
                // Reset, the client learns at once.
                tracing::error!("handoff to {agent} rolled back but still steered: {why}; reset");
                shared.metrics.failure("unsteer");
                let _ = tcpr_host::sock::reset_on_close(stream.as_fd());
                drop(stream);
                drop(busy);
            }
            HandOff::Stayed(stream, why) => {
                tracing::warn!("handoff to {agent} rolled back: {why}");
                // The agent is gone or stuck: down until a health check
                // finds it answering PING again.
                if why.contains("cannot reach the agent")
                    || why.contains("did not answer")
                    || why.contains("link to the agent lost")
                {
                    shared.health.set(Target::Agent(agent), false);
                }
                shared.metrics.failure("rolled_back");
                fallback(shared, stream, &pool, member, &why, busy);
            }
            HandOff::Unknown(stream, why) => {
                tracing::error!(
                    "handoff to {agent} ended unknown, the connection stays frozen: {why}"
                );
                shared.metrics.failure("unknown");
                // Without a handle (the library could not keep one) it is
                // closed frozen, which sends nothing; its lock holds it
                // until the lease ends either way.
                if let Some(stream) = stream {
                    shared
                        .unknown
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((Instant::now() + tcpr_engine::DEFAULT_LEASE, stream));
                }
                drop(busy);
            }
        }
    }
}

/// Proxies a connection to its member's server, or another up member's,
/// so the client is served anyway; answers 503 / closes when none is. The
/// server's connect and the relay run on a thread of their own: the
/// caller (an accept loop, an agent's batch) never waits for a server.
fn fallback(
    shared: &Arc<Shared>,
    client: TcpStream,
    pool: &str,
    member: MemberConfig,
    why: &str,
    busy: Busy,
) {
    let (s, pool, why) = (Arc::clone(shared), pool.to_string(), why.to_string());
    let spawned = std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || proxy(&s, client, &pool, member, &why, busy));
    if let Err(e) = spawned {
        // The connection is closed with the closure: nothing can serve it.
        tracing::error!("cannot start a relay thread: {e}");
        shared.metrics.failure("thread");
    }
}

/// [`fallback`]'s thread: connects to a server and relays until both ends
/// closed.
fn proxy(
    shared: &Arc<Shared>,
    client: TcpStream,
    pool: &str,
    member: MemberConfig,
    why: &str,
    busy: Busy,
) {
    if shared.cut.is_cut() {
        // The drain timed out: no server is connected to only to reset
        // the pair at once.
        let _ = tcpr_host::sock::reset_on_close(client.as_fd());
        shared.metrics.failure("drain_timeout");
        shared.cut_relays.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let active = shared.active();
    // The member's server first, then the other servers of the pool as it
    // is now (a reload may have changed or removed it).
    let others: Vec<SocketAddr> = active
        .pools
        .get(pool)
        .map(|p| {
            p.members()
                .filter_map(|(_, m)| m.server)
                .filter(|s| Some(*s) != member.server)
                .collect()
        })
        .unwrap_or_default();
    let mut server = None;
    for addr in member.server.into_iter().chain(others) {
        if !shared.health.is_up(Target::Server(addr)) {
            continue;
        }
        match TcpStream::connect_timeout(&addr, SERVER_CONNECT_TIMEOUT) {
            Ok(s) => {
                server = Some(s);
                break;
            }
            Err(e) => {
                tracing::warn!("server {addr}: {e}");
                shared.health.set(Target::Server(addr), false);
            }
        }
    }
    let Some(server) = server else {
        tracing::warn!("{pool}: no server to proxy to ({why})");
        shared.metrics.failure("no_server");
        let protocol = active
            .config
            .listeners
            .iter()
            .find(|l| client.local_addr().is_ok_and(|a| l.bind.contains(&a)))
            .map_or(Protocol::Tcp, |l| l.protocol);
        refuse(client, protocol, HTTP_UNAVAILABLE, ALERT_INTERNAL_ERROR);
        return;
    };
    tracing::debug!("proxying to {:?} ({why})", server.peer_addr());
    if member.agent.is_some() {
        // A handoff failed or was impossible (agent down, no steering).
        shared.metrics.fallback(pool, &member.label());
    } else {
        shared.metrics.proxied(pool, &member.label());
    }
    match tcpr_host::relay::relay_until(client, server, &shared.cut) {
        Ok(_) => {}
        Err(e) if e.was_cut() => {
            tracing::debug!("{pool}: a proxied connection reset by the drain's timeout");
            shared.metrics.failure("drain_timeout");
            shared.cut_relays.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => tracing::debug!("relay ended: {e}"),
    }
    drop(busy);
}

fn start_health(shared: &Arc<Shared>) {
    let s = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("health".into())
        .spawn(move || loop {
            let active = s.active();
            s.health.check(&active.targets(), active.auth.as_ref());
            let (mut members, mut agents) = (vec![], vec![]);
            for (name, pool) in &active.pools {
                for (_, m) in pool.members() {
                    let up = m.agent.is_some_and(|a| s.health.is_up(Target::Agent(a)))
                        || m.server.is_some_and(|a| s.health.is_up(Target::Server(a)));
                    s.metrics.set_member_up(name, &m.label(), up);
                    members.push((name.as_str(), m.label()));
                    if let Some(a) = m.agent {
                        let agent_up = active.auth.is_some() && s.health.is_up(Target::Agent(a));
                        s.metrics.set_agent_up(&a.to_string(), agent_up);
                        agents.push(a.to_string());
                    }
                }
            }
            // A member or agent a reload removed is no longer said up or
            // down (before, its last state stayed for the process's life).
            s.metrics.retain_up(&members, &agents);
            drop(active);
            let now = Instant::now();
            s.unknown
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(until, _)| *until > now);
            std::thread::sleep(CHECK_INTERVAL);
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the health checks: {e}");
    }
}
