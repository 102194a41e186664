//! Helpers shared by the engine's kernel tests.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// Moves the calling thread into a fresh network namespace with `lo` up
/// (TCP_REPAIR and nftables need only CAP_NET_ADMIN there).
pub(crate) fn private_netns() {
    tcpr_host::unshare_netns().expect("unshare a network namespace (run as root)");
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Runs `f` on a thread of its own in a fresh network namespace.
pub(crate) fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        private_netns();
        f()
    })
    .join()
    .unwrap();
}

/// A connected (client, server) pair on `addr` (port 0: any).
pub(crate) fn pair(addr: &str) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(addr).unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

/// How often the waits below look again.
pub(crate) const POLL: Duration = Duration::from_millis(2);
/// How long a state the kernel reaches by itself on loopback may take on a
/// loaded machine.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Polls `ready` until it holds; fails the test naming `what` if it does not
/// within `timeout`.
pub(crate) fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(POLL);
    }
}

/// The sock_diag entry of `s` (state and queues, as `ss` shows them).
pub(crate) fn diag_entry(s: &TcpStream) -> tcpr_engine::diag::SocketEntry {
    let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
    let pid = i32::try_from(std::process::id()).unwrap();
    tcpr_engine::diag::list(Some(pid))
        .unwrap()
        .into_iter()
        .find(|e| e.local == local && e.peer == peer)
        .unwrap_or_else(|| panic!("sock_diag does not list {local} -> {peer}"))
}

/// Waits until `s` reaches kernel state `want`.
pub(crate) fn wait_state(s: &TcpStream, want: tcpr_image::TcpState) {
    use std::os::fd::AsFd;
    let deadline = Instant::now() + WAIT;
    loop {
        let now = tcpr_engine::inspect_socket(s.as_fd()).unwrap().1;
        if now == want.kernel_number() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "socket in state {}, never reached {want:?} within {WAIT:?}",
            tcpr_image::TcpState::kernel_name(now)
        );
        std::thread::sleep(POLL);
    }
}
