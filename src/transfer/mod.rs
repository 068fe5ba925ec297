//! Drives the protocol core over quinn and io_uring: the sending and receiving halves
//! of a job, shared by the agent and the client (a push sends from the client, a pull
//! sends from the agent).
//!
//! A job is one bidirectional control stream (offer, accept, commit, committed) and a
//! few unidirectional data streams, each a job header followed by blocks. Every block
//! is verified before it is written; the receiver commits only after the sender said
//! how many data streams it used and all of them were read to the end.

use crate::proto::job::{JobError, ReceiveJob, SendPlan};
use crate::proto::limits::MAX_STREAMS;
use crate::proto::wire::{
    code, data_stream_header, parse_data_stream_header, BlockHeader, JobId, Message, Offer, Refusal, WireError,
};
use crate::store::disk::Disk;
use crate::store::hashcache::FileStamp;
use crate::store::source::{SourceError, SourceFile};
use crate::store::stage::{Stage, StageError};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

/// Why a transfer failed, on either side.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("cannot connect to {peer}: {reason}")]
    Connect { peer: String, reason: String },
    #[error(transparent)]
    Tls(#[from] crate::net::tls::TlsError),
    #[error("connection lost: {0}")]
    Connection(quinn::ConnectionError),
    #[error("connection lost after the job was accepted: {0}; sending the job again resumes it")]
    Lost(quinn::ConnectionError),
    #[error("stream: {0}")]
    Stream(String),
    #[error("bad message from peer: {0}")]
    Wire(#[from] WireError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("refused by peer: {0}")]
    Rejected(Refusal),
    #[error("job failed at peer: {0}")]
    Failed(Refusal),
    #[error("{0}")]
    Job(#[from] JobError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}: changed while it was sent; the job was aborted")]
    SourceChanged(PathBuf),
    #[error("interrupted on purpose after {0} blocks (fault injection)")]
    Interrupted(u64),
}

/// A connection the peer closed with one of our refusal codes (an agent refusing an
/// identity or a connection over a limit) is a refusal; any other end is a lost
/// connection.
impl From<quinn::ConnectionError> for TransferError {
    fn from(c: quinn::ConnectionError) -> TransferError {
        if let quinn::ConnectionError::ApplicationClosed(close) = &c {
            let n = close.error_code.into_inner();
            if n == code::NOT_ALLOWED as u64 || n == code::BUSY as u64 {
                let reason = String::from_utf8_lossy(&close.reason).into_owned();
                let r = Refusal::new(n as u16, reason);
                let retry = if n == code::BUSY as u64 { RETRY_BUSY } else { 0 };
                return TransferError::Rejected(r.retry_after(retry));
            }
        }
        TransferError::Connection(c)
    }
}

fn stream_err(e: impl std::fmt::Display) -> TransferError {
    TransferError::Stream(e.to_string())
}

/// Reads one control message; `Ok(None)` if the stream ended cleanly first.
pub async fn read_msg(recv: &mut quinn::RecvStream) -> Result<Option<Message>, TransferError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated.into()),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(e)),
    }
    let n = Message::check_frame_len(u32::from_be_bytes(len))?;
    let mut body = vec![0u8; n];
    recv.read_exact(&mut body).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => TransferError::Wire(WireError::Truncated),
        quinn::ReadExactError::ReadError(e) => read_error(e),
    })?;
    Ok(Some(Message::decode(&body)?))
}

fn read_error(e: quinn::ReadError) -> TransferError {
    match e {
        quinn::ReadError::ConnectionLost(c) => c.into(),
        other => stream_err(other),
    }
}

/// Reads a control message that must be there.
pub async fn expect_msg(recv: &mut quinn::RecvStream) -> Result<Message, TransferError> {
    read_msg(recv)
        .await?
        .ok_or_else(|| TransferError::Protocol("control stream ended early".into()))
}

pub async fn write_msg(send: &mut quinn::SendStream, msg: &Message) -> Result<(), TransferError> {
    send.write_all(&msg.encode()).await.map_err(write_error)
}

/// A failed write: a lost connection is named as such (see [`after_accept`]).
fn write_error(e: quinn::WriteError) -> TransferError {
    match e {
        quinn::WriteError::ConnectionLost(c) => c.into(),
        other => stream_err(other),
    }
}

