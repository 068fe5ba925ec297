//! The gate in front of every request: what an identity may open, and how much of
//! the agent it may take before and after it is authorized.
//!
//! A TLS certificate signed by the CA only proves a name. An identity on no allow list
//! has its connection closed with one refusal. A request's first message is read
//! against a deadline and, unless it is an offer into a target the peer may write to,
//! a small size limit: the agent allocates for what it authorized, never for what a
//! length prefix claims. Connections, requests, jobs and large reads are counted per
//! identity, so one identity can not take every slot from the others.

use crate::proto::wire::{code, Message, Refusal, WireError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::time::timeout_at;

/// The largest first message read before anything is authorized.
pub const SMALL_MESSAGE: usize = 64 << 10;
/// A request's first message must arrive within this.
pub const FIRST_MESSAGE_WAIT: Duration = Duration::from_secs(10);
/// An authorized large offer (thousands of files) must arrive within this.
pub const LARGE_MESSAGE_WAIT: Duration = Duration::from_secs(60);
/// Bytes of large offers one identity may have being read at once.
pub const LARGE_BUDGET: u64 = 128 << 20;

/// What is counted per identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connections = 0,
    Requests = 1,
    Jobs = 2,
    /// Bytes of large first messages being read.
    Reading = 3,
}

/// What each identity holds now.
#[derive(Default)]
pub struct Peers(Mutex<HashMap<String, [u64; 4]>>);

impl Peers {
    /// Takes `amount` of `kind` for `peer` if that keeps it at or under `max`; else
    /// returns what it holds now.
    pub fn take(self: &Arc<Self>, peer: &str, kind: Kind, amount: u64, max: u64) -> Result<Taken, u64> {
        let mut all = self.0.lock().expect("peers");
        let usage = all.entry(peer.to_string()).or_default();
        let now = usage[kind as usize];
        if now.saturating_add(amount) > max {
            if usage.iter().all(|n| *n == 0) {
                all.remove(peer);
            }
            return Err(now);
        }
        usage[kind as usize] += amount;
        Ok(Taken {
            peers: self.clone(),
            peer: peer.to_string(),
            kind,
            amount,
        })
    }

    /// What `peer` holds of `kind` now.
    pub fn holds(&self, peer: &str, kind: Kind) -> u64 {
        let all = self.0.lock().expect("peers");
        all.get(peer).map_or(0, |u| u[kind as usize])
    }
}

/// A share of one identity's limit, given back on drop.
pub struct Taken {
    peers: Arc<Peers>,
    peer: String,
    kind: Kind,
    amount: u64,
}

impl Drop for Taken {
    fn drop(&mut self) {
        let mut all = self.peers.0.lock().expect("peers");
        if let Some(usage) = all.get_mut(&self.peer) {
            usage[self.kind as usize] -= self.amount;
            if usage.iter().all(|n| *n == 0) {
                all.remove(&self.peer);
            }
        }
    }
}

fn bad(reason: impl Into<String>) -> Refusal {
    Refusal::new(code::BAD_MESSAGE, reason)
}

