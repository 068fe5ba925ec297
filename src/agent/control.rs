//! Requests that are not transfers: commit or abort a held job, list jobs, list an
//! export. Each is one request and one answer on its own stream.

use super::handover::{self, drop_held, import_job, Handover};
use super::{refuse, ActiveGuard, JobCtx, RETRY_BUSY};
use crate::config::{Export, ExportKind};
use crate::proto::job::ReceiveJob;
use crate::proto::keys::KeyRange;
use crate::proto::wire::WireCode;
use crate::proto::wire::{code, JobId, JobInfo, JobOp, ListedFile, Message, Offer, Refusal};
use crate::store::source::SourceFile;
use crate::store::stage::Stage;
use crate::transfer::codes::io_refusal;
use tracing::{info, info_span, warn, Instrument};

impl JobCtx {
    /// Answers a job operation or a listing; `Err` is sent back as a refusal.
    pub(super) async fn answer(&self, request: Message, send: &mut quinn::SendStream) -> Result<(), Refusal> {
        let reply = match request {
            Message::JobOp { op, job } => {
                let span = info_span!("job", id = %job, ?op);
                self.job_op(op, job).instrument(span).await?
            }
            Message::ListJobs => Message::Jobs(self.jobs()),
            Message::List { export, range } => {
                let ex = self.export_target(&self.shared.live(), &export)?;
                Message::Listing(self.listing(&ex, range.as_ref()).await?)
            }
            other => return Err(refuse(code::BAD_MESSAGE, format!("not a request: {other:?}"))),
        };
        transfer_reply(send, &reply).await;
        Ok(())
    }

    async fn job_op(&self, op: JobOp, id: JobId) -> Result<Message, Refusal> {
        let _active = ActiveGuard::try_claim(&self.shared, id, &self.peer).map_err(|_| {
            refuse(code::BUSY, format!("job {id} is being received or committed now")).retry_after(RETRY_BUSY)
        })?;
        let holds = &self.shared.jobs.held;
        let Some(job) = holds.take(id) else {
            return self.not_held(op, id);
        };
        let live = self.shared.live();
        let target = live.config.import(&job.offer.target);
        let Some(target) = target.filter(|t| self.may_operate(&job.peer, t)).cloned() else {
            // Someone else's job, or a target closed to this peer since: answered as
            // if there were none.
            holds.put_back(job);
            return Err(refuse(code::NOT_FOUND, format!("no held job {id}")));
        };
        if op == JobOp::Abort {
            drop_held(&self.shared, &job);
            info!(target = %target.name, "held job aborted; staged files removed");
            return Ok(Message::Aborted);
        }
        let paths = match ReceiveJob::new(job.offer.clone()) {
            Ok(j) => j.paths,
            Err(e) => {
                holds.put_back(job);
                return Err(e.refusal());
            }
        };
        let stage = Stage::at(job.job_dir.clone());
        let offer = std::sync::Arc::new(job.offer.clone());
        let bad = stage.verify(offer, &paths, &self.shared.disk).await;
        if !bad.is_empty() {
            warn!(target = %target.name, files = bad.len(), "held job's staged files changed; not committed");
            holds.put_back(job);
            return Err(refuse(code::BAD_BLOCK, changed_while_held(id, &bad)));
        }
        let mut import = import_job(&job.offer, paths, &stage, &target, job.peer.clone());
        import.held = true;
        let handover = Handover::new(&target, live.hooks[&target.name].clone(), self.shared.commits.clone());
        match handover.run(import, &self.shared.metrics).await {
            Ok((report, recording)) => {
                recording.record_async().await;
                drop_held(&self.shared, &job);
                info!(target = %target.name, %report, "held job committed");
                Ok(Message::Committed { report })
            }
            Err(r) => {
                warn!(target = %target.name, reason = %r.reason, "commit failed; the job stays held");
                holds.put_back(job);
                Err(r)
            }
        }
    }

    /// The answer about a job that is not held: committed before (a lost answer, or a
    /// commit a restart finished), or unknown.
    fn not_held(&self, op: JobOp, id: JobId) -> Result<Message, Refusal> {
        let live = self.shared.live();
        let done = self.shared.commits.done(id).filter(|d| {
            let target = live.config.import(&d.target);
            target.is_some_and(|t| self.may_operate(&d.peer, t))
        });
        match (done, op) {
            (Some(d), JobOp::Commit) => Ok(Message::Committed {
                report: handover::again(&d),
            }),
            (Some(d), JobOp::Abort) => Err(refuse(
                code::NOT_FOUND,
                format!("job {id} committed {}s ago; it can not be aborted", d.age().as_secs()),
            )),
            (None, _) => Err(refuse(code::NOT_FOUND, format!("no held job {id}"))),
        }
    }

    /// Whether this peer may see and operate on a job `owner` sent into `target`: its
    /// own while it may still write there, or any there if it is one of the target's
    /// operators.
    fn may_operate(&self, owner: &str, target: &crate::config::Import) -> bool {
        let own = owner == self.peer && target.allow.allows(&self.peer);
        own || target.operators.allows(&self.peer)
    }

