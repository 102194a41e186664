//! Restore: build a socket from an image, in the order the kernel enforces
//! (DESIGN.md, "Restore"), leave it in repair mode, and resume it later.

use crate::sys::{self, Queue, RepairOpt};
use crate::{Error, Flow};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use tcpr_image::{ConnectionImage, SocketOptions};

const TCPOPT_MSS: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const IPV6_TRANSPARENT: i32 = 75;
const SO_SNDBUFFORCE: i32 = 32;
const SO_RCVBUFFORCE: i32 = 33;

/// A restored socket, still in repair mode: it sends nothing yet. Call
/// [`Restored::resume`] once the flow's packets can reach this host, or
/// [`Restored::discard`]. Dropping it discards.
#[must_use = "dropping a Restored socket discards it"]
#[derive(Debug)]
pub struct Restored {
    sock: Option<OwnedFd>,
    flow: Flow,
    unsent: Vec<u8>,
    /// Our FIN comes after the unsent data (it was not sent at dump time).
    fin_after_unsent: bool,
    /// Applied after the unsent data is queued (it gates sendmsg).
    notsent_lowat: Option<u32>,
    /// The peer's FIN must be delivered to the socket (forged) on resume.
    peer_fin: Option<PeerFin>,
}

#[derive(Debug, Clone, Copy)]
struct PeerFin {
    seq: u32,
    window: u16,
}

fn k(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::kernel(what, e)
}

/// Which socket buffer a queue is charged to.
#[derive(Clone, Copy)]
enum Buf {
    Recv,
    Send,
}

impl Buf {
    fn options(self) -> (i32, i32) {
        match self {
            Buf::Recv => (SO_RCVBUFFORCE, libc::SO_RCVBUF),
            Buf::Send => (SO_SNDBUFFORCE, libc::SO_SNDBUF),
        }
    }

    /// The buffer's size as `setsockopt` takes it (the kernel doubles it
    /// for its own overhead, and `getsockopt` shows the doubled value).
    fn current(self, fd: BorrowedFd<'_>) -> usize {
        let (_, get) = self.options();
        sys::get_int(fd, libc::SOL_SOCKET, get).unwrap_or(0).max(0) as usize / 2
    }

    /// Sets the buffer to at least `want` bytes (as `setsockopt` takes
    /// it). The buffer never shrinks below what it is.
    fn ensure(self, fd: BorrowedFd<'_>, want: usize) {
        let (force, _) = self.options();
        if want > self.current(fd) {
            let v = want.min(i32::MAX as usize / 2) as i32;
            // Best effort: a refusal shows up as EAGAIN/ENOMEM in `fill`.
            let _ = sys::set_int(fd, libc::SOL_SOCKET, force, v);
        }
    }
}

/// Room for a queue of `len` bytes beyond the data itself (skb overhead).
fn room_for(len: usize) -> usize {
    len + len / 4 + 64 * 1024
}

/// Queues `data` (on the selected repair queue, or as ordinary data once
/// repair is off), in chunks: a large `send` can fail with ENOMEM, and a
/// full buffer answers EAGAIN. A full buffer is made larger, never waited
/// on: the original socket held this data, so the copy must hold it too,
/// even while the peer offers a zero window.
fn fill(fd: BorrowedFd<'_>, data: &[u8], buf: Buf, what: &'static str) -> Result<(), Error> {
    let mut off = 0;
    let mut chunk = 256 * 1024;
    let mut stalls = 0;
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        match sys::send_some(fd, &data[off..end]) {
            Ok(n) => {
                off += n;
                stalls = 0;
            }
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::EAGAIN))
                    && stalls < 64 =>
            {
                stalls += 1;
                chunk = (chunk / 2).max(1024);
                buf.ensure(fd, buf.current(fd).max(64 * 1024) * 2);
            }
            Err(e) => return Err(Error::kernel(what, e)),
        }
    }
    Ok(())
}

/// Builds a socket from `img`, in repair mode. Works while the local address
/// is not (yet) assigned on this host (`IP_TRANSPARENT`). On error the new
/// socket is closed silently and nothing else changed.
pub fn restore(img: &ConnectionImage) -> Result<Restored, Error> {
    img.validate()?;
    let flow = Flow {
        local: img.local,
        peer: img.peer,
    };
    let v6 = img.local.is_ipv6();
    let sock = sys::tcp_socket(v6).map_err(k("create a socket"))?;
    let fd = sock.as_fd();
    // The local address need not be ours yet: output routing accepts a
    // non-local source only with IP_TRANSPARENT (freebind is not enough).
    let r = if v6 {
        sys::set_int(fd, libc::SOL_IPV6, IPV6_TRANSPARENT, 1)
    } else {
        sys::set_int(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1)
    };
    r.map_err(k("set IP_TRANSPARENT"))?;
    sys::set_repair(fd, sys::REPAIR_ON).map_err(k("turn on repair mode"))?;
    let mut restored = Restored {
        sock: Some(sock),
        flow,
        unsent: img.send_queue.unsent.clone(),
        fin_after_unsent: false,
        notsent_lowat: img.socket_options.notsent_lowat,
        peer_fin: None,
    };
    restored.build(img)?;
    Ok(restored)
}

