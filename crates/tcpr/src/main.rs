//! `tcpr`: checkpoint, restore and move live TCP connections.

// A binary: `pub` in its modules reaches nothing outside the crate.
#![allow(unreachable_pub)]

mod bench;
mod bench_handoff;
mod demo;
mod handoff;
mod stream;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tcpr_engine::diag::Fact;
use tcpr_engine::{freeze_with, restore, take_fd, FreezeOptions, IfFrozen};
use tcpr_image::ConnectionImage;

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
    },
    /// Receive connections from other hosts and deliver them here.
    Agent(handoff::AgentArgs),
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
    /// The client side of `tcpr bench` (run by it).
    #[command(hide = true)]
    BenchPeer {
        addr: String,
        #[arg(value_parser = bench_count)]
        count: usize,
    },
    /// Benchmark freeze+dump and restore+resume against the bare-syscall floor.
    Bench {
        /// Connection counts to measure (each 1 to 100000).
        #[arg(long, value_delimiter = ',', default_value = "1,100,10000", value_parser = bench_count)]
        counts: Vec<usize>,
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
    match run(cli.cmd) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("tcpr: {}", one_line(&e));
            std::process::exit(1);
        }
    }
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
    let text = e.to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("bad arguments");
    eprintln!(
        "tcpr: {} (tcpr --help)",
        first.strip_prefix("error: ").unwrap_or(first)
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
            migrations,
            interval,
            rate_kib,
        } => demo::run(migrations, interval, rate_kib * KIB).map(|()| 0),
        Cmd::Agent(a) => handoff::agent(a),
        Cmd::Migrate(m) => handoff::migrate(m),
        Cmd::Announce { dev, addr } => {
            tcpr_host::announce(&dev, addr)
                .with_context(|| format!("cannot announce {addr} on {dev}"))?;
            Ok(0)
        }
        Cmd::BenchHandoff { counts, moves } => bench_handoff::run(&counts, moves).map(|()| 0),
        Cmd::BenchPeer { addr, count } => bench::peer(&addr, count).map(|()| 0),
        Cmd::Bench { counts } => bench::run(&counts).map(|()| 0),
    }
}

fn read_image(path: &Path) -> Result<ConnectionImage> {
    use std::io::Read;
    // No image is longer than its header and the largest body: read no more.
    let max = (tcpr_image::format::HEADER_LEN as u64) + u64::from(tcpr_image::format::MAX_BODY);
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!(
            "{} is not a usable image: it is longer than any image ({} bytes at most)",
            path.display(),
            max
        );
    }
    ConnectionImage::decode(&bytes)
        .with_context(|| format!("{} is not a usable image", path.display()))
}

/// Bytes in a KiB.
const KIB: u64 = 1024;

/// Where a dump writes its image, checked and opened before the socket is
/// touched.
enum Output {
    /// Standard output (`-o -`).
    Stdout,
    /// A new or regular file: the image goes to `tmp` (created here, so the
    /// directory is known to be writable), renamed over `path` at the end.
    File {
        path: PathBuf,
        tmp: TempFile,
        file: std::fs::File,
    },
}

/// A temporary file removed when dropped: an image never renamed into
/// place (a failed dump) leaves nothing behind.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Output {
    /// Accepts `-` (standard output, unless it is a terminal), a path that
    /// does not exist in an existing directory, or a regular file; refuses
    /// anything else (devices, FIFOs, sockets, directories, symlinks) with
    /// nothing changed.
    fn open(path: &Path) -> Result<Output> {
        use std::os::unix::fs::OpenOptionsExt;
        if path.as_os_str() == "-" {
            if std::io::stdout().is_terminal() {
                bail!("refusing to write a binary image to a terminal: redirect standard output, or give -o FILE");
            }
            return Ok(Output::Stdout);
        }
        check_target(path)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Output::File {
            path: path.to_path_buf(),
            tmp: TempFile(tmp),
            file,
        })
    }

    /// Writes the image: all of it to standard output, or to the file,
    /// synced, then renamed over the path (atomically, mode 0600).
    fn write(self, bytes: &[u8]) -> Result<()> {
        match self {
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)
                    .and_then(|()| out.flush())
                    .context("cannot write the image to standard output")
            }
            Output::File {
                path,
                tmp,
                mut file,
            } => {
                let res = file
                    .write_all(bytes)
                    .and_then(|()| file.sync_all())
                    .map_err(anyhow::Error::from)
                    // The path may have changed since it was checked.
                    .and_then(|()| check_target(&path))
                    .and_then(|()| Ok(std::fs::rename(&tmp.0, &path)?));
                res.with_context(|| format!("cannot write {}", path.display()))
            }
        }
    }
}

