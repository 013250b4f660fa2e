//! The planned disruptions: the loopback's flapping Patroni stand-in and the cluster's
//! `patronictl switchover`s. Patroni's own failures (a switchover refused or not finished)
//! are counted, never fatal: the soak judges patroxy.

use std::time::{Duration, Instant};

use patroxy_tests::fake_patroni::FakePatroni;

use super::lab::{ClusterLab, primary_reply};
use super::tally::Disruptions;

/// How long the flapping node stays in one state: a few health checks (fastinter 500 ms,
/// rise 2) each way, so both the mark-down and the recovery happen every cycle.
pub const FLAP_EVERY: Duration = Duration::from_secs(20);
/// The first switchover, then one every [`SWITCHOVER_EVERY`]: the "every 2-3 minutes".
pub const FIRST_SWITCHOVER: Duration = Duration::from_secs(60);
pub const SWITCHOVER_EVERY: Duration = Duration::from_secs(150);
/// No switchover this close to the end: the end checks want a settled cluster.
const QUIET_END: Duration = Duration::from_secs(30);
/// After patroxy routes to the new leader, sessions already failing may still report.
const SETTLE: Duration = Duration::from_secs(5);

/// Flips the node's /primary between 200 and 503 until the deadline; ends up. Returns flips.
pub fn flap(node: &FakePatroni, deadline: Instant) -> u64 {
    let mut flips = 0;
    let mut up = true;
    while sleep_until(Instant::now() + FLAP_EVERY, deadline) {
        up = !up;
        node.set("/primary", primary_reply(up));
        flips += 1;
    }
    node.set("/primary", primary_reply(true));
    flips
}

/// What the switchovers did.
#[derive(Debug, Default)]
pub struct Switchovers {
    pub done: u64,
    /// Patroni's failures, with its words: reported, not judged.
    pub patroni_failures: Vec<String>,
    /// Seconds from `patronictl switchover` until every patroxy routed to the new leader.
    pub routed_after: Vec<f64>,
}

pub fn switchovers(
    lab: &ClusterLab,
    disruptions: &Disruptions,
    started: Instant,
    deadline: Instant,
) -> Switchovers {
    let mut out = Switchovers::default();
    let mut next = started + FIRST_SWITCHOVER;
    while next + QUIET_END < deadline && sleep_until(next, deadline) {
        next += SWITCHOVER_EVERY;
        let Some(leader) = lab.cluster.leader() else {
            out.patroni_failures
                .push("no leader before a switchover".into());
            continue;
        };
        let candidate = (leader + 1) % lab.cluster.nodes.len();
        let window = disruptions.begin();
        let t0 = Instant::now();
        println!(
            "soak: switchover {} -> {}",
            lab.cluster.nodes[leader].name, lab.cluster.nodes[candidate].name
        );
        let result = lab
            .cluster
            .switchover(leader, candidate)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                lab.wait_routed(Duration::from_secs(90))
                    .map_err(|e| format!("{e:#}"))
            });
        match result {
            Ok(_) => {
                out.done += 1;
                out.routed_after.push(t0.elapsed().as_secs_f64());
            }
            Err(e) => {
                eprintln!("soak: switchover: {e}");
                out.patroni_failures.push(e);
            }
        }
        std::thread::sleep(SETTLE);
        disruptions.end(window);
    }
    out
}

/// Sleeps until `until`; false (at once) if the deadline comes first.
fn sleep_until(until: Instant, deadline: Instant) -> bool {
    if until >= deadline {
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        return false;
    }
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    true
}
