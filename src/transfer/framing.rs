//! Control messages on a QUIC stream: a length prefix checked before the body is read,
//! then the body decoded by [`crate::proto::wire`].

use super::TransferError;
use crate::proto::session::ProtocolError;
use crate::proto::wire::{Message, WireError};

pub(crate) fn stream_err(e: impl std::fmt::Display) -> TransferError {
    TransferError::Stream(e.to_string())
}

/// Reads one control message; `Ok(None)` if the stream ended cleanly first.
pub async fn read_msg(recv: &mut quinn::RecvStream) -> Result<Option<Message>, TransferError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated.into()),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(read_error(e)),
    }
    let n = Message::check_frame_len(u32::from_be_bytes(len))?;
    let mut body = vec![0u8; n];
    recv.read_exact(&mut body).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => TransferError::Wire(WireError::Truncated),
        quinn::ReadExactError::ReadError(e) => read_error(e),
    })?;
    Ok(Some(Message::decode(&body)?))
}

pub(crate) fn read_error(e: quinn::ReadError) -> TransferError {
    match e {
        quinn::ReadError::ConnectionLost(c) => c.into(),
        other => stream_err(other),
    }
}

/// Reads a control message that must be there (`expected` names it if it is not).
pub async fn expect_msg(recv: &mut quinn::RecvStream, expected: &'static str) -> Result<Message, TransferError> {
    read_msg(recv)
        .await?
        .ok_or_else(|| ProtocolError::ended(expected).into())
}

/// Writes one control message; one that breaks the wire's limits is not sent.
pub async fn write_msg(send: &mut quinn::SendStream, msg: &Message) -> Result<(), TransferError> {
    send.write_all(&msg.encode()?).await.map_err(write_error)
}

/// A failed write: a lost connection is named as such (see [`super::after_accept`]).
pub(crate) fn write_error(e: quinn::WriteError) -> TransferError {
    match e {
        quinn::WriteError::ConnectionLost(c) => c.into(),
        other => stream_err(other),
    }
}
