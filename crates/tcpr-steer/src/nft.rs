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
//! The backend id goes through `meta mark` because a dynamic update must
//! write a value to a map's element and nf_tables takes it from a register:
//! the id the lookup put in the mark is written back unchanged (an update
//! changes only the expiry of an element that exists). The mark of a
//! forwarded packet does not leave the host.

use crate::common::{
    check_timeouts, invalid, ip_bytes, lock, on_wire, plain_ifname, Netns, WireFlow,
};
use crate::{rule, SteerError, SteeredFlow, Steering};
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
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

/// Deletes the netdev table `table` of the calling thread's namespace, if
/// there is one (left by a balancer that crashed); whether there was.
pub fn remove_table(table: &str) -> Result<bool, SteerError> {
    let run = |args: &[&str]| {
        Command::new("nft")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
    };
    let listed = match run(&["list", "table", "netdev", table]) {
        Ok(out) => out.status.success(),
        // No nft: no table of it either.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(SteerError::Kernel(e)),
    };
    if !listed {
        return Ok(false);
    }
    let out = run(&["delete", "table", "netdev", table])?;
    if !out.status.success() {
        return Err(SteerError::Kernel(std::io::Error::other(format!(
            "nft delete table netdev {table}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    Ok(true)
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

    /// The table, sets and rules, in `nft` syntax: replaces a table of the
    /// same name in one transaction.
    fn ruleset(&self) -> String {
        let NftConfig {
            device,
            table,
            capacity,
            ..
        } = self;
        let (idle, linger) = (self.idle.as_millis(), self.linger.as_millis());
        let mut s = format!(
            "table netdev {table} {{}}\ndelete table netdev {table}\ntable netdev {table} {{\n"
        );
        // IPv4: the 4-tuple as a concatenation. IPv6: nft 1.0.6 cannot
        // write a dynamic update of a map whose key is a concatenation
        // longer than 16 bytes (it aborts in netlink_linearize), so the
        // key is one raw load of 36 bytes: source and destination address
        // (bytes 8-39 of the IPv6 header) and the two ports (the first 4
        // bytes after it: TCP right after the fixed header, which the
        // ingress rule checks with `ip6 nexthdr tcp`).
        for (v, key_type, mark_type, key, proto) in [
            (
                "4",
                "type ipv4_addr . inet_service . ipv4_addr . inet_service",
                "mark",
                "ip saddr . tcp sport . ip daddr . tcp dport",
                "ip",
            ),
            ("6", "typeof @nh,64,288", "meta mark", "@nh,64,288", "ip6"),
        ] {
            let fwd = format!("fwd {proto} to meta mark map @backends{v} device \"{device}\"");
            let addr = if v == "4" { "ipv4_addr" } else { "ipv6_addr" };
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
            s += &format!(
                "  map flows{v} {{ {key_type} : {mark_type}; flags dynamic,timeout; size {capacity}; }}
  set closing{v} {{ {key_type}; flags dynamic,timeout; timeout {linger}ms; size {capacity}; }}
  map backends{v} {{ type mark : {addr}; }}
"
            );
            if v == "6" {
                s += "  chain linger6 {\n  }\n  chain renew6 {\n  }\n";
            }
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
        s += &format!(
            "  chain ingress {{
    type filter hook ingress device \"{device}\" priority {INGRESS_PRIORITY}; policy accept;
    meta protocol ip meta l4proto tcp meta mark set ip saddr . tcp sport . ip daddr . tcp dport map @flows4 goto steered4
    meta protocol ip6 ip6 nexthdr tcp meta mark set @nh,64,288 map @flows6 goto steered6
  }}
}}
"
        );
        s
    }
}

/// The nf_tables steering datapath of one interface (see the module doc).
/// Dropping it deletes its table, and with it every entry.
#[derive(Debug)]
pub struct NftSteering {
    cfg: NftConfig,
    /// The network namespace it was installed in (the creating thread's):
    /// entries go there whichever thread steers.
    netns: Netns,
    /// Backend address → its id (the map value), installed in `backends`.
    backends: Mutex<HashMap<IpAddr, u32>>,
    /// The netlink socket entries change over, opened in `netns` on first
    /// use and kept: a socket per batch cost a socket, a namespace check
    /// and a close each time (a close that, after a transaction removed a
    /// present element, waits for an RCU grace period).
    nl: Mutex<Option<nfnl::Socket>>,
}

/// The IPv4 or IPv6 sets of the table.
struct Sets<'a> {
    flows: SetRef<'a>,
    closing: SetRef<'a>,
    backends: SetRef<'a>,
}

impl NftSteering {
    /// Installs the table on `cfg.device` in the calling thread's network
    /// namespace (one `nft` run).
    pub fn install(cfg: NftConfig) -> Result<NftSteering, SteerError> {
        cfg.check().map_err(|e| invalid(&e))?;
        let netns = Netns::here()?;
        let s = NftSteering {
            cfg,
            netns,
            backends: Mutex::new(HashMap::new()),
            nl: Mutex::new(None),
        };
        s.nft(&s.cfg.ruleset())?;
        let flow_rule = |chain, op| rule::FlowRule {
            table: &s.cfg.table,
            chain,
            set: "flows6",
            op,
        };
        let rules6 = [
            flow_rule(
                "linger6",
                rule::FlowOp::Renew {
                    timeout: s.cfg.linger,
                },
            ),
            flow_rule(
                "renew6",
                rule::FlowOp::Renew {
                    timeout: s.cfg.idle,
                },
            ),
            flow_rule("forget6", rule::FlowOp::Delete),
        ];
        // Dropping `s` on error deletes the table.
        rule::append(s.netns.ns(), &rules6)?;
        Ok(s)
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
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        invalid("the `nft` command is not installed (Debian package nftables)")
                    } else {
                        SteerError::Kernel(e)
                    }
                })?;
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
            nfnl::NlError::Refused(errno) => {
                SteerError::Kernel(std::io::Error::from_raw_os_error(errno))
            }
            nfnl::NlError::Io(e) => SteerError::Kernel(e),
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
        let known = lock(&self.backends);
        let mut added: Vec<(IpAddr, u32)> = Vec::new();
        let mut ids = Vec::with_capacity(wire.len());
        for w in &wire {
            let id = match known.get(&w.backend).copied().or_else(|| {
                added
                    .iter()
                    .find(|(b, _)| *b == w.backend)
                    .map(|(_, id)| *id)
            }) {
                Some(id) => id,
                None => {
                    w.check_on_link(&self.netns, &self.cfg.device)?;
                    let id = u32::try_from(known.len() + added.len() + 1)
                        .map_err(|_| invalid("too many backends"))?;
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
        self.commit(batch)?;
        if let Some(known) = known.as_mut() {
            known.extend(added);
        }
        Ok(())
    }

    fn unsteer(&self, client: SocketAddr, vip: SocketAddr) -> Result<(), SteerError> {
        self.unsteer_batch(&[SteeredFlow {
            client,
            vip,
            backend: vip.ip(),
        }])
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
}

impl Drop for NftSteering {
    fn drop(&mut self) {
        let table = self.cfg.table.clone();
        if let Err(e) = self.nft(&format!("delete table netdev {table}\n")) {
            eprintln!("tcpr-steer: cannot delete the table netdev {table}: {e}");
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
