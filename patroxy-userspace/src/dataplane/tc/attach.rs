//! The TC programs on the configured interfaces: tcx links pinned under the pin directory, so a
//! crashed run's links are found (and replaced) at the next start, and detached on exit.
use std::{fs, path::Path};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};
use tracing::warn;

use crate::dataplane::loader::LoadError;

const INGRESS: &str = "patroxy_tc_ingress";
const EGRESS: &str = "patroxy_tc_egress";
/// Pins of the links are named `tc_ingress_<interface>` and `tc_egress_<interface>`.
const PIN_PREFIX: &str = "tc_";

/// One attachment; unpinning and closing it on drop detaches the program.
pub(super) struct TcLink {
    iface: String,
    link: Option<PinnedLink>,
}

impl TcLink {
    /// Leaves the program attached for a successor: the pin stays, only this handle closes.
    pub(super) fn keep_pinned(&mut self) {
        self.link.take();
    }
}

impl Drop for TcLink {
    fn drop(&mut self) {
        if let Some(link) = self.link.take()
            && let Err(e) = link.unpin()
        {
            warn!(iface = %self.iface, "unpinning the TC link: {e}");
        }
    }
}

pub(super) fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

pub(super) fn attach_all(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    interfaces: &[String],
) -> Result<Vec<TcLink>, LoadError> {
    detach_stale(pin_dir);
    let mut links = Vec::new();
    for (name, attach_type, label) in [
        (INGRESS, TcAttachType::Ingress, "ingress"),
        (EGRESS, TcAttachType::Egress, "egress"),
    ] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(LoadError::Missing(name))?
            .try_into()?;
        program.load()?;
        for iface in interfaces {
            let id = program.attach_with_options(
                iface,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )?;
            let link = program.take_link(id)?;
            let pin = link_pin(pin_dir, label, iface);
            let fd = FdLink::try_from(link).map_err(|e| LoadError::Pin {
                path: pin.clone(),
                msg: format!("the tcx attachment is not a bpf_link: {e}"),
            })?;
            let link = fd.pin(&pin).map_err(|e| LoadError::Pin {
                path: pin.clone(),
                msg: e.to_string(),
            })?;
            links.push(TcLink {
                iface: iface.clone(),
                link: Some(link),
            });
        }
    }
    Ok(links)
}

/// The links a predecessor (an upgrade) or a crashed run pinned for each of `interfaces`,
/// taken over as they are: the programs stay attached and the flows they carry go on. Every
/// interface must have both; a pinned link for an interface not in `interfaces` is refused too
/// (the attachment would outlive its configuration).
pub(super) fn adopt_all(pin_dir: &Path, interfaces: &[String]) -> Result<Vec<TcLink>, LoadError> {
    let wanted: Vec<(&String, std::path::PathBuf)> = interfaces
        .iter()
        .flat_map(|iface| {
            ["ingress", "egress"].map(|label| (iface, link_pin(pin_dir, label, iface)))
        })
        .collect();
    if let Ok(entries) = fs::read_dir(pin_dir) {
        for entry in entries.flatten() {
            let stray = entry.file_name().to_string_lossy().starts_with(PIN_PREFIX)
                && !wanted.iter().any(|(_, pin)| *pin == entry.path());
            if stray {
                return Err(LoadError::Pin {
                    path: entry.path(),
                    msg: "the running TC attachment is on an interface this configuration does \
                          not name (changing [tc] interfaces needs a restart)"
                        .into(),
                });
            }
        }
    }
    wanted
        .into_iter()
        .map(|(iface, pin)| {
            let link = PinnedLink::from_pin(&pin).map_err(|e| LoadError::Pin {
                path: pin.clone(),
                msg: format!("no TC attachment to take over: {e}"),
            })?;
            Ok(TcLink {
                iface: iface.clone(),
                link: Some(link),
            })
        })
        .collect()
}

/// Where the link of the `label` ("ingress" or "egress") program on `iface` is pinned.
fn link_pin(pin_dir: &Path, label: &str, iface: &str) -> std::path::PathBuf {
    pin_dir.join(format!("{PIN_PREFIX}{label}_{iface}"))
}

/// Detaches what a run that did not stop cleanly left attached: its flows died with it, so its
/// programs only drop their packets now.
fn detach_stale(pin_dir: &Path) {
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(PIN_PREFIX) {
            continue;
        }
        if let Ok(link) = PinnedLink::from_pin(entry.path()) {
            warn!(pin = %entry.path().display(), "detached the TC program a previous run left attached");
            let _ = link.unpin();
        }
    }
}
