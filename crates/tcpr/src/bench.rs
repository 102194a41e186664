//! `tcpr bench`: per-connection cost of freeze+dump and restore+resume for
//! idle connections, against the same syscall sequence as bare libc calls
//! (the floor), in a private network namespace on loopback.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};
use tcpr_engine::{freeze_many, restore, FreezeOptions};
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

struct Row {
    dump: Duration,
    restore: Duration,
}

fn per_conn(d: Duration, n: usize) -> f64 {
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
    tcpr_engine::FlowLock::release_many(locks)?;
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

fn floor_run(n: usize) -> Result<Row> {
    let (mut peers, servers) = pairs(n)?;
    let t = Instant::now();
    let states = servers
        .iter()
        .map(|s| floor::dump(s.as_fd()))
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

/// Runs `f` `reps` times; the row of median dump and median restore time.
fn median(reps: usize, f: impl Fn() -> Result<Row>) -> Result<Row> {
    let mut rows = (0..reps).map(|_| f()).collect::<Result<Vec<_>>>()?;
    rows.sort_by_key(|r| r.dump);
    let dump = rows[reps / 2].dump;
    rows.sort_by_key(|r| r.restore);
    Ok(Row {
        dump,
        restore: rows[reps / 2].restore,
    })
}

/// Installs the lock's nftables table (with `nft`), as a serving host does
/// once; later locks only add set elements over netlink. Returns its cost.
fn first_lock() -> Result<Duration> {
    let t = Instant::now();
    tcpr_engine::lock::prepare()?;
    Ok(t.elapsed())
}

/// Runs the benchmark and prints a table.
pub fn run(counts: &[usize]) -> Result<()> {
    // A private namespace: nothing on the host is touched, and the lock's
    // nftables table disappears with it.
    let counts = counts.to_vec();
    let t = std::thread::spawn(move || -> Result<()> {
        tcpr_host::unshare_netns()
            .context("tcpr bench needs root (CAP_SYS_ADMIN) for a private network namespace")?;
        tcpr_netlab::run(std::process::Command::new("ip").args(["link", "set", "lo", "up"]))?;
        let need = counts.iter().copied().max().unwrap_or(1) as u64 + 1024;
        let got = tcpr_host::raise_fd_limit(need)?;
        if got < need {
            bail!("tcpr bench needs {need} open files and may have only {got} (RLIMIT_NOFILE)");
        }
        let install = first_lock()?;
        println!(
            "lock table installed once per namespace (nft, tcpr_engine::lock::prepare): {:.1} ms",
            install.as_secs_f64() * 1e3
        );
        println!("per-connection cost, idle IPv4 connections on loopback (microseconds; median of up to 15 runs)");
        println!(
            "{:>7}  {:>12} {:>12} {:>12} {:>9}   {:>12} {:>12} {:>9}",
            "conns",
            "dump+lock",
            "dump nolock",
            "floor dump",
            "ratio",
            "restore",
            "floor rest.",
            "ratio"
        );
        for &n in &counts {
            let reps = (1000 / n).clamp(1, 15) | 1;
            let locked = median(reps, || tcpr_run(n, true))?;
            let bare = median(reps, || tcpr_run(n, false))?;
            let fl = median(reps, || floor_run(n))?;
            println!(
                "{:>7}  {:>12.1} {:>12.1} {:>12.1} {:>8.2}x   {:>12.1} {:>12.1} {:>8.2}x",
                n,
                per_conn(locked.dump, n),
                per_conn(bare.dump, n),
                per_conn(fl.dump, n),
                per_conn(bare.dump, n) / per_conn(fl.dump, n),
                per_conn(bare.restore, n),
                per_conn(fl.restore, n),
                per_conn(bare.restore, n) / per_conn(fl.restore, n),
            );
        }
        println!("dump = freeze + dump + encode; restore = decode + restore + resume; ratio = tcpr without lock / floor");
        println!("every restored connection was checked to carry a byte each way");
        Ok(())
    });
    t.join()
        .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
}
