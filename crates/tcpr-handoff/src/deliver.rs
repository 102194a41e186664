//! Handing a restored connection to an application.
//!
//! - **In process**: a [`Delivered`] value (a `std::net::TcpStream`; for
//!   tokio, `set_nonblocking(true)` then `tokio::net::TcpStream::from_std`).
//! - **Exec**: a program per connection, the connection on fd 3 with
//!   `LISTEN_FDS=1` and `LISTEN_PID` (systemd `Accept=yes`), also on stdin
//!   and stdout with `inetd`; the application blob, if any, readable on fd 4
//!   (`TCPR_APP_BLOB_FD=4`, `TCPR_APP_BLOB_LEN`), from memory;
//!   `TCPR_LOCAL`/`TCPR_PEER` name the two ends.
//! - **Unix socket**: the agent connects to the application's unix stream
//!   socket and sends one message (format below) with the connection's fd
//!   attached as SCM_RIGHTS; to a receiver that asks for them, its further
//!   connections in batch messages of up to [`BATCH_MAX`] fds, on a unix
//!   connection the agent keeps open between batches if the receiver
//!   says it may. [`UnixReceiver`] is the client ([`recv_unix`] the
//!   one-message one; `tokio::AsyncUnixReceiver`, feature `tokio`, the one
//!   for an event loop).
//! - **Forward** (for unmodified servers): the agent connects to a local
//!   server per connection, writes a PROXY protocol header (v1 or v2, if
//!   asked: the client's address as source, the restored connection's
//!   local address, the VIP, as destination), and relays both ways with
//!   splice(2) ([`tcpr_host::relay`]): zero copy, half-closes and resets
//!   passed on. The server is connected before the connection is resumed,
//!   so one that refuses leaves the connection in repair mode (silent).
//!   The CLI agent relays in a worker process of its own
//!   ([`crate::relay_worker`]), so relays outlive a killed agent; library
//!   agents relay on threads of their own.
//!
//! ```text
//! unix delivery message, all integers big-endian:
//!   8  magic "TCPR-FD1"
//!   2  length L of the local address text ("addr:port", "[v6]:port")
//!   L  local address
//!   2  length P of the peer address text
//!   P  peer address
//!   4  length B of the application blob
//!   B  blob
//! the fd rides on the first byte of the message; the receiver answers
//! one byte "k" once it holds the connection, and only then does the
//! sender let go of it
//!
//! batch message (only to a receiver that asked for batches, below):
//!   8  magic "TCPR-FDN"
//!   2  count N of connections, 1 to 253 (SCM_MAX_FD)
//!   4  length E of the entries
//!   E  N entries, each the body of a "TCPR-FD1" message (2 L, L local,
//!      2 P, P peer, 4 B, B blob)
//! the N fds ride on the first byte, in entry order; the receiver answers
//! one byte "k" once it holds all N, and only then does the sender let
//! go of them
//!
//! a receiver that takes batches answers the first message on a unix
//! connection (a "TCPR-FD1") with "kB" in one write instead of "k"; the
//! agent then sends its further connections on that unix connection in
//! batch messages, a few unacknowledged at a time (acknowledgements come
//! in order). To a receiver that answers "k", it sends one "TCPR-FD1" per
//! unix connection, as before batches: an old agent reads the "k" and
//! closes, so the "B" it leaves unread does no harm either
//!
//! kept unix connections (to a receiver that answered "kK" instead of
//! "kB": it takes batches and reads each of its unix connections as its
//! messages come): once every message on it is acknowledged, the agent
//! may keep the unix connection open for its next batches instead of
//! closing it (closed once idle for a few seconds; under steady load it
//! stays open); a kept connection's next
//! message is then a batch message ("TCPR-FDN"), even for a batch's first
//! connection. A connection with a message unacknowledged, or with a byte
//! from the receiver left unread, is never kept: after a missing
//! acknowledgement the agent closes the unix connection (the connections
//! of the messages not acknowledged are closed silently and reported), so
//! that no later acknowledgement is taken for the wrong message. An agent
//! older than "kK" reads it as "k" (one message per unix connection)
//!
//! leaving: a "kK" receiver about to stop writes one byte "L" (before any
//! later acknowledgement, never inside one); the agent skips it when it
//! reads an acknowledgement and keeps that unix connection no longer (an
//! idle kept one with a byte pending is closed when a batch would take
//! it); the receiver reads and acknowledges what comes until the end of
//! stream
//! ```
//!
//! Why "kK" is asked for, not assumed of a receiver that takes batches: a
//! kept connection stays open while the agent opens others for batches
//! that run at the same time, each message's acknowledgement awaited for
//! [`ACK_TIMEOUT`] at most. A receiver reading its unix connections one
//! after the other would sit on the kept one while another batch's
//! acknowledgement timed out, and that batch's connections would be closed.
//! [`UnixReceiver::concurrent`] answers "kK" ([`crate::LocalIncoming`]
//! uses it); [`UnixReceiver::new`] answers "kB".
//!
//! A connection closed before its first byte carries nothing: the agent
//! opens one at start to check that the application listens, and holds
//! one from each batch's PREPARE (for its first connection), which it
//! closes empty when the batch is given up (a kept connection held for a
//! batch that is given up is kept again). A kept connection idle too long
//! closes between messages. [`recv_unix`] and [`UnixReceiver`] read
//! either as end of stream.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// How long the application has to acknowledge a connection sent over its
/// unix socket before the agent takes it back.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection handed to an application.
#[derive(Debug)]
pub struct Delivered {
    /// The live connection.
    pub stream: TcpStream,
    /// The application state that travelled with it.
    pub blob: Vec<u8>,
    /// Our end.
    pub local: SocketAddr,
    /// The peer.
    pub peer: SocketAddr,
}

const MAGIC: &[u8; 8] = b"TCPR-FD1";
const BATCH_MAGIC: &[u8; 8] = b"TCPR-FDN";
/// A receiver's acknowledgement of a message.
const ACK: u8 = b'k';
/// What a receiver that takes batches sends after its first [`ACK`].
const TAKES_BATCHES: u8 = b'B';
/// What a receiver that takes batches and reads its unix connections
/// concurrently sends after its first [`ACK`] instead: its unix connection
/// may be kept between batches.
const TAKES_KEPT_BATCHES: u8 = b'K';

