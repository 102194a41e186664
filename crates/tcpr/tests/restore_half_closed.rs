//! Connections the client half-closed (CLOSE_WAIT, LAST_ACK, CLOSING), on
//! IPv4 and IPv6, moved from host a to host b with the service address:
//! `tcpr restore` runs on b BEFORE the address moves there (the order of
//! every move with an address switch), and through the agent (`tcpr agent`
//! with `tcpr migrate --move-address`). Every byte of the request and the
//! response is checked, the close completes, and b sends no RST.

mod common;
use common::*;
use std::time::Duration;
use tcpr_netlab::{Host, Lab};

const PORT: u16 = 8080;
/// Bytes that must wait unacknowledged in a fresh socket's send buffer
/// (16 KiB by default, counted with overhead).
const UNACKED_LEN: usize = 6000;
/// Bytes that fit one segment (below the MSS of IPv4 and IPv6 on Ethernet).
const ONE_SEGMENT_LEN: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum PeerClosed {
    CloseWait,
    LastAck,
    Closing,
}

impl PeerClosed {
    /// The state's name in `ss` filters.
    fn ss_name(self) -> &'static str {
        match self {
            PeerClosed::CloseWait => "close-wait",
            PeerClosed::LastAck => "last-ack",
            PeerClosed::Closing => "closing",
        }
    }
    /// Response bytes: large while the server still sends (the move
    /// happens mid-stream), small when it must fit the windows unacked.
    fn response_len(self) -> usize {
        match self {
            PeerClosed::CloseWait => 1 << 20,
            PeerClosed::LastAck | PeerClosed::Closing => UNACKED_LEN,
        }
    }
    /// Request bytes: in CLOSING the client's data and FIN must arrive
    /// while the server acknowledges nothing, which (with no ACK to open
    /// the client's congestion window) only one segment does.
    fn request_len(self) -> usize {
        match self {
            PeerClosed::CloseWait | PeerClosed::LastAck => 100_000,
            PeerClosed::Closing => ONE_SEGMENT_LEN,
        }
    }
}

struct Net {
    _lab: Lab,
    c: Host,
    a: Host,
    b: Host,
    n: u8,
    v6: bool,
    dir: std::path::PathBuf,
}

