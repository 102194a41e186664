//! The pure core of `tcpr balance`, an L7 load balancer that peeks at a
//! connection's request head, picks a pool and a member, and hands the live
//! connection to that member's agent (or proxies it to the member's server
//! when a handoff is impossible).
//!
//! What is here, all without sockets or a clock (time comes in as an
//! argument):
//! - [`config`]: the TOML config file, checked whole: every error is
//!   `FILE:LINE:COL: what is wrong`, pointing at the offending key or value.
//! - [`head`]: the request head a listener peeks at: HTTP/1.x (method, path,
//!   `Host`) or a TLS ClientHello (SNI, ALPN), with `Incomplete` until the
//!   head is whole, and the canned HTTP error responses and TLS alerts.
//! - [`route`]: which pool a head goes to.
//! - [`pool`]: which member of a pool a client goes to (consistent hash,
//!   weighted round-robin, weighted least-connections).
//! - [`metrics`]: the counters and histogram, rendered in the Prometheus
//!   text format, and a parser for that text.
//!
//! What these modules do not do: listen, peek, check health, hand off,
//! proxy, or steer packets. The runtime modules written beside them in this
//! crate (`runtime`, `proxy`, `health`, `serve_metrics`) do the I/O, with
//! `tcpr-handoff` and `tcpr-steer`; the CLI is `crates/tcpr/src/balance.rs`.
//! The head parsers do not decrypt anything and do not validate a request
//! beyond what routing needs: the backend reads the same bytes and answers
//! them itself.
//!
//! ```
//! use tcpr_balance::{config::Config, head, pool::Pool, route::Router};
//! use std::path::Path;
//! let text = r#"
//! [[listener]]
//! name = "web"
//! bind = ["127.0.0.1:8080"]
//! protocol = "http"
//! default_pool = "blue"
//! [[listener.route]]
//! host = "*.red.example"
//! pool = "red"
//! [[pool]]
//! name = "red"
//! members = [{ server = "10.0.0.3:8080" }]
//! [[pool]]
//! name = "blue"
//! members = [{ server = "10.0.0.4:8080" }]
//! "#;
//! let config = Config::parse(text, Path::new("balance.toml")).unwrap();
//! let listener = &config.listeners[0];
//! let router = Router::new(listener);
//! let bytes = b"GET /x HTTP/1.1\r\nHost: www.Red.example:8080\r\n\r\n";
//! let request = head::parse(listener.protocol, bytes, listener.max_head_bytes).unwrap();
//! assert_eq!(router.pick(&request), Some("red"));
//! let red = Pool::new(&config.pools[0]);
//! let client = "192.0.2.7:51234".parse().unwrap();
//! let member = red.pick(client, &|_| true).unwrap();
//! assert_eq!(red.member(member).server, Some("10.0.0.3:8080".parse().unwrap()));
//! // A head cut short is not an answer yet: peek again.
//! assert_eq!(
//!     head::parse(listener.protocol, &bytes[..20], listener.max_head_bytes),
//!     Err(head::HeadError::Incomplete)
//! );
//! ```
#![forbid(unsafe_code)]

// The pure modules read no clock (the methods are listed in .clippy.toml);
// the runtime's modules do.
#[deny(clippy::disallowed_methods)]
pub mod config;
#[deny(clippy::disallowed_methods)]
pub mod head;
#[deny(clippy::disallowed_methods)]
pub mod metrics;
#[deny(clippy::disallowed_methods)]
pub mod pool;
#[deny(clippy::disallowed_methods)]
pub mod route;

// The runtime: sockets, threads and the clock (no `unsafe`: nix wraps the
// calls std lacks).
#[deny(clippy::disallowed_methods)]
mod batch;
#[allow(clippy::disallowed_methods)]
pub mod health;
#[allow(clippy::disallowed_methods)]
pub mod runtime;
#[allow(clippy::disallowed_methods)]
pub mod serve_metrics;

pub use config::{
    AgentsAuth, BalanceMethod, Config, ConfigError, HostPattern, Listener, MemberConfig,
    MetricsConfig, PoolConfig, Protocol, Route,
};
pub use head::{Head, HeadError};
pub use metrics::{parse_metrics, HeadErrorKind, Metrics, Sample};
pub use pool::{MemberId, Pool};
pub use route::Router;
