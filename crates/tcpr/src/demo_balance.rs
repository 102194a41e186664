//! `tcpr demo balance`: the balancer out of the data path, shown in
//! network namespaces: a client, a front host running `tcpr balance`, two
//! backends (an HTTP server and a `tcpr agent --vip --forward` each).
//! Requests by Host land on their backends; a large download is verified
//! byte by byte while the front's interface counters show it never
//! carried the response.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tcpr_netlab::balance::{BalanceLab, Family};
use tcpr_netlab::Host;

/// The agents' key file, in the demo's folder.
pub(crate) const PSK_FILE: &str = "psk";
/// The demo's network number (10.N.0.0/24, fd00:N::/64).
const NET: u8 = 78;
pub(crate) const SERVER_PORT: u16 = 8080;
pub(crate) const AGENT_PORT: u16 = 7700;
pub(crate) const VIP_PORT: u16 = 80;
/// The balancer's metrics address, inside the front's namespace.
pub(crate) const METRICS_LISTEN: &str = "127.0.0.1:9100";
const HOSTS: [&str; 2] = ["a.example", "b.example"];
/// The response body repeats this many bytes of the test stream.
const BLOCK_BYTES: usize = 1 << 20;
/// The stream's seed.
const SEED: u64 = 0xba1a;
/// How long a process may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;

pub(crate) mod server;

