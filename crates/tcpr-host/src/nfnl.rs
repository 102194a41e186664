//! nf_tables set elements over netlink: adding, updating, deleting and
//! looking up the elements of a set or map in any address family.
//!
//! Once a table exists, tcpr's datapaths (the engine's flow lock, the
//! balancer's steering maps) change only set elements. Doing that by
//! running `nft` costs a process start and libnftables' cache load (about
//! 5 ms) per call; this module speaks the few nf_tables messages it needs
//! (a batch of NEWSETELEM / DELSETELEM / DESTROYSETELEM, one transaction)
//! on a netlink socket instead. It is written by hand because the crates
//! that cover nf_tables are either GPL-3.0 (rustables, not usable in this
//! Apache-2.0 project) or bind the C libnftnl; the messages are small and
//! fixed. Installing tables, sets and rules still goes through `nft`
//! (libnftables' syntax is the documented interface for rules).
//!
//! Keys and values are laid out as nf_tables registers hold them: each
//! part of a concatenation in network order, padded to 4 bytes.

use crate::sys::sock;
// The netlink constants come from the crate the rest of our netlink code
// (sock_diag, rtnetlink) is built on; only nf_tables' own numbers are here.
use netlink_packet_core::{
    NLA_F_NESTED, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_ECHO, NLM_F_REQUEST,
};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
// `enum nf_tables_msg_types` (linux/netfilter/nf_tables.h).
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
/// Linux 6.3+: a delete that succeeds when the element is absent.
const NFT_MSG_DESTROYSETELEM: u16 = 30;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_DATA_VALUE: u16 = 1;

const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;

/// An attribute's length is a u16: elements go in messages of at most this
/// many bytes, all in one batch (one transaction).
const MAX_ELEMENTS_BYTES: usize = 60_000;

/// The netlink header (`struct nlmsghdr`); the nfnetlink one (`struct
/// nfgenmsg`, whose first byte is the family) follows it.
const NLMSG_HDR_BYTES: usize = 16;

/// `struct nfgenmsg`: family, version, resource id.
const NFGENMSG_BYTES: usize = 4;

/// The type bits of an attribute's type (the rest are the nested and
/// byte-order flags).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// A netlink socket's default send buffer (`net.core.wmem_default` is
/// 212992 bytes): smaller batches need no check.
const DEFAULT_SEND_BUFFER_BYTES: usize = 64 * 1024;

/// An acknowledgement or error: the header, then the errno (`struct nlmsgerr`).
const NLMSG_ERROR_BYTES: usize = NLMSG_HDR_BYTES + 4;

/// The receive buffer for the kernel's answers.
const RECV_BUFFER_BYTES: usize = 64 * 1024;

/// Room beyond a batch that the socket's send buffer must have.
const SEND_BUFFER_SLACK_BYTES: usize = 4096;

/// How long to wait for the kernel's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The address family of a table (`NFPROTO_*`, linux/netfilter.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `inet`: IPv4 and IPv6.
    Inet,
    /// `ip`.
    Ipv4,
    /// `ip6`.
    Ipv6,
    /// `arp`.
    Arp,
    /// `netdev`: ingress/egress of one device.
    Netdev,
    /// `bridge`.
    Bridge,
}

impl Family {
    fn nfproto(self) -> u8 {
        match self {
            Family::Inet => 1,
            Family::Ipv4 => 2,
            Family::Arp => 3,
            Family::Netdev => 5,
            Family::Bridge => 7,
            Family::Ipv6 => 10,
        }
    }
}

/// A set (or map) of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetRef<'a> {
    /// The table's address family.
    pub family: Family,
    /// The table's name.
    pub table: &'a str,
    /// The set's name.
    pub set: &'a str,
}

/// One element: its key and, in a map, its value (a data value, not a
/// verdict), both laid out as the set's types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    /// The key.
    pub key: Vec<u8>,
    /// The value of a map's element; `None` in a set.
    pub data: Option<Vec<u8>>,
}

impl Element {
    /// A set element (no value).
    pub fn key(key: Vec<u8>) -> Element {
        Element { key, data: None }
    }
}

