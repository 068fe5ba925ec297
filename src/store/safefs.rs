//! Opening files below a folder held open, never through a symlink.
//!
//! An import target and an export are folders other local users may be able to write
//! into. A path such as `<target>/.barge-staging/<job>/files/a/b` is looked up again by
//! the kernel at every open, and any of its folders may have been replaced by a symlink
//! meanwhile: a write, a truncation or a rename by path would then land wherever the
//! link points. So the agent holds the folder it trusts (the target, the export, a job's
//! staging folder) open, and reaches everything below it relative to that descriptor
//! with no symlink followed: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or,
//! where the kernel lacks it, one `openat` with `O_NOFOLLOW` per component. Folders
//! are made with `mkdirat` the same way, and renames are `renameat2` between folder
//! descriptors. A symlink found on the way is an error (`ELOOP`), never followed.
//!
//! [`private_dir`] makes or opens the staging folders themselves: real folders, owned by
//! the agent's effective uid, mode 0700, checked on the opened descriptor.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    match r {
        -1 => Err(io::Error::last_os_error()),
        r => Ok(r),
    }
}

/// Opens a folder the agent trusts by its path (a configured target or export).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: c is a valid NUL-terminated path; the descriptor returned is ours.
    let fd = check(unsafe { libc::open(c.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC) })?;
    // SAFETY: fd was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The components of a relative path; `..`, `/` and `.` are refused (`EINVAL`).
fn names(rel: &Path) -> io::Result<Vec<&std::ffi::OsStr>> {
    rel.components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        })
        .collect()
}

fn openat(dir: BorrowedFd<'_>, name: &std::ffi::OsStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = cstr(Path::new(name))?;
    // SAFETY: dir is an open descriptor and c a valid NUL-terminated name.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: fd was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdirat(dir: BorrowedFd<'_>, name: &std::ffi::OsStr, mode: libc::mode_t) -> io::Result<()> {
    let c = cstr(Path::new(name))?;
    // SAFETY: dir is an open descriptor and c a valid NUL-terminated name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(|_| ())
}

/// Opens the folder `rel` below `dir`, one component at a time with no symlink
/// followed; with `make`, missing folders are made (mode 0777 less the umask).
pub fn walk_dirs(dir: BorrowedFd<'_>, rel: &Path, make: bool) -> io::Result<OwnedFd> {
    let flags = libc::O_DIRECTORY | libc::O_RDONLY;
    let mut cur: Option<OwnedFd> = None;
    for n in names(rel)? {
        let at = cur.as_ref().map_or(dir, |f| f.as_fd());
        let next = match openat(at, n, flags, 0) {
            Err(e) if make && e.kind() == io::ErrorKind::NotFound => {
                match mkdirat(at, n, 0o777) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
                openat(at, n, flags, 0)
            }
            other => other,
        };
        cur = Some(next.map_err(|e| which_not_dir(at, n, e))?);
    }
    match cur {
        Some(f) => Ok(f),
        // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor we own.
        None => Ok(unsafe { OwnedFd::from_raw_fd(check(libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0))?) }),
    }
}

/// A folder on the way that could not be opened as one: `ELOOP` if it is a symlink,
/// `ENOTDIR` if it is something else, whichever the kernel said.
fn which_not_dir(at: BorrowedFd<'_>, name: &std::ffi::OsStr, e: io::Error) -> io::Error {
    if !matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) {
        return e;
    }
    match lstat_at(at, name) {
        Ok(m) if m.file_type().is_symlink() => io::Error::from_raw_os_error(libc::ELOOP),
        _ => io::Error::from_raw_os_error(libc::ENOTDIR),
    }
}

/// `lstat` of `name` in the folder `dir`.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> io::Result<std::fs::Metadata> {
    File::from(openat(dir, name, libc::O_PATH, 0)?).metadata()
}

