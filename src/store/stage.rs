//! The staging area of an import target: where a job's files are written, checked
//! and synced before anything becomes visible.
//!
//! Each job stages under `<target>/.barge-staging/<job-id>/files/<name>`, on the same
//! file system as the target so the final rename is cheap. The job id is derived from
//! the offer, so the same push sent again finds its staged blocks, re-verifies them
//! from disk and asks only for what is missing, even after the agent restarted. A held
//! job's blocks are all verified again before it commits ([`Stage::verify`]). Placing
//! the staged files into the target is [`crate::store::commit`]'s.
//!
//! The job id is predictable and the target may be writable by other local users, so
//! nothing under staging is reached by path: `.barge-staging` and the job's folder are
//! made mode 0700 and must be real folders owned by the agent, checked on the opened
//! descriptors; every staged file is opened below the job's folder, held open, with no
//! symlink followed ([`crate::store::safefs`]). A symlink found there is an error.

use crate::proto::blocks::{block_count, block_len, BLOCK_SIZE};
use crate::proto::job::ReceiveJob;
use crate::proto::path::RelPath;
use crate::proto::wire::Offer;
use crate::store::disk::{Disk, Loc};
use crate::store::safefs::{self, Root, Unsafe};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// Why staging or placing files failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A staging or target file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The target already holds a file of that name.
    #[error("{0} already exists in the target")]
    Exists(String),
    /// The target already holds a file of that name with other content.
    #[error("{0} already exists in the target with other content")]
    Differs(String),
    /// A name would resolve outside the target, through a symlink.
    #[error("{0} would resolve outside the target (symlink)")]
    Escape(String),
    /// The staging folder belongs to another user.
    #[error("staging folder {path} is owned by uid {uid}, not the agent (uid {agent})")]
    NotOwned {
        /// The staging folder.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// The agent's uid.
        agent: u32,
    },
    /// The staging folder is a symlink or not a folder.
    #[error("staging folder {0} is a symlink or not a folder")]
    NotDir(PathBuf),
    /// The staging folder's mode lets others in, and can not be made 0700.
    #[error("staging folder {path} has mode {mode:o} and can not be made 0700")]
    Loose {
        /// The staging folder.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// Makes (if `make`) or opens the private folder `name` in `parent`: see
/// [`safefs::private_dir`]. Returns it and whether it was made.
fn private(parent: BorrowedFd<'_>, name: &str, path: &Path, make: bool) -> Result<(OwnedFd, bool), StageError> {
    match safefs::private_dir(parent, name, make).map_err(io_at(path))? {
        Ok(made) => Ok(made),
        Err(Unsafe::NotDir) => Err(StageError::NotDir(path.to_path_buf())),
        Err(Unsafe::Owner { uid, agent }) => Err(StageError::NotOwned {
            path: path.to_path_buf(),
            uid,
            agent,
        }),
        Err(Unsafe::Mode(mode)) => Err(StageError::Loose {
            path: path.to_path_buf(),
            mode,
        }),
    }
}

/// A staging root (the folder job folders are made in) as its parent and its name: the
/// root is opened below its parent held open, and checked.
fn split_root(root: &Path) -> Option<(&Path, &str)> {
    Some((root.parent()?, root.file_name()?.to_str()?))
}

/// Held while a staging root is made or a job folder made in it, and while an empty
/// root is removed: a root removed under a job making its folder would fail that job.
static ROOTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Opens (or, with `make`, makes) the job folder `job_dir` of its staging root, checking
/// both folders; returns it and whether it was made.
fn open_job_dir(job_dir: &Path, make: bool) -> Result<(OwnedFd, bool), StageError> {
    let root = job_dir.parent().and_then(|r| Some((r, split_root(r)?)));
    let (Some((root, (parent, name))), Some(id)) = (root, job_dir.file_name().and_then(|n| n.to_str())) else {
        return Err(StageError::NotDir(job_dir.to_path_buf()));
    };
    let parent_fd = safefs::open_dir(parent).map_err(io_at(parent))?;
    let _roots = ROOTS.lock().expect("staging roots");
    let (root_fd, _) = private(parent_fd.as_fd(), name, root, make)?;
    private(root_fd.as_fd(), id, job_dir, make)
}

/// Removes the staging root `root` if it is empty (a folder an engine scans is left as
/// it was before the job).
fn remove_if_empty(parent: BorrowedFd<'_>, name: &str) {
    let Ok(c) = std::ffi::CString::new(name) else { return };
    // SAFETY: parent is an open folder and c a NUL-terminated name; ENOTEMPTY is fine.
    unsafe { libc::unlinkat(parent.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) };
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StageError + '_ {
    move |source| StageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One job's staging folder.
#[derive(Debug, Clone)]
pub struct Stage {
    /// The job's folder in staging.
    pub job_dir: PathBuf,
    /// The folder of the job's files under their relative names (`<job_dir>/files`).
    pub files_dir: PathBuf,
    /// Made by this `open`: nothing can be staged in it yet, so there is nothing to scan.
    fresh: bool,
    /// The job's folder, held open once opened and checked (see the module docs).
    dir: Arc<OnceLock<Result<Root, String>>>,
}

impl Stage {
    /// Creates (or reopens) the staging folder of `job` in the staging root `root` (an
    /// import target's `staging`). The folders below it are made by the disk thread as
    /// their first file is written (see [`Disk::write_at`]).
    pub fn open(root: &Path, job: &ReceiveJob) -> Result<Stage, StageError> {
        let job_dir = root.join(job.id.to_string());
        let files_dir = job_dir.join("files");
        let (dir, fresh) = open_job_dir(&job_dir, true)?;
        safefs::walk_dirs(dir.as_fd(), Path::new("files"), true).map_err(io_at(&files_dir))?;
        // Touch the folder: its mtime is what the expiry sweep looks at.
        let now = std::fs::FileTimes::new().set_modified(SystemTime::now());
        std::fs::File::from(dir.try_clone().map_err(io_at(&job_dir))?)
            .set_times(now)
            .map_err(io_at(&job_dir))?;
        Ok(Stage {
            job_dir,
            files_dir,
            fresh,
            dir: Arc::new(OnceLock::from(Ok(Arc::new(dir)))),
        })
    }

    /// The staging folder of an earlier job, by its folder; opened (and checked) when a
    /// file in it is first needed.
    pub fn at(job_dir: PathBuf) -> Stage {
        let files_dir = job_dir.join("files");
        Stage {
            job_dir,
            files_dir,
            fresh: false,
            dir: Arc::new(OnceLock::new()),
        }
    }

    /// Where a staged file is, for messages and for hooks that read it.
    pub fn file(&self, rel: &RelPath) -> PathBuf {
        rel.under(&self.files_dir)
    }

    /// The job's folder, held open.
    pub fn root(&self) -> io::Result<&Root> {
        let dir = self.dir.get_or_init(|| {
            open_job_dir(&self.job_dir, false)
                .map(|(d, _)| Arc::new(d))
                .map_err(|e| e.to_string())
        });
        dir.as_ref()
            .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.clone()))
    }

    /// A staged file, to be opened below the job's folder with no symlink followed.
    pub fn place(&self, rel: &RelPath) -> io::Result<Loc> {
        Ok(Loc::Beneath {
            dir: self.root()?.clone(),
            rel: Path::new("files").join(rel.as_str()),
            shown: self.file(rel),
        })
    }

    /// `lstat` of a staged file, reached with no symlink followed.
    fn stat(&self, rel: &RelPath) -> io::Result<std::fs::Metadata> {
        safefs::stat_beneath(self.root()?.as_fd(), &Path::new("files").join(rel.as_str()))
    }

    /// Re-verifies what an earlier attempt staged and records the good blocks.
    /// Returns how many blocks were found. A folder this job just made is not read:
    /// for 20,000 files that saves as many failed lookups before the first block.
    pub async fn scan(&self, job: &mut ReceiveJob, disk: &Disk) -> u64 {
        let mut found = 0;
        if self.fresh {
            return found;
        }
        let offer = job.offer.clone();
        for (i, f) in offer.files.iter().enumerate() {
            let rel = &job.paths[i];
            let (Ok(meta), Ok(path)) = (self.stat(rel), self.place(rel)) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            for b in 0..block_count(f.hashes.size) {
                let len = block_len(f.hashes.size, b);
                if meta.len() < b * BLOCK_SIZE + len as u64 {
                    break;
                }
                let Ok(data) = disk.read_at(path.clone(), b * BLOCK_SIZE, len).await else {
                    break;
                };
                if ReceiveJob::verify(&offer, i as u32, b as u32, &data).is_ok() {
                    job.record(i as u32, b as u32);
                    found += 1;
                }
            }
        }
        found
    }

    /// Reads every staged block again and checks it against the offer; returns the
    /// names of the files that do not match (missing, of another length, or with a bad
    /// block). A held job's blocks sat on disk for as long as it was held, perhaps
    /// across restarts: they are checked like this before it commits.
    pub async fn verify(&self, offer: Arc<Offer>, paths: &[RelPath], disk: &Disk) -> Vec<String> {
        const IN_FLIGHT: usize = 8;
        let mut bad = std::collections::BTreeSet::new();
        let mut reads = tokio::task::JoinSet::new();
        for (i, f) in offer.files.iter().enumerate() {
            let size = f.hashes.size;
            let path = match self.place(&paths[i]) {
                Ok(p) if self.stat(&paths[i]).is_ok_and(|m| m.is_file() && m.len() == size) => p,
                _ => {
                    bad.insert(i);
                    continue;
                }
            };
            for b in 0..block_count(size) {
                while reads.len() >= IN_FLIGHT {
                    if let Some(Ok(Some(i))) = reads.join_next().await {
                        bad.insert(i);
                    }
                }
                let (disk, path, offer) = (disk.clone(), path.clone(), offer.clone());
                reads.spawn(async move {
                    let data = disk.read_at(path, b * BLOCK_SIZE, block_len(size, b)).await;
                    let ok = data.is_ok_and(|d| ReceiveJob::verify(&offer, i as u32, b as u32, &d).is_ok());
                    (!ok).then_some(i)
                });
            }
        }
        while let Some(r) = reads.join_next().await {
            if let Ok(Some(i)) = r {
                bad.insert(i);
            }
        }
        bad.into_iter().map(|i| paths[i].to_string()).collect()
    }

    /// Syncs every staged file (creating empty ones) and every staged folder. A job of
    /// many files is synced with one `syncfs` of the target's file system instead of a
    /// `fsync` per file and folder: the same guarantee, far fewer disk flushes.
    pub async fn seal(
        &self,
        offer: &Offer,
        paths: &[RelPath],
        disk: &Disk,
        dir_mode: Option<u32>,
    ) -> Result<(), StageError> {
        // Modes first: the syncs below make them as durable as the data.
        let root = self.root().map_err(io_at(&self.job_dir))?.clone();
        let modes: Vec<u32> = offer.files.iter().map(|f| f.mode).collect();
        let (rels, job_dir) = (paths.to_vec(), self.job_dir.clone());
        tokio::task::spawn_blocking(move || apply_modes(&root, &rels, &modes, dir_mode))
            .await
            .expect("mode task")
            .map_err(io_at(&job_dir))?;
        let many = offer.files.len() > SYNCFS_FILES;
        let mut syncs = tokio::task::JoinSet::new();
        for (i, f) in offer.files.iter().enumerate() {
            // A file whose last block was written has its full length already; only
            // empty files (no block) and per-file syncs need the disk thread.
            if many && f.hashes.size > 0 {
                continue;
            }
            let path = self.place(&paths[i]).map_err(io_at(&self.job_dir))?;
            let (disk, size) = (disk.clone(), f.hashes.size);
            syncs.spawn(async move {
                let shown = path.shown().to_path_buf();
                disk.finish(path, size, !many).await.map_err(|e| (shown, e))
            });
        }
        while let Some(r) = syncs.join_next().await {
            r.expect("sync task")
                .map_err(|(path, source)| StageError::Io { path, source })?;
        }
        let root = self.root().map_err(io_at(&self.job_dir))?.clone();
        let job_dir = self.job_dir.clone();
        if many {
            return tokio::task::spawn_blocking(move || syncfs_of(&root, &job_dir))
                .await
                .expect("sync task");
        }
        let mut dirs: Vec<PathBuf> = paths
            .iter()
            .filter_map(|p| Path::new("files").join(p.as_str()).parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        tokio::task::spawn_blocking(move || sync_dirs(&root, &dirs, &job_dir))
            .await
            .expect("sync task")
    }

    /// Removes the staging folder and everything in it (a symlink in its place only
    /// as a link), found in `.barge-staging` held open: a `.barge-staging` swapped for a
    /// symlink meanwhile does not lead the removal elsewhere.
    pub fn remove(&self) {
        let root = self.job_dir.parent().and_then(|r| Some((r, split_root(r)?)));
        let (Some((root, (parent, name))), Some(id)) = (root, self.job_dir.file_name()) else {
            return;
        };
        let removed = safefs::open_dir(parent).and_then(|p| {
            let _roots = ROOTS.lock().expect("staging roots");
            let gone = match safefs::private_dir(p.as_fd(), name, false)? {
                Ok((dir, _)) => std::fs::remove_dir_all(safefs::fd_path(&dir).join(id)),
                Err(_) => Err(io::Error::other(format!("{} is not the agent's", root.display()))),
            };
            remove_if_empty(p.as_fd(), name);
            gone
        });
        if let Err(e) = removed {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.job_dir.display(), error = %e, "cannot remove staging folder");
            }
        }
    }
}

