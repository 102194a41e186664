//! tcpr handoff: moves live TCP connections from one host to another in
//! two phases, so that a failure never loses one.
//!
//! - [`machine`]: the protocol's two ends as pure state machines;
//! - [`wire`]: framing and the protobuf messages;
//! - [`auth`]: the TLS channel, mutually authenticated by certificates or
//!   by a pre-shared key bound to the TLS session;
//! - [`agent`]: the receiving end (restore, then resume and deliver);
//! - [`sender`]: the sending end (freeze, dump, prepare, switch, commit);
//! - [`deliver`]: handing restored connections to applications;
//! - [`stand_in`]: answers senders' queries from the journal of an agent
//!   that was killed.
//!
//! This crate does not steer packets by itself: the sender switches traffic
//! by moving an address or by a hook the caller supplies.

pub mod agent;
pub mod auth;
pub mod deliver;
/// Entry points of the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing;
// Pure: no clock (the methods are listed in .clippy.toml).
#[deny(clippy::disallowed_methods)]
pub mod machine;
pub mod relay_worker;
pub mod sender;
pub mod stand_in;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod wire;

pub use agent::{AgentConfig, AgentServer, Delivery};
pub use auth::Auth;
pub use deliver::Delivered;
pub use machine::Framing;
pub use sender::{
    migrate, probe_agent, MigrateOptions, Outgoing, PeerSeq, Refused, Report, Switch, Timings,
    TrafficHook, UNSWITCH_FAILED,
};

/// Errors of a handoff as a whole (per-connection outcomes are in the
/// [`Report`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine refused (freeze, lock).
    #[error(transparent)]
    Engine(#[from] tcpr_engine::Error),
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Usage(String),
}

/// Whether a connection handed off moved, or stayed here (rolled back).
#[derive(Debug)]
pub enum HandOff {
    /// The agent owns it now.
    Moved,
    /// It stayed and carries on here, with why.
    Stayed(std::net::TcpStream, String),
    /// The agent may own it; it is frozen here until the lease ends. The
    /// stream is given back still frozen (repair mode): keep it, and thaw
    /// it only once the agent is known not to hold the connection. `None`
    /// when the batch was too large to keep a second handle per connection.
    Unknown(Option<std::net::TcpStream>, String),
}

/// A handoff that did not start: nothing was changed and every stream is
/// given back, in the input order, with its blob.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct HandOffError {
    /// Why.
    pub error: Error,
    /// The streams, untouched.
    pub conns: Vec<(std::net::TcpStream, Vec<u8>)>,
}

/// Hands connections (each with its application blob) to an agent, in one
/// batch. The result follows the input order; on error every stream comes
/// back untouched in the [`HandOffError`].
pub fn hand_off(
    conns: Vec<(std::net::TcpStream, Vec<u8>)>,
    opts: &MigrateOptions,
) -> Result<Vec<HandOff>, HandOffError> {
    let out = conns
        .into_iter()
        .map(|(s, blob)| Outgoing::new(s.into(), blob))
        .collect();
    hand_off_outgoing(out, opts)
}

