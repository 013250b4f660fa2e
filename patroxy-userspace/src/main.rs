//! The `patroxy` binary: the daemon (`run`) and the operator's commands ([`cli`]).
mod cli;

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
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
        /// How long SIGTERM waits for open sessions before resetting them (and an upgrade for
        /// the sessions on the userspace fallback path, which stay in the old process).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        drain_grace: Duration,
        /// Set by a predecessor starting this process as its successor (an upgrade): the
        /// descriptor of the unix socket it hands its listeners and sessions over.
        #[arg(long, hide = true)]
        takeover_fd: Option<i32>,
    },
    /// Upgrade the running daemon without dropping a session: it starts the binary at the
    /// path it was started from (install the new one there first) and hands it its listening
    /// sockets and spliced sessions (SIGUSR2 does the same).
    Upgrade {
        /// The daemon's pid; defaults to the one its stats page shows.
        #[arg(long)]
        pid: Option<u32>,
        /// The stats server; defaults to the `[stats]` bind of --config.
        #[arg(long)]
        url: Option<String>,
        #[arg(short, long, default_value = "/etc/patroxy/patroxy.toml")]
        config: PathBuf,
        /// How long to wait for the old process to be gone.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
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
    /// Goes through the runtime socket when --config has `[runtime]`, else the stats server.
    SetState {
        /// `<listener>/<server>`, as named in the configuration.
        target: String,
        /// ready | drain | maint
        state: patroxy::operator_state::AdminState,
        #[command(flatten)]
        daemon: DaemonRoute,
    },
    /// Make the running daemon re-read its configuration file (as SIGHUP does) and print what
    /// changed; exits 1 with every error when the file is invalid (the daemon keeps running
    /// its old configuration).
    Reload {
        #[command(flatten)]
        daemon: DaemonRoute,
    },
    /// Send a command to the daemon's runtime socket and print the answer: `show servers`,
    /// `show sessions`, `set state <listener>/<server> <state>`, `reload`, `help`; `--json`
    /// for JSON. Exits 1 when the daemon answers with an error.
    Ctl {
        /// The runtime socket; defaults to the `[runtime]` socket of --config.
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(short, long, default_value = "/etc/patroxy/patroxy.toml")]
        config: PathBuf,
        /// The command's words.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// List open sockmap sessions from the pinned maps (needs root).
    Sessions {
        #[arg(long, default_value = "/sys/fs/bpf/patroxy")]
        pin_path: PathBuf,
        /// The daemon's config, to show listener and server names instead of ids.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the sessions as JSON (as `patroxy ctl --json show sessions`).
        #[arg(long)]
        json: bool,
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

/// How an operator command reaches the running daemon: the runtime socket, the stats server,
/// or whichever of them --config names.
#[derive(clap::Args)]
struct DaemonRoute {
    /// The runtime socket to use instead of --config's.
    #[arg(long, conflicts_with = "url")]
    socket: Option<PathBuf>,
    /// The stats server to use instead of --config's.
    #[arg(long)]
    url: Option<String>,
    /// The admin token's file, for the stats server (defaults to `[stats] admin_auth_file`
    /// of --config).
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[arg(short, long, default_value = "/etc/patroxy/patroxy.toml")]
    config: PathBuf,
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
        Command::Status { url, config } => {
            report(cli::stats_url(url, &config).and_then(|url| block_on(cli::status::run(&url))))
        }
        Command::SetState {
            target,
            state,
            daemon:
                DaemonRoute {
                    socket,
                    url,
                    token_file,
                    config,
                },
        } => report(
            cli::set_state::Via::choose(socket, url, token_file, &config)
                .and_then(|via| block_on(cli::set_state::run(via, &target, state))),
        ),
        Command::Reload {
            daemon:
                DaemonRoute {
                    socket,
                    url,
                    token_file,
                    config,
                },
        } => report(
            reload_route(socket, url, token_file, &config)
                .and_then(|via| block_on(cli::reload::run(via))),
        ),
        Command::Ctl {
            socket,
            config,
            command,
        } => report(
            cli::ctl::socket_path(socket, &config)
                .and_then(|socket| cli::ctl::run(&socket, &command)),
        ),
        Command::Sessions {
            pin_path,
            config,
            json,
        } => report(
            config
                .map(|c| patroxy::config::load(&c))
                .transpose()
                .map_err(anyhow::Error::from)
                .and_then(|c| cli::sessions::run(&pin_path, c.as_ref(), json)),
        ),
        Command::Maps { pin_path } => report(cli::maps::run(&pin_path)),
        Command::ImportHaproxy { file, out } => cli::import_haproxy::run(&file, out.as_deref()),
        Command::Upgrade {
            pid,
            url,
            config,
            timeout,
        } => report(
            cli::stats_url(url, &config)
                .and_then(|url| block_on(cli::upgrade::run(&url, pid, timeout))),
        ),
        Command::Run {
            config: config_path,
            drain_grace,
            takeover_fd,
        } => {
            // Read before anything else can fail: the predecessor waits for an answer, and a
            // successor that exits closes the channel, which tells it the upgrade failed.
            let takeover = match takeover_fd {
                // SAFETY: the predecessor passed this descriptor for us alone.
                Some(fd) => match unsafe { patroxy::upgrade::Takeover::receive(fd) } {
                    Ok(t) => Some(t),
                    Err(e) => {
                        eprintln!("patroxy: taking over: {e:#}");
                        return ExitCode::FAILURE;
                    }
                },
                // After a crash under systemd, the fd store's listeners and sessions.
                None => match patroxy::fdstore::Restored::from_env() {
                    Ok(restored) => restored.map(patroxy::upgrade::Takeover::from_fd_store),
                    Err(e) => {
                        eprintln!("patroxy: reading LISTEN_FDS: {e}");
                        None
                    }
                },
            };
            // The path, not the inode: after a package upgrade the new binary is there.
            let relaunch = patroxy::upgrade::Relaunch {
                binary: std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into()),
                config: config_path.clone(),
                drain_grace,
            };
            let config = match patroxy::config::load(&config_path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("refusing to start: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(patroxy::lifecycle::run(config, relaunch, takeover)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("patroxy: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The stats URL for `reload`. An invalid file is what a reload must report, so without --url
/// the `[stats]` bind is read from the file even when the rest does not validate (the daemon then
/// answers with every error); only a file without a readable bind fails here, with its errors.
/// How `patroxy reload` reaches the daemon: like `set-state`, except that a file that no longer
/// validates still names the stats server, so the daemon can report every error in it.
fn reload_route(
    socket: Option<PathBuf>,
    url: Option<String>,
    token_file: Option<PathBuf>,
    config: &std::path::Path,
) -> anyhow::Result<cli::set_state::Via> {
    let explicit = socket.is_some() || url.is_some();
    cli::set_state::Via::choose(socket, url, token_file.clone(), config).or_else(|e| {
        if explicit {
            return Err(e);
        }
        let url = cli::stats_url_of_invalid(config).ok_or(e).context(
            "cannot find the stats server in the configuration file; pass --url or --socket to reach the daemon",
        )?;
        let token = token_file
            .map(|f| patroxy::config::AdminToken::read(&f).map(|t| t.secret().to_string()))
            .transpose()?;
        Ok(cli::set_state::Via::Http { url, token })
    })
}

/// Runs an operator command's future on a runtime of its own.
fn block_on(command: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(command)
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
