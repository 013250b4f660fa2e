//! `patroxy sessions`: the open sockmap sessions, from the pinned SESSIONS map (and FLOWS, for
//! those handed to the packet-level splice).
use std::path::Path;

use anyhow::Context as _;
use patroxy::{
    config::Config,
    dataplane::{
        maps::{MAP_BACKENDS, MAP_SESSIONS, OpenSessions, open_pinned},
        sock_diag,
        sockopt::monotonic_ns,
        tc::{MAP_FLOWS, OpenFlows},
    },
    stats::sessions::{self, BackendNames},
};
use patroxy_common::BackendEntry;

/// Prints one line per open session, or a JSON array with `json`. With the daemon's config,
/// listener and backend ids are shown as names (matched through the pinned BACKENDS map, which
/// says each id's listener and address).
pub fn run(pin_dir: &Path, config: Option<&Config>, json: bool) -> anyhow::Result<()> {
    let open = OpenSessions::read(pin_dir).with_context(|| {
        format!(
            "opening {} (is patroxy running with the sockmap data path? root needed)",
            pin_dir.join(MAP_SESSIONS).display()
        )
    })?;
    let flows = OpenFlows::read(pin_dir)
        .with_context(|| format!("opening {}", pin_dir.join(MAP_FLOWS).display()))?;
    let sockets = sock_diag::tcp_sockets().context("reading the sockets' addresses (sock_diag)")?;
    let names = match config {
        Some(config) => {
            let backends = open_pinned::<u32, BackendEntry>(pin_dir, MAP_BACKENDS)
                .with_context(|| format!("opening {}", pin_dir.join(MAP_BACKENDS).display()))?;
            BackendNames::from_backends(config, backends.iter().filter_map(Result::ok))
        }
        None => BackendNames::default(),
    };
    let rows = sessions::rows(&open, &flows, &sockets, &names, monotonic_ns());
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", sessions::table(&rows));
    }
    Ok(())
}
