//! `bench/results.md` and the PNG chart of the ratios.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

use super::lab::Lab;
use super::plan::Plan;
use super::results::{Better, Results, Row, ratio};
use super::workloads::bulk::BULK;
use super::workloads::connect::CONNECT;
use super::workloads::idle::IDLE;
use super::workloads::select::{CPU, SELECT};
use crate::command::first_line;

/// Where and on what the bench ran.
#[derive(Debug, Clone)]
pub struct Environment {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub memory: String,
    pub postgres: String,
    pub haproxy: String,
    pub patroxy: String,
    /// /proc/loadavg when the bench started: other work on the machine skews every number.
    pub load: String,
}

impl Environment {
    pub fn collect(lab: &Lab, patroxy_bin: &Path) -> Environment {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_owned();
        // SAFETY: sysconf has no preconditions.
        let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let mem = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|k| format!("{:.1} GiB", k as f64 / 1048576.0))
            .unwrap_or_default();
        let root = crate::cargo::workspace_root();
        let rev = first_line(Command::new("git").arg("-C").arg(&root).args([
            "rev-parse",
            "--short",
            "HEAD",
        ]));
        let dirty = !first_line(
            Command::new("git")
                .arg("-C")
                .arg(&root)
                .args(["status", "--porcelain"]),
        )
        .is_empty();
        Environment {
            load: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
            kernel: first_line(Command::new("uname").args(["-srm"])),
            cpu: format!("{model}, {ncpu} CPUs"),
            memory: mem,
            postgres: first_line(Command::new(lab.pg.bin_dir().join("postgres")).arg("--version")),
            haproxy: first_line(Command::new("haproxy").arg("-v")),
            patroxy: format!(
                "{} ({}{})",
                patroxy_bin.display(),
                if rev.is_empty() { "?" } else { &rev },
                if dirty { ", uncommitted changes" } else { "" }
            ),
        }
    }
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "—".to_owned(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}"))
        .unwrap_or_else(|| "—".to_owned())
}

/// One goal of issue 6 and whether this run met it.
struct Goal {
    text: &'static str,
    value: Option<f64>,
    target: f64,
    at_least: bool,
}

fn goals(r: &Results) -> Vec<Goal> {
    let m = |sec: &str, case: &str, metric: &str, t: usize| {
        r.find(sec, case, metric).and_then(|row| row.median(t))
    };
    let (bpf, hap) = (1, 3);
    let mut g = vec![
        Goal {
            text: "patroxy-bpf TPS at 8 clients ÷ direct ≥ 0.95",
            value: ratio(m(SELECT, "-c 8", "TPS", bpf), m(SELECT, "-c 8", "TPS", 0)),
            target: 0.95,
            at_least: true,
        },
        Goal {
            text: "patroxy-bpf TPS at 8 clients ÷ HAProxy ≥ 1.25",
            value: ratio(m(SELECT, "-c 8", "TPS", bpf), m(SELECT, "-c 8", "TPS", hap)),
            target: 1.25,
            at_least: true,
        },
        Goal {
            text: "patroxy-bpf added latency at 1 client ÷ HAProxy's ≤ 0.33",
            value: ratio(
                m(SELECT, "-c 1", "latency added over direct", bpf),
                m(SELECT, "-c 1", "latency added over direct", hap),
            ),
            target: 1.0 / 3.0,
            at_least: false,
        },
        Goal {
            text: "patroxy-bpf connection rate ÷ direct ≥ 0.97",
            value: ratio(
                m(CONNECT, "", "connections/s", bpf),
                m(CONNECT, "", "connections/s", 0),
            ),
            target: 0.97,
            at_least: true,
        },
        Goal {
            text: "patroxy-bpf COPY TO STDOUT ÷ direct ≥ 0.95",
            value: ratio(
                m(BULK, "COPY TO", "throughput", bpf),
                m(BULK, "COPY TO", "throughput", 0),
            ),
            target: 0.95,
            at_least: true,
        },
        Goal {
            text: "patroxy-bpf COPY FROM STDIN ÷ direct ≥ 0.95",
            value: ratio(
                m(BULK, "COPY FROM", "throughput", bpf),
                m(BULK, "COPY FROM", "throughput", 0),
            ),
            target: 0.95,
            at_least: true,
        },
        Goal {
            text: "patroxy-bpf RSS growth per idle session ≤ 4 KiB",
            value: m(IDLE, "", "proxy RSS growth per session", bpf),
            target: 4.0,
            at_least: false,
        },
    ];
    for c in ["-c 1", "-c 8", "-c 64"] {
        if r.find(CPU, c, "proxy process (user+sys)").is_none() {
            continue;
        }
        g.push(Goal {
            text: match c {
                "-c 1" => "patroxy-bpf CPU/tx incl. softirq+kworker ÷ HAProxy's ≤ 0.2 (1 client)",
                "-c 8" => "patroxy-bpf CPU/tx incl. softirq+kworker ÷ HAProxy's ≤ 0.2 (8 clients)",
                _ => "patroxy-bpf CPU/tx incl. softirq+kworker ÷ HAProxy's ≤ 0.2 (64 clients)",
            },
            value: ratio(
                m(CPU, c, "proxy incl. softirq+kworker above direct", bpf),
                m(CPU, c, "proxy incl. softirq+kworker above direct", hap),
            ),
            target: 0.2,
            at_least: false,
        });
    }
    g.push(Goal {
        text: "patroxy-fallback TPS at 8 clients ÷ HAProxy ≥ 1.0 (\"at least match HAProxy\")",
        value: ratio(m(SELECT, "-c 8", "TPS", 2), m(SELECT, "-c 8", "TPS", hap)),
        target: 1.0,
        at_least: true,
    });
    g
}

