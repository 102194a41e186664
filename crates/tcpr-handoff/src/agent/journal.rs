//! The agent's journal: what became of each batch, on disk, so that an
//! agent restarted after a crash still answers QUERY truthfully.
//!
//! Each agent process writes one segment file,
//! `journal-<start>-<pid>-boot-<boot id>.log` (the kernel's
//! `/proc/sys/kernel/random/boot_id`, dashes left out), of text lines, each
//! naming its batch (16 hex digits). A batch's lines come in this order:
//!
//! ```text
//! <batch> prepared               before READY
//! <batch> commit 0,1,2 [take IP] COMMIT taken, before the address (IP, when
//!                                the sender moves one) or any socket is
//!                                touched
//! <batch> resuming               the address is taken, the first resume is
//!                                next
//! <batch> delivered 1            one line per connection, once the
//!                                application holds it
//! <batch> aborted                the COMMIT was refused (nothing was
//!                                resumed, no address kept); fdatasync'd
//! ```
//!
//! A restarted agent reads every segment and takes a batch's lines from
//! all of them: no line, no record (the journal may be lost):
//! [`BatchStatus::Unknown`]; `prepared` alone, or `aborted`: nothing was
//! resumed, the restored sockets died silently with the old process
//! (repair mode): [`BatchStatus::NotResumed`]; `commit` without `resuming`:
//! nothing was resumed either, but the address may have been taken and
//! must be given back first ([`Recorded::give_back`]); `resuming`: the
//! delivered ones moved, any other may have been resumed and lost:
//! [`BatchStatus::Committed`]. A line is written whole or not at all as far
//! as a killed process is concerned (it sits in the page cache), so every
//! line counts after the agent's death.
//!
//! What a crash of the host can lose, and why `resuming` is not flushed.
//! Only a crash of the host (or of its storage) loses lines: a killed agent
//! leaves them in the page cache. The one line whose loss would make an
//! answer untrue is `resuming`: without it a batch reads as not resumed,
//! and the sender would roll back (thaw and speak on) connections the
//! agent had already resumed and spoken on. Before, that line was
//! fdatasync'd before the first resume, one flush per batch: 0.4 to 0.7 ms
//! on the project's 2-core VM (ext4 on virtio), half the commit phase of a
//! one-connection handoff, paid by every batch against a crash that
//! almost never leaves anyone to ask (a sender asks for one timeout,
//! seconds, and a host reboots in far more). Instead, each segment names
//! the boot it was written in, and a batch recorded in a segment of an
//! earlier boot answers only what its lines prove: `resuming` (the line
//! is there: [`BatchStatus::Committed`]) or `aborted` (fdatasync'd, and
//! never followed by a resume: [`BatchStatus::NotResumed`]); anything else
//! is [`BatchStatus::Unknown`], never "not resumed", and no address is
//! given back for it (none survives a reboot that was taken by netlink).
//! So a host crash can cost a sender its roll back (it holds the
//! connections frozen, as when the agent cannot be asked at all), never a
//! connection resumed twice. `delivered` lines were never flushed: after a
//! host crash, a delivered connection may read as resumed and not
//! delivered (the sender reports it unknown, as before). Where the boot
//! id cannot be read, the segment's name carries none, and `resuming` is
//! fdatasync'd as before; such segments (and those of older versions)
//! are read as durable.
//!
//! Flushes (of `aborted`, and of `resuming` without a boot id) are kept
//! cheap: a segment is written ahead as zeros and made durable (file and
//! directory) before any batch uses that space, so the lines of a batch
//! overwrite blocks that exist on disk, in a file whose size and name are
//! durable already. `fdatasync` then writes the data blocks alone, with no
//! file system journal commit for the size or the name (ext4 measured on a
//! 2-core VM: 4 ms, against 8 ms for an append and 4 ms more for the
//! directory). Space that was never written reads as NUL bytes: a line
//! holding a NUL, and bytes after the last newline (a torn line), are
//! ignored.

