//! The agent keeps its unix connection to a receiver that takes batches
//! open between batches, and the next batch goes on it.
//!
//! - Batches in a row reuse one unix connection: the receiver accepts no
//!   new one after the first batch (it once accepted one per batch, and
//!   one per further connection of a batch sent before the first
//!   acknowledgement).
//! - A receiver restarted between batches (the kept connection closed):
//!   the next batch connects anew and moves every connection.
//! - A receiver restarted after the agent checked its kept connection at
//!   COMMIT (fault injection holds the agent there): the send on it fails
//!   (EPIPE), nothing was delivered, and the agent sends again on a new
//!   unix connection; every connection moves.
//! - The same restart, to a receiver that takes one connection per unix
//!   connection and reads them in turn: every connection moves (the new
//!   unix connection of the first closes before the next is sent).
//! - A receiver that says it is leaving ("L"): its unix connection is not
//!   used again; the next batch goes on a new one.
//! - A receiver that takes batches but did not say it reads its unix
//!   connections concurrently (`UnixReceiver::new`, "kB"): each batch
//!   comes on a unix connection of its own, which closes after it.
//! - A receiver that takes no batches (`deliver::recv_unix`, one message
//!   per unix connection): every connection moves, on a unix connection
//!   of its own, none kept.
//!
//! The tests share the process's environment (fault injection): they run
//! one at a time.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tcpr_handoff::{deliver, Delivered, Switch};
use tcpr_handoff::{hand_off, AgentConfig, Auth, Delivery, HandOff, MigrateOptions};
use tcpr_netlab::{Host, Lab};

mod common;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const CHUNK: usize = 1024;
/// Batches a test runs, each on a service address of its own.
const BATCHES: usize = 3;

fn auth() -> Auth {
    Auth::Psk(Arc::new(b"unix kept test shared key".to_vec()))
}

/// How the application reads its unix connections.
#[derive(Clone, Copy, PartialEq)]
enum Reads {
    /// [`deliver::UnixReceiver::concurrent`], each unix connection on a
    /// thread of its own.
    Batches,
    /// [`deliver::UnixReceiver::new`]: batches, on unix connections the
    /// agent must not keep (the receiver may read them one after the other).
    BatchesNotKept,
    /// [`deliver::recv_unix`]: one message per unix connection.
    OneMessage,
    /// [`deliver::recv_unix`] on each unix connection until it ends, one
    /// unix connection after the other.
    OneMessageInTurn,
}

/// The application on the agent's host: a unix listener, the unix
/// connections it accepted, and the messages it read (by unix connection).
struct App {
    path: PathBuf,
    reads: Mutex<Reads>,
    accepts: Arc<AtomicUsize>,
    /// (accept number, connections in the message), in arrival order.
    messages: Arc<Mutex<Vec<(usize, usize)>>>,
    accepted: Arc<Mutex<Vec<UnixStream>>>,
    /// The accepting thread's stop flag, and the thread.
    acceptor: Mutex<Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>>,
    delivered: mpsc::Sender<Delivered>,
}

impl App {
    fn start(path: PathBuf, reads: Reads, delivered: mpsc::Sender<Delivered>) -> App {
        let app = App {
            path,
            reads: Mutex::new(reads),
            accepts: Default::default(),
            messages: Default::default(),
            accepted: Default::default(),
            acceptor: Mutex::new(None),
            delivered,
        };
        app.listen();
        app
    }

