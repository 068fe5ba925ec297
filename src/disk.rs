//! File I/O on io_uring, on a thread of its own.
//!
//! tokio-uring needs its own current-thread runtime, while the network side runs on an
//! ordinary multi-threaded tokio runtime. So reads, writes and syncs are requests sent
//! to one io_uring thread, each run there as its own task, so many are in flight at
//! once. Buffers move by ownership: a read fills a `Vec` that becomes `Bytes` without a
//! copy, and a write hands the `Bytes` received from quinn to the kernel as they are.

use bytes::Bytes;
use std::io;
use std::path::PathBuf;
use tokio::sync::{mpsc, oneshot};

enum Request {
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        reply: oneshot::Sender<io::Result<Bytes>>,
    },
    Write {
        path: PathBuf,
        offset: u64,
        data: Bytes,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Finish {
        path: PathBuf,
        len: u64,
        sync: bool,
        reply: oneshot::Sender<io::Result<()>>,
    },
}

/// Handle to the io_uring thread; cheap to clone. The thread ends with the last handle.
#[derive(Clone, Debug)]
pub struct Disk {
    tx: mpsc::UnboundedSender<Request>,
}

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
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Disk { tx }),
            Ok(Err(e)) => Err(io::Error::other(e)),
            Err(_) => Err(io::Error::other("io_uring thread exited at start")),
        }
    }

    /// Sends one request to the io_uring thread and waits for its answer.
    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<io::Result<T>>) -> Request) -> io::Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Reads exactly `len` bytes at `offset`; a shorter file is an `UnexpectedEof`.
    pub async fn read_at(&self, path: PathBuf, offset: u64, len: usize) -> io::Result<Bytes> {
        self.call(|reply| Request::Read {
            path,
            offset,
            len,
            reply,
        })
        .await
    }

    /// Writes `data` at `offset`, creating the file if needed.
    pub async fn write_at(&self, path: PathBuf, offset: u64, data: Bytes) -> io::Result<()> {
        self.call(|reply| Request::Write {
            path,
            offset,
            data,
            reply,
        })
        .await
    }

    /// Creates the file if needed, sets its length to `len` and syncs it to disk.
    pub async fn sync(&self, path: PathBuf, len: u64) -> io::Result<()> {
        self.finish(path, len, true).await
    }

    /// Creates the file if needed and sets its length to `len`; syncs it if `sync`.
    pub async fn finish(&self, path: PathBuf, len: u64, sync: bool) -> io::Result<()> {
        self.call(|reply| Request::Finish { path, len, sync, reply }).await
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
            reply,
        } => {
            let _ = reply.send(read(path, offset, len).await);
        }
        Request::Write {
            path,
            offset,
            data,
            reply,
        } => {
            let _ = reply.send(write(path, offset, data).await);
        }
        Request::Finish { path, len, sync, reply } => {
            let _ = reply.send(finish(path, len, sync).await);
        }
    }
}

async fn read(path: PathBuf, offset: u64, len: usize) -> io::Result<Bytes> {
    let file = tokio_uring::fs::File::open(&path).await?;
    let (res, buf) = file.read_exact_at(Vec::with_capacity(len), offset).await;
    let closed = file.close().await;
    res?;
    closed?;
    Ok(Bytes::from(buf))
}

fn open_for_write() -> tokio_uring::fs::OpenOptions {
    let mut o = tokio_uring::fs::OpenOptions::new();
    o.write(true).create(true);
    o
}

async fn write(path: PathBuf, offset: u64, data: Bytes) -> io::Result<()> {
    if crate::buf::direct_ok(&data, offset) {
        match write_direct(&path, offset, data.clone()).await {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // no O_DIRECT here
            other => return other,
        }
    }
    let file = open_for_write().open(&path).await?;
    let (res, _) = file.write_all_at(data, offset).await;
    let closed = file.close().await;
    res?;
    closed
}

/// Writes aligned data with O_DIRECT: by DMA, not copied into the page cache.
async fn write_direct(path: &std::path::Path, offset: u64, data: Bytes) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = open_for_write();
    o.custom_flags(libc::O_DIRECT);
    let file = o.open(path).await?;
    let (res, _) = file.write_all_at(data, offset).await;
    let closed = file.close().await;
    res?;
    closed
}

async fn finish(path: PathBuf, len: u64, sync: bool) -> io::Result<()> {
    if !sync && len > 0 {
        // Its last block was written, so it exists with its full length.
        return Ok(());
    }
    let file = open_for_write().open(&path).await?;
    let res = async {
        if std::fs::metadata(&path)?.len() != len {
            // Only for an empty file, which no block write created.
            std::fs::OpenOptions::new().write(true).open(&path)?.set_len(len)?;
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
}
