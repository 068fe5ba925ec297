//! Held jobs: bulk loads that are staged and verified, then wait for a separate commit
//! or abort.
//!
//! A push with `hold` claims its import target when its offer is accepted, so a load
//! has the target to itself: other jobs into the target are refused with the holder's
//! name. Once all files are staged and synced, the job is written to a journal in the
//! agent's `data_dir` (one JSON file per job, written to a temporary name, synced and
//! renamed), so a held job survives a restart of the agent. Commit runs the target's
//! hook; abort and expiry remove everything staged. Nothing of a held job is visible in
//! the target before commit, because it lives only in the staging folder.

use crate::proto::keys::Key;
use crate::proto::wire::{JobId, Message, Offer};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why the journal could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    /// A journal file or folder could not be read or written.
    #[error("job journal {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A journal entry does not parse.
    #[error("job journal entry {path} is corrupt: {reason}")]
    Corrupt {
        /// The entry's file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// A job that is staged and waits for commit or abort.
#[derive(Debug, Clone)]
pub struct HeldJob {
    /// The job's id.
    pub id: JobId,
    /// Identity of the sender.
    pub peer: String,
    /// The job's offer, as it was verified.
    pub offer: Offer,
    /// The job's staging folder (`<target>/.barge-staging/<id>`).
    pub job_dir: PathBuf,
    /// Seconds since the epoch when the job was held.
    pub held_at: u64,
}

impl HeldJob {
    /// The job of `offer` from `peer`, staged in `job_dir`, held from now.
    pub fn new(offer: Offer, peer: &str, job_dir: PathBuf) -> HeldJob {
        HeldJob {
            id: offer.job_id(),
            peer: peer.to_string(),
            offer,
            job_dir,
            held_at: unix_now(),
        }
    }

    /// Time since the job was held.
    pub(crate) fn age(&self) -> Duration {
        Duration::from_secs(unix_now().saturating_sub(self.held_at))
    }
}

/// Seconds since the Unix epoch now (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One journal file, as JSON. The offer is kept in its wire encoding (hex), so what is
/// restored is exactly what was verified.
#[derive(Serialize, Deserialize)]
struct Entry {
    id: String,
    peer: String,
    job_dir: PathBuf,
    held_at: u64,
    offer: String,
}

/// The journal folder of held jobs, `<data_dir>/jobs`.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens the journal in `<data_dir>/jobs`, making the folder if it is missing.
    pub fn open(data_dir: &Path) -> Result<Journal, HeldError> {
        let dir = data_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        Ok(Journal { dir })
    }

    fn path(&self, id: JobId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `job` durably: temporary file, fsync, rename, fsync of the folder.
    pub fn record(&self, job: &HeldJob) -> Result<(), HeldError> {
        let entry = Entry {
            id: job.id.to_string(),
            peer: job.peer.clone(),
            job_dir: job.job_dir.clone(),
            held_at: job.held_at,
            // The offer was decoded from the wire, so it is within the wire's limits.
            offer: Key(Message::Offer(job.offer.clone()).encode_unchecked()[4..].to_vec()).hex(),
        };
        let text = serde_json::to_vec_pretty(&entry).expect("journal entry serializes");
        let (tmp, path) = (self.dir.join(format!(".{}.tmp", job.id)), self.path(job.id));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(io_at(&path))
    }

    /// Removes a job's entry (durably); a missing entry is not an error.
    pub fn remove(&self, id: JobId) -> Result<(), HeldError> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_at(&path)(e)),
            _ => {}
        }
        std::fs::File::open(&self.dir)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&self.dir))
    }

    /// Every job in the journal; corrupt entries are returned as errors, not skipped
    /// silently.
    pub fn load(&self) -> Result<Vec<Result<HeldJob, HeldError>>, HeldError> {
        let mut out = vec![];
        for e in std::fs::read_dir(&self.dir).map_err(io_at(&self.dir))?.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "json") {
                out.push(read_entry(&path));
            }
        }
        Ok(out)
    }
}

