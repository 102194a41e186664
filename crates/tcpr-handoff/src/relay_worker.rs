//! Relays that outlive the agent: `--forward` hands each connection and
//! its server connection to a relay worker, a process of its own (in its
//! own process group, so a signal to the agent's group does not reach it),
//! over a unix socketpair. An agent killed mid-run then fails no request:
//! the relays it started go on in the worker.
//!
//! A connection whose resume has nothing to do once repair mode is off (no
//! unsent data, no FIN to replay: every connection a balancer hands off)
//! goes to the worker *before* it is resumed, and the worker starts its
//! relay when the agent says it resumed it. An agent killed between the
//! resume and the hand-over used to take the only copy of a live socket
//! with it: the kernel closed it with a RST (its request unread) and the
//! client's download broke. The worker now holds a copy throughout. It
//! holds a pair only once the batch is committed (the sender sent COMMIT,
//! the journal says resuming; the sender keeps its copy frozen for good),
//! so at the agent's end it resumes each held connection still in repair
//! mode, as the agent was about to, and relays them all.
//!
//! ```text
//! agent -> worker, 9 bytes each: a kind byte, then an id (u64, big-endian)
//!   "p" id + two fds (SCM_RIGHTS): a resumed connection, then its server
//!       connection: relay them; answered
//!   "f" id + two fds: a connection not resumed yet (in repair mode) whose
//!       resume ends when repair mode goes off, then its server
//!       connection: hold them; answered
//!   "g" id: the held pair `id` is resumed: relay it; not answered
//!   "x" id: the held pair `id` was not resumed: close it; not answered
//! at end of stream: each held pair is relayed, its connection first
//!   taken out of repair mode if the agent died before its resume
//! worker -> agent, per "p" or "f": one byte, "k" once it has the pair (the
//!   agent may close its copies, after "g" for a held one), "n" when it
//!   cannot (the agent relays it itself)
//! ```
//!
//! The worker stops taking pairs at end of stream on its socket (the
//! agent exited or died), settles the pairs it holds as above, finishes
//! every relay it has, and exits. The agent starts a new worker when its
//! worker is gone; when none can be started it relays in process, as a
//! library user's agent always does.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The agent's message kinds (see the module doc).
const PAIR: u8 = b'p';
const HOLD: u8 = b'f';
const GO: u8 = b'g';
const DROP: u8 = b'x';
/// A message: its kind and an id.
const MESSAGE_BYTES: usize = 9;
/// The worker's answer: it relays the pair.
const TAKEN: u8 = b'k';
/// The worker's answer: it cannot (no thread); the agent keeps the pair.
const REFUSED: u8 = b'n';
/// How long the worker has to answer; a pair sent is queued for it, so
/// it relays the pair even when it answers late.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How to start the worker: a program and its arguments (the tcpr binary
/// and its hidden `relay-worker` subcommand); the socketpair end is its
/// standard input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

/// The agent's handle on its relay worker (shared by its sessions).
#[derive(Debug)]
pub struct RelayWorker {
    command: WorkerCommand,
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    /// Not started yet, or the last one is gone.
    Idle,
    Running {
        /// Shared with the pairs it holds ([`Held`]), which tell it their
        /// fate on this very socket even if it is retired meanwhile.
        to: Arc<UnixStream>,
        child: Child,
    },
    /// None could be started: relays stay in process (logged once).
    Unavailable,
}

/// Where a pair went.
pub enum Handed {
    /// The worker relays it: close our copies.
    ToWorker,
    /// No worker: the pair is still ours.
    Back(TcpStream, TcpStream),
}

impl RelayWorker {
    /// A handle that starts its worker with `command` when first needed
    /// (or at [`RelayWorker::start`]).
    pub fn new(command: WorkerCommand) -> Self {
        RelayWorker {
            command,
            state: Mutex::new(State::Idle),
        }
    }

    /// Starts the worker now, unless one runs; a failure is logged once,
    /// and relays stay in process.
    pub fn start(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.ensure(&mut state);
    }

