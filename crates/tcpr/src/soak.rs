//! `tcpr soak`: many connections streaming both ways, each byte checked by
//! an independent client, moved back and forth between two hosts at random
//! moments while faults are injected at random; one summary line at the
//! end, and a failure report naming the connection, the fault and the
//! step, with the seed that replays the schedule.
//!
//! Hosts are network namespaces made here (`tcpr-netlab`): a client and
//! two servers on one bridge. Each connection has a service address of its
//! own, so that each moves alone with its address (`Switch::MoveAddress`).
//! The server application is an echo in this process; moves are
//! `tcpr_handoff::hand_off` calls made here; each server host runs
//! `tcpr agent` as a child process (journal on, delivering over a unix
//! socket back to this process), so that it can be killed with SIGKILL in
//! the middle of a handoff and restarted. The client (`soak/client.py`,
//! python3's socket module) sends a seeded stream on each connection and
//! checks every byte echoed back: a lost, duplicated or reset connection
//! shows there whatever this process believes.

mod agents;
mod echo;
mod peer;
mod schedule;

use agents::{Agent, Deliveries};
use anyhow::{bail, Context, Result};
use clap::Args;
use echo::{Echo, EchoState};
use peer::{ClientConn, Peer};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use schedule::{Ambient, MoveFault, Schedule, Step};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tcpr_handoff::{hand_off, Auth, HandOff, MigrateOptions, Switch};
use tcpr_netlab::{Host, Lab};

/// The service port of every connection.
const SERVICE_PORT: u16 = 8080;
/// The agents' port.
const AGENT_PORT: u16 = 7070;
/// Service addresses per /24 of the soak's /16.
const ADDRESSES_PER_SUBNET: usize = 200;
/// The most connections a soak runs (service addresses fit 10.88.1-5.x).
pub const MAX_CONNECTIONS: usize = 1000;
/// The longest soak, seconds (a day).
const MAX_DURATION_SECS: f64 = 86_400.0;
/// The default length of a soak given neither a duration nor moves.
const DEFAULT_DURATION_SECS: f64 = 60.0;
/// Each client sends this many bytes/s on each connection.
const RATE_BYTES_PER_SEC: u64 = 16 * 1024;
/// Each wait for the agent in a handoff (the agent's own timeout too).
const STEP_TIMEOUT: Duration = Duration::from_secs(1);
/// The source lock's lease: a lock an aborted soak leaves expires by then.
const LEASE: Duration = Duration::from_secs(10);
/// How long a committed move's delivery may take.
const DELIVERY_WAIT: Duration = Duration::from_secs(10);
/// How long an unknown outcome waits for the delivery before the
/// connection is taken back at its source.
const RESOLVE_WAIT: Duration = Duration::from_secs(6);
/// How long the client waits at the end for every echo.
const FINISH_WAIT_SECS: u64 = 30;
/// Steps between two looks at the client's counters.
const STATS_EVERY_STEPS: u64 = 25;
/// How long an echo may take to write back what it holds before a move
/// that carries no blob.
const DRAIN_WAIT: Duration = Duration::from_millis(200);
/// How often an armed agent's fault point is looked for.
const FAULT_POINT_POLL: Duration = Duration::from_micros(500);
/// The PSK both ends use.
const PSK: &str = "tcpr soak: a shared secret of the two hosts";

/// `tcpr soak`.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Connections streaming both ways (1 to 1000).
    #[arg(long, default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=MAX_CONNECTIONS as u64))]
    connections: u64,
    /// Run for this many seconds (default 60 when --moves is not given).
    #[arg(long, conflicts_with = "moves",
          value_parser = |s: &str| crate::bounds::seconds(s, 1.0, MAX_DURATION_SECS))]
    duration: Option<Duration>,
    /// Run until this many moves were attempted (1 to 10,000,000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    moves: Option<u64>,
    /// The seed of the schedule of moves and faults (random if not given;
    /// printed, so that a failing run can be replayed).
    #[arg(long)]
    seed: Option<u64>,
    /// Also kill agents at random moments, not only at the protocol's
    /// fault points: this reaches the window between an agent's resume of
    /// a connection and its delivery, where a kill loses the connection.
    #[arg(long)]
    kill_anytime: bool,
    /// Test only: reset one connection on purpose, to show that the check
    /// catches a lost connection.
    #[arg(long, hide = true)]
    sabotage: bool,
}

/// When the soak ends.
#[derive(Debug, Clone, Copy)]
enum Until {
    Elapsed(Duration),
    Moves(u64),
}

/// Which server host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }
}

/// The last thing that happened to a connection, for the failure report.
#[derive(Debug, Clone)]
struct MoveRecord {
    number: u64,
    from: Side,
    fault: String,
    outcome: String,
}

