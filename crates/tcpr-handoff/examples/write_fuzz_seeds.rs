//! Writes the seed corpora of the handoff's fuzz targets, from frames
//! encoded by the real encoders:
//! `cargo run -p tcpr-handoff --example write_fuzz_seeds fuzz/seeds`.
use std::sync::Arc;
use tcpr_handoff::fuzzing::{frame, prepare_frame, status_frame, unix_message};
use tcpr_handoff::machine::{BatchStatus, Msg, ServiceAddress};
use tcpr_handoff::wire::{self, pb};
use tcpr_image::{ConnectionImage, TcpState};

fn raw(kind: pb::message::Kind) -> Vec<u8> {
    let mut out = vec![];
    wire::write_msg(&mut out, &pb::Message { kind: Some(kind) }).unwrap();
    out
}

fn hello(batch: u64, total: u32) -> Vec<u8> {
    frame(&Msg::Hello { batch, total })
}

/// The first byte of a `sender_reads` input: how many connections (three
/// here) and whether dumps or the switch fail, or the address moves.
fn script(dumps_fail: bool, switch_fails: bool, moves_address: bool) -> u8 {
    const THREE_CONNECTIONS: u8 = 2 << 3;
    THREE_CONNECTIONS
        | u8::from(dumps_fail)
        | u8::from(switch_fails) << 1
        | u8::from(moves_address) << 2
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: write_fuzz_seeds DIR");
    let v4 = ConnectionImage::example();
    let mut v6 = ConnectionImage::example();
    v6.local = "[fd00::1]:443".parse().unwrap();
    v6.peer = "[fd00::2]:50000".parse().unwrap();
    v6.state = TcpState::LastAck;
    v6.app_blob = b"application state".to_vec();
    let (v4, v6) = (v4.encode().unwrap(), v6.encode().unwrap());
    let service = Some(ServiceAddress {
        ip: [10, 0, 0, 100].into(),
        prefix_len: 24,
    });
    let ok = |ids: &[u32]| ids.iter().map(|&i| (i, Ok(()))).collect::<Vec<_>>();

    let agent: Vec<(&str, Vec<u8>)> = vec![
        (
            "batch-of-three-committed",
            [
                hello(7, 3),
                prepare_frame(&[(0, &v4), (1, &v4), (2, &v6)]),
                frame(&Msg::Commit {
                    ids: vec![0, 1, 2],
                    take_address: service,
                }),
            ]
            .concat(),
        ),
        (
            "two-prepares-one-bad-image",
            [
                hello(8, 2),
                prepare_frame(&[(0, &v4)]),
                prepare_frame(&[(1, &v6[..v6.len() / 2])]),
                frame(&Msg::Commit {
                    ids: vec![0],
                    take_address: None,
                }),
            ]
            .concat(),
        ),
        (
            "aborted-after-prepare",
            [
                hello(9, 1),
                prepare_frame(&[(0, &v4)]),
                frame(&Msg::Abort("switch failed".into())),
            ]
            .concat(),
        ),
        (
            "hello-taking-an-address",
            [
                raw(pb::message::Kind::Hello(pb::Hello {
                    version: wire::VERSION,
                    batch: 10,
                    total: 1,
                    take_address: "10.0.0.100".into(),
                })),
                prepare_frame(&[(0, &v4)]),
            ]
            .concat(),
        ),
        (
            "commit-before-ready",
            [
                hello(11, 2),
                frame(&Msg::Commit {
                    ids: vec![0, 1],
                    take_address: None,
                }),
            ]
            .concat(),
        ),
        (
            "query",
            raw(pb::message::Kind::Query(pb::Query { batch: 7 })),
        ),
        ("frame-cut-short", hello(12, 1)[..5].to_vec()),
        (
            "two-batches-on-one-channel",
            [
                hello(13, 1),
                prepare_frame(&[(0, &v4)]),
                frame(&Msg::Commit {
                    ids: vec![0],
                    take_address: None,
                }),
                raw(pb::message::Kind::Ping(pb::Ping { nonce: 1 })),
                hello(14, 2),
                prepare_frame(&[(0, &v6), (1, &v4)]),
                frame(&Msg::Commit {
                    ids: vec![0, 1],
                    take_address: None,
                }),
            ]
            .concat(),
        ),
    ];

    let sender: Vec<(&str, Vec<u8>)> = vec![
        (
            "all-moved",
            [
                vec![script(false, false, true)],
                frame(&Msg::Ready(ok(&[0, 1, 2]))),
                frame(&Msg::Committed(ok(&[0, 1, 2]))),
            ]
            .concat(),
        ),
        (
            "one-refused-one-not-dumped",
            [
                vec![script(true, false, false)],
                frame(&Msg::Ready(vec![
                    (0, Ok(())),
                    (2, Err("EADDRINUSE".into())),
                ])),
                frame(&Msg::Committed(ok(&[0]))),
            ]
            .concat(),
        ),
        (
            "commit-refused",
            [
                vec![script(false, false, true)],
                frame(&Msg::Ready(ok(&[0, 1, 2]))),
                frame(&Msg::CommitRefused("the address is not allowed".into())),
            ]
            .concat(),
        ),
        (
            "switch-failed",
            [
                vec![script(false, true, false)],
                frame(&Msg::Ready(ok(&[0, 1, 2]))),
            ]
            .concat(),
        ),
        (
            "lost-after-commit-query-committed",
            [
                vec![script(false, false, false)],
                frame(&Msg::Ready(ok(&[0, 1, 2]))),
                // Out of place inside a batch: the link is dropped, and
                // the Query's new channel answers with the next one.
                status_frame(7, &BatchStatus::Committed(vec![0, 2])),
                status_frame(7, &BatchStatus::Committed(vec![0, 2])),
            ]
            .concat(),
        ),
        (
            "lost-after-commit-query-not-resumed",
            [
                vec![script(false, false, false)],
                frame(&Msg::Ready(ok(&[0, 1, 2]))),
                // Out of place inside a batch: the link is dropped, and
                // the Query's new channel answers with the next one.
                status_frame(7, &BatchStatus::NotResumed),
                status_frame(7, &BatchStatus::NotResumed),
            ]
            .concat(),
        ),
        // Found by sender_reads: a COMMITTED naming a connection not
        // committed, after one that moved, left that one without a
        // Discard (its frozen copy was thawed while the agent ran it).
        (
            "regression-committed-naming-a-stranger-thawed-a-moved-connection",
            [
                vec![script(false, false, false)],
                frame(&Msg::Ready(ok(&[0, 1, 2]))),
                frame(&Msg::Committed(ok(&[0, 99]))),
                status_frame(7, &BatchStatus::Committed(vec![0, 1, 2])),
            ]
            .concat(),
        ),
        (
            "agent-aborts",
            [
                vec![script(false, false, false)],
                frame(&Msg::Abort("bad PREPARE".into())),
            ]
            .concat(),
        ),
    ];

    // A ClientHello as a sender opens with, for the agent's TLS server.
    let client_hello = {
        let auth = tcpr_handoff::Auth::Psk(Arc::new(b"seed-pre-shared-key".to_vec()));
        let name =
            rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
        let mut conn = rustls::ClientConnection::new(auth.client_config().unwrap(), name).unwrap();
        let mut out = vec![];
        conn.write_tls(&mut out).unwrap();
        out
    };
    const AGENT_BEFORE_TLS: u8 = 0;
    const AGENT_READS_MAC: u8 = 1;
    const SENDER_READS_MAC: u8 = 2;
    const MAC_LEN: usize = 32;
    let psk: Vec<(&str, Vec<u8>)> = vec![
        (
            "client-hello",
            [vec![AGENT_BEFORE_TLS], client_hello.clone()].concat(),
        ),
        (
            "client-hello-cut-short",
            [vec![AGENT_BEFORE_TLS], client_hello[..40].to_vec()].concat(),
        ),
        (
            "forged-client-mac",
            [vec![AGENT_READS_MAC], vec![0x5a; MAC_LEN]].concat(),
        ),
        (
            "short-client-mac",
            [vec![AGENT_READS_MAC], vec![0x5a; MAC_LEN / 2]].concat(),
        ),
        (
            "forged-client-mac-then-a-frame",
            [vec![AGENT_READS_MAC], vec![0; MAC_LEN], hello(7, 1)].concat(),
        ),
        (
            "forged-agent-mac",
            [vec![SENDER_READS_MAC], vec![0xa5; MAC_LEN]].concat(),
        ),
        ("agent-says-nothing", vec![SENDER_READS_MAC]),
    ];

    let local = "10.0.0.1:80".parse().unwrap();
    let peer = "10.0.0.2:40000".parse().unwrap();
    let one = unix_message(local, peer, b"application state");
    let unix: Vec<(&str, Vec<u8>)> = vec![
        ("one-connection", one.clone()),
        (
            "v6-no-blob",
            unix_message(
                "[fd00::1]:443".parse().unwrap(),
                "[fd00::2]:50000".parse().unwrap(),
                b"",
            ),
        ),
        ("two-connections", [one.clone(), one.clone()].concat()),
        ("cut-short", one[..one.len() - 3].to_vec()),
        ("header-only", one[..10].to_vec()),
        // A batch message of one connection (the one fd the fuzz target
        // attaches): "TCPR-FDN", the count, the entries' length, the entry
        // (a one-connection message's body).
        (
            "batch-of-one",
            [
                &b"TCPR-FDN"[..],
                &1u16.to_be_bytes(),
                &((one.len() - 8) as u32).to_be_bytes(),
                &one[8..],
            ]
            .concat(),
        ),
    ];

    for (target, seeds) in [
        ("agent_reads", agent),
        ("sender_reads", sender),
        ("psk_exchange", psk),
        ("unix_delivery", unix),
    ] {
        let dir = format!("{dir}/{target}");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(format!("{dir}/{name}.bin"), bytes).unwrap();
        }
    }
}
