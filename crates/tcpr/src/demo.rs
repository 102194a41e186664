//! `tcpr demo`: a client and two hosts made of network namespaces on one
//! bridge; a service address that moves between the hosts together with a
//! live connection streaming in both directions; every byte verified.

use crate::stream;
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tcpr_engine::{freeze, restore, FreezeOptions};
use tcpr_image::ConnectionImage;
use tcpr_netlab::{Lab, Worker};

const C2S: u64 = 0xc11e;
const S2C: u64 = 0x5e7e;
const SERVICE: &str = "10.77.0.100";
const SERVICE_PORT: u16 = 8080;
/// The server state's encoding: two big-endian u64 counters.
const STATE_BYTES: usize = 2 * std::mem::size_of::<u64>();
/// The paced writer's chunk.
const WRITE_CHUNK_BYTES: usize = 16 * 1024;
/// How often the demo's writers wake to write what fell due.
const WRITE_TICK: Duration = Duration::from_millis(1);
/// The verifying reader's buffer.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// How long the reader waits before looking again at an idle socket.
const READ_IDLE_WAIT: Duration = Duration::from_micros(200);
/// How long the end of the demo waits for the last bytes to arrive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The shell's exit status for a program ended by SIGINT.
pub(crate) const EXIT_INTERRUPTED: i32 = 128 + libc::SIGINT;

/// The server application's state; it travels as the image's blob.
#[derive(Clone, Copy, Debug, Default)]
struct ServerState {
    received: u64,
    sent: u64,
}

impl ServerState {
    fn encode(&self) -> Vec<u8> {
        [self.received.to_be_bytes(), self.sent.to_be_bytes()].concat()
    }
    fn decode(b: &[u8]) -> Result<ServerState> {
        if b.len() != STATE_BYTES {
            bail!(
                "application blob has {} bytes, expected {STATE_BYTES}",
                b.len()
            );
        }
        Ok(ServerState {
            received: u64::from_be_bytes(b[..8].try_into()?),
            sent: u64::from_be_bytes(b[8..].try_into()?),
        })
    }
}

