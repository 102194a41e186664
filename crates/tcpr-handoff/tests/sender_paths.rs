//! The sender's error paths give every connection back: a batch refused
//! after the channel is up (here: `MoveAddress` with connections on two
//! local addresses), through `hand_off` and `tokio::hand_off`, and a silent
//! agent, reported as such. Each connection is then used: a client on
//! another host (namespace) sends a chunk and checks the echo.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;
use tcpr_handoff::{hand_off, Auth, HandOff, Incoming, MigrateOptions, Switch};
use tcpr_netlab::{Host, Lab};

const CHUNK: usize = 32 * 1024;

fn pattern(seed: u8) -> Vec<u8> {
    (0..CHUNK as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ seed)
        .collect()
}

fn auth() -> Auth {
    Auth::Psk(std::sync::Arc::new(
        b"sender error path shared key".to_vec(),
    ))
}

/// c at .1, a at .2 and .100, b at .3 of 10.`net`.0.0/24.
fn hosts(tag: &str, net: u8) -> (Lab, Host, Host, Host) {
    let mut lab = Lab::new(tag).unwrap();
    let c = lab.host("c", &[&format!("10.{net}.0.1/24")]).unwrap();
    let a = lab
        .host(
            "a",
            &[&format!("10.{net}.0.2/24"), &format!("10.{net}.0.100/24")],
        )
        .unwrap();
    let b = lab.host("b", &[&format!("10.{net}.0.3/24")]).unwrap();
    (lab, c, a, b)
}

/// From c: connects to every address in `to`, waits for `go`, then sends a
/// chunk on each and checks that it comes back unchanged.
fn client(c: &Host, to: Vec<SocketAddr>, up: mpsc::Sender<()>, go: mpsc::Receiver<()>) {
    c.within(move || {
        let mut socks = vec![];
        for addr in &to {
            let s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            socks.push(s);
        }
        up.send(()).unwrap();
        go.recv_timeout(Duration::from_secs(30)).unwrap();
        for (i, s) in socks.iter_mut().enumerate() {
            let sent = pattern(i as u8);
            s.write_all(&sent)?;
            let mut back = vec![0u8; CHUNK];
            s.read_exact(&mut back)
                .map_err(|e| anyhow::anyhow!("connection {i} after the handoff: {e}"))?;
            assert!(back == sent, "connection {i} echoed its chunk unchanged");
        }
        Ok(())
    })
    .unwrap();
}

/// Accepts `n` connections on `listener`.
fn accept(listener: &TcpListener, n: usize) -> Vec<(TcpStream, Vec<u8>)> {
    (0..n)
        .map(|_| (listener.accept().unwrap().0, b"blob".to_vec()))
        .collect()
}

/// Echoes one chunk on `s`.
fn echo_chunk(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.read_exact(&mut buf)?;
    s.write_all(&buf)
}

/// A batch that `migrate` refuses once the channel is up: `MoveAddress`
/// moves one address, and the two connections have two. Before, it froze
/// them, returned an error and `hand_off` dropped the caller's streams: the
/// client read EOF.
#[test]
fn a_refused_batch_gives_every_stream_back() {
    let (_lab, c, a, b) = hosts("sp", 97);
    let agent: SocketAddr = "10.97.0.3:7072".parse().unwrap();
    let (agent_up, agent_ready) = mpsc::channel();
    // Kept open (and unused) for the whole test.
    let _incoming = b
        .within(move || {
            let i = Incoming::bind(agent, auth(), vec!["0.0.0.0:9200".parse().unwrap()])?;
            agent_up.send(()).unwrap();
            Ok(i)
        })
        .unwrap();
    agent_ready.recv().unwrap();
    let (up, up_rx) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let listener = a.within(|| Ok(TcpListener::bind("0.0.0.0:9200")?)).unwrap();
    std::thread::scope(|sc| {
        let c = &c;
        sc.spawn(move || {
            client(
                c,
                vec![
                    "10.97.0.2:9200".parse().unwrap(),
                    "10.97.0.100:9200".parse().unwrap(),
                ],
                up,
                go_rx,
            )
        });
        up_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let conns = accept(&listener, 2);
        let mut opts = MigrateOptions::new(agent, auth());
        opts.switch = Switch::MoveAddress;
        let err = a
            .within(|| Ok(hand_off(conns, &opts)))
            .unwrap()
            .expect_err("two local addresses cannot move with one address");
        assert!(err.to_string().contains("several local addresses"), "{err}");
        let mut back = err.conns;
        assert_eq!(back.len(), 2, "every stream comes back");
        go.send(()).unwrap();
        for (s, blob) in back.iter_mut() {
            assert_eq!(blob, b"blob");
            echo_chunk(s).unwrap();
        }
    });
}

