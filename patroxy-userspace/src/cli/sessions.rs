//! `patroxy sessions`: the open sockmap sessions, from the pinned SESSIONS map.
use std::path::Path;

use anyhow::Context as _;
use patroxy::{
    config::Config,
    dataplane::{
        maps::{MAP_SESSIONS, OpenSessions},
        sock_diag,
        sockopt::monotonic_ns,
    },
    server_ids::ServerIds,
    stats::sessions,
};

/// Prints one line per open session, or a JSON array with `json`. With the daemon's config,
/// listener and backend ids are shown as names.
pub fn run(pin_dir: &Path, config: Option<&Config>, json: bool) -> anyhow::Result<()> {
    let open = OpenSessions::read(pin_dir).with_context(|| {
        format!(
            "opening {} (is patroxy running with the sockmap data path? root needed)",
            pin_dir.join(MAP_SESSIONS).display()
        )
    })?;
    let sockets = sock_diag::tcp_sockets().context("reading the sockets' addresses (sock_diag)")?;
    let rows = sessions::rows(
        &open,
        &sockets,
        config.map(ServerIds::fresh).as_ref(),
        monotonic_ns(),
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", sessions::table(&rows));
    }
    Ok(())
}
