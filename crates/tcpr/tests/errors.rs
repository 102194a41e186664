//! Bad input gets a clear one-line error and changes nothing.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;
use tcpr_image::ConnectionImage;
use tcpr_netlab::Lab;

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_string_lossy().into_owned()
}

/// `setpriv` arguments: nobody, with no capabilities at all.
const UNPRIVILEGED: [&str; 5] = [
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

#[test]
fn bad_image_files() {
    let dir = tmpdir("badimg");
    let good = ConnectionImage::example().encode().unwrap();
    let mut corrupt = good.clone();
    *corrupt.last_mut().unwrap() ^= 0x40;
    let mut version = good.clone();
    version[5] = 2;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("corrupt", corrupt, "corrupt"),
        ("truncated", good[..good.len() - 7].to_vec(), "truncated"),
        ("header-only", good[..10].to_vec(), "truncated"),
        ("version", version, "version 2"),
        (
            "foreign",
            b"\x89PNG\r\n\x1a\n not an image at all".to_vec(),
            "not a tcpr image",
        ),
        ("empty", vec![], "truncated"),
        (
            "trailing",
            [good.clone(), b"x".to_vec()].concat(),
            "unexpected bytes",
        ),
    ];
    for (name, bytes, needle) in cases {
        let p = write(&dir, name, &bytes);
        assert_clean_failure(&tcpr(None, &["inspect", &p]), needle);
        assert_clean_failure(&tcpr(None, &["inspect", "--json", &p]), needle);
        let marker = dir.join(format!("{name}.ran"));
        let out = tcpr(
            None,
            &["restore", &p, "--", "touch", marker.to_str().unwrap()],
        );
        assert_clean_failure(&out, needle);
        assert!(!marker.exists(), "the command must not run for a bad image");
    }
    assert_clean_failure(
        &tcpr(None, &["inspect", "/nonexistent/x.img"]),
        "cannot read",
    );

    // The good one inspects, with the documented JSON fields.
    let p = write(&dir, "good", &good);
    let v = json(&tcpr(None, &["inspect", "--json", &p]));
    let ex = ConnectionImage::example();
    assert_eq!(v["local"], "10.0.0.1:80");
    assert_eq!(v["peer"], "10.0.0.2:40000");
    assert_eq!(v["state"], "ESTABLISHED");
    assert_eq!(v["send_seq"], ex.send_seq.0);
    assert_eq!(v["recv_seq"], ex.recv_seq.0);
    assert_eq!(v["send_queue_len"], ex.send_queue.len());
    assert_eq!(v["unsent_len"], ex.send_queue.unsent.len());
    assert_eq!(v["recv_queue_len"], ex.recv_queue.len());
    assert_eq!(v["mss"], 1460);
    assert_eq!(v["snd_wscale"], 7);
    assert_eq!(v["rcv_wscale"], 7);
    assert_eq!(v["sack"], true);
    assert_eq!(v["timestamps"], true);
    for f in ["snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup"] {
        assert!(v["window"][f].is_u64(), "window.{f} in {v}");
    }
    let out = tcpr(None, &["inspect", &p]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.0.0.1:80 -> 10.0.0.2:40000"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A helper process that holds sockets of several kinds in a host.
fn holder(host: &tcpr_netlab::Host) -> (Proc, Vec<String>) {
    let script = r#"
import socket, sys, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("fds", l.fileno(), u.fileno(), flush=True)
sys.stdin.read()
"#;
    let mut c = host.cmd("python3");
    c.args(["-c", script]);
    let mut p = Proc::spawn(c, "holder");
    let line = p.expect("fds", Duration::from_secs(10));
    let fds = line.split_whitespace().skip(1).map(String::from).collect();
    (p, fds)
}

#[test]
fn dump_refuses_what_it_cannot_move() {
    let dir = tmpdir("baddump");
    let out_img = dir.join("x.img");
    let o = out_img.to_str().unwrap();
    let mut lab = Lab::new("bd").unwrap();
    let h = lab.host("h", &["10.80.0.1/24"]).unwrap();
    let (p, fds) = holder(&h);
    let pid = p.pid().to_string();
    assert_clean_failure(
        &tcpr(None, &["dump", "--pid", &pid, "--fd", &fds[0], "-o", o]),
        "LISTEN",
    );
    assert_clean_failure(
        &tcpr(None, &["dump", "--pid", &pid, "--fd", &fds[1], "-o", o]),
        "not a TCP socket",
    );
    assert_clean_failure(
        &tcpr(None, &["dump", "--pid", &pid, "--fd", "0", "-o", o]),
        "not a socket",
    );
    assert_clean_failure(
        &tcpr(None, &["dump", "--pid", &pid, "--fd", "77", "-o", o]),
        "no open file descriptor 77",
    );
    // The largest pid the kernel can hand out plus one never exists.
    assert_clean_failure(
        &tcpr(None, &["dump", "--pid", "4194305", "--fd", "3", "-o", o]),
        "no process",
    );
    assert!(!out_img.exists(), "no image is written on failure");
    assert_eq!(locked(&h), 0, "no lock is left behind");
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A connection between two hosts with the server side held by echo.py.
struct Conn {
    _lab: Lab,
    server: tcpr_netlab::Host,
    echo: Proc,
    peer: Proc,
    fd: String,
}

fn conn(tag: &str, net: u8) -> Conn {
    let mut lab = Lab::new(tag).unwrap();
    let c = lab.host("c", &[&format!("10.{net}.0.1/24")]).unwrap();
    let s = lab.host("s", &[&format!("10.{net}.0.2/24")]).unwrap();
    let mut echo = echo_server(&s, &format!("10.{net}.0.2"), 7000, &[]);
    let peer = stream_peer(&c, &format!("10.{net}.0.2"), 7000, &[]);
    let fd = ready_fd(&mut echo);
    Conn {
        _lab: lab,
        server: s,
        echo,
        peer,
        fd,
    }
}

fn tcp_sockets(host: &tcpr_netlab::Host) -> usize {
    let out = tcpr(Some(host), &["ls", "--json"]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn restore_onto_a_tuple_in_use_and_without_privilege() {
    let dir = tmpdir("inuse");
    let img = dir.join("snap.img");
    let mut c = conn("iu", 81);
    wait_echoes(&mut c.peer, FLOWING);
    pause_and_dump(&mut c.echo, &c.fd, &img, &["--leave", "running"]);
    c.echo.send("resume");
    c.echo.expect("resumed", Duration::from_secs(10));
    let before = tcp_sockets(&c.server);

    // The original is still there: the 4-tuple is taken.
    let marker = dir.join("ran");
    let out = tcpr(
        Some(&c.server),
        &[
            "restore",
            img.to_str().unwrap(),
            "--",
            "touch",
            marker.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&out, "already in use");
    assert!(!marker.exists());

    // Without CAP_NET_ADMIN (as nobody, all capabilities dropped).
    let public = dir.join("public.img");
    std::fs::copy(&img, &public).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = c.server.cmd("setpriv");
    cmd.args(UNPRIVILEGED).args([
        tcpr_bin(),
        "restore",
        public.to_str().unwrap(),
        "--",
        "true",
    ]);
    let out = cmd.output().unwrap();
    assert_clean_failure(&out, "CAP_NET_ADMIN");
    let mut cmd = Command::new("setpriv");
    cmd.args(UNPRIVILEGED).args([
        tcpr_bin(),
        "dump",
        "--pid",
        &c.echo.pid().to_string(),
        "--fd",
        &c.fd,
        "-o",
        "/tmp/never.img",
    ]);
    assert_clean_failure(&cmd.output().unwrap(), "not permitted");

    // Nothing changed: same sockets, no lock, and the connection carries on.
    assert_eq!(tcp_sockets(&c.server), before);
    assert_eq!(locked(&c.server), 0);
    wait_echoes(&mut c.peer, FLOWING);
    assert_all_bytes(&verdict(&mut c.peer), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ls_shows_owners_and_dumpability() {
    let mut c = conn("ls", 82);
    let out = tcpr(
        Some(&c.server),
        &["ls", "--pid", &c.echo.pid().to_string(), "--json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "echo.py holds one TCP socket: {rows:?}");
    assert_eq!(rows[0]["local"], "10.82.0.2:7000");
    assert_eq!(rows[0]["state"], "ESTABLISHED");
    assert_eq!(rows[0]["dumpable"], true);
    assert_eq!(rows[0]["owners"][0]["fd"].to_string(), c.fd);
    let out = tcpr(Some(&c.server), &["ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("10.82.0.2:7000") && text.contains("yes"),
        "{text}"
    );
    assert_clean_failure(&tcpr(None, &["ls", "--pid", "4194305"]), "no process");
    assert_all_bytes(&verdict(&mut c.peer), 1);
}
