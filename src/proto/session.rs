//! The job protocol's order, as two state machines with no I/O: the [`Sender`] of a
//! job (a pushing client, an agent serving a pull) and its [`Receiver`] (an agent's
//! import, a pulling client).
//!
//! Before these existed the order (offer, accept or reject, commit or abort,
//! committed, held or failed) was coded by hand in every place that sent or received a
//! job, so a rule could only be tested over real sockets. Now a driver feeds a machine
//! what happened (a control message, a block written, a data stream read to its end,
//! the hook's result, the time) and carries out what it asks for (send this message,
//! send these lanes, seal, run the hook, remove the staging, finish), the way
//! quinn-proto's connection is driven by quinn. The same machines run under
//! `transfer` over QUIC and TCP, and in the seeded simulation (`tests/sim.rs`) over an
//! in-memory network that loses, reorders and corrupts what they say.
//!
//! Time is whatever [`Instant`] the driver passes: the machines never read a clock.

use super::job::{JobError, ReceiveJob, SendPlan};
use super::limits::MAX_STREAMS;
use super::wire::{code, cut_reason, JobId, Message, Offer, Refusal, ReplicaResult, TcpGrant, WireCode};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A message that broke the protocol's order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol violation: expected {expected}, got {got}")]
pub struct ProtocolError {
    /// What the machine was waiting for.
    pub expected: &'static str,
    /// What came instead (a message's kind, or "the end of the stream").
    pub got: &'static str,
}

impl ProtocolError {
    /// `got` in place of `expected`.
    pub fn new(expected: &'static str, got: &Message) -> ProtocolError {
        ProtocolError {
            expected,
            got: got.kind(),
        }
    }

    /// The control stream ended while `expected` was awaited.
    pub fn ended(expected: &'static str) -> ProtocolError {
        ProtocolError {
            expected,
            got: "the end of the stream",
        }
    }
}

/// How long a side waits for the other's last word: the receiver's reason after a data
/// lane failed, or the acknowledgement of an abort.
pub const REPLY_GRACE: Duration = Duration::from_secs(5);

/// How long a failed job waits for its block writes under way to end before it is
/// given up anyway.
pub const WRITES_GRACE: Duration = Duration::from_secs(30);

/// How a sender's job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendEnd {
    /// Committed; the receiver's hook report.
    Committed(String),
    /// Staged and held on the receiver, waiting for a commit or abort.
    Held(JobId),
    /// Refused before any data moved.
    Rejected(Refusal),
    /// Failed at the receiver after it was accepted.
    Failed(Refusal),
    /// The receiver broke the protocol.
    Protocol(ProtocolError),
    /// The accept does not fit the offer.
    BadAccept(JobError),
    /// The sender's own failure (a lane, a changed source) stands: the receiver gave no
    /// reason of its own.
    Own,
}

