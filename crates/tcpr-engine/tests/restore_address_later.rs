//! A connection the peer half-closed (CLOSE_WAIT, LAST_ACK, CLOSING) is
//! restored while its local address is NOT assigned on this host, as in
//! every address move (restore first, then move the address). The peer's
//! FIN must still be replayed into the socket, no RST may reach the peer,
//! and once the address arrives every byte flows both ways and the close
//! completes. IPv4, IPv6, and IPv4-mapped IPv6 (a dual-stack server's IPv4
//! client, whose packets are IPv4 on the wire).
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use tcpr_engine::{freeze, restore, FreezeOptions};
use tcpr_image::TcpState;

/// The three states where the peer's FIN must be replayed.
#[derive(Clone, Copy, Debug)]
enum PeerClosed {
    CloseWait,
    LastAck,
    Closing,
}

/// Addresses of one case: the server's (which goes away and comes back)
/// and the client's, both on `lo`, and where the server listens.
#[derive(Clone, Copy, Debug)]
struct Family {
    server: &'static str,
    client: &'static str,
    prefix: &'static str,
    listen: &'static str,
}

const V4: Family = Family {
    server: "10.9.0.1",
    client: "10.9.0.2",
    prefix: "32",
    listen: "10.9.0.1",
};
const V6: Family = Family {
    server: "fd00:9::1",
    client: "fd00:9::2",
    prefix: "128",
    listen: "fd00:9::1",
};
/// A dual-stack listener: the accepted socket is AF_INET6 with
/// `::ffff:10.9.0.x` addresses.
const MAPPED: Family = Family { listen: "::", ..V4 };

const CLIENT_MARK: i32 = 77;
const SERVER_MARK: i32 = 78;

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?}");
}

/// Adds `cidr` to `lo`, usable at once (IPv6 without duplicate detection).
fn add_addr(cidr: &str) {
    if cidr.contains(':') {
        ip(&["addr", "add", cidr, "dev", "lo", "nodad"]);
    } else {
        ip(&["addr", "add", cidr, "dev", "lo"]);
    }
    // The local route of an IPv6 address can follow the address itself.
    let addr = cidr.split('/').next().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let out = Command::new("ip")
            .args(["route", "get", addr])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).starts_with("local") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} never became local"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn nft(script: &str) {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft: {script}");
}

/// Drops every packet whose socket carries one of `marks` on output.
fn drop_marks(marks: &[i32]) {
    let mut script = String::from(
        "add table inet t\nadd chain inet t c { type filter hook output priority 0; }\nflush chain inet t c\n",
    );
    for m in marks {
        script += &format!("add rule inet t c meta mark {m} drop\n");
    }
    nft(&script);
}

fn set_mark(s: &TcpStream, mark: i32) {
    let v: libc::c_int = mark;
    // SAFETY: `v` is a valid int for the duration of the call; the fd is open.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_MARK: {}", std::io::Error::last_os_error());
}

