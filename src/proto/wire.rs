//! Control messages and their byte encoding (protocol versions 1 to 3; the protocol
//! as a whole is described in the [`proto`](super) module docs).
//!
//! Every message is a frame: a big-endian `u32` body length, then the body: a version
//! byte, a type byte and the fields. Strings and lists are `u32`-counted. Decoding
//! checks every count against the limits before allocating, so a hostile peer can not
//! make the receiver allocate more than [`MAX_MESSAGE`] bytes per frame.

use super::blocks::{listed_blocks, Digest, FileHashes};
use super::keys::{Key, KeyRange, KeySpan};
use super::limits::*;

/// The newest protocol version: 3 added relays (an offer's next hops, and the
/// `Replicas` a relay reports back); 4 the encrypted TCP lane (a grant that says TLS).
/// A frame carries the oldest version that can say what it holds, so peers of version 2
/// still read every message of a job without a relay or a TLS lane.
pub const VERSION: u8 = 4;
/// The oldest version still read: 1 differs only in offers, which lacked file modes.
pub const OLDEST_VERSION: u8 = 1;
/// The mode of a file offered without one (by a version 1 peer).
pub const LEGACY_MODE: u32 = 0o644;
/// ALPN identifier of protocol v1.
pub const ALPN: &[u8] = b"barge/1";

/// Wire error codes carried by `Reject` and `Failed` (named, stable numbers).
pub mod code {
    /// The frame did not decode, or came where the protocol does not expect it.
    pub const BAD_MESSAGE: u16 = 1;
    /// No such target on the agent (reserved: agents answer [`NOT_ALLOWED`], which does not
    /// tell a stranger what exists).
    pub const UNKNOWN_TARGET: u16 = 2;
    /// The peer's identity may not use this target, job or command.
    pub const NOT_ALLOWED: u16 = 3;
    /// A file name is not a safe relative path, is listed twice, or would land outside the
    /// target.
    pub const BAD_NAME: u16 = 4;
    /// Over one of the protocol's limits (files, streams, sizes).
    pub const LIMIT: u16 = 5;
    /// The receiver's file system can not hold the job beside what it already admitted.
    pub const NO_SPACE: u16 = 6;
    /// A file of the job already exists in the target, with other content.
    pub const EXISTS: u16 = 7;
    /// The agent is at a limit of jobs or connections, or shutting down; try again after
    /// the refusal's `retry_after`.
    pub const BUSY: u16 = 8;
    /// A file's block chaining values do not merge into its root.
    pub const BAD_TREE: u16 = 9;
    /// A block did not match its chaining value.
    pub const BAD_BLOCK: u16 = 10;
    /// The sender committed before every block arrived.
    pub const INCOMPLETE: u16 = 11;
    /// The import hook failed; the job's files are not in the target.
    pub const HOOK_FAILED: u16 = 12;
    /// A disk or other local error on the agent.
    pub const IO: u16 = 13;
    /// No such held job, export or file.
    pub const NOT_FOUND: u16 = 14;
    /// The job was aborted (by its sender, or because the sender went away).
    pub const ABORTED: u16 = 15;
    /// A source file changed while it was sent (reserved: a sender stops on its own and
    /// aborts).
    pub const SOURCE_CHANGED: u16 = 16;
    /// The import target is held by another job (a bulk load).
    pub const HELD: u16 = 17;
    /// An export's file has keys on both sides of a range boundary.
    pub const NOT_ALIGNED: u16 = 18;
}

/// An error the peer is told about. Every error that reaches the wire implements it:
/// the protocol's own ([`super::job::JobError`], [`super::session::ProtocolError`],
/// [`WireError`]) below, the local ones (disk, sources, space, hooks) in
/// `transfer::codes`; nothing else picks a code for an error.
pub trait WireCode: std::fmt::Display {
    /// The wire code (see [`code`]).
    fn code(&self) -> u16;

    /// Seconds after which sending the job again is likely to work; 0: it will not help.
    fn retry_after(&self) -> u32 {
        0
    }

    /// How the peer is told: the code, the message cut to the wire's limit, the retry.
    fn refusal(&self) -> Refusal {
        Refusal::new(self.code(), self.to_string()).retry_after(self.retry_after())
    }
}

impl WireCode for WireError {
    fn code(&self) -> u16 {
        code::BAD_MESSAGE
    }
}

impl WireCode for super::session::ProtocolError {
    fn code(&self) -> u16 {
        code::BAD_MESSAGE
    }
}

impl WireCode for super::job::JobError {
    fn code(&self) -> u16 {
        use super::job::JobError;
        match self {
            JobError::BadName(_) | JobError::Duplicate(_) | JobError::FileIsFolder(_) => code::BAD_NAME,
            JobError::BadTree { .. } => code::BAD_TREE,
            JobError::BadBlock { .. } => code::BAD_BLOCK,
            JobError::UnknownFile(_) | JobError::BadAccept => code::BAD_MESSAGE,
            JobError::Incomplete { .. } => code::INCOMPLETE,
        }
    }
}

/// A job's identity: derived from its target and files, never trusted from the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct JobId(pub [u8; 16]);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for JobId {
    type Err = WireError;

    /// 32 hex digits, as [`JobId`] displays.
    fn from_str(s: &str) -> Result<JobId, WireError> {
        let bad = || WireError::BadJobId(s.to_string());
        let k = super::keys::Key::parse(&format!("0x{s}")).map_err(|_| bad())?;
        Ok(JobId(k.0.try_into().map_err(|_| bad())?))
    }
}

/// One file of an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferFile {
    /// The file's name in the target, a relative path checked by [`super::path::RelPath`].
    pub path: String,
    /// Size, blake3 root and block chaining values the receiver checks the data against.
    pub hashes: FileHashes,
    /// For an SST file: its smallest and largest user key, so the hook knows what it ingests.
    pub keys: Option<KeySpan>,
    /// Permission bits the receiver gives the file (`0o777` at most: no set-id or
    /// sticky bit).
    pub mode: u32,
}

/// The permission bits an offer may carry.
pub const MODE_BITS: u32 = 0o777;

/// The sender's description of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The import target (or export, for a pull) the job is for.
    pub target: String,
    /// The job's files, in the order data stream headers number them.
    pub files: Vec<OfferFile>,
    /// Engine metadata (for example a region's key range), passed to the import hook.
    pub meta: Vec<(String, String)>,
    /// The sender asks for the TCP data lane (see `tcplane`); the receiver's target says
    /// whether it is encrypted.
    pub tcp_lane: bool,
    /// Stage and verify everything, then wait for a separate commit or abort; the
    /// target is held by this job meanwhile.
    pub hold: bool,
    /// The replicas after this one, in order: the receiver forwards every block it
    /// verifies to the first, which forwards to the next (see `agent::relay`). Not part
    /// of the job's id: the same job resent along another chain resumes.
    pub relay: Vec<Hop>,
}

