//! The flow lock: drops a frozen flow's packets in both directions on the
//! source host, with a lease, so that it outlives the socket (a packet that
//! meets no socket would be answered with a RST) and never leaks.
//!
//! One nftables table, `inet tcpr`, holds per wire family (a dual-stack
//! socket's IPv4-mapped flow counts as IPv4, since its packets are IPv4)
//! two sets keyed by `peer addr . peer port . local addr . local port`
//! with per-element timeouts: `flows4`/`flows6` (locked) and
//! `unlocked4`/`unlocked6` (released), and two rules (prerouting and
//! output, priority -300, before conntrack) that drop a packet whose flow
//! is locked and not released. The table is created on first use and is
//! otherwise static: per-flow state lives only in the set elements, which
//! expire by themselves. The table is installed with the `nft` command
//! (libnftables' syntax is the documented interface for rules); elements
//! change over nf_tables netlink ([`tcpr_host::nfnl`]), one transaction per
//! call, falling back to `nft` when the table is missing.
//!
//! Every change takes effect when its transaction commits, and the call
//! returns microseconds later, because it only *adds* elements, updates
//! their expiry, or destroys absent ones. Removing a present element also
//! commits at once, but the transaction then holds the element until an
//! RCU grace period has passed, and closing any nf_tables netlink socket
//! (`NETLINK_URELEASE`) waits for that (8-30 ms), holding the commit
//! mutex: so the transactions go through kept sockets (`kept`), and a
//! process hands them at exit to a child that closes them after a grace
//! period ([`detach_sockets`]). So a lock adds the flow
//! to `flows` for the lease and destroys its `unlocked` element (absent
//! unless released in the last [`UNLOCKED_TIMEOUT`] or so); a release adds
//! it to `unlocked` for [`UNLOCKED_TIMEOUT`] (plus 10 µs per flow of the
//! batch) and updates its `flows` element to expire in 1 ms, before the
//! `unlocked` one. Kernels without DESTROYSETELEM (Linux 6.3) or element
//! expiry updates (Linux 6.10), detected once per process (`mode`), delete
//! elements instead, as before the `unlocked` sets.

use crate::sys;
use crate::Error;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;
use tcpr_host::nfnl::{self, Batch, Element, Family, NlError, Op, SetRef};

mod kept;
mod mode;
pub use kept::detach_sockets;
use mode::Mode;
pub use mode::LEGACY_ENV;

/// The default lease of a lock.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// The longest lease a lock takes: a day. A lock only has to outlast a
/// move (seconds); a longer one keeps a flow dead long after it matters,
/// and nf_tables refuses timeouts past its jiffies range (ERANGE).
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 60 * 60);

/// The shortest lease: nf_tables counts element timeouts in milliseconds.
pub const MIN_LEASE: Duration = Duration::from_millis(1);

/// The timeout a released element is re-added with before its delete in the
/// same transaction (deleting an absent element fails the whole batch).
const READD_BEFORE_DELETE_MS: u64 = 1000;

/// A released element expires after this long (the shortest expiry; the
/// kernel rounds it up to the next jiffy). An expiration of 0 would mean
/// the whole timeout.
const EXPIRED_EXPIRATION: Duration = Duration::from_millis(1);

/// The timeout written with it (at least the expiration).
const EXPIRED_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a released flow stays in the `unlocked` set, at least: longer
/// than its `flows` element takes to expire (1 ms, rounded up to the next
/// jiffy: at most 10 ms at HZ=100; two jiffies there), short enough that a
/// relock rarely finds it there: removing a present element makes the
/// next close of an nf_tables netlink socket wait for an RCU grace period
/// (8-30 ms; the lock is in force before that, when the commit is
/// acknowledged; the lock's own sockets are kept and closed by a child).
pub const UNLOCKED_TIMEOUT: Duration = Duration::from_millis(20);

/// Added to [`UNLOCKED_TIMEOUT`] per released flow: a new `unlocked`
/// element's expiry counts from when the kernel parses it, a `flows`
/// element's updated expiry from the commit, after the whole batch (about
/// 4 µs per flow here).
const UNLOCKED_PER_FLOW: Duration = Duration::from_micros(10);

