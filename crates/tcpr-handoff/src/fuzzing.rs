//! Entry points for the fuzz targets in `fuzz/` and for the test that runs
//! their seed corpora on stable Rust (`tests/fuzz_seeds.rs`). Not an API:
//! each function feeds untrusted bytes through the decoders one end of the
//! handoff uses, in the order that end uses them, and panics only when an
//! invariant of the protocol breaks.
//!
//! - [`agent_reads`]: what an authenticated sender sends an agent;
//! - [`sender_reads`]: what an agent sends back to a sender;
//! - [`psk_exchange`]: what each end reads before the peer is
//!   authenticated (raw TLS records, and the exporter MAC);
//! - [`unix_delivery`]: what an application's [`deliver::UnixReceiver`] reads.

use crate::auth::{Auth, AuthError};
use crate::deliver;
use crate::machine::{
    Agent, AgentAction, BatchStatus, ConnId, Fate, Framing, Msg, Sender, SenderAction,
    SwitchOutcome,
};
use crate::wire::{self, pb};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tcpr_image::ConnectionImage;

/// The timeout the machines are built with; the harnesses move their clock
/// past it to drive the timeout paths.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Steps after the input ran out before a machine must be done.
const STEPS_AFTER_END: usize = 8;

/// Where a connection of the agent's batch is, as its driver sees it.
#[derive(Default)]
struct AgentLedger {
    restored: BTreeSet<ConnId>,
    resumed: BTreeSet<ConnId>,
    discarded: BTreeSet<ConnId>,
}

/// The bytes an authenticated sender sends an agent on one channel
/// (frames, as `wire::read_msg` reads them): batches one after another,
/// with PINGs and QUERYs between them, as `agent::serve` takes them, each
/// batch decoded as `agent::batch_loop` decodes it and fed to a machine
/// of its own, whose actions are performed in memory. Panics when a
/// machine resumes what it did not restore, restores an id twice,
/// discards a resumed connection, or ends a batch with a restored
/// connection neither resumed nor discarded.
pub fn agent_reads(stream: &[u8]) {
    let mut input = stream;
    while let Ok(next) = wire::read_msg(&mut input) {
        match &next.kind {
            Some(pb::message::Kind::Ping(_) | pb::message::Kind::Query(_)) => continue,
            Some(pb::message::Kind::Hello(_)) => {}
            _ => return,
        }
        if !agent_batch(&mut input, next) {
            return;
        }
    }
}

/// One batch of [`agent_reads`], from its HELLO; true when it ended with
/// the channel kept for the next one.
fn agent_batch(input: &mut &[u8], first: pb::Message) -> bool {
    let hello = match &first.kind {
        Some(pb::message::Kind::Hello(h)) => h,
        _ => return false,
    };
    if !hello.take_address.is_empty() {
        let _ = hello.take_address.parse::<IpAddr>();
    }
    let Ok(hello) = wire::from_wire(first) else {
        return false;
    };
    let start = Instant::now();
    let mut now = start;
    let mut m = Agent::new(TIMEOUT, now);
    m.handle_message(hello, now);
    let mut images: BTreeMap<ConnId, bool> = BTreeMap::new();
    let mut ledger = AgentLedger::default();
    let mut input_ended = false;
    let mut steps_after_end = 0;
    loop {
        drive_agent(&mut m, &images, &mut ledger);
        if m.is_done() {
            break;
        }
        if input_ended {
            // Nothing more comes: the link is lost, then the clock runs.
            steps_after_end += 1;
            assert!(
                steps_after_end <= STEPS_AFTER_END,
                "the agent never ends a batch whose sender is gone"
            );
            m.handle_link_lost();
            now += TIMEOUT * 2;
            m.handle_timeout(now);
            // After COMMIT the machine waits for its own resume outcomes,
            // which drive_agent gives at once: done by now.
            continue;
        }
        match wire::read_msg(input) {
            Ok(msg) => {
                if let Some(pb::message::Kind::Prepare(p)) = &msg.kind {
                    for c in &p.connections {
                        images.insert(c.id, ConnectionImage::decode(&c.image).is_ok());
                    }
                }
                match wire::from_wire(msg) {
                    Ok(msg) => m.handle_message(msg, now),
                    Err(_) => m.handle_link_lost(),
                }
            }
            Err(_) => input_ended = true,
        }
    }
    drive_agent(&mut m, &images, &mut ledger);
    assert!(
        ledger.restored.is_empty(),
        "restored and then neither resumed nor discarded: {:?}",
        ledger.restored
    );
    !input_ended && m.channel_reusable()
}

