//! What the agent checks before it takes a batch over: the service address
//! a sender asks it to take (only one an --allow entry names), and its
//! delivery target (at start, before READY and at COMMIT), so that a batch
//! it cannot take over rolls back cleanly; and a connection it resumed but
//! cannot deliver is closed without a FIN.

mod agent_net;
mod common;
use agent_net::*;
use common::*;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs a command that must end by itself (an agent that should refuse to
/// start); kills it and fails if it does not end within 20 s.
fn must_end(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running (it should have refused to start): {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// After a refused batch: the address is still at the source only, nothing
/// of the connection at the agent's host, and it carries on at the source.
fn carries_on_at_the_source(net: &Net, echo: &mut Proc, peer: &mut Proc) {
    assert!(
        net.has_svc(&net.a) && !net.has_svc(&net.b),
        "address stayed"
    );
    assert_eq!(net.service_sockets(&net.b), Vec::<String>::new());
    assert_eq!(locked(&net.a), 0);
    echo.send("resume");
    echo.expect("resumed", Duration::from_secs(10));
    wait_echoes(peer, 100_000);
    assert_all_bytes(&verdict(peer), 100_000);
}

/// An authenticated sender asks the agent to take an address that no
/// --allow entry names (a port-wide 0.0.0.0:PORT entry allows connections
/// on any address, not taking one): refused before READY, nothing changed
/// on the agent's host.
#[test]
fn an_address_outside_the_allowlist_is_refused() {
    let net = Net::new("ta", 70);
    let other = format!("10.{}.0.77:8080", net.n);
    let _agent = net.agent(
        &[
            "--exec",
            &echo_for_agent(),
            "--allow",
            "0.0.0.0:8080",
            "--allow",
            &other,
        ],
        None,
    );
    let (mut echo, mut peer) = net.stream();
    let addrs_before = net.b.ip(&["-o", "addr", "show"]).unwrap().stdout;
    let out = net.migrate(echo.pid(), &[]);
    assert_rolled_back(&out, "may not take the address");
    let addrs_after = net.b.ip(&["-o", "addr", "show"]).unwrap().stdout;
    assert_eq!(
        String::from_utf8_lossy(&addrs_before),
        String::from_utf8_lossy(&addrs_after),
        "the agent's host addresses are unchanged"
    );
    carries_on_at_the_source(&net, &mut echo, &mut peer);
}

/// Delivery targets that cannot take a connection stop the agent at start
/// with one clear line, and `--unix` with `--inetd` is refused.
#[test]
fn an_agent_without_a_delivery_target_does_not_start() {
    let dir = tmpdir("tn");
    let key = dir.join("psk");
    std::fs::write(&key, "a shared secret for the agent tests\n").unwrap();
    let agent = |extra: &[&str]| {
        let mut c = Command::new(tcpr_bin());
        c.args(["agent", "--listen", "127.0.0.1:0", "--psk-file"])
            .arg(&key)
            .args(["--allow", "127.0.0.1:8080", "--journal"])
            .arg(dir.join("journal"))
            .args(extra);
        must_end(c)
    };
    let sock = dir.join("nobody.sock");
    let out = agent(&["--unix", sock.to_str().unwrap()]);
    assert_clean_failure(&out, "nothing accepts connections");
    // A socket file whose owner is gone.
    let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(stale);
    let out = agent(&["--unix", sock.to_str().unwrap()]);
    assert_clean_failure(&out, "nothing accepts connections");
    let out = agent(&["--exec", "no-such-program-tcpr --serve"]);
    assert_clean_failure(&out, "command not found");
    let out = agent(&["--exec", "/nonexistent/serve"]);
    assert_clean_failure(&out, "no such executable");
    for huge in ["1e20", "nan", "0"] {
        let out = agent(&["--exec", "cat", "--timeout", huge]);
        assert_clean_failure(&out, "--timeout");
    }
    let out = agent(&["--unix", sock.to_str().unwrap(), "--inetd"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--inetd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The application behind --unix goes away after the agent started: the
/// next batch is refused before READY and rolls back cleanly.
#[test]
fn a_unix_target_gone_before_prepare_rolls_back() {
    let net = Net::new("tu", 71);
    let sock = net.dir.join("deliver.sock");
    let mut recv = unix_receiver(&net.b, &sock);
    let allow = net.svc_port(8080);
    let _agent = net.agent(&["--unix", sock.to_str().unwrap(), "--allow", &allow], None);
    recv.kill();
    let (mut echo, mut peer) = net.stream();
    let out = net.migrate(echo.pid(), &[]);
    assert_rolled_back(&out, "nothing accepts connections");
    carries_on_at_the_source(&net, &mut echo, &mut peer);
}

/// The program behind --exec disappears after the agent started: refused
/// before READY, rolled back (it used to move, and the shell's exit closed
/// the connection with a FIN).
#[test]
fn an_exec_target_gone_before_prepare_rolls_back() {
    let net = Net::new("tx", 72);
    let prog = net.dir.join("serve");
    std::fs::write(
        &prog,
        format!("#!/bin/sh\nexec python3 {} --no-control\n", py("echo.py")),
    )
    .unwrap();
    std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let allow = net.svc_port(8080);
    let _agent = net.agent(&["--exec", prog.to_str().unwrap(), "--allow", &allow], None);
    std::fs::remove_file(&prog).unwrap();
    let (mut echo, mut peer) = net.stream();
    let out = net.migrate(echo.pid(), &[]);
    assert_rolled_back(&out, "no such executable");
    carries_on_at_the_source(&net, &mut echo, &mut peer);
}

/// The application goes away between READY and COMMIT, after the sender
/// removed its address: the agent resumes nothing, takes no address and
/// says so (COMMIT refused); the sender puts its address back and thaws.
#[test]
fn a_unix_target_gone_at_commit_rolls_back() {
    let net = Net::new("tc", 73);
    let sock = net.dir.join("deliver.sock");
    let mut recv = unix_receiver(&net.b, &sock);
    let allow = net.svc_port(8080);
    let _agent = net.agent(
        &["--unix", sock.to_str().unwrap(), "--allow", &allow],
        Some("ready"),
    );
    let (mut echo, mut peer) = net.stream();
    let mut mig = net.migrate_cmd(echo.pid(), &[]).spawn().unwrap();
    net.wait_reached("ready", &mut mig);
    recv.kill();
    net.release("ready");
    let out = mig.wait_with_output().unwrap();
    assert_rolled_back(&out, "did not resume");
    carries_on_at_the_source(&net, &mut echo, &mut peer);
}

/// The application takes the connection's message and closes without
/// acknowledging it, after the connection was resumed: the agent closes
/// it in repair mode, so the client never reads an end of stream that
/// would pass for a complete response, and the sender reports it.
#[test]
fn a_connection_the_agent_cannot_deliver_is_never_ended_with_a_fin() {
    let net = Net::new("td", 74);
    let sock = net.dir.join("deliver.sock");
    let mut recv = {
        let mut cmd = net.b.cmd("python3");
        cmd.args([&py("agent_dropper.py"), sock.to_str().unwrap()]);
        Proc::spawn(cmd, "dropper")
    };
    recv.expect("listening", Duration::from_secs(10));
    let allow = net.svc_port(8080);
    let _agent = net.agent(&["--unix", sock.to_str().unwrap(), "--allow", &allow], None);
    let mut echo = echo_server(&net.a, &net.svc(), 8080, &[]);
    let mut client = {
        let mut cmd = net.c.cmd("python3");
        cmd.args([
            &py("agent_quiet_client.py"),
            "--connect",
            &net.svc(),
            "--port",
            "8080",
        ]);
        Proc::spawn(cmd, "quiet client")
    };
    client.expect("connected", Duration::from_secs(10));
    echo.expect("ready", Duration::from_secs(10));
    echo.send("pause");
    echo.expect("paused", Duration::from_secs(10));
    let out = net.migrate(echo.pid(), &[]);
    recv.expect("dropped 1", Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        last_line(&out).starts_with("moved 0, rolled back 0, unknown 1"),
        "{} {}",
        last_line(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("closed silently"),
        "the report says what happened: {}",
        stderr(&out)
    );
    client.send("read");
    assert_eq!(
        client.expect("", Duration::from_secs(10)),
        "silent",
        "no FIN, no RST reached the client"
    );
}
