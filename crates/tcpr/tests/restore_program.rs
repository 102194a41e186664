//! `tcpr restore` checks the program it hands the connection to before it
//! brings the connection to life: once resumed, a connection that no
//! program takes would end with a FIN (a cut-short stream that looks
//! complete) or a RST.

mod common;
use common::*;
use tcpr_image::ConnectionImage;
use tcpr_netlab::Lab;

#[test]
fn a_missing_program_is_refused_before_anything_is_restored() {
    let dir = tmpdir("noprog");
    let img = dir.join("x.img");
    std::fs::write(&img, ConnectionImage::example().encode().unwrap()).unwrap();
    let mut lab = Lab::new("np").unwrap();
    // The example image's local address, so the restore would succeed.
    let h = lab.host("h", &["10.0.0.1/24"]).unwrap();
    let cases = [
        ("tcpr-no-such-program", "not found in PATH"),
        ("/nonexistent/program", "no such executable file"),
    ];
    for (program, needle) in cases {
        let out = tcpr(Some(&h), &["restore", img.to_str().unwrap(), "--", program]);
        assert_clean_failure(&out, needle);
        let listed = tcpr(Some(&h), &["ls", "--json"]);
        assert!(
            listed.stdout.is_empty(),
            "no socket was restored: {}",
            String::from_utf8_lossy(&listed.stdout)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
