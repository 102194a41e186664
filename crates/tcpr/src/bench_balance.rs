//! `tcpr bench-balance`: HAProxy (the Debian package) against `tcpr
//! balance`, same run, same topology (client, front, two backends in
//! namespaces), same backends, same load generator (wrk). Small responses
//! over new connections and keep-alive (requests/s, p99), and 1 MiB and
//! 100 MiB responses (throughput, the front process's CPU seconds per GiB
//! from /proc/PID/stat utime+stime; softirq work the kernel does for the
//! front's interface is not attributed to a process and is not counted).
//! For tcpr it also prints, per load, the balancer's own counters
//! (connections handed off, fallen back to the proxy, proxied, and the
//! mean handoff time), so a reader sees each new connection really was
//! handed off. tcpr runs in two configurations: its backends' agents
//! relay each connection to an unmodified HTTP server (`--forward`), or
//! pass it over a unix socket (`--unix`) to a server that takes passed
//! fds (the same responses, served by the same code, an event loop thread
//! per server that also receives the passed connections:
//! [`crate::demo_balance::server`]; the deployment where no relay runs on
//! the backend). All
//! three fronts run at once on the front host (HAProxy on the VIP's next
//! port, one `tcpr balance` with a listener per configuration), so each
//! load is measured on each back to back and the ratios are taken within
//! a run; [`measure`] returns the runs as data
//! for the report (`tcpr bench --report`), [`run`] prints one run.

use crate::demo_balance::{
    block, server, start, start_backends, start_balancer, Running, AGENT_PORT, METRICS_LISTEN,
    PSK_FILE, SERVER_PORT, VIP_PORT,
};
use crate::report::Samples;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tcpr_balance::metrics::names;
use tcpr_netlab::balance::{BalanceLab, Family};

mod cpu_cap;
use cpu_cap::CpuCap;

/// The bench's network number.
const NET: u8 = 79;
/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;
/// Bytes in a MiB.
const MIB: f64 = (1u64 << 20) as f64;
/// Fields of /proc/PID/stat (1-based) holding utime and stime, in ticks.
const STAT_UTIME_FIELD: usize = 14;
const STAT_STIME_FIELD: usize = 15;

/// The port HAProxy listens on, on the VIP beside `tcpr balance` (on
/// [`VIP_PORT`]): both fronts run at once, so each load is measured on
/// both back to back.
const HAPROXY_PORT: u16 = VIP_PORT + 1;
/// The port of the balancer's listener whose pools are the fd-taking
/// backends (their agents deliver over unix sockets).
const FD_PORT: u16 = VIP_PORT + 2;
/// The port of each backend's `tcpr agent --unix`, beside its `--forward`
/// agent on [`AGENT_PORT`].
const FD_AGENT_PORT: u16 = AGENT_PORT + 1;
/// The client's and the front's ephemeral ports: a wider range than the
/// default, so tens of thousands of new connections a run do not run out
/// (per namespace; the bench's own namespaces only).
const EPHEMERAL_PORTS: &str = "1024 65000";
/// The share of one core a capped front gets: on the bench's 2-core
/// machine, at a quarter of a core both HAProxy and tcpr serve fewer
/// requests than the rest of the machine could (clients, servers, agents:
/// 0.06-0.12 ms of CPU per request beside the front's 0.03-0.05), so the
/// front is what limits the rate. Each run prints how much of its cap the
/// front used, so a reader sees it was the limit.
const FRONT_SHARE: f64 = 0.25;
/// After each wrk run: the closing connections of one run are not the
/// next one's work.
const SETTLE: Duration = Duration::from_millis(200);

/// One wrk run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    requests: f64,
    requests_per_sec: f64,
    p99_ms: f64,
    /// Bytes wrk read (responses, headers included, and the part of the
    /// responses still in flight when it stopped), per second.
    bytes_per_sec: f64,
    /// The front's CPU seconds per GiB wrk read; NaN for small responses.
    front_cpu_per_gib: f64,
    /// The front's CPU milliseconds per request wrk completed.
    front_cpu_ms_per_request: f64,
    /// Socket errors and non-2xx/3xx responses wrk counted.
    errors: f64,
    /// A capped front's CPU over its cap (1: the cap was the limit); NaN
    /// for an uncapped one.
    cap_use: f64,
    /// The run's length as wrk measured it.
    seconds: f64,
}

/// The balancer's counters (summed over pools, members, listeners).
#[derive(Debug, Clone, Copy, Default)]
pub struct Served {
    /// Connections handed off to an agent.
    pub handoffs: f64,
    /// Handoffs that failed and were proxied instead.
    pub fallbacks: f64,
    /// Connections proxied (fallbacks and members without an agent).
    pub proxied: f64,
    /// Sum of the handoff times, seconds.
    pub handoff_seconds_sum: f64,
    /// Handoffs timed.
    pub handoff_seconds_count: f64,
}

