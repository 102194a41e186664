//! Where the BPF datapath pins its flows map and its tcx link, so that
//! both outlive the process: a balancer killed, crashed or restarted
//! leaves its program steering the flows it handed off (their
//! connections live on the backends), and the next datapath on the same
//! interface takes them over.
//!
//! ```text
//! /sys/fs/bpf                       a BPF file system (mounted if not,
//!                                   in the host's mount namespace only)
//!   tcpr/steer-NETNS-IFINDEX/       one per interface: NETNS is the
//!                                   namespace's cookie (never reused in
//!                                   a boot), IFINDEX the interface's
//!     flows                         the flows map
//!     link                          the tcx link (attached while pinned)
//! ```
//!
//! A directory whose link is detached (its interface, or its namespace,
//! is gone) is stale: every datapath that installs removes those it finds,
//! which frees their maps.
//!
//! A BPF file system is one instance per mount: pins outlive a process
//! only in an instance that outlives its mount namespace. `ip netns exec`
//! runs each command in a mount namespace of its own, with a fresh
//! `/sys` that hides the host's `/sys/fs/bpf`; a BPF file system mounted
//! there would go with the command. So one is mounted on `/sys/fs/bpf`
//! only in the host's mount namespace (PID 1's); elsewhere the pin
//! directory must already be on one the host shares (another directory
//! than `/sys/fs/bpf`, mounted before the namespace was made), or nothing
//! is pinned.

use aya::maps::{Map, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tcpr_host::bpf::{is_bpffs, mount_bpffs, obj_get, tcx_link};

/// The BPF file system's usual mount point.
const BPFFS: &str = "/sys/fs/bpf";
/// Where a datapath pins itself unless told otherwise: `tcpr` in it.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tcpr";
const LINK: &str = "link";
const FLOWS: &str = "flows";
/// Names a new pin has until it replaces the old one (`rename`). (No
/// dot: bpffs keeps names with one for itself, EPERM.)
const LINK_NEW: &str = "link_new";
const FLOWS_NEW: &str = "flows_new";
/// A directory with no link pinned is being filled by an install (flows
/// first): stale only when older than this.
const HALF_PINNED_STALE: Duration = Duration::from_secs(60);

/// One interface's pin directory.
#[derive(Debug)]
pub(crate) struct Pins {
    dir: PathBuf,
}

/// What an earlier datapath of the interface left: its link, still
/// attached (its program steers), and its flows map.
pub(crate) struct Left {
    /// Held until the new program is attached and pinned in its place;
    /// closing it then detaches the old program.
    pub(crate) _link: OwnedFd,
    /// As a hash map: its layout is checked when read.
    pub(crate) flows: Map,
}

impl Pins {
    /// The directory of the datapath on `ifindex` in the network
    /// namespace whose cookie is `netns`, under `root` (on a BPF file
    /// system; [`DEFAULT_PIN_DIR`] mounts one if need be). Removes the
    /// stale directories it finds there.
    pub(crate) fn open(root: &Path, netns: u64, ifindex: u32) -> io::Result<Pins> {
        on_bpffs(root)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(root)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", root.display())))?;
        remove_stale(root);
        Ok(Pins {
            dir: root.join(format!("steer-{netns:x}-{ifindex}")),
        })
    }

    /// The directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// What an earlier datapath left here, if its program is still
    /// attached to `ifindex`; anything else pinned here is removed.
    pub(crate) fn left(&self, ifindex: u32) -> Option<Left> {
        let link = obj_get(&self.dir.join(LINK)).ok();
        let attached = link
            .as_ref()
            .and_then(|l| tcx_link(l.as_fd()).ok())
            .is_some_and(|l| l.ifindex == ifindex);
        let flows = MapData::from_pin(self.dir.join(FLOWS)).ok();
        match (link, flows) {
            (Some(link), Some(flows)) if attached => Some(Left {
                _link: link,
                flows: Map::HashMap(flows),
            }),
            _ => {
                remove_dir(&self.dir);
                None
            }
        }
    }

    /// Pins `flows` under a new name, before the program is attached: the
    /// first half of [`Pins::commit`].
    pub(crate) fn stage(&self, flows: &MapData) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(&self.dir)?;
        let _ = std::fs::remove_file(self.dir.join(FLOWS_NEW));
        flows
            .pin(self.dir.join(FLOWS_NEW))
            .map_err(io::Error::other)
    }

    /// Puts the map [`Pins::stage`]d and `link` in place of what was
    /// pinned, each at once (`rename`), the map first: a crash in between
    /// leaves the old link with the new map, which the next datapath takes
    /// over as well. Returns the link pinned (holding a descriptor of it)
    /// and its id.
    pub(crate) fn commit(&self, link: FdLink) -> io::Result<(PinnedLink, u32)> {
        let at = |name: &str| self.dir.join(name);
        std::fs::rename(at(FLOWS_NEW), at(FLOWS))?;
        let _ = std::fs::remove_file(at(LINK_NEW));
        let pinned = link.pin(at(LINK_NEW)).map_err(io::Error::other)?;
        std::fs::rename(at(LINK_NEW), at(LINK))?;
        let id = tcx_link(obj_get(&at(LINK))?.as_fd())?.id;
        Ok((pinned, id))
    }

    /// Removes the pins if the link pinned is `ours` (a datapath that took
    /// over since owns them now). The program detaches once the last
    /// descriptor of its link closes.
    pub(crate) fn remove(&self, ours: u32) {
        let owned = obj_get(&self.dir.join(LINK))
            .and_then(|l| tcx_link(l.as_fd()))
            .is_ok_and(|l| l.id == ours);
        if owned {
            remove_dir(&self.dir);
        }
    }
}

/// Removes a pin directory and what it holds.
fn remove_dir(dir: &Path) {
    for name in [LINK, FLOWS, LINK_NEW, FLOWS_NEW] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes the directories under `root` whose link is detached (their
/// interface is gone), or that hold no link and are older than a half-done
/// install can be.
fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !e.file_name().to_string_lossy().starts_with("steer-") {
            continue;
        }
        let stale = match obj_get(&dir.join(LINK)) {
            Ok(link) => tcx_link(link.as_fd()).map_or(true, |l| l.ifindex == 0),
            Err(_) => e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > HALF_PINNED_STALE),
        };
        if stale {
            remove_dir(&dir);
        }
    }
}

/// Makes sure `root` is, or will be made, on a BPF file system: the
/// nearest existing directory at or above it must be on one. Mounts one on
/// `/sys/fs/bpf` for the default directory, in the host's mount namespace
/// only (see the module doc).
fn on_bpffs(root: &Path) -> io::Result<()> {
    let existing = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing)? {
        return Ok(());
    }
    if root != Path::new(DEFAULT_PIN_DIR) || existing != Path::new(BPFFS) {
        return Err(io::Error::other(format!(
            "{} is not on a BPF file system",
            root.display()
        )));
    }
    if !in_host_mount_namespace()? {
        return Err(io::Error::other(format!(
            "no BPF file system on {BPFFS} in this mount namespace, which is not the host's \
             (as under `ip netns exec`): one mounted here would go with it; give a pin \
             directory on a BPF file system the host shares"
        )));
    }
    mount_bpffs(Path::new(BPFFS))
        .map_err(|e| io::Error::new(e.kind(), format!("mount a BPF file system on {BPFFS}: {e}")))
}

/// Whether this process shares PID 1's mount namespace.
fn in_host_mount_namespace() -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    Ok(id("/proc/self/ns/mnt")? == id("/proc/1/ns/mnt")?)
}
