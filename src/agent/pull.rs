//! A pull out of one of the agent's exports: the files are listed and offered, sent
//! as a job, and the export's `after_commit` command runs once the puller committed.

use super::*;

impl JobCtx {
    /// What a TLS lane to this puller needs: our lane client side and its name.
    fn lane_tls(&self) -> Option<transfer::LaneTls> {
        let server = rustls::pki_types::ServerName::try_from(self.peer.clone()).ok()?;
        Some(transfer::LaneTls {
            config: self.shared.tls().lane_client.clone(),
            server,
        })
    }

    /// A pull from one of our exports: we are the sender.
    pub(super) async fn pull(
        &self,
        export: String,
        files: Vec<String>,
        range: Option<crate::proto::keys::KeyRange>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), Refusal> {
        let live = self.shared.live();
        let ex = self.export_target(&live, &export)?;
        let _slot = JobSlot::claim(&self.shared, &live, &self.peer)?;
        let (list, mut offer) = self.export_offer(&ex, &files, range.as_ref()).await?;
        // The puller grants the lane if it wants it; this side connects and sends.
        let lane = ex.lane_for(&self.peer);
        offer.tcp_lane = lane.is_some();
        let span = info_span!("job", id = %offer.job_id(), export = %ex.name, files = list.len());
        let after = ex.after_commit.as_ref().map(|spec| {
            (
                AfterCommitHook::from(spec),
                self.after_commit_job(&ex, &offer, range.as_ref()),
            )
        });
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let pacer = crate::metrics::Meter {
            metrics: self.shared.metrics.clone(),
            limits: self.shared.limits.clone(),
            peer: self.peer.clone(),
            progress: None,
        };
        let mut flow = transfer::Flow::new(Some(sent.clone()), Some(pacer));
        flow.lane_tls = lane.and_then(|_| self.lane_tls());
        flow.tls_only = lane == Some(crate::net::tcplane::LaneKind::Tls);
        let run = transfer::send_job(
            std::slice::from_ref(&self.conn),
            send,
            recv,
            offer,
            list,
            &self.shared.disk,
            &flow,
        );
        // A client that never answers or stops reading must not keep the job slot.
        let stall = live.config.limits.stall;
        let res = tokio::select! {
            r = run.instrument(span.clone()) => r,
            _ = gate::quiet_for(sent, stall) => Err(TransferError::Failed(refuse(
                code::ABORTED,
                format!("the client took no data for {}s: the pull was given up", stall.as_secs()),
            ))),
        };
        let committed = match &res {
            Ok(r) if !r.held => Some(r.report.clone()),
            _ => None,
        };
        let outcome = span.in_scope(|| match res {
            Ok(r) => {
                info!(blocks = r.blocks_sent, bytes = r.bytes_sent, "pull served");
                self.shared.metrics.sent(&self.peer, r.blocks_sent, r.bytes_sent);
                Outcome::Committed
            }
            Err(e) => {
                warn!(error = %e, "pull failed");
                Outcome::Failed
            }
        });
        self.shared.metrics.job(outcome);
        if let (Some((hook, mut job)), Some(report)) = (after, committed) {
            // The client has its files; it hears how the command went once it is done
            // (a committed reply, or a failure that does not undo its commit). The job
            // slot is kept until then, so a drain waits for it.
            let _ = recv.stop(quinn::VarInt::from_u32(0));
            job.receiver_report = report;
            let said = match self.after_commit(hook, job).instrument(span).await {
                Ok(report) => Message::Committed {
                    report: crate::proto::wire::cut_reason(format!("after_commit: {report}")),
                },
                Err(why) => Message::Failed(refuse(
                    code::HOOK_FAILED,
                    crate::proto::wire::cut_reason(format!("after_commit: {why}")),
                )),
            };
            let _ = transfer::write_msg(send, &said).await;
        }
        let _ = send.finish();
        Ok(())
    }

    /// What an export's `after_commit` command is told about a pull of `offer`.
    pub(super) fn after_commit_job(
        &self,
        ex: &Export,
        offer: &Offer,
        range: Option<&crate::proto::keys::KeyRange>,
    ) -> AfterCommitJob {
        AfterCommitJob {
            job: offer.job_id().to_string(),
            export: ex.name.clone(),
            export_dir: ex.path.clone(),
            peer: self.peer.clone(),
            files: offer
                .files
                .iter()
                .map(|f| ExportedFile {
                    name: f.path.clone(),
                    path: ex.path.join(&f.path),
                    size: f.hashes.size,
                    blake3: crate::proto::blocks::hex(&f.hashes.root),
                    keys: f.keys.as_ref().map(Into::into),
                })
                .collect(),
            range: range.map(Into::into),
            receiver_report: String::new(),
        }
    }

    /// Runs an export's `after_commit` command for a pull the receiver committed. Its
    /// failure can not undo that commit: it is logged, counted
    /// (`barge_after_commit_failures_total`) and told to the client.
    pub(super) async fn after_commit(&self, hook: AfterCommitHook, job: AfterCommitJob) -> Result<String, String> {
        let started = std::time::Instant::now();
        let res = tokio::task::spawn_blocking(move || hook.run(&job))
            .await
            .unwrap_or_else(|e| Err(crate::engines::hook::HookError::Other(e.to_string())));
        let elapsed_ms = started.elapsed().as_millis() as u64;
        self.shared.metrics.after_commit(res.is_ok());
        match res {
            Ok(report) => {
                info!(elapsed_ms, %report, "after_commit command done");
                Ok(report)
            }
            Err(e) => {
                warn!(
                    elapsed_ms,
                    error = %e,
                    "after_commit command failed; the pull stays committed on the receiver"
                );
                Err(e.to_string())
            }
        }
    }
}
