//! Evacuating a busy host (issue 7, hole 10): every connection of a service
//! address, each with about a megabyte queued both ways, moves to another
//! host in one `tcpr migrate --local ADDR:PORT --move-address`, with the
//! sender's memory bounded by a frame, not by the batch; and one connection
//! whose queue is larger than a frame moves too. Python peers check every
//! byte both ways.

mod common;
use common::*;
use std::path::PathBuf;
use std::time::Duration;
use tcpr_netlab::{Host, Lab};

const PORT: u16 = 8080;

struct Evacuation {
    _lab: Lab,
    c: Host,
    a: Host,
    b: Host,
    n: u8,
    key: PathBuf,
    dir: PathBuf,
}

impl Evacuation {
    fn new(tag: &str, n: u8) -> Evacuation {
        let dir = tmpdir(tag);
        let key = dir.join("psk");
        std::fs::write(&key, "a shared secret for the evacuation tests\n").unwrap();
        let mut lab = Lab::new(tag).unwrap();
        let c = lab.host("c", &[&format!("10.{n}.0.1/24")]).unwrap();
        let a = lab
            .host(
                "a",
                &[&format!("10.{n}.0.2/24"), &format!("10.{n}.0.100/24")],
            )
            .unwrap();
        let b = lab.host("b", &[&format!("10.{n}.0.3/24")]).unwrap();
        Evacuation {
            _lab: lab,
            c,
            a,
            b,
            n,
            key,
            dir,
        }
    }

    fn svc(&self) -> String {
        format!("10.{}.0.100", self.n)
    }

    /// The receiving end on b: `many.py` echoing what the agent delivers,
    /// and the agent. Returns (receiver, agent).
    fn receiver(&self) -> (Proc, Proc) {
        let sock = self.dir.join("deliver.sock");
        let recv = unix_receiver(&self.b, &sock);
        let mut cmd = self.b.cmd(tcpr_bin());
        cmd.args([
            "agent",
            "--listen",
            &format!("10.{}.0.3:7070", self.n),
            "--psk-file",
            self.key.to_str().unwrap(),
            "--allow",
            &format!("{}:{PORT}", self.svc()),
            "--unix",
            sock.to_str().unwrap(),
        ]);
        let mut agent = Proc::spawn(cmd, "agent");
        agent.expect("tcpr agent listening", Duration::from_secs(10));
        (recv, agent)
    }

    /// `count` clients on c and their server on a, with `first` then
    /// `paused` bytes queued per connection (`big_first` instead of `first`
    /// on one): the server echoes the first part, which waits in its send
    /// queue (the client reads nothing), then stops reading, and the second
    /// part waits in its receive queue. Returns (server, client).
    fn busy(&self, count: usize, first: u64, big_first: u64, paused: u64) -> (Proc, Proc) {
        let mut cmd = self.a.cmd("python3");
        cmd.args([
            &py("evacuate.py"),
            "server",
            "--listen",
            &self.svc(),
            "--port",
            &PORT.to_string(),
            "--count",
            &count.to_string(),
            "--buf",
            &(256u64 << 20).to_string(),
        ]);
        let mut server = Proc::spawn(cmd, "evacuate server");
        server.expect("listening", Duration::from_secs(10));
        let mut cmd = self.c.cmd("python3");
        cmd.args([
            &py("evacuate.py"),
            "client",
            "--connect",
            &self.svc(),
            "--port",
            &PORT.to_string(),
            "--count",
            &count.to_string(),
        ]);
        let mut client = Proc::spawn(cmd, "evacuate client");
        client.expect("connected", Duration::from_secs(60));
        server.expect(&format!("ready {count}"), Duration::from_secs(60));
        client.send(&format!("send {first} {big_first}"));
        assert_eq!(client.expect("s", Duration::from_secs(300)), "sent");
        server.send("pause");
        server.expect("paused", Duration::from_secs(60));
        client.send(&format!("send {paused}"));
        assert_eq!(client.expect("s", Duration::from_secs(300)), "sent");
        (server, client)
    }

