//! `cargo xtask <command>`: the project's orchestration, kept out of the product crates.
//!
//! Every command that builds first runs `setup`, which installs whatever this machine lacks
//! (nightly rust-src, bpf-linker, the Debian packages the tests and demo use, bpffs), so a
//! fresh machine needs nothing but `cargo xtask demo` or `cargo xtask test`.
//!
//! Layout: `setup.rs` (installs), `command.rs` (finding and running commands), `cargo.rs`
//! (workspace paths, builds), `test.rs` (the test run and its summary), `cluster.rs` (the
//! namespaced Patroni cluster with patroxy in front), `demo.rs` (that cluster, verified with
//! the seed's queries), `bench/` (throughput, latency, memory, CPU), `failover_bench.rs`
//! (failovers through patroxy and HAProxy), `fuzz.rs` (the cargo-fuzz targets of fuzz/, which
//! `test.rs` runs briefly too), `soak/` (long runs on both data paths under disruption, which
//! `test.rs` runs briefly too), `install.rs` (binary, unit, user and config on this host); the
//! PostgreSQL, process and cluster harness is the integration tests' (the patroxy-tests
//! crate). Imports go one way (demo -> cluster -> cargo -> setup -> command; test -> fuzz,
//! soak -> cargo; install -> cargo); nothing uses `main.rs`.

mod bench;
mod cargo;
mod cluster;
mod command;
mod demo;
mod failover_bench;
mod fuzz;
mod install;
mod setup;
mod soak;
mod test;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run, test and demo patroxy")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need, when missing (idempotent).
    Setup,
    /// Set up, then build the patroxy binary (debug unless --release).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build (release), then run target/release/patroxy with the arguments after `--`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, run every test of the workspace (release), then each fuzz target
    /// briefly and a short soak, and print a summary.
    ///
    /// Arguments after `--` go to `cargo test`; a second `--` separates test-binary
    /// arguments, e.g. `cargo xtask test -- -p patroxy-tests -- --nocapture`.
    Test {
        /// Stop the test run (not the builds before it) after this many seconds.
        #[arg(long, default_value_t = 1500)]
        timeout: u64,
        /// After the whole suite (no arguments after `--`), run each fuzz target this long;
        /// 0 skips fuzzing.
        #[arg(long, default_value_t = 20)]
        fuzz_seconds: u64,
        /// After fuzzing, soak this many minutes (`cargo xtask soak`, Patroni cluster
        /// included); 0 skips the soak.
        #[arg(long, default_value_t = 2)]
        soak_minutes: u64,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build (release) and install the binary, the systemd unit, the `patroxy` user and
    /// /etc/patroxy/patroxy.toml (never overwriting one); `--root DESTDIR` for files only.
    Install(install::InstallArgs),
    /// Benchmark direct vs patroxy (sockmap, fallback) vs HAProxy on loopback (or, with
    /// --netns, on three network namespaces); writes bench/results.md and bench/ratios.png
    /// (results-netns.md, ratios-netns.png).
    Bench(bench::BenchArgs),
    /// Measure failovers (switchover, kill -9, link down) through patroxy and HAProxy side
    /// by side on the test cluster; writes bench/failover.md.
    FailoverBench(failover_bench::FailoverArgs),
    /// The test cluster (etcd + 3 Patroni/PostgreSQL hosts in namespaces) with patroxy in
    /// front, to play with.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Fuzz one target of fuzz/ (config, patroni_response, first_bytes) or `all` for N
    /// seconds each, installing cargo-fuzz first if needed; prints the executions per target.
    Fuzz(fuzz::FuzzArgs),
    /// Both data paths under churn, long sessions, byte-checked bulk copies and stats scrapes
    /// for N minutes while servers flap and the cluster switches over; fails on any error or
    /// leak. Writes target/soak/report.md.
    Soak(soak::SoakArgs),
    /// Bring up a Patroni cluster with patroxy in front (5432 writes, 5433 reads, 7000 stats),
    /// verify it with the seed's queries and show how to connect; Ctrl-C stops everything.
    Demo {
        /// Stop right after the proof query instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::setup().map(|_| ExitCode::SUCCESS),
        Cmd::Build { release } => setup::setup()
            .and_then(|env| cargo::build_patroxy(&env, release))
            .map(|_| ExitCode::SUCCESS),
        Cmd::Run { args } => cargo::run_patroxy(&args),
        Cmd::Test {
            timeout,
            fuzz_seconds,
            soak_minutes,
            args,
        } => test::test(
            &args,
            Duration::from_secs(timeout),
            fuzz_seconds,
            soak_minutes,
        ),
        Cmd::Install(args) => install::install(&args).map(|_| ExitCode::SUCCESS),
        Cmd::Bench(args) => bench::bench(&args).map(|_| ExitCode::SUCCESS),
        Cmd::FailoverBench(args) => {
            failover_bench::failover_bench(&args).map(|_| ExitCode::SUCCESS)
        }
        Cmd::Cluster(cmd) => cluster::run(cmd).map(|_| ExitCode::SUCCESS),
        Cmd::Fuzz(args) => fuzz::fuzz(&args),
        Cmd::Soak(args) => soak::soak(&args).map(|passed| {
            if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
        Cmd::Demo { once } => demo::demo(once).map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
