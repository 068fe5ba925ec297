//! File I/O on io_uring, on a thread of its own.
//!
//! tokio-uring needs its own current-thread runtime, while the network side runs on an
//! ordinary multi-threaded tokio runtime. So reads, writes and syncs are requests sent
//! to one io_uring thread, each run there as its own task, so many are in flight at
//! once. Buffers move by ownership: a read fills a `Vec` that becomes `Bytes` without a
//! copy, and a write hands the `Bytes` received from quinn to the kernel as they are.
//!
//! Reads and writes below 512 KiB (the blocks of small files) go to a plain thread
//! instead, one after the other with ordinary system calls (writes still with O_DIRECT
//! when aligned). On io_uring each of them is an open, a read or write and a close, and
//! an open that creates a file can not complete inline: the kernel hands it to a worker
//! thread, so every small file cost several thread switches. Measured in the transfer
//! bench: 20,000 x 4 KiB went from 0.27-0.38x to 0.37-0.48x of the cp floor; for 4,096
//! x 256 KiB the gain is within the machine's noise. Whole 1 MiB blocks stay on
//! io_uring, where several are in flight at once: moving them too made one 2 GiB file
//! slower (0.64x instead of 0.78x of the quinn ceiling in back-to-back runs).
//!
//! A sender of many small files asks for their blocks in batches
//! ([`Disk::read_many_and_stat`]): one request and one answer for many files instead of
//! a round trip between threads for each, which cost the sender more than the reads.

use crate::store::safefs;
use bytes::Bytes;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, oneshot};

/// Where a file is: a path, or a name below a folder held open. Either way the last
/// component is opened with `O_NOFOLLOW`; below a folder, no symlink is followed at all
/// and nothing outside the folder is reached (see [`crate::store::safefs`]). Staged files are
/// always `Beneath` their job's staging folder.
#[derive(Clone, Debug)]
pub enum Loc {
    /// A path, its last component opened without following a symlink.
    Path(PathBuf),
    /// A name below a folder held open.
    Beneath {
        /// The folder.
        dir: safefs::Root,
        /// The name below it.
        rel: PathBuf,
        /// The whole path, for messages.
        shown: PathBuf,
    },
}

impl From<PathBuf> for Loc {
    fn from(p: PathBuf) -> Loc {
        Loc::Path(p)
    }
}

impl Loc {
    /// The path, for messages.
    pub fn shown(&self) -> &Path {
        match self {
            Loc::Path(p) => p,
            Loc::Beneath { shown, .. } => shown,
        }
    }

    /// Opens with `flags` (plus `O_NOFOLLOW | O_CLOEXEC`); with `O_CREAT`, a missing
    /// folder on the way is made and the open tried again (folders made as their first
    /// file comes spread over ext4's inode groups: see `open_making_folder`).
    pub fn open(&self, flags: libc::c_int) -> io::Result<std::fs::File> {
        let create = flags & libc::O_CREAT != 0;
        match self {
            Loc::Path(p) => {
                use std::os::unix::fs::OpenOptionsExt;
                let mut o = std::fs::OpenOptions::new();
                match flags & libc::O_ACCMODE {
                    libc::O_RDONLY => o.read(true),
                    libc::O_WRONLY => o.write(true),
                    _ => o.read(true).write(true),
                };
                o.create(create)
                    .custom_flags((flags & !(libc::O_ACCMODE | libc::O_CREAT)) | libc::O_NOFOLLOW);
                match create {
                    true => open_making_folder(p, |p| o.open(p)),
                    false => o.open(p),
                }
            }
            Loc::Beneath { dir, rel, .. } => safefs::open_beneath(dir.as_fd(), rel, flags, create),
        }
    }
}

/// What a write does when it has ended.
pub type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

enum Request {
    Read {
        path: Loc,
        offset: u64,
        len: usize,
        /// Also stat the file, through the descriptor the block was read from.
        stat: bool,
        reply: oneshot::Sender<io::Result<(Bytes, Option<std::fs::Metadata>)>>,
    },
    Write {
        path: Loc,
        offset: u64,
        data: Bytes,
        /// Called on the disk thread with the outcome.
        done: Done,
    },
    Finish {
        path: Loc,
        len: u64,
        sync: bool,
        reply: oneshot::Sender<io::Result<()>>,
    },
    /// Small reads, each with its file's metadata, answered together (plain thread only).
    ReadMany {
        reads: Vec<SmallRead>,
        reply: oneshot::Sender<Vec<io::Result<(Bytes, std::fs::Metadata)>>>,
    },
}

