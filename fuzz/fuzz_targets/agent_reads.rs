//! What an authenticated sender sends an agent: frames through the wire
//! decoder, images through the image decoder, messages through the
//! agent's machine, whose invariants hold whatever arrives.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tcpr_handoff::fuzzing::agent_reads(data));
