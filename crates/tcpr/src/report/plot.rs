//! The report's PNG plots, drawn with plotters' bitmap backend. Text needs
//! a TrueType font: plotters' `ab_glyph` feature draws it from a TTF read
//! at run time (Debian's fonts-dejavu-core), with no fontconfig.

use super::startup::StartupFigures;
use crate::bench::EngineFigures;
use crate::bench_balance::BalanceFigures;
use crate::bench_handoff::HandoffFigures;
use crate::report::Samples;
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{SegmentedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordi32;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;

/// Where the font may be; `TCPR_REPORT_FONT` names another.
const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
/// The family name the plots ask for.
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (960, 540);
const TITLE_PX: u32 = 24;
const LABEL_PX: u32 = 16;
/// Width of an error bar's caps, in pixels.
const CAP_PX: u32 = 8;

/// Registers the font the plots use.
pub(super) fn load_font() -> Result<()> {
    let chosen = std::env::var("TCPR_REPORT_FONT").ok();
    let path = chosen
        .as_deref()
        .into_iter()
        .chain(FONT_PATHS)
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| {
            anyhow!(
                "no font for the report's plots: install fonts-dejavu-core (scripts/setup.sh) or set TCPR_REPORT_FONT to a .ttf file"
            )
        })?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the font {path}"))?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font(FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a TrueType font plotters can read"))
}

/// File names of the plots, relative to the report.
pub(super) struct Plots {
    pub(super) engine: String,
    pub(super) engine_ratio: String,
    pub(super) lock: String,
    pub(super) handoff: String,
    pub(super) gaps: String,
}

/// Draws every plot into `dir`.
pub(super) fn draw_all(dir: &Path, e: &EngineFigures, h: &HandoffFigures) -> Result<Plots> {
    let plots = Plots {
        engine: "engine.png".into(),
        engine_ratio: "engine-ratio.png".into(),
        lock: "lock.png".into(),
        handoff: "handoff.png".into(),
        gaps: "gaps.png".into(),
    };
    engine(&dir.join(&plots.engine), e).context("engine plot")?;
    engine_ratio(&dir.join(&plots.engine_ratio), e).context("engine ratio plot")?;
    lock(&dir.join(&plots.lock), e).context("lock plot")?;
    handoff(&dir.join(&plots.handoff), h).context("handoff plot")?;
    gaps(&dir.join(&plots.gaps), h).context("gap plot")?;
    Ok(plots)
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

/// One series of medians with their min–max bars, against `x`.
struct Series<'a> {
    name: &'a str,
    color: RGBColor,
    points: Vec<(f64, &'a Samples)>,
}

/// Medians joined by a line, each with a min–max bar, on log–log axes.
fn spread_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    goal: Option<(&str, f64)>,
    legend_at: SeriesLabelPosition,
) -> Result<()> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series
        .iter()
        .flat_map(|s| s.points.iter().flat_map(|p| [p.1.min(), p.1.max()]))
        .chain(goal.map(|g| g.1));
    let (x_lo, x_hi) = bounds(xs).ok_or_else(|| anyhow!("nothing to plot"))?;
    let (y_lo, y_hi) = bounds(ys).ok_or_else(|| anyhow!("nothing to plot"))?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, TITLE_PX))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(
            (x_lo / 2.0..x_hi * 2.0).log_scale(),
            (y_lo / 1.5..y_hi * 1.5).log_scale(),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FAMILY, LABEL_PX))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| short(*v))
        .draw()
        .map_err(err)?;
    for s in series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|(x, v)| (*x, v.median())),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|(x, v)| {
                ErrorBar::new_vertical(*x, v.min(), v.median(), v.max(), color.filled(), CAP_PX)
            }))
            .map_err(err)?;
    }
    if let Some((name, y)) = goal {
        chart
            .draw_series(LineSeries::new(
                [(x_lo / 2.0, y), (x_hi * 2.0, y)],
                RED.stroke_width(1),
            ))
            .map_err(err)?
            .label(name)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, LABEL_PX))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(legend_at)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// A tick label: few digits whatever the magnitude.
