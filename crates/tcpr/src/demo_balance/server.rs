//! The demo's and the bench's backend HTTP server: one event loop (a
//! tokio current-thread runtime) per server, serving every connection on
//! its thread, as real servers (nginx, async Rust servers) do. It takes
//! connections two ways, served by the same code with the same responses:
//! from a TCP listener ([`serve_tcp`]: behind HAProxy and `tcpr agent
//! --forward`), or passed by `tcpr agent --unix` over a unix socket
//! ([`serve_fds`]), received on the same loop without a thread per unix
//! connection or a handoff between threads per delivered connection.
//!
//! Answers: `/bytes/N` sends N bytes of the repeated block (written as the
//! client takes them: nothing is buffered beyond the socket), any other
//! path the server's name. HTTP/1.1 keep-alive unless the request says
//! `Connection: close` (or is HTTP/1.0 without keep-alive); pipelined
//! requests are answered in order.
//!
//! It once served each connection on a kept pool thread: per request a
//! thread handoff and its futex wake-ups (3.9 context switches of the
//! server threads per request over new connections), which measured the
//! bench's server more than the balancer.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a server answers: its name, and the block its bodies repeat.
#[derive(Debug, Clone)]
pub(crate) struct Site {
    name: Arc<str>,
    block: Arc<[u8]>,
}

impl Site {
    /// A server named `name` whose `/bytes/N` bodies repeat `block`.
    pub(crate) fn new(name: &str, block: Vec<u8>) -> Site {
        assert!(!block.is_empty(), "a body's block has bytes");
        Site {
            name: name.into(),
            block: block.into(),
        }
    }
}

/// The most a request head may take (request line and headers).
const HEAD_BYTES_MAX: usize = 8 << 10;
/// The most headers a request may have.
const HEADERS_MAX: usize = 32;
/// How long the loop waits after a failed accept (out of fds, say), so a
/// failure that lasts does not spin it.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// Runs `serve` ([`serve_tcp`] or [`serve_fds`]) as the calling thread's
/// event loop, until it ends.
pub(crate) fn run(serve: impl Future<Output = io::Result<()>>) -> io::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?
        .block_on(serve)
}

/// Serves HTTP on each connection `listener` accepts (within [`run`]).
pub(crate) async fn serve_tcp(listener: TcpListener, site: Site) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(answer(conn, site.clone()));
            }
            Err(e) => accept_failed(&e).await,
        }
    }
}

/// Serves HTTP on each connection delivered over the unix connections
/// `listener` accepts (from `tcpr agent --unix`: a unix connection per
/// batch, or one kept for many; within [`run`]).
pub(crate) async fn serve_fds(listener: UnixListener, site: Site) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    loop {
        match listener.accept().await {
            Ok((from, _)) => {
                tokio::spawn(receive(from, site.clone()));
            }
            Err(e) => accept_failed(&e).await,
        }
    }
}

async fn accept_failed(e: &io::Error) {
    eprintln!("server: accept: {e}");
    tokio::time::sleep(ACCEPT_RETRY).await;
}

/// Takes the connections delivered on `from` until it ends, each served
/// by a task of this loop.
async fn receive(from: tokio::net::UnixStream, site: Site) {
    // A task per unix connection: the agent may keep it between batches.
    let mut from = tcpr_handoff::tokio::AsyncUnixReceiver::concurrent(from);
    loop {
        match from.recv().await {
            Ok(Some(delivered)) => {
                for d in delivered {
                    match d.into_tokio() {
                        Ok(d) => {
                            tokio::spawn(answer(d.stream, site.clone()));
                        }
                        Err(e) => eprintln!("server: a delivered connection: {e}"),
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                eprintln!("server: the agent's unix connection: {e}");
                return;
            }
        }
    }
}

/// One request, from its head.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    /// The head's length in bytes.
    len: usize,
    /// `/bytes/N`: N; otherwise the name is asked for.
    bytes: Option<u64>,
    /// The connection closes after the response.
    close: bool,
}

/// The request whose head starts `buf`; `None` while it is incomplete.
fn parse(buf: &[u8]) -> io::Result<Option<Request>> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
    };
    let has = |token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|b| *b == b','))
            .any(|v| v.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    };
    let close = if req.version == Some(0) {
        !has("keep-alive")
    } else {
        has("close")
    };
    let bytes = req
        .path
        .and_then(|p| p.strip_prefix("/bytes/"))
        .map(|n| n.parse().unwrap_or(0));
    Ok(Some(Request { len, bytes, close }))
}

