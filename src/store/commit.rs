//! The hand-over of a verified, staged job to its import target, made crash-safe.
//!
//! Placing a job takes many renames when the target already has the job's folders (one
//! per file), and a `replace` overwrites older files: a crash half way would leave part
//! of the job visible, and the rest staged where nothing would ever finish it. So before
//! the first visible change the plan is written durably as an [`Intent`]: which files or
//! whole folders move where, which folders the commit makes, and, for `replace`, that
//! the older versions were kept (hard links in the job's staging folder). Every step
//! after that can be repeated: a file still in staging has not moved, one that is gone
//! has. An agent that starts finds the intents left behind and finishes them, forward,
//! since every file was verified and synced before its intent was written; where a name
//! it needs was taken meanwhile, it puts back what it had placed (and the older versions
//! a `replace` overwrote) instead. Either way the target ends with the old state or the
//! new one, never a mix. While the renames run, a reader of the target can see some of
//! the job's files and not yet others; that window closes at the commit's end, or at
//! the agent's next start.
//!
//! Once placed, the outcome is recorded ([`Done`]: the report, and a fingerprint of what
//! was placed), so the same job sent again, after a crash or a lost answer, is answered
//! "committed" instead of "already exists", for as long as the target still holds the
//! files as they were placed.
//!
//! Every rename is made between folder descriptors: the target's folders on the way are
//! walked from the target, the staged side from the job's staging folder, with no symlink
//! followed ([`crate::store::safefs`]). A folder of the target that a local user turned into a
//! symlink after the plan was checked refuses the commit; nothing lands where it points.

use crate::proto::path::RelPath;
use crate::proto::wire::JobId;
use crate::store::safefs::{self, Root};
use crate::store::stage::{sync_dir, syncfs, Stage, StageError};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the commit ledger could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// A ledger file or folder could not be read or written.
    #[error("commit ledger {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A ledger entry does not parse.
    #[error("commit ledger entry {path} is corrupt: {reason}")]
    Corrupt {
        /// The entry's file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be placed into the target (a name that exists, a disk error).
    #[error(transparent)]
    Place(#[from] StageError),
}

/// Places a staged job with `kind`, crash-safe: plans it, writes the intent to `ledger`,
/// renames. If the files can not all be placed, those placed go back to staging and the
/// intent is dropped (if putting back failed too, the intent stays for [`Intent::apply`]
/// to finish at the next start). Returns the report.
pub fn place(
    kind: Kind,
    stage: &Stage,
    paths: &[RelPath],
    job: JobRef<'_>,
    ledger: &Ledger,
) -> Result<String, CommitError> {
    let intent = Intent::plan(kind, stage, paths, job)?;
    ledger.begin(&intent)?;
    match intent.apply() {
        Ok(()) => Ok(intent.report),
        Err(unplaced) => {
            if unplaced.back.is_ok() {
                ledger.abandon(&intent.job)?;
            }
            Err(unplaced.cause.into())
        }
    }
}

/// How the files are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Next to what is there; a name that exists already refuses the job.
    Move,
    /// Over older files of the same names (never over a folder or a symlink).
    Replace,
}

/// A commit's plan, written durably before its first visible change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The job's id, 32 hex digits.
    pub job: String,
    /// The import target's name and folder.
    pub target: String,
    /// The import target's folder.
    pub target_dir: PathBuf,
    /// The job's staging folder (`<target>/.barge-staging/<job>`).
    pub job_dir: PathBuf,
    /// Move beside what the target holds, or replace it.
    pub kind: Kind,
    /// Every file of the job, relative to the target.
    pub paths: Vec<String>,
    /// What is renamed, in order: a whole top-level folder the target lacked, or a file.
    pub units: Vec<String>,
    /// Folders under the target the commit makes, shallowest first.
    pub made: Vec<String>,
    /// Identity of the sender, and whether the job was held (its journal entry goes
    /// once the commit is done).
    pub peer: String,
    /// The job was held (`push --hold`) before this commit.
    pub held: bool,
    /// The report the sender gets.
    pub report: String,
    /// Mode of the folders in `made`, if the target sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir_mode: Option<u32>,
}

/// What an [`Intent`] needs to know about its job besides the files.
#[derive(Debug, Clone)]
pub struct JobRef<'a> {
    /// The job's id, 32 hex digits.
    pub job: String,
    /// The import target's name.
    pub target: &'a str,
    /// The import target's folder.
    pub target_dir: &'a Path,
    /// Identity of the sender.
    pub peer: &'a str,
    /// The job was held before this commit (its journal entry goes once it is done).
    pub held: bool,
    /// Mode of the folders the commit makes in the target, if the target sets one.
    pub dir_mode: Option<u32>,
}

