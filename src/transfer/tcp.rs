//! Sending over the TCP lane (see [`crate::net::tcplane`]): one connection per lane,
//! the grant's token first, then block headers and bytes, each block's bytes copied
//! from the page cache to the socket by `sendfile`. Pacing and progress are the same
//! as on QUIC lanes ([`Flow`]).

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
    let mut tasks = tokio::task::JoinSet::new();
    for blocks in lanes {
        let lane = TcpLane {
            addr: SocketAddr::new(ip, grant.port),
            token: grant.token,
            sources: sources.clone(),
            budget: budget.clone(),
            flow: flow.clone(),
            rt: tokio::runtime::Handle::current(),
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
}

impl TcpLane {
    /// Token, then for each block its header and `sendfile`.
    fn send(self, lane: Vec<BlockRef>) -> Result<(u64, u64), TransferError> {
        let peer = PathBuf::from(self.addr.to_string());
        let net = |source| TransferError::Io {
            path: peer.clone(),
            source,
        };
        let mut sock = std::net::TcpStream::connect(self.addr).map_err(|e| TransferError::Connect {
            peer: self.addr.to_string(),
            reason: format!("tcp lane: {e}"),
        })?;
        sock.set_nodelay(true).map_err(net)?;
        sock.write_all(&self.token).map_err(net)?;
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
            self.block(&mut sock, file, b)?;
            blocks += 1;
            bytes += b.len as u64;
            self.flow.sent(b.len as u64);
        }
        sock.shutdown(std::net::Shutdown::Write).map_err(net)?;
        // Wait until the receiver has read everything and closed its side.
        let mut rest = [0u8; 1];
        let _ = std::io::Read::read(&mut sock, &mut rest);
        Ok((blocks, bytes))
    }

    /// Sends one block, then checks that the file is still the offered version (see
    /// `send::SourceWatch`).
    fn block(&self, sock: &mut std::net::TcpStream, file: &std::fs::File, b: BlockRef) -> Result<(), TransferError> {
        let source = &self.sources[b.file as usize];
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |source| TransferError::Io { path, source }
        };
        let peer = PathBuf::from(self.addr.to_string());
        let head = BlockHeader {
            file: b.file,
            block: b.block,
            len: b.len,
        };
        sock.write_all(&head.encode()).map_err(io(&peer))?;
        if self.flow.corrupt() == Some((b.file, b.block)) {
            let mut data = vec![0u8; b.len as usize];
            std::os::unix::fs::FileExt::read_exact_at(file, &mut data, b.offset).map_err(io(&source.path))?;
            data[0] ^= 1;
            sock.write_all(&data).map_err(io(&peer))?;
        } else {
            sendfile_all(sock, file, b.offset, b.len as usize).map_err(io(&source.path))?;
        }
        let now = file.metadata().map_err(io(&source.path))?;
        if crate::store::hashcache::FileStamp::of(&now) != source.stamp {
            return Err(TransferError::SourceChanged(source.path.clone()));
        }
        source.check(&now)?;
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
