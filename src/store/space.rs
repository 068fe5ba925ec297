//! Free space on the receiving side, counted honestly under concurrency.
//!
//! `statvfs` says what is free now, but jobs admitted earlier and still receiving will
//! take the part of their data they have not written yet. Judged one by one, three jobs
//! that each fit alone were all admitted into a file system that held two of them: one
//! failed on a full disk and left the file system at 0 bytes free. So admission keeps a
//! [`Ledger`] of what each admitted job has still to write, per file system, and a job
//! is admitted only if free space, less everything promised, less the reserve, holds it.
//! As a job's blocks land on disk its promise shrinks by as much (they are now counted by
//! `statvfs` instead). Every few MiB a job checks again that all promises still fit above
//! the reserve: if space was taken from outside meanwhile, the job stops with a named
//! error before it eats into the reserve, and what it staged is removed.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why a job does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpaceError {
    /// Free space could not be read.
    #[error("{path}: {reason}")]
    Io {
        /// The folder asked about.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The job does not fit beside the jobs already admitted and the reserve.
    #[error(
        "not enough free space: {need} bytes needed, {free} free, {promised} promised to jobs \
         in flight, {reserve} kept in reserve"
    )]
    NoSpace {
        /// Bytes the job needs.
        need: u64,
        /// Bytes free now.
        free: u64,
        /// Bytes admitted jobs may still write.
        promised: u64,
        /// Bytes kept free (`limits.reserve_mib`).
        reserve: u64,
    },
    /// Something else filled the file system while the job ran.
    #[error(
        "the target's file system filled up while the job ran: {free} bytes free, {promised} \
         still to be written by jobs in flight, {reserve} kept in reserve"
    )]
    Filled {
        /// Bytes free now.
        free: u64,
        /// Bytes admitted jobs may still write.
        promised: u64,
        /// Bytes kept free.
        reserve: u64,
    },
}

/// Which mount `path` is on: its file system's device and, where the kernel tells
/// (statx `STATX_MNT_ID`, Linux 5.8+), the mount's id. A rename works only within one
/// mount: two bind mounts of one file system (systemd's `ReadWritePaths=` makes one per
/// path) share a device, yet a rename between them fails with EXDEV.
pub fn mount_of(path: &Path) -> io::Result<(u64, Option<u64>)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `c` is a valid C string and `stx` a buffer of the size statx writes.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            0,
            libc::STATX_INO | libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statx succeeded, so it filled the buffer.
    let stx = unsafe { stx.assume_init() };
    let dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    let mnt = (stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id);
    Ok((dev, mnt))
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

/// Free space kept by default on a file system that receives.
pub const DEFAULT_RESERVE: u64 = 64 << 20;

/// Refuses `need` more bytes on `dir`'s file system unless `reserve` bytes stay free
/// (for a single job, with nothing else in flight: a pull into a folder).
pub fn check_space(dir: &Path, need: u64, reserve: u64) -> Result<(), SpaceError> {
    let free = free_space(dir).map_err(|e| io_err(dir, e))?;
    if need.saturating_add(reserve) > free {
        return Err(SpaceError::NoSpace {
            need,
            free,
            promised: 0,
            reserve,
        });
    }
    Ok(())
}

