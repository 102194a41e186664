//! tokio front ends (feature `tokio`): connections handed to this process
//! arrive as [`tokio::net::TcpStream`], and tokio streams can be handed off;
//! an agent's `--unix` deliveries can be received on the event loop itself
//! ([`AsyncUnixReceiver`]).
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

/// [`crate::deliver::UnixReceiver`] for an event loop: the receiving end
/// of a unix connection from the agent's `--unix`, read without blocking
/// the runtime's thread, so a server can take delivered connections on
/// the thread that serves them (no thread per unix connection, no
/// handoff between threads per delivered connection). Same messages,
/// same acknowledgements, same end of stream; each message is read in
/// exactly its own bytes (the next one's fds ride on its first byte).
#[derive(Debug)]
pub struct AsyncUnixReceiver {
    from: tokio::net::UnixStream,
    state: crate::deliver::ReceiverState,
}

impl AsyncUnixReceiver {
    /// Reads the unix connection `from` (just accepted); the agent closes
    /// it after each handoff batch ([`crate::deliver::UnixReceiver::new`]).
    pub fn new(from: tokio::net::UnixStream) -> AsyncUnixReceiver {
        AsyncUnixReceiver {
            from,
            state: Default::default(),
        }
    }

    /// Reads the unix connection `from` (just accepted), and lets the
    /// agent keep it open between handoff batches: only for a server that
    /// reads each of its unix connections as its messages come (a task
    /// each), as [`crate::deliver::UnixReceiver::concurrent`] says.
    pub fn concurrent(from: tokio::net::UnixStream) -> AsyncUnixReceiver {
        AsyncUnixReceiver {
            from,
            state: crate::deliver::ReceiverState::concurrent(),
        }
    }

    /// The unix connection read.
    pub fn get_ref(&self) -> &tokio::net::UnixStream {
        &self.from
    }

    /// [`crate::deliver::UnixReceiver::leave`]: the agent keeps this unix
    /// connection no longer; go on calling [`AsyncUnixReceiver::recv`]
    /// until it returns `Ok(None)`.
    pub async fn leave(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self.state.leave() {
            Some(byte) => self.from.write_all(&[byte]).await,
            None => Ok(()),
        }
    }

    /// The connections of the next message, acknowledged (one or more);
    /// `Ok(None)` at end of stream. The streams are as the agent left
    /// them (blocking): [`Delivered::into_tokio`] registers one with the
    /// runtime. After an error the unix connection is of no further use:
    /// drop it.
    ///
    /// Not cancel-safe: a `recv` dropped before it returns (a `select!`
    /// branch that lost) may have read part of a message, whose
    /// connections then close, and the stream is out of step; drop the
    /// receiver too (the agent reports those connections). Await it to
    /// the end, on a task of its own.
    pub async fn recv(&mut self) -> std::io::Result<Option<Vec<Delivered>>> {
        use crate::deliver::{message_len, BLOB_PREALLOCATION_BYTES, MESSAGE_HEAD};
        use std::os::fd::AsFd;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut head = [0u8; MESSAGE_HEAD];
        let first = self
            .from
            .async_io(tokio::io::Interest::READABLE, || {
                tcpr_host::recv_with_fds(self.from.as_fd(), &mut head)
            })
            .await;
        let (n, fds) = match first {
            Ok((0, _)) => return Ok(None),
            Ok(got) => got,
            Err(e) => return self.state.end_or(e),
        };
        let mut message = head[..n].to_vec();
        loop {
            let more = message_len(&message)? - message.len();
            if more == 0 {
                break;
            }
            message.reserve(more.min(BLOB_PREALLOCATION_BYTES));
            let read = (&mut self.from)
                .take(more as u64)
                .read_to_end(&mut message)
                .await?;
            if read != more {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        let (got, ack) = self.state.take(&message, fds)?;
        // Ours from here, acknowledged or not (see `deliver`).
        if let Err(e) = self.from.write_all(ack).await {
            crate::deliver::unacknowledged(&e);
        }
        Ok(Some(got))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver;
    use crate::deliver::batch_tests::{outgoing, pairs, sender_side};
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An event loop's receiver reads a first message that arrives in
    /// pieces (its fd on the first one), answers "kB", then two batch
    /// messages sent back to back before either is acknowledged (neither
    /// read past the other: every fd arrives), then the end of stream;
    /// every delivered connection is live both ways from the runtime.
    #[test]
    fn an_event_loop_receives_pieces_and_back_to_back_batches() {
        const N: usize = 7;
        let conns = pairs(N);
        let (servers, ends) = sender_side(&conns);
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || {
            let blobs: Vec<Vec<u8>> = (0..N).map(|i| format!("blob {i}").into_bytes()).collect();
            let m = deliver::unix_message(&blobs[0], ends[0].0, ends[0].1);
            // Three bytes (short of the head) with the fd, the rest later.
            tcpr_host::send_with_fd(a.as_fd(), &m[..3], servers[0].as_fd()).unwrap();
            std::thread::sleep(Duration::from_millis(30));
            (&a).write_all(&m[3..]).unwrap();
            let batches = deliver::await_first_ack(&a, deliver::ACK_TIMEOUT).unwrap();
            assert_eq!(
                batches,
                crate::deliver::Receives::Batches,
                "the event loop's receiver takes batches"
            );
            let out = outgoing(&servers, &blobs, &ends);
            deliver::send_unix_batch(&a, &out[1..3]).unwrap();
            deliver::send_unix_batch(&a, &out[3..]).unwrap();
            deliver::await_unix_ack(&a, deliver::ACK_TIMEOUT).unwrap();
            deliver::await_unix_ack(&a, deliver::ACK_TIMEOUT).unwrap();
        });
        // The client ends, each answering what the runtime writes to it.
        let clients = std::thread::spawn(move || {
            let mut peers = Vec::new();
            for (i, (mut client, _)) in conns.into_iter().enumerate() {
                let want = format!("blob {i}").into_bytes();
                let mut buf = vec![0u8; want.len()];
                client.read_exact(&mut buf).unwrap();
                assert_eq!(buf, want, "connection {i}");
                client.write_all(b"back").unwrap();
                peers.push(client.local_addr().unwrap());
            }
            peers
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let got = rt.block_on(async move {
            b.set_nonblocking(true).unwrap();
            let mut from = AsyncUnixReceiver::new(tokio::net::UnixStream::from_std(b).unwrap());
            let mut sizes = Vec::new();
            let mut got = Vec::new();
            while let Some(ds) = from.recv().await.unwrap() {
                sizes.push(ds.len());
                for d in ds {
                    let mut d = d.into_tokio().unwrap();
                    d.stream.write_all(&d.blob).await.unwrap();
                    let mut back = [0u8; 4];
                    d.stream.read_exact(&mut back).await.unwrap();
                    assert_eq!(&back, b"back");
                    got.push((d.blob, d.peer));
                }
            }
            assert_eq!(sizes, [1, 2, N - 3]);
            got
        });
        let clients = clients.join().unwrap();
        for (i, peer) in clients.into_iter().enumerate() {
            assert_eq!(got[i], (format!("blob {i}").into_bytes(), peer));
        }
        sender.join().unwrap();
    }
}
