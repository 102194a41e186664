//! The tcpr connection image: everything needed to bring a frozen TCP
//! connection back to life elsewhere, as typed Rust values, a checked binary
//! envelope around a protobuf body, and a JSON view for people.
//!
//! This crate is pure: it makes no system calls and has no `unsafe`. It does
//! not freeze, dump or restore sockets (that is `tcpr-engine`), and it does
//! not encrypt images (the handoff channel does).
//!
//! ```
//! use tcpr_image::{ConnectionImage, TcpState};
//! let mut img = ConnectionImage::example();
//! img.state = TcpState::CloseWait;
//! let bytes = img.encode().unwrap();
//! let back = ConnectionImage::decode(&bytes).unwrap();
//! assert_eq!(img, back);
//! assert!(ConnectionImage::decode(&bytes[..bytes.len() - 1]).is_err());
//! ```
#![forbid(unsafe_code)]
// Pure: no clock (the methods are listed in .clippy.toml).
#![deny(clippy::disallowed_methods)]

pub mod format;
mod json;
mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/tcpr.image.v1.rs"));
}

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

pub use format::ImageError;
pub use json::{to_json, WindowView};

/// A TCP sequence number: arithmetic wraps modulo 2^32 (RFC 9293 §3.4).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct Seq(pub u32);

impl Seq {
    /// The sequence number `n` bytes later.
    pub fn forward(self, n: u32) -> Seq {
        Seq(self.0.wrapping_add(n))
    }
    /// The sequence number `n` bytes earlier.
    pub fn back(self, n: u32) -> Seq {
        Seq(self.0.wrapping_sub(n))
    }
}

impl fmt::Debug for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Seq({})", self.0)
    }
}

/// The TCP states tcpr can carry (numbers as in `linux/tcp_states.h`).
///
/// Other states (SYN_SENT, TIME_WAIT, LISTEN, …) cannot be restored by the
/// kernel's repair mode and are refused at dump time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// Both directions open.
    Established,
    /// We closed, our FIN is not yet acknowledged.
    FinWait1,
    /// We closed, our FIN was acknowledged; the peer may still send.
    FinWait2,
    /// The peer closed; we may still send.
    CloseWait,
    /// Both closed, the peer first; our FIN is not yet acknowledged.
    LastAck,
    /// Both closed at once; our FIN is not yet acknowledged.
    Closing,
}

impl TcpState {
    /// The kernel's number for this state (`TCP_ESTABLISHED` = 1, …).
    pub fn kernel_number(self) -> u8 {
        match self {
            TcpState::Established => 1,
            TcpState::FinWait1 => 4,
            TcpState::FinWait2 => 5,
            TcpState::CloseWait => 8,
            TcpState::LastAck => 9,
            TcpState::Closing => 11,
        }
    }
    /// The state for a kernel state number, if tcpr can carry it.
    pub fn from_kernel_number(n: u8) -> Option<TcpState> {
        Some(match n {
            1 => TcpState::Established,
            4 => TcpState::FinWait1,
            5 => TcpState::FinWait2,
            8 => TcpState::CloseWait,
            9 => TcpState::LastAck,
            11 => TcpState::Closing,
            _ => return None,
        })
    }
    /// The kernel's name of a state number, for messages about any state.
    pub fn kernel_name(n: u8) -> &'static str {
        match n {
            1 => "ESTABLISHED",
            2 => "SYN_SENT",
            3 => "SYN_RECV",
            4 => "FIN_WAIT1",
            5 => "FIN_WAIT2",
            6 => "TIME_WAIT",
            7 => "CLOSE",
            8 => "CLOSE_WAIT",
            9 => "LAST_ACK",
            10 => "LISTEN",
            11 => "CLOSING",
            12 => "NEW_SYN_RECV",
            _ => "UNKNOWN",
        }
    }
    /// True when we have sent (or queued) our FIN: the send direction is closed.
    pub fn we_closed(self) -> bool {
        matches!(
            self,
            TcpState::FinWait1 | TcpState::FinWait2 | TcpState::LastAck | TcpState::Closing
        )
    }
    /// True when the peer's FIN has been received: the receive direction is closed.
    pub fn peer_closed(self) -> bool {
        matches!(
            self,
            TcpState::CloseWait | TcpState::LastAck | TcpState::Closing
        )
    }
    /// True when our FIN occupies a sequence number not yet acknowledged.
    pub fn fin_unacked(self) -> bool {
        matches!(
            self,
            TcpState::FinWait1 | TcpState::LastAck | TcpState::Closing
        )
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(TcpState::kernel_name(self.kernel_number()))
    }
}