/// One replica of a relay chain: the agent (`NAME@ADDR:PORT`) and its import target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The replica's agent, as `NAME@ADDR:PORT`.
    pub peer: String,
    /// The import target on that agent.
    pub target: String,
}

/// How a job ended on one replica of a relay chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaOutcome {
    /// The job is in the replica's target.
    Committed = 1,
    /// The job is staged on the replica and waits for a commit or abort.
    Held = 2,
    /// The job did not reach the replica's target.
    Failed = 3,
}

impl ReplicaOutcome {
    /// The lower-case name reports and the CLI show: `committed`, `held` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaOutcome::Committed => "committed",
            ReplicaOutcome::Held => "held",
            ReplicaOutcome::Failed => "failed",
        }
    }
}

/// What a relay reports about one replica after it: how the job ended there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaResult {
    /// The replica's agent, as `NAME@ADDR:PORT`.
    pub peer: String,
    /// The import target on that replica.
    pub target: String,
    /// How the job ended there.
    pub outcome: ReplicaOutcome,
    /// The job's id on that replica (what `commit` and `abort` take if it is held).
    pub job: JobId,
    /// The wire code of a failure; 0 otherwise.
    pub code: u16,
    /// The import hook's report, or why it failed.
    pub text: String,
    /// Bytes of blocks sent to that replica (its predecessor's count).
    pub bytes: u64,
}

impl Offer {
    /// The job id both sides derive from everything the import hook is given: the
    /// target, names, sizes, roots, key spans and metadata. The same files sent with
    /// other metadata are another job, so one can not stand in for the other.
    pub fn job_id(&self) -> JobId {
        let mut h = blake3::Hasher::new();
        h.update(b"barge job v2\0");
        put_str(&mut h, &self.target);
        for f in &self.files {
            put_str(&mut h, &f.path);
            h.update(&f.hashes.size.to_be_bytes());
            h.update(&f.hashes.root);
            let mut span = vec![];
            put_span(&mut span, &f.keys);
            h.update(&span);
        }
        h.update(&(self.meta.len() as u64).to_be_bytes());
        for (k, v) in &self.meta {
            put_str(&mut h, k);
            put_str(&mut h, v);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.finalize().as_bytes()[..16]);
        JobId(id)
    }

    /// The id agents before v2 gave this offer (target, names, sizes and roots only):
    /// held jobs journaled by such an agent keep it, so they survive an upgrade.
    pub fn legacy_job_id(&self) -> JobId {
        let mut h = blake3::Hasher::new();
        h.update(b"barge job v1\0");
        put_str(&mut h, &self.target);
        for f in &self.files {
            put_str(&mut h, &f.path);
            h.update(&f.hashes.size.to_be_bytes());
            h.update(&f.hashes.root);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.finalize().as_bytes()[..16]);
        JobId(id)
    }

    /// Total bytes of the job's files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.hashes.size).sum()
    }
}

fn put_str(h: &mut blake3::Hasher, s: &str) {
    h.update(&(s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

/// `text` cut to what a report or reason may hold on the wire ([`MAX_REASON_LEN`]), at
/// a character boundary.
pub fn cut_reason(text: String) -> String {
    cut_to(text, MAX_REASON_LEN)
}

/// `text` cut to what a name field holds on the wire ([`MAX_NAME_LEN`]), at a
/// character boundary.
pub fn cut_name(text: String) -> String {
    cut_to(text, MAX_NAME_LEN)
}

fn cut_to(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Where and how to open the TCP data lane of one job.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TcpGrant {
    /// The receiver's TCP lane port, on the address the QUIC connection came to.
    pub port: u16,
    /// Sent first on every TCP connection of the job; valid while the job runs.
    pub token: [u8; 32],
    /// The lane speaks TLS 1.3 (mutual, the QUIC certificates; the token goes inside);
    /// false: clear text, only where the target says `tcp_lane = "cleartext"`.
    pub tls: bool,
}

/// The token is a secret: it never reaches a log through `{:?}`.
impl std::fmt::Debug for TcpGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpGrant")
            .field("port", &self.port)
            .field("token", &"<redacted>")
            .field("tls", &self.tls)
            .finish()
    }
}

/// A refusal or failure with a wire code and a short reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What went wrong, as one of the [`code`] constants.
    pub code: u16,
    /// A short reason for people, at most [`MAX_REASON_LEN`] bytes.
    pub reason: String,
    /// Seconds after which the same job may be sent again and is likely to be taken
    /// (a busy or full receiver, one shutting down); 0: retrying will not help.
    pub retry_after: u32,
}

impl Refusal {
    /// A refusal; a reason longer than the wire takes ([`MAX_REASON_LEN`]) is cut.
    pub fn new(code: u16, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason: cut_reason(reason.into()),
            retry_after: 0,
        }
    }

    /// The same refusal, to be retried after `secs` seconds.
    pub fn retry_after(mut self, secs: u32) -> Refusal {
        self.retry_after = secs;
        self
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)?;
        match self.retry_after {
            0 => Ok(()),
            n => write!(f, " (retry after {n}s)"),
        }
    }
}

