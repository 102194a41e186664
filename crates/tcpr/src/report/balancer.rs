//! The report's balancer section: `tcpr balance` against HAProxy (issue
//! 6's benchmark, `crate::bench_balance`), its goal rows and what limits
//! a goal not met.

use super::Samples;
use crate::bench_balance::{BalanceFigures, FrontFigures, Load, LoadRow, TcprFigures};
use std::fmt::Write as _;
use std::path::Path;

/// The goals of issue 6.
pub(super) mod goals {
    /// tcpr's front CPU per GiB over HAProxy's, at most.
    pub(crate) const CPU_RATIO: f64 = 0.1;
    /// tcpr's small-request rate over HAProxy's, at least.
    pub(crate) const RATE_RATIO: f64 = 1.0;
}

/// "median (min–max)" or, with no samples (a figure that does not apply
/// to the load), a dash.
fn spread_or_dash(s: &Samples, digits: usize) -> String {
    if s.len() == 0 {
        "–".into()
    } else {
        s.spread(digits)
    }
}

/// The runs behind each figure, said plainly.
fn runs_said(b: &BalanceFigures) -> String {
    match b.runs {
        1 => "one run (no spread)".into(),
        n => format!("median (min–max) of {n} runs"),
    }
}

/// The goal rows of the report's Goals table.
pub(super) fn goal_rows(w: &mut String, b: &BalanceFigures) {
    for r in &b.rows {
        if r.load.is_small() {
            rate_goal_row(w, "balancer", r, &r.tcpr);
        } else {
            let ratio = r.tcpr.cpu_ratio.median();
            let _ = writeln!(
                w,
                "| balancer: front CPU per GiB ≤ 1/{:.0} of HAProxy's, {} (issue 6) | {ratio:.3}x ({:.3} vs {:.3} s/GiB) | {} |",
                1.0 / goals::CPU_RATIO,
                r.load.name,
                r.tcpr.front.cpu_per_gib.median(),
                r.haproxy.cpu_per_gib.median(),
                super::verdict(r.tcpr.cpu_ratio.len() > 0 && ratio <= goals::CPU_RATIO)
            );
        }
    }
    for r in b.rows.iter().filter(|r| r.load.is_small()) {
        let who = "balancer, fd-taking backends (`agent --unix`)";
        rate_goal_row(w, who, r, &r.fd);
    }
}

/// The goal row of `t`'s (`who`'s) request rate at `r`'s load.
fn rate_goal_row(w: &mut String, who: &str, r: &LoadRow, t: &TcprFigures) {
    let ratio = t.rps_ratio.median();
    let _ = writeln!(
        w,
        "| {who}: requests/s not below HAProxy's, {} (issue 6) | {ratio:.2}x ({:.0} vs {:.0} r/s) | {} |",
        r.load.name,
        t.front.requests_per_sec.median(),
        r.haproxy.requests_per_sec.median(),
        super::verdict(ratio >= goals::RATE_RATIO)
    );
}

/// What limits each balancer goal not met, from the figures.
pub(super) fn why_not(b: &BalanceFigures, cores: usize) -> Vec<String> {
    let mut notes = Vec::new();
    for r in &b.rows {
        for (t, which) in [(&r.tcpr, FORWARD), (&r.fd, FD_TAKING)] {
            if r.load.is_small() && t.rps_ratio.median() < goals::RATE_RATIO {
                notes.push(rate_note(&r.load, &r.haproxy, t, which, cores));
            }
        }
        if !r.load.is_small() && r.tcpr.cpu_ratio.median() > goals::CPU_RATIO {
            notes.push(cpu_note(r));
        }
    }
    notes
}

/// The two tcpr configurations, as notes name them.
const FORWARD: &str = "tcpr (agents --forward to unmodified servers)";
const FD_TAKING: &str = "tcpr (agents --unix to fd-taking servers)";

/// The share of the machine's cores above which the front's own CPU is
/// said to limit the request rate.
const FRONT_BOUND_SHARE: f64 = 0.5;

/// "median (min–max)" with as many decimals as the median's size needs
/// for about three significant digits.
fn spread_sig(s: &Samples) -> String {
    let m = s.median().abs();
    let digits = if m >= 100.0 {
        0
    } else if m >= 10.0 {
        1
    } else if m >= 1.0 {
        2
    } else {
        3
    };
    s.spread(digits)
}

