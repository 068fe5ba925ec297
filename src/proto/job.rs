//! Per-job state, free of I/O: what the receiver has verified, what the sender still
//! has to send and on which stream.
//!
//! The receiver builds a [`ReceiveJob`] from an offer (which validates every name and
//! every block list), records blocks as they verify, and may commit only when nothing
//! is missing. The sender turns the receiver's `Accept` into a [`SendPlan`]: the
//! missing blocks spread over a few streams by bytes, so many small files share a
//! stream and a large file's blocks run on all of them.

use super::blocks::{block_count, block_len, VerifyError};
use super::limits::MAX_STREAMS;
use super::path::{PathError, RelPath};
use super::wire::{JobId, Message, Offer};
use std::collections::HashSet;
use std::sync::Arc;

/// Why a job was refused or failed, at the protocol level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// A name is not a safe relative path.
    #[error("bad name: {0}")]
    BadName(#[from] PathError),
    /// Two files of the job have the same name.
    #[error("name {0:?} appears twice in the job")]
    Duplicate(String),
    /// A name is a file and also a folder of another file (`a` and `a/b`).
    #[error("name {0:?} is both a file and a folder")]
    FileIsFolder(String),
    /// A file's block chaining values do not merge into its root.
    #[error("{path}: {err}")]
    BadTree {
        /// The file's name.
        path: String,
        /// How the tree failed.
        err: VerifyError,
    },
    /// A block did not match its chaining value.
    #[error("{path}: {err}")]
    BadBlock {
        /// The file's name.
        path: String,
        /// Which block and why.
        err: VerifyError,
    },
    /// A block for a file index past the offer's files.
    #[error("block for file #{0}, which the job does not have")]
    UnknownFile(u32),
    /// The sender committed while blocks were missing.
    #[error("commit with {missing} blocks missing")]
    Incomplete {
        /// Blocks not yet received.
        missing: u64,
    },
    /// An accept's bitmaps do not fit the offer (count of files or of blocks).
    #[error("accept does not match the offer")]
    BadAccept,
}

/// Receiver side of a job: validated names and the set of verified blocks.
#[derive(Debug)]
pub struct ReceiveJob {
    /// The offer, as the sender sent it.
    pub offer: Arc<Offer>,
    /// The job's id, derived from the offer.
    pub id: JobId,
    /// The offer's names, checked, in the offer's order.
    pub paths: Vec<RelPath>,
    held: Vec<Vec<bool>>,
    missing: u64,
    /// Files the target already holds with the same root: no bytes come for them, and
    /// they are neither staged nor sealed (see [`ReceiveJob::already_there`]).
    there: Vec<bool>,
}

impl ReceiveJob {
    /// Validates an offer: every name, no duplicates, no file inside another file, and
    /// every block list merging to its root.
    pub fn new(offer: Offer) -> Result<ReceiveJob, JobError> {
        let paths = validate_names(&offer)?;
        for f in &offer.files {
            f.hashes.check_tree().map_err(|err| JobError::BadTree {
                path: f.path.clone(),
                err,
            })?;
        }
        let held: Vec<Vec<bool>> = offer
            .files
            .iter()
            .map(|f| vec![false; block_count(f.hashes.size) as usize])
            .collect();
        let missing = held.iter().map(|h| h.len() as u64).sum();
        let id = offer.job_id();
        Ok(ReceiveJob {
            offer: Arc::new(offer),
            id,
            paths,
            there: vec![false; held.len()],
            held,
            missing,
        })
    }

    /// Marks file `file` as already in the target with the same content: every block
    /// counts as held, so the sender sends none of it.
    pub fn already_there(&mut self, file: usize) {
        self.there[file] = true;
        for b in 0..self.held[file].len() {
            self.record(file as u32, b as u32);
        }
    }

    /// Per file, whether it is already in the target (see [`ReceiveJob::already_there`]).
    pub fn there(&self) -> &[bool] {
        &self.there
    }

    /// Per file, which blocks are held.
    pub fn held(&self) -> &[Vec<bool>] {
        &self.held
    }

    /// Checks a block against the offer; on success returns its byte offset.
    pub fn verify(offer: &Offer, file: u32, block: u32, data: &[u8]) -> Result<u64, JobError> {
        let f = offer.files.get(file as usize).ok_or(JobError::UnknownFile(file))?;
        f.hashes
            .verify_block(block as u64, data)
            .map_err(|err| JobError::BadBlock {
                path: f.path.clone(),
                err,
            })?;
        Ok(block as u64 * super::blocks::BLOCK_SIZE)
    }

    /// Records a verified block; returns false if it was already held.
    pub fn record(&mut self, file: u32, block: u32) -> bool {
        let slot = &mut self.held[file as usize][block as usize];
        let new = !*slot;
        if new {
            *slot = true;
            self.missing -= 1;
        }
        new
    }

    /// Whether block `block` of file `file` is verified and held.
    pub fn is_held(&self, file: u32, block: u32) -> bool {
        self.held[file as usize][block as usize]
    }