impl Served {
    /// What happened between `before` and `self`.
    fn since(self, before: Served) -> Served {
        Served {
            handoffs: self.handoffs - before.handoffs,
            fallbacks: self.fallbacks - before.fallbacks,
            proxied: self.proxied - before.proxied,
            handoff_seconds_sum: self.handoff_seconds_sum - before.handoff_seconds_sum,
            handoff_seconds_count: self.handoff_seconds_count - before.handoff_seconds_count,
        }
    }

    /// The counts of two stretches together.
    fn plus(self, more: Served) -> Served {
        Served {
            handoffs: self.handoffs + more.handoffs,
            fallbacks: self.fallbacks + more.fallbacks,
            proxied: self.proxied + more.proxied,
            handoff_seconds_sum: self.handoff_seconds_sum + more.handoff_seconds_sum,
            handoff_seconds_count: self.handoff_seconds_count + more.handoff_seconds_count,
        }
    }

    /// The mean handoff time in ms; NaN when none was timed.
    pub fn mean_handoff_ms(&self) -> f64 {
        if self.handoff_seconds_count > 0.0 {
            1000.0 * self.handoff_seconds_sum / self.handoff_seconds_count
        } else {
            f64::NAN
        }
    }
}

/// The running balancer's counters, from its metrics endpoint.
fn served(lab: &BalanceLab) -> Result<Served> {
    let addr = METRICS_LISTEN.parse().context("metrics address")?;
    let text = lab
        .front
        .within(|| Ok(tcpr_balance::serve_metrics::fetch(addr)?))
        .context("read the balancer's metrics")?;
    let samples = tcpr_balance::parse_metrics(&text);
    let total = |name: &str| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    };
    Ok(Served {
        handoffs: total(names::HANDOFFS),
        fallbacks: total(names::FALLBACKS),
        proxied: total(names::PROXIED),
        handoff_seconds_sum: total(&format!("{}_sum", names::HANDOFF_SECONDS)),
        handoff_seconds_count: total(&format!("{}_count", names::HANDOFF_SECONDS)),
    })
}

/// One tcpr configuration's figures at one load.
#[derive(Debug, Clone, Default)]
pub struct TcprFigures {
    /// Its front's figures.
    pub front: FrontFigures,
    /// Its requests per second over HAProxy's, per run (higher is
    /// better).
    pub rps_ratio: Samples,
    /// Its front CPU per GiB over HAProxy's, per run (lower is better);
    /// empty for small responses.
    pub cpu_ratio: Samples,
    /// Requests wrk completed through it, all runs.
    pub requests: f64,
    /// The balancer's counters over the same runs.
    pub served: Served,
}

impl TcprFigures {
    /// From its runs, HAProxy's runs at the same load, and its counters.
    fn of(runs: &[Run], haproxy: &[Run], served: Served) -> TcprFigures {
        let ratio = |f: fn(&Run) -> f64| {
            Samples::new(haproxy.iter().zip(runs).map(|(h, t)| f(t) / f(h)).collect())
        };
        TcprFigures {
            front: FrontFigures::of(runs),
            rps_ratio: ratio(|r| r.requests_per_sec),
            cpu_ratio: ratio(|r| r.front_cpu_per_gib),
            requests: runs.iter().map(|r| r.requests).sum(),
            served,
        }
    }
}

/// One load: what wrk fetches and how.
#[derive(Debug, Clone)]
pub struct Load {
    /// What the load is, for tables.
    pub name: &'static str,
    /// A few characters of it, for a plot's axis.
    pub short: &'static str,
    path: String,
    /// Every request on a new connection (`Connection: close`).
    pub close: bool,
    /// wrk's connections.
    pub connections: u32,
    /// The response body's size; 0 for a small response.
    pub bytes: u64,
    /// The share of one core each front is capped at for this load
    /// ([`cpu_cap`]), or `None`: uncapped.
    pub front_share: Option<f64>,
}

impl Load {
    /// Small responses: the request rate is the figure.
    pub fn is_small(&self) -> bool {
        self.bytes == 0
    }
}

