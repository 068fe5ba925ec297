//! A push into one of the agent's import targets: checks, staging, the job's receive
//! and its hand-over to the target's hook.

use super::*;

impl JobCtx {
    /// A push into one of our import targets. `Err` means refused before accepting.
    pub(super) async fn push(
        &self,
        offer: Offer,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), Refusal> {
        let live = self.shared.live();
        let target = self.import_target(&live, &offer.target)?;
        let hook = live.hooks[&target.name].clone();
        self.check_relay(&target, &offer)?;
        let job = ReceiveJob::new(offer).map_err(|e| e.refusal())?;
        // As the sender offered it: a relay forwards it so (the target may set modes).
        let offered = job.offer.clone();
        let span =
            info_span!("job", id = %job.id, target = %target.name, files = job.paths.len(), hold = job.offer.hold);
        let _guard = ActiveGuard::take_over(&self.shared, job.id, &self.peer)
            .instrument(span.clone())
            .await?;
        let slot = JobSlot::claim(&self.shared, &live, &self.peer)?;
        if let Some(done) = handover::committed_before(&self.shared.commits, job.id, &target, &job.paths) {
            span.in_scope(|| info!(report = %done.report, "committed before; sent again, confirmed without data"));
            // What a commit cut off after its outcome was recorded left in staging.
            Stage::at(target.staging.join(job.id.to_string())).remove();
            let confirm = transfer::confirm_committed(send, recv, &job, handover::again(&done));
            if let Err(e) = confirm.await {
                span.in_scope(|| warn!(error = %e, "confirming an earlier commit failed"));
            }
            return Ok(());
        }
        let _claim = self.claim_target(&target.name, job.id, job.offer.hold)?;
        let limits = &live.config.limits;
        let (job, stage, space) = async { self.prepare(job, &target, hook.as_ref(), limits).await }
            .instrument(span.clone())
            .await?;
        let relay = self.start_relay(&offered, &job, &stage, &target)?;
        let run = self.receive(job, stage, (space, slot, relay), target, hook, send, recv);
        if let Err(e) = run.instrument(span.clone()).await {
            span.in_scope(|| warn!(error = %e, "job failed"));
        }
        Ok(())
    }

