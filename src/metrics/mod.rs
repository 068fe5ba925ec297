//! The agent's counters, and a Prometheus text endpoint for them.
//!
//! Counters are plain atomics bumped where the work happens (a verified block, a hook
//! run, a connection); gauges such as jobs in flight and bytes staged are read from the
//! agent's state when scraped, so they can not drift. The endpoint is a minimal HTTP/1.1
//! responder on a loopback address (`GET /metrics`), off unless configured: metrics
//! name peers and targets, which is nothing to publish beyond the host.

pub mod ratelimit;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes moved with one peer.
#[derive(Debug, Default, Clone, Copy)]
struct PeerBytes {
    received: u64,
    sent: u64,
}

/// How a job ended, for `barge_jobs_total{outcome=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Held,
    Failed,
    Aborted,
    Refused,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Committed,
        Outcome::Held,
        Outcome::Failed,
        Outcome::Aborted,
        Outcome::Refused,
    ];

    fn name(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Held => "held",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
            Outcome::Refused => "refused",
        }
    }
}

/// Everything the agent counts.
#[derive(Debug, Default)]
pub struct Metrics {
    blocks_received: AtomicU64,
    bytes_received: AtomicU64,
    blocks_sent: AtomicU64,
    bytes_sent: AtomicU64,
    blocks_failed: AtomicU64,
    jobs: [AtomicU64; 5],
    hook_runs: AtomicU64,
    hook_failures: AtomicU64,
    hook_micros: AtomicU64,
    after_commit_runs: AtomicU64,
    after_commit_failures: AtomicU64,
    connections: AtomicU64,
    connections_total: AtomicU64,
    peers: Mutex<BTreeMap<String, PeerBytes>>,
}

/// Values read from the agent's state at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    pub jobs_receiving: u64,
    pub jobs_held: u64,
    /// Bytes verified and staged, of jobs not yet committed.
    pub bytes_staged: u64,
    pub draining: bool,
}

impl Metrics {
    /// A block from `peer` verified and written.
    pub fn block_received(&self, peer: &str, bytes: u64) {
        self.blocks_received.fetch_add(1, Relaxed);
        self.bytes_received.fetch_add(bytes, Relaxed);
        self.peer(peer, |p| p.received += bytes);
    }

    /// A job's blocks sent to `peer` (a pull).
    pub fn sent(&self, peer: &str, blocks: u64, bytes: u64) {
        self.blocks_sent.fetch_add(blocks, Relaxed);
        self.bytes_sent.fetch_add(bytes, Relaxed);
        self.peer(peer, |p| p.sent += bytes);
    }

    /// A block that did not verify.
    pub fn block_failed(&self) {
        self.blocks_failed.fetch_add(1, Relaxed);
    }