/// What to do with elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Add them, or update the existing ones (a map's value is replaced),
    /// with no timeout of their own (the set's default, if any).
    Add,
    /// Add them or update them, to expire `expires_in` from now, with
    /// `timeout` as their nominal timeout (at least `expires_in`). In a set
    /// with `flags timeout` only. Linux 6.10+ updates an existing element's
    /// expiry; older kernels leave it unchanged. nf_tables counts in
    /// milliseconds and rounds up to the next jiffy.
    AddExpiring {
        /// The element's timeout.
        timeout: Duration,
        /// When it expires, from now.
        expires_in: Duration,
    },
    /// Delete them; the whole transaction fails (ENOENT) if one is absent.
    Delete,
    /// Delete them if present (Linux 6.3+; older kernels refuse the
    /// message with EINVAL or EOPNOTSUPP).
    Destroy,
}

/// One nf_tables transaction under construction.
#[derive(Debug)]
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    acks: usize,
    removes: bool,
    echo: bool,
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

/// A nested `nft_data` value.
fn put_data(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    let at = begin_nest(buf, ty);
    put_attr(buf, NFTA_DATA_VALUE, value);
    end_nest(buf, at);
}

/// Milliseconds, big-endian, as nf_tables reads a timeout.
fn millis_be(d: Duration) -> [u8; 8] {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .to_be_bytes()
}

impl Default for Batch {
    fn default() -> Batch {
        Batch::new()
    }
}

impl Batch {
    /// An empty transaction.
    pub fn new() -> Batch {
        let mut b = Batch::bare();
        b.control(NFNL_MSG_BATCH_BEGIN);
        b
    }

    fn bare() -> Batch {
        Batch {
            buf: Vec::new(),
            seq: 1,
            acks: 0,
            removes: false,
            echo: false,
        }
    }

    /// Whether the batch holds no element message.
    pub fn is_empty(&self) -> bool {
        self.acks == 0
    }

    /// Whether the batch deletes or destroys elements: if one is present,
    /// its removal leaves destroy work that waits for an RCU grace period,
    /// and so does the next close of any nf_tables netlink socket until
    /// then ([`close_in_child`]).
    pub fn removes(&self) -> bool {
        self.removes
    }

    /// Asks the kernel to echo the removals of the deletes and destroys
    /// added after this call: one notification per element removed, none
    /// for a destroy of an absent one ([`Socket::commit_counting`]).
    pub fn echo_removals(&mut self) {
        self.echo = true;
    }

