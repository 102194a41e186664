//! `tcpr dump --leave running` of one idle loopback connection against a
//! bare `tcpr --version`: both are the real binary started as a process,
//! timed from the spawn to its exit, interleaved, in a private network
//! namespace. The connection is held by the report's own process; the dump
//! takes it with `--pid`/`--fd` (pidfd_getfd) as it would from any server.

use super::Samples;
use crate::bench::EngineFigures;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Pairs (one `--version`, one dump) per mode.
pub(super) const PAIRS: usize = 40;
/// The pause before each process in the spaced mode: longer than a
/// released flow stays in the lock's `unlocked` set, so a dump's lock
/// never finds the previous dump's release there.
pub(super) const SPACING: Duration = Duration::from_millis(30);
/// Steps [`measure`] reports through its `tick`: one per mode.
pub(super) const STEPS: usize = 2;

/// One way of starting the processes: spaced, or back to back.
#[derive(Debug, Clone, Default)]
pub(super) struct StartupMode {
    /// `tcpr --version`, spawn to exit.
    pub(super) version_ms: Samples,
    /// `tcpr dump --leave running`, spawn to exit.
    pub(super) dump_ms: Samples,
    /// dump / version, per pair.
    pub(super) ratio: Samples,
}

/// Both modes.
#[derive(Debug, Clone, Default)]
pub(super) struct StartupFigures {
    /// Each process [`SPACING`] after the one before.
    pub(super) spaced: StartupMode,
    /// Each process as soon as the one before has exited.
    pub(super) back_to_back: StartupMode,
}

/// The goal of issue 9: a dump at most this many times a bare start.
pub(super) const GOAL_RATIO: f64 = 2.0;

/// Runs both modes in a private network namespace.
pub(super) fn measure(tick: &(dyn Fn(&str) + Sync)) -> Result<StartupFigures> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| measure_here(tick))
            .join()
            .map_err(|_| anyhow::anyhow!("startup bench thread panicked"))?
    })
}

/// One idle connection, both ends here.
struct Connection {
    client: TcpStream,
    server: TcpStream,
}

impl Connection {
    fn new() -> Result<Connection> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
        }
        Ok(Connection { client, server })
    }

    /// The connection still carries a byte each way.
    fn check(&mut self) -> Result<()> {
        let mut b = [0u8; 1];
        self.client.write_all(b"c")?;
        self.server.read_exact(&mut b)?;
        if &b != b"c" {
            bail!("the dumped connection delivered the wrong byte to the server");
        }
        self.server.write_all(b"s")?;
        self.client.read_exact(&mut b)?;
        if &b != b"s" {
            bail!("the dumped connection delivered the wrong byte to the client");
        }
        Ok(())
    }
}

/// Runs `cmd` to its exit, spawn to exit; fails when it fails.
fn time(cmd: &mut Command) -> Result<Duration> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

fn measure_here(tick: &dyn Fn(&str)) -> Result<StartupFigures> {
    tcpr_host::unshare_netns()
        .context("the report needs root (CAP_SYS_ADMIN) for a private network namespace")?;
    tcpr_netlab::run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    // The lock's table, as a serving host has it: installed once.
    tcpr_engine::lock::prepare()?;
    let mut conn = Connection::new()?;
    let exe = std::env::current_exe()?;
    let (pid, fd) = (
        std::process::id().to_string(),
        conn.server.as_raw_fd().to_string(),
    );
    let version = || time(Command::new(&exe).arg("--version"));
    let dump = || {
        time(Command::new(&exe).args([
            "dump", "--pid", &pid, "--fd", &fd, "-o", "-", "--leave", "running",
        ]))
    };
    // One of each first: the binary in the page cache for both.
    version()?;
    dump()?;
    conn.check()?;
    let mut run = |spacing: Option<Duration>| -> Result<StartupMode> {
        let (mut versions, mut dumps) = (Vec::new(), Vec::new());
        for pair in 0..PAIRS {
            // Each goes first in every other pair.
            for dump_now in [pair % 2 == 1, pair % 2 == 0] {
                if let Some(s) = spacing {
                    std::thread::sleep(s);
                }
                if dump_now {
                    dumps.push(dump()?);
                } else {
                    versions.push(version()?);
                }
            }
            conn.check()?;
        }
        Ok(mode(&versions, &dumps))
    };
    tick(&format!(
        "tcpr dump vs --version, {} ms apart",
        SPACING.as_millis()
    ));
    let spaced = run(Some(SPACING))?;
    tick("tcpr dump vs --version, back to back");
    let back_to_back = run(None)?;
    Ok(StartupFigures {
        spaced,
        back_to_back,
    })
}

