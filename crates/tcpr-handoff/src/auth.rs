//! The handoff channel: TLS 1.3 (rustls), mutually authenticated.
//!
//! - **Certificates**: each end presents a certificate signed by the CA the
//!   other trusts (the agent requires a client certificate).
//! - **Pre-shared key**: rustls has no external-PSK mode, so each end uses a
//!   throwaway self-signed certificate for encryption, and then both prove
//!   they hold the key by exchanging HMAC-SHA256(key, role ‖ exporter), where
//!   the exporter is keying material of *this* TLS session (RFC 5705/8446
//!   §7.5). A man in the middle holds two different sessions and cannot
//!   produce either MAC. The agent checks the client's MAC before it reads
//!   any frame, so an unauthenticated peer never gets an image read.

use hmac::{Hmac, Mac};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, ServerConfig,
    ServerConnection, StreamOwned,
};
use rustls_pki_types::pem::PemObject;
use sha2::Digest as _;
use sha2::Sha256;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// How the two ends prove who they are.
#[derive(Clone)]
pub enum Auth {
    /// A shared secret (at least 16 bytes).
    Psk(Arc<Vec<u8>>),
    /// Mutual TLS: our chain and key, and the CA we trust for the other end.
    Certs {
        /// Our certificate chain.
        chain: Vec<CertificateDer<'static>>,
        /// Our private key.
        key: Arc<PrivateKeyDer<'static>>,
        /// The CA for the other end.
        roots: Arc<RootCertStore>,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Psk(_) => f.write_str("Auth::Psk(..)"),
            Auth::Certs { .. } => f.write_str("Auth::Certs(..)"),
        }
    }
}

/// Why the channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// A key or certificate file is unusable.
    #[error("{0}")]
    Config(String),
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// The peer does not hold the pre-shared key.
    #[error("the peer failed pre-shared-key authentication")]
    BadKey,
    /// The peer accepted the connection and then did not answer in time
    /// (the socket's read timeout passed).
    #[error("no answer in time")]
    TimedOut,
}

/// A failed read or write of the client's handshake: a timeout is the peer's
/// silence, not a TLS failure.
fn client_handshake_error(e: std::io::Error) -> AuthError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => AuthError::TimedOut,
        _ => AuthError::Handshake(e.to_string()),
    }
}

