//! Image decoding never panics, and whatever decodes re-encodes to an
//! image that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tcpr_image::ConnectionImage;

fuzz_target!(|data: &[u8]| {
    if let Ok((img, _rest)) = ConnectionImage::decode_prefix(data) {
        let again = ConnectionImage::decode(&img.encode().expect("a decoded image re-encodes"))
            .expect("re-encoded image decodes");
        assert_eq!(again, img);
    }
});