/// [`hand_off`] of connections given as [`Outgoing`]s: with the listener
/// each was accepted from, say, for a server that hands off connections
/// as it accepts them.
pub fn hand_off_outgoing(
    out: Vec<Outgoing>,
    opts: &MigrateOptions,
) -> Result<Vec<HandOff>, HandOffError> {
    let n = out.len();
    let report = match migrate(out, opts, &|_| {}) {
        Ok(report) => report,
        Err(refused) => return without_the_unmovable(refused, opts),
    };
    // `migrate` gives each input exactly one outcome, by its index.
    let mut results: Vec<(usize, HandOff)> = Vec::with_capacity(n);
    results.extend(report.moved.into_iter().map(|m| (m.index, HandOff::Moved)));
    results.extend(report.rolled_back.into_iter().map(|r| match r.sock {
        Some(sock) => (r.index, HandOff::Stayed(sock.into(), r.why)),
        None => (
            r.index,
            HandOff::Unknown(
                None,
                format!("{}; the socket could not be given back", r.why),
            ),
        ),
    }));
    results.extend(
        report
            .unknown
            .into_iter()
            .map(|u| (u.index, HandOff::Unknown(u.sock.map(Into::into), u.why))),
    );
    results.sort_by_key(|(index, _)| *index);
    debug_assert_eq!(results.len(), n);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

/// A batch refused whole because some of its connections cannot be handed
/// off at all (a client that reset while it waited for its batch: its
/// socket is closed, and every connection is checked before any freeze):
/// the others go in a batch of their own, and those come back `Stayed`
/// with why. Any other refusal (or one where none, or all, are unmovable)
/// comes back whole, in the input order, as before.
fn without_the_unmovable(
    refused: Refused,
    opts: &MigrateOptions,
) -> Result<Vec<HandOff>, HandOffError> {
    use std::os::fd::AsFd;
    let unmovable: Vec<Option<String>> = refused
        .conns
        .iter()
        .map(|c| {
            tcpr_engine::inspect_socket(c.sock.as_fd())
                .err()
                .map(|e| e.to_string())
        })
        .collect();
    let whole = |refused: Refused| HandOffError {
        error: refused.error,
        conns: refused
            .conns
            .into_iter()
            .map(|c| (std::net::TcpStream::from(c.sock), c.blob))
            .collect(),
    };
    let some = unmovable.iter().filter(|u| u.is_some()).count();
    if some == 0 || some == unmovable.len() {
        return Err(whole(refused));
    }
    let Refused { error, conns } = refused;
    tracing::info!("a batch without its {some} connections that cannot move ({error})");
    let (mut left, mut movable, mut movable_at) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (c, why)) in conns.into_iter().zip(unmovable).enumerate() {
        match why {
            Some(why) => left.push((i, c, why)),
            None => {
                movable_at.push(i);
                movable.push(c);
            }
        }
    }
    match hand_off_outgoing(movable, opts) {
        Ok(handed) => {
            let mut results: Vec<(usize, HandOff)> = movable_at.into_iter().zip(handed).collect();
            results.extend(left.into_iter().map(|(i, c, why)| {
                let why = format!("cannot hand it off: {why}");
                (i, HandOff::Stayed(c.sock.into(), why))
            }));
            results.sort_by_key(|(i, _)| *i);
            Ok(results.into_iter().map(|(_, r)| r).collect())
        }
        Err(e) => {
            // Every stream back, in the input order.
            let mut back: Vec<(usize, (std::net::TcpStream, Vec<u8>))> =
                movable_at.into_iter().zip(e.conns).collect();
            back.extend(
                left.into_iter()
                    .map(|(i, c, _)| (i, (std::net::TcpStream::from(c.sock), c.blob))),
            );
            back.sort_by_key(|(i, _)| *i);
            Err(HandOffError {
                error: e.error,
                conns: back.into_iter().map(|(_, c)| c).collect(),
            })
        }
    }
}

/// Connections handed to this process by other hosts (an agent running on
/// a thread of its own, delivering in process).
pub struct Incoming {
    rx: std::sync::mpsc::Receiver<Delivered>,
    addr: std::net::SocketAddr,
}

impl Incoming {
    /// Listens for senders on `addr`; only connections whose local address
    /// is in `allow` are taken.
    pub fn bind(
        addr: std::net::SocketAddr,
        auth: Auth,
        allow: Vec<std::net::SocketAddr>,
    ) -> Result<Incoming, agent::AgentError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let server = AgentServer::bind(addr, AgentConfig::new(auth, allow, Delivery::Channel(tx)))?;
        let addr = server
            .local_addr()
            .map_err(|source| agent::AgentError::Listen { addr, source })?;
        std::thread::spawn(move || {
            if let Err(e) = server.run() {
                tracing::error!("handoff listener stopped: {e}");
            }
        });
        Ok(Incoming { rx, addr })
    }
    /// The address senders connect to.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }
    /// The next connection handed over (blocks).
    pub fn accept(&self) -> Option<Delivered> {
        self.rx.recv().ok()
    }
}