/// Serves the requests of one connection until the client closes or a
/// request asks to close; errors (a reset, a bad request) just end it.
async fn answer(mut conn: TcpStream, site: Site) {
    let _ = conn.set_nodelay(true);
    let mut buf = vec![0u8; HEAD_BYTES_MAX];
    let mut filled = 0;
    loop {
        let request = match parse(&buf[..filled]) {
            Ok(Some(r)) => r,
            Ok(None) if filled < buf.len() => match conn.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    filled += n;
                    continue;
                }
            },
            // A head too long, or not HTTP.
            _ => return,
        };
        if respond(&mut conn, &site, &request).await.is_err() || request.close {
            return;
        }
        // A pipelined next request may follow.
        buf.copy_within(request.len..filled, 0);
        filled -= request.len;
    }
}

/// Writes the response to `request`.
async fn respond(conn: &mut TcpStream, site: &Site, request: &Request) -> io::Result<()> {
    // Said, so that the client does not send its next request on a
    // connection about to close (wrk counts that as an error).
    let connection = if request.close {
        "Connection: close\r\n"
    } else {
        ""
    };
    match request.bytes {
        Some(n) => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n{connection}\r\n");
            send_repeated(conn, head.as_bytes(), n, &site.block).await
        }
        None => {
            // Head and body in one write: with Nagle and the client's
            // delayed ACK, a second small write would stall.
            let body = format!("{}\n", site.name);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{connection}\r\n{body}",
                body.len()
            );
            conn.write_all(response.as_bytes()).await
        }
    }
}

/// Writes `head`, then `n` bytes of `block` repeated (byte i of the body
/// is `block[i % block.len()]`), each write as much as the socket takes
/// (the first one the head and the body's start together), waiting for
/// room in between: the body is never buffered here.
async fn send_repeated(conn: &mut TcpStream, head: &[u8], n: u64, block: &[u8]) -> io::Result<()> {
    let mut head_sent = 0;
    let mut body_sent = 0u64;
    while head_sent < head.len() || body_sent < n {
        let at = (body_sent % block.len() as u64) as usize;
        let chunk = (block.len() - at).min((n - body_sent).try_into().unwrap_or(usize::MAX));
        let body = &block[at..at + chunk];
        let wrote = if head_sent < head.len() {
            let parts = [IoSlice::new(&head[head_sent..]), IoSlice::new(body)];
            conn.write_vectored(&parts).await?
        } else {
            conn.write(body).await?
        };
        if wrote == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let to_head = wrote.min(head.len() - head_sent);
        head_sent += to_head;
        body_sent += (wrote - to_head) as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    #[test]
    fn heads_parse_with_their_path_and_connection() {
        let req = |text: &str| parse(text.as_bytes()).unwrap();
        let get = "GET /name HTTP/1.1\r\nHost: b.example\r\n\r\n";
        assert_eq!(
            req(get),
            Some(Request {
                len: get.len(),
                bytes: None,
                close: false
            })
        );
        let close = req("GET /bytes/1048576 HTTP/1.1\r\nconnection: Keep-Alive, CLOSE\r\n\r\nGET");
        assert_eq!(
            close.as_ref().map(|r| (r.bytes, r.close)),
            Some((Some(1 << 20), true))
        );
        assert_eq!(req("GET /bytes/x HTTP/1.1\r\n\r\n").unwrap().bytes, Some(0));
        assert!(req("GET / HTTP/1.0\r\n\r\n").unwrap().close);
        assert!(
            !req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .close
        );
        assert_eq!(req("GET /name HTTP/1.1\r\nHost: b"), None);
        assert!(parse(b"\x16\x03\x01 not http\r\n\r\n").is_err());
    }

    /// A server on a thread of its own, as the bench starts it.
    fn start(block: Vec<u8>) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let site = Site::new("backend-x", block);
        std::thread::spawn(move || run(serve_tcp(l, site)));
        addr
    }

    /// Reads one response: its head's lines and its body.
    fn response(r: &mut impl BufRead) -> (Vec<String>, Vec<u8>) {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let line = line.trim_end().to_string();
            if line.is_empty() {
                break;
            }
            head.push(line);
        }
        let len: usize = head
            .iter()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("a length")
            .parse()
            .unwrap();
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        (head, body)
    }

    /// Pipelined requests on one connection: the name, a body larger than
    /// the socket buffers of the repeated block (read slowly at first,
    /// so the server must wait for room), and a close the server says
    /// and does.
    #[test]
    fn pipelined_requests_are_answered_in_order_and_close_when_asked() {
        let block: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let addr = start(block.clone());
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let n: usize = 8 << 20;
        write!(
            c,
            "GET /name HTTP/1.1\r\nHost: a\r\n\r\nGET /bytes/{n} HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut r = BufReader::new(c);
        let (head, body) = response(&mut r);
        assert_eq!(head[0], "HTTP/1.1 200 OK");
        assert_eq!(body, b"backend-x\n");
        let (head, body) = response(&mut r);
        assert!(!head.iter().any(|l| l.starts_with("Connection")));
        assert_eq!(body.len(), n);
        assert!(body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == block[i % block.len()]));
        let (head, body) = response(&mut r);
        assert!(head.contains(&"Connection: close".to_string()), "{head:?}");
        assert_eq!(body, b"backend-x\n");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed after the response");
    }

    /// Many connections at once, one request each, all served by the one
    /// loop.
    #[test]
    fn concurrent_connections_are_all_served() {
        let addr = start(vec![1, 2, 3]);
        let conns: Vec<std::net::TcpStream> = (0..50)
            .map(|_| {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                c.write_all(b"GET /bytes/5 HTTP/1.1\r\n\r\n").unwrap();
                c
            })
            .collect();
        for c in conns {
            let (_, body) = response(&mut BufReader::new(c));
            assert_eq!(body, [1, 2, 3, 1, 2]);
        }
    }
}

