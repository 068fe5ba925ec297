//! Writes the fuzz targets' seed inputs into `fuzz/corpus/<target>/seed-*`: real
//! messages of every type, valid and refused offers, a cache file written by the hash
//! cache, and SST files written by RocksDB's `ldb` (package `rocksdb-tools`) in each
//! compression it writes. The fuzzer and `cargo fuzz cmin` take it from there.
//!
//! `cargo run --example fuzz_seeds`

#[path = "../fuzz/targets/mod.rs"]
#[allow(dead_code)]
mod targets;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn main() {
    for (target, seeds) in [
        ("wire", seeds::wire()),
        ("offer", seeds::offer_target()),
        ("accept", seeds::accept()),
        ("hashcache", seeds::hashcache()),
        ("sst", seeds::sst()),
    ] {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (label, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{label}")), bytes).unwrap();
        }
    }
}

mod seeds {
    use crate::targets::hashcache::cache::{FileStamp, HashCache};
    use barge::proto::blocks::FileHashes;
    use barge::proto::keys::{Key, KeyRange, KeySpan};
    use barge::proto::wire::*;
    use std::process::Command;

    pub type Seeds = Vec<(String, Vec<u8>)>;

    fn body(msg: &Message) -> Vec<u8> {
        msg.encode().expect("a seed message is within the wire's limits")[4..].to_vec()
    }

    fn file(path: &str, data: &[u8]) -> OfferFile {
        OfferFile {
            path: path.into(),
            hashes: FileHashes::from_reader(data, data.len() as u64).unwrap(),
            keys: None,
            mode: 0o640,
        }
    }

    fn span() -> KeySpan {
        KeySpan {
            smallest: Key(b"a".to_vec()),
            largest: Key(vec![0xff, 0]),
        }
    }

    /// The body of an offer of these files.
    fn offer(files: Vec<OfferFile>) -> Vec<u8> {
        body(&Message::Offer(Offer {
            target: "db".into(),
            files,
            meta: vec![("region".into(), "7".into())],
            tcp_lane: true,
            hold: false,
            relay: vec![],
        }))
    }

    /// Offers: a valid one of files of 0, 1 and 3 blocks, one without files in both
    /// versions, and ones with a bad, a repeated and a nested name.
    fn offers() -> Seeds {
        let mut big = file("sst/000012.sst", &vec![7u8; (2 << 20) + 3]);
        big.keys = Some(span());
        let none = offer(vec![]);
        let mut none_v1 = none.clone();
        none_v1[0] = OLDEST_VERSION;
        let named = |names: &[&str]| offer(names.iter().map(|n| file(n, n.as_bytes())).collect());
        vec![
            (
                "offer".into(),
                offer(vec![file("empty", b""), file("a", b"hello"), big]),
            ),
            ("offer-empty".into(), none),
            ("offer-v1".into(), none_v1),
            ("offer-escape".into(), named(&["../x"])),
            ("offer-twice".into(), named(&["a", "a"])),
            ("offer-nested".into(), named(&["a", "a/b"])),
        ]
    }

    /// A body of every message type.
    pub fn wire() -> Seeds {
        let job = JobId([9; 16]);
        let range = Some(KeyRange {
            start: Key(b"k1".to_vec()),
            end: Some(Key(b"k9".to_vec())),
        });
        let messages = [
            (
                "fetch",
                Message::Fetch {
                    export: "db".into(),
                    files: vec!["a".into(), "b/c".into()],
                    range: range.clone(),
                },
            ),
            (
                "accept",
                Message::Accept {
                    have: vec![vec![0b101], vec![]],
                    tcp: Some(TcpGrant {
                        port: 7070,
                        token: [3; 32],
                        tls: false,
                    }),
                },
            ),
            (
                "accept-tls",
                Message::Accept {
                    have: vec![],
                    tcp: Some(TcpGrant {
                        port: 7071,
                        token: [4; 32],
                        tls: true,
                    }),
                },
            ),
            (
                "reject",
                Message::Reject(Refusal::new(code::BUSY, "busy").retry_after(5)),
            ),
            ("commit", Message::Commit { streams: 3 }),
            ("abort", Message::Abort),
            ("committed", Message::Committed { report: "ok".into() }),
            ("failed", Message::Failed(Refusal::new(code::BAD_BLOCK, "a: block 1"))),
            ("held", Message::Held { job }),
            ("job-op", Message::JobOp { op: JobOp::Abort, job }),
            ("aborted", Message::Aborted),
            ("list-jobs", Message::ListJobs),
            (
                "jobs",
                Message::Jobs(vec![JobInfo {
                    id: job,
                    state: "held".into(),
                    target: "db".into(),
                    peer: "b".into(),
                    files: 2,
                    bytes: 5,
                    done: 5,
                    age_secs: 60,
                }]),
            ),
            (
                "list",
                Message::List {
                    export: "db".into(),
                    range,
                },
            ),
            (
                "listing",
                Message::Listing(vec![ListedFile {
                    path: "a.sst".into(),
                    size: 1 << 20,
                    root: [4; 32],
                    keys: Some(span()),
                }]),
            ),
        ];
        let mut seeds: Seeds = messages.iter().map(|(label, m)| (label.to_string(), body(m))).collect();
        seeds.extend(relays());
        seeds.extend(offers());
        seeds
    }

