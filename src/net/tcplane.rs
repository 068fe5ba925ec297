//! The TCP data lane: blocks of a job over TCP connections instead of QUIC streams,
//! TLS 1.3 by default, clear text only where a target says so.
//!
//! QUIC encrypts in user space, packet by packet, which costs CPU per byte; TCP with
//! TLS moves the same bytes in 16 KiB records over a kernel-paced stream. A job may ask
//! for the lane in its offer; a receiver whose target allows it (to that sender) answers
//! in `Accept` with a port, a 32-byte token valid while the job runs, and whether the
//! lane is TLS. On a TLS lane the sender authenticates with the same certificate as on
//! QUIC, and its identity must be the job's QUIC peer's; the token goes inside TLS. On a
//! clear-text lane (trusted networks only) blocks leave the sender's page cache with
//! `sendfile`. Either way the framing is that of a QUIC data stream, control (offer,
//! commit, the hook's answer) stays on QUIC, and every block is verified against the
//! offer before it is written.
//!
//! The receiver always listens and grants: an agent for a push, a pulling client for a
//! pull (the agent then connects to the client's address with its own certificate).
//!
//! Kernel TLS (the `tls` ULP) would let a TLS lane go back to `sendfile`: it would slot
//! in where [`LaneStream`] and the sender's lane writer are built, once a kernel offers it
//! (this project's does not, so none is shipped).

use crate::net::listen::{Pending, PendingLimits};
use crate::proto::wire::TcpGrant;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::net::TcpStream;

/// The first byte of a TLS connection (a handshake record); a clear-text lane's token
/// never starts with it, so one listener tells the two apart.
const TLS_HANDSHAKE: u8 = 0x16;

/// How a target's lane carries data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneKind {
    /// TLS 1.3, mutual, with the QUIC certificates: the default.
    Tls,
    /// Clear text with `sendfile`: only where the target says so.
    Cleartext,
}

/// One lane connection as the job reads it.
pub enum LaneStream {
    /// A clear-text lane.
    Clear(TcpStream),
    /// A TLS lane, its handshake done and its peer checked.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for LaneStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            LaneStream::Clear(s) => Pin::new(s).poll_read(cx, buf),
            LaneStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

/// What a granted token opens: the receiving side of a job, which takes each lane
/// connection that presents the token (`transfer` implements it; this module knows
/// nothing of jobs).
pub trait LaneSink: Send + Sync + 'static {
    /// Reads the lane `stream` to its end; an error names why it failed.
    fn take(self: Arc<Self>, stream: LaneStream) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
    /// The job's token came on a connection that may not carry it (another identity,
    /// or clear text on a TLS lane): the token leaked, so the job fails with `why`.
    fn refuse(&self, why: String);
}

/// Why a lane connection was refused or ended.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// The connection sent no token within the deadline.
    #[error("tcp lane: no token in time")]
    NoToken,
    /// The token is no job's.
    #[error("tcp lane: unknown token")]
    UnknownToken,
    /// The token came from another IP address than the job's QUIC connection.
    #[error("tcp lane: token presented from another address than the job's")]
    WrongPeer,
    /// The TLS handshake failed (a certificate from another CA, no certificate, ...).
    #[error("tcp lane: tls handshake failed: {0}")]
    Handshake(std::io::Error),
    /// The lane's certificate names another identity than the job's QUIC peer.
    #[error("tcp lane: certificate of {got}, but the job is {want}'s")]
    WrongIdentity {
        /// The lane connection's identity.
        got: String,
        /// The job's QUIC peer.
        want: String,
    },
    /// A TLS lane's token came in clear text, or a clear-text lane's over TLS.
    #[error("tcp lane: the job's lane is {want}, the connection is not")]
    WrongKind {
        /// What the job's lane is.
        want: &'static str,
    },
    /// The job ended while the connection waited or sent.
    #[error("tcp lane: the job's token was revoked")]
    Revoked,
    /// The socket failed.
    #[error("tcp lane: {0}")]
    Io(#[from] std::io::Error),
    /// The job refused the connection's data.
    #[error("tcp lane: {0}")]
    Job(String),
}