/// Performs the agent machine's actions: a restore succeeds when the
/// connection's image decoded, a resume always succeeds.
fn drive_agent(m: &mut Agent, images: &BTreeMap<ConnId, bool>, ledger: &mut AgentLedger) {
    while let Some(action) = m.poll_action() {
        match action {
            AgentAction::Restore(ids) => {
                let mut outcomes = Vec::with_capacity(ids.len());
                for id in ids {
                    let known = ledger.restored.contains(&id)
                        || ledger.resumed.contains(&id)
                        || ledger.discarded.contains(&id);
                    assert!(!known, "connection {id} restored twice");
                    if images.get(&id).copied().unwrap_or(false) {
                        ledger.restored.insert(id);
                        outcomes.push((id, Ok(())));
                    } else {
                        outcomes.push((id, Err("bad image".to_string())));
                    }
                }
                m.handle_restored(outcomes);
            }
            AgentAction::Resume(ids) => {
                let mut outcomes = Vec::with_capacity(ids.len());
                for id in ids {
                    assert!(
                        ledger.restored.remove(&id),
                        "connection {id} resumed without being restored"
                    );
                    ledger.resumed.insert(id);
                    outcomes.push((id, Ok(())));
                }
                m.handle_resumed(outcomes);
            }
            AgentAction::Discard(ids) => {
                for id in ids {
                    assert!(
                        ledger.restored.remove(&id),
                        "connection {id} discarded but not held restored (resumed: {})",
                        ledger.resumed.contains(&id)
                    );
                    ledger.discarded.insert(id);
                }
            }
        }
    }
    while m.poll_transmit().is_some() {}
}

/// What the sender's driver was told to do with each connection at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SenderEnd {
    Thawed,
    Discarded,
    Held,
}

/// How the in-memory driver of [`sender_reads`] answers the machine's
/// actions, from the first byte of the input.
#[derive(Clone, Copy)]
struct SenderScript {
    dumps_fail: bool,
    switch_fails: bool,
    moves_address: bool,
    connections: u32,
}

impl SenderScript {
    fn from_byte(b: u8) -> SenderScript {
        SenderScript {
            dumps_fail: b & 1 != 0,
            switch_fails: b & 2 != 0,
            moves_address: b & 4 != 0,
            connections: u32::from(b >> 3) % 8 + 1,
        }
    }
}

/// The bytes an agent sends a sender: a first byte chooses how the
/// sender's own steps go (dumps, switch), then frames as
/// `wire::read_msg` reads them, answers to the batch and, when the
/// machine asks, the STATUS of a Query. Panics when a connection ends
/// both thawed and discarded (duplicated), ends twice, is thawed while
/// the switch is not undone, or is left without an end.
pub fn sender_reads(input: &[u8]) {
    let Some((&script, mut input)) = input.split_first() else {
        return;
    };
    let script = SenderScript::from_byte(script);
    const BATCH: u64 = 7;
    let ids: Vec<ConnId> = (0..script.connections).collect();
    let mut now = Instant::now();
    let mut m = Sender::new(BATCH, ids.clone(), TIMEOUT, Framing::default(), now);
    let mut ends: BTreeMap<ConnId, SenderEnd> = BTreeMap::new();
    let mut switched = false;
    let mut input_ended = false;
    let mut steps_after_end = 0;
    let end = |ends: &mut BTreeMap<ConnId, SenderEnd>, ids: Vec<ConnId>, how: SenderEnd| {
        for id in ids {
            if let Some(before) = ends.insert(id, how) {
                panic!("connection {id} ended {before:?}, then {how:?}");
            }
        }
    };
    loop {
        while let Some(action) = m.poll_action() {
            match action {
                SenderAction::Dump(id) => {
                    let result = if script.dumps_fail && id % 2 == 1 {
                        Err("dump failed".to_string())
                    } else {
                        Ok(100)
                    };
                    m.handle_dumped(id, result, now);
                }
                SenderAction::Switch(_) => {
                    switched = true;
                    let outcome = if script.switch_fails {
                        SwitchOutcome::Failed("switch failed".into())
                    } else {
                        SwitchOutcome::Switched {
                            moved_address: script.moves_address.then_some(
                                crate::machine::ServiceAddress {
                                    ip: [10, 0, 0, 100].into(),
                                    prefix_len: 24,
                                },
                            ),
                        }
                    };
                    m.handle_switched(outcome, now);
                }
                SenderAction::Unswitch => switched = false,
                SenderAction::Thaw(ids) => {
                    assert!(!switched, "thawed {ids:?} while the switch stands");
                    end(&mut ends, ids, SenderEnd::Thawed);
                }
                SenderAction::Discard(ids) => end(&mut ends, ids, SenderEnd::Discarded),
                SenderAction::Hold(ids) => end(&mut ends, ids, SenderEnd::Held),
                SenderAction::Query => {
                    // A new channel: its first frame answers, or nothing does.
                    let status = match wire::read_msg(&mut input).map(|m| m.kind) {
                        Ok(Some(pb::message::Kind::Status(s))) if s.batch == BATCH => {
                            Ok(wire::status_from_wire(s))
                        }
                        Ok(_) => Err("the agent answered QUERY with something else".into()),
                        Err(e) => Err(e.to_string()),
                    };
                    m.handle_status(status);
                }
            }
        }
        while m.poll_transmit().is_some() {}
        if m.is_done() {
            break;
        }
        if input_ended {
            steps_after_end += 1;
            assert!(
                steps_after_end <= STEPS_AFTER_END,
                "the sender never ends a batch whose agent is gone"
            );
            m.handle_link_lost(now);
            now += TIMEOUT * 2;
            m.handle_timeout(now);
            continue;
        }
        match wire::read_msg(&mut input) {
            Ok(msg) => match wire::from_wire(msg) {
                Ok(msg) => m.handle_message(msg, now),
                Err(_) => m.handle_link_lost(now),
            },
            Err(_) => input_ended = true,
        }
    }
    // The driver did to each connection what its fate says, once.
    let all: BTreeSet<ConnId> = ids.into_iter().collect();
    assert_eq!(
        m.fates().keys().copied().collect::<BTreeSet<_>>(),
        all,
        "every connection has a fate"
    );
    for (id, fate) in m.fates() {
        let expected = match fate {
            Fate::Moved => SenderEnd::Discarded,
            Fate::RolledBack(_) => SenderEnd::Thawed,
            Fate::Unknown(_) => SenderEnd::Held,
        };
        assert_eq!(ends.get(id), Some(&expected), "connection {id}: {fate:?}");
    }
}

