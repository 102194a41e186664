//! Channel reuse, measured A/B in one run: batches of 1 and 10 idle
//! connections handed between two namespace hosts (TLS 1.3 + PSK, address
//! move), alternating a new channel per batch (`reuse_channel = false`)
//! with a channel kept from the batch before, so both see the same load.
//! Prints, per batch size and mode, the whole handoff and its channel
//! phase (`Timings::connect`: the checks plus the TCP connect and TLS
//! handshake, or the PING of a kept channel), median and p10–p90.
//!
//! `cargo run --release -p tcpr-handoff --example channel_ab [ROUNDS]` (as
//! root: it builds network namespaces).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tcpr_handoff::{AgentConfig, AgentServer, Auth, Delivery, MigrateOptions, Outgoing, Switch};
use tcpr_netlab::{Host, Lab};

const NET: u8 = 45;
const SERVICE_PORT: u16 = 9000;

fn service() -> SocketAddr {
    SocketAddr::from(([10, NET, 0, 100], SERVICE_PORT))
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(30);
    let mut lab = Lab::new("ab")?;
    let c = lab.host("c", &[&format!("10.{NET}.0.1/24")])?;
    let a = lab.host(
        "a",
        &[&format!("10.{NET}.0.2/24"), &format!("10.{NET}.0.100/24")],
    )?;
    let b = lab.host("b", &[&format!("10.{NET}.0.3/24")])?;
    let auth = Auth::Psk(Arc::new(b"channel reuse A/B shared key".to_vec()));
    let agent_addr = SocketAddr::from(([10, NET, 0, 3], 7070));
    start_agent(&b, agent_addr, &auth)?;
    println!("batches between two namespace hosts, {rounds} rounds per row, new and kept channels alternating");
    println!("  conns  channel   whole ms p50 (p10-p90)   channel phase us p50 (p10-p90)");
    for n in [1usize, 10] {
        let mut whole = [vec![], vec![]];
        let mut channel = [vec![], vec![]];
        // One batch first, so that the kept mode has its channel.
        round(&c, &a, &b, agent_addr, &auth, n, true)?;
        for i in 0..rounds * 2 {
            let reuse = i % 2 == 1;
            let (took, connect, reused) = round(&c, &a, &b, agent_addr, &auth, n, reuse)?;
            anyhow::ensure!(reused == reuse, "a batch ran on another channel than asked");
            whole[usize::from(reuse)].push(took.as_secs_f64() * 1e3);
            channel[usize::from(reuse)].push(connect.as_secs_f64() * 1e6);
        }
        for (mode, name) in [(0, "new"), (1, "kept")] {
            println!(
                "  {n:>5}  {name:<7}  {}   {}",
                spread(&mut whole[mode], 2),
                spread(&mut channel[mode], 0)
            );
        }
    }
    Ok(())
}

/// `p50 (p10-p90)` of `v`.
fn spread(v: &mut [f64], decimals: usize) -> String {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "{:>8.decimals$} ({:.decimals$}-{:.decimals$})",
        at(0.5),
        at(0.1),
        at(0.9)
    )
}

fn start_agent(b: &Host, listen: SocketAddr, auth: &Auth) -> anyhow::Result<()> {
    let (tx, delivered) = mpsc::channel();
    let cfg = AgentConfig::new(auth.clone(), vec![service()], Delivery::Channel(tx));
    let path = b.path();
    let (up_tx, up) = mpsc::channel();
    std::thread::spawn(move || {
        let bound = tcpr_host::enter_netns(&path)
            .map_err(anyhow::Error::from)
            .and_then(|()| Ok(AgentServer::bind(listen, cfg)?));
        match bound {
            Ok(server) => {
                let _ = up_tx.send(Ok(()));
                let _ = server.run();
            }
            Err(e) => {
                let _ = up_tx.send(Err(e));
            }
        }
    });
    // Delivered connections are closed as they come.
    std::thread::spawn(move || delivered.iter().for_each(drop));
    up.recv()?
}

/// One batch of `n` connections from a to b; then the address goes back.
fn round(
    c: &Host,
    a: &Host,
    b: &Host,
    agent: SocketAddr,
    auth: &Auth,
    n: usize,
    reuse: bool,
) -> anyhow::Result<(Duration, Duration, bool)> {
    let listener = a.within(|| Ok(TcpListener::bind(service())?))?;
    let clients = c.within(|| {
        (0..n)
            .map(|_| Ok(TcpStream::connect(service())?))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let conns = (0..n)
        .map(|_| Ok(Outgoing::new(listener.accept()?.0.into(), vec![])))
        .collect::<anyhow::Result<Vec<_>>>()?;
    drop(listener);
    let mut opts = MigrateOptions::new(agent, auth.clone());
    opts.switch = Switch::MoveAddress;
    opts.reuse_channel = reuse;
    let started = Instant::now();
    let report = a.within(|| Ok(tcpr_handoff::migrate(conns, &opts, &|_| {})?))?;
    let took = started.elapsed();
    anyhow::ensure!(report.all_moved(), "a batch did not move whole");
    drop(clients);
    let svc = format!("10.{NET}.0.100/24");
    b.del_addr(&svc)?;
    a.add_addr(&svc)?;
    a.announce(service().ip())?;
    Ok((took, report.timings.connect, report.channel_reused))
}
