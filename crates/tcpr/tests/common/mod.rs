//! Helpers for the CLI integration tests: child processes with line-based
//! control, and the tcpr binary.
#![allow(dead_code)]
// Helpers of an integration test: `pub` here reaches only the test crate.
#![allow(unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// How often the waits below look again.
pub const POLL: Duration = Duration::from_millis(20);
/// Echoed bytes that show a stream flows end to end (a few segments' worth
/// at the peers' rates).
pub const FLOWING: u64 = 64 * 1024;
/// How long a stream may take to show `wait_echoes`'s bytes (slow machine,
/// random loss).
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `ready` until it holds; fails the test naming `what` if it does not
/// within `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(POLL);
    }
}

pub fn tcpr_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tcpr")
}

pub fn py(name: &str) -> String {
    format!("{}/tests/py/{name}", env!("CARGO_MANIFEST_DIR"))
}

pub fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tcpr-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A child process driven by lines on stdin and read by lines on stdout.
pub struct Proc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    name: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, name: &str) -> Proc {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            name: name.to_string(),
        }
    }

    /// The next line starting with `prefix` (others are skipped).
    pub fn expect(&mut self, prefix: &str, timeout: Duration) -> String {
        self.expect_after(prefix, timeout, &mut Vec::new())
    }

    /// [`Proc::expect`], keeping the lines skipped in `skipped`.
    pub fn expect_after(
        &mut self,
        prefix: &str,
        timeout: Duration,
        skipped: &mut Vec<String>,
    ) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(l) => skipped.push(l),
                Err(_) => panic!(
                    "{}: no line starting with {prefix:?} within {timeout:?}",
                    self.name
                ),
            }
        }
    }

    pub fn send(&mut self, line: &str) {
        let s = self.stdin.as_mut().expect("stdin open");
        writeln!(s, "{line}").unwrap();
        s.flush().unwrap();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs tcpr (optionally inside a host) and returns its output.
pub fn tcpr(host: Option<&tcpr_netlab::Host>, args: &[&str]) -> Output {
    let mut c = match host {
        Some(h) => h.cmd(tcpr_bin()),
        None => Command::new(tcpr_bin()),
    };
    c.args(args).output().unwrap()
}

/// Asserts a clean failure: non-zero exit, one line on stderr naming the
/// problem, no panic.
pub fn assert_clean_failure(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "panic text reached the user: {err}"
    );
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err}");
    assert!(lines[0].starts_with("tcpr: "), "unexpected stderr: {err}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "stderr {:?} does not mention {needle:?}",
        lines[0]
    );
}

pub fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "tcpr failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Flows locked in a host's namespace.
pub fn locked(host: &tcpr_netlab::Host) -> usize {
    host.within(|| Ok(tcpr_engine::lock::locked_flow_count()?))
        .unwrap()
}

/// `echo.py` listening on `addr:port` inside `host` (extra arguments
/// appended), once it listens.
pub fn echo_server(host: &tcpr_netlab::Host, addr: &str, port: u16, extra: &[&str]) -> Proc {
    let mut cmd = host.cmd("python3");
    cmd.args([
        py("echo.py").as_str(),
        "--listen",
        addr,
        "--port",
        &port.to_string(),
    ])
    .args(extra);
    let mut echo = Proc::spawn(cmd, "echo");
    echo.expect("listening", Duration::from_secs(10));
    echo
}

/// `peer.py` streaming to `addr:port` from `host`, once connected.
pub fn stream_peer(host: &tcpr_netlab::Host, addr: &str, port: u16, extra: &[&str]) -> Proc {
    let mut cmd = host.cmd("python3");
    cmd.args([
        py("peer.py").as_str(),
        "--connect",
        addr,
        "--port",
        &port.to_string(),
    ])
    .args(extra);
    let mut peer = Proc::spawn(cmd, "peer");
    peer.expect("connected", Duration::from_secs(10));
    peer
}

