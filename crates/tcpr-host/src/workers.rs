//! Threads kept for the next blocking job: a job runs on an idle worker
//! when one waits, on a new thread otherwise, and a worker waits for
//! another job for a while before it ends.
//!
//! A relay or a served connection blocks its thread for the connection's
//! life, so a fixed pool would queue connections behind long ones; one
//! thread per job has no such limit but pays a thread's start and end
//! (the stack's mmap, mprotect and munmap, each a TLB shootdown on the
//! other CPUs, under the process's mmap lock), which cost more than a
//! small request's relay. Written here rather than taken from tokio's
//! blocking pool (the cached pool the dependencies have): that one panics
//! when it cannot start a thread and has none, and a relay worker must
//! then hand the connection back, not die.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// A set of kept threads; see the module.
pub struct Workers {
    shared: Arc<Shared>,
    name: String,
    keep: Duration,
}

struct Shared {
    state: Mutex<State>,
    /// A job was queued (for an idle worker).
    queued: Condvar,
    /// `busy` reached zero.
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// Jobs handed to idle workers and not taken yet; never more than
    /// `idle`.
    queue: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    /// Jobs accepted and not finished.
    busy: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One job ended (returned or panicked).
    fn finished(&self) {
        let mut s = self.lock();
        s.busy -= 1;
        if s.busy == 0 {
            self.done.notify_all();
        }
    }
}

/// Counts its job finished when dropped, a panicking one too.
struct Finish<'a>(&'a Shared);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finished();
    }
}

impl Workers {
    /// Workers whose threads are named `name` and wait `keep` for another
    /// job before they end.
    pub fn new(name: &str, keep: Duration) -> Workers {
        Workers {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                queued: Condvar::new(),
                done: Condvar::new(),
            }),
            name: name.to_string(),
            keep,
        }
    }

    /// Runs `job` on an idle worker, or on a new thread. Fails only when no
    /// worker is idle and the kernel refuses a thread: `job` is then
    /// dropped, not run.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let mut s = self.shared.lock();
        s.busy += 1;
        if s.idle > s.queue.len() {
            s.queue.push_back(Box::new(job));
            self.shared.queued.notify_one();
            return Ok(());
        }
        drop(s);
        let (shared, keep) = (Arc::clone(&self.shared), self.keep);
        let spawned = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || work(&shared, Box::new(job), keep));
        spawned.map(drop).inspect_err(|_| self.shared.finished())
    }

    /// Waits until every job accepted so far has finished.
    pub fn wait_idle(&self) {
        let mut s = self.shared.lock();
        while s.busy > 0 {
            s = self.shared.done.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Jobs accepted and not finished.
    pub fn busy(&self) -> usize {
        self.shared.lock().busy
    }

    /// Threads waiting for a job.
    pub fn idle(&self) -> usize {
        self.shared.lock().idle
    }
}

/// A worker's life: `job`, then each job queued for it, until none comes
/// within `keep`.
fn work(shared: &Shared, mut job: Job, keep: Duration) {
    loop {
        {
            let _finish = Finish(shared);
            job();
        }
        let mut s = shared.lock();
        s.idle += 1;
        job = loop {
            if let Some(next) = s.queue.pop_front() {
                s.idle -= 1;
                break next;
            }
            let (guard, waited) = shared
                .queued
                .wait_timeout(s, keep)
                .unwrap_or_else(|e| e.into_inner());
            s = guard;
            if waited.timed_out() && s.queue.is_empty() {
                s.idle -= 1;
                return;
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A finished job's thread runs the next one: no new thread.
    #[test]
    fn a_finished_worker_takes_the_next_job() {
        let w = Workers::new("test-worker", Duration::from_secs(10));
        let (tx, rx) = mpsc::channel();
        let mut ids = vec![];
        for _ in 0..3 {
            let tx = tx.clone();
            w.spawn(move || tx.send(std::thread::current().id()).unwrap())
                .unwrap();
            ids.push(rx.recv().unwrap());
            // The worker is idle again before the next job.
            while w.idle() == 0 {
                std::thread::yield_now();
            }
        }
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        w.wait_idle();
        assert_eq!(w.busy(), 0);
    }

    /// Jobs that block do not wait for each other: each gets a thread.
    #[test]
    fn blocked_jobs_each_have_a_thread() {
        let w = Workers::new("test-worker", Duration::from_secs(10));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        for _ in 0..4 {
            let (gate, tx) = (gate.clone(), tx.clone());
            w.spawn(move || {
                tx.send(()).unwrap();
                let mut open = gate.0.lock().unwrap();
                while !*open {
                    open = gate.1.wait(open).unwrap();
                }
            })
            .unwrap();
        }
        // All four started while none could finish.
        for _ in 0..4 {
            rx.recv().unwrap();
        }
        assert_eq!(w.busy(), 4);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        w.wait_idle();
        assert_eq!(w.busy(), 0);
    }

    /// An idle worker ends after `keep`; a panicking job is counted
    /// finished.
    #[test]
    fn idle_workers_end_and_panics_are_counted() {
        let w = Workers::new("test-worker", Duration::from_millis(20));
        w.spawn(|| panic!("a job's panic")).unwrap();
        w.wait_idle();
        w.spawn(|| {}).unwrap();
        w.wait_idle();
        while w.idle() > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!((w.busy(), w.idle()), (0, 0));
    }
}
