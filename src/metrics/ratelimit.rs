//! Rate limits: token buckets for the agent's data, one for all peers and one per peer.
//!
//! A bucket holds up to `burst` bytes and refills at `rate` bytes per second. Taking
//! more than it holds is allowed and leaves it in debt; the caller waits until the
//! debt is paid. So a stream of blocks is paced to exactly `rate` over time, however
//! large the blocks, and the wait is computed from the clock passed in, which makes
//! the arithmetic testable without sleeping. The agent throttles the data it receives
//! (QUIC flow control then slows the sender) and the data it sends for pulls.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` bytes refilling at `rate` bytes per second.
    pub fn new(rate: u64, burst: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: rate.max(1) as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    /// Takes `n` bytes at `now`; returns how long to wait before using them.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - n as f64;
        match self.tokens < 0.0 {
            true => Duration::from_secs_f64(-self.tokens / self.rate),
            false => Duration::ZERO,
        }
    }

    /// Changes the rate and burst, keeping the current fill (capped at the new burst).
    pub fn set(&mut self, rate: u64, burst: u64) {
        self.rate = rate.max(1) as f64;
        self.burst = burst.max(1) as f64;
        self.tokens = self.tokens.min(self.burst);
    }
}

/// Rates in bytes per second; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates {
    /// Over all peers together (`limits.rate_mbit`).
    pub global: Option<u64>,
    /// For each peer identity (`limits.peer_rate_mbit`).
    pub per_peer: Option<u64>,
}

/// Burst of a bucket: a quarter second of its rate, at least 2 MiB (two blocks).
fn burst(rate: u64) -> u64 {
    (rate / 4).max(2 << 20)
}

/// The agent's limits, adjustable while it runs (on reload).
#[derive(Debug, Default)]
pub struct RateLimits {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    rates: Rates,
    global: Option<TokenBucket>,
    peers: HashMap<String, TokenBucket>,
}

impl RateLimits {
    /// Limits at `rates`, with full buckets.
    pub fn new(rates: Rates) -> RateLimits {
        let limits = RateLimits::default();
        limits.set(rates);
        limits
    }

    /// Applies new rates; buckets keep their fill.
    pub fn set(&self, rates: Rates) {
        let mut i = self.inner.lock().expect("rate limits");
        let now = Instant::now();
        i.global = rates.global.map(|r| match i.global.take() {
            Some(mut b) => {
                b.set(r, burst(r));
                b
            }
            None => TokenBucket::new(r, burst(r), now),
        });
        match rates.per_peer {
            None => i.peers.clear(),
            Some(r) => i.peers.values_mut().for_each(|b| b.set(r, burst(r))),
        }
        i.rates = rates;
    }

    /// How long `peer` must wait before moving `n` more bytes at `now`.
    pub fn delay(&self, peer: &str, n: u64, now: Instant) -> Duration {
        let mut i = self.inner.lock().expect("rate limits");
        let global = i.global.as_mut().map_or(Duration::ZERO, |b| b.take(n, now));
        let per_peer = match i.rates.per_peer {
            None => Duration::ZERO,
            Some(r) => i
                .peers
                .entry(peer.to_string())
                .or_insert_with(|| TokenBucket::new(r, burst(r), now))
                .take(n, now),
        };
        global.max(per_peer)
    }

    /// Waits until `peer` may move `n` more bytes.
    pub async fn acquire(&self, peer: &str, n: u64) {
        let wait = self.delay(peer, n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_bucket_paces_exactly_to_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 500, t0);
        assert_eq!(b.take(500, t0), Duration::ZERO, "the burst is free");
        assert_eq!(b.take(250, t0), 250 * MS, "then debt: 250 bytes at 1000/s");
        assert_eq!(b.take(250, t0), 500 * MS, "debt adds up");
        // 500 ms later the debt is paid; nothing is owed or saved up.
        assert_eq!(b.take(0, t0 + 500 * MS), Duration::ZERO);
        assert_eq!(b.take(100, t0 + 500 * MS), 100 * MS);
        // A long idle time refills only up to the burst.
        assert_eq!(b.take(500, t0 + 60_000 * MS), Duration::ZERO);
        assert_eq!(b.take(1, t0 + 60_000 * MS), MS);
    }

    #[test]
    fn many_takes_over_time_average_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1 << 20, 1 << 20, t0);
        // 100 blocks of 1 MiB, each sent when the bucket says: 99 s after the first.
        let mut now = t0;
        for _ in 0..100 {
            now += b.take(1 << 20, now);
        }
        assert_eq!(now - t0, Duration::from_secs(99));
    }

    #[test]
    fn the_slower_of_global_and_per_peer_wins_and_reload_changes_rates() {
        let limits = RateLimits::new(Rates {
            global: Some(8 << 20),
            per_peer: Some(4 << 20),
        });
        let now = Instant::now();
        // Bursts: global 2 MiB, per peer 2 MiB.
        assert_eq!(limits.delay("a", 2 << 20, now), Duration::ZERO);
        // 1 MiB more: global owes 1/8 s, peer a owes 1/4 s.
        assert_eq!(limits.delay("a", 1 << 20, now), Duration::from_millis(250));
        // Peer b has its own bucket; only the global debt (2 MiB at 8 MiB/s) applies.
        assert_eq!(limits.delay("b", 1 << 20, now), Duration::from_millis(250));
        limits.set(Rates::default());
        assert_eq!(
            limits.delay("a", 100 << 20, now),
            Duration::ZERO,
            "unlimited after reload"
        );
    }
}
