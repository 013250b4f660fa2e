//! `patroxy sessions`: the open sockmap sessions, from the pinned SESSIONS map.
use std::path::Path;

use anyhow::Context as _;
use patroxy::{
    config::Config,
    dataplane::{
        maps::{MAP_SESSIONS, OpenSessions},
        sockopt::monotonic_ns,
    },
    stats::sessions,
};

/// Prints one line per open session. With the daemon's config, listener and backend ids are
/// shown as names.
pub fn run(pin_dir: &Path, config: Option<&Config>) -> anyhow::Result<()> {
    let open = OpenSessions::read(pin_dir).with_context(|| {
        format!(
            "opening {} (is patroxy running with the sockmap data path? root needed)",
            pin_dir.join(MAP_SESSIONS).display()
        )
    })?;
    print!(
        "{}",
        sessions::table(&sessions::rows(&open, config, monotonic_ns()))
    );
    Ok(())
}