/// Test-only fault injection on the sending side.
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct Fault {
    /// Send only this many blocks, then ask to commit anyway.
    pub stop_after_blocks: Option<u64>,
    /// Send only this many blocks, wait until the receiver has them, then close the
    /// connection without committing.
    pub drop_after_blocks: Option<u64>,
    /// Flip a bit in this (file, block) on the wire.
    pub corrupt: Option<(u32, u32)>,
    /// Append a byte to the first source file just before a QUIC lane reads its first
    /// block.
    pub change_source: bool,
    /// Not a fault: bytes sent so far on QUIC lanes are added here (progress bars).
    pub progress: Option<Arc<AtomicU64>>,
    /// Not a fault: the agent's rate limits for the peer it sends to (pulls).
    pub pace: Option<crate::agent::metrics::Meter>,
}

impl Fault {
    fn limit(&self) -> Option<u64> {
        self.stop_after_blocks.or(self.drop_after_blocks)
    }
}

/// What a sender did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    /// The job's id (what `commit` and `abort` take for a held job).
    pub job: JobId,
    /// Each file's name and blake3 root.
    pub hashes: Vec<(String, crate::proto::blocks::Digest)>,
    pub files: usize,
    pub bytes_total: u64,
    pub blocks_sent: u64,
    pub bytes_sent: u64,
    pub blocks_held: u64,
    pub streams: usize,
    /// Whether the data went over the TCP lane (asked for and granted).
    pub tcp_lane: bool,
    /// The job is staged and held on the receiver, waiting for commit or abort.
    pub held: bool,
    /// QUIC connections the data streams were spread over.
    pub connections: usize,
    /// The receiver's import hook report.
    pub report: String,
}

/// Sends a job: offer, then the blocks the receiver lacks, then commit.
pub async fn send_job(
    conns: &[quinn::Connection],
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    offer: Offer,
    sources: Vec<SourceFile>,
    disk: &Disk,
    fault: &Fault,
) -> Result<SendReport, TransferError> {
    write_msg(send, &Message::Offer(offer.clone())).await?;
    let (have, grant) = match expect_msg(recv).await? {
        Message::Accept { have, tcp } => (have, tcp),
        Message::Reject(r) => return Err(TransferError::Rejected(r)),
        other => return Err(TransferError::Protocol(format!("expected accept, got {other:?}"))),
    };
    let accepted = Accepted { have, grant };
    send_accepted(conns, send, recv, offer, sources, disk, fault, accepted)
        .await
        .map_err(after_accept)
}

/// A connection lost once the job was accepted is the job's failure, not a failure to
/// connect: the receiver may hold part of it.
pub(crate) fn after_accept(e: TransferError) -> TransferError {
    match e {
        TransferError::Connection(c) => TransferError::Lost(c),
        other => other,
    }
}

/// What the receiver's `Accept` said.
struct Accepted {
    have: Vec<Vec<u8>>,
    grant: Option<crate::proto::wire::TcpGrant>,
}

/// The rest of [`send_job`] once the offer is accepted: blocks, then commit.
#[allow(clippy::too_many_arguments)]
async fn send_accepted(
    conns: &[quinn::Connection],
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    offer: Offer,
    sources: Vec<SourceFile>,
    disk: &Disk,
    fault: &Fault,
    Accepted { have, grant }: Accepted,
) -> Result<SendReport, TransferError> {
    let plan = SendPlan::new(&offer, &have, MAX_STREAMS)?;
    let mut report = SendReport {
        job: offer.job_id(),
        hashes: offer.files.iter().map(|f| (f.path.clone(), f.hashes.root)).collect(),
        files: offer.files.len(),
        bytes_total: offer.total_bytes(),
        blocks_held: plan.held,
        streams: plan.lanes.len(),
        ..Default::default()
    };
    let paths = Arc::new(sources.clone());
    let watch = Arc::new(SourceWatch::new(&sources, fault.change_source));
    report.tcp_lane = grant.is_some() && offer.tcp_lane;
    report.connections = if report.tcp_lane {
        0
    } else {
        conns.len().min(report.streams)
    };
    let lanes = async {
        match grant.filter(|_| offer.tcp_lane) {
            Some(g) => {
                let files = Arc::new(sources.clone());
                crate::net::tcplane::send_lanes(conns[0].remote_address().ip(), g, plan.lanes, files, fault).await
            }
            None => run_lanes(conns, offer.job_id(), plan, paths, watch.clone(), disk, fault).await,
        }
    };
    // One read of the control stream, kept across the select: a read cut off half way
    // by the other branch would lose the bytes it had taken (quinn reads are not
    // cancel-safe). Whatever the receiver says next, early failure or commit, lands here.
    let control = expect_msg(recv);
    tokio::pin!(control);
    let lanes_done = tokio::select! {
        r = lanes => r,
        msg = &mut control => return Err(early_reply(msg)),
    };
    let (blocks, bytes) = match lanes_done {
        Ok(done) => done,
        Err(e @ TransferError::SourceChanged(_)) => return Err(abort(send, control, e).await),
        Err(e) => return Err(explain(control, e).await),
    };
    report.blocks_sent = blocks;
    report.bytes_sent = bytes;
    if fault.drop_after_blocks.is_some() {
        conns
            .iter()
            .for_each(|c| c.close(quinn::VarInt::from_u32(0), b"interrupted"));
        return Err(TransferError::Interrupted(blocks));
    }
    if let Err(e) = watch.check_rest(&sources) {
        return Err(abort(send, control, e).await);
    }
    let commit = Message::Commit {
        streams: report.streams as u32,
    };
    // The receiver may have failed the job (a bad block on the TCP lane) and stopped
    // reading just as the last data went out: its reason, not the refused write, is the error.
    if let Err(e) = write_msg(send, &commit).await {
        return Err(explain(control, e).await);
    }
    match control.await? {
        Message::Committed { report: r } => {
            report.report = r;
            Ok(report)
        }
        Message::Held { job } => {
            report.held = true;
            report.report = format!("held as job {job}: commit or abort it");
            Ok(report)
        }
        Message::Failed(r) => Err(TransferError::Failed(r)),
        other => Err(TransferError::Protocol(format!("expected committed, got {other:?}"))),
    }
}

