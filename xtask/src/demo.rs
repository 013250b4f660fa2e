//! `cargo xtask demo`: one local PostgreSQL with patroxy in front of it, on an embedded
//! config, proven with a psql query, kept running until Ctrl-C (or stopped right after the
//! proof with `--once`).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::cargo::build_patroxy;
use crate::postgres::{Postgres, PostgresOptions};
use crate::process::ChildGuard;
use crate::setup;

/// Everything the demo creates lives here and is removed when it stops.
const DEMO_DIR: &str = "/tmp/patroxy-demo";
const PG_PORT: u16 = 15432;
const WRITE_PORT: u16 = 5432;
const READ_PORT: u16 = 5433;
const PASSWORD: &str = "ChangeMe_Postgres";
/// `pin_path` in [`DEMO_CONFIG`].
const PIN_PATH: &str = "/sys/fs/bpf/patroxy";

/// The demo's patroxy config: both listeners in front of the one local server, which has no
/// health check and so always counts as up.
const DEMO_CONFIG: &str = r#"# patroxy demo: `cargo xtask demo` writes this file and removes it when it stops.
[global]
maxconn = 2000
bpf = "auto"                      # sockmap splice when possible, else the userspace path
pin_path = "/sys/fs/bpf/patroxy"

[defaults]
retries = 2
timeout_client = "30m"
timeout_server = "30m"
timeout_connect = "4s"

# The demo's PostgreSQL (no Patroni: no [listener.check], so the server is always up).
[[server]]
name = "pg-local"
address = "127.0.0.1:15432"

[[listener]]
name = "postgres_write"
bind = "127.0.0.1:5432"
servers = ["pg-local"]

[[listener]]
name = "postgres_read"
bind = "127.0.0.1:5433"
servers = ["pg-local"]
"#;

pub fn demo(once: bool) -> Result<()> {
    let env = setup::setup()?;
    let bin = build_patroxy(&env, true)?;
    for port in [WRITE_PORT, READ_PORT, PG_PORT] {
        ensure_free(port)?;
    }

    // Ctrl-C must reach us, not patroxy directly: we stop patroxy, then PostgreSQL, in order.
    let (stop_tx, stop_rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the Ctrl-C handler")?;

    println!("demo: starting PostgreSQL on 127.0.0.1:{PG_PORT} (data in {DEMO_DIR})");
    let pg = Postgres::try_start(
        PostgresOptions::default()
            .dir(DEMO_DIR)
            .port(PG_PORT)
            .password(PASSWORD)
            .max_connections(300),
    )
    .map_err(|e| anyhow!("starting PostgreSQL: {e}"))?;
    println!(
        "demo: PostgreSQL is ready: {}",
        pg.psql(PG_PORT, "SHOW server_version")
    );

    let config = Path::new(DEMO_DIR).join("patroxy.toml");
    std::fs::write(&config, DEMO_CONFIG)
        .with_context(|| format!("writing {}", config.display()))?;
    let check = setup::output(Command::new(&bin).arg("check-config").arg(&config))
        .context("the demo config does not validate")?;
    print!("demo: {check}");

    println!(
        "demo: starting {} run --config {}",
        bin.display(),
        config.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.arg("run").arg("--config").arg(&config).process_group(0);
    let mut patroxy =
        ChildGuard::spawn_inherit("patroxy", &mut cmd)?.with_grace(Duration::from_secs(15));

    let result = prove(&pg, &mut patroxy).and_then(|()| {
        print_instructions();
        if once {
            return Ok(());
        }
        println!("demo: running; press Ctrl-C to stop");
        wait_for_stop(&stop_rx, &mut patroxy)
    });

    println!("demo: stopping patroxy");
    let status = patroxy.stop().context("stopping patroxy")?;
    println!("demo: patroxy exited ({status}); stopping PostgreSQL");
    if !status.success() && Path::new(PIN_PATH).exists() {
        // patroxy removes its pins when it exits cleanly; a killed one leaves them behind.
        println!("demo: removing the pins patroxy left in {PIN_PATH}");
        let _ = std::fs::remove_dir_all(PIN_PATH);
    }
    pg.stop().map_err(|e| anyhow!("stopping PostgreSQL: {e}"))?;
    println!("demo: stopped; removed {DEMO_DIR}");
    result
}

/// Waits for patroxy's write listener, then runs a query through it.
fn prove(pg: &Postgres, patroxy: &mut ChildGuard) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, WRITE_PORT));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !crate::ports::is_listening(addr) {
        if let Some(status) = patroxy.try_wait()? {
            bail!("patroxy exited before listening on {addr} ({status})");
        }
        if Instant::now() >= deadline {
            bail!("patroxy did not listen on {addr} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let version = pg
        .try_psql(WRITE_PORT, "SELECT version()")
        .map_err(|e| anyhow!("query through patroxy on {addr}: {e}"))?;
    println!("demo: through patroxy on {addr}: {version}");
    Ok(())
}

fn print_instructions() {
    println!();
    println!(
        "  connect (writes):  PGPASSWORD={PASSWORD} psql -h 127.0.0.1 -p {WRITE_PORT} -U postgres"
    );
    println!(
        "  connect (reads):   PGPASSWORD={PASSWORD} psql -h 127.0.0.1 -p {READ_PORT} -U postgres"
    );
    println!("  live sessions:     bpftool map dump pinned {PIN_PATH}/SESSIONS");
    println!("  config:            {DEMO_DIR}/patroxy.toml");
    println!();
}

/// Returns on Ctrl-C/SIGTERM, or with an error if patroxy dies on its own.
fn wait_for_stop(stop: &mpsc::Receiver<()>, patroxy: &mut ChildGuard) -> Result<()> {
    loop {
        match stop.recv_timeout(Duration::from_millis(250)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(status) = patroxy.try_wait()? {
            bail!("patroxy exited on its own ({status})");
        }
    }
}

/// The demo's ports must be free; say who holds one if not (often a Debian cluster on 5432).
fn ensure_free(port: u16) -> Result<()> {
    if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
        return Ok(());
    }
    let who = Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    bail!(
        "127.0.0.1:{port} is already in use{}; the demo needs ports {WRITE_PORT}, {READ_PORT} \
         and {PG_PORT} (a packaged PostgreSQL cluster? see `pg_lsclusters`; an earlier demo? \
         stop it)",
        if who.is_empty() {
            String::new()
        } else {
            format!(" ({who})")
        }
    )
}