/// A TCP connection from `src` (bound first, so it does not take the
/// server's address as its source) to `dst`.
fn connect_from(src: SocketAddr, dst: SocketAddr) -> TcpStream {
    fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as _,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is large and aligned enough.
                unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as _,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_storage is large and aligned enough.
                unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
    let fam = if src.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain call; the new fd is owned below.
    let fd = unsafe { libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let (ss, len) = sockaddr(src);
    // SAFETY: `ss` holds a valid sockaddr of `len` bytes.
    let r = unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
    assert_eq!(r, 0, "bind {src}: {}", std::io::Error::last_os_error());
    let (ss, len) = sockaddr(dst);
    // SAFETY: `ss` holds a valid sockaddr of `len` bytes.
    let r = unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
    assert_eq!(r, 0, "connect {dst}: {}", std::io::Error::last_os_error());
    TcpStream::from(sock)
}

fn wait_state(s: &TcpStream, want: TcpState) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = tcpr_engine::inspect_socket(s.as_fd()).unwrap().1;
        if now == want.kernel_number() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "socket in state {now}, never reached {want}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn one_case(state: PeerClosed, fam: Family) {
    let label = format!("{state:?} {fam:?}");
    let server_cidr = format!("{}/{}", fam.server, fam.prefix);
    add_addr(&server_cidr);
    add_addr(&format!("{}/{}", fam.client, fam.prefix));
    let listen_ip: std::net::IpAddr = fam.listen.parse().unwrap();
    let l = TcpListener::bind(SocketAddr::new(listen_ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let mut client = connect_from(
        SocketAddr::new(fam.client.parse().unwrap(), 0),
        SocketAddr::new(fam.server.parse().unwrap(), port),
    );
    let (mut server, _) = l.accept().unwrap();
    drop(l);
    let client_words: &[u8] = b"the client's request, then its FIN";
    let server_words: &[u8] = b"the server's answer, then its FIN";
    match state {
        PeerClosed::CloseWait => {
            client.write_all(client_words).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            wait_state(&server, TcpState::CloseWait);
        }
        PeerClosed::LastAck => {
            client.write_all(client_words).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            wait_state(&server, TcpState::CloseWait);
            // The client acknowledges nothing: the server's FIN stays unacked.
            set_mark(&client, CLIENT_MARK);
            drop_marks(&[CLIENT_MARK]);
            server.write_all(server_words).unwrap();
            server.shutdown(std::net::Shutdown::Write).unwrap();
            wait_state(&server, TcpState::LastAck);
        }
        PeerClosed::Closing => {
            set_mark(&client, CLIENT_MARK);
            set_mark(&server, SERVER_MARK);
            drop_marks(&[CLIENT_MARK, SERVER_MARK]);
            server.write_all(server_words).unwrap();
            server.shutdown(std::net::Shutdown::Write).unwrap();
            client.write_all(client_words).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            // The client's data and FIN get through, not the server's.
            drop_marks(&[SERVER_MARK]);
            wait_state(&server, TcpState::Closing);
        }
    }
    let frozen = freeze(
        server.into(),
        &FreezeOptions {
            lock: false,
            ..Default::default()
        },
    )
    .unwrap();
    let img = frozen.dump().unwrap();
    assert!(img.state.peer_closed(), "{label}: {}", img.state);
    frozen.discard().unwrap();
    if fam.listen == "::" {
        assert!(
            img.local.to_string().starts_with("[::ffff:"),
            "{label}: {}",
            img.local
        );
    }

    // The service address leaves this host; the restore comes first.
    ip(&["addr", "del", &server_cidr, "dev", "lo"]);
    let mut restored = restore(&img)
        .and_then(|r| r.resume())
        .unwrap_or_else(|e| panic!("{label}: restore without the address: {e}"));
    assert_eq!(
        tcpr_engine::inspect_socket(restored.as_fd()).unwrap().1,
        match state {
            PeerClosed::CloseWait => TcpState::CloseWait,
            PeerClosed::LastAck | PeerClosed::Closing => TcpState::LastAck,
        }
        .kernel_number(),
        "{label}: the peer's FIN was taken"
    );
    // No rule or route of the delivery is left behind.
    for family in ["-4", "-6"] {
        let rules = Command::new("ip")
            .args([family, "rule", "show"])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(!rules.contains("fwmark"), "{label}: rule left: {rules}");
    }
    // Now the address arrives, and the blocked directions open.
    add_addr(&server_cidr);
    if !matches!(state, PeerClosed::CloseWait) {
        nft("delete table inet t\n");
    }
    let mut got = Vec::new();
    restored.read_to_end(&mut got).unwrap();
    assert_eq!(got, client_words, "{label}: the client's data, then EOF");
    if matches!(state, PeerClosed::CloseWait) {
        restored.write_all(server_words).unwrap();
        restored.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut got = Vec::new();
    // A RST from the server's side would fail this read (ECONNRESET).
    client
        .read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("{label}: client read: {e}"));
    assert_eq!(got, server_words, "{label}: the server's data, then EOF");
}

fn all_families(state: PeerClosed) {
    for fam in [V4, V6, MAPPED] {
        in_private_netns(move || one_case(state, fam));
    }
}

#[test]
fn close_wait_restored_before_the_address_arrives() {
    all_families(PeerClosed::CloseWait);
}

#[test]
fn last_ack_restored_before_the_address_arrives() {
    all_families(PeerClosed::LastAck);
}

#[test]
fn closing_restored_before_the_address_arrives() {
    all_families(PeerClosed::Closing);
}
