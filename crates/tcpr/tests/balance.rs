//! `tcpr balance` in network namespaces: a client, the front host, two
//! backends; curl for HTTP by Host and HTTPS by SNI.

#[path = "balance_bed/mod.rs"]
mod balance_bed;
mod common;
use balance_bed::*;
use common::{py, wait_until, Proc};
use tcpr_netlab::balance::Family;

/// Requests for each host land on its backend, over HTTP and HTTPS, on
/// both VIPs; `who` answers "bN PATH CLIENT-IP".
fn assert_routes(bed: &Bed) {
    for family in [Family::V4, Family::V6] {
        for https in [false, true] {
            for (i, host) in HOSTS.iter().enumerate() {
                let body = bed.get(family, https, host, "/who");
                assert!(
                    body.starts_with(&format!("b{i} /who ")),
                    "{host} over {} via {family:?}: {body:?}",
                    if https { "https" } else { "http" }
                );
            }
        }
    }
}

#[test]
fn routes_by_host_and_sni_when_proxying() {
    let mut bed = Bed::new("bp", 140);
    bed.start_servers();
    let config = bed.config_text(false);
    bed.start_balancer(&config, &["--no-steering"]);
    assert_routes(&bed);
    // 2 families x 2 protocols x 2 hosts, all proxied.
    assert_eq!(bed.metric("tcpr_balance_proxied_total"), 8.0);
    assert_eq!(bed.metric("tcpr_balance_handoffs_total"), 0.0);
}

#[test]
fn hands_off_by_host_and_sni() {
    let mut bed = Bed::new("bh", 141);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    bed.start_balancer(&config, &[]);
    assert_routes(&bed);
    assert_eq!(
        bed.metric("tcpr_balance_handoffs_total"),
        8.0,
        "{:?}",
        bed.metrics()
            .iter()
            .filter(|s| s.name.contains("failures") || s.name.contains("fallbacks"))
            .collect::<Vec<_>>()
    );
    assert_eq!(bed.metric("tcpr_balance_fallbacks_total"), 0.0);
    assert_eq!(bed.metric("tcpr_balance_proxied_total"), 0.0);
    // Every accepted connection is counted (it stayed 0: never called).
    assert_eq!(bed.metric("tcpr_balance_connections_total"), 8.0);
}

