//! The nf_tables datapath: a netdev-family table on the front's interface,
//! whose ingress chain forwards a steered flow's packets to its backend
//! with `fwd ip to ... device` (neighbour output: the packet leaves
//! unchanged but for its Ethernet header, before the front's IP stack
//! sees it).
//!
//! ```text
//! table netdev TABLE
//!   map flows4/6   client addr . client port . vip addr . vip port
//!                    → backend id (a mark)      flags dynamic,timeout; size CAP
//!   set closing4/6 same key                       timeout LINGER; size CAP
//!   map backends4/6  backend id → backend address (one per backend)
//!   set owner        interface . token of each datapath running on it
//!   set iface        the interface it steers on
//!   chain ingress (hook ingress device DEV priority -500):
//!     tcp: meta mark set KEY map @flows  goto steered    (one hash lookup)
//!   chain steered:
//!     SYN without ACK: goto forget (delete KEY from @closing and @flows;
//!                                   the front's stack takes the packet)
//!     KEY @closing: goto closed
//!     FIN or RST: update @flows { KEY timeout LINGER }; add @closing { KEY }; fwd
//!     otherwise:  update @flows { KEY timeout IDLE }; fwd
//!   chain closed (a flow the client ended, or half-closed):
//!     update @flows { KEY timeout LINGER }; update @closing { KEY timeout LINGER }
//!     fwd to meta mark map @backends
//!   (the flow's expiry is written first, so that its closing mark never
//!   expires before it: a packet in between would renew it to IDLE)
//! ```
//!
//! Per packet: one flag test, two or three hash lookups and one or two
//! expiry writes, O(1). An
//! entry is one NEWSETELEM element over nf_tables netlink
//! ([`tcpr_host::nfnl`]), with the idle timeout as its expiry; a handoff
//! batch's entries go in one transaction ([`Steering::steer_batch`]); the
//! packet path renews it, cuts it to the linger at the client's FIN or RST
//! (the `closing` set keeps the flow's later packets from renewing it to
//! the idle timeout again), and the kernel's set garbage collector removes
//! it. A closing flow's packets renew it to the linger: a client that
//! half-closed (its FIN sent, the server still sending) ACKs what it
//! receives for as long as the server sends, and keeps its entry; once it
//! is silent the entry goes a linger later. A client's SYN that matches an entry reuses the
//! tuple of a flow that ended (its entry still lingering): it removes the
//! entry and reaches the front's stack, which accepts the new flow. The
//! map's `size` is the cap: an add beyond it is
//! refused (ENFILE), which [`Steering::steer`] reports as
//! [`SteerError::Full`].
//!
//! Restarts. The table is the kernel's, not the process's: a balancer
//! stopped or killed leaves it forwarding the flows it steered (each
//! entry still expires by itself), and the next datapath on the interface
//! (its `iface`) takes it over in one transaction that keeps the maps and
//! sets with their elements and replaces every rule (then the IPv6
//! updates of `rule.rs`, a second transaction, tried three times: in
//! between, a packet of an IPv6 flow is forwarded without renewing its
//! entry, and an IPv6 SYN on a reused tuple does not clear it). It reads
//! the backends' ids back, so that the entries it adds and those it took
//! over agree. The `owner` set names every datapath running on the table
//! (a token); one that closes removes its own, and deletes the table only
//! when no other live one is named and, keeping its flows, none is
//! steered. A datapath holds an abstract unix socket named by its token
//! for its life: the name is scoped by the network namespace (as the
//! table) and released when its process ends however it ends, so a token
//! whose name can be bound is a dead one's (a pid would be another pid
//! namespace's, or reused). Installs, closes and removals take the table's
//! lock, another abstract name, so that a close deciding to delete never
//! crosses an install that joins. A table that cannot be
//! read whole fails the start (replaced on a misread, it would end every
//! flow it steers); one of another interface with a live owner is refused;
//! one of another interface or an older layout with none is replaced, its
//! flows counted as lost.
//!
//! The backend id goes through `meta mark` because a dynamic update must
//! write a value to a map's element and nf_tables takes it from a register:
//! the id the lookup put in the mark is written back unchanged (an update
//! changes only the expiry of an element that exists). The mark of a
//! forwarded packet does not leave the host.

use crate::common::{
    check_timeouts, invalid, ip_bytes, lock, on_wire, plain_ifname, Netns, WireFlow,
};
use crate::{rule, CarriedOver, SteerError, SteeredFlow, Steering};
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tcpr_host::nfnl::{self, Batch, Element, Family, Op, SetRef};

/// The datapath's settings.
#[derive(Debug, Clone)]
pub struct NftConfig {
    /// The front's interface: the VIP's packets arrive on it, and steered
    /// ones leave by it to their backend on the same link.
    pub device: String,
    /// The nf_tables table (netdev family) this datapath owns; one that
    /// exists already (left by a crashed balancer) is replaced.
    pub table: String,
    /// The most flows steered at once, per address family.
    pub capacity: usize,
    /// An entry whose flow sends nothing for this long goes. A live
    /// connection idle for longer would lose its steering (its next packet
    /// reaches the front's stack, which resets it): keep it above the
    /// longest idle time of the served protocol.
    pub idle: Duration,
    /// How long an entry stays after the last packet of a flow whose
    /// client sent its FIN or RST: for the flow's last ACKs and
    /// retransmissions, and the silences of a half-closed client still
    /// receiving.
    pub linger: Duration,
}