/// What a [`Sender`] asks its driver to do.
#[derive(Debug)]
pub enum SendAction {
    /// Write this message on the control stream.
    Send(Message),
    /// Send these lanes, over the TCP lane if `tcp` is granted, and report
    /// [`Sender::lanes_done`] or [`Sender::lanes_failed`].
    Lanes {
        /// The blocks to send, per stream.
        plan: SendPlan,
        /// The TCP lane to send them on, if the receiver granted it.
        tcp: Option<TcpGrant>,
    },
    /// The job is over; nothing more will be asked.
    Finish(SendEnd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendState {
    Offered,
    Sending {
        streams: u32,
    },
    Committing,
    /// A lane failed: wait briefly for the receiver's reason.
    Explaining {
        until: Instant,
    },
    /// Abort sent: wait briefly for the acknowledgement.
    Aborting {
        until: Instant,
    },
    Done,
}

/// The sending side of one job.
#[derive(Debug)]
pub struct Sender {
    offer: Offer,
    state: SendState,
    out: VecDeque<SendAction>,
    /// Whether the offer asked for the TCP lane.
    tcp_lane: bool,
    max_lanes: usize,
    /// What a relay said about the replicas after it.
    replicas: Vec<ReplicaResult>,
}

impl Sender {
    /// A sender of `offer` that spreads blocks over at most `max_lanes` streams; its
    /// first action sends the offer.
    pub fn new(offer: Offer, max_lanes: usize) -> Sender {
        let mut out = VecDeque::new();
        out.push_back(SendAction::Send(Message::Offer(offer.clone())));
        Sender {
            tcp_lane: offer.tcp_lane,
            offer,
            state: SendState::Offered,
            out,
            max_lanes,
            replicas: vec![],
        }
    }

    /// The offer this job sends.
    pub fn offer(&self) -> &Offer {
        &self.offer
    }

    /// How the job ended on the replicas after the receiver, as the receiver (a relay)
    /// reported it; empty for a job without a relay.
    pub fn replicas(&self) -> &[ReplicaResult] {
        &self.replicas
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<SendAction> {
        self.out.pop_front()
    }

    /// When [`Sender::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            SendState::Explaining { until } | SendState::Aborting { until } => Some(until),
            _ => None,
        }
    }

    /// Whether the job ended (a [`SendAction::Finish`] was given).
    pub fn is_done(&self) -> bool {
        self.state == SendState::Done
    }

    /// Whether the job was accepted (a lost connection then may leave part of it staged).
    pub fn accepted(&self) -> bool {
        !matches!(self.state, SendState::Offered)
    }

    fn finish(&mut self, end: SendEnd) {
        if self.state != SendState::Done {
            self.state = SendState::Done;
            self.out.push_back(SendAction::Finish(end));
        }
    }

    /// A message from the receiver.
    pub fn handle_message(&mut self, msg: Message) {
        match (self.state, msg) {
            (SendState::Offered, Message::Accept { have, tcp }) => self.accepted_with(&have, tcp),
            (SendState::Offered, Message::Reject(r)) => self.finish(SendEnd::Rejected(r)),
            (SendState::Offered, m) => self.finish(SendEnd::Protocol(ProtocolError::new("accept", &m))),
            // A relay reports its replicas once, before its own last word; only
            // replicas the offer named.
            (
                SendState::Sending { .. } | SendState::Committing | SendState::Explaining { .. },
                Message::Replicas(r),
            ) if self.replicas.is_empty() && self.named(&r) => self.replicas = r,
            (SendState::Committing, Message::Committed { report }) => self.finish(SendEnd::Committed(report)),
            (SendState::Committing, Message::Held { job }) => self.finish(SendEnd::Held(job)),
            // The receiver's acknowledgement of our abort: our own reason stands.
            (SendState::Aborting { .. }, _) => self.finish(SendEnd::Own),
            (_, Message::Failed(r)) => self.finish(SendEnd::Failed(r)),
            (SendState::Explaining { .. }, _) => self.finish(SendEnd::Own),
            (SendState::Committing, m) => self.finish(SendEnd::Protocol(ProtocolError::new("committed", &m))),
            (SendState::Sending { .. }, m) => {
                self.finish(SendEnd::Protocol(ProtocolError::new("nothing while sending", &m)))
            }
            (SendState::Done, _) => {}
        }
    }

    fn named(&self, replicas: &[ReplicaResult]) -> bool {
        let hops = &self.offer.relay;
        replicas.len() <= hops.len() && replicas.iter().all(|r| hops.iter().any(|h| h.peer == r.peer))
    }

    fn accepted_with(&mut self, have: &[Vec<u8>], tcp: Option<TcpGrant>) {
        match SendPlan::new(&self.offer, have, self.max_lanes) {
            Ok(plan) => {
                let streams = plan.lanes.len() as u32;
                self.state = SendState::Sending { streams };
                let tcp = tcp.filter(|_| self.tcp_lane);
                self.out.push_back(SendAction::Lanes { plan, tcp });
            }
            Err(e) => self.finish(SendEnd::BadAccept(e)),
        }
    }

    /// The control stream ended (or the connection was lost) before the last answer.
    pub fn handle_end(&mut self) {
        let end = match self.state {
            SendState::Offered => SendEnd::Protocol(ProtocolError::ended("accept")),
            SendState::Committing => SendEnd::Protocol(ProtocolError::ended("committed")),
            _ => SendEnd::Own,
        };
        self.finish(end);
    }

    /// Every lane is sent and acknowledged: ask the receiver to commit.
    pub fn lanes_done(&mut self) {
        if let SendState::Sending { streams } = self.state {
            self.state = SendState::Committing;
            self.out.push_back(SendAction::Send(Message::Commit { streams }));
        }
    }

    /// A lane failed. A changed source (`abort`) tells the receiver to drop the job;
    /// anything else waits briefly for the receiver's own reason (it may have failed
    /// the job and stopped reading).
    pub fn lanes_failed(&mut self, abort: bool, now: Instant) {
        if !matches!(self.state, SendState::Sending { .. }) {
            return;
        }
        self.wait_for_reason(abort, now);
    }

    /// A message could not be written (the receiver may have failed the job and
    /// stopped reading): wait briefly for its reason.
    pub fn send_failed(&mut self, now: Instant) {
        if matches!(self.state, SendState::Sending { .. } | SendState::Committing) {
            self.wait_for_reason(false, now);
        }
    }

    fn wait_for_reason(&mut self, abort: bool, now: Instant) {
        let until = now + REPLY_GRACE;
        if abort {
            self.state = SendState::Aborting { until };
            self.out.push_back(SendAction::Send(Message::Abort));
        } else {
            self.state = SendState::Explaining { until };
        }
    }

    /// Ends the job with its own failure once the wait for the receiver's reason, or for
    /// its answer to an abort, passed `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|t| now >= t) {
            self.finish(SendEnd::Own);
        }
    }
}

/// How a receiver's job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvEnd {
    /// Committed; the hook's report.
    Committed(String),
    /// Staged, verified and synced; waiting for a commit or abort.
    Held,
    /// The sender aborted; the staging is removed.
    Aborted,
    /// Failed; the sender was told why.
    Failed(Refusal),
}

