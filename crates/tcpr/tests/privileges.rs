//! Privileges: each subcommand checks at start that it holds what it needs
//! (one line naming what is missing, nothing changed); dump, thaw, restore
//! and ls work for an ordinary user inside `unshare -Urn`; the agent drops
//! to an unprivileged user and still receives a handoff.
//!
//! Not run in a user namespace here: `demo`, `bench` and `bench-handoff`
//! create named network namespaces (`ip netns add` mounts under
//! /run/netns, which needs CAP_SYS_ADMIN over the initial mount
//! namespace); `agent` and `migrate` need two hosts, which the tests build
//! the same way.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use tcpr_netlab::{Host, Lab};

/// A directory an unprivileged user may write.
fn shared_tmpdir(tag: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmpdir(tag);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// The privileged port of the service in the no-capability test.
const SERVICE_PORT: u16 = 80;

/// `setpriv` arguments: nobody with CAP_NET_ADMIN only (ambient, so that
/// it survives the exec of tcpr).
const NET_ADMIN_ONLY: [&str; 6] = [
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all,+net_admin",
    "--ambient-caps=+net_admin",
    "--bounding-set=-all,+net_admin",
];

/// `tcpr ARGS` as nobody without capabilities, in `host`'s network
/// namespace (outside any user namespace).
fn tcpr_unprivileged(host: &Host, args: &[&str]) -> Output {
    let mut cmd = host.cmd("setpriv");
    cmd.args(UNPRIVILEGED).arg(tcpr_bin()).args(args);
    cmd.output().unwrap()
}

/// The `tcpr ls --json` line of the connection on local port `port`.
fn ls_entry(out: &Output, port: u16) -> serde_json::Value {
    assert!(
        out.status.success(),
        "ls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| {
            v["state"] == "ESTABLISHED"
                && v["local"]
                    .as_str()
                    .is_some_and(|l| l.ends_with(&format!(":{port}")))
        })
        .unwrap_or_else(|| {
            panic!(
                "no connection on port {port} ({}): {}; stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

#[test]
fn without_capabilities_each_subcommand_fails_at_start_and_changes_nothing() {
    let dir = shared_tmpdir("noprivs");
    let key = dir.join("psk");
    std::fs::write(&key, "a shared secret for the privilege tests\n").unwrap();
    let mut lab = Lab::new("np").unwrap();
    let h = lab.host("h", &["10.77.0.1/24"]).unwrap();
    h.ip(&["link", "set", "lo", "up"]).unwrap();
    // A privileged port: restoring it needs CAP_NET_BIND_SERVICE too.
    let mut echo = echo_server(&h, "127.0.0.1", SERVICE_PORT, &[]);
    let mut peer = stream_peer(&h, "127.0.0.1", SERVICE_PORT, &[]);
    let fd = ready_fd(&mut echo);
    wait_echoes(&mut peer, FLOWING);
    // A real image (a snapshot: the connection carries on) for restore.
    // The service is paused meanwhile: a recv on a socket in repair mode
    // fails (EPERM), and echo.py then closed the connection (seen 1 run in
    // 4: every later `ls` found no socket at all).
    echo.send("pause");
    echo.expect("paused", Duration::from_secs(10));
    let img = dir.join("snap.img");
    let out = tcpr(
        Some(&h),
        &[
            "dump",
            "--pid",
            &echo.pid().to_string(),
            "--fd",
            &fd,
            "-o",
            img.to_str().unwrap(),
            "--leave",
            "running",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    echo.send("resume");
    echo.expect("resumed", Duration::from_secs(10));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).unwrap();
    let pid = echo.pid().to_string();
    let out_img = dir.join("never.img");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "dump",
                "--pid",
                &pid,
                "--fd",
                &fd,
                "-o",
                out_img.to_str().unwrap(),
            ],
            "`tcpr dump` is not permitted: it needs CAP_NET_ADMIN",
        ),
        (
            vec!["thaw", "--pid", &pid, "--fd", &fd],
            "`tcpr thaw` is not permitted: it needs CAP_NET_ADMIN",
        ),
        (
            vec!["restore", img.to_str().unwrap(), "--", "true"],
            "`tcpr restore` is not permitted: it needs CAP_NET_ADMIN",
        ),
        (
            vec![
                "migrate",
                "--to",
                "10.77.0.2:7070",
                "--psk-file",
                key.to_str().unwrap(),
                "--pid",
                &pid,
            ],
            "`tcpr migrate` is not permitted: it needs CAP_NET_ADMIN",
        ),
        (
            vec![
                "agent",
                "--listen",
                "10.77.0.1:7070",
                "--exec",
                "cat",
                "--psk-file",
                key.to_str().unwrap(),
                "--allow",
                "10.77.0.1:80",
            ],
            "`tcpr agent` is not permitted: it needs CAP_NET_ADMIN",
        ),
        (
            vec!["announce", "--dev", "eth0", "10.77.0.1"],
            "CAP_NET_RAW",
        ),
        (vec!["demo", "--migrations", "1"], "CAP_SYS_ADMIN"),
        (vec!["bench", "--counts", "1"], "CAP_SYS_ADMIN"),
    ];
    for (args, needle) in &cases {
        let out = tcpr_unprivileged(&h, args);
        assert_clean_failure(&out, needle);
        // The connection is untouched: not frozen, not locked, not taken.
        let listed = tcpr(Some(&h), &["ls", "--json"]);
        let entry = ls_entry(&listed, SERVICE_PORT);
        assert_eq!(entry["frozen"], false, "{args:?} froze it: {entry}");
        assert_eq!(entry["locked"], false, "{args:?} locked it: {entry}");
        assert_eq!(locked(&h), 0, "{args:?} left a lock");
    }
    assert!(!out_img.exists(), "dump wrote nothing");
    // With CAP_NET_ADMIN alone, restore names only what it still lacks
    // for this image: its local port is privileged.
    let mut cmd = h.cmd("setpriv");
    cmd.args(NET_ADMIN_ONLY)
        .arg(tcpr_bin())
        .args(["restore", img.to_str().unwrap(), "--", "true"]);
    let out = cmd.output().unwrap();
    assert_clean_failure(
        &out,
        "`tcpr restore` is not permitted: it needs CAP_NET_BIND_SERVICE",
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("CAP_NET_ADMIN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing listens on the agent's port, the address is where it was.
    let listening = h
        .cmd("ss")
        .args(["-Hltn", "( sport = :7070 )"])
        .output()
        .unwrap();
    assert!(listening.stdout.is_empty(), "the agent bound its port");
    // What needs nothing works for anyone.
    let out = tcpr_unprivileged(&h, &["inspect", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ls_entry(&tcpr_unprivileged(&h, &["ls", "--json"]), SERVICE_PORT);
    // And the stream still flows, every byte intact.
    wait_echoes(&mut peer, FLOWING);
    assert_all_bytes(&verdict(&mut peer), FLOWING);
    drop(echo);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tcpr ARGS` by nobody inside the namespace; must succeed.
fn tcpr_in(ns: &Userns, args: &[&str]) -> Output {
    let out = ns.cmd(tcpr_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tcpr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn echo_in(ns: &Userns, port: u16, state: &Path) -> Proc {
    let mut cmd = ns.cmd("python3");
    cmd.args([
        &py("echo.py"),
        "--listen",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--state",
        state.to_str().unwrap(),
    ]);
    let mut echo = Proc::spawn(cmd, "echo");
    echo.expect("listening", Duration::from_secs(10));
    echo
}

#[test]
fn an_ordinary_user_dumps_thaws_restores_and_lists_inside_a_user_namespace() {
    const PORT: u16 = 7200;
    let dir = shared_tmpdir("userns");
    let img = dir.join("c.img");
    let state = dir.join("state");
    let ns = Userns::new();
    let mut echo = echo_in(&ns, PORT, &state);
    let mut cmd = ns.cmd("python3");
    cmd.args([
        &py("peer.py"),
        "--connect",
        "127.0.0.1",
        "--port",
        &PORT.to_string(),
    ]);
    let mut peer = Proc::spawn(cmd, "peer");
    peer.expect("connected", Duration::from_secs(10));
    let fd = ready_fd(&mut echo);
    wait_echoes(&mut peer, FLOWING);
    let pid = echo.pid().to_string();

    // ls: the connection, its owner, dumpable.
    let entry = ls_entry(&tcpr_in(&ns, &["ls", "--json", "--pid", &pid]), PORT);
    assert_eq!(entry["dumpable"], true, "{entry}");
    assert_eq!(
        entry["owners"][0]["pid"].as_i64(),
        Some(i64::from(echo.pid()))
    );

    // dump leaves it frozen and locked; thaw gives it back.
    echo.send("pause");
    echo.expect("paused", Duration::from_secs(10));
    let dump = [
        "dump",
        "--pid",
        &pid,
        "--fd",
        &fd,
        "-o",
        img.to_str().unwrap(),
    ];
    tcpr_in(&ns, &dump);
    let entry = ls_entry(&tcpr_in(&ns, &["ls", "--json"]), PORT);
    assert_eq!(
        (&entry["frozen"], &entry["locked"]),
        (&true.into(), &true.into()),
        "{entry}"
    );
    tcpr_in(&ns, &["thaw", "--pid", &pid, "--fd", &fd]);
    let entry = ls_entry(&tcpr_in(&ns, &["ls", "--json"]), PORT);
    assert_eq!(
        (&entry["frozen"], &entry["locked"]),
        (&false.into(), &false.into()),
        "{entry}"
    );
    echo.send("resume");
    wait_echoes(&mut peer, FLOWING);

    // dump again, the owner exits, restore brings it back.
    echo.send("pause");
    echo.expect("paused", Duration::from_secs(10));
    let with_blob = [&dump[..], &["--blob", state.to_str().unwrap()]].concat();
    tcpr_in(&ns, &with_blob);
    echo.kill();
    let mut cmd = ns.cmd(tcpr_bin());
    cmd.args([
        "restore",
        img.to_str().unwrap(),
        "--",
        "python3",
        &py("echo.py"),
        "--no-control",
    ]);
    let mut restored = Proc::spawn(cmd, "tcpr restore");
    restored.expect("ready", Duration::from_secs(30));
    wait_echoes(&mut peer, FLOWING);
    assert_all_bytes(&verdict(&mut peer), FLOWING);
    kill_children(restored.pid());
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The capability bits of a `/proc/PID/status` field (`CapEff:` ...).
fn cap_field(status: &str, field: &str) -> u64 {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// Bit numbers of capabilities (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;

#[test]
fn the_agent_runs_as_its_user_with_two_capabilities_and_still_takes_a_handoff() {
    let dir = shared_tmpdir("agentuser");
    let key = dir.join("psk");
    std::fs::write(&key, "a shared secret for the privilege tests\n").unwrap();
    let journal = dir.join("journal");
    std::fs::create_dir(&journal).unwrap();
    nix_chown_to_nobody(&journal);
    let mut lab = Lab::new("au").unwrap();
    let c = lab.host("c", &["10.78.0.1/24"]).unwrap();
    let a = lab.host("a", &["10.78.0.2/24", "10.78.0.100/24"]).unwrap();
    let b = lab.host("b", &["10.78.0.3/24"]).unwrap();

    let mut cmd = b.cmd(tcpr_bin());
    cmd.args([
        "agent",
        "--listen",
        "10.78.0.3:7070",
        "--psk-file",
        key.to_str().unwrap(),
        "--allow",
        "10.78.0.100:8080",
        "--journal",
        journal.to_str().unwrap(),
        "--user",
        "nobody",
        "--exec",
        &format!("python3 {} --no-control", py("echo.py")),
    ]);
    let mut agent = Proc::spawn(cmd, "agent");
    agent.expect("tcpr agent listening", Duration::from_secs(10));
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let ids = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap()
            .to_string()
    };
    assert_eq!(
        ids("Uid:").split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "{status}"
    );
    assert_eq!(
        ids("Gid:").split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "{status}"
    );
    let kept = 1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW;
    assert_eq!(cap_field(&status, "CapEff:"), kept, "{status}");
    assert_eq!(cap_field(&status, "CapPrm:"), kept, "{status}");
    assert_eq!(cap_field(&status, "CapBnd:"), kept, "{status}");
    assert_eq!(cap_field(&status, "CapInh:"), 0, "{status}");
    // Its stand-in (for a killed agent) runs as the same user, with
    // CAP_NET_ADMIN only (to give an address back).
    let stand_in = stand_in_of(agent.pid());
    let st = std::fs::read_to_string(format!("/proc/{stand_in}/status")).unwrap();
    let uid = st.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "{st}"
    );
    assert_eq!(cap_field(&st, "CapEff:"), 1 << CAP_NET_ADMIN, "{st}");

    // A connection moves to it, with its address, every byte intact.
    let mut echo = echo_server(&a, "10.78.0.100", 8080, &[]);
    let mut peer = stream_peer(&c, "10.78.0.100", 8080, &["--rate", "1000000"]);
    echo.expect("ready", Duration::from_secs(10));
    wait_echoes(&mut peer, FLOWING);
    echo.send("flush");
    echo.expect("paused", Duration::from_secs(10));
    let out = a
        .cmd(tcpr_bin())
        .args([
            "migrate",
            "--to",
            "10.78.0.3:7070",
            "--psk-file",
            key.to_str().unwrap(),
            "--pid",
            &echo.pid().to_string(),
            "--move-address",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.expect("ready 3", Duration::from_secs(10));
    echo.kill();
    wait_echoes(&mut peer, FLOWING);
    assert_all_bytes(&verdict(&mut peer), FLOWING);
    // The address it took as that user is there, and its journal too.
    let addrs = b.ip(&["-o", "addr", "show"]).unwrap();
    assert!(String::from_utf8_lossy(&addrs.stdout).contains("10.78.0.100/24"));
    assert!(
        std::fs::read_dir(&journal).unwrap().next().is_some(),
        "the journal holds the batch"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_agent_whose_user_cannot_write_the_journal_stops_at_start() {
    let dir = tmpdir("agentjournal");
    let key = dir.join("psk");
    std::fs::write(&key, "a shared secret for the privilege tests\n").unwrap();
    let journal = dir.join("journal");
    std::fs::create_dir(&journal).unwrap();
    let mut lab = Lab::new("aj").unwrap();
    let b = lab.host("b", &["10.79.0.3/24"]).unwrap();
    let out = tcpr(
        Some(&b),
        &[
            "agent",
            "--listen",
            "10.79.0.3:7070",
            "--psk-file",
            key.to_str().unwrap(),
            "--allow",
            "10.79.0.100:8080",
            "--journal",
            journal.to_str().unwrap(),
            "--user",
            "nobody",
            "--exec",
            "cat",
        ],
    );
    assert_clean_failure(&out, "is not writable by nobody");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pid of the stand-in `agent` started (the process running
/// `agent-stand-in ... --agent-pid AGENT`).
fn stand_in_of(agent: i32) -> i32 {
    let marker = agent.to_string();
    let find = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .find(|p| {
                std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                    let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                    args.contains(&&b"agent-stand-in"[..])
                        && args
                            .windows(2)
                            .any(|w| w[0] == b"--agent-pid" && w[1] == marker.as_bytes())
                })
            })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(p) = find() {
            return p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no stand-in of agent {agent} runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--vip` with `--user`: the VIP signal handler's thread starts only
/// once privileges are dropped (from a single thread), so the agent
/// starts, and SIGTERM still takes its VIP off the loopback.
#[test]
fn an_agent_with_a_vip_runs_as_its_user() {
    let dir = shared_tmpdir("agentvip");
    let key = dir.join("psk");
    std::fs::write(&key, "a shared secret for the privilege tests\n").unwrap();
    let mut lab = Lab::new("av").unwrap();
    let b = lab.host("b", &["10.76.0.3/24"]).unwrap();
    let mut cmd = b.cmd(tcpr_bin());
    cmd.args(["agent", "--listen", "10.76.0.3:7070"])
        .args(["--psk-file", key.to_str().unwrap(), "--no-journal"])
        .args(["--vip", "10.76.0.100", "--user", "nobody"])
        .args(["--exec", "cat"]);
    let mut agent = Proc::spawn(cmd, "agent");
    agent.expect("tcpr agent listening", Duration::from_secs(10));
    let on_lo = |b: &tcpr_netlab::Host| {
        let out = b
            .cmd("ip")
            .args(["-o", "addr", "show", "dev", "lo"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("10.76.0.100/32")
    };
    assert!(on_lo(&b), "the VIP is on lo");
    assert!(Command::new("kill")
        .args(["-TERM", &agent.pid().to_string()])
        .status()
        .unwrap()
        .success());
    assert!(agent.child.wait().unwrap().success());
    assert!(!on_lo(&b), "SIGTERM took the VIP off lo");
}

fn nix_chown_to_nobody(path: &Path) {
    let status = Command::new("chown")
        .args(["65534:65534", path.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
}
