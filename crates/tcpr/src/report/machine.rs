//! What the report says of the machine and the code it measured.

use std::path::Path;
use std::process::Command;

/// The machine, the commit and the date of a report.
#[derive(Debug)]
pub(super) struct Machine {
    pub(super) kernel: String,
    pub(super) cpu: String,
    pub(super) cores: usize,
    /// The kernel's tick rate (`CONFIG_HZ`), when its config can be read.
    pub(super) hz: String,
    pub(super) load: String,
    pub(super) commit: String,
    pub(super) date: String,
    /// The report's directory as given.
    pub(super) dir: String,
}

const UNKNOWN: &str = "unknown";

/// Standard output of a command, trimmed; `None` when it fails.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `CONFIG_HZ` from the kernel's config in /boot (Debian) or /proc.
fn hz(release: &str) -> Option<String> {
    let config = std::fs::read_to_string(format!("/boot/config-{release}"))
        .ok()
        .or_else(|| output(Command::new("zcat").arg("/proc/config.gz")))?;
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .map(str::to_string)
}

impl Machine {
    /// This machine, now; the commit of the working directory.
    pub(super) fn here(dir: &Path) -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| UNKNOWN.into());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| UNKNOWN.into());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let load = std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| UNKNOWN.into());
        let commit = match output(Command::new("git").args(["rev-parse", "HEAD"])) {
            Some(c) => {
                let dirty = output(Command::new("git").args(["status", "--porcelain", "-uno"]))
                    .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{c} (with uncommitted changes)")
                } else {
                    c
                }
            }
            None => UNKNOWN.into(),
        };
        let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M"]))
            .unwrap_or_else(|| UNKNOWN.into());
        Machine {
            hz: hz(&kernel).unwrap_or_else(|| format!("{UNKNOWN} (no kernel config found)")),
            kernel,
            cpu,
            cores,
            load,
            commit,
            date,
            dir: dir.display().to_string(),
        }
    }
}