impl Restored {
    fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_ref().expect("present until consumed").as_fd()
    }

    /// The restored flow.
    pub fn flow(&self) -> Flow {
        self.flow
    }

    fn build(&mut self, img: &ConnectionImage) -> Result<(), Error> {
        let sock = self.sock.take().expect("present until consumed");
        let r = self.build_on(sock.as_fd(), img);
        self.sock = Some(sock);
        r
    }

    fn build_on(&mut self, fd: BorrowedFd<'_>, img: &ConnectionImage) -> Result<(), Error> {
        let so = &img.socket_options;
        // Buffers first, so that the queues fit. The original's buffer can
        // be smaller than its queue (the kernel moderates sk_sndbuf to half
        // the queued memory under pressure), so the queue sets the floor.
        let send_len = img.send_queue.sent.len() + img.send_queue.unsent.len();
        Buf::Recv.ensure(
            fd,
            (so.rcvbuf.unwrap_or(0) as usize).max(room_for(img.recv_queue.len())),
        );
        Buf::Send.ensure(
            fd,
            (so.sndbuf.unwrap_or(0) as usize).max(room_for(send_len)),
        );
        // Sequence numbers are accepted only in CLOSE, so before connect.
        let recv_start = img.recv_seq.back(img.recv_queue.len() as u32);
        let send_start = img.send_seq.back(img.send_queue.len() as u32);
        sys::set_repair_queue(fd, Queue::Recv).map_err(k("select the receive queue"))?;
        sys::set_queue_seq(fd, recv_start.0).map_err(k("set the receive sequence"))?;
        sys::set_repair_queue(fd, Queue::Send).map_err(k("select the send queue"))?;
        sys::set_queue_seq(fd, send_start.0).map_err(k("set the send sequence"))?;

        let in_use = |e: std::io::Error| match sys::raw_os_error(&e) {
            Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL) => Error::AddressInUse {
                local: img.local,
                peer: img.peer,
            },
            _ => Error::kernel(format!("restore {} -> {}", img.local, img.peer), e),
        };
        // In repair mode bind forces the address (SK_FORCE_REUSE) and connect
        // goes straight to ESTABLISHED without a SYN.
        sys::bind(fd, img.local).map_err(in_use)?;
        sys::connect(fd, img.peer).map_err(in_use)?;

        let o = &img.options;
        if o.timestamps {
            sys::set_tcp_timestamp(fd, img.timestamp).map_err(k("set TCP_TIMESTAMP"))?;
        }
        // Only in ESTABLISHED and, since Linux 6.2, before any data is queued.
        let mut opts = vec![RepairOpt {
            code: TCPOPT_MSS,
            val: o.mss.into(),
        }];
        if o.window_scaling {
            opts.push(RepairOpt {
                code: TCPOPT_WINDOW,
                val: u32::from(o.snd_wscale) | u32::from(o.rcv_wscale) << 16,
            });
        }
        if o.sack {
            opts.push(RepairOpt {
                code: TCPOPT_SACK_PERM,
                val: 0,
            });
        }
        if o.timestamps {
            opts.push(RepairOpt {
                code: TCPOPT_TIMESTAMP,
                val: 0,
            });
        }
        sys::set_repair_options(fd, &opts).map_err(k("set TCP_REPAIR_OPTIONS"))?;

        sys::set_repair_queue(fd, Queue::Recv).map_err(k("select the receive queue"))?;
        fill(fd, &img.recv_queue, Buf::Recv, "queue the receive queue")?;
        sys::set_repair_queue(fd, Queue::Send).map_err(k("select the send queue"))?;
        fill(fd, &img.send_queue.sent, Buf::Send, "queue the send queue")?;
        // Our FIN, if it was already sent: replayed while the send queue is
        // selected, so the kernel marks it sent instead of transmitting it.
        let peer_fin = img.state.peer_closed();
        if img.state.we_closed() {
            if img.send_queue.unsent.is_empty() && !peer_fin {
                sys::shutdown_write(fd).map_err(k("replay our FIN"))?;
            } else {
                self.fin_after_unsent = true;
            }
        }
        sys::set_repair_queue(fd, Queue::No).map_err(k("leave the repair queue"))?;

        let mut w = img.window;
        if peer_fin {
            // rcv_nxt is one short of the peer's FIN, which is replayed on
            // resume; the kernel requires rcv_wup <= rcv_nxt.
            if w.rcv_wup == img.recv_seq.forward(1).0 {
                w.rcv_wup = w.rcv_wup.wrapping_sub(1);
                w.rcv_wnd = w.rcv_wnd.saturating_add(1);
            }
            let shift = if o.window_scaling { o.snd_wscale } else { 0 };
            self.peer_fin = Some(PeerFin {
                seq: img.recv_seq.0,
                window: u16::try_from(img.window.snd_wnd >> shift).unwrap_or(u16::MAX),
            });
        }
        sys::set_repair_window(fd, w).map_err(k("set TCP_REPAIR_WINDOW"))?;
        apply_socket_options(fd, so, img.local.is_ipv6())?;
        Ok(())
    }

    /// Brings the connection to life: delivers the peer's FIN if it had
    /// closed, turns repair mode off (the kernel sends a window probe, so the
    /// peer answers at once), queues the unsent data and replays our FIN if
    /// it was not yet sent. The local address must be reachable by now.
    pub fn resume(mut self) -> Result<TcpStream, Error> {
        if let Some(fin) = self.peer_fin {
            self.deliver_peer_fin(fin)?;
        }
        let sock = self.sock.take().expect("present until consumed");
        let fd = sock.as_fd();
        if let Err(e) = sys::set_repair(fd, sys::REPAIR_OFF) {
            // Put it back so Drop discards it silently.
            self.sock = Some(sock);
            return Err(Error::kernel("turn off repair mode", e));
        }
        fill(fd, &self.unsent, Buf::Send, "queue the unsent data")?;
        // TCP_NOTSENT_LOWAT gates sendmsg on the unsent bytes, so it is
        // set only once they are queued.
        if let Some(v) = self.notsent_lowat {
            sys::set_int(fd, libc::SOL_TCP, libc::TCP_NOTSENT_LOWAT, v as i32)
                .map_err(k("set TCP_NOTSENT_LOWAT"))?;
        }
        if self.fin_after_unsent {
            sys::shutdown_write(fd).map_err(k("replay our FIN"))?;
        }
        Ok(TcpStream::from(sock))
    }

    /// Delivers a forged FIN|ACK from the peer to the restored socket (there
    /// is no socket call for "the peer closed"). Its ACK must be current
    /// (snd_una now) and it carries no timestamp option.
    fn deliver_peer_fin(&self, fin: PeerFin) -> Result<(), Error> {
        let fd = self.fd();
        sys::set_repair_queue(fd, Queue::Send).map_err(k("select the send queue"))?;
        let write_seq = sys::queue_seq(fd).map_err(k("read the send sequence"))?;
        sys::set_repair_queue(fd, Queue::No).map_err(k("leave the repair queue"))?;
        let outq = sys::outq(fd).map_err(k("read the send queue size"))?;
        let snd_una = write_seq.wrapping_sub(outq);
        let pkt = forge_fin(
            self.flow.peer,
            self.flow.local,
            fin.seq,
            snd_una,
            fin.window,
        );
        sys::send_raw_ip(&pkt, self.flow.local).map_err(k("deliver the peer's FIN"))?;
        // The packet is processed on loopback; wait until the socket saw it.
        for _ in 0..200 {
            let st = sys::tcp_info(fd).map_err(k("read TCP_INFO"))?.state;
            if st != 1 {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(Error::Inconsistent(format!(
            "{} -> {}: the socket did not take the replayed FIN of the peer (is the local address assigned?)",
            self.flow.local, self.flow.peer
        )))
    }

    /// Closes the socket while in repair mode: no FIN, no RST.
    pub fn discard(mut self) {
        drop(self.sock.take());
    }
}

/// Closes a live connection without a FIN or a RST: repair mode goes back
/// on first, and a socket closed in repair mode sends nothing (`__tcp_close`
/// hands a repair-mode socket to `tcp_disconnect`, which skips the reset).
/// For a connection resumed but not delivered: its peer sees silence, never
/// a clean end of stream that would pass for a complete response.
pub fn close_silently(sock: std::os::fd::OwnedFd) -> Result<(), Error> {
    sys::set_repair(sock.as_fd(), sys::REPAIR_ON)
        .map_err(|e| Error::kernel("turn repair mode back on to close silently", e))
}

impl Drop for Restored {
    fn drop(&mut self) {
        // Closing in repair mode sends nothing.
        drop(self.sock.take());
    }
}

fn apply_socket_options(fd: BorrowedFd<'_>, so: &SocketOptions, v6: bool) -> Result<(), Error> {
    let set = |level: i32, name: i32, v: Option<u32>, what: &'static str| -> Result<(), Error> {
        match v {
            Some(v) => sys::set_int(fd, level, name, v as i32)
                .map_err(|e| Error::kernel(format!("set {what}"), e)),
            None => Ok(()),
        }
    };
    let b = |v: Option<bool>| v.map(u32::from);
    set(
        libc::SOL_TCP,
        libc::TCP_NODELAY,
        b(so.nodelay),
        "TCP_NODELAY",
    )?;
    set(
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        b(so.keepalive),
        "SO_KEEPALIVE",
    )?;
    set(
        libc::SOL_TCP,
        libc::TCP_KEEPIDLE,
        so.keepalive_idle_secs,
        "TCP_KEEPIDLE",
    )?;
    set(
        libc::SOL_TCP,
        libc::TCP_KEEPINTVL,
        so.keepalive_interval_secs,
        "TCP_KEEPINTVL",
    )?;
    set(
        libc::SOL_TCP,
        libc::TCP_KEEPCNT,
        so.keepalive_count,
        "TCP_KEEPCNT",
    )?;
    set(
        libc::SOL_TCP,
        libc::TCP_USER_TIMEOUT,
        so.user_timeout_ms,
        "TCP_USER_TIMEOUT",
    )?;
    set(libc::SOL_SOCKET, libc::SO_MARK, so.mark, "SO_MARK")?;
    if v6 {
        set(libc::SOL_IPV6, libc::IPV6_TCLASS, so.tos, "IPV6_TCLASS")?;
        set(
            libc::SOL_IPV6,
            libc::IPV6_UNICAST_HOPS,
            so.ttl,
            "IPV6_UNICAST_HOPS",
        )?;
    } else {
        set(libc::SOL_IP, libc::IP_TOS, so.tos, "IP_TOS")?;
        set(libc::SOL_IP, libc::IP_TTL, so.ttl, "IP_TTL")?;
    }
    // After IP_TOS, which also sets the priority (ip(7)).
    set(
        libc::SOL_SOCKET,
        libc::SO_PRIORITY,
        so.priority,
        "SO_PRIORITY",
    )?;
    if let Some(cc) = &so.congestion {
        // An algorithm missing on this host is not fatal: the connection
        // carries on with the default one.
        if let Err(e) = sys::set_string(fd, libc::SOL_TCP, libc::TCP_CONGESTION, cc) {
            tracing::warn!("congestion control {cc:?} unavailable here ({e}); using the default");
        }
    }
    if let Some(l) = so.linger_secs {
        sys::set_linger(fd, l as i32).map_err(k("set SO_LINGER"))?;
    }
    Ok(())
}