/// What a receiver that answered "kK" writes, once, to say it is leaving:
/// the agent no longer keeps that unix connection; it closes it at the end
/// of the batch it may be sending on it (whose messages the receiver
/// still reads and acknowledges until the end of stream).
const LEAVING: u8 = b'L';

/// What a receiver's acknowledgement of the first message on a unix
/// connection says of how it takes the next ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receives {
    /// One message per unix connection (it answered "k").
    One,
    /// Batch messages on this unix connection, which closes after the
    /// batch ("kB").
    Batches,
    /// Batch messages, and the unix connection may stay open between
    /// batches: the receiver reads each of its unix connections as its
    /// messages come ("kK").
    KeptBatches,
}

impl Receives {
    /// True if it takes batch messages on this unix connection.
    pub fn batches(self) -> bool {
        self != Receives::One
    }
}

/// The most connections one batch message carries (`SCM_MAX_FD`).
pub const BATCH_MAX: usize = tcpr_host::SCM_MAX_FD;

/// What a batch's entries may weigh at most, blobs included.
const BATCH_BYTES_MAX: usize = 1 << 30;

/// What one connection's blob may weigh at most.
const BLOB_BYTES_MAX: usize = 1 << 30;

/// What [`recv_unix`] reserves for a blob before its bytes arrive.
pub(crate) const BLOB_PREALLOCATION_BYTES: usize = 64 << 10;

/// Runs `cmd` (a shell command line) with the connection on fd 3 (and on
/// stdin/stdout with `inetd`) and the blob on fd 4.
pub fn spawn(
    cmd: &mut Command,
    sock: &OwnedFd,
    blob: &[u8],
    local: SocketAddr,
    peer: SocketAddr,
    inetd: bool,
) -> io::Result<Child> {
    cmd.env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "connection")
        .env("TCPR_LOCAL", local.to_string())
        .env("TCPR_PEER", peer.to_string());
    let blob_fd = if blob.is_empty() {
        None
    } else {
        cmd.env("TCPR_APP_BLOB_FD", "4")
            .env("TCPR_APP_BLOB_LEN", blob.len().to_string());
        Some(tcpr_host::memfd_with("tcpr-app-blob", blob)?)
    };
    tcpr_host::pass_socket(cmd, sock, inetd, blob_fd.as_ref())?;
    cmd.spawn()
}

/// A command that runs `argv` with `LISTEN_PID` set to its own pid (a
/// shell sets it just before exec).
pub fn command_for(argv: &[String]) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
        .args(argv);
    c
}

/// A command that runs a shell command line with `LISTEN_PID` set.
pub fn shell_command(line: &str) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(format!("LISTEN_PID=$$; export LISTEN_PID; exec {line}"));
    c
}

/// Sends one connection over a unix stream socket; the receiver has
/// [`ACK_TIMEOUT`] to acknowledge it.
pub fn send_unix(
    to: &UnixStream,
    sock: &OwnedFd,
    blob: &[u8],
    local: SocketAddr,
    peer: SocketAddr,
) -> io::Result<()> {
    send_unix_within(to, sock, blob, local, peer, ACK_TIMEOUT)
}

/// [`send_unix`] with the time the receiver has to acknowledge.
pub fn send_unix_within(
    to: &UnixStream,
    sock: &OwnedFd,
    blob: &[u8],
    local: SocketAddr,
    peer: SocketAddr,
    ack_timeout: Duration,
) -> io::Result<()> {
    send_unix_message(to, sock, blob, local, peer)?;
    // One message per unix connection: a "kB" is read whole, so that the
    // receiver does not see its "B" left unread (ECONNRESET) at our close.
    await_first_ack(to, ack_timeout).map(drop)
}

/// The first half of [`send_unix`]: sends the message with the
/// connection's fd attached, and does not wait. The connection is still
/// the sender's until [`await_unix_ack`] returns `Ok`: a sender that
/// pipelines (sends on several unix connections before reading their
/// acknowledgements) holds each one until then.
pub fn send_unix_message(
    to: &UnixStream,
    sock: &OwnedFd,
    blob: &[u8],
    local: SocketAddr,
    peer: SocketAddr,
) -> io::Result<()> {
    tcpr_host::send_with_fd(to.as_fd(), &unix_message(blob, local, peer), sock.as_fd())
}

/// The second half of [`send_unix`]: waits up to `ack_timeout` for the
/// receiver's acknowledgement of the message sent on `to`. Until it
/// comes, the connection is the sender's.
pub fn await_unix_ack(to: &UnixStream, ack_timeout: Duration) -> io::Result<()> {
    await_batch_ack(to, ack_timeout).map(drop)
}

/// [`await_unix_ack`] on a unix connection whose receiver answered "kK":
/// also says whether the receiver said it is leaving ("L" before the
/// acknowledgement; see [`UnixReceiver::leave`]): nothing more may be
/// sent on it, and it is not kept.
pub fn await_batch_ack(to: &UnixStream, ack_timeout: Duration) -> io::Result<bool> {
    let mut ack = [0u8; 1];
    let mut r = to;
    // A zero timeout means none at all to the socket: wait a little instead.
    r.set_read_timeout(Some(ack_timeout.max(MIN_ACK_WAIT)))?;
    r.read_exact(&mut ack)?;
    let leaving = ack == [LEAVING];
    if leaving {
        r.read_exact(&mut ack)?;
    }
    if ack != [ACK] {
        return Err(bad("acknowledgement"));
    }
    Ok(leaving)
}

/// The message [`send_unix`] sends with the descriptor.
pub(crate) fn unix_message(blob: &[u8], local: SocketAddr, peer: SocketAddr) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + blob.len());
    m.extend_from_slice(MAGIC);
    push_entry(&mut m, blob, local, peer);
    m
}