/// The table's default name.
pub const DEFAULT_TABLE: &str = "tcpr_steer";

/// What [`remove_table_if_unused`] left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftTable {
    /// The flows it steers.
    pub flows: usize,
    /// A balancer still runs on it.
    pub in_use: bool,
}

/// Deletes the netdev table `table` of the calling thread's namespace (a
/// datapath's that another datapath replaced) unless a balancer still
/// runs on it or it still steers flows: they live on through it until
/// they end. What it left (`None`: deleted, or there was none).
pub fn remove_table_if_unused(table: &str) -> Result<Option<LeftTable>, SteerError> {
    let _changing = lock_table(table);
    if !nfnl::table_exists(None, Family::Netdev, table).map_err(nl_error)? {
        return Ok(None);
    }
    let flows = table_flows(None, table)?;
    let in_use = absent_is_empty(rule::elements(None, table, "owner"))?
        .iter()
        .filter_map(|(key, _)| Owner::from_key(key))
        .any(|o| owner_alive(table, o.token));
    if flows > 0 || in_use {
        return Ok(Some(LeftTable { flows, in_use }));
    }
    let out = Command::new("nft")
        .args(["delete", "table", "netdev", table])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(nft_missing)?;
    if !out.status.success() {
        return Err(SteerError::Kernel(std::io::Error::other(format!(
            "nft delete table netdev {table}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    Ok(None)
}

/// The flows steered in `table` (both families; a map that is absent, in
/// an older layout or a table of the same name not ours, counts none).
fn table_flows(ns: Option<std::os::fd::BorrowedFd<'_>>, table: &str) -> Result<usize, SteerError> {
    let mut flows = 0;
    for set in ["flows4", "flows6"] {
        flows += match rule::count(ns, table, set) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => 0,
            Err(e) => return Err(SteerError::Kernel(e)),
        };
    }
    Ok(flows)
}

/// A set's elements as [`rule::elements`] reads them, none when the set
/// is absent (an older layout).
fn absent_is_empty(
    read: std::io::Result<Vec<rule::DumpedElement>>,
) -> Result<Vec<rule::DumpedElement>, SteerError> {
    match read {
        Ok(v) => Ok(v),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
        Err(e) => Err(SteerError::Kernel(e)),
    }
}

/// A failure to run `nft`: its absence said as such.
fn nft_missing(e: std::io::Error) -> SteerError {
    if e.kind() == std::io::ErrorKind::NotFound {
        invalid("the `nft` command is not installed (Debian package nftables)")
    } else {
        SteerError::Kernel(e)
    }
}

fn nl_error(e: nfnl::NlError) -> SteerError {
    match e {
        nfnl::NlError::Refused(errno) => {
            SteerError::Kernel(std::io::Error::from_raw_os_error(errno))
        }
        nfnl::NlError::Io(e) => SteerError::Kernel(e),
    }
}

/// Default cap per address family: ~105 bytes of kernel memory an entry
/// (~27 MB full); at 14,000 new connections a second and the default
/// linger about 70,000 are in use.
pub const DEFAULT_CAPACITY: usize = 1 << 18;
/// Default idle timeout: an hour (HTTP keep-alive and most idle TCP
/// sessions end well before).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(3600);
/// Default linger after the client's FIN or RST: a few retransmission
/// timeouts.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(5);
/// The ingress priority: before anything else of the host sees the packet.
const INGRESS_PRIORITY: i32 = -500;

impl NftConfig {
    /// Defaults for `device`: table `tcpr_steer`, [`DEFAULT_CAPACITY`],
    /// [`DEFAULT_IDLE`], [`DEFAULT_LINGER`].
    pub fn new(device: &str) -> NftConfig {
        NftConfig {
            device: device.into(),
            table: DEFAULT_TABLE.into(),
            capacity: DEFAULT_CAPACITY,
            idle: DEFAULT_IDLE,
            linger: DEFAULT_LINGER,
        }
    }

    fn check(&self) -> Result<(), String> {
        if !plain_ifname(&self.device) {
            return Err(format!("bad interface name {:?}", self.device));
        }
        if self.table.is_empty()
            || !self
                .table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(format!(
                "bad table name {:?} (letters, digits, _)",
                self.table
            ));
        }
        if self.capacity == 0 || self.capacity > u32::MAX as usize {
            return Err(format!("capacity {} out of range", self.capacity));
        }
        check_timeouts(self.idle, self.linger)
    }

    /// The table, sets and rules, in `nft` syntax, in one transaction,
    /// `owner` (this datapath's element) added to the owner set.
    /// `Install::Replace` deletes a table of the same name first;
    /// `Install::Keep` keeps its maps and sets with their elements (the
    /// flows steered, their backends, the closing ones, the owners but the
    /// `dead` ones), declares them again (a kernel that updates sets, as
    /// 6.18 here does, takes a new size and timeouts; one that does not
    /// refuses the transaction, and the start fails saying so), and
    /// replaces every rule: packets see the old rules or the new, never
    /// neither.
    fn ruleset(&self, install: Install, owner: &str, dead: &[String]) -> String {
        let table = &self.table;
        let mut s = String::new();
        if install == Install::Replace {
            s += &format!("table netdev {table} {{}}\ndelete table netdev {table}\n");
        }
        s += &self.declarations();
        if install == Install::Keep {
            for chain in CHAINS {
                s += &format!("flush chain netdev {table} {chain}\n");
            }
            for d in dead {
                s += &format!("delete element netdev {table} owner {{ {d} }}\n");
            }
        }
        s += &self.rules();
        s += &format!("add element netdev {table} owner {{ {owner} }}\n");
        s += &format!(
            "add element netdev {table} iface {{ \"{}\" }}\n",
            self.device
        );
        s
    }

    /// The table's maps, sets and chains, without rules (`nft` adds what
    /// is missing and updates what is there).
    fn declarations(&self) -> String {
        let NftConfig {
            device,
            table,
            capacity,
            ..
        } = self;
        let linger = self.linger.as_millis();
        let mut s = format!("table netdev {table} {{\n");
        // IPv4: the 4-tuple as a concatenation. IPv6: nft 1.0.6 cannot
        // write a dynamic update of a map whose key is a concatenation
        // longer than 16 bytes (it aborts in netlink_linearize), so the
        // key is one raw load of 36 bytes: source and destination address
        // (bytes 8-39 of the IPv6 header) and the two ports (the first 4
        // bytes after it: TCP right after the fixed header, which the
        // ingress rule checks with `ip6 nexthdr tcp`).
        for (v, key_type, mark_type, addr) in [
            (
                "4",
                "type ipv4_addr . inet_service . ipv4_addr . inet_service",
                "mark",
                "ipv4_addr",
            ),
            ("6", "typeof @nh,64,288", "meta mark", "ipv6_addr"),
        ] {
            s += &format!(
                "  map flows{v} {{ {key_type} : {mark_type}; flags dynamic,timeout; size {capacity}; }}
  set closing{v} {{ {key_type}; flags dynamic,timeout; timeout {linger}ms; size {capacity}; }}
  map backends{v} {{ type mark : {addr}; }}
"
            );
        }
        // Who installed the table: its interface and a token of the
        // datapath (see `NftSteering::owner`).
        s += "  set owner { type ifname . mark; }\n  set iface { type ifname; }\n";
        for chain in CHAINS.iter().filter(|c| **c != "ingress") {
            s += &format!("  chain {chain} {{\n  }}\n");
        }
        s += &format!(
            "  chain ingress {{
    type filter hook ingress device \"{device}\" priority {INGRESS_PRIORITY}; policy accept;
  }}
}}
"
        );
        s
    }

    /// The rules of every chain but the IPv6 flow map's updates
    /// (`rule.rs`), added to the declared chains.
    fn rules(&self) -> String {
        let NftConfig { device, table, .. } = self;
        let (idle, linger) = (self.idle.as_millis(), self.linger.as_millis());
        let mut s = format!("table netdev {table} {{\n");
        for (v, key, proto) in [
            ("4", "ip saddr . tcp sport . ip daddr . tcp dport", "ip"),
            ("6", "@nh,64,288", "ip6"),
        ] {
            let fwd = format!("fwd {proto} to meta mark map @backends{v} device \"{device}\"");
            // The renewals and the delete of the flow map's entry: inline
            // for IPv4; for IPv6 in chains of their own, whose one rule
            // `rule.rs` writes (see there why). The delete of `forget6` is
            // appended after the closing one written here.
            let (linger_update, idle_update, forget_flow) = if v == "4" {
                (
                    format!("update @flows4 {{ {key} timeout {linger}ms : meta mark }}"),
                    format!("update @flows4 {{ {key} timeout {idle}ms : meta mark }}"),
                    format!("\n    delete @flows4 {{ {key} : meta mark }}"),
                )
            } else {
                (
                    "jump linger6".to_string(),
                    "jump renew6".to_string(),
                    String::new(),
                )
            };
            // A SYN (without ACK) opens a new flow: one whose tuple matches
            // an entry reuses the tuple of a flow that ended (a client
            // without TIME_WAIT, because the server closed first, may do so
            // at once). Forwarded, it would meet the backend, which has no
            // listener on the VIP (or a TIME_WAIT of the old flow): a RST.
            // It removes the stale entry, so that neither it nor the new
            // flow's later packets are steered, and goes to the front's
            // stack (the end of a chain reached by goto: the base chain's
            // policy, accept).
            s += &format!(
                "  chain forget{v} {{
    delete @closing{v} {{ {key} }}{forget_flow}
  }}
  chain closed{v} {{
    {linger_update}
    update @closing{v} {{ {key} timeout {linger}ms }}
    {fwd}
  }}
  chain steered{v} {{
    tcp flags & (syn | ack) == syn goto forget{v}
    {key} @closing{v} goto closed{v}
    tcp flags & (fin | rst) != 0 {linger_update}
    tcp flags & (fin | rst) != 0 add @closing{v} {{ {key} }}
    tcp flags & (fin | rst) != 0 {fwd}
    {idle_update}
    {fwd}
  }}
"
            );
        }
        s += "  chain ingress {
    meta protocol ip meta l4proto tcp meta mark set ip saddr . tcp sport . ip daddr . tcp dport map @flows4 goto steered4
    meta protocol ip6 ip6 nexthdr tcp meta mark set @nh,64,288 map @flows6 goto steered6
  }
}
";
        s
    }
}