    fn listen(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop_here, accepts, messages, accepted, delivered, reads) = (
            stop.clone(),
            self.accepts.clone(),
            self.messages.clone(),
            self.accepted.clone(),
            self.delivered.clone(),
            *self.reads.lock().unwrap(),
        );
        let acceptor = std::thread::spawn(move || {
            while !stop_here.load(Ordering::SeqCst) {
                let s = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(e) => panic!("accept: {e}"),
                };
                s.set_nonblocking(false).unwrap();
                let n = accepts.fetch_add(1, Ordering::SeqCst);
                accepted.lock().unwrap().push(s.try_clone().unwrap());
                let (messages, delivered) = (messages.clone(), delivered.clone());
                if reads == Reads::OneMessageInTurn {
                    // On the accepting thread: the next unix connection
                    // waits until this one ends.
                    let mut s = s;
                    while let Ok(Some(d)) = deliver::recv_unix(&mut s) {
                        messages.lock().unwrap().push((n, 1));
                        let _ = delivered.send(d);
                    }
                    continue;
                }
                std::thread::spawn(move || match reads {
                    Reads::Batches | Reads::BatchesNotKept => {
                        let mut from = if reads == Reads::Batches {
                            deliver::UnixReceiver::concurrent(s)
                        } else {
                            deliver::UnixReceiver::new(s)
                        };
                        while let Ok(Some(ds)) = from.recv() {
                            messages.lock().unwrap().push((n, ds.len()));
                            for d in ds {
                                let _ = delivered.send(d);
                            }
                        }
                    }
                    Reads::OneMessage | Reads::OneMessageInTurn => {
                        let mut s = s;
                        if let Ok(Some(d)) = deliver::recv_unix(&mut s) {
                            messages.lock().unwrap().push((n, 1));
                            let _ = delivered.send(d);
                        }
                    }
                });
            }
        });
        *self.acceptor.lock().unwrap() = Some((stop, acceptor));
    }

    /// Ends as a restarting application does: the listener and every unix
    /// connection it accepted close; then listens anew at the same path.
    fn restart(&self) {
        let reads = *self.reads.lock().unwrap();
        self.restart_as(reads);
    }

    /// [`App::restart`], reading its unix connections as `reads` says.
    fn restart_as(&self, reads: Reads) {
        *self.reads.lock().unwrap() = reads;
        let (stop, acceptor) = self.acceptor.lock().unwrap().take().unwrap();
        stop.store(true, Ordering::SeqCst);
        acceptor.join().unwrap();
        for s in self.accepted.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.listen();
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// Hosts c (clients), a (the service, one address per batch) and b (the
/// agent, delivering to the unix socket of an [`App`]).
struct Bed {
    _lab: Lab,
    a: Host,
    c: Arc<Host>,
    net: u8,
    agent_addr: SocketAddr,
    app: App,
    /// Each delivered connection's echo result.
    echoed: mpsc::Receiver<Result<(), String>>,
    dir: PathBuf,
}

fn service(net: u8, k: usize) -> SocketAddr {
    format!("10.{net}.0.{}:8080", 100 + k).parse().unwrap()
}

impl Bed {
    fn new(name: &str, net: u8, reads: Reads) -> Bed {
        let mut lab = Lab::new(name).unwrap();
        let addr = |host: usize| format!("10.{net}.0.{host}/24");
        let c = lab.host("c", &[&addr(1)]).unwrap();
        let mut a_addrs = vec![addr(2)];
        a_addrs.extend((0..BATCHES).map(|k| addr(100 + k)));
        let a_addrs: Vec<&str> = a_addrs.iter().map(String::as_str).collect();
        let a = lab.host("a", &a_addrs).unwrap();
        let b = lab.host("b", &[&addr(3)]).unwrap();
        let agent_addr: SocketAddr = format!("10.{net}.0.3:7070").parse().unwrap();
        let dir = std::env::temp_dir().join(format!("tcpr-kept-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.sock");
        let (delivered_tx, delivered_rx) = mpsc::channel::<Delivered>();
        let app = App::start(path.clone(), reads, delivered_tx);
        let echoed = common::echo_each(delivered_rx, CHUNK);
        let allow = (0..BATCHES).map(|k| service(net, k)).collect();
        let mut cfg = AgentConfig::new(auth(), allow, Delivery::Unix(path));
        cfg.timeout = Duration::from_secs(2);
        common::run_agent(&b, agent_addr, cfg);
        Bed {
            _lab: lab,
            a,
            c: Arc::new(c),
            net,
            agent_addr,
            app,
            echoed,
            dir,
        }
    }

    /// Moves `n` connections of service `k` in one batch; every one must
    /// move and then echo a chunk end to end.
    fn batch(&self, k: usize, n: usize) {
        let service = service(self.net, k);
        let listener = self.a.within(|| Ok(TcpListener::bind(service)?)).unwrap();
        let c = self.c.clone();
        let (go_tx, go_rx) = mpsc::channel::<Vec<usize>>();
        let client = std::thread::spawn(move || common::echo_clients(&c, service, n, CHUNK, go_rx));
        let conns: Vec<(TcpStream, Vec<u8>)> = (0..n)
            .map(|_| (listener.accept().unwrap().0, b"state".to_vec()))
            .collect();
        drop(listener);
        let agent_addr = self.agent_addr;
        let outcomes = self
            .a
            .within(move || {
                let mut opts = MigrateOptions::new(agent_addr, auth());
                opts.switch = Switch::MoveAddress;
                hand_off(conns, &opts).map_err(|e| anyhow::anyhow!("{e}"))
            })
            .unwrap();
        let first_other = outcomes.iter().find(|o| !matches!(o, HandOff::Moved));
        assert!(
            first_other.is_none(),
            "batch {k}: every connection moves; the first other: {first_other:?}"
        );
        go_tx.send((0..n).collect()).unwrap();
        client.join().unwrap().unwrap();
        for i in 0..n {
            let echoed = self
                .echoed
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("batch {k}: delivered connection {i}: {e}"));
            assert_eq!(echoed, Ok(()), "a delivered connection echoed its chunk");
        }
    }

    /// The unix connections (accept numbers) that carried messages, from
    /// message `from` on.
    fn carried_by(&self, from: usize) -> Vec<usize> {
        let m = self.app.messages.lock().unwrap();
        m[from..].iter().map(|(n, _)| *n).collect()
    }

    fn messages(&self) -> usize {
        self.app.messages.lock().unwrap().len()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn batches_in_a_row_reuse_one_unix_connection() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("kr", 81, Reads::Batches);
    bed.batch(0, 2);
    let after_first = bed.app.accepts();
    let seen = bed.messages();
    bed.batch(1, 3);
    bed.batch(2, 1);
    assert_eq!(
        bed.app.accepts(),
        after_first,
        "no unix connection accepted after the first batch"
    );
    let carriers = bed.carried_by(seen);
    assert_eq!(
        carriers.len(),
        2,
        "one batch message per batch: {carriers:?}"
    );
    assert!(
        carriers.iter().all(|&n| n == carriers[0]),
        "both on one unix connection: {carriers:?}"
    );
}

#[test]
fn a_receiver_restarted_between_batches_gets_the_next_batch() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("ks", 82, Reads::Batches);
    bed.batch(0, 2);
    let before = bed.app.accepts();
    bed.app.restart();
    bed.batch(1, 3);
    assert!(
        bed.app.accepts() > before,
        "a new unix connection after the restart"
    );
    // And it is kept in turn.
    let after = bed.app.accepts();
    bed.batch(2, 2);
    assert_eq!(bed.app.accepts(), after, "the new one is kept");
}

/// The application restarts after the agent checked its kept connection
/// at COMMIT: the first send on it fails, and nothing was delivered.
#[test]
fn a_kept_connection_found_closed_by_the_send_is_replaced_without_a_loss() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("ke", 83, Reads::Batches);
    restart_after_commit_check(&bed, Reads::Batches);
    bed.batch(2, 2);
}

