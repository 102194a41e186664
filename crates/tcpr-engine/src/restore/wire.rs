//! Packets the engine forges, built and checksummed by `etherparse` (pure:
//! no syscalls, no unsafe). Today one packet: the peer's FIN|ACK that a
//! restore replays into a half-closed socket (DESIGN.md, restore step 7).
#![forbid(unsafe_code)]

use etherparse::PacketBuilder;
use std::net::{IpAddr, SocketAddr};

/// Hop limit of forged packets: they only travel the loopback path.
const FORGED_HOP_LIMIT: u8 = 64;

/// The family a flow's packets have on the wire: an `AF_INET6` socket with
/// IPv4-mapped addresses (`::ffff:a.b.c.d`, a dual-stack server's IPv4
/// client) sends and receives IPv4 packets.
pub(crate) fn wire_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// A flow's end as its packets carry it (see [`wire_ip`]).
pub(crate) fn wire_addr(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(wire_ip(a.ip()), a.port())
}

/// What the forged FIN|ACK carries. It has no TCP options: no valid
/// timestamp value of the peer is known, and a segment without one is
/// accepted (RFC 7323 §3.2 lets a receiver take it; Linux does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerFin {
    /// The peer's address and port (the packet's source).
    pub(crate) from: SocketAddr,
    /// Our address and port (the packet's destination).
    pub(crate) to: SocketAddr,
    /// The FIN's sequence number: the restored socket's rcv_nxt.
    pub(crate) seq: u32,
    /// Our snd_una at delivery: an older ACK draws a challenge ACK and the
    /// segment is dropped (RFC 5961 §5.2).
    pub(crate) ack: u32,
    /// The peer's window, already scaled down by its window shift.
    pub(crate) window: u16,
}

/// Why a FIN could not be built.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WireError {
    /// The two ends are of different families on the wire.
    MixedFamilies,
}

impl PeerFin {
    /// The IP packet (IPv4 or IPv6 header included, both checksums set),
    /// in the family the flow has on the wire.
    pub(crate) fn packet(&self) -> Result<Vec<u8>, WireError> {
        let (from, to) = (wire_addr(self.from), wire_addr(self.to));
        let ip = match (from.ip(), to.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                PacketBuilder::ipv4(s.octets(), d.octets(), FORGED_HOP_LIMIT)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                PacketBuilder::ipv6(s.octets(), d.octets(), FORGED_HOP_LIMIT)
            }
            _ => return Err(WireError::MixedFamilies),
        };
        let builder = ip
            .tcp(from.port(), to.port(), self.seq, self.window)
            .ack(self.ack)
            .fin();
        let mut out = Vec::with_capacity(builder.size(0));
        builder
            .write(&mut out, &[])
            .expect("writing a header-only packet to a Vec cannot fail");
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn fin(from: &str, to: &str) -> PeerFin {
        PeerFin {
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
            seq: 7,
            ack: 9,
            window: 100,
        }
    }

    /// Parses `p` back (checksums verified independently of the builder)
    /// and returns (ip version, tcp header).
    fn parse(p: &[u8]) -> (u8, etherparse::TcpHeader) {
        let s = SlicedPacket::from_ip(p).unwrap();
        let (version, pseudo_ok) = match s.net.unwrap() {
            NetSlice::Ipv4(v4) => {
                let h = v4.header().to_header();
                assert_eq!(h.header_checksum, h.calc_header_checksum());
                let Some(TransportSlice::Tcp(t)) = &s.transport else {
                    panic!("not TCP")
                };
                let t = t.to_header();
                let sum = t.calc_checksum_ipv4(&h, &[]).expect("checksum computable");
                (4, sum == t.checksum)
            }
            NetSlice::Ipv6(v6) => {
                let h = v6.header().to_header();
                let Some(TransportSlice::Tcp(t)) = &s.transport else {
                    panic!("not TCP")
                };
                let t = t.to_header();
                let sum = t.calc_checksum_ipv6(&h, &[]).expect("checksum computable");
                (6, sum == t.checksum)
            }
            _ => panic!("not IP"),
        };
        assert!(pseudo_ok, "TCP checksum");
        let Some(TransportSlice::Tcp(t)) = s.transport else {
            panic!("not TCP")
        };
        (version, t.to_header())
    }

    #[test]
    fn ipv4_fin_has_valid_checksums_and_flags() {
        let p = fin("10.0.0.2:5000", "10.0.0.1:80").packet().unwrap();
        assert_eq!(p.len(), 40);
        let (v, t) = parse(&p);
        assert_eq!(v, 4);
        assert!(t.fin && t.ack && !t.syn && !t.rst && !t.psh);
        assert_eq!((t.source_port, t.destination_port), (5000, 80));
        assert_eq!((t.sequence_number, t.acknowledgment_number), (7, 9));
        assert_eq!(t.window_size, 100);
        assert_eq!(t.header_len(), 20, "no options");
    }

    #[test]
    fn ipv6_fin_has_valid_checksums() {
        let p = fin("[fd00::2]:5000", "[fd00::1]:80").packet().unwrap();
        assert_eq!(p.len(), 60);
        assert_eq!(parse(&p).0, 6);
    }

    #[test]
    fn mapped_flow_goes_out_as_ipv4() {
        let p = fin("[::ffff:10.0.0.2]:5000", "[::ffff:10.0.0.1]:80")
            .packet()
            .unwrap();
        assert_eq!(parse(&p).0, 4);
        assert_eq!(&p[12..20], &[10, 0, 0, 2, 10, 0, 0, 1]);
    }

    #[test]
    fn mixed_families_are_refused() {
        assert_eq!(
            fin("[fd00::2]:5000", "10.0.0.1:80").packet(),
            Err(WireError::MixedFamilies)
        );
    }
}
