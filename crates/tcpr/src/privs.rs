//! What each subcommand needs of the kernel's privileges, checked before
//! it touches anything, and the agent's drop to an unprivileged user.
//!
//! | subcommand | needs |
//! |---|---|
//! | `dump`, `thaw` | CAP_NET_ADMIN (TCP_REPAIR, the flow lock in nftables); CAP_SYS_PTRACE, or the user of `--pid` (`pidfd_getfd`) |
//! | `restore` | CAP_NET_ADMIN (TCP_REPAIR, IP_TRANSPARENT, SO_MARK and a local route); CAP_NET_RAW for a half-closed image (the peer's FIN is replayed from a raw socket); CAP_NET_BIND_SERVICE for a local port below `net.ipv4.ip_unprivileged_port_start` |
//! | `agent` | CAP_NET_ADMIN (restore, lock, addresses); CAP_NET_RAW (peer FIN replay, announcing a taken address); CAP_NET_BIND_SERVICE for a privileged `--listen` or `--allow` port; CAP_SETUID and CAP_SETGID with `--user` |
//! | `migrate` | CAP_NET_ADMIN (freeze, lock, `--move-address`); CAP_SYS_PTRACE or the user of `--pid`; CAP_NET_RAW with `--move-address` (an address put back is announced) |
//! | `announce` | CAP_NET_RAW (a packet socket) |
//! | `demo`, `bench`, `bench-handoff` | CAP_SYS_ADMIN (network namespaces), CAP_NET_ADMIN, CAP_NET_RAW |
//! | `inspect`, `ls`, `bench-peer` | nothing (`ls` shows `?` for what it may not see) |
//!
//! Capabilities count in the user namespace that owns the network
//! namespace (`unshare -Urn` gives them all there), except where the
//! kernel checks the initial namespace (SO_SNDBUFFORCE: the engine then
//! sizes buffers within `net.core.wmem_max`).

use crate::{Cmd, Leave};
use anyhow::{bail, Context, Result};
use caps::{CapSet, Capability, CapsHashSet};
use std::net::SocketAddr;

/// One thing a subcommand needs, and why.
struct Need {
    cap: Capability,
    why: &'static str,
}

/// What a subcommand needs.
struct Needs {
    subcommand: &'static str,
    caps: Vec<Need>,
    /// Processes whose fds it takes (`pidfd_getfd`).
    ptrace: Option<i32>,
}

const NET_ADMIN_REPAIR: Need = Need {
    cap: Capability::CAP_NET_ADMIN,
    why: "TCP_REPAIR and the flow lock",
};

/// The first port that needs no CAP_NET_BIND_SERVICE (the sysctl is the
/// same for IPv4 and IPv6).
fn unprivileged_port_start() -> u16 {
    const DEFAULT_UNPRIVILEGED_PORT_START: u16 = 1024;
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_UNPRIVILEGED_PORT_START)
}

fn privileged_port(port: u16) -> bool {
    port != 0 && port < unprivileged_port_start()
}

const BIND_LOW_PORT: Need = Need {
    cap: Capability::CAP_NET_BIND_SERVICE,
    why: "a port below net.ipv4.ip_unprivileged_port_start",
};

