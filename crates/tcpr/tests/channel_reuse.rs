//! One channel from a sender to an agent carries batch after batch: two
//! handoffs in a row use one TCP connection to the agent; a killed and
//! restarted agent, or one that closed an idle channel, costs the next
//! handoff nothing but a new channel; concurrent handoffs to one agent
//! each get a channel of their own. Hosts are network namespaces; every
//! moved connection carries bytes both ways before and after its move,
//! each checked.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::Duration;
use tcpr_handoff::agent::Stats;
use tcpr_handoff::{
    AgentConfig, AgentServer, Auth, Delivered, Delivery, MigrateOptions, Outgoing, Report, Switch,
};
use tcpr_netlab::{Host, Lab};

/// Bytes each side sends per round.
const CHUNK: usize = 32 * 1024;
/// The agent's port.
const AGENT_PORT: u16 = 7070;
/// The service port of every moved connection.
const SERVICE_PORT: u16 = 9000;
/// How long a moved connection may take to be delivered.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// `round`'s bytes from one end of connection `conn`.
fn pattern(round: u8, conn: usize, from_client: bool) -> Vec<u8> {
    let seed = ((conn as u32) << 9) | (u32::from(round) << 1) | u32::from(from_client);
    (0..CHUNK as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// One round on a connection: the client sends its chunk, the server
/// checks it and answers with its own, the client checks that.
fn exchange(client: &mut TcpStream, server: &mut TcpStream, round: u8, conn: usize) {
    let timeout = Some(Duration::from_secs(20));
    client.set_read_timeout(timeout).unwrap();
    server.set_read_timeout(timeout).unwrap();
    client.write_all(&pattern(round, conn, true)).unwrap();
    let mut got = vec![0u8; CHUNK];
    server
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("connection {conn}, round {round}, at the server: {e}"));
    assert!(
        got == pattern(round, conn, true),
        "connection {conn}, round {round}: the server read other bytes"
    );
    server.write_all(&pattern(round, conn, false)).unwrap();
    client
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("connection {conn}, round {round}, at the client: {e}"));
    assert!(
        got == pattern(round, conn, false),
        "connection {conn}, round {round}: the client read other bytes"
    );
}

fn auth(dir: &std::path::Path) -> Auth {
    let key = dir.join("psk");
    std::fs::write(&key, "a shared secret for the channel reuse tests\n").unwrap();
    Auth::psk_file(&key).unwrap()
}

/// c (clients) at .1, a (the sender) at .2 with service addresses .100
/// and up, b (the agent) at .3, on 10.`net`.0.0/24.
struct Net {
    _lab: Lab,
    c: Host,
    a: Host,
    b: Host,
    net: u8,
    dir: std::path::PathBuf,
}

impl Net {
    fn new(tag: &str, net: u8, services: u8) -> Net {
        let mut lab = Lab::new(tag).unwrap();
        let c = lab.host("c", &[&format!("10.{net}.0.1/24")]).unwrap();
        let mut a_addrs = vec![format!("10.{net}.0.2/24")];
        a_addrs.extend((0..services).map(|i| format!("10.{net}.0.{}/24", 100 + i)));
        let a_addrs: Vec<&str> = a_addrs.iter().map(String::as_str).collect();
        let a = lab.host("a", &a_addrs).unwrap();
        let b = lab.host("b", &[&format!("10.{net}.0.3/24")]).unwrap();
        Net {
            _lab: lab,
            c,
            a,
            b,
            net,
            dir: tmpdir(tag),
        }
    }
    fn agent_addr(&self) -> SocketAddr {
        SocketAddr::from(([10, self.net, 0, 3], AGENT_PORT))
    }
    /// The `i`th service address (on a until a batch moves it).
    fn service(&self, i: u8) -> SocketAddr {
        SocketAddr::from(([10, self.net, 0, 100 + i], SERVICE_PORT))
    }
    fn allow(&self, services: u8) -> Vec<SocketAddr> {
        (0..services).map(|i| self.service(i)).collect()
    }

