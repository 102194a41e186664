//! The flow lock: drops a frozen flow's packets in both directions on the
//! source host, with a lease, so that it outlives the socket (a packet that
//! meets no socket would be answered with a RST) and never leaks.
//!
//! One nftables table, `inet tcpr`, holds two sets keyed by
//! `peer addr . peer port . local addr . local port` with per-element
//! timeouts (one set per wire family: a dual-stack socket's IPv4-mapped
//! flow goes into the IPv4 set, since its packets are IPv4), and two rules (prerouting and output, priority -300, before
//! conntrack) that drop matching packets. The table is created on first use
//! and is otherwise static: per-flow state lives only in the set elements,
//! which expire by themselves. The table is installed with the `nft`
//! command (libnftables' syntax is the documented interface for rules);
//! elements are added and deleted over nf_tables netlink
//! ([`tcpr_host::nfnl`]), one transaction per call, falling back to `nft`
//! when the table is missing.

use crate::sys;
use crate::Error;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;
use tcpr_host::nfnl::{self, Batch, Element, Family, NlError, Op, SetRef};

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

/// How long the first release in a process watches its element expire
/// before deciding that this kernel does not update expiries.
const EXPIRY_WATCH: Duration = Duration::from_millis(100);

/// How often that watch looks.
const EXPIRY_POLL: Duration = Duration::from_micros(500);

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

    /// The set in the lock's table.
    pub(crate) fn set_ref(self) -> SetRef<'static> {
        SetRef {
            family: Family::Inet,
            table: TABLE,
            set: self.name(),
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
/// open so that `nft` can be run inside it.
#[derive(Debug)]
pub struct Netns {
    fd: Option<OwnedFd>,
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
        let mine = sys::open_path("/proc/thread-self/ns/net")
            .and_then(|f| sys::fd_identity(f.as_fd()))
            .ok();
        let theirs = sys::fd_identity(ns.as_fd()).ok();
        if mine.is_some() && mine == theirs {
            return Ok(Netns::current());
        }
        Ok(Netns { fd: Some(ns) })
    }
    /// Device and inode of the namespace (`None`: the caller's own).
    pub(crate) fn identity(&self) -> Option<(u64, u64)> {
        self.fd
            .as_ref()
            .and_then(|f| sys::fd_identity(f.as_fd()).ok())
    }

    fn try_clone(&self) -> Netns {
        Netns {
            fd: self.fd.as_ref().and_then(|f| f.try_clone().ok()),
        }
    }
}

fn ruleset() -> String {
    // `flush chain` then `add rule` in the same transaction keeps this
    // idempotent without touching the set elements of other locks.
    format!(
        "add table inet {TABLE}
add set inet {TABLE} flows4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout; }}
add set inet {TABLE} flows6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; flags timeout; }}
add chain inet {TABLE} pre {{ type filter hook prerouting priority -300; policy accept; }}
add chain inet {TABLE} out {{ type filter hook output priority -300; policy accept; }}
flush chain inet {TABLE} pre
flush chain inet {TABLE} out
add rule inet {TABLE} pre ip saddr . tcp sport . ip daddr . tcp dport @flows4 drop
add rule inet {TABLE} pre ip6 saddr . tcp sport . ip6 daddr . tcp dport @flows6 drop
add rule inet {TABLE} out ip daddr . tcp dport . ip saddr . tcp sport @flows4 drop
add rule inet {TABLE} out ip6 daddr . tcp dport . ip6 saddr . tcp sport @flows6 drop
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
/// not there yet. Optional: the first lock does it otherwise, with one
/// `nft` run (about 10 ms) in its critical path.
pub fn prepare() -> Result<(), Error> {
    if nfnl::table_exists(None, Family::Inet, TABLE).unwrap_or(false) {
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
        // churn, whose commit waits for an RCU grace period), over netlink.
        // Otherwise install the table, then add the elements, with `nft`.
        let mut batch = Batch::new();
        for (set, keys) in by_set(flows) {
            batch.elements(set.set_ref(), &keys, add_op(lease_ms));
        }
        if let Err(first) = fast(&ns, batch) {
            if matches!(first, Error::Permission(_)) {
                return Err(first);
            }
            nft(&ns, &(ruleset() + &script(flows, lease_ms, false)))?;
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
        Self::release_grouped(locks, Effect::OnReturn)
    }

    /// Releases many locks that no longer matter promptly (their flows
    /// moved away): the elements expire within a few milliseconds after
    /// this returns, without waiting for it.
    pub fn release_moved(locks: Vec<FlowLock>) -> Result<(), Error> {
        Self::release_grouped(locks, Effect::Soon)
    }

    fn release_grouped(locks: Vec<FlowLock>, effect: Effect) -> Result<(), Error> {
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
                    ns: l.ns.try_clone(),
                    flows: std::mem::take(&mut l.flows),
                }),
            }
        }
        for g in groups {
            release(&g.ns, &g.flows, effect)?;
        }
        Ok(())
    }

    /// Splits one flow's lock off this one (for per-connection outcomes).
    pub fn split_off(&mut self, flow: &Flow) -> Option<FlowLock> {
        let i = self.flows.iter().position(|f| f == flow)?;
        let f = self.flows.swap_remove(i);
        Some(FlowLock {
            flows: vec![f],
            ns: self.ns.try_clone(),
            released: false,
        })
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

/// When a release must have taken effect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// When the call returns (a thawed flow must pass at once).
    OnReturn,
    /// Within a few milliseconds (the flow moved away).
    Soon,
}