/// The figures of one mode from its pairs.
fn mode(versions: &[Duration], dumps: &[Duration]) -> StartupMode {
    StartupMode {
        version_ms: Samples::ms(versions),
        dump_ms: Samples::ms(dumps),
        ratio: Samples::new(
            versions
                .iter()
                .zip(dumps)
                .map(|(v, d)| d.as_secs_f64() / v.as_secs_f64())
                .collect(),
        ),
    }
}

impl StartupFigures {
    /// The modes, named as the report shows them.
    fn modes(&self) -> [(String, &StartupMode); 2] {
        [
            (format!("{} ms apart", SPACING.as_millis()), &self.spaced),
            ("back to back".to_string(), &self.back_to_back),
        ]
    }
}

/// The goal rows of the report's Goals table.
pub(super) fn goal_rows(w: &mut String, s: &StartupFigures) {
    for (name, m) in s.modes() {
        let _ = writeln!(
            w,
            "| `tcpr dump --leave running` ≤ {GOAL_RATIO}x a bare `tcpr --version` ({name}) | {:.2}x ({:.2} ms vs {:.2} ms) | {} |",
            m.ratio.median(),
            m.dump_ms.median(),
            m.version_ms.median(),
            super::verdict(m.ratio.median() <= GOAL_RATIO)
        );
    }
}

/// What limits the goal where it is not met, from the figures.
pub(super) fn why_not(s: &StartupFigures, engine: &EngineFigures) -> Vec<String> {
    let mut notes = Vec::new();
    let (spaced, back) = (&s.spaced, &s.back_to_back);
    if spaced.ratio.median() > GOAL_RATIO {
        let extra = spaced.dump_ms.median() - spaced.version_ms.median();
        // What the engine section measured of a dump's own work.
        let lock = engine
            .locks
            .iter()
            .find(|l| l.flows == 1)
            .map(|l| l.acquire_us.median() + l.release_us.median());
        let one = engine.rows.iter().find(|r| r.conns == 1);
        let inside = match (lock, one) {
            (Some(lock), Some(one)) => format!(
                " Of that, the lock's acquire and release take {lock:.0} µs and a freeze(+lock)+dump \
                 of one connection {:.0} µs (sections below); the rest, {:.2} ms, is the process's \
                 own work beyond a bare start: taking the socket (pidfd_getfd), the netlink \
                 socket, the image written out, the thaw.",
                one.dump_locked_us.median(),
                extra - (lock + one.dump_locked_us.median()) / 1e3
            ),
            _ => String::new(),
        };
        notes.push(format!(
            "A dump spaced from the last by {} ms takes {:.2} ms, {extra:.2} ms more than a bare \
             start ({:.2} ms).{inside}",
            SPACING.as_millis(),
            spaced.dump_ms.median(),
            spaced.version_ms.median(),
        ));
    }
    if back.ratio.median() > GOAL_RATIO {
        let extra = back.dump_ms.median() - spaced.dump_ms.median();
        let grace = if extra > 0.0 {
            format!(
                " Back to back, a dump locks the flow again within {} ms of the previous \
                 dump's release, while its element is still in the lock's `unlocked` set; \
                 removing a present element leaves nf_tables work that waits for an RCU \
                 grace period. The lock's netlink sockets are kept and closed by a child \
                 after one (see `tcpr_engine::lock`), but the close of any other nf_tables \
                 socket of the namespace, or the next lock's commit, can still wait for it: \
                 {extra:.2} ms more per dump than spaced ({:.2} ms against {:.2} ms).",
                tcpr_engine::lock::UNLOCKED_TIMEOUT.as_millis(),
                back.dump_ms.median(),
                spaced.dump_ms.median()
            )
        } else {
            String::new()
        };
        notes.push(format!(
            "Back to back a dump takes {:.2}x a bare start ({:.2} ms vs {:.2} ms).{grace}",
            back.ratio.median(),
            back.dump_ms.median(),
            back.version_ms.median(),
        ));
    }
    notes
}

