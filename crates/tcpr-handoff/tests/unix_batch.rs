//! Batches delivered over a unix socket to applications that read it in
//! two ways; every connection moves and carries on.
//!
//! - A batch larger than a unix receiver's listen backlog, delivered to an
//!   application that takes one connection at a time (as
//!   `deliver::recv_unix` clients do). The agent once connected a unix
//!   socket per connection for the whole batch before delivering any,
//!   which filled the receiver's backlog and stalled the batch past the
//!   sender's timeout (every connection `unknown`).
//! - A receiver that takes batches (`deliver::UnixReceiver`) gets more
//!   connections than one message carries, in messages of at most
//!   `deliver::BATCH_MAX`, every one working.
//! - A receiver that dies in the middle of a batch: the connections it
//!   acknowledged move, every other is reported not moved (none lost
//!   silently).
//! - An agent that keeps a journal holds its lock on the restored flows
//!   until their resume: a batch message's quiet connections are resumed
//!   under it and released together right before the message goes; every
//!   one carries on, and no flow stays locked.
//! - Unix delivery to one-at-a-time receivers is pipelined: a receiver that accepts a whole batch's
//!   unix connections before reading any message gets every connection.
//!   The agent once waited for each acknowledgement before connecting for
//!   the next connection, so such a receiver waited on an accept that
//!   never came, and the first connection's acknowledgement timed out.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::time::Duration;
use tcpr_handoff::{deliver, Delivered, Switch};
use tcpr_handoff::{hand_off, AgentConfig, Auth, Delivery, HandOff, MigrateOptions};
use tcpr_netlab::Lab;

mod common;

/// More than the receiver's unix listen backlog (`net.core.somaxconn` of
/// its namespace, set below), so an agent that connects ahead of
/// delivering blocks on a full backlog.
const CONNECTIONS: usize = 300;
const UNIX_BACKLOG: usize = 64;
/// Fewer than the agent keeps unacknowledged.
const PIPELINED_CONNECTIONS: usize = 8;
const CHUNK: usize = 4096;

fn auth() -> Auth {
    Auth::Psk(std::sync::Arc::new(b"unix batch test shared key".to_vec()))
}

/// Where the application listens, and how it reads its unix socket.
struct Receiver {
    /// The namespace's `net.core.somaxconn` when it binds, if set.
    unix_backlog: Option<usize>,
    /// The agent keeps a journal (and so locks the flows it restores).
    journal: bool,
    /// Takes the listener and sends every connection delivered on it.
    receive: Box<dyn FnOnce(UnixListener, mpsc::Sender<Delivered>) + Send>,
}

/// Moves `connections` connections from host a to an agent on host b
/// (network `10.N.0.0/24`) that delivers them over a unix socket to
/// `receiver`; each delivered connection echoes one chunk, which its
/// client on host c checks byte for byte. Every connection must move.
fn batch_to_unix_receiver(name: &str, net: u8, connections: usize, receiver: Receiver) {
    hand_off_to_unix_receiver(name, net, connections, receiver, |outcomes| {
        let moved = outcomes
            .iter()
            .filter(|o| matches!(o, HandOff::Moved))
            .count();
        let first_other = outcomes.iter().find(|o| !matches!(o, HandOff::Moved));
        assert_eq!(
            moved, connections,
            "every connection moves; the first other: {first_other:?}"
        );
    });
}