    pub fn job(&self, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).expect("listed");
        self.jobs[i].fetch_add(1, Relaxed);
    }

    pub fn hook(&self, took: std::time::Duration, ok: bool) {
        self.hook_runs.fetch_add(1, Relaxed);
        self.hook_failures.fetch_add(!ok as u64, Relaxed);
        self.hook_micros.fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// An export's `after_commit` command ran after a committed pull.
    pub fn after_commit(&self, ok: bool) {
        self.after_commit_runs.fetch_add(1, Relaxed);
        self.after_commit_failures.fetch_add(!ok as u64, Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    /// Connections open now.
    pub fn connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }

    fn peer(&self, peer: &str, f: impl FnOnce(&mut PeerBytes)) {
        let mut peers = self.peers.lock().expect("peer metrics");
        match peers.get_mut(peer) {
            Some(p) => f(p),
            None => f(peers.entry(peer.to_string()).or_default()),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        let c = |a: &AtomicU64| a.load(Relaxed).to_string();
        one(
            "barge_blocks_received_total",
            "counter",
            "Blocks received and verified.",
            c(&self.blocks_received),
        );
        one(
            "barge_bytes_received_total",
            "counter",
            "Bytes received and verified.",
            c(&self.bytes_received),
        );
        one(
            "barge_blocks_sent_total",
            "counter",
            "Blocks sent for pulls.",
            c(&self.blocks_sent),
        );
        one(
            "barge_bytes_sent_total",
            "counter",
            "Bytes sent for pulls.",
            c(&self.bytes_sent),
        );
        one(
            "barge_blocks_failed_verification_total",
            "counter",
            "Blocks that did not verify.",
            c(&self.blocks_failed),
        );
        one(
            "barge_hook_runs_total",
            "counter",
            "Import hook runs.",
            c(&self.hook_runs),
        );
        one(
            "barge_hook_failures_total",
            "counter",
            "Import hook runs that failed.",
            c(&self.hook_failures),
        );
        let secs = self.hook_micros.load(Relaxed) as f64 / 1e6;
        one(
            "barge_hook_seconds_total",
            "counter",
            "Time spent in import hooks.",
            format!("{secs:.6}"),
        );
        one(
            "barge_after_commit_runs_total",
            "counter",
            "Export after_commit commands run after committed pulls.",
            c(&self.after_commit_runs),
        );
        one(
            "barge_after_commit_failures_total",
            "counter",
            "Export after_commit commands that failed or timed out (the pull stays committed).",
            c(&self.after_commit_failures),
        );
        one(
            "barge_connections",
            "gauge",
            "QUIC connections open.",
            c(&self.connections),
        );
        one(
            "barge_connections_total",
            "counter",
            "QUIC connections accepted.",
            c(&self.connections_total),
        );
        one(
            "barge_bytes_staged",
            "gauge",
            "Bytes verified and staged, not yet committed.",
            g.bytes_staged.to_string(),
        );
        one(
            "barge_draining",
            "gauge",
            "1 while the agent drains for shutdown.",
            (g.draining as u8).to_string(),
        );
        self.render_jobs(&mut out, g);
        self.render_peers(&mut out);
        out
    }

    fn render_jobs(&self, out: &mut String, g: Gauges) {
        let _ = writeln!(
            out,
            "# HELP barge_jobs Jobs in progress by state.\n# TYPE barge_jobs gauge"
        );
        let _ = writeln!(out, "barge_jobs{{state=\"receiving\"}} {}", g.jobs_receiving);
        let _ = writeln!(out, "barge_jobs{{state=\"held\"}} {}", g.jobs_held);
        let _ = writeln!(
            out,
            "# HELP barge_jobs_total Jobs ended, by outcome.\n# TYPE barge_jobs_total counter"
        );
        for (o, n) in Outcome::ALL.iter().zip(&self.jobs) {
            let _ = writeln!(out, "barge_jobs_total{{outcome=\"{}\"}} {}", o.name(), n.load(Relaxed));
        }
    }

    fn render_peers(&self, out: &mut String) {
        let peers = self.peers.lock().expect("peer metrics").clone();
        for (dir, help) in [
            ("received", "Bytes received from each peer."),
            ("sent", "Bytes sent to each peer."),
        ] {
            let _ = writeln!(
                out,
                "# HELP barge_peer_{dir}_bytes_total {help}\n# TYPE barge_peer_{dir}_bytes_total counter"
            );
            for (peer, b) in &peers {
                let v = if dir == "received" { b.received } else { b.sent };
                let _ = writeln!(out, "barge_peer_{dir}_bytes_total{{peer=\"{}\"}} {v}", escape(peer));
            }
        }
    }
}

/// Counts and paces the blocks one peer sends into a job (the agent's side of a push).
#[derive(Debug, Clone)]
pub struct Meter {
    pub metrics: std::sync::Arc<Metrics>,
    pub limits: std::sync::Arc<crate::metrics::ratelimit::RateLimits>,
    pub peer: String,
    /// Also counts verified bytes here (a client's progress bar).
    pub progress: Option<std::sync::Arc<AtomicU64>>,
}

impl Meter {
    /// Waits until the rate limits let `bytes` more through.
    pub async fn pace(&self, bytes: u64) {
        self.limits.acquire(&self.peer, bytes).await;
    }

    pub fn received(&self, bytes: u64) {
        self.metrics.block_received(&self.peer, bytes);
        if let Some(p) = &self.progress {
            p.fetch_add(bytes, Relaxed);
        }
    }

    pub fn failed(&self) {
        self.metrics.block_failed();
    }
}

/// Escapes a label value (peer identities are DNS names, but be safe).
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Scrapes served at once; more connections are closed at once.
const MAX_SCRAPES: usize = 16;
/// How long one request may take, read and answer together.
const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// Most bytes of a request read (the request line is all that matters).
const REQUEST_LIMIT: usize = 1024;

/// Serves `GET /metrics` on `listener` with what `render` returns, until dropped.
/// Accept errors are backed off, not fatal; each request gets [`REQUEST_LIMIT`] bytes
/// and [`REQUEST_DEADLINE`], and at most [`MAX_SCRAPES`] are served at once.
pub async fn serve(listener: tokio::net::TcpListener, render: impl Fn() -> String + Send + Sync + 'static) {
    let render = std::sync::Arc::new(render);
    let pending = crate::net::listen::Pending::new(crate::net::listen::PendingLimits {
        total: MAX_SCRAPES,
        per_ip: MAX_SCRAPES,
    });
    let mut backoff = crate::net::listen::Backoff::new("metrics");
    loop {
        let (sock, peer) = crate::net::listen::accept(&listener, &mut backoff).await;
        let Some(slot) = pending.enter(peer.ip(), false) else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_DEADLINE, answer(sock, &*render)).await;
            drop(slot);
        });
    }
}

/// Reads the request line (up to [`REQUEST_LIMIT`] bytes) and answers it.
async fn answer(mut sock: tokio::net::TcpStream, render: &(dyn Fn() -> String + Send + Sync)) {
    let mut req = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !req.contains(&b'\n') && req.len() < REQUEST_LIMIT {
        let want = chunk.len().min(REQUEST_LIMIT - req.len());
        match sock.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&req);
    let (status, body) = match line.starts_with("GET /metrics ") {
        true => ("200 OK", render()),
        false => ("404 Not Found", "try GET /metrics\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = sock.write_all(head.as_bytes()).await;
    let _ = sock.write_all(body.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_counters_gauges_and_peers() {
        let m = Metrics::default();
        m.block_received("store-a", 1 << 20);
        m.block_received("store-a", 5);
        m.sent("store-b", 3, 300);
        m.block_failed();
        m.job(Outcome::Committed);
        m.hook(std::time::Duration::from_millis(1500), false);
        m.connection_opened();
        let text = m.render(Gauges {
            jobs_receiving: 2,
            bytes_staged: 77,
            ..Default::default()
        });
        for want in [
            "barge_blocks_received_total 2",
            "barge_bytes_received_total 1048581",
            "barge_blocks_failed_verification_total 1",
            "barge_jobs_total{outcome=\"committed\"} 1",
            "barge_jobs_total{outcome=\"failed\"} 0",
            "barge_jobs{state=\"receiving\"} 2",
            "barge_hook_failures_total 1",
            "barge_hook_seconds_total 1.500000",
            "barge_connections 1",
            "barge_bytes_staged 77",
            "barge_peer_received_bytes_total{peer=\"store-a\"} 1048581",
            "barge_peer_sent_bytes_total{peer=\"store-b\"} 300",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
    }
}
