//! The agent's journal: what became of each batch, on disk, so that an
//! agent restarted after a crash still answers QUERY truthfully.
//!
//! One file per batch, `batch-<id in hex>.log`, of text lines appended in
//! this order:
//!
//! ```text
//! prepared               before READY
//! commit 0,1,2 [take IP] COMMIT taken, before the address (IP, when the
//!                        sender moves one) or any socket is touched
//! resuming               the address is taken, the first resume is next;
//!                        fsync'd (file and directory), with all above
//! delivered 1            one line per connection, once the application
//!                        holds it
//! aborted                the COMMIT was refused (nothing was resumed, no
//!                        address kept); fsync'd
//! ```
//!
//! A restarted agent reads it as: no file, no record (the journal may be
//! lost): [`BatchStatus::Unknown`]; `prepared` alone, or `aborted`: nothing
//! was resumed, the restored sockets died silently with the old process
//! (repair mode): [`BatchStatus::NotResumed`]; `commit` without `resuming`:
//! nothing was resumed either, but the address may have been taken and
//! must be given back first ([`Recorded::give_back`]); `resuming`: the
//! delivered ones moved, any other may have been resumed and lost:
//! [`BatchStatus::Committed`]. A line is written whole or not at all as far
//! as a killed process is concerned (it sits in the page cache), so every
//! line counts after the agent's death. One fsync per batch, before the
//! first resume, keeps the one point that matters through a crash of the
//! host: every socket of the batch dies with the host, and a line lost
//! before `resuming` only turns an answer into `Unknown` (no roll back),
//! while `resuming` lost would let the sender roll back a connection the
//! agent had already resumed and spoken on. A torn last line (no newline)
//! is ignored.

use crate::machine::{BatchStatus, ConnId};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Batch files kept; the oldest go first.
const KEPT_BATCHES: usize = 4096;
/// Age after which a batch file goes: a sender asks within its timeout
/// (seconds), so an hour is plenty, and a busy agent's journal stays small.
const KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

/// The journal directory.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    /// Batch files in the order they were made (for pruning).
    files: Mutex<VecDeque<PathBuf>>,
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
    file: File,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal {
    /// Opens (creating it, mode 0700) the journal directory.
    pub(crate) fn open(dir: &Path) -> Result<Journal, String> {
        let what = |e: io::Error| format!("journal {}: {e}", dir.display());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(what)?;
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
            .map_err(what)?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("batch-") && n.ends_with(".log")
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        files.sort();
        // Proves now, not at the first batch, that records can be written.
        let probe = dir.join(".writable");
        File::create(&probe).map_err(what)?;
        let _ = std::fs::remove_file(&probe);
        Ok(Journal {
            dir: dir.to_path_buf(),
            files: Mutex::new(files.into_iter().map(|(_, p)| p).collect()),
        })
    }

    fn path(&self, batch: u64) -> PathBuf {
        self.dir.join(format!("batch-{batch:016x}.log"))
    }

    /// Starts the record of a batch: `prepared`, durable before READY.
    pub(crate) fn begin(&self, batch: u64) -> io::Result<BatchLog> {
        let path = self.path(batch);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        file.write_all(b"prepared\n")?;
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.push_back(path);
        let stale = |p: &PathBuf| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > KEPT_FOR))
        };
        while files.len() > KEPT_BATCHES || files.front().is_some_and(stale) {
            if let Some(old) = files.pop_front() {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(BatchLog { file })
    }

    /// What the journal says of a batch.
    pub(crate) fn status(&self, batch: u64) -> Recorded {
        match std::fs::read_to_string(self.path(batch)) {
            Ok(text) => parse(&text),
            Err(_) => Recorded {
                status: BatchStatus::Unknown,
                give_back: None,
            },
        }
    }

    /// Records that a batch read back as committed-but-not-resumed was
    /// given up (its address given back).
    pub(crate) fn mark_aborted(&self, batch: u64) -> io::Result<()> {
        let mut file = OpenOptions::new().append(true).open(self.path(batch))?;
        file.write_all(b"aborted\n")?;
        file.sync_data()
    }
}

/// Reads a batch file (see the module docs).
fn parse(text: &str) -> Recorded {
    let mut prepared = false;
    let mut committed = false;
    let mut resuming = false;
    let mut aborted = false;
    let mut taken = None;
    let mut delivered = Vec::new();
    // Only whole lines: a torn last line was never written as far as the
    // protocol is concerned.
    let whole = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    for line in whole.lines() {
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

impl BatchLog {
    /// `commit`, before anything is touched for it.
    pub(crate) fn commit(&mut self, ids: &[ConnId], take: Option<IpAddr>) -> io::Result<()> {
        let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        match take {
            Some(ip) => writeln!(self.file, "commit {} take {ip}", list.join(","))?,
            None => writeln!(self.file, "commit {}", list.join(","))?,
        }
        Ok(())
    }
    /// `resuming`, durable (with every line before it, and the file's
    /// name) before the first connection is resumed.
    pub(crate) fn resuming(&mut self, journal: &Journal) -> io::Result<()> {
        self.file.write_all(b"resuming\n")?;
        self.file.sync_data()?;
        sync_dir(&journal.dir)
    }
    /// `delivered ID`.
    pub(crate) fn delivered(&mut self, id: ConnId) -> io::Result<()> {
        writeln!(self.file, "delivered {id}")
    }
    /// `aborted`: the COMMIT was refused, nothing was resumed.
    pub(crate) fn aborted(&mut self) -> io::Result<()> {
        self.file.write_all(b"aborted\n")?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> (BatchStatus, Option<IpAddr>) {
        let r = parse(text);
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
        // A torn last line does not count.
        assert_eq!(
            read("prepared\ncommit 0,1\nresuming\ndelivered 1\ndeliv"),
            (BatchStatus::Committed(vec![1]), None)
        );
        assert_eq!(read("prepared\ncommi"), (BatchStatus::NotResumed, None));
    }

    #[test]
    fn a_batch_is_found_again_by_a_new_journal() {
        let dir = std::env::temp_dir().join(format!("tcpr-journal-{}", std::process::id()));
        let j = Journal::open(&dir).unwrap();
        let mut log = j.begin(42).unwrap();
        assert_eq!(j.status(42).status, BatchStatus::NotResumed);
        log.commit(&[0, 1], None).unwrap();
        log.resuming(&j).unwrap();
        log.delivered(0).unwrap();
        drop(log);
        let again = Journal::open(&dir).unwrap();
        assert_eq!(again.status(42).status, BatchStatus::Committed(vec![0]));
        assert_eq!(again.status(43).status, BatchStatus::Unknown);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