/// Sends stream `seed` on `schedule` from offset `*off`, until `stop`.
fn paced_write(
    sock: &mut TcpStream,
    seed: u64,
    off: &AtomicU64,
    schedule: &stream::Schedule,
    stop: &AtomicBool,
) -> Result<()> {
    let mut buf = vec![0u8; WRITE_CHUNK_BYTES];
    while !stop.load(Ordering::SeqCst) {
        let cur = off.load(Ordering::SeqCst);
        let Some(owed) = schedule.owed(cur) else {
            schedule.wait();
            continue;
        };
        let n = (owed as usize).min(buf.len());
        stream::fill(seed, cur, &mut buf[..n]);
        match sock.write(&buf[..n]) {
            Ok(w) => {
                off.fetch_add(w as u64, Ordering::SeqCst);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => schedule.wait(),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads and verifies stream `seed`, counting into `off`; records the longest
/// gap between arrivals into `gap`.
fn verified_read(
    sock: &mut TcpStream,
    seed: u64,
    off: &AtomicU64,
    stop: &AtomicBool,
    gap: Option<&Mutex<Duration>>,
) -> Result<()> {
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let mut last = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        match sock.read(&mut buf) {
            Ok(0) => bail!("the connection was closed"),
            Ok(n) => {
                let cur = off.load(Ordering::SeqCst);
                if let Some(bad) = stream::first_mismatch(seed, cur, &buf[..n]) {
                    bail!("byte {bad} of the stream is wrong: data corrupted in transit");
                }
                off.fetch_add(n as u64, Ordering::SeqCst);
                let now = Instant::now();
                if let Some(g) = gap {
                    let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
                    *g = (*g).max(now - last);
                }
                last = now;
            }
            // Parked, not asleep: `Server::stop` wakes it at once.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                std::thread::park_timeout(READ_IDLE_WAIT)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

struct Server {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Result<()>>>,
    sock: TcpStream,
}

impl Server {
    /// Starts the application on `sock`; its writer keeps to `schedule`,
    /// which runs from the stream's start, so what fell due while it was
    /// stopped is written at once.
    fn start(sock: TcpStream, st: ServerState, schedule: Arc<stream::Schedule>) -> Result<Server> {
        sock.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(st.received));
        let sent = Arc::new(AtomicU64::new(st.sent));
        let mut r = sock.try_clone()?;
        let mut w = sock.try_clone()?;
        let (s1, s2, rc, sc) = (stop.clone(), stop.clone(), received.clone(), sent.clone());
        let threads = vec![
            std::thread::spawn(move || verified_read(&mut r, C2S, &rc, &s1, None)),
            std::thread::spawn(move || paced_write(&mut w, S2C, &sc, &schedule, &s2)),
        ];
        Ok(Server {
            stop,
            received,
            sent,
            threads,
            sock,
        })
    }
    /// Stops the application and hands back its socket and state.
    fn stop(self) -> Result<(TcpStream, ServerState)> {
        self.stop.store(true, Ordering::SeqCst);
        // Both wait parked (`Schedule::wait`, the reader's idle wait):
        // woken, they see the stop now rather than after their tick.
        for t in &self.threads {
            t.thread().unpark();
        }
        for t in self.threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
        }
        let st = ServerState {
            received: self.received.load(Ordering::SeqCst),
            sent: self.sent.load(Ordering::SeqCst),
        };
        Ok((self.sock, st))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One migration of the server's connection from `from` to `to` (each a
/// thread kept in that host's namespace, as the process that moves the
/// connection lives in its host: `Host::within` would start a thread per
/// call inside the measured pause).
fn migrate(
    server: Server,
    from: &Worker,
    to: &Worker,
    schedule: &Arc<stream::Schedule>,
) -> Result<(Server, Duration, usize)> {
    let (sock, st) = server.stop()?;
    let t0 = Instant::now();
    let frozen = freeze(sock.into(), &FreezeOptions::default())?;
    let mut img = frozen.dump()?;
    img.app_blob = st.encode();
    // Through the wire format, as it would travel between hosts.
    let bytes = img.encode()?;
    let img = ConnectionImage::decode(&bytes)?;
    let st = ServerState::decode(&img.app_blob)?;
    let restored = to.run(move || Ok(restore(&img)?))?;
    // Restored before the address arrives; then the address moves (over
    // rtnetlink, as `tcpr migrate --move-address` does it).
    let ip: IpAddr = SERVICE.parse()?;
    let held = from.run(move || {
        let held = tcpr_host::addr::find(ip)?;
        tcpr_host::addr::remove(&held)?;
        Ok(held)
    })?;
    to.run(move || {
        let ifindex = tcpr_host::addr::interface_index(&held.ifname)?;
        tcpr_host::addr::add(&tcpr_host::addr::Assigned {
            ifindex,
            ..held.clone()
        })?;
        Ok(tcpr_host::announce(&held.ifname, ip)?)
    })?;
    let stream = restored.resume()?;
    let pause = t0.elapsed();
    // The application carries on first; clean-up comes after.
    let server = Server::start(stream, st, schedule.clone())?;
    // The address has left `from`: a late packet there is no longer local
    // and cannot draw a RST, so the lock can go.
    if let Some(lock) = frozen.discard()? {
        tcpr_engine::FlowLock::release_moved(vec![lock])?;
    }
    Ok((server, pause, bytes.len()))
}

/// Runs the demo.
pub fn run(migrations: u32, interval: Duration, rate: u64) -> Result<()> {
    // Checked up front: namespaces half-built by a non-root user would only
    // fail later with a less clear message.
    if !is_root() {
        bail!("tcpr demo needs root: it creates network namespaces and uses TCP_REPAIR (CAP_SYS_ADMIN, CAP_NET_ADMIN)");
    }
    ctrlc::set_handler(|| {
        tcpr_netlab::cleanup_all();
        eprintln!("\ninterrupted: network namespaces removed");
        std::process::exit(EXIT_INTERRUPTED);
    })
    .context("install the Ctrl-C handler")?;

    let mut lab = Lab::new("demo")?;
    let client = lab.host("client", &["10.77.0.1/24"])?;
    let a = lab.host("a", &["10.77.0.2/24", &format!("{SERVICE}/24")])?;
    let b = lab.host("b", &["10.77.0.3/24"])?;
    // Each server host installs its lock table up front, as a host running
    // `tcpr agent` does, so that no move pays for it.
    for h in [&a, &b] {
        h.within(|| Ok(tcpr_engine::lock::prepare()?))?;
    }
    println!("hosts: client 10.77.0.1, host-a 10.77.0.2, host-b 10.77.0.3; service {SERVICE}:8080 on host-a");

    let listener = a.within(|| Ok(TcpListener::bind((SERVICE, SERVICE_PORT))?))?;
    let csock = client.within(|| Ok(TcpStream::connect((SERVICE, SERVICE_PORT))?))?;
    let (ssock, peer) = listener.accept()?;
    drop(listener);
    println!(
        "client {peer} connected; streaming {} KiB/s each way",
        rate / 1024
    );

    let stop = Arc::new(AtomicBool::new(false));
    let c_sent = Arc::new(AtomicU64::new(0));
    let c_recv = Arc::new(AtomicU64::new(0));
    let gap = Arc::new(Mutex::new(Duration::ZERO));
    csock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let (mut cr, mut cw) = (csock.try_clone()?, csock.try_clone()?);
    let (s1, s2, cs, crc, g) = (
        stop.clone(),
        stop.clone(),
        c_sent.clone(),
        c_recv.clone(),
        gap.clone(),
    );
    let client_reader =
        std::thread::spawn(move || verified_read(&mut cr, S2C, &crc, &s1, Some(&g)));
    let client_schedule = stream::Schedule::new(rate, 0, WRITE_TICK);
    let client_writer =
        std::thread::spawn(move || paced_write(&mut cw, C2S, &cs, &client_schedule, &s2));

    let schedule = Arc::new(stream::Schedule::new(rate, 0, WRITE_TICK));
    let mut server = Server::start(ssock, ServerState::default(), schedule.clone())?;
    std::thread::sleep(interval);
    let baseline = std::mem::take(&mut *gap.lock().unwrap_or_else(|e| e.into_inner()));
    println!(
        "longest gap between arrivals at the client without migration: {:.1} ms\n",
        ms(baseline)
    );
    println!(
        "{:>3}  {:<15} {:>16} {:>20} {:>10}",
        "#", "move", "freeze->resume", "client-visible gap", "image"
    );

    // Dropped before the lab: they hold its namespaces.
    let workers = (a.worker()?, b.worker()?);
    let (mut from, mut to) = (&workers.0, &workers.1);
    let (mut from_name, mut to_name) = ("host-a", "host-b");
    let mut pauses = vec![];
    let mut gaps = vec![];
    for i in 1..=migrations {
        *gap.lock().unwrap_or_else(|e| e.into_inner()) = Duration::ZERO;
        let (s, pause, size) =
            migrate(server, from, to, &schedule).with_context(|| format!("migration {i}"))?;
        server = s;
        std::thread::sleep(interval);
        let g = std::mem::take(&mut *gap.lock().unwrap_or_else(|e| e.into_inner()));
        println!(
            "{i:>3}  {:<15} {:>13.2} ms {:>17.1} ms {:>8} B",
            format!("{from_name} -> {to_name}"),
            ms(pause),
            ms(g),
            size
        );
        pauses.push(pause);
        gaps.push(g);
        std::mem::swap(&mut from, &mut to);
        std::mem::swap(&mut from_name, &mut to_name);
    }

    // Drain: stop the client's writer, wait until both sides have all bytes.
    stop.store(true, Ordering::SeqCst);
    client_writer
        .join()
        .map_err(|_| anyhow::anyhow!("client writer panicked"))??;
    let total_c2s = c_sent.load(Ordering::SeqCst);
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while server.received.load(Ordering::SeqCst) < total_c2s && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_sock, st) = server.stop()?;
    // Restart the client reader to drain what the server sent.
    client_reader
        .join()
        .map_err(|_| anyhow::anyhow!("client reader panicked"))??;
    let drain_stop = AtomicBool::new(false);
    let mut cr = csock.try_clone()?;
    std::thread::scope(|s| -> Result<()> {
        let h = s.spawn(|| verified_read(&mut cr, S2C, &c_recv, &drain_stop, None));
        while c_recv.load(Ordering::SeqCst) < st.sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        drain_stop.store(true, Ordering::SeqCst);
        h.join()
            .map_err(|_| anyhow::anyhow!("client reader panicked"))?
    })?;
    let got_s2c = c_recv.load(Ordering::SeqCst);
    println!();
    if st.received != total_c2s || got_s2c != st.sent {
        bail!(
            "byte counts differ: client sent {total_c2s}, server verified {}; server sent {}, client verified {got_s2c}",
            st.received,
            st.sent
        );
    }
    pauses.sort();
    gaps.sort();
    println!(
        "{migrations} migrations; freeze->resume median {:.2} ms, max {:.2} ms; client-visible gap median {:.1} ms, max {:.1} ms",
        ms(pauses[pauses.len() / 2]),
        ms(*pauses.last().unwrap_or(&Duration::ZERO)),
        ms(gaps[gaps.len() / 2]),
        ms(*gaps.last().unwrap_or(&Duration::ZERO)),
    );
    println!(
        "verified every byte: {total_c2s} client->server, {got_s2c} server->client, 0 lost, 0 duplicated, 0 corrupted"
    );
    drop(workers);
    drop(lab);
    println!("network namespaces removed");
    Ok(())
}

pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