/// Control messages on a job's bidirectional stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Sender → receiver: the job.
    Offer(Offer),
    /// Puller → exporter: which files of which export to send (empty: all), and for
    /// an SST export the key range they must lie in.
    Fetch {
        /// The export to read from.
        export: String,
        /// Names of files in the export; empty: all.
        files: Vec<String>,
        /// For an SST export: only files whose keys lie in this range.
        range: Option<KeyRange>,
    },
    /// Receiver → sender: per file, a bitmap of the blocks already held verified, and
    /// the TCP lane to use if the sender asked for it and the receiver allows it.
    Accept {
        /// Per file of the offer, a bitmap of blocks already held (block `i` is bit `i % 8`
        /// of byte `i / 8`).
        have: Vec<Vec<u8>>,
        /// The TCP lane to send the data on, if asked for and allowed.
        tcp: Option<TcpGrant>,
    },
    /// Receiver → sender: the job is refused before any data moved.
    Reject(Refusal),
    /// Sender → receiver: all data is sent on `streams` data streams; commit.
    Commit {
        /// How many data streams the sender opened, so the receiver knows when it has them
        /// all.
        streams: u32,
    },
    /// Sender → receiver: give up and remove what was staged.
    Abort,
    /// Receiver → sender: committed; the import hook's report.
    Committed {
        /// What the import hook said it did.
        report: String,
    },
    /// Receiver → sender: the job failed after it was accepted.
    Failed(Refusal),
    /// Receiver → sender: a `hold` job is staged, verified and synced; it waits for
    /// a commit or abort.
    Held {
        /// The id that `JobOp` names the held job by.
        job: JobId,
    },
    /// Client → agent: commit or abort a held job.
    JobOp {
        /// Commit or abort.
        op: JobOp,
        /// The held job.
        job: JobId,
    },
    /// Agent → client: the held job is aborted and its files removed.
    Aborted,
    /// Client → agent: list the jobs on targets the client may write to.
    ListJobs,
    /// Agent → client: the jobs.
    Jobs(Vec<JobInfo>),
    /// Client → agent: list an export's files (only those inside `range`, if given).
    List {
        /// The export to list.
        export: String,
        /// For an SST export: only files whose keys lie in this range.
        range: Option<KeyRange>,
    },
    /// Agent → client: the listing.
    Listing(Vec<ListedFile>),
    /// Relay → its sender, before its last word: how the job ended on the replicas
    /// after it in the chain.
    Replicas(Vec<ReplicaResult>),
    /// Operator → agent: send these files of `export` to the replicas `to` (a relay
    /// chain if more than one), with this agent's identity. Answered by `Progress`
    /// now and then, then `Replicas` and `Committed` (every replica has it) or `Failed`.
    Ship(Ship),
    /// Agent → operator: bytes of a ship sent so far, of `total`.
    Progress {
        /// Bytes sent so far.
        done: u64,
        /// Bytes of the whole ship.
        total: u64,
    },
}

/// What `barge ship` asks of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ship {
    /// The export to send from.
    pub export: String,
    /// Files of the export (all if empty); for an SST export, or those in `range`.
    pub files: Vec<String>,
    /// For an SST export: only files whose keys lie in this range.
    pub range: Option<KeyRange>,
    /// The replicas to send to, in chain order: the first gets it from this agent.
    pub to: Vec<Hop>,
    /// Ask each replica to hold the job for a separate commit or abort.
    pub hold: bool,
}

/// What to do with a held job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOp {
    /// Hand the held job to the import hook.
    Commit = 1,
    /// Remove the held job's staged files.
    Abort = 2,
}

/// One job as `barge jobs` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// The job's id, what `commit` and `abort` take.
    pub id: JobId,
    /// `receiving` or `held`.
    pub state: String,
    /// The import target the job is for.
    pub target: String,
    /// The identity that sent the job.
    pub peer: String,
    /// Files in the job.
    pub files: u64,
    /// Bytes of all its files.
    pub bytes: u64,
    /// Bytes staged and verified so far.
    pub done: u64,
    /// Seconds since the job started (or was held).
    pub age_secs: u64,
}

/// One file of an export listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedFile {
    /// The file's relative path in the export.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// The file's blake3 hash (what `b3sum` prints).
    pub root: Digest,
    /// For an SST file: its smallest and largest user key.
    pub keys: Option<KeySpan>,
}

/// Why bytes did not decode into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame ended inside a field.
    #[error("message truncated")]
    Truncated,
    /// The frame's length is over [`MAX_MESSAGE`].
    #[error("message of {0} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLarge(u64),
    /// A version byte this build does not read.
    #[error("unknown protocol version {0}")]
    Version(u8),
    /// A type byte this version does not know.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// A string field is not UTF-8.
    #[error("string is not UTF-8")]
    BadUtf8,
    /// A count or length over one of the protocol's limits.
    #[error("{what}: {got} is over the limit of {max}")]
    Limit {
        /// Which count.
        what: &'static str,
        /// Its value.
        got: u64,
        /// The limit.
        max: u64,
    },
    /// Bytes left over after the message's last field.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
    /// A file's list of block chaining values has the wrong length for its size.
    #[error("block list of {got} entries for a file of {size} bytes")]
    BlockList {
        /// The file's size in bytes.
        size: u64,
        /// Chaining values listed.
        got: u64,
    },
    /// A job id that is not 32 hex digits.
    #[error("job id {0:?} is not 32 hex digits")]
    BadJobId(String),
}

const T_OFFER: u8 = 1;
const T_FETCH: u8 = 2;
const T_ACCEPT: u8 = 3;
const T_REJECT: u8 = 4;
const T_COMMIT: u8 = 5;
const T_ABORT: u8 = 6;
const T_COMMITTED: u8 = 7;
const T_FAILED: u8 = 8;
const T_HELD: u8 = 9;
const T_JOB_OP: u8 = 10;
const T_ABORTED: u8 = 11;
const T_LIST_JOBS: u8 = 12;
const T_JOBS: u8 = 13;
const T_LIST: u8 = 14;
const T_LISTING: u8 = 15;
const T_REPLICAS: u8 = 16;
const T_SHIP: u8 = 17;
const T_PROGRESS: u8 = 18;

