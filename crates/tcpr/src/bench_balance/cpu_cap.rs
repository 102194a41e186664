//! A CPU cap for the bench's front process: a cgroup with a CFS bandwidth
//! limit (v1 `cpu.cfs_quota_us`, or v2 `cpu.max` at the root of a v2
//! hierarchy), which a front joins for a run and leaves after it.
//!
//! Why the bench caps a front: on the bench's machine every process of
//! the topology (client, front, backends) shares the same few cores, so
//! an uncapped run measures the CPU of the whole path per request, and
//! tcpr moves work from the front to the backends by design (the restore,
//! and the response served from there). A front in production has its
//! own machine, and its capacity is its CPU per request; capping each
//! front at the same small share makes it the bottleneck, as it is there,
//! while the rest of the machine stands in for its clients and backends.
//! Written by hand: a few files in cgroupfs, no crate needed.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The CFS period: short, so that a capped front is throttled in slices
/// of a few ms rather than in 100 ms stalls (the kernel's default).
const PERIOD_US: u64 = 10_000;

/// A cgroup whose members share `share` of one core; removed on drop
/// (after its members left it).
#[derive(Debug)]
pub struct CpuCap {
    dir: PathBuf,
    /// The hierarchy's root.
    root: PathBuf,
    /// v1: the controller list naming the hierarchy in /proc/PID/cgroup
    /// ("cpu", "cpu,cpuacct"); v2: empty.
    v1: bool,
    /// Where each member was before [`CpuCap::hold`], to go back to.
    was: std::sync::Mutex<std::collections::HashMap<u32, PathBuf>>,
}

/// Which cgroup hierarchy holds the cpu controller.
enum Hierarchy {
    /// A v1 hierarchy with the cpu controller, mounted at the path.
    V1(PathBuf),
    /// A v2 hierarchy with the cpu controller available at its root.
    V2(PathBuf),
}

/// Finds the cpu controller in /proc/self/mounts: a v1 `cgroup` mount
/// with the `cpu` option, else a `cgroup2` mount whose root offers `cpu`.
fn find_hierarchy() -> Result<Hierarchy> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    let mut v2 = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, dir, fstype, options, ..] = f[..] else {
            continue;
        };
        match fstype {
            "cgroup" if options.split(',').any(|o| o == "cpu") => {
                return Ok(Hierarchy::V1(PathBuf::from(dir)))
            }
            "cgroup2" if v2.is_none() => {
                let offered = std::fs::read_to_string(Path::new(dir).join("cgroup.controllers"))
                    .unwrap_or_default();
                if offered.split_whitespace().any(|c| c == "cpu") {
                    v2 = Some(PathBuf::from(dir));
                }
            }
            _ => {}
        }
    }
    match v2 {
        Some(dir) => Ok(Hierarchy::V2(dir)),
        None => bail!(
            "no cgroup hierarchy offers the cpu controller (a v1 `cgroup` mount with `cpu`, \
             or a `cgroup2` mount listing it in cgroup.controllers): the front cannot be capped"
        ),
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {text:?} to {}", path.display()))
}

impl CpuCap {
    /// A new cgroup named `name` whose members together get at most
    /// `share` of one core (0 < share ≤ 1).
    pub fn new(name: &str, share: f64) -> Result<CpuCap> {
        if !(share > 0.0 && share <= 1.0) {
            bail!("a CPU cap of {share} cores is not between 0 and 1");
        }
        let quota = ((PERIOD_US as f64) * share).round() as u64;
        let (root, dir) = match find_hierarchy()? {
            Hierarchy::V1(root) => {
                let dir = root.join(name);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("mkdir {}", dir.display()))?;
                let cap = CpuCap {
                    dir,
                    root,
                    v1: true,
                    was: Default::default(),
                };
                // The period first: a quota above the old period is refused
                // by nothing, but a period below the quota would be.
                write(&cap.dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&cap.dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                return Ok(cap);
            }
            Hierarchy::V2(root) => {
                write(&root.join("cgroup.subtree_control"), "+cpu")?;
                (root.clone(), root.join(name))
            }
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let cap = CpuCap {
            dir,
            root,
            v1: false,
            was: Default::default(),
        };
        write(&cap.dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
        Ok(cap)
    }

    /// Moves process `pid` (all its threads, and those it starts later)
    /// into the cap.
    pub fn hold(&self, pid: u32) -> Result<()> {
        let was = self.cgroup_of(pid)?;
        write(&self.dir.join("cgroup.procs"), &pid.to_string())?;
        self.was
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, was);
        Ok(())
    }

    /// Moves process `pid` back to where it was before [`CpuCap::hold`].
    pub fn release(&self, pid: u32) -> Result<()> {
        let was = self
            .was
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid)
            .unwrap_or_else(|| self.root.clone());
        write(&was.join("cgroup.procs"), &pid.to_string())
    }

    /// The directory of `pid`'s cgroup in this hierarchy, from
    /// /proc/PID/cgroup ("ID:CONTROLLERS:PATH"; v1: the line whose
    /// controllers include cpu, v2: the line with none).
    fn cgroup_of(&self, pid: u32) -> Result<PathBuf> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .with_context(|| format!("read /proc/{pid}/cgroup"))?;
        let path = text
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
                let ours = if self.v1 {
                    controllers.split(',').any(|c| c == "cpu")
                } else {
                    controllers.is_empty()
                };
                ours.then_some(path)
            })
            .next()
            .with_context(|| format!("process {pid} is in no cgroup of the cpu hierarchy"))?;
        Ok(self.root.join(path.trim_start_matches('/')))
    }

    /// Whether `pid` is in the cap now (from /proc/PID/cgroup).
    #[cfg(test)]
    pub fn holds(&self, pid: u32) -> bool {
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string());
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        name.is_some_and(|n| text.lines().any(|l| l.ends_with(&format!("/{n}"))))
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        // A cgroup with members cannot be removed: those that were not
        // released (a front that ended) are gone by now.
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!(
                "tcpr bench-balance: cannot remove {}: {e}",
                self.dir.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process held in the cap gets about its share of a core, and
    /// released it is in the root again; the cgroup goes on drop.
    #[test]
    fn a_held_busy_process_gets_its_share_and_goes_back() {
        let cap = CpuCap::new(&format!("tcpr-test-cap-{}", std::process::id()), 0.2).unwrap();
        let dir = cap.dir.clone();
        /// Ends the loop whatever the test's end.
        struct Busy(std::process::Child);
        impl Drop for Busy {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let busy = Busy(
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap(),
        );
        let pid = busy.0.id();
        let home = cap.cgroup_of(pid).unwrap();
        cap.hold(pid).unwrap();
        assert!(cap.holds(pid));
        let before = crate::bench_balance::cpu_seconds(pid).unwrap();
        std::thread::sleep(std::time::Duration::from_secs(1));
        let used = crate::bench_balance::cpu_seconds(pid).unwrap() - before;
        cap.release(pid).unwrap();
        assert!(!cap.holds(pid));
        assert_eq!(cap.cgroup_of(pid).unwrap(), home, "back where it was");
        drop(busy);
        // 0.2 s of CPU in a second, within the tick's resolution and the
        // sleep's slack; an uncapped loop takes a whole second.
        assert!((0.1..0.4).contains(&used), "used {used} s of CPU in 1 s");
        drop(cap);
        assert!(!dir.exists());
    }

    #[test]
    fn a_share_outside_one_core_is_refused() {
        for share in [0.0, -1.0, 1.5, f64::NAN] {
            assert!(CpuCap::new("tcpr-test-cap-bad", share).is_err(), "{share}");
        }
    }
}
