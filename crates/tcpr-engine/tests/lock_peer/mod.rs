//! A python3 TCP pair on loopback (`py/lock_pair.py`) for the lock tests:
//! both ends live in a real peer process, so the test can lock their flow
//! and read each end's retransmission count (TCP_INFO) and receive queue.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use tcpr_engine::Flow;

/// One end of the pair.
#[derive(Clone, Copy, Debug)]
pub(crate) enum End {
    Client,
    Server,
}

impl End {
    fn name(self) -> &'static str {
        match self {
            End::Client => "c",
            End::Server => "s",
        }
    }
}

pub(crate) struct PyPair {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The flow as the server end sees it (the one a dump would lock).
    pub(crate) flow: Flow,
}

impl PyPair {
    /// A pair over IPv4 (`v6`: IPv6) loopback in the caller's namespace.
    pub(crate) fn new(v6: bool) -> PyPair {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/lock_pair.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(if v6 { "6" } else { "4" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        let addr =
            |ip: &str, port: &str| SocketAddr::new(ip.parse().unwrap(), port.parse().unwrap());
        let flow = Flow {
            local: addr(w[2], w[3]),
            peer: addr(w[0], w[1]),
        };
        PyPair {
            child,
            stdin,
            stdout,
            flow,
        }
    }

    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the python pair exited on {cmd:?}");
        line.trim().to_string()
    }

    /// Sends `text` from `end`.
    pub(crate) fn send(&mut self, end: End, text: &str) {
        assert_eq!(self.ask(&format!("send {} {text}", end.name())), "ok");
    }

    /// How many segments `end` retransmitted in all.
    pub(crate) fn retrans(&mut self, end: End) -> u32 {
        self.ask(&format!("retrans {}", end.name()))
            .parse()
            .unwrap()
    }

    /// Bytes waiting in `end`'s receive queue.
    pub(crate) fn inq(&mut self, end: End) -> u32 {
        self.ask(&format!("inq {}", end.name())).parse().unwrap()
    }

    /// Reads `n` bytes at `end` (blocking until they come).
    pub(crate) fn recv(&mut self, end: End, n: usize) -> String {
        self.ask(&format!("recv {} {n}", end.name()))
    }

    /// Closes `end`.
    pub(crate) fn close(&mut self, end: End) {
        assert_eq!(self.ask(&format!("close {}", end.name())), "ok");
    }

    /// Bytes in `end`'s send queue not yet sent.
    pub(crate) fn unsent(&mut self, end: End) -> u32 {
        self.ask(&format!("unsent {}", end.name())).parse().unwrap()
    }

    // Where each direction is dropped: the server's segments in the
    // output hook, synchronously in its send (the kernel keeps them
    // unsent and probes later: no retransmission); the client's in the
    // server side's prerouting hook, after its send returned (the client
    // retransmits them).

    /// Sends `tag` each way at once and checks that neither is dropped:
    /// the server's segment left during its send, the client's arrived
    /// with no retransmission.
    pub(crate) fn passes_at_once(&mut self, tag: &str) {
        let client_retrans = self.retrans(End::Client);
        self.send(End::Server, tag);
        assert_eq!(
            self.unsent(End::Server),
            0,
            "{tag}: the server's segment was dropped"
        );
        self.send(End::Client, tag);
        assert_eq!(self.recv(End::Server, tag.len()), tag);
        assert_eq!(self.recv(End::Client, tag.len()), tag);
        assert_eq!(
            self.retrans(End::Client),
            client_retrans,
            "{tag}: the client's first transmission was dropped"
        );
    }

    /// Sends `tag` each way and checks that both are dropped: the
    /// server's segment cannot leave, the client's is retransmitted, and
    /// nothing reaches either end. The bytes are still due:
    /// [`PyPair::delivers_late`] reads them.
    pub(crate) fn dropped_both_ways(&mut self, tag: &str) {
        let client_retrans = self.retrans(End::Client);
        self.send(End::Server, tag);
        assert!(
            self.unsent(End::Server) > 0,
            "{tag}: the server's segment left"
        );
        self.send(End::Client, tag);
        super::common::wait_until(
            "the client retransmits its dropped segment",
            super::common::WAIT,
            || self.retrans(End::Client) > client_retrans,
        );
        assert_eq!(self.inq(End::Server), 0, "{tag}: reached the server");
        assert_eq!(self.inq(End::Client), 0, "{tag}: reached the client");
    }

    /// Reads the bytes [`PyPair::dropped_both_ways`] sent (once a
    /// retransmission gets through).
    pub(crate) fn delivers_late(&mut self, tag: &str) {
        assert_eq!(self.recv(End::Server, tag.len()), tag);
        assert_eq!(self.recv(End::Client, tag.len()), tag);
    }
}

impl Drop for PyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
