//! The sending half of a job (a pushing client, an agent serving a pull): runs a
//! [`Sender`] machine, reading the blocks it plans from disk onto QUIC streams or the
//! TCP lane.

use super::framing::{read_msg, stream_err, write_error, write_msg};
use super::{after_accept, Flow, TransferError};
use crate::proto::job::{BlockRef, SendPlan};
use crate::proto::limits::MAX_STREAMS;
use crate::proto::session::{ProtocolError, SendAction, SendEnd, Sender};
use crate::proto::wire::{data_stream_header, BlockHeader, JobId, Message, Offer, ReplicaResult, TcpGrant};
use crate::store::disk::Disk;
use crate::store::hashcache::FileStamp;
use crate::store::source::{SourceError, SourceFile};
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What a sender did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    /// The job's id (what `commit` and `abort` take for a held job).
    pub job: JobId,
    /// Each file's name and blake3 root.
    pub hashes: Vec<(String, crate::proto::blocks::Digest)>,
    /// Files in the job.
    pub files: usize,
    /// Bytes of all the files.
    pub bytes_total: u64,
    /// Blocks this side sent.
    pub blocks_sent: u64,
    /// Bytes this side sent.
    pub bytes_sent: u64,
    /// Blocks the receiver already held (from an interrupted send), so not sent.
    pub blocks_held: u64,
    /// Data streams used.
    pub streams: usize,
    /// Whether the data went over the TCP lane (asked for and granted).
    pub tcp_lane: bool,
    /// Which lane the data went over.
    pub lane: LaneUsed,
    /// The job is staged and held on the receiver, waiting for commit or abort.
    pub held: bool,
    /// QUIC connections the data streams were spread over.
    pub connections: usize,
    /// The receiver's import hook report.
    pub report: String,
    /// How the job ended on the replicas after the receiver (a relay chain).
    pub replicas: Vec<ReplicaResult>,
}

/// The lane a job's data went over, as `--json` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LaneUsed {
    /// QUIC data streams.
    #[default]
    Quic,
    /// The TCP lane with TLS.
    Tls,
    /// The clear-text TCP lane.
    Cleartext,
}

impl LaneUsed {
    /// `"quic"`, `"tls"` or `"cleartext"`.
    pub fn as_str(self) -> &'static str {
        match self {
            LaneUsed::Quic => "quic",
            LaneUsed::Tls => "tls",
            LaneUsed::Cleartext => "cleartext",
        }
    }
}

/// Where a sender's blocks come from.
#[derive(Clone)]
pub enum Blocks {
    /// The files offered, read as they are and checked unchanged.
    Files(Vec<SourceFile>),
    /// A relay's: the blocks its own receiving job verifies and writes.
    Relayed(Arc<super::relay::Tap>),
}

impl From<Vec<SourceFile>> for Blocks {
    fn from(files: Vec<SourceFile>) -> Blocks {
        Blocks::Files(files)
    }
}

impl Blocks {
    fn files(&self) -> &[SourceFile] {
        match self {
            Blocks::Files(f) => f,
            Blocks::Relayed(_) => &[],
        }
    }
}

impl SendReport {
    fn of(offer: &Offer) -> SendReport {
        SendReport {
            job: offer.job_id(),
            hashes: offer.files.iter().map(|f| (f.path.clone(), f.hashes.root)).collect(),
            files: offer.files.len(),
            bytes_total: offer.total_bytes(),
            ..Default::default()
        }
    }
}

/// Sends a job: offer, then the blocks the receiver lacks, then commit.
pub async fn send_job(
    conns: &[quinn::Connection],
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    offer: Offer,
    sources: impl Into<Blocks>,
    disk: &Disk,
    flow: &Flow,
) -> Result<SendReport, TransferError> {
    send_relayed(conns, (send, recv), offer, sources.into(), disk, flow)
        .await
        .0
}