fn short(v: f64) -> String {
    if v >= 100.0 || (v >= 1.0 && v.fract() == 0.0) {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Smallest and largest positive value.
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

fn engine(path: &Path, e: &EngineFigures) -> Result<()> {
    let rows = &e.rows;
    let col = |f: fn(&crate::bench::EngineRow) -> &Samples| -> Vec<(f64, &Samples)> {
        rows.iter().map(|r| (r.conns as f64, f(r))).collect()
    };
    spread_chart(
        path,
        "Per-connection cost against the bare-syscall floor",
        "connections per run",
        "µs per connection",
        &[
            Series {
                name: "freeze+dump (tcpr, no lock)",
                color: BLUE,
                points: col(|r| &r.dump_us),
            },
            Series {
                name: "freeze+dump, floor",
                color: RGBColor(120, 160, 255),
                points: col(|r| &r.floor_dump_us),
            },
            Series {
                name: "restore+resume (tcpr)",
                color: RGBColor(0, 140, 0),
                points: col(|r| &r.restore_us),
            },
            Series {
                name: "restore+resume, floor",
                color: RGBColor(130, 210, 130),
                points: col(|r| &r.floor_restore_us),
            },
            Series {
                name: "freeze(+lock)+dump (tcpr)",
                color: RGBColor(150, 0, 150),
                points: col(|r| &r.dump_locked_us),
            },
        ],
        None,
        SeriesLabelPosition::UpperRight,
    )
}

fn engine_ratio(path: &Path, e: &EngineFigures) -> Result<()> {
    let col = |f: fn(&crate::bench::EngineRow) -> &Samples| -> Vec<(f64, &Samples)> {
        e.rows.iter().map(|r| (r.conns as f64, f(r))).collect()
    };
    spread_chart(
        path,
        "tcpr against the floor, ratio within each run",
        "connections per run",
        "tcpr / floor (per-run ratio)",
        &[
            Series {
                name: "freeze+dump / floor",
                color: BLUE,
                points: col(|r| &r.dump_ratio),
            },
            Series {
                name: "restore+resume / floor",
                color: RGBColor(0, 140, 0),
                points: col(|r| &r.restore_ratio),
            },
            Series {
                name: "freeze+dump / complete floor",
                color: RGBColor(120, 160, 255),
                points: col(|r| &r.dump_full_ratio),
            },
            Series {
                name: "restore+resume / complete floor",
                color: RGBColor(130, 210, 130),
                points: col(|r| &r.restore_full_ratio),
            },
        ],
        Some(("goal: 1.3x at 100 and 10,000", super::goals::FLOOR_RATIO)),
        SeriesLabelPosition::UpperRight,
    )
}

fn handoff(path: &Path, h: &HandoffFigures) -> Result<()> {
    spread_chart(
        path,
        "Handoff of 1 to 10,000 connections to a tcpr agent",
        "connections handed off",
        "ms for the whole handoff",
        &[Series {
            name: "handoff (median, min–max)",
            color: BLUE,
            points: h
                .batches
                .iter()
                .map(|b| (b.conns as f64, &b.total_ms))
                .collect(),
        }],
        Some(("goal: 10,000 in 0.5 s", super::goals::HANDOFF_10K_MS)),
        // The time grows with the batch: the upper left stays empty.
        SeriesLabelPosition::UpperLeft,
    )
}

/// Empirical distribution functions of several sample sets, x on a log
/// axis.
fn cdf_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(String, RGBColor, &Samples)],
) -> Result<()> {
    let (lo, hi) = bounds(series.iter().flat_map(|s| s.2.sorted().iter().copied()))
        .ok_or_else(|| anyhow!("nothing to plot"))?;
    if series.iter().any(|s| s.2.len() == 0) {
        bail!("a series has no samples");
    }
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, TITLE_PX))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        // From a power of ten: plotters labels a log axis from the first
        // power of ten in its range.
        .build_cartesian_2d(
            (10f64.powf((lo / 1.2).log10().floor())..hi * 1.2).log_scale(),
            0f64..1f64,
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("fraction of samples ≤ x")
        // More than the powers of ten: the samples often span less.
        .x_labels(12)
        .label_style((FAMILY, LABEL_PX))
        .x_label_formatter(&|v| short(*v))
        .draw()
        .map_err(err)?;
    for (name, color, s) in series {
        let color = *color;
        let n = s.len() as f64;
        // A step function: each sample lifts the curve by 1/n.
        let steps = s.sorted().iter().enumerate().flat_map(|(i, v)| {
            let v = v.max(lo);
            [(v, i as f64 / n), (v, (i + 1) as f64 / n)]
        });
        chart
            .draw_series(LineSeries::new(steps, color.stroke_width(2)))
            .map_err(err)?
            .label(format!("{name}: p50 {}", short(s.median())))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, LABEL_PX))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn gaps(path: &Path, h: &HandoffFigures) -> Result<()> {
    let s = &h.stream;
    cdf_chart(
        path,
        &format!(
            "Longest gap per {} ms window of a {} MiB/s stream",
            crate::bench_handoff::WINDOW.as_millis(),
            s.rate_bytes_per_s >> 20
        ),
        "longest gap between bytes at the client, ms",
        &[
            ("moved in the window".into(), RED, &s.moved_gap_ms),
            ("same stream, not moved".into(), BLUE, &s.unmoved_gap_ms),
        ],
    )
}