    /// Blocks not yet held.
    pub fn missing(&self) -> u64 {
        self.missing
    }

    /// Bytes of the blocks not yet held.
    pub fn missing_bytes(&self) -> u64 {
        let mut need = 0;
        for (f, held) in self.offer.files.iter().zip(&self.held) {
            for (b, _) in held.iter().enumerate().filter(|(_, h)| !**h) {
                need += super::blocks::block_len(f.hashes.size, b as u64) as u64;
            }
        }
        need
    }

    /// Blocks already held, as the `Accept` message carries them.
    pub fn accept(&self) -> Message {
        Message::Accept {
            have: self.held.iter().map(|h| to_bitmap(h)).collect(),
            tcp: None,
        }
    }

    /// An `Accept` that says every block is held (a job that committed before).
    pub fn accept_all(&self) -> Message {
        Message::Accept {
            have: self.held.iter().map(|h| to_bitmap(&vec![true; h.len()])).collect(),
            tcp: None,
        }
    }

    /// Whether the job may commit.
    pub fn check_complete(&self) -> Result<(), JobError> {
        match self.missing {
            0 => Ok(()),
            missing => Err(JobError::Incomplete { missing }),
        }
    }
}

fn validate_names(offer: &Offer) -> Result<Vec<RelPath>, JobError> {
    let paths = offer
        .files
        .iter()
        .map(|f| RelPath::new(&f.path))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = HashSet::with_capacity(paths.len());
    for p in &paths {
        if !seen.insert(p.as_str()) {
            return Err(JobError::Duplicate(p.to_string()));
        }
    }
    // A file may not also be a parent folder of another file.
    for p in &paths {
        let mut prefix = String::new();
        for (i, c) in p.components().enumerate() {
            if i > 0 {
                prefix.push('/');
            }
            prefix.push_str(c);
            if prefix.len() < p.as_str().len() && seen.contains(prefix.as_str()) {
                return Err(JobError::FileIsFolder(prefix));
            }
        }
    }
    Ok(paths)
}

fn to_bitmap(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        out[i / 8] |= 1 << (i % 8);
    }
    out
}

fn bit(map: &[u8], i: usize) -> bool {
    map[i / 8] & (1 << (i % 8)) != 0
}

/// One block to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    /// Index of the file in the offer.
    pub file: u32,
    /// Index of the block in the file.
    pub block: u32,
    /// Offset of the block in the file, in bytes.
    pub offset: u64,
    /// Length of the block in bytes (`BLOCK_SIZE`, less for a file's last block).
    pub len: u32,
}

/// Sender side: the blocks to send, spread over streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendPlan {
    /// One list of blocks per data stream, sent in order.
    pub lanes: Vec<Vec<BlockRef>>,
    /// Blocks the receiver already held.
    pub held: u64,
}

impl SendPlan {
    /// Builds the plan from the receiver's bitmaps, using at most `max_lanes` streams.
    pub fn new(offer: &Offer, have: &[Vec<u8>], max_lanes: usize) -> Result<SendPlan, JobError> {
        if have.len() != offer.files.len() {
            return Err(JobError::BadAccept);
        }
        let mut todo = Vec::new();
        let mut held = 0;
        for (i, (f, map)) in offer.files.iter().zip(have).enumerate() {
            let n = block_count(f.hashes.size) as usize;
            if map.len() != n.div_ceil(8) {
                return Err(JobError::BadAccept);
            }
            for b in 0..n {
                if bit(map, b) {
                    held += 1;
                    continue;
                }
                let len = block_len(f.hashes.size, b as u64) as u32;
                let offset = b as u64 * super::blocks::BLOCK_SIZE;
                todo.push(BlockRef {
                    file: i as u32,
                    block: b as u32,
                    offset,
                    len,
                });
            }
        }
        Ok(SendPlan {
            lanes: spread(todo, max_lanes.clamp(1, MAX_STREAMS)),
            held,
        })
    }

    /// Blocks to send, over all streams.
    pub fn blocks(&self) -> u64 {
        self.lanes.iter().map(|l| l.len() as u64).sum()
    }
}

/// Assigns each block to the lane with the fewest bytes so far (header cost included),
/// and drops lanes that got nothing.
fn spread(todo: Vec<BlockRef>, lanes: usize) -> Vec<Vec<BlockRef>> {
    let mut out: Vec<Vec<BlockRef>> = vec![Vec::new(); lanes];
    let mut load = vec![0u64; lanes];
    for b in todo {
        let (i, _) = load
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| **l)
            .expect("at least one lane");
        load[i] += b.len as u64 + 64;
        out[i].push(b);
    }
    out.retain(|l| !l.is_empty());
    out
}

