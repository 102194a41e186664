//! Where the BPF datapath pins its tcx link, so that its program (and the
//! flows map the program holds) outlives the process: a balancer killed,
//! crashed, failed after its start or stopped with flows steered leaves
//! its program steering the flows it handed off (their connections live
//! on the backends), and the next datapath on the same interface takes
//! them over.
//!
//! ```text
//! /sys/fs/bpf                       a BPF file system (mounted if not,
//!                                   in the host's mount namespace only)
//!   tcpr/                           locked (flock) by whoever changes a pin
//!     steer-NETNS-IFINDEX/          one per interface: NETNS is the
//!                                   namespace's cookie (never reused in
//!                                   a boot), IFINDEX the interface's
//!       link                        the tcx link (attached while pinned)
//!       flows-PROG                  the flows map of the link's program
//!                                   (PROG: the program's id)
//! ```
//!
//! The link names its program, and the program its map (`flows-PROG`):
//! the map the next datapath copies is always the one that steers, and
//! the link is the one pin replaced at once (`rename`). Every change is
//! made under the root directory's lock.
//!
//! A directory whose link is detached (its interface, or its namespace,
//! is gone) is stale: every datapath that installs removes those it finds,
//! which frees their programs and maps. Nothing is removed on an error
//! that does not prove it stale.
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

use aya::maps::{Map, MapData, MapInfo};
use aya::programs::links::{FdLink, PinnedLink};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tcpr_host::bpf::{is_bpffs, mount_bpffs, obj_get, tcx_link, TcxLink};

/// The BPF file system's usual mount point.
const BPFFS: &str = "/sys/fs/bpf";
/// Where a datapath pins itself unless told otherwise: `tcpr` in it.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tcpr";
const LINK: &str = "link";
/// A flows map is pinned as `flows-PROG` (PROG its program's id), so the
/// link's program names its map: opened by path, which needs no more than
/// the pin itself (by id needs CAP_SYS_ADMIN).
const FLOWS_PREFIX: &str = "flows-";
/// The name a new pin has until it replaces the old one (`rename`). (No
/// dot: bpffs keeps names with one for itself, EPERM.)
const LINK_NEW: &str = "link_new";
/// A directory with no link pinned may be an install's, between its
/// `mkdir` and its pin: stale only when older than this.
const UNPINNED_STALE: Duration = Duration::from_secs(60);
/// The name of the steering program's flows map (steer.bpf.c).
const FLOWS_MAP: &str = "flows";

/// One interface's pin directory.
#[derive(Debug)]
pub(crate) struct Pins {
    root: PathBuf,
    dir: PathBuf,
}

