//! Framing: a 4-byte big-endian length, then one protobuf `Message`
//! (`proto/tcpr_handoff_v1.proto`). Lengths above [`MAX_FRAME`] and bodies
//! that do not decode are errors, never panics.
//!
//! The sender cuts a batch's images into PREPARE frames of a few MiB
//! ([`crate::Framing`]); only an image larger than that travels alone in a
//! larger frame.

use crate::machine::{BatchStatus, ConnId, Msg, ServiceAddress};
use prost::Message as _;
use std::io::{self, Read, Write};

#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tcpr.handoff.v1.rs"));
}

/// Protocol version spoken by this build: the version of the batch (HELLO
/// to COMMITTED). PING and PONG, which a sender sends only on a channel
/// used before, left it at 1: an agent too old to keep a channel closes
/// it after its batch, and one that never heard of PING reads it as a
/// malformed frame and closes the channel, which the sender takes as a
/// dead channel and connects anew, before it freezes anything.
pub const VERSION: u32 = 1;
/// Room in a frame around one image: the protobuf tags and lengths of the
/// message, the connection id, the image's envelope.
const FRAME_OVERHEAD: usize = 1 << 20;

/// Largest frame accepted: one image of the largest size the image format
/// allows ([`tcpr_image::format::MAX_BODY`]), whole. An image cannot be
/// split across frames, because the agent restores a connection from its
/// complete image (the kernel takes the queues, the sequence numbers and
/// the window in one fixed order), so the limit per frame is the limit per
/// image, deliberately. A reader grows its buffer as the bytes arrive, so
/// an announced length costs nothing until the (authenticated) peer has
/// sent that many bytes; frames are normally far smaller.
pub const MAX_FRAME: usize =
    tcpr_image::format::MAX_BODY as usize + tcpr_image::format::HEADER_LEN + FRAME_OVERHEAD;

/// The buffer a reader starts a frame with; it grows as bytes arrive.
const READ_CHUNK: usize = 1 << 20;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The link failed, or closed inside a frame.
    #[error("link: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the link between frames: a clean end (a health
    /// check that only proves the handshake ends this way).
    #[error("link closed by the peer")]
    Closed,
    /// The frame is larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// The body is not a valid message.
    #[error("malformed message")]
    Malformed,
    /// A message this end cannot take here.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
}

/// Writes one message, length and body in one write: on a TLS channel one
/// record and one segment (written apart, they were two of each, and the
/// reader woke up for the length alone).
pub fn write_msg(w: &mut impl Write, m: &pb::Message) -> Result<(), WireError> {
    let body_len = m.encoded_len();
    if body_len > MAX_FRAME {
        return Err(WireError::TooLarge(body_len));
    }
    let len = u32::try_from(body_len).map_err(|_| WireError::TooLarge(body_len))?;
    let mut frame = Vec::with_capacity(4 + body_len);
    frame.extend_from_slice(&len.to_be_bytes());
    m.encode(&mut frame)
        .map_err(|_| WireError::TooLarge(body_len))?;
    w.write_all(&frame)?;
    Ok(())
}

/// Writes one PREPARE frame, each image from where it lies: the bytes are
/// those of `write_msg` for `Message { prepare: Prepare { connections } }`,
/// with the headers encoded by prost's primitives and the images never
/// copied into one buffer (a frame can hold an image of hundreds of MiB).
pub fn write_prepare(w: &mut impl Write, conns: &[(ConnId, &[u8])]) -> Result<(), WireError> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    // Field numbers in proto/tcpr_handoff_v1.proto.
    const MESSAGE_PREPARE: u32 = 2;
    const PREPARE_CONNECTIONS: u32 = 1;
    const CONNECTION_IMAGE: u32 = 2;
    let length_delimited = |tag: u32, len: usize, buf: &mut Vec<u8>| {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(len as u64, buf);
    };
    // Each connection's fields but its image's bytes (an empty image, the
    // proto3 default, is not encoded at all).
    let heads: Vec<Vec<u8>> = conns
        .iter()
        .map(|(id, image)| {
            let mut head = pb::PreparedConnection {
                id: *id,
                image: vec![],
            }
            .encode_to_vec();
            if !image.is_empty() {
                length_delimited(CONNECTION_IMAGE, image.len(), &mut head);
            }
            head
        })
        .collect();
    let field_len =
        |len: usize| key_len(PREPARE_CONNECTIONS) + encoded_len_varint(len as u64) + len;
    let prepare_len: usize = heads
        .iter()
        .zip(conns)
        .map(|(head, (_, image))| field_len(head.len() + image.len()))
        .sum();
    let body_len = key_len(MESSAGE_PREPARE) + encoded_len_varint(prepare_len as u64) + prepare_len;
    if body_len > MAX_FRAME {
        return Err(WireError::TooLarge(body_len));
    }
    let len = u32::try_from(body_len).map_err(|_| WireError::TooLarge(body_len))?;
    let mut head = len.to_be_bytes().to_vec();
    length_delimited(MESSAGE_PREPARE, prepare_len, &mut head);
    w.write_all(&head)?;
    for (conn_head, (_, image)) in heads.iter().zip(conns) {
        let mut field = vec![];
        length_delimited(
            PREPARE_CONNECTIONS,
            conn_head.len() + image.len(),
            &mut field,
        );
        w.write_all(&field)?;
        w.write_all(conn_head)?;
        w.write_all(image)?;
    }
    Ok(())
}

