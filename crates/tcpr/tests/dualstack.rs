//! Dual-stack services (issue 7, hole 9): most servers listen on `[::]`, so
//! an IPv4 client's connection is an AF_INET6 socket with IPv4-mapped
//! addresses (`::ffff:10.66.0.100`) whose packets are IPv4 on the wire. A
//! python server on `::` and an IPv4 client stream both ways, every byte
//! checked, through dump/restore and through the agent with `migrate
//! --local --move-address`. The lock must hold the flow by its wire family
//! (or the source resets the client), and the restored socket must read
//! the addresses as the application had them.

mod common;
use common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tcpr_netlab::{Host, Lab};

const SVC: &str = "10.66.0.100";
const SVC_CIDR: &str = "10.66.0.100/24";
/// How the service's side of the connection reads its address.
const MAPPED_LOCAL: &str = "[::ffff:10.66.0.100]:8080";

struct Net {
    _lab: Lab,
    c: Host,
    a: Host,
    b: Host,
    dir: PathBuf,
}

fn net(tag: &str) -> Net {
    let mut lab = Lab::new(tag).unwrap();
    let c = lab.host("c", &["10.66.0.1/24"]).unwrap();
    let a = lab.host("a", &["10.66.0.2/24", SVC_CIDR]).unwrap();
    let b = lab.host("b", &["10.66.0.3/24"]).unwrap();
    Net {
        _lab: lab,
        c,
        a,
        b,
        dir: tmpdir(tag),
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// echo.py listening on `::` (dual-stack) in `a`, and an IPv4 client in
/// `c` streaming to the service address; returns (echo, peer, echo's fd).
fn dual_stack_stream(n: &Net) -> (Proc, Proc, String) {
    // Bytes echo.py has read but not yet sent are its state: on "pause" it
    // writes them to --state, and the dump carries them as the blob.
    let state = n.dir.join("echo-state");
    let mut echo = echo_server(&n.a, "::", 8080, &["--state", state.to_str().unwrap()]);
    let peer = stream_peer(&n.c, SVC, 8080, &["--rate", "1000000"]);
    let fd = ready_fd(&mut echo);
    let rows = ls_json(&n.a);
    assert!(
        rows.iter()
            .any(|r| r["local"] == MAPPED_LOCAL && r["state"] == "ESTABLISHED"),
        "a dual-stack socket with mapped addresses: {rows:?}"
    );
    (echo, peer, fd)
}

fn ls_json(h: &Host) -> Vec<serde_json::Value> {
    let out = tcpr(Some(h), &["ls", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the connection on local port 8080 in `h` has received
/// `bytes` more bytes than when called (`ss` bytes_received): the client's
/// stream reaches the new host.
fn wait_received(h: &Host, bytes: u64) {
    let received = || -> Option<u64> {
        let out = h
            .cmd("ss")
            .args(["-Htni", "state", "established", "( sport = :8080 )"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find_map(|f| f.strip_prefix("bytes_received:"))
            .and_then(|v| v.parse().ok())
    };
    let start = received().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while received().unwrap_or(0) < start + bytes {
        assert!(
            Instant::now() < deadline,
            "the stream did not reach the new host"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dual_stack_dump_and_restore() {
    let n = net("ds");
    let img = n.dir.join("c.img");
    let (mut echo, mut peer, fd) = dual_stack_stream(&n);
    let state = n.dir.join("echo-state");
    pause_and_dump(
        &mut echo,
        &fd,
        &img,
        &["--lease", "30", "--blob", state.to_str().unwrap()],
    );
    let v = json(&tcpr(None, &["inspect", "--json", img.to_str().unwrap()]));
    assert_eq!(
        v["local"], MAPPED_LOCAL,
        "the image keeps the mapped address"
    );
    // The owner exits: only the lock keeps the client's segments, which are
    // IPv4, from drawing a RST out of host a.
    echo.kill();
    assert_eq!(locked(&n.a), 1);

    let mut cmd = n.b.cmd(tcpr_bin());
    cmd.args([
        "restore",
        img.to_str().unwrap(),
        "--",
        "python3",
        &py("echo.py"),
    ]);
    let mut restored = Proc::spawn(cmd, "restored echo");
    restored.expect("ready", Duration::from_secs(10));
    let rows = ls_json(&n.b);
    assert!(
        rows.iter().any(|r| r["local"] == MAPPED_LOCAL),
        "restored as the application had it (AF_INET6, mapped): {rows:?}"
    );
    n.a.del_addr(SVC_CIDR).unwrap();
    n.b.add_addr(SVC_CIDR).unwrap();
    let out = tcpr(Some(&n.b), &["announce", "--dev", "eth0", SVC]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_received(&n.b, 200_000);
    assert_all_bytes(&verdict(&mut peer), 200_000);
    restored.kill();
}

/// The agent on `b`, delivering to echo.py.
fn agent(n: &Net, key: &std::path::Path) -> Proc {
    let mut agent = n.b.cmd(tcpr_bin());
    agent.args([
        "agent",
        "--listen",
        "10.66.0.3:7070",
        "--psk-file",
        key.to_str().unwrap(),
        "--allow",
        "[::]:8080",
        // A port-wide entry never lets a sender move an address here: the
        // service address is named as itself for --move-address.
        "--allow",
        "10.66.0.100:8080",
        "--exec",
        &format!("python3 {} --no-control", py("echo.py")),
    ]);
    let mut agent = Proc::spawn(agent, "agent");
    agent.expect("tcpr agent listening", Duration::from_secs(10));
    agent
}

/// Moves echo.py's connection to the agent with `tcpr migrate` run in `a`
/// (`select` and `switch` arguments appended) and checks every byte.
fn migrate_through_agent(tag: &str, select: impl Fn(&Net, &Proc) -> Vec<String>) {
    let n = net(tag);
    let key = n.dir.join("psk");
    std::fs::write(&key, "a shared secret for the dual-stack tests\n").unwrap();
    let mut agent = agent(&n, &key);
    let (mut echo, mut peer, _fd) = dual_stack_stream(&n);
    echo.send("flush");
    echo.expect("paused", Duration::from_secs(10));
    let mut args: Vec<String> = [
        "migrate",
        "--to",
        "10.66.0.3:7070",
        "--psk-file",
        key.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(select(&n, &echo));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tcpr(Some(&n.a), &args);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && summary.contains("moved 1, rolled back 0, unknown 0"),
        "{summary}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.expect("ready 3", Duration::from_secs(10));
    echo.kill();
    let rows = ls_json(&n.b);
    assert!(
        rows.iter().any(|r| r["local"] == MAPPED_LOCAL),
        "delivered as the application had it: {rows:?}"
    );
    wait_received(&n.b, 200_000);
    assert_all_bytes(&verdict(&mut peer), 200_000);
}

#[test]
fn dual_stack_migrate_local_with_a_steering_hook() {
    // Selected by the address as clients know it (IPv4); the hook moves
    // the address with `ip` and announces it.
    migrate_through_agent("dl", |n, _| {
        let (a, b) = (&n.a.netns, &n.b.netns);
        let tcpr = tcpr_bin();
        vec![
            "--local".into(),
            format!("{SVC}:8080"),
            "--switch-cmd".into(),
            format!(
                "ip -n {a} addr del {SVC_CIDR} dev eth0 && ip -n {b} addr add {SVC_CIDR} dev eth0 \
                 && ip netns exec {b} {tcpr} announce --dev eth0 {SVC}"
            ),
            "--unswitch-cmd".into(),
            format!(
                "ip -n {b} addr del {SVC_CIDR} dev eth0; ip -n {a} addr add {SVC_CIDR} dev eth0"
            ),
        ]
    });
}

#[test]
fn dual_stack_migrate_pid_with_its_address() {
    migrate_through_agent("dp", |_, echo| {
        vec![
            "--pid".into(),
            echo.pid().to_string(),
            "--move-address".into(),
        ]
    });
}
