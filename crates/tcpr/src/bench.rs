//! `tcpr bench`: per-connection cost of freeze+dump and restore+resume for
//! idle connections, against the same syscall sequence as bare libc calls
//! (the floor), in a private network namespace on loopback.

use crate::report::Samples;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};
use tcpr_engine::{freeze_many, restore, Flow, FlowLock, FreezeOptions, Netns};
use tcpr_host::floor;
use tcpr_image::ConnectionImage;

/// The client ends live in a child process (`tcpr bench-peer`), so that each
/// process holds at most one end of each connection: 10,000 connections
/// then fit a 20,000-file limit.
struct Peers {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Peers {
    fn line(&mut self) -> Result<String> {
        use std::io::BufRead;
        let mut l = String::new();
        self.stdout.read_line(&mut l)?;
        Ok(l.trim().to_string())
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pairs(n: usize) -> Result<(Peers, Vec<TcpStream>)> {
    use std::process::{Command, Stdio};
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["bench-peer", &addr.to_string(), &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start the bench peer")?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut peers = Peers {
        child,
        stdin,
        stdout,
    };
    let mut servers = Vec::with_capacity(n);
    for _ in 0..n {
        servers.push(l.accept()?.0);
    }
    if peers.line()? != "ready" {
        bail!("the bench peer did not connect");
    }
    Ok((peers, servers))
}

/// Every restored connection must still carry a byte each way.
fn check_alive(peers: &mut Peers, restored: &mut [TcpStream]) -> Result<()> {
    for s in restored.iter_mut() {
        s.write_all(b"p")?;
    }
    writeln!(peers.stdin, "check")?;
    let mut b = [0u8; 1];
    for s in restored.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.read_exact(&mut b)?;
        if &b != b"q" {
            bail!("a restored connection delivered the wrong byte");
        }
    }
    let verdict = peers.line()?;
    if verdict != "ok" {
        bail!("bench peer: {verdict}");
    }
    Ok(())
}

/// `tcpr bench-peer ADDR N`: the client side of the bench.
pub fn peer(addr: &str, n: usize) -> Result<()> {
    tcpr_host::raise_fd_limit(n as u64 + 64)?;
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(TcpStream::connect(addr)?);
    }
    println!("ready");
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line)? > 0 {
        let mut b = [0u8; 1];
        let mut res = Ok(());
        for c in conns.iter_mut() {
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            if let Err(e) = c.read_exact(&mut b) {
                res = Err(e.to_string());
                break;
            }
            if &b != b"p" {
                res = Err("wrong byte".into());
                break;
            }
            c.write_all(b"q")?;
        }
        match res {
            Ok(()) => println!("ok"),
            Err(e) => println!("error: {e}"),
        }
        line.clear();
    }
    Ok(())
}

/// One run's totals over its `n` connections.
struct Row {
    dump: Duration,
    restore: Duration,
}

