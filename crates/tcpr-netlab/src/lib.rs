//! Throwaway hosts for tests and the demo: network namespaces joined by veth
//! pairs to a bridge that lives in a namespace of its own, torn down on drop
//! (and by [`cleanup_all`] from a signal handler). Names carry the process
//! id and a counter, so labs in parallel tests never collide.
//!
//! This crate drives `ip` (iproute2) and `nft`; it does not touch the
//! caller's own namespace beyond creating and deleting named ones.

pub mod balance;

use anyhow::{bail, Context, Result};
use std::net::IpAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

static COUNTER: AtomicUsize = AtomicUsize::new(0);
/// Every namespace created by a live lab, for [`cleanup_all`].
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Runs a command, failing with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// Deletes every namespace of every live lab of this process (for Ctrl-C).
pub fn cleanup_all() {
    let names = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    for n in names {
        kill_inside(&n);
        let _ = Command::new("ip").args(["netns", "del", &n]).output();
    }
}

/// A set of hosts on one Ethernet segment.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    switch: String,
    hosts: Vec<String>,
}

/// What a [`Worker`] runs.
type Job = Box<dyn FnOnce() + Send>;

/// A thread inside a host ([`Host::worker`]).
#[derive(Debug)]
pub struct Worker {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    /// Runs `f` on the worker's thread and waits for its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.start(f)?
            .recv()
            .map_err(|_| anyhow::anyhow!("thread inside the host panicked"))?
    }

    /// Starts `f` on the worker's thread; its result comes on the
    /// receiver (for a caller that does something else meanwhile).
    pub fn start<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::sync::mpsc::Receiver<T>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .as_ref()
            .context("the worker is stopped")?
            .send(job)
            .map_err(|_| anyhow::anyhow!("the thread inside the host is gone"))?;
        Ok(rx)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One host of a lab: a network namespace with `lo` and `eth0`.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace name (as `ip netns` knows it).
    pub netns: String,
}

impl Host {
    /// The namespace's path, for `setns`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }
    /// A command that runs inside this host.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, program]);
        c
    }
    /// Runs `ip ARGS` in this host.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut c = Command::new("ip");
        c.args(["-n", &self.netns]).args(args);
        run(&mut c)
    }
    /// Adds an address (`addr/prefix`) to eth0 (IPv6 without DAD delay).
    pub fn add_addr(&self, cidr: &str) -> Result<()> {
        if cidr.contains(':') {
            self.ip(&["addr", "add", cidr, "dev", "eth0", "nodad"])?;
        } else {
            self.ip(&["addr", "add", cidr, "dev", "eth0"])?;
        }
        Ok(())
    }
    /// Removes an address from eth0.
    pub fn del_addr(&self, cidr: &str) -> Result<()> {
        self.ip(&["addr", "del", cidr, "dev", "eth0"])?;
        Ok(())
    }
    /// Announces an address from eth0 (gratuitous ARP or unsolicited NA).
    pub fn announce(&self, addr: IpAddr) -> Result<()> {
        self.within(|| tcpr_host::announce("eth0", addr).map_err(Into::into))
    }
    /// Runs `f` on a thread inside this host: sockets it creates live here.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                tcpr_host::enter_netns(&path).context("enter the host's namespace")?;
                f()
            })
            .join()
            .unwrap_or_else(|_| bail!("thread inside the host panicked"))
        })
    }
    /// A thread kept inside this host that runs what [`Worker::run`] gives
    /// it, for a caller that times what runs there: [`Host::within`]
    /// starts a thread, enters the namespace and ends the thread per call,
    /// about 0.15 ms of a 1.5 ms handoff on the 2-core VM. Drop it before
    /// the lab: its thread holds the namespace.
    pub fn worker(&self) -> Result<Worker> {
        let path = self.path();
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("in-{}", self.netns))
            .spawn(move || {
                let entered = tcpr_host::enter_netns(&path).context("enter the host's namespace");
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    for job in rx {
                        job();
                    }
                }
            })
            .context("start a thread inside the host")?;
        ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("thread inside the host panicked"))??;
        Ok(Worker {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }
    /// Drops `per_mille` of the TCP packets this host receives, at random
    /// (nftables numgen: this kernel has no netem).
    pub fn set_loss(&self, per_mille: u32) -> Result<()> {
        let cond = if per_mille >= 1000 {
            String::new()
        } else {
            format!("numgen random mod 1000 < {per_mille} ")
        };
        let script = format!(
            "add table inet netlab
add chain inet netlab loss {{ type filter hook prerouting priority -400; policy accept; }}
flush chain inet netlab loss
add rule inet netlab loss meta l4proto tcp {cond}drop
"
        );
        nft_in(self, &script)
    }
    /// Removes the loss rule.
    pub fn clear_loss(&self) -> Result<()> {
        nft_in(self, "flush chain inet netlab loss\n")
    }
}

fn nft_in(h: &Host, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = h
        .cmd("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run nft")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Lab {
    /// A new lab with an empty switch. `tag` (a few letters) shows in names.
    pub fn new(tag: &str) -> Result<Lab> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("tcpr-{tag}-{}-{n}", std::process::id());
        let switch = format!("{prefix}-sw");
        let lab = Lab {
            prefix,
            switch: switch.clone(),
            hosts: vec![],
        };
        lab.add_ns(&switch)?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        // The switch stands for an L2 switch, which runs no firewall. With
        // br_netfilter in the kernel (built in on this project's machines,
        // on by default in every namespace) each bridged IPv4 and IPv6
        // packet went through the switch namespace's netfilter hooks: 6.5%
        // of the machine under `tcpr bench-balance`. Off where present.
        let off = "for f in /proc/sys/net/bridge/bridge-nf-call-iptables \
                   /proc/sys/net/bridge/bridge-nf-call-ip6tables \
                   /proc/sys/net/bridge/bridge-nf-call-arptables; do
                     [ ! -e $f ] || echo 0 > $f || exit 1
                   done";
        ip(&["netns", "exec", &switch, "sh", "-c", off])
            .context("turn off br_netfilter in the switch's namespace")?;
        Ok(lab)
    }

    fn add_ns(&self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A new host plugged into the switch, with the given addresses on eth0.
    pub fn host(&mut self, name: &str, addrs: &[&str]) -> Result<Host> {
        let netns = format!("{}-{name}", self.prefix);
        self.add_ns(&netns)?;
        self.hosts.push(netns.clone());
        let port = format!("p{}", self.hosts.len());
        ip(&[
            "-n",
            &self.switch,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        let h = Host { netns };
        // No duplicate address detection on the lab's link: a link-local
        // address stays tentative for about 2 s after the link comes up,
        // and until then the host sends no neighbour solicitation (the
        // kernel needs a usable link-local source), so a forwarded IPv6
        // packet to a neighbour not yet known was dropped (seen in the
        // steering tests: a flow's first packets went nowhere). `-e`: a
        // kernel without IPv6 has no such setting.
        run(h
            .cmd("sysctl")
            .args(["-qew", "net.ipv6.conf.eth0.accept_dad=0"]))?;
        h.ip(&["link", "set", "eth0", "up"])?;
        for a in addrs {
            h.add_addr(a)?;
        }
        Ok(h)
    }
}

/// Kills every process still running inside namespace `ns`.
fn kill_inside(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        for n in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            kill_inside(n);
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            live.retain(|x| x != n);
        }
    }
}