/// The loads, in the order they run and print.
pub fn loads() -> Vec<Load> {
    let small = |name, short, close| Load {
        name,
        short,
        path: "/name".into(),
        close,
        connections: SMALL_CLIENTS,
        bytes: 0,
        front_share: None,
    };
    let big = |name, short, bytes: u64| Load {
        name,
        short,
        path: format!("/bytes/{bytes}"),
        close: true,
        connections: 4,
        bytes,
        front_share: None,
    };
    vec![
        small("small, new connections", "new", true),
        // The same load with 4x the clients: how the rate grows with
        // concurrency, where a handoff's latency (two round trips to the
        // agent, and the server's acknowledgement of the passed fds)
        // limits it less.
        Load {
            connections: SMALL_CLIENTS * MORE_CLIENTS,
            ..small("small, new, 4x the connections", "new-4x", true)
        },
        // The same load with each front held to a quarter of a core, which
        // is below what either front needs for the rate the rest of the
        // machine (clients, backends) can serve: the front is the
        // bottleneck, as a front with machines of its own is (`cpu_cap`).
        Load {
            front_share: Some(FRONT_SHARE),
            ..small("small, new, front capped", "new-cap", true)
        },
        small("small, keep-alive", "k-a", false),
        big("1 MiB responses", "1 MiB", 1 << 20),
        big("100 MiB responses", "100 MiB", 100 << 20),
    ]
}

/// One front's figures at one load, one sample per run.
#[derive(Debug, Clone, Default)]
pub struct FrontFigures {
    /// Requests per second (wrk).
    pub requests_per_sec: Samples,
    /// wrk's 99th percentile latency, ms.
    pub p99_ms: Samples,
    /// MiB per second wrk read.
    pub mib_per_sec: Samples,
    /// The front process's CPU seconds (user + system) per GiB wrk read;
    /// empty for small responses.
    pub cpu_per_gib: Samples,
    /// The front process's CPU milliseconds per request.
    pub cpu_ms_per_request: Samples,
    /// Socket errors and non-2xx/3xx responses over all runs.
    pub errors: f64,
    /// A capped front's CPU over its cap, per run (about 1: the cap was
    /// the limit); empty for an uncapped load.
    pub cap_use: Samples,
}

impl FrontFigures {
    fn of(runs: &[Run]) -> FrontFigures {
        let col = |f: fn(&Run) -> f64| Samples::new(runs.iter().map(f).collect());
        FrontFigures {
            requests_per_sec: col(|r| r.requests_per_sec),
            p99_ms: col(|r| r.p99_ms),
            mib_per_sec: col(|r| r.bytes_per_sec / MIB),
            cpu_per_gib: col(|r| r.front_cpu_per_gib),
            cpu_ms_per_request: col(|r| r.front_cpu_ms_per_request),
            errors: runs.iter().map(|r| r.errors).sum(),
            cap_use: Samples::new(
                runs.iter()
                    .map(|r| r.cap_use)
                    .filter(|u| !u.is_nan())
                    .collect(),
            ),
        }
    }
}

/// The fronts at one load.
#[derive(Debug, Clone)]
pub struct LoadRow {
    /// The load.
    pub load: Load,
    /// HAProxy.
    pub haproxy: FrontFigures,
    /// `tcpr balance`, its backends' agents relaying to unmodified
    /// servers (`--forward`).
    pub tcpr: TcprFigures,
    /// `tcpr balance`, its backends' agents passing the connections to
    /// servers that take fds (`--unix`).
    pub fd: TcprFigures,
}

/// Everything `tcpr bench-balance` measures.
#[derive(Debug, Clone)]
pub struct BalanceFigures {
    /// Seconds per wrk run.
    pub seconds: u32,
    /// Runs per load and front.
    pub runs: usize,
    /// HAProxy's version line.
    pub haproxy_version: String,
    /// One row per load.
    pub rows: Vec<LoadRow>,
}

/// How many runs, and how long.
#[derive(Debug, Clone)]
pub struct BalancePlan {
    /// Seconds per wrk run.
    pub seconds: u32,
    /// Runs per load and front: each run measures both fronts back to back.
    pub runs: usize,
    /// wrk's connections for the small loads ([`SMALL_CLIENTS`] in the
    /// report).
    pub clients: u32,
}

/// wrk's connections for the small loads, unless told otherwise.
pub const SMALL_CLIENTS: u32 = 32;

/// The most connections wrk opens at once: HAProxy's `maxconn` here.
pub const MAX_CLIENTS: u32 = 4000;

/// How many times [`SMALL_CLIENTS`] the "4x the connections" load has.
const MORE_CLIENTS: u32 = 4;

impl BalancePlan {
    /// Steps [`measure`] reports through its `tick`.
    pub fn steps(&self) -> usize {
        self.runs * loads().len()
    }
}

/// The tools the bench runs, checked before anything starts.
pub fn check_tools() -> Result<()> {
    for tool in ["wrk", "haproxy"] {
        if Command::new("which").arg(tool).output()?.stdout.is_empty() {
            bail!("{tool} is not installed (scripts/setup.sh installs it)");
        }
    }
    Ok(())
}

/// The environment variable that narrows [`run`] to some loads and
/// fronts, for profiling one of them: a comma-separated list of load
/// shorts ("new", "new-4x", "new-cap", "k-a", "1 MiB", "100 MiB") and fronts ("haproxy",
/// "fwd", "fd"); a kind not named runs whole. Not a user's option.
const ONLY_VAR: &str = "TCPR_BENCH_BALANCE_ONLY";

