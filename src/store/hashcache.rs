//! Hash once: a file's root and block chaining values, cached by (device, inode,
//! size, modification time), so an immutable file sent again is not read twice. An SST
//! file's key span is cached the same way, so listing a region does not reopen every
//! table.
//!
//! The cache lives in memory and, when given a path, in an append-only file of
//! checksummed records loaded at start. A torn or corrupt tail (a crash mid-append) is
//! cut off; past `MAX_FILE` bytes the file starts over. A changed file has a new key,
//! so a stale entry is never used, only left behind until the file starts over.

use crate::proto::blocks::{Digest, FileHashes};
use crate::proto::keys::{Key, KeySpan};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Largest cache file before it starts over.
const MAX_FILE: u64 = 256 << 20;
const MAGIC: &[u8; 8] = b"bargeHC2";
const KIND_HASHES: u8 = 1;
const KIND_KEYS: u8 = 2;

/// Identity of one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileStamp {
    /// Device the file is on.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Its modification time, ns since the epoch.
    pub mtime_ns: i64,
}

impl FileStamp {
    /// The stamp of the file `meta` describes.
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
    keys: Mutex<HashMap<FileStamp, KeySpan>>,
    file: Mutex<Option<std::fs::File>>,
    hashed: AtomicU64,
    /// The file still being read by [`HashCache::load`]; the first lookup waits for it.
    loading: Mutex<Option<Loading>>,
}

type Loading = (PathBuf, std::thread::JoinHandle<std::io::Result<HashCache>>);

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
        let (map, keys, good) = parse(&bytes);
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
        let (map, keys) = if bytes.len() as u64 > MAX_FILE {
            (HashMap::new(), HashMap::new())
        } else {
            (map, keys)
        };
        Ok(HashCache {
            map: Mutex::new(map),
            keys: Mutex::new(keys),
            file: Mutex::new(Some(file)),
            ..HashCache::default()
        })
    }

    /// Like [`HashCache::open`], but reads the file on a thread of its own, so the
    /// caller can list its files meanwhile (30,000 entries take 20-40 ms to read). A
    /// file that can not be read is logged and the cache is kept in memory only.
    pub fn load(path: &Path) -> HashCache {
        let p = path.to_path_buf();
        let reader = std::thread::Builder::new()
            .name("barge-hash-cache".into())
            .spawn(move || HashCache::open(&p));
        match reader {
            Ok(handle) => HashCache {
                loading: Mutex::new(Some((path.to_path_buf(), handle))),
                ..HashCache::default()
            },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "hash cache not used");
                HashCache::default()
            }
        }
    }

    /// Waits until the file given to [`HashCache::load`] is read.
    fn ready(&self) {
        let mut loading = self.loading.lock().expect("hash cache loader");
        let Some((path, handle)) = loading.take() else { return };
        let loaded = handle
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("reader panicked")));
        match loaded {
            Ok(c) => {
                *self.map.lock().expect("hash cache") = c.map.into_inner().expect("hash cache");
                *self.keys.lock().expect("key cache") = c.keys.into_inner().expect("key cache");
                *self.file.lock().expect("hash cache file") = c.file.into_inner().expect("hash cache file");
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "hash cache not used"),
        }
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
        self.get_or_hash_opened(stamp, || std::fs::File::open(path), |e| e)
    }

    /// Like [`HashCache::get_or_hash`], for a file that `open` opens (only if it is not
    /// cached); `io` makes a read error one of the caller's.
    pub fn get_or_hash_opened<E>(
        &self,
        stamp: FileStamp,
        open: impl FnOnce() -> Result<std::fs::File, E>,
        io: impl Fn(std::io::Error) -> E,
    ) -> Result<FileHashes, E> {
        self.ready();
        if let Some(h) = self.map.lock().expect("hash cache").get(&stamp) {
            return Ok(h.clone());
        }
        let f = open()?;
        let hashes =
            FileHashes::from_reader(std::io::BufReader::with_capacity(1 << 20, &f), stamp.size).map_err(&io)?;
        self.hashed.fetch_add(1, Ordering::Relaxed);
        // Cache only if the file read is the version offered and did not change while
        // it was read.
        if FileStamp::of(&f.metadata().map_err(&io)?) == stamp {
            self.insert(stamp, &hashes);
        }
        Ok(hashes)
    }

    fn insert(&self, stamp: FileStamp, hashes: &FileHashes) {
        self.append(&record(stamp, hashes));
        self.map.lock().expect("hash cache").insert(stamp, hashes.clone());
    }

    fn append(&self, record: &[u8]) {
        if let Some(f) = self.file.lock().expect("hash cache file").as_mut() {
            if let Err(e) = f.write_all(record) {
                tracing::warn!(error = %e, "hash cache not written");
            }
        }
    }

    /// The key span of the file at `path` as it is now, from the cache or from `read`.
    pub fn keys_or_read<E>(
        &self,
        path: &Path,
        stamp: FileStamp,
        read: impl FnOnce(&Path) -> Result<KeySpan, E>,
    ) -> Result<KeySpan, E> {
        self.ready();
        if let Some(k) = self.keys.lock().expect("key cache").get(&stamp) {
            return Ok(k.clone());
        }
        let span = read(path)?;
        if FileStamp::now(path).is_ok_and(|now| now == stamp) {
            self.append(&keys_record(stamp, &span));
            self.keys.lock().expect("key cache").insert(stamp, span.clone());
        }
        Ok(span)
    }
}