impl Intent {
    /// Plans placing the staged `paths` into the target, and for `replace` keeps the
    /// files it will overwrite. Refuses what can not be placed (a name that exists, for
    /// `move`; a folder or symlink where a file goes; a symlink on the way).
    pub fn plan(kind: Kind, stage: &Stage, paths: &[RelPath], job: JobRef<'_>) -> Result<Intent, StageError> {
        let target = job.target_dir;
        let units = match kind {
            Kind::Move => {
                check_destinations(target, paths)?;
                rename_units(target, paths)?
            }
            Kind::Replace => {
                check_replaceable(target, paths)?;
                keep_old(stage, target, paths)?;
                paths.to_vec()
            }
        };
        let made = missing_parents(target, &units)?;
        let strings = |v: &[RelPath]| v.iter().map(|p| p.to_string()).collect();
        let verb = match kind {
            Kind::Move => "moved",
            Kind::Replace => "placed",
        };
        Ok(Intent {
            report: format!("{verb} {} files into {}", paths.len(), job.target),
            job: job.job,
            target: job.target.to_string(),
            target_dir: target.to_path_buf(),
            job_dir: stage.job_dir.clone(),
            kind,
            paths: strings(paths),
            units: strings(&units),
            made: made.iter().map(|p| p.to_string()).collect(),
            peer: job.peer.to_string(),
            held: job.held,
            dir_mode: job.dir_mode,
        })
    }

    fn staged(&self, rel: &RelPath) -> PathBuf {
        Stage::at(self.job_dir.clone()).file(rel)
    }

    fn placed(&self, rel: &RelPath) -> PathBuf {
        rel.under(&self.target_dir)
    }

    /// The target and the job's staging folder, held open for the renames.
    fn dirs(&self) -> Result<Dirs, StageError> {
        let target = safefs::open_dir(&self.target_dir).map_err(|e| io_err(&self.target_dir, e))?;
        let job = Stage::at(self.job_dir.clone())
            .root()
            .map_err(|e| io_err(&self.job_dir, e))?
            .clone();
        Ok(Dirs {
            target,
            target_dir: self.target_dir.clone(),
            job,
        })
    }

    fn rels(&self, v: &[String]) -> Result<Vec<RelPath>, StageError> {
        v.iter()
            .map(|s| RelPath::new(s).map_err(|_| StageError::Escape(s.clone())))
            .collect()
    }

    /// The job's files, relative.
    pub fn rel_paths(&self) -> Result<Vec<RelPath>, StageError> {
        self.rels(&self.paths)
    }

    /// Places every unit that is still staged; any failure puts back what this commit
    /// placed and returns why. Running it again after a crash finishes the commit.
    pub fn apply(&self) -> Result<(), Unplaced> {
        match self.forward() {
            Ok(()) => {
                crate::store::failpoint::hit("commit-placed");
                Ok(())
            }
            Err(cause) => {
                let back = self.back();
                Err(Unplaced { cause, back })
            }
        }
    }

    fn forward(&self) -> Result<(), StageError> {
        let paths = self.rel_paths()?;
        let units = self.rels(&self.units)?;
        let dirs = self.dirs()?;
        for u in &units {
            self.place(&dirs, u, &paths)?;
        }
        self.set_made_modes(&dirs)?;
        sync_parents(&dirs.target, &self.target_dir, &units)
    }

