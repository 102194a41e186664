//! `tcpr agent` and `tcpr migrate`.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tcpr_handoff::relay_worker::{RelayWorker, WorkerCommand};
use tcpr_handoff::stand_in::{self, StandIn, StandInConfig};
use tcpr_handoff::{AgentConfig, AgentServer, Auth, Delivery, MigrateOptions, Outgoing, Switch};

/// How the two ends authenticate: a pre-shared key or mutual TLS.
#[derive(Args, Debug)]
pub struct AuthArgs {
    /// A file holding a shared secret (at least 16 bytes).
    #[arg(long, conflicts_with_all = ["cert", "key", "ca"])]
    psk_file: Option<PathBuf>,
    /// Our certificate chain (PEM), for mutual TLS.
    #[arg(long, requires_all = ["key", "ca"])]
    cert: Option<PathBuf>,
    /// Our private key (PEM).
    #[arg(long, requires_all = ["cert", "ca"])]
    key: Option<PathBuf>,
    /// The CA that signs the other end's certificate (PEM).
    #[arg(long, requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
}

impl AuthArgs {
    fn auth(&self) -> Result<Auth> {
        Ok(match (&self.psk_file, &self.cert, &self.key, &self.ca) {
            (Some(p), ..) => Auth::psk_file(p)?,
            (None, Some(c), Some(k), Some(ca)) => Auth::cert_files(c, k, ca)?,
            _ => bail!(
                "authentication is required: --psk-file FILE, or --cert FILE --key FILE --ca FILE"
            ),
        })
    }
}

/// `tcpr agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Address to listen on for senders.
    #[arg(long)]
    pub(crate) listen: SocketAddr,
    /// Run this shell command line per delivered connection (fd 3,
    /// LISTEN_FDS=1; application blob on fd 4).
    #[arg(long, conflicts_with_all = ["unix", "forward"], required_unless_present_any = ["unix", "forward"])]
    exec: Option<String>,
    /// With --exec, also put the connection on stdin and stdout.
    #[arg(long, requires = "exec", conflicts_with = "unix")]
    inetd: bool,
    /// Pass connections to the application listening on this unix socket.
    #[arg(long, conflicts_with = "forward")]
    unix: Option<PathBuf>,
    /// Relay each connection (splice, zero copy) to this server, for
    /// servers that know nothing of tcpr.
    #[arg(long, value_name = "HOST:PORT", value_parser = resolve_server)]
    forward: Option<SocketAddr>,
    /// With --forward, first write a PROXY protocol header (v1 text or v2
    /// binary) with the client's address.
    #[arg(long, requires = "forward", value_name = "v1|v2")]
    proxy_protocol: Option<tcpr_host::proxy_header::ProxyVersion>,
    /// A virtual address this host serves by direct server return
    /// (repeatable, IPv4 or IPv6): put on the loopback with ARP for it
    /// suppressed while the agent runs; connections to it on any port
    /// may be restored here.
    #[arg(long, value_name = "ADDR")]
    vip: Vec<IpAddr>,
    #[command(flatten)]
    auth: AuthArgs,
    /// Local ADDR:PORT whose connections may be restored here (repeatable;
    /// `0.0.0.0:PORT` or `[::]:PORT` allows any address on that port). A
    /// sender moving its service address here (migrate --move-address) may
    /// only move an address an entry names exactly.
    #[arg(long, required_unless_present = "vip")]
    pub(crate) allow: Vec<SocketAddr>,
    /// Seconds to wait for each next message before COMMIT (0.001 to 3600);
    /// also the deadline of a sender's whole authentication handshake.
    #[arg(long, default_value_t = 2.0)]
    timeout: f64,
    /// Directory of the journal (a few lines per batch) from which an
    /// agent restarted after a crash tells senders what became of their
    /// connections.
    #[arg(long, default_value = "/var/lib/tcpr", conflicts_with = "no_journal")]
    journal: PathBuf,
    /// Keep no journal: after a restart, senders that were waiting for
    /// this agent report their connections unknown.
    #[arg(long)]
    no_journal: bool,
    /// Unauthenticated handshakes served at once (the oldest is dropped
    /// for a new one).
    #[arg(long, default_value_t = tcpr_handoff::agent::DEFAULT_MAX_HANDSHAKES)]
    max_handshakes: usize,
    /// Seconds a sender's channel may wait for its next batch once one has
    /// ended cleanly on it (senders keep channels between batches).
    #[arg(long, value_name = "SECS", default_value = "30",
          value_parser = crate::bounds::step_timeout)]
    idle_timeout: Duration,
    /// Channels allowed to wait between batches at once; past it, the one
    /// idle longest is closed. 0: every channel closes after its batch.
    #[arg(long, value_name = "N",
          default_value_t = tcpr_handoff::agent::DEFAULT_MAX_IDLE_CHANNELS)]
    max_idle_channels: usize,
    /// Once listening, run as this user, keeping only CAP_NET_ADMIN and
    /// CAP_NET_RAW (and CAP_NET_BIND_SERVICE for a privileged port). The
    /// journal directory must be writable by it.
    #[arg(long)]
    pub(crate) user: Option<String>,
    /// Seconds a stand-in answers senders' queries from the journal after
    /// the agent ends with batches perhaps in flight (SIGKILL, a crash,
    /// SIGINT, SIGTERM), so that a sender that lost the agent after COMMIT
    /// learns what became of its connections even if no one restarts the
    /// agent; it then lets the listening address go (at once when a new
    /// agent asks). Also how long the agent waits for its address when it starts
    /// and finds it in use. 0: no stand-in. Needs the journal.
    #[arg(long, value_name = "SECS", default_value = "10",
          value_parser = crate::bounds::step_timeout_or_zero)]
    stand_in: Duration,
}

