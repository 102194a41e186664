//! The agent's backend side for servers that know nothing of tcpr:
//! `--forward HOST:PORT [--proxy-protocol v1|v2]` relays each delivered
//! connection to a local server (splice), after a PROXY header naming the
//! real client; `--vip ADDR` prepares a direct-server-return backend (the
//! VIP on lo, ARP suppressed) and undoes it on exit.

mod agent_net;
mod common;
use agent_net::*;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes each way.
const STREAM_BYTES: usize = 8 << 20 | 12_345;
/// What the server writes after reading the client's end: the client must
/// still read it (its FIN closed one direction only).
const AFTER_EOF: &str = "written after the client's FIN";

/// The server behind --forward: skips connections that close empty (the
/// agent's reachability probes), reads the PROXY header (v1 or v2) of the
/// first real one, echoes everything until the client's end of stream,
/// writes AFTER_EOF, ends its own stream, and prints what it saw.
const SERVER: &str = r#"
import hashlib, json, socket, struct, sys
port, version, after = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port))
l.listen(16)
print("listening", flush=True)
def exact(c, n):
    b = b""
    while len(b) < n:
        more = c.recv(n - len(b))
        if not more:
            return None
        b += more
    return b
while True:
    c, _ = l.accept()
    if version == "v1":
        line = b""
        while not line.endswith(b"\r\n"):
            ch = c.recv(1)
            if not ch:
                break
            line += ch
        if not line:
            c.close(); continue
        parts = line.decode().split()
        assert parts[0] == "PROXY", line
        hdr = {"proto": parts[1], "src": "%s:%s" % (parts[2], parts[4]), "dst": "%s:%s" % (parts[3], parts[5])}
    else:
        head = exact(c, 16)
        if head is None:
            c.close(); continue
        assert head[:12] == b"\r\n\r\n\x00\r\nQUIT\n", head
        assert head[12] == 0x21, head
        fam, length = head[13], struct.unpack("!H", head[14:16])[0]
        body = exact(c, length)
        assert fam == 0x11 and length == 12, (fam, length)
        src, dst = socket.inet_ntoa(body[0:4]), socket.inet_ntoa(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
        hdr = {"proto": "TCP4", "src": "%s:%d" % (src, sport), "dst": "%s:%d" % (dst, dport)}
    h = hashlib.sha256()
    n = 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        h.update(b)
        n += len(b)
        c.sendall(b)
    c.sendall(after)
    c.shutdown(socket.SHUT_WR)
    rest = c.recv(1)
    c.close()
    hdr.update({"echoed": n, "sha256": h.hexdigest(), "closed_after": rest == b""})
    print(json.dumps(hdr), flush=True)
    break
"#;

/// The service on host a: accepts one connection and never reads it, so
/// what the client sends waits in its queues and travels in the image.
const HOLDER: &str = r#"
import socket, sys, time
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2])))
l.listen(1)
print("listening", flush=True)
c, peer = l.accept()
print("accepted %s:%d" % peer, flush=True)
time.sleep(3600)
"#;

/// The client: sends STREAM_BYTES of random data, ends its stream, and
/// reads until the server's end; prints the comparison.
const CLIENT: &str = r#"
import hashlib, json, os, socket, sys, threading
host, port, n, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
c = socket.create_connection((host, port))
c.settimeout(120)
print("connected %s:%d" % c.getsockname(), flush=True)
data = os.urandom(n)
def send():
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send)
t.start()
got = bytearray()
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    got += b
t.join()
print(json.dumps({"sent": n, "received": len(got),
    "echo_intact": bytes(got[:n]) == data,
    "after_eof": bytes(got[n:]) == after,
    "sha256": hashlib.sha256(data).hexdigest()}), flush=True)
"#;

