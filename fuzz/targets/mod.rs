//! The bodies of the fuzz targets, one module each, as plain `run(&[u8])` functions.
//!
//! The fuzz binaries (`fuzz/fuzz_targets/`) and the replay test (`tests/fuzz_corpus.rs`)
//! both include this folder with `#[path]`, so a corpus file runs through the same code in
//! both. A target panics on a broken property; returning an error is fine.

pub mod accept;
pub mod hashcache;
pub mod input;
pub mod offer;
pub mod sst;
pub mod wire;

use barge::proto::blocks::FileHashes;
use barge::proto::wire::{Offer, OfferFile};

/// A target's body: panics on a broken property.
pub type Run = fn(&[u8]);

/// Every target by name, as the corpus folders and the fuzz binaries are named.
pub const ALL: &[(&str, Run)] = &[
    ("wire", wire::run),
    ("offer", offer::run),
    ("accept", accept::run),
    ("hashcache", hashcache::run),
    ("sst", sst::run),
];

/// An offer of files with these names and hashes, as the offer and accept targets build them.
pub fn offer_of(files: impl Iterator<Item = (String, FileHashes)>) -> Offer {
    let files = files.map(|(path, hashes)| OfferFile {
        path,
        hashes,
        keys: None,
        mode: 0o644,
    });
    Offer {
        target: "t".into(),
        files: files.collect(),
        meta: vec![],
        tcp_lane: false,
        hold: false,
        relay: vec![],
    }
}
