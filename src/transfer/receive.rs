//! The receiving half of a job (an agent's import, a pulling client): runs a
//! [`Receiver`] machine. The job is registered so that its data lanes find it; the
//! lanes ([`super::lane`]) feed the machine the blocks they wrote, and the control task
//! here carries out what it asks: answer, seal, run the hook, remove the staging.

use super::framing::{read_msg, write_msg};
use super::{lane, TransferError, RETRY_SPACE};
use crate::proto::job::ReceiveJob;
use crate::proto::path::RelPath;
use crate::proto::session::{HookEnd, Receiver, RecvAction, RecvEnd, REPLY_GRACE};
use crate::proto::wire::WireCode;
use crate::proto::wire::{code, parse_data_stream_header, BlockHeader, JobId, Offer, Refusal, ReplicaResult};
use crate::store::disk::Disk;
use crate::store::stage::Stage;
use bytes::Bytes;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A job being received, shared by its control task and its data lanes.
pub struct Incoming {
    /// Identity of the sender: only its connections may feed this job.
    pub peer: String,
    /// The protocol state: blocks in, writes under way, what comes next.
    session: Mutex<Receiver>,
    /// Wakes the control task when the machine has something for it to do.
    wake: tokio::sync::Notify,
    /// The job's offer.
    pub offer: Arc<Offer>,
    /// The offer's names, checked.
    pub paths: Vec<RelPath>,
    /// Files the target already holds: not staged, not sealed (see
    /// [`ReceiveJob::already_there`]).
    pub there: Vec<bool>,
    /// The job's staging folder.
    pub stage: Stage,
    /// The disk thread that writes its blocks.
    pub disk: Disk,
    /// When the job was accepted.
    pub started: Instant,
    /// The agent's metrics and rate limits for this job's sender.
    pub meter: Option<crate::metrics::Meter>,
    /// What the job has still to write, promised on its file system.
    pub space: Option<crate::store::space::Reservation>,
    /// Mode of the folders the job brings, if the target sets one.
    pub dir_mode: Option<u32>,
    /// A relay's tap: told of every block written, for the next replica.
    pub tap: Option<Arc<super::relay::Tap>>,
}

impl Incoming {
    /// Runs `f` on the machine, and wakes the control task if that gave it work. The
    /// data path wakes it only then, not once per block: a job of 20,000 small files
    /// would wake it 60,000 times.
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Receiver) -> R) -> R {
        let mut s = self.session.lock().expect("job session");
        let r = f(&mut s);
        if s.has_action() {
            self.wake.notify_one();
        }
        r
    }

    /// Ends this attempt because its sender started the job again (see
    /// `agent::ActiveGuard::take_over`); returns whether it was still running.
    pub fn take_over(&self) -> bool {
        self.with(|s| s.take_over())
    }

    /// Bytes of the blocks not yet verified and written.
    pub fn missing_bytes(&self) -> u64 {
        self.session.lock().expect("job session").job().missing_bytes()
    }
}

/// The jobs being received, by id, so data streams find their job. An agent keeps one
/// table for all connections, so a large job's data may arrive over several connections
/// of the same peer.
pub type JobTable = Arc<Mutex<HashMap<JobId, Arc<Incoming>>>>;

/// Accepts data streams on `conn`, whose peer is `peer`, for as long as it lives.
/// An agent passes its shared stream credit, so a connection gets its share of data
/// streams while it carries data.
pub fn spawn_data_router(
    conn: quinn::Connection,
    table: JobTable,
    peer: String,
    credit: Option<Arc<crate::net::credit::Credit>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let id = conn.stable_id();
        while let Ok(stream) = conn.accept_uni().await {
            let (table, peer, credit) = (table.clone(), peer.clone(), credit.clone());
            tokio::spawn(async move {
                credit.as_ref().inspect(|c| c.stream(id, true));
                if let Err(e) = receive_stream(stream, &table, &peer).await {
                    tracing::debug!(error = %e, "data stream ended with an error");
                }
                credit.as_ref().inspect(|c| c.stream(id, false));
            });
        }
    })
}