/// How long the `unlocked` elements of a release of `flows` flows last.
fn unlocked_timeout(flows: usize) -> Duration {
    UNLOCKED_TIMEOUT + UNLOCKED_PER_FLOW * u32::try_from(flows).unwrap_or(u32::MAX)
}

/// How often the kernel collects the sets' expired elements. A released
/// flow's elements expire within [`UNLOCKED_TIMEOUT`] but stay in the
/// set's hash table until collected; at the kernel's default (a second)
/// a busy front's sets grew to a second's worth of flows and shrank back
/// every second, and the hash table resizes took up to a tenth of the
/// machine (`rht_deferred_worker`) under `bench-balance`.
const GC_INTERVAL_MS: u64 = 100;

/// The nftables table tcpr owns.
pub const TABLE: &str = "tcpr";

/// One flow: the addresses as the socket reads them. A dual-stack socket
/// (AF_INET6, not `IPV6_V6ONLY`) talking to an IPv4 peer reads IPv4-mapped
/// addresses (`::ffff:10.0.0.1`) although its packets on the wire are IPv4;
/// [`Flow::wire`] gives the addresses its packets carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    /// Our address and port.
    pub local: SocketAddr,
    /// The peer's address and port.
    pub peer: SocketAddr,
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.local, self.peer)
    }
}

/// Two nf_tables registers per IPv6 address and one per IPv4 address, plus
/// one (padded) per port: the key of an IPv6 flow.
const KEY_BYTES_V6: usize = 2 * (16 + 4);

/// The lock's set for each wire family, and its nf_tables type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockSet {
    /// IPv4 packets (also those of IPv4-mapped flows).
    V4,
    /// IPv6 packets.
    V6,
}

impl LockSet {
    pub(crate) fn name(self) -> &'static str {
        match self {
            LockSet::V4 => "flows4",
            LockSet::V6 => "flows6",
        }
    }

    /// The name of the set of released flows.
    fn unlocked_name(self) -> &'static str {
        match self {
            LockSet::V4 => "unlocked4",
            LockSet::V6 => "unlocked6",
        }
    }

    /// The set of locked flows in the lock's table.
    pub(crate) fn set_ref(self) -> SetRef<'static> {
        SetRef {
            family: Family::Inet,
            table: TABLE,
            set: self.name(),
        }
    }

    /// The set of released flows.
    fn unlocked(self) -> SetRef<'static> {
        SetRef {
            set: self.unlocked_name(),
            ..self.set_ref()
        }
    }
}

impl Flow {
    /// The flow as its packets carry it: IPv4-mapped IPv6 addresses become
    /// IPv4 (a mapped socket's segments leave and arrive as IPv4, through
    /// the kernel's `ipv6_mapped` operations), others are unchanged.
    pub fn wire(&self) -> Flow {
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        Flow {
            local: canon(self.local),
            peer: canon(self.peer),
        }
    }

    /// The lock set that sees this flow's packets.
    pub(crate) fn set(&self) -> LockSet {
        if self.wire().local.is_ipv4() {
            LockSet::V4
        } else {
            LockSet::V6
        }
    }

    /// The set key, laid out as nf_tables registers hold the concatenation
    /// `peer addr . peer port . local addr . local port` of the packets on
    /// the wire: each part in network order, padded to 4 bytes.
    pub(crate) fn key(&self) -> Vec<u8> {
        let wire = self.wire();
        let mut key = Vec::with_capacity(KEY_BYTES_V6);
        for a in [wire.peer, wire.local] {
            match a.ip() {
                std::net::IpAddr::V4(ip) => key.extend_from_slice(&ip.octets()),
                std::net::IpAddr::V6(ip) => key.extend_from_slice(&ip.octets()),
            }
            key.extend_from_slice(&a.port().to_be_bytes());
            key.extend_from_slice(&[0, 0]);
        }
        key
    }

    /// The element in `nft` syntax.
    fn element(&self) -> String {
        let wire = self.wire();
        format!(
            "{} . {} . {} . {}",
            wire.peer.ip(),
            wire.peer.port(),
            wire.local.ip(),
            wire.local.port()
        )
    }
}