/// Tells the receiver to drop the job because of `e`, and returns `e`.
async fn abort(
    send: &mut quinn::SendStream,
    control: impl std::future::Future<Output = Result<Message, TransferError>>,
    e: TransferError,
) -> TransferError {
    // A receiver that stopped reading has failed the job already; `e` is still the reason.
    if write_msg(send, &Message::Abort).await.is_ok() {
        let _ = send.finish();
        // Wait for the receiver's acknowledgement, so the abort is not lost in the close.
        let _ = tokio::time::timeout(REPLY_GRACE, control).await;
    }
    e
}

/// Whether the files being sent are still the versions offered. A file that changed
/// while it was sent would commit a mix of versions, so that fails the job.
///
/// Each block is checked as it is read: the file's metadata, taken through the
/// descriptor the block was just read from, must still be the offered version's. So a
/// block of a file overwritten in place (same size, new modification time) is never
/// sent: the push stops with "changed while it was sent" (and aborts the job, so the
/// receiver drops what it staged) instead of the receiver failing the job on a block
/// that does not match its hash. Files not read here (held by the receiver, or sent over
/// the TCP lane, which checks after each block it sent) are checked by path before the
/// commit.
struct SourceWatch {
    stamps: Vec<FileStamp>,
    checked: Vec<std::sync::atomic::AtomicBool>,
    /// Test fault: change the first file once (see [`Fault::change_source`]).
    change_first: std::sync::atomic::AtomicBool,
}

impl SourceWatch {
    fn new(sources: &[SourceFile], change_first: bool) -> SourceWatch {
        SourceWatch {
            stamps: sources.iter().map(|s| s.stamp).collect(),
            checked: sources.iter().map(|_| false.into()).collect(),
            change_first: change_first.into(),
        }
    }

    /// Reads block `b` of `source` and checks that the file is unchanged (and, for an
    /// export's file, still has one link: see [`crate::store::source::Within`]).
    async fn read(
        &self,
        disk: &Disk,
        source: &SourceFile,
        b: &crate::proto::job::BlockRef,
    ) -> Result<Bytes, TransferError> {
        let i = b.file as usize;
        let path = source.path.clone();
        if i == 0 && self.change_first.swap(false, Ordering::SeqCst) {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&path);
            let _ = f.as_mut().map(|f| f.write_all(b"!"));
        }
        let read = disk.read_and_stat(source.loc(), b.offset, b.len as usize).await;
        let (data, meta) = read.map_err(|e| source_read_error(path.clone(), e))?;
        source.check(&meta)?;
        if FileStamp::of(&meta) != self.stamps[i] {
            return Err(TransferError::SourceChanged(path));
        }
        self.checked[i].store(true, Ordering::Release);
        Ok(data)
    }

    /// Checks, by path, every file not checked as it was read.
    fn check_rest(&self, sources: &[SourceFile]) -> Result<(), TransferError> {
        let unchecked = sources
            .iter()
            .zip(&self.checked)
            .filter(|(_, c)| !c.load(Ordering::Acquire));
        for (s, _) in unchecked {
            if FileStamp::now(&s.path).ok() != Some(s.stamp) {
                return Err(TransferError::SourceChanged(s.path.clone()));
            }
        }
        Ok(())
    }
}