/// `linkat` of `from_name` in `from` as `to_name` in `to` (a symlink is not followed).
pub fn link_at(
    from: BorrowedFd<'_>,
    from_name: &std::ffi::OsStr,
    to: BorrowedFd<'_>,
    to_name: &std::ffi::OsStr,
) -> io::Result<()> {
    let (f, t) = (cstr(Path::new(from_name))?, cstr(Path::new(to_name))?);
    // SAFETY: both folders are open and both names valid NUL-terminated strings.
    check(unsafe { libc::linkat(from.as_raw_fd(), f.as_ptr(), to.as_raw_fd(), t.as_ptr(), 0) }).map(|_| ())
}

/// `unlinkat` of `name` in `dir`: an empty folder if `folder`, else a file.
pub fn remove_at(dir: BorrowedFd<'_>, name: &std::ffi::OsStr, folder: bool) -> io::Result<()> {
    let c = cstr(Path::new(name))?;
    let flags = if folder { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: dir is open and c a valid NUL-terminated name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(|_| ())
}

/// Opens the file `rel` below `dir` with `flags` (`O_CREAT` makes it with `mode`),
/// following no symlink and never leaving `dir`. With `make`, missing folders on the
/// way are made first if the open finds none.
pub fn open_beneath(dir: BorrowedFd<'_>, rel: &Path, flags: libc::c_int, make: bool) -> io::Result<File> {
    match open_once(dir, rel, flags) {
        Err(e) if make && e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = rel.parent() {
                walk_dirs(dir, parent, true)?;
            }
            open_once(dir, rel, flags)
        }
        other => other,
    }
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn open_once(dir: BorrowedFd<'_>, rel: &Path, flags: libc::c_int) -> io::Result<File> {
    let c = cstr(rel)?;
    let how = OpenHow {
        flags: (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        mode: if flags & libc::O_CREAT != 0 { 0o666 } else { 0 },
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
    };
    // SAFETY: dir is open, c a valid path, `how` a valid open_how of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    let fd = match r {
        -1 => {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // No openat2 (old kernel, or a seccomp filter): one component at a time.
                Some(libc::ENOSYS) | Some(libc::EPERM) => return open_walking(dir, rel, flags),
                // RESOLVE_BENEATH says EXDEV for a `..` that would leave the folder.
                Some(libc::EXDEV) => return Err(io::Error::from_raw_os_error(libc::ELOOP)),
                _ => return Err(e),
            }
        }
        fd => fd as libc::c_int,
    };
    // SAFETY: fd was just opened and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn open_walking(dir: BorrowedFd<'_>, rel: &Path, flags: libc::c_int) -> io::Result<File> {
    let parts = names(rel)?;
    let (last, folders) = parts
        .split_last()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let folder: PathBuf = folders.iter().collect();
    let parent = walk_dirs(dir, &folder, false)?;
    let f = openat(parent.as_fd(), last, flags, 0o666)?;
    Ok(File::from(f))
}

/// `lstat` of `rel` below `dir`, reached with no symlink followed (the last component
/// itself may be anything, a symlink included).
pub fn stat_beneath(dir: BorrowedFd<'_>, rel: &Path) -> io::Result<std::fs::Metadata> {
    open_beneath(dir, rel, libc::O_PATH, false)?.metadata()
}

/// `renameat2` of `from_name` in folder `from` to `to_name` in folder `to`;
/// `no_replace` fails instead of replacing what is there.
pub fn rename_at(
    from: BorrowedFd<'_>,
    from_name: &std::ffi::OsStr,
    to: BorrowedFd<'_>,
    to_name: &std::ffi::OsStr,
    no_replace: bool,
) -> io::Result<()> {
    let (f, t) = (cstr(Path::new(from_name))?, cstr(Path::new(to_name))?);
    let flags = if no_replace { libc::RENAME_NOREPLACE } else { 0 };
    // SAFETY: both folders are open and both names valid NUL-terminated strings.
    check(unsafe { libc::renameat2(from.as_raw_fd(), f.as_ptr(), to.as_raw_fd(), t.as_ptr(), flags) }).map(|_| ())
}

