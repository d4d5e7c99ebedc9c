//! What a run leaves behind: a Markdown table (numbers, machine, date, load, command) and
//! an SVG chart of throughput and p50/p99 against the number of concurrent callers.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use plotters::coord::Shift;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;

/// One (op, callers, server) measurement, summed over rounds.
pub struct Row {
    pub op: &'static str,
    pub callers: usize,
    pub server: String,
    pub ops: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Calls/s in each instance, in instance order.
    pub per_instance: Vec<f64>,
}

/// Everything the table and chart say.
pub struct Run {
    pub rows: Vec<Row>,
    /// Server names in legend order; the first is the plugin, the second the baseline.
    pub servers: Vec<String>,
    pub command: String,
    pub client: String,
    pub load_before: String,
    pub load_after: String,
    pub rss_kib: (Option<u64>, Option<u64>),
}

/// `model name` and the number of processors from /proc/cpuinfo.
pub fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim());
    let cores = info.lines().filter(|l| l.starts_with("processor")).count();
    format!("{model}, {cores} cores")
}

/// The 1, 5 and 15-minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

fn find<'a>(rows: &'a [Row], op: &str, callers: usize, server: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.op == op && r.callers == callers && r.server == server)
}

pub fn markdown(run: &Run) -> String {
    let mut md = String::new();
    let baseline = &run.servers[1];
    let kib = |v: Option<u64>| v.map_or("?".into(), |v| format!("{:.1} MiB", v as f64 / 1024.0));
    let _ = writeln!(
        md,
        "| op | callers | server | calls/s | p50 ms | p99 ms | calls/s ÷ {baseline} | p50 ÷ {baseline} |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---:|");
    for r in &run.rows {
        let (ratio_ops, ratio_p50) = match find(&run.rows, r.op, r.callers, baseline) {
            Some(b) if r.server != *baseline => (
                format!("{:.2}", r.ops / b.ops),
                format!("{:.2}", r.p50_ms / b.p50_ms),
            ),
            _ => (String::new(), String::new()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {ratio_ops} | {ratio_p50} |",
            r.op, r.callers, r.server, r.ops, r.p50_ms, r.p99_ms
        );
    }
    let _ = writeln!(
        md,
        "\n{}; {}; load average {} before, {} after (client and servers share the machine); \
         client: {}; plugin RSS {} after warm-up, {} at the end (last instance).{}\n\n`{}`",
        machine(),
        date(),
        run.load_before,
        run.load_after,
        run.client,
        kib(run.rss_kib.0),
        kib(run.rss_kib.1),
        if run.servers.iter().any(|s| s == "baseline-2") {
            " baseline-2 is the same baseline again, an A/A control: its ratios are what noise \
             alone does to a ratio on this machine."
        } else {
            ""
        },
        run.command
    );
    md
}

const COLORS: [RGBColor; 4] = [
    RGBColor(200, 40, 40),
    RGBColor(40, 80, 200),
    RGBColor(30, 150, 60),
    RGBColor(150, 80, 170),
];

/// 1-2-5 steps (0.1, 0.2, 0.5, 1, 2, ...) between `min` and `max`, the ticks of a log axis.
fn log_ticks(min: f64, max: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(min.log10().floor());
    while decade <= max {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if (min..=max).contains(&t) {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// A 2 × 2 chart: Encrypt and Decrypt (rows), throughput and latency (columns), x the
/// number of callers on a log scale; p50 solid, p99 dashed.
pub fn chart(run: &Run, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let callers: Vec<usize> = {
        let mut c: Vec<usize> = run.rows.iter().map(|r| r.callers).collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let x_min = *callers.first().ok_or("no measurements")? as f64 / 1.3;
    let x_max = *callers.last().ok_or("no measurements")? as f64 * 1.3;
    let x_axis = || {
        (x_min..x_max)
            .log_scale()
            .with_key_points(callers.iter().map(|&c| c as f64).collect())
    };
    let root = SVGBackend::new(path, (1100, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!("KMS v2 over a Unix socket, client: {}", run.client),
        ("sans-serif", 20),
    )?;
    let areas = root.split_evenly((2, 2));
    for (i, area) in areas.iter().enumerate() {
        let op = if i < 2 { "Encrypt" } else { "Decrypt" };
        let rows: Vec<&Row> = run.rows.iter().filter(|r| r.op == op).collect();
        let series = |server: &str, f: fn(&Row) -> f64| -> Vec<(f64, f64)> {
            rows.iter()
                .filter(|r| r.server == server)
                .map(|r| (r.callers as f64, f(r)))
                .collect()
        };
        if i % 2 == 0 {
            let y_max = rows.iter().map(|r| r.ops).fold(0.0, f64::max) * 1.15;
            let mut chart = panel(area, format!("{op}: throughput"))
                .build_cartesian_2d(x_axis(), 0.0..y_max.max(1.0))?;
            mesh(&mut chart, "calls/s", &|y| format!("{y:.0}"))?;
            for (server, color) in run.servers.iter().zip(COLORS) {
                solid(&mut chart, series(server, |r| r.ops), server, color)?;
            }
            legend(&mut chart)?;
        } else {
            let lat = rows.iter().flat_map(|r| [r.p50_ms, r.p99_ms]);
            let y_min = lat.clone().fold(f64::INFINITY, f64::min).max(1e-3) / 1.5;
            let y_max = lat.fold(0.0, f64::max).max(y_min * 2.0) * 1.5;
            let mut chart = panel(area, format!("{op}: latency, p50 solid, p99 dashed"))
                .build_cartesian_2d(
                    x_axis(),
                    (y_min..y_max)
                        .log_scale()
                        .with_key_points(log_ticks(y_min, y_max)),
                )?;
            mesh(&mut chart, "ms", &|y| format!("{y}"))?;
            for (server, color) in run.servers.iter().zip(COLORS) {
                let p50 = format!("{server} p50");
                solid(&mut chart, series(server, |r| r.p50_ms), &p50, color)?;
                chart.draw_series(DashedLineSeries::new(
                    series(server, |r| r.p99_ms),
                    6,
                    4,
                    color.stroke_width(2),
                ))?;
            }
            legend(&mut chart)?;
        }
    }
    root.present()?;
    Ok(())
}

/// One of the four panels, before its axes are set.
fn panel<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: String,
) -> ChartBuilder<'a, 'b, DB> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60);
    builder
}

/// Every panel's grid: callers on x, `y_desc` on y.
fn mesh<DB: DrawingBackend, X, Y>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<X, Y>>,
    y_desc: &str,
    y_label: &dyn Fn(&f64) -> String,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("concurrent callers (one connection)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(y_label)
        .light_line_style(TRANSPARENT)
        .draw()
}

/// A solid line with its legend entry.
fn solid<DB: DrawingBackend, X, Y>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<X, Y>>,
    points: Vec<(f64, f64)>,
    label: &str,
    color: RGBColor,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    Ok(())
}

/// The legend, upper left.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
}