impl Message {
    /// Encodes the message as one frame (length prefix included). What the peer's
    /// decoder would refuse (a name, a report, a list over its limit) is refused here,
    /// by the same checks, so nothing is sent that can not be read.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let w = self.encode_unchecked();
        Message::check_frame_len(u32::try_from(w.len() - 4).unwrap_or(u32::MAX))?;
        Message::decode(&w[4..])?;
        Ok(w)
    }

    /// The frame without the limit checks (tests that craft bad messages use it).
    pub fn encode_unchecked(&self) -> Vec<u8> {
        let mut w = vec![0, 0, 0, 0, self.version(), self.type_byte()];
        self.encode_fields(&mut w);
        let len = (w.len() - 4) as u32;
        w[..4].copy_from_slice(&len.to_be_bytes());
        w
    }

    /// The oldest version that can carry this message, which its frame carries (see
    /// [`VERSION`]).
    pub fn version(&self) -> u8 {
        match self {
            Message::Accept { tcp: Some(g), .. } if g.tls => 4,
            Message::Offer(o) if !o.relay.is_empty() => 3,
            Message::Replicas(_) | Message::Ship(_) | Message::Progress { .. } => 3,
            _ => 2,
        }
    }

    /// The message's kind, as errors name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Offer(_) => "offer",
            Message::Fetch { .. } => "fetch",
            Message::Accept { .. } => "accept",
            Message::Reject(_) => "reject",
            Message::Commit { .. } => "commit",
            Message::Abort => "abort",
            Message::Committed { .. } => "committed",
            Message::Failed(_) => "failed",
            Message::Held { .. } => "held",
            Message::JobOp { .. } => "job operation",
            Message::Aborted => "aborted",
            Message::ListJobs => "list jobs",
            Message::Jobs(_) => "jobs",
            Message::List { .. } => "list",
            Message::Listing(_) => "listing",
            Message::Replicas(_) => "replicas",
            Message::Ship(_) => "ship",
            Message::Progress { .. } => "progress",
        }
    }

    fn type_byte(&self) -> u8 {
        match self {
            Message::Offer(_) => T_OFFER,
            Message::Fetch { .. } => T_FETCH,
            Message::Accept { .. } => T_ACCEPT,
            Message::Reject(_) => T_REJECT,
            Message::Commit { .. } => T_COMMIT,
            Message::Abort => T_ABORT,
            Message::Committed { .. } => T_COMMITTED,
            Message::Failed(_) => T_FAILED,
            Message::Held { .. } => T_HELD,
            Message::JobOp { .. } => T_JOB_OP,
            Message::Aborted => T_ABORTED,
            Message::ListJobs => T_LIST_JOBS,
            Message::Jobs(_) => T_JOBS,
            Message::List { .. } => T_LIST,
            Message::Listing(_) => T_LISTING,
            Message::Replicas(_) => T_REPLICAS,
            Message::Ship(_) => T_SHIP,
            Message::Progress { .. } => T_PROGRESS,
        }
    }

    fn encode_fields(&self, w: &mut Vec<u8>) {
        match self {
            Message::Offer(o) => encode_offer(o, w),
            Message::Fetch { export, files, range } => {
                put_string(w, export);
                put_u32(w, files.len() as u32);
                files.iter().for_each(|f| put_string(w, f));
                put_range(w, range);
            }
            Message::Accept { have, tcp } => {
                put_u32(w, have.len() as u32);
                have.iter().for_each(|bits| put_bytes(w, bits));
                match tcp {
                    None => w.push(0),
                    Some(g) => {
                        w.push(if g.tls { 2 } else { 1 });
                        w.extend_from_slice(&g.port.to_be_bytes());
                        w.extend_from_slice(&g.token);
                    }
                }
            }
            Message::Reject(r) | Message::Failed(r) => {
                w.extend_from_slice(&r.code.to_be_bytes());
                put_string(w, &r.reason);
                put_u32(w, r.retry_after);
            }
            Message::Commit { streams } => put_u32(w, *streams),
            Message::Abort | Message::Aborted | Message::ListJobs => {}
            Message::Committed { report } => put_string(w, report),
            Message::Held { job } => w.extend_from_slice(&job.0),
            Message::JobOp { op, job } => {
                w.push(*op as u8);
                w.extend_from_slice(&job.0);
            }
            Message::Jobs(jobs) => {
                put_u32(w, jobs.len() as u32);
                jobs.iter().for_each(|j| encode_job_info(j, w));
            }
            Message::List { export, range } => {
                put_string(w, export);
                put_range(w, range);
            }
            Message::Ship(sh) => {
                put_string(w, &sh.export);
                put_u32(w, sh.files.len() as u32);
                sh.files.iter().for_each(|f| put_string(w, f));
                put_range(w, &sh.range);
                put_u32(w, sh.to.len() as u32);
                for h in &sh.to {
                    put_string(w, &h.peer);
                    put_string(w, &h.target);
                }
                w.push(sh.hold as u8);
            }
            Message::Progress { done, total } => {
                w.extend_from_slice(&done.to_be_bytes());
                w.extend_from_slice(&total.to_be_bytes());
            }
            Message::Replicas(list) => {
                put_u32(w, list.len() as u32);
                list.iter().for_each(|r| encode_replica(r, w));
            }
            Message::Listing(files) => {
                put_u32(w, files.len() as u32);
                for f in files {
                    put_string(w, &f.path);
                    w.extend_from_slice(&f.size.to_be_bytes());
                    w.extend_from_slice(&f.root);
                    put_span(w, &f.keys);
                }
            }
        }
    }

    /// Decodes a frame body (the bytes after the length prefix).
    pub fn decode(body: &[u8]) -> Result<Message, WireError> {
        if body.len() as u64 > MAX_MESSAGE {
            return Err(WireError::TooLarge(body.len() as u64));
        }
        let mut r = Reader(body);
        let version = r.u8()?;
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(WireError::Version(version));
        }
        let msg = match r.u8()? {
            T_OFFER => Message::Offer(decode_offer(&mut r, version)?),
            T_FETCH => decode_fetch(&mut r)?,
            T_ACCEPT => decode_accept(&mut r, version)?,
            T_REJECT => Message::Reject(decode_refusal(&mut r)?),
            T_COMMIT => Message::Commit { streams: r.u32()? },
            T_ABORT => Message::Abort,
            T_COMMITTED => Message::Committed {
                report: r.string(MAX_REASON_LEN)?,
            },
            T_FAILED => Message::Failed(decode_refusal(&mut r)?),
            T_HELD => Message::Held { job: r.job_id()? },
            T_JOB_OP => decode_job_op(&mut r)?,
            T_ABORTED => Message::Aborted,
            T_LIST_JOBS => Message::ListJobs,
            T_JOBS => decode_jobs(&mut r)?,
            T_LIST => Message::List {
                export: r.string(MAX_NAME_LEN)?,
                range: r.range()?,
            },
            T_LISTING => decode_listing(&mut r)?,
            T_REPLICAS if version >= 3 => decode_replicas(&mut r)?,
            T_SHIP if version >= 3 => decode_ship(&mut r)?,
            T_PROGRESS if version >= 3 => Message::Progress {
                done: r.u64()?,
                total: r.u64()?,
            },
            t => return Err(WireError::UnknownType(t)),
        };
        if !r.0.is_empty() {
            return Err(WireError::Trailing(r.0.len()));
        }
        Ok(msg)
    }

    /// The target an offer names, from the first bytes of its frame body (after the
    /// length prefix): so a large offer can be authorized before it is read. `None`
    /// if the body is not an offer; an error if the prefix is too short or malformed.
    pub fn peek_offer_target(prefix: &[u8]) -> Result<Option<String>, WireError> {
        let mut r = Reader(prefix);
        let version = r.u8()?;
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(WireError::Version(version));
        }
        match r.u8()? {
            T_OFFER => Ok(Some(r.string(MAX_NAME_LEN)?)),
            _ => Ok(None),
        }
    }

    /// Bytes of a frame body that [`Message::peek_offer_target`] needs at most.
    pub const PEEK_LEN: usize = 2 + 4 + MAX_NAME_LEN;

    /// Checks a frame's length prefix before its body is read.
    pub fn check_frame_len(len: u32) -> Result<usize, WireError> {
        if len as u64 > MAX_MESSAGE {
            return Err(WireError::TooLarge(len as u64));
        }
        Ok(len as usize)
    }
}