/// Where a connection's server end is.
#[derive(Debug)]
enum Holder {
    /// Echoing on a host.
    Live(Echo),
    /// Between a stop and a start (a move under way).
    Moving,
    /// This process no longer holds it, with why.
    Gone(String),
}

struct Conn {
    index: usize,
    ip: IpAddr,
    at: Side,
    holder: Holder,
    last: Option<MoveRecord>,
    /// The move after which the client first reported it broken.
    broken_after: Option<u64>,
}

impl Conn {
    fn name(&self) -> String {
        format!("connection {} ({}:{SERVICE_PORT})", self.index, self.ip)
    }
}

#[derive(Debug, Default)]
struct Counts {
    attempted: u64,
    committed: u64,
    rolled_back: u64,
    unknown: u64,
    unknown_moved: u64,
    unknown_stayed: u64,
    agent_kills: u64,
    link_cuts: u64,
    loss_periods: u64,
    zero_windows: u64,
    half_closes: u64,
    races: u64,
    sender_kills: u64,
    duplicates: u64,
}

/// What the moves share across threads.
struct Mover {
    hosts: [Host; 2],
    agents: [Agent; 2],
    auth: Auth,
    /// Where agents armed at a fault point say they reached it.
    fault_dir: std::path::PathBuf,
    /// Agents armed so far (each gets a directory of its own).
    armed: AtomicU64,
}

struct Soak {
    mover: Mover,
    hosts: [Host; 2],
    deliveries: Deliveries,
    conns: Vec<Conn>,
    counts: Counts,
    /// Problems found on the way (each names its connection).
    problems: Vec<String>,
}

/// The service address of connection `i`.
fn service_ip(i: usize) -> IpAddr {
    let subnet = 1 + i / ADDRESSES_PER_SUBNET;
    let host = 1 + i % ADDRESSES_PER_SUBNET;
    IpAddr::V4(Ipv4Addr::new(10, 88, subnet as u8, host as u8))
}

