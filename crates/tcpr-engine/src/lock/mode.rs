//! How this kernel releases a lock, detected once per process.
//!
//! A release that takes effect at once needs DESTROYSETELEM (Linux 6.3:
//! a lock removes the flow's `unlocked` element, absent or not, in the
//! same transaction) and element expiry updates (Linux 6.10: the released
//! `flows` element must expire before its `unlocked` one). The first
//! release in a process probes both on a flow no packet carries (all
//! addresses and ports zero): its transaction destroys the probe's
//! `unlocked` element (an older kernel refuses the whole transaction) and
//! updates the probe's `flows` element to expire in 1 ms, then reads that
//! expiry back (one GET). A kernel without either falls back, with one
//! warning, to deleting elements, which waits for an RCU grace period.
//! Setting [`LEGACY_ENV`] makes a process behave as on such a kernel.

use super::{
    add_op, fast, Flow, LockSet, Netns, EXPIRED_EXPIRATION, EXPIRED_TIMEOUT,
    READD_BEFORE_DELETE_MS, UNLOCKED_TIMEOUT,
};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use tcpr_host::nfnl::{Batch, Element, Op};

/// Set (to anything) in the environment, the lock deletes elements as on a
/// kernel without DESTROYSETELEM or expiry updates: for tests of that path.
pub const LEGACY_ENV: &str = "TCPR_LOCK_LEGACY";

/// How releases work in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Not probed yet: locks destroy `unlocked` elements, the next
    /// release probes.
    Unknown,
    /// Releases add `unlocked` elements and expire `flows` ones.
    Shadow,
    /// Releases delete `flows` elements (and wait for a grace period).
    Delete,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            SHADOW => Mode::Shadow,
            DELETE => Mode::Delete,
            _ => Mode::Unknown,
        }
    }
}

const UNKNOWN: u8 = 0;
const SHADOW: u8 = 1;
const DELETE: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// The lease of the probe's element before its expiry update: long
/// enough that an expiry left unchanged shows.
const PROBE_LEASE_MS: u64 = 10_000;

/// The mode of this process.
pub(crate) fn current() -> Mode {
    static LEGACY: OnceLock<bool> = OnceLock::new();
    if *LEGACY.get_or_init(|| std::env::var_os(LEGACY_ENV).is_some()) {
        return Mode::Delete;
    }
    Mode::from_u8(MODE.load(Ordering::Relaxed))
}

/// Falls back to deleting, warning once per process.
pub(crate) fn fall_back(why: &str) {
    if MODE.swap(DELETE, Ordering::Relaxed) != DELETE {
        tracing::warn!(
            "this kernel cannot release a flow lock at once ({why}): releases delete \
             lock elements instead, each waiting for an RCU grace period (8-30 ms)"
        );
    }
}

/// A flow no packet carries.
pub(crate) fn probe_flow() -> Flow {
    let zero = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
    Flow {
        local: zero,
        peer: zero,
    }
}

fn probe_element() -> Vec<Element> {
    vec![Element::key(probe_flow().key())]
}

/// The transaction before the probe: the probe's `flows` element.
pub(crate) fn probe_setup() -> Batch {
    let mut batch = Batch::new();
    batch.elements(
        LockSet::V4.set_ref(),
        &probe_element(),
        add_op(PROBE_LEASE_MS),
    );
    batch
}

/// Adds the probe to a release's transaction.
pub(crate) fn probe(batch: &mut Batch) {
    batch.elements(LockSet::V4.unlocked(), &probe_element(), Op::Destroy);
    let expire = Op::AddExpiring {
        timeout: EXPIRED_TIMEOUT,
        expires_in: EXPIRED_EXPIRATION,
    };
    batch.elements(LockSet::V4.set_ref(), &probe_element(), expire);
}

/// After a probing release committed: whether the probe's element now
/// expires before an `unlocked` element would. Sets the mode either way
/// (on a failed lookup, only this release deletes).
pub(crate) fn confirm(ns: &Netns) -> bool {
    let listed = super::kept::with(ns, |nl| {
        nl.element(LockSet::V4.set_ref(), &probe_flow().key())
    });
    let expires_in = match listed {
        // Gone already: expired.
        Ok(None) => Duration::ZERO,
        Ok(Some(l)) => l.expires_in.unwrap_or(Duration::MAX),
        Err(e) => {
            tracing::warn!("cannot read back the lock probe ({e}); deleting this time");
            return false;
        }
    };
    if expires_in < UNLOCKED_TIMEOUT {
        MODE.store(SHADOW, Ordering::Relaxed);
        return true;
    }
    fall_back("it does not update an element's expiry (Linux 6.10+)");
    // Leave nothing behind: the probe would stay for its lease.
    let mut batch = Batch::new();
    let probe = probe_element();
    let set = LockSet::V4.set_ref();
    batch.elements(set, &probe, add_op(READD_BEFORE_DELETE_MS));
    batch.elements(set, &probe, Op::Delete);
    if let Err(e) = fast(ns, batch) {
        tracing::debug!("the lock probe stays until its lease ends: {e:?}");
    }
    false
}
