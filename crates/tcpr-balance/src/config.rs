//! The config file of `tcpr balance` (TOML), checked whole before anything
//! listens.
//!
//! Every error, syntax or meaning, is one line `FILE:LINE:COL: what is
//! wrong`, pointing at the offending key or value, so `tcpr balance --check`
//! can print it as it is. The file's keys (the contract of issue 6):
//!
//! ```toml
//! [agents]                      # psk_file, or cert + key + ca
//! psk_file = "/etc/tcpr/psk"
//!
//! [metrics]
//! listen = "127.0.0.1:9100"
//!
//! [[listener]]
//! name = "web"
//! bind = ["10.0.0.100:80", "[fd00::100]:80"]
//! protocol = "http"             # "http" | "tls" | "tcp"
//! default_pool = "blue"         # optional
//! head_timeout_ms = 5000        # optional, 1..=600000
//! max_head_bytes = 16384        # optional, 256..=1048576
//!
//! [[listener.route]]
//! host = "a.example"            # exact or "*.example"; the SNI for tls
//! path_prefix = "/api"          # http only, optional
//! pool = "red"
//!
//! [[pool]]
//! name = "red"
//! balance = "hash"              # "hash" | "round-robin" | "least-conn"
//! members = [ { agent = "10.0.0.3:7700", server = "10.0.0.3:8080", weight = 1 } ]
//! ```
//!
//! Relative paths in `[agents]` are taken from the config file's folder.

mod check;

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::route::normalize_host;

/// `head_timeout_ms` when the file does not say.
pub const DEFAULT_HEAD_TIMEOUT_MS: u64 = 5_000;
/// The `head_timeout_ms` values a file may give: up to ten minutes.
pub const HEAD_TIMEOUT_MS_RANGE: RangeInclusive<u64> = 1..=600_000;
/// `max_head_bytes` when the file does not say.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 16_384;
/// The `max_head_bytes` values a file may give: a request line needs a few
/// hundred bytes; past 1 MiB a peeked head would pin too much kernel memory.
pub const MAX_HEAD_BYTES_RANGE: RangeInclusive<u64> = 256..=1_048_576;
/// A member's `weight` when the file does not say.
pub const DEFAULT_WEIGHT: u32 = 1;

/// A whole, checked config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How the balancer authenticates to agents.
    pub agents: AgentsAuth,
    /// Where the metrics are served, if anywhere.
    pub metrics: Option<MetricsConfig>,
    /// The listeners, in file order.
    pub listeners: Vec<Listener>,
    /// The pools, in file order.
    pub pools: Vec<PoolConfig>,
}

/// How the balancer authenticates to the agents (the `[agents]` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentsAuth {
    /// A pre-shared key file (`psk_file`).
    Psk {
        /// The key file.
        psk_file: PathBuf,
    },
    /// Mutual TLS (`cert`, `key`, `ca`).
    Certs {
        /// The balancer's certificate chain (PEM).
        cert: PathBuf,
        /// The balancer's private key (PEM).
        key: PathBuf,
        /// The CA that signed the agents' certificates (PEM).
        ca: PathBuf,
    },
    /// The file has no `[agents]` table: allowed only when no member has an
    /// `agent`, so every connection is proxied.
    None,
}

/// The `[metrics]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served.
    pub listen: SocketAddr,
}

/// One `[[listener]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Its name, unique in the file.
    pub name: String,
    /// The addresses it listens on (at least one; port 0 lets the kernel
    /// choose).
    pub bind: Vec<SocketAddr>,
    /// What it reads of a connection before routing it.
    pub protocol: Protocol,
    /// Where a connection goes when no route matches (none: HTTP 404, TLS
    /// alert or close).
    pub default_pool: Option<String>,
    /// How long a client may take to send its whole head.
    pub head_timeout: Duration,
    /// The largest head it waits for.
    pub max_head_bytes: usize,
    /// The routes, tried in file order.
    pub routes: Vec<Route>,
}

/// What a listener reads before it routes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// An HTTP/1.x request head: method, path, `Host`.
    Http,
    /// A TLS ClientHello: SNI and ALPN (the backend terminates TLS).
    Tls,
    /// Nothing: the connection goes to the default pool at once.
    Tcp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http => "http",
            Protocol::Tls => "tls",
            Protocol::Tcp => "tcp",
        })
    }
}

