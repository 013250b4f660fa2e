//! The `patroxy` binary: the daemon (`run`) and the operator's commands ([`cli`]).
mod cli;

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "PostgreSQL proxy for Patroni clusters with an in-kernel data path"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy daemon.
    Run {
        #[arg(short, long, default_value = "/etc/patroxy/patroxy.toml")]
        config: PathBuf,
        /// How long SIGTERM waits for open sessions before resetting them.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        drain_grace: Duration,
    },
    /// Validate a configuration file and exit (0 = valid, 64 = invalid).
    CheckConfig { file: PathBuf },
    /// Show the running daemon's stats table (from its stats page's JSON).
    Status {
        /// The stats server; defaults to the `[stats]` bind of --config.
        #[arg(long)]
        url: Option<String>,
        #[arg(short, long, default_value = "/etc/patroxy/patroxy.toml")]
        config: PathBuf,
    },
    /// Set a server's admin state, like HAProxy's `set server <backend>/<server> state`: ready
    /// (back to what its checks say), drain (no new sessions), maint (out of rotation, its
    /// sessions handled like a mark-down). Kept in memory only: a restart makes every server ready.
    SetState {
        /// `<listener>/<server>`, as named in the configuration.
        target: String,
        /// ready | drain | maint
        state: patroxy::operator_state::AdminState,
        /// The stats server; defaults to the `[stats]` bind of --config.
        #[arg(long)]
        url: Option<String>,
        #[arg(short, long, default_value = "/etc/patroxy/patroxy.toml")]
        config: PathBuf,
    },
    /// List open sockmap sessions from the pinned maps (needs root).
    Sessions {
        #[arg(long, default_value = "/sys/fs/bpf/patroxy")]
        pin_path: PathBuf,
        /// The daemon's config, to show listener and server names instead of ids.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Write a HAProxy configuration as patroxy's TOML (to stdout, or OUT). Directives not carried
    /// over exactly are reported on stderr with their line and why. Exit 0 = every directive
    /// carried over and the result valid, 1 = written with losses (or not valid), 2 = nothing
    /// written (unreadable file, or one HAProxy would refuse).
    ImportHaproxy {
        file: PathBuf,
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Show the pinned maps and the bpftool commands to inspect them.
    Maps {
        #[arg(long, default_value = "/sys/fs/bpf/patroxy")]
        pin_path: PathBuf,
    },
}

/// sysexits' EX_CONFIG... HAProxy-compatible tooling expects 64 (EX_USAGE) for bad config.
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PATROXY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match patroxy::config::load(&file) {
            Ok(config) => {
                println!(
                    "{}: valid ({} listeners)",
                    file.display(),
                    config.listeners.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Status { url, config } => report(cli::stats_url(url, &config).and_then(|url| {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli::status::run(&url))
        })),
        Command::SetState {
            target,
            state,
            url,
            config,
        } => report(cli::stats_url(url, &config).and_then(|url| {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(cli::set_state::run(&url, &target, state))
        })),
        Command::Sessions { pin_path, config } => report(
            config
                .map(|c| patroxy::config::load(&c))
                .transpose()
                .map_err(anyhow::Error::from)
                .and_then(|c| cli::sessions::run(&pin_path, c.as_ref())),
        ),
        Command::Maps { pin_path } => report(cli::maps::run(&pin_path)),
        Command::ImportHaproxy { file, out } => cli::import_haproxy::run(&file, out.as_deref()),
        Command::Run {
            config,
            drain_grace,
        } => {
            let config = match patroxy::config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("refusing to start: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(patroxy::lifecycle::run(config, drain_grace)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("patroxy: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Exit status of an operator command: errors on stderr, exit 1.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patroxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
