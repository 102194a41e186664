//! A zero-copy relay between two TCP connections: each direction's bytes
//! go socket → pipe → socket with splice(2) and never through userspace.
//! One thread serves both directions with non-blocking sockets and
//! poll(2).
//!
//! What it keeps from one side to the other (what a proxy must not lose):
//! - a half-close: when one side ends its stream (FIN), the relay sends
//!   on what it has buffered, then ends the other side's stream
//!   (`shutdown(SHUT_WR)`) and keeps relaying the other way;
//! - a failure: when one side is reset (or any error ends it), the other
//!   side is reset too (`SO_LINGER` 0 at close), so its peer does not
//!   mistake the break for a complete response.

use crate::sys::splice::{self, Pipe};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;

/// The pipe asked for per direction: a few round trips' worth of segments
/// per splice (the kernel rounds it to pages and may grant less).
const PIPE_BYTES: usize = 1 << 20;

/// What a relay carried, once both sides closed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes read from the first connection and written to the second.
    pub first_to_second: u64,
    /// Bytes read from the second connection and written to the first.
    pub second_to_first: u64,
}

/// Why a relay ended early: one side failed, and the other was reset.
#[derive(Debug, thiserror::Error)]
#[error("the {side} connection failed ({source}); the other one was reset")]
pub struct RelayError {
    /// `"first"` or `"second"`: the side whose call failed.
    pub side: &'static str,
    /// The failure.
    #[source]
    pub source: io::Error,
    /// What was carried until then.
    pub carried: Relayed,
}

/// One direction: `from` → pipe → `to` (indexes into the two sockets).
struct Direction {
    from: usize,
    to: usize,
    pipe: Pipe,
    capacity: usize,
    in_pipe: usize,
    /// `from` ended its stream (read returned 0).
    eof: bool,
    /// `to`'s stream was ended after the last byte (`shutdown(SHUT_WR)`).
    shut: bool,
    carried: u64,
}

/// A failed call, on socket `side`.
struct Failure {
    side: usize,
    error: io::Error,
}

impl Direction {
    fn new(from: usize, to: usize) -> io::Result<Direction> {
        let pipe = splice::pipe()?;
        // A smaller pipe than asked for only costs more splice calls.
        let capacity = splice::set_pipe_size(pipe.write.as_fd(), PIPE_BYTES)
            .or_else(|_| splice::set_pipe_size(pipe.write.as_fd(), 0))?;
        Ok(Direction {
            from,
            to,
            pipe,
            capacity,
            in_pipe: 0,
            eof: false,
            shut: false,
            carried: 0,
        })
    }

    fn done(&self) -> bool {
        self.shut
    }

    /// Moves what can be moved now without blocking.
    fn step(&mut self, socks: &[TcpStream; 2]) -> Result<(), Failure> {
        let fail = |side: usize| move |error: io::Error| Failure { side, error };
        loop {
            let mut moved = false;
            if !self.eof && self.in_pipe < self.capacity {
                match splice::splice(
                    socks[self.from].as_fd(),
                    self.pipe.write.as_fd(),
                    self.capacity - self.in_pipe,
                ) {
                    Ok(0) => {
                        self.eof = true;
                        moved = true;
                    }
                    Ok(n) => {
                        self.in_pipe += n;
                        moved = true;
                    }
                    Err(e) if retry_later(&e) => {}
                    Err(e) => return Err(fail(self.from)(e)),
                }
            }
            if self.in_pipe > 0 {
                match splice::splice(self.pipe.read.as_fd(), socks[self.to].as_fd(), self.in_pipe) {
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.carried += n as u64;
                        moved |= n > 0;
                    }
                    Err(e) if retry_later(&e) => {}
                    Err(e) => return Err(fail(self.to)(e)),
                }
            }
            if self.eof && self.in_pipe == 0 && !self.shut {
                socks[self.to]
                    .shutdown(Shutdown::Write)
                    .map_err(fail(self.to))?;
                self.shut = true;
            }
            if !moved || self.shut {
                return Ok(());
            }
        }
    }

    /// The poll events this direction waits for, per socket. Reading waits
    /// for an empty pipe: a pipe can be full of small segments (one slot
    /// each) long before its byte capacity, and a readable socket would
    /// then wake the loop for nothing until the writer drains it.
    fn interest(&self, events: &mut [i16; 2]) {
        if self.done() {
            return;
        }
        if self.in_pipe > 0 {
            events[self.to] |= libc::POLLOUT;
        } else if !self.eof {
            events[self.from] |= libc::POLLIN;
        }
    }
}

fn retry_later(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Relays between `first` and `second` until both have ended their
/// streams (each half-close passed on as it comes), then closes both.
/// When one side fails, the other is reset and the error says which.
pub fn relay(first: TcpStream, second: TcpStream) -> Result<Relayed, RelayError> {
    let socks = [first, second];
    let carried = |dirs: &[Direction]| Relayed {
        first_to_second: dirs.first().map_or(0, |d| d.carried),
        second_to_first: dirs.get(1).map_or(0, |d| d.carried),
    };
    let setup = || -> io::Result<Vec<Direction>> {
        for s in &socks {
            s.set_nonblocking(true)?;
        }
        Ok(vec![Direction::new(0, 1)?, Direction::new(1, 0)?])
    };
    let mut dirs = match setup() {
        Ok(d) => d,
        Err(e) => {
            return Err(abort(
                &socks,
                Failure { side: 0, error: e },
                Relayed::default(),
            ))
        }
    };
    loop {
        for d in dirs.iter_mut() {
            if let Err(f) = d.step(&socks) {
                let so_far = carried(&dirs);
                return Err(abort(&socks, f, so_far));
            }
        }
        if dirs.iter().all(Direction::done) {
            return Ok(carried(&dirs));
        }
        let mut events = [0i16; 2];
        for d in &dirs {
            d.interest(&mut events);
        }
        let mut fds: Vec<libc::pollfd> = socks
            .iter()
            .zip(events)
            .map(|(s, events)| libc::pollfd {
                // A negative fd is skipped by poll(2): no wanted event, and
                // no POLLHUP of a stream already ended on both sides.
                fd: if events == 0 {
                    -1
                } else {
                    std::os::fd::AsRawFd::as_raw_fd(s)
                },
                events,
                revents: 0,
            })
            .collect();
        match splice::poll(&mut fds, -1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let so_far = carried(&dirs);
                return Err(abort(&socks, Failure { side: 0, error: e }, so_far));
            }
        }
        for (side, fd) in fds.iter().enumerate() {
            if fd.revents & libc::POLLERR != 0 {
                if let Ok(Some(error)) = socks[side].take_error() {
                    let so_far = carried(&dirs);
                    return Err(abort(&socks, Failure { side, error }, so_far));
                }
            }
        }
    }
}

/// Resets the side that did not fail (its peer must not read a clean end
/// of stream) and closes both.
fn abort(socks: &[TcpStream; 2], f: Failure, carried: Relayed) -> RelayError {
    let other = 1 - f.side;
    // Should SO_LINGER fail, the close sends a FIN: the error returned
    // still tells the caller the relay broke.
    let _ = splice::reset_on_close(socks[other].as_fd());
    RelayError {
        side: if f.side == 0 { "first" } else { "second" },
        source: f.error,
        carried,
    }
}
