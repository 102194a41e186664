//! The nf_tables rules `nft` (1.0.6, this project's machines) cannot
//! write: a dynamic update (or delete) of the IPv6 flow map. Its key is one 36-byte
//! load (`@nh,64,288`), and nft places the map value (`meta mark`) in the
//! second 16-byte register, inside the key it just loaded: the update
//! would look up a corrupted key and never renew the flow's entry
//! (`nft --debug=netlink` shows `payload load 36b => reg 1`, `meta load
//! mark => reg 2`). Written here over nf_tables netlink with registers
//! that do not overlap: the key in the 32-bit registers 0-8, the value in
//! register 9.
//!
//! ```text
//! NEWRULE netdev TABLE CHAIN (appended):
//!   payload load 36b @ network header + 8 => reg32 0
//!   meta load mark => reg32 9
//!   dynset update reg_key reg32 0 set SET sreg_data reg32 9 timeout T
//!     (or: dynset delete reg_key reg32 0 set SET sreg_data reg32 9)
//! ```
//! A delete from a map needs a data register too (nf_tables refuses a
//! map's dynset without one, EINVAL), though it only reads the key.
//! Elements themselves go through [`tcpr_host::nfnl`]; [`count`] counts a
//! set's live elements with one GETSETELEM dump (the steering gauge), and
//! [`elements`] reads them back (a takeover's backends and owner).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;
use tcpr_host::sock;

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
/// The netlink header and the nfgenmsg after it.
const NFNL_HDR_BYTES: usize = NLMSG_HDR_BYTES + 4;
/// A dump answer's datagrams: the kernel fills up to this much.
const DUMP_BUFFER_BYTES: usize = 256 * 1024;
const NFPROTO_NETDEV: u8 = 5;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDR_BYTES: usize = 16;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_MARK: u32 = 3;
const NFTA_DYNSET_SET_NAME: u16 = 1;
const NFTA_DYNSET_OP: u16 = 3;
const NFTA_DYNSET_SREG_KEY: u16 = 4;
const NFTA_DYNSET_SREG_DATA: u16 = 5;
const NFTA_DYNSET_TIMEOUT: u16 = 6;
const NFT_DYNSET_OP_UPDATE: u32 = 1;
const NFT_DYNSET_OP_DELETE: u32 = 2;
/// `NFT_REG32_00`: the first 32-bit register.
const REG32_00: u32 = 8;
/// The IPv6 key: source and destination address and the two ports.
pub(crate) const KEY6_OFFSET: u32 = 8;
pub(crate) const KEY6_BYTES: u32 = 36;
/// The value's register: right after the key's nine.
const VALUE_REG: u32 = REG32_00 + KEY6_BYTES / 4;
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
const RECV_BUFFER_BYTES: usize = 16 * 1024;

/// What a [`FlowRule`] does to the packet's flow entry.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FlowOp {
    /// Renews it to expire this long from now.
    Renew { timeout: Duration },
    /// Removes it.
    Delete,
}

/// A rule that applies `op` to the IPv6 flow's entry in the map `set`,
/// appended to `chain` of the netdev table `table`.
pub(crate) struct FlowRule<'a> {
    pub(crate) table: &'a str,
    pub(crate) chain: &'a str,
    pub(crate) set: &'a str,
    pub(crate) op: FlowOp,
}

fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn nested(buf: &mut Vec<u8>, ty: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    inner(buf);
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn text(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn expr(buf: &mut Vec<u8>, name: &str, data: impl FnOnce(&mut Vec<u8>)) {
    nested(buf, NFTA_LIST_ELEM, |b| {
        attr(b, NFTA_EXPR_NAME, &text(name));
        nested(b, NFTA_EXPR_DATA, data);
    });
}

/// One netlink message: header, nfgenmsg, attributes.
fn message(
    buf: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    family: u8,
    seq: u32,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
    body(buf);
    let len = (buf.len() - at) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
}

/// The batch that appends `rules` (one transaction).
fn batch(rules: &[FlowRule<'_>]) -> Vec<u8> {
    let mut buf = Vec::new();
    message(&mut buf, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, 1, |_| {});
    for (i, r) in rules.iter().enumerate() {
        let ty = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE;
        let flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK;
        message(&mut buf, ty, flags, NFPROTO_NETDEV, 2 + i as u32, |b| {
            attr(b, NFTA_RULE_TABLE, &text(r.table));
            attr(b, NFTA_RULE_CHAIN, &text(r.chain));
            nested(b, NFTA_RULE_EXPRESSIONS, |b| {
                expr(b, "payload", |b| {
                    attr(b, NFTA_PAYLOAD_DREG, &REG32_00.to_be_bytes());
                    attr(
                        b,
                        NFTA_PAYLOAD_BASE,
                        &NFT_PAYLOAD_NETWORK_HEADER.to_be_bytes(),
                    );
                    attr(b, NFTA_PAYLOAD_OFFSET, &KEY6_OFFSET.to_be_bytes());
                    attr(b, NFTA_PAYLOAD_LEN, &KEY6_BYTES.to_be_bytes());
                });
                expr(b, "meta", |b| {
                    attr(b, NFTA_META_DREG, &VALUE_REG.to_be_bytes());
                    attr(b, NFTA_META_KEY, &NFT_META_MARK.to_be_bytes());
                });
                expr(b, "dynset", |b| {
                    attr(b, NFTA_DYNSET_SET_NAME, &text(r.set));
                    let op = match r.op {
                        FlowOp::Renew { .. } => NFT_DYNSET_OP_UPDATE,
                        FlowOp::Delete => NFT_DYNSET_OP_DELETE,
                    };
                    attr(b, NFTA_DYNSET_OP, &op.to_be_bytes());
                    attr(b, NFTA_DYNSET_SREG_KEY, &REG32_00.to_be_bytes());
                    attr(b, NFTA_DYNSET_SREG_DATA, &VALUE_REG.to_be_bytes());
                    if let FlowOp::Renew { timeout } = r.op {
                        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                        attr(b, NFTA_DYNSET_TIMEOUT, &ms.to_be_bytes());
                    }
                });
            });
        });
    }
    let end = 2 + rules.len() as u32;
    message(&mut buf, NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, end, |_| {});
    buf
}

/// Appends `rules` in one transaction in the namespace `ns` (the calling
/// thread's when `None`) and waits for the kernel's answer to each.
pub(crate) fn append(ns: Option<BorrowedFd<'_>>, rules: &[FlowRule<'_>]) -> io::Result<()> {
    let nl = sock::netlink_socket_in(ns, NETLINK_NETFILTER)?;
    let fd = nl.as_fd();
    sock::set_recv_timeout(fd, ANSWER_TIMEOUT)?;
    sock::send_all(fd, &batch(rules))?;
    let mut buf = vec![0u8; RECV_BUFFER_BYTES];
    let mut acks = 0;
    while acks < rules.len() {
        let n = sock::recv_into(fd, &mut buf)?;
        let mut at = 0;
        while at + NLMSG_HDR_BYTES + 4 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
            if len < NLMSG_HDR_BYTES || at + len > n {
                break;
            }
            if ty == NLMSG_ERROR {
                let e = at + NLMSG_HDR_BYTES;
                let errno = i32::from_ne_bytes(buf[e..e + 4].try_into().expect("4 bytes"));
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                acks += 1;
            }
            at += len.next_multiple_of(4);
        }
    }
    Ok(())
}

/// The attributes in `buf` as (type without flags, payload).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((ty, payload))
    })
}

/// One element of a set or map as a dump answers it: its key and, for a
/// map, its value (`NFTA_DATA_VALUE` bytes).
pub(crate) type DumpedElement = (Vec<u8>, Option<Vec<u8>>);

/// The `NFTA_DATA_VALUE` inside a nested `NFTA_DATA` attribute.
fn data_value(nested: &[u8]) -> Option<Vec<u8>> {
    attributes(nested)
        .find(|(ty, _)| *ty == NFTA_DATA_VALUE)
        .map(|(_, v)| v.to_vec())
}