/// The SHA-256 of the first `n` bytes of the servers' stream.
fn expected_digest(n: u64) -> String {
    let out = std::process::Command::new("python3")
        .args([&py("balance_server.py"), "--digest", &n.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Bytes of the big download: at least 256 MiB.
const BIG: u64 = 256 << 20;

#[test]
fn big_download_bypasses_the_front() {
    let mut bed = Bed::new("bbig", 145);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    bed.start_balancer(&config, &[]);
    let want = expected_digest(BIG);
    for family in [Family::V4, Family::V6] {
        let tx_before = bed.lab.front.tx_bytes("eth0").unwrap();
        let rx_before = bed.lab.client.rx_bytes("eth0").unwrap();
        let vip = bed.lab.vip(family).to_string();
        let out = bed
            .lab
            .client
            .cmd("python3")
            .args([
                &py("balance_client.py"),
                "download",
                &vip,
                "80",
                "b.example",
            ])
            .arg(format!("/bytes/{BIG}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{BIG} {want}")
        );
        let front_tx = bed.lab.front.tx_bytes("eth0").unwrap() - tx_before;
        let client_rx = bed.lab.client.rx_bytes("eth0").unwrap() - rx_before;
        println!("{family:?}: client received {client_rx} bytes, the front transmitted {front_tx}");
        assert!(client_rx >= BIG);
        // What the front sends is the client's ACKs forwarded to the
        // backend: under one percent of the response.
        assert!(
            front_tx < BIG / 100,
            "the front transmitted {front_tx} bytes"
        );
    }
    assert_eq!(bed.metric("tcpr_balance_handoffs_total"), 2.0);
}

/// Requests `ab` makes in the run the agent dies in.
const KILL_RUN_REQUESTS: u32 = 200;
/// Each response's size: its relay lasts long enough for the kill to
/// find some in flight.
const KILL_RUN_RESPONSE_BYTES: u32 = 8 << 20;
/// Hand-offs before the agent is killed.
const HANDOFFS_BEFORE_THE_KILL: f64 = 20.0;

/// An agent SIGKILLed during a run: the connections it relays go on in
/// its relay worker, those that meet the dead agent are proxied, and not
/// one request fails.
#[test]
fn an_agent_killed_mid_run_fails_no_request() {
    let mut bed = Bed::new("bkill", 146);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    bed.start_balancer(&config, &[]);
    let vip = bed.lab.vip(Family::V4).to_string();
    // -r: a broken response is counted as failed, not the end of the run.
    let mut ab = bed.lab.client.cmd("ab");
    ab.args(["-q", "-r", "-c", "4", "-H", "Host: a.example"])
        .args(["-n", &KILL_RUN_REQUESTS.to_string()])
        .arg(format!("http://{vip}/bytes/{KILL_RUN_RESPONSE_BYTES}"));
    let run = std::thread::spawn(move || ab.output().unwrap());
    common::wait_until(
        "hand-offs before the kill",
        std::time::Duration::from_secs(120),
        || bed.metric("tcpr_balance_handoffs_total") >= HANDOFFS_BEFORE_THE_KILL,
    );
    // Backend 0's IPv4 HTTP agent dies; the balancer does not know yet.
    bed.agents[0][0].kill();
    let out = run.join().unwrap();
    let text = assert_all_served(&out, KILL_RUN_REQUESTS);
    assert!(!text.contains("Non-2xx"), "{text}");
    // Those that met the dead agent were proxied to its server.
    assert!(bed.metric("tcpr_balance_fallbacks_total") >= 1.0);
}

/// `--steer-datapath auto` (the default) steers with BPF where it loads:
/// here, as root on this kernel. Without CAP_BPF and CAP_SYS_ADMIN (taken
/// from the bounding set, so root loses them at exec) it says so and
/// steers with nf_tables, and the handoffs work as well.
#[test]
fn auto_steers_with_bpf_or_else_nf_tables() {
    let mut bed = Bed::new("bauto", 149);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    let line = bed.start_balancer_under(&[], &config, &[]).unwrap();
    assert!(line.contains("bpf-tcx on eth0"), "{line}");
    drop(bed.balancer.take());
    let drop_bpf = [
        "setpriv",
        "--bounding-set",
        "-bpf,-sys_admin,-perfmon",
        "--inh-caps",
        "-bpf,-sys_admin,-perfmon",
        "--",
    ];
    // (A long linger: its flows are still steered when the next starts.)
    let line = bed
        .start_balancer_under(&drop_bpf, &config, &["--steer-linger", "600"])
        .unwrap();
    assert!(line.contains("nftables-netdev on eth0"), "{line}");
    assert_routes(&bed);
    assert_eq!(bed.metric("tcpr_balance_handoffs_total"), 8.0);
    assert_eq!(bed.metric("tcpr_balance_fallbacks_total"), 0.0);
    // Killed, it leaves its nf_tables table, which goes on steering its
    // flows: the next balancer, on BPF, leaves it to them (BPF passes on
    // what it does not steer)...
    drop(bed.balancer.take());
    assert!(nft_table(&bed), "a killed balancer's table stays");
    let line = bed.start_balancer_under(&[], &config, &[]).unwrap();
    assert!(line.contains("bpf-tcx on eth0"), "{line}");
    assert!(
        nft_table(&bed),
        "the table steers the flows of the one before"
    );
    assert!(
        bed.balancer_said
            .iter()
            .any(|l| l.starts_with("tcpr balance left the nf_tables steering table")),
        "{:?}",
        bed.balancer_said
    );
    // ... and once they have ended, the next start removes it (else its
    // hook would take every packet BPF passes on).
    drop(bed.balancer.take());
    for map in ["flows4", "flows6"] {
        let out = bed
            .lab
            .front
            .cmd("nft")
            .args(["flush", "map", "netdev", "tcpr_steer", map])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let line = bed.start_balancer_under(&[], &config, &[]).unwrap();
    assert!(line.contains("bpf-tcx on eth0"), "{line}");
    assert!(!nft_table(&bed), "the table of the balancer before is gone");
    assert_eq!(
        bed.get(Family::V4, false, HOSTS[0], "/who")
            .split(' ')
            .next(),
        Some("b0")
    );
}

/// Whether the front has the nf_tables datapath's table.
fn nft_table(bed: &Bed) -> bool {
    bed.lab
        .front
        .cmd("nft")
        .args(["list", "table", "netdev", "tcpr_steer"])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn a_hundred_thousand_connections_leave_no_steering_entry() {
    let mut bed = Bed::new("bmany", 147);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    bed.start_balancer(&config, &["--steer-linger", "0.2"]);
    // 50,000 connections per family from one client address: with the
    // whole port range no 4-tuple comes back while the backend still
    // holds the last one's TIME_WAIT.
    let widened = bed
        .lab
        .client
        .cmd("sysctl")
        .args(["-qw", "net.ipv4.ip_local_port_range=1024 65535"])
        .status()
        .unwrap();
    assert!(widened.success());
    for family in [Family::V4, Family::V6] {
        let vip = match bed.lab.vip(family) {
            std::net::IpAddr::V6(v) => format!("[{v}]"),
            v => v.to_string(),
        };
        ab_serves_all(&bed, &vip, 50_000, 8);
    }
    // Each was handed off, or (an agent slow to answer on this loaded
    // machine) rolled back and proxied: every one was served.
    all_counted_and_unsteered(&bed, 100_000.0);
}

/// `ab` sends `n` requests for b.example to `vip`, `concurrency` at a time:
/// every one completes, none fails.
fn ab_serves_all(bed: &Bed, vip: &str, n: u32, concurrency: u32) {
    let out = bed
        .lab
        .client
        .cmd("ab")
        .args(["-q", "-n", &n.to_string(), "-c", &concurrency.to_string()])
        .args(["-H", "Host: b.example"])
        .arg(format!("http://{vip}/name"))
        .output()
        .unwrap();
    assert_all_served(&out, n);
}

/// `ab` ran to its end with all `n` requests complete and none failed;
/// returns its report.
fn assert_all_served(out: &std::process::Output, n: impl std::fmt::Display) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("Complete requests:      {n}")),
        "{text}"
    );
    assert!(text.contains("Failed requests:        0"), "{text}");
    text
}

/// The balancer counted `requests` connections, at least nine in ten handed
/// off (the rest proxied), and every steering entry is gone since.
fn all_counted_and_unsteered(bed: &Bed, requests: f64) {
    let handed = bed.metric("tcpr_balance_handoffs_total");
    let fell_back = bed.metric("tcpr_balance_fallbacks_total");
    assert_eq!(handed + fell_back, requests);
    assert!(handed >= requests * 0.9, "{handed}");
    common::wait_until(
        "every steering entry is gone",
        std::time::Duration::from_secs(30),
        || bed.metric("tcpr_balance_flows_active") == 0.0,
    );
}

/// A burst of 64 clients at once, on the nf_tables datapath: the agent's
/// queue cuts it into batches of many connections (steered in one
/// transaction each, two batches in flight), every request is served, and
/// no steering entry stays.
#[test]
fn a_burst_is_handed_off_in_batches_and_leaves_no_steering_entry() {
    let mut bed = Bed::new("bburst", 148);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    // The nf_tables datapath (the others run on the default, BPF).
    bed.start_balancer(
        &config,
        &["--steer-linger", "0.2", "--steer-datapath", "nft"],
    );
    let vip = bed.lab.vip(Family::V4).to_string();
    ab_serves_all(&bed, &vip, 5000, 64);
    all_counted_and_unsteered(&bed, 5000.0);
    // The kernel's own listing agrees: no flow element in the table (the
    // flows maps, the closing sets).
    for (kind, set) in [
        ("map", "flows4"),
        ("set", "closing4"),
        ("map", "flows6"),
        ("set", "closing6"),
    ] {
        let out = bed
            .lab
            .front
            .cmd("nft")
            .args(["-j", "list", kind, "netdev", "tcpr_steer", set])
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{set}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(listing.contains(set), "{set}: {listing}");
        assert!(!listing.contains("\"elem\""), "{set}: {listing}");
    }
}

/// The line of the balancer's start that begins with `prefix`, without it.
fn said<'a>(bed: &'a Bed, prefix: &str) -> Option<&'a str> {
    bed.balancer_said
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
}

