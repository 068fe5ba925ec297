//! The SST key reader on mutated SST files, from an in-memory buffer.
//!
//! Properties: no panic, and every read it asks for lies inside the file (offsets and
//! lengths are checked against the file's length before a read).

/// The module under test, named here only (the seed writer reaches it through this too).
pub use barge::engines::sst as reader;
use reader::keys_from_bytes;

pub fn run(data: &[u8]) {
    let read = |offset: u64, len: usize| {
        let end = offset.checked_add(len as u64);
        let end = end.filter(|&end| end <= data.len() as u64);
        let end = end.unwrap_or_else(|| panic!("read of {len} bytes at {offset} outside {} bytes", data.len()));
        Ok(data[offset as usize..end as usize].to_vec())
    };
    let _ = keys_from_bytes(read, data.len() as u64);
}