/// How [`NftConfig::ruleset`] treats a table of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Install {
    /// Deletes it, with every entry.
    Replace,
    /// Keeps its maps and sets, replacing its rules (a takeover).
    Keep,
}

/// The table's chains (the base chain last).
const CHAINS: [&str; 9] = [
    "linger6", "renew6", "forget4", "closed4", "steered4", "forget6", "closed6", "steered6",
    "ingress",
];

/// The nf_tables steering datapath of one interface (see the module doc).
///
/// The table is not the process's: it outlives it (a balancer killed or
/// stopped leaves it forwarding the flows it steered, whose entries expire
/// by themselves), and the next datapath installed on the same interface
/// takes it over with every entry ([`NftSteering::carried_over`]). One
/// closed while another runs on the table leaves it to that one. Dropped
/// without [`Steering::close`] (a balancer that failed after its install,
/// or any early exit), it leaves the table as a kill would: with the flows
/// steered, its own and those of a balancer it took over from that may
/// still be running.
#[derive(Debug)]
pub struct NftSteering {
    cfg: NftConfig,
    /// The network namespace it was installed in (the creating thread's):
    /// entries go there whichever thread steers.
    netns: Netns,
    /// The backends installed in the `backends` maps, with their ids.
    backends: Mutex<Backends>,
    /// The netlink socket entries change over, opened in `netns` on first
    /// use and kept: a socket per batch cost a socket, a namespace check
    /// and a close each time (a close that, after a transaction removed a
    /// present element, waits for an RCU grace period).
    nl: Mutex<Option<nfnl::Socket>>,
    /// This datapath's token in the `owner` set.
    token: u32,
    /// Bound to the token's abstract name while the datapath lives (see
    /// `owner_alive`).
    _alive: Option<std::os::unix::net::UnixDatagram>,
    /// What it took over at its install.
    carried: CarriedOver,
    /// Closed: a second close does nothing.
    closed: AtomicBool,
}

