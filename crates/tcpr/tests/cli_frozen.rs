//! A frozen socket is never moved twice (issue 7, hole 6). After `tcpr dump`
//! (which leaves the source frozen) and a restore elsewhere, the original
//! process still holds the frozen socket: `ls` must show it frozen and
//! locked and not dumpable, a second dump and `migrate` must refuse it,
//! and `tcpr thaw` lets a connection that was not moved carry on in place.

mod common;
use common::*;
use std::time::Duration;
use tcpr_netlab::{Host, Lab};

/// `tcpr ls --json` rows of `host` whose local address is `local`.
fn ls_rows(host: &Host, local: &str) -> Vec<serde_json::Value> {
    let out = tcpr(Some(host), &["ls", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["local"] == local)
        .collect()
}

#[test]
fn a_dumped_and_restored_connection_is_not_moved_again() {
    let dir = tmpdir("frozen");
    let key = dir.join("psk");
    std::fs::write(&key, "a shared secret for the frozen tests\n").unwrap();
    let (img, img2) = (dir.join("c.img"), dir.join("again.img"));
    let mut lab = Lab::new("fz").unwrap();
    let c = lab.host("c", &["10.61.0.1/24"]).unwrap();
    let a = lab.host("a", &["10.61.0.2/24", "10.61.0.100/24"]).unwrap();
    let b = lab.host("b", &["10.61.0.3/24"]).unwrap();
    let d = lab.host("d", &["10.61.0.4/24"]).unwrap();
    let mut echo = echo_server(&a, "10.61.0.100", 8080, &[]);
    let mut peer = stream_peer(&c, "10.61.0.100", 8080, &["--rate", "500000"]);
    let fd = ready_fd(&mut echo);
    echo.send("flush");
    echo.expect("paused", Duration::from_secs(10));
    let pid = echo.pid().to_string();

    // The first dump leaves the socket frozen in echo.py, and locked.
    let out = tcpr(
        None,
        &[
            "dump",
            "--pid",
            &pid,
            "--fd",
            &fd,
            "-o",
            img.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = ls_rows(&a, "10.61.0.100:8080");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["state"], "ESTABLISHED");
    assert_eq!(rows[0]["frozen"], true, "{}", rows[0]);
    assert_eq!(rows[0]["locked"], true, "{}", rows[0]);
    assert_eq!(rows[0]["dumpable"], false, "{}", rows[0]);
    assert!(
        rows[0]["not_dumpable_because"]
            .as_str()
            .unwrap()
            .contains("frozen"),
        "{}",
        rows[0]
    );
    let table = String::from_utf8_lossy(&tcpr(Some(&a), &["ls"]).stdout).into_owned();
    assert!(
        table.contains("FROZEN") && table.contains("LOCKED"),
        "{table}"
    );

    // A second dump is refused, before anything changes.
    let out = tcpr(
        None,
        &[
            "dump",
            "--pid",
            &pid,
            "--fd",
            &fd,
            "-o",
            img2.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&out, "frozen already");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frozen-ok"));
    assert!(!img2.exists(), "no image written");
    // Told otherwise, it dumps the same state and leaves the socket frozen.
    let out = tcpr(
        None,
        &[
            "dump",
            "--pid",
            &pid,
            "--fd",
            &fd,
            "-o",
            img2.to_str().unwrap(),
            "--frozen-ok",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = json(&tcpr(
        None,
        &["inspect", "--json", "--data", img.to_str().unwrap()],
    ));
    let second = json(&tcpr(
        None,
        &["inspect", "--json", "--data", img2.to_str().unwrap()],
    ));
    for field in ["send_seq", "recv_seq", "send_queue_len", "recv_queue_len"] {
        assert_eq!(first[field], second[field], "{field}");
    }
    assert_eq!(ls_rows(&a, "10.61.0.100:8080")[0]["frozen"], true);

    // Restored on b, the address follows: the client carries on there.
    let mut cmd = b.cmd(tcpr_bin());
    cmd.args([
        "restore",
        img2.to_str().unwrap(),
        "--",
        "python3",
        &py("echo.py"),
    ]);
    let mut restored = Proc::spawn(cmd, "restored echo");
    restored.expect("ready", Duration::from_secs(10));
    a.del_addr("10.61.0.100/24").unwrap();
    b.add_addr("10.61.0.100/24").unwrap();
    assert!(
        tcpr(Some(&b), &["announce", "--dev", "eth0", "10.61.0.100"])
            .status
            .success()
    );

    // The stale frozen copy on a is not moved again: named, it is refused;
    // listed by address or process, it is left out. Nothing reaches d.
    let mut agent = d.cmd(tcpr_bin());
    agent.args([
        "agent",
        "--listen",
        "10.61.0.4:7070",
        "--psk-file",
        key.to_str().unwrap(),
        "--allow",
        "0.0.0.0:8080",
        "--exec",
        "cat",
    ]);
    let mut agent = Proc::spawn(agent, "agent");
    agent.expect("tcpr agent listening", Duration::from_secs(10));
    let migrate = |sel: &[&str]| {
        let mut args = vec![
            "migrate",
            "--to",
            "10.61.0.4:7070",
            "--psk-file",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(sel);
        tcpr(Some(&a), &args)
    };
    let out = migrate(&["--pid", &pid, "--fd", &fd]);
    assert_clean_failure(&out, "frozen already");
    for sel in [&["--local", "10.61.0.100:8080"][..], &["--pid", &pid][..]] {
        let out = migrate(sel);
        assert!(
            !out.status.success(),
            "{sel:?} moved: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("left out 1 frozen"), "{err}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("moved 1"),
            "{sel:?}"
        );
    }
    assert_eq!(
        ls_rows(&d, "10.61.0.100:8080").len(),
        0,
        "nothing reached the agent"
    );
    assert_eq!(
        ls_rows(&a, "10.61.0.100:8080")[0]["frozen"],
        true,
        "still frozen"
    );

    wait_echoes(&mut peer, 10_000);
    assert_all_bytes(&verdict(&mut peer), 10_000);
    restored.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn thaw_lets_a_dumped_connection_carry_on_in_place() {
    let dir = tmpdir("thaw");
    let img = dir.join("c.img");
    let mut lab = Lab::new("th").unwrap();
    let c = lab.host("c", &["10.62.0.1/24"]).unwrap();
    let a = lab.host("a", &["10.62.0.2/24"]).unwrap();
    let mut echo = echo_server(&a, "10.62.0.2", 8080, &[]);
    let mut peer = stream_peer(&c, "10.62.0.2", 8080, &["--rate", "500000"]);
    let fd = ready_fd(&mut echo);
    pause_and_dump(&mut echo, &fd, &img, &[]);
    let pid = echo.pid().to_string();
    assert_eq!(locked(&a), 1);
    assert_eq!(ls_rows(&a, "10.62.0.2:8080")[0]["frozen"], true);

    let out = tcpr(None, &["thaw", "--pid", &pid, "--fd", &fd]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("thawed 10.62.0.2:8080 -> 10.62.0.1:"));
    assert_eq!(locked(&a), 0, "the lock is released");
    let row = &ls_rows(&a, "10.62.0.2:8080")[0];
    assert_eq!(row["frozen"], false, "{row}");
    assert_eq!(row["locked"], false, "{row}");
    assert_eq!(row["dumpable"], true, "{row}");
    // Nothing left to thaw.
    assert_clean_failure(
        &tcpr(None, &["thaw", "--pid", &pid, "--fd", &fd]),
        "is not frozen",
    );

    echo.send("resume");
    echo.expect("resumed", Duration::from_secs(10));
    assert_all_bytes(&verdict(&mut peer), 10_000);
    let _ = std::fs::remove_dir_all(&dir);
}
