//! A seeded, deterministic simulation of the job protocol, in the manner of
//! FoundationDB's: one `u64` decides the job, every latency and every fault, so any
//! failure replays exactly from its seed.
//!
//! Why: the job protocol's promises (nothing partial or unverified ever becomes visible,
//! a sender told "committed" is right, a job sent again resumes and completes) hinge on
//! the order of many events that tests over real sockets only hit by luck: a message
//! lost just before the commit, a restart between a block's write and its sync, a hook
//! that fails after the seal. The state machines of `barge::proto::session` take no I/O,
//! so here they run over an in-memory network and an in-memory disk with simulated time,
//! driven the way the real drivers drive them, while faults are injected at random
//! points. After a few faulty attempts the faults stop and the job is sent once more:
//! that re-send must commit and send only what the receiver did not already hold.
//!
//! Shared by `tests/sim.rs` (a few thousand seeds, replay, self-checks) and
//! `benches/sim.rs` (100,000 seeds in release); each uses part of it.
#![allow(dead_code)]

use barge::proto::blocks::{block_count, FileHashes, BLOCK_SIZE};
use barge::proto::job::{ReceiveJob, SendPlan};
use barge::proto::session::{HookEnd, Receiver, RecvAction, SendAction, SendEnd, Sender};
use barge::proto::wire::{code, Message, Offer, OfferFile, Refusal};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// How long a receiver waits for data before it gives a job up (the agent's `stall`).
const STALL: Duration = Duration::from_secs(60);
/// A message lost on a reliable stream means the connection is dead: QUIC notices
/// after its idle timeout.
const IDLE: Duration = Duration::from_secs(30);
/// Simulated bandwidth of one data stream, bytes per second.
const BANDWIDTH: u64 = 1 << 30;

/// splitmix64: small, fast, and the same on every platform, so a seed means one run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64) < p * (1u64 << 53) as f64
    }

    /// A duration uniform in `lo..=hi` microseconds.
    fn micros(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_micros(self.range(lo, hi))
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let w = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

/// Every kind of fault the simulation injects, and (for counting) the losses a restart
/// causes to what was staged but not synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    MsgDrop,
    MsgDelay,
    MsgReorder,
    MsgDuplicate,
    MsgTruncate,
    MsgCorrupt,
    BlockDrop,
    BlockDelay,
    BlockReorder,
    BlockDuplicate,
    BlockTruncate,
    BlockCorrupt,
    Cut,
    RestartReceiver,
    RestartSender,
    LostOnRestart,
    TornOnRestart,
    WriteFail,
    DiskFull,
    SlowDisk,
    SealFail,
    HookFail,
    Stall,
    LaneReset,
    SourceChanged,
    Reject,
}

impl Fault {
    pub const ALL: [Fault; 26] = [
        Fault::MsgDrop,
        Fault::MsgDelay,
        Fault::MsgReorder,
        Fault::MsgDuplicate,
        Fault::MsgTruncate,
        Fault::MsgCorrupt,
        Fault::BlockDrop,
        Fault::BlockDelay,
        Fault::BlockReorder,
        Fault::BlockDuplicate,
        Fault::BlockTruncate,
        Fault::BlockCorrupt,
        Fault::Cut,
        Fault::RestartReceiver,
        Fault::RestartSender,
        Fault::LostOnRestart,
        Fault::TornOnRestart,
        Fault::WriteFail,
        Fault::DiskFull,
        Fault::SlowDisk,
        Fault::SealFail,
        Fault::HookFail,
        Fault::Stall,
        Fault::LaneReset,
        Fault::SourceChanged,
        Fault::Reject,
    ];
    const MSG: [Fault; 6] = [
        Fault::MsgDrop,
        Fault::MsgDelay,
        Fault::MsgReorder,
        Fault::MsgDuplicate,
        Fault::MsgTruncate,
        Fault::MsgCorrupt,
    ];
    const BLOCK: [Fault; 6] = [
        Fault::BlockDrop,
        Fault::BlockDelay,
        Fault::BlockReorder,
        Fault::BlockDuplicate,
        Fault::BlockTruncate,
        Fault::BlockCorrupt,
    ];
    const DISK: [Fault; 3] = [Fault::WriteFail, Fault::DiskFull, Fault::SlowDisk];
}

/// How often each fault kind was injected (indexed like [`Fault::ALL`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(pub [u64; Fault::ALL.len()]);

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    pub fn get(&self, f: Fault) -> u64 {
        self.0[f as usize]
    }

    fn bump(&mut self, f: Fault) {
        self.0[f as usize] += 1;
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, kind) in Fault::ALL.iter().enumerate() {
            let sep = if i % 6 == 5 { "\n" } else { "  " };
            write!(f, "{:<16}{:>8}{sep}", format!("{kind:?}"), self.0[i])?;
        }
        Ok(())
    }
}

/// A receiver deliberately broken, to show that the invariants can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    None,
    /// The first block written is reported written but never reaches the disk: the
    /// job commits with a block missing.
    LoseWrite,
    /// The resume scan trusts every staged block without verifying it.
    TrustStaged,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bug: Bug,
    /// Events one seed may take before it counts as a livelock.
    pub max_events: u64,
    /// Print every event (for a replay).
    pub trace: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            bug: Bug::None,
            max_events: 100_000,
            trace: false,
        }
    }
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub invariant: &'static str,
    pub detail: String,
}

fn broken(invariant: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        invariant,
        detail: detail.into(),
    }
}

/// Things seen that break no invariant but are worth a count.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub attempts: u64,
    pub blocks_sent: u64,
    pub confirmed: u64,
    /// The receiver told its sender "failed" (a stray message or a lost connection
    /// while sealing or hooking) and the hook under way then committed the job.
    pub failed_then_committed: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.attempts += o.attempts;
        self.blocks_sent += o.blocks_sent;
        self.confirmed += o.confirmed;
        self.failed_then_committed += o.failed_then_committed;
    }
}

/// The outcome of one seed.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub failure: Option<Failure>,
    pub faults: Counts,
    pub stats: Stats,
    pub events: u64,
}

impl Report {
    /// What a failing seed prints: the seed, the invariant, and how to replay it.
    pub fn describe(&self) -> String {
        let Some(f) = &self.failure else {
            return format!("seed {}: ok", self.seed);
        };
        format!(
            "seed {} broke \"{}\": {}\n  replay: SIM_SEED={} cargo test --test sim replay -- --nocapture",
            self.seed, f.invariant, f.detail, self.seed
        )
    }
}