/// [`batch_to_unix_receiver`] with the outcomes judged by `check`; the
/// connections reported moved are the ones whose echo is checked.
fn hand_off_to_unix_receiver(
    name: &str,
    net: u8,
    connections: usize,
    receiver: Receiver,
    check: impl FnOnce(&[HandOff]),
) {
    let mut lab = Lab::new(name).unwrap();
    let addr = |host: u8| format!("10.{net}.0.{host}");
    let c = lab.host("c", &[&format!("{}/24", addr(1))]).unwrap();
    let a = lab
        .host(
            "a",
            &[&format!("{}/24", addr(2)), &format!("{}/24", addr(100))],
        )
        .unwrap();
    let b = lab.host("b", &[&format!("{}/24", addr(3))]).unwrap();
    let service: SocketAddr = format!("{}:8080", addr(100)).parse().unwrap();
    let agent_addr: SocketAddr = format!("{}:7070", addr(3)).parse().unwrap();

    let dir = std::env::temp_dir().join(format!("tcpr-unix-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app.sock");
    if let Some(backlog) = receiver.unix_backlog {
        // The listen backlog is capped by the namespace's somaxconn when
        // the listener is made: make it in b, with a small one.
        let sysctl = b
            .cmd("sysctl")
            .args(["-q", "-w", &format!("net.core.somaxconn={backlog}")])
            .status()
            .unwrap();
        assert!(sysctl.success(), "set somaxconn in b");
    }
    let app_path = path.clone();
    let app = b
        .within(move || Ok(UnixListener::bind(&app_path)?))
        .unwrap();
    let (delivered_tx, delivered_rx) = mpsc::channel::<Delivered>();
    std::thread::spawn(move || (receiver.receive)(app, delivered_tx));
    // Each delivered connection echoes one chunk on a thread of its own.
    let echoed_rx = common::echo_each(delivered_rx, CHUNK);

    // The agent on b, delivering over the unix socket.
    let mut cfg = AgentConfig::new(auth(), vec![service], Delivery::Unix(path.clone()));
    cfg.timeout = Duration::from_secs(2);
    cfg.journal = receiver.journal.then(|| dir.join("journal"));
    common::run_agent(&b, agent_addr, cfg);

    // The service on a, and its clients on c: connected while a accepts.
    let listener = a.within(|| Ok(TcpListener::bind(service)?)).unwrap();
    let (go_tx, go_rx) = mpsc::channel::<Vec<usize>>();
    let client =
        std::thread::spawn(move || common::echo_clients(&c, service, connections, CHUNK, go_rx));
    let conns: Vec<(TcpStream, Vec<u8>)> = (0..connections)
        .map(|_| (listener.accept().unwrap().0, b"state".to_vec()))
        .collect();
    drop(listener);
    let outcomes = a
        .within(move || {
            let mut opts = MigrateOptions::new(agent_addr, auth());
            opts.switch = Switch::MoveAddress;
            hand_off(conns, &opts).map_err(|e| anyhow::anyhow!("{e}"))
        })
        .unwrap();
    check(&outcomes);
    let moved: Vec<usize> = (0..connections)
        .filter(|&i| matches!(outcomes[i], HandOff::Moved))
        .collect();
    let count = moved.len();
    go_tx.send(moved).unwrap();
    client.join().unwrap().unwrap();
    for i in 0..count {
        let echoed = echoed_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("delivered connection {i} of {count}: {e}"));
        assert_eq!(echoed, Ok(()), "a delivered connection echoed its chunk");
    }
    let locked = b
        .within(|| Ok(tcpr_engine::lock::locked_flow_count()?))
        .unwrap();
    assert_eq!(locked, 0, "no flow stays locked on the agent's host");
    let _ = std::fs::remove_dir_all(&dir);
    drop(lab);
}

#[test]
fn a_batch_larger_than_the_unix_backlog_reaches_a_one_at_a_time_receiver() {
    const { assert!(CONNECTIONS > UNIX_BACKLOG) };
    let receiver = Receiver {
        unix_backlog: Some(UNIX_BACKLOG),
        journal: false,
        receive: Box::new(|app, delivered| {
            for s in app.incoming() {
                let Ok(mut s) = s else { break };
                // The agent's probes carry nothing.
                if let Ok(Some(d)) = deliver::recv_unix(&mut s) {
                    let _ = delivered.send(d);
                }
            }
        }),
    };
    batch_to_unix_receiver("ub", 93, CONNECTIONS, receiver);
}

#[test]
fn a_receiver_that_accepts_the_whole_batch_before_reading_gets_every_connection() {
    let receiver = Receiver {
        unix_backlog: None,
        journal: false,
        receive: Box::new(|app, delivered| {
            let mut got = 0;
            while got < PIPELINED_CONNECTIONS {
                // Accept as many unix connections as connections are
                // missing (the agent's probes among them carry nothing)...
                let mut pending = Vec::new();
                while pending.len() < PIPELINED_CONNECTIONS - got {
                    let Ok((s, _)) = app.accept() else { return };
                    pending.push(s);
                }
                // ...then read them.
                for mut s in pending {
                    if let Ok(Some(d)) = deliver::recv_unix(&mut s) {
                        got += 1;
                        let _ = delivered.send(d);
                    }
                }
            }
        }),
    };
    batch_to_unix_receiver("up", 94, PIPELINED_CONNECTIONS, receiver);
}

/// More connections than two batch messages carry.
const BATCHED_CONNECTIONS: usize = 2 * deliver::BATCH_MAX + 94;

