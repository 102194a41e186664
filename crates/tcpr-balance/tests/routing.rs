//! Routing (which pool) and picking (which member): route order and
//! matching, consistent hashing's stability and weights, round-robin and
//! least-conn.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use tcpr_balance::config::{BalanceMethod, Config, MemberConfig, PoolConfig};
use tcpr_balance::head::Head;
use tcpr_balance::pool::{MemberId, Pool};
use tcpr_balance::route::Router;

const ROUTES: &str = r#"
[[listener]]
name = "web"
bind = ["127.0.0.1:8080"]
protocol = "http"
default_pool = "fallback"
[[listener.route]]
host = "a.example"
path_prefix = "/api"
pool = "api"
[[listener.route]]
host = "a.example"
pool = "a"
[[listener.route]]
host = "*.b.example"
pool = "b"
[[listener.route]]
path_prefix = "/static/"
pool = "static"

[[listener]]
name = "tls"
bind = ["127.0.0.1:8443"]
protocol = "tls"
[[listener.route]]
host = "*.b.example"
pool = "b"

[[listener]]
name = "raw"
bind = ["127.0.0.1:9000"]
protocol = "tcp"
default_pool = "a"
"#;

fn routers() -> Vec<Router> {
    let mut text = ROUTES.to_string();
    for pool in ["api", "a", "b", "static", "fallback"] {
        text.push_str(&format!(
            "[[pool]]\nname = \"{pool}\"\nmembers = [{{ server = \"10.0.0.3:80\" }}]\n"
        ));
    }
    let config = Config::parse(&text, Path::new("routes.toml")).unwrap();
    config.listeners.iter().map(Router::new).collect()
}

fn http(path: &str, host: Option<&str>) -> Head {
    Head::Http {
        method: "GET".into(),
        path: path.into(),
        host: host.map(String::from),
    }
}

fn tls(sni: Option<&str>) -> Head {
    Head::Tls {
        sni: sni.map(String::from),
        alpn: vec![],
    }
}

#[test]
fn routes_are_tried_in_order_then_the_default_pool() {
    let routers = routers();
    let web = &routers[0];
    assert_eq!(web.pick(&http("/api/v1", Some("a.example"))), Some("api"));
    assert_eq!(web.pick(&http("/apix", Some("a.example"))), Some("api"));
    assert_eq!(web.pick(&http("/ap", Some("a.example"))), Some("a"));
    assert_eq!(web.pick(&http("/", Some("x.b.example"))), Some("b"));
    assert_eq!(web.pick(&http("/", Some("y.x.b.example"))), Some("b"));
    // "*.b.example" does not match "b.example" itself.
    assert_eq!(web.pick(&http("/", Some("b.example"))), Some("fallback"));
    assert_eq!(web.pick(&http("/", Some("xb.example"))), Some("fallback"));
    // Matching is case-insensitive even on a head built by hand.
    assert_eq!(web.pick(&http("/", Some("X.B.Example"))), Some("b"));
    // A route with a host does not match a head without one.
    assert_eq!(web.pick(&http("/", None)), Some("fallback"));
    assert_eq!(web.pick(&http("/static/x.css", None)), Some("static"));
    assert_eq!(web.pick(&http("/static", None)), Some("fallback"));
}

#[test]
fn tls_routes_by_sni_and_tcp_goes_to_the_default_pool() {
    let routers = routers();
    let tls_router = &routers[1];
    assert_eq!(tls_router.pick(&tls(Some("www.b.example"))), Some("b"));
    // No route and no default pool: the caller sends an alert.
    assert_eq!(tls_router.pick(&tls(Some("a.example"))), None);
    assert_eq!(tls_router.pick(&tls(None)), None);
    assert_eq!(routers[2].pick(&Head::Tcp), Some("a"));
}

// ------------------------------------------------------------------ pools

fn member(index: u32, weight: u32) -> MemberConfig {
    let octets = index.to_be_bytes();
    MemberConfig {
        agent: Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 1, octets[2], octets[3])),
            7700,
        )),
        server: None,
        weight,
    }
}

fn pool(balance: BalanceMethod, members: Vec<MemberConfig>) -> Pool {
    Pool::new(&PoolConfig {
        name: "p".into(),
        balance,
        members,
    })
}

/// `count` client addresses, spread like real ones (a fixed LCG).
fn clients(count: usize) -> Vec<SocketAddr> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let bits = (state >> 32) as u32;
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(bits)),
                40_000 + (bits % 20_000) as u16,
            )
        })
        .collect()
}