/// One read of a batch: the file, the offset and the length (below [`PLAIN_MAX`]).
pub type SmallRead = (Loc, u64, usize);

/// Handle to the io_uring thread and the plain I/O thread; cheap to clone. The threads
/// end with the last handle.
#[derive(Clone, Debug)]
pub struct Disk {
    tx: mpsc::UnboundedSender<Request>,
    plain: std::sync::mpsc::Sender<Request>,
}

/// Below this, reads and writes go to the plain thread (see the module docs).
pub const PLAIN_MAX: usize = 512 << 10;

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("disk request")
    }
}

fn gone() -> io::Error {
    io::Error::other("io_uring thread stopped")
}

impl Disk {
    /// Starts the io_uring thread; fails if the kernel refuses io_uring.
    pub fn start() -> io::Result<Disk> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("barge-uring".into()).spawn(move || {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tokio_uring::start(serve(rx, ready_tx.clone()));
            }));
            if run.is_err() {
                let _ = ready_tx.send(Err("io_uring runtime failed to start".to_string()));
            }
        })?;
        let (plain, plain_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("barge-plain-io".into())
            .spawn(move || plain_io(plain_rx))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Disk { tx, plain }),
            Ok(Err(e)) => Err(io::Error::other(e)),
            Err(_) => Err(io::Error::other("io_uring thread exited at start")),
        }
    }

    /// Sends one request to the io_uring thread (or, if `plain`, to the plain thread)
    /// and waits for its answer.
    async fn call<T>(
        &self,
        plain: bool,
        make: impl FnOnce(oneshot::Sender<io::Result<T>>) -> Request,
    ) -> io::Result<T> {
        let (reply, rx) = oneshot::channel();
        match plain {
            true => self.plain.send(make(reply)).map_err(|_| gone())?,
            false => self.tx.send(make(reply)).map_err(|_| gone())?,
        }
        rx.await.map_err(|_| gone())?
    }

    /// Reads exactly `len` bytes at `offset`; a shorter file is an `UnexpectedEof`.
    pub async fn read_at(&self, path: impl Into<Loc>, offset: u64, len: usize) -> io::Result<Bytes> {
        Ok(self.read(path.into(), offset, len, false).await?.0)
    }

    /// Like [`Disk::read_at`], and the file's metadata as it was just after the read,
    /// taken from the same open file (no second walk of the path).
    pub async fn read_and_stat(
        &self,
        path: impl Into<Loc>,
        offset: u64,
        len: usize,
    ) -> io::Result<(Bytes, std::fs::Metadata)> {
        let (data, meta) = self.read(path.into(), offset, len, true).await?;
        Ok((data, meta.ok_or_else(|| io::Error::other("no metadata"))?))
    }

    /// Reads several small blocks (each below [`PLAIN_MAX`]), each with the metadata of
    /// the descriptor it was read from, in one request: the results in order.
    pub async fn read_many_and_stat(&self, reads: Vec<SmallRead>) -> Vec<io::Result<(Bytes, std::fs::Metadata)>> {
        let n = reads.len();
        let (reply, rx) = oneshot::channel();
        let gone = || io::Error::other("disk thread stopped");
        if self.plain.send(Request::ReadMany { reads, reply }).is_err() {
            return (0..n).map(|_| Err(gone())).collect();
        }
        rx.await.unwrap_or_else(|_| (0..n).map(|_| Err(gone())).collect())
    }

    async fn read(
        &self,
        path: Loc,
        offset: u64,
        len: usize,
        stat: bool,
    ) -> io::Result<(Bytes, Option<std::fs::Metadata>)> {
        self.call(len < PLAIN_MAX, |reply| Request::Read {
            path,
            offset,
            len,
            stat,
            reply,
        })
        .await
    }

    /// Writes `data` at `offset`, creating the file (and its folder) if needed.
    pub async fn write_at(&self, path: impl Into<Loc>, offset: u64, data: Bytes) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        let done = Box::new(move |r| {
            let _ = reply.send(r);
        });
        self.write_then(path.into(), offset, data, done)?;
        rx.await.map_err(|_| gone())?
    }

    /// Starts writing `data` at `offset` (like [`Disk::write_at`]) and returns at once;
    /// `done` is called on the disk thread when the write has ended. Nobody waits for
    /// each write, so a stream of small blocks wakes no task per block.
    pub fn write_then(&self, path: Loc, offset: u64, data: Bytes, done: Done) -> io::Result<()> {
        let plain = data.len() < PLAIN_MAX;
        let req = Request::Write {
            path,
            offset,
            data,
            done,
        };
        match plain {
            true => self.plain.send(req).map_err(|_| gone()),
            false => self.tx.send(req).map_err(|_| gone()),
        }
    }

    /// Creates the file if needed, sets its length to `len` and syncs it to disk.
    pub async fn sync(&self, path: impl Into<Loc>, len: u64) -> io::Result<()> {
        self.finish(path, len, true).await
    }

    /// Creates the file (and its folder) if needed and sets its length to `len`; syncs
    /// it if `sync`.
    pub async fn finish(&self, path: impl Into<Loc>, len: u64, sync: bool) -> io::Result<()> {
        let path = path.into();
        self.call(false, |reply| Request::Finish { path, len, sync, reply })
            .await
    }
}

