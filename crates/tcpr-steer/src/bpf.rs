//! The BPF datapath: a tc ingress program on the front's interface
//! (`bpf/steer.bpf.c`, attached first with tcx, Linux 6.6+) looks each TCP
//! packet's flow up in a
//! preallocated BPF hash map and sends a steered one to its backend with
//! `bpf_redirect_neigh` (neighbour output: the packet leaves unchanged but
//! for its Ethernet header, before the front's IP stack sees it, as the
//! nf_tables datapath's `fwd`).
//!
//! ```text
//! map flows (hash, preallocated, max_entries = capacity, both families)
//!   key:   family . client addr . VIP addr . client port . VIP port (40 bytes)
//!   value: last packet (bpf_ktime_get_ns; 0 until the first sweep)
//!          . backend address . ifindex . family . closing
//!          . the client's next sequence number and furthest
//!          acknowledgement . a new flow's SYN's sequence and time
//!          (48 bytes)
//! program steer (tc ingress), per packet:
//!   not TCP over IPv4/IPv6, or no entry: on (TC_ACT_UNSPEC: the
//!                    interface's other tc programs, then the stack)
//!   in the sequence space of a new flow's SYN (256 KiB, 10 s): the
//!                    stack takes it
//!   SYN without ACK: closing: delete the entry (a new flow reusing an
//!                    ended flow's tuple); live: note it (it may be
//!                    forged: see ARCHITECTURE.md); the stack takes it
//!   the client's (acknowledgement near the furthest): the sequence
//!                    moves on; FIN or RST near it: closing = 1
//!   last packet = now; bpf_redirect_neigh(backend)
//! program sweep (run by the balancer with BPF_PROG_TEST_RUN):
//!   for each entry: gone once its flow has been silent for the linger
//!   (closing) or the idle timeout (otherwise); returns how many are left
//! ```
//!
//! Why BPF over nf_tables for the balancer: an nf_tables set with
//! timeouts is an rhashtable, which the kernel grows and shrinks as flows
//! come and go (its resizes took 5-27% of the machine in bursts under
//! `bench-balance`), and each entry is a netlink transaction. A
//! preallocated BPF hash map never resizes and never allocates on insert;
//! an entry is one `bpf(BPF_MAP_UPDATE_ELEM)` (about a microsecond). The
//! expiry the kernel did for nf_tables, the sweep does: every
//! [`sweep_period`], in the kernel (`bpf_for_each_map_elem`), one syscall
//! for the whole map (about 0.1 µs per entry: ~26 ms for a full map at the
//! default capacity). A new entry's time starts at its first sweep, on the
//! kernel's clock: userspace's differs in a time namespace.
//!
//! The tcx link is pinned in a BPF file system (`pin.rs`); its program
//! holds the flows map. A process that ends without removing the pin
//! (killed, crashed, failed after its install, or [`Steering::close`]d
//! keeping its flows) leaves its program steering the flows it handed
//! off, whose connections live on at the backends, unswept. The next
//! datapath on the interface attaches its program before the old one,
//! copies the entries of the old program's map into its own, replaces the
//! pin and closes the old link, which detaches the old program once no
//! process holds it: no packet meets neither. A datapath that closes after
//! another took over hands its entries to that one's map first. Only
//! `close(false)` (or a close with nothing steered) removes the pin. Where
//! nothing can be pinned (no BPF file system) the datapath is the
//! process's alone, as before, and says so. Without tcx (before Linux 6.6)
//! it refuses to install: a `cls_bpf` filter cannot be handed over this
//! way (the nf_tables datapath runs there). The map's capacity counts
//! both families together.

