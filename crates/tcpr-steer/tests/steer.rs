//! Both steering datapaths (nf_tables, BPF) against the real kernel: every
//! test runs once for each (`nft::` and `bpf::`). A client, a
//! front host that holds the VIP, and a backend with the VIP on its
//! loopback, on one bridge. The backend listens on the VIP itself; the
//! client connects to the VIP. Unsteered, the SYN would meet the front's
//! stack (no listener: a RST). The datapath never steers a SYN (a new
//! flow is the front's), so a steered flow's handshake reaches the backend
//! by a host route on the client, as if handed off; then the connection
//! runs between client and backend, and the front only forwards the
//! client's packets.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};
use tcpr_netlab::{Host, Lab};
use tcpr_steer::{
    BpfConfig, BpfSteering, NftConfig, NftSteering, SteerError, SteeredFlow, Steering,
};

const VIP4: &str = "10.9.0.100";
const VIP6: &str = "fd00:9::100";
const BACKEND4: &str = "10.9.0.3";
const BACKEND6: &str = "fd00:9::3";
const CLIENT4: &str = "10.9.0.1";
const CLIENT6: &str = "fd00:9::1";
const PORT: u16 = 80;
/// Client ports: distinct per test of this process.
static NEXT_PORT: AtomicU16 = AtomicU16::new(41000);

/// The backend's server: one connection; reads a decimal length line,
/// sends that many random bytes, then reads until the client's end
/// (FIN, or RST), and prints what it sent. With a third argument `first`
/// it sends its FIN before reading the client's (an HTTP server honouring
/// `Connection: close`): the TIME_WAIT is then its own, not the client's.
/// With `slow` it sends in twenty pieces a tenth of a second apart. With
/// `sink` it sends nothing: it reads until the client's FIN (an upload),
/// closes, and prints how much it got and its hash.
const SERVER: &str = r#"
import hashlib, json, os, socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
l = socket.socket(fam, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2])))
l.listen(8)
print("listening", flush=True)
c, peer = l.accept()
if len(sys.argv) > 3 and sys.argv[3] == "sink":
    c.settimeout(60)
    h = hashlib.sha256()
    got = 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        h.update(b)
        got += len(b)
    c.close()
    print(json.dumps({"peer": peer[0], "peer_port": peer[1], "got": got, "sha256": h.hexdigest(), "end": "fin"}), flush=True)
    sys.exit(0)
f = c.makefile("rb")
n = int(f.readline())
h = hashlib.sha256()
left = n
slow = len(sys.argv) > 3 and sys.argv[3] == "slow"
while left:
    b = os.urandom(min(left, n // 20 if slow else 1 << 16))
    c.sendall(b)
    h.update(b)
    left -= len(b)
    if slow:
        time.sleep(0.1)
if len(sys.argv) > 3 and sys.argv[3] == "first":
    c.shutdown(socket.SHUT_WR)
try:
    rest = c.recv(1)
    end = "fin" if rest == b"" else "data"
except ConnectionResetError:
    end = "rst"
print(json.dumps({"peer": peer[0], "peer_port": peer[1], "sent": n, "sha256": h.hexdigest(), "end": end}), flush=True)
"#;

/// The client: connects from a fixed port to the VIP, asks for N bytes,
/// reads them, then closes with a FIN or (`rst`) a RST, or (`eof`) with a
/// FIN once the server's came (the server closed first), or (`half`) sends
/// its FIN right after its request and then reads, or (`hold`) prints
/// `read` and waits for a line on stdin before its FIN; or (`upload`, to a
/// `sink` server) sends N random bytes instead of a request, then its FIN,
/// reads until the server's, and prints what it sent. With a seventh
/// argument `pause` it prints `connected` once connected and waits for a
/// line on stdin before sending its request.
const CLIENT: &str = r#"
import hashlib, json, os, socket, struct, sys
src, sport, vip, port, n, close = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((src, sport))
s.settimeout(30)
s.connect((vip, port))
if len(sys.argv) > 7 and sys.argv[7] == "pause":
    print("connected", flush=True)
    sys.stdin.readline()
if close == "upload":
    h = hashlib.sha256()
    left = n
    while left:
        b = os.urandom(min(left, 1 << 16))
        s.sendall(b)
        h.update(b)
        left -= len(b)
    s.shutdown(socket.SHUT_WR)
    while s.recv(1 << 16):
        pass
    s.close()
    print(json.dumps({"sent": n, "sha256": h.hexdigest()}), flush=True)
    sys.exit(0)
s.sendall(b"%d\n" % n)
if close == "half":
    s.shutdown(socket.SHUT_WR)
h = hashlib.sha256()
got = 0
while got < n:
    b = s.recv(1 << 16)
    if not b:
        break
    h.update(b)
    got += len(b)
if close == "eof":
    while s.recv(1 << 16):
        pass
if close == "hold":
    print("read", flush=True)
    sys.stdin.readline()
if close == "rst":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
print(json.dumps({"got": got, "sha256": h.hexdigest()}), flush=True)
"#;

/// `forge.py`: forges a SYN, a RST and a FIN with a flow's tuple and
/// random sequence numbers (see the script).
fn forger() -> String {
    format!("{}/tests/forge.py", env!("CARGO_MANIFEST_DIR"))
}

/// Which datapath a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Nft,
    Bpf,
}

impl Kind {
    /// A suffix for the lab's name (unique per test).
    fn tag(self) -> &'static str {
        match self {
            Kind::Nft => "n",
            Kind::Bpf => "b",
        }
    }
}

/// The settings both datapaths share.
struct Settings {
    capacity: usize,
    idle: Duration,
    linger: Duration,
}

/// A datapath under test: the trait, whether a flow is steered now, and
/// the entries now (BPF: a sweep now, where `active` may answer from one
/// up to a sweep period old).
trait Datapath: Steering {
    fn is_steered(&self, client: SocketAddr, vip: SocketAddr) -> Result<bool, SteerError>;
    fn entries(&self) -> usize;
}

impl Datapath for NftSteering {
    fn is_steered(&self, client: SocketAddr, vip: SocketAddr) -> Result<bool, SteerError> {
        NftSteering::is_steered(self, client, vip)
    }
    fn entries(&self) -> usize {
        self.active().unwrap()
    }
}

impl Datapath for BpfSteering {
    fn is_steered(&self, client: SocketAddr, vip: SocketAddr) -> Result<bool, SteerError> {
        BpfSteering::is_steered(self, client, vip)
    }
    fn entries(&self) -> usize {
        self.sweep().unwrap()
    }
}

/// Each named test function, taking a [`Kind`], as a test per datapath.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod nft {
            $(#[test]
            fn $name() {
                super::$name(super::Kind::Nft)
            })*
        }
        mod bpf {
            $(#[test]
            fn $name() {
                super::$name(super::Kind::Bpf)
            })*
        }
    };
}

on_both!(
    a_steered_flow_reaches_the_backend_which_answers_directly_ipv4,
    a_steered_flow_reaches_the_backend_which_answers_directly_ipv6,
    an_entry_goes_after_the_clients_rst,
    a_half_closed_client_keeps_its_entry_while_the_server_sends,
    an_upload_through_random_loss_arrives_whole_and_its_fin_ends_the_entry,
    a_reused_tuple_reaches_the_front_not_the_old_backend_ipv4,
    a_reused_tuple_reaches_the_front_not_the_old_backend_ipv6,
    a_new_connection_on_a_live_entrys_tuple_reaches_the_front,
    an_unsteered_flow_meets_the_front,
    idle_and_unsteered_entries_go,
    a_full_table_refuses_with_full,
    nothing_is_left_after_drop,
    flows_it_cannot_steer_are_refused,
    a_batch_is_steered_at_once_and_leaves_no_entry,
    a_batch_is_refused_whole,
);

