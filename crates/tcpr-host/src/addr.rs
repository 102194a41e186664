//! Service addresses over rtnetlink: find which interface holds an address,
//! add and remove it, and find the interface towards a destination. These
//! are the `ip addr` / `ip route get` steps of an address move; as
//! processes they cost 1-2 ms each, on the path of every moved connection's
//! pause. Messages come from `netlink-packet-route`; the socket is ours.

use crate::sys;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::time::Duration;

const NETLINK_ROUTE: i32 = libc::NETLINK_ROUTE;
/// How long a request waits for the kernel's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// One read of answers: the kernel fills up to a page per message of a
/// dump; 64 KiB holds many.
const RECV_BUFFER: usize = 64 * 1024;

/// What went wrong in an address operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel refused or failed.
    #[error("cannot {what}: {source}")]
    Kernel {
        /// What tcpr was doing.
        what: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
    /// The kernel refused for want of privilege.
    #[error("cannot {what}: operation not permitted (CAP_NET_ADMIN over the network namespace is needed)")]
    Permission {
        /// What tcpr was doing.
        what: &'static str,
    },
    /// The address, interface or route asked for is not on this host.
    #[error("{0}")]
    NotFound(String),
}

impl Error {
    fn kernel(what: &'static str, source: io::Error) -> Error {
        if sys::raw_os_error(&source) == Some(libc::EPERM) {
            return Error::Permission { what };
        }
        Error::Kernel { what, source }
    }
}

/// An address as assigned to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assigned {
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The interface's index.
    pub ifindex: u32,
    /// The interface's name.
    pub ifname: String,
}

impl Assigned {
    /// `addr/prefix`, as `ip` writes it.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.ip, self.prefix_len)
    }
}

fn kernel(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::kernel(what, e)
}

/// Sends one request and collects the answers: until DONE for a dump,
/// until the acknowledgement otherwise.
fn request(msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>, Error> {
    let nl = sys::netlink_socket(NETLINK_ROUTE).map_err(kernel("open rtnetlink"))?;
    let fd = nl.as_fd();
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    packet.finalize();
    let mut out = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut out);
    sys::set_recv_timeout(fd, ANSWER_TIMEOUT).map_err(kernel("set an rtnetlink timeout"))?;
    sys::send_all(fd, &out).map_err(kernel("send to rtnetlink"))?;
    let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let mut got = Vec::new();
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let n = sys::recv_into(fd, &mut buf).map_err(kernel("read rtnetlink"))?;
        let mut at = 0;
        while at < n {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[at..n])
                .map_err(|e| Error::kernel("parse rtnetlink", io::Error::other(e.to_string())))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::InnerMessage(i) => got.push(i),
                NetlinkPayload::Done(_) => return Ok(got),
                NetlinkPayload::Error(e) => match e.code {
                    Some(code) => {
                        return Err(Error::kernel(
                            "rtnetlink request",
                            io::Error::from_raw_os_error(-code.get()),
                        ))
                    }
                    None if !dump => return Ok(got),
                    None => {}
                },
                _ => {}
            }
            if len == 0 {
                break;
            }
            // Messages of a datagram are aligned to 4 bytes (NLMSG_ALIGN).
            at += (len + 3) & !3;
        }
    }
}

/// Where `ip` is assigned on this host (the caller's namespace).
pub fn find(ip: IpAddr) -> Result<Assigned, Error> {
    let mut q = AddressMessage::default();
    q.header.family = family(ip);
    for m in request(RouteNetlinkMessage::GetAddress(q), NLM_F_DUMP)? {
        let RouteNetlinkMessage::NewAddress(a) = m else {
            continue;
        };
        // IPv4 names the address IFA_LOCAL (IFA_ADDRESS may be a peer's);
        // IPv6 has only IFA_ADDRESS.
        let holds = a.attributes.iter().any(|at| match at {
            AddressAttribute::Local(x) => *x == ip,
            AddressAttribute::Address(x) => ip.is_ipv6() && *x == ip,
            _ => false,
        });
        if holds {
            let ifname = sys::if_name(a.header.index).map_err(kernel("name the interface"))?;
            return Ok(Assigned {
                ip,
                prefix_len: a.header.prefix_len,
                ifindex: a.header.index,
                ifname,
            });
        }
    }
    Err(Error::NotFound(format!(
        "{ip} is not assigned on this host"
    )))
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn message(a: &Assigned) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(a.ip);
    m.header.prefix_len = a.prefix_len;
    m.header.index = a.ifindex;
    m.header.scope = AddressScope::Universe;
    if a.ip.is_ipv6() {
        // Usable at once: duplicate detection would hold it tentative.
        m.header.flags = AddressHeaderFlags::Nodad;
    } else {
        m.attributes.push(AddressAttribute::Local(a.ip));
    }
    m.attributes.push(AddressAttribute::Address(a.ip));
    m
}

/// Assigns an address; one that is already there is not an error.
pub fn add(a: &Assigned) -> Result<(), Error> {
    match request(
        RouteNetlinkMessage::NewAddress(message(a)),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Err(Error::Kernel { ref source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
            Ok(())
        }
        r => r.map(drop),
    }
}

/// Removes an address.
pub fn remove(a: &Assigned) -> Result<(), Error> {
    request(RouteNetlinkMessage::DelAddress(message(a)), NLM_F_ACK).map(drop)
}

/// The interface of the route towards `ip` (as `ip route get`).
pub fn route_interface(ip: IpAddr) -> Result<(u32, String), Error> {
    let mut q = RouteMessage::default();
    q.header.address_family = family(ip);
    q.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
    q.attributes.push(RouteAttribute::Destination(match ip {
        IpAddr::V4(v) => RouteAddress::Inet(v),
        IpAddr::V6(v) => RouteAddress::Inet6(v),
    }));
    for m in request(RouteNetlinkMessage::GetRoute(q), NLM_F_ACK)? {
        if let RouteNetlinkMessage::NewRoute(r) = m {
            for at in r.attributes {
                if let RouteAttribute::Oif(i) = at {
                    let name = sys::if_name(i).map_err(kernel("name the interface"))?;
                    return Ok((i, name));
                }
            }
        }
    }
    Err(Error::NotFound(format!("no route to {ip}")))
}

/// The index of interface `name`.
pub fn interface_index(name: &str) -> Result<u32, Error> {
    sys::if_index(name).map_err(|e| Error::NotFound(format!("no interface {name}: {e}")))
}
