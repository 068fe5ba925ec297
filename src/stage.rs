//! The staging area of an import target: where a job's files are written, checked
//! and synced before anything becomes visible.
//!
//! Each job stages under `<target>/.barge-staging/<job-id>/files/<name>`, on the same
//! file system as the target so the final rename is cheap. The job id is derived from
//! the offer, so the same push sent again finds its staged blocks, re-verifies them
//! from disk and asks only for what is missing, even after the agent restarted.

use crate::disk::Disk;
use crate::proto::blocks::{block_count, block_len, BLOCK_SIZE};
use crate::proto::job::ReceiveJob;
use crate::proto::path::{RelPath, STAGING_DIR};
use crate::proto::wire::Offer;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Why staging or placing files failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} already exists in the target")]
    Exists(String),
    #[error("{0} would resolve outside the target (symlink)")]
    Escape(String),
    #[error("not enough free space: {need} bytes needed, {free} free, {reserve} kept in reserve")]
    NoSpace { need: u64, free: u64, reserve: u64 },
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
    pub job_dir: PathBuf,
    pub files_dir: PathBuf,
    /// Made by this `open`: nothing can be staged in it yet, so there is nothing to scan.
    fresh: bool,
}

impl Stage {
    /// Creates (or reopens) the staging folder of `job` inside `target`. The folders
    /// below it are made by the disk thread as their first file is written (see
    /// [`Disk::write_at`]).
    pub fn open(target: &Path, job: &ReceiveJob) -> Result<Stage, StageError> {
        let staging = target.join(STAGING_DIR);
        ensure_real_dir(&staging, STAGING_DIR)?;
        let job_dir = staging.join(job.id.to_string());
        let files_dir = job_dir.join("files");
        let fresh = match std::fs::create_dir(&job_dir) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io_at(&job_dir)(e)),
        };
        std::fs::create_dir_all(&files_dir).map_err(io_at(&files_dir))?;
        // Touch the folder: its mtime is what the expiry sweep looks at.
        let now = std::fs::FileTimes::new().set_modified(SystemTime::now());
        std::fs::File::open(&job_dir)
            .and_then(|f| f.set_times(now))
            .map_err(io_at(&job_dir))?;
        Ok(Stage {
            job_dir,
            files_dir,
            fresh,
        })
    }

    /// The staging folder of an earlier job, by its folder.
    pub fn at(job_dir: PathBuf) -> Stage {
        let files_dir = job_dir.join("files");
        Stage {
            job_dir,
            files_dir,
            fresh: false,
        }
    }

    pub fn file(&self, rel: &RelPath) -> PathBuf {
        rel.under(&self.files_dir)
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
            let path = self.file(&job.paths[i]);
            let Ok(meta) = std::fs::metadata(&path) else { continue };
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

    /// Syncs every staged file (creating empty ones) and every staged folder. A job of
    /// many files is synced with one `syncfs` of the target's file system instead of a
    /// `fsync` per file and folder: the same guarantee, far fewer disk flushes.
    pub async fn seal(&self, offer: &Offer, paths: &[RelPath], disk: &Disk) -> Result<(), StageError> {
        let many = offer.files.len() > SYNCFS_FILES;
        let mut syncs = tokio::task::JoinSet::new();
        for (i, f) in offer.files.iter().enumerate() {
            // A file whose last block was written has its full length already; only
            // empty files (no block) and per-file syncs need the disk thread.
            if many && f.hashes.size > 0 {
                continue;
            }
            let path = self.file(&paths[i]);
            let (disk, size) = (disk.clone(), f.hashes.size);
            syncs.spawn(async move { disk.finish(path.clone(), size, !many).await.map_err(|e| (path, e)) });
        }
        while let Some(r) = syncs.join_next().await {
            r.expect("sync task")
                .map_err(|(path, source)| StageError::Io { path, source })?;
        }
        let mut dirs: Vec<PathBuf> = paths
            .iter()
            .filter_map(|p| self.file(p).parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        let files_dir = self.files_dir.clone();
        if many {
            return tokio::task::spawn_blocking(move || syncfs(&files_dir))
                .await
                .expect("sync task");
        }
        tokio::task::spawn_blocking(move || sync_dirs(&dirs, &files_dir))
            .await
            .expect("sync task")
    }

    /// Removes the staging folder and everything in it.
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.job_dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.job_dir.display(), error = %e, "cannot remove staging folder");
            }
        }
    }
}

