//! A zero-copy relay between two TCP connections: each direction's bytes
//! go socket → pipe → socket with splice(2) and never through userspace.
//! Two ways to run it: [`relay`] serves one pair on the calling thread
//! (non-blocking sockets and poll(2)); [`Relays`] serves many pairs on a
//! few threads, each an event loop over epoll (edge-triggered, through
//! `mio`), so one wake-up handles the events of every pair that has some,
//! and the pipes of finished relays are kept for the next ones.
//!
//! What it keeps from one side to the other (what a proxy must not lose),
//! both ways alike:
//! - a half-close: when one side ends its stream (FIN), the relay sends
//!   on what it has buffered, then ends the other side's stream
//!   (`shutdown(SHUT_WR)`) and keeps relaying the other way;
//! - a failure: when one side is reset (or any error ends it), the other
//!   side is reset too (`SO_LINGER` 0 at close), so its peer does not
//!   mistake the break for a complete response.

use crate::sys::splice::{self, Pipe};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The pipe asked for per direction: a few round trips' worth of segments
/// per splice (the kernel rounds it to pages and may grant less; its pages
/// are taken only while bytes sit in it).
const PIPE_BYTES: usize = 1 << 20;

/// What a relay carried, once both sides closed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes read from the first connection and written to the second.
    pub first_to_second: u64,
    /// Bytes read from the second connection and written to the first.
    pub second_to_first: u64,
}

/// Why a relay ended early: one side failed, and the other was reset; or
/// it was cut ([`Cut`]), and both were.
#[derive(Debug, thiserror::Error)]
#[error("{}", describe(.side, .source))]
pub struct RelayError {
    /// `"first"` or `"second"`: the side whose call failed; [`CUT`]: the
    /// relay was cut, both sides reset.
    pub side: &'static str,
    /// The failure.
    #[source]
    pub source: io::Error,
    /// What was carried until then.
    pub carried: Relayed,
}

/// [`RelayError::side`] of a relay ended by its [`Cut`].
pub const CUT: &str = "both";

fn describe(side: &str, source: &io::Error) -> String {
    if side == CUT {
        format!("the relay was cut short ({source}); both connections were reset")
    } else {
        format!("the {side} connection failed ({source}); the other one was reset")
    }
}

impl RelayError {
    /// Whether the relay ended because it was cut.
    pub fn was_cut(&self) -> bool {
        self.side == CUT
    }
}

/// Ends every [`relay_until`] given it, at once and from any thread:
/// [`Cut::cut`] closes the write end of a pipe whose read end each relay
/// polls beside its sockets, so every one of them wakes (POLLHUP) with no
/// list of relays kept and no write that could block. A cut relay resets
/// both its connections: their peers must not read a clean end of stream
/// (a FIN after part of a response looks like all of it).
#[derive(Debug)]
pub struct Cut {
    read: std::os::fd::OwnedFd,
    write: Mutex<Option<std::os::fd::OwnedFd>>,
}

impl Cut {
    /// A cut not made yet.
    pub fn new() -> io::Result<Cut> {
        let p = splice::pipe()?;
        Ok(Cut {
            read: p.read,
            write: Mutex::new(Some(p.write)),
        })
    }

