//! The tap of a relay: blocks a replica has verified and written, read back for the
//! next replica as soon as each one is on disk.
//!
//! A relay (a replica with hops after it) forwards at block granularity: the job to the
//! next hop starts when this one is accepted, and its lanes send the blocks the next hop
//! lacks in the order they are verified and written here (not in a planned order: a
//! lane waiting for one late block while others pile up would stall the chain). So the sender's uplink carries each block once,
//! every hop checks every block before it passes it on, and a block never waits for its
//! file, or the job, to be complete. A block is forwarded from memory (the bytes that
//! arrived, kept until sent on, up to [`STASH_BYTES`]): staged files are written with
//! O_DIRECT, so reading one back is a disk read, and with three replicas on one disk
//! those reads cost the chain a third of its rate (fanout bench). Blocks this replica held
//! already (resumed, or a file the target holds with the same content), and any the
//! stash had no room for, are read back from disk.

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
                ended: None,
            }),
            changed: tokio::sync::Notify::new(),
            locs,
        })
    }

    /// Keeps a verified block's bytes for the next hop, if there is room; it becomes
    /// available once [`Tap::mark`] says it is written.
    pub fn stash(&self, file: u32, block: u32, data: &Bytes) {
        let mut s = self.state.lock().expect("tap");
        if s.stashed + data.len() <= STASH_BYTES && s.stash.insert((file, block), data.clone()).is_none() {
            s.stashed += data.len();
        }
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
    /// [`Tap::next`]. Those in already come first.
    pub fn want(&self, blocks: impl IntoIterator<Item = BlockRef>) {
        let mut s = self.state.lock().expect("tap");
        for b in blocks {
            let key = (b.file, b.block);
            if s.have.get(b.file as usize).and_then(|f| f.get(b.block as usize)) == Some(&true) {
                s.ready.push_front(key);
            }
            s.wanted.insert(key, b);
        }
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
        if let Some(data) = kept {
            return Ok(Some((b, data)));
        }
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
