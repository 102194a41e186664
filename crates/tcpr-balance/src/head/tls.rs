//! The TLS ClientHello (RFC 8446 §4.1.2, the same layout back to TLS 1.0),
//! read by hand: only the record framing, the hello's fixed fields and two
//! extensions, `server_name` (RFC 6066 §3) and ALPN (RFC 7301 §3.1).
//!
//! The hello may be split over several handshake records (RFC 8446 §5.1)
//! and any number of TCP segments; the parser reassembles the records'
//! fragments and answers `Incomplete` until the hello is whole.

use super::{incomplete, Head, HeadError};
use crate::route::normalize_host;

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Content type (1), legacy_record_version (2), length (2).
const RECORD_HEADER_BYTES: usize = 5;
/// msg_type (1), length (3).
const HANDSHAKE_HEADER_BYTES: usize = 4;
/// RFC 8446 §5.1: a TLSPlaintext fragment is at most 2^14 bytes.
const MAX_FRAGMENT_BYTES: usize = 1 << 14;
/// Every TLS version and SSL 3 has major version 3 on the wire.
const VERSION_MAJOR: u8 = 3;
const RANDOM_BYTES: usize = 32;
const MAX_SESSION_ID_BYTES: usize = 32;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ALPN: u16 = 16;
const SERVER_NAME_TYPE_HOST_NAME: u8 = 0;

/// Reads a ClientHello from the first `max_head_bytes` of `bytes`.
pub fn parse(bytes: &[u8], max_head_bytes: usize) -> Result<Head, HeadError> {
    let window = &bytes[..bytes.len().min(max_head_bytes)];
    let mut handshake: Vec<u8> = Vec::new();
    let mut offset = 0;
    loop {
        if let Some(hello) = whole_hello(&handshake, max_head_bytes)? {
            return client_hello(hello);
        }
        let header = &window[offset..window.len().min(offset + RECORD_HEADER_BYTES)];
        check_record_header(header, offset == 0)?;
        if header.len() < RECORD_HEADER_BYTES {
            return Err(incomplete(bytes.len(), max_head_bytes));
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > MAX_FRAGMENT_BYTES {
            // RFC 8446 §5.1: no empty handshake fragments, none over 2^14.
            return Err(malformed(format!("record length {length}")));
        }
        let start = offset + RECORD_HEADER_BYTES;
        let end = window.len().min(start + length);
        handshake.extend_from_slice(&window[start..end]);
        if end < start + length {
            // A record cut short: the hello may still be whole inside it.
            return match whole_hello(&handshake, max_head_bytes)? {
                Some(hello) => client_hello(hello),
                None => Err(incomplete(bytes.len(), max_head_bytes)),
            };
        }
        offset = end;
    }
}

fn malformed(what: impl std::fmt::Display) -> HeadError {
    HeadError::Malformed(format!("TLS ClientHello: {what}"))
}

/// Checks as much of a record header as has arrived, so garbage is refused
/// at its first byte.
fn check_record_header(header: &[u8], first: bool) -> Result<(), HeadError> {
    if let Some(&content_type) = header.first() {
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Err(if first && content_type & 0x80 != 0 {
                // An SSL 2 record header has the high bit of its first
                // byte set (RFC 6101 appendix E.2).
                malformed("SSL 2 record (not supported)")
            } else if first {
                malformed(format!(
                    "not a TLS handshake record (first byte {content_type:#04x})"
                ))
            } else {
                malformed(format!(
                    "record of content type {content_type} inside the ClientHello"
                ))
            });
        }
    }
    if let Some(&major) = header.get(1) {
        if major != VERSION_MAJOR {
            return Err(malformed(format!("record version major {major}")));
        }
    }
    Ok(())
}

/// The hello's body once the reassembled handshake bytes hold all of it.
fn whole_hello(handshake: &[u8], max_head_bytes: usize) -> Result<Option<&[u8]>, HeadError> {
    if let Some(&msg_type) = handshake.first() {
        if msg_type != HANDSHAKE_CLIENT_HELLO {
            return Err(malformed(format!(
                "first handshake message is type {msg_type}, not ClientHello"
            )));
        }
    }
    let Some(length) = handshake.get(1..HANDSHAKE_HEADER_BYTES) else {
        return Ok(None);
    };
    let length =
        usize::from(length[0]) << 16 | usize::from(length[1]) << 8 | usize::from(length[2]);
    // The hello takes at least one record header besides: refuse it now
    // rather than after waiting for bytes that would not be read anyway.
    if RECORD_HEADER_BYTES + HANDSHAKE_HEADER_BYTES + length > max_head_bytes {
        return Err(HeadError::TooLarge);
    }
    Ok(handshake.get(HANDSHAKE_HEADER_BYTES..HANDSHAKE_HEADER_BYTES + length))
}

