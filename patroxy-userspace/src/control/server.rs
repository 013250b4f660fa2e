//! Where the runtime socket runs, and how much it may take: its own OS thread and
//! current-thread runtime, at most `[runtime] maxconn` connections (the rest wait in the
//! kernel's backlog holding no file descriptor of the daemon), a deadline to send the command
//! and one for the whole connection, and a short grace at shutdown.
use std::{io, sync::Arc, thread, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    time::{Instant, timeout},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{ControlHandle, commands::Commands, protocol, socket::BoundSocket};
use crate::{
    capped_accept, operator_state::AdminWriter, proxy::StatsSource, stats::history::StatsHistory,
};

/// A client must send its command line within this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole connection, answer included (a `reload` validates a file and applies it).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// At shutdown, commands in flight get this long before their connection is cut.
pub const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// The longest command line: commands are a few words.
pub const MAX_LINE: u64 = 1024;

/// Starts the runtime socket's thread on `socket` (from [`bind`](super::bind)): it answers
/// commands about `source`, sets states through `admin`, reloads through `handle`, until
/// `stop`; then it removes the socket file. Join the thread to know it is gone.
pub fn serve(
    socket: BoundSocket,
    source: Arc<dyn StatsSource>,
    admin: Arc<AdminWriter>,
    handle: Arc<dyn ControlHandle>,
    stop: CancellationToken,
) -> io::Result<thread::JoinHandle<()>> {
    socket.listener.set_nonblocking(true)?;
    let std_listener = socket.listener.try_clone()?;
    let config = source.config();
    let maxconn = config.runtime.as_ref().map_or(1, |r| r.maxconn as usize);
    let ids = source.server_ids().backends().map(|(_, id)| id).collect();
    // Its own history (rates, leader changes), so the socket answers `show servers` the same
    // with or without a [stats] server.
    let history = Arc::new(StatsHistory::new(ids, config.listeners.len()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .thread_name("patroxy-ctl-blocking")
        .build()?;
    thread::Builder::new()
        .name("patroxy-ctl".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match UnixListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return warn!("runtime socket not started: {e}"),
                };
                tokio::spawn(history.clone().run(source.clone(), stop.clone()));
                let commands = Arc::new(Commands {
                    source,
                    admin,
                    handle,
                    history,
                    started: Instant::now(),
                });
                accept_loop(listener, commands, maxconn, stop).await;
            });
            runtime.shutdown_background();
            // Removes the socket file: nobody can connect to a daemon that no longer answers.
            drop(socket);
        })
}

async fn accept_loop(
    listener: UnixListener,
    commands: Arc<Commands>,
    maxconn: usize,
    stop: CancellationToken,
) {
    let what = "runtime socket";
    capped_accept::run(what, listener, maxconn, &stop, CLOSE_GRACE * 2, |(stream, _)| {
        let commands = commands.clone();
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = serve_connection(stream, &commands) => {}
                _ = tokio::time::sleep(CONNECTION_DEADLINE) => debug!("{what}: connection cut at its deadline"),
                _ = async { stop.cancelled().await; tokio::time::sleep(CLOSE_GRACE).await } => {}
            }
        }
    })
    .await;
}

/// Reads one command line, answers, closes.
async fn serve_connection(mut stream: UnixStream, commands: &Commands) {
    let by = match stream.peer_cred() {
        Ok(c) => match c.pid() {
            Some(pid) => format!("uid {} (pid {pid}) on the runtime socket", c.uid()),
            None => format!("uid {} on the runtime socket", c.uid()),
        },
        Err(_) => "the runtime socket".to_string(),
    };
    let answer = match timeout(READ_TIMEOUT, read_line(&mut stream)).await {
        Ok(Ok(line)) => commands.answer(protocol::parse(&line), &by).await,
        Ok(Err(e)) => format!("error: {e}\n"),
        Err(_) => format!("error: no command within {READ_TIMEOUT:?}\n"),
    };
    if let Err(e) = stream.write_all(answer.as_bytes()).await {
        debug!("runtime socket: answer not sent: {e}");
    }
    let _ = stream.shutdown().await;
}

/// The first line sent (without its newline); EOF ends it too, as `echo -n cmd | socat` sends.
async fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_LINE + 1);
    reader.read_line(&mut line).await?;
    if line.len() as u64 > MAX_LINE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("command longer than {MAX_LINE} bytes"),
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
