//! Block hashing and verification against plain blake3, in one run, as ratios.
//!
//! `cargo bench --bench blocks`. The block scheme costs one extra pass of chaining
//! value work per MiB; this shows how close it stays to `blake3::hash` on one thread.

use barge::proto::blocks::{FileHashes, BLOCK_SIZE};
use std::time::{Duration, Instant};

fn time(mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let size = 256usize << 20;
    let mut data = vec![0u8; size];
    blake3::Hasher::new().update(b"bench").finalize_xof().fill(&mut data);
    let hashes = FileHashes::from_reader(&data[..], size as u64).unwrap();
    let (mut plain, mut blocks, mut verify) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        plain.push(time(|| {
            std::hint::black_box(blake3::hash(&data));
        }));
        blocks.push(time(|| {
            std::hint::black_box(FileHashes::from_reader(&data[..], size as u64).unwrap());
        }));
        verify.push(time(|| {
            for (i, chunk) in data.chunks(BLOCK_SIZE as usize).enumerate() {
                hashes.verify_block(i as u64, chunk).unwrap();
            }
        }));
    }
    let mbs = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    let (p, b, v) = (median(plain), median(blocks), median(verify));
    println!("256 MiB in memory, one thread, median of 5:");
    println!("  blake3::hash (baseline)      {:>8.0} MB/s", mbs(p));
    println!(
        "  offer hashes (blocks + root) {:>8.0} MB/s  {:.2}x baseline",
        mbs(b),
        mbs(b) / mbs(p)
    );
    println!(
        "  verify every block           {:>8.0} MB/s  {:.2}x baseline",
        mbs(v),
        mbs(v) / mbs(p)
    );
}
