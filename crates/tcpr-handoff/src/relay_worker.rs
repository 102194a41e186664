//! Relays that outlive the agent: `--forward` hands each connection and
//! its server connection to a relay worker, a process of its own (in its
//! own process group, so a signal to the agent's group does not reach it),
//! over a unix socketpair. An agent killed mid-run then fails no request:
//! the relays it started go on in the worker.
//!
//! ```text
//! agent -> worker, per connection: one byte "p" carrying two fds
//!   (SCM_RIGHTS): the client connection, then the server connection
//! worker -> agent: one byte, "k" once it relays the pair (the agent then
//!   closes its copies), "n" when it cannot (the agent relays it itself)
//! ```
//!
//! The worker stops taking pairs at end of stream on its socket (the
//! agent exited or died), finishes every relay it has, and exits. The
//! agent starts a new worker when its worker is gone; when none can be
//! started it relays in process, as a library user's agent always does.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// What the agent sends with each pair.
const PAIR: &[u8; 1] = b"p";
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
        to: UnixStream,
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
                Ok((to, child)) => State::Running { to, child },
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
        let sent = tcpr_host::send_with_fds(to.as_fd(), PAIR, &[client.as_fd(), server.as_fd()]);
        if let Err(e) = sent {
            // Nothing was queued: the pair is ours alone.
            tracing::warn!("the relay worker is gone ({e}); relaying in the agent");
            retire(&mut state);
            return Handed::Back(client, server);
        }
        let mut answer = [0u8; 1];
        match (&*to).read(&mut answer) {
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
/// event), then waits for every relay to end. This thread only takes
/// pairs and answers, so the agent, which waits for each answer, waits
/// for no relay's work.
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
    loop {
        let mut byte = [0u8; 1];
        let (n, fds) = match tcpr_host::recv_with_fds(from.as_fd(), &mut byte) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("relay worker: the agent's socket failed: {e}");
                break;
            }
        };
        if n == 0 {
            break;
        }
        let mut fds = fds.into_iter();
        let (Some(client), Some(server), None, Some(relays)) =
            (fds.next(), fds.next(), fds.next(), relays.as_mut())
        else {
            // Not a pair, or nothing to relay it on: the agent keeps
            // whatever it sent.
            answer(&mut from, REFUSED);
            continue;
        };
        let (client, server) = (TcpStream::from(client), TcpStream::from(server));
        let peer = client.peer_addr().ok();
        match relays.add(client, server, peer) {
            Ok(()) => answer(&mut from, TAKEN),
            Err(not) => {
                // Our copies close here; the agent still holds its own
                // until our answer.
                tracing::warn!(
                    "relay worker: cannot relay a pair ({}); the agent keeps it",
                    not.error
                );
                drop(not);
                answer(&mut from, REFUSED);
            }
        }
    }
    if let Some(relays) = relays {
        relays.finish();
    }
    Ok(())
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
            PAIR,
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
        let (mut client, mut server) = hand_pair(&agent);
        drop(agent);

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

    /// A message without two descriptors is refused; the worker goes on.
    #[test]
    fn a_message_without_a_pair_is_refused() {
        let (one, _other) = connection();
        let (agent, worker) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || serve(worker));
        tcpr_host::send_with_fd(agent.as_fd(), PAIR, one.as_fd()).unwrap();
        let mut answer = [0u8; 1];
        (&agent).read_exact(&mut answer).unwrap();
        assert_eq!(answer[0], REFUSED);
        drop(agent);
        serving.join().unwrap().unwrap();
    }
}