/// How long one side waits for the other's last word: the receiver's reason after a data
/// stream failed, or the acknowledgement of a puller's final answer.
pub(crate) const REPLY_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A data stream failed: the receiver says why on the control stream, if it can.
async fn explain(
    control: impl std::future::Future<Output = Result<Message, TransferError>>,
    e: TransferError,
) -> TransferError {
    match tokio::time::timeout(REPLY_GRACE, control).await {
        Ok(Ok(Message::Failed(r))) => TransferError::Failed(r),
        _ => e,
    }
}

fn early_reply(msg: Result<Message, TransferError>) -> TransferError {
    match msg {
        Ok(Message::Failed(r)) => TransferError::Failed(r),
        Ok(other) => TransferError::Protocol(format!("unexpected {other:?} while sending")),
        Err(e) => e,
    }
}

/// Sends the plan's lanes, one stream each, spread round-robin over `conns`.
async fn run_lanes(
    conns: &[quinn::Connection],
    job: JobId,
    plan: SendPlan,
    sources: Arc<Vec<SourceFile>>,
    watch: Arc<SourceWatch>,
    disk: &Disk,
    fault: &Fault,
) -> Result<(u64, u64), TransferError> {
    let budget = Arc::new(AtomicU64::new(fault.limit().unwrap_or(u64::MAX)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, lane) in plan.lanes.into_iter().enumerate() {
        let stream = conns[i % conns.len()].open_uni().await?;
        let ctx = LaneCtx {
            job,
            sources: sources.clone(),
            watch: watch.clone(),
            disk: disk.clone(),
            fault: fault.clone(),
            budget: budget.clone(),
        };
        tasks.spawn(send_lane(stream, lane, ctx));
    }
    let (mut blocks, mut bytes) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (b, n) = r.expect("lane task")?;
        blocks += b;
        bytes += n;
    }
    Ok((blocks, bytes))
}

struct LaneCtx {
    job: JobId,
    sources: Arc<Vec<SourceFile>>,
    watch: Arc<SourceWatch>,
    disk: Disk,
    fault: Fault,
    budget: Arc<AtomicU64>,
}

impl LaneCtx {
    fn take_budget(&self) -> bool {
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_ok()
    }
}

/// Sends one lane: reads run ahead of the network by a few blocks.
async fn send_lane(
    mut stream: quinn::SendStream,
    lane: Vec<crate::proto::job::BlockRef>,
    ctx: LaneCtx,
) -> Result<(u64, u64), TransferError> {
    let write_err = write_error;
    stream
        .write_all(&data_stream_header(ctx.job))
        .await
        .map_err(write_err)?;
    let (tx, mut rx) = mpsc::channel::<Result<(crate::proto::job::BlockRef, Bytes), TransferError>>(4);
    let disk = ctx.disk.clone();
    let sources = ctx.sources.clone();
    let watch = ctx.watch.clone();
    let reader = tokio::spawn(async move {
        for b in lane {
            let r = watch.read(&disk, &sources[b.file as usize], &b).await.map(|d| (b, d));
            if tx.send(r).await.is_err() {
                return;
            }
        }
    });
    let (mut blocks, mut bytes) = (0u64, 0u64);
    while let Some(item) = rx.recv().await {
        let (b, mut data) = item?;
        if !ctx.take_budget() {
            break;
        }
        if let Some(m) = &ctx.fault.pace {
            m.pace(b.len as u64).await;
        }
        if ctx.fault.corrupt == Some((b.file, b.block)) && !data.is_empty() {
            let mut m = BytesMut::from(&data[..]);
            m[0] ^= 1;
            data = m.freeze();
        }
        let head = BlockHeader {
            file: b.file,
            block: b.block,
            len: b.len,
        };
        stream
            .write_chunk(Bytes::copy_from_slice(&head.encode()))
            .await
            .map_err(write_err)?;
        stream.write_chunk(data).await.map_err(write_err)?;
        blocks += 1;
        bytes += b.len as u64;
        if let Some(p) = &ctx.fault.progress {
            p.fetch_add(b.len as u64, Ordering::Relaxed);
        }
    }
    reader.abort();
    stream.finish().map_err(stream_err)?;
    // Wait until the peer has every byte of this stream (or stopped it).
    let _ = stream.stopped().await;
    Ok((blocks, bytes))
}

fn source_read_error(path: PathBuf, e: std::io::Error) -> TransferError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        return SourceError::Symlink(path).into();
    }
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        let source = std::io::Error::other("file shrank while it was sent");
        return TransferError::Io { path, source };
    }
    TransferError::Io { path, source: e }
}

/// Progress of a receiving job, watched by its control task.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub streams_done: u32,
    pub blocks: u64,
    pub error: Option<Refusal>,
    /// Block writes under way; an abort waits for them before removing the staging.
    pub writing: u32,
    /// Every block is in: what is left (sealing, the hook) is the receiver's own work.
    pub data_in: bool,
}

