//! Listeners anyone can reach (the TCP lane, metrics): accept errors are backed off
//! and logged rate limited instead of spinning or ending the listener, and the
//! connections waiting to authenticate are bounded in total and per source address.
//!
//! An accept error is mostly the process out of file descriptors (`EMFILE`) or the
//! kernel out of memory; looping straight back burns a core and starves the
//! connections that would free descriptors. The pending bound keeps a flood of
//! connections that never authenticate from taking the descriptors in the first place.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// First sleep after an accept error; doubled on each error in a row.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest sleep after accept errors in a row.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one accept error is logged per this long (the rest are counted).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Accepts from `listener`, sleeping after errors (10 ms, doubling to 1 s, reset by the
/// next success) and logging them at most once per 10 s. Never returns an error.
pub(crate) async fn accept(
    listener: &tokio::net::TcpListener,
    backoff: &mut Backoff,
) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                backoff.reset();
                return accepted;
            }
            Err(e) => tokio::time::sleep(backoff.failed(&e)).await,
        }
    }
}

/// Accept errors in a row, and when one was last logged.
#[derive(Debug)]
pub(crate) struct Backoff {
    what: &'static str,
    delay: Duration,
    logged: Option<Instant>,
    unlogged: u64,
}

impl Backoff {
    /// For the listener named `what` in the log.
    pub(crate) fn new(what: &'static str) -> Backoff {
        Backoff {
            what,
            delay: Duration::ZERO,
            logged: None,
            unlogged: 0,
        }
    }

    /// Records an error; returns how long to sleep before accepting again.
    pub(crate) fn failed(&mut self, e: &std::io::Error) -> Duration {
        self.delay = (self.delay * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        if self.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            tracing::warn!(
                listener = self.what,
                error = %e,
                also = self.unlogged,
                backoff_ms = self.delay.as_millis() as u64,
                "accept failed; backing off"
            );
            self.logged = Some(Instant::now());
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        self.delay
    }

    pub(crate) fn reset(&mut self) {
        self.delay = Duration::ZERO;
    }
}

/// How many connections may wait to authenticate at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLimits {
    /// Connections waiting at once, from all addresses.
    pub total: usize,
    /// Connections waiting at once from one IP address.
    pub per_ip: usize,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Connections waiting to authenticate, counted in total and per source address.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    limits: Arc<Mutex<PendingLimits>>,
    counts: Arc<Mutex<Counts>>,
}

impl Pending {
    pub(crate) fn new(limits: PendingLimits) -> Pending {
        Pending {
            limits: Arc::new(Mutex::new(limits)),
            counts: Arc::default(),
        }
    }

    /// New limits, for connections accepted from now on.
    pub(crate) fn set_limits(&self, limits: PendingLimits) {
        *self.limits.lock().expect("pending limits") = limits;
    }

    /// A place for a connection from `ip`, if neither bound is reached; it is given
    /// back when the slot is dropped. An address the listener expects (`expected`: it
    /// has a job waiting for it) is held to its own bound only, so that a flood from
    /// elsewhere can not lock it out.
    pub(crate) fn enter(&self, ip: IpAddr, expected: bool) -> Option<Slot> {
        let ip = ip.to_canonical();
        let limits = *self.limits.lock().expect("pending limits");
        let mut c = self.counts.lock().expect("pending counts");
        let mine = c.per_ip.get(&ip).copied().unwrap_or(0);
        if (c.total >= limits.total && !expected) || mine >= limits.per_ip {
            return None;
        }
        c.total += 1;
        c.per_ip.insert(ip, mine + 1);
        Some(Slot {
            counts: self.counts.clone(),
            ip,
        })
    }

    /// Connections waiting now.
    #[cfg(test)]
    fn total(&self) -> usize {
        self.counts.lock().expect("pending counts").total
    }
}

/// One connection's place among those waiting; given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("pending counts");
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_is_bounded_in_total_and_per_address() {
        let p = Pending::new(PendingLimits { total: 3, per_ip: 2 });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "::ffff:10.0.0.3".parse().unwrap();
        let a1 = p.enter(a, false).unwrap();
        let _a2 = p.enter(a, false).unwrap();
        assert!(p.enter(a, false).is_none(), "per address");
        let _b1 = p.enter(b, false).unwrap();
        assert!(p.enter(c, false).is_none(), "in total");
        let c1 = p.enter(c, true).expect("an expected address is held to its own bound");
        let c2 = p.enter(c, true).unwrap();
        assert!(p.enter(c, true).is_none(), "but still to its own");
        drop((c1, c2));
        drop(a1);
        assert_eq!(p.total(), 2);
        let _c1 = p.enter(c, false).unwrap();
        let one = Pending::new(PendingLimits { total: 10, per_ip: 1 });
        let _c = one.enter(c, false).unwrap();
        assert!(
            one.enter("10.0.0.3".parse().unwrap(), false).is_none(),
            "mapped and plain are one address"
        );
    }

    #[test]
    fn backoff_grows_to_a_second_and_resets() {
        let mut b = Backoff::new("test");
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let delays: Vec<u64> = (0..9).map(|_| b.failed(&e).as_millis() as u64).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.failed(&e), BACKOFF_MIN);
    }
}