/// One `[[listener.route]]`: every condition given must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The `Host` (http) or SNI (tls) it matches, if it looks at the host.
    pub host: Option<HostPattern>,
    /// The start of the request path it matches (http only).
    pub path_prefix: Option<String>,
    /// The pool it sends to.
    pub pool: String,
}

/// A host name a route matches: exact (`a.example`) or any name under a
/// domain (`*.example`: `a.example`, `b.a.example`, not `example` itself).
/// Names are compared in lowercase, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Exactly this name (lowercase).
    Exact(String),
    /// Any name ending in `.` + this domain (lowercase, without the dot).
    AnyUnder(String),
}

impl HostPattern {
    /// Parses `name` or `*.domain`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        let (wildcard, name) = match text.strip_prefix("*.") {
            Some(domain) => (true, domain),
            None => (false, text),
        };
        if name.contains('*') {
            return Err(format!(
                "bad host pattern \"{text}\": a wildcard may only be a leading \"*.\" (as in \"*.example\")"
            ));
        }
        let Some(normal) = normalize_host(name) else {
            return Err(format!(
                "bad host pattern \"{text}\": expected a host name (letters, digits, '-', '.'), an IP address or \"*.domain\", without a port"
            ));
        };
        Ok(if wildcard {
            HostPattern::AnyUnder(normal)
        } else {
            HostPattern::Exact(normal)
        })
    }

    /// Whether `host` (already normalized: lowercase, no port, no trailing
    /// dot) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
            HostPattern::AnyUnder(domain) => {
                host.len() > domain.len() + 1
                    && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
                    && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::AnyUnder(domain) => write!(f, "*.{domain}"),
        }
    }
}

/// One `[[pool]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Its name, unique in the file.
    pub name: String,
    /// How it picks a member.
    pub balance: BalanceMethod,
    /// Its members (at least one), in file order.
    pub members: Vec<MemberConfig>,
}

/// How a pool picks a member for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceMethod {
    /// Consistent hashing on the client's IP address, weighted: a client
    /// keeps its member while that member is usable.
    #[default]
    Hash,
    /// Weighted round-robin.
    RoundRobin,
    /// The member with the fewest open connections per unit of weight.
    LeastConn,
}

impl fmt::Display for BalanceMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BalanceMethod::Hash => "hash",
            BalanceMethod::RoundRobin => "round-robin",
            BalanceMethod::LeastConn => "least-conn",
        })
    }
}

/// One member of a pool: at least one of `agent` and `server` is set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemberConfig {
    /// The agent that receives handoffs (none: always proxied).
    pub agent: Option<SocketAddr>,
    /// Where connections are proxied when a handoff is impossible (none: no
    /// fallback for this member).
    pub server: Option<SocketAddr>,
    /// Its share of the pool's connections, relative to the others (>= 1).
    pub weight: u32,
}

impl MemberConfig {
    /// How the member is named in logs and metric labels: its agent's
    /// address, or its server's when it has no agent.
    pub fn label(&self) -> String {
        match (self.agent, self.server) {
            (Some(agent), _) => agent.to_string(),
            (None, Some(server)) => server.to_string(),
            (None, None) => String::from("none"),
        }
    }
}

/// A line and column in the file, both counted from 1 (the column in
/// characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The line, from 1.
    pub line: usize,
    /// The column, from 1, in characters.
    pub column: usize,
}

/// Why a config file was refused. Its `Display` is `FILE:LINE:COL: what is
/// wrong` (`FILE: what is wrong` when the file could not be read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file, as the caller named it.
    pub file: PathBuf,
    /// Where in the file (none: the file as a whole, e.g. unreadable).
    pub position: Option<Position>,
    /// What is wrong, one line.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(Position { line, column }) => write!(
                f,
                "{}:{line}:{column}: {}",
                self.file.display(),
                self.message
            ),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            file: path.to_path_buf(),
            position: None,
            message: format!("cannot read: {error}"),
        })?;
        Config::parse(&text, path)
    }

    /// Checks `text`, the contents of `file` (named in errors; relative
    /// paths in the file are taken from its folder).
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        check::check(text, file)
    }
}