/// How long a new TCP connection has to present its token.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Lane connections waiting for their token, all sources together, by default.
pub const DEFAULT_PENDING: usize = 64;
/// Lane connections waiting for their token from one IP address, by default (a job
/// opens at most `MAX_STREAMS`, 8, at once).
pub const DEFAULT_PENDING_PER_IP: usize = 8;

/// The default bounds on connections waiting for their token.
pub const DEFAULT_LIMITS: PendingLimits = PendingLimits {
    total: DEFAULT_PENDING,
    per_ip: DEFAULT_PENDING_PER_IP,
};

/// A job's open lane: where its blocks go, who may bring them (address, and identity
/// on TLS), and a channel whose sender is dropped when the token is revoked (the job's
/// lane connections then close).
struct Lane {
    sink: Arc<dyn LaneSink>,
    peer: IpAddr,
    identity: String,
    kind: LaneKind,
    revoked: tokio::sync::watch::Sender<()>,
}

type Tokens = Arc<Mutex<HashMap<[u8; 32], Lane>>>;

/// The receiving side: one listener for all jobs, tokens mapping to jobs.
#[derive(Clone)]
pub struct TcpLanes {
    port: u16,
    tokens: Tokens,
    pending: Pending,
    /// Swapped whole when the agent's certificates are rotated (see [`TcpLanes::set_tls`]).
    tls: Arc<std::sync::RwLock<tokio_rustls::TlsAcceptor>>,
}

impl TcpLanes {
    /// Listens on `addr` (port 0 picks one) and accepts lane connections, at most
    /// `limits` of them waiting for their token at once; TLS lanes with `tls` (see
    /// [`crate::net::tls::TlsMaterial::lane_server_config`]).
    pub async fn start(
        addr: SocketAddr,
        limits: PendingLimits,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<TcpLanes> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let port = listener.local_addr()?.port();
        let lanes = TcpLanes {
            port,
            tokens: Tokens::default(),
            pending: Pending::new(limits),
            tls: Arc::new(std::sync::RwLock::new(tokio_rustls::TlsAcceptor::from(tls))),
        };
        tokio::spawn(accept_loop(listener, lanes.clone()));
        Ok(lanes)
    }

    /// The port the lane listens on (the real one when configured with 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// New certificates (a rotation): lane connections from now on are accepted with
    /// `tls`; those open keep the session they have.
    pub fn set_tls(&self, tls: Arc<rustls::ServerConfig>) {
        *self.tls.write().expect("lane tls") = tokio_rustls::TlsAcceptor::from(tls);
    }

    /// New bounds on connections waiting for their token (a reload).
    pub fn set_limits(&self, limits: PendingLimits) {
        self.pending.set_limits(limits);
    }

    /// Opens a `kind` lane for a job whose QUIC connection is `identity`'s, from `peer`:
    /// only lane connections from that IP address (and, on TLS, with that identity's
    /// certificate) may present the token. The grant goes to the sender in `Accept`.
    pub fn grant(&self, sink: Arc<dyn LaneSink>, peer: IpAddr, identity: &str, kind: LaneKind) -> TcpGrant {
        let mut token: [u8; 32] = rand::random();
        while token[0] == TLS_HANDSHAKE {
            token = rand::random();
        }
        let lane = Lane {
            sink,
            peer: peer.to_canonical(),
            identity: identity.to_string(),
            kind,
            revoked: tokio::sync::watch::channel(()).0,
        };
        self.tokens.lock().expect("tcp tokens").insert(token, lane);
        TcpGrant {
            port: self.port,
            token,
            tls: kind == LaneKind::Tls,
        }
    }

    /// Closes the lane of a job: its token is refused from now on, and its lane
    /// connections still open are closed.
    pub fn revoke(&self, token: &[u8; 32]) {
        // Dropping the lane drops its `revoked` sender, which ends each connection's wait.
        let lane = self.tokens.lock().expect("tcp tokens").remove(token);
        drop(lane);
    }

