//! `tcpr`: checkpoint, restore and move live TCP connections.

// A binary: `pub` in its modules reaches nothing outside the crate.
#![allow(unreachable_pub)]

mod balance;
mod bench;
mod bench_balance;
mod bench_handoff;
mod demo;
mod demo_balance;
mod dump;
mod handoff;
mod inspect;
mod ls;
mod privs;
mod report;
mod restore_cmd;
mod soak;
mod stream;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use dump::{dump, thaw, DumpArgs};
use inspect::inspect;
use ls::ls;
use restore_cmd::restore_and_run;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;
use tcpr_engine::IfFrozen;

/// The bounds of the numbers the CLI takes: each is checked when the
/// arguments are parsed, with a one-line error, so no value reaches a
/// `Duration` constructor or a multiplication that would panic or wrap.
pub(crate) mod bounds {
    use std::time::Duration;

    /// The longest lock lease, seconds (the engine's `MAX_LEASE`).
    pub const MAX_LEASE_SECS: u64 = tcpr_engine::MAX_LEASE.as_secs();
    /// The longest wait for one step of a handoff, seconds.
    pub const MAX_STEP_TIMEOUT_SECS: f64 = 3600.0;
    /// The shortest: below a millisecond no step can complete.
    pub const MIN_STEP_TIMEOUT_SECS: f64 = 0.001;
    /// The demo's streaming time between migrations, seconds.
    pub const DEMO_INTERVAL_SECS: (f64, f64) = (0.01, 3600.0);
    /// The demo's rate each way, KiB/s (1 GiB/s at most).
    pub const MAX_DEMO_RATE_KIB: u64 = 1 << 20;
    /// The demo's migrations.
    pub const MAX_DEMO_MIGRATIONS: u32 = 10_000;
    /// Connections per benchmark batch (each is two sockets and a lock
    /// element; the fd limit is raised to fit).
    pub const MAX_BENCH_CONNECTIONS: usize = 100_000;
    /// The largest application blob: half the image format's body limit
    /// (`tcpr_image::format::MAX_BODY`), leaving the rest for the queues.
    pub const MAX_BLOB_BYTES: u64 = tcpr_image::format::MAX_BODY as u64 / 2;
    /// Moves of the benchmark's stream.
    pub const MAX_BENCH_MOVES: usize = 100_000;

    /// A number of seconds within `[min, max]`, as a `Duration`.
    pub fn seconds(arg: &str, min: f64, max: f64) -> Result<Duration, String> {
        let secs: f64 = arg
            .trim()
            .parse()
            .map_err(|_| format!("{arg:?} is not a number of seconds"))?;
        if !(secs.is_finite() && (min..=max).contains(&secs)) {
            return Err(format!(
                "{arg} is out of range: give between {min} and {max} seconds"
            ));
        }
        Ok(Duration::from_secs_f64(secs))
    }

    /// A step timeout of a handoff (`--timeout`).
    pub fn step_timeout(arg: &str) -> Result<Duration, String> {
        seconds(arg, MIN_STEP_TIMEOUT_SECS, MAX_STEP_TIMEOUT_SECS)
    }

    /// [`step_timeout`], or 0 (off).
    pub fn step_timeout_or_zero(arg: &str) -> Result<Duration, String> {
        if arg.trim().parse::<f64>() == Ok(0.0) {
            return Ok(Duration::ZERO);
        }
        step_timeout(arg).map_err(|e| format!("{e} (or 0: off)"))
    }

    /// The demo's `--interval`.
    pub fn demo_interval(arg: &str) -> Result<Duration, String> {
        seconds(arg, DEMO_INTERVAL_SECS.0, DEMO_INTERVAL_SECS.1)
    }

    /// A lock lease in whole seconds (`--lease`).
    pub fn lease(arg: &str) -> Result<Duration, String> {
        let secs: u64 = arg
            .trim()
            .parse()
            .map_err(|_| format!("{arg:?} is not a whole number of seconds"))?;
        if !(1..=MAX_LEASE_SECS).contains(&secs) {
            return Err(format!(
                "{arg} is out of range: a lease is between 1 and {MAX_LEASE_SECS} seconds"
            ));
        }
        Ok(Duration::from_secs(secs))
    }
}