/// The network namespace the lock lives in: the one of the socket's, held
/// open so that `nft` can be run inside it. Shared, not duplicated, by the
/// per-connection locks of a batch: a duplicate could fail at the open
/// file limit and leave a lock pointing at the caller's namespace.
#[derive(Debug)]
pub struct Netns {
    fd: Option<std::sync::Arc<OwnedFd>>,
}

impl Netns {
    /// The namespace of the calling thread.
    pub fn current() -> Netns {
        Netns { fd: None }
    }
    /// The namespace a socket belongs to (`SIOCGSKNS`), or `current` when it
    /// is the same as the caller's.
    pub fn of_socket(sock: std::os::fd::BorrowedFd<'_>) -> Result<Netns, Error> {
        let ns = sys::socket_netns(sock)
            .map_err(|e| Error::kernel("read the socket's network namespace", e))?;
        let mine = tcpr_host::thread_netns().ok();
        let theirs = sys::fd_identity(ns.as_fd()).ok();
        if mine.is_some() && mine == theirs {
            return Ok(Netns::current());
        }
        Ok(Netns {
            fd: Some(std::sync::Arc::new(ns)),
        })
    }
    /// Device and inode of the namespace (`None`: the caller's own).
    pub(crate) fn identity(&self) -> Option<(u64, u64)> {
        self.fd
            .as_ref()
            .and_then(|f| sys::fd_identity(f.as_fd()).ok())
    }

    fn share(&self) -> Netns {
        Netns {
            fd: self.fd.clone(),
        }
    }
}

fn ruleset() -> String {
    // `flush chain` then `add rule` in the same transaction keeps this
    // idempotent without touching the set elements of other locks, and
    // replaces the rules of an older layout (no `unlocked` sets).
    let flow4 = "ipv4_addr . inet_service . ipv4_addr . inet_service";
    let flow6 = "ipv6_addr . inet_service . ipv6_addr . inet_service";
    let (pre4, out4) = (
        "ip saddr . tcp sport . ip daddr . tcp dport",
        "ip daddr . tcp dport . ip saddr . tcp sport",
    );
    let (pre6, out6) = (
        "ip6 saddr . tcp sport . ip6 daddr . tcp dport",
        "ip6 daddr . tcp dport . ip6 saddr . tcp sport",
    );
    format!(
        "add table inet {TABLE}
add set inet {TABLE} flows4 {{ type {flow4}; flags timeout; gc-interval {GC_INTERVAL_MS}ms; }}
add set inet {TABLE} flows6 {{ type {flow6}; flags timeout; gc-interval {GC_INTERVAL_MS}ms; }}
add set inet {TABLE} unlocked4 {{ type {flow4}; flags timeout; gc-interval {GC_INTERVAL_MS}ms; }}
add set inet {TABLE} unlocked6 {{ type {flow6}; flags timeout; gc-interval {GC_INTERVAL_MS}ms; }}
add chain inet {TABLE} pre {{ type filter hook prerouting priority -300; policy accept; }}
add chain inet {TABLE} out {{ type filter hook output priority -300; policy accept; }}
flush chain inet {TABLE} pre
flush chain inet {TABLE} out
add rule inet {TABLE} pre {pre4} @flows4 {pre4} != @unlocked4 drop
add rule inet {TABLE} pre {pre6} @flows6 {pre6} != @unlocked6 drop
add rule inet {TABLE} out {out4} @flows4 {out4} != @unlocked4 drop
add rule inet {TABLE} out {out6} @flows6 {out6} != @unlocked6 drop
"
    )
}

