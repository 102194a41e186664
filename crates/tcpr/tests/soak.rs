//! `tcpr soak`: a short soak passes with nothing lost, duplicated or left
//! behind, and its check fails, naming the connection, when one really is
//! lost (`--sabotage` resets one on purpose).

use std::process::Command;

/// Runs `tcpr soak ARGS`; returns the exit code, stdout and stderr.
fn soak(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tcpr"))
        .arg("soak")
        .args(args)
        .output()
        .expect("run tcpr soak");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The summary line (the last line of stdout that starts with `soak: seed`).
fn summary(stdout: &str) -> &str {
    stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("soak: seed"))
        .unwrap_or_else(|| panic!("no summary line in {stdout:?}"))
}

/// The number after `label` in the summary.
fn figure(summary: &str, label: &str) -> u64 {
    let rest = summary
        .split(label)
        .nth(1)
        .unwrap_or_else(|| panic!("{label:?} not in {summary:?}"));
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in {summary:?}"))
}

#[test]
fn a_short_soak_loses_nothing_and_leaves_nothing() {
    let (code, out, err) = soak(&["--connections", "8", "--moves", "120", "--seed", "3"]);
    let s = summary(&out);
    assert_eq!(code, 0, "the soak failed:\n{out}\n{err}");
    assert_eq!(figure(s, "moves attempted"), 120, "{s}");
    assert!(figure(s, "committed") > 0, "{s}");
    assert!(s.contains("connections alive 8/8"), "{s}");
    assert!(figure(s, "bytes verified") > 0, "{s}");
    // Every byte sent came back.
    assert_eq!(figure(s, "bytes verified"), figure(s, " of "), "{s}");
    for zero in [
        "RSTs seen by clients",
        "duplicates",
        "locks",
        "rules",
        "policy rules",
        "misplaced addresses",
    ] {
        assert_eq!(figure(s, zero), 0, "{zero}: {s}");
    }
    // The faults were there.
    for some in ["agent kills", "link cuts", "loss periods", "zero windows"] {
        assert!(figure(s, some) > 0, "no {some}: {s}");
    }
}

#[test]
fn the_check_names_a_connection_that_really_is_lost() {
    let (code, out, err) = soak(&[
        "--connections",
        "4",
        "--moves",
        "40",
        "--seed",
        "5",
        "--sabotage",
    ]);
    // A failed soak keeps the agents' logs for a look; not this one's.
    if let Some(dir) = err
        .lines()
        .find_map(|l| l.strip_prefix("the agents' logs and journals are kept in "))
    {
        let _ = std::fs::remove_dir_all(dir.trim());
    }
    let s = summary(&out);
    assert_ne!(code, 0, "a reset connection went unnoticed:\n{out}\n{err}");
    assert!(s.contains("connections alive 3/4"), "{s}");
    assert_eq!(figure(s, "RSTs seen by clients"), 1, "{s}");
    // The client saw the reset, and the report names the connection, the
    // fault, and how to replay it.
    assert!(
        err.contains("connection 0 (10.88.1.1:8080): reset"),
        "the report does not name the connection: {err}"
    );
    assert!(err.contains("sabotage"), "no fault named: {err}");
    assert!(
        err.contains("tcpr soak --connections 4 --moves 40 --seed 5"),
        "no replay command: {err}"
    );
}

#[test]
fn bad_arguments_are_refused_in_one_line() {
    for args in [
        &["--connections", "0"][..],
        &["--connections", "1001"],
        &["--duration", "0"],
        &["--moves", "0"],
        &["--duration", "5", "--moves", "5"],
    ] {
        let (code, out, err) = soak(args);
        assert_eq!(code, 2, "{args:?}: {out} {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(!out.contains("soak: seed"), "{args:?} ran: {out}");
    }
}