use crate::machine::{BatchStatus, ConnId};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes written ahead as zeros and made durable at a time.
const WRITE_AHEAD: u64 = 1 << 20;
/// Durable space a batch finds ahead of it when it begins: its `prepared`,
/// `commit` and `resuming` lines fit with room for the batches beside it.
/// (Its `delivered` lines need no flush and may go past it.)
const RESERVE_PER_BATCH: u64 = 64 << 10;
/// A segment past this size is closed and a new one started.
const SEGMENT_BYTES: u64 = 16 << 20;
/// Segments kept; the oldest go first.
const KEPT_SEGMENTS: usize = 8;
/// Age after which a closed segment goes: a sender asks within its
/// timeout (seconds), so an hour is plenty.
const KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

const SEGMENT_PREFIX: &str = "journal-";
const SEGMENT_SUFFIX: &str = ".log";
/// Between the pid and the boot id in a segment's name.
const BOOT_MARK: &str = "-boot-";
/// Where the kernel tells the boot this is (random(4)).
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The boot id of this boot as segment names carry it (hex digits only),
/// or `None` when it cannot be read.
fn this_boot() -> Option<&'static str> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        let text = std::fs::read_to_string(BOOT_ID_PATH).ok()?;
        let id: String = text.trim().chars().filter(|c| *c != '-').collect();
        (!id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit())).then_some(id)
    })
    .as_deref()
}

/// Whether the lines of the segment at `path` may have been lost in a
/// crash of the host since they were written: it was written in an
/// earlier boot, without flushing `resuming`. A segment whose name carries
/// no boot id flushed it (see the module docs).
fn from_earlier_boot(path: &Path, boot: Option<&str>) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let Some(written_in) = name
        .strip_suffix(SEGMENT_SUFFIX)
        .and_then(|n| n.rsplit_once(BOOT_MARK))
        .map(|(_, id)| id)
    else {
        return false;
    };
    boot != Some(written_in)
}

/// The journal directory.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    segment: Arc<Mutex<Segment>>,
}

/// The segment this process writes.
#[derive(Debug)]
struct Segment {
    dir: PathBuf,
    file: Arc<File>,
    /// Where the next line goes.
    next: u64,
    /// Zeros are durable on disk up to here.
    durable_end: u64,
    /// Segments of this directory, oldest first (for pruning).
    closed: VecDeque<PathBuf>,
    /// The name carries this boot's id, and `resuming` is not flushed;
    /// `false` where the boot id cannot be read.
    names_boot: bool,
}

/// What the journal says of a batch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Recorded {
    /// The answer to a Query.
    pub(crate) status: BatchStatus,
    /// An address the batch may have taken while nothing was resumed: it
    /// must leave this host before the sender may roll back (and take it
    /// back), or the answer is [`BatchStatus::Unknown`].
    pub(crate) give_back: Option<IpAddr>,
}

/// The open record of one batch.
#[derive(Debug)]
pub(crate) struct BatchLog {
    batch: u64,
    segment: Arc<Mutex<Segment>>,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn is_segment(name: &str) -> bool {
    name.starts_with(SEGMENT_PREFIX) && name.ends_with(SEGMENT_SUFFIX)
}

fn lock(segment: &Mutex<Segment>) -> std::sync::MutexGuard<'_, Segment> {
    segment.lock().unwrap_or_else(|e| e.into_inner())
}