/// Runs an nft script in `ns`.
fn nft(ns: &Netns, script: &str) -> Result<(), Error> {
    let mut cmd = Command::new("nft");
    cmd.arg("-f")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(fd) = &ns.fd {
        sys::command_in_netns(&mut cmd, fd);
    }
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Lock("the `nft` command is not installed (Debian package nftables); it is needed to lock frozen flows".into())
        } else {
            Error::Lock(format!("cannot run nft: {e}"))
        }
    })?;
    let mut stdin = child.stdin.take().expect("piped");
    let write = stdin.write_all(script.as_bytes());
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Lock(format!("nft: {e}")))?;
    write.map_err(|e| Error::Lock(format!("writing to nft: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err
            .lines()
            .find(|l| l.starts_with("Error"))
            .unwrap_or(err.trim());
        if err.contains("Operation not permitted") {
            return Err(Error::Permission(
                "nftables refused to change the ruleset: CAP_NET_ADMIN is needed to lock flows"
                    .into(),
            ));
        }
        return Err(Error::Lock(format!("nft failed: {first}")));
    }
    Ok(())
}

/// Installs the lock's table in the caller's network namespace, if it is
/// not there yet, or upgrades a table of an older layout (no `unlocked`
/// sets; its rules are replaced). Optional: the first lock does it
/// otherwise, with one `nft` run (about 10 ms) in its critical path.
pub fn prepare() -> Result<(), Error> {
    let current = nfnl::Socket::open(None).and_then(|nl| {
        Ok(nl.table_exists(Family::Inet, TABLE)?
            && nl.set_exists(LockSet::V4.unlocked())?
            && nl.set_exists(LockSet::V6.unlocked())?)
    });
    if current.unwrap_or(false) {
        return Ok(());
    }
    nft(&Netns::current(), &ruleset())
}

/// A lock on one or many flows. Released on drop, unless [`FlowLock::keep`]
/// hands it to its lease.
#[must_use = "dropping a FlowLock releases it at once"]
#[derive(Debug)]
pub struct FlowLock {
    flows: Vec<Flow>,
    ns: Netns,
    released: bool,
}

impl FlowLock {
    /// Drops the packets of `flows` in `ns` until released or until `lease`
    /// passes.
    pub fn acquire(flows: &[Flow], ns: Netns, lease: Duration) -> Result<FlowLock, Error> {
        if !(MIN_LEASE..=MAX_LEASE).contains(&lease) {
            return Err(Error::LeaseOutOfRange {
                lease,
                max: MAX_LEASE,
            });
        }
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        // Fast path: the table is there, only elements change (no rule
        // churn), over netlink. Otherwise install the table, then add the
        // elements, with `nft`.
        let mut locked = fast(&ns, lock_batch(flows, lease_ms, mode::current()));
        if let Err(Failure::Unsupported(_)) = locked {
            // No DESTROYSETELEM: lock without it, as before the `unlocked` sets.
            mode::fall_back("it refuses DESTROYSETELEM (Linux 6.3+)");
            locked = fast(&ns, lock_batch(flows, lease_ms, Mode::Delete));
        }
        match locked {
            Ok(()) => {}
            Err(Failure::Failed(e @ Error::Permission(_))) => return Err(e),
            Err(first) => {
                // The table may be missing (or of an older layout): `nft`
                // installs it with the elements. Should it fail too, both
                // reasons are told.
                if let Err(e) = nft(&ns, &(ruleset() + &script(flows, lease_ms, false))) {
                    return Err(match e {
                        e @ Error::Permission(_) => e,
                        e => Error::Lock(format!("{}; then {e}", Error::from(first))),
                    });
                }
                // The table was there but refused the batch: a released
                // element may still shadow the lock.
                if mode::current() != Mode::Delete {
                    let mut batch = Batch::new();
                    for (set, elements) in by_set(flows) {
                        batch.elements(set.unlocked(), &elements, Op::Destroy);
                    }
                    fast(&ns, batch)?;
                }
            }
        }
        tracing::debug!(flows = flows.len(), lease_ms, "flows locked");
        Ok(FlowLock {
            flows: flows.to_vec(),
            ns,
            released: false,
        })
    }

    /// The locked flows.
    pub fn flows(&self) -> &[Flow] {
        &self.flows
    }

    /// Releases the lock now.
    pub fn release(mut self) -> Result<(), Error> {
        self.released = true;
        release_flows(&self.ns, &self.flows)
    }

    /// Releases many locks with one transaction per namespace; the flows'
    /// packets pass again when this returns.
    pub fn release_many(locks: Vec<FlowLock>) -> Result<(), Error> {
        Self::release_grouped(locks)
    }

    /// Releases many locks whose flows moved away: the same as
    /// [`FlowLock::release_many`] (a release takes effect when it returns).
    pub fn release_moved(locks: Vec<FlowLock>) -> Result<(), Error> {
        Self::release_grouped(locks)
    }

    fn release_grouped(locks: Vec<FlowLock>) -> Result<(), Error> {
        /// The flows of one network namespace.
        struct Group {
            identity: Option<(u64, u64)>,
            ns: Netns,
            flows: Vec<Flow>,
        }
        let mut groups: Vec<Group> = Vec::new();
        for mut l in locks {
            l.released = true;
            let identity = l.ns.identity();
            match groups.iter_mut().find(|g| g.identity == identity) {
                Some(g) => g.flows.append(&mut l.flows),
                None => groups.push(Group {
                    identity,
                    ns: l.ns.share(),
                    flows: std::mem::take(&mut l.flows),
                }),
            }
        }
        for g in groups {
            release_flows(&g.ns, &g.flows)?;
        }
        Ok(())
    }

    /// Splits the flows of `wanted` off this lock into one lock, in one
    /// pass (`None`: none of them is here).
    pub fn split_off_set(&mut self, wanted: &std::collections::HashSet<Flow>) -> Option<FlowLock> {
        let (out, keep): (Vec<Flow>, Vec<Flow>) =
            self.flows.iter().partition(|f| wanted.contains(f));
        if out.is_empty() {
            return None;
        }
        self.flows = keep;
        Some(FlowLock {
            flows: out,
            ns: self.ns.share(),
            released: false,
        })
    }

    /// One lock per flow, in the order of [`FlowLock::flows`]: a batch's
    /// lock given out per connection, without a search per flow.
    pub fn into_each(mut self) -> Vec<FlowLock> {
        self.released = true;
        std::mem::take(&mut self.flows)
            .into_iter()
            .map(|f| FlowLock {
                flows: vec![f],
                ns: self.ns.share(),
                released: false,
            })
            .collect()
    }

    /// Leaves the lock in place until its lease expires (the process may exit).
    pub fn keep(mut self) {
        self.released = true;
    }
}

impl Drop for FlowLock {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = release_flows(&self.ns, &self.flows) {
                tracing::warn!("releasing a flow lock failed (its lease will expire it): {e}");
            }
        }
    }
}

