//! The queue of connections decided for one agent, cut into handoff
//! batches.
//!
//! A batch has a fixed cost whatever its size (an authenticated channel,
//! the lock's and the steering's transactions, the protocol's round
//! trips), so a batch takes every connection waiting when it starts. One
//! batch in flight serialises the agent's handoffs: connections decided
//! meanwhile wait for its end. A second batch overlaps the first only when
//! enough connections wait ([`Policy::overlap_min`]): under a burst it
//! halves their wait, and with a few connections at a time (large
//! responses) they join the next batch instead of paying a batch's cost
//! of their own.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

/// How a queue cuts batches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Items in one batch at most.
    pub(crate) max_batch: usize,
    /// Batches in flight at once at most.
    pub(crate) max_in_flight: usize,
    /// Items that must wait before a batch starts while another is in
    /// flight.
    pub(crate) overlap_min: usize,
}

/// A queue shared by the agent's batching threads.
#[derive(Debug)]
pub(crate) struct BatchQueue<T> {
    policy: Policy,
    state: Mutex<State<T>>,
    changed: Condvar,
}

#[derive(Debug)]
struct State<T> {
    waiting: VecDeque<T>,
    in_flight: usize,
}

/// A batch being handed off; dropping it lets the next one start.
#[must_use]
pub(crate) struct InFlight<'a, T> {
    queue: &'a BatchQueue<T>,
}

impl<T> Drop for InFlight<'_, T> {
    fn drop(&mut self) {
        self.queue.lock().in_flight -= 1;
        self.queue.changed.notify_one();
    }
}

impl<T> BatchQueue<T> {
    pub(crate) fn new(policy: Policy) -> BatchQueue<T> {
        BatchQueue {
            policy,
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                in_flight: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` for the next batch.
    pub(crate) fn push(&self, item: T) {
        self.lock().waiting.push_back(item);
        // One thread can take what waits; if it may not start a batch,
        // no other may either (they test the same state).
        self.changed.notify_one();
    }

    /// Waits until a batch may start and takes it (oldest first).
    pub(crate) fn next_batch(&self) -> (Vec<T>, InFlight<'_, T>) {
        let p = self.policy;
        let mut s = self.lock();
        loop {
            let may_start = !s.waiting.is_empty()
                && s.in_flight < p.max_in_flight
                && (s.in_flight == 0 || s.waiting.len() >= p.overlap_min);
            if may_start {
                let n = s.waiting.len().min(p.max_batch);
                let batch: Vec<T> = s.waiting.drain(..n).collect();
                s.in_flight += 1;
                if !s.waiting.is_empty() {
                    // More than one batch waits: the next thread may start
                    // one beside this.
                    self.changed.notify_one();
                }
                return (batch, InFlight { queue: self });
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    const POLICY: Policy = Policy {
        max_batch: 3,
        max_in_flight: 2,
        overlap_min: 2,
    };

    #[test]
    fn a_batch_takes_what_waits_oldest_first_up_to_the_max() {
        let q = BatchQueue::new(POLICY);
        for i in 0..5 {
            q.push(i);
        }
        let (first, a) = q.next_batch();
        assert_eq!(first, [0, 1, 2]);
        // Two wait: enough to overlap the first batch.
        let (second, b) = q.next_batch();
        assert_eq!(second, [3, 4]);
        drop((a, b));
    }

    /// With a batch in flight, one waiting item is not enough for a second
    /// batch: it starts when the first ends, or when a second item comes.
    #[test]
    fn a_second_batch_waits_for_enough_items_or_the_first_ones_end() {
        let q = Arc::new(BatchQueue::new(POLICY));
        q.push(0);
        let (first, in_flight) = q.next_batch();
        assert_eq!(first, [0]);
        q.push(1);
        let (tx, rx) = mpsc::channel();
        let worker = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                for _ in 0..2 {
                    let (batch, done) = q.next_batch();
                    tx.send(batch).unwrap();
                    drop(done);
                }
            })
        };
        // The worker must still be waiting (a bound, not a timing claim:
        // a wrong policy hands the batch over at once).
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(200)),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        q.push(2);
        assert_eq!(rx.recv().unwrap(), [1, 2]);
        q.push(3);
        drop(in_flight);
        assert_eq!(rx.recv().unwrap(), [3]);
        worker.join().unwrap();
    }

    #[test]
    fn no_more_batches_than_the_max_in_flight() {
        let q = Arc::new(BatchQueue::new(POLICY));
        for i in 0..8 {
            q.push(i);
        }
        let (_, a) = q.next_batch();
        let (_, b) = q.next_batch();
        let (tx, rx) = mpsc::channel();
        let worker = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                let (batch, _done) = q.next_batch();
                tx.send(batch).unwrap();
            })
        };
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(200)),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        drop(a);
        assert_eq!(rx.recv().unwrap(), [6, 7]);
        drop(b);
        worker.join().unwrap();
    }
}
