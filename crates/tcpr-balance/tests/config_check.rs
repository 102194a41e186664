//! `Config::parse`: a valid file and every error, each with the exact
//! `FILE:LINE:COL` it points at.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tcpr_balance::config::{
    AgentsAuth, BalanceMethod, Config, HostPattern, MemberConfig, MetricsConfig, Protocol,
};

const FILE: &str = "/etc/tcpr/balance.toml";

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new(FILE)).map_err(|error| error.to_string())
}

/// The one-line error for `text`.
fn error(text: &str) -> String {
    match parse(text) {
        Ok(config) => panic!("accepted:\n{text}\n{config:#?}"),
        Err(error) => error,
    }
}

fn address(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

const POOLS: &str = r#"
[[pool]]
name = "red"
members = [{ server = "10.0.0.3:8080" }]
"#;

/// A listener line block with `extra` inside it, then a pool "red".
fn with_listener(extra: &str) -> String {
    format!("[[listener]]\nname = \"web\"\nbind = [\"10.0.0.100:80\"]\nprotocol = \"http\"\ndefault_pool = \"red\"\n{extra}{POOLS}")
}

#[test]
fn the_contract_of_issue_6_parses_with_its_values_and_defaults() {
    let text = r#"
[agents]                      # how the balancer authenticates to agents
psk_file = "/etc/tcpr/psk"

[metrics]
listen = "127.0.0.1:9100"

[[listener]]
name = "web"
bind = ["10.0.0.100:80", "[fd00::100]:80"]
protocol = "http"
default_pool = "blue"
head_timeout_ms = 5000
max_head_bytes = 16384

[[listener.route]]
host = "a.example"
path_prefix = "/api"
pool = "red"

[[listener.route]]
host = "*.B.example."
pool = "blue"

[[listener]]
name = "tls"
bind = ["10.0.0.100:443"]
protocol = "tls"
[[listener.route]]
host = "a.example"
pool = "red"

[[pool]]
name = "red"
balance = "hash"
members = [ { agent = "10.0.0.3:7700", server = "10.0.0.3:8080", weight = 1 } ]

[[pool]]
name = "blue"
balance = "least-conn"
members = [
  { agent = "10.0.0.4:7700", weight = 3 },
  { server = "[fd00::5]:8080" },
]
"#;
    let config = parse(text).unwrap();
    assert_eq!(
        config.agents,
        AgentsAuth::Psk {
            psk_file: PathBuf::from("/etc/tcpr/psk")
        }
    );
    assert_eq!(
        config.metrics,
        Some(MetricsConfig {
            listen: address("127.0.0.1:9100")
        })
    );
    let web = &config.listeners[0];
    assert_eq!(web.name, "web");
    assert_eq!(
        web.bind,
        vec![address("10.0.0.100:80"), address("[fd00::100]:80")]
    );
    assert_eq!(web.protocol, Protocol::Http);
    assert_eq!(web.default_pool.as_deref(), Some("blue"));
    assert_eq!(web.head_timeout, Duration::from_millis(5000));
    assert_eq!(web.max_head_bytes, 16384);
    assert_eq!(web.routes.len(), 2);
    assert_eq!(
        web.routes[0].host,
        Some(HostPattern::Exact("a.example".into()))
    );
    assert_eq!(web.routes[0].path_prefix.as_deref(), Some("/api"));
    assert_eq!(web.routes[0].pool, "red");
    assert_eq!(
        web.routes[1].host,
        Some(HostPattern::AnyUnder("b.example".into()))
    );
    let tls = &config.listeners[1];
    assert_eq!(tls.protocol, Protocol::Tls);
    assert_eq!(tls.default_pool, None);
    // Defaults.
    assert_eq!(tls.head_timeout, Duration::from_millis(5000));
    assert_eq!(tls.max_head_bytes, 16384);

    let red = &config.pools[0];
    assert_eq!(red.balance, BalanceMethod::Hash);
    assert_eq!(
        red.members,
        vec![MemberConfig {
            agent: Some(address("10.0.0.3:7700")),
            server: Some(address("10.0.0.3:8080")),
            weight: 1
        }]
    );
    let blue = &config.pools[1];
    assert_eq!(blue.balance, BalanceMethod::LeastConn);
    assert_eq!(blue.members[0].weight, 3);
    assert_eq!(blue.members[0].server, None);
    assert_eq!(blue.members[1].agent, None);
    assert_eq!(blue.members[1].weight, 1, "default weight");
}

#[test]
fn defaults_balance_hash_and_round_robin_spelling() {
    let config = parse(&with_listener("")).unwrap();
    assert_eq!(config.pools[0].balance, BalanceMethod::Hash);
    assert_eq!(config.agents, AgentsAuth::None);
    let text = with_listener("").replace(
        "name = \"red\"\n",
        "name = \"red\"\nbalance = \"round-robin\"\n",
    );
    assert_eq!(
        parse(&text).unwrap().pools[0].balance,
        BalanceMethod::RoundRobin
    );
}

#[test]
fn certs_and_relative_paths_resolve_against_the_file_folder() {
    let text = format!(
        "[agents]\ncert = \"balancer.pem\"\nkey = \"/keys/balancer.key\"\nca = \"ca.pem\"\n{}",
        with_listener("")
    );
    assert_eq!(
        parse(&text).unwrap().agents,
        AgentsAuth::Certs {
            cert: PathBuf::from("/etc/tcpr/balancer.pem"),
            key: PathBuf::from("/keys/balancer.key"),
            ca: PathBuf::from("/etc/tcpr/ca.pem"),
        }
    );
}

#[test]
fn syntax_error() {
    assert_eq!(
        error("[[listener]\nname = \"web\"\n"),
        format!("{FILE}:1:12: unclosed array table, expected `]`")
    );
}

#[test]
fn unknown_top_level_key() {
    assert_eq!(
        error(&format!("workers = 4\n{}", with_listener(""))),
        format!("{FILE}:1:1: unknown field `workers`, expected one of `agents`, `metrics`, `listener`, `pool`")
    );
}

#[test]
fn unknown_listener_key() {
    assert_eq!(
        error(&with_listener("timeout = 3\n")),
        format!("{FILE}:6:1: unknown field `timeout`, expected one of `name`, `bind`, `protocol`, `default_pool`, `head_timeout_ms`, `max_head_bytes`, `route`")
    );
}

#[test]
fn unknown_member_key() {
    let text = with_listener("").replace("{ server", "{ weigth = 2, server");
    assert_eq!(
        error(&text),
        format!("{FILE}:9:14: unknown field `weigth`, expected one of `agent`, `server`, `weight`")
    );
}

#[test]
fn unknown_route_key() {
    let text = with_listener("[[listener.route]]\nhost = \"a.example\"\npol = \"red\"\n");
    assert_eq!(
        error(&text),
        format!("{FILE}:8:1: unknown field `pol`, expected one of `host`, `path_prefix`, `pool`")
    );
}

#[test]
fn wrong_type() {
    assert_eq!(
        error(&with_listener("head_timeout_ms = \"5s\"\n")),
        format!("{FILE}:6:19: invalid type: string \"5s\", expected i64")
    );
    let text = with_listener("").replace("bind = [\"10.0.0.100:80\"]", "bind = \"10.0.0.100:80\"");
    assert_eq!(
        error(&text),
        format!("{FILE}:3:8: invalid type: string \"10.0.0.100:80\", expected a sequence")
    );
}

#[test]
fn unknown_protocol_and_balance() {
    let text = with_listener("").replace("protocol = \"http\"", "protocol = \"udp\"");
    assert_eq!(
        error(&text),
        format!("{FILE}:4:12: unknown variant `udp`, expected one of `http`, `tls`, `tcp`")
    );
    let text =
        with_listener("").replace("name = \"red\"\n", "name = \"red\"\nbalance = \"random\"\n");
    assert_eq!(
        error(&text),
        format!("{FILE}:9:11: unknown variant `random`, expected one of `hash`, `round-robin`, `least-conn`")
    );
}

#[test]
fn missing_key() {
    let text = with_listener("").replace("protocol = \"http\"\n", "");
    assert_eq!(
        error(&text),
        format!("{FILE}:1:1: missing field `protocol`")
    );
}

#[test]
fn bad_addresses() {
    let text = with_listener("").replace("\"10.0.0.100:80\"", "\"10.0.0.100\"");
    assert_eq!(
        error(&text),
        format!("{FILE}:3:9: bad bind address \"10.0.0.100\": expected IP:PORT, as 10.0.0.1:80 or [fd00::1]:80")
    );
    let text = with_listener("").replace("\"10.0.0.3:8080\"", "\"backend:8080\"");
    assert_eq!(
        error(&text),
        format!("{FILE}:9:23: bad server address \"backend:8080\": expected IP:PORT, as 10.0.0.1:80 or [fd00::1]:80")
    );
    let text = with_listener("").replace("\"10.0.0.3:8080\"", "\"10.0.0.3:0\"");
    assert_eq!(
        error(&text),
        format!("{FILE}:9:23: bad server address \"10.0.0.3:0\": a destination needs a specific IP and a port other than 0")
    );
    let text = format!(
        "[metrics]\nlisten = \"localhost:9100\"\n{}",
        with_listener("")
    );
    assert_eq!(
        error(&text),
        format!("{FILE}:2:10: bad metrics listen address \"localhost:9100\": expected IP:PORT, as 10.0.0.1:80 or [fd00::1]:80")
    );
}

#[test]
fn unknown_pool_in_route_and_default_pool() {
    let text = with_listener("").replace("default_pool = \"red\"", "default_pool = \"green\"");
    assert_eq!(
        error(&text),
        format!("{FILE}:5:16: unknown pool \"green\" (known pools: \"red\")")
    );
    let text = with_listener("[[listener.route]]\nhost = \"a.example\"\npool = \"blue\"\n");
    assert_eq!(
        error(&text),
        format!("{FILE}:8:8: unknown pool \"blue\" (known pools: \"red\")")
    );
}

#[test]
fn duplicate_names() {
    let second = "[[listener]]\nname = \"web\"\nbind = [\"10.0.0.100:81\"]\nprotocol = \"tcp\"\ndefault_pool = \"red\"\n";
    assert_eq!(
        error(&with_listener(second)),
        format!("{FILE}:7:8: duplicate listener name \"web\" (first at 2:8)")
    );
    let text = format!("{}{POOLS}", with_listener(""));
    assert_eq!(
        error(&text),
        format!("{FILE}:12:8: duplicate pool name \"red\" (first at 8:8)")
    );
}

#[test]
fn duplicate_bind_addresses() {
    let second = "[[listener]]\nname = \"api\"\nbind = [\"10.0.0.100:81\", \"10.0.0.100:80\"]\nprotocol = \"tcp\"\ndefault_pool = \"red\"\n";
    assert_eq!(
        error(&with_listener(second)),
        format!(
            "{FILE}:8:26: bind address 10.0.0.100:80 is already used by listener \"web\" (at 3:9)"
        )
    );
    // The wildcard address of the family covers every address.
    let second = "[[listener]]\nname = \"api\"\nbind = [\"0.0.0.0:80\"]\nprotocol = \"tcp\"\ndefault_pool = \"red\"\n";
    assert_eq!(
        error(&with_listener(second)),
        format!("{FILE}:8:9: bind address 0.0.0.0:80 is already used by listener \"web\" (at 3:9)")
    );
    // The metrics address too.
    let text = format!(
        "[metrics]\nlisten = \"10.0.0.100:80\"\n{}",
        with_listener("")
    );
    assert_eq!(
        error(&text),
        format!(
            "{FILE}:5:9: bind address 10.0.0.100:80 is already used by [metrics] listen (at 2:10)"
        )
    );
    // Other family, other port, or port 0: no conflict.
    let second = "[[listener]]\nname = \"api\"\nbind = [\"[::]:80\", \"10.0.0.100:81\", \"127.0.0.1:0\", \"127.0.0.1:0\"]\nprotocol = \"tcp\"\ndefault_pool = \"red\"\n";
    parse(&with_listener(second)).unwrap();
}

#[test]
fn member_with_neither_agent_nor_server() {
    let text = with_listener("").replace("{ server = \"10.0.0.3:8080\" }", "{ weight = 2 }");
    assert_eq!(
        error(&text),
        format!("{FILE}:9:12: member has neither agent nor server: give an agent (handoffs), a server (proxied), or both")
    );
}

#[test]
fn weight_out_of_range() {
    let text = with_listener("").replace("{ server", "{ weight = 0, server");
    assert_eq!(
        error(&text),
        format!("{FILE}:9:23: weight 0 out of range: expected 1..=4294967295")
    );
    let text = with_listener("").replace("{ server", "{ weight = -3, server");
    assert_eq!(
        error(&text),
        format!("{FILE}:9:23: weight -3 out of range: expected 1..=4294967295")
    );
}

#[test]
fn duplicate_member() {
    let text = with_listener("").replace(
        "members = [{ server = \"10.0.0.3:8080\" }]",
        "members = [\n  { server = \"10.0.0.3:8080\" },\n  { server = \"10.0.0.3:8080\", weight = 2 },\n]",
    );
    assert_eq!(
        error(&text),
        format!("{FILE}:11:3: duplicate member 10.0.0.3:8080 in pool \"red\" (first at 10:3)")
    );
}

#[test]
fn path_prefix_on_a_non_http_listener() {
    let text = with_listener(
        "[[listener.route]]\nhost = \"a.example\"\npath_prefix = \"/api\"\npool = \"red\"\n",
    )
    .replace("protocol = \"http\"", "protocol = \"tls\"");
    assert_eq!(
        error(&text),
        format!("{FILE}:8:15: path_prefix needs an http listener (this one is tls)")
    );
    let text = with_listener("[[listener.route]]\npath_prefix = \"api\"\npool = \"red\"\n");
    assert_eq!(
        error(&text),
        format!("{FILE}:7:15: path_prefix \"api\" must start with '/'")
    );
}

#[test]
fn routes_on_a_tcp_listener_and_tcp_without_default_pool() {
    let text = with_listener("[[listener.route]]\nhost = \"a.example\"\npool = \"red\"\n")
        .replace("protocol = \"http\"", "protocol = \"tcp\"");
    assert_eq!(
        error(&text),
        format!("{FILE}:6:1: listener \"web\" is tcp: it reads no head, so it has no routes (use default_pool)")
    );
    let text = with_listener("")
        .replace("protocol = \"http\"", "protocol = \"tcp\"")
        .replace("default_pool = \"red\"\n", "");
    assert_eq!(
        error(&text),
        format!("{FILE}:2:8: listener \"web\" is tcp and needs default_pool")
    );
    let text = with_listener("").replace("default_pool = \"red\"\n", "");
    assert_eq!(
        error(&text),
        format!("{FILE}:2:8: listener \"web\" has neither a route nor default_pool: it would refuse every connection")
    );
}

#[test]
fn bad_host_patterns() {
    for (pattern, message) in [
        ("a.*.example", "bad host pattern \"a.*.example\": a wildcard may only be a leading \"*.\" (as in \"*.example\")"),
        ("*example", "bad host pattern \"*example\": a wildcard may only be a leading \"*.\" (as in \"*.example\")"),
        ("a.example:80", "bad host pattern \"a.example:80\": expected a host name (letters, digits, '-', '.'), an IP address or \"*.domain\", without a port"),
        ("a..example", "bad host pattern \"a..example\": expected a host name (letters, digits, '-', '.'), an IP address or \"*.domain\", without a port"),
        ("", "bad host pattern \"\": expected a host name (letters, digits, '-', '.'), an IP address or \"*.domain\", without a port"),
    ] {
        let text = with_listener(&format!("[[listener.route]]\nhost = \"{pattern}\"\npool = \"red\"\n"));
        assert_eq!(error(&text), format!("{FILE}:7:8: {message}"), "{pattern}");
    }
}

#[test]
fn limits() {
    for (line, message) in [
        (
            "head_timeout_ms = 0",
            "6:19: head_timeout_ms 0 out of range: expected 1..=600000",
        ),
        (
            "head_timeout_ms = 600001",
            "6:19: head_timeout_ms 600001 out of range: expected 1..=600000",
        ),
        (
            "max_head_bytes = 255",
            "6:18: max_head_bytes 255 out of range: expected 256..=1048576",
        ),
        (
            "max_head_bytes = 1048577",
            "6:18: max_head_bytes 1048577 out of range: expected 256..=1048576",
        ),
        (
            "max_head_bytes = -1",
            "6:18: max_head_bytes -1 out of range: expected 256..=1048576",
        ),
    ] {
        assert_eq!(
            error(&with_listener(&format!("{line}\n"))),
            format!("{FILE}:{message}")
        );
    }
    for line in [
        "head_timeout_ms = 1",
        "head_timeout_ms = 600000",
        "max_head_bytes = 256",
        "max_head_bytes = 1048576",
    ] {
        parse(&with_listener(&format!("{line}\n"))).unwrap();
    }
}

#[test]
fn empty_pool_and_empty_names() {
    let text =
        with_listener("").replace("members = [{ server = \"10.0.0.3:8080\" }]", "members = []");
    assert_eq!(
        error(&text),
        format!("{FILE}:9:11: pool \"red\" has no members")
    );
    let text = with_listener("").replace("name = \"web\"", "name = \"\"");
    assert_eq!(error(&text), format!("{FILE}:2:8: empty listener name"));
}

#[test]
fn an_agent_needs_the_agents_table() {
    let text = with_listener("").replace("{ server", "{ agent = \"10.0.0.3:7700\", server");
    assert_eq!(
        error(&text),
        format!("{FILE}:9:22: member has an agent but the file has no [agents] table (psk_file, or cert + key + ca)")
    );
    parse(&format!("[agents]\npsk_file = \"psk\"\n{text}")).unwrap();
}

#[test]
fn agents_table_must_be_whole() {
    let text = format!(
        "[agents]\ncert = \"c.pem\"\nkey = \"k.pem\"\n{}",
        with_listener("")
    );
    assert_eq!(
        error(&text),
        format!("{FILE}:1:1: [agents] has no ca: cert + key + ca go together")
    );
    let text = format!(
        "[agents]\npsk_file = \"psk\"\nca = \"ca.pem\"\n{}",
        with_listener("")
    );
    assert_eq!(
        error(&text),
        format!("{FILE}:3:6: [agents] takes psk_file or cert + key + ca, not both (ca given with psk_file)")
    );
    let text = format!("[agents]\n{}", with_listener(""));
    assert_eq!(
        error(&text),
        format!("{FILE}:1:1: [agents] needs psk_file, or cert + key + ca")
    );
    let text = format!("[agents]\npsk_file = \"\"\n{}", with_listener(""));
    assert_eq!(error(&text), format!("{FILE}:2:12: empty path"));
}

#[test]
fn no_listener() {
    assert_eq!(
        error(POOLS),
        format!("{FILE}:1:1: no [[listener]]: the balancer would listen on nothing")
    );
}

#[test]
fn the_first_error_in_the_file_is_reported() {
    // Two errors: the pool's (line 9) comes after the listener's (line 6).
    let text = with_listener("max_head_bytes = 1\n").replace("{ server", "{ weight = 0, server");
    assert!(error(&text).starts_with(&format!("{FILE}:6:18: ")));
}

#[test]
fn columns_count_characters_not_bytes() {
    let text = with_listener("")
        .replace("name = \"web\"", "name = \"wéb\" # é")
        .replace("default_pool = \"red\"", "default_pool = \"rød\"");
    assert_eq!(
        error(&text),
        format!("{FILE}:5:16: unknown pool \"rød\" (known pools: \"red\")")
    );
    let text = format!("# ĉu\n[agents]\npsk_file = \"\" # é\n{}", with_listener(""));
    assert_eq!(error(&text), format!("{FILE}:3:12: empty path"));
}

#[test]
fn load_reports_an_unreadable_file() {
    let missing = Path::new("/nonexistent/tcpr/balance.toml");
    let message = Config::load(missing).unwrap_err().to_string();
    assert!(
        message.starts_with("/nonexistent/tcpr/balance.toml: cannot read: "),
        "{message}"
    );
}