/// Appends one connection's entry (the body of a "TCPR-FD1" message).
fn push_entry(m: &mut Vec<u8>, blob: &[u8], local: SocketAddr, peer: SocketAddr) {
    let (l, p) = (local.to_string(), peer.to_string());
    m.extend_from_slice(&(l.len() as u16).to_be_bytes());
    m.extend_from_slice(l.as_bytes());
    m.extend_from_slice(&(p.len() as u16).to_be_bytes());
    m.extend_from_slice(p.as_bytes());
    m.extend_from_slice(&(blob.len() as u32).to_be_bytes());
    m.extend_from_slice(blob);
}

/// One connection of a batch message ([`send_unix_batch`]).
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The connection.
    pub fd: BorrowedFd<'a>,
    /// Its application blob.
    pub blob: &'a [u8],
    /// Its local end.
    pub local: SocketAddr,
    /// Its peer.
    pub peer: SocketAddr,
}

/// Sends up to [`BATCH_MAX`] connections in one batch message, their fds
/// attached, to a receiver that asked for batches ([`await_first_ack`]);
/// does not wait. Each is still the sender's until [`await_unix_ack`]
/// returns `Ok` for this message.
pub fn send_unix_batch(to: &UnixStream, conns: &[Outgoing<'_>]) -> io::Result<()> {
    if conns.is_empty() || conns.len() > BATCH_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a batch message carries 1 to {BATCH_MAX} connections, not {}",
                conns.len()
            ),
        ));
    }
    let mut m = Vec::with_capacity(14 + conns.len() * 48);
    m.extend_from_slice(BATCH_MAGIC);
    m.extend_from_slice(&(conns.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0u8; 4]);
    for c in conns {
        push_entry(&mut m, c.blob, c.local, c.peer);
    }
    let entries = m.len() - 14;
    if entries > BATCH_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a batch message's blobs exceed 1 GiB",
        ));
    }
    m[10..14].copy_from_slice(&(entries as u32).to_be_bytes());
    let fds: Vec<BorrowedFd<'_>> = conns.iter().map(|c| c.fd).collect();
    tcpr_host::send_with_fds(to.as_fd(), &m, &fds)
}

/// [`await_unix_ack`] for the first message on a unix connection: also
/// says whether the receiver takes batches on it ("kB"), and whether the
/// unix connection may be kept between batches ("kK").
pub fn await_first_ack(to: &UnixStream, ack_timeout: Duration) -> io::Result<Receives> {
    let mut ack = [0u8; 2];
    let mut r = to;
    r.set_read_timeout(Some(ack_timeout.max(MIN_ACK_WAIT)))?;
    // The receiver writes both bytes at once: one read takes them. Were
    // "B" or "K" to come later, the connection is only served one at a
    // time. (An agent older than "K" reads "kK" as "k": one at a time.)
    let n = r.read(&mut ack)?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if ack[0] != ACK {
        return Err(bad("acknowledgement"));
    }
    Ok(match (n, ack[1]) {
        (2, TAKES_BATCHES) => Receives::Batches,
        (2, TAKES_KEPT_BATCHES) => Receives::KeptBatches,
        _ => Receives::One,
    })
}

/// The least [`await_unix_ack`] waits (`SO_RCVTIMEO` of zero is no
/// timeout).
const MIN_ACK_WAIT: Duration = Duration::from_millis(1);

/// Connects to the application's unix socket: proves that something
/// listens there before any connection is resumed for it.
pub fn connect_unix(path: &Path) -> Result<UnixStream, String> {
    UnixStream::connect(path).map_err(|e| {
        format!(
            "nothing accepts connections at {}: {e} (start the application first)",
            path.display()
        )
    })
}