/// A TLS stream, client or server side.
pub enum Channel {
    /// Our side connected.
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
    /// Our side accepted.
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Channel {
    /// The TCP socket underneath (for timeouts).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Channel::Client(s) => &s.sock,
            Channel::Server(s) => &s.sock,
        }
    }
    /// True when nothing waits to be read on the channel and the peer has
    /// not closed it: no record or alert held by TLS here, and the socket
    /// readable-empty (no byte, no FIN, no error). A channel kept between
    /// batches must be quiet: anything on it is a leftover or an end.
    pub fn is_quiet(&mut self) -> bool {
        let state = match self {
            Channel::Client(s) => s.conn.process_new_packets(),
            Channel::Server(s) => s.conn.process_new_packets(),
        };
        match state {
            Ok(io) if io.plaintext_bytes_to_read() == 0 && !io.peer_has_closed() => {}
            _ => return false,
        }
        peek_now(self.tcp()) == Waiting::Nothing
    }

    /// Closes the channel on purpose: a TLS close_notify, so that the
    /// peer reads a clean end rather than a cut, then the socket. Waits
    /// at most `timeout` for the socket to take the alert.
    pub fn close(mut self, timeout: std::time::Duration) {
        let _ = self.tcp().set_write_timeout(Some(timeout));
        let _ = match &mut self {
            Channel::Client(s) => {
                s.conn.send_close_notify();
                s.flush()
            }
            Channel::Server(s) => {
                s.conn.send_close_notify();
                s.flush()
            }
        };
    }

    fn exporter(&self) -> Result<[u8; 32], AuthError> {
        let r = match self {
            Channel::Client(s) => {
                s.conn
                    .export_keying_material([0u8; 32], b"EXPORTER-tcpr-psk-v1", None)
            }
            Channel::Server(s) => {
                s.conn
                    .export_keying_material([0u8; 32], b"EXPORTER-tcpr-psk-v1", None)
            }
        };
        r.map_err(|e| AuthError::Handshake(e.to_string()))
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Channel::Client(s) => s.read(buf),
            Channel::Server(s) => s.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Channel::Client(s) => s.write(buf),
            Channel::Server(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Channel::Client(s) => s.flush(),
            Channel::Server(s) => s.flush(),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(provider::default_provider())
}

impl Auth {
    /// A pre-shared key from a file (its bytes, surrounding whitespace
    /// trimmed; at least 16 bytes).
    pub fn psk_file(path: &Path) -> Result<Auth, AuthError> {
        let raw = std::fs::read(path).map_err(|e| {
            AuthError::Config(format!("cannot read the key file {}: {e}", path.display()))
        })?;
        let key = raw.trim_ascii().to_vec();
        if key.len() < 16 {
            return Err(AuthError::Config(format!(
                "the key in {} is {} bytes; at least 16 are needed",
                path.display(),
                key.len()
            )));
        }
        Ok(Auth::Psk(Arc::new(key)))
    }

    /// Mutual TLS from PEM files.
    pub fn cert_files(cert: &Path, key: &Path, ca: &Path) -> Result<Auth, AuthError> {
        let bad = |p: &Path, e: String| AuthError::Config(format!("{}: {e}", p.display()));
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(bad(cert, "no certificate in the file".into()));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(ca, e.to_string()))? {
            roots
                .add(c.map_err(|e| bad(ca, e.to_string()))?)
                .map_err(|e| bad(ca, e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad(ca, "no CA certificate in the file".into()));
        }
        Ok(Auth::Certs {
            chain,
            key: Arc::new(key_der),
            roots: Arc::new(roots),
        })
    }

    /// A digest of the credentials, SHA-256 over every field (the key, or
    /// the chain, the private key and each trusted root), each prefixed by
    /// its kind and length: equal for two `Auth` values only when they
    /// hold the same credentials, so that a channel authenticated with one
    /// is never used for the other.
    pub fn fingerprint(&self) -> [u8; 32] {
        fn field(h: &mut Sha256, bytes: &[u8]) {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        }
        let mut h = Sha256::new();
        match self {
            Auth::Psk(key) => {
                field(&mut h, b"psk");
                field(&mut h, key);
            }
            Auth::Certs { chain, key, roots } => {
                field(&mut h, b"certs");
                h.update((chain.len() as u64).to_be_bytes());
                for cert in chain {
                    field(&mut h, cert);
                }
                field(&mut h, key.secret_der());
                h.update((roots.roots.len() as u64).to_be_bytes());
                for root in &roots.roots {
                    field(&mut h, &root.subject);
                    field(&mut h, &root.subject_public_key_info);
                    match &root.name_constraints {
                        Some(constraints) => {
                            h.update([1]);
                            field(&mut h, constraints);
                        }
                        None => h.update([0]),
                    }
                }
            }
        }
        h.finalize().into()
    }

    fn ephemeral() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), AuthError> {
        let ck = rcgen::generate_simple_self_signed(vec!["tcpr-psk".to_string()])
            .map_err(|e| AuthError::Config(e.to_string()))?;
        let key = PrivateKeyDer::try_from(ck.key_pair.serialize_der())
            .map_err(|e| AuthError::Config(e.to_string()))?;
        Ok((vec![ck.cert.der().clone()], key))
    }

    /// The agent's TLS configuration.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, AuthError> {
        let b = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| AuthError::Config(e.to_string()))?;
        let cfg = match self {
            Auth::Psk(_) => {
                let (chain, key) = Self::ephemeral()?;
                b.with_no_client_auth().with_single_cert(chain, key)
            }
            Auth::Certs { chain, key, roots } => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.clone(),
                    provider(),
                )
                .build()
                .map_err(|e| AuthError::Config(e.to_string()))?;
                b.with_client_cert_verifier(verifier)
                    .with_single_cert(chain.clone(), key.clone_key())
            }
        };
        Ok(Arc::new(cfg.map_err(|e| AuthError::Config(e.to_string()))?))
    }

    /// The sender's TLS configuration.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, AuthError> {
        let b = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| AuthError::Config(e.to_string()))?;
        let cfg = match self {
            Auth::Psk(_) => b
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PskBoundVerifier(provider())))
                .with_no_client_auth(),
            Auth::Certs { chain, key, roots } => b
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| AuthError::Config(e.to_string()))?,
        };
        Ok(Arc::new(cfg))
    }

    /// Client side: TLS over `tcp` to the agent at `agent_ip`, then the PSK
    /// proof when in PSK mode.
    pub fn connect(
        &self,
        cfg: Arc<ClientConfig>,
        agent_ip: IpAddr,
        tcp: TcpStream,
    ) -> Result<Channel, AuthError> {
        let name = ServerName::IpAddress(agent_ip.into());
        let conn =
            ClientConnection::new(cfg, name).map_err(|e| AuthError::Handshake(e.to_string()))?;
        let mut s = StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn
                .complete_io(&mut s.sock)
                .map_err(client_handshake_error)?;
        }
        let mut ch = Channel::Client(Box::new(s));
        if let Auth::Psk(key) = self {
            let ex = ch.exporter()?;
            ch.write_all(&mac(key, b"client", &ex))
                .map_err(client_handshake_error)?;
            ch.flush().map_err(client_handshake_error)?;
            let mut theirs = [0u8; 32];
            ch.read_exact(&mut theirs)
                .map_err(|e| match client_handshake_error(e) {
                    AuthError::TimedOut => AuthError::TimedOut,
                    // The agent closes the channel when our proof is wrong.
                    _ => AuthError::BadKey,
                })?;
            verify(key, b"server", &ex, &theirs)?;
        }
        Ok(ch)
    }

    /// Agent side: TLS on an accepted socket, then the PSK proof when in
    /// PSK mode. Nothing else is read before the peer is authenticated.
    /// The socket's own timeouts bound each read; see
    /// [`Auth::accept_until`] for a bound on the whole handshake.
    pub fn accept(&self, cfg: Arc<ServerConfig>, tcp: TcpStream) -> Result<Channel, AuthError> {
        self.accept_until(cfg, tcp, None)
    }

    /// [`Auth::accept`] that gives up once `deadline` passes, however the
    /// peer spaces its bytes: a timeout per read alone lets a client that
    /// sends one byte a second hold the agent for as long as it likes.
    /// The socket's timeouts are left set for the remaining time.
    pub fn accept_until(
        &self,
        cfg: Arc<ServerConfig>,
        tcp: TcpStream,
        deadline: Option<Instant>,
    ) -> Result<Channel, AuthError> {
        let conn = ServerConnection::new(cfg).map_err(|e| AuthError::Handshake(e.to_string()))?;
        let mut s = StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            // complete_io reads until a whole record is in: every read
            // must see the deadline, not only the first.
            let mut io = UntilDeadline {
                sock: &s.sock,
                deadline,
            };
            s.conn
                .complete_io(&mut io)
                .map_err(|e| handshake_error(e, deadline))?;
        }
        let mut ch = Channel::Server(Box::new(s));
        if let Auth::Psk(key) = self {
            let ex = ch.exporter()?;
            let mut theirs = [0u8; 32];
            let mut got = 0;
            while got < theirs.len() {
                bound_by(ch.tcp(), deadline)?;
                match ch.read(&mut theirs[got..]) {
                    Ok(0) => return Err(AuthError::BadKey),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(handshake_error(e, deadline)),
                }
            }
            verify(key, b"client", &ex, &theirs)?;
            ch.write_all(&mac(key, b"server", &ex))
                .map_err(|e| AuthError::Handshake(e.to_string()))?;
            ch.flush()
                .map_err(|e| AuthError::Handshake(e.to_string()))?;
        }
        Ok(ch)
    }
}

