//! A backend host of direct server return: the virtual address (VIP) on
//! the loopback, so the host takes packets for it and answers from it,
//! while it never claims the VIP on the link (the front host does).
//!
//! - IPv4: `arp_ignore=1` (answer ARP only for addresses of the interface
//!   the request came in on: not for one on `lo`) and `arp_announce=2`
//!   (ARP requests sent name the best address of the outgoing interface
//!   as sender, never the VIP). The kernel takes the larger of `all` and
//!   the interface's value (`IN_DEV_ARP_IGNORE`, `IN_DEV_ARP_ANNOUNCE`),
//!   so raising `all` covers every interface.
//! - IPv6: nothing to suppress: neighbour solicitations are answered only
//!   for addresses of the interface they arrive on (`ndisc_recv_ns` looks
//!   the target up strictly on that device).
//! - Reverse-path filtering needs nothing: the client's packets arrive on
//!   the interface that routes back to the client.
//!
//! Agents share a host's VIPs: two agents of one host (one per delivery
//! target: HTTP and HTTPS to two local servers) both serve the VIP, and
//! the one that added it must not remove it while the other serves it.
//! So each agent records what it holds under [`STATE_DIR`]`/NETNS` (the
//! network namespace's cookie, never reused in a boot; `/run` is emptied
//! at boot): a file per VIP, held with a shared `flock` for the agent's
//! life, saying whether an agent added the VIP (`added`), and a file for
//! the ARP settings, saying the values they had before an agent raised
//! them. The last agent to end (its shared lock converts to an exclusive
//! one without waiting) undoes: it removes a VIP an agent added and puts
//! the ARP settings back; the others leave them. A killed agent's locks
//! end with it and its records stay, so the next agent takes the VIP over
//! and, last out, undoes what the killed one did. Changes are made under
//! an exclusive lock of the directory's `.lock`, so that a start and an
//! end never interleave. Where the directory cannot be written, each
//! [`Vips`] undoes what it did itself, as before the records.

use crate::addr::{self, Assigned};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;

/// The ARP settings direct server return needs, as `(sysctl, at least)`.
const ARP_SETTINGS: [(&str, u32); 2] = [("arp_ignore", 1), ("arp_announce", 2)];
/// The loopback interface.
const LOOPBACK: &str = "lo";

/// Why a host could not be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The VIP is on a link: this host would answer ARP/ND for it and
    /// take the front's traffic.
    #[error("the VIP {ip} is assigned to {ifname}, not the loopback: remove it there first (a backend of direct server return must not claim the VIP on the link)")]
    OnLink {
        /// The VIP.
        ip: IpAddr,
        /// Where it is.
        ifname: String,
    },
    /// An address operation failed.
    #[error("VIP {ip}: {source}")]
    Address {
        /// The VIP.
        ip: IpAddr,
        /// Why.
        source: addr::Error,
    },
    /// A record shared with the host's other agents could not be kept.
    #[error("cannot keep the record {path}: {source}")]
    Record {
        /// Its file under [`STATE_DIR`].
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A sysctl could not be read or written.
    #[error("cannot set {path}: {source}")]
    Sysctl {
        /// Its file under /proc/sys.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Where agents record the VIPs and ARP settings they share (see the
/// module doc).
pub const STATE_DIR: &str = "/run/tcpr/vip";

/// A sysctl raised, with the value to put back.
#[derive(Debug)]
struct Raised {
    path: PathBuf,
    before: String,
}

/// The VIPs on the loopback and the ARP settings; undone on drop (by the
/// last agent of the namespace to end, see the module doc).
#[derive(Debug, Default)]
pub struct Vips {
    /// The namespace's directory of records; `None`: none could be made,
    /// and this guard undoes what it did itself.
    records: Option<PathBuf>,
    /// Each VIP's record, held (shared lock) while this guard lives.
    held: Vec<(IpAddr, File)>,
    /// The ARP settings' record, held likewise.
    arp: Option<File>,
    /// Without records: what this guard added and raised.
    added: Vec<Assigned>,
    raised: Vec<Raised>,
}

/// What a VIP's record says when an agent added it.
const ADDED: &str = "added\n";

/// Puts each of `vips` on the loopback (a /32 or /128) and, when one is
/// IPv4, raises the ARP settings. A VIP already on the loopback is left
/// as it is (taken over when an agent had added it: see the module doc);
/// one on another interface is refused. On error nothing is left changed.
pub fn prepare(vips: &[IpAddr]) -> Result<Vips, Error> {
    let lo = addr::interface_index(LOOPBACK).map_err(|source| Error::Address {
        ip: vips.first().copied().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        source,
    })?;
    // Refuse before changing anything.
    for &ip in vips {
        match addr::find(ip) {
            Ok(held) if held.ifname != LOOPBACK => {
                return Err(Error::OnLink {
                    ip,
                    ifname: held.ifname,
                })
            }
            Ok(_) | Err(addr::Error::NotFound(_)) => {}
            Err(source) => return Err(Error::Address { ip, source }),
        }
    }
    let mut done = Vips::default();
    let (records, _changing) = match records_dir() {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "tcpr: cannot record the VIPs in {STATE_DIR} ({e}): this agent's end undoes \
                 what it did, even while another agent of the host serves the VIPs"
            );
            done.prepare_alone(vips, lo)?;
            return Ok(done);
        }
    };
    done.records = Some(records.clone());
    if let Err(e) = done.prepare_recorded(vips, lo, &records) {
        // Undone under the lock held here (taking it again would wait for
        // ourselves).
        for f in done.undo_with(true) {
            eprintln!("tcpr: {f}");
        }
        let Error::Record { path, source } = e else {
            return Err(e);
        };
        // A record this agent cannot keep (a directory another user's
        // agent made): it runs without, as where none can be made.
        eprintln!(
            "tcpr: cannot keep the record {} ({source}): this agent's end undoes what it \
             did, even while another agent of the host serves the VIPs",
            path.display()
        );
        let mut alone = Vips::default();
        alone.prepare_alone(vips, lo)?;
        return Ok(alone);
    }
    Ok(done)
}