/// One QUIC data stream: its job header names the job, then the common lane path.
async fn receive_stream(mut stream: quinn::RecvStream, table: &JobTable, peer: &str) -> Result<(), TransferError> {
    let mut head = [0u8; 17];
    stream.read_exact(&mut head).await.map_err(super::framing::stream_err)?;
    let id = parse_data_stream_header(&head)?;
    let found = table
        .lock()
        .expect("job table")
        .get(&id)
        .filter(|inc| inc.peer == peer)
        .cloned();
    let Some(inc) = found else {
        let _ = stream.stop(quinn::VarInt::from_u32(code::NOT_FOUND as u32));
        return Err(TransferError::Stream(format!("data for unknown job {id}")));
    };
    let result = lane::receive(&mut stream, &inc).await;
    if result.is_err() {
        let _ = stream.stop(quinn::VarInt::from_u32(code::BAD_BLOCK as u32));
    }
    result
}

/// The writes a data lane has under way. The lane goes on reading while its blocks
/// are written, up to [`Writes::LIMIT`] bytes of them, and counts as read to its end only
/// once they are all on disk. Each write reports from the disk thread, so no task is
/// woken per block: for 20,000 small files that was two thread wake-ups each.
pub(crate) struct Writes(Arc<tokio::sync::Semaphore>);

impl Writes {
    /// Bytes in flight per lane, in 4 KiB units: one whole block, or 256 small ones.
    const LIMIT: u32 = (crate::proto::blocks::BLOCK_SIZE / 4096) as u32;

    pub(crate) fn new() -> Writes {
        Writes(Arc::new(tokio::sync::Semaphore::new(Writes::LIMIT as usize)))
    }

    fn units(len: usize) -> u32 {
        (len.div_ceil(4096) as u32).clamp(1, Writes::LIMIT)
    }

    /// Waits until every write started by this lane has ended.
    pub(crate) async fn drain(&self) -> Result<(), TransferError> {
        let all = self.0.acquire_many(Writes::LIMIT).await;
        all.map(drop)
            .map_err(|_| TransferError::Stream("writes dropped".into()))
    }
}

/// Verifies a received block and starts writing it to its staged file; the block is
/// recorded when the write ends (see [`Writes`]).
pub(crate) async fn take_block(
    inc: &Arc<Incoming>,
    head: BlockHeader,
    data: Bytes,
    writes: &Writes,
) -> Result<(), TransferError> {
    let len = data.len();
    if let Some(space) = &inc.space {
        space
            .check(len as u64)
            .map_err(|e| TransferError::Failed(e.refusal()))?;
    }
    if let Some(m) = &inc.meter {
        m.pace(len as u64).await;
    }
    let offset = ReceiveJob::verify(&inc.offer, head.file, head.block, &data).inspect_err(|_| {
        if let Some(m) = &inc.meter {
            m.failed();
        }
    })?;
    if let Some(tap) = &inc.tap {
        tap.keep(head.file, head.block, &data).await;
    }
    let permit = writes.0.clone().acquire_many_owned(Writes::units(len)).await;
    let permit = permit.map_err(|_| TransferError::Stream("writes dropped".into()))?;
    let rel = &inc.paths[head.file as usize];
    let path = inc.stage.file(rel);
    let loc = inc.stage.place(rel).map_err(|source| TransferError::Io {
        path: path.clone(),
        source,
    })?;
    // A failed or aborted job takes no more writes.
    if !inc.with(|s| s.write_started()) {
        return Err(TransferError::Stream("block for a job that already ended".into()));
    }
    let pending = PendingWrite {
        inc: inc.clone(),
        head,
        path: Some(path.clone()),
        _permit: permit,
    };
    let done = Box::new(move |r: std::io::Result<()>| pending.end(r));
    inc.disk
        .write_then(loc, offset, data, done)
        .map_err(|source| TransferError::Io { path, source })
}

