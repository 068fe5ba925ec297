//! The sending side's files: what a push or an export contains, and their hashes.
//!
//! Names follow `cp -r`: a pushed file keeps its own name, a pushed folder `data`
//! arrives as `data/...`. The list is sorted so the same files always make the same
//! offer, and so the same job id, which is what lets an interrupted push resume.

use crate::proto::blocks::FileHashes;
use crate::proto::keys::{Key, KeyRange, KeySpan, Placement};
use crate::proto::limits::MAX_FILES;
use crate::proto::path::{PathError, RelPath, STAGING_DIR};
use crate::proto::wire::{Offer, OfferFile};
use crate::store::hashcache::{FileStamp, HashCache};
use crate::store::safefs::{self, Exported, Root};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the files to send could not be listed or hashed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A source file or folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// A symlink among the sources: barge never follows one.
    #[error("{0}: symlinks are not sent")]
    Symlink(PathBuf),
    /// Neither a regular file nor a folder (a device, a socket, a FIFO).
    #[error("{0}: not a regular file or folder")]
    NotFile(PathBuf),
    /// A pull named a file the export does not have.
    #[error("{0}: no such file in the export")]
    NotFound(String),
    /// A name that is not UTF-8, which the wire can not carry.
    #[error("{0}: name is not UTF-8")]
    NotUtf8(PathBuf),
    /// A name that is not a safe relative path.
    #[error(transparent)]
    BadName(#[from] PathError),
    /// Two sources would have the same name in the job.
    #[error("two sources are both named {0:?}")]
    Duplicate(String),
    /// More files than one job may have.
    #[error("{got} files is over the limit of {MAX_FILES} per job")]
    TooMany {
        /// Files found.
        got: usize,
    },
    /// An SST file whose key range could not be read.
    #[error("{path}: {err}")]
    Sst {
        /// The file.
        path: PathBuf,
        /// Why its keys could not be read.
        err: crate::engines::sst::SstError,
    },
    /// An SST file has keys on both sides of a boundary of the range asked for.
    #[error("region not aligned: {name} holds keys {span}, across the range boundary {key}")]
    NotAligned {
        /// The file's name in the export.
        name: String,
        /// Its smallest and largest key.
        span: KeySpan,
        /// The boundary inside that span.
        key: Key,
    },
    /// An export's file has more than one hard link, so another name could change it.
    #[error("{path}: has {links} hard links; an export sends only files with one")]
    Links {
        /// The file.
        path: PathBuf,
        /// Its link count.
        links: u64,
    },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file to send: its name in the job and where it is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// The file's name in the job.
    pub name: RelPath,
    /// Where it is on disk.
    pub path: PathBuf,
    /// Size in bytes when it was listed.
    pub size: u64,
    /// The version of the file that is offered; checked again once it has been read.
    pub stamp: FileStamp,
    /// For an export's file: the export folder, held open, that it is opened below.
    pub within: Option<Within>,
    /// Its permission bits (no set-id or sticky bits), which the receiver gives it.
    pub mode: u32,
}

/// Where an export's file is: `rel` below the export folder `root`, held open. It is
/// opened with no symlink followed and must be a regular file with one link: whoever
/// can write into an export must not be able to make the agent send another file, by a
/// symlink swapped in after the listing or by a hard link to it.
#[derive(Debug, Clone)]
pub struct Within {
    /// The export folder, held open.
    pub root: Root,
    /// The file's path below it.
    pub rel: PathBuf,
}

impl PartialEq for Within {
    fn eq(&self, other: &Within) -> bool {
        Arc::ptr_eq(&self.root, &other.root) && self.rel == other.rel
    }
}
impl Eq for Within {}

impl SourceFile {
    /// Opens the file to read it: an export's file below its export with no symlink
    /// followed, and checked (see [`Within`]); any other with `O_NOFOLLOW`.
    pub fn open(&self) -> Result<std::fs::File, SourceError> {
        let Some(w) = &self.within else {
            use std::os::unix::fs::OpenOptionsExt;
            return std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&self.path)
                .map_err(io_at(&self.path));
        };
        let file = safefs::open_beneath(w.root.as_fd(), &w.rel, libc::O_RDONLY, false).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ELOOP) => SourceError::Symlink(self.path.clone()),
                _ => io_at(&self.path)(e),
            }
        })?;
        self.check(&file.metadata().map_err(io_at(&self.path))?)?;
        Ok(file)
    }

    /// Where the disk thread reads it (see [`SourceFile::open`]).
    pub fn loc(&self) -> crate::store::disk::Loc {
        match &self.within {
            Some(w) => crate::store::disk::Loc::Beneath {
                dir: w.root.clone(),
                rel: w.rel.clone(),
                shown: self.path.clone(),
            },
            None => crate::store::disk::Loc::Path(self.path.clone()),
        }
    }

    /// Checks the metadata of the opened file: an export's must be a regular file with
    /// one link.
    pub fn check(&self, meta: &std::fs::Metadata) -> Result<(), SourceError> {
        match self.within.as_ref().map(|_| safefs::check_exported(meta)) {
            None | Some(Ok(())) => Ok(()),
            Some(Err(Exported::NotFile)) => Err(SourceError::NotFile(self.path.clone())),
            Some(Err(Exported::Links(links))) => Err(SourceError::Links {
                path: self.path.clone(),
                links,
            }),
        }
    }
}

