//! The rate limit of CancelRequests, per client address and in total.
//!
//! A cancel is cheap to send and expensive to take: patroxy opens one connection per server it
//! passes the cancel to, and PostgreSQL forks a process for each. Token buckets (bursts of twice
//! the rate) bound what a flood of cancels, valid or not, costs the servers.
use std::{collections::HashMap, net::IpAddr, sync::Mutex};

use tokio::time::Instant;

/// Client addresses tracked at most; past that, buckets that are full again (their clients
/// quiet for a while) are forgotten, and if none is, new addresses share the total's limit only.
const MAX_CLIENTS: usize = 4096;

/// Which limit refused a cancel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CancelDropped {
    PerClient,
    Total,
}

pub(super) struct CancelLimit {
    per_client: f64,
    total: f64,
    state: Mutex<State>,
}

struct State {
    total: Bucket,
    clients: HashMap<IpAddr, Bucket>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Self {
        Self {
            tokens: 2.0 * rate,
            refilled: now,
        }
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        let added = (now - self.refilled).as_secs_f64() * rate;
        self.tokens = (self.tokens + added).min(2.0 * rate);
        self.refilled = now;
    }
}

impl CancelLimit {
    /// `total` and `per_client` cancels per second.
    pub(super) fn new(total: u32, per_client: u32) -> Self {
        let total = f64::from(total);
        Self {
            per_client: f64::from(per_client),
            total,
            state: Mutex::new(State {
                total: Bucket::full(total, Instant::now()),
                clients: HashMap::new(),
            }),
        }
    }

    /// Takes a token from `client`'s bucket and the total's, or says which was empty. A cancel
    /// refused by the total does not cost its client a token.
    pub(super) fn allow(&self, client: IpAddr) -> Result<(), CancelDropped> {
        let now = Instant::now();
        let mut state = self.state.lock().expect("cancel limit lock");
        if state.clients.len() >= MAX_CLIENTS && !state.clients.contains_key(&client) {
            let rate = self.per_client;
            state.clients.retain(|_, b| {
                b.refill(rate, now);
                b.tokens < 2.0 * rate
            });
        }
        let tracked = state.clients.len() < MAX_CLIENTS || state.clients.contains_key(&client);
        let mut own = tracked.then(|| {
            let mut b = *state
                .clients
                .get(&client)
                .unwrap_or(&Bucket::full(self.per_client, now));
            b.refill(self.per_client, now);
            b
        });
        if own.is_some_and(|b| b.tokens < 1.0) {
            return Err(CancelDropped::PerClient);
        }
        state.total.refill(self.total, now);
        if state.total.tokens < 1.0 {
            return Err(CancelDropped::Total);
        }
        state.total.tokens -= 1.0;
        if let Some(b) = own.as_mut() {
            b.tokens -= 1.0;
            state.clients.insert(client, *b);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::time::Duration;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[tokio::test(start_paused = true)]
    async fn one_client_gets_its_burst_then_its_rate() {
        let limit = CancelLimit::new(1000, 10);
        let passed = (0..100).filter(|_| limit.allow(ip(1)).is_ok()).count();
        assert_eq!(passed, 20, "a burst of twice the rate");
        assert_eq!(limit.allow(ip(1)), Err(CancelDropped::PerClient));
        assert!(
            limit.allow(ip(2)).is_ok(),
            "another client has its own bucket"
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        let passed = (0..100).filter(|_| limit.allow(ip(1)).is_ok()).count();
        assert_eq!(passed, 5, "half a second's worth");
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_caps_many_clients() {
        let limit = CancelLimit::new(10, 10);
        let passed = (0..=255u8).filter(|i| limit.allow(ip(*i)).is_ok()).count();
        assert_eq!(passed, 20);
        assert_eq!(limit.allow(ip(7)), Err(CancelDropped::Total));
        tokio::time::advance(Duration::from_secs(60)).await;
        // Clients refused by the total kept their tokens.
        let passed = (0..40).filter(|_| limit.allow(ip(200)).is_ok()).count();
        assert_eq!(passed, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_client_table_stays_bounded() {
        let limit = CancelLimit::new(u32::MAX / 4, 1);
        for i in 0..(MAX_CLIENTS as u32 + 100) {
            let _ = limit.allow(IpAddr::V4(Ipv4Addr::from(i)));
        }
        assert!(limit.state.lock().unwrap().clients.len() <= MAX_CLIENTS);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(limit.allow(ip(250)).is_ok());
        assert!(
            limit.state.lock().unwrap().clients.len() <= 2,
            "quiet clients forgotten"
        );
    }
}
