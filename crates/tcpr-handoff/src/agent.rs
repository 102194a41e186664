//! The agent: accepts authenticated senders, restores the connections they
//! prepare (only those its allowlist names), and on COMMIT resumes and
//! delivers them. A thin driver around [`crate::machine::Agent`].

use crate::auth::{Auth, Channel};
use crate::deliver::{self, Delivered};
use crate::machine::{self, AgentAction, ConnId};
use crate::wire::{self, pb, WireError};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tcpr_engine::Restored;
use tcpr_image::ConnectionImage;

/// Where restored connections go.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// Run a shell command line per connection (fd 3, `LISTEN_FDS=1`).
    Exec {
        /// The command line.
        command: String,
        /// Also on stdin/stdout.
        inetd: bool,
    },
    /// Pass over a unix stream socket (see [`crate::deliver`]).
    Unix(PathBuf),
    /// Hand to this process (library use).
    Channel(std::sync::mpsc::Sender<Delivered>),
}

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// How senders authenticate.
    pub auth: Auth,
    /// Local addresses (and ports) whose connections may be restored here.
    /// An image for any other local address is refused.
    pub allow: Vec<SocketAddr>,
    /// How long to wait for each next message before COMMIT.
    pub timeout: Duration,
    /// Where connections go.
    pub delivery: Delivery,
}

/// Counters, for tests and logs.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Channels refused at authentication.
    pub refused_auth: u64,
    /// Images refused by the allowlist.
    pub refused_allowlist: u64,
    /// Connections delivered.
    pub delivered: u64,
    /// Connections discarded (batch aborted).
    pub discarded: u64,
}

struct Session {
    m: machine::Agent,
    images: HashMap<ConnId, Result<ConnectionImage, String>>,
    restored: HashMap<ConnId, Restored>,
}

/// Recent batches by id, and their order of arrival (for eviction).
type Batches = (HashMap<u64, Arc<Mutex<Session>>>, VecDeque<u64>);

struct Shared {
    cfg: AgentConfig,
    tls: Arc<rustls::ServerConfig>,
    batches: Mutex<Batches>,
    stats: Mutex<Stats>,
}

/// A bound agent.
pub struct AgentServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The settings are unusable.
    #[error("{0}")]
    Config(String),
    /// The listening socket could not be made.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

