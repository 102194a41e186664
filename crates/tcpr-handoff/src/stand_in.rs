//! The agent's stand-in: a child process that holds a copy of the agent's
//! listening socket and, when the agent dies without saying goodbye
//! (SIGKILL, a crash, the OOM killer), answers senders' QUERYs from the
//! agent's journal for a while, as a restarted agent would.
//!
//! Why: a sender that sent COMMIT and lost the agent cannot tell whether
//! anything was resumed, so it asks on a new channel; with no one to
//! answer (an agent killed and not restarted) the connections stay frozen
//! and are reported unknown, because a duplicate would be worse. The
//! journal has the answer on disk (page cache survives a killed process);
//! the stand-in reads it out. It answers QUERY only: any other message
//! (PING, HELLO) ends the channel, so a sender's new batch fails before
//! COMMIT and rolls back.
//!
//! Lifecycle: the agent spawns it (its own process group, so that a
//! terminal's ^C to the agent does not reach it) with one end of a unix
//! socket on its standard input, and sends the listening socket over it
//! (SCM_RIGHTS). The stand-in then blocks reading: one byte is the agent's
//! goodbye (a clean end, SIGINT or SIGTERM: the stand-in leaves at once);
//! end of file without it means the agent died. It then serves QUERYs for
//! its period and exits, closing the listener. A restarted agent that
//! finds its address in use asks the stand-in to leave at once
//! ([`ask_to_leave`], over an abstract unix socket named after the
//! address: abstract names belong to the network namespace, like the
//! address), and waits up to `AgentConfig::bind_wait` for the address.

use crate::agent::from_journal;
use crate::agent::journal::{status_in, Journal};
use crate::auth::Auth;
use crate::machine::BatchStatus;
use crate::wire::{self, pb};
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The goodbye: the agent ends cleanly.
const GOODBYE: u8 = b'b';
/// The one byte that carries the listening socket.
const LISTENER: u8 = b'l';
/// The stand-in's answer: it holds the socket and runs as it will.
const READY: u8 = b'r';
/// The stand-in's answer to a request to leave from a user it does not
/// leave for.
const REFUSED: u8 = b'n';
/// How long the agent waits for that answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Channels served at once; more are closed at once (QUERYs are rare: one
/// per sender that lost the agent after COMMIT).
const MAX_CHANNELS: usize = 32;
/// How often the accept loop looks at the clock.
const ACCEPT_WAKEUP: Duration = Duration::from_millis(100);

/// The agent's handle on its stand-in.
#[derive(Debug)]
pub struct StandIn {
    to: UnixStream,
    /// Kept so that the child is not reaped early; it outlives the agent.
    _child: Child,
}

impl StandIn {
    /// Starts `program args` (this binary's hidden stand-in command) and
    /// gives it a copy of `listener`.
    pub fn spawn(program: &Path, args: &[String], listener: &TcpListener) -> io::Result<StandIn> {
        let (ours, theirs) = UnixStream::pair()?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        tcpr_host::send_with_fd(ours.as_fd(), &[LISTENER], listener.as_fd())?;
        // Ready once it holds the socket and dropped its privileges: the
        // agent starts serving only with a stand-in in place.
        ours.set_read_timeout(Some(READY_TIMEOUT))?;
        let mut b = [0u8; 1];
        match (&ours).read(&mut b) {
            Ok(1) if b[0] == READY => {}
            Ok(_) => {
                return Err(io::Error::other(
                    "the stand-in ended at start (its error is on standard error)",
                ))
            }
            Err(e) => {
                return Err(io::Error::other(format!(
                    "the stand-in did not answer: {e}"
                )))
            }
        }
        ours.set_read_timeout(None)?;
        Ok(StandIn {
            to: ours,
            _child: child,
        })
    }

    /// Says goodbye: the agent ends cleanly, and the stand-in leaves
    /// without standing in.
    pub fn goodbye(&self) {
        let _ = (&self.to).write_all(&[GOODBYE]);
    }
}

/// What the stand-in needs to answer.
#[derive(Debug, Clone)]
pub struct StandInConfig {
    /// How senders authenticate (the agent's).
    pub auth: Auth,
    /// The agent's journal directory.
    pub journal: PathBuf,
    /// The bound on a sender's handshake and on its QUERY.
    pub timeout: Duration,
    /// How long it stands in once the agent died.
    pub period: Duration,
}

/// The stand-in's side of the agent's socket: the listening socket the
/// agent sent first.
pub fn receive_listener(agent: &UnixStream) -> io::Result<TcpListener> {
    let mut b = [0u8; 1];
    let (n, fd) = tcpr_host::recv_with_fd(agent.as_fd(), &mut b)?;
    match (n, b[0], fd) {
        (1, LISTENER, Some(fd)) => Ok(TcpListener::from(fd)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the agent sent no listening socket",
        )),
    }
}

