//! `[[allow]]` and `[xdp]` -> [`Firewall`]: the CIDRs parsed, listener names resolved to their
//! ports, and the rule set checked as a whole. Rules must not overlap: the kernel finds a
//! packet's rule by longest prefix match per port, so two rules allowing one (source, port)
//! would make the first one's counters miss what the second matched, and a rule entirely
//! inside an earlier one is a mistake the operator wants to hear about (UFW keeps it silently).
use std::{collections::HashMap, net::IpAddr, ops::Range, str::FromStr};

use ipnet::IpNet;
use patroxy_common::xdp::{MAX_ALLOW_ENTRIES, MAX_PROTECTED_PORTS, MAX_RULES, MAX_SYN_RATE};
use toml::Spanned;

use super::error::{Diagnostic, Source};
use super::model::{AllowRule, Firewall, Listener, Stats, SynRate, Xdp, XdpEnabled, XdpMode};
use super::raw::{RawAllow, RawBpf, RawPortRef, RawXdp, RawXdpMode};

/// The name `to` uses for the `[stats]` bind's port.
pub(crate) const STATS_PORT_NAME: &str = "stats";

/// Validates the rules against the listeners and stats bind they name, and `[xdp]` against
/// this host's interfaces. Problems are returned, not raised: the caller reports them with the
/// rest of the file's.
pub(crate) fn firewall(
    allow: &[RawAllow],
    xdp: Option<&RawXdp>,
    listeners: &[Listener],
    stats: Option<&Stats>,
    src: &Source,
) -> (Firewall, Vec<Diagnostic>) {
    let mut v = AllowValidator {
        src,
        diags: Vec::new(),
    };
    let rules: Vec<AllowRule> = allow.iter().map(|r| v.rule(r, listeners, stats)).collect();
    v.overlaps(allow, &rules);
    if rules.len() > MAX_RULES as usize {
        v.error(
            allow[MAX_RULES as usize].from.span(),
            format!("at most {MAX_RULES} [[allow]] rules"),
        );
    }
    let firewall = Firewall {
        xdp: xdp.map(|x| v.xdp(x, &rules)).unwrap_or_default(),
        rules,
    };
    if firewall.protected_ports().len() > MAX_PROTECTED_PORTS as usize {
        v.error(
            allow.last().map_or(0..0, |r| r.to.span()),
            format!("the [[allow]] rules name more than {MAX_PROTECTED_PORTS} ports"),
        );
    }
    let entries: usize = firewall
        .rules
        .iter()
        .map(|r| r.from.len() * r.ports.len())
        .sum();
    if entries > MAX_ALLOW_ENTRIES as usize {
        v.error(
            allow.last().map_or(0..0, |r| r.from.span()),
            format!(
                "the [[allow]] rules make {entries} (network, port) pairs; at most {MAX_ALLOW_ENTRIES}"
            ),
        );
    }
    (firewall, v.diags)
}

struct AllowValidator<'a> {
    src: &'a Source<'a>,
    diags: Vec<Diagnostic>,
}

