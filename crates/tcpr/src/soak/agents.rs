//! The soak's agents: one `tcpr agent` process per server host (a child,
//! so that it can be killed with SIGKILL and restarted on its journal),
//! delivering over a unix socket to this process.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};
use tcpr_handoff::{Delivered, LocalIncoming};
use tcpr_netlab::Host;

/// One agent: its host, its command line and the running process.
pub struct Agent {
    host: Host,
    args: Vec<String>,
    log: PathBuf,
    running: Mutex<Option<(Child, ChildStdout)>>,
}

impl Agent {
    /// Starts `tcpr agent` in `host`, listening on `listen`, delivering to
    /// `unix`, journaling in `journal`, allowing every address of `allow`.
    pub fn start(
        host: &Host,
        listen: SocketAddr,
        dir: &Path,
        name: &str,
        allow: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Agent> {
        let mut args = vec![
            "agent".to_string(),
            "--listen".into(),
            listen.to_string(),
            "--unix".into(),
            dir.join(format!("{name}.sock"))
                .to_string_lossy()
                .into_owned(),
            "--psk-file".into(),
            dir.join("psk").to_string_lossy().into_owned(),
            "--journal".into(),
            dir.join(format!("journal-{name}"))
                .to_string_lossy()
                .into_owned(),
            "--timeout".into(),
            timeout.as_secs_f64().to_string(),
        ];
        for a in allow {
            args.push("--allow".into());
            args.push(a.to_string());
        }
        let agent = Agent {
            host: host.clone(),
            args,
            log: dir.join(format!("agent-{name}.log")),
            running: Mutex::new(None),
        };
        agent.spawn(None)?;
        Ok(agent)
    }

    /// Starts the process; with `stop_at`, it holds at that fault point of
    /// the protocol (`TCPR_FAULT_STOP_AT`, see `tcpr_handoff::agent`) and
    /// says so with a file in the directory given.
    fn spawn(&self, stop_at: Option<(&str, &Path)>) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        // `ip netns exec` execs the program in place: the child is the agent.
        let mut cmd = self.host.cmd(&std::env::current_exe()?.to_string_lossy());
        cmd.args(&self.args)
            .env_remove("TCPR_FAULT_STOP_AT")
            .env_remove("TCPR_FAULT_DIR");
        if let Some((point, dir)) = stop_at {
            cmd.env("TCPR_FAULT_STOP_AT", point)
                .env("TCPR_FAULT_DIR", dir);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("start tcpr agent")?;
        let mut stdout = BufReader::new(child.stdout.take().context("the agent's stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.contains("listening") {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "tcpr agent did not start (see {}): {line:?}",
                self.log.display()
            );
        }
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((child, stdout.into_inner()));
        Ok(())
    }

    /// Kills the agent with SIGKILL, as a crash would, and starts it again
    /// on the same journal.
    pub fn crash_and_restart(&self) -> Result<()> {
        self.kill();
        self.spawn(None)
    }

    /// Restarts the agent so that it holds at fault point `point` of the
    /// next batch, announcing it with `dir/reached-POINT`.
    pub fn arm(&self, point: &str, dir: &Path) -> Result<()> {
        self.kill();
        self.spawn(Some((point, dir)))
    }

    /// Kills it for good.
    pub fn kill(&self) {
        if let Some((mut child, _)) = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            // Child::kill sends SIGKILL.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connections delivered by either agent, by their service address.
pub struct Deliveries {
    rx: mpsc::Receiver<Delivered>,
    early: HashMap<IpAddr, Vec<Delivered>>,
}

impl Deliveries {
    /// Listens on each of `paths` for the agents' deliveries.
    pub fn listen(paths: &[PathBuf]) -> Result<Deliveries> {
        let (tx, rx) = mpsc::channel();
        for p in paths {
            let incoming =
                LocalIncoming::bind(p).with_context(|| format!("listen on {}", p.display()))?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                while let Some(d) = incoming.accept() {
                    if tx.send(d).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Deliveries {
            rx,
            early: HashMap::new(),
        })
    }

    /// The delivery of the connection on `ip`, waiting up to `wait`.
    pub fn wait_for(&mut self, ip: IpAddr, wait: Duration) -> Option<Delivered> {
        if let Some(d) = self.take(ip) {
            return Some(d);
        }
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(d) if d.local.ip() == ip => return Some(d),
                Ok(d) => self.early.entry(d.local.ip()).or_default().push(d),
                Err(_) => return None,
            }
        }
    }

    fn take(&mut self, ip: IpAddr) -> Option<Delivered> {
        let list = self.early.get_mut(&ip)?;
        let d = list.pop();
        if list.is_empty() {
            self.early.remove(&ip);
        }
        d
    }

    /// Every delivery that nobody waited for (each one a second copy of a
    /// connection that lives elsewhere).
    pub fn strays(&mut self) -> Vec<Delivered> {
        while let Ok(d) = self.rx.try_recv() {
            self.early.entry(d.local.ip()).or_default().push(d);
        }
        self.early.drain().flat_map(|(_, v)| v).collect()
    }
}

/// Runs an `nft` script inside `host`.
pub fn nft(host: &Host, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = host
        .cmd("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run nft")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The table of the soak's link cuts.
const CUT_TABLE: &str = "tcprsoak";

/// Cuts the control link into `host`: senders' packets to `port` drop.
pub fn cut_link(host: &Host, port: u16) -> Result<()> {
    nft(
        host,
        &format!(
            "add table inet {CUT_TABLE}
add chain inet {CUT_TABLE} cut {{ type filter hook input priority -300; policy accept; }}
flush chain inet {CUT_TABLE} cut
add rule inet {CUT_TABLE} cut tcp dport {port} drop
"
        ),
    )
}

/// Mends it.
pub fn mend_link(host: &Host) -> Result<()> {
    nft(host, &format!("flush chain inet {CUT_TABLE} cut\n"))
}

/// Removes the cut table (at the end).
pub fn remove_cut_table(host: &Host) -> Result<()> {
    nft(host, &format!("delete table inet {CUT_TABLE}\n"))
}

/// Rules left in `host` outside tcpr's own lock table (the loss and cut
/// chains must be empty at the end).
pub fn stray_rules(host: &Host) -> Result<usize> {
    let out = tcpr_netlab::run(host.cmd("nft").args(["-j", "list", "ruleset"]))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("nft -j")?;
    Ok(v["nftables"]
        .as_array()
        .map(|objs| {
            objs.iter()
                .filter_map(|o| o.get("rule"))
                .filter(|r| r["table"] != "tcpr")
                .count()
        })
        .unwrap_or(0))
}

/// Policy routing rules beyond the kernel's defaults (local, main, default).
pub fn extra_policy_rules(host: &Host) -> Result<usize> {
    const DEFAULT_RULES: usize = 3;
    let mut n = 0;
    for family in ["-4", "-6"] {
        let out = host.ip(&[family, "rule", "show"])?;
        let lines = String::from_utf8_lossy(&out.stdout).lines().count();
        // IPv6 has two defaults (local, main).
        let defaults = if family == "-4" { DEFAULT_RULES } else { 2 };
        n += lines.saturating_sub(defaults);
    }
    Ok(n)
}

/// The addresses assigned to `host`'s eth0.
pub fn addresses(host: &Host) -> Result<Vec<IpAddr>> {
    let out = host.ip(&["-o", "addr", "show", "dev", "eth0"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet" || *x == "inet6")?;
            w.next()?.split('/').next()?.parse().ok()
        })
        .collect())
}

/// The elements of tcpr's lock sets in `host`: how many carry a timeout
/// (they expire by their lease) and how many do not (they never would).
#[derive(Debug, Default, Clone, Copy)]
pub struct LockElements {
    pub expiring: usize,
    pub permanent: usize,
}

/// Counts `host`'s lock elements.
pub fn lock_elements(host: &Host) -> Result<LockElements> {
    let mut n = LockElements::default();
    let out = host
        .cmd("nft")
        .args(["-j", "list", "table", "inet", tcpr_engine::lock::TABLE])
        .output()
        .context("run nft")?;
    if !out.status.success() {
        // No table: nothing locked.
        return Ok(n);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("nft -j")?;
    let sets = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("set"));
    for elem in sets.filter_map(|s| s["elem"].as_array()).flatten() {
        // With a timeout, nft prints {"elem": {"val": ..., "timeout": T,
        // "expires": E}}; without, the bare value.
        if elem["elem"].get("expires").is_some() || elem["elem"].get("timeout").is_some() {
            n.expiring += 1;
        } else {
            n.permanent += 1;
        }
    }
    Ok(n)
}
