//! Telling neighbours that an address now lives here: after an address
//! move their ARP or neighbour caches still point at the old host.

use crate::{sys, wire};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};

/// An announcement of an address on an interface with the interface's
/// details (index, Ethernet address) looked up and, for IPv4, its packet
/// socket open, ready to [`send`]: an agent prepares it while it waits for
/// COMMIT, so that the take-over itself only sends the frame. (An IPv6
/// announcement's socket is bound to the address, which must be assigned
/// first: it is opened by [`send`].) Dropped, its packet socket is closed
/// by the process's closer thread (the close waits for an RCU grace
/// period).
///
/// [`send`]: Announcement::send
#[derive(Debug)]
pub struct Announcement {
    ifindex: u32,
    mac: [u8; 6],
    ip: IpAddr,
    link: Option<OwnedFd>,
}

impl Drop for Announcement {
    fn drop(&mut self) {
        if let Some(s) = self.link.take() {
            sys::close_off_path(s);
        }
    }
}

impl Announcement {
    /// Looks up what announcing `ip` on `ifname` (in the calling thread's
    /// network namespace) takes.
    pub fn prepare(ifname: &str, ip: IpAddr) -> io::Result<Announcement> {
        Ok(Announcement {
            ifindex: sys::if_index(ifname)?,
            mac: sys::hw_addr(ifname)?,
            ip,
            link: match ip {
                IpAddr::V4(_) => Some(sys::link_socket()?),
                IpAddr::V6(_) => None,
            },
        })
    }

    /// The address it announces.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Sends it (from the calling thread's network namespace): one
    /// gratuitous ARP request for IPv4 (RFC 5227 §3 "ARP Announcement"),
    /// one unsolicited neighbour advertisement to all nodes with the
    /// Override flag for IPv6 (RFC 4861 §7.2.6; the address must be
    /// assigned here, it is the source), so that neighbours update their
    /// caches at once.
    pub fn send(&self) -> io::Result<()> {
        match self.ip {
            IpAddr::V4(v4) => sys::send_link_frame(
                match &self.link {
                    Some(s) => s.as_fd(),
                    None => return Err(io::Error::other("no packet socket to send on")),
                },
                self.ifindex,
                etherparse::EtherType::ARP.0,
                wire::BROADCAST,
                &wire::arp_announcement(self.mac, v4),
            ),
            IpAddr::V6(v6) => sys::send_icmpv6_multicast(
                self.ifindex,
                v6,
                wire::ALL_NODES,
                &wire::neighbour_advertisement(self.mac, v6),
            ),
        }
    }
}

/// Sends one gratuitous ARP request for `ip` out of interface `ifname` (in
/// the calling thread's network namespace), so that neighbours update their
/// caches at once after an address moved here (RFC 5227 §3 "ARP
/// Announcement").
pub fn announce_ipv4(ifname: &str, ip: Ipv4Addr) -> io::Result<()> {
    Announcement::prepare(ifname, IpAddr::V4(ip))?.send()
}

/// Sends one unsolicited neighbour advertisement for `ip` out of `ifname`
/// to all nodes (RFC 4861 §7.2.6), with the Override flag, so that
/// neighbours replace their cached link-layer address at once. `ip` must be
/// assigned here (it is the source).
pub fn announce_ipv6(ifname: &str, ip: Ipv6Addr) -> io::Result<()> {
    Announcement::prepare(ifname, IpAddr::V6(ip))?.send()
}

/// Announces `ip` on `ifname`: gratuitous ARP for IPv4, unsolicited
/// neighbour advertisement for IPv6.
pub fn announce(ifname: &str, ip: IpAddr) -> io::Result<()> {
    Announcement::prepare(ifname, ip)?.send()
}
