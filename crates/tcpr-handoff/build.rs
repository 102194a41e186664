//! Compiles the protocol schema with protox and prost-build (no `protoc`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tcpr_handoff_v1.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
