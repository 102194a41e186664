//! Property tests: encode/decode round trips, and decoding never panics on
//! arbitrary or mutated bytes.
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use tcpr_image::*;

fn state() -> impl Strategy<Value = TcpState> {
    prop_oneof![
        Just(TcpState::Established),
        Just(TcpState::FinWait1),
        Just(TcpState::FinWait2),
        Just(TcpState::CloseWait),
        Just(TcpState::LastAck),
        Just(TcpState::Closing),
    ]
}

fn addrs() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![
        (any::<u32>(), 1u16.., any::<u32>(), 1u16..).prop_map(|(a, p, b, q)| (
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(b)), q)
        )),
        (any::<u128>(), 1u16.., any::<u128>(), 1u16.., any::<u32>()).prop_map(
            |(a, p, b, q, scope)| (
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(a), p, 0, scope)),
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(b), q, 0, scope))
            )
        ),
    ]
}

fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<T>> {
    proptest::option::of(s)
}

fn image() -> impl Strategy<Value = ConnectionImage> {
    (
        addrs(),
        state(),
        any::<(u32, u32, u32)>(),
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(any::<u8>(), 0..300),
        (
            1u16..,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u8..=14,
            0u8..=14,
        ),
        any::<(u32, u32, u32, u32, u32)>(),
        (
            opt(any::<bool>()),
            opt(any::<u32>()),
            opt("[a-z]{1,15}"),
            opt(any::<u32>()),
            opt(0u32..=3),
        ),
        proptest::collection::vec(any::<u8>(), 0..100),
        any::<u64>(),
    )
        .prop_map(
            |((local, peer), state, (s, r, ts), rq, sent, unsent, o, w, so, blob, at)| {
                let (mss, sack, timestamps, ws, snd, rcv) = o;
                ConnectionImage {
                    local,
                    peer,
                    state,
                    send_seq: Seq(s),
                    recv_seq: Seq(r),
                    recv_queue: rq,
                    send_queue: SendQueue { sent, unsent },
                    options: TcpOptions {
                        mss,
                        sack,
                        timestamps,
                        window_scaling: ws,
                        snd_wscale: if ws { snd } else { 0 },
                        rcv_wscale: if ws { rcv } else { 0 },
                    },
                    window: RepairWindow {
                        snd_wl1: w.0,
                        snd_wnd: w.1,
                        max_window: w.2,
                        rcv_wnd: w.3,
                        rcv_wup: w.4,
                    },
                    timestamp: ts,
                    socket_options: SocketOptions {
                        nodelay: so.0,
                        keepalive: so.0.map(|b| !b),
                        user_timeout_ms: so.1,
                        congestion: so.2,
                        mark: so.3,
                        buf_lock: so.4,
                        ..SocketOptions::default()
                    },
                    app_blob: blob,
                    dumped_at_unix_ns: at,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip(img in image()) {
        let bytes = img.encode().unwrap();
        prop_assert_eq!(ConnectionImage::decode(&bytes).unwrap(), img.clone());
        // And in a stream of two.
        let two = [bytes.clone(), bytes].concat();
        let (a, rest) = ConnectionImage::decode_prefix(&two).unwrap();
        let (b, rest) = ConnectionImage::decode_prefix(rest).unwrap();
        prop_assert!(rest.is_empty());
        prop_assert_eq!(&a, &img);
        prop_assert_eq!(&b, &img);
        // The JSON view always has the documented fields.
        let v = to_json(&img, true);
        for f in ["local", "peer", "state", "send_seq", "recv_seq", "send_queue_len", "unsent_len",
                  "recv_queue_len", "mss", "snd_wscale", "rcv_wscale", "sack", "timestamps", "window"] {
            prop_assert!(v.get(f).is_some(), "missing {}", f);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = ConnectionImage::decode(&bytes);
    }

    #[test]
    fn any_single_corruption_is_caught(img in image(), pos in any::<prop::sample::Index>(), flip in 1u8..) {
        let mut bytes = img.encode().unwrap();
        let i = pos.index(bytes.len());
        bytes[i] ^= flip;
        // Every changed byte is caught: in the header by the magic,
        // version, reserved and length checks, in the CRC field or the body
        // by the CRC (CRC-32 detects every error burst up to 32 bits).
        let got = ConnectionImage::decode(&bytes);
        prop_assert!(got.is_err(), "byte {} ^ {:#04x} went unnoticed: {:?}", i, flip, got);
    }

    #[test]
    fn any_truncation_is_an_error(img in image(), cut in any::<prop::sample::Index>()) {
        let bytes = img.encode().unwrap();
        let n = cut.index(bytes.len());
        prop_assert!(ConnectionImage::decode(&bytes[..n]).is_err());
    }

    /// A well-sealed body that is not a valid image is refused by the body
    /// decoder (the envelope is fine), never panics.
    #[test]
    fn sealed_garbage_is_refused(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let bytes = format::seal(&body).unwrap();
        let got = ConnectionImage::decode(&bytes);
        prop_assert!(
            matches!(got, Err(ImageError::Malformed | ImageError::Invalid(_))),
            "a sealed {}-byte garbage body: {:?}", body.len(), got
        );
    }
}

/// Every file of the fuzz seed corpus (and the regressions kept there)
/// goes through the decoder without a panic; the valid ones round-trip.
#[test]
fn seed_corpus_decodes_without_panic() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/seeds/decode_image");
    let mut n = 0;
    let mut valid = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        if let Ok(img) = ConnectionImage::decode(&bytes) {
            assert_eq!(
                ConnectionImage::decode(&img.encode().unwrap()).unwrap(),
                img
            );
            valid += 1;
        }
        n += 1;
    }
    assert!(
        n >= 5 && valid >= 2,
        "seed corpus present: {n} files, {valid} valid"
    );
}
