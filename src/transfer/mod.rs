//! Drives the protocol core over quinn, TCP and io_uring: the sending and receiving
//! halves of a job, shared by the agent and the client (a push sends from the client,
//! a pull sends from the agent).
//!
//! A job is one bidirectional control stream (offer, accept, commit, committed) and a
//! few data lanes, each a job header followed by blocks: QUIC unidirectional streams,
//! or TCP connections where the target allows the TCP lane. What to do next is decided
//! by [`crate::proto::session`]'s state machines; this module only carries it out:
//! [`send`] reads blocks from disk onto the lanes, [`lane`] is the one receive path for
//! every lane (verify each block, then write it), [`receive`] registers a job so its
//! lanes find it and seals and hands it over when the machine says so.

pub mod codes;
pub mod framing;
pub mod lane;
pub mod receive;
pub mod relay;
pub mod send;
mod tcp;

#[cfg(feature = "faults")]
mod fault;
#[cfg(feature = "faults")]
pub use fault::Fault;

pub use framing::{expect_msg, read_msg, write_msg};
pub use receive::{
    confirm_committed, receive_job, spawn_data_router, Incoming, JobTable, LaneAt, ReceiveAt, Received, Relay,
};
pub use send::{send_job, send_relayed, Blocks, LaneUsed, SendReport};

use crate::proto::job::JobError;
use crate::proto::session::ProtocolError;
use crate::proto::wire::{code, Refusal, WireError};
use crate::store::source::SourceError;
use crate::store::stage::StageError;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why a transfer failed, on either side.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The peer could not be reached, or the QUIC handshake failed.
    #[error("cannot connect to {peer}: {reason}")]
    Connect {
        /// The peer, as given.
        peer: String,
        /// What went wrong.
        reason: String,
    },
    /// This side's certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::net::tls::TlsError),
    /// The connection closed before the job was accepted.
    #[error("connection lost: {0}")]
    Connection(quinn::ConnectionError),
    /// The connection closed after the job was accepted: the receiver may hold part of it.
    #[error("connection lost after the job was accepted: {0}; sending the job again resumes it")]
    Lost(quinn::ConnectionError),
    /// A stream broke, or carried what its job does not expect.
    #[error("stream: {0}")]
    Stream(String),
    /// The peer sent bytes that are not a message.
    #[error("bad message from peer: {0}")]
    Wire(#[from] WireError),
    /// The peer sent a message out of the protocol's order.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The peer refused the job before any data moved (or closed the connection as not
    /// allowed or busy).
    #[error("refused by peer: {0}")]
    Rejected(Refusal),
    /// The job failed at the peer after it was accepted.
    #[error("job failed at peer: {0}")]
    Failed(Refusal),
    /// The offer, an accept or a block does not fit the job.
    #[error("{0}")]
    Job(#[from] JobError),
    /// A file to send could not be listed or opened.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The staging folder could not be used.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A source file changed while it was sent; the job was aborted.
    #[error("{0}: changed while it was sent; the job was aborted")]
    SourceChanged(PathBuf),
    /// A relay's job ended before it forwarded every block to the next replica.
    #[error("the job this relay forwards ended upstream: {why}")]
    Upstream {
        /// How it ended upstream.
        why: Refusal,
        /// The upstream sender aborted it (rather than it failing).
        aborted: bool,
    },
    /// Stopped on purpose after this many blocks, by a test's fault injection.
    #[error("interrupted on purpose after {0} blocks (fault injection)")]
    Interrupted(u64),
    /// A certificate on a revocation list ended the handshake: ours, which the peer
    /// refused, or the peer's, which we refused.
    #[error("{}", match .ours {
        true => "the peer refused our certificate: it is revoked (on the peer's revocation list)",
        false => "refused the peer: its certificate is revoked (on our revocation list)",
    })]
    Revoked {
        /// Our certificate is the revoked one.
        ours: bool,
    },
}

/// The TLS alert `certificate_revoked` (RFC 8446), as a QUIC crypto error.
const REVOKED_ALERT: u8 = 44;

/// The revocation a closed handshake was ended by, if that is what ended it.
pub(crate) fn revoked(c: &quinn::ConnectionError) -> Option<TransferError> {
    let revoked = quinn::TransportErrorCode::crypto(REVOKED_ALERT);
    match c {
        quinn::ConnectionError::ConnectionClosed(close) if close.error_code == revoked => {
            Some(TransferError::Revoked { ours: true })
        }
        quinn::ConnectionError::TransportError(e) if e.code == revoked => Some(TransferError::Revoked { ours: false }),
        _ => None,
    }
}

