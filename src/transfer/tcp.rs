//! Sending over the TCP lane (see [`crate::net::tcplane`]): one connection per lane,
//! on a TLS lane the handshake (the sender's QUIC identity), then the grant's token,
//! then block headers and bytes. On a clear-text lane each block's bytes go from the
//! page cache to the socket by `sendfile`; on TLS they are read piece by piece into
//! one reused buffer per lane and sealed by rustls (AES-128-GCM first). Pacing and
//! progress are the same as on QUIC lanes ([`Flow`]).

use super::send::take_budget;
use super::{Flow, TransferError};
use crate::proto::job::BlockRef;
use crate::proto::wire::{BlockHeader, TcpGrant};
use crate::store::source::SourceFile;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Sends the lanes of a plan over TCP to `ip` as granted; returns (blocks, bytes).
pub(super) async fn send_lanes(
    ip: IpAddr,
    grant: TcpGrant,
    lanes: Vec<Vec<BlockRef>>,
    sources: Arc<Vec<SourceFile>>,
    flow: &Flow,
) -> Result<(u64, u64), TransferError> {
    let budget = Arc::new(AtomicU64::new(flow.budget()));
    let tls = match (grant.tls, &flow.lane_tls) {
        (false, _) if flow.tls_only => {
            return Err(TransferError::Stream(
                "the receiver granted a clear-text lane; this side sends over TLS only".into(),
            ))
        }
        (false, _) => None,
        (true, Some(t)) => Some(t.clone()),
        (true, None) => {
            return Err(TransferError::Stream(
                "the receiver granted a TLS lane this sender can not open".into(),
            ))
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for blocks in lanes {
        let lane = TcpLane {
            addr: SocketAddr::new(ip, grant.port),
            token: grant.token,
            sources: sources.clone(),
            budget: budget.clone(),
            flow: flow.clone(),
            rt: tokio::runtime::Handle::current(),
            tls: tls.clone(),
        };
        tasks.spawn_blocking(move || lane.send(blocks));
    }
    super::send::sum_lanes(tasks).await
}

/// One lane's connection and what it sends from; it runs on a blocking thread.
struct TcpLane {
    addr: SocketAddr,
    token: [u8; 32],
    sources: Arc<Vec<SourceFile>>,
    budget: Arc<AtomicU64>,
    flow: Flow,
    /// To wait for the rate limit from the blocking thread.
    rt: tokio::runtime::Handle,
    /// The TLS client side, on a TLS lane.
    tls: Option<super::LaneTls>,
}

impl TcpLane {
    /// Connects (and on TLS shakes hands), sends the token, then for each block its
    /// header and bytes.
    fn send(self, lane: Vec<BlockRef>) -> Result<(u64, u64), TransferError> {
        let mut out = self.open()?;
        let (mut blocks, mut bytes) = (0u64, 0u64);
        let mut open: Option<(u32, std::fs::File)> = None;
        for b in lane {
            if !take_budget(&self.budget) {
                break;
            }
            if open.as_ref().map(|(f, _)| *f) != Some(b.file) {
                open = Some((b.file, self.sources[b.file as usize].open()?));
            }
            let file = &open.as_ref().expect("file opened above").1;
            self.rt.block_on(self.flow.pace(b.len as u64));
            self.block(&mut out, file, b)?;
            blocks += 1;
            bytes += b.len as u64;
            self.flow.sent(b.len as u64);
        }
        out.finish().map_err(|e| self.net(e))?;
        Ok((blocks, bytes))
    }

    fn net(&self, source: std::io::Error) -> TransferError {
        TransferError::Io {
            path: PathBuf::from(self.addr.to_string()),
            source,
        }
    }

    /// The lane's connection, the token sent.
    fn open(&self) -> Result<LaneOut, TransferError> {
        let failed = |reason: String| TransferError::Connect {
            peer: self.addr.to_string(),
            reason,
        };
        let sock = std::net::TcpStream::connect(self.addr).map_err(|e| failed(format!("tcp lane: {e}")))?;
        sock.set_nodelay(true).map_err(|e| self.net(e))?;
        let mut out = match self.tls.clone() {
            None => LaneOut::Clear(sock),
            Some(t) => {
                let conn =
                    rustls::ClientConnection::new(t.config, t.server).map_err(|e| failed(format!("tls lane: {e}")))?;
                let mut tls = rustls::StreamOwned::new(conn, sock);
                // The handshake, here, so that a refused certificate is named as such.
                while tls.conn.is_handshaking() {
                    tls.conn
                        .complete_io(&mut tls.sock)
                        .map_err(|e| failed(format!("tls lane handshake: {e}")))?;
                }
                LaneOut::Tls(Box::new(tls), Vec::new())
            }
        };
        out.write_all(&self.token).map_err(|e| self.net(e))?;
        Ok(out)
    }

    /// Sends one block, then checks that the file is still the offered version (see
    /// `send::SourceWatch`).
    fn block(&self, out: &mut LaneOut, file: &std::fs::File, b: BlockRef) -> Result<(), TransferError> {
        let source = &self.sources[b.file as usize];
        let disk = |source| TransferError::Io {
            path: self.sources[b.file as usize].path.clone(),
            source,
        };
        let head = BlockHeader {
            file: b.file,
            block: b.block,
            len: b.len,
        };
        out.write_all(&head.encode()).map_err(|e| self.net(e))?;
        let flip = self.flow.corrupt() == Some((b.file, b.block));
        out.block(file, b.offset, b.len as usize, flip).map_err(|e| match e {
            BlockError::Disk(e) => disk(e),
            BlockError::Net(e) => self.net(e),
        })?;
        let now = file.metadata().map_err(disk)?;
        if crate::store::hashcache::FileStamp::of(&now) != source.stamp {
            return Err(TransferError::SourceChanged(source.path.clone()));
        }
        source.check(&now)?;
        Ok(())
    }
}

/// How much of a block a TLS lane reads and seals at a time. Small enough that the
/// plaintext, its sealed records and the socket copy stay in the core's cache: whole
/// 1 MiB blocks went through memory three times and cost the sender 40 % more CPU on
/// W1 (2026-12-07: 2.0 against 1.4 s of CPU for 2 GiB); 16 KiB pieces (one record)
/// cost more again in per-write overhead.
const TLS_PIECE: usize = 64 << 10;

/// A lane connection as the sender writes it.
enum LaneOut {
    /// Clear text: blocks by `sendfile`.
    Clear(std::net::TcpStream),
    /// TLS: blocks read into the buffer, then sealed.
    Tls(
        Box<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>,
        Vec<u8>,
    ),
}

/// Where sending a block failed: reading the file, or the connection.
enum BlockError {
    Disk(std::io::Error),
    Net(std::io::Error),
}

impl LaneOut {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            LaneOut::Clear(s) => s.write_all(bytes),
            LaneOut::Tls(s, _) => s.write_all(bytes),
        }
    }

    /// `len` bytes of `file` at `offset`; `flip` corrupts the first (a test fault).
    fn block(&mut self, file: &std::fs::File, offset: u64, len: usize, flip: bool) -> Result<(), BlockError> {
        use std::os::unix::fs::FileExt;
        match self {
            LaneOut::Clear(s) if !flip => sendfile_all(s, file, offset, len).map_err(BlockError::Disk),
            LaneOut::Clear(s) => {
                let mut data = vec![0u8; len];
                file.read_exact_at(&mut data, offset).map_err(BlockError::Disk)?;
                data[0] ^= 1;
                s.write_all(&data).map_err(BlockError::Net)
            }
            LaneOut::Tls(s, buf) => {
                let mut done = 0;
                while done < len {
                    buf.resize(TLS_PIECE.min(len - done), 0);
                    file.read_exact_at(buf, offset + done as u64)
                        .map_err(BlockError::Disk)?;
                    if flip && done == 0 {
                        buf[0] ^= 1;
                    }
                    s.write_all(buf).map_err(BlockError::Net)?;
                    done += buf.len();
                }
                Ok(())
            }
        }
    }

    /// Ends the lane (TLS: close_notify first) and waits until the receiver has read
    /// everything and closed its side.
    fn finish(self) -> std::io::Result<()> {
        let mut sock = match self {
            LaneOut::Clear(s) => s,
            LaneOut::Tls(mut s, _) => {
                s.conn.send_close_notify();
                s.flush()?;
                while s.conn.wants_write() {
                    s.conn.write_tls(&mut s.sock)?;
                }
                s.sock
            }
        };
        sock.shutdown(std::net::Shutdown::Write)?;
        // Until the receiver closes: it has read everything then.
        let mut rest = [0u8; 512];
        while let Ok(1..) = std::io::Read::read(&mut sock, &mut rest) {}
        Ok(())
    }
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