/// The report's section.
pub(super) fn section(w: &mut String, s: &StartupFigures, plot: &Path) {
    let _ = writeln!(w, "## `tcpr dump` against a bare process start\n");
    let _ = writeln!(
        w,
        "The real binary, started {PAIRS} times for `tcpr --version` and {PAIRS} times for \
         `tcpr dump --pid P --fd F -o - --leave running` of one idle loopback connection this \
         process holds (in a private namespace whose lock table is installed), interleaved \
         (each goes first in every other pair), timed from the spawn to the exit. *{} ms \
         apart*: a pause before each process, longer than a released flow stays in the lock's \
         `unlocked` set; *back to back*: each as soon as the one before has exited, so a dump \
         relocks the flow the previous one released moments ago. The connection carried a \
         byte each way after every pair. ms, median (min–max); the ratio is per pair.\n",
        SPACING.as_millis()
    );
    let _ = writeln!(w, "![dump against --version]({})\n", plot.display());
    let _ = writeln!(
        w,
        "| mode | `--version` ms | `dump --leave running` ms | dump / version |\n|---|---|---|---|"
    );
    for (name, m) in s.modes() {
        let _ = writeln!(
            w,
            "| {name} | {} | {} | {}x |",
            m.version_ms.spread(2),
            m.dump_ms.spread(2),
            m.ratio.spread(2)
        );
    }
    let _ = writeln!(w);
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn mode_of(version_ms: f64, dump_ms: f64) -> StartupMode {
        let d = |ms: f64| Duration::from_secs_f64(ms / 1e3);
        mode(&[d(version_ms); 3], &[d(dump_ms); 3])
    }

    /// Figures with some spread, for the plot.
    pub(in crate::report) fn figures() -> StartupFigures {
        let d = |ms: &[f64]| -> Vec<Duration> {
            ms.iter()
                .map(|ms| Duration::from_secs_f64(ms / 1e3))
                .collect()
        };
        StartupFigures {
            spaced: mode(&d(&[1.8, 2.0, 5.9]), &d(&[2.2, 2.5, 8.5])),
            back_to_back: mode(&d(&[1.5, 3.9, 5.4]), &d(&[4.3, 16.0, 20.0])),
        }
    }

    #[test]
    fn goal_rows_say_the_ratio_and_the_verdict_per_mode() {
        let s = StartupFigures {
            spaced: mode_of(1.5, 2.4),
            back_to_back: mode_of(1.5, 6.0),
        };
        let mut w = String::new();
        goal_rows(&mut w, &s);
        let rows: Vec<&str> = w.lines().collect();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].contains("(30 ms apart) | 1.60x (2.40 ms vs 1.50 ms) | met |"));
        assert!(rows[1].contains("(back to back) | 4.00x (6.00 ms vs 1.50 ms) | not met |"));
    }

    #[test]
    fn only_a_goal_not_met_gets_a_note_and_it_names_the_grace_period() {
        let engine = EngineFigures {
            lock_table_install: Duration::ZERO,
            rows: vec![],
            locks: vec![],
        };
        let met = StartupFigures {
            spaced: mode_of(1.5, 2.4),
            back_to_back: mode_of(1.5, 2.5),
        };
        assert!(why_not(&met, &engine).is_empty());
        let slow_relock = StartupFigures {
            spaced: mode_of(1.5, 2.4),
            back_to_back: mode_of(1.5, 12.4),
        };
        let notes = why_not(&slow_relock, &engine);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("10.00 ms more per dump than spaced"));
        assert!(notes[0].contains("RCU grace period"));
    }
}