    /// Cuts every relay running with it, and every one started with it
    /// from now on.
    pub fn cut(&self) {
        drop(self.write.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// Whether [`Cut::cut`] was called.
    pub fn is_cut(&self) -> bool {
        self.write
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }
}

/// A pipe with the capacity the kernel granted.
struct Sized {
    pipe: Pipe,
    capacity: usize,
}

impl Sized {
    fn new() -> io::Result<Sized> {
        let pipe = splice::pipe()?;
        // A smaller pipe than asked for only costs more splice calls.
        let capacity = splice::set_pipe_size(pipe.write.as_fd(), PIPE_BYTES)
            .or_else(|_| splice::set_pipe_size(pipe.write.as_fd(), 0))?;
        Ok(Sized { pipe, capacity })
    }
}

/// Empty pipes kept for the next relays: a relay that reuses two saves
/// pipe2, F_SETPIPE_SZ and two closes per direction.
#[derive(Default)]
struct PipePool {
    idle: Vec<Sized>,
}

/// Pipes kept at most (each is a few fds and a small ring; its pages are
/// freed when it empties).
const POOL_MAX: usize = 128;

impl PipePool {
    fn take(&mut self) -> io::Result<Sized> {
        match self.idle.pop() {
            Some(p) => Ok(p),
            None => Sized::new(),
        }
    }

    /// Keeps `dir`'s pipe when it is empty (a pipe with bytes left in it
    /// belongs to a relay that broke, and is closed).
    fn give(&mut self, dir: Direction) {
        if dir.in_pipe == 0 && self.idle.len() < POOL_MAX {
            self.idle.push(dir.pipe);
        }
    }
}

/// One direction: `from` → pipe → `to` (indexes into the two sockets).
struct Direction {
    from: usize,
    to: usize,
    pipe: Sized,
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

/// How far a step got.
#[derive(Debug, PartialEq, Eq)]
enum Stepped {
    /// Nothing more moves until an event.
    Blocked,
    /// Bytes still move, but the step used its rounds: step again soon
    /// (other relays first).
    Budget,
}

/// Rounds (a splice in and a splice out each) a step makes at most, so a
/// fast stream does not hold an event loop from the other relays.
const ROUNDS: usize = 16;

impl Direction {
    fn new(from: usize, to: usize, pipe: Sized) -> Direction {
        Direction {
            from,
            to,
            pipe,
            in_pipe: 0,
            eof: false,
            shut: false,
            carried: 0,
        }
    }

    fn done(&self) -> bool {
        self.shut
    }

    /// Moves what can be moved now without blocking (up to [`ROUNDS`]).
    /// `last`: the other direction is done, so the pair closes once this
    /// one is, and that close ends `to`'s stream (a FIN, its receive queue
    /// being empty): no shutdown call of its own.
    fn step(&mut self, socks: &[TcpStream; 2], last: bool) -> Result<Stepped, Failure> {
        let fail = |side: usize| move |error: io::Error| Failure { side, error };
        let capacity = self.pipe.capacity;
        for _ in 0..ROUNDS {
            let mut moved = false;
            if !self.eof && self.in_pipe < capacity {
                match splice::splice(
                    socks[self.from].as_fd(),
                    self.pipe.pipe.write.as_fd(),
                    capacity - self.in_pipe,
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
                match splice::splice(
                    self.pipe.pipe.read.as_fd(),
                    socks[self.to].as_fd(),
                    self.in_pipe,
                ) {
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
                if !last {
                    socks[self.to]
                        .shutdown(Shutdown::Write)
                        .map_err(fail(self.to))?;
                }
                self.shut = true;
            }
            if !moved || self.shut {
                return Ok(Stepped::Blocked);
            }
        }
        Ok(Stepped::Budget)
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

/// Both directions of one relayed pair.
struct Pair {
    socks: [TcpStream; 2],
    dirs: [Direction; 2],
}

impl Pair {
    /// Non-blocking sockets without Nagle and a pipe per direction; on
    /// failure the two sockets come back untouched but for O_NONBLOCK and
    /// TCP_NODELAY.
    fn new(
        socks: [TcpStream; 2],
        pipes: &mut PipePool,
    ) -> Result<Pair, (io::Error, [TcpStream; 2])> {
        let taken = (|| {
            let up = pipes.take()?;
            let down = match pipes.take() {
                Ok(p) => p,
                Err(e) => {
                    pipes.idle.push(up);
                    return Err(e);
                }
            };
            for s in &socks {
                s.set_nonblocking(true)?;
                // A relay cannot know message boundaries: what it writes
                // goes at once. With Nagle on (a restored connection keeps
                // the application's setting, off by default), a response
                // written in two pieces waited for the client's delayed
                // ACK: 40 ms at the end of most TLS responses through an
                // agent's `--forward`.
                s.set_nodelay(true)?;
            }
            Ok((up, down))
        })();
        match taken {
            Ok((up, down)) => Ok(Pair {
                socks,
                dirs: [Direction::new(0, 1, up), Direction::new(1, 0, down)],
            }),
            Err(e) => Err((e, socks)),
        }
    }

    fn carried(&self) -> Relayed {
        Relayed {
            first_to_second: self.dirs[0].carried,
            second_to_first: self.dirs[1].carried,
        }
    }

    fn done(&self) -> bool {
        self.dirs.iter().all(Direction::done)
    }

    /// Steps both directions; a failure resets the other side (closed when
    /// the pair is dropped).
    fn step(&mut self) -> Result<Stepped, RelayError> {
        let mut stepped = Stepped::Blocked;
        for d in 0..2 {
            let last = self.dirs[1 - d].done();
            match self.dirs[d].step(&self.socks, last) {
                Ok(Stepped::Budget) => stepped = Stepped::Budget,
                Ok(Stepped::Blocked) => {}
                Err(f) => return Err(self.abort(f)),
            }
        }
        Ok(stepped)
    }

    /// A pending error on either socket (an event said there is one).
    fn check_errors(&self) -> Result<(), RelayError> {
        for side in 0..2 {
            if let Ok(Some(error)) = self.socks[side].take_error() {
                return Err(self.abort(Failure { side, error }));
            }
        }
        Ok(())
    }

    /// Resets the side that did not fail (its peer must not read a clean
    /// end of stream); both close when the pair is dropped.
    fn abort(&self, f: Failure) -> RelayError {
        abort(&self.socks, f, self.carried())
    }

    /// Resets both sides (closed when the pair is dropped): the relay was
    /// cut.
    fn cut(&self) -> RelayError {
        for s in &self.socks {
            // Should SO_LINGER fail, that side's close sends a FIN.
            let _ = splice::reset_on_close(s.as_fd());
        }
        RelayError {
            side: CUT,
            source: io::Error::new(io::ErrorKind::Interrupted, "told to stop"),
            carried: self.carried(),
        }
    }
}

/// Relays between `first` and `second` until both have ended their
/// streams (each half-close passed on as it comes), then closes both.
/// When one side fails, the other is reset and the error says which.
pub fn relay(first: TcpStream, second: TcpStream) -> Result<Relayed, RelayError> {
    relay_inner(first, second, None)
}

/// [`relay`] that `cut` ends at once: both connections are then reset and
/// the error says so ([`RelayError::was_cut`]).
pub fn relay_until(first: TcpStream, second: TcpStream, cut: &Cut) -> Result<Relayed, RelayError> {
    relay_inner(first, second, Some(cut))
}

fn relay_inner(
    first: TcpStream,
    second: TcpStream,
    cut: Option<&Cut>,
) -> Result<Relayed, RelayError> {
    let mut pair = match Pair::new([first, second], &mut PipePool::default()) {
        Ok(p) => p,
        Err((error, socks)) => {
            return Err(abort(
                &socks,
                Failure { side: 0, error },
                Relayed::default(),
            ))
        }
    };
    loop {
        pair.step()?;
        if pair.done() {
            return Ok(pair.carried());
        }
        let mut events = [0i16; 2];
        for d in &pair.dirs {
            d.interest(&mut events);
        }
        let mut fds: Vec<libc::pollfd> = pair
            .socks
            .iter()
            .zip(events)
            .map(|(s, events)| libc::pollfd {
                // A negative fd is skipped by poll(2): no wanted event, and
                // no POLLHUP of a stream already ended on both sides.
                fd: if events == 0 { -1 } else { s.as_raw_fd() },
                events,
                revents: 0,
            })
            .collect();
        if let Some(c) = cut {
            // Readable never (nothing is written), hung up once cut.
            fds.push(libc::pollfd {
                fd: c.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        match splice::poll(&mut fds, -1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(pair.abort(Failure { side: 0, error })),
        }
        if cut.is_some() && fds[2].revents != 0 {
            return Err(pair.cut());
        }
        if fds.iter().any(|fd| fd.revents & libc::POLLERR != 0) {
            pair.check_errors()?;
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

/// Many relays served by a few threads, each an event loop over an epoll
/// of its own (see the module). [`Relays::add`] runs on the caller's
/// thread: it takes pipes, sets the sockets non-blocking and registers
/// them with the next loop, so a pair it accepted is served, and one it
/// could not is given back at once; the loop learns of the pair from its
/// first events (its registration reports the sockets' state), with no
/// wake-up of its own. Each relay that ends is passed to the `ended`
/// given at [`Relays::new`], on the loop's thread.
///
/// `T` is what the caller keeps with each pair (a peer's address to log).
pub struct Relays<T> {
    loops: Vec<Arc<Shared<T>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: usize,
    ids: usize,
    pipes: Arc<Mutex<PipePool>>,
}

/// What a loop's thread and [`Relays::add`] share.
struct Shared<T> {
    registry: mio::Registry,
    /// Pairs added and not yet seen by the loop: the loop looks here when
    /// an event names an id it does not know.
    inbox: Mutex<Vec<(usize, Pair, T)>>,
    /// Pairs the loop took whose registration then failed half-way: the
    /// loop resets them (told by its waker).
    withdrawn: Mutex<Vec<usize>>,
    /// Set by [`Relays::finish`]: the loop ends once it has no relay.
    stop: AtomicBool,
    waker: mio::Waker,
}

/// A loop's waker's token (ids of pairs are counted from 0).
const WAKE: mio::Token = mio::Token(usize::MAX);

/// A pair [`Relays::add`] could not take, given back with the reason.
pub struct NotTaken<T> {
    /// Why.
    pub error: io::Error,
    /// The two connections (set non-blocking), not relayed.
    pub pair: (TcpStream, TcpStream),
    /// What came with them.
    pub tag: T,
}

/// What a loop calls with each relay that ended.
type Ended<T> = Arc<dyn Fn(T, Result<Relayed, RelayError>) + Send + Sync>;

impl<T: Send + 'static> Relays<T> {
    /// `threads` event loops (at least one), named `name`; `ended` is
    /// called with each relay that ends. Fails when a loop cannot start.
    pub fn new(
        threads: usize,
        name: &str,
        ended: impl Fn(T, Result<Relayed, RelayError>) + Send + Sync + 'static,
    ) -> io::Result<Relays<T>> {
        let ended: Ended<T> = Arc::new(ended);
        let pipes = Arc::new(Mutex::new(PipePool::default()));
        let mut relays = Relays {
            loops: Vec::new(),
            threads: Vec::new(),
            next: 0,
            ids: 0,
            pipes: pipes.clone(),
        };
        for _ in 0..threads.max(1) {
            let started = (|| {
                let poll = mio::Poll::new()?;
                let shared = Arc::new(Shared {
                    registry: poll.registry().try_clone()?,
                    inbox: Mutex::new(Vec::new()),
                    withdrawn: Mutex::new(Vec::new()),
                    stop: AtomicBool::new(false),
                    waker: mio::Waker::new(poll.registry(), WAKE)?,
                });
                let (for_loop, ended, pipes) = (shared.clone(), ended.clone(), pipes.clone());
                let thread = std::thread::Builder::new()
                    .name(name.to_string())
                    .spawn(move || serve(poll, &for_loop, &*ended, &pipes))?;
                io::Result::Ok((shared, thread))
            })();
            match started {
                Ok((shared, thread)) => {
                    relays.loops.push(shared);
                    relays.threads.push(thread);
                }
                Err(e) => {
                    // The loops started end at once: they have no relay.
                    relays.finish();
                    return Err(e);
                }
            }
        }
        Ok(relays)
    }

    /// Relays between `first` and `second` (as [`relay`] does) on one of
    /// the loops. When it cannot (no pipe, no room in epoll), the pair
    /// comes back unrelayed.
    pub fn add(&mut self, first: TcpStream, second: TcpStream, tag: T) -> Result<(), NotTaken<T>> {
        let pair = Pair::new([first, second], &mut lock(&self.pipes));
        let pair = match pair {
            Ok(p) => p,
            Err((error, [first, second])) => {
                return Err(NotTaken {
                    error,
                    pair: (first, second),
                    tag,
                })
            }
        };
        let raw = [pair.socks[0].as_raw_fd(), pair.socks[1].as_raw_fd()];
        let id = self.ids;
        self.ids = (self.ids + 1) % WAKE.0;
        let shared = &self.loops[self.next];
        self.next = (self.next + 1) % self.loops.len();
        // In the inbox before its sockets are registered: their first
        // event finds it there.
        lock(&shared.inbox).push((id, pair, tag));
        // Edge-triggered, both ways, for the pair's life: no change of
        // interest per step.
        let registered = raw.iter().try_for_each(|fd| {
            shared.registry.register(
                &mut mio::unix::SourceFd(fd),
                mio::Token(id),
                mio::Interest::READABLE | mio::Interest::WRITABLE,
            )
        });
        let Err(error) = registered else {
            return Ok(());
        };
        // No more events of the pair from here; the fds are still the
        // pair's (only this thread opens fds in between).
        for fd in &raw {
            let _ = shared.registry.deregister(&mut mio::unix::SourceFd(fd));
        }
        let mut inbox = lock(&shared.inbox);
        let Some(at) = inbox.iter().position(|(i, _, _)| *i == id) else {
            // The loop took it on the first socket's event, and may have
            // moved bytes already: it cannot be given back. The loop resets
            // both sides (told through `withdrawn`).
            drop(inbox);
            lock(&shared.withdrawn).push(id);
            let _ = shared.waker.wake();
            return Ok(());
        };
        let (_, pair, tag) = inbox.swap_remove(at);
        drop(inbox);
        let Pair { socks, dirs } = pair;
        let mut pipes = lock(&self.pipes);
        let [up, down] = dirs;
        pipes.give(up);
        pipes.give(down);
        let [first, second] = socks;
        Err(NotTaken {
            error,
            pair: (first, second),
            tag,
        })
    }

    /// Stops adding: waits until every relay added has ended, then ends
    /// the loops.
    pub fn finish(self) {
        for shared in &self.loops {
            shared.stop.store(true, Ordering::SeqCst);
            let _ = shared.waker.wake();
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A relay in a loop.
struct Entry<T> {
    pair: Pair,
    tag: T,
    /// The turn it was last stepped in: two events of one pair in one
    /// turn step it once.
    stepped: u64,
}

/// A loop's thread: waits for events, steps the pairs they name (each
/// both ways), until told to stop and no relay is left.
fn serve<T>(
    mut poll: mio::Poll,
    shared: &Shared<T>,
    ended: &(dyn Fn(T, Result<Relayed, RelayError>) + Send + Sync),
    pipes: &Mutex<PipePool>,
) {
    let mut events = mio::Events::with_capacity(256);
    let mut pairs: std::collections::HashMap<usize, Entry<T>> = std::collections::HashMap::new();
    // (id, whether an error was reported); a pair whose step used its
    // rounds is stepped again next turn.
    let mut ready: Vec<(usize, bool)> = Vec::new();
    let mut again: Vec<(usize, bool)> = Vec::new();
    let mut done: Vec<(T, Result<Relayed, RelayError>, Pair)> = Vec::new();
    let mut turns: u64 = 0;
    loop {
        let timeout = if again.is_empty() {
            None
        } else {
            Some(Duration::ZERO)
        };
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Not expected of epoll_wait with valid arguments; waiting
                // again would spin on it.
                tracing_free_log(&e);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        turns += 1;
        ready.append(&mut again);
        for ev in events.iter() {
            if ev.token() == WAKE {
                take_inbox(shared, &mut pairs);
                for id in lock(&shared.withdrawn).drain(..) {
                    if let Some(entry) = pairs.remove(&id) {
                        let error = io::Error::other("cannot watch the connection (epoll_ctl)");
                        let failed = entry.pair.abort(Failure { side: 1, error });
                        let _ = splice::reset_on_close(entry.pair.socks[1].as_fd());
                        done.push((entry.tag, Err(failed), entry.pair));
                    }
                }
                continue;
            }
            let id = ev.token().0;
            if !pairs.contains_key(&id) {
                take_inbox(shared, &mut pairs);
                // An event of a pair gone: its socket's registration lives
                // on while another process holds the socket.
                if !pairs.contains_key(&id) {
                    continue;
                }
            }
            ready.push((id, ev.is_error()));
        }
        for (id, error) in ready.drain(..) {
            let Some(entry) = pairs.get_mut(&id) else {
                continue;
            };
            let outcome = if error {
                entry.pair.check_errors().err().map(Err)
            } else {
                None
            };
            let outcome = match outcome {
                Some(o) => Some(o),
                None if entry.stepped == turns => None,
                None => {
                    entry.stepped = turns;
                    match entry.pair.step() {
                        Ok(_) if entry.pair.done() => Some(Ok(entry.pair.carried())),
                        Ok(Stepped::Budget) => {
                            again.push((id, false));
                            None
                        }
                        Ok(Stepped::Blocked) => None,
                        Err(e) => Some(Err(e)),
                    }
                }
            };
            if let Some(outcome) = outcome {
                if let Some(entry) = pairs.remove(&id) {
                    done.push((entry.tag, outcome, entry.pair));
                }
            }
        }
        if !done.is_empty() {
            let mut told = Vec::with_capacity(done.len());
            let mut closing = Vec::with_capacity(done.len());
            {
                let mut pool = lock(pipes);
                for (tag, outcome, pair) in done.drain(..) {
                    // Its empty pipes are kept.
                    let Pair { socks, dirs } = pair;
                    for dir in dirs {
                        pool.give(dir);
                    }
                    closing.push(socks);
                    told.push((tag, outcome));
                }
            }
            // The sockets close out of the pool's lock (a close can send a
            // FIN, the peer's receive run on this CPU); their registrations
            // go with them, ours being the last references.
            drop(closing);
            for (tag, outcome) in told {
                ended(tag, outcome);
            }
        }
        if shared.stop.load(Ordering::SeqCst) && pairs.is_empty() && lock(&shared.inbox).is_empty()
        {
            return;
        }
    }
}

/// Moves the pairs of the inbox into `pairs`.
fn take_inbox<T>(shared: &Shared<T>, pairs: &mut std::collections::HashMap<usize, Entry<T>>) {
    for (id, pair, tag) in lock(&shared.inbox).drain(..) {
        pairs.insert(
            id,
            Entry {
                pair,
                tag,
                stepped: 0,
            },
        );
    }
}

/// This crate logs nothing itself (no logger dependency): a loop's poll
/// failure goes to standard error.
fn tracing_free_log(e: &io::Error) {
    eprintln!("tcpr relay loop: epoll_wait failed: {e}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A connected pair over loopback: (the end we keep, the accepted end).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// Both sockets of a relayed pair send without Nagle: a response
    /// written in pieces must not wait for the peer's delayed ACK.
    #[test]
    fn a_pair_relays_without_nagle() {
        let ((a, _), (b, _)) = (pair(), pair());
        assert!(!a.nodelay().unwrap() && !b.nodelay().unwrap());
        let relayed = Pair::new([a, b], &mut PipePool::default())
            .map_err(|(e, _)| e)
            .unwrap();
        assert!(relayed.socks.iter().all(|s| s.nodelay().unwrap()));
    }

    /// How a pair is relayed in a test: [`relay`] on a thread, or
    /// [`Relays`]' event loops.
    #[derive(Clone, Copy, Debug)]
    enum Via {
        Thread,
        Loops,
    }

    type Outcome = Result<Relayed, RelayError>;

    /// client ↔ relay ↔ server: `client` and `server` are ours; the
    /// returned closure waits for the relay's outcome.
    fn relayed(via: Via) -> (TcpStream, TcpStream, Box<dyn FnOnce() -> Outcome>) {
        let (client, client_side) = pair();
        let (server_side, server) = pair();
        match via {
            Via::Thread => {
                let relay = std::thread::spawn(move || relay(client_side, server_side));
                (client, server, Box::new(move || relay.join().unwrap()))
            }
            Via::Loops => {
                let (tx, rx) = std::sync::mpsc::channel();
                let tx = Mutex::new(tx);
                let mut relays = Relays::new(2, "test-relay", move |(), outcome| {
                    lock(&tx).send(outcome).unwrap();
                })
                .unwrap();
                assert!(relays.add(client_side, server_side, ()).is_ok());
                let wait = move || {
                    let outcome = rx.recv().unwrap();
                    relays.finish();
                    outcome
                };
                (client, server, Box::new(wait))
            }
        }
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn bytes_and_half_closes_pass_both_ways() {
        bytes_and_half_closes(Via::Thread);
    }

    #[test]
    fn bytes_and_half_closes_pass_both_ways_in_the_loops() {
        bytes_and_half_closes(Via::Loops);
    }

    fn bytes_and_half_closes(via: Via) {
        let (mut client, mut server, relay) = relayed(via);
        let (up, down) = (pattern(3 << 20, 1), pattern(2 << 20, 7));
        let up2 = up.clone();
        let mut c2 = client.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            c2.write_all(&up2).unwrap();
            c2.shutdown(Shutdown::Write).unwrap();
        });
        let mut got_up = Vec::new();
        server.read_to_end(&mut got_up).unwrap();
        assert_eq!(got_up, up, "the client's bytes, then its end of stream");
        // The server writes after the client's half-close.
        server.write_all(&down).unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        let mut got_down = Vec::new();
        client.read_to_end(&mut got_down).unwrap();
        assert_eq!(got_down, down);
        writer.join().unwrap();
        let carried = relay().unwrap();
        assert_eq!(carried.first_to_second, up.len() as u64);
        assert_eq!(carried.second_to_first, down.len() as u64);
    }

    #[test]
    fn a_reset_on_one_side_resets_the_other() {
        a_reset_resets_the_other(Via::Thread);
    }

    #[test]
    fn a_reset_on_one_side_resets_the_other_in_the_loops() {
        a_reset_resets_the_other(Via::Loops);
    }

    fn a_reset_resets_the_other(via: Via) {
        let (client, mut server, relay) = relayed(via);
        (&client).write_all(b"hello").unwrap();
        let mut five = [0u8; 5];
        server.read_exact(&mut five).unwrap();
        splice::reset_on_close(client.as_fd()).unwrap();
        drop(client);
        let err = relay().unwrap_err();
        assert_eq!(err.side, "first");
        let mut rest = Vec::new();
        let read = server.read_to_end(&mut rest);
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "the server sees a reset, not a clean end"
        );
    }

    /// A cut ends relays running and relays started after it: both of
    /// each pair's connections read a reset (a FIN would look like a
    /// complete answer), and the error says it was cut.
    #[test]
    fn a_cut_resets_both_sides_of_every_relay() {
        let cut = Arc::new(Cut::new().unwrap());
        let start = |cut: &Arc<Cut>| {
            let (client, client_side) = pair();
            let (server_side, server) = pair();
            let cut = Arc::clone(cut);
            let t = std::thread::spawn(move || relay_until(client_side, server_side, &cut));
            (client, server, t)
        };
        let (mut client, mut server, running) = start(&cut);
        client.write_all(b"hello").unwrap();
        let mut five = [0u8; 5];
        server.read_exact(&mut five).unwrap();
        assert!(!cut.is_cut());
        cut.cut();
        assert!(cut.is_cut());
        let late = start(&cut);
        for (mut client, mut server, t) in [(client, server, running), late] {
            let err = t.join().unwrap().unwrap_err();
            assert!(err.was_cut(), "{err}");
            assert!(err.to_string().contains("cut short"), "{err}");
            for end in [&mut client, &mut server] {
                let mut rest = Vec::new();
                assert_eq!(
                    end.read_to_end(&mut rest).map_err(|e| e.kind()),
                    Err(io::ErrorKind::ConnectionReset)
                );
            }
        }
        // A relay without a cut still ends by its streams.
        let (client, mut server, relay) = relayed(Via::Thread);
        drop(client);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).unwrap();
        drop(server);
        relay().unwrap();
    }

    /// Many pairs at once on two loops, each with its own bytes both
    /// ways (the server answers only after the client's end of stream):
    /// every byte arrives where it belongs, each relay's counts are its
    /// own, and the pipes of ended relays serve the later ones.
    #[test]
    fn many_pairs_at_once_in_the_loops() {
        const PAIRS: usize = 48;
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        let mut relays = Relays::new(2, "test-relay", move |n: usize, outcome: Outcome| {
            lock(&tx).send((n, outcome.unwrap())).unwrap();
        })
        .unwrap();
        let mut ends = Vec::new();
        for n in 0..PAIRS {
            let (client, client_side) = pair();
            let (server_side, server) = pair();
            assert!(relays.add(client_side, server_side, n).is_ok());
            ends.push((n, client, server));
        }
        let size = |n: usize| (n * 7919) % (300 << 10) + 1;
        let threads: Vec<_> = ends
            .into_iter()
            .map(|(n, mut client, mut server)| {
                let up = pattern(size(n), n as u8);
                let down = pattern(size(n + PAIRS), n as u8 ^ 0x5a);
                let serving = std::thread::spawn({
                    let (up, down) = (up.clone(), down.clone());
                    move || {
                        let mut got = Vec::new();
                        server.read_to_end(&mut got).unwrap();
                        assert_eq!(got, up, "pair {n}: the client's bytes");
                        server.write_all(&down).unwrap();
                    }
                });
                std::thread::spawn(move || {
                    client.write_all(&up).unwrap();
                    client.shutdown(Shutdown::Write).unwrap();
                    let mut got = Vec::new();
                    client.read_to_end(&mut got).unwrap();
                    assert_eq!(got, down, "pair {n}: the server's bytes");
                    serving.join().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut seen = [false; PAIRS];
        for _ in 0..PAIRS {
            let (n, carried) = rx.recv().unwrap();
            assert!(!seen[n], "pair {n} ended twice");
            seen[n] = true;
            assert_eq!(carried.first_to_second, size(n) as u64, "pair {n}");
            assert_eq!(carried.second_to_first, size(n + PAIRS) as u64, "pair {n}");
        }
        // The ended relays' pipes are kept (up to the pool's bound), and a
        // relay added now takes two of them.
        let kept = (2 * PAIRS).min(POOL_MAX);
        assert_eq!(lock(&relays.pipes).idle.len(), kept);
        let (client, client_side) = pair();
        let (server_side, mut server) = pair();
        assert!(relays.add(client_side, server_side, PAIRS).is_ok());
        assert_eq!(lock(&relays.pipes).idle.len(), kept - 2);
        (&client).write_all(b"ping").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
        drop(server);
        let (n, carried) = rx.recv().unwrap();
        assert_eq!((n, carried.first_to_second), (PAIRS, 4));
        relays.finish();
    }
}
