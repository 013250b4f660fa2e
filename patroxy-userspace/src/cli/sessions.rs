//! `patroxy sessions`: the open sockmap sessions, from the pinned SESSIONS map.
use std::path::Path;

use anyhow::Context as _;
use patroxy::{
    config::Config,
    dataplane::{
        maps::{MAP_SESSIONS, OpenSessions},
        sockopt::monotonic_ns,
    },
    server_ids::ServerIds,
    stats::sessions,
};

/// Prints one line per open session. With the daemon's config, listener and backend ids are
/// shown as names: those of a fresh start (file order), which a structural reload may have
/// changed since (`patroxy ctl show sessions` asks the daemon, which knows).
pub fn run(pin_dir: &Path, config: Option<&Config>) -> anyhow::Result<()> {
    let open = OpenSessions::read(pin_dir).with_context(|| {
        format!(
            "opening {} (is patroxy running with the sockmap data path? root needed)",
            pin_dir.join(MAP_SESSIONS).display()
        )
    })?;
    print!(
        "{}",
        sessions::table(&sessions::rows(
            &open,
            config.map(ServerIds::fresh).as_ref(),
            monotonic_ns()
        ))
    );
    Ok(())
}