    fn ensure(&self, state: &mut State) {
        if let State::Running { child, .. } = state {
            if matches!(child.try_wait(), Ok(None)) {
                return;
            }
            tracing::warn!("the relay worker ended; starting another");
            retire(state);
        }
        if matches!(state, State::Idle) {
            *state = match self.spawn() {
                Ok((to, child)) => State::Running {
                    to: Arc::new(to),
                    child,
                },
                Err(e) => {
                    tracing::warn!(
                        "cannot start the relay worker ({}): relays stay in the agent \
                         and end with it: {e}",
                        self.command.program.display()
                    );
                    State::Unavailable
                }
            };
        }
    }

    fn spawn(&self) -> io::Result<(UnixStream, Child)> {
        let (ours, theirs) = UnixStream::pair()?;
        let child = Command::new(&self.command.program)
            .args(&self.command.args)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            // Its own group: a signal to the agent's group (a terminal's
            // ^C, a supervisor's kill of the group) leaves the relays be.
            .process_group(0)
            .spawn()?;
        // Reaped when it ends, by `try_wait` above or here at drop.
        ours.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        Ok((ours, child))
    }

    /// Hands the pair to the worker (started if needed). `Back` when there
    /// is none or it refused: the caller relays in process.
    pub fn hand(&self, client: TcpStream, server: TcpStream) -> Handed {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.ensure(&mut state);
        let State::Running { to, .. } = &*state else {
            return Handed::Back(client, server);
        };
        let sent = tcpr_host::send_with_fds(
            to.as_fd(),
            &message(PAIR, 0),
            &[client.as_fd(), server.as_fd()],
        );
        if let Err(e) = sent {
            // Nothing was queued: the pair is ours alone.
            tracing::warn!("the relay worker is gone ({e}); relaying in the agent");
            retire(&mut state);
            return Handed::Back(client, server);
        }
        let mut answer = [0u8; 1];
        match (&**to).read(&mut answer) {
            Ok(1) if answer[0] == TAKEN => Handed::ToWorker,
            Ok(1) if answer[0] == REFUSED => Handed::Back(client, server),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                // The pair is queued for it: it relays it when it reads it,
                // and we must not too. It is retired (our end closes, so it
                // exits once its relays end); the next pair starts another.
                tracing::warn!("the relay worker is slow to answer; starting another");
                retire(&mut state);
                Handed::ToWorker
            }
            // It died (end of stream, or a reset): its copies died with
            // it, ours are the only ones left.
            other => {
                tracing::warn!("the relay worker is gone ({other:?}); relaying in the agent");
                retire(&mut state);
                Handed::Back(client, server)
            }
        }
    }
}

impl RelayWorker {
    /// Gives the worker copies of a connection not resumed yet (in repair
    /// mode; its resume must end when repair mode goes off, see
    /// `tcpr_engine::Restored::done_when_live`) and of its server
    /// connection, before the caller resumes it. `None` when there is no
    /// worker or it refused: the caller resumes and relays as without one.
    /// The caller keeps its own copies until [`Held::go`] or
    /// [`Held::drop_it`].
    pub fn hold(&self, client: std::os::fd::BorrowedFd<'_>, server: &TcpStream) -> Option<Held> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.ensure(&mut state);
        let State::Running { to, .. } = &*state else {
            return None;
        };
        let id = {
            use std::sync::atomic::{AtomicU64, Ordering};
            static NEXT: AtomicU64 = AtomicU64::new(1);
            NEXT.fetch_add(1, Ordering::Relaxed)
        };
        let sent =
            tcpr_host::send_with_fds(to.as_fd(), &message(HOLD, id), &[client, server.as_fd()]);
        if let Err(e) = sent {
            tracing::warn!("the relay worker is gone ({e}); relaying in the agent");
            retire(&mut state);
            return None;
        }
        let mut answer = [0u8; 1];
        match (&**to).read(&mut answer) {
            Ok(1) if answer[0] == TAKEN => Some(Held {
                to: to.clone(),
                id,
                told: false,
            }),
            Ok(1) if answer[0] == REFUSED => None,
            other => {
                // Slow, dead or confused: a live one may still hold the pair
                // ("f" is queued) and would resume and relay it at its end
                // while the caller does too; "x" right behind the "f" has it
                // close its copies (in repair mode: silently). A dead one
                // reads neither, and its copies died with it.
                tracing::warn!(
                    "the relay worker did not take a pair ({other:?}); starting another"
                );
                let _ = (&**to).write_all(&message(DROP, id));
                retire(&mut state);
                None
            }
        }
    }
}

