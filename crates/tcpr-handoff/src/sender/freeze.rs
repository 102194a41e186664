//! Freezing the batch: duplicates of the caller's sockets are frozen so
//! that the handles handed in survive every path, a chunk at a time when
//! the open file limit allows no second handle per connection.

use std::os::fd::OwnedFd;
use tcpr_engine::{freeze_many_inspected, Flow, FreezeOptions, Frozen, IfFrozen};

/// Open files kept free beyond what a batch needs.
const FD_HEADROOM: u64 = 1024;

/// Connections frozen per lock transaction, at least, when the process
/// cannot hold a second handle for every connection of the batch: a chunk
/// is as large as the open files left allow (a batch of 10,000 under a
/// limit of 20,000 goes in two chunks rather than twenty).
const FREEZE_CHUNK: usize = 512;

/// One connection after the freeze.
pub(super) struct FreezeSlot {
    /// The handle handed in, when kept beside the frozen duplicate.
    pub(super) spare: Option<OwnedFd>,
    pub(super) frozen: Result<Frozen, tcpr_engine::Error>,
}

/// Freezes duplicates of `socks`, so that the handles handed in survive
/// every path: a failed freeze gives them back as they were, and one kept
/// beside each frozen copy stays frozen for a retry when the outcome is
/// unknown. That needs a second open file per connection; when the limit
/// (raised once if it can be) does not allow it, the batch is frozen in
/// chunks and the handle of each connection frozen is let go (the thawed
/// duplicate goes back instead; a connection left unknown then stays
/// frozen only in the handles held elsewhere). On error nothing is frozen
/// and every handle comes back, in order. `flows` are what
/// `inspect_socket` found for `socks`, one each.
pub(super) fn freeze_with_spares(
    socks: Vec<OwnedFd>,
    flows: &[Flow],
    fo: &FreezeOptions,
) -> Result<Vec<FreezeSlot>, (crate::Error, Vec<OwnedFd>)> {
    if flows.len() != socks.len() {
        let e = tcpr_engine::Error::Inconsistent(format!(
            "{} sockets to freeze but {} flows",
            socks.len(),
            flows.len()
        ));
        return Err((e.into(), socks));
    }
    let dups = match duplicate_all(&socks) {
        Ok(Duplicates::All(dups)) => dups,
        Ok(Duplicates::Room(room)) => {
            let chunk = room.saturating_sub(FD_HEADROOM as usize).max(FREEZE_CHUNK);
            return freeze_in_chunks(socks, flows, fo, chunk);
        }
        Err(e) => return Err((e, socks)),
    };
    match freeze_many_inspected(dups, flows.to_vec(), fo, IfFrozen::Refuse) {
        Ok(frozen) => Ok(socks
            .into_iter()
            .zip(frozen)
            .map(|(s, frozen)| FreezeSlot {
                spare: Some(s),
                frozen,
            })
            .collect()),
        // Checked before anything changed: the originals are untouched.
        Err(e) => Err((e.into(), socks)),
    }
}

/// What [`duplicate_all`] could do.
enum Duplicates {
    /// A duplicate of every socket.
    All(Vec<OwnedFd>),
    /// The open file limit does not allow it: this many more files could
    /// be opened (the duplicates made before it ran out, closed again).
    Room(usize),
}

/// Duplicates every socket, unless the open file limit does not allow it
/// (after raising it once, with room for as many again: whatever the
/// process does with the connections meanwhile, such as an agent in the
/// same process restoring them).
fn duplicate_all(socks: &[OwnedFd]) -> Result<Duplicates, crate::Error> {
    let mut dups = Vec::with_capacity(socks.len());
    let mut raised = false;
    while let Some(s) = socks.get(dups.len()) {
        match s.try_clone() {
            Ok(d) => dups.push(d),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) && !raised => {
                raised = true;
                // Every file the limit allows is open (nothing can be opened
                // to count them): the limit is what is open.
                let open = tcpr_host::raise_fd_limit(0).unwrap_or(0);
                let want = open + 2 * (socks.len() - dups.len()) as u64 + FD_HEADROOM;
                if let Err(e) = tcpr_host::raise_fd_limit(want) {
                    tracing::warn!("cannot raise the open file limit to {want}: {e}");
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                return Ok(Duplicates::Room(dups.len()))
            }
            Err(e) => {
                return Err(tcpr_engine::Error::kernel("duplicate the socket", e).into());
            }
        }
    }
    Ok(Duplicates::All(dups))
}

