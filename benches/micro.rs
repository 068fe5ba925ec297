//! Criterion micro-benchmarks: block hashing and verification throughput, and the wire
//! encoding of a large offer. `cargo bench --bench micro`.

use barge::proto::blocks::{FileHashes, BLOCK_SIZE};
use barge::proto::wire::{Message, Offer, OfferFile};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;

fn data(len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    blake3::Hasher::new().update(b"micro").finalize_xof().fill(&mut d);
    d
}

fn hashing(c: &mut Criterion) {
    let file = data(16 << 20);
    let mut g = c.benchmark_group("hashing");
    g.throughput(Throughput::Bytes(file.len() as u64));
    g.bench_function("blake3::hash 16 MiB (baseline)", |b| {
        b.iter(|| blake3::hash(black_box(&file)))
    });
    g.bench_function("offer hashes 16 MiB (blocks + root)", |b| {
        b.iter(|| FileHashes::from_reader(black_box(&file[..]), file.len() as u64).unwrap())
    });
    let hashes = FileHashes::from_reader(&file[..], file.len() as u64).unwrap();
    g.bench_function("verify 16 blocks of 1 MiB", |b| {
        b.iter(|| {
            for (i, chunk) in file.chunks(BLOCK_SIZE as usize).enumerate() {
                hashes.verify_block(i as u64, black_box(chunk)).unwrap();
            }
        })
    });
    g.bench_function("check a 16-block list merges to the root", |b| {
        b.iter(|| hashes.check_tree().unwrap())
    });
    g.finish();
}

fn wire(c: &mut Criterion) {
    let hashes = FileHashes::from_reader(&data(3 << 20)[..], 3 << 20).unwrap();
    let files = (0..10_000)
        .map(|i| OfferFile {
            path: format!("region-42/{i:06}.sst"),
            hashes: hashes.clone(),
            keys: None,
            mode: 0o644,
        })
        .collect();
    let offer = Message::Offer(Offer {
        target: "ingest".into(),
        files,
        meta: vec![],
        tcp_lane: false,
        hold: false,
        relay: vec![],
    });
    let frame = offer.encode().unwrap();
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("encode an offer of 10,000 files", |b| {
        b.iter(|| black_box(&offer).encode().unwrap())
    });
    g.bench_function("decode an offer of 10,000 files", |b| {
        b.iter_batched(
            || &frame[4..],
            |body| Message::decode(body).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, hashing, wire);
criterion_main!(benches);
