//! Closing fds in a child process: the last close of an nf_tables netlink
//! socket waits for pending transaction destroy work (an RCU grace
//! period), and a short-lived process should not wait for it at exit.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::sock::named;

/// Closes `fds` in a forked child once this process has closed its own
/// copies, so that the child's close is the last one and whatever it
/// waits for is waited there. The child closes every other fd it
/// inherited first (standard output and error too: a caller that reads
/// this process's output to its end does not wait for the child), waits
/// for the end of a pipe this process holds, closes `fds` and exits.
/// Returns the child's pid; `fds` are closed here when this returns.
pub(crate) fn close_in_child(fds: Vec<OwnedFd>) -> io::Result<libc::pid_t> {
    let mut ends: [libc::c_int; 2] = [-1, -1];
    // SAFETY: `ends` is writable for the two ints pipe2(2) writes.
    syscall!(pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC)).map_err(named("pipe2"))?;
    // SAFETY: on success both fds are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    // Everything the child needs, computed here: it must not allocate.
    let mut keep: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    keep.push(read.as_raw_fd());
    keep.sort_unstable();
    let gaps = open_gaps(&keep);
    let (read_raw, close): (RawFd, Vec<RawFd>) = (
        read.as_raw_fd(),
        fds.iter().map(|f| f.as_raw_fd()).collect(),
    );
    // SAFETY: fork(2) has no memory-safety preconditions of its own. In
    // the child (of a process that may have other threads, one of which
    // may hold a lock of the allocator or of stdio) only async-signal-safe
    // calls run: close_range and close on raw fds, read into a stack byte,
    // _exit; nothing allocates, locks or unwinds, and no Rust destructor
    // runs (the fds the child inherited are closed by number, then it
    // leaves with _exit).
    let pid = syscall!(fork()).map_err(named("fork"))?;
    if pid == 0 {
        for &(first, last) in &gaps {
            close_range(first, last);
        }
        let mut byte = 0u8;
        loop {
            // SAFETY: `byte` is writable for one byte; `read_raw` is this
            // child's copy of the pipe's read end.
            let n = unsafe { libc::read(read_raw, (&mut byte as *mut u8).cast(), 1) };
            // SAFETY: reads the calling thread's errno (async-signal-safe).
            if n == 0 || (n < 0 && unsafe { *libc::__errno_location() } != libc::EINTR) {
                break;
            }
        }
        wait_grace_period();
        for &fd in &close {
            // SAFETY: the child's copy of an fd it inherited, closed once.
            unsafe { libc::close(fd) };
        }
        // SAFETY: ends the child without running anything of the parent's
        // (no atexit handlers, no stdio flush).
        unsafe { libc::_exit(0) };
    }
    // Ours first, then the pipe's write end: the child's close is the last.
    drop(read);
    drop(fds);
    drop(write);
    Ok(pid)
}

/// The fd ranges (inclusive) between the sorted `keep`, up to the largest fd.
fn open_gaps(keep: &[RawFd]) -> Vec<(u32, u32)> {
    let mut gaps = Vec::with_capacity(keep.len() + 1);
    let mut next: u32 = 0;
    for &fd in keep {
        let fd = fd as u32;
        if fd > next {
            gaps.push((next, fd - 1));
        }
        next = fd + 1;
    }
    gaps.push((next, u32::MAX));
    gaps
}

/// `MEMBARRIER_CMD_GLOBAL` (linux/membarrier.h): returns after an RCU
/// grace period (`synchronize_rcu`).
const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;

/// How long to sleep where membarrier cannot wait for a grace period
/// (nohz_full kernels refuse `MEMBARRIER_CMD_GLOBAL`): longer than one.
const GRACE_PERIOD_SLEEP: libc::timespec = libc::timespec {
    tv_sec: 0,
    tv_nsec: 50_000_000,
};

/// Waits for an RCU grace period that starts now: one started earlier
/// (nf_tables' destroy work's, for a transaction this process committed
/// before it forked) has ended by then. Async-signal-safe: raw syscalls.
fn wait_grace_period() {
    // SAFETY: membarrier takes no pointers.
    let waited = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) } == 0;
    if !waited {
        // SAFETY: `GRACE_PERIOD_SLEEP` is a valid timespec; the remainder
        // pointer may be null.
        unsafe { libc::nanosleep(&GRACE_PERIOD_SLEEP, std::ptr::null_mut()) };
    }
}

/// close_range(2) (Linux 5.9), or closes one by one up to 1024 fds on an
/// older kernel. Async-signal-safe: raw syscalls only.
fn close_range(first: u32, last: u32) {
    // SAFETY: closes fd numbers only; no memory is passed.
    let done = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) } == 0;
    if !done {
        for fd in first..=last.min(1023) {
            // SAFETY: closing a number that may not be open is harmless.
            unsafe { libc::close(fd as RawFd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_skip_the_kept_fds() {
        assert_eq!(open_gaps(&[0, 5, 6]), vec![(1, 4), (7, u32::MAX)]);
        assert_eq!(open_gaps(&[3]), vec![(0, 2), (4, u32::MAX)]);
    }
}
