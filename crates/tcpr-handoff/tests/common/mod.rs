//! What the unix delivery tests share: an application that echoes, an
//! agent in a lab host.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;
use tcpr_handoff::{AgentConfig, AgentServer, Delivered};
use tcpr_netlab::Host;

/// Each connection delivered on `delivered` reads a chunk of `chunk`
/// bytes and echoes it, on a thread of its own; each one's result comes
/// on the channel returned.
pub(crate) fn echo_each(
    delivered: mpsc::Receiver<Delivered>,
    chunk: usize,
) -> mpsc::Receiver<Result<(), String>> {
    let (echoed_tx, echoed) = mpsc::channel();
    std::thread::spawn(move || {
        for d in delivered {
            let tx = echoed_tx.clone();
            std::thread::spawn(move || {
                let mut stream = d.stream;
                let mut buf = vec![0u8; chunk];
                let r = stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .and_then(|()| stream.read_exact(&mut buf))
                    .and_then(|()| stream.write_all(&buf));
                let _ = tx.send(r.map_err(|e| e.to_string()));
            });
        }
    });
    echoed
}

/// Runs an agent with `cfg` on `agent_addr` in host `b`, on a thread of
/// its own; returns once it listens (a sender that came first was
/// refused on a busy machine).
pub(crate) fn run_agent(b: &Host, agent_addr: SocketAddr, cfg: AgentConfig) {
    let b_path = b.path();
    let (listening_tx, listening_rx) = mpsc::channel();
    std::thread::spawn(move || {
        tcpr_host::enter_netns(&b_path).unwrap();
        let agent = AgentServer::bind(agent_addr, cfg).unwrap();
        let _ = listening_tx.send(());
        let _ = agent.run();
    });
    listening_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the agent listens");
}

/// The chunk of `len` bytes connection `seed` sends and expects back.
pub(crate) fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + seed * 7) as u8).collect()
}

/// From `c`: connects `n` clients to `service`, waits for `go` to name
/// those that moved, then sends a chunk of `len` bytes on each of those
/// and checks that it comes back unchanged.
pub(crate) fn echo_clients(
    c: &Host,
    service: SocketAddr,
    n: usize,
    len: usize,
    go: mpsc::Receiver<Vec<usize>>,
) -> anyhow::Result<()> {
    c.within(move || {
        let mut socks = vec![];
        for _ in 0..n {
            let s = TcpStream::connect(service)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            socks.push(s);
        }
        let moved: Vec<usize> = go.recv_timeout(Duration::from_secs(60)).unwrap();
        for i in moved {
            let s = &mut socks[i];
            let sent = pattern(i, len);
            s.write_all(&sent)?;
            let mut back = vec![0u8; len];
            s.read_exact(&mut back)
                .map_err(|e| anyhow::anyhow!("connection {i} after the handoff: {e}"))?;
            assert!(back == sent, "connection {i} echoed its chunk unchanged");
        }
        Ok(())
    })
}
