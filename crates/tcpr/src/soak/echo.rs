//! The soak's server application: an echo per connection, whose state (the
//! bytes read and not yet written back, and whether the client has
//! half-closed) travels with the connection as its blob.

use anyhow::{bail, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes read and not yet echoed, at most: beyond it the echo stops
/// reading, so a client that stops reading closes both windows in turn.
const MAX_PENDING_BYTES: usize = 256 * 1024;
/// The read buffer.
const READ_BYTES: usize = 64 * 1024;
/// How long an idle echo waits before looking again.
const IDLE_WAIT: Duration = Duration::from_millis(2);
/// The blob's first byte: whether the client's FIN has been read.
const BLOB_EOF: u8 = 1;

/// What the echo holds between moves.
#[derive(Debug, Default, Clone)]
pub struct EchoState {
    /// Read from the client, not yet written back.
    pub pending: Vec<u8>,
    /// The client has half-closed (its FIN was read).
    pub eof: bool,
}

impl EchoState {
    /// The blob that travels with the connection.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(1 + self.pending.len());
        b.push(if self.eof { BLOB_EOF } else { 0 });
        b.extend_from_slice(&self.pending);
        b
    }
    /// The state a blob carries. No blob is no state: `tcpr migrate`
    /// carries none, and the echo drains before such a move.
    pub fn decode(blob: &[u8]) -> Result<EchoState> {
        let Some((&flag, pending)) = blob.split_first() else {
            return Ok(EchoState::default());
        };
        if flag > BLOB_EOF {
            bail!("the echo's blob starts with {flag}, not a half-close flag");
        }
        Ok(EchoState {
            pending: pending.to_vec(),
            eof: flag == BLOB_EOF,
        })
    }
}

/// A running echo.
#[derive(Debug)]
pub struct Echo {
    stop: Arc<AtomicBool>,
    drain: Arc<AtomicBool>,
    thread: JoinHandle<Stopped>,
}

/// An echo stopped: its socket and state, or why it failed.
#[derive(Debug)]
pub struct Stopped {
    /// The connection.
    pub sock: TcpStream,
    /// What it held.
    pub state: EchoState,
    /// The error that stopped it early, if any.
    pub error: Option<String>,
}

impl Echo {
    /// Starts echoing on `sock` from `state`.
    pub fn start(sock: TcpStream, state: EchoState) -> Result<Echo> {
        sock.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let drain = Arc::new(AtomicBool::new(false));
        let (flag, drain_flag) = (stop.clone(), drain.clone());
        let thread = std::thread::spawn(move || run(sock, state, &flag, &drain_flag));
        Ok(Echo {
            stop,
            drain,
            thread,
        })
    }
    /// Stops reading, writes back what it holds (for up to `wait`: a
    /// client that does not read keeps it), then stops.
    pub fn drain(self, wait: Duration) -> Stopped {
        self.drain.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + wait;
        while !self.thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(IDLE_WAIT);
        }
        self.stop()
    }
    /// Stops the echo and hands back the socket and its state.
    pub fn stop(self) -> Stopped {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.join() {
            Ok(s) => s,
            // The loop has no panicking path; resume_unwind keeps a bug loud.
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

fn run(
    mut sock: TcpStream,
    mut state: EchoState,
    stop: &AtomicBool,
    drain: &AtomicBool,
) -> Stopped {
    let mut buf = vec![0u8; READ_BYTES];
    let mut error = None;
    while !stop.load(Ordering::SeqCst) && error.is_none() {
        let draining = drain.load(Ordering::SeqCst);
        if draining && state.pending.is_empty() {
            break;
        }
        let mut progressed = false;
        if !draining && !state.eof && state.pending.len() < MAX_PENDING_BYTES {
            let room = (MAX_PENDING_BYTES - state.pending.len()).min(buf.len());
            match sock.read(&mut buf[..room]) {
                Ok(0) => {
                    state.eof = true;
                    progressed = true;
                }
                Ok(n) => {
                    state.pending.extend_from_slice(&buf[..n]);
                    progressed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => error = Some(format!("echo read: {e}")),
            }
        }
        if !state.pending.is_empty() && error.is_none() {
            match sock.write(&state.pending) {
                Ok(n) => {
                    state.pending.drain(..n);
                    progressed = progressed || n > 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => error = Some(format!("echo write: {e}")),
            }
        }
        if !progressed {
            std::thread::sleep(IDLE_WAIT);
        }
    }
    Stopped { sock, state, error }
}