/// TCP options negotiated in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpOptions {
    /// Maximum segment size (the MSS clamp).
    pub mss: u16,
    /// SACK permitted.
    pub sack: bool,
    /// Timestamps (RFC 7323) in use.
    pub timestamps: bool,
    /// Window scaling negotiated: when set, the two shifts apply.
    pub window_scaling: bool,
    /// Shift applied to the window the peer advertises to us.
    pub snd_wscale: u8,
    /// Shift applied to the window we advertise.
    pub rcv_wscale: u8,
}

/// `struct tcp_repair_window`: the window state of both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RepairWindow {
    /// Sequence number of the segment that last updated the send window.
    pub snd_wl1: u32,
    /// The peer's receive window, in bytes.
    pub snd_wnd: u32,
    /// Largest window the peer ever advertised.
    pub max_window: u32,
    /// Our receive window, in bytes.
    pub rcv_wnd: u32,
    /// `rcv_nxt` when we last advertised a window.
    pub rcv_wup: u32,
}

/// Socket options a process may have set; `None` means the kernel default.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct SocketOptions {
    /// TCP_NODELAY.
    pub nodelay: Option<bool>,
    /// SO_KEEPALIVE.
    pub keepalive: Option<bool>,
    /// TCP_KEEPIDLE, seconds.
    pub keepalive_idle_secs: Option<u32>,
    /// TCP_KEEPINTVL, seconds.
    pub keepalive_interval_secs: Option<u32>,
    /// TCP_KEEPCNT.
    pub keepalive_count: Option<u32>,
    /// TCP_USER_TIMEOUT, milliseconds.
    pub user_timeout_ms: Option<u32>,
    /// TCP_CONGESTION algorithm name.
    pub congestion: Option<String>,
    /// TCP_NOTSENT_LOWAT, bytes.
    pub notsent_lowat: Option<u32>,
    /// SO_RCVBUF as the process set it (half what the kernel reports).
    pub rcvbuf: Option<u32>,
    /// SO_SNDBUF as the process set it (half what the kernel reports).
    pub sndbuf: Option<u32>,
    /// SO_MARK.
    pub mark: Option<u32>,
    /// SO_PRIORITY.
    pub priority: Option<u32>,
    /// IP_TOS (IPv4) or IPV6_TCLASS (IPv6).
    pub tos: Option<u32>,
    /// IP_TTL (IPv4) or IPV6_UNICAST_HOPS (IPv6).
    pub ttl: Option<u32>,
    /// SO_LINGER with l_onoff set: l_linger in seconds.
    pub linger_secs: Option<u32>,
    /// SO_BUF_LOCK: which buffer sizes the process set, and so the kernel
    /// no longer autotunes ([`BUF_LOCK_SEND`], [`BUF_LOCK_RECV`]). `None`:
    /// unknown (an image from before, or a kernel older than 5.14);
    /// restored as set.
    pub buf_lock: Option<u32>,
}

/// [`SocketOptions::buf_lock`]: the send buffer's size was set
/// (`SOCK_SNDBUF_LOCK`).
pub const BUF_LOCK_SEND: u32 = 1;
/// [`SocketOptions::buf_lock`]: the receive buffer's size was set
/// (`SOCK_RCVBUF_LOCK`).
pub const BUF_LOCK_RECV: u32 = 2;

/// The send queue, split as the kernel needs it back.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SendQueue {
    /// Sent and not yet acknowledged: restored as already sent, retransmitted
    /// by the kernel as needed.
    pub sent: Vec<u8>,
    /// Written by the application and not yet sent: sent normally after resume.
    pub unsent: Vec<u8>,
}