fn everyone(_: MemberId) -> bool {
    true
}

/// Where each client goes, by the member's config (ids change when the
/// member list does).
fn placement(
    pool: &Pool,
    clients: &[SocketAddr],
    usable: &dyn Fn(MemberId) -> bool,
) -> Vec<MemberConfig> {
    clients
        .iter()
        .map(|client| pool.member(pool.pick(*client, usable).unwrap()).clone())
        .collect()
}

const CLIENTS: usize = 20_000;

#[test]
fn hash_keeps_a_client_on_its_member_whatever_its_port() {
    let pool = pool(
        BalanceMethod::Hash,
        (0..5).map(|index| member(index, 1)).collect(),
    );
    for client in clients(1000) {
        let first = pool.pick(client, &everyone).unwrap();
        let other_port = SocketAddr::new(client.ip(), client.port().wrapping_add(1));
        assert_eq!(pool.pick(other_port, &everyone), Some(first));
        // The same IPv4 client seen on a dual-stack socket.
        let IpAddr::V4(v4) = client.ip() else {
            unreachable!()
        };
        let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), client.port());
        assert_eq!(pool.pick(mapped, &everyone), Some(first));
    }
}

#[test]
fn hash_adding_a_member_moves_only_about_its_share_and_only_to_it() {
    let clients = clients(CLIENTS);
    let five: Vec<MemberConfig> = (0..5).map(|index| member(index, 1)).collect();
    let mut six = five.clone();
    six.push(member(5, 1));
    let before = placement(&pool(BalanceMethod::Hash, five), &clients, &everyone);
    let after = placement(&pool(BalanceMethod::Hash, six), &clients, &everyone);
    let mut moved = 0;
    for (old, new) in before.iter().zip(&after) {
        if old != new {
            assert_eq!(*new, member(5, 1), "a client moved between old members");
            moved += 1;
        }
    }
    let share = moved as f64 / CLIENTS as f64;
    assert!(
        (share - 1.0 / 6.0).abs() < 0.02,
        "moved {share}, expected about 1/6"
    );
}

#[test]
fn hash_removing_or_disabling_a_member_moves_only_its_clients_spread_over_the_rest() {
    let clients = clients(CLIENTS);
    let five: Vec<MemberConfig> = (0..5).map(|index| member(index, 1)).collect();
    let before = placement(
        &pool(BalanceMethod::Hash, five.clone()),
        &clients,
        &everyone,
    );
    // Removed from the file (and the rest reordered: keys are addresses).
    let mut four: Vec<MemberConfig> = five
        .iter()
        .filter(|config| **config != member(2, 1))
        .cloned()
        .collect();
    four.reverse();
    let removed = placement(&pool(BalanceMethod::Hash, four), &clients, &everyone);
    // Unusable (health check failed).
    let all = pool(BalanceMethod::Hash, five);
    let disabled = placement(&all, &clients, &|id| id != MemberId(2));
    assert_eq!(removed, disabled);
    let mut took: HashMap<String, usize> = HashMap::new();
    for (old, new) in before.iter().zip(&removed) {
        if *old == member(2, 1) {
            *took.entry(new.label()).or_default() += 1;
        } else {
            assert_eq!(old, new, "a client of a remaining member moved");
        }
    }
    let orphans: usize = took.values().sum();
    assert_eq!(
        took.len(),
        4,
        "the orphans spread over all four others: {took:?}"
    );
    for (label, count) in &took {
        let share = *count as f64 / orphans as f64;
        assert!(
            (share - 0.25).abs() < 0.05,
            "{label} took {share} of the orphans"
        );
    }
}

#[test]
fn hash_respects_weights() {
    let weights = [1, 2, 3, 4];
    let pool = pool(
        BalanceMethod::Hash,
        weights
            .iter()
            .enumerate()
            .map(|(index, weight)| member(index as u32, *weight))
            .collect(),
    );
    let mut counts = [0usize; 4];
    for client in clients(CLIENTS) {
        counts[pool.pick(client, &everyone).unwrap().0] += 1;
    }
    for (index, weight) in weights.iter().enumerate() {
        let share = counts[index] as f64 / CLIENTS as f64;
        let expected = f64::from(*weight) / 10.0;
        assert!(
            (share - expected).abs() < 0.02,
            "member {index}: {share}, expected {expected}"
        );
    }
}