use crate::common::{check_timeouts, invalid, lock, on_wire, plain_ifname, Netns, WireFlow};
use crate::pin::Pins;
use crate::{SteerError, SteeredFlow, Steering};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifier, TcAttachOptions, TcAttachType};
use aya::programs::{LinkOrder, ProgramFd};
use aya::{Ebpf, EbpfLoader};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The compiled programs and maps (build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.bpf.o"));

/// `struct flow_key` of steer.bpf.c.
type Key = [u8; 40];
/// `struct flow_value` of steer.bpf.c.
type Value = [u8; 48];
/// `struct flow_value` before the sequence numbers (tcpr 0.1 to this
/// change): its entries are its first 32 bytes, the rest zero (sequence
/// unknown, learnt from the flow's next packet).
type OldValue = [u8; 32];
/// `flow_value.flags`: `next_seq` holds the client's sequence.
const SEQ_KNOWN: u8 = 1;
/// `flow_value.flags`: `last_ack` holds the client's acknowledgement.
const ACK_KNOWN: u8 = 4;

/// The packet `sweep` is run on: the kernel wants at least an Ethernet
/// header; the program does not read it.
const SWEEP_PACKET: [u8; 64] = [0; 64];

/// The datapath's settings.
#[derive(Debug, Clone)]
pub struct BpfConfig {
    /// The front's interface: the VIP's packets arrive on it, and steered
    /// ones leave by it to their backend on the same link.
    pub device: String,
    /// The most flows steered at once, both families together.
    pub capacity: usize,
    /// An entry whose flow sends nothing for this long goes (see
    /// [`crate::nft::NftConfig::idle`]).
    pub idle: Duration,
    /// How long an entry stays after the last packet of a flow whose
    /// client sent its FIN or RST.
    pub linger: Duration,
    /// Where the link and its flows map are pinned (see `pin.rs`): a
    /// directory on a BPF file system, created if need be.
    pub pin_dir: std::path::PathBuf,
}

impl BpfConfig {
    /// Defaults for `device`: the nf_tables datapath's capacity, idle
    /// timeout and linger.
    pub fn new(device: &str) -> BpfConfig {
        BpfConfig {
            device: device.into(),
            capacity: crate::nft::DEFAULT_CAPACITY,
            idle: crate::nft::DEFAULT_IDLE,
            linger: crate::nft::DEFAULT_LINGER,
            pin_dir: crate::pin::DEFAULT_PIN_DIR.into(),
        }
    }

    /// Whether the settings are in range (what `install` checks first).
    pub fn check(&self) -> Result<(), String> {
        if !plain_ifname(&self.device) {
            return Err(format!("bad interface name {:?}", self.device));
        }
        if self.capacity == 0 || self.capacity > MAX_CAPACITY {
            return Err(format!(
                "capacity {} out of range (1 to {MAX_CAPACITY})",
                self.capacity
            ));
        }
        check_timeouts(self.idle, self.linger)
    }
}

/// The largest map: every entry is allocated at load (~136 bytes each with
/// the kernel's element header: 280 MB), and a sweep of it full takes
/// about 0.2 s.
const MAX_CAPACITY: usize = 1 << 21;
/// The sweep runs at most this often: each is a walk of the whole map.
const MIN_SWEEP_PERIOD: Duration = Duration::from_millis(100);
/// The sweep runs at least once a second.
const MAX_SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// How often the sweep runs: a quarter of the shorter timeout, between
/// 100 ms and a second. An entry outlives its expiry by up to a period,
/// and a new entry's time starts at the first sweep after its insert: up
/// to two periods in all.
pub fn sweep_period(idle: Duration, linger: Duration) -> Duration {
    (idle.min(linger) / 4).clamp(MIN_SWEEP_PERIOD, MAX_SWEEP_PERIOD)
}

/// The BPF steering datapath of one interface (see the module doc).
/// `close(false)` detaches the program and frees the map, and with it
/// every entry; `close(true)`, or a drop without a close, leaves the
/// entries steered to the next datapath on the interface, where pinned.
pub struct BpfSteering {
    cfg: BpfConfig,
    netns: Netns,
    ifindex: u32,
    flows: Arc<Mutex<BpfHashMap<MapData, Key, Value>>>,
    /// The datapath of the older layout this one took over from, held (its
    /// program stays attached) so that what it steers after the takeover
    /// is copied here at every sweep: its own hand-back cannot write into
    /// this layout's map (see [`Older`]).
    older: Arc<Mutex<Option<Older>>>,
    /// Backends found on the interface's link (checked once each).
    on_link: Mutex<HashSet<IpAddr>>,
    sweep: Arc<Sweep>,
    /// Dropped to stop the sweeper.
    stop: Mutex<Option<mpsc::Sender<()>>>,
    sweeper: Mutex<Option<JoinHandle<()>>>,
    /// The steering program's tcx link: it detaches once this is gone and,
    /// when pinned, its pin too.
    link: Mutex<Option<HeldLink>>,
    /// Where the link is pinned, and its id; `None` when it could not be.
    pinned: Option<(Pins, u32)>,
    /// The entries carried over from the datapath before (see the module
    /// doc).
    carried: CarriedOver,
    /// The programs (the steering one attached through `link`).
    _ebpf: Ebpf,
}

/// A tcx link held by the datapath (only ever dropped).
#[allow(dead_code)]
enum HeldLink {
    /// Pinned: the pin keeps it attached; this is a descriptor of it.
    Pinned(PinnedLink),
    /// Not pinned: attached while this is open.
    Own(FdLink),
}

/// The sweep program, and what its last run found.
struct Sweep {
    prog: ProgramFd,
    /// Held for a run: one sweep at a time (two at once would walk the map
    /// twice for nothing).
    running: Mutex<()>,
    /// When the last run ended, and the entries it left.
    last: Mutex<Option<(std::time::Instant, usize)>>,
}

impl Sweep {
    fn run(&self) -> std::io::Result<usize> {
        let _one = lock(&self.running);
        self.run_alone()
    }

    fn run_alone(&self) -> std::io::Result<usize> {
        let live = tcpr_host::bpf::test_run(self.prog.as_fd(), &SWEEP_PACKET)? as usize;
        *lock(&self.last) = Some((std::time::Instant::now(), live));
        Ok(live)
    }

    /// The entries left by a run that ended less than `fresh` ago, or by
    /// one run now (after any run in progress, whose count may do).
    fn recent(&self, fresh: Duration) -> std::io::Result<usize> {
        let within = |last: Option<(std::time::Instant, usize)>| {
            last.filter(|(at, _)| at.elapsed() < fresh).map(|(_, n)| n)
        };
        // Each read of `last` in a statement of its own: a guard made in a
        // `match` (or `if let`) scrutinee lives through its arms, and
        // `run_alone` takes the lock again: a scrape that found the last
        // sweep stale deadlocked itself, holding `running`, and the
        // sweeper, waiting for it, swept no more.
        let last = *lock(&self.last);
        if let Some(n) = within(last) {
            return Ok(n);
        }
        let _one = lock(&self.running);
        let last = *lock(&self.last);
        match within(last) {
            Some(n) => Ok(n),
            None => self.run_alone(),
        }
    }
}

impl std::fmt::Debug for BpfSteering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfSteering")
            .field("cfg", &self.cfg)
            .field("ifindex", &self.ifindex)
            .finish_non_exhaustive()
    }
}