/// Removes `flows` from the lock sets of `ns`, present or not; their
/// packets pass when this returns.
pub fn release_flows(ns: &Netns, flows: &[Flow]) -> Result<(), Error> {
    release(ns, flows, Effect::OnReturn)
}

fn release(ns: &Netns, flows: &[Flow], effect: Effect) -> Result<(), Error> {
    if flows.is_empty() {
        return Ok(());
    }
    // Fast path: expire the elements in place (in 1 ms, rounded up to the
    // next jiffies), which commits at once; a delete would wait for an RCU
    // grace period (10-30 ms). Kernels before 6.10 do not update an
    // existing element's expiry: the first release in a process watches
    // the element go, and if it stays every release deletes instead.
    static EXPIRY_UPDATES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if EXPIRY_UPDATES.get() != Some(&false) {
        let mut batch = Batch::new();
        for (set, keys) in by_set(flows) {
            let expire = Op::AddExpiring {
                timeout: EXPIRED_TIMEOUT,
                expires_in: EXPIRED_EXPIRATION,
            };
            batch.elements(set.set_ref(), &keys, expire);
        }
        match fast(ns, batch) {
            Err(e @ Error::Permission(_)) => return Err(e),
            Err(_) => {}
            Ok(()) if effect == Effect::Soon && EXPIRY_UPDATES.get() == Some(&true) => {
                return Ok(())
            }
            Ok(()) => {
                // All expire at the same jiffy: watch the first one go.
                let f = &flows[0];
                let nsfd = ns.fd.as_ref().map(|f| f.as_fd());
                let deadline = std::time::Instant::now() + EXPIRY_WATCH;
                loop {
                    match nfnl::element_present(nsfd, f.set().set_ref(), &f.key()) {
                        Ok(false) => {
                            let _ = EXPIRY_UPDATES.set(true);
                            return Ok(());
                        }
                        Ok(true) if std::time::Instant::now() < deadline => {
                            std::thread::sleep(EXPIRY_POLL);
                        }
                        Ok(true) => {
                            if EXPIRY_UPDATES.set(false).is_ok() {
                                tracing::warn!(
                                    "this kernel does not update a lock element's expiry \
                                     (Linux 6.10+ does): releases delete elements, which \
                                     waits for an RCU grace period"
                                );
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(
                                "cannot check a released lock element ({e:?}); deleting it"
                            );
                            break;
                        }
                    }
                }
            }
        }
    }
    // `add` then `delete` in one transaction: deleting an absent element
    // would fail the whole batch, and the element may have expired.
    let mut batch = Batch::new();
    for (set, keys) in by_set(flows) {
        batch.elements(set.set_ref(), &keys, add_op(READD_BEFORE_DELETE_MS));
        batch.elements(set.set_ref(), &keys, Op::Delete);
    }
    match fast(ns, batch) {
        Err(e @ Error::Permission(_)) => Err(e),
        // No table yet: install it, which makes the batch valid.
        Err(_) => nft(
            ns,
            &(ruleset() + &script(flows, READD_BEFORE_DELETE_MS, true)),
        ),
        Ok(()) => Ok(()),
    }
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

/// Commits an element batch over netlink in `ns`.
fn fast(ns: &Netns, batch: Batch) -> Result<(), Error> {
    match nfnl::commit(ns.fd.as_ref().map(|f| f.as_fd()), batch) {
        Ok(()) => Ok(()),
        Err(NlError::Refused(libc::EPERM)) => Err(Error::Permission(
            "nftables refused to change the ruleset: CAP_NET_ADMIN is needed to lock flows".into(),
        )),
        Err(NlError::Refused(errno)) => Err(Error::Lock(format!(
            "nf_tables refused the lock's elements: {}",
            std::io::Error::from_raw_os_error(errno)
        ))),
        Err(NlError::Io(e)) => Err(Error::Lock(format!("nf_tables netlink: {e}"))),
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

/// The elements of the lock's sets in `nft -j` output: `{"nftables": [...,
/// {"set": {"name": "flows4", "elem": [...]}}, ...]}`.
fn count_elements(json: &[u8]) -> Result<usize, Error> {
    let listing: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| Error::Lock(format!("nft printed JSON tcpr cannot read: {e}")))?;
    let objects = listing["nftables"]
        .as_array()
        .ok_or_else(|| Error::Lock("nft's JSON listing has no \"nftables\" array".into()))?;
    Ok(objects
        .iter()
        .filter_map(|o| o.get("set"))
        .filter(|set| {
            [LockSet::V4, LockSet::V6]
                .iter()
                .any(|s| set["name"] == s.name())
        })
        .filter_map(|set| set["elem"].as_array())
        .map(Vec::len)
        .sum())
}

/// Whether `flow` is locked in `ns`: its element is in the lock's set and
/// not expired (one nf_tables netlink request).
pub fn is_locked(ns: &Netns, flow: &Flow) -> Result<bool, Error> {
    let nsfd = ns.fd.as_ref().map(|f| f.as_fd());
    match nfnl::element_present(nsfd, flow.set().set_ref(), &flow.key()) {
        Ok(present) => Ok(present),
        Err(NlError::Refused(libc::EPERM)) => Err(Error::Permission(
            "nftables refused to list the lock: CAP_NET_ADMIN is needed".into(),
        )),
        Err(NlError::Refused(errno)) => Err(Error::Lock(format!(
            "nf_tables refused to look up a lock element: {}",
            std::io::Error::from_raw_os_error(errno)
        ))),
        Err(NlError::Io(e)) => Err(Error::Lock(format!("nf_tables netlink: {e}"))),
    }
}

#[cfg(test)]
mod tests;
