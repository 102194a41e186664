//! Rootless restore of a large unsent queue: as an ordinary user (nobody,
//! no capabilities) inside `unshare -Urn`, a loopback connection streaming
//! both ways is dumped while its peer is not reading (megabytes queued and
//! unsent), its owner exits, and `tcpr restore` brings it back. Forcing a
//! buffer size (SO_SNDBUFFORCE) needs CAP_NET_ADMIN in the initial user
//! namespace, which this user lacks: restore must queue what this
//! namespace allows and feed the rest as the peer acknowledges. Every byte
//! is checked both ways.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

/// Bytes that must sit in the server's send queue at the dump (about as
/// much as an autotuned loopback socket queues here is 2.8 MB).
const UNSENT_AT_DUMP: u64 = 2 << 20;

#[test]
fn rootless_restore_of_megabytes_of_unsent_data() {
    let dir = tmpdir("rootless");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let img = dir.join("r.img");
    let state = dir.join("state");
    let ns = Userns::new();

    let mut cmd = ns.cmd("python3");
    cmd.args([
        &py("echo.py"),
        "--listen",
        "127.0.0.1",
        "--port",
        "7000",
        "--state",
        state.to_str().unwrap(),
    ]);
    let mut echo = Proc::spawn(cmd, "echo");
    echo.expect("listening", Duration::from_secs(10));
    let mut cmd = ns.cmd("python3");
    cmd.args([
        &py("peer.py"),
        "--connect",
        "127.0.0.1",
        "--port",
        "7000",
        "--rate",
        "50000000",
    ]);
    let mut peer = Proc::spawn(cmd, "peer");
    peer.expect("connected", Duration::from_secs(10));
    let fd = ready_fd(&mut echo);
    // The peer stops reading: the echo's answers pile up unsent.
    peer.send("stall");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ns.send_queue(7000) < UNSENT_AT_DUMP {
        assert!(
            std::time::Instant::now() < deadline,
            "the send queue never reached {UNSENT_AT_DUMP} bytes: {}",
            ns.send_queue(7000)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    echo.send("pause");
    echo.expect("paused", Duration::from_secs(10));
    let out = ns
        .cmd(tcpr_bin())
        .args([
            "dump",
            "--pid",
            &echo.pid().to_string(),
            "--fd",
            &fd,
            "-o",
            img.to_str().unwrap(),
            "--blob",
            state.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect = tcpr(None, &["inspect", "--json", img.to_str().unwrap()]);
    let v = json(&inspect);
    assert!(
        v["unsent_len"].as_u64().unwrap() >= UNSENT_AT_DUMP / 2,
        "megabytes unsent at the dump: {v}"
    );
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
    // The peer reads again: what did not fit the buffer is fed as it
    // acknowledges, before the program gets the socket.
    peer.send("unstall");
    restored.expect("ready", Duration::from_secs(60));
    assert_all_bytes(&verdict(&mut peer), UNSENT_AT_DUMP);
    // The program tcpr restore runs serves until killed.
    kill_children(restored.pid());
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}

/// More unsent data than an unprivileged namespace may buffer at all: the
/// original (a privileged process) forced its send buffer to hold 16 MiB,
/// while here SO_SNDBUF stops at twice net.core.wmem_max. The restore
/// queues what fits and feeds the rest as the peer acknowledges, before
/// the program gets the socket.
/// A connection whose server (privileged, its send buffer forced large)
/// queued 16 MiB that its client has not read, dumped to `img` and its
/// server gone. Returns the client, which reads on "read".
fn big_unsent_queue(ns: &Userns, img: &std::path::Path, port: u16) -> Proc {
    let args = |role: &str| -> Vec<String> {
        [
            py("bigqueue.py").as_str(),
            "--role",
            role,
            "--addr",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--bytes",
            "16777216",
        ]
        .map(String::from)
        .to_vec()
    };
    let mut cmd = ns.root_cmd("python3");
    cmd.args(args("server"));
    let mut server = Proc::spawn(cmd, "server");
    server.expect("listening", Duration::from_secs(10));
    let mut cmd = ns.cmd("python3");
    cmd.args(args("client"));
    let mut client = Proc::spawn(cmd, "client");
    client.expect("connected", Duration::from_secs(10));
    let fd = server
        .expect("written", Duration::from_secs(30))
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
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
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(img, std::fs::Permissions::from_mode(0o644)).unwrap();
    let v = json(&tcpr(None, &["inspect", "--json", img.to_str().unwrap()]));
    assert!(
        v["unsent_len"].as_u64().unwrap() > 12 << 20,
        "more unsent than an unprivileged buffer holds: {v}"
    );
    server.kill();
    client
}

/// `tcpr restore IMG -- sh` run by nobody in the namespace (extra
/// arguments before the image); the shell says "started" once it has the
/// connection.
fn restore_cmd(ns: &Userns, img: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = ns.cmd(tcpr_bin());
    cmd.arg("restore").args(extra).args([
        img.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo started; read line",
    ]);
    cmd
}

/// The client read the whole response, intact, with no error (a RST
/// would have been one).
fn assert_response_intact(client: &mut Proc) {
    client.send("read");
    let v: serde_json::Value =
        serde_json::from_str(&client.expect("{", Duration::from_secs(60))).unwrap();
    assert!(v["error"].is_null(), "{v}");
    assert_eq!(v["received"], v["expected"], "{v}");
    assert_eq!(v["intact"], true, "{v}");
}

/// Flows locked in the namespace's network namespace.
fn locked_in(ns: &Userns) -> usize {
    let path = format!("/proc/{}/ns/net", ns.keeper.pid());
    std::thread::spawn(move || {
        tcpr_host::enter_netns(&path).unwrap();
        tcpr_engine::lock::locked_flow_count().unwrap()
    })
    .join()
    .unwrap()
}

/// More unsent data than an unprivileged namespace may buffer at all: the
/// original (a privileged process) forced its send buffer to hold 16 MiB,
/// while here SO_SNDBUF stops at twice net.core.wmem_max. The restore
/// queues what fits and feeds the rest as the peer acknowledges, before
/// the program gets the socket.
#[test]
fn rootless_restore_feeds_more_than_the_buffer_allows() {
    let dir = tmpdir("rootless-feed");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let img = dir.join("f.img");
    let ns = Userns::new();
    let mut client = big_unsent_queue(&ns, &img, 7001);
    let mut restored = Proc::spawn(restore_cmd(&ns, &img, &[]), "tcpr restore");
    // Restore waits for room; the client reads, which makes it.
    client.send("read");
    restored.expect("started", Duration::from_secs(60));
    let v: serde_json::Value =
        serde_json::from_str(&client.expect("{", Duration::from_secs(60))).unwrap();
    assert!(v["error"].is_null(), "{v}");
    assert_eq!(v["received"], v["expected"], "{v}");
    assert_eq!(v["intact"], true, "{v}");
    drop(restored);
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A restore that cannot finish (the peer reads nothing within the unsent
/// timeout) fails with a clear error and sends nothing to the peer: the
/// flow is locked for the lease so its packets meet no RST, and the same
/// image restores again once the peer reads.
#[test]
fn a_rootless_restore_that_times_out_can_be_done_again() {
    let dir = tmpdir("rootless-retry");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let img = dir.join("t.img");
    let ns = Userns::new();
    let mut client = big_unsent_queue(&ns, &img, 7002);
    let out = restore_cmd(&ns, &img, &["--unsent-timeout", "1"])
        .output()
        .unwrap();
    assert_clean_failure(&out, "without a FIN or RST");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("started"),
        "the program never got the socket"
    );
    assert_eq!(locked_in(&ns), 1, "the flow is locked after the failure");
    // Once the peer reads, the same image is restored again, whole.
    let mut restored = Proc::spawn(restore_cmd(&ns, &img, &[]), "tcpr restore");
    assert_response_intact(&mut client);
    restored.expect("started", Duration::from_secs(60));
    assert_eq!(locked_in(&ns), 0, "the retry took the flow over");
    drop(restored);
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}