/// Which side of the pre-shared-key exchange [`psk_exchange`] plays.
#[derive(Clone, Copy)]
enum PskSide {
    /// Raw bytes to the agent's TLS server, before any handshake.
    AgentBeforeTls,
    /// A client completes TLS and sends these bytes as its MAC.
    AgentReadsMac,
    /// An agent completes TLS, reads the client's MAC, and answers these.
    SenderReadsMac,
}

struct PskConfigs {
    auth: Auth,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn psk_configs() -> &'static PskConfigs {
    static CONFIGS: OnceLock<PskConfigs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let auth = Auth::Psk(Arc::new(b"fuzzing-pre-shared-key".to_vec()));
        PskConfigs {
            server: auth.server_config().expect("a PSK server config"),
            client: auth.client_config().expect("a PSK client config"),
            auth,
        }
    })
}

/// The bytes a peer sends before it is authenticated, over loopback TCP
/// and real TLS: the first byte chooses the side (see [`PskSide`]).
/// Panics when any such input authenticates: without the key there is no
/// way to compute the MAC over this session's exporter.
pub fn psk_exchange(input: &[u8]) {
    let Some((&side, bytes)) = input.split_first() else {
        return;
    };
    let side = match side % 3 {
        0 => PskSide::AgentBeforeTls,
        1 => PskSide::AgentReadsMac,
        _ => PskSide::SenderReadsMac,
    };
    let cfg = psk_configs();
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let addr = listener.local_addr().expect("its address");
    let bytes = bytes.to_vec();
    let peer_listener = listener.try_clone().expect("a listener handle");
    // The peer under the fuzzer's control runs on its own thread.
    let peer = std::thread::spawn(move || -> Option<()> {
        match side {
            PskSide::AgentBeforeTls => {
                let mut tcp = TcpStream::connect(addr).ok()?;
                tcp.write_all(&bytes).ok()?;
                tcp.shutdown(Shutdown::Write).ok()?;
                drain(tcp);
            }
            PskSide::AgentReadsMac => {
                let tcp = TcpStream::connect(addr).ok()?;
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let conn = rustls::ClientConnection::new(cfg.client.clone(), name).ok()?;
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                while tls.conn.is_handshaking() {
                    tls.conn.complete_io(&mut tls.sock).ok()?;
                }
                tls.write_all(&bytes).ok()?;
                tls.conn.send_close_notify();
                tls.flush().ok()?;
                tls.sock.shutdown(Shutdown::Write).ok()?;
                drain(tls.sock);
            }
            PskSide::SenderReadsMac => {
                let (tcp, _) = peer_listener.accept().ok()?;
                let conn = rustls::ServerConnection::new(cfg.server.clone()).ok()?;
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                while tls.conn.is_handshaking() {
                    tls.conn.complete_io(&mut tls.sock).ok()?;
                }
                let mut theirs = [0u8; 32];
                tls.read_exact(&mut theirs).ok()?;
                tls.write_all(&bytes).ok()?;
                tls.conn.send_close_notify();
                tls.flush().ok()?;
                tls.sock.shutdown(Shutdown::Write).ok()?;
                drain(tls.sock);
            }
        }
        Some(())
    });
    let result: Result<_, AuthError> = match side {
        PskSide::AgentBeforeTls | PskSide::AgentReadsMac => {
            let (tcp, _) = listener.accept().expect("the fuzzing client connects");
            let deadline = Instant::now() + TIMEOUT;
            cfg.auth
                .accept_until(cfg.server.clone(), tcp, Some(deadline))
        }
        PskSide::SenderReadsMac => {
            let tcp = TcpStream::connect(addr).expect("the fuzzing agent listens");
            tcp.set_read_timeout(Some(TIMEOUT)).expect("a timeout");
            cfg.auth.connect(cfg.client.clone(), addr.ip(), tcp)
        }
    };
    let authenticated = result.is_ok();
    drop(result);
    let _ = peer.join();
    assert!(!authenticated, "a peer without the key authenticated");
}

