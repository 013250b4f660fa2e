//! The packet-level splice's share of a workload's sessions: a `datapath = "tc"` patroxy's own
//! counters (sessions accepted, sessions handed to the TC program), read over its runtime
//! socket (`patroxy ctl show servers --json`) before and after the workload.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// How to ask one tc variant for its counters.
#[derive(Debug, Clone)]
pub struct TcControl {
    /// The variant's patroxy binary (its `ctl` speaks its socket's protocol).
    pub bin: PathBuf,
    /// Its runtime socket.
    pub socket: PathBuf,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy)]
pub struct HandOffs {
    /// Sessions accepted, all listeners.
    accepted: u64,
    /// Sessions handed to the TC program; `None` from a binary whose stats lack them.
    handed_off: Option<u64>,
}

impl TcControl {
    pub fn read(&self) -> Result<HandOffs> {
        let out = Command::new(&self.bin)
            .arg("ctl")
            .arg("--socket")
            .arg(&self.socket)
            .args(["show", "servers", "--json"])
            .output()
            .context("running patroxy ctl")?;
        if !out.status.success() {
            bail!(
                "patroxy ctl show servers: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing `show servers --json`")?;
        let accepted = json["listeners"]
            .as_array()
            .map(|ls| {
                ls.iter()
                    .filter_map(|l| l["frontend"]["stot"].as_u64())
                    .sum()
            })
            .unwrap_or(0);
        Ok(HandOffs {
            accepted,
            handed_off: json["tc"]["handed_off"].as_u64(),
        })
    }
}

impl HandOffs {
    /// (sessions accepted, of them handed off) between `before` and `self`.
    pub fn since(self, before: HandOffs) -> Option<(u64, u64)> {
        let handed_off = self.handed_off?.checked_sub(before.handed_off?)?;
        Some((self.accepted.saturating_sub(before.accepted), handed_off))
    }
}

/// The workload's sessions and the share of them handed off, for the round's line and the
/// table (percent); `None` for targets without the packet-level splice.
pub fn measure<T>(
    control: Option<&TcControl>,
    workload: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<(u64, u64)>)> {
    let before = control.map(TcControl::read).transpose()?;
    let out = workload()?;
    let after = control.map(TcControl::read).transpose()?;
    let share = before.zip(after).and_then(|(b, a)| a.since(b));
    Ok((out, share))
}
