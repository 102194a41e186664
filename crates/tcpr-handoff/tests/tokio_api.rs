//! The tokio front ends, for real: a tokio service hands its client to an
//! agent on another host (namespace) and the client, a plain blocking
//! socket, carries on with the tokio task that received it there. Every
//! byte is checked both ways, before and after the move.
#![cfg(feature = "tokio")]

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Duration;
use tcpr_handoff::tokio::{hand_off, AsyncHandOff};
use tcpr_handoff::{Auth, Incoming, MigrateOptions, Switch};
use tcpr_netlab::Lab;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SVC: &str = "10.96.0.100:9100";
const AGENT: &str = "10.96.0.3:7071";
const CHUNK: usize = 64 * 1024;

fn pattern(round: u8) -> Vec<u8> {
    (0..CHUNK as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ round)
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .unwrap()
}

/// Echoes `rounds` chunks back to the peer.
async fn echo(s: &mut tokio::net::TcpStream, rounds: usize) {
    let mut buf = vec![0u8; CHUNK];
    for _ in 0..rounds {
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
    }
}

#[test]
fn tokio_stream_handed_to_a_tokio_task_on_another_host() {
    let auth = Auth::Psk(std::sync::Arc::new(b"tokio front end shared key".to_vec()));
    let mut lab = Lab::new("tk").unwrap();
    let c = lab.host("c", &["10.96.0.1/24"]).unwrap();
    let a = lab.host("a", &["10.96.0.2/24", "10.96.0.100/24"]).unwrap();
    let b = lab.host("b", &["10.96.0.3/24"]).unwrap();
    let (agent_up, agent_ready) = mpsc::channel();
    let (svc_up, svc_ready) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let (moved, moved_rx) = mpsc::channel::<()>();
    let blob = b"session 42: two rounds served".to_vec();

    let (a, b) = (&a, &b);
    std::thread::scope(|sc| {
        let agent_auth = auth.clone();
        let receiver = sc.spawn(move || {
            b.within(move || {
                let auth = agent_auth;
                runtime().block_on(async move {
                    let mut incoming =
                        Incoming::bind(AGENT.parse().unwrap(), auth, vec![SVC.parse().unwrap()])?
                            .into_async();
                    agent_up.send(()).unwrap();
                    // Bounded, so that a failed handoff fails the test
                    // instead of hanging it.
                    let next = tokio::time::timeout(Duration::from_secs(30), incoming.accept());
                    let mut d = next.await?.expect("a connection")?;
                    assert_eq!(d.local.to_string(), SVC);
                    // Serve the rest of the session, then see the peer's EOF.
                    echo(&mut d.stream, 2).await;
                    let mut rest = Vec::new();
                    d.stream.read_to_end(&mut rest).await?;
                    assert!(rest.is_empty());
                    Ok(d.blob)
                })
            })
        });
        agent_ready.recv_timeout(Duration::from_secs(10)).unwrap();

        let (auth, sent_blob) = (auth.clone(), blob.clone());
        let sender = sc.spawn(move || {
            a.within(move || {
                let blob = sent_blob;
                runtime().block_on(async move {
                    let listener = tokio::net::TcpListener::bind(SVC).await?;
                    svc_up.send(()).unwrap();
                    let (mut s, _) = listener.accept().await?;
                    echo(&mut s, 2).await;
                    go_rx.recv().unwrap();
                    let mut opts = MigrateOptions::new(AGENT.parse().unwrap(), auth);
                    opts.switch = Switch::MoveAddress;
                    let r = hand_off(vec![(s, blob)], opts).await?;
                    assert!(matches!(r[..], [AsyncHandOff::Moved]), "{r:?}");
                    moved.send(()).unwrap();
                    Ok(())
                })
            })
        });
        svc_ready.recv_timeout(Duration::from_secs(10)).unwrap();

        c.within(move || {
            let mut s = std::net::TcpStream::connect(SVC)?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut back = vec![0u8; CHUNK];
            for round in 0..4u8 {
                if round == 2 {
                    go.send(()).unwrap();
                    moved_rx.recv_timeout(Duration::from_secs(20)).unwrap();
                }
                let sent = pattern(round);
                s.write_all(&sent)?;
                s.read_exact(&mut back)?;
                assert!(back == sent, "round {round} came back unchanged");
            }
            s.shutdown(std::net::Shutdown::Write)?;
            Ok(())
        })
        .unwrap();
        sender.join().unwrap().unwrap();
        let got = receiver.join().unwrap().unwrap();
        assert_eq!(got, blob, "the blob travelled with the connection");
    });
}