fn per_conn_us(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn tcpr_run(n: usize, lock: bool) -> Result<Row> {
    let (mut peers, servers) = pairs(n)?;
    let socks: Vec<OwnedFd> = servers.into_iter().map(OwnedFd::from).collect();
    let opts = FreezeOptions {
        lock,
        ..Default::default()
    };
    let t = Instant::now();
    let frozen = freeze_many(socks, &opts)?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let images: Vec<Vec<u8>> = frozen
        .iter()
        .map(|f| f.dump().and_then(|i| Ok(i.encode()?)))
        .collect::<Result<_, _>>()?;
    let dump = t.elapsed();
    let mut locks = vec![];
    for f in frozen {
        locks.extend(f.discard()?);
    }
    FlowLock::release_many(locks)?;
    let t = Instant::now();
    let mut restored = Vec::with_capacity(n);
    for b in &images {
        let img = ConnectionImage::decode(b)?;
        restored.push(restore(&img)?.resume()?);
    }
    let restore_t = t.elapsed();
    check_alive(&mut peers, &mut restored)?;
    Ok(Row {
        dump,
        restore: restore_t,
    })
}

/// The floor's run: the minimal one (repair calls only), or with `complete`
/// the one that also reads and sets every socket option the image keeps.
fn floor_run(n: usize, complete: bool) -> Result<Row> {
    let (mut peers, servers) = pairs(n)?;
    let dump = if complete {
        floor::dump_with_options
    } else {
        floor::dump
    };
    let t = Instant::now();
    let states = servers
        .iter()
        .map(|s| dump(s.as_fd()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let dump = t.elapsed();
    drop(servers);
    let t = Instant::now();
    let mut restored: Vec<TcpStream> = states
        .iter()
        .map(|s| floor::restore(s).map(TcpStream::from))
        .collect::<std::io::Result<_>>()?;
    let restore_t = t.elapsed();
    check_alive(&mut peers, &mut restored)?;
    Ok(Row {
        dump,
        restore: restore_t,
    })
}

/// One run of each kind at one connection count, back to back.
struct Runs {
    /// tcpr, freezing with the lock.
    locked: Row,
    /// tcpr without the lock.
    bare: Row,
    /// The minimal floor.
    floor: Row,
    /// The complete floor.
    full: Row,
}

/// The engine's figures at one connection count, per connection, over
/// several runs. Each run measures tcpr with the lock, tcpr without it and
/// the floor back to back, so each ratio compares runs of the same minute.
#[derive(Debug, Clone)]
pub struct EngineRow {
    /// Connections per run.
    pub conns: usize,
    /// Freeze (with the lock) + dump + encode.
    pub dump_locked_us: Samples,
    /// Freeze (no lock) + dump + encode.
    pub dump_us: Samples,
    /// The floor's dump: the same repair syscalls as bare libc calls.
    pub floor_dump_us: Samples,
    /// The complete floor's dump: the repair calls and a read of every
    /// socket option the image keeps, as bare calls.
    pub full_dump_us: Samples,
    /// Decode + restore + resume.
    pub restore_us: Samples,
    /// The floor's restore.
    pub floor_restore_us: Samples,
    /// The complete floor's restore: it sets every option again.
    pub full_restore_us: Samples,
    /// `dump_us / floor_dump_us`, per run.
    pub dump_ratio: Samples,
    /// `restore_us / floor_restore_us`, per run.
    pub restore_ratio: Samples,
    /// `dump_us / full_dump_us`, per run.
    pub dump_full_ratio: Samples,
    /// `restore_us / full_restore_us`, per run.
    pub restore_full_ratio: Samples,
}

/// Latency of the flow lock through [`FlowLock`], one call at a time.
#[derive(Debug, Clone)]
pub struct LockRow {
    /// The datapath that held the lock.
    pub datapath: String,
    /// Flows per call.
    pub flows: usize,
    /// [`FlowLock::acquire`] until it returns.
    pub acquire_us: Samples,
    /// [`FlowLock::release`] (or `release_many`) until it returns: the
    /// packets pass again from then on.
    pub release_us: Samples,
}

/// Everything `tcpr bench` measures.
#[derive(Debug, Clone)]
pub struct EngineFigures {
    /// The one-time install of the lock's table in a namespace.
    pub lock_table_install: Duration,
    /// One row per connection count.
    pub rows: Vec<EngineRow>,
    /// Lock and unlock latency (empty when not asked for).
    pub locks: Vec<LockRow>,
}

/// How many runs, and of what.
#[derive(Debug, Clone)]
pub struct EnginePlan {
    /// Connection counts.
    pub counts: Vec<usize>,
    /// Runs per count at least (the CLI's table uses fewer for big counts).
    pub min_reps: usize,
    /// Lock/unlock cycles per batch size; 0: no lock benchmark.
    pub lock_cycles: usize,
}

impl EnginePlan {
    /// Runs at `n` connections: up to 15 for small counts, odd.
    pub fn reps(&self, n: usize) -> usize {
        ((1000 / n).clamp(1, 15) | 1).max(self.min_reps)
    }

    /// Steps [`measure`] reports through its `tick`.
    pub fn steps(&self) -> usize {
        let runs: usize = self.counts.iter().map(|&n| self.reps(n)).sum();
        runs + if self.lock_cycles > 0 {
            LOCK_BATCHES.len()
        } else {
            0
        }
    }
}

/// Flows per lock call in the lock benchmark: one connection, and a batch.
const LOCK_BATCHES: [usize; 2] = [1, 100];
/// Ports of the lock benchmark's made-up flows: each batch size has its
/// own local ports, each cycle its own peer port.
const LOCK_LOCAL_PORTS: [u16; 2] = [20_000, 30_000];
const LOCK_PEER_PORT: u16 = 40_000;

/// The datapath [`FlowLock`] uses. nf_tables sets are its only one today;
/// a second one (BPF) reports itself here when it lands.
fn lock_datapath() -> String {
    "nftables".into()
}

/// Acquires and releases a lock on `flows` distinct flows `cycles` times,
/// new flows each time (a flow just released may still be in the set
/// until its element expires: locking it again is another operation).
fn lock_row(flows: usize, cycles: usize, first_port: u16) -> Result<LockRow> {
    let local: std::net::IpAddr = [127, 0, 0, 1].into();
    let (mut acquire, mut release) = (Vec::new(), Vec::new());
    for cycle in 0..cycles {
        let batch: Vec<Flow> = (0..flows)
            .map(|i| Flow {
                local: std::net::SocketAddr::new(local, first_port + i as u16),
                peer: std::net::SocketAddr::new(local, LOCK_PEER_PORT + cycle as u16),
            })
            .collect();
        let t = Instant::now();
        let lock = FlowLock::acquire(&batch, Netns::current(), tcpr_engine::DEFAULT_LEASE)?;
        acquire.push(t.elapsed());
        let t = Instant::now();
        lock.release()?;
        release.push(t.elapsed());
    }
    let us = |d: &[Duration]| Samples::new(d.iter().map(|d| d.as_secs_f64() * 1e6).collect());
    Ok(LockRow {
        datapath: lock_datapath(),
        flows,
        acquire_us: us(&acquire),
        release_us: us(&release),
    })
}

/// Runs the engine benchmark in a private network namespace; `tick` is
/// called once per step (see [`EnginePlan::steps`]).
pub fn measure(plan: &EnginePlan, tick: &(dyn Fn(&str) + Sync)) -> Result<EngineFigures> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| measure_here(plan, tick))
            .join()
            .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
    })
}