impl Segment {
    /// Starts a new segment: created, written ahead and durable, name
    /// included, before any record goes in.
    fn create(dir: &Path, closed: VecDeque<PathBuf>) -> io::Result<Segment> {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let boot = this_boot();
        let boot_part = boot
            .map(|id| format!("{BOOT_MARK}{id}"))
            .unwrap_or_default();
        let path = dir.join(format!(
            "{SEGMENT_PREFIX}{started:032x}-{}{boot_part}{SEGMENT_SUFFIX}",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .read(true)
            .open(&path)?;
        let mut segment = Segment {
            dir: dir.to_path_buf(),
            file: Arc::new(file),
            next: 0,
            durable_end: 0,
            closed,
            names_boot: boot.is_some(),
        };
        segment.write_ahead()?;
        sync_dir(dir)?;
        segment.closed.push_back(path);
        segment.prune();
        Ok(segment)
    }

    /// Removes the oldest segments beyond [`KEPT_SEGMENTS`], and those
    /// older than [`KEPT_FOR`]; the newest (this process's) always stays,
    /// and so does the newest segment of every other live process of this
    /// boot: agents may share a directory (the default), and another
    /// agent's current segment holds the batches it may still be asked
    /// about.
    fn prune(&mut self) {
        let stale = |p: &PathBuf| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > KEPT_FOR))
        };
        let others = current_segments_of_others(&self.closed);
        let mut kept = Vec::new();
        while self.closed.len() > 1 {
            let over = self.closed.len() + kept.len() > KEPT_SEGMENTS;
            if !over && !self.closed.front().is_some_and(stale) {
                break;
            }
            let Some(old) = self.closed.pop_front() else {
                break;
            };
            if others.contains(&old) {
                kept.push(old);
            } else {
                let _ = std::fs::remove_file(old);
            }
        }
        for p in kept.into_iter().rev() {
            self.closed.push_front(p);
        }
    }

    /// Writes the next [`WRITE_AHEAD`] bytes as zeros and makes them
    /// durable (size and blocks).
    fn write_ahead(&mut self) -> io::Result<()> {
        let from = self.durable_end.max(self.next);
        let zeros = vec![0u8; WRITE_AHEAD as usize];
        self.file.write_all_at(&zeros, from)?;
        self.file.sync_all()?;
        self.durable_end = from + WRITE_AHEAD;
        Ok(())
    }

    /// Makes sure a batch beginning now finds durable space ahead; past a
    /// segment's size, moves to a new segment and prunes old ones.
    fn reserve(&mut self) -> io::Result<()> {
        if self.next + RESERVE_PER_BATCH <= self.durable_end {
            return Ok(());
        }
        if self.durable_end < SEGMENT_BYTES {
            return self.write_ahead();
        }
        let closed = std::mem::take(&mut self.closed);
        *self = Segment::create(&self.dir, closed)?;
        Ok(())
    }

    /// Writes one line of `batch`; the file it went to, for a flush.
    fn line(&mut self, batch: u64, text: &str) -> io::Result<Arc<File>> {
        self.lines(batch, &[text])
    }

    /// Writes lines of `batch`, in one write.
    fn lines(&mut self, batch: u64, texts: &[impl AsRef<str>]) -> io::Result<Arc<File>> {
        let mut lines = String::new();
        for text in texts {
            lines.push_str(&format!("{batch:016x} {}\n", text.as_ref()));
        }
        self.file.write_all_at(lines.as_bytes(), self.next)?;
        self.next += lines.len() as u64;
        Ok(self.file.clone())
    }
}

impl Journal {
    /// Opens (creating it, mode 0700) the journal directory, and starts
    /// this process's segment.
    pub(crate) fn open(dir: &Path) -> Result<Journal, String> {
        let what = |e: io::Error| format!("journal {}: {e}", dir.display());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(what)?;
        let mut segments: Vec<PathBuf> = segments(dir).map_err(what)?;
        // Names start with their creation time: sorted, oldest first.
        segments.sort();
        // Proves now, not at the first batch, that records can be written.
        let segment = Segment::create(dir, segments.into()).map_err(what)?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            segment: Arc::new(Mutex::new(segment)),
        })
    }

    /// Starts the record of a batch: `prepared`, before READY.
    pub(crate) fn begin(&self, batch: u64) -> io::Result<BatchLog> {
        let mut segment = lock(&self.segment);
        segment.reserve()?;
        segment.line(batch, "prepared")?;
        Ok(BatchLog {
            batch,
            segment: self.segment.clone(),
        })
    }

    /// What the journal says of a batch.
    pub(crate) fn status(&self, batch: u64) -> Recorded {
        status_in(&self.dir, batch)
    }
}

