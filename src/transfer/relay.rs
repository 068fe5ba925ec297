//! The tap of a relay: blocks a replica has verified and written, read back for the
//! next replica as soon as each one is on disk.
//!
//! A relay (a replica with hops after it) forwards at block granularity: the job to the
//! next hop starts when this one is accepted, and its lanes send the blocks the next hop
//! lacks in the order they are verified and written here (not in a planned order: a
//! lane waiting for one late block while others pile up would stall the chain). So the sender's uplink carries each block once,
//! every hop checks every block before it passes it on, and a block never waits for its
//! file, or the job, to be complete. A block is forwarded from memory: the bytes that
//! arrived are kept until a lane sends them on, up to [`STASH_BYTES`]; when that is full
//! the relay takes no more from its sender until the next hop has taken some (the
//! chain runs at its slowest hop's pace, with bounded memory). Reading blocks back
//! instead was a disk read (staged files are written with O_DIRECT): with three
//! replicas on one disk, a relay that fell behind read most blocks back and the chain
//! lost a third of its rate (fanout bench). Blocks this replica held already (resumed,
//! or a file the target holds with the same content) are read back from disk.

use super::TransferError;
use crate::proto::job::{BlockRef, ReceiveJob};
use crate::proto::wire::Refusal;
use crate::store::disk::{Disk, Loc};
use crate::store::stage::Stage;
use bytes::Bytes;
use std::path::Path;
use std::sync::Mutex;

/// What a relay's forwarding reads from: which blocks are in, and where.
pub struct Tap {
    state: Mutex<TapState>,
    changed: tokio::sync::Notify,
    /// Where each file's blocks are read back: its staged file, or the target's file
    /// for one the target already holds.
    locs: Vec<Loc>,
    /// Blocks forwarded from memory, and read back from disk.
    pub from_memory: std::sync::atomic::AtomicU64,
    /// Blocks forwarded after reading them back from disk.
    pub from_disk: std::sync::atomic::AtomicU64,
}

/// Most bytes of received blocks kept for the next hop; beyond, it reads them back.
pub const STASH_BYTES: usize = 32 << 20;

struct TapState {
    have: Vec<Vec<bool>>,
    /// Verified blocks as they arrived, until the next hop's lane takes them.
    stash: std::collections::HashMap<(u32, u32), Bytes>,
    stashed: usize,
    /// Blocks in (written, or held before), in the order they came.
    ready: std::collections::VecDeque<(u32, u32)>,
    /// Blocks the next hop lacks and no lane has taken yet.
    wanted: std::collections::HashMap<(u32, u32), BlockRef>,
    /// The next hop's plan is known (`wanted` is set).
    planned: bool,
    /// The forwarding ended (or the receiving job did): keep nothing more.
    closed: bool,
    /// The receiving job ended without every block: why, and whether its sender aborted.
    ended: Option<(Refusal, bool)>,
}

impl Tap {
    /// A tap on `job` as accepted: the blocks it holds already are in. Files the target
    /// holds (see [`ReceiveJob::already_there`]) are read from `target_dir`.
    pub fn new(job: &ReceiveJob, stage: &Stage, target_dir: &Path) -> std::io::Result<Tap> {
        let mut target = None;
        let mut locs = Vec::with_capacity(job.paths.len());
        for (rel, there) in job.paths.iter().zip(job.there()) {
            let loc = match there {
                false => stage.place(rel)?,
                true => {
                    let dir = match &target {
                        Some(d) => std::sync::Arc::clone(d),
                        None => target
                            .insert(std::sync::Arc::new(crate::store::safefs::open_dir(target_dir)?))
                            .clone(),
                    };
                    Loc::Beneath {
                        dir,
                        rel: rel.as_str().into(),
                        shown: rel.under(target_dir),
                    }
                }
            };
            locs.push(loc);
        }
        Ok(Tap {
            state: Mutex::new(TapState {
                have: job.held().to_vec(),
                stash: Default::default(),
                stashed: 0,
                ready: Default::default(),
                wanted: Default::default(),
                planned: false,
                closed: false,
                ended: None,
            }),
            changed: tokio::sync::Notify::new(),
            locs,
            from_memory: 0.into(),
            from_disk: 0.into(),
        })
    }