/// What the import hook made of a sealed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookEnd {
    /// The hook committed the job; its report.
    Committed(String),
    /// The job is held for a separate commit or abort.
    Held,
}

/// What a [`Receiver`] asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvAction {
    /// Write this message on the control stream.
    Send(Message),
    /// Every block is in: sync the staged files, then report [`Receiver::sealed`].
    Seal,
    /// Run the import hook on the sealed job, then report [`Receiver::hook_done`].
    RunHook,
    /// Remove what the job staged.
    RemoveStaging,
    /// The job is over; nothing more will be asked.
    Finish(RecvEnd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvState {
    Receiving,
    /// Commit asked for; waiting for this many data streams (or every block).
    Committing {
        streams: u32,
    },
    Sealing,
    Hooking,
    /// Failed or aborted: waiting for block writes under way to end.
    Ending {
        until: Instant,
        aborted: bool,
    },
    /// Confirming a job that committed before.
    Confirming,
    Done,
}

/// The receiving side of one accepted job: which blocks are in, which writes are under
/// way, and what comes next.
#[derive(Debug)]
pub struct Receiver {
    job: ReceiveJob,
    state: RecvState,
    out: VecDeque<RecvAction>,
    streams_done: u32,
    writing: u32,
    error: Option<Refusal>,
    last_block: Instant,
    /// The latest time the driver passed.
    now: Instant,
    stall: Option<Duration>,
    /// The report to confirm, for a job that committed before.
    confirmed: Option<String>,
}

impl Receiver {
    /// Accepts `job`: the first action sends `Accept` (with `tcp`, if granted). A job
    /// whose sender sends nothing for `stall` before its commit is given up.
    pub fn accept(job: ReceiveJob, tcp: Option<TcpGrant>, stall: Option<Duration>, now: Instant) -> Receiver {
        let mut accept = job.accept();
        if let Message::Accept { tcp: t, .. } = &mut accept {
            *t = tcp;
        }
        let mut r = Receiver::with(job, RecvState::Receiving, stall, now);
        r.out.push_back(RecvAction::Send(accept));
        r
    }

    /// Answers the offer of a job that committed before (sent again after a crash or a
    /// lost answer): every block is held, and a commit is confirmed with `report`.
    pub fn confirm(job: ReceiveJob, report: String, now: Instant) -> Receiver {
        let mut r = Receiver::with(job, RecvState::Confirming, None, now);
        r.out.push_back(RecvAction::Send(r.job.accept_all()));
        r.confirmed = Some(report);
        r
    }

    fn with(job: ReceiveJob, state: RecvState, stall: Option<Duration>, now: Instant) -> Receiver {
        Receiver {
            job,
            state,
            out: VecDeque::new(),
            streams_done: 0,
            writing: 0,
            error: None,
            last_block: now,
            now,
            stall,
            confirmed: None,
        }
    }

    /// The job's names and the blocks verified so far.
    pub fn job(&self) -> &ReceiveJob {
        &self.job
    }

    /// Adds the TCP lane's grant to the `Accept` not yet sent (the lane can be opened
    /// only once the job is registered, after the machine is made).
    pub fn grant_tcp(&mut self, grant: TcpGrant) {
        for a in &mut self.out {
            if let RecvAction::Send(Message::Accept { tcp, .. }) = a {
                *tcp = Some(grant);
            }
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<RecvAction> {
        self.out.pop_front()
    }

    /// Whether an action waits (the data path wakes the driver only then).
    pub fn has_action(&self) -> bool {
        !self.out.is_empty()
    }

    /// When [`Receiver::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            RecvState::Ending { until, .. } => Some(until),
            RecvState::Receiving | RecvState::Committing { .. } => self.stall.map(|s| self.last_block + s),
            _ => None,
        }
    }

    /// Whether the job ended (a [`RecvAction::Finish`] was given).
    pub fn is_done(&self) -> bool {
        self.state == RecvState::Done
    }

    /// The failure the job ended with, if it failed.
    pub fn error(&self) -> Option<&Refusal> {
        self.error.as_ref()
    }

    /// Every block is in and the commit asked for: the rest is the receiver's own work.
    pub fn data_in(&self) -> bool {
        matches!(self.state, RecvState::Sealing | RecvState::Hooking)
    }

    /// A message from the sender.
    pub fn handle_message(&mut self, msg: Message) {
        match (self.state, msg) {
            (RecvState::Confirming, Message::Commit { .. }) => {
                let report = self.confirmed.take().unwrap_or_default();
                self.send(Message::Committed { report: report.clone() });
                self.end(RecvEnd::Committed(report));
            }
            (RecvState::Confirming, Message::Abort) => {
                let r = Refusal::new(code::ABORTED, "aborted by the sender");
                self.send(Message::Failed(r.clone()));
                self.end(RecvEnd::Failed(r));
            }
            (RecvState::Receiving, Message::Commit { streams }) if streams as usize > MAX_STREAMS => {
                self.fail(Refusal::new(code::LIMIT, format!("{streams} data streams")))
            }
            (RecvState::Receiving, Message::Commit { streams }) => {
                self.state = RecvState::Committing { streams };
                self.check();
            }
            (RecvState::Receiving | RecvState::Committing { .. }, Message::Abort) => self.abort(),
            (RecvState::Done | RecvState::Ending { .. }, _) => {}
            (_, m) => self.fail(ProtocolError::new("commit", &m).refusal()),
        }
    }

    /// The control stream ended before the job did.
    pub fn handle_end(&mut self) {
        match self.state {
            RecvState::Done | RecvState::Ending { .. } => {}
            RecvState::Confirming => self.end(RecvEnd::Failed(ProtocolError::ended("commit").refusal())),
            _ => self.fail(ProtocolError::ended("commit").refusal()),
        }
    }

    /// A verified block is about to be written; false if the job ended and takes none.
    pub fn write_started(&mut self) -> bool {
        let open = self.error.is_none() && matches!(self.state, RecvState::Receiving | RecvState::Committing { .. });
        self.writing += open as u32;
        open
    }

    /// A block's write ended well.
    pub fn block_written(&mut self, file: u32, block: u32, now: Instant) {
        self.writing = self.writing.saturating_sub(1);
        self.job.record(file, block);
        self.last_block = now;
        self.now = self.now.max(now);
        self.check();
    }

    /// A block's write failed with `why`.
    pub fn write_failed(&mut self, why: Refusal) {
        self.writing = self.writing.saturating_sub(1);
        self.fail(why);
        self.check();
    }

    /// A data stream was read to its end and its writes are done.
    pub fn stream_done(&mut self) {
        self.streams_done += 1;
        self.check();
    }

    /// A data stream failed (a bad block, a wrong length) with `why`.
    pub fn stream_failed(&mut self, why: Refusal) {
        self.fail(why);
    }

    /// The staged files are synced (or could not be).
    pub fn sealed(&mut self, result: Result<(), Refusal>) {
        if self.state != RecvState::Sealing {
            return;
        }
        match result {
            Ok(()) => {
                self.state = RecvState::Hooking;
                self.out.push_back(RecvAction::RunHook);
            }
            Err(r) => self.fail_now(r),
        }
    }

    /// The replicas after this one (a relay's) ended as `results`: the sender hears it
    /// before this job's own last word. Only while the hook runs (the relay waits for
    /// them before it runs its own hook).
    pub fn relayed(&mut self, results: Vec<ReplicaResult>) {
        if self.state == RecvState::Hooking && !results.is_empty() {
            self.send(Message::Replicas(results));
        }
    }

    /// The import hook ended.
    pub fn hook_done(&mut self, result: Result<HookEnd, Refusal>) {
        if self.state != RecvState::Hooking {
            return;
        }
        match result {
            Ok(HookEnd::Committed(report)) => {
                let report = cut_reason(report);
                self.send(Message::Committed { report: report.clone() });
                self.end(RecvEnd::Committed(report));
            }
            Ok(HookEnd::Held) => {
                self.send(Message::Held { job: self.job.id });
                self.end(RecvEnd::Held);
            }
            Err(r) => self.fail_now(r),
        }
    }

    /// A newer attempt of the same sender takes the job over.
    pub fn take_over(&mut self) -> bool {
        let running = self.error.is_none() && self.state != RecvState::Done && !self.data_in();
        self.fail(Refusal::new(
            code::ABORTED,
            "taken over by a newer attempt of the same sender",
        ));
        running
    }

    /// The connection was lost: the job is given up (what is staged stays for a resume).
    pub fn connection_lost(&mut self, why: &str) {
        self.fail(Refusal::new(code::ABORTED, why.to_string()));
    }

    /// The time is `now`: deadlines that passed take effect. A driver calls this before
    /// it feeds other events, so a failure's grace is counted from when it happened.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        match self.state {
            RecvState::Ending { until, .. } if now >= until => {
                self.writing = 0;
                self.check();
            }
            RecvState::Receiving | RecvState::Committing { .. } => {
                if let Some(stall) = self.stall.filter(|s| now >= self.last_block + *s) {
                    let secs = stall.as_secs();
                    self.fail(Refusal::new(
                        code::ABORTED,
                        format!("no data arrived for {secs}s: the job was given up; send it again to resume"),
                    ));
                }
            }
            _ => {}
        }
    }

    fn send(&mut self, msg: Message) {
        self.out.push_back(RecvAction::Send(msg));
    }

    fn end(&mut self, end: RecvEnd) {
        self.state = RecvState::Done;
        self.out.push_back(RecvAction::Finish(end));
    }

    fn abort(&mut self) {
        self.error = Some(Refusal::new(code::ABORTED, "aborted by the sender"));
        self.state = RecvState::Ending {
            until: self.now + WRITES_GRACE,
            aborted: true,
        };
        self.check();
    }

    /// Fails the job with `why` unless it failed already. Once every block is in, only
    /// the seal or the hook can fail it: a late lane error or a take-over must not cut
    /// off a hook that may be committing.
    fn fail(&mut self, why: Refusal) {
        if self.data_in() {
            return;
        }
        self.fail_now(why);
    }

    fn fail_now(&mut self, why: Refusal) {
        if self.error.is_some() || self.state == RecvState::Done {
            return;
        }
        self.error = Some(why);
        self.state = RecvState::Ending {
            until: self.now + WRITES_GRACE,
            aborted: false,
        };
        self.check();
    }

    /// Moves on when what the state waits for has happened.
    fn check(&mut self) {
        match self.state {
            RecvState::Committing { streams } if self.streams_done >= streams || self.job.missing() == 0 => {
                if self.writing > 0 {
                    return;
                }
                match self.job.check_complete() {
                    Ok(()) => {
                        self.state = RecvState::Sealing;
                        self.out.push_back(RecvAction::Seal);
                    }
                    Err(e) => self.fail(e.refusal()),
                }
            }
            RecvState::Ending { aborted, .. } if self.writing == 0 => {
                let why = self.error.clone().expect("an ending job has its reason");
                // Short of space, what was staged goes: keeping it would leave the file
                // system full for the engine. An abort drops it too.
                if aborted || why.code == code::NO_SPACE {
                    self.out.push_back(RecvAction::RemoveStaging);
                }
                self.send(Message::Failed(why.clone()));
                self.end(if aborted {
                    RecvEnd::Aborted
                } else {
                    RecvEnd::Failed(why)
                });
            }
            _ => {}
        }
    }
}