/// Reads one message.
pub fn read_msg(r: &mut impl Read) -> Result<pb::Message, WireError> {
    let mut len = [0u8; 4];
    // The first byte alone tells a clean end from a frame cut short.
    let first = loop {
        match r.read(&mut len[..1]) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if first == 0 {
        return Err(WireError::Closed);
    }
    r.read_exact(&mut len[1..])?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut body = Vec::with_capacity(len.min(READ_CHUNK));
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    decode(&body)
}

/// Decodes one frame body.
pub fn decode(body: &[u8]) -> Result<pb::Message, WireError> {
    let m = pb::Message::decode(body).map_err(|_| WireError::Malformed)?;
    if m.kind.is_none() {
        return Err(WireError::Malformed);
    }
    Ok(m)
}

fn outcomes(v: &[(ConnId, Result<(), String>)]) -> Vec<pb::Outcome> {
    v.iter()
        .map(|(id, r)| pb::Outcome {
            id: *id,
            ok: r.is_ok(),
            error: r.as_ref().err().cloned().unwrap_or_default(),
        })
        .collect()
}

fn from_outcomes(v: Vec<pb::Outcome>) -> Vec<(ConnId, Result<(), String>)> {
    v.into_iter()
        .map(|o| (o.id, if o.ok { Ok(()) } else { Err(o.error) }))
        .collect()
}

/// A machine message as a wire message. `Prepare` carries no images here:
/// the sender's driver builds those frames itself.
pub fn to_wire(m: &Msg) -> pb::Message {
    use pb::message::Kind;
    let kind = match m {
        Msg::Hello { batch, total } => Kind::Hello(pb::Hello {
            version: VERSION,
            batch: *batch,
            total: *total,
            take_address: String::new(),
        }),
        Msg::Prepare(ids) => Kind::Prepare(pb::Prepare {
            connections: ids
                .iter()
                .map(|&id| pb::PreparedConnection { id, image: vec![] })
                .collect(),
        }),
        Msg::Ready(o) => Kind::Ready(pb::Ready {
            outcomes: outcomes(o),
        }),
        Msg::Commit { ids, take_address } => Kind::Commit(pb::Commit {
            ids: ids.clone(),
            add_address: take_address.map(|a| pb::AddressMove {
                cidr: format!("{}/{}", a.ip, a.prefix_len),
                dev: String::new(),
            }),
        }),
        Msg::Committed(o) => Kind::Committed(pb::Committed {
            outcomes: outcomes(o),
        }),
        Msg::Abort(r) => Kind::Abort(pb::Abort { reason: r.clone() }),
        Msg::CommitRefused(r) => Kind::CommitRefused(pb::CommitRefused { reason: r.clone() }),
    };
    pb::Message { kind: Some(kind) }
}

/// `addr/prefix` as a service address.
fn parse_cidr(cidr: &str) -> Result<ServiceAddress, WireError> {
    let (ip, prefix_len) = cidr.split_once('/').ok_or(WireError::Unexpected(
        "an address to take without a prefix length",
    ))?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| WireError::Unexpected("an address to take that is not an address"))?;
    let prefix_len: u8 = prefix_len
        .parse()
        .ok()
        .filter(|&p| p <= if ip.is_ipv4() { 32 } else { 128 })
        .ok_or(WireError::Unexpected(
            "an address to take with a bad prefix length",
        ))?;
    Ok(ServiceAddress { ip, prefix_len })
}

/// A wire message as a machine message (Query/Status and Ping/Pong are
/// handled by the drivers, not the machines).
pub fn from_wire(m: pb::Message) -> Result<Msg, WireError> {
    use pb::message::Kind;
    Ok(match m.kind.ok_or(WireError::Malformed)? {
        Kind::Hello(h) => {
            if h.version != VERSION {
                return Err(WireError::Unexpected("unsupported protocol version"));
            }
            Msg::Hello {
                batch: h.batch,
                total: h.total,
            }
        }
        Kind::Prepare(p) => Msg::Prepare(p.connections.iter().map(|c| c.id).collect()),
        Kind::Ready(r) => Msg::Ready(from_outcomes(r.outcomes)),
        Kind::Commit(c) => Msg::Commit {
            ids: c.ids,
            take_address: match c.add_address {
                None => None,
                Some(a) => Some(parse_cidr(&a.cidr)?),
            },
        },
        Kind::Committed(c) => Msg::Committed(from_outcomes(c.outcomes)),
        Kind::Abort(a) => Msg::Abort(a.reason),
        Kind::CommitRefused(r) => Msg::CommitRefused(r.reason),
        Kind::Query(_) => return Err(WireError::Unexpected("QUERY inside a batch")),
        Kind::Status(_) => return Err(WireError::Unexpected("STATUS inside a batch")),
        Kind::Ping(_) => return Err(WireError::Unexpected("PING inside a batch")),
        Kind::Pong(_) => return Err(WireError::Unexpected("PONG inside a batch")),
    })
}

