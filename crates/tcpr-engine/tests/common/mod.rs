//! Helpers shared by the engine's kernel tests.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::process::Command;

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