/// Releases `flows` in `ns`, locked or not: their packets pass when this
/// returns.
pub fn release_flows(ns: &Netns, flows: &[Flow]) -> Result<(), Error> {
    if flows.is_empty() {
        return Ok(());
    }
    if mode::current() == Mode::Delete {
        return delete(ns, flows);
    }
    let probe = mode::current() == Mode::Unknown;
    if probe {
        // The probe element must exist to show whether its expiry updates.
        if let Err(e) = fast(ns, mode::probe_setup()) {
            if let Failure::Failed(e @ Error::Permission(_)) = e {
                return Err(e);
            }
            prepare_in(ns)?;
            fast(ns, mode::probe_setup())?;
        }
    }
    let mut batch = Batch::new();
    // The probe destroys an element no release ever adds.
    batch.echo_removals();
    if probe {
        mode::probe(&mut batch);
    }
    shadow_release(&mut batch, flows);
    match fast(ns, batch) {
        Err(Failure::Failed(e @ Error::Permission(_))) => Err(e),
        Err(Failure::Unsupported(_)) => {
            mode::fall_back("it refuses DESTROYSETELEM (Linux 6.3+)");
            delete(ns, flows)
        }
        // An older table (no `unlocked` set) or none: delete, which works
        // with both; the next lock or `prepare` upgrades the table.
        Err(_) if probe => delete(ns, &[flows, &[mode::probe_flow()]].concat()),
        Err(_) => delete(ns, flows),
        Ok(()) if probe && !mode::confirm(ns) => delete(ns, flows),
        Ok(()) => Ok(()),
    }
}

