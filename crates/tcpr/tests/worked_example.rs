//! The README's worked example, run for real: curl downloads a 64 MiB file
//! over HTTP/1.1 from `examples/resumable-download/server.py` on host a
//! through the service address; mid-download the server is paused, its
//! connection dumped with the server's state as the blob, and restored on
//! host b under a new server process, while the address moves. curl must
//! save the whole file, unchanged. The same move handed to `cat` (the
//! connection without the application's state) must leave the download
//! stuck after exactly the bytes the old server had written. And through
//! `tcpr agent --exec`, with the state handed off by the library, the
//! download completes as well.

mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tcpr_netlab::{Host, Lab};

/// The size of the downloaded file.
const FILE_LEN: usize = 64 << 20;
/// Seed of the file's pseudo-random contents.
const FILE_SEED: u64 = 0x7c9e_2024_d0d0_0001;
/// curl's read rate: the whole file takes about 8 s, so the move lands
/// mid-download, and the server outpaces curl, so its send queue holds
/// bytes when it pauses.
const CURL_RATE: &str = "8M";
/// The client's largest receive buffer (`tcp_rmem` max): small, so its
/// window fills and the server's bytes wait in the server's send queue.
const CLIENT_RMEM: &str = "net.ipv4.tcp_rmem=4096 65536 262144";
/// How much curl must have saved before the server is asked to pause.
const PAUSE_AFTER: u64 = 4 << 20;
/// How many bytes the server's send queue must hold before the pause, so
/// the image carries bytes the old server wrote and curl has not yet
/// acknowledged.
const PAUSE_SEND_QUEUE: u64 = 512 << 10;
/// curl gives up when it receives nothing for this long (`--speed-time`):
/// the bounded wait that tells a stalled download from a slow one.
const CURL_STALL_SECS: &str = "5";
/// An upper bound on any one wait of these tests.
const WAIT: Duration = Duration::from_secs(120);
/// curl's exit status when `--speed-time` ran out.
const CURL_OPERATION_TIMEDOUT: i32 = 28;
const PORT: u16 = 8080;