    /// Gives the folders this commit made the target's folder mode, if it sets one
    /// (again after a crash: it changes nothing the second time).
    fn set_made_modes(&self, dirs: &Dirs) -> Result<(), StageError> {
        let Some(mode) = self.dir_mode else {
            return Ok(());
        };
        for d in self.rels(&self.made)? {
            let path = self.placed(&d);
            let fd =
                safefs::walk_dirs(dirs.target.as_fd(), Path::new(d.as_str()), false).map_err(|e| io_err(&path, e))?;
            // SAFETY: fd is an open descriptor for the duration of the call.
            if unsafe { libc::fchmod(std::os::fd::AsRawFd::as_raw_fd(&fd), mode as libc::mode_t) } != 0 {
                return Err(io_err(&path, io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// Places one unit unless it was placed already (it is no longer staged).
    fn place(&self, dirs: &Dirs, unit: &RelPath, paths: &[RelPath]) -> Result<(), StageError> {
        let from = self.staged(unit);
        let Some((from_dir, meta)) = dirs.staged(unit).map_err(|e| io_err(&from, e))? else {
            return Ok(());
        };
        let to = self.placed(unit);
        let to_dir = dirs.placed_parent(unit, true)?;
        let name = leaf(unit);
        let renamed = match self.kind {
            Kind::Move => safefs::rename_at(from_dir.as_fd(), name, to_dir.as_fd(), name, true),
            Kind::Replace => match safefs::lstat_at(to_dir.as_fd(), name) {
                Ok(m) if !m.is_file() => return Err(StageError::Exists(unit.to_string())),
                _ => safefs::rename_at(from_dir.as_fd(), name, to_dir.as_fd(), name, false),
            },
        };
        match renamed {
            Ok(()) => {
                crate::store::failpoint::hit("commit-rename");
                Ok(())
            }
            // A folder of the job appeared in the target meanwhile (another job made it):
            // its files go in one by one.
            Err(e) if meta.is_dir() && is_taken(&e) => {
                let under: Vec<&RelPath> = paths.iter().filter(|p| unit.contains(p) && *p != unit).collect();
                under.into_iter().try_for_each(|p| self.place(dirs, p, paths))
            }
            Err(e) if is_taken(&e) => Err(StageError::Exists(unit.to_string())),
            Err(e) => Err(io_err(&to, e)),
        }
    }

    /// Puts back what this commit placed: files and folders to staging, and for
    /// `replace` the older versions over the new ones; removes the folders it made.
    fn back(&self) -> Result<(), StageError> {
        let paths = self.rel_paths()?;
        let units = self.rels(&self.units)?;
        let files: HashSet<&RelPath> = paths.iter().collect();
        let dirs = self.dirs()?;
        let is_staged = |u: &RelPath| dirs.staged(u).is_ok_and(|s| s.is_some());
        for u in &units {
            match self.kind {
                Kind::Move if !files.contains(u) && !is_staged(u) => self.unplace(&dirs, u)?,
                Kind::Move if !files.contains(u) => {
                    for p in paths.iter().filter(|p| u.contains(p)) {
                        self.unplace(&dirs, p)?;
                    }
                }
                Kind::Move => self.unplace(&dirs, u)?,
                Kind::Replace => self.restore(&dirs, u)?,
            }
        }
        let made = self.rels(&self.made)?;
        for d in made.iter().rev() {
            if let Ok(parent) = dirs.placed_parent(d, false) {
                let _ = safefs::remove_at(parent.as_fd(), leaf(d), true);
            }
        }
        syncfs(&self.target_dir)
    }

    /// Moves a placed file or folder back to staging, if it is placed.
    fn unplace(&self, dirs: &Dirs, rel: &RelPath) -> Result<(), StageError> {
        let (staged, placed) = (self.staged(rel), self.placed(rel));
        if dirs.staged(rel).is_ok_and(|s| s.is_some()) {
            return Ok(());
        }
        let name = leaf(rel);
        let Ok(placed_dir) = dirs.placed_parent(rel, false) else {
            return Ok(());
        };
        if safefs::lstat_at(placed_dir.as_fd(), name).is_err() {
            return Ok(());
        }
        let staged_dir = dirs.staged_parent(rel, None, true).map_err(|e| io_err(&staged, e))?;
        safefs::rename_at(placed_dir.as_fd(), name, staged_dir.as_fd(), name, true).map_err(|e| io_err(&placed, e))
    }

    /// `replace`: takes the new file back to staging and puts the older version back (or
    /// only takes the new file out, if there was none). The new file is hard-linked back
    /// first, so the name never goes missing in the target.
    fn restore(&self, dirs: &Dirs, rel: &RelPath) -> Result<(), StageError> {
        let (staged, placed) = (self.staged(rel), self.placed(rel));
        if dirs.staged(rel).is_ok_and(|s| s.is_some()) {
            return Ok(());
        }
        let name = leaf(rel);
        let kept_dir = dirs.staged_parent(rel, Some(KEPT_DIR), false);
        let Some(kept_dir) = kept_dir.ok().filter(|d| safefs::lstat_at(d.as_fd(), name).is_ok()) else {
            return self.unplace(dirs, rel);
        };
        let placed_dir = dirs.placed_parent(rel, false)?;
        if safefs::lstat_at(placed_dir.as_fd(), name).is_ok_and(|m| m.is_file()) {
            let staged_dir = dirs.staged_parent(rel, None, true).map_err(|e| io_err(&staged, e))?;
            safefs::link_at(placed_dir.as_fd(), name, staged_dir.as_fd(), name).map_err(|e| io_err(&staged, e))?;
        }
        safefs::rename_at(kept_dir.as_fd(), name, placed_dir.as_fd(), name, false).map_err(|e| io_err(&placed, e))
    }
}

/// The target and a job's staging folder, held open while a commit renames.
struct Dirs {
    target: OwnedFd,
    target_dir: PathBuf,
    job: Root,
}

impl Dirs {
    /// The staged unit's folder and its metadata, or `None` if it is not staged (any
    /// more).
    fn staged(&self, unit: &RelPath) -> io::Result<Option<(OwnedFd, std::fs::Metadata)>> {
        let dir = match self.staged_parent(unit, None, false) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            other => other?,
        };
        match safefs::lstat_at(dir.as_fd(), leaf(unit)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
            Ok(m) => Ok(Some((dir, m))),
        }
    }

    /// The folder of `rel` under the job's `files` (or `kept`) folder.
    fn staged_parent(&self, rel: &RelPath, under: Option<&str>, make: bool) -> io::Result<OwnedFd> {
        let path = Path::new(under.unwrap_or("files")).join(rel.as_str());
        Ok(safefs::parent_of(self.job.as_fd(), &path, make)?.0)
    }

    /// The folder of `rel` in the target, walked (and with `make`, made) with no symlink
    /// followed: a symlink on the way is [`StageError::Escape`], a file
    /// [`StageError::Exists`].
    fn placed_parent(&self, rel: &RelPath, make: bool) -> Result<OwnedFd, StageError> {
        match safefs::parent_of(self.target.as_fd(), Path::new(rel.as_str()), make) {
            Ok((dir, _)) => Ok(dir),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(StageError::Escape(rel.to_string())),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Err(StageError::Exists(rel.to_string())),
            Err(e) => Err(io_err(&rel.under(&self.target_dir), e)),
        }
    }
}

/// The last name of `rel`.
fn leaf(rel: &RelPath) -> &OsStr {
    OsStr::new(rel.components().last().expect("a name has a component"))
}

/// A commit that could not place everything: why, and whether putting back what it had
/// placed worked (if not, the intent stays for the next attempt).
#[derive(Debug)]
pub struct Unplaced {
    /// Why a file could not be placed.
    pub cause: StageError,
    /// Whether the files already placed went back to staging.
    pub back: Result<(), StageError>,
}

/// Folder of a job's staging area where `replace` keeps the files it overwrites.
const KEPT_DIR: &str = "kept";

fn io_err(path: &Path, source: io::Error) -> StageError {
    StageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The destination of a rename is taken.
fn is_taken(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY))
}

/// Checks that every file can be placed under `target`: no existing file there, and no
/// symlink among the folders on the way.
pub fn check_destinations(target: &Path, paths: &[RelPath]) -> Result<(), StageError> {
    walk_destinations(target, paths, |rel, prefix, last, m| {
        if m.file_type().is_symlink() {
            return Err(StageError::Escape(rel.to_string()));
        }
        match !last && m.is_dir() {
            true => Ok(()),
            false => Err(StageError::Exists(prefix.to_string())),
        }
    })
}

/// Checks that every file can replace what is at its name: a file or nothing, reached
/// through real folders.
pub fn check_replaceable(target: &Path, paths: &[RelPath]) -> Result<(), StageError> {
    walk_destinations(target, paths, |rel, prefix, last, m| {
        if m.file_type().is_symlink() {
            return Err(StageError::Escape(rel.to_string()));
        }
        match (last, m.is_dir(), m.is_file()) {
            (false, true, _) | (true, _, true) => Ok(()),
            _ => Err(StageError::Exists(prefix.to_string())),
        }
    })
}

/// Calls `check(rel, prefix, is_last, metadata)` for every existing prefix of every
/// path under `target`, each folder once; stops below a missing one.
fn walk_destinations(
    target: &Path,
    paths: &[RelPath],
    check: impl Fn(&RelPath, &str, bool, &std::fs::Metadata) -> Result<(), StageError>,
) -> Result<(), StageError> {
    let mut dirs_ok = HashSet::new();
    let mut missing = HashSet::new();
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
                Err(e) => return Err(io_err(&cur, e)),
                Ok(m) => {
                    check(rel, &prefix, last, &m)?;
                    if !last {
                        dirs_ok.insert(prefix.clone());
                    }
                }
            }
        }
    }
    Ok(())
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
                let f = std::fs::symlink_metadata(target.join(top)).is_err();
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

/// Folders above `units` that the target lacks, shallowest first.
fn missing_parents(target: &Path, units: &[RelPath]) -> Result<Vec<RelPath>, StageError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for u in units {
        let parts: Vec<&str> = u.components().collect();
        let mut prefix = String::new();
        for c in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            if seen.insert(prefix.clone()) && std::fs::symlink_metadata(target.join(&prefix)).is_err() {
                out.push(RelPath::new(&prefix).map_err(|_| StageError::Escape(prefix.clone()))?);
            }
        }
    }
    Ok(out)
}

