//! The BPF calls aya does not make: running a loaded program once
//! (`BPF_PROG_TEST_RUN`, how the steering datapath's sweep runs), a tcx
//! link's interface (`BPF_OBJ_GET_INFO_BY_FD`: aya keeps it private),
//! opening a pinned object by path, and finding or mounting the BPF file
//! system the steering pins its datapath in.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `BPF_PROG_TEST_RUN` (linux/bpf.h `enum bpf_cmd`).
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `BPF_MAP_GET_NEXT_KEY` (linux/bpf.h `enum bpf_cmd`).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
/// `BPF_OBJ_GET_INFO_BY_FD` (linux/bpf.h `enum bpf_cmd`).
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_LINK_TYPE_TCX` (linux/bpf.h `enum bpf_link_type`).
const BPF_LINK_TYPE_TCX: u32 = 11;
/// `BPF_FS_MAGIC` (linux/magic.h): `statfs`'s type of a BPF file system.
const BPF_FS_MAGIC: u32 = 0xcafe4a11;

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
    unsafe { sys_bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    Ok(attr.retval)
}

/// The map element member of linux/bpf.h's `union bpf_attr`
/// (`BPF_MAP_GET_NEXT_KEY`: `key`, then `next_key`).
#[repr(C)]
#[derive(Default)]
struct NextKeyAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// linux/bpf.h's `struct bpf_map_info` up to `max_entries`. The kernel
/// writes at most `info_len` bytes.
#[repr(C)]
#[derive(Default)]
struct MapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

/// How many keys the map `map` holds, whatever its layout: aya walks only
/// maps whose key and value types it is given, and a map of an unknown
/// layout (another tcpr's) is counted, not read. At most its capacity: a
/// walk of a map that changes meanwhile may meet a key twice.
pub fn count_keys(map: BorrowedFd<'_>) -> io::Result<usize> {
    let map_fd = u32::try_from(map.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?;
    let mut info = MapInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: map_fd,
        info_len: size_of::<MapInfo>() as u32,
        info: &mut info as *mut MapInfo as u64,
    };
    // SAFETY: as in `tcx_link`: the kernel writes at most `info_len` bytes
    // of plain integers into `info`, live for the call.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    // The kernel copies the map's whole key into the buffers: sized from
    // what it said the key size is.
    let size = info.key_size as usize;
    let (mut key, mut next) = (vec![0u8; size.max(1)], vec![0u8; size.max(1)]);
    let mut count = 0;
    let mut first = true;
    loop {
        let mut attr = NextKeyAttr {
            map_fd,
            // Null for the first key.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            ..NextKeyAttr::default()
        };
        // SAFETY: `attr` is a valid, zero-padded `bpf_attr` map element
        // block of the size passed; `key` (when given) and `next` are live
        // buffers of the map's key size (read above; a map's key size
        // never changes), which the kernel reads and writes.
        match unsafe { sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
            Err(e) => return Err(e),
        }
        count += 1;
        if count >= info.max_entries as usize {
            return Ok(count);
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
}

/// The `info` member of linux/bpf.h's `union bpf_attr`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// linux/bpf.h's `struct bpf_link_info` up to its tcx member: `type`,
/// `id`, `prog_id`, then the union (8-byte aligned), whose tcx member is
/// `ifindex`, `attach_type`. The kernel writes at most `info_len` bytes.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    pad: u32,
    tcx_ifindex: u32,
    tcx_attach_type: u32,
}

/// A tcx link as the kernel describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcxLink {
    /// The link's id (unique while it exists).
    pub id: u32,
    /// Its program's id.
    pub prog_id: u32,
    /// The interface it is attached to; 0 once detached (its interface
    /// was removed).
    pub ifindex: u32,
}

/// What the kernel says of `link`, a tcx link (an error for any other).
pub fn tcx_link(link: BorrowedFd<'_>) -> io::Result<TcxLink> {
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(link.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?,
        info_len: size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    // SAFETY: `attr` is a valid `bpf_attr.info` of the size passed; the
    // kernel writes at most `info_len` bytes into `info`, which lives for
    // the call and is plain integers (any bit pattern is valid).
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    if info.link_type != BPF_LINK_TYPE_TCX {
        return Err(io::Error::other(format!(
            "not a tcx link (link type {})",
            info.link_type
        )));
    }
    Ok(TcxLink {
        id: info.id,
        prog_id: info.prog_id,
        ifindex: info.tcx_ifindex,
    })
}

/// Whether `dir` is on a BPF file system.
pub fn is_bpffs(dir: &std::path::Path) -> io::Result<bool> {
    let path = c_path(dir)?;
    // SAFETY: a zeroed `statfs` is valid (plain integers).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` writable, both for the call.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // `f_type`'s width and sign differ by architecture: compare the low
    // 32 bits, which hold the magic.
    Ok(st.f_type as u32 == BPF_FS_MAGIC)
}

/// Mounts a BPF file system (mode 0700) on `dir`, an existing directory.
pub fn mount_bpffs(dir: &std::path::Path) -> io::Result<()> {
    let path = c_path(dir)?;
    let (fstype, opts) = (c"bpf", c"mode=0700");
    // SAFETY: every pointer is a NUL-terminated string live for the call.
    let r = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            opts.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_OBJ_GET` (linux/bpf.h `enum bpf_cmd`).
const BPF_OBJ_GET: libc::c_long = 7;

/// The `obj` member of linux/bpf.h's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    pad: u32,
}

/// Opens the BPF object (map, program or link) pinned at `path`.
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..ObjAttr::default()
    };
    // SAFETY: `attr` is a valid, zero-padded `bpf_attr.obj` of the size
    // passed; the kernel reads the NUL-terminated `path`, live for the call.
    let r = unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor, owned from here.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as i32) })
}

/// Detaches the file system mounted on `dir` (`umount2(MNT_DETACH)`): gone
/// from the tree at once, freed once no mount namespace holds it.
pub fn unmount(dir: &std::path::Path) -> io::Result<()> {
    let path = c_path(dir)?;
    // SAFETY: `path` is a NUL-terminated string live for the call.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes an exclusive `flock` on `fd` (a file or directory), waiting for
/// it; released when every descriptor of that open file is closed.
pub fn lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<()> {
    super::flock(fd, super::Flock::Exclusive).map(|_| ())
}

/// `bpf(cmd, attr, sizeof attr)`: the call's result, or its errno.
///
/// # Safety
/// `attr` must be the member of linux/bpf.h's `union bpf_attr` that `cmd`
/// reads, zero beyond the fields set, and every pointer in it valid for
/// what the kernel does with it during the call.
unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller's contract: `attr` is a valid attribute block of
    // `size_of::<T>()` bytes for `cmd`.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// `path` as the C string a system call takes.
fn c_path(path: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("a path with a NUL byte"))
}