/// What [`compare`] runs.
#[derive(Debug, Clone, Default)]
struct Only(Vec<String>);

impl Only {
    fn from_env() -> Only {
        let text = std::env::var(ONLY_VAR).unwrap_or_default();
        Only(
            text.split(',')
                .map(|w| w.trim().to_string())
                .filter(|w| !w.is_empty())
                .collect(),
        )
    }

    /// Whether `name` runs, among `all` of its kind.
    fn runs(&self, name: &str, all: &[&str]) -> bool {
        !self.0.iter().any(|w| all.contains(&w.as_str())) || self.0.iter().any(|w| w == name)
    }

    fn load(&self, load: &Load) -> bool {
        let all: Vec<&str> = loads().iter().map(|l| l.short).collect();
        self.runs(load.short, &all)
    }

    fn front(&self, front: Front) -> bool {
        let name = match front {
            Front::Haproxy => "haproxy",
            Front::Tcpr => "fwd",
            Front::TcprFd => "fd",
        };
        self.runs(name, &["haproxy", "fwd", "fd"])
    }
}

/// Runs the comparison for `seconds` per load, the small loads with
/// `clients` connections, and prints it.
pub fn run(seconds: u32, clients: u32) -> Result<()> {
    let plan = BalancePlan {
        seconds,
        runs: 1,
        clients,
    };
    let figures = measure_only(&plan, &Only::from_env(), &|_| {})?;
    print(&figures);
    Ok(())
}

/// Runs the comparison in namespaces of its own; `tick` is called once
/// per step (see [`BalancePlan::steps`]).
pub fn measure(plan: &BalancePlan, tick: &dyn Fn(&str)) -> Result<BalanceFigures> {
    measure_only(plan, &Only::default(), tick)
}