#[cfg(test)]
mod fd_tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::{AsFd, OwnedFd};
    use tcpr_handoff::deliver::{self, Outgoing};

    /// Connections passed over the unix socket, as an agent that opens a
    /// unix connection per connection does (one "TCPR-FD1" each) and as
    /// one that keeps its unix connection for batches: each is answered
    /// by the loop, the request it already held included.
    #[test]
    fn delivered_connections_are_served_either_way_the_agent_sends() {
        let dir = std::env::temp_dir().join(format!("tcpr-server-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.sock");
        let unix = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || run(serve_fds(unix, Site::new("fd-server", vec![9]))));
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let pairs: Vec<(std::net::TcpStream, std::net::TcpStream)> = (0..5)
            .map(|i| {
                let mut c = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
                // The request is in the server end's queue before it moves.
                let path = if i % 2 == 0 { "/name" } else { "/bytes/3" };
                write!(c, "GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
                (c, tcp.accept().unwrap().0)
            })
            .collect();
        let fds: Vec<OwnedFd> = pairs
            .iter()
            .map(|(_, s)| s.try_clone().unwrap().into())
            .collect();
        let ends = |i: usize| {
            let s = &pairs[i].1;
            (s.local_addr().unwrap(), s.peer_addr().unwrap())
        };
        // One unix connection per connection.
        for (i, fd) in fds.iter().enumerate().take(2) {
            let to = std::os::unix::net::UnixStream::connect(&path).unwrap();
            let (local, peer) = ends(i);
            deliver::send_unix(&to, fd, b"", local, peer).unwrap();
        }
        // One unix connection kept: a first message, then a batch.
        let to = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (local, peer) = ends(2);
        deliver::send_unix_message(&to, &fds[2], b"", local, peer).unwrap();
        assert_eq!(
            deliver::await_first_ack(&to, deliver::ACK_TIMEOUT).unwrap(),
            deliver::Receives::KeptBatches,
            "the server reads each unix connection on a task: it may be kept"
        );
        let batch: Vec<Outgoing<'_>> = (3..5)
            .map(|i| Outgoing {
                fd: fds[i].as_fd(),
                blob: b"",
                local: ends(i).0,
                peer: ends(i).1,
            })
            .collect();
        deliver::send_unix_batch(&to, &batch).unwrap();
        deliver::await_unix_ack(&to, deliver::ACK_TIMEOUT).unwrap();
        // Only the server holds them now.
        drop((fds, to));
        for (i, (c, s)) in pairs.into_iter().enumerate() {
            drop(s);
            let mut lines = BufReader::new(c).lines().map(Result::unwrap);
            assert_eq!(lines.next().as_deref(), Some("HTTP/1.1 200 OK"), "{i}");
            let rest: Vec<String> = lines.collect();
            let body = if i % 2 == 0 {
                "fd-server"
            } else {
                "\u{9}\u{9}\u{9}"
            };
            assert_eq!(rest.last().map(String::as_str), Some(body), "{i}: {rest:?}");
            assert!(rest.contains(&"Connection: close".to_string()));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
