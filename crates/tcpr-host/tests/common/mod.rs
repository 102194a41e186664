//! Helpers shared by the host crate's kernel tests.
#![allow(dead_code)]

use std::process::Command;

/// Runs `f` on a thread of its own in a fresh network namespace with `lo`
/// up.
pub(crate) fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        tcpr_host::unshare_netns().expect("unshare a network namespace (run as root)");
        let st = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(st.success());
        f()
    })
    .join()
    .unwrap();
}