/// Syncs every folder from each of `dirs` up to and including `top`.
fn sync_dirs(dirs: &[PathBuf], top: &Path) -> Result<(), StageError> {
    let mut done = std::collections::HashSet::new();
    for d in dirs {
        let mut cur = Some(d.as_path());
        while let Some(dir) = cur.filter(|c| c.starts_with(top)) {
            if !done.insert(dir.to_path_buf()) {
                break;
            }
            sync_dir(dir)?;
            cur = dir.parent();
        }
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

pub fn sync_dir(dir: &Path) -> Result<(), StageError> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_at(dir))
}

/// Creates `path` as a folder if missing; refuses it if it is a symlink or a file.
fn ensure_real_dir(path: &Path, name: &str) -> Result<(), StageError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(StageError::Escape(name.to_string())),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(StageError::Exists(name.to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(path)
            .or_else(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(io_at(path)),
        Err(e) => Err(StageError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Checks that every file can be placed under `target`: no existing file there, and no
/// symlink among the folders on the way.
pub fn check_destinations(target: &Path, paths: &[RelPath]) -> Result<(), StageError> {
    // Folders already seen to be real folders, or to be missing (then nothing below exists).
    let mut dirs_ok = std::collections::HashSet::new();
    let mut missing = std::collections::HashSet::new();
    for rel in paths {
        let parts: Vec<&str> = rel.components().collect();
        let mut prefix = String::new();
        for (i, c) in parts.iter().enumerate() {
            if i > 0 {
                prefix.push('/');
            }
            prefix.push_str(c);
            let last = i + 1 == parts.len();
            if missing.contains(&prefix) {
                break;
            }
            if !last && dirs_ok.contains(&prefix) {
                continue;
            }
            let cur = target.join(&prefix);
            match std::fs::symlink_metadata(&cur) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    missing.insert(prefix.clone());
                    break;
                }
                Err(e) => return Err(StageError::Io { path: cur, source: e }),
                Ok(m) if m.file_type().is_symlink() => return Err(StageError::Escape(rel.to_string())),
                Ok(m) if !last && m.is_dir() => {
                    dirs_ok.insert(prefix.clone());
                }
                Ok(_) => return Err(StageError::Exists(prefix)),
            }
        }
    }
    Ok(())
}

/// Renames every staged file into place under `target`, all or nothing: on any error
/// what was already moved goes back to staging. A top-level folder of the job that the
/// target does not have yet moves in one rename (cheap and atomic for many files);
/// files under folders that exist already move one by one. Then syncs the folders.
pub fn move_into_place(stage: &Stage, target: &Path, paths: &[RelPath]) -> Result<(), StageError> {
    check_destinations(target, paths)?;
    let units = rename_units(target, paths)?;
    let mut moved: Vec<&RelPath> = Vec::with_capacity(units.len());
    let mut made_dirs = Vec::new();
    let result = units.iter().try_for_each(|rel| {
        let dest = rel.under(target);
        make_parents(target, rel, &mut made_dirs)?;
        rename_no_replace(&stage.file(rel), &dest).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => StageError::Exists(rel.to_string()),
            _ => StageError::Io {
                path: dest.clone(),
                source: e,
            },
        })?;
        moved.push(rel);
        Ok(())
    });
    if let Err(e) = result {
        for rel in moved {
            let _ = std::fs::rename(rel.under(target), stage.file(rel));
        }
        for d in made_dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        return Err(e);
    }
    sync_parents(target, &units)
}

/// Renames every staged file to its place under `target`, replacing a file that is
/// there (never a folder or a symlink), then syncs the folders. Atomic per file only.
pub fn replace_into_place(stage: &Stage, target: &Path, paths: &[RelPath]) -> Result<(), StageError> {
    let mut made = Vec::new();
    for rel in paths {
        let dest = rel.under(target);
        make_parents(target, rel, &mut made)?;
        match std::fs::symlink_metadata(&dest) {
            Ok(m) if !m.is_file() => return Err(StageError::Exists(rel.to_string())),
            _ => {}
        }
        std::fs::rename(stage.file(rel), &dest).map_err(io_at(&dest))?;
    }
    sync_parents(target, paths)
}

