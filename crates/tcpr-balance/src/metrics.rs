//! The balancer's metrics, rendered in the Prometheus text format 0.0.4
//! (what `GET /metrics` serves), and a parser for that text (what `tcpr
//! balance status` reads).
//!
//! The names are fixed (issue 6):
//!
//! | name | type | labels | counts |
//! |---|---|---|---|
//! | `tcpr_balance_connections_total` | counter | listener | connections accepted |
//! | `tcpr_balance_handoffs_total` | counter | pool, member | connections handed off to a member's agent |
//! | `tcpr_balance_fallbacks_total` | counter | pool, member | handoffs that failed or rolled back, then proxied to the member's server |
//! | `tcpr_balance_proxied_total` | counter | pool, member | connections proxied from the start (member without agent) |
//! | `tcpr_balance_failures_total` | counter | reason | connections not served as asked, by reason (`head_timeout`, `head_malformed`, `head_too_large`, and the runtime's own) |
//! | `tcpr_balance_flows_active` | gauge | | steering entries now |
//! | `tcpr_balance_member_up` | gauge | pool, member | 1 when the health check passes (its agent or its server) |
//! | `tcpr_balance_agent_up` | gauge | agent | 1 when the agent takes handoffs (it answers PING; a member stays up on its server alone) |
//! | `tcpr_balance_handoff_seconds` | histogram | pool | time from the decision to the committed handoff |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The handoff histogram's upper bounds, in seconds: a handoff on one link
/// takes a few milliseconds (freeze, dump, two round trips, restore), so
/// the buckets are dense from 0.5 ms to 100 ms and sparse beyond.
pub const HANDOFF_SECONDS_BUCKETS: [f64; 13] = [
    0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Metric names, for the runtime and `tcpr balance status`.
pub mod names {
    /// Counter {listener}: connections accepted.
    pub const CONNECTIONS: &str = "tcpr_balance_connections_total";
    /// Counter {pool, member}: connections handed off.
    pub const HANDOFFS: &str = "tcpr_balance_handoffs_total";
    /// Counter {pool, member}: handoffs that fell back to the proxy.
    pub const FALLBACKS: &str = "tcpr_balance_fallbacks_total";
    /// Counter {pool, member}: connections proxied by configuration.
    pub const PROXIED: &str = "tcpr_balance_proxied_total";
    /// Counter {reason}: connections not served as asked.
    pub const FAILURES: &str = "tcpr_balance_failures_total";
    /// Gauge: steering entries now.
    pub const FLOWS_ACTIVE: &str = "tcpr_balance_flows_active";
    /// Gauge {pool, member}: 1 when healthy.
    pub const MEMBER_UP: &str = "tcpr_balance_member_up";
    /// Gauge {agent}: 1 when the agent takes handoffs.
    pub const AGENT_UP: &str = "tcpr_balance_agent_up";
    /// Histogram {pool}: handoff duration in seconds.
    pub const HANDOFF_SECONDS: &str = "tcpr_balance_handoff_seconds";
}

/// Which way a request head failed (counted as a failure reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeadErrorKind {
    /// Not whole within `head_timeout_ms` (HTTP 408).
    Timeout,
    /// Not a head of the listener's protocol (HTTP 400).
    Malformed,
    /// No end within `max_head_bytes` (HTTP 431).
    TooLarge,
}

