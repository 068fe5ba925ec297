//! Hash once: a file's root and block chaining values, cached by (device, inode,
//! size, modification time), so an immutable file sent again is not read twice.
//!
//! The cache lives in memory and, when given a path, in an append-only file of
//! checksummed records loaded at start. A torn or corrupt tail (a crash mid-append) is
//! cut off; past `MAX_FILE` bytes the file starts over. A changed file has a new key,
//! so a stale entry is never used, only left behind until the file starts over.

use crate::proto::blocks::{Digest, FileHashes};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Largest cache file before it starts over.
const MAX_FILE: u64 = 256 << 20;
const MAGIC: &[u8; 8] = b"bargeHC1";

/// Identity of one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
        }
    }

    /// Stats `path` again.
    pub fn now(path: &Path) -> std::io::Result<FileStamp> {
        std::fs::metadata(path).map(|m| FileStamp::of(&m))
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.dev, self.ino, self.size, self.mtime_ns as u64] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

/// The cache; share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct HashCache {
    map: Mutex<HashMap<FileStamp, FileHashes>>,
    file: Mutex<Option<std::fs::File>>,
    hashed: AtomicU64,
}

impl HashCache {
    /// A cache kept in memory only.
    pub fn in_memory() -> HashCache {
        HashCache::default()
    }

    /// A cache persisted at `path` (created if missing, with its folder).
    pub fn open(path: &Path) -> std::io::Result<HashCache> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (map, good) = parse(&bytes);
        if good < bytes.len() as u64 || bytes.len() as u64 > MAX_FILE || good == 0 {
            let keep = if bytes.len() as u64 > MAX_FILE || good == 0 {
                0
            } else {
                good
            };
            file.set_len(keep)?;
            if keep == 0 {
                file.write_all(MAGIC)?;
            }
        }
        let map = if bytes.len() as u64 > MAX_FILE {
            HashMap::new()
        } else {
            map
        };
        Ok(HashCache {
            map: Mutex::new(map),
            file: Mutex::new(Some(file)),
            hashed: AtomicU64::new(0),
        })
    }

    /// The default cache file of the CLI: `$XDG_CACHE_HOME/barge/hashes` or `~/.cache/barge/hashes`.
    pub fn default_path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("barge").join("hashes"))
    }

    /// How many files this cache had to read and hash (for tests and reports).
    pub fn hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// The hashes of `path` as it is now, from the cache or by reading it.
    pub fn get_or_hash(&self, path: &Path, stamp: FileStamp) -> std::io::Result<FileHashes> {
        if let Some(h) = self.map.lock().expect("hash cache").get(&stamp) {
            return Ok(h.clone());
        }
        let f = std::fs::File::open(path)?;
        let hashes = FileHashes::from_reader(std::io::BufReader::with_capacity(1 << 20, f), stamp.size)?;
        self.hashed.fetch_add(1, Ordering::Relaxed);
        // Cache only if the file did not change while it was read.
        if FileStamp::now(path)? == stamp {
            self.insert(stamp, &hashes);
        }
        Ok(hashes)
    }

    fn insert(&self, stamp: FileStamp, hashes: &FileHashes) {
        if let Some(f) = self.file.lock().expect("hash cache file").as_mut() {
            if let Err(e) = f.write_all(&record(stamp, hashes)) {
                tracing::warn!(error = %e, "hash cache not written");
            }
        }
        self.map.lock().expect("hash cache").insert(stamp, hashes.clone());
    }
}

/// Record: body length (u32), body (stamp, root, block count, blocks), then the first
/// 8 bytes of the body's blake3 hash.
fn record(stamp: FileStamp, h: &FileHashes) -> Vec<u8> {
    let mut body = Vec::with_capacity(72 + 32 * h.blocks.len());
    stamp.encode(&mut body);
    body.extend_from_slice(&h.root);
    body.extend_from_slice(&(h.blocks.len() as u32).to_be_bytes());
    h.blocks.iter().for_each(|b| body.extend_from_slice(b));
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out.extend_from_slice(&blake3::hash(&body).as_bytes()[..8]);
    out
}