fn needs(cmd: &Cmd, have: &CapsHashSet) -> Needs {
    let (subcommand, caps, ptrace) = match cmd {
        Cmd::Dump { pid, leave, .. } => {
            let why = match leave {
                Leave::Frozen => "TCP_REPAIR and the flow lock",
                Leave::Running => "TCP_REPAIR",
            };
            let net_admin = Need {
                cap: Capability::CAP_NET_ADMIN,
                why,
            };
            ("dump", vec![net_admin], Some(*pid))
        }
        Cmd::Thaw { pid, .. } => ("thaw", vec![NET_ADMIN_REPAIR], Some(*pid)),
        Cmd::Restore { file, .. } => {
            let mut caps = vec![Need {
                cap: Capability::CAP_NET_ADMIN,
                why: "TCP_REPAIR, IP_TRANSPARENT and a local route",
            }];
            // The image decides the rest (read here only when one of them
            // is missing); one that does not read is reported by restore.
            let may_lack = !have.contains(&Capability::CAP_NET_RAW)
                || !have.contains(&Capability::CAP_NET_BIND_SERVICE);
            if let Some(img) = may_lack
                .then(|| std::fs::read(file).ok())
                .flatten()
                .and_then(|b| tcpr_image::ConnectionImage::decode(&b).ok())
            {
                if img.state.peer_closed() {
                    caps.push(Need {
                        cap: Capability::CAP_NET_RAW,
                        why: "replaying the peer's FIN from a raw socket",
                    });
                }
                if privileged_port(img.local.port()) {
                    caps.push(BIND_LOW_PORT);
                }
            }
            ("restore", caps, None)
        }
        Cmd::Agent(a) => {
            let mut caps = vec![
                Need {
                    cap: Capability::CAP_NET_ADMIN,
                    why: "restoring, locking and taking addresses",
                },
                Need {
                    cap: Capability::CAP_NET_RAW,
                    why: "replaying a peer's FIN and announcing a taken address",
                },
            ];
            let ports = std::iter::once(a.listen)
                .chain(a.allow.iter().copied())
                .map(|s: SocketAddr| s.port());
            if ports.into_iter().any(privileged_port) {
                caps.push(BIND_LOW_PORT);
            }
            if a.user.is_some() {
                caps.push(Need {
                    cap: Capability::CAP_SETUID,
                    why: "--user",
                });
                caps.push(Need {
                    cap: Capability::CAP_SETGID,
                    why: "--user",
                });
            }
            ("agent", caps, None)
        }
        Cmd::Migrate(m) => {
            let mut caps = vec![NET_ADMIN_REPAIR];
            if m.move_address {
                caps.push(Need {
                    cap: Capability::CAP_NET_RAW,
                    why: "announcing an address put back",
                });
            }
            ("migrate", caps, m.pid)
        }
        Cmd::Announce { .. } => (
            "announce",
            vec![Need {
                cap: Capability::CAP_NET_RAW,
                why: "a packet socket",
            }],
            None,
        ),
        Cmd::Balance(b) if b.runs() => {
            let mut caps = vec![Need {
                cap: Capability::CAP_NET_ADMIN,
                why: "TCP_REPAIR to hand connections off, and the steering table",
            }];
            // The kernel takes CAP_SYS_ADMIN in place of CAP_BPF.
            if b.needs_bpf() && !have.contains(&Capability::CAP_SYS_ADMIN) {
                caps.push(Need {
                    cap: Capability::CAP_BPF,
                    why: "the BPF steering datapath (--steer-datapath nft needs none)",
                });
            }
            ("balance", caps, None)
        }
        Cmd::Balance(_) => ("", vec![], None),
        Cmd::Demo { .. }
        | Cmd::Bench { .. }
        | Cmd::BenchHandoff { .. }
        | Cmd::BenchBalance { .. }
        | Cmd::Soak(_) => {
            let subcommand = match cmd {
                Cmd::Demo { .. } => "demo",
                Cmd::Bench { .. } => "bench",
                Cmd::Soak(_) => "soak",
                Cmd::BenchBalance { .. } => "bench-balance",
                _ => "bench-handoff",
            };
            let caps = vec![
                Need {
                    cap: Capability::CAP_SYS_ADMIN,
                    why: "network namespaces",
                },
                Need {
                    cap: Capability::CAP_NET_ADMIN,
                    why: "TCP_REPAIR, locks and addresses",
                },
                Need {
                    cap: Capability::CAP_NET_RAW,
                    why: "announcements",
                },
            ];
            (subcommand, caps, None)
        }
        Cmd::Inspect { .. }
        | Cmd::Ls { .. }
        | Cmd::BenchPeer { .. }
        | Cmd::RelayWorker
        | Cmd::AgentStandIn(_) => ("", vec![], None),
    };
    Needs {
        subcommand,
        caps,
        ptrace,
    }
}