fn encode_offer(o: &Offer, w: &mut Vec<u8>) {
    put_string(w, &o.target);
    put_u32(w, o.files.len() as u32);
    for f in &o.files {
        put_string(w, &f.path);
        w.extend_from_slice(&f.hashes.size.to_be_bytes());
        w.extend_from_slice(&f.hashes.root);
        put_u32(w, f.hashes.blocks.len() as u32);
        f.hashes.blocks.iter().for_each(|b| w.extend_from_slice(b));
        put_span(w, &f.keys);
        put_u32(w, f.mode);
    }
    put_u32(w, o.meta.len() as u32);
    for (k, v) in &o.meta {
        put_string(w, k);
        put_string(w, v);
    }
    w.push(o.tcp_lane as u8);
    w.push(o.hold as u8);
    if !o.relay.is_empty() {
        put_u32(w, o.relay.len() as u32);
        for h in &o.relay {
            put_string(w, &h.peer);
            put_string(w, &h.target);
        }
    }
}

fn encode_replica(r: &ReplicaResult, w: &mut Vec<u8>) {
    put_string(w, &r.peer);
    put_string(w, &r.target);
    w.push(r.outcome as u8);
    w.extend_from_slice(&r.job.0);
    w.extend_from_slice(&r.code.to_be_bytes());
    put_string(w, &r.text);
    w.extend_from_slice(&r.bytes.to_be_bytes());
}

fn decode_ship(r: &mut Reader) -> Result<Message, WireError> {
    let export = r.string(MAX_NAME_LEN)?;
    let n = r.count("files per job", MAX_FILES)?;
    let files = (0..n).map(|_| r.string(MAX_PATH_LEN)).collect::<Result<_, _>>()?;
    let range = r.range()?;
    let to = decode_hops(r)?;
    let hold = r.flag()?;
    Ok(Message::Ship(Ship {
        export,
        files,
        range,
        to,
        hold,
    }))
}

fn decode_hops(r: &mut Reader) -> Result<Vec<Hop>, WireError> {
    let n = r.count("relay hops", MAX_HOPS)?;
    (0..n)
        .map(|_| {
            Ok(Hop {
                peer: r.string(MAX_PEER_LEN)?,
                target: r.string(MAX_NAME_LEN)?,
            })
        })
        .collect()
}

fn decode_replicas(r: &mut Reader) -> Result<Message, WireError> {
    let n = r.count("replicas", MAX_HOPS)?;
    let mut list = Vec::with_capacity(n);
    for _ in 0..n {
        list.push(ReplicaResult {
            peer: r.string(MAX_PEER_LEN)?,
            target: r.string(MAX_NAME_LEN)?,
            outcome: match r.u8()? {
                1 => ReplicaOutcome::Committed,
                2 => ReplicaOutcome::Held,
                3 => ReplicaOutcome::Failed,
                other => {
                    return Err(WireError::Limit {
                        what: "replica outcome",
                        got: other as u64,
                        max: 3,
                    })
                }
            },
            job: r.job_id()?,
            code: u16::from_be_bytes(r.take(2)?.try_into().expect("2 bytes")),
            text: r.string(MAX_REASON_LEN)?,
            bytes: r.u64()?,
        });
    }
    Ok(Message::Replicas(list))
}

/// Version 1 offers (written by older peers, and in held-job journals) carry no file
/// modes: their files get [`LEGACY_MODE`].
fn decode_offer(r: &mut Reader, version: u8) -> Result<Offer, WireError> {
    let target = r.string(MAX_NAME_LEN)?;
    let n = r.count("files per job", MAX_FILES)?;
    let mut files = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let path = r.string(MAX_PATH_LEN)?;
        let size = r.u64()?;
        if size > MAX_FILE_SIZE {
            return Err(WireError::Limit {
                what: "file size",
                got: size,
                max: MAX_FILE_SIZE,
            });
        }
        let root = r.digest()?;
        let nb = r.u32()? as u64;
        if nb != listed_blocks(size) as u64 {
            return Err(WireError::BlockList { size, got: nb });
        }
        let blocks = (0..nb).map(|_| r.digest()).collect::<Result<_, _>>()?;
        let keys = r.span()?;
        let mode = if version >= 2 { r.u32()? } else { LEGACY_MODE };
        if mode & !MODE_BITS != 0 {
            return Err(WireError::Limit {
                what: "file mode bits",
                got: mode as u64,
                max: MODE_BITS as u64,
            });
        }
        files.push(OfferFile {
            path,
            hashes: FileHashes { size, root, blocks },
            keys,
            mode,
        });
    }
    let nm = r.count("metadata entries", MAX_META)?;
    let mut meta = Vec::with_capacity(nm);
    for _ in 0..nm {
        meta.push((r.string(MAX_NAME_LEN)?, r.string(MAX_META_VALUE)?));
    }
    let tcp_lane = r.flag()?;
    let hold = r.flag()?;
    let relay = match version >= 3 {
        true => decode_hops(r)?,
        false => vec![],
    };
    Ok(Offer {
        target,
        files,
        meta,
        tcp_lane,
        hold,
        relay,
    })
}

fn decode_fetch(r: &mut Reader) -> Result<Message, WireError> {
    let export = r.string(MAX_NAME_LEN)?;
    let n = r.count("files per job", MAX_FILES)?;
    let files = (0..n).map(|_| r.string(MAX_PATH_LEN)).collect::<Result<_, _>>()?;
    let range = r.range()?;
    Ok(Message::Fetch { export, files, range })
}

fn decode_job_op(r: &mut Reader) -> Result<Message, WireError> {
    let op = match r.u8()? {
        1 => JobOp::Commit,
        2 => JobOp::Abort,
        other => {
            return Err(WireError::Limit {
                what: "job operation",
                got: other as u64,
                max: 2,
            })
        }
    };
    Ok(Message::JobOp { op, job: r.job_id()? })
}

fn encode_job_info(j: &JobInfo, w: &mut Vec<u8>) {
    w.extend_from_slice(&j.id.0);
    put_string(w, &j.state);
    put_string(w, &j.target);
    put_string(w, &j.peer);
    for n in [j.files, j.bytes, j.done, j.age_secs] {
        w.extend_from_slice(&n.to_be_bytes());
    }
}