#[test]
fn hash_spreads_ipv6_clients_too() {
    let pool = pool(
        BalanceMethod::Hash,
        (0..4).map(|index| member(index, 1)).collect(),
    );
    let mut counts = [0usize; 4];
    for client in clients(CLIENTS) {
        let IpAddr::V4(v4) = client.ip() else {
            unreachable!()
        };
        let [a, b, c, d] = v4.octets();
        let v6 = Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
        );
        counts[pool
            .pick(SocketAddr::new(IpAddr::V6(v6), 443), &everyone)
            .unwrap()
            .0] += 1;
    }
    for count in counts {
        let share = count as f64 / CLIENTS as f64;
        assert!((share - 0.25).abs() < 0.02, "{counts:?}");
    }
}

#[test]
fn no_usable_member_picks_none() {
    for method in [
        BalanceMethod::Hash,
        BalanceMethod::RoundRobin,
        BalanceMethod::LeastConn,
    ] {
        let pool = pool(method, (0..3).map(|index| member(index, 1)).collect());
        assert_eq!(pool.pick(clients(1)[0], &|_| false), None, "{method}");
    }
}

fn round_robin_sequence(
    pool: &Pool,
    picks: usize,
    usable: &dyn Fn(MemberId) -> bool,
) -> Vec<usize> {
    let client = clients(1)[0];
    (0..picks)
        .map(|_| pool.pick(client, usable).unwrap().0)
        .collect()
}

#[test]
fn round_robin_is_smooth_and_weighted() {
    // The smooth order of weights 5, 1, 1 (nginx's example): no burst of
    // five.
    let pool = pool(
        BalanceMethod::RoundRobin,
        vec![member(0, 5), member(1, 1), member(2, 1)],
    );
    assert_eq!(
        round_robin_sequence(&pool, 14, &everyone),
        [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]
    );

    let pool = self::pool(
        BalanceMethod::RoundRobin,
        vec![member(0, 1), member(1, 2), member(2, 3)],
    );
    let sequence = round_robin_sequence(&pool, 600, &everyone);
    for (index, expected) in [100, 200, 300].into_iter().enumerate() {
        assert_eq!(sequence.iter().filter(|id| **id == index).count(), expected);
    }
    // A member out of use is skipped; the others keep their ratio.
    let sequence = round_robin_sequence(&pool, 500, &|id| id != MemberId(1));
    assert_eq!(sequence.iter().filter(|id| **id == 1).count(), 0);
    assert_eq!(sequence.iter().filter(|id| **id == 0).count(), 125);
    assert_eq!(sequence.iter().filter(|id| **id == 2).count(), 375);
}

#[test]
fn least_conn_evens_open_connections_per_weight() {
    let pool = pool(
        BalanceMethod::LeastConn,
        vec![member(0, 1), member(1, 3), member(2, 1)],
    );
    let client = clients(1)[0];
    // Connections that stay open: counts follow the weights.
    for _ in 0..500 {
        let id = pool.pick(client, &everyone).unwrap();
        pool.opened(id);
    }
    assert_eq!(
        [
            pool.active(MemberId(0)),
            pool.active(MemberId(1)),
            pool.active(MemberId(2))
        ],
        [100, 300, 100]
    );
    // Member 1's connections close: it gets the next ones.
    for _ in 0..300 {
        pool.closed(MemberId(1));
    }
    for _ in 0..300 {
        let id = pool.pick(client, &everyone).unwrap();
        assert_eq!(id, MemberId(1));
        pool.opened(id);
    }
    // Ties go round rather than always to the first member.
    let fresh = self::pool(
        BalanceMethod::LeastConn,
        vec![member(0, 1), member(1, 1), member(2, 1)],
    );
    let picks: Vec<usize> = (0..6)
        .map(|_| fresh.pick(client, &everyone).unwrap().0)
        .collect();
    for index in 0..3 {
        assert_eq!(
            picks.iter().filter(|id| **id == index).count(),
            2,
            "{picks:?}"
        );
    }
    // Closing more than opened stays at zero.
    fresh.closed(MemberId(0));
    assert_eq!(fresh.active(MemberId(0)), 0);
    // An unusable member gets nothing even when it has the fewest.
    pool.opened(MemberId(0));
    for _ in 0..10 {
        assert_ne!(
            pool.pick(client, &|id| id != MemberId(0)),
            Some(MemberId(0))
        );
    }
}