/// `replace`: hard-links each file that will be overwritten into the staging folder,
/// so a commit that can not finish can put it back.
fn keep_old(stage: &Stage, target: &Path, paths: &[RelPath]) -> Result<(), StageError> {
    let kept_root = stage.job_dir.join(KEPT_DIR);
    let job = stage.root().map_err(|e| io_err(&stage.job_dir, e))?.clone();
    let dirs = Dirs {
        target: safefs::open_dir(target).map_err(|e| io_err(target, e))?,
        target_dir: target.to_path_buf(),
        job,
    };
    let mut synced = HashSet::new();
    for rel in paths {
        let name = leaf(rel);
        let placed_dir = match dirs.placed_parent(rel, false) {
            Ok(d) if safefs::lstat_at(d.as_fd(), name).is_ok_and(|m| m.is_file()) => d,
            _ => continue,
        };
        let kept = rel.under(&kept_root);
        let kept_dir = dirs
            .staged_parent(rel, Some(KEPT_DIR), true)
            .map_err(|e| io_err(&kept, e))?;
        match safefs::link_at(placed_dir.as_fd(), name, kept_dir.as_fd(), name) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                safefs::remove_at(kept_dir.as_fd(), name, false).map_err(|e| io_err(&kept, e))?;
                safefs::link_at(placed_dir.as_fd(), name, kept_dir.as_fd(), name).map_err(|e| io_err(&kept, e))?;
            }
            other => other.map_err(|e| io_err(&kept, e))?,
        }
        let dir = kept.parent().expect("under the kept folder").to_path_buf();
        if synced.insert(dir.clone()) {
            std::fs::File::from(kept_dir).sync_all().map_err(|e| io_err(&dir, e))?;
        }
    }
    if synced.is_empty() {
        return Ok(());
    }
    // The kept folders above the deepest were made and must be synced too.
    let mut above = HashSet::new();
    for d in &synced {
        let mut cur = d.parent();
        while let Some(dir) = cur.filter(|c| c.starts_with(&stage.job_dir)) {
            if synced.contains(dir) || !above.insert(dir.to_path_buf()) {
                break;
            }
            cur = dir.parent();
        }
    }
    for dir in above {
        let rel = dir.strip_prefix(&stage.job_dir).expect("under the job folder");
        safefs::walk_dirs(dirs.job.as_fd(), rel, false)
            .map(std::fs::File::from)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(&dir, e))?;
    }
    Ok(())
}

