//! Telling neighbours that an address now lives here: after an address
//! move their ARP or neighbour caches still point at the old host.

use crate::{sys, wire};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Sends one gratuitous ARP request for `ip` out of interface `ifname` (in
/// the calling thread's network namespace), so that neighbours update their
/// caches at once after an address moved here (RFC 5227 §3 "ARP
/// Announcement").
pub fn announce_ipv4(ifname: &str, ip: Ipv4Addr) -> io::Result<()> {
    let ifindex = sys::if_index(ifname)?;
    let mac = sys::hw_addr(ifname)?;
    let frame = wire::arp_announcement(mac, ip);
    sys::send_link_frame(
        ifindex,
        etherparse::EtherType::ARP.0,
        wire::BROADCAST,
        &frame,
    )
}

/// Sends one unsolicited neighbour advertisement for `ip` out of `ifname`
/// to all nodes (RFC 4861 §7.2.6), with the Override flag, so that
/// neighbours replace their cached link-layer address at once. `ip` must be
/// assigned here (it is the source).
pub fn announce_ipv6(ifname: &str, ip: Ipv6Addr) -> io::Result<()> {
    let ifindex = sys::if_index(ifname)?;
    let mac = sys::hw_addr(ifname)?;
    let msg = wire::neighbour_advertisement(mac, ip);
    sys::send_icmpv6_multicast(ifindex, ip, wire::ALL_NODES, &msg)
}

/// Announces `ip` on `ifname`: gratuitous ARP for IPv4, unsolicited
/// neighbour advertisement for IPv6.
pub fn announce(ifname: &str, ip: IpAddr) -> io::Result<()> {
    match ip {
        IpAddr::V4(v4) => announce_ipv4(ifname, v4),
        IpAddr::V6(v6) => announce_ipv6(ifname, v6),
    }
}
