//! The allow rules as the kernel's map entries, and the order a change is written in.
//!
//! A reload rewrites the entries in place, never detaching the program, in an order that leaves
//! no moment where a source the old and the new rules both allow is dropped, or one neither
//! allows passes: first the new allow entries (an entry in both is overwritten with its new
//! rule index), then the new ports' counters and the newly protected ports; then the ports no
//! longer protected, their counters, and last the allow entries no longer wanted.
use std::collections::{BTreeMap, BTreeSet};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use patroxy_common::xdp::RuleIndex;

use crate::config::AllowRule;

/// Every entry of the allow tries and the protected ports, for one rule set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    pub v4: BTreeMap<(u16, Ipv4Net), RuleIndex>,
    pub v6: BTreeMap<(u16, Ipv6Net), RuleIndex>,
    pub ports: BTreeSet<u16>,
}

impl Entries {
    pub fn of(rules: &[AllowRule]) -> Self {
        let mut e = Entries::default();
        for (index, rule) in rules.iter().enumerate() {
            let index = RuleIndex::try_from(index).expect("validation bounds the rule count");
            for &port in &rule.ports {
                e.ports.insert(port);
                for net in &rule.from {
                    match net {
                        IpNet::V4(n) => e.v4.insert((port, *n), index),
                        IpNet::V6(n) => e.v6.insert((port, *n), index),
                    };
                }
            }
        }
        e
    }

    /// The writes that turn the kernel's `self` into `new`, in a safe order (module docs).
    pub fn changes_to(&self, new: &Entries) -> Vec<Change> {
        let mut out = Vec::new();
        out.extend(
            new.v4
                .iter()
                .filter(|(k, v)| self.v4.get(k) != Some(v))
                .map(|(k, v)| Change::AllowV4(k.0, k.1, *v)),
        );
        out.extend(
            new.v6
                .iter()
                .filter(|(k, v)| self.v6.get(k) != Some(v))
                .map(|(k, v)| Change::AllowV6(k.0, k.1, *v)),
        );
        for port in new.ports.difference(&self.ports) {
            out.push(Change::Protect(*port));
        }
        for port in self.ports.difference(&new.ports) {
            out.push(Change::Unprotect(*port));
        }
        out.extend(
            self.v4
                .keys()
                .filter(|k| !new.v4.contains_key(k))
                .map(|k| Change::RemoveV4(k.0, k.1)),
        );
        out.extend(
            self.v6
                .keys()
                .filter(|k| !new.v6.contains_key(k))
                .map(|k| Change::RemoveV6(k.0, k.1)),
        );
        out
    }
}

/// One write to the kernel's maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    AllowV4(u16, Ipv4Net, RuleIndex),
    AllowV6(u16, Ipv6Net, RuleIndex),
    /// Creates the port's counters, then adds it to the protected ports.
    Protect(u16),
    /// Removes the port from the protected ports, then its counters.
    Unprotect(u16),
    RemoveV4(u16, Ipv4Net),
    RemoveV6(u16, Ipv6Net),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(from: &[&str], ports: &[u16]) -> AllowRule {
        AllowRule {
            from: from.iter().map(|n| n.parse().unwrap()).collect(),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn every_network_gets_an_entry_per_port_with_its_rule_index() {
        let e = Entries::of(&[
            rule(&["10.100.100.0/24", "fd14::/64"], &[5432, 7000]),
            rule(&["10.200.0.0/16"], &[5433]),
        ]);
        assert_eq!(e.ports, BTreeSet::from([5432, 5433, 7000]));
        assert_eq!(e.v4.len(), 3);
        assert_eq!(e.v4[&(5433, "10.200.0.0/16".parse().unwrap())], 1);
        assert_eq!(e.v6[&(7000, "fd14::/64".parse().unwrap())], 0);
    }

    #[test]
    fn a_change_adds_before_it_removes() {
        let old = Entries::of(&[rule(&["10.214.1.0/24"], &[5432])]);
        let new = Entries::of(&[rule(&["10.214.2.0/24"], &[5433])]);
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        assert_eq!(
            old.changes_to(&new),
            vec![
                Change::AllowV4(5433, net("10.214.2.0/24"), 0),
                Change::Protect(5433),
                Change::Unprotect(5432),
                Change::RemoveV4(5432, net("10.214.1.0/24")),
            ]
        );
    }

    #[test]
    fn an_entry_whose_rule_moved_is_rewritten_and_not_removed() {
        let a = rule(&["10.214.1.0/24"], &[5432]);
        let b = rule(&["10.214.2.0/24"], &[5432]);
        let old = Entries::of(&[a.clone(), b.clone()]);
        let new = Entries::of(&[b, a]);
        let changes = old.changes_to(&new);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(
            changes
                .iter()
                .all(|c| matches!(c, Change::AllowV4(5432, _, _)))
        );
        assert!(old.changes_to(&old).is_empty());
    }
}