/// Runs one seed; a panic is that seed's failure.
pub fn run(seed: u64, cfg: &Config) -> Report {
    let mut world = None;
    let out = catch_unwind(AssertUnwindSafe(|| {
        let w = world.insert(World::new(seed, cfg.clone()));
        w.run()
    }));
    let failure = match out {
        Ok(r) => r.err(),
        Err(p) => Some(broken("no panic", panic_text(&p))),
    };
    let (faults, stats, events) = match world {
        Some(w) => (w.faults, w.stats, w.events),
        None => Default::default(),
    };
    Report {
        seed,
        failure,
        faults,
        stats,
        events,
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// The files a job sends, and the offer made of them.
struct Source {
    offer: Offer,
    data: Vec<Vec<u8>>,
}

impl Source {
    /// 1 to 6 files, mostly small, now and then one to three full blocks and a tail.
    fn generate(rng: &mut Rng) -> Source {
        let n = rng.range(1, 6) as usize;
        let mut data = Vec::with_capacity(n);
        let mut files = Vec::with_capacity(n);
        for i in 0..n {
            let mut bytes = vec![0u8; file_size(rng) as usize];
            rng.fill(&mut bytes);
            let hashes = FileHashes::from_reader(&bytes[..], bytes.len() as u64).expect("hashing memory");
            // Folders start with "d" and files with "f", so no name is both.
            let dir = match rng.below(3) {
                0 => format!("d{}/", rng.below(3)),
                _ => String::new(),
            };
            files.push(OfferFile {
                path: format!("{dir}f{i}-{:x}.sst", rng.below(1 << 16)),
                hashes,
                keys: None,
                mode: 0o644,
            });
            data.push(bytes);
        }
        let offer = Offer {
            target: "t".into(),
            files,
            meta: vec![("seed".into(), format!("{:x}", rng.next_u64()))],
            tcp_lane: false,
            hold: false,
            relay: vec![],
        };
        Source { offer, data }
    }

    fn block(&self, file: u32, block: u32) -> &[u8] {
        let d = &self.data[file as usize];
        let start = block as usize * BLOCK_SIZE as usize;
        &d[start..(start + BLOCK_SIZE as usize).min(d.len())]
    }

    fn blocks(&self) -> BTreeSet<(u32, u32)> {
        let mut all = BTreeSet::new();
        for (i, f) in self.offer.files.iter().enumerate() {
            all.extend((0..block_count(f.hashes.size) as u32).map(|b| (i as u32, b)));
        }
        all
    }
}

fn file_size(rng: &mut Rng) -> u64 {
    match rng.below(100) {
        0..=9 => 0,
        10..=69 => rng.range(1, 4096),
        70..=96 => rng.range(4097, 64 << 10),
        _ => rng.range(1, 3) * BLOCK_SIZE + rng.below(4097),
    }
}

/// A length with a short `Debug`, so a trace does not print megabytes.
#[derive(Clone)]
struct Bytes(Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.0.len())
    }
}

/// A control message as the reader got it: decoded, or why not.
#[derive(Clone)]
struct Ctl(Result<Message, String>);

