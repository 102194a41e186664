//! Writes the fuzz seed corpus: `cargo run -p tcpr-image --example write_seeds DIR`.
use tcpr_image::{ConnectionImage, TcpState};

fn main() {
    let dir = std::env::args().nth(1).expect("usage: write_seeds DIR");
    let mut v6 = ConnectionImage::example();
    v6.local = "[fd00::1]:443".parse().unwrap();
    v6.peer = "[fd00::2]:50000".parse().unwrap();
    v6.state = TcpState::LastAck;
    v6.app_blob = b"application state".to_vec();
    let ex = ConnectionImage::example().encode().unwrap();
    let mut bad_version = ex.clone();
    bad_version[5] = 9;
    let mut bad_crc = ex.clone();
    bad_crc[20] ^= 1;
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("example-v4", ex.clone()),
        ("example-v6-last-ack", v6.encode().unwrap()),
        ("two-images", [ex.clone(), v6.encode().unwrap()].concat()),
        ("bad-version", bad_version),
        ("bad-checksum", bad_crc),
        ("header-only", ex[..16].to_vec()),
        ("empty", vec![]),
    ];
    for (name, bytes) in seeds {
        std::fs::write(format!("{dir}/{name}.bin"), bytes).unwrap();
    }
}