fn decode_jobs(r: &mut Reader) -> Result<Message, WireError> {
    let n = r.count("jobs", MAX_LISTED_JOBS)?;
    let mut jobs = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        jobs.push(JobInfo {
            id: r.job_id()?,
            state: r.string(MAX_NAME_LEN)?,
            target: r.string(MAX_NAME_LEN)?,
            peer: r.string(MAX_NAME_LEN)?,
            files: r.u64()?,
            bytes: r.u64()?,
            done: r.u64()?,
            age_secs: r.u64()?,
        });
    }
    Ok(Message::Jobs(jobs))
}

fn decode_listing(r: &mut Reader) -> Result<Message, WireError> {
    let n = r.count("files per job", MAX_FILES)?;
    let mut files = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        files.push(ListedFile {
            path: r.string(MAX_PATH_LEN)?,
            size: r.u64()?,
            root: r.digest()?,
            keys: r.span()?,
        });
    }
    Ok(Message::Listing(files))
}

fn put_span(w: &mut Vec<u8>, span: &Option<KeySpan>) {
    w.push(span.is_some() as u8);
    if let Some(s) = span {
        put_bytes(w, &s.smallest.0);
        put_bytes(w, &s.largest.0);
    }
}

fn put_range(w: &mut Vec<u8>, range: &Option<KeyRange>) {
    w.push(range.is_some() as u8);
    if let Some(r) = range {
        put_bytes(w, &r.start.0);
        w.push(r.end.is_some() as u8);
        if let Some(e) = &r.end {
            put_bytes(w, &e.0);
        }
    }
}

fn decode_accept(r: &mut Reader, version: u8) -> Result<Message, WireError> {
    let n = r.count("files per job", MAX_FILES)?;
    let have = (0..n)
        .map(|_| r.bytes(MAX_MESSAGE as usize).map(<[u8]>::to_vec))
        .collect::<Result<_, _>>()?;
    // 0: no lane; 1: a clear-text lane; 2 (version 4 on): a TLS lane.
    let tls = match r.u8()? {
        0 => None,
        1 => Some(false),
        2 if version >= 4 => Some(true),
        b => {
            return Err(WireError::Limit {
                what: "tcp lane kind",
                got: b as u64,
                max: if version >= 4 { 2 } else { 1 },
            })
        }
    };
    let tcp = match tls {
        None => None,
        Some(tls) => {
            let port = u16::from_be_bytes(r.take(2)?.try_into().expect("2 bytes"));
            Some(TcpGrant {
                port,
                token: r.digest()?,
                tls,
            })
        }
    };
    Ok(Message::Accept { have, tcp })
}

fn decode_refusal(r: &mut Reader) -> Result<Refusal, WireError> {
    let code = u16::from_be_bytes(r.take(2)?.try_into().expect("2 bytes"));
    Ok(Refusal {
        code,
        reason: r.string(MAX_REASON_LEN)?,
        retry_after: r.u32()?,
    })
}

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_be_bytes());
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_u32(w, b.len() as u32);
    w.extend_from_slice(b);
}

fn put_string(w: &mut Vec<u8>, s: &str) {
    put_bytes(w, s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(WireError::Limit {
                what: "flag",
                got: other as u64,
                max: 1,
            }),
        }
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn digest(&mut self) -> Result<Digest, WireError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    fn count(&mut self, what: &'static str, max: usize) -> Result<usize, WireError> {
        let n = self.u32()? as u64;
        if n > max as u64 {
            return Err(WireError::Limit {
                what,
                got: n,
                max: max as u64,
            });
        }
        Ok(n as usize)
    }
    fn bytes(&mut self, max: usize) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::Limit {
                what: "field length",
                got: n as u64,
                max: max as u64,
            });
        }
        self.take(n)
    }
    fn key(&mut self) -> Result<Key, WireError> {
        Ok(Key(self.bytes(MAX_KEY_LEN)?.to_vec()))
    }
    fn span(&mut self) -> Result<Option<KeySpan>, WireError> {
        Ok(match self.flag()? {
            false => None,
            true => Some(KeySpan {
                smallest: self.key()?,
                largest: self.key()?,
            }),
        })
    }
    fn range(&mut self) -> Result<Option<KeyRange>, WireError> {
        if !self.flag()? {
            return Ok(None);
        }
        let start = self.key()?;
        let end = match self.flag()? {
            false => None,
            true => Some(self.key()?),
        };
        Ok(Some(KeyRange { start, end }))
    }
    fn job_id(&mut self) -> Result<JobId, WireError> {
        Ok(JobId(self.take(16)?.try_into().expect("16 bytes")))
    }
    fn string(&mut self, max: usize) -> Result<String, WireError> {
        let b = self.bytes(max)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::BadUtf8)
    }
}

/// First bytes of every data stream: the version and the job the blocks belong to.
pub fn data_stream_header(job: JobId) -> [u8; 17] {
    let mut h = [0u8; 17];
    // Data streams did not change in version 3: peers of version 2 read them.
    h[0] = 2;
    h[1..].copy_from_slice(&job.0);
    h
}

/// Parses a data stream's first bytes.
pub fn parse_data_stream_header(h: &[u8; 17]) -> Result<JobId, WireError> {
    if !(OLDEST_VERSION..=VERSION).contains(&h[0]) {
        return Err(WireError::Version(h[0]));
    }
    Ok(JobId(h[1..].try_into().expect("16 bytes")))
}

/// Header before each block on a data stream: file index, block index, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// Index of the file in the offer.
    pub file: u32,
    /// Index of the block in the file (block `i` starts at byte `i * BLOCK_SIZE`).
    pub block: u32,
    /// Bytes of the block that follow the header.
    pub len: u32,
}

impl BlockHeader {
    /// Bytes of an encoded header.
    pub const LEN: usize = 12;