/// What a stream asks for, by its first message.
#[derive(Debug)]
pub enum Opening {
    /// A push: the offer of a job into an import target.
    Push(Offer),
    /// A pull: the agent sends a job out of an export.
    Pull {
        /// The export to read from.
        export: String,
        /// Names of files in the export; empty: all.
        files: Vec<String>,
        /// For an SST export: only files whose keys lie in this range.
        range: Option<super::keys::KeyRange>,
    },
    /// A request with one answer: a listing, the jobs, a held job's commit or abort.
    Request(Message),
    /// A third-party ship: the agent sends an export's files to other agents.
    Ship(super::wire::Ship),
}

/// Reads a stream's first message; only those that open something may come first.
pub fn opening(msg: Message) -> Result<Opening, ProtocolError> {
    match msg {
        Message::Offer(o) => Ok(Opening::Push(o)),
        Message::Fetch { export, files, range } => Ok(Opening::Pull { export, files, range }),
        m @ (Message::JobOp { .. } | Message::ListJobs | Message::List { .. }) => Ok(Opening::Request(m)),
        Message::Ship(sh) => Ok(Opening::Ship(sh)),
        other => Err(ProtocolError::new(
            "a stream to start with an offer, fetch, job operation or listing",
            &other,
        )),
    }
}

