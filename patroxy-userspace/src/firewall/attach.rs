//! Attaching the program to an interface through a pinned bpf_link, so an attachment outlives a
//! crash (the allowlist keeps protecting the ports while patroxy restarts) and the next start
//! finds it under the same pin and swaps its program for the new one atomically
//! (`bpf_link_update`), never leaving the interface unprotected.
use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    pin::PinError,
    programs::{
        ProgramError, Xdp, XdpMode as AyaMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
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
        mode: &'static str,
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

/// The program attached to one interface, pinned under the pin directory.
pub struct Attachment {
    pub iface: String,
    /// Taken in `drop`: unpinning and closing it detaches the program.
    link: Option<PinnedLink>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            match link.unpin() {
                // Closing the last reference to the link detaches the program.
                Ok(fd) => drop(fd),
                Err(e) => warn!(iface = %self.iface, "unpinning the XDP link: {e}"),
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
    let link = PinnedLink::from_pin(link_pin(dir, iface)).ok()?;
    Some(Attachment {
        iface: iface.to_string(),
        link: Some(link),
    })
}

/// Where the link of `iface` is pinned.
pub fn link_pin(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("link_{iface}"))
}

/// Attaches `program` to `iface` (replacing what a previous run left pinned there) and pins the
/// link.
pub fn attach(
    program: &mut Xdp,
    dir: &Path,
    iface: &str,
    mode: XdpMode,
) -> Result<Attachment, AttachError> {
    let pin = link_pin(dir, iface);
    let id = match PinnedLink::from_pin(&pin) {
        Ok(stale) => {
            let replace = |source| AttachError::Replace {
                iface: iface.to_string(),
                source,
            };
            let fd = stale
                .unpin()
                .map_err(|e| replace(ProgramError::IOError(e)))?;
            let link = XdpLink::try_from(fd).map_err(|source| AttachError::Link {
                iface: iface.to_string(),
                source,
            })?;
            let id = program.attach_to_link(link).map_err(replace)?;
            warn!(
                iface,
                "replaced the XDP program a previous run left attached (it did not stop cleanly)"
            );
            id
        }
        Err(_) => fresh(program, iface, mode)?,
    };
    let link = program
        .take_link(id)
        .map_err(|source| AttachError::Attach {
            iface: iface.to_string(),
            mode: "any",
            source,
        })?;
    let fd = FdLink::try_from(link).map_err(|_| AttachError::NotALink {
        iface: iface.to_string(),
    })?;
    let link = fd.pin(&pin).map_err(|source| AttachError::Pin {
        iface: iface.to_string(),
        path: pin.clone(),
        source,
    })?;
    Ok(Attachment {
        iface: iface.to_string(),
        link: Some(link),
    })
}

/// A new attachment: native where the driver can, else (in `auto`) generic, said once. A veth
/// gets generic in `auto`: its native mode copies each skb into a page of its own and runs it
/// through a NAPI ring a second time (the packet is an skb already, so nothing is saved), and
/// turns segmentation offload off on its peer; generic runs the program on the skb in the
/// receive path (the README's Measured section has the numbers).
fn fresh(program: &mut Xdp, iface: &str, mode: XdpMode) -> Result<XdpLinkId, AttachError> {
    let error = |mode, source| AttachError::Attach {
        iface: iface.to_string(),
        mode,
        source,
    };
    let generic = |program: &mut Xdp| {
        program
            .attach(iface, AyaMode::Skb)
            .map_err(|e| error("generic", e))
    };
    match mode {
        XdpMode::Native => program
            .attach(iface, AyaMode::Driver)
            .map_err(|e| error("native", e)),
        XdpMode::Generic => generic(program),
        XdpMode::Auto if driver::driver(iface).is_ok_and(|d| d == "veth") => {
            let id = generic(program)?;
            info!(
                iface,
                "XDP allowlist attached in generic mode (a veth: its native mode copies every \
                 packet and turns TSO off on the peer, generic is cheaper there)"
            );
            Ok(id)
        }
        XdpMode::Auto => match program.attach(iface, AyaMode::Driver) {
            Ok(id) => {
                info!(iface, "XDP allowlist attached in native mode");
                Ok(id)
            }
            Err(native) => {
                let id = generic(program)?;
                info!(
                    iface,
                    "XDP allowlist attached in generic mode (native XDP not available here: {native})"
                );
                Ok(id)
            }
        },
    }
}

/// Detaches what a previous run left attached to interfaces not in `keep`: removing its pin
/// drops the last reference to the link (no process holds it), which detaches the program.
pub fn detach_stale(dir: &Path, keep: &[String]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(iface) = name.strip_prefix("link_") else {
            continue;
        };
        if keep.iter().any(|k| k == iface) {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => warn!(
                iface,
                "detached the XDP program a previous run left attached (no longer configured)"
            ),
            Err(e) => warn!(
                iface,
                "cannot detach the XDP program a previous run left: {e}"
            ),
        }
    }
}
