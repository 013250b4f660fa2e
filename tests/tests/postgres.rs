//! patroxy in front of a real PostgreSQL (Debian's, started by the harness): psql and pgbench
//! through both data paths, the pinned maps seen by bpftool, start-up rules for BPF and config.
mod common;

use std::{process::Command, time::Duration};

use common::{Path_, local, one_listener};
use patroxy_tests::{
    config::{
        Bpf, CheckConfig, DefaultServer, Defaults, ListenerConfig, OnMarkedDown, ProxyConfig,
        ServerConfig,
    },
    daemon::{Patroxy, bpftool_dump},
    fake_patroni::{FakePatroni, Reply},
    ports::free_tcp_port,
    postgres::{Postgres, PostgresOptions},
    process::{ChildGuard, patroxy_bin, require_root},
};

fn psql_and_pgbench(path: Path_) {
    let pg = Postgres::start(PostgresOptions::default());
    let pin = Patroxy::unique_pin_path("pg");
    let config = one_listener(path, &pin, pg.addr());
    let proxy = Patroxy::start("pg", &config);
    let port = config.bind().port();
    assert_eq!(
        pg.psql(port, "SELECT inet_server_port(), pg_is_in_recovery()"),
        format!("{}|f", pg.port()),
        "psql reaches PostgreSQL through patroxy"
    );
    // A multi-statement session with a larger result, byte-exact through the proxy.
    let sum = pg.psql(port, "SELECT sum(g) FROM generate_series(1, 200000) g");
    assert_eq!(sum, "20000100000");
    pg.pgbench_init(pg.port(), 1);
    let direct = pg.pgbench(pg.port(), &["-S", "-c", "4", "-j", "2", "-T", "3"]);
    let proxied = pg.pgbench(port, &["-S", "-c", "4", "-j", "2", "-T", "3"]);
    eprintln!(
        "MEASURED {}: pgbench -S -c 4 -T 3: direct {direct:.0} TPS, through patroxy {proxied:.0} TPS ({:.2} of direct)",
        path.name(),
        proxied / direct
    );
    assert!(proxied > 0.0);
    assert!(proxy.log().contains(&format!("path=\"{}\"", path.name())));
}

#[test]
fn psql_and_pgbench_through_sockmap() {
    if require_root("psql_and_pgbench_through_sockmap") {
        psql_and_pgbench(Path_::Sockmap);
    }
}

#[test]
fn psql_and_pgbench_through_fallback() {
    psql_and_pgbench(Path_::Fallback);
}

/// Live sessions are visible, typed, in the pinned maps.
#[test]
fn bpftool_shows_live_sessions_with_typed_fields() {
    if !require_root("bpftool_shows_live_sessions_with_typed_fields") {
        return;
    }
    let pg = Postgres::start(PostgresOptions::default());
    let pin = Patroxy::unique_pin_path("bpftool");
    let config = one_listener(Path_::Sockmap, &pin, pg.addr());
    let _proxy = Patroxy::start("bpftool", &config);
    // A session that stays open while bpftool looks (psql is killed when the test ends).
    let mut psql = pg.client("psql", config.bind().port());
    psql.args(["-X", "-At", "-c", "SELECT 42", "-c", "SELECT pg_sleep(30)"]);
    let _session = ChildGuard::spawn("psql-sleep", &mut psql).unwrap();
    // The pair is in the maps as soon as it is spliced; its counters move once the startup
    // packet and the first query have crossed. bpftool reads the entries one at a time, so a
    // message may cross between the two: poll until both directions carried bytes and two
    // dumps in a row are the same (the session is quiet in pg_sleep), and compare that one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut previous = None;
    let (client, backend) = loop {
        let entries = bpftool_dump(&pin, "SESSIONS");
        let list = entries.as_array().unwrap().clone();
        let side = |n: u64| list.iter().find(|e| e["value"]["side"] == n).cloned();
        if let (Some(c), Some(b)) = (side(0), side(1)) {
            let moved = |e: &serde_json::Value| e["value"]["bytes_rx"].as_u64().unwrap() > 0;
            if moved(&c) && moved(&b) && previous.as_ref() == Some(&entries) {
                break (c, b);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no quiet live session with traffic: {entries}"
        );
        previous = Some(entries);
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(client["value"]["peer"], backend["key"]);
    assert_eq!(backend["value"]["peer"], client["key"]);
    assert_eq!(client["value"]["backend"], 1);
    assert_eq!(client["value"]["listener"], 0);
    // What arrived on one socket is what was sent out of the other.
    assert_eq!(client["value"]["bytes_rx"], backend["value"]["bytes_tx"]);
    assert_eq!(client["value"]["bytes_tx"], backend["value"]["bytes_rx"]);
    assert!(client["value"]["last_ns"].as_u64().unwrap() > 0);
    let backends = bpftool_dump(&pin, "BACKENDS");
    assert_eq!(backends[0]["value"]["port"], pg.port());
    assert_eq!(backends[0]["value"]["sessions"], 1);
}

/// A crash leaves pins behind; the next start removes them instead of failing.
#[test]
fn stale_pins_do_not_stop_the_next_start() {
    if !require_root("stale_pins_do_not_stop_the_next_start") {
        return;
    }
    let pin = Patroxy::unique_pin_path("stale");
    let config = one_listener(Path_::Sockmap, &pin, local(free_tcp_port()));
    let mut first = Patroxy::start("stale1", &config);
    first.child.signal(libc::SIGKILL).unwrap();
    first.child.wait().unwrap();
    assert!(
        pin.join("SESSIONS").exists(),
        "a killed daemon leaves its pins"
    );
    let second = Patroxy::start("stale2", &config);
    assert!(second.wait_for_log("removed stale pins", Duration::from_secs(2)));
    drop(second);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!pin.exists(), "a clean stop removes the pins");
}

/// Without privileges: `auto` falls back with one line saying why, `required` refuses.
#[test]
fn bpf_modes_without_privileges() {
    if !require_root("bpf_modes_without_privileges (drops to nobody)") {
        return;
    }
    let drop_privileges = |cmd: &mut Command| {
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        *cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(program)
        .args(args)
        .env("PATROXY_LOG", "info");
    };
    let pin = Patroxy::unique_pin_path("nopriv");
    let mut config = one_listener(Path_::Sockmap, &pin, local(free_tcp_port()));
    // required: refuses to start, saying why.
    let dir = std::env::temp_dir().join("patroxy-test-configs");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let file = dir.join(format!("nopriv-{}.toml", std::process::id()));
    std::fs::write(&file, config.to_toml()).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut cmd = Command::new(patroxy_bin());
    cmd.args(["run", "--config"]).arg(&file);
    drop_privileges(&mut cmd);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "required must refuse: {stderr}");
    assert!(
        stderr.contains("bpf = \"required\"") && stderr.contains("not root"),
        "{stderr}"
    );

    // auto: starts on the fallback path, one line saying why.
    config.global.bpf = Some(Bpf::Auto);
    let proxy = Patroxy::start_with("nopriv", &config, drop_privileges);
    assert!(proxy.wait_for_log("using the userspace fallback", Duration::from_secs(2)));
    assert_eq!(proxy.count_log("sockmap data path unavailable"), 1);
    assert!(proxy.log().contains("data_path=\"fallback\""));
}

