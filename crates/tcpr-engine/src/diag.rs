//! Listing TCP connections with sock_diag netlink (`NETLINK_SOCK_DIAG`,
//! `SOCK_DIAG_BY_FAMILY`), and finding which process holds each one.
//!
//! The messages come from `netlink-packet-sock-diag`, on the same
//! `netlink-packet-core` as the rest of our netlink code (no runtime: the
//! crates that bring one are the socket crates, `netlink-proto` and
//! `rtnetlink`); the socket is ours, from the `sys` layer.

use crate::sys;
use crate::Error;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
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
    pub owners: Vec<(i32, i32)>,
}

impl SocketEntry {
    /// The kernel's name of the state.
    pub fn state_name(&self) -> &'static str {
        TcpState::kernel_name(self.state)
    }
    /// Whether tcpr can dump it, and if not why.
    pub fn dumpable(&self) -> Result<(), &'static str> {
        if TcpState::from_kernel_number(self.state).is_none() {
            return Err("state cannot be repaired");
        }
        if self.owners.is_empty() {
            return Err("no process holds it");
        }
        Ok(())
    }
}

/// A dump request for every TCP socket of `family`, in every state.
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
    }
}

fn dump_family(family: u8) -> Result<Vec<SocketEntry>, Error> {
    let nl =
        sys::netlink_socket(NETLINK_SOCK_DIAG).map_err(|e| Error::kernel("open sock_diag", e))?;
    sys::send_all(nl.as_fd(), &request(family)).map_err(|e| Error::kernel("query sock_diag", e))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let n =
            sys::recv_into(nl.as_fd(), &mut buf).map_err(|e| Error::kernel("read sock_diag", e))?;
        if n == 0 {
            return Ok(out);
        }
        let mut at = 0;
        while at < n {
            let m = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[at..n])
                .map_err(|e| Error::Inconsistent(format!("malformed sock_diag answer: {e}")))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(out),
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

/// Socket inode → (pid, fd) for every process we can see.
fn socket_owners() -> HashMap<u64, Vec<(i32, i32)>> {
    let mut map: HashMap<u64, Vec<(i32, i32)>> = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return map;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for f in fds.flatten() {
            let Some(fd) = f.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(target) = std::fs::read_link(f.path()) {
                let t = target.to_string_lossy();
                if let Some(ino) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    if let Ok(ino) = ino.parse() {
                        map.entry(ino).or_default().push((pid, fd));
                    }
                }
            }
        }
    }
    map
}

/// All TCP sockets of the current network namespace, with their owners;
/// with `pid`, only those that process holds.
pub fn list(pid: Option<i32>) -> Result<Vec<SocketEntry>, Error> {
    if let Some(p) = pid {
        if !std::path::Path::new(&format!("/proc/{p}")).exists() {
            return Err(Error::NoSuchProcess(p));
        }
    }
    let mut all = dump_family(libc::AF_INET as u8)?;
    all.extend(dump_family(libc::AF_INET6 as u8)?);
    let owners = socket_owners();
    for e in &mut all {
        if let Some(o) = owners.get(&e.inode) {
            e.owners = o.clone();
        }
        if let Some(p) = pid {
            e.owners.retain(|(op, _)| *op == p);
        }
    }
    if pid.is_some() {
        all.retain(|e| !e.owners.is_empty());
    }
    all.sort_by_key(|e| (e.local, e.peer));
    Ok(all)
}
