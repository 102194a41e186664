//! Every duration and size the CLI takes is bounded when it is parsed: an
//! out-of-range value is one line on stderr that names the bound, with no
//! panic and nothing done (issue 10: `demo --interval nan`, `--rate-kib`
//! overflow and `migrate --timeout 1e20` panicked; issue 7: `--lease 0`
//! locked for 1 s and `--lease 4294967296` for 49,710 days).

mod common;
use common::*;

/// A pre-shared key file, so that migrate and agent get as far as their
/// numbers.
fn psk(tag: &str) -> String {
    let dir = tmpdir(tag);
    let key = dir.join("psk");
    std::fs::write(&key, "a shared secret for the bound tests\n").unwrap();
    key.to_string_lossy().into_owned()
}

/// Removes the directory of a key made by [`psk`].
fn forget(key: &str) {
    let _ = std::fs::remove_dir_all(std::path::Path::new(key).parent().unwrap());
}

/// Each case: the arguments, and what the one-line error must say.
fn assert_refused(cases: &[(&[&str], &str)]) {
    for (args, needle) in cases {
        let out = tcpr(None, args);
        assert_clean_failure(&out, needle);
        assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
    }
}

#[test]
fn demo_numbers_are_bounded() {
    assert_refused(&[
        (
            &["demo", "--interval", "nan"],
            "between 0.01 and 3600 seconds",
        ),
        (
            &["demo", "--interval", "inf"],
            "between 0.01 and 3600 seconds",
        ),
        (&["demo", "--interval=-1"], "between 0.01 and 3600 seconds"),
        (
            &["demo", "--interval", "0"],
            "between 0.01 and 3600 seconds",
        ),
        (
            &["demo", "--interval", "1e20"],
            "between 0.01 and 3600 seconds",
        ),
        (&["demo", "--interval", "soon"], "not a number of seconds"),
        (&["demo", "--rate-kib", "0"], "1..=1048576"),
        (&["demo", "--rate-kib", "18014398509481984"], "1..=1048576"),
        (&["demo", "--migrations", "0"], "1..=10000"),
    ]);
}

#[test]
fn lock_leases_are_bounded() {
    let key = psk("bounds1");
    let migrate = |lease: &'static str| -> Vec<String> {
        [
            "migrate",
            "--to",
            "127.0.0.1:9",
            "--psk-file",
            &key,
            "--pid",
            "1",
            "--lease",
            lease,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    assert_refused(&[
        (
            &[
                "dump",
                "--pid",
                "1",
                "--fd",
                "3",
                "-o",
                "/tmp/never",
                "--lease",
                "0",
            ],
            "between 1 and 86400 seconds",
        ),
        (
            &[
                "dump",
                "--pid",
                "1",
                "--fd",
                "3",
                "-o",
                "/tmp/never",
                "--lease",
                "4294967296",
            ],
            "between 1 and 86400 seconds",
        ),
        (
            &[
                "dump",
                "--pid",
                "1",
                "--fd",
                "3",
                "-o",
                "/tmp/never",
                "--lease",
                "99999999999999999999999",
            ],
            "whole number of seconds",
        ),
    ]);
    for lease in ["0", "86401", "4294967296"] {
        let args = migrate(lease);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_failure(&tcpr(None, &args), "1..=86400");
    }
    assert!(!std::path::Path::new("/tmp/never").exists());
    forget(&key);
}

#[test]
fn handoff_timeouts_are_bounded() {
    let key = psk("bounds2");
    for t in ["1e20", "nan", "inf", "0", "-2", "3601"] {
        let t = &format!("--timeout={t}");
        let out = tcpr(
            None,
            &[
                "migrate",
                "--to",
                "127.0.0.1:9",
                "--psk-file",
                &key,
                "--pid",
                "1",
                t,
            ],
        );
        assert_clean_failure(&out, "between 0.001 and 3600 seconds");
        let out = tcpr(
            None,
            &[
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--psk-file",
                &key,
                "--unix",
                "/nonexistent",
                "--allow",
                "0.0.0.0:80",
                t,
            ],
        );
        assert_clean_failure(&out, "between 0.001 and 3600 seconds");
    }
    forget(&key);
}

#[test]
fn bench_sizes_are_bounded() {
    assert_refused(&[
        (&["bench", "--counts", "0"], "from 1 to 100000"),
        (
            &["bench", "--counts", "1,18446744073709551615"],
            "from 1 to 100000",
        ),
        (&["bench-handoff", "--counts", "100001"], "from 1 to 100000"),
        (&["bench-handoff", "--moves", "0"], "from 1 to 100000"),
        (
            &["bench-handoff", "--moves", "18446744073709551615"],
            "from 1 to 100000",
        ),
    ]);
}

#[test]
fn migrate_refuses_fd_with_local() {
    let key = psk("bounds3");
    let out = tcpr(
        None,
        &[
            "migrate",
            "--to",
            "127.0.0.1:9",
            "--psk-file",
            &key,
            "--local",
            "127.0.0.1:80",
            "--fd",
            "3",
        ],
    );
    assert_clean_failure(&out, "give one or the other");
    forget(&key);
}

#[test]
fn blobs_over_the_image_limit_are_refused() {
    let dir = tmpdir("bigblob");
    let blob = dir.join("blob");
    // Sparse: one byte over 1 GiB without writing it.
    let f = std::fs::File::create(&blob).unwrap();
    f.set_len((1 << 30) + 1).unwrap();
    let img = dir.join("never.img");
    let out = tcpr(
        None,
        &[
            "dump",
            "--pid",
            "1",
            "--fd",
            "3",
            "-o",
            img.to_str().unwrap(),
            "--blob",
            blob.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&out, "over 1024 MiB");
    assert!(!img.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A missing argument is named in the one-line error (clap puts the name
/// on the line after "were not provided:", which the one line dropped),
/// and `--steer-idle` and `--drain-timeout` are bounded like the other
/// timeouts.
#[test]
fn a_missing_argument_is_named_and_steer_idle_is_bounded() {
    assert_refused(&[
        (
            &["balance", "status"],
            "were not provided: --metrics <METRICS>",
        ),
        (
            &["balance", "--steer-idle", "0", "--config", "/nonexistent"],
            "between 1 and 86400 seconds",
        ),
        (
            &[
                "balance",
                "--drain-timeout",
                "0",
                "--config",
                "/nonexistent",
            ],
            "between 1 and 86400 seconds",
        ),
    ]);
}
