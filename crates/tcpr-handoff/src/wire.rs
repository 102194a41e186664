//! Framing: a 4-byte big-endian length, then one protobuf `Message`
//! (`proto/tcpr_handoff_v1.proto`). Lengths above [`MAX_FRAME`] and bodies
//! that do not decode are errors, never panics.

use crate::machine::{BatchStatus, ConnId, Msg};
use prost::Message as _;
use std::io::{self, Read, Write};

#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tcpr.handoff.v1.rs"));
}

/// Protocol version spoken by this build.
pub const VERSION: u32 = 1;
/// Largest frame accepted.
pub const MAX_FRAME: usize = 64 << 20;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The link failed or closed.
    #[error("link: {0}")]
    Io(#[from] io::Error),
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

/// Writes one message.
pub fn write_msg(w: &mut impl Write, m: &pb::Message) -> Result<(), WireError> {
    let body = m.encode_to_vec();
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge(body.len()));
    }
    w.write_all(&(body.len() as u32).to_be_bytes())?;
    w.write_all(&body)?;
    Ok(())
}

/// Reads one message.
pub fn read_msg(r: &mut impl Read) -> Result<pb::Message, WireError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
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
        Msg::Commit(ids) => Kind::Commit(pb::Commit {
            ids: ids.clone(),
            add_address: None,
        }),
        Msg::Committed(o) => Kind::Committed(pb::Committed {
            outcomes: outcomes(o),
        }),
        Msg::Abort(r) => Kind::Abort(pb::Abort { reason: r.clone() }),
        Msg::CommitRefused(r) => Kind::CommitRefused(pb::CommitRefused { reason: r.clone() }),
    };
    pb::Message { kind: Some(kind) }
}

/// A wire message as a machine message (Query/Status are handled by the
/// drivers, not the machines).
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
        Kind::Commit(c) => Msg::Commit(c.ids),
        Kind::Committed(c) => Msg::Committed(from_outcomes(c.outcomes)),
        Kind::Abort(a) => Msg::Abort(a.reason),
        Kind::CommitRefused(r) => Msg::CommitRefused(r.reason),
        Kind::Query(_) => return Err(WireError::Unexpected("QUERY inside a batch")),
        Kind::Status(_) => return Err(WireError::Unexpected("STATUS inside a batch")),
    })
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
            for m in [Msg::Commit(ids.clone()), Msg::Abort(reason.clone()),
                      Msg::Ready(ids.iter().map(|&i| (i, if i % 2 == 0 { Ok(()) } else { Err(reason.clone()) })).collect())] {
                let mut buf = vec![];
                write_msg(&mut buf, &to_wire(&m)).unwrap();
                let back = from_wire(read_msg(&mut &buf[..]).unwrap()).unwrap();
                prop_assert_eq!(back, m);
            }
        }
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
