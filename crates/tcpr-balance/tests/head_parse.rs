//! The request-head parsers on real heads (captured from curl and `openssl
//! s_client`, written live by rustls), on every byte split of them, on
//! hand-made bad ones, and on arbitrary bytes.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use tcpr_balance::config::Protocol;
use tcpr_balance::head::{self, http_error_response, tls_alert, Head, HeadError};

const MAX: usize = 16_384;

fn http(bytes: &[u8]) -> Result<Head, HeadError> {
    head::parse(Protocol::Http, bytes, MAX)
}

fn tls(bytes: &[u8]) -> Result<Head, HeadError> {
    head::parse(Protocol::Tls, bytes, MAX)
}

fn http_head(method: &str, path: &str, host: Option<&str>) -> Head {
    Head::Http {
        method: method.into(),
        path: path.into(),
        host: host.map(String::from),
    }
}

fn tls_head(sni: Option<&str>, alpn: &[&str]) -> Head {
    Head::Tls {
        sni: sni.map(String::from),
        alpn: alpn.iter().map(|name| name.to_string()).collect(),
    }
}

fn malformed(result: Result<Head, HeadError>) -> String {
    match result {
        Err(HeadError::Malformed(why)) => why,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

/// Every strict prefix of `bytes[..end]` is Incomplete and `bytes` gives
/// `expected`.
fn assert_every_split(protocol: Protocol, bytes: &[u8], end: usize, expected: &Head) {
    for cut in 0..end {
        assert_eq!(
            head::parse(protocol, &bytes[..cut], MAX),
            Err(HeadError::Incomplete),
            "prefix of {cut} bytes"
        );
    }
    assert_eq!(head::parse(protocol, bytes, MAX).as_ref(), Ok(expected));
}

// ---------------------------------------------------------------- HTTP/1.x

#[test]
fn curl_get_with_host_port_and_query() {
    let bytes = include_bytes!("fixtures/curl-http-get.bin");
    let expected = http_head("GET", "/api/v1/items?x=1", Some("api.shop.example"));
    assert_every_split(Protocol::Http, bytes, bytes.len(), &expected);
}

#[test]
fn curl_post_with_a_body_after_the_head() {
    let bytes = include_bytes!("fixtures/curl-http-post.bin");
    let head_end = bytes
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap()
        + 4;
    assert!(head_end < bytes.len(), "the fixture has a body");
    let expected = http_head("POST", "/submit", Some("127.0.0.1"));
    assert_every_split(Protocol::Http, bytes, head_end, &expected);
}

#[test]
fn host_header_name_is_case_insensitive_and_value_lowercased() {
    assert_eq!(
        http(b"GET / HTTP/1.1\r\nX-A: b\r\nhOsT:  WWW.Example.  \r\n\r\n"),
        Ok(http_head("GET", "/", Some("www.example")))
    );
    assert_eq!(
        http(b"GET / HTTP/1.1\r\nHost: [FD00::1]:8080\r\n\r\n"),
        Ok(http_head("GET", "/", Some("fd00::1")))
    );
    assert_eq!(
        http(b"GET / HTTP/1.1\r\nHost: 10.0.0.100\r\n\r\n"),
        Ok(http_head("GET", "/", Some("10.0.0.100")))
    );
}

#[test]
fn absolute_form_host_wins_over_the_host_header() {
    // RFC 9112 §3.2.2.
    assert_eq!(
        http(b"GET http://Abs.Example:8080/x/y?z=1 HTTP/1.1\r\nHost: other.example\r\n\r\n"),
        Ok(http_head("GET", "/x/y?z=1", Some("abs.example")))
    );
    assert_eq!(
        http(b"GET https://abs.example HTTP/1.1\r\n\r\n"),
        Ok(http_head("GET", "/", Some("abs.example")))
    );
    assert_eq!(
        http(b"GET http://abs.example?q HTTP/1.1\r\n\r\n"),
        Ok(http_head("GET", "/?q", Some("abs.example")))
    );
    assert!(
        malformed(http(b"GET http://user@abs.example/ HTTP/1.1\r\n\r\n"))
            .contains("request target")
    );
    assert!(malformed(http(b"GET nonsense HTTP/1.1\r\n\r\n")).contains("request target"));
}

#[test]
fn no_host_asterisk_and_connect() {
    assert_eq!(
        http(b"GET /old HTTP/1.0\r\n\r\n"),
        Ok(http_head("GET", "/old", None))
    );
    assert_eq!(
        http(b"GET / HTTP/1.1\r\nHost:\r\n\r\n"),
        Ok(http_head("GET", "/", None))
    );
    assert_eq!(
        http(b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n"),
        Ok(http_head("OPTIONS", "*", Some("a.example")))
    );
    assert_eq!(
        http(b"CONNECT Tunnel.Example:443 HTTP/1.1\r\nHost: tunnel.example:443\r\n\r\n"),
        Ok(http_head(
            "CONNECT",
            "Tunnel.Example:443",
            Some("tunnel.example")
        ))
    );
}

#[test]
fn two_host_headers_or_a_bad_one_are_malformed() {
    // RFC 9112 §3.2: the backend would answer 400; routing by one of them
    // would let a client pick its backend.
    assert_eq!(
        malformed(http(
            b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\n\r\n"
        )),
        "more than one Host header field"
    );
    for value in [
        "a b",
        "a.example:80:80",
        "a.example:http",
        "fd00::1",
        "[fd00::1",
        "a/b",
        "a..b",
    ] {
        let bytes = format!("GET / HTTP/1.1\r\nHost: {value}\r\n\r\n");
        assert!(
            malformed(http(bytes.as_bytes())).starts_with("bad Host"),
            "{value}"
        );
    }
}

#[test]
fn http2_prior_knowledge_is_malformed_and_says_so() {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    assert_eq!(
        malformed(http(preface)),
        "HTTP/2 prior-knowledge preface (PRI * HTTP/2.0): this listener reads HTTP/1.x only"
    );
}

#[test]
fn garbage_is_malformed_at_once() {
    let hello = include_bytes!("fixtures/curl-sni-alpn.bin");
    assert!(malformed(http(&hello[..3])).starts_with("HTTP/1.x"));
    assert!(malformed(http(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")).starts_with("HTTP/1.x"));
    assert!(malformed(http(b"GET / HTTP/3.0\r\n\r\n")).starts_with("HTTP/1.x"));
}

#[test]
fn too_many_header_fields() {
    let mut bytes = b"GET / HTTP/1.1\r\n".to_vec();
    for index in 0..=head::http::MAX_HEADER_FIELDS {
        bytes.extend_from_slice(format!("X-{index}: v\r\n").as_bytes());
    }
    bytes.extend_from_slice(b"\r\n");
    assert_eq!(
        malformed(http(&bytes)),
        format!("more than {} header fields", head::http::MAX_HEADER_FIELDS)
    );
}

#[test]
fn a_head_longer_than_max_head_bytes_is_too_large() {
    let max = 256;
    let long = format!(
        "GET / HTTP/1.1\r\nHost: a.example\r\nCookie: {}\r\n\r\n",
        "x".repeat(300)
    );
    let bytes = long.as_bytes();
    assert_eq!(
        head::parse(Protocol::Http, &bytes[..max - 1], max),
        Err(HeadError::Incomplete)
    );
    assert_eq!(
        head::parse(Protocol::Http, &bytes[..max], max),
        Err(HeadError::TooLarge)
    );
    assert_eq!(
        head::parse(Protocol::Http, bytes, max),
        Err(HeadError::TooLarge)
    );
    // A head that ends exactly at the limit is fine, body or not.
    let exact = format!(
        "GET / HTTP/1.1\r\nHost: a.example\r\nCookie: {}\r\n\r\n",
        "x".repeat(max - 45)
    );
    assert_eq!(exact.len(), max);
    let with_body = format!("{exact}body bytes past the limit");
    assert_eq!(
        head::parse(Protocol::Http, with_body.as_bytes(), max),
        Ok(http_head("GET", "/", Some("a.example")))
    );
}

#[test]
fn tcp_reads_nothing() {
    assert_eq!(head::parse(Protocol::Tcp, b"", MAX), Ok(Head::Tcp));
}

#[test]
fn error_responses_are_whole_http_responses_that_close() {
    for (status, expected) in [
        (400, 400),
        (404, 404),
        (408, 408),
        (431, 431),
        (502, 502),
        (503, 503),
        (999, 500),
    ] {
        let bytes = http_error_response(status);
        let mut fields = [httparse::EMPTY_HEADER; 8];
        let mut response = httparse::Response::new(&mut fields);
        let parsed = response.parse(bytes).unwrap();
        assert_eq!(
            parsed,
            httparse::Status::Complete(bytes.len()),
            "{status}: nothing after the head"
        );
        assert_eq!(response.code, Some(expected));
        let field = |name: &str| {
            response
                .headers
                .iter()
                .find(|field| field.name.eq_ignore_ascii_case(name))
                .map(|field| field.value)
        };
        assert_eq!(field("Connection"), Some(&b"close"[..]));
        assert_eq!(field("Content-Length"), Some(&b"0"[..]));
    }
}

// ------------------------------------------------------------------- TLS

#[test]
fn openssl_tls13_hello_with_sni_and_alpn() {
    let bytes = include_bytes!("fixtures/openssl-tls13-sni-alpn.bin");
    let expected = tls_head(Some("a.example"), &["h2", "http/1.1"]);
    assert_every_split(Protocol::Tls, bytes, bytes.len(), &expected);
}

#[test]
fn openssl_tls12_hello_lowercases_the_sni() {
    let bytes = include_bytes!("fixtures/openssl-tls12-sni.bin");
    assert_every_split(
        Protocol::Tls,
        bytes,
        bytes.len(),
        &tls_head(Some("b.example"), &[]),
    );
}

#[test]
fn openssl_hello_without_sni() {
    let bytes = include_bytes!("fixtures/openssl-no-sni.bin");
    assert_every_split(Protocol::Tls, bytes, bytes.len(), &tls_head(None, &[]));
}

#[test]
fn curl_hello_padded_to_512_bytes() {
    let bytes = include_bytes!("fixtures/curl-sni-alpn.bin");
    let expected = tls_head(Some("www.shop.example"), &["h2", "http/1.1"]);
    assert_every_split(Protocol::Tls, bytes, bytes.len(), &expected);
}

/// A ClientHello as rustls writes it.
fn rustls_hello(server_name: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|name| name.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut bytes = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut bytes).unwrap();
    }
    bytes
}

#[test]
fn rustls_hello_with_sni_and_alpn() {
    let bytes = rustls_hello("Rustls.Example", &[b"h2", b"http/1.1", b"acme-tls/1"]);
    let expected = tls_head(Some("rustls.example"), &["h2", "http/1.1", "acme-tls/1"]);
    assert_every_split(Protocol::Tls, &bytes, bytes.len(), &expected);
    // rustls sends no SNI for an IP address (RFC 6066 §3).
    let bytes = rustls_hello("10.0.0.100", &[]);
    assert_eq!(tls(&bytes), Ok(tls_head(None, &[])));
}

/// `stream`'s single handshake record cut into records of at most
/// `fragment` bytes of handshake each (RFC 8446 §5.1 allows any split).
fn refragment(stream: &[u8], fragment: usize) -> Vec<u8> {
    let length = usize::from(u16::from_be_bytes([stream[3], stream[4]]));
    let handshake = &stream[5..5 + length];
    let mut out = Vec::new();
    for piece in handshake.chunks(fragment) {
        out.extend_from_slice(&stream[..3]);
        out.extend_from_slice(&u16::try_from(piece.len()).unwrap().to_be_bytes());
        out.extend_from_slice(piece);
    }
    out
}

#[test]
fn a_hello_split_over_many_records() {
    let bytes = include_bytes!("fixtures/openssl-tls13-sni-alpn.bin");
    let expected = tls_head(Some("a.example"), &["h2", "http/1.1"]);
    for fragment in [1, 2, 3, 4, 5, 7, 100, 300] {
        let split = refragment(bytes, fragment);
        assert_every_split(Protocol::Tls, &split, split.len(), &expected);
    }
}

#[test]
fn sslv2_http_and_other_records_are_malformed_at_the_first_byte() {
    // An SSL 2 compatible ClientHello (RFC 6101 appendix E.2).
    let sslv2 = [0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15];
    assert_eq!(
        malformed(tls(&sslv2[..1])),
        "TLS ClientHello: SSL 2 record (not supported)"
    );
    assert_eq!(
        malformed(tls(b"G")),
        "TLS ClientHello: not a TLS handshake record (first byte 0x47)"
    );
    assert_eq!(
        malformed(tls(&tls_alert(head::ALERT_INTERNAL_ERROR))),
        "TLS ClientHello: not a TLS handshake record (first byte 0x15)"
    );
    assert_eq!(
        malformed(tls(&[22, 2])),
        "TLS ClientHello: record version major 2"
    );
    assert_eq!(
        malformed(tls(&[22, 3, 1, 0, 0])),
        "TLS ClientHello: record length 0"
    );
    assert_eq!(
        malformed(tls(&[22, 3, 1, 0x40, 1])),
        "TLS ClientHello: record length 16385"
    );
    assert_eq!(
        malformed(tls(&[22, 3, 1, 0, 4, 2, 0, 0, 0])),
        "TLS ClientHello: first handshake message is type 2, not ClientHello"
    );
    // A second record that is not a handshake record.
    let bytes = include_bytes!("fixtures/openssl-no-sni.bin");
    let mut split = refragment(bytes, 100);
    split[105] = 23;
    assert_eq!(
        malformed(tls(&split)),
        "TLS ClientHello: record of content type 23 inside the ClientHello"
    );
}

#[test]
fn a_hello_longer_than_max_head_bytes_is_too_large_once_its_length_is_known() {
    let bytes = include_bytes!("fixtures/curl-sni-alpn.bin");
    let max = 256;
    // Record header (5) and handshake header (4) give the length.
    assert_eq!(
        head::parse(Protocol::Tls, &bytes[..8], max),
        Err(HeadError::Incomplete)
    );
    assert_eq!(
        head::parse(Protocol::Tls, &bytes[..9], max),
        Err(HeadError::TooLarge)
    );
    assert_eq!(
        head::parse(Protocol::Tls, bytes, max),
        Err(HeadError::TooLarge)
    );
    // Exactly at the limit is fine.
    let expected = tls_head(Some("www.shop.example"), &["h2", "http/1.1"]);
    assert_eq!(head::parse(Protocol::Tls, bytes, bytes.len()), Ok(expected));
    assert_eq!(
        head::parse(Protocol::Tls, bytes, bytes.len() - 1),
        Err(HeadError::TooLarge)
    );
    // Split in records, the overhead counts too.
    let split = refragment(bytes, 64);
    assert_eq!(
        head::parse(Protocol::Tls, &split, bytes.len()),
        Err(HeadError::TooLarge)
    );
}

/// A ClientHello record with these extensions, built by hand.
fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    let mut block = Vec::new();
    for (extension_type, data) in extensions {
        block.extend_from_slice(&extension_type.to_be_bytes());
        block.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        block.extend_from_slice(data);
    }
    body.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&block);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&u16::try_from(handshake.len()).unwrap().to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// server_name extension data with these (type, name) entries.
fn server_names(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (name_type, name) in entries {
        list.push(*name_type);
        list.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    data
}

#[test]
fn hand_made_hellos() {
    const SNI: u16 = 0;
    const ALPN: u16 = 16;
    assert_eq!(
        tls(&hello_with(&[(
            SNI,
            server_names(&[(0, b"Trailing.Dot.")])
        )])),
        Ok(tls_head(Some("trailing.dot"), &[]))
    );
    // Unknown name types are skipped; unknown extensions too.
    assert_eq!(
        tls(&hello_with(&[
            (0xfe0d, vec![1, 2, 3]),
            (SNI, server_names(&[(9, b"x"), (0, b"a.example")]))
        ])),
        Ok(tls_head(Some("a.example"), &[]))
    );
    for (extensions, why) in [
        (
            vec![
                (SNI, server_names(&[(0, b"a.example")])),
                (SNI, server_names(&[(0, b"b.example")])),
            ],
            "extension 0 twice",
        ),
        (
            vec![(SNI, server_names(&[(0, b"a.example"), (0, b"b.example")]))],
            "two host names in server_name",
        ),
        (
            vec![(SNI, server_names(&[(0, b"bad name")]))],
            "bad server name \"bad name\"",
        ),
        (vec![(SNI, server_names(&[]))], "bad server_name extension"),
        (vec![(SNI, vec![0, 9, 0])], "server_name truncated"),
        (
            vec![(SNI, vec![0, 3, 0, 0, 9])],
            "server_name list truncated",
        ),
        (
            vec![(ALPN, vec![0, 3, 2, b'h', b'2', 0])],
            "bad ALPN extension",
        ),
        (vec![(ALPN, vec![0, 1, 0])], "empty ALPN protocol name"),
        (vec![(ALPN, vec![0, 2, 5, b'x'])], "ALPN list truncated"),
    ] {
        assert_eq!(
            malformed(tls(&hello_with(&extensions))),
            format!("TLS ClientHello: {why}")
        );
    }
    // A hello may stop before the extensions (RFC 5246 §7.4.1.2).
    let mut bare = hello_with(&[]);
    bare.truncate(bare.len() - 2);
    bare[4] -= 2;
    bare[8] -= 2;
    assert_eq!(tls(&bare), Ok(tls_head(None, &[])));
}

#[test]
fn alerts_are_fatal_tls_records() {
    assert_eq!(
        tls_alert(head::ALERT_UNRECOGNIZED_NAME),
        [21, 3, 3, 0, 2, 2, 112]
    );
}

// -------------------------------------------------------------- properties

/// What the fuzz targets check: never `Incomplete` once the limit is
/// reached, and an answer other than `Incomplete` does not change when more
/// bytes arrive.
fn check_final_answers(protocol: Protocol, bytes: &[u8]) {
    for max in [256, MAX] {
        let whole = head::parse(protocol, bytes, max);
        if bytes.len() >= max {
            assert_ne!(whole, Err(HeadError::Incomplete));
        }
        for cut in 0..bytes.len() {
            let prefix = head::parse(protocol, &bytes[..cut], max);
            if prefix != Err(HeadError::Incomplete) {
                assert_eq!(prefix, whole, "after {cut} of {} bytes", bytes.len());
            }
        }
    }
}

/// The fuzz seeds (and any crash input added to them) on stable Rust.
#[test]
fn fuzz_seeds_keep_their_answers() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    for (folder, protocol) in [("http_head", Protocol::Http), ("tls_head", Protocol::Tls)] {
        let mut count = 0;
        for entry in std::fs::read_dir(seeds.join(folder)).unwrap() {
            check_final_answers(protocol, &std::fs::read(entry.unwrap().path()).unwrap());
            count += 1;
        }
        assert!(count >= 5, "{folder} has {count} seeds");
    }
}

/// A valid HTTP/1.1 head: method, origin-form path, Host, more fields.
fn arbitrary_http_head() -> impl Strategy<Value = (Vec<u8>, Head)> {
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"]),
        "/[a-zA-Z0-9/._~%-]{0,40}(\\?[a-z0-9=&]{0,20})?",
        prop::option::of((
            "[a-zA-Z][a-zA-Z0-9-]{0,10}(\\.[a-zA-Z0-9-]{1,10}){0,3}",
            prop::option::of(1u16..),
        )),
        prop::collection::vec(("X-[A-Za-z]{1,10}", "[ -~]{0,30}"), 0..6),
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(method, path, host, fields, body)| {
            let mut text = format!("{method} {path} HTTP/1.1\r\n");
            for (name, value) in &fields {
                text.push_str(&format!("{name}: {}\r\n", value.trim()));
            }
            if let Some((name, port)) = &host {
                match port {
                    Some(port) => text.push_str(&format!("Host: {name}:{port}\r\n")),
                    None => text.push_str(&format!("Host: {name}\r\n")),
                }
            }
            text.push_str("\r\n");
            let mut bytes = text.into_bytes();
            bytes.extend_from_slice(&body);
            let head = http_head(
                method,
                &path,
                host.as_ref()
                    .map(|(name, _)| name.to_ascii_lowercase())
                    .as_deref(),
            );
            (bytes, head)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_split_of_an_http_head_is_incomplete_then_the_same_head((bytes, expected) in arbitrary_http_head()) {
        let end = bytes.windows(4).position(|window| window == b"\r\n\r\n").unwrap() + 4;
        for cut in 0..end {
            prop_assert_eq!(http(&bytes[..cut]), Err(HeadError::Incomplete));
        }
        for cut in end..=bytes.len() {
            prop_assert_eq!(http(&bytes[..cut]), Ok(expected.clone()));
        }
    }

    #[test]
    fn every_split_of_a_refragmented_rustls_hello(
        name in "[a-z][a-z0-9]{0,20}(\\.[a-z][a-z0-9]{0,20}){1,3}",
        alpn in prop::collection::vec("[a-z0-9/.-]{1,12}", 0..4),
        fragment in 1usize..600,
    ) {
        let alpn_bytes: Vec<&[u8]> = alpn.iter().map(|name| name.as_bytes()).collect();
        let bytes = refragment(&rustls_hello(&name, &alpn_bytes), fragment);
        let names: Vec<&str> = alpn.iter().map(String::as_str).collect();
        let expected = tls_head(Some(&name), &names);
        for cut in 0..bytes.len() {
            prop_assert_eq!(tls(&bytes[..cut]), Err(HeadError::Incomplete));
        }
        prop_assert_eq!(tls(&bytes), Ok(expected));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_wait_past_the_limit(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        max in 256usize..1024,
    ) {
        for protocol in [Protocol::Http, Protocol::Tls] {
            let result = head::parse(protocol, &bytes, max);
            if bytes.len() >= max {
                prop_assert_ne!(result.clone(), Err(HeadError::Incomplete));
            }
            let prefix = head::parse(protocol, &bytes[..bytes.len() / 2], max);
            if prefix != Err(HeadError::Incomplete) {
                prop_assert_eq!(prefix, result);
            }
        }
    }

    #[test]
    fn mutated_real_hellos_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        for fixture in [
            &include_bytes!("fixtures/openssl-tls13-sni-alpn.bin")[..],
            &include_bytes!("fixtures/curl-sni-alpn.bin")[..],
        ] {
            let mut bytes = fixture.to_vec();
            for (index, value) in &flips {
                let at = index.index(bytes.len());
                bytes[at] = *value;
            }
            let cut = cut.index(bytes.len() + 1);
            let _ = tls(&bytes[..cut]);
            let _ = head::parse(Protocol::Tls, &bytes[..cut], 256);
        }
    }
}