/// Adds to `batch` the release of `flows` on a kernel that updates
/// expiries ([`Mode::Shadow`]): an `unlocked` element each, and their lock
/// elements expiring at once.
fn shadow_release(batch: &mut Batch, flows: &[Flow]) {
    let unlocked_for = unlocked_timeout(flows.len());
    for (set, elements) in by_set(flows) {
        let shadow = Op::AddExpiring {
            timeout: unlocked_for,
            expires_in: unlocked_for,
        };
        batch.elements(set.unlocked(), &elements, shadow);
        let expire = Op::AddExpiring {
            timeout: EXPIRED_TIMEOUT,
            expires_in: EXPIRED_EXPIRATION,
        };
        batch.elements(set.set_ref(), &elements, expire);
    }
}

/// Releases flows of one namespace, call after call: an agent releases
/// each flow of a batch right before its resume. The same as
/// [`release_flows`], whose transactions go through the sockets the lock
/// keeps per namespace (`kept`): a socket per release (open,
/// `NETLINK_CAP_ACK`, timeout, close) cost more than the release itself.
#[derive(Debug)]
pub struct Releaser {
    ns: Netns,
}

impl Releaser {
    /// A releaser for flows of `ns`.
    pub fn new(ns: Netns) -> Releaser {
        Releaser { ns }
    }

    /// The same as [`release_flows`] in this releaser's namespace.
    pub fn release(&mut self, flows: &[Flow]) -> Result<(), Error> {
        release_flows(&self.ns, flows)
    }
}

/// Installs the table in `ns`.
fn prepare_in(ns: &Netns) -> Result<(), Error> {
    nft(ns, &ruleset())
}

/// Removes `flows` from the lock sets of `ns`, present or not; their
/// packets pass when this returns, after an RCU grace period (the close of
/// the netlink socket waits for it).
fn delete(ns: &Netns, flows: &[Flow]) -> Result<(), Error> {
    // `add` then `delete` in one transaction: deleting an absent element
    // would fail the whole batch, and the element may have expired.
    let mut batch = Batch::new();
    for (set, elements) in by_set(flows) {
        batch.elements(set.set_ref(), &elements, add_op(READD_BEFORE_DELETE_MS));
        batch.elements(set.set_ref(), &elements, Op::Delete);
    }
    match fast(ns, batch) {
        Err(Failure::Failed(e @ Error::Permission(_))) => Err(e),
        // No table yet: install it, which makes the batch valid.
        Err(_) => nft(
            ns,
            &(ruleset() + &script(flows, READD_BEFORE_DELETE_MS, true)),
        ),
        Ok(()) => Ok(()),
    }
}

/// Flows of a lock transaction whose removals are echoed, at most: an
/// echo is about 100 bytes, a netlink socket's default receive buffer
/// 208 KiB.
const ECHO_MAX: usize = 512;

/// The transaction that locks `flows` for `lease_ms`: adds them to the
/// lock sets and, unless this kernel deletes, destroys their `unlocked`
/// elements (absent but for a release in the last [`UNLOCKED_TIMEOUT`]
/// or so).
fn lock_batch(flows: &[Flow], lease_ms: u64, mode: Mode) -> Batch {
    let mut batch = Batch::new();
    // Whether a destroy found its element tells whether this process
    // must close its sockets in a child (`kept`). The kernel writes the
    // echoes into the socket within the commit, before it is read: for a
    // large batch (a rollback relocked at once) they could overrun its
    // receive buffer and lose the acknowledgements, so it is not asked
    // and the removal assumed.
    if flows.len() <= ECHO_MAX {
        batch.echo_removals();
    }
    for (set, elements) in by_set(flows) {
        batch.elements(set.set_ref(), &elements, add_op(lease_ms));
        if mode != Mode::Delete {
            batch.elements(set.unlocked(), &elements, Op::Destroy);
        }
    }
    batch
}

/// The `nft` script that adds `flows` with a timeout of `timeout_ms` (and,
/// with `delete`, deletes them again in the same transaction): the slow
/// path, when the table must be installed first.
fn script(flows: &[Flow], timeout_ms: u64, delete: bool) -> String {
    let mut out = String::new();
    for f in flows {
        let (set, el) = (f.set().name(), f.element());
        let _ = writeln!(
            out,
            "add element inet {TABLE} {set} {{ {el} timeout {timeout_ms}ms }}"
        );
        if delete {
            let _ = writeln!(out, "delete element inet {TABLE} {set} {{ {el} }}");
        }
    }
    out
}