/// The same through the tokio front end: the streams come back registered
/// with the runtime, and serve.
#[cfg(feature = "tokio")]
#[test]
fn a_refused_tokio_batch_gives_every_stream_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_lab, c, a, b) = hosts("st", 98);
    let agent: SocketAddr = "10.98.0.3:7072".parse().unwrap();
    let _incoming = b
        .within(move || {
            Ok(Incoming::bind(
                agent,
                auth(),
                vec!["0.0.0.0:9200".parse().unwrap()],
            )?)
        })
        .unwrap();
    let (up, up_rx) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    std::thread::scope(|sc| {
        let c = &c;
        let listener = a.within(|| Ok(TcpListener::bind("0.0.0.0:9200")?)).unwrap();
        sc.spawn(move || {
            client(
                c,
                vec![
                    "10.98.0.2:9200".parse().unwrap(),
                    "10.98.0.100:9200".parse().unwrap(),
                ],
                up,
                go_rx,
            )
        });
        up_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let conns = accept(&listener, 2);
        a.within(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            rt.block_on(async move {
                let mut tconns = vec![];
                for (s, blob) in conns {
                    s.set_nonblocking(true)?;
                    tconns.push((tokio::net::TcpStream::from_std(s)?, blob));
                }
                let mut opts = MigrateOptions::new(agent, auth());
                opts.switch = Switch::MoveAddress;
                let err = tcpr_handoff::tokio::hand_off(tconns, opts)
                    .await
                    .expect_err("two local addresses cannot move with one address");
                assert_eq!(err.conns.len(), 2, "every stream comes back");
                go.send(()).unwrap();
                for (mut s, _) in err.conns {
                    let mut buf = vec![0u8; CHUNK];
                    s.read_exact(&mut buf).await?;
                    s.write_all(&buf).await?;
                }
                Ok(())
            })
        })
        .unwrap();
    });
}

/// An agent that accepts and then says nothing: the connection stays, and
/// the reason says so (it read "TLS handshake failed: Resource temporarily
/// unavailable (os error 11)").
#[test]
fn a_silent_agent_is_reported_as_silent() {
    let (_lab, c, a, b) = hosts("ss", 99);
    let agent: SocketAddr = "10.99.0.3:7072".parse().unwrap();
    let silent = b.within(move || Ok(TcpListener::bind(agent)?)).unwrap();
    let (up, up_rx) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let listener = a
        .within(|| Ok(TcpListener::bind("10.99.0.100:9200")?))
        .unwrap();
    std::thread::scope(|sc| {
        let c = &c;
        sc.spawn(move || client(c, vec!["10.99.0.100:9200".parse().unwrap()], up, go_rx));
        // Holds the sender's channel open, answering nothing.
        let held = sc.spawn(move || silent.accept().map(|(s, _)| s));
        up_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let conns = accept(&listener, 1);
        let mut opts = MigrateOptions::new(agent, auth());
        opts.timeout = Duration::from_millis(500);
        let r = a.within(|| Ok(hand_off(conns, &opts))).unwrap().unwrap();
        let _channel = held.join().unwrap().unwrap();
        let [HandOff::Stayed(s, why)] = &mut r.into_iter().collect::<Vec<_>>()[..] else {
            panic!("the connection stays");
        };
        assert_eq!(
            why, "the agent at 10.99.0.3:7072 did not answer within 0.5 s",
            "the reason names the silence"
        );
        go.send(()).unwrap();
        echo_chunk(s).unwrap();
    });
}

