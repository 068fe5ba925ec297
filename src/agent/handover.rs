//! Handing a verified job to its target's hook, and keeping that promise across
//! crashes: commits cut off by a restart are finished (or undone) before the agent
//! serves, held jobs come back from their journal, and the outcome of every commit is
//! recorded so the same job sent again is answered "committed".

use super::{refuse, Shared};
use crate::config::{Config, HookSpec, Import};
use crate::engines::hook::{ImportFile, ImportHook, ImportJob};
use crate::metrics::Metrics;
use crate::proto::blocks::hex;
use crate::proto::path::RelPath;
use crate::proto::wire::{code, JobId, Offer, Refusal, WireCode};
use crate::store::commit::{fingerprint, Done, Ledger};
use crate::store::held::{HeldJob, Holds, Journal};
use crate::store::stage::Stage;
use crate::transfer::codes::io_refusal;
use std::sync::Arc;
use tracing::{error, info, info_span, warn};

/// One commit: the hook to run on a staged, verified, synced job, and where its
/// outcome is recorded.
pub(super) struct Handover {
    pub hook: Arc<dyn ImportHook>,
    /// Whether the hook places the files itself (`move`, `replace`): then the record
    /// answers for the job only while the target still holds them.
    pub places: bool,
    pub ledger: Arc<Ledger>,
}

impl Handover {
    pub fn new(target: &Import, hook: Arc<dyn ImportHook>, ledger: Arc<Ledger>) -> Handover {
        Handover {
            hook,
            places: matches!(target.hook, HookSpec::Move | HookSpec::Replace),
            ledger,
        }
    }

    /// Runs the hook on a blocking thread. Once it succeeded, the outcome is still to be
    /// recorded: the returned [`Recording`] does that (and removes the staging folder).
    /// The sender may be answered first: until it is recorded, the intent of a `move` or
    /// `replace` stays, so a crash in between is finished at the next start.
    pub async fn run(self, mut import: ImportJob, metrics: &Metrics) -> Result<(String, Recording), Refusal> {
        import.ledger = Some(self.ledger.clone());
        let started = std::time::Instant::now();
        let hook = self.hook.clone();
        let res = tokio::task::spawn_blocking(move || hook.import(&import).map(|r| (r, import)))
            .await
            .map_err(|e| refuse(code::HOOK_FAILED, format!("hook panicked: {e}")));
        metrics.hook(started.elapsed(), matches!(res, Ok(Ok(_))));
        match res? {
            Ok((report, import)) => {
                let recording = Recording {
                    ledger: self.ledger,
                    places: self.places,
                    report: report.clone(),
                    import,
                };
                Ok((report, recording))
            }
            Err(e) => Err(refuse(e.code(), format!("import hook failed: {e}"))),
        }
    }
}

/// The outcome of a commit that is placed and not yet recorded.
pub(super) struct Recording {
    ledger: Arc<Ledger>,
    places: bool,
    report: String,
    import: ImportJob,
}

impl Recording {
    /// Records the outcome (with a fingerprint of the placed files: 20,000 of them take
    /// some 40 ms to stat, which is why this may wait until the sender has its answer),
    /// drops the intent and removes the staging folder.
    pub fn record(self) {
        let i = &self.import;
        let placed = self.places.then(|| placed_fingerprint(&i.target_dir, &i.paths));
        let done = done_record(&i.job, &i.target, &i.peer, &self.report, placed);
        if let Err(e) = self.ledger.finish(&done) {
            // The files are placed; only a later "committed" answer to a re-send is lost.
            warn!(error = %e, "outcome of the commit not recorded");
        }
        if let Some(s) = &i.stage {
            s.remove();
        }
        tracing::debug!("outcome recorded");
    }

    /// [`Recording::record`] on a blocking thread.
    pub async fn record_async(self) {
        let _ = tokio::task::spawn_blocking(move || self.record()).await;
    }
}

/// The fingerprint of what a `move` or `replace` placed; empty if a file is gone
/// already, which no later fingerprint equals, so the record then answers for nothing.
fn placed_fingerprint(dir: &std::path::Path, paths: &[RelPath]) -> String {
    fingerprint(dir, paths).unwrap_or_default()
}

fn done_record(job: &str, target: &str, peer: &str, report: &str, placed: Option<String>) -> Done {
    Done {
        job: job.to_string(),
        target: target.to_string(),
        peer: peer.to_string(),
        report: report.to_string(),
        at: crate::store::held::unix_now(),
        placed,
    }
}

/// The job as the hook sees it.
pub(super) fn import_job(
    offer: &Offer,
    paths: Vec<RelPath>,
    stage: &Stage,
    target: &Import,
    peer: String,
) -> ImportJob {
    let files = offer
        .files
        .iter()
        .zip(&paths)
        .map(|(f, p)| ImportFile {
            name: p.to_string(),
            path: stage.file(p),
            size: f.hashes.size,
            blake3: hex(&f.hashes.root),
            keys: f.keys.as_ref().map(Into::into),
        })
        .collect();
    ImportJob {
        job: offer.job_id().to_string(),
        target: target.name.clone(),
        target_dir: target.path.clone(),
        staged_dir: stage.files_dir.clone(),
        peer,
        files,
        meta: offer.meta.iter().cloned().collect(),
        stage: Some(stage.clone()),
        paths,
        ledger: None,
        held: false,
        dir_mode: target.dir_mode,
    }
}

