//! Tests of the test harness itself: if these fail, every integration test's failure is
//! suspect.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use patroxy_tests::netns;
use patroxy_tests::ports::{free_tcp_port, is_listening, wait_for_listen};
use patroxy_tests::postgres::{Postgres, PostgresOptions};
use patroxy_tests::process::{ChildGuard, require_root};

#[test]
fn postgres_starts_answers_and_cleans_up() {
    let pg = Postgres::start(PostgresOptions::default().max_connections(50));
    let port = pg.port();
    assert_eq!(pg.psql(port, "SELECT 1"), "1");
    assert_eq!(pg.psql(port, "SHOW max_connections"), "50");
    assert_eq!(pg.psql(port, "SHOW listen_addresses"), "127.0.0.1");
    let dir = pg.dir().to_path_buf();
    assert!(dir.join("data").join("PG_VERSION").is_file());

    drop(pg);
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert!(
        !is_listening(addr),
        "PostgreSQL still listens on {addr} after drop"
    );
}

#[test]
fn postgres_requires_the_password() {
    let pg = Postgres::start(PostgresOptions::default().password("s3cret-harness"));
    let mut psql = pg.client("psql", pg.port());
    psql.env("PGPASSWORD", "wrong")
        .args(["-X", "-h", "127.0.0.1", "-At", "-c", "SELECT 1"]);
    let out = psql.output().expect("run psql");
    assert!(
        !out.status.success(),
        "psql with a wrong password succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    assert_eq!(pg.psql(pg.port(), "SELECT current_user"), "postgres");
}

#[test]
fn postgres_trust_and_clean_stop() {
    let pg = Postgres::start(PostgresOptions::default().trust());
    let mut psql = pg.client("psql", pg.port());
    psql.env_remove("PGPASSWORD")
        .args(["-X", "-h", "127.0.0.1", "-At", "-c", "SELECT 2"]);
    let out = psql.output().expect("run psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    let dir = pg.dir().to_path_buf();
    pg.stop().expect("pg_ctl stop -m fast");
    assert!(!dir.exists());
}

#[test]
fn pgbench_reports_tps() {
    let pg = Postgres::start(PostgresOptions::default());
    pg.pgbench_init(pg.port(), 1);
    let tps = pg.pgbench(pg.port(), &["-S", "-n", "-c", "2", "-j", "1", "-T", "2"]);
    assert!(tps > 0.0, "tps = {tps}");
}

#[test]
fn free_port_is_bindable() {
    let port = free_tcp_port();
    assert_ne!(port, 0);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bind the free port");
    assert!(wait_for_listen(
        listener.local_addr().unwrap(),
        Duration::from_secs(1)
    ));
}

/// Polls the child's log until `done` holds for it (or 10 s pass); returns the last log.
fn wait_log(guard: &ChildGuard, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = guard.log();
        if done(&log) || Instant::now() >= deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn child_guard_kills_on_drop_and_keeps_output() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo to-stdout; echo to-stderr >&2; exec sleep 600"]);
    let guard = ChildGuard::spawn("sleeper", &mut cmd).expect("spawn sh");
    let pid = guard.id();
    let log_path = guard.log_path().expect("captured").to_path_buf();
    let both = |log: &str| log.contains("to-stdout") && log.contains("to-stderr");
    let log = wait_log(&guard, both);
    assert!(both(&log), "{log}");

    drop(guard);
    // SAFETY: signal 0 only checks whether the pid exists.
    let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    assert!(!alive, "pid {pid} survived ChildGuard drop");
    assert!(!log_path.exists(), "log of a passing test is removed");
}

#[test]
fn child_guard_escalates_to_sigkill() {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "trap '' TERM; echo ignoring-term; while :; do sleep 0.1; done",
    ]);
    let mut guard = ChildGuard::spawn("stubborn", &mut cmd)
        .expect("spawn sh")
        .with_grace(Duration::from_millis(300));
    // SIGTERM only once the shell ignores it (before the trap it would die of it).
    let log = wait_log(&guard, |log| log.contains("ignoring-term"));
    assert!(log.contains("ignoring-term"), "{log}");
    let status = guard.stop().expect("stop");
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

/// Namespaces of the test below, removed when it ends, however it ends.
struct TestNamespaces;

const NS_CLIENT: &str = "pxbt-cli";
const NS_SERVER: &str = "pxbt-srv";

impl Drop for TestNamespaces {
    fn drop(&mut self) {
        netns::remove(&[NS_CLIENT, NS_SERVER], &[]);
    }
}

#[test]
fn postgres_in_a_namespace_serves_a_client_in_another() {
    if !require_root("postgres_in_a_namespace_serves_a_client_in_another") {
        return;
    }
    netns::remove(&[NS_CLIENT, NS_SERVER], &[]);
    let guard = TestNamespaces;
    netns::add(NS_CLIENT).expect("client namespace");
    netns::add(NS_SERVER).expect("server namespace");
    netns::veth(
        Some(NS_CLIENT),
        "pxbt0",
        "10.215.9.1/24",
        NS_SERVER,
        "pxbt1",
        "10.215.9.2/24",
    )
    .expect("veth pair");
    let server = Ipv4Addr::new(10, 215, 9, 2);
    let pg = Postgres::start(PostgresOptions::default().trust().in_netns(
        NS_SERVER,
        server,
        "10.215.9.0/24",
    ));
    // The harness's own psql runs inside the server's namespace, on its loopback.
    assert_eq!(
        pg.psql(pg.port(), "SHOW listen_addresses"),
        "127.0.0.1,10.215.9.2"
    );
    // A client in the other namespace reaches it over the veth, and comes from there.
    let mut psql = pg.client("psql", pg.port());
    netns::enter(&mut psql, NS_CLIENT).args([
        "-X",
        "-At",
        "-h",
        "10.215.9.2",
        "-c",
        "SELECT inet_client_addr()",
    ]);
    let out = psql.output().expect("run psql");
    assert!(
        out.status.success(),
        "psql from {NS_CLIENT}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10.215.9.1");
    // A thread inside the client's namespace sees the server's port; this one's namespace
    // is unchanged (the server's loopback is not ours).
    let addr = SocketAddr::from((server, pg.port()));
    assert!(netns::within(NS_CLIENT, move || is_listening(addr)).expect("enter namespace"));
    let own = SocketAddr::from((Ipv4Addr::LOCALHOST, pg.port()));
    assert!(
        !is_listening(own),
        "the server's loopback port is open here"
    );

    drop(pg);
    drop(guard);
    assert!(!std::path::Path::new("/run/netns/pxbt-srv").exists());
}
