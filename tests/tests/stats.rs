//! The stats server against a running patroxy in front of a fake two-node cluster (db1 answers
//! 200 on /primary, db2 503): HAProxy's CSV, JSON, /metrics through an independent Prometheus
//! parser, the page in real headless Chromium, the `status`/`sessions`/`maps` commands, and
//! byte counters equal to the bytes a client actually sent.
mod common;

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use common::{Node, Path_, fast_checks, local};
use patroxy_tests::{
    backend::pattern,
    config::{CheckConfig, ListenerConfig, StatsConfig},
    daemon::Patroxy,
    fake_patroni::Reply,
    ports::free_tcp_port,
    process::{patroxy_bin, require_root},
    stats_client::{
        artifacts_dir, chromium_available, get, get_ok, parse_csv, render_page, row, wait_for,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fallback_stats_show_the_cluster() {
    scenario(Path_::Fallback).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sockmap_stats_show_the_cluster_and_kernel_bytes() {
    if require_root("sockmap_stats_show_the_cluster_and_kernel_bytes") {
        scenario(Path_::Sockmap).await;
    }
}

struct Cluster {
    _nodes: [Node; 2],
    daemon: Patroxy,
    bind: SocketAddr,
    stats: SocketAddr,
}

async fn start(path: Path_) -> Cluster {
    let nodes = [Node::start().await, Node::start().await];
    nodes[0].api.set("/primary", Reply::primary(3));
    nodes[1].api.set("/primary", Reply::replica(503, 3));
    let pin = Patroxy::unique_pin_path("stats");
    let bind = local(free_tcp_port());
    let stats = local(free_tcp_port());
    let mut config = fast_checks(path, &pin)
        .server(nodes[0].server("db1"))
        .server(nodes[1].server("db2").maxconn(50))
        .listener(
            ListenerConfig::new("postgres_write", bind, ["db1", "db2"])
                .check(CheckConfig::new("/primary")),
        )
        .stats(StatsConfig::new(stats).refresh(Duration::from_secs(2)));
    config.global.maxconn = Some(100);
    // A check slowed down by the machine (Chromium starting on two cores) is not a failure, and
    // three failures in a row take db1 DOWN: one odd check must not flap it (the assertions expect
    // no primary change). db2 starts DOWN whatever fall is.
    config.defaults.timeout_check = Some(Duration::from_secs(3));
    config.default_server.fastinter = Some(Duration::from_millis(100));
    config.default_server.rise = Some(1);
    config.default_server.on_marked_down = None;
    let daemon = Patroxy::start("patroxy-stats", &config);
    Cluster {
        _nodes: nodes,
        daemon,
        bind,
        stats,
    }
}

async fn scenario(path: Path_) {
    let c = start(path).await;
    let stats = c.stats;

    // The checker settles: db1 UP (primary), db2 DOWN (503 on /primary): a healthy replica, so
    // STANDBY on the page, in the JSON and the metrics, and HAProxy's DOWN in the CSV.
    let rows = wait_for(Duration::from_secs(10), || {
        let rows = parse_csv(&get(stats, "/;csv").ok()?.2);
        let status = |s| row(&rows, "postgres_write", s)["status"].clone();
        // db2 starts DOWN (init_state): wait for its first check too.
        let checked = row(&rows, "postgres_write", "db2")["check_code"] == "503";
        (status("db1") == "UP" && status("db2") == "DOWN" && checked).then_some(rows)
    })
    .unwrap_or_else(|| panic!("db1 UP / db2 DOWN never shown:\n{}", c.daemon.log()));
    csv_rows(&rows);
    assert!(get_ok(stats, "/?format=csv").starts_with("# pxname,svname,qcur,"));

    let json: serde_json::Value = serde_json::from_str(&get_ok(stats, "/;json")).unwrap();
    assert_eq!(json["data_path"], path.name());
    let db1 = &json["listeners"][0]["servers"][0];
    assert_eq!(
        (db1["name"].as_str(), db1["role"].as_str()),
        (Some("db1"), Some("primary"))
    );
    assert_eq!(db1["timeline"], 3);
    let db2 = &json["listeners"][0]["servers"][1];
    assert_eq!(
        (db2["name"].as_str(), db2["role"].as_str()),
        (Some("db2"), Some("replica"))
    );
    assert_eq!(
        (db2["status"].as_str(), db2["class"].as_str()),
        (Some("STANDBY"), Some("standby")),
        "a running replica answering 503 on /primary is a standby, not a dead node"
    );

    bytes_counted(&c, path).await;
    metrics(stats);
    cli(&c, path);
    page(stats, path);
    not_a_standby_once_patroni_says_otherwise(&c);
    let (status, _, _) = get(stats, "/nope").unwrap();
    assert_eq!(status, 404);
}

/// A replica that starts up again, or a 503 that is not Patroni's, is DOWN, not STANDBY.
fn not_a_standby_once_patroni_says_otherwise(c: &Cluster) {
    let db2_status = || {
        let json: serde_json::Value = serde_json::from_str(&get(c.stats, "/;json").ok()?.2).ok()?;
        json["listeners"][0]["servers"][1]["status"]
            .as_str()
            .map(str::to_owned)
    };
    let mut starting = Reply::replica(503, 3);
    starting.body = starting
        .body
        .replace("\"state\": \"running\"", "\"state\": \"starting\"");
    for (what, reply) in [
        ("a replica starting up", starting),
        ("a bare 503", Reply::status(503)),
        ("a running replica again", Reply::replica(503, 3)),
    ] {
        c._nodes[1].api.set("/primary", reply);
        let want = if what.contains("running") {
            "STANDBY"
        } else {
            "DOWN"
        };
        let seen = wait_for(Duration::from_secs(10), || {
            (db2_status().as_deref() == Some(want)).then_some(())
        });
        assert!(
            seen.is_some(),
            "{what}: db2 never {want} (now {:?})",
            db2_status()
        );
    }
}

fn csv_rows(rows: &[std::collections::HashMap<String, String>]) {
    let names: Vec<String> = rows
        .iter()
        .map(|r| format!("{}/{}", r["pxname"], r["svname"]))
        .collect();
    assert_eq!(
        names,
        [
            "postgres_write/FRONTEND",
            "postgres_write/db1",
            "postgres_write/db2",
            "postgres_write/BACKEND"
        ]
    );
    let db1 = row(rows, "postgres_write", "db1");
    assert_eq!(db1["check_status"], "L7OK");
    assert_eq!(db1["check_code"], "200");
    assert_eq!(db1["type"], "2");
    assert_eq!(db1["slim"], "", "db1 has no maxconn");
    let db2 = row(rows, "postgres_write", "db2");
    assert_eq!(db2["check_status"], "L7STS");
    assert_eq!(db2["check_code"], "503");
    assert_eq!(db2["slim"], "50");
    assert_eq!(row(rows, "postgres_write", "FRONTEND")["status"], "OPEN");
    assert_eq!(row(rows, "postgres_write", "BACKEND")["status"], "UP");
    assert_eq!(row(rows, "postgres_write", "BACKEND")["act"], "1");
}

/// (bin, bout) of db1 in the CSV.
fn db1_bytes(stats: SocketAddr) -> (u64, u64) {
    let rows = parse_csv(&get_ok(stats, "/;csv"));
    let db1 = row(&rows, "postgres_write", "db1");
    (db1["bin"].parse().unwrap(), db1["bout"].parse().unwrap())
}

/// One session stays open with `first` bytes echoed; on the sockmap path the kernel's counters
/// show them at once. After it closes and a second one of `second` bytes, both paths count
/// exactly what the client sent and got back.
async fn bytes_counted(c: &Cluster, path: Path_) {
    let (first, second) = (300_001usize, 12_345usize);
    let mut open = TcpStream::connect(c.bind).await.unwrap();
    let data = pattern(first, 7);
    // A small message and its answer first, as a PostgreSQL client's startup packet: by then
    // the session is spliced. (Bulk sent before the backend connects is served by the
    // fallback path, whose bytes count only at close.)
    let mut echoed = vec![0u8; first];
    open.write_all(&data[..1]).await.unwrap();
    open.read_exact(&mut echoed[..1]).await.unwrap();
    open.write_all(&data[1..]).await.unwrap();
    open.read_exact(&mut echoed[1..]).await.unwrap();
    assert!(echoed == data, "echo differs");
    let expect_open = match path {
        Path_::Sockmap => (first as u64, first as u64),
        // Documented: the fallback path counts bytes when a session closes.
        Path_::Fallback => (0, 0),
    };
    let seen = wait_for(Duration::from_secs(5), || {
        let b = db1_bytes(c.stats);
        (b == expect_open).then_some(b)
    });
    assert_eq!(
        seen,
        Some(expect_open),
        "open session: {:?}",
        db1_bytes(c.stats)
    );
    if path == Path_::Sockmap {
        sessions_command(c, first);
    }
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    drop(open);

    let mut s = TcpStream::connect(c.bind).await.unwrap();
    s.write_all(&pattern(second, 9)).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back.len(), second);

    let total = (first + second) as u64;
    let seen = wait_for(Duration::from_secs(5), || {
        (db1_bytes(c.stats) == (total, total)).then_some(())
    });
    assert!(
        seen.is_some(),
        "closed sessions: {:?}, want {total} each way",
        db1_bytes(c.stats)
    );
    let rows = parse_csv(&get_ok(c.stats, "/;csv"));
    // The harness's readiness probe (a bare connect, 0 bytes) is a client of FRONTEND too; it
    // closes before sending a byte, so it never becomes a session to db1.
    for svname in ["db1", "FRONTEND"] {
        let stot: u64 = row(&rows, "postgres_write", svname)["stot"]
            .parse()
            .unwrap();
        assert!((2..=3).contains(&stot), "{svname} stot {stot}");
    }
}

fn metrics(stats: SocketAddr) {
    let (status, content_type, body) = get(stats, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text parses");
    let value = |metric: &str, labels: &[(&str, &str)]| -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => h.last().map_or(0.0, |c| c.count),
                other => panic!("unexpected {other:?}"),
            })
    };
    let server = |name| [("proxy", "postgres_write"), ("server", name)];
    let status = |name, state| {
        let mut l = server(name).to_vec();
        l.push(("state", state));
        value("patroxy_server_status", &l)
    };
    assert_eq!(status("db1", "UP"), Some(1.0), "{body}");
    assert_eq!(status("db1", "DOWN"), Some(0.0));
    assert_eq!(
        status("db2", "DOWN"),
        Some(0.0),
        "an alert on DOWN must not fire"
    );
    assert_eq!(status("db2", "STANDBY"), Some(1.0));
    assert_eq!(status("db1", "STANDBY"), Some(0.0));
    assert_eq!(status("db2", "UP"), Some(0.0));
    let total = (300_001 + 12_345) as f64;
    assert_eq!(
        value("patroxy_server_bytes_in_total", &server("db1")),
        Some(total)
    );
    assert_eq!(
        value("patroxy_server_bytes_out_total", &server("db1")),
        Some(total)
    );
    assert!(value("patroxy_server_sessions_total", &server("db1")).unwrap() >= 2.0);
    // db2 started DOWN: like HAProxy, failures of a server already DOWN are not chkfail.
    assert_eq!(
        value("patroxy_server_check_failures_total", &server("db2")),
        Some(0.0)
    );
    assert_eq!(
        value("patroxy_server_check_code", &server("db2")),
        Some(503.0)
    );
    assert_eq!(value("patroxy_server_is_leader", &server("db1")), Some(1.0));
    assert_eq!(
        value(
            "patroxy_listener_primary_changes_total",
            &[("proxy", "postgres_write")]
        ),
        Some(0.0)
    );
    let checks = value("patroxy_server_check_duration_seconds", &server("db1"))
        .expect("check duration histogram");
    assert!(checks >= 1.0, "checks observed: {checks}");
}