/// What the journal in `dir` says of a batch, read without opening the
/// journal (which starts a segment): for a reader that may never write.
pub(crate) fn status_in(dir: &Path, batch: u64) -> Recorded {
    let mut lines = Vec::new();
    let mut earlier_boot = false;
    for path in segments(dir).unwrap_or_default() {
        let mut bytes = Vec::new();
        if File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .is_ok()
        {
            let of_batch = lines_of(&bytes, batch);
            earlier_boot |= !of_batch.is_empty() && from_earlier_boot(&path, this_boot());
            lines.extend(of_batch);
        }
    }
    let recorded = parse(&lines);
    if earlier_boot {
        only_what_survives_a_crash(recorded, &lines)
    } else {
        recorded
    }
}

impl Journal {
    /// Records that a batch read back as committed-but-not-resumed was
    /// given up (its address given back).
    pub(crate) fn mark_aborted(&self, batch: u64) -> io::Result<()> {
        let mut segment = lock(&self.segment);
        segment.reserve()?;
        segment.line(batch, "aborted")?.sync_data()
    }
}

/// The writer's pid and boot id of a segment, from its name
/// (`journal-<start>-<pid>[-boot-<id>].log`).
fn writer_of(path: &Path) -> Option<(u32, Option<String>)> {
    let name = path.file_name()?.to_str()?;
    let stem = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    let (head, boot) = match stem.rsplit_once(BOOT_MARK) {
        Some((head, id)) => (head, Some(id.to_string())),
        None => (stem, None),
    };
    let pid = head.rsplit_once('-')?.1.parse().ok()?;
    Some((pid, boot))
}

/// Among `segments`, the newest of each live process of this boot other
/// than this one (names sort by their start time).
fn current_segments_of_others(segments: &VecDeque<PathBuf>) -> std::collections::HashSet<PathBuf> {
    let me = std::process::id();
    let mut newest: std::collections::HashMap<u32, &PathBuf> = std::collections::HashMap::new();
    for path in segments {
        let Some((pid, boot)) = writer_of(path) else {
            continue;
        };
        let this_boot_ok = boot.is_none() || boot.as_deref() == this_boot();
        if pid == me || !this_boot_ok || !Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let e = newest.entry(pid).or_insert(path);
        if path.file_name() > e.file_name() {
            *e = path;
        }
    }
    newest.into_values().cloned().collect()
}

/// The segment files of `dir`.
fn segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| is_segment(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect())
}

/// The whole lines of `batch` in a segment, without the batch: a line
/// with a NUL (space never written, or half written) and the bytes after
/// the last newline (a torn line) were never written as far as the
/// protocol is concerned.
fn lines_of(bytes: &[u8], batch: u64) -> Vec<String> {
    let whole = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) => &bytes[..end],
        None => &[][..],
    };
    let key = format!("{batch:016x} ");
    whole
        .split(|&b| b == b'\n')
        .filter(|l| !l.contains(&0))
        .filter_map(|l| std::str::from_utf8(l).ok())
        .filter_map(|l| l.strip_prefix(&key))
        .map(str::to_string)
        .collect()
}