/// The calling thread's namespace's directory of records, created if
/// need be, with its `.lock` held exclusively (released when the file is
/// dropped).
fn records_dir() -> std::io::Result<(PathBuf, File)> {
    let nl = crate::sock::netlink_socket_in(None, libc::NETLINK_ROUTE)?;
    let cookie = crate::sock::netns_cookie(nl.as_fd())?;
    let dir = PathBuf::from(STATE_DIR).join(format!("netns-{cookie:x}"));
    std::fs::create_dir_all(&dir)?;
    // Read only once there: an agent whose privileges were dropped after
    // its start still locks it at its end (flock needs no write access).
    let path = dir.join(".lock");
    let lock = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?,
        Err(e) => return Err(e),
    };
    crate::flock(lock.as_fd(), crate::Flock::Exclusive)?;
    Ok((dir, lock))
}

/// Opens (creating) a record and takes its shared lock.
fn open_record(path: &std::path::Path) -> std::io::Result<File> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    crate::flock(f.as_fd(), crate::Flock::Shared)?;
    Ok(f)
}

/// Replaces a record's text.
fn write_record(mut f: &File, text: &str) -> std::io::Result<()> {
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(text.as_bytes())
}

/// A record's text.
fn read_record(mut f: &File) -> std::io::Result<String> {
    let mut text = String::new();
    f.seek(SeekFrom::Start(0))?;
    f.read_to_string(&mut text)?;
    Ok(text)
}

fn arp_path(name: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/all/{name}")
}

/// Raises the integer sysctl at `path` to `at_least`; the value it had
/// when it was lower.
fn raise(path: &str, at_least: u32) -> Result<Option<String>, Error> {
    let err = |source| Error::Sysctl {
        path: path.into(),
        source,
    };
    let before = std::fs::read_to_string(path).map_err(err)?;
    let now: u32 = before.trim().parse().map_err(|_| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a number: {before:?}"),
        ))
    })?;
    if now >= at_least {
        return Ok(None);
    }
    std::fs::write(path, at_least.to_string()).map_err(err)?;
    Ok(Some(before))
}

impl Vips {
    /// [`prepare`] with the namespace's records (their `.lock` held by the
    /// caller): what it holds is recorded in `self` as it goes, for
    /// [`Vips::undo`] on error.
    fn prepare_recorded(
        &mut self,
        vips: &[IpAddr],
        lo: u32,
        records: &std::path::Path,
    ) -> Result<(), Error> {
        if vips.iter().any(IpAddr::is_ipv4) {
            let path = records.join("arp");
            let record_err = |source| Error::Record {
                path: path.clone(),
                source,
            };
            let record = open_record(&path).map_err(record_err)?;
            let text = read_record(&record).map_err(record_err)?;
            let mut raised = Vec::new();
            for (name, at_least) in ARP_SETTINGS {
                let path = arp_path(name);
                if let Some(before) = raise(&path, at_least)? {
                    raised.push(format!("{name} {}", before.trim()));
                    // Undone by this guard until the record says it.
                    self.raised.push(Raised {
                        path: path.into(),
                        before,
                    });
                }
            }
            // The first to raise records the values from before; later ones
            // (the settings raised already, or lowered by hand since) leave
            // the record as it is.
            if text.is_empty() && !raised.is_empty() {
                write_record(&record, &(raised.join("\n") + "\n")).map_err(record_err)?;
            }
            self.raised.clear();
            self.arp = Some(record);
        }
        for &ip in vips {
            let path = records.join(ip.to_string());
            let record = open_record(&path).map_err(|source| Error::Record {
                path: path.clone(),
                source,
            })?;
            if addr::find(ip).is_err() {
                let a = Assigned {
                    ip,
                    prefix_len: if ip.is_ipv4() { 32 } else { 128 },
                    ifindex: lo,
                    ifname: LOOPBACK.into(),
                };
                // Recorded first: a VIP on lo that no record names would
                // stay for good.
                write_record(&record, ADDED).map_err(|source| Error::Record {
                    path: path.clone(),
                    source,
                })?;
                self.held.push((ip, record));
                addr::add(&a).map_err(|source| Error::Address { ip, source })?;
            } else {
                self.held.push((ip, record));
            }
        }
        Ok(())
    }