/// Bytes in a GiB and a MiB.
const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// Why tcpr's front CPU per GiB stays over a tenth of HAProxy's.
fn cpu_note(r: &LoadRow) -> String {
    let (t, h) = (
        r.tcpr.front.cpu_per_gib.median(),
        r.haproxy.cpu_per_gib.median(),
    );
    let gib_per_response = r.load.bytes as f64 / GIB;
    // tcpr's front works per connection (a handoff), HAProxy's per byte:
    // the response size where tcpr's would be a tenth of HAProxy's.
    let tcpr_s_per_conn = t * gib_per_response;
    let break_even_mib = tcpr_s_per_conn / (goals::CPU_RATIO * h) * GIB / MIB;
    format!(
        "{}: tcpr's front spends {t:.3} s of CPU per GiB against HAProxy's {h:.3} ({:.3}x). \
         Its work is per connection, not per byte: {:.2} ms of CPU per response (the \
         handoff: {:.2} ms on average, {:.0} handoffs, {:.0} fallbacks), where HAProxy's \
         grows with the bytes it copies. At these rates tcpr's front would spend a tenth \
         of HAProxy's from responses of about {break_even_mib:.1} MiB up.",
        r.load.name,
        r.tcpr.cpu_ratio.median(),
        tcpr_s_per_conn * 1e3,
        r.tcpr.served.mean_handoff_ms(),
        r.tcpr.served.handoffs,
        r.tcpr.served.fallbacks,
    )
}

/// Why a small-request rate of the tcpr configuration `t` (`which`)
/// stays under HAProxy's (`haproxy`).
fn rate_note(
    load: &Load,
    haproxy: &FrontFigures,
    t: &TcprFigures,
    which: &str,
    cores: usize,
) -> String {
    let s = &t.served;
    let (t_rps, h_rps) = (
        t.front.requests_per_sec.median(),
        haproxy.requests_per_sec.median(),
    );
    let conns = f64::from(load.connections);
    let head = format!(
        "{}: {which} serves {t_rps:.0} requests/s against HAProxy's {h_rps:.0} ({:.2}x).",
        load.name,
        t.rps_ratio.median()
    );
    if !load.close || s.handoff_seconds_count == 0.0 {
        // Keep-alive: a handful of handoffs, then the backend serves the
        // connection directly; the front is not in the way.
        return format!(
            "{head} Only {:.0} of {:.0} requests needed a handoff (keep-alive): the rest \
             went to the backend directly, so the gap is the backend's and the client's, \
             not the front's (the runs' spread says how much is noise).",
            s.handoffs, t.requests
        );
    }
    if let Some(share) = load.front_share {
        // Capped: the front's CPU per request is the limit, by design.
        return format!(
            "{head} Each front was held to {share:.2} of a core, so its CPU per request is \
             what limits it: tcpr's front spends {:.3} ms a request against HAProxy's {:.3} \
             (each used {} and {} of its cap).",
            t.front.cpu_ms_per_request.median(),
            haproxy.cpu_ms_per_request.median(),
            spread_sig(&t.front.cap_use),
            spread_sig(&haproxy.cap_use),
        );
    }
    // wrk keeps every connection busy: by Little's law each request takes
    // connections / rate.
    let per_request_ms = |rps: f64| conns * 1e3 / rps;
    let t_cpu = t.front.cpu_ms_per_request.median();
    let front_cores = t_cpu * t_rps / 1e3;
    let limit = if front_cores < FRONT_BOUND_SHARE * cores as f64 {
        "The front's CPU is not the limit: the machine's two cores are, shared by the \
         front, the agents, the servers and wrk, which together spend more CPU per request \
         than HAProxy's run does (the backend's restore, delivery and, with --forward, \
         relay come on top of what a proxy does; docs/profiles/balance-new-connections.md \
         has the profile, process by process)"
    } else {
        "The front's own CPU is most of what limits it"
    };
    format!(
        "{head} Every request is a new connection and every connection a handoff, in \
         batches (a check of the kept TLS channel to the agent, lock, freeze, PREPARE, \
         steering entry, COMMIT, each a few syscalls on both hosts). wrk keeps {conns:.0} connections busy, so each request takes \
         {:.2} ms through tcpr against {:.2} ms through HAProxy, which only connects to the \
         backend; the balancer times its handoffs at {:.2} ms on average, to the agent's \
         COMMITTED ({:.0} handoffs, {:.0} fallbacks). tcpr's front spends {t_cpu:.2} ms of \
         CPU per request (HAProxy {:.2} ms): at {t_rps:.0} requests/s that keeps \
         {front_cores:.1} of the machine's {cores} cores busy (client, backends and agents \
         share them). {limit}. A handoff per connection is the price of leaving the data \
         path; it pays off with bytes (the CPU rows) and with keep-alive.",
        per_request_ms(t_rps),
        per_request_ms(h_rps),
        s.mean_handoff_ms(),
        s.handoffs,
        s.fallbacks,
        haproxy.cpu_ms_per_request.median(),
    )
}

