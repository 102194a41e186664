//! The sender's channels to agents, kept between batches: a batch that
//! ended cleanly gives its channel back to a process-wide pool, and the
//! next batch to the same agent, with the same credentials, from the same
//! network namespace, takes it instead of connecting (a TCP connect, a
//! TLS 1.3 handshake and the PSK proof: about a millisecond of the
//! sender's time and most of its CPU per small batch).
//!
//! A kept channel may have died meanwhile (the agent restarted, closed it
//! after its idle timeout, or the link was reset). Before a batch freezes
//! anything, a channel taken from the pool must be quiet (nothing to
//! read, no end seen) and, when it idled [`PING_AFTER`] or longer, answer
//! a PING with its PONG; any other answer, or none within the timeout,
//! and the batch connects anew. A channel given back moments ago is taken
//! on its quiet check alone (the PING's round trip was about a sixth of a
//! one-connection handoff): should it turn out dead all the same (an end
//! still in flight), the batch sees its link lost before the agent said
//! anything, which is before any READY and so before COMMIT: it rolls
//! back, and [`super::migrate`] runs it again on a checked channel. The
//! batch protocol itself is untouched: the channel only ever carries one
//! batch at a time, each with its own id, and a Query still goes on a new
//! channel of its own.

use super::{ConnectError, MigrateOptions};
use crate::auth::{AuthError, Channel};
use crate::wire::{self, pb};
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once, OnceLock};
use std::time::{Duration, Instant};

/// Idle channels kept per agent (and credentials, and namespace); a
/// channel given back beyond this closes the one idle longest.
pub const MAX_IDLE_PER_AGENT: usize = 16;

/// How long a channel may idle in the pool before it is closed. Well
/// below the agent's idle timeout ([`crate::agent::DEFAULT_IDLE_TIMEOUT`]),
/// so that an agent with the default closes no channel a sender is
/// about to take; one that closes earlier is caught by the check.
pub const MAX_IDLE_AGE: Duration = Duration::from_secs(5);

/// A kept channel idle this long or longer is PINGed before a batch; a
/// younger one is taken on its quiet check alone (see the module's
/// documentation for why that is safe).
pub(super) const PING_AFTER: Duration = Duration::from_secs(1);

/// The bound on sending a TLS close_notify as a channel is closed.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(100);

/// Which channels may serve a batch: the same agent, reached from the
/// same network namespace (a thread of this process may live in another
/// one, where the same address is another host), authenticated with the
/// same credentials.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct ChannelKey {
    agent: SocketAddr,
    netns: NetnsId,
    credentials: [u8; 32],
}

/// A network namespace, by the identity of its file in `/proc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct NetnsId {
    dev: u64,
    ino: u64,
}

impl ChannelKey {
    /// The key of a batch with `opts` from the calling thread; `None`
    /// when the thread's namespace cannot be told (no `/proc`): then no
    /// channel is kept, rather than one shared across namespaces.
    fn of(opts: &MigrateOptions) -> Option<ChannelKey> {
        let (dev, ino) = tcpr_host::thread_netns().ok()?;
        Some(ChannelKey {
            agent: opts.to,
            netns: NetnsId { dev, ino },
            credentials: opts.auth.fingerprint(),
        })
    }
}

/// A channel ready for a batch.
pub(super) struct Opened {
    pub(super) ch: Channel,
    /// Taken from the pool (and checked), not connected for this batch.
    pub(super) reused: bool,
    /// Taken from the pool on its quiet check alone, not PINGed: a link
    /// lost before the agent answered anything means a dead channel, not
    /// a failed batch.
    pub(super) unverified: bool,
    /// Where to give it back; `None`: close it after the batch.
    pub(super) key: Option<ChannelKey>,
}

/// After a batch that ended cleanly
/// ([`crate::machine::Sender::channel_reusable`]): the channel waits in
/// the pool for the next batch, or is closed when reuse is off.
pub(super) fn give_back(key: Option<ChannelKey>, ch: Channel) {
    match key {
        Some(key) => pool().put(key, ch),
        None => close(ch),
    }
}

/// Closes a channel that carries no batch any more, with a clean end for
/// the agent to read.
pub(super) fn close(ch: Channel) {
    ch.close(CLOSE_TIMEOUT);
}

