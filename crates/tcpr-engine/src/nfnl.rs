//! nf_tables set elements over netlink: the lock's fast path.
//!
//! Once the `inet tcpr` table exists, locking and releasing flows only adds
//! and deletes set elements. Doing that by running `nft` costs a process
//! start and libnftables' cache load (about 5 ms) per call, which was most
//! of the cost of freezing one connection. This module speaks the few
//! nf_tables messages it needs (a batch of NEWSETELEM / DELSETELEM) on a
//! netlink socket instead. It is written by hand because the crates that
//! cover nf_tables are either GPL-3.0 (rustables, not usable in this
//! Apache-2.0 project) or bind the C libnftnl; the messages are small and
//! fixed. Installing the table and rules still goes through `nft`
//! (`lock.rs`), once per namespace.

use crate::sys;
// The netlink constants come from the crate the rest of our netlink code
// (sock_diag, rtnetlink) is built on; only nf_tables' own numbers are here.
use netlink_packet_core::{NLA_F_NESTED, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST};
use std::os::fd::{AsFd, BorrowedFd};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_DATA_VALUE: u16 = 1;

const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;

/// An attribute's length is a u16: elements go in messages of at most this
/// many bytes, all in one batch (one transaction).
const MAX_ELEMENTS_BYTES: usize = 60_000;

/// A released element: it expires after this many milliseconds (the
/// shortest expiry; the kernel rounds it up to the next jiffy). An
/// expiration of 0 would mean the whole timeout.
const EXPIRED_EXPIRATION_MS: u64 = 1;

/// The timeout written with it (at least the expiration).
const EXPIRED_TIMEOUT_MS: u64 = 1000;

/// The netlink header (`struct nlmsghdr`) and the nfnetlink one
/// (`struct nfgenmsg`).
const NLMSG_HDR_BYTES: usize = 16;

/// An acknowledgement or error: the header, then the errno (`struct nlmsgerr`).
const NLMSG_ERROR_BYTES: usize = NLMSG_HDR_BYTES + 4;

/// The receive buffer for the kernel's answers.
const RECV_BUFFER_BYTES: usize = 64 * 1024;

/// Room beyond a batch that the socket's send buffer must have.
const SEND_BUFFER_SLACK_BYTES: usize = 4096;

/// How long to wait for the kernel's answer.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What to do with a flow's element.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    /// Add it, expiring after this many milliseconds.
    Add(u64),
    /// Add it or update it, expiring in [`EXPIRED_EXPIRATION_MS`] (Linux
    /// 6.10+ updates the expiry of an existing element; older kernels leave
    /// it unchanged). Unlike a delete, this commits without waiting for an RCU grace
    /// period (10-30 ms).
    Expire,
    /// Delete it (it must exist in the transaction).
    Delete,
}

/// One nf_tables transaction under construction.
pub(crate) struct Batch {
    buf: Vec<u8>,
    seq: u32,
    acks: usize,
}

fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Opens a nested attribute; [`end_nest`] writes its length.
fn begin_nest(buf: &mut Vec<u8>, ty: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    at
}

