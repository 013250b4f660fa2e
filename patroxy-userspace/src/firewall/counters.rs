//! The allowlist's counters, read from its pinned maps through handles of their own (like
//! `dataplane::maps`), summed over the CPUs.
use std::path::Path;

use aya::maps::{Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use patroxy_common::xdp::XdpCounters;

use super::{MAP_PORT_COUNTERS, MAP_RULE_COUNTERS};

/// The counters of every rule (by index, `rules` of them) and of every protected port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FirewallCounters {
    pub rules: Vec<XdpCounters>,
    /// Ascending by port.
    pub ports: Vec<(u16, XdpCounters)>,
}

/// Reads the counters of `rules` rules from the pins in `dir` (`firewall::pin_dir`).
pub fn read(dir: &Path, rules: usize) -> Result<FirewallCounters, MapError> {
    let open = |name: &str| -> Result<Map, MapError> {
        Map::from_map_data(MapData::from_pin(dir.join(name))?)
    };
    let per_rule: PerCpuArray<MapData, XdpCounters> =
        PerCpuArray::try_from(open(MAP_RULE_COUNTERS)?)?;
    let per_port: PerCpuHashMap<MapData, u16, XdpCounters> =
        PerCpuHashMap::try_from(open(MAP_PORT_COUNTERS)?)?;
    let rules = (0..rules as u32)
        .map(|i| per_rule.get(&i, 0).map(|v| sum(&v)))
        .collect::<Result<Vec<_>, _>>()?;
    // A port a reload removes during the walk makes `iter` report an error for it: skip it.
    let mut ports: Vec<(u16, XdpCounters)> = per_port
        .iter()
        .flatten()
        .map(|(port, v)| (port, sum(&v)))
        .collect();
    ports.sort_by_key(|(port, _)| *port);
    Ok(FirewallCounters { rules, ports })
}

fn sum(values: &PerCpuValues<XdpCounters>) -> XdpCounters {
    values
        .iter()
        .fold(XdpCounters::default(), |a, c| XdpCounters {
            passed: a.passed + c.passed,
            denied: a.denied + c.denied,
            syn_limited: a.syn_limited + c.syn_limited,
        })
}