/// Bad config: `check-config` and `run` both refuse with file:line:col and exit 64.
#[test]
fn bad_config_is_refused_with_its_position() {
    let dir = std::env::temp_dir().join("patroxy-test-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("bad-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        "[global]\nmaxconn = 0\n\n[defaults]\ntimeout_client = \"30m\"\ntimeout_server = \"30m\"\ntimeout_connect = \"4x\"\n",
    )
    .unwrap();
    for args in [vec!["check-config"], vec!["run", "--config"]] {
        let out = Command::new(patroxy_bin())
            .args(&args)
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("{}:", file.display())), "{stderr}");
        assert!(
            stderr.contains(":7:19:") || stderr.contains(":2:11:"),
            "position: {stderr}"
        );
    }
    let out = Command::new(patroxy_bin())
        .args(["check-config"])
        .arg(patroxy_tests::process::workspace_root().join("patroxy.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "the shipped patroxy.toml is valid");
}

/// Routing decided by (fake) Patroni answers, with real psql sessions to a real PostgreSQL:
/// while the node is primary psql works; when it answers 503 psql is refused cleanly, with a
/// PostgreSQL error saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_routed_by_patroni_answers() {
    let pg = Postgres::start(PostgresOptions::default());
    let api = FakePatroni::start().await;
    api.set("/primary", Reply::primary(1));
    let bind = local(free_tcp_port());
    let pin = Patroxy::unique_pin_path("psqlfake");
    let config = ProxyConfig::new(
        Defaults::new(Duration::from_secs(30 * 60), Duration::from_secs(1))
            .timeout_queue(Duration::from_secs(1)),
    )
    .data_path(Bpf::Auto, &pin)
    .default_server(DefaultServer {
        inter: Some(Duration::from_millis(200)),
        fastinter: Some(Duration::from_millis(50)),
        on_marked_down: Some(OnMarkedDown::ShutdownSessions),
        ..DefaultServer::default()
    })
    .server(ServerConfig::new("pg1", pg.addr()).check_port(api.addr().port()))
    .listener(
        ListenerConfig::new("postgres_write", bind, ["pg1"]).check(CheckConfig::new("/primary")),
    );
    let proxy = Patroxy::start("psqlfake", &config);
    let pgr = &pg;
    let port = bind.port();
    // The server's transitions, counted before each change (its first UP precedes them).
    let (down, up) = (
        "Server postgres_write/pg1 is DOWN",
        "Server postgres_write/pg1 is UP",
    );
    let ok = tokio::task::block_in_place(|| pgr.psql(port, "SELECT 1"));
    assert_eq!(ok, "1");
    let downs = proxy.count_log(down);
    api.set("/primary", Reply::replica(503, 2));
    assert!(proxy.wait_for_log_count(down, downs + 1, Duration::from_secs(3)));
    // Count this client's refusal line only.
    let refusals = proxy.count_log("no server is UP");
    let refused = tokio::task::block_in_place(|| pgr.try_psql(port, "SELECT 1"));
    let err = refused
        .expect_err("no primary: psql is refused")
        .to_string();
    eprintln!("psql without a primary: {err}");
    // A PostgreSQL error the user can read, not "server closed the connection unexpectedly".
    assert!(
        err.contains("FATAL")
            && err.contains("patroxy: postgres_write: timeout queue expired: no server is UP"),
        "{err}"
    );
    assert!(proxy.wait_for_log_count("no server is UP", refusals + 1, Duration::from_secs(3)));
    let ups = proxy.count_log(up);
    api.set("/primary", Reply::primary(2));
    assert!(proxy.wait_for_log_count(up, ups + 1, Duration::from_secs(3)));
    let back = tokio::task::block_in_place(|| pgr.psql(port, "SELECT 2"));
    assert_eq!(back, "2");
}