/// Syncs the folder of each of `paths` under `target` (held open as `fd`), and those
/// above it up to `target`, walked with no symlink followed.
fn sync_parents(fd: &OwnedFd, target: &Path, paths: &[RelPath]) -> Result<(), StageError> {
    let mut done = HashSet::new();
    for p in paths {
        let mut cur = Path::new(p.as_str()).parent();
        while let Some(dir) = cur {
            if !done.insert(dir.to_path_buf()) {
                break;
            }
            let shown = target.join(dir);
            safefs::walk_dirs(fd.as_fd(), dir, false)
                .map(std::fs::File::from)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err(&shown, e))?;
            cur = dir.parent();
        }
    }
    Ok(())
}

/// The outcome of a committed job, kept so the same job sent again is answered
/// "committed".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The job's id, 32 hex digits.
    pub job: String,
    /// The import target's name.
    pub target: String,
    /// Identity of the sender.
    pub peer: String,
    /// What the import hook reported.
    pub report: String,
    /// Seconds since the epoch.
    pub at: u64,
    /// For `move` and `replace`: a fingerprint of the placed files (names, inodes,
    /// sizes, modification times; empty if one was gone already). The record answers
    /// for the job only while the target still holds exactly those files. None for
    /// hooks whose effect barge can not see (`exec`, custom).
    pub placed: Option<String>,
}

impl Done {
    /// Whether the record still answers for a job sent again into `target_dir`.
    pub fn still_holds(&self, target_dir: &Path, paths: &[RelPath]) -> bool {
        match &self.placed {
            None => true,
            Some(fp) => fingerprint(target_dir, paths).as_ref() == Some(fp),
        }
    }

    /// Time since the job committed.
    pub(crate) fn age(&self) -> Duration {
        Duration::from_secs(crate::store::held::unix_now().saturating_sub(self.at))
    }
}