fn lock(path: &Path, e: &EngineFigures) -> Result<()> {
    const COLORS: [RGBColor; 4] = [
        RGBColor(0, 0, 200),
        RGBColor(120, 160, 255),
        RGBColor(200, 0, 0),
        RGBColor(255, 150, 150),
    ];
    let mut series = Vec::new();
    for l in &e.locks {
        for (what, s) in [("acquire", &l.acquire_us), ("release", &l.release_us)] {
            let color = COLORS[series.len() % COLORS.len()];
            let flows = match l.flows {
                1 => "1 flow".to_string(),
                n => format!("{n} flows"),
            };
            series.push((format!("{} {what}, {flows}", l.datapath), color, s));
        }
    }
    cdf_chart(
        path,
        "Flow lock latency (tcpr_engine::FlowLock), per call",
        "µs until the call returns",
        &series,
    )
}

/// One bar of [`ratio_bars`]: a label and its per-run ratios.
struct Bar<'a> {
    label: &'a str,
    ratios: &'a Samples,
}

/// The y axis of [`ratio_bars`].
enum RatioAxis {
    /// From 0, for ratios within a decade or so.
    Linear,
    /// For ratios spanning decades.
    Log,
}

/// Bars of per-run ratios (the median, with a min–max bar), with the goal
/// as a line, drawn into `area`.
fn ratio_bars(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    bars: &[Bar<'_>],
    color: RGBColor,
    goal: (&str, f64),
    axis: RatioAxis,
) -> Result<()> {
    let values = bars
        .iter()
        .flat_map(|b| [b.ratios.min(), b.ratios.max()])
        .chain([goal.1]);
    let (lo, hi) = bounds(values).ok_or_else(|| anyhow!("nothing to plot"))?;
    // The last segment is the axis's end, not a bar.
    let x = (0..bars.len() as i32 - 1).into_segmented();
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, (FAMILY, LABEL_PX + 4))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64);
    match axis {
        RatioAxis::Linear => {
            let chart = builder.build_cartesian_2d(x, 0.0..hi * 1.2).map_err(err)?;
            draw_ratio_bars(chart, y_label, bars, color, goal, 0.0)
        }
        RatioAxis::Log => {
            let (lo, hi) = (lo / 2.0, hi * 2.0);
            let chart = builder
                .build_cartesian_2d(x, (lo..hi).log_scale())
                .map_err(err)?;
            draw_ratio_bars(chart, y_label, bars, color, goal, lo)
        }
    }
}

/// The bars of [`ratio_bars`] on a chart built with either axis; `floor`
/// is where the bars start.
fn draw_ratio_bars<'a, Y>(
    mut chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<SegmentedCoord<RangedCoordi32>, Y>>,
    y_label: &str,
    bars: &[Bar<'_>],
    color: RGBColor,
    goal: (&str, f64),
    floor: f64,
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let lo = floor;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .label_style((FAMILY, LABEL_PX))
        .x_labels(bars.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => bars
                .get(*i as usize)
                .map(|b| b.label.to_string())
                .unwrap_or_default(),
            SegmentValue::Last => String::new(),
        })
        .y_label_formatter(&|v| short(*v))
        .draw()
        .map_err(err)?;
    let drawn: Vec<(i32, &Samples)> = bars
        .iter()
        .enumerate()
        .filter(|(_, b)| b.ratios.len() > 0)
        .map(|(i, b)| (i as i32, b.ratios))
        .collect();
    chart
        .draw_series(drawn.iter().map(|(i, s)| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(*i), lo),
                    (SegmentValue::Exact(*i + 1), s.median()),
                ],
                color.mix(0.6).filled(),
            );
            bar.set_margin(0, 0, 24, 24);
            bar
        }))
        .map_err(err)?;
    chart
        .draw_series(drawn.iter().map(|(i, s)| {
            ErrorBar::new_vertical(
                SegmentValue::CenterOf(*i),
                s.min(),
                s.median(),
                s.max(),
                BLACK.filled(),
                CAP_PX,
            )
        }))
        .map_err(err)?;
    let (name, y) = goal;
    chart
        .draw_series(LineSeries::new(
            [(SegmentValue::Exact(0), y), (SegmentValue::Last, y)],
            RED.stroke_width(2),
        ))
        .map_err(err)?
        .label(name)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .label_font((FAMILY, LABEL_PX))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// tcpr balance over HAProxy: requests/s for every load beside front CPU
