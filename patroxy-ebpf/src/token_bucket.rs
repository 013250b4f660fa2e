//! The token bucket both eBPF objects use (the verdict's log lines, the allowlist's SYNs per
//! source): credit in units of 1/1e9 token, refilled by `rate` tokens per second up to `full`
//! (the burst × 1e9); a token costs 1e9.

pub const NS_PER_SEC: u64 = 1_000_000_000;

/// Refills `credit` for the time since `last_ns`, takes a token if there is one, and says
/// whether it did. After `refill_ns` (`full / rate`: an empty bucket's time to fill) the bucket
/// is full whatever the elapsed time, so below it `elapsed * rate` fits in u64 for the rates and
/// bursts the config accepts.
#[inline(always)]
pub fn take(
    last_ns: &mut u64,
    credit: &mut u64,
    now: u64,
    rate: u64,
    full: u64,
    refill_ns: u64,
) -> bool {
    let elapsed = now.wrapping_sub(*last_ns);
    let refilled = if elapsed >= refill_ns {
        full
    } else {
        let c = *credit + elapsed * rate;
        if c > full { full } else { c }
    };
    *last_ns = now;
    if refilled >= NS_PER_SEC {
        *credit = refilled - NS_PER_SEC;
        true
    } else {
        *credit = refilled;
        false
    }
}
