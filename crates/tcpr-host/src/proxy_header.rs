//! The PROXY protocol header (HAProxy, "The PROXY protocol", versions 1
//! and 2): what a relay writes first to a server that cannot see the
//! client's address itself. Pure: bytes in, bytes out.
//!
//! ```text
//! v1, one text line:
//!   "PROXY TCP4 <client ip> <server ip> <client port> <server port>\r\n"
//!   "PROXY TCP6 ..." for IPv6, "PROXY UNKNOWN\r\n" when the two ends
//!   are of different families; 107 bytes at most.
//! v2, binary, integers big-endian:
//!   12  signature 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
//!   1   version 2 and command PROXY: 0x21
//!   1   address family and transport: 0x11 TCP over IPv4, 0x21 TCP over
//!       IPv6, 0x00 unspecified (mixed families)
//!   2   length of what follows: 12 (IPv4), 36 (IPv6), 0
//!   ..  client address, server address, client port, server port
//! ```
//!
//! IPv4-mapped IPv6 addresses (a dual-stack socket's `::ffff:a.b.c.d`)
//! are written as the IPv4 addresses they are on the wire.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

/// The version of the PROXY protocol a server expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyVersion {
    /// Version 1: one text line.
    V1,
    /// Version 2: binary.
    V2,
}

impl std::str::FromStr for ProxyVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<ProxyVersion, String> {
        match s {
            "v1" | "1" => Ok(ProxyVersion::V1),
            "v2" | "2" => Ok(ProxyVersion::V2),
            _ => Err(format!(
                "unknown PROXY protocol version {s:?}: v1 (text) or v2 (binary)"
            )),
        }
    }
}

/// The v2 signature (spec section 2.2).
pub const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Version 2 (high nibble), command PROXY (low nibble).
const V2_VERSION_PROXY: u8 = 0x21;
/// Address family (high nibble) and transport (low nibble): STREAM.
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;
const V2_UNSPEC: u8 = 0x00;

/// The header announcing a connection from `client` to `server` (the
/// address the client connected to).
pub fn proxy_header(version: ProxyVersion, client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let (src, dst) = (client.ip().to_canonical(), server.ip().to_canonical());
    match version {
        ProxyVersion::V1 => {
            let proto = match (src, dst) {
                (IpAddr::V4(_), IpAddr::V4(_)) => "TCP4",
                (IpAddr::V6(_), IpAddr::V6(_)) => "TCP6",
                _ => return b"PROXY UNKNOWN\r\n".to_vec(),
            };
            format!(
                "PROXY {proto} {src} {dst} {} {}\r\n",
                client.port(),
                server.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut h = V2_SIGNATURE.to_vec();
            h.push(V2_VERSION_PROXY);
            let (family, addresses): (u8, Vec<u8>) = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => (V2_TCP4, [s.octets(), d.octets()].concat()),
                (IpAddr::V6(s), IpAddr::V6(d)) => (V2_TCP6, [s.octets(), d.octets()].concat()),
                _ => (V2_UNSPEC, Vec::new()),
            };
            h.push(family);
            let ports = if family == V2_UNSPEC {
                Vec::new()
            } else {
                [client.port().to_be_bytes(), server.port().to_be_bytes()].concat()
            };
            let len = (addresses.len() + ports.len()) as u16;
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&addresses);
            h.extend_from_slice(&ports);
            h
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The spec's TCP4 example (section 2.1).
    #[test]
    fn v1_ipv4_is_the_spec_line() {
        let h = proxy_header(
            ProxyVersion::V1,
            sa("192.168.0.1:56324"),
            sa("192.168.0.11:443"),
        );
        assert_eq!(h, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
    }

    /// IPv6, and the spec's longest TCP6 line (all 0xff: 104 bytes, within
    /// the 107 a receiver must accept).
    #[test]
    fn v1_ipv6_and_the_longest_line() {
        let h = proxy_header(
            ProxyVersion::V1,
            sa("[2001:db8::1]:40000"),
            sa("[2001:db8::100]:80"),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 2001:db8::100 40000 80\r\n");
        let all = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let h = proxy_header(
            ProxyVersion::V1,
            sa(&format!("[{all}]:65535")),
            sa(&format!("[{all}]:65535")),
        );
        assert_eq!(
            h,
            format!("PROXY TCP6 {all} {all} 65535 65535\r\n").as_bytes()
        );
        assert_eq!(h.len(), 104);
    }

    #[test]
    fn mapped_addresses_are_ipv4_and_mixed_families_unknown() {
        let h = proxy_header(
            ProxyVersion::V1,
            sa("[::ffff:10.0.0.1]:5000"),
            sa("10.0.0.100:80"),
        );
        assert_eq!(h, b"PROXY TCP4 10.0.0.1 10.0.0.100 5000 80\r\n");
        let h = proxy_header(ProxyVersion::V1, sa("10.0.0.1:5000"), sa("[fd00::1]:80"));
        assert_eq!(h, b"PROXY UNKNOWN\r\n");
        let h = proxy_header(ProxyVersion::V2, sa("10.0.0.1:5000"), sa("[fd00::1]:80"));
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
        assert_eq!(h, want);
    }

    /// The v2 layout of spec section 2.2, byte by byte.
    #[test]
    fn v2_ipv4() {
        let h = proxy_header(
            ProxyVersion::V2,
            sa("192.168.0.1:56324"),
            sa("192.168.0.11:443"),
        );
        let want: Vec<u8> = [
            &V2_SIGNATURE[..],
            &[0x21, 0x11, 0x00, 0x0C],
            &[192, 168, 0, 1],
            &[192, 168, 0, 11],
            &56324u16.to_be_bytes(),
            &443u16.to_be_bytes(),
        ]
        .concat();
        assert_eq!(h, want);
        assert_eq!(h.len(), 16 + 12);
        assert_eq!(
            &h[..12],
            b"\r\n\r\n\0\r\nQUIT\n",
            "the signature as the spec spells it"
        );
    }

    #[test]
    fn v2_ipv6() {
        let h = proxy_header(
            ProxyVersion::V2,
            sa("[2001:db8::1]:40000"),
            sa("[2001:db8::100]:80"),
        );
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        src[15] = 1;
        let mut dst = src;
        dst[14] = 1;
        dst[15] = 0;
        let want: Vec<u8> = [
            &V2_SIGNATURE[..],
            &[0x21, 0x21, 0x00, 36],
            &src,
            &dst,
            &40000u16.to_be_bytes(),
            &80u16.to_be_bytes(),
        ]
        .concat();
        assert_eq!(h, want);
    }

    #[test]
    fn versions_parse() {
        assert_eq!("v1".parse::<ProxyVersion>(), Ok(ProxyVersion::V1));
        assert_eq!("v2".parse::<ProxyVersion>(), Ok(ProxyVersion::V2));
        assert!("v3".parse::<ProxyVersion>().is_err());
    }
}