/// Syncs the folder of each of `paths` under `target`, and those above it up to `target`.
fn sync_parents(target: &Path, paths: &[RelPath]) -> Result<(), StageError> {
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .filter_map(|p| p.under(target).parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    sync_dirs(&dirs, target)
}

/// What to rename: whole top-level folders the target lacks, single files otherwise.
fn rename_units(target: &Path, paths: &[RelPath]) -> Result<Vec<RelPath>, StageError> {
    let mut fresh = std::collections::HashMap::new();
    let mut units = Vec::new();
    for rel in paths {
        let top = rel.components().next().expect("a name has a component");
        if top.len() == rel.as_str().len() {
            units.push(rel.clone());
            continue;
        }
        let is_fresh = match fresh.get(top) {
            Some(f) => *f,
            None => {
                let f = !target.join(top).exists();
                fresh.insert(top.to_string(), f);
                if f {
                    units.push(RelPath::new(top).map_err(|_| StageError::Escape(rel.to_string()))?);
                }
                f
            }
        };
        if !is_fresh {
            units.push(rel.clone());
        }
    }
    Ok(units)
}

fn make_parents(target: &Path, rel: &RelPath, made: &mut Vec<PathBuf>) -> Result<(), StageError> {
    let parts: Vec<&str> = rel.components().collect();
    let mut cur = target.to_path_buf();
    for c in &parts[..parts.len() - 1] {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return Err(StageError::Escape(rel.to_string())),
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(StageError::Exists(rel.to_string())),
            Err(_) => {
                std::fs::create_dir(&cur).map_err(io_at(&cur))?;
                made.push(cur.clone());
            }
        }
    }
    Ok(())
}

