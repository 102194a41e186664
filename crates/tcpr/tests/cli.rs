//! `tcpr restore --inetd` with an unmodified program, exit status
//! propagation, and the demo's clean-up on Ctrl-C.

mod common;
use common::*;
use std::time::Duration;
use tcpr_netlab::Lab;

const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("connected", flush=True)
def echo(msg):
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        got += s.recv(100)
    assert got == msg, (got, msg)
echo(b"hello\n")
print("echoed", flush=True)
sys.stdin.readline()
echo(b"world, after the move\n")
s.shutdown(socket.SHUT_WR)
rest = s.recv(100)
assert rest == b"", rest
print("ok", flush=True)
"#;

#[test]
fn inetd_restore_runs_an_unmodified_program() {
    let dir = tmpdir("inetd");
    let img = dir.join("c.img");
    let mut lab = Lab::new("in").unwrap();
    let c = lab.host("c", &["10.83.0.1/24"]).unwrap();
    let a = lab.host("a", &["10.83.0.2/24", "10.83.0.100/24"]).unwrap();
    let b = lab.host("b", &["10.83.0.3/24"]).unwrap();
    let mut echo = echo_server(&a, "10.83.0.100", 7, &[]);
    let mut cmd = c.cmd("python3");
    cmd.args(["-c", CLIENT, "10.83.0.100", "7"]);
    let mut client = Proc::spawn(cmd, "client");
    let fd = ready_fd(&mut echo);
    client.expect("echoed", Duration::from_secs(10));
    pause_and_dump(&mut echo, &fd, &img, &[]);
    echo.kill();
    // Restore first (the address is not on b yet), then move the address.
    // `cat` echoes stdin to stdout: with --inetd both are the connection.
    let mut cmd = b.cmd(tcpr_bin());
    cmd.args([
        "restore",
        "--inetd",
        img.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo restored >&2; cat; exit 7",
    ])
    .stderr(std::process::Stdio::piped());
    let mut restored = cmd.spawn().unwrap();
    let mut err = std::io::BufReader::new(restored.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert_eq!(line.trim(), "restored");
    a.del_addr("10.83.0.100/24").unwrap();
    b.add_addr("10.83.0.100/24").unwrap();
    assert!(
        tcpr(Some(&b), &["announce", "--dev", "eth0", "10.83.0.100"])
            .status
            .success()
    );
    client.send("go");
    client.expect("ok", Duration::from_secs(20));
    let out = restored.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "tcpr restore exits with the command's status"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_cleans_up_on_ctrl_c() {
    let mut cmd = std::process::Command::new(tcpr_bin());
    cmd.args(["demo", "--migrations", "1000", "--interval", "0.3"]);
    let mut demo = Proc::spawn(cmd, "demo");
    demo.expect("client", Duration::from_secs(30));
    let prefix = format!("tcpr-demo-{}-", demo.pid());
    let listed = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .matches(&prefix)
            .count()
    };
    assert!(listed() >= 3, "the demo's hosts exist while it runs");
    demo.expect("  1  host-a -> host-b", Duration::from_secs(30));
    let st = std::process::Command::new("kill")
        .args(["-INT", &demo.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = demo.child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(listed(), 0, "no namespace of the demo is left");
}

/// A lock left by `dump` (connection left frozen) expires by itself.
#[test]
fn source_lock_expires_after_its_lease() {
    let dir = tmpdir("lease");
    let img = dir.join("l.img");
    let mut lab = Lab::new("ls").unwrap();
    let c = lab.host("c", &["10.84.0.1/24"]).unwrap();
    let s = lab.host("s", &["10.84.0.2/24"]).unwrap();
    let mut echo = echo_server(&s, "10.84.0.2", 7, &[]);
    let mut cmd = c.cmd("python3");
    cmd.args(["-c", CLIENT, "10.84.0.2", "7"]);
    let mut client = Proc::spawn(cmd, "client");
    let fd = ready_fd(&mut echo);
    client.expect("echoed", Duration::from_secs(10));
    pause_and_dump(&mut echo, &fd, &img, &["--lease", "2"]);
    assert_eq!(locked(&s), 1);
    wait_until(
        "the 2 s lease expires the lock",
        Duration::from_secs(30),
        || locked(&s) == 0,
    );
    assert_eq!(locked(&s), 0, "the lease expired the lock");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tcpr ls | head -1` on a host with more connections than one pipe
/// read: the reader leaves early and tcpr ends quietly (it panicked on
/// the closed pipe: Rust ignores SIGPIPE, so `println!` met EPIPE).
#[test]
fn ls_into_a_reader_that_leaves_early_ends_quietly() {
    let mut lab = Lab::new("lshead").unwrap();
    let host = lab.host("h", &["10.91.0.1/24"]).unwrap();
    // 900 listeners in one process: more lines than a pipe holds (64 KiB).
    let mut listeners = Proc::spawn(
        {
            let mut c = host.cmd("python3");
            c.args([
                "-c",
                "import socket,sys\nls=[]\nfor p in range(20000,20900):\n    s=socket.socket(); s.bind(('127.0.0.1',p)); s.listen(); ls.append(s)\nprint('up', flush=True)\nsys.stdin.readline()",
            ]);
            c
        },
        "listeners",
    );
    listeners.expect("up", Duration::from_secs(20));
    let piped = host
        .cmd("bash")
        .args([
            "-c",
            &format!("{} ls | head -1; exit ${{PIPESTATUS[0]}}", tcpr_bin()),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(
        piped.status.success(),
        "tcpr ls exited {:?}: {stderr}",
        piped.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(String::from_utf8_lossy(&piped.stdout).starts_with("LOCAL"));
    listeners.kill();
}
