//! The checks behind [`Config::parse`]: TOML into raw structs that keep the
//! spans of what errors point at, then every rule on meaning; the error
//! reported is the first in the file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{
    AgentsAuth, BalanceMethod, Config, ConfigError, HostPattern, Listener, MemberConfig,
    MetricsConfig, PoolConfig, Position, Protocol, Route, DEFAULT_HEAD_TIMEOUT_MS,
    DEFAULT_MAX_HEAD_BYTES, DEFAULT_WEIGHT, HEAD_TIMEOUT_MS_RANGE, MAX_HEAD_BYTES_RANGE,
};

/// Checks `text`, the contents of `file`.
pub(super) fn check(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let checker = Checker { text, file };
    let raw: RawConfig = toml::from_str(text).map_err(|error| {
        let span = error.span().unwrap_or(0..0);
        checker.error(span, error.message().trim().replace('\n', " "))
    })?;
    checker.check(raw)
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

    /// A `kind` (listener, pool) name must be non-empty and unique.
    fn unique_name<'r>(
        &self,
        name: &'r Spanned<String>,
        kind: &str,
        seen: &mut HashMap<&'r str, Range<usize>>,
        errors: &mut Errors,
    ) {
        let text = name.get_ref().as_str();
        if text.is_empty() {
            errors.push(self.error(name.span(), format!("empty {kind} name")));
        } else if let Some(first) = seen.get(text) {
            errors.push(self.error(
                name.span(),
                format!(
                    "duplicate {kind} name \"{text}\" (first at {})",
                    self.at(first)
                ),
            ));
        } else {
            seen.insert(text, name.span());
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
            self.unique_name(&pool.name, "pool", &mut seen, errors);
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
            self.unique_name(&listener.name, "listener", &mut seen, errors);

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
