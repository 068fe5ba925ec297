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
use crate::proto::job::BlockRef;
use crate::proto::wire::{BlockHeader, TcpGrant};
use crate::transfer::{expected_len, stream_done, take_block, Fault, Incoming, TransferError, Writes};
use bytes::BytesMut;
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;

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
    inc: Arc<Incoming>,
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

/// Why a lane connection was refused or ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    NoToken,
    UnknownToken,
    WrongPeer,
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
    pub fn grant(&self, inc: Arc<Incoming>, peer: IpAddr) -> TcpGrant {
        let token: [u8; 32] = rand::random();
        let lane = Lane {
            inc,
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
    ) -> Result<(Arc<Incoming>, tokio::sync::watch::Receiver<()>), Refused> {
        let tokens = self.tokens.lock().expect("tcp tokens");
        let lane = tokens.get(token).ok_or(Refused::UnknownToken)?;
        if lane.peer != from.to_canonical() {
            return Err(Refused::WrongPeer);
        }
        Ok((lane.inc.clone(), lane.revoked.subscribe()))
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
) -> Result<(), TransferError> {
    let _ = stream.set_nodelay(true);
    let mut token = [0u8; 32];
    let read = tokio::time::timeout(TOKEN_TIMEOUT, stream.read_exact(&mut token)).await;
    drop(slot);
    let refused = |r: Refused| {
        TransferError::Protocol(
            match r {
                Refused::NoToken => "tcp lane: no token in time",
                Refused::UnknownToken => "tcp lane: unknown token",
                Refused::WrongPeer => "tcp lane: token presented from another address than the job's",
            }
            .into(),
        )
    };
    read.map_err(|_| refused(Refused::NoToken))?
        .map_err(|e| TransferError::Stream(e.to_string()))?;
    let (inc, mut revoked) = lanes.admit(&token, from).map_err(refused)?;
    let writes = Writes::new();
    let mut result = tokio::select! {
        r = receive(&mut stream, &inc, &writes) => r,
        // The job ended (its writes are its own business now: they are counted).
        _ = revoked.changed() => return Err(TransferError::Protocol("tcp lane: the job's token was revoked".into())),
    };
    if result.is_ok() {
        result = writes.drain().await;
    }
    stream_done(&inc, &result);
    result
}

async fn receive(
    stream: &mut tokio::net::TcpStream,
    inc: &Arc<Incoming>,
    writes: &Writes,
) -> Result<(), TransferError> {
    let io = |e: std::io::Error| TransferError::Stream(e.to_string());
    loop {
        let mut h = [0u8; BlockHeader::LEN];
        let first = stream.read(&mut h[..1]).await.map_err(io)?;
        if first == 0 {
            return Ok(());
        }
        stream.read_exact(&mut h[1..]).await.map_err(io)?;
        let head = BlockHeader::decode(&h);
        let len = expected_len(&inc.offer, head)?;
        let data = if crate::store::buf::wants_direct(len) {
            let mut buf = crate::store::buf::aligned(&crate::transfer::BLOCK_POOL, len);
            stream.read_exact(buf.as_mut_slice()).await.map_err(io)?;
            buf.freeze()
        } else {
            let mut buf = BytesMut::zeroed(len);
            stream.read_exact(&mut buf).await.map_err(io)?;
            buf.freeze()
        };
        take_block(inc, head, data, writes).await?;
    }
}

/// Sends the lanes of a plan over TCP to `ip` as granted; returns (blocks, bytes).
pub async fn send_lanes(
    ip: IpAddr,
    grant: TcpGrant,
    lanes: Vec<Vec<BlockRef>>,
    sources: Arc<Vec<crate::store::source::SourceFile>>,
    fault: &Fault,
) -> Result<(u64, u64), TransferError> {
    let addr = SocketAddr::new(ip, grant.port);
    let budget = Arc::new(AtomicU64::new(fault.stop_after_blocks.unwrap_or(u64::MAX)));
    let mut tasks = tokio::task::JoinSet::new();
    for lane in lanes {
        let (sources, budget, corrupt) = (sources.clone(), budget.clone(), fault.corrupt);
        tasks.spawn_blocking(move || send_lane(addr, grant.token, lane, &sources, &budget, corrupt));
    }
    let (mut blocks, mut bytes) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (b, n) = r.expect("tcp lane task")?;
        blocks += b;
        bytes += n;
    }
    Ok((blocks, bytes))
}

/// One lane, blocking: token, then for each block its header and `sendfile`.
fn send_lane(
    addr: SocketAddr,
    token: [u8; 32],
    lane: Vec<BlockRef>,
    sources: &[crate::store::source::SourceFile],
    budget: &AtomicU64,
    corrupt: Option<(u32, u32)>,
) -> Result<(u64, u64), TransferError> {
    let io = |path: &PathBuf| {
        let path = path.clone();
        move |source| TransferError::Io { path, source }
    };
    let peer = PathBuf::from(addr.to_string());
    let mut sock = std::net::TcpStream::connect(addr).map_err(|e| TransferError::Connect {
        peer: addr.to_string(),
        reason: format!("tcp lane: {e}"),
    })?;
    sock.set_nodelay(true).map_err(io(&peer))?;
    sock.write_all(&token).map_err(io(&peer))?;
    let (mut blocks, mut bytes) = (0u64, 0u64);
    let mut open: Option<(u32, std::fs::File)> = None;
    for b in lane {
        if budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            break;
        }
        let (path, stamp) = (&sources[b.file as usize].path, sources[b.file as usize].stamp);
        if open.as_ref().map(|(f, _)| *f) != Some(b.file) {
            open = Some((b.file, sources[b.file as usize].open()?));
        }
        let file = &open.as_ref().expect("file opened above").1;
        let head = BlockHeader {
            file: b.file,
            block: b.block,
            len: b.len,
        };
        sock.write_all(&head.encode()).map_err(io(&peer))?;
        if corrupt == Some((b.file, b.block)) {
            let mut data = vec![0u8; b.len as usize];
            std::os::unix::fs::FileExt::read_exact_at(file, &mut data, b.offset).map_err(io(path))?;
            data[0] ^= 1;
            sock.write_all(&data).map_err(io(&peer))?;
        } else {
            sendfile_all(&sock, file, b.offset, b.len as usize).map_err(io(path))?;
        }
        // What went out must have been the offered version (see `transfer::SourceWatch`).
        let now = file.metadata().map_err(io(path))?;
        if crate::store::hashcache::FileStamp::of(&now) != stamp {
            return Err(TransferError::SourceChanged(path.clone()));
        }
        sources[b.file as usize].check(&now)?;
        blocks += 1;
        bytes += b.len as u64;
    }
    sock.shutdown(std::net::Shutdown::Write).map_err(io(&peer))?;
    // Wait until the receiver has read everything and closed its side.
    let mut rest = [0u8; 1];
    let _ = std::io::Read::read(&mut sock, &mut rest);
    Ok((blocks, bytes))
}

/// Copies `len` bytes at `offset` of `file` to the socket inside the kernel.
fn sendfile_all(sock: &std::net::TcpStream, file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<()> {
    let mut off = offset as libc::off_t;
    let end = offset + len as u64;
    while (off as u64) < end {
        let left = (end - off as u64) as usize;
        // SAFETY: both descriptors are open for the call; `off` is ours.
        let n = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut off, left) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while it was sent",
            ));
        }
    }
    Ok(())
}