/// Record: body length (u32), body (kind, stamp, then for hashes: root, block count,
/// blocks; for keys: the two keys, each u32-counted), then the first 8 bytes of the
/// body's blake3 hash.
fn record(stamp: FileStamp, h: &FileHashes) -> Vec<u8> {
    let mut body = Vec::with_capacity(73 + 32 * h.blocks.len());
    body.push(KIND_HASHES);
    stamp.encode(&mut body);
    body.extend_from_slice(&h.root);
    body.extend_from_slice(&(h.blocks.len() as u32).to_be_bytes());
    h.blocks.iter().for_each(|b| body.extend_from_slice(b));
    seal(body)
}

fn keys_record(stamp: FileStamp, span: &KeySpan) -> Vec<u8> {
    let mut body = vec![KIND_KEYS];
    stamp.encode(&mut body);
    for k in [&span.smallest, &span.largest] {
        body.extend_from_slice(&(k.0.len() as u32).to_be_bytes());
        body.extend_from_slice(&k.0);
    }
    seal(body)
}

fn seal(body: Vec<u8>) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out.extend_from_slice(&blake3::hash(&body).as_bytes()[..8]);
    out
}

type Maps = (HashMap<FileStamp, FileHashes>, HashMap<FileStamp, KeySpan>);

enum Entry {
    Hashes(FileStamp, FileHashes),
    Keys(FileStamp, KeySpan),
}

/// Parses records; returns them and the length of the valid prefix (0: bad magic).
/// Public only so the fuzz target (`fuzz/targets/hashcache.rs`) can reach it.
pub fn parse(bytes: &[u8]) -> (HashMap<FileStamp, FileHashes>, HashMap<FileStamp, KeySpan>, u64) {
    let mut maps: Maps = Default::default();
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return (maps.0, maps.1, 0);
    }
    let mut pos = 8;
    while let Some((entry, next)) = parse_one(bytes, pos) {
        match entry {
            Entry::Hashes(stamp, h) => maps.0.insert(stamp, h).map(|_| ()),
            Entry::Keys(stamp, k) => maps.1.insert(stamp, k).map(|_| ()),
        };
        pos = next;
    }
    (maps.0, maps.1, pos as u64)
}

fn parse_one(bytes: &[u8], pos: usize) -> Option<(Entry, usize)> {
    let len = u32::from_be_bytes(bytes.get(pos..pos + 4)?.try_into().ok()?) as usize;
    let body = bytes.get(pos + 4..pos + 4 + len)?;
    let sum = bytes.get(pos + 4 + len..pos + 12 + len)?;
    if sum != &blake3::hash(body).as_bytes()[..8] || len < 33 {
        return None;
    }
    let next = pos + 12 + len;
    match body[0] {
        KIND_HASHES => parse_hashes(&body[1..]).map(|(s, h)| (Entry::Hashes(s, h), next)),
        KIND_KEYS => parse_keys(&body[1..]).map(|(s, k)| (Entry::Keys(s, k), next)),
        _ => None,
    }
}