    /// Bytes queued (receive + send) per connection on the service port.
    fn queued(&self) -> Vec<u64> {
        ss(&self.a, PORT)
            .lines()
            .filter(|l| l.contains(&format!("{}:{PORT}", self.svc())))
            .map(|l| {
                l.split_whitespace()
                    .take(2)
                    .map(|q| q.parse::<u64>().expect("ss Recv-Q and Send-Q"))
                    .sum()
            })
            .collect()
    }

    /// `tcpr migrate --local SVC:PORT --move-address` under GNU time;
    /// returns its output and its peak resident memory in bytes.
    fn evacuate(&self) -> (std::process::Output, u64) {
        let out = self
            .a
            .cmd("/usr/bin/time")
            .args(["-f", "peak-rss-kib %M", tcpr_bin(), "migrate", "--to"])
            .arg(format!("10.{}.0.3:7070", self.n))
            .args(["--psk-file", self.key.to_str().unwrap(), "--local"])
            .arg(format!("{}:{PORT}", self.svc()))
            .arg("--move-address")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let kib: u64 = stderr
            .lines()
            .find_map(|l| l.strip_prefix("peak-rss-kib "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no peak memory from time: {stderr}"));
        (out, kib << 10)
    }

    fn has_svc(&self, h: &Host) -> bool {
        let out = h.ip(&["-o", "addr", "show"]).unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&format!("{}/24", self.svc()))
    }

    /// Migrate moved all `count`, the address and the locks followed, the
    /// receiver got every connection, and the client saw every byte echoed
    /// both before and after the move.
    fn assert_evacuated(&self, out: &std::process::Output, count: usize, recv: &mut Proc) {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "migrate: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("moved {count}, rolled back 0, unknown 0")),
            "{stdout}"
        );
        recv.expect(&format!("got {count}"), Duration::from_secs(60));
        assert!(
            !self.has_svc(&self.a) && self.has_svc(&self.b),
            "the address moved"
        );
        assert_eq!(locked(&self.a), 0, "the source locks are released");
    }
}

