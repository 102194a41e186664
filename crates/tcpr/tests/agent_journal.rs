//! The agent is SIGKILLed at every protocol step, including the one between
//! delivering the connection and sending COMMITTED, and restarted on the
//! same journal: every connection ends with exactly one live copy (rolled
//! back at the source, or moved to the agent's host), never two. An agent
//! that is not restarted after COMMIT leaves the sender with a clear
//! `unknown` (its copy frozen), never a roll back.

mod agent_net;
mod common;
use agent_net::*;
use common::*;
use std::time::Duration;

/// Where the connection must end when the agent dies at `point`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ends {
    AtTheSource,
    AtTheAgent,
}

fn killed_at(point: &str, n: u8, restart: bool) -> Ends {
    let net = Net::new(&format!("j{n}"), n);
    let allow = net.svc_port(8080);
    let args = ["--exec", &echo_for_agent(), "--allow", &allow];
    let mut agent = net.agent(&args, Some(point));
    let (mut echo, mut peer) = net.stream();
    let mut mig = net
        .migrate_cmd(echo.pid(), &["--timeout", "5"])
        .spawn()
        .unwrap();
    net.wait_reached(point, &mut mig);
    assert!(std::process::Command::new("kill")
        .args(["-KILL", &agent.pid().to_string()])
        .status()
        .unwrap()
        .success());
    agent.kill();
    let _restarted = restart.then(|| net.agent(&args, None));
    let out = mig.wait_with_output().unwrap();
    let line = last_line(&out);
    let ends = if line.starts_with("moved 1, rolled back 0, unknown 0") {
        assert!(out.status.success(), "{point}: {line} {}", stderr(&out));
        assert!(
            net.has_svc(&net.b) && !net.has_svc(&net.a),
            "{point}: the address is at the agent's host only"
        );
        // The copy at the source was discarded in repair mode.
        echo.kill();
        assert_eq!(net.service_sockets(&net.a), Vec::<String>::new(), "{point}");
        Ends::AtTheAgent
    } else {
        assert!(
            line.starts_with("moved 0, rolled back 1, unknown 0"),
            "{point}: {line} {}",
            stderr(&out)
        );
        assert_eq!(out.status.code(), Some(2));
        assert!(
            net.has_svc(&net.a) && !net.has_svc(&net.b),
            "{point}: the address is back at the source only"
        );
        assert_eq!(
            net.service_sockets(&net.b),
            Vec::<String>::new(),
            "{point}: nothing of the connection is left at the agent's host"
        );
        echo.send("resume");
        echo.expect("resumed", Duration::from_secs(10));
        Ends::AtTheSource
    };
    assert_eq!(locked(&net.a), 0, "{point}: no lock left");
    wait_echoes(&mut peer, 100_000);
    assert_all_bytes(&verdict(&mut peer), 100_000);
    ends
}

#[test]
fn agent_killed_at_each_step_and_restarted_on_its_journal() {
    let expected = [
        ("hello", Ends::AtTheSource),
        ("restored", Ends::AtTheSource),
        // COMMIT may be on its way: the restarted agent's journal says
        // the batch was only prepared, so nothing was resumed.
        ("ready", Ends::AtTheSource),
        // The address taken, nothing resumed: the restarted agent gives
        // the address back before it says so.
        ("taken", Ends::AtTheSource),
        // Delivered, COMMITTED never sent: the journal says delivered.
        ("delivered", Ends::AtTheAgent),
        ("committed", Ends::AtTheAgent),
    ];
    for (i, (point, ends)) in expected.into_iter().enumerate() {
        assert_eq!(killed_at(point, 160 + i as u8, true), ends, "{point}");
    }
}

/// Killed at each step after READY and not restarted: the agent's
/// stand-in answers the sender's QUERY from the journal, with the
/// outcomes a restarted agent gives.
#[test]
fn agent_killed_at_each_step_and_not_restarted_its_stand_in_answers() {
    let expected = [
        ("ready", Ends::AtTheSource),
        ("taken", Ends::AtTheSource),
        ("delivered", Ends::AtTheAgent),
    ];
    for (i, (point, ends)) in expected.into_iter().enumerate() {
        assert_eq!(killed_at(point, 170 + i as u8, false), ends, "{point}");
    }
}

/// Killed once the connection is delivered, never restarted and with no
/// stand-in (`--stand-in 0`): the sender cannot know, so it reports
/// `unknown` and keeps its copy frozen (never thawed: the connection lives
/// on at the agent's host).
#[test]
fn an_agent_gone_after_commit_means_unknown_never_a_roll_back() {
    let net = Net::new("jg", 66);
    let allow = net.svc_port(8080);
    let mut agent = net.agent(
        &[
            "--exec",
            &echo_for_agent(),
            "--allow",
            &allow,
            "--stand-in",
            "0",
        ],
        Some("delivered"),
    );
    let (mut echo, mut peer) = net.stream();
    let mut mig = net.migrate_cmd(echo.pid(), &[]).spawn().unwrap();
    net.wait_reached("delivered", &mut mig);
    agent.kill();
    let out = mig.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        last_line(&out).starts_with("moved 0, rolled back 0, unknown 1"),
        "{} {}",
        last_line(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("agent unreachable after COMMIT"),
        "{}",
        stderr(&out)
    );
    // The delivered copy carries the connection; the source's stays
    // frozen and locked.
    assert!(net.has_svc(&net.b) && !net.has_svc(&net.a));
    assert_eq!(locked(&net.a), 1, "the source copy stays locked");
    wait_echoes(&mut peer, 100_000);
    assert_all_bytes(&verdict(&mut peer), 100_000);
    echo.kill();
}

/// Whether something listens on the agent's address (on b).
fn agent_address_held(net: &Net) -> bool {
    let out = net
        .b
        .cmd("ss")
        .args(["-Hltn", "sport = :7070"])
        .output()
        .unwrap();
    assert!(out.status.success());
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// An agent stopped by SIGTERM (batches may be in flight) or killed
/// leaves its stand-in holding its address; the next agent asks it to
/// leave and listens within 3 s, not after the stand-in's 10 s. (An
/// agent that fails at start takes its stand-in along: the one-line
/// errors of tests/privileges.rs and tests/agent_forward.rs would
/// otherwise carry the stand-in's words.)
#[test]
fn a_stopped_or_killed_agents_stand_in_makes_way_for_the_next() {
    let net = Net::new("js", 175);
    let allow = net.svc_port(8080);
    let args = ["--exec", "cat", "--allow", &allow];
    for signal in ["-TERM", "-KILL"] {
        let mut agent = net.agent(&args, None);
        assert!(std::process::Command::new("kill")
            .args([signal, &agent.pid().to_string()])
            .status()
            .unwrap()
            .success());
        let _ = agent.child.wait();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            agent_address_held(&net),
            "{signal}: the stand-in holds the agent's address"
        );
        let asked = std::time::Instant::now();
        let next = net.agent(&args, None);
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "{signal}: the next agent waited {:?} for its address",
            asked.elapsed()
        );
        drop(next);
    }
}