async fn serve(mut rx: mpsc::UnboundedReceiver<Request>, ready: std::sync::mpsc::Sender<Result<(), String>>) {
    let _ = ready.send(Ok(()));
    while let Some(req) = rx.recv().await {
        tokio_uring::spawn(handle(req));
    }
}

async fn handle(req: Request) {
    match req {
        Request::Read {
            path,
            offset,
            len,
            stat,
            reply,
        } => {
            let _ = reply.send(read(path, offset, len, stat).await);
        }
        Request::Write {
            path,
            offset,
            data,
            done,
        } => done(write(path, offset, data).await),
        Request::Finish { path, len, sync, reply } => {
            let _ = reply.send(finish(path, len, sync).await);
        }
        Request::ReadMany { reads, reply } => {
            let n = reads.len();
            let _ = reply.send(
                (0..n)
                    .map(|_| Err(io::Error::other("not an io_uring request")))
                    .collect(),
            );
        }
    }
}

/// Requests the plain thread takes at once when they queue up.
const PLAIN_BATCH: usize = 64;
/// Bytes written after which the plain thread reports the writes it holds: a batch of
/// larger writes (256 KiB blocks) must not hold its first ones back from the lanes
/// that wait for them.
const REPORT_BYTES: usize = 64 << 10;

/// Writes done but not yet reported, and their bytes.
#[derive(Default)]
struct Written {
    done: Vec<(Done, io::Result<()>)>,
    bytes: usize,
}

impl Written {
    fn push(&mut self, done: Done, len: usize, r: io::Result<()>) {
        self.done.push((done, r));
        self.bytes += len;
        if self.bytes >= REPORT_BYTES {
            self.report();
        }
    }

    fn report(&mut self) {
        for (done, r) in self.done.drain(..) {
            done(r);
        }
        self.bytes = 0;
    }
}

/// The plain thread: small reads and writes with ordinary system calls, in order.
/// Requests that queued up are taken together and their writes reported together
/// (every [`REPORT_BYTES`], and at the end): a receiver of many small files then
/// wakes up once per few dozen files, not per file.
fn plain_io(rx: std::sync::mpsc::Receiver<Request>) {
    let mut written = Written::default();
    while let Ok(first) = rx.recv() {
        let more = std::iter::from_fn(|| rx.try_recv().ok()).take(PLAIN_BATCH - 1);
        for req in std::iter::once(first).chain(more) {
            plain_request(req, &mut written);
        }
        written.report();
    }
}

/// Runs one request on the plain thread; a write's outcome is kept in `written`.
fn plain_request(req: Request, written: &mut Written) {
    match req {
        Request::Read {
            path,
            offset,
            len,
            stat,
            reply,
        } => {
            let _ = reply.send(read_plain(&path, offset, len, stat));
        }
        Request::Write {
            path,
            offset,
            data,
            done,
        } => written.push(done, data.len(), write_plain(&path, offset, &data)),
        Request::Finish { reply, .. } => {
            let _ = reply.send(Err(io::Error::other("finish is not a plain request")));
        }
        Request::ReadMany { reads, reply } => {
            let read = |(path, offset, len): &SmallRead| {
                let (data, meta) = read_plain(path, *offset, *len, true)?;
                Ok((data, meta.ok_or_else(|| io::Error::other("no metadata"))?))
            };
            let _ = reply.send(reads.iter().map(read).collect());
        }
    }
}

