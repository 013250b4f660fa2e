//! `patroxy maps`: the pinned maps, and the bpftool commands to look inside them.
use std::path::Path;

use patroxy::dataplane::maps::{MAP_BACKENDS, MAP_LOG_LIMIT, MAP_SESSIONS, MAP_SOCKS, open_pinned};
use patroxy_common::{BackendEntry, SessionEntry};

/// Prints each pinned map under `pin_dir`, whether it is there, and the bpftool commands.
pub fn run(pin_dir: &Path) -> anyhow::Result<()> {
    println!("pinned under {}:", pin_dir.display());
    for (name, what) in [
        (
            MAP_SOCKS,
            "sockhash: socket cookie -> socket (no BTF: the kernel refuses it for sockmaps)",
        ),
        (
            MAP_SESSIONS,
            "per socket: peer cookie, bytes each way, last activity, backend, listener, side",
        ),
        (
            MAP_BACKENDS,
            "per backend id: address, listener, state, role, fenced, sessions",
        ),
        (
            MAP_LOG_LIMIT,
            "per CPU: the debug log's token bucket, lines printed and suppressed (bpf_log)",
        ),
    ] {
        let path = pin_dir.join(name);
        let count = match name {
            MAP_SESSIONS => open_pinned::<u64, SessionEntry>(pin_dir, name)
                .ok()
                .map(|m| m.keys().count()),
            MAP_BACKENDS => open_pinned::<u32, BackendEntry>(pin_dir, name)
                .ok()
                .map(|m| m.keys().count()),
            _ => None,
        };
        let state = match (path.exists(), count) {
            (false, _) => "missing".to_string(),
            (true, Some(n)) => format!("{n} entries"),
            (true, None) => "present".to_string(),
        };
        println!(
            "\n  {name:<9} {} ({state})\n            {what}",
            path.display()
        );
        println!("            bpftool map show pinned {}", path.display());
        println!("            bpftool map dump pinned {}", path.display());
    }
    println!("\nthe verdict program:\n  bpftool prog show name patroxy_verdict");
    println!(
        "  bpftool -j map dump pinned {} | jq .  # typed JSON",
        pin_dir.join(MAP_SESSIONS).display()
    );
    Ok(())
}