/// A client's kept-alive connection to a.example on the IPv4 VIP, its
/// first request answered (by backend 0: handed off, when agents are).
fn kept_alive(bed: &Bed) -> Proc {
    let vip = bed.lab.vip(Family::V4).to_string();
    let mut cmd = bed.lab.client.cmd("python3");
    cmd.args([
        &py("balance_client.py"),
        "keepalive",
        &vip,
        "80",
        "a.example",
    ]);
    let mut kept = Proc::spawn(cmd, "keep-alive client");
    kept.expect("connected", START);
    served_again(&mut kept, "handed off");
    kept
}

/// One more request on the kept-alive connection, answered by backend 0.
fn served_again(kept: &mut Proc, what: &str) {
    kept.send("/who");
    let answer = kept.expect("body", START);
    assert!(answer.starts_with("body 200 b0 /who"), "{what}: {answer}");
}

/// A connection handed off lives at its backend; the front only steers its
/// packets there. It outlives the balancer that handed it off: killed
/// (SIGKILL), its steering stays in the kernel (BPF: pinned; nf_tables:
/// the table) and goes on; the next balancer takes the flow over; stopped
/// (SIGTERM) with the flow still open, it leaves it to the kernel again,
/// and the flow is served with no balancer running. Once the flow has
/// ended, a balancer's stop leaves nothing behind. Without that every step
/// after the kill would meet the front's stack, which resets the
/// connection.
fn handed_off_connections_outlive_the_balancer(datapath: &str) {
    let net = if datapath == "bpf" { 150 } else { 160 };
    let mut bed = Bed::new(&format!("pin{}", &datapath[..1]), net);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    // (The bed pins on a BPF file system of the lab's: `ip netns exec`
    // hides the host's /sys/fs/bpf.)
    let args = ["--steer-datapath", datapath, "--steer-linger", "0.5"];
    bed.start_balancer(&config, &args);
    let dir = said(&bed, "tcpr balance steering pinned at ").map(str::to_string);
    assert_eq!(dir.is_some(), datapath == "bpf", "pinned: {dir:?}");
    let mut kept = kept_alive(&bed);
    assert_eq!(bed.metric("tcpr_balance_handoffs_total"), 1.0);

    drop(bed.balancer.take());
    served_again(&mut kept, "after the balancer was killed");

    bed.start_balancer(&config, &args);
    let took = said(&bed, "tcpr balance took over ").unwrap_or_default();
    assert!(
        took.starts_with("1 steered flows from the datapath before"),
        "{took}"
    );
    assert_eq!(bed.metric("tcpr_balance_flows_active"), 1.0);
    served_again(&mut kept, "after a new balancer took it over");

    bed.signal("-TERM");
    let balancer = bed.balancer.as_mut().unwrap();
    let left = balancer.expect("tcpr balance left", START);
    assert_eq!(
        left,
        "tcpr balance left 1 steered flows to the kernel for the next tcpr balance \
         (or to the one running)"
    );
    balancer.expect("tcpr balance drained", START);
    assert!(balancer.child.wait().unwrap().success());
    served_again(&mut kept, "with no balancer running");

    bed.start_balancer(&config, &args);
    served_again(&mut kept, "after one more balancer took it over");
    kept.kill();
    wait_until("the ended flow's entry goes", START, || {
        bed.metric("tcpr_balance_flows_active") == 0.0
    });
    bed.signal("-TERM");
    let balancer = bed.balancer.as_mut().unwrap();
    let mut before_drained = vec![];
    balancer.expect_after("tcpr balance drained", START, &mut before_drained);
    assert!(balancer.child.wait().unwrap().success());
    assert!(
        !before_drained.iter().any(|l| l.contains("left")),
        "{before_drained:?}"
    );
    if let Some(dir) = dir {
        assert!(
            !std::path::Path::new(&dir).exists(),
            "{dir} is left after the last balancer stopped with no flow"
        );
    }
    let out = bed.lab.front.cmd("nft").args(["list", "tables"]).output();
    let tables = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
    assert!(
        !tables.contains("tcpr_steer"),
        "the steering table is left after the last balancer stopped with no flow: {tables}"
    );
}