/// [`send_job`], also when it fails with what a relay said about the replicas after
/// it (a relay whose own hook failed may have delivered them).
pub async fn send_relayed(
    conns: &[quinn::Connection],
    (send, recv): (&mut quinn::SendStream, &mut quinn::RecvStream),
    offer: Offer,
    sources: Blocks,
    disk: &Disk,
    flow: &Flow,
) -> (Result<SendReport, TransferError>, Vec<ReplicaResult>) {
    let mut m = Sender::new(offer, MAX_STREAMS);
    let res = run_job(&mut m, conns, (send, recv), sources, disk, flow).await;
    let replicas = m.replicas().to_vec();
    let res = res.map(|mut r| {
        r.replicas = replicas.clone();
        r
    });
    (res, replicas)
}

async fn run_job(
    m: &mut Sender,
    conns: &[quinn::Connection],
    (send, recv): (&mut quinn::SendStream, &mut quinn::RecvStream),
    sources: Blocks,
    disk: &Disk,
    flow: &Flow,
) -> Result<SendReport, TransferError> {
    let mut report = SendReport::of(m.offer());
    let (plan, grant) = loop {
        match m.poll_action() {
            Some(SendAction::Send(msg)) => write_msg(send, &msg).await?,
            Some(SendAction::Lanes { plan, tcp }) => break (plan, tcp),
            Some(SendAction::Finish(end)) => return finish(end, report, None),
            None => match read_msg(recv).await? {
                Some(msg) => m.handle_message(msg),
                None => m.handle_end(),
            },
        }
    };
    report.blocks_held = plan.held;
    report.streams = plan.lanes.len();
    report.tcp_lane = grant.is_some();
    report.lane = match grant {
        None => LaneUsed::Quic,
        Some(g) if g.tls => LaneUsed::Tls,
        Some(_) => LaneUsed::Cleartext,
    };
    report.connections = if report.tcp_lane {
        0
    } else {
        conns.len().min(report.streams)
    };
    let lanes = Lanes {
        conns,
        disk,
        flow,
        sources,
    };
    let res = drive(m, send, recv, lanes, plan, grant, &mut report).await;
    res.map_err(after_accept)
}

/// What the lanes send from, and how.
struct Lanes<'a> {
    conns: &'a [quinn::Connection],
    disk: &'a Disk,
    flow: &'a Flow,
    sources: Blocks,
}

/// Runs the accepted job: the lanes and the control stream's last word, as the machine
/// says. One read of the control stream is kept across the loop: a read cut off half
/// way would lose the bytes it had taken (quinn reads are not cancel-safe).
async fn drive(
    m: &mut Sender,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    lanes: Lanes<'_>,
    plan: SendPlan,
    grant: Option<TcpGrant>,
    report: &mut SendReport,
) -> Result<SendReport, TransferError> {
    let watch = Arc::new(SourceWatch::new(lanes.sources.files()));
    let sent = send_lanes(&lanes, m.offer().job_id(), plan, grant, watch.clone());
    tokio::pin!(sent);
    let control = read_answer(recv);
    tokio::pin!(control);
    let (mut sending, mut reading) = (true, true);
    let mut own: Option<TransferError> = None;
    loop {
        while let Some(action) = m.poll_action() {
            match action {
                SendAction::Send(msg) => {
                    if let Err(e) = write_msg(send, &msg).await {
                        // The receiver may have failed the job and stopped reading: its
                        // reason, if it gives one, is the error.
                        own.get_or_insert(e);
                        m.send_failed(std::time::Instant::now());
                    } else if msg == Message::Abort {
                        let _ = send.finish();
                    }
                }
                SendAction::Lanes { .. } => {}
                SendAction::Finish(end) => return finish(end, std::mem::take(report), own),
            }
        }
        let deadline = m.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            r = &mut sent, if sending => {
                sending = false;
                let now = std::time::Instant::now();
                match r.and_then(|done| lanes_sent(done, &lanes, &watch, report)) {
                    Ok(()) => m.lanes_done(),
                    Err(e) => {
                        let abort = matches!(
                            e,
                            TransferError::SourceChanged(_) | TransferError::Upstream { aborted: true, .. }
                        );
                        if matches!(e, TransferError::Interrupted(_)) {
                            return Err(e);
                        }
                        own = Some(e);
                        m.lanes_failed(abort, now);
                    }
                }
            }
            (replicas, msg) = &mut control, if reading => {
                reading = false;
                if let Some(r) = replicas {
                    m.handle_message(r);
                }
                match msg {
                    Ok(Some(msg)) => m.handle_message(msg),
                    Ok(None) => m.handle_end(),
                    Err(e) => {
                        own.get_or_insert(e);
                        m.handle_end();
                    }
                }
            }
            _ = sleep_until(deadline), if deadline.is_some() => m.handle_timeout(std::time::Instant::now()),
            // Nothing left to wait for (the machine finishes on the control stream's
            // last word, so this is not reached): end rather than wait for ever.
            else => m.handle_end(),
        }
    }
}

