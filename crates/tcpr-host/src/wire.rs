//! Packet formats the host sends after an address moved here, built with
//! `etherparse` (no I/O, no `unsafe`): the gratuitous ARP announcement and
//! the unsolicited IPv6 neighbour advertisement.

use etherparse::icmpv6::{NdpOptionType, NeighborAdvertisementHeader};
use etherparse::{
    ArpEthIpv4Packet, ArpOperation, EtherType, Ethernet2Header, Icmpv6Header, Icmpv6Type,
};
use std::net::{Ipv4Addr, Ipv6Addr};

/// An Ethernet (MAC) address.
pub type Mac = [u8; 6];

/// The Ethernet broadcast address.
pub const BROADCAST: Mac = [0xff; 6];

/// The IPv6 all-nodes link-local multicast group (RFC 4291 §2.7.1), where
/// an unsolicited neighbour advertisement goes (RFC 4861 §7.2.6).
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The Ethernet frame of an ARP announcement (RFC 5227 §3): a broadcast
/// ARP request whose sender and target protocol addresses are both `ip`,
/// with the target hardware address zero, so that every neighbour updates
/// its cache entry for `ip` to `mac`.
pub fn arp_announcement(mac: Mac, ip: Ipv4Addr) -> Vec<u8> {
    let eth = Ethernet2Header {
        source: mac,
        destination: BROADCAST,
        ether_type: EtherType::ARP,
    };
    let arp = ArpEthIpv4Packet {
        operation: ArpOperation::REQUEST,
        sender_mac: mac,
        sender_ipv4: ip.octets(),
        target_mac: [0; 6],
        target_ipv4: ip.octets(),
    };
    let mut frame = Vec::with_capacity(Ethernet2Header::LEN + ArpEthIpv4Packet::LEN);
    frame.extend_from_slice(&eth.to_bytes());
    frame.extend_from_slice(&arp.to_bytes());
    frame
}

/// The ICMPv6 message (no IP header) of an unsolicited neighbour
/// advertisement (RFC 4861 §4.4, §7.2.6) for `ip`, sent from `ip` to
/// [`ALL_NODES`]: Override set and Solicited clear, with a target
/// link-layer address option carrying `mac`, so that neighbours replace
/// their cached address at once. The checksum covers the IPv6 pseudo
/// header of that source and destination.
pub fn neighbour_advertisement(mac: Mac, ip: Ipv6Addr) -> Vec<u8> {
    /// Option length in units of 8 octets: type, length and a MAC.
    const MAC_OPTION_UNITS: u8 = 1;
    let mut payload = Vec::with_capacity(16 + 8);
    payload.extend_from_slice(&ip.octets());
    payload.push(NdpOptionType::TARGET_LINK_LAYER_ADDRESS.0);
    payload.push(MAC_OPTION_UNITS);
    payload.extend_from_slice(&mac);
    let na = Icmpv6Type::NeighborAdvertisement(NeighborAdvertisementHeader {
        router: false,
        solicited: false,
        r#override: true,
    });
    let header = Icmpv6Header::with_checksum(na, ip.octets(), ALL_NODES.octets(), &payload)
        .expect("a 24-byte payload is far below the ICMPv6 length limit");
    let mut msg = Vec::with_capacity(header.header_len() + payload.len());
    msg.extend_from_slice(&header.to_bytes());
    msg.extend_from_slice(&payload);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::icmpv6::TargetLinkLayerAddressOptionSlice;
    use etherparse::{ArpPacket, Icmpv6Slice};

    const MAC: Mac = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];

    #[test]
    fn arp_announcement_is_a_broadcast_request_for_itself() {
        let ip = Ipv4Addr::new(192, 0, 2, 7);
        let frame = arp_announcement(MAC, ip);
        let (eth, rest) = Ethernet2Header::from_slice(&frame).unwrap();
        assert_eq!(eth.destination, BROADCAST);
        assert_eq!(eth.source, MAC);
        assert_eq!(eth.ether_type, EtherType::ARP);
        let arp = ArpPacket::from_slice(rest).unwrap().try_eth_ipv4().unwrap();
        assert_eq!(arp.operation, ArpOperation::REQUEST);
        assert_eq!(arp.sender_mac, MAC);
        assert_eq!(arp.sender_ipv4_addr(), ip);
        assert_eq!(arp.target_ipv4_addr(), ip);
        assert_eq!(arp.target_mac, [0; 6]);
        // The exact bytes of RFC 826's layout: Ethernet, IPv4, lengths 6 and 4.
        assert_eq!(&rest[..8], &[0, 1, 0x08, 0, 6, 4, 0, 1]);
        assert_eq!(frame.len(), 42);
    }

    #[test]
    fn neighbour_advertisement_overrides_with_our_mac_and_a_valid_checksum() {
        let ip: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let msg = neighbour_advertisement(MAC, ip);
        let icmp = Icmpv6Slice::from_slice(&msg).unwrap();
        assert_eq!(
            icmp.icmp_type(),
            Icmpv6Type::NeighborAdvertisement(NeighborAdvertisementHeader {
                router: false,
                solicited: false,
                r#override: true,
            })
        );
        assert!(icmp.is_checksum_valid(ip.octets(), ALL_NODES.octets()));
        let payload = icmp.payload();
        assert_eq!(&payload[..16], &ip.octets());
        let opt = TargetLinkLayerAddressOptionSlice::from_slice(&payload[16..]).unwrap();
        assert_eq!(opt.link_layer_address(), &MAC);
        // Type 136, code 0, then the R|S|O byte: only Override (0x20).
        assert_eq!((msg[0], msg[1], msg[4]), (136, 0, 0x20));
        assert_eq!(msg.len(), 32);
    }
}