/// Reads big-endian fields off a slice; running off its end is `Malformed`.
struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { rest: bytes, what }
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], HeadError> {
        if count > self.rest.len() {
            return Err(malformed(format!("{} truncated", self.what)));
        }
        let (taken, rest) = self.rest.split_at(count);
        self.rest = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, HeadError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, HeadError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Result<&'a [u8], HeadError> {
        let length = usize::from(self.u8()?);
        self.take(length)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Result<&'a [u8], HeadError> {
        let length = usize::from(self.u16()?);
        self.take(length)
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// The hello's body (after the handshake header).
fn client_hello(body: &[u8]) -> Result<Head, HeadError> {
    let mut hello = Reader::new(body, "ClientHello");
    let [major, _minor] = [hello.u8()?, hello.u8()?];
    if major != VERSION_MAJOR {
        return Err(malformed(format!("legacy_version major {major}")));
    }
    hello.take(RANDOM_BYTES)?;
    if hello.vec8()?.len() > MAX_SESSION_ID_BYTES {
        return Err(malformed("session id longer than 32 bytes"));
    }
    let cipher_suites = hello.vec16()?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(malformed("bad cipher_suites length"));
    }
    if hello.vec8()?.is_empty() {
        return Err(malformed("no compression method"));
    }
    let mut sni = None;
    let mut alpn = Vec::new();
    // RFC 5246 §7.4.1.2: a hello may end before the extensions.
    if hello.is_empty() {
        return Ok(Head::Tls { sni, alpn });
    }
    let mut extensions = Reader::new(hello.vec16()?, "extensions");
    if !hello.is_empty() {
        return Err(malformed("bytes after the extensions"));
    }
    let mut seen: Vec<u16> = Vec::new();
    while !extensions.is_empty() {
        let extension_type = extensions.u16()?;
        let data = extensions.vec16()?;
        // RFC 8446 §4.2: at most one extension of each type.
        if seen.contains(&extension_type) {
            return Err(malformed(format!("extension {extension_type} twice")));
        }
        seen.push(extension_type);
        match extension_type {
            EXTENSION_SERVER_NAME => sni = server_name(data)?,
            EXTENSION_ALPN => alpn = protocols(data)?,
            _ => {}
        }
    }
    Ok(Head::Tls { sni, alpn })
}

/// The host name of a `server_name` extension (RFC 6066 §3).
fn server_name(data: &[u8]) -> Result<Option<String>, HeadError> {
    let mut extension = Reader::new(data, "server_name");
    let mut list = Reader::new(extension.vec16()?, "server_name list");
    if !extension.is_empty() || list.is_empty() {
        return Err(malformed("bad server_name extension"));
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8()?;
        let name = list.vec16()?;
        if name_type != SERVER_NAME_TYPE_HOST_NAME {
            continue;
        }
        // RFC 6066 §3: no more than one name of a type.
        if host.is_some() {
            return Err(malformed("two host names in server_name"));
        }
        let text = std::str::from_utf8(name)
            .ok()
            .and_then(normalize_host)
            .ok_or_else(|| {
                malformed(format!(
                    "bad server name {:?}",
                    String::from_utf8_lossy(name)
                ))
            })?;
        host = Some(text);
    }
    Ok(host)
}

/// The protocol names of an ALPN extension (RFC 7301 §3.1).
fn protocols(data: &[u8]) -> Result<Vec<String>, HeadError> {
    let mut extension = Reader::new(data, "ALPN");
    let mut list = Reader::new(extension.vec16()?, "ALPN list");
    if !extension.is_empty() || list.is_empty() {
        return Err(malformed("bad ALPN extension"));
    }
    let mut names = Vec::new();
    while !list.is_empty() {
        let name = list.vec8()?;
        if name.is_empty() {
            return Err(malformed("empty ALPN protocol name"));
        }
        names.push(String::from_utf8_lossy(name).into_owned());
    }
    Ok(names)
}
