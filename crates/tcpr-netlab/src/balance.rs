//! The load balancer's lab: a client, a front host holding the virtual
//! addresses (VIP), and backends, all on one bridge, dual-stack.
//!
//! Host `h` of network `n` is `10.n.0.h/24` and `fd00:n::h/64`; the client
//! is host 1, the front host 2, the backends 3, 4, ...; the VIPs are
//! `10.n.0.100` and `fd00:n::100`, on the front's eth0.

use crate::{Host, Lab};
use anyhow::{Context, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The VIP's host number.
const VIP_HOST: u8 = 100;
/// The client's host number.
const CLIENT_HOST: u8 = 1;
/// The front host's.
const FRONT_HOST: u8 = 2;
/// The first backend's.
const FIRST_BACKEND_HOST: u8 = 3;

/// Client, front and backends on one segment.
#[derive(Debug)]
pub struct BalanceLab {
    /// The client.
    pub client: Host,
    /// The front host (the balancer runs here; it holds the VIPs).
    pub front: Host,
    /// The backend hosts, in address order.
    pub backends: Vec<Host>,
    net: u8,
    // The hosts' namespaces go when it drops (their processes first).
    _lab: Lab,
    // After the hosts: a balancer may still have it mounted until then.
    pins: PinFs,
}

/// A BPF file system for a lab's steering datapath to pin itself in
/// (`tcpr balance --steer-pin-dir`, `BpfConfig::pin_dir`): a command run in
/// a host (`ip netns exec`) has a mount namespace and a `/sys` of its own,
/// so the host's `/sys/fs/bpf` is hidden there and one mounted there would
/// go with the command. Mounted here, in the caller's mount namespace,
/// before any such command, it is the same file system for each; and a
/// lab's pins stay out of the host's. Unmounted when dropped, with
/// whatever a killed balancer left in it.
#[derive(Debug)]
pub struct PinFs(std::path::PathBuf);

impl PinFs {
    /// Mounts one (a directory named after `tag` and `net` in the
    /// temporary directory).
    pub fn mount(tag: &str, net: u8) -> Result<PinFs> {
        let dir =
            std::env::temp_dir().join(format!("tcpr-lab-{tag}-{net}-{}-bpffs", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        tcpr_host::bpf::mount_bpffs(&dir)
            .with_context(|| format!("mount a BPF file system on {}", dir.display()))?;
        Ok(PinFs(dir))
    }

    /// A directory to pin in, on it.
    pub fn pin_dir(&self) -> std::path::PathBuf {
        self.0.join("tcpr")
    }
}

impl Drop for PinFs {
    fn drop(&mut self) {
        let _ = tcpr_host::bpf::unmount(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// An address family of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `10.n.0.h`.
    V4,
    /// `fd00:n::h`.
    V6,
}

impl BalanceLab {
    /// A lab on network `net` (1 to 254, distinct per concurrent lab) with
    /// `backends` backend hosts.
    pub fn new(tag: &str, net: u8, backends: u8) -> Result<BalanceLab> {
        let pins = PinFs::mount(tag, net)?;
        let mut lab = Lab::new(tag)?;
        let cidrs = |h: u8| [format!("10.{net}.0.{h}/24"), format!("fd00:{net}::{h}/64")];
        let host = |lab: &mut Lab, name: &str, h: u8| -> Result<Host> {
            let [v4, v6] = cidrs(h);
            lab.host(name, &[&v4, &v6])
                .with_context(|| format!("lab host {name}"))
        };
        let client = host(&mut lab, "client", CLIENT_HOST)?;
        let front = host(&mut lab, "front", FRONT_HOST)?;
        let [vip4, vip6] = cidrs(VIP_HOST);
        front.add_addr(&vip4)?;
        // Deprecated (preferred_lft 0): it takes connections but is never
        // picked as the source of the front's own (RFC 6724 rule 3), so
        // the front reaches the backends from its own address, not from
        // the VIP they hold on their loopback.
        front.ip(&[
            "addr",
            "add",
            &vip6,
            "dev",
            "eth0",
            "nodad",
            "preferred_lft",
            "0",
        ])?;
        let backends = (0..backends)
            .map(|i| host(&mut lab, &format!("b{i}"), FIRST_BACKEND_HOST + i))
            .collect::<Result<Vec<_>>>()?;
        Ok(BalanceLab {
            client,
            front,
            backends,
            net,
            _lab: lab,
            pins,
        })
    }

    /// A directory for the front's balancer to pin its steering in
    /// (`--steer-pin-dir`), on a BPF file system of the lab's.
    pub fn pin_dir(&self) -> std::path::PathBuf {
        self.pins.pin_dir()
    }

    /// Host number `h`'s address in `family`.
    pub fn addr(&self, family: Family, h: u8) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(10, self.net, 0, h)),
            // The groups are written in decimal digits, as in `new`'s
            // addresses: `fd00:140::3` is the group 0x140.
            Family::V6 => IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                decimal_digits_as_hex(self.net),
                0,
                0,
                0,
                0,
                0,
                decimal_digits_as_hex(h),
            )),
        }
    }
    /// The VIP in `family`.
    pub fn vip(&self, family: Family) -> IpAddr {
        self.addr(family, VIP_HOST)
    }
    /// The client's address.
    pub fn client_addr(&self, family: Family) -> IpAddr {
        self.addr(family, CLIENT_HOST)
    }
    /// Backend `i`'s address.
    pub fn backend_addr(&self, family: Family, i: usize) -> IpAddr {
        let i = u8::try_from(i).unwrap_or(u8::MAX);
        self.addr(family, FIRST_BACKEND_HOST.saturating_add(i))
    }
    /// `ip:port` of backend `i`.
    pub fn backend_sock(&self, family: Family, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.backend_addr(family, i), port)
    }
}

/// `n`'s decimal digits read as hex digits (`140` → `0x140`).
fn decimal_digits_as_hex(n: u8) -> u16 {
    u16::from(n / 100) << 8 | u16::from(n / 10 % 10) << 4 | u16::from(n % 10)
}

impl Host {
    /// Bytes interface `ifname` of this host has transmitted (the kernel's
    /// counter, `/sys/class/net/IF/statistics/tx_bytes`).
    pub fn tx_bytes(&self, ifname: &str) -> Result<u64> {
        self.if_counter(ifname, "tx_bytes")
    }
    /// Bytes interface `ifname` of this host has received.
    pub fn rx_bytes(&self, ifname: &str) -> Result<u64> {
        self.if_counter(ifname, "rx_bytes")
    }
    fn if_counter(&self, ifname: &str, counter: &str) -> Result<u64> {
        // `ip netns exec` mounts the namespace's own sysfs for the command.
        let out = crate::run(
            self.cmd("cat")
                .arg(format!("/sys/class/net/{ifname}/statistics/{counter}")),
        )?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("{counter} of {ifname} in {}", self.netns))
    }
}