/// A fingerprint of the files `paths` under `dir` as they are now; None if one is missing.
pub fn fingerprint(dir: &Path, paths: &[RelPath]) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut h = blake3::Hasher::new();
    for p in paths {
        let m = std::fs::symlink_metadata(p.under(dir)).ok().filter(|m| m.is_file())?;
        h.update(p.as_str().as_bytes()).update(&[0]);
        for v in [m.ino(), m.len(), m.mtime() as u64, m.mtime_nsec() as u64] {
            h.update(&v.to_le_bytes());
        }
    }
    Some(crate::proto::blocks::hex(h.finalize().as_bytes()))
}

/// Intents of commits under way and outcomes of finished ones, one file each in a
/// folder: `<job>.intent` and `<job>.done`, each written to a temporary name, synced,
/// renamed and its folder synced.
#[derive(Debug, Clone)]
pub struct Ledger {
    dir: PathBuf,
}

impl Ledger {
    /// Opens the ledger in `dir`, making the folder if it is missing.
    pub fn open(dir: PathBuf) -> Result<Ledger, CommitError> {
        std::fs::create_dir_all(&dir).map_err(|source| CommitError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Ledger { dir })
    }

    fn file(&self, job: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{job}.{ext}"))
    }

    /// Writes the intent durably: from here on the commit finishes, or is undone, even
    /// if the process dies.
    pub fn begin(&self, intent: &Intent) -> Result<(), CommitError> {
        let text = serde_json::to_vec(intent).expect("an intent serializes");
        let path = self.file(&intent.job, "intent");
        write_durably(&path, &text).map_err(|source| CommitError::Io { path, source })?;
        crate::store::failpoint::hit("commit-intent");
        Ok(())
    }

    /// Records the job as committed (with a fingerprint of what `intent` placed, if it
    /// was placed by barge), then removes its intent.
    pub fn finish(&self, done: &Done) -> Result<(), CommitError> {
        let text = serde_json::to_vec(done).expect("a record serializes");
        let path = self.file(&done.job, "done");
        write_durably(&path, &text).map_err(|source| CommitError::Io { path, source })?;
        self.remove(&done.job, "intent")
    }

    /// Drops an intent whose commit was put back.
    pub fn abandon(&self, job: &str) -> Result<(), CommitError> {
        self.remove(job, "intent")
    }

