//! What an application reads from the agent's `--unix` socket
//! (`deliver::UnixReceiver`), with a file descriptor attached.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tcpr_handoff::fuzzing::unix_delivery(data));
