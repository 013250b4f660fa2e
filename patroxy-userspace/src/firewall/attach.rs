//! Attaching the allowlist to an interface through a pinned bpf_link, so an attachment outlives
//! a crash (the allowlist keeps protecting the ports while patroxy restarts) and the next start
//! finds it under the same pin and swaps its program for the new one atomically
//! (`bpf_link_update`), never leaving the interface unprotected.
//!
//! An interface gets one of three attach modes ([`AttachMode`]), its pin named after it
//! (`<mode>_<iface>`), so the stats and the next start know which one it got.
use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    pin::PinError,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use tracing::{info, warn};

use super::driver;
use crate::config::XdpMode;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("interface {iface}: attaching in {mode} mode: {source}")]
    Attach {
        iface: String,
        mode: AttachMode,
        source: ProgramError,
    },
    #[error("interface {iface}: replacing the program a previous run left attached: {source}")]
    Replace { iface: String, source: ProgramError },
    #[error("interface {iface}: the attachment is not a bpf_link (kernel older than 5.9?)")]
    NotALink { iface: String },
    #[error("interface {iface}: pinning its link at {}: {source}", path.display())]
    Pin {
        iface: String,
        path: PathBuf,
        source: PinError,
    },
    #[error("interface {iface}: {source}")]
    Link { iface: String, source: LinkError },
}

/// Where an interface runs the allowlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// XDP in the driver, on its own buffers: a physical NIC's.
    Native,
    /// XDP in the stack's receive path, on a copy of each socket buffer.
    Generic,
    /// The tc program at tc ingress (tcx, Linux 6.6), on the socket buffer as it is.
    Tc,
}

impl AttachMode {
    const ALL: [AttachMode; 3] = [AttachMode::Native, AttachMode::Generic, AttachMode::Tc];

    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
            AttachMode::Tc => "tc",
        }
    }

    fn is_xdp(self) -> bool {
        self != AttachMode::Tc
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The loaded programs an interface can get.
pub struct Programs<'a> {
    pub xdp: &'a mut Xdp,
    pub tc: &'a mut SchedClassifier,
}

/// The program attached to one interface, pinned under the pin directory.
pub struct Attachment {
    pub iface: String,
    pub mode: AttachMode,
    /// Taken in `drop`: unpinning and closing it detaches the program.
    link: Option<PinnedLink>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            match link.unpin() {
                // Closing the last reference to the link detaches the program.
                Ok(fd) => drop(fd),
                Err(e) => warn!(iface = %self.iface, "unpinning the allowlist's link: {e}"),
            }
        }
    }
}

impl Attachment {
    /// Closes this process's reference to the link and leaves its pin, which keeps the program
    /// attached (for an upgrade's successor).
    pub fn leave_attached(mut self) {
        drop(self.link.take());
    }
}

/// The attachment a predecessor pinned for `iface`, if there is one: dropping it detaches.
pub fn adopt(dir: &Path, iface: &str) -> Option<Attachment> {
    let (mode, pin) = pinned(dir, iface)?;
    let link = PinnedLink::from_pin(pin).ok()?;
    Some(Attachment {
        iface: iface.to_string(),
        mode,
        link: Some(link),
    })
}

/// Where the link of `iface` is pinned when it runs in `mode`.
pub fn link_pin(dir: &Path, iface: &str, mode: AttachMode) -> PathBuf {
    dir.join(format!("{mode}_{iface}"))
}

/// The interfaces with a link pinned in `dir`, and their modes, by name.
pub fn attached(dir: &Path) -> Vec<(String, AttachMode)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut attached: Vec<(String, AttachMode)> = entries
        .flatten()
        .filter_map(|e| parse_pin(&e.file_name().to_string_lossy()))
        .collect();
    attached.sort_by(|a, b| a.0.cmp(&b.0));
    attached
}

/// `<mode>_<iface>` as (iface, mode).
fn parse_pin(name: &str) -> Option<(String, AttachMode)> {
    AttachMode::ALL.into_iter().find_map(|mode| {
        let iface = name.strip_prefix(mode.name())?.strip_prefix('_')?;
        Some((iface.to_string(), mode))
    })
}

