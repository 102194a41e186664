//! A line-numbering service that survives its own replacement: on SIGTERM
//! it hands every client, with its state, to a new instance and exits; no
//! client sees a dropped connection or a lost line.
//!
//! ```text
//! # on one host: the new instance takes the clients over a unix socket
//! rolling_upgrade receive --local /run/svc.sock --service 0.0.0.0:9000
//! rolling_upgrade serve --listen 0.0.0.0:9000 --handoff-local /run/svc.sock
//!
//! # across hosts: the new instance (on the host that is to take over):
//! rolling_upgrade receive --listen 10.0.0.3:7070 --psk-file key --allow 10.0.0.100:9000
//! # the running instance (holding the service address 10.0.0.100):
//! rolling_upgrade serve --listen 10.0.0.100:9000 --handoff-to 10.0.0.3:7070 --psk-file key
//! kill -TERM <pid of serve>
//! ```
//!
//! Protocol: each line a client sends comes back as "N line", N counting
//! that client's lines from 1; N carries on across the upgrade because the
//! count (and any half-received line) travels as the application blob.

use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tcpr_handoff::{
    hand_off, hand_off_local, Auth, Delivered, HandOff, Incoming, LocalIncoming, MigrateOptions,
    Switch,
};

/// Per-connection state: lines answered, and bytes of an unfinished line.
#[derive(Clone)]
struct State {
    lines: u64,
    partial: Vec<u8>,
}

impl State {
    fn to_blob(&self) -> Vec<u8> {
        [&self.lines.to_be_bytes()[..], &self.partial].concat()
    }
    fn from_blob(b: &[u8]) -> Result<State> {
        if b.len() < 8 {
            bail!("blob too short");
        }
        Ok(State {
            lines: u64::from_be_bytes(b[..8].try_into()?),
            partial: b[8..].to_vec(),
        })
    }
}

/// Serves one client until it closes, or until `stop` is set (then returns
/// the connection and its state at a point where nothing is in flight in
/// this process).
fn serve(mut s: TcpStream, mut st: State, stop: &AtomicBool) -> Result<Option<(TcpStream, State)>> {
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buf = [0u8; 4096];
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(Some((s, st)));
        }
        let n = match s.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e.into()),
        };
        st.partial.extend_from_slice(&buf[..n]);
        while let Some(i) = st.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = st.partial.drain(..=i).collect();
            st.lines += 1;
            s.write_all(format!("{} ", st.lines).as_bytes())?;
            s.write_all(&line)?;
        }
    }
}

fn arg(args: &[String], name: &str) -> Result<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .with_context(|| format!("missing {name}"))
}

fn take_over(d: Delivered) -> Result<()> {
    let st = State::from_blob(&d.blob)?;
    println!("took over {} at line {}", d.peer, st.lines);
    std::thread::spawn(move || serve(d.stream, st, &AtomicBool::new(false)));
    Ok(())
}

/// New clients, once the old instance has let go of the service port.
fn accept_new(service: SocketAddr) {
    std::thread::spawn(move || {
        let listener = loop {
            match TcpListener::bind(service) {
                Ok(l) => break l,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        println!("accepting new clients on {service}");
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                serve(
                    s,
                    State {
                        lines: 0,
                        partial: vec![],
                    },
                    &AtomicBool::new(false),
                )
            });
        }
    });
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("receive") if args.iter().any(|a| a == "--local") => {
            let incoming = LocalIncoming::bind(&PathBuf::from(arg(&args, "--local")?))?;
            println!("receiving locally");
            if let Ok(service) = arg(&args, "--service") {
                accept_new(service.parse()?);
            }
            while let Some(d) = incoming.accept() {
                take_over(d)?;
            }
            Ok(())
        }
        Some("receive") => {
            let auth = Auth::psk_file(&PathBuf::from(arg(&args, "--psk-file")?))?;
            let listen: SocketAddr = arg(&args, "--listen")?.parse()?;
            let allow: SocketAddr = arg(&args, "--allow")?.parse()?;
            let incoming = Incoming::bind(listen, auth, vec![allow])?;
            println!("receiving on {}", incoming.local_addr());
            while let Some(d) = incoming.accept() {
                take_over(d)?;
            }
            Ok(())
        }
        Some("serve") => {
            let listen: SocketAddr = arg(&args, "--listen")?.parse()?;
            let stop = Arc::new(AtomicBool::new(false));
            let s2 = stop.clone();
            ctrlc::set_handler(move || s2.store(true, Ordering::SeqCst))?;
            let listener = TcpListener::bind(listen)?;
            listener.set_nonblocking(true)?;
            println!("serving on {listen}");
            let (tx, rx) = mpsc::channel();
            let mut clients = 0usize;
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false)?;
                        clients += 1;
                        let (tx, stop) = (tx.clone(), stop.clone());
                        std::thread::spawn(move || {
                            let r = serve(s, State { lines: 0, partial: vec![] }, &stop);
                            let _ = tx.send(r);
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => return Err(e.into()),
                }
            }
            drop(listener);
            // Collect every client at its safe point, then hand them over.
            let mut batch = vec![];
            let mut states = vec![];
            for _ in 0..clients {
                if let Ok(Some((s, st))) = rx.recv()? {
                    batch.push((s, st.to_blob()));
                    states.push(st);
                }
            }
            let n = batch.len();
            let results = if let Ok(path) = arg(&args, "--handoff-local") {
                hand_off_local(&PathBuf::from(path), batch)
            } else {
                let to: SocketAddr = arg(&args, "--handoff-to")?.parse()?;
                let auth = Auth::psk_file(&PathBuf::from(arg(&args, "--psk-file")?))?;
                let mut opts = MigrateOptions::new(to, auth);
                opts.switch = Switch::MoveAddress;
                hand_off(batch, &opts)?
            };
            let moved = results.iter().filter(|r| matches!(r, HandOff::Moved)).count();
            println!("handed off {moved} of {n} clients");
            // Clients that stayed are served here until they leave.
            let never = AtomicBool::new(false);
            std::thread::scope(|sc| {
                for (r, st) in results.into_iter().zip(states) {
                    if let HandOff::Stayed(s, why) = r {
                        eprintln!("a client stayed: {why}");
                        let never = &never;
                        sc.spawn(move || serve(s, st, never));
                    }
                }
            });
            Ok(())
        }
        _ => bail!(
            "usage: rolling_upgrade serve --listen A (--handoff-local PATH | --handoff-to B --psk-file F)\n\
             \x20      rolling_upgrade receive (--local PATH [--service A] | --listen B --allow A --psk-file F)"
        ),
    }
}
