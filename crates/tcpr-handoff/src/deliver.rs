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
//!   socket and sends, per connection, one message (format below) with the
//!   connection's fd attached as SCM_RIGHTS; [`recv_unix`] is the client.
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
//! ```
//!
//! A connection closed before its first byte carries nothing: the agent
//! opens one at start to check that the application listens, and holds
//! one from each batch's PREPARE (for its first connection), which it
//! closes empty when the batch is given up. [`recv_unix`] reads it as end
//! of stream.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
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

/// What [`recv_unix`] reserves for a blob before its bytes arrive.
const BLOB_PREALLOCATION_BYTES: usize = 64 << 10;

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
    await_unix_ack(to, ack_timeout)
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
    let mut ack = [0u8; 1];
    let mut r = to;
    // A zero timeout means none at all to the socket: wait a little instead.
    r.set_read_timeout(Some(ack_timeout.max(MIN_ACK_WAIT)))?;
    r.read_exact(&mut ack)?;
    if ack != *b"k" {
        return Err(bad("acknowledgement"));
    }
    Ok(())
}

/// The message [`send_unix`] sends with the descriptor.
fn unix_message(blob: &[u8], local: SocketAddr, peer: SocketAddr) -> Vec<u8> {
    let (l, p) = (local.to_string(), peer.to_string());
    let mut m = Vec::with_capacity(16 + l.len() + p.len() + blob.len());
    m.extend_from_slice(MAGIC);
    m.extend_from_slice(&(l.len() as u16).to_be_bytes());
    m.extend_from_slice(l.as_bytes());
    m.extend_from_slice(&(p.len() as u16).to_be_bytes());
    m.extend_from_slice(p.as_bytes());
    m.extend_from_slice(&(blob.len() as u32).to_be_bytes());
    m.extend_from_slice(blob);
    m
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
/// application (its end is neither closed nor reset).
pub fn unix_alive(to: &UnixStream) -> bool {
    let mut one = [0u8; 1];
    if to.set_nonblocking(true).is_err() {
        return false;
    }
    // The application says nothing before our message: a byte to read
    // means it closed (or misbehaves).
    let mut r = to;
    let alive = matches!(r.read(&mut one), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    alive && to.set_nonblocking(false).is_ok()
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
                let mut one = [0u8; 1];
                if to.set_nonblocking(true).is_err() {
                    return false;
                }
                let open = match to.peek(&mut one) {
                    Ok(n) => n > 0,
                    Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                };
                open && to.set_nonblocking(false).is_ok()
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
    let s = TcpStream::connect_timeout(&server, FORWARD_CONNECT_TIMEOUT).map_err(|e| {
        format!("the server {server} does not accept connections: {e} (start it first)")
    })?;
    // The relay writes what it reads at once: no Nagle delay on the way.
    s.set_nodelay(true)
        .map_err(|e| format!("the server {server}: {e}"))?;
    Ok(s)
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

/// Receives one connection sent by [`send_unix`] (the agent's `--unix`).
/// Returns `Ok(None)` at end of stream.
pub fn recv_unix(from: &mut UnixStream) -> io::Result<Option<Delivered>> {
    let mut head = [0u8; 10];
    let (n, fd) = tcpr_host::recv_with_fd(from.as_fd(), &mut head)?;
    if n == 0 {
        return Ok(None);
    }
    from.read_exact(&mut head[n..])?;
    if &head[..8] != MAGIC {
        return Err(bad("magic"));
    }
    let fd = fd.ok_or_else(|| bad("no file descriptor attached"))?;
    // Each read takes a field and the length of the next one: exactly the
    // message's bytes (a next message on the stream is left unread), in
    // three reads rather than five.
    let text = |b: Vec<u8>| String::from_utf8(b).map_err(|_| bad("address text"));
    let local_len = u16::from_be_bytes([head[8], head[9]]) as usize;
    let mut local_and_len = vec![0u8; local_len + 2];
    from.read_exact(&mut local_and_len)?;
    let peer_len = u16::from_be_bytes([local_and_len[local_len], local_and_len[local_len + 1]]);
    local_and_len.truncate(local_len);
    let local = text(local_and_len)?;
    let peer_len = peer_len as usize;
    let mut peer_and_len = vec![0u8; peer_len + 4];
    from.read_exact(&mut peer_and_len)?;
    let mut blob_len = [0u8; 4];
    blob_len.copy_from_slice(&peer_and_len[peer_len..]);
    peer_and_len.truncate(peer_len);
    let peer = text(peer_and_len)?;
    let blen = u32::from_be_bytes(blob_len) as usize;
    if blen > 1 << 30 {
        return Err(bad("blob length"));
    }
    // Grown as the bytes arrive: a length alone (up to 1 GiB) reserves
    // nothing.
    let mut blob = Vec::with_capacity(blen.min(BLOB_PREALLOCATION_BYTES));
    if (&mut *from).take(blen as u64).read_to_end(&mut blob)? != blen {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let local = local.parse().map_err(|_| bad("local address"))?;
    let peer = peer.parse().map_err(|_| bad("peer address"))?;
    // Until the acknowledgement is read, the agent holds the connection
    // too, and closes it silently if we fail. From here it is live and
    // ours: an agent that died before reading the acknowledgement (EPIPE)
    // must not make us drop it, as nothing else holds it any more (the
    // restarted agent reports it unknown; it lives on here).
    if let Err(e) = std::io::Write::write_all(from, b"k") {
        tracing::warn!(
            "kept a delivered connection whose agent did not take the acknowledgement: {e}"
        );
    }
    Ok(Some(Delivered {
        stream: TcpStream::from(fd),
        blob,
        local,
        peer,
    }))
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