/// True when a connection from [`connect_unix`] still reaches a living
/// application (its end is neither closed nor reset) and has nothing to
/// read: the application says nothing but its acknowledgements, so a
/// byte queued between messages (or before the first) means it closed,
/// or misbehaves, and the connection is of no further use. One call
/// (`recv` with `MSG_PEEK | MSG_DONTWAIT`), whatever the socket's mode;
/// it takes nothing from the socket.
pub fn unix_alive(to: &UnixStream) -> bool {
    let mut one = [0u8; 1];
    matches!(
        tcpr_host::sock::peek_now(to.as_fd(), &mut one),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

/// The program a shell command line of the agent's `--exec` runs, found
/// as the shell will find it (`exec WORD`: leading `NAME=value`
/// assignments skipped, then a path, or a name searched in `PATH`). A
/// command that would not run is refused here, before any connection is
/// resumed for it: the shell would fail only after the connection is in
/// its hands, and its exit would close the connection with a FIN.
pub fn resolve_exec(line: &str) -> Result<PathBuf, String> {
    let words = shlex::split(line)
        .ok_or_else(|| format!("cannot parse the command line {line:?} (unbalanced quotes?)"))?;
    let is_assignment = |w: &str| {
        w.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    let program = words
        .iter()
        .find(|w| !is_assignment(w))
        .ok_or_else(|| format!("the command line {line:?} names no program"))?;
    let runnable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if runnable(&p) {
            Ok(p)
        } else {
            Err(format!("{program}: no such executable file"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| runnable(p))
        .ok_or_else(|| format!("{program}: command not found in PATH"))
}

/// A delivery target reached before a connection is resumed for it.
#[derive(Debug)]
pub enum Reached {
    /// The application's unix socket ([`connect_unix`]).
    Unix(UnixStream),
    /// A connection to the forward target ([`connect_forward`]).
    Forward(TcpStream),
}

impl Reached {
    /// True when the target still takes connections: a unix receiver says
    /// nothing before our message; a server connection is neither closed
    /// nor reset (bytes it sent first, a banner, stay queued for the
    /// client).
    pub fn alive(&self) -> bool {
        match self {
            Reached::Unix(to) => unix_alive(to),
            Reached::Forward(to) => {
                // One call (MSG_DONTWAIT), not three around a blocking
                // socket's peek.
                let mut one = [0u8; 1];
                match tcpr_host::sock::peek_now(to.as_fd(), &mut one) {
                    Ok(n) => n > 0,
                    Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                }
            }
        }
    }
}

/// How long connecting to a forward target may take: it is a local
/// server, and the connection waits in repair mode meanwhile.
pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to the server of `--forward`: proves that it accepts before
/// any connection is resumed for it.
pub fn connect_forward(server: SocketAddr) -> Result<TcpStream, String> {
    let refused = |e: io::Error| {
        format!("the server {server} does not accept connections: {e} (start it first)")
    };
    let s = connect_within(server, FORWARD_CONNECT_TIMEOUT).map_err(refused)?;
    // The relay writes what it reads at once: no Nagle delay on the way.
    s.set_nodelay(true)
        .map_err(|e| format!("the server {server}: {e}"))?;
    Ok(s)
}

/// A blocking connect bounded by `SO_SNDTIMEO`: three calls (socket,
/// setsockopt, connect) where `TcpStream::connect_timeout` makes six
/// (O_NONBLOCK on and off, a poll, SO_ERROR), once a connection. The
/// timeout stays on the socket: a write to the server that blocks that
/// long (the PROXY header) fails rather than holding the handoff.
fn connect_within(server: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    use tcpr_host::sock;
    let domain = match server {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    let fd = sock::socket(domain, libc::SOCK_STREAM, 0)?;
    sock::set_send_timeout(fd.as_fd(), timeout)?;
    match sock::connect(fd.as_fd(), server) {
        Ok(()) => Ok(TcpStream::from(fd)),
        // SO_SNDTIMEO ran out.
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
        Err(e) => Err(e),
    }
}

/// Writes the PROXY header (if any) for the connection from `peer` to
/// `local` to `server`, before the connection is resumed.
pub fn announce_forward(
    server: &TcpStream,
    proxy: Option<tcpr_host::proxy_header::ProxyVersion>,
    peer: SocketAddr,
    local: SocketAddr,
) -> io::Result<()> {
    if let Some(version) = proxy {
        let header = tcpr_host::proxy_header::proxy_header(version, peer, local);
        std::io::Write::write_all(&mut &*server, &header)?;
    }
    Ok(())
}

/// Relays between a resumed connection and its server on a thread of its
/// own until both have closed (see [`tcpr_host::relay`]). When no thread
/// can be made, the client connection is given back with the error.
pub fn forward(
    client: TcpStream,
    server: TcpStream,
    peer: SocketAddr,
) -> Result<(), (TcpStream, io::Error)> {
    // The pair waits here until the thread takes it: a failed spawn drops
    // its closure, and the connection must not close with it (a FIN).
    let pair = std::sync::Arc::new(std::sync::Mutex::new(Some((client, server))));
    let for_thread = pair.clone();
    let spawned = std::thread::Builder::new()
        .name("tcpr-forward".into())
        .spawn(move || {
            let taken = for_thread.lock().ok().and_then(|mut p| p.take());
            let Some((client, server)) = taken else {
                return;
            };
            match tcpr_host::relay::relay(client, server) {
                Ok(r) => tracing::debug!(
                    %peer,
                    to_server = r.first_to_second,
                    to_client = r.second_to_first,
                    "forwarded connection closed"
                ),
                Err(e) => tracing::info!(%peer, "forwarded connection ended: {e}"),
            }
        });
    match spawned {
        Ok(_) => Ok(()),
        Err(e) => {
            let back = pair.lock().ok().and_then(|mut p| p.take());
            match back {
                Some((client, _server)) => Err((client, e)),
                // The thread took it after all.
                None => Ok(()),
            }
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad delivery message: {what}"),
    )
}

/// Receives one connection sent by [`send_unix`] (the agent's `--unix`,
/// to which this receiver takes no batches: [`UnixReceiver`] does).
/// Returns `Ok(None)` at end of stream.
pub fn recv_unix(from: &mut UnixStream) -> io::Result<Option<Delivered>> {
    let Some((message, fds)) = read_message(from)? else {
        return Ok(None);
    };
    if message[..8] != MAGIC[..] {
        return Err(bad("magic"));
    }
    let (mut got, _) = parse_message(&message, fds)?;
    acknowledge(from, &[ACK]);
    Ok(got.pop())
}

/// The receiving end of a unix connection from the agent's `--unix` (or
/// from [`crate::hand_off_local`]): reads it message by message, one
/// connection or a batch of up to [`BATCH_MAX`], and acknowledges each
/// message once it holds its connections. Its acknowledgement of the
/// first message asks the agent for batches (see the module docs); one
/// made by [`UnixReceiver::concurrent`] also lets the agent keep the unix
/// connection open between batches. It blocks;
/// `crate::tokio::AsyncUnixReceiver` (feature `tokio`) is the same
/// receiver for an event loop.
#[derive(Debug)]
pub struct UnixReceiver {
    from: UnixStream,
    state: ReceiverState,
}

impl UnixReceiver {
    /// Reads the unix connection `from` (just accepted). The agent sends
    /// batches on it and closes it after each handoff batch: a receiver
    /// may read its unix connections one after the other.
    pub fn new(from: UnixStream) -> UnixReceiver {
        UnixReceiver {
            from,
            state: ReceiverState::default(),
        }
    }

    /// Reads the unix connection `from` (just accepted), and lets the
    /// agent keep it open between handoff batches (no unix connect and
    /// accept per batch). Only for a receiver that reads each of its unix
    /// connections as its messages come (a thread or task each, or poll(2)
    /// over them all): the agent opens other unix connections while one is
    /// kept, and a message not acknowledged within [`ACK_TIMEOUT`] loses
    /// its connections.
    pub fn concurrent(from: UnixStream) -> UnixReceiver {
        UnixReceiver {
            from,
            state: ReceiverState::concurrent(),
        }
    }

    /// The unix connection read.
    pub fn get_ref(&self) -> &UnixStream {
        &self.from
    }

    /// Says to the agent that this receiver is leaving (an application
    /// about to stop): the agent keeps this unix connection no longer and
    /// closes it at the end of the batch it may be sending on it (a kept
    /// idle one at once, when a batch would take it). Go on calling
    /// [`UnixReceiver::recv`] until it returns `Ok(None)`: a unix
    /// connection dropped before that loses what was on its way. Before the first message, the first acknowledgement asks for
    /// nothing more than that message.
    pub fn leave(&mut self) -> io::Result<()> {
        match self.state.leave() {
            Some(byte) => std::io::Write::write_all(&mut &self.from, &[byte]),
            None => Ok(()),
        }
    }

    /// The connections of the next message, acknowledged (one or more);
    /// `Ok(None)` at end of stream. After an error the unix connection is
    /// of no further use: drop it (the agent then reports the connections
    /// it did not see acknowledged, and closes them).
    pub fn recv(&mut self) -> io::Result<Option<Vec<Delivered>>> {
        let (message, fds) = match read_message(&mut self.from) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(e) => return self.state.end_or(e),
        };
        let (got, ack) = self.state.take(&message, fds)?;
        acknowledge(&mut self.from, ack);
        Ok(Some(got))
    }
}

/// What a receiver that takes batches keeps between messages (the blocking
/// [`UnixReceiver`] and the event loop's one).
#[derive(Debug)]
pub(crate) struct ReceiverState {
    /// Its first message was acknowledged (with "kB" or "kK").
    answered: bool,
    /// The second byte of that acknowledgement: [`TAKES_BATCHES`], or
    /// [`TAKES_KEPT_BATCHES`] for a receiver that reads its unix
    /// connections concurrently.
    takes: u8,
    /// It said it is leaving ([`ReceiverState::leave`]).
    leaving: bool,
}

impl Default for ReceiverState {
    fn default() -> ReceiverState {
        ReceiverState {
            answered: false,
            takes: TAKES_BATCHES,
            leaving: false,
        }
    }
}

impl ReceiverState {
    /// What [`UnixReceiver::leave`] writes, if anything: a receiver that
    /// answered "kK" says [`LEAVING`]; one that has not answered yet
    /// answers its first message "k" alone (one message, then the end),
    /// and one that answered "kB" has its unix connection closed by the
    /// agent after the batch anyway.
    pub(crate) fn leave(&mut self) -> Option<u8> {
        if self.leaving {
            return None;
        }
        self.leaving = true;
        (self.answered && self.takes == TAKES_KEPT_BATCHES).then_some(LEAVING)
    }

    /// The state of a receiver that lets the agent keep its unix
    /// connection ("kK").
    pub(crate) fn concurrent() -> ReceiverState {
        ReceiverState {
            takes: TAKES_KEPT_BATCHES,
            ..ReceiverState::default()
        }
    }

    /// A failure to read a message's first bytes: the end of the stream or
    /// an error. A sender that read only the "k" of our "kB" (an older
    /// agent) and closed resets the unix connection: between messages,
    /// that is its end.
    pub(crate) fn end_or<T>(&self, e: io::Error) -> io::Result<Option<T>> {
        if self.answered && e.kind() == io::ErrorKind::ConnectionReset {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// The connections of a whole `message` ([`message_len`]) and its
    /// `fds`, with the acknowledgement to write once they are held.
    pub(crate) fn take(
        &mut self,
        message: &[u8],
        fds: Vec<OwnedFd>,
    ) -> io::Result<(Vec<Delivered>, &'static [u8])> {
        let (got, single) = parse_message(message, fds)?;
        let ack: &'static [u8] = match (single && !self.answered && !self.leaving, self.takes) {
            (true, TAKES_KEPT_BATCHES) => &[ACK, TAKES_KEPT_BATCHES],
            (true, _) => &[ACK, TAKES_BATCHES],
            (false, _) => &[ACK],
        };
        self.answered = true;
        Ok((got, ack))
    }
}

/// The bytes of a message's magic and first field, which the fds ride on.
pub(crate) const MESSAGE_HEAD: usize = 10;

/// The whole message's length, as far as its first bytes `got` tell
/// (at least [`MESSAGE_HEAD`] bytes): `got.len()` once it is all there.
/// A receiver reads exactly a message's bytes, field length by field
/// length (the next message's fds ride on its first byte, and a read that
/// reached it would take them without a place to put them): after the
/// head, a "TCPR-FD1" in three more reads (local address and the peer's
/// length, peer address and the blob's length, blob), a "TCPR-FDN" in two
/// (the entries' length, the entries).
pub(crate) fn message_len(got: &[u8]) -> io::Result<usize> {
    if got.len() < MESSAGE_HEAD {
        return Ok(MESSAGE_HEAD);
    }
    let field = u16::from_be_bytes([got[8], got[9]]) as usize;
    let u32_at = |at: usize| u32::from_be_bytes([got[at], got[at + 1], got[at + 2], got[at + 3]]);
    if got[..8] == MAGIC[..] {
        // The local address and the peer address's length.
        let peer_at = MESSAGE_HEAD + field + 2;
        if got.len() < peer_at {
            return Ok(peer_at);
        }
        // The peer address and the blob's length.
        let blob_at =
            peer_at + u16::from_be_bytes([got[peer_at - 2], got[peer_at - 1]]) as usize + 4;
        if got.len() < blob_at {
            return Ok(blob_at);
        }
        let blob = u32_at(blob_at - 4) as usize;
        if blob > BLOB_BYTES_MAX {
            return Err(bad("blob length"));
        }
        Ok(blob_at + blob)
    } else if got[..8] == BATCH_MAGIC[..] {
        if field == 0 || field > BATCH_MAX {
            return Err(bad("connection count"));
        }
        let entries_at = MESSAGE_HEAD + 4;
        if got.len() < entries_at {
            return Ok(entries_at);
        }
        let entries = u32_at(MESSAGE_HEAD) as usize;
        if entries > BATCH_BYTES_MAX {
            return Err(bad("entries length"));
        }
        Ok(entries_at + entries)
    } else {
        Err(bad("magic"))
    }
}

/// The next message, whole, with the fds attached to its first byte;
/// `None` at end of stream. Grown as its bytes arrive: a length alone (up
/// to 1 GiB) reserves nothing.
fn read_message(from: &mut UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut head = [0u8; MESSAGE_HEAD];
    let (n, fds) = tcpr_host::recv_with_fds(from.as_fd(), &mut head)?;
    if n == 0 {
        return Ok(None);
    }
    let mut message = head[..n].to_vec();
    loop {
        let more = message_len(&message)? - message.len();
        if more == 0 {
            return Ok(Some((message, fds)));
        }
        message.reserve(more.min(BLOB_PREALLOCATION_BYTES));
        // A reset here cut a message short: an error, never the end
        // between messages that `ReceiverState::end_or` takes it for.
        let got = (&mut *from)
            .take(more as u64)
            .read_to_end(&mut message)
            .map_err(|e| match e.kind() {
                io::ErrorKind::ConnectionReset => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the sender reset the unix connection in the middle of a message",
                ),
                _ => e,
            })?;
        if got != more {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Until the acknowledgement is read, the agent holds the connections
/// too, and closes them silently if we fail. From here they are live and
/// ours: an agent that died before reading the acknowledgement (EPIPE)
/// must not make us drop them, as nothing else holds them any more (the
/// restarted agent reports them unknown; they live on here).
fn acknowledge(from: &mut UnixStream, ack: &[u8]) {
    if let Err(e) = std::io::Write::write_all(from, ack) {
        unacknowledged(&e);
    }
}

/// Logs an acknowledgement that could not be written ([`acknowledge`]).
pub(crate) fn unacknowledged(e: &io::Error) {
    tracing::warn!("kept delivered connections whose agent did not take the acknowledgement: {e}");
}

fn address(text: &[u8], what: &str) -> io::Result<SocketAddr> {
    std::str::from_utf8(text)
        .map_err(|_| bad("address text"))?
        .parse()
        .map_err(|_| bad(what))
}

/// The connections of a whole message ([`message_len`]) and its fds, and
/// whether it was a one-connection ("TCPR-FD1") message. A "TCPR-FDN"
/// carries exactly one fd per entry, every entry whole, nothing after the
/// last; extra fds a "TCPR-FD1" sender attached close here.
fn parse_message(message: &[u8], fds: Vec<OwnedFd>) -> io::Result<(Vec<Delivered>, bool)> {
    let single = message[..8] == MAGIC[..];
    // A "TCPR-FD1" is its magic and one entry.
    let (count, mut rest, fds) = if single {
        let fd = fds
            .into_iter()
            .next()
            .ok_or_else(|| bad("no file descriptor attached"))?;
        (1, &message[8..], vec![fd])
    } else {
        let count = u16::from_be_bytes([message[8], message[9]]) as usize;
        if fds.len() != count {
            return Err(bad("not one file descriptor per connection"));
        }
        (count, &message[MESSAGE_HEAD + 4..], fds)
    };
    let mut take = |n: usize| -> io::Result<&[u8]> {
        if rest.len() < n {
            return Err(bad("entry cut short"));
        }
        let (field, after) = rest.split_at(n);
        rest = after;
        Ok(field)
    };
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let l = take(2)?;
        let local = address(
            take(u16::from_be_bytes([l[0], l[1]]) as usize)?,
            "local address",
        )?;
        let p = take(2)?;
        let peer = address(
            take(u16::from_be_bytes([p[0], p[1]]) as usize)?,
            "peer address",
        )?;
        let b = take(4)?;
        let blob = take(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)?.to_vec();
        entries.push((local, peer, blob));
    }
    if !rest.is_empty() {
        return Err(bad("bytes after the last entry"));
    }
    let got = fds
        .into_iter()
        .zip(entries)
        .map(|(fd, (local, peer, blob))| Delivered {
            stream: TcpStream::from(fd),
            blob,
            local,
            peer,
        })
        .collect();
    Ok((got, single))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An agent killed after sending a connection and before reading the
    /// acknowledgement: the receiver holds the only descriptor left and
    /// keeps the connection (it closed it, losing the connection, when the
    /// acknowledgement could not be written).
    #[test]
    fn a_connection_whose_agent_died_before_the_acknowledgement_is_kept() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let local = s.local_addr().unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let fd: OwnedFd = s.into();
        tcpr_host::send_with_fd(a.as_fd(), &unix_message(b"state", local, peer), fd.as_fd())
            .unwrap();
        // The agent dies: its end and its descriptor close.
        drop((a, fd));
        let mut d = recv_unix(&mut b).unwrap().expect("the connection");
        assert_eq!(d.blob, b"state");
        d.stream.write_all(b"alive").unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"alive");
        c.write_all(b"both ways").unwrap();
        let mut buf = [0u8; 9];
        d.stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"both ways");
    }

    /// A blob length alone reserves nothing: a message announcing 1 GiB
    /// and then ending is an error without a 1 GiB allocation.
    #[test]
    fn an_announced_blob_is_not_reserved_before_it_arrives() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let local = s.local_addr().unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut m = unix_message(b"", local, peer);
        let at = m.len() - 4;
        m[at..].copy_from_slice(&(1u32 << 30).to_be_bytes());
        tcpr_host::send_with_fd(a.as_fd(), &m, s.as_fd()).unwrap();
        drop(a);
        match recv_unix(&mut b) {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            Ok(_) => panic!("a truncated blob must be an error"),
        }
    }

    #[test]
    fn unix_delivery_round_trip() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let local = s.local_addr().unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let fd: OwnedFd = s.into();
        let sender = std::thread::spawn(move || {
            send_unix(&a, &fd, b"state", local, peer).unwrap();
            send_unix(&a, &fd, b"", local, peer).unwrap();
        });
        let mut d = recv_unix(&mut b).unwrap().unwrap();
        assert_eq!(d.blob, b"state");
        assert_eq!(d.local, local);
        assert_eq!(d.peer, peer);
        d.stream.write_all(b"via fd").unwrap();
        let mut buf = [0u8; 6];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"via fd");
        let d2 = recv_unix(&mut b).unwrap().unwrap();
        assert!(d2.blob.is_empty());
        sender.join().unwrap();
        assert!(recv_unix(&mut b).unwrap().is_none());
    }
}

#[cfg(test)]
pub(crate) mod batch_tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// `n` connected pairs on loopback: (the client end, the server end).
    pub(crate) fn pairs(n: usize) -> Vec<(TcpStream, TcpStream)> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        (0..n)
            .map(|_| {
                let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                (c, l.accept().unwrap().0)
            })
            .collect()
    }

    /// The batch entries of `servers`, each with its blob and ends.
    pub(crate) fn outgoing<'a>(
        servers: &'a [OwnedFd],
        blobs: &'a [Vec<u8>],
        ends: &[(SocketAddr, SocketAddr)],
    ) -> Vec<Outgoing<'a>> {
        servers
            .iter()
            .zip(blobs)
            .zip(ends)
            .map(|((fd, blob), (local, peer))| Outgoing {
                fd: fd.as_fd(),
                blob,
                local: *local,
                peer: *peer,
            })
            .collect()
    }

    /// What a sender holds of `conns`' server ends: a copy of each, and
    /// each one's local and peer addresses.
    pub(crate) fn sender_side(
        conns: &[(TcpStream, TcpStream)],
    ) -> (Vec<OwnedFd>, Vec<(SocketAddr, SocketAddr)>) {
        conns
            .iter()
            .map(|(_, s)| {
                let ends = (s.local_addr().unwrap(), s.peer_addr().unwrap());
                (s.try_clone().unwrap().into(), ends)
            })
            .unzip()
    }

    /// The first message asks for batches; then batches of 1 to
    /// [`BATCH_MAX`] carry every connection, in order, each one live both
    /// ways; a batch of none or of more than [`BATCH_MAX`] is refused.
    #[test]
    fn batches_carry_every_connection_after_a_receiver_asks_for_them() {
        let conns = pairs(BATCH_MAX + 2);
        let (a, b) = UnixStream::pair().unwrap();
        let (servers, ends) = sender_side(&conns);
        let sender = std::thread::spawn(move || {
            let blobs: Vec<Vec<u8>> = (0..servers.len())
                .map(|i| format!("state {i}").into_bytes())
                .collect();
            send_unix_message(&a, &servers[0], &blobs[0], ends[0].0, ends[0].1).unwrap();
            assert_eq!(
                await_first_ack(&a, ACK_TIMEOUT).unwrap(),
                Receives::Batches,
                "asks for batches, not to keep the unix connection"
            );
            let all = outgoing(&servers, &blobs, &ends);
            assert!(send_unix_batch(&a, &[]).is_err());
            assert!(send_unix_batch(&a, &all[1..]).is_err(), "one too many");
            // The rest, split as a sender must: one full message, one of one.
            send_unix_batch(&a, &all[1..=BATCH_MAX]).unwrap();
            send_unix_batch(&a, &all[BATCH_MAX + 1..]).unwrap();
            await_unix_ack(&a, ACK_TIMEOUT).unwrap();
            await_unix_ack(&a, ACK_TIMEOUT).unwrap();
        });
        let mut from = UnixReceiver::new(b);
        let mut sizes = Vec::new();
        let mut got = Vec::new();
        while let Some(ds) = from.recv().unwrap() {
            sizes.push(ds.len());
            got.extend(ds);
            if got.len() == conns.len() {
                break;
            }
        }
        sender.join().unwrap();
        assert_eq!(sizes, [1, BATCH_MAX, 1]);
        for (i, (d, (mut client, _))) in got.into_iter().zip(conns).enumerate() {
            assert_eq!(d.blob, format!("state {i}").into_bytes());
            assert_eq!(d.peer, client.local_addr().unwrap());
            let mut stream = d.stream;
            stream.write_all(format!("to {i}").as_bytes()).unwrap();
            let mut buf = vec![0u8; format!("to {i}").len()];
            client.read_exact(&mut buf).unwrap();
            assert_eq!(buf, format!("to {i}").into_bytes());
            client.write_all(b"back").unwrap();
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"back");
        }
        assert!(from.recv().unwrap().is_none(), "end of stream");
    }

    /// A one-message receiver ([`recv_unix`]) answers "k" alone: the
    /// sender learns it takes no batches.
    #[test]
    fn an_old_receiver_takes_no_batches() {
        let conns = pairs(1);
        let s = &conns[0].1;
        let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        let (a, mut b) = UnixStream::pair().unwrap();
        let fd: OwnedFd = s.try_clone().unwrap().into();
        let sender = std::thread::spawn(move || {
            send_unix_message(&a, &fd, b"", local, peer).unwrap();
            await_first_ack(&a, ACK_TIMEOUT).unwrap()
        });
        assert!(recv_unix(&mut b).unwrap().is_some());
        assert_eq!(
            sender.join().unwrap(),
            Receives::One,
            "no batches for an old receiver"
        );
    }

    /// A "kK" receiver that leaves says "L" before its next acknowledgement
    /// (the agent reads both, and keeps the unix connection no longer);
    /// one that leaves before its first message answers it "k" alone.
    #[test]
    fn a_leaving_receiver_says_so_before_its_next_acknowledgement() {
        let conns = pairs(2);
        let ends: Vec<(SocketAddr, SocketAddr)> = conns
            .iter()
            .map(|(_, s)| (s.local_addr().unwrap(), s.peer_addr().unwrap()))
            .collect();
        let fds: Vec<OwnedFd> = conns
            .iter()
            .map(|(_, s)| s.try_clone().unwrap().into())
            .collect();
        let (a, b) = UnixStream::pair().unwrap();
        let mut from = UnixReceiver::concurrent(b);
        send_unix_message(&a, &fds[0], b"", ends[0].0, ends[0].1).unwrap();
        assert_eq!(from.recv().unwrap().unwrap().len(), 1);
        assert_eq!(
            await_first_ack(&a, ACK_TIMEOUT).unwrap(),
            Receives::KeptBatches
        );
        from.leave().unwrap();
        from.leave().unwrap();
        let one = [Outgoing {
            fd: fds[1].as_fd(),
            blob: b"",
            local: ends[1].0,
            peer: ends[1].1,
        }];
        send_unix_batch(&a, &one).unwrap();
        assert_eq!(from.recv().unwrap().unwrap().len(), 1);
        assert!(
            await_batch_ack(&a, ACK_TIMEOUT).unwrap(),
            "leaving, said once"
        );
        drop(a);
        assert!(from.recv().unwrap().is_none(), "then the end");

        let (a, b) = UnixStream::pair().unwrap();
        let mut from = UnixReceiver::concurrent(b);
        from.leave().unwrap();
        send_unix_message(&a, &fds[0], b"", ends[0].0, ends[0].1).unwrap();
        assert_eq!(from.recv().unwrap().unwrap().len(), 1);
        assert_eq!(await_first_ack(&a, ACK_TIMEOUT).unwrap(), Receives::One);
    }

    /// Only a receiver made by `concurrent` lets the agent keep its unix
    /// connection ("kK"); `new` asks for batches alone ("kB").
    #[test]
    fn only_a_concurrent_receiver_lets_its_unix_connection_be_kept() {
        for (concurrent, answer) in [(false, Receives::Batches), (true, Receives::KeptBatches)] {
            let conns = pairs(1);
            let s = &conns[0].1;
            let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
            let (a, b) = UnixStream::pair().unwrap();
            let fd: OwnedFd = s.try_clone().unwrap().into();
            let sender = std::thread::spawn(move || {
                send_unix_message(&a, &fd, b"", local, peer).unwrap();
                await_first_ack(&a, ACK_TIMEOUT).unwrap()
            });
            let mut from = if concurrent {
                UnixReceiver::concurrent(b)
            } else {
                UnixReceiver::new(b)
            };
            assert_eq!(from.recv().unwrap().unwrap().len(), 1);
            assert_eq!(sender.join().unwrap(), answer);
        }
    }

    /// An older agent reads the "k" of a "kB" and closes, leaving the "B"
    /// unread: the receiver keeps the connection and sees the end of the
    /// unix connection, not an error.
    #[test]
    fn an_older_agent_that_reads_only_the_k_ends_the_stream_cleanly() {
        let conns = pairs(1);
        let s = &conns[0].1;
        let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        let (a, b) = UnixStream::pair().unwrap();
        let fd: OwnedFd = s.try_clone().unwrap().into();
        let agent = std::thread::spawn(move || {
            send_unix_message(&a, &fd, b"", local, peer).unwrap();
            await_unix_ack(&a, ACK_TIMEOUT).unwrap();
        });
        let mut from = UnixReceiver::new(b);
        let got = from.recv().unwrap().expect("the connection");
        agent.join().unwrap();
        assert_eq!(got.len(), 1);
        assert!(from.recv().unwrap().is_none(), "the end, not an error");
    }

    /// A batch message whose fds do not match its count, or whose entries
    /// do not fill its length exactly, is refused and its fds closed.
    #[test]
    fn a_batch_that_does_not_add_up_is_refused() {
        let conns = pairs(2);
        let s = &conns[0].1;
        let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        let mut entries = Vec::new();
        push_entry(&mut entries, b"x", local, peer);
        let message = |count: u16, len: usize, body: &[u8]| {
            let mut m = BATCH_MAGIC.to_vec();
            m.extend_from_slice(&count.to_be_bytes());
            m.extend_from_slice(&(len as u32).to_be_bytes());
            m.extend_from_slice(body);
            m
        };
        let two_entries = [&entries[..], &entries[..]].concat();
        for (m, fds) in [
            // Two entries, one fd.
            (message(2, two_entries.len(), &two_entries), 1),
            // One entry, two fds.
            (message(1, entries.len(), &entries), 2),
            // A byte after the last entry.
            (
                message(1, entries.len() + 1, &[&entries[..], b"!"].concat()),
                1,
            ),
            // A count of none.
            (message(0, 0, b""), 1),
        ] {
            let (a, b) = UnixStream::pair().unwrap();
            let attached: Vec<BorrowedFd<'_>> =
                conns[..fds].iter().map(|(_, s)| s.as_fd()).collect();
            tcpr_host::send_with_fds(a.as_fd(), &m, &attached).unwrap();
            drop(a);
            let mut from = UnixReceiver::new(b);
            assert!(from.recv().is_err(), "refused: {m:?}");
        }
    }
}

