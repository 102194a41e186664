//! Health of the pools' members: does each agent take handoffs (an
//! authenticated channel opens and the agent answers PING: a killed
//! agent's stand-in completes the handshake, then closes on anything but
//! a QUERY) and is each server connectable (a TCP connection
//! opens)? Checked on an interval, all targets at once; a failed handoff
//! or connect also marks its target down at once, until the next check
//! finds it up again.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::RwLock;
use std::time::Duration;
use tcpr_handoff::Auth;

/// How often every target is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one check waits for its target.
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(800);

/// What a member offers, as checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A handoff agent (an authenticated channel opens and PING is
    /// answered).
    Agent(SocketAddr),
    /// A server the balancer proxies to (a TCP connection must open).
    Server(SocketAddr),
}

/// The last known state of every target. A target never checked counts
/// as up: a balancer that just started sends traffic at once.
#[derive(Debug, Default)]
pub struct Health {
    up: RwLock<HashMap<Target, bool>>,
}

impl Health {
    /// Whether `target` was up when last checked (or never checked).
    pub fn is_up(&self, target: Target) -> bool {
        self.up
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&target)
            .copied()
            .unwrap_or(true)
    }

    /// Records a state found by a check or by real traffic.
    pub fn set(&self, target: Target, up: bool) {
        let was = self
            .up
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target, up);
        if was != Some(up) {
            if up {
                tracing::info!("{target:?} is up");
            } else {
                tracing::warn!("{target:?} is down");
            }
        }
    }

    /// Checks every target at once (one thread each; each step of a check
    /// bounded by [`CHECK_TIMEOUT`]: a server's connect; an agent's
    /// connect, TLS handshake and PING, so up to three of them) and
    /// records the results.
    pub fn check(&self, targets: &[Target], auth: Option<&Auth>) {
        std::thread::scope(|s| {
            for &t in targets {
                s.spawn(move || self.set(t, probe(t, auth)));
            }
        });
    }
}

/// One check of one target.
fn probe(target: Target, auth: Option<&Auth>) -> bool {
    match target {
        Target::Server(addr) => TcpStream::connect_timeout(&addr, CHECK_TIMEOUT).is_ok(),
        // Without credentials no handoff is tried: the agent is not used.
        Target::Agent(_) if auth.is_none() => false,
        Target::Agent(addr) => {
            let Some(auth) = auth else { return false };
            match tcpr_handoff::probe_agent(addr, auth, CHECK_TIMEOUT) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!("agent {addr}: {e}");
                    false
                }
            }
        }
    }
}
