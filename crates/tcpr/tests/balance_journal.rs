//! A backend's agent, run with its journal, is SIGKILLed at each step of a
//! balancer's handoff and restarted at once, as a supervisor would: the
//! client's request is served all the same, once. Before the agent
//! resumed anything the restarted agent's journal says so, the balancer
//! rolls back and proxies the connection to the member's server; once the
//! connection is delivered (to the agent's relay worker, which outlives
//! the agent) the journal says that, and the handoff counts as done. This
//! is the remedy for the one window in which a killed agent that is not
//! restarted leaves a connection unknown (COMMIT sent, not yet acted on:
//! the balancer cannot tell, and keeps its copy frozen rather than risk
//! two): `tests/balance.rs` kills one without a restart.

#[path = "balance_bed/mod.rs"]
mod balance_bed;
mod common;
use balance_bed::*;
use common::Proc;
use std::time::{Duration, Instant};
use tcpr_netlab::balance::Family;

/// How the handoff ended, by the balancer's counters.
#[derive(Debug, PartialEq)]
enum Ended {
    /// Rolled back and proxied to the member's server.
    Proxied,
    /// Handed off.
    HandedOff,
}

/// Kills backend 0's HTTP agent (IPv4) at `point` of a handoff of one
/// curl request, restarts it on the same journal when `restart` (else its
/// stand-in answers), and returns how the request was served (asserting
/// that it was, by backend 0, and that no handoff ended unknown).
fn killed_at(point: &str, tag: &str, net: u8, restart: bool) -> Ended {
    let mut bed = Bed::new(tag, net);
    bed.start_servers();
    let journal = bed.dir.join("journal");
    let faults = bed.dir.join("faults");
    std::fs::create_dir_all(&faults).unwrap();
    let listen = bed.lab.backend_sock(Family::V4, 0, AGENT_HTTP_PORT);
    let agent_cmd =
        |bed: &Bed| bed.agent_cmd(0, listen, SERVER_HTTP_PORT, HTTP_PORT, Some(&journal));
    let mut faulty = agent_cmd(&bed);
    faulty
        .env("TCPR_FAULT_STOP_AT", point)
        .env("TCPR_FAULT_DIR", &faults);
    let mut agent = Proc::spawn(faulty, "agent with a fault point");
    agent.expect("tcpr agent listening", START);
    let config = bed.config_text(true);
    // A timeout long enough for the restart on a loaded machine: the
    // balancer asks the restarted agent for that long.
    bed.start_balancer(&config, &["--handoff-timeout", "10"]);
    let vip = bed.lab.vip(Family::V4);
    let mut curl = bed.lab.client.cmd("curl");
    curl.args(["-sS", "--fail", "--max-time", "60", "-H", "Host: a.example"])
        .arg(format!("http://{vip}/who"));
    let request = std::thread::spawn(move || curl.output().unwrap());
    let reached = faults.join(format!("reached-{point}"));
    let deadline = Instant::now() + START;
    while !reached.exists() {
        assert!(Instant::now() < deadline, "the agent never reached {point}");
        std::thread::sleep(Duration::from_millis(10));
    }
    agent.kill();
    let _restarted = restart.then(|| {
        let mut p = Proc::spawn(agent_cmd(&bed), "restarted agent");
        p.expect("tcpr agent listening", START);
        p
    });
    let out = request.join().unwrap();
    assert!(
        out.status.success(),
        "{point}: curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.starts_with("b0 /who "), "{point}: {body:?}");
    // The response may come (from the relay worker) while the balancer
    // still asks the restarted agent what became of the batch.
    common::wait_until("the handoff's end counted", START, || {
        bed.metric("tcpr_balance_handoffs_total") + bed.metric("tcpr_balance_failures_total") >= 1.0
    });
    let unknown: f64 = bed
        .metrics()
        .iter()
        .filter(|s| s.name == "tcpr_balance_failures_total")
        .filter(|s| s.labels.get("reason").map(String::as_str) == Some("unknown"))
        .map(|s| s.value)
        .sum();
    assert_eq!(unknown, 0.0, "{point}: a handoff ended unknown");
    let (handoffs, fallbacks) = (
        bed.metric("tcpr_balance_handoffs_total"),
        bed.metric("tcpr_balance_fallbacks_total"),
    );
    match (handoffs, fallbacks) {
        (0.0, 1.0) => Ended::Proxied,
        (1.0, 0.0) => Ended::HandedOff,
        other => panic!("{point}: (handoffs, fallbacks) = {other:?}"),
    }
}

/// Where each kill point ends: a roll back and the member's server
/// before anything was resumed, the handoff once delivered.
const EXPECTED: [(&str, Ended); 4] = [
    // Before READY: the link breaks before COMMIT, a plain roll back.
    ("restored", Ended::Proxied),
    // READY sent, COMMIT on its way or read: the journal says the batch
    // was only prepared (the window a dead agent with no journal leaves
    // unknown).
    ("ready", Ended::Proxied),
    // COMMIT journaled, nothing resumed yet.
    ("taken", Ended::Proxied),
    // Delivered to the relay worker, COMMITTED never sent: the worker
    // serves it and the journal says delivered.
    ("delivered", Ended::HandedOff),
];

#[test]
fn an_agent_killed_at_each_step_and_restarted_on_its_journal_fails_no_request() {
    for (i, (point, ends)) in EXPECTED.into_iter().enumerate() {
        let tag = format!("bj{i}");
        assert_eq!(killed_at(point, &tag, 150 + i as u8, true), ends, "{point}");
    }
}

/// Not restarted: the agent's stand-in answers the balancer's QUERY from
/// the journal, with the same outcomes.
#[test]
fn an_agent_killed_at_each_step_and_not_restarted_fails_no_request() {
    for (i, (point, ends)) in EXPECTED.into_iter().enumerate() {
        let tag = format!("bs{i}");
        assert_eq!(
            killed_at(point, &tag, 154 + i as u8, false),
            ends,
            "{point}"
        );
    }
}
