//! One upload, many replicas: a relay chain.
//!
//! The sender offers the job to the first replica and names the others, in order, in
//! the offer's `relay`; each replica verifies and writes every block and forwards it to
//! the next while it writes (see [`crate::transfer::relay`]), with its own identity.
//! Before its own last word a replica reports how the job ended on the replicas after
//! it. A replica that refuses or fails does not sink the rest: whoever sent to it
//! (this sender or a relay) sends the job on to the replicas it did not report,
//! directly. Run again, the same job resumes on each replica what it lacks.
//!
//! The order is the command line's: put hosts that share a rack or a switch next to
//! each other, so each block crosses the slow links as few times as possible.

use super::{Client, Peer, PushOptions};
use crate::net::tcplane::LaneKind;
use crate::proto::session::ProtocolError;
use crate::proto::wire::{code, Hop, Message, Offer, ReplicaOutcome, ReplicaResult, Ship, WireCode};
use crate::transfer::{self, Blocks, Flow, SendReport, TransferError};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One replica of a push: an agent and its import target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// The replica's agent.
    pub peer: Peer,
    /// The import target on it.
    pub target: String,
}

impl Replica {
    fn hop(&self) -> Hop {
        Hop {
            peer: self.peer.to_string(),
            target: self.target.clone(),
        }
    }
}

/// What a push to several replicas did.
#[derive(Debug, Clone, Default)]
pub struct ChainReport {
    /// The job as offered to the first replica (names, roots, sizes).
    pub first: SendReport,
    /// Blocks and bytes this side sent, to all replicas together.
    pub blocks_sent: u64,
    /// Bytes sent (see `blocks_sent`).
    pub bytes_sent: u64,
    /// How the job ended on each replica, in the chain's order.
    pub replicas: Vec<ReplicaResult>,
}

impl ChainReport {
    /// Whether every replica committed (or holds the job, for a `hold` push).
    pub fn all_delivered(&self) -> bool {
        self.replicas.iter().all(|r| r.outcome != ReplicaOutcome::Failed)
    }
}

/// What a ship did: how it ended on each replica, and the agent's last word.
#[derive(Debug, Clone, Default)]
pub struct ShipReport {
    /// How the job ended on each replica, in the chain's order.
    pub replicas: Vec<ReplicaResult>,
    /// The agent's last word: `shipped to N replicas`, or why some replica failed.
    pub report: String,
}

/// How long a replica whose predecessor failed is asked again while it says busy (it
/// may still hold the failed relay's attempt until that connection times out).
const FALLBACK_PATIENCE: Duration = Duration::from_secs(60);

impl Client {
    /// Pushes files and folders to every replica in `chain`, sending each block once:
    /// each replica forwards to the next. Fails only if the files can not be read;
    /// each replica's outcome is in the report.
    pub async fn push_chain(
        &self,
        chain: &[Replica],
        paths: &[PathBuf],
        opts: &PushOptions,
    ) -> Result<ChainReport, TransferError> {
        let first = chain
            .first()
            .ok_or_else(|| TransferError::Stream("no replica to push to".into()))?;
        let paths = paths.to_vec();
        let walk = tokio::task::spawn_blocking(move || crate::store::source::collect_push(&paths));
        let files = walk.await.expect("walk task")?;
        let (offer, files) = self.prepare(&first.target, files, opts).await?;
        let hops: Vec<Hop> = chain.iter().map(Replica::hop).collect();
        let progress = self.tally.done.clone();
        let mut report = self
            .deliver(hops, offer.clone(), Blocks::Files(files), opts, progress)
            .await;
        report.first = SendReport {
            job: offer.job_id(),
            hashes: offer.files.iter().map(|f| (f.path.clone(), f.hashes.root)).collect(),
            files: offer.files.len(),
            bytes_total: offer.total_bytes(),
            ..Default::default()
        };
        Ok(report)
    }

    /// Asks `agent` to send `ship`'s files to its replicas, with its own identity, and
    /// follows it (progress in [`Client::tally`]) until it ends. The ship goes on if
    /// this side goes away; asked for again, it is attached to.
    pub async fn ship(&self, agent: &Peer, ship: Ship) -> Result<ShipReport, TransferError> {
        let conn = self.connect(agent).await?;
        let res = self.follow_ship(&conn, ship).await;
        conn.close(quinn::VarInt::from_u32(0), b"done");
        res
    }

    async fn follow_ship(&self, conn: &quinn::Connection, ship: Ship) -> Result<ShipReport, TransferError> {
        let (mut send, mut recv) = conn.open_bi().await?;
        transfer::write_msg(&mut send, &Message::Ship(ship)).await?;
        let _ = send.finish();
        let mut report = ShipReport::default();
        loop {
            match transfer::expect_msg(&mut recv, "ship progress").await? {
                Message::Progress { done, total } => {
                    self.tally.total.store(total, Ordering::Relaxed);
                    self.tally.done.store(done, Ordering::Relaxed);
                }
                Message::Replicas(r) => report.replicas = r,
                Message::Committed { report: text } => {
                    report.report = text;
                    return Ok(report);
                }
                Message::Failed(r) if !report.replicas.is_empty() => {
                    report.report = r.reason;
                    return Ok(report);
                }
                Message::Failed(r) => return Err(TransferError::Failed(r)),
                Message::Reject(r) => return Err(TransferError::Rejected(r)),
                other => return Err(ProtocolError::new("ship progress", &other).into()),
            }
        }
    }