impl SendQueue {
    /// Total bytes in the send queue (what `SIOCOUTQ` reports, FIN excluded).
    pub fn len(&self) -> usize {
        self.sent.len() + self.unsent.len()
    }
    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The complete state of one TCP connection.
///
/// Invariants (checked by [`ConnectionImage::validate`] and on decode): both
/// addresses have the same family, ports are non-zero, the MSS is non-zero,
/// window shifts are at most 14 (RFC 7323 §2.3) and zero unless scaling was
/// negotiated, the queues fit in a 32-bit sequence space, and the buffer
/// lock names only the send and receive buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionImage {
    /// Our address and port.
    pub local: SocketAddr,
    /// The peer's address and port.
    pub peer: SocketAddr,
    /// TCP state at dump time.
    pub state: TcpState,
    /// Sequence number after the last data byte we queued (our FIN excluded).
    pub send_seq: Seq,
    /// Next sequence number expected from the peer (the peer's FIN excluded).
    pub recv_seq: Seq,
    /// Bytes received and not yet read by the application.
    pub recv_queue: Vec<u8>,
    /// The send queue.
    pub send_queue: SendQueue,
    /// Negotiated TCP options.
    pub options: TcpOptions,
    /// Window state.
    pub window: RepairWindow,
    /// `TCP_TIMESTAMP` at dump time.
    pub timestamp: u32,
    /// Socket options.
    pub socket_options: SocketOptions,
    /// Opaque application state travelling with the connection.
    pub app_blob: Vec<u8>,
    /// Wall-clock time of the dump, nanoseconds since the Unix epoch.
    pub dumped_at_unix_ns: u64,
}

impl ConnectionImage {
    /// Encodes the image: envelope plus protobuf body. What [`decode`]
    /// would refuse is refused here, with the same error: an image that
    /// breaks an invariant ([`validate`]) or whose body would exceed
    /// [`format::MAX_BODY`].
    ///
    /// [`decode`]: ConnectionImage::decode
    /// [`validate`]: ConnectionImage::validate
    pub fn encode(&self) -> Result<Vec<u8>, ImageError> {
        use prost::Message;
        self.validate()?;
        let mut pb = self.to_pb_without_data();
        // The body is at least the rest plus the queues and the blob: when
        // that is already over the limit, refuse before copying them.
        let at_least = [
            self.recv_queue.len(),
            self.send_queue.sent.len(),
            self.send_queue.unsent.len(),
            self.app_blob.len(),
        ]
        .iter()
        .fold(pb.encoded_len(), |a, &b| a.saturating_add(b));
        format::checked_body_len(at_least)?;
        pb.recv_queue = self.recv_queue.clone();
        pb.send_queue_sent = self.send_queue.sent.clone();
        pb.send_queue_unsent = self.send_queue.unsent.clone();
        pb.app_blob = self.app_blob.clone();
        format::seal(&pb.encode_to_vec())
    }

