//! The tap of a relay: blocks a replica has verified and written, read back for the
//! next replica as soon as each one is on disk.
//!
//! A relay (a replica with hops after it) forwards at block granularity: the job to the
//! next hop starts when this one is accepted, and each of its lanes waits for the next
//! block it plans to send to be verified and written here, then reads it back (from the
//! page cache, just written) and sends it. So the sender's uplink carries each block once,
//! every hop checks every block before it passes it on, and a block never waits for its
//! file, or the job, to be complete. Blocks this replica held already (resumed, or a file
//! the target holds with the same content) are read back the same way.

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

struct TapState {
    have: Vec<Vec<bool>>,
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
                ended: None,
            }),
            changed: tokio::sync::Notify::new(),
            locs,
        })
    }

    /// Block `block` of file `file` is verified and written.
    pub fn mark(&self, file: u32, block: u32) {
        let mut s = self.state.lock().expect("tap");
        if let Some(slot) = s.have.get_mut(file as usize).and_then(|f| f.get_mut(block as usize)) {
            *slot = true;
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// The receiving job ended without every block (`aborted`: its sender gave it up).
    pub fn end(&self, why: Refusal, aborted: bool) {
        self.state.lock().expect("tap").ended.get_or_insert((why, aborted));
        self.changed.notify_waiters();
    }

    /// Waits for block `b` to be in, then reads it.
    pub async fn read(&self, disk: &Disk, b: &BlockRef) -> Result<Bytes, TransferError> {
        loop {
            // Registered before the check, so a mark between the two is not missed.
            let changed = self.changed.notified();
            {
                let s = self.state.lock().expect("tap");
                let have = s.have.get(b.file as usize).and_then(|f| f.get(b.block as usize));
                match (have, &s.ended) {
                    (Some(true), _) => break,
                    (None, _) => {
                        return Err(TransferError::Stream(format!(
                            "no block {} of file {}",
                            b.block, b.file
                        )))
                    }
                    (_, Some((why, aborted))) => {
                        return Err(TransferError::Upstream {
                            why: why.clone(),
                            aborted: *aborted,
                        })
                    }
                    _ => {}
                }
            }
            changed.await;
        }
        let loc = self.locs[b.file as usize].clone();
        let shown = match &loc {
            Loc::Beneath { shown, .. } | Loc::Path(shown) => shown.clone(),
        };
        disk.read_at(loc, b.offset, b.len as usize)
            .await
            .map_err(|source| TransferError::Io { path: shown, source })
    }
}
