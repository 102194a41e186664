//! A bound on unauthenticated handshakes in flight. Each holds a thread
//! and two descriptors until it authenticates or its deadline passes; when
//! a new one would pass the bound, an old one is shut down (and its end
//! awaited) instead of the new one being refused, so that clients that
//! trickle bytes to hold slots cannot keep a real sender out: a sender
//! needs its slot only for the few milliseconds its handshake takes.
//!
//! The one shut down is the oldest of the source address that holds the
//! most slots: a flood from one address, even one that reconnects faster
//! than a handshake completes, only ever evicts its own handshakes, never
//! a sender's from another host.
//!
//! Authenticated channels waiting between batches are bounded the same
//! way ([`IdleChannels`]): past the bound, the one idle longest is shut
//! down. Only idle channels count and only they are shut down, never one
//! carrying a batch; its sender finds the end before it freezes anything.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

struct InFlight {
    id: u64,
    /// Where it comes from (unspecified when the kernel cannot say).
    source: IpAddr,
    /// A second handle on the socket, to shut it down from here.
    sock: TcpStream,
    /// Shut down; its thread is on its way out.
    evicted: bool,
}

impl InFlight {
    fn evict(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Both);
        self.evicted = true;
    }
}

/// How long to wait for an evicted handshake's thread before looking
/// again (a shut down socket wakes its reader at once).
const EVICTION_WAIT: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Slots {
    next_id: u64,
    open: VecDeque<InFlight>,
}

impl Slots {
    /// The handshake to shut down for room: the oldest one not shut down
    /// yet of the source with the most such handshakes, counting the
    /// `newcomer` waiting for a slot (so that a flood's new connection
    /// evicts one of the flood's own).
    fn victim(&mut self, newcomer: Option<IpAddr>) -> Option<&mut InFlight> {
        let mut per_source: HashMap<IpAddr, usize> = HashMap::new();
        for source in self
            .open
            .iter()
            .filter(|h| !h.evicted)
            .map(|h| h.source)
            .chain(newcomer)
        {
            *per_source.entry(source).or_default() += 1;
        }
        let most = per_source.values().copied().max()?;
        self.open
            .iter_mut()
            .find(|h| !h.evicted && per_source[&h.source] == most)
    }
}

/// The handshakes in flight.
pub(super) struct Admission {
    max: usize,
    slots: Mutex<Slots>,
    freed: Condvar,
}

/// A handshake admitted.
pub(super) struct Ticket {
    /// Give it back with [`Admission::done`].
    pub(super) id: u64,
    /// An older handshake was dropped to make room.
    pub(super) evicted: bool,
}