/// A pair the worker holds before its connection is resumed.
#[must_use = "a held pair is relayed on `go` and closed on `drop_it`"]
pub struct Held {
    /// The socket to the worker that holds it (retired or not).
    to: Arc<UnixStream>,
    id: u64,
    /// Whether `go` or `drop_it` told the worker; a `Held` dropped
    /// otherwise (an unwinding caller) tells it to drop the pair.
    told: bool,
}

impl Held {
    /// The connection is resumed: the worker relays it. True when told
    /// (the caller then closes its copies); false when that worker is gone,
    /// its copies with it: the caller relays its own.
    pub fn go(mut self) -> bool {
        self.told = true;
        match (&*self.to).write_all(&message(GO, self.id)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("the relay worker is gone ({e})");
                false
            }
        }
    }

    /// The connection was not resumed: the worker closes its copies (the
    /// connection is in repair mode: silently).
    pub fn drop_it(mut self) {
        self.told = true;
        let _ = (&*self.to).write_all(&message(DROP, self.id));
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.told {
            let _ = (&*self.to).write_all(&message(DROP, self.id));
        }
    }
}

fn message(kind: u8, id: u64) -> [u8; MESSAGE_BYTES] {
    let mut m = [0u8; MESSAGE_BYTES];
    m[0] = kind;
    m[1..].copy_from_slice(&id.to_be_bytes());
    m
}

/// Lets the worker go: our end closes (it exits once its relays end) and
/// a thread reaps it.
fn retire(state: &mut State) {
    if let State::Running { to, mut child } = std::mem::replace(state, State::Idle) {
        drop(to);
        let _ = std::thread::Builder::new()
            .name("tcpr-relay-reap".into())
            .spawn(move || child.wait());
    }
}

