//! What an agent sends a sender (answers, and the STATUS of a Query):
//! frames through the wire decoder, messages through the sender's
//! machine, which never ends a connection twice or thaws one while the
//! switch stands.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tcpr_handoff::fuzzing::sender_reads(data));