    /// `n` connections from c to service `i`, each checked once (round 0).
    fn connections(&self, i: u8, n: usize) -> Vec<Pair> {
        let service = self.service(i);
        let listener = self.a.within(|| Ok(TcpListener::bind(service)?)).unwrap();
        let clients = self
            .c
            .within(|| {
                (0..n)
                    .map(|_| Ok(TcpStream::connect(service)?))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .unwrap();
        let mut pairs: Vec<Pair> = clients
            .into_iter()
            .map(|client| Pair {
                server: listener.accept().unwrap().0,
                client,
            })
            .collect();
        for (conn, p) in pairs.iter_mut().enumerate() {
            exchange(&mut p.client, &mut p.server, 0, conn);
        }
        pairs
    }

    /// Hands the server ends of `pairs` (on service `i`) to the agent from
    /// a, moving the service address with them.
    fn hand_off(&self, pairs: &[Pair], auth: &Auth) -> Report {
        let conns = pairs
            .iter()
            .map(|p| Outgoing::new(p.server.try_clone().unwrap().into(), vec![]))
            .collect();
        let mut opts = MigrateOptions::new(self.agent_addr(), auth.clone());
        opts.switch = Switch::MoveAddress;
        self.a
            .within(|| Ok(tcpr_handoff::migrate(conns, &opts, &|_| {})?))
            .unwrap()
    }

    /// The TCP connections from a to the agent, by a's local port.
    fn channels_from_a(&self, state: &str) -> BTreeSet<u16> {
        let out = self
            .a
            .cmd("ss")
            .args(["-Htn", "state", state])
            .arg(format!("( dport = :{AGENT_PORT} )"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .filter_map(|local| local.rsplit_once(':'))
            .map(|(_, port)| port.parse().unwrap())
            .collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Both ends of a connection while it is at the sender.
struct Pair {
    client: TcpStream,
    server: TcpStream,
}

/// Checks that a batch moved every connection of `pairs`, each exactly
/// once (one delivery each, no more), and that each carries round 1
/// both ways at its new home; the source keeps no copy.
fn moved_and_verified(
    net: &Net,
    report: &Report,
    pairs: Vec<Pair>,
    delivered: &Receiver<Delivered>,
) {
    assert!(
        report.all_moved() && report.moved.len() == pairs.len(),
        "moved {} of {}: rolled back {:?}, unknown {:?}",
        report.moved.len(),
        pairs.len(),
        report
            .rolled_back
            .iter()
            .map(|r| &r.why)
            .collect::<Vec<_>>(),
        report.unknown.iter().map(|u| &u.why).collect::<Vec<_>>()
    );
    let mut at_agent: Vec<Delivered> = (0..pairs.len())
        .map(|_| delivered.recv_timeout(DELIVERY_TIMEOUT).unwrap())
        .collect();
    // Delivered before COMMITTED: nothing more can come for this batch.
    assert!(
        delivered.try_recv().is_err(),
        "a connection delivered twice"
    );
    for (conn, p) in pairs.into_iter().enumerate() {
        let Pair { mut client, server } = p;
        let here = client.local_addr().unwrap();
        let i = at_agent
            .iter()
            .position(|d| d.peer == here)
            .unwrap_or_else(|| panic!("connection {conn} ({here}) was not delivered"));
        let mut moved = at_agent.swap_remove(i);
        // The sender's copy is gone: it was closed in repair mode.
        drop(server);
        exchange(&mut client, &mut moved.stream, 1, conn);
    }
    assert_eq!(locked(&net.a), 0, "the source locks are released");
}

/// An agent of the library, in b, delivering into this process; it runs
/// until the test process ends.
struct LibraryAgent {
    server: Arc<AgentServer>,
    delivered: Receiver<Delivered>,
}

impl LibraryAgent {
    fn start(net: &Net, auth: &Auth, services: u8, idle_timeout: Option<Duration>) -> LibraryAgent {
        let (tx, delivered) = mpsc::channel();
        let mut cfg = AgentConfig::new(auth.clone(), net.allow(services), Delivery::Channel(tx));
        cfg.timeout = Duration::from_secs(5);
        cfg.journal = Some(net.dir.join("journal"));
        if let Some(t) = idle_timeout {
            cfg.idle_timeout = t;
        }
        let listen = net.agent_addr();
        let path = net.b.path();
        let (up_tx, up) = mpsc::channel();
        std::thread::spawn(move || {
            let bound = tcpr_host::enter_netns(&path)
                .map_err(anyhow::Error::from)
                .and_then(|()| Ok(Arc::new(AgentServer::bind(listen, cfg)?)));
            match bound {
                Ok(server) => {
                    up_tx.send(Ok(server.clone())).unwrap();
                    let _ = server.run();
                }
                Err(e) => up_tx.send(Err(e)).unwrap(),
            }
        });
        LibraryAgent {
            server: up.recv().unwrap().unwrap(),
            delivered,
        }
    }
    fn stats(&self) -> Stats {
        self.server.stats()
    }
}

/// Two handoffs in a row to one agent: the second runs on the first's
/// channel, the one TCP connection from a to the agent (before, each
/// batch connected and shook hands anew, and the agent closed the
/// channel after its batch).
#[test]
fn consecutive_handoffs_share_one_channel() {
    let net = Net::new("cr", 41, 2);
    let auth = auth(&net.dir);
    let agent = LibraryAgent::start(&net, &auth, 2, None);

    let pairs = net.connections(0, 3);
    let first = net.hand_off(&pairs, &auth);
    moved_and_verified(&net, &first, pairs, &agent.delivered);
    assert!(!first.channel_reused, "the first batch connects");
    let kept = net.channels_from_a("established");
    assert_eq!(kept.len(), 1, "the channel stays open after its batch");

    let pairs = net.connections(1, 2);
    let second = net.hand_off(&pairs, &auth);
    moved_and_verified(&net, &second, pairs, &agent.delivered);
    assert!(second.channel_reused, "the second batch reuses the channel");
    assert_eq!(
        net.channels_from_a("established"),
        kept,
        "still the one connection, from the same port"
    );
    let stats = agent.stats();
    assert_eq!((stats.channels, stats.batches), (1, 2), "{stats:?}");
}

/// The agent is killed (SIGKILL) between two batches and started again:
/// the channel kept from the first batch is dead, the next batch finds
/// that before freezing anything and connects to the new agent, and every
/// connection of it moves exactly once.
#[test]
fn a_restarted_agent_costs_a_new_channel_and_nothing_else() {
    let net = Net::new("ck", 42, 3);
    let auth = auth(&net.dir);
    let unix = net.dir.join("delivered.sock");
    let delivered = unix_receiver(&unix);
    let start_agent = || cli_agent(&net, &unix, &[]);

    let mut agent = start_agent();
    let pairs = net.connections(0, 3);
    let first = net.hand_off(&pairs, &auth);
    moved_and_verified(&net, &first, pairs, &delivered);
    assert_eq!(net.channels_from_a("established").len(), 1);

    agent.kill();
    // The kept channel has seen the agent's end (its FIN) at a.
    wait_until(
        "the kept channel sees its end",
        Duration::from_secs(10),
        || net.channels_from_a("close-wait").len() == 1,
    );
    let _agent = start_agent();

    let pairs = net.connections(1, 4);
    let second = net.hand_off(&pairs, &auth);
    moved_and_verified(&net, &second, pairs, &delivered);
    assert!(!second.channel_reused, "a dead channel is never used");
    assert!(
        net.channels_from_a("close-wait").is_empty(),
        "the dead channel is closed"
    );

    // The new agent's channel is kept in turn.
    let pairs = net.connections(2, 2);
    let third = net.hand_off(&pairs, &auth);
    moved_and_verified(&net, &third, pairs, &delivered);
    assert!(third.channel_reused);
}

/// Takes the connections an agent delivers on the unix socket `path`, on a
/// thread of its own.
fn unix_receiver(path: &std::path::Path) -> mpsc::Receiver<tcpr_handoff::Delivered> {
    let receiver = tcpr_handoff::LocalIncoming::bind(path).unwrap();
    let (tx, delivered) = mpsc::channel();
    std::thread::spawn(move || {
        while let Some(d) = receiver.accept() {
            if tx.send(d).is_err() {
                break;
            }
        }
    });
    delivered
}

/// A `tcpr agent` process on host b delivering to `unix`, with `extra`
/// arguments.
fn cli_agent(net: &Net, unix: &std::path::Path, extra: &[&str]) -> Proc {
    let mut cmd = net.b.cmd(tcpr_bin());
    cmd.args(["agent", "--listen", &net.agent_addr().to_string()])
        .args(["--psk-file", net.dir.join("psk").to_str().unwrap()])
        .args(["--unix", unix.to_str().unwrap()])
        .args(["--journal", net.dir.join("journal").to_str().unwrap()])
        .args(extra);
    for service in net.allow(3) {
        cmd.args(["--allow", &service.to_string()]);
    }
    let mut agent = Proc::spawn(cmd, "agent");
    agent.expect("tcpr agent listening", Duration::from_secs(10));
    agent
}

/// `tcpr agent --max-idle-channels 0` keeps no channel between batches:
/// the sender's next batch finds its kept channel ended, connects anew and
/// moves everything; a bad `--idle-timeout` is refused before listening.
#[test]
fn an_agent_told_to_keep_no_channel_closes_each_after_its_batch() {
    let net = Net::new("cz", 43, 3);
    let auth = auth(&net.dir);
    let unix = net.dir.join("delivered.sock");
    let delivered = unix_receiver(&unix);
    let bad = net
        .b
        .cmd(tcpr_bin())
        .args(["agent", "--listen", &net.agent_addr().to_string()])
        .args(["--psk-file", net.dir.join("psk").to_str().unwrap()])
        .args(["--unix", unix.to_str().unwrap(), "--idle-timeout", "soon"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let why = String::from_utf8_lossy(&bad.stderr);
    assert!(
        why.contains("--idle-timeout") && why.contains("soon"),
        "{why}"
    );

    let _agent = cli_agent(&net, &unix, &["--max-idle-channels", "0"]);
    let pairs = net.connections(0, 2);
    let first = net.hand_off(&pairs, &auth);
    moved_and_verified(&net, &first, pairs, &delivered);
    let pairs = net.connections(1, 2);
    let second = net.hand_off(&pairs, &auth);
    moved_and_verified(&net, &second, pairs, &delivered);
    assert!(!second.channel_reused, "the agent kept no channel");
}

/// The agent closes a channel idle past its idle timeout; the sender's
/// next batch, which still holds it, connects anew and moves everything.
#[test]
fn a_channel_closed_for_idleness_is_replaced() {
    let net = Net::new("ci", 43, 2);
    let auth = auth(&net.dir);
    let agent = LibraryAgent::start(&net, &auth, 2, Some(Duration::from_millis(300)));

    let pairs = net.connections(0, 2);
    let first = net.hand_off(&pairs, &auth);
    moved_and_verified(&net, &first, pairs, &agent.delivered);
    wait_until(
        "the agent closes the idle channel",
        Duration::from_secs(10),
        || agent.stats().idle_closed == 1,
    );

    let pairs = net.connections(1, 2);
    let second = net.hand_off(&pairs, &auth);
    moved_and_verified(&net, &second, pairs, &agent.delivered);
    assert!(!second.channel_reused);
    let stats = agent.stats();
    assert_eq!((stats.channels, stats.batches), (2, 2), "{stats:?}");
}

/// Handoffs from several threads at once to one agent, after one that
/// left a channel behind: each batch runs on a channel of its own (one
/// taken from the pool, or a new one), and all of them move everything.
#[test]
fn concurrent_handoffs_each_get_a_channel() {
    const THREADS: u8 = 4;
    let net = Net::new("cc", 44, THREADS + 1);
    let auth = auth(&net.dir);
    let agent = LibraryAgent::start(&net, &auth, THREADS + 1, None);

    let pairs = net.connections(THREADS, 2);
    let warm = net.hand_off(&pairs, &auth);
    moved_and_verified(&net, &warm, pairs, &agent.delivered);

    let batches: Vec<Vec<Pair>> = (0..THREADS).map(|i| net.connections(i, 3)).collect();
    let start = std::sync::Barrier::new(usize::from(THREADS));
    let reports: Vec<Report> = std::thread::scope(|s| {
        let handles: Vec<_> = batches
            .iter()
            .map(|pairs| {
                let (net, auth, start) = (&net, &auth, &start);
                s.spawn(move || {
                    start.wait();
                    net.hand_off(pairs, auth)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The deliveries of all batches arrive mixed: take them all, then
    // give each batch its own.
    let total: usize = batches.iter().map(Vec::len).sum();
    let all: Vec<Delivered> = (0..total)
        .map(|_| agent.delivered.recv_timeout(DELIVERY_TIMEOUT).unwrap())
        .collect();
    let (per_batch_tx, per_batch): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| mpsc::channel()).unzip();
    for d in all {
        let batch = batches
            .iter()
            .position(|pairs| {
                pairs
                    .iter()
                    .any(|p| p.client.local_addr().unwrap() == d.peer)
            })
            .expect("a delivery of one of the batches");
        per_batch_tx[batch].send(d).unwrap();
    }
    for ((pairs, report), delivered) in batches.into_iter().zip(&reports).zip(&per_batch) {
        moved_and_verified(&net, report, pairs, delivered);
    }
    assert!(agent.delivered.try_recv().is_err());
    // Every batch that did not reuse a channel opened exactly one.
    let opened = 1 + reports.iter().filter(|r| !r.channel_reused).count() as u64;
    let stats = agent.stats();
    assert_eq!(stats.channels, opened, "{stats:?}");
    assert_eq!(stats.batches, u64::from(THREADS) + 1, "{stats:?}");
}

/// The channel kept from a batch dies without a word less than a second
/// after the batch (here b answers its next packet with a RST, as a host
/// that rebooted would), so the next batch takes it without a PING: its
/// HELLO (written before the freeze) or its PREPARE draws the RST, and
/// the batch, rolled back before the agent answered anything (or refused
/// before any freeze), runs again on a new, checked channel.
/// Every connection moves exactly once and the report says it ran twice.
/// (A channel that goes silent instead costs the batch: it is rolled back
/// when the agent's answer times out, as ARCHITECTURE.md says.)
#[test]
fn a_silently_dead_kept_channel_costs_a_second_run_on_a_new_one() {
    let net = Net::new("cd", 45, 2);
    let auth = auth(&net.dir);
    let agent = LibraryAgent::start(&net, &auth, 2, None);
    // The second batch's connections exist before the first moves: the
    // second must start within a second of the first's end.
    let second_pairs = net.connections(1, 3);
    let pairs = net.connections(0, 2);
    let first = net.hand_off(&pairs, &auth);
    moved_and_verified(&net, &first, pairs, &agent.delivered);
    assert!(!first.dead_channel_retried);
    let kept = net.channels_from_a("established");
    let &[port] = kept.iter().copied().collect::<Vec<_>>().as_slice() else {
        panic!("one kept channel, not {kept:?}");
    };
    for rule in [
        "add table inet chaos".to_string(),
        "add chain inet chaos in { type filter hook input priority -10; }".to_string(),
        format!(
            "add rule inet chaos in tcp sport {port} tcp dport {AGENT_PORT} reject with tcp reset"
        ),
    ] {
        let out = net
            .b
            .cmd("nft")
            .args(rule.split_whitespace())
            .output()
            .unwrap();
        assert!(out.status.success(), "nft {rule}: {out:?}");
    }

    let second = net.hand_off(&second_pairs, &auth);
    assert!(
        second.dead_channel_retried,
        "the batch ran once only: reused {}, moved {}, rolled back {:?}",
        second.channel_reused,
        second.moved.len(),
        second
            .rolled_back
            .iter()
            .map(|r| &r.why)
            .collect::<Vec<_>>()
    );
    assert!(!second.channel_reused, "the second run connects anew");
    moved_and_verified(&net, &second, second_pairs, &agent.delivered);
    let stats = agent.stats();
    assert_eq!(
        (stats.channels, stats.batches),
        (2, 2),
        "the dead channel's batch never reached the agent: {stats:?}"
    );
}