/// The worker's main: takes pairs from `from` (the agent's end is the
/// other one) until end of stream, and relays them on a few event loops
/// ([`tcpr_host::relay::Relays`], one per CPU: one wake-up serves the
/// events of every relay that has some, where a thread per relay woke per
/// event), then settles the pairs it holds (see the module doc) and waits
/// for every relay to end. This thread only takes pairs and answers, so
/// the agent, which waits for each answer, waits for no relay's work.
pub fn serve(mut from: UnixStream) -> io::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut relays = match tcpr_host::relay::Relays::new(threads, "tcpr-relay", ended) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(
                "relay worker: cannot start its relay threads ({e}); the agent keeps its pairs"
            );
            None
        }
    };
    let mut held: HashMap<u64, (TcpStream, TcpStream)> = HashMap::new();
    loop {
        let mut m = [0u8; MESSAGE_BYTES];
        let (n, fds) = match tcpr_host::recv_with_fds(from.as_fd(), &mut m) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A "p" or "f" whose descriptors did not arrive whole (out of
            // descriptors here): its 9 bytes are read; the agent keeps the
            // pair. Only those two carry descriptors, and both are answered.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                tracing::warn!("relay worker: a pair did not arrive whole: {e}");
                answer(&mut from, REFUSED);
                continue;
            }
            Err(e) => {
                tracing::warn!("relay worker: the agent's socket failed: {e}");
                break;
            }
        };
        if n == 0 {
            break;
        }
        // A message is written whole; should a read return part of one,
        // the rest follows in the stream.
        if n < MESSAGE_BYTES && (&from).read_exact(&mut m[n..]).is_err() {
            break;
        }
        let id = u64::from_be_bytes(m[1..].try_into().expect("eight bytes"));
        match m[0] {
            kind @ (PAIR | HOLD) => {
                let mut fds = fds.into_iter();
                let (Some(client), Some(server), None, Some(relays)) =
                    (fds.next(), fds.next(), fds.next(), relays.as_mut())
                else {
                    // Not a pair, or nothing to relay it on: the agent
                    // keeps whatever it sent.
                    answer(&mut from, REFUSED);
                    continue;
                };
                let (client, server) = (TcpStream::from(client), TcpStream::from(server));
                if kind == HOLD {
                    held.insert(id, (client, server));
                    answer(&mut from, TAKEN);
                    continue;
                }
                let peer = client.peer_addr().ok();
                match relays.add(client, server, peer) {
                    Ok(()) => answer(&mut from, TAKEN),
                    Err(not) => {
                        // Our copies close here; the agent still holds its
                        // own until our answer.
                        tracing::warn!(
                            "relay worker: cannot relay a pair ({}); the agent keeps it",
                            not.error
                        );
                        drop(not);
                        answer(&mut from, REFUSED);
                    }
                }
            }
            GO => match (held.remove(&id), relays.as_mut()) {
                (Some((client, server)), Some(relays)) => relay_held(relays, client, server),
                _ => tracing::warn!("relay worker: no held pair {id} to relay"),
            },
            // Never resumed: in repair mode, so it closes silently.
            DROP => drop(held.remove(&id)),
            other => tracing::warn!("relay worker: unknown message {other:#x}"),
        }
    }
    // The agent is gone. A held pair was committed (the agent holds pairs
    // only once the sender's COMMIT came, and its journal says resuming):
    // the sender keeps its copy frozen and never speaks on it again. So a
    // held connection still in repair mode is resumed here, as the agent
    // was about to (repair mode off is all its resume had left to do), and
    // every held connection is relayed.
    for (_, (client, server)) in held.drain() {
        let live = match tcpr_engine::is_frozen(client.as_fd()) {
            Ok(false) => Ok(()),
            Ok(true) => tcpr_engine::resume_in_place(client.as_fd())
                .map_err(|e| format!("cannot resume it: {e}")),
            Err(e) => Err(e.to_string()),
        };
        match (live, relays.as_mut()) {
            (Ok(()), Some(relays)) => relay_held(relays, client, server),
            (Ok(()), None) => {
                tracing::error!(
                    "relay worker: a resumed connection cannot be relayed (no relay threads)"
                );
                let _ = tcpr_engine::close_silently(client.into());
            }
            // Still in repair mode: it closes silently.
            (Err(e), _) => tracing::warn!("relay worker: a connection its agent left: {e}"),
        }
    }
    if let Some(relays) = relays {
        relays.finish();
    }
    Ok(())
}

/// Relays a held pair whose connection is resumed, on a thread of its own
/// when the event loops cannot take it (nobody else holds it any more).
fn relay_held(
    relays: &mut tcpr_host::relay::Relays<Option<SocketAddr>>,
    client: TcpStream,
    server: TcpStream,
) {
    let peer = client.peer_addr().ok();
    let Err(not) = relays.add(client, server, peer) else {
        return;
    };
    let (client, server) = not.pair;
    let Some(peer) = peer else {
        tracing::error!("relay worker: a resumed connection without a peer cannot be relayed");
        let _ = tcpr_engine::close_silently(client.into());
        return;
    };
    if let Err((client, e)) = crate::deliver::forward(client, server, peer) {
        // Closed silently: its client retransmits into nothing rather than
        // taking a FIN for the end of a complete response.
        tracing::error!("relay worker: cannot relay a resumed connection from {peer}: {e}");
        let _ = tcpr_engine::close_silently(client.into());
    }
}

fn answer(to: &mut UnixStream, byte: u8) {
    // An agent gone before our answer: what we took is ours (it held the
    // only other copies), and we relay it.
    if let Err(e) = to.write_all(&[byte]) {
        tracing::debug!("relay worker: the agent did not take the answer: {e}");
    }
}