impl Admission {
    pub(super) fn new(max: usize) -> Admission {
        Admission {
            max,
            slots: Mutex::new(Slots::default()),
            freed: Condvar::new(),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new handshake on `tcp`; when full, shuts the oldest down
    /// and waits until its thread has let go of its slot. `None` when not
    /// even a handle to track it can be had (out of descriptors): the
    /// caller drops the connection.
    pub(super) fn admit(&self, tcp: &TcpStream) -> Option<Ticket> {
        let sock = tcp.try_clone().ok()?;
        let source = tcp
            .peer_addr()
            .map(|a| a.ip().to_canonical())
            .unwrap_or(IpAddr::from([0u8; 16]));
        let mut slots = self.slots();
        let mut evicted = false;
        while slots.open.len() >= self.max {
            if let Some(old) = slots.victim(Some(source)) {
                old.evict();
                evicted = true;
            }
            slots = self
                .freed
                .wait_timeout(slots, EVICTION_WAIT)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let id = slots.next_id;
        slots.next_id += 1;
        slots.open.push_back(InFlight {
            id,
            source,
            sock,
            evicted: false,
        });
        Some(Ticket { id, evicted })
    }

    /// The handshake `id` ended (authenticated, refused or timed out).
    pub(super) fn done(&self, id: u64) {
        self.slots().open.retain(|h| h.id != id);
        self.freed.notify_all();
    }

    /// Shuts the oldest handshake down (its thread then ends and frees its
    /// descriptors); false when none is left to shut down.
    pub(super) fn evict_oldest(&self) -> bool {
        match self.slots().victim(None) {
            Some(old) => {
                old.evict();
                true
            }
            None => false,
        }
    }
}

/// One channel waiting between batches.
struct IdleChannel {
    id: u64,
    /// A second handle on the socket, to shut it down from here.
    sock: TcpStream,
    /// Shut down; its thread is on its way out.
    evicted: bool,
}

#[derive(Default)]
struct IdleSlots {
    next_id: u64,
    /// In the order they began to wait.
    open: VecDeque<IdleChannel>,
}

/// The channels waiting between batches, at most `max` at once.
pub(super) struct IdleChannels {
    max: usize,
    slots: Mutex<IdleSlots>,
}

/// A channel counted among the idle ones.
pub(super) struct IdleTicket {
    /// Give it back with [`IdleChannels::leave`].
    pub(super) id: u64,
    /// Older idle channels shut down to make room.
    pub(super) evicted: u64,
}

impl IdleChannels {
    pub(super) fn new(max: usize) -> IdleChannels {
        IdleChannels {
            max,
            slots: Mutex::new(IdleSlots::default()),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, IdleSlots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the channel on `tcp` as idle, shutting down the ones idle
    /// longest when it would pass the bound. `None` when no channel may
    /// wait (a bound of 0), or no handle to shut it down can be had (out
    /// of descriptors): the caller closes it.
    pub(super) fn enter(&self, tcp: &TcpStream) -> Option<IdleTicket> {
        if self.max == 0 {
            return None;
        }
        let sock = tcp.try_clone().ok()?;
        let mut slots = self.slots();
        let mut evicted = 0;
        let mut waiting = slots.open.iter().filter(|c| !c.evicted).count();
        // Those shut down already leave on their own, at once.
        for old in slots.open.iter_mut().filter(|c| !c.evicted) {
            if waiting < self.max {
                break;
            }
            let _ = old.sock.shutdown(Shutdown::Both);
            old.evicted = true;
            evicted += 1;
            waiting -= 1;
        }
        let id = slots.next_id;
        slots.next_id += 1;
        slots.open.push_back(IdleChannel {
            id,
            sock,
            evicted: false,
        });
        Some(IdleTicket { id, evicted })
    }

    /// The channel `id` stops waiting (a message came, or its wait ended);
    /// true when it was shut down to make room.
    pub(super) fn leave(&self, id: u64) -> bool {
        let mut slots = self.slots();
        match slots.open.iter().position(|c| c.id == id) {
            Some(i) => slots.open.remove(i).is_some_and(|c| c.evicted),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    #[test]
    fn the_oldest_handshake_makes_room_for_a_new_one() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = Admission::new(2);
        let mut clients = vec![];
        let mut served = vec![];
        for _ in 0..3 {
            clients.push(TcpStream::connect(l.local_addr().unwrap()).unwrap());
            served.push(l.accept().unwrap().0);
        }
        let t0 = a.admit(&served[0]).unwrap();
        let t1 = a.admit(&served[1]).unwrap();
        assert!(!t0.evicted && !t1.evicted);
        let t2 = std::thread::scope(|scope| {
            let third = scope.spawn(|| a.admit(&served[2]).unwrap());
            // The oldest was shut down: its client reads the end of stream,
            // and its thread gives its slot back.
            let mut buf = [0u8; 1];
            assert_eq!(clients[0].read(&mut buf).unwrap(), 0);
            a.done(t0.id);
            third.join().unwrap()
        });
        assert!(t2.evicted);
        a.done(t1.id);
        a.done(t2.id);
        assert!(!a.evict_oldest(), "nothing left in flight");
    }

    #[test]
    fn the_channel_idle_longest_makes_room_for_a_new_one() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let idle = IdleChannels::new(2);
        let mut clients = vec![];
        let mut served = vec![];
        for _ in 0..3 {
            clients.push(TcpStream::connect(l.local_addr().unwrap()).unwrap());
            served.push(l.accept().unwrap().0);
        }
        let first = idle.enter(&served[0]).unwrap();
        let second = idle.enter(&served[1]).unwrap();
        assert_eq!((first.evicted, second.evicted), (0, 0));
        let third = idle.enter(&served[2]).unwrap();
        assert_eq!(third.evicted, 1);
        // The first was shut down: its sender reads the end.
        let mut buf = [0u8; 1];
        assert_eq!(clients[0].read(&mut buf).unwrap(), 0);
        assert!(idle.leave(first.id), "told it was shut down");
        assert!(!idle.leave(second.id));
        // The bound counts the channels still waiting, not the ones left.
        let fourth = idle.enter(&served[1]).unwrap();
        assert_eq!(fourth.evicted, 0);
        assert!(!idle.leave(third.id) && !idle.leave(fourth.id));
        assert!(IdleChannels::new(0).enter(&served[2]).is_none());
    }

    #[test]
    fn a_flood_from_one_source_evicts_only_its_own_handshakes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let sock = l.accept().unwrap().0;
        let sender: IpAddr = "10.0.0.2".parse().unwrap();
        let flood: IpAddr = "10.0.0.9".parse().unwrap();
        let mut slots = Slots::default();
        // The sender's handshake is the oldest; the flood holds the rest.
        for (id, source) in [(0, sender), (1, flood), (2, flood)] {
            slots.open.push_back(InFlight {
                id,
                source,
                sock: sock.try_clone().unwrap(),
                evicted: false,
            });
        }
        assert_eq!(slots.victim(Some(flood)).map(|h| h.id), Some(1));
        assert_eq!(slots.victim(None).map(|h| h.id), Some(1));
        // Evicting goes on through the flood's own before the sender's.
        slots.victim(Some(flood)).unwrap().evicted = true;
        assert_eq!(slots.victim(Some(flood)).map(|h| h.id), Some(2));
        slots.victim(Some(flood)).unwrap().evicted = true;
        // Only now, one each: the oldest goes.
        assert_eq!(slots.victim(Some(flood)).map(|h| h.id), Some(0));
    }
}
