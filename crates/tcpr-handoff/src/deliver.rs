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

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};

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

/// Sends one connection over a unix stream socket.
pub fn send_unix(
    to: &UnixStream,
    sock: &OwnedFd,
    blob: &[u8],
    local: SocketAddr,
    peer: SocketAddr,
) -> io::Result<()> {
    let (l, p) = (local.to_string(), peer.to_string());
    let mut m = Vec::with_capacity(16 + l.len() + p.len() + blob.len());
    m.extend_from_slice(MAGIC);
    m.extend_from_slice(&(l.len() as u16).to_be_bytes());
    m.extend_from_slice(l.as_bytes());
    m.extend_from_slice(&(p.len() as u16).to_be_bytes());
    m.extend_from_slice(p.as_bytes());
    m.extend_from_slice(&(blob.len() as u32).to_be_bytes());
    m.extend_from_slice(blob);
    tcpr_host::send_with_fd(to.as_fd(), &m, sock.as_fd())?;
    // The receiver's acknowledgement: until it comes, the connection is ours.
    let mut ack = [0u8; 1];
    let mut r = to;
    r.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    r.read_exact(&mut ack)?;
    if ack != *b"k" {
        return Err(bad("acknowledgement"));
    }
    Ok(())
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
    fn read_str(from: &mut UnixStream, len: usize) -> io::Result<String> {
        let mut b = vec![0u8; len];
        from.read_exact(&mut b)?;
        String::from_utf8(b).map_err(|_| bad("address text"))
    }
    let local = read_str(from, u16::from_be_bytes([head[8], head[9]]) as usize)?;
    let mut two = [0u8; 2];
    from.read_exact(&mut two)?;
    let peer = read_str(from, u16::from_be_bytes(two) as usize)?;
    let mut four = [0u8; 4];
    from.read_exact(&mut four)?;
    let blen = u32::from_be_bytes(four) as usize;
    if blen > 1 << 30 {
        return Err(bad("blob length"));
    }
    let mut blob = vec![0u8; blen];
    from.read_exact(&mut blob)?;
    std::io::Write::write_all(from, b"k")?;
    Ok(Some(Delivered {
        stream: TcpStream::from(fd),
        blob,
        local: local.parse().map_err(|_| bad("local address"))?,
        peer: peer.parse().map_err(|_| bad("peer address"))?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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

    #[test]
    fn a_receiver_that_never_acknowledges_leaves_the_connection_with_the_sender() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let local = s.local_addr().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let fd: OwnedFd = s.into();
        assert!(send_unix(&a, &fd, b"", local, peer).is_err());
    }
}