/// How many connections the small loads keep busy: "32 connections", or
/// "32 connections (128 in *small, new, 4x the connections*)".
fn small_connections(b: &BalanceFigures) -> String {
    let mut small = b.rows.iter().map(|r| &r.load).filter(|l| l.is_small());
    let Some(first) = small.next() else {
        return "no small load".into();
    };
    let others: Vec<String> = small
        .filter(|l| l.connections != first.connections)
        .map(|l| format!("{} in *{}*", l.connections, l.name))
        .collect();
    if others.is_empty() {
        format!("{} connections", first.connections)
    } else {
        format!("{} connections ({})", first.connections, others.join(", "))
    }
}

/// The report's section.
pub(super) fn section(w: &mut String, b: &BalanceFigures, plot: &Path) {
    let _ = writeln!(w, "## Balancer vs HAProxy\n");
    let _ = writeln!(
        w,
        "`tcpr balance` and {} (Debian package) on the same front host, in namespaces with \
         a client and two backends on one bridge. tcpr runs in two configurations, two \
         listeners of one `tcpr balance`: *fwd*, each backend a `tcpr agent --vip --forward` \
         relaying the connection (splice) to an unmodified HTTP server, and *fd*, each \
         backend a `tcpr agent --unix` passing the connection over a unix socket to a server \
         that takes passed fds (the bench's own, not an unmodified server: the same response \
         code, an event loop per server, only the way the connection arrives differs). \
         HAProxy (to the unmodified servers) on port 81 of the VIP, tcpr on 80 (fwd) and 82 \
         (fd), all running throughout, so each load runs against the three back to back \
         (each first in turn), same wrk (2 threads, {} s per run, `--latency`). Small \
         responses (a few bytes) over new connections (`Connection: close`) and over \
         keep-alive, {}; 1 MiB and 100 MiB responses, 4 connections, each a new \
         connection. *front CPU* is the front process's user + system time from \
         /proc/PID/stat (10 ms ticks; softirq work for the front's interface is not \
         attributed to a process and not counted), per GiB wrk read (responses still in \
         flight when it stopped included). Each figure is the {}; each ratio is tcpr over \
         HAProxy within a run.\n",
        b.haproxy_version
            .split(" - ")
            .next()
            .unwrap_or(&b.haproxy_version),
        b.seconds,
        small_connections(b),
        runs_said(b),
    );
    for r in b.rows.iter().filter(|r| r.haproxy.cap_use.len() > 0) {
        let _ = writeln!(
            w,
            "*{}* is the small requests over new connections again, with each front (HAProxy's \
             process, `tcpr balance`'s) held to {:.2} of one core by a cgroup CPU quota for the \
             run. On this machine every process of the topology shares the same cores, so the \
             uncapped row measures the CPU of the whole path per request, backends and client \
             included, and tcpr moves work from the front to the backends by design (the \
             restore, and every response byte). A front in production has a machine of its \
             own, and what it can serve is its CPU per request: capped, each front is the \
             bottleneck, while the rest of the machine stands in for clients and backends \
             with room to spare. Each front used {} (HAProxy), {} (fwd) and {} (fd) of its \
             cap (1: the cap was the limit).\n",
            r.load.name,
            r.load.front_share.unwrap_or(f64::NAN),
            spread_sig(&r.haproxy.cap_use),
            spread_sig(&r.tcpr.front.cap_use),
            spread_sig(&r.fd.front.cap_use),
        );
    }
    let _ = writeln!(w, "![balancer against HAProxy]({})\n", plot.display());
    let _ = writeln!(
        w,
        "Requests (higher is better, except p99 and CPU):\n\n\
         | load | HAProxy r/s | tcpr fwd r/s | fwd / HAProxy | tcpr fd r/s | fd / HAProxy | HAProxy p99 ms | fwd p99 ms | fd p99 ms | HAProxy front CPU ms/request | fwd front CPU ms/request | fd front CPU ms/request |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in &b.rows {
        let (h, t, d) = (&r.haproxy, &r.tcpr, &r.fd);
        let _ = writeln!(
            w,
            "| {} | {} | {} | {}x | {} | {}x | {} | {} | {} | {} | {} | {} |",
            r.load.name,
            h.requests_per_sec.spread(0),
            t.front.requests_per_sec.spread(0),
            t.rps_ratio.spread(2),
            d.front.requests_per_sec.spread(0),
            d.rps_ratio.spread(2),
            h.p99_ms.spread(1),
            t.front.p99_ms.spread(1),
            d.front.p99_ms.spread(1),
            spread_sig(&h.cpu_ms_per_request),
            spread_sig(&t.front.cpu_ms_per_request),
            spread_sig(&d.front.cpu_ms_per_request),
        );
    }
    let ratio_or_dash = |s: &Samples| match s.len() {
        0 => "–".into(),
        _ => format!("{}x", s.spread(3)),
    };
    let _ = writeln!(
        w,
        "\nBytes (front CPU per GiB: lower is better):\n\n\
         | load | HAProxy MiB/s | tcpr fwd MiB/s | tcpr fd MiB/s | HAProxy CPU s/GiB | fwd CPU s/GiB | fwd / HAProxy | fd CPU s/GiB | fd / HAProxy |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for r in b.rows.iter().filter(|r| !r.load.is_small()) {
        let (h, t, d) = (&r.haproxy, &r.tcpr, &r.fd);
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.load.name,
            h.mib_per_sec.spread(0),
            t.front.mib_per_sec.spread(0),
            d.front.mib_per_sec.spread(0),
            spread_or_dash(&h.cpu_per_gib, 3),
            spread_or_dash(&t.front.cpu_per_gib, 3),
            ratio_or_dash(&t.cpu_ratio),
            spread_or_dash(&d.front.cpu_per_gib, 3),
            ratio_or_dash(&d.cpu_ratio),
        );
    }
    let _ = writeln!(
        w,
        "\nThe balancer's own counters over the same runs (all runs together), and wrk's \
         errors (socket errors and non-2xx responses) on each side:\n\n\
         | load | tcpr | requests (wrk) | handoffs | fallbacks | proxied | mean handoff ms | wrk errors HAProxy | wrk errors tcpr |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &b.rows {
        for (which, t) in [("fwd", &r.tcpr), ("fd", &r.fd)] {
            let s = &t.served;
            let _ = writeln!(
                w,
                "| {} | {which} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} |",
                r.load.name,
                t.requests,
                s.handoffs,
                s.fallbacks,
                s.proxied,
                s.mean_handoff_ms(),
                r.haproxy.errors,
                t.front.errors,
            );
        }
    }
    let _ = writeln!(
        w,
        "\nHandoffs exceed wrk's requests by the connections still open when wrk stops; \
         with keep-alive only the first request of each connection is handed off.\n"
    );
}