/// The application restarts as a receiver that takes one connection per
/// unix connection and reads them one after the other: the new unix
/// connection of the message's first connection closes before the next
/// goes (held open, it kept the receiver from the next one until its
/// acknowledgement timed out: every connection but the first was lost).
#[test]
fn a_kept_connection_replaced_by_a_one_at_a_time_receiver_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("kt", 86, Reads::Batches);
    restart_after_commit_check(&bed, Reads::OneMessageInTurn);
}

/// Batch 0 keeps a unix connection; batch 1 (3 connections) is held after
/// COMMIT's checks while the application restarts as `reads`; every
/// connection of batch 1 moves, on unix connections made after the
/// restart.
fn restart_after_commit_check(bed: &Bed, reads: Reads) {
    bed.batch(0, 2);
    let fault_dir = bed.dir.join("fault");
    std::fs::create_dir_all(&fault_dir).unwrap();
    std::env::set_var("TCPR_FAULT_DIR", &fault_dir);
    std::env::set_var("TCPR_FAULT_STOP_AT", "taken");
    let before = bed.app.accepts();
    let seen = bed.messages();
    let app = &bed.app;
    let reached = fault_dir.join("reached-taken");
    std::thread::scope(|scope| {
        let restarter = scope.spawn(|| {
            // The agent holds after COMMIT's checks, nothing resumed yet.
            for _ in 0..3000 {
                if reached.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let held = reached.exists();
            if held {
                app.restart_as(reads);
            }
            std::env::remove_var("TCPR_FAULT_STOP_AT");
            std::fs::write(fault_dir.join("release-taken"), b"").unwrap();
            assert!(held, "the agent reached the fault point");
        });
        bed.batch(1, 3);
        restarter.join().unwrap();
    });
    let carriers = bed.carried_by(seen);
    assert!(
        !carriers.is_empty() && carriers.iter().all(|&n| n >= before),
        "the batch went on a unix connection made after the restart: {carriers:?} (from {before})"
    );
}

#[test]
fn a_receiver_that_takes_no_batches_gets_one_unix_connection_per_connection() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("ko", 84, Reads::OneMessage);
    bed.batch(0, 3);
    let after_first = bed.app.accepts();
    bed.batch(1, 2);
    assert!(
        bed.app.accepts() >= after_first + 2,
        "a unix connection per connection: {} then {}",
        after_first,
        bed.app.accepts()
    );
    let carriers = bed.carried_by(0);
    let mut distinct = carriers.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        carriers.len(),
        "never two messages on one unix connection: {carriers:?}"
    );
}