/// The fd number `echo.py` reports once its connection is up.
pub fn ready_fd(echo: &mut Proc) -> String {
    echo.expect("ready", Duration::from_secs(10))
        .split_whitespace()
        .nth(1)
        .expect("ready FD")
        .to_string()
}

/// What `peer.py` reports of its stream so far.
#[derive(Debug)]
pub struct Progress {
    /// Bytes handed to its socket.
    pub sent: u64,
    /// Bytes echoed back (each checked).
    pub received: u64,
}

/// Asks `peer.py` how far its stream got; fails the test if the peer saw
/// an error (reset, a byte that differs).
pub fn progress(peer: &mut Proc) -> Progress {
    peer.send("progress");
    let line = peer.expect("progress ", Duration::from_secs(10));
    let mut fields = line.splitn(4, ' ').skip(1);
    let mut count = || -> u64 {
        fields
            .next()
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("peer: bad progress line {line:?}"))
    };
    let (sent, received) = (count(), count());
    let error = fields.next().unwrap_or("").trim();
    assert!(error.is_empty(), "peer reports: {error}");
    Progress { sent, received }
}

/// Waits until `peer.py` has back every byte it had sent when called, and
/// `more` beyond: the stream flows end to end from here on.
pub fn wait_echoes(peer: &mut Proc, more: u64) {
    let want = progress(peer).sent + more;
    let deadline = Instant::now() + ECHO_TIMEOUT;
    loop {
        let got = progress(peer).received;
        if got >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the stream stalled: {got} bytes echoed, {want} awaited within {ECHO_TIMEOUT:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// Ends `peer.py`'s stream and returns its JSON verdict.
pub fn verdict(peer: &mut Proc) -> serde_json::Value {
    peer.send("finish");
    serde_json::from_str(&peer.expect("{", Duration::from_secs(60))).unwrap()
}

/// Every byte sent came back, in order, unchanged (both checksums agree),
/// and at least `min_sent` bytes flowed.
pub fn assert_all_bytes(v: &serde_json::Value, min_sent: u64) {
    assert!(v["error"].is_null(), "peer reports: {v}");
    assert!(
        v["sent"].as_u64().unwrap() >= min_sent,
        "traffic flowed: {v}"
    );
    assert_eq!(v["sent"], v["received"], "{v}");
    assert_eq!(v["sha_sent"], v["sha_received"], "{v}");
}

/// `many.py`'s receiver in `host`, once it listens on the unix socket
/// `sock`: it echoes every connection an agent's `--unix` hands it, and
/// says "got N" as they come.
pub fn unix_receiver(host: &tcpr_netlab::Host, sock: &std::path::Path) -> Proc {
    let mut cmd = host.cmd("python3");
    cmd.args([&py("many.py"), "echo", "--unix", sock.to_str().unwrap()]);
    let mut recv = Proc::spawn(cmd, "receiver");
    recv.expect("listening", Duration::from_secs(10));
    recv
}

/// A verdict of `many.py peer` (or `evacuate.py client`): no error, each
/// of its `count` connections got back every byte it sent, and as many
/// bytes came back as went out.
pub fn assert_all_echoed(v: &serde_json::Value, count: usize) {
    assert!(v["error"].is_null(), "peer reports: {v}");
    assert_eq!(
        v["complete"], count,
        "every connection echoed every byte: {v}"
    );
    assert_eq!(v["sent"], v["received"], "{v}");
}

/// Pauses `echo.py` and dumps its connection (`tcpr dump`, extra arguments
/// appended); the dump must succeed.
pub fn pause_and_dump(echo: &mut Proc, fd: &str, img: &std::path::Path, extra: &[&str]) {
    echo.send("pause");
    echo.expect("paused", Duration::from_secs(10));
    let pid = echo.pid().to_string();
    let mut args = vec![
        "dump",
        "--pid",
        &pid,
        "--fd",
        fd,
        "-o",
        img.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = tcpr(None, &args);
    assert!(
        out.status.success(),
        "dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ss` lines of the established TCP connections of `host` on local `port`.
pub fn ss(host: &tcpr_netlab::Host, port: u16) -> String {
    let out = host
        .cmd("ss")
        .args(["-Htni", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("ss runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the connection on local `port` in `host` holds bytes in both
/// its receive and its send queue (`ss` Recv-Q and Send-Q) and its peer
/// offers a zero window, so a dump catches full queues whatever the
/// machine's speed. Panics with what `ss`
/// saw on both ends if that does not happen within `timeout`.
pub fn wait_full_queues(
    host: &tcpr_netlab::Host,
    port: u16,
    other: &tcpr_netlab::Host,
    timeout: Duration,
) {
    let deadline = std::time::Instant::now() + timeout;
    // A receive queue seen once may be bytes the service reads the next
    // moment (CI saw it empty at the dump that followed): it counts only
    // when the next look finds it no smaller, i.e. the service stopped
    // reading.
    let mut last_recv_q = 0;
    loop {
        let seen = ss(host, port);
        let queues: Vec<u64> = seen
            .split_whitespace()
            .take(2)
            .filter_map(|q| q.parse().ok())
            .collect();
        // ss leaves snd_wnd out when it is zero.
        let zero_window = seen
            .split_whitespace()
            .find_map(|f| f.strip_prefix("snd_wnd:"))
            .is_none_or(|w| w == "0");
        if queues.len() == 2 && queues[0] > 0 && queues[1] > 0 && zero_window {
            if last_recv_q > 0 && queues[0] >= last_recv_q {
                return;
            }
            last_recv_q = queues[0];
        } else {
            last_recv_q = 0;
        }
        if std::time::Instant::now() > deadline {
            let peer = other
                .cmd("ss")
                .args(["-Htni", "state", "established"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            panic!("queues never filled on :{port}\nservice: {seen}\nclient: {peer}");
        }
        std::thread::sleep(POLL);
    }
}

/// `setpriv` arguments: nobody, with no capabilities at all (the user
/// namespace gives it capabilities over its own namespaces only).
pub const UNPRIVILEGED: [&str; 5] = [
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

/// A user and network namespace owned by nobody, kept alive by a process
/// that waits on its stdin.
pub struct Userns {
    pub keeper: Proc,
}

impl Userns {
    pub fn new() -> Userns {
        let mut cmd = Command::new("setpriv");
        cmd.args(UNPRIVILEGED).args([
            "unshare",
            "-Urn",
            "sh",
            "-c",
            "ip link set lo up && echo up && exec cat",
        ]);
        let mut keeper = Proc::spawn(cmd, "user namespace");
        keeper.expect("up", Duration::from_secs(10));
        Userns { keeper }
    }

    /// `program` run by nobody inside the namespaces (root there, mapped
    /// to nobody outside).
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args(UNPRIVILEGED).args([
            "nsenter",
            "--preserve-credentials",
            "-U",
            "-n",
            "-t",
            &self.keeper.pid().to_string(),
            "--",
            program,
        ]);
        cmd
    }

    /// `program` run by root, in the namespace's network namespace only (it
    /// keeps its capabilities in the initial user namespace).
    pub fn root_cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-n", "-t", &self.keeper.pid().to_string(), "--", program]);
        cmd
    }

    /// The `Send-Q` of the established connection on local `port`.
    pub fn send_queue(&self, port: u16) -> u64 {
        let out = self
            .cmd("ss")
            .args(["-Htn", "state", "established"])
            .arg(format!("( sport = :{port} )"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .and_then(|q| q.parse().ok())
            .unwrap_or(0)
    }
}

/// Kills the child processes of `pid` (by their ids).
pub fn kill_children(pid: i32) {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", child]).status();
    }
}