/// A block being written; records it (or fails the job) when the write ends, also if
/// the disk thread drops it unanswered.
struct PendingWrite {
    inc: Arc<Incoming>,
    head: BlockHeader,
    path: Option<PathBuf>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl PendingWrite {
    fn end(mut self, r: std::io::Result<()>) {
        let path = self.path.take().expect("ends once");
        self.settle(path, r);
    }

    fn settle(&self, path: PathBuf, r: std::io::Result<()>) {
        let (inc, head) = (&self.inc, self.head);
        match r {
            Ok(()) => {
                if let Some(space) = &inc.space {
                    space.written(head.len as u64);
                }
                inc.with(|s| s.block_written(head.file, head.block, Instant::now()));
                if let Some(tap) = &inc.tap {
                    tap.mark(head.file, head.block);
                }
                if let Some(m) = &inc.meter {
                    m.received(head.len as u64);
                }
            }
            Err(source) => inc.with(|s| s.write_failed(write_failure(path, source))),
        }
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            self.settle(path, Err(std::io::Error::other("disk thread stopped")));
        }
    }
}

/// How a failed block write fails its job: a full file system is named as such (and
/// the job's staging is then removed).
fn write_failure(path: PathBuf, source: std::io::Error) -> Refusal {
    match source.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => Refusal::new(
            code::NO_SPACE,
            format!("the target's file system is full: {}: {source}", path.display()),
        )
        .retry_after(RETRY_SPACE),
        _ => TransferError::Io { path, source }.refusal(),
    }
}

/// Marks one data lane (QUIC or TCP) of a job as read to its end, or the job failed.
pub(crate) fn stream_done(inc: &Incoming, result: &Result<(), TransferError>) {
    match result {
        Ok(()) => inc.with(|s| s.stream_done()),
        Err(e) => inc.with(|s| s.stream_failed(e.refusal())),
    }
}

/// Answers the offer of a job that committed before (sent again after a crash or a
/// lost answer): every block is held, and the commit is confirmed with `report`.
pub async fn confirm_committed(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    job: &ReceiveJob,
    report: String,
) -> Result<(), TransferError> {
    let again = ReceiveJob::new((*job.offer).clone())?;
    let mut m = Receiver::confirm(again, report, Instant::now());
    loop {
        match m.poll_action() {
            Some(RecvAction::Send(msg)) => write_msg(send, &msg).await?,
            Some(RecvAction::Finish(_)) => break,
            Some(_) => {}
            None => match read_msg(recv).await? {
                Some(msg) => m.handle_message(msg),
                None => m.handle_end(),
            },
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(REPLY_GRACE, send.stopped()).await;
    Ok(())
}

/// How a received job ended.
#[derive(Debug)]
pub enum Received {
    /// The import hook committed it; its report.
    Committed(String),
    /// Staged, verified and synced; waiting for a commit or abort (a `hold` offer).
    Held,
    /// The sender aborted it; its staging is removed.
    Aborted,
}

/// Where a receiving job's data arrives and goes.
#[derive(Clone, Copy)]
pub struct ReceiveAt<'a> {
    /// Identity of the sender.
    pub peer: &'a str,
    /// The disk thread that writes the blocks.
    pub disk: &'a Disk,
    /// Routes this connection's QUIC data streams to their job.
    pub table: &'a JobTable,
    /// Metrics and rate limits (the agent), or none (a pulling client).
    pub meter: Option<&'a crate::metrics::Meter>,
    /// The TCP lane, if the job's target allows it to this sender.
    pub tcp: Option<LaneAt<'a>>,
    /// The job's share of its file system's free space (an agent), if counted.
    pub space: Option<&'a crate::store::space::Reservation>,
    /// Give the job up if no block arrives for this long before its commit (an
    /// agent: a sender that stops sending must not hold a job slot for ever).
    pub stall: Option<std::time::Duration>,
    /// Mode of the folders the job brings (an import target's `dir_mode`), if set.
    pub dir_mode: Option<u32>,
    /// The job is relayed to more replicas: the hook runs once they are done.
    pub relay: Option<&'a Relay>,
}

/// The TCP lane a receiving job may grant (see [`crate::net::tcplane`]).
#[derive(Clone, Copy)]
pub struct LaneAt<'a> {
    /// The agent's lane listener.
    pub lanes: &'a crate::net::tcplane::TcpLanes,
    /// The IP address of the QUIC connection the job came on: only lane connections
    /// from there are taken.
    pub ip: std::net::IpAddr,
    /// TLS or clear text, as the target says.
    pub kind: crate::net::tcplane::LaneKind,
}