#[derive(Parser)]
#[command(
    name = "tcpr",
    version,
    about = "Checkpoint, restore and move live TCP connections"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Leave {
    /// Leave the connection frozen and locked at the source (it is moving).
    Frozen,
    /// Thaw it after the dump and release the lock (a snapshot).
    Running,
}

#[derive(Subcommand)]
enum Cmd {
    /// Freeze a socket of a running process and write its image.
    Dump {
        /// The process holding the socket.
        #[arg(long)]
        pid: i32,
        /// The socket's fd number in that process.
        #[arg(long)]
        fd: i32,
        /// Where to write the image: a new or regular file (mode 0600: it
        /// holds payload bytes), replaced atomically; `-` is standard output.
        /// Anything else (a device, FIFO, symlink, directory) is refused
        /// before the socket is touched.
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// What to do with the source connection after the dump.
        #[arg(long, value_enum, default_value = "frozen")]
        leave: Leave,
        /// Lease of the source lock, whole seconds from 1 to 86400 (a day):
        /// it expires by itself after this.
        #[arg(long, default_value = "60", value_parser = bounds::lease)]
        lease: Duration,
        /// A file whose bytes travel with the connection as its application
        /// blob (at most 1024 MiB).
        #[arg(long)]
        blob: Option<PathBuf>,
        /// Dump a socket that is frozen already (an earlier dump or move left
        /// it so). Refused by default: if that earlier image was restored
        /// elsewhere, a second copy would make one connection two. The socket
        /// stays frozen if this dump fails.
        #[arg(long)]
        frozen_ok: bool,
    },
    /// Thaw a socket an earlier dump or move left frozen: release its lock
    /// and let it carry on in place. Only for a connection that was NOT
    /// restored elsewhere (two live copies of one connection break it).
    Thaw {
        /// The process holding the socket.
        #[arg(long)]
        pid: i32,
        /// The socket's fd number in that process.
        #[arg(long)]
        fd: i32,
    },
    /// Restore a connection here and run a command with it on fd 3.
    Restore {
        /// The image file.
        file: PathBuf,
        /// Also put the connection on stdin and stdout (inetd convention).
        #[arg(long)]
        inetd: bool,
        /// Seconds to wait for the peer to acknowledge enough that the
        /// unsent data fits the send buffer (in an unprivileged namespace,
        /// which caps the buffer); on timeout nothing is sent to the peer.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        unsent_timeout: u64,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Show an image.
    Inspect {
        /// The image file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// With --json, include queue contents and the blob as hex.
        #[arg(long)]
        data: bool,
    },
    /// List TCP connections of this host (network namespace) or of a
    /// process: owner, state, queues, whether each is frozen (repair mode) or
    /// locked, and whether it can be dumped (if not, why; `?` means unknown).
    Ls {
        /// Only the sockets this process holds.
        #[arg(long)]
        pid: Option<i32>,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Self-contained demo: migrate a live, streaming connection between two
    /// hosts built from network namespaces, several times.
    Demo {
        /// How many migrations (1 to 10000).
        #[arg(long, default_value_t = 6,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(bounds::MAX_DEMO_MIGRATIONS)))]
        migrations: u32,
        /// Seconds of streaming between migrations (0.01 to 3600).
        #[arg(long, default_value = "1", value_parser = bounds::demo_interval)]
        interval: Duration,
        /// Client send rate in each direction, KiB/s (1 to 1048576).
        #[arg(long, default_value_t = 2048,
              value_parser = clap::value_parser!(u64).range(1..=bounds::MAX_DEMO_RATE_KIB))]
        rate_kib: u64,
        /// Another show instead (`tcpr demo balance`).
        #[command(subcommand)]
        show: Option<demo_balance::DemoShow>,
    },
    /// L7 load balancer: peek at each request head, hand the connection to
    /// its backend's agent and steer its packets there (or proxy it).
    Balance(balance::BalanceArgs),
    /// Receive connections from other hosts and deliver them here.
    Agent(handoff::AgentArgs),
    /// The agent's relay worker (`--forward`): relays pairs passed on
    /// standard input until it closes and the relays end.
    #[command(hide = true)]
    RelayWorker,
    /// The agent's stand-in: answers queries from the journal of an agent
    /// that was killed (started by the agent).
    #[command(hide = true)]
    AgentStandIn(handoff::StandInArgs),
    /// Move live connections of a process or address to an agent. Frozen
    /// sockets (an earlier dump or a move whose outcome was unknown left
    /// them so; they may live on elsewhere) are never moved again: named
    /// with --fd they are refused, listed they are left out with a note.
    /// `tcpr thaw` them first if they were not restored elsewhere.
    Migrate(handoff::MigrateArgs),
    /// Announce an address that just moved here (gratuitous ARP for IPv4,
    /// unsolicited neighbour advertisement for IPv6), so neighbours update
    /// their caches at once.
    Announce {
        /// The interface that carries the address.
        #[arg(long)]
        dev: String,
        /// The address.
        addr: std::net::IpAddr,
    },
    /// Benchmark handoffs between two namespace hosts: batches, and the
    /// client-visible pause of a moved stream.
    BenchHandoff {
        /// Batch sizes to measure (each 1 to 100000).
        #[arg(long, value_delimiter = ',', default_value = "1,100,10000", value_parser = bench_count)]
        counts: Vec<usize>,
        /// Moves of the streaming connection (1 to 100000).
        #[arg(long, default_value_t = 100, value_parser = bench_moves)]
        moves: usize,
    },
    /// Benchmark `tcpr balance` against HAProxy in namespace hosts (needs
    /// wrk and haproxy).
    BenchBalance {
        /// Seconds per load (1 to 3600).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=3600))]
        seconds: u32,
        /// wrk's connections for the small-response loads (2, wrk's
        /// threads, to 4000, HAProxy's maxconn here; the "4x the
        /// connections" load has 4x as many, up to 4000; the large ones
        /// use 4).
        #[arg(long, default_value_t = bench_balance::SMALL_CLIENTS,
              value_parser = clap::value_parser!(u32).range(2..=bench_balance::MAX_CLIENTS as i64))]
        clients: u32,
    },
    /// The client side of `tcpr bench` (run by it).
    #[command(hide = true)]
    BenchPeer {
        addr: String,
        #[arg(value_parser = bench_count)]
        count: usize,
    },
    /// Soak: many connections streaming both ways, moved back and forth
    /// between two namespace hosts at random while faults are injected;
    /// exits 0 only when nothing was lost, duplicated or left behind.
    Soak(soak::SoakArgs),
    /// Benchmark freeze+dump and restore+resume against the bare-syscall floor.
    Bench {
        /// Connection counts to measure (each 1 to 100000).
        #[arg(long, value_delimiter = ',', default_value = "1,100,10000", value_parser = bench_count)]
        counts: Vec<usize>,
        /// Run the engine, lock, handoff and balancer benchmarks and write
        /// DIR/report.md with PNG plots.
        #[arg(long, value_name = "DIR")]
        report: Option<std::path::PathBuf>,
        /// With --report: seconds per wrk run of the balancer against
        /// HAProxy (3 runs of 4 loads on each); 0 leaves it out (0 to 600).
        #[arg(long, default_value_t = 3, requires = "report", value_parser = clap::value_parser!(u32).range(0..=600))]
        balance_seconds: u32,
    },
}