fn forwarded_stream(tag: &str, n: u8, version: &str) {
    let net = Net::new(tag, n);
    let server_port = "9000";
    let mut server = {
        let mut c = net.b.cmd("python3");
        c.args(["-c", SERVER, server_port, version, AFTER_EOF]);
        Proc::spawn(c, "server")
    };
    server.expect("listening", Duration::from_secs(10));
    let _agent = net.agent(
        &[
            "--forward",
            &format!("127.0.0.1:{server_port}"),
            "--proxy-protocol",
            version,
            "--allow",
            &net.svc_port(8080),
        ],
        None,
    );
    let mut holder = {
        let mut c = net.a.cmd("python3");
        c.args(["-c", HOLDER, &net.svc(), "8080"]);
        Proc::spawn(c, "holder")
    };
    holder.expect("listening", Duration::from_secs(10));
    let mut client = {
        let mut c = net.c.cmd("python3");
        c.args([
            "-c",
            CLIENT,
            &net.svc(),
            "8080",
            &STREAM_BYTES.to_string(),
            AFTER_EOF,
        ]);
        Proc::spawn(c, "client")
    };
    let client_addr = client
        .expect("connected", Duration::from_secs(10))
        .trim_start_matches("connected ")
        .to_string();
    holder.expect("accepted", Duration::from_secs(10));
    let out = net.migrate(holder.pid(), &[]);
    assert_moved(&out);
    let seen: serde_json::Value =
        serde_json::from_str(&server.expect("{", Duration::from_secs(120))).unwrap();
    let done: serde_json::Value =
        serde_json::from_str(&client.expect("{", Duration::from_secs(120))).unwrap();
    // The PROXY header names the real client and the address it reached.
    assert_eq!(seen["proto"], "TCP4");
    assert_eq!(seen["src"], client_addr.as_str());
    assert_eq!(seen["dst"], net.svc_port(8080).as_str());
    // Every byte both ways, and each half-close passed on: the server saw
    // the client's end after all its bytes, wrote on, and the client read
    // that and then the server's end.
    assert_eq!(seen["echoed"], STREAM_BYTES);
    assert_eq!(seen["sha256"], done["sha256"]);
    assert_eq!(done["received"], STREAM_BYTES + AFTER_EOF.len());
    assert_eq!(done["echo_intact"], true);
    assert_eq!(done["after_eof"], true);
    assert_eq!(seen["closed_after"], true);
}

#[test]
fn a_forwarded_connection_carries_a_proxy_v2_header_and_both_streams() {
    forwarded_stream("fw2", 81, "v2");
}

#[test]
fn a_forwarded_connection_carries_a_proxy_v1_header_and_both_streams() {
    forwarded_stream("fw1", 82, "v1");
}

/// A server that is not there: the agent does not start; one that goes
/// away after the start: the batch is refused before READY and the
/// connection stays where it was.
#[test]
fn a_forward_target_that_refuses_is_caught_before_the_commit() {
    let net = Net::new("fwr", 83);
    let out = Command::new("ip")
        .args(["netns", "exec", &net.b.netns, tcpr_bin()])
        .args(["agent", "--listen", &net.agent_addr(), "--psk-file"])
        .arg(&net.key)
        .args(["--no-journal", "--allow", &net.svc_port(8080)])
        .args(["--forward", "127.0.0.1:9001"])
        .output()
        .unwrap();
    assert_clean_failure(&out, "does not accept connections");

    let mut server = {
        let mut c = net.b.cmd("python3");
        c.args(["-c", SERVER, "9001", "v1", AFTER_EOF]);
        Proc::spawn(c, "server")
    };
    server.expect("listening", Duration::from_secs(10));
    let _agent = net.agent(
        &[
            "--forward",
            "127.0.0.1:9001",
            "--allow",
            &net.svc_port(8080),
        ],
        None,
    );
    server.kill();
    let (mut echo, mut peer) = net.stream();
    let out = net.migrate(echo.pid(), &[]);
    assert_rolled_back(&out, "does not accept connections");
    echo.send("resume");
    echo.expect("resumed", Duration::from_secs(10));
    wait_echoes(&mut peer, 100_000);
    assert_all_bytes(&verdict(&mut peer), 100_000);
}

fn lo_addrs(h: &tcpr_netlab::Host) -> String {
    String::from_utf8_lossy(&h.ip(&["-o", "addr", "show", "dev", "lo"]).unwrap().stdout)
        .into_owned()
}