/// Reads exactly `len` bytes at `offset` into a buffer that is not zeroed first (that
/// cost more than the read itself for 256 KiB blocks).
fn read_plain(path: &Loc, offset: u64, len: usize, stat: bool) -> io::Result<(Bytes, Option<std::fs::Metadata>)> {
    use std::io::{Read, Seek};
    let mut file = path.open(libc::O_RDONLY)?;
    file.seek(io::SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(len);
    (&mut file).take(len as u64).read_to_end(&mut buf)?;
    if buf.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let meta = if stat { Some(file.metadata()?) } else { None };
    Ok((Bytes::from(buf), meta))
}

/// A write with ordinary system calls: O_DIRECT when the data allows it (and the file
/// system takes it), buffered otherwise.
fn write_plain(path: &Loc, offset: u64, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let w = libc::O_WRONLY | libc::O_CREAT;
    if crate::store::buf::direct_ok(data, offset) {
        match path.open(w | libc::O_DIRECT) {
            Ok(f) => match f.write_all_at(data, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            },
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    path.open(w)?.write_all_at(data, offset)
}

/// Opens with `open`; if the file's folder is missing, makes it and opens again.
///
/// Staging folders are made as their first file arrives, not all before the first
/// block. ext4 places a new folder's inodes by how full the inode groups are when the
/// folder is made: 256 folders made at once all land in one group, which 20,000 small
/// files then overflow, spilling each folder's rest into a group of its own far away.
/// Made as they fill, the folders spread over neighbouring groups as `cp` leaves them.
/// Measured: that halved the receiver's time in ext4's inode allocator.
fn open_making_folder<T>(path: &Path, open: impl Fn(&Path) -> io::Result<T>) -> io::Result<T> {
    match open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            make_folder(path)?;
            open(path)
        }
        other => other,
    }
}

fn make_folder(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::create_dir_all(dir),
        None => Err(io::ErrorKind::NotFound.into()),
    }
}

/// [`Loc::open`] on io_uring. A name below a folder held open is opened right here
/// (io_uring's openat can not refuse symlinks on the way), then handed to io_uring.
async fn open_uring(path: &Loc, flags: libc::c_int) -> io::Result<tokio_uring::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let Loc::Path(p) = path else {
        return Ok(tokio_uring::fs::File::from_std(path.open(flags)?));
    };
    let create = flags & libc::O_CREAT != 0;
    let mut o = tokio_uring::fs::OpenOptions::new();
    match create {
        true => o.write(true).create(true),
        false => o.read(true),
    };
    o.custom_flags((flags & !(libc::O_ACCMODE | libc::O_CREAT)) | libc::O_NOFOLLOW);
    match o.open(p).await {
        Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
            make_folder(p)?;
            o.open(p).await
        }
        other => other,
    }
}

/// The std `File` of an io_uring file, borrowed for calls io_uring lacks (fstat,
/// ftruncate).
fn borrow_std(file: &tokio_uring::fs::File) -> std::mem::ManuallyDrop<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: the descriptor stays open while `file` lives, and ManuallyDrop keeps this
    // borrowed `File` from closing it.
    std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(file.as_raw_fd()) })
}

async fn read(path: Loc, offset: u64, len: usize, stat: bool) -> io::Result<(Bytes, Option<std::fs::Metadata>)> {
    let file = open_uring(&path, libc::O_RDONLY).await?;
    let (res, buf) = file.read_exact_at(Vec::with_capacity(len), offset).await;
    let meta = match (&res, stat) {
        (Ok(()), true) => Some(borrow_std(&file).metadata()),
        _ => None,
    };
    let closed = file.close().await;
    res?;
    closed?;
    Ok((Bytes::from(buf), meta.transpose()?))
}

const OPEN_FOR_WRITE: libc::c_int = libc::O_WRONLY | libc::O_CREAT;

async fn write(path: Loc, offset: u64, data: Bytes) -> io::Result<()> {
    if crate::store::buf::direct_ok(&data, offset) {
        match write_direct(&path, offset, data.clone()).await {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // no O_DIRECT here
            other => return other,
        }
    }
    let file = open_uring(&path, OPEN_FOR_WRITE).await?;
    let (res, _) = file.write_all_at(data, offset).await;
    let closed = file.close().await;
    res?;
    closed
}

