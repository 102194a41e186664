//! The BPF call aya does not make: running a loaded program once
//! (`BPF_PROG_TEST_RUN`, how the steering datapath's sweep runs).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `BPF_PROG_TEST_RUN` (linux/bpf.h `enum bpf_cmd`).
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of linux/bpf.h's `union bpf_attr`, up to `batch_size`
/// (Linux 5.18); older kernels accept it as long as the fields they do not
/// know are zero.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

/// Runs the loaded program `prog` once on `packet` (a socket-buffer
/// program: at least an Ethernet header) and returns its return value.
pub fn test_run(prog: BorrowedFd<'_>, packet: &[u8]) -> io::Result<u32> {
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(prog.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?,
        data_size_in: u32::try_from(packet.len())
            .map_err(|_| io::Error::other("packet too large"))?,
        data_in: packet.as_ptr() as u64,
        repeat: 1,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is a valid, zero-padded `bpf_attr.test` of the size
    // passed; the kernel reads `packet` (live for the call, its length
    // given) and writes only into `attr` (no output buffers are given).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            size_of::<TestRunAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr.retval)
}