fn sysctl(h: &tcpr_netlab::Host, name: &str) -> String {
    let out = h.cmd("sysctl").args(["-n", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `--vip`: the VIPs on lo (/32 and /128), ARP suppressed, all undone
/// when the agent is stopped by SIGTERM; a VIP already on a link is
/// refused with nothing changed.
#[test]
fn vips_go_on_lo_with_arp_suppressed_and_are_undone_on_exit() {
    let net = Net::new("vip", 84);
    let vip4 = format!("10.{}.0.200", net.n);
    let vip6 = format!("fd00:{}::200", net.n);
    let before = (
        lo_addrs(&net.b),
        sysctl(&net.b, "net.ipv4.conf.all.arp_ignore"),
        sysctl(&net.b, "net.ipv4.conf.all.arp_announce"),
    );
    assert!(!before.0.contains(&vip4));
    assert_eq!((before.1.as_str(), before.2.as_str()), ("0", "0"));

    // A VIP that is on eth0 (the agent host's own address here).
    let on_link = format!("10.{}.0.3", net.n);
    let out = net
        .agent_cmd(&["--exec", "cat", "--vip", &vip4, "--vip", &on_link])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_clean_failure(&out, "not the loopback");
    assert_eq!(lo_addrs(&net.b), before.0, "nothing added");
    assert_eq!(sysctl(&net.b, "net.ipv4.conf.all.arp_ignore"), "0");

    let agent = net.agent(&["--exec", "cat", "--vip", &vip4, "--vip", &vip6], None);
    let lo = lo_addrs(&net.b);
    assert!(lo.contains(&format!("{vip4}/32")), "{lo}");
    assert!(lo.contains(&format!("{vip6}/128")), "{lo}");
    assert_eq!(sysctl(&net.b, "net.ipv4.conf.all.arp_ignore"), "1");
    assert_eq!(sysctl(&net.b, "net.ipv4.conf.all.arp_announce"), "2");
    // The host does not answer ARP for the VIP: the client cannot reach it.
    let arping = net
        .c
        .cmd("python3")
        .args([
            "-c",
            "import socket,sys\ns=socket.socket()\ns.settimeout(3)\ntry:\n s.connect((sys.argv[1], 7))\n print('reached')\nexcept Exception as e:\n print('unreachable', type(e).__name__)",
            &vip4,
        ])
        .output()
        .unwrap();
    let arping = String::from_utf8_lossy(&arping.stdout);
    assert!(arping.starts_with("unreachable"), "{arping}");

    let pid = agent.pid().to_string();
    let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(st.success());
    let mut agent = agent;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = agent.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not stop on SIGTERM"
        );
        std::thread::sleep(POLL);
    };
    assert!(status.success(), "{status}");
    assert_eq!(lo_addrs(&net.b), before.0, "the VIPs are gone");
    assert_eq!(sysctl(&net.b, "net.ipv4.conf.all.arp_ignore"), before.1);
    assert_eq!(sysctl(&net.b, "net.ipv4.conf.all.arp_announce"), before.2);
}

fn link_bytes(h: &tcpr_netlab::Host, dir: &str) -> u64 {
    let out = h
        .cmd("cat")
        .arg(format!("/sys/class/net/eth0/statistics/{dir}_bytes"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The whole backend side of direct server return: the service address
/// of host a is the VIP; the agent on b holds it on lo (`--vip`), restores
/// the connection with the VIP as its local address, and forwards it to
/// its server with the PROXY header. The switch between READY and COMMIT
/// is a steering entry on a (the nf_tables datapath, added by the
/// migrate's switch hook): after it the client's packets cross a's link to
/// b without reaching a's stack, and b answers the client directly, so a
/// carries the upload but not the echo.
#[test]
fn a_connection_to_the_vip_is_steered_to_a_vip_agent_and_forwarded() {
    let net = Net::new("dsr", 85);
    let vip = net.svc();
    let backend = format!("10.{}.0.3", net.n);
    let mut server = {
        let mut c = net.b.cmd("python3");
        c.args(["-c", SERVER, "9002", "v1", AFTER_EOF]);
        Proc::spawn(c, "server")
    };
    server.expect("listening", Duration::from_secs(10));
    let _agent = net.agent(
        &[
            "--forward",
            "127.0.0.1:9002",
            "--proxy-protocol",
            "v1",
            "--vip",
            &vip,
        ],
        None,
    );
    let steering = net
        .a
        .within(|| {
            tcpr_steer::NftSteering::install(tcpr_steer::NftConfig::new("eth0")).map_err(Into::into)
        })
        .unwrap();
    let mut holder = {
        let mut c = net.a.cmd("python3");
        c.args(["-c", HOLDER, &vip, "8080"]);
        Proc::spawn(c, "holder")
    };
    holder.expect("listening", Duration::from_secs(10));
    let mut client = {
        let mut c = net.c.cmd("python3");
        c.args([
            "-c",
            CLIENT,
            &vip,
            "8080",
            &STREAM_BYTES.to_string(),
            AFTER_EOF,
        ]);
        Proc::spawn(c, "client")
    };
    let client_addr = client
        .expect("connected", Duration::from_secs(10))
        .trim_start_matches("connected ")
        .to_string();
    holder.expect("accepted", Duration::from_secs(10));
    let (client_ip, client_port) = client_addr.split_once(':').unwrap();
    // The hook a balancer's `Steering::steer` stands for, as nft commands.
    let table = "netdev tcpr_steer";
    let switch = format!(
        "nft add element {table} backends4 '{{ 0x1 : {backend} }}' && \
         nft add element {table} flows4 '{{ {client_ip} . {client_port} . {vip} . 8080 timeout 1h expires 1h : 0x1 }}'"
    );
    let unswitch = format!(
        "nft delete element {table} flows4 '{{ {client_ip} . {client_port} . {vip} . 8080 }}'"
    );
    let (rx_before, tx_before) = (link_bytes(&net.a, "rx"), link_bytes(&net.a, "tx"));
    let out = net
        .a
        .cmd(tcpr_bin())
        .args(["migrate", "--to", &net.agent_addr(), "--psk-file"])
        .arg(&net.key)
        .args(["--pid", &holder.pid().to_string()])
        .args(["--switch-cmd", &switch, "--unswitch-cmd", &unswitch])
        .output()
        .unwrap();
    assert_moved(&out);
    let client_sa: std::net::SocketAddr = client_addr.parse().unwrap();
    let vip_sa: std::net::SocketAddr = net.svc_port(8080).parse().unwrap();
    assert!(tcpr_steer::NftSteering::is_steered(&steering, client_sa, vip_sa).unwrap());
    let seen: serde_json::Value =
        serde_json::from_str(&server.expect("{", Duration::from_secs(120))).unwrap();
    let done: serde_json::Value =
        serde_json::from_str(&client.expect("{", Duration::from_secs(120))).unwrap();
    assert_eq!(seen["src"], client_addr.as_str());
    assert_eq!(seen["dst"], net.svc_port(8080).as_str(), "the VIP");
    assert_eq!(seen["sha256"], done["sha256"]);
    assert_eq!(done["echo_intact"], true);
    assert_eq!(done["after_eof"], true);
    // a received the upload (and forwarded it), not the echo: with the
    // echo through a, both counters would pass twice the stream.
    let (rx, tx) = (
        link_bytes(&net.a, "rx") - rx_before,
        link_bytes(&net.a, "tx") - tx_before,
    );
    let stream = STREAM_BYTES as u64;
    assert!(
        rx < stream * 3 / 2 && tx < stream * 3 / 2,
        "host a carried rx {rx} tx {tx} bytes for a {stream}-byte echo"
    );
    // The client's FIN, then the linger: the entry goes.
    wait_until("the steering entry to go", Duration::from_secs(30), || {
        !tcpr_steer::NftSteering::is_steered(&steering, client_sa, vip_sa).unwrap()
    });
}

/// The client of a stream the agent dies in the middle of: sends half its
/// data once told ("go", after the move) and reads its echo, says "half",
/// and on "rest" (the agent is dead by then) sends the other half, ends
/// its stream, reads to the server's end and prints the comparison.
const HALVES_CLIENT: &str = r#"
import hashlib, json, os, socket, sys, threading
host, port, n, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
c = socket.create_connection((host, port))
c.settimeout(120)
print("connected %s:%d" % c.getsockname(), flush=True)
data = os.urandom(n)
half = n // 2
sys.stdin.readline()
c.sendall(data[:half])
got = bytearray()
while len(got) < half:
    b = c.recv(1 << 16)
    if not b:
        break
    got += b
print("half %d" % len(got), flush=True)
sys.stdin.readline()
def send():
    c.sendall(data[half:])
    c.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send)
t.start()
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    got += b
t.join()
print(json.dumps({"sent": n, "received": len(got),
    "echo_intact": bytes(got[:n]) == data,
    "after_eof": bytes(got[n:]) == after,
    "sha256": hashlib.sha256(data).hexdigest()}), flush=True)
"#;

/// The children of every thread of `pid`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// The agent's relay worker (`tcpr relay-worker`), by its pid: started
/// before the agent says it listens.
/// Looks for a while: a child forked a moment ago may not have exec'd the
/// worker yet (its command line is still the agent's).
fn relay_worker_of(agent: &Proc) -> Option<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = children(agent.pid()).into_iter().find(|&c| {
            std::fs::read(format!("/proc/{c}/cmdline"))
                .is_ok_and(|cmd| cmd.split(|&b| b == 0).any(|arg| arg == b"relay-worker"))
        });
        if found.is_some() || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(POLL);
    }
}

/// Whether `pid` runs (a zombie has ended).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// The agent is SIGKILLed while it relays a stream both ways: the relay
/// lives in its relay worker, so the stream carries on to its end, every
/// byte checked both ways; once it ends, the worker exits.
#[test]
fn an_agent_killed_mid_stream_leaves_the_forwarded_stream_whole() {
    let net = Net::new("fwk", 86);
    let mut server = {
        let mut c = net.b.cmd("python3");
        c.args(["-c", SERVER, "9003", "v1", AFTER_EOF]);
        Proc::spawn(c, "server")
    };
    server.expect("listening", Duration::from_secs(10));
    let mut agent = net.agent(
        &[
            "--forward",
            "127.0.0.1:9003",
            "--proxy-protocol",
            "v1",
            "--allow",
            &net.svc_port(8080),
        ],
        None,
    );
    let worker = relay_worker_of(&agent);
    let mut holder = {
        let mut c = net.a.cmd("python3");
        c.args(["-c", HOLDER, &net.svc(), "8080"]);
        Proc::spawn(c, "holder")
    };
    holder.expect("listening", Duration::from_secs(10));
    let mut client = {
        let mut c = net.c.cmd("python3");
        c.args([
            "-c",
            HALVES_CLIENT,
            &net.svc(),
            "8080",
            &STREAM_BYTES.to_string(),
            AFTER_EOF,
        ]);
        Proc::spawn(c, "client")
    };
    client.expect("connected", Duration::from_secs(10));
    holder.expect("accepted", Duration::from_secs(10));
    assert_moved(&net.migrate(holder.pid(), &[]));
    client.send("go");
    let half = client.expect("half", Duration::from_secs(120));
    assert_eq!(half, format!("half {}", STREAM_BYTES / 2));
    // SIGKILL: nothing of the agent runs on.
    agent.kill();
    client.send("rest");
    let seen: serde_json::Value =
        serde_json::from_str(&server.expect("{", Duration::from_secs(120))).unwrap();
    let done: serde_json::Value =
        serde_json::from_str(&client.expect("{", Duration::from_secs(120))).unwrap();
    assert_eq!(seen["echoed"], STREAM_BYTES);
    assert_eq!(seen["sha256"], done["sha256"]);
    assert_eq!(done["received"], STREAM_BYTES + AFTER_EOF.len());
    assert_eq!(done["echo_intact"], true);
    assert_eq!(done["after_eof"], true);
    assert_eq!(seen["closed_after"], true);
    // Its agent gone and its relays over, the worker leaves.
    let worker = worker.expect("the agent's relay worker");
    wait_until("the relay worker to exit", Duration::from_secs(30), || {
        !running(worker)
    });
}

/// An agent that stops (SIGTERM) leaves no relay worker behind when no
/// relay runs.
#[test]
fn the_relay_worker_exits_with_its_agent_when_it_relays_nothing() {
    let net = Net::new("fwx", 87);
    let mut server = {
        let mut c = net.b.cmd("python3");
        c.args(["-c", SERVER, "9004", "v1", AFTER_EOF]);
        Proc::spawn(c, "server")
    };
    server.expect("listening", Duration::from_secs(10));
    let agent = net.agent(
        &[
            "--forward",
            "127.0.0.1:9004",
            "--allow",
            &net.svc_port(8080),
        ],
        None,
    );
    let worker = relay_worker_of(&agent).expect("the agent's relay worker");
    let st = Command::new("kill")
        .args(["-TERM", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    wait_until("the relay worker to exit", Duration::from_secs(30), || {
        !running(worker)
    });
}