/// The mode a file gets when the agent creates it (0o666 less the umask), read once.
fn created_mode() -> u32 {
    static MODE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok());
        // Unknown umask: no file is taken to have its mode already.
        umask.map_or(u32::MAX, |m| 0o666 & !m)
    })
}

/// Gives each staged file its offered mode (files created with another mode only),
/// and, with `dir_mode`, the folders under `files/` that mode.
fn apply_modes(root: &safefs::Root, paths: &[RelPath], modes: &[u32], dir_mode: Option<u32>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let chmod = |rel: &Path, mode: u32, dir: bool| -> io::Result<()> {
        let flags = libc::O_RDONLY | if dir { libc::O_DIRECTORY } else { 0 };
        let f = safefs::open_beneath(root.as_fd(), rel, flags, false)?;
        // SAFETY: f is an open descriptor for the duration of the call.
        match unsafe { libc::fchmod(f.as_raw_fd(), mode as libc::mode_t) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    };
    for (rel, mode) in paths.iter().zip(modes) {
        if *mode != created_mode() {
            chmod(&Path::new("files").join(rel.as_str()), *mode, false)?;
        }
    }
    let Some(dir_mode) = dir_mode else {
        return Ok(());
    };
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .flat_map(|p| {
            Path::new(p.as_str())
                .ancestors()
                .skip(1)
                .map(Path::to_path_buf)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.as_os_str().is_empty())
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        chmod(&Path::new("files").join(d), dir_mode, true)?;
    }
    Ok(())
}

/// Syncs every folder from each of `dirs` (relative to the job's folder `root`) up to
/// and including `files`, walked with no symlink followed.
fn sync_dirs(root: &Root, dirs: &[PathBuf], job_dir: &Path) -> Result<(), StageError> {
    let mut done = std::collections::HashSet::new();
    for d in dirs {
        let mut cur = Some(d.as_path());
        while let Some(dir) = cur.filter(|c| c.starts_with("files")) {
            if !done.insert(dir.to_path_buf()) {
                break;
            }
            let shown = job_dir.join(dir);
            safefs::walk_dirs(root.as_fd(), dir, false)
                .map(std::fs::File::from)
                .and_then(|f| f.sync_all())
                .map_err(io_at(&shown))?;
            cur = dir.parent();
        }
    }
    Ok(())
}

/// [`syncfs`] of the file system that holds the open folder `root`.
fn syncfs_of(root: &Root, shown: &Path) -> Result<(), StageError> {
    use std::os::fd::AsRawFd;
    // SAFETY: root is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
        return Err(io_at(shown)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Jobs with more files than this are synced with one `syncfs`.
pub const SYNCFS_FILES: usize = 32;

/// Flushes the whole file system that holds `dir` (data and metadata).
pub fn syncfs(dir: &Path) -> Result<(), StageError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).map_err(io_at(dir))?;
    // SAFETY: f is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(StageError::Io {
            path: dir.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Syncs the folder `dir` itself (fsync), so renames and new names in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StageError> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_at(dir))
}