fn measure_here(plan: &EnginePlan, tick: &dyn Fn(&str)) -> Result<EngineFigures> {
    // A private namespace: nothing on the host is touched, and the lock's
    // nftables table disappears with it.
    tcpr_host::unshare_netns()
        .context("tcpr bench needs root (CAP_SYS_ADMIN) for a private network namespace")?;
    tcpr_netlab::run(std::process::Command::new("ip").args(["link", "set", "lo", "up"]))?;
    let need = plan.counts.iter().copied().max().unwrap_or(1) as u64 + 1024;
    let got = tcpr_host::raise_fd_limit(need)?;
    if got < need {
        bail!("tcpr bench needs {need} open files and may have only {got} (RLIMIT_NOFILE)");
    }
    // Installs the lock's nftables table (with `nft`), as a serving host
    // does once; later locks only add set elements over netlink.
    let t = Instant::now();
    tcpr_engine::lock::prepare()?;
    let lock_table_install = t.elapsed();
    let mut rows = Vec::new();
    for &n in &plan.counts {
        let mut runs = Vec::new();
        for _ in 0..plan.reps(n) {
            tick(&format!("engine: {n} connections"));
            let locked = tcpr_run(n, true)?;
            let bare = tcpr_run(n, false)?;
            let floor = floor_run(n, false)?;
            let full = floor_run(n, true)?;
            runs.push(Runs {
                locked,
                bare,
                floor,
                full,
            });
        }
        let col = |f: &dyn Fn(&Runs) -> f64| Samples::new(runs.iter().map(f).collect());
        rows.push(EngineRow {
            conns: n,
            dump_locked_us: col(&|r| per_conn_us(r.locked.dump, n)),
            dump_us: col(&|r| per_conn_us(r.bare.dump, n)),
            floor_dump_us: col(&|r| per_conn_us(r.floor.dump, n)),
            restore_us: col(&|r| per_conn_us(r.bare.restore, n)),
            floor_restore_us: col(&|r| per_conn_us(r.floor.restore, n)),
            full_dump_us: col(&|r| per_conn_us(r.full.dump, n)),
            full_restore_us: col(&|r| per_conn_us(r.full.restore, n)),
            dump_ratio: col(&|r| r.bare.dump.as_secs_f64() / r.floor.dump.as_secs_f64()),
            restore_ratio: col(&|r| r.bare.restore.as_secs_f64() / r.floor.restore.as_secs_f64()),
            dump_full_ratio: col(&|r| r.bare.dump.as_secs_f64() / r.full.dump.as_secs_f64()),
            restore_full_ratio: col(&|r| {
                r.bare.restore.as_secs_f64() / r.full.restore.as_secs_f64()
            }),
        });
    }
    let mut locks = Vec::new();
    if plan.lock_cycles > 0 {
        for (flows, first_port) in LOCK_BATCHES.into_iter().zip(LOCK_LOCAL_PORTS) {
            tick(&format!("lock: {flows} flows"));
            locks.push(lock_row(flows, plan.lock_cycles, first_port)?);
        }
    }
    Ok(EngineFigures {
        lock_table_install,
        rows,
        locks,
    })
}