/// A job being received, shared by its control task and its data streams.
pub struct Incoming {
    /// Identity of the sender: only its connections may feed this job.
    pub peer: String,
    pub job: Mutex<ReceiveJob>,
    pub offer: Arc<Offer>,
    pub stage: Stage,
    pub disk: Disk,
    pub progress: watch::Sender<Progress>,
    pub started: std::time::Instant,
    /// The agent's metrics and rate limits for this job's sender.
    pub meter: Option<crate::agent::metrics::Meter>,
    /// What the job has still to write, promised on its file system.
    pub space: Option<crate::store::space::Reservation>,
    /// Mode of the folders the job brings, if the target sets one.
    pub dir_mode: Option<u32>,
}

impl Incoming {
    /// Fails the job with `r` unless it failed already; returns whether this did.
    fn fail(&self, r: Refusal) -> bool {
        let mut first = false;
        self.progress.send_modify(|p| {
            if p.error.is_none() {
                p.error = Some(r);
                first = true;
            }
        });
        first
    }

    /// Ends this attempt because its sender started the job again (see
    /// `agent::ActiveGuard::take_over`); returns whether it was still running.
    pub fn take_over(&self) -> bool {
        self.fail(Refusal::new(
            code::ABORTED,
            "taken over by a newer attempt of the same sender",
        ))
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

async fn receive_stream(mut stream: quinn::RecvStream, table: &JobTable, peer: &str) -> Result<(), TransferError> {
    let mut head = [0u8; 17];
    stream.read_exact(&mut head).await.map_err(stream_err)?;
    let id = parse_data_stream_header(&head)?;
    let found = table
        .lock()
        .expect("job table")
        .get(&id)
        .filter(|inc| inc.peer == peer)
        .cloned();
    let Some(inc) = found else {
        let _ = stream.stop(quinn::VarInt::from_u32(code::NOT_FOUND as u32));
        return Err(TransferError::Protocol(format!("data for unknown job {id}")));
    };
    let writes = Writes::new();
    let mut result = receive_blocks(&mut stream, &inc, &writes).await;
    if result.is_ok() {
        result = writes.drain().await;
    }
    stream_done(&inc, &result);
    if result.is_err() {
        let _ = stream.stop(quinn::VarInt::from_u32(code::BAD_BLOCK as u32));
    }
    result
}

async fn receive_blocks(
    stream: &mut quinn::RecvStream,
    inc: &Arc<Incoming>,
    writes: &Writes,
) -> Result<(), TransferError> {
    loop {
        let mut h = [0u8; BlockHeader::LEN];
        match stream.read_exact(&mut h).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(()),
            Err(e) => return Err(stream_err(e)),
        }
        let head = BlockHeader::decode(&h);
        let expected = expected_len(&inc.offer, head)?;
        let data = read_block(stream, expected).await?;
        take_block(inc, head, data, writes).await?;
    }
}

/// The writes a data stream has under way. The stream goes on reading while its blocks
/// are written, up to [`Writes::LIMIT`] bytes of them, and counts as read to its end only
/// once they are all on disk. Each write reports from the disk thread, so no task is
/// woken per block: for 20,000 small files that was two thread wake-ups each.
pub(crate) struct Writes(Arc<tokio::sync::Semaphore>);

impl Writes {
    /// Bytes in flight per stream, in 4 KiB units: one whole block, or 256 small ones.
    const LIMIT: u32 = (crate::proto::blocks::BLOCK_SIZE / 4096) as u32;

    pub(crate) fn new() -> Writes {
        Writes(Arc::new(tokio::sync::Semaphore::new(Writes::LIMIT as usize)))
    }

    fn units(len: usize) -> u32 {
        (len.div_ceil(4096) as u32).clamp(1, Writes::LIMIT)
    }