/// per GiB for the loads that carry bytes.
pub(super) fn balancer(path: &Path, b: &BalanceFigures) -> Result<()> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            "tcpr balance / HAProxy, ratio within each run (median, min–max)",
            (FAMILY, TITLE_PX),
        )
        .map_err(err)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    // tcpr with --forward agents at each load, then with fd-taking
    // backends (--unix agents) at the small loads, where they differ.
    // (Labels short enough for six bars.)
    let fd_labels: Vec<&str> = b
        .rows
        .iter()
        .map(|r| if r.load.close { "fd new" } else { "fd k-a" })
        .collect();
    let rate: Vec<Bar<'_>> = b
        .rows
        .iter()
        .map(|r| Bar {
            label: r.load.short,
            ratios: &r.tcpr.rps_ratio,
        })
        .chain(
            b.rows
                .iter()
                .zip(&fd_labels)
                .filter(|(r, _)| r.load.is_small())
                .map(|(r, label)| Bar {
                    label,
                    ratios: &r.fd.rps_ratio,
                }),
        )
        .collect();
    ratio_bars(
        &left,
        "requests/s (higher is better; fd: fd-taking backends)",
        "tcpr / HAProxy",
        &rate,
        RGBColor(0, 90, 200),
        (
            "goal for small responses: 1x",
            super::balancer::goals::RATE_RATIO,
        ),
        RatioAxis::Linear,
    )?;
    let cpu: Vec<Bar<'_>> = b
        .rows
        .iter()
        .filter(|r| !r.load.is_small())
        .map(|r| Bar {
            label: r.load.short,
            ratios: &r.tcpr.cpu_ratio,
        })
        .collect();
    ratio_bars(
        &right,
        "front CPU per GiB (lower is better)",
        "tcpr / HAProxy",
        &cpu,
        RGBColor(200, 100, 0),
        ("goal: 1/10", super::balancer::goals::CPU_RATIO),
        RatioAxis::Log,
    )?;
    root.present().map_err(err)?;
    Ok(())
}

/// `tcpr dump --leave running` against `tcpr --version`, both modes.
pub(super) fn startup(path: &Path, s: &StartupFigures) -> Result<()> {
    let spaced = format!("{} ms apart", super::startup::SPACING.as_millis());
    cdf_chart(
        path,
        "tcpr dump --leave running against a bare tcpr --version",
        "ms from spawn to exit",
        &[
            (
                format!("--version, {spaced}"),
                RGBColor(120, 160, 255),
                &s.spaced.version_ms,
            ),
            (format!("dump, {spaced}"), BLUE, &s.spaced.dump_ms),
            (
                "--version, back to back".into(),
                RGBColor(255, 150, 150),
                &s.back_to_back.version_ms,
            ),
            ("dump, back to back".into(), RED, &s.back_to_back.dump_ms),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The balancer's plot draws from its figures, whatever loads carry
    /// bytes (needs the plots' font, as the report does).
    #[test]
    fn balancer_plot_draws_a_png() {
        load_font().expect("the plots' font (scripts/setup.sh installs it)");
        let dir = std::env::temp_dir().join(format!("tcpr-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("balancer.png");
        balancer(&path, &super::super::balancer::tests::figures()).expect("plot");
        let png = std::fs::read(&path).expect("the plot");
        if let Ok(keep) = std::env::var("TCPR_PLOT_TEST_KEEP") {
            std::fs::copy(&path, keep).expect("copy");
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    }

    #[test]
    fn startup_plot_draws_a_png() {
        load_font().expect("the plots' font (scripts/setup.sh installs it)");
        let dir = std::env::temp_dir().join(format!("tcpr-plot-test-s-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("startup.png");
        startup(&path, &super::super::startup::tests::figures()).expect("plot");
        let png = std::fs::read(&path).expect("the plot");
        if let Ok(keep) = std::env::var("TCPR_PLOT_TEST_KEEP") {
            std::fs::copy(&path, format!("{keep}.startup.png")).expect("copy");
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    }
}