/// The folder holding `rel` below `dir` (walked as [`walk_dirs`]) and `rel`'s last name.
pub fn parent_of<'a>(dir: BorrowedFd<'_>, rel: &'a Path, make: bool) -> io::Result<(OwnedFd, &'a std::ffi::OsStr)> {
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let parent = walk_dirs(dir, rel.parent().unwrap_or(Path::new("")), make)?;
    Ok((parent, name))
}

/// A path that names the open folder `dir` itself, however its path has changed since
/// it was opened (`/proc/self/fd/N`), for calls that take paths only, such as
/// `std::fs::remove_dir_all` (which follows no symlink below it).
pub fn fd_path(dir: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
}

/// What is wrong with a staging folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsafe {
    /// It is a symlink, or not a folder at all.
    NotDir,
    /// It belongs to another user.
    Owner {
        /// The folder's owner.
        uid: u32,
        /// The agent's uid.
        agent: u32,
    },
    /// Others than the agent may write into it and it could not be tightened.
    Mode(u32),
}

/// Makes (mode 0700, if `make`) or opens the folder `name` in `parent`, and checks the opened
/// descriptor: a real folder owned by the agent's effective uid. A folder of the agent
/// open to others is tightened to 0700.
pub fn private_dir(parent: BorrowedFd<'_>, name: &str, make: bool) -> io::Result<Result<(OwnedFd, bool), Unsafe>> {
    let n = std::ffi::OsStr::new(name);
    let made = match make.then(|| mkdirat(parent, n, 0o700)) {
        None => false,
        Some(Ok(())) => true,
        Some(Err(e)) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Some(Err(e)) => return Err(e),
    };
    let fd = match openat(parent, n, libc::O_DIRECTORY | libc::O_RDONLY, 0) {
        Ok(fd) => fd,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
            return Ok(Err(Unsafe::NotDir))
        }
        Err(e) => return Err(e),
    };
    Ok(check_private(&fd).map(|()| (fd, made)))
}

/// Checks an opened folder as [`private_dir`] does.
pub fn check_private(fd: &OwnedFd) -> Result<(), Unsafe> {
    let file = std::mem::ManuallyDrop::new(
        // SAFETY: the descriptor stays open (borrowed from fd); ManuallyDrop keeps it so.
        unsafe { File::from_raw_fd(fd.as_raw_fd()) },
    );
    let Ok(meta) = file.metadata() else {
        return Err(Unsafe::NotDir);
    };
    // SAFETY: geteuid has no preconditions.
    let agent = unsafe { libc::geteuid() };
    if !meta.is_dir() {
        return Err(Unsafe::NotDir);
    }
    if meta.uid() != agent {
        return Err(Unsafe::Owner { uid: meta.uid(), agent });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        // SAFETY: fd is an open descriptor.
        if unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) } != 0 {
            return Err(Unsafe::Mode(mode));
        }
    }
    Ok(())
}

/// Checks an opened file (by its `fstat`) that is sent from an export: a regular file
/// with exactly one name (a hard link would let whoever can write into the export send
/// any file of the same file system that they can link to).
pub fn check_exported(meta: &std::fs::Metadata) -> Result<(), Exported> {
    match (meta.is_file(), meta.nlink()) {
        (false, _) => Err(Exported::NotFile),
        (true, 1) => Ok(()),
        (true, n) => Err(Exported::Links(n)),
    }
}

/// What is wrong with a file of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exported {
    /// Not a regular file (a symlink, a folder, a device).
    NotFile,
    /// A regular file with this many hard links (more than one).
    Links(u64),
}