impl From<crate::proto::session::AnswerError> for TransferError {
    fn from(e: crate::proto::session::AnswerError) -> TransferError {
        use crate::proto::session::AnswerError;
        match e {
            AnswerError::Rejected(r) => TransferError::Rejected(r),
            AnswerError::Failed(r) => TransferError::Failed(r),
            AnswerError::Protocol(p) => TransferError::Protocol(p),
        }
    }
}

/// A connection the peer closed with one of our refusal codes (an agent refusing an
/// identity or a connection over a limit) is a refusal; any other end is a lost
/// connection.
impl From<quinn::ConnectionError> for TransferError {
    fn from(c: quinn::ConnectionError) -> TransferError {
        if let Some(r) = revoked(&c) {
            return r;
        }
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

/// A connection lost once the job was accepted is the job's failure, not a failure to
/// connect: the receiver may hold part of it.
pub(crate) fn after_accept(e: TransferError) -> TransferError {
    match e {
        TransferError::Connection(c) => TransferError::Lost(c),
        other => other,
    }
}

/// How long a sender refused as busy should wait (a connection closed as busy says
/// no more).
pub const RETRY_BUSY: u32 = 10;

/// How long a sender refused for space should wait before it tries again.
pub const RETRY_SPACE: u32 = 60;

pub use crate::proto::session::REPLY_GRACE;

/// What a sender needs to open an encrypted TCP lane: its lane client configuration
/// (the identity it uses on QUIC) and the receiver's name, which its certificate must
/// carry, as on QUIC.
#[derive(Debug, Clone)]
pub struct LaneTls {
    /// See [`crate::net::tls::TlsMaterial::lane_client_config`].
    pub config: Arc<rustls::ClientConfig>,
    /// The receiving agent's name.
    pub server: rustls::pki_types::ServerName<'static>,
}

/// What happens around each block a sender sends, the same on every lane (QUIC or
/// TCP): it waits for the rate limit, then adds the bytes to the progress count.
#[derive(Debug, Clone, Default)]
pub struct Flow {
    /// Bytes sent so far are added here (a progress bar; an agent's watch for a
    /// client that takes nothing).
    pub progress: Option<Arc<AtomicU64>>,
    /// The rate limits of the peer sent to (an agent serving a pull).
    pub pacer: Option<crate::metrics::Meter>,
    /// How to open a TLS lane, if the receiver grants one.
    pub lane_tls: Option<LaneTls>,
    /// A clear-text lane the receiver grants is refused (a pull from an export whose
    /// lane is TLS: the puller may not choose clear text); a push leaves it to the
    /// receiving target.
    pub tls_only: bool,
    /// Test-only faults.
    #[cfg(feature = "faults")]
    pub fault: Fault,
}

impl Flow {
    /// Progress counted in `progress`, paced by `pacer`.
    pub fn new(progress: Option<Arc<AtomicU64>>, pacer: Option<crate::metrics::Meter>) -> Flow {
        Flow {
            progress,
            pacer,
            lane_tls: None,
            tls_only: false,
            #[cfg(feature = "faults")]
            fault: Fault::default(),
        }
    }

    /// Waits until `len` more bytes may go.
    async fn pace(&self, len: u64) {
        if let Some(m) = &self.pacer {
            m.pace(len).await;
        }
    }

    /// `len` bytes went out.
    fn sent(&self, len: u64) {
        if let Some(p) = &self.progress {
            p.fetch_add(len, Ordering::Relaxed);
        }
    }
}

/// The fault hooks a sender calls; without the `faults` feature they do nothing.
impl Flow {
    /// Blocks the lanes may send in all.
    fn budget(&self) -> u64 {
        #[cfg(feature = "faults")]
        return self.fault.budget();
        #[cfg(not(feature = "faults"))]
        u64::MAX
    }

    /// Block `block` of file `file` as it goes on the wire.
    fn on_wire(&self, _file: u32, _block: u32, data: bytes::Bytes) -> bytes::Bytes {
        #[cfg(feature = "faults")]
        return self.fault.on_wire(_file, _block, data);
        #[cfg(not(feature = "faults"))]
        data
    }

    /// The (file, block) to corrupt on the TCP lane, if any.
    fn corrupt(&self) -> Option<(u32, u32)> {
        #[cfg(feature = "faults")]
        return self.fault.corrupt;
        #[cfg(not(feature = "faults"))]
        None
    }

    /// Whether to drop the connection once the lanes are sent, instead of committing.
    fn drops_after_lanes(&self) -> bool {
        #[cfg(feature = "faults")]
        return self.fault.drop_after_blocks.is_some();
        #[cfg(not(feature = "faults"))]
        false
    }

    /// Changes the first source file before a lane reads it, if the fault asks.
    fn before_read(&self, _first: &std::path::Path, _once: &std::sync::atomic::AtomicBool) {
        #[cfg(feature = "faults")]
        self.fault.change(_first, _once);
    }
}