impl std::fmt::Debug for Ctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Ok(m) => write!(f, "{}", m.kind()),
            Err(e) => write!(f, "undecodable ({e})"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum WriteResult {
    Ok,
    /// Failed with `code` after the first `prefix` bytes reached the file.
    Fail {
        code: u16,
        prefix: usize,
    },
}

#[derive(Debug)]
enum Ev {
    /// The sender starts an attempt on a new connection.
    Start,
    ToRecv {
        conn: u32,
        msg: Ctl,
    },
    ToSend {
        conn: u32,
        msg: Ctl,
    },
    Block {
        conn: u32,
        lane: usize,
        file: u32,
        block: u32,
        data: Bytes,
    },
    LaneEnd {
        conn: u32,
        lane: usize,
    },
    LaneReset {
        conn: u32,
        lane: usize,
    },
    /// The sender learns that a lane was delivered.
    LaneAcked {
        conn: u32,
    },
    /// The sender learns that the receiver stopped reading a lane.
    LaneStopped {
        conn: u32,
    },
    /// The sender's own lane failed (`abort`: its source changed).
    LaneFail {
        conn: u32,
        abort: bool,
    },
    /// The connection is lost (`fault`: by a fault, not closed by the sender).
    Cut {
        conn: u32,
        fault: bool,
    },
    Write {
        epoch: u32,
        rid: u32,
        lane: usize,
        file: u32,
        block: u32,
        data: Bytes,
        result: WriteResult,
    },
    Sealed {
        epoch: u32,
        rid: u32,
        ok: bool,
    },
    Hooked {
        epoch: u32,
        rid: u32,
        ok: bool,
    },
    SendTimer {
        conn: u32,
    },
    RecvTimer {
        rid: u32,
    },
    RestartReceiver {
        attempt: u32,
    },
    RestartSender {
        conn: u32,
    },
}

struct Scheduled {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    /// Reversed: the heap pops the earliest event, ties in the order scheduled.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// A connection: whether it is up, and when the last message each way arrives (a
/// control stream is ordered).
struct Conn {
    alive: bool,
    /// The receiving agent restarted: nothing reaches it on this connection any more,
    /// though the sender learns so only when the cut reaches it.
    receiver_gone: bool,
    /// An offer on it was answered: a control stream carries one job, so the agent
    /// reads nothing more on it once that job ends.
    opened: bool,
    last: [Duration; 2],
}

/// The sender of the current attempt and its driver's state.
struct SendSide {
    conn: u32,
    m: Sender,
    lanes_left: usize,
    lane_failed: bool,
    timer: Option<Instant>,
}

/// A data stream as the receiving driver sees it.
#[derive(Default)]
struct Stream {
    writes: u32,
    ended: bool,
    stopped: bool,
    done: bool,
}

/// The receiver of the job now running at the agent, and its driver's state.
struct Live {
    rid: u32,
    conn: u32,
    m: Receiver,
    streams: HashMap<usize, Stream>,
    timer: Option<Instant>,
    /// The hook runs: the job keeps its slot until it ends, whatever the machine says.
    hooking: bool,
    told_failed: bool,
}

/// A staged block: its bytes, and whether a sync made them durable.
struct Staged {
    data: Vec<u8>,
    synced: bool,
}

/// The receiving agent: a disk that survives restarts (staging, target, outcomes) and
/// a process that does not (the live job, a waiting offer).
struct Agent {
    epoch: u32,
    staging: BTreeMap<(u32, u32), Staged>,
    target: BTreeMap<String, Vec<u8>>,
    outcome: Option<String>,
    commits: u32,
    live: Option<Live>,
    pending: Option<(u32, Offer)>,
    next_rid: u32,
    lost_one: bool,
}

struct World {
    cfg: Config,
    rng: Rng,
    src: Source,
    base: Instant,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    events: u64,
    faults: Counts,
    stats: Stats,
    /// Chance of a fault at each message, block or write, in a faulty attempt.
    rate: f64,
    /// Which fault kinds this seed injects (bit per [`Fault`]).
    enabled: u32,
    attempt: u32,
    /// Attempts with faults; the one after them runs clean and must commit.
    fault_attempts: u32,
    conns: BTreeMap<u32, Conn>,
    snd: Option<SendSide>,
    agent: Agent,
    told_committed: bool,
    /// Connections whose sender was told the job failed.
    told_failed: BTreeSet<u32>,
    /// The connection whose receiver's hook committed the job.
    committed_on: Option<u32>,
    /// Why each receiver told its sender "failed" (by connection).
    failed_why: HashMap<u32, String>,
    /// Blocks the clean re-send must send: those not staged and verifying when its
    /// offer arrived.
    final_expect: Option<BTreeSet<(u32, u32)>>,
    final_end: Option<SendEnd>,
}

impl World {
    fn new(seed: u64, cfg: Config) -> World {
        let mut rng = Rng::new(seed);
        let src = Source::generate(&mut rng);
        let rate = [0.02, 0.05, 0.1, 0.2][rng.below(4) as usize];
        let enabled = (rng.next_u64() | rng.next_u64()) as u32;
        let fault_attempts = rng.below(5) as u32;
        World {
            cfg,
            rng,
            src,
            base: Instant::now(),
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            events: 0,
            faults: Counts::default(),
            stats: Stats::default(),
            rate,
            enabled,
            attempt: 0,
            fault_attempts,
            conns: BTreeMap::new(),
            snd: None,
            agent: Agent {
                epoch: 0,
                staging: BTreeMap::new(),
                target: BTreeMap::new(),
                outcome: None,
                commits: 0,
                live: None,
                pending: None,
                next_rid: 0,
                lost_one: false,
            },
            told_committed: false,
            told_failed: BTreeSet::new(),
            committed_on: None,
            failed_why: HashMap::new(),
            final_expect: None,
            final_end: None,
        }
    }

    fn run(&mut self) -> Result<(), Failure> {
        self.schedule(Duration::ZERO, Ev::Start);
        while self.final_end.is_none() {
            let Some(s) = self.queue.pop() else {
                return Err(broken(
                    "no deadlock",
                    "nothing left to happen, and the re-send has not ended",
                ));
            };
            self.events += 1;
            if self.events > self.cfg.max_events {
                let why = format!("{} events without the re-send ending", self.cfg.max_events);
                return Err(broken("no livelock", why));
            }
            self.now = s.at;
            if self.cfg.trace {
                eprintln!("{:>12.6}s {:?}", s.at.as_secs_f64(), s.ev);
            }
            self.handle(s.ev)?;
            self.check()?;
        }
        self.check_end()
    }

    fn at(&self) -> Instant {
        self.base + self.now
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at: self.now + after,
            seq: self.seq,
            ev,
        });
    }

    fn schedule_at(&mut self, at: Instant, ev: Ev) {
        let after = at.saturating_duration_since(self.at());
        self.schedule(after, ev);
    }

    fn faulty(&self) -> bool {
        self.attempt <= self.fault_attempts
    }

    fn is_final(&self) -> bool {
        self.is_final_conn(self.attempt)
    }

    /// Whether `conn` is the clean re-send's (each attempt has its own connection).
    fn is_final_conn(&self, conn: u32) -> bool {
        conn == self.fault_attempts + 1
    }

    fn enabled(&self, f: Fault) -> bool {
        self.enabled & (1 << f as u32) != 0
    }

    /// Whether fault `f` strikes now (with chance `p`), counting it if so.
    fn strikes(&mut self, f: Fault, p: f64) -> bool {
        let hit = self.may(f, p);
        if hit {
            self.faults.bump(f);
        }
        hit
    }

    /// Whether fault `f` is to strike later (with chance `p`); it counts when it does.
    fn may(&mut self, f: Fault, p: f64) -> bool {
        self.faulty() && self.enabled(f) && self.rng.chance(p)
    }

    /// At the seed's rate, one enabled fault of `kinds`, counted.
    fn pick(&mut self, kinds: &[Fault]) -> Option<Fault> {
        if !self.faulty() || !self.rng.chance(self.rate) {
            return None;
        }
        let f = kinds[self.rng.below(kinds.len() as u64) as usize];
        if !self.enabled(f) {
            return None;
        }
        self.faults.bump(f);
        Some(f)
    }

    fn handle(&mut self, ev: Ev) -> Result<(), Failure> {
        match ev {
            Ev::Start => self.start(),
            Ev::ToRecv { conn, msg } => self.at_receiver(conn, msg.0),
            Ev::ToSend { conn, msg } => self.at_sender(conn, msg.0),
            Ev::Block {
                conn,
                lane,
                file,
                block,
                data,
            } => self.block_in(conn, lane, file, block, data.0),
            Ev::LaneEnd { conn, lane } => self.lane_end(conn, lane),
            Ev::LaneReset { conn, lane } => self.lane_reset(conn, lane),
            Ev::LaneAcked { conn } => self.lane_acked(conn),
            Ev::LaneStopped { conn } => self.lane_failed(conn, false),
            Ev::LaneFail { conn, abort } => self.lane_failed(conn, abort),
            Ev::Cut { conn, fault } => self.cut(conn, fault),
            Ev::Write {
                epoch,
                rid,
                lane,
                file,
                block,
                data,
                result,
            } => {
                if epoch == self.agent.epoch {
                    self.store(file, block, data.0, result);
                    self.written(rid, lane, file, block, result)?;
                }
                Ok(())
            }
            Ev::Sealed { epoch, rid, ok } => self.sealed(epoch, rid, ok),
            Ev::Hooked { epoch, rid, ok } => self.hooked(epoch, rid, ok),
            Ev::SendTimer { conn } => self.send_timer(conn),
            Ev::RecvTimer { rid } => self.with_live(rid, |_| {}),
            Ev::RestartReceiver { attempt } => {
                if attempt == self.attempt && self.faulty() {
                    self.restart_receiver();
                }
                Ok(())
            }
            Ev::RestartSender { conn } => self.restart_sender(conn),
        }
    }

    // ---- the sender and its driver -------------------------------------------------

    fn start(&mut self) -> Result<(), Failure> {
        self.attempt += 1;
        self.stats.attempts += 1;
        let conn = self.attempt;
        self.conns.insert(
            conn,
            Conn {
                alive: true,
                receiver_gone: false,
                opened: false,
                last: [self.now; 2],
            },
        );
        let lanes = self.rng.range(1, 4) as usize;
        self.snd = Some(SendSide {
            conn,
            m: Sender::new(self.src.offer.clone(), lanes),
            lanes_left: 0,
            lane_failed: false,
            timer: None,
        });
        self.attempt_faults(conn);
        self.drive_sender()
    }

    /// Faults that strike an attempt once, at a random time: a cut, a restart.
    fn attempt_faults(&mut self, conn: u32) {
        let attempt = self.attempt;
        // Most attempts of a small job are over within a few milliseconds.
        let when = |rng: &mut Rng| match rng.chance(0.8) {
            true => rng.micros(0, 25_000),
            false => rng.micros(0, 5_000_000),
        };
        if self.may(Fault::Cut, 0.3) {
            let t = when(&mut self.rng);
            self.schedule(t, Ev::Cut { conn, fault: true });
        }
        if self.may(Fault::RestartReceiver, 0.3) {
            let t = when(&mut self.rng);
            self.schedule(t, Ev::RestartReceiver { attempt });
        }
        if self.may(Fault::RestartSender, 0.2) {
            let t = when(&mut self.rng);
            self.schedule(t, Ev::RestartSender { conn });
        }
    }

    /// The sender of `conn`, if it is the current one and still running.
    fn sender(&mut self, conn: u32) -> Option<&mut SendSide> {
        self.snd.as_mut().filter(|s| s.conn == conn && !s.m.is_done())
    }

    fn drive_sender(&mut self) -> Result<(), Failure> {
        while let Some(s) = self.snd.as_mut() {
            let conn = s.conn;
            let Some(act) = s.m.poll_action() else {
                break;
            };
            match act {
                SendAction::Send(msg) => self.transmit(true, conn, msg)?,
                SendAction::Lanes { plan, .. } => self.send_lanes(conn, plan)?,
                SendAction::Finish(end) => self.sender_finished(conn, end)?,
            }
        }
        if let Some(s) = self.snd.as_mut() {
            let (conn, t) = (s.conn, s.m.poll_timeout());
            if let Some(at) = t.filter(|_| t != s.timer) {
                s.timer = t;
                self.schedule_at(at, Ev::SendTimer { conn });
            }
        }
        Ok(())
    }

    fn send_timer(&mut self, conn: u32) -> Result<(), Failure> {
        let now = self.at();
        if let Some(s) = self.sender(conn) {
            s.m.handle_timeout(now);
            s.timer = None;
        }
        self.drive_sender()
    }

    fn at_sender(&mut self, conn: u32, msg: Result<Message, String>) -> Result<(), Failure> {
        if !self.conns[&conn].alive {
            return Ok(());
        }
        let Some(s) = self.sender(conn) else {
            return Ok(());
        };
        match msg {
            Ok(m) => s.m.handle_message(m),
            Err(_) => s.m.handle_end(),
        }
        self.drive_sender()
    }

    fn sender_finished(&mut self, conn: u32, end: SendEnd) -> Result<(), Failure> {
        if let SendEnd::Committed(_) = end {
            self.told_committed = true;
            if self.agent.outcome.is_none() {
                return Err(broken(
                    "told committed means committed",
                    format!("attempt {} heard committed; the receiver has no outcome", self.attempt),
                ));
            }
        }
        if let SendEnd::Failed(r) = &end {
            self.told_failed.insert(conn);
            self.answer_holds()?;
            let _ = r;
        }
        let lat = self.rng.micros(500, 3000);
        self.schedule(lat, Ev::Cut { conn, fault: false });
        if self.is_final() {
            self.final_end = Some(end);
        } else {
            let backoff = self.rng.micros(100_000, 3_000_000);
            self.schedule(backoff, Ev::Start);
        }
        Ok(())
    }

    fn restart_sender(&mut self, conn: u32) -> Result<(), Failure> {
        if self.sender(conn).is_none() || !self.faulty() {
            return Ok(());
        }
        self.faults.bump(Fault::RestartSender);
        self.snd = None;
        let lat = self.rng.micros(500, 3000);
        self.schedule(lat, Ev::Cut { conn, fault: false });
        let backoff = self.rng.micros(10_000, 2_000_000);
        self.schedule(backoff, Ev::Start);
        Ok(())
    }

    /// Schedules every lane's blocks, in order on its stream, with the faults that
    /// strike them; a lane that ends well is acknowledged to the sender.
    fn send_lanes(&mut self, conn: u32, plan: SendPlan) -> Result<(), Failure> {
        if self.is_final() {
            self.check_plan(&plan)?;
        }
        let lanes = plan.lanes.len();
        if let Some(s) = self.sender(conn) {
            s.lanes_left = lanes;
            if lanes == 0 {
                s.m.lanes_done();
            }
        }
        for (lane, blocks) in plan.lanes.into_iter().enumerate() {
            self.send_lane(conn, lane, blocks);
        }
        Ok(())
    }

    fn send_lane(&mut self, conn: u32, lane: usize, mut blocks: Vec<barge::proto::job::BlockRef>) {
        if blocks.len() > 1 && self.pick(&[Fault::BlockReorder]).is_some() {
            let (i, j) = (self.rng.below(blocks.len() as u64), self.rng.below(blocks.len() as u64));
            blocks.swap(i as usize, j as usize);
        }
        let mut sent = self.now;
        let mut last = self.now;
        for b in blocks {
            sent += Duration::from_nanos(b.len as u64 * 1_000_000_000 / BANDWIDTH);
            if self.strikes(Fault::Stall, 0.01) {
                sent += self.rng.micros(61_000_000, 150_000_000);
            }
            if let Some(abort) = self.lane_breaks() {
                let at = sent - self.now;
                self.schedule(at, Ev::LaneFail { conn, abort });
                let lat = self.rng.micros(500, 3000);
                self.schedule(at + lat, Ev::LaneReset { conn, lane });
                return;
            }
            self.stats.blocks_sent += 1;
            last = self.send_block(conn, lane, b, sent, last);
        }
        let (end, lat) = (last + Duration::from_nanos(1) - self.now, self.rng.micros(500, 3000));
        self.schedule(end, Ev::LaneEnd { conn, lane });
        self.schedule(end + lat, Ev::LaneAcked { conn });
    }

    /// A lane that fails here: `Some(true)` if its source changed (the sender aborts).
    fn lane_breaks(&mut self) -> Option<bool> {
        if self.strikes(Fault::LaneReset, 0.01) {
            return Some(false);
        }
        self.strikes(Fault::SourceChanged, 0.01).then_some(true)
    }

    /// One block sent at `sent` on a stream whose last delivery so far is at `last`;
    /// returns the stream's last delivery after it.
    fn send_block(
        &mut self,
        conn: u32,
        lane: usize,
        b: barge::proto::job::BlockRef,
        sent: Duration,
        last: Duration,
    ) -> Duration {
        let mut data = self.src.block(b.file, b.block).to_vec();
        let mut at = sent + self.rng.micros(500, 3000);
        let mut copies = 1;
        match self.pick(&Fault::BLOCK) {
            Some(Fault::BlockDrop) => return last,
            Some(Fault::BlockDelay) => at += self.rng.micros(100_000, 20_000_000),
            Some(Fault::BlockDuplicate) => copies = 2,
            Some(Fault::BlockTruncate) => data.truncate(self.rng.below(data.len() as u64) as usize),
            Some(Fault::BlockCorrupt) => {
                let i = self.rng.below(data.len() as u64) as usize;
                data[i] ^= 1 << self.rng.below(8);
            }
            _ => {}
        }
        let at = at.max(last + Duration::from_nanos(1));
        let late = self.rng.micros(1000, 100_000);
        for copy in 0..copies {
            let ev = Ev::Block {
                conn,
                lane,
                file: b.file,
                block: b.block,
                data: Bytes(data.clone()),
            };
            // A duplicate comes late, as a stale retransmission would.
            let at = if copy > 0 { at + late } else { at };
            self.schedule(at - self.now, ev);
        }
        at
    }

    fn lane_acked(&mut self, conn: u32) -> Result<(), Failure> {
        if let Some(s) = self.sender(conn).filter(|s| !s.lane_failed) {
            s.lanes_left -= 1;
            if s.lanes_left == 0 {
                s.m.lanes_done();
            }
        }
        self.drive_sender()
    }

    /// A lane failed. Once every lane was acknowledged there is nothing left to fail:
    /// a late stop from the receiver finds the streams finished.
    fn lane_failed(&mut self, conn: u32, abort: bool) -> Result<(), Failure> {
        let now = self.at();
        if let Some(s) = self.sender(conn).filter(|s| !s.lane_failed && s.lanes_left > 0) {
            s.lane_failed = true;
            s.m.lanes_failed(abort, now);
        }
        self.drive_sender()
    }

    // ---- the network ---------------------------------------------------------------

    /// Sends a control message (to the receiver if `to_recv`), through the faults.
    fn transmit(&mut self, to_recv: bool, conn: u32, msg: Message) -> Result<(), Failure> {
        let frame = msg.encode().unwrap();
        match Message::decode(&frame[4..]) {
            Ok(m) if m == msg => {}
            other => {
                return Err(broken(
                    "wire round trip",
                    format!("{} came back as {other:?}", msg.kind()),
                ))
            }
        }
        let lat = self.rng.micros(500, 3000);
        let fault = self.pick(&Fault::MSG);
        let extra = self.rng.micros(1_000_000, 20_000_000);
        let soon = self.rng.micros(5_000, 100_000);
        let cut_at = self.rng.below(frame.len() as u64 - 4) as usize;
        let dir = to_recv as usize;
        let Some(c) = self.conns.get_mut(&conn) else {
            return Ok(());
        };
        let mut at = (self.now + lat).max(c.last[dir] + Duration::from_nanos(1));
        let mut msg = Ok(msg);
        let mut copies = 1;
        match fault {
            Some(Fault::MsgDrop) => {
                self.schedule(IDLE, Ev::Cut { conn, fault: false });
                return Ok(());
            }
            Some(Fault::MsgDelay) => at += extra,
            Some(Fault::MsgReorder) => at = self.now + lat + soon,
            Some(Fault::MsgDuplicate) => copies = 2,
            Some(Fault::MsgTruncate) => msg = Err(truncated(&frame[4..4 + cut_at])),
            Some(Fault::MsgCorrupt) => msg = Err("corrupt frame".into()),
            _ => {}
        }
        if fault != Some(Fault::MsgReorder) {
            c.last[dir] = at;
        }
        for copy in 0..copies {
            let ev = match to_recv {
                true => Ev::ToRecv {
                    conn,
                    msg: Ctl(msg.clone()),
                },
                false => Ev::ToSend {
                    conn,
                    msg: Ctl(msg.clone()),
                },
            };
            // A duplicate comes late, as a stale retransmission would.
            let late = if copy > 0 { soon } else { Duration::ZERO };
            self.schedule(at + late - self.now, ev);
        }
        Ok(())
    }

    /// The connection is lost, to both ends at once.
    fn cut(&mut self, conn: u32, fault: bool) -> Result<(), Failure> {
        let Some(c) = self.conns.get_mut(&conn).filter(|c| c.alive) else {
            return Ok(());
        };
        c.alive = false;
        if fault {
            self.faults.bump(Fault::Cut);
        }
        if let Some(s) = self.sender(conn) {
            s.m.handle_end();
        }
        self.drive_sender()?;
        if self.agent.pending.as_ref().is_some_and(|(c, _)| *c == conn) {
            self.agent.pending = None;
        }
        let rid = self.live_on(conn);
        self.with_live(rid, |l| l.m.connection_lost("connection lost"))
    }

    // ---- the receiving agent and its driver ----------------------------------------

    fn reaches_receiver(&self, conn: u32) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.alive && !c.receiver_gone)
    }

    /// The rid of the live job on `conn`, or one no job has.
    fn live_on(&self, conn: u32) -> u32 {
        match &self.agent.live {
            Some(l) if l.conn == conn => l.rid,
            _ => u32::MAX,
        }
    }

    /// Feeds the live job `rid` (after the time), then carries out what it asks.
    fn with_live(&mut self, rid: u32, f: impl FnOnce(&mut Live)) -> Result<(), Failure> {
        let now = self.at();
        if let Some(l) = self.agent.live.as_mut().filter(|l| l.rid == rid) {
            l.m.handle_timeout(now);
            f(l);
            self.drive_receiver()?;
        }
        Ok(())
    }

    fn at_receiver(&mut self, conn: u32, msg: Result<Message, String>) -> Result<(), Failure> {
        if !self.reaches_receiver(conn) {
            return Ok(());
        }
        let rid = self.live_on(conn);
        match msg {
            Ok(Message::Offer(o)) if rid == u32::MAX && !self.conns[&conn].opened => self.offered(conn, o),
            Ok(m) if rid != u32::MAX => self.with_live(rid, |l| l.m.handle_message(m)),
            Ok(_) => Ok(()),
            Err(_) => {
                // A frame that does not decode breaks the control stream: the driver
                // ends the job's side of it and drops the connection.
                let lat = self.rng.micros(500, 3000);
                self.schedule(lat, Ev::Cut { conn, fault: false });
                self.with_live(rid, |l| l.m.handle_end())
            }
        }
    }

    /// An offer on a new connection: a job still running for an earlier one is taken
    /// over and waited for; then the offer is answered.
    fn offered(&mut self, conn: u32, offer: Offer) -> Result<(), Failure> {
        if let Some(l) = &self.agent.live {
            let rid = l.rid;
            self.agent.pending = Some((conn, offer));
            return self.with_live(rid, |l| {
                l.m.take_over();
            });
        }
        self.open(conn, offer)
    }

    /// Answers an offer the way the agent does: confirmed if it committed before, else
    /// accepted after a resume scan, or rejected up front.
    fn open(&mut self, conn: u32, offer: Offer) -> Result<(), Failure> {
        if !self.reaches_receiver(conn) {
            return Ok(());
        }
        self.conns.get_mut(&conn).expect("reaches").opened = true;
        let job = ReceiveJob::new(offer).map_err(|e| broken("offer valid", e.to_string()))?;
        if self.strikes(Fault::Reject, 0.15) {
            let r = Refusal::new(code::BUSY, "busy").retry_after(1);
            return self.transmit(false, conn, Message::Reject(r));
        }
        let rid = self.agent.next_rid;
        self.agent.next_rid += 1;
        let m = match self.agent.outcome.clone() {
            Some(report) => {
                self.stats.confirmed += 1;
                self.agent.staging.clear();
                if self.is_final_conn(conn) {
                    self.final_expect = Some(BTreeSet::new());
                }
                Receiver::confirm(job, report, self.at())
            }
            None => self.resume(conn, job),
        };
        self.agent.live = Some(Live {
            rid,
            conn,
            m,
            streams: HashMap::new(),
            timer: None,
            hooking: false,
            told_failed: false,
        });
        self.drive_receiver()
    }

    /// Marks held exactly the staged blocks that verify against the offer, and accepts.
    fn resume(&mut self, conn: u32, mut job: ReceiveJob) -> Receiver {
        let mut expect = self.src.blocks();
        for (&(f, b), s) in &self.agent.staging {
            if !expect.contains(&(f, b)) {
                continue;
            }
            let ok = ReceiveJob::verify(&job.offer, f, b, &s.data).is_ok();
            if ok || self.cfg.bug == Bug::TrustStaged {
                job.record(f, b);
            }
            if ok {
                expect.remove(&(f, b));
            }
        }
        if self.is_final_conn(conn) {
            self.final_expect = Some(expect);
        }
        Receiver::accept(job, None, Some(STALL), self.at())
    }

    fn drive_receiver(&mut self) -> Result<(), Failure> {
        while let Some(l) = self.agent.live.as_mut() {
            let (rid, conn) = (l.rid, l.conn);
            let Some(act) = l.m.poll_action() else {
                break;
            };
            self.receiver_action(rid, conn, act)?;
        }
        self.arm_receiver_timer();
        self.release()
    }

    fn receiver_action(&mut self, rid: u32, conn: u32, act: RecvAction) -> Result<(), Failure> {
        let epoch = self.agent.epoch;
        match act {
            RecvAction::Send(msg) => {
                if let (Message::Failed(r), Some(l)) = (&msg, self.agent.live.as_mut()) {
                    l.told_failed = true;
                    self.failed_why.insert(conn, r.to_string());
                }
                return self.transmit(false, conn, msg);
            }
            RecvAction::Seal => {
                let ok = !self.strikes(Fault::SealFail, 0.2);
                let t = self.rng.micros(1000, 10_000);
                self.schedule(t, Ev::Sealed { epoch, rid, ok });
            }
            RecvAction::RunHook => {
                let ok = !self.strikes(Fault::HookFail, 0.2);
                let t = self.rng.micros(1000, 50_000);
                self.schedule(t, Ev::Hooked { epoch, rid, ok });
                if let Some(l) = self.agent.live.as_mut() {
                    l.hooking = true;
                }
            }
            RecvAction::RemoveStaging => self.agent.staging.clear(),
            RecvAction::Finish(_) => {}
        }
        Ok(())
    }

    fn arm_receiver_timer(&mut self) {
        let Some(l) = self.agent.live.as_mut() else {
            return;
        };
        let (rid, t) = (l.rid, l.m.poll_timeout());
        if let Some(at) = t.filter(|_| t != l.timer) {
            l.timer = t;
            self.schedule_at(at, Ev::RecvTimer { rid });
        }
    }

    /// A job whose machine is done and whose hook has ended gives up its slot; an offer
    /// that waited for it is answered.
    fn release(&mut self) -> Result<(), Failure> {
        match &self.agent.live {
            Some(l) if l.m.is_done() && !l.hooking => self.agent.live = None,
            _ => return Ok(()),
        }
        match self.agent.pending.take() {
            Some((conn, offer)) => self.open(conn, offer),
            None => Ok(()),
        }
    }

    /// A block arrived on a data stream: verified, then written (if the job takes it).
    fn block_in(&mut self, conn: u32, lane: usize, file: u32, block: u32, data: Vec<u8>) -> Result<(), Failure> {
        let rid = self.live_on(conn);
        if !self.reaches_receiver(conn) || rid == u32::MAX {
            return Ok(());
        }
        let offer = self.agent.live.as_ref().expect("live").m.job().offer.clone();
        let verified = ReceiveJob::verify(&offer, file, block, &data);
        let mut took = None;
        self.with_live(rid, |l| {
            let stream = l.streams.entry(lane).or_default();
            if stream.stopped {
                return;
            }
            let write = match verified {
                Err(e) => {
                    l.m.stream_failed(Refusal::new(code::BAD_BLOCK, e.to_string()));
                    false
                }
                Ok(_) => l.m.write_started(),
            };
            let stream = l.streams.entry(lane).or_default();
            stream.stopped = !write;
            stream.writes += write as u32;
            took = Some(write);
        })?;
        match took {
            Some(true) => {
                let (result, epoch) = (self.write_result(), self.agent.epoch);
                let lat = self.disk_latency(result);
                let data = Bytes(data);
                let ev = Ev::Write {
                    epoch,
                    rid,
                    lane,
                    file,
                    block,
                    data,
                    result,
                };
                self.schedule(lat, ev);
            }
            Some(false) => {
                // The receiver stops reading the stream; the sender's lane fails.
                let lat = self.rng.micros(500, 3000);
                self.schedule(lat, Ev::LaneStopped { conn });
            }
            None => {}
        }
        Ok(())
    }

    fn write_result(&mut self) -> WriteResult {
        match self.pick(&Fault::DISK) {
            Some(Fault::WriteFail) => WriteResult::Fail {
                code: code::IO,
                prefix: self.rng.below(BLOCK_SIZE) as usize,
            },
            Some(Fault::DiskFull) => WriteResult::Fail {
                code: code::NO_SPACE,
                prefix: self.rng.below(BLOCK_SIZE) as usize,
            },
            _ => WriteResult::Ok,
        }
    }

    fn disk_latency(&mut self, result: WriteResult) -> Duration {
        // A slow disk is drawn after the result, so it can strike a good write too.
        let slow = matches!(result, WriteResult::Ok) && self.strikes(Fault::SlowDisk, self.rate / 3.0);
        match slow {
            true => self.rng.micros(5_000_000, 45_000_000),
            false => self.rng.micros(50, 2000),
        }
    }

    /// What a write leaves on the disk: the block, or after a failure the part of it
    /// that got there (over nothing: the same bytes were verified either way).
    fn store(&mut self, file: u32, block: u32, data: Vec<u8>, result: WriteResult) {
        let staging = &mut self.agent.staging;
        match result {
            WriteResult::Ok if self.cfg.bug == Bug::LoseWrite && !self.agent.lost_one => self.agent.lost_one = true,
            WriteResult::Ok => {
                staging.insert((file, block), Staged { data, synced: false });
            }
            WriteResult::Fail { prefix, .. } => {
                let prefix = prefix.min(data.len());
                if prefix > 0 && !staging.contains_key(&(file, block)) {
                    let data = data[..prefix].to_vec();
                    staging.insert((file, block), Staged { data, synced: false });
                }
            }
        }
    }

    fn written(&mut self, rid: u32, lane: usize, file: u32, block: u32, result: WriteResult) -> Result<(), Failure> {
        let now = self.at();
        self.with_live(rid, |l| {
            match result {
                WriteResult::Ok => l.m.block_written(file, block, now),
                WriteResult::Fail { code, .. } => l.m.write_failed(Refusal::new(code, "write failed")),
            }
            let s = l.streams.entry(lane).or_default();
            s.writes -= 1;
            stream_maybe_done(l, lane);
        })
    }

    fn lane_end(&mut self, conn: u32, lane: usize) -> Result<(), Failure> {
        if !self.reaches_receiver(conn) {
            return Ok(());
        }
        let rid = self.live_on(conn);
        self.with_live(rid, |l| {
            l.streams.entry(lane).or_default().ended = true;
            stream_maybe_done(l, lane);
        })
    }

    fn lane_reset(&mut self, conn: u32, lane: usize) -> Result<(), Failure> {
        if !self.reaches_receiver(conn) {
            return Ok(());
        }
        let rid = self.live_on(conn);
        self.with_live(rid, |l| {
            let s = l.streams.entry(lane).or_default();
            if !s.stopped {
                s.stopped = true;
                l.m.stream_failed(Refusal::new(code::ABORTED, "data stream reset by the sender"));
            }
        })
    }

    fn sealed(&mut self, epoch: u32, rid: u32, ok: bool) -> Result<(), Failure> {
        let live = self.agent.live.as_ref().is_some_and(|l| l.rid == rid);
        if epoch != self.agent.epoch || !live {
            return Ok(());
        }
        if ok {
            self.agent.staging.values_mut().for_each(|s| s.synced = true);
        }
        self.with_live(rid, |l| match ok {
            true => l.m.sealed(Ok(())),
            false => l.m.sealed(Err(Refusal::new(code::IO, "sync failed"))),
        })
    }

    /// The hook ends: it commits (atomically: every file moves from staging to the
    /// target and the outcome is recorded) unless it fails, whatever became of the
    /// machine meanwhile; a restart before this point stopped it.
    fn hooked(&mut self, epoch: u32, rid: u32, ok: bool) -> Result<(), Failure> {
        if epoch != self.agent.epoch {
            return Ok(());
        }
        let report = format!("committed {} files", self.src.offer.files.len());
        if ok {
            self.commit(&report)?;
            self.committed_on = self.agent.live.as_ref().filter(|l| l.rid == rid).map(|l| l.conn);
            self.answer_holds()?;
        }
        if let Some(l) = self.agent.live.as_mut().filter(|l| l.rid == rid) {
            l.hooking = false;
            if ok && l.told_failed {
                self.stats.failed_then_committed += 1;
            }
        }
        self.with_live(rid, |l| match ok {
            true => l.m.hook_done(Ok(HookEnd::Committed(report))),
            false => l.m.hook_done(Err(Refusal::new(code::HOOK_FAILED, "hook failed"))),
        })?;
        self.release()
    }

    fn commit(&mut self, report: &str) -> Result<(), Failure> {
        let a = &mut self.agent;
        a.commits += 1;
        if a.commits > 1 {
            return Err(broken(
                "one committed version",
                "the hook committed the job a second time",
            ));
        }
        for (i, f) in self.src.offer.files.iter().enumerate() {
            let mut bytes = Vec::with_capacity(f.hashes.size as usize);
            for b in 0..block_count(f.hashes.size) as u32 {
                match a.staging.get(&(i as u32, b)) {
                    Some(s) => bytes.extend_from_slice(&s.data),
                    None => break,
                }
            }
            a.target.insert(f.path.clone(), bytes);
        }
        a.staging.clear();
        a.outcome = Some(report.to_string());
        self.check_target()
    }

    /// The agent dies and comes back: the disk keeps what was synced; what was not may
    /// be there, gone, or torn. Writes, seals and hooks under way stop.
    fn restart_receiver(&mut self) {
        self.faults.bump(Fault::RestartReceiver);
        self.agent.epoch += 1;
        self.agent.live = None;
        self.agent.pending = None;
        let mut gone = Vec::new();
        for (k, s) in self.agent.staging.iter_mut().filter(|(_, s)| !s.synced) {
            match self.rng.below(4) {
                0 => {
                    gone.push(*k);
                    self.faults.bump(Fault::LostOnRestart);
                }
                1 if !s.data.is_empty() => {
                    tear(&mut self.rng, &mut s.data);
                    self.faults.bump(Fault::TornOnRestart);
                }
                _ => {}
            }
        }
        for k in gone {
            self.agent.staging.remove(&k);
        }
        let conns: Vec<u32> = self.conns.iter().filter(|(_, c)| c.alive).map(|(k, _)| *k).collect();
        for conn in conns {
            self.conns.get_mut(&conn).expect("listed").receiver_gone = true;
            let lat = self.rng.micros(500, 3000);
            self.schedule(lat, Ev::Cut { conn, fault: false });
        }
    }

    // ---- invariants ----------------------------------------------------------------

    /// After every event: the target holds nothing or exactly the committed job, the
    /// outcome record agrees, and a sender told "committed" was told the truth.
    fn check(&self) -> Result<(), Failure> {
        let a = &self.agent;
        if a.target.is_empty() != a.outcome.is_none() {
            return Err(broken(
                "target and outcomes agree",
                format!("{} files visible, outcome {:?}", a.target.len(), a.outcome),
            ));
        }
        if !a.target.is_empty() && a.target.len() != self.src.offer.files.len() {
            return Err(broken(
                "no partial job visible",
                format!("{} files visible", a.target.len()),
            ));
        }
        if self.told_committed && a.outcome.is_none() {
            return Err(broken("told committed means committed", "the outcome is gone"));
        }
        Ok(())
    }

    /// A sender told "failed" was told the truth: the receiver that told it did not
    /// commit the job after all.
    fn answer_holds(&self) -> Result<(), Failure> {
        match self.committed_on {
            Some(c) if self.told_failed.contains(&c) => Err(broken(
                "told failed means not committed",
                format!(
                    "attempt {c}'s sender was told {:?}; that receiver's hook then committed the job",
                    self.failed_why.get(&c)
                ),
            )),
            _ => Ok(()),
        }
    }

    /// When the target changes: every file is the source's, byte for byte.
    fn check_target(&self) -> Result<(), Failure> {
        for (f, data) in self.src.offer.files.iter().zip(&self.src.data) {
            let got = self.agent.target.get(&f.path);
            if got != Some(data) {
                let root = got.map(|g| blake3::hash(g).to_hex().to_string());
                let detail = format!(
                    "{}: {} bytes, root {root:?}; the source has {} bytes, root {}",
                    f.path,
                    got.map_or(0, |g| g.len()),
                    data.len(),
                    blake3::hash(data).to_hex()
                );
                return Err(broken("committed files equal the source", detail));
            }
        }
        Ok(())
    }

    /// The clean re-send sends exactly the blocks the receiver did not hold verified.
    fn check_plan(&self, plan: &SendPlan) -> Result<(), Failure> {
        let Some(expect) = &self.final_expect else {
            return Err(broken(
                "re-send answered by its own offer",
                "lanes before the offer was answered",
            ));
        };
        let got: Vec<(u32, u32)> = plan.lanes.iter().flatten().map(|b| (b.file, b.block)).collect();
        let set: BTreeSet<_> = got.iter().copied().collect();
        if set.len() != got.len() || &set != expect {
            let detail = format!("sends {got:?}; the receiver lacked {expect:?}");
            return Err(broken("re-send sends only what is not held", detail));
        }
        Ok(())
    }

    /// After the clean re-send: committed, once, with the source's bytes.
    fn check_end(&self) -> Result<(), Failure> {
        match &self.final_end {
            Some(SendEnd::Committed(_)) => {}
            end => {
                let detail = format!("attempt {} ended {end:?}", self.attempt);
                return Err(broken("re-send without faults commits", detail));
            }
        }
        if self.agent.commits != 1 {
            return Err(broken(
                "one committed version",
                format!("{} commits", self.agent.commits),
            ));
        }
        self.check_target()
    }
}

