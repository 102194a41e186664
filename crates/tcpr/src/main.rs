//! `tcpr`: checkpoint, restore and move live TCP connections.

mod bench;
mod bench_handoff;
mod demo;
mod handoff;
mod stream;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tcpr_engine::{freeze, restore, take_fd, FreezeOptions};
use tcpr_image::ConnectionImage;

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
        /// Where to write the image (mode 0600: it holds payload bytes).
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// What to do with the source connection after the dump.
        #[arg(long, value_enum, default_value = "frozen")]
        leave: Leave,
        /// Lease of the source lock, seconds: it expires by itself after this.
        #[arg(long, default_value_t = 60)]
        lease: u64,
        /// A file whose bytes travel with the connection as its application blob.
        #[arg(long)]
        blob: Option<PathBuf>,
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
    /// List TCP connections of this host (network namespace) or of a process.
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
        /// How many migrations.
        #[arg(long, default_value_t = 6)]
        migrations: u32,
        /// Seconds of streaming between migrations.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Client send rate in each direction, KiB/s.
        #[arg(long, default_value_t = 2048)]
        rate_kib: u64,
    },
    /// Receive connections from other hosts and deliver them here.
    Agent(handoff::AgentArgs),
    /// Move live connections of a process or address to an agent.
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
        /// Batch sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,100,10000")]
        counts: Vec<usize>,
        /// Moves of the streaming connection.
        #[arg(long, default_value_t = 100)]
        moves: usize,
    },
    /// The client side of `tcpr bench` (run by it).
    #[command(hide = true)]
    BenchPeer { addr: String, count: usize },
    /// Benchmark freeze+dump and restore+resume against the bare-syscall floor.
    Bench {
        /// Connection counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,100,10000")]
        counts: Vec<usize>,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TCPR_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("tcpr: {}", one_line(&e));
            std::process::exit(1);
        }
    }
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
        } => dump(
            pid,
            fd,
            &output,
            leave,
            Duration::from_secs(lease),
            blob.as_deref(),
        ),
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
        } => demo::run(
            migrations,
            Duration::from_secs_f64(interval),
            rate_kib * 1024,
        )
        .map(|()| 0),
        Cmd::Agent(a) => handoff::agent(a),
        Cmd::Migrate(m) => handoff::migrate(m),
        Cmd::Announce { dev, addr } => {
            tcpr_engine::announce(&dev, addr)
                .with_context(|| format!("cannot announce {addr} on {dev}"))?;
            Ok(0)
        }
        Cmd::BenchHandoff { counts, moves } => bench_handoff::run(&counts, moves).map(|()| 0),
        Cmd::BenchPeer { addr, count } => bench::peer(&addr, count).map(|()| 0),
        Cmd::Bench { counts } => bench::run(&counts).map(|()| 0),
    }
}

fn read_image(path: &Path) -> Result<ConnectionImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    ConnectionImage::decode(&bytes)
        .with_context(|| format!("{} is not a usable image", path.display()))
}

/// Writes `bytes` to `path` atomically, mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
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
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("cannot write {}", path.display()))
}

fn dump(
    pid: i32,
    fd: i32,
    output: &Path,
    leave: Leave,
    lease: Duration,
    blob: Option<&Path>,
) -> Result<i32> {
    let blob = match blob {
        Some(p) => {
            std::fs::read(p).with_context(|| format!("cannot read the blob {}", p.display()))?
        }
        None => vec![],
    };
    let sock = take_fd(pid, fd)?;
    let frozen = freeze(sock, &FreezeOptions { lock: true, lease })
        .with_context(|| format!("cannot freeze fd {fd} of process {pid}"))?;
    // From here on, any failure thaws the socket (Frozen's Drop) and
    // releases the lock: nothing is left changed.
    let mut img = frozen.dump()?;
    img.app_blob = blob;
    write_private(output, &img.encode())?;
    let flow = frozen.flow();
    match leave {
        Leave::Running => {
            frozen.thaw()?;
            eprintln!(
                "dumped {} -> {} to {} (left running)",
                flow.local,
                flow.peer,
                output.display()
            );
        }
        Leave::Frozen => {
            frozen.leave_frozen();
            eprintln!(
                "dumped {} -> {} to {} (left frozen; source lock expires in {} s)",
                flow.local,
                flow.peer,
                output.display(),
                lease.as_secs()
            );
        }
    }
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
    let saved = freeze(sock, &FreezeOptions::default())
        .map_err(anyhow::Error::from)
        .and_then(|frozen| {
            let mut now = frozen.dump()?;
            now.app_blob = img.app_blob.clone();
            write_private(&retry, &now.encode())?;
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
    println!("connection  {} -> {}", img.local, img.peer);
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

fn ls(pid: Option<i32>, json: bool) -> Result<i32> {
    let entries = tcpr_engine::diag::list(pid)?;
    if !json {
        println!(
            "{:<44} {:<44} {:<12} {:>8} {:>8}  {:<18} DUMPABLE",
            "LOCAL", "PEER", "STATE", "RECV-Q", "SEND-Q", "OWNER(PID/FD)"
        );
    }
    for e in entries {
        let owners = e
            .owners
            .iter()
            .map(|(p, f)| format!("{p}/{f}"))
            .collect::<Vec<_>>()
            .join(",");
        let dumpable = match e.dumpable() {
            Ok(()) => "yes".to_string(),
            Err(why) => format!("no: {why}"),
        };
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "local": e.local.to_string(), "peer": e.peer.to_string(), "state": e.state_name(),
                    "recv_queue": e.recv_queue, "send_queue": e.send_queue,
                    "owners": e.owners.iter().map(|(p, f)| serde_json::json!({"pid": p, "fd": f})).collect::<Vec<_>>(),
                    "dumpable": e.dumpable().is_ok(),
                })
            );
        } else {
            println!(
                "{:<44} {:<44} {:<12} {:>8} {:>8}  {:<18} {}",
                e.local.to_string(),
                e.peer.to_string(),
                e.state_name(),
                e.recv_queue,
                e.send_queue,
                if owners.is_empty() {
                    "-".into()
                } else {
                    owners
                },
                dumpable
            );
        }
    }
    Ok(0)
}