/// The whole report as Markdown.
pub fn markdown(r: &Results, plan: &Plan, env: &Environment, elapsed: Duration) -> String {
    let mut s = String::new();
    s.push_str("# patroxy benchmark: direct vs patroxy (sockmap, fallback) vs HAProxy\n\n");
    s.push_str("Written by `cargo xtask bench`");
    if plan.quick {
        s.push_str(" --quick (a smoke run: one round, short runs — not for comparison)");
    }
    s.push_str(".\n\n");
    s.push_str(&format!(
        "- date: {}\n- machine: {}, {}\n- kernel: {}\n- {}\n- {}\n- patroxy: {}\n\
         - load average at the start (1/5/15 min): {} (anything else running skews every number)\n",
        env.date, env.cpu, env.memory, env.kernel, env.postgres, env.haproxy, env.patroxy, env.load
    ));
    s.push_str(&format!(
        "- plan: {} round(s) of direct, patroxy-bpf, patroxy-fallback, haproxy interleaved per workload; \
         pgbench -S runs of {} s (clients {:?}), -C runs of {} s, pgbench scale {}, {} idle sessions held {} s; \
         total {:.0} s\n",
        plan.rounds,
        plan.duration,
        plan.clients,
        plan.connect_duration,
        plan.scale,
        plan.idle_sessions,
        plan.idle_hold.as_secs(),
        elapsed.as_secs_f64()
    ));
    s.push_str(
        "- setup: everything on loopback on the same machine (pgbench, psql, PostgreSQL and the proxy share the CPUs). \
         PostgreSQL 127.0.0.1, fsync off, trust auth (so connection setup measures the proxy, not SCRAM), \
         shared_buffers 512MB, max_connections 2100. Proxies: global maxconn 2000, retries 2, timeouts \
         connect 4s / client 30m / server 30m, one server without health check and without per-server maxconn; \
         patroxy logs at `warn`, HAProxy logs nothing.\n",
    );
    s.push_str(
        "- each cell is the median over the rounds; ratios are of medians. \"÷ direct\" and \"÷ haproxy\" \
         compare a proxy with the direct connection and with HAProxy.\n\n",
    );

    s.push_str("## Goals (issue 6)\n\n| goal | this run | met |\n|---|---|---|\n");
    for g in goals(r) {
        let met = match g.value {
            None => "—",
            Some(v) if (g.at_least && v >= g.target) || (!g.at_least && v <= g.target) => "yes",
            Some(_) => "**no**",
        };
        s.push_str(&format!(
            "| {} | {} | {met} |\n",
            g.text,
            fmt_ratio(g.value)
        ));
    }
    s.push('\n');

    // Sections in the order they were first measured, each with its rows in order.
    let mut sections: Vec<&str> = Vec::new();
    for row in &r.rows {
        if !sections.contains(&row.section) {
            sections.push(row.section);
        }
    }
    let ordered = sections
        .iter()
        .flat_map(|sec| r.rows.iter().filter(move |row| row.section == *sec));
    let mut section = "";
    for row in ordered {
        if row.section != section {
            section = row.section;
            s.push_str(&format!("\n## {section}\n\n"));
            s.push_str(
                "| case | metric | unit | direct | patroxy-bpf | patroxy-fallback | haproxy \
                 | bpf ÷ direct | fallback ÷ direct | haproxy ÷ direct | bpf ÷ haproxy | fallback ÷ haproxy |\n",
            );
            s.push_str("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
            s.push_str(notes(section));
        }
        let med: Vec<Option<f64>> = (0..4).map(|t| row.median(t)).collect();
        let unit = if row.unit.is_empty() { "" } else { row.unit };
        let arrow = match row.better {
            Better::Higher => "↑",
            Better::Lower => "↓",
        };
        s.push_str(&format!(
            "| {} | {} {arrow} | {unit} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.case,
            row.metric,
            fmt(med[0]),
            fmt(med[1]),
            fmt(med[2]),
            fmt(med[3]),
            fmt_ratio(ratio(med[1], med[0])),
            fmt_ratio(ratio(med[2], med[0])),
            fmt_ratio(ratio(med[3], med[0])),
            fmt_ratio(ratio(med[1], med[3])),
            fmt_ratio(ratio(med[2], med[3])),
        ));
    }
    s.push_str(
        "\n↑ higher is better, ↓ lower is better. Per-round samples are printed on the console while \
         the bench runs.\n\nChart: `ratios.png` (top: throughput ÷ direct; bottom: cost ÷ HAProxy's).\n",
    );
    s
}

/// A line under a section header explaining what its numbers are (kept as a table row
/// would break the table, so it is empty: the notes live in the module docs and the
/// header bullets).
fn notes(_section: &str) -> &'static str {
    ""
}

