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

/// When a paced stream's bytes fall due: `rate` bytes/s from `began`, on
/// one schedule however long the writer was held up (what fell due during
/// a move is written as soon as the connection is back), and written a
/// tick's worth at a time, as an application that produces its data at a
/// steady rate does.
///
/// A writer that wrote whatever had fallen due each time round wrote a
/// few dozen bytes per call and never slept: one core spinning on
/// 40-byte segments, and the reader woken for each, on a 2-core machine
/// whose other work (the move being measured) then waited for a core.
pub struct Schedule {
    began: std::time::Instant,
    base: u64,
    rate: u64,
    tick: std::time::Duration,
}

impl Schedule {
    /// `rate` bytes/s from now, counting from offset `base`, in ticks of
    /// `tick`.
    pub fn new(rate: u64, base: u64, tick: std::time::Duration) -> Schedule {
        Schedule {
            began: std::time::Instant::now(),
            base,
            rate,
            tick,
        }
    }

    /// The bytes owed beyond offset `sent` if at least a tick's worth has
    /// fallen due; `None` when the writer should sleep ([`Schedule::wait`]).
    pub fn owed(&self, sent: u64) -> Option<u64> {
        let due = self.base + (self.began.elapsed().as_secs_f64() * self.rate as f64) as u64;
        let tick_bytes = (self.tick.as_secs_f64() * self.rate as f64) as u64;
        (due >= sent + tick_bytes.max(1)).then(|| due - sent)
    }

    /// Waits one tick, or until the thread is unparked (a writer told to
    /// stop looks at once instead of after its tick).
    pub fn wait(&self) {
        std::thread::park_timeout(self.tick);
    }
}