/// A dump writes only to a new file or over a regular one: replacing a
/// device, FIFO or symlink would destroy what is there.
fn check_target(path: &Path) -> Result<()> {
    let kind = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot check {}", path.display())),
    };
    use std::os::unix::fs::FileTypeExt;
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    bail!(
        "{} is {what}: an image is written only to a new or regular file (-o - writes to standard output)",
        path.display()
    )
}

/// What `tcpr dump` was asked.
struct DumpArgs<'a> {
    pid: i32,
    fd: i32,
    output: &'a Path,
    leave: Leave,
    lease: Duration,
    blob: Option<&'a Path>,
    if_frozen: IfFrozen,
}

fn dump(args: &DumpArgs<'_>) -> Result<i32> {
    let DumpArgs {
        pid,
        fd,
        output,
        leave,
        lease,
        blob,
        if_frozen,
    } = *args;
    let blob = match blob {
        Some(p) => read_blob(p)?,
        None => vec![],
    };
    // Before the socket is touched: a bad output path changes nothing.
    let out = Output::open(output)?;
    let sock = take_fd(pid, fd)?;
    let frozen = freeze_with(sock, &FreezeOptions { lock: true, lease }, if_frozen)
        .map_err(|e| match e {
            tcpr_engine::Error::AlreadyFrozen { .. } => anyhow::anyhow!(
                "{e}; if it was not restored elsewhere, `tcpr thaw --pid {pid} --fd {fd}` lets it carry on, and --frozen-ok dumps it anyway"
            ),
            e => anyhow::Error::from(e),
        })
        .with_context(|| format!("cannot freeze fd {fd} of process {pid}"))?;
    // From here on, any failure thaws the socket (Frozen's Drop) and
    // releases the lock: nothing is left changed. (A socket that was frozen
    // already stays frozen.)
    let mut img = frozen.dump()?;
    img.app_blob = blob;
    out.write(&img.encode()?)?;
    let flow = frozen.flow();
    let to = if output.as_os_str() == "-" {
        "standard output".to_string()
    } else {
        output.display().to_string()
    };
    match leave {
        Leave::Running => {
            frozen.thaw()?;
            eprintln!("dumped {flow} to {to} (left running)");
        }
        Leave::Frozen => {
            frozen.leave_frozen();
            eprintln!(
                "dumped {flow} to {to} (left frozen; source lock expires in {} s)",
                lease.as_secs()
            );
        }
    }
    Ok(0)
}

/// Reads an application blob of at most [`bounds::MAX_BLOB_BYTES`]: the
/// image that carries it must stay under the format's body limit.
fn read_blob(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let max = bounds::MAX_BLOB_BYTES;
    let too_big = || {
        anyhow::anyhow!(
            "the blob {} is over {} MiB, the most an image carries",
            path.display(),
            max >> 20
        )
    };
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read the blob {}", path.display()))?;
    if file.metadata().map(|m| m.len()).unwrap_or(0) > max {
        return Err(too_big());
    }
    let mut blob = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut blob)
        .with_context(|| format!("cannot read the blob {}", path.display()))?;
    if blob.len() as u64 > max {
        return Err(too_big());
    }
    Ok(blob)
}

fn thaw(pid: i32, fd: i32) -> Result<i32> {
    let sock = take_fd(pid, fd)?;
    let flow = tcpr_engine::thaw_frozen(sock)
        .with_context(|| format!("cannot thaw fd {fd} of process {pid}"))?;
    eprintln!("thawed {flow}: its lock is released and it carries on in process {pid}");
    Ok(0)
}

fn restore_and_run(
    file: &Path,
    inetd: bool,
    unsent_timeout: Duration,
    cmd: &[String],
) -> Result<i32> {
    let img = read_image(file)?;
    // Everything that can fail is checked before the connection comes to
    // life: once resumed, closing it would end it with a FIN or RST.
    find_program(&cmd[0])?;
    let mut restored = restore(&img)?;
    restored.set_unsent_timeout(unsent_timeout);
    let stream = restored.resume()?;
    let sock: std::os::fd::OwnedFd = stream.into();
    let mut c = tcpr_handoff::deliver::command_for(cmd);
    let spawned =
        tcpr_handoff::deliver::spawn(&mut c, &sock, &img.app_blob, img.local, img.peer, inetd);
    drop(c);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return Err(set_aside(sock, &img, file, e)),
    };
    let status = child
        .wait()
        .with_context(|| format!("waiting for {}", cmd[0]))?;
    drop(sock);
    Ok(status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    }))
}

/// The path `program` runs from (`$PATH` searched as `execvp` does), or a
/// clear error naming it.
fn find_program(program: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        if runnable(&p) {
            return Ok(p);
        }
        bail!("cannot run {program}: no such executable file; nothing was restored");
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| runnable(p))
        .with_context(|| format!("cannot run {program}: not found in PATH; nothing was restored"))
}

