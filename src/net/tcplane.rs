//! The opt-in TCP data lane for trusted networks: blocks leave the sender's page cache
//! with `sendfile`, so no user-space copy and no encryption on the sending side.
//!
//! QUIC encrypts in user space, which costs CPU per byte. Where the network is trusted,
//! a job may ask for this lane in its offer; a receiver whose target allows it answers
//! in `Accept` with a port and a 32-byte token, valid while the job runs. The sender
//! opens one TCP connection per lane, sends the token, then block headers and bytes in
//! the same framing as a QUIC data stream. Control (offer, commit, the hook's answer)
//! stays on the authenticated QUIC stream, and every block is still verified against
//! the offer before it is written. The data itself is NOT encrypted on this lane.

use crate::net::listen::{Pending, PendingLimits};
use crate::proto::wire::TcpGrant;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// What a granted token opens: the receiving side of a job, which takes each lane
/// connection that presents the token (`transfer` implements it; this module knows
/// nothing of jobs).
pub trait LaneSink: Send + Sync + 'static {
    /// Reads the lane `stream` to its end; an error names why it failed.
    fn take(self: Arc<Self>, stream: tokio::net::TcpStream)
        -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
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

/// A job's open lane: where its blocks go, who may bring them, and a channel whose
/// sender is dropped when the token is revoked (the job's lane connections then close).
struct Lane {
    sink: Arc<dyn LaneSink>,
    peer: IpAddr,
    revoked: tokio::sync::watch::Sender<()>,
}

type Tokens = Arc<Mutex<HashMap<[u8; 32], Lane>>>;

/// The receiving side: one listener for all jobs, tokens mapping to jobs.
#[derive(Clone)]
pub struct TcpLanes {
    port: u16,
    tokens: Tokens,
    pending: Pending,
}

impl TcpLanes {
    /// Listens on `addr` (port 0 picks one) and accepts lane connections, at most
    /// `limits` of them waiting for their token at once.
    pub async fn start(addr: SocketAddr, limits: PendingLimits) -> std::io::Result<TcpLanes> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let port = listener.local_addr()?.port();
        let lanes = TcpLanes {
            port,
            tokens: Tokens::default(),
            pending: Pending::new(limits),
        };
        tokio::spawn(accept_loop(listener, lanes.clone()));
        Ok(lanes)
    }

    /// The port the lane listens on (the real one when configured with 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// New bounds on connections waiting for their token (a reload).
    pub fn set_limits(&self, limits: PendingLimits) {
        self.pending.set_limits(limits);
    }

    /// Opens the lane for a job whose QUIC connection comes from `peer`: only lane
    /// connections from that IP address may present the token. The grant goes to the
    /// sender in `Accept`.
    pub fn grant(&self, sink: Arc<dyn LaneSink>, peer: IpAddr) -> TcpGrant {
        let token: [u8; 32] = rand::random();
        let lane = Lane {
            sink,
            peer: peer.to_canonical(),
            revoked: tokio::sync::watch::channel(()).0,
        };
        self.tokens.lock().expect("tcp tokens").insert(token, lane);
        TcpGrant { port: self.port, token }
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

    /// The job `token` opens, if the connection comes from the job's peer.
    fn admit(
        &self,
        token: &[u8; 32],
        from: IpAddr,
    ) -> Result<(Arc<dyn LaneSink>, tokio::sync::watch::Receiver<()>), LaneError> {
        let tokens = self.tokens.lock().expect("tcp tokens");
        let lane = tokens.get(token).ok_or(LaneError::UnknownToken)?;
        if lane.peer != from.to_canonical() {
            return Err(LaneError::WrongPeer);
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
    mut stream: tokio::net::TcpStream,
    from: IpAddr,
    slot: crate::net::listen::Slot,
    lanes: &TcpLanes,
) -> Result<(), LaneError> {
    let _ = stream.set_nodelay(true);
    let mut token = [0u8; 32];
    let read = tokio::time::timeout(TOKEN_TIMEOUT, stream.read_exact(&mut token)).await;
    drop(slot);
    read.map_err(|_| LaneError::NoToken)??;
    let (sink, mut revoked) = lanes.admit(&token, from)?;
    tokio::select! {
        r = sink.take(stream) => r.map_err(LaneError::Job),
        // The job ended (its writes are its own business now: they are counted).
        _ = revoked.changed() => Err(LaneError::Revoked),
    }
}
