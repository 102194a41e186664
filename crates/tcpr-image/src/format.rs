//! The image envelope, checked before any body byte is decoded.
//!
//! ```text
//! offset size  field
//!      0    4  magic: "TCPR"
//!      4    2  format version, big-endian (this crate writes 1)
//!      6    2  reserved, must be 0
//!      8    4  body length in bytes, big-endian
//!     12    4  CRC-32 (IEEE) of the body, big-endian
//!     16    n  body: a protobuf `tcpr.image.v1.ConnectionImage`
//! ```
//!
//! Several images may follow one another in a stream; [`open`] returns the
//! bytes after the first one. A body is at most [`MAX_BODY`] bytes.

/// The four bytes every image starts with.
pub const MAGIC: [u8; 4] = *b"TCPR";
/// The format version this crate writes.
pub const VERSION: u16 = 1;
/// Size of the envelope header.
pub const HEADER_LEN: usize = 16;
/// Largest body accepted (two 1 GiB queues plus change would not fit a
/// sequence space anyway).
pub const MAX_BODY: u32 = 1 << 31;

/// Why bytes are not a valid image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// Fewer bytes than the header or the length it announces.
    #[error("truncated image: {needed} bytes needed, {got} present")]
    Truncated {
        /// Bytes the header or the format requires.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// The magic is not "TCPR": not a tcpr image at all.
    #[error("not a tcpr image (bad magic)")]
    BadMagic,
    /// A format version this build cannot read.
    #[error("unsupported image format version {0} (this build reads version 1)")]
    UnsupportedVersion(u16),
    /// Reserved header bits are set.
    #[error("reserved header field is not zero")]
    Reserved,
    /// The body length is above [`MAX_BODY`] (announced by a header, or
    /// of an image being encoded).
    #[error("image body too large ({0} bytes, at most 2 GiB)")]
    TooLarge(u64),
    /// The body does not match its checksum: the file is corrupt.
    #[error("image checksum mismatch: the image is corrupt")]
    BadChecksum,
    /// Bytes follow the image where none were expected.
    #[error("{0} unexpected bytes after the image")]
    TrailingBytes(usize),
    /// The body is not a valid protobuf message of the schema.
    #[error("image body is not a valid protobuf ConnectionImage")]
    Malformed,
    /// The body decodes but breaks an invariant.
    #[error("invalid image: {0}")]
    Invalid(&'static str),
}

/// Wraps a body in the envelope. A body above [`MAX_BODY`] is refused, as
/// [`open`] would refuse it.
pub fn seal(body: &[u8]) -> Result<Vec<u8>, ImageError> {
    let len = checked_body_len(body.len())?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// `len` as the header's length field, if it is at most [`MAX_BODY`].
pub(crate) fn checked_body_len(len: usize) -> Result<u32, ImageError> {
    match u32::try_from(len) {
        Ok(l) if l <= MAX_BODY => Ok(l),
        _ => Err(ImageError::TooLarge(len as u64)),
    }
}

/// Checks the envelope at the front of `bytes`; returns the version, the
/// body and the bytes after it.
pub fn open(bytes: &[u8]) -> Result<(u16, &[u8], &[u8]), ImageError> {
    if bytes.len() >= 4 && bytes[..4] != MAGIC {
        return Err(ImageError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(ImageError::Truncated {
            needed: HEADER_LEN,
            got: bytes.len(),
        });
    }
    let be16 = |i: usize| u16::from_be_bytes([bytes[i], bytes[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let version = be16(4);
    if version != VERSION {
        return Err(ImageError::UnsupportedVersion(version));
    }
    if be16(6) != 0 {
        return Err(ImageError::Reserved);
    }
    let len = be32(8);
    if len > MAX_BODY {
        return Err(ImageError::TooLarge(u64::from(len)));
    }
    let end = HEADER_LEN + len as usize;
    if bytes.len() < end {
        return Err(ImageError::Truncated {
            needed: end,
            got: bytes.len(),
        });
    }
    let body = &bytes[HEADER_LEN..end];
    if crc32fast::hash(body) != be32(12) {
        return Err(ImageError::BadChecksum);
    }
    Ok((version, body, &bytes[end..]))
}