    /// Version 3: an offer that names further replicas, their results, a ship and its progress.
    fn relays() -> Seeds {
        let hop = |n: &str| Hop {
            peer: format!("{n}@127.0.0.1:7878"),
            target: "in".into(),
        };
        let relayed = Offer {
            target: "in".into(),
            files: vec![file("a", b"relayed")],
            meta: vec![],
            tcp_lane: false,
            hold: true,
            relay: vec![hop("c"), hop("d")],
        };
        let result = ReplicaResult {
            peer: "c@127.0.0.1:7878".into(),
            target: "in".into(),
            outcome: ReplicaOutcome::Failed,
            job: JobId([5; 16]),
            code: code::NOT_ALLOWED,
            text: "b may not write".into(),
            bytes: 0,
        };
        let ship = Ship {
            export: "db".into(),
            files: vec!["a.sst".into()],
            range: None,
            to: vec![hop("b"), hop("c")],
            hold: false,
        };
        let messages = [
            ("relay-offer", Message::Offer(relayed)),
            ("replicas", Message::Replicas(vec![result])),
            ("ship", Message::Ship(ship)),
            ("progress", Message::Progress { done: 1, total: 2 }),
        ];
        messages.iter().map(|(label, m)| (label.to_string(), body(m))).collect()
    }

    /// Offer bodies (behind an even byte), and built offers (behind an odd one).
    pub fn offer_target() -> Seeds {
        let mut seeds: Seeds = offers()
            .into_iter()
            .map(|(l, b)| (l, [&[0][..], &b].concat()))
            .collect();
        seeds.push((
            "built".into(),
            vec![1, 3, 1, 0, 3, 0, 0, 2, 1, 3, 1, 1, 2, 4, 0, 2, 1, 1],
        ));
        seeds.push(("built-nested".into(), vec![1, 2, 1, 0, 1, 0, 0, 2, 0, 1, 1, 0, 0]));
        seeds
    }

    /// Plans: no files; files of 0 to 3 blocks with some held; a bitmap off by one.
    pub fn accept() -> Seeds {
        vec![
            ("none".into(), vec![0, 4, 0]),
            ("some".into(), vec![3, 0, 0, 1, 2, 3, 3, 0, 1, 0, 4, 8, 0, 0b10, 0b1]),
            ("off".into(), vec![1, 2, 0, 8, 1, 0, 0xff]),
        ]
    }

    /// Cache files written by the cache: hash records of 0 to 3 blocks, and a key span.
    pub fn hashcache() -> Seeds {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hashes");
        let cache = HashCache::open(&db).unwrap();
        for (i, size) in [0, 5, (1 << 20) + 5, 3 << 20].into_iter().enumerate() {
            let f = dir.path().join(format!("f{i}"));
            std::fs::write(&f, vec![i as u8; size]).unwrap();
            cache.get_or_hash(&f, FileStamp::now(&f).unwrap()).unwrap();
        }
        let sst = dir.path().join("f0");
        let read = |_: &std::path::Path| Ok::<_, ()>(span());
        cache.keys_or_read(&sst, FileStamp::now(&sst).unwrap(), read).unwrap();
        drop(cache);
        vec![("cache".into(), std::fs::read(&db).unwrap())]
    }

    /// Small tables written by RocksDB's `ldb`, of several data blocks, in each
    /// compression it writes, and one of a single entry.
    pub fn sst() -> Seeds {
        let dir = tempfile::tempdir().unwrap();
        let input: String = (0..40).map(|i| format!("key{i:03} ==> value{i}\n")).collect();
        let mut seeds = Seeds::new();
        for (compression, input) in [
            ("no", input.as_str()),
            ("snappy", &input),
            ("zlib", &input),
            ("lz4", &input),
            ("lz4hc", &input),
            ("zstd", &input),
            ("no", "only ==> one\n"),
        ] {
            let label = format!("{compression}-{}", input.lines().count());
            let db = format!("--db={}", dir.path().join(&label).display());
            let ldb = |args: &[&str], stdin: Option<&str>| {
                let mut cmd = Command::new("ldb");
                cmd.arg(&db).args(args);
                if let Some(text) = stdin {
                    let path = dir.path().join(format!("{label}.txt"));
                    std::fs::write(&path, text).unwrap();
                    cmd.stdin(std::fs::File::open(path).unwrap());
                }
                let out = cmd.output().expect("ldb (rocksdb-tools)");
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            };
            ldb(&["--create_if_missing", "put", "k", "v"], None);
            let sst = dir.path().join(format!("{label}.sst"));
            let compression = format!("--compression_type={compression}");
            let write = [
                &compression,
                "--block_size=256",
                "write_extern_sst",
                sst.to_str().unwrap(),
            ];
            ldb(&write, Some(input));
            let keys = crate::targets::sst::reader::read_keys(&sst).unwrap();
            assert_eq!(keys.entries_hint, Some(input.lines().count() as u64), "{label}");
            seeds.push((label, std::fs::read(&sst).unwrap()));
        }
        seeds
    }
}