    /// Whether [`Batch::echo_removals`] was called.
    pub fn echoes_removals(&self) -> bool {
        self.echo
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

    /// Applies `op` to `elements` of `set`, in as many messages as the
    /// attribute length limit needs (all in this transaction).
    pub fn elements(&mut self, set: SetRef<'_>, elements: &[Element], op: Op) {
        let (ty, flags) = match op {
            Op::Add | Op::AddExpiring { .. } => {
                (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK)
            }
            Op::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
            Op::Destroy => (NFT_MSG_DESTROYSETELEM, NLM_F_REQUEST | NLM_F_ACK),
        };
        let removes = matches!(op, Op::Delete | Op::Destroy);
        self.removes |= removes && !elements.is_empty();
        let flags = if removes && self.echo {
            flags | NLM_F_ECHO
        } else {
            flags
        };
        let mut rest = elements;
        while !rest.is_empty() {
            let msg = self.header(
                NFNL_SUBSYS_NFTABLES << 8 | ty,
                flags,
                set.family.nfproto(),
                0,
            );
            put_attr(&mut self.buf, NFTA_SET_ELEM_LIST_TABLE, &nul(set.table));
            put_attr(&mut self.buf, NFTA_SET_ELEM_LIST_SET, &nul(set.set));
            let list = begin_nest(&mut self.buf, NFTA_SET_ELEM_LIST_ELEMENTS);
            while let Some((element, more)) = rest.split_first() {
                if self.buf.len() - list > MAX_ELEMENTS_BYTES {
                    break;
                }
                let el = begin_nest(&mut self.buf, NFTA_LIST_ELEM);
                put_data(&mut self.buf, NFTA_SET_ELEM_KEY, &element.key);
                let adds = matches!(op, Op::Add | Op::AddExpiring { .. });
                if let (true, Some(data)) = (adds, &element.data) {
                    put_data(&mut self.buf, NFTA_SET_ELEM_DATA, data);
                }
                if let Op::AddExpiring {
                    timeout,
                    expires_in,
                } = op
                {
                    // The expiration too: updating an element that is
                    // about to expire must renew it.
                    put_attr(&mut self.buf, NFTA_SET_ELEM_TIMEOUT, &millis_be(timeout));
                    let expiration = millis_be(expires_in);
                    put_attr(&mut self.buf, NFTA_SET_ELEM_EXPIRATION, &expiration);
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
    fn finish(mut self) -> (Vec<u8>, usize) {
        self.control(NFNL_MSG_BATCH_END);
        (self.buf, self.acks)
    }

    /// The finished transaction, to be sent as often as needed
    /// ([`retry_busy`]) without building or copying it again.
    pub fn seal(self) -> Sealed {
        let (msg, acks) = self.finish();
        Sealed { msg, acks }
    }
}

/// A finished transaction ([`Batch::seal`]).
#[derive(Debug)]
pub struct Sealed {
    msg: Vec<u8>,
    acks: usize,
}

fn nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// The kernel refused a message (its errno).
    #[error("nf_tables refused the request: {}", std::io::Error::from_raw_os_error(*.0))]
    Refused(i32),
    /// The socket failed.
    #[error("nf_tables netlink: {0}")]
    Io(std::io::Error),
}

/// A netlink socket for nf_tables requests in one network namespace: open
/// one to send several requests, or use the free functions, which open one
/// per call.
#[derive(Debug)]
pub struct Socket {
    fd: std::os::fd::OwnedFd,
}

/// An element as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listed {
    /// How long until it expires (`None`: it has no timeout).
    pub expires_in: Option<Duration>,
}

impl Socket {
    /// A socket in the network namespace `ns` (the caller's when `None`).
    pub fn open(ns: Option<BorrowedFd<'_>>) -> Result<Socket, NlError> {
        let fd = sock::netlink_socket_in(ns, NETLINK_NETFILTER).map_err(NlError::Io)?;
        // Errors need not echo our (large) messages back.
        let _ = sock::set_int(fd.as_fd(), SOL_NETLINK, NETLINK_CAP_ACK, 1);
        sock::set_recv_timeout(fd.as_fd(), ANSWER_TIMEOUT).map_err(NlError::Io)?;
        Ok(Socket { fd })
    }

    /// The cookie of the socket's network namespace (`SO_NETNS_COOKIE`),
    /// to compare with another socket's.
    pub fn netns_cookie(&self) -> Result<u64, NlError> {
        sock::netns_cookie(self.fd.as_fd()).map_err(NlError::Io)
    }

    /// Sends a batch and waits for every acknowledgement: the transaction
    /// has committed (or failed as a whole) when this returns.
    pub fn commit(&self, batch: Batch) -> Result<(), NlError> {
        self.commit_counting(batch).map(drop)
    }

    /// [`Socket::commit`], returning how many element removals the kernel
    /// echoed: with [`Batch::echo_removals`], the elements the transaction
    /// removed (nf_tables sends a transaction's notifications at its
    /// commit, before the acknowledgements).
    pub fn commit_counting(&self, batch: Batch) -> Result<usize, NlError> {
        self.commit_sealed(&batch.seal())
    }

    /// [`Socket::commit_counting`] of a sealed transaction.
    pub fn commit_sealed(&self, batch: &Sealed) -> Result<usize, NlError> {
        if batch.acks == 0 {
            return Ok(0);
        }
        let answers = self.exchange(&batch.msg, batch.acks)?;
        // NEWGEN comes too, for a transaction that changed anything.
        let removal = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELSETELEM;
        Ok(answers.iter().filter(|(ty, _)| *ty == removal).count())
    }

    /// Whether the table `table` of `family` exists.
    pub fn table_exists(&self, family: Family, table: &str) -> Result<bool, NlError> {
        let answer = self.get(family, NFT_MSG_GETTABLE, |buf| {
            put_attr(buf, NFTA_TABLE_NAME, &nul(table))
        })?;
        Ok(answer.is_some())
    }

    /// Whether the set `set` exists.
    pub fn set_exists(&self, set: SetRef<'_>) -> Result<bool, NlError> {
        let answer = self.get(set.family, NFT_MSG_GETSET, |buf| {
            put_attr(buf, NFTA_SET_TABLE, &nul(set.table));
            put_attr(buf, NFTA_SET_NAME, &nul(set.set));
        })?;
        Ok(answer.is_some())
    }

    /// The element with `key` in `set`, unless absent or expired.
    pub fn element(&self, set: SetRef<'_>, key: &[u8]) -> Result<Option<Listed>, NlError> {
        let answer = self.get(set.family, NFT_MSG_GETSETELEM, |buf| {
            put_attr(buf, NFTA_SET_ELEM_LIST_TABLE, &nul(set.table));
            put_attr(buf, NFTA_SET_ELEM_LIST_SET, &nul(set.set));
            let list = begin_nest(buf, NFTA_SET_ELEM_LIST_ELEMENTS);
            let el = begin_nest(buf, NFTA_LIST_ELEM);
            put_data(buf, NFTA_SET_ELEM_KEY, key);
            end_nest(buf, el);
            end_nest(buf, list);
        })?;
        Ok(answer.map(|msg| {
            // NFTA_SET_ELEM_LIST_ELEMENTS > NFTA_LIST_ELEM > the element's
            // attributes; the expiration is the time left, in ms.
            let expires_in = attr(&msg, NFTA_SET_ELEM_LIST_ELEMENTS)
                .and_then(|list| attr(list, NFTA_LIST_ELEM))
                .and_then(|el| attr(el, NFTA_SET_ELEM_EXPIRATION))
                .and_then(|ms| <[u8; 8]>::try_from(ms).ok())
                .map(|ms| Duration::from_millis(u64::from_be_bytes(ms)));
            Listed { expires_in }
        }))
    }

    /// Sends one GET message of type `ty` (attributes written by `attrs`)
    /// on its own (a GET is not a batch message). Returns the attributes of
    /// the answer, or `None` when the object does not exist.
    fn get(
        &self,
        family: Family,
        ty: u16,
        attrs: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Option<Vec<u8>>, NlError> {
        let mut b = Batch::bare();
        let msg = b.header(
            NFNL_SUBSYS_NFTABLES << 8 | ty,
            NLM_F_REQUEST | NLM_F_ACK,
            family.nfproto(),
            0,
        );
        attrs(&mut b.buf);
        b.end(msg);
        match self.exchange(&b.buf, 1) {
            Ok(mut answers) => Ok(answers.pop().map(|(_, attrs)| attrs)),
            Err(NlError::Refused(libc::ENOENT)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends `msg` and reads until `acks` acknowledgements came; returns
    /// the type and attributes of the other (data) messages that arrived on
    /// the way (echoed notifications: the type and the rest unparsed).
    /// Answers are matched by sequence number: the messages of `msg` carry
    /// 1, 2, ...; anything else (an answer to an earlier request that
    /// timed out) is skipped.
    fn exchange(&self, msg: &[u8], acks: usize) -> Result<Vec<(u16, Vec<u8>)>, NlError> {
        let fd = self.fd.as_fd();
        // A netlink datagram must fit the socket's send buffer.
        if msg.len() > DEFAULT_SEND_BUFFER_BYTES {
            let want = i32::try_from(msg.len() + SEND_BUFFER_SLACK_BYTES).unwrap_or(i32::MAX / 2);
            if sock::get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0) < want {
                let _ = sock::set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want)
                    .or_else(|_| sock::set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, want));
            }
        }
        let last_seq = count_messages(msg) as u32;
        sock::send_all(fd, msg).map_err(NlError::Io)?;
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        let mut seen = 0;
        let mut data = Vec::new();
        while seen < acks {
            let n = sock::recv_into(fd, &mut buf).map_err(NlError::Io)?;
            let mut at = 0;
            while at + NLMSG_ERROR_BYTES <= n {
                let word = |i: usize| buf[at + i..at + i + 4].try_into().expect("4 bytes");
                let len = u32::from_ne_bytes(word(0)) as usize;
                let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
                let seq = u32::from_ne_bytes(word(8));
                if len < NLMSG_HDR_BYTES || at + len > n {
                    break;
                }
                if seq == 0 && ty != NLMSG_ERROR {
                    // An echoed notification (`Batch::echo_removals`):
                    // nf_tables sends element ones with sequence 0.
                    let attrs = buf[at + NLMSG_HDR_BYTES..at + len].to_vec();
                    data.push((ty, attrs));
                } else if !(1..=last_seq).contains(&seq) {
                    // Not ours: an answer to an earlier request.
                } else if ty == NLMSG_ERROR {
                    let err = i32::from_ne_bytes(word(NLMSG_HDR_BYTES));
                    if err != 0 {
                        return Err(NlError::Refused(-err));
                    }
                    seen += 1;
                } else if len >= NLMSG_HDR_BYTES + NFGENMSG_BYTES {
                    let attrs = buf[at + NLMSG_HDR_BYTES + NFGENMSG_BYTES..at + len].to_vec();
                    data.push((ty, attrs));
                }
                at += len.next_multiple_of(4);
            }
        }
        Ok(data)
    }
}

/// How many netlink messages `msg` holds.
fn count_messages(msg: &[u8]) -> usize {
    let mut at = 0;
    let mut count = 0;
    while at + 4 <= msg.len() {
        let len = u32::from_ne_bytes(msg[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDR_BYTES {
            break;
        }
        at += len.next_multiple_of(4);
        count += 1;
    }
    count
}

/// The payload of the first attribute of type `ty` among `attrs`.
fn attr(attrs: &[u8], ty: u16) -> Option<&[u8]> {
    let mut at = 0;
    while at + 4 <= attrs.len() {
        let len = u16::from_ne_bytes([attrs[at], attrs[at + 1]]) as usize;
        let this = u16::from_ne_bytes([attrs[at + 2], attrs[at + 3]]) & NLA_TYPE_MASK;
        if len < 4 || at + len > attrs.len() {
            return None;
        }
        if this == ty {
            return Some(&attrs[at + 4..at + len]);
        }
        at += len.next_multiple_of(4);
    }
    None
}

/// Closes `sockets` in a child process, so that this one never waits for
/// their close: the close of an nf_tables netlink socket
/// (`NETLINK_URELEASE`, `nft_rcv_nl_event`) flushes nf_tables'
/// transaction destroy work, which waits for an RCU grace period (8-30 ms)
/// after a transaction removed a present element. The child inherits
/// them, this process closes its copies (not the last: nothing waits),
/// the child closes them after that and exits, all other fds closed at
/// once. Returns the child's pid (it is not waited for: an exiting caller
/// leaves it to init).
pub fn close_in_child(sockets: Vec<Socket>) -> std::io::Result<u32> {
    let fds = sockets.into_iter().map(|s| s.fd).collect();
    crate::sys::detach::close_in_child(fds).map(|pid| pid as u32)
}

/// How long [`retry_busy`] keeps trying a transaction the kernel answered
/// with EBUSY: longer than a rehash of a set of a few hundred thousand
/// elements takes (tens of ms here), short of a handoff's timeouts.
pub const BUSY_PATIENCE: Duration = Duration::from_millis(500);

/// Runs `attempt` (one transaction, on a fresh or known-clean socket) and
/// runs it again while the kernel answers EBUSY, for up to
/// [`BUSY_PATIENCE`], with pauses growing from 1 ms to 32 ms.
///
/// A NEWSETELEM into a hash set (`nft_set_hash`, an rhashtable) fails with
/// EBUSY while the table is being rehashed and the bucket of the new
/// element already holds 16 entries (`rhashtable_insert_rehash`: "do not
/// schedule more than one rehash"). Such a bucket is one key's dead
/// copies: an element that expired or that the packet path deleted stays
/// in the table, skipped by lookups, until the set's garbage collector
/// frees it, and a new element with the same key is a new entry in the
/// same bucket. The collector gives up its walk whenever a transaction
/// commits in the namespace meanwhile, so under a steady stream of
/// transactions (a balancer's locks and steering entries, thousands a
/// second) it rarely finishes, and a flow tuple that comes back (a
/// client's port reused) finds its old copies. The failed transaction
/// changed nothing (nf_tables aborts a batch whole), and once the rehash
/// is over the same insert succeeds: so it is tried again rather than
/// failed.
pub fn retry_busy<T>(mut attempt: impl FnMut() -> Result<T, NlError>) -> Result<T, NlError> {
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match attempt() {
            Err(NlError::Refused(libc::EBUSY)) if start.elapsed() + pause <= BUSY_PATIENCE => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(32));
            }
            other => return other,
        }
    }
}

/// Sends a batch in the network namespace `ns` (the caller's when `None`)
/// on a socket of its own and waits for every acknowledgement (tried
/// again while the kernel is busy: [`retry_busy`]).
pub fn commit(ns: Option<BorrowedFd<'_>>, batch: Batch) -> Result<(), NlError> {
    if batch.is_empty() {
        return Ok(());
    }
    let batch = batch.seal();
    retry_busy(|| Socket::open(ns)?.commit_sealed(&batch).map(drop))
}

/// Whether the table `table` of `family` exists in the namespace `ns` (the
/// caller's when `None`).
pub fn table_exists(
    ns: Option<BorrowedFd<'_>>,
    family: Family,
    table: &str,
) -> Result<bool, NlError> {
    Socket::open(ns)?.table_exists(family, table)
}

/// Whether the element with `key` is in `set` and not expired.
pub fn element_present(
    ns: Option<BorrowedFd<'_>>,
    set: SetRef<'_>,
    key: &[u8],
) -> Result<bool, NlError> {
    Ok(Socket::open(ns)?.element(set, key)?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_busy_tries_again_only_while_busy() {
        let mut tries = 0;
        let out = retry_busy(|| {
            tries += 1;
            if tries < 3 {
                Err(NlError::Refused(libc::EBUSY))
            } else {
                Ok(tries)
            }
        });
        assert_eq!(out.unwrap(), 3);
        let mut tries = 0;
        let out: Result<(), _> = retry_busy(|| {
            tries += 1;
            Err(NlError::Refused(libc::ENFILE))
        });
        assert!(matches!(out, Err(NlError::Refused(libc::ENFILE))));
        assert_eq!(tries, 1);
        // Busy for good: it gives up (after its patience).
        let mut tries = 0;
        let out: Result<(), _> = retry_busy(|| {
            tries += 1;
            Err(NlError::Refused(libc::EBUSY))
        });
        assert!(matches!(out, Err(NlError::Refused(libc::EBUSY))));
        assert!(tries > 1);
    }

    const FLOWS6: SetRef<'static> = SetRef {
        family: Family::Inet,
        table: "tcpr",
        set: "flows6",
    };

    /// Walks the messages of a batch: (type, family) of each, checking
    /// that every length fits and that they tile the buffer.
    fn messages(buf: &[u8]) -> Vec<(u16, u8)> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < buf.len() {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            assert!((20..65_536).contains(&len), "message of {len} bytes");
            let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
            out.push((ty, buf[at + NLMSG_HDR_BYTES]));
            at += len;
        }
        assert_eq!(at, buf.len());
        out
    }

    #[test]
    fn large_batches_split_into_messages_under_the_attribute_limit() {
        // IPv6 keys: two addresses and two padded ports.
        let keys: Vec<Element> = (0..5000u32)
            .map(|i| {
                let mut k = vec![0u8; 40];
                k[..4].copy_from_slice(&i.to_be_bytes());
                Element::key(k)
            })
            .collect();
        let mut b = Batch::new();
        let lease = Duration::from_secs(60);
        b.elements(
            FLOWS6,
            &keys,
            Op::AddExpiring {
                timeout: lease,
                expires_in: lease,
            },
        );
        let (buf, acks) = b.finish();
        assert!(acks > 1, "split into {acks} messages");
        assert_eq!(
            messages(&buf).len(),
            acks + 2,
            "begin, {acks} messages, end"
        );
    }

    #[test]
    fn map_values_and_families_are_written() {
        let netdev_map = SetRef {
            family: Family::Netdev,
            table: "steer",
            set: "backends",
        };
        let el = Element {
            key: vec![10, 0, 0, 1],
            data: Some(vec![0xaa, 0xbb, 0xcc, 0xdd]),
        };
        let mut b = Batch::new();
        b.elements(netdev_map, std::slice::from_ref(&el), Op::Add);
        b.elements(netdev_map, std::slice::from_ref(&el), Op::Destroy);
        let (buf, _) = b.finish();
        let msgs = messages(&buf);
        let nft = |ty: u16| (NFNL_SUBSYS_NFTABLES << 8 | ty, Family::Netdev.nfproto());
        assert_eq!(msgs[1], nft(NFT_MSG_NEWSETELEM));
        assert_eq!(msgs[2], nft(NFT_MSG_DESTROYSETELEM));
        // The value follows the key in the add; the destroy has none.
        let mut data_attr = Vec::new();
        put_data(
            &mut data_attr,
            NFTA_SET_ELEM_DATA,
            &[0xaa, 0xbb, 0xcc, 0xdd],
        );
        let count = buf
            .windows(data_attr.len())
            .filter(|w| *w == data_attr)
            .count();
        assert_eq!(count, 1);
    }
}