#[cfg(test)]
mod ack_tests {
    use super::*;
    use std::io::Write;

    /// The receiver takes the whole message and the fd, then says nothing:
    /// the sender gives up after [`ACK_TIMEOUT`] with a timeout (not a
    /// broken pipe), and still holds its copy of the connection.
    #[test]
    fn a_receiver_that_never_acknowledges_leaves_the_connection_with_the_sender() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let local = s.local_addr().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        // A receiver that reads the message (fd included) and never answers.
        let (got_tx, got_rx) = std::sync::mpsc::channel();
        let silent = std::thread::spawn(move || {
            let mut head = [0u8; 10];
            let (n, fd) = tcpr_host::recv_with_fd(b.as_fd(), &mut head).unwrap();
            got_tx.send((n, fd.is_some())).unwrap();
            // Keep the socket open, and silent, until the sender gave up.
            let mut rest = Vec::new();
            let _ = (&b).read_to_end(&mut rest);
        });
        let fd: OwnedFd = s.into();
        let err =
            send_unix_within(&a, &fd, b"", local, peer, Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "the acknowledgement timed out: {err:?}"
        );
        let (n, had_fd) = got_rx.recv().unwrap();
        assert!(n > 0 && had_fd, "the receiver got the message and the fd");
        // The sender's copy still carries the connection.
        let mut stream = TcpStream::from(fd);
        stream.write_all(b"still here").unwrap();
        let mut buf = [0u8; 10];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"still here");
        drop(a);
        silent.join().unwrap();
    }

    #[test]
    fn exec_commands_resolve_like_the_shell() {
        assert!(resolve_exec("cat").is_ok());
        assert!(resolve_exec("FOO=1 BAR='a b' cat -u").is_ok());
        assert!(resolve_exec("/bin/sh -c true").is_ok());
        for bad in [
            "no-such-program-tcpr --flag",
            "/nonexistent/prog",
            "FOO=1",
            "",
            "cat 'unbalanced",
            "/etc/passwd",
        ] {
            assert!(resolve_exec(bad).is_err(), "{bad:?} is refused");
        }
    }
}
