//! `tcpr bench-balance`: HAProxy (the Debian package) against `tcpr
//! balance`, same run, same topology (client, front, two backends in
//! namespaces), same backends, same load generator (wrk). Small responses
//! over new connections and keep-alive (requests/s, p99), and 1 MiB and
//! 100 MiB responses (throughput, the front process's CPU seconds per GiB
//! from /proc/PID/stat utime+stime; softirq work the kernel does for the
//! front's interface is not attributed to a process and is not counted).
//! For tcpr it also prints, per load, the balancer's own counters
//! (connections handed off, fallen back to the proxy, proxied, and the
//! mean handoff time), so a reader sees each new connection really was
//! handed off.

use crate::demo_balance::{
    start_backends, start_balancer, Running, METRICS_LISTEN, SERVER_PORT, VIP_PORT,
};
use anyhow::{bail, Context, Result};
use std::process::Command;
use std::time::Duration;
use tcpr_balance::metrics::names;
use tcpr_netlab::balance::{BalanceLab, Family};

/// The bench's network number.
const NET: u8 = 79;
/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;
/// Fields of /proc/PID/stat (1-based) holding utime and stime, in ticks.
const STAT_UTIME_FIELD: usize = 14;
const STAT_STIME_FIELD: usize = 15;

/// One wrk run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    requests: f64,
    requests_per_sec: f64,
    p99_ms: f64,
    bytes_per_sec: f64,
    front_cpu_per_gib: f64,
}

/// The balancer's counters (summed over pools, members, listeners).
#[derive(Debug, Clone, Copy, Default)]
struct Served {
    handoffs: f64,
    fallbacks: f64,
    proxied: f64,
    handoff_seconds_sum: f64,
    handoff_seconds_count: f64,
}

impl Served {
    /// What happened between `before` and `self`.
    fn since(self, before: Served) -> Served {
        Served {
            handoffs: self.handoffs - before.handoffs,
            fallbacks: self.fallbacks - before.fallbacks,
            proxied: self.proxied - before.proxied,
            handoff_seconds_sum: self.handoff_seconds_sum - before.handoff_seconds_sum,
            handoff_seconds_count: self.handoff_seconds_count - before.handoff_seconds_count,
        }
    }
}

/// The running balancer's counters, from its metrics endpoint.
fn served(lab: &BalanceLab) -> Result<Served> {
    let addr = METRICS_LISTEN.parse().context("metrics address")?;
    let text = lab
        .front
        .within(|| Ok(tcpr_balance::serve_metrics::fetch(addr)?))
        .context("read the balancer's metrics")?;
    let samples = tcpr_balance::parse_metrics(&text);
    let total = |name: &str| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    };
    Ok(Served {
        handoffs: total(names::HANDOFFS),
        fallbacks: total(names::FALLBACKS),
        proxied: total(names::PROXIED),
        handoff_seconds_sum: total(&format!("{}_sum", names::HANDOFF_SECONDS)),
        handoff_seconds_count: total(&format!("{}_count", names::HANDOFF_SECONDS)),
    })
}

/// One load: what wrk fetches and how.
struct Load {
    name: &'static str,
    path: String,
    close: bool,
    connections: u32,
    bytes: u64,
}

/// Runs the comparison for `seconds` per load.
pub fn run(seconds: u32) -> Result<()> {
    for tool in ["wrk", "haproxy"] {
        if Command::new("which").arg(tool).output()?.stdout.is_empty() {
            bail!("{tool} is not installed (scripts/setup.sh installs it)");
        }
    }
    let lab = BalanceLab::new("benchb", NET, 2)?;
    let dir = std::env::temp_dir().join(format!("tcpr-bench-balance-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = compare(&lab, &dir, seconds);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn loads() -> Vec<Load> {
    let small = |name, close| Load {
        name,
        path: "/name".into(),
        close,
        connections: 32,
        bytes: 0,
    };
    let big = |name, bytes: u64| Load {
        name,
        path: format!("/bytes/{bytes}"),
        close: true,
        connections: 4,
        bytes,
    };
    vec![
        small("small, new connections", true),
        small("small, keep-alive", false),
        big("1 MiB responses", 1 << 20),
        big("100 MiB responses", 100 << 20),
    ]
}

fn compare(lab: &BalanceLab, dir: &std::path::Path, seconds: u32) -> Result<()> {
    let (_backends, config) = start_backends(lab, dir)?;
    let haproxy_cfg = dir.join("haproxy.cfg");
    std::fs::write(&haproxy_cfg, haproxy_config(lab))?;
    let mut table: Vec<(String, Run, Run)> = vec![];
    let mut results: [Vec<Run>; 2] = [vec![], vec![]];
    let mut tcpr_served: Vec<Served> = vec![];
    for (which, results) in results.iter_mut().enumerate() {
        let front: Running = if which == 0 {
            let mut c = lab.front.cmd("haproxy");
            c.args(["-db", "-f", haproxy_cfg.to_str().context("path")?]);
            // haproxy prints nothing when it is up: wait for its port.
            let r = Running(c.spawn().context("start haproxy")?);
            wait_port(lab)?;
            r
        } else {
            start_balancer(lab, &config)?
        };
        let pid = front.0.id();
        for load in loads() {
            if which == 0 {
                results.push(measure(lab, pid, &load, seconds)?);
            } else {
                let before = served(lab)?;
                results.push(measure(lab, pid, &load, seconds)?);
                tcpr_served.push(served(lab)?.since(before));
            }
        }
        drop(front);
        // The VIP's port is free again before the next front binds it.
        std::thread::sleep(Duration::from_millis(200));
    }
    for (i, load) in loads().iter().enumerate() {
        table.push((load.name.to_string(), results[0][i], results[1][i]));
    }
    println!(
        "{:<24} {:>12} {:>12} {:>7} {:>10} {:>10} {:>12} {:>12} {:>9}",
        "load",
        "haproxy r/s",
        "tcpr r/s",
        "ratio",
        "hap p99ms",
        "tcpr p99",
        "hap s/GiB",
        "tcpr s/GiB",
        "cpu ratio"
    );
    for (name, h, t) in table {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        println!(
            "{name:<24} {:>12.0} {:>12.0} {:>7.2} {:>10.2} {:>10.2} {:>12.3} {:>12.3} {:>9.3}",
            h.requests_per_sec,
            t.requests_per_sec,
            ratio(t.requests_per_sec, h.requests_per_sec),
            h.p99_ms,
            t.p99_ms,
            h.front_cpu_per_gib,
            t.front_cpu_per_gib,
            ratio(t.front_cpu_per_gib, h.front_cpu_per_gib),
        );
        let _ = (h.bytes_per_sec, t.bytes_per_sec);
    }
    println!("(r/s ratio: tcpr / haproxy, higher is better; cpu ratio: tcpr / haproxy front CPU per GiB, lower is better)");
    println!();
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>9} {:>14}",
        "tcpr balance", "requests", "handoffs", "fallbacks", "proxied", "mean handoff"
    );
    for ((load, run), s) in loads().iter().zip(&results[1]).zip(&tcpr_served) {
        let mean_ms = if s.handoff_seconds_count > 0.0 {
            1000.0 * s.handoff_seconds_sum / s.handoff_seconds_count
        } else {
            f64::NAN
        };
        println!(
            "{:<24} {:>10.0} {:>10.0} {:>10.0} {:>9.0} {:>11.2} ms",
            load.name, run.requests, s.handoffs, s.fallbacks, s.proxied, mean_ms
        );
    }
    println!("(requests: wrk's count; handoffs, fallbacks, proxied: the balancer's counters over the same run)");
    Ok(())
}

