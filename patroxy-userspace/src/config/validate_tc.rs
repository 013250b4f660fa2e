//! `datapath` and `[tc]`: the packet-level splice and the interfaces its programs attach to.
use super::{Validator, allow};
use crate::config::{
    model::{BpfMode, Datapath},
    raw::{RawDatapath, RawGlobal, RawTc},
};

impl Validator<'_> {
    /// The data path from `global.datapath` and `[tc]`: each needs the other, so an interface
    /// list never goes unused and the TC programs never attach where the operator did not say.
    pub(super) fn datapath(
        &mut self,
        raw: &RawGlobal,
        tc: Option<&RawTc>,
        bpf: BpfMode,
    ) -> Datapath {
        let wanted = raw.datapath.as_ref().map(|d| (*d.get_ref(), d.span()));
        match (wanted, tc) {
            (None | Some((RawDatapath::Sockets, _)), None) => Datapath::Sockets,
            (None | Some((RawDatapath::Sockets, _)), Some(tc)) => {
                self.error(
                    tc.interfaces.span(),
                    "[tc] names interfaces but datapath is not \"tc\"",
                );
                Datapath::Sockets
            }
            (Some((RawDatapath::Tc, span)), None) => {
                self.error(
                    span,
                    "datapath = \"tc\" needs a [tc] section naming the interfaces to attach to",
                );
                Datapath::Sockets
            }
            (Some((RawDatapath::Tc, span)), Some(tc)) => {
                if bpf == BpfMode::Off {
                    self.error(
                        span,
                        "datapath = \"tc\" hands sessions over from the sockmap path, but bpf = \"off\"",
                    );
                }
                Datapath::Tc {
                    interfaces: self.tc_interfaces(tc),
                }
            }
        }
    }

    fn tc_interfaces(&mut self, tc: &RawTc) -> Vec<String> {
        let mut interfaces: Vec<String> = Vec::new();
        for name in tc.interfaces.get_ref() {
            if interfaces.contains(name.get_ref()) {
                self.error(
                    name.span(),
                    format!("interface {:?} is listed twice", name.get_ref()),
                );
                continue;
            }
            if !allow::interface_exists(name.get_ref()) {
                self.error(
                    name.span(),
                    format!("interface {:?} does not exist on this host", name.get_ref()),
                );
            }
            interfaces.push(name.get_ref().clone());
        }
        if interfaces.is_empty() {
            self.error(
                tc.interfaces.span(),
                "[tc] interfaces is empty: the splice would attach nowhere",
            );
        }
        interfaces
    }
}