/// Runs the soak; the exit status is 0 only when nothing was lost,
/// duplicated or left behind.
pub fn run(args: SoakArgs) -> Result<i32> {
    if !crate::demo::is_root() {
        bail!("tcpr soak needs root: it creates network namespaces and uses TCP_REPAIR (CAP_SYS_ADMIN, CAP_NET_ADMIN)");
    }
    let n = usize::try_from(args.connections)?;
    let until = match (args.duration, args.moves) {
        (_, Some(m)) => Until::Moves(m),
        (Some(d), None) => Until::Elapsed(d),
        (None, None) => Until::Elapsed(Duration::from_secs_f64(DEFAULT_DURATION_SECS)),
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut replay = match until {
        Until::Elapsed(d) => format!(
            "tcpr soak --connections {n} --duration {} --seed {seed}",
            d.as_secs_f64()
        ),
        Until::Moves(m) => format!("tcpr soak --connections {n} --moves {m} --seed {seed}"),
    };
    if args.kill_anytime {
        replay.push_str(" --kill-anytime");
    }
    if args.sabotage {
        replay.push_str(" --sabotage");
    }
    println!("soak: {replay}");
    ctrlc::set_handler(|| {
        tcpr_netlab::cleanup_all();
        eprintln!("\ninterrupted: network namespaces removed");
        std::process::exit(crate::demo::EXIT_INTERRUPTED);
    })
    .context("install the Ctrl-C handler")?;
    tcpr_host::raise_fd_limit(16 * n as u64 + 1024)?;

    let dir = std::env::temp_dir().join(format!("tcpr-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = soak(n, until, seed, &args, &dir, &replay);
    if matches!(result, Ok(0)) {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!(
            "the agents' logs and journals are kept in {}",
            dir.display()
        );
    }
    result
}

fn soak(
    n: usize,
    until: Until,
    seed: u64,
    args: &SoakArgs,
    dir: &std::path::Path,
    replay: &str,
) -> Result<i32> {
    let mut lab = Lab::new("soak")?;
    let client = lab.host("c", &["10.88.0.1/16"])?;
    let a = lab.host("a", &["10.88.0.2/16"])?;
    let b = lab.host("b", &["10.88.0.3/16"])?;
    let ips: Vec<IpAddr> = (0..n).map(service_ip).collect();
    // Every connection starts on a.
    for ip in &ips {
        a.add_addr(&format!("{ip}/16"))?;
    }
    for h in [&a, &b] {
        h.within(|| Ok(tcpr_engine::lock::prepare()?))?;
    }
    std::fs::write(dir.join("psk"), PSK)?;
    let auth = Auth::psk_file(&dir.join("psk"))?;
    let deliveries = Deliveries::listen(&[dir.join("a.sock"), dir.join("b.sock")])?;
    let allow: Vec<SocketAddr> = ips
        .iter()
        .map(|ip| SocketAddr::new(*ip, SERVICE_PORT))
        .collect();
    let agent_a = Agent::start(
        &a,
        SocketAddr::new("10.88.0.2".parse()?, AGENT_PORT),
        dir,
        "a",
        &allow,
        STEP_TIMEOUT,
    )?;
    let agent_b = Agent::start(
        &b,
        SocketAddr::new("10.88.0.3".parse()?, AGENT_PORT),
        dir,
        "b",
        &allow,
        STEP_TIMEOUT,
    )?;

    let listeners = a.within(|| {
        ips.iter()
            .map(|ip| Ok(std::net::TcpListener::bind((*ip, SERVICE_PORT))?))
            .collect::<Result<Vec<_>>>()
    })?;
    let (peer_tx, peer_rx) = std::sync::mpsc::channel();
    {
        let (client, ips) = (client.clone(), ips.clone());
        std::thread::spawn(move || {
            let _ = peer_tx.send(Peer::start(
                &client,
                seed,
                RATE_BYTES_PER_SEC,
                SERVICE_PORT,
                &ips,
            ));
        });
    }
    let mut conns = Vec::with_capacity(n);
    for (i, l) in listeners.into_iter().enumerate() {
        let (sock, _) = l.accept()?;
        conns.push(Conn {
            index: i,
            ip: ips[i],
            at: Side::A,
            holder: Holder::Live(Echo::start(sock, EchoState::default())?),
            last: None,
            broken_after: None,
        });
    }
    let mut peer = peer_rx.recv()??;

    let mut s = Soak {
        mover: Mover {
            hosts: [a.clone(), b.clone()],
            agents: [agent_a, agent_b],
            auth,
            fault_dir: dir.to_path_buf(),
            armed: AtomicU64::new(0),
        },
        hosts: [a.clone(), b.clone()],
        deliveries,
        conns,
        counts: Counts::default(),
        problems: vec![],
    };
    let mut schedule = Schedule::new(SmallRng::seed_from_u64(seed), n, args.kill_anytime);
    let hosts_for_loss = [client.clone(), a.clone(), b.clone()];
    let progress = indicatif::ProgressBar::new_spinner();
    progress.enable_steady_tick(Duration::from_millis(200));
    let started = Instant::now();
    let mut step_no = 0u64;
    let mut alive = n;
    let mut sabotaged = !args.sabotage;
    loop {
        let done = match until {
            Until::Elapsed(d) => started.elapsed() >= d,
            Until::Moves(m) => s.counts.attempted >= m,
        };
        // Nothing left to move ends it too (the report says why).
        let movable = s.conns.iter().any(|c| matches!(c.holder, Holder::Live(_)));
        if done || !movable {
            break;
        }
        let quarter = match until {
            Until::Elapsed(d) => started.elapsed() >= d / 4,
            Until::Moves(m) => s.counts.attempted >= m / 4,
        };
        if !sabotaged && quarter {
            sabotaged = s.sabotage(&mut peer, step_no)?;
        }
        step_no += 1;
        let step = schedule.next(step_no);
        for amb in &step.ambient {
            s.ambient(amb, &mut peer, &hosts_for_loss)?;
        }
        let budget = match until {
            Until::Elapsed(_) => None,
            Until::Moves(m) => Some(m.saturating_sub(s.counts.attempted)),
        };
        s.moves(&step, step_no, budget)?;
        if step_no.is_multiple_of(STATS_EVERY_STEPS) {
            alive = s.look(&peer.stats()?, step_no);
        }
        progress.set_message(format!(
            "{:.0}s moves {} (committed {} / rolled back {} / unknown {}) alive {alive}/{n} | kills {} cuts {} loss {} zero-win {} half-closed {} races {}",
            started.elapsed().as_secs_f64(),
            s.counts.attempted,
            s.counts.committed,
            s.counts.rolled_back,
            s.counts.unknown,
            s.counts.agent_kills,
            s.counts.link_cuts,
            s.counts.loss_periods,
            s.counts.zero_windows,
            s.counts.half_closes,
            s.counts.races,
        ));
        std::thread::sleep(step.pause);
    }
    progress.finish_and_clear();

    // The end: faults off, every echo drained, then the checks.
    for h in &hosts_for_loss {
        h.clear_loss().ok();
    }
    for h in &s.hosts {
        agents::remove_cut_table(h).ok();
    }
    let finals = peer.finish(FINISH_WAIT_SECS)?;
    s.look(&finals, step_no);
    for c in &mut s.conns {
        if let Holder::Live(_) = c.holder {
            let Holder::Live(echo) = std::mem::replace(&mut c.holder, Holder::Moving) else {
                unreachable!("matched Live above");
            };
            let stopped = echo.stop();
            if let Some(e) = stopped.error {
                s.problems
                    .push(format!("{}: the echo failed: {e}", c.name()));
            }
            c.holder = Holder::Gone("the soak ended".into());
        }
    }
    for d in s.deliveries.strays() {
        s.counts.duplicates += 1;
        s.problems.push(format!(
            "{}: delivered again at the end (a second copy)",
            d.local
        ));
    }
    let leftovers = s.leftovers(&ips)?;
    let elapsed = started.elapsed();
    Ok(s.summary(&finals, &leftovers, elapsed, seed, replay))
}

/// What the soak leaves behind (all must be zero).
#[derive(Debug, Default)]
struct Leftovers {
    /// Lock elements at the end that expire by their lease (those of
    /// killed agents: a restarted agent does not release them).
    expiring_locks: usize,
    /// Lock elements that would never expire.
    locks: usize,
    rules: usize,
    policy_rules: usize,
    misplaced_addresses: usize,
}

impl Soak {
    fn host(&self, side: Side) -> &Host {
        &self.hosts[side.index()]
    }

    /// Applies the client's view; returns how many connections are whole.
    fn look(&mut self, view: &[ClientConn], step_no: u64) -> usize {
        for (c, v) in self.conns.iter_mut().zip(view) {
            if !v.ok() && c.broken_after.is_none() {
                c.broken_after = Some(step_no);
            }
        }
        view.iter().filter(|v| v.ok()).count()
    }

    fn ambient(&mut self, amb: &Ambient, peer: &mut Peer, loss_hosts: &[Host; 3]) -> Result<()> {
        match *amb {
            Ambient::LossOn { host, per_mille } => {
                self.counts.loss_periods += 1;
                loss_hosts[host].set_loss(per_mille)?;
            }
            Ambient::LossOff { host } => loss_hosts[host].clear_loss()?,
            Ambient::Pause(i) => {
                self.counts.zero_windows += 1;
                peer.command(&format!("pause {i}"))?;
            }
            Ambient::Resume(i) => peer.command(&format!("resume {i}"))?,
            Ambient::HalfClose(i) => {
                self.counts.half_closes += 1;
                peer.command(&format!("shut {i}"))?;
            }
        }
        Ok(())
    }

    /// The step's moves: one, or two at once (racing).
    /// The step's moves, `budget` of them at most (`--moves`: a step of
    /// racing moves at the end would otherwise overshoot it).
    fn moves(&mut self, step: &Step, step_no: u64, budget: Option<u64>) -> Result<()> {
        let mut started = vec![];
        let mut targets = vec![];
        let attempted_before = self.counts.attempted;
        for m in &step.moves {
            if budget.is_some_and(|b| self.counts.attempted - attempted_before >= b) {
                break;
            }
            let c = &mut self.conns[m.conn];
            // A kill meant for one move's protocol step must not land at a
            // random moment of another's: a move racing a kill goes to the
            // other agent, or waits.
            let to = c.at.other();
            let kills = |f: &MoveFault| !matches!(f, MoveFault::None | MoveFault::CutLink { .. });
            if targets
                .iter()
                .any(|(t, f)| *t == to && (kills(f) || kills(&m.fault)))
            {
                continue;
            }
            if !matches!(c.holder, Holder::Live(_)) {
                continue;
            }
            let Holder::Live(echo) = std::mem::replace(&mut c.holder, Holder::Moving) else {
                unreachable!("matched Live above");
            };
            let mut fault = m.fault;
            let stopped = match fault {
                // `tcpr migrate` carries no blob: the echo drains first,
                // and a move it cannot drain for goes in process.
                MoveFault::KillSender { .. } => {
                    let stopped = echo.drain(DRAIN_WAIT);
                    if !stopped.state.pending.is_empty() {
                        fault = MoveFault::None;
                    }
                    stopped
                }
                _ => echo.stop(),
            };
            if let Some(e) = stopped.error {
                c.holder = Holder::Gone(format!("the echo failed: {e}"));
                continue;
            }
            self.counts.attempted += 1;
            targets.push((to, fault));
            started.push((m.conn, fault, c.at, stopped.sock, stopped.state));
        }
        // Agents are armed before any move starts: a restart must not cut
        // a racing move short.
        let mut armed = vec![];
        for (_, fault, from, _, _) in &started {
            armed.push(match fault {
                MoveFault::KillAtStep { point } => {
                    let dir = self.mover.fault_dir.join(format!(
                        "fault-{}",
                        self.mover.armed.fetch_add(1, Ordering::SeqCst)
                    ));
                    std::fs::create_dir_all(&dir)?;
                    let name = schedule::AGENT_FAULT_POINTS[*point];
                    self.mover.agents[from.other().index()].arm(name, &dir)?;
                    Some(dir.join(format!("reached-{name}")))
                }
                _ => None,
            });
        }
        if started.len() > 1 {
            self.counts.races += 1;
        }
        let outcomes: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = started
                .into_iter()
                .zip(armed)
                .map(|((i, fault, from, sock, state), reached)| {
                    let me = &self.mover;
                    scope.spawn(move || {
                        let r = me.attempt(from, sock, &state, fault, reached.as_deref());
                        (i, fault, from, state, r)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("a move panicked")))
                .collect::<Result<_>>()
        })?;
        for (i, fault, from, state, (r, kills, cuts)) in outcomes {
            self.counts.agent_kills += kills;
            self.counts.link_cuts += cuts;
            self.settle(i, from, state, fault, r, step_no)?;
        }
        Ok(())
    }

    /// Takes in the outcome of one move.
    fn settle(
        &mut self,
        i: usize,
        from: Side,
        state: EchoState,
        fault: MoveFault,
        r: Attempt,
        step_no: u64,
    ) -> Result<()> {
        let to = from.other();
        tracing::debug!(conn = i, from = from.name(), %fault, step = step_no, "move");
        let ip = self.conns[i].ip;
        let (holder, at, outcome) = match r {
            Attempt::Done(HandOff::Moved) => {
                self.counts.committed += 1;
                match self.deliveries.wait_for(ip, DELIVERY_WAIT) {
                    Some(d) => (self.adopt(d)?, to, "committed".to_string()),
                    None => (
                        Holder::Gone("committed, but never delivered".into()),
                        to,
                        "committed, never delivered".into(),
                    ),
                }
            }
            Attempt::Done(HandOff::Stayed(sock, why)) => {
                self.counts.rolled_back += 1;
                (
                    Holder::Live(Echo::start(sock, state)?),
                    from,
                    format!("rolled back: {why}"),
                )
            }
            Attempt::Refused(sock, why) => {
                self.counts.rolled_back += 1;
                (
                    Holder::Live(Echo::start(sock, state)?),
                    from,
                    format!("refused: {why}"),
                )
            }
            Attempt::Done(HandOff::Unknown(sock, why)) => {
                self.counts.unknown += 1;
                let (h, at, how) = self
                    .resolve(ip, from, sock, state)
                    .unwrap_or_else(|e| unresolved(from, &e));
                (h, at, format!("unknown ({why}); {how}"))
            }
            Attempt::SenderKilled(sock) => {
                self.counts.sender_kills += 1;
                let (h, at, how) = self
                    .after_sender_killed(ip, from, sock, state)
                    .unwrap_or_else(|e| unresolved(from, &e));
                (h, at, format!("sender killed; {how}"))
            }
            Attempt::Failed(why) => (Holder::Gone(why.clone()), from, why),
        };
        if let Holder::Gone(why) = &holder {
            let name = self.conns[i].name();
            self.problems.push(format!(
                "{name}: lost at move {step_no} ({} -> {}, fault {fault}): {why}",
                from.name(),
                to.name()
            ));
        }
        let c = &mut self.conns[i];
        c.holder = holder;
        c.at = at;
        c.last = Some(MoveRecord {
            number: step_no,
            from,
            fault: fault.to_string(),
            outcome,
        });
        Ok(())
    }

    /// A delivered connection starts echoing where it landed.
    fn adopt(&mut self, d: tcpr_handoff::Delivered) -> Result<Holder> {
        Ok(match EchoState::decode(&d.blob) {
            Ok(st) => Holder::Live(Echo::start(d.stream, st)?),
            Err(e) => Holder::Gone(format!("{e:#}")),
        })
    }

    /// An unknown outcome: the delivery decides; without one the agent
    /// does not hold the connection (its restored copy died with it, or was
    /// never resumed), so the address comes back and the frozen source
    /// copy is thawed. The client tells at the end whether it survived.
    fn resolve(
        &mut self,
        ip: IpAddr,
        from: Side,
        sock: Option<TcpStream>,
        state: EchoState,
    ) -> Result<(Holder, Side, String)> {
        let to = from.other();
        if let Some(d) = self.deliveries.wait_for(ip, RESOLVE_WAIT) {
            self.counts.unknown_moved += 1;
            if let Some(s) = sock {
                // The copy here stays frozen; closing it in repair mode
                // sends nothing. Its lock goes: the address left this host.
                let flow = tcpr_engine::inspect_socket(std::os::fd::AsFd::as_fd(&s))?.0;
                let ns = tcpr_engine::Netns::of_socket(std::os::fd::AsFd::as_fd(&s))?;
                tcpr_engine::lock::release_flows(&ns, &[flow])?;
                drop(s);
            }
            return Ok((self.adopt(d)?, to, "delivered: moved".into()));
        }
        self.counts.unknown_stayed += 1;
        // The restarted agent keeps the lock its dead self took for the
        // restored copy until the lease ends; the address is about to
        // leave, so it goes now (an operator resolving the outcome does
        // the same).
        if let Some(s) = &sock {
            let flow = tcpr_engine::inspect_socket(std::os::fd::AsFd::as_fd(s))?.0;
            let _ = self.host(to).within(|| {
                Ok(tcpr_engine::lock::release_flows(
                    &tcpr_engine::Netns::current(),
                    &[flow],
                )?)
            });
        }
        let cidr = format!("{ip}/16");
        if agents::addresses(self.host(to))?.contains(&ip) {
            self.host(to).del_addr(&cidr)?;
        }
        if !agents::addresses(self.host(from))?.contains(&ip) {
            self.host(from).add_addr(&cidr)?;
            self.host(from).announce(ip)?;
        }
        let Some(s) = sock else {
            return Ok((
                Holder::Gone("unknown, and the frozen socket was not given back".into()),
                from,
                "not delivered; no socket to thaw".into(),
            ));
        };
        tcpr_engine::thaw_frozen(s.try_clone()?.into())?;
        Ok((
            Holder::Live(Echo::start(s, state)?),
            from,
            "not delivered: thawed at the source".into(),
        ))
    }

    /// After a killed sender: delivered at the destination, the move
    /// happened; otherwise the connection is taken back here, thawed if
    /// the sender froze it, with its address.
    fn after_sender_killed(
        &mut self,
        ip: IpAddr,
        from: Side,
        sock: TcpStream,
        state: EchoState,
    ) -> Result<(Holder, Side, String)> {
        use std::os::fd::AsFd;
        let Ok((flow, _)) = tcpr_engine::inspect_socket(sock.as_fd()) else {
            // Closed: a sender that saw its move commit closes its copy
            // (silently, in repair mode), which is this socket too.
            return Ok(match self.deliveries.wait_for(ip, RESOLVE_WAIT) {
                Some(d) => {
                    self.counts.committed += 1;
                    (self.adopt(d)?, from.other(), "delivered: moved".into())
                }
                None => (
                    Holder::Gone("the sender closed it, and it was not delivered".into()),
                    from,
                    "closed here, not delivered".into(),
                ),
            });
        };
        let frozen = tcpr_engine::is_frozen(sock.as_fd())?;
        let ns = tcpr_engine::Netns::of_socket(sock.as_fd())?;
        let locked = tcpr_engine::lock::is_locked(&ns, &flow)?;
        if !frozen && !locked && agents::addresses(self.host(from))?.contains(&ip) {
            self.counts.rolled_back += 1;
            return Ok((
                Holder::Live(Echo::start(sock, state)?),
                from,
                "nothing frozen, or rolled back".into(),
            ));
        }
        if frozen || locked {
            // Resolved as an unknown outcome is.
            self.counts.unknown += 1;
            return self.resolve(ip, from, Some(sock), state);
        }
        // Not frozen, address gone: killed between the switch and the
        // roll back, or after a commit.
        match self.deliveries.wait_for(ip, RESOLVE_WAIT) {
            Some(d) => {
                self.counts.committed += 1;
                drop(sock);
                Ok((self.adopt(d)?, from.other(), "delivered: moved".into()))
            }
            None => {
                self.counts.rolled_back += 1;
                self.host(from).add_addr(&format!("{ip}/16"))?;
                self.host(from).announce(ip)?;
                Ok((
                    Holder::Live(Echo::start(sock, state)?),
                    from,
                    "not frozen, address put back".into(),
                ))
            }
        }
    }

    /// Resets one connection on purpose (`--sabotage`): its echo stops,
    /// and it is closed with unread data, which sends a RST (RFC 2525
    /// 2.17, Linux tcp_close). Returns whether it was done.
    fn sabotage(&mut self, peer: &mut Peer, step_no: u64) -> Result<bool> {
        let Some(c) = self
            .conns
            .iter_mut()
            .find(|c| matches!(c.holder, Holder::Live(_)))
        else {
            return Ok(false);
        };
        peer.command(&format!("resume {}", c.index))?;
        let Holder::Live(echo) = std::mem::replace(&mut c.holder, Holder::Moving) else {
            unreachable!("found Live above");
        };
        let stopped = echo.stop();
        // Wait for the client's next bytes, left unread.
        let deadline = Instant::now() + DELIVERY_WAIT;
        let mut byte = [0u8; 1];
        while Instant::now() < deadline && !matches!(stopped.sock.peek(&mut byte), Ok(1)) {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(stopped);
        c.holder = Holder::Gone("sabotaged".into());
        c.last = Some(MoveRecord {
            number: step_no,
            from: c.at,
            fault: "sabotage (test only: closed with unread data, a RST)".into(),
            outcome: "reset on purpose".into(),
        });
        Ok(true)
    }

    fn leftovers(&self, ips: &[IpAddr]) -> Result<Leftovers> {
        let mut l = Leftovers::default();
        for h in &self.hosts {
            let locks = agents::lock_elements(h)?;
            l.expiring_locks += locks.expiring;
            l.locks += locks.permanent;
            l.rules += agents::stray_rules(h)?;
            l.policy_rules += agents::extra_policy_rules(h)?;
        }
        let on = [
            agents::addresses(&self.hosts[0])?,
            agents::addresses(&self.hosts[1])?,
        ];
        for (c, ip) in self.conns.iter().zip(ips) {
            let here: Vec<Side> = [Side::A, Side::B]
                .into_iter()
                .filter(|s| on[s.index()].contains(ip))
                .collect();
            if here != [c.at] {
                l.misplaced_addresses += 1;
            }
        }
        Ok(l)
    }

    fn summary(
        &self,
        finals: &[ClientConn],
        left: &Leftovers,
        elapsed: Duration,
        seed: u64,
        replay: &str,
    ) -> i32 {
        let n = self.conns.len();
        let alive = finals.iter().filter(|v| v.ok()).count();
        let verified: u64 = finals.iter().map(|v| v.verified).sum();
        let sent: u64 = finals.iter().map(|v| v.sent).sum();
        let resets = finals.iter().filter(|v| v.state == "reset").count();
        let corrupt = finals.iter().filter(|v| v.state == "corrupt").count();
        let duplicates = self.counts.duplicates + corrupt as u64;
        let mut report = String::new();
        for (c, v) in self.conns.iter().zip(finals) {
            if v.ok() {
                continue;
            }
            let _ = write!(
                report,
                "{}: {} ({}), first seen by the client after step {}",
                c.name(),
                v.state,
                v.error,
                c.broken_after.unwrap_or(0)
            );
            match &c.last {
                Some(m) => {
                    let _ = writeln!(
                        report,
                        "; its last move: #{} from {}, fault {}, outcome {}",
                        m.number,
                        m.from.name(),
                        m.fault,
                        m.outcome
                    );
                }
                None => report.push_str("; it never moved\n"),
            }
        }
        for p in &self.problems {
            let _ = writeln!(report, "{p}");
        }
        let k = &self.counts;
        println!(
            "soak: seed {seed}, {n} connections, {:.0} s: moves attempted {} / committed {} / rolled back {} / unknown {} (resolved: {} moved, {} stayed); connections alive {alive}/{n}; bytes verified {verified} of {sent} sent, each way; RSTs seen by clients {resets}; duplicates {duplicates}; left behind: locks {} (and {} expiring by their lease), rules {}, policy rules {}, misplaced addresses {}; faults: agent kills {}, link cuts {}, loss periods {}, zero windows {}, half-closes {}, racing moves {}, sender kills {}",
            elapsed.as_secs_f64(),
            k.attempted,
            k.committed,
            k.rolled_back,
            k.unknown,
            k.unknown_moved,
            k.unknown_stayed,
            left.locks,
            left.expiring_locks,
            left.rules,
            left.policy_rules,
            left.misplaced_addresses,
            k.agent_kills,
            k.link_cuts,
            k.loss_periods,
            k.zero_windows,
            k.half_closes,
            k.races,
            k.sender_kills,
        );
        let clean = alive == n
            && duplicates == 0
            && self.problems.is_empty()
            && left.locks == 0
            && left.rules == 0
            && left.policy_rules == 0
            && left.misplaced_addresses == 0;
        if clean {
            0
        } else {
            eprint!("{report}");
            eprintln!("soak FAILED; replay the same schedule of faults with: {replay}");
            1
        }
    }
}

impl Mover {
    /// One handoff, with its fault beside it. Returns the outcome and the
    /// agent kills and link cuts it made.
    fn attempt(
        &self,
        from: Side,
        sock: TcpStream,
        state: &EchoState,
        fault: MoveFault,
        reached: Option<&std::path::Path>,
    ) -> (Attempt, u64, u64) {
        let to = from.other();
        let mut opts =
            MigrateOptions::new(SocketAddr::new(agent_ip(to), AGENT_PORT), self.auth.clone());
        opts.switch = Switch::MoveAddress;
        opts.timeout = STEP_TIMEOUT;
        opts.lease = LEASE;
        if let MoveFault::KillSender { after } = fault {
            return (self.killed_sender(from, sock, after), 0, 0);
        }
        let blob = state.encode();
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let injector = scope.spawn(|| self.inject(to, fault, reached, &done));
            let r = self.hosts[from.index()].within(|| Ok(hand_off(vec![(sock, blob)], &opts)));
            done.store(true, Ordering::SeqCst);
            let (kills, cuts) = injector.join().unwrap_or((0, 0));
            let attempt = match r {
                Ok(Ok(mut v)) => match v.pop() {
                    Some(h) => Attempt::Done(h),
                    None => Attempt::Failed("hand_off gave no outcome".into()),
                },
                Ok(Err(e)) => match e.conns.into_iter().next() {
                    Some((s, _)) => Attempt::Refused(s, e.error.to_string()),
                    None => Attempt::Failed(format!("refused, and no socket back: {}", e.error)),
                },
                Err(e) => Attempt::Failed(format!("{e:#}")),
            };
            (attempt, kills, cuts)
        })
    }

    /// A move made by a `tcpr migrate` process that is killed `after` it
    /// starts; the socket stays ours throughout (migrate takes a duplicate
    /// by pidfd), so whatever the kill left is resolved here.
    fn killed_sender(&self, from: Side, sock: TcpStream, after: Duration) -> Attempt {
        use std::os::fd::AsRawFd;
        let to = from.other();
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => return Attempt::Refused(sock, format!("cannot find tcpr itself: {e}")),
        };
        let spawned = self.hosts[from.index()]
            .cmd(&exe.to_string_lossy())
            .args(["migrate", "--to"])
            .arg(SocketAddr::new(agent_ip(to), AGENT_PORT).to_string())
            .arg("--psk-file")
            .arg(self.fault_dir.join("psk"))
            .args(["--pid", &std::process::id().to_string()])
            .args(["--fd", &sock.as_raw_fd().to_string()])
            .args(["--move-address", "--timeout"])
            .arg(STEP_TIMEOUT.as_secs_f64().to_string())
            .args(["--lease", &LEASE.as_secs().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match spawned {
            Ok(mut child) => {
                std::thread::sleep(after);
                // Child::kill sends SIGKILL.
                let _ = child.kill();
                let _ = child.wait();
                Attempt::SenderKilled(sock)
            }
            Err(e) => Attempt::Refused(sock, format!("cannot start tcpr migrate: {e}")),
        }
    }

    /// The fault of one move, at its moment.
    fn inject(
        &self,
        to: Side,
        fault: MoveFault,
        reached: Option<&std::path::Path>,
        done: &AtomicBool,
    ) -> (u64, u64) {
        match fault {
            MoveFault::None | MoveFault::KillSender { .. } => (0, 0),
            MoveFault::KillAtStep { .. } => {
                let Some(reached) = reached else {
                    return (0, 0);
                };
                while !reached.exists() && !done.load(Ordering::SeqCst) {
                    std::thread::sleep(FAULT_POINT_POLL);
                }
                let hit = reached.exists();
                // Killed there, or (not reached) disarmed.
                if let Err(e) = self.agents[to.index()].crash_and_restart() {
                    tracing::error!("restart the agent: {e:#}");
                }
                (u64::from(hit), 0)
            }
            MoveFault::KillAnytime { after } => {
                std::thread::sleep(after);
                if let Err(e) = self.agents[to.index()].crash_and_restart() {
                    tracing::error!("restart the agent: {e:#}");
                }
                (1, 0)
            }
            MoveFault::CutLink { after, mend_after } => {
                std::thread::sleep(after);
                let host = &self.hosts[to.index()];
                if let Err(e) = agents::cut_link(host, AGENT_PORT) {
                    tracing::error!("cut the link: {e:#}");
                    return (0, 0);
                }
                std::thread::sleep(mend_after);
                if let Err(e) = agents::mend_link(host) {
                    tracing::error!("mend the link: {e:#}");
                }
                (0, 1)
            }
        }
    }
}

/// A handoff's result, before it is taken in.
enum Attempt {
    Done(HandOff),
    /// Refused before anything changed; the socket is back, untouched.
    Refused(TcpStream, String),
    /// Something outside the handoff failed (entering the namespace).
    Failed(String),
    /// The sender process was killed; the socket is ours, in whatever
    /// state the kill left it.
    SenderKilled(TcpStream),
}

/// A resolution that failed: the connection counts as lost, with why.
fn unresolved(from: Side, e: &anyhow::Error) -> (Holder, Side, String) {
    let why = format!("could not be resolved: {e:#}");
    (Holder::Gone(why.clone()), from, why)
}

fn agent_ip(side: Side) -> IpAddr {
    match side {
        Side::A => IpAddr::V4(Ipv4Addr::new(10, 88, 0, 2)),
        Side::B => IpAddr::V4(Ipv4Addr::new(10, 88, 0, 3)),
    }
}