fn haproxy_config(lab: &BalanceLab) -> String {
    let v4 = Family::V4;
    format!(
        "global\n  maxconn 4000\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
         frontend web\n  bind {vip}:{VIP_PORT}\n  acl a hdr(host) -i a.example\n  acl b hdr(host) -i b.example\n  use_backend p0 if a\n  use_backend p1 if b\n\n\
         backend p0\n  server s0 {s0}\n\nbackend p1\n  server s1 {s1}\n",
        vip = lab.vip(v4),
        s0 = lab.backend_sock(v4, 0, SERVER_PORT),
        s1 = lab.backend_sock(v4, 1, SERVER_PORT),
    )
}

fn wait_port(lab: &BalanceLab) -> Result<()> {
    let vip = lab.vip(Family::V4);
    for _ in 0..200 {
        let ok = lab
            .client
            .cmd("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "1",
                "-H",
                "Host: a.example",
            ])
            .arg(format!("http://{vip}/name"))
            .status()?
            .success();
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the front did not start serving")
}

/// utime + stime of `pid`, seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    let field = |n: usize| -> Result<f64> {
        Ok(fields
            .get(n - 3)
            .context("short /proc stat")?
            .parse::<f64>()?)
    };
    let ticks = tick_rate();
    Ok((field(STAT_UTIME_FIELD)? + field(STAT_STIME_FIELD)?) / ticks)
}

fn tick_rate() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn measure(lab: &BalanceLab, pid: u32, load: &Load, seconds: u32) -> Result<Run> {
    let vip = lab.vip(Family::V4);
    let cpu_before = cpu_seconds(pid)?;
    let mut wrk = lab.client.cmd("wrk");
    wrk.args(["--latency", "-t", "2"])
        .args(["-c", &load.connections.to_string()])
        .args(["-d", &format!("{seconds}s"), "--timeout", "30s"])
        .args(["-H", "Host: b.example"]);
    if load.close {
        wrk.args(["-H", "Connection: close"]);
    }
    let out = wrk
        .arg(format!("http://{vip}:{VIP_PORT}{}", load.path))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("wrk: {}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    let cpu = cpu_seconds(pid)? - cpu_before;
    let rps = parse_after(&text, "Requests/sec:").unwrap_or(0.0);
    let p99_ms = text
        .lines()
        .find(|l| l.trim_start().starts_with("99%"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(parse_latency_ms)
        .unwrap_or(f64::NAN);
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    let bytes = requests * load.bytes as f64;
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        eprintln!("{} via pid {pid}: wrk reported errors:\n{text}", load.name);
    }
    Ok(Run {
        requests,
        requests_per_sec: rps,
        p99_ms,
        bytes_per_sec: bytes / f64::from(seconds),
        front_cpu_per_gib: if bytes > 0.0 {
            cpu / (bytes / GIB)
        } else {
            0.0
        },
    })
}

fn parse_after(text: &str, label: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.trim_start().starts_with(label))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// wrk's latency ("812.00us", "3.10ms", "1.20s") in milliseconds.
fn parse_latency_ms(s: &str) -> f64 {
    let num = |t: &str| t.parse::<f64>().unwrap_or(f64::NAN);
    if let Some(v) = s.strip_suffix("us") {
        num(v) / 1000.0
    } else if let Some(v) = s.strip_suffix("ms") {
        num(v)
    } else if let Some(v) = s.strip_suffix('s') {
        num(v) * 1000.0
    } else {
        f64::NAN
    }
}