fn measure_only(plan: &BalancePlan, only: &Only, tick: &dyn Fn(&str)) -> Result<BalanceFigures> {
    check_tools()?;
    let lab = BalanceLab::new("benchb", NET, 2)?;
    let dir = std::env::temp_dir().join(format!("tcpr-bench-balance-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = compare(&lab, &dir, plan, only, tick);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The fronts: HAProxy, and tcpr's two listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Front {
    Haproxy,
    Tcpr,
    TcprFd,
}

/// The fronts in the order they run in run `run`: each goes first in
/// turn, so none always meets a machine another has just warmed or left
/// busy.
fn order(run: usize) -> [Front; 3] {
    let mut fronts = [Front::Haproxy, Front::Tcpr, Front::TcprFd];
    let n = fronts.len();
    fronts.rotate_left(run % n);
    fronts
}

/// A server that takes passed connections: `path`, a unix socket a `tcpr
/// agent --unix` delivers to (batches asked for), served as `name` with
/// the responses of the forward backends' servers, by the same code
/// ([`server`]: one event loop thread, which takes the delivered
/// connections itself). Runs until the process ends.
fn serve_fds(path: &Path, name: String) -> Result<()> {
    let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    let site = server::Site::new(&name, block());
    std::thread::Builder::new()
        .name("server".into())
        .spawn(move || {
            if let Err(e) = server::run(server::serve_fds(listener, site)) {
                eprintln!("server {name}: {e}");
            }
        })
        .context("start the server's thread")?;
    Ok(())
}

/// The fd-taking backends: per backend a [`serve_fds`] server and a `tcpr
/// agent --unix` delivering to it (the VIP is already on the backend's
/// loopback, put there by its `--forward` agent's `--vip`); returns the
/// agents and the balancer config's lines for a listener on [`FD_PORT`]
/// routing as the forward one does, to pools of these agents (each
/// member's server, for a fallback, the forward backends' server).
fn start_fd_backends(lab: &BalanceLab, dir: &Path) -> Result<(Vec<Running>, String)> {
    let exe = std::env::current_exe()?;
    let v4 = Family::V4;
    let vip = lab.vip(v4);
    let psk = dir.join(PSK_FILE);
    let mut keep = vec![];
    let mut config = format!(
        "[[listener]]\nname = \"web-fd\"\nbind = [\"{vip}:{FD_PORT}\"]\nprotocol = \"http\"\n\n"
    );
    for (i, host) in ["a.example", "b.example"].iter().enumerate() {
        config += &format!("[[listener.route]]\nhost = {host:?}\npool = \"fd{i}\"\n\n");
    }
    for (i, h) in lab.backends.iter().enumerate() {
        let sock = dir.join(format!("app-{i}.sock"));
        serve_fds(&sock, format!("backend-{i}"))?;
        let agent_addr = lab.backend_sock(v4, i, FD_AGENT_PORT);
        let mut agent = h.cmd(exe.to_str().context("exe path")?);
        agent
            .args(["agent", "--listen", &agent_addr.to_string()])
            .args(["--psk-file", psk.to_str().context("path")?, "--no-journal"])
            .args(["--unix", sock.to_str().context("path")?])
            .args(["--allow", &SocketAddr::new(vip, FD_PORT).to_string()]);
        keep.push(start(agent, "tcpr agent listening")?);
        config += &format!(
            "[[pool]]\nname = \"fd{i}\"\nmembers = [ {{ agent = \"{agent_addr}\", server = \"{}\" }} ]\n\n",
            lab.backend_sock(v4, i, SERVER_PORT)
        );
    }
    Ok((keep, config))
}

fn compare(
    lab: &BalanceLab,
    dir: &std::path::Path,
    plan: &BalancePlan,
    only: &Only,
    tick: &dyn Fn(&str),
) -> Result<BalanceFigures> {
    for host in [&lab.client, &lab.front] {
        tcpr_netlab::run(host.cmd("sysctl").args([
            "-qw",
            &format!("net.ipv4.ip_local_port_range={EPHEMERAL_PORTS}"),
            // wrk (and HAProxy towards its servers) closes first, so each
            // request leaves a TIME_WAIT for 60 s; without reuse, runs of
            // more than ~60,000 connections to one address (three 3 s runs
            // do it) made connect() search the port range linearly: wrk
            // spent 92% of its CPU in __inet_check_established and the
            // front's rate measured the client's port search.
            "net.ipv4.tcp_tw_reuse=1",
        ]))?;
    }
    let (_backends, config) = start_backends(lab, dir)?;
    let (_fd_backends, fd_config) = start_fd_backends(lab, dir)?;
    let mut text = std::fs::read_to_string(&config)?;
    text += &fd_config;
    std::fs::write(&config, text)?;
    let haproxy_cfg = dir.join("haproxy.cfg");
    std::fs::write(&haproxy_cfg, haproxy_config(lab))?;
    let mut c = lab.front.cmd("haproxy");
    c.args(["-db", "-f", haproxy_cfg.to_str().context("path")?]);
    let haproxy = Running(c.spawn().context("start haproxy")?);
    // haproxy prints nothing when it is up: wait for its port.
    wait_port(lab, HAPROXY_PORT)?;
    let tcpr = start_balancer(lab, &config)?;
    wait_port(lab, VIP_PORT)?;
    wait_port(lab, FD_PORT)?;
    let mut loads: Vec<Load> = loads()
        .into_iter()
        .filter(|l| only.load(l))
        .map(|l| Load {
            // The small loads' connections scale with the plan's.
            connections: if l.is_small() {
                (l.connections / SMALL_CLIENTS * plan.clients).min(MAX_CLIENTS)
            } else {
                l.connections
            },
            ..l
        })
        .collect();
    let cap = match loads.iter().find_map(|l| l.front_share) {
        Some(share) => {
            match CpuCap::new(&format!("tcpr-bench-balance-{}", std::process::id()), share) {
                Ok(cap) => Some(cap),
                Err(e) => {
                    // The other loads still tell most of the story.
                    eprintln!("tcpr bench-balance: {e:#}: the capped load is left out");
                    loads.retain(|l| l.front_share.is_none());
                    None
                }
            }
        }
        None => None,
    };
    let mut haproxy_runs = vec![Vec::new(); loads.len()];
    let mut tcpr_runs = vec![Vec::new(); loads.len()];
    let mut tcpr_served = vec![Served::default(); loads.len()];
    let mut fd_runs = vec![Vec::new(); loads.len()];
    let mut fd_served = vec![Served::default(); loads.len()];
    for run in 0..plan.runs {
        for (i, load) in loads.iter().enumerate() {
            tick(&format!(
                "balancer: {}, run {} of {}",
                load.name,
                run + 1,
                plan.runs
            ));
            for front in order(run).into_iter().filter(|f| only.front(*f)) {
                match front {
                    Front::Haproxy => haproxy_runs[i].push(wrk(
                        lab,
                        (haproxy.0.id(), cap.as_ref()),
                        HAPROXY_PORT,
                        load,
                        plan.seconds,
                    )?),
                    // One balancer serves both listeners; one load runs at
                    // a time, so its counters' change is that listener's.
                    Front::Tcpr | Front::TcprFd => {
                        let (port, runs, counted) = if front == Front::Tcpr {
                            (VIP_PORT, &mut tcpr_runs[i], &mut tcpr_served[i])
                        } else {
                            (FD_PORT, &mut fd_runs[i], &mut fd_served[i])
                        };
                        let before = served(lab)?;
                        let front = (tcpr.0.id(), cap.as_ref());
                        runs.push(wrk(lab, front, port, load, plan.seconds)?);
                        *counted = counted.plus(served(lab)?.since(before));
                    }
                }
                std::thread::sleep(SETTLE);
            }
        }
    }
    drop(tcpr);
    drop(haproxy);
    let rows = loads
        .into_iter()
        .enumerate()
        .map(|(i, load)| {
            let h = &haproxy_runs[i];
            LoadRow {
                haproxy: FrontFigures::of(h),
                tcpr: TcprFigures::of(&tcpr_runs[i], h, tcpr_served[i]),
                fd: TcprFigures::of(&fd_runs[i], h, fd_served[i]),
                load,
            }
        })
        .collect();
    Ok(BalanceFigures {
        seconds: plan.seconds,
        runs: plan.runs,
        haproxy_version: haproxy_version(),
        rows,
    })
}

/// The first line of `haproxy -v`.
fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "HAProxy (version unknown)".into())
}