/// Reads the lines of one batch (see the module docs).
fn parse(lines: &[String]) -> Recorded {
    let mut prepared = false;
    let mut committed = false;
    let mut resuming = false;
    let mut aborted = false;
    let mut taken = None;
    let mut delivered = Vec::new();
    for line in lines {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "prepared" => prepared = true,
            "commit" => {
                committed = true;
                taken = rest
                    .split_once(" take ")
                    .and_then(|(_, ip)| ip.parse::<IpAddr>().ok());
            }
            "resuming" => resuming = true,
            "aborted" => aborted = true,
            "delivered" => {
                if let Ok(id) = rest.parse::<ConnId>() {
                    delivered.push(id);
                }
            }
            _ => {}
        }
    }
    let (status, give_back) = if aborted && !resuming {
        (BatchStatus::NotResumed, None)
    } else if resuming {
        (BatchStatus::Committed(delivered), None)
    } else if committed {
        (BatchStatus::NotResumed, taken)
    } else if prepared {
        (BatchStatus::NotResumed, None)
    } else {
        (BatchStatus::Unknown, None)
    };
    Recorded { status, give_back }
}

/// The answer for a batch whose lines were written in an earlier boot,
/// unflushed: `resuming` may have been lost with the host, so only an
/// answer its lines prove stands (see the module docs).
fn only_what_survives_a_crash(recorded: Recorded, lines: &[String]) -> Recorded {
    let proven = matches!(recorded.status, BatchStatus::Committed(_))
        || lines.iter().any(|l| l == "aborted");
    if proven {
        Recorded {
            give_back: None,
            ..recorded
        }
    } else {
        Recorded {
            status: BatchStatus::Unknown,
            give_back: None,
        }
    }
}

impl BatchLog {
    fn line(&mut self, text: &str) -> io::Result<Arc<File>> {
        lock(&self.segment).line(self.batch, text)
    }

