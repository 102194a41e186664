//! The metrics endpoint: Prometheus text at `GET /metrics`, and the client
//! `tcpr balance status` reads it with.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// A scrape slower than this is dropped (a stuck client holds no thread long).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line and headers read from a scraper.
const MAX_REQUEST_BYTES: u64 = 8 << 10;
/// The Prometheus text exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `render()` at `GET /metrics` on `addr`, each scrape on a thread
/// of its own, until the process ends. Returns the bound address.
pub fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> io::Result<SocketAddr> {
    // Shared as the listeners are: a new balancer starts beside the old.
    let listener = tcpr_host::sock::listen_shared(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
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
    Ok(bound)
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
