//! The JSON view of an image, for people and scripts (`tcpr inspect --json`).
//! It is a view, not a second format: images are never read back from JSON.

use crate::ConnectionImage;
use serde::Serialize;
use std::net::SocketAddr;

/// The five `TCP_REPAIR_WINDOW` fields, as they appear in JSON.
#[derive(Serialize)]
pub struct WindowView {
    /// See [`crate::RepairWindow::snd_wl1`].
    pub snd_wl1: u32,
    /// See [`crate::RepairWindow::snd_wnd`].
    pub snd_wnd: u32,
    /// See [`crate::RepairWindow::max_window`].
    pub max_window: u32,
    /// See [`crate::RepairWindow::rcv_wnd`].
    pub rcv_wnd: u32,
    /// See [`crate::RepairWindow::rcv_wup`].
    pub rcv_wup: u32,
}

#[derive(Serialize)]
struct View<'a> {
    format_version: u16,
    local: String,
    peer: String,
    state: String,
    send_seq: u32,
    recv_seq: u32,
    /// Whole send queue (sent + unsent), bytes.
    send_queue_len: usize,
    /// Sent, not yet acknowledged, bytes.
    sent_len: usize,
    /// Not yet sent, bytes.
    unsent_len: usize,
    recv_queue_len: usize,
    mss: u16,
    window_scaling: bool,
    snd_wscale: u8,
    rcv_wscale: u8,
    sack: bool,
    timestamps: bool,
    timestamp: u32,
    window: WindowView,
    socket_options: &'a crate::SocketOptions,
    app_blob_len: usize,
    dumped_at_unix_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<DataView>,
}

#[derive(Serialize)]
struct DataView {
    recv_queue_hex: String,
    send_queue_sent_hex: String,
    send_queue_unsent_hex: String,
    app_blob_hex: String,
}

/// `addr:port`, IPv6 as `[addr]:port` (scope ids kept as `%N`).
fn endpoint(a: SocketAddr) -> String {
    a.to_string()
}

/// The JSON view of `img`; with `with_data`, queue contents and the blob are
/// included as hex.
pub fn to_json(img: &ConnectionImage, with_data: bool) -> serde_json::Value {
    let w = img.window;
    let view = View {
        format_version: crate::format::VERSION,
        local: endpoint(img.local),
        peer: endpoint(img.peer),
        state: img.state.to_string(),
        send_seq: img.send_seq.0,
        recv_seq: img.recv_seq.0,
        send_queue_len: img.send_queue.len(),
        sent_len: img.send_queue.sent.len(),
        unsent_len: img.send_queue.unsent.len(),
        recv_queue_len: img.recv_queue.len(),
        mss: img.options.mss,
        window_scaling: img.options.window_scaling,
        snd_wscale: img.options.snd_wscale,
        rcv_wscale: img.options.rcv_wscale,
        sack: img.options.sack,
        timestamps: img.options.timestamps,
        timestamp: img.timestamp,
        window: WindowView {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd,
            rcv_wup: w.rcv_wup,
        },
        socket_options: &img.socket_options,
        app_blob_len: img.app_blob.len(),
        dumped_at_unix_ns: img.dumped_at_unix_ns,
        data: with_data.then(|| DataView {
            recv_queue_hex: hex::encode(&img.recv_queue),
            send_queue_sent_hex: hex::encode(&img.send_queue.sent),
            send_queue_unsent_hex: hex::encode(&img.send_queue.unsent),
            app_blob_hex: hex::encode(&img.app_blob),
        }),
    };
    serde_json::to_value(view).expect("the view serializes")
}
