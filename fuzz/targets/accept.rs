//! The accept bitmap: the sender's plan from the receiver's `Accept`.
//!
//! Input: a file count, each file's size near a block boundary, the lane limit, then each
//! file's bitmap, of its right length unless a flag says to make it one byte off, and
//! whether the list of bitmaps has one too many or too few.
//!
//! Properties: the bitmaps survive the `Accept` message's encoding; a plan is built
//! exactly when the list and every bitmap have the offer's lengths, and then it sends
//! every block whose bit is clear once, with its offset and length, and no other; `held`
//! counts the set bits of real blocks; it uses as many lanes as it can up to the limit
//! (clamped to 1..=MAX_STREAMS), none of them empty.

use super::input::Input;
use barge::proto::blocks::{block_count, block_len, FileHashes, BLOCK_SIZE};
use barge::proto::job::{JobError, SendPlan};
use barge::proto::limits::MAX_STREAMS;
use barge::proto::wire::{Message, Offer};
use std::collections::BTreeSet;

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let sizes: Vec<u64> = (0..input.u8() % 6).map(|_| size(&mut input)).collect();
    let max_lanes = input.u8() as usize;
    let flags = input.u8();
    let mut have: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&size| {
            let mut len = block_count(size).div_ceil(8) as usize;
            if flags & 1 != 0 {
                match input.u8() {
                    0 => len += 1,
                    1 => len = len.saturating_sub(1),
                    _ => {}
                }
            }
            let mut map = input.bytes(len).to_vec();
            map.resize(len, 0);
            map
        })
        .collect();
    match flags >> 1 & 3 {
        1 => drop(have.pop()),
        2 => have.push(vec![0]),
        _ => {}
    }
    let offer = offer(&sizes);
    let accept = Message::Accept { have, tcp: None };
    let frame = accept.encode().expect("an accept of bitmaps that fit encodes");
    assert_eq!(Message::decode(&frame[4..]).as_ref(), Ok(&accept));
    let Message::Accept { have, .. } = accept else {
        unreachable!()
    };
    check(&offer, &have, max_lanes);
}

/// A size of 0 to 40 blocks, at, just around or anywhere inside a block boundary.
fn size(input: &mut Input) -> u64 {
    let whole = (input.u8() % 41) as u64 * BLOCK_SIZE;
    match input.u8() % 4 {
        0 => whole,
        1 => whole + 1,
        2 => whole.saturating_sub(1),
        _ => whole + input.u32() as u64 % BLOCK_SIZE,
    }
}

/// An offer of files of these sizes (the plan reads only the sizes).
fn offer(sizes: &[u64]) -> Offer {
    super::offer_of(sizes.iter().enumerate().map(|(i, &size)| {
        let hashes = FileHashes {
            size,
            root: [0; 32],
            blocks: vec![],
        };
        (format!("f{i}"), hashes)
    }))
}

fn check(offer: &Offer, have: &[Vec<u8>], max_lanes: usize) {
    let fits = have.len() == offer.files.len()
        && offer
            .files
            .iter()
            .zip(have)
            .all(|(f, map)| map.len() as u64 == block_count(f.hashes.size).div_ceil(8));
    let plan = match SendPlan::new(offer, have, max_lanes) {
        Ok(plan) => plan,
        Err(err) => {
            assert_eq!(err, JobError::BadAccept);
            assert!(!fits, "an accept of the offer's lengths refused");
            return;
        }
    };
    assert!(fits, "an accept of other lengths taken");
    let mut want = BTreeSet::new();
    let mut held = 0;
    for (i, (f, map)) in offer.files.iter().zip(have).enumerate() {
        for b in 0..block_count(f.hashes.size) {
            match map[b as usize / 8] >> (b % 8) & 1 {
                1 => held += 1,
                _ => drop(want.insert((i as u32, b as u32))),
            }
        }
    }
    assert_eq!(plan.held, held);
    let mut sent = BTreeSet::new();
    for block in plan.lanes.iter().flatten() {
        assert!(sent.insert((block.file, block.block)), "{block:?} sent twice");
        let size = offer.files[block.file as usize].hashes.size;
        assert_eq!(block.offset, block.block as u64 * BLOCK_SIZE, "{block:?}");
        assert_eq!(block.len as usize, block_len(size, block.block as u64), "{block:?}");
    }
    assert_eq!(sent, want, "the blocks sent are the blocks not held");
    assert_eq!(plan.blocks(), want.len() as u64);
    let lanes = max_lanes.clamp(1, MAX_STREAMS);
    assert!(plan.lanes.iter().all(|l| !l.is_empty()), "an empty lane");
    assert_eq!(plan.lanes.len(), lanes.min(want.len()), "lanes used");
}
