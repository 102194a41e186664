//! Live connections moved between hosts (network namespaces on a bridge)
//! with the tcpr CLI, while a Python peer streams both ways and checks every
//! byte. The owning process is killed before each restore.

mod common;
use common::*;
use std::time::Duration;
use tcpr_netlab::Lab;

#[derive(Default, Clone, Copy)]
struct Scenario {
    v6: bool,
    /// Random loss on the client and the new host during the move, per mille.
    loss: u32,
    /// The client stops reading before the dump: zero window, full queues.
    stall: bool,
    /// Everything to the client is dropped just before the dump: data in flight.
    blackhole: bool,
}

fn migrate(tag: &str, sc: Scenario) {
    let dir = tmpdir(tag);
    let img = dir.join("conn.img");
    let state = dir.join("app.state");
    let mut lab = Lab::new(tag).unwrap();
    let (svc, plen, c, a, b) = if sc.v6 {
        (
            "fd00:77::100",
            64,
            "fd00:77::1/64",
            "fd00:77::2/64",
            "fd00:77::3/64",
        )
    } else {
        (
            "10.77.0.100",
            24,
            "10.77.0.1/24",
            "10.77.0.2/24",
            "10.77.0.3/24",
        )
    };
    let svc_cidr = format!("{svc}/{plen}");
    let client = lab.host("c", &[c]).unwrap();
    let ha = lab.host("a", &[a, &svc_cidr]).unwrap();
    let hb = lab.host("b", &[b]).unwrap();

    let mut echo = echo_server(&ha, svc, 8080, &["--state", state.to_str().unwrap()]);
    let mut peer = stream_peer(&client, svc, 8080, &["--rate", "2000000"]);
    let fd = ready_fd(&mut echo);
    wait_echoes(&mut peer, FLOWING);
    if sc.stall {
        peer.send("stall");
        // The echo service stops reading only once its own buffer is full:
        // wait for that rather than for a fixed time.
        wait_full_queues(&ha, 8080, &client, Duration::from_secs(30));
    }
    if sc.blackhole {
        client.set_loss(1000).unwrap();
        wait_until(
            "data in flight to the client (ss unacked)",
            ECHO_TIMEOUT,
            || {
                ss(&ha, 8080)
                    .split_whitespace()
                    .filter_map(|f| f.strip_prefix("unacked:"))
                    .any(|n| n != "0")
            },
        );
    }
    echo.send("pause");
    echo.expect("paused", Duration::from_secs(10));
    if sc.loss > 0 {
        client.set_loss(sc.loss).unwrap();
        hb.set_loss(sc.loss).unwrap();
    }

    let pid = echo.pid().to_string();
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
            "--blob",
            state.to_str().unwrap(),
            "--lease",
            "30",
        ],
    );
    assert!(
        out.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&tcpr(None, &["inspect", "--json", img.to_str().unwrap()]));
    let (want_local, want_peer) = if sc.v6 {
        (format!("[{svc}]:8080"), "[fd00:77::1]:")
    } else {
        (format!("{svc}:8080"), "10.77.0.1:")
    };
    assert_eq!(v["local"].as_str().unwrap(), want_local);
    assert!(v["peer"].as_str().unwrap().starts_with(want_peer), "{v}");
    if sc.stall {
        assert_eq!(v["window"]["snd_wnd"], 0, "zero window at the dump: {v}");
        assert!(
            v["unsent_len"].as_u64().unwrap() > 0,
            "unsent data at the dump: {v}"
        );
        assert!(
            v["recv_queue_len"].as_u64().unwrap() > 0,
            "receive queue at the dump: {v}"
        );
    }
    if sc.blackhole {
        assert!(
            v["sent_len"].as_u64().unwrap() > 0,
            "data in flight at the dump: {v}"
        );
    }
    // The owner exits before the restore: the lock must keep the peer from
    // drawing a RST out of the source host.
    echo.kill();
    assert_eq!(locked(&ha), 1, "the flow is locked at the source");
    // Not a wait: the peer's segments meet the ownerless, locked flow for a
    // while; a RST drawn meanwhile would show in the verdict.
    std::thread::sleep(Duration::from_millis(300));

    // Restore on the new host before the address arrives, then move it.
    let mut cmd = hb.cmd(tcpr_bin());
    cmd.args([
        "restore",
        img.to_str().unwrap(),
        "--",
        "python3",
        &py("echo.py"),
    ]);
    let mut restored = Proc::spawn(cmd, "restored echo");
    restored.expect("ready", Duration::from_secs(10));
    ha.del_addr(&svc_cidr).unwrap();
    hb.add_addr(&svc_cidr).unwrap();
    let out = tcpr(Some(&hb), &["announce", "--dev", "eth0", svc]);
    assert!(
        out.status.success(),
        "announce: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if sc.blackhole {
        client.clear_loss().unwrap();
    }
    if sc.stall {
        peer.send("unstall");
    }
    // Every byte sent before the move and more come back through the new
    // host (500_000 echoed: the least the verdict below wants sent).
    wait_echoes(&mut peer, 500_000);
    if sc.loss > 0 {
        client.clear_loss().unwrap();
        hb.clear_loss().unwrap();
    }
    assert_all_bytes(&verdict(&mut peer), 500_000);
    restored.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ipv4_move_while_streaming() {
    migrate("m4", Scenario::default());
}

#[test]
fn ipv6_move_while_streaming() {
    migrate(
        "m6",
        Scenario {
            v6: true,
            ..Default::default()
        },
    );
}

#[test]
fn move_under_random_loss() {
    migrate(
        "ml",
        Scenario {
            loss: 50,
            ..Default::default()
        },
    );
}

#[test]
fn zero_window_full_queues() {
    migrate(
        "mz",
        Scenario {
            stall: true,
            ..Default::default()
        },
    );
    migrate(
        "mz6",
        Scenario {
            stall: true,
            v6: true,
            ..Default::default()
        },
    );
}

#[test]
fn data_in_flight() {
    migrate(
        "mf",
        Scenario {
            blackhole: true,
            ..Default::default()
        },
    );
}

/// `--leave running`: a snapshot; the connection carries on in place.
#[test]
fn snapshot_thaws_in_place() {
    let dir = tmpdir("snap");
    let img = dir.join("snap.img");
    let mut lab = Lab::new("sn").unwrap();
    let client = lab.host("c", &["10.78.0.1/24"]).unwrap();
    let server = lab.host("s", &["10.78.0.2/24"]).unwrap();
    let mut echo = echo_server(&server, "10.78.0.2", 9000, &[]);
    let mut peer = stream_peer(&client, "10.78.0.2", 9000, &[]);
    let fd = ready_fd(&mut echo);
    wait_echoes(&mut peer, FLOWING);
    pause_and_dump(&mut echo, &fd, &img, &["--leave", "running"]);
    assert_eq!(locked(&server), 0, "a snapshot releases the lock");
    let v = json(&tcpr(None, &["inspect", "--json", img.to_str().unwrap()]));
    assert_eq!(v["state"], "ESTABLISHED");
    echo.send("resume");
    echo.expect("resumed", Duration::from_secs(10));
    wait_echoes(&mut peer, 100_000);
    assert_all_bytes(&verdict(&mut peer), 100_000);
    let _ = std::fs::remove_dir_all(&dir);
}
