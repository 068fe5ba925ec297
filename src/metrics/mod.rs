//! The agent's counters, and a Prometheus text endpoint for them.
//!
//! Counters are prometheus-client atomics bumped where the work happens (a verified
//! block, a hook run, a connection); gauges such as jobs in flight and bytes staged are
//! read from the agent's state when scraped, so they can not drift. prometheus-client
//! writes the text (format 0.0.4), so names, labels and escaping follow its rules; the
//! HTTP side is barge's own, to stay small and bounded. The endpoint is a minimal HTTP/1.1
//! responder on a loopback address (`GET /metrics`), off unless configured: metrics
//! name peers and targets, which is nothing to publish beyond the host.

pub mod ratelimit;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A label set of one label, such as `outcome="committed"`.
type Label<V> = [(&'static str, V); 1];

/// How a job ended, for `barge_jobs_total{outcome=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The job is in its target (a push), or its receiver committed it (a pull).
    Committed,
    /// The job is staged and verified, waiting for a commit or abort.
    Held,
    /// The job failed after it was accepted.
    Failed,
    /// The sender aborted the job.
    Aborted,
    /// The job was refused before any data moved.
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

    fn label(self) -> Label<&'static str> {
        let name = match self {
            Outcome::Committed => "committed",
            Outcome::Held => "held",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
            Outcome::Refused => "refused",
        };
        [("outcome", name)]
    }
}

/// Everything the agent counts. prometheus-client adds `_total` to a counter's name.
#[derive(Debug, Default)]
pub struct Metrics {
    blocks_received: Counter,
    bytes_received: Counter,
    blocks_sent: Counter,
    bytes_sent: Counter,
    blocks_failed: Counter,
    jobs: Family<Label<&'static str>, Counter>,
    hook_runs: Counter,
    hook_failures: Counter,
    hook_seconds: Counter<f64, AtomicU64>,
    after_commit_runs: Counter,
    after_commit_failures: Counter,
    connections: Gauge<u64, AtomicU64>,
    connections_total: Counter,
    lanes_granted: Family<Label<&'static str>, Counter>,
    peer_received: Family<Label<String>, Counter>,
    peer_sent: Family<Label<String>, Counter>,
}

/// Values read from the agent's state at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    /// Jobs being received now.
    pub jobs_receiving: u64,
    /// Jobs staged and waiting for a commit or abort.
    pub jobs_held: u64,
    /// Bytes verified and staged, of jobs not yet committed.
    pub bytes_staged: u64,
    /// The agent is draining for shutdown.
    pub draining: bool,
    /// Seconds until the agent's certificate expires (negative once it has).
    pub agent_cert_expiry: Option<i64>,
    /// Seconds until the CA's certificate expires.
    pub ca_cert_expiry: Option<i64>,
}

impl Metrics {
    /// A block from `peer` verified and written.
    pub fn block_received(&self, peer: &str, bytes: u64) {
        self.blocks_received.inc();
        self.bytes_received.inc_by(bytes);
        self.peer(peer, bytes, 0);
    }

    /// A job's blocks sent to `peer` (a pull).
    pub fn sent(&self, peer: &str, blocks: u64, bytes: u64) {
        self.blocks_sent.inc_by(blocks);
        self.bytes_sent.inc_by(bytes);
        self.peer(peer, 0, bytes);
    }

    /// A receiving job granted its sender a TCP lane of `kind`.
    pub fn lane_granted(&self, kind: crate::net::tcplane::LaneKind) {
        let kind = match kind {
            crate::net::tcplane::LaneKind::Tls => "tls",
            crate::net::tcplane::LaneKind::Cleartext => "cleartext",
        };
        self.lanes_granted.get_or_create(&[("kind", kind)]).inc();
    }

    /// A block that did not verify.
    pub fn block_failed(&self) {
        self.blocks_failed.inc();
    }

    /// A job ended with `outcome`.
    pub fn job(&self, outcome: Outcome) {
        self.jobs.get_or_create(&outcome.label()).inc();
    }

    /// An import hook ran for `took`; `ok` if it succeeded.
    pub fn hook(&self, took: std::time::Duration, ok: bool) {
        self.hook_runs.inc();
        self.hook_failures.inc_by(!ok as u64);
        self.hook_seconds.inc_by(took.as_secs_f64());
    }

    /// An export's `after_commit` command ran after a committed pull.
    pub fn after_commit(&self, ok: bool) {
        self.after_commit_runs.inc();
        self.after_commit_failures.inc_by(!ok as u64);
    }

    /// A QUIC connection was accepted.
    pub(crate) fn connection_opened(&self) {
        self.connections.inc();
        self.connections_total.inc();
    }

    /// A QUIC connection closed.
    pub(crate) fn connection_closed(&self) {
        self.connections.dec();
    }

    /// Connections open now.
    pub fn connections(&self) -> u64 {
        self.connections.get()
    }

    /// Counts bytes with `peer`; a peer once seen shows in both directions, 0 in one.
    fn peer(&self, peer: &str, received: u64, sent: u64) {
        let label = [("peer", peer.to_string())];
        self.peer_received.get_or_create(&label).inc_by(received);
        self.peer_sent.get_or_create(&label).inc_by(sent);
    }