/// Hands connections to another process on this host, over its unix socket
/// at `path` ([`LocalIncoming`]). No freeze is needed: the socket itself is
/// passed (SCM_RIGHTS) and this side lets go only once the receiver has
/// acknowledged holding it, so a failure leaves the connection here. This
/// is the tool for a rolling upgrade on one host; [`hand_off`] is the one
/// across hosts.
pub fn hand_off_local(
    path: &std::path::Path,
    conns: Vec<(std::net::TcpStream, Vec<u8>)>,
) -> Vec<HandOff> {
    conns
        .into_iter()
        .map(|(s, blob)| {
            let sent = (|| -> std::io::Result<()> {
                let to = std::os::unix::net::UnixStream::connect(path)?;
                let fd = std::os::fd::OwnedFd::from(s.try_clone()?);
                deliver::send_unix(&to, &fd, &blob, s.local_addr()?, s.peer_addr()?)
            })();
            match sent {
                Ok(()) => HandOff::Moved,
                Err(e) => HandOff::Stayed(s, format!("{}: {e}", path.display())),
            }
        })
        .collect()
}

/// Connections handed to this process by another on the same host
/// ([`hand_off_local`], or an agent's `--unix` delivery, in batches:
/// [`deliver::UnixReceiver`]).
pub struct LocalIncoming {
    listener: std::os::unix::net::UnixListener,
    path: std::path::PathBuf,
    /// [`LocalIncoming::leave`] was called.
    leaving: std::sync::atomic::AtomicBool,
    reading: std::sync::Mutex<Reading>,
}

/// The unix connections [`LocalIncoming`] reads, and what it delivered
/// that was not taken yet.
#[derive(Default)]
struct Reading {
    from: Vec<deliver::UnixReceiver>,
    taken: std::collections::VecDeque<Delivered>,
    /// The unix connections open were told this receiver leaves.
    told: bool,
}

impl LocalIncoming {
    /// Listens on the unix socket `path` (replacing a stale one).
    pub fn bind(path: &std::path::Path) -> std::io::Result<LocalIncoming> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        Ok(LocalIncoming {
            listener: std::os::unix::net::UnixListener::bind(path)?,
            path: path.to_path_buf(),
            leaving: Default::default(),
            reading: Default::default(),
        })
    }

    /// Stops taking new deliveries without losing those on their way
    /// (an application about to stop): the socket's path goes, so a new
    /// unix connection fails at once (an agent's batch then rolls back,
    /// before COMMIT, or at its COMMIT check), and every unix connection
    /// open is told that this receiver leaves
    /// ([`deliver::UnixReceiver::leave`]), so that the agent keeps none.
    /// Go on calling [`LocalIncoming::accept`]: it hands out what still
    /// arrives, and returns `None` once every unix connection has ended.
    /// May be called while another thread waits in `accept` (it notices
    /// within a tenth of a second).
    pub fn leave(&self) -> std::io::Result<()> {
        self.leaving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
    /// The next connection handed over (blocks); `None` if the listener fails.
    ///
    /// Every unix connection open is read as its messages come, not one
    /// after the other: an agent keeps one open, idle, between batches,
    /// and opens others for batches that run at the same time (whose
    /// acknowledgements it awaits a few seconds at most).
    pub fn accept(&self) -> Option<Delivered> {
        use std::os::fd::AsFd;
        let mut guard = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        let Reading { from, taken, told } = &mut *guard;
        loop {
            if let Some(d) = taken.pop_front() {
                return Some(d);
            }
            let leaving = self.leaving.load(std::sync::atomic::Ordering::SeqCst);
            if leaving && !*told {
                for f in from.iter_mut() {
                    if let Err(e) = f.leave() {
                        tracing::warn!("cannot tell a unix connection this receiver leaves: {e}");
                    }
                }
                *told = true;
            }
            if leaving && from.is_empty() {
                // The path is gone: no unix connection comes any more but
                // those already waiting to be accepted.
                let _ = self.listener.set_nonblocking(true);
                match self.listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        self.take_unix(s, from, true);
                        continue;
                    }
                    Err(_) => return None,
                }
            }
            let ready = {
                let mut fds = vec![self.listener.as_fd()];
                fds.extend(from.iter().map(|f| f.get_ref().as_fd()));
                // A limit only to notice `leave`.
                match tcpr_host::sock::wait_readable_for(&fds, Some(LEAVE_NOTICED)) {
                    Ok(ready) => ready,
                    Err(e) => {
                        tracing::warn!("cannot wait for deliveries: {e}");
                        return None;
                    }
                }
            };
            // From the last, so that `swap_remove` moves only one already read.
            for i in (0..from.len()).rev() {
                if !ready[i + 1] {
                    continue;
                }
                match from[i].recv() {
                    Ok(Some(ds)) => taken.extend(ds),
                    Ok(None) => {
                        from.swap_remove(i);
                    }
                    Err(e) => {
                        tracing::warn!("bad delivery refused: {e}");
                        from.swap_remove(i);
                    }
                }
            }
            if ready[0] {
                match self.listener.accept() {
                    Ok((s, _)) => self.take_unix(s, from, leaving),
                    // Connections taken in this round are acknowledged:
                    // they are handed out before anything else.
                    Err(e) if transient(&e) || !taken.is_empty() => {
                        tracing::warn!("accept failed (waiting it out): {e}");
                        if taken.is_empty() {
                            std::thread::sleep(ACCEPT_BACKOFF);
                        }
                    }
                    Err(e) => {
                        tracing::warn!("the delivery listener failed: {e}");
                        return None;
                    }
                }
            }
        }
    }
}