struct Net {
    _lab: Lab,
    // After the lab: unmounted once its processes are gone.
    pins: tcpr_netlab::balance::PinFs,
    client: Host,
    front: Host,
    backend: Host,
}

fn sh(h: &Host, line: &str) -> String {
    let out = h.cmd("sh").args(["-c", line]).output().unwrap();
    assert!(
        out.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Net {
    fn new(tag: &str) -> Net {
        // The BPF datapath pins itself here, not in the host's
        // /sys/fs/bpf: each test's pins are its own and go with it.
        let pins = tcpr_netlab::balance::PinFs::mount(tag, 0).unwrap();
        let mut lab = Lab::new(tag).unwrap();
        let client = lab
            .host("c", &[&format!("{CLIENT4}/24"), &format!("{CLIENT6}/64")])
            .unwrap();
        let front = lab
            .host(
                "f",
                &[
                    "10.9.0.2/24",
                    &format!("{VIP4}/24"),
                    "fd00:9::2/64",
                    &format!("{VIP6}/64"),
                ],
            )
            .unwrap();
        let backend = lab
            .host("b", &[&format!("{BACKEND4}/24"), &format!("{BACKEND6}/64")])
            .unwrap();
        // Direct server return on the backend: the VIP on lo, never
        // claimed on the link.
        backend
            .ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])
            .unwrap();
        backend
            .ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])
            .unwrap();
        sh(
            &backend,
            "sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
        );
        Net {
            _lab: lab,
            pins,
            client,
            front,
            backend,
        }
    }

    /// The datapath `kind` on the front's eth0, with the defaults changed
    /// by `set`.
    fn steering(&self, kind: Kind, set: impl FnOnce(&mut Settings)) -> Box<dyn Datapath> {
        let mut s = Settings {
            capacity: tcpr_steer::nft::DEFAULT_CAPACITY,
            idle: tcpr_steer::nft::DEFAULT_IDLE,
            linger: tcpr_steer::nft::DEFAULT_LINGER,
        };
        set(&mut s);
        self.front
            .within(|| {
                Ok(match kind {
                    Kind::Nft => Box::new(NftSteering::install(NftConfig {
                        capacity: s.capacity,
                        idle: s.idle,
                        linger: s.linger,
                        ..NftConfig::new("eth0")
                    })?) as Box<dyn Datapath>,
                    Kind::Bpf => Box::new(BpfSteering::install(BpfConfig {
                        capacity: s.capacity,
                        idle: s.idle,
                        linger: s.linger,
                        ..self.bpf_config()
                    })?),
                })
            })
            .unwrap()
    }

    /// The BPF datapath's defaults on the front's eth0, pinned in the
    /// test's own BPF file system.
    fn bpf_config(&self) -> BpfConfig {
        BpfConfig {
            pin_dir: self.pins.pin_dir(),
            ..BpfConfig::new("eth0")
        }
    }

    /// TCP segments the front's own stack received (IPv4 and IPv6 share
    /// the TCP MIB).
    fn front_tcp_in(&self) -> u64 {
        let snmp = sh(&self.front, "cat /proc/net/snmp");
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
        let i = names
            .split_whitespace()
            .position(|n| n == "InSegs")
            .unwrap();
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    }

    fn front_bytes(&self, dir: &str) -> u64 {
        sh(
            &self.front,
            &format!("cat /sys/class/net/eth0/statistics/{dir}_bytes"),
        )
        .trim()
        .parse()
        .unwrap()
    }

    /// Drops `percent` % of the client's TCP packets to `vip` port 80, at
    /// random, on the wire: in the switch, as they come in from the
    /// client's port (`p1`, the lab's first host). Lost there, not on the
    /// client (whose output hooks fail the send instead: its TCP mostly
    /// sends the segment again at once, which leaves no hole), they reach
    /// neither the front nor the backend, and the client's TCP must find
    /// out and retransmit.
    fn lose_on_the_way_to_the_front(&self, vip: &str, percent: u32) {
        let ip = if vip.contains(':') { "ip6" } else { "ip" };
        let script = format!(
            "add table netdev loss
add chain netdev loss in {{ type filter hook ingress device \"p1\" priority 0; policy accept; }}
add rule netdev loss in {ip} daddr {vip} tcp dport {PORT} numgen random mod 100 < {percent} counter drop
"
        );
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.switch(), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(nft.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
        let out = nft.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The packets [`Net::lose_on_the_way_to_the_front`] dropped so far.
    fn lost_on_the_way_to_the_front(&self) -> u64 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.switch(),
                "nft",
                "-j",
                "list",
                "table",
                "netdev",
                "loss",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        let table: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        table["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("rule"))
            .flat_map(|r| r["expr"].as_array().unwrap())
            .filter_map(|e| e.get("counter"))
            .map(|c| c["packets"].as_u64().unwrap())
            .sum()
    }

    /// The switch's namespace: the lab's hosts' names end in their own
    /// (`-c` for the client), the switch's in `-sw`.
    fn switch(&self) -> String {
        let prefix = self.client.netns.strip_suffix("-c").unwrap();
        format!("{prefix}-sw")
    }

    /// A kernel counter (`nstat` name) in `host`'s namespace.
    fn counter(host: &Host, name: &str) -> u64 {
        let out = sh(host, &format!("nstat -asz {name}"));
        out.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(name)).then(|| w.next().unwrap().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    }

    fn server(&self, vip: &str) -> std::process::Child {
        serve(&self.backend, vip, "last")
    }

    fn client(&self, src: &str, sport: u16, vip: &str, n: u64, close: &str) -> Command {
        let mut c = self.client.cmd("python3");
        c.args([
            "-c",
            CLIENT,
            src,
            &sport.to_string(),
            vip,
            &PORT.to_string(),
            &n.to_string(),
            close,
        ]);
        c
    }
}

/// The test server on `host`, listening on `vip`; `close` is `first` for
/// a server that sends its FIN first.
fn serve(host: &Host, vip: &str, close: &str) -> std::process::Child {
    let mut c = host
        .cmd("python3")
        .args(["-c", SERVER, vip, &PORT.to_string(), close])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(c.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "listening");
    c
}

/// Runs the client on a flow whose handshake the backend answered itself,
/// as after a handoff (the datapath never steers a SYN: a tuple in a SYN
/// is a new flow, the front's): the client reaches the VIP through the
/// backend (a host route) until it is connected, then through the front
/// again, whose datapath steers the rest of the flow.
fn handed_off_client(
    net: &Net,
    src: &str,
    sport: u16,
    (vip, backend): (&str, &str),
    n: u64,
    close: &str,
) -> std::process::Output {
    handed_off_client_then(net, src, sport, (vip, backend), n, close, || {})
}

/// [`handed_off_client`], running `once_connected` after the handshake
/// (the route through the backend gone) and before the client goes on.
fn handed_off_client_then(
    net: &Net,
    src: &str,
    sport: u16,
    (vip, backend): (&str, &str),
    n: u64,
    close: &str,
    once_connected: impl FnOnce(),
) -> std::process::Output {
    let host_prefix = if vip.contains(':') { 128 } else { 32 };
    let route = format!("{vip}/{host_prefix}");
    net.client
        .ip(&["route", "replace", &route, "via", backend, "dev", "eth0"])
        .unwrap();
    let mut child = net
        .client(src, sport, vip, n, close)
        .arg("pause")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    net.client.ip(&["route", "del", &route]).unwrap();
    assert_eq!(line.trim(), "connected");
    once_connected();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
    child.wait_with_output().unwrap()
}

/// The IPv4 addresses of a flow: client, VIP, backend.
const FLOW4: (&str, &str, &str) = (CLIENT4, VIP4, BACKEND4);

/// An `n`-byte download from `server` on the backend to the client at
/// `addrs.0` from `sport`, handed off (see [`handed_off_client`]), ended
/// by the client as `close` says: every byte arrives, in order. What the
/// server printed.
fn download(
    net: &Net,
    (client, vip, backend): (&str, &str, &str),
    sport: u16,
    server: std::process::Child,
    n: u64,
    close: &str,
) -> serde_json::Value {
    let out = handed_off_client(net, client, sport, (vip, backend), n, close);
    downloaded(out, server, n, "the download")
}

/// Checks a finished download (`out`, the client's output) of `n` bytes
/// from `server` (`what` names it in a failure): the client succeeded
/// and got every byte the server sent, in order. What the server printed.
fn downloaded(
    out: std::process::Output,
    server: std::process::Child,
    n: u64,
    what: &str,
) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = json_line(&out.stdout);
    let sent = json_line(&server.wait_with_output().unwrap().stdout);
    assert_eq!(got["got"], n);
    assert_eq!(got["sha256"], sent["sha256"], "every byte, in order");
    sent
}

/// Fails the test, with the client's output, unless the client (IPv6 when
/// `v6`) succeeded.
fn succeeded(out: &std::process::Output, v6: bool) {
    assert!(
        out.status.success(),
        "v6 {v6}: {:?} {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

fn json_line(out: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(out);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn flow(client: &str, sport: u16, vip: &str, backend: &str) -> SteeredFlow {
    let sa = |ip: &str, port: u16| SocketAddr::new(ip.parse().unwrap(), port);
    SteeredFlow {
        client: sa(client, sport),
        vip: sa(vip, PORT),
        backend: backend.parse().unwrap(),
        client_seq: None,
    }
}

/// Polls `cond` every few ms until true, failing after `limit` (a bound
/// against hanging, not a timing claim).
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A lab whose front steers one flow, from a fresh client port to the VIP,
/// to the backend, with a 300 ms linger: the lab, the datapath, the flow,
/// its (client, VIP, backend) addresses and the client's port.
type OneFlow = (
    Net,
    Box<dyn Datapath>,
    SteeredFlow,
    (&'static str, &'static str, &'static str),
    u16,
);

fn one_steered_flow(kind: Kind, tag: &str, v6: bool) -> OneFlow {
    let net = Net::new(&format!("{tag}{}", kind.tag()));
    let addrs = if v6 {
        (CLIENT6, VIP6, BACKEND6)
    } else {
        (CLIENT4, VIP4, BACKEND4)
    };
    let steering = net.steering(kind, |s| s.linger = Duration::from_millis(300));
    let sport = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let f = flow(addrs.0, sport, addrs.1, addrs.2);
    steering.steer(&f).unwrap();
    (net, steering, f, addrs, sport)
}

/// A download of 8 MiB through the VIP (the handshake as if handed off),
/// and the client's FIN or RST. Checks: every byte arrives (hash), the
/// front's stack never saw a
/// segment, the front's interface carried a small fraction of the bytes
/// (only the client's packets, forwarded), and the entry goes after the
/// client's end plus the linger, not before it was used.
fn steered_download(kind: Kind, v6: bool, close: &str) {
    let (net, steering, f, (client, vip, backend), sport) =
        one_steered_flow(kind, if v6 { "s6" } else { "s4" }, v6);
    assert!(steering.is_steered(f.client, f.vip).unwrap());
    assert_eq!(steering.entries(), 1);

    let server = net.server(vip);
    let (in_before, tx_before, rx_before) = (
        net.front_tcp_in(),
        net.front_bytes("tx"),
        net.front_bytes("rx"),
    );
    const N: u64 = 8 << 20;
    let sent = download(&net, (client, vip, backend), sport, server, N, close);
    assert_eq!(sent["peer"], client, "the backend saw the client itself");
    assert_eq!(sent["peer_port"], sport);
    assert_eq!(sent["end"], if close == "rst" { "rst" } else { "fin" });
    assert_eq!(
        net.front_tcp_in() - in_before,
        0,
        "the front's TCP stack received none of the flow's segments"
    );
    let (tx, rx) = (
        net.front_bytes("tx") - tx_before,
        net.front_bytes("rx") - rx_before,
    );
    assert!(
        tx < N / 8 && rx < N / 8,
        "the front carried only the client's packets: tx {tx} rx {rx} of a {N}-byte download"
    );
    // The client's FIN or RST cut the entry to the linger (the idle
    // timeout is an hour).
    let start = Instant::now();
    while steering.is_steered(f.client, f.vip).unwrap() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the entry did not go after the client's end"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(steering.entries(), 0);
}

fn a_steered_flow_reaches_the_backend_which_answers_directly_ipv4(kind: Kind) {
    steered_download(kind, false, "fin");
}

fn a_steered_flow_reaches_the_backend_which_answers_directly_ipv6(kind: Kind) {
    steered_download(kind, true, "fin");
}

fn an_entry_goes_after_the_clients_rst(kind: Kind) {
    steered_download(kind, false, "rst");
}

/// A client that half-closes (its FIN right after its request) and then
/// receives for much longer than the linger: its ACKs keep the entry, so
/// every byte arrives; once the flow is silent the entry goes. With an
/// entry cut to the linger at the FIN and never renewed, the client's ACKs
/// reached the front's stack after 300 ms and it reset the connection
/// (`ConnectionResetError` in the client). A half-closed flow silent for
/// longer than the linger still loses its entry: the front sees only the
/// client's packets, so it cannot tell such a flow from one that ended.
fn a_half_closed_client_keeps_its_entry_while_the_server_sends(kind: Kind) {
    for v6 in [false, true] {
        let (net, steering, f, (client, vip, backend), sport) =
            one_steered_flow(kind, if v6 { "h6" } else { "h4" }, v6);
        let server = serve(&net.backend, vip, "slow");
        let in_before = net.front_tcp_in();
        // Twenty pieces a tenth of a second apart: about 2 s, against a
        // 300 ms linger (the client's ACKs come at most ~0.1 s apart).
        const N: u64 = 8 << 20;
        let out = handed_off_client(&net, client, sport, (vip, backend), N, "half");
        succeeded(&out, v6);
        let got = json_line(&out.stdout);
        let sent = json_line(&server.wait_with_output().unwrap().stdout);
        assert_eq!(got["got"], N, "v6 {v6}");
        assert_eq!(
            got["sha256"], sent["sha256"],
            "v6 {v6}: every byte, in order"
        );
        assert_eq!(sent["end"], "fin", "v6 {v6}");
        assert_eq!(
            net.front_tcp_in() - in_before,
            0,
            "v6 {v6}: the front's TCP stack received none of the flow's segments"
        );
        wait_for("the entry to go", Duration::from_secs(20), || {
            !steering.is_steered(f.client, f.vip).unwrap()
        });
        assert_eq!(steering.entries(), 0, "v6 {v6}");
    }
}

/// A client uploads 64 MiB of random bytes to the backend through the
/// front (IPv4, then IPv6), 2% of its packets (a segment each) lost at
/// random in the switch on the way to the front: its TCP retransmits, and the front sees holes and segments
/// out of order (the backend's out-of-order queue took some). Every byte
/// arrives, in order (the hashes of what was sent and received), none of
/// them at the front's stack; then the client's FIN, at a sequence number
/// 64 MiB past the flow's first packet, ends the entry within a few
/// seconds (a 300 ms linger; the idle timeout is an hour). On BPF that
/// proves the entry's sequence tracking followed the flow through the
/// loss: one that lost it (a segment past a hole not moving it on, say)
/// takes the FIN for a forgery, out of sequence, and keeps the entry for
/// the hour.
fn an_upload_through_random_loss_arrives_whole_and_its_fin_ends_the_entry(kind: Kind) {
    for v6 in [false, true] {
        let (net, steering, f, (client, vip, backend), sport) =
            one_steered_flow(kind, if v6 { "l6" } else { "l4" }, v6);
        let server = serve(&net.backend, vip, "sink");
        let in_before = net.front_tcp_in();
        const N: u64 = 64 << 20;
        let start = Instant::now();
        // One segment a packet (no GSO aggregate of up to 64 KiB): a loss
        // is a segment's, as on a real link, and the holes are many.
        net.client
            .ip(&["link", "set", "dev", "eth0", "gso_max_segs", "1"])
            .unwrap();
        // The loss once connected: the handshake (through the backend)
        // goes without it.
        let out = handed_off_client_then(&net, client, sport, (vip, backend), N, "upload", || {
            net.lose_on_the_way_to_the_front(vip, 2)
        });
        let took = start.elapsed();
        succeeded(&out, v6);
        let sent = json_line(&out.stdout);
        let got = json_line(&server.wait_with_output().unwrap().stdout);
        assert_eq!(sent["sent"], N, "v6 {v6}");
        assert_eq!(got["got"], N, "v6 {v6}: every byte");
        assert_eq!(
            got["sha256"], sent["sha256"],
            "v6 {v6}: every byte, in order"
        );
        assert_eq!(got["peer"], client, "v6 {v6}");
        assert_eq!(got["peer_port"], sport, "v6 {v6}");
        let lost = net.lost_on_the_way_to_the_front();
        let retransmitted = Net::counter(&net.client, "TcpRetransSegs");
        let out_of_order = Net::counter(&net.backend, "TcpExtTCPOFOQueue");
        println!(
            "{kind:?} v6 {v6}: {N} bytes in {took:?}; {lost} packets lost, \
             {retransmitted} segments retransmitted, {out_of_order} queued out of order"
        );
        assert!(lost > 0, "v6 {v6}: nothing was lost");
        assert!(
            retransmitted > 0,
            "v6 {v6}: the client retransmitted nothing"
        );
        assert!(
            out_of_order > 0,
            "v6 {v6}: no segment came out of order (no hole)"
        );
        assert_eq!(
            net.front_tcp_in() - in_before,
            0,
            "v6 {v6}: the front's TCP stack received none of the flow's segments"
        );
        wait_for(
            &format!("the entry to go after the client's FIN (v6 {v6})"),
            Duration::from_secs(5),
            || !steering.is_steered(f.client, f.vip).unwrap(),
        );
        assert_eq!(steering.entries(), 0, "v6 {v6}");
    }
}

/// A client reuses its tuple right after a steered flow the backend closed
/// first (no TIME_WAIT on the client, as behind an HTTP server honouring
/// `Connection: close`), while the old entry still lingers. The new SYN
/// must reach the front's stack (here a server of its own on the VIP), not
/// the backend (no listener, the old flow's TIME_WAIT: a RST), and the
/// stale entry must not steer the new flow's later packets either: every
/// byte of the second download comes from the front's server.
fn reused_tuple_reaches_the_front(kind: Kind, v6: bool) {
    let net = Net::new(&format!("{}{}", if v6 { "r6" } else { "r4" }, kind.tag()));
    let (client, vip, backend) = if v6 {
        (CLIENT6, VIP6, BACKEND6)
    } else {
        (CLIENT4, VIP4, BACKEND4)
    };
    // Far longer than the test: the old entry is surely still there when
    // the tuple is reused.
    let steering = net.steering(kind, |s| s.linger = Duration::from_secs(600));
    let sport = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let f = flow(client, sport, vip, backend);
    steering.steer(&f).unwrap();
    const N: u64 = 1 << 20;
    let download = |server: std::process::Child, from: &str, handed_off: bool| {
        let out = if handed_off {
            handed_off_client(&net, client, sport, (vip, backend), N, "eof")
        } else {
            net.client(client, sport, vip, N, "fin").output().unwrap()
        };
        let sent = downloaded(out, server, N, &format!("the download from the {from}"));
        assert_eq!(sent["peer"], client);
        assert_eq!(sent["peer_port"], sport);
    };
    download(serve(&net.backend, vip, "first"), "backend", true);
    // The client's socket goes once the backend ACKed its FIN (LAST_ACK,
    // then closed: no TIME_WAIT); until then the tuple is taken.
    wait_for(
        "the client's old socket to go",
        Duration::from_secs(20),
        || {
            sh(&net.client, &format!("ss -Htan 'sport = :{sport}'"))
                .trim()
                .is_empty()
        },
    );
    assert!(
        steering.is_steered(f.client, f.vip).unwrap(),
        "the old entry lingers"
    );
    let before = net.front_tcp_in();
    download(serve(&net.front, vip, "last"), "front (same tuple)", false);
    assert!(net.front_tcp_in() > before, "the front's stack took it");
    assert!(
        !steering.is_steered(f.client, f.vip).unwrap(),
        "the SYN removed the stale entry"
    );
}

fn a_reused_tuple_reaches_the_front_not_the_old_backend_ipv4(kind: Kind) {
    reused_tuple_reaches_the_front(kind, false);
}

fn a_reused_tuple_reaches_the_front_not_the_old_backend_ipv6(kind: Kind) {
    reused_tuple_reaches_the_front(kind, true);
}

/// A SYN, a RST and a FIN forged with a live steered flow's tuple (and
/// sequence numbers guessed, not known) leave it steered and working: the
/// SYN reaches the front's stack (whose SYN-ACK the flow's client answers
/// for the live flow, which goes on to the backend), the RST and FIN do
/// not end the entry, though the flow then stays silent for longer than
/// the linger; the client's real FIN, in sequence, does. Before, the SYN
/// removed the entry and the RST or FIN cut it to the linger: one forged
/// packet reset the connection (its next packet met the front's stack).
/// BPF only: nf_tables' packet path cannot compare sequence numbers.
fn forged_packets_do_not_end_a_live_flow(v6: bool) {
    let (net, steering, f, (client, vip, backend), sport) =
        one_steered_flow(Kind::Bpf, if v6 { "fg6" } else { "fg4" }, v6);
    const N: u64 = 1 << 20;
    let server = serve(&net.backend, vip, "last");
    let host_prefix = if v6 { 128 } else { 32 };
    let route = format!("{vip}/{host_prefix}");
    // The handshake with the backend, as after a handoff.
    net.client
        .ip(&["route", "replace", &route, "via", backend, "dev", "eth0"])
        .unwrap();
    let mut child = net
        .client(client, sport, vip, N, "hold")
        .arg("pause")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut next_line = |want: &str| {
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), want);
    };
    next_line("connected");
    net.client.ip(&["route", "del", &route]).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    // The whole download through the front's datapath: the entry knows
    // the client's sequence from its ACKs.
    next_line("read");
    let before = net.front_tcp_in();
    let forged = net
        .client
        .cmd("python3")
        .args([
            &forger(),
            client,
            &sport.to_string(),
            vip,
            &PORT.to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&forged.stdout).trim(),
        "forged",
        "{}",
        String::from_utf8_lossy(&forged.stderr)
    );
    wait_for(
        "the forged SYN at the front",
        Duration::from_secs(5),
        || net.front_tcp_in() > before,
    );
    // Three lingers and more, the flow silent meanwhile.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        steering.is_steered(f.client, f.vip).unwrap(),
        "the forged packets left the entry"
    );
    std::io::Write::write_all(&mut stdin, b"close\n").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    let sent = json_line(&server.wait_with_output().unwrap().stdout);
    assert_eq!(sent["sent"], N);
    assert_eq!(
        sent["end"], "fin",
        "the client's FIN reached the backend: the flow lived on"
    );
    wait_for(
        "the entry to go after the real FIN",
        Duration::from_secs(10),
        || !steering.is_steered(f.client, f.vip).unwrap(),
    );
}

#[test]
fn forged_packets_do_not_end_a_live_flow_ipv4() {
    forged_packets_do_not_end_a_live_flow(false);
}

#[test]
fn forged_packets_do_not_end_a_live_flow_ipv6() {
    forged_packets_do_not_end_a_live_flow(true);
}

/// A client that reuses the tuple of a live entry (its old flow ended
/// without a FIN or RST the front saw: the backend reset it, or the client
/// rebooted) reaches the front's stack with its new connection, every
/// byte of it, not the old flow's backend (no socket there: a RST);
/// `forget_reused` (the balancer's, once it proxies such a connection)
/// then removes the old entry.
fn a_new_connection_on_a_live_entrys_tuple_reaches_the_front(kind: Kind) {
    let (net, steering, f, (client, vip, _), sport) = one_steered_flow(kind, "nc", false);
    let server = serve(&net.front, vip, "last");
    let before = net.front_tcp_in();
    const N: u64 = 1 << 20;
    let out = net.client(client, sport, vip, N, "fin").output().unwrap();
    let sent = downloaded(out, server, N, "the download from the front");
    assert_eq!(sent["peer_port"], sport);
    assert!(net.front_tcp_in() > before, "the front's stack took it");
    steering.forget_reused(f.client, f.vip).unwrap();
    assert!(!steering.is_steered(f.client, f.vip).unwrap());
}

/// Without an entry the same connection meets the front's stack: the
/// test above would fail on a datapath that forwards nothing.
fn an_unsteered_flow_meets_the_front(kind: Kind) {
    let net = Net::new(&format!("su{}", kind.tag()));
    let _steering = net.steering(kind, |_| {});
    let server = net.server(VIP4);
    let before = net.front_tcp_in();
    let sport = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let out = net
        .client(CLIENT4, sport, VIP4, 1000, "fin")
        .output()
        .unwrap();
    assert!(!out.status.success(), "refused by the front");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ConnectionRefused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(net.front_tcp_in() > before);
    drop(server);
}

/// An entry whose flow sends nothing goes after the idle timeout; one
/// removed by `unsteer` goes at once.
fn idle_and_unsteered_entries_go(kind: Kind) {
    let net = Net::new(&format!("si{}", kind.tag()));
    let steering = net.steering(kind, |s| s.idle = Duration::from_millis(500));
    let idle = flow(CLIENT4, 40001, VIP4, BACKEND4);
    let idle6 = flow(CLIENT6, 40001, VIP6, BACKEND6);
    let removed = flow(CLIENT6, 40002, VIP6, BACKEND6);
    for f in [&idle, &idle6, &removed] {
        steering.steer(f).unwrap();
        assert!(steering.is_steered(f.client, f.vip).unwrap());
    }
    steering.unsteer(removed.client, removed.vip).unwrap();
    assert!(!steering.is_steered(removed.client, removed.vip).unwrap());
    // Absent is fine.
    steering.unsteer(removed.client, removed.vip).unwrap();
    wait_for("the idle entries to go", Duration::from_secs(20), || {
        !steering.is_steered(idle.client, idle.vip).unwrap()
            && !steering.is_steered(idle6.client, idle6.vip).unwrap()
    });
}

/// The cap: a full map refuses with `Full` and takes entries again once
/// one went. Prints what an insert costs.
fn a_full_table_refuses_with_full(kind: Kind) {
    const CAP: usize = 1000;
    let net = Net::new(&format!("sf{}", kind.tag()));
    let steering = net.steering(kind, |s| s.capacity = CAP);
    let flows: Vec<SteeredFlow> = (0..CAP as u16)
        .map(|i| flow(CLIENT4, 10_000 + i, VIP4, BACKEND4))
        .collect();
    // Inserted from a thread inside the front's namespace, as a balancer
    // running there does.
    let per_insert = net
        .front
        .within(|| {
            let start = Instant::now();
            for f in &flows {
                steering.steer(f)?;
            }
            Ok(start.elapsed() / CAP as u32)
        })
        .unwrap();
    println!("{kind:?} steer: {per_insert:?} per insert");
    assert_eq!(steering.entries(), CAP);
    // The gauge: BPF answers from a sweep up to a sweep period old (a
    // second here), so after one entry goes and that long, it says so.
    steering.unsteer(flows[0].client, flows[0].vip).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(steering.active().unwrap(), CAP - 1);
    steering.steer(&flows[0]).unwrap();
    let one_more = flow(CLIENT4, 9_999, VIP4, BACKEND4);
    match steering.steer(&one_more) {
        Err(SteerError::Full { capacity }) => assert_eq!(capacity, CAP),
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(!steering.is_steered(one_more.client, one_more.vip).unwrap());
    steering.unsteer(flows[0].client, flows[0].vip).unwrap();
    steering.steer(&one_more).unwrap();
    assert!(steering.is_steered(one_more.client, one_more.vip).unwrap());
}

/// Closing the datapath without keeping its flows (nf_tables: dropping
/// it) removes what it installed: a flow steered before meets the front's
/// stack afterwards (which resets it), and no rule (nf_tables) or filter
/// (BPF) is left.
fn nothing_is_left_after_drop(kind: Kind) {
    let net = Net::new(&format!("sd{}", kind.tag()));
    let steering = net.steering(kind, |_| {});
    let sport = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    steering
        .steer(&flow(CLIENT4, sport, VIP4, BACKEND4))
        .unwrap();
    steering
        .steer(&flow(CLIENT6, 40004, VIP6, BACKEND6))
        .unwrap();
    if kind == Kind::Nft {
        assert!(sh(&net.front, "nft list ruleset").contains("tcpr_steer"));
    }
    assert_eq!(steering.close(false), None);
    drop(steering);
    assert_eq!(sh(&net.front, "nft list ruleset").trim(), "");
    if kind == Kind::Bpf {
        let pinned = std::fs::read_dir(net.pins.pin_dir()).unwrap().count();
        assert_eq!(pinned, 0, "a pin directory is left");
    }
    let mut server = net.server(VIP4);
    let before = net.front_tcp_in();
    let out = handed_off_client(&net, CLIENT4, sport, (VIP4, BACKEND4), 1000, "fin");
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        !out.status.success(),
        "the flow's packets reached the backend after the drop"
    );
    assert!(net.front_tcp_in() > before, "the front's stack took them");
}

/// Two BPF datapaths on one interface (a balancer restarted while the old
/// one still runs, or two balancers): the second takes over the flows the
/// first steers (it copies its entries and runs first), and a flow the
/// first steers after that, which the second does not know, is passed on
/// to the first, which steers it: a program that ended the chain for every
/// packet it does not steer would hand it to the front's stack (a RST).
/// When the first ends, it hands that flow to the second, which steers
/// both from then on.
#[test]
fn a_second_bpf_datapath_takes_over_and_passes_on_what_it_does_not_steer() {
    let net = Net::new("s2b");
    let first = net.steering(Kind::Bpf, |_| {});
    let before_sport = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let taken = flow(CLIENT4, before_sport, VIP4, BACKEND4);
    first.steer(&taken).unwrap();
    let second = net.steering(Kind::Bpf, |_| {});
    assert!(second.is_steered(taken.client, taken.vip).unwrap());
    let after_sport = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let passed = flow(CLIENT4, after_sport, VIP4, BACKEND4);
    first.steer(&passed).unwrap();
    assert!(!second.is_steered(passed.client, passed.vip).unwrap());
    let handed_sport = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let handed = flow(CLIENT4, handed_sport, VIP4, BACKEND4);
    first.steer(&handed).unwrap();
    const N: u64 = 1 << 20;
    let before = net.front_tcp_in();
    download(&net, FLOW4, after_sport, net.server(VIP4), N, "fin");
    // The first ends: it hands the second what it steered since the
    // takeover (not its stale copy of what it handed over then).
    assert_eq!(first.close(true), Some(2));
    drop(first);
    assert!(second.is_steered(passed.client, passed.vip).unwrap());
    assert!(second.is_steered(handed.client, handed.vip).unwrap());
    download(&net, FLOW4, handed_sport, net.server(VIP4), N, "fin");
    let again = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let later = flow(CLIENT4, again, VIP4, BACKEND4);
    second.steer(&later).unwrap();
    download(&net, FLOW4, before_sport, net.server(VIP4), N, "fin");
    download(&net, FLOW4, again, net.server(VIP4), N, "fin");
    assert_eq!(
        net.front_tcp_in() - before,
        0,
        "the front's stack saw none of the flows"
    );
    assert_eq!(second.close(false), None);
}

/// Two nf_tables datapaths on one interface, the newer closed first with
/// nothing steered (a restart given up): the table stays for the older,
/// which goes on steering into it; the older's close, the last, removes
/// it. Before, the newer one deleted the table (it had taken the
/// ownership over), and every later handoff of the older one was proxied.
#[test]
fn the_newer_nft_datapath_closed_first_leaves_the_table_to_the_older() {
    let net = Net::new("s2o");
    let first = net.steering(Kind::Nft, |_| {});
    let second = net.steering(Kind::Nft, |_| {});
    assert_eq!(second.close(false), Some(0), "left to the one running");
    drop(second);
    let later = flow(
        CLIENT4,
        NEXT_PORT.fetch_add(1, Ordering::SeqCst),
        VIP4,
        BACKEND4,
    );
    first.steer(&later).unwrap();
    assert!(first.is_steered(later.client, later.vip).unwrap());
    assert_eq!(first.close(false), None);
    assert_eq!(sh(&net.front, "nft list ruleset").trim(), "");
}

/// The hand-back at the older datapath's end gives back only what it
/// steered after the takeover: an entry the newer one copied and has
/// retired since stays retired, even one the older sweeper stamped after
/// the takeover (its first sweep). Before, the hand-back chose by that
/// stamp, and such an entry came back for the idle hour.
#[test]
fn the_hand_back_leaves_out_what_the_takeover_copied() {
    let net = Net::new("s2h");
    let cfg = net.bpf_config();
    let copied = flow(
        CLIENT4,
        NEXT_PORT.fetch_add(1, Ordering::SeqCst),
        VIP4,
        BACKEND4,
    );
    let later = flow(
        CLIENT4,
        NEXT_PORT.fetch_add(1, Ordering::SeqCst),
        VIP4,
        BACKEND4,
    );
    let (first, second) = net
        .front
        .within(|| {
            let first = BpfSteering::install(cfg.clone())?;
            first.steer(&copied)?;
            let second = BpfSteering::install(cfg.clone())?;
            Ok((first, second))
        })
        .unwrap();
    assert!(second.is_steered(copied.client, copied.vip).unwrap());
    // The older sweeper's first look at the copied entry, after the
    // takeover; then the newer one retires it (its flow ended).
    first.sweep().unwrap();
    second.unsteer(copied.client, copied.vip).unwrap();
    first.steer(&later).unwrap();
    assert_eq!(first.close(true), Some(1), "only the flow steered since");
    assert!(!second.is_steered(copied.client, copied.vip).unwrap());
    assert!(second.is_steered(later.client, later.vip).unwrap());
    assert_eq!(second.close(false), None);
}

/// A batch steered by the first of two BPF datapaths (a balancer
/// replaced under load), copied by the second at its takeover, then rolled
/// back by the first (its agent refused): the first's unsteer removes the
/// flow from the second's map too. Before, the second (whose program runs
/// first) kept steering it to the backend, which has no socket for it,
/// while the first relayed the connection: a RST.
#[test]
fn a_flow_rolled_back_after_a_takeover_is_steered_by_neither() {
    let net = Net::new("s2r");
    let first = net.steering(Kind::Bpf, |_| {});
    let rolled = flow(
        CLIENT4,
        NEXT_PORT.fetch_add(1, Ordering::SeqCst),
        VIP4,
        BACKEND4,
    );
    let kept = flow(
        CLIENT4,
        NEXT_PORT.fetch_add(1, Ordering::SeqCst),
        VIP4,
        BACKEND4,
    );
    first.steer_batch(&[rolled, kept]).unwrap();
    let second = net.steering(Kind::Bpf, |_| {});
    assert!(second.is_steered(rolled.client, rolled.vip).unwrap());
    first.unsteer_batch(&[rolled]).unwrap();
    assert!(!first.is_steered(rolled.client, rolled.vip).unwrap());
    assert!(
        !second.is_steered(rolled.client, rolled.vip).unwrap(),
        "the newer datapath still steers the flow rolled back"
    );
    assert!(second.is_steered(kept.client, kept.vip).unwrap());
    assert_eq!(second.close(false), None);
}

/// A BPF datapath closed keeping its flows (a balancer's exit; a killed
/// one leaves the same) leaves its program steering them from its pins,
/// with no process holding it; the next datapath on the interface takes
/// them over, and dropping that one removes the pins: the flow then meets
/// the front's stack.
#[test]
fn a_bpf_datapath_closed_keeping_its_flows_steers_on_until_the_next_takes_over() {
    let net = Net::new("s2k");
    let sport = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let kept = flow(CLIENT4, sport, VIP4, BACKEND4);
    let cfg = net.bpf_config();
    let (dir, left) = net
        .front
        .within(|| {
            let first = BpfSteering::install(cfg.clone())?;
            first.steer(&kept)?;
            let dir = first.pinned_at().expect("pinned").to_path_buf();
            Ok((dir, first.close(true)))
        })
        .unwrap();
    assert_eq!(left, Some(1));
    assert!(dir.join("link").exists());
    let before = net.front_tcp_in();
    download(&net, FLOW4, sport, net.server(VIP4), 1 << 20, "fin");
    assert_eq!(
        net.front_tcp_in() - before,
        0,
        "the pinned program steered it"
    );
    let (next_dir, carried) = net
        .front
        .within(|| {
            let next = BpfSteering::install(cfg.clone())?;
            assert!(next.is_steered(kept.client, kept.vip)?);
            let found = (
                next.pinned_at().map(|p| p.to_path_buf()),
                next.carried_over(),
            );
            assert_eq!(next.close(false), None);
            Ok(found)
        })
        .unwrap();
    assert_eq!(carried.carried, 1);
    assert_eq!(carried.lost, 0);
    assert_eq!(next_dir.as_deref(), Some(dir.as_path()));
    // Closed without keeping (inside `within`): nothing is left.
    assert!(!dir.exists(), "{} left behind", dir.display());
    let mut server = net.server(VIP4);
    let before = net.front_tcp_in();
    let out = handed_off_client(&net, CLIENT4, sport, (VIP4, BACKEND4), 1000, "fin");
    let _ = server.kill();
    let _ = server.wait();
    assert!(!out.status.success(), "still steered after the drop");
    assert!(net.front_tcp_in() > before, "the front's stack took them");
}

/// An nf_tables datapath closed keeping its flows (a balancer's exit; a
/// killed one leaves the same) leaves its table forwarding them, with no
/// process; the next datapath on the interface takes the table over with
/// its entries (IPv4 and IPv6) and the backends' ids: a new flow to a
/// backend the first one installed is steered under that backend's id
/// (a fresh id clashing with one in the table would be refused). Closed
/// without keeping, the last removes the table.
#[test]
fn an_nft_datapath_closed_keeping_its_flows_steers_on_until_the_next_takes_over() {
    const SECOND4: &str = "10.9.0.4";
    let net = Net::new("s2n");
    sh(&net.backend, &format!("ip addr add {SECOND4}/24 dev eth0"));
    let cfg = NftConfig {
        // Entries of flows ended before the takeover stay for it.
        linger: Duration::from_secs(60),
        ..NftConfig::new("eth0")
    };
    let port = || NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let kept = flow(CLIENT4, port(), VIP4, BACKEND4);
    let second = flow(CLIENT4, port(), VIP4, SECOND4);
    let kept6 = flow(CLIENT6, port(), VIP6, BACKEND6);
    let left = net
        .front
        .within(|| {
            let first = NftSteering::install(cfg.clone())?;
            assert_eq!(first.carried_over(), Default::default());
            first.steer_batch(&[kept, second, kept6])?;
            Ok(first.close(true))
        })
        .unwrap();
    assert_eq!(left, Some(3));
    assert!(sh(&net.front, "nft list tables").contains("tcpr_steer"));
    let before = net.front_tcp_in();
    const N: u64 = 1 << 20;
    let port_of = |f: &SteeredFlow| f.client.port();
    download(&net, FLOW4, port_of(&kept), net.server(VIP4), N, "fin");
    assert_eq!(
        net.front_tcp_in() - before,
        0,
        "the table steered it with no process"
    );
    let later = flow(CLIENT4, port(), VIP4, SECOND4);
    let next = net
        .front
        .within(|| {
            let next = NftSteering::install(cfg.clone())?;
            for f in [&kept, &second, &kept6] {
                assert!(next.is_steered(f.client, f.vip)?, "{f:?} taken over");
            }
            next.steer(&later)?;
            Ok(next)
        })
        .unwrap();
    assert_eq!(next.carried_over().carried, 3);
    assert_eq!(next.carried_over().lost, 0);
    let before = net.front_tcp_in();
    download(
        &net,
        (CLIENT4, VIP4, SECOND4),
        port_of(&second),
        net.server(VIP4),
        N,
        "fin",
    );
    download(
        &net,
        (CLIENT4, VIP4, SECOND4),
        port_of(&later),
        net.server(VIP4),
        N,
        "fin",
    );
    download(
        &net,
        (CLIENT6, VIP6, BACKEND6),
        port_of(&kept6),
        net.server(VIP6),
        N,
        "fin",
    );
    assert_eq!(
        net.front_tcp_in() - before,
        0,
        "the front's stack saw none of the flows"
    );
    assert_eq!(next.close(false), None);
    assert_eq!(sh(&net.front, "nft list ruleset").trim(), "");
}

/// Two nf_tables datapaths on one interface (a balancer restarted while
/// the old one still runs): the second takes the table over, the first
/// goes on steering into it, and when the first ends, even without
/// keeping its flows, it leaves the table to the second, which steers
/// what both steered.
#[test]
fn a_second_nft_datapath_takes_over_and_the_first_leaves_it_the_table() {
    let net = Net::new("s2m");
    let port = || NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let taken = flow(CLIENT4, port(), VIP4, BACKEND4);
    let after = flow(CLIENT4, port(), VIP4, BACKEND4);
    let first = net.steering(Kind::Nft, |_| {});
    first.steer(&taken).unwrap();
    let second = net
        .front
        .within(|| Ok(NftSteering::install(NftConfig::new("eth0"))?))
        .unwrap();
    assert_eq!(second.carried_over().carried, 1);
    first.steer(&after).unwrap();
    assert!(second.is_steered(after.client, after.vip).unwrap());
    assert_eq!(first.close(false), Some(2), "left to the second");
    drop(first);
    let before = net.front_tcp_in();
    for f in [&taken, &after] {
        download(
            &net,
            FLOW4,
            f.client.port(),
            net.server(VIP4),
            1 << 20,
            "fin",
        );
    }
    assert_eq!(
        net.front_tcp_in() - before,
        0,
        "the front's stack saw none of the flows"
    );
    assert_eq!(second.close(false), None);
    assert_eq!(sh(&net.front, "nft list ruleset").trim(), "");
}

/// The gauge (`active`) answers from the last sweep while it is fresh and
/// sweeps itself once it is not. It deadlocked then (the guard of its look
/// at the last sweep was still held when it swept): under load, when the
/// sweeper ran late, and always once it stopped (a metrics scrape after
/// the balancer's `close`), which this test makes certain.
#[test]
fn the_bpf_gauge_answers_once_its_last_sweep_is_stale() {
    let net = Net::new("s2g");
    let steering = net.steering(Kind::Bpf, |s| s.linger = Duration::from_millis(400));
    steering
        .steer(&flow(
            CLIENT4,
            NEXT_PORT.fetch_add(1, Ordering::SeqCst),
            VIP4,
            BACKEND4,
        ))
        .unwrap();
    assert_eq!(steering.entries(), 1);
    // No sweeper from here on; the pins go (nothing is kept).
    assert_eq!(steering.close(false), None);
    let (tx, rx) = std::sync::mpsc::channel();
    // Not joined: a deadlocked gauge fails the test, it does not hang it.
    std::thread::spawn(move || {
        // Past the sweep period (100 ms here).
        std::thread::sleep(Duration::from_millis(300));
        let _ = tx.send(steering.active().unwrap());
    });
    let n = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the gauge did not answer within 10 s");
    assert_eq!(n, 1, "the entry is still in the map, not expired");
}

/// Flows it cannot steer are refused with the reason, nothing installed.
fn flows_it_cannot_steer_are_refused(kind: Kind) {
    let net = Net::new(&format!("sx{}", kind.tag()));
    let steering = net.steering(kind, |_| {});
    let mixed = SteeredFlow {
        backend: BACKEND6.parse().unwrap(),
        ..flow(CLIENT4, 40005, VIP4, BACKEND4)
    };
    assert!(matches!(
        steering.steer(&mixed),
        Err(SteerError::Unsupported { .. })
    ));
    let off_link = flow(CLIENT4, 40006, VIP4, "192.0.2.1");
    let r = steering.steer(&off_link);
    assert!(matches!(r, Err(SteerError::Unsupported { .. })), "{r:?}");
    assert_eq!(steering.entries(), 0);
    let installed = match kind {
        Kind::Nft => net.front.within(|| {
            NftSteering::install(NftConfig {
                table: "no spaces".into(),
                ..NftConfig::new("eth0")
            })
            .map(drop)
            .map_err(Into::into)
        }),
        Kind::Bpf => net.front.within(|| {
            BpfSteering::install(BpfConfig::new("nosuchdev0"))
                .map(drop)
                .map_err(Into::into)
        }),
    };
    assert!(installed.is_err());
}

/// A handoff batch's flows, steered in one call (one transaction): a real
/// flow among 95 others (IPv4 and IPv6) is steered and carries its
/// download; the others go by `unsteer_batch`, the real one after its
/// client's FIN and the linger: no entry is left.
fn a_batch_is_steered_at_once_and_leaves_no_entry(kind: Kind) {
    let net = Net::new(&format!("sb{}", kind.tag()));
    let steering = net.steering(kind, |s| s.linger = Duration::from_millis(300));
    let sport = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let real = flow(CLIENT4, sport, VIP4, BACKEND4);
    let others: Vec<SteeredFlow> = (0..64)
        .map(|i| flow(CLIENT4, 20_000 + i, VIP4, BACKEND4))
        .chain((0..31).map(|i| flow(CLIENT6, 20_000 + i, VIP6, BACKEND6)))
        .collect();
    let batch: Vec<SteeredFlow> = std::iter::once(real).chain(others.clone()).collect();
    steering.steer_batch(&batch).unwrap();
    assert_eq!(steering.entries(), batch.len());
    for f in &batch {
        assert!(steering.is_steered(f.client, f.vip).unwrap(), "{f:?}");
    }

    let server = net.server(VIP4);
    const N: u64 = 1 << 20;
    let sent = download(&net, FLOW4, sport, server, N, "fin");
    assert_eq!(sent["end"], "fin");

    steering.unsteer_batch(&others).unwrap();
    for f in &others {
        assert!(!steering.is_steered(f.client, f.vip).unwrap(), "{f:?}");
    }
    wait_for(
        "the real flow's entry to go after its FIN",
        Duration::from_secs(20),
        || !steering.is_steered(real.client, real.vip).unwrap(),
    );
    assert_eq!(steering.entries(), 0);
    if kind == Kind::Bpf {
        return;
    }
    // The kernel's own listing: no flow element in any set (the backends
    // maps keep their one element each).
    let table: serde_json::Value =
        serde_json::from_str(&sh(&net.front, "nft -j list table netdev tcpr_steer")).unwrap();
    let objects = table["nftables"].as_array().unwrap();
    let flow_sets: Vec<&serde_json::Value> = objects
        .iter()
        .filter_map(|o| o.get("map").or_else(|| o.get("set")))
        .filter(|s| {
            let name = s["name"].as_str().unwrap_or("");
            name.starts_with("flows") || name.starts_with("closing")
        })
        .collect();
    assert_eq!(flow_sets.len(), 4, "{table}");
    for s in flow_sets {
        assert!(s.get("elem").is_none(), "an element left: {s}");
    }
}

/// A batch commits whole or not at all: beyond the cap, or with one flow
/// the datapath cannot steer, none of its flows is steered and the flows
/// steered before are untouched.
fn a_batch_is_refused_whole(kind: Kind) {
    const CAP: usize = 16;
    let net = Net::new(&format!("sw{}", kind.tag()));
    let steering = net.steering(kind, |s| s.capacity = CAP);
    let first: Vec<SteeredFlow> = (0..10)
        .map(|i| flow(CLIENT4, 30_000 + i, VIP4, BACKEND4))
        .collect();
    steering.steer_batch(&first).unwrap();
    let beyond: Vec<SteeredFlow> = (0..10)
        .map(|i| flow(CLIENT4, 31_000 + i, VIP4, BACKEND4))
        .collect();
    match steering.steer_batch(&beyond) {
        Err(SteerError::Full { capacity }) => assert_eq!(capacity, CAP),
        other => panic!("expected Full, got {other:?}"),
    }
    let mut one_bad = beyond[..3].to_vec();
    one_bad.push(flow(CLIENT4, 31_100, VIP4, "192.0.2.1"));
    let r = steering.steer_batch(&one_bad);
    assert!(matches!(r, Err(SteerError::Unsupported { .. })), "{r:?}");
    assert_eq!(steering.entries(), first.len());
    for f in beyond.iter().chain(&one_bad) {
        assert!(!steering.is_steered(f.client, f.vip).unwrap(), "{f:?}");
    }
    for f in &first {
        assert!(steering.is_steered(f.client, f.vip).unwrap(), "{f:?}");
    }
    // A refused batch leaves the datapath usable: the batch that
    // fits goes in.
    steering.steer_batch(&beyond[..CAP - first.len()]).unwrap();
    assert_eq!(steering.entries(), CAP);
}

/// `tcpr_host::bpf::count_keys` counts a map's entries whatever its value
/// layout (how a takeover counts the flows of a map of a layout it does
/// not know, lost): here the pinned flows map of a datapath steering
/// three flows, one of them IPv6.
#[test]
fn the_keys_of_a_pinned_flows_map_are_counted() {
    let net = Net::new("ck");
    let steering = net.steering(Kind::Bpf, |_| {});
    for (client, sport, vip, backend) in [
        (CLIENT4, 40101, VIP4, BACKEND4),
        (CLIENT4, 40102, VIP4, BACKEND4),
        (CLIENT6, 40103, VIP6, BACKEND6),
    ] {
        steering.steer(&flow(client, sport, vip, backend)).unwrap();
    }
    let dir = std::fs::read_dir(net.pins.pin_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .expect("the datapath's pin directory");
    let map = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("flows-"))
        })
        .expect("the pinned flows map");
    let fd = tcpr_host::bpf::obj_get(&map).unwrap();
    use std::os::fd::AsFd;
    assert_eq!(tcpr_host::bpf::count_keys(fd.as_fd()).unwrap(), 3);
    steering
        .unsteer(
            flow(CLIENT4, 40101, VIP4, BACKEND4).client,
            flow(CLIENT4, 40101, VIP4, BACKEND4).vip,
        )
        .unwrap();
    assert_eq!(tcpr_host::bpf::count_keys(fd.as_fd()).unwrap(), 2);
}
