//! What both datapaths share: the namespace they were installed in, a
//! flow's addresses as on the wire, and the check that a backend is on
//! the steered interface's link.

use crate::{SteerError, SteeredFlow};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::Duration;

/// The network namespace a datapath was installed in (the creating
/// thread's): its entries and routes are there whichever thread steers.
#[derive(Debug)]
pub(crate) struct Netns(std::fs::File, (u64, u64));

impl Netns {
    /// The calling thread's namespace.
    pub(crate) fn here() -> std::io::Result<Netns> {
        use std::os::unix::fs::MetadataExt;
        let f = std::fs::File::open("/proc/thread-self/ns/net")?;
        let m = f.metadata()?;
        Ok(Netns(f, (m.dev(), m.ino())))
    }

    /// The namespace to pass to nfnl: none when the calling thread is in
    /// it already (saves a thread per call).
    pub(crate) fn ns(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match tcpr_host::thread_netns() {
            Ok(here) if here == self.1 => None,
            _ => Some(self.0.as_fd()),
        }
    }

    /// Runs `f` in the namespace: here when the calling thread is in it,
    /// else on a thread that enters it (entering must not move the
    /// caller's thread).
    pub(crate) fn within<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T, SteerError> + Send,
    ) -> Result<T, SteerError> {
        if self.ns().is_none() {
            return f();
        }
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&self.0));
        std::thread::scope(|s| {
            s.spawn(move || {
                tcpr_host::enter_netns(&path)?;
                f()
            })
            .join()
        })
        .unwrap_or_else(|_| Err(invalid("a thread of the steering datapath panicked")))
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn invalid(why: &str) -> SteerError {
    SteerError::Kernel(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        why.to_string(),
    ))
}

pub(crate) fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// The shortest idle timeout or linger: nf_tables keeps timeouts in
/// milliseconds, rounded to jiffies, and shorter ones would round to
/// nothing (the BPF datapath keeps the same range).
const MIN_TIMEOUT: Duration = Duration::from_millis(10);
/// The longest: nf_tables refuses a timeout beyond `U32_MAX` jiffies
/// (about 49 days at HZ=1000); a day is well inside it.
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// Checks a datapath's idle timeout and linger against the range both
/// datapaths take.
pub(crate) fn check_timeouts(idle: Duration, linger: Duration) -> Result<(), String> {
    for (what, t) in [("idle timeout", idle), ("linger", linger)] {
        if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&t) {
            return Err(format!(
                "{what} {t:?} out of range ({MIN_TIMEOUT:?} to {MAX_TIMEOUT:?})"
            ));
        }
    }
    Ok(())
}

/// Interface names are shorter than this (linux/if.h IFNAMSIZ).
const IFNAMSIZ: usize = 16;

/// Whether `name` can be an interface's name.
pub(crate) fn plain_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// The flow's addresses as they are on the wire (`::ffff:` mapped
/// addresses are IPv4), and whether that is IPv4; `None` when the client
/// and the VIP are of different families.
pub(crate) fn on_wire(
    client: SocketAddr,
    vip: SocketAddr,
) -> Option<(SocketAddr, SocketAddr, bool)> {
    let wire = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (c, v) = (wire(client), wire(vip));
    (c.is_ipv4() == v.is_ipv4()).then_some((c, v, c.is_ipv4()))
}

/// A flow checked for the datapath: its addresses as on the wire.
pub(crate) struct WireFlow {
    pub(crate) client: SocketAddr,
    pub(crate) vip: SocketAddr,
    pub(crate) v4: bool,
    pub(crate) backend: IpAddr,
    pub(crate) client_seq: Option<crate::ClientSeq>,
}

impl WireFlow {
    pub(crate) fn check(flow: &SteeredFlow) -> Result<WireFlow, SteerError> {
        let unsupported = |reason: String| SteerError::Unsupported {
            client: flow.client,
            vip: flow.vip,
            reason,
        };
        let (client, vip, v4) = on_wire(flow.client, flow.vip).ok_or_else(|| {
            unsupported("the client and the VIP are of different families".into())
        })?;
        let backend = flow.backend.to_canonical();
        if backend.is_ipv4() != v4 {
            return Err(unsupported(format!(
                "the backend {backend} is not of the flow's family"
            )));
        }
        Ok(WireFlow {
            client,
            vip,
            v4,
            backend,
            client_seq: flow.client_seq,
        })
    }

    /// Checks that the flow's backend is on the link of `device` (in
    /// `netns`): flows go to it at L2, out of that interface.
    pub(crate) fn check_on_link(&self, netns: &Netns, device: &str) -> Result<(), SteerError> {
        let backend = self.backend;
        let unsupported = |reason: String| SteerError::Unsupported {
            client: self.client,
            vip: self.vip,
            reason,
        };
        let (_, ifname) = netns
            .within(|| {
                tcpr_host::addr::route_interface(backend).map_err(|e| invalid(&e.to_string()))
            })
            .map_err(|e| unsupported(format!("no route to the backend {backend}: {e}")))?;
        if ifname != device {
            return Err(unsupported(format!(
                "the backend {backend} is reached by {ifname}, not by {device} (L2 steering needs the backend on the front's link)"
            )));
        }
        Ok(())
    }
}