/// An error of aya's with the causes it carries (its messages leave the
/// kernel's errno to `source()`).
fn kernel(what: &str, e: impl std::error::Error) -> SteerError {
    let mut text = format!("{what}: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        // aya's wrappers repeat their inner error's message.
        if !text.ends_with(&c_text) {
            text += &format!(": {c_text}");
        }
        cause = c.source();
    }
    SteerError::Kernel(std::io::Error::other(text))
}

/// [`kernel`] for a refusal of the load or the attach: with what to try.
fn refused(what: &str, e: impl std::error::Error) -> SteerError {
    kernel(&format!("{what} ({LOAD_HINT})"), e)
}

/// What to try when loading fails.
const LOAD_HINT: &str = "the BPF datapath needs Linux 6.6 or later and CAP_BPF with CAP_NET_ADMIN (or CAP_SYS_ADMIN) in the initial user namespace; the nf_tables datapath (--steer-datapath nft) needs neither";

/// The errno of a failed map call, if it was one.
fn map_errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

impl BpfSteering {
    /// Loads the programs and attaches the datapath to `cfg.device` in the
    /// calling thread's network namespace.
    pub fn install(cfg: BpfConfig) -> Result<BpfSteering, SteerError> {
        // aya unwraps in places (the kernel's release string); a panic
        // there is a refusal, not the balancer's end.
        std::panic::catch_unwind(|| Self::install_inner(cfg)).unwrap_or_else(|_| {
            Err(invalid(&format!(
                "the BPF loader failed unexpectedly; {LOAD_HINT}"
            )))
        })
    }

    fn install_inner(cfg: BpfConfig) -> Result<BpfSteering, SteerError> {
        cfg.check().map_err(|e| invalid(&e))?;
        // aya's map creation unwraps this parse; done here first, a
        // release string it cannot read is an error, not a panic.
        aya::util::KernelVersion::current()
            .map_err(|e| kernel("cannot read the kernel's version for the BPF loader", e))?;
        let netns = Netns::here()?;
        let ifindex =
            tcpr_host::addr::interface_index(&cfg.device).map_err(|e| invalid(&e.to_string()))?;
        let capacity = u32::try_from(cfg.capacity).map_err(|_| invalid("capacity too large"))?;
        let mut ebpf = EbpfLoader::new()
            .set_max_entries("flows", capacity)
            .load(OBJECT)
            .map_err(|e| refused("cannot load the BPF steering maps and programs", e))?;
        let mut config: Array<MapData, [u8; 16]> = Array::try_from(
            ebpf.take_map("config")
                .ok_or_else(|| invalid("the BPF object has no config map"))?,
        )
        .map_err(|e| kernel("config map", e))?;
        let mut settings = [0u8; 16];
        settings[..8].copy_from_slice(&nanos(cfg.idle).to_ne_bytes());
        settings[8..].copy_from_slice(&nanos(cfg.linger).to_ne_bytes());
        config
            .set(0, settings, 0)
            .map_err(|e| kernel("config map", e))?;
        let flows = ebpf
            .take_map("flows")
            .ok_or_else(|| invalid("the BPF object has no flows map"))?;
        // A second descriptor of the map, to pin it (the typed map keeps
        // its own to itself).
        let flows_fd = match &flows {
            aya::maps::Map::HashMap(data) => data.fd().as_fd().try_clone_to_owned()?,
            _ => return Err(invalid("the BPF object's flows map is not a hash map")),
        };
        let mut flows: BpfHashMap<MapData, Key, Value> =
            BpfHashMap::try_from(flows).map_err(|e| kernel("flows map", e))?;

        let sweep = program(&mut ebpf, "sweep")?;
        sweep
            .load()
            .map_err(|e| refused("the kernel refused the sweep program", e))?;
        let sweep = Arc::new(Sweep {
            prog: sweep
                .fd()
                .map_err(|e| kernel("sweep program", e))?
                .try_clone()?,
            running: Mutex::new(()),
            last: Mutex::new(None),
        });
        // One sweep now: a datapath whose entries would never expire is
        // refused here, not found out when the map is full.
        sweep
            .run()
            .map_err(|e| kernel("the first sweep of the flows map failed", e))?;

        let steer = program(&mut ebpf, "steer")?;
        steer
            .load()
            .map_err(|e| refused("the kernel refused the steering program", e))?;
        // First: before the program of the datapath this one takes over
        // from, if any, which detaches once its link's pin is replaced and
        // `left` dropped. From the attach on, a packet of a flow the old
        // map holds and this one does not yet meets this program, then the
        // old one, which steers it; the entries are copied after the
        // attach, so none changes (a FIN, a SYN reusing a tuple) unseen.
        let link_id = steer
            .attach_with_options(
                &cfg.device,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(|e| {
                let what = format!(
                    "cannot attach the steering program to {} with tcx",
                    cfg.device
                );
                refused(&what, e)
            })?;
        let link = FdLink::try_from(
            steer
                .take_link(link_id)
                .map_err(|e| kernel("steering link", e))?,
        )
        .map_err(|e| kernel("steering link", e))?;
        let (link, pinned, carried, older) = take_over(&cfg, ifindex, link, flows_fd, &mut flows)?;
        if carried.carried > 0 {
            // The count the gauge answers with counts them from now on.
            sweep.run().map_err(|e| kernel("sweep", e))?;
        }
        let flows = Arc::new(Mutex::new(flows));
        let older = Arc::new(Mutex::new(older));
        let (stop, stopped) = mpsc::channel::<()>();
        let period = sweep_period(cfg.idle, cfg.linger);
        let shared = Arc::clone(&sweep);
        let (flows_too, older_too) = (Arc::clone(&flows), Arc::clone(&older));
        let sweeper = std::thread::Builder::new()
            .name("steer-sweep".into())
            .spawn(move || {
                // Said once per kind of failure, not every period.
                let mut said: Option<std::io::ErrorKind> = None;
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                    follow_older(&older_too, &flows_too);
                    match shared.run() {
                        Ok(_) => said = None,
                        Err(e) if said != Some(e.kind()) => {
                            eprintln!("tcpr-steer: the sweep of expired flows failed: {e}");
                            said = Some(e.kind());
                        }
                        Err(_) => {}
                    }
                }
            })?;
        Ok(BpfSteering {
            cfg,
            netns,
            ifindex,
            flows,
            older,
            on_link: Mutex::new(HashSet::new()),
            sweep,
            stop: Mutex::new(Some(stop)),
            sweeper: Mutex::new(Some(sweeper)),
            link: Mutex::new(Some(link)),
            pinned,
            carried,
            _ebpf: ebpf,
        })
    }