#[test]
fn a_receiver_that_did_not_ask_for_it_has_no_unix_connection_kept() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("kn", 85, Reads::BatchesNotKept);
    bed.batch(0, 2);
    let after_first = bed.app.accepts();
    let seen = bed.messages();
    bed.batch(1, 3);
    assert!(
        bed.app.accepts() > after_first,
        "a new unix connection for the second batch"
    );
    let carriers = bed.carried_by(seen);
    assert!(
        !carriers.is_empty() && carriers.iter().all(|&n| n >= after_first),
        "the second batch went on unix connections made for it: {carriers:?}"
    );
}

/// A receiver that says it is leaving (`UnixReceiver::leave` writes "L";
/// written here on its unix connection, idle between batches): the agent
/// keeps that unix connection no longer, the next batch goes on a new one,
/// and the leaving receiver reads the end of its stream.
#[test]
fn a_leaving_receiver_s_unix_connection_is_not_used_again() {
    use std::io::Write;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::new("kl", 87, Reads::Batches);
    bed.batch(0, 2);
    let before = bed.app.accepts();
    let seen = bed.messages();
    // Those the agent closed refuse it; the kept one takes it.
    let told = bed
        .app
        .accepted
        .lock()
        .unwrap()
        .iter()
        .filter(|s| (&**s).write_all(b"L").is_ok())
        .count();
    assert!(told >= 1, "a unix connection kept open to say it on");
    bed.batch(1, 3);
    let carriers = bed.carried_by(seen);
    assert!(
        !carriers.is_empty() && carriers.iter().all(|&n| n >= before),
        "the batch went on a unix connection made after the leave: {carriers:?} (from {before})"
    );
}
