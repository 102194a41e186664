//! The soak's independent client: `client.py` (python3's socket module) in
//! the client host, driven over its stdin and read on its stdout.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use tcpr_netlab::Host;

const CLIENT_PY: &str = include_str!("client.py");

/// One connection as the client sees it.
#[derive(Debug, Clone, Default)]
pub struct ClientConn {
    /// Bytes sent.
    pub sent: u64,
    /// Bytes echoed back and checked against what was sent.
    pub verified: u64,
    /// "ok", "reset", "closed", "corrupt", "short" or "error".
    pub state: String,
    /// What broke it.
    pub error: String,
}

impl ClientConn {
    /// Whether the connection is still whole.
    pub fn ok(&self) -> bool {
        self.state == "ok"
    }
}

/// The running client.
pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts the client in `host`: one connection per address, each
    /// sending `rate` bytes/s of its own stream seeded by `seed`.
    pub fn start(host: &Host, seed: u64, rate: u64, port: u16, addrs: &[IpAddr]) -> Result<Peer> {
        let mut child = host
            .cmd("python3")
            .arg("-c")
            .arg(CLIENT_PY)
            .args([seed.to_string(), rate.to_string(), port.to_string()])
            .args(addrs.iter().map(ToString::to_string))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start the python3 client")?;
        let stdin = child.stdin.take().context("the client's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the client's stdout")?);
        let mut peer = Peer {
            child,
            stdin,
            stdout,
        };
        let ready = peer.line()?;
        if ready["ready"].as_u64() != Some(addrs.len() as u64) {
            bail!("the client did not connect every address: {ready}");
        }
        Ok(peer)
    }

    fn line(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            bail!("the python3 client ended ({status})");
        }
        serde_json::from_str(&line).with_context(|| format!("the client printed {line:?}"))
    }

    /// Sends one command line.
    pub fn command(&mut self, cmd: &str) -> Result<()> {
        writeln!(self.stdin, "{cmd}").context("talk to the client")?;
        self.stdin.flush()?;
        Ok(())
    }

    fn conns(&mut self) -> Result<Vec<ClientConn>> {
        let v = self.line()?;
        let conns = v["conns"]
            .as_array()
            .with_context(|| format!("the client printed {v} for its counters"))?;
        Ok(conns
            .iter()
            .map(|c| ClientConn {
                sent: c["sent"].as_u64().unwrap_or(0),
                verified: c["verified"].as_u64().unwrap_or(0),
                state: c["state"].as_str().unwrap_or("?").to_string(),
                error: c["error"].as_str().unwrap_or("").to_string(),
            })
            .collect())
    }

    /// Every connection's counters now.
    pub fn stats(&mut self) -> Result<Vec<ClientConn>> {
        self.command("stats")?;
        self.conns()
    }

    /// Stops sending, waits up to `wait_secs` for every echo, and returns
    /// the final counters.
    pub fn finish(mut self, wait_secs: u64) -> Result<Vec<ClientConn>> {
        self.command(&format!("finish {wait_secs}"))?;
        let conns = self.conns()?;
        let _ = self.child.wait();
        Ok(conns)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
