//! What each end reads before its peer is authenticated, over loopback
//! TCP and real TLS: raw bytes to the agent's TLS server, or a forged
//! exporter MAC to either end. Nothing authenticates without the key.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tcpr_handoff::fuzzing::psk_exchange(data));
