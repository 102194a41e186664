//! The request head a listener peeks at before it routes a connection, and
//! the answers it sends when it cannot route one.
//!
//! The parsers take the bytes peeked so far (`MSG_PEEK`: nothing is
//! consumed, the backend reads the same bytes) and answer `Incomplete`
//! until the head is whole, so the caller peeks again when more arrive. A
//! head that does not end within `max_head_bytes` is `TooLarge`; bytes that
//! cannot start or continue a head are `Malformed`. They never panic, on any
//! input (the fuzz targets `http_head` and `tls_head` check this).

pub mod http;
pub mod tls;

use crate::config::Protocol;

/// What routing needs from a connection's first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// An HTTP/1.x request head.
    Http {
        /// The method, as sent (`GET`, `POST`, ...).
        method: String,
        /// The request target's path and query (`/a/b?c`); for an
        /// absolute-form target (`http://host/a`) its path (`/a`); `*` for
        /// the asterisk form; the authority for `CONNECT`.
        path: String,
        /// The host the request is for, lowercase and without port: the
        /// absolute-form target's host if there is one (RFC 9112 §3.2.2),
        /// else the `Host` header; `None` when neither names one.
        host: Option<String>,
    },
    /// A TLS ClientHello.
    Tls {
        /// The `server_name` extension's host name, lowercase, without a
        /// trailing dot.
        sni: Option<String>,
        /// The ALPN protocols offered, in the client's order (bytes that
        /// are not UTF-8 are replaced by U+FFFD).
        alpn: Vec<String>,
    },
    /// A `tcp` listener reads nothing.
    Tcp,
}

/// Why no head (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The head is not whole yet: peek again when more bytes arrive.
    #[error("the head is not complete yet")]
    Incomplete,
    /// The bytes are not a head of this protocol (HTTP: answer 400; TLS:
    /// close).
    #[error("malformed head: {0}")]
    Malformed(String),
    /// The head does not end within `max_head_bytes` (HTTP: answer 431;
    /// TLS: close).
    #[error("the head does not end within max_head_bytes")]
    TooLarge,
}

/// Reads the head of a connection on a `protocol` listener from `bytes`,
/// the connection's first bytes peeked so far, waiting for no more than
/// `max_head_bytes`.
pub fn parse(protocol: Protocol, bytes: &[u8], max_head_bytes: usize) -> Result<Head, HeadError> {
    match protocol {
        Protocol::Http => http::parse(bytes, max_head_bytes),
        Protocol::Tls => tls::parse(bytes, max_head_bytes),
        Protocol::Tcp => Ok(Head::Tcp),
    }
}

/// `Incomplete`, or `TooLarge` when `seen` bytes already reach the limit.
fn incomplete(seen: usize, max_head_bytes: usize) -> HeadError {
    if seen >= max_head_bytes {
        HeadError::TooLarge
    } else {
        HeadError::Incomplete
    }
}

/// A whole HTTP/1.1 response with `Connection: close` and no body, for a
/// connection the balancer answers itself: 400 (malformed head), 404 (no
/// route), 408 (head timeout), 431 (head too large), 502 (no member
/// reachable), 503 (no usable member); any other status gives 500.
pub fn http_error_response(status: u16) -> &'static [u8] {
    macro_rules! response {
        ($status_line:literal) => {
            concat!(
                "HTTP/1.1 ",
                $status_line,
                "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes()
        };
    }
    match status {
        400 => response!("400 Bad Request"),
        404 => response!("404 Not Found"),
        408 => response!("408 Request Timeout"),
        431 => response!("431 Request Header Fields Too Large"),
        502 => response!("502 Bad Gateway"),
        503 => response!("503 Service Unavailable"),
        _ => response!("500 Internal Server Error"),
    }
}

/// TLS alert `unrecognized_name` (RFC 6066 §3): no route for this SNI.
pub const ALERT_UNRECOGNIZED_NAME: u8 = 112;
/// TLS alert `internal_error` (RFC 8446 §6.2): no member could take it.
pub const ALERT_INTERNAL_ERROR: u8 = 80;
/// TLS alert `decode_error` (RFC 8446 §6.2): the ClientHello is malformed.
pub const ALERT_DECODE_ERROR: u8 = 50;

/// A fatal TLS alert record with `description` (e.g.
/// [`ALERT_UNRECOGNIZED_NAME`]), to send before closing a TLS connection the
/// balancer refuses.
pub fn tls_alert(description: u8) -> [u8; 7] {
    const CONTENT_TYPE_ALERT: u8 = 21;
    // RFC 8446 §5.1: every record but the initial ClientHello carries
    // legacy_record_version 0x0303.
    const LEGACY_RECORD_VERSION: [u8; 2] = [3, 3];
    const ALERT_BYTES: [u8; 2] = [0, 2];
    const LEVEL_FATAL: u8 = 2;
    [
        CONTENT_TYPE_ALERT,
        LEGACY_RECORD_VERSION[0],
        LEGACY_RECORD_VERSION[1],
        ALERT_BYTES[0],
        ALERT_BYTES[1],
        LEVEL_FATAL,
        description,
    ]
}
