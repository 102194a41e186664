//! Which member of a pool a new connection goes to.
//!
//! - `hash`: weighted rendezvous hashing (highest random weight) on the
//!   client's IP address: each member scores the client with a hash of
//!   both, the best score wins. A client keeps its member while that member
//!   is usable; adding or removing one member moves only the clients that
//!   member wins or held (about its share of the weight), and a member that
//!   is not usable hands its clients to their second-best members, spread
//!   over all the others.
//! - `round-robin`: smooth weighted round-robin (each member gets its share
//!   of every `total weight` picks, interleaved, not in bursts).
//! - `least-conn`: the usable member with the fewest open connections per
//!   unit of weight (the caller counts with [`Pool::opened`] and
//!   [`Pool::closed`]); ties go round.
//!
//! A pool is shared by the listener threads: its state is atomics and a
//! mutex.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::config::{BalanceMethod, MemberConfig, PoolConfig};

/// A member's index in its pool (file order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberId(pub usize);

/// A pool ready to pick members.
#[derive(Debug)]
pub struct Pool {
    name: String,
    method: BalanceMethod,
    members: Vec<MemberConfig>,
    /// Each member's identity for hashing: from its addresses, not its
    /// place in the file, so a reordered file keeps clients where they are.
    hash_keys: Vec<u64>,
    /// Smooth weighted round-robin's current weights.
    round_robin: Mutex<Vec<i64>>,
    /// Open connections per member (least-conn).
    open: Vec<AtomicU64>,
    /// Where least-conn starts looking, so ties go round.
    next_start: AtomicUsize,
}

impl Pool {
    /// The pool of `config`.
    pub fn new(config: &PoolConfig) -> Pool {
        Pool {
            name: config.name.clone(),
            method: config.balance,
            members: config.members.clone(),
            hash_keys: config
                .members
                .iter()
                .map(|member| {
                    hash_bytes(format!("{:?}|{:?}", member.agent, member.server).as_bytes())
                })
                .collect(),
            round_robin: Mutex::new(vec![0; config.members.len()]),
            open: config.members.iter().map(|_| AtomicU64::new(0)).collect(),
            next_start: AtomicUsize::new(0),
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How it picks.
    pub fn method(&self) -> BalanceMethod {
        self.method
    }

    /// Its members with their ids, in file order.
    pub fn members(&self) -> impl Iterator<Item = (MemberId, &MemberConfig)> {
        self.members
            .iter()
            .enumerate()
            .map(|(index, member)| (MemberId(index), member))
    }

    /// The member `id`.
    ///
    /// # Panics
    /// When `id` is not one of this pool's (ids come from [`Pool::pick`] or
    /// [`Pool::members`] of the same pool).
    pub fn member(&self, id: MemberId) -> &MemberConfig {
        &self.members[id.0]
    }

    /// The member a new connection from `client` goes to, among those
    /// `usable` accepts (healthy, not draining, ...); `None` when none is.
    pub fn pick(&self, client: SocketAddr, usable: &dyn Fn(MemberId) -> bool) -> Option<MemberId> {
        match self.method {
            BalanceMethod::Hash => self.pick_hash(client.ip(), usable),
            BalanceMethod::RoundRobin => self.pick_round_robin(usable),
            BalanceMethod::LeastConn => self.pick_least_conn(usable),
        }
    }

    /// A connection to `id` opened (least-conn counts these).
    pub fn opened(&self, id: MemberId) {
        if let Some(open) = self.open.get(id.0) {
            open.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection to `id` closed (or was handed off and is no longer the
    /// balancer's to count, as the caller decides).
    pub fn closed(&self, id: MemberId) {
        if let Some(open) = self.open.get(id.0) {
            // Never below zero, even if a caller closes twice.
            let _ = open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |count| {
                count.checked_sub(1)
            });
        }
    }

    /// The connections open to `id`, as counted by `opened` and `closed`.
    pub fn active(&self, id: MemberId) -> u64 {
        self.open
            .get(id.0)
            .map_or(0, |open| open.load(Ordering::Relaxed))
    }

    fn usable_ids<'a>(
        &'a self,
        usable: &'a dyn Fn(MemberId) -> bool,
    ) -> impl Iterator<Item = MemberId> + 'a {
        (0..self.members.len())
            .map(MemberId)
            .filter(move |id| usable(*id))
    }

    fn pick_hash(&self, client: IpAddr, usable: &dyn Fn(MemberId) -> bool) -> Option<MemberId> {
        // A v4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
        let client_key = match client.to_canonical() {
            IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            IpAddr::V6(v6) => hash_bytes(&v6.octets()),
        };
        self.usable_ids(usable)
            .map(|id| {
                let score =
                    rendezvous_score(client_key, self.hash_keys[id.0], self.members[id.0].weight);
                (id, score)
            })
            .min_by(|(_, left), (_, right)| left.total_cmp(right))
            .map(|(id, _)| id)
    }

    fn pick_round_robin(&self, usable: &dyn Fn(MemberId) -> bool) -> Option<MemberId> {
        // A poisoned lock only means another thread panicked mid-pick: the
        // weights are still numbers, keep going.
        let mut current = self
            .round_robin
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut total: i64 = 0;
        let mut best: Option<MemberId> = None;
        for id in self.usable_ids(usable) {
            let weight = i64::from(self.members[id.0].weight);
            total += weight;
            current[id.0] += weight;
            if best.is_none_or(|best| current[id.0] > current[best.0]) {
                best = Some(id);
            }
        }
        let best = best?;
        current[best.0] -= total;
        Some(best)
    }

    fn pick_least_conn(&self, usable: &dyn Fn(MemberId) -> bool) -> Option<MemberId> {
        let count = self.members.len();
        if count == 0 {
            return None;
        }
        let start = self.next_start.fetch_add(1, Ordering::Relaxed) % count;
        let mut best: Option<(MemberId, u64)> = None;
        for id in (0..count).map(|step| MemberId((start + step) % count)) {
            if !usable(id) {
                continue;
            }
            let open = self.active(id);
            let fewer = best.is_none_or(|(best, best_open)| {
                // open / weight < best_open / best_weight, without division.
                u128::from(open) * u128::from(self.members[best.0].weight)
                    < u128::from(best_open) * u128::from(self.members[id.0].weight)
            });
            if fewer {
                best = Some((id, open));
            }
        }
        best.map(|(id, _)| id)
    }
}

/// Weighted rendezvous score of a member for a client: lowest wins. With
/// `u` uniform in (0, 1], `-ln(u) / weight` is exponentially distributed
/// with rate `weight`, so a member wins with probability weight / total.
fn rendezvous_score(client_key: u64, member_key: u64, weight: u32) -> f64 {
    const MANTISSA_BITS: u32 = 53;
    let hash = mix64(client_key ^ mix64(member_key));
    let unit = ((hash >> (64 - MANTISSA_BITS)) as f64 + 1.0) / (1u64 << MANTISSA_BITS) as f64;
    -unit.ln() / f64::from(weight)
}

/// FNV-1a: a stable hash of bytes (stable across builds and releases,
/// unlike `std`'s `DefaultHasher`, so a restarted balancer keeps clients
/// on their members).
fn hash_bytes(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

/// The SplitMix64 finalizer: spreads every input bit over the output.
fn mix64(mut value: u64) -> u64 {
    value ^= value >> 30;
    value = value.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value ^= value >> 27;
    value = value.wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}
