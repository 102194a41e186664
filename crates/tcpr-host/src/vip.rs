//! A backend host of direct server return: the virtual address (VIP) on
//! the loopback, so the host takes packets for it and answers from it,
//! while it never claims the VIP on the link (the front host does).
//!
//! - IPv4: `arp_ignore=1` (answer ARP only for addresses of the interface
//!   the request came in on: not for one on `lo`) and `arp_announce=2`
//!   (ARP requests sent name the best address of the outgoing interface
//!   as sender, never the VIP). The kernel takes the larger of `all` and
//!   the interface's value (`IN_DEV_ARP_IGNORE`, `IN_DEV_ARP_ANNOUNCE`),
//!   so raising `all` covers every interface.
//! - IPv6: nothing to suppress: neighbour solicitations are answered only
//!   for addresses of the interface they arrive on (`ndisc_recv_ns` looks
//!   the target up strictly on that device).
//! - Reverse-path filtering needs nothing: the client's packets arrive on
//!   the interface that routes back to the client.
//!
//! [`Vips`] undoes what it did when dropped: the addresses it added (not
//! one that was on `lo` already) and the sysctls it raised, to the values
//! they had.

use crate::addr::{self, Assigned};
use std::net::IpAddr;
use std::path::PathBuf;

/// The ARP settings direct server return needs, as `(sysctl, at least)`.
const ARP_SETTINGS: [(&str, u32); 2] = [("arp_ignore", 1), ("arp_announce", 2)];
/// The loopback interface.
const LOOPBACK: &str = "lo";

/// Why a host could not be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The VIP is on a link: this host would answer ARP/ND for it and
    /// take the front's traffic.
    #[error("the VIP {ip} is assigned to {ifname}, not the loopback: remove it there first (a backend of direct server return must not claim the VIP on the link)")]
    OnLink {
        /// The VIP.
        ip: IpAddr,
        /// Where it is.
        ifname: String,
    },
    /// An address operation failed.
    #[error("VIP {ip}: {source}")]
    Address {
        /// The VIP.
        ip: IpAddr,
        /// Why.
        source: addr::Error,
    },
    /// A sysctl could not be read or written.
    #[error("cannot set {path}: {source}")]
    Sysctl {
        /// Its file under /proc/sys.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A sysctl raised, with the value to put back.
#[derive(Debug)]
struct Raised {
    path: PathBuf,
    before: String,
}

/// The VIPs on the loopback and the ARP settings; undone on drop.
#[derive(Debug, Default)]
pub struct Vips {
    added: Vec<Assigned>,
    raised: Vec<Raised>,
}

/// Puts each of `vips` on the loopback (a /32 or /128) and, when one is
/// IPv4, raises the ARP settings. A VIP already on the loopback is left
/// as it is (and stays after); one on another interface is refused. On
/// error nothing is left changed.
pub fn prepare(vips: &[IpAddr]) -> Result<Vips, Error> {
    let mut done = Vips::default();
    let lo = addr::interface_index(LOOPBACK).map_err(|source| Error::Address {
        ip: vips.first().copied().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        source,
    })?;
    // Refuse before changing anything.
    for &ip in vips {
        match addr::find(ip) {
            Ok(held) if held.ifname != LOOPBACK => {
                return Err(Error::OnLink {
                    ip,
                    ifname: held.ifname,
                })
            }
            Ok(_) | Err(addr::Error::NotFound(_)) => {}
            Err(source) => return Err(Error::Address { ip, source }),
        }
    }
    if vips.iter().any(IpAddr::is_ipv4) {
        for (name, at_least) in ARP_SETTINGS {
            done.raise(&format!("/proc/sys/net/ipv4/conf/all/{name}"), at_least)?;
        }
    }
    for &ip in vips {
        if addr::find(ip).is_ok() {
            continue;
        }
        let a = Assigned {
            ip,
            prefix_len: if ip.is_ipv4() { 32 } else { 128 },
            ifindex: lo,
            ifname: LOOPBACK.into(),
        };
        addr::add(&a).map_err(|source| Error::Address { ip, source })?;
        done.added.push(a);
    }
    Ok(done)
}

impl Vips {
    /// Raises the integer sysctl at `path` to `at_least`, remembering the
    /// value it had.
    fn raise(&mut self, path: &str, at_least: u32) -> Result<(), Error> {
        let err = |source| Error::Sysctl {
            path: path.into(),
            source,
        };
        let before = std::fs::read_to_string(path).map_err(err)?;
        let now: u32 = before.trim().parse().map_err(|_| {
            err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a number: {before:?}"),
            ))
        })?;
        if now >= at_least {
            return Ok(());
        }
        std::fs::write(path, at_least.to_string()).map_err(err)?;
        self.raised.push(Raised {
            path: path.into(),
            before,
        });
        Ok(())
    }

    /// The VIPs this guard added (and will remove).
    pub fn added(&self) -> Vec<IpAddr> {
        self.added.iter().map(|a| a.ip).collect()
    }

    /// Undoes everything now; returns what could not be undone.
    pub fn undo(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        for a in self.added.drain(..).rev() {
            if let Err(e) = addr::remove(&a) {
                failed.push(format!("cannot remove {} from lo: {e}", a.cidr()));
            }
        }
        for r in self.raised.drain(..).rev() {
            if let Err(e) = std::fs::write(&r.path, r.before.trim()) {
                failed.push(format!("cannot restore {}: {e}", r.path.display()));
            }
        }
        failed
    }
}

impl Drop for Vips {
    fn drop(&mut self) {
        for f in self.undo() {
            eprintln!("tcpr: {f}");
        }
    }
}
