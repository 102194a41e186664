//! The HTTP/1.x request head: request line and header fields up to the
//! blank line (RFC 9112 §2.1), read with `httparse`.

use std::net::Ipv6Addr;

use super::{incomplete, Head, HeadError};
use crate::route::normalize_host;

/// The most header fields a head may have.
pub const MAX_HEADER_FIELDS: usize = 128;

/// The first line of the HTTP/2 connection preface (RFC 9113 §3.4): a
/// client speaking HTTP/2 with prior knowledge.
const HTTP2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Reads an HTTP/1.x request head from the first `max_head_bytes` of
/// `bytes`.
pub fn parse(bytes: &[u8], max_head_bytes: usize) -> Result<Head, HeadError> {
    let window = &bytes[..bytes.len().min(max_head_bytes)];
    if window.starts_with(HTTP2_PREFACE_LINE) {
        return Err(HeadError::Malformed(String::from(
            "HTTP/2 prior-knowledge preface (PRI * HTTP/2.0): this listener reads HTTP/1.x only",
        )));
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADER_FIELDS];
    let mut request = httparse::Request::new(&mut fields);
    match request.parse(window) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(incomplete(bytes.len(), max_head_bytes)),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Malformed(format!(
                "more than {MAX_HEADER_FIELDS} header fields"
            )))
        }
        Err(error) => return Err(HeadError::Malformed(format!("HTTP/1.x: {error}"))),
    }
    // httparse fills these three on `Complete`.
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(HeadError::Malformed(String::from("no request line")));
    };
    let header_host = host_header(request.headers)?;
    let (path, target_host) = if target.starts_with('/') || target == "*" {
        (target.to_string(), None)
    } else if method == "CONNECT" {
        let host = host_port(target)
            .ok_or_else(|| HeadError::Malformed(format!("bad CONNECT target \"{target}\"")))?;
        (target.to_string(), Some(host))
    } else {
        let absolute = absolute_form(target)?;
        (absolute.path, Some(absolute.host))
    };
    Ok(Head::Http {
        method: method.to_string(),
        path,
        // RFC 9112 §3.2.2: the target's authority wins over Host.
        host: target_host.or(header_host),
    })
}

/// The `Host` header's host, if it names one. RFC 9112 §3.2: a request with
/// more than one `Host` or an invalid one is refused (400): routing by one
/// while the backend reads another would let a client pick its backend.
fn host_header(fields: &[httparse::Header<'_>]) -> Result<Option<String>, HeadError> {
    let mut hosts = fields
        .iter()
        .filter(|field| field.name.eq_ignore_ascii_case("host"));
    let Some(field) = hosts.next() else {
        return Ok(None);
    };
    if hosts.next().is_some() {
        return Err(HeadError::Malformed(String::from(
            "more than one Host header field",
        )));
    }
    let value = std::str::from_utf8(field.value)
        .map(str::trim)
        .map_err(|_| HeadError::Malformed(String::from("Host is not ASCII")))?;
    if value.is_empty() {
        return Ok(None);
    }
    host_port(value)
        .map(Some)
        .ok_or_else(|| HeadError::Malformed(format!("bad Host \"{}\"", value.escape_debug())))
}

/// The host of `authority` (`host[:port]` or `[v6][:port]`, RFC 3986
/// §3.2.2), normalized; `None` when it is not one.
fn host_port(authority: &str) -> Option<String> {
    let port_ok = |port: &str| port.bytes().all(|byte| byte.is_ascii_digit());
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (address, after) = bracketed.split_once(']')?;
        let port = match after {
            "" => "",
            _ => after.strip_prefix(':')?,
        };
        return (port_ok(port)).then_some(address.parse::<Ipv6Addr>().ok()?.to_string());
    }
    let (name, port) = authority.rsplit_once(':').unwrap_or((authority, ""));
    if !port_ok(port) || name.contains(':') {
        return None;
    }
    normalize_host(name)
}

/// An absolute-form target split for routing.
struct AbsoluteForm {
    host: String,
    path: String,
}

/// `scheme://authority[/path][?query]` (RFC 9112 §3.2.2).
fn absolute_form(target: &str) -> Result<AbsoluteForm, HeadError> {
    let malformed =
        || HeadError::Malformed(format!("bad request target \"{}\"", target.escape_debug()));
    let (scheme, rest) = target.split_once("://").ok_or_else(malformed)?;
    let scheme_ok = scheme
        .bytes()
        .next()
        .is_some_and(|byte| byte.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"+-.".contains(&byte));
    if !scheme_ok {
        return Err(malformed());
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    // RFC 9110 §4.2.4: userinfo in an http(s) URI is an error.
    if authority.contains('@') {
        return Err(malformed());
    }
    let host = host_port(authority).ok_or_else(malformed)?;
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Ok(AbsoluteForm { host, path })
}
