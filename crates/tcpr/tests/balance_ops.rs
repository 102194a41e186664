//! `tcpr balance` operations: --check, bad heads, SIGHUP reload, SIGTERM
//! drain, the metrics and `tcpr balance status`. These run with
//! `--no-steering` (every connection proxied): what they test comes
//! before and around the handoff.

#[path = "balance_bed/mod.rs"]
mod balance_bed;
mod common;
use balance_bed::*;
use common::*;
use std::time::Duration;
use tcpr_netlab::balance::Family;

fn client_py(bed: &Bed, args: &[&str]) -> std::process::Command {
    let mut c = bed.lab.client.cmd("python3");
    c.arg(py("balance_client.py")).args(args);
    c
}

/// One raw request to the v4 VIP's HTTP port; the answer's first line.
fn raw(bed: &Bed, text: &str, split: bool) -> String {
    let vip = bed.lab.vip(Family::V4).to_string();
    let mut c = client_py(bed, &["request", &vip, &HTTP_PORT.to_string(), text]);
    if split {
        c.arg("--split");
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn check_prints_file_line_col() {
    let dir = tmpdir("bchk");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[listener]]\nname = \"web\"\nbind = [\"127.0.0.1:8080\"]\nprotocol = \"http\"\ndefault_pool = \"p\"\n\n[[pool]]\nname = \"p\"\nmembers = [ { server = \"127.0.0.1:9\" } ]\n",
    )
    .unwrap();
    let out = tcpr(None, &["balance", "--check", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.join("bad.toml");
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .replace("default_pool = \"p\"", "default_pool = \"nope\"");
    std::fs::write(&bad, text).unwrap();
    let out = tcpr(None, &["balance", "--check", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let want = format!("{}:5:", bad.display());
    assert!(err.starts_with(&want), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Running with the bad file refuses the same way, changing nothing.
    let out = tcpr(
        None,
        &[
            "balance",
            "--config",
            bad.to_str().unwrap(),
            "--no-steering",
        ],
    );
    assert_clean_failure(&out, &want);
    // The agents' credentials are read as the balancer reads them: a key
    // file that is missing, or too short, fails the check, naming the file.
    let short = dir.join("short.psk");
    std::fs::write(&short, "12345").unwrap();
    for (psk, says) in [
        (dir.join("missing.psk"), "cannot read the key file"),
        (short, "at least 16"),
    ] {
        let keyed = dir.join("keyed.toml");
        let text = std::fs::read_to_string(&good).unwrap();
        std::fs::write(
            &keyed,
            format!("[agents]\npsk_file = {:?}\n\n{text}", psk.to_str().unwrap()),
        )
        .unwrap();
        let out = tcpr(None, &["balance", "--check", keyed.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.starts_with(&format!("{}: [agents]: ", keyed.display())) && err.contains(says),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_heads_are_answered_and_never_block_others() {
    let mut bed = Bed::new("bbad", 142);
    bed.start_servers();
    let config = bed
        .config_text(false)
        .replace("head_timeout_ms = 2000", "head_timeout_ms = 5000");
    bed.start_balancer(&config, &["--no-steering"]);
    // Fifty clients that never finish their heads.
    let vip = bed.lab.vip(Family::V4).to_string();
    let mut slow = Proc::spawn(
        client_py(
            &bed,
            &[
                "request",
                &vip,
                "80",
                "GET /who HTTP/1.1\\r\\nHost: a.ex",
                "--hold",
                "50",
            ],
        ),
        "slow clients",
    );
    slow.expect("held", START);
    // Others are served meanwhile, well within the slow ones' head timeout.
    let out = bed.curl(&[
        "--max-time",
        "4",
        "-H",
        "Host: b.example",
        &format!("http://{vip}/who"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("b1 /who"));
    // A head split over one segment per byte is read whole.
    let split = "GET /who HTTP/1.1\\r\\nHost: a.example\\r\\nConnection: close\\r\\n\\r\\n";
    assert_eq!(
        raw(&bed, split, true),
        "HTTP/1.0 200 OK".replace("1.0", "1.1")
    );
    assert_eq!(
        raw(&bed, "BLAH\\r\\n\\r\\n", false),
        "HTTP/1.1 400 Bad Request"
    );
    // A refusal's stream ends with a FIN: the unread head is dropped
    // first, so its close sends no RST that could reach the client before
    // it read the answer.
    for (head, answer) in [
        ("BLAH\\r\\n\\r\\n", "HTTP/1.1 400 Bad Request"),
        (
            "GET / HTTP/1.1\\r\\nHost: c.example\\r\\n\\r\\n",
            "HTTP/1.1 404 Not Found",
        ),
    ] {
        let vip = bed.lab.vip(Family::V4).to_string();
        let out = client_py(&bed, &["request", &vip, "80", head, "--ending"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [answer, "end fin"],
            "{text}"
        );
    }
    let huge = format!(
        "GET / HTTP/1.1\\r\\nHost: a.example\\r\\nX: {}\\r\\n\\r\\n",
        "y".repeat(20_000)
    );
    assert_eq!(
        raw(&bed, &huge, false),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert_eq!(
        raw(
            &bed,
            "GET / HTTP/1.1\\r\\nHost: c.example\\r\\n\\r\\n",
            false
        ),
        "HTTP/1.1 404 Not Found"
    );
    // The slow ones time out with 408.
    slow.send("go");
    for _ in 0..50 {
        assert_eq!(
            slow.expect("HTTP", Duration::from_secs(30)),
            "HTTP/1.1 408 Request Timeout"
        );
    }
    let failures = |reason: &str| {
        bed.metrics()
            .iter()
            .filter(|s| {
                s.name == "tcpr_balance_failures_total" && s.label("reason") == Some(reason)
            })
            .map(|s| s.value)
            .sum::<f64>()
    };
    assert_eq!(failures("head_timeout"), 50.0);
    // (One each above, and one each of the refusals' endings.)
    assert_eq!(failures("head_malformed"), 2.0);
    assert_eq!(failures("head_too_large"), 1.0);
    assert_eq!(failures("no_route"), 2.0);
    // An unknown SNI gets a TLS alert (curl reports the handshake failure).
    let out = bed.curl(&[
        "-k",
        "--resolve",
        &format!("c.example:443:{vip}"),
        "https://c.example/who",
    ]);
    assert!(!out.status.success());
    assert_eq!(failures("no_route"), 3.0);
}

#[test]
fn sighup_reloads_and_sigterm_drains_without_dropping_a_connection() {
    let mut bed = Bed::new("brel", 143);
    bed.start_servers();
    let config = bed.config_text(false);
    bed.start_balancer(&config, &["--no-steering"]);
    let vip = bed.lab.vip(Family::V4).to_string();
    let mut kept = Proc::spawn(
        client_py(&bed, &["keepalive", &vip, "80", "a.example"]),
        "keep-alive client",
    );
    kept.expect("connected", START);
    kept.send("/who");
    assert!(kept.expect("body", START).starts_with("body 200 b0 /who"));
    // Swap the hosts' pools and reload.
    std::fs::write(
        &bed.config,
        config
            .replace("pool = \"b0", "pool = \"tmp")
            .replace("pool = \"b1", "pool = \"b0")
            .replace("pool = \"tmp", "pool = \"b1"),
    )
    .unwrap();
    bed.signal("-HUP");
    bed.balancer
        .as_mut()
        .unwrap()
        .expect("tcpr balance reloaded", START);
    assert!(bed
        .get(Family::V4, false, "a.example", "/who")
        .starts_with("b1 "));
    assert!(bed
        .get(Family::V6, true, "a.example", "/who")
        .starts_with("b1 "));
    // The connection accepted before carries on with its first decision.
    kept.send("/who");
    assert!(kept.expect("body", START).starts_with("body 200 b0 /who"));
    // A broken file changes nothing.
    std::fs::write(&bed.config, "[[listener]]\nname = 3\n").unwrap();
    bed.signal("-HUP");
    bed.balancer
        .as_mut()
        .unwrap()
        .expect("tcpr balance reload failed", START);
    assert!(bed
        .get(Family::V4, false, "a.example", "/who")
        .starts_with("b1 "));
    // SIGTERM: no new connection, the open one is served to its end.
    bed.signal("-TERM");
    bed.balancer
        .as_mut()
        .unwrap()
        .expect("tcpr balance draining", START);
    wait_until("the listeners close", START, || {
        !bed.curl(&["--max-time", "2", &format!("http://{vip}/who")])
            .status
            .success()
    });
    kept.send("/who");
    assert!(kept.expect("body", START).starts_with("body 200 b0 /who"));
    kept.kill();
    bed.balancer
        .as_mut()
        .unwrap()
        .expect("tcpr balance drained", START);
    let status = bed.balancer.as_mut().unwrap().child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn status_prints_the_metrics_as_a_table() {
    let mut bed = Bed::new("bst", 144);
    bed.start_servers();
    let config = bed.config_text(false);
    bed.start_balancer(&config, &["--no-steering"]);
    bed.get(Family::V4, false, "a.example", "/who");
    let out = bed
        .lab
        .front
        .cmd(tcpr_bin())
        .args(["balance", "status", "--metrics", METRICS])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.lines().next().unwrap().starts_with("METRIC"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("tcpr_balance_proxied_total{") && l.contains("pool=b0}"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.trim_end().ends_with(" 1"), "{row}");
}

/// SIGTERM under a steady stream of new connections (wrk, a connection
/// per request): the listeners close at once and the balancer drains.
/// Before, an accept loop looked at its stop flag only once its backlog
/// had stayed empty for 200 ms, which steady load never allows: it went on
/// accepting and never drained (a SIGHUP removing a busy listener blocked
/// the signal thread the same way).
#[test]
fn sigterm_drains_under_a_steady_stream_of_new_connections() {
    let mut bed = Bed::new("bterm", 162);
    bed.start_servers();
    let config = bed.config_text(false);
    bed.start_balancer(&config, &["--no-steering"]);
    let vip = bed.lab.vip(Family::V4).to_string();
    let mut wrk = bed
        .lab
        .client
        .cmd("wrk")
        .args([
            "-t1",
            "-c8",
            "-d60s",
            "-H",
            "Host: a.example",
            "-H",
            "Connection: close",
            &format!("http://{vip}/who"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("connections stream in", START, || {
        bed.metric("tcpr_balance_connections_total") >= 500.0
    });
    bed.signal("-TERM");
    let balancer = bed.balancer.as_mut().unwrap();
    balancer.expect("tcpr balance draining", START);
    // Well before wrk's 60 s end.
    balancer.expect("tcpr balance drained", Duration::from_secs(20));
    let status = balancer.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let _ = wrk.kill();
    let _ = wrk.wait();
}

/// `--drain-timeout`: a proxied connection still open when the drain's
/// time is up is reset (its client reads a reset, not an end of stream
/// that would pass for a whole answer), and the balancer exits. Before,
/// a drain waited for every proxied connection however long it lasted: a
/// service manager's SIGKILL ended it, and its relays with a FIN.
#[test]
fn drain_timeout_resets_the_proxied_connections_left() {
    let mut bed = Bed::new("bdto", 169);
    bed.start_servers();
    let config = bed.config_text(false);
    bed.start_balancer(&config, &["--no-steering", "--drain-timeout", "1"]);
    let vip = bed.lab.vip(Family::V4).to_string();
    // Kept alive by the server after its answer: the relay stays.
    let mut kept = Proc::spawn(
        client_py(
            &bed,
            &[
                "request",
                &vip,
                "80",
                "GET /who HTTP/1.1\\r\\nHost: a.example\\r\\n\\r\\n",
                "--ending",
            ],
        ),
        "kept-alive client",
    );
    assert_eq!(kept.expect("HTTP", START), "HTTP/1.1 200 OK");
    let asked = std::time::Instant::now();
    bed.signal("-TERM");
    let balancer = bed.balancer.as_mut().unwrap();
    balancer.expect("tcpr balance draining", START);
    balancer.expect("tcpr balance drain timed out", START);
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "the drain waited its second first"
    );
    assert_eq!(kept.expect("end", START), "end rst");
    assert_eq!(
        balancer.expect("tcpr balance reset", START),
        "tcpr balance reset 1 proxied connections"
    );
    balancer.expect("tcpr balance drained", START);
    let status = balancer.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// `balance = "least-conn"` counts the connections the balancer holds for
/// each member (here proxied: no agents): while one kept-alive connection
/// holds one member, every new connection goes to the other. Before, no
/// connection was ever counted, and least-conn went round like
/// round-robin.
#[test]
fn least_conn_sends_new_connections_to_the_member_with_fewer() {
    let mut bed = Bed::new("blc", 168);
    bed.start_servers();
    let vip = bed.lab.vip(Family::V4);
    let server = |i: usize| sock(bed.lab.backend_addr(Family::V4, i), SERVER_HTTP_PORT);
    let config = format!(
        "[metrics]\nlisten = {METRICS:?}\n\n[[listener]]\nname = \"web\"\nbind = [{:?}]\n\
         protocol = \"http\"\ndefault_pool = \"both\"\n\n[[pool]]\nname = \"both\"\n\
         balance = \"least-conn\"\nmembers = [ {{ server = {:?} }}, {{ server = {:?} }} ]\n",
        sock(vip, HTTP_PORT),
        server(0),
        server(1)
    );
    bed.start_balancer(&config, &["--no-steering"]);
    let mut kept = Proc::spawn(
        client_py(&bed, &["keepalive", &vip.to_string(), "80", "a.example"]),
        "keep-alive client",
    );
    kept.expect("connected", START);
    kept.send("/who");
    let held = kept.expect("body", START);
    let held_by = held.split(' ').nth(2).expect("a server's name").to_string();
    let other = if held_by == "b0" { "b1" } else { "b0" };
    for _ in 0..6 {
        let answer = bed.get(Family::V4, false, "a.example", "/who");
        assert!(
            answer.starts_with(&format!("{other} ")),
            "{answer} (held: {held_by})"
        );
    }
    kept.kill();
}
