//! What a freeze refuses before it changes anything, on the real kernel: a
//! socket that is frozen already (it may live on elsewhere), and sockets of
//! different network namespaces in one call (one lock transaction goes to
//! one namespace).
mod common;
use common::*;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;
use tcpr_engine::{
    freeze, freeze_many, freeze_with, is_frozen, lock::locked_flow_count, thaw_frozen, Error,
    FreezeOptions, IfFrozen,
};

#[test]
fn a_frozen_socket_is_refused_unless_taken() {
    in_private_netns(|| {
        let (mut c, s) = pair("127.0.0.1:0");
        let s: OwnedFd = s.into();
        let first = freeze(s.try_clone().unwrap(), &FreezeOptions::default()).unwrap();
        // As `tcpr dump` leaves it: frozen in the owner, locked for the lease.
        first.leave_frozen();
        assert!(is_frozen(s.as_fd()).unwrap());
        let err = freeze(s.try_clone().unwrap(), &FreezeOptions::default()).unwrap_err();
        assert!(matches!(err, Error::AlreadyFrozen { .. }), "{err}");
        let err = freeze_many(vec![s.try_clone().unwrap()], &FreezeOptions::default()).unwrap_err();
        assert!(matches!(err, Error::AlreadyFrozen { .. }), "{err}");
        assert_eq!(
            locked_flow_count().unwrap(),
            1,
            "the refusal changed no lock"
        );
        // Taken on purpose, then dropped: it stays frozen and locked.
        let again = freeze_with(
            s.try_clone().unwrap(),
            &FreezeOptions::default(),
            IfFrozen::Take,
        )
        .unwrap();
        again.dump().unwrap();
        drop(again);
        assert!(is_frozen(s.as_fd()).unwrap(), "a taken socket stays frozen");
        assert_eq!(locked_flow_count().unwrap(), 1);
        // Thawed: unlocked and carrying on in place, both ways.
        thaw_frozen(s.try_clone().unwrap()).unwrap();
        assert!(!is_frozen(s.as_fd()).unwrap());
        assert_eq!(locked_flow_count().unwrap(), 0);
        let mut server = std::net::TcpStream::from(s);
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        // Neither frozen nor locked: nothing to thaw.
        let err = thaw_frozen(server.into()).unwrap_err();
        assert!(matches!(err, Error::NotFrozen { .. }), "{err}");
    });
}

#[test]
fn sockets_of_two_namespaces_are_refused() {
    let in_ns = || {
        std::thread::spawn(|| {
            private_netns();
            let (c, s) = pair("127.0.0.1:0");
            (c, OwnedFd::from(s))
        })
        .join()
        .unwrap()
    };
    let (_c1, s1) = in_ns();
    let (_c2, s2) = in_ns();
    let probe = s1.try_clone().unwrap();
    let probe2 = s2.try_clone().unwrap();
    std::thread::spawn(move || {
        private_netns();
        let err = freeze_many(vec![s1, s2], &FreezeOptions::default()).unwrap_err();
        assert!(matches!(err, Error::MixedNamespaces { .. }), "{err}");
        assert!(
            err.to_string().contains("different network namespaces"),
            "{err}"
        );
    })
    .join()
    .unwrap();
    assert!(!is_frozen(probe.as_fd()).unwrap(), "nothing was frozen");
    assert!(!is_frozen(probe2.as_fd()).unwrap(), "nothing was frozen");
}