#[test]
fn handed_off_connections_outlive_a_killed_or_stopped_balancer_bpf() {
    handed_off_connections_outlive_the_balancer("bpf");
}

/// nf_tables is the datapath of kernels before 6.6 (no tcx).
#[test]
fn handed_off_connections_outlive_a_killed_or_stopped_balancer_nft() {
    handed_off_connections_outlive_the_balancer("nft");
}

/// A reload that shrinks a pool while a connection decided for a member
/// the new config no longer has is in its handoff, which then rolls back
/// (its agent stopped, then killed): the connection is proxied to the
/// server of the member it was decided for, and the balancer goes on.
/// Before, a connection named its member by its index in the pool as
/// configured at the decision: looked up in the smaller pool (the
/// fallback's, or a batch started after the reload), it panicked the
/// relay or the agent's batching thread (the client was reset, and after
/// two such panics the agent's queue had no thread left to serve it).
#[test]
fn a_reload_that_shrinks_a_pool_during_a_handoff_serves_the_connection() {
    let mut bed = Bed::new("bshr", 161);
    bed.start_servers();
    bed.start_agents();
    let one = bed.config_text(true);
    // Pool b0 (IPv4 HTTP) with a first member whose server is down: once
    // the health checks say so, connections go to the second (index 1),
    // backend 0's.
    const DOWN: &str = "127.0.0.1:1";
    let two = one.replacen(
        "name = \"b0\"\nmembers = [ ",
        &format!("name = \"b0\"\nmembers = [ {{ server = {DOWN:?} }}, "),
        1,
    );
    assert_ne!(one, two);
    bed.start_balancer(&two, &["--handoff-timeout", "5"]);
    wait_until("the member without a server is down", START, || {
        bed.metrics().iter().any(|s| {
            s.name == "tcpr_balance_member_up"
                && s.labels.get("member").map(String::as_str) == Some(DOWN)
                && s.value == 0.0
        })
    });
    let agent = bed.agents[0][0].child.id().to_string();
    let signal = |sig: &str| {
        let out = std::process::Command::new("kill")
            .args([sig, &agent])
            .output()
            .unwrap();
        assert!(out.status.success(), "kill {sig} {agent}");
    };
    // The agent stopped, the handoff waits for its READY.
    signal("-STOP");
    let vip = bed.lab.vip(Family::V4).to_string();
    let accepted = bed.metric("tcpr_balance_connections_total");
    let request = bed
        .lab
        .client
        .cmd("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-H",
            "Host: a.example",
            &format!("http://{vip}/who"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the request is accepted", START, || {
        bed.metric("tcpr_balance_connections_total") > accepted
    });
    std::fs::write(&bed.config, &one).unwrap();
    bed.signal("-HUP");
    bed.balancer
        .as_mut()
        .unwrap()
        .expect("tcpr balance reloaded", START);
    // Killed before its READY: the handoff rolls back and the connection
    // is proxied, by the pool as it is now.
    signal("-KILL");
    let out = request.wait_with_output().unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.starts_with("b0 "),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(bed.metric("tcpr_balance_fallbacks_total"), 1.0);
    // And the next connection is served.
    assert!(bed
        .get(Family::V4, false, "a.example", "/who")
        .starts_with("b0 "));
    let panics: f64 = bed
        .metrics()
        .iter()
        .filter(|s| {
            s.name == "tcpr_balance_failures_total"
                && s.labels.get("reason").map(String::as_str) == Some("panic")
        })
        .map(|s| s.value)
        .sum();
    assert_eq!(panics, 0.0);
}