/// The root directory's lock, held while pins change (released on drop).
pub(crate) struct Locked(#[allow(dead_code)] File);

/// What an earlier datapath of the interface left: its link, still
/// attached (its program steers), and the flows map its program uses.
pub(crate) struct Left {
    /// Held until the new program is attached and pinned in its place;
    /// closing it then detaches the old program (unless its process still
    /// holds it).
    pub(crate) _link: OwnedFd,
    /// As a hash map: its layout is checked when read.
    pub(crate) flows: Map,
}

/// A link pinned here, as the kernel describes it.
pub(crate) type Pinned = TcxLink;

impl Pins {
    /// The directory of the datapath on `ifindex` in the network
    /// namespace whose cookie is `netns`, under `root` (on a BPF file
    /// system; [`DEFAULT_PIN_DIR`] mounts one if need be).
    pub(crate) fn open(root: &Path, netns: u64, ifindex: u32) -> io::Result<Pins> {
        on_bpffs(root)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(root)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", root.display())))?;
        Ok(Pins {
            root: root.to_path_buf(),
            dir: root.join(format!("steer-{netns:x}-{ifindex}")),
        })
    }

    /// The directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the root directory's lock (waits for it): one process at a
    /// time reads and changes pins.
    pub(crate) fn lock(&self) -> io::Result<Locked> {
        let f = File::open(&self.root)?;
        tcpr_host::bpf::lock_exclusive(f.as_fd())?;
        Ok(Locked(f))
    }

    /// Removes the stale directories under the root (under its lock).
    pub(crate) fn remove_stale(&self, _locked: &Locked) {
        remove_stale(&self.root);
    }

    /// The link pinned here now: `None` when there is none.
    pub(crate) fn pinned(&self, _locked: &Locked) -> io::Result<Option<Pinned>> {
        match open_pinned(&self.dir.join(LINK))? {
            Some(link) => tcx_link(link.as_fd()).map(Some),
            None => Ok(None),
        }
    }

    /// What an earlier datapath left here, if its program is still
    /// attached to `ifindex`: `None` when nothing is pinned, or what is is
    /// stale (then removed). An error, when what is pinned cannot be read,
    /// removes nothing.
    pub(crate) fn left(&self, _locked: &Locked, ifindex: u32) -> io::Result<Option<Left>> {
        let Some(link) = open_pinned(&self.dir.join(LINK))? else {
            return Ok(None);
        };
        let info = tcx_link(link.as_fd())?;
        if info.ifindex == 0 {
            remove_dir(&self.dir);
            return Ok(None);
        }
        if info.ifindex != ifindex {
            return Err(io::Error::other(format!(
                "the link pinned there is attached to interface {}, not {ifindex}",
                info.ifindex
            )));
        }
        let flows = Map::HashMap(self.flows_of(info.prog_id)?);
        Ok(Some(Left { _link: link, flows }))
    }

    /// Pins `link` here in place of what was (a `rename`: at once), and
    /// `flows`, its program's map, as `flows-PROG` (the old program's is
    /// unpinned; the old program, while attached, holds it). Returns the
    /// link pinned (holding a descriptor of it) and its id.
    pub(crate) fn commit(
        &self,
        _locked: &Locked,
        link: FdLink,
        flows: &MapData,
    ) -> io::Result<(PinnedLink, u32)> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(&self.dir)?;
        let at = |name: &str| self.dir.join(name);
        let _ = std::fs::remove_file(at(LINK_NEW));
        let pinned = link.pin(at(LINK_NEW)).map_err(io::Error::other)?;
        let undo = |e: io::Error, map: Option<&Path>| {
            // Not pinned after all: the program stays attached through
            // `pinned` until the caller drops it.
            let _ = std::fs::remove_file(at(LINK_NEW));
            if let Some(m) = map {
                let _ = std::fs::remove_file(m);
            }
            e
        };
        let info = match obj_get(&at(LINK_NEW)).and_then(|l| tcx_link(l.as_fd())) {
            Ok(l) => l,
            Err(e) => return Err(undo(e, None)),
        };
        let map = at(&flows_name(info.prog_id));
        let _ = std::fs::remove_file(&map);
        if let Err(e) = flows.pin(&map) {
            return Err(undo(io::Error::other(e), None));
        }
        if let Err(e) = std::fs::rename(at(LINK_NEW), at(LINK)) {
            return Err(undo(e, Some(&map)));
        }
        // The maps of programs no longer pinned.
        let ours = flows_name(info.prog_id);
        for name in names_in(&self.dir) {
            if name.starts_with(FLOWS_PREFIX) && name != ours {
                let _ = std::fs::remove_file(at(&name));
            }
        }
        Ok((pinned, info.id))
    }

    /// The flows map of the program `prog_id`, pinned here (or, where it
    /// is not, found by id: that needs CAP_SYS_ADMIN).
    pub(crate) fn flows_of(&self, prog_id: u32) -> io::Result<MapData> {
        let path = self.dir.join(flows_name(prog_id));
        match open_pinned(&path)? {
            Some(fd) => MapData::from_fd(fd).map_err(io::Error::other),
            None => flows_by_id(prog_id),
        }
    }

    /// Removes the pin (the program detaches once the last descriptor of
    /// its link closes) and the directory.
    pub(crate) fn remove(&self, _locked: &Locked) {
        remove_dir(&self.dir);
    }
}

/// The name a flows map is pinned under.
fn flows_name(prog_id: u32) -> String {
    format!("{FLOWS_PREFIX}{prog_id}")
}

/// The file names in `dir`.
fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The flows map of the program `prog_id` (a steering program: its map
/// named [`FLOWS_MAP`]), found by id (CAP_SYS_ADMIN).
fn flows_by_id(prog_id: u32) -> io::Result<MapData> {
    let prog = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .ok_or_else(|| io::Error::other(format!("program {prog_id} is gone")))?;
    let ids = prog
        .map_ids()
        .map_err(io::Error::other)?
        .unwrap_or_default();
    for id in ids {
        let info = MapInfo::from_id(id).map_err(io::Error::other)?;
        if info.name_as_str() == Some(FLOWS_MAP) {
            return MapData::from_id(id).map_err(io::Error::other);
        }
    }
    Err(io::Error::other(format!(
        "program {prog_id} has no {FLOWS_MAP} map"
    )))
}

/// The object pinned at `path`: `None` when nothing is (ENOENT), an
/// error for any other failure to open it.
fn open_pinned(path: &Path) -> io::Result<Option<OwnedFd>> {
    match obj_get(path) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes a pin directory and what tcpr pins in it (`flows` and
/// `flows_new`: pins of an earlier layout).
fn remove_dir(dir: &Path) {
    for name in names_in(dir) {
        let ours = [LINK, LINK_NEW, "flows", "flows_new"].contains(&name.as_str())
            || name.starts_with(FLOWS_PREFIX);
        if ours {
            let _ = std::fs::remove_file(dir.join(name));
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes the directories under `root` proved stale: a link pinned and
/// detached (its interface is gone), or no link pinned (ENOENT) in a
/// directory older than an install takes. Any other error leaves it.
fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !e.file_name().to_string_lossy().starts_with("steer-") {
            continue;
        }
        let stale = match open_pinned(&dir.join(LINK)) {
            Ok(Some(link)) => tcx_link(link.as_fd()).is_ok_and(|l| l.ifindex == 0),
            Ok(None) => e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > UNPINNED_STALE),
            Err(_) => false,
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