impl AgentServer {
    /// Binds the agent's listening socket.
    pub fn bind(addr: SocketAddr, cfg: AgentConfig) -> Result<AgentServer, AgentError> {
        if cfg.allow.is_empty() {
            return Err(AgentError::Config(
                "the allowlist is empty: name the local ADDR:PORT of the connections this agent may take (--allow)".into(),
            ));
        }
        let tls = cfg
            .auth
            .server_config()
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let listener =
            TcpListener::bind(addr).map_err(|source| AgentError::Listen { addr, source })?;
        // Connections that arrive here may leave again later: install the
        // lock's table now rather than in the first move's pause.
        if let Err(e) = tcpr_engine::lock::prepare() {
            tracing::warn!("the flow lock table could not be installed ahead: {e}");
        }
        Ok(AgentServer {
            listener,
            shared: Arc::new(Shared {
                cfg,
                tls,
                batches: Mutex::new((HashMap::new(), VecDeque::new())),
                stats: Mutex::new(Stats::default()),
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A copy of the counters.
    pub fn stats(&self) -> Stats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves senders until the listener fails; one thread per channel.
    pub fn run(&self) -> io::Result<()> {
        loop {
            let (tcp, from) = self.listener.accept()?;
            let shared = self.shared.clone();
            std::thread::spawn(move || {
                let span = tracing::info_span!("handoff", %from);
                let _g = span.enter();
                if let Err(e) = serve(&shared, tcp) {
                    tracing::warn!("channel from {from} ended: {e}");
                }
            });
        }
    }
}

/// Fault injection for tests: when `TCPR_FAULT_STOP_AT` names this point,
/// the thread serving the batch holds there, so that a test can kill the
/// agent or cut its link at an exact protocol step. On arrival it creates
/// `$TCPR_FAULT_DIR/reached-POINT`; it goes on once
/// `$TCPR_FAULT_DIR/release-POINT` exists. Points: `hello`, `restored`
/// (before READY is sent), `ready` (after), `committed` (after COMMITTED).
fn fault_point(name: &str) {
    if !std::env::var("TCPR_FAULT_STOP_AT").is_ok_and(|v| v == name) {
        return;
    }
    let dir = PathBuf::from(std::env::var_os("TCPR_FAULT_DIR").unwrap_or_else(|| "/tmp".into()));
    tracing::warn!("fault injection: holding at {name}");
    let _ = std::fs::write(dir.join(format!("reached-{name}")), b"");
    while !dir.join(format!("release-{name}")).exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve(shared: &Arc<Shared>, tcp: TcpStream) -> Result<(), WireError> {
    let timeout = shared.cfg.timeout;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout * 4))?;
    let _ = tcp.set_nodelay(true);
    let mut ch = match shared.cfg.auth.accept(shared.tls.clone(), tcp) {
        Ok(ch) => ch,
        Err(e) => {
            lock(&shared.stats).refused_auth += 1;
            tracing::warn!("refused an unauthenticated sender: {e}");
            return Ok(());
        }
    };
    let first = wire::read_msg(&mut ch)?;
    match first.kind {
        Some(pb::message::Kind::Query(q)) => {
            let sess = lock(&shared.batches).0.get(&q.batch).cloned();
            let status = match sess {
                None => pb::Status {
                    batch: q.batch,
                    state: 0,
                    committed_ids: vec![],
                },
                Some(sess) => {
                    let mut s = lock(&sess);
                    let committed = s.m.handle_query();
                    drive(shared, &mut s, &mut ch)?;
                    match committed {
                        Some(ids) => pb::Status {
                            batch: q.batch,
                            state: 2,
                            committed_ids: ids,
                        },
                        None => pb::Status {
                            batch: q.batch,
                            state: 3,
                            committed_ids: vec![],
                        },
                    }
                }
            };
            wire::write_msg(
                &mut ch,
                &pb::Message {
                    kind: Some(pb::message::Kind::Status(status)),
                },
            )?;
            ch.flush()?;
            Ok(())
        }
        Some(pb::message::Kind::Hello(_)) => batch(shared, ch, first),
        _ => Err(WireError::Unexpected(
            "the first message must be HELLO or QUERY",
        )),
    }
}

/// Gives up a session after an I/O error: the machine aborts (before
/// COMMIT) and the restored sockets are closed silently.
fn give_up(shared: &Shared, sess: &Mutex<Session>) {
    let mut s = lock(sess);
    s.m.handle_link_lost();
    while let Some(a) = s.m.poll_action() {
        if let AgentAction::Discard(ids) = a {
            for id in ids {
                if let Some(r) = s.restored.remove(&id) {
                    r.discard();
                    lock(&shared.stats).discarded += 1;
                }
            }
        }
    }
    while s.m.poll_transmit().is_some() {}
}

fn batch(shared: &Arc<Shared>, ch: Channel, hello: pb::Message) -> Result<(), WireError> {
    let now = Instant::now();
    let mut m = machine::Agent::new(shared.cfg.timeout, now);
    m.handle_message(wire::from_wire(hello)?, now);
    let id = m.batch();
    fault_point("hello");
    let sess = Arc::new(Mutex::new(Session {
        m,
        images: HashMap::new(),
        restored: HashMap::new(),
    }));
    let r = batch_loop(shared, ch, &sess, id);
    if r.is_err() {
        give_up(shared, &sess);
    }
    r
}

fn batch_loop(
    shared: &Arc<Shared>,
    mut ch: Channel,
    sess: &Arc<Mutex<Session>>,
    id: u64,
) -> Result<(), WireError> {
    {
        // Remember recent batches for Query (bounded).
        let mut b = lock(&shared.batches);
        b.0.insert(id, sess.clone());
        b.1.push_back(id);
        while b.1.len() > 4096 {
            if let Some(old) = b.1.pop_front() {
                b.0.remove(&old);
            }
        }
    }
    loop {
        let deadline = {
            let mut s = lock(sess);
            drive(shared, &mut s, &mut ch)?;
            if s.m.is_done() {
                return Ok(());
            }
            s.m.poll_timeout()
        };
        let wait = deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        ch.tcp().set_read_timeout(wait)?;
        let got = wire::read_msg(&mut ch);
        let mut s = lock(sess);
        let now = Instant::now();
        match got {
            Ok(msg) => {
                if let Some(pb::message::Kind::Prepare(p)) = &msg.kind {
                    for c in &p.connections {
                        let img = ConnectionImage::decode(&c.image)
                            .map_err(|e| format!("bad image: {e}"));
                        s.images.insert(c.id, img);
                    }
                }
                if let Some(pb::message::Kind::Commit(c)) = &msg.kind {
                    if let Some(mv) = &c.add_address {
                        if let Err(e) = take_address(
                            mv,
                            s.images
                                .values()
                                .find_map(|i| i.as_ref().ok().map(|i| i.peer)),
                        ) {
                            tracing::error!("cannot take the service address {}: {e}", mv.cidr);
                        }
                    }
                }
                match wire::from_wire(msg) {
                    Ok(m) => s.m.handle_message(m, now),
                    Err(e) => {
                        tracing::warn!("sender misbehaved: {e}");
                        s.m.handle_link_lost();
                    }
                }
            }
            Err(WireError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                s.m.handle_timeout(now);
            }
            Err(e) => {
                tracing::info!("link lost: {e}");
                s.m.handle_link_lost();
                // Run the resulting discards; nothing can be sent any more.
                let _ = drive(shared, &mut s, &mut ch);
                return Ok(());
            }
        }
    }
}

/// Performs the machine's actions and sends its messages.
fn drive(shared: &Shared, s: &mut Session, ch: &mut Channel) -> Result<(), WireError> {
    loop {
        let mut busy = false;
        while let Some(a) = s.m.poll_action() {
            busy = true;
            match a {
                AgentAction::Restore(ids) => {
                    let out = ids
                        .iter()
                        .map(|&id| (id, restore_one(shared, s, id)))
                        .collect();
                    s.m.handle_restored(out);
                    fault_point("restored");
                }
                AgentAction::Resume(ids) => {
                    let out = ids
                        .iter()
                        .map(|&id| (id, resume_one(shared, s, id)))
                        .collect();
                    s.m.handle_resumed(out);
                }
                AgentAction::Discard(ids) => {
                    for id in ids {
                        if let Some(r) = s.restored.remove(&id) {
                            r.discard();
                            lock(&shared.stats).discarded += 1;
                        }
                    }
                }
            }
        }
        while let Some(msg) = s.m.poll_transmit() {
            busy = true;
            wire::write_msg(ch, &wire::to_wire(&msg))?;
            ch.flush()?;
            match msg {
                machine::Msg::Ready(_) => fault_point("ready"),
                machine::Msg::Committed(_) => fault_point("committed"),
                _ => {}
            }
        }
        if !busy {
            break;
        }
    }
    ch.flush()?;
    Ok(())
}

fn restore_one(shared: &Shared, s: &mut Session, id: ConnId) -> Result<(), String> {
    let img = match s.images.get(&id) {
        Some(Ok(img)) => img,
        Some(Err(e)) => return Err(e.clone()),
        None => return Err("no image".into()),
    };
    let allowed = shared.cfg.allow.iter().any(|a| {
        a.port() == img.local.port() && (a.ip() == img.local.ip() || a.ip().is_unspecified())
    });
    if !allowed {
        lock(&shared.stats).refused_allowlist += 1;
        return Err(format!("{} is not in this agent's allowlist", img.local));
    }
    let r = tcpr_engine::restore(img).map_err(|e| e.to_string())?;
    s.restored.insert(id, r);
    // The queues are in the socket now (the unsent tail in `Restored`):
    // keep only what delivery needs, so a batch is not held twice.
    if let Some(Ok(img)) = s.images.get_mut(&id) {
        img.recv_queue = Vec::new();
        img.send_queue = Default::default();
    }
    Ok(())
}

fn resume_one(shared: &Shared, s: &mut Session, id: ConnId) -> Result<(), String> {
    let r = s.restored.remove(&id).ok_or("not restored")?;
    let img = s
        .images
        .remove(&id)
        .and_then(|i| i.ok())
        .ok_or("no image")?;
    let stream = r.resume().map_err(|e| e.to_string())?;
    deliver_one(&shared.cfg.delivery, stream, img)?;
    lock(&shared.stats).delivered += 1;
    Ok(())
}

fn deliver_one(d: &Delivery, stream: TcpStream, img: ConnectionImage) -> Result<(), String> {
    match d {
        Delivery::Channel(tx) => tx
            .send(Delivered {
                stream,
                blob: img.app_blob,
                local: img.local,
                peer: img.peer,
            })
            .map_err(|_| "the application stopped accepting connections".to_string()),
        Delivery::Exec { command, inetd } => {
            let fd: OwnedFd = stream.into();
            let mut cmd = deliver::shell_command(command);
            let mut child =
                deliver::spawn(&mut cmd, &fd, &img.app_blob, img.local, img.peer, *inetd)
                    .map_err(|e| format!("cannot run {command}: {e}"))?;
            // Reap it when it ends; the connection lives in the child.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            Ok(())
        }
        Delivery::Unix(path) => {
            let fd: OwnedFd = stream.into();
            let to = std::os::unix::net::UnixStream::connect(path)
                .map_err(|e| format!("cannot reach the application at {}: {e}", path.display()))?;
            deliver::send_unix(&to, &fd, &img.app_blob, img.local, img.peer)
                .map_err(|e| e.to_string())
        }
    }
}

/// Adds the service address here and announces it (host evacuation).
fn take_address(mv: &pb::AddressMove, peer: Option<SocketAddr>) -> Result<(), String> {
    let (ip, prefix) = mv
        .cidr
        .split_once('/')
        .and_then(|(a, p)| Some((a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?)))
        .ok_or_else(|| format!("bad address {}", mv.cidr))?;
    let (ifindex, ifname) = if mv.dev.is_empty() {
        let peer = peer.ok_or("no connection to find the interface from")?;
        tcpr_host::addr::route_interface(peer.ip()).map_err(|e| e.to_string())?
    } else {
        let i = tcpr_host::addr::interface_index(&mv.dev).map_err(|e| e.to_string())?;
        (i, mv.dev.clone())
    };
    let held = tcpr_host::addr::Assigned {
        ip,
        prefix_len: prefix,
        ifindex,
        ifname,
    };
    tcpr_host::addr::add(&held)
        .map_err(|e| format!("add {} on {}: {e}", held.cidr(), held.ifname))?;
    tcpr_host::announce(&held.ifname, ip).map_err(|e| e.to_string())
}