/// Runs the demo with a download of `mib` MiB.
pub fn run(mib: u64) -> Result<()> {
    ctrlc::set_handler(|| {
        tcpr_netlab::cleanup_all();
        std::process::exit(128 + libc::SIGINT);
    })
    .context("install the Ctrl-C handler")?;
    let lab = BalanceLab::new("demob", NET, 2)?;
    let dir = std::env::temp_dir().join(format!("tcpr-demo-balance-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = show(&lab, &dir, mib);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A child process killed when dropped.
pub(crate) struct Running(pub(crate) Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` and waits for a line of its stdout starting with `ready`.
pub(crate) fn start(mut cmd: Command, ready: &str) -> Result<Running> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let out = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = ready.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with(&ready) {
                let _ = tx.send(());
            }
        }
    });
    let running = Running(child);
    rx.recv_timeout(START_TIMEOUT)
        .with_context(|| format!("{cmd:?} did not start"))?;
    Ok(running)
}

/// Backends (an HTTP server and an agent each) and the balancer's config,
/// written to `dir`; returns the agents and the config file.
pub(crate) fn start_backends(
    lab: &BalanceLab,
    dir: &std::path::Path,
) -> Result<(Vec<Running>, std::path::PathBuf)> {
    let exe = std::env::current_exe()?;
    let psk = dir.join(PSK_FILE);
    std::fs::write(&psk, "the balancer demo's shared secret\n")?;
    let v4 = Family::V4;
    let vip = lab.vip(v4);
    let mut keep = vec![];
    for (i, h) in lab.backends.iter().enumerate() {
        serve_http(h, format!("backend-{i}"))?;
        let mut agent = h.cmd(exe.to_str().context("exe path")?);
        agent
            .args([
                "agent",
                "--listen",
                &lab.backend_sock(v4, i, AGENT_PORT).to_string(),
            ])
            .args(["--psk-file", psk.to_str().context("path")?, "--no-journal"])
            .args(["--forward", &format!("127.0.0.1:{SERVER_PORT}")])
            .args(["--allow", &SocketAddr::new(vip, VIP_PORT).to_string()])
            .args(["--vip", &vip.to_string()]);
        keep.push(start(agent, "tcpr agent listening")?);
    }
    let mut config = format!(
        "[agents]\npsk_file = {:?}\n\n[metrics]\nlisten = \"{METRICS_LISTEN}\"\n\n[[listener]]\nname = \"web\"\nbind = [\"{vip}:{VIP_PORT}\"]\nprotocol = \"http\"\n\n",
        psk.to_str().context("path")?
    );
    for (i, host) in HOSTS.iter().enumerate() {
        config += &format!("[[listener.route]]\nhost = {host:?}\npool = \"p{i}\"\n\n");
    }
    for i in 0..lab.backends.len() {
        config += &format!(
            "[[pool]]\nname = \"p{i}\"\nmembers = [ {{ agent = \"{}\", server = \"{}\" }} ]\n\n",
            lab.backend_sock(v4, i, AGENT_PORT),
            lab.backend_sock(v4, i, SERVER_PORT)
        );
    }
    let config_path = dir.join("balance.toml");
    std::fs::write(&config_path, &config)?;
    Ok((keep, config_path))
}

/// `tcpr balance --config CONFIG` on the front host, started.
pub(crate) fn start_balancer(lab: &BalanceLab, config: &std::path::Path) -> Result<Running> {
    let exe = std::env::current_exe()?;
    let mut balancer = lab.front.cmd(exe.to_str().context("exe path")?);
    balancer
        .args(["balance", "--config", config.to_str().context("path")?])
        .arg("--steer-pin-dir")
        .arg(lab.pin_dir());
    start(balancer, "tcpr balance ready")
}

fn show(lab: &BalanceLab, dir: &std::path::Path, mib: u64) -> Result<()> {
    let exe = std::env::current_exe()?;
    let vip = lab.vip(Family::V4);
    let (mut keep, config_path) = start_backends(lab, dir)?;
    println!(
        "== config ({})\n{}",
        config_path.display(),
        std::fs::read_to_string(&config_path)?
    );
    keep.push(start_balancer(lab, &config_path)?);
    println!("== requests by Host, through the VIP {vip}:{VIP_PORT}");
    for host in HOSTS {
        let out = lab
            .client
            .cmd("curl")
            .args(["-sS", "--fail", "-H", &format!("Host: {host}")])
            .arg(format!("http://{vip}/name"))
            .output()
            .context("run curl (apt-get install curl)")?;
        if !out.status.success() {
            bail!("curl: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        println!(
            "  curl -H 'Host: {host}' http://{vip}/name  →  {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    println!("== a {mib} MiB download from b.example");
    let (front_tx, client_rx) = (lab.front.tx_bytes("eth0")?, lab.client.rx_bytes("eth0")?);
    let started = Instant::now();
    let bytes = mib * MIB;
    let got = lab
        .client
        .within(|| download(SocketAddr::new(vip, VIP_PORT), bytes))?;
    let secs = started.elapsed().as_secs_f64();
    let front_tx = lab.front.tx_bytes("eth0")? - front_tx;
    let client_rx = lab.client.rx_bytes("eth0")? - client_rx;
    println!(
        "  {got} bytes verified in {secs:.2} s ({:.0} MiB/s)",
        got as f64 / MIB as f64 / secs
    );
    println!("  the client's eth0 received     {client_rx:>12} bytes");
    println!(
        "  the front's eth0 transmitted   {front_tx:>12} bytes ({:.3} % of it: the client's ACKs forwarded to the backend)",
        100.0 * front_tx as f64 / client_rx.max(1) as f64
    );
    let status = lab
        .front
        .cmd(exe.to_str().context("exe path")?)
        .args(["balance", "status", "--metrics", METRICS_LISTEN])
        .output()?;
    println!(
        "== tcpr balance status\n{}",
        String::from_utf8_lossy(&status.stdout)
    );
    drop(keep);
    Ok(())
}

/// The block every response body repeats.
pub(crate) fn block() -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_BYTES];
    crate::stream::fill(SEED, 0, &mut b);
    b
}

/// A small HTTP/1.1 server on `host` ([`server`]: one event loop
/// thread): `/name` answers `name`, `/bytes/N` sends N bytes of the
/// repeated block.
fn serve_http(host: &Host, name: String) -> Result<()> {
    let path = host.path();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("server".into())
        .spawn(move || {
            let listener = tcpr_host::enter_netns(&path)
                .map_err(anyhow::Error::from)
                .and_then(|()| Ok(TcpListener::bind(("0.0.0.0", SERVER_PORT))?));
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let site = server::Site::new(&name, block());
            if let Err(e) = server::run(server::serve_tcp(listener, site)) {
                eprintln!("server {name}: {e}");
            }
        })
        .context("start the server's thread")?;
    rx.recv().context("server thread")?
}

/// Downloads `/bytes/N` from b.example through `vip` and checks each byte.
fn download(vip: SocketAddr, n: u64) -> Result<u64> {
    let mut s = TcpStream::connect(vip)?;
    write!(
        s,
        "GET /bytes/{n} HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n"
    )?;
    let mut reader = BufReader::with_capacity(BLOCK_BYTES, s);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("HTTP/1.1 200") {
        bail!("the backend answered {line:?}");
    }
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    let block = block();
    let mut buf = vec![0u8; BLOCK_BYTES];
    let mut got = 0u64;
    while got < n {
        let r = reader.read(&mut buf)?;
        if r == 0 {
            bail!("the download ended after {got} of {n} bytes");
        }
        for (i, b) in buf[..r].iter().enumerate() {
            if *b != block[((got + i as u64) % BLOCK_BYTES as u64) as usize] {
                bail!("byte {} differs", got + i as u64);
            }
        }
        got += r as u64;
    }
    Ok(got)
}

/// `tcpr demo SHOW`.
#[derive(clap::Subcommand, Debug)]
pub enum DemoShow {
    /// The load balancer out of the data path: routing by Host and a large
    /// download the front never carries.
    Balance {
        /// The download's size, MiB (1 to 65536).
        #[arg(long, default_value_t = 256,
              value_parser = clap::value_parser!(u64).range(1..=65536))]
        mib: u64,
    },
}

/// Runs the show.
pub fn run_show(show: DemoShow) -> Result<()> {
    match show {
        DemoShow::Balance { mib } => run(mib),
    }
}
