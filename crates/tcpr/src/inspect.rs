//! `tcpr inspect`, and the reading of an image file that it shares with
//! `tcpr restore`.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;
use tcpr_image::ConnectionImage;

pub(crate) fn read_image(path: &Path) -> Result<ConnectionImage> {
    use std::io::Read;
    // No image is longer than its header and the largest body: read no more.
    let max = (tcpr_image::format::HEADER_LEN as u64) + u64::from(tcpr_image::format::MAX_BODY);
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!(
            "{} is not a usable image: it is longer than any image ({} bytes at most)",
            path.display(),
            max
        );
    }
    ConnectionImage::decode(&bytes)
        .with_context(|| format!("{} is not a usable image", path.display()))
}

pub(crate) fn inspect(file: &Path, json: bool, data: bool) -> Result<i32> {
    let img = read_image(file)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&tcpr_image::to_json(&img, data))?
        )
        .map_err(crate::stdout_closed)?;
        return Ok(0);
    }
    if data {
        bail!("--data needs --json");
    }
    let o = &img.options;
    let w = &img.window;
    writeln!(out, "connection  {}", tcpr_engine::flow_of(&img)).map_err(crate::stdout_closed)?;
    writeln!(out, "state       {}", img.state).map_err(crate::stdout_closed)?;
    writeln!(
        out,
        "sequence    send {}  recv {}",
        img.send_seq.0, img.recv_seq.0
    )
    .map_err(crate::stdout_closed)?;
    writeln!(
        out,
        "queues      send {} bytes ({} sent, {} unsent)  recv {} bytes",
        img.send_queue.len(),
        img.send_queue.sent.len(),
        img.send_queue.unsent.len(),
        img.recv_queue.len()
    )
    .map_err(crate::stdout_closed)?;
    writeln!(
        out,
        "options     mss {}  wscale {}  sack {}  timestamps {}",
        o.mss,
        if o.window_scaling {
            format!("{}/{}", o.snd_wscale, o.rcv_wscale)
        } else {
            "off".into()
        },
        o.sack,
        o.timestamps
    )
    .map_err(crate::stdout_closed)?;
    writeln!(
        out,
        "window      snd_wl1 {} snd_wnd {} max_window {} rcv_wnd {} rcv_wup {}",
        w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup
    )
    .map_err(crate::stdout_closed)?;
    writeln!(out, "app blob    {} bytes", img.app_blob.len()).map_err(crate::stdout_closed)?;
    Ok(0)
}