/// Backend address → its id (the map value), as installed in the
/// `backends` maps; ids are shared by both families.
#[derive(Debug, Default)]
struct Backends {
    ids: HashMap<IpAddr, u32>,
    /// The next id to give.
    next: u32,
}

impl Backends {
    fn with(ids: HashMap<IpAddr, u32>) -> Backends {
        let next = ids.values().max().map_or(1, |m| m.saturating_add(1));
        Backends { ids, next }
    }
}

/// The IPv4 or IPv6 sets of the table.
struct Sets<'a> {
    flows: SetRef<'a>,
    closing: SetRef<'a>,
    backends: SetRef<'a>,
}

impl NftSteering {
    /// Installs the table on `cfg.device` in the calling thread's network
    /// namespace (one `nft` run and one netlink transaction). A table of
    /// the same name that a datapath on the same interface left (a
    /// balancer stopped, killed, or still running) is taken over with its
    /// entries; any other (another interface, an older layout, or one
    /// `nft` cannot update in place) is replaced, its flows counted as
    /// lost.
    pub fn install(cfg: NftConfig) -> Result<NftSteering, SteerError> {
        cfg.check().map_err(|e| invalid(&e))?;
        let netns = Netns::here()?;
        let mut s = NftSteering {
            cfg,
            netns,
            backends: Mutex::new(Backends::with(HashMap::new())),
            nl: Mutex::new(None),
            token: 0,
            _alive: None,
            carried: CarriedOver::default(),
            closed: AtomicBool::new(false),
        };
        let _changing = lock_table(&s.cfg.table);
        (s.token, s._alive) = own_token(&s.cfg.table);
        let owner = s.owner_element();
        // Read whole, or the start fails: a table misread as absent or
        // foreign would be replaced, ending every flow it steers.
        let before = s.previous()?;
        let keep = match &before {
            Some(p) if p.device.as_deref() == Some(s.cfg.device.as_str()) => true,
            Some(p) => {
                if let Some(o) = p.owners.iter().find(|o| owner_alive(&s.cfg.table, o.token)) {
                    return Err(invalid(&format!(
                        "the steering table netdev {} is in use by a balancer on {}: one \
                         table per network namespace",
                        s.cfg.table, o.device
                    )));
                }
                false
            }
            None => false,
        };
        let dead: Vec<String> = before
            .iter()
            .flat_map(|p| p.owners.iter())
            .filter(|o| !owner_alive(&s.cfg.table, o.token))
            .map(Owner::element)
            .collect();
        if keep {
            s.nft(&s.cfg.ruleset(Install::Keep, &owner, &dead))
                .map_err(|e| {
                    invalid(&format!(
                        "cannot take over the steering table netdev {} in place ({e}); a \
                         kernel that cannot change a set's size or timeouts refuses a new \
                         --steer-capacity or --steer-linger: start with the running ones, or \
                         stop every balancer and `nft delete table netdev {}`",
                        s.cfg.table, s.cfg.table
                    ))
                })?;
        } else {
            s.nft(&s.cfg.ruleset(Install::Replace, &owner, &[]))?;
        }
        if let Err(e) = s.append_rules6() {
            // A new table is removed (it steers nothing). A kept one is
            // left with its flows and its other owners, but without the
            // IPv6 renewals this transaction flushed: its IPv6 flows then
            // expire at the idle timeout, however busy, until a start
            // succeeds. The start fails, saying so.
            if keep {
                let _ = s.nft(&format!(
                    "delete element netdev {} owner {{ {owner} }}\n",
                    s.cfg.table
                ));
            } else {
                let _ = s.nft(&format!("delete table netdev {}\n", s.cfg.table));
            }
            s.closed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        if keep {
            *lock(&s.backends) = Backends::with(s.read_backends()?);
            s.carried = CarriedOver {
                carried: s.active()?,
                // Those that expired meanwhile are not lost.
                lost: 0,
            };
        } else {
            s.carried.lost = before.map_or(0, |p| p.flows);
        }
        Ok(s)
    }

    /// The IPv6 flow map's updates (`rule.rs`), tried three times: a
    /// table without them does not renew its IPv6 entries.
    fn append_rules6(&self) -> Result<(), SteerError> {
        let flow_rule = |chain, op| rule::FlowRule {
            table: &self.cfg.table,
            chain,
            set: "flows6",
            op,
        };
        let rules6 = [
            flow_rule(
                "linger6",
                rule::FlowOp::Renew {
                    timeout: self.cfg.linger,
                },
            ),
            flow_rule(
                "renew6",
                rule::FlowOp::Renew {
                    timeout: self.cfg.idle,
                },
            ),
            flow_rule("forget6", rule::FlowOp::Delete),
        ];
        let mut tried = 0;
        loop {
            match rule::append(self.netns.ns(), &rules6) {
                Ok(()) => return Ok(()),
                Err(e) if tried == 2 => return Err(SteerError::Kernel(e)),
                Err(_) => {
                    tried += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// What it took over from the datapath before it on the interface:
    /// every flow steered in the table it kept, or those of a table it
    /// had to replace, as lost.
    pub fn carried_over(&self) -> CarriedOver {
        self.carried
    }

    /// The table already there, read whole (an error when it cannot be):
    /// its owners (none for a table of an older layout) and its flows.
    fn previous(&self) -> Result<Option<Previous>, SteerError> {
        let table = &self.cfg.table;
        let ns = self.netns.ns();
        if !nfnl::table_exists(ns, Family::Netdev, table).map_err(nl_error)? {
            return Ok(None);
        }
        let flows = table_flows(ns, table)?;
        let owners = absent_is_empty(rule::elements(ns, table, "owner"))?
            .into_iter()
            .filter_map(|(key, _)| Owner::from_key(&key))
            .collect();
        let device = absent_is_empty(rule::elements(ns, table, "iface"))?
            .into_iter()
            .find_map(|(key, _)| ifname(&key));
        Ok(Some(Previous {
            device,
            owners,
            flows,
        }))
    }

    /// The `owner` set's element for this datapath, in `nft` syntax.
    fn owner_element(&self) -> String {
        Owner {
            device: self.cfg.device.clone(),
            token: self.token,
        }
        .element()
    }

    /// [`Steering::close`], in the table's namespace.
    fn close_here(&self, keep_flows: bool) -> Option<usize> {
        let table = &self.cfg.table;
        let _changing = lock_table(table);
        let Some(others) = self.other_owners() else {
            // Gone (deleted by someone), or unreadable: nothing to remove.
            return None;
        };
        let _ = self.nft(&format!(
            "delete element netdev {table} owner {{ {} }}\n",
            self.owner_element()
        ));
        if others > 0 {
            // Another balancer runs on it: what this one steered stays in
            // the table it runs.
            return Some(self.active().unwrap_or(usize::MAX));
        }
        if keep_flows {
            match self.active() {
                Ok(0) => {}
                Ok(n) => return Some(n),
                Err(_) => return Some(usize::MAX),
            }
        }
        if let Err(e) = self.nft(&format!("delete table netdev {table}\n")) {
            eprintln!("tcpr-steer: cannot delete the table netdev {table}: {e}");
        }
        None
    }

    /// The other live datapaths named in the `owner` set (`None`: no table,
    /// or no answer).
    fn other_owners(&self) -> Option<usize> {
        let owners = rule::elements(self.netns.ns(), &self.cfg.table, "owner").ok()?;
        Some(
            owners
                .iter()
                .filter_map(|(key, _)| Owner::from_key(key))
                .filter(|o| o.token != self.token && owner_alive(&self.cfg.table, o.token))
                .count(),
        )
    }

    /// The backends the table's `backends` maps hold, with their ids.
    fn read_backends(&self) -> Result<HashMap<IpAddr, u32>, SteerError> {
        let mut ids = HashMap::new();
        for set in ["backends4", "backends6"] {
            for (key, value) in rule::elements(self.netns.ns(), &self.cfg.table, set)? {
                let (Ok(id), Some(addr)) = (<[u8; 4]>::try_from(&key[..]), value) else {
                    continue;
                };
                let ip = match addr.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(&addr[..]).expect("4 bytes")),
                    16 => IpAddr::from(<[u8; 16]>::try_from(&addr[..]).expect("16 bytes")),
                    _ => continue,
                };
                ids.insert(ip, u32::from_ne_bytes(id));
            }
        }
        Ok(ids)
    }

    /// Whether the flow from `client` to `vip` is steered now (its entry
    /// is present and not expired).
    pub fn is_steered(&self, client: SocketAddr, vip: SocketAddr) -> Result<bool, SteerError> {
        let Some((client, vip, v4)) = on_wire(client, vip) else {
            return Ok(false);
        };
        nfnl::element_present(self.netns.ns(), self.sets(v4).flows, &flow_key(client, vip))
            .map_err(|e| self.refused(e))
    }

    /// The settings it runs with.
    pub fn config(&self) -> &NftConfig {
        &self.cfg
    }

    fn sets(&self, v4: bool) -> Sets<'_> {
        let set = |name: &'static str| SetRef {
            family: Family::Netdev,
            table: &self.cfg.table,
            set: name,
        };
        if v4 {
            Sets {
                flows: set("flows4"),
                closing: set("closing4"),
                backends: set("backends4"),
            }
        } else {
            Sets {
                flows: set("flows6"),
                closing: set("closing6"),
                backends: set("backends6"),
            }
        }
    }

    /// Runs an `nft` script in the datapath's namespace.
    fn nft(&self, script: &str) -> Result<(), SteerError> {
        self.netns.within(|| {
            let mut child = Command::new("nft")
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(nft_missing)?;
            let mut stdin = child.stdin.take().expect("piped");
            let written = stdin.write_all(script.as_bytes());
            drop(stdin);
            let out = child.wait_with_output()?;
            if !out.status.success() {
                return Err(SteerError::Kernel(std::io::Error::other(format!(
                    "nft: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))));
            }
            written.map_err(SteerError::Kernel)
        })
    }

    /// Adds `backend` to the backends map in `batch`, under a new id.
    fn install_backend(&self, backend: IpAddr, id: u32, batch: &mut Batch) {
        let sets = self.sets(backend.is_ipv4());
        batch.elements(
            sets.backends,
            &[Element {
                key: id.to_ne_bytes().to_vec(),
                data: Some(ip_bytes(backend)),
            }],
            Op::Add,
        );
    }

    /// Commits `batch` on the kept socket. After a failure the socket is
    /// closed: answers of the failed exchange may still be queued on it,
    /// and their sequence numbers would be taken for the next batch's. A
    /// batch the kernel answered EBUSY (a map's hash table being rehashed)
    /// is sent again on a new socket ([`nfnl::retry_busy`]).
    fn commit(&self, batch: Batch) -> Result<(), SteerError> {
        let mut nl = lock(&self.nl);
        let batch = batch.seal();
        nfnl::retry_busy(|| {
            let socket = match nl.take() {
                Some(s) => s,
                // Opened here when this thread is in the namespace: entering
                // it (setns) needs CAP_SYS_ADMIN.
                None => nfnl::Socket::open(self.netns.ns())?,
            };
            socket.commit_sealed(&batch)?;
            *nl = Some(socket);
            Ok(())
        })
        .map_err(|e| self.refused(e))
    }

    fn refused(&self, e: nfnl::NlError) -> SteerError {
        match e {
            nfnl::NlError::Refused(ENFILE) => SteerError::Full {
                capacity: self.cfg.capacity,
            },
            e => nl_error(e),
        }
    }

    /// Live flows in one family's map.
    fn count(&self, set: &str) -> Result<usize, SteerError> {
        rule::count(self.netns.ns(), &self.cfg.table, set).map_err(SteerError::Kernel)
    }
}

/// The errno nf_tables answers an add to a full set with (`size`).
const ENFILE: i32 = 23;

/// The key of a flow, as the rules load it from a client's packet. IPv4:
/// `client addr . client port . vip addr . vip port`, as nf_tables
/// registers hold a concatenation (each part in network order, padded to
/// 4 bytes). IPv6: the 36 bytes from the source address on (client
/// address, VIP address, client port, VIP port, unpadded).
fn flow_key(client: SocketAddr, vip: SocketAddr) -> Vec<u8> {
    let mut key = Vec::with_capacity(40);
    if client.is_ipv4() {
        for a in [client, vip] {
            key.extend_from_slice(&ip_bytes(a.ip()));
            key.extend_from_slice(&a.port().to_be_bytes());
            key.extend_from_slice(&[0, 0]);
        }
    } else {
        key.extend_from_slice(&ip_bytes(client.ip()));
        key.extend_from_slice(&ip_bytes(vip.ip()));
        key.extend_from_slice(&client.port().to_be_bytes());
        key.extend_from_slice(&vip.port().to_be_bytes());
    }
    key
}

impl Steering for NftSteering {
    /// One nf_tables transaction for the whole batch: it commits or fails
    /// as a whole (a full map refuses it all), so no flow of a refused
    /// batch is left steered.
    fn steer_batch(&self, flows: &[SteeredFlow]) -> Result<(), SteerError> {
        // Every flow is checked before anything changes.
        let wire = flows
            .iter()
            .map(WireFlow::check)
            .collect::<Result<Vec<WireFlow>, SteerError>>()?;
        if wire.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::new();
        // A new backend's id is taken and installed under the lock, held
        // until the transaction commits, so two batches to two new
        // backends cannot share one.
        let mut known = lock(&self.backends);
        let mut added: Vec<(IpAddr, u32)> = Vec::new();
        let mut ids = Vec::with_capacity(wire.len());
        for w in &wire {
            let id = match known.ids.get(&w.backend).copied().or_else(|| {
                added
                    .iter()
                    .find(|(b, _)| *b == w.backend)
                    .map(|(_, id)| *id)
            }) {
                Some(id) => id,
                None => {
                    w.check_on_link(&self.netns, &self.cfg.device)?;
                    let id = known.next;
                    known.next = id
                        .checked_add(1)
                        .ok_or_else(|| invalid("too many backends"))?;
                    self.install_backend(w.backend, id, &mut batch);
                    added.push((w.backend, id));
                    id
                }
            };
            ids.push(id);
        }
        let mut known = (!added.is_empty()).then_some(known);
        for v4 in [true, false] {
            let (keys, entries): (Vec<Element>, Vec<Element>) = wire
                .iter()
                .zip(&ids)
                .filter(|(w, _)| w.v4 == v4)
                .map(|(w, id)| {
                    let key = flow_key(w.client, w.vip);
                    (
                        Element::key(key.clone()),
                        Element {
                            key,
                            data: Some(id.to_ne_bytes().to_vec()),
                        },
                    )
                })
                .unzip();
            if keys.is_empty() {
                continue;
            }
            let sets = self.sets(v4);
            // A tuple reused within the linger of its previous flow must
            // not start out closing.
            batch.elements(sets.closing, &keys, Op::Destroy);
            batch.elements(
                sets.flows,
                &entries,
                Op::AddExpiring {
                    timeout: self.cfg.idle,
                    expires_in: self.cfg.idle,
                },
            );
        }
        let committed = self.commit(batch);
        if let Some(known) = known.as_mut() {
            match committed {
                Ok(()) => known.ids.extend(added),
                // A datapath sharing the table (the one before it still
                // running, or one that took it over) may have given one of
                // these ids to another backend (the add of an id present
                // with another address fails): the next batch reads them
                // again.
                Err(_) => {
                    if let Ok(ids) = self.read_backends() {
                        let next = known.next;
                        **known = Backends::with(ids);
                        known.next = known.next.max(next);
                    }
                }
            }
        }
        committed
    }

    /// Nothing to do: the new connection's SYN removed the entry (the
    /// packet path cannot compare sequence numbers; see the module doc).
    fn forget_reused(&self, _client: SocketAddr, _vip: SocketAddr) -> Result<(), SteerError> {
        Ok(())
    }

    /// One transaction for the whole batch.
    fn unsteer_batch(&self, flows: &[SteeredFlow]) -> Result<(), SteerError> {
        let mut batch = Batch::new();
        for v4 in [true, false] {
            let keys: Vec<Element> = flows
                .iter()
                .filter_map(|f| on_wire(f.client, f.vip))
                .filter(|(_, _, is_v4)| *is_v4 == v4)
                .map(|(client, vip, _)| Element::key(flow_key(client, vip)))
                .collect();
            if keys.is_empty() {
                continue;
            }
            let sets = self.sets(v4);
            batch.elements(sets.flows, &keys, Op::Destroy);
            batch.elements(sets.closing, &keys, Op::Destroy);
        }
        self.commit(batch)
    }

    fn active(&self) -> Result<usize, SteerError> {
        Ok(self.count("flows4")? + self.count("flows6")?)
    }

    fn capacity(&self) -> usize {
        self.cfg.capacity
    }

    fn name(&self) -> &'static str {
        "nftables-netdev"
    }

    /// Leaves the table to a datapath that took it over, and with
    /// `keep_flows` to the kernel while flows are steered (their entries
    /// expire by themselves; the next datapath on the interface takes them
    /// over); otherwise deletes it.
    fn close(&self, keep_flows: bool) -> Option<usize> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return None;
        }
        // In the table's namespace: the lock and the owners' names are
        // its abstract sockets.
        self.netns
            .within(|| Ok(self.close_here(keep_flows)))
            .unwrap_or(None)
    }
}

/// The table as a datapath found it at its install.
struct Previous {
    /// Its interface (its `iface` set; `None`: an older layout).
    device: Option<String>,
    /// The datapaths named in its `owner` set, live or killed.
    owners: Vec<Owner>,
    /// Its steered flows.
    flows: usize,
}

/// One element of the `owner` set: a datapath that installed the table
/// and has not closed (or was killed): its interface and its token.
struct Owner {
    device: String,
    token: u32,
}

impl Owner {
    /// From a key (`ifname . mark`, the mark in host order).
    fn from_key(key: &[u8]) -> Option<Owner> {
        let device = ifname(key)?;
        let token = u32::from_ne_bytes(key.get(IFNAMSIZ..IFNAMSIZ + 4)?.try_into().ok()?);
        Some(Owner { device, token })
    }

    /// In `nft` syntax.
    fn element(&self) -> String {
        format!("\"{}\" . {:#x}", self.device, self.token)
    }
}

/// `IFNAMSIZ`: an `ifname` key's bytes.
const IFNAMSIZ: usize = 16;

/// The interface name at the start of a key (`ifname`, zero-padded).
fn ifname(key: &[u8]) -> Option<String> {
    let name = key.get(..IFNAMSIZ)?;
    let end = name.iter().position(|b| *b == 0).unwrap_or(IFNAMSIZ);
    String::from_utf8(name[..end].to_vec()).ok()
}

/// The abstract unix socket name (scoped by the network namespace, gone
/// with the process that bound it) of the table's `what`: its lock, or one
/// of its owners.
fn abstract_name(table: &str, what: &str) -> String {
    format!("tcpr-steer/{table}/{what}")
}

/// Binds the abstract name in the calling thread's namespace; `None` when
/// another socket holds it.
fn bind_abstract(name: &str) -> std::io::Result<Option<std::os::unix::net::UnixDatagram>> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    match std::os::unix::net::UnixDatagram::bind_addr(&addr) {
        Ok(sock) => Ok(Some(sock)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the datapath with `token` still runs on `table` in the calling
/// thread's namespace: its owner name is bound (a process's sockets go
/// with it, killed or not; a pid would be another pid namespace's, or
/// reused). A doubt counts as alive: nothing is removed on a doubt.
fn owner_alive(table: &str, token: u32) -> bool {
    !matches!(
        bind_abstract(&abstract_name(table, &format!("owner-{token:08x}"))),
        Ok(Some(_))
    )
}

/// A token no live datapath of the namespace has, with the socket that
/// holds its name for this datapath's life (`None`: the name could not be
/// bound; then the token is still most likely unique).
fn own_token(table: &str) -> (u32, Option<std::os::unix::net::UnixDatagram>) {
    static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut token = std::process::id().rotate_left(13) ^ nanos;
    for _ in 0..64 {
        token = token.wrapping_add(
            COUNT
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9e37_79b9)
                | 1,
        );
        match bind_abstract(&abstract_name(table, &format!("owner-{token:08x}"))) {
            Ok(Some(sock)) => return (token, Some(sock)),
            Ok(None) => continue,
            Err(_) => return (token, None),
        }
    }
    (token, None)
}

/// How long a datapath waits for the table's lock before it goes on
/// without it (a holder stuck that long is broken).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Takes the table's lock in the calling thread's namespace (an abstract
/// socket name: scoped by the namespace, released when its holder ends),
/// under which datapaths install, close and remove the table, so that a
/// close that decides to delete never crosses an install that joins.
/// Released when the socket is dropped; `None` when it could not be taken
/// (said).
fn lock_table(table: &str) -> Option<std::os::unix::net::UnixDatagram> {
    let start = std::time::Instant::now();
    loop {
        match bind_abstract(&abstract_name(table, "lock")) {
            Ok(Some(sock)) => return Some(sock),
            Ok(None) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(None) => {
                eprintln!(
                    "tcpr-steer: the lock of the steering table {table} was held for \
                     {LOCK_WAIT:?}: going on without it"
                );
                return None;
            }
            Err(e) => {
                eprintln!("tcpr-steer: cannot lock the steering table {table} ({e})");
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_register_layout() {
        let k = flow_key(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.100:80".parse().unwrap(),
        );
        assert_eq!(
            k,
            [10, 0, 0, 1, 0x9c, 0x40, 0, 0, 10, 0, 0, 100, 0, 80, 0, 0].to_vec()
        );
        let k = flow_key(
            "[fd00::1]:1".parse().unwrap(),
            "[fd00::100]:80".parse().unwrap(),
        );
        assert_eq!(k.len(), 36);
    }

    #[test]
    fn mapped_flows_are_ipv4_and_mixed_ones_refused() {
        let (c, v, v4) = on_wire(
            "[::ffff:10.0.0.1]:5".parse().unwrap(),
            "10.0.0.100:80".parse().unwrap(),
        )
        .unwrap();
        assert!(v4 && c.is_ipv4() && v.is_ipv4());
        assert!(on_wire(
            "10.0.0.1:5".parse().unwrap(),
            "[fd00::1]:80".parse().unwrap()
        )
        .is_none());
    }

    #[test]
    fn bad_settings_are_refused() {
        let mut c = NftConfig::new("eth0");
        assert!(c.check().is_ok());
        c.table = "a b".into();
        assert!(c.check().is_err());
        let mut c = NftConfig::new("eth0\"; flush ruleset");
        assert!(c.check().is_err());
        c = NftConfig::new("eth0");
        c.capacity = 0;
        assert!(c.check().is_err());
        c = NftConfig::new("eth0");
        c.linger = Duration::ZERO;
        assert!(c.check().is_err());
    }
}