fn end_nest(buf: &mut [u8], at: usize) {
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

impl Batch {
    pub(crate) fn new() -> Batch {
        let mut b = Batch {
            buf: Vec::new(),
            seq: 1,
            acks: 0,
        };
        b.control(NFNL_MSG_BATCH_BEGIN);
        b
    }

    /// Starts a message: nlmsghdr and nfgenmsg. Returns its offset.
    fn header(&mut self, ty: u16, flags: u16, family: u8, res_id: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]); // length, written by `end`
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.seq += 1;
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u32;
        self.buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn control(&mut self, ty: u16) {
        let at = self.header(ty, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        self.end(at);
    }

    /// Adds or deletes the elements with `keys` (laid out as the set's
    /// type; see `Flow::key`) in `table`'s set `set`.
    pub(crate) fn elements(&mut self, table: &str, set: &str, keys: &[Vec<u8>], op: Op) {
        let (ty, flags) = match op {
            Op::Add(_) | Op::Expire => {
                (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK)
            }
            Op::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
        };
        let mut rest = keys;
        while !rest.is_empty() {
            let msg = self.header(NFNL_SUBSYS_NFTABLES << 8 | ty, flags, NFPROTO_INET, 0);
            put_attr(&mut self.buf, NFTA_SET_ELEM_LIST_TABLE, &nul(table));
            put_attr(&mut self.buf, NFTA_SET_ELEM_LIST_SET, &nul(set));
            let list = begin_nest(&mut self.buf, NFTA_SET_ELEM_LIST_ELEMENTS);
            while let Some((key, more)) = rest.split_first() {
                if self.buf.len() - list > MAX_ELEMENTS_BYTES {
                    break;
                }
                let el = begin_nest(&mut self.buf, NFTA_LIST_ELEM);
                let k = begin_nest(&mut self.buf, NFTA_SET_ELEM_KEY);
                put_attr(&mut self.buf, NFTA_DATA_VALUE, key);
                end_nest(&mut self.buf, k);
                match op {
                    Op::Add(ms) => {
                        // The expiration too: updating an element that a
                        // release just expired must renew it.
                        put_attr(&mut self.buf, NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
                        put_attr(&mut self.buf, NFTA_SET_ELEM_EXPIRATION, &ms.to_be_bytes());
                    }
                    Op::Expire => {
                        let timeout = EXPIRED_TIMEOUT_MS.to_be_bytes();
                        let expiration = EXPIRED_EXPIRATION_MS.to_be_bytes();
                        put_attr(&mut self.buf, NFTA_SET_ELEM_TIMEOUT, &timeout);
                        put_attr(&mut self.buf, NFTA_SET_ELEM_EXPIRATION, &expiration);
                    }
                    Op::Delete => {}
                }
                end_nest(&mut self.buf, el);
                rest = more;
            }
            end_nest(&mut self.buf, list);
            self.end(msg);
            self.acks += 1;
        }
    }

    /// The whole batch, and how many acknowledgements it asks for.
    pub(crate) fn finish(mut self) -> (Vec<u8>, usize) {
        self.control(NFNL_MSG_BATCH_END);
        (self.buf, self.acks)
    }
}

fn nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Why a transaction failed.
#[derive(Debug)]
pub(crate) enum NlError {
    /// The kernel refused a message (errno).
    Refused(i32),
    /// The socket failed.
    Io(std::io::Error),
}

/// Sends a batch in the namespace `ns` (the caller's when `None`) and waits
/// for every acknowledgement.
pub(crate) fn commit(ns: Option<BorrowedFd<'_>>, batch: Batch) -> Result<(), NlError> {
    let (msg, acks) = batch.finish();
    if acks == 0 {
        return Ok(());
    }
    exchange(ns, &msg, acks).map(drop)
}

/// Whether the `inet` table `table` exists in the caller's namespace.
pub(crate) fn table_exists(table: &str) -> Result<bool, NlError> {
    exists(None, NFT_MSG_GETTABLE, |buf| {
        put_attr(buf, NFTA_TABLE_NAME, &nul(table))
    })
}

/// Whether the element with `key` is in `table`'s set `set` and not expired.
pub(crate) fn element_present(
    ns: Option<BorrowedFd<'_>>,
    table: &str,
    set: &str,
    key: &[u8],
) -> Result<bool, NlError> {
    exists(ns, NFT_MSG_GETSETELEM, |buf| {
        put_attr(buf, NFTA_SET_ELEM_LIST_TABLE, &nul(table));
        put_attr(buf, NFTA_SET_ELEM_LIST_SET, &nul(set));
        let list = begin_nest(buf, NFTA_SET_ELEM_LIST_ELEMENTS);
        let el = begin_nest(buf, NFTA_LIST_ELEM);
        let k = begin_nest(buf, NFTA_SET_ELEM_KEY);
        put_attr(buf, NFTA_DATA_VALUE, key);
        end_nest(buf, k);
        end_nest(buf, el);
        end_nest(buf, list);
    })
}

/// Sends one GET message of type `ty` (attributes written by `attrs`) on
/// its own (a GET is not a batch message): whether the object exists.
fn exists(
    ns: Option<BorrowedFd<'_>>,
    ty: u16,
    attrs: impl FnOnce(&mut Vec<u8>),
) -> Result<bool, NlError> {
    let mut b = Batch {
        buf: Vec::new(),
        seq: 1,
        acks: 0,
    };
    let msg = b.header(
        NFNL_SUBSYS_NFTABLES << 8 | ty,
        NLM_F_REQUEST | NLM_F_ACK,
        NFPROTO_INET,
        0,
    );
    attrs(&mut b.buf);
    b.end(msg);
    match exchange(ns, &b.buf, 1) {
        Ok(data) => Ok(data > 0),
        Err(NlError::Refused(libc::ENOENT)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sends `msg` and reads until `acks` acknowledgements came; returns how
/// many other (data) messages arrived on the way.
fn exchange(ns: Option<BorrowedFd<'_>>, msg: &[u8], acks: usize) -> Result<usize, NlError> {
    let nl = sys::netlink_socket_in(ns, NETLINK_NETFILTER).map_err(NlError::Io)?;
    let fd = nl.as_fd();
    // Errors need not echo our (large) messages back.
    let _ = sys::set_int(fd, SOL_NETLINK, NETLINK_CAP_ACK, 1);
    // A netlink datagram must fit the socket's send buffer.
    let want = i32::try_from(msg.len() + SEND_BUFFER_SLACK_BYTES).unwrap_or(i32::MAX / 2);
    if sys::get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0) < want {
        let _ = sys::set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want)
            .or_else(|_| sys::set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, want));
    }
    sys::set_recv_timeout(fd, ANSWER_TIMEOUT).map_err(NlError::Io)?;
    sys::send_all(fd, msg).map_err(NlError::Io)?;
    let mut buf = vec![0u8; RECV_BUFFER_BYTES];
    let mut seen = 0;
    let mut data = 0;
    while seen < acks {
        let n = sys::recv_into(fd, &mut buf).map_err(NlError::Io)?;
        let mut at = 0;
        while at + NLMSG_ERROR_BYTES <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
            if len < NLMSG_HDR_BYTES || at + len > n {
                break;
            }
            if ty == NLMSG_ERROR {
                let errno_at = at + NLMSG_HDR_BYTES;
                let err =
                    i32::from_ne_bytes(buf[errno_at..errno_at + 4].try_into().expect("4 bytes"));
                if err != 0 {
                    return Err(NlError::Refused(-err));
                }
                seen += 1;
            } else {
                data += 1;
            }
            at += len.next_multiple_of(4);
        }
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_batches_split_into_messages_under_the_attribute_limit() {
        // IPv6 keys: two addresses and two padded ports.
        let keys: Vec<Vec<u8>> = (0..5000u32)
            .map(|i| {
                let mut k = vec![0u8; 40];
                k[..4].copy_from_slice(&i.to_be_bytes());
                k
            })
            .collect();
        let mut b = Batch::new();
        b.elements("tcpr", "flows6", &keys, Op::Add(60_000));
        let (buf, acks) = b.finish();
        assert!(acks > 1, "split into {acks} messages");
        // Walk the messages: every length fits, and they tile the buffer.
        let mut at = 0;
        let mut msgs = 0;
        while at < buf.len() {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            assert!((20..65_536).contains(&len), "message of {len} bytes");
            at += len;
            msgs += 1;
        }
        assert_eq!(at, buf.len());
        assert_eq!(msgs, acks + 2, "begin, {acks} element messages, end");
    }
}