/// A relay's forwarding of the job it receives (see [`super::relay`]).
pub struct Relay {
    /// Where verified blocks are handed to the forwarding task.
    pub tap: Arc<super::relay::Tap>,
    /// The forwarding task: how the job ended on the replicas after this one.
    pub done: Mutex<Option<tokio::task::JoinHandle<Vec<ReplicaResult>>>>,
}

impl Relay {
    /// How the replicas after this one ended (none if the forwarding task died).
    async fn results(&self) -> Vec<ReplicaResult> {
        let task = self.done.lock().expect("relay").take();
        match task {
            Some(t) => t.await.unwrap_or_default(),
            None => vec![],
        }
    }
}

/// Receives an accepted job: registers it, sends `Accept`, takes data until `Commit`,
/// seals the staged files and runs `hook`. Every failure is reported to the sender
/// as `Failed` before it is returned.
pub async fn receive_job<H, F>(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    job: ReceiveJob,
    stage: Stage,
    at: ReceiveAt<'_>,
    hook: H,
) -> Result<Received, TransferError>
where
    H: FnOnce(Arc<Offer>, Vec<RelPath>) -> F,
    F: std::future::Future<Output = Result<Received, Refusal>>,
{
    let (id, want_tcp) = (job.id, job.offer.tcp_lane);
    let inc = Arc::new(Incoming {
        peer: at.peer.to_string(),
        offer: job.offer.clone(),
        paths: job.paths.clone(),
        there: job.there().to_vec(),
        session: Mutex::new(Receiver::accept(job, None, at.stall, Instant::now())),
        wake: tokio::sync::Notify::new(),
        stage,
        disk: at.disk.clone(),
        started: Instant::now(),
        meter: at.meter.cloned(),
        space: at.space.cloned(),
        dir_mode: at.dir_mode,
        tap: at.relay.map(|r| r.tap.clone()),
    });
    at.table.lock().expect("job table").insert(id, inc.clone());
    let lane = at.tcp.filter(|_| want_tcp);
    let grant = lane.map(|l| l.lanes.grant(inc.clone(), l.ip, at.peer, l.kind));
    if let Some(g) = grant {
        inc.with(|s| s.grant_tcp(g));
    }
    if let (Some(l), Some(m), Some(_)) = (lane, at.meter, grant) {
        m.metrics.lane_granted(l.kind);
    }
    let result = drive(send, recv, &inc, at.relay, hook).await;
    if let (Some(l), Some(g)) = (lane, grant) {
        l.lanes.revoke(&g.token);
    }
    at.table.lock().expect("job table").remove(&id);
    result
}