/// Reads until the other end closes, so that the fuzzed end's writes
/// never meet a closed socket.
fn drain(mut tcp: TcpStream) {
    let _ = tcp.set_read_timeout(Some(TIMEOUT));
    let mut sink = Vec::new();
    let _ = tcp.read_to_end(&mut sink);
}

/// Largest input [`unix_delivery`] sends: it writes before the receiver
/// reads, so the whole input must fit in the socket's buffer.
const UNIX_INPUT_MAX: usize = 64 << 10;

/// The bytes an application reads from the agent's `--unix` socket, with
/// a file descriptor attached to the first byte as the agent attaches the
/// connection, read by [`deliver::UnixReceiver`] (one-connection and
/// batch messages) until it ends or fails.
pub fn unix_delivery(input: &[u8]) {
    let input = &input[..input.len().min(UNIX_INPUT_MAX)];
    let (agent, application) = UnixStream::pair().expect("a socket pair");
    if !input.is_empty() {
        let attached = std::fs::File::open("/dev/null").expect("/dev/null");
        tcpr_host::send_with_fd(agent.as_fd(), input, attached.as_fd())
            .expect("the input fits the socket buffer");
    }
    agent.shutdown(Shutdown::Write).expect("shutdown");
    // Each message is answered by one or two bytes; the agent end stays
    // open so that the answer never meets a closed socket.
    let mut application = deliver::UnixReceiver::new(application);
    while let Ok(Some(delivered)) = application.recv() {
        drop(delivered);
    }
}

/// The status answer a Query gets, for seeds.
pub fn status_frame(batch: u64, status: &BatchStatus) -> Vec<u8> {
    let mut out = vec![];
    wire::write_msg(
        &mut out,
        &pb::Message {
            kind: Some(pb::message::Kind::Status(wire::status_to_wire(
                batch, status,
            ))),
        },
    )
    .expect("a status frame");
    out
}

/// One machine message as a frame, for seeds.
pub fn frame(msg: &Msg) -> Vec<u8> {
    let mut out = vec![];
    wire::write_msg(&mut out, &wire::to_wire(msg)).expect("a frame");
    out
}

/// A PREPARE frame carrying these images, for seeds.
pub fn prepare_frame(conns: &[(ConnId, &[u8])]) -> Vec<u8> {
    let mut out = vec![];
    wire::write_prepare(&mut out, conns).expect("a PREPARE frame");
    out
}

/// A unix delivery message as [`deliver::send_unix`] sends it (captured
/// from a socket pair), for seeds.
pub fn unix_message(
    local: std::net::SocketAddr,
    peer: std::net::SocketAddr,
    blob: &[u8],
) -> Vec<u8> {
    let (agent, application) = UnixStream::pair().expect("a socket pair");
    let connection: std::os::fd::OwnedFd =
        std::fs::File::open("/dev/null").expect("/dev/null").into();
    let blob = blob.to_vec();
    let sender =
        std::thread::spawn(move || deliver::send_unix(&agent, &connection, &blob, local, peer));
    let mut message = vec![0u8; UNIX_INPUT_MAX];
    let (n, _fd) = tcpr_host::recv_with_fd(application.as_fd(), &mut message).expect("the message");
    message.truncate(n);
    (&application).write_all(b"k").expect("the acknowledgement");
    sender.join().expect("the sender").expect("sent");
    message
}
