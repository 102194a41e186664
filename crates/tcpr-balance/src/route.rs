//! Which pool a request head goes to.

use std::net::Ipv6Addr;

use crate::config::{Listener, Route};
use crate::head::Head;

/// The longest host name DNS allows (RFC 1035 §3.1, without the final dot).
const MAX_HOST_NAME_BYTES: usize = 253;
/// The longest DNS label (RFC 1035 §2.3.4).
const MAX_LABEL_BYTES: usize = 63;

/// A host name as routes compare it: lowercase, one trailing dot dropped,
/// an IPv6 literal (without brackets) in its canonical form. `None` when
/// `name` is not a host name (labels of letters, digits, `-` and `_`, 1 to
/// 63 bytes each, 253 in all) nor an IPv6 address. IPv4 literals pass as
/// names.
pub fn normalize_host(name: &str) -> Option<String> {
    if let Ok(v6) = name.parse::<Ipv6Addr>() {
        return Some(v6.to_string());
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |label: &str| {
        (1..=MAX_LABEL_BYTES).contains(&label.len())
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
    };
    (!name.is_empty() && name.len() <= MAX_HOST_NAME_BYTES && name.split('.').all(label_ok))
        .then(|| name.to_ascii_lowercase())
}

/// Routes one listener's connections: its routes in file order, then its
/// default pool.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
    default_pool: Option<String>,
}

impl Router {
    /// The router of `listener`.
    pub fn new(listener: &Listener) -> Router {
        Router {
            routes: listener.routes.clone(),
            default_pool: listener.default_pool.clone(),
        }
    }

    /// The pool `head` goes to: the first route whose conditions all hold
    /// (host exact or `*.suffix`, case-insensitive, without port; path
    /// prefix, byte for byte, for http), else the default pool; `None` when
    /// neither (the caller answers 404, a TLS alert, or closes).
    pub fn pick(&self, head: &Head) -> Option<&str> {
        let (host, path) = match head {
            Head::Http { host, path, .. } => (host.as_deref(), Some(path.as_str())),
            Head::Tls { sni, .. } => (sni.as_deref(), None),
            Head::Tcp => (None, None),
        };
        self.routes
            .iter()
            .find(|route| {
                let host_ok = route
                    .host
                    .as_ref()
                    .is_none_or(|pattern| host.is_some_and(|host| pattern.matches(host)));
                let path_ok = route.path_prefix.as_ref().is_none_or(|prefix| {
                    path.is_some_and(|path| path.starts_with(prefix.as_str()))
                });
                host_ok && path_ok
            })
            .map(|route| route.pool.as_str())
            .or(self.default_pool.as_deref())
    }
}
