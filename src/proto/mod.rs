//! The protocol core: block verification, message encoding, names and the per-job
//! state machines. Nothing here touches a socket or a disk, so all of it is tested
//! with plain bytes; the `transfer` module drives it over quinn and io_uring.
//!
//! This page describes the protocol as a whole: connections, streams, messages,
//! versions, verification, the order of a job and the limits. How an operator
//! configures and runs the agent is in `systemd/README.md`; certificates and the
//! security model in `certs/README.md`.
//!
//! | module | what |
//! |---|---|
//! | [`blocks`] | 1 MiB blocks whose blake3 chaining values merge into the file's plain blake3 root |
//! | [`wire`] | control messages and their byte encoding; data stream and block headers; wire error codes |
//! | [`path`] | relative names from the network, checked component by component |
//! | [`job`] | what a receiver has verified ([`job::ReceiveJob`]); which stream a sender sends each block on ([`job::SendPlan`]) |
//! | [`session`] | the order of a job: a [`session::Sender`] and a [`session::Receiver`] state machine |
//! | [`keys`] | key ranges (`[start, end)`) and whether a file's keys lie inside |
//! | [`limits`] | every limit the protocol enforces |
//!
//! # Connections and identities
//!
//! Peers talk QUIC (quinn) with ALPN `barge/1` ([`wire::ALPN`]), TLS 1.3 only, and
//! mutual authentication: both sides present a certificate from the configured CA.
//! A peer's identity is the first DNS name in its certificate; the agent checks it
//! against the allow list of each import target and export. One connection carries many
//! requests, each on a stream of its own.
//!
//! # Streams
//!
//! - **Control.** Every request is one bidirectional stream. Its first message says what
//!   it opens ([`session::opening`]): an [`Offer`](wire::Message::Offer) starts a push
//!   into an import target; a [`Fetch`](wire::Message::Fetch) a pull out of an export
//!   (the agent answers with an offer and becomes the job's sender);
//!   [`JobOp`](wire::Message::JobOp), [`ListJobs`](wire::Message::ListJobs) and
//!   [`List`](wire::Message::List) get one answer each ([`session::check_answer`]);
//!   a [`Ship`](wire::Message::Ship) asks the agent to push an export's files to other
//!   agents. Anything else first is a protocol error.
//! - **Data.** A job's blocks travel on up to [`limits::MAX_STREAMS`] unidirectional
//!   streams, opened by the job's sender. Each starts with a 17-byte header
//!   ([`wire::data_stream_header`]: a version byte, then the 16-byte job id), then, per
//!   block, a 12-byte [`wire::BlockHeader`] (file index, block index, length; big-endian
//!   `u32`s) and the block's bytes. Blocks are spread over the streams by bytes
//!   ([`job::SendPlan`]), so many small files share a few streams and a large file runs
//!   on all of them; they may arrive in any order, on any stream.
//! - **TCP lane.** Where a target allows the TCP lane to the sender and the offer asks
//!   for it, [`Accept`](wire::Message::Accept) carries a port, a 32-byte token and
//!   whether the lane is TLS ([`wire::TcpGrant`]). The sender opens one TCP connection
//!   per lane; on a TLS lane it first completes a TLS 1.3 handshake with ALPN
//!   `barge-lane/1` and the certificate it uses on QUIC (its identity must be the job's
//!   QUIC peer's, or the job fails), then sends the token, then block headers and bytes
//!   as on a QUIC data stream. A clear-text lane (only where a target says
//!   `tcp_lane = "cleartext"`) sends the token first; its tokens never start with byte
//!   0x16, so one listener tells the two kinds apart. Control stays on QUIC.
//!
//! # Messages
//!
//! Every control message is a frame: a big-endian `u32` body length, then the body: a
//! version byte, a type byte and the fields ([`wire::Message::encode`],
//! [`wire::Message::decode`]). Integers are big-endian; strings, byte strings and lists
//! are `u32`-counted; a flag is one byte, 0 or 1. Decoding checks every count against
//! [`limits`] before it allocates, and encoding refuses what decoding would refuse, so
//! nothing is sent that the peer can not read.
//!
//! | type | message | from, to | carries |
//! |---:|---|---|---|
//! | 1 | [`Offer`](wire::Message::Offer) | sender, receiver | target; per file its relative name, size, blake3 root, block chaining values, key span (SST files) and permission bits; metadata for the hook; whether it asks for the TCP lane; whether to hold; from version 3, the replicas after the receiver ([`wire::Hop`]) |
//! | 2 | [`Fetch`](wire::Message::Fetch) | puller, agent | export, the files wanted (all if none), a key range |
//! | 3 | [`Accept`](wire::Message::Accept) | receiver, sender | per file, a bitmap of the blocks already held verified (bit `i % 8` of byte `i / 8` for block `i`); the TCP lane grant, if any |
//! | 4 | [`Reject`](wire::Message::Reject) | receiver, sender | a [`wire::Refusal`]: code, reason, seconds after which a retry may work (0: it will not) |
//! | 5 | [`Commit`](wire::Message::Commit) | sender, receiver | how many data streams were used |
//! | 6 | [`Abort`](wire::Message::Abort) | sender, receiver | - |
//! | 7 | [`Committed`](wire::Message::Committed) | receiver, sender | the import hook's report |
//! | 8 | [`Failed`](wire::Message::Failed) | receiver, sender | a refusal, after the job was accepted |
//! | 9 | [`Held`](wire::Message::Held) | receiver, sender | the id of the held job |
//! | 10 | [`JobOp`](wire::Message::JobOp) | client, agent | commit or abort, and a held job's id |
//! | 11 | [`Aborted`](wire::Message::Aborted) | agent, client | - |
//! | 12 | [`ListJobs`](wire::Message::ListJobs) | client, agent | - |
//! | 13 | [`Jobs`](wire::Message::Jobs) | agent, client | per job: id, state, target, sender, files, bytes, bytes done, age |
//! | 14 | [`List`](wire::Message::List) | client, agent | export, a key range |
//! | 15 | [`Listing`](wire::Message::Listing) | agent, client | per file: name, size, root, key span |
//! | 16 | [`Replicas`](wire::Message::Replicas) | relay, its sender | how the job ended on each replica after it ([`wire::ReplicaResult`]) |
//! | 17 | [`Ship`](wire::Message::Ship) | operator, agent | export, files, key range, the replicas to send to, whether to hold |
//! | 18 | [`Progress`](wire::Message::Progress) | agent, operator | bytes of a ship sent so far, of the total |
//!
//! Refusals and failures carry a named code from [`wire::code`] (`NOT_ALLOWED`,
//! `NO_SPACE`, `BUSY`, `BAD_BLOCK`, `NOT_ALIGNED`, ...) and a short reason; every error
//! that reaches the wire says its code through [`wire::WireCode`].
//!
//! # Versions
//!
//! The newest version is [`wire::VERSION`] (4); the oldest still read is
//! [`wire::OLDEST_VERSION`] (1). A frame carries the oldest version that can say what
//! it holds, so a peer of version 2 reads every message of a job without a relay or a
//! TLS lane.
//!
//! - Version 1: the first. Its offers carry no permission bits; their files get
//!   [`wire::LEGACY_MODE`] (0644). Held-job journals written then are still read, and
//!   keep the job id they had ([`wire::Offer::legacy_job_id`]).
//! - Version 2: each file of an offer carries its permission bits (at most 0777); the
//!   job id also covers key spans and metadata.
//! - Version 3: relays and ships. An offer may name the replicas after its receiver;
//!   `Replicas`, `Ship` and `Progress` are new. Data streams did not change and keep
//!   version 2 in their header.
//! - Version 4: the encrypted TCP lane. An `Accept`'s lane byte may be 2 (a TLS lane);
//!   it was 0 (none) or 1 (clear text, the only lane before).
//!
//! # Verification
//!
//! A file's identity is its plain blake3 hash, what `b3sum` prints. The file is cut into
//! blocks of [`blocks::BLOCK_SIZE`] (1 MiB, a power of two number of blake3 chunks);
//! each block's chaining value is computed with blake3's `hazmat` API at its offset, and
//! the values merge, by blake3's own tree rule, into the root ([`blocks`]). An offer
//! carries each file's root and its block values (32 bytes per MiB); a file of one block
//! or less carries none and its block is checked against the root directly. The
//! receiver first checks that every list merges to its root ([`job::ReceiveJob::new`],
//! which also checks every name with [`path`]), then checks each block as it arrives,
//! before writing it. A bad block fails the job; a job may commit only when every block
//! verified.
//!
//! # A job
//!
//! A job is the set of files of one offer into one target, staged, verified and handed
//! to the target's import hook as a whole, or not at all. Its id
//! ([`wire::Offer::job_id`]) is derived from everything the hook is given (target,
//! names, sizes, roots, key spans, metadata), never taken from the peer: the same job
//! sent again finds what it staged before.
//!
//! ```text
//! sender                                   receiver
//!   Offer  ─────────────────────────────▶      validate names and block lists
//!          ◀─────────────────────────────  Accept (blocks held) | Reject
//!   data streams: the blocks not held ══▶      verify each block, write it
//!   Commit (streams used) | Abort ──────▶      wait for those streams, sync, run the hook
//!          ◀───────────  (Replicas, from a relay)
//!          ◀─────────────────────────────  Committed | Held | Failed
//! ```
//!
//! The order is kept by two state machines without I/O ([`session`]), which the agent
//! and the client drive over QUIC and the TCP lane, and a seeded simulation drives over
//! a faulty in-memory network (`tests/sim.rs`). A driver feeds a machine what happened
//! (a message, a block written, a data stream read to its end, the hook's result, the
//! time) and carries out what it asks for.
//!
//! - The [`session::Sender`] sends the offer, turns an accept into a plan of data
//!   streams, asks the receiver to commit once every stream is sent, and ends with the
//!   receiver's answer. A lane that fails makes it wait [`session::REPLY_GRACE`] for the
//!   receiver's own reason; a source file that changed makes it send `Abort`.
//! - The [`session::Receiver`] sends the accept, records blocks as they are written,
//!   and at `Commit` waits for the streams the sender used; then it asks its driver to
//!   seal the job (sync what was staged) and run the import hook, and answers
//!   `Committed`, or `Held` for a job offered with `hold`. A job that failed or was
//!   aborted waits for its writes under way (at most [`session::WRITES_GRACE`]) and then
//!   asks for its staging to be removed. A job that committed before is answered by
//!   [`session::Receiver::confirm`]: every block held, and the recorded report.
//! - A message out of order ends the job with a [`session::ProtocolError`] that names
//!   what was expected and what came (`expected commit, got held`).
//! - A held job is committed or aborted later on a request of its own
//!   ([`JobOp`](wire::Message::JobOp)), answered `Committed` or `Aborted`.
//! - A relay is a receiver whose offer names further replicas: it offers the job to the
//!   next replica (with the rest of the list) and forwards each block once it verified
//!   and wrote it;
//!   before its last word it reports how the job ended on each replica after it
//!   ([`Replicas`](wire::Message::Replicas)).
//! - A ship is answered with [`Progress`](wire::Message::Progress) now and then, then
//!   `Replicas` and `Committed` (every replica has the job) or `Failed`.
//!
//! # Limits
//!
//! Every limit is a constant of [`limits`], checked before allocating: a control message
//! of at most [`limits::MAX_MESSAGE`] (64 MiB); [`limits::MAX_FILES`] (100,000) files per
//! job of at most [`limits::MAX_FILE_SIZE`] (1 TiB) each; names of at most
//! [`limits::MAX_PATH_LEN`] (4,096) bytes, [`limits::MAX_COMPONENT_LEN`] (255) per
//! component and [`limits::MAX_DEPTH`] (64) components; target, export and metadata
//! key names of [`limits::MAX_NAME_LEN`] (255) bytes; [`limits::MAX_META`] (64) metadata
//! entries of at most [`limits::MAX_META_VALUE`] (4 KiB); reasons and reports of
//! [`limits::MAX_REASON_LEN`] (16 KiB); keys of [`limits::MAX_KEY_LEN`] (64 KiB);
//! [`limits::MAX_LISTED_JOBS`] (10,000) jobs in a listing; [`limits::MAX_STREAMS`] (8)
//! data streams per job; [`limits::MAX_HOPS`] (16) replicas after the first in a relay
//! chain or ship, each named in at most [`limits::MAX_PEER_LEN`] (512) bytes. The agent
//! adds its own before it reads a request (a first message of at most 64 KiB unless it
//! is an offer into a target the peer may write to, found by
//! [`wire::Message::peek_offer_target`]) and per identity; those are in
//! `systemd/README.md`.