/// A SIGHUP, or a second SIGTERM, while the balancer drains is not its
/// end: it goes on draining (the head it waits for is answered) and exits
/// with success. Before, the steering datapath's sweeper thread started
/// before the signals were blocked; once the main thread had stopped
/// waiting for signals (draining), the kernel gave such a signal to that
/// thread, whose default action killed the process (exit 129 or 143) and
/// reset every connection still in its hands.
#[test]
fn signals_during_the_drain_do_not_end_the_balancer() {
    let mut bed = Bed::new("bsig", 163);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    let steering = bed.start_balancer_under(&[], &config, &["--steer-datapath", "bpf"]);
    assert!(steering.is_some_and(|s| s.contains("bpf")));
    let vip = bed.lab.vip(Family::V4).to_string();
    let mut cmd = bed.lab.client.cmd("python3");
    cmd.args([
        &py("balance_client.py"),
        "request",
        &vip,
        "80",
        "GET /who HTTP/1.1\\r\\nHost: a.ex",
        "--hold",
        "1",
    ]);
    let mut slow = Proc::spawn(cmd, "slow client");
    slow.expect("held", START);
    bed.signal("-TERM");
    bed.balancer
        .as_mut()
        .unwrap()
        .expect("tcpr balance draining", START);
    bed.signal("-HUP");
    bed.signal("-TERM");
    bed.signal("-INT");
    slow.send("go");
    assert_eq!(slow.expect("HTTP", START), "HTTP/1.1 408 Request Timeout");
    let balancer = bed.balancer.as_mut().unwrap();
    balancer.expect("tcpr balance drained", START);
    let status = balancer.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// `--steer-idle`: a handed-off connection whose client sends nothing for
/// longer loses its steering entry (the gauge says so); with the default
/// (an hour) it would keep it.
#[test]
fn steer_idle_sets_how_long_a_silent_flow_keeps_its_entry() {
    let mut bed = Bed::new("bidle", 164);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    bed.start_balancer(&config, &["--steer-datapath", "bpf", "--steer-idle", "1"]);
    let mut kept = kept_alive(&bed);
    assert_eq!(bed.metric("tcpr_balance_handoffs_total"), 1.0);
    wait_until("the silent flow's entry goes", START, || {
        bed.metric("tcpr_balance_flows_active") == 0.0
    });
    kept.kill();
}

/// A second balancer that cannot listen (one of its addresses is held by
/// a socket that does not share it) fails before it touches anything: it
/// does not take the steering over from the one running (a datapath that
/// took over, then ended with its failed start, left the flows in a map of
/// its own that nothing swept), and the running one goes on serving its
/// handed-off connection and leaves it to the kernel at its end, as if the
/// second had never run.
#[test]
fn a_second_balancer_that_cannot_listen_changes_nothing() {
    let mut bed = Bed::new("bdup", 165);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    let args = ["--steer-datapath", "bpf"];
    bed.start_balancer(&config, &args);
    let vip = bed.lab.vip(Family::V4).to_string();
    let mut kept = kept_alive(&bed);
    // Port 81 of the VIP, held without SO_REUSEPORT.
    let mut hold = bed.lab.front.cmd("python3");
    hold.args([
        "-c",
        &format!(
            "import socket, sys\ns = socket.socket()\ns.bind(({vip:?}, 81))\ns.listen()\n\
             print('held', flush=True)\nsys.stdin.readline()"
        ),
    ]);
    let mut held = Proc::spawn(hold, "port holder");
    held.expect("held", START);
    let second_config = bed.dir.join("second.toml");
    std::fs::write(
        &second_config,
        format!(
            "{config}[[listener]]\nname = \"extra\"\nbind = [\"{vip}:81\"]\n\
             protocol = \"http\"\ndefault_pool = \"b0\"\n"
        ),
    )
    .unwrap();
    let second = bed
        .lab
        .front
        .cmd(common::tcpr_bin())
        .args(["balance", "--config", second_config.to_str().unwrap()])
        .arg("--steer-pin-dir")
        .arg(bed.lab.pin_dir())
        .args(args)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stdout);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{said}");
    assert!(
        err.contains(&format!("cannot listen on {vip}:81")) && err.contains("in use"),
        "{err}"
    );
    assert!(
        !said.contains("took over") && !said.contains("steering"),
        "{said}"
    );
    served_again(&mut kept, "after the second balancer failed");
    bed.signal("-TERM");
    let balancer = bed.balancer.as_mut().unwrap();
    let left = balancer.expect("tcpr balance left", START);
    assert!(
        left.starts_with("tcpr balance left 1 steered flows"),
        "{left}"
    );
    balancer.expect("tcpr balance drained", START);
    served_again(&mut kept, "with no balancer running");
    kept.kill();
    held.kill();
}