/// Finds a TrueType font plotters can draw text with (Debian's fonts-dejavu-core).
fn load_font() -> Result<&'static [u8]> {
    for path in [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    ] {
        if let Ok(bytes) = std::fs::read(path) {
            return Ok(Box::leak(bytes.into_boxed_slice()));
        }
    }
    Err(anyhow!(
        "no TrueType font found (apt-get install fonts-dejavu-core)"
    ))
}

struct Panel {
    title: &'static str,
    /// Category labels.
    cats: Vec<String>,
    /// Series name, colour index, one value per category.
    series: Vec<(&'static str, usize, Vec<Option<f64>>)>,
}

fn panels(r: &Results) -> (Panel, Panel) {
    let mut top = Panel {
        title: "Throughput ÷ direct (higher is better; 1 = no proxy)",
        cats: Vec::new(),
        series: vec![
            ("patroxy-bpf", 0, Vec::new()),
            ("patroxy-fallback", 1, Vec::new()),
            ("haproxy", 2, Vec::new()),
        ],
    };
    let mut push_top = |label: String, row: &Row| {
        top.cats.push(label);
        for (k, s) in top.series.iter_mut().enumerate() {
            s.2.push(ratio(row.median(k + 1), row.median(0)));
        }
    };
    for row in r.rows_of(SELECT, "TPS") {
        push_top(format!("TPS {}", row.case), row);
    }
    for row in r.rows_of(CONNECT, "connections/s") {
        push_top("conn/s (-C)".to_owned(), row);
    }
    for row in r.rows_of(BULK, "throughput") {
        let label = if row.case.starts_with("COPY TO") {
            "COPY out MB/s"
        } else {
            "COPY in MB/s"
        };
        push_top(label.to_owned(), row);
    }

    let mut bottom = Panel {
        title: "Cost ÷ HAProxy's (lower is better; 1 = as costly as HAProxy)",
        cats: Vec::new(),
        series: vec![
            ("patroxy-bpf", 0, Vec::new()),
            ("patroxy-fallback", 1, Vec::new()),
        ],
    };
    let mut push_bottom = |label: String, row: &Row| {
        bottom.cats.push(label);
        for (k, s) in bottom.series.iter_mut().enumerate() {
            s.2.push(ratio(row.median(k + 1), row.median(3)));
        }
    };
    for row in r.rows_of(SELECT, "latency added over direct") {
        push_bottom(format!("added lat {}", row.case), row);
    }
    for row in r.rows_of(CPU, "proxy incl. softirq+kworker above direct") {
        push_bottom(format!("CPU/tx {}", row.case), row);
    }
    for row in r.rows_of(IDLE, "proxy RSS growth per session") {
        push_bottom("RSS/session".to_owned(), row);
    }
    (top, bottom)
}

/// Draws the two panels of ratios into a PNG.
pub fn chart(r: &Results, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::{FontStyle, register_font};

    let font = load_font()?;
    register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow!("the font file is not a usable TrueType font"))?;
    let colours = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xd6, 0x27, 0x28),
    ];

    let (top, bottom) = panels(r);
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let halves = root.split_evenly((2, 1));
    for (area, panel, reference) in [
        (&halves[0], &top, "direct"),
        (&halves[1], &bottom, "HAProxy"),
    ] {
        if panel.cats.is_empty() {
            continue;
        }
        let n = panel.cats.len() as f64;
        let values = panel
            .series
            .iter()
            .flat_map(|s| s.2.iter().flatten().copied());
        let (lo, hi) = values.fold((0.0f64, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = (if lo < 0.0 { lo * 1.15 } else { 0.0 }, hi * 1.45);
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 24))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n, lo..hi)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_desc(format!("ratio to {reference}"))
            .label_style(("sans-serif", 16))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        let k = panel.series.len() as f64;
        let width = 0.8 / k;
        for (si, (name, colour, vals)) in panel.series.iter().enumerate() {
            let colour = colours[*colour];
            let bars: Vec<_> = vals
                .iter()
                .enumerate()
                .filter_map(|(ci, v)| v.map(|v| (ci, v)))
                .collect();
            chart
                .draw_series(bars.iter().map(|&(ci, v)| {
                    let x0 = ci as f64 + 0.1 + si as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], colour.filled())
                }))
                .map_err(|e| anyhow!("{e}"))?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled())
                });
            // The value above (or below) each bar.
            for &(ci, v) in &bars {
                let x = ci as f64 + 0.1 + (si as f64 + 0.46) * width;
                let (px, py) = chart.backend_coord(&(x, v));
                let dy = if v >= 0.0 { -16 } else { 4 };
                root.draw(&Text::new(
                    format!("{v:.2}"),
                    (px - 14, py + dy),
                    ("sans-serif", 13).into_font().color(&BLACK),
                ))
                .map_err(|e| anyhow!("{e}"))?;
            }
        }
        chart
            .draw_series(LineSeries::new(
                [(0.0, 1.0), (n, 1.0)],
                BLACK.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        // Category labels under the axis, centred on each group.
        for (ci, cat) in panel.cats.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(ci as f64 + 0.5, lo));
            let w = cat.chars().count() as i32 * 8;
            root.draw(&Text::new(
                cat.clone(),
                (px - w / 2, py + 10),
                ("sans-serif", 16).into_font().color(&BLACK),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        }
    }
    root.present()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
