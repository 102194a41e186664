//! `tcpr restore`: the image restored and handed to a program, and the
//! connection set aside again when the program cannot start.

use crate::dump::Output;
use crate::inspect::read_image;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tcpr_engine::{freeze_with, restore, FreezeOptions, IfFrozen};
use tcpr_image::ConnectionImage;

pub(crate) fn restore_and_run(
    file: &Path,
    inetd: bool,
    unsent_timeout: Duration,
    cmd: &[String],
) -> Result<i32> {
    let img = read_image(file)?;
    // Everything that can fail is checked before the connection comes to
    // life: once resumed, closing it would end it with a FIN or RST.
    find_program(&cmd[0])?;
    let mut restored = restore(&img)?;
    restored.set_unsent_timeout(unsent_timeout);
    let stream = restored.resume()?;
    let sock: std::os::fd::OwnedFd = stream.into();
    let mut c = tcpr_handoff::deliver::command_for(cmd);
    let spawned =
        tcpr_handoff::deliver::spawn(&mut c, &sock, &img.app_blob, img.local, img.peer, inetd);
    drop(c);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return Err(set_aside(sock, &img, file, e)),
    };
    let status = child
        .wait()
        .with_context(|| format!("waiting for {}", cmd[0]))?;
    drop(sock);
    Ok(status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    }))
}

/// The path `program` runs from (`$PATH` searched as `execvp` does), or a
/// clear error naming it.
fn find_program(program: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        if runnable(&p) {
            return Ok(p);
        }
        bail!("cannot run {program}: no such executable file; nothing was restored");
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| runnable(p))
        .with_context(|| format!("cannot run {program}: not found in PATH; nothing was restored"))
}

/// The program could not be started after the connection was resumed:
/// freezes it again (locked for the default lease, so the peer's packets
/// meet no RST) and writes its current state next to the image, so that
/// it can be restored again; closing it frozen sends nothing.
fn set_aside(
    sock: std::os::fd::OwnedFd,
    img: &ConnectionImage,
    file: &Path,
    spawn_error: std::io::Error,
) -> anyhow::Error {
    let retry = file.with_extension("retry.img");
    let saved = freeze_with(sock, &FreezeOptions::default(), IfFrozen::Refuse)
        .map_err(anyhow::Error::from)
        .and_then(|frozen| {
            let mut now = frozen.dump()?;
            now.app_blob = img.app_blob.clone();
            Output::open(&retry)?.write(&now.encode()?)?;
            frozen.leave_frozen();
            Ok(())
        });
    match saved {
        Ok(()) => anyhow::anyhow!(
            "cannot start the program ({spawn_error}); the connection was frozen again and saved to {}: restore that image within {} s",
            retry.display(),
            tcpr_engine::DEFAULT_LEASE.as_secs()
        ),
        Err(e) => anyhow::anyhow!(
            "cannot start the program ({spawn_error}), and cannot set the connection aside: {e:#}"
        ),
    }
}