/// The figures as `tcpr bench-balance` prints them: medians of the runs.
/// "fwd" is tcpr with `--forward` agents (unmodified servers), "fd" tcpr
/// with `--unix` agents (servers that take passed fds).
fn print(f: &BalanceFigures) {
    let or_nan = |s: &Samples| if s.len() > 0 { s.median() } else { f64::NAN };
    println!(
        "{:<30} {:>11} {:>10} {:>6} {:>10} {:>6} {:>8} {:>8} {:>8}",
        "load",
        "haproxy r/s",
        "fwd r/s",
        "ratio",
        "fd r/s",
        "ratio",
        "hap p99",
        "fwd p99",
        "fd p99"
    );
    for r in &f.rows {
        let (h, t, d) = (&r.haproxy, &r.tcpr, &r.fd);
        println!(
            "{:<30} {:>11.0} {:>10.0} {:>6.2} {:>10.0} {:>6.2} {:>8.2} {:>8.2} {:>8.2}",
            r.load.name,
            h.requests_per_sec.median(),
            t.front.requests_per_sec.median(),
            or_nan(&t.rps_ratio),
            d.front.requests_per_sec.median(),
            or_nan(&d.rps_ratio),
            h.p99_ms.median(),
            t.front.p99_ms.median(),
            d.front.p99_ms.median(),
        );
    }
    println!(
        "(fwd: tcpr, agents --forward to unmodified servers; fd: tcpr, agents --unix to \
         servers that take passed fds; ratio: over haproxy's, higher is better; p99 in ms)"
    );
    for r in f.rows.iter().filter(|r| r.haproxy.cap_use.len() > 0) {
        let used = |s: &Samples| 100.0 * or_nan(s);
        println!(
            "({}: each front held to {} of a core used {:.0}% (haproxy), {:.0}% (fwd), \
             {:.0}% (fd) of it: near 100%, the cap was the limit)",
            r.load.name,
            r.load
                .front_share
                .map(|s| format!("{s:.2}"))
                .unwrap_or_default(),
            used(&r.haproxy.cap_use),
            used(&r.tcpr.front.cap_use),
            used(&r.fd.front.cap_use)
        );
    }
    println!();
    println!(
        "{:<30} {:>10} {:>10} {:>7} {:>10} {:>7} {:>10} {:>10} {:>10}",
        "load",
        "hap s/GiB",
        "fwd s/GiB",
        "ratio",
        "fd s/GiB",
        "ratio",
        "hap ms/req",
        "fwd ms/req",
        "fd ms/req"
    );
    for r in &f.rows {
        let (h, t, d) = (&r.haproxy, &r.tcpr, &r.fd);
        println!(
            "{:<30} {:>10.3} {:>10.3} {:>7.3} {:>10.3} {:>7.3} {:>10.3} {:>10.3} {:>10.3}",
            r.load.name,
            or_nan(&h.cpu_per_gib),
            or_nan(&t.front.cpu_per_gib),
            or_nan(&t.cpu_ratio),
            or_nan(&d.front.cpu_per_gib),
            or_nan(&d.cpu_ratio),
            h.cpu_ms_per_request.median(),
            t.front.cpu_ms_per_request.median(),
            d.front.cpu_ms_per_request.median(),
        );
    }
    println!("(the front process's CPU: seconds per GiB, ratio over haproxy's, lower is better; ms per request)");
    println!();
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>9} {:>14}",
        "tcpr balance", "requests", "handoffs", "fallbacks", "proxied", "mean handoff"
    );
    for r in &f.rows {
        for (which, t) in [("fwd", &r.tcpr), ("fd", &r.fd)] {
            let s = &t.served;
            println!(
                "{:<36} {:>10.0} {:>10.0} {:>10.0} {:>9.0} {:>11.2} ms",
                format!("{}, {which}", r.load.name),
                t.requests,
                s.handoffs,
                s.fallbacks,
                s.proxied,
                s.mean_handoff_ms()
            );
        }
    }
    println!("(requests: wrk's count; handoffs, fallbacks, proxied: the balancer's counters over the same run)");
}