impl Drop for Evacuation {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running process's peak resident memory, as /proc says.
fn peak_rss(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM unknown")
        .split_whitespace()
        .skip(1)
        .collect::<Vec<_>>()
        .join(" ")
}

fn assert_every_byte(client: &mut Proc, count: usize) -> serde_json::Value {
    client.send("finish");
    let v: serde_json::Value =
        serde_json::from_str(&client.expect("{", Duration::from_secs(600))).unwrap();
    assert_all_echoed(&v, count);
    v
}

/// 100 clients with about 1.4 MB queued per connection (the echo of 1 MiB
/// waiting in the server's send queue, 512 KiB more in its receive queue):
/// all move in one command. Before frames were cut by size, 64 images went
/// in one frame of about 90 MB, over the 64 MiB limit, and all 100 rolled
/// back; and the sender held every image at once.
#[test]
fn a_hundred_busy_connections_evacuate_in_one_command() {
    const COUNT: usize = 100;
    let net = Evacuation::new("ev", 93);
    let (mut recv, agent) = net.receiver();
    let (mut server, mut client) = net.busy(COUNT, 1 << 20, 1 << 20, 512 << 10);
    let queued = net.queued();
    assert_eq!(queued.len(), COUNT, "every connection is up");
    let total: u64 = queued.iter().sum();
    assert!(
        queued.iter().all(|&q| q > 1_000_000),
        "about a megabyte queued on every connection: {queued:?}"
    );
    let (out, peak) = net.evacuate();
    eprintln!(
        "{total} bytes queued; the sender peaked at {peak} bytes, the agent at {}",
        peak_rss(agent.pid())
    );
    net.assert_evacuated(&out, COUNT, &mut recv);
    // The sender holds about a frame of images, not the batch.
    assert!(
        peak < total / 4,
        "the sender peaked at {peak} bytes for {total} bytes of queues"
    );
    server.kill();
    assert_every_byte(&mut client, COUNT);
}

/// One connection with about 80 MiB queued (larger than a PREPARE frame,
/// and than the old 64 MiB limit on any frame) moves with three ordinary
/// ones, in one command.
#[test]
fn a_queue_larger_than_a_frame_moves() {
    const COUNT: usize = 4;
    const BIG: u64 = 80 << 20;
    let net = Evacuation::new("eb", 94);
    let (mut recv, _agent) = net.receiver();
    let (mut server, mut client) = net.busy(COUNT, 256 << 10, BIG, 256 << 10);
    let queued = net.queued();
    assert_eq!(queued.len(), COUNT, "every connection is up");
    let largest = queued.iter().copied().max().unwrap_or(0);
    assert!(
        largest > 64 << 20,
        "the kernel let one queue grow past 64 MiB: {queued:?}"
    );
    let (out, _peak) = net.evacuate();
    net.assert_evacuated(&out, COUNT, &mut recv);
    server.kill();
    let v = assert_every_byte(&mut client, COUNT);
    assert!(v["largest"].as_u64().unwrap() > BIG, "{v}");
}

/// A batch too large for the sender to hold two handles per connection
/// (the open file limit is fixed below twice the batch, and cannot be
/// raised without CAP_SYS_RESOURCE): it is frozen in chunks and moves whole,
/// every byte checked.
#[test]
fn a_batch_larger_than_the_open_file_limit_allows_twice_moves() {
    const COUNT: usize = 600;
    // The sender takes one handle per connection, plus a few of its own;
    // a second per connection does not fit, a chunk of 512 more does.
    const NOFILE: usize = 1_200;
    let net = Evacuation::new("en", 95);
    let (mut recv, _agent) = net.receiver();
    let mut cmd = net.a.cmd("python3");
    cmd.args([
        &py("many.py"),
        "echo",
        "--listen",
        &net.svc(),
        "--port",
        &PORT.to_string(),
        "--count",
        &COUNT.to_string(),
    ]);
    let mut echo = Proc::spawn(cmd, "many echo");
    echo.expect("listening", Duration::from_secs(10));
    let mut cmd = net.c.cmd("python3");
    cmd.args([
        &py("many.py"),
        "peer",
        "--connect",
        &net.svc(),
        "--port",
        &PORT.to_string(),
        "--count",
        &COUNT.to_string(),
    ]);
    let mut peer = Proc::spawn(cmd, "many peer");
    peer.expect("connected", Duration::from_secs(60));
    echo.expect(&format!("ready {COUNT}"), Duration::from_secs(60));
    echo.send("flush");
    echo.expect("paused", Duration::from_secs(30));
    let out = net
        .a
        .cmd("setpriv")
        .args([
            "--bounding-set",
            "-sys_resource",
            "--inh-caps",
            "-sys_resource",
        ])
        .arg("prlimit")
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .args([tcpr_bin(), "migrate", "--to"])
        .arg(format!("10.{}.0.3:7070", net.n))
        .args(["--psk-file", net.key.to_str().unwrap(), "--local"])
        .arg(format!("{}:{PORT}", net.svc()))
        .arg("--move-address")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("freezing in chunks"), "{stderr}");
    net.assert_evacuated(&out, COUNT, &mut recv);
    echo.kill();
    // The peer writes 8 connections per round: wait until every one of
    // them has echoed since the move (a fast move left some unwritten).
    peer.send("mark");
    wait_until(
        "every connection echoes after the move",
        Duration::from_secs(60),
        || {
            peer.send("progress");
            let line = peer.expect("progress", Duration::from_secs(10));
            line.split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<usize>().ok())
                == Some(COUNT)
        },
    );
    assert_all_echoed(&verdict(&mut peer), COUNT);
}
