//! Offer validation and name checks.
//!
//! Input: every input is tried as a name. Then its first byte picks the offer: even, the
//! rest is an offer body for `Message::decode` (either version); odd, an offer built from
//! the rest, its names joined from a few tricky components (`..`, `.`, empty, the staging
//! folder, control characters) so duplicates, nesting and escapes come up often.
//!
//! Properties: `RelPath::new` accepts a name exactly when it keeps the promises of
//! `barge::proto::path` (checked here by their words, and through `std::path`); an
//! accepted name is relative, all plain components, and stays under its base.
//! `ReceiveJob::new` accepts an offer exactly when every name is accepted, no name
//! repeats, no file is another's folder and every block list merges to its root, and
//! refuses it for the first of those that fails; an accepted job misses every block.

use super::input::Input;
use barge::proto::blocks::{block_count, listed_blocks, FileHashes, BLOCK_SIZE};
use barge::proto::job::{JobError, ReceiveJob};
use barge::proto::limits::{MAX_COMPONENT_LEN, MAX_DEPTH, MAX_PATH_LEN};
use barge::proto::path::{RelPath, STAGING_DIR};
use barge::proto::wire::{Message, Offer, OfferFile};
use std::collections::HashSet;
use std::path::{Component, Path};

pub fn run(data: &[u8]) {
    check_name(&String::from_utf8_lossy(data));
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let offer = if mode % 2 == 0 {
        match Message::decode(rest) {
            Ok(Message::Offer(offer)) => offer,
            _ => return,
        }
    } else {
        built(rest)
    };
    check_job(offer);
}

/// Whether `name` keeps what `barge::proto::path` promises of an accepted name.
fn promised(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    !name.is_empty()
        && name.len() <= MAX_PATH_LEN
        && !name.starts_with('/')
        && !name.chars().any(char::is_control)
        && parts.len() <= MAX_DEPTH
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != ".." && p.len() <= MAX_COMPONENT_LEN)
        && parts[0] != STAGING_DIR
}

fn check_name(name: &str) {
    let Ok(rel) = RelPath::new(name) else {
        assert!(!promised(name), "{name:?} refused");
        return;
    };
    assert!(promised(name), "{name:?} accepted");
    assert_eq!(rel.as_str(), name);
    assert!(!name.contains('\0'), "{name:?} has a NUL");
    let path = Path::new(name);
    assert!(path.is_relative(), "{name:?} is absolute");
    assert!(
        path.components().all(|c| matches!(c, Component::Normal(_))),
        "{name:?} has a component that is not a plain name"
    );
    assert_eq!(path.components().count(), rel.components().count(), "{name:?}");
    let base = Path::new("/base");
    let under = rel.under(base);
    assert!(under.starts_with(base) && under != base, "{name:?} leaves its base");
}

/// Components the built names are joined from; a byte from 0xf0 on takes raw bytes instead.
#[rustfmt::skip]
const PARTS: &[&str] = &[
    "a", "b", "000001.sst", "..", ".", "", STAGING_DIR, "x\0y", "é", "a/b", "/", "c\n", "...", "a.", " ",
];

/// Sizes around the block boundaries.
const SIZES: &[u64] = &[0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE];

fn built(data: &[u8]) -> Offer {
    let mut input = Input(data);
    let n = input.u8() % 8;
    let files: Vec<(String, FileHashes)> = (0..n)
        .map(|_| {
            let parts: Vec<String> = (0..input.u8() % 4 + 1)
                .map(|_| match input.u8() {
                    k @ 0xf0.. => String::from_utf8_lossy(input.bytes((k & 0x0f) as usize)).into_owned(),
                    k => PARTS[k as usize % PARTS.len()].to_string(),
                })
                .collect();
            let size = SIZES[input.u8() as usize % SIZES.len()];
            let hashes = FileHashes {
                size,
                root: [input.u8(); 32],
                blocks: vec![[input.u8(); 32]; listed_blocks(size)],
            };
            (parts.join("/"), hashes)
        })
        .collect();
    super::offer_of(files.into_iter())
}

fn check_job(offer: Offer) {
    let files = &offer.files;
    let bad_name = files.iter().find(|f| !promised(&f.path));
    let mut seen = HashSet::new();
    let twice = files.iter().find(|f| !seen.insert(f.path.as_str()));
    let inside = |f: &OfferFile, g: &OfferFile| {
        g.path.len() > f.path.len() && g.path.starts_with(&f.path) && g.path.as_bytes()[f.path.len()] == b'/'
    };
    let folder = files.iter().find(|f| files.iter().any(|g| inside(f, g)));
    let bad_tree = files.iter().find(|f| f.hashes.check_tree().is_err());
    match ReceiveJob::new(offer.clone()) {
        Ok(job) => {
            assert!(bad_name.is_none() && twice.is_none() && folder.is_none() && bad_tree.is_none());
            let names: Vec<&str> = job.paths.iter().map(RelPath::as_str).collect();
            let offered: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
            assert_eq!(names, offered);
            let blocks: u64 = files.iter().map(|f| block_count(f.hashes.size)).sum();
            assert_eq!(job.missing(), blocks);
            assert_eq!(job.check_complete().is_ok(), blocks == 0);
            assert_eq!(job.id, offer.job_id());
            let Message::Accept { have, tcp: None } = job.accept() else {
                panic!("accept is not an Accept");
            };
            assert_eq!(have.len(), files.len());
            assert!(have.iter().flatten().all(|&b| b == 0), "a new job holds no block");
        }
        Err(err) => match err {
            JobError::BadName(_) => assert!(bad_name.is_some(), "{err}"),
            JobError::Duplicate(ref p) => {
                assert!(bad_name.is_none() && twice.is_some_and(|f| &f.path == p), "{err}")
            }
            JobError::FileIsFolder(_) => {
                assert!(bad_name.is_none() && twice.is_none() && folder.is_some(), "{err}")
            }
            JobError::BadTree { .. } => {
                assert!(
                    bad_name.is_none() && twice.is_none() && folder.is_none() && bad_tree.is_some(),
                    "{err}"
                )
            }
            other => panic!("unexpected refusal: {other}"),
        },
    }
}
