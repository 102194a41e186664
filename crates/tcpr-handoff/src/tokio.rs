//! tokio front ends (feature `tokio`): connections handed to this process
//! arrive as [`tokio::net::TcpStream`], and tokio streams can be handed off.
//!
//! The agent and the sender stay blocking code on threads of their own (a
//! handoff is a short burst of syscalls and one TLS exchange); these
//! wrappers only move streams across the boundary, so a runtime never
//! blocks on them.

use crate::{Delivered, Error, HandOff, Incoming, LocalIncoming, MigrateOptions};
use std::net::SocketAddr;

/// A connection delivered to this process, as a tokio stream.
#[derive(Debug)]
pub struct AsyncDelivered {
    /// The live connection, registered with the current runtime.
    pub stream: tokio::net::TcpStream,
    /// The application state that travelled with it.
    pub blob: Vec<u8>,
    /// Our end.
    pub local: SocketAddr,
    /// The peer.
    pub peer: SocketAddr,
}

impl Delivered {
    /// Registers the stream with the current tokio runtime (call it from
    /// within one).
    pub fn into_tokio(self) -> std::io::Result<AsyncDelivered> {
        self.stream.set_nonblocking(true)?;
        Ok(AsyncDelivered {
            stream: tokio::net::TcpStream::from_std(self.stream)?,
            blob: self.blob,
            local: self.local,
            peer: self.peer,
        })
    }
}

/// Connections handed to this process, awaited.
pub struct AsyncIncoming {
    rx: tokio::sync::mpsc::UnboundedReceiver<Delivered>,
}

impl AsyncIncoming {
    fn forward(mut next: impl FnMut() -> Option<Delivered> + Send + 'static) -> AsyncIncoming {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            while let Some(d) = next() {
                if tx.send(d).is_err() {
                    break;
                }
            }
        });
        AsyncIncoming { rx }
    }

    /// The next connection handed over; `None` once the listener has
    /// stopped. An error means this one could not be registered with the
    /// runtime (it is closed).
    pub async fn accept(&mut self) -> Option<std::io::Result<AsyncDelivered>> {
        Some(self.rx.recv().await?.into_tokio())
    }
}

impl Incoming {
    /// The same listener, awaited from tokio.
    pub fn into_async(self) -> AsyncIncoming {
        AsyncIncoming::forward(move || self.accept())
    }
}

impl LocalIncoming {
    /// The same listener, awaited from tokio.
    pub fn into_async(self) -> AsyncIncoming {
        AsyncIncoming::forward(move || self.accept())
    }
}

/// What became of a tokio stream handed off.
#[derive(Debug)]
pub enum AsyncHandOff {
    /// The agent owns it now.
    Moved,
    /// It stayed and carries on here, with why.
    Stayed(tokio::net::TcpStream, String),
    /// The agent may own it; it is frozen here until the lease ends.
    Unknown(String),
}

fn to_std(s: tokio::net::TcpStream) -> Result<std::net::TcpStream, Error> {
    let s = s
        .into_std()
        .map_err(|e| tcpr_engine::Error::kernel("take the stream from the runtime", e))?;
    s.set_nonblocking(false)
        .map_err(|e| tcpr_engine::Error::kernel("make the stream blocking", e))?;
    Ok(s)
}

fn from_std(s: std::net::TcpStream, why: String) -> AsyncHandOff {
    let back = s
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(s));
    match back {
        Ok(s) => AsyncHandOff::Stayed(s, why),
        // The connection is still here but the runtime refused it: say so
        // rather than drop it silently.
        Err(e) => AsyncHandOff::Unknown(format!("{why}; back in the runtime: {e}")),
    }
}

/// [`crate::hand_off`] for tokio streams: the handoff runs on tokio's
/// blocking pool; streams that stay come back registered with the runtime.
/// The streams must not be in use elsewhere while this runs.
pub async fn hand_off(
    conns: Vec<(tokio::net::TcpStream, Vec<u8>)>,
    opts: MigrateOptions,
) -> Result<Vec<AsyncHandOff>, Error> {
    let mut std_conns = Vec::with_capacity(conns.len());
    for (s, blob) in conns {
        std_conns.push((to_std(s)?, blob));
    }
    let results = tokio::task::spawn_blocking(move || crate::hand_off(std_conns, &opts))
        .await
        .map_err(|e| Error::Usage(format!("the handoff task failed: {e}")))??;
    Ok(results
        .into_iter()
        .map(|r| match r {
            HandOff::Moved => AsyncHandOff::Moved,
            HandOff::Unknown(why) => AsyncHandOff::Unknown(why),
            HandOff::Stayed(s, why) => from_std(s, why),
        })
        .collect())
}