    /// Decodes exactly one image from `bytes`; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<ConnectionImage, ImageError> {
        let (img, rest) = Self::decode_prefix(bytes)?;
        if !rest.is_empty() {
            return Err(ImageError::TrailingBytes(rest.len()));
        }
        Ok(img)
    }

    /// Decodes one image from the front of `bytes` and returns the rest, for
    /// streams of images.
    pub fn decode_prefix(bytes: &[u8]) -> Result<(ConnectionImage, &[u8]), ImageError> {
        use prost::Message;
        let (version, body, rest) = format::open(bytes)?;
        let img = match version {
            1 => {
                let pb = pb::ConnectionImage::decode(body).map_err(|_| ImageError::Malformed)?;
                Self::from_pb(pb)?
            }
            v => return Err(ImageError::UnsupportedVersion(v)),
        };
        Ok((img, rest))
    }

    /// Checks the invariants listed on the type.
    pub fn validate(&self) -> Result<(), ImageError> {
        if self.local.is_ipv4() != self.peer.is_ipv4() {
            return Err(ImageError::Invalid(
                "local and peer address families differ",
            ));
        }
        if self.local.port() == 0 || self.peer.port() == 0 {
            return Err(ImageError::Invalid("port 0"));
        }
        if self.options.mss == 0 {
            return Err(ImageError::Invalid("mss is 0"));
        }
        let o = &self.options;
        if o.snd_wscale > 14 || o.rcv_wscale > 14 {
            return Err(ImageError::Invalid("window scale above 14"));
        }
        if !o.window_scaling && (o.snd_wscale != 0 || o.rcv_wscale != 0) {
            return Err(ImageError::Invalid("window scale without window scaling"));
        }
        // A queue must be shorter than half the sequence space to be
        // unambiguous (RFC 9293 §3.4).
        let limit = 1usize << 30;
        if self.recv_queue.len() > limit || self.send_queue.len() > limit {
            return Err(ImageError::Invalid("queue longer than 1 GiB"));
        }
        if self
            .socket_options
            .buf_lock
            .is_some_and(|l| l & !(BUF_LOCK_SEND | BUF_LOCK_RECV) != 0)
        {
            return Err(ImageError::Invalid(
                "buffer lock bits other than send and receive",
            ));
        }
        Ok(())
    }

    /// A valid ESTABLISHED IPv4 image with small queues, for docs and tests.
    pub fn example() -> ConnectionImage {
        ConnectionImage {
            local: "10.0.0.1:80".parse().unwrap(),
            peer: "10.0.0.2:40000".parse().unwrap(),
            state: TcpState::Established,
            send_seq: Seq(1000),
            recv_seq: Seq(5000),
            recv_queue: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            send_queue: SendQueue {
                sent: b"HTTP/1.1 200".to_vec(),
                unsent: b" OK\r\n".to_vec(),
            },
            options: TcpOptions {
                mss: 1460,
                sack: true,
                timestamps: true,
                window_scaling: true,
                snd_wscale: 7,
                rcv_wscale: 7,
            },
            window: RepairWindow {
                snd_wl1: 5000,
                snd_wnd: 65535,
                max_window: 65535,
                rcv_wnd: 65535,
                rcv_wup: 5000,
            },
            timestamp: 123456,
            socket_options: SocketOptions {
                nodelay: Some(true),
                ..SocketOptions::default()
            },
            app_blob: vec![],
            dumped_at_unix_ns: 0,
        }
    }

    /// The protobuf message without the queues and the blob.
    fn to_pb_without_data(&self) -> pb::ConnectionImage {
        let s = &self.socket_options;
        pb::ConnectionImage {
            local: Some(endpoint_to_pb(self.local)),
            peer: Some(endpoint_to_pb(self.peer)),
            state: state_to_pb(self.state) as i32,
            send_seq: self.send_seq.0,
            recv_seq: self.recv_seq.0,
            recv_queue: vec![],
            send_queue_sent: vec![],
            send_queue_unsent: vec![],
            options: Some(pb::TcpOptions {
                mss: self.options.mss.into(),
                sack: self.options.sack,
                timestamps: self.options.timestamps,
                window_scaling: self.options.window_scaling,
                snd_wscale: self.options.snd_wscale.into(),
                rcv_wscale: self.options.rcv_wscale.into(),
            }),
            window: Some(pb::RepairWindow {
                snd_wl1: self.window.snd_wl1,
                snd_wnd: self.window.snd_wnd,
                max_window: self.window.max_window,
                rcv_wnd: self.window.rcv_wnd,
                rcv_wup: self.window.rcv_wup,
            }),
            timestamp: self.timestamp,
            socket_options: Some(pb::SocketOptions {
                nodelay: s.nodelay,
                keepalive: s.keepalive,
                keepalive_idle_secs: s.keepalive_idle_secs,
                keepalive_interval_secs: s.keepalive_interval_secs,
                keepalive_count: s.keepalive_count,
                user_timeout_ms: s.user_timeout_ms,
                congestion: s.congestion.clone(),
                notsent_lowat: s.notsent_lowat,
                rcvbuf: s.rcvbuf,
                sndbuf: s.sndbuf,
                mark: s.mark,
                priority: s.priority,
                tos: s.tos,
                ttl: s.ttl,
                linger_secs: s.linger_secs,
                buf_lock: s.buf_lock,
            }),
            app_blob: vec![],
            dumped_at_unix_ns: self.dumped_at_unix_ns,
        }
    }

    fn from_pb(p: pb::ConnectionImage) -> Result<ConnectionImage, ImageError> {
        let local = endpoint_from_pb(p.local.as_ref(), "local")?;
        let peer = endpoint_from_pb(p.peer.as_ref(), "peer")?;
        let state = match pb::TcpState::try_from(p.state) {
            Ok(pb::TcpState::Established) => TcpState::Established,
            Ok(pb::TcpState::FinWait1) => TcpState::FinWait1,
            Ok(pb::TcpState::FinWait2) => TcpState::FinWait2,
            Ok(pb::TcpState::CloseWait) => TcpState::CloseWait,
            Ok(pb::TcpState::LastAck) => TcpState::LastAck,
            Ok(pb::TcpState::Closing) => TcpState::Closing,
            _ => return Err(ImageError::Invalid("unknown TCP state")),
        };
        let o = p.options.ok_or(ImageError::Invalid("missing options"))?;
        let w = p.window.ok_or(ImageError::Invalid("missing window"))?;
        let s = p.socket_options.unwrap_or_default();
        let small =
            |v: u32, what: &'static str| u8::try_from(v).map_err(|_| ImageError::Invalid(what));
        let img = ConnectionImage {
            local,
            peer,
            state,
            send_seq: Seq(p.send_seq),
            recv_seq: Seq(p.recv_seq),
            recv_queue: p.recv_queue,
            send_queue: SendQueue {
                sent: p.send_queue_sent,
                unsent: p.send_queue_unsent,
            },
            options: TcpOptions {
                mss: u16::try_from(o.mss).map_err(|_| ImageError::Invalid("mss above 65535"))?,
                sack: o.sack,
                timestamps: o.timestamps,
                window_scaling: o.window_scaling,
                snd_wscale: small(o.snd_wscale, "window scale above 14")?,
                rcv_wscale: small(o.rcv_wscale, "window scale above 14")?,
            },
            window: RepairWindow {
                snd_wl1: w.snd_wl1,
                snd_wnd: w.snd_wnd,
                max_window: w.max_window,
                rcv_wnd: w.rcv_wnd,
                rcv_wup: w.rcv_wup,
            },
            timestamp: p.timestamp,
            socket_options: SocketOptions {
                nodelay: s.nodelay,
                keepalive: s.keepalive,
                keepalive_idle_secs: s.keepalive_idle_secs,
                keepalive_interval_secs: s.keepalive_interval_secs,
                keepalive_count: s.keepalive_count,
                user_timeout_ms: s.user_timeout_ms,
                congestion: s.congestion,
                notsent_lowat: s.notsent_lowat,
                rcvbuf: s.rcvbuf,
                sndbuf: s.sndbuf,
                mark: s.mark,
                priority: s.priority,
                tos: s.tos,
                ttl: s.ttl,
                linger_secs: s.linger_secs,
                buf_lock: s.buf_lock,
            },
            app_blob: p.app_blob,
            dumped_at_unix_ns: p.dumped_at_unix_ns,
        };
        img.validate()?;
        Ok(img)
    }
}

