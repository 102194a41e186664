//! `tcpr bench-handoff`: the cost of moving 1, 100 and 10,000 connections
//! between two hosts (network namespaces) through the whole handoff (TLS,
//! PSK, freeze, prepare, address move, commit), and the client-visible
//! pause of one streaming connection moved back and forth, against the
//! same stream's longest gap with no move.

use crate::report::Samples;
use crate::stream;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tcpr_handoff::{
    hand_off, AgentConfig, AgentServer, Auth, Delivered, Delivery, HandOff, MigrateOptions, Switch,
    Timings,
};
use tcpr_netlab::{Host, Lab};

const SVC: &str = "10.66.0.100";
const PORT: u16 = 8080;

/// Starts an agent inside `host`; delivered connections go to the channel.
fn agent(host: &Host, listen: &str, auth: &Auth) -> Result<mpsc::Receiver<Delivered>> {
    let (tx, rx) = mpsc::channel();
    let mut cfg = AgentConfig::new(
        auth.clone(),
        vec![SocketAddr::new(SVC.parse()?, PORT)],
        Delivery::Channel(tx),
    );
    cfg.timeout = Duration::from_secs(5);
    let listen: SocketAddr = listen.parse()?;
    let path = host.path();
    let (ready_tx, ready_rx) = mpsc::channel();
    // The agent's threads inherit this thread's namespace.
    std::thread::spawn(move || {
        let r = tcpr_host::enter_netns(&path)
            .map_err(anyhow::Error::from)
            .and_then(|()| AgentServer::bind(listen, cfg).map_err(anyhow::Error::from));
        match r {
            Ok(server) => {
                let _ = ready_tx.send(Ok(()));
                let _ = server.run();
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    });
    ready_rx.recv()??;
    Ok(rx)
}

fn move_address(from: &Host, to: &Host) -> Result<()> {
    from.del_addr(&format!("{SVC}/24"))?;
    to.add_addr(&format!("{SVC}/24"))?;
    to.announce(SVC.parse::<IpAddr>()?)
}

/// Moves `n` idle connections from `a` to `b`, whose agent (`tcpr agent`,
/// a process of its own, so that each process holds one end of each
/// connection) passes them to a sink that counts and closes them; returns
/// the handoff time and the sender's split of it.
fn batch(
    lab_hosts: (&Host, &Host, &Host),
    from: &tcpr_netlab::Worker,
    n: usize,
    auth: &Auth,
    delivered: &mpsc::Receiver<()>,
) -> Result<(Duration, Timings)> {
    let (c, a, b) = lab_hosts;
    let listener = a.within(|| Ok(TcpListener::bind((SVC, PORT))?))?;
    let mut peer = c
        .cmd(&std::env::current_exe()?.to_string_lossy())
        .args(["bench-peer", &format!("{SVC}:{PORT}"), &n.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start the bench peer")?;
    let mut servers = Vec::with_capacity(n);
    for _ in 0..n {
        // Owned, not duplicated: 10,000 connections must fit the fd limit.
        servers.push(tcpr_handoff::Outgoing::new(
            listener.accept()?.0.into(),
            vec![],
        ));
    }
    drop(listener);
    let mut line = String::new();
    BufReader::new(peer.stdout.take().expect("piped")).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("the bench peer did not connect");
    }
    let mut opts = MigrateOptions::new("10.66.0.3:7071".parse()?, auth.clone());
    opts.switch = Switch::MoveAddress;
    let t = Instant::now();
    let report = from.run(move || Ok(tcpr_handoff::migrate(servers, &opts, &|_| {})?))?;
    let took = t.elapsed();
    let timings = report.timings;
    let moved = report.moved.len();
    // Wait until every delivery is in (and closed, keeping the fd count
    // low).
    let mut got = 0;
    while got < moved {
        delivered
            .recv_timeout(Duration::from_secs(10))
            .context("a moved connection was not delivered")?;
        got += 1;
    }
    let _ = peer.kill();
    let _ = peer.wait();
    if moved != n {
        let why = report
            .rolled_back
            .first()
            .map(|r| format!("rolled back: {}", r.why))
            .or_else(|| {
                report
                    .unknown
                    .first()
                    .map(|u| format!("unknown: {}", u.why))
            })
            .unwrap_or_default();
        bail!("only {moved} of {n} connections moved; the first other one {why}");
    }
    // Put the address back for the next round.
    move_address(b, a)?;
    Ok((took, timings))
}

/// The pause before a handoff of `n` connections, after the one before.
fn settle(n: usize) -> Duration {
    Duration::from_millis(50 + (n as u64 / 10).min(1000))
}

/// Batch handoffs at one size, over several runs.
#[derive(Debug, Clone)]
pub struct BatchRow {
    /// Connections per handoff.
    pub conns: usize,
    /// The whole handoff, from the call to its report.
    pub total_ms: Samples,
    /// The sender's split of it, phase by phase (see [`Timings`]).
    pub phases_ms: Vec<(&'static str, Samples)>,
}

/// The phases of [`Timings`], named as the report shows them.
fn phases(runs: &[Timings]) -> Vec<(&'static str, Samples)> {
    let col = |f: fn(&Timings) -> Duration| Samples::ms(&runs.iter().map(f).collect::<Vec<_>>());
    vec![
        (
            "checks, channel (TLS connect, or PING on a kept one)",
            col(|t| t.connect),
        ),
        ("freeze", col(|t| t.freeze)),
        ("prepare (dump, send, agent restores)", col(|t| t.prepare)),
        ("switch (address move)", col(|t| t.switch)),
        ("commit (agent resumes and delivers)", col(|t| t.commit)),
        ("release source locks", col(|t| t.release)),
    ]
}

/// One stream moved back and forth, and the same stream not moved.
#[derive(Debug, Clone)]
pub struct StreamFigures {
    /// The writer's rate.
    pub rate_bytes_per_s: u64,
    /// Longest gap between bytes at the client per window with a move.
    pub moved_gap_ms: Samples,
    /// The same, per window of the same length with no move; the windows
    /// alternate with the moved ones in the same run.
    pub unmoved_gap_ms: Samples,
    /// `moved p50 / unmoved p50`.
    pub p50_ratio: f64,
    /// The `hand_off` call of each move (TLS connect included), on the old
    /// host; the writer on the new host starts when its agent delivers,
    /// before the call returns.
    pub hand_off_ms: Samples,
    /// From the writer's last write before a move to its first write
    /// after it: the application's own pause, which the gap at the client
    /// can only exceed.
    pub writer_pause_ms: Samples,
    /// Bytes verified in order at the client.
    pub verified_bytes: u64,
}

/// When a window's writes began and ended.
struct Writes {
    first: Option<Instant>,
    last: Instant,
}

/// Everything `tcpr bench-handoff` measures.
#[derive(Debug, Clone)]
pub struct HandoffFigures {
    /// The first handoff from a host, which installs its lock table.
    pub first_ms: f64,
    /// One row per batch size.
    pub batches: Vec<BatchRow>,
    /// The moved stream.
    pub stream: StreamFigures,
}

/// How many runs, and of what.
#[derive(Debug, Clone)]
pub struct HandoffPlan {
    /// Batch sizes.
    pub counts: Vec<usize>,
    /// Runs per batch size at least.
    pub min_reps: usize,
    /// Moves of the stream.
    pub moves: usize,
}

impl HandoffPlan {
    /// Runs of a batch of `n`: up to 9 for small batches, odd.
    pub fn reps(&self, n: usize) -> usize {
        ((100 / n).clamp(1, 9) | 1).max(self.min_reps)
    }

    /// Steps [`measure`] reports through its `tick`.
    pub fn steps(&self) -> usize {
        self.counts.iter().map(|&n| self.reps(n)).sum::<usize>() + self.moves
    }
}

/// Windows of writing measured per move (and per unmoved window).
pub const WINDOW: Duration = Duration::from_millis(200);

/// How often the stream's writer wakes to write what fell due (2 KiB at
/// 4 MiB/s): the stream's own longest gap, which a move's is compared with.
pub const WRITE_TICK: Duration = Duration::from_micros(500);

/// Runs the benchmark and prints its figures.
pub fn run(counts: &[usize], moves: usize) -> Result<()> {
    let plan = HandoffPlan {
        counts: counts.to_vec(),
        min_reps: 1,
        moves,
    };
    let f = measure(&plan, &|_| {})?;
    println!(
        "handoff of idle connections between two namespace hosts (TLS 1.3 + PSK, address move)"
    );
    // The first handoff from a host installs its lock table (one `nft`
    // run); a serving host pays that once, so it is shown on its own.
    println!(
        "first handoff from a host (installs its nftables lock table): {:.1} ms",
        f.first_ms
    );
    println!(
        "{:>7}  {:>12} {:>16}   (median of up to 9 runs)",
        "conns", "total ms", "per conn us"
    );
    for r in &f.batches {
        println!(
            "{:>7}  {:>12.1} {:>16.1}",
            r.conns,
            r.total_ms.median(),
            r.total_ms.median() * 1e3 / r.conns as f64
        );
    }
    println!();
    println!("where the time goes, as the sender sees it (ms, median (min-max)):");
    for r in &f.batches {
        println!("{:>7} connections", r.conns);
        for (phase, ms) in &r.phases_ms {
            println!(
                "         {phase:<40} {:>9.2} ({:.2}-{:.2})",
                ms.median(),
                ms.min(),
                ms.max()
            );
        }
    }
    let s = &f.stream;
    println!();
    println!(
        "one stream at {} MiB/s moved {moves} times between the hosts",
        s.rate_bytes_per_s >> 20
    );
    println!(
        "longest gap between bytes at the client per 200 ms window, no move: p50 {:>6.2} ms   p99 {:>6.2} ms   ({} windows, between the moves)",
        s.unmoved_gap_ms.median(),
        s.unmoved_gap_ms.quantile(0.99),
        s.unmoved_gap_ms.len()
    );
    println!(
        "longest gap per move (its window):  p50 {:>8.2} ms   p99 {:>8.2} ms   max {:>8.2} ms   (p50 / no-move p50 = {:.1}x)",
        s.moved_gap_ms.median(),
        s.moved_gap_ms.quantile(0.99),
        s.moved_gap_ms.max(),
        s.p50_ratio
    );
    println!(
        "per move: hand_off call p50 {:>6.2} ms (p10 {:.2}, p90 {:.2}); writer's pause p50 {:>6.2} ms (p10 {:.2}, p90 {:.2})",
        s.hand_off_ms.median(),
        s.hand_off_ms.quantile(0.1),
        s.hand_off_ms.quantile(0.9),
        s.writer_pause_ms.median(),
        s.writer_pause_ms.quantile(0.1),
        s.writer_pause_ms.quantile(0.9),
    );
    println!(
        "verified {} bytes in order, none lost or corrupted",
        s.verified_bytes
    );
    Ok(())
}

/// The moved stream's writer, shared by the two hosts' threads.
struct StreamWriter {
    sent: AtomicU64,
    schedule: stream::Schedule,
    /// The longest gap at the client since it was last taken.
    gap: Arc<Mutex<Duration>>,
    auth: Auth,
    moves: usize,
    /// Set when a turn failed: the one waiting for a delivery gives up.
    abandoned: AtomicBool,
}

/// One host's turn with the stream.
#[derive(Default)]
struct Turn {
    /// After a delivery: the moved window.
    moved: Option<MovedWindow>,
    /// Before a move: the unmoved window and the move.
    handed: Option<Handed>,
    /// The last turn keeps the connection.
    kept: Option<TcpStream>,
}

struct MovedWindow {
    /// Its longest gap.
    gap: Duration,
    /// The first write on the new host.
    first_write: Option<Instant>,
}

struct Handed {
    /// The unmoved window's longest gap.
    gap: Duration,
    /// The last write before `hand_off` was called.
    last_write: Instant,
    /// The `hand_off` call.
    call: Duration,
}

/// The stream's warm-up before its first measured window.
const WARM_UP: Duration = Duration::from_millis(300);

impl StreamWriter {
    /// Waits for move `i`'s delivery by this host's agent, for at most
    /// 10 s, or until the bench gave up on the stream.
    fn delivery(
        &self,
        i: usize,
        deliveries: &Mutex<mpsc::Receiver<Delivered>>,
    ) -> Result<Delivered> {
        let deliveries = deliveries.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match deliveries.recv_timeout(Duration::from_millis(10)) {
                Ok(d) => return Ok(d),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => bail!("move {i}: the agent is gone: {e}"),
            }
            if self.abandoned.load(Ordering::SeqCst) {
                bail!("move {i}: abandoned (an earlier turn failed)");
            }
            if Instant::now() >= deadline {
                bail!("move {i}: nothing delivered within 10 s");
            }
        }
    }

    fn take_gap(&self) -> Duration {
        std::mem::take(&mut *self.gap.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Turn `i`: takes the connection (`first`, or its delivery by this
    /// host's agent), writes the moved window (after a delivery), then,
    /// unless it is the last turn, the next move's unmoved window, and
    /// hands the connection to the agent at `to`.
    fn turn(
        &self,
        i: usize,
        first: Option<TcpStream>,
        deliveries: &Mutex<mpsc::Receiver<Delivered>>,
        to: SocketAddr,
    ) -> Result<Turn> {
        let mut turn = Turn::default();
        let s = match first {
            Some(s) => {
                let (s, _) = self.write_for(s, WARM_UP)?;
                self.take_gap();
                s
            }
            None => {
                let d = self.delivery(i, deliveries)?;
                let (s, writes) = self.write_for(d.stream, WINDOW)?;
                turn.moved = Some(MovedWindow {
                    gap: self.take_gap(),
                    first_write: writes.first,
                });
                s
            }
        };
        if i == self.moves {
            turn.kept = Some(s);
            return Ok(turn);
        }
        let (s, writes) = self.write_for(s, WINDOW)?;
        let gap = self.take_gap();
        let mut opts = MigrateOptions::new(to, self.auth.clone());
        opts.switch = Switch::MoveAddress;
        let called = Instant::now();
        let r = hand_off(vec![(s, vec![])], &opts);
        let call = called.elapsed();
        match r.map_err(|e| e.error)?.into_iter().next() {
            Some(HandOff::Moved) => {}
            other => bail!("move {} did not happen: {other:?}", i + 1),
        }
        turn.handed = Some(Handed {
            gap,
            last_write: writes.last,
            call,
        });
        Ok(turn)
    }

    /// Writes the stream on its schedule for `dur`, and on until it is
    /// caught up: the window ends right after a write, where an
    /// application that hands its connection off between two writes calls
    /// `hand_off` (the tick it would have slept is its own, not the
    /// move's).
    fn write_for(&self, mut s: TcpStream, dur: Duration) -> Result<(TcpStream, Writes)> {
        // A reader that stopped (a corrupted byte) fails the writer too,
        // rather than leave it blocked on a full socket.
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        let start = Instant::now();
        let mut buf = vec![0u8; 16384];
        let mut writes = Writes {
            first: None,
            last: start,
        };
        loop {
            let cur = self.sent.load(Ordering::SeqCst);
            let Some(owed) = self.schedule.owed(cur) else {
                if start.elapsed() >= dur {
                    break;
                }
                self.schedule.wait();
                continue;
            };
            let n = (owed as usize).min(buf.len());
            stream::fill(0xbe, cur, &mut buf[..n]);
            s.write_all(&buf[..n])?;
            self.sent.fetch_add(n as u64, Ordering::SeqCst);
            writes.last = Instant::now();
            writes.first.get_or_insert(writes.last);
        }
        Ok((s, writes))
    }
}

/// Runs the benchmark; `tick` is called once per step (see
/// [`HandoffPlan::steps`]).
pub fn measure(plan: &HandoffPlan, tick: &dyn Fn(&str)) -> Result<HandoffFigures> {
    let counts = &plan.counts[..];
    let moves = plan.moves;
    let need = counts.iter().copied().max().unwrap_or(1) as u64 + 1024;
    let got = tcpr_host::raise_fd_limit(need)?;
    if got < need {
        bail!("tcpr bench-handoff needs {need} open files and may have only {got} (RLIMIT_NOFILE)");
    }
    let mut lab = Lab::new("bh")?;
    let c = lab.host("c", &["10.66.0.1/24"])?;
    // The whole ephemeral range for the client: a report opens over 33,000
    // connections to one service address, and b, which closes each one it
    // receives first, keeps their pairs in TIME_WAIT for a minute; a client
    // port used again within it makes b refuse that restore (EADDRINUSE,
    // rolled back). The default range (28,232 ports) wraps within a report.
    tcpr_netlab::run(
        c.cmd("sysctl")
            .args(["-qw", "net.ipv4.ip_local_port_range=1024 65535"]),
    )?;
    let a = lab.host("a", &["10.66.0.2/24", &format!("{SVC}/24")])?;
    let b = lab.host("b", &["10.66.0.3/24"])?;
    let auth = Auth::Psk(Arc::new(b"bench-handoff shared secret".to_vec()));
    let to_b = agent(&b, "10.66.0.3:7070", &auth)?;
    let to_a = agent(&a, "10.66.0.2:7070", &auth)?;
    // The batch agent: a `tcpr agent` process in b delivering over a unix
    // socket to a sink here that counts and closes.
    let dir = std::env::temp_dir().join(format!("tcpr-bench-handoff-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("psk");
    std::fs::write(&key, "bench-handoff shared secret")?;
    let sock_path = dir.join("sink.sock");
    let sink = std::os::unix::net::UnixListener::bind(&sock_path)?;
    let (sink_tx, sink_rx) = mpsc::channel();
    // The sink takes each connection and passes it on to be closed on
    // another thread, as an application hands what it accepts to its
    // workers: closed inline, its FIN was most of the sink's time per
    // connection and held the agent's acknowledgements back. It stands
    // for an application that keeps its connections, and closes them only
    // to stay within the open file limit: silently (repair mode, no FIN),
    // as a FIN each put 10,000 FIN exchanges between the hosts into the
    // measured commit, on the same cores as the handoff.
    let (to_close, closing) = mpsc::channel::<Delivered>();
    std::thread::spawn(move || {
        for d in closing {
            if let Err(e) = tcpr_engine::close_silently(d.stream.into()) {
                tracing::warn!("the bench sink closed a connection with a FIN: {e}");
            }
            let _ = sink_tx.send(());
        }
    });
    std::thread::spawn(move || {
        for s in sink.incoming() {
            let Ok(s) = s else { break };
            // Each unix connection read on a thread of its own, as it
            // comes: the agent keeps one open between batches.
            let to_close = to_close.clone();
            std::thread::spawn(move || {
                // One connection, or a batch, per message.
                let mut from = tcpr_handoff::deliver::UnixReceiver::concurrent(s);
                while let Ok(Some(ds)) = from.recv() {
                    for d in ds {
                        let _ = to_close.send(d);
                    }
                }
            });
        }
    });
    let mut batch_agent = b
        .cmd(&std::env::current_exe()?.to_string_lossy())
        .args([
            "agent",
            "--listen",
            "10.66.0.3:7071",
            "--unix",
            &sock_path.to_string_lossy(),
        ])
        .args([
            "--psk-file",
            &key.to_string_lossy(),
            "--allow",
            &format!("{SVC}:{PORT}"),
            "--timeout",
            "5",
            // The bench ends by killing it: no stand-in to log its words
            // over the bench's.
            "--stand-in",
            "0",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start the batch agent")?;
    let mut line = String::new();
    BufReader::new(batch_agent.stdout.take().expect("piped")).read_line(&mut line)?;
    let batch_auth = Auth::psk_file(&key)?;

    // The processes that move the connections live in their hosts'
    // namespaces, as `tcpr migrate` or an application calling `hand_off`
    // does (`Host::within` would start and enter a thread per call, inside
    // every measured handoff). Dropped before the lab: they hold its
    // namespaces.
    let movers = (a.worker()?, b.worker()?);
    let (first, _) = batch((&c, &a, &b), &movers.0, 1, &batch_auth, &sink_rx)?;
    let mut batches = Vec::new();
    for &n in counts {
        // Each handoff on a settled host: the previous one's aftermath
        // (closing thousands of sockets, deferred nf_tables and packet
        // socket clean-up) is not part of the next one's cost.
        let runs = (0..plan.reps(n))
            .map(|_| {
                tick(&format!("handoff: {n} connections"));
                std::thread::sleep(settle(n));
                batch((&c, &a, &b), &movers.0, n, &batch_auth, &sink_rx)
            })
            .collect::<Result<Vec<_>>>()?;
        let (totals, timings): (Vec<Duration>, Vec<Timings>) = runs.into_iter().unzip();
        batches.push(BatchRow {
            conns: n,
            total_ms: Samples::ms(&totals),
            phases_ms: phases(&timings),
        });
    }

    // One stream, moved back and forth.
    std::thread::sleep(settle(counts.iter().copied().max().unwrap_or(1)));
    let rate = 4 << 20;
    let listener = a.within(|| Ok(TcpListener::bind((SVC, PORT))?))?;
    let client = c.within(|| Ok(TcpStream::connect((SVC, PORT))?))?;
    let (server, _) = listener.accept()?;
    drop(listener);
    let stop = Arc::new(AtomicBool::new(false));
    let gap = Arc::new(Mutex::new(Duration::ZERO));
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, gap, received) = (stop.clone(), gap.clone(), received.clone());
        let mut client = client.try_clone()?;
        client.set_read_timeout(Some(Duration::from_millis(20)))?;
        std::thread::spawn(move || -> Result<()> {
            let mut buf = vec![0u8; 65536];
            let mut last = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                match client.read(&mut buf) {
                    Ok(0) => bail!("stream closed"),
                    Ok(n) => {
                        let off = received.load(Ordering::SeqCst);
                        if let Some(bad) = stream::first_mismatch(0xbe, off, &buf[..n]) {
                            bail!("byte {bad} corrupted");
                        }
                        received.fetch_add(n as u64, Ordering::SeqCst);
                        let now = Instant::now();
                        let mut g = gap.lock().unwrap_or_else(|e| e.into_inner());
                        *g = (*g).max(now - last);
                        last = now;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })
    };
    // The writer, the "application", runs on the thread kept in the host
    // that has the connection, writes there, and calls `hand_off` from
    // that same thread right after a write, as an application does; the
    // other host's thread waits meanwhile for its agent's delivery and
    // writes as soon as it has the connection. One turn per host in turn:
    // the moved window after a delivery, then the next move's unmoved
    // window, then the move.
    let writer = Arc::new(StreamWriter {
        sent: AtomicU64::new(0),
        schedule: stream::Schedule::new(rate, 0, WRITE_TICK),
        gap: gap.clone(),
        auth: auth.clone(),
        moves,
        abandoned: AtomicBool::new(false),
    });
    let to_a = Arc::new(Mutex::new(to_a));
    let to_b = Arc::new(Mutex::new(to_b));
    let turns = [
        (&movers.0, to_a, "10.66.0.3:7070".parse::<SocketAddr>()?),
        (&movers.1, to_b, "10.66.0.2:7070".parse::<SocketAddr>()?),
    ];
    let start_turn = |i: usize, first: Option<TcpStream>| {
        let (host, deliveries, to) = &turns[i % 2];
        let (w, deliveries, to) = (writer.clone(), deliveries.clone(), *to);
        host.start(move || w.turn(i, first, &deliveries, to))
    };
    let mut queued = std::collections::VecDeque::from([start_turn(0, Some(server))?]);
    let mut baseline = Vec::with_capacity(moves);
    let mut pauses = Vec::with_capacity(moves);
    let mut hand_offs = Vec::with_capacity(moves);
    let mut writer_pauses = Vec::with_capacity(moves);
    let mut last_before = None;
    let mut kept = None;
    for i in 0..=moves {
        if i < moves {
            tick(&format!("stream: move {} of {moves}", i + 1));
            // Waiting for the delivery before turn i moves the stream.
            queued.push_back(start_turn(i + 1, None)?);
        }
        let turn = queued
            .pop_front()
            .context("a queued turn")?
            .recv()
            .map_err(|_| anyhow::anyhow!("turn {i}: the host's thread is gone"))
            .and_then(|r| r);
        let turn = match turn {
            Ok(t) => t,
            Err(e) => {
                writer.abandoned.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        if let Some(m) = turn.moved {
            pauses.push(m.gap);
            if let (Some(first), Some(last)) = (m.first_write, last_before) {
                writer_pauses.push(first - last);
            }
        }
        if let Some(h) = turn.handed {
            baseline.push(h.gap);
            hand_offs.push(h.call);
            last_before = Some(h.last_write);
        }
        kept = turn.kept.or(kept);
    }
    let sent = &writer.sent;
    // Let the reader catch up, then check every byte arrived.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::SeqCst) < sent.load(Ordering::SeqCst) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let (got, total) = (received.load(Ordering::SeqCst), sent.load(Ordering::SeqCst));
    if got != total {
        bail!("the stream lost bytes: sent {total}, received {got}");
    }
    drop(kept);
    let (moved_gap_ms, unmoved_gap_ms) = (Samples::ms(&pauses), Samples::ms(&baseline));
    let p50_ratio = moved_gap_ms.median() / unmoved_gap_ms.median().max(0.001);
    let _ = batch_agent.kill();
    let _ = batch_agent.wait();
    let _ = std::fs::remove_dir_all(&dir);
    drop(movers);
    drop(lab);
    Ok(HandoffFigures {
        first_ms: first.as_secs_f64() * 1e3,
        batches,
        stream: StreamFigures {
            rate_bytes_per_s: rate,
            moved_gap_ms,
            unmoved_gap_ms,
            p50_ratio,
            hand_off_ms: Samples::ms(&hand_offs),
            writer_pause_ms: Samples::ms(&writer_pauses),
            verified_bytes: got,
        },
    })
}