impl LocalIncoming {
    /// Reads the unix connection `s` from now on; `leaving`: it is told
    /// at once that this receiver leaves (its first message is answered
    /// "k" alone).
    fn take_unix(
        &self,
        s: std::os::unix::net::UnixStream,
        from: &mut Vec<deliver::UnixReceiver>,
        leaving: bool,
    ) {
        // A message that stops half way holds every other unix connection
        // here while it is read: at most this long per read, well inside
        // the agents' acknowledgement timeout, then it is dropped (its
        // sender reports its connections).
        if let Err(e) = s.set_read_timeout(Some(MESSAGE_STALL)) {
            tracing::warn!("unix delivery refused (no read timeout): {e}");
            return;
        }
        let mut r = deliver::UnixReceiver::concurrent(s);
        if leaving {
            // Nothing is written before the first message.
            let _ = r.leave();
        }
        from.push(r);
    }
}

/// How often a [`LocalIncoming::accept`] with nothing to read looks
/// whether [`LocalIncoming::leave`] was called.
const LEAVE_NOTICED: std::time::Duration = std::time::Duration::from_millis(100);

/// How long [`LocalIncoming::accept`] waits for the rest of a message it
/// began to read (an agent sends a message in one write).
const MESSAGE_STALL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long [`LocalIncoming::accept`] waits after an accept that failed
/// for want of resources.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(10);

/// An accept failure that passes (out of descriptors or memory, a
/// connection gone before it was accepted, a signal).
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
                | libc::EAGAIN
        )
    )
}

