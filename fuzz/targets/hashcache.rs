//! The hash-cache file reader.
//!
//! Input: tried twice, as a whole cache file, and as record bodies (each a `u16` length
//! and the body) that this target frames and checksums as the cache writes them, behind
//! the file's magic, so that mutations reach the record parsers past the checksum.
//!
//! Properties: the valid prefix is no longer than the file, and 0 exactly when the
//! magic is missing; that prefix alone reads to the same entries and the same prefix;
//! every hash entry has its file's size and a block list that merges to its root.

use super::input::Input;
/// The module under test, named here only (the seed writer reaches it through this too).
pub use barge::store::hashcache as cache;
use cache::parse;

/// The first bytes of a cache file.
const MAGIC: &[u8; 8] = b"bargeHC2";

pub fn run(data: &[u8]) {
    check(data);
    check(&sealed(data));
}

/// A cache file of the record bodies in `data`: each as length, body, 8 bytes of its hash.
fn sealed(data: &[u8]) -> Vec<u8> {
    let mut input = Input(data);
    let mut file = MAGIC.to_vec();
    while !input.is_empty() {
        let n = input.u16() as usize;
        let body = input.bytes(n);
        file.extend_from_slice(&(body.len() as u32).to_be_bytes());
        file.extend_from_slice(body);
        file.extend_from_slice(&blake3::hash(body).as_bytes()[..8]);
    }
    file
}

fn check(file: &[u8]) {
    let (hashes, keys, good) = parse(file);
    assert!(good <= file.len() as u64, "valid prefix of {good} bytes");
    assert_eq!(good == 0, !file.starts_with(MAGIC), "valid prefix of {good} bytes");
    let again = parse(&file[..good as usize]);
    assert!(again == (hashes.clone(), keys, good), "the valid prefix reads the same");
    for (stamp, h) in &hashes {
        assert_eq!(h.size, stamp.size);
        assert_eq!(h.check_tree(), Ok(()));
    }
}