fn io_err(path: &Path, e: io::Error) -> SpaceError {
    SpaceError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// What every admitted job has still to write, by file system.
#[derive(Debug, Default)]
pub struct Ledger {
    jobs: Mutex<HashMap<u64, Promise>>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Promise {
    dev: u64,
    left: Arc<AtomicU64>,
}

impl Ledger {
    /// Admits a job that will write `need` bytes under `dir`, if they fit with
    /// everything promised to other jobs on that file system and `reserve` to spare.
    pub fn admit(self: &Arc<Self>, dir: &Path, need: u64, reserve: u64) -> Result<Reservation, SpaceError> {
        let dev = std::fs::metadata(dir).map_err(|e| io_err(dir, e))?.dev();
        let mut jobs = self.jobs.lock().expect("space ledger");
        let free = free_space(dir).map_err(|e| io_err(dir, e))?;
        let promised = promised(&jobs, dev);
        if need.saturating_add(promised).saturating_add(reserve) > free {
            return Err(SpaceError::NoSpace {
                need,
                free,
                promised,
                reserve,
            });
        }
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let left = Arc::new(AtomicU64::new(need));
        jobs.insert(
            key,
            Promise {
                dev,
                left: left.clone(),
            },
        );
        Ok(Reservation(Arc::new(Held {
            ledger: self.clone(),
            key,
            dev,
            dir: dir.to_path_buf(),
            reserve,
            left,
            unchecked: AtomicU64::new(0),
        })))
    }

    /// Bytes promised on the file system `dev`.
    pub fn promised(&self, dev: u64) -> u64 {
        promised(&self.jobs.lock().expect("space ledger"), dev)
    }
}

fn promised(jobs: &HashMap<u64, Promise>, dev: u64) -> u64 {
    jobs.values()
        .filter(|p| p.dev == dev)
        .map(|p| p.left.load(Ordering::Relaxed))
        .sum()
}

/// One admitted job's promise; it leaves the ledger when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Reservation(Arc<Held>);

#[derive(Debug)]
struct Held {
    ledger: Arc<Ledger>,
    key: u64,
    dev: u64,
    dir: PathBuf,
    reserve: u64,
    left: Arc<AtomicU64>,
    /// Bytes written since the last check.
    unchecked: AtomicU64,
}

/// How often (in bytes written) a job checks that every promise still fits.
const CHECK_EVERY: u64 = 4 << 20;

impl Reservation {
    /// `n` more bytes of the job are on disk (and so counted as used by `statvfs`).
    pub fn written(&self, n: u64) {
        let _ = self
            .0
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(l.saturating_sub(n)));
    }

    /// Before writing `n` more bytes: every 4 MiB (`CHECK_EVERY`), checks that what all
    /// admitted jobs still have to write fits above the reserve.
    pub fn check(&self, n: u64) -> Result<(), SpaceError> {
        let h = &self.0;
        if h.unchecked.fetch_add(n, Ordering::Relaxed) + n < CHECK_EVERY {
            return Ok(());
        }
        h.unchecked.store(0, Ordering::Relaxed);
        let free = free_space(&h.dir).map_err(|e| io_err(&h.dir, e))?;
        let promised = h.ledger.promised(h.dev);
        if promised.saturating_add(h.reserve) > free {
            return Err(SpaceError::Filled {
                free,
                promised,
                reserve: h.reserve,
            });
        }
        Ok(())
    }

    /// What the job has still to write.
    pub fn left(&self) -> u64 {
        self.0.left.load(Ordering::Relaxed)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.ledger.jobs.lock().expect("space ledger").remove(&self.key);
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn one_folder_is_on_one_mount_and_a_missing_one_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("a")).unwrap();
        let a = mount_of(&t.path().join("a")).unwrap();
        assert_eq!(a, mount_of(t.path()).unwrap());
        assert!(a.1.is_some(), "this kernel tells mount ids");
        assert_ne!(a, mount_of(Path::new("/proc")).unwrap());
        assert!(mount_of(&t.path().join("none")).is_err());
    }

    use super::*;

    #[test]
    fn admission_counts_what_admitted_jobs_have_still_to_write() {
        let t = tempfile::tempdir().unwrap();
        let free = free_space(t.path()).unwrap();
        let ledger = Arc::new(Ledger::default());
        let reserve = 1 << 20;
        // Two jobs of 40 % each fit; a third does not, though it would fit alone.
        let job = (free - reserve) * 2 / 5;
        let a = ledger.admit(t.path(), job, reserve).unwrap();
        let _b = ledger.admit(t.path(), job, reserve).unwrap();
        let err = ledger.admit(t.path(), job, reserve).unwrap_err();
        assert!(
            matches!(err, SpaceError::NoSpace { promised, .. } if promised == 2 * job),
            "{err}"
        );
        check_space(t.path(), job, reserve).unwrap();
        // What a job has written no longer counts as promised (statvfs counts it now).
        a.written(job / 2);
        assert_eq!(a.left(), job - job / 2);
        assert_eq!(
            ledger.promised(std::fs::metadata(t.path()).unwrap().dev()),
            2 * job - job / 2
        );
        // A job that ends gives its promise back.
        drop(a);
        ledger.admit(t.path(), job, reserve).unwrap();
    }

    #[test]
    fn a_job_notices_when_the_promises_no_longer_fit() {
        let t = tempfile::tempdir().unwrap();
        let free = free_space(t.path()).unwrap();
        let ledger = Arc::new(Ledger::default());
        let r = ledger.admit(t.path(), free / 4, 0).unwrap();
        r.check(CHECK_EVERY).unwrap();
        // Space taken meanwhile (here: a promise that appears from nowhere, as space
        // taken by another writer would): the next check fails.
        let dev = std::fs::metadata(t.path()).unwrap().dev();
        let taken = Promise {
            dev,
            left: Arc::new(AtomicU64::new(free)),
        };
        ledger.jobs.lock().unwrap().insert(u64::MAX, taken);
        assert!(r.check(1).is_ok(), "checked only every few MiB");
        let err = r.check(CHECK_EVERY).unwrap_err();
        assert!(matches!(err, SpaceError::Filled { .. }), "{err}");
        assert!(matches!(
            check_space(t.path(), u64::MAX / 2, 0),
            Err(SpaceError::NoSpace { .. })
        ));
    }
}