/// Lists the files of a push: each path under its own name, folders recursively. A path
/// that is itself a symlink is refused, as any symlink inside a folder is: sending what
/// it points to under the link's name is rarely what was meant.
pub fn collect_push(paths: &[PathBuf]) -> Result<Vec<SourceFile>, SourceError> {
    let mut out = Vec::new();
    for p in paths {
        if std::fs::symlink_metadata(p).map_err(io_at(p))?.file_type().is_symlink() {
            return Err(SourceError::Symlink(p.clone()));
        }
        let abs = p.canonicalize().map_err(io_at(p))?;
        let name = abs.file_name().ok_or_else(|| SourceError::NotFile(p.clone()))?;
        let name = name.to_str().ok_or_else(|| SourceError::NotUtf8(p.clone()))?;
        add_entry(&abs, name, &mut out)?;
    }
    finish(out)
}

/// The SST files (`*.sst`) of `list` whose keys lie inside `range` (all of them if
/// none), each with its key span. Other files are left out. A file with keys on both
/// sides of a boundary is an error that names it: including it would ship keys outside
/// the region, leaving it out would lose keys inside.
pub fn select_sst(
    list: Vec<SourceFile>,
    range: Option<&KeyRange>,
    cache: &HashCache,
) -> Result<Vec<(SourceFile, KeySpan)>, SourceError> {
    let mut out = vec![];
    for f in list.into_iter().filter(|f| f.name.as_str().ends_with(".sst")) {
        // Opened first (and an export's file checked) even if its keys are cached.
        let file = f.open()?;
        let span = cache
            .keys_or_read(&f.path, f.stamp, |_| sst_span(&file))
            .map_err(|err| SourceError::Sst {
                path: f.path.clone(),
                err,
            })?;
        match range.map_or(Placement::Inside, |r| r.place(&span)) {
            Placement::Inside => out.push((f, span)),
            Placement::Outside => {}
            Placement::Straddles(key) => {
                return Err(SourceError::NotAligned {
                    name: f.name.to_string(),
                    span,
                    key,
                })
            }
        }
    }
    Ok(out)
}

fn sst_span(file: &std::fs::File) -> Result<KeySpan, crate::engines::sst::SstError> {
    let k = crate::engines::sst::read_keys_from(file)?;
    Ok(KeySpan {
        smallest: Key(k.smallest),
        largest: Key(k.largest),
    })
}

/// Lists files each under a name the caller chose (`name`, local path), for senders
/// that lay out the receiving side themselves (0-db's `<namespace>/d<N>`).
pub fn collect_named(files: &[(String, PathBuf)]) -> Result<Vec<SourceFile>, SourceError> {
    let mut out = Vec::new();
    for (name, path) in files {
        let meta = std::fs::symlink_metadata(path).map_err(io_at(path))?;
        if !meta.is_file() {
            return Err(SourceError::NotFile(path.clone()));
        }
        add_entry(path, name, &mut out)?;
    }
    finish(out)
}

/// Lists an export's files: all of them, or the named ones. Each is then opened below
/// the export, held open, with no symlink followed, and must have one link (see
/// [`Within`]); a named file is opened and checked right here.
pub fn collect_export(root: &Path, names: &[String]) -> Result<Vec<SourceFile>, SourceError> {
    let dir: Root = Arc::new(safefs::open_dir(root).map_err(io_at(root))?);
    let mut out = Vec::new();
    if names.is_empty() {
        walk(root, None, Some(&dir), &mut out)?;
        return finish(out);
    }
    for n in names {
        let rel = RelPath::new(n)?;
        let path = rel.under(root);
        let within = Within {
            root: dir.clone(),
            rel: PathBuf::from(rel.as_str()),
        };
        let opened = safefs::open_beneath(dir.as_fd(), &within.rel, libc::O_RDONLY, false);
        let meta = match opened.and_then(|f| f.metadata()) {
            Ok(m) => m,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(SourceError::Symlink(path)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                return Err(SourceError::NotFound(n.clone()))
            }
            Err(e) => return Err(io_at(&path)(e)),
        };
        if !meta.is_file() {
            return Err(SourceError::NotFound(n.clone()));
        }
        let file = SourceFile {
            name: rel,
            size: meta.len(),
            stamp: FileStamp::of(&meta),
            within: Some(within),
            path,
            mode: std::os::unix::fs::MetadataExt::mode(&meta) & crate::proto::wire::MODE_BITS,
        };
        file.check(&meta)?;
        out.push(file);
    }
    finish(out)
}