/// Adds elements that expire after `ms` milliseconds.
fn add_op(ms: u64) -> Op {
    let lease = Duration::from_millis(ms);
    Op::AddExpiring {
        timeout: lease,
        expires_in: lease,
    }
}

/// The elements of `flows`, by the lock set that sees their packets.
fn by_set(flows: &[Flow]) -> Vec<(LockSet, Vec<Element>)> {
    let (v4, v6): (Vec<&Flow>, Vec<&Flow>) = flows.iter().partition(|f| f.set() == LockSet::V4);
    [(LockSet::V4, v4), (LockSet::V6, v6)]
        .into_iter()
        .filter(|(_, group)| !group.is_empty())
        .map(|(set, group)| {
            let elements = group.into_iter().map(|f| Element::key(f.key())).collect();
            (set, elements)
        })
        .collect()
}

/// Why a netlink transaction of the lock failed.
#[derive(Debug)]
enum Failure {
    /// The kernel does not know a message (DESTROYSETELEM before Linux
    /// 6.3 answers EINVAL): its errno.
    Unsupported(i32),
    /// Anything else.
    Failed(Error),
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::Unsupported(errno) => Error::Lock(format!(
                "nf_tables refused the lock's elements: {}",
                std::io::Error::from_raw_os_error(errno)
            )),
            Failure::Failed(e) => e,
        }
    }
}

/// Commits an element batch over netlink in `ns`.
fn fast(ns: &Netns, batch: Batch) -> Result<(), Failure> {
    match kept::commit(ns, batch) {
        Ok(()) => Ok(()),
        Err(NlError::Refused(libc::EPERM)) => Err(Failure::Failed(Error::Permission(
            "nftables refused to change the ruleset: CAP_NET_ADMIN is needed to lock flows".into(),
        ))),
        Err(NlError::Refused(errno @ (libc::EINVAL | libc::EOPNOTSUPP))) => {
            Err(Failure::Unsupported(errno))
        }
        Err(NlError::Refused(errno)) => Err(Failure::Failed(Error::Lock(format!(
            "nf_tables refused the lock's elements: {}",
            std::io::Error::from_raw_os_error(errno)
        )))),
        Err(NlError::Io(e)) => Err(Failure::Failed(Error::Lock(format!(
            "nf_tables netlink: {e}"
        )))),
    }
}

/// How many flows are locked in the current namespace (for tests and
/// scripts), from `nft`'s JSON listing of the lock's table.
pub fn locked_flow_count() -> Result<usize, Error> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .output()
        .map_err(|e| Error::Lock(format!("cannot run nft: {e}")))?;
    if !out.status.success() {
        // No table: nothing locked.
        return Ok(0);
    }
    count_elements(&out.stdout)
}

/// The locked flows in `nft -j` output: `{"nftables": [..., {"set":
/// {"name": "flows4", "elem": [...]}}, ...]}`, less those also in the
/// family's `unlocked` set (released, their lock element expiring).
fn count_elements(json: &[u8]) -> Result<usize, Error> {
    let listing: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| Error::Lock(format!("nft printed JSON tcpr cannot read: {e}")))?;
    let objects = listing["nftables"]
        .as_array()
        .ok_or_else(|| Error::Lock("nft's JSON listing has no \"nftables\" array".into()))?;
    // An element is `{"elem": {"val": V, "timeout": ...}}` or plainly V.
    let values = |name: &str| -> Vec<&serde_json::Value> {
        objects
            .iter()
            .filter_map(|o| o.get("set"))
            .filter(|set| set["name"] == name)
            .filter_map(|set| set["elem"].as_array())
            .flatten()
            .map(|e| e.get("elem").and_then(|e| e.get("val")).unwrap_or(e))
            .collect()
    };
    // The probe of a process's first release (`mode`) is no lock.
    let probe = serde_json::json!({"concat": ["0.0.0.0", 0, "0.0.0.0", 0]});
    Ok([LockSet::V4, LockSet::V6]
        .iter()
        .map(|s| {
            let released = values(s.unlocked_name());
            values(s.name())
                .into_iter()
                .filter(|v| !released.contains(v) && **v != probe)
                .count()
        })
        .sum())
}