    /// Whether a job's lane is open for connections from `ip`.
    fn expects(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.tokens.lock().expect("tcp tokens").values().any(|l| l.peer == ip)
    }

    /// The job `token` opens, if the connection comes from the job's peer: its
    /// address, and on a TLS lane its identity (`None`: the connection is clear text).
    fn admit(
        &self,
        token: &[u8; 32],
        from: IpAddr,
        identity: Option<&str>,
    ) -> Result<(Arc<dyn LaneSink>, tokio::sync::watch::Receiver<()>), LaneError> {
        let tokens = self.tokens.lock().expect("tcp tokens");
        let lane = tokens.get(token).ok_or(LaneError::UnknownToken)?;
        if lane.peer != from.to_canonical() {
            return Err(LaneError::WrongPeer);
        }
        let wrong = match (lane.kind, identity) {
            (LaneKind::Tls, Some(who)) if who != lane.identity => Some(LaneError::WrongIdentity {
                got: who.to_string(),
                want: lane.identity.clone(),
            }),
            (LaneKind::Tls, None) => Some(LaneError::WrongKind { want: "tls" }),
            (LaneKind::Cleartext, Some(_)) => Some(LaneError::WrongKind { want: "clear text" }),
            _ => None,
        };
        if let Some(e) = wrong {
            lane.sink.refuse(e.to_string());
            return Err(e);
        }
        Ok((lane.sink.clone(), lane.revoked.subscribe()))
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, lanes: TcpLanes) {
    let mut backoff = crate::net::listen::Backoff::new("tcp lane");
    loop {
        let (stream, peer) = crate::net::listen::accept(&listener, &mut backoff).await;
        // Over the bound, closed at once without reading anything. An address with a
        // job's lane open is held to its own bound only: a flood from elsewhere can not
        // lock the job's sender out.
        let Some(slot) = lanes.pending.enter(peer.ip(), lanes.expects(peer.ip())) else {
            tracing::debug!(%peer, "tcp lane: too many connections waiting for their token; closed");
            drop(stream);
            continue;
        };
        let lanes = lanes.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, peer.ip(), slot, &lanes).await {
                tracing::debug!(%peer, error = %e, "tcp lane ended with an error");
            }
        });
    }
}

async fn serve(
    stream: TcpStream,
    from: IpAddr,
    slot: crate::net::listen::Slot,
    lanes: &TcpLanes,
) -> Result<(), LaneError> {
    let _ = stream.set_nodelay(true);
    // The handshake and the token, within one deadline, while the slot is held.
    let opened = tokio::time::timeout(TOKEN_TIMEOUT, open(stream, lanes)).await;
    drop(slot);
    let (stream, token, identity) = opened.map_err(|_| LaneError::NoToken)??;
    let (sink, mut revoked) = lanes.admit(&token, from, identity.as_deref())?;
    tokio::select! {
        r = sink.take(stream) => r.map_err(LaneError::Job),
        // The job ended (its writes are its own business now: they are counted).
        _ = revoked.changed() => Err(LaneError::Revoked),
    }
}

/// A connection's TLS handshake (if it starts with one) and token: the stream, the
/// token, and the certificate's identity on TLS.
async fn open(stream: TcpStream, lanes: &TcpLanes) -> Result<(LaneStream, [u8; 32], Option<String>), LaneError> {
    let mut first = [0u8; 1];
    stream.peek(&mut first).await?;
    let mut token = [0u8; 32];
    if first[0] != TLS_HANDSHAKE {
        let mut stream = stream;
        stream.read_exact(&mut token).await?;
        return Ok((LaneStream::Clear(stream), token, None));
    }
    let acceptor = lanes.tls.read().expect("lane tls").clone();
    let mut tls = acceptor.accept(stream).await.map_err(LaneError::Handshake)?;
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::net::tls::identity_of)
        .ok_or_else(|| LaneError::Handshake(std::io::Error::other("no identity in the certificate")))?;
    tls.read_exact(&mut token).await?;
    Ok((LaneStream::Tls(Box::new(tls)), token, Some(identity)))
}