    /// Where the link is pinned (`None`: nowhere; the flows end with the
    /// process).
    pub fn pinned_at(&self) -> Option<&std::path::Path> {
        self.pinned.as_ref().map(|(p, _)| p.dir())
    }

    /// The entries taken over from the datapath this one replaced on the
    /// interface.
    pub fn carried_over(&self) -> CarriedOver {
        self.carried
    }

    /// Stops the sweeper (no more sweeps from this process).
    fn stop_sweeper(&self) {
        drop(lock(&self.stop).take());
        if let Some(t) = lock(&self.sweeper).take() {
            let _ = t.join();
        }
    }

    /// Ends the datapath: stops the sweeper and closes its link. With
    /// `keep`, leaves the flows it steers to the kernel: still pinned, its
    /// link stays (and says how many entries it holds); taken over by a
    /// newer datapath meanwhile, its entries go into that one's map first
    /// (those the newer one has win). Without `keep`, or with nothing
    /// steered, its pin goes (if still its own) and the program detaches.
    fn finish(&self, keep: bool) -> Option<usize> {
        self.stop_sweeper();
        // What the older datapath steered since the last sweep, then its
        // program may detach (with its process gone, once this is closed).
        follow_older(&self.older, &self.flows);
        drop(lock(&self.older).take());
        let link = lock(&self.link).take()?;
        let Some((pins, id)) = &self.pinned else {
            // Said at the install too; said again where it costs.
            if let Ok(n @ 1..) = self.sweep.run() {
                eprintln!(
                    "tcpr-steer: the {n} flows steered on {} end with this process (its \
                     steering is not pinned): their next packets meet the front's stack, \
                     which resets them",
                    self.cfg.device
                );
            }
            return None;
        };
        let locked = match pins.lock() {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "tcpr-steer: cannot lock {} ({e}): its pins are left as they are",
                    pins.dir().display()
                );
                return None;
            }
        };
        let left = self.sweep.run().ok();
        let kept = match pins.pinned(&locked) {
            Ok(Some(p)) if p.id == *id => {
                if keep && left != Some(0) {
                    left.or(Some(usize::MAX))
                } else {
                    pins.remove(&locked);
                    None
                }
            }
            Ok(Some(newer)) if keep => self.hand_to(pins, newer.prog_id),
            Ok(_) => None,
            Err(e) => {
                eprintln!(
                    "tcpr-steer: cannot read the link pinned in {} ({e}): left as it is",
                    pins.dir().display()
                );
                None
            }
        };
        drop(link);
        drop(locked);
        kept
    }

    /// Copies into the map of the program `prog_id` (the datapath that
    /// took over, pinned in `pins`) the entries this one steered after the
    /// takeover and that one does not have: those not marked handed over
    /// (the takeover marks what it copies, see `carry_over`). The marked
    /// ones are this one's copies of flows it handed over then, which the
    /// newer one may have retired since. How many went in.
    fn hand_to(&self, pins: &Pins, prog_id: u32) -> Option<usize> {
        let mut newer = match flows_of(pins, prog_id) {
            Ok(m) => m,
            Err(e) => {
                eprintln!(
                    "tcpr-steer: cannot open the flows map of the datapath that took over ({e}): \
                     the flows steered here since end with this process"
                );
                return None;
            }
        };
        let mine = lock(&self.flows);
        let steered_since = mine
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, value)| value[HANDED_OVER] == 0);
        Some(copy_absent(steered_since, &mut newer).inserted)
    }

    /// Whether the flow from `client` to `vip` is steered now: its entry
    /// is in the map (until the sweep removes it, up to a sweep period
    /// past its expiry).
    pub fn is_steered(&self, client: SocketAddr, vip: SocketAddr) -> Result<bool, SteerError> {
        let Some((client, vip, _)) = on_wire(client, vip) else {
            return Ok(false);
        };
        match lock(&self.flows).get(&flow_key(client, vip), 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(kernel("flows map", e)),
        }
    }

    /// The settings it runs with.
    pub fn config(&self) -> &BpfConfig {
        &self.cfg
    }

    /// Removes the entries past their expiry now (the sweeper does it every
    /// [`sweep_period`]); the entries left.
    pub fn sweep(&self) -> Result<usize, SteerError> {
        self.sweep.run().map_err(|e| kernel("sweep", e))
    }

    /// A new entry's value: its time 0 (the first sweep starts it), not
    /// closing, with the client's next sequence number when known.
    fn value(&self, w: &WireFlow) -> Value {
        let mut v = [0u8; 48];
        match w.backend {
            IpAddr::V4(a) => v[8..12].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => v[8..24].copy_from_slice(&a.octets()),
        }
        v[24..28].copy_from_slice(&self.ifindex.to_ne_bytes());
        v[28] = if w.v4 { 4 } else { 6 };
        if let Some(seq) = w.client_seq {
            v[FLAGS] = SEQ_KNOWN | ACK_KNOWN;
            v[32..36].copy_from_slice(&seq.next.to_ne_bytes());
            v[40..44].copy_from_slice(&seq.ack.to_ne_bytes());
        }
        v
    }
}