fn add_entry(path: &Path, name: &str, out: &mut Vec<SourceFile>) -> Result<(), SourceError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_at(path))?;
    add_found(path, name, meta, None, out)
}

/// Adds the file or folder at `path`, whose own (not followed) metadata is `meta`; in an
/// export (held open as `export`) a file must have one link.
fn add_found(
    path: &Path,
    name: &str,
    meta: std::fs::Metadata,
    export: Option<&Root>,
    out: &mut Vec<SourceFile>,
) -> Result<(), SourceError> {
    if meta.file_type().is_symlink() {
        return Err(SourceError::Symlink(path.to_path_buf()));
    }
    if meta.is_file() {
        let file = SourceFile {
            name: RelPath::new(name)?,
            path: path.to_path_buf(),
            size: meta.len(),
            stamp: FileStamp::of(&meta),
            within: export.map(|root| Within {
                root: root.clone(),
                rel: PathBuf::from(name),
            }),
            mode: std::os::unix::fs::MetadataExt::mode(&meta) & crate::proto::wire::MODE_BITS,
        };
        file.check(&meta)?;
        out.push(file);
        Ok(())
    } else if meta.is_dir() {
        walk(path, Some(name), export, out)
    } else {
        Err(SourceError::NotFile(path.to_path_buf()))
    }
}

fn walk(dir: &Path, prefix: Option<&str>, export: Option<&Root>, out: &mut Vec<SourceFile>) -> Result<(), SourceError> {
    for entry in std::fs::read_dir(dir).map_err(io_at(dir))? {
        let entry = entry.map_err(io_at(dir))?;
        let fname = entry.file_name();
        let fname = fname.to_str().ok_or_else(|| SourceError::NotUtf8(entry.path()))?;
        if prefix.is_none() && fname == STAGING_DIR {
            continue;
        }
        let name = match prefix {
            Some(p) => format!("{p}/{fname}"),
            None => fname.to_string(),
        };
        // Stat relative to the open folder: no walk of the whole path per file.
        let path = entry.path();
        let meta = entry.metadata().map_err(io_at(&path))?;
        add_found(&path, &name, meta, export, out)?;
        if out.len() > MAX_FILES {
            return Err(SourceError::TooMany { got: out.len() });
        }
    }
    Ok(())
}

fn finish(mut out: Vec<SourceFile>) -> Result<Vec<SourceFile>, SourceError> {
    out.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = out.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(SourceError::Duplicate(w[0].name.to_string()));
    }
    if out.len() > MAX_FILES {
        return Err(SourceError::TooMany { got: out.len() });
    }
    Ok(out)
}

/// Hashes every file not in `cache` (on blocking threads, two at a time) and builds the offer.
pub async fn make_offer(
    target: &str,
    files: &[SourceFile],
    meta: Vec<(String, String)>,
    cache: &Arc<HashCache>,
) -> Result<Offer, SourceError> {
    let workers = 2;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let mine: Vec<(usize, SourceFile)> = files
            .iter()
            .cloned()
            .enumerate()
            .filter(|(i, _)| i % workers == w)
            .collect();
        let cache = cache.clone();
        tasks.spawn_blocking(move || {
            mine.into_iter()
                .map(|(i, f)| {
                    cache
                        .get_or_hash_opened(f.stamp, || f.open(), |e| io_at(&f.path)(e))
                        .map(|h| (i, h))
                })
                .collect::<Result<Vec<_>, _>>()
        });
    }
    let mut hashes: Vec<Option<FileHashes>> = vec![None; files.len()];
    while let Some(r) = tasks.join_next().await {
        for (i, h) in r.expect("hash task")? {
            hashes[i] = Some(h);
        }
    }
    let files = files
        .iter()
        .zip(hashes)
        .map(|(f, h)| OfferFile {
            path: f.name.to_string(),
            hashes: h.expect("every file hashed"),
            keys: None,
            mode: f.mode,
        })
        .collect();
    Ok(Offer {
        target: target.to_string(),
        files,
        meta,
        tcp_lane: false,
        hold: false,
        relay: vec![],
    })
}

