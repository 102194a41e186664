//! `tcpr balance`: the L7 load balancer (runtime in `tcpr_balance::runtime`).

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tcpr_balance::runtime::{self, Options};
use tcpr_balance::Config;

/// `tcpr balance`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BalanceArgs {
    /// Run with this config file (SIGHUP reads it again, SIGTERM drains).
    #[arg(long, conflicts_with = "check", required_unless_present = "check")]
    config: Option<PathBuf>,
    /// Check this config file: exit 0 when valid, else print
    /// `FILE:LINE:COL: what is wrong` and exit 1.
    #[arg(long)]
    check: Option<PathBuf>,
    /// Seconds to wait for each answer of an agent during a handoff
    /// (0.001 to 3600).
    #[arg(long, default_value = "2", value_parser = crate::bounds::step_timeout)]
    handoff_timeout: Duration,
    /// Seconds SIGTERM's drain waits for proxied connections (fallbacks,
    /// members without an agent) to end by themselves; then it resets
    /// them (a reset, not a FIN: a cut answer must not look complete) and
    /// exits. Default: wait as long as they last. Keep it below a service
    /// manager's stop timeout (systemd's TimeoutStopSec, 90 s by default),
    /// whose SIGKILL ends them with a FIN. 1 to 86400.
    #[arg(long, value_parser = idle)]
    drain_timeout: Option<Duration>,
    /// Steer no flow: proxy every connection (for comparison, or a front
    /// host without a steering datapath).
    #[arg(long)]
    no_steering: bool,
    /// The interface the VIPs' packets arrive on and steered flows leave
    /// by (default: the one holding the first listener's first address).
    #[arg(long)]
    steer_device: Option<String>,
    /// The steering datapath: `bpf` (a tc ingress program and a
    /// preallocated BPF hash map: Linux 6.6, CAP_BPF), `nft` (an nf_tables
    /// netdev table), or `auto`: BPF where it loads, else nf_tables (with
    /// a warning saying why).
    #[arg(long, value_enum, default_value_t = Datapath::Auto)]
    steer_datapath: Datapath,
    /// Flows steered at once at most (`bpf`: both address families
    /// together, its map allocated whole at start, ~130 bytes an entry;
    /// `nft`: per address family); beyond it connections are proxied.
    #[arg(long, default_value_t = tcpr_steer::nft::DEFAULT_CAPACITY as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    steer_capacity: u32,
    /// Seconds a steering entry stays after the last packet of a flow
    /// whose client sent its FIN or RST (for the last ACKs, and for a
    /// half-closed client still receiving); 0.01 to 3600.
    #[arg(long, default_value = "5", value_parser = linger)]
    steer_linger: Duration,
    /// Seconds a steering entry stays after the last packet of a flow that
    /// goes on (no FIN or RST from its client): a handed-off connection
    /// whose client sends nothing for longer loses its steering, and its
    /// next packet meets the front's stack (a reset). Keep it above the
    /// longest silence of the served protocol (idle keep-alive, websockets
    /// without pings); 1 to 86400.
    #[arg(long, default_value = "3600", value_parser = idle)]
    steer_idle: Duration,
    /// Where the BPF datapath pins its map and program link, so that the
    /// flows it steers outlive this process (killed, or stopped with
    /// SIGTERM) and the next `tcpr balance` on the interface takes them
    /// over: a directory on a BPF file system. The default's is mounted
    /// if need be, in the host's mount namespace only (not under `ip netns
    /// exec`, whose own mount namespace goes with the command).
    #[arg(long, default_value = tcpr_steer::DEFAULT_PIN_DIR)]
    steer_pin_dir: PathBuf,
    #[command(subcommand)]
    cmd: Option<BalanceCmd>,
}

/// `--steer-datapath`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Datapath {
    Auto,
    Bpf,
    Nft,
}

#[derive(clap::Subcommand, Debug)]
enum BalanceCmd {
    /// Print a running balancer's metrics for people.
    Status {
        /// Its `[metrics] listen` address.
        #[arg(long)]
        metrics: SocketAddr,
    },
}

impl BalanceArgs {
    /// Whether it runs a balancer (`--check` and `status` only read).
    pub(crate) fn runs(&self) -> bool {
        self.cmd.is_none() && self.check.is_none()
    }

    /// It will steer with BPF and nothing else.
    pub(crate) fn needs_bpf(&self) -> bool {
        !self.no_steering && self.steer_datapath == Datapath::Bpf
    }
}

/// Runs `tcpr balance`; the exit status.
pub fn run(args: BalanceArgs) -> Result<i32> {
    if let Some(BalanceCmd::Status { metrics }) = args.cmd {
        return status(metrics).map(|()| 0);
    }
    if let Some(file) = args.check {
        return Ok(match runtime::check(&file) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{e}");
                1
            }
        });
    }
    let config_path = args.config.clone().context("--config FILE is required")?;
    // Before the steering datapath starts its sweeper thread.
    runtime::block_signals()?;
    // A balancer that cannot start changes nothing: in particular it does
    // not take the steering over from one still running.
    let checked = runtime::check_start(&config_path)?;
    let steering = if args.no_steering {
        None
    } else {
        Some(open_steering(&args, checked.config())?)
    };
    runtime::run(Options {
        config_path,
        checked,
        steering,
        handoff_timeout: args.handoff_timeout,
        drain_timeout: args.drain_timeout,
    })?;
    Ok(0)
}

