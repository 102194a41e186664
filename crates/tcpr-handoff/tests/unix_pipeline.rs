//! Unix delivery is pipelined: the agent has several connections in the
//! receiver's hands before it reads their acknowledgements. A receiver
//! that accepts a whole batch's unix connections before reading any
//! message gets every connection, and every one carries on. The agent once
//! waited for each acknowledgement before connecting for the next
//! connection, so such a receiver waited on an accept that never came,
//! the agent's wait for the first acknowledgement timed out and that
//! connection was closed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::time::Duration;
use tcpr_handoff::{deliver, Switch};
use tcpr_handoff::{hand_off, AgentConfig, AgentServer, Auth, Delivery, HandOff, MigrateOptions};
use tcpr_netlab::Lab;

/// Connections in the batch: fewer than the agent keeps unacknowledged.
const CONNECTIONS: usize = 8;
const CHUNK: usize = 1024;

fn auth() -> Auth {
    Auth::Psk(std::sync::Arc::new(
        b"unix pipeline test shared key".to_vec(),
    ))
}

fn pattern(seed: usize) -> Vec<u8> {
    (0..CHUNK).map(|i| (i * 13 + seed * 5) as u8).collect()
}

#[test]
fn a_receiver_that_accepts_the_whole_batch_before_reading_gets_every_connection() {
    let mut lab = Lab::new("up").unwrap();
    let c = lab.host("c", &["10.94.0.1/24"]).unwrap();
    let a = lab.host("a", &["10.94.0.2/24", "10.94.0.100/24"]).unwrap();
    let b = lab.host("b", &["10.94.0.3/24"]).unwrap();
    let service: SocketAddr = "10.94.0.100:8080".parse().unwrap();

    let dir = std::env::temp_dir().join(format!("tcpr-unix-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app.sock");
    let app = UnixListener::bind(&path).unwrap();
    let (delivered_tx, delivered_rx) = mpsc::channel();
    std::thread::spawn(move || {
        // The agent's probes (before READY) carry nothing: skip them.
        let mut batch = Vec::with_capacity(CONNECTIONS);
        let mut pending = Vec::new();
        while batch.len() < CONNECTIONS {
            // Accept the whole batch's unix connections first...
            while pending.len() < CONNECTIONS - batch.len() {
                let Ok((s, _)) = app.accept() else { return };
                pending.push(s);
            }
            // ...then read them.
            for mut s in pending.drain(..) {
                if let Ok(Some(d)) = deliver::recv_unix(&mut s) {
                    batch.push(d);
                }
            }
        }
        for d in batch {
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

    let b_path = b.path();
    let agent_path = path.clone();
    std::thread::spawn(move || {
        tcpr_host::enter_netns(&b_path).unwrap();
        let mut cfg = AgentConfig::new(auth(), vec![service], Delivery::Unix(agent_path));
        cfg.timeout = Duration::from_secs(2);
        let agent = AgentServer::bind("10.94.0.3:7070".parse().unwrap(), cfg).unwrap();
        let _ = agent.run();
    });

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
            let mut opts = MigrateOptions::new("10.94.0.3:7070".parse()?, auth());
            opts.switch = Switch::MoveAddress;
            hand_off(conns, &opts).map_err(|e| anyhow::anyhow!("{e}"))
        })
        .unwrap();
    let first_other = outcomes.iter().find(|o| !matches!(o, HandOff::Moved));
    assert!(
        first_other.is_none(),
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