/// [`freeze_with_spares`] for a batch too large for two handles per
/// connection: a chunk at a time, each chunk's handles let go once frozen.
fn freeze_in_chunks(
    socks: Vec<OwnedFd>,
    flows: &[Flow],
    fo: &FreezeOptions,
    chunk_len: usize,
) -> Result<Vec<FreezeSlot>, (crate::Error, Vec<OwnedFd>)> {
    tracing::warn!(
        "the open file limit allows no second handle per connection: freezing in chunks of {chunk_len}"
    );
    let total = socks.len();
    let mut slots: Vec<FreezeSlot> = Vec::with_capacity(total);
    let mut rest = socks.into_iter();
    let mut chunk_flows = flows.chunks(chunk_len);
    loop {
        let chunk: Vec<OwnedFd> = rest.by_ref().take(chunk_len).collect();
        if chunk.is_empty() {
            return Ok(slots);
        }
        // As many flows as sockets (checked above).
        let these = chunk_flows.next().map(<[Flow]>::to_vec).unwrap_or_default();
        let failed: crate::Error = match chunk.iter().map(|s| s.try_clone()).collect() {
            Ok(dups) => match freeze_many_inspected(dups, these, fo, IfFrozen::Refuse) {
                Ok(frozen) => {
                    for (original, frozen) in chunk.into_iter().zip(frozen) {
                        let spare = match frozen {
                            Ok(_) => None,
                            Err(_) => Some(original),
                        };
                        slots.push(FreezeSlot { spare, frozen });
                    }
                    continue;
                }
                Err(e) => e.into(),
            },
            Err(e) => tcpr_engine::Error::kernel("duplicate the socket", e).into(),
        };
        // Undo the chunks frozen so far: every handle comes back, in order.
        let mut back = Vec::with_capacity(total);
        for slot in slots {
            match (slot.spare, slot.frozen) {
                (Some(s), _) => back.push(s),
                // Every handle back in its place, even one left frozen: a
                // handle missing shifted the rest onto the wrong
                // connections (the caller pairs them by position).
                (None, Ok(f)) => match f.thaw_or_give_back() {
                    Ok(fd) => back.push(fd),
                    Err((e, fd)) => {
                        tracing::error!("thaw failed while giving the batch up (left frozen): {e}");
                        back.push(fd);
                    }
                },
                (None, Err(_)) => {}
            }
        }
        back.extend(chunk);
        back.extend(rest);
        return Err((failed, back));
    }
}

/// Test support: with `TCPR_FAULT_UNFROZEN=I` in the environment, the
/// batch's `I`-th connection (from 0) fails its freeze, as one socket
/// refusing `TCP_REPAIR` after the batch's checks passed would: thawed at
/// once and given back as not frozen. Nothing else reaches that path from
/// outside the process (the integration tests set it on `tcpr migrate`).
pub(super) fn fault_unfrozen(slots: &mut [FreezeSlot]) {
    static AT: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        std::env::var("TCPR_FAULT_UNFROZEN")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let Some(slot) = at.and_then(|i| slots.get_mut(i)) else {
        return;
    };
    let refused = tcpr_engine::Error::kernel(
        "turn on repair mode (fault injected: TCPR_FAULT_UNFROZEN)",
        std::io::Error::from_raw_os_error(libc::EPERM),
    );
    if let Ok(f) = std::mem::replace(&mut slot.frozen, Err(refused)) {
        tracing::warn!("fault injection: connection {} not frozen", at.unwrap_or(0));
        match f.thaw() {
            Ok(fd) => {
                slot.spare.get_or_insert(fd);
            }
            Err(e) => tracing::error!("fault injection: thaw failed: {e}"),
        }
    }
}