impl Net {
    fn new(tag: &str, n: u8, v6: bool) -> Net {
        let dir = tmpdir(tag);
        let mut lab = Lab::new(tag).unwrap();
        let addr = |h: u8| {
            if v6 {
                format!("fd00:{n}::{h}/64")
            } else {
                format!("10.{n}.0.{h}/24")
            }
        };
        let c = lab.host("c", &[&addr(1)]).unwrap();
        let a = lab.host("a", &[&addr(2), &addr(100)]).unwrap();
        let b = lab.host("b", &[&addr(3)]).unwrap();
        watch_rsts(&b);
        Net {
            _lab: lab,
            c,
            a,
            b,
            n,
            v6,
            dir,
        }
    }
    fn svc(&self) -> String {
        if self.v6 {
            format!("fd00:{}::100", self.n)
        } else {
            format!("10.{}.0.100", self.n)
        }
    }
    fn svc_cidr(&self) -> String {
        format!("{}/{}", self.svc(), if self.v6 { 64 } else { 24 })
    }
    fn svc_port(&self) -> String {
        if self.v6 {
            format!("[{}]:{PORT}", self.svc())
        } else {
            format!("{}:{PORT}", self.svc())
        }
    }
    fn agent_addr(&self) -> String {
        if self.v6 {
            format!("[fd00:{}::3]:7070", self.n)
        } else {
            format!("10.{}.0.3:7070", self.n)
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn halfclose(host: &Host, args: &[&str], name: &str) -> Proc {
    let mut cmd = host.cmd("python3");
    cmd.arg(py("halfclose.py")).args(args);
    Proc::spawn(cmd, name)
}

fn restored_server_cmd() -> String {
    format!("python3 {} --role server --restored", py("halfclose.py"))
}

fn nft(host: &Host, script: &str) {
    use std::io::Write;
    let mut child = host
        .cmd("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft: {script}");
}

/// Drops the TCP packets `host` sends from or to the service port.
fn block_output(host: &Host, port_match: &str) {
    nft(
        host,
        &format!(
            "add table inet blk\nadd chain inet blk out {{ type filter hook output priority 0; }}\nadd rule inet blk out {port_match} {PORT} drop\n"
        ),
    );
}

fn unblock(host: &Host) {
    nft(host, "delete table inet blk\n");
}

/// Waits until `host` has a TCP socket on the service port in `state`.
fn wait_state(host: &Host, state: PeerClosed) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = host
            .cmd("ss")
            .args(["-Htn", "state", state.ss_name()])
            .arg(format!("( sport = :{PORT} )"))
            .output()
            .unwrap();
        if !out.stdout.is_empty() {
            return;
        }
        if std::time::Instant::now() > deadline {
            let all = host.cmd("ss").args(["-Htnoi"]).output().unwrap();
            panic!(
                "no socket reached {state:?}: {}",
                String::from_utf8_lossy(&all.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Counts the RSTs `host` sends from the service port (an nftables
/// counter; the agent's own control connections are not counted).
fn watch_rsts(host: &Host) {
    nft(
        host,
        &format!(
            "add table inet rstwatch\nadd chain inet rstwatch out {{ type filter hook output priority 0; }}\nadd rule inet rstwatch out tcp sport {PORT} tcp flags & rst == rst counter\n"
        ),
    );
}

/// RSTs counted by [`watch_rsts`].
fn rsts_sent(host: &Host) -> u64 {
    let out = host
        .cmd("nft")
        .args(["list", "table", "inet", "rstwatch"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("counter packets ").expect("the RST counter") + "counter packets ".len();
    text[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The client and the server, brought to `state` with the server's socket
/// holding what that state holds. Returns (client, server, server fd,
/// the request's "LEN SHA").
fn half_closed(net: &Net, state: PeerClosed) -> (Proc, Proc, String, String) {
    let response = state.response_len().to_string();
    let request = state.request_len().to_string();
    let mut server = halfclose(
        &net.a,
        &[
            "--role",
            "server",
            "--listen",
            &net.svc(),
            "--port",
            &PORT.to_string(),
            "--response",
            &response,
            "--request",
            &request,
        ],
        "server",
    );
    server.expect("listening", Duration::from_secs(10));
    let mut client = halfclose(
        &net.c,
        &[
            "--role",
            "client",
            "--connect",
            &net.svc(),
            "--port",
            &PORT.to_string(),
            "--response",
            &response,
            "--request",
            &request,
            "--rate",
            "400000",
        ],
        "client",
    );
    client.expect("connected", Duration::from_secs(10));
    let fd = server
        .expect("ready", Duration::from_secs(10))
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let request = |client: &mut Proc| {
        client.send("request");
        let l = client.expect("requested", Duration::from_secs(20));
        l["requested ".len()..].to_string()
    };
    let req;
    match state {
        PeerClosed::CloseWait => {
            req = request(&mut client);
            client.send("shut");
            client.expect("shut", Duration::from_secs(10));
            server.send("read");
            let got = server.expect("request", Duration::from_secs(10));
            assert_eq!(got["request ".len()..], req, "the request arrived whole");
            // The whole response goes to the kernel; the client reads it
            // slowly, so most of it moves with the socket.
            server.send("respond");
            server.expect("written", Duration::from_secs(20));
        }
        PeerClosed::LastAck => {
            req = request(&mut client);
            client.send("shut");
            client.expect("shut", Duration::from_secs(10));
            server.send("read");
            let got = server.expect("request", Duration::from_secs(10));
            assert_eq!(got["request ".len()..], req);
            // The client acknowledges nothing more: the server's data and
            // FIN stay unacknowledged.
            block_output(&net.c, "tcp dport");
            server.send("respond");
            server.expect("written", Duration::from_secs(10));
            server.send("shut");
            server.expect("shut", Duration::from_secs(10));
        }
        PeerClosed::Closing => {
            // Nothing passes either way; both send data and FIN.
            block_output(&net.c, "tcp dport");
            block_output(&net.a, "tcp sport");
            server.send("respond");
            server.expect("written", Duration::from_secs(10));
            server.send("shut");
            server.expect("shut", Duration::from_secs(10));
            req = request(&mut client);
            client.send("shut");
            client.expect("shut", Duration::from_secs(10));
            // The client's data and FIN get through, not the server's.
            unblock(&net.c);
        }
    }
    wait_state(&net.a, state);
    (client, server, fd, req)
}

/// After the move: the client got the whole response and its EOF, and no
/// RST came from b.
fn assert_completed(net: &Net, client: &mut Proc, state: PeerClosed) {
    if state == PeerClosed::LastAck {
        // The client's acknowledgements pass again (in CLOSING they already
        // do; the server's direction was blocked on a, which it left).
        unblock(&net.c);
    }
    client.send("verdict");
    let v: serde_json::Value =
        serde_json::from_str(&client.expect("{", Duration::from_secs(90))).unwrap();
    assert!(v["error"].is_null(), "{state:?}: {v}");
    assert_eq!(v["received"], v["expected"], "{state:?}: {v}");
    assert_eq!(v["intact"], true, "{state:?}: {v}");
    assert_eq!(v["eof"], true, "{state:?}: {v}");
    assert_eq!(rsts_sent(&net.b), 0, "{state:?}: b sent a RST");
}

fn move_address(net: &Net) {
    net.a.del_addr(&net.svc_cidr()).unwrap();
    net.b.add_addr(&net.svc_cidr()).unwrap();
    let out = tcpr(Some(&net.b), &["announce", "--dev", "eth0", &net.svc()]);
    assert!(out.status.success());
}

fn cli_restore_before_the_address(state: PeerClosed, v6: bool, n: u8) {
    let net = Net::new(&format!("hc{n}"), n, v6);
    let (mut client, mut server, fd, req) = half_closed(&net, state);
    let img = net.dir.join("hc.img");
    let out = tcpr(
        None,
        &[
            "dump",
            "--pid",
            &server.pid().to_string(),
            "--fd",
            &fd,
            "-o",
            img.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.kill();
    // Restore on b while the service address is still on a.
    let mut cmd = net.b.cmd(tcpr_bin());
    cmd.args(["restore", img.to_str().unwrap(), "--", "sh", "-c"])
        .arg(restored_server_cmd());
    let mut restored = Proc::spawn(cmd, "tcpr restore");
    // The peer's FIN was replayed: the restored server reads the rest of
    // the request, then EOF.
    let got = restored.expect("request", Duration::from_secs(10));
    let expect_len = if state == PeerClosed::Closing {
        req.clone()
    } else {
        // Read by the original server before the dump: nothing is left.
        "0 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into()
    };
    assert_eq!(got["request ".len()..], expect_len, "{state:?}");
    move_address(&net);
    assert_completed(&net, &mut client, state);
    let status = restored.child.wait().unwrap();
    assert!(status.success(), "{state:?}: tcpr restore exited {status}");
}

fn agent_moves(state: PeerClosed, v6: bool, n: u8) {
    let net = Net::new(&format!("ha{n}"), n, v6);
    let key = net.dir.join("psk");
    std::fs::write(&key, "a shared secret for the half-close tests\n").unwrap();
    let mut agent = {
        let mut cmd = net.b.cmd(tcpr_bin());
        cmd.args([
            "agent",
            "--listen",
            &net.agent_addr(),
            "--psk-file",
            key.to_str().unwrap(),
            "--allow",
            &net.svc_port(),
            "--exec",
            &restored_server_cmd(),
        ]);
        let mut p = Proc::spawn(cmd, "agent");
        p.expect("tcpr agent listening", Duration::from_secs(10));
        p
    };
    let (mut client, mut server, _fd, req) = half_closed(&net, state);
    let out = net
        .a
        .cmd(tcpr_bin())
        .args([
            "migrate",
            "--to",
            &net.agent_addr(),
            "--psk-file",
            key.to_str().unwrap(),
            "--pid",
            &server.pid().to_string(),
            "--move-address",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{state:?}: migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.kill();
    let got = agent.expect("request", Duration::from_secs(10));
    if state == PeerClosed::Closing {
        assert_eq!(got["request ".len()..], req, "{state:?}");
    }
    assert_completed(&net, &mut client, state);
}

#[test]
fn close_wait_restored_before_the_address_moves() {
    cli_restore_before_the_address(PeerClosed::CloseWait, false, 140);
    cli_restore_before_the_address(PeerClosed::CloseWait, true, 141);
}

#[test]
fn last_ack_restored_before_the_address_moves() {
    cli_restore_before_the_address(PeerClosed::LastAck, false, 142);
    cli_restore_before_the_address(PeerClosed::LastAck, true, 143);
}

#[test]
fn closing_restored_before_the_address_moves() {
    cli_restore_before_the_address(PeerClosed::Closing, false, 144);
    cli_restore_before_the_address(PeerClosed::Closing, true, 145);
}

#[test]
fn half_closed_states_move_through_the_agent() {
    for (i, state) in [
        PeerClosed::CloseWait,
        PeerClosed::LastAck,
        PeerClosed::Closing,
    ]
    .into_iter()
    .enumerate()
    {
        agent_moves(state, false, 146 + 2 * i as u8);
        agent_moves(state, true, 147 + 2 * i as u8);
    }
}