fn example_server() -> String {
    format!(
        "{}/../../examples/resumable-download/server.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The file's bytes: splitmix64 output from `FILE_SEED`, so every run
/// serves the same file without keeping 64 MiB in the repository.
fn file_contents() -> Vec<u8> {
    let mut state = FILE_SEED;
    let mut out = Vec::with_capacity(FILE_LEN);
    while out.len() < FILE_LEN {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

/// Client c, server host a (which holds the service address), target host b.
struct World {
    _lab: Lab,
    c: Host,
    a: Host,
    b: Host,
    svc: String,
    dir: PathBuf,
    www: PathBuf,
    state_dir: PathBuf,
    saved: PathBuf,
    image: PathBuf,
    file: Vec<u8>,
}

impl World {
    fn new(tag: &str, subnet: u8) -> World {
        let dir = tmpdir(tag);
        let (www, state_dir) = (dir.join("www"), dir.join("state"));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::create_dir_all(&state_dir).unwrap();
        let file = file_contents();
        std::fs::write(www.join("big.bin"), &file).unwrap();
        let mut lab = Lab::new(tag).unwrap();
        let svc = format!("10.{subnet}.0.100");
        let c = lab.host("c", &[&format!("10.{subnet}.0.1/24")]).unwrap();
        let a = lab
            .host("a", &[&format!("10.{subnet}.0.2/24"), &format!("{svc}/24")])
            .unwrap();
        let b = lab.host("b", &[&format!("10.{subnet}.0.3/24")]).unwrap();
        let out = c.cmd("sysctl").args(["-qw", CLIENT_RMEM]).output().unwrap();
        assert!(out.status.success(), "sysctl: {out:?}");
        World {
            _lab: lab,
            c,
            a,
            b,
            svc,
            saved: dir.join("saved.bin"),
            image: dir.join("conn.img"),
            dir,
            www,
            state_dir,
            file,
        }
    }

    fn server_args(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.www.to_str().unwrap().into(),
            "--state-dir".into(),
            self.state_dir.to_str().unwrap().into(),
        ]
    }

    /// The example server listening on the service address on host a.
    fn start_server(&self) -> Proc {
        let mut cmd = self.a.cmd("python3");
        cmd.arg(example_server())
            .args(["--listen", &self.svc, "--port", &PORT.to_string()])
            .args(self.server_args());
        let mut server = Proc::spawn(cmd, "server on a");
        server.expect("listening", Duration::from_secs(10));
        server
    }

    /// curl on host c downloading the file through the service address.
    fn start_curl(&self) -> Reaped {
        let child = self
            .c
            .cmd("curl")
            .args([
                "--silent",
                "--show-error",
                "--fail",
                "--limit-rate",
                CURL_RATE,
                "--speed-limit",
                "1",
                "--speed-time",
                CURL_STALL_SECS,
                "--max-time",
                &WAIT.as_secs().to_string(),
                "--output",
                self.saved.to_str().unwrap(),
            ])
            .arg(format!("http://{}:{PORT}/big.bin", self.svc))
            .stdin(Stdio::null())
            .spawn()
            .expect("curl runs (scripts/setup.sh installs it)");
        Reaped(child)
    }

    fn saved_len(&self) -> u64 {
        std::fs::metadata(&self.saved).map_or(0, |m| m.len())
    }

    /// Waits until curl has saved `len` bytes.
    fn wait_saved(&self, len: u64, curl: &mut Child) {
        let deadline = Instant::now() + WAIT;
        while self.saved_len() < len {
            if let Some(st) = curl.try_wait().unwrap() {
                panic!("curl ended ({st}) after {} bytes", self.saved_len());
            }
            assert!(
                Instant::now() < deadline,
                "curl saved {} bytes",
                self.saved_len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the server's connection holds `PAUSE_SEND_QUEUE` bytes in
    /// its send queue (`ss` Send-Q): bytes its `send` calls accepted that curl has not
    /// acknowledged.
    fn wait_send_queue(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = ss(&self.a, PORT);
            let send_q = seen
                .split_whitespace()
                .nth(1)
                .and_then(|q| q.parse::<u64>().ok());
            if send_q.is_some_and(|q| q >= PAUSE_SEND_QUEUE) {
                return;
            }
            assert!(Instant::now() < deadline, "no send queue on a: {seen}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the server to pause (SIGUSR1) and reads what it reports.
    fn pause(&self, server: &mut Proc) -> Pause {
        signal(server.pid(), "USR1");
        // "paused fd FD sent N of M bytes of /big.bin state PATH"
        let line = server.expect("paused fd", Duration::from_secs(10));
        let words: Vec<&str> = line.split_whitespace().collect();
        let pause = Pause {
            fd: words[2].parse().unwrap(),
            body_sent: words[4].parse().unwrap(),
            state: PathBuf::from(words[words.len() - 1]),
        };
        assert!(
            pause.body_sent > 0 && pause.body_sent < FILE_LEN as u64,
            "paused mid-download: {line}"
        );
        pause
    }

    /// Dumps the paused server's connection with the state it wrote as
    /// the blob, and ends the server.
    fn dump_and_stop(&self, mut server: Proc, pause: &Pause) {
        let out = tcpr(
            Some(&self.a),
            &[
                "dump",
                "--pid",
                &server.pid().to_string(),
                "--fd",
                &pause.fd.to_string(),
                "--blob",
                pause.state.to_str().unwrap(),
                "-o",
                self.image.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let img = json(&tcpr(
            None,
            &["inspect", "--json", self.image.to_str().unwrap()],
        ));
        assert!(
            img["send_queue_len"].as_u64().unwrap() > 0,
            "bytes the server wrote and curl has not acknowledged travel in the image: {img}"
        );
        assert_eq!(
            img["app_blob_len"].as_u64().unwrap(),
            std::fs::metadata(&pause.state).unwrap().len(),
            "the server's state travels as the blob"
        );
        server.kill();
    }

    /// Waits for curl to end and checks that it saved the whole file,
    /// unchanged.
    fn assert_download_complete(&self, curl: &mut Child) {
        let curl_status = wait_exit(curl, "curl");
        assert!(curl_status.success(), "curl: {curl_status}");
        let saved = read(&self.saved);
        assert_eq!(saved.len(), FILE_LEN, "curl saved the whole file");
        assert_eq!(
            sha256(&saved),
            sha256(&self.file),
            "curl saved the file unchanged"
        );
    }

    /// Moves the service address from a to b, once the connection is
    /// restored on b.
    fn move_address(&self) {
        let cidr = format!("{}/24", self.svc);
        self.a.del_addr(&cidr).unwrap();
        self.b.add_addr(&cidr).unwrap();
        let out = tcpr(Some(&self.b), &["announce", "--dev", "eth0", &self.svc]);
        assert!(
            out.status.success(),
            "announce: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `sig` (a name: "STOP") to process `pid`.
fn signal(pid: i32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// Stops curl (SIGSTOP) until the connection has left host a: its
/// receive buffer fills and its window closes, so the server's send queue
/// keeps what it holds (`PAUSE_SEND_QUEUE` or more) until the dump or the
/// handoff reads it, however long that takes on a loaded machine.
fn hold(curl: &Reaped) {
    signal(curl.0.id() as i32, "STOP");
}

/// Lets curl read again (SIGCONT).
fn release(curl: &Reaped) {
    signal(curl.0.id() as i32, "CONT");
}

/// A child process killed and reaped when the test ends, even on a panic.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the server reported when it paused.
struct Pause {
    /// The connection's fd in the server.
    fd: i32,
    /// Body bytes the server's `send` calls accepted.
    body_sent: u64,
    /// The state file it wrote.
    state: PathBuf,
}

/// "at N of M bytes of /big.bin", as the resumed server reports where it starts.
fn resumed_at(pause: &Pause) -> String {
    format!("at {} of {FILE_LEN} bytes of /big.bin", pause.body_sent)
}

/// Waits (at most `WAIT`) for `child` to exit.
fn wait_exit(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not end within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

#[test]
fn a_download_moved_mid_transfer_completes_intact() {
    let w = World::new("wex", 71);
    let mut server = w.start_server();
    let mut curl = w.start_curl();
    w.wait_saved(PAUSE_AFTER, &mut curl.0);
    hold(&curl);
    w.wait_send_queue();
    let pause = w.pause(&mut server);
    w.dump_and_stop(server, &pause);
    release(&curl);

    // Restore on b before the address arrives (IP_TRANSPARENT), under a new
    // server process that carries on from the state on fd 4.
    let mut cmd = w.b.cmd(tcpr_bin());
    cmd.args(["restore", w.image.to_str().unwrap(), "--", "python3"])
        .arg(example_server())
        .arg("--resume")
        .args(w.server_args());
    let mut resumed = Proc::spawn(cmd, "tcpr restore on b");
    let line = resumed.expect("resumed", Duration::from_secs(10));
    assert!(
        line.contains(&resumed_at(&pause)),
        "the new server starts where the old one stopped: {line}"
    );
    w.move_address();
    w.assert_download_complete(&mut curl.0);
    // curl closed the connection: the server ends, and restore with it.
    let restore_status = wait_exit(&mut resumed.child, "tcpr restore");
    assert_eq!(restore_status.code(), Some(0), "the resumed server exits 0");
}

#[test]
fn cat_without_the_application_state_stalls_the_download() {
    let w = World::new("wcat", 72);
    let mut server = w.start_server();
    let mut curl = w.start_curl();
    w.wait_saved(PAUSE_AFTER, &mut curl.0);
    hold(&curl);
    w.wait_send_queue();
    let pause = w.pause(&mut server);
    w.dump_and_stop(server, &pause);
    release(&curl);

    // The same connection handed to `cat`: it moves, queues and all, but
    // nothing carries on the HTTP response.
    let mut cmd = w.b.cmd(tcpr_bin());
    cmd.args([
        "restore",
        "--inetd",
        w.image.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo restored >&2; exec cat",
    ])
    .stderr(Stdio::piped());
    let mut restored = Reaped(cmd.spawn().unwrap());
    let mut err = std::io::BufReader::new(restored.0.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert_eq!(line.trim(), "restored");
    w.move_address();

    // curl gives up after CURL_STALL_SECS without a byte.
    let curl_status = wait_exit(&mut curl.0, "curl");
    assert_eq!(
        curl_status.code(),
        Some(CURL_OPERATION_TIMEDOUT),
        "curl stalled and gave up: {curl_status}"
    );
    let saved = read(&w.saved);
    assert_eq!(
        saved.len() as u64,
        pause.body_sent,
        "curl got every byte the old server wrote (they moved in the image) and nothing more"
    );
    assert!(saved.len() < FILE_LEN, "the download is incomplete");
    assert_eq!(
        sha256(&saved),
        sha256(&w.file[..saved.len()]),
        "what arrived is the start of the file, unchanged"
    );
    // curl closed the connection: cat reads end of file and exits.
    let restore_status = wait_exit(&mut restored.0, "tcpr restore");
    assert_eq!(restore_status.code(), Some(0), "cat exits 0");
}

/// The agent route: the server's connection handed off with its state by
/// the library (`hand_off`, as a server of your own would do it), and
/// `tcpr agent --exec` running the resumed server with the same fds and
/// environment as `tcpr restore`.
#[test]
fn the_agent_runs_the_resumed_server_with_the_state() {
    let w = World::new("wag", 73);
    let key = w.dir.join("psk");
    std::fs::write(&key, "a shared secret for the worked example\n").unwrap();
    let agent_addr = "10.73.0.3:7070";
    let resume = format!(
        "python3 {} --resume {}",
        example_server(),
        w.server_args().join(" ")
    );
    let mut agent = w.b.cmd(tcpr_bin());
    agent.args([
        "agent",
        "--listen",
        agent_addr,
        "--psk-file",
        key.to_str().unwrap(),
        "--allow",
        &format!("{}:{PORT}", w.svc),
        "--exec",
        &resume,
    ]);
    let mut agent = Proc::spawn(agent, "agent on b");
    agent.expect("tcpr agent listening", Duration::from_secs(10));

    let mut server = w.start_server();
    let mut curl = w.start_curl();
    w.wait_saved(PAUSE_AFTER, &mut curl.0);
    hold(&curl);
    w.wait_send_queue();
    let pause = w.pause(&mut server);
    let state = std::fs::read(&pause.state).unwrap();
    let stream = std::net::TcpStream::from(tcpr_engine::take_fd(server.pid(), pause.fd).unwrap());
    let handed =
        w.a.within(|| {
            let auth = tcpr_handoff::Auth::psk_file(&key)?;
            let mut opts = tcpr_handoff::MigrateOptions::new(agent_addr.parse()?, auth);
            opts.switch = tcpr_handoff::Switch::MoveAddress;
            Ok(tcpr_handoff::hand_off(vec![(stream, state)], &opts)?)
        })
        .unwrap();
    assert!(
        matches!(handed[..], [tcpr_handoff::HandOff::Moved]),
        "{handed:?}"
    );
    release(&curl);
    server.kill();
    let line = agent.expect("resumed", Duration::from_secs(10));
    assert!(
        line.contains(&resumed_at(&pause)),
        "the new server starts where the old one stopped: {line}"
    );
    w.assert_download_complete(&mut curl.0);
}