/// The recorded outcome of `job` into `target`, if it committed and (for hooks that
/// place files) the target still holds what it placed.
pub(super) fn committed_before(ledger: &Ledger, job: JobId, target: &Import, paths: &[RelPath]) -> Option<Done> {
    let done = ledger.done(job)?;
    // Any sender the target allows: the same job may come by another route (a relay
    // chain whose relay failed, a ship after a push), and saying it is in tells the
    // sender nothing its job id did not.
    let ours = done.target == target.name;
    (ours && done.still_holds(&target.path, paths)).then_some(done)
}

/// What the sender of a job that committed before is told.
pub(super) fn again(done: &Done) -> String {
    format!("{} (committed {}s ago; sent again)", done.report, done.age().as_secs())
}

/// Journals a staged `hold` job and records it as held (its target stays claimed).
pub(super) fn hold(shared: &Shared, offer: &Offer, peer: &str, stage: &Stage) -> Result<(), Refusal> {
    let job = HeldJob::new(offer.clone(), peer, stage.job_dir.clone());
    shared.journal.record(&job).map_err(io_refusal)?;
    shared.jobs.held.insert(job);
    Ok(())
}

/// Removes a held job's staged files and journal entry and frees its target.
pub(super) fn drop_held(shared: &Shared, job: &HeldJob) {
    Stage::at(job.job_dir.clone()).remove();
    if let Err(e) = shared.journal.remove(job.id) {
        warn!(job = %job.id, error = %e, "journal entry not removed");
    }
    shared.jobs.held.release(&job.offer.target, job.id);
}

/// Whether `job_dir` is a job folder directly in `target`'s staging area (or the one an
/// earlier version kept inside the target): only then may a journal or ledger entry
/// make the agent move or delete anything.
fn owned(config: &Config, target: &str, target_dir: Option<&std::path::Path>, job_dir: &std::path::Path) -> bool {
    let Some(t) = config.import(target) else { return false };
    let parent = job_dir.parent();
    let in_staging = parent == Some(t.staging.as_path()) || parent == Some(t.legacy_staging().as_path());
    target_dir.is_none_or(|d| d == t.path) && in_staging
}

/// Finishes, before the agent serves, every commit that a crash cut off: forward if it
/// can (every file was verified and synced before its intent was written), else back
/// to the state before it. Runs before held jobs are restored, so a held job whose
/// commit finished is not held again.
pub(super) fn recover(config: &Config, ledger: &Ledger, journal: &Journal) {
    for entry in ledger.pending() {
        let intent = match entry {
            Ok(i) => i,
            Err(e) => {
                error!(error = %e, "commit intent unreadable; left for an operator");
                continue;
            }
        };
        let span = info_span!("job", id = %intent.job, target = %intent.target);
        let _in = span.enter();
        if !owned(config, &intent.target, Some(&intent.target_dir), &intent.job_dir) {
            warn!(dir = %intent.job_dir.display(), "commit intent names no staging folder of a configured target; dropped");
            let _ = ledger.abandon(&intent.job);
            continue;
        }
        match intent.apply() {
            Ok(()) => {
                let paths = intent.rel_paths().unwrap_or_default();
                let placed = Some(placed_fingerprint(&intent.target_dir, &paths));
                let report = format!("{} (finished after a restart)", intent.report);
                if let Err(e) = ledger.finish(&done_record(&intent.job, &intent.target, &intent.peer, &report, placed))
                {
                    warn!(error = %e, "outcome of the finished commit not recorded");
                }
                if let (true, Ok(id)) = (intent.held, intent.job.parse::<JobId>()) {
                    let _ = journal.remove(id);
                }
                Stage::at(intent.job_dir.clone()).remove();
                info!(files = intent.paths.len(), "commit cut off by a restart finished");
            }
            Err(u) => match u.back {
                Ok(()) => {
                    let _ = ledger.abandon(&intent.job);
                    warn!(cause = %u.cause, "commit cut off by a restart could not finish; what it had placed is back in staging, the job stays staged");
                }
                Err(e) => {
                    error!(cause = %u.cause, error = %e, "commit cut off by a restart could neither finish nor be put back; retried at the next start")
                }
            },
        }
    }
}

/// Held jobs from the journal whose target and staging folder still exist and that did
/// not commit meanwhile.
pub(super) fn restore_held(config: &Config, journal: &Journal, ledger: &Ledger) -> Holds {
    let holds = Holds::default();
    let entries = journal.load().unwrap_or_else(|e| {
        warn!(error = %e, "job journal unreadable; no held jobs restored");
        vec![]
    });
    for entry in entries {
        let job = match entry {
            Ok(job) => job,
            Err(e) => {
                warn!(error = %e, "held job not restored");
                continue;
            }
        };
        let own = owned(config, &job.offer.target, None, &job.job_dir);
        let committed = ledger.done(job.id).is_some();
        if own && !committed && job.job_dir.is_dir() {
            info!(job = %job.id, target = %job.offer.target, "held job restored");
            holds.insert(job);
            continue;
        }
        match committed {
            true => info!(job = %job.id, "held job had committed; its journal entry is removed"),
            false => {
                warn!(job = %job.id, target = %job.offer.target, "held job dropped: its target or staged files are gone")
            }
        }
        if own {
            Stage::at(job.job_dir.clone()).remove();
        }
        let _ = journal.remove(job.id);
    }
    holds
}
