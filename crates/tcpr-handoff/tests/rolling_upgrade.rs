//! The rolling-upgrade example, for real: clients of the running instance
//! are handed (with their line counters) to the new instance on SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use tcpr_netlab::Lab;

fn example_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/rolling_upgrade")
}

const CLIENT: &str = r#"
import socket, sys, time
addr = sys.argv[1]
conns = [socket.create_connection((addr, 9000)) for _ in range(5)]
files = [c.makefile("rb") for c in conns]
def round(k):
    for i, c in enumerate(conns):
        c.sendall(b"line %d of client %d\n" % (k, i))
    for i, f in enumerate(files):
        got = f.readline()
        want = b"%d line %d of client %d\n" % (k, k, i)
        assert got == want, (got, want)
for k in range(1, 21):
    round(k)
print("before", flush=True)
sys.stdin.readline()
for k in range(21, 41):
    round(k)
if len(sys.argv) > 2:
    # A client that arrives after the upgrade is served by the new instance.
    n = socket.create_connection((addr, 9000))
    n.sendall(b"hello\n")
    assert n.makefile("rb").readline() == b"1 hello\n"
print("after ok", flush=True)
"#;

/// SIGTERM to the serving instance; it reports all five clients handed off.
fn sigterm_hands_off_all(server: &std::process::Child, out: &mut impl BufRead) {
    assert!(Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap()
        .success());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "handed off 5 of 5 clients");
}

#[test]
fn clients_survive_the_upgrade_with_their_state() {
    let bin = example_bin();
    assert!(bin.exists(), "example built at {}", bin.display());
    let dir = std::env::temp_dir().join(format!("tcpr-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("psk");
    std::fs::write(&key, "rolling upgrade shared secret").unwrap();
    let mut lab = Lab::new("ru").unwrap();
    let c = lab.host("c", &["10.99.0.1/24"]).unwrap();
    let old = lab
        .host("old", &["10.99.0.2/24", "10.99.0.100/24"])
        .unwrap();
    let new = lab.host("new", &["10.99.0.3/24"]).unwrap();
    let k = key.to_str().unwrap();

    let mut receiver = new
        .cmd(bin.to_str().unwrap())
        .args([
            "receive",
            "--listen",
            "10.99.0.3:7070",
            "--psk-file",
            k,
            "--allow",
            "10.99.0.100:9000",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut rout = BufReader::new(receiver.stdout.take().unwrap());
    let mut line = String::new();
    rout.read_line(&mut line).unwrap();
    assert!(line.starts_with("receiving"), "{line}");

    let mut server = old
        .cmd(bin.to_str().unwrap())
        .args([
            "serve",
            "--listen",
            "10.99.0.100:9000",
            "--handoff-to",
            "10.99.0.3:7070",
            "--psk-file",
            k,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sout = BufReader::new(server.stdout.take().unwrap());
    line.clear();
    sout.read_line(&mut line).unwrap();
    assert!(line.starts_with("serving"), "{line}");

    let mut client = c
        .cmd("python3")
        .args(["-c", CLIENT, "10.99.0.100"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cout = BufReader::new(client.stdout.take().unwrap());
    line.clear();
    cout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "before");

    sigterm_hands_off_all(&server, &mut sout);
    let st = server.wait().unwrap();
    assert!(
        st.success(),
        "the old instance exits once its clients moved"
    );
    for _ in 0..5 {
        line.clear();
        rout.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("took over") && line.trim().ends_with("at line 20"),
            "{line}"
        );
    }

    let mut stdin = client.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    stdin.flush().unwrap();
    line.clear();
    cout.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "after ok",
        "the counters carried on after the upgrade"
    );
    assert!(client.wait().unwrap().success());
    let _ = receiver.kill();
    let _ = receiver.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// On one host: the old instance passes its clients' sockets to the new one
/// over a unix socket (no freeze at all), and the new one takes the
/// service port for new clients.
#[test]
fn same_host_upgrade_passes_the_sockets() {
    let bin = example_bin();
    let dir = std::env::temp_dir().join(format!("tcpr-upgrade-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("svc.sock");
    let sock = sock.to_str().unwrap();
    let mut lab = Lab::new("rl").unwrap();
    let c = lab.host("c", &["10.99.1.1/24"]).unwrap();
    let srv = lab.host("srv", &["10.99.1.2/24"]).unwrap();
    let mut line = String::new();

    let mut server = srv
        .cmd(bin.to_str().unwrap())
        .args([
            "serve",
            "--listen",
            "10.99.1.2:9000",
            "--handoff-local",
            sock,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sout = BufReader::new(server.stdout.take().unwrap());
    sout.read_line(&mut line).unwrap();
    assert!(line.starts_with("serving"), "{line}");

    let mut client = c
        .cmd("python3")
        .args(["-c", CLIENT, "10.99.1.2", "new"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cout = BufReader::new(client.stdout.take().unwrap());
    line.clear();
    cout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "before");

    let mut receiver = srv
        .cmd(bin.to_str().unwrap())
        .args(["receive", "--local", sock, "--service", "10.99.1.2:9000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut rout = BufReader::new(receiver.stdout.take().unwrap());
    line.clear();
    rout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "receiving locally");

    sigterm_hands_off_all(&server, &mut sout);
    assert!(server.wait().unwrap().success());
    let mut took = 0;
    while took < 5 {
        line.clear();
        rout.read_line(&mut line).unwrap();
        if line.starts_with("took over") {
            assert!(line.trim().ends_with("at line 20"), "{line}");
            took += 1;
        }
    }
    let mut stdin = client.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    stdin.flush().unwrap();
    line.clear();
    cout.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "after ok",
        "the counters carried on, and a new client was served"
    );
    assert!(client.wait().unwrap().success());
    let _ = receiver.kill();
    let _ = receiver.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