/// Tells the agent that the stand-in is in place (it holds the
/// listening socket and runs as the user it will serve as).
pub fn ready(agent: &UnixStream) -> io::Result<()> {
    (&*agent).write_all(&[READY])
}

/// How the stand-in ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The agent said goodbye: nothing to stand in for.
    Goodbye,
    /// The agent died; the stand-in served for its period, answering this
    /// many QUERYs.
    StoodIn(usize),
}

/// Waits for the agent to end; if it ended without a goodbye, serves
/// QUERYs on `listener` for `cfg.period` from the journal. `agent_pid` is
/// the agent's, given by the agent (not read as the parent's at start: the
/// agent may be gone by then): the stand-in never serves while its parent
/// is that process, whatever its socket says, since it would then share
/// the agent's listener and could answer for a batch the agent is
/// resuming.
pub fn serve(
    agent: UnixStream,
    agent_pid: u32,
    listener: TcpListener,
    cfg: &StandInConfig,
) -> io::Result<Ended> {
    let mut b = [0u8; 1];
    loop {
        match (&agent).read(&mut b) {
            Ok(1) if b[0] == GOODBYE => return Ok(Ended::Goodbye),
            Ok(0) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(_) => tracing::warn!("stand-in: an unexpected byte from the agent"),
            Err(e) => {
                tracing::warn!("stand-in: reading the agent's socket failed: {e}");
                std::thread::sleep(ACCEPT_WAKEUP);
            }
        }
        if std::os::unix::process::parent_id() != agent_pid {
            break;
        }
    }
    drop(agent);
    // The agent closed its end: it ends. Its last threads may still be
    // going (a process closes its descriptors as it exits): wait until
    // it is gone, which makes this process an orphan.
    let gone_by = Instant::now() + Duration::from_secs(5);
    while std::os::unix::process::parent_id() == agent_pid {
        if Instant::now() >= gone_by {
            tracing::warn!("stand-in: the agent closed its end but lives on: leaving");
            return Ok(Ended::Goodbye);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let addr = listener.local_addr()?;
    // Where a restarted agent asks it to leave; without it (the name is
    // taken), a new agent waits for the period's end.
    let leave = match UnixListener::bind_addr(&leave_name(addr)?) {
        Ok(l) => l.set_nonblocking(true).map(|()| Some(l))?,
        Err(e) => {
            tracing::warn!(
                "stand-in: cannot bind its leave socket ({e}): a new agent waits for it"
            );
            None
        }
    };
    tracing::warn!(
        "the agent ended without a goodbye: answering queries from its journal for {:?}",
        cfg.period
    );
    let journal = Arc::new(Answers {
        dir: cfg.journal.clone(),
        opened: std::sync::Mutex::new(None),
    });
    let tls = cfg
        .auth
        .server_config()
        .map_err(|e| io::Error::other(e.to_string()))?;
    tcpr_host::sock::set_recv_timeout(listener.as_fd(), ACCEPT_WAKEUP)?;
    let answered = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + cfg.period;
    while Instant::now() < deadline {
        if let Some(Ok((asked, _))) = leave.as_ref().map(UnixListener::accept) {
            // Only root or this user (an agent of the same user) may ask:
            // anyone else in the namespace could end its service.
            let uid = tcpr_host::sock::peer_uid(asked.as_fd()).ok();
            if uid == Some(0) || uid == own_uid() {
                tracing::info!("stand-in: a new agent takes {addr}: leaving");
                drop(listener);
                // The end of this connection tells the new agent that the
                // address is free.
                drop(asked);
                return Ok(Ended::StoodIn(answered.load(Ordering::SeqCst)));
            }
            // Refused; the senders' channels are served all the same
            // (no `continue`: a flood of asks cannot starve them).
            tracing::warn!("stand-in: refused a request to leave from uid {uid:?}");
            let _ = (&asked).write_all(&[REFUSED]);
        }
        let tcp = match listener.accept() {
            Ok((tcp, _)) => tcp,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!("stand-in: accept failed: {e}");
                std::thread::sleep(ACCEPT_WAKEUP);
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CHANNELS {
            busy.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (journal, tls, auth, timeout) =
            (journal.clone(), tls.clone(), cfg.auth.clone(), cfg.timeout);
        let (answered, done) = (answered.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("stand-in".into())
            .spawn(move || {
                match answer(&auth, tls, tcp, &journal, timeout) {
                    Ok(true) => {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(false) => {}
                    Err(e) => tracing::info!("stand-in: a channel ended: {e}"),
                }
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
    // The address goes first; channels still being answered finish
    // within their timeout.
    drop(listener);
    drop(leave);
    let until = Instant::now() + cfg.timeout.saturating_mul(2);
    while busy.load(Ordering::SeqCst) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Ended::StoodIn(answered.load(Ordering::SeqCst)))
}

/// The journal, read for each QUERY. It is opened (which starts a segment
/// of the stand-in's own, and prunes old ones) only for a batch whose
/// address must be given back, the one answer that writes a line.
struct Answers {
    dir: PathBuf,
    opened: std::sync::Mutex<Option<Journal>>,
}

impl Answers {
    fn status(&self, batch: u64) -> BatchStatus {
        let recorded = status_in(&self.dir, batch);
        if recorded.give_back.is_none() {
            return recorded.status;
        }
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if opened.is_none() {
            match Journal::open(&self.dir) {
                Ok(j) => *opened = Some(j),
                Err(e) => {
                    tracing::error!(
                        "stand-in: cannot open the journal to give back an address: {e}"
                    );
                    return BatchStatus::Unknown;
                }
            }
        }
        match opened.as_ref() {
            Some(j) => from_journal(j, batch),
            None => BatchStatus::Unknown,
        }
    }
}

/// This process's effective user id (from /proc/self/status: std has no
/// getuid, and the syscall layer is not needed for a file).
fn own_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The abstract unix socket name of the stand-in for `addr`.
fn leave_name(addr: std::net::SocketAddr) -> io::Result<std::os::unix::net::SocketAddr> {
    std::os::unix::net::SocketAddr::from_abstract_name(format!("tcpr-stand-in {addr}"))
}

/// Asks a stand-in holding `addr` (in this network namespace) to leave,
/// and waits until it has let the address go; `false` when none holds it.
pub fn ask_to_leave(addr: std::net::SocketAddr) -> bool {
    let Ok(name) = leave_name(addr) else {
        return false;
    };
    let Ok(mut s) = UnixStream::connect_addr(&name) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut b = [0u8; 1];
    // It closes the connection once its listener is closed, or refuses.
    !matches!(s.read(&mut b), Ok(1) if b[0] == REFUSED)
}

/// One channel: authenticates the sender and answers its QUERY; true when
/// it answered one.
fn answer(
    auth: &Auth,
    tls: Arc<rustls::ServerConfig>,
    tcp: std::net::TcpStream,
    journal: &Answers,
    timeout: Duration,
) -> Result<bool, String> {
    let mut ch = auth
        .accept_until(tls, tcp, Instant::now().checked_add(timeout))
        .map_err(|e| e.to_string())?;
    ch.tcp()
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let msg = wire::read_msg(&mut ch).map_err(|e| e.to_string())?;
    let Some(pb::message::Kind::Query(q)) = msg.kind else {
        // Not a question for a stand-in: the sender's batch fails before
        // COMMIT and rolls back.
        return Ok(false);
    };
    let status = journal.status(q.batch);
    tracing::info!(batch = q.batch, ?status, "stand-in: answered a query");
    let reply = pb::Message {
        kind: Some(pb::message::Kind::Status(wire::status_to_wire(
            q.batch, &status,
        ))),
    };
    wire::write_msg(&mut ch, &reply).map_err(|e| e.to_string())?;
    ch.flush().map_err(|e| e.to_string())?;
    ch.close(Duration::from_millis(100));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in whose agent is gone serves, refuses to leave for another
    /// user (nobody, by python), and leaves for root at once.
    #[test]
    fn it_leaves_for_root_and_not_for_another_user() {
        let dir = std::env::temp_dir().join(format!("tcpr-stand-in-{}", std::process::id()));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (agent, gone) = UnixStream::pair().unwrap();
        drop(gone);
        let cfg = StandInConfig {
            auth: Auth::Psk(Arc::new(vec![7u8; 32])),
            journal: dir.clone(),
            timeout: Duration::from_secs(1),
            period: Duration::from_secs(30),
        };
        // No process of pid u32::MAX is anyone's parent: the agent is gone.
        let serving = std::thread::spawn(move || serve(agent, u32::MAX, listener, &cfg));
        let name = format!("\\0tcpr-stand-in {addr}");
        let script = format!(
            "import socket,time\n\
             for _ in range(100):\n  \
               try:\n    s=socket.socket(socket.AF_UNIX); s.connect('{name}'); break\n  \
               except OSError: time.sleep(0.05)\n\
             print(s.recv(1))"
        );
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "b'n'",
            "nobody is refused"
        );
        assert!(!serving.is_finished(), "the stand-in stays for nobody");
        assert!(ask_to_leave(addr), "root is let in");
        let ended = serving.join().unwrap().unwrap();
        assert_eq!(ended, Ended::StoodIn(0));
        // The address is free again.
        TcpListener::bind(addr).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
