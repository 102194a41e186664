//! Compiles the checked-in protobuf schema with protox (pure Rust: no system
//! `protoc` needed) and prost-build.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tcpr_image_v1.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
