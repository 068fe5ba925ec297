//! The one receive path for every data lane, QUIC stream or TCP connection: read a
//! block header, check its length against the offer, read the block, verify it, and
//! start writing it; a lane counts as read to its end only once its writes are done.

use super::framing::stream_err;
use super::receive::{stream_done, take_block, Incoming, Writes};
use super::TransferError;
use crate::proto::blocks::{block_len, VerifyError};
use crate::proto::job::JobError;
use crate::proto::session::ProtocolError;
use crate::proto::wire::{BlockHeader, Offer, WireError};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// The bytes of one data lane.
pub trait LaneRead {
    /// Fills `head`; false if the lane ended cleanly before its first byte.
    fn head(
        &mut self,
        head: &mut [u8; BlockHeader::LEN],
    ) -> impl std::future::Future<Output = Result<bool, TransferError>> + Send;
    /// Reads exactly `len` bytes: one block.
    fn block(&mut self, len: usize) -> impl std::future::Future<Output = Result<Bytes, TransferError>> + Send;
}

/// Receives a lane of `inc`'s job to its end, then says so to the job's machine (or
/// that the lane failed, which fails the job).
pub async fn receive(lane: &mut impl LaneRead, inc: &Arc<Incoming>) -> Result<(), TransferError> {
    let writes = Writes::new();
    let mut result = blocks(lane, inc, &writes).await;
    if result.is_ok() {
        result = writes.drain().await;
    }
    stream_done(inc, &result);
    result
}

async fn blocks(lane: &mut impl LaneRead, inc: &Arc<Incoming>, writes: &Writes) -> Result<(), TransferError> {
    loop {
        let mut h = [0u8; BlockHeader::LEN];
        if !lane.head(&mut h).await? {
            return Ok(());
        }
        let head = BlockHeader::decode(&h);
        let len = expected_len(&inc.offer, head)?;
        let data = lane.block(len).await?;
        take_block(inc, head, data, writes).await?;
    }
}

/// The length block `head` must have, from the offer; a wrong one fails the lane
/// before its bytes are read.
pub(crate) fn expected_len(offer: &Offer, head: BlockHeader) -> Result<usize, TransferError> {
    let f = offer
        .files
        .get(head.file as usize)
        .ok_or(JobError::UnknownFile(head.file))?;
    let want = block_len(f.hashes.size, head.block as u64);
    if head.len as usize != want || want == 0 {
        let err = VerifyError::BadLength {
            index: head.block as u64,
            got: head.len as usize,
            want,
        };
        return Err(JobError::BadBlock {
            path: f.path.clone(),
            err,
        }
        .into());
    }
    Ok(want)
}

/// Large blocks, the bulk of the data, are gathered into aligned buffers (whole blocks
/// from a pool) so the disk can take them with O_DIRECT.
pub(crate) static BLOCK_POOL: std::sync::LazyLock<Arc<crate::store::buf::Pool>> =
    std::sync::LazyLock::new(|| crate::store::buf::Pool::new(crate::proto::blocks::BLOCK_SIZE as usize));

fn ended_inside() -> TransferError {
    ProtocolError {
        expected: "the rest of the block",
        got: "the end of the stream",
    }
    .into()
}

impl LaneRead for quinn::RecvStream {
    async fn head(&mut self, head: &mut [u8; BlockHeader::LEN]) -> Result<bool, TransferError> {
        match self.read_exact(head).await {
            Ok(()) => Ok(true),
            Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(false),
            Err(quinn::ReadExactError::FinishedEarly(_)) => Err(WireError::Truncated.into()),
            Err(quinn::ReadExactError::ReadError(e)) => Err(stream_err(e)),
        }
    }

    /// Without copying when quinn hands the block in one piece.
    async fn block(&mut self, len: usize) -> Result<Bytes, TransferError> {
        if crate::store::buf::wants_direct(len) {
            let mut buf = crate::store::buf::aligned(&BLOCK_POOL, len);
            let dst = buf.as_mut_slice();
            let mut got = 0;
            while got < len {
                let chunk = self.read_chunk(len - got, true).await.map_err(stream_err)?;
                let chunk = chunk.ok_or_else(ended_inside)?;
                dst[got..got + chunk.bytes.len()].copy_from_slice(&chunk.bytes);
                got += chunk.bytes.len();
            }
            return Ok(buf.freeze());
        }
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        let mut got = 0;
        while got < len {
            let chunk = self.read_chunk(len - got, true).await.map_err(stream_err)?;
            let chunk = chunk.ok_or_else(ended_inside)?;
            got += chunk.bytes.len();
            match first.take() {
                None if buf.is_empty() => first = Some(chunk.bytes),
                prev => {
                    if let Some(p) = prev {
                        buf.reserve(len);
                        buf.extend_from_slice(&p);
                    }
                    buf.extend_from_slice(&chunk.bytes);
                }
            }
        }
        Ok(first.unwrap_or_else(|| buf.freeze()))
    }
}

impl LaneRead for crate::net::tcplane::LaneStream {
    async fn head(&mut self, head: &mut [u8; BlockHeader::LEN]) -> Result<bool, TransferError> {
        if self.read(&mut head[..1]).await.map_err(stream_err)? == 0 {
            return Ok(false);
        }
        self.read_exact(&mut head[1..]).await.map_err(stream_err)?;
        Ok(true)
    }

    async fn block(&mut self, len: usize) -> Result<Bytes, TransferError> {
        if crate::store::buf::wants_direct(len) {
            let mut buf = crate::store::buf::aligned(&BLOCK_POOL, len);
            self.read_exact(buf.as_mut_slice()).await.map_err(stream_err)?;
            return Ok(buf.freeze());
        }
        let mut buf = BytesMut::zeroed(len);
        self.read_exact(&mut buf).await.map_err(stream_err)?;
        Ok(buf.freeze())
    }
}

/// A TCP lane connection whose token opened this job is received here.
impl crate::net::tcplane::LaneSink for Incoming {
    fn take(
        self: Arc<Self>,
        mut stream: crate::net::tcplane::LaneStream,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>> {
        Box::pin(async move { receive(&mut stream, &self).await.map_err(|e| e.to_string()) })
    }

    fn refuse(&self, why: String) {
        let refusal = crate::proto::wire::Refusal::new(crate::proto::wire::code::NOT_ALLOWED, why);
        self.with(|s| s.stream_failed(refusal));
    }
}
