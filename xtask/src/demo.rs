//! `cargo xtask demo`: the seed's setup on this machine. A real Patroni cluster (etcd and three
//! Patroni/PostgreSQL hosts in network namespaces the harness creates) with patroxy in front on
//! 127.0.0.1:5432 (writes), :5433 (reads) and :7000 (stats); the seed's "Start and verify"
//! queries are run through it and printed for the user to repeat; everything stops cleanly on
//! Ctrl-C (or right after the proof with `--once`).

use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use patroxy_tests::postgres::{DEFAULT_PASSWORD, pg_bin_dir};

use crate::cargo::build_patroxy;
use crate::cluster::{self, Running};
use crate::setup;

/// The seed's verification query.
const VERIFY: &str = "SELECT inet_server_addr() AS server, pg_is_in_recovery();";

pub fn demo(once: bool) -> Result<()> {
    let env = setup::setup()?;
    let bin = build_patroxy(&env, true)?;

    // Ctrl-C must reach us, not the children directly: we stop patroxy, then the cluster.
    let (stop_tx, stop_rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the Ctrl-C handler")?;

    let mut running = cluster::start(&bin, false)?;
    let result = prove(&running).and_then(|()| {
        running.print_instructions();
        if once {
            return Ok(());
        }
        println!("demo: running; press Ctrl-C to stop");
        wait_for_stop(&stop_rx, &mut running)
    });

    println!("demo: stopping patroxy, the Patroni nodes and etcd; removing the namespaces");
    let Running {
        cluster,
        mut patroxy,
        haproxy,
    } = running;
    patroxy.stop();
    drop(haproxy);
    cluster.down();
    println!("demo: stopped");
    result
}

/// Runs the seed's "Start and verify" queries through patroxy with psql.
fn prove(running: &Running) -> Result<()> {
    let leader = cluster::wait_routed(running, Duration::from_secs(90))?;
    println!(
        "demo: Patroni's leader is {}; patroxy routes writes to it",
        running.cluster.nodes[leader].name
    );
    let psql = pg_bin_dir().map_err(|e| anyhow!("{e}"))?.join("psql");
    for (what, port) in [
        ("writes (in_recovery = f)", running.patroxy.write_port),
        ("reads (in_recovery = t)", running.patroxy.read_port),
    ] {
        let out = Command::new(&psql)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-c", VERIFY])
            .env("PGPASSWORD", DEFAULT_PASSWORD)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql through patroxy on port {port} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        println!(
            "demo: {what} through 127.0.0.1:{port}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// Returns on Ctrl-C/SIGTERM, or with an error if patroxy dies on its own.
fn wait_for_stop(stop: &mpsc::Receiver<()>, running: &mut Running) -> Result<()> {
    loop {
        match stop.recv_timeout(Duration::from_millis(250)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(status) = running.patroxy.exited() {
            bail!(
                "patroxy exited on its own ({status}); its log: {}",
                running.patroxy.log_path.display()
            );
        }
    }
}