/// Hashes one file, expecting `size` bytes.
pub fn hash_file(path: &Path, size: u64) -> Result<FileHashes, SourceError> {
    let f = std::fs::File::open(path).map_err(io_at(path))?;
    FileHashes::from_reader(std::io::BufReader::with_capacity(1 << 20, f), size).map_err(io_at(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_names_follow_cp_r() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("data/sub")).unwrap();
        std::fs::write(t.path().join("data/sub/x"), b"1").unwrap();
        std::fs::write(t.path().join("data/y"), b"22").unwrap();
        std::fs::write(t.path().join("single"), b"333").unwrap();
        let files = collect_push(&[t.path().join("data"), t.path().join("single")]).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["data/sub/x", "data/y", "single"]);
        assert_eq!(files[2].size, 3);
    }

    #[test]
    fn symlinks_duplicates_and_missing_files_are_errors() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/x")).unwrap();
        std::fs::create_dir_all(t.path().join("b/x")).unwrap();
        std::fs::write(t.path().join("a/x/f"), b"1").unwrap();
        std::fs::write(t.path().join("b/x/f"), b"1").unwrap();
        let dup = collect_push(&[t.path().join("a/x"), t.path().join("b/x")]);
        assert!(matches!(dup, Err(SourceError::Duplicate(_))));
        std::os::unix::fs::symlink("/etc", t.path().join("a/link")).unwrap();
        assert!(matches!(
            collect_push(&[t.path().join("a")]),
            Err(SourceError::Symlink(_))
        ));
        // A path given on its own that is a symlink is refused the same way, by name.
        std::os::unix::fs::symlink(t.path().join("a/x/f"), t.path().join("l")).unwrap();
        let err = collect_push(&[t.path().join("l")]).unwrap_err();
        assert!(err.to_string().ends_with("l: symlinks are not sent"), "{err}");
        assert!(matches!(
            collect_push(&[t.path().join("none")]),
            Err(SourceError::Io { .. })
        ));
    }

    #[test]
    fn export_selection_is_confined() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("r/d")).unwrap();
        std::fs::write(t.path().join("r/d/f"), b"1").unwrap();
        std::fs::write(t.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), t.path().join("r/link")).unwrap();
        let root = t.path().join("r");
        assert_eq!(collect_export(&root, &["d/f".into()]).unwrap().len(), 1);
        assert!(matches!(
            collect_export(&root, &["../secret".into()]),
            Err(SourceError::BadName(_))
        ));
        assert!(matches!(
            collect_export(&root, &["link".into()]),
            Err(SourceError::Symlink(_))
        ));
        assert!(matches!(
            collect_export(&root, &["d".into()]),
            Err(SourceError::NotFound(_))
        ));
        assert!(matches!(
            collect_export(&root, &["nope".into()]),
            Err(SourceError::NotFound(_))
        ));
    }

    #[test]
    fn export_files_swapped_for_a_symlink_or_with_more_links_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("f"), b"f").unwrap();
        std::fs::write(root.join("g"), b"g").unwrap();
        std::fs::write(t.path().join("secret"), b"secret").unwrap();
        let files = collect_export(&root, &[]).unwrap();
        assert!(files.iter().all(|f| f.open().is_ok()));
        // Swapped for a symlink after the listing: not followed.
        std::fs::remove_file(root.join("f")).unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), root.join("f")).unwrap();
        assert!(matches!(files[0].open(), Err(SourceError::Symlink(_))));
        // A second link, made after the listing or before it.
        std::fs::hard_link(root.join("g"), t.path().join("elsewhere")).unwrap();
        let err = files[1].open().unwrap_err();
        assert!(matches!(err, SourceError::Links { links: 2, .. }), "{err}");
        assert!(err
            .to_string()
            .ends_with("g: has 2 hard links; an export sends only files with one"));
        assert!(matches!(
            collect_export(&root, &["g".into()]),
            Err(SourceError::Links { .. })
        ));
        std::fs::remove_file(root.join("f")).unwrap();
        assert!(matches!(collect_export(&root, &[]), Err(SourceError::Links { .. })));
        // A push of a hard-linked local file is the user's own choice: sent.
        let pushed = collect_push(&[root.join("g")]).unwrap();
        assert!(pushed[0].open().is_ok());
    }

    #[tokio::test]
    async fn offer_roots_equal_plain_blake3() {
        let t = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        std::fs::write(t.path().join("big"), &big).unwrap();
        std::fs::write(t.path().join("small"), b"hi").unwrap();
        let files = collect_push(&[t.path().join("big"), t.path().join("small")]).unwrap();
        let offer = make_offer("t", &files, vec![], &Arc::new(HashCache::in_memory()))
            .await
            .unwrap();
        assert_eq!(offer.files[0].hashes.root, *blake3::hash(&big).as_bytes());
        assert_eq!(offer.files[1].hashes.root, *blake3::hash(b"hi").as_bytes());
    }
}