fn ended(
    peer: Option<SocketAddr>,
    outcome: Result<tcpr_host::relay::Relayed, tcpr_host::relay::RelayError>,
) {
    match outcome {
        Ok(r) => tracing::debug!(
            ?peer,
            to_server = r.first_to_second,
            to_client = r.second_to_first,
            "forwarded connection closed"
        ),
        Err(e) => tracing::info!(?peer, "forwarded connection ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Two ends of a loopback TCP connection.
    fn connection() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let outside = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (outside, l.accept().unwrap().0)
    }

    /// Hands a new pair to the worker as the agent does, checks that it
    /// was taken and closes the agent's copies; returns the client's and
    /// the server's ends.
    fn hand_pair(agent: &UnixStream) -> (TcpStream, TcpStream) {
        let (client, client_in) = connection();
        let (server_out, server) = connection();
        tcpr_host::send_with_fds(
            agent.as_fd(),
            &message(PAIR, 0),
            &[client_in.as_fd(), server_out.as_fd()],
        )
        .unwrap();
        let mut answer = [0u8; 1];
        (&*agent).read_exact(&mut answer).unwrap();
        assert_eq!(answer[0], TAKEN);
        (client, server)
    }

    /// A pair handed over, acknowledged, and the agent's end and copies
    /// closed: the worker relays both ways to the end, then returns.
    #[test]
    fn a_pair_relays_on_after_its_agent_is_gone() {
        let (agent, worker) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || serve(worker));
        let (client, server) = hand_pair(&agent);
        drop(agent);
        exchange(client, server);
        serving.join().unwrap().unwrap();
    }

    /// Many pairs handed over one after another, then all driven at once
    /// with their agent gone: each gets its own bytes back and forth (the
    /// server answers after the client's end of stream and closes), and
    /// the worker returns once every relay ended.
    #[test]
    fn many_pairs_relay_at_once_after_their_agent_is_gone() {
        const PAIRS: usize = 24;
        let (agent, worker) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || serve(worker));
        let mut ends = Vec::new();
        for _ in 0..PAIRS {
            ends.push(hand_pair(&agent));
        }
        drop(agent);
        let bytes = |n: usize, seed: u8| -> Vec<u8> {
            (0..(n * 4099) % (200 << 10) + 1)
                .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
                .collect()
        };
        let threads: Vec<_> = ends
            .into_iter()
            .enumerate()
            .map(|(n, (mut client, mut server))| {
                let (up, down) = (bytes(n, 1), bytes(n + PAIRS, 2));
                let up2 = up.clone();
                let down2 = down.clone();
                let serving = std::thread::spawn(move || {
                    let mut got = Vec::new();
                    server.read_to_end(&mut got).unwrap();
                    assert_eq!(got, up2, "pair {n}: the request");
                    server.write_all(&down2).unwrap();
                });
                std::thread::spawn(move || {
                    client.write_all(&up).unwrap();
                    client.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut got = Vec::new();
                    client.read_to_end(&mut got).unwrap();
                    assert_eq!(got, down, "pair {n}: the response");
                    serving.join().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        serving.join().unwrap().unwrap();
    }

    /// Gives the worker a pair to hold ("f" `id`), as the agent does
    /// before a resume; `frozen` puts the connection in repair mode first
    /// (as a restored connection not resumed yet is). Returns the client's
    /// end, the server's end and the agent's copy of the connection.
    fn hold_pair(agent: &UnixStream, id: u64, frozen: bool) -> (TcpStream, TcpStream, TcpStream) {
        let (client, client_in) = connection();
        let (server_out, server) = connection();
        if frozen {
            tcpr_host::sock::set_int(client_in.as_fd(), libc::SOL_TCP, libc::TCP_REPAIR, 1)
                .unwrap();
        }
        tcpr_host::send_with_fds(
            agent.as_fd(),
            &message(HOLD, id),
            &[client_in.as_fd(), server_out.as_fd()],
        )
        .unwrap();
        let mut answer = [0u8; 1];
        (&*agent).read_exact(&mut answer).unwrap();
        assert_eq!(answer[0], TAKEN);
        (client, server, client_in)
    }

    /// One exchange through a relayed pair: the client's request reaches
    /// the server, the server's response and end reach the client.
    fn exchange(mut client: TcpStream, mut server: TcpStream) {
        client.write_all(b"request").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).unwrap();
        assert_eq!(request, b"request");
        server.write_all(b"response").unwrap();
        drop(server);
        let mut response = Vec::new();
        client.read_to_end(&mut response).unwrap();
        assert_eq!(response, b"response");
    }

    /// A held pair is relayed once the agent says it resumed it ("g"),
    /// after the agent closed its copies.
    #[test]
    fn a_held_pair_is_relayed_on_go() {
        let (agent, worker) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || serve(worker));
        let (client, server, agents_copy) = hold_pair(&agent, 7, false);
        (&agent).write_all(&message(GO, 7)).unwrap();
        drop(agents_copy);
        exchange(client, server);
        drop(agent);
        serving.join().unwrap().unwrap();
    }

    /// The agent dies with two held pairs: one resumed without its "g",
    /// one still in repair mode (COMMIT taken, resume not done). At the
    /// end of its stream the worker relays the first and resumes and
    /// relays the second: both exchanges go through.
    #[test]
    fn held_pairs_are_settled_when_the_agent_dies() {
        let (agent, worker) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || serve(worker));
        let (client, server, resumed_copy) = hold_pair(&agent, 1, false);
        let (frozen_client, frozen_server, frozen_copy) = hold_pair(&agent, 2, true);
        // The agent and its copies die.
        drop((agent, resumed_copy, frozen_copy));
        exchange(client, server);
        exchange(frozen_client, frozen_server);
        serving.join().unwrap().unwrap();
    }

    /// A held pair the agent could not resume ("x") is closed, silently.
    #[test]
    fn a_dropped_pair_closes_silently() {
        let (agent, worker) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || serve(worker));
        let (client, mut server, agents_copy) = hold_pair(&agent, 3, true);
        (&agent).write_all(&message(DROP, 3)).unwrap();
        drop(agents_copy);
        let mut end = Vec::new();
        server.read_to_end(&mut end).unwrap();
        assert!(end.is_empty());
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut byte = [0u8; 1];
        let silent = (&client).read(&mut byte);
        assert!(
            matches!(&silent, Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
            "closed silently, got {silent:?}"
        );
        drop(agent);
        serving.join().unwrap().unwrap();
    }

    /// A worker (here a stand-in) that answers a hold with neither "k"
    /// nor "n": the agent gives up on it and, right behind the "f", sends
    /// "x" for the same pair, so that the worker, should it hold the pair
    /// after all, closes it instead of relaying it at its end while the
    /// agent relays it too.
    #[test]
    fn a_hold_answered_oddly_is_followed_by_a_drop() {
        const FAKE: &str = r#"
import os, socket, sys
s = socket.socket(fileno=0)
first, fds, _, _ = socket.recv_fds(s, 9, 4)
for fd in fds:
    os.close(fd)
s.sendall(b"z")
rest = b""
while len(rest) < 9:
    b = s.recv(9 - len(rest))
    if not b:
        break
    rest += b
with open(sys.argv[1] + ".part", "wb") as f:
    f.write(first + rest)
os.rename(sys.argv[1] + ".part", sys.argv[1])
"#;
        let out = std::env::temp_dir().join(format!("tcpr-fake-worker-{}", std::process::id()));
        let _ = std::fs::remove_file(&out);
        let w = RelayWorker::new(WorkerCommand {
            program: "python3".into(),
            args: vec!["-c".into(), FAKE.into(), out.to_str().unwrap().into()],
        });
        let (_client, client_in) = connection();
        let (server_out, _server) = connection();
        assert!(w.hold(client_in.as_fd(), &server_out).is_none());
        let start = std::time::Instant::now();
        while !out.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the stand-in wrote nothing"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let got = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        assert_eq!(got.len(), 2 * MESSAGE_BYTES, "{got:?}");
        assert_eq!(got[0], HOLD);
        assert_eq!(
            got[MESSAGE_BYTES], DROP,
            "the odd answer is followed by a drop"
        );
        assert_eq!(
            got[1..MESSAGE_BYTES],
            got[MESSAGE_BYTES + 1..],
            "of the same pair"
        );
    }

    /// A message without two descriptors is refused; the worker goes on.
    #[test]
    fn a_message_without_a_pair_is_refused() {
        let (one, _other) = connection();
        let (agent, worker) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || serve(worker));
        tcpr_host::send_with_fd(agent.as_fd(), &message(PAIR, 0), one.as_fd()).unwrap();
        let mut answer = [0u8; 1];
        (&agent).read_exact(&mut answer).unwrap();
        assert_eq!(answer[0], REFUSED);
        drop(agent);
        serving.join().unwrap().unwrap();
    }
}