fn haproxy_config(lab: &BalanceLab) -> String {
    let v4 = Family::V4;
    format!(
        "global\n  maxconn {MAX_CLIENTS}\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
         frontend web\n  bind {vip}:{HAPROXY_PORT}\n  acl a hdr(host) -i a.example\n  acl b hdr(host) -i b.example\n  use_backend p0 if a\n  use_backend p1 if b\n\n\
         backend p0\n  server s0 {s0}\n\nbackend p1\n  server s1 {s1}\n",
        vip = lab.vip(v4),
        s0 = lab.backend_sock(v4, 0, SERVER_PORT),
        s1 = lab.backend_sock(v4, 1, SERVER_PORT),
    )
}

/// Waits until a front answers on `port` of the VIP.
fn wait_port(lab: &BalanceLab, port: u16) -> Result<()> {
    let vip = lab.vip(Family::V4);
    for _ in 0..200 {
        let ok = lab
            .client
            .cmd("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "1",
                "-H",
                "Host: a.example",
            ])
            .arg(format!("http://{vip}:{port}/name"))
            .status()?
            .success();
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the front did not start serving")
}

/// utime + stime of `pid`, seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    let field = |n: usize| -> Result<f64> {
        Ok(fields
            .get(n - 3)
            .context("short /proc stat")?
            .parse::<f64>()?)
    };
    let ticks = tick_rate();
    Ok((field(STAT_UTIME_FIELD)? + field(STAT_STIME_FIELD)?) / ticks)
}

fn tick_rate() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// One wrk run of `load` against the front `pid` listening on `port`;
/// when the load caps the front, `pid` runs the load in `cap`.
fn wrk(
    lab: &BalanceLab,
    (pid, cap): (u32, Option<&CpuCap>),
    port: u16,
    load: &Load,
    seconds: u32,
) -> Result<Run> {
    let capped = match (load.front_share, cap) {
        (Some(share), Some(cap)) => {
            cap.hold(pid)?;
            Some(share)
        }
        (Some(_), None) => bail!("{}: the front has no cap to run in", load.name),
        (None, _) => None,
    };
    let run = wrk_run(lab, pid, port, load, seconds);
    if let Some(cap) = cap.filter(|_| capped.is_some()) {
        cap.release(pid)?;
    }
    let mut run = run?;
    if let Some(share) = capped {
        run.cap_use = run.front_cpu_ms_per_request * run.requests / 1e3 / (share * run.seconds);
    }
    Ok(run)
}