/// Writes aligned data with O_DIRECT: by DMA, not copied into the page cache.
async fn write_direct(path: &Loc, offset: u64, data: Bytes) -> io::Result<()> {
    let file = open_uring(path, OPEN_FOR_WRITE | libc::O_DIRECT).await?;
    let (res, _) = file.write_all_at(data, offset).await;
    let closed = file.close().await;
    res?;
    closed
}

async fn finish(path: Loc, len: u64, sync: bool) -> io::Result<()> {
    if !sync && len > 0 {
        // Its last block was written, so it exists with its full length.
        return Ok(());
    }
    let file = open_uring(&path, OPEN_FOR_WRITE).await?;
    let res = async {
        let std = borrow_std(&file);
        if std.metadata()?.len() != len {
            // Only for an empty file, which no block write created.
            std.set_len(len)?;
        }
        if sync {
            file.sync_all().await?;
        }
        Ok::<(), io::Error>(())
    }
    .await;
    let closed = file.close().await;
    res?;
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_of_small_reads_answers_each_in_order_with_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::start().unwrap();
        for (name, text) in [("a", "alpha"), ("c", "gamma!")] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let at = |name: &str, offset: u64, len: usize| (Loc::from(dir.path().join(name)), offset, len);
        let got = disk
            .read_many_and_stat(vec![at("a", 1, 3), at("missing", 0, 1), at("c", 0, 6), at("a", 0, 9)])
            .await;
        assert_eq!(got.len(), 4);
        let (data, meta) = got[0].as_ref().unwrap();
        assert_eq!((&data[..], meta.len()), (&b"lph"[..], 5));
        assert_eq!(got[1].as_ref().unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(&got[2].as_ref().unwrap().0[..], b"gamma!");
        assert_eq!(
            got[3].as_ref().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof,
            "past the end"
        );
    }

    #[tokio::test]
    async fn write_read_and_sync_through_io_uring() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::start().unwrap();
        let p = dir.path().join("f");
        disk.write_at(p.clone(), 5, Bytes::from_static(b"world")).await.unwrap();
        disk.write_at(p.clone(), 0, Bytes::from_static(b"hello")).await.unwrap();
        disk.sync(p.clone(), 12).await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"helloworld\0\0");
        assert_eq!(&disk.read_at(p.clone(), 5, 5).await.unwrap()[..], b"world");
        let err = disk.read_at(p.clone(), 10, 5).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let missing = disk.read_at(dir.path().join("nope"), 0, 1).await.unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn writes_make_the_folders_of_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::start().unwrap();
        // A small block (plain thread), a whole block (io_uring) and an empty file.
        let small = dir.path().join("a/b/small");
        disk.write_at(small.clone(), 0, Bytes::from_static(b"x")).await.unwrap();
        let pool = crate::store::buf::Pool::new(1 << 20);
        let big = dir.path().join("a/c/big");
        disk.write_at(big.clone(), 0, crate::store::buf::aligned(&pool, 1 << 20).freeze())
            .await
            .unwrap();
        let empty = dir.path().join("d/e/empty");
        disk.finish(empty.clone(), 0, false).await.unwrap();
        assert_eq!(std::fs::read(&small).unwrap(), b"x");
        assert_eq!(std::fs::metadata(&big).unwrap().len(), 1 << 20);
        assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
        // A folder is never made out of a file that is in the way.
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let err = disk.write_at(dir.path().join("f/g"), 0, Bytes::from_static(b"x")).await;
        assert!(err.is_err());
    }

    #[tokio::test]
    async fn aligned_blocks_of_every_size_class_land_intact() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::start().unwrap();
        // 256 KiB goes to the plain thread (O_DIRECT where the file system allows it),
        // 1 MiB to io_uring; both at an aligned offset after a small buffered write.
        for len in [256usize << 10, 1 << 20] {
            let pool = crate::store::buf::Pool::new(len);
            let mut buf = crate::store::buf::aligned(&pool, len);
            buf.as_mut_slice()
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i % 251) as u8);
            let want = buf.as_mut_slice().to_vec();
            let p = dir.path().join(format!("f{len}"));
            disk.write_at(p.clone(), 0, Bytes::from_static(b"head")).await.unwrap();
            disk.write_at(p.clone(), len as u64, buf.freeze()).await.unwrap();
            let got = std::fs::read(&p).unwrap();
            assert_eq!(&got[..4], b"head");
            assert_eq!(&got[len..], &want[..], "{len}");
            assert_eq!(&disk.read_at(p, len as u64, len).await.unwrap()[..], &want[..]);
        }
    }
}