/// Reads a request's first message. A body over [`SMALL_MESSAGE`] must be an offer,
/// and `authorize` (given the target it names and its size) must agree before the rest is read;
/// what it returns is held until the message is decoded.
pub async fn read_request<A>(recv: &mut quinn::RecvStream, authorize: A) -> Result<Message, Refusal>
where
    A: FnOnce(&str, u64) -> Result<Taken, Refusal>,
{
    let start = Instant::now();
    let mut deadline = tokio::time::Instant::from_std(start + FIRST_MESSAGE_WAIT);
    let late = || bad(format!("no request within {}s", FIRST_MESSAGE_WAIT.as_secs()));
    let mut len = [0u8; 4];
    timeout_at(deadline, read_exact(recv, &mut len))
        .await
        .map_err(|_| late())??;
    let n = Message::check_frame_len(u32::from_be_bytes(len)).map_err(|e| bad(e.to_string()))?;
    let large = n > SMALL_MESSAGE;
    let mut body = vec![0u8; if large { Message::PEEK_LEN } else { 0 }];
    let mut _taken = None;
    if large {
        timeout_at(deadline, read_exact(recv, &mut body))
            .await
            .map_err(|_| late())??;
        let target = Message::peek_offer_target(&body).map_err(|e| bad(e.to_string()))?;
        let Some(target) = target else {
            return Err(Refusal::new(
                code::LIMIT,
                format!("a request of {n} bytes: only an offer may be larger than {SMALL_MESSAGE}"),
            ));
        };
        _taken = Some(authorize(&target, n as u64)?);
        deadline = tokio::time::Instant::from_std(start + LARGE_MESSAGE_WAIT);
    }
    let have = body.len();
    body.resize(n, 0);
    let wait = if large { LARGE_MESSAGE_WAIT } else { FIRST_MESSAGE_WAIT };
    let rest = read_exact(recv, &mut body[have..]);
    timeout_at(deadline, rest).await.map_err(|_| {
        bad(format!(
            "the request's {n} bytes did not arrive within {}s",
            wait.as_secs()
        ))
    })??;
    Message::decode(&body).map_err(|e| bad(e.to_string()))
}

async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), Refusal> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => bad(WireError::Truncated.to_string()),
        quinn::ReadExactError::ReadError(e) => bad(e.to_string()),
    })
}

/// Resolves once `counter` has not moved for `limit`: a peer that stopped taking or
/// sending data.
pub async fn quiet_for(counter: Arc<std::sync::atomic::AtomicU64>, limit: Duration) {
    let read = || counter.load(std::sync::atomic::Ordering::Relaxed);
    let (mut last, mut since) = (read(), Instant::now());
    loop {
        tokio::time::sleep((limit / 4).max(Duration::from_millis(50))).await;
        let now = read();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= limit {
            return;
        }
    }
}

/// Lets through at most `per_window` log lines per `window`, and counts the rest, so
/// a flood of refusals can not flood the log.
pub struct LogLimit {
    per_window: u32,
    window: Duration,
    state: Mutex<(Instant, u32, u64)>,
}

impl LogLimit {
    pub fn new(per_window: u32, window: Duration) -> LogLimit {
        LogLimit {
            per_window,
            window,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(n)` if this line may be logged, `n` lines having been held back since the
    /// last one that was; `None` if it is to be held back.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().expect("log limit");
        if s.0.elapsed() >= self.window {
            s.0 = Instant::now();
            s.1 = 0;
        }
        if s.1 >= self.per_window {
            s.2 += 1;
            return None;
        }
        s.1 += 1;
        Some(std::mem::take(&mut s.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_takes_up_to_its_limit_and_gives_back_on_drop() {
        let peers = Arc::new(Peers::default());
        let a = peers.take("a", Kind::Jobs, 1, 2).unwrap();
        let _b = peers.take("a", Kind::Jobs, 1, 2).unwrap();
        assert_eq!(peers.take("a", Kind::Jobs, 1, 2).err(), Some(2));
        assert!(peers.take("other", Kind::Jobs, 1, 2).is_ok(), "others keep their share");
        assert!(
            peers.take("a", Kind::Connections, 1, 2).is_ok(),
            "kinds are counted apart"
        );
        drop(a);
        assert_eq!(peers.holds("a", Kind::Jobs), 1);
        assert!(peers.take("a", Kind::Reading, 10, 5).is_err());
    }

    #[test]
    fn usage_is_forgotten_once_all_is_given_back() {
        let peers = Arc::new(Peers::default());
        drop(peers.take("a", Kind::Requests, 1, 1).unwrap());
        let _ = peers.take("b", Kind::Requests, 9, 1);
        assert!(peers.0.lock().unwrap().is_empty());
    }

    #[test]
    fn log_lines_are_held_back_past_the_limit_and_counted() {
        let limit = LogLimit::new(2, Duration::from_millis(100));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(limit.allow(), Some(2), "the next line says how many were held back");
        assert_eq!(limit.allow(), Some(0));
    }
}