/// The control task: feeds the machine the sender's messages and the time, and does
/// what it asks until it finishes. One read of the control stream is kept across the
/// loop (quinn reads are not cancel-safe).
async fn drive<H, F>(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    inc: &Arc<Incoming>,
    relay: Option<&Relay>,
    hook: H,
) -> Result<Received, TransferError>
where
    H: FnOnce(Arc<Offer>, Vec<RelPath>) -> F,
    F: std::future::Future<Output = Result<Received, Refusal>>,
{
    let mut hook = Some(hook);
    let control = read_msg(recv);
    tokio::pin!(control);
    let mut reading = true;
    let mut own: Option<TransferError> = None;
    loop {
        let next = inc.with(|s| {
            s.handle_timeout(Instant::now());
            s.poll_action()
        });
        let Some(action) = next else {
            let deadline = inc.session.lock().expect("job session").poll_timeout();
            tokio::select! {
                msg = &mut control, if reading => {
                    reading = false;
                    match msg {
                        Ok(Some(msg)) => inc.with(|s| s.handle_message(msg)),
                        Ok(None) => inc.with(|s| s.handle_end()),
                        Err(e) => lost(inc, &mut own, e),
                    }
                }
                _ = inc.wake.notified() => {}
                _ = sleep_until(deadline) => {}
            }
            continue;
        };
        match action {
            RecvAction::Send(msg) => {
                if let Err(e) = write_msg(send, &msg).await {
                    lost(inc, &mut own, e);
                }
            }
            RecvAction::Seal => seal(inc).await,
            RecvAction::RunHook => {
                if let Some(r) = relay {
                    // The replicas after this one first: the sender hears of them
                    // before this job's own last word.
                    let results = r.results().await;
                    inc.with(|s| s.relayed(results));
                }
                let run = hook.take().expect("the hook runs once");
                let done = run(inc.offer.clone(), inc.paths.clone()).await;
                tracing::debug!(ms = inc.started.elapsed().as_millis() as u64, "hook done");
                inc.with(|s| s.hook_done(hook_end(done)));
            }
            RecvAction::RemoveStaging => inc.stage.remove(),
            RecvAction::Finish(end) => {
                let _ = send.finish();
                if let Some(tap) = &inc.tap {
                    match &end {
                        RecvEnd::Failed(why) => tap.end(why.clone(), false),
                        RecvEnd::Aborted => tap.end(Refusal::new(code::ABORTED, "aborted by the sender"), true),
                        RecvEnd::Committed(_) | RecvEnd::Held => {}
                    }
                }
                return finish(end, own);
            }
        }
    }
}

/// The control stream or connection failed: the job is given up; `e` is the error.
fn lost(inc: &Incoming, own: &mut Option<TransferError>, e: TransferError) {
    if own.is_none() {
        inc.with(|s| s.connection_lost(&e.to_string()));
        *own = Some(e);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Syncs the staged files and tells the machine.
async fn seal(inc: &Incoming) {
    let ms = |t: Instant| t.elapsed().as_millis() as u64;
    tracing::debug!(ms = ms(inc.started), "every block in");
    let sealed = match inc.there.contains(&true) {
        false => inc.stage.seal(&inc.offer, &inc.paths, &inc.disk, inc.dir_mode).await,
        true => {
            let (offer, paths) = staged_only(inc);
            inc.stage.seal(&offer, &paths, &inc.disk, inc.dir_mode).await
        }
    };
    tracing::debug!(ms = ms(inc.started), "staged files synced");
    let sealed = sealed.map_err(|e| e.refusal());
    inc.with(|s| s.sealed(sealed));
}

/// The job's offer and names without the files the target already holds.
fn staged_only(inc: &Incoming) -> (Offer, Vec<RelPath>) {
    let mut offer = (*inc.offer).clone();
    let keep = |i: &usize| !inc.there[*i];
    offer.files = (offer.files.into_iter().enumerate())
        .filter(|(i, _)| keep(i))
        .map(|(_, f)| f)
        .collect();
    let paths = (inc.paths.iter().enumerate())
        .filter(|(i, _)| keep(i))
        .map(|(_, p)| p.clone())
        .collect();
    (offer, paths)
}

fn hook_end(done: Result<Received, Refusal>) -> Result<HookEnd, Refusal> {
    match done? {
        Received::Committed(report) => Ok(HookEnd::Committed(report)),
        Received::Held => Ok(HookEnd::Held),
        Received::Aborted => Err(Refusal::new(code::IO, "a hook can not abort")),
    }
}

fn finish(end: RecvEnd, own: Option<TransferError>) -> Result<Received, TransferError> {
    match end {
        RecvEnd::Committed(report) => Ok(Received::Committed(report)),
        RecvEnd::Held => Ok(Received::Held),
        RecvEnd::Aborted => Ok(Received::Aborted),
        RecvEnd::Failed(r) => Err(own.unwrap_or(TransferError::Failed(r))),
    }
}