/// Removes `keys` from `map` (absent ones are fine); the first failure.
fn remove_all(map: &mut BpfHashMap<MapData, Key, Value>, keys: &[Key]) -> Result<(), SteerError> {
    let mut first = None;
    for key in keys {
        match map.remove(key) {
            Ok(()) => {}
            Err(e) if map_errno(&e) == Some(libc::ENOENT) => {}
            Err(e) => {
                first.get_or_insert(kernel("flows map", e));
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// Removes `keys` from the map of the datapath pinned in `pins` now, if
/// it is not the one whose link is `id` (see `unsteer_batch`).
fn unsteer_in_newer(pins: &Pins, id: u32, keys: &[Key]) -> Result<(), SteerError> {
    let locked = pins.lock().map_err(SteerError::Kernel)?;
    let newer = match pins.pinned(&locked).map_err(SteerError::Kernel)? {
        Some(p) if p.id != id => p,
        _ => return Ok(()),
    };
    remove_all(&mut flows_of(pins, newer.prog_id)?, keys)
}

/// The flows map of the program `prog_id` (a datapath pinned in `pins`),
/// as this datapath's layout.
fn flows_of(pins: &Pins, prog_id: u32) -> Result<BpfHashMap<MapData, Key, Value>, SteerError> {
    let data = pins.flows_of(prog_id).map_err(SteerError::Kernel)?;
    BpfHashMap::<MapData, Key, Value>::try_from(aya::maps::Map::HashMap(data))
        .map_err(|e| kernel("the newer datapath's flows map", e))
}

/// The calling thread's network namespace's cookie (unique in a boot).
fn netns_cookie() -> std::io::Result<u64> {
    let sock = tcpr_host::sock::netlink_socket(libc::NETLINK_ROUTE)?;
    tcpr_host::sock::netns_cookie(sock.as_fd())
}

/// What a datapath took over from the one before it on the interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CarriedOver {
    /// Entries copied into its map.
    pub carried: usize,
    /// Entries that did not fit its capacity: those flows are steered no
    /// more once the old program detaches (their next packets meet the
    /// front's stack).
    pub lost: usize,
}

/// Pins `link` (attached) in place of what an earlier datapath of the
/// interface left, after copying that one's entries into `flows`: all
/// under the pin root's lock. Where nothing can be pinned, or what is
/// pinned cannot be read, says so and runs unpinned (nothing removed).
#[allow(clippy::type_complexity)]
fn take_over(
    cfg: &BpfConfig,
    ifindex: u32,
    link: FdLink,
    flows_fd: std::os::fd::OwnedFd,
    flows: &mut BpfHashMap<MapData, Key, Value>,
) -> Result<(HeldLink, Option<(Pins, u32)>, CarriedOver, Option<Older>), SteerError> {
    let unpinned = |why: String| {
        eprintln!(
            "tcpr-steer: {why}: the BPF datapath of {} is not pinned, and the flows it steers \
             will end with this process",
            cfg.device
        );
    };
    let pins = match netns_cookie().and_then(|c| Pins::open(&cfg.pin_dir, c, ifindex)) {
        Ok(p) => p,
        Err(e) => {
            unpinned(format!(
                "cannot pin in {} ({e}; it must be a directory on a BPF file system \
                 the host shares: under `ip netns exec`, /sys is the command's own, so \
                 mount one elsewhere, `mount -t bpf bpf DIR`, and give --steer-pin-dir \
                 DIR/tcpr)",
                cfg.pin_dir.display()
            ));
            return Ok((HeldLink::Own(link), None, CarriedOver::default(), None));
        }
    };
    let locked = pins.lock()?;
    pins.remove_stale(&locked);
    let mut left = match pins.left(&locked, ifindex) {
        Ok(left) => left,
        Err(e) => {
            unpinned(format!(
                "cannot read what is pinned in {} ({e}); left as it is",
                pins.dir().display()
            ));
            return Ok((HeldLink::Own(link), None, CarriedOver::default(), None));
        }
    };
    let carried = left
        .as_mut()
        .map_or(CarriedOver::default(), |l| carry_over(&mut l.flows, flows));
    let older_layout = left
        .as_mut()
        .is_some_and(|l| BpfHashMap::<&mut MapData, Key, OldValue>::try_from(&mut l.flows).is_ok());
    let flows_data = MapData::from_fd(flows_fd).map_err(|e| kernel("flows map", e))?;
    let (link, id) = pins.commit(&locked, link, &flows_data).map_err(|e| {
        kernel(
            &format!("cannot pin the steering link in {}", pins.dir().display()),
            e,
        )
    })?;
    // The old link's pin is replaced: closing it detaches the old program
    // (unless its process is still running). One of the older layout is
    // held instead (see `Older`).
    let older = match left {
        Some(left) if older_layout => Some(Older { left }),
        _ => None,
    };
    drop(locked);
    Ok((HeldLink::Pinned(link), Some((pins, id)), carried, older))
}

/// Copies the entries of `old` (an earlier datapath's map) into `flows`,
/// those `flows` has already kept.
fn carry_over(
    old: &mut aya::maps::Map,
    flows: &mut BpfHashMap<MapData, Key, Value>,
) -> CarriedOver {
    let mut old = match BpfHashMap::<&mut MapData, Key, Value>::try_from(&mut *old) {
        Ok(m) => m,
        Err(_) => return carry_over_old_layout(old, flows),
    };
    let entries: Vec<(Key, Value)> = old.iter().filter_map(Result::ok).collect();
    let c = copy_absent(entries.iter().copied(), flows);
    // Only what the new map holds now: an entry it refused (full) stays
    // the old datapath's to hand back at its end, when room may be.
    let entries = entries
        .into_iter()
        .filter(|(key, _)| flows.get(key, 0).is_ok());
    // Each entry is marked handed over in the old map, so that the old
    // datapath, at its end, hands back only what it steered since (its
    // entries the new one may have retired stay out). The new program runs
    // first from now on and takes these flows' packets: the old program no
    // longer writes these entries (its sweeper may still stamp a first
    // time, which this write can only undo).
    for (key, mut value) in entries {
        value[HANDED_OVER] = 1;
        let _ = old.insert(key, value, BPF_EXIST);
    }
    CarriedOver {
        carried: c.inserted + c.present,
        lost: c.refused,
    }
}

/// [`carry_over`] from a map of the layout before the sequence numbers
/// (the tcpr before this one): its entries move, as they do from then on
/// at every sweep (see [`Older`]); any other layout: nothing to carry.
fn carry_over_old_layout(
    old: &mut aya::maps::Map,
    flows: &mut BpfHashMap<MapData, Key, Value>,
) -> CarriedOver {
    let mut old = match BpfHashMap::<&mut MapData, Key, OldValue>::try_from(&mut *old) {
        Ok(m) => m,
        Err(_) => return unknown_layout(old),
    };
    let entries: Vec<(Key, OldValue)> = old.iter().filter_map(Result::ok).collect();
    move_older(&mut old, flows, entries)
}

/// Moves `entries` (read from `old`, a map of the older layout) into
/// `flows`: each one inserted (an older entry for a tuple `flows` steers
/// is the older datapath's later handoff on it, and replaces it) leaves
/// `old`; one refused (the map full) stays the older program's.
fn move_older(
    old: &mut BpfHashMap<&mut MapData, Key, OldValue>,
    flows: &mut BpfHashMap<MapData, Key, Value>,
    entries: Vec<(Key, OldValue)>,
) -> CarriedOver {
    let mut moved = CarriedOver::default();
    for (key, value) in entries {
        if flows.insert(key, widened(&value), 0).is_ok() {
            let _ = old.remove(&key);
            moved.carried += 1;
        } else {
            moved.lost += 1;
        }
    }
    moved
}

/// A map of a layout this tcpr does not know (a newer one's, after a
/// downgrade): nothing can be carried, and each of its flows is reset
/// once its program detaches. Counted as lost, and said.
fn unknown_layout(old: &aya::maps::Map) -> CarriedOver {
    let count = match old {
        aya::maps::Map::HashMap(data) => tcpr_host::bpf::count_keys(data.fd().as_fd()),
        _ => Err(std::io::Error::other("not a hash map")),
    };
    match count {
        Ok(0) => CarriedOver::default(),
        Ok(n) => {
            eprintln!(
                "tcpr-steer: the datapath before this one keeps its {n} flows in a map of a layout \
                 this tcpr does not know (another version's): they cannot be carried over and are \
                 reset once it detaches"
            );
            CarriedOver {
                carried: 0,
                lost: n,
            }
        }
        Err(e) => {
            eprintln!(
                "tcpr-steer: the datapath before this one keeps its flows in a map of a layout this \
                 tcpr does not know, which cannot be counted ({e}): they are reset once it detaches"
            );
            CarriedOver::default()
        }
    }
}

/// The datapath of the older layout (32-byte values) this one took over
/// from: its link, held so that its program stays attached for as long as
/// this datapath runs, and its map. Its process, still running during an
/// overlapping restart, goes on steering new flows into that map, and at
/// its end cannot hand them back (it would open this map with its own,
/// smaller value size, which the kernel refuses); so this one copies the
/// entries it did not copy yet (not marked handed over) at every sweep,
/// and once more at its close, while the older program, attached through
/// this handle, still steers them in between. Before, those flows were
/// reset when the older balancer exited. Each entry moved (at the
/// takeover too) leaves the older map, which so stays small
/// and nothing need sweep: the older program runs after this one, which
/// steers those flows first. An entry the older datapath adds for a
/// tuple this one steers is its handoff of a connection made later on
/// that tuple (the client reused it): it replaces this one's. A batch the
/// older process rolls back after its entries were copied is not undone
/// here: that process resets those connections itself (its unsteer
/// cannot reach this map).
struct Older {
    left: crate::pin::Left,
}

/// Copies into `flows` what the older datapath steered since the last
/// look, and takes out of its map what is copied (see [`Older`]).
fn follow_older(older: &Mutex<Option<Older>>, flows: &Mutex<BpfHashMap<MapData, Key, Value>>) {
    let mut older = lock(older);
    let Some(o) = older.as_mut() else {
        return;
    };
    let Ok(mut old) = BpfHashMap::<&mut MapData, Key, OldValue>::try_from(&mut o.left.flows) else {
        return;
    };
    // Read without holding `flows`: the accepts and handoffs need it.
    let entries: Vec<(Key, OldValue)> = old.iter().filter_map(Result::ok).collect();
    if !entries.is_empty() {
        move_older(&mut old, &mut lock(flows), entries);
    }
}

/// An entry of the layout before the sequence numbers, in this one's:
/// the sequence unknown (`flags` 0), learnt from the flow's next packet.
fn widened(old: &OldValue) -> Value {
    let mut v = [0u8; 48];
    v[..32].copy_from_slice(old);
    v[FLAGS] = 0;
    v
}

/// The byte of an entry's value (`flow_value.handed_over`, which the
/// program never writes) that says a newer datapath copied it at its
/// takeover.
const HANDED_OVER: usize = 30;
/// `flow_value.flags` (the old layout's last pad byte, always 0 there).
const FLAGS: usize = 31;

/// What [`copy_absent`] did with each entry.
#[derive(Debug, Default)]
struct Copied {
    /// Inserted: `to` did not have the key.
    inserted: usize,
    /// Left: `to` had the key already (its entry wins).
    present: usize,
    /// Refused otherwise (the map full).
    refused: usize,
}

/// Inserts each of `entries` whose key `to` does not have (`BPF_NOEXIST`).
fn copy_absent(
    entries: impl Iterator<Item = (Key, Value)>,
    to: &mut BpfHashMap<MapData, Key, Value>,
) -> Copied {
    let mut c = Copied::default();
    for (key, value) in entries {
        match to.insert(key, value, BPF_NOEXIST) {
            Ok(()) => c.inserted += 1,
            Err(e) if map_errno(&e) == Some(libc::EEXIST) => c.present += 1,
            Err(_) => c.refused += 1,
        }
    }
    c
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, SteerError> {
    ebpf.program_mut(name)
        .ok_or_else(|| invalid(&format!("the BPF object has no program {name}")))?
        .try_into()
        .map_err(|e| kernel(name, e))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `BPF_NOEXIST`, `BPF_EXIST` (linux/bpf.h): insert only a new key, or
/// only replace one.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// Inserts `key`: a new one in one call; one that exists (a tuple reused
/// within the linger of its previous flow: overwritten, not left
/// closing) is read first and its old value returned.
fn insert(
    map: &mut BpfHashMap<MapData, Key, Value>,
    key: Key,
    value: Value,
) -> Result<Option<Value>, MapError> {
    match map.insert(key, value, BPF_NOEXIST) {
        Ok(()) => return Ok(None),
        Err(e) if map_errno(&e) != Some(libc::EEXIST) => return Err(e),
        Err(_) => {}
    }
    let old = match map.get(&key, 0) {
        Ok(old) => Some(old),
        // Gone meanwhile (the sweep): new after all.
        Err(MapError::KeyNotFound) => None,
        Err(e) => return Err(e),
    };
    map.insert(key, value, 0)?;
    Ok(old)
}

/// The key of a flow as the program builds it from a client's packet.
fn flow_key(client: SocketAddr, vip: SocketAddr) -> Key {
    let mut k = [0u8; 40];
    let put = |k: &mut Key, at: usize, ip: IpAddr| match ip {
        IpAddr::V4(a) => k[at..at + 4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => k[at..at + 16].copy_from_slice(&a.octets()),
    };
    k[0] = if client.is_ipv4() { 4 } else { 6 };
    put(&mut k, 4, client.ip());
    put(&mut k, 20, vip.ip());
    k[36..38].copy_from_slice(&client.port().to_be_bytes());
    k[38..40].copy_from_slice(&vip.port().to_be_bytes());
    k
}

impl Steering for BpfSteering {
    /// Every flow is checked first; the entries then go in one by one
    /// (a BPF map has no transactions), and a refused one takes the
    /// batch's others out again (an entry the batch replaced gets its old
    /// value back): no flow of a refused batch stays steered.
    fn steer_batch(&self, flows: &[SteeredFlow]) -> Result<(), SteerError> {
        let wire = flows
            .iter()
            .map(WireFlow::check)
            .collect::<Result<Vec<WireFlow>, SteerError>>()?;
        {
            let mut on_link = lock(&self.on_link);
            for w in &wire {
                if !on_link.contains(&w.backend) {
                    w.check_on_link(&self.netns, &self.cfg.device)?;
                    on_link.insert(w.backend);
                }
            }
        }
        let mut map = lock(&self.flows);
        // What each insert replaced (None: it was new), to undo.
        let mut done: Vec<(Key, Option<Value>)> = Vec::with_capacity(wire.len());
        for w in &wire {
            let key = flow_key(w.client, w.vip);
            match insert(&mut map, key, self.value(w)) {
                Ok(old) => done.push((key, old)),
                Err(e) => {
                    for (key, old) in done.into_iter().rev() {
                        let _ = match old {
                            Some(old) => map.insert(key, old, BPF_EXIST),
                            None => map.remove(&key),
                        };
                    }
                    return Err(match map_errno(&e) {
                        Some(libc::E2BIG) => SteerError::Full {
                            capacity: self.cfg.capacity,
                        },
                        _ => kernel("flows map", e),
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes each flow's entry, and, when another datapath took the
    /// interface over since, from that one's map too: it copied this one's
    /// entries (a batch's among them, steered before its COMMIT) and its
    /// program runs first, so a flow rolled back here would go on reaching
    /// the backend, which has no socket for it (a RST), while this
    /// balancer relays it. The look at the pins is under their lock, as
    /// the takeover's copy is: the entry goes from this map before, and
    /// the copy either finds it gone or is found here.
    fn unsteer_batch(&self, flows: &[SteeredFlow]) -> Result<(), SteerError> {
        let keys: Vec<Key> = flows
            .iter()
            .filter_map(|f| on_wire(f.client, f.vip))
            .map(|(client, vip, _)| flow_key(client, vip))
            .collect();
        let mut first = remove_all(&mut lock(&self.flows), &keys).err();
        if let Some((pins, id)) = &self.pinned {
            if let Err(e) = unsteer_in_newer(pins, *id, &keys) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// A look-up first: almost always absent (a client rarely reuses a
    /// steered tuple), which costs no pin lock.
    fn forget_reused(&self, client: SocketAddr, vip: SocketAddr) -> Result<(), SteerError> {
        if self.is_steered(client, vip)? {
            self.unsteer(client, vip)
        } else {
            Ok(())
        }
    }

    /// The count of a sweep at most a [`sweep_period`] old (one runs now
    /// if the last is older): a metrics scrape is not a walk of the map
    /// each.
    fn active(&self) -> Result<usize, SteerError> {
        self.sweep
            .recent(sweep_period(self.cfg.idle, self.cfg.linger))
            .map_err(|e| kernel("sweep", e))
    }

    fn capacity(&self) -> usize {
        self.cfg.capacity
    }

    fn name(&self) -> &'static str {
        "bpf-tcx"
    }

    /// See [`BpfSteering::finish`].
    fn close(&self, keep_flows: bool) -> Option<usize> {
        self.finish(keep_flows)
    }
}

/// Dropped without [`Steering::close`] (an error after the install, a
/// panic unwinding): as a crash would, the flows steered now are left to
/// the kernel for the next datapath (handed to it, if one took over
/// meanwhile); only `close(false)` removes them. After a close, nothing.
impl Drop for BpfSteering {
    fn drop(&mut self) {
        self.finish(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_programs_layout() {
        let k = flow_key(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.100:80".parse().unwrap(),
        );
        assert_eq!(k[0], 4);
        assert_eq!(&k[4..8], &[10, 0, 0, 1]);
        assert!(k[8..20].iter().all(|b| *b == 0));
        assert_eq!(&k[20..24], &[10, 0, 0, 100]);
        assert_eq!(&k[36..40], &[0x9c, 0x40, 0, 80]);
        let k6 = flow_key(
            "[fd00::1]:1".parse().unwrap(),
            "[fd00::64]:2".parse().unwrap(),
        );
        assert_eq!(k6[0], 6);
        assert_eq!(k6[19], 1);
        assert_eq!(k6[35], 0x64);
        assert_eq!(&k6[36..40], &[0, 1, 0, 2]);
    }

    #[test]
    fn bad_settings_are_refused() {
        let mut c = BpfConfig::new("eth0");
        assert!(c.check().is_ok());
        c.capacity = 0;
        assert!(c.check().is_err());
        let mut c = BpfConfig::new("eth0 x");
        assert!(c.check().is_err());
        c.device = "eth0".into();
        c.linger = Duration::from_millis(1);
        assert!(c.check().unwrap_err().contains("linger"));
    }

    #[test]
    fn the_sweep_runs_often_enough_and_not_too_often() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(sweep_period(s(3600), s(5)), s(1));
        assert_eq!(sweep_period(s(3600), ms(800)), ms(200));
        assert_eq!(sweep_period(ms(10), s(5)), ms(100));
    }
}