/// A socket whose every read and write is bounded by what is left before a
/// deadline.
struct UntilDeadline<'a> {
    sock: &'a TcpStream,
    deadline: Option<Instant>,
}

impl Read for UntilDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        bound_by(self.sock, self.deadline).map_err(std::io::Error::other)?;
        let mut sock = self.sock;
        sock.read(buf)
    }
}

impl Write for UntilDeadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        bound_by(self.sock, self.deadline).map_err(std::io::Error::other)?;
        let mut sock = self.sock;
        sock.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sets the socket's timeouts to what is left before `deadline`, or fails
/// once it has passed.
fn bound_by(tcp: &TcpStream, deadline: Option<Instant>) -> Result<(), AuthError> {
    let Some(deadline) = deadline else {
        return Ok(());
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(AuthError::Handshake(
            "the peer did not complete the handshake in time".into(),
        ));
    }
    tcp.set_read_timeout(Some(left))
        .and_then(|()| tcp.set_write_timeout(Some(left)))
        .map_err(|e| AuthError::Handshake(e.to_string()))
}

fn handshake_error(e: std::io::Error, deadline: Option<Instant>) -> AuthError {
    if deadline.is_some_and(|d| Instant::now() >= d) {
        AuthError::Handshake("the peer did not complete the handshake in time".into())
    } else {
        AuthError::Handshake(e.to_string())
    }
}

fn mac(key: &[u8], role: &[u8], exporter: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(role);
    m.update(exporter);
    m.finalize().into_bytes().into()
}

fn verify(key: &[u8], role: &[u8], exporter: &[u8], theirs: &[u8; 32]) -> Result<(), AuthError> {
    let mut m = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(role);
    m.update(exporter);
    // Constant-time comparison.
    m.verify_slice(theirs).map_err(|_| AuthError::BadKey)
}