    /// The header's bytes: three big-endian `u32`s.
    pub fn encode(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&self.file.to_be_bytes());
        b[4..8].copy_from_slice(&self.block.to_be_bytes());
        b[8..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// The header in [`BlockHeader::LEN`] bytes; any bytes are a header, the receiver
    /// checks the numbers.
    pub fn decode(b: &[u8; 12]) -> BlockHeader {
        let word = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        BlockHeader {
            file: word(0),
            block: word(4),
            len: word(8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_offer() -> Offer {
        Offer {
            target: "t".into(),
            files: vec![OfferFile {
                path: "a".into(),
                hashes: FileHashes {
                    size: 1,
                    root: [7; 32],
                    blocks: vec![],
                },
                keys: None,
                mode: 0o644,
            }],
            meta: vec![("k".into(), "v".into())],
            tcp_lane: false,
            hold: false,
            relay: vec![],
        }
    }

    #[test]
    fn golden_bytes_of_commit_and_reject() {
        assert_eq!(
            Message::Commit { streams: 3 }.encode().unwrap(),
            [0, 0, 0, 6, 2, 5, 0, 0, 0, 3]
        );
        let r = Message::Reject(Refusal::new(code::NOT_ALLOWED, "no"));
        assert_eq!(
            r.encode().unwrap(),
            [0, 0, 0, 14, 2, 4, 0, 3, 0, 0, 0, 2, b'n', b'o', 0, 0, 0, 0]
        );
        let busy = Message::Reject(Refusal::new(code::BUSY, "").retry_after(30));
        assert_eq!(
            busy.encode().unwrap(),
            [0, 0, 0, 12, 2, 4, 0, 8, 0, 0, 0, 0, 0, 0, 0, 30]
        );
        assert_eq!(Message::Abort.encode().unwrap(), [0, 0, 0, 2, 2, 6]);
    }

    #[test]
    fn golden_bytes_of_a_small_offer() {
        let mut want = vec![0, 0, 0, 81, 2, 1];
        want.extend([0, 0, 0, 1, b't', 0, 0, 0, 1, 0, 0, 0, 1, b'a']);
        want.extend([0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend([7; 32]);
        want.extend([0, 0, 0, 0]); // no listed blocks for a 1-byte file
        want.push(0); // no key span
        want.extend([0, 0, 1, 0xa4]); // mode 0o644
        want.extend([0, 0, 0, 1, 0, 0, 0, 1, b'k', 0, 0, 0, 1, b'v']);
        want.push(0); // no TCP lane asked for
        want.push(0); // not held
        assert_eq!(Message::Offer(small_offer()).encode().unwrap(), want);
    }

    #[test]
    fn a_version_1_offer_reads_with_the_legacy_mode_and_modes_beyond_0777_are_refused() {
        let mut offer = small_offer();
        offer.files[0].mode = 0o600;
        let v2 = Message::Offer(offer).encode().unwrap()[4..].to_vec();
        // Version 1: the same bytes without the mode field (after the key span byte).
        let at = v2.len() - 14 - 2 - 4;
        let mut v1 = [&v2[..at], &v2[at + 4..]].concat();
        v1[0] = 1;
        let Ok(Message::Offer(old)) = Message::decode(&v1) else {
            panic!("a version 1 offer decodes")
        };
        assert_eq!(old.files[0].mode, LEGACY_MODE);
        let Ok(Message::Offer(new)) = Message::decode(&v2) else {
            panic!("a version 2 offer decodes")
        };
        assert_eq!(new.files[0].mode, 0o600);
        let mut setuid = v2.clone();
        setuid[at..at + 4].copy_from_slice(&0o4755u32.to_be_bytes());
        assert!(matches!(
            Message::decode(&setuid),
            Err(WireError::Limit {
                what: "file mode bits",
                ..
            })
        ));
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = vec![
            Message::Offer(small_offer()),
            Message::Fetch {
                export: "e".into(),
                files: vec!["x/y".into()],
                range: None,
            },
            Message::Fetch {
                export: "e".into(),
                files: vec![],
                range: Some(KeyRange::parse("0x00..b").unwrap()),
            },
            Message::Held { job: JobId([3; 16]) },
            Message::JobOp {
                op: JobOp::Abort,
                job: JobId([4; 16]),
            },
            Message::Aborted,
            Message::ListJobs,
            Message::Jobs(vec![JobInfo {
                id: JobId([1; 16]),
                state: "held".into(),
                target: "t".into(),
                peer: "p".into(),
                files: 2,
                bytes: 3,
                done: 3,
                age_secs: 9,
            }]),
            Message::List {
                export: "x".into(),
                range: Some(KeyRange::parse("a..").unwrap()),
            },
            Message::Listing(vec![ListedFile {
                path: "r2/1.sst".into(),
                size: 4,
                root: [2; 32],
                keys: Some(KeySpan {
                    smallest: Key(vec![0]),
                    largest: Key(b"zz".to_vec()),
                }),
            }]),
            Message::Accept {
                have: vec![vec![0b101], vec![]],
                tcp: None,
            },
            Message::Accept {
                have: vec![],
                tcp: Some(TcpGrant {
                    port: 7000,
                    token: [5; 32],
                    tls: false,
                }),
            },
            Message::Accept {
                have: vec![],
                tcp: Some(TcpGrant {
                    port: 7001,
                    token: [6; 32],
                    tls: true,
                }),
            },
            Message::Reject(Refusal::new(2, "unknown")),
            Message::Commit { streams: 8 },
            Message::Abort,
            Message::Committed { report: "ok".into() },
            Message::Failed(Refusal::new(10, "bad")),
        ];
        for m in msgs {
            let frame = m.encode().unwrap();
            assert_eq!(Message::decode(&frame[4..]).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let frame = Message::Offer(small_offer()).encode().unwrap();
        for cut in 0..frame.len() - 4 {
            assert!(Message::decode(&frame[4..4 + cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn unknown_version_type_and_trailing_bytes_are_named() {
        assert_eq!(Message::decode(&[5, 5, 0, 0, 0, 1]), Err(WireError::Version(5)));
        assert_eq!(Message::decode(&[1, 99]), Err(WireError::UnknownType(99)));
        assert_eq!(Message::decode(&[1, 6, 0]), Err(WireError::Trailing(1)));
        // Version 3's messages do not exist in a version 2 frame.
        assert_eq!(
            Message::decode(&[2, T_PROGRESS, 0]),
            Err(WireError::UnknownType(T_PROGRESS))
        );
    }

    #[test]
    fn relays_ships_and_progress_round_trip_on_version_3_and_the_rest_stays_on_2() {
        let hop = Hop {
            peer: "c@127.0.0.1:7878".into(),
            target: "in".into(),
        };
        let plain = Message::Offer(small_offer()).encode().unwrap();
        assert_eq!(plain[4], 2, "an offer without a relay is read by version 2 peers");
        let mut relayed = small_offer();
        relayed.relay = vec![hop.clone(), hop.clone()];
        let result = ReplicaResult {
            peer: hop.peer.clone(),
            target: "in".into(),
            outcome: ReplicaOutcome::Held,
            job: JobId([7; 16]),
            code: 0,
            text: "held".into(),
            bytes: 1 << 30,
        };
        let ship = Ship {
            export: "out".into(),
            files: vec!["a".into()],
            range: None,
            to: vec![hop.clone()],
            hold: true,
        };
        for m in [
            Message::Offer(relayed),
            Message::Replicas(vec![result]),
            Message::Ship(ship),
            Message::Progress { done: 5, total: 9 },
        ] {
            let frame = m.encode().unwrap();
            assert_eq!(frame[4], 3, "{}", m.kind());
            assert_eq!(Message::decode(&frame[4..]).unwrap(), m);
            for cut in 0..frame.len() - 4 {
                assert!(
                    Message::decode(&frame[4..4 + cut]).is_err(),
                    "{} cut at {cut}",
                    m.kind()
                );
            }
        }
        let too_many = Message::Ship(Ship {
            export: "out".into(),
            files: vec![],
            range: None,
            to: vec![hop; MAX_HOPS + 1],
            hold: false,
        });
        assert!(matches!(
            too_many.encode(),
            Err(WireError::Limit { what: "relay hops", .. })
        ));
    }

    #[test]
    fn oversize_frames_and_counts_are_refused_before_allocating() {
        assert!(matches!(
            Message::check_frame_len(u32::MAX),
            Err(WireError::TooLarge(_))
        ));
        // An offer that claims u32::MAX files.
        let body = [1, T_OFFER, 0, 0, 0, 1, b't', 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(Message::decode(&body), Err(WireError::Limit { .. })));
        // A string that claims to be longer than the frame.
        let body = [1, T_COMMITTED, 0, 0, 0, 9, b'x'];
        assert_eq!(Message::decode(&body), Err(WireError::Truncated));
    }

    #[test]
    fn block_list_must_fit_the_file_size() {
        let mut o = small_offer();
        o.files[0].hashes.size = 3 << 20;
        let frame = Message::Offer(o.clone()).encode_unchecked();
        assert!(matches!(Message::decode(&frame[4..]), Err(WireError::BlockList { .. })));
        assert!(matches!(Message::Offer(o).encode(), Err(WireError::BlockList { .. })));
    }

    #[test]
    fn encoding_refuses_what_decoding_would_refuse() {
        let long = "x".repeat(MAX_REASON_LEN + 1);
        let report = Message::Committed { report: long.clone() };
        assert!(
            matches!(report.encode(), Err(WireError::Limit { .. })),
            "a report over the limit is not sent"
        );
        let cut = Message::Committed {
            report: cut_reason(long.clone()),
        };
        assert!(cut.encode().is_ok());
        assert_eq!(
            Refusal::new(code::IO, long).reason.len(),
            MAX_REASON_LEN,
            "reasons are cut where made"
        );
        let name = "n".repeat(MAX_NAME_LEN + 1);
        let list = Message::List {
            export: name,
            range: None,
        };
        assert!(matches!(list.encode(), Err(WireError::Limit { .. })));
    }

    #[test]
    fn golden_bytes_of_data_stream_framing() {
        let h = BlockHeader {
            file: 1,
            block: 2,
            len: 0x10_0000,
        };
        assert_eq!(h.encode(), [0, 0, 0, 1, 0, 0, 0, 2, 0, 0x10, 0, 0]);
        assert_eq!(BlockHeader::decode(&h.encode()), h);
        let id = JobId([9; 16]);
        let head = data_stream_header(id);
        assert_eq!(head[0], 2, "version 2 peers read data streams of version 3 senders");
        assert_eq!(parse_data_stream_header(&head), Ok(id));
        let mut bad = head;
        bad[0] = 7;
        assert_eq!(parse_data_stream_header(&bad), Err(WireError::Version(7)));
    }

    #[test]
    fn the_tcp_lane_token_never_shows_in_debug_output() {
        let g = TcpGrant {
            port: 7,
            token: [0xab; 32],
            tls: true,
        };
        let text = format!(
            "{:?}",
            Message::Accept {
                have: vec![],
                tcp: Some(g)
            }
        );
        assert!(text.contains("redacted") && !text.contains("171"), "{text}");
    }

    #[test]
    fn a_tls_lane_grant_is_version_4_and_a_clear_one_stays_readable_by_version_2() {
        let grant = |tls| Message::Accept {
            have: vec![],
            tcp: Some(TcpGrant {
                port: 9,
                token: [1; 32],
                tls,
            }),
        };
        assert_eq!(grant(true).version(), 4);
        assert_eq!(grant(false).version(), 2);
        // A version 3 frame can not say "TLS": the kind byte 2 is over its limit.
        let mut frame = grant(true).encode().unwrap();
        frame[4] = 3;
        assert!(matches!(
            Message::decode(&frame[4..]),
            Err(WireError::Limit {
                what: "tcp lane kind",
                got: 2,
                max: 1
            })
        ));
    }

    #[test]
    fn job_ids_parse_from_their_display() {
        let id = small_offer().job_id();
        assert_eq!(id.to_string().parse::<JobId>(), Ok(id));
        for bad in ["", "abc", "zz", &"0".repeat(34)] {
            assert!(matches!(bad.parse::<JobId>(), Err(WireError::BadJobId(_))), "{bad}");
        }
    }

    #[test]
    fn job_id_depends_on_content() {
        let a = small_offer();
        let mut b = small_offer();
        b.files[0].hashes.root[0] = 8;
        assert_ne!(a.job_id(), b.job_id());
        assert_eq!(a.job_id(), small_offer().job_id());
        let mut c = small_offer();
        c.meta.push(("region".into(), "7".into()));
        assert_ne!(a.job_id(), c.job_id(), "metadata is part of the job");
        let mut d = small_offer();
        d.hold = true;
        d.tcp_lane = true;
        assert_eq!(a.job_id(), d.job_id(), "how it is sent is not");
    }

    #[test]
    fn an_offer_names_its_target_in_its_first_bytes() {
        let frame = Message::Offer(small_offer()).encode().unwrap();
        let body = &frame[4..];
        let prefix = &body[..body.len().min(Message::PEEK_LEN)];
        assert_eq!(Message::peek_offer_target(prefix), Ok(Some("t".into())));
        let list = Message::ListJobs.encode().unwrap();
        assert_eq!(Message::peek_offer_target(&list[4..]), Ok(None));
        assert_eq!(Message::peek_offer_target(&body[..3]), Err(WireError::Truncated));
        assert!(matches!(
            Message::peek_offer_target(&[9, 1]),
            Err(WireError::Version(9))
        ));
    }
}
