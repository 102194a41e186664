//! A local route for marked packets only, so that a forged segment reaches
//! a restored socket whether or not its local address is assigned here.
//!
//! Why: the peer's FIN of a half-closed connection has no socket call; the
//! restore forges it from a raw socket (DESIGN.md, restore step 7). A
//! packet sent to an address that is not local is routed out of the host,
//! and in an address move the restore runs *before* the address arrives.
//! Waiting for the address (an rtnetlink address event) would tie resume
//! to whoever moves the address and to when; instead the forged packet
//! carries a firewall mark, and for the moment of its delivery one policy
//! rule sends packets with that mark to a table whose only route is
//! `local default dev lo`: the output route is then local, the packet
//! loops back through `lo` with that route attached and TCP delivers it to
//! the established socket by its 4-tuple, which was bound with
//! IP_TRANSPARENT. It is what TPROXY setups do (`ip rule add fwmark M
//! lookup T; ip route add local default dev lo table T`), scoped to one
//! mark and one table that nothing else uses, and removed right after.
//!
//! No other packet is affected: only packets with the mark see the table.
//! The table number is claimed atomically (the route is added with
//! NLM_F_EXCL, so two restores never share one); the rule and route are
//! removed by `Drop`, on every path. A process killed in the few
//! microseconds between adding and removing leaves one inert rule and
//! route behind, matching a mark nothing else sets.

use crate::{sys, Error};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const NETLINK_ROUTE: i32 = 0;
/// The loopback device's index: the kernel gives it index 1 in every
/// network namespace (`LOOPBACK_IFINDEX`, include/net/net_namespace.h).
const LOOPBACK_IFINDEX: u32 = 1;
/// The first of the table numbers (and marks) tcpr uses for deliveries:
/// "tc" in the top half, so that it reads as tcpr's in `ip rule` output.
const TABLE_BASE: u32 = 0x7463_0000;
/// How many table numbers are tried before giving up.
const TABLE_CANDIDATES: u32 = 64;
/// Ahead of `main` (32766), after `local` (0): a local address still
/// takes the usual path.
const RULE_PRIORITY: u32 = 1;
/// How long the kernel may take to answer one request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A rule and a route that make packets with [`LocalRoute::mark`] local,
/// in the caller's network namespace, until dropped.
#[derive(Debug)]
pub(super) struct LocalRoute {
    nl: OwnedFd,
    family: AddressFamily,
    table: u32,
    rule_added: bool,
    route_added: bool,
}

impl LocalRoute {
    /// Installs the rule and route for IPv4 or IPv6 packets.
    pub(super) fn install(ipv6: bool) -> Result<LocalRoute, Error> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nl = sys::netlink_socket(NETLINK_ROUTE)
            .map_err(|e| Error::kernel("open rtnetlink for a local route", e))?;
        sys::set_recv_timeout(nl.as_fd(), ANSWER_TIMEOUT)
            .map_err(|e| Error::kernel("set an rtnetlink timeout", e))?;
        let family = if ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let mut lr = LocalRoute {
            nl,
            family,
            table: 0,
            rule_added: false,
            route_added: false,
        };
        // Spread processes over the range, then walk it on collisions.
        let start = std::process::id().wrapping_mul(TABLE_CANDIDATES)
            ^ NEXT.fetch_add(1, Ordering::Relaxed);
        for i in 0..TABLE_CANDIDATES {
            lr.table = TABLE_BASE | (start.wrapping_add(i) & 0xffff);
            match lr.exchange(
                RouteNetlinkMessage::NewRoute(lr.route()),
                NLM_F_CREATE | NLM_F_EXCL,
            ) {
                Ok(()) => {
                    lr.route_added = true;
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(Error::kernel("add a local route for the forged FIN", e)),
            }
        }
        if !lr.route_added {
            return Err(Error::Inconsistent(format!(
                "no free routing table among {TABLE_CANDIDATES} tried for delivering the peer's FIN"
            )));
        }
        lr.exchange(RouteNetlinkMessage::NewRule(lr.rule()), NLM_F_CREATE)
            .map_err(|e| Error::kernel("add a policy rule for the forged FIN", e))?;
        lr.rule_added = true;
        Ok(lr)
    }

    /// The mark that selects the local route.
    pub(super) fn mark(&self) -> u32 {
        self.table
    }

    /// `local default dev lo table T`.
    fn route(&self) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = self.family;
        m.header.destination_prefix_length = 0;
        // Tables above 255 travel in RTA_TABLE.
        m.header.table = RouteHeader::RT_TABLE_UNSPEC;
        m.header.protocol = RouteProtocol::Static;
        m.header.scope = RouteScope::Host;
        m.header.kind = RouteType::Local;
        m.attributes.push(RouteAttribute::Table(self.table));
        m.attributes.push(RouteAttribute::Oif(LOOPBACK_IFINDEX));
        m
    }

    /// `fwmark T lookup T`.
    fn rule(&self) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = self.family;
        m.header.action = RuleAction::ToTable;
        m.attributes.push(RuleAttribute::Priority(RULE_PRIORITY));
        m.attributes.push(RuleAttribute::FwMark(self.table));
        m.attributes.push(RuleAttribute::FwMask(u32::MAX));
        m.attributes.push(RuleAttribute::Table(self.table));
        m
    }

    /// Sends one request and waits for its acknowledgement.
    fn exchange(&self, msg: RouteNetlinkMessage, flags: u16) -> std::io::Result<()> {
        let fd = self.nl.as_fd();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = 1;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        sys::send_all(fd, &out)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = sys::recv_into(fd, &mut buf)?;
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..n])
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            if let NetlinkPayload::Error(e) = m.payload {
                return match e.code {
                    Some(code) => Err(std::io::Error::from_raw_os_error(-code.get())),
                    None => Ok(()),
                };
            }
        }
    }

    /// Removes the rule, then the route (each tried even if the other
    /// fails); the first failure is returned.
    fn remove(&mut self) -> std::io::Result<()> {
        let rule = match std::mem::take(&mut self.rule_added) {
            true => self.exchange(RouteNetlinkMessage::DelRule(self.rule()), 0),
            false => Ok(()),
        };
        let route = match std::mem::take(&mut self.route_added) {
            true => self.exchange(RouteNetlinkMessage::DelRoute(self.route()), 0),
            false => Ok(()),
        };
        rule.and(route)
    }
}

impl Drop for LocalRoute {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(
                table = self.table,
                "cannot remove the local route of a forged FIN ({e}); it matches only mark {:#x}",
                self.table
            );
        }
    }
}