/// `tcpr agent-stand-in` (hidden): the agent's stand-in
/// (`tcpr_handoff::stand_in`); the agent starts it with the listening
/// socket on standard input.
#[derive(Args, Debug)]
pub struct StandInArgs {
    #[command(flatten)]
    auth: AuthArgs,
    /// The agent's journal.
    #[arg(long)]
    journal: PathBuf,
    /// The bound on each sender's handshake and QUERY (seconds).
    #[arg(long, value_parser = crate::bounds::step_timeout)]
    timeout: Duration,
    /// How long it answers once the agent died (seconds).
    #[arg(long, value_parser = crate::bounds::step_timeout)]
    period: Duration,
    /// Run as this user (the agent's `--user`), keeping CAP_NET_ADMIN (to
    /// give back an address a dead agent took for a batch it never
    /// resumed).
    #[arg(long)]
    user: Option<String>,
    /// The agent's pid: it stands in only once no process of that pid is
    /// its parent (the agent may be gone before it even starts).
    #[arg(long)]
    agent_pid: u32,
}

/// `tcpr migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The agent.
    #[arg(long)]
    to: SocketAddr,
    #[command(flatten)]
    auth: AuthArgs,
    /// Move the TCP connections of this process.
    #[arg(long, conflicts_with = "local", required_unless_present = "local")]
    pub(crate) pid: Option<i32>,
    /// Only these fds of the process (repeatable); all of them by default.
    #[arg(long, requires = "pid")]
    fd: Vec<i32>,
    /// Move every connection whose local address is ADDR:PORT.
    #[arg(long)]
    local: Option<SocketAddr>,
    /// Move the service address too: removed here, added at the agent's
    /// host and announced, as part of the commit (host evacuation).
    #[arg(long, conflicts_with = "switch_cmd")]
    pub(crate) move_address: bool,
    /// Shell command that steers the flows to the agent's host, run before
    /// COMMIT (with --unswitch-cmd to undo it on roll back).
    #[arg(long, requires = "unswitch_cmd")]
    switch_cmd: Option<String>,
    /// Shell command that undoes --switch-cmd.
    #[arg(long, requires = "switch_cmd")]
    unswitch_cmd: Option<String>,
    /// Seconds to wait for the agent at each step (0.001 to 3600).
    #[arg(long, default_value_t = 2.0)]
    timeout: f64,
    /// Seconds the source lock lasts when the outcome is unknown (1 to 86400).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=crate::bounds::MAX_LEASE_SECS))]
    lease: u64,
}

