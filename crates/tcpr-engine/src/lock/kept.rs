//! The netlink sockets the lock's transactions go through, kept open.
//!
//! A transaction that removes a present element (a relock within
//! [`super::UNLOCKED_TIMEOUT`] of a release destroys its `unlocked`
//! element; a release on a kernel that deletes) commits in microseconds,
//! but leaves nf_tables destroy work that waits for an RCU grace period,
//! and the next close of any nf_tables netlink socket flushes that work:
//! a socket per transaction made the lock call itself wait 8-30 ms, with
//! the connection frozen. So a socket, once opened, goes back to a pool
//! keyed by its network namespace after a clean exchange (one that failed
//! may still have answers on their way: it is dropped, never reused), and
//! the grace period runs in a kworker while nobody waits. A short-lived
//! process hands its pool to [`detach_sockets`] before it exits, whose child
//! closes the sockets once this process has closed its copies and an RCU
//! grace period has passed (the parent does not wait for either). Nobody
//! reaps that child but the parent's parent after the exit: call it last.

use super::Netns;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tcpr_host::nfnl::{self, Batch, NlError};

/// A socket not in use, and the namespace it answers for.
struct Kept {
    socket: nfnl::Socket,
    /// Device and inode of its network namespace.
    ns: (u64, u64),
}

/// The sockets not in use, oldest first: one per thread that used one at
/// a time and namespace, at most [`POOL_MAX`].
static POOL: Mutex<Vec<Kept>> = Mutex::new(Vec::new());

/// The most sockets kept: a netlink socket holds its network namespace
/// alive, so a process that locks in many namespaces (one after the
/// other) closes the oldest.
const POOL_MAX: usize = 8;

/// Whether this process committed a transaction that may have removed a
/// present element: one that deletes, or destroys an element the kernel
/// echoed back as removed (a lock's destroy of the `unlocked` element of
/// a flow released moments ago; spaced locks remove nothing).
static REMOVED: AtomicBool = AtomicBool::new(false);

/// The identity of `ns` (for [`Netns::current`], of the calling thread's
/// namespace: one `statx`).
fn identity(ns: &Netns) -> Option<(u64, u64)> {
    match &ns.fd {
        Some(_) => ns.identity(),
        None => tcpr_host::thread_netns().ok(),
    }
}

/// Runs `f` on a kept socket of `ns` (opened if none is free), which goes
/// back to the pool when `f` succeeds.
pub(super) fn with<T>(
    ns: &Netns,
    f: impl FnOnce(&nfnl::Socket) -> Result<T, NlError>,
) -> Result<T, NlError> {
    let nsfd = ns.fd.as_ref().map(|f| f.as_fd());
    let Some(id) = identity(ns) else {
        return f(&nfnl::Socket::open(nsfd)?);
    };
    let free = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let i = pool.iter().rposition(|k| k.ns == id);
        i.map(|i| pool.remove(i).socket)
    };
    let socket = match free {
        Some(s) => s,
        None => nfnl::Socket::open(nsfd)?,
    };
    let out = f(&socket)?;
    let evicted = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(Kept { socket, ns: id });
        (pool.len() > POOL_MAX).then(|| pool.remove(0))
    };
    // Closed outside the pool's lock.
    drop(evicted);
    Ok(out)
}

/// Commits `batch` in `ns` on a kept socket, again while the kernel
/// answers EBUSY ([`nfnl::retry_busy`]).
pub(super) fn commit(ns: &Netns, batch: Batch) -> Result<(), NlError> {
    if batch.is_empty() {
        return Ok(());
    }
    // Removed if it deletes, or destroys and the kernel echoed a removal
    // (or its answer is unknown).
    let (removes, echoes) = (batch.removes(), batch.echoes_removals());
    // A failed attempt's socket is closed (`with`), so each try starts
    // on a socket with no answers of another queued.
    let batch = batch.seal();
    let echoed = nfnl::retry_busy(|| with(ns, |socket| socket.commit_sealed(&batch)));
    if removes && (!echoes || !matches!(echoed, Ok(0))) {
        REMOVED.store(true, Ordering::Relaxed);
    }
    echoed.map(drop)
}

/// Hands the kept sockets to a child process that closes them once this
/// one has closed its copies, when a transaction of this process may have
/// left destroy work whose grace period their close would wait for. For
/// a process about to exit (the CLI calls it last): the exit then waits
/// for nothing. Returns the child's pid, if one was started. Sockets in
/// use by other threads right now stay theirs.
pub fn detach_sockets() -> Option<u32> {
    if !REMOVED.load(Ordering::Relaxed) {
        return None;
    }
    let sockets: Vec<nfnl::Socket> = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.drain(..).map(|k| k.socket).collect()
    };
    if sockets.is_empty() {
        return None;
    }
    match nfnl::close_in_child(sockets) {
        Ok(pid) => Some(pid),
        Err(e) => {
            // The sockets are closed here then, and the exit waits.
            tracing::debug!("cannot close the lock's netlink sockets in a child: {e}");
            None
        }
    }
}
