//! `tcpr dump` and `tcpr thaw`: the output path checked and opened before
//! the socket is touched, the blob read within bounds, the image written
//! atomically.

use crate::{bounds, Leave};
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tcpr_engine::{freeze_with, take_fd, FreezeOptions, IfFrozen};

/// Where a dump writes its image, checked and opened before the socket is
/// touched.
pub(crate) enum Output {
    /// Standard output (`-o -`).
    Stdout,
    /// A new or regular file: the image goes to `tmp` (created here, so the
    /// directory is known to be writable), renamed over `path` at the end.
    File {
        path: PathBuf,
        tmp: TempFile,
        file: std::fs::File,
    },
}

/// A temporary file removed when dropped: an image never renamed into
/// place (a failed dump) leaves nothing behind.
pub(crate) struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Output {
    /// Accepts `-` (standard output, unless it is a terminal), a path that
    /// does not exist in an existing directory, or a regular file; refuses
    /// anything else (devices, FIFOs, sockets, directories, symlinks) with
    /// nothing changed.
    pub(crate) fn open(path: &Path) -> Result<Output> {
        use std::os::unix::fs::OpenOptionsExt;
        if path.as_os_str() == "-" {
            if std::io::stdout().is_terminal() {
                bail!("refusing to write a binary image to a terminal: redirect standard output, or give -o FILE");
            }
            return Ok(Output::Stdout);
        }
        check_target(path)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Output::File {
            path: path.to_path_buf(),
            tmp: TempFile(tmp),
            file,
        })
    }

    /// Writes the image: all of it to standard output, or to the file,
    /// synced, then renamed over the path (atomically, mode 0600).
    pub(crate) fn write(self, bytes: &[u8]) -> Result<()> {
        match self {
            Output::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)
                    .and_then(|()| out.flush())
                    .context("cannot write the image to standard output")
            }
            Output::File {
                path,
                tmp,
                mut file,
            } => {
                let res = file
                    .write_all(bytes)
                    .and_then(|()| file.sync_all())
                    .map_err(anyhow::Error::from)
                    // The path may have changed since it was checked.
                    .and_then(|()| check_target(&path))
                    .and_then(|()| Ok(std::fs::rename(&tmp.0, &path)?));
                res.with_context(|| format!("cannot write {}", path.display()))
            }
        }
    }
}

/// A dump writes only to a new file or over a regular one: replacing a
/// device, FIFO or symlink would destroy what is there.
fn check_target(path: &Path) -> Result<()> {
    let kind = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot check {}", path.display())),
    };
    use std::os::unix::fs::FileTypeExt;
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    bail!(
        "{} is {what}: an image is written only to a new or regular file (-o - writes to standard output)",
        path.display()
    )
}

/// What `tcpr dump` was asked.
pub(crate) struct DumpArgs<'a> {
    pub(crate) pid: i32,
    pub(crate) fd: i32,
    pub(crate) output: &'a Path,
    pub(crate) leave: Leave,
    pub(crate) lease: Duration,
    pub(crate) blob: Option<&'a Path>,
    pub(crate) if_frozen: IfFrozen,
}

pub(crate) fn dump(args: &DumpArgs<'_>) -> Result<i32> {
    let DumpArgs {
        pid,
        fd,
        output,
        leave,
        lease,
        blob,
        if_frozen,
    } = *args;
    let blob = match blob {
        Some(p) => read_blob(p)?,
        None => vec![],
    };
    // Before the socket is touched: a bad output path changes nothing.
    let out = Output::open(output)?;
    let sock = take_fd(pid, fd)?;
    let frozen = freeze_with(sock, &FreezeOptions { lock: true, lease }, if_frozen)
        .map_err(|e| match e {
            tcpr_engine::Error::AlreadyFrozen { .. } => anyhow::anyhow!(
                "{e}; if it was not restored elsewhere, `tcpr thaw --pid {pid} --fd {fd}` lets it carry on, and --frozen-ok dumps it anyway"
            ),
            e => anyhow::Error::from(e),
        })
        .with_context(|| format!("cannot freeze fd {fd} of process {pid}"))?;
    // From here on, any failure thaws the socket (Frozen's Drop) and
    // releases the lock: nothing is left changed. (A socket that was frozen
    // already stays frozen.)
    let mut img = frozen.dump()?;
    img.app_blob = blob;
    out.write(&img.encode()?)?;
    let flow = frozen.flow();
    let to = if output.as_os_str() == "-" {
        "standard output".to_string()
    } else {
        output.display().to_string()
    };
    match leave {
        Leave::Running => {
            frozen.thaw()?;
            eprintln!("dumped {flow} to {to} (left running)");
        }
        Leave::Frozen => {
            frozen.leave_frozen();
            eprintln!(
                "dumped {flow} to {to} (left frozen; source lock expires in {} s)",
                lease.as_secs()
            );
        }
    }
    Ok(0)
}

/// Reads an application blob of at most [`bounds::MAX_BLOB_BYTES`]: the
/// image that carries it must stay under the format's body limit.
fn read_blob(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let max = bounds::MAX_BLOB_BYTES;
    let too_big = || {
        anyhow::anyhow!(
            "the blob {} is over {} MiB, the most an image carries",
            path.display(),
            max >> 20
        )
    };
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read the blob {}", path.display()))?;
    if file.metadata().map(|m| m.len()).unwrap_or(0) > max {
        return Err(too_big());
    }
    let mut blob = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut blob)
        .with_context(|| format!("cannot read the blob {}", path.display()))?;
    if blob.len() as u64 > max {
        return Err(too_big());
    }
    Ok(blob)
}

pub(crate) fn thaw(pid: i32, fd: i32) -> Result<i32> {
    let sock = take_fd(pid, fd)?;
    let flow = tcpr_engine::thaw_frozen(sock)
        .with_context(|| format!("cannot thaw fd {fd} of process {pid}"))?;
    eprintln!("thawed {flow}: its lock is released and it carries on in process {pid}");
    Ok(0)
}