fn wrk_run(lab: &BalanceLab, pid: u32, port: u16, load: &Load, seconds: u32) -> Result<Run> {
    let vip = lab.vip(Family::V4);
    let cpu_before = cpu_seconds(pid)?;
    let mut wrk = lab.client.cmd("wrk");
    wrk.args(["--latency", "-t", "2"])
        .args(["-c", &load.connections.to_string()])
        .args(["-d", &format!("{seconds}s"), "--timeout", "30s"])
        .args(["-H", "Host: b.example"]);
    if load.close {
        wrk.args(["-H", "Connection: close"]);
    }
    let out = wrk
        .arg(format!("http://{vip}:{port}{}", load.path))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("wrk: {}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    let cpu = cpu_seconds(pid)? - cpu_before;
    let summary = WrkSummary::parse(&text)
        .with_context(|| format!("wrk printed no summary for {}:\n{text}", load.name))?;
    let bytes_per_sec = summary.bytes / summary.seconds;
    Ok(Run {
        requests: summary.requests,
        requests_per_sec: summary.requests_per_sec,
        p99_ms: summary.p99_ms,
        bytes_per_sec,
        front_cpu_per_gib: if load.is_small() {
            f64::NAN
        } else {
            cpu / (summary.bytes / GIB)
        },
        front_cpu_ms_per_request: 1e3 * cpu / summary.requests,
        errors: summary.errors,
        cap_use: f64::NAN,
        seconds: summary.seconds,
    })
}

/// What the bench reads from wrk's output.
#[derive(Debug, Clone, Copy, PartialEq)]
struct WrkSummary {
    requests: f64,
    /// The run's length as wrk measured it.
    seconds: f64,
    /// Bytes read, partial responses included.
    bytes: f64,
    requests_per_sec: f64,
    p99_ms: f64,
    errors: f64,
}

impl WrkSummary {
    /// From wrk's `--latency` output: "N requests in 3.00s, 1.95GB read",
    /// "Requests/sec:", the latency distribution's "99%", and the
    /// "Socket errors: connect A, read B, write C, timeout D" and
    /// "Non-2xx or 3xx responses: N" lines it prints only when nonzero.
    fn parse(text: &str) -> Option<WrkSummary> {
        let totals = text.lines().find(|l| l.contains(" requests in "))?;
        let mut words = totals.split_whitespace();
        let requests = words.next()?.parse().ok()?;
        let seconds = parse_latency_ms(words.nth(2)?.trim_end_matches(','))? / 1e3;
        let bytes = parse_bytes(words.next()?)?;
        let p99_ms = text
            .lines()
            .find(|l| l.trim_start().starts_with("99%"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(parse_latency_ms)
            .unwrap_or(f64::NAN);
        let socket_errors: f64 = text
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("Socket errors:"))
            .map(|l| {
                l.split(',')
                    .filter_map(|part| part.split_whitespace().nth(1)?.parse::<f64>().ok())
                    .sum()
            })
            .unwrap_or(0.0);
        let non_2xx = parse_after(text, "Non-2xx or 3xx responses:").unwrap_or(0.0);
        Some(WrkSummary {
            requests,
            seconds,
            bytes,
            requests_per_sec: parse_after(text, "Requests/sec:")?,
            p99_ms,
            errors: socket_errors + non_2xx,
        })
    }
}

/// The number after `label` on the line that starts with it.
fn parse_after(text: &str, label: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(label))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// wrk's byte counts ("512B", "3.10KB", "1.95GB"; binary units).
fn parse_bytes(s: &str) -> Option<f64> {
    const UNITS: [(&str, i32); 5] = [("TB", 4), ("GB", 3), ("MB", 2), ("KB", 1), ("B", 0)];
    UNITS.iter().find_map(|(unit, power)| {
        let v: f64 = s.strip_suffix(unit)?.parse().ok()?;
        Some(v * 1024f64.powi(*power))
    })
}

/// wrk's times ("812.00us", "3.10ms", "1.20s", "1.01m") in milliseconds.
fn parse_latency_ms(s: &str) -> Option<f64> {
    const UNITS: [(&str, f64); 5] = [
        ("us", 1e-3),
        ("ms", 1.0),
        ("s", 1e3),
        ("m", 60e3),
        ("h", 3600e3),
    ];
    UNITS.iter().find_map(|(unit, ms)| {
        let v: f64 = s.strip_suffix(unit)?.parse().ok()?;
        Some(v * ms)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1's output, as Debian's package prints it.
    const WRK_OUT: &str = "Running 3s test @ http://10.79.0.100:81/bytes/104857600
  2 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.21s   200.00ms   1.93s    70.00%
    Req/Sec     0.50      0.50     1.00     50.00%
  Latency Distribution
     50%    1.20s 
     75%    1.30s 
     90%    1.50s 
     99%    1.93s 
  9 requests in 3.01s, 1.07GB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:      2.99
Transfer/sec:    364.21MB
";

    #[test]
    fn wrk_summary_reads_totals_latency_and_errors() {
        let s = WrkSummary::parse(WRK_OUT).expect("a summary");
        assert_eq!(s.requests, 9.0);
        assert!((s.seconds - 3.01).abs() < 1e-9);
        assert!((s.bytes - 1.07 * GIB).abs() < 1.0);
        assert_eq!(s.requests_per_sec, 2.99);
        assert_eq!(s.p99_ms, 1930.0);
        assert_eq!(s.errors, 7.0);
        assert_eq!(WrkSummary::parse("wrk: connection refused"), None);
    }

    #[test]
    fn each_front_goes_first_in_turn() {
        let firsts: Vec<Front> = (0..3).map(|run| order(run)[0]).collect();
        assert_eq!(firsts, [Front::Haproxy, Front::Tcpr, Front::TcprFd]);
        assert_eq!(order(3), order(0));
        assert_eq!(order(1), [Front::Tcpr, Front::TcprFd, Front::Haproxy]);
    }

    #[test]
    fn only_narrows_each_kind_it_names() {
        let only = |s: &str| Only(s.split(',').map(str::to_string).collect());
        let all = loads();
        let new = only("new,fd");
        assert!(new.load(&all[0]) && !new.load(&all[1]));
        assert!(new.front(Front::TcprFd) && !new.front(Front::Haproxy));
        // A kind not named runs whole.
        let fronts = only("haproxy");
        assert!(all.iter().all(|l| fronts.load(l)));
        assert!(fronts.front(Front::Haproxy) && !fronts.front(Front::Tcpr));
        assert!(Only::default().front(Front::Tcpr));
    }

    #[test]
    fn wrk_units() {
        assert_eq!(parse_latency_ms("812.00us"), Some(0.812));
        assert_eq!(parse_latency_ms("3.10ms"), Some(3.1));
        assert_eq!(parse_latency_ms("1.01m"), Some(60_600.0));
        assert_eq!(parse_latency_ms("fast"), None);
        assert_eq!(parse_bytes("512B"), Some(512.0));
        assert_eq!(parse_bytes("2.00KB"), Some(2048.0));
        assert_eq!(parse_bytes("many"), None);
    }
}