fn linger(arg: &str) -> Result<Duration, String> {
    crate::bounds::seconds(arg, 0.01, 3600.0)
}

fn idle(arg: &str) -> Result<Duration, String> {
    crate::bounds::seconds(arg, 1.0, 86_400.0)
}

/// The steering datapath on the VIPs' interface.
fn open_steering(args: &BalanceArgs, config: &Config) -> Result<Arc<dyn tcpr_steer::Steering>> {
    let device = match &args.steer_device {
        Some(d) => d.clone(),
        None => {
            let first = config
                .listeners
                .iter()
                .flat_map(|l| l.bind.iter())
                .next()
                .context("the config has no listening address")?;
            tcpr_host::addr::find(first.ip())
                .with_context(|| {
                    format!(
                        "cannot find the interface of {}: give --steer-device",
                        first.ip()
                    )
                })?
                .ifname
        }
    };
    let context = || format!("cannot install the steering datapath on {device}");
    let mut bpf_cfg = tcpr_steer::BpfConfig::new(&device);
    bpf_cfg.capacity = args.steer_capacity as usize;
    bpf_cfg.linger = args.steer_linger;
    bpf_cfg.idle = args.steer_idle;
    bpf_cfg.pin_dir = args.steer_pin_dir.clone();
    if args.steer_datapath != Datapath::Nft {
        // A setting out of BPF's range is the user's to fix, not a reason
        // to fall back.
        bpf_cfg
            .check()
            .map_err(|e| anyhow::anyhow!("the BPF steering datapath: {e}"))?;
    }
    let bpf = || {
        let s = tcpr_steer::BpfSteering::install(bpf_cfg.clone())?;
        if let Some(dir) = s.pinned_at() {
            println!("tcpr balance steering pinned at {}", dir.display());
        }
        let c = s.carried_over();
        if c.carried + c.lost > 0 {
            println!(
                "tcpr balance took over {} steered flows from the datapath before \
                 ({} did not fit)",
                c.carried, c.lost
            );
        }
        // A table left by a balancer that ran on nf_tables goes on
        // forwarding the flows it steered (BPF passes on what it does not
        // steer), until they end; once it holds none it is removed.
        let left = tcpr_steer::nft::remove_table_if_unused(tcpr_steer::nft::DEFAULT_TABLE)?;
        if let Some(left) = left {
            let running = if left.in_use {
                "; a balancer on nf_tables still runs on it"
            } else {
                ""
            };
            println!(
                "tcpr balance left the nf_tables steering table {} with the {} flows \
                 it steers{running} (removed at a start once they have ended)",
                tcpr_steer::nft::DEFAULT_TABLE,
                left.flows
            );
        }
        Ok::<_, tcpr_steer::SteerError>(s)
    };
    let nft = || {
        let mut cfg = tcpr_steer::NftConfig::new(&device);
        cfg.capacity = args.steer_capacity as usize;
        cfg.linger = args.steer_linger;
        cfg.idle = args.steer_idle;
        let s = tcpr_steer::NftSteering::install(cfg).with_context(context)?;
        let c = s.carried_over();
        if c.carried > 0 {
            println!(
                "tcpr balance took over {} steered flows from the datapath before",
                c.carried
            );
        }
        if c.lost > 0 {
            println!(
                "tcpr balance replaced a steering table of another interface or an older \
                 version: the {} flows it steered are lost",
                c.lost
            );
        }
        Ok::<_, anyhow::Error>(s)
    };
    let steering: Arc<dyn tcpr_steer::Steering> = match args.steer_datapath {
        Datapath::Bpf => Arc::new(bpf().with_context(context)?),
        Datapath::Nft => Arc::new(nft()?),
        Datapath::Auto => match bpf() {
            Ok(s) => Arc::new(s),
            Err(e) => {
                eprintln!("tcpr balance: the BPF datapath is not available on {device}: {e}");
                Arc::new(nft()?)
            }
        },
    };
    println!("tcpr balance steering: {} on {device}", steering.name());
    Ok(steering)
}

/// Prints the metrics as a table: one row per sample.
fn status(addr: SocketAddr) -> Result<()> {
    let text = tcpr_balance::serve_metrics::fetch(addr)
        .with_context(|| format!("cannot read the metrics at {addr}"))?;
    let samples = tcpr_balance::parse_metrics(&text);
    // Histogram buckets are for machines; people read the sum and count.
    let rows: Vec<(String, String)> = samples
        .iter()
        .filter(|s| !s.name.ends_with("_bucket"))
        .map(|s| {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let name = if labels.is_empty() {
                s.name.clone()
            } else {
                format!("{}{{{}}}", s.name, labels.join(","))
            };
            (name, format_value(s.value))
        })
        .collect();
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    println!("{:<width$}  VALUE", "METRIC");
    for (name, value) in rows {
        println!("{name:<width$}  {value}");
    }
    Ok(())
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.6}")
    }
}