    /// Keeps a verified block's bytes for the next hop (it becomes available once
    /// [`Tap::mark`] says it is written). While [`STASH_BYTES`] are kept, waits for a
    /// lane to take some: so the relay's sender is slowed to the next hop's pace. A
    /// block the next hop has already is not kept.
    pub async fn keep(&self, file: u32, block: u32, data: &Bytes) {
        loop {
            let changed = self.changed.notified();
            {
                let mut s = self.state.lock().expect("tap");
                let key = (file, block);
                if s.closed || s.ended.is_some() || (s.planned && !s.wanted.contains_key(&key)) {
                    return;
                }
                if s.stashed + data.len() <= STASH_BYTES {
                    if s.stash.insert(key, data.clone()).is_none() {
                        s.stashed += data.len();
                    }
                    return;
                }
            }
            changed.await;
        }
    }

    /// The forwarding is over (done or failed): nothing more is kept, and a sender
    /// waiting for room goes on.
    pub fn close(&self) {
        let mut s = self.state.lock().expect("tap");
        s.closed = true;
        s.stash.clear();
        s.stashed = 0;
        drop(s);
        self.changed.notify_waiters();
    }

    /// Block `block` of file `file` is verified and written.
    pub fn mark(&self, file: u32, block: u32) {
        let mut s = self.state.lock().expect("tap");
        if let Some(slot) = s.have.get_mut(file as usize).and_then(|f| f.get_mut(block as usize)) {
            *slot = true;
            s.ready.push_back((file, block));
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// The receiving job ended without every block (`aborted`: its sender gave it up).
    pub fn end(&self, why: Refusal, aborted: bool) {
        let mut s = self.state.lock().expect("tap");
        s.ended.get_or_insert((why, aborted));
        s.stash.clear();
        s.stashed = 0;
        drop(s);
        self.changed.notify_waiters();
    }

    /// The blocks the next hop lacks (its accept's plan): lanes take them with
    /// [`Tap::next`]. Those in already come first. A later call (the hop after a next
    /// hop that failed) replaces the earlier plan.
    pub fn want(&self, blocks: impl IntoIterator<Item = BlockRef>) {
        let mut s = self.state.lock().expect("tap");
        s.wanted.clear();
        for b in blocks {
            let key = (b.file, b.block);
            if s.have.get(b.file as usize).and_then(|f| f.get(b.block as usize)) == Some(&true) {
                s.ready.push_front(key);
            }
            s.wanted.insert(key, b);
        }
        s.planned = true;
        // What was kept before the plan came, and the next hop has already, goes.
        let TapState { stash, wanted, .. } = &mut *s;
        stash.retain(|key, _| wanted.contains_key(key));
        s.stashed = s.stash.values().map(Bytes::len).sum();
        drop(s);
        self.changed.notify_waiters();
    }

    /// The next block the next hop lacks, as soon as one is in here, with its bytes;
    /// `None` once every wanted block was taken.
    pub async fn next(&self, disk: &Disk) -> Result<Option<(BlockRef, Bytes)>, TransferError> {
        let (b, kept) = loop {
            // Registered before the check, so a mark between the two is not missed.
            let changed = self.changed.notified();
            match self.take()? {
                Some(Some(found)) => break found,
                Some(None) => return Ok(None),
                None => changed.await,
            }
        };
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(data) = kept {
            self.from_memory.fetch_add(1, Relaxed);
            return Ok(Some((b, data)));
        }
        self.from_disk.fetch_add(1, Relaxed);
        let loc = self.locs[b.file as usize].clone();
        let shown = match &loc {
            Loc::Beneath { shown, .. } | Loc::Path(shown) => shown.clone(),
        };
        let data = disk.read_at(loc, b.offset, b.len as usize).await;
        let data = data.map_err(|source| TransferError::Io { path: shown, source })?;
        Ok(Some((b, data)))
    }

    /// A wanted block that is in (and its bytes, if kept): `Some(None)` when none is
    /// wanted any more, `None` to wait.
    #[allow(clippy::type_complexity)]
    fn take(&self) -> Result<Option<Option<(BlockRef, Option<Bytes>)>>, TransferError> {
        let mut s = self.state.lock().expect("tap");
        while let Some(key) = s.ready.pop_front() {
            if let Some(b) = s.wanted.remove(&key) {
                let kept = s.stash.remove(&key);
                s.stashed -= kept.as_ref().map_or(0, Bytes::len);
                drop(s);
                if kept.is_some() {
                    // Room for the sender's next block.
                    self.changed.notify_waiters();
                }
                return Ok(Some(Some((b, kept))));
            }
        }
        if s.wanted.is_empty() {
            return Ok(Some(None));
        }
        match &s.ended {
            Some((why, aborted)) => Err(TransferError::Upstream {
                why: why.clone(),
                aborted: *aborted,
            }),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::blocks::BLOCK_SIZE;
    use crate::proto::job::testing;
    use std::sync::Arc;

    /// A tap on a job of one file of `blocks` whole blocks, none in yet.
    fn tap(blocks: usize) -> (tempfile::TempDir, Tap, Vec<Bytes>) {
        let data: Vec<Bytes> = (0..blocks)
            .map(|i| Bytes::from(vec![i as u8; BLOCK_SIZE as usize]))
            .collect();
        let whole: Vec<u8> = data.iter().flat_map(|b| b.iter().copied()).collect();
        let job = ReceiveJob::new(testing::offer(vec![testing::file("f", &whole)])).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let stage = Stage::open(dir.path(), &job).unwrap();
        let tap = Tap::new(&job, &stage, dir.path()).unwrap();
        (dir, tap, data)
    }

    fn block(i: u32) -> BlockRef {
        BlockRef {
            file: 0,
            block: i,
            offset: i as u64 * BLOCK_SIZE,
            len: BLOCK_SIZE as u32,
        }
    }

    #[tokio::test]
    async fn a_full_stash_holds_the_sender_back_until_a_lane_takes_a_block() {
        let full = STASH_BYTES / BLOCK_SIZE as usize;
        let (_dir, tap, data) = tap(full + 1);
        let tap = Arc::new(tap);
        tap.want((0..=full as u32).map(block));
        for (i, d) in data.iter().take(full).enumerate() {
            tap.keep(0, i as u32, d).await;
            tap.mark(0, i as u32);
        }
        // One more does not fit: its keep waits...
        let last = data[full].clone();
        let waiting = tokio::spawn({
            let tap = tap.clone();
            async move { tap.keep(0, full as u32, &last).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the sender is held back");
        // ...until a lane takes a block (from memory, in arrival order).
        let disk = crate::store::disk::Disk::start().unwrap();
        let (b, got) = tap.next(&disk).await.unwrap().unwrap();
        assert_eq!((b.block, &got), (0, &data[0]));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(tap.from_memory.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn what_the_next_hop_has_is_not_kept_and_a_closed_tap_keeps_nothing() {
        let (_dir, tap, data) = tap(3);
        tap.want([block(1)]);
        tap.keep(0, 0, &data[0]).await;
        tap.keep(0, 1, &data[1]).await;
        assert_eq!(tap.state.lock().unwrap().stash.len(), 1, "only the wanted block");
        tap.close();
        tap.keep(0, 2, &data[2]).await;
        assert!(tap.state.lock().unwrap().stash.is_empty());
    }

    #[tokio::test]
    async fn a_receiving_job_that_ends_ends_the_lanes_waiting_on_it() {
        let (_dir, tap, _) = tap(2);
        let tap = Arc::new(tap);
        tap.want([block(0), block(1)]);
        let disk = crate::store::disk::Disk::start().unwrap();
        let lane = tokio::spawn({
            let tap = tap.clone();
            async move { tap.next(&disk).await.map(|_| ()) }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        tap.end(
            Refusal::new(crate::proto::wire::code::ABORTED, "aborted by the sender"),
            true,
        );
        let err = lane.await.unwrap().unwrap_err();
        assert!(matches!(err, TransferError::Upstream { aborted: true, .. }), "{err}");
    }
}