fn parse_keys(body: &[u8]) -> Option<(FileStamp, KeySpan)> {
    let stamp = parse_stamp(body)?;
    let mut rest = &body[32..];
    let mut key = || -> Option<Key> {
        let n = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let k = rest.get(4..4 + n)?.to_vec();
        rest = &rest[4 + n..];
        Some(Key(k))
    };
    let span = KeySpan {
        smallest: key()?,
        largest: key()?,
    };
    Some((stamp, span))
}

fn parse_stamp(body: &[u8]) -> Option<FileStamp> {
    let word = |i: usize| -> Option<u64> { Some(u64::from_be_bytes(body.get(i * 8..i * 8 + 8)?.try_into().ok()?)) };
    Some(FileStamp {
        dev: word(0)?,
        ino: word(1)?,
        size: word(2)?,
        mtime_ns: word(3)? as i64,
    })
}

fn parse_hashes(body: &[u8]) -> Option<(FileStamp, FileHashes)> {
    if body.len() < 68 {
        return None;
    }
    let stamp = parse_stamp(body)?;
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
    Some((stamp, hashes))
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

    #[test]
    fn a_cache_read_in_the_background_is_used_and_kept_up() {
        let t = tempfile::tempdir().unwrap();
        let (f, g, db) = (t.path().join("f"), t.path().join("g"), t.path().join("hashes"));
        std::fs::write(&f, b"first").unwrap();
        std::fs::write(&g, b"second").unwrap();
        HashCache::open(&db).unwrap().get_or_hash(&f, stamp(&f)).unwrap();
        let c = HashCache::load(&db);
        c.get_or_hash(&f, stamp(&f)).unwrap();
        assert_eq!(c.hashed(), 0, "the entry read in the background was used");
        c.get_or_hash(&g, stamp(&g)).unwrap();
        drop(c);
        let c = HashCache::load(&db);
        c.get_or_hash(&g, stamp(&g)).unwrap();
        assert_eq!(c.hashed(), 0, "what was added after the load was written to the file");
        // A cache path that can not be a file: kept in memory, still works.
        let c = HashCache::load(t.path());
        c.get_or_hash(&f, stamp(&f)).unwrap();
        c.get_or_hash(&f, stamp(&f)).unwrap();
        assert_eq!(c.hashed(), 1);
    }

    #[test]
    fn key_spans_are_cached_across_restarts_until_the_file_changes() {
        let t = tempfile::tempdir().unwrap();
        let (f, db) = (t.path().join("a.sst"), t.path().join("hashes"));
        std::fs::write(&f, b"table").unwrap();
        let span = KeySpan {
            smallest: Key(vec![0, 1]),
            largest: Key(b"zz".to_vec()),
        };
        let reads = std::cell::Cell::new(0);
        let read = |_: &Path| -> Result<KeySpan, ()> {
            reads.set(reads.get() + 1);
            Ok(span.clone())
        };
        let c = HashCache::open(&db).unwrap();
        assert_eq!(c.keys_or_read(&f, stamp(&f), read).unwrap(), span);
        c.get_or_hash(&f, stamp(&f)).unwrap();
        drop(c);
        let c = HashCache::open(&db).unwrap();
        assert_eq!(c.keys_or_read(&f, stamp(&f), read).unwrap(), span);
        assert_eq!(reads.get(), 1, "the span came from the cache file");
        c.get_or_hash(&f, stamp(&f)).unwrap();
        assert_eq!(c.hashed(), 0, "hash records still load beside key records");
        std::fs::write(&f, b"other table").unwrap();
        c.keys_or_read(&f, stamp(&f), read).unwrap();
        assert_eq!(reads.get(), 2);
    }
}