/// A killed agent's stand-in answers a sender's QUERY for a while (here
/// ten minutes), completing the TLS handshake like the agent; the health
/// check asks for the agent's PONG too, so, with no traffic at all (no
/// handoff that fails to mark it), the agent is down from the next check
/// on, and its connections are proxied without a handoff that rolls back
/// first. Before, the handshake alone passed: for the stand-in's life every
/// connection tried a handoff, lost the link, and was proxied only then.
#[test]
fn a_killed_agent_is_down_though_its_stand_in_answers() {
    let mut bed = Bed::new("bstand", 166);
    bed.start_servers();
    bed.start_agents();
    // Backend 0's IPv4 HTTP agent again, with a stand-in that stays.
    let listen = bed.lab.backend_sock(Family::V4, 0, AGENT_HTTP_PORT);
    let stop = std::process::Command::new("kill")
        .args(["-TERM", &bed.agents[0][0].pid().to_string()])
        .status()
        .unwrap();
    assert!(stop.success());
    bed.agents[0][0].child.wait().unwrap();
    let journal = bed.dir.join("journal-standing");
    let mut cmd = bed.agent_cmd(0, listen, SERVER_HTTP_PORT, HTTP_PORT, Some(&journal));
    cmd.args(["--stand-in", "600"]);
    let mut standing = Proc::spawn(cmd, "agent b0 with a long stand-in");
    standing.expect("tcpr agent listening", START);
    bed.agents[0][0] = standing;
    let config = bed.config_text(true);
    bed.start_balancer(&config, &["--steer-datapath", "bpf"]);
    let agent_up = |bed: &Bed| {
        bed.metrics()
            .iter()
            .find(|s| {
                s.name == "tcpr_balance_agent_up"
                    && s.label("agent") == Some(listen.to_string().as_str())
            })
            .map(|s| s.value)
    };
    wait_until("the agent is up", START, || agent_up(&bed) == Some(1.0));
    assert!(bed
        .get(Family::V4, false, "a.example", "/who")
        .starts_with("b0 "));
    assert_eq!(bed.metric("tcpr_balance_handoffs_total"), 1.0);
    // SIGKILL: no goodbye, its stand-in takes the listener. No traffic:
    // only the health check can find it down.
    bed.agents[0][0].kill();
    wait_until("the health check finds the agent down", START, || {
        agent_up(&bed) == Some(0.0)
    });
    let rolled_back = |bed: &Bed| {
        bed.metrics()
            .iter()
            .filter(|s| {
                s.name == "tcpr_balance_failures_total" && s.label("reason") == Some("rolled_back")
            })
            .map(|s| s.value)
            .sum::<f64>()
    };
    assert!(bed
        .get(Family::V4, false, "a.example", "/who")
        .starts_with("b0 "));
    assert_eq!(rolled_back(&bed), 0.0, "proxied without a handoff first");
    assert_eq!(bed.metric("tcpr_balance_fallbacks_total"), 1.0);
    // Its stand-in would stay for its ten minutes.
    let _ = std::process::Command::new("pkill")
        .args(["-f", journal.to_str().unwrap()])
        .status();
}