/// Parses records; returns them and the length of the valid prefix (0: bad magic).
fn parse(bytes: &[u8]) -> (HashMap<FileStamp, FileHashes>, u64) {
    let mut map = HashMap::new();
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return (map, 0);
    }
    let mut pos = 8;
    while let Some((stamp, hashes, next)) = parse_one(bytes, pos) {
        map.insert(stamp, hashes);
        pos = next;
    }
    (map, pos as u64)
}

fn parse_one(bytes: &[u8], pos: usize) -> Option<(FileStamp, FileHashes, usize)> {
    let len = u32::from_be_bytes(bytes.get(pos..pos + 4)?.try_into().ok()?) as usize;
    let body = bytes.get(pos + 4..pos + 4 + len)?;
    let sum = bytes.get(pos + 4 + len..pos + 12 + len)?;
    if sum != &blake3::hash(body).as_bytes()[..8] || len < 68 {
        return None;
    }
    let word = |i: usize| u64::from_be_bytes(body[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let stamp = FileStamp {
        dev: word(0),
        ino: word(1),
        size: word(2),
        mtime_ns: word(3) as i64,
    };
    let root: Digest = body[32..64].try_into().ok()?;
    let n = u32::from_be_bytes(body[64..68].try_into().ok()?) as usize;
    if body.len() != 68 + 32 * n {
        return None;
    }
    let blocks = body[68..].chunks(32).map(|c| c.try_into().expect("32 bytes")).collect();
    let hashes = FileHashes {
        size: stamp.size,
        root,
        blocks,
    };
    hashes.check_tree().ok()?;
    Some((stamp, hashes, pos + 12 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(p: &Path) -> FileStamp {
        FileStamp::now(p).unwrap()
    }

    #[test]
    fn a_file_is_hashed_once_until_it_changes() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, vec![3u8; 3 << 20]).unwrap();
        let c = HashCache::in_memory();
        let a = c.get_or_hash(&f, stamp(&f)).unwrap();
        let b = c.get_or_hash(&f, stamp(&f)).unwrap();
        assert_eq!((a.clone(), c.hashed()), (b, 1));
        assert_eq!(a.root, *blake3::hash(&vec![3u8; 3 << 20]).as_bytes());
        std::fs::write(&f, vec![4u8; 3 << 20]).unwrap();
        let changed = c.get_or_hash(&f, stamp(&f)).unwrap();
        assert_eq!(c.hashed(), 2, "a rewritten file is hashed again");
        assert_ne!(changed.root, a.root);
    }

    #[test]
    fn the_cache_survives_a_restart_and_a_torn_tail() {
        let t = tempfile::tempdir().unwrap();
        let (f, g, db) = (t.path().join("f"), t.path().join("g"), t.path().join("cache/hashes"));
        std::fs::write(&f, vec![1u8; (1 << 20) + 5]).unwrap();
        std::fs::write(&g, b"small").unwrap();
        let c = HashCache::open(&db).unwrap();
        c.get_or_hash(&f, stamp(&f)).unwrap();
        c.get_or_hash(&g, stamp(&g)).unwrap();
        drop(c);
        let c = HashCache::open(&db).unwrap();
        c.get_or_hash(&f, stamp(&f)).unwrap();
        c.get_or_hash(&g, stamp(&g)).unwrap();
        assert_eq!(c.hashed(), 0, "both came from the file");
        drop(c);
        // Tear the last record: the first one stays usable.
        let len = std::fs::metadata(&db).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let c = HashCache::open(&db).unwrap();
        c.get_or_hash(&f, stamp(&f)).unwrap();
        c.get_or_hash(&g, stamp(&g)).unwrap();
        assert_eq!(c.hashed(), 1);
        // Garbage instead of a cache file starts over.
        std::fs::write(&db, b"garbage").unwrap();
        let c = HashCache::open(&db).unwrap();
        c.get_or_hash(&g, stamp(&g)).unwrap();
        assert_eq!(c.hashed(), 1);
    }
}