impl AllowValidator<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.diags.push(self.src.diagnostic(span, message));
    }

    fn at(&self, span: &Range<usize>) -> String {
        let (line, column) = self.src.position(span.start);
        format!("{line}:{column}")
    }

    fn rule(&mut self, raw: &RawAllow, listeners: &[Listener], stats: Option<&Stats>) -> AllowRule {
        if raw.from.get_ref().is_empty() {
            self.error(raw.from.span(), "allow rule has an empty `from`");
        }
        if raw.to.get_ref().is_empty() {
            self.error(raw.to.span(), "allow rule has an empty `to`");
        }
        let mut from: Vec<(IpNet, Range<usize>)> = Vec::new();
        for cidr in raw.from.get_ref() {
            let Some(net) = self.cidr(cidr) else { continue };
            if let Some((other, span)) = from.iter().find(|(o, _)| overlap(o, &net)) {
                let msg = format!(
                    "{net} overlaps {other} (at {}) of the same rule",
                    self.at(span)
                );
                self.error(cidr.span(), msg);
                continue;
            }
            from.push((net, cidr.span()));
        }
        let mut ports: HashMap<u16, Range<usize>> = HashMap::new();
        for to in raw.to.get_ref() {
            let Some(port) = self.port(to, listeners, stats) else {
                continue;
            };
            if let Some(first) = ports.insert(port, to.span()) {
                let msg = format!(
                    "port {port} is named twice in this rule (first at {})",
                    self.at(&first)
                );
                self.error(to.span(), msg);
            }
        }
        let mut ports: Vec<u16> = ports.into_keys().collect();
        ports.sort_unstable();
        AllowRule {
            from: from.into_iter().map(|(n, _)| n).collect(),
            ports,
        }
    }

    /// "10.0.0.0/8", "fd14::/64", or a bare address for one host.
    fn cidr(&mut self, raw: &Spanned<String>) -> Option<IpNet> {
        let text = raw.get_ref().trim();
        let net = match (IpNet::from_str(text), IpAddr::from_str(text)) {
            (Ok(net), _) => net,
            (_, Ok(addr)) => IpNet::from(addr),
            _ => {
                self.error(
                    raw.span(),
                    format!("{text:?} is not an IPv4 or IPv6 network (like \"10.0.0.0/24\")"),
                );
                return None;
            }
        };
        if net.trunc() != net {
            self.error(
                raw.span(),
                format!(
                    "{text:?} has bits set past its /{}: write the network, {}",
                    net.prefix_len(),
                    net.trunc()
                ),
            );
            return None;
        }
        Some(net)
    }

    fn port(
        &mut self,
        raw: &Spanned<RawPortRef>,
        listeners: &[Listener],
        stats: Option<&Stats>,
    ) -> Option<u16> {
        match raw.get_ref() {
            RawPortRef::Port(0) => {
                self.error(raw.span(), "port 0 is not a port");
                None
            }
            RawPortRef::Port(p) => Some(*p),
            RawPortRef::Name(name) => {
                if let Some(l) = listeners.iter().find(|l| &l.name == name) {
                    Some(l.bind.port())
                } else if name == STATS_PORT_NAME {
                    match stats {
                        Some(s) => Some(s.bind.port()),
                        None => {
                            self.error(raw.span(), "`to` names \"stats\" but there is no [stats]");
                            None
                        }
                    }
                } else {
                    let known: Vec<&str> = listeners
                        .iter()
                        .map(|l| l.name.as_str())
                        .chain(stats.map(|_| STATS_PORT_NAME))
                        .collect();
                    self.error(
                        raw.span(),
                        format!(
                            "`to` names {name:?}, which is no listener (known: {})",
                            known.join(", ")
                        ),
                    );
                    None
                }
            }
        }
    }

    /// Each rule against the earlier ones: unreachable when an earlier rule already allows all
    /// it does, overlapping when they share some source and port.
    fn overlaps(&mut self, raw: &[RawAllow], rules: &[AllowRule]) {
        for (j, rule) in rules.iter().enumerate() {
            for (i, earlier) in rules[..j].iter().enumerate() {
                let shared: Vec<u16> = rule
                    .ports
                    .iter()
                    .copied()
                    .filter(|p| earlier.ports.contains(p))
                    .collect();
                if shared.is_empty() || rule.from.is_empty() {
                    continue;
                }
                let covered = shared.len() == rule.ports.len()
                    && rule
                        .from
                        .iter()
                        .all(|n| earlier.from.iter().any(|e| e.contains(n)));
                let at = self.at(&raw[i].from.span());
                if covered {
                    self.error(
                        raw[j].from.span(),
                        format!(
                            "this rule is unreachable: the rule at {at} already allows every source and port it names"
                        ),
                    );
                    continue;
                }
                if let Some((n, e)) = rule
                    .from
                    .iter()
                    .find_map(|n| earlier.from.iter().find(|e| overlap(n, e)).map(|e| (n, e)))
                {
                    self.error(
                        raw[j].from.span(),
                        format!(
                            "this rule overlaps the rule at {at}: {n} and {e} both reach port {}; give each source and port one rule",
                            shared[0]
                        ),
                    );
                }
            }
        }
    }

    fn xdp(&mut self, raw: &RawXdp, rules: &[AllowRule]) -> Xdp {
        // The section's presence enables it, as `[runtime]`'s does.
        let enabled = match raw.enabled.as_ref().map_or(RawBpf::Auto, |e| *e.get_ref()) {
            RawBpf::Auto => XdpEnabled::Auto,
            RawBpf::Required => XdpEnabled::Required,
            RawBpf::Off => XdpEnabled::Off,
        };
        let enabled_span = raw.enabled.as_ref().map_or(0..0, |e| e.span());
        let mut interfaces: Vec<String> = Vec::new();
        if let Some(list) = &raw.interfaces {
            for name in list.get_ref() {
                if interfaces.contains(name.get_ref()) {
                    self.error(
                        name.span(),
                        format!("interface {:?} is listed twice", name.get_ref()),
                    );
                    continue;
                }
                // An interface is this host's state, but attaching to a missing one is what
                // `run` would fail on: check-config says so first. Off attaches nothing.
                if enabled != XdpEnabled::Off && !interface_exists(name.get_ref()) {
                    self.error(
                        name.span(),
                        format!("interface {:?} does not exist on this host", name.get_ref()),
                    );
                }
                interfaces.push(name.get_ref().clone());
            }
        }
        if enabled != XdpEnabled::Off {
            if interfaces.is_empty() {
                let span = raw
                    .interfaces
                    .as_ref()
                    .map_or(enabled_span.clone(), |i| i.span());
                self.error(
                    span,
                    "[xdp] is enabled but names no `interfaces` to attach to",
                );
            }
            if rules.is_empty() {
                self.error(
                    enabled_span,
                    "[xdp] is enabled but there is no [[allow]] rule to enforce",
                );
            }
        }
        let mut rate = |r: &Spanned<u32>, what: &str| {
            if !(1..=MAX_SYN_RATE).contains(&u64::from(*r.get_ref())) {
                self.error(r.span(), format!("{what} must be 1..={MAX_SYN_RATE}"));
            }
            *r.get_ref()
        };
        let syn_limit = match (&raw.syn_rate, &raw.syn_burst) {
            (None, None) => None,
            (None, Some(b)) => {
                self.error(b.span(), "syn_burst is set but syn_rate is not");
                None
            }
            (Some(r), b) => {
                let r = rate(r, "syn_rate");
                Some(SynRate {
                    rate: r,
                    burst: b.as_ref().map_or(r, |b| rate(b, "syn_burst")),
                })
            }
        };
        Xdp {
            enabled,
            interfaces,
            mode: match raw.mode.unwrap_or(RawXdpMode::Auto) {
                RawXdpMode::Auto => XdpMode::Auto,
                RawXdpMode::Native => XdpMode::Native,
                RawXdpMode::Generic => XdpMode::Generic,
                RawXdpMode::Tc => XdpMode::Tc,
            },
            syn_limit,
        }
    }
}

/// Whether two networks share an address (one contains the other, as CIDRs nest).
fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

pub(super) fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}