/// Checks, before anything is touched, that this process holds what
/// `cmd` needs: one line names everything missing and why.
pub fn check(cmd: &Cmd) -> Result<()> {
    let have =
        caps::read(None, CapSet::Effective).context("cannot read this process's capabilities")?;
    let needs = needs(cmd, &have);
    let mut missing: Vec<String> = needs
        .caps
        .iter()
        .filter(|n| !have.contains(&n.cap))
        .map(|n| format!("{} ({})", n.cap, n.why))
        .collect();
    if let Some(pid) = needs.ptrace {
        if !have.contains(&Capability::CAP_SYS_PTRACE) {
            if let Some(why) = ptrace_refused(pid) {
                missing.push(format!(
                    "CAP_SYS_PTRACE or the user of process {pid} (to take its fds with pidfd_getfd: {why})"
                ));
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "`tcpr {}` is not permitted: it needs {}, which this process lacks: run it as root, or grant them (setcap, systemd AmbientCapabilities=, or inside `unshare -Urn`)",
        needs.subcommand,
        missing.join(", ")
    )
}

/// Why the kernel would refuse `pidfd_getfd` on `pid` to a caller without
/// CAP_SYS_PTRACE (ptrace_may_access with PTRACE_MODE_REALCREDS: the
/// caller's real uid and gid must be each of the target's real, effective
/// and saved ids), or `None` when it would not (or the process is gone:
/// the subcommand reports that itself).
fn ptrace_refused(pid: i32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ids = |key: &str| -> Option<Vec<u32>> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .split_whitespace()
            .take(3)
            .map(|v| v.parse().ok())
            .collect()
    };
    let (uids, gids) = (ids("Uid:")?, ids("Gid:")?);
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    if uids.iter().all(|&u| u == uid) && gids.iter().all(|&g| g == gid) {
        return None;
    }
    Some(format!(
        "it runs as uid {} gid {}, this process as uid {uid} gid {gid}",
        uids[0], gids[0]
    ))
}

/// The capabilities the agent keeps once it runs as its `--user`.
pub fn agent_keeps(listen: SocketAddr, allow: &[SocketAddr]) -> CapsHashSet {
    let mut keep: CapsHashSet = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW]
        .into_iter()
        .collect();
    if std::iter::once(listen)
        .chain(allow.iter().copied())
        .any(|s| privileged_port(s.port()))
    {
        keep.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    keep
}

/// Becomes `user` (its uid, its primary group, no supplementary groups)
/// keeping only `keep`, in the permitted and effective sets and in the
/// bounding set (so that nothing it runs regains the rest). Capabilities
/// are per thread (capset(2)) while glibc's setresuid applies to every
/// thread: this runs while the process has one thread only, so that every
/// thread it starts later inherits the result.
pub fn become_user(user: &str, keep: &CapsHashSet) -> Result<()> {
    use nix::unistd::{setgroups, setresgid, setresuid, User};
    let threads = std::fs::read_dir("/proc/self/task")
        .context("cannot count this process's threads")?
        .count();
    if threads != 1 {
        bail!("cannot drop privileges: {threads} threads run already (each keeps its own capabilities)");
    }
    let entry = User::from_name(user)
        .with_context(|| format!("cannot look up the user {user:?}"))?
        .with_context(|| format!("no user named {user:?}"))?;
    let fail = |what: &str| format!("cannot become {user} (uid {}): {what}", entry.uid);
    // The bounding set needs CAP_SETPCAP to shrink: before the uid changes.
    for cap in caps::read(None, CapSet::Bounding).with_context(|| fail("read the bounding set"))? {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .with_context(|| fail("shrink the bounding set"))?;
        }
    }
    // Without keep-caps the kernel clears the permitted set when the last
    // uid 0 goes (capabilities(7), "Effect of user ID changes").
    caps::securebits::set_keepcaps(true).with_context(|| fail("keep capabilities"))?;
    setgroups(&[]).with_context(|| fail("setgroups"))?;
    setresgid(entry.gid, entry.gid, entry.gid).with_context(|| fail("setresgid"))?;
    setresuid(entry.uid, entry.uid, entry.uid).with_context(|| fail("setresuid"))?;
    caps::securebits::set_keepcaps(false).with_context(|| fail("reset keep-caps"))?;
    caps::clear(None, CapSet::Inheritable).with_context(|| fail("clear inheritable"))?;
    caps::clear(None, CapSet::Ambient).with_context(|| fail("clear ambient"))?;
    caps::set(None, CapSet::Permitted, keep).with_context(|| fail("set permitted"))?;
    caps::set(None, CapSet::Effective, keep).with_context(|| fail("set effective"))?;
    let now = caps::read(None, CapSet::Effective).with_context(|| fail("read back"))?;
    if &now != keep {
        bail!("{}", fail("the kernel kept other capabilities"));
    }
    Ok(())
}

/// Fails unless `dir` (the agent's journal) is writable now, as `user`.
pub fn check_writable(dir: &std::path::Path, user: &str) -> Result<()> {
    use nix::unistd::{access, AccessFlags};
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK).with_context(|| {
        format!(
            "the journal directory {} is not writable by {user}: give it to that user (chown), or choose another with --journal",
            dir.display()
        )
    })
}