/// A balancer replaced without a gap: the new one starts beside the old
/// (their listeners share the addresses: SO_REUSEPORT), takes the steering
/// over, and the old one is stopped (SIGTERM) while clients keep opening
/// connections (wrk, a connection per request): no request fails or is
/// refused, and a connection handed off before the restart is served after
/// it. Before, the new balancer could not listen while the old one did,
/// so every restart refused connections between the two.
#[test]
fn a_balancer_is_replaced_under_load_without_a_failed_request() {
    let mut bed = Bed::new("bswap", 167);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    let args = ["--steer-datapath", "bpf"];
    bed.start_balancer(&config, &args);
    let vip = bed.lab.vip(Family::V4).to_string();
    let mut kept = kept_alive(&bed);
    // Clients that count every failure (wrk counts each server's close as
    // a read error, which hides a reset).
    let mut load = bed
        .lab
        .client
        .cmd("python3")
        .args([
            &py("balance_client.py"),
            "loop",
            &vip,
            "80",
            "a.example",
            "300",
            "6",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("connections stream in", START, || {
        bed.metric("tcpr_balance_connections_total") >= 200.0
    });
    let mut old = bed.balancer.take().unwrap();
    bed.start_balancer(&config, &args);
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &old.pid().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    old.expect("tcpr balance drained", START);
    assert!(old.child.wait().unwrap().success());
    served_again(&mut kept, "after the old balancer stopped");
    // The load goes on against the new one alone (its metrics now: the
    // old one's endpoint closed with its listeners) before it stops.
    let after = bed.metric("tcpr_balance_connections_total");
    wait_until("the new balancer serves the load alone", START, || {
        bed.metric("tcpr_balance_connections_total") >= after + 100.0
    });
    std::io::Write::write_all(load.stdin.as_mut().unwrap(), b"stop\n").unwrap();
    let out = load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let counts: Vec<&str> = text.lines().next().unwrap_or("").split(' ').collect();
    assert!(
        matches!(counts[..], ["ok", ok, "failed", "0"] if ok.parse::<u32>().unwrap_or(0) > 100),
        "{text}"
    );
    kept.kill();
}

/// A SYN, a RST and a FIN forged with a handed-off connection's tuple (by
/// a host that knows the client's address and port, not its sequence)
/// leave its steering (BPF) and the connection: it is served again after
/// three lingers of silence, and its entry goes only once its client
/// closes. The entry knows the client's sequence from the handoff (the
/// frozen socket's). Before, the SYN removed the entry, and the RST or FIN
/// cut it to the linger: the connection's next request met the front's
/// stack and was reset.
#[test]
fn forged_packets_leave_a_handed_off_connection_alone() {
    let mut bed = Bed::new("bfrg", 170);
    bed.start_servers();
    bed.start_agents();
    let config = bed.config_text(true);
    let args = ["--steer-datapath", "bpf", "--steer-linger", "0.5"];
    bed.start_balancer(&config, &args);
    let mut kept = kept_alive(&bed);
    assert_eq!(bed.metric("tcpr_balance_handoffs_total"), 1.0);
    let vip = bed.lab.vip(Family::V4).to_string();
    let ss = bed
        .lab
        .client
        .cmd("ss")
        .args(["-Htn", "state", "established", "dst", &vip])
        .output()
        .unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    let local = ss
        .split_whitespace()
        .find(|w| w.contains(':') && !w.starts_with(&vip))
        .and_then(|w| w.rsplit_once(':'))
        .unwrap_or_else(|| panic!("the client's connection in {ss:?}"));
    let forger = format!(
        "{}/../tcpr-steer/tests/forge.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = bed
        .lab
        .client
        .cmd("python3")
        .args([forger.as_str(), local.0, local.1, &vip, "80"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "forged",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(bed.metric("tcpr_balance_flows_active"), 1.0);
    served_again(&mut kept, "after the forged packets");
    kept.kill();
    wait_until("the ended flow's entry goes", START, || {
        bed.metric("tcpr_balance_flows_active") == 0.0
    });
}