/// A receiver that takes batches ([`deliver::UnixReceiver`]); the size of
/// each message goes to `sizes`.
fn batch_receiver(journal: bool, sizes: mpsc::Sender<usize>) -> Receiver {
    Receiver {
        unix_backlog: None,
        journal,
        receive: Box::new(move |app, delivered| {
            for s in app.incoming() {
                let Ok(s) = s else { break };
                let mut from = deliver::UnixReceiver::new(s);
                while let Ok(Some(ds)) = from.recv() {
                    let _ = sizes.send(ds.len());
                    for d in ds {
                        assert_eq!(d.blob, b"state");
                        let _ = delivered.send(d);
                    }
                }
            }
        }),
    }
}

#[test]
fn a_journaling_agent_releases_a_batch_message_s_flows_and_every_connection_carries_on() {
    let (sizes_tx, sizes_rx) = mpsc::channel();
    let receiver = batch_receiver(true, sizes_tx);
    batch_to_unix_receiver("uJ", 92, BATCHED_CONNECTIONS, receiver);
    let sizes: Vec<usize> = sizes_rx.try_iter().collect();
    assert!(
        sizes.contains(&deliver::BATCH_MAX),
        "the batch went in full messages: {sizes:?}"
    );
}

#[test]
fn a_receiver_that_takes_batches_gets_every_connection_in_messages_of_at_most_scm_max_fd() {
    let (sizes_tx, sizes_rx) = mpsc::channel();
    let receiver = batch_receiver(false, sizes_tx);
    batch_to_unix_receiver("uB", 95, BATCHED_CONNECTIONS, receiver);
    let sizes: Vec<usize> = sizes_rx.try_iter().collect();
    assert_eq!(sizes.iter().sum::<usize>(), BATCHED_CONNECTIONS);
    assert!(
        sizes.iter().all(|&n| (1..=deliver::BATCH_MAX).contains(&n)),
        "every message carries 1 to {} connections: {sizes:?}",
        deliver::BATCH_MAX
    );
    assert!(
        sizes.contains(&deliver::BATCH_MAX),
        "the batch went in full messages: {sizes:?}"
    );
    // The agent learns that the receiver takes batches from the first
    // acknowledgement it reads, after pipelining up to 16 connections
    // sent alone.
    assert!(
        sizes.len() <= 17 + BATCHED_CONNECTIONS.div_ceil(deliver::BATCH_MAX),
        "a receiver that takes batches is sent batches: {sizes:?}"
    );
}

#[test]
fn a_receiver_that_dies_in_the_middle_of_a_batch_leaves_every_other_connection_reported() {
    let receiver = Receiver {
        unix_backlog: None,
        journal: false,
        receive: Box::new(move |app, delivered| {
            // The agent's probe before READY carries nothing; the first
            // connection comes alone, and its acknowledgement asks for
            // batches.
            let mut got = 0;
            while got == 0 {
                let Ok((s, _)) = app.accept() else { return };
                let mut from = deliver::UnixReceiver::new(s);
                while got == 0 {
                    match from.recv() {
                        Ok(Some(ds)) => {
                            got += ds.len();
                            for d in ds {
                                let _ = delivered.send(d);
                            }
                        }
                        _ => break,
                    }
                }
                if got > 0 {
                    // Then it takes the next message's head and its fds,
                    // and dies: the listener, the unix connection and the
                    // fds close, no acknowledgement.
                    let mut head = [0u8; 10];
                    let (n, fds) = tcpr_host::recv_with_fds(
                        std::os::fd::AsFd::as_fd(from.get_ref()),
                        &mut head,
                    )
                    .unwrap();
                    assert!(n > 0 && fds.len() > 1, "a batch message followed");
                    drop((fds, from, app));
                    return;
                }
            }
        }),
    };
    hand_off_to_unix_receiver("ud", 96, BATCHED_CONNECTIONS, receiver, |outcomes| {
        let moved = outcomes
            .iter()
            .filter(|o| matches!(o, HandOff::Moved))
            .count();
        assert_eq!(moved, 1, "only the acknowledged connection moved");
        for o in outcomes.iter().filter(|o| !matches!(o, HandOff::Moved)) {
            let why = match o {
                HandOff::Stayed(_, why) | HandOff::Unknown(_, why) => why,
                HandOff::Moved => unreachable!(),
            };
            assert!(!why.is_empty(), "a connection not moved says why");
        }
    });
}