    /// The Prometheus text exposition (version 0.0.4) of every metric.
    pub fn render(&self, g: Gauges) -> String {
        // Every outcome shows, at 0 too, so that a scrape can rate any of them.
        for outcome in Outcome::ALL {
            drop(self.jobs.get_or_create(&outcome.label()));
        }
        let mut r = Registry::with_prefix("barge");
        for (name, help, counter) in [
            ("blocks_received", "Blocks received and verified", &self.blocks_received),
            ("bytes_received", "Bytes received and verified", &self.bytes_received),
            ("blocks_sent", "Blocks sent for pulls", &self.blocks_sent),
            ("bytes_sent", "Bytes sent for pulls", &self.bytes_sent),
            (
                "blocks_failed_verification",
                "Blocks that did not verify",
                &self.blocks_failed,
            ),
            ("hook_runs", "Import hook runs", &self.hook_runs),
            ("hook_failures", "Import hook runs that failed", &self.hook_failures),
        ] {
            r.register(name, help, counter.clone());
        }
        r.register("hook_seconds", "Time spent in import hooks", self.hook_seconds.clone());
        r.register(
            "after_commit_runs",
            "Export after_commit commands run after committed pulls",
            self.after_commit_runs.clone(),
        );
        r.register(
            "after_commit_failures",
            "Export after_commit commands that failed or timed out (the pull stays committed)",
            self.after_commit_failures.clone(),
        );
        r.register("connections", "QUIC connections open", self.connections.clone());
        r.register(
            "connections",
            "QUIC connections accepted",
            self.connections_total.clone(),
        );
        self.register_state(&mut r, g);
        r.register("jobs", "Jobs ended, by outcome", self.jobs.clone());
        r.register(
            "tcp_lane_grants",
            "TCP data lanes granted to senders, by kind (tls or cleartext)",
            self.lanes_granted.clone(),
        );
        r.register(
            "peer_received_bytes",
            "Bytes received from each peer",
            self.peer_received.clone(),
        );
        r.register("peer_sent_bytes", "Bytes sent to each peer", self.peer_sent.clone());
        let mut out = String::new();
        prometheus_text::encode(&mut out, &r).expect("a String takes any text");
        out
    }

    /// The gauges read from the agent's state for this scrape only.
    fn register_state(&self, r: &mut Registry, g: Gauges) {
        let staged = "Bytes verified and staged, not yet committed";
        r.register("bytes_staged", staged, ConstGauge::new(g.bytes_staged));
        let draining = "1 while the agent drains for shutdown";
        r.register("draining", draining, ConstGauge::new(g.draining as u64));
        let jobs = Family::<Label<&'static str>, Gauge<u64, AtomicU64>>::default();
        jobs.get_or_create(&[("state", "receiving")]).set(g.jobs_receiving);
        jobs.get_or_create(&[("state", "held")]).set(g.jobs_held);
        r.register("jobs", "Jobs in progress by state", jobs);
        let expiry = Family::<Label<&'static str>, Gauge<i64, std::sync::atomic::AtomicI64>>::default();
        for (which, secs) in [("agent", g.agent_cert_expiry), ("ca", g.ca_cert_expiry)] {
            if let Some(secs) = secs {
                expiry.get_or_create(&[("which", which)]).set(secs);
            }
        }
        let help = "Seconds until the certificate expires (agent: its own; ca: the CA it trusts)";
        r.register("cert_expiry_seconds", help, expiry);
    }
}

/// Counts and paces the blocks one peer sends into a job (the agent's side of a push).
#[derive(Debug, Clone)]
pub struct Meter {
    /// Where the blocks are counted.
    pub metrics: std::sync::Arc<Metrics>,
    /// The rate limits the blocks wait for.
    pub limits: std::sync::Arc<crate::metrics::ratelimit::RateLimits>,
    /// Identity of the sending peer, for its rate limit and its byte counts.
    pub peer: String,
    /// Also counts verified bytes here (a client's progress bar).
    pub progress: Option<std::sync::Arc<AtomicU64>>,
}

impl Meter {
    /// Waits until the rate limits let `bytes` more through.
    pub async fn pace(&self, bytes: u64) {
        self.limits.acquire(&self.peer, bytes).await;
    }

    /// A block of `bytes` from the peer verified and written.
    pub fn received(&self, bytes: u64) {
        self.metrics.block_received(&self.peer, bytes);
        if let Some(p) = &self.progress {
            p.fetch_add(bytes, Relaxed);
        }
    }

    /// A block from the peer did not verify.
    pub fn failed(&self) {
        self.metrics.block_failed();
    }
}

/// Scrapes served at once; more connections are closed at once.
const MAX_SCRAPES: usize = 16;
/// How long one request may take, read and answer together.
const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// Most bytes of a request read (the request line is all that matters).
const REQUEST_LIMIT: usize = 1024;

/// Serves `GET /metrics` on `listener` with what `render` returns, until dropped.
/// Accept errors are backed off, not fatal; each request gets 1 KiB and 5 s
/// (`REQUEST_LIMIT`, `REQUEST_DEADLINE`), and at most 16 (`MAX_SCRAPES`) are served at
/// once.
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
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        prometheus_text::CONTENT_TYPE,
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
            agent_cert_expiry: Some(259_000),
            ..Default::default()
        });
        for want in [
            "barge_blocks_received_total 2",
            "barge_bytes_received_total 1048581",
            "barge_blocks_failed_verification_total 1",
            "barge_jobs_total{outcome=\"committed\"} 1",
            "barge_jobs_total{outcome=\"failed\"} 0",
            "barge_jobs{state=\"receiving\"} 2",
            "barge_cert_expiry_seconds{which=\"agent\"} 259000",
            "barge_hook_failures_total 1",
            "barge_hook_seconds_total 1.5",
            "barge_connections 1",
            "barge_bytes_staged 77",
            "barge_peer_received_bytes_total{peer=\"store-a\"} 1048581",
            "barge_peer_sent_bytes_total{peer=\"store-b\"} 300",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
    }
}