    /// Delivers `offer` (its target replaced by each hop's) from `blocks` along `hops`,
    /// counting the bytes sent in `progress`. A relay calls this with its tap to forward
    /// what it receives; an agent shipping an export with the export's files.
    pub async fn deliver(
        &self,
        hops: Vec<Hop>,
        offer: Offer,
        blocks: Blocks,
        opts: &PushOptions,
        progress: Arc<AtomicU64>,
    ) -> ChainReport {
        let order: Vec<String> = hops.iter().map(|h| h.peer.clone()).collect();
        let mut pending: VecDeque<Hop> = hops.into();
        let mut report = ChainReport::default();
        while let Some(hop) = pending.pop_front() {
            let mut offer = offer.clone();
            offer.target = hop.target.clone();
            offer.relay = pending.iter().cloned().collect();
            let patient = report.replicas.iter().any(|r| r.outcome == ReplicaOutcome::Failed);
            let sending = (&blocks, &progress);
            let (res, after) = self.send_hop(&hop, &offer, sending, opts, patient).await;
            if let Ok(r) = &res {
                report.blocks_sent += r.blocks_sent;
                report.bytes_sent += r.bytes_sent;
            }
            report.replicas.push(result_of(&hop, &offer, res));
            pending.retain(|h| !after.iter().any(|r| r.peer == h.peer));
            report.replicas.extend(after);
        }
        let at = |r: &ReplicaResult| order.iter().position(|p| *p == r.peer);
        report.replicas.sort_by_key(at);
        report
    }

    /// Sends the job to one hop; a busy answer is tried again for a while when
    /// `patient` (a failed relay's attempt may still hold the job there).
    async fn send_hop(
        &self,
        hop: &Hop,
        offer: &Offer,
        sending: (&Blocks, &Arc<AtomicU64>),
        opts: &PushOptions,
        patient: bool,
    ) -> (Result<SendReport, TransferError>, Vec<ReplicaResult>) {
        let until = Instant::now() + FALLBACK_PATIENCE;
        loop {
            let (res, after) = self.send_once(hop, offer, sending, opts).await;
            let wait = match &res {
                Err(TransferError::Rejected(r)) if patient && r.code == code::BUSY && r.retry_after > 0 => {
                    Duration::from_secs(r.retry_after.min(2) as u64)
                }
                _ => return (res, after),
            };
            if Instant::now() + wait > until {
                return (res, after);
            }
            tracing::info!(peer = %hop.peer, reason = %res.as_ref().err().map(|e| e.to_string()).unwrap_or_default(), "replica busy; trying again");
            tokio::time::sleep(wait).await;
        }
    }

    async fn send_once(
        &self,
        hop: &Hop,
        offer: &Offer,
        (blocks, progress): (&Blocks, &Arc<AtomicU64>),
        opts: &PushOptions,
    ) -> (Result<SendReport, TransferError>, Vec<ReplicaResult>) {
        let peer: Peer = match hop.peer.parse() {
            Ok(p) => p,
            Err(e) => return (Err(TransferError::Stream(e.to_string())), vec![]),
        };
        let mut conns = vec![];
        for _ in 0..opts.connections.clamp(1, super::MAX_CONNECTIONS) {
            match self.connect(&peer).await {
                Ok(c) => conns.push(c),
                Err(e) => return (Err(e), vec![]),
            }
        }
        let (mut send, mut recv) = match conns[0].open_bi().await {
            Ok(s) => s,
            Err(e) => return (Err(e.into()), vec![]),
        };
        let mut flow = Flow::new(Some(progress.clone()), None);
        let mut offer = offer.clone();
        if let (Blocks::Files(_), Some(kind)) = (blocks, lane_to(&peer, opts)) {
            offer.tcp_lane = true;
            flow.lane_tls = self.lane_tls_for(&peer);
            flow.tls_only = kind == LaneKind::Tls;
        }
        let streams = (&mut send, &mut recv);
        let out = transfer::send_relayed(&conns, streams, offer, blocks.clone(), &self.disk, &flow).await;
        for c in &conns {
            super::log_path(c);
            c.close(quinn::VarInt::from_u32(0), b"done");
        }
        out
    }
}

/// The TCP lane to ask `peer` for, if any (see [`PushOptions::hop_lanes`]).
fn lane_to(peer: &Peer, opts: &PushOptions) -> Option<LaneKind> {
    let asked = opts.tcp_lane.then_some(LaneKind::Cleartext);
    opts.hop_lanes.get(&peer.name).copied().or(asked)
}

/// A failure naming every replica that failed, with the first one's code; `None` if
/// every replica has the job.
pub fn replicas_failed(results: &[ReplicaResult]) -> Option<crate::proto::wire::Refusal> {
    let failed: Vec<_> = results.iter().filter(|r| r.outcome == ReplicaOutcome::Failed).collect();
    let first = failed.first()?;
    let names: Vec<_> = failed.iter().map(|r| format!("{}: {}", r.peer, r.text)).collect();
    let why = format!(
        "{} of {} replicas failed: {}",
        failed.len(),
        results.len(),
        names.join("; ")
    );
    Some(crate::proto::wire::Refusal::new(first.code, why))
}

/// One hop's line of the report.
fn result_of(hop: &Hop, offer: &Offer, res: Result<SendReport, TransferError>) -> ReplicaResult {
    let mut r = ReplicaResult {
        peer: hop.peer.clone(),
        target: hop.target.clone(),
        outcome: ReplicaOutcome::Committed,
        job: offer.job_id(),
        code: 0,
        text: String::new(),
        bytes: 0,
    };
    match res {
        Ok(s) => {
            r.outcome = if s.held {
                ReplicaOutcome::Held
            } else {
                ReplicaOutcome::Committed
            };
            r.text = s.report;
            r.bytes = s.bytes_sent;
        }
        Err(e) => {
            r.outcome = ReplicaOutcome::Failed;
            r.code = e.code();
            r.text = crate::proto::wire::cut_reason(e.to_string());
        }
    }
    r
}