/// `rename` that fails instead of replacing an existing destination.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths; renameat2 reads them only.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes available to unprivileged writers on the file system holding `path`.
pub fn free_space(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Checks that `need` bytes fit, keeping a small reserve.
pub fn check_space(target: &Path, need: u64) -> Result<(), StageError> {
    check_space_with(target, need, 64 << 20)
}

/// Refuses `need` more bytes on `target`'s file system unless `reserve` bytes stay free.
pub fn check_space_with(target: &Path, need: u64, reserve: u64) -> Result<(), StageError> {
    let free = free_space(target).map_err(io_at(target))?;
    if need.saturating_add(reserve) > free {
        return Err(StageError::NoSpace { need, free, reserve });
    }
    Ok(())
}

/// Removes staged jobs of `target` untouched for longer than `ttl`, except those named
/// in `keep` (held jobs, which expire on their own clock); returns how many.
pub fn sweep_expired(target: &Path, ttl: Duration, keep: &std::collections::HashSet<String>) -> usize {
    let staging = target.join(STAGING_DIR);
    let Ok(entries) = std::fs::read_dir(&staging) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries
        .flatten()
        .filter(|e| !keep.contains(&*e.file_name().to_string_lossy()))
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

    fn rel(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn destinations_that_exist_or_pass_a_symlink_are_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/tmp", t.path().join("link")).unwrap();
        check_destinations(t.path(), &[rel("d/g"), rel("new/a/b")]).unwrap();
        assert!(matches!(
            check_destinations(t.path(), &[rel("d/f")]),
            Err(StageError::Exists(_))
        ));
        assert!(matches!(
            check_destinations(t.path(), &[rel("d/f/x")]),
            Err(StageError::Exists(_))
        ));
        assert!(matches!(
            check_destinations(t.path(), &[rel("link/x")]),
            Err(StageError::Escape(_))
        ));
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
            }],
            meta: vec![],
            tcp_lane: false,
            hold: false,
        };
        let disk = Disk::start().unwrap();
        let mut job = ReceiveJob::new(offer.clone()).unwrap();
        let stage = Stage::open(t.path(), &job).unwrap();
        assert!(stage.fresh);
        let staged = stage.file(&rel("d/f"));
        disk.write_at(staged, 0, bytes::Bytes::from_static(data)).await.unwrap();
        assert_eq!(stage.scan(&mut job, &disk).await, 0, "made by this open: not read");
        let mut again = ReceiveJob::new(offer).unwrap();
        let reopened = Stage::open(t.path(), &again).unwrap();
        assert!(!reopened.fresh);
        assert_eq!(reopened.scan(&mut again, &disk).await, 1, "the staged block is found");
        assert_eq!(again.missing(), 0);
    }

    #[test]
    fn a_failed_move_puts_everything_back() {
        let t = tempfile::tempdir().unwrap();
        let stage = Stage::at(t.path().join("job"));
        std::fs::create_dir_all(stage.files_dir.join("a")).unwrap();
        std::fs::write(stage.files_dir.join("a/1"), b"1").unwrap();
        std::fs::write(stage.files_dir.join("z"), b"2").unwrap();
        let target = t.path().join("target");
        std::fs::create_dir(&target).unwrap();
        // `z` will collide after `a/1` was moved.
        std::fs::write(target.join("z"), b"old").unwrap();
        let paths = [rel("a/1"), rel("z")];
        assert!(matches!(
            move_into_place(&stage, &target, &paths),
            Err(StageError::Exists(_))
        ));
        assert!(!target.join("a").exists(), "nothing of the job stays visible");
        assert!(stage.files_dir.join("a/1").exists());
        std::fs::remove_file(target.join("z")).unwrap();
        move_into_place(&stage, &target, &paths).unwrap();
        assert_eq!(std::fs::read(target.join("a/1")).unwrap(), b"1");
    }

    #[test]
    fn new_folders_move_whole_and_existing_ones_take_files_one_by_one() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::create_dir_all(target.join("old")).unwrap();
        std::fs::write(target.join("old/kept"), b"k").unwrap();
        let paths = [rel("new/a"), rel("new/b/c"), rel("old/d"), rel("top")];
        let units = rename_units(&target, &paths).unwrap();
        assert_eq!(units, [rel("new"), rel("old/d"), rel("top")]);
        let stage = Stage::at(t.path().join("job"));
        for p in &paths {
            write_staged(&stage, p);
        }
        move_into_place(&stage, &target, &paths).unwrap();
        for p in &paths {
            assert_eq!(std::fs::read(p.under(&target)).unwrap(), p.as_str().as_bytes());
        }
        assert_eq!(std::fs::read(target.join("old/kept")).unwrap(), b"k");
    }

    fn write_staged(stage: &Stage, p: &RelPath) {
        let f = stage.file(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, p.as_str()).unwrap();
    }

    #[test]
    fn replace_puts_new_files_over_old_ones_but_not_over_folders() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::create_dir_all(target.join("ns")).unwrap();
        std::fs::write(target.join("ns/i1"), b"old").unwrap();
        let job = ReceiveJob::new(crate::proto::wire::Offer {
            target: "t".into(),
            files: vec![],
            meta: vec![],
            tcp_lane: false,
            hold: false,
        })
        .unwrap();
        let stage = Stage::open(&target, &job).unwrap();
        let paths = [rel("ns/i1"), rel("ns/zdb-namespace")];
        paths.iter().for_each(|p| write_staged(&stage, p));
        replace_into_place(&stage, &target, &paths).unwrap();
        assert_eq!(std::fs::read(target.join("ns/i1")).unwrap(), b"ns/i1");
        assert_eq!(
            std::fs::read(target.join("ns/zdb-namespace")).unwrap(),
            b"ns/zdb-namespace"
        );
        std::fs::create_dir(target.join("ns/dir")).unwrap();
        write_staged(&stage, &rel("ns/dir"));
        assert!(matches!(
            replace_into_place(&stage, &target, &[rel("ns/dir")]),
            Err(StageError::Exists(_))
        ));
    }

    #[test]
    fn sweep_removes_only_expired_jobs() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join(STAGING_DIR).join("job1")).unwrap();
        std::fs::create_dir_all(t.path().join(STAGING_DIR).join("held")).unwrap();
        let keep = ["held".to_string()].into_iter().collect();
        assert_eq!(sweep_expired(t.path(), Duration::from_secs(3600), &keep), 0);
        assert_eq!(sweep_expired(t.path(), Duration::ZERO, &keep), 1);
        assert!(!t.path().join(STAGING_DIR).join("job1").exists());
        assert!(t.path().join(STAGING_DIR).join("held").exists(), "held jobs are kept");
    }

    #[test]
    fn space_check_refuses_impossible_jobs() {
        let t = tempfile::tempdir().unwrap();
        check_space(t.path(), 1).unwrap();
        assert!(matches!(
            check_space(t.path(), u64::MAX / 2),
            Err(StageError::NoSpace { .. })
        ));
    }
}
