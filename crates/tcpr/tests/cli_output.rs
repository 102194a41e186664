//! `tcpr dump -o` writes only to a new or regular file, or to standard
//! output with `-o -` (issue 7, hole 7: run as root it replaced /dev/full,
//! FIFOs and symlinks with a regular file, and `-o -` wrote a file named
//! `-`). A refused path changes nothing: the socket is not frozen, nothing
//! is locked, no file is left. Also: logs written to a file carry no ANSI
//! colour codes, and `ls` says what it cannot see instead of guessing.

mod common;
use common::*;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tcpr_netlab::Lab;

/// `setpriv` arguments: nobody, with no capabilities at all.
const UNPRIVILEGED: [&str; 5] = [
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn dump_writes_only_new_or_regular_files_or_stdout() {
    let dir = tmpdir("output");
    let mut lab = Lab::new("op").unwrap();
    let c = lab.host("c", &["10.63.0.1/24"]).unwrap();
    let a = lab.host("a", &["10.63.0.2/24"]).unwrap();
    let mut echo = echo_server(&a, "10.63.0.2", 8080, &[]);
    let mut peer = stream_peer(&c, "10.63.0.2", 8080, &["--rate", "500000"]);
    let fd = ready_fd(&mut echo);
    echo.send("pause");
    echo.expect("paused", Duration::from_secs(10));
    let pid = echo.pid().to_string();

    // What must never be replaced: a character device (the same one as
    // /dev/full, made here), a FIFO, a symlink to a file, a directory.
    let device = dir.join("full");
    let st = Command::new("mknod")
        .arg(&device)
        .args(["c", "1", "7"])
        .status()
        .unwrap();
    assert!(st.success());
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let target = dir.join("target");
    std::fs::write(&target, "keep me").unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let subdir = dir.join("subdir");
    std::fs::create_dir(&subdir).unwrap();
    let before = names_in(&dir);
    for (path, what) in [
        (&device, "a device"),
        (&fifo, "a FIFO"),
        (&link, "a symbolic link"),
        (&subdir, "a directory"),
    ] {
        let out = tcpr(
            None,
            &[
                "dump",
                "--pid",
                &pid,
                "--fd",
                &fd,
                "-o",
                path.to_str().unwrap(),
            ],
        );
        assert_clean_failure(&out, what);
        assert_eq!(locked(&a), 0, "nothing locked after refusing {what}");
    }
    let missing_dir = dir.join("no/such/dir/img");
    assert_clean_failure(
        &tcpr(
            None,
            &[
                "dump",
                "--pid",
                &pid,
                "--fd",
                &fd,
                "-o",
                missing_dir.to_str().unwrap(),
            ],
        ),
        "cannot write",
    );
    assert_eq!(names_in(&dir), before, "no file added or replaced");
    assert!(std::fs::symlink_metadata(&device)
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
    let row = tcpr(Some(&a), &["ls", "--pid", &pid, "--json"]);
    let row: serde_json::Value = serde_json::from_slice(&row.stdout).unwrap();
    assert_eq!(row["frozen"], false, "the socket was never frozen: {row}");

    // `-o -` is standard output; a regular file is replaced atomically.
    let out = Command::new(tcpr_bin())
        .args([
            "dump", "--pid", &pid, "--fd", &fd, "-o", "-", "--leave", "running",
        ])
        .current_dir(&dir)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.join("-").exists(), "no file named -");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to standard output"));
    let piped = dir.join("piped.img");
    std::fs::write(&piped, &out.stdout).unwrap();
    let v = json(&tcpr(None, &["inspect", "--json", piped.to_str().unwrap()]));
    assert_eq!(v["local"], "10.63.0.2:8080");
    let out = tcpr(
        None,
        &[
            "dump",
            "--pid",
            &pid,
            "--fd",
            &fd,
            "-o",
            target.to_str().unwrap(),
            "--leave",
            "running",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&tcpr(
        None,
        &["inspect", "--json", target.to_str().unwrap()],
    ));
    assert_eq!(v["local"], "10.63.0.2:8080");

    echo.send("resume");
    echo.expect("resumed", Duration::from_secs(10));
    // A fast dump left less than 10 kB sent: let the stream go on first.
    wait_echoes(&mut peer, 10_000);
    assert_all_bytes(&verdict(&mut peer), 10_000);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn logs_to_a_file_carry_no_colour_codes() {
    let dir = tmpdir("nocolour");
    let img = dir.join("c.img");
    let log = dir.join("log");
    let mut lab = Lab::new("nc").unwrap();
    let c = lab.host("c", &["10.64.0.1/24"]).unwrap();
    let a = lab.host("a", &["10.64.0.2/24"]).unwrap();
    let mut echo = echo_server(&a, "10.64.0.2", 8080, &[]);
    let mut peer = stream_peer(&c, "10.64.0.2", 8080, &["--rate", "500000"]);
    let fd = ready_fd(&mut echo);
    echo.send("pause");
    echo.expect("paused", Duration::from_secs(10));
    let st = Command::new(tcpr_bin())
        .args(["dump", "--pid", &echo.pid().to_string(), "--fd", &fd])
        .args(["-o", img.to_str().unwrap(), "--leave", "running"])
        .env("TCPR_LOG", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("flows locked"),
        "debug logs were written: {text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "no escape codes in a log file: {text:?}"
    );
    echo.send("resume");
    echo.expect("resumed", Duration::from_secs(10));
    wait_echoes(&mut peer, 10_000);
    assert_all_bytes(&verdict(&mut peer), 10_000);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ls_without_privileges_says_what_it_cannot_see() {
    let mut lab = Lab::new("lp").unwrap();
    let c = lab.host("c", &["10.65.0.1/24"]).unwrap();
    let a = lab.host("a", &["10.65.0.2/24"]).unwrap();
    // A root-owned service with one connection.
    let mut echo = echo_server(&a, "10.65.0.2", 8080, &[]);
    let mut peer = stream_peer(&c, "10.65.0.2", 8080, &["--rate", "500000"]);
    ready_fd(&mut echo);
    let ls_as_nobody = |args: &[&str]| {
        let mut cmd = a.cmd("setpriv");
        cmd.args(UNPRIVILEGED).arg(tcpr_bin()).arg("ls").args(args);
        cmd.output().unwrap()
    };
    let out = ls_as_nobody(&["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["local"] == "10.65.0.2:8080")
        .expect("the connection is listed");
    assert_eq!(row["dumpable"], false, "{row}");
    let why = row["not_dumpable_because"].as_str().unwrap();
    assert!(
        why.contains("owner unknown"),
        "not 'no process holds it': {why}"
    );
    assert!(!why.contains("no process holds it"), "{why}");
    assert!(
        row["frozen"].is_null() && row["locked"].is_null(),
        "unknown, not guessed: {row}"
    );
    let table = String::from_utf8_lossy(&ls_as_nobody(&[]).stdout).into_owned();
    let line = table
        .lines()
        .find(|l| l.contains("10.65.0.2:8080"))
        .unwrap();
    assert!(line.contains("no: owner unknown"), "{line}");
    // A process it cannot see is an error, not an empty table.
    let out = ls_as_nobody(&["--pid", &echo.pid().to_string()]);
    assert_clean_failure(&out, "permission denied");
    assert!(out.stdout.is_empty());
    wait_echoes(&mut peer, 10_000);
    assert_all_bytes(&verdict(&mut peer), 10_000);
}