fn stream_maybe_done(l: &mut Live, lane: usize) {
    let s = l.streams.entry(lane).or_default();
    if s.ended && s.writes == 0 && !s.stopped && !s.done {
        s.done = true;
        l.m.stream_done();
    }
}

/// Tears a block that was not synced: cut short, or a byte changed.
fn tear(rng: &mut Rng, data: &mut Vec<u8>) {
    if rng.chance(0.5) {
        data.truncate(rng.below(data.len() as u64) as usize);
    } else {
        let i = rng.below(data.len() as u64) as usize;
        data[i] = data[i].wrapping_add(1 + rng.below(255) as u8);
    }
}

fn truncated(body: &[u8]) -> String {
    match Message::decode(body) {
        Err(e) => e.to_string(),
        Ok(m) => format!("a truncated frame that decoded as {}", m.kind()),
    }
}

/// Runs seeds `start..start + n`, adding up fault counts and stats; returns the failing
/// reports.
pub fn run_many(start: u64, n: u64, cfg: &Config, faults: &mut Counts, stats: &mut Stats) -> Vec<Report> {
    let mut failed = Vec::new();
    for seed in start..start + n {
        let r = run(seed, cfg);
        faults.add(&r.faults);
        stats.add(&r.stats);
        if r.failure.is_some() {
            failed.push(r);
        }
    }
    failed
}
