//! Block verification: a file is cut into 1 MiB blocks whose blake3 chaining values
//! merge, by blake3's own tree rule, into the file's ordinary blake3 hash.
//!
//! This is what lets blocks arrive in any order, on any stream, and still be checked
//! one by one against the root that `b3sum` prints. A file of one block or less has no
//! block list: its single block is checked against the root directly.

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use std::io::Read;

/// Size of a block: 1 MiB, a power of two number of blake3 chunks.
pub const BLOCK_SIZE: u64 = 1 << 20;

/// A 32-byte blake3 value (root hash or chaining value).
pub type Digest = [u8; 32];

/// Why a block or a block list did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The list does not have one chaining value per block of the file.
    #[error("block list has {got} entries, a file of {size} bytes needs {want}")]
    BlockCount {
        /// The file's size in bytes.
        size: u64,
        /// Chaining values listed.
        got: usize,
        /// Blocks the file has.
        want: usize,
    },
    /// The chaining values do not merge into the file's root.
    #[error("block list does not merge to the file's root")]
    TreeMismatch,
    /// A block's bytes do not hash to its chaining value.
    #[error("block {index} does not match its hash")]
    BadBlock {
        /// The block's index in the file.
        index: u64,
    },
    /// A block has the wrong length for its place in the file.
    #[error("block {index} has {got} bytes, expected {want}")]
    BadLength {
        /// The block's index in the file.
        index: u64,
        /// Bytes received.
        got: usize,
        /// Bytes it should have.
        want: usize,
    },
}

/// Number of blocks a file of `size` bytes is cut into (0 for an empty file).
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

/// Length in bytes of block `index` of a file of `size` bytes.
pub fn block_len(size: u64, index: u64) -> usize {
    let start = index * BLOCK_SIZE;
    size.saturating_sub(start).min(BLOCK_SIZE) as usize
}

/// Number of chaining values an offer carries for a file of `size` bytes.
pub fn listed_blocks(size: u64) -> usize {
    let n = block_count(size);
    if n <= 1 {
        0
    } else {
        n as usize
    }
}

/// Chaining value of block `index` holding `data`, for a file of more than one block.
pub fn block_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * BLOCK_SIZE);
    h.update(data);
    h.finalize_non_root()
}

/// Merges the block chaining values of a file of `size` bytes into its root hash.
pub fn root_from_blocks(size: u64, blocks: &[Digest]) -> Result<Digest, VerifyError> {
    let want = listed_blocks(size);
    if blocks.len() != want || want < 2 {
        return Err(VerifyError::BlockCount {
            size,
            got: blocks.len(),
            want,
        });
    }
    let left = hazmat::left_subtree_len(size);
    let l = subtree(0, left, blocks);
    let r = subtree(left, size - left, blocks);
    Ok(*hazmat::merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
}

/// Chaining value of the non-root subtree covering `len` bytes from `offset`.
fn subtree(offset: u64, len: u64, blocks: &[Digest]) -> ChainingValue {
    if len <= BLOCK_SIZE {
        return blocks[(offset / BLOCK_SIZE) as usize];
    }
    let left = hazmat::left_subtree_len(len);
    let l = subtree(offset, left, blocks);
    let r = subtree(offset + left, len - left, blocks);
    hazmat::merge_subtrees_non_root(&l, &r, Mode::Hash)
}

/// The hashes an offer carries for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHashes {
    /// The file's size in bytes.
    pub size: u64,
    /// The file's blake3 hash, as `b3sum` prints it (in bytes).
    pub root: Digest,
    /// Empty for files of one block or less.
    pub blocks: Vec<Digest>,
}

impl FileHashes {
    /// Checks that the block list merges to the root.
    pub fn check_tree(&self) -> Result<(), VerifyError> {
        if self.blocks.is_empty() && listed_blocks(self.size) == 0 {
            return Ok(());
        }
        if root_from_blocks(self.size, &self.blocks)? != self.root {
            return Err(VerifyError::TreeMismatch);
        }
        Ok(())
    }

    /// Checks one block's bytes against the offer.
    pub fn verify_block(&self, index: u64, data: &[u8]) -> Result<(), VerifyError> {
        let want = block_len(self.size, index);
        if data.len() != want || index >= block_count(self.size) {
            return Err(VerifyError::BadLength {
                index,
                got: data.len(),
                want,
            });
        }
        let ok = if self.blocks.is_empty() {
            *blake3::hash(data).as_bytes() == self.root
        } else {
            block_cv(index, data) == self.blocks[index as usize]
        };
        if ok {
            Ok(())
        } else {
            Err(VerifyError::BadBlock { index })
        }
    }