/// The pin a previous run left for `iface`, and its mode.
fn pinned(dir: &Path, iface: &str) -> Option<(AttachMode, PathBuf)> {
    AttachMode::ALL
        .into_iter()
        .map(|mode| (mode, link_pin(dir, iface, mode)))
        .find(|(_, pin)| pin.exists())
}

/// The modes a new attachment tries, in order. `auto`: tc on a virtual device (a veth's XDP
/// modes both copy every TCP packet, because TCP transmits clones XDP may not write to; tc
/// judges the socket buffer as it is), native on a NIC; generic only where neither attaches.
fn candidates(mode: XdpMode, is_virtual: bool) -> &'static [AttachMode] {
    use AttachMode::{Generic, Native, Tc};
    match mode {
        XdpMode::Native => &[Native],
        XdpMode::Generic => &[Generic],
        XdpMode::Tc => &[Tc],
        XdpMode::Auto if is_virtual => &[Tc, Generic],
        XdpMode::Auto => &[Native, Tc, Generic],
    }
}

/// Attaches the allowlist to `iface` as `mode` says (replacing what a previous run left pinned
/// there) and pins the link.
pub fn attach(
    programs: &mut Programs<'_>,
    dir: &Path,
    iface: &str,
    mode: XdpMode,
) -> Result<Attachment, AttachError> {
    let is_virtual = driver::is_virtual(iface);
    let candidates = candidates(mode, is_virtual);
    let stale = pinned(dir, iface).and_then(|(was, pin)| {
        let link = PinnedLink::from_pin(&pin).ok()?;
        let fd = link.unpin().ok()?;
        Some((was, fd))
    });
    let (mode, link) = match stale {
        Some((was, fd)) if candidates.contains(&was) => {
            let link = replace(programs, iface, was, fd)?;
            warn!(
                iface,
                mode = %was,
                "replaced the allowlist a previous run left attached (it did not stop cleanly)"
            );
            (was, link)
        }
        Some((was, fd)) => {
            // Left by a run with another mode. Two XDP modes exclude each other, so that one
            // goes first; any other pair can overlap until the new one is attached.
            let keep = if was.is_xdp() && candidates.iter().any(|m| m.is_xdp()) {
                drop(fd);
                None
            } else {
                Some(fd)
            };
            let attached = fresh(programs, iface, candidates, is_virtual)?;
            drop(keep);
            warn!(
                iface,
                "replaced the allowlist a previous run left attached in {was} mode (it did not \
                 stop cleanly, and the mode changed)"
            );
            attached
        }
        None => fresh(programs, iface, candidates, is_virtual)?,
    };
    let pin = link_pin(dir, iface, mode);
    let link = link.pin(&pin).map_err(|source| AttachError::Pin {
        iface: iface.to_string(),
        path: pin.clone(),
        source,
    })?;
    Ok(Attachment {
        iface: iface.to_string(),
        mode,
        link: Some(link),
    })
}

/// Swaps the program of a previous run's link (`fd`, attached in `mode`) for this run's.
fn replace(
    programs: &mut Programs<'_>,
    iface: &str,
    mode: AttachMode,
    fd: FdLink,
) -> Result<FdLink, AttachError> {
    let link_error = |source| AttachError::Link {
        iface: iface.to_string(),
        source,
    };
    let replace = |source| AttachError::Replace {
        iface: iface.to_string(),
        source,
    };
    let taken = if mode.is_xdp() {
        let link = XdpLink::try_from(fd).map_err(link_error)?;
        let id = programs.xdp.attach_to_link(link).map_err(replace)?;
        programs.xdp.take_link(id).map(FdLink::try_from)
    } else {
        let link = SchedClassifierLink::try_from(fd).map_err(link_error)?;
        let id = programs.tc.attach_to_link(link).map_err(replace)?;
        programs.tc.take_link(id).map(FdLink::try_from)
    };
    taken.map_err(replace)?.map_err(|_| AttachError::NotALink {
        iface: iface.to_string(),
    })
}