impl HeadErrorKind {
    /// The `reason` label it is counted under.
    pub fn reason(self) -> &'static str {
        match self {
            HeadErrorKind::Timeout => "head_timeout",
            HeadErrorKind::Malformed => "head_malformed",
            HeadErrorKind::TooLarge => "head_too_large",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PoolMember {
    pool: String,
    member: String,
}

impl PoolMember {
    fn new(pool: &str, member: &str) -> PoolMember {
        PoolMember {
            pool: pool.to_string(),
            member: member.to_string(),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative; rendering sums them).
    in_bucket: [u64; HANDOFF_SECONDS_BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: BTreeMap<String, u64>,
    handoffs: BTreeMap<PoolMember, u64>,
    fallbacks: BTreeMap<PoolMember, u64>,
    proxied: BTreeMap<PoolMember, u64>,
    member_up: BTreeMap<PoolMember, bool>,
    agent_up: BTreeMap<String, bool>,
    failures: BTreeMap<String, u64>,
    handoff_seconds: BTreeMap<String, Histogram>,
}

/// The balancer's metrics; shared by every thread (`&self` methods).
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
    flows_active: AtomicU64,
}

impl Metrics {
    /// No observations yet.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        // A poisoned lock only means a thread panicked while counting: the
        // counts are still numbers.
        self.counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Shows `member` of `pool` with zero counts before anything happens to
    /// it, so a reader sees every member from the start.
    pub fn register_member(&self, pool: &str, member: &str) {
        let key = PoolMember::new(pool, member);
        let mut counters = self.counters();
        counters.handoffs.entry(key.clone()).or_default();
        counters.fallbacks.entry(key.clone()).or_default();
        counters.proxied.entry(key).or_default();
        counters
            .handoff_seconds
            .entry(pool.to_string())
            .or_default();
    }

    /// Shows `listener` with zero connections before its first.
    pub fn register_listener(&self, listener: &str) {
        self.counters()
            .connections
            .entry(listener.to_string())
            .or_default();
    }

    /// `listener` accepted a connection.
    pub fn accepted(&self, listener: &str) {
        let mut counters = self.counters();
        // A key is allocated only the first time (listeners are registered
        // at start): no allocation per connection.
        match counters.connections.get_mut(listener) {
            Some(n) => *n += 1,
            None => {
                counters.connections.insert(listener.to_string(), 1);
            }
        }
    }

    /// A connection was handed off to `member` of `pool` in `seconds`.
    pub fn handoff_ok(&self, pool: &str, member: &str, seconds: f64) {
        let mut counters = self.counters();
        *counters
            .handoffs
            .entry(PoolMember::new(pool, member))
            .or_default() += 1;
        let histogram = counters
            .handoff_seconds
            .entry(pool.to_string())
            .or_default();
        let bucket = HANDOFF_SECONDS_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound);
        if let Some(bucket) = bucket {
            histogram.in_bucket[bucket] += 1;
        }
        histogram.count += 1;
        histogram.sum += seconds;
    }

    /// A handoff to `member` of `pool` failed or rolled back and the
    /// connection was proxied to its server instead.
    pub fn fallback(&self, pool: &str, member: &str) {
        *self
            .counters()
            .fallbacks
            .entry(PoolMember::new(pool, member))
            .or_default() += 1;
    }

    /// A connection was proxied to `member` of `pool` from the start (the
    /// member has no agent).
    pub fn proxied(&self, pool: &str, member: &str) {
        *self
            .counters()
            .proxied
            .entry(PoolMember::new(pool, member))
            .or_default() += 1;
    }

    /// A connection was not served as asked, for `reason` (a short
    /// snake_case word: `no_route`, `no_member`, `steering_full`, ...).
    pub fn failure(&self, reason: &str) {
        *self
            .counters()
            .failures
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// A request head failed (counted under failures, reason
    /// [`HeadErrorKind::reason`]).
    pub fn head_error(&self, kind: HeadErrorKind) {
        self.failure(kind.reason());
    }

    /// There are `count` steering entries now.
    pub fn set_flows_active(&self, count: u64) {
        self.flows_active.store(count, Ordering::Relaxed);
    }

    /// `member` of `pool` passed (`up`) or failed its health check.
    pub fn set_member_up(&self, pool: &str, member: &str, up: bool) {
        self.counters()
            .member_up
            .insert(PoolMember::new(pool, member), up);
    }

    /// The agent at `agent` answered (`up`) its health check, or not.
    pub fn set_agent_up(&self, agent: &str, up: bool) {
        self.counters().agent_up.insert(agent.to_string(), up);
    }

    /// Keeps the up gauges of the members (pool, member) and agents named
    /// only: those a reload removed go (a counter stays, with its count).
    pub fn retain_up(&self, members: &[(&str, String)], agents: &[String]) {
        let mut c = self.counters();
        c.member_up
            .retain(|k, _| members.iter().any(|(p, m)| k.pool == *p && k.member == *m));
        c.agent_up.retain(|a, _| agents.contains(a));
    }

    /// Everything, in the Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let counters = self.counters();
        let mut text = String::new();
        header(
            &mut text,
            names::CONNECTIONS,
            "Connections accepted.",
            "counter",
        );
        for (listener, value) in &counters.connections {
            sample(
                &mut text,
                names::CONNECTIONS,
                &[("listener", listener)],
                *value as f64,
            );
        }
        let per_member = [
            (
                names::HANDOFFS,
                "Connections handed off to a member's agent.",
                &counters.handoffs,
            ),
            (
                names::FALLBACKS,
                "Handoffs that failed or rolled back, then proxied to the member's server.",
                &counters.fallbacks,
            ),
            (
                names::PROXIED,
                "Connections proxied to a member's server from the start (member without agent).",
                &counters.proxied,
            ),
        ];
        for (name, help, series) in per_member {
            header(&mut text, name, help, "counter");
            for (key, value) in series {
                sample(
                    &mut text,
                    name,
                    &[("pool", &key.pool), ("member", &key.member)],
                    *value as f64,
                );
            }
        }
        header(
            &mut text,
            names::FAILURES,
            "Connections not served as asked, by reason.",
            "counter",
        );
        for (reason, value) in &counters.failures {
            sample(
                &mut text,
                names::FAILURES,
                &[("reason", reason)],
                *value as f64,
            );
        }
        header(
            &mut text,
            names::FLOWS_ACTIVE,
            "Steering entries now.",
            "gauge",
        );
        sample(
            &mut text,
            names::FLOWS_ACTIVE,
            &[],
            self.flows_active.load(Ordering::Relaxed) as f64,
        );
        header(
            &mut text,
            names::MEMBER_UP,
            "1 when the member passes its health check.",
            "gauge",
        );
        for (key, up) in &counters.member_up {
            let labels = [("pool", key.pool.as_str()), ("member", key.member.as_str())];
            sample(
                &mut text,
                names::MEMBER_UP,
                &labels,
                f64::from(u8::from(*up)),
            );
        }
        header(
            &mut text,
            names::AGENT_UP,
            "1 when the agent takes handoffs (it answers an authenticated PING).",
            "gauge",
        );
        for (agent, up) in &counters.agent_up {
            sample(
                &mut text,
                names::AGENT_UP,
                &[("agent", agent.as_str())],
                f64::from(u8::from(*up)),
            );
        }
        header(
            &mut text,
            names::HANDOFF_SECONDS,
            "Time from the routing decision to the committed handoff.",
            "histogram",
        );
        let bucket_name = format!("{}_bucket", names::HANDOFF_SECONDS);
        for (pool, histogram) in &counters.handoff_seconds {
            let mut cumulative = 0;
            for (bound, in_bucket) in HANDOFF_SECONDS_BUCKETS.iter().zip(histogram.in_bucket) {
                cumulative += in_bucket;
                let le = bound.to_string();
                sample(
                    &mut text,
                    &bucket_name,
                    &[("pool", pool), ("le", &le)],
                    cumulative as f64,
                );
            }
            sample(
                &mut text,
                &bucket_name,
                &[("pool", pool), ("le", "+Inf")],
                histogram.count as f64,
            );
            sample(
                &mut text,
                &format!("{}_sum", names::HANDOFF_SECONDS),
                &[("pool", pool)],
                histogram.sum,
            );
            sample(
                &mut text,
                &format!("{}_count", names::HANDOFF_SECONDS),
                &[("pool", pool)],
                histogram.count as f64,
            );
        }
        text
    }
}

fn header(text: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(text: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    text.push_str(name);
    if !labels.is_empty() {
        text.push('{');
        for (index, (label, label_value)) in labels.iter().enumerate() {
            if index > 0 {
                text.push(',');
            }
            let _ = write!(text, "{label}=\"");
            for character in label_value.chars() {
                match character {
                    '\\' => text.push_str("\\\\"),
                    '"' => text.push_str("\\\""),
                    '\n' => text.push_str("\\n"),
                    other => text.push(other),
                }
            }
            text.push('"');
        }
        text.push('}');
    }
    let _ = writeln!(text, " {}", format_value(value));
}

fn format_value(value: f64) -> String {
    if value == f64::INFINITY {
        String::from("+Inf")
    } else if value == f64::NEG_INFINITY {
        String::from("-Inf")
    } else if value.is_nan() {
        String::from("NaN")
    } else {
        value.to_string()
    }
}

/// One sample line of the text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name (with `_bucket`, `_sum`, `_count` for histograms).
    pub name: String,
    /// The labels.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// A line of metrics text that is not a sample, a comment or blank.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metrics text line {line}: {what}")]
pub struct MetricsParseError {
    /// The line, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub what: String,
}

/// The samples of Prometheus text `text`, skipping comments, blank lines
/// and lines that are not samples (use [`try_parse_metrics`] to refuse
/// those).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|line| parse_line(line).ok().flatten())
        .collect()
}

/// The samples of Prometheus text `text`; the first line that is not a
/// sample, a comment or blank is an error.
pub fn try_parse_metrics(text: &str) -> Result<Vec<Sample>, MetricsParseError> {
    let mut samples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let parsed = parse_line(line).map_err(|what| MetricsParseError {
            line: index + 1,
            what,
        })?;
        samples.extend(parsed);
    }
    Ok(samples)
}

/// One line: `None` for a comment or a blank line.
fn parse_line(line: &str) -> Result<Option<Sample>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let name_end = line
        .find(|character: char| {
            !(character.is_ascii_alphanumeric() || character == '_' || character == ':')
        })
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|character: char| character.is_ascii_digit()) {
        return Err(String::from("no metric name"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        number => number
            .parse()
            .map_err(|_| format!("bad value \"{number}\""))?,
    };
    // An optional timestamp (milliseconds), then nothing.
    if let Some(timestamp) = fields.next() {
        if timestamp.parse::<i64>().is_err() || fields.next().is_some() {
            return Err(String::from("bytes after the value"));
        }
    }
    Ok(Some(Sample {
        name: name.to_string(),
        labels,
        value,
    }))
}

/// `name="value",...}`; returns what follows the closing brace.
fn parse_labels<'a>(
    mut rest: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, String> {
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let (label, after_name) = rest.split_once('=').ok_or("label without '='")?;
        let label = label.trim();
        if label.is_empty()
            || !label
                .chars()
                .all(|character| character.is_ascii_alphanumeric() || character == '_')
        {
            return Err(format!("bad label name \"{label}\""));
        }
        let mut chars = after_name.trim_start().char_indices();
        let after_name = after_name.trim_start();
        if chars.next().map(|(_, quote)| quote) != Some('"') {
            return Err(format!("label {label} has no quoted value"));
        }
        let mut value = String::new();
        let mut end = None;
        while let Some((index, character)) = chars.next() {
            match character {
                '"' => {
                    end = Some(index + 1);
                    break;
                }
                '\\' => match chars.next().map(|(_, escaped)| escaped) {
                    Some('n') => value.push('\n'),
                    Some(escaped @ ('\\' | '"')) => value.push(escaped),
                    _ => return Err(format!("bad escape in label {label}")),
                },
                other => value.push(other),
            }
        }
        let end = end.ok_or_else(|| format!("label {label}: unterminated value"))?;
        labels.insert(label.to_string(), value);
        rest = after_name[end..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// The `quantile` (0..=1) of histogram `name` (its `_bucket` samples, all
/// label sets that `filter` keeps summed), interpolated linearly inside the
/// bucket as Prometheus' `histogram_quantile` does; `None` without
/// observations.
pub fn histogram_quantile(
    samples: &[Sample],
    name: &str,
    quantile: f64,
    filter: &dyn Fn(&Sample) -> bool,
) -> Option<f64> {
    let bucket_name = format!("{name}_bucket");
    let mut cumulative: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for sample in samples
        .iter()
        .filter(|sample| sample.name == bucket_name && filter(sample))
    {
        let Some(bound) = sample.label("le").and_then(|le| match le {
            "+Inf" => Some(f64::INFINITY),
            other => other.parse::<f64>().ok(),
        }) else {
            continue;
        };
        // Order by bound; f64 bits order the same for non-negative numbers.
        let entry = cumulative.entry(bound.to_bits()).or_insert((bound, 0.0));
        entry.1 += sample.value;
    }
    let total = cumulative.values().last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = quantile.clamp(0.0, 1.0) * total;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for (bound, count) in cumulative.values() {
        if *count >= rank {
            if bound.is_infinite() {
                return Some(lower_bound);
            }
            let in_bucket = count - lower_count;
            let fraction = if in_bucket > 0.0 {
                (rank - lower_count) / in_bucket
            } else {
                1.0
            };
            return Some(lower_bound + (bound - lower_bound) * fraction);
        }
        lower_bound = *bound;
        lower_count = *count;
    }
    Some(lower_bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The up gauges of members and agents a reload removed go; their
    /// counters stay.
    #[test]
    fn retain_up_drops_the_gauges_of_what_is_gone() {
        let m = Metrics::new();
        m.register_member("red", "a");
        m.set_member_up("red", "a", true);
        m.set_member_up("red", "b", false);
        m.set_agent_up("10.0.0.3:7700", true);
        m.set_agent_up("10.0.0.4:7700", false);
        m.retain_up(&[("red", "a".to_string())], &["10.0.0.3:7700".to_string()]);
        let text = m.render();
        assert!(
            text.contains("tcpr_balance_member_up{pool=\"red\",member=\"a\"} 1"),
            "{text}"
        );
        assert!(!text.contains("member=\"b\"} "), "{text}");
        assert!(
            text.contains("tcpr_balance_agent_up{agent=\"10.0.0.3:7700\"} 1"),
            "{text}"
        );
        assert!(!text.contains("10.0.0.4:7700"), "{text}");
        m.retain_up(&[], &[]);
        let text = m.render();
        assert!(!text.contains("tcpr_balance_member_up{"), "{text}");
        assert!(
            text.contains("tcpr_balance_handoffs_total{pool=\"red\",member=\"a\"} 0"),
            "{text}"
        );
    }
}
