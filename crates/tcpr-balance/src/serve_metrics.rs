//! The metrics endpoint: Prometheus text at `GET /metrics`, and the client
//! `tcpr balance status` reads it with.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A scrape slower than this is dropped (a stuck client holds no thread long).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line and headers read from a scraper.
const MAX_REQUEST_BYTES: u64 = 8 << 10;
/// The Prometheus text exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics endpoint's listener, to stop it.
pub struct Serving {
    listener: std::os::fd::OwnedFd,
    stopped: Arc<AtomicBool>,
}

impl Serving {
    /// Stops taking scrapes (a balancer that drains: its replacement,
    /// listening on the same address, answers them from now on).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = tcpr_host::sock::stop_listening(std::os::fd::AsFd::as_fd(&self.listener));
    }
}

/// Serves `render()` at `GET /metrics` on `addr`, each scrape on a thread
/// of its own, until the process ends or [`Serving::stop`]. Returns the
/// bound address.
pub fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> io::Result<(SocketAddr, Serving)> {
    // Shared as the listeners are: a new balancer starts beside the old.
    let listener = tcpr_host::sock::listen_shared(addr)?;
    let bound = listener.local_addr()?;
    let stopped = Arc::new(AtomicBool::new(false));
    let serving = Serving {
        listener: std::os::fd::OwnedFd::from(listener.try_clone()?),
        stopped: Arc::clone(&stopped),
    };
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else {
                    // Stopped, its accept fails from now on (EINVAL).
                    if stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    continue;
                };
                let render = Arc::clone(&render);
                let _ = std::thread::Builder::new()
                    .name("scrape".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &*render) {
                            tracing::debug!("metrics scrape failed: {e}");
                        }
                    });
            }
        })?;
    Ok((bound, serving))
}

fn answer(conn: TcpStream, render: &dyn Fn() -> String) -> io::Result<()> {
    conn.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    conn.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let mut reader = BufReader::new((&conn).take(MAX_REQUEST_BYTES));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The headers are read and ignored: the answer does not depend on them.
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method == "GET" && (path == "/metrics" || path == "/") {
        ("200 OK", render())
    } else {
        ("404 Not Found", "only GET /metrics here\n".to_string())
    };
    let mut out = &conn;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// Fetches the metrics text from a balancer's endpoint.
pub fn fetch(addr: SocketAddr) -> io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)?;
    conn.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP response"))?;
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200 ") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{addr} answered {status:?}"),
        ));
    }
    Ok(body.to_string())
}
