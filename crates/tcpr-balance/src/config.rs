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

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

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
        let checker = Checker { text, file };
        let raw: RawConfig = toml::from_str(text).map_err(|error| {
            let span = error.span().unwrap_or(0..0);
            checker.error(span, error.message().trim().replace('\n', " "))
        })?;
        checker.check(raw)
    }
}

// ---------------------------------------------------------------------------
// The file as TOML gives it, with the spans of what errors point at.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agents: Option<Spanned<RawAgents>>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    pool: Vec<Spanned<RawPool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    psk_file: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    ca: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    bind: Spanned<Vec<Spanned<String>>>,
    protocol: Protocol,
    default_pool: Option<Spanned<String>>,
    head_timeout_ms: Option<Spanned<i64>>,
    max_head_bytes: Option<Spanned<i64>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    pool: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    #[serde(default)]
    balance: BalanceMethod,
    members: Spanned<Vec<Spanned<RawMember>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    agent: Option<Spanned<String>>,
    server: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
}

// ---------------------------------------------------------------------------
// The checks on meaning.

/// What a bind address is used by, to name the first user of a duplicate.
struct BoundBy {
    owner: String,
    span: Range<usize>,
}

struct Checker<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Checker<'_> {
    fn position(&self, offset: usize) -> Position {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        Position {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            position: Some(self.position(span.start)),
            message: message.into(),
        }
    }

    fn at(&self, span: &Range<usize>) -> String {
        let Position { line, column } = self.position(span.start);
        format!("{line}:{column}")
    }

    /// Checks everything and returns the error that comes first in the file.
    fn check(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let mut errors = Errors::default();
        let pools = self.check_pools(&raw.pool, raw.agents.is_some(), &mut errors);
        let agents = match &raw.agents {
            Some(agents) => self.check_agents(agents, &mut errors),
            None => AgentsAuth::None,
        };
        let mut bound: HashMap<SocketAddr, BoundBy> = HashMap::new();
        let metrics = raw.metrics.as_ref().and_then(|metrics| {
            let listen = self.address(&metrics.listen, "metrics listen", false, &mut errors)?;
            bound.insert(
                listen,
                BoundBy {
                    owner: String::from("[metrics] listen"),
                    span: metrics.listen.span(),
                },
            );
            Some(MetricsConfig { listen })
        });
        let listeners = self.check_listeners(&raw.listener, &pools, &mut bound, &mut errors);
        if raw.listener.is_empty() {
            errors.push(self.error(
                0..0,
                "no [[listener]]: the balancer would listen on nothing",
            ));
        }
        match errors.first() {
            Some(error) => Err(error),
            None => Ok(Config {
                agents,
                metrics,
                listeners,
                pools,
            }),
        }
    }

    fn check_agents(&self, agents: &Spanned<RawAgents>, errors: &mut Errors) -> AgentsAuth {
        let table = agents.get_ref();
        let path = |value: &Spanned<String>, errors: &mut Errors| {
            if value.get_ref().is_empty() {
                errors.push(self.error(value.span(), "empty path"));
            }
            let path = Path::new(value.get_ref());
            match self.file.parent() {
                Some(folder) if path.is_relative() => folder.join(path),
                _ => path.to_path_buf(),
            }
        };
        let certs = [
            ("cert", &table.cert),
            ("key", &table.key),
            ("ca", &table.ca),
        ];
        if let Some(psk_file) = &table.psk_file {
            if let Some((name, Some(value))) = certs.iter().find(|(_, value)| value.is_some()) {
                errors.push(self.error(
                    value.span(),
                    format!("[agents] takes psk_file or cert + key + ca, not both ({name} given with psk_file)"),
                ));
            }
            return AgentsAuth::Psk {
                psk_file: path(psk_file, errors),
            };
        }
        match (&table.cert, &table.key, &table.ca) {
            (Some(cert), Some(key), Some(ca)) => AgentsAuth::Certs {
                cert: path(cert, errors),
                key: path(key, errors),
                ca: path(ca, errors),
            },
            _ => {
                let missing: Vec<&str> = certs
                    .iter()
                    .filter(|(_, value)| value.is_none())
                    .map(|(name, _)| *name)
                    .collect();
                let message = if missing.len() == certs.len() {
                    String::from("[agents] needs psk_file, or cert + key + ca")
                } else {
                    format!(
                        "[agents] has no {}: cert + key + ca go together",
                        missing.join(", ")
                    )
                };
                errors.push(self.error(agents.span(), message));
                AgentsAuth::None
            }
        }
    }

    fn check_pools(
        &self,
        raw: &[Spanned<RawPool>],
        have_agents: bool,
        errors: &mut Errors,
    ) -> Vec<PoolConfig> {
        let mut seen: HashMap<&str, Range<usize>> = HashMap::new();
        let mut pools = Vec::with_capacity(raw.len());
        for pool in raw {
            let pool = pool.get_ref();
            let name = pool.name.get_ref();
            if name.is_empty() {
                errors.push(self.error(pool.name.span(), "empty pool name"));
            } else if let Some(first) = seen.get(name.as_str()) {
                errors.push(self.error(
                    pool.name.span(),
                    format!(
                        "duplicate pool name \"{name}\" (first at {})",
                        self.at(first)
                    ),
                ));
            } else {
                seen.insert(name, pool.name.span());
            }
            if pool.members.get_ref().is_empty() {
                errors.push(self.error(
                    pool.members.span(),
                    format!("pool \"{name}\" has no members"),
                ));
            }
            let mut members: Vec<MemberConfig> = Vec::new();
            let mut member_spans: Vec<Range<usize>> = Vec::new();
            for member in pool.members.get_ref() {
                if let Some(checked) = self.check_member(member, have_agents, errors) {
                    if let Some(index) = members.iter().position(|other| {
                        other.agent == checked.agent && other.server == checked.server
                    }) {
                        errors.push(self.error(
                            member.span(),
                            format!(
                                "duplicate member {} in pool \"{name}\" (first at {})",
                                checked.label(),
                                self.at(&member_spans[index])
                            ),
                        ));
                    }
                    members.push(checked);
                    member_spans.push(member.span());
                }
            }
            pools.push(PoolConfig {
                name: name.clone(),
                balance: pool.balance,
                members,
            });
        }
        pools
    }

    fn check_member(
        &self,
        member: &Spanned<RawMember>,
        have_agents: bool,
        errors: &mut Errors,
    ) -> Option<MemberConfig> {
        let raw = member.get_ref();
        let agent = raw
            .agent
            .as_ref()
            .map(|agent| self.address(agent, "agent", true, errors));
        let server = raw
            .server
            .as_ref()
            .map(|server| self.address(server, "server", true, errors));
        if agent.is_none() && server.is_none() {
            errors.push(self.error(
                member.span(),
                "member has neither agent nor server: give an agent (handoffs), a server (proxied), or both",
            ));
        }
        if let (Some(agent), false) = (&raw.agent, have_agents) {
            errors.push(self.error(
                agent.span(),
                "member has an agent but the file has no [agents] table (psk_file, or cert + key + ca)",
            ));
        }
        let weight = match &raw.weight {
            None => DEFAULT_WEIGHT,
            Some(weight) => match u32::try_from(*weight.get_ref()) {
                Ok(value) if value >= 1 => value,
                _ => {
                    errors.push(self.error(
                        weight.span(),
                        format!(
                            "weight {} out of range: expected 1..={}",
                            weight.get_ref(),
                            u32::MAX
                        ),
                    ));
                    DEFAULT_WEIGHT
                }
            },
        };
        Some(MemberConfig {
            agent: agent.flatten(),
            server: server.flatten(),
            weight,
        })
    }

    fn check_listeners(
        &self,
        raw: &[Spanned<RawListener>],
        pools: &[PoolConfig],
        bound: &mut HashMap<SocketAddr, BoundBy>,
        errors: &mut Errors,
    ) -> Vec<Listener> {
        let mut seen: HashMap<&str, Range<usize>> = HashMap::new();
        let mut listeners = Vec::with_capacity(raw.len());
        let known_pool = |name: &Spanned<String>, errors: &mut Errors| {
            if !pools.iter().any(|pool| pool.name == *name.get_ref()) {
                let known: Vec<String> = pools
                    .iter()
                    .map(|pool| format!("\"{}\"", pool.name))
                    .collect();
                let known = if known.is_empty() {
                    String::from("the file has no [[pool]]")
                } else {
                    format!("known pools: {}", known.join(", "))
                };
                errors.push(self.error(
                    name.span(),
                    format!("unknown pool \"{}\" ({known})", name.get_ref()),
                ));
            }
        };
        for spanned in raw {
            let listener = spanned.get_ref();
            let name = listener.name.get_ref();
            if name.is_empty() {
                errors.push(self.error(listener.name.span(), "empty listener name"));
            } else if let Some(first) = seen.get(name.as_str()) {
                errors.push(self.error(
                    listener.name.span(),
                    format!(
                        "duplicate listener name \"{name}\" (first at {})",
                        self.at(first)
                    ),
                ));
            } else {
                seen.insert(name, listener.name.span());
            }

            if listener.bind.get_ref().is_empty() {
                errors.push(self.error(
                    listener.bind.span(),
                    format!("listener \"{name}\" binds no address"),
                ));
            }
            let mut bind = Vec::new();
            for address in listener.bind.get_ref() {
                let Some(parsed) = self.address(address, "bind", false, errors) else {
                    continue;
                };
                if let Some(first) = self.bound_conflict(bound, parsed) {
                    errors.push(self.error(
                        address.span(),
                        format!(
                            "bind address {parsed} is already used by {} (at {})",
                            first.owner,
                            self.at(&first.span)
                        ),
                    ));
                } else if parsed.port() != 0 {
                    bound.insert(
                        parsed,
                        BoundBy {
                            owner: format!("listener \"{name}\""),
                            span: address.span(),
                        },
                    );
                }
                bind.push(parsed);
            }

            if let Some(default_pool) = &listener.default_pool {
                known_pool(default_pool, errors);
            }
            let head_timeout_ms = self.limit(
                &listener.head_timeout_ms,
                "head_timeout_ms",
                HEAD_TIMEOUT_MS_RANGE,
                DEFAULT_HEAD_TIMEOUT_MS,
                errors,
            );
            let max_head_bytes = self.limit(
                &listener.max_head_bytes,
                "max_head_bytes",
                MAX_HEAD_BYTES_RANGE,
                DEFAULT_MAX_HEAD_BYTES as u64,
                errors,
            );

            let mut routes = Vec::with_capacity(listener.route.len());
            for route in &listener.route {
                if listener.protocol == Protocol::Tcp {
                    errors.push(self.error(
                        route.span(),
                        format!("listener \"{name}\" is tcp: it reads no head, so it has no routes (use default_pool)"),
                    ));
                }
                if let Some(checked) = self.check_route(route, listener.protocol, errors) {
                    known_pool(&route.get_ref().pool, errors);
                    routes.push(checked);
                }
            }
            if listener.default_pool.is_none() {
                let message = if listener.protocol == Protocol::Tcp {
                    Some(format!("listener \"{name}\" is tcp and needs default_pool"))
                } else if listener.route.is_empty() {
                    Some(format!("listener \"{name}\" has neither a route nor default_pool: it would refuse every connection"))
                } else {
                    None
                };
                if let Some(message) = message {
                    errors.push(self.error(listener.name.span(), message));
                }
            }
            listeners.push(Listener {
                name: name.clone(),
                bind,
                protocol: listener.protocol,
                default_pool: listener
                    .default_pool
                    .as_ref()
                    .map(|pool| pool.get_ref().clone()),
                head_timeout: Duration::from_millis(head_timeout_ms),
                max_head_bytes: usize::try_from(max_head_bytes).unwrap_or(DEFAULT_MAX_HEAD_BYTES),
                routes,
            });
        }
        listeners
    }

    /// An address already bound that `address` collides with: the same
    /// one, or the same port on the other's wildcard address of the family.
    fn bound_conflict<'b>(
        &self,
        bound: &'b HashMap<SocketAddr, BoundBy>,
        address: SocketAddr,
    ) -> Option<&'b BoundBy> {
        if address.port() == 0 {
            return None;
        }
        if let Some(first) = bound.get(&address) {
            return Some(first);
        }
        bound.iter().find_map(|(other, first)| {
            let same_family = other.is_ipv4() == address.is_ipv4();
            let either_wildcard = other.ip().is_unspecified() || address.ip().is_unspecified();
            (same_family && either_wildcard && other.port() == address.port()).then_some(first)
        })
    }

    fn check_route(
        &self,
        route: &Spanned<RawRoute>,
        protocol: Protocol,
        errors: &mut Errors,
    ) -> Option<Route> {
        let raw = route.get_ref();
        let host = raw.host.as_ref().and_then(|host| {
            HostPattern::parse(host.get_ref())
                .map_err(|message| errors.push(self.error(host.span(), message)))
                .ok()
        });
        if let Some(path_prefix) = &raw.path_prefix {
            if protocol != Protocol::Http {
                errors.push(self.error(
                    path_prefix.span(),
                    format!("path_prefix needs an http listener (this one is {protocol})"),
                ));
            } else if !path_prefix.get_ref().starts_with('/') {
                errors.push(self.error(
                    path_prefix.span(),
                    format!(
                        "path_prefix \"{}\" must start with '/'",
                        path_prefix.get_ref()
                    ),
                ));
            }
        }
        Some(Route {
            host,
            path_prefix: raw
                .path_prefix
                .as_ref()
                .map(|prefix| prefix.get_ref().clone()),
            pool: raw.pool.get_ref().clone(),
        })
    }

    fn limit(
        &self,
        value: &Option<Spanned<i64>>,
        key: &str,
        range: RangeInclusive<u64>,
        default: u64,
        errors: &mut Errors,
    ) -> u64 {
        let Some(value) = value else {
            return default;
        };
        match u64::try_from(*value.get_ref()) {
            Ok(number) if range.contains(&number) => number,
            _ => {
                errors.push(self.error(
                    value.span(),
                    format!(
                        "{key} {} out of range: expected {}..={}",
                        value.get_ref(),
                        range.start(),
                        range.end()
                    ),
                ));
                default
            }
        }
    }

    /// Parses an `IP:PORT` value; `destination` addresses (agents, servers)
    /// need a port and a specific IP.
    fn address(
        &self,
        value: &Spanned<String>,
        what: &str,
        destination: bool,
        errors: &mut Errors,
    ) -> Option<SocketAddr> {
        let text = value.get_ref();
        let parsed: SocketAddr = match text.parse() {
            Ok(parsed) => parsed,
            Err(_) => {
                errors.push(self.error(
                    value.span(),
                    format!("bad {what} address \"{text}\": expected IP:PORT, as 10.0.0.1:80 or [fd00::1]:80"),
                ));
                return None;
            }
        };
        if destination && (parsed.port() == 0 || parsed.ip().is_unspecified()) {
            errors.push(self.error(
                value.span(),
                format!("bad {what} address \"{text}\": a destination needs a specific IP and a port other than 0"),
            ));
            return None;
        }
        Some(parsed)
    }
}

/// The errors found, to report the first in the file.
#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, error: ConfigError) {
        self.0.push(error);
    }

    fn first(self) -> Option<ConfigError> {
        self.0.into_iter().min_by_key(|error| {
            error
                .position
                .map(|position| (position.line, position.column))
        })
    }
}
