//! Listing TCP connections with sock_diag netlink (`NETLINK_SOCK_DIAG`,
//! `SOCK_DIAG_BY_FAMILY`), finding which process holds each one, and
//! whether each is frozen (repair mode) or locked.
//!
//! Written by hand: the request and the answer are two fixed structs
//! (`inet_diag_req_v2`, `inet_diag_msg`). `netlink-packet-sock-diag` (on the
//! `netlink-packet-core` this crate already uses, no runtime) would parse
//! them too; moving to it belongs with making the three netlink framings of
//! this crate one.

use crate::sys;
use crate::{Error, Flow, Netns};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use tcpr_image::TcpState;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr`.
const NLMSG_HDR_BYTES: usize = 16;
/// `struct inet_diag_req_v2`.
const DIAG_REQ_BYTES: usize = 56;
/// `struct inet_diag_msg`.
const DIAG_MSG_BYTES: usize = 72;
/// The receive buffer for the kernel's answers.
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// `idiag_states`: a bit per TCP state, all of them.
const ALL_STATES: u32 = u32::MAX;

/// A process's handle on a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The process.
    pub pid: i32,
    /// The socket's fd number in it.
    pub fd: i32,
}

/// Something `ls` looked up: yes, no, or unknown and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fact {
    /// It is so.
    Yes,
    /// It is not.
    No,
    /// It could not be found out, for this reason.
    Unknown(String),
}

impl Fact {
    fn from_result(r: Result<bool, String>) -> Fact {
        match r {
            Ok(true) => Fact::Yes,
            Ok(false) => Fact::No,
            Err(why) => Fact::Unknown(why),
        }
    }
    /// `Some(bool)` when known.
    pub fn known(&self) -> Option<bool> {
        match self {
            Fact::Yes => Some(true),
            Fact::No => Some(false),
            Fact::Unknown(_) => None,
        }
    }
}

/// One TCP socket of the namespace.
#[derive(Clone, Debug)]
pub struct SocketEntry {
    /// Local address and port.
    pub local: SocketAddr,
    /// Peer address and port (unspecified for listeners).
    pub peer: SocketAddr,
    /// Kernel state number.
    pub state: u8,
    /// Receive queue bytes (for listeners: the accept backlog).
    pub recv_queue: u32,
    /// Send queue bytes.
    pub send_queue: u32,
    /// Socket inode.
    pub inode: u64,
    /// Processes and fds holding the socket.
    pub owners: Vec<Owner>,
    /// Processes whose open files could not be read (other users' without
    /// ptrace rights): an owner among them is not in `owners`.
    pub hidden_processes: usize,
    /// In repair mode: an earlier dump or move froze it (only for states
    /// tcpr can carry).
    pub frozen: Fact,
    /// Its flow's element is in the lock (its packets are dropped).
    pub locked: Fact,
}

impl SocketEntry {
    /// The kernel's name of the state.
    pub fn state_name(&self) -> &'static str {
        TcpState::kernel_name(self.state)
    }
    /// The flow.
    pub fn flow(&self) -> Flow {
        Flow {
            local: self.local,
            peer: self.peer,
        }
    }
    /// Whether tcpr can dump it, and if not why.
    pub fn dumpable(&self) -> Result<(), String> {
        if TcpState::from_kernel_number(self.state).is_none() {
            return Err("state cannot be repaired".into());
        }
        if self.owners.is_empty() {
            return Err(if self.hidden_processes > 0 {
                format!(
                    "owner unknown: the open files of {} processes cannot be read (root or CAP_SYS_PTRACE is needed)",
                    self.hidden_processes
                )
            } else {
                "no process holds it".into()
            });
        }
        match &self.frozen {
            Fact::Yes => return Err(
                "frozen by an earlier dump or move (`tcpr thaw` if it was not restored elsewhere)"
                    .into(),
            ),
            Fact::Unknown(why) => return Err(format!("unknown: {why}")),
            Fact::No => {}
        }
        if let Fact::Unknown(why) = &self.locked {
            return Err(format!("unknown: {why}"));
        }
        Ok(())
    }
}

fn request(family: u8) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDR_BYTES + DIAG_REQ_BYTES);
    let len = (NLMSG_HDR_BYTES + DIAG_REQ_BYTES) as u32;
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    m.push(family);
    m.push(libc::IPPROTO_TCP as u8);
    m.push(0); // no extensions
    m.push(0);
    m.extend_from_slice(&ALL_STATES.to_ne_bytes());
    m.extend_from_slice(&[0u8; 48]); // any socket id
    m
}

fn addr(family: u8, raw: &[u8], port: u16) -> SocketAddr {
    let ip = if family == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        let mut b = [0u8; 16];
        b.copy_from_slice(&raw[..16]);
        IpAddr::V6(Ipv6Addr::from(b))
    };
    SocketAddr::new(ip, port)
}

fn parse_msg(m: &[u8]) -> Option<SocketEntry> {
    if m.len() < DIAG_MSG_BYTES {
        return None;
    }
    let family = m[0];
    let state = m[1];
    let sport = u16::from_be_bytes([m[4], m[5]]);
    let dport = u16::from_be_bytes([m[6], m[7]]);
    let u32at = |i: usize| u32::from_ne_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
    Some(SocketEntry {
        local: addr(family, &m[8..24], sport),
        peer: addr(family, &m[24..40], dport),
        state,
        recv_queue: u32at(56),
        send_queue: u32at(60),
        inode: u64::from(u32at(68)),
        owners: vec![],
        hidden_processes: 0,
        frozen: Fact::Unknown("not looked up".into()),
        locked: Fact::Unknown("not looked up".into()),
    })
}

fn dump_family(family: u8) -> Result<Vec<SocketEntry>, Error> {
    let nl =
        sys::netlink_socket(NETLINK_SOCK_DIAG).map_err(|e| Error::kernel("open sock_diag", e))?;
    sys::send_all(nl.as_fd(), &request(family)).map_err(|e| Error::kernel("query sock_diag", e))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; RECV_BUFFER_BYTES];
    loop {
        let n =
            sys::recv_into(nl.as_fd(), &mut buf).map_err(|e| Error::kernel("read sock_diag", e))?;
        let mut off = 0;
        while off + NLMSG_HDR_BYTES <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < NLMSG_HDR_BYTES || off + len > n {
                return Err(Error::Inconsistent("malformed sock_diag answer".into()));
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let at = off + NLMSG_HDR_BYTES;
                    let code = i32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
                    return Err(Error::kernel(
                        "list sockets with sock_diag",
                        std::io::Error::from_raw_os_error(-code),
                    ));
                }
                _ => out.extend(parse_msg(&buf[off + NLMSG_HDR_BYTES..off + len])),
            }
            off += (len + 3) & !3;
        }
        if n == 0 {
            return Ok(out);
        }
    }
}

/// The sockets each process holds, as far as this process can see.
struct Owners {
    /// Socket inode → holders.
    by_inode: HashMap<u64, Vec<Owner>>,
    /// Processes whose fds could not be read, for want of permission.
    hidden: Vec<i32>,
}

/// Socket inode → holders, for every process we can see.
fn socket_owners() -> Owners {
    let mut owners = Owners {
        by_inode: HashMap::new(),
        hidden: Vec::new(),
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let fds = match std::fs::read_dir(p.path().join("fd")) {
            Ok(fds) => fds,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                owners.hidden.push(pid);
                continue;
            }
            // Gone meanwhile.
            Err(_) => continue,
        };
        for f in fds.flatten() {
            let Some(fd) = f.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(target) = std::fs::read_link(f.path()) {
                let t = target.to_string_lossy();
                if let Some(ino) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    if let Ok(ino) = ino.parse() {
                        owners
                            .by_inode
                            .entry(ino)
                            .or_default()
                            .push(Owner { pid, fd });
                    }
                }
            }
        }
    }
    owners
}

/// Whether the socket `owner` holds is in repair mode: takes a duplicate
/// of it (ptrace rights over the process are needed).
fn frozen(owner: Owner) -> Result<bool, String> {
    let sock = crate::take_fd(owner.pid, owner.fd).map_err(|e| match e {
        Error::Permission(_) => format!(
            "no ptrace rights over process {} (root or CAP_SYS_PTRACE is needed)",
            owner.pid
        ),
        other => other.to_string(),
    })?;
    crate::is_frozen(sock.as_fd()).map_err(|e| e.to_string())
}

/// Whether `flow` is locked in the current namespace.
fn locked(flow: &Flow) -> Result<bool, String> {
    crate::lock::is_locked(&Netns::current(), flow).map_err(|e| match e {
        Error::Permission(_) => {
            "CAP_NET_ADMIN over this network namespace is needed to read the lock (and to dump)"
                .to_string()
        }
        other => other.to_string(),
    })
}

/// All TCP sockets of the current network namespace, with their owners and
/// whether each is frozen or locked; with `pid`, only those that process
/// holds.
pub fn list(pid: Option<i32>) -> Result<Vec<SocketEntry>, Error> {
    if let Some(p) = pid {
        match std::fs::read_dir(format!("/proc/{p}/fd")) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoSuchProcess(p))
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Error::Permission(format!(
                    "cannot read the open files of process {p}: permission denied (its own user, root or CAP_SYS_PTRACE is needed)"
                )))
            }
            Err(e) => return Err(Error::kernel(format!("read the open files of process {p}"), e)),
        }
    }
    let mut all = dump_family(libc::AF_INET as u8)?;
    all.extend(dump_family(libc::AF_INET6 as u8)?);
    let owners = socket_owners();
    for e in &mut all {
        if let Some(o) = owners.by_inode.get(&e.inode) {
            e.owners = o.clone();
        }
        if let Some(p) = pid {
            e.owners.retain(|o| o.pid == p);
        }
        e.hidden_processes = owners.hidden.len();
    }
    if pid.is_some() {
        all.retain(|e| !e.owners.is_empty());
    }
    for e in &mut all {
        // Only the states tcpr carries can be frozen or locked.
        if TcpState::from_kernel_number(e.state).is_none() {
            e.frozen = Fact::No;
            e.locked = Fact::No;
            continue;
        }
        e.frozen = match e.owners.first() {
            Some(&owner) => Fact::from_result(frozen(owner)),
            None => Fact::Unknown("no process we can see holds it".into()),
        };
        e.locked = Fact::from_result(locked(&e.flow()));
    }
    all.sort_by_key(|e| (e.local, e.peer));
    Ok(all)
}