pub mod blocks;
pub mod job;
pub mod keys;
pub mod path;
pub mod session;
pub mod wire;

/// Every limit the protocol enforces, in one place.
pub mod limits {
    /// Largest control message body, in bytes.
    pub const MAX_MESSAGE: u64 = 64 << 20;
    /// Most files in one job.
    pub const MAX_FILES: usize = 100_000;
    /// Longest relative file name, in bytes.
    pub const MAX_PATH_LEN: usize = 4096;
    /// Longest single name component, in bytes.
    pub const MAX_COMPONENT_LEN: usize = 255;
    /// Most components in one name.
    pub const MAX_DEPTH: usize = 64;
    /// Largest file: 1 TiB (its block list is then 32 MiB).
    pub const MAX_FILE_SIZE: u64 = 1 << 40;
    /// Longest target or export name, and metadata key.
    pub const MAX_NAME_LEN: usize = 255;
    /// Most metadata entries in an offer.
    pub const MAX_META: usize = 64;
    /// Longest metadata value.
    pub const MAX_META_VALUE: usize = 4096;
    /// Longest reason or report text.
    pub const MAX_REASON_LEN: usize = 16 << 10;
    /// Longest user key in a key range or span (RocksDB keys are usually far shorter).
    pub const MAX_KEY_LEN: usize = 64 << 10;
    /// Most jobs in one `Jobs` listing.
    pub const MAX_LISTED_JOBS: usize = 10_000;
    /// Data streams a sender opens per job at most.
    pub const MAX_STREAMS: usize = 8;
    /// Most replicas after the first in a relay chain.
    pub const MAX_HOPS: usize = 16;
    /// Longest peer (`NAME@ADDR:PORT`) in a relay chain.
    pub const MAX_PEER_LEN: usize = 512;
}