/// `tcpr bench`: the table, or with `report` the whole report (with the
/// balancer's wrk runs of `balance_seconds`; 0 leaves it out).
pub fn main(
    counts: &[usize],
    report: Option<&std::path::Path>,
    balance_seconds: u32,
) -> Result<()> {
    match report {
        Some(dir) => crate::report::run(dir, counts, balance_seconds),
        None => run(counts),
    }
}

/// Runs the benchmark and prints a table.
fn run(counts: &[usize]) -> Result<()> {
    let plan = EnginePlan {
        counts: counts.to_vec(),
        min_reps: 1,
        lock_cycles: 0,
    };
    let figures = measure(&plan, &|_| {})?;
    println!(
        "lock table installed once per namespace (nft, tcpr_engine::lock::prepare): {:.1} ms",
        figures.lock_table_install.as_secs_f64() * 1e3
    );
    println!("per-connection cost, idle IPv4 connections on loopback (microseconds; median of up to 15 runs)");
    println!(
        "{:>7}  {:>10} {:>10} {:>10} {:>7} {:>10} {:>7}   {:>10} {:>10} {:>7} {:>10} {:>7}",
        "conns",
        "dump+lock",
        "dump",
        "floor",
        "ratio",
        "floor+opt",
        "ratio",
        "restore",
        "floor",
        "ratio",
        "floor+opt",
        "ratio"
    );
    for r in &figures.rows {
        println!(
            "{:>7}  {:>10.1} {:>10.1} {:>10.1} {:>6.2}x {:>10.1} {:>6.2}x   {:>10.1} {:>10.1} {:>6.2}x {:>10.1} {:>6.2}x",
            r.conns,
            r.dump_locked_us.median(),
            r.dump_us.median(),
            r.floor_dump_us.median(),
            r.dump_ratio.median(),
            r.full_dump_us.median(),
            r.dump_full_ratio.median(),
            r.restore_us.median(),
            r.floor_restore_us.median(),
            r.restore_ratio.median(),
            r.full_restore_us.median(),
            r.restore_full_ratio.median(),
        );
    }
    println!("dump = freeze + dump + encode (no lock); restore = decode + restore + resume; floor = the bare repair calls; floor+opt = the same and a read (dump) or write (restore) of every socket option the image keeps; ratio = tcpr / that floor, median of the runs' own ratios");
    println!("every restored connection was checked to carry a byte each way");
    Ok(())
}