/// Offers for the protocol core's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::proto::blocks::FileHashes;
    use crate::proto::wire::{Offer, OfferFile};

    pub(crate) fn file(path: &str, data: &[u8]) -> OfferFile {
        let hashes = FileHashes::from_reader(data, data.len() as u64).unwrap();
        OfferFile {
            path: path.into(),
            hashes,
            keys: None,
            mode: 0o644,
        }
    }

    pub(crate) fn offer(files: Vec<OfferFile>) -> Offer {
        Offer {
            target: "t".into(),
            files,
            meta: vec![],
            tcp_lane: false,
            hold: false,
            relay: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{file, offer};
    use super::*;
    use crate::proto::blocks::BLOCK_SIZE;
    use crate::proto::wire::{code, WireCode};

    #[test]
    fn a_job_commits_only_when_every_block_verified() {
        let big = vec![5u8; 3 * BLOCK_SIZE as usize + 1];
        let o = offer(vec![file("a", b"hello"), file("b", &big), file("empty", b"")]);
        let mut job = ReceiveJob::new(o).unwrap();
        assert_eq!(job.missing(), 5);
        assert!(matches!(job.check_complete(), Err(JobError::Incomplete { missing: 5 })));
        assert_eq!(ReceiveJob::verify(&job.offer, 0, 0, b"hello"), Ok(0));
        assert!(job.record(0, 0));
        assert!(!job.record(0, 0), "a block is counted once");
        for b in 0..4u32 {
            let s = b as usize * BLOCK_SIZE as usize;
            let e = (s + BLOCK_SIZE as usize).min(big.len());
            let off = ReceiveJob::verify(&job.offer, 1, b, &big[s..e]).unwrap();
            assert_eq!(off, s as u64);
            job.record(1, b);
        }
        job.check_complete().unwrap();
    }

    #[test]
    fn bad_blocks_and_unknown_files_are_named() {
        let job = ReceiveJob::new(offer(vec![file("a", b"hello")])).unwrap();
        let err = ReceiveJob::verify(&job.offer, 0, 0, b"hellO").unwrap_err();
        assert_eq!(err.code(), code::BAD_BLOCK);
        assert!(err.to_string().contains("a: block 0"), "{err}");
        assert_eq!(
            ReceiveJob::verify(&job.offer, 3, 0, b"x"),
            Err(JobError::UnknownFile(3))
        );
    }

    #[test]
    fn offers_with_bad_names_are_refused() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "a//b"] {
            let err = ReceiveJob::new(offer(vec![file(bad, b"x")])).unwrap_err();
            assert_eq!(err.code(), code::BAD_NAME, "{bad}");
        }
        let dup = offer(vec![file("a", b"x"), file("a", b"y")]);
        assert_eq!(ReceiveJob::new(dup).unwrap_err(), JobError::Duplicate("a".into()));
        let nested = offer(vec![file("a", b"x"), file("a/b", b"y")]);
        assert_eq!(ReceiveJob::new(nested).unwrap_err(), JobError::FileIsFolder("a".into()));
    }

    #[test]
    fn an_offer_whose_blocks_do_not_merge_is_refused() {
        let mut f = file("a", &vec![1u8; 2 * BLOCK_SIZE as usize]);
        f.hashes.blocks[1][3] ^= 1;
        let err = ReceiveJob::new(offer(vec![f])).unwrap_err();
        assert_eq!(err.code(), code::BAD_TREE);
    }

    #[test]
    fn plan_skips_held_blocks_and_spreads_the_rest() {
        let big = vec![1u8; 6 * BLOCK_SIZE as usize];
        let o = offer(vec![file("big", &big), file("s1", b"1"), file("s2", b"2")]);
        let mut job = ReceiveJob::new(o.clone()).unwrap();
        job.record(0, 2);
        let Message::Accept { have, .. } = job.accept() else {
            unreachable!()
        };
        let plan = SendPlan::new(&o, &have, 4).unwrap();
        assert_eq!(plan.held, 1);
        assert_eq!(plan.blocks(), 7);
        assert_eq!(plan.lanes.len(), 4);
        let all: Vec<_> = plan.lanes.iter().flatten().collect();
        assert!(!all.iter().any(|b| b.file == 0 && b.block == 2));
        let big_lanes = plan.lanes.iter().filter(|l| l.iter().any(|b| b.file == 0)).count();
        assert!(big_lanes >= 3, "a large file runs on several streams");
    }

    #[test]
    fn many_small_files_share_few_streams() {
        let files = (0..100).map(|i| file(&format!("f{i}"), b"abc")).collect();
        let o = offer(files);
        let have: Vec<Vec<u8>> = o.files.iter().map(|_| vec![0]).collect();
        let plan = SendPlan::new(&o, &have, 8).unwrap();
        assert_eq!(plan.lanes.len(), 8);
        assert_eq!(plan.blocks(), 100);
    }

    #[test]
    fn accept_that_does_not_fit_the_offer_is_refused() {
        let o = offer(vec![file("a", b"x")]);
        assert_eq!(SendPlan::new(&o, &[], 2), Err(JobError::BadAccept));
        assert_eq!(SendPlan::new(&o, &[vec![0, 0]], 2), Err(JobError::BadAccept));
    }
}
