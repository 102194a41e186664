//! Handoff between hosts (network namespaces): `tcpr agent` on one,
//! `tcpr migrate` on the other, Python peers verifying every byte.

mod common;
use common::*;
use std::path::PathBuf;
use std::time::Duration;
use tcpr_netlab::{Host, Lab};

struct Net {
    _lab: Lab,
    c: Host,
    a: Host,
    b: Host,
    n: u8,
    v6: bool,
    key: PathBuf,
    dir: PathBuf,
}

impl Net {
    fn new(tag: &str, n: u8) -> Net {
        Net::build(tag, n, false)
    }
    fn new6(tag: &str, n: u8) -> Net {
        Net::build(tag, n, true)
    }
    fn build(tag: &str, n: u8, v6: bool) -> Net {
        let dir = tmpdir(tag);
        let key = dir.join("psk");
        std::fs::write(&key, "a shared secret for the handoff tests\n").unwrap();
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
        Net {
            _lab: lab,
            c,
            a,
            b,
            n,
            v6,
            key,
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
    fn svc_port(&self, port: u16) -> String {
        if self.v6 {
            format!("[{}]:{port}", self.svc())
        } else {
            format!("{}:{port}", self.svc())
        }
    }
    fn agent_addr(&self) -> String {
        if self.v6 {
            format!("[fd00:{}::3]:7070", self.n)
        } else {
            format!("10.{}.0.3:7070", self.n)
        }
    }
    fn agent(&self, delivery: &[&str], allow: &str, env: Option<(&str, &str)>) -> Proc {
        let mut cmd = self.b.cmd(tcpr_bin());
        cmd.args([
            "agent",
            "--listen",
            &self.agent_addr(),
            "--psk-file",
            self.key.to_str().unwrap(),
            "--allow",
            allow,
        ])
        .args(delivery);
        if let Some((k, v)) = env {
            cmd.env(k, v).env("TCPR_FAULT_DIR", &self.dir);
        }
        let mut p = Proc::spawn(cmd, "agent");
        p.expect("tcpr agent listening", Duration::from_secs(10));
        p
    }
    /// echo.py on a, a streaming peer on c; returns (echo, peer).
    fn stream(&self) -> (Proc, Proc) {
        let mut echo = echo_server(&self.a, &self.svc(), 8080, &[]);
        let mut peer = stream_peer(&self.c, &self.svc(), 8080, &["--rate", "1000000"]);
        echo.expect("ready", Duration::from_secs(10));
        wait_echoes(&mut peer, FLOWING);
        echo.send("flush");
        echo.expect("paused", Duration::from_secs(10));
        (echo, peer)
    }
    fn migrate_cmd(&self, pid: i32, key: &std::path::Path) -> std::process::Command {
        let mut cmd = self.a.cmd(tcpr_bin());
        cmd.args([
            "migrate",
            "--to",
            &self.agent_addr(),
            "--psk-file",
            key.to_str().unwrap(),
            "--pid",
            &pid.to_string(),
            "--move-address",
        ]);
        cmd
    }
    fn has_svc(&self, h: &Host) -> bool {
        let out = h.ip(&["-o", "addr", "show"]).unwrap();
        let plen = if self.v6 { 64 } else { 24 };
        String::from_utf8_lossy(&out.stdout).contains(&format!("{}/{plen}", self.svc()))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The command line an agent runs per delivered connection.
fn echo_for_agent() -> String {
    format!("python3 {} --no-control", py("echo.py"))
}

/// `tcpr migrate` exited 0 and its summary starts with `summary`.
fn assert_migrated(out: &std::process::Output, summary: &str) {
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(last_line(out).starts_with(summary), "{}", last_line(out));
}

/// `tcpr migrate` moved nothing: exit status 2, the one connection rolled
/// back, and `why` in what it printed on stderr.
fn assert_rolled_back(out: &std::process::Output, why: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        last_line(out).starts_with("moved 0, rolled back 1"),
        "{}",
        last_line(out)
    );
    assert!(stderr.contains(why), "{stderr}");
}

fn last_line(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

fn agent_sockets_on(h: &Host, local: &str) -> usize {
    let out = tcpr(Some(h), &["ls", "--json"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(local))
        .count()
}

#[test]
fn one_connection_moves_with_its_address() {
    for net in [Net::new("h1", 90), Net::new6("h6", 88)] {
        one_connection(net);
    }
}

fn one_connection(net: Net) {
    let mut agent = net.agent(&["--exec", &echo_for_agent()], &net.svc_port(8080), None);
    let (mut echo, mut peer) = net.stream();
    let out = net.migrate_cmd(echo.pid(), &net.key).output().unwrap();
    assert_migrated(&out, "moved 1, rolled back 0, unknown 0");
    agent.expect("ready 3", Duration::from_secs(10));
    echo.kill();
    assert!(
        !net.has_svc(&net.a) && net.has_svc(&net.b),
        "the address moved"
    );
    assert_eq!(locked(&net.a), 0, "the source lock is released");
    wait_echoes(&mut peer, 100_000);
    assert_all_bytes(&verdict(&mut peer), 100_000);
}

#[test]
fn thousand_connections_move_in_one_batch() {
    let net = Net::new("hk", 91);
    let Many {
        mut recv,
        agent: _agent,
        mut echo,
        mut peer,
    } = many_paused(&net, 1000);
    let out = net.migrate_cmd(echo.pid(), &net.key).output().unwrap();
    assert!(
        out.status.success(),
        "migrate: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        last_line(&out).starts_with("moved 1000, rolled back 0, unknown 0"),
        "{}",
        last_line(&out)
    );
    recv.expect("got 1000", Duration::from_secs(30));
    echo.kill();
    peer.send("mark");
    wait_all_echo(&mut peer, 1000);
    assert_all_echoed(&verdict(&mut peer), 1000);
    assert_eq!(locked(&net.a), 0);
}

/// One connection of a batch cannot be frozen (simulated:
/// `TCPR_FAULT_UNFROZEN=1` on `tcpr migrate`, as one socket refusing
/// `TCP_REPAIR` after the batch's checks would). With `--move-address` the
/// address would take that connection's packets along to b, where nothing
/// holds it: so the whole batch is rolled back, the address stays, nothing
/// reaches the agent, and every connection carries on echoing here.
#[test]
fn a_connection_that_cannot_freeze_keeps_its_batch_and_address_home() {
    const COUNT: usize = 4;
    let net = Net::new("hu", 92);
    let Many {
        recv,
        agent: _agent,
        mut echo,
        mut peer,
    } = many_paused(&net, COUNT);
    let mut cmd = net.migrate_cmd(echo.pid(), &net.key);
    cmd.env("TCPR_FAULT_UNFROZEN", "1");
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        last_line(&out).starts_with(&format!("moved 0, rolled back {COUNT}, unknown 0")),
        "{}",
        last_line(&out)
    );
    assert!(stderr.contains("cannot freeze it"), "{stderr}");
    assert!(
        stderr.contains("1 connection(s) of the batch could not be frozen"),
        "{stderr}"
    );
    assert!(
        net.has_svc(&net.a) && !net.has_svc(&net.b),
        "the address stays"
    );
    assert_eq!(locked(&net.a), 0, "every lock went with its thaw");
    assert_eq!(
        agent_sockets_on(&net.b, &net.svc()),
        0,
        "nothing restored on b"
    );
    echo.send("resume");
    echo.expect("resumed", Duration::from_secs(10));
    peer.send("mark");
    wait_all_echo(&mut peer, COUNT);
    assert_all_echoed(&verdict(&mut peer), COUNT);
    drop(recv);
}

/// `many.py`'s echo on a with `count` connections from its peer on c,
/// every one echoing, then paused for a move; b's agent delivers to
/// `many.py`'s receiver over a unix socket.
struct Many {
    recv: Proc,
    agent: Proc,
    echo: Proc,
    peer: Proc,
}

fn many_paused(net: &Net, count: usize) -> Many {
    let sock = net.dir.join("deliver.sock");
    let recv = unix_receiver(&net.b, &sock);
    let agent = net.agent(
        &["--unix", sock.to_str().unwrap()],
        &format!("{}:8080", net.svc()),
        None,
    );
    let n = count.to_string();
    let many = |h: &Host, args: &[&str], name: &str| {
        let mut cmd = h.cmd("python3");
        cmd.arg(py("many.py"))
            .args(args)
            .args(["--port", "8080", "--count", &n]);
        Proc::spawn(cmd, name)
    };
    let mut echo = many(&net.a, &["echo", "--listen", &net.svc()], "many echo");
    echo.expect("listening", Duration::from_secs(10));
    let mut peer = many(&net.c, &["peer", "--connect", &net.svc()], "many peer");
    peer.expect("connected", Duration::from_secs(60));
    echo.expect(&format!("ready {count}"), Duration::from_secs(60));
    wait_all_echo(&mut peer, count);
    echo.send("flush");
    echo.expect("paused", Duration::from_secs(30));
    Many {
        recv,
        agent,
        echo,
        peer,
    }
}

/// Waits until each of `many.py peer`'s `count` connections has had echoes
/// since its last "mark" (or its start): every one carries traffic end to
/// end.
fn wait_all_echo(peer: &mut Proc, count: usize) {
    let mut flowing = 0;
    let deadline = std::time::Instant::now() + ECHO_TIMEOUT;
    while flowing < count {
        assert!(
            std::time::Instant::now() < deadline,
            "only {flowing} of {count} connections echo within {ECHO_TIMEOUT:?}"
        );
        peer.send("progress");
        let line = peer.expect("progress ", Duration::from_secs(10));
        let mut fields = line.split_whitespace().skip(1);
        flowing = fields.next().and_then(|k| k.parse().ok()).unwrap_or(0);
        let error: Vec<&str> = fields.collect();
        assert!(error.is_empty(), "many peer reports: {}", error.join(" "));
        if flowing < count {
            std::thread::sleep(POLL);
        }
    }
}

/// Waits until the agent holds at its fault point (see `TCPR_FAULT_STOP_AT`).
fn wait_reached(net: &Net, point: &str) {
    let f = net.dir.join(format!("reached-{point}"));
    for _ in 0..1000 {
        if f.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the agent never reached its fault point {point}");
}

/// Lets the agent go on from its fault point.
fn release(net: &Net, point: &str) {
    std::fs::write(net.dir.join(format!("release-{point}")), b"").unwrap();
}

fn signal(pid: i32, sig: &str) {
    assert!(std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// The agent is SIGKILLed at each protocol step: every connection survives,
/// rolled back at the source before COMMIT, carried on at the agent after.
/// (Killed once COMMIT may be on its way, "ready" and "delivered", only a
/// restarted agent can say: see agent_journal.rs.)
#[test]
fn agent_killed_at_each_step() {
    for (i, point) in ["hello", "restored", "committed"].iter().enumerate() {
        let net = Net::new(&format!("k{i}"), 92 + i as u8);
        let mut agent = net.agent(
            &["--exec", &echo_for_agent()],
            &format!("{}:8080", net.svc()),
            Some(("TCPR_FAULT_STOP_AT", point)),
        );
        let (mut echo, mut peer) = net.stream();
        let mig = net
            .migrate_cmd(echo.pid(), &net.key)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_reached(&net, point);
        signal(agent.pid(), "-KILL");
        agent.kill();
        let out = mig.wait_with_output().unwrap();
        let line = last_line(&out);
        if *point == "committed" {
            assert!(
                out.status.success(),
                "{point}: {line} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(line.starts_with("moved 1,"), "{point}: {line}");
            echo.kill();
            assert!(net.has_svc(&net.b));
        } else {
            assert_eq!(
                out.status.code(),
                Some(2),
                "{point}: {line} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                line.starts_with("moved 0, rolled back 1, unknown 0"),
                "{point}: {line}"
            );
            assert!(
                net.has_svc(&net.a) && !net.has_svc(&net.b),
                "{point}: the address is back at the source"
            );
            echo.send("resume");
            echo.expect("resumed", Duration::from_secs(10));
            assert_eq!(
                agent_sockets_on(&net.b, &format!("{}:8080", net.svc())),
                0,
                "{point}: nothing left at the agent"
            );
        }
        assert_eq!(locked(&net.a), 0, "{point}: no lock left");
        wait_echoes(&mut peer, 100_000);
        assert_all_bytes(&verdict(&mut peer), 100_000);
    }
}

/// A stalled agent (timeout) and a cut link before COMMIT: rolled back.
#[test]
fn timeout_and_cut_link_roll_back() {
    for (i, cut) in [false, true].into_iter().enumerate() {
        let net = Net::new(&format!("t{i}"), 96 + i as u8);
        let _agent = net.agent(
            &["--exec", &echo_for_agent()],
            &format!("{}:8080", net.svc()),
            Some(("TCPR_FAULT_STOP_AT", "restored")),
        );
        let (mut echo, mut peer) = net.stream();
        let mig = net
            .migrate_cmd(echo.pid(), &net.key)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_reached(&net, "restored");
        if cut {
            // Both ways: nothing between the hosts gets through any more.
            net.b.set_loss(1000).unwrap();
            net.a.set_loss(1000).unwrap();
            release(&net, "restored");
        }
        let started = std::time::Instant::now();
        let out = mig.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "cut {cut}: {err}");
        assert!(
            last_line(&out).starts_with("moved 0, rolled back 1, unknown 0"),
            "cut {cut}: {} {err}",
            last_line(&out)
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        if cut {
            net.b.clear_loss().unwrap();
            net.a.clear_loss().unwrap();
        } else {
            release(&net, "restored");
        }
        echo.send("resume");
        echo.expect("resumed", Duration::from_secs(10));
        // The agent gives up the batch by itself: nothing stays restored.
        wait_until(
            "the agent gives up the restored batch",
            Duration::from_secs(30),
            || agent_sockets_on(&net.b, &format!("{}:8080", net.svc())) == 0,
        );
        assert_eq!(agent_sockets_on(&net.b, &format!("{}:8080", net.svc())), 0);
        assert_eq!(locked(&net.a), 0);
        assert_all_bytes(&verdict(&mut peer), 100_000);
    }
}

/// A sender without the key, a stranger speaking garbage, and an image
/// outside the allowlist are all refused; the connection carries on.
#[test]
fn unauthenticated_and_disallowed_are_refused() {
    let net = Net::new("ua", 98);
    let _agent = net.agent(&["--exec", "true"], &format!("{}:9999", net.svc()), None);
    // A stranger: the agent closes on it (at most a TLS alert comes back).
    let script = format!(
        "import socket\ns=socket.create_connection(('10.{}.0.3',7070))\ns.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'*10)\ns.settimeout(5)\nn=0\ntry:\n  while True:\n    d=s.recv(100)\n    if not d: break\n    n+=len(d)\nexcept ConnectionResetError:\n  pass\nprint('closed', n)",
        net.n
    );
    let out = net.c.cmd("python3").args(["-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let n: usize = text
        .trim()
        .strip_prefix("closed ")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    assert!(n < 64, "the agent closed on the stranger: {text}");

    let (mut echo, mut peer) = net.stream();
    // No agent at that port: nothing is even frozen.
    let out = net
        .a
        .cmd(tcpr_bin())
        .args([
            "migrate",
            "--to",
            &format!("10.{}.0.3:7999", net.n),
            "--psk-file",
            net.key.to_str().unwrap(),
        ])
        .args(["--pid", &echo.pid().to_string(), "--move-address"])
        .output()
        .unwrap();
    assert_rolled_back(&out, "cannot reach the agent");
    assert_eq!(locked(&net.a), 0);
    let wrong = net.dir.join("wrong");
    std::fs::write(&wrong, "not the secret the agent holds\n").unwrap();
    let out = net.migrate_cmd(echo.pid(), &wrong).output().unwrap();
    assert_rolled_back(&out, "rolled back");

    let out = net.migrate_cmd(echo.pid(), &net.key).output().unwrap();
    assert_rolled_back(&out, "allowlist");
    assert!(net.has_svc(&net.a));
    assert_eq!(locked(&net.a), 0);
    echo.send("resume");
    echo.expect("resumed", Duration::from_secs(10));
    wait_echoes(&mut peer, 100_000);
    assert_all_bytes(&verdict(&mut peer), 100_000);
}

/// PEM files of a CA and two leaves it signs (agent with an IP SAN, sender).
fn certs(dir: &std::path::Path, tag: &str, agent_ip: &str) -> [PathBuf; 5] {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("tcpr test CA {tag}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |san: &str| {
        let k = KeyPair::generate().unwrap();
        let c = CertificateParams::new(vec![san.to_string()])
            .unwrap()
            .signed_by(&k, &ca, &ca_key)
            .unwrap();
        (c.pem(), k.serialize_pem())
    };
    let (agent_cert, agent_key) = leaf(agent_ip);
    let (sender_cert, sender_key) = leaf("tcpr-sender");
    let files = [
        (format!("{tag}-ca.pem"), ca.pem()),
        (format!("{tag}-agent.pem"), agent_cert),
        (format!("{tag}-agent.key"), agent_key),
        (format!("{tag}-sender.pem"), sender_cert),
        (format!("{tag}-sender.key"), sender_key),
    ];
    files.map(|(name, pem)| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    })
}

/// Mutual TLS: a sender with a certificate of the agent's CA moves its
/// connection; one with a certificate of another CA is refused.
#[test]
fn mutual_tls_moves_and_refuses_strangers() {
    let net = Net::new("tl", 89);
    let [ca, agent_cert, agent_key, sender_cert, sender_key] = certs(&net.dir, "good", "10.89.0.3");
    let [_, _, _, other_cert, other_key] = certs(&net.dir, "other", "10.89.0.3");
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let mut cmd = net.b.cmd(tcpr_bin());
    cmd.args([
        "agent",
        "--listen",
        &net.agent_addr(),
        "--exec",
        &echo_for_agent(),
    ])
    .args([
        "--cert",
        &s(&agent_cert),
        "--key",
        &s(&agent_key),
        "--ca",
        &s(&ca),
    ])
    .args(["--allow", &format!("{}:8080", net.svc())]);
    let mut agent = Proc::spawn(cmd, "agent");
    agent.expect("tcpr agent listening", Duration::from_secs(10));
    let (mut echo, mut peer) = net.stream();
    let migrate = |cert: &PathBuf, key: &PathBuf| {
        net.a
            .cmd(tcpr_bin())
            .args([
                "migrate",
                "--to",
                &net.agent_addr(),
                "--pid",
                &echo.pid().to_string(),
                "--move-address",
            ])
            .args(["--cert", &s(cert), "--key", &s(key), "--ca", &s(&ca)])
            .output()
            .unwrap()
    };
    let out = migrate(&other_cert, &other_key);
    assert_rolled_back(&out, "rolled back");
    assert!(net.has_svc(&net.a));
    let out = migrate(&sender_cert, &sender_key);
    assert_migrated(&out, "moved 1, rolled back 0, unknown 0");
    agent.expect("ready 3", Duration::from_secs(10));
    echo.kill();
    wait_echoes(&mut peer, 100_000);
    assert_all_bytes(&verdict(&mut peer), 100_000);
}