    fn remove(&self, job: &str, ext: &str) -> Result<(), CommitError> {
        let path = self.file(job, ext);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other.map_err(|source| CommitError::Io {
                path: path.clone(),
                source,
            })?,
        }
        sync_dir(&self.dir).map_err(|e| CommitError::Io {
            path: self.dir.clone(),
            source: io::Error::other(e.to_string()),
        })
    }

    /// The intent of `job`, if its commit is under way (or was cut off).
    pub fn intent(&self, job: &str) -> Option<Result<Intent, CommitError>> {
        let path = self.file(job, "intent");
        path.exists().then(|| read_json(&path))
    }

    /// Intents left by commits that did not finish; unreadable ones as errors.
    pub fn pending(&self) -> Vec<Result<Intent, CommitError>> {
        self.entries("intent").map(|p| read_json(&p)).collect()
    }

    /// The recorded outcome of `job`, if it committed.
    pub fn done(&self, job: JobId) -> Option<Done> {
        read_json(&self.file(&job.to_string(), "done")).ok()
    }

    /// Removes outcomes older than `ttl`; returns how many.
    pub fn forget(&self, ttl: Duration) -> usize {
        self.entries("done")
            .filter(|p| read_json::<Done>(p).map_or(true, |d| d.age() >= ttl))
            .filter(|p| std::fs::remove_file(p).is_ok())
            .count()
    }

    fn entries(&self, ext: &'static str) -> impl Iterator<Item = PathBuf> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(move |p| p.extension().is_some_and(|x| x == ext))
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, CommitError> {
    let text = std::fs::read(path).map_err(|source| CommitError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|e| CommitError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes `bytes` to `path` so that after a crash the file holds them whole or is as
/// it was: a temporary file, synced, renamed over `path`, and the folder synced.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn info(target: &Path) -> JobRef<'_> {
        JobRef {
            job: "j1".into(),
            target: "t",
            target_dir: target,
            peer: "p",
            held: false,
            dir_mode: None,
        }
    }

    fn write_staged(stage: &Stage, p: &RelPath) {
        let f = stage.file(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, p.as_str()).unwrap();
    }

    fn setup(paths: &[RelPath]) -> (tempfile::TempDir, Stage, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let stage = Stage::at(target.join(".barge-staging/j1"));
        paths.iter().for_each(|p| write_staged(&stage, p));
        (t, stage, target)
    }

    #[test]
    fn destinations_that_exist_or_pass_a_symlink_are_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/tmp", t.path().join("link")).unwrap();
        check_destinations(t.path(), &[rel("d/g"), rel("new/a/b")]).unwrap();
        for (p, exists) in [("d/f", true), ("d/f/x", true), ("link/x", false)] {
            let r = check_destinations(t.path(), &[rel(p)]);
            match exists {
                true => assert!(matches!(r, Err(StageError::Exists(_))), "{p}"),
                false => assert!(matches!(r, Err(StageError::Escape(_))), "{p}"),
            }
        }
        check_replaceable(t.path(), &[rel("d/f"), rel("new/x")]).unwrap();
        assert!(matches!(
            check_replaceable(t.path(), &[rel("d")]),
            Err(StageError::Exists(_))
        ));
    }

    #[test]
    fn new_folders_move_whole_and_existing_ones_take_files_one_by_one() {
        let paths = [rel("new/a"), rel("new/b/c"), rel("old/d"), rel("old/e/f"), rel("top")];
        let (_t, stage, target) = setup(&paths);
        std::fs::create_dir_all(target.join("old")).unwrap();
        std::fs::write(target.join("old/kept"), b"k").unwrap();
        assert_eq!(
            rename_units(&target, &paths).unwrap(),
            [rel("new"), rel("old/d"), rel("old/e/f"), rel("top")]
        );
        let intent = Intent::plan(Kind::Move, &stage, &paths, info(&target)).unwrap();
        assert_eq!(intent.made, ["old/e"]);
        intent.apply().unwrap();
        for p in &paths {
            assert_eq!(std::fs::read(p.under(&target)).unwrap(), p.as_str().as_bytes());
        }
        assert_eq!(std::fs::read(target.join("old/kept")).unwrap(), b"k");
        intent.apply().unwrap();
        assert!(fingerprint(&target, &paths).is_some());
    }

    #[test]
    fn a_commit_cut_off_half_way_finishes_when_applied_again() {
        let paths: Vec<RelPath> = (0..10).map(|i| rel(&format!("d/f{i}"))).collect();
        let (_t, stage, target) = setup(&paths);
        std::fs::create_dir(target.join("d")).unwrap();
        let intent = Intent::plan(Kind::Move, &stage, &paths, info(&target)).unwrap();
        // As if the process died after four renames.
        for p in &paths[..4] {
            std::fs::rename(stage.file(p), p.under(&target)).unwrap();
        }
        intent.apply().unwrap();
        for p in &paths {
            assert_eq!(std::fs::read(p.under(&target)).unwrap(), p.as_str().as_bytes());
        }
    }

    #[test]
    fn a_name_taken_meanwhile_puts_everything_back() {
        let paths = [rel("a/1"), rel("a/2"), rel("z")];
        let (_t, stage, target) = setup(&paths);
        std::fs::create_dir(target.join("a")).unwrap();
        let intent = Intent::plan(Kind::Move, &stage, &paths, info(&target)).unwrap();
        std::fs::rename(stage.file(&paths[0]), target.join("a/1")).unwrap();
        // `z` is taken by someone else after the plan.
        std::fs::write(target.join("z"), b"theirs").unwrap();
        let err = intent.apply().unwrap_err();
        assert!(matches!(err.cause, StageError::Exists(_)), "{:?}", err.cause);
        err.back.unwrap();
        let visible: Vec<_> = std::fs::read_dir(target.join("a")).unwrap().collect();
        assert!(visible.is_empty(), "nothing of the job stays visible");
        assert_eq!(std::fs::read(target.join("z")).unwrap(), b"theirs");
        for p in &paths {
            assert!(stage.file(p).exists(), "{p} is staged again");
        }
    }

    #[test]
    fn a_folder_that_appears_meanwhile_takes_the_files_one_by_one() {
        let paths = [rel("new/a"), rel("new/b/c")];
        let (_t, stage, target) = setup(&paths);
        let intent = Intent::plan(Kind::Move, &stage, &paths, info(&target)).unwrap();
        assert_eq!(intent.units, ["new"]);
        std::fs::create_dir_all(target.join("new")).unwrap();
        std::fs::write(target.join("new/other"), b"o").unwrap();
        intent.apply().unwrap();
        assert_eq!(std::fs::read(target.join("new/b/c")).unwrap(), b"new/b/c");
        assert_eq!(std::fs::read(target.join("new/other")).unwrap(), b"o");
    }

    #[test]
    fn replace_is_undone_to_the_old_files_when_it_can_not_finish() {
        let paths = [rel("ns/i1"), rel("ns/i2"), rel("ns/zdb-namespace")];
        let (_t, stage, target) = setup(&paths);
        std::fs::create_dir(target.join("ns")).unwrap();
        std::fs::write(target.join("ns/i1"), b"old1").unwrap();
        std::fs::write(target.join("ns/i2"), b"old2").unwrap();
        let intent = Intent::plan(Kind::Replace, &stage, &paths, info(&target)).unwrap();
        // Two files replaced, then the third name becomes a folder.
        for p in &paths[..2] {
            std::fs::rename(stage.file(p), p.under(&target)).unwrap();
        }
        std::fs::create_dir(target.join("ns/zdb-namespace")).unwrap();
        let err = intent.apply().unwrap_err();
        err.back.unwrap();
        assert_eq!(std::fs::read(target.join("ns/i1")).unwrap(), b"old1");
        assert_eq!(std::fs::read(target.join("ns/i2")).unwrap(), b"old2");
        std::fs::remove_dir(target.join("ns/zdb-namespace")).unwrap();
        let intent = Intent::plan(Kind::Replace, &stage, &paths, info(&target)).unwrap();
        intent.apply().unwrap();
        for p in &paths {
            assert_eq!(std::fs::read(p.under(&target)).unwrap(), p.as_str().as_bytes());
        }
    }

    #[test]
    fn a_target_folder_turned_into_a_symlink_half_way_is_not_followed() {
        for kind in [Kind::Move, Kind::Replace] {
            let paths = [rel("a/b"), rel("a/c")];
            let (t, stage, target) = setup(&paths);
            std::fs::create_dir(target.join("a")).unwrap();
            let outside = t.path().join("outside");
            std::fs::create_dir(&outside).unwrap();
            std::fs::write(outside.join("b"), b"victim").unwrap();
            let intent = Intent::plan(kind, &stage, &paths, info(&target)).unwrap();
            // As if cut off after the first rename; then a local user swaps the folder
            // for a symlink to a folder that has a file of the same name.
            std::fs::rename(stage.file(&paths[0]), target.join("a/b")).unwrap();
            std::fs::rename(target.join("a"), t.path().join("moved")).unwrap();
            std::os::unix::fs::symlink(&outside, target.join("a")).unwrap();
            let err = intent.apply().unwrap_err();
            assert!(matches!(err.cause, StageError::Escape(_)), "{kind:?}: {:?}", err.cause);
            err.back.unwrap();
            // Neither placed through the link nor taken back from where it points.
            assert_eq!(std::fs::read(outside.join("b")).unwrap(), b"victim", "{kind:?}");
            assert!(!outside.join("c").exists(), "{kind:?}: nothing placed outside");
            assert!(stage.file(&paths[1]).exists(), "{kind:?}: still staged");
        }
    }

    #[test]
    fn the_ledger_keeps_intents_until_done_and_outcomes_until_forgotten() {
        let t = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(t.path().join("commits")).unwrap();
        let paths = [rel("f")];
        let (_t2, stage, target) = setup(&paths);
        let intent = Intent::plan(Kind::Move, &stage, &paths, info(&target)).unwrap();
        ledger.begin(&intent).unwrap();
        let pending = ledger.pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].as_ref().unwrap(), &intent);
        intent.apply().unwrap();
        let id = JobId([7; 16]);
        let done = Done {
            job: id.to_string(),
            target: "t".into(),
            peer: "p".into(),
            report: intent.report.clone(),
            at: crate::store::held::unix_now(),
            placed: fingerprint(&target, &paths),
        };
        ledger.finish(&done).unwrap();
        ledger.abandon("j1").unwrap();
        assert!(ledger.pending().is_empty());
        assert_eq!(ledger.done(id), Some(done.clone()));
        assert!(done.still_holds(&target, &paths));
        std::fs::remove_file(target.join("f")).unwrap();
        assert!(
            !done.still_holds(&target, &paths),
            "a file gone: the record no longer answers"
        );
        let gone_before = Done {
            placed: Some(String::new()),
            ..done.clone()
        };
        std::fs::write(target.join("f"), b"f").unwrap();
        assert!(
            !gone_before.still_holds(&target, &paths),
            "an empty fingerprint answers for nothing"
        );
        assert_eq!(ledger.forget(Duration::from_secs(3600)), 0);
        assert_eq!(ledger.forget(Duration::ZERO), 1);
        assert_eq!(ledger.done(id), None);
        std::fs::write(t.path().join("commits/x.intent"), b"{").unwrap();
        assert!(matches!(ledger.pending()[0], Err(CommitError::Corrupt { .. })));
    }
}
