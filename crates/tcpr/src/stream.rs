//! Deterministic byte streams for the demo and the benches: the byte at
//! offset `i` of stream `seed` is a pure function of both, so a receiver
//! verifies every byte without keeping a copy.

fn mix(mut x: u64) -> u64 {
    // splitmix64
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Byte `off` of stream `seed`.
pub fn byte_at(seed: u64, off: u64) -> u8 {
    (mix(seed ^ (off / 8)) >> ((off % 8) * 8)) as u8
}

/// Fills `buf` with the stream from `off`.
pub fn fill(seed: u64, off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte_at(seed, off + i as u64);
    }
}

/// The offset of the first byte of `buf` that differs from the stream, if any.
pub fn first_mismatch(seed: u64, off: u64, buf: &[u8]) -> Option<u64> {
    buf.iter()
        .enumerate()
        .find(|(i, b)| **b != byte_at(seed, off + *i as u64))
        .map(|(i, _)| off + i as u64)
}