#[cfg(test)]
mod local_incoming_tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    /// A [`LocalIncoming`] at a unix socket in a directory of its own
    /// (`dir`, `path`), taken from by a thread that sends each delivered
    /// connection's blob to `got`.
    fn taking(
        name: &str,
    ) -> (
        std::path::PathBuf,
        std::path::PathBuf,
        mpsc::Receiver<Vec<u8>>,
    ) {
        let (dir, path, got, _) = taking_from(name);
        (dir, path, got)
    }

    /// [`taking`], and the [`LocalIncoming`].
    fn taking_from(
        name: &str,
    ) -> (
        std::path::PathBuf,
        std::path::PathBuf,
        mpsc::Receiver<Vec<u8>>,
        Arc<LocalIncoming>,
    ) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.sock");
        let incoming = Arc::new(LocalIncoming::bind(&path).unwrap());
        let (got_tx, got) = mpsc::channel();
        let taker = incoming.clone();
        std::thread::spawn(move || {
            while let Some(d) = taker.accept() {
                if got_tx.send(d.blob).is_err() {
                    break;
                }
            }
        });
        (dir, path, got, incoming)
    }

    /// `leave` while another thread waits in `accept`: the path goes (a
    /// new unix connection fails), a kept connection is told "L", what it
    /// still carries is handed out, and `accept` returns `None` once it
    /// ends.
    #[test]
    fn a_leaving_local_incoming_takes_what_is_on_its_way_then_ends() {
        let (dir, path, got, incoming) = taking_from("tcpr-local-leave");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ends: Vec<(TcpStream, TcpStream)> = (0..2)
            .map(|_| {
                let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                (c, l.accept().unwrap().0)
            })
            .collect();
        let wait = Duration::from_secs(10);
        let kept = UnixStream::connect(&path).unwrap();
        let s = &ends[0].1;
        let fd: OwnedFd = s.try_clone().unwrap().into();
        let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        deliver::send_unix_message(&kept, &fd, b"first", local, peer).unwrap();
        assert_eq!(
            deliver::await_first_ack(&kept, deliver::ACK_TIMEOUT).unwrap(),
            deliver::Receives::KeptBatches
        );
        assert_eq!(got.recv_timeout(wait).unwrap(), b"first");
        incoming.leave().unwrap();
        let mut said = [0u8; 1];
        kept.set_read_timeout(Some(wait)).unwrap();
        std::io::Read::read_exact(&mut &kept, &mut said).unwrap();
        assert_eq!(&said, b"L", "told it leaves");
        assert!(
            UnixStream::connect(&path).is_err(),
            "no new unix connection"
        );
        let s = &ends[1].1;
        let one = [deliver::Outgoing {
            fd: s.as_fd(),
            blob: b"on its way",
            local: s.local_addr().unwrap(),
            peer: s.peer_addr().unwrap(),
        }];
        deliver::send_unix_batch(&kept, &one).unwrap();
        deliver::await_unix_ack(&kept, deliver::ACK_TIMEOUT).unwrap();
        assert_eq!(got.recv_timeout(wait).unwrap(), b"on its way");
        drop(kept);
        assert_eq!(
            got.recv_timeout(wait),
            Err(mpsc::RecvTimeoutError::Disconnected),
            "accept ended once the last unix connection did"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A unix connection the agent keeps open, idle, between batches does
    /// not hold up another one: [`LocalIncoming`] reads both as messages
    /// come (it once read one unix connection until its end before
    /// accepting the next, and the second's acknowledgement timed out).
    #[test]
    fn an_idle_unix_connection_does_not_hold_up_another() {
        let (dir, path, got) = taking("tcpr-local-incoming");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ends: Vec<(TcpStream, TcpStream)> = (0..3)
            .map(|_| {
                let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                (c, l.accept().unwrap().0)
            })
            .collect();
        let send = |to: &UnixStream, i: usize, blob: &[u8]| {
            let s = &ends[i].1;
            let fd: OwnedFd = s.try_clone().unwrap().into();
            let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
            deliver::send_unix_message(to, &fd, blob, local, peer).unwrap();
            deliver::await_first_ack(to, deliver::ACK_TIMEOUT).unwrap()
        };
        let wait = Duration::from_secs(10);
        let kept = UnixStream::connect(&path).unwrap();
        assert_eq!(
            send(&kept, 0, b"first"),
            deliver::Receives::KeptBatches,
            "asks for batches on a unix connection the agent may keep"
        );
        assert_eq!(got.recv_timeout(wait).unwrap(), b"first");
        // `kept` stays open and idle; another unix connection comes.
        let other = UnixStream::connect(&path).unwrap();
        let sent = std::thread::scope(|scope| {
            let sending = scope.spawn(|| send(&other, 1, b"second"));
            let received = got.recv_timeout(wait);
            (received, sending.join().unwrap())
        });
        assert_eq!(sent.0.expect("read while another is idle"), b"second");
        // The kept one's next message is a batch message.
        let s = &ends[2].1;
        let one = [deliver::Outgoing {
            fd: s.as_fd(),
            blob: b"third",
            local: s.local_addr().unwrap(),
            peer: s.peer_addr().unwrap(),
        }];
        deliver::send_unix_batch(&kept, &one).unwrap();
        deliver::await_unix_ack(&kept, deliver::ACK_TIMEOUT).unwrap();
        assert_eq!(got.recv_timeout(wait).unwrap(), b"third");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A message that stops half way (3 bytes, then nothing) holds the
    /// other unix connections at most a second: then it
    /// is dropped and the next delivery is read (it once held them for
    /// ever).
    #[test]
    fn a_message_cut_short_does_not_hold_the_others_for_ever() {
        use std::io::Write;
        let (dir, path, got) = taking("tcpr-local-cut");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = l.accept().unwrap().0;
        let mut cut = UnixStream::connect(&path).unwrap();
        cut.write_all(b"TCP").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let to = UnixStream::connect(&path).unwrap();
        let fd: OwnedFd = s.try_clone().unwrap().into();
        let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        deliver::send_unix_message(&to, &fd, b"whole", local, peer).unwrap();
        let received = got.recv_timeout(deliver::ACK_TIMEOUT * 4);
        assert_eq!(received.expect("read after the cut one gave up"), b"whole");
        deliver::await_first_ack(&to, deliver::ACK_TIMEOUT).unwrap();
        drop(cut);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