/// A channel for a batch to `opts.to`: a kept one that passes the check,
/// else a new one. With `ping_always`, a kept channel is PINGed however
/// young it is.
pub(super) fn open(opts: &MigrateOptions, ping_always: bool) -> Result<Opened, ConnectError> {
    let key = if opts.reuse_channel {
        ChannelKey::of(opts)
    } else {
        None
    };
    if let Some(key) = &key {
        while let Some(Idle { mut ch, since }) = pool().take(key) {
            if !ch.is_quiet() {
                // Closed by the agent (or a leftover): the others may live.
                tracing::debug!(agent = %opts.to, "a kept channel was closed meanwhile");
                continue;
            }
            let unverified = !ping_always && since.elapsed() < PING_AFTER;
            let checked = if unverified {
                set_timeouts(ch.tcp(), opts).map_err(|e| e.to_string())
            } else {
                ping(&mut ch, opts)
            };
            match checked {
                Ok(()) => {
                    return Ok(Opened {
                        ch,
                        reused: true,
                        unverified,
                        key: Some(key.clone()),
                    })
                }
                Err(why) => {
                    // A channel that looked alive did not answer: the
                    // agent is gone or restarted, and its other channels
                    // with it. Connect anew rather than try each.
                    tracing::info!(agent = %opts.to, "a kept channel failed its check ({why}): connecting anew");
                    pool().purge(key);
                    break;
                }
            }
        }
    }
    let ch = connect(opts)?;
    Ok(Opened {
        ch,
        reused: false,
        unverified: false,
        key,
    })
}

/// Closes every kept channel of `key`: one of them turned out dead, and
/// with it, most likely, the others (the agent restarted).
pub(super) fn forget(key: &Option<ChannelKey>) {
    if let Some(key) = key {
        pool().purge(key);
    }
}

/// Opens a new authenticated channel to the agent.
pub(super) fn connect(opts: &MigrateOptions) -> Result<Channel, ConnectError> {
    let addr = opts.to;
    let unreachable = |source| ConnectError::Unreachable { addr, source };
    let tcp = TcpStream::connect_timeout(&addr, opts.timeout).map_err(unreachable)?;
    set_timeouts(&tcp, opts).map_err(unreachable)?;
    let _ = tcp.set_nodelay(true);
    let cfg = opts
        .auth
        .client_config()
        .map_err(|source| ConnectError::Auth { addr, source })?;
    opts.auth
        .connect(cfg, addr.ip(), tcp)
        .map_err(|source| match source {
            AuthError::TimedOut => ConnectError::Silent {
                addr,
                after: opts.timeout,
            },
            source => ConnectError::Auth { addr, source },
        })
}

/// Every read waits one timeout; a write, which may carry a frame of
/// several MiB to a busy agent, four.
fn set_timeouts(tcp: &TcpStream, opts: &MigrateOptions) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(opts.timeout))?;
    tcp.set_write_timeout(Some(opts.timeout.saturating_mul(4)))
}

/// PING, and the PONG with the same nonce as the next message: the agent
/// is there, holds this channel, and nothing of an earlier batch is left
/// on it.
pub(super) fn ping(ch: &mut Channel, opts: &MigrateOptions) -> Result<(), String> {
    static NONCES: AtomicU64 = AtomicU64::new(1);
    let nonce = NONCES.fetch_add(1, Ordering::Relaxed);
    set_timeouts(ch.tcp(), opts).map_err(|e| e.to_string())?;
    wire::write_msg(ch, &wire::ping(nonce)).map_err(|e| e.to_string())?;
    ch.flush().map_err(|e| e.to_string())?;
    match wire::read_msg(ch).map_err(|e| e.to_string())?.kind {
        Some(pb::message::Kind::Pong(p)) if p.nonce == nonce => Ok(()),
        _ => Err("the agent answered PING with something else".into()),
    }
}

/// A channel waiting for its next batch.
struct Idle {
    ch: Channel,
    since: Instant,
}

/// The idle channels of this process.
struct Pool {
    idle: Mutex<HashMap<ChannelKey, Vec<Idle>>>,
    /// Signalled when a channel comes in, for the reaper.
    arrived: Condvar,
    reaper: Once,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        idle: Mutex::new(HashMap::new()),
        arrived: Condvar::new(),
        reaper: Once::new(),
    })
}

