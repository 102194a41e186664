//! `tcpr bench`: per-connection cost of freeze+dump and restore+resume for
//! idle connections, against the same syscall sequence as bare libc calls
//! (the floor), in a private network namespace on loopback.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};
use tcpr_engine::{floor, freeze_many, restore, FreezeOptions};
use tcpr_image::ConnectionImage;

fn pairs(n: usize) -> Result<(Vec<TcpStream>, Vec<TcpStream>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let mut clients = Vec::with_capacity(n);
    let mut servers = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(TcpStream::connect(addr)?);
        servers.push(l.accept()?.0);
    }
    Ok((clients, servers))
}

/// Every restored connection must still carry bytes both ways.
fn check_alive(clients: &mut [TcpStream], restored: &mut [TcpStream]) -> Result<()> {
    for (c, s) in clients.iter_mut().zip(restored.iter_mut()) {
        s.write_all(b"p")?;
        c.write_all(b"q")?;
        let mut b = [0u8; 1];
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.read_exact(&mut b)?;
        if &b != b"p" {
            bail!("a restored connection delivered the wrong byte");
        }
        s.read_exact(&mut b)?;
        if &b != b"q" {
            bail!("a restored connection delivered the wrong byte");
        }
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
    let (mut clients, servers) = pairs(n)?;
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
        .map(|f| f.dump().map(|i| i.encode()))
        .collect::<Result<_, _>>()?;
    let dump = t.elapsed();
    let mut locks = vec![];
    for f in frozen {
        locks.extend(f.discard()?);
    }
    for l in locks {
        l.release()?;
    }
    let t = Instant::now();
    let mut restored = Vec::with_capacity(n);
    for b in &images {
        let img = ConnectionImage::decode(b)?;
        restored.push(restore(&img)?.resume()?);
    }
    let restore_t = t.elapsed();
    check_alive(&mut clients, &mut restored)?;
    Ok(Row {
        dump,
        restore: restore_t,
    })
}

fn floor_run(n: usize) -> Result<Row> {
    let (mut clients, servers) = pairs(n)?;
    let t = Instant::now();
    let states: Vec<_> = servers.iter().map(|s| floor::dump(s.as_raw_fd())).collect();
    let dump = t.elapsed();
    drop(servers);
    let t = Instant::now();
    let mut restored: Vec<TcpStream> = states
        .iter()
        .map(|s| TcpStream::from(floor::restore(s)))
        .collect();
    let restore_t = t.elapsed();
    check_alive(&mut clients, &mut restored)?;
    Ok(Row {
        dump,
        restore: restore_t,
    })
}

/// Runs the benchmark and prints a table.
pub fn run(counts: &[usize]) -> Result<()> {
    // A private namespace: nothing on the host is touched, and the lock's
    // nftables table disappears with it.
    let counts = counts.to_vec();
    let t = std::thread::spawn(move || -> Result<()> {
        tcpr_engine::unshare_netns()
            .context("tcpr bench needs root (CAP_SYS_ADMIN) for a private network namespace")?;
        tcpr_netlab::run(std::process::Command::new("ip").args(["link", "set", "lo", "up"]))?;
        tcpr_engine::raise_fd_limit()?;
        println!("per-connection cost, idle IPv4 connections on loopback (microseconds)");
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
            let locked = tcpr_run(n, true)?;
            let bare = tcpr_run(n, false)?;
            let fl = floor_run(n)?;
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