/// PSK mode's server-certificate check: any certificate is accepted (it is
/// throwaway), but its handshake signatures are verified for real, and the
/// session is then bound to the key by the exporter MACs.
#[derive(Debug)]
struct PskBoundVerifier(Arc<CryptoProvider>);

impl ServerCertVerifier for PskBoundVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a socket holds for reading right now, seen without waiting and
/// without taking anything.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// No byte, no end, no error.
    Nothing,
    /// At least one byte.
    Bytes,
    /// The peer's end (FIN), or an error such as a reset.
    End,
    /// Could not be told (the socket's mode would not change, a signal).
    Unknown,
}

/// Peeks one byte of `tcp` without blocking (non-blocking for the peek,
/// blocking again after it).
pub(crate) fn peek_now(tcp: &TcpStream) -> Waiting {
    if tcp.set_nonblocking(true).is_err() {
        return Waiting::Unknown;
    }
    let peeked = tcp.peek(&mut [0u8; 1]);
    if tcp.set_nonblocking(false).is_err() {
        return Waiting::Unknown;
    }
    match peeked {
        Ok(0) => Waiting::End,
        Ok(_) => Waiting::Bytes,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Waiting::Nothing,
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Waiting::Unknown,
        Err(_) => Waiting::End,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(
        server: Auth,
        client: Auth,
    ) -> (Result<Channel, AuthError>, Result<Channel, AuthError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let scfg = server.server_config().unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            server.accept(scfg, s)
        });
        let ccfg = client.client_config().unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let c = client.connect(ccfg, addr.ip(), tcp);
        (h.join().unwrap(), c)
    }

    #[test]
    fn same_key_authenticates_and_carries_data() {
        let k = Auth::Psk(Arc::new(b"0123456789abcdef-secret".to_vec()));
        let (s, c) = pair(k.clone(), k);
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        c.write_all(b"ping").unwrap();
        c.flush().unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
    }

    #[test]
    fn a_channel_is_quiet_until_the_peer_writes_or_closes() {
        let k = Auth::Psk(Arc::new(b"0123456789abcdef-secret".to_vec()));
        let (s, c) = pair(k.clone(), k.clone());
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        assert!(c.is_quiet() && s.is_quiet());
        s.write_all(b"left over").unwrap();
        s.flush().unwrap();
        // The record is on its way: poll until it arrives.
        let t = Instant::now();
        while c.is_quiet() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5));
            std::thread::yield_now();
        }
        let mut b = [0u8; 9];
        c.read_exact(&mut b).unwrap();
        assert!(c.is_quiet(), "read: quiet again");
        s.close(std::time::Duration::from_secs(1));
        let t = Instant::now();
        while c.is_quiet() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5));
            std::thread::yield_now();
        }
        // A peer gone without a word is not quiet either.
        let (s, c) = pair(k.clone(), k);
        let (s, mut c) = (s.unwrap(), c.unwrap());
        drop(s);
        let t = Instant::now();
        while c.is_quiet() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5));
            std::thread::yield_now();
        }
    }

    #[test]
    fn fingerprints_tell_credentials_apart() {
        let psk = |k: &[u8]| Auth::Psk(Arc::new(k.to_vec()));
        let same = psk(b"0123456789abcdef-secret");
        assert_eq!(
            same.fingerprint(),
            psk(b"0123456789abcdef-secret").fingerprint(),
            "the same key in two values"
        );
        assert_ne!(
            same.fingerprint(),
            psk(b"0123456789abcdef-other!").fingerprint()
        );
        let certs = |cert: &rcgen::CertifiedKey, ca: &rcgen::CertifiedKey| {
            let mut roots = RootCertStore::empty();
            roots.add(ca.cert.der().clone()).unwrap();
            Auth::Certs {
                chain: vec![cert.cert.der().clone()],
                key: Arc::new(PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap()),
                roots: Arc::new(roots),
            }
        };
        let one = rcgen::generate_simple_self_signed(vec!["one".to_string()]).unwrap();
        let two = rcgen::generate_simple_self_signed(vec!["two".to_string()]).unwrap();
        let prints = [
            certs(&one, &one).fingerprint(),
            certs(&one, &two).fingerprint(),
            certs(&two, &one).fingerprint(),
            same.fingerprint(),
        ];
        for (i, a) in prints.iter().enumerate() {
            for b in &prints[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(prints[0], certs(&one, &one).fingerprint());
    }

    #[test]
    fn wrong_key_is_refused_on_both_sides() {
        let (s, c) = pair(
            Auth::Psk(Arc::new(b"0123456789abcdef-secret".to_vec())),
            Auth::Psk(Arc::new(b"0123456789abcdef-other!".to_vec())),
        );
        assert!(matches!(s, Err(AuthError::BadKey)));
        assert!(c.is_err());
    }
}