/// Closes channels outside the pool's lock (each close may write).
fn close_all(channels: Vec<Idle>) {
    for idle in channels {
        close(idle.ch);
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, HashMap<ChannelKey, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channel of `key` given back last, if one is young enough.
    fn take(&self, key: &ChannelKey) -> Option<Idle> {
        let (taken, expired) = {
            let mut idle = self.lock();
            let expired = take_expired(&mut idle, Instant::now());
            let taken = idle.get_mut(key).and_then(Vec::pop);
            (taken, expired)
        };
        close_all(expired);
        taken
    }

    fn put(&self, key: ChannelKey, ch: Channel) {
        self.reaper.call_once(|| {
            let spawned = std::thread::Builder::new()
                .name("tcpr-channels".into())
                .spawn(|| pool().reap());
            if let Err(e) = spawned {
                // Then idle channels close when the pool is next used.
                tracing::warn!("no thread to close idle handoff channels: {e}");
            }
        });
        let over = {
            let mut idle = self.lock();
            let kept = idle.entry(key).or_default();
            kept.push(Idle {
                ch,
                since: Instant::now(),
            });
            let over = kept.len().saturating_sub(MAX_IDLE_PER_AGENT);
            kept.drain(..over).collect()
        };
        self.arrived.notify_one();
        close_all(over);
    }

    /// Closes every channel of `key`.
    fn purge(&self, key: &ChannelKey) {
        let gone = self.lock().remove(key).unwrap_or_default();
        close_all(gone);
    }

    /// Closes channels as they pass [`MAX_IDLE_AGE`]; runs for the life of
    /// the process, asleep while the pool is empty.
    fn reap(&self) {
        let mut idle = self.lock();
        loop {
            let now = Instant::now();
            let expired = take_expired(&mut idle, now);
            if !expired.is_empty() {
                drop(idle);
                close_all(expired);
                idle = self.lock();
                continue;
            }
            let oldest = idle.values().flatten().map(|i| i.since).min();
            idle = match oldest {
                Some(since) => {
                    let due = (since + MAX_IDLE_AGE).saturating_duration_since(now);
                    self.arrived
                        .wait_timeout(idle, due)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.arrived.wait(idle).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// Removes the channels idle for [`MAX_IDLE_AGE`] or longer.
fn take_expired(idle: &mut HashMap<ChannelKey, Vec<Idle>>, now: Instant) -> Vec<Idle> {
    let mut expired = vec![];
    for kept in idle.values_mut() {
        // Given back in order: the expired ones come first.
        let n = kept
            .iter()
            .take_while(|i| now.saturating_duration_since(i.since) >= MAX_IDLE_AGE)
            .count();
        expired.extend(kept.drain(..n));
    }
    idle.retain(|_, kept| !kept.is_empty());
    expired
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Auth;
    use crate::machine::Msg;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::thread::JoinHandle;

    /// What the stand-in agent does on one channel after the handshake.
    #[derive(Clone, Copy)]
    enum Agent {
        /// Answers each PING with its PONG.
        Answers,
        /// Answers a PING with a message left over from a batch.
        AnswersWithALeftover,
        /// Sends a leftover message at once, then only listens.
        LeavesALeftover,
    }

    fn auth() -> Auth {
        Auth::Psk(Arc::new(b"channel pool tests shared key".to_vec()))
    }

    fn leftover() -> pb::Message {
        wire::to_wire(&Msg::Abort("a batch before".into()))
    }

    /// An agent on loopback serving one channel per entry of `agents`,
    /// in turn; gives the PINGs each channel received.
    fn stand_in(agents: Vec<Agent>) -> (MigrateOptions, JoinHandle<Vec<usize>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let opts = MigrateOptions::new(listener.local_addr().unwrap(), auth());
        let served = std::thread::spawn(move || {
            let cfg = auth().server_config().unwrap();
            agents
                .into_iter()
                .map(|agent| {
                    let (tcp, _) = listener.accept().unwrap();
                    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut ch = auth().accept(cfg.clone(), tcp).unwrap();
                    if let Agent::LeavesALeftover = agent {
                        wire::write_msg(&mut ch, &leftover()).unwrap();
                        ch.flush().unwrap();
                    }
                    let mut pings = 0;
                    while let Ok(msg) = wire::read_msg(&mut ch) {
                        let Some(pb::message::Kind::Ping(p)) = msg.kind else {
                            break;
                        };
                        pings += 1;
                        let answer = match agent {
                            Agent::Answers => wire::pong(p.nonce),
                            Agent::AnswersWithALeftover | Agent::LeavesALeftover => leftover(),
                        };
                        wire::write_msg(&mut ch, &answer).unwrap();
                        ch.flush().unwrap();
                    }
                    pings
                })
                .collect()
        });
        (opts, served)
    }

    /// A new channel to the stand-in, kept in the pool as after a batch.
    fn keep_one(opts: &MigrateOptions) -> ChannelKey {
        let opened = open(opts, false).unwrap();
        assert!(!opened.reused, "the pool starts empty");
        let key = opened.key.clone().unwrap();
        give_back(opened.key, opened.ch);
        key
    }

    #[test]
    fn a_kept_channel_that_answers_its_ping_is_reused() {
        let (opts, served) = stand_in(vec![Agent::Answers]);
        keep_one(&opts);
        let opened = open(&opts, true).unwrap();
        assert!(opened.reused && !opened.unverified);
        close(opened.ch);
        assert_eq!(served.join().unwrap(), vec![1]);
    }

    /// A channel given back moments ago is taken on its quiet check alone.
    #[test]
    fn a_young_kept_channel_is_taken_without_a_ping() {
        let (opts, served) = stand_in(vec![Agent::Answers]);
        keep_one(&opts);
        let opened = open(&opts, false).unwrap();
        assert!(opened.reused && opened.unverified);
        close(opened.ch);
        assert_eq!(served.join().unwrap(), vec![0]);
    }

    /// A channel that looks alive but answers PING with anything else
    /// (here a message of an earlier batch) is dropped with the other kept
    /// ones, and the batch connects anew.
    #[test]
    fn a_wrong_answer_to_ping_means_a_new_channel() {
        let (opts, served) = stand_in(vec![Agent::AnswersWithALeftover, Agent::Answers]);
        let key = keep_one(&opts);
        let opened = open(&opts, true).unwrap();
        assert!(!opened.reused, "connected anew");
        assert!(pool().lock().get(&key).is_none(), "the kept ones are gone");
        close(opened.ch);
        assert_eq!(served.join().unwrap(), vec![1, 0]);
    }

    /// A kept channel with something waiting on it is not even pinged.
    #[test]
    fn a_channel_with_a_leftover_is_not_used() {
        let (opts, served) = stand_in(vec![Agent::LeavesALeftover, Agent::Answers]);
        let mut opened = open(&opts, false).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while opened.ch.is_quiet() {
            assert!(Instant::now() < deadline, "the leftover arrives");
            std::thread::yield_now();
        }
        give_back(opened.key, opened.ch);
        let opened = open(&opts, false).unwrap();
        assert!(!opened.reused);
        close(opened.ch);
        assert_eq!(served.join().unwrap(), vec![0, 0]);
    }

    /// Reuse off: each batch connects, and its channel is closed after.
    #[test]
    fn without_reuse_nothing_is_kept() {
        let (mut opts, served) = stand_in(vec![Agent::Answers, Agent::Answers]);
        opts.reuse_channel = false;
        for _ in 0..2 {
            let opened = open(&opts, false).unwrap();
            assert!(!opened.reused && opened.key.is_none());
            give_back(opened.key, opened.ch);
        }
        assert_eq!(served.join().unwrap(), vec![0, 0]);
    }

    /// Two namespaces, two credentials, two agents: four keys.
    #[test]
    fn keys_keep_agents_and_credentials_apart() {
        let a = MigrateOptions::new("10.0.0.1:7070".parse().unwrap(), auth());
        let mut b = a.clone();
        b.to = "10.0.0.2:7070".parse().unwrap();
        let mut c = a.clone();
        c.auth = Auth::Psk(Arc::new(b"another shared key, another agent".to_vec()));
        let keys = [&a, &b, &c].map(|o| ChannelKey::of(o).unwrap());
        assert!(keys[0] != keys[1] && keys[0] != keys[2] && keys[1] != keys[2]);
        assert_eq!(ChannelKey::of(&a.clone()), Some(keys[0].clone()));
        let elsewhere = std::thread::spawn(move || {
            tcpr_host::unshare_netns().unwrap();
            ChannelKey::of(&a).unwrap()
        })
        .join()
        .unwrap();
        assert_ne!(elsewhere, keys[0], "another network namespace");
    }
}