    /// Hashes everything `reader` yields; `size` is what the caller expects to read.
    pub fn from_reader(mut reader: impl Read, size: u64) -> std::io::Result<FileHashes> {
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        let mut cvs = Vec::with_capacity(block_count(size) as usize);
        let mut total = 0u64;
        loop {
            let n = read_full(&mut reader, &mut buf)?;
            if n == 0 {
                break;
            }
            cvs.push(block_cv(total / BLOCK_SIZE, &buf[..n]));
            total += n as u64;
            if n < buf.len() {
                break;
            }
        }
        if total != size {
            return Err(std::io::Error::other(format!(
                "file changed while hashing: expected {size} bytes, read {total}"
            )));
        }
        if cvs.len() <= 1 {
            // `buf` still holds the only block (or nothing).
            let root = *blake3::hash(&buf[..total as usize]).as_bytes();
            return Ok(FileHashes {
                size,
                root,
                blocks: Vec::new(),
            });
        }
        let root = root_from_blocks(size, &cvs).expect("block count matches size");
        Ok(FileHashes {
            size,
            root,
            blocks: cvs,
        })
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Lower-case hex of bytes (a digest prints as `b3sum` prints it).
pub fn hex(d: &[u8]) -> String {
    // Not `format!` per byte: an import of 20,000 files spent 70 ms on that alone.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * d.len());
    for b in d {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: u64) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    const SIZES: &[u64] = &[
        0,
        1,
        1023,
        1024,
        BLOCK_SIZE - 1,
        BLOCK_SIZE,
        BLOCK_SIZE + 1,
        2 * BLOCK_SIZE,
        3 * BLOCK_SIZE - 7,
        5 * BLOCK_SIZE + 123,
        8 * BLOCK_SIZE,
        9 * BLOCK_SIZE + 1,
    ];

    #[test]
    fn root_equals_plain_blake3_for_every_size() {
        for &size in SIZES {
            let d = data(size);
            let h = FileHashes::from_reader(&d[..], size).unwrap();
            assert_eq!(h.root, *blake3::hash(&d).as_bytes(), "size {size}");
            assert_eq!(h.blocks.len(), listed_blocks(size), "size {size}");
            h.check_tree().unwrap();
        }
    }

    #[test]
    fn every_block_verifies_and_a_flipped_byte_does_not() {
        for &size in SIZES {
            let d = data(size);
            let h = FileHashes::from_reader(&d[..], size).unwrap();
            for i in 0..block_count(size) {
                let s = (i * BLOCK_SIZE) as usize;
                let mut blk = d[s..s + block_len(size, i)].to_vec();
                h.verify_block(i, &blk).unwrap();
                blk[0] ^= 1;
                assert_eq!(h.verify_block(i, &blk), Err(VerifyError::BadBlock { index: i }));
            }
        }
    }

    #[test]
    fn wrong_length_and_out_of_range_blocks_are_refused() {
        let d = data(BLOCK_SIZE + 1);
        let h = FileHashes::from_reader(&d[..], d.len() as u64).unwrap();
        assert!(matches!(h.verify_block(1, &d[..2]), Err(VerifyError::BadLength { .. })));
        assert!(matches!(h.verify_block(2, &[]), Err(VerifyError::BadLength { .. })));
        let empty = FileHashes::from_reader(&[][..], 0).unwrap();
        assert!(empty.verify_block(0, &[]).is_err());
    }

    #[test]
    fn tampered_block_list_does_not_merge_to_root() {
        let d = data(4 * BLOCK_SIZE + 5);
        let mut h = FileHashes::from_reader(&d[..], d.len() as u64).unwrap();
        h.blocks[2][0] ^= 0x80;
        assert_eq!(h.check_tree(), Err(VerifyError::TreeMismatch));
        h.blocks.pop();
        assert!(matches!(h.check_tree(), Err(VerifyError::BlockCount { .. })));
    }

    #[test]
    fn short_read_is_an_error() {
        let d = data(10);
        assert!(FileHashes::from_reader(&d[..], 11).is_err());
    }

    #[test]
    fn hex_matches_blake3_display() {
        let h = blake3::hash(b"abc");
        assert_eq!(hex(h.as_bytes()), h.to_hex().to_string());
    }
}