/// Why a request got no answer of the kind it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerError {
    /// The agent refused the request.
    Rejected(Refusal),
    /// The request failed at the agent.
    Failed(Refusal),
    /// The answer was not one the request can get.
    Protocol(ProtocolError),
}

/// Checks that `got` answers `request`: a listing for a listing, the jobs for the jobs,
/// `committed` or `aborted` for a job operation, an offer for a fetch (a pull).
pub fn check_answer(request: &Message, got: Message) -> Result<Message, AnswerError> {
    use super::wire::JobOp;
    let expected = match request {
        Message::List { .. } => "a listing",
        Message::ListJobs => "a job list",
        Message::JobOp { op: JobOp::Commit, .. } => "committed",
        Message::JobOp { op: JobOp::Abort, .. } => "aborted",
        Message::Fetch { .. } => "an offer",
        _ => "nothing",
    };
    match (request, got) {
        (_, Message::Reject(r)) => Err(AnswerError::Rejected(r)),
        (_, Message::Failed(r)) => Err(AnswerError::Failed(r)),
        (Message::List { .. }, m @ Message::Listing(_))
        | (Message::ListJobs, m @ Message::Jobs(_))
        | (Message::JobOp { op: JobOp::Commit, .. }, m @ Message::Committed { .. })
        | (Message::JobOp { op: JobOp::Abort, .. }, m @ Message::Aborted)
        | (Message::Fetch { .. }, m @ Message::Offer(_)) => Ok(m),
        (_, other) => Err(AnswerError::Protocol(ProtocolError::new(expected, &other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::job::testing;

    fn offer(files: &[(&str, &[u8])]) -> Offer {
        testing::offer(files.iter().map(|(p, d)| testing::file(p, d)).collect())
    }

    fn drain_send(s: &mut Sender) -> Vec<SendAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn drain_recv(r: &mut Receiver) -> Vec<RecvAction> {
        std::iter::from_fn(|| r.poll_action()).collect()
    }

    #[test]
    fn a_push_runs_offer_accept_lanes_commit_committed() {
        let now = Instant::now();
        let o = offer(&[("a", b"hello"), ("b", b"world")]);
        let mut s = Sender::new(o.clone(), 4);
        let Some(SendAction::Send(Message::Offer(sent))) = s.poll_action() else {
            panic!()
        };
        let mut r = Receiver::accept(ReceiveJob::new(sent).unwrap(), None, None, now);
        let Some(RecvAction::Send(accept)) = r.poll_action() else {
            panic!()
        };
        s.handle_message(accept);
        let Some(SendAction::Lanes { plan, tcp: None }) = s.poll_action() else {
            panic!()
        };
        assert_eq!(plan.blocks(), 2);
        for (lane, blocks) in plan.lanes.iter().enumerate() {
            for b in blocks {
                assert!(r.write_started(), "lane {lane}");
                r.block_written(b.file, b.block, now);
            }
        }
        s.lanes_done();
        let Some(SendAction::Send(commit)) = s.poll_action() else {
            panic!()
        };
        r.handle_message(commit);
        assert_eq!(drain_recv(&mut r), vec![RecvAction::Seal]);
        r.sealed(Ok(()));
        assert_eq!(drain_recv(&mut r), vec![RecvAction::RunHook]);
        r.hook_done(Ok(HookEnd::Committed("ok".into())));
        let acts = drain_recv(&mut r);
        assert_eq!(acts[1], RecvAction::Finish(RecvEnd::Committed("ok".into())));
        let RecvAction::Send(done) = acts[0].clone() else {
            panic!()
        };
        s.handle_message(done);
        assert!(matches!(drain_send(&mut s)[..], [SendAction::Finish(SendEnd::Committed(ref r))] if r == "ok"));
        assert!(s.is_done() && r.is_done());
    }

    fn replica(peer: &str, outcome: super::super::wire::ReplicaOutcome) -> ReplicaResult {
        ReplicaResult {
            peer: peer.into(),
            target: "in".into(),
            outcome,
            job: JobId::default(),
            code: 0,
            text: "moved".into(),
            bytes: 5,
        }
    }

    #[test]
    fn a_relay_reports_its_replicas_before_its_own_last_word() {
        use super::super::wire::{Hop, ReplicaOutcome};
        let now = Instant::now();
        let mut o = offer(&[("a", b"hello")]);
        o.relay = vec![Hop {
            peer: "c@127.0.0.1:1".into(),
            target: "in".into(),
        }];
        let mut s = Sender::new(o.clone(), 4);
        drain_send(&mut s);
        let mut r = Receiver::accept(ReceiveJob::new(o).unwrap(), None, None, now);
        let Some(RecvAction::Send(accept)) = r.poll_action() else {
            panic!()
        };
        s.handle_message(accept);
        drain_send(&mut s);
        r.block_written(0, 0, now);
        s.lanes_done();
        let Some(SendAction::Send(commit)) = s.poll_action() else {
            panic!()
        };
        // Before the hook runs, a relay's replicas are not reported.
        r.relayed(vec![replica("c@127.0.0.1:1", ReplicaOutcome::Committed)]);
        r.handle_message(commit);
        assert_eq!(drain_recv(&mut r), vec![RecvAction::Seal]);
        r.sealed(Ok(()));
        assert_eq!(drain_recv(&mut r), vec![RecvAction::RunHook]);
        r.relayed(vec![replica("c@127.0.0.1:1", ReplicaOutcome::Committed)]);
        r.hook_done(Ok(HookEnd::Committed("ok".into())));
        let acts = drain_recv(&mut r);
        assert_eq!(acts.len(), 3, "{acts:?}");
        for act in acts {
            if let RecvAction::Send(m) = act {
                s.handle_message(m);
            }
        }
        assert!(matches!(
            drain_send(&mut s)[..],
            [SendAction::Finish(SendEnd::Committed(_))]
        ));
        assert_eq!(s.replicas(), [replica("c@127.0.0.1:1", ReplicaOutcome::Committed)]);
    }

    #[test]
    fn replicas_the_offer_did_not_name_break_the_protocol() {
        use super::super::wire::ReplicaOutcome;
        let o = offer(&[("a", b"hello")]);
        let mut s = Sender::new(o.clone(), 4);
        drain_send(&mut s);
        let job = ReceiveJob::new(o).unwrap();
        s.handle_message(job.accept());
        drain_send(&mut s);
        s.handle_message(Message::Replicas(vec![replica(
            "x@127.0.0.1:1",
            ReplicaOutcome::Failed,
        )]));
        let end = drain_send(&mut s);
        assert!(
            matches!(&end[..], [SendAction::Finish(SendEnd::Protocol(p))] if p.got == "replicas"),
            "{end:?}"
        );
        assert!(s.replicas().is_empty());
    }

    #[test]
    fn a_commit_before_every_block_is_in_waits_for_the_streams_then_fails_incomplete() {
        let now = Instant::now();
        let o = offer(&[("a", b"hello"), ("b", b"world")]);
        let mut r = Receiver::accept(ReceiveJob::new(o).unwrap(), None, None, now);
        drain_recv(&mut r);
        r.write_started();
        r.block_written(0, 0, now);
        r.handle_message(Message::Commit { streams: 1 });
        assert!(drain_recv(&mut r).is_empty(), "waits for its one stream");
        r.stream_done();
        let acts = drain_recv(&mut r);
        let [RecvAction::Send(Message::Failed(f)), RecvAction::Finish(RecvEnd::Failed(_))] = &acts[..] else {
            panic!("{acts:?}")
        };
        assert_eq!(f.code, code::INCOMPLETE);
    }

    #[test]
    fn a_failure_waits_for_writes_under_way_and_space_failures_remove_the_staging() {
        let now = Instant::now();
        let o = offer(&[("a", b"hello"), ("b", b"world")]);
        let mut r = Receiver::accept(ReceiveJob::new(o).unwrap(), None, None, now);
        drain_recv(&mut r);
        assert!(r.write_started() && r.write_started());
        r.write_failed(Refusal::new(code::NO_SPACE, "full"));
        assert!(drain_recv(&mut r).is_empty(), "one write still under way");
        assert!(!r.write_started(), "a failed job takes no more writes");
        r.block_written(1, 0, now);
        let acts = drain_recv(&mut r);
        assert_eq!(acts[0], RecvAction::RemoveStaging);
        assert!(matches!(&acts[2], RecvAction::Finish(RecvEnd::Failed(f)) if f.code == code::NO_SPACE));
    }

    #[test]
    fn writes_that_never_end_are_given_up_after_the_grace() {
        let now = Instant::now();
        let mut r = Receiver::accept(ReceiveJob::new(offer(&[("a", b"x")])).unwrap(), None, None, now);
        drain_recv(&mut r);
        r.write_started();
        r.stream_failed(Refusal::new(code::BAD_BLOCK, "bad"));
        assert!(drain_recv(&mut r).is_empty());
        assert_eq!(r.poll_timeout(), Some(now + WRITES_GRACE));
        r.handle_timeout(now + WRITES_GRACE);
        assert!(matches!(
            drain_recv(&mut r).last(),
            Some(RecvAction::Finish(RecvEnd::Failed(_)))
        ));
    }

    #[test]
    fn an_abort_removes_the_staging_and_is_acknowledged() {
        let now = Instant::now();
        let mut r = Receiver::accept(ReceiveJob::new(offer(&[("a", b"x")])).unwrap(), None, None, now);
        drain_recv(&mut r);
        r.handle_message(Message::Abort);
        let acts = drain_recv(&mut r);
        assert_eq!(acts[0], RecvAction::RemoveStaging);
        assert!(matches!(&acts[1], RecvAction::Send(Message::Failed(f)) if f.code == code::ABORTED));
        assert_eq!(acts[2], RecvAction::Finish(RecvEnd::Aborted));
    }

    #[test]
    fn a_sender_that_goes_quiet_is_given_up_but_not_once_the_data_is_in() {
        let now = Instant::now();
        let stall = Duration::from_secs(60);
        let mut r = Receiver::accept(ReceiveJob::new(offer(&[("a", b"x")])).unwrap(), None, Some(stall), now);
        drain_recv(&mut r);
        r.handle_timeout(now + stall / 2);
        assert!(drain_recv(&mut r).is_empty());
        r.handle_timeout(now + stall);
        let acts = drain_recv(&mut r);
        assert!(
            matches!(&acts[0], RecvAction::Send(Message::Failed(f)) if f.reason.contains("no data arrived for 60s"))
        );

        let mut r = Receiver::accept(ReceiveJob::new(offer(&[("a", b"x")])).unwrap(), None, Some(stall), now);
        r.write_started();
        r.block_written(0, 0, now);
        r.handle_message(Message::Commit { streams: 1 });
        assert!(r.data_in());
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn out_of_order_messages_are_named_protocol_errors() {
        let now = Instant::now();
        let o = offer(&[("a", b"x")]);
        let mut s = Sender::new(o.clone(), 1);
        drain_send(&mut s);
        s.handle_message(Message::Commit { streams: 1 });
        let acts = drain_send(&mut s);
        let [SendAction::Finish(SendEnd::Protocol(p))] = &acts[..] else {
            panic!("{acts:?}")
        };
        assert_eq!(p.to_string(), "protocol violation: expected accept, got commit");

        let mut r = Receiver::accept(ReceiveJob::new(o).unwrap(), None, None, now);
        drain_recv(&mut r);
        r.handle_message(Message::Held { job: JobId([0; 16]) });
        let acts = drain_recv(&mut r);
        let RecvAction::Send(Message::Failed(f)) = &acts[0] else {
            panic!("{acts:?}")
        };
        assert_eq!(f.code, code::BAD_MESSAGE);
        assert!(f.reason.contains("expected commit, got held"), "{f:?}");
        s = Sender::new(offer(&[("a", b"x")]), 1);
        drain_send(&mut s);
        s.handle_end();
        assert!(matches!(
            drain_send(&mut s)[..],
            [SendAction::Finish(SendEnd::Protocol(_))]
        ));
    }

    #[test]
    fn requests_take_only_their_own_answers_and_streams_open_only_with_requests() {
        use crate::proto::wire::JobOp;
        let job = JobId([1; 16]);
        let commit = Message::JobOp { op: JobOp::Commit, job };
        let done = Message::Committed { report: "r".into() };
        assert_eq!(check_answer(&commit, done.clone()), Ok(done.clone()));
        let wrong = check_answer(&Message::JobOp { op: JobOp::Abort, job }, done);
        let Err(AnswerError::Protocol(p)) = wrong else {
            panic!("{wrong:?}")
        };
        assert_eq!(p.to_string(), "protocol violation: expected aborted, got committed");
        let no = Refusal::new(code::NOT_FOUND, "no such job");
        assert_eq!(
            check_answer(&commit, Message::Reject(no.clone())),
            Err(AnswerError::Rejected(no))
        );
        assert!(matches!(
            check_answer(&Message::ListJobs, Message::Listing(vec![])),
            Err(AnswerError::Protocol(_))
        ));
        assert!(matches!(
            opening(Message::ListJobs),
            Ok(Opening::Request(Message::ListJobs))
        ));
        let e = opening(Message::Commit { streams: 1 }).unwrap_err();
        assert!(e.to_string().contains("start with an offer"), "{e}");
    }

    #[test]
    fn an_accept_that_does_not_fit_the_offer_ends_the_sender() {
        let mut s = Sender::new(offer(&[("a", b"x")]), 1);
        drain_send(&mut s);
        s.handle_message(Message::Accept {
            have: vec![],
            tcp: None,
        });
        assert!(matches!(
            drain_send(&mut s)[..],
            [SendAction::Finish(SendEnd::BadAccept(_))]
        ));
    }

    #[test]
    fn a_changed_source_aborts_and_a_failed_lane_waits_for_the_reason() {
        let now = Instant::now();
        let o = offer(&[("a", b"x")]);
        let accept = ReceiveJob::new(o.clone()).unwrap().accept();
        let mut s = Sender::new(o.clone(), 1);
        s.handle_message(accept.clone());
        drain_send(&mut s);
        s.lanes_failed(true, now);
        assert!(matches!(drain_send(&mut s)[..], [SendAction::Send(Message::Abort)]));
        s.handle_message(Message::Failed(Refusal::new(code::ABORTED, "aborted by the sender")));
        assert!(
            matches!(drain_send(&mut s)[..], [SendAction::Finish(SendEnd::Own)]),
            "the acknowledgement of our abort does not replace our reason"
        );

        let mut s = Sender::new(o, 1);
        s.handle_message(accept);
        drain_send(&mut s);
        s.lanes_failed(false, now);
        assert!(drain_send(&mut s).is_empty());
        s.handle_message(Message::Failed(Refusal::new(code::BAD_BLOCK, "bad block")));
        assert!(
            matches!(drain_send(&mut s)[..], [SendAction::Finish(SendEnd::Failed(ref r))] if r.code == code::BAD_BLOCK)
        );
    }

    #[test]
    fn a_job_committed_before_is_confirmed_and_a_long_report_is_cut() {
        let now = Instant::now();
        let o = offer(&[("a", b"x")]);
        let mut r = Receiver::confirm(ReceiveJob::new(o.clone()).unwrap(), "done before".into(), now);
        let Some(RecvAction::Send(accept)) = r.poll_action() else {
            panic!()
        };
        let mut s = Sender::new(o.clone(), 1);
        drain_send(&mut s);
        s.handle_message(accept);
        let Some(SendAction::Lanes { plan, .. }) = s.poll_action() else {
            panic!()
        };
        assert_eq!(plan.blocks(), 0, "nothing is sent again");
        r.handle_message(Message::Commit { streams: 0 });
        assert!(
            matches!(&drain_recv(&mut r)[..], [RecvAction::Send(Message::Committed { report }), _] if report == "done before")
        );

        let mut r = Receiver::accept(ReceiveJob::new(o).unwrap(), None, None, now);
        r.write_started();
        r.block_written(0, 0, now);
        r.handle_message(Message::Commit { streams: 1 });
        r.sealed(Ok(()));
        r.hook_done(Ok(HookEnd::Committed("x".repeat(100_000))));
        let acts = drain_recv(&mut r);
        let Some(RecvAction::Send(m @ Message::Committed { report })) = acts
            .iter()
            .find(|a| matches!(a, RecvAction::Send(Message::Committed { .. })))
        else {
            panic!()
        };
        assert_eq!(report.len(), crate::proto::limits::MAX_REASON_LEN);
        assert!(m.encode().is_ok(), "what is sent passes the wire's limits");
    }
}
