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
    /// The agent may own it; it is frozen here until the lease ends. The
    /// stream is given back still frozen: keep it, and thaw it only once
    /// the agent is known not to hold the connection.
    Unknown(tokio::net::TcpStream, String),
}

/// A handoff that did not start (or whose task failed): every stream comes
/// back, still registered with the runtime, with its blob.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct AsyncHandOffError {
    /// Why.
    pub error: Error,
    /// The streams, in the input order.
    pub conns: Vec<(tokio::net::TcpStream, Vec<u8>)>,
}

/// [`crate::hand_off`] for tokio streams: the handoff runs on tokio's
/// blocking pool on duplicates of the streams' sockets, so the streams
/// themselves never leave the runtime and every one that stays comes back
/// as it was. The streams must not be in use elsewhere while this runs.
pub async fn hand_off(
    conns: Vec<(tokio::net::TcpStream, Vec<u8>)>,
    opts: MigrateOptions,
) -> Result<Vec<AsyncHandOff>, AsyncHandOffError> {
    use std::os::fd::AsFd;
    let mut dups = Vec::with_capacity(conns.len());
    for (s, blob) in &conns {
        match s.as_fd().try_clone_to_owned() {
            // A duplicate shares the open file (and its O_NONBLOCK): the
            // sender's calls on a frozen socket never block.
            Ok(fd) => dups.push((std::net::TcpStream::from(fd), blob.clone())),
            Err(e) => {
                return Err(AsyncHandOffError {
                    error: tcpr_engine::Error::kernel("duplicate the socket", e).into(),
                    conns,
                })
            }
        }
    }
    let results = match tokio::task::spawn_blocking(move || crate::hand_off(dups, &opts)).await {
        Ok(Ok(results)) => results,
        Ok(Err(e)) => {
            return Err(AsyncHandOffError {
                error: e.error,
                conns,
            })
        }
        Err(e) => {
            return Err(AsyncHandOffError {
                error: Error::Usage(format!("the handoff task failed: {e}")),
                conns,
            })
        }
    };
    Ok(conns
        .into_iter()
        .zip(results)
        .map(|((s, _blob), r)| match r {
            // The sender disconnected the socket in repair mode: closing
            // this handle sends nothing.
            HandOff::Moved => AsyncHandOff::Moved,
            HandOff::Stayed(_dup, why) => AsyncHandOff::Stayed(s, why),
            HandOff::Unknown(_dup, why) => AsyncHandOff::Unknown(s, why),
        })
        .collect())
}
