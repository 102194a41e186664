//! The TLS ClientHello parser never panics, and an answer other than
//! `Incomplete` is final: more bytes after it do not change it (the
//! balancer acts on the first answer it gets while peeking).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tcpr_balance::config::Protocol;
use tcpr_balance::head::{self, HeadError};

/// The smallest and the default `max_head_bytes` a config may give.
const LIMITS: [usize; 2] = [256, 16_384];

fuzz_target!(|data: &[u8]| {
    for max_head_bytes in LIMITS {
        let whole = head::parse(Protocol::Tls, data, max_head_bytes);
        if data.len() >= max_head_bytes {
            assert_ne!(whole, Err(HeadError::Incomplete), "waits past the limit");
        }
        for cut in [data.len() / 3, data.len() / 2, data.len().saturating_sub(1)] {
            let prefix = head::parse(Protocol::Tls, &data[..cut], max_head_bytes);
            if prefix != Err(HeadError::Incomplete) {
                assert_eq!(prefix, whole, "the answer changed after {cut} bytes");
            }
        }
    }
});