/// A timeout as large as a `Duration` holds moves a connection: every wait
/// saturates instead of overflowing (it panicked at `timeout * 4`).
#[test]
fn a_huge_timeout_moves_a_connection() {
    let (_lab, c, a, b) = hosts("sh", 100);
    let agent: SocketAddr = "10.100.0.3:7072".parse().unwrap();
    let incoming = b
        .within(move || {
            Ok(Incoming::bind(
                agent,
                auth(),
                vec!["10.100.0.100:9200".parse().unwrap()],
            )?)
        })
        .unwrap();
    let (up, up_rx) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let listener = a
        .within(|| Ok(TcpListener::bind("10.100.0.100:9200")?))
        .unwrap();
    std::thread::scope(|sc| {
        let c = &c;
        sc.spawn(move || client(c, vec!["10.100.0.100:9200".parse().unwrap()], up, go_rx));
        up_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let conns = accept(&listener, 1);
        let mut opts = MigrateOptions::new(agent, auth());
        opts.timeout = Duration::MAX;
        opts.switch = Switch::MoveAddress;
        let r = a.within(|| Ok(hand_off(conns, &opts))).unwrap().unwrap();
        assert!(matches!(r[..], [HandOff::Moved]), "{r:?}");
        let mut d = incoming.accept().expect("the connection arrives");
        assert_eq!(d.blob, b"blob");
        go.send(()).unwrap();
        echo_chunk(&mut d.stream).unwrap();
    });
}

/// A connection whose client reset it while it waited for its batch (its
/// socket closed: no flow to hand off) does not refuse the batch: the
/// others move, and it comes back `Stayed`, saying why. Before, the check
/// of every connection before any freeze refused the whole batch: a
/// balancer proxied every connection of it (up to 256, for one client
/// that connects, sends a head and resets).
#[test]
fn a_reset_connection_stays_and_the_others_move() {
    use std::os::fd::AsFd;
    let (_lab, c, a, b) = hosts("sr", 101);
    let agent: SocketAddr = "10.101.0.3:7072".parse().unwrap();
    let vip: SocketAddr = "10.101.0.100:9200".parse().unwrap();
    let incoming = b
        .within(move || Ok(Incoming::bind(agent, auth(), vec![vip])?))
        .unwrap();
    let listener = a.within(|| Ok(TcpListener::bind(vip)?)).unwrap();
    let (up, up_rx) = mpsc::channel();
    let (reset, reset_rx) = mpsc::channel();
    let (done, done_rx) = mpsc::channel();
    std::thread::scope(|sc| {
        let c = &c;
        let client = sc.spawn(move || {
            c.within(move || {
                let mut socks: Vec<TcpStream> = (0..3)
                    .map(|_| TcpStream::connect(vip))
                    .collect::<Result<_, _>>()?;
                up.send(()).unwrap();
                reset_rx.recv_timeout(Duration::from_secs(30)).unwrap();
                let gone = socks.remove(1);
                tcpr_host::sock::reset_on_close(gone.as_fd())?;
                drop(gone);
                done.send(()).unwrap();
                Ok(socks)
            })
            .unwrap()
        });
        up_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let conns = accept(&listener, 3);
        reset.send(()).unwrap();
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // The RST has reached the middle connection's socket.
        let mut probe = [0u8; 1];
        let start = std::time::Instant::now();
        while !matches!(conns[1].0.peek(&mut probe), Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset)
        {
            assert!(start.elapsed() < Duration::from_secs(10), "no RST");
            std::thread::sleep(Duration::from_millis(5));
        }
        let opts = MigrateOptions::new(agent, auth());
        let mut opts = opts;
        opts.switch = Switch::MoveAddress;
        let r = a.within(|| Ok(hand_off(conns, &opts))).unwrap().unwrap();
        assert!(matches!(r[0], HandOff::Moved), "{r:?}");
        assert!(matches!(r[2], HandOff::Moved), "{r:?}");
        let HandOff::Stayed(_, why) = &r[1] else {
            panic!("the reset one stays: {r:?}");
        };
        assert!(why.starts_with("cannot hand it off"), "{why}");
        let mut socks = client.join().unwrap();
        let mut delivered: Vec<_> = (0..socks.len())
            .map(|_| incoming.accept().expect("a connection arrives"))
            .collect();
        for (i, s) in socks.iter_mut().enumerate() {
            let port = s.local_addr().unwrap().port();
            let at = delivered
                .iter()
                .position(|d| d.stream.peer_addr().unwrap().port() == port)
                .expect("its connection arrived");
            let mut d = delivered.remove(at);
            let sent = pattern(i as u8);
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(&sent).unwrap();
            echo_chunk(&mut d.stream).unwrap();
            let mut back = vec![0u8; CHUNK];
            s.read_exact(&mut back).unwrap();
            assert!(back == sent, "connection {i} echoed through its new home");
        }
    });
}
