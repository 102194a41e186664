//! Listing TCP connections with sock_diag netlink (`NETLINK_SOCK_DIAG`,
//! `SOCK_DIAG_BY_FAMILY`), finding which process holds each one, and
//! whether each is frozen (repair mode) or locked.
//!
//! The messages come from `netlink-packet-sock-diag`, on the same
//! `netlink-packet-core` as the rest of our netlink code (no runtime: the
//! crates that bring one are the socket crates, `netlink-proto` and
//! `rtnetlink`); the socket is ours, from the `sys` layer.

use crate::sys;
use crate::{Error, Flow, Netns};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags,
};
use netlink_packet_sock_diag::SockDiagMessage;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use tcpr_image::TcpState;

const NETLINK_SOCK_DIAG: i32 = libc::NETLINK_SOCK_DIAG;
/// One read of answers: the kernel sends up to a page per part of a dump.
const RECV_BUFFER: usize = 64 * 1024;

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
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let socket_id = if family == libc::AF_INET6 as u8 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut out = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut out);
    out
}

fn entry(r: &InetResponse) -> SocketEntry {
    let id = &r.header.socket_id;
    SocketEntry {
        local: SocketAddr::new(id.source_address, id.source_port),
        peer: SocketAddr::new(id.destination_address, id.destination_port),
        state: r.header.state,
        recv_queue: r.header.recv_queue,
        send_queue: r.header.send_queue,
        inode: u64::from(r.header.inode),
        owners: vec![],
        hidden_processes: 0,
        frozen: Fact::Unknown("not looked up".into()),
        locked: Fact::Unknown("not looked up".into()),
    }
}

/// Dumps of one family tried before an interrupted one is an error.
const DUMP_ATTEMPTS: usize = 3;

/// The TCP sockets of `family`. A dump the kernel marks interrupted
/// (`NLM_F_DUMP_INTR`: the table changed under it, so sockets may be
/// missing) is taken again.
fn dump_family(family: u8) -> Result<Vec<SocketEntry>, Error> {
    for _ in 1..DUMP_ATTEMPTS {
        if let Some(whole) = dump_family_once(family)? {
            return Ok(whole);
        }
    }
    dump_family_once(family)?.ok_or_else(|| {
        Error::Inconsistent(format!(
            "the socket table changed during each of {DUMP_ATTEMPTS} sock_diag listings"
        ))
    })
}

/// One dump: `None` when the kernel marked it interrupted.
fn dump_family_once(family: u8) -> Result<Option<Vec<SocketEntry>>, Error> {
    let nl =
        sys::netlink_socket(NETLINK_SOCK_DIAG).map_err(|e| Error::kernel("open sock_diag", e))?;
    sys::send_all(nl.as_fd(), &request(family)).map_err(|e| Error::kernel("query sock_diag", e))?;
    let mut out = Vec::new();
    let mut interrupted = false;
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let n =
            sys::recv_into(nl.as_fd(), &mut buf).map_err(|e| Error::kernel("read sock_diag", e))?;
        if n == 0 {
            // An answer ends with NLMSG_DONE: nothing more is no answer.
            return Err(Error::Inconsistent(
                "sock_diag ended its answer without NLMSG_DONE".into(),
            ));
        }
        let mut at = 0;
        while at < n {
            let m = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[at..n])
                .map_err(|e| Error::Inconsistent(format!("malformed sock_diag answer: {e}")))?;
            let len = m.header.length as usize;
            interrupted |= m.header.flags & NLM_F_DUMP_INTR != 0;
            match m.payload {
                // The dump's own error travels in NLMSG_DONE (netlink_dump):
                // a failed dump is not an empty table.
                NetlinkPayload::Done(done) if done.code < 0 => {
                    return Err(Error::kernel(
                        "list sockets with sock_diag",
                        std::io::Error::from_raw_os_error(-done.code),
                    ))
                }
                NetlinkPayload::Done(_) => return Ok((!interrupted).then_some(out)),
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        return Err(Error::kernel(
                            "list sockets with sock_diag",
                            std::io::Error::from_raw_os_error(-code.get()),
                        ));
                    }
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    out.push(entry(&r));
                }
                _ => {}
            }
            if len == 0 {
                return Err(Error::Inconsistent(
                    "malformed sock_diag answer: empty message".into(),
                ));
            }
            // Messages of a datagram are aligned to 4 bytes (NLMSG_ALIGN).
            at += (len + 3) & !3;
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