/// Internet checksum (RFC 1071) over `chunks`, as one byte string.
fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for c in chunks {
        for &b in c.iter() {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IP packet carrying a bare TCP FIN|ACK from `src` to `dst`.
fn forge_fin(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32, window: u16) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 20 bytes, no options
    tcp[13] = 0x11; // FIN | ACK
    tcp[14..16].copy_from_slice(&window.to_be_bytes());
    let tcp_len = (tcp.len() as u16).to_be_bytes();
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            let pseudo = [
                &s.ip().octets()[..],
                &d.ip().octets()[..],
                &[0, 6],
                &tcp_len[..],
            ]
            .concat();
            let c = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&s.ip().octets());
            ip[16..20].copy_from_slice(&d.ip().octets());
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            [&ip[..], &tcp[..]].concat()
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            let pseudo = [
                &s.ip().octets()[..],
                &d.ip().octets()[..],
                &[0, 0, 0, 20],
                &[0, 0, 0, 6],
            ]
            .concat();
            let c = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.ip().octets());
            ip[24..40].copy_from_slice(&d.ip().octets());
            [&ip[..], &tcp[..]].concat()
        }
        _ => unreachable!("validated images have one address family"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 §3: the sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
    }

    #[test]
    fn forged_ipv4_fin_has_valid_checksums() {
        let p = forge_fin(
            "10.0.0.2:5000".parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
            7,
            9,
            100,
        );
        assert_eq!(p.len(), 40);
        assert_eq!(checksum(&[&p[..20]]), 0);
        let pseudo = [&p[12..20], &[0, 6, 0, 20][..]].concat();
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0);
        assert_eq!(p[33], 0x11);
    }
}