/// The program could not be started after the connection was resumed:
/// freezes it again (locked for the default lease, so the peer's packets
/// meet no RST) and writes its current state next to the image, so that
/// it can be restored again; closing it frozen sends nothing.
fn set_aside(
    sock: std::os::fd::OwnedFd,
    img: &ConnectionImage,
    file: &Path,
    spawn_error: std::io::Error,
) -> anyhow::Error {
    let retry = file.with_extension("retry.img");
    let saved = freeze_with(sock, &FreezeOptions::default(), IfFrozen::Refuse)
        .map_err(anyhow::Error::from)
        .and_then(|frozen| {
            let mut now = frozen.dump()?;
            now.app_blob = img.app_blob.clone();
            Output::open(&retry)?.write(&now.encode()?)?;
            frozen.leave_frozen();
            Ok(())
        });
    match saved {
        Ok(()) => anyhow::anyhow!(
            "cannot start the program ({spawn_error}); the connection was frozen again and saved to {}: restore that image within {} s",
            retry.display(),
            tcpr_engine::DEFAULT_LEASE.as_secs()
        ),
        Err(e) => anyhow::anyhow!(
            "cannot start the program ({spawn_error}), and cannot set the connection aside: {e:#}"
        ),
    }
}

fn inspect(file: &Path, json: bool, data: bool) -> Result<i32> {
    let img = read_image(file)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&tcpr_image::to_json(&img, data))?
        );
        return Ok(0);
    }
    if data {
        bail!("--data needs --json");
    }
    let o = &img.options;
    let w = &img.window;
    println!("connection  {}", tcpr_engine::flow_of(&img));
    println!("state       {}", img.state);
    println!(
        "sequence    send {}  recv {}",
        img.send_seq.0, img.recv_seq.0
    );
    println!(
        "queues      send {} bytes ({} sent, {} unsent)  recv {} bytes",
        img.send_queue.len(),
        img.send_queue.sent.len(),
        img.send_queue.unsent.len(),
        img.recv_queue.len()
    );
    println!(
        "options     mss {}  wscale {}  sack {}  timestamps {}",
        o.mss,
        if o.window_scaling {
            format!("{}/{}", o.snd_wscale, o.rcv_wscale)
        } else {
            "off".into()
        },
        o.sack,
        o.timestamps
    );
    println!(
        "window      snd_wl1 {} snd_wnd {} max_window {} rcv_wnd {} rcv_wup {}",
        w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup
    );
    println!("app blob    {} bytes", img.app_blob.len());
    Ok(0)
}

/// How `ls` shows a fact: yes, no, or `?` when unknown.
fn fact_cell(f: &Fact) -> &'static str {
    match f {
        Fact::Yes => "yes",
        Fact::No => "no",
        Fact::Unknown(_) => "?",
    }
}

fn ls(pid: Option<i32>, json: bool) -> Result<i32> {
    let entries = tcpr_engine::diag::list(pid)?;
    if !json {
        println!(
            "{:<44} {:<44} {:<12} {:>8} {:>8}  {:<18} {:<6} {:<6} DUMPABLE",
            "LOCAL", "PEER", "STATE", "RECV-Q", "SEND-Q", "OWNER(PID/FD)", "FROZEN", "LOCKED"
        );
    }
    for e in entries {
        let owners = e
            .owners
            .iter()
            .map(|o| format!("{}/{}", o.pid, o.fd))
            .collect::<Vec<_>>()
            .join(",");
        let dumpable = e.dumpable();
        if json {
            let unknown = |f: &Fact| match f {
                Fact::Unknown(why) => Some(why.clone()),
                _ => None,
            };
            println!(
                "{}",
                serde_json::json!({
                    "local": e.local.to_string(), "peer": e.peer.to_string(), "state": e.state_name(),
                    "recv_queue": e.recv_queue, "send_queue": e.send_queue,
                    "owners": e.owners.iter().map(|o| serde_json::json!({"pid": o.pid, "fd": o.fd})).collect::<Vec<_>>(),
                    "frozen": e.frozen.known(), "frozen_unknown": unknown(&e.frozen),
                    "locked": e.locked.known(), "locked_unknown": unknown(&e.locked),
                    "dumpable": dumpable.is_ok(), "not_dumpable_because": dumpable.err(),
                })
            );
        } else {
            println!(
                "{:<44} {:<44} {:<12} {:>8} {:>8}  {:<18} {:<6} {:<6} {}",
                e.local.to_string(),
                e.peer.to_string(),
                e.state_name(),
                e.recv_queue,
                e.send_queue,
                match (owners.is_empty(), e.hidden_processes) {
                    (false, _) => owners,
                    // Held, perhaps, by a process we cannot see.
                    (true, hidden) if hidden > 0 => "?".into(),
                    (true, _) => "-".into(),
                },
                fact_cell(&e.frozen),
                fact_cell(&e.locked),
                match dumpable {
                    Ok(()) => "yes".to_string(),
                    Err(why) => format!("no: {why}"),
                }
            );
        }
    }
    Ok(0)
}
