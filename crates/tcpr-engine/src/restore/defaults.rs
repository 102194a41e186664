//! What a new TCP socket starts with, so that a restore sets only the
//! options an image holds at another value.
//!
//! A new socket's options come from its network namespace (sysctls such as
//! `net.ipv4.tcp_keepalive_time`, `tcp_rmem`, `tcp_congestion_control`) and
//! from kernel constants, so they are read once per namespace and family
//! from a fresh socket, before anything is set on it, and kept for
//! [`MAX_AGE`]. Leaving an option at the default also keeps it following
//! the default, as it did on the original socket (`getsockopt(TCP_KEEPIDLE)`
//! answers the sysctl until the option is set).
//!
//! The price: for [`MAX_AGE`] after such a sysctl changes, an image holding
//! the old default for that option is restored with the new one.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tcpr_image::SocketOptions;

/// How long the defaults read from a fresh socket are trusted.
const MAX_AGE: Duration = Duration::from_millis(100);

/// Defaults of one network namespace and family.
struct Entry {
    netns_cookie: u64,
    ipv6: bool,
    read_at: Instant,
    options: Arc<SocketOptions>,
}

/// Few namespaces restore at once: a list is searched faster than hashed.
static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// The options of a new socket of `fd`'s namespace and family; `fd` must
/// be fresh (nothing set on it but `IP_TRANSPARENT` and `TCP_REPAIR`),
/// since on a miss its own options are read as the defaults; `netns_cookie`
/// is its namespace's (`SO_NETNS_COOKIE`: where the namespace cannot be
/// told, the caller sets every option).
pub(super) fn of_fresh_socket(
    fd: BorrowedFd<'_>,
    ipv6: bool,
    netns_cookie: u64,
) -> Option<Arc<SocketOptions>> {
    let now = Instant::now();
    {
        let cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = cache
            .iter()
            .find(|e| e.netns_cookie == netns_cookie && e.ipv6 == ipv6)
        {
            if now.duration_since(e.read_at) < MAX_AGE {
                return Some(Arc::clone(&e.options));
            }
        }
    }
    let options = Arc::new(crate::options::read(fd, ipv6));
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache.retain(|e| !(e.netns_cookie == netns_cookie && e.ipv6 == ipv6));
    // A namespace gone stays until its entry is old: drop the old ones.
    cache.retain(|e| now.duration_since(e.read_at) < MAX_AGE);
    cache.push(Entry {
        netns_cookie,
        ipv6,
        read_at: now,
        options: Arc::clone(&options),
    });
    Some(options)
}
