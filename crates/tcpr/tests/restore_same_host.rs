//! A restore in the network namespace that holds the flow's lock (a process
//! upgrade on one host) takes the flow over at once: the lock left by
//! `tcpr dump` (default 60 s lease) is released when the restored socket
//! is ready, not waited out. The release happens in the engine's resume,
//! so every restore in that namespace gets it (the engine's own test,
//! `restore_lock_takeover.rs`, covers the library path an agent uses).

mod common;
use common::*;
use std::time::Duration;
use tcpr_netlab::Lab;

#[test]
fn cli_restore_in_the_locking_namespace_takes_the_flow_over_at_once() {
    let dir = tmpdir("samehost");
    let img = dir.join("s.img");
    let state = dir.join("state");
    let mut lab = Lab::new("sh").unwrap();
    let c = lab.host("c", &["10.86.0.1/24"]).unwrap();
    let s = lab.host("s", &["10.86.0.2/24"]).unwrap();
    let mut echo = echo_server(&s, "10.86.0.2", 7000, &["--state", state.to_str().unwrap()]);
    let mut peer = stream_peer(&c, "10.86.0.2", 7000, &["--rate", "1000000"]);
    let fd = ready_fd(&mut echo);
    // The default lease (60 s): far longer than this test waits for anything.
    pause_and_dump(&mut echo, &fd, &img, &["--blob", state.to_str().unwrap()]);
    assert_eq!(locked(&s), 1, "dump locks the flow");
    // The owner exits (an upgrade): its frozen socket goes, silently.
    echo.kill();
    let mut cmd = s.cmd(tcpr_bin());
    cmd.args([
        "restore",
        img.to_str().unwrap(),
        "--",
        "python3",
        &py("echo.py"),
        "--no-control",
    ]);
    let mut restored = Proc::spawn(cmd, "restored echo");
    restored.expect("ready", Duration::from_secs(10));
    assert_eq!(
        locked(&s),
        0,
        "the restore released this namespace's lock on the flow"
    );
    // The peer's stream carries on: every byte, both ways. Before the fix
    // nothing moved until the lease ended, and the verdict found bytes
    // missing.
    wait_echoes(&mut peer, 100_000);
    assert_all_bytes(&verdict(&mut peer), 100_000);
    let _ = std::fs::remove_dir_all(&dir);
}