/// A folder held open, shared by whoever opens files below it.
pub type Root = Arc<OwnedFd>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn eloop(e: io::Error) {
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
    }

    #[test]
    fn files_below_a_folder_open_and_symlinks_on_the_way_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir(t.path().join("out")).unwrap();
        std::fs::write(t.path().join("victim"), b"must stay as it is").unwrap();
        let dir = open_dir(&root).unwrap();
        let w = libc::O_WRONLY | libc::O_CREAT;
        // Made with its missing folders.
        open_beneath(dir.as_fd(), Path::new("b/c/f"), w, true).unwrap();
        assert!(root.join("b/c/f").is_file());
        // A symlink as the file, as a folder on the way, or a `..` is never followed.
        symlink(t.path().join("victim"), root.join("a/f")).unwrap();
        eloop(open_beneath(dir.as_fd(), Path::new("a/f"), w | libc::O_TRUNC, true).unwrap_err());
        symlink(t.path().join("out"), root.join("l")).unwrap();
        eloop(open_beneath(dir.as_fd(), Path::new("l/new"), w, true).unwrap_err());
        eloop(walk_dirs(dir.as_fd(), Path::new("l/x"), true).unwrap_err());
        assert!(open_beneath(dir.as_fd(), Path::new("../victim"), libc::O_RDONLY, false).is_err());
        assert_eq!(std::fs::read(t.path().join("victim")).unwrap(), b"must stay as it is");
        assert_eq!(std::fs::read_dir(t.path().join("out")).unwrap().count(), 0);
        // The walk without openat2 refuses the same.
        eloop(open_walking(dir.as_fd(), Path::new("a/f"), libc::O_RDONLY).unwrap_err());
        eloop(open_walking(dir.as_fd(), Path::new("l/new"), w).unwrap_err());
        assert!(stat_beneath(dir.as_fd(), Path::new("a/f"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn renames_between_folder_descriptors() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("s/d")).unwrap();
        std::fs::write(t.path().join("s/d/f"), b"x").unwrap();
        let root = open_dir(t.path()).unwrap();
        let (from, name) = parent_of(root.as_fd(), Path::new("s/d/f"), false).unwrap();
        let (to, _) = parent_of(root.as_fd(), Path::new("t/e/f"), true).unwrap();
        rename_at(from.as_fd(), name, to.as_fd(), name, true).unwrap();
        assert!(t.path().join("t/e/f").is_file());
        std::fs::write(t.path().join("s/d/f"), b"y").unwrap();
        let e = rename_at(from.as_fd(), name, to.as_fd(), name, true).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    }

    #[test]
    fn private_folders_are_made_0700_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let dir = open_dir(t.path()).unwrap();
        let (_, made) = private_dir(dir.as_fd(), "p", true).unwrap().unwrap();
        assert!(made);
        let mode = std::fs::metadata(t.path().join("p")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Looser: tightened.
        std::fs::set_permissions(t.path().join("p"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let (_, made) = private_dir(dir.as_fd(), "p", true).unwrap().unwrap();
        assert!(!made);
        let mode = std::fs::metadata(t.path().join("p")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // A symlink to a folder, or a file: not a folder.
        symlink(t.path().join("p"), t.path().join("l")).unwrap();
        assert_eq!(
            private_dir(dir.as_fd(), "l", true).unwrap().unwrap_err(),
            Unsafe::NotDir
        );
        std::fs::write(t.path().join("f"), b"").unwrap();
        assert_eq!(
            private_dir(dir.as_fd(), "f", true).unwrap().unwrap_err(),
            Unsafe::NotDir
        );
        // Another user's folder (only root can make one here).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(t.path().join("p"), Some(12345), None).unwrap();
            let err = private_dir(dir.as_fd(), "p", true).unwrap().unwrap_err();
            assert_eq!(err, Unsafe::Owner { uid: 12345, agent: 0 });
        }
    }

    #[test]
    fn exported_files_have_one_name() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        let f = File::open(t.path().join("f")).unwrap();
        assert_eq!(check_exported(&f.metadata().unwrap()), Ok(()));
        std::fs::hard_link(t.path().join("f"), t.path().join("g")).unwrap();
        assert_eq!(check_exported(&f.metadata().unwrap()), Err(Exported::Links(2)));
        let d = File::open(t.path()).unwrap();
        assert_eq!(check_exported(&d.metadata().unwrap()), Err(Exported::NotFile));
    }
}