/// Passes each element (the attributes of one `NFTA_LIST_ELEM`) of the
/// NEWSETELEM messages of a dump datagram to `visit`; `None` once the
/// dump is done.
fn visit_datagram(buf: &[u8], visit: &mut impl FnMut(&[u8])) -> io::Result<Option<()>> {
    let mut at = 0;
    while at + NLMSG_HDR_BYTES <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
        if len < NLMSG_HDR_BYTES || at + len > buf.len() {
            break;
        }
        match ty {
            NLMSG_DONE => return Ok(None),
            NLMSG_ERROR => {
                let e = at + NLMSG_HDR_BYTES;
                let errno = i32::from_ne_bytes(buf[e..e + 4].try_into().expect("4 bytes"));
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            t if t == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM && len >= NFNL_HDR_BYTES => {
                for (_, list) in attributes(&buf[at + NFNL_HDR_BYTES..at + len])
                    .filter(|(ty, _)| *ty == NFTA_SET_ELEM_LIST_ELEMENTS)
                {
                    for (_, element) in attributes(list) {
                        visit(element);
                    }
                }
            }
            _ => {}
        }
        at += len.next_multiple_of(4);
    }
    Ok(Some(()))
}

/// Dumps the live (not expired) elements of the set `set` of the netdev
/// table `table`, in the namespace `ns` (the calling thread's when
/// `None`), passing each one's attributes to `visit`.
fn dump(
    ns: Option<BorrowedFd<'_>>,
    table: &str,
    set: &str,
    mut visit: impl FnMut(&[u8]),
) -> io::Result<()> {
    let nl = sock::netlink_socket_in(ns, NETLINK_NETFILTER)?;
    let fd = nl.as_fd();
    sock::set_recv_timeout(fd, ANSWER_TIMEOUT)?;
    let mut req = Vec::new();
    let ty = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETSETELEM;
    message(
        &mut req,
        ty,
        NLM_F_REQUEST | NLM_F_DUMP,
        NFPROTO_NETDEV,
        1,
        |b| {
            attr(b, NFTA_SET_ELEM_LIST_TABLE, &text(table));
            attr(b, NFTA_SET_ELEM_LIST_SET, &text(set));
        },
    );
    sock::send_all(fd, &req)?;
    let mut buf = vec![0u8; DUMP_BUFFER_BYTES];
    loop {
        let n = sock::recv_into(fd, &mut buf)?;
        if visit_datagram(&buf[..n], &mut visit)?.is_none() {
            return Ok(());
        }
    }
}

/// The live (not expired) elements of the set `set` of the netdev table
/// `table`, in the namespace `ns` (the calling thread's when `None`).
pub(crate) fn count(ns: Option<BorrowedFd<'_>>, table: &str, set: &str) -> io::Result<usize> {
    let mut n = 0;
    dump(ns, table, set, |_| n += 1)?;
    Ok(n)
}

/// The live elements of the set or map `set` of the netdev table `table`
/// (see [`count`]), with their keys and values.
pub(crate) fn elements(
    ns: Option<BorrowedFd<'_>>,
    table: &str,
    set: &str,
) -> io::Result<Vec<DumpedElement>> {
    let mut found = Vec::new();
    dump(ns, table, set, |element| {
        let (mut key, mut data) = (None, None);
        for (ty, nested) in attributes(element) {
            match ty {
                NFTA_SET_ELEM_KEY => key = data_value(nested),
                NFTA_SET_ELEM_DATA => data = data_value(nested),
                _ => {}
            }
        }
        if let Some(key) = key {
            found.push((key, data));
        }
    })?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch tiles into begin, one rule, end, and the registers do not
    /// overlap: the value's register starts after the key's last byte.
    #[test]
    fn the_value_register_follows_the_key() {
        assert_eq!((VALUE_REG - REG32_00) * 4, KEY6_BYTES);
        let b = batch(&[FlowRule {
            table: "t",
            chain: "c",
            set: "s",
            op: FlowOp::Renew {
                timeout: Duration::from_secs(1),
            },
        }]);
        let mut at = 0;
        let mut types = Vec::new();
        while at < b.len() {
            let len = u32::from_ne_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            types.push(u16::from_ne_bytes(b[at + 4..at + 6].try_into().unwrap()));
            at += len;
        }
        assert_eq!(at, b.len());
        assert_eq!(
            types,
            [
                NFNL_MSG_BATCH_BEGIN,
                NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE,
                NFNL_MSG_BATCH_END
            ]
        );
    }
}