fn state_to_pb(s: TcpState) -> pb::TcpState {
    match s {
        TcpState::Established => pb::TcpState::Established,
        TcpState::FinWait1 => pb::TcpState::FinWait1,
        TcpState::FinWait2 => pb::TcpState::FinWait2,
        TcpState::CloseWait => pb::TcpState::CloseWait,
        TcpState::LastAck => pb::TcpState::LastAck,
        TcpState::Closing => pb::TcpState::Closing,
    }
}

fn endpoint_to_pb(a: SocketAddr) -> pb::Endpoint {
    match a {
        SocketAddr::V4(v4) => pb::Endpoint {
            addr: v4.ip().octets().to_vec(),
            port: v4.port().into(),
            scope_id: 0,
        },
        SocketAddr::V6(v6) => pb::Endpoint {
            addr: v6.ip().octets().to_vec(),
            port: v6.port().into(),
            scope_id: v6.scope_id(),
        },
    }
}

fn endpoint_from_pb(
    e: Option<&pb::Endpoint>,
    which: &'static str,
) -> Result<SocketAddr, ImageError> {
    let e = e.ok_or(ImageError::Invalid(which))?;
    let port = u16::try_from(e.port).map_err(|_| ImageError::Invalid("port above 65535"))?;
    let ip = match e.addr.len() {
        4 => IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(&e.addr[..]).expect("len 4"),
        )),
        16 => {
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&e.addr[..]).expect("len 16"));
            return Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, e.scope_id)));
        }
        _ => return Err(ImageError::Invalid("address is neither 4 nor 16 bytes")),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests;
