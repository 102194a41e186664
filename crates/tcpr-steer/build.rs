//! Builds the BPF steering datapath (`bpf/steer.bpf.c`) with clang into
//! `$OUT_DIR/steer.bpf.o`, which `src/bpf.rs` embeds. A BPF program in
//! Rust needs a nightly compiler and bpf-linker; C with clang and libbpf's
//! headers (Debian: clang, libbpf-dev; `scripts/setup.sh` installs them) is
//! what libbpf-based projects build with.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/steer.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("steer.bpf.o");
    // The kernel's uapi headers include <asm/types.h>, which Debian keeps
    // under the target's multiarch directory.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .args(
            std::path::Path::new(&multiarch)
                .is_dir()
                .then(|| format!("-I{multiarch}")),
        )
        .args(["-c", src, "-o"])
        .arg(&obj)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} could not build {src} ({s})"),
        Err(e) => panic!(
            "cannot run {clang} ({e}): the BPF steering datapath is built with clang \
             and libbpf's headers (Debian packages clang, libbpf-dev; scripts/setup.sh installs them)"
        ),
    }
}