fn bench_count(arg: &str) -> Result<usize, String> {
    count_in(arg, bounds::MAX_BENCH_CONNECTIONS)
}

fn bench_moves(arg: &str) -> Result<usize, String> {
    count_in(arg, bounds::MAX_BENCH_MOVES)
}

fn count_in(arg: &str, max: usize) -> Result<usize, String> {
    match arg.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "{arg} is out of range: give a whole number from 1 to {max}"
        )),
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TCPR_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => exit_on_bad_arguments(e),
    };
    let outcome = run(cli.cmd);
    // The lock's netlink sockets close in a child: their close may wait
    // for an RCU grace period after a relock (tcpr_engine::lock).
    tcpr_engine::lock::detach_sockets();
    match outcome {
        Ok(code) => std::process::exit(code),
        // `tcpr ls | head`: the reader left; what it wanted, it has.
        Err(e) if reader_left(&e) => std::process::exit(0),
        Err(e) => {
            eprintln!("tcpr: {}", one_line(&e));
            std::process::exit(1);
        }
    }
}

/// Standard output's reader went away (EPIPE on our write). Only writes
/// to standard output are mapped to it ([`stdout_closed`]): an EPIPE from
/// anything else is a real error.
#[derive(Debug)]
pub(crate) struct ReaderLeft;

