//! Listing TCP connections with sock_diag netlink (`NETLINK_SOCK_DIAG`,
//! `SOCK_DIAG_BY_FAMILY`), and finding which process holds each one.
//!
//! Written by hand: the request and answer are two fixed structs, and the
//! netlink crates that cover sock_diag pull in an async runtime.

use crate::sys;
use crate::Error;
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

fn request(family: u8) -> Vec<u8> {
    let mut m = Vec::with_capacity(72);
    let len: u32 = 16 + 56;
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    m.push(family);
    m.push(libc::IPPROTO_TCP as u8);
    m.push(0); // no extensions
    m.push(0);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
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
    if m.len() < 72 {
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
    })
}

fn dump_family(family: u8) -> Result<Vec<SocketEntry>, Error> {
    let nl =
        sys::netlink_socket(NETLINK_SOCK_DIAG).map_err(|e| Error::kernel("open sock_diag", e))?;
    sys::send_all(nl.as_fd(), &request(family)).map_err(|e| Error::kernel("query sock_diag", e))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n =
            sys::recv_into(nl.as_fd(), &mut buf).map_err(|e| Error::kernel("read sock_diag", e))?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < 16 || off + len > n {
                return Err(Error::Inconsistent("malformed sock_diag answer".into()));
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code =
                        i32::from_ne_bytes(buf[off + 16..off + 20].try_into().expect("4 bytes"));
                    return Err(Error::kernel(
                        "list sockets with sock_diag",
                        std::io::Error::from_raw_os_error(-code),
                    ));
                }
                _ => out.extend(parse_msg(&buf[off + 16..off + len])),
            }
            off += (len + 3) & !3;
        }
        if n == 0 {
            return Ok(out);
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