fn run_cli(args: &[&str]) -> String {
    let out = Command::new(patroxy_bin()).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "patroxy {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn cli(c: &Cluster, path: Path_) {
    // --config finds the stats bind by itself.
    let config = c.daemon.config_path.to_str().unwrap();
    let table = run_cli(&["status", "--config", config]);
    assert!(
        table.contains(&format!("data path {}", path.name())),
        "{table}"
    );
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{table}"))
            .to_string()
    };
    assert!(
        line("db1").contains(" UP ") && line("db1").contains("primary"),
        "{table}"
    );
    assert!(
        line("db2").contains(" STANDBY ") && line("db2").contains("L7STS/503"),
        "{table}"
    );
    // The same daemon through --url: check timings move between two calls, so compare the
    // stable part of each server row (name, status, role, timeline).
    let url = format!("http://{}", c.stats);
    let by_url = run_cli(&["status", "--url", &url]);
    let stable = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("db"))
            .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(stable(&by_url), stable(&table), "{by_url}");
    assert_eq!(stable(&table).len(), 2, "{table}");

    if path == Path_::Sockmap {
        let maps = run_cli(&["maps", "--pin-path", c.daemon.pin_path.to_str().unwrap()]);
        for needle in [
            "SOCKS",
            "SESSIONS",
            "BACKENDS",
            "bpftool map dump pinned",
            "2 entries",
        ] {
            assert!(maps.contains(needle), "{needle} missing in\n{maps}");
        }
    }
}