fn secs(s: f64, what: &str) -> Result<Duration> {
    crate::bounds::step_timeout(&s.to_string()).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

pub fn agent(a: AgentArgs) -> Result<i32> {
    let delivery = match (&a.exec, &a.unix) {
        (Some(cmd), _) => Delivery::Exec {
            command: cmd.clone(),
            inetd: a.inetd,
        },
        (None, Some(p)) => Delivery::Unix(p.clone()),
        (None, None) => match a.forward {
            Some(server) => Delivery::Forward {
                server,
                proxy: a.proxy_protocol,
                worker: relay_worker_command().map(|c| Arc::new(RelayWorker::new(c))),
            },
            None => {
                bail!("say where connections go: --exec CMD, --unix PATH or --forward HOST:PORT")
            }
        },
    };
    if a.max_handshakes == 0 {
        bail!("--max-handshakes must be at least 1");
    }
    // Connections to a VIP, on any port (port 0 in the allowlist).
    let mut allow = a.allow.clone();
    allow.extend(a.vip.iter().map(|&ip| SocketAddr::new(ip, 0)));
    let delivery_for_start = delivery.clone();
    let mut cfg = AgentConfig::new(a.auth.auth()?, allow, delivery);
    cfg.timeout = secs(a.timeout, "--timeout")?;
    cfg.journal = (!a.no_journal).then(|| a.journal.clone());
    cfg.max_handshakes = a.max_handshakes;
    cfg.idle_timeout = a.idle_timeout;
    cfg.max_idle_channels = a.max_idle_channels;
    cfg.bind_wait = a.stand_in;
    let server = AgentServer::bind(a.listen, cfg)?;
    // Started before privileges are dropped, so that it reads the same key
    // files; it drops them itself, to the same user.
    let stand_in = if a.no_journal || a.stand_in.is_zero() {
        None
    } else {
        // Without it the agent works as before: a sender that loses it
        // after COMMIT waits for a restart.
        start_stand_in(&a, server.listener())
            .map_err(|e| tracing::warn!("no stand-in: {e:#}"))
            .ok()
    };
    // A return from this function (an error at start, the end of `run`)
    // is a clean end: the stand-in leaves. A signal (SIGINT, SIGTERM: its
    // handler exits with batches perhaps in flight), a kill or a crash
    // leave it standing in.
    let _clean_end = CleanEnd(stand_in);
    let vips = serve_vips(&a.vip)?;
    if let Some(user) = &a.user {
        crate::privs::become_user(user, &crate::privs::agent_keeps(a.listen, &a.allow))?;
        if !a.no_journal {
            crate::privs::check_writable(&a.journal, user)?;
        }
    }
    undo_vips_on_signal(&vips)?;
    // Started once privileges are dropped: it keeps none.
    if let Delivery::Forward {
        worker: Some(worker),
        ..
    } = &delivery_for_start
    {
        worker.start();
    }
    println!("tcpr agent listening on {}", server.local_addr()?);
    std::io::Write::flush(&mut std::io::stdout())?;
    let stopped = server.run().context("the agent stopped");
    drop(vips);
    stopped?;
    Ok(0)
}

/// Holds the stand-in, and says goodbye to it when dropped.
struct CleanEnd(Option<StandIn>);

impl Drop for CleanEnd {
    fn drop(&mut self) {
        // A panic is no clean end: batches may be in flight.
        if std::thread::panicking() {
            return;
        }
        if let Some(s) = &self.0 {
            s.goodbye();
        }
    }
}

/// Starts the agent's stand-in (this binary's hidden `agent-stand-in`)
/// with a copy of `listener`.
fn start_stand_in(a: &AgentArgs, listener: &std::net::TcpListener) -> Result<StandIn> {
    let program = std::env::current_exe().context("the stand-in: this program's path")?;
    let path = |p: &PathBuf| -> Result<String> {
        std::path::absolute(p)?
            .to_str()
            .map(str::to_string)
            .context("a path that is not UTF-8")
    };
    let mut args = vec!["agent-stand-in".to_string()];
    match (&a.auth.psk_file, &a.auth.cert, &a.auth.key, &a.auth.ca) {
        (Some(p), ..) => args.extend(["--psk-file".into(), path(p)?]),
        (None, Some(c), Some(k), Some(ca)) => args.extend([
            "--cert".into(),
            path(c)?,
            "--key".into(),
            path(k)?,
            "--ca".into(),
            path(ca)?,
        ]),
        _ => bail!("the stand-in needs the agent's authentication"),
    }
    args.extend(["--journal".into(), path(&a.journal)?]);
    args.extend(["--timeout".into(), a.timeout.to_string()]);
    args.extend(["--period".into(), a.stand_in.as_secs_f64().to_string()]);
    args.extend(["--agent-pid".into(), std::process::id().to_string()]);
    if let Some(user) = &a.user {
        args.extend(["--user".into(), user.clone()]);
    }
    StandIn::spawn(&program, &args, listener).context("cannot start the agent's stand-in")
}

/// `tcpr agent-stand-in`: waits for the agent (on standard input) to end;
/// if it died, answers queries from its journal for the period.
pub fn stand_in(a: StandInArgs) -> Result<i32> {
    use std::os::fd::AsFd;
    let agent = std::os::unix::net::UnixStream::from(
        std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .context("agent-stand-in: standard input")?,
    );
    let listener = stand_in::receive_listener(&agent).context("agent-stand-in")?;
    let cfg = StandInConfig {
        auth: a.auth.auth()?,
        journal: a.journal.clone(),
        timeout: a.timeout,
        period: a.period,
    };
    if let Some(user) = &a.user {
        let keep = [caps::Capability::CAP_NET_ADMIN].into_iter().collect();
        crate::privs::become_user(user, &keep)?;
    }
    stand_in::ready(&agent).context("agent-stand-in")?;
    match stand_in::serve(agent, a.agent_pid, listener, &cfg).context("agent-stand-in")? {
        stand_in::Ended::Goodbye => {}
        stand_in::Ended::StoodIn(n) => {
            tracing::info!("stood in for the agent: answered {n} queries");
        }
    }
    Ok(0)
}

/// `--forward`'s relay worker: this binary's hidden `relay-worker`.
fn relay_worker_command() -> Option<WorkerCommand> {
    match std::env::current_exe() {
        Ok(program) => Some(WorkerCommand {
            program,
            args: vec!["relay-worker".into()],
        }),
        Err(e) => {
            tracing::warn!("no relay worker (this program's path: {e}): relays end with the agent");
            None
        }
    }
}

/// `tcpr relay-worker`: relays the pairs the agent passes on standard
/// input (a unix socket) until it closes, then until the relays end.
pub fn relay_worker() -> Result<i32> {
    use std::os::fd::AsFd;
    let from = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("relay-worker: standard input")?;
    // Four fds a relay (two sockets, two pipes) and up to 128 spare
    // pipes: the default soft limit (1024) would hold ~200 relays, and a
    // pair that arrives beyond it loses its descriptors in transit.
    if let Err(e) = tcpr_host::raise_fd_limit(1 << 20) {
        tracing::warn!("relay-worker: cannot raise its open-file limit: {e}");
    }
    tcpr_handoff::relay_worker::serve(std::os::unix::net::UnixStream::from(from))
        .context("relay-worker")?;
    Ok(0)
}

/// `--forward HOST:PORT`: the first address the name resolves to.
fn resolve_server(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{s}: {e} (HOST:PORT, such as 127.0.0.1:8080)"))?
        .next()
        .ok_or_else(|| format!("{s} resolves to no address"))
}

/// `--vip`: the VIPs on the loopback, ARP suppressed, until the agent
/// ends: normally, or by SIGINT / SIGTERM, whose handler
/// ([`undo_vips_on_signal`]) undoes them and exits (the stand-in, if any,
/// then stands in: batches may be in flight).
fn serve_vips(vips: &[IpAddr]) -> Result<VipsHeld> {
    let held = VipsHeld(std::sync::Arc::new(std::sync::Mutex::new(None)));
    if vips.is_empty() {
        return Ok(held);
    }
    if let Some(bad) = vips
        .iter()
        .find(|ip| ip.is_unspecified() || ip.is_loopback() || ip.is_multicast())
    {
        bail!("--vip {bad}: a VIP is a unicast address clients connect to");
    }
    let prepared = tcpr_host::vip::prepare(vips)?;
    eprintln!(
        "tcpr agent: serving {} on lo (ARP suppressed)",
        vips.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    *held.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(prepared);
    Ok(held)
}

/// Installs the SIGINT / SIGTERM handler that undoes the VIPs (if any)
/// and exits. Called once privileges are dropped: the handler runs on a
/// thread of its own, and privileges are dropped from a single thread
/// (before, `--vip` with `--user` could not start).
fn undo_vips_on_signal(held: &VipsHeld) -> Result<()> {
    if held.0.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
        return Ok(());
    }
    let on_signal = held.0.clone();
    ctrlc::set_handler(move || {
        // Dropping the guard removes the VIPs and restores the sysctls.
        drop(on_signal.lock().unwrap_or_else(|e| e.into_inner()).take());
        std::process::exit(0);
    })
    .context("cannot handle SIGINT/SIGTERM (the VIPs would stay)")
}

/// The VIPs, shared with the signal handler; undone when dropped (the
/// agent's normal end, an error, a panic) or by the handler, whichever
/// comes first.
struct VipsHeld(std::sync::Arc<std::sync::Mutex<Option<tcpr_host::vip::Vips>>>);

impl Drop for VipsHeld {
    fn drop(&mut self) {
        drop(self.0.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// The fds to move: (pid, fd) pairs. Frozen sockets (an earlier dump or
/// move froze them; they may live on elsewhere) are refused when named with
/// --fd and left out, with a note, when listed.
fn select(m: &MigrateArgs) -> Result<Vec<(i32, i32)>> {
    if m.local.is_some() && !m.fd.is_empty() {
        bail!("--fd selects fds of --pid; --local moves every connection with that local address: give one or the other");
    }
    let frozen_note = |frozen: &[String]| {
        if !frozen.is_empty() {
            eprintln!(
                "left out {} frozen connection(s) (an earlier dump or move froze them; `tcpr ls` shows them): {}",
                frozen.len(),
                frozen.join(", ")
            );
        }
    };
    if let Some(pid) = m.pid {
        if !m.fd.is_empty() {
            for &fd in &m.fd {
                let sock = tcpr_engine::take_fd(pid, fd)?;
                let sock = std::os::fd::AsFd::as_fd(&sock);
                tcpr_engine::inspect_socket(sock)?;
                if tcpr_engine::is_frozen(sock)? {
                    bail!("fd {fd} of process {pid} is frozen already (an earlier dump or move froze it, and it may live on elsewhere): moving it could make one connection two; `tcpr thaw --pid {pid} --fd {fd}` first if it was not restored elsewhere");
                }
            }
            return Ok(m.fd.iter().map(|&fd| (pid, fd)).collect());
        }
        let socks = tcpr_engine::diag::list(Some(pid))?;
        let frozen: Vec<String> = socks
            .iter()
            .filter(|e| e.frozen == tcpr_engine::diag::Fact::Yes)
            .map(|e| e.flow().to_string())
            .collect();
        frozen_note(&frozen);
        let picked: Vec<(i32, i32)> = socks
            .iter()
            .filter(|e| e.dumpable().is_ok())
            .filter_map(|e| e.owners.first().map(|o| (o.pid, o.fd)))
            .collect();
        if picked.is_empty() {
            bail!("process {pid} holds no TCP connection that can be moved");
        }
        return Ok(picked);
    }
    let local = m.local.context("--pid or --local is required")?;
    // A dual-stack socket reads its IPv4 address as ::ffff:a.b.c.d: compare
    // addresses as they are on the wire.
    let wire = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let socks = tcpr_engine::diag::list(None)?;
    let frozen: Vec<String> = socks
        .iter()
        .filter(|e| wire(e.local) == wire(local) && e.frozen == tcpr_engine::diag::Fact::Yes)
        .map(|e| e.flow().to_string())
        .collect();
    frozen_note(&frozen);
    let picked: Vec<(i32, i32)> = socks
        .iter()
        .filter(|e| wire(e.local) == wire(local) && e.dumpable().is_ok())
        .filter_map(|e| e.owners.first().map(|o| (o.pid, o.fd)))
        .collect();
    if picked.is_empty() {
        bail!("no movable TCP connection has the local address {local}");
    }
    Ok(picked)
}

/// Batches of at least this many connections get a progress bar.
const PROGRESS_BAR_FROM: u64 = 16;

pub fn migrate(m: MigrateArgs) -> Result<i32> {
    let auth = m.auth.auth()?;
    let mut opts = MigrateOptions::new(m.to, auth);
    opts.timeout = secs(m.timeout, "--timeout")?;
    opts.lease = Duration::from_secs(m.lease);
    opts.switch = match (&m.switch_cmd, &m.unswitch_cmd, m.move_address) {
        (_, _, true) => Switch::MoveAddress,
        (Some(s), Some(u), false) => Switch::Commands {
            switch: s.clone(),
            unswitch: u.clone(),
        },
        _ => Switch::Nothing,
    };
    let picked = select(&m)?;
    let mut conns = Vec::with_capacity(picked.len());
    for (pid, fd) in picked {
        conns.push(Outgoing::new(tcpr_engine::take_fd(pid, fd)?, vec![]));
    }
    let total = conns.len() as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} prepared ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("moving to {}", m.to));
    // A bar for batches that take a while; indicatif draws nothing when
    // stderr is not a terminal.
    if total < PROGRESS_BAR_FROM {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let report = tcpr_handoff::migrate(conns, &opts, &|p| {
        bar.set_position(p.prepared as u64);
        bar.set_message(format!(
            "moving to {}: {} of images",
            m.to,
            indicatif::HumanBytes(p.dumped_bytes)
        ));
    })
    .map_err(|refused| refused.error)?;
    bar.finish_and_clear();
    for r in &report.rolled_back {
        eprintln!("rolled back {} -> {}: {}", r.flow.local, r.flow.peer, r.why);
    }
    for u in &report.unknown {
        eprintln!(
            "unknown {} -> {}: {} (left frozen and locked for {} s)",
            u.flow.local, u.flow.peer, u.why, m.lease
        );
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "moved {}, rolled back {}, unknown {} in {:.1} ms",
        report.moved.len(),
        report.rolled_back.len(),
        report.unknown.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(if report.all_moved() { 0 } else { 2 })
}