impl std::fmt::Display for ReaderLeft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed by its reader")
    }
}

impl std::error::Error for ReaderLeft {}

/// Maps a failed write to standard output: EPIPE becomes [`ReaderLeft`].
pub(crate) fn stdout_closed(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(ReaderLeft)
    } else {
        anyhow::Error::new(e).context("cannot write to standard output")
    }
}

/// Whether the error is standard output's reader having gone.
fn reader_left(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|cause| cause.downcast_ref::<ReaderLeft>().is_some())
}

/// Help and version go to standard output as clap prints them; a bad
/// argument is one line on stderr, like every other tcpr error (exit 2).
fn exit_on_bad_arguments(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit()
    }
    // The message's lines up to the usage, on one line: a missing
    // argument's name is on the line after "were not provided:".
    let text = e.to_string();
    let said: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let said = said.join(" ");
    let said = if said.is_empty() {
        "bad arguments"
    } else {
        said.as_str()
    };
    eprintln!(
        "tcpr: {} (tcpr --help)",
        said.strip_prefix("error: ").unwrap_or(said)
    );
    std::process::exit(e.exit_code())
}

/// The error chain on one line, each cause once.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

fn run(cmd: Cmd) -> Result<i32> {
    privs::check(&cmd)?;
    match cmd {
        Cmd::Dump {
            pid,
            fd,
            output,
            leave,
            lease,
            blob,
            frozen_ok,
        } => dump(&DumpArgs {
            pid,
            fd,
            output: &output,
            leave,
            lease,
            blob: blob.as_deref(),
            if_frozen: if frozen_ok {
                IfFrozen::Take
            } else {
                IfFrozen::Refuse
            },
        }),
        Cmd::Thaw { pid, fd } => thaw(pid, fd),
        Cmd::Restore {
            file,
            inetd,
            unsent_timeout,
            cmd,
        } => restore_and_run(&file, inetd, Duration::from_secs(unsent_timeout), &cmd),
        Cmd::Inspect { file, json, data } => inspect(&file, json, data),
        Cmd::Ls { pid, json } => ls(pid, json),
        Cmd::Demo {
            show: Some(show), ..
        } => demo_balance::run_show(show).map(|()| 0),
        Cmd::Demo {
            migrations,
            interval,
            rate_kib,
            show: None,
        } => demo::run(migrations, interval, rate_kib * KIB).map(|()| 0),
        Cmd::Balance(b) => balance::run(b),
        Cmd::Agent(a) => handoff::agent(a),
        Cmd::RelayWorker => handoff::relay_worker(),
        Cmd::AgentStandIn(a) => handoff::stand_in(a),
        Cmd::Migrate(m) => handoff::migrate(m),
        Cmd::Announce { dev, addr } => {
            tcpr_host::announce(&dev, addr)
                .with_context(|| format!("cannot announce {addr} on {dev}"))?;
            Ok(0)
        }
        Cmd::BenchHandoff { counts, moves } => bench_handoff::run(&counts, moves).map(|()| 0),
        Cmd::BenchBalance { seconds, clients } => bench_balance::run(seconds, clients).map(|()| 0),
        Cmd::BenchPeer { addr, count } => bench::peer(&addr, count).map(|()| 0),
        Cmd::Bench {
            counts,
            report,
            balance_seconds,
        } => bench::main(&counts, report.as_deref(), balance_seconds).map(|()| 0),
        Cmd::Soak(a) => soak::run(a),
    }
}

/// Bytes in a KiB.
const KIB: u64 = 1024;