fn read_entry(path: &Path) -> Result<HeldJob, HeldError> {
    let corrupt = |reason: String| HeldError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read(path).map_err(io_at(path))?;
    let e: Entry = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    let bytes = unhex(&e.offer).ok_or_else(|| corrupt("offer is not hex".into()))?;
    let offer = match Message::decode(&bytes).map_err(|e| corrupt(e.to_string()))? {
        Message::Offer(o) => o,
        _ => return Err(corrupt("not an offer".into())),
    };
    // An agent before job id v2 journaled the legacy id: the job keeps it (the sender
    // was told that id).
    let id = offer.job_id();
    let id = match e.id.parse::<JobId>() {
        Ok(said) if said == id || said == offer.legacy_job_id() => said,
        _ => return Err(corrupt(format!("offer is job {id}, entry says {}", e.id))),
    };
    Ok(HeldJob {
        id,
        peer: e.peer,
        offer,
        job_dir: e.job_dir,
        held_at: e.held_at,
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    Key::parse(&format!("0x{s}")).ok().map(|k| k.0)
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> HeldError + '_ {
    move |source| HeldError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Who holds an import target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The held job.
    pub job: JobId,
    /// Identity of its sender.
    pub peer: String,
}

/// The agent's held jobs and the targets they claim.
#[derive(Debug, Default)]
pub struct Holds {
    claims: Mutex<HashMap<String, Claim>>,
    jobs: Mutex<HashMap<JobId, HeldJob>>,
}

impl Holds {
    /// Claims `target` for `claim.job`; returns the current holder if another job has it.
    pub fn claim(&self, target: &str, claim: Claim) -> Result<(), Claim> {
        let mut claims = self.claims.lock().expect("claims");
        match claims.get(target) {
            // The same job from another sender is not the same claim: a job belongs
            // to the identity that staged it.
            Some(c) if c.job != claim.job || c.peer != claim.peer => Err(c.clone()),
            _ => {
                claims.insert(target.to_string(), claim);
                Ok(())
            }
        }
    }

    /// The job holding `target`, if any.
    pub fn holder(&self, target: &str) -> Option<Claim> {
        self.claims.lock().expect("claims").get(target).cloned()
    }

    /// Releases `target` if `job` holds it.
    pub fn release(&self, target: &str, job: JobId) {
        let mut claims = self.claims.lock().expect("claims");
        if claims.get(target).is_some_and(|c| c.job == job) {
            claims.remove(target);
        }
    }

    /// Records a staged job as held (its target stays claimed).
    pub fn insert(&self, job: HeldJob) {
        let claim = Claim {
            job: job.id,
            peer: job.peer.clone(),
        };
        self.claims
            .lock()
            .expect("claims")
            .insert(job.offer.target.clone(), claim);
        self.jobs.lock().expect("held jobs").insert(job.id, job);
    }

    /// Takes a held job out (for commit, abort or expiry); its target stays claimed
    /// until [`Holds::release`].
    pub fn take(&self, id: JobId) -> Option<HeldJob> {
        self.jobs.lock().expect("held jobs").remove(&id)
    }

    /// Puts back a job whose commit failed, so it can be retried or aborted.
    pub fn put_back(&self, job: HeldJob) {
        self.jobs.lock().expect("held jobs").insert(job.id, job);
    }

    /// Every held job, in no particular order.
    pub fn list(&self) -> Vec<HeldJob> {
        self.jobs.lock().expect("held jobs").values().cloned().collect()
    }

    /// Staging folder names of held jobs, which the staging sweep must keep.
    pub fn staged_names(&self) -> std::collections::HashSet<String> {
        self.jobs
            .lock()
            .expect("held jobs")
            .keys()
            .map(|id| id.to_string())
            .collect()
    }

    /// Held jobs older than `ttl`, taken out.
    pub fn take_expired(&self, ttl: Duration) -> Vec<HeldJob> {
        let mut jobs = self.jobs.lock().expect("held jobs");
        let old: Vec<JobId> = jobs.values().filter(|j| j.age() >= ttl).map(|j| j.id).collect();
        old.iter().filter_map(|id| jobs.remove(id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::blocks::FileHashes;
    use crate::proto::wire::OfferFile;

    fn offer(target: &str) -> Offer {
        Offer {
            target: target.into(),
            files: vec![OfferFile {
                path: "a.sst".into(),
                hashes: FileHashes::from_reader(&b"abc"[..], 3).unwrap(),
                keys: None,
                mode: 0o644,
            }],
            meta: vec![("region".into(), "2".into())],
            tcp_lane: false,
            hold: true,
            relay: vec![],
        }
    }

    #[test]
    fn journal_round_trips_and_removes() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let job = HeldJob::new(offer("t"), "peer-a", d.path().join("stage"));
        j.record(&job).unwrap();
        let loaded: Vec<HeldJob> = j.load().unwrap().into_iter().map(Result::unwrap).collect();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].offer, job.offer);
        assert_eq!((loaded[0].id, &loaded[0].peer), (job.id, &job.peer));
        j.remove(job.id).unwrap();
        assert!(j.load().unwrap().is_empty());
        j.remove(job.id).unwrap();
    }

    #[test]
    fn corrupt_journal_entries_are_named() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let job = HeldJob::new(offer("t"), "p", d.path().join("s"));
        j.record(&job).unwrap();
        let path = d.path().join("jobs").join(format!("{}.json", job.id));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace(&job.id.to_string(), &"0".repeat(32))).unwrap();
        std::fs::write(d.path().join("jobs/torn.json"), b"{\"id\":").unwrap();
        let loaded = j.load().unwrap();
        assert_eq!(loaded.len(), 2);
        assert!(loaded.iter().all(|r| matches!(r, Err(HeldError::Corrupt { .. }))));
    }

    #[test]
    fn a_job_held_by_an_agent_before_job_id_v2_keeps_its_id() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let mut job = HeldJob::new(offer("t"), "p", d.path().join("s"));
        let legacy = job.offer.legacy_job_id();
        assert_ne!(legacy, job.id);
        job.id = legacy;
        j.record(&job).unwrap();
        let loaded: Vec<HeldJob> = j.load().unwrap().into_iter().map(Result::unwrap).collect();
        assert_eq!(loaded[0].id, legacy, "the id its sender was told");
    }

    #[test]
    fn a_target_has_one_holder() {
        let h = Holds::default();
        let a = Claim {
            job: JobId([1; 16]),
            peer: "a".into(),
        };
        let b = Claim {
            job: JobId([2; 16]),
            peer: "b".into(),
        };
        h.claim("t", a.clone()).unwrap();
        h.claim("t", a.clone()).unwrap();
        assert_eq!(h.claim("t", b.clone()), Err(a.clone()));
        h.claim("u", b.clone()).unwrap();
        h.release("t", b.job);
        assert_eq!(h.holder("t"), Some(a.clone()));
        h.release("t", a.job);
        h.claim("t", b).unwrap();
    }

    #[test]
    fn expired_jobs_are_taken_out() {
        let h = Holds::default();
        let mut old = HeldJob::new(offer("t"), "p", PathBuf::from("/x"));
        old.held_at -= 100;
        let new = HeldJob::new(offer("u"), "p", PathBuf::from("/y"));
        let (old_id, new_id) = (old.id, new.id);
        h.insert(old);
        h.insert(new);
        let gone = h.take_expired(Duration::from_secs(50));
        assert_eq!(gone.iter().map(|j| j.id).collect::<Vec<_>>(), vec![old_id]);
        assert_eq!(h.list().iter().map(|j| j.id).collect::<Vec<_>>(), vec![new_id]);
        assert!(h.holder("t").is_some(), "the target stays claimed until released");
    }
}
