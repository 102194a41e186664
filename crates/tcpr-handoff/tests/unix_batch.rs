//! A batch larger than a unix receiver's listen backlog, delivered to an
//! application that takes one connection at a time (as `deliver::recv_unix`
//! clients do): every connection moves and carries on. The agent once
//! connected a unix socket per connection for the whole batch before
//! delivering any, which filled the receiver's backlog and stalled the
//! batch past the sender's timeout (every connection `unknown`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::time::Duration;
use tcpr_handoff::{deliver, Switch};
use tcpr_handoff::{hand_off, AgentConfig, AgentServer, Auth, Delivery, HandOff, MigrateOptions};
use tcpr_netlab::Lab;

/// More than the receiver's unix listen backlog (`net.core.somaxconn` of
/// its namespace, set below), so an agent that connects ahead of
/// delivering blocks on a full backlog.
const CONNECTIONS: usize = 300;
const UNIX_BACKLOG: usize = 64;
const CHUNK: usize = 4096;

fn auth() -> Auth {
    Auth::Psk(std::sync::Arc::new(b"unix batch test shared key".to_vec()))
}

fn pattern(seed: usize) -> Vec<u8> {
    (0..CHUNK).map(|i| (i * 31 + seed * 7) as u8).collect()
}

#[test]
fn a_batch_larger_than_the_unix_backlog_reaches_a_one_at_a_time_receiver() {
    const { assert!(CONNECTIONS > UNIX_BACKLOG) };
    let mut lab = Lab::new("ub").unwrap();
    let c = lab.host("c", &["10.93.0.1/24"]).unwrap();
    let a = lab.host("a", &["10.93.0.2/24", "10.93.0.100/24"]).unwrap();
    let b = lab.host("b", &["10.93.0.3/24"]).unwrap();
    let service: SocketAddr = "10.93.0.100:8080".parse().unwrap();

    // The application on b: takes one delivered connection at a time and
    // echoes one chunk on each from a thread of its own.
    let dir = std::env::temp_dir().join(format!("tcpr-unix-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app.sock");
    // The listen backlog is capped by the namespace's somaxconn when the
    // listener is made: make it in b, with a small one.
    let sysctl = b
        .cmd("sysctl")
        .args(["-q", "-w", &format!("net.core.somaxconn={UNIX_BACKLOG}")])
        .status()
        .unwrap();
    assert!(sysctl.success(), "set somaxconn in b");
    let app_path = path.clone();
    let app = b
        .within(move || Ok(UnixListener::bind(&app_path)?))
        .unwrap();
    let (delivered_tx, delivered_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in app.incoming() {
            let Ok(mut s) = s else { break };
            // The agent's probes carry nothing.
            let Ok(Some(d)) = deliver::recv_unix(&mut s) else {
                continue;
            };
            let tx = delivered_tx.clone();
            std::thread::spawn(move || {
                let mut stream = d.stream;
                let mut buf = vec![0u8; CHUNK];
                let r = stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .and_then(|()| stream.read_exact(&mut buf))
                    .and_then(|()| stream.write_all(&buf));
                let _ = tx.send(r.map_err(|e| e.to_string()));
            });
        }
    });

    // The agent on b, delivering over the unix socket.
    let b_path = b.path();
    let agent_path = path.clone();
    std::thread::spawn(move || {
        tcpr_host::enter_netns(&b_path).unwrap();
        let mut cfg = AgentConfig::new(auth(), vec![service], Delivery::Unix(agent_path));
        cfg.timeout = Duration::from_secs(2);
        let agent = AgentServer::bind("10.93.0.3:7070".parse().unwrap(), cfg).unwrap();
        let _ = agent.run();
    });

    // The service on a, and its clients on c: connected while a accepts.
    let listener = a.within(|| Ok(TcpListener::bind(service)?)).unwrap();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let client = std::thread::spawn(move || {
        c.within(move || {
            let mut socks = vec![];
            for _ in 0..CONNECTIONS {
                let s = TcpStream::connect(service)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                socks.push(s);
            }
            go_rx.recv_timeout(Duration::from_secs(60)).unwrap();
            for (i, s) in socks.iter_mut().enumerate() {
                let sent = pattern(i);
                s.write_all(&sent)?;
                let mut back = vec![0u8; CHUNK];
                s.read_exact(&mut back)
                    .map_err(|e| anyhow::anyhow!("connection {i} after the handoff: {e}"))?;
                assert!(back == sent, "connection {i} echoed its chunk unchanged");
            }
            Ok(())
        })
    });
    let conns: Vec<(TcpStream, Vec<u8>)> = (0..CONNECTIONS)
        .map(|_| (listener.accept().unwrap().0, b"state".to_vec()))
        .collect();
    drop(listener);
    let outcomes = a
        .within(move || {
            let mut opts = MigrateOptions::new("10.93.0.3:7070".parse()?, auth());
            opts.switch = Switch::MoveAddress;
            hand_off(conns, &opts).map_err(|e| anyhow::anyhow!("{e}"))
        })
        .unwrap();
    let moved = outcomes
        .iter()
        .filter(|o| matches!(o, HandOff::Moved))
        .count();
    let first_other = outcomes.iter().find(|o| !matches!(o, HandOff::Moved));
    assert_eq!(
        moved, CONNECTIONS,
        "every connection moves; the first other: {first_other:?}"
    );
    go_tx.send(()).unwrap();
    client.join().unwrap().unwrap();
    for i in 0..CONNECTIONS {
        let echoed = delivered_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("delivered connection {i} of {CONNECTIONS}: {e}"));
        assert_eq!(echoed, Ok(()), "a delivered connection echoed its chunk");
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop(lab);
}
