//! Unit tests of the image codec that need its private parts.

use super::*;

#[test]
fn example_round_trips() {
    let img = ConnectionImage::example();
    assert_eq!(
        ConnectionImage::decode(&img.encode().unwrap()).unwrap(),
        img
    );
}

#[test]
fn seq_wraps() {
    assert_eq!(Seq(u32::MAX).forward(2), Seq(1));
    assert_eq!(Seq(1).back(2), Seq(u32::MAX));
}

/// The bytes `encode` would write without its checks.
fn sealed_unchecked(img: &ConnectionImage) -> Vec<u8> {
    use prost::Message;
    let mut pb = img.to_pb_without_data();
    pb.recv_queue = img.recv_queue.clone();
    pb.send_queue_sent = img.send_queue.sent.clone();
    pb.send_queue_unsent = img.send_queue.unsent.clone();
    pb.app_blob = img.app_blob.clone();
    format::seal(&pb.encode_to_vec()).unwrap()
}

#[test]
fn invalid_images_are_refused_by_encode_and_decode_alike() {
    let mut families = ConnectionImage::example();
    families.peer = "[::1]:5".parse().unwrap();
    let mut wscale = ConnectionImage::example();
    wscale.options.rcv_wscale = 15;
    let mut port = ConnectionImage::example();
    port.local.set_port(0);
    let mut buf_lock = ConnectionImage::example();
    buf_lock.socket_options.buf_lock = Some(4);
    for img in [families, wscale, port, buf_lock] {
        let refused = img.encode().unwrap_err();
        assert!(matches!(refused, ImageError::Invalid(_)), "{refused}");
        assert_eq!(
            ConnectionImage::decode(&sealed_unchecked(&img)),
            Err(refused)
        );
    }
}

#[test]
fn an_image_over_the_body_limit_is_refused_by_encode() {
    // Two 1 GiB queues: each within the invariants, together (with the
    // rest of the message) over MAX_BODY, which decode refuses. Zeroed
    // vectors are mapped lazily, so this costs no memory.
    let gib = 1usize << 30;
    let mut img = ConnectionImage::example();
    img.recv_queue = vec![0; gib];
    img.send_queue.sent = vec![0; gib];
    img.send_queue.unsent.clear();
    assert!(img.validate().is_ok());
    assert!(
        matches!(img.encode(), Err(ImageError::TooLarge(n)) if n > u64::from(format::MAX_BODY))
    );
}

#[test]
fn seal_refuses_a_body_over_the_limit_and_open_agrees_on_the_limit() {
    let over = vec![0u8; format::MAX_BODY as usize + 1];
    assert_eq!(
        format::seal(&over),
        Err(ImageError::TooLarge(u64::from(format::MAX_BODY) + 1))
    );
    // Past the length field's range: refused, not truncated or a panic.
    let huge = vec![0u8; (1usize << 32) + 1];
    assert!(matches!(format::seal(&huge), Err(ImageError::TooLarge(_))));
    // A header announcing one byte more than the limit is refused too.
    let mut header = format::seal(b"").unwrap();
    header[8..12].copy_from_slice(&(format::MAX_BODY + 1).to_be_bytes());
    assert_eq!(
        format::open(&header),
        Err(ImageError::TooLarge(u64::from(format::MAX_BODY) + 1))
    );
}