/// A new attachment in the first of `candidates` that attaches; what `auto` chose and why is
/// said once.
fn fresh(
    programs: &mut Programs<'_>,
    iface: &str,
    candidates: &[AttachMode],
    is_virtual: bool,
) -> Result<(AttachMode, FdLink), AttachError> {
    let mut refused: Option<AttachError> = None;
    for &mode in candidates {
        match attach_in(programs, iface, mode) {
            Ok(link) => {
                if candidates.len() > 1 {
                    info!(iface, mode = %mode, "XDP allowlist attached in {mode} mode ({})",
                        why(mode, is_virtual, refused.as_ref()));
                }
                return Ok((mode, link));
            }
            Err(e) => refused = Some(e),
        }
    }
    Err(refused.expect("at least one candidate mode"))
}

/// Why `auto` chose `mode`, for the log.
fn why(mode: AttachMode, is_virtual: bool, refused: Option<&AttachError>) -> String {
    match (refused, mode, is_virtual) {
        (Some(e), _, _) => format!("the mode before it was refused: {e}"),
        (None, AttachMode::Tc, true) => "a virtual device: its XDP modes copy every TCP packet, \
                                         tc ingress judges the socket buffer as it is"
            .into(),
        (None, _, _) => "the driver runs XDP on its own buffers".into(),
    }
}

/// Attaches in `mode` and takes the link out of the program, as a bpf_link to pin.
fn attach_in(
    programs: &mut Programs<'_>,
    iface: &str,
    mode: AttachMode,
) -> Result<FdLink, AttachError> {
    let error = |source| AttachError::Attach {
        iface: iface.to_string(),
        mode,
        source,
    };
    let taken = match mode {
        AttachMode::Native | AttachMode::Generic => {
            let flags = if mode == AttachMode::Native {
                AyaMode::Driver
            } else {
                AyaMode::Skb
            };
            let id = programs.xdp.attach(iface, flags).map_err(error)?;
            programs.xdp.take_link(id).map(FdLink::try_from)
        }
        AttachMode::Tc => {
            // First in the interface's tcx chain: a program of another owner attached later
            // cannot let a denied packet through before the allowlist saw it.
            let options = TcAttachOptions::TcxOrder(LinkOrder::first());
            let id = programs
                .tc
                .attach_with_options(iface, TcAttachType::Ingress, options)
                .map_err(error)?;
            programs.tc.take_link(id).map(FdLink::try_from)
        }
    };
    taken.map_err(error)?.map_err(|_| AttachError::NotALink {
        iface: iface.to_string(),
    })
}

/// Detaches what a previous run left attached to interfaces not in `keep`: removing its pin
/// drops the last reference to the link (no process holds it), which detaches the program.
/// Pins named `link_<iface>` are an earlier version's (before the modes were in the names).
pub fn detach_stale(dir: &Path, keep: &[String]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let iface = match parse_pin(&name) {
            Some((iface, _)) if keep.contains(&iface) => continue,
            Some((iface, _)) => iface,
            None => match name.strip_prefix("link_") {
                Some(iface) => iface.to_string(),
                None => continue,
            },
        };
        match fs::remove_file(entry.path()) {
            Ok(()) => warn!(
                iface,
                "detached the allowlist a previous run left attached (no longer configured)"
            ),
            Err(e) => warn!(
                iface,
                "cannot detach the allowlist a previous run left: {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttachMode::{Generic, Native, Tc};

    #[test]
    fn auto_takes_tc_on_a_virtual_device_and_native_on_a_nic() {
        assert_eq!(candidates(XdpMode::Auto, true), [Tc, Generic]);
        assert_eq!(candidates(XdpMode::Auto, false), [Native, Tc, Generic]);
    }

    #[test]
    fn a_named_mode_is_the_only_candidate() {
        assert_eq!(candidates(XdpMode::Native, true), [Native]);
        assert_eq!(candidates(XdpMode::Generic, false), [Generic]);
        assert_eq!(candidates(XdpMode::Tc, false), [Tc]);
    }

    #[test]
    fn pin_names_carry_the_mode() {
        let dir = Path::new("/sys/fs/bpf/p/xdp");
        for mode in AttachMode::ALL {
            let pin = link_pin(dir, "veth_a", mode);
            let name = pin.file_name().unwrap().to_string_lossy();
            assert_eq!(parse_pin(&name), Some(("veth_a".to_string(), mode)));
        }
        assert_eq!(parse_pin("ALLOW_V4"), None);
        assert_eq!(parse_pin("link_eth0"), None);
    }
}