    /// Waits until every write started by this stream has ended.
    pub(crate) async fn drain(&self) -> Result<(), TransferError> {
        let all = self.0.acquire_many(Writes::LIMIT).await;
        all.map(drop)
            .map_err(|_| TransferError::Protocol("writes dropped".into()))
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
        space.check(len as u64).map_err(|e| {
            let r = Refusal::new(code::NO_SPACE, e.to_string()).retry_after(RETRY_SPACE);
            TransferError::Failed(r)
        })?;
    }
    if let Some(m) = &inc.meter {
        m.pace(len as u64).await;
    }
    let offset = ReceiveJob::verify(&inc.offer, head.file, head.block, &data).inspect_err(|_| {
        if let Some(m) = &inc.meter {
            m.failed();
        }
    })?;
    let permit = writes.0.clone().acquire_many_owned(Writes::units(len)).await;
    let permit = permit.map_err(|_| TransferError::Protocol("writes dropped".into()))?;
    let rel = inc.job.lock().expect("job").paths[head.file as usize].clone();
    let path = inc.stage.file(&rel);
    let loc = inc.stage.place(&rel).map_err(|source| TransferError::Io {
        path: path.clone(),
        source,
    })?;
    // A failed or aborted job takes no more writes. Waiters are woken only for what
    // they wait on (an abort waits for writes to end, a commit for the last block),
    // not once per block: a job of 20,000 small files would wake them 60,000 times.
    let mut admitted = false;
    inc.progress.send_if_modified(|p| {
        admitted = p.error.is_none();
        p.writing += admitted as u32;
        false
    });
    if !admitted {
        return Err(TransferError::Protocol("block for a job that already ended".into()));
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
        let inc = &self.inc;
        let last = match r {
            Ok(()) => {
                if let Some(space) = &inc.space {
                    space.written(self.head.len as u64);
                }
                let mut job = inc.job.lock().expect("job");
                job.record(self.head.file, self.head.block);
                Some(job.missing() == 0)
            }
            Err(source) => {
                inc.fail(write_failure(path, source));
                None
            }
        };
        inc.progress.send_if_modified(|p| {
            p.writing -= 1;
            p.blocks += last.is_some() as u64;
            last == Some(true) || (p.error.is_some() && p.writing == 0)
        });
        if let (Some(m), Some(_)) = (&inc.meter, last) {
            m.received(self.head.len as u64);
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
/// the job's staging is then removed, see [`receive_job`]).
fn write_failure(path: PathBuf, source: std::io::Error) -> Refusal {
    match source.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => Refusal::new(
            code::NO_SPACE,
            format!("the target's file system is full: {}: {source}", path.display()),
        )
        .retry_after(RETRY_SPACE),
        _ => Refusal::new(code::IO, TransferError::Io { path, source }.to_string()),
    }
}

/// How long a sender refused as busy should wait (a connection closed as busy says
/// no more).
pub const RETRY_BUSY: u32 = 10;

/// How long a sender refused for space should wait before it tries again.
pub const RETRY_SPACE: u32 = 60;

/// Marks one data stream (QUIC or TCP) of a job as read to its end, or the job failed.
pub(crate) fn stream_done(inc: &Incoming, result: &Result<(), TransferError>) {
    match result {
        Ok(()) => inc.progress.send_modify(|p| p.streams_done += 1),
        Err(e) => {
            inc.fail(match e {
                TransferError::Job(j) => j.refusal(),
                TransferError::Failed(r) => r.clone(),
                other => Refusal::new(code::IO, other.to_string()),
            });
        }
    }
}

pub(crate) fn expected_len(offer: &Offer, head: BlockHeader) -> Result<usize, TransferError> {
    let f = offer
        .files
        .get(head.file as usize)
        .ok_or(JobError::UnknownFile(head.file))?;
    let want = crate::proto::blocks::block_len(f.hashes.size, head.block as u64);
    if head.len as usize != want || want == 0 {
        let err = crate::proto::blocks::VerifyError::BadLength {
            index: head.block as u64,
            got: head.len as usize,
            want,
        };
        return Err(JobError::BadBlock {
            path: f.path.clone(),
            err,
        }
        .into());
    }
    Ok(want)
}

/// Reads exactly `len` bytes, without copying when quinn hands them in one piece.
async fn read_block(stream: &mut quinn::RecvStream, len: usize) -> Result<Bytes, TransferError> {
    if crate::store::buf::wants_direct(len) {
        return read_aligned_block(stream, len).await;
    }
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut got = 0;
    while got < len {
        let chunk = stream
            .read_chunk(len - got, true)
            .await
            .map_err(stream_err)?
            .ok_or_else(|| TransferError::Protocol("data stream ended inside a block".into()))?;
        got += chunk.bytes.len();
        match first.take() {
            None if buf.is_empty() => first = Some(chunk.bytes),
            prev => {
                if let Some(p) = prev {
                    buf.reserve(len);
                    buf.extend_from_slice(&p);
                }
                buf.extend_from_slice(&chunk.bytes);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// Large blocks, the bulk of the data, are gathered into aligned buffers (whole blocks
/// from a pool) so the disk can take them with O_DIRECT.
pub(crate) static BLOCK_POOL: std::sync::LazyLock<Arc<crate::store::buf::Pool>> =
    std::sync::LazyLock::new(|| crate::store::buf::Pool::new(crate::proto::blocks::BLOCK_SIZE as usize));

async fn read_aligned_block(stream: &mut quinn::RecvStream, len: usize) -> Result<Bytes, TransferError> {
    let mut buf = crate::store::buf::aligned(&BLOCK_POOL, len);
    let dst = buf.as_mut_slice();
    let mut got = 0;
    while got < dst.len() {
        let chunk = stream
            .read_chunk(dst.len() - got, true)
            .await
            .map_err(stream_err)?
            .ok_or_else(|| TransferError::Protocol("data stream ended inside a block".into()))?;
        dst[got..got + chunk.bytes.len()].copy_from_slice(&chunk.bytes);
        got += chunk.bytes.len();
    }
    Ok(buf.freeze())
}

/// How long a failed job waits for its block writes under way to end.
const WRITES_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Answers the offer of a job that committed before (sent again after a crash or a
/// lost answer): every block is held, and the commit is confirmed with `report`.
pub async fn confirm_committed(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    job: &ReceiveJob,
    report: String,
) -> Result<(), TransferError> {
    write_msg(send, &job.accept_all()).await?;
    let answer = match expect_msg(recv).await? {
        Message::Commit { .. } => Message::Committed { report },
        Message::Abort => Message::Failed(Refusal::new(code::ABORTED, "aborted by the sender")),
        other => return Err(TransferError::Protocol(format!("expected commit, got {other:?}"))),
    };
    write_msg(send, &answer).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(REPLY_GRACE, send.stopped()).await;
    Ok(())
}

/// How a received job ended.
#[derive(Debug)]
pub enum Received {
    Committed(String),
    /// Staged, verified and synced; waiting for a commit or abort (a `hold` offer).
    Held,
    Aborted,
}

/// Where a receiving job's data arrives and goes.
#[derive(Clone, Copy)]
pub struct Receiver<'a> {
    /// Identity of the sender.
    pub peer: &'a str,
    pub disk: &'a Disk,
    /// Routes this connection's QUIC data streams to their job.
    pub table: &'a JobTable,
    /// Metrics and rate limits (the agent), or none (a pulling client).
    pub meter: Option<&'a crate::agent::metrics::Meter>,
    /// The TCP lane, if the job's target allows it, and the IP address of the QUIC
    /// connection the job came on: only lane connections from there are taken.
    pub tcp: Option<(&'a crate::net::tcplane::TcpLanes, std::net::IpAddr)>,
    /// The job's share of its file system's free space (an agent), if counted.
    pub space: Option<&'a crate::store::space::Reservation>,
    /// Give the job up if no block arrives for this long before its commit (an
    /// agent: a sender that stops sending must not hold a job slot for ever).
    pub stall: Option<std::time::Duration>,
    /// Mode of the folders the job brings (an import target's `dir_mode`), if set.
    pub dir_mode: Option<u32>,
}

/// Receives an accepted job: registers it, sends `Accept`, takes data until `Commit`,
/// seals the staged files and runs `hook`. Every failure is reported to the sender
/// as `Failed` before it is returned.
pub async fn receive_job<H, F>(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    job: ReceiveJob,
    stage: Stage,
    at: Receiver<'_>,
    hook: H,
) -> Result<Received, TransferError>
where
    H: FnOnce(Arc<Offer>, Vec<crate::proto::path::RelPath>) -> F,
    F: std::future::Future<Output = Result<Received, Refusal>>,
{
    let id = job.id;
    let mut accept = job.accept();
    let paths = job.paths.clone();
    let want_tcp = job.offer.tcp_lane;
    let (progress, mut watch) = watch::channel(Progress::default());
    let inc = Arc::new(Incoming {
        peer: at.peer.to_string(),
        offer: job.offer.clone(),
        job: Mutex::new(job),
        stage,
        disk: at.disk.clone(),
        progress,
        started: std::time::Instant::now(),
        meter: at.meter.cloned(),
        space: at.space.cloned(),
        dir_mode: at.dir_mode,
    });
    let (table, tcp) = (at.table, at.tcp);
    table.lock().expect("job table").insert(id, inc.clone());
    let grant = tcp
        .filter(|_| want_tcp)
        .map(|(lanes, peer_ip)| lanes.grant(inc.clone(), peer_ip));
    if let Message::Accept { tcp, .. } = &mut accept {
        *tcp = grant;
    }
    let stalled = stalled(watch.clone(), at.stall);
    let result = tokio::select! {
        r = drive_receive(send, recv, &inc, &mut watch, accept, paths, hook) => r,
        r = stalled => Err(TransferError::Failed(r)),
    };
    if let (Some((lanes, _)), Some(g)) = (tcp, grant) {
        lanes.revoke(&g.token);
    }
    if let Err(e) = &result {
        // No block is written after the job is given up: a new attempt may scan and
        // write the same staged files as soon as this one is out of the table.
        inc.fail(Refusal::new(code::ABORTED, e.to_string()));
        let drained = watch.wait_for(|p| p.writing == 0);
        let _ = tokio::time::timeout(WRITES_GRACE, drained).await;
        // Short of space, what was staged goes: keeping it would leave the file system
        // full for the engine, and the job must be sent again later anyway.
        if matches!(e, TransferError::Failed(r) if r.code == code::NO_SPACE) {
            inc.stage.remove();
        }
    }
    table.lock().expect("job table").remove(&id);
    if let Err(TransferError::Rejected(r) | TransferError::Failed(r)) = &result {
        let _ = write_msg(send, &Message::Failed(r.clone())).await;
        let _ = send.finish();
    }
    result
}

/// Resolves once no block has arrived for `limit` while the job still has blocks to
/// come; never if there is no limit.
async fn stalled(progress: watch::Receiver<Progress>, limit: Option<std::time::Duration>) -> Refusal {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    let (mut last, mut since) = (progress.borrow().blocks, tokio::time::Instant::now());
    loop {
        tokio::time::sleep((limit / 4).max(std::time::Duration::from_millis(50))).await;
        let p = progress.borrow().clone();
        if p.data_in {
            return std::future::pending().await;
        }
        if p.blocks != last {
            (last, since) = (p.blocks, tokio::time::Instant::now());
        } else if since.elapsed() >= limit {
            let secs = limit.as_secs();
            return Refusal::new(
                code::ABORTED,
                format!("no data arrived for {secs}s: the job was given up; send it again to resume"),
            );
        }
    }
}

async fn drive_receive<H, F>(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    inc: &Arc<Incoming>,
    watch: &mut watch::Receiver<Progress>,
    accept: Message,
    paths: Vec<crate::proto::path::RelPath>,
    hook: H,
) -> Result<Received, TransferError>
where
    H: FnOnce(Arc<Offer>, Vec<crate::proto::path::RelPath>) -> F,
    F: std::future::Future<Output = Result<Received, Refusal>>,
{
    write_msg(send, &accept).await?;
    let first = tokio::select! {
        msg = expect_msg(recv) => msg?,
        p = watch.wait_for(|p| p.error.is_some()) => {
            let err = p.map(|p| p.error.clone()).ok().flatten();
            return Err(TransferError::Failed(err.expect("error set")));
        }
    };
    let streams = match first {
        Message::Commit { streams } => streams,
        Message::Abort => {
            let ack = Refusal::new(code::ABORTED, "aborted by the sender");
            inc.fail(ack.clone());
            let _ = watch.wait_for(|p| p.writing == 0).await;
            inc.stage.remove();
            write_msg(send, &Message::Failed(ack)).await?;
            let _ = send.finish();
            return Ok(Received::Aborted);
        }
        other => return Err(TransferError::Protocol(format!("expected commit, got {other:?}"))),
    };
    if streams as usize > MAX_STREAMS {
        return Err(TransferError::Failed(Refusal::new(
            code::LIMIT,
            format!("{streams} data streams"),
        )));
    }
    let p = watch
        .wait_for(|p| p.error.is_some() || p.streams_done >= streams || inc.job.lock().expect("job").missing() == 0)
        .await
        .map(|p| p.clone())
        .map_err(|_| TransferError::Protocol("job dropped".into()))?;
    if let Some(r) = p.error {
        return Err(TransferError::Failed(r));
    }
    inc.progress.send_if_modified(|p| {
        p.data_in = true;
        false
    });
    let job = inc
        .job
        .lock()
        .expect("job")
        .check_complete()
        .map_err(|e| TransferError::Failed(e.refusal()));
    job?;
    let ms = |t: std::time::Instant| t.elapsed().as_millis() as u64;
    tracing::debug!(ms = ms(inc.started), "every block in");
    inc.stage
        .seal(&inc.offer, &paths, &inc.disk, inc.dir_mode)
        .await
        .map_err(|e| TransferError::Failed(Refusal::new(code::IO, e.to_string())))?;
    tracing::debug!(ms = ms(inc.started), "staged files synced");
    let done = hook(inc.offer.clone(), paths).await.map_err(TransferError::Failed)?;
    tracing::debug!(ms = ms(inc.started), "hook done");
    let msg = match &done {
        Received::Committed(report) => Message::Committed { report: report.clone() },
        Received::Held => Message::Held {
            job: inc.offer.job_id(),
        },
        Received::Aborted => return Err(TransferError::Protocol("a hook can not abort".into())),
    };
    write_msg(send, &msg).await?;
    let _ = send.finish();
    Ok(done)
}