/// Whether `flow` is locked in `ns`: its element is in the lock's set and
/// not expired, and it is not released (one or two nf_tables netlink
/// requests).
pub fn is_locked(ns: &Netns, flow: &Flow) -> Result<bool, Error> {
    let nsfd = ns.fd.as_ref().map(|f| f.as_fd());
    nfnl::Socket::open(nsfd)
        .and_then(|nl| held(&nl, flow))
        .map_err(lookup_error)
}

/// Whether `flow` is locked, asked on `nl`.
fn held(nl: &nfnl::Socket, flow: &Flow) -> Result<bool, NlError> {
    let (set, key) = (flow.set(), flow.key());
    // A missing table or set answers "absent".
    Ok(nl.element(set.set_ref(), &key)?.is_some() && nl.element(set.unlocked(), &key)?.is_none())
}

fn lookup_error(e: NlError) -> Error {
    match e {
        NlError::Refused(libc::EPERM) => {
            Error::Permission("nftables refused to list the lock: CAP_NET_ADMIN is needed".into())
        }
        NlError::Refused(errno) => Error::Lock(format!(
            "nf_tables refused to look up a lock element: {}",
            std::io::Error::from_raw_os_error(errno)
        )),
        NlError::Io(e) => Error::Lock(format!("nf_tables netlink: {e}")),
    }
}

/// Releases this namespace's lock on `flow`, the flow of the socket `sock`,
/// if it holds one (the flow was dumped here), so that its packets reach
/// the restored socket at once. Returns whether there was one. Looks in the
/// socket's namespace, which need not be the calling thread's; when it is
/// (compared by namespace cookie: `netns_cookie` when the caller read it
/// already), this costs one netlink GET on a socket of the calling thread.
pub(crate) fn take_over(
    sock: BorrowedFd<'_>,
    flow: &Flow,
    netns_cookie: Option<u64>,
) -> Result<bool, Error> {
    // Errors of the lookup count as "not held": the lease ends it.
    let Some(theirs) = netns_cookie.or_else(|| sys::netns_cookie(sock).ok()) else {
        return Ok(false);
    };
    let here = KEPT_LOOKUP.with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.as_ref().map(|k| k.cookie) != Some(theirs) {
            // This thread's namespace now, or another one's socket.
            *kept = nfnl::Socket::open(None).ok().and_then(|socket| {
                let cookie = socket.netns_cookie().ok()?;
                Some(KeptLookup { socket, cookie })
            });
        }
        match kept.as_ref().filter(|k| k.cookie == theirs) {
            Some(k) => match held(&k.socket, flow) {
                Ok(held) => Some(held),
                Err(_) => {
                    // An answer may still be on its way: never reuse it.
                    *kept = None;
                    Some(false)
                }
            },
            None => None,
        }
    });
    let held_there = match here {
        Some(held) => held,
        None => {
            let ns = Netns::of_socket(sock)?;
            let nsfd = ns.fd.as_ref().map(|f| f.as_fd());
            let Ok(nl) = nfnl::Socket::open(nsfd) else {
                return Ok(false);
            };
            held(&nl, flow).unwrap_or(false)
        }
    };
    if !held_there {
        return Ok(false);
    }
    // The socket's namespace, which the thread may have left since its
    // kept socket opened.
    release_flows(&Netns::of_socket(sock)?, &[*flow])?;
    Ok(true)
}

/// A netlink socket kept by a thread for [`take_over`]'s lookups: a
/// restore of many connections asks once per connection, and a socket
/// per question cost five syscalls of eight. It answers for the namespace
/// it was opened in (a netlink socket stays in it), named by its cookie.
struct KeptLookup {
    socket: nfnl::Socket,
    cookie: u64,
}

thread_local! {
    static KEPT_LOOKUP: std::cell::RefCell<Option<KeptLookup>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
mod tests;