    /// This peer's receiving and held jobs, and others' on the targets it operates.
    fn jobs(&self) -> Vec<JobInfo> {
        let live = self.shared.live();
        let may_write = |t: &str, owner: &str| live.config.import(t).is_some_and(|t| self.may_operate(owner, t));
        let mut out = vec![];
        for (id, inc) in self.table.lock().expect("job table").iter() {
            if !may_write(&inc.offer.target, &inc.peer) {
                continue;
            }
            let missing = inc.missing_bytes();
            out.push(info(
                *id,
                "receiving",
                &inc.offer,
                &inc.peer,
                missing,
                inc.started.elapsed(),
            ));
        }
        for h in self.shared.jobs.held.list() {
            if may_write(&h.offer.target, &h.peer) {
                out.push(info(h.id, "held", &h.offer, &h.peer, 0, h.age()));
            }
        }
        out.extend(self.ships(&live));
        out.sort_by(|a, b| (&a.target, a.age_secs).cmp(&(&b.target, b.age_secs)));
        out
    }

    /// Ships running from exports this peer may order ships from: `shipping`, with
    /// their operator and replicas in place of a peer.
    fn ships(&self, live: &super::Live) -> Vec<JobInfo> {
        let may = |export: &str| live.config.export(export).is_some_and(|e| e.ship.allows(&self.peer));
        let runs = self.shared.ships.list().into_iter().filter(|r| may(&r.export));
        runs.map(|run| {
            let to: Vec<&str> = run.to.iter().map(|h| h.peer.as_str()).collect();
            let who = crate::proto::wire::cut_name(format!("{} -> {}", run.operator, to.join(" -> ")));
            let total = run.offer.total_bytes();
            let sent = run.sent.load(std::sync::atomic::Ordering::Relaxed).min(total);
            let mut job = info(
                run.offer.job_id(),
                "shipping",
                &run.offer,
                &who,
                total - sent,
                run.started.elapsed(),
            );
            job.target = run.export.clone();
            job
        })
        .collect()
    }

    async fn listing(&self, ex: &Export, range: Option<&KeyRange>) -> Result<Vec<ListedFile>, Refusal> {
        let (_, offer) = self.export_offer(ex, &[], range).await?;
        Ok(offer
            .files
            .into_iter()
            .map(|f| ListedFile {
                path: f.path,
                size: f.hashes.size,
                root: f.hashes.root,
                keys: f.keys,
            })
            .collect())
    }

    /// The files of an export (those named, or all), narrowed to `range` for an SST
    /// export, with their hashes and key spans.
    pub(super) async fn export_offer(
        &self,
        ex: &Export,
        files: &[String],
        range: Option<&KeyRange>,
    ) -> Result<(Vec<SourceFile>, Offer), Refusal> {
        let src = |e: crate::store::source::SourceError| e.refusal();
        let list = crate::store::source::collect_export(&ex.path, files).map_err(src)?;
        let cache = &self.shared.cache;
        let (list, spans) = match (ex.kind, range) {
            (ExportKind::Files, None) => (list, None),
            (ExportKind::Files, Some(_)) => {
                return Err(refuse(
                    code::BAD_NAME,
                    format!(
                        "export {:?} is not of kind \"sst\": a key range can not select its files",
                        ex.name
                    ),
                ))
            }
            (ExportKind::Sst, range) => {
                let cache = cache.clone();
                let range = range.cloned();
                let picked =
                    tokio::task::spawn_blocking(move || crate::store::source::select_sst(list, range.as_ref(), &cache))
                        .await
                        .map_err(io_refusal)?
                        .map_err(src)?;
                let (list, spans): (Vec<_>, Vec<_>) = picked.into_iter().unzip();
                (list, Some(spans))
            }
        };
        let mut offer = crate::store::source::make_offer(&ex.name, &list, vec![], cache)
            .await
            .map_err(|e| e.refusal())?;
        for (f, span) in offer.files.iter_mut().zip(spans.into_iter().flatten()) {
            f.keys = Some(span);
        }
        Ok((list, offer))
    }
}

/// Why a held job was not committed: its staged files no longer verify.
fn changed_while_held(id: JobId, bad: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut names = bad.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if bad.len() > SHOWN {
        names.push_str(&format!(" and {} more", bad.len() - SHOWN));
    }
    format!(
        "held job {id} not committed: staged files no longer match their blake3 hashes: {names}; \
         push the same files with --hold again to replace the bad blocks, or abort the job"
    )
}

fn info(id: JobId, state: &str, offer: &Offer, peer: &str, missing: u64, age: std::time::Duration) -> JobInfo {
    let bytes = offer.total_bytes();
    JobInfo {
        id,
        state: state.into(),
        target: offer.target.clone(),
        peer: peer.into(),
        files: offer.files.len() as u64,
        bytes,
        done: bytes - missing,
        age_secs: age.as_secs(),
    }
}

async fn transfer_reply(send: &mut quinn::SendStream, reply: &Message) {
    if crate::transfer::write_msg(send, reply).await.is_ok() {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}