    /// A held job has its target to itself: a hold claims the target (refused while
    /// another job holds it or writes into it); any other job is refused while it is
    /// held.
    pub(super) fn claim_target(&self, target: &str, id: JobId, hold: bool) -> Result<ClaimGuard<'_>, Refusal> {
        let held_by = |c: Claim| {
            let by = match c.peer == self.peer {
                true => format!("your job {}", c.job),
                false => "another sender's job".to_string(),
            };
            refuse(code::HELD, format!("import target {target:?} is held by {by}"))
        };
        if !hold {
            return match self.shared.jobs.held.holder(target) {
                Some(c) => Err(held_by(c)),
                None => Ok(ClaimGuard::none(&self.shared)),
            };
        }
        let claim = Claim {
            job: id,
            peer: self.peer.clone(),
        };
        self.shared.jobs.held.claim(target, claim).map_err(held_by)?;
        let others = self.writers(target, id);
        if others > 0 {
            self.shared.jobs.held.release(target, id);
            return Err(refuse(
                code::BUSY,
                format!(
                    "{others} other jobs are writing into import target {target:?}; a held load needs it to itself"
                ),
            ));
        }
        Ok(ClaimGuard {
            shared: &self.shared,
            target: Some((target.to_string(), id)),
        })
    }

    /// Jobs other than `id` receiving into `target` now.
    pub(super) fn writers(&self, target: &str, id: JobId) -> usize {
        let table = self.table.lock().expect("job table");
        table
            .iter()
            .filter(|(j, inc)| **j != id && inc.offer.target == target)
            .count()
    }

    /// Checks, opens the staging folder, finds what an earlier attempt staged, and
    /// refuses up front (with a retry-after) what would not fit: the staging limit, or
    /// the target's free space less the reserve.
    pub(super) async fn prepare(
        &self,
        mut job: ReceiveJob,
        target: &Import,
        hook: &dyn ImportHook,
        limits: &crate::config::Limits,
    ) -> Result<(ReceiveJob, Stage, Reservation), Refusal> {
        let t = std::time::Instant::now();
        hook.check(&target.path, &job.paths).map_err(|e| e.refusal())?;
        let roots: Vec<_> = job
            .paths
            .iter()
            .cloned()
            .zip(job.offer.files.iter().map(|f| f.hashes.root))
            .collect();
        let there = hook.already_there(&target.path, &roots).map_err(|e| e.refusal())?;
        // A held job stages everything: its commit may come much later, when the files
        // there now may be gone.
        if !job.offer.hold {
            (there.iter().enumerate())
                .filter(|(_, t)| **t)
                .for_each(|(i, _)| job.already_there(i));
        }
        if let Some(max) = limits.max_staged_bytes {
            let staged = self.shared.jobs.staging_committed(None);
            if staged.saturating_add(job.offer.total_bytes()) > max {
                let why = format!("staging is full: {staged} bytes staged or on their way, the limit is {max}");
                return Err(refuse(code::BUSY, why).retry_after(RETRY_BUSY));
            }
        }
        if let Some(max) = limits.identity.staged_bytes {
            let staged = self.shared.jobs.staging_committed(Some(&self.peer));
            if staged.saturating_add(job.offer.total_bytes()) > max {
                let why = format!(
                    "{} has {staged} bytes staged or on their way; its limit is {max}",
                    self.peer
                );
                return Err(refuse(code::BUSY, why).retry_after(RETRY_BUSY));
            }
        }
        if let Some(mode) = target.file_mode {
            // The target decides its files' modes; the journal of a held job keeps them.
            Arc::make_mut(&mut job.offer)
                .files
                .iter_mut()
                .for_each(|f| f.mode = mode);
        }
        let stage = Stage::open(&target.staging, &job).map_err(|e| e.refusal())?;
        let opened_ms = t.elapsed().as_millis() as u64;
        let found = stage.scan(&mut job, &self.shared.disk).await;
        tracing::debug!(opened_ms, ready_ms = t.elapsed().as_millis() as u64, "staging ready");
        let need = job.missing_bytes();
        let space = match self.shared.space.admit(&target.path, need, limits.reserve_bytes) {
            Ok(s) => s,
            Err(e) => {
                if found == 0 {
                    stage.remove();
                }
                return Err(e.refusal());
            }
        };
        let there = job.there().iter().filter(|t| **t).count();
        info!(
            resumed_blocks = found,
            missing = job.missing(),
            already_there = there,
            "offer accepted"
        );
        Ok((job, stage, space))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn receive(
        &self,
        job: ReceiveJob,
        stage: Stage,
        (space, job_slot, relay): (Reservation, JobSlot<'_>, Option<transfer::Relay>),
        target: Import,
        hook: Arc<dyn ImportHook>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<Received, TransferError> {
        let peer = self.peer.clone();
        let (lane, dir_mode) = (target.lane_for(&self.peer), target.dir_mode);
        let stage2 = stage.clone();
        let shared = self.shared.clone();
        // The commit's outcome is recorded once the sender has its answer (see
        // `Handover::run`), and also if the answer could not be sent.
        let recording = Arc::new(Mutex::new(None));
        let slot = recording.clone();
        let run_hook = move |offer: Arc<Offer>, paths: Vec<RelPath>| async move {
            if offer.hold {
                return handover::hold(&shared, &offer, &peer, &stage2).map(|_| Received::Held);
            }
            let import = handover::import_job(&offer, paths, &stage2, &target, peer);
            let handover = Handover::new(&target, hook, shared.commits.clone());
            let (report, placed) = handover.run(import, &shared.metrics).await?;
            *slot.lock().expect("recording") = Some(placed);
            Ok(Received::Committed(report))
        };
        let started = std::time::Instant::now();
        let tcp = (self.shared.tcp.as_ref())
            .zip(lane)
            .map(|(lanes, kind)| transfer::LaneAt {
                lanes,
                ip: self.conn.remote_address().ip(),
                kind,
            });
        let meter = crate::metrics::Meter {
            metrics: self.shared.metrics.clone(),
            limits: self.shared.limits.clone(),
            peer: self.peer.clone(),
            progress: None,
        };
        let at = transfer::ReceiveAt {
            peer: &self.peer,
            disk: &self.shared.disk,
            table: &self.table,
            meter: Some(&meter),
            tcp,
            space: Some(&space),
            stall: Some(self.shared.config().limits.stall),
            dir_mode,
            relay: relay.as_ref(),
        };
        let out = transfer::receive_job(send, recv, job, stage, at, run_hook).await;
        // The sender has its answer: its next job may have the slot while this one's
        // outcome is recorded (the same job sent again still waits, see `ActiveGuard`).
        drop(job_slot);
        let placed = recording.lock().expect("recording").take();
        self.shared.metrics.job(match (&out, &placed) {
            (Ok(Received::Committed(_)), _) | (Err(_), Some(_)) => Outcome::Committed,
            (Ok(Received::Held), _) => Outcome::Held,
            (Ok(Received::Aborted), _) => Outcome::Aborted,
            (Err(_), None) => Outcome::Failed,
        });
        if let Some(p) = placed {
            p.record_async().await;
        }
        let out = out?;
        match &out {
            Received::Committed(report) => {
                info!(elapsed_ms = started.elapsed().as_millis() as u64, %report, "committed")
            }
            Received::Held => info!(elapsed_ms = started.elapsed().as_millis() as u64, "staged and held"),
            Received::Aborted => info!("aborted by sender; staging removed"),
        }
        Ok(out)
    }
}