    /// `commit`, before anything is touched for it.
    pub(crate) fn commit(&mut self, ids: &[ConnId], take: Option<IpAddr>) -> io::Result<()> {
        let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        let text = match take {
            Some(ip) => format!("commit {} take {ip}", list.join(",")),
            None => format!("commit {}", list.join(",")),
        };
        self.line(&text).map(drop)
    }
    /// `resuming`, before the first connection is resumed. Flushed only
    /// in a segment that names no boot (see the module docs); the
    /// segment's name and size are durable already: the data blocks are
    /// all that is flushed.
    pub(crate) fn resuming(&mut self, _journal: &Journal) -> io::Result<()> {
        let (file, flush) = {
            let mut segment = lock(&self.segment);
            let file = segment.line(self.batch, "resuming")?;
            (file, !segment.names_boot)
        };
        // The flush runs outside the segment's lock: other batches keep
        // writing meanwhile.
        if flush {
            file.sync_data()?;
        }
        Ok(())
    }
    /// `delivered ID`, one line per connection, in one write.
    pub(crate) fn delivered(&mut self, ids: &[ConnId]) -> io::Result<()> {
        let texts: Vec<String> = ids.iter().map(|id| format!("delivered {id}")).collect();
        lock(&self.segment).lines(self.batch, &texts).map(drop)
    }
    /// `aborted`: the COMMIT was refused, nothing was resumed.
    pub(crate) fn aborted(&mut self) -> io::Result<()> {
        self.line("aborted")?.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> (BatchStatus, Option<IpAddr>) {
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let r = parse(&lines);
        (r.status, r.give_back)
    }

    #[test]
    fn records_read_back_as_the_protocol_needs() {
        let ip: IpAddr = "10.0.0.100".parse().unwrap();
        assert_eq!(read(""), (BatchStatus::Unknown, None));
        assert_eq!(read("prepared\n"), (BatchStatus::NotResumed, None));
        // Committed, nothing resumed yet: the address goes back first.
        assert_eq!(
            read("prepared\ncommit 0,1 take 10.0.0.100\n"),
            (BatchStatus::NotResumed, Some(ip))
        );
        assert_eq!(
            read("prepared\ncommit 0,1 take 10.0.0.100\naborted\n"),
            (BatchStatus::NotResumed, None)
        );
        assert_eq!(
            read("prepared\ncommit 0,1\nresuming\n"),
            (BatchStatus::Committed(vec![]), None)
        );
        assert_eq!(
            read("prepared\ncommit 0,1 take 10.0.0.100\nresuming\ndelivered 1\n"),
            (BatchStatus::Committed(vec![1]), None)
        );
    }

    #[test]
    fn only_whole_lines_of_the_batch_count() {
        let seg = [
            &b"000000000000002a prepared\n000000000000002b prepared\n"[..],
            b"000000000000002a commit 0,1\n000000000000002a resu",
            &[0; 3],
            b"\n",
            &[0; 3],
            b"000000000000002a resuming",
        ]
        .concat();
        let seg = &seg[..];
        // The other batch's lines, the half-written line (NULs of space
        // never written) and the torn last line (no newline) do not count.
        assert_eq!(lines_of(seg, 42), vec!["prepared", "commit 0,1"]);
        assert_eq!(lines_of(seg, 43), vec!["prepared"]);
        assert_eq!(lines_of(&[0u8; 64], 42), Vec::<String>::new());
    }

    #[test]
    fn a_batch_is_found_again_by_a_new_journal() {
        let dir = std::env::temp_dir().join(format!("tcpr-journal-{}", std::process::id()));
        let j = Journal::open(&dir).unwrap();
        let mut log = j.begin(42).unwrap();
        let mut other = j.begin(7).unwrap();
        assert_eq!(j.status(42).status, BatchStatus::NotResumed);
        log.commit(&[0, 1], None).unwrap();
        other
            .commit(&[0], Some("10.0.0.9".parse().unwrap()))
            .unwrap();
        log.resuming(&j).unwrap();
        log.delivered(&[0, 1]).unwrap();
        drop(log);
        drop(other);
        let again = Journal::open(&dir).unwrap();
        assert_eq!(again.status(42).status, BatchStatus::Committed(vec![0, 1]));
        assert_eq!(again.status(43).status, BatchStatus::Unknown);
        // The restarted agent gives 7's address back and records it in
        // its own segment; both segments are read.
        assert_eq!(again.status(7).give_back, Some("10.0.0.9".parse().unwrap()));
        again.mark_aborted(7).unwrap();
        assert_eq!(
            again.status(7),
            Recorded {
                status: BatchStatus::NotResumed,
                give_back: None
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A segment of an earlier boot holds unflushed lines: a `resuming`
    /// may have been lost with the host, so its batches answer only what
    /// their lines prove, never "not resumed" from `prepared` or `commit`
    /// alone; segments that name no boot were flushed and read as before.
    #[test]
    fn a_segment_of_an_earlier_boot_never_answers_not_resumed_unproven() {
        let dir = std::env::temp_dir().join(format!("tcpr-journal-boot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let this = this_boot().expect("this kernel tells its boot id");
        let other = if this.starts_with('0') { "1" } else { "0" }.repeat(32);
        let earlier = format!(
            "{SEGMENT_PREFIX}{:032x}-7{BOOT_MARK}{other}{SEGMENT_SUFFIX}",
            1
        );
        let unnamed = format!("{SEGMENT_PREFIX}{:032x}-8{SEGMENT_SUFFIX}", 2);
        let same = format!(
            "{SEGMENT_PREFIX}{:032x}-9{BOOT_MARK}{this}{SEGMENT_SUFFIX}",
            3
        );
        let line = |batch: u64, text: &str| format!("{batch:016x} {text}\n");
        std::fs::write(
            dir.join(&earlier),
            [
                line(1, "prepared"),
                line(2, "prepared"),
                line(2, "commit 0 take 10.0.0.9"),
                line(3, "prepared"),
                line(3, "commit 0,1"),
                line(3, "resuming"),
                line(3, "delivered 1"),
                line(4, "prepared"),
                line(4, "commit 0"),
                line(4, "aborted"),
            ]
            .concat(),
        )
        .unwrap();
        std::fs::write(
            dir.join(&unnamed),
            [
                line(5, "prepared"),
                line(6, "prepared"),
                line(6, "commit 0 take 10.0.0.9"),
            ]
            .concat(),
        )
        .unwrap();
        std::fs::write(dir.join(&same), line(7, "prepared")).unwrap();
        let j = Journal::open(&dir).unwrap();
        let unknown = Recorded {
            status: BatchStatus::Unknown,
            give_back: None,
        };
        assert_eq!(j.status(1), unknown);
        assert_eq!(j.status(2), unknown);
        assert_eq!(j.status(3).status, BatchStatus::Committed(vec![1]));
        assert_eq!(j.status(4).status, BatchStatus::NotResumed);
        // Flushed at `resuming` (no boot in the name): as before.
        assert_eq!(j.status(5).status, BatchStatus::NotResumed);
        assert_eq!(j.status(6).give_back, Some("10.0.0.9".parse().unwrap()));
        // This boot's lines survive any crash of the agent alone.
        assert_eq!(j.status(7).status, BatchStatus::NotResumed);
        // The journal's own segment names this boot.
        let names: Vec<String> = segments(&dir)
            .unwrap()
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            names.iter().filter(|n| n.contains(this)).count(),
            2,
            "{names:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn segments_are_written_ahead_and_rotated() {
        let dir = std::env::temp_dir().join(format!("tcpr-journal-rot-{}", std::process::id()));
        let j = Journal::open(&dir).unwrap();
        {
            let s = lock(&j.segment);
            assert_eq!(s.durable_end, WRITE_AHEAD);
            assert_eq!(s.file.metadata().unwrap().len(), WRITE_AHEAD);
        }
        // Fill the segment past its size: a new one starts, and the
        // batches of both are still found.
        let first = j.begin(1).unwrap();
        drop(first);
        lock(&j.segment).next = SEGMENT_BYTES;
        lock(&j.segment).durable_end = SEGMENT_BYTES;
        let second = j.begin(2).unwrap();
        drop(second);
        assert_eq!(segments(&dir).unwrap().len(), 2);
        assert_eq!(j.status(1).status, BatchStatus::NotResumed);
        assert_eq!(j.status(2).status, BatchStatus::NotResumed);
        // Agents restarted again and again keep a bounded journal.
        for _ in 0..KEPT_SEGMENTS + 2 {
            Journal::open(&dir).unwrap();
        }
        assert_eq!(segments(&dir).unwrap().len(), KEPT_SEGMENTS);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Agents sharing a directory: another live agent's current segment
    /// outlives any number of restarts of this one; a dead one's goes.
    #[test]
    fn another_live_agents_current_segment_is_never_pruned() {
        let dir = std::env::temp_dir().join(format!("tcpr-journal-live-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let boot = this_boot()
            .map(|b| format!("{BOOT_MARK}{b}"))
            .unwrap_or_default();
        let name = |start: u32, pid: u32| {
            dir.join(format!(
                "{SEGMENT_PREFIX}{start:032x}-{pid}{boot}{SEGMENT_SUFFIX}"
            ))
        };
        // The oldest segments: two of the live process (its current one
        // the newer), one of a process that is gone (pid 0 never is).
        let (old_live, current_live, dead) = (name(1, other.id()), name(2, other.id()), name(3, 0));
        for p in [&old_live, &current_live, &dead] {
            std::fs::write(p, b"").unwrap();
        }
        assert_eq!(
            writer_of(&current_live),
            Some((other.id(), this_boot().map(String::from)))
        );
        for _ in 0..KEPT_SEGMENTS + 2 {
            Journal::open(&dir).unwrap();
        }
        assert!(
            current_live.exists(),
            "the live agent's current segment stays"
        );
        assert!(!old_live.exists() && !dead.exists());
        assert_eq!(segments(&dir).unwrap().len(), KEPT_SEGMENTS);
        let _ = other.kill();
        let _ = other.wait();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