/// Removes job folders in the staging folder `root` untouched for longer than `ttl`,
/// except those named in `keep` (held jobs, which expire on their own clock); returns
/// how many. Only a staging folder that is the agent's own is swept, through its open
/// descriptor (see [`Stage::remove`]), and in it only folders named by a job id.
pub fn sweep_expired(root: &Path, ttl: Duration, keep: &std::collections::HashSet<String>) -> usize {
    let Some((parent, name)) = split_root(root) else {
        return 0;
    };
    let Ok(parent) = safefs::open_dir(parent) else {
        return 0;
    };
    let dir = safefs::private_dir(parent.as_fd(), name, false);
    let Ok(Ok((dir, _))) = dir else {
        return 0;
    };
    let removed = sweep_in(&dir, ttl, keep);
    if removed > 0 {
        // Emptied by this sweep: it goes too. One found empty is left (an operator may
        // have just made it).
        let _roots = ROOTS.lock().expect("staging roots");
        remove_if_empty(parent.as_fd(), name);
    }
    removed
}

/// Whether a staging root's entry is one barge made: a job folder, named by a job id.
fn is_job_folder(e: &std::fs::DirEntry) -> bool {
    let name = e.file_name();
    let is_id = name
        .to_str()
        .is_some_and(|n| n.parse::<crate::proto::wire::JobId>().is_ok());
    is_id && e.file_type().is_ok_and(|t| t.is_dir())
}