    /// [`prepare`] without records: this guard undoes what it did.
    fn prepare_alone(&mut self, vips: &[IpAddr], lo: u32) -> Result<(), Error> {
        if vips.iter().any(IpAddr::is_ipv4) {
            for (name, at_least) in ARP_SETTINGS {
                let path = arp_path(name);
                if let Some(before) = raise(&path, at_least)? {
                    self.raised.push(Raised {
                        path: path.into(),
                        before,
                    });
                }
            }
        }
        for &ip in vips {
            if addr::find(ip).is_ok() {
                continue;
            }
            let a = Assigned {
                ip,
                prefix_len: if ip.is_ipv4() { 32 } else { 128 },
                ifindex: lo,
                ifname: LOOPBACK.into(),
            };
            addr::add(&a).map_err(|source| Error::Address { ip, source })?;
            self.added.push(a);
        }
        Ok(())
    }

    /// Lets go of the VIPs as a killed agent does: nothing undone, the
    /// records left for the next agent (tests).
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.held.clear();
        self.arp = None;
        self.added.clear();
        self.raised.clear();
    }

    /// Undoes everything now (the last agent of the namespace; see the
    /// module doc); returns what could not be undone.
    pub fn undo(&mut self) -> Vec<String> {
        self.undo_with(false)
    }

    /// [`Vips::undo`]; `locked`: the caller holds the records' `.lock`.
    fn undo_with(&mut self, locked: bool) -> Vec<String> {
        let mut failed = Vec::new();
        let changing = match &self.records {
            _ if locked => None,
            Some(_) if self.held.is_empty() && self.arp.is_none() => None,
            Some(_) => match records_dir() {
                Ok((_, lock)) => Some(lock),
                Err(e) => {
                    failed.push(format!("cannot lock {STATE_DIR}: {e}"));
                    None
                }
            },
            None => None,
        };
        let last = |f: &File| crate::flock(f.as_fd(), crate::Flock::ExclusiveNow);
        // A record its last holder clears is removed too, under the lock
        // (an agent opens records only under it): `/run` keeps no file of
        // a VIP no agent serves.
        let can_remove = locked || changing.is_some();
        let remove = |name: &str| {
            if let (true, Some(dir)) = (can_remove, &self.records) {
                let _ = std::fs::remove_file(dir.join(name));
            }
        };
        for (ip, record) in self.held.drain(..).rev() {
            match last(&record) {
                Ok(true) => {}
                // Another agent serves it.
                Ok(false) => continue,
                Err(e) => {
                    failed.push(format!("cannot lock the record of {ip}: {e}"));
                    continue;
                }
            }
            if read_record(&record).is_ok_and(|t| t == ADDED) {
                match addr::find(ip) {
                    Ok(a) if a.ifname == LOOPBACK => {
                        if let Err(e) = addr::remove(&a) {
                            failed.push(format!("cannot remove {} from lo: {e}", a.cidr()));
                            continue;
                        }
                    }
                    _ => {}
                }
            }
            if let Err(e) = write_record(&record, "") {
                failed.push(format!("cannot clear the record of {ip}: {e}"));
            }
            remove(&ip.to_string());
        }
        if let Some(record) = self.arp.take() {
            match last(&record) {
                Ok(true) => {
                    let text = read_record(&record).unwrap_or_default();
                    for line in text.lines() {
                        let Some((name, before)) = line.split_once(' ') else {
                            continue;
                        };
                        if !ARP_SETTINGS.iter().any(|(n, _)| *n == name) {
                            continue;
                        }
                        let path = arp_path(name);
                        if let Err(e) = std::fs::write(&path, before) {
                            failed.push(format!("cannot restore {path}: {e}"));
                        }
                    }
                    if let Err(e) = write_record(&record, "") {
                        failed.push(format!("cannot clear the ARP record: {e}"));
                    }
                    remove("arp");
                }
                Ok(false) => {}
                Err(e) => failed.push(format!("cannot lock the ARP record: {e}")),
            }
        }
        drop(changing);
        for a in self.added.drain(..).rev() {
            if let Err(e) = addr::remove(&a) {
                failed.push(format!("cannot remove {} from lo: {e}", a.cidr()));
            }
        }
        for r in self.raised.drain(..).rev() {
            if let Err(e) = std::fs::write(&r.path, r.before.trim()) {
                failed.push(format!("cannot restore {}: {e}", r.path.display()));
            }
        }
        failed
    }
}

impl Drop for Vips {
    fn drop(&mut self) {
        for f in self.undo() {
            eprintln!("tcpr: {f}");
        }
    }
}
