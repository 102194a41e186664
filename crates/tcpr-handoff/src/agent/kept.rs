//! Unix connections to a receiver that takes batches, kept open between
//! batches ([`KeptUnix`]).
//!
//! Under a balancer's load a batch carries one or two connections, and a
//! unix connection made for each (the agent's connect, the application's
//! accept, a thread woken on each side) cost as much as the delivery
//! itself. A receiver that answered "kK" reads batch messages on its unix
//! connection for as long as it stays open, and reads its unix
//! connections concurrently (see [`crate::deliver`]), so the next batch's
//! connections can go on it. One that answered "kB" may read them one
//! after the other: its unix connection is never kept.

use crate::deliver;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Idle unix connections kept at most: about as many as batches deliver
/// at once (each channel is served on a thread of its own, and each batch
/// needs a unix connection of its own). Past it the one idle longest is
/// closed.
pub(super) const KEPT_MAX: usize = 8;

/// How long a unix connection stays idle before it is closed: an
/// application that restarted (or a receiver that reads one unix
/// connection at a time) is not held by connections nobody uses, and a
/// kept connection's receiver is not woken for nothing.
pub(super) const KEPT_IDLE: Duration = Duration::from_secs(2);

/// Idle unix connections whose receiver takes batches: each one's
/// messages were all acknowledged, nothing is left to read on it, and the
/// receiver's next message is a batch ("TCPR-FDN"). A batch takes one
/// ([`KeptUnix::take`]) instead of connecting, and gives it back once its
/// deliveries on it all ended acknowledged ([`KeptUnix::put`]); a
/// connection with a message unacknowledged or a byte unread is never
/// given back (a later acknowledgement could be taken for the wrong
/// message). A thread closes those idle for [`KEPT_IDLE`]; it runs while
/// any is kept.
pub(super) struct KeptUnix {
    inner: Arc<Mutex<Idle>>,
}

#[derive(Default)]
struct Idle {
    /// Oldest first, with when each was given back.
    conns: Vec<(UnixStream, Instant)>,
    /// The thread that closes expired ones runs.
    reaping: bool,
}

impl KeptUnix {
    pub(super) fn new() -> KeptUnix {
        KeptUnix {
            inner: Arc::new(Mutex::new(Idle::default())),
        }
    }

    /// An idle unix connection still alive ([`deliver::unix_alive`]), the
    /// one given back last first (the most likely to be alive); dead or
    /// expired ones found on the way are closed.
    pub(super) fn take(&self) -> Option<UnixStream> {
        loop {
            let (to, since) = super::lock(&self.inner).conns.pop()?;
            if since.elapsed() < KEPT_IDLE && deliver::unix_alive(&to) {
                return Some(to);
            }
        }
    }

    /// Keeps `to`, on which every message sent was acknowledged, if it is
    /// alive with nothing to read; closes the one idle longest when
    /// [`KEPT_MAX`] are kept.
    pub(super) fn put(&self, to: UnixStream) {
        if !deliver::unix_alive(&to) {
            return;
        }
        // Whatever made it (a connection of its own, or a batch's), a
        // receiver that stops reading must not hold the next batch's send
        // for ever: past this the send fails and its connections are
        // reported.
        if let Err(e) = to.set_write_timeout(Some(deliver::ACK_TIMEOUT)) {
            tracing::warn!("cannot bound a kept unix connection's sends: {e}");
            return;
        }
        let mut idle = super::lock(&self.inner);
        if idle.conns.len() >= KEPT_MAX {
            idle.conns.remove(0);
        }
        idle.conns.push((to, Instant::now()));
        if !idle.reaping {
            let inner = self.inner.clone();
            let spawned = std::thread::Builder::new()
                .name("tcpr-unix-kept".into())
                .spawn(move || reap(&inner));
            // Without it, expired ones are closed by the next take.
            idle.reaping = spawned.is_ok();
        }
    }
}

/// Closes the connections idle for [`KEPT_IDLE`], until none is kept.
fn reap(inner: &Mutex<Idle>) {
    loop {
        let wait = {
            let mut idle = super::lock(inner);
            idle.conns.retain(|(_, since)| since.elapsed() < KEPT_IDLE);
            match idle.conns.iter().map(|(_, since)| *since).min() {
                Some(oldest) => KEPT_IDLE.saturating_sub(oldest.elapsed()),
                None => {
                    idle.reaping = false;
                    return;
                }
            }
        };
        std::thread::sleep(wait + Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A kept connection comes back while alive; one whose receiver
    /// closed, or sent a byte nobody asked for, is dropped; an idle one
    /// expires after [`KEPT_IDLE`] and is closed (its receiver reads the
    /// end); at most [`KEPT_MAX`] are kept.
    #[test]
    fn kept_connections_come_back_alive_or_not_at_all() {
        let kept = KeptUnix::new();
        assert!(kept.take().is_none());
        let (a, b) = UnixStream::pair().unwrap();
        kept.put(a);
        let a = kept.take().expect("alive");
        kept.put(a);
        drop(b);
        assert!(kept.take().is_none(), "its receiver closed");

        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"k").unwrap();
        kept.put(a);
        assert!(kept.take().is_none(), "a byte unread is never kept");

        let pairs: Vec<(UnixStream, UnixStream)> = (0..KEPT_MAX + 2)
            .map(|_| UnixStream::pair().unwrap())
            .collect();
        let mut receivers = Vec::new();
        for (a, b) in pairs {
            kept.put(a);
            receivers.push(b);
        }
        assert_eq!(super::super::lock(&kept.inner).conns.len(), KEPT_MAX);
        // The two oldest were closed for the newer ones.
        for b in &receivers[..2] {
            let mut one = [0u8; 1];
            assert_eq!(std::io::Read::read(&mut &*b, &mut one).unwrap(), 0);
        }
        // Idle too long: closed by the reaper, with no take to prompt it.
        let last = &receivers[KEPT_MAX + 1];
        last.set_read_timeout(Some(KEPT_IDLE * 5)).unwrap();
        let mut one = [0u8; 1];
        assert_eq!(
            std::io::Read::read(&mut &*last, &mut one).unwrap(),
            0,
            "closed once idle"
        );
        assert!(kept.take().is_none());
    }
}