fn sweep_in(dir: &OwnedFd, ttl: Duration, keep: &std::collections::HashSet<String>) -> usize {
    let staging = safefs::fd_path(dir);
    let Ok(entries) = std::fs::read_dir(&staging) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries
        .flatten()
        .filter(|e| is_job_folder(e) && !keep.contains(&*e.file_name().to_string_lossy()))
    {
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a >= ttl) && std::fs::remove_dir_all(e.path()).is_ok() {
            tracing::info!(job = %e.file_name().to_string_lossy(), "expired staged job removed");
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::path::STAGING_DIR;

    fn rel(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[tokio::test]
    async fn a_new_staging_folder_is_not_scanned_and_a_reopened_one_is() {
        use crate::proto::blocks::FileHashes;
        use crate::proto::wire::OfferFile;
        let t = tempfile::tempdir().unwrap();
        let data = b"staged before the cut";
        let offer = Offer {
            target: "t".into(),
            files: vec![OfferFile {
                path: "d/f".into(),
                hashes: FileHashes::from_reader(&data[..], data.len() as u64).unwrap(),
                keys: None,
                mode: 0o644,
            }],
            meta: vec![],
            tcp_lane: false,
            hold: false,
            relay: vec![],
        };
        let disk = Disk::start().unwrap();
        let mut job = ReceiveJob::new(offer.clone()).unwrap();
        let stage = Stage::open(&t.path().join(STAGING_DIR), &job).unwrap();
        assert!(stage.fresh);
        let staged = stage.file(&rel("d/f"));
        disk.write_at(staged, 0, bytes::Bytes::from_static(data)).await.unwrap();
        assert_eq!(stage.scan(&mut job, &disk).await, 0, "made by this open: not read");
        let mut again = ReceiveJob::new(offer).unwrap();
        let reopened = Stage::open(&t.path().join(STAGING_DIR), &again).unwrap();
        assert!(!reopened.fresh);
        assert_eq!(reopened.scan(&mut again, &disk).await, 1, "the staged block is found");
        assert_eq!(again.missing(), 0);
    }

    #[test]
    fn sweep_removes_only_expired_jobs_and_only_what_barge_made() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("staging");
        let (job1, held) = ("1".repeat(32), "2".repeat(32));
        std::fs::create_dir_all(root.join(&job1)).unwrap();
        std::fs::create_dir_all(root.join(&held)).unwrap();
        // What an engine scanning the folder might make there: not barge's.
        std::fs::create_dir_all(root.join("ns1")).unwrap();
        std::fs::write(root.join("zdb-namespace"), b"x").unwrap();
        let keep = [held.clone()].into_iter().collect();
        assert_eq!(sweep_expired(&root, Duration::from_secs(3600), &keep), 0);
        assert_eq!(sweep_expired(&root, Duration::ZERO, &keep), 1);
        assert!(!root.join(&job1).exists());
        assert!(root.join(&held).exists(), "held jobs are kept");
        assert!(root.join("ns1").exists() && root.join("zdb-namespace").exists());
        // A sweep that empties the staging folder removes it too.
        std::fs::remove_dir_all(root.join("ns1")).unwrap();
        std::fs::remove_file(root.join("zdb-namespace")).unwrap();
        assert_eq!(sweep_expired(&root, Duration::ZERO, &Default::default()), 1);
        assert!(!root.exists());
        // One found empty is left alone.
        std::fs::create_dir(&root).unwrap();
        assert_eq!(sweep_expired(&root, Duration::ZERO, &Default::default()), 0);
        assert!(root.is_dir());
    }

    #[test]
    fn a_finished_jobs_staging_root_goes_when_it_is_empty() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join(STAGING_DIR);
        let offer = Offer {
            target: "t".into(),
            files: vec![],
            meta: vec![],
            tcp_lane: false,
            hold: false,
            relay: vec![],
        };
        let a = Stage::open(&root, &ReceiveJob::new(offer.clone()).unwrap()).unwrap();
        let mut other = offer;
        other.meta.push(("k".into(), "v".into()));
        let b = Stage::open(&root, &ReceiveJob::new(other).unwrap()).unwrap();
        a.remove();
        assert!(root.is_dir(), "another job is still staged");
        b.remove();
        assert!(!root.exists(), "an engine scanning the target sees nothing left");
    }

    #[test]
    fn a_staging_folder_swapped_for_a_symlink_is_neither_swept_nor_removed_from() {
        let t = tempfile::tempdir().unwrap();
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("job1")).unwrap();
        let target = t.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&elsewhere, target.join(STAGING_DIR)).unwrap();
        assert_eq!(
            sweep_expired(&target.join(STAGING_DIR), Duration::ZERO, &Default::default()),
            0
        );
        Stage::at(target.join(STAGING_DIR).join("job1")).remove();
        assert!(elsewhere.join("job1").is_dir(), "nothing removed through the link");
        // A planted symlink as a job folder is removed as a link only.
        std::fs::remove_file(target.join(STAGING_DIR)).unwrap();
        std::fs::create_dir(target.join(STAGING_DIR)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, target.join(STAGING_DIR).join("job2")).unwrap();
        Stage::at(target.join(STAGING_DIR).join("job2")).remove();
        assert!(!target.join(STAGING_DIR).join("job2").exists());
        assert!(elsewhere.join("job1").is_dir());
    }

    #[test]
    fn a_staging_folder_of_another_user_or_a_symlink_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let offer = Offer {
            target: "t".into(),
            files: vec![],
            meta: vec![],
            tcp_lane: false,
            hold: false,
            relay: vec![],
        };
        let job = ReceiveJob::new(offer).unwrap();
        std::os::unix::fs::symlink(t.path(), t.path().join(STAGING_DIR)).unwrap();
        let err = Stage::open(&t.path().join(STAGING_DIR), &job).unwrap_err();
        assert!(matches!(err, StageError::NotDir(_)), "{err}");
        assert!(
            err.to_string().ends_with(".barge-staging is a symlink or not a folder"),
            "{err}"
        );
        std::fs::remove_file(t.path().join(STAGING_DIR)).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::fs::create_dir(t.path().join(STAGING_DIR)).unwrap();
            std::os::unix::fs::chown(t.path().join(STAGING_DIR), Some(12345), None).unwrap();
            let err = Stage::open(&t.path().join(STAGING_DIR), &job).unwrap_err();
            let want = format!(
                "staging folder {} is owned by uid 12345, not the agent (uid 0)",
                t.path().join(STAGING_DIR).display()
            );
            assert_eq!(err.to_string(), want);
        }
    }
}