/// A sender's PING, between batches.
pub fn ping(nonce: u64) -> pb::Message {
    pb::Message {
        kind: Some(pb::message::Kind::Ping(pb::Ping { nonce })),
    }
}

/// The agent's answer to a PING.
pub fn pong(nonce: u64) -> pb::Message {
    pb::Message {
        kind: Some(pb::message::Kind::Pong(pb::Pong { nonce })),
    }
}

/// A batch's status as the wire carries it.
pub fn status_to_wire(batch: u64, status: &BatchStatus) -> pb::Status {
    let (state, committed_ids) = match status {
        BatchStatus::Unknown => (pb::BatchStatus::Unknown, vec![]),
        BatchStatus::Committed(ids) => (pb::BatchStatus::Committed, ids.clone()),
        BatchStatus::NotResumed => (pb::BatchStatus::NotResumed, vec![]),
    };
    pb::Status {
        batch,
        state: state.into(),
        committed_ids,
    }
}

/// A batch's status from the wire. A value this build does not know, or
/// PREPARED (which an agent never answers: a Query gives such a batch up),
/// reads as unknown: it never allows a roll back.
pub fn status_from_wire(s: pb::Status) -> BatchStatus {
    match pb::BatchStatus::try_from(s.state) {
        Ok(pb::BatchStatus::Committed) => BatchStatus::Committed(s.committed_ids),
        Ok(pb::BatchStatus::NotResumed) => BatchStatus::NotResumed,
        Ok(pb::BatchStatus::Unknown | pb::BatchStatus::Prepared) | Err(_) => BatchStatus::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = read_msg(&mut &bytes[..]);
            let _ = decode(&bytes);
        }

        #[test]
        fn messages_round_trip(ids in proptest::collection::vec(any::<u32>(), 0..20), reason in ".{0,20}") {
            for m in [Msg::Commit { ids: ids.clone(), take_address: None },
                      Msg::Commit { ids: ids.clone(), take_address: Some(ServiceAddress { ip: [10, 0, 0, 100].into(), prefix_len: 24 }) }, Msg::Abort(reason.clone()),
                      Msg::Ready(ids.iter().map(|&i| (i, if i % 2 == 0 { Ok(()) } else { Err(reason.clone()) })).collect())] {
                let mut buf = vec![];
                write_msg(&mut buf, &to_wire(&m)).unwrap();
                let back = from_wire(read_msg(&mut &buf[..]).unwrap()).unwrap();
                prop_assert_eq!(back, m);
            }
        }
    }

    proptest! {
        #[test]
        fn prepare_frames_are_those_of_prost(
            conns in proptest::collection::vec(
                (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..6)
        ) {
            let mut ours = vec![];
            let refs: Vec<(ConnId, &[u8])> = conns.iter().map(|(id, img)| (*id, &img[..])).collect();
            write_prepare(&mut ours, &refs).unwrap();
            let mut theirs = vec![];
            let m = pb::Message {
                kind: Some(pb::message::Kind::Prepare(pb::Prepare {
                    connections: conns
                        .iter()
                        .map(|(id, img)| pb::PreparedConnection { id: *id, image: img.clone() })
                        .collect(),
                })),
            };
            write_msg(&mut theirs, &m).unwrap();
            prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn a_frame_cut_short_is_an_error() {
        let mut buf = vec![];
        write_msg(&mut buf, &to_wire(&Msg::Abort("x".repeat(100)))).unwrap();
        buf.truncate(buf.len() - 1);
        assert!(matches!(read_msg(&mut &buf[..]), Err(WireError::Io(_))));
        // An announced length far beyond the bytes sent allocates nothing
        // up front and ends at the end of the input.
        let lying = ((MAX_FRAME - 1) as u32).to_be_bytes();
        assert!(matches!(read_msg(&mut &lying[..]), Err(WireError::Io(_))));
        // Two bytes of a length: cut short too, not a clean end.
        assert!(matches!(read_msg(&mut &lying[..2]), Err(WireError::Io(_))));
    }

    #[test]
    fn an_end_between_frames_is_a_clean_close() {
        assert!(matches!(read_msg(&mut &[][..]), Err(WireError::Closed)));
        let mut buf = vec![];
        write_msg(&mut buf, &to_wire(&Msg::Abort("x".into()))).unwrap();
        let mut r = &buf[..];
        assert!(read_msg(&mut r).is_ok());
        assert!(matches!(read_msg(&mut r), Err(WireError::Closed)));
    }

    #[test]
    fn oversized_frames_are_refused_before_reading() {
        let bytes = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_msg(&mut &bytes[..]),
            Err(WireError::TooLarge(_))
        ));
    }
}