/// The section when the balancer was left out (`--balance-seconds 0`).
pub(super) fn skipped(w: &mut String) {
    let _ = writeln!(
        w,
        "## Balancer vs HAProxy\n\nNot measured in this run (`--balance-seconds 0`).\n"
    );
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::bench_balance::{loads, Served};

    fn front(rps: [f64; 3], cpu: [f64; 3], cpu_ms: f64) -> FrontFigures {
        FrontFigures {
            cpu_ms_per_request: Samples::new(vec![cpu_ms; 3]),
            requests_per_sec: Samples::new(rps.to_vec()),
            p99_ms: Samples::new(vec![2.0, 3.0, 4.0]),
            mib_per_sec: Samples::new(vec![100.0; 3]),
            cpu_per_gib: Samples::new(cpu.to_vec()),
            errors: 0.0,
            cap_use: Samples::new(vec![]),
        }
    }

    /// Figures like a run on the 2-core VM: new connections slower than
    /// HAProxy, keep-alive faster, 1 MiB over a tenth of its CPU, 100 MiB
    /// under; with fd-taking backends, 1.5 times the rates of the forward
    /// ones (new connections 0.42x HAProxy's), half the CPU.
    pub(in crate::report) fn figures() -> BalanceFigures {
        let nan = [f64::NAN; 3];
        let per_load = [
            ([10_000.0; 3], [2_500.0, 2_800.0, 3_000.0], nan, nan),
            ([11_000.0; 3], [5_500.0; 3], nan, nan),
            ([4_000.0; 3], [3_000.0; 3], nan, nan),
            ([40_000.0; 3], [48_000.0; 3], nan, nan),
            ([400.0; 3], [500.0; 3], [2.0; 3], [0.5; 3]),
            ([4.0; 3], [10.0; 3], [1.5; 3], [0.015; 3]),
        ];
        let rows = loads()
            .into_iter()
            .zip(per_load)
            .map(|(load, (h_rps, t_rps, h_cpu, t_cpu))| {
                let ratio = |t: [f64; 3], h: [f64; 3]| {
                    Samples::new(t.iter().zip(h).map(|(t, h)| t / h).collect())
                };
                let tcpr = |rps: [f64; 3], cpu: [f64; 3], cpu_ms: f64, requests: f64| TcprFigures {
                    rps_ratio: ratio(rps, h_rps),
                    cpu_ratio: ratio(cpu, h_cpu),
                    front: front(rps, cpu, cpu_ms),
                    requests,
                    served: Served {
                        handoffs: requests + 32.0,
                        fallbacks: 0.0,
                        proxied: 0.0,
                        handoff_seconds_sum: (requests + 32.0) / 100.0,
                        handoff_seconds_count: requests + 32.0,
                    },
                };
                let capped = |mut f: FrontFigures| {
                    if load.front_share.is_some() {
                        f.cap_use = Samples::new(vec![0.99; 3]);
                    }
                    f
                };
                let (mut t, mut fd) = (
                    tcpr(t_rps, t_cpu, 0.5, 8_400.0),
                    tcpr(
                        t_rps.map(|r| r * 1.5),
                        t_cpu.map(|c| c / 2.0),
                        0.25,
                        12_600.0,
                    ),
                );
                t.front = capped(t.front);
                fd.front = capped(fd.front);
                LoadRow {
                    haproxy: capped(front(h_rps, h_cpu, 0.1)),
                    tcpr: t,
                    fd,
                    load,
                }
            })
            .collect();
        BalanceFigures {
            seconds: 3,
            runs: 3,
            haproxy_version: "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
                .into(),
            rows,
        }
    }

    #[test]
    fn goal_rows_compare_rates_for_small_loads_and_cpu_for_big_ones() {
        let mut w = String::new();
        goal_rows(&mut w, &figures());
        let rows: Vec<&str> = w.lines().collect();
        assert_eq!(rows.len(), 10);
        assert!(rows[0].contains("requests/s not below HAProxy's, small, new connections"));
        assert!(rows[0].ends_with("| 0.28x (2800 vs 10000 r/s) | not met |"));
        assert!(rows[1].contains("requests/s not below HAProxy's, small, new, 4x the connections"));
        assert!(rows[1].ends_with("| 0.50x (5500 vs 11000 r/s) | not met |"));
        assert!(rows[2].contains("requests/s not below HAProxy's, small, new, front capped"));
        assert!(rows[2].ends_with("| 0.75x (3000 vs 4000 r/s) | not met |"));
        assert!(rows[3].ends_with("| 1.20x (48000 vs 40000 r/s) | met |"));
        assert!(rows[4].contains("front CPU per GiB ≤ 1/10 of HAProxy's, 1 MiB responses"));
        assert!(rows[4].ends_with("| 0.250x (0.500 vs 2.000 s/GiB) | not met |"));
        assert!(rows[5].ends_with("| 0.010x (0.015 vs 1.500 s/GiB) | met |"));
        // The fd-taking backends' rates, small loads only.
        assert!(rows[6].contains("fd-taking backends (`agent --unix`): requests/s not below HAProxy's, small, new connections"));
        assert!(rows[6].ends_with("| 0.42x (4200 vs 10000 r/s) | not met |"));
        assert!(rows[7].ends_with("| 0.75x (8250 vs 11000 r/s) | not met |"));
        assert!(rows[8].ends_with("| 1.12x (4500 vs 4000 r/s) | met |"));
        assert!(rows[9].ends_with("| 1.80x (72000 vs 40000 r/s) | met |"));
    }

    #[test]
    fn notes_are_for_goals_not_met_and_computed_from_the_figures() {
        let notes = why_not(&figures(), 2);
        assert_eq!(notes.len(), 6, "{notes:#?}");
        // 32 connections busy at 2800 requests/s: 11.43 ms a request; at
        // 0.5 ms of CPU each, 1.4 cores.
        assert!(notes[0].starts_with(
            "small, new connections: tcpr (agents --forward to unmodified servers) serves 2800"
        ));
        assert!(notes[0].contains("11.43 ms through tcpr against 3.20 ms through HAProxy"));
        assert!(notes[0].contains("0.50 ms of CPU per request (HAProxy 0.10 ms)"));
        assert!(notes[0].contains("keeps 1.4 of the machine's 2 cores busy"));
        assert!(notes[0].contains("The front's own CPU is most of what limits it."));
        let mut idle_front = figures();
        idle_front.rows[0].tcpr.front.cpu_ms_per_request = Samples::new(vec![0.1]);
        assert!(why_not(&idle_front, 2)[0].contains("The front's CPU is not the limit"));
        // 4200 requests/s with fd-taking backends: 7.62 ms a request.
        let fd = &notes[1];
        assert!(
            fd.contains("(agents --unix to fd-taking servers) serves 4200"),
            "{fd}"
        );
        assert!(fd.contains("7.62 ms through tcpr against 3.20 ms through HAProxy"));
        // 128 connections busy at 5500 requests/s: 23.27 ms a request.
        assert!(notes[2].starts_with("small, new, 4x the connections: tcpr (agents --forward"));
        assert!(
            notes[2].contains("wrk keeps 128 connections busy"),
            "{}",
            notes[2]
        );
        assert!(notes[2].contains("23.27 ms through tcpr against 11.64 ms through HAProxy"));
        assert!(notes[3].contains("(agents --unix to fd-taking servers) serves 8250"));
        // The capped row's note says the cap was the limit.
        assert!(notes[4].starts_with("small, new, front capped: tcpr (agents --forward"));
        assert!(notes[4].contains("held to 0.25 of a core"), "{}", notes[4]);
        assert!(notes[4].contains("0.500 ms a request against HAProxy's 0.100"));
        assert!(notes[4].contains("used 0.990 (0.990–0.990) and 0.990"));
        let notes = &notes[3..];
        assert!(notes[2].starts_with("1 MiB responses: tcpr's front spends 0.500 s"));
        // 0.5 s/GiB at 1 MiB a response is 0.49 ms each; a tenth of
        // HAProxy's 2 s/GiB from 0.49 ms / 0.2 s per GiB = 2.5 MiB.
        assert!(notes[2].contains("0.49 ms of CPU per response"));
        assert!(notes[2].contains("from responses of about 2.5 MiB up"));
    }

    #[test]
    fn the_section_has_both_sides_the_ratios_and_the_counters() {
        let mut w = String::new();
        section(&mut w, &figures(), Path::new("balancer.png"));
        assert!(w.contains("HAProxy version 2.6.12-1+deb12u4 2026/10/17 (Debian package)"));
        assert!(w.contains("median (min–max) of 3 runs"));
        assert!(w.contains(
            "keep-alive, 32 connections (128 in *small, new, 4x the connections*); 1 MiB"
        ));
        assert!(w.contains(
            "| small, new connections | 10000 (10000–10000) | 2800 (2500–3000) | 0.28 (0.25–0.30)x | 4200 (3750–4500) | 0.42 (0.38–0.45)x | 3.0 (2.0–4.0) | 3.0 (2.0–4.0) | 3.0 (2.0–4.0) | 0.100 (0.100–0.100) | 0.500 (0.500–0.500) | 0.250 (0.250–0.250) |"
        ));
        // CPU per GiB only where the load carries bytes.
        assert!(w.contains("| 100 MiB responses | 100 (100–100) | 100 (100–100) | 100 (100–100) | 1.500 (1.500–1.500) | 0.015 (0.015–0.015) | 0.010 (0.010–0.010)x | 0.007 (0.007–0.007) | 0.005 (0.005–0.005)x |"));
        assert!(!w.contains("| small, keep-alive | 100 (100–100)"));
        // The capped load is explained, with how much of its cap each used.
        assert!(w.contains("*small, new, front capped* is the small requests"));
        assert!(w.contains("held to 0.25 of one core"));
        assert!(w.contains("Each front used 0.990 (0.990–0.990) (HAProxy)"));
        assert_eq!(
            spread_sig(&Samples::new(vec![152.3, 160.0, 164.0])),
            "160 (152–164)"
        );
        assert_eq!(
            spread_sig(&Samples::new(vec![1.5, 1.765, 2.0])),
            "1.76 (1.50–2.00)"
        );
        assert!(w.contains("| small, keep-alive | fwd | 8400 | 8432 | 0 | 0 | 10.00 | 0 | 0 |"));
        assert!(w.contains("| small, keep-alive | fd | 12600 | 12632 | 0 | 0 | 10.00 | 0 | 0 |"));
        let mut one = figures();
        one.runs = 1;
        let mut w = String::new();
        section(&mut w, &one, Path::new("balancer.png"));
        assert!(w.contains("one run (no spread)"));
    }
}
