//! Fault injection on the sending side, compiled only with the `faults` feature (the
//! crate's own tests turn it on): the transfer tests use it to interrupt, truncate and
//! corrupt a job the way a failing peer or network would.

/// What to break on the sending side.
#[derive(Debug, Clone, Default)]
pub struct Fault {
    /// Send only this many blocks, then ask to commit anyway.
    pub stop_after_blocks: Option<u64>,
    /// Send only this many blocks, wait until the receiver has them, then close the
    /// connection without committing.
    pub drop_after_blocks: Option<u64>,
    /// Flip a bit in this (file, block) on the wire.
    pub corrupt: Option<(u32, u32)>,
    /// Append a byte to the first source file just before a QUIC lane reads its first
    /// block.
    pub change_source: bool,
}

impl Fault {
    /// Blocks the lanes may send in all.
    pub(crate) fn budget(&self) -> u64 {
        self.stop_after_blocks.or(self.drop_after_blocks).unwrap_or(u64::MAX)
    }

    /// `data` as the fault wants it on the wire.
    pub(crate) fn on_wire(&self, file: u32, block: u32, data: bytes::Bytes) -> bytes::Bytes {
        if self.corrupt != Some((file, block)) || data.is_empty() {
            return data;
        }
        let mut m = bytes::BytesMut::from(&data[..]);
        m[0] ^= 1;
        m.freeze()
    }

    /// Changes the first source file once, if asked to.
    pub(crate) fn change(&self, first: &std::path::Path, once: &std::sync::atomic::AtomicBool) {
        use std::io::Write;
        if self.change_source && !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let mut f = std::fs::OpenOptions::new().append(true).open(first);
            let _ = f.as_mut().map(|f| f.write_all(b"!"));
        }
    }
}