fn sessions_command(c: &Cluster, bytes: usize) {
    let out = run_cli(&[
        "sessions",
        "--pin-path",
        c.daemon.pin_path.to_str().unwrap(),
        "--config",
        c.daemon.config_path.to_str().unwrap(),
    ]);
    let line = out
        .lines()
        .find(|l| l.contains("postgres_write"))
        .unwrap_or_else(|| panic!("no session listed:\n{out}"));
    assert!(line.contains("db1 (#1)"), "{line}");
    assert_eq!(
        line.split_whitespace()
            .filter(|w| *w == bytes.to_string())
            .count(),
        2,
        "bytes each way in {line}"
    );
    assert!(out.contains("1 open session(s)"), "{out}");
}

fn page(stats: SocketAddr, path: Path_) {
    let html = get_ok(stats, "/");
    assert!(html.contains("<meta http-equiv=\"refresh\" content=\"2\">"));
    if !chromium_available() {
        panic!("/usr/bin/chromium is missing: apt-get install chromium (cargo xtask setup does)");
    }
    let url = format!("http://{stats}/");
    let dir = artifacts_dir();
    for (size, (w, h)) in [("wide", (1280, 800)), ("phone", (390, 844))] {
        let png = dir.join(format!("stats-{}-{size}.png", path.name()));
        let _ = std::fs::remove_file(&png);
        let dom = render_page(&url, &png, w, h);
        check_png(&png);
        for needle in [
            "class=\"srv up\" id=\"srv-postgres_write-db1\"",
            "data-status=\"UP\"",
            "class=\"srv standby\" id=\"srv-postgres_write-db2\"",
            "data-status=\"STANDBY\"",
            &format!("id=\"data-path\">{}</span>", path.name()),
            "<span class=\"role primary\">primary</span>",
            "L7STS",
            "leader <b>db1</b>",
        ] {
            assert!(dom.contains(needle), "{needle} not in the DOM:\n{dom}");
        }
        eprintln!("screenshot: {}", png.display());
    }
}

/// A real PNG of the page, not a blank or an error page: big enough to hold the tables.
fn check_png(png: &Path) {
    let bytes = std::fs::read(png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        bytes.len() > 20_000,
        "screenshot only {} bytes",
        bytes.len()
    );
}