/// The receiver's last word, and the `Replicas` a relay says before it. One future for
/// both: a quinn read cut off half way would lose what it had taken.
async fn read_answer(recv: &mut quinn::RecvStream) -> (Option<Message>, Result<Option<Message>, TransferError>) {
    match read_msg(recv).await {
        Ok(Some(r @ Message::Replicas(_))) => (Some(r), read_msg(recv).await),
        other => (None, other),
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The lanes are all sent: count them, and check the files not checked as they were read.
fn lanes_sent(
    (blocks, bytes): (u64, u64),
    lanes: &Lanes<'_>,
    watch: &SourceWatch,
    report: &mut SendReport,
) -> Result<(), TransferError> {
    report.blocks_sent = blocks;
    report.bytes_sent = bytes;
    if lanes.flow.drops_after_lanes() {
        let close = |c: &quinn::Connection| c.close(quinn::VarInt::from_u32(0), b"interrupted");
        lanes.conns.iter().for_each(close);
        return Err(TransferError::Interrupted(blocks));
    }
    watch.check_rest(lanes.sources.files())
}

/// The sender's result from how the machine ended.
fn finish(end: SendEnd, mut report: SendReport, own: Option<TransferError>) -> Result<SendReport, TransferError> {
    match end {
        SendEnd::Committed(r) => {
            report.report = r;
            Ok(report)
        }
        SendEnd::Held(job) => {
            report.held = true;
            report.report = format!("held as job {job}: commit or abort it");
            Ok(report)
        }
        SendEnd::Rejected(r) => Err(TransferError::Rejected(r)),
        SendEnd::Failed(r) => Err(TransferError::Failed(r)),
        SendEnd::Protocol(p) => Err(own.unwrap_or(TransferError::Protocol(p))),
        SendEnd::BadAccept(e) => Err(e.into()),
        SendEnd::Own => Err(own.unwrap_or_else(|| ProtocolError::ended("committed").into())),
    }
}

/// Sends the plan over the TCP lane if granted, else over QUIC streams.
async fn send_lanes(
    lanes: &Lanes<'_>,
    job: JobId,
    plan: SendPlan,
    grant: Option<TcpGrant>,
    watch: Arc<SourceWatch>,
) -> Result<(u64, u64), TransferError> {
    let sources = Arc::new(lanes.sources.clone());
    match (grant, &lanes.sources) {
        (Some(g), Blocks::Files(files)) => {
            let ip = lanes.conns[0].remote_address().ip();
            super::tcp::send_lanes(ip, g, plan.lanes, Arc::new(files.clone()), lanes.flow).await
        }
        // A relay never asks for the TCP lane (it sends what it verifies, as it comes).
        (Some(_), Blocks::Relayed(_)) => Err(TransferError::Stream("a relay sends on QUIC only".into())),
        (None, _) => run_lanes(lanes.conns, job, plan, sources, watch, lanes.disk, lanes.flow).await,
    }
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
    checked: Vec<AtomicBool>,
    /// Whether the test fault changed the first file already.
    changed: AtomicBool,
}

impl SourceWatch {
    fn new(sources: &[SourceFile]) -> SourceWatch {
        SourceWatch {
            stamps: sources.iter().map(|s| s.stamp).collect(),
            checked: sources.iter().map(|_| false.into()).collect(),
            changed: false.into(),
        }
    }

    /// Reads block `b` of `source` and checks that the file is unchanged (and, for an
    /// export's file, still has one link: see [`crate::store::source::Within`]).
    async fn read(&self, disk: &Disk, source: &SourceFile, b: &BlockRef, flow: &Flow) -> Result<Bytes, TransferError> {
        let i = b.file as usize;
        let path = source.path.clone();
        if i == 0 {
            flow.before_read(&path, &self.changed);
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

    /// Reads the small blocks `group` (see [`small_run`]) in one disk request, each
    /// checked as [`SourceWatch::read`] checks one.
    async fn read_many(
        &self,
        disk: &Disk,
        files: &[SourceFile],
        group: &[BlockRef],
        flow: &Flow,
    ) -> Vec<Result<Bytes, TransferError>> {
        if group.iter().any(|b| b.file == 0) {
            flow.before_read(&files[0].path, &self.changed);
        }
        let reads = group
            .iter()
            .map(|b| (files[b.file as usize].loc(), b.offset, b.len as usize));
        let results = disk.read_many_and_stat(reads.collect()).await;
        let check = |b: &BlockRef, r: std::io::Result<(Bytes, std::fs::Metadata)>| {
            let (i, source) = (b.file as usize, &files[b.file as usize]);
            let (data, meta) = r.map_err(|e| source_read_error(source.path.clone(), e))?;
            source.check(&meta)?;
            if FileStamp::of(&meta) != self.stamps[i] {
                return Err(TransferError::SourceChanged(source.path.clone()));
            }
            self.checked[i].store(true, Ordering::Release);
            Ok(data)
        };
        group.iter().zip(results).map(|(b, r)| check(b, r)).collect()
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

/// Sends the plan's lanes, one stream each, spread round-robin over `conns`.
async fn run_lanes(
    conns: &[quinn::Connection],
    job: JobId,
    plan: SendPlan,
    sources: Arc<Blocks>,
    watch: Arc<SourceWatch>,
    disk: &Disk,
    flow: &Flow,
) -> Result<(u64, u64), TransferError> {
    let budget = Arc::new(AtomicU64::new(flow.budget()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut lanes = plan.lanes;
    if let Blocks::Relayed(tap) = &*sources {
        // A relay's lanes take the blocks as they come in, whatever the plan's order.
        tap.want(lanes.iter_mut().flat_map(std::mem::take));
    }
    for (i, lane) in lanes.into_iter().enumerate() {
        let stream = conns[i % conns.len()].open_uni().await?;
        let ctx = LaneCtx {
            job,
            sources: sources.clone(),
            watch: watch.clone(),
            disk: disk.clone(),
            flow: flow.clone(),
            budget: budget.clone(),
        };
        tasks.spawn(send_lane(stream, lane, ctx));
    }
    sum_lanes(tasks).await
}

/// Waits for every lane; the blocks and bytes they sent, or the first lane's error.
pub(super) async fn sum_lanes(
    mut tasks: tokio::task::JoinSet<Result<(u64, u64), TransferError>>,
) -> Result<(u64, u64), TransferError> {
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
    sources: Arc<Blocks>,
    watch: Arc<SourceWatch>,
    disk: Disk,
    flow: Flow,
    budget: Arc<AtomicU64>,
}

/// Takes one block from the shared budget (fault injection limits it); false once spent.
pub(crate) fn take_budget(budget: &AtomicU64) -> bool {
    budget
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
        .is_ok()
}

/// Small blocks read in one disk request, and written to a stream in one call, at most.
const BATCH_BLOCKS: usize = 32;
/// Bytes of small blocks read or written together, at most.
const BATCH_BYTES: u64 = 256 << 10;

/// How many of the blocks at the start of `lane` are small enough to read together:
/// many small files cost a round trip to the disk thread each, read one by one.
fn small_run(lane: &[BlockRef]) -> usize {
    let mut bytes = 0u64;
    lane.iter()
        .take(BATCH_BLOCKS)
        .take_while(|b| {
            bytes += b.len as u64;
            (b.len as usize) < crate::store::disk::PLAIN_MAX && bytes <= BATCH_BYTES
        })
        .count()
}

/// Reads a lane's blocks from its files, small ones in batches, into `tx`.
async fn read_lane(
    lane: Vec<BlockRef>,
    files: &[SourceFile],
    watch: &SourceWatch,
    disk: &Disk,
    flow: &Flow,
    tx: mpsc::Sender<Result<(BlockRef, Bytes), TransferError>>,
) {
    let mut rest = &lane[..];
    while !rest.is_empty() {
        let n = small_run(rest).max(1);
        let group = &rest[..n];
        rest = &rest[n..];
        let results = match n {
            1 => vec![watch.read(disk, &files[group[0].file as usize], &group[0], flow).await],
            _ => watch.read_many(disk, files, group, flow).await,
        };
        for (b, r) in group.iter().zip(results) {
            if tx.send(r.map(|d| (*b, d))).await.is_err() {
                return;
            }
        }
    }
}

/// Sends one lane: reads run ahead of the network by a few blocks.
async fn send_lane(
    mut stream: quinn::SendStream,
    lane: Vec<BlockRef>,
    ctx: LaneCtx,
) -> Result<(u64, u64), TransferError> {
    stream
        .write_all(&data_stream_header(ctx.job))
        .await
        .map_err(write_error)?;
    let (tx, mut rx) = mpsc::channel::<Result<(BlockRef, Bytes), TransferError>>(4);
    let (disk, sources, watch, flow) = (
        ctx.disk.clone(),
        ctx.sources.clone(),
        ctx.watch.clone(),
        ctx.flow.clone(),
    );
    let reader = tokio::spawn(async move {
        match &*sources {
            Blocks::Files(files) => read_lane(lane, files, &watch, &disk, &flow, tx).await,
            Blocks::Relayed(tap) => {
                while let Some(r) = tap.next(&disk).await.transpose() {
                    if tx.send(r).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let (mut blocks, mut bytes) = (0u64, 0u64);
    let mut chunks = Vec::with_capacity(2 * BATCH_BLOCKS);
    let mut spent = false;
    while let Some(item) = rx.recv().await {
        // Blocks read already go out together, in one write to the stream.
        let mut batch = vec![item?];
        let mut size = batch[0].0.len as u64;
        while batch.len() < BATCH_BLOCKS && size < BATCH_BYTES {
            let Ok(item) = rx.try_recv() else { break };
            let item = item?;
            size += item.0.len as u64;
            batch.push(item);
        }
        let mut sent = 0u64;
        for (b, data) in batch {
            if !take_budget(&ctx.budget) {
                spent = true;
                break;
            }
            ctx.flow.pace(b.len as u64).await;
            let head = BlockHeader {
                file: b.file,
                block: b.block,
                len: b.len,
            };
            chunks.push(Bytes::copy_from_slice(&head.encode()));
            chunks.push(ctx.flow.on_wire(b.file, b.block, data));
            blocks += 1;
            sent += b.len as u64;
        }
        stream.write_all_chunks(&mut chunks).await.map_err(write_error)?;
        chunks.clear();
        bytes += sent;
        ctx.flow.sent(sent);
        if spent {
            break;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(lens: &[u32]) -> Vec<BlockRef> {
        let at = |(i, len): (usize, &u32)| BlockRef {
            file: i as u32,
            block: 0,
            offset: 0,
            len: *len,
        };
        lens.iter().enumerate().map(at).collect()
    }

    #[test]
    fn small_blocks_are_read_in_batches_bounded_in_count_and_bytes() {
        assert_eq!(small_run(&blocks(&[4096; 40])), BATCH_BLOCKS);
        assert_eq!(
            small_run(&blocks(&[4096, 4096, 1 << 20, 4096])),
            2,
            "a whole block ends a run"
        );
        assert_eq!(small_run(&blocks(&[1 << 20])), 0, "read alone");
        assert_eq!(small_run(&blocks(&[200 << 10, 200 << 10])), 1, "bytes bound the batch");
        assert_eq!(small_run(&[]), 0);
    }
}
